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

/// 0.1.0's worker state, written the way 0.1.0 wrote it: an endpoint as
/// its create_endpoint made one (progress at the latest tick). One cluster
/// loads one library, so the 0.1.0 worker cannot run here; its rows can.
fn endpoint_0_1_0(db: &mut postgres::Client, name: &str, url: &str, topics: &[&str], paused: bool) {
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    db.execute(
        "WITH e AS (INSERT INTO outbox.endpoints (name, url, kind, topics, options, paused)
                    VALUES ($1, $2, 'webhook', $3, '{\"backoff_base_ms\": 20, \"backoff_max_ms\": 200}', $4)
                    RETURNING id)
         INSERT INTO outbox.progress (endpoint_id, tick) SELECT e.id, (SELECT max(id) FROM outbox.ticks) FROM e",
        &[&name, &url, &topics, &paused],
    )
    .unwrap();
}

/// Emit `count` events per key, numbered from `from`, one transaction each.
fn emit_numbered(db: &mut postgres::Client, keys: &[&str], from: i32, count: i32) {
    for seq in from..from + count {
        for key in keys {
            emit(db, "t", json!({"key": key, "seq": seq}), Some(key));
        }
    }
}

/// Every key's events arrived once each and in order: `seq` 0, 1, 2, ...
fn assert_complete_and_in_order(got: &[Request], expected_per_key: &[(&str, i64)]) {
    let mut seen: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for r in got {
        let body = r.json();
        if body["topic"] == "t" {
            let key = body["key"].as_str().unwrap().to_string();
            seen.entry(key).or_default().push(body["data"]["seq"].as_i64().unwrap());
        }
    }
    for (key, n) in expected_per_key {
        let want: Vec<i64> = (0..*n).collect();
        assert_eq!(seen.get(*key), Some(&want), "events of key {key}, in the order they arrived");
    }
}

#[test]
fn an_update_from_0_1_0_keeps_every_event_in_order_while_the_worker_runs() {
    let cluster = Cluster::start("upgrade", &["outbox.databases = 'app, other'"]);
    let mut root = cluster.connect();
    root.batch_execute("CREATE DATABASE app").unwrap();
    root.batch_execute("CREATE DATABASE other").unwrap();
    // Another database on 0.2.0, with roles of its own: outbox_worker
    // exists, so app's worker runs (and waits) before app is updated.
    let mut other = cluster.connect_db("other");
    other
        .batch_execute(
            "SET outbox.writer_role = 'other_writer'; SET outbox.admin_role = 'other_admin';
             CREATE EXTENSION outbox",
        )
        .unwrap();

    // app on 0.1.0, as released (sql/outbox--0.1.0.sql).
    let (live, paused, replayed) = (Receiver::start(), Receiver::start(), Receiver::start());
    let mut app = cluster.connect_db("app");
    app.batch_execute(
        "CREATE EXTENSION outbox VERSION '0.1.0';
         CREATE TABLE orders (id int PRIMARY KEY, status text);
         SELECT outbox.capture('orders');",
    )
    .unwrap();
    endpoint_0_1_0(&mut app, "live", &live.url("/"), &["*"], false);
    endpoint_0_1_0(&mut app, "paused", &paused.url("/"), &["t"], true);
    endpoint_0_1_0(&mut app, "dead", &replayed.url("/"), &["none"], false);

    // Until the update: emitting (and capture) go on, into 0.1.0's tables...
    let keys = ["a", "b", "c"];
    emit_numbered(&mut app, &keys, 0, 5);
    app.batch_execute("INSERT INTO orders VALUES (1, 'new'); UPDATE orders SET status = 'paid'").unwrap();
    // ...0.1.0's worker took a tick with its batch in commit order...
    app.batch_execute(
        "INSERT INTO outbox.ticks (id, snap_xmin, snap_xmax, snap_xip, commit_order)
         SELECT 1, pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint,
                ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(s) AS x),
                ARRAY(SELECT txid FROM outbox.events GROUP BY txid ORDER BY txid)
         FROM pg_current_snapshot() AS s",
    )
    .unwrap();
    // ...switched tables, as its rotation did...
    app.batch_execute(
        "UPDATE outbox.rotation SET current = (slot = 1), since = CASE WHEN slot = 1 THEN now() ELSE since END,
                empty = CASE WHEN slot = 1 THEN false ELSE empty END;
         UPDATE outbox.rotation SET left_txid = pg_snapshot_xmax(pg_current_snapshot())::text::bigint WHERE slot = 0",
    )
    .unwrap();
    emit_numbered(&mut app, &keys, 5, 5);
    // ...and gave up on one event of endpoint `dead`.
    app.batch_execute(
        "INSERT INTO outbox.parked (endpoint_id, event_id, seq, batch, rank, txid, n, topic, key, type, payload, headers,
                                    created_at, state, attempts, next_attempt_at, last_status, last_error, failed_at)
         SELECT (SELECT id FROM outbox.endpoints WHERE name = 'dead'), e.id, nextval('outbox.parked_seq'), 1, 1,
                e.txid, e.n, e.topic, e.key, e.type, e.payload, e.headers, e.created_at, 'dead', 5, NULL, 500,
                'HTTP 500', now()
         FROM outbox.events AS e ORDER BY e.txid, e.n LIMIT 1",
    )
    .unwrap();
    let (in_0, in_1): (i64, i64) = {
        let r = app
            .query_one("SELECT (SELECT count(*) FROM outbox.events_0), (SELECT count(*) FROM outbox.events_1)", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(in_0 >= 17 && in_1 == 15, "a backlog in both tables: {in_0} and {in_1}");

    // The worker waits, and says why; the admin functions refuse, and say
    // what to do.
    wait_until_logged(&cluster, "nothing is delivered until ALTER EXTENSION outbox UPDATE");
    let err = app.execute("SELECT outbox.resume_endpoint('paused')", &[]).unwrap_err();
    let e = err.as_db_error().unwrap();
    assert!(e.message().contains("the extension in this database is version 0.1.0"), "{}", e.message());
    assert!(e.hint().unwrap_or("").contains("ALTER EXTENSION outbox UPDATE"));
    assert!(live.requests().is_empty(), "nothing is sent before the update");

    // The update, while a writer emits and the worker runs.
    let mut writer_db = cluster.connect_db("app");
    let writer = std::thread::spawn(move || emit_numbered(&mut writer_db, &["w"], 0, 60));
    std::thread::sleep(std::time::Duration::from_millis(150));
    app.batch_execute("ALTER EXTENSION outbox UPDATE").unwrap();
    writer.join().unwrap();
    let version: String =
        app.query_one("SELECT extversion FROM pg_extension WHERE extname = 'outbox'", &[]).unwrap().get(0);
    assert_eq!(version, "0.2.0");

    // Nothing lost, every key in order, captured changes too.
    let got = live.wait_for(10 * 3 + 60 + 2, WAIT);
    assert_complete_and_in_order(&got, &[("a", 10), ("b", 10), ("c", 10), ("w", 60)]);
    let ops: Vec<String> = got
        .iter()
        .filter(|r| r.json()["topic"] == "orders")
        .map(|r| r.json()["data"]["op"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ops, ["insert", "update"]);
    // The paused endpoint kept its place, and takes it up when resumed.
    app.batch_execute("SELECT outbox.resume_endpoint('paused')").unwrap();
    let got = paused.wait_for(10 * 3 + 60, WAIT);
    assert_complete_and_in_order(&got, &[("a", 10), ("b", 10), ("c", 10), ("w", 60)]);
    // The dead letter is one, and can be replayed.
    let dead: i64 =
        app.query_one("SELECT count(*) FROM outbox.dead_letters WHERE endpoint = 'dead'", &[]).unwrap().get(0);
    assert_eq!(dead, 1);
    app.batch_execute("SELECT outbox.replay(endpoint => 'dead')").unwrap();
    let got = replayed.wait_for(1, WAIT);
    assert_eq!(got[0].json()["data"], json!({"key": "a", "seq": 0}));
    wait_sql(&mut app, WAIT, "SELECT pending = 0 AND dead = 0 FROM outbox.stats WHERE endpoint = 'dead'");
    // Rotation goes on over the tables 0.1.0 filled.
    wait_sql(&mut app, WAIT, "SELECT pending = 0 FROM outbox.stats WHERE endpoint = 'live'");

    // The 0.1.0 roles are this database's now, and only its.
    let marker: Option<String> =
        app.query_one("SELECT shobj_description('outbox_writer'::regrole, 'pg_authid')", &[]).unwrap().get(0);
    assert_eq!(marker.as_deref(), Some("outbox writer role of database app"));
}

fn wait_until_logged(cluster: &Cluster, text: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while !cluster.log().contains(text) {
        assert!(std::time::Instant::now() < deadline, "not logged: {text}\n{}", cluster.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Every object of the extension, its definition and its rights, the
/// extension's dump configuration and its roles: what a database that
/// installed this version and one that updated to it must share.
const CATALOG: &str = r#"
WITH members AS (
    SELECT d.classid, d.objid FROM pg_depend AS d JOIN pg_extension AS x ON x.oid = d.refobjid
    WHERE d.refclassid = 'pg_extension'::regclass AND x.extname = 'outbox' AND d.deptype = 'e')
SELECT line FROM (
    SELECT pg_describe_object(m.classid, m.objid, 0) || ' owner ' || pg_get_userbyid(c.relowner)
           || ' kind ' || c.relkind::text || ' options ' || coalesce(c.reloptions::text, '') || ' acl '
           || coalesce(c.relacl::text, '') || ' comment ' || coalesce(obj_description(c.oid, 'pg_class'), '')
           || coalesce(' view ' || pg_get_viewdef(c.oid), '') AS line
    FROM members AS m JOIN pg_class AS c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
    UNION ALL
    SELECT 'column ' || c.relname || '.' || a.attnum || ' ' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '') || ' identity ' || a.attidentity::text
           || ' acl ' || coalesce(a.attacl::text, '')
    FROM members AS m JOIN pg_class AS c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
    JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef AS ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
    UNION ALL
    SELECT 'constraint ' || c.relname || ' ' || k.conname || ' ' || pg_get_constraintdef(k.oid)
    FROM members AS m JOIN pg_class AS c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
    JOIN pg_constraint AS k ON k.conrelid = c.oid
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(i.indexrelid)
    FROM members AS m JOIN pg_index AS i ON m.classid = 'pg_class'::regclass AND i.indrelid = m.objid
    UNION ALL
    SELECT 'trigger ' || pg_get_triggerdef(t.oid)
    FROM members AS m JOIN pg_trigger AS t ON m.classid = 'pg_class'::regclass AND t.tgrelid = m.objid
    WHERE NOT t.tgisinternal
    UNION ALL
    SELECT 'sequence ' || s.seqrelid::regclass || ' ' || s.seqtypid::regtype || ' ' || s.seqstart || ' '
           || s.seqincrement || ' ' || s.seqmax || ' ' || s.seqmin || ' ' || s.seqcache || ' ' || s.seqcycle
    FROM members AS m JOIN pg_sequence AS s ON m.classid = 'pg_class'::regclass AND s.seqrelid = m.objid
    UNION ALL
    SELECT 'function ' || pg_get_functiondef(p.oid) || ' owner ' || pg_get_userbyid(p.proowner) || ' acl '
           || coalesce(p.proacl::text, '') || ' comment ' || coalesce(obj_description(p.oid, 'pg_proc'), '')
    FROM members AS m JOIN pg_proc AS p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid
    UNION ALL
    SELECT pg_describe_object(m.classid, m.objid, 0) || coalesce(' acl ' || n.nspacl::text, '')
    FROM members AS m LEFT JOIN pg_namespace AS n ON m.classid = 'pg_namespace'::regclass AND n.oid = m.objid
    WHERE m.classid NOT IN ('pg_class'::regclass, 'pg_proc'::regclass)
    UNION ALL
    SELECT 'extension config ' || coalesce((SELECT string_agg(c::regclass::text, ',' ORDER BY c::regclass::text)
                                            FROM unnest(x.extconfig) AS c), '')
           || ' conditions ' || coalesce(array_to_string(x.extcondition, ','), '') || ' version ' || x.extversion
    FROM pg_extension AS x WHERE x.extname = 'outbox'
    UNION ALL
    SELECT 'role ' || r.rolname || ' super ' || r.rolsuper || ' login ' || r.rolcanlogin || ' inherit ' || r.rolinherit
           || ' createrole ' || r.rolcreaterole || ' comment ' || coalesce(shobj_description(r.oid, 'pg_authid'), '')
           || ' member of ' || coalesce((SELECT string_agg(g.rolname, ',' ORDER BY g.rolname)
                                         FROM pg_auth_members AS am JOIN pg_roles AS g ON g.oid = am.roleid
                                         WHERE am.member = r.oid), '')
           || ' connect ' || has_database_privilege(r.oid, current_database(), 'CONNECT')
    FROM pg_roles AS r WHERE r.rolname IN ('outbox_writer', 'outbox_admin', 'outbox_worker')
    UNION ALL
    SELECT 'schema outbox acl ' || coalesce(n.nspacl::text, '') FROM pg_namespace AS n WHERE n.nspname = 'outbox'
) AS all_lines
ORDER BY line
"#;

fn catalog(db: &mut postgres::Client) -> Vec<String> {
    db.query(CATALOG, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

#[test]
fn an_updated_database_has_the_catalog_of_a_new_one() {
    let (_cluster, mut db) = cluster_with_outbox("catalog");
    let new = catalog(&mut db);
    // Then the same database, installed as 0.1.0 was and updated. The roles
    // go with the first installation: 0.1.0 creates its own.
    db.batch_execute(
        "DROP EXTENSION outbox; DROP ROLE outbox_writer; DROP ROLE outbox_admin;
         CREATE EXTENSION outbox VERSION '0.1.0'; ALTER EXTENSION outbox UPDATE",
    )
    .unwrap();
    let updated = catalog(&mut db);

    let only_new: Vec<&str> = new.iter().filter(|l| !updated.contains(l)).map(String::as_str).collect();
    let only_updated: Vec<&str> = updated.iter().filter(|l| !new.contains(l)).map(String::as_str).collect();
    assert!(
        only_new.is_empty() && only_updated.is_empty(),
        "a new installation has:\n{}\n\nwhere an updated one has:\n{}",
        only_new.join("\n"),
        only_updated.join("\n")
    );
    assert!(new.len() > 100, "the comparison covers the catalog: {} lines", new.len());
}
