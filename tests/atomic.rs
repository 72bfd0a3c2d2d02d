//! Guarantee 1, atomic: an event exists, and is delivered, only if the
//! transaction that emitted it committed, durably.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn with_synchronous_commit_off_only_durable_events_are_delivered() {
    // Commits are acknowledged before their WAL is flushed; the WAL writer
    // would flush them within 10 s. The server then crashes.
    let cluster = Cluster::start(
        "asynccommit",
        &["synchronous_commit = off", "wal_writer_delay = '10s'", "wal_writer_flush_after = 0"],
    );
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox; CREATE TABLE ledger (id uuid PRIMARY KEY)").unwrap();
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    wait_sql(&mut db, WAIT, "SELECT tick IS NOT NULL FROM outbox.progress");
    let mut ids = Vec::new();
    for i in 0..20 {
        let id: String = db
            .query_one(
                "WITH e AS (SELECT outbox_emit('t', jsonb_build_object('i', $1::int), 'k') AS id)
                 INSERT INTO ledger SELECT id FROM e RETURNING id::text",
                &[&i],
            )
            .unwrap()
            .get(0);
        ids.push(id);
    }
    let got = rx.wait_for(20, WAIT);
    drop(db);
    cluster.stop("immediate");
    cluster.start_again();
    let mut db = cluster.connect();
    let committed: std::collections::HashSet<String> =
        db.query("SELECT id::text FROM ledger", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let delivered: Vec<&str> = got.iter().filter_map(|r| r.header("webhook-id")).collect();
    let phantoms: Vec<&&str> = delivered.iter().filter(|id| !committed.contains(**id)).collect();
    assert!(phantoms.is_empty(), "{} delivered events did not survive the crash: {phantoms:?}", phantoms.len());
}

#[test]
fn rolled_back_work_delivers_nothing() {
    let (_cluster, mut db) = cluster_with_outbox("rollback");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));

    // A rolled-back transaction.
    db.batch_execute("BEGIN; SELECT outbox_emit('t', '{\"n\": \"rolled back\"}'); ROLLBACK;").unwrap();
    // An aborted one: an error after the emit.
    let _ = db.batch_execute("BEGIN; SELECT outbox_emit('t', '{\"n\": \"aborted\"}'); SELECT 1/0; COMMIT;");
    db.batch_execute("ROLLBACK").unwrap();
    // A rolled-back savepoint inside a committed transaction.
    db.batch_execute(
        "BEGIN;
         SELECT outbox_emit('t', '{\"n\": \"kept 1\"}', 'k');
         SAVEPOINT s;
         SELECT outbox_emit('t', '{\"n\": \"savepoint rolled back\"}', 'k');
         ROLLBACK TO SAVEPOINT s;
         SELECT outbox_emit('t', '{\"n\": \"kept 2\"}', 'k');
         COMMIT;",
    )
    .unwrap();
    // A later marker: once it arrived, everything before it had its chance.
    emit(&mut db, "t", json!({"n": "marker"}), Some("k"));

    rx.wait_until(WAIT, "the marker", |r| r.iter().any(|x| x.json()["data"]["n"] == "marker"));
    std::thread::sleep(Duration::from_millis(300));
    let sent: Vec<String> = rx.requests().iter().map(|r| r.json()["data"]["n"].as_str().unwrap().to_string()).collect();
    assert_eq!(sent, ["kept 1", "kept 2", "marker"]);
}
