//! Guarantee 3, order per key: events of one key reach an endpoint in the
//! commit order of their transactions (not their insert order), from
//! concurrent writers, whatever the size of the batch the worker reads them
//! in, for prepared transactions too, across a restart of the server, and
//! while a failing key is parked and the others flow.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

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
    // Progress is written within moments of the deliveries, not with them.
    wait_sql(&mut db, WAIT, "SELECT delivered >= 1502 FROM outbox.stats");
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
    wait_sql(&mut db, WAIT, "SELECT delivered >= 12 FROM outbox.stats");
    let inexact: i64 = db.query_one("SELECT inexact_order_batches FROM outbox.stats", &[]).unwrap().get(0);
    assert!(inexact >= 1, "a batch ordered by commit timestamps is counted");
}

#[test]
fn same_key_transactions_arrive_in_commit_order_not_insert_order() {
    let (cluster, mut db) = cluster_with_outbox("commitorder");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    let mut t1 = cluster.connect();
    let mut t2 = cluster.connect();
    let rounds = 20;
    for round in 0..rounds {
        let key = format!("k{round}");
        // T1 inserts first, T2 second; T2 commits first, T1 right after.
        t1.execute("BEGIN", &[]).unwrap();
        t1.execute("SELECT outbox_emit('t', jsonb_build_object('n', 1), $1)", &[&key]).unwrap();
        t2.execute("BEGIN", &[]).unwrap();
        t2.execute("SELECT outbox_emit('t', jsonb_build_object('n', 2), $1)", &[&key]).unwrap();
        t2.execute("COMMIT", &[]).unwrap();
        t1.execute("COMMIT", &[]).unwrap();
    }
    let got = rx.wait_for(2 * rounds, WAIT);
    for round in 0..rounds {
        let key = format!("k{round}");
        let order: Vec<i64> = got.iter().filter(|r| r.json()["key"] == key.as_str()).map(data_n).collect();
        assert_eq!(order, [2, 1], "{key}: delivered in insert order, not commit order");
    }
}

#[test]
fn concurrent_writers_keep_commit_order_per_key() {
    let (cluster, mut db) = cluster_with_outbox("order");
    let rx = Receiver::start();
    // Jittered answers so requests of different keys overlap and finish
    // out of order.
    rx.respond(|r, _| {
        let jitter = r.body.len() as u64 % 7;
        Reply::After(Duration::from_millis(jitter), Box::new(Reply::Status(200)))
    });
    webhook(&mut db, "orders", &rx.url("/"), &["*"], json!({"max_in_flight": 8}));
    // 4 writers x 50 transactions over 10 shared keys; `n` in the payload
    // is each key's commit order.
    assert_eq!(concurrent_load(&cluster, "orders", 50), 200);

    let got = rx.wait_until(WAIT, "200 distinct events", |r| {
        r.iter().filter_map(|x| x.header("webhook-id")).collect::<HashSet<_>>().len() >= 200
    });
    let per_key: BTreeMap<String, Vec<serde_json::Value>> = by_key(&got);
    assert_eq!(per_key.len(), 10);
    for (key, events) in &per_key {
        let ns: Vec<i64> = events.iter().map(|d| d["n"].as_i64().unwrap()).collect();
        let expected: Vec<i64> = (1..=ns.len() as i64).collect();
        assert_eq!(ns, expected, "events of {key} arrived out of commit order");
    }
    wait_sql(&mut db, WAIT, "SELECT delivered = 200 AND pending = 0 FROM outbox.stats");
}

#[test]
fn a_failing_key_is_parked_so_the_rest_keep_flowing() {
    let (_cluster, mut db) = cluster_with_outbox("parking");
    set_and_reload(&mut db, "outbox.window_events", "20");
    let rx = Receiver::start();
    rx.respond(|r, _| if r.json()["key"] == "bad" { Reply::Status(500) } else { Reply::Status(200) });
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"backoff_base_ms": 50, "backoff_max_ms": 100}));
    std::thread::sleep(Duration::from_millis(300));
    // The bad key first, then far more events of other keys than the
    // window holds.
    emit(&mut db, "t", json!({"n": 0}), Some("bad"));
    db.batch_execute(
        "SELECT outbox_emit('t', jsonb_build_object('n', i), 'good-' || (i % 5)) FROM generate_series(1, 200) AS i;
         SELECT outbox_emit('t', '{\"n\": 1000}', 'bad');",
    )
    .unwrap();
    let got = rx.wait_until(WAIT, "200 good events", |r| {
        r.iter().filter(|x| x.json()["key"].as_str().unwrap().starts_with("good")).count() >= 200
    });
    for k in 0..5 {
        let ns: Vec<i64> = got.iter().filter(|r| r.json()["key"] == format!("good-{k}")).map(data_n).collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "good-{k} out of order: {ns:?}");
    }
    wait_sql(&mut db, WAIT, "SELECT count(*) = 2 FROM outbox.parked WHERE key = 'bad'");
    let parked: Vec<(i64, i32)> = db
        .query("SELECT (payload->>'n')::bigint, attempts FROM outbox.parked WHERE key = 'bad' ORDER BY seq", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(parked[0].0, 0);
    assert_eq!(parked[1], (1000, 0), "queued behind its key's first event");

    // The consumer recovers: the parked key drains, in order.
    rx.respond(|_, _| Reply::Status(200));
    let got = rx.wait_until(WAIT, "the bad key's events", |r| r.iter().any(|x| data_n(x) == 1000));
    let bad: Vec<i64> = got.iter().filter(|r| r.json()["key"] == "bad").map(data_n).collect();
    assert_eq!(*bad.last().unwrap(), 1000);
    assert!(bad[..bad.len() - 1].iter().all(|n| *n == 0));
    wait_sql(&mut db, WAIT, "SELECT pending = 0 AND NOT EXISTS (SELECT FROM outbox.parked) FROM outbox.stats");
}
