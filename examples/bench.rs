//! `make bench`: outbox measured against the alternatives, in one run, on
//! one machine, with the same settings and clients.
//!
//! - write path: pgbench, a business INSERT alone (a), with outbox_emit (b),
//!   with a hand-written INSERT into a plain outbox table (c);
//! - drain: a backlog delivered by the worker over HTTP (one event per
//!   request) and Kafka REST (batched), against the classic
//!   outbox-plus-polling relay (FOR UPDATE SKIP LOCKED) in its own process;
//! - latency commit to receiver at 1,000 events/s and at 80 % of the
//!   measured maximum, for both;
//! - sustained load at 80 % of the maximum (backlog, table size, memory);
//! - scaling over keys and payload sizes.
//!
//! BENCH_SIZE=quick (seconds, a smoke run) or full (what the README
//! reports). Writes target/bench/results.json, raw.csv, latency and
//! throughput plots (SVG).

use outbox_testkit::cluster::{bindir, server_dir, Cluster};
use outbox_testkit::http::read_message;
use outbox_testkit::{Receiver, Reply};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Size {
    name: &'static str,
    pgbench_secs: u64,
    drain_events: i64,
    latency_secs: u64,
    sustained_secs: u64,
    scaling_events: i64,
}

const QUICK: Size = Size {
    name: "quick",
    pgbench_secs: 2,
    drain_events: 10_000,
    latency_secs: 4,
    sustained_secs: 30,
    scaling_events: 2_000,
};
const FULL: Size = Size {
    name: "full",
    pgbench_secs: 20,
    drain_events: 100_000,
    latency_secs: 30,
    sustained_secs: 600,
    scaling_events: 100_000,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("relay") {
        relay::main(&args[2..]);
        return;
    }
    let mut size = match std::env::var("BENCH_SIZE").as_deref() {
        Ok("full") => FULL,
        _ => QUICK,
    };
    // For profiling: BENCH_ONLY=drain BENCH_DRAIN_EVENTS=500000 runs one long drain.
    let only = std::env::var("BENCH_ONLY").ok();
    if let Some(n) = std::env::var("BENCH_DRAIN_EVENTS").ok().and_then(|v| v.parse().ok()) {
        size.drain_events = n;
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    println!("== outbox benchmark, size {} ({} cores)", size.name, std::thread::available_parallelism().unwrap());

    // Durable defaults (fsync and synchronous_commit on), as in production.
    let dir = server_dir(&std::env::temp_dir(), "outbox-bench");
    let cluster = Cluster::start_in(
        &dir,
        &[
            "fsync = on",
            "track_commit_timestamp = on",
            "shared_buffers = '256MB'",
            "max_connections = 200",
            "outbox.retention = '10s'",
        ],
    );
    let mut db = cluster.connect();
    db.batch_execute(
        "CREATE EXTENSION outbox;
         CREATE TABLE orders (id bigserial PRIMARY KEY, status text NOT NULL, total numeric NOT NULL);
         -- What a team writes by hand: the same columns and indexes.
         CREATE TABLE my_outbox (LIKE outbox.events_0 INCLUDING DEFAULTS INCLUDING INDEXES);
         -- The polling relay's table.
         CREATE TABLE relay_outbox (id bigserial PRIMARY KEY, key text, payload jsonb NOT NULL,
                                    created_at timestamptz NOT NULL DEFAULT now(), done boolean NOT NULL DEFAULT false,
                                    part int GENERATED ALWAYS AS (abs(hashtext(key)) % 16) STORED);
         CREATE INDEX relay_outbox_todo ON relay_outbox (id) WHERE NOT done;
         CREATE INDEX relay_outbox_part_todo ON relay_outbox (part, id) WHERE NOT done;",
    )
    .unwrap();

    let mut results = serde_json::Map::new();
    let mut raw = String::from("section,label,value\n");

    if only.as_deref() == Some("capacity") {
        println!("capacity: {:.0} events/s", capacity(&cluster, &mut db, 10));
        return;
    }
    if only.as_deref() == Some("drain") {
        let http = counting_receiver();
        let inflight: i64 = std::env::var("BENCH_IN_FLIGHT").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
        let eps = drain_outbox(
            &cluster,
            &mut db,
            &http,
            "webhook",
            json!({"max_in_flight": inflight}),
            size.drain_events,
            1000,
            64,
        );
        println!("outbox, HTTP, one event per request, {inflight} in flight: {eps:.0} events/s");
        return;
    }

    // 1. Write path.
    println!("\n== write path: transactions/s (pgbench, single-statement transactions)");
    let scripts = write_scripts(&out);
    println!(
        "{:>8} {:>12} {:>12} {:>14} {:>8} {:>8}",
        "clients", "(a) insert", "(b) +emit", "(c) +hand-made", "b/a", "b/c"
    );
    for clients in [1, 4, 16] {
        // Three rounds of a, b, c in turn; the median of each damps the
        // noise of a shared 2-core machine.
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); scripts.len()];
        for _ in 0..3 {
            for (i, s) in scripts.iter().enumerate() {
                runs[i].push(pgbench(&cluster, s, clients, size.pgbench_secs));
            }
        }
        let tps: Vec<f64> = runs.iter_mut().map(|r| median(r)).collect();
        let (a, b, c) = (tps[0], tps[1], tps[2]);
        println!("{clients:>8} {a:>12.0} {b:>12.0} {c:>14.0} {:>8.3} {:>8.3}", b / a, b / c);
        record(&mut results, &format!("write_tps_bare_{clients}"), a);
        record(&mut results, &format!("write_tps_emit_{clients}"), b);
        record(&mut results, &format!("write_tps_handwritten_{clients}"), c);
        if clients == 16 {
            record(&mut results, "write_ratio_vs_bare", b / a);
            record(&mut results, "write_ratio_vs_handwritten", b / c);
        }
    }
    db.batch_execute("TRUNCATE orders, my_outbox").unwrap();

    // 2. Drain.
    println!("\n== drain: a backlog of {} events over 1,000 keys", size.drain_events);
    let http = counting_receiver();
    let eps_http =
        drain_outbox(&cluster, &mut db, &http, "webhook", json!({"max_in_flight": 64}), size.drain_events, 1000, 64);
    println!("outbox, HTTP, one event per request:   {eps_http:>10.0} events/s");
    let eps_relay = drain_relay(&cluster, &mut db, &http, size.drain_events, 1000, "drain");
    println!("polling relay, 16 workers, SKIP LOCKED (no per-key order): {eps_relay:>9.0} events/s");
    let eps_ordered = drain_relay(&cluster, &mut db, &http, size.drain_events, 1000, "drain-ordered");
    println!("polling relay, 16 workers, one per key partition (ordered):  {eps_ordered:>9.0} events/s");
    let kafka = kafka_v2_responder();
    let eps_kafka = drain_outbox(
        &cluster,
        &mut db,
        &kafka,
        "kafka_rest_v2",
        json!({"batch_size": 500, "max_in_flight": 8}),
        size.drain_events,
        1000,
        64,
    );
    println!("outbox, Kafka REST v2, batched:         {eps_kafka:>9.0} events/s");
    println!("ratio outbox HTTP / polling relay:      {:>9.2}", eps_http / eps_relay);
    record(&mut results, "drain_http_eps", eps_http);
    record(&mut results, "drain_polling_eps", eps_relay);
    record(&mut results, "drain_polling_ordered_eps", eps_ordered);
    record(&mut results, "drain_ratio_vs_polling_ordered", eps_http / eps_ordered);
    record(&mut results, "drain_kafka_eps", eps_kafka);
    record(&mut results, "drain_ratio_vs_polling", eps_http / eps_relay);

    // The maximum the machine sustains while writing and delivering at
    // once (both compete for its cores).
    let capacity = capacity(&cluster, &mut db, size.latency_secs.max(6));
    println!(
        "\n== capacity, writing and delivering at once ({WRITERS} writers, as fast as they go): {capacity:.0} events/s"
    );
    record(&mut results, "capacity_eps", capacity);

    // 3. Latency.
    println!("\n== latency, commit to receiver");
    let rate80 = capacity * 0.8;
    let mut cdf_series = Vec::new();
    println!("{:>34} {:>8} {:>8} {:>8} {:>8}", "", "p50 ms", "p95 ms", "p99 ms", "max ms");
    for (label, rate) in [("1k", 1000.0), ("80pct", rate80)] {
        let ours = latency_outbox(&cluster, &mut db, rate, size.latency_secs);
        let theirs = latency_relay(&cluster, &mut db, rate, size.latency_secs);
        for (who, lat) in [("outbox", &ours), ("polling relay", &theirs)] {
            let q = quantiles(lat);
            println!(
                "{:>34} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                format!("{who} at {rate:.0} events/s"),
                q[0],
                q[1],
                q[2],
                q[3]
            );
            let prefix = if who == "outbox" { format!("lat_{label}") } else { format!("polling_lat_{label}") };
            for (name, v) in ["p50", "p95", "p99", "max"].iter().zip(q) {
                record(&mut results, &format!("{prefix}_{name}_ms"), v);
            }
            if label == "1k" {
                cdf_series.push((format!("{who}, 1,000 events/s"), cdf(lat)));
            }
        }
    }
    std::fs::write(
        out.join("latency_cdf.svg"),
        svg_chart("Latency, commit to receiver, 1,000 events/s", "ms", "fraction", &cdf_series, true),
    )
    .unwrap();

    // 4. Sustained load.
    let sustained_rate = rate80;
    println!("\n== sustained: {sustained_rate:.0} events/s (80 % of the maximum) for {} s", size.sustained_secs);
    let samples = sustained(&cluster, &mut db, sustained_rate, size.sustained_secs);
    let growth =
        samples.last().map_or(0.0, |s| s.backlog) - samples.iter().find(|s| s.t >= 5.0).map_or(0.0, |s| s.backlog);
    let rss_max = samples.iter().map(|s| s.worker_mb).fold(0.0, f64::max);
    let table_max = samples.iter().map(|s| s.table_mb).fold(0.0, f64::max);
    println!("backlog growth (end minus start, after 5 s warm-up): {growth:.0} events");
    println!("worker private memory max: {rss_max:.1} MB; events tables max {table_max:.1} MB");
    record(&mut results, "sustained_rate_eps", sustained_rate);
    record(&mut results, "sustained_backlog_growth", growth);
    record(&mut results, "worker_rss_max_mb", rss_max);
    record(&mut results, "sustained_table_max_mb", table_max);
    for s in &samples {
        writeln!(
            raw,
            "sustained,t={:.0}s,{{\"delivered_eps\":{:.0},\"backlog\":{:.0},\"table_mb\":{:.2},\"worker_mb\":{:.1}}}",
            s.t, s.eps, s.backlog, s.table_mb, s.worker_mb
        )
        .unwrap();
    }
    let series = vec![
        ("delivered events/s".to_string(), samples.iter().map(|s| (s.t, s.eps)).collect()),
        ("backlog (events)".to_string(), samples.iter().map(|s| (s.t, s.backlog)).collect()),
    ];
    std::fs::write(
        out.join("sustained_throughput.svg"),
        svg_chart("Sustained load: throughput and backlog", "s", "events", &series, false),
    )
    .unwrap();
    let series = vec![
        ("events tables MB".to_string(), samples.iter().map(|s| (s.t, s.table_mb)).collect()),
        ("worker private MB".to_string(), samples.iter().map(|s| (s.t, s.worker_mb)).collect()),
    ];
    std::fs::write(
        out.join("sustained_size.svg"),
        svg_chart("Sustained load: table size and worker memory", "s", "MB", &series, false),
    )
    .unwrap();

    // 5. Scaling.
    println!("\n== scaling: drain of {} events", size.scaling_events);
    for keys in [1i64, 16, 1024, 100_000] {
        let n = if keys == 1 { size.scaling_events.min(5_000) } else { size.scaling_events };
        let eps = drain_outbox(&cluster, &mut db, &http, "webhook", json!({"max_in_flight": 64}), n, keys, 64);
        println!("{keys:>7} keys, 64 B payload: {eps:>10.0} events/s");
        record(&mut results, &format!("scaling_keys_{keys}_eps"), eps);
    }
    for bytes in [100, 1024, 16 * 1024] {
        let eps = drain_outbox(
            &cluster,
            &mut db,
            &http,
            "webhook",
            json!({"max_in_flight": 64}),
            size.scaling_events,
            1000,
            bytes,
        );
        println!("1000 keys, {bytes:>6} B payload: {eps:>10.0} events/s");
        record(&mut results, &format!("scaling_payload_{bytes}_eps"), eps);
    }

    for (k, v) in &results {
        writeln!(raw, "result,{k},{v}").unwrap();
    }
    results.insert("size".into(), json!(size.name));
    results.insert("cores".into(), json!(std::thread::available_parallelism().map_or(0, |n| n.get())));
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&Value::Object(results)).unwrap()).unwrap();
    std::fs::write(out.join("raw.csv"), raw).unwrap();
    println!(
        "\nwrote {}/results.json, raw.csv, latency_cdf.svg, sustained_throughput.svg, sustained_size.svg",
        out.display()
    );
    drop(db);
    drop(cluster);
}

fn record(results: &mut serde_json::Map<String, Value>, key: &str, value: f64) {
    results.insert(key.into(), json!(value));
}

/// Writers emit as fast as they can while the worker delivers; the rate
/// delivered over the second half of the run.
const WRITERS: i64 = 16;

fn capacity(cluster: &Cluster, db: &mut postgres::Client, secs: u64) -> f64 {
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

fn write_scripts(out: &Path) -> Vec<PathBuf> {
    let scripts = [
        ("a_bare.sql", "INSERT INTO orders (status, total) VALUES ('new', 10);"),
        (
            "b_emit.sql",
            "WITH o AS (INSERT INTO orders (status, total) VALUES ('new', 10) RETURNING id)\n\
             SELECT outbox_emit('orders', jsonb_build_object('id', o.id, 'status', 'new', 'total', 10), o.id::text, 'created') FROM o;",
        ),
        (
            "c_handwritten.sql",
            "WITH o AS (INSERT INTO orders (status, total) VALUES ('new', 10) RETURNING id)\n\
             INSERT INTO my_outbox (txid, n, id, topic, key, type, payload, headers)\n\
             SELECT pg_current_xact_id()::text::bigint, 1, gen_random_uuid(), 'orders', o.id::text, 'created',\n\
                    jsonb_build_object('id', o.id, 'status', 'new', 'total', 10), '{}' FROM o;",
        ),
    ];
    scripts
        .iter()
        .map(|(name, sql)| {
            let p = out.join(name);
            std::fs::write(&p, format!("{sql}\n")).unwrap();
            p
        })
        .collect()
}

fn pgbench(cluster: &Cluster, script: &Path, clients: usize, secs: u64) -> f64 {
    let out = Command::new(bindir().join("pgbench"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-n", "-M", "prepared"])
        .args(["-p", &cluster.port.to_string(), "-c", &clients.to_string(), "-j", &clients.min(4).to_string()])
        .args(["-T", &secs.to_string(), "-f"])
        .arg(script)
        .arg("postgres")
        .output()
        .expect("pgbench runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("pgbench: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// A receiver that only counts (and answers 200).
fn counting_receiver() -> Receiver {
    let rx = Receiver::start();
    rx.forget_requests();
    rx
}

/// A Kafka REST v2 endpoint that acknowledges every record (no broker
/// behind it): measures what outbox itself can push.
fn kafka_v2_responder() -> Receiver {
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

/// Load `n` events over `keys` keys into the outbox while the endpoint is
/// paused, resume it, and time the drain.
#[allow(clippy::too_many_arguments)]
fn drain_outbox(
    cluster: &Cluster,
    db: &mut postgres::Client,
    rx: &Receiver,
    kind: &str,
    options: Value,
    n: i64,
    keys: i64,
    payload_bytes: usize,
) -> f64 {
    let name = "drain";
    db.execute(
        "SELECT outbox.create_endpoint($1, $2, $3, '{drain}', $4::text::jsonb)",
        &[&name, &rx.url("/"), &kind, &options.to_string()],
    )
    .unwrap();
    db.execute("SELECT outbox.pause_endpoint('drain')", &[]).unwrap();
    let per_tx = 5_000.min(n);
    let pad = "x".repeat(payload_bytes.saturating_sub(40));
    let mut loaded = 0;
    while loaded < n {
        let m = per_tx.min(n - loaded);
        db.execute(
            "SELECT count(outbox_emit('drain', jsonb_build_object('i', i, 'pad', $3::text), 'key-' || (i % $2)))
             FROM generate_series($4::bigint, $4::bigint + $1 - 1) AS i",
            &[&m, &keys, &pad, &loaded],
        )
        .unwrap();
        loaded += m;
    }
    let started = Instant::now();
    db.execute("SELECT outbox.resume_endpoint('drain')", &[]).unwrap();
    let mut watch = cluster.connect();
    loop {
        let delivered: i64 =
            watch.query_one("SELECT delivered FROM outbox.stats WHERE endpoint = 'drain'", &[]).unwrap().get(0);
        if delivered >= n {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "drain did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let eps = n as f64 / started.elapsed().as_secs_f64();
    db.execute("SELECT outbox.drop_endpoint('drain')", &[]).unwrap();
    eps
}

/// The same backlog in relay_outbox, drained by the polling relay in its
/// own process.
fn drain_relay(cluster: &Cluster, db: &mut postgres::Client, rx: &Receiver, n: i64, keys: i64, mode: &str) -> f64 {
    db.batch_execute("TRUNCATE relay_outbox").unwrap();
    db.execute(
        "INSERT INTO relay_outbox (key, payload)
         SELECT 'key-' || (i % $2), jsonb_build_object('i', i, 'pad', repeat('x', 24)) FROM generate_series(1, $1::bigint) AS i",
        &[&n, &keys],
    )
    .unwrap();
    let started = Instant::now();
    let status = relay_command(cluster, rx, mode).status().expect("relay runs");
    assert!(status.success());
    n as f64 / started.elapsed().as_secs_f64()
}

fn relay_command(cluster: &Cluster, rx: &Receiver, mode: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["relay", mode, &cluster.port.to_string(), &rx.port.to_string()]);
    c
}

/// Emit at `rate` events/s for `secs` from several connections; `emit`
/// runs one transaction and returns the event's id (after commit).
fn paced<F>(cluster: &Cluster, rate: f64, secs: u64, emit: F) -> Arc<Mutex<HashMap<String, Instant>>>
where
    F: Fn(&mut postgres::Client, i64) -> String + Send + Sync + 'static,
{
    let committed = Arc::new(Mutex::new(HashMap::new()));
    let threads = ((rate / 1500.0).ceil() as usize).clamp(1, 16);
    let emit = Arc::new(emit);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (mut c, emit, committed) = (cluster.connect(), emit.clone(), committed.clone());
            let interval = Duration::from_secs_f64(threads as f64 / rate);
            std::thread::spawn(move || {
                let start = Instant::now() + Duration::from_secs_f64(t as f64 / rate);
                let mut i: i64 = 0;
                while Instant::now().saturating_duration_since(start) < Duration::from_secs(secs) {
                    let due = start + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let id = emit(&mut c, i * threads as i64 + t as i64);
                    committed.lock().unwrap().insert(id, Instant::now());
                    i += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    committed
}

/// A receiver noting when each id (from the JSON body's `id`, or the
/// relay's `i`) arrived.
fn timing_receiver(field: &'static str) -> (Receiver, Arc<Mutex<HashMap<String, Instant>>>) {
    let arrived = Arc::new(Mutex::new(HashMap::new()));
    let a = arrived.clone();
    let rx = Receiver::start();
    rx.forget_requests();
    rx.respond(move |r, _| {
        if let Ok(v) = serde_json::from_slice::<Value>(&r.body) {
            let id = match &v[field] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            a.lock().unwrap().entry(id).or_insert(r.at);
        }
        Reply::Status(200)
    });
    (rx, arrived)
}

fn latencies(committed: &Mutex<HashMap<String, Instant>>, arrived: &Mutex<HashMap<String, Instant>>) -> Vec<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (c, a) = (committed.lock().unwrap(), arrived.lock().unwrap());
        if c.keys().all(|k| a.contains_key(k)) || Instant::now() > deadline {
            return c
                .iter()
                .filter_map(|(k, t)| a.get(k).map(|at| at.saturating_duration_since(*t).as_secs_f64() * 1000.0))
                .collect();
        }
        drop((c, a));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn latency_outbox(cluster: &Cluster, db: &mut postgres::Client, rate: f64, secs: u64) -> Vec<f64> {
    let (rx, arrived) = timing_receiver("id");
    db.execute(
        "SELECT outbox.create_endpoint('latency', $1, topics => '{latency}', options => '{\"max_in_flight\": 64}')",
        &[&rx.url("/")],
    )
    .unwrap();
    let committed = paced(cluster, rate, secs, |c, i| {
        c.query_one(
            "SELECT outbox_emit('latency', jsonb_build_object('i', $1::bigint), 'key-' || ($1::bigint % 1000))::text",
            &[&i],
        )
        .unwrap()
        .get(0)
    });
    let lat = latencies(&committed, &arrived);
    db.execute("SELECT outbox.drop_endpoint('latency')", &[]).unwrap();
    lat
}

fn latency_relay(cluster: &Cluster, db: &mut postgres::Client, rate: f64, secs: u64) -> Vec<f64> {
    db.batch_execute("TRUNCATE relay_outbox").unwrap();
    let (rx, arrived) = timing_receiver("relay_id");
    let mut relay = relay_command(cluster, &rx, "follow").spawn().expect("relay runs");
    let committed = paced(cluster, rate, secs, |c, i| {
        let id: i64 = c
            .query_one(
                "INSERT INTO relay_outbox (key, payload) VALUES ('key-' || ($1::bigint % 1000), jsonb_build_object('i', $1::bigint)) RETURNING id",
                &[&i],
            )
            .unwrap()
            .get(0);
        id.to_string()
    });
    let lat = latencies(&committed, &arrived);
    let _ = relay.kill();
    let _ = relay.wait();
    lat
}

struct Sample {
    t: f64,
    eps: f64,
    backlog: f64,
    table_mb: f64,
    worker_mb: f64,
}

fn sustained(cluster: &Cluster, db: &mut postgres::Client, rate: f64, secs: u64) -> Vec<Sample> {
    let rx = counting_receiver();
    db.execute(
        "SELECT outbox.create_endpoint('sustained', $1, topics => '{sustained}', options => '{\"max_in_flight\": 64}')",
        &[&rx.url("/")],
    )
    .unwrap();
    let pid: i32 =
        db.query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox worker'", &[]).unwrap().get(0);
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let port = cluster.port;
    let sampler = std::thread::spawn(move || {
        let mut c = postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .connect(postgres::NoTls)
            .unwrap();
        let mut samples = Vec::new();
        let started = Instant::now();
        let mut last = (0.0, 0i64);
        while !s.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_secs(1));
            let row = c
                .query_one(
                    "SELECT delivered, pending, (pg_total_relation_size('outbox.events_0') + pg_total_relation_size('outbox.events_1'))::float8
                     FROM outbox.stats WHERE endpoint = 'sustained'",
                    &[],
                )
                .unwrap();
            let t = started.elapsed().as_secs_f64();
            let delivered: i64 = row.get(0);
            samples.push(Sample {
                t,
                eps: (delivered - last.1) as f64 / (t - last.0),
                backlog: row.get::<_, i64>(1) as f64,
                table_mb: row.get::<_, f64>(2) / 1e6,
                worker_mb: private_mb(pid),
            });
            last = (t, delivered);
        }
        samples
    });
    let counter = Arc::new(AtomicUsize::new(0));
    paced(cluster, rate, secs, move |c, i| {
        counter.fetch_add(1, Ordering::Relaxed);
        c.query_one(
            "SELECT outbox_emit('sustained', jsonb_build_object('i', $1::bigint), 'key-' || ($1::bigint % 1000))::text",
            &[&i],
        )
        .unwrap()
        .get(0)
    });
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().unwrap();
    db.execute("SELECT outbox.drop_endpoint('sustained')", &[]).unwrap();
    samples
}

fn private_mb(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn quantiles(samples: &[f64]) -> [f64; 4] {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return [f64::NAN; 4];
    }
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.95), at(0.99), s[s.len() - 1]]
}

fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len().max(1) as f64;
    let step = (s.len() / 400).max(1);
    s.iter().enumerate().step_by(step).map(|(i, v)| (*v, (i + 1) as f64 / n)).collect()
}

/// A plain SVG line chart (log-scaled x for latency CDFs).
fn svg_chart(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)], log_x: bool) -> String {
    let (w, h, m) = (760.0, 420.0, 60.0);
    let tx = |x: f64| if log_x { x.max(0.01).log10() } else { x };
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().map(|(x, y)| (tx(*x), *y))).collect();
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let (y0, y1) = (0.0, pts.iter().fold(0.0f64, |a, (_, y)| a.max(*y)).max(1e-9));
    let (x1, x0) = if x1 > x0 { (x1, x0) } else { (x0 + 1.0, x0) };
    let sx = |x: f64| m + (tx(x) - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/><text x='{}' y='24' text-anchor='middle' font-size='15'>{title}</text>\
         <line x1='{m}' y1='{}' x2='{}' y2='{}' stroke='black'/><line x1='{m}' y1='{m}' x2='{m}' y2='{}' stroke='black'/>\
         <text x='{}' y='{}' text-anchor='middle'>{x_label}{}</text><text x='16' y='{}' transform='rotate(-90 16 {})' text-anchor='middle'>{y_label}</text>",
        w / 2.0, h - m, w - m, h - m, h - m, w / 2.0, h - 18.0, if log_x { " (log)" } else { "" }, h / 2.0, h / 2.0
    );
    for i in 0..=4 {
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let label = if log_x { 10f64.powf(fx) } else { fx };
        let _ = write!(
            svg,
            "<text x='{}' y='{}' text-anchor='middle'>{label:.1}</text>",
            m + (w - 2.0 * m) * i as f64 / 4.0,
            h - m + 16.0
        );
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = write!(svg, "<text x='{}' y='{}' text-anchor='end'>{fy:.2}</text>", m - 6.0, sy(fy) + 4.0);
    }
    for (k, (name, points)) in series.iter().enumerate() {
        let color = colors[k % colors.len()];
        let path: Vec<String> = points.iter().map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
        let _ = write!(svg, "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>", path.join(" "));
        let _ = write!(svg, "<text x='{}' y='{}' fill='{color}'>{name}</text>", w - m - 220.0, m + 16.0 * k as f64);
    }
    svg.push_str("</svg>");
    svg
}

/// The baseline: the classic polling relay, as a team would write it, in
/// its own process. Workers claim rows with FOR UPDATE SKIP LOCKED, POST
/// them over a kept-alive connection, mark them done, commit.
mod relay {
    use super::*;

    const WORKERS: usize = 16;
    const BATCH: i64 = 100;
    const POLL: Duration = Duration::from_millis(10);

    pub fn main(args: &[String]) {
        let mode = args[0].clone();
        let (db_port, http_port): (u16, u16) = (args[1].parse().unwrap(), args[2].parse().unwrap());
        let handles: Vec<_> = (0..WORKERS)
            .map(|w| {
                let mode = mode.clone();
                std::thread::spawn(move || worker(&mode, w as i32, db_port, http_port))
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    /// `drain`: claim any rows (SKIP LOCKED), until none are left;
    /// `drain-ordered`: each worker owns the keys hashing to it, so one
    /// key's events go out one after another; `follow`: like `drain`, for
    /// ever, polling every 10 ms when idle.
    fn worker(mode: &str, me: i32, db_port: u16, http_port: u16) {
        let mut db = postgres::Config::new()
            .host("127.0.0.1")
            .port(db_port)
            .user("postgres")
            .dbname("postgres")
            .connect(postgres::NoTls)
            .unwrap();
        let mut http = Http::connect(http_port);
        loop {
            let mut tx = db.transaction().unwrap();
            let rows = if mode == "drain-ordered" {
                tx.query(
                    "SELECT id, key, payload::text FROM relay_outbox
                     WHERE NOT done AND part = $2 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    &[&BATCH, &me],
                )
                .unwrap()
            } else {
                tx.query(
                    "SELECT id, key, payload::text FROM relay_outbox WHERE NOT done ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    &[&BATCH],
                )
                .unwrap()
            };
            if rows.is_empty() {
                tx.commit().unwrap();
                if mode != "follow" {
                    let left: bool = db
                        .query_one(
                            "SELECT EXISTS (SELECT FROM relay_outbox WHERE NOT done AND ($1 = 'drain' OR part = $2))",
                            &[&mode, &me],
                        )
                        .unwrap()
                        .get(0);
                    if !left {
                        return;
                    }
                }
                std::thread::sleep(POLL);
                continue;
            }
            let mut ids = Vec::with_capacity(rows.len());
            for r in &rows {
                let id: i64 = r.get(0);
                let key: String = r.get(1);
                let payload: String = r.get(2);
                let body = format!(
                    "{{\"relay_id\":{id},\"key\":{},\"data\":{payload}}}",
                    serde_json::to_string(&key).unwrap()
                );
                http.post(&body);
                ids.push(id);
            }
            tx.execute("UPDATE relay_outbox SET done = true WHERE id = ANY ($1)", &[&ids]).unwrap();
            tx.commit().unwrap();
        }
    }

    /// A minimal keep-alive HTTP/1.1 client (as lean as a relay gets).
    struct Http {
        port: u16,
        stream: BufReader<TcpStream>,
    }

    impl Http {
        fn connect(port: u16) -> Http {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_nodelay(true).unwrap();
            Http { port, stream: BufReader::new(s) }
        }

        fn post(&mut self, body: &str) {
            let req = format!(
                "POST / HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if self.stream.get_mut().write_all(req.as_bytes()).is_err() || !self.read_response() {
                *self = Http::connect(self.port);
                self.post(body);
            }
        }

        fn read_response(&mut self) -> bool {
            read_message(&mut self.stream).is_some_and(|m| m.is_success())
        }
    }
}
