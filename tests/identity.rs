//! Guarantee 5, stable identity: an event arrives with the id `outbox_emit`
//! returned, as `webhook-id` and in the envelope, with the topic, key,
//! type, data and headers it was emitted with; an endpoint gets only its
//! topics.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
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
