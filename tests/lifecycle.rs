//! Operations over the extension's life: dump and restore, standbys,
//! databases that go away. See docs/operations.md.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::cluster::{bindir, tests_dir};
use outbox_testkit::*;
use serde_json::json;
use std::process::Command;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A database `app` with an endpoint (with a secret), a captured table,
/// delivered events and one event left pending (its endpoint paused).
fn source(cluster: &Cluster, rx: &Receiver) -> postgres::Client {
    let mut root = cluster.connect();
    root.batch_execute("CREATE DATABASE app").unwrap();
    let mut app = cluster.connect_db("app");
    app.batch_execute(
        "CREATE EXTENSION outbox;
         CREATE TABLE orders (id int PRIMARY KEY, status text);",
    )
    .unwrap();
    webhook(&mut app, "hooks", &rx.url("/"), &["*"], json!({ "secret": SECRET }));
    app.batch_execute(
        "SELECT outbox.capture('orders');
         INSERT INTO orders VALUES (1, 'new');",
    )
    .unwrap();
    emit(&mut app, "t", json!({"n": 1}), Some("a"));
    rx.wait_for(2, WAIT);
    app.batch_execute("SELECT outbox.pause_endpoint('hooks')").unwrap();
    emit(&mut app, "t", json!({"pending in the source": true}), Some("a"));
    app.batch_execute("SELECT outbox.resume_endpoint('hooks'); SELECT outbox.pause_endpoint('hooks')").unwrap();
    app
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("runs");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn connection(port: u16) -> [String; 3] {
    ["--host=127.0.0.1".into(), format!("--port={port}"), "--username=postgres".into()]
}

/// What a restored database must show: the endpoint with its secret, the
/// capture, nothing of the source's delivery history, and delivery of
/// what happens in it from now on.
fn check_restored(db: &mut postgres::Client, rx: &Receiver, source_name: &str) {
    let (options, captured): (serde_json::Value, i64) = {
        let r = db
            .query_one(
                "SELECT options, (SELECT count(*) FROM outbox.captures) FROM outbox.endpoints WHERE name = 'hooks'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(options["secret"], SECRET);
    assert_eq!(captured, 1);
    // It was paused in the source and is paused here; the event pending
    // there is not carried (a restore starts clean).
    wait_sql(db, WAIT, "SELECT state = 'paused' AND pending = 0 AND dead = 0 FROM outbox.stats");
    let before = rx.requests().len();
    db.batch_execute(
        "SELECT outbox.resume_endpoint('hooks');
         INSERT INTO orders VALUES (2, 'restored');",
    )
    .unwrap();
    emit(db, "t", json!({"after": "restore"}), Some("a"));
    rx.wait_for(before + 2, WAIT);
    let new: Vec<serde_json::Value> =
        rx.requests()[before..].iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect();
    assert!(new.iter().any(|v| v["data"]["after"]["status"] == "restored"), "the capture trigger works: {new:?}");
    assert!(
        new.iter().all(|v| v["data"]["pending in the source"].is_null()),
        "{source_name}'s pending event came along"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(rx.requests().len(), before + 2, "only what happened after the restore");
    // uncapture knows the table.
    db.batch_execute("SELECT outbox.uncapture('orders')").unwrap();
}

#[test]
fn dump_and_restore_carry_endpoints_and_captures_and_start_clean() {
    let cluster = Cluster::start("dump", &["outbox.databases = 'app,restored'"]);
    let rx = Receiver::start();
    let _app = source(&cluster, &rx);
    let dir = tests_dir().join(format!("dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("app.dump");

    // Custom format, restored into another database of the same cluster:
    // that database names its own roles (roles are cluster-wide).
    run(Command::new(bindir().join("pg_dump"))
        .args(connection(cluster.port))
        .arg("-Fc")
        .arg("-f")
        .arg(&dump)
        .arg("app"));
    let mut root = cluster.connect();
    root.batch_execute("CREATE DATABASE restored").unwrap();
    root.batch_execute(
        "ALTER DATABASE restored SET outbox.writer_role = 'restored_writer';
         ALTER DATABASE restored SET outbox.admin_role = 'restored_admin';",
    )
    .unwrap();
    run(Command::new(bindir().join("pg_restore"))
        .args(connection(cluster.port))
        .args(["--exit-on-error", "-d", "restored"])
        .arg(&dump));
    let mut restored = cluster.connect_db("restored");
    check_restored(&mut restored, &rx, "app");

    // Plain format, into a fresh cluster.
    let sql = dir.join("app.sql");
    run(Command::new(bindir().join("pg_dump")).args(connection(cluster.port)).arg("-f").arg(&sql).arg("app"));
    let fresh = Cluster::start("dump-fresh", &["outbox.databases = 'app'"]);
    fresh.connect().batch_execute("CREATE DATABASE app").unwrap();
    run(Command::new(bindir().join("psql"))
        .args(connection(fresh.port))
        .args(["--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-q", "-d", "app", "-f"])
        .arg(&sql));
    let mut copy = fresh.connect_db("app");
    check_restored(&mut copy, &rx, "app");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_standby_refuses_every_change_clearly() {
    let primary = Cluster::start("standby-src", &[]);
    let mut db = primary.connect();
    db.batch_execute("CREATE EXTENSION outbox; CREATE TABLE t (id int PRIMARY KEY)").unwrap();
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    let standby = primary.standby("standby-dst");
    let mut ro = standby.connect();
    wait_sql(&mut ro, WAIT, "SELECT count(*) = 1 FROM outbox.endpoints");
    for sql in [
        "SELECT outbox_emit('t', '{}')",
        "SELECT outbox.create_endpoint('x', 'http://127.0.0.1:9/')",
        "SELECT outbox.alter_endpoint('hooks', '{}')",
        "SELECT outbox.drop_endpoint('hooks')",
        "SELECT outbox.pause_endpoint('hooks')",
        "SELECT outbox.resume_endpoint('hooks')",
        "SELECT outbox.replay(endpoint => 'hooks')",
        "SELECT outbox.discard(endpoint => 'hooks')",
        "SELECT outbox.capture('t')",
        "SELECT outbox.uncapture('t')",
    ] {
        let e = ro.batch_execute(sql).unwrap_err();
        let e = e.as_db_error().expect("an SQL error");
        assert!(e.message().contains("standby"), "{sql}: {}", e.message());
        assert!(e.hint().is_some_and(|h| h.contains("primary")), "{sql}: {:?}", e.hint());
    }
}

#[test]
fn a_listed_database_may_come_later_and_go_without_a_restart_storm() {
    let cluster = Cluster::start("later", &["outbox.databases = 'later'"]);
    let outbox_lines = |c: &Cluster| c.log().lines().filter(|l| l.contains("outbox")).count();
    // Listed but missing: waited for quietly.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let quiet = outbox_lines(&cluster);
    assert!(quiet <= 2, "{quiet} log lines while the database did not exist:\n{}", cluster.log());
    let mut root = cluster.connect();
    root.batch_execute("CREATE DATABASE later").unwrap();
    let mut later = cluster.connect_db("later");
    later.batch_execute("CREATE EXTENSION outbox").unwrap();
    let rx = Receiver::start();
    webhook(&mut later, "hooks", &rx.url("/"), &["*"], json!({}));
    emit(&mut later, "t", json!({"n": 1}), None);
    rx.wait_for(1, WAIT);
    drop(later);
    // Dropped while its worker runs: no server restart, and the launcher
    // waits for it to come back, quietly again.
    root.batch_execute("DROP DATABASE later").unwrap();
    let before = outbox_lines(&cluster);
    std::thread::sleep(std::time::Duration::from_secs(6));
    let after = outbox_lines(&cluster);
    assert!(after - before <= 2, "{} log lines after the drop:\n{}", after - before, cluster.log());
}
