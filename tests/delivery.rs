//! End to end: a real cluster with the worker preloaded delivers committed
//! events to a real HTTP receiver on loopback.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

#[test]
fn committed_event_arrives_with_envelope_and_id_header() {
    let (_cluster, mut db) = cluster_with_outbox("commit");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/hooks"), &["orders.*"], json!({"headers": {"authorization": "Bearer t0k"}}));

    let id: String = db
        .query_one(
            "SELECT outbox_emit('orders.created', '{\"total\": 42}', 'order-1', 'created', '{\"trace\": \"abc\"}')::text",
            &[],
        )
        .unwrap()
        .get(0);

    let got = rx.wait_for(1, WAIT);
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hooks");
    assert_eq!(r.header("webhook-id"), Some(id.as_str()));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("authorization"), Some("Bearer t0k"));
    let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
    assert!(ts > 1_700_000_000);
    let body = r.json();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["topic"], "orders.created");
    assert_eq!(body["key"], "order-1");
    assert_eq!(body["type"], "created");
    assert_eq!(body["data"], json!({"total": 42}));
    assert_eq!(body["headers"], json!({"trace": "abc"}));
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));

    // An event outside the endpoint's topics is not sent to it.
    emit(&mut db, "invoices.created", json!({}), None);
    emit(&mut db, "orders.paid", json!({}), None);
    let got = rx.wait_for(2, WAIT);
    assert_eq!(got[1].json()["topic"], "orders.paid");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.requests().len(), 2, "invoices.created must not reach an orders.* endpoint");

    wait_sql(&mut db, WAIT, "SELECT delivered = 2 AND pending = 0 FROM outbox.stats WHERE endpoint = 'hooks'");
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
fn captured_table_changes_arrive_as_events() {
    let (_cluster, mut db) = cluster_with_outbox("capture");
    let rx = Receiver::start();
    webhook(&mut db, "orders", &rx.url("/"), &["orders"], json!({}));
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text, secret text);
         SELECT outbox.capture('orders', columns => '{id,status}');
         INSERT INTO orders VALUES (1, 'new', 's1');
         UPDATE orders SET status = 'paid' WHERE id = 1;
         UPDATE orders SET secret = 's2' WHERE id = 1; -- no captured column changed
         DELETE FROM orders WHERE id = 1;",
    )
    .unwrap();
    let got = rx.wait_for(3, WAIT);
    let bodies: Vec<serde_json::Value> = got.iter().map(Request::json).collect();
    let ops: Vec<&str> = bodies.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(ops, ["insert", "update", "delete"]);
    assert!(bodies.iter().all(|b| b["key"] == "1" && b["topic"] == "orders"));
    assert_eq!(bodies[0]["data"]["after"], json!({"id": 1, "status": "new"}));
    assert_eq!(bodies[1]["data"]["before"], json!({"id": 1, "status": "new"}));
    assert_eq!(bodies[1]["data"]["after"], json!({"id": 1, "status": "paid"}));
    assert_eq!(bodies[2]["data"]["after"], serde_json::Value::Null);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.requests().len(), 3);
}

#[test]
fn rejected_events_go_to_dead_letters_and_others_flow() {
    let (_cluster, mut db) = cluster_with_outbox("reject");
    let rx = Receiver::start();
    rx.respond(|r, _| {
        if r.json()["data"]["bad"] == true {
            Reply::Full { status: 422, headers: vec![], body: b"{\"error\": \"no such customer\"}".to_vec() }
        } else {
            Reply::Status(204)
        }
    });
    webhook(&mut db, "strict", &rx.url("/"), &["*"], json!({}));
    let bad = emit(&mut db, "t", json!({"bad": true}), Some("a"));
    emit(&mut db, "t", json!({"bad": false}), Some("b"));
    wait_sql(&mut db, WAIT, "SELECT dead = 1 AND delivered = 1 FROM outbox.stats");
    let row = db
        .query_one(
            "SELECT event_id::text, endpoint, last_status, last_error, payload::text FROM outbox.dead_letters",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), bad);
    assert_eq!(row.get::<_, String>(1), "strict");
    assert_eq!(row.get::<_, i32>(2), 422);
    assert!(row.get::<_, String>(3).contains("no such customer"));
    assert_eq!(row.get::<_, String>(4), "{\"bad\": true}");
}
