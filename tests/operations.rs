//! Feature: operating the worker. Endpoint changes and settings apply
//! without a restart; one worker per configured database, visible with its
//! figures in outbox.stats; a terminated worker is started again.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn endpoint_changes_and_settings_apply_without_restart() {
    let (_cluster, mut db) = cluster_with_outbox("reconfig");
    let a = Receiver::start();
    let b = Receiver::start();
    webhook(&mut db, "hooks", &a.url("/"), &["*"], json!({}));
    emit(&mut db, "t", json!({"n": 1}), None);
    a.wait_for(1, WAIT);

    db.execute("SELECT outbox.pause_endpoint('hooks')", &[]).unwrap();
    emit(&mut db, "t", json!({"n": 2}), None);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.requests().len(), 1, "paused");
    wait_sql(&mut db, WAIT, "SELECT state = 'paused' AND pending = 1 FROM outbox.stats");

    db.execute("SELECT outbox.alter_endpoint('hooks', url => $1)", &[&b.url("/moved")]).unwrap();
    db.execute("SELECT outbox.resume_endpoint('hooks')", &[]).unwrap();
    let got = b.wait_for(1, WAIT);
    assert_eq!(got[0].path, "/moved");
    assert_eq!(data_n(&got[0]), 2);

    // A setting read by the worker, changed with a reload (SIGHUP).
    set_and_reload(&mut db, "outbox.retention", "1s");
    let before: i16 = db.query_one("SELECT slot FROM outbox.rotation WHERE current", &[]).unwrap().get(0);
    emit(&mut db, "t", json!({"n": 3}), None);
    b.wait_for(2, WAIT);
    wait_sql(&mut db, WAIT, &format!("SELECT slot <> {before} FROM outbox.rotation WHERE current"));
}

#[test]
fn one_worker_per_configured_database_and_stats_show_it() {
    let cluster = Cluster::start("multidb", &["outbox.databases = 'postgres, shop'"]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE DATABASE shop").unwrap();
    db.batch_execute("CREATE EXTENSION outbox").unwrap();
    let mut shop = cluster.connect_db("shop");
    // Each database has its own roles (the defaults belong to postgres now).
    shop.batch_execute(
        "SET outbox.writer_role = 'shop_writer'; SET outbox.admin_role = 'shop_admin'; CREATE EXTENSION outbox",
    )
    .unwrap();
    let rx = Receiver::start();
    webhook(&mut db, "main", &rx.url("/main"), &["*"], json!({}));
    webhook(&mut shop, "shop", &rx.url("/shop"), &["*"], json!({}));
    emit(&mut db, "t", json!({"n": 1}), None);
    emit(&mut shop, "t", json!({"n": 2}), None);
    let got = rx.wait_for(2, WAIT);
    let paths: HashSet<&str> = got.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, HashSet::from(["/main", "/shop"]));
    let workers: Vec<String> = db
        .query("SELECT datname FROM pg_stat_activity WHERE backend_type = 'outbox worker' ORDER BY datname", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(workers, ["postgres", "shop"]);
    wait_sql(
        &mut shop,
        WAIT,
        "SELECT delivered = 1 AND pending = 0 AND in_flight = 0 AND retrying = 0 AND dead = 0
                AND latency_p50_ms > 0 AND latency_p99_ms >= latency_p50_ms AND last_success_at IS NOT NULL
         FROM outbox.stats",
    );
}

#[test]
fn a_terminated_worker_is_started_again() {
    let (_cluster, mut db) = cluster_with_outbox("terminate");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    let pid = worker_pid(&mut db);
    let terminated: bool = db.query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap().get(0);
    assert!(terminated);
    emit(&mut db, "t", json!({"n": 1}), None);
    rx.wait_for(1, WAIT);
    // The old process may still be listed while it leaves (or have sent
    // that event on its way out): wait for the new one, which must then
    // deliver on its own.
    let deadline = std::time::Instant::now() + WAIT;
    let again = loop {
        let now = worker_pid(&mut db);
        if now != pid || std::time::Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_ne!(again, pid, "a new worker process runs");
    emit(&mut db, "t", json!({"n": 2}), None);
    rx.wait_for(2, WAIT);
    assert_eq!(worker_pid(&mut db), again, "the new worker process delivers");
}

#[test]
fn progress_is_written_while_a_request_is_still_in_flight() {
    // Progress is written within moments of a change, not only when the
    // endpoint falls idle: the second request hangs for seconds, and the
    // first one's delivery shows meanwhile.
    let (_cluster, mut db) = cluster_with_outbox("progress");
    let rx = Receiver::start();
    rx.respond(|_, i| {
        if i == 0 {
            Reply::Status(200)
        } else {
            Reply::After(Duration::from_secs(5), Box::new(Reply::Status(200)))
        }
    });
    webhook(&mut db, "slow", &rx.url("/"), &["*"], json!({"max_in_flight": 1}));
    emit(&mut db, "t", json!({"n": 1}), Some("k"));
    emit(&mut db, "t", json!({"n": 2}), Some("k"));
    rx.wait_for(2, WAIT);
    wait_sql(&mut db, Duration::from_secs(2), "SELECT delivered = 1 AND in_flight = 1 FROM outbox.progress");
    wait_sql(&mut db, WAIT, "SELECT delivered = 2 AND in_flight = 0 FROM outbox.progress");
}

#[test]
fn new_topics_mid_drain_resend_at_most_what_was_in_flight() {
    // New topics build the endpoint's state anew from outbox.progress: what
    // was delivered before must be written first, or it goes out again.
    let (_cluster, mut db) = cluster_with_outbox("retopic");
    let rx = Receiver::start();
    // One request at a time on one key: the cursor is just before the one
    // in flight, so that one is all a new state may send again.
    webhook(&mut db, "hooks", &rx.url("/"), &["a"], json!({"max_in_flight": 1}));
    db.execute("SELECT outbox.pause_endpoint('hooks')", &[]).unwrap();
    emit_key_backlog(&mut db, "a", "k", 3000);
    db.execute("SELECT outbox.resume_endpoint('hooks')", &[]).unwrap();
    rx.wait_for(500, WAIT);
    db.execute("SELECT outbox.alter_endpoint('hooks', topics => '{a,b}')", &[]).unwrap();
    wait_sql(&mut db, WAIT, "SELECT delivered >= 3000 AND in_flight = 0 FROM outbox.progress");
    let got = rx.requests();
    let ids: HashSet<String> = got.iter().map(|r| r.json()["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 3000, "every event arrived");
    let resent = got.len() - 3000;
    let ns: Vec<i64> = got.iter().map(data_n).collect();
    let mut seen = HashSet::new();
    for (i, n) in ns.iter().enumerate() {
        if !seen.insert(*n) {
            eprintln!("DUP n={n} at request {i}; around: {:?}", &ns[i.saturating_sub(4)..(i + 3).min(ns.len())]);
        }
    }
    assert!(resent <= 1, "{resent} events were sent twice; at most the one in flight may be");
}

#[test]
fn new_topics_wait_for_the_request_still_in_flight() {
    // A state built anew (new topics here; also a failed step, a change of
    // kind) sends again from the persisted cursor. While the old state's
    // request for a key is still out, a second one of that key must not
    // go: the receiver would hold two at once, in no order.
    let (_cluster, mut db) = cluster_with_outbox("retopic_in_flight");
    let rx = Receiver::start();
    rx.respond(|_, i| {
        if i == 0 {
            Reply::After(Duration::from_secs(3), Box::new(Reply::Status(200)))
        } else {
            Reply::Status(200)
        }
    });
    webhook(&mut db, "hooks", &rx.url("/"), &["a"], json!({"max_in_flight": 4}));
    emit(&mut db, "a", json!({"n": 1}), Some("k"));
    emit(&mut db, "a", json!({"n": 2}), Some("k"));
    rx.wait_for(1, WAIT);
    db.execute("SELECT outbox.alter_endpoint('hooks', topics => '{a,b}')", &[]).unwrap();
    wait_sql(&mut db, WAIT, "SELECT delivered >= 2 AND in_flight = 0 FROM outbox.progress");
    let ns: Vec<i64> = rx.requests().iter().map(data_n).collect();
    assert_eq!(rx.max_concurrent(), 1, "requests of one key at once; arrived: {ns:?}");
    assert_eq!(ns.last(), Some(&2), "the key's last event came last: {ns:?}");
}

#[test]
fn a_failed_step_waits_for_the_request_still_in_flight() {
    // An endpoint's step that fails (here: outbox.progress is locked past
    // the worker's lock_timeout) drops its state, rebuilt from the tables a
    // second later. The old state's request of key k is still out: the
    // new state must not send k's first event again before it is back.
    let (cluster, mut db) = cluster_with_outbox("failed_step_in_flight");
    let rx = Receiver::start();
    let hold = Duration::from_secs(4);
    rx.respond(move |_, i| if i == 0 { Reply::After(hold, Box::new(Reply::Status(200))) } else { Reply::Status(200) });
    webhook(&mut db, "hooks", &rx.url("/"), &["a"], json!({"max_in_flight": 4}));
    emit(&mut db, "a", json!({"n": 1}), Some("k"));
    emit(&mut db, "a", json!({"n": 2}), Some("k"));
    rx.wait_for(1, WAIT);
    let mut locker = cluster.connect();
    let mut lock = locker.transaction().unwrap();
    lock.execute("SELECT 1 FROM outbox.progress FOR UPDATE", &[]).unwrap();
    // Another key's event is delivered at once: progress to write, which
    // waits for the lock, and the step fails.
    emit(&mut db, "a", json!({"n": 3}), Some("j"));
    std::thread::sleep(Duration::from_millis(2500));
    lock.commit().unwrap();
    wait_sql(&mut db, WAIT, "SELECT delivered >= 3 AND in_flight = 0 FROM outbox.progress");
    let log = cluster.log();
    assert!(log.contains("lock timeout"), "the step failed; log: {}", &log[log.len().saturating_sub(3000)..]);
    let got = rx.requests();
    let k: Vec<(i64, Duration)> =
        got.iter().filter(|r| r.json()["key"] == "k").map(|r| (data_n(r), r.at - got[0].at)).collect();
    assert!(k.len() >= 3 && k[0].0 == 1, "{k:?}");
    assert!(k[1..].iter().all(|(_, at)| *at >= hold), "a request of k went out while the first was held: {k:?}");
    assert_eq!(k.last().map(|(n, _)| *n), Some(2), "k's last event came last: {k:?}");
}
