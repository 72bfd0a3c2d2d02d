//! Guarantee 6, bounded: the worker's memory and CPU stay bounded whatever
//! the backlog, the parked keys or the outage; with nothing to do, it does
//! nothing; delivered events leave by rotation, never one by one, and the
//! worker holds no snapshot while it waits on the network. OUTBOX_FULL=1
//! runs the README's sizes (`cargo test --test bounded -- --nocapture`
//! prints the figures).
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may contain spaces) start past ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// CPU the worker uses over `window`.
fn cpu_over(pid: i32, window: Duration) -> Duration {
    let before = cpu_time(pid);
    std::thread::sleep(window);
    cpu_time(pid) - before
}

#[test]
fn the_worker_sleeps_when_there_is_nothing_it_can_do() {
    let (_cluster, mut db) = cluster_with_outbox("idle");
    let rx = Receiver::start();
    rx.fail_keys_starting_with("bad");
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"backoff_base_ms": 20, "backoff_max_ms": 50}));
    let pid = worker_pid(&mut db);
    let window = Duration::from_secs(3);

    // Idle, with an endpoint and nothing to send.
    let idle = cpu_over(pid, window);

    // Failing keys parked (other keys keep succeeding meanwhile), then the
    // endpoint paused: parked lanes are due, but nothing may be sent.
    for i in 0..5 {
        emit(&mut db, "t", json!({"i": i}), Some(&format!("bad{i}")));
    }
    // A lane is parked only while the endpoint is not down, and with only
    // failing keys left it is: good events go on until the five are
    // parked (a fixed 40 of them ended first on a loaded machine, and the
    // last bad key stayed in the window).
    let started = Instant::now();
    let mut i = 0;
    let parked = |db: &mut postgres::Client| -> bool {
        db.query_one("SELECT count(*) = 5 FROM outbox.parked", &[]).unwrap().get(0)
    };
    while !parked(&mut db) {
        assert!(started.elapsed() < WAIT, "the five failing keys were not parked within {WAIT:?}");
        emit(&mut db, "t", json!({"i": i}), Some("good"));
        i += 1;
        std::thread::sleep(Duration::from_millis(25));
    }
    db.batch_execute("SELECT outbox.pause_endpoint('hooks')").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let paused = cpu_over(pid, window);

    // An outage that asks for a pause (503 + Retry-After: 1) while the
    // keys' own backoff is longer: nothing to do until then.
    db.batch_execute(
        "SELECT outbox.alter_endpoint('hooks', '{\"backoff_base_ms\": 10000, \"backoff_max_ms\": 10000}')",
    )
    .unwrap();
    db.batch_execute("SELECT outbox.resume_endpoint('hooks')").unwrap();
    rx.respond(|_, _| Reply::Full { status: 503, headers: vec![("retry-after".into(), "1".into())], body: vec![] });
    emit(&mut db, "t", json!({}), Some("other"));
    std::thread::sleep(Duration::from_millis(1500));
    let outage = cpu_over(pid, window);

    println!("worker CPU over {window:?}: idle {idle:?}, paused with due lanes {paused:?}, outage {outage:?}");
    // Waking once per poll interval (1 s) costs a few milliseconds.
    let most = Duration::from_millis(60);
    assert!(idle < most, "idle: {idle:?}");
    assert!(paused < most, "paused: {paused:?} (busy wake-ups)");
    assert!(outage < most, "outage: {outage:?} (busy wake-ups)");
}

#[test]
fn many_dead_keys_do_not_grow_the_worker() {
    // Dead letters blocking their keys (on_dead = block), as many as a long
    // outage of a rejecting endpoint leaves behind.
    let keys: i64 = if full() { 1_000_000 } else { 300_000 };
    let (_cluster, mut db) = cluster_with_outbox("deadkeys");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    let pid = worker_pid(&mut db);
    wait_sql(&mut db, WAIT, "SELECT tick IS NOT NULL FROM outbox.progress");
    let before = private_mb(pid);
    db.execute(
        "INSERT INTO outbox.parked (endpoint_id, event_id, batch, rank, txid, n, topic, key, payload, headers,
                                    created_at, state, attempts, last_status, last_error, failed_at)
         SELECT (SELECT id FROM outbox.endpoints), gen_random_uuid(), 0, 0, 0, i, 't', 'dead-' || i, '{}', '{}',
                now(), 'dead', 1, 400, 'HTTP 400', now()
         FROM generate_series(1, $1::bigint) AS i",
        &[&keys],
    )
    .unwrap();
    // The worker reads the parked table anew after a change.
    db.batch_execute("SELECT outbox.alter_endpoint('hooks', '{\"timeout_ms\": 5000}')").unwrap();
    // A blocked key stays blocked, another key flows.
    emit(&mut db, "t", json!({"blocked": true}), Some("dead-7"));
    emit(&mut db, "t", json!({"free": true}), Some("alive"));
    let got = rx.wait_for(1, WAIT);
    assert_eq!(got[0].json()["key"], "alive");
    wait_sql(&mut db, WAIT, "SELECT pending = 1 FROM outbox.stats");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rx.requests().len(), 1, "the blocked key was sent");
    let grew = private_mb(pid) - before;
    println!("{keys} dead keys: the worker grew by {grew:.1} MB");
    assert!(grew < 25.0, "the worker grew by {grew:.1} MB for {keys} dead keys");
}

#[test]
fn delivered_events_are_removed_by_rotation_and_the_worker_holds_no_snapshot() {
    let (cluster, mut db) = cluster_with_outbox("bounded");
    set_and_reload(&mut db, "outbox.retention", "1s");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"max_in_flight": 64}));
    let n: i64 = if full() { 1_000_000 } else { 20_000 };
    let mut loader = cluster.connect();
    emit_backlog(&mut loader, n, 100);
    let peak: i64 = db
        .query_one(
            "SELECT (pg_total_relation_size('outbox.events_0') + pg_total_relation_size('outbox.events_1'))",
            &[],
        )
        .unwrap()
        .get(0);
    let started = Instant::now();
    wait_sql(&mut db, Duration::from_secs(600), &format!("SELECT delivered = {n} FROM outbox.stats"));
    let drained = started.elapsed();
    // Two rotations: the table that held the events is emptied.
    wait_sql(
        &mut db,
        2 * WAIT,
        "SELECT pg_total_relation_size('outbox.events_0') + pg_total_relation_size('outbox.events_1') < 1024 * 1024",
    );
    let after: i64 = db
        .query_one(
            "SELECT pg_total_relation_size('outbox.events_0') + pg_total_relation_size('outbox.events_1')
                  + pg_total_relation_size('outbox.ticks') + pg_total_relation_size('outbox.parked')",
            &[],
        )
        .unwrap()
        .get(0);
    println!(
        "{n} events ({:.1} MB in the events tables) delivered in {drained:?}; outbox tables after rotation: {:.2} MB",
        peak as f64 / 1e6,
        after as f64 / 1e6
    );
    assert!(after < 2 * 1024 * 1024, "{after} bytes left");
    let updates_of_events: i64 = db
        .query_one("SELECT n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relname IN ('events_0') ", &[])
        .unwrap()
        .get(0);
    assert_eq!(updates_of_events, 0, "events are never updated or deleted one by one");

    // While a request hangs for seconds, the worker holds no transaction
    // (so no snapshot, no xmin) beyond its short steps.
    let slow = Receiver::start();
    slow.respond(|_, _| Reply::Hang);
    webhook(&mut db, "slow", &slow.url("/"), &["slow"], json!({"timeout_ms": 5000}));
    emit(&mut db, "slow", json!({}), None);
    slow.wait_for(1, WAIT);
    let mut idle_samples = 0;
    for _ in 0..40 {
        let row = db
            .query_one(
                "SELECT coalesce(now() - xact_start < interval '200 ms', true),
                        backend_xmin IS NULL AND xact_start IS NULL
                 FROM pg_stat_activity WHERE backend_type = 'outbox worker'",
                &[],
            )
            .unwrap();
        assert!(row.get::<_, bool>(0), "the worker keeps a transaction open while a request hangs");
        idle_samples += row.get::<_, bool>(1) as usize;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(idle_samples >= 30, "the worker was in a transaction in {} of 40 samples", 40 - idle_samples);
}

#[test]
fn a_large_backlog_drains_with_flat_worker_memory() {
    let (cluster, mut db) = cluster_with_outbox("backlog");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"max_in_flight": 64}));
    db.execute("SELECT outbox.pause_endpoint('hooks')", &[]).unwrap();
    let pid = worker_pid(&mut db);
    let idle = private_mb(pid);
    let n: i64 = if full() { 1_000_000 } else { 50_000 };
    let mut loader = cluster.connect();
    emit_backlog(&mut loader, n, 200);
    db.execute("SELECT outbox.resume_endpoint('hooks')", &[]).unwrap();
    let started = Instant::now();
    let mut max_private = 0.0f64;
    let mut db2 = cluster.connect();
    loop {
        max_private = max_private.max(private_mb(pid));
        let done: bool = db2.query_one(&format!("SELECT delivered = {n} FROM outbox.stats"), &[]).unwrap().get(0);
        if done {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(900), "backlog did not drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    let (_, shared) = rss_fields(pid);
    println!(
        "backlog of {n} events drained in {took:?} ({:.0} events/s); worker private memory idle {idle:.1} MB, \
         peak while draining {max_private:.1} MB (shared buffers touched: {shared:.1} MB)",
        n as f64 / took.as_secs_f64()
    );
    // The window bounds memory: the backlog size must not show here.
    assert!(max_private - idle < 64.0, "worker grew by {:.1} MB", max_private - idle);
}

/// Pausing an endpoint in the middle of a drain: once pause_endpoint has
/// committed, only the requests already on their way reach it (at most one
/// per slot), not the rest of the lanes the worker handed the network side
/// as chains, however long the worker takes to reload the endpoint. Then
/// it goes on when resumed.
#[test]
fn a_pause_during_a_drain_stops_requests_at_once() {
    const IN_FLIGHT: usize = 16;
    let (cluster, mut db) = cluster_with_outbox("pause_drain");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({ "max_in_flight": IN_FLIGHT }));
    db.execute("SELECT outbox.pause_endpoint('hooks')", &[]).unwrap();
    // 1,000 keys of 30 events: every lane loaded holds a chain.
    emit_backlog(&mut cluster.connect(), 30_000, 10);
    db.execute("SELECT outbox.resume_endpoint('hooks')", &[]).unwrap();
    rx.wait_for(2_000, WAIT);
    db.execute("SELECT outbox.pause_endpoint('hooks')", &[]).unwrap();
    let at_pause = rx.count();
    std::thread::sleep(Duration::from_secs(1));
    let after = rx.count() - at_pause;
    assert!(
        after <= IN_FLIGHT,
        "{after} requests reached the endpoint after its pause committed ({IN_FLIGHT} may be in flight)"
    );
    assert!(at_pause + after < 30_000, "the pause came too late to show anything");
    db.execute("SELECT outbox.resume_endpoint('hooks')", &[]).unwrap();
    rx.wait_for(at_pause + after + 1_000, WAIT);
}
