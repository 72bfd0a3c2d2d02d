//! Feature: failed deliveries. Retries honour Retry-After, timeouts and
//! attempt limits; 410 Gone disables an endpoint; what is given up on goes to
//! outbox.dead_letters, where it blocks its key (or not, `on_dead = 'skip'`)
//! until an admin replays or discards it.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn retry_after_timeouts_and_attempt_limits() {
    let (_cluster, mut db) = cluster_with_outbox("retries");
    let rx = Receiver::start();
    let refused_once = std::sync::atomic::AtomicBool::new(false);
    rx.respond(move |r, _| match r.json()["data"]["case"].as_str().unwrap() {
        // 503 with Retry-After the first time, then fine.
        "retry-after" if !refused_once.swap(true, std::sync::atomic::Ordering::SeqCst) => {
            Reply::Full { status: 503, headers: vec![("retry-after".into(), "1".into())], body: vec![] }
        }
        "slow" => Reply::Hang,
        "always-500" => Reply::Status(500),
        _ => Reply::Status(200),
    });
    webhook(&mut db, "retry", &rx.url("/"), &["retry"], json!({}));
    webhook(&mut db, "slow", &rx.url("/slow"), &["slow"], json!({"timeout_ms": 300, "max_attempts": 2}));
    webhook(&mut db, "limited", &rx.url("/limited"), &["limited"], json!({"max_attempts": 3}));
    webhook(&mut db, "aged", &rx.url("/aged"), &["aged"], json!({"max_age_s": 1, "backoff_max_ms": 100}));

    emit(&mut db, "retry", json!({"case": "retry-after"}), Some("a"));
    let got = rx.wait_until(WAIT, "two attempts", |r| r.iter().filter(|x| x.path == "/").count() >= 2);
    let attempts: Vec<&Request> = got.iter().filter(|x| x.path == "/").collect();
    let gap = attempts[1].at - attempts[0].at;
    assert!(gap >= Duration::from_millis(950), "Retry-After: 1 not honoured, retried after {gap:?}");
    wait_sql(&mut db, WAIT, "SELECT delivered = 1 FROM outbox.stats WHERE endpoint = 'retry'");

    emit(&mut db, "slow", json!({"case": "slow"}), Some("s"));
    emit(&mut db, "limited", json!({"case": "always-500"}), Some("l"));
    wait_sql(&mut db, WAIT, "SELECT count(*) = 2 FROM outbox.dead_letters WHERE endpoint IN ('slow', 'limited')");
    let slow: (i32, String) = {
        let r =
            db.query_one("SELECT attempts, last_error FROM outbox.dead_letters WHERE endpoint = 'slow'", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(slow.0, 2);
    assert!(slow.1.contains("timed out after 300 ms"), "{}", slow.1);
    let limited: (i32, i32) = {
        let r = db
            .query_one("SELECT attempts, last_status FROM outbox.dead_letters WHERE endpoint = 'limited'", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(limited, (3, 500));
    assert_eq!(rx.requests().iter().filter(|r| r.path == "/limited").count(), 3);
}

#[test]
fn gone_disables_the_endpoint_until_resumed() {
    let (_cluster, mut db) = cluster_with_outbox("gone");
    let rx = Receiver::start();
    rx.respond(|_, seen| if seen == 0 { Reply::Status(410) } else { Reply::Status(200) });
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    emit(&mut db, "t", json!({"n": 1}), Some("k"));
    emit(&mut db, "t", json!({"n": 2}), Some("k"));
    wait_sql(&mut db, WAIT, "SELECT state = 'disabled' AND disabled_reason LIKE 'HTTP 410%' FROM outbox.stats");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.requests().len(), 1, "nothing is sent to a gone endpoint");
    db.execute("SELECT outbox.resume_endpoint('hooks')", &[]).unwrap();
    let got = rx.wait_for(3, WAIT);
    let ns: HashSet<i64> = got[1..].iter().map(data_n).collect();
    assert_eq!(ns, HashSet::from([1, 2]));
    wait_sql(&mut db, WAIT, "SELECT state = 'active' AND pending = 0 FROM outbox.stats");
}

#[test]
fn an_answer_whose_body_stalls_keeps_its_status() {
    let (_cluster, mut db) = cluster_with_outbox("stalled");
    let rx = Receiver::start();
    // 410 Gone, then a body that never ends: the endpoint said it is gone,
    // whatever the timeout made of the rest.
    rx.respond(|_, _| Reply::Stalled(410));
    webhook(&mut db, "stalled", &rx.url("/"), &["*"], json!({"timeout_ms": 300}));
    emit(&mut db, "t", json!({"n": 1}), Some("k"));
    wait_sql(&mut db, WAIT, "SELECT state = 'disabled' AND disabled_reason LIKE 'HTTP 410%' FROM outbox.stats");
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

fn dead_letter_setup(name: &str, on_dead: &str) -> (Cluster, postgres::Client, Receiver) {
    let (cluster, mut db) = cluster_with_outbox(name);
    let rx = Receiver::start();
    // Refuses "poison" until told otherwise (a header in the response
    // would not do: flip the behaviour from the test).
    rx.respond(|r, _| if r.json()["data"]["poison"] == true { Reply::Status(422) } else { Reply::Status(200) });
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"on_dead": on_dead}));
    emit(&mut db, "t", json!({"n": 1, "poison": true}), Some("k"));
    emit(&mut db, "t", json!({"n": 2}), Some("k"));
    emit(&mut db, "t", json!({"n": 3}), Some("other"));
    (cluster, db, rx)
}

#[test]
fn dead_letters_block_their_key_by_default_until_replayed() {
    let (_c, mut db, rx) = dead_letter_setup("block", "block");
    rx.wait_until(WAIT, "the other key", |r| r.iter().any(|x| data_n(x) == 3));
    wait_sql(&mut db, WAIT, "SELECT dead = 1 AND pending = 1 FROM outbox.stats");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!rx.requests().iter().any(|r| data_n(r) == 2), "k's second event must wait behind the dead one");

    // The consumer is fixed; replay the dead letter by id.
    rx.respond(|_, _| Reply::Status(200));
    let id: uuid::Uuid = db.query_one("SELECT event_id FROM outbox.dead_letters", &[]).unwrap().get(0);
    let replayed: i64 = db.query_one("SELECT outbox.replay(event_id => $1)", &[&id]).unwrap().get(0);
    assert_eq!(replayed, 1);
    let got = rx.wait_until(WAIT, "k's events", |r| r.iter().any(|x| data_n(x) == 2));
    let k: Vec<i64> = got.iter().filter(|r| r.json()["key"] == "k").map(data_n).collect();
    assert_eq!(k, [1, 1, 2], "refused once, then replayed, then the next one");
    wait_sql(&mut db, WAIT, "SELECT dead = 0 AND pending = 0 AND delivered = 3 FROM outbox.stats");
}

#[test]
fn dead_letters_with_skip_let_the_key_go_on_and_can_be_discarded() {
    let (_c, mut db, rx) = dead_letter_setup("skip", "skip");
    rx.wait_until(WAIT, "k's second event", |r| r.iter().any(|x| data_n(x) == 2));
    wait_sql(&mut db, WAIT, "SELECT dead = 1 AND pending = 0 FROM outbox.stats");
    let discarded: i64 = db.query_one("SELECT outbox.discard(endpoint => 'hooks')", &[]).unwrap().get(0);
    assert_eq!(discarded, 1);
    wait_sql(&mut db, WAIT, "SELECT dead = 0 FROM outbox.stats");
    let err = db.query_one("SELECT outbox.discard()", &[]).unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("say which dead letters"));
}

#[test]
fn discarding_a_blocking_dead_letter_releases_its_key_and_time_ranges_select() {
    let (_c, mut db, rx) = dead_letter_setup("discard", "block");
    wait_sql(&mut db, WAIT, "SELECT dead = 1 FROM outbox.stats");
    let none: i64 = db
        .query_one("SELECT outbox.replay(endpoint => 'hooks', until => now() - interval '1 hour')", &[])
        .unwrap()
        .get(0);
    assert_eq!(none, 0, "nothing died an hour ago");
    let n: i64 = db
        .query_one("SELECT outbox.discard(endpoint => 'hooks', since => now() - interval '1 hour')", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    rx.wait_until(WAIT, "k's second event", |r| r.iter().any(|x| data_n(x) == 2));
    wait_sql(&mut db, WAIT, "SELECT dead = 0 AND pending = 0 FROM outbox.stats");
}

#[test]
fn an_endpoint_that_is_down_is_probed_at_its_backoff_not_in_a_loop() {
    let (cluster, mut db) = cluster_with_outbox("probes");
    let rx = Receiver::start();
    rx.respond(|_, _| Reply::Status(503));
    // 1,000 keys, each with an event to retry: once the endpoint counts as
    // down, one request at a time probes it, no faster than its backoff
    // (20 ms doubling to 200 ms here), however many keys wait.
    webhook(&mut db, "down", &rx.url("/"), &["t"], json!({}));
    db.batch_execute("SELECT count(outbox_emit('t', '{}', 'k' || i)) FROM generate_series(1, 1000) AS i").unwrap();
    wait_sql(&mut db, WAIT, "SELECT failed_attempts >= 3 FROM outbox.stats");
    std::thread::sleep(Duration::from_secs(1));
    let before = rx.requests().len();
    let cpu_before = worker_cpu_seconds(&cluster);
    std::thread::sleep(Duration::from_secs(4));
    let probes = rx.requests().len() - before;
    let cpu = worker_cpu_seconds(&cluster) - cpu_before;
    assert!(probes <= 60, "{probes} requests in 4 s to an endpoint that is down");
    assert!(cpu < 0.4, "the worker used {cpu:.2} s of CPU in 4 s of an outage");
    // And it comes back.
    rx.respond(|_, _| Reply::Status(200));
    wait_sql(&mut db, WAIT, "SELECT delivered = 1000 FROM outbox.stats");
}

/// A 429 with Retry-After holds the whole endpoint, and a request that was
/// already on its way and succeeds afterwards does not lift the hold: the
/// endpoint said when it wants more, and one earlier request getting
/// through does not change that.
#[test]
fn a_success_already_in_flight_does_not_lift_a_retry_after_hold() {
    let (_cluster, mut db) = cluster_with_outbox("hold");
    let rx = Receiver::start();
    let refused_once = std::sync::atomic::AtomicBool::new(false);
    rx.respond(move |r, _| match r.json()["data"]["case"].as_str().unwrap() {
        "hold" if !refused_once.swap(true, std::sync::atomic::Ordering::SeqCst) => {
            Reply::Full { status: 429, headers: vec![("retry-after".into(), "2".into())], body: vec![] }
        }
        // In flight while the 429 comes back, answered after it.
        "slow" => Reply::After(Duration::from_millis(400), Box::new(Reply::Status(200))),
        _ => Reply::Status(200),
    });
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    emit(&mut db, "t", json!({"case": "slow"}), Some("s"));
    rx.wait_for(1, WAIT);
    emit(&mut db, "t", json!({"case": "hold"}), Some("h"));
    let refused = rx.wait_for(2, WAIT)[1].at;
    // The slow request's 200 has come back by then.
    std::thread::sleep(Duration::from_millis(800));
    wait_sql(&mut db, WAIT, "SELECT delivered = 1 FROM outbox.stats");
    emit(&mut db, "t", json!({"case": "later"}), Some("l"));
    let got = rx.wait_until(WAIT, "the later event", |r| r.iter().any(|x| x.json()["data"]["case"] == "later"));
    let later = got.iter().find(|x| x.json()["data"]["case"] == "later").unwrap().at;
    assert!(
        later - refused >= Duration::from_millis(1900),
        "Retry-After: 2 was lifted: the next event went {:?} after the 429",
        later - refused
    );
    wait_sql(&mut db, WAIT, "SELECT delivered = 3 FROM outbox.stats");
}
