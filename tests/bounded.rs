//! Guarantee 6, bounded: the worker's memory and CPU stay bounded whatever
//! the backlog, the parked keys or the outage; with nothing to do, it does
//! nothing.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::time::Duration;

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
    // Keys "bad*" fail; others succeed.
    rx.respond(|r, _| {
        if r.json()["key"].as_str().is_some_and(|k| k.starts_with("bad")) {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    });
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
    for i in 0..40 {
        emit(&mut db, "t", json!({"i": i}), Some("good"));
        std::thread::sleep(Duration::from_millis(25));
    }
    wait_sql(&mut db, WAIT, "SELECT count(*) = 5 FROM outbox.parked");
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
