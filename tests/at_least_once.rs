//! Guarantee 2, at least once: every committed event reaches every endpoint
//! whose topics match, or its dead letters; no operation an application or
//! a migration tool performs loses one.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Emit on topic `noise` every few milliseconds until stopped: the traffic
/// that makes the worker take ticks (and drop old ones) meanwhile.
fn background_traffic(cluster: &Cluster) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut db = cluster.connect();
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut i = 0;
        while !s.load(Ordering::SeqCst) {
            i += 1;
            emit(&mut db, "noise", json!({"i": i}), Some("n"));
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    (stop, handle)
}

#[test]
fn an_endpoint_created_in_a_long_transaction_receives_what_commits_after() {
    // A migration tool: the endpoint is created in a transaction that stays
    // open for seconds while other traffic flows and the worker ticks,
    // drops old ticks and rotates tables (retention 1 s).
    let cluster = Cluster::start("migration", &["outbox.retention = 1"]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox").unwrap();
    let busy = Receiver::start();
    webhook(&mut db, "busy", &busy.url("/"), &["noise"], json!({}));
    let (stop, traffic) = background_traffic(&cluster);
    busy.wait_for(20, WAIT);

    let late = Receiver::start();
    let mut migration = cluster.connect();
    migration.batch_execute("BEGIN").unwrap();
    migration.execute("SELECT outbox.create_endpoint('late', $1, topics => '{late}')", &[&late.url("/")]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    migration.batch_execute("COMMIT").unwrap();

    for i in 0..5 {
        emit(&mut db, "late", json!({"i": i}), Some("k"));
    }
    late.wait_for(5, WAIT);
    // And the tables keep rotating (the endpoint holds nothing back).
    let since: String = db.query_one("SELECT since::text FROM outbox.rotation WHERE current", &[]).unwrap().get(0);
    wait_sql(&mut db, WAIT, &format!("SELECT since::text <> '{since}' FROM outbox.rotation WHERE current"));
    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    wait_sql(&mut db, WAIT, "SELECT bool_and(pending = 0) FROM outbox.stats");
}

#[test]
fn a_reinstall_in_one_transaction_loses_nothing_emitted_after_it() {
    let (cluster, mut db) = cluster_with_outbox("reinstall");
    let first = Receiver::start();
    webhook(&mut db, "first", &first.url("/"), &["*"], json!({}));
    for i in 0..20 {
        emit(&mut db, "t", json!({"i": i}), Some("k"));
    }
    first.wait_for(20, WAIT);

    let rx = Receiver::start();
    db.batch_execute(&format!(
        "BEGIN;
         DROP EXTENSION outbox CASCADE;
         CREATE EXTENSION outbox;
         SELECT outbox.create_endpoint('again', '{}', options => '{{\"backoff_base_ms\": 20}}');
         COMMIT;",
        rx.url("/")
    ))
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(emit(&mut db, "t", json!({"after": i}), Some("k")));
    }
    let got = rx.wait_for(5, WAIT);
    let seen: Vec<String> = got.iter().filter_map(|r| r.header("webhook-id").map(str::to_string)).collect();
    assert!(ids.iter().all(|id| seen.contains(id)), "sent {ids:?}, received {seen:?}");
    drop(cluster);
}

#[test]
fn an_event_gone_from_the_table_before_parking_fails_loudly() {
    // Parking copies the event from the events table; should the row ever
    // be missing (a bug, or someone deleting from the table), that must be
    // an error someone sees, never an event silently dropped.
    let (cluster, mut db) = cluster_with_outbox("parkcopy");
    let rx = Receiver::start();
    rx.respond(|r, _| if r.json()["key"] == "doomed" { Reply::Status(500) } else { Reply::Status(200) });
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"backoff_base_ms": 1500, "backoff_max_ms": 1500}));
    let id = emit(&mut db, "t", json!({}), Some("doomed"));
    rx.wait_for(1, WAIT);
    db.execute("DELETE FROM outbox.events_0 WHERE id = $1::text::uuid", &[&id]).unwrap();
    db.execute("DELETE FROM outbox.events_1 WHERE id = $1::text::uuid", &[&id]).unwrap();
    // Other keys keep succeeding (the endpoint is not down), so after three
    // failed attempts the key is parked: the copy finds nothing.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        emit(&mut db, "t", json!({}), Some("fine"));
        let found: bool = db
            .query_one("SELECT coalesce(last_error LIKE $1, false) FROM outbox.stats", &[&format!("%{id}%missing%")])
            .unwrap()
            .get(0);
        if found {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no error says the event is missing");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cluster.log().contains("missing from outbox.events"), "the server log says so");
}

#[test]
fn failing_endpoint_is_retried_until_it_acknowledges() {
    let (_cluster, mut db) = cluster_with_outbox("retry");
    let rx = Receiver::start();
    rx.respond(|_, seen| if seen < 3 { Reply::Status(500) } else { Reply::Status(200) });
    webhook(&mut db, "flaky", &rx.url("/"), &["*"], json!({}));

    let id = emit(&mut db, "t", json!({"x": 1}), Some("k"));
    let got = rx.wait_for(4, WAIT);
    assert!(got.iter().all(|r| r.header("webhook-id") == Some(id.as_str())), "the id is stable across retries");
    wait_sql(&mut db, WAIT, "SELECT delivered = 1 AND failed_attempts = 3 AND pending = 0 FROM outbox.stats");
    let last_error: String = db.query_one("SELECT last_error FROM outbox.stats", &[]).unwrap().get(0);
    assert!(last_error.contains("500"), "{last_error}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.requests().len(), 4, "nothing is sent again once acknowledged");
}

#[test]
fn events_pending_across_a_restart_are_delivered_after_it() {
    let (cluster, mut db) = cluster_with_outbox("restart");
    let rx = Receiver::start();
    rx.respond(|_, _| Reply::Status(503));
    webhook(&mut db, "down", &rx.url("/"), &["*"], json!({}));
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(emit(&mut db, "t", json!({"i": i}), Some(&format!("k{}", i % 3))));
    }
    rx.wait_for(3, WAIT); // the worker is trying
    drop(db);
    cluster.stop("fast");
    rx.respond(|_, _| Reply::Status(200));
    cluster.start_again();

    let got = rx.wait_until(WAIT, "all 20 events", |r| {
        let ok: HashSet<&str> = r.iter().filter_map(|x| x.header("webhook-id")).collect();
        ids.iter().all(|id| ok.contains(id.as_str()))
    });
    // Per key, the first deliveries still follow emit order.
    let mut first_seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for r in &got {
        let v = r.json();
        if seen.insert(v["id"].as_str().unwrap().to_string()) {
            first_seen.entry(v["key"].as_str().unwrap().into()).or_default().push(v["data"]["i"].as_i64().unwrap());
        }
    }
    for (k, is) in first_seen {
        assert!(is.windows(2).all(|w| w[0] < w[1]), "{k}: {is:?}");
    }
    let mut db = cluster.connect();
    wait_sql(&mut db, WAIT, "SELECT pending = 0 FROM outbox.stats");
}

#[test]
fn a_clean_stop_writes_what_came_back_so_little_goes_out_twice() {
    // Progress is written within 10 ms of a change, not at every outcome;
    // on SIGTERM the worker writes what came back before it exits. One
    // key, so its events go one request after another: stopped in the
    // middle of the drain, at most the request on its way (and the one a
    // chain was about to send) goes out again after the restart. Were the
    // last outcomes not written, every event acknowledged in those last
    // milliseconds would (some ten a millisecond here).
    let (cluster, mut db) = cluster_with_outbox("clean_stop");
    let rx = Receiver::start();
    webhook(&mut db, "one_key", &rx.url("/"), &["t"], json!({}));
    db.execute("SELECT outbox.pause_endpoint('one_key')", &[]).unwrap();
    emit_key_backlog(&mut db, "t", "k", 5000);
    db.execute("SELECT outbox.resume_endpoint('one_key')", &[]).unwrap();
    rx.wait_for(1500, WAIT);
    drop(db);
    cluster.stop("fast");
    let before = rx.requests().len();
    assert!(before < 5000, "stopped in the middle of the drain ({before} sent)");
    cluster.start_again();
    let got = rx.wait_until(WAIT, "all 5,000 events", |r| {
        r.iter().filter_map(|x| x.header("webhook-id")).collect::<HashSet<_>>().len() == 5000
    });
    let again = got.len() - 5000;
    assert!(again <= 2, "{again} events went out twice ({before} before the stop)");
    let mut firsts: Vec<i64> = Vec::new();
    for n in got.iter().map(data_n) {
        if firsts.last().is_none_or(|l| n > *l) {
            firsts.push(n);
        }
    }
    assert_eq!(firsts.len(), 5000, "the key's events came in order, the resent ones aside");
}
