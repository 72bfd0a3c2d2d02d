//! Guarantee 4, no gaps: a transaction is never skipped because of when it
//! got its id or when it committed.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;

#[test]
fn a_transaction_older_than_the_extension_is_not_skipped() {
    // A transaction takes its id, then the extension is created (tick 0)
    // and an endpoint, then the transaction emits and commits: its event
    // committed after the endpoint was created and must arrive.
    let cluster = Cluster::start("tick0", &[]);
    let mut old = cluster.connect();
    old.batch_execute("BEGIN; SELECT pg_current_xact_id();").unwrap();
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox").unwrap();
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    std::thread::sleep(std::time::Duration::from_millis(500));
    old.batch_execute("SELECT outbox_emit('t', '{\"old\": true}', 'k'); COMMIT;").unwrap();
    let got = rx.wait_for(1, WAIT);
    assert_eq!(got[0].json()["data"]["old"], true);
}
