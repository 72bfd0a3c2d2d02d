//! Drain: a backlog delivered by the worker (HTTP, Kafka REST) or by the
//! polling relay, PgQ or CDC; and the capacity, writing and delivering
//! at once.

use crate::{cdc, relay};
use outbox_testkit::{Cluster, Receiver, Reply};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Writers emit as fast as they can while the worker delivers; the rate
/// delivered over the second half of the run.
pub const WRITERS: i64 = 16;

pub fn capacity(cluster: &Cluster, db: &mut postgres::Client, secs: u64) -> f64 {
    let rx = counting_receiver();
    db.execute(
        "SELECT outbox.create_endpoint('capacity', $1, topics => '{capacity}', options => '{\"max_in_flight\": 64}')",
        &[&rx.url("/")],
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (mut c, stop) = (cluster.connect(), stop.clone());
            std::thread::spawn(move || {
                let emit = c
                    .prepare("SELECT outbox_emit('capacity', jsonb_build_object('i', $1::bigint), 'key-' || ($1::bigint % 1000))")
                    .unwrap();
                let mut i: i64 = w;
                while !stop.load(Ordering::Relaxed) {
                    c.execute(&emit, &[&i]).unwrap();
                    i += WRITERS;
                }
            })
        })
        .collect();
    let counts = |db: &mut postgres::Client| -> (i64, i64) {
        let r = db.query_one("SELECT delivered, pending FROM outbox.stats WHERE endpoint = 'capacity'", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    std::thread::sleep(Duration::from_secs(secs / 2));
    let (t0, (d0, p0)) = (Instant::now(), counts(db));
    std::thread::sleep(Duration::from_secs(secs - secs / 2));
    let (d1, p1) = counts(db);
    let elapsed = t0.elapsed().as_secs_f64();
    let rate = (d1 - d0) as f64 / elapsed;
    println!("   (emitted {:.0}/s, delivered {rate:.0}/s)", ((d1 + p1) - (d0 + p0)) as f64 / elapsed);
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    db.execute("SELECT outbox.drop_endpoint('capacity')", &[]).unwrap();
    rate
}

/// A receiver that only counts (and answers 200).
pub fn counting_receiver() -> Receiver {
    let rx = Receiver::start();
    rx.forget_requests();
    rx
}

/// A Kafka REST v2 endpoint that acknowledges every record (no broker
/// behind it): measures what outbox itself can push.
pub fn kafka_v2_responder() -> Receiver {
    let rx = Receiver::start();
    rx.forget_requests();
    rx.respond(|r, _| {
        let n = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v["records"].as_array().map(Vec::len))
            .unwrap_or(0);
        let offsets: Vec<Value> =
            (0..n).map(|i| json!({"partition": 0, "offset": i, "error_code": null, "error": null})).collect();
        Reply::Full { status: 200, headers: vec![], body: json!({ "offsets": offsets }).to_string().into_bytes() }
    });
    rx
}

/// A drain's rate, and CPU time per event: of the process that delivers
/// (the outbox worker, both its Postgres side and its network threads; a
/// relay's own process), and of the delivering side as a whole (that
/// process and the database cluster: a relay's SQL runs in backends, the
/// worker's inside itself). The receiver is in neither.
pub struct Drained {
    pub eps: f64,
    pub cpu_us_per_event: f64,
    pub total_cpu_us_per_event: f64,
}

/// Load `n` events over `keys` keys into the outbox while the endpoint is
/// paused, resume it, and time the drain.
#[allow(clippy::too_many_arguments)]
pub fn drain_outbox(
    cluster: &Cluster,
    db: &mut postgres::Client,
    url: &str,
    kind: &str,
    options: Value,
    n: i64,
    keys: i64,
    payload_bytes: usize,
) -> Drained {
    let name = "drain";
    db.execute(
        "SELECT outbox.create_endpoint($1, $2, $3, '{drain}', $4::text::jsonb)",
        &[&name, &url, &kind, &options.to_string()],
    )
    .unwrap();
    db.execute("SELECT outbox.pause_endpoint('drain')", &[]).unwrap();
    let pad = "x".repeat(payload_bytes.saturating_sub(40));
    in_transactions(n, |first, m| {
        db.execute(
            "SELECT count(outbox_emit('drain', jsonb_build_object('i', i, 'pad', $3::text), 'key-' || (i % $2)))
             FROM generate_series($4::bigint, $4::bigint + $1 - 1) AS i",
            &[&m, &keys, &pad, &first],
        )
        .unwrap();
    });
    quiesce(db);
    let worker = outbox_testkit::worker_pid(db);
    let cpu_before = outbox_testkit::cpu_seconds(worker);
    let cluster_before = outbox_testkit::cluster_cpu_seconds(cluster);
    let started = Instant::now();
    db.execute("SELECT outbox.resume_endpoint('drain')", &[]).unwrap();
    // The end is watched on the progress counter: outbox.stats counts the
    // backlog left, a scan of it, and every 20 ms on a 2-core machine
    // that took some 60 % of a core from the drain it watched.
    let mut watch = cluster.connect();
    let delivered = watch
        .prepare(
            "SELECT p.delivered FROM outbox.progress AS p JOIN outbox.endpoints AS e ON e.id = p.endpoint_id
             WHERE e.name = 'drain'",
        )
        .unwrap();
    loop {
        let delivered: i64 = watch.query_one(&delivered, &[]).unwrap().get(0);
        if delivered >= n {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "drain did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let eps = n as f64 / started.elapsed().as_secs_f64();
    let cpu_us_per_event = (outbox_testkit::cpu_seconds(worker) - cpu_before) * 1e6 / n as f64;
    let total_cpu_us_per_event = (outbox_testkit::cluster_cpu_seconds(cluster) - cluster_before) * 1e6 / n as f64;
    db.execute("SELECT outbox.drop_endpoint('drain')", &[]).unwrap();
    Drained { eps, cpu_us_per_event, total_cpu_us_per_event }
}

/// Kafka REST v2, batched, into `kafka_v2_responder` at `url`.
pub fn drain_kafka_rest(cluster: &Cluster, db: &mut postgres::Client, url: &str, n: i64) -> Drained {
    drain_outbox(cluster, db, url, "kafka_rest_v2", json!({"batch_size": 500, "max_in_flight": 8}), n, 1000, 64)
}

/// Native Kafka into `brokers` (`kafka://host:port`), topic `drain`.
pub fn drain_kafka_native(cluster: &Cluster, db: &mut postgres::Client, brokers: &str, n: i64) -> Drained {
    drain_outbox(cluster, db, brokers, "kafka", json!({}), n, 1000, 64)
}

/// The same backlog in relay_outbox, drained by the polling relay in its
/// own process.
pub fn drain_relay(
    cluster: &Cluster,
    db: &mut postgres::Client,
    rx: &Receiver,
    n: i64,
    keys: i64,
    mode: &str,
) -> Drained {
    db.batch_execute("TRUNCATE relay_outbox").unwrap();
    db.execute(
        "INSERT INTO relay_outbox (key, payload)
         SELECT 'key-' || (i % $2), jsonb_build_object('i', i, 'pad', repeat('x', 24)) FROM generate_series(1, $1::bigint) AS i",
        &[&n, &keys],
    )
    .unwrap();
    quiesce(db);
    let (relay_before, cluster_before) =
        (outbox_testkit::reaped_children_cpu_seconds(), outbox_testkit::cluster_cpu_seconds(cluster));
    let started = Instant::now();
    let status = relay::command(cluster, rx, mode).status().expect("relay runs");
    assert!(status.success());
    let eps = n as f64 / started.elapsed().as_secs_f64();
    let relay_cpu = outbox_testkit::reaped_children_cpu_seconds() - relay_before;
    let cluster_cpu = outbox_testkit::cluster_cpu_seconds(cluster) - cluster_before;
    Drained {
        eps,
        cpu_us_per_event: relay_cpu * 1e6 / n as f64,
        total_cpu_us_per_event: (relay_cpu + cluster_cpu) * 1e6 / n as f64,
    }
}

/// The worker's CPU while it has nothing to send, as a percentage of one
/// core over `secs`, in three states: an active endpoint and no traffic,
/// a paused endpoint with a backlog, and an endpoint that is down (its
/// events wait out their backoff).
pub fn idle_cpu_pct(db: &mut postgres::Client, secs: u64) -> [f64; 3] {
    let worker = outbox_testkit::worker_pid(db);
    let measure = |secs: u64| {
        let before = outbox_testkit::cpu_seconds(worker);
        std::thread::sleep(Duration::from_secs(secs));
        (outbox_testkit::cpu_seconds(worker) - before) * 100.0 / secs as f64
    };
    let quiet = {
        let rx = counting_receiver();
        db.execute("SELECT outbox.create_endpoint('idle', $1, topics => '{idle}')", &[&rx.url("/")]).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let pct = measure(secs);
        db.execute("SELECT outbox.pause_endpoint('idle')", &[]).unwrap();
        db.execute("SELECT count(outbox_emit('idle', '{}', 'k' || i)) FROM generate_series(1, 1000) AS i", &[])
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        (pct, measure(secs))
    };
    db.execute("SELECT outbox.drop_endpoint('idle')", &[]).unwrap();
    // A closed port: connection refused at once, retried with backoff.
    let port = outbox_testkit::cluster::free_port();
    db.execute(
        "SELECT outbox.create_endpoint('down', $1, topics => '{down}', options => '{\"backoff_max_ms\": 5000}')",
        &[&format!("http://127.0.0.1:{port}/")],
    )
    .unwrap();
    db.execute("SELECT count(outbox_emit('down', '{}', 'k' || i)) FROM generate_series(1, 1000) AS i", &[]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let down = measure(secs);
    db.execute("SELECT outbox.drop_endpoint('down')", &[]).unwrap();
    [quiet.0, quiet.1, down]
}

/// The same backlog in a PgQ queue (`bench`), drained by one PgQ consumer
/// in its own process (relay.rs, `pgq`), with pgqd ticking.
pub fn drain_pgq(cluster: &Cluster, db: &mut postgres::Client, rx: &Receiver, n: i64, keys: i64) -> f64 {
    in_transactions(n, |first, m| {
        db.execute(
            "SELECT count(pgq.insert_event('bench', 'ev', jsonb_build_object('i', i, 'pad', repeat('x', 24))::text,
                                           'key-' || (i % $2), NULL, NULL, NULL))
             FROM generate_series($3::bigint, $3::bigint + $1 - 1) AS i",
            &[&m, &keys, &first],
        )
        .unwrap();
    });
    quiesce(db);
    let started = Instant::now();
    let status = relay::command(cluster, rx, "pgq").arg(n.to_string()).status().expect("the PgQ consumer runs");
    assert!(status.success());
    n as f64 / started.elapsed().as_secs_f64()
}

/// The same backlog in cdc_outbox on the CDC cluster, decoded from a
/// fresh slot by wal2json and posted by the CDC relay in its own process
/// (relay.rs, `cdc`), which ends once it posted `n` distinct events.
pub fn drain_cdc(cdc: &Cluster, rx: &Receiver, n: i64, keys: i64) -> f64 {
    let mut db = cdc.connect();
    db.batch_execute("TRUNCATE cdc_outbox").unwrap();
    cdc::fresh_slot(&mut db);
    in_transactions(n, |first, m| {
        db.execute(
            "INSERT INTO cdc_outbox (key, payload)
             SELECT 'key-' || (i % $2), jsonb_build_object('i', i, 'pad', repeat('x', 24))
             FROM generate_series($3::bigint, $3::bigint + $1 - 1) AS i",
            &[&m, &keys, &first],
        )
        .unwrap();
    });
    let before = rx.count();
    quiesce(&mut db);
    let started = Instant::now();
    let status = relay::command(cdc, rx, "cdc").arg(n.to_string()).status().expect("the CDC relay runs");
    assert!(status.success());
    let eps = n as f64 / started.elapsed().as_secs_f64();
    // Exactly n: a duplicate (decoding is at-least-once) would show here.
    assert_eq!(rx.count() - before, n as usize, "the CDC relay's posts, for {n} events");
    eps
}

/// A backlog of `n` loaded in transactions of at most 5,000:
/// `load(first, count)` writes events first..first + count.
fn in_transactions(n: i64, mut load: impl FnMut(i64, i64)) {
    let mut first = 0;
    while first < n {
        let count = 5_000.min(n - first);
        load(first, count);
        first += count;
    }
}

/// Start every drain from the same state: what loading it (or the write
/// path before it) left dirty in shared buffers written out. Otherwise
/// whichever drain runs first pays for the checkpoint, and its backends
/// (the worker's main thread among them) evict dirty pages themselves.
fn quiesce(db: &mut postgres::Client) {
    db.batch_execute("CHECKPOINT").unwrap();
}
