//! Driving the extension from a test: create it, endpoints, emit, wait for
//! the stats to say something, load.

use crate::{Cluster, Request, WAIT};
use std::time::{Duration, Instant};

/// The pid of the outbox worker of `db`'s database, if it runs.
pub(crate) fn query_worker_pid(db: &mut postgres::Client) -> Result<Option<i32>, postgres::Error> {
    let row = db.query_opt(
        "SELECT pid FROM pg_catalog.pg_stat_activity
         WHERE backend_type = 'outbox worker' AND datname = pg_catalog.current_database()",
        &[],
    )?;
    Ok(row.map(|r| r.get(0)))
}

/// The pid of the outbox worker of `db`'s database, once it runs.
pub fn worker_pid(db: &mut postgres::Client) -> i32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(pid) = query_worker_pid(db).unwrap() {
            return pid;
        }
        assert!(Instant::now() < deadline, "no outbox worker in pg_stat_activity");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cluster with the extension created in database `postgres`.
pub fn cluster_with_outbox(name: &str) -> (Cluster, postgres::Client) {
    let cluster = Cluster::start(name, &[]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox").expect("CREATE EXTENSION outbox");
    (cluster, db)
}

/// Create an endpoint of `kind` with fast retries (tests should not wait
/// out production backoff), merged with `options`.
pub fn endpoint(
    db: &mut postgres::Client,
    name: &str,
    kind: &str,
    url: &str,
    topics: &[&str],
    options: serde_json::Value,
) {
    let mut opts = serde_json::json!({"backoff_base_ms": 20, "backoff_max_ms": 200});
    if let (Some(o), Some(extra)) = (opts.as_object_mut(), options.as_object()) {
        for (k, v) in extra {
            o.insert(k.clone(), v.clone());
        }
    }
    let topics: Vec<String> = topics.iter().map(|s| s.to_string()).collect();
    db.execute(
        "SELECT outbox.create_endpoint($1, $2, $3, $4, $5::text::jsonb)",
        &[&name, &url, &kind, &topics, &opts.to_string()],
    )
    .expect("create_endpoint");
}

/// A webhook endpoint, as [`endpoint`].
pub fn webhook(db: &mut postgres::Client, name: &str, url: &str, topics: &[&str], options: serde_json::Value) {
    endpoint(db, name, "webhook", url, topics, options)
}

/// Emit `n` events over 1,000 keys, 10,000 per transaction, each payload
/// padded with `pad` bytes: a backlog for the drain tests.
pub fn emit_backlog(db: &mut postgres::Client, n: i64, pad: i32) {
    let per_tx = 10_000.min(n);
    for _ in 0..n / per_tx {
        db.execute(
            "SELECT count(outbox_emit('t', jsonb_build_object('i', i, 'pad', repeat('x', $2)), 'k' || (i % 1000)))
             FROM generate_series(1, $1::bigint) AS i",
            &[&per_tx, &pad],
        )
        .expect("emit backlog");
    }
}

/// Emit `n` events of key `key` on `topic` in one transaction, data
/// `{"n": 1}` to `{"n": n}` (see [`data_n`]): a one-key backlog.
pub fn emit_key_backlog(db: &mut postgres::Client, topic: &str, key: &str, n: i64) {
    db.execute(
        "SELECT count(outbox_emit($1, jsonb_build_object('n', i), $2)) FROM generate_series(1, $3::bigint) AS i",
        &[&topic, &key, &n],
    )
    .expect("emit a key's backlog");
}

/// Emit one event in its own transaction; returns its id as text.
pub fn emit(db: &mut postgres::Client, topic: &str, payload: serde_json::Value, key: Option<&str>) -> String {
    db.query_one("SELECT outbox_emit($1, $2::text::jsonb, $3)::text", &[&topic, &payload.to_string(), &key])
        .expect("outbox_emit")
        .get(0)
}

/// Poll `query` (one boolean) until true, or panic after `timeout`.
pub fn wait_sql(db: &mut postgres::Client, timeout: Duration, query: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let ok: Option<bool> = db.query_opt(query, &[]).expect("wait query").and_then(|r| r.get(0));
        if ok == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {query}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `n` of a delivered envelope's data.
pub fn data_n(r: &Request) -> i64 {
    r.json()["data"]["n"].as_i64().unwrap()
}

/// Group delivered envelopes by key, in arrival order, as (key, data).
pub fn by_key(requests: &[Request]) -> std::collections::BTreeMap<String, Vec<serde_json::Value>> {
    let mut out: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
    for r in requests {
        let v = r.json();
        let key = v["key"].as_str().unwrap_or("").to_string();
        out.entry(key).or_default().push(v["data"].clone());
    }
    out
}

/// Change a server setting and reload (the worker sees it on SIGHUP).
pub fn set_and_reload(db: &mut postgres::Client, setting: &str, value: &str) {
    db.batch_execute(&format!("ALTER SYSTEM SET {setting} = '{value}'")).expect("ALTER SYSTEM");
    db.batch_execute("SELECT pg_reload_conf()").expect("reload");
}

/// 4 writers commit `per_writer` transactions each over 10 shared keys; a
/// counter row per key orders the transactions of a key, so `n` in the
/// payload is that key's commit order.
pub fn concurrent_load(cluster: &Cluster, topic: &str, per_writer: i32) -> i64 {
    let mut db = cluster.connect();
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS counters (key text PRIMARY KEY, n int NOT NULL);
         INSERT INTO counters SELECT 'key-' || i, 0 FROM generate_series(0, 9) AS i ON CONFLICT DO NOTHING;",
    )
    .unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut c = cluster.connect();
            let topic = topic.to_string();
            std::thread::spawn(move || {
                for i in 0..per_writer {
                    let key = format!("key-{}", (w * 7 + i * 3) % 10);
                    let mut tx = c.transaction().unwrap();
                    let n: i32 = tx
                        .query_one("UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n", &[&key])
                        .unwrap()
                        .get(0);
                    tx.execute(
                        "SELECT outbox_emit($3, jsonb_build_object('n', $2::int), $1, 'counted', '{\"h\": \"v\"}')",
                        &[&key, &n, &topic],
                    )
                    .unwrap();
                    tx.commit().unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    4 * per_writer as i64
}

/// User and system CPU seconds process `pid` used so far, all its threads
/// (/proc/<pid>/stat).
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = proc_stat(pid);
    stat.seconds(11) + stat.seconds(12)
}

/// CPU seconds the whole cluster used so far: the postmaster, every
/// process it runs now (backends, the outbox worker, the checkpointer...),
/// and the ones that already ended (their time is added to the
/// postmaster's children's time when it reaps them).
pub fn cluster_cpu_seconds(cluster: &Cluster) -> f64 {
    let pid_file = std::fs::read_to_string(cluster.dir.join("data").join("postmaster.pid")).unwrap_or_default();
    let Some(postmaster) = pid_file.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) else { return 0.0 };
    let own = proc_stat(postmaster);
    let mut total = (11..=14).map(|i| own.seconds(i)).sum::<f64>();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let stat = proc_stat(pid);
        if stat.field(1) == postmaster as f64 {
            total += stat.seconds(11) + stat.seconds(12);
        }
    }
    total
}

/// /proc/<pid>/stat's fields after the command name (which is in
/// parentheses and may hold spaces): index 1 is the parent's pid, 11 and
/// 12 user and system time, 13 and 14 those of reaped children.
struct ProcStat(Vec<String>);

fn proc_stat(pid: i32) -> ProcStat {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    ProcStat(stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().map(String::from).collect())
}

impl ProcStat {
    fn field(&self, i: usize) -> f64 {
        self.0.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
    }

    fn seconds(&self, i: usize) -> f64 {
        // SAFETY: sysconf has no preconditions.
        self.field(i) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }
}

/// CPU seconds of this process's children that ended and were waited
/// for (getrusage(RUSAGE_CHILDREN)).
pub fn reaped_children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds the cluster's outbox worker used so far.
pub fn worker_cpu_seconds(cluster: &Cluster) -> f64 {
    cpu_seconds(cluster.worker_pid_within(WAIT).expect("an outbox worker runs"))
}
