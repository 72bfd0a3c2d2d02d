//! Feature: `outbox.capture` turns a table's inserts, updates and deletes
//! into events, with the captured columns only.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::time::Duration;

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
