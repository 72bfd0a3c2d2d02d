//! Feature: speed. Commit to receiver within milliseconds at idle; many
//! keys in flight at once over reused connections. The README's figures:
//! `OUTBOX_FULL=1 cargo test --test performance -- --nocapture`.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn an_idle_worker_delivers_within_milliseconds_of_commit() {
    let (_cluster, mut db) = cluster_with_outbox("latency");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    emit(&mut db, "t", json!({"n": 0}), None); // warm up the connection
    rx.wait_for(1, WAIT);
    let mut samples = Vec::new();
    for n in 1..=30 {
        std::thread::sleep(Duration::from_millis(30));
        emit(&mut db, "t", json!({"n": n}), None);
        let committed = Instant::now();
        let got = rx.wait_until(WAIT, "the event", |r| r.iter().any(|x| data_n(x) == n));
        let at = got.iter().find(|x| data_n(x) == n).unwrap().at;
        samples.push(at.saturating_duration_since(committed).as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let p50 = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    println!("commit-to-receiver latency at idle: p50 {p50:.2} ms, max {max:.2} ms");
    // Woken by the commit, not by the 1 s poll timer.
    assert!(p50 < 50.0, "p50 {p50:.2} ms");
}

#[test]
fn many_keys_are_in_flight_at_once_over_reused_connections() {
    let (_cluster, mut db) = cluster_with_outbox("fanout");
    let rx = Receiver::start();
    rx.respond(|_, _| Reply::After(Duration::from_millis(100), Box::new(Reply::Status(200))));
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"max_in_flight": 16}));
    db.batch_execute(
        "SELECT outbox_emit('t', jsonb_build_object('n', i), 'key-' || (i % 32)) FROM generate_series(1, 96) AS i",
    )
    .unwrap();
    let started = Instant::now();
    rx.wait_for(96, WAIT);
    let took = started.elapsed();
    println!(
        "96 events, 32 keys, 100 ms per request: {took:?}, {} at once at most, {} connections",
        rx.max_concurrent(),
        rx.connections()
    );
    assert!(rx.max_concurrent() >= 12, "at most {} requests at once", rx.max_concurrent());
    assert!(rx.max_concurrent() <= 16, "max_in_flight exceeded: {}", rx.max_concurrent());
    assert!(rx.connections() <= 20, "connections are not reused: {}", rx.connections());
    // One at a time would take 9.6 s.
    assert!(took < Duration::from_secs(4), "{took:?}");
}
