//! Guarantee 3, order per key: events of one key reach an endpoint in the
//! commit order of their transactions, whatever the size of the batch the
//! worker reads them in, for prepared transactions too, and across a
//! restart of the server.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;

/// Two transactions emit for key `same`; the one that got its transaction
/// id first (a) commits last: the commit order is b, a.
fn reverse_commit(cluster: &Cluster, prepared: bool) {
    let mut a = cluster.connect();
    let mut b = cluster.connect();
    a.batch_execute("BEGIN; SELECT outbox_emit('t', '{\"tag\": \"a\"}', 'same');").unwrap();
    b.batch_execute("BEGIN; SELECT outbox_emit('t', '{\"tag\": \"b\"}', 'same');").unwrap();
    if prepared {
        // a is prepared first, b commits, then a is committed, from
        // another session.
        a.batch_execute("PREPARE TRANSACTION 'tx-a'").unwrap();
        b.batch_execute("COMMIT").unwrap();
        cluster.connect().batch_execute("COMMIT PREPARED 'tx-a'").unwrap();
    } else {
        b.batch_execute("COMMIT").unwrap();
        a.batch_execute("COMMIT").unwrap();
    }
}

/// The tags of key `same`, in the order the receiver got them (first
/// arrivals).
fn same_key_order(rx: &Receiver) -> Vec<String> {
    let mut seen = Vec::new();
    for r in rx.requests() {
        let v = r.json();
        if v["key"] == "same" {
            let tag = v["data"]["tag"].as_str().unwrap().to_string();
            if !seen.contains(&tag) {
                seen.push(tag);
            }
        }
    }
    seen
}

/// An endpoint that is paused while the events are written, so the worker
/// takes no tick until its poll timer (set long): all of them land in one
/// batch, of `filler` transactions and the two of `reverse_commit`.
fn one_big_batch(name: &str, filler: i64, prepared: bool, conf: &[&str]) -> (Cluster, Receiver, postgres::Client) {
    let mut settings = vec!["outbox.poll_interval = '20s'", "max_prepared_transactions = 10"];
    settings.extend_from_slice(conf);
    let cluster = Cluster::start(name, &settings);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox").unwrap();
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"max_in_flight": 64}));
    wait_sql(&mut db, WAIT, "SELECT tick IS NOT NULL FROM outbox.progress");
    db.batch_execute("SELECT outbox.pause_endpoint('hooks')").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    reverse_commit(&cluster, prepared);
    for i in 0..filler {
        emit(&mut db, "t", json!({"i": i}), Some(&format!("f{}", i % 100)));
    }
    (cluster, rx, db)
}

#[test]
fn commit_order_holds_in_a_batch_of_any_size() {
    let (_cluster, rx, mut db) = one_big_batch("bigbatch", 1_500, false, &[]);
    db.batch_execute("SELECT outbox.resume_endpoint('hooks')").unwrap();
    rx.wait_until(WAIT, "all events", |r| r.len() >= 1_502);
    assert_eq!(same_key_order(&rx), ["b", "a"], "commit order of key 'same'");
    let inexact: i64 = db.query_one("SELECT inexact_order_batches FROM outbox.stats", &[]).unwrap().get(0);
    assert_eq!(inexact, 0, "the worker knew every commit");
}

#[test]
fn commit_order_holds_for_prepared_transactions() {
    let (_cluster, rx, mut db) = one_big_batch("twophase", 10, true, &[]);
    db.batch_execute("SELECT outbox.resume_endpoint('hooks')").unwrap();
    rx.wait_until(WAIT, "all events", |r| r.len() >= 12);
    assert_eq!(same_key_order(&rx), ["b", "a"], "commit order of key 'same' (a was prepared)");
}

#[test]
fn across_a_server_restart_commit_timestamps_keep_the_order_and_inexact_batches_are_counted() {
    // Commits the worker did not see (the server stopped before it read
    // them) are ordered by commit timestamp when those are tracked.
    let (cluster, rx, db) = one_big_batch("restart-ts", 10, false, &["track_commit_timestamp = on"]);
    drop(db);
    cluster.stop("immediate");
    cluster.start_again();
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.resume_endpoint('hooks')").unwrap();
    rx.wait_until(WAIT, "all events", |r| r.len() >= 12);
    assert_eq!(same_key_order(&rx), ["b", "a"]);
    let inexact: i64 = db.query_one("SELECT inexact_order_batches FROM outbox.stats", &[]).unwrap().get(0);
    assert!(inexact >= 1, "a batch ordered by commit timestamps is counted");
}
