//! Roles, secrets and egress control, with real login roles on a real
//! cluster.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::time::Duration;

fn denied(db: &mut postgres::Client, sql: &str) -> bool {
    match db.batch_execute(sql) {
        Ok(()) => false,
        Err(e) => e.as_db_error().is_some_and(|d| d.code().code() == "42501"),
    }
}

#[test]
fn a_writer_emits_and_nothing_else_an_admin_manages() {
    let (cluster, mut db) = cluster_with_outbox("roles");
    let rx = Receiver::start();
    rx.respond(|_, _| Reply::Status(400));
    db.batch_execute(
        "CREATE ROLE app LOGIN; GRANT outbox_writer TO app;
         CREATE ROLE ops LOGIN; GRANT outbox_admin TO ops;
         CREATE ROLE nobody LOGIN;
         CREATE TABLE orders (id int PRIMARY KEY); GRANT ALL ON orders TO app;",
    )
    .unwrap();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    db.execute(
        "SELECT outbox.create_endpoint('hooks', $1, options => jsonb_build_object('secret', $2::text))",
        &[&rx.url("/"), &secret],
    )
    .unwrap();
    emit(&mut db, "t", json!({"x": 1}), Some("k")); // goes to dead letters (400)
    wait_sql(&mut db, WAIT, "SELECT dead = 1 FROM outbox.stats");
    db.execute("SELECT outbox.pause_endpoint('hooks')", &[]).unwrap();

    let mut app = cluster.connect_as("postgres", "app");
    let id: String = app.query_one("SELECT outbox_emit('t', '{\"by\": \"app\"}')::text", &[]).unwrap().get(0);
    assert_eq!(id.len(), 36);
    for sql in [
        "SELECT outbox.create_endpoint('x', 'http://127.0.0.1:9/')",
        "SELECT outbox.alter_endpoint('hooks', '{}')",
        "SELECT outbox.drop_endpoint('hooks')",
        "SELECT outbox.pause_endpoint('hooks')",
        "SELECT outbox.resume_endpoint('hooks')",
        "SELECT outbox.replay(endpoint => 'hooks')",
        "SELECT outbox.discard(endpoint => 'hooks')",
        "SELECT outbox.capture('orders')",
        "SELECT options FROM outbox.endpoints",
        "SELECT payload FROM outbox.dead_letters",
        "SELECT * FROM outbox.parked",
        "SELECT * FROM outbox.events",
        "SELECT * FROM outbox.events_0",
        "SELECT * FROM outbox.stats",
        "INSERT INTO outbox.events_0 (txid, n, id, topic, payload, headers) VALUES (1, 1, gen_random_uuid(), 't', '{}', '{}')",
        "UPDATE outbox.endpoints SET url = 'http://evil/'",
        "DELETE FROM outbox.parked",
        "TRUNCATE outbox.events_0",
    ] {
        assert!(denied(&mut app, sql), "a writer may not: {sql}");
    }

    let mut nobody = cluster.connect_as("postgres", "nobody");
    assert!(denied(&mut nobody, "SELECT outbox_emit('t', '{}')"), "emit needs outbox_writer");

    let mut ops = cluster.connect_as("postgres", "ops");
    ops.batch_execute(
        "SELECT outbox.create_endpoint('ops-made', 'http://127.0.0.1:9/');
         SELECT outbox.alter_endpoint('ops-made', '{\"timeout_ms\": 1000}');
         SELECT outbox.drop_endpoint('ops-made');",
    )
    .unwrap();
    let read_secret: String = ops.query_one("SELECT options->>'secret' FROM outbox.endpoints", &[]).unwrap().get(0);
    assert_eq!(read_secret, secret, "admins read secrets");
    let dead: i64 = ops.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
    assert_eq!(dead, 1);
    let replayed: i64 = ops.query_one("SELECT outbox.replay(endpoint => 'hooks')", &[]).unwrap().get(0);
    assert_eq!(replayed, 1);
    assert!(
        denied(&mut ops, "UPDATE outbox.endpoints SET url = 'http://evil/'"),
        "admins change endpoints through the functions only"
    );
    ops.batch_execute("SELECT outbox_emit('t', '{}')").unwrap();
}

#[test]
fn secrets_stay_out_of_stats_errors_logs_and_activity() {
    let (cluster, mut db) = cluster_with_outbox("secrets");
    let rx = Receiver::start();
    rx.respond(|_, _| Reply::Full { status: 500, headers: vec![], body: b"upstream broke".to_vec() });
    let secret_b64 = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMw==";
    let secret = format!("whsec_{secret_b64}");
    let auth = "Bearer tok-e5b7f6b1";
    db.execute(
        "SELECT outbox.create_endpoint('hooks', $1, options => jsonb_build_object('secret', $2::text, 'headers', jsonb_build_object('authorization', $3::text)))",
        &[&rx.url("/"), &secret, &auth],
    )
    .unwrap();
    for i in 0..5 {
        emit(&mut db, "t", json!({"i": i}), Some("k"));
    }
    let mut watcher = cluster.connect();
    let mut activity = String::new();
    for _ in 0..30 {
        for r in watcher.query("SELECT coalesce(query, '') || backend_type FROM pg_stat_activity", &[]).unwrap() {
            activity.push_str(r.get::<_, &str>(0));
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    wait_sql(&mut db, WAIT, "SELECT failed_attempts >= 3 FROM outbox.stats");
    let stats: String = db.query_one("SELECT row_to_json(s)::text FROM outbox.stats AS s", &[]).unwrap().get(0);
    assert!(stats.contains("upstream broke"), "the error is shown: {stats}");
    for (place, text) in [("stats", &stats), ("pg_stat_activity", &activity), ("the server log", &cluster.log())] {
        for needle in [secret_b64, auth] {
            assert!(!text.contains(needle), "{needle} appears in {place}");
        }
    }
    // The request itself carries them, of course.
    let got = rx.requests();
    assert_eq!(got[0].header("authorization"), Some(auth));
    assert!(got[0].header("webhook-signature").unwrap().starts_with("v1,"));
}

#[test]
fn egress_allow_list_and_redirects() {
    let (cluster, mut db) = cluster_with_outbox("egress");
    let target = Receiver::start();
    set_and_reload(&mut db, "outbox.allowed_hosts", "127.0.0.1");
    drop(db);
    let mut db = cluster.connect(); // a new session sees the reloaded setting

    let err = db
        .execute("SELECT outbox.create_endpoint('by-name', $1)", &[&format!("http://localhost:{}/", target.port)])
        .unwrap_err();
    let e = err.as_db_error().unwrap();
    assert_eq!(e.code().code(), "42501");
    assert!(e.message().contains("host \"localhost\" is not in outbox.allowed_hosts"), "{}", e.message());
    assert!(db.execute("SELECT outbox.create_endpoint('other-ip', 'http://127.0.0.2:9/')", &[]).is_err());

    // Redirects: not followed by default; followed to allowed hosts only.
    let redirector = Receiver::start();
    let to_allowed = target.url("/allowed");
    let to_forbidden = format!("http://localhost:{}/forbidden", target.port);
    redirector.respond(move |r, _| {
        let location = if r.path == "/to-forbidden" { to_forbidden.clone() } else { to_allowed.clone() };
        Reply::Full { status: 307, headers: vec![("location".into(), location)], body: vec![] }
    });
    webhook(&mut db, "plain", &redirector.url("/to-allowed"), &["plain"], json!({}));
    webhook(&mut db, "follows", &redirector.url("/to-allowed"), &["follows"], json!({"max_redirects": 3}));
    webhook(&mut db, "forbidden", &redirector.url("/to-forbidden"), &["forbidden"], json!({"max_redirects": 3}));
    emit(&mut db, "plain", json!({}), Some("k"));
    emit(&mut db, "follows", json!({}), Some("k"));
    emit(&mut db, "forbidden", json!({}), Some("k"));

    let got = target.wait_for(1, WAIT);
    assert_eq!(got[0].path, "/allowed");
    assert_eq!(got[0].json()["topic"], "follows");
    wait_sql(
        &mut db,
        WAIT,
        "SELECT last_error LIKE '%redirect to localhost is not allowed by outbox.allowed_hosts%'
         FROM outbox.stats WHERE endpoint = 'forbidden'",
    );
    wait_sql(
        &mut db,
        WAIT,
        "SELECT last_error LIKE '%redirect to http://127.0.0.1:%/allowed not followed%'
         FROM outbox.dead_letters WHERE endpoint = 'plain'",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(target.requests().len(), 1, "nothing reached a host outside the list");

    // Narrowing the list holds back an existing endpoint (nothing is lost).
    set_and_reload(&mut db, "outbox.allowed_hosts", "10.0.0.0/8");
    // The worker applies the reload at its next wake-up, which a busy
    // machine may delay: emit until an event is held.
    let deadline = std::time::Instant::now() + WAIT;
    let mut sent = 0;
    loop {
        emit(&mut db, "follows", json!({"second": true}), Some("j"));
        sent += 1;
        std::thread::sleep(Duration::from_millis(300));
        let held: bool = db
            .query_one(
                "SELECT last_error LIKE '%is not in outbox.allowed_hosts%' AND pending >= 1
                 FROM outbox.stats WHERE endpoint = 'follows'",
                &[],
            )
            .unwrap()
            .get(0);
        if held {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "narrowing the list held back nothing");
    }
    // Widened again: everything held arrives.
    set_and_reload(&mut db, "outbox.allowed_hosts", "");
    target.wait_for(1 + sent, WAIT);
}
