//! The delivery engine under real conditions (issue: "Delivery engine at
//! production grade"): visibility, order, fan-out, failures, bounded
//! storage and memory. Real cluster, real receivers on loopback.
//!
//! Heavy tests run a CI size by default; set OUTBOX_FULL=1 for the sizes
//! the README reports.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn data_n(r: &Request) -> i64 {
    r.json()["data"]["n"].as_i64().unwrap()
}

#[test]
fn a_transaction_that_commits_late_is_not_skipped() {
    let (cluster, mut db) = cluster_with_outbox("gaps");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));

    // T1 gets its transaction id first but commits last.
    let mut t1 = cluster.connect();
    t1.batch_execute("BEGIN; SELECT outbox_emit('t', '{\"n\": 1}', 'a');").unwrap();
    emit(&mut db, "t", json!({"n": 2}), Some("b"));
    rx.wait_for(1, WAIT);
    std::thread::sleep(Duration::from_millis(200)); // the worker ticks past T2
    t1.batch_execute("COMMIT").unwrap();
    let got = rx.wait_for(2, WAIT);
    assert_eq!(got.iter().map(data_n).collect::<Vec<_>>(), [2, 1]);
}

#[test]
fn an_open_transaction_elsewhere_does_not_stall_delivery() {
    let (cluster, mut db) = cluster_with_outbox("stalls");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));

    // Idle in transaction, holding a transaction id (and an event).
    let mut open = cluster.connect();
    open.batch_execute("BEGIN; SELECT outbox_emit('t', '{\"n\": -1}', 'open');").unwrap();
    let hold = Duration::from_secs(if full() { 30 } else { 6 });
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut n = 0;
    while started.elapsed() < hold {
        n += 1;
        emit(&mut db, "t", json!({"n": n}), Some("k"));
        let committed = Instant::now();
        let got = rx.wait_until(WAIT, "the event", |r| r.iter().any(|x| data_n(x) == n));
        let arrived = got.iter().find(|x| data_n(x) == n).unwrap().at;
        worst = worst.max(arrived.saturating_duration_since(committed));
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("{n} events while a transaction stayed open {hold:?}: worst commit-to-arrival {worst:?}");
    assert!(worst < Duration::from_secs(1), "worst latency {worst:?}");
    open.batch_execute("COMMIT").unwrap();
    rx.wait_until(WAIT, "the open transaction's event", |r| r.iter().any(|x| data_n(x) == -1));
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
fn an_idle_worker_delivers_within_milliseconds_of_commit() {
    let (_cluster, mut db) = cluster_with_outbox("latency");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    emit(&mut db, "t", json!({"n": 0}), None); // warm up the connection
    rx.wait_for(1, WAIT);
    let mut samples = Vec::new();
    for n in 1..=30 {
        std::thread::sleep(Duration::from_millis(30));
        emit(&mut db, "t", json!({"n": n}), None);
        let committed = Instant::now();
        let got = rx.wait_until(WAIT, "the event", |r| r.iter().any(|x| data_n(x) == n));
        let at = got.iter().find(|x| data_n(x) == n).unwrap().at;
        samples.push(at.saturating_duration_since(committed).as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let p50 = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    println!("commit-to-receiver latency at idle: p50 {p50:.2} ms, max {max:.2} ms");
    // Woken by the commit, not by the 1 s poll timer.
    assert!(p50 < 50.0, "p50 {p50:.2} ms");
}

#[test]
fn many_keys_are_in_flight_at_once_over_reused_connections() {
    let (_cluster, mut db) = cluster_with_outbox("fanout");
    let rx = Receiver::start();
    rx.respond(|_, _| Reply::After(Duration::from_millis(100), Box::new(Reply::Status(200))));
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"max_in_flight": 16}));
    db.batch_execute(
        "SELECT outbox_emit('t', jsonb_build_object('n', i), 'key-' || (i % 32)) FROM generate_series(1, 96) AS i",
    )
    .unwrap();
    let started = Instant::now();
    rx.wait_for(96, WAIT);
    let took = started.elapsed();
    println!(
        "96 events, 32 keys, 100 ms per request: {took:?}, {} at once at most, {} connections",
        rx.max_concurrent(),
        rx.connections()
    );
    assert!(rx.max_concurrent() >= 12, "at most {} requests at once", rx.max_concurrent());
    assert!(rx.max_concurrent() <= 16, "max_in_flight exceeded: {}", rx.max_concurrent());
    assert!(rx.connections() <= 20, "connections are not reused: {}", rx.connections());
    // One at a time would take 9.6 s.
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn a_dead_endpoint_does_not_delay_another() {
    let (_cluster, mut db) = cluster_with_outbox("isolation");
    let dead = Receiver::start();
    dead.respond(|_, _| Reply::Hang);
    let live = Receiver::start();
    webhook(&mut db, "dead", &dead.url("/"), &["orders.*"], json!({"timeout_ms": 2000}));
    webhook(&mut db, "live", &live.url("/"), &["orders.*", "audit"], json!({}));
    webhook(&mut db, "audit-only", &live.url("/audit"), &["audit"], json!({}));
    for n in 0..20 {
        emit(&mut db, "orders.created", json!({"n": n}), Some(&format!("o{}", n % 4)));
    }
    emit(&mut db, "audit", json!({"n": 100}), None);
    let started = Instant::now();
    let got = live.wait_for(22, WAIT);
    println!("the live endpoint got 22 events in {:?} while the other hung", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(got.iter().filter(|r| r.path == "/audit").count(), 1, "routes by topic");
    assert!(!dead.requests().is_empty(), "the dead endpoint was tried");
}

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
fn delivered_events_are_removed_by_rotation_and_the_worker_holds_no_snapshot() {
    let (cluster, mut db) = cluster_with_outbox("bounded");
    set_and_reload(&mut db, "outbox.retention", "1s");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"max_in_flight": 64}));
    let n: i64 = if full() { 1_000_000 } else { 20_000 };
    let mut loader = cluster.connect();
    emit_backlog(&mut loader, n, 100);
    let peak: i64 = db
        .query_one(
            "SELECT (pg_total_relation_size('outbox.events_0') + pg_total_relation_size('outbox.events_1'))",
            &[],
        )
        .unwrap()
        .get(0);
    let started = Instant::now();
    wait_sql(&mut db, Duration::from_secs(600), &format!("SELECT delivered = {n} FROM outbox.stats"));
    let drained = started.elapsed();
    // Two rotations: the table that held the events is emptied.
    wait_sql(
        &mut db,
        2 * WAIT,
        "SELECT pg_total_relation_size('outbox.events_0') + pg_total_relation_size('outbox.events_1') < 1024 * 1024",
    );
    let after: i64 = db
        .query_one(
            "SELECT pg_total_relation_size('outbox.events_0') + pg_total_relation_size('outbox.events_1')
                  + pg_total_relation_size('outbox.ticks') + pg_total_relation_size('outbox.parked')",
            &[],
        )
        .unwrap()
        .get(0);
    println!(
        "{n} events ({:.1} MB in the events tables) delivered in {drained:?}; outbox tables after rotation: {:.2} MB",
        peak as f64 / 1e6,
        after as f64 / 1e6
    );
    assert!(after < 2 * 1024 * 1024, "{after} bytes left");
    let updates_of_events: i64 = db
        .query_one("SELECT n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relname IN ('events_0') ", &[])
        .unwrap()
        .get(0);
    assert_eq!(updates_of_events, 0, "events are never updated or deleted one by one");

    // While a request hangs for seconds, the worker holds no transaction
    // (so no snapshot, no xmin) beyond its short steps.
    let slow = Receiver::start();
    slow.respond(|_, _| Reply::Hang);
    webhook(&mut db, "slow", &slow.url("/"), &["slow"], json!({"timeout_ms": 5000}));
    emit(&mut db, "slow", json!({}), None);
    slow.wait_for(1, WAIT);
    let mut idle_samples = 0;
    for _ in 0..40 {
        let row = db
            .query_one(
                "SELECT coalesce(now() - xact_start < interval '200 ms', true),
                        backend_xmin IS NULL AND xact_start IS NULL
                 FROM pg_stat_activity WHERE backend_type = 'outbox worker'",
                &[],
            )
            .unwrap();
        assert!(row.get::<_, bool>(0), "the worker keeps a transaction open while a request hangs");
        idle_samples += row.get::<_, bool>(1) as usize;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(idle_samples >= 30, "the worker was in a transaction in {} of 40 samples", 40 - idle_samples);
}

#[test]
fn a_large_backlog_drains_with_flat_worker_memory() {
    let (cluster, mut db) = cluster_with_outbox("backlog");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({"max_in_flight": 64}));
    db.execute("SELECT outbox.pause_endpoint('hooks')", &[]).unwrap();
    let pid = worker_pid(&mut db);
    let idle = private_mb(pid);
    let n: i64 = if full() { 1_000_000 } else { 50_000 };
    let mut loader = cluster.connect();
    emit_backlog(&mut loader, n, 200);
    db.execute("SELECT outbox.resume_endpoint('hooks')", &[]).unwrap();
    let started = Instant::now();
    let mut max_private = 0.0f64;
    let mut db2 = cluster.connect();
    loop {
        max_private = max_private.max(private_mb(pid));
        let done: bool = db2.query_one(&format!("SELECT delivered = {n} FROM outbox.stats"), &[]).unwrap().get(0);
        if done {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(900), "backlog did not drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    let (_, shared) = rss_fields(pid);
    println!(
        "backlog of {n} events drained in {took:?} ({:.0} events/s); worker private memory idle {idle:.1} MB, \
         peak while draining {max_private:.1} MB (shared buffers touched: {shared:.1} MB)",
        n as f64 / took.as_secs_f64()
    );
    // The window bounds memory: the backlog size must not show here.
    assert!(max_private - idle < 64.0, "worker grew by {:.1} MB", max_private - idle);
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
    let again = worker_pid(&mut db);
    assert_ne!(again, pid, "a new worker process delivers");
}
