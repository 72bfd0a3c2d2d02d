//! Hostile tenants: real login roles try to gain more than they were
//! granted, through every vector the extension offers (issue 9). Each test
//! asserts what an auditor would check afterwards: nobody became a
//! superuser, planted code never ran with anyone else's rights, and nothing
//! else changed.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// A table that planted code writes to when it runs, with who it ran as.
const LOG_TABLE: &str = "
CREATE TABLE public.ran (what text, as_user name, session name);
GRANT INSERT, SELECT ON public.ran TO PUBLIC;";

/// The function planted code calls: records that it ran and tries to make
/// the session's user a superuser (which works only if it runs as one).
fn note_function(schema: &str) -> String {
    format!(
        "CREATE FUNCTION {schema}.note(what text) RETURNS boolean LANGUAGE plpgsql AS $f$
         BEGIN
             INSERT INTO public.ran VALUES (what, current_user, session_user);
             BEGIN
                 EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', session_user);
             EXCEPTION WHEN OTHERS THEN NULL;
             END;
             RETURN true;
         END $f$;"
    )
}

/// Objects named like the built-ins the extension's SQL uses (functions,
/// aggregates, operators, types), planted in `schema`; each records that
/// it ran. `schema` is `public` (owned by the planter) or `pg_temp`.
fn plants(schema: &str) -> String {
    let mut sql = note_function(schema);
    let s = schema;
    for (name, args, ret, body) in [
        ("now", "", "timestamptz", "pg_catalog.now()"),
        ("max", "bigint", "bigint", "$1"),
        ("min", "bigint", "bigint", "$1"),
        ("count", "bigint", "bigint", "$1"),
        ("unnest", "bigint[]", "SETOF bigint", "pg_catalog.unnest($1)"),
        ("unnest", "text[]", "SETOF text", "pg_catalog.unnest($1)"),
        ("array_position", "bigint[], bigint", "integer", "pg_catalog.array_position($1, $2)"),
        ("to_char", "timestamp, text", "text", "pg_catalog.to_char($1, $2)"),
        ("current_setting", "text", "text", "pg_catalog.current_setting($1)"),
        ("pg_current_snapshot", "", "pg_snapshot", "pg_catalog.pg_current_snapshot()"),
        ("pg_snapshot_xmax", "pg_snapshot", "xid8", "pg_catalog.pg_snapshot_xmax($1)"),
        ("pg_snapshot_xmin", "pg_snapshot", "xid8", "pg_catalog.pg_snapshot_xmin($1)"),
        ("pg_current_xact_id", "", "xid8", "pg_catalog.pg_current_xact_id()"),
        ("nextval", "regclass", "bigint", "pg_catalog.nextval($1)"),
        ("to_jsonb", "anyelement", "jsonb", "pg_catalog.to_jsonb($1)"),
        ("jsonb_each", "jsonb", "SETOF record", "pg_catalog.jsonb_each($1)"),
        ("cardinality", "text[]", "integer", "pg_catalog.cardinality($1)"),
        ("replace", "text, text, text", "text", "pg_catalog.replace($1, $2, $3)"),
        ("format", "text, text", "text", "pg_catalog.format($1, $2)"),
        ("lower", "text", "text", "pg_catalog.lower($1)"),
        ("upper", "text", "text", "pg_catalog.upper($1)"),
        ("quote_ident", "text", "text", "pg_catalog.quote_ident($1)"),
    ] {
        if name == "jsonb_each" {
            continue; // OUT columns: planted through the aggregate below instead
        }
        let body = if ret.starts_with("SETOF") {
            format!("PERFORM {s}.note('{name}({args})'); RETURN QUERY SELECT {body};")
        } else {
            format!("PERFORM {s}.note('{name}({args})'); RETURN {body};")
        };
        sql.push_str(&format!(
            "CREATE FUNCTION {s}.{name}({args}) RETURNS {ret} LANGUAGE plpgsql AS $f$ BEGIN {body} END $f$;\n"
        ));
    }
    // Aggregates: a better match (exact types) than the polymorphic built-in.
    for (name, arg, state) in
        [("array_agg", "bigint", "bigint[]"), ("array_agg", "text", "text[]"), ("sum", "integer", "bigint")]
    {
        let step = if state.ends_with("[]") { "pg_catalog.array_append(st, v)" } else { "coalesce(st, 0) + v" };
        sql.push_str(&format!(
            "CREATE FUNCTION {s}.{name}_{arg}_step(st {state}, v {arg}) RETURNS {state} LANGUAGE plpgsql AS $f$
             BEGIN PERFORM {s}.note('{name}({arg})'); RETURN {step}; END $f$;
             CREATE AGGREGATE {s}.{name}({arg}) (sfunc = {s}.{name}_{arg}_step, stype = {state});\n"
        ));
    }
    // Operators on the built-in types the extension compares.
    for (op, left, right) in [
        ("=", "bigint", "bigint"),
        ("=", "integer", "integer"),
        ("=", "text", "text"),
        ("<", "bigint", "bigint"),
        (">", "bigint", "bigint"),
        (">=", "bigint", "bigint"),
        ("<=", "bigint", "bigint"),
        ("<>", "text", "text"),
        ("~~", "text", "text"),
        ("->>", "jsonb", "text"),
        ("->", "jsonb", "text"),
        ("||", "text", "text"),
        ("+", "timestamptz", "interval"),
        ("-", "timestamptz", "timestamptz"),
        ("=", "oid", "regclass"),
        ("!~~", "name", "name"),
    ] {
        let f = format!("op_{}_{left}_{right}", op.bytes().map(|b| b.to_string()).collect::<Vec<_>>().join("_"));
        let ret = match op {
            "->>" | "||" => "text",
            "->" => "jsonb",
            "+" => "timestamptz",
            "-" => "interval",
            _ => "boolean",
        };
        let result = match ret {
            "boolean" => "true",
            "text" => "''",
            "jsonb" => "'{}'::pg_catalog.jsonb",
            "timestamptz" => "pg_catalog.now()",
            _ => "'0'::pg_catalog.interval",
        };
        sql.push_str(&format!(
            "CREATE FUNCTION {s}.{f}(a {left}, b {right}) RETURNS {ret} LANGUAGE plpgsql AS $f$
             BEGIN PERFORM {s}.note('operator {op}({left}, {right})'); RETURN {result}; END $f$;
             CREATE OPERATOR {s}.{op} (leftarg = {left}, rightarg = {right}, function = {s}.{f});\n"
        ));
    }
    // Types: a domain runs its CHECK whenever a value is cast to it.
    for t in ["int4", "int8", "text", "uuid", "jsonb", "bool", "float8", "timestamptz", "regclass", "xid"] {
        sql.push_str(&format!("CREATE DOMAIN {s}.{t} AS pg_catalog.{t} CHECK ({s}.note('type {t}'));\n"));
    }
    sql
}

/// Whether `role` is a superuser.
fn is_superuser(db: &mut postgres::Client, role: &str) -> bool {
    db.query_one("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1", &[&role]).unwrap().get(0)
}

/// What planted code recorded, as "what as user (session user)".
fn ran(db: &mut postgres::Client) -> Vec<String> {
    db.query("SELECT what || ' as ' || as_user || ' (session ' || session || ')' FROM public.ran", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Assert nobody in `roles` became a superuser and planted code never
/// ran (in `db`'s database).
fn nothing_gained(db: &mut postgres::Client, roles: &[&str]) {
    let ran = ran(db);
    assert!(ran.is_empty(), "planted code ran: {ran:#?}");
    for role in roles.iter().chain(&["outbox_worker"]) {
        assert!(!is_superuser(db, role), "{role} became a superuser");
    }
}

fn sqlstate(result: Result<u64, postgres::Error>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => e.as_db_error().map_or_else(|| e.to_string(), |d| d.code().code().to_string()),
    }
}

#[test]
fn a_writer_cannot_become_superuser_through_emit() {
    // No worker in this cluster: outbox_emit must find the current events
    // table by itself, as it does right after CREATE EXTENSION.
    let cluster = Cluster::start("writer", &["outbox.databases = ''"]);
    let mut db = cluster.connect();
    db.batch_execute(&format!("{LOG_TABLE} CREATE EXTENSION outbox; CREATE ROLE w1 LOGIN; GRANT outbox_writer TO w1;"))
        .unwrap();
    let mut w1 = cluster.connect_as("postgres", "w1");
    // The reported attack (a domain named int4 in pg_temp) and its
    // variants: every built-in the extension uses, planted in pg_temp.
    w1.batch_execute(&plants("pg_temp")).unwrap();
    for sql in
        ["SELECT outbox_emit('t', '{}')", "SELECT outbox_emit('t', '{\"a\": 1}', 'k', 'created', '{\"h\": \"v\"}')"]
    {
        w1.batch_execute(sql).unwrap();
    }
    nothing_gained(&mut db, &["w1"]);
    // Emitted, and nothing else: the writer still reads nothing.
    let n: i64 = db.query_one("SELECT pg_catalog.count(*) FROM outbox.events", &[]).unwrap().get(0);
    assert_eq!(n, 2);
    assert_eq!(sqlstate(w1.execute("SELECT * FROM outbox.events", &[])), "42501");
}

#[test]
fn emit_refuses_read_only_transactions_like_insert() {
    let (cluster, mut db) = cluster_with_outbox("readonly");
    for (setup, sql) in [
        ("BEGIN READ ONLY", "SELECT outbox_emit('t', '{}')"),
        ("SET default_transaction_read_only = on", "SELECT outbox_emit('t', '{}')"),
    ] {
        let mut c = cluster.connect();
        c.batch_execute(setup).unwrap();
        let err = c.batch_execute(sql).unwrap_err();
        let e = err.as_db_error().expect("an SQL error");
        assert_eq!(e.code().code(), "25006", "{sql}: {}", e.message());
        assert!(e.message().contains("read-only transaction"), "{}", e.message());
        assert!(e.hint().is_some());
    }
    let n: i64 = db.query_one("SELECT pg_catalog.count(*) FROM outbox.events", &[]).unwrap().get(0);
    assert_eq!(n, 0, "nothing was written");
}

#[test]
fn the_owner_of_a_captured_table_cannot_become_superuser() {
    let (cluster, mut db) = cluster_with_outbox("owner");
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    db.batch_execute(&format!("{LOG_TABLE} CREATE ROLE owner1 LOGIN; GRANT CREATE ON SCHEMA public TO owner1;"))
        .unwrap();
    let mut owner = cluster.connect_as("postgres", "owner1");
    // An enum with a cast to json: to_jsonb(NEW) runs the cast function.
    owner
        .batch_execute(&format!(
            "{}
             CREATE TYPE public.mood AS ENUM ('happy', 'sad');
             CREATE FUNCTION public.mood_json(m public.mood) RETURNS json LANGUAGE plpgsql AS $f$
             BEGIN PERFORM public.note('cast mood to json'); RETURN pg_catalog.to_json(m::text); END $f$;
             CREATE CAST (public.mood AS json) WITH FUNCTION public.mood_json(public.mood);
             CREATE TABLE public.diary (id int PRIMARY KEY, mood public.mood);",
            note_function("public")
        ))
        .unwrap();
    // The admin captures the owner's table (the owner cannot: not an admin).
    assert_eq!(sqlstate(owner.execute("SELECT outbox.capture('public.diary')", &[])), "42501");
    db.batch_execute("SELECT outbox.capture('public.diary')").unwrap();
    owner.batch_execute("INSERT INTO public.diary VALUES (1, 'happy')").unwrap();
    let got = rx.wait_for(1, WAIT);
    assert_eq!(got[0].json()["data"]["after"]["mood"], "happy");
    // The cast ran, as the writer (the owner) and nobody else.
    let ran = ran(&mut db);
    assert!(!ran.is_empty(), "the cast runs when the row becomes JSON");
    assert!(ran.iter().all(|r| r.ends_with("as owner1 (session owner1)")), "{ran:#?}");
    assert!(!is_superuser(&mut db, "owner1"), "owner1 became a superuser");

    // Nor can the owner attach the capture trigger itself, with its own
    // arguments.
    let err = owner
        .batch_execute(
            "CREATE TRIGGER mine AFTER INSERT ON public.diary FOR EACH ROW
             EXECUTE FUNCTION outbox._capture_row('forged', '{id}', '')",
        )
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501", "{err}");
}

#[test]
fn a_capture_condition_cannot_run_more_sql() {
    let (_cluster, mut db) = cluster_with_outbox("condition");
    db.batch_execute(&format!("{LOG_TABLE} {} CREATE TABLE t (id int PRIMARY KEY);", note_function("public"))).unwrap();
    for condition in [
        "true) EXECUTE FUNCTION outbox._capture_row('t', '{id}', ''); DROP TABLE t; --",
        "true) EXECUTE FUNCTION public.note('x'); --",
        "true) EXECUTE FUNCTION outbox._capture_row('other', '{id}', '') --",
        "NEW.id > 0)) ; SELECT public.note('injected'); --",
    ] {
        let err = db
            .execute("SELECT outbox.capture('t', condition => $1, operations => '{insert,update}')", &[&condition])
            .unwrap_err();
        assert_eq!(err.as_db_error().unwrap().code().code(), "22023", "{condition}: {err}");
    }
    let triggers: i64 = db
        .query_one(
            "SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = 't'::pg_catalog.regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0);
    assert!(ran(&mut db).is_empty());
    // A real condition still works.
    db.batch_execute("SELECT outbox.capture('t', condition => 'NEW.id > 0', operations => '{insert,update}')").unwrap();
}

#[test]
fn a_database_owner_cannot_make_the_worker_run_its_code() {
    let cluster = Cluster::start("dbowner", &["outbox.databases = 'app'", "outbox.retention = 1"]);
    let mut root = cluster.connect();
    root.batch_execute("CREATE ROLE dbowner LOGIN").unwrap();
    root.batch_execute("CREATE DATABASE app OWNER dbowner").unwrap();
    let mut db = cluster.connect_db("app");
    db.batch_execute(&format!("{LOG_TABLE} CREATE EXTENSION outbox;")).unwrap();
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));

    // The owner plants built-in look-alikes in its public schema and puts
    // that schema first for every session, the worker's included; and
    // tries to stop the worker with settings.
    let mut owner = cluster.connect_as("app", "dbowner");
    owner.batch_execute(&plants("public")).unwrap();
    owner
        .batch_execute(
            "ALTER DATABASE app SET search_path = public, pg_catalog;
             ALTER DATABASE app SET default_transaction_read_only = on;
             ALTER DATABASE app SET statement_timeout = '1ms';",
        )
        .unwrap();
    // The worker (re)connects with those defaults.
    root.batch_execute(
        "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'outbox worker'",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut w = cluster.connect_db("app");
    w.batch_execute("SET default_transaction_read_only = off; SET statement_timeout = 0; SET search_path = pg_catalog")
        .unwrap();
    for i in 0..20 {
        w.execute("SELECT public.outbox_emit('t', pg_catalog.jsonb_build_object('i', $1::int), 'k')", &[&i]).unwrap();
    }
    rx.wait_for(20, WAIT);
    // A rotation ran too (retention 1 s).
    let mut check = cluster.connect_db("app");
    check.batch_execute("SET statement_timeout = 0; SET search_path = pg_catalog").unwrap();
    wait_sql(&mut check, WAIT, "SELECT slot = 1 FROM outbox.rotation WHERE current");
    nothing_gained(&mut check, &["dbowner"]);
    let worker: String = check
        .query_one("SELECT usename::text FROM pg_catalog.pg_stat_activity WHERE backend_type = 'outbox worker'", &[])
        .unwrap()
        .get(0);
    assert_eq!(worker, "outbox_worker", "the worker connects as its own role");
}

#[test]
fn rights_in_one_database_do_not_reach_another() {
    let cluster = Cluster::start("databases", &["outbox.databases = 'postgres'"]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox; CREATE ROLE otheradmin LOGIN;").unwrap();
    db.batch_execute("CREATE DATABASE other").unwrap();
    db.execute("SELECT outbox.create_endpoint('hooks', 'http://127.0.0.1:9/', options => '{\"secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}')", &[])
        .unwrap();

    let mut other = cluster.connect_db("other");
    // The default roles belong to database postgres now.
    let err = other.batch_execute("CREATE EXTENSION outbox").unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42710", "{err}");
    other
        .batch_execute(
            "SET outbox.writer_role = 'other_writer'; SET outbox.admin_role = 'other_admin'; CREATE EXTENSION outbox",
        )
        .unwrap();
    // Whoever administers outbox in database other...
    let admin_role: String = other
        .query_one(
            "SELECT grantee::text FROM information_schema.role_table_grants
             WHERE table_schema = 'outbox' AND table_name = 'endpoints' AND privilege_type = 'SELECT'
               AND grantee NOT IN ('outbox_worker', 'postgres')",
            &[],
        )
        .unwrap()
        .get(0);
    other.batch_execute(&format!("GRANT {admin_role} TO otheradmin")).unwrap();
    let mut mallory = cluster.connect_as("other", "otheradmin");
    mallory.batch_execute("SELECT outbox.create_endpoint('mine', 'http://127.0.0.1:9/')").unwrap();

    // ...has no rights in database postgres.
    let mut mallory = cluster.connect_as("postgres", "otheradmin");
    for sql in [
        "SELECT options FROM outbox.endpoints",
        "SELECT * FROM outbox.stats",
        "SELECT * FROM outbox.dead_letters",
        "SELECT outbox.alter_endpoint('hooks', url => 'http://evil.example/')",
        "SELECT outbox.create_endpoint('evil', 'http://evil.example/')",
        "SELECT outbox.replay(endpoint => 'hooks')",
        "SELECT outbox.drop_endpoint('hooks')",
        "SELECT outbox_emit('t', '{}')",
    ] {
        assert_eq!(sqlstate(mallory.execute(sql, &[])), "42501", "otheradmin may not: {sql}");
    }
    let url: String = db.query_one("SELECT url FROM outbox.endpoints WHERE name = 'hooks'", &[]).unwrap().get(0);
    assert_eq!(url, "http://127.0.0.1:9/");
}

#[test]
fn roles_prepared_by_someone_else_are_not_adopted() {
    let cluster = Cluster::start("prepared", &["outbox.databases = ''"]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE ROLE cr LOGIN CREATEROLE").unwrap();
    let mut cr = cluster.connect_as("postgres", "cr");
    cr.batch_execute("CREATE ROLE outbox_admin NOLOGIN").unwrap();
    let err = db.batch_execute("CREATE EXTENSION outbox").unwrap_err();
    let e = err.as_db_error().unwrap();
    assert_eq!(e.code().code(), "42710", "{err}");
    assert!(e.message().contains("outbox_admin"), "{}", e.message());
    // A worker role with members is refused too.
    db.batch_execute("DROP ROLE outbox_admin; CREATE ROLE outbox_worker NOLOGIN; COMMENT ON ROLE outbox_worker IS 'outbox worker role'; GRANT outbox_worker TO cr;")
        .unwrap();
    let err = db.batch_execute("CREATE EXTENSION outbox").unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501", "{err}");
    db.batch_execute("DROP ROLE outbox_worker").unwrap();
    // So is one with a password (its owner could log in as the worker).
    db.batch_execute(
        "CREATE ROLE outbox_worker LOGIN PASSWORD 'known' NOINHERIT; COMMENT ON ROLE outbox_worker IS 'outbox worker role';",
    )
    .unwrap();
    let err = db.batch_execute("CREATE EXTENSION outbox").unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("has a password"), "{err}");
    db.batch_execute("DROP ROLE outbox_worker").unwrap();
    // An update from 0.1.0 adopts 0.1.0's own roles, never a worker role
    // someone prepared without outbox's mark.
    db.batch_execute("CREATE ROLE outbox_worker NOLOGIN; CREATE EXTENSION outbox VERSION '0.1.0'").unwrap();
    let err = db.batch_execute("ALTER EXTENSION outbox UPDATE").unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("role outbox_worker exists"), "{err}");
    db.batch_execute("DROP EXTENSION outbox; DROP ROLE outbox_worker, outbox_writer, outbox_admin").unwrap();
    // With the prepared roles gone it installs, and a reinstall in the
    // same database adopts its own roles.
    db.batch_execute("CREATE EXTENSION outbox; DROP EXTENSION outbox; CREATE EXTENSION outbox").unwrap();
}

#[test]
fn planted_operators_do_not_run_in_the_extension_scripts() {
    let cluster = Cluster::start("scripts", &["outbox.databases = ''"]);
    let mut root = cluster.connect();
    // CREATE on the extension's schema: what every role had on public
    // before PostgreSQL 15.
    root.batch_execute("CREATE ROLE planter LOGIN").unwrap();
    root.batch_execute("CREATE DATABASE app").unwrap();
    let mut db = cluster.connect_db("app");
    db.batch_execute(&format!(
        "{LOG_TABLE} GRANT CREATE ON SCHEMA public TO planter; CREATE EXTENSION outbox VERSION '0.1.0';"
    ))
    .unwrap();
    // Look-alikes of what the scripts use, in the schema the superuser's
    // CREATE and ALTER EXTENSION run in; among them operators of exactly
    // the types the role checks compare (oid = regclass, name !~~ name),
    // which would win over built-ins that need a cast.
    let mut planter = cluster.connect_as("app", "planter");
    planter.batch_execute(&plants("public")).unwrap();
    db.batch_execute("ALTER EXTENSION outbox UPDATE").unwrap();
    nothing_gained(&mut db, &["planter"]);
    // A reinstall adopts the roles it created, through the same checks.
    db.batch_execute("DROP EXTENSION outbox; CREATE EXTENSION outbox").unwrap();
    nothing_gained(&mut db, &["planter"]);
}

#[test]
fn egress_checks_resolved_addresses_ignores_environment_proxies_and_keeps_credentials_home() {
    // A proxy in the server's environment must not be used.
    let env_proxy = Receiver::start();
    let proxy_url = env_proxy.url("");
    let cluster = Cluster::start_with_env(
        "egress2",
        &[],
        &[("HTTP_PROXY", &proxy_url), ("http_proxy", &proxy_url), ("ALL_PROXY", &proxy_url), ("all_proxy", &proxy_url)],
    );
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox").unwrap();
    let target = Receiver::start();
    webhook(&mut db, "plain", &target.url("/plain"), &["plain"], json!({}));
    emit(&mut db, "plain", json!({}), None);
    target.wait_for(1, WAIT);
    assert_eq!(env_proxy.requests().len(), 0, "the environment's proxy was used");

    // A name allowed by the list that resolves to a loopback address is
    // refused at connect time, until the network is listed as well.
    set_and_reload(&mut db, "outbox.allowed_hosts", "localhost");
    std::thread::sleep(Duration::from_millis(300));
    let mut db = cluster.connect();
    webhook(&mut db, "named", &format!("http://localhost:{}/named", target.port), &["named"], json!({}));
    emit(&mut db, "named", json!({}), None);
    wait_sql(&mut db, WAIT, "SELECT last_error LIKE '%resolves to%which outbox.allowed_hosts does not allow%' FROM outbox.stats WHERE endpoint = 'named'");
    assert!(target.requests().iter().all(|r| r.path != "/named"), "a loopback address was reached by name");
    set_and_reload(&mut db, "outbox.allowed_hosts", "localhost, 127.0.0.0/8, ::1");
    target.wait_until(WAIT, "the named endpoint", |r| r.iter().any(|x| x.path == "/named"));

    // outbox.http_proxy is used when set.
    set_and_reload(&mut db, "outbox.allowed_hosts", "");
    let proxy = Receiver::start();
    set_and_reload(&mut db, "outbox.http_proxy", &proxy.url(""));
    std::thread::sleep(Duration::from_millis(300));
    emit(&mut db, "plain", json!({"via": "proxy"}), None);
    let got = proxy.wait_for(1, WAIT);
    assert!(got[0].path.starts_with("http://127.0.0.1:"), "a proxy request names the target: {}", got[0].path);
    set_and_reload(&mut db, "outbox.http_proxy", "");
    std::thread::sleep(Duration::from_millis(300));

    // Credentials never follow a redirect to another origin; 302/303 are
    // not followed at all (they would turn the POST into a GET).
    let landing = Receiver::start();
    let redirector = Receiver::start();
    let to_same = redirector.url("/landed");
    let to_other = format!("http://localhost:{}/landed", landing.port);
    redirector.respond(move |r, _| match r.path.as_str() {
        "/same" => Reply::Full { status: 308, headers: vec![("location".into(), to_same.clone())], body: vec![] },
        "/other" => Reply::Full { status: 307, headers: vec![("location".into(), to_other.clone())], body: vec![] },
        "/found" => Reply::Full { status: 302, headers: vec![("location".into(), to_other.clone())], body: vec![] },
        _ => Reply::Status(200),
    });
    let opts = json!({"max_redirects": 2, "headers": {"x-api-key": "k-secret-1"}});
    webhook(&mut db, "same", &redirector.url("/same"), &["same"], opts.clone());
    webhook(&mut db, "other", &redirector.url("/other"), &["other"], opts.clone());
    webhook(&mut db, "found", &redirector.url("/found"), &["found"], opts);
    emit(&mut db, "same", json!({}), None);
    emit(&mut db, "other", json!({}), None);
    emit(&mut db, "found", json!({}), None);
    let same = redirector.wait_until(WAIT, "the same-origin redirect", |r| r.iter().any(|x| x.path == "/landed"));
    let same = same.iter().find(|x| x.path == "/landed").unwrap();
    assert_eq!(same.header("x-api-key"), Some("k-secret-1"), "same origin keeps the endpoint's headers");
    let other = landing.wait_for(1, WAIT);
    assert_eq!(other[0].header("x-api-key"), None, "credentials followed a redirect to another host");
    assert!(other[0].header("webhook-id").is_some());
    wait_sql(
        &mut db,
        WAIT,
        "SELECT last_error LIKE 'HTTP 302%not followed%' FROM outbox.dead_letters WHERE endpoint = 'found'",
    );
    assert_eq!(landing.requests().len(), 1, "a 302 was followed");
}

#[test]
fn errors_and_the_log_never_repeat_option_values_and_answers_are_bounded() {
    let (cluster, mut db) = cluster_with_outbox("noecho");
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    for options in [
        json!(secret),
        json!([secret]),
        json!({"headers": [format!("Bearer {secret}")]}),
        json!({"timeout_ms": secret}),
        json!({"on_dead": secret}),
        json!({"cluster_id": [secret]}),
    ] {
        let err = db
            .execute(
                "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:9/', options => $1::text::jsonb)",
                &[&options.to_string()],
            )
            .unwrap_err();
        let e = err.as_db_error().unwrap();
        assert!(!e.message().contains("MfKQ9r8"), "{}", e.message());
        assert!(!e.hint().unwrap_or("").contains("MfKQ9r8"));
    }
    assert!(!cluster.log().contains("MfKQ9r8"), "a secret reached the server log");

    // A hostile answer: a huge Location, a huge body.
    let rx = Receiver::start();
    let location = format!("http://x/{}", "y".repeat(50_000));
    rx.respond(move |_, _| Reply::Full {
        status: 301,
        headers: vec![("location".into(), location.clone())],
        body: "z".repeat(100_000).into_bytes(),
    });
    webhook(&mut db, "hostile", &rx.url("/"), &["*"], json!({}));
    emit(&mut db, "t", json!({}), None);
    // The dead letter is written at once, the endpoint's last error with
    // its progress (within 10 ms): both are waited for.
    wait_sql(
        &mut db,
        WAIT,
        "SELECT (SELECT count(*) = 1 FROM outbox.dead_letters)
            AND (SELECT pg_catalog.bool_and(last_error IS NOT NULL) FROM outbox.stats)",
    );
    let (in_stats, in_dead): (i32, i32) = {
        let r = db
            .query_one(
                "SELECT pg_catalog.length(s.last_error), pg_catalog.length(d.last_error)
                 FROM outbox.stats AS s, outbox.dead_letters AS d",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(in_stats < 600 && in_dead < 600, "unbounded errors: {in_stats}, {in_dead}");
}

#[test]
fn what_writers_control_is_bounded_and_the_worker_memory_too() {
    let (cluster, mut db) = cluster_with_outbox("bounded");
    for (sql, what) in [
        ("SELECT outbox_emit('t', '{}', pg_catalog.repeat('k', 1025))", "key is 1025 bytes"),
        ("SELECT outbox_emit('t', '{}', 'k', pg_catalog.repeat('t', 257))", "event_type is 257 bytes"),
        (
            "SELECT outbox_emit('t', '{}', 'k', NULL, (SELECT pg_catalog.jsonb_object_agg('h' || i, 'v') FROM pg_catalog.generate_series(1, 65) AS i))",
            "65 headers",
        ),
        (
            "SELECT outbox_emit('t', '{}', 'k', NULL, pg_catalog.jsonb_build_object('h', pg_catalog.repeat('v', 9000)))",
            "headers are about",
        ),
    ] {
        let err = db.batch_execute(sql).unwrap_err();
        let e = err.as_db_error().unwrap();
        assert_eq!(e.code().code(), "22023", "{sql}: {}", e.message());
        assert!(e.message().contains(what), "{}", e.message());
        assert!(e.hint().is_some());
    }

    // 120 events of 512 kB (60 MB) for a slow endpoint, with a window of
    // 4 MB: the worker reads pages that fit the window, not 1,000 rows.
    let rx = Receiver::start();
    rx.respond(|_, _| Reply::After(Duration::from_millis(20), Box::new(Reply::Status(200))));
    set_and_reload(&mut db, "outbox.window_memory", "4MB");
    std::thread::sleep(Duration::from_millis(500)); // the worker takes the reload in
    webhook(&mut db, "slow", &rx.url("/"), &["*"], json!({"max_in_flight": 2}));
    let pid = worker_pid(&mut db);
    let before = private_mb(pid);
    db.batch_execute(
        "SELECT pg_catalog.count(outbox_emit('t', pg_catalog.jsonb_build_object('pad', pg_catalog.repeat(pg_catalog.md5(i::text), 16384)), 'k' || (i % 50)))
         FROM pg_catalog.generate_series(1, 120) AS i",
    )
    .unwrap();
    let mut peak = before;
    let deadline = Instant::now() + Duration::from_secs(120);
    while rx.count() < 120 && Instant::now() < deadline {
        peak = peak.max(private_mb(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(rx.count() >= 120, "only {} of 120 delivered", rx.count());
    println!("worker private memory: {before:.1} MB before, {peak:.1} MB peak");
    assert!(peak - before < 40.0, "the worker held {:.1} MB more for a 4 MB window", peak - before);
    drop(cluster);
}

#[test]
fn the_ordinary_delivery_path_runs_no_planted_code() {
    let cluster = Cluster::start("planted", &["outbox.retention = 1"]);
    let mut root = cluster.connect();
    root.batch_execute(&format!(
        "{LOG_TABLE}
         CREATE EXTENSION outbox;
         CREATE ROLE admin1 LOGIN; GRANT outbox_admin TO admin1;
         CREATE ROLE w1 LOGIN; GRANT outbox_writer TO w1;
         CREATE ROLE creator LOGIN; GRANT CREATE ON SCHEMA public TO creator;
         CREATE TABLE public.orders (id int PRIMARY KEY, status text) ;
         ALTER TABLE public.orders OWNER TO admin1;
         GRANT INSERT, UPDATE, DELETE, SELECT ON public.orders TO w1;"
    ))
    .unwrap();
    // Built-in look-alikes in public (by a role with CREATE there) and in
    // the admin's and the writer's own pg_temp.
    cluster.connect_as("postgres", "creator").batch_execute(&plants("public")).unwrap();
    let mut admin = cluster.connect_as("postgres", "admin1");
    admin.batch_execute(&plants("pg_temp")).unwrap();
    let mut writer = cluster.connect_as("postgres", "w1");
    writer.batch_execute(&plants("pg_temp")).unwrap();

    // Every path: create, capture, emit, deliver, retry, park, dead letter,
    // replay, discard, alter, pause/resume, rotation, drop.
    let rx = Receiver::start();
    let fail_first = std::sync::atomic::AtomicUsize::new(0);
    rx.respond(move |r, _| {
        let v = r.json();
        if v["key"] == "bad" && fail_first.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 6 {
            return Reply::Status(503);
        }
        if v["key"] == "dead" {
            return Reply::Status(400);
        }
        Reply::Status(200)
    });
    let url = rx.url("/");
    admin
        .execute(
            "SELECT outbox.create_endpoint('hooks', $1, options => '{\"backoff_base_ms\": 20, \"backoff_max_ms\": 100, \"secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}')",
            &[&url],
        )
        .unwrap();
    admin
        .batch_execute(
            "SELECT outbox.capture('public.orders', condition => 'NEW.id > 0', operations => '{insert,update}')",
        )
        .unwrap();
    writer
        .batch_execute(
            "INSERT INTO public.orders VALUES (1, 'new'); UPDATE public.orders SET status = 'paid' WHERE id = 1;",
        )
        .unwrap();
    for key in ["a", "bad", "dead", "a"] {
        writer.execute("SELECT outbox_emit('t', '{\"x\": 1}', $1)", &[&key]).unwrap();
    }
    let mut check = cluster.connect();
    check.batch_execute("SET search_path = pg_catalog").unwrap();
    wait_sql(&mut check, WAIT, "SELECT dead = 1 AND delivered >= 5 FROM outbox.stats");
    admin.batch_execute("SELECT outbox.replay(endpoint => 'hooks')").unwrap();
    wait_sql(&mut check, WAIT, "SELECT dead = 1 AND failed_attempts >= 8 FROM outbox.stats");
    admin.batch_execute("SELECT outbox.discard(endpoint => 'hooks')").unwrap();
    admin.batch_execute("SELECT outbox.alter_endpoint('hooks', '{\"timeout_ms\": 5000}')").unwrap();
    admin.batch_execute("SELECT outbox.pause_endpoint('hooks'); SELECT outbox.resume_endpoint('hooks');").unwrap();
    let _ = admin.query("SELECT * FROM outbox.stats", &[]).unwrap();
    let _ = admin.query("SELECT * FROM outbox.dead_letters", &[]).unwrap();
    // Rotation (retention 1 s): the other table becomes current.
    wait_sql(&mut check, WAIT, "SELECT slot = 1 FROM outbox.rotation WHERE current");
    writer.execute("SELECT outbox_emit('t', '{\"after\": \"rotation\"}', 'a')", &[]).unwrap();
    wait_sql(&mut check, WAIT, "SELECT pending = 0 FROM outbox.stats");
    admin.batch_execute("SELECT outbox.uncapture('public.orders'); SELECT outbox.drop_endpoint('hooks');").unwrap();
    nothing_gained(&mut check, &["admin1", "w1", "creator"]);
}

#[test]
fn only_a_database_owner_can_make_its_worker_leave() {
    // A statement that needs the database free of connections lets the
    // worker go only for its own duration, and only for the database's
    // owner or a superuser; a refused or rolled-back one changes nothing.
    let cluster = Cluster::start("release", &["outbox.databases = 'app'"]);
    let mut root = cluster.connect();
    root.batch_execute("CREATE ROLE nobody LOGIN").unwrap();
    root.batch_execute("CREATE DATABASE app").unwrap();
    let mut db = cluster.connect_db("app");
    db.batch_execute("CREATE EXTENSION outbox").unwrap();
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    let pid = worker_pid(&mut db);

    let mut nobody = cluster.connect_as("postgres", "nobody");
    for sql in [
        "DO $$BEGIN BEGIN ALTER DATABASE app RENAME TO x1; EXCEPTION WHEN OTHERS THEN END; END$$",
        "DO $$BEGIN BEGIN ALTER DATABASE app SET TABLESPACE pg_default; EXCEPTION WHEN OTHERS THEN END; END$$",
    ] {
        nobody.batch_execute(sql).unwrap();
    }
    assert!(nobody.batch_execute("DROP DATABASE app").is_err());
    // A superuser's statement that fails inside a transaction block.
    root.batch_execute("BEGIN; SAVEPOINT s;").unwrap();
    assert!(root.batch_execute("DROP DATABASE app").is_err());
    root.batch_execute("ROLLBACK TO s; COMMIT;").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(worker_pid(&mut db), pid, "the worker was made to leave");
    emit(&mut db, "t", json!({}), None);
    rx.wait_for(1, WAIT);

    // The owner's DROP DATABASE works, without stopping the server.
    drop(db);
    root.batch_execute("DROP DATABASE app").unwrap();
}

#[test]
fn a_database_owner_cannot_take_over_a_qualified_emit_nor_break_the_worker_with_settings() {
    let cluster = Cluster::start("extschema", &["outbox.databases = 'app'"]);
    let mut root = cluster.connect();
    root.batch_execute("CREATE ROLE appowner LOGIN").unwrap();
    root.batch_execute("CREATE DATABASE app OWNER appowner").unwrap();
    let mut db = cluster.connect_db("app");
    db.batch_execute(LOG_TABLE).unwrap();
    // outbox_emit lands in public, which the owner controls: a warning says
    // so, and outbox.emit is there to call instead.
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let n = notices.clone();
    let mut db = {
        let mut config = postgres::Config::new();
        config.host("127.0.0.1").port(cluster.port).user("postgres").dbname("app");
        config
            .notice_callback(move |notice| n.lock().unwrap().push(notice.message().to_string()))
            .connect(postgres::NoTls)
            .unwrap()
    };
    db.batch_execute("CREATE EXTENSION outbox").unwrap();
    assert!(
        notices.lock().unwrap().iter().any(|m| m.contains("outbox_emit is in schema public")),
        "{:?}",
        notices.lock().unwrap()
    );
    let rx = Receiver::start();
    webhook(&mut db, "hooks", &rx.url("/"), &["*"], json!({}));
    let mut owner = cluster.connect_as("app", "appowner");
    owner
        .batch_execute(&format!(
            "{}
             CREATE FUNCTION public.outbox_emit(topic text, payload text) RETURNS uuid LANGUAGE plpgsql AS $f$
             BEGIN PERFORM public.note('outbox_emit(text, text)'); RETURN NULL; END $f$;
             ALTER DATABASE app SET standard_conforming_strings = off;",
            note_function("public")
        ))
        .unwrap();
    // The qualified call cannot be taken over.
    let id: String = db.query_one("SELECT outbox.emit('t', '{\"via\": \"outbox.emit\"}')::text", &[]).unwrap().get(0);
    assert_eq!(id.len(), 36);
    // A worker that connects anew with the owner's settings still works.
    root.batch_execute(
        "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'outbox worker'",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let got = rx.wait_for(1, WAIT);
    assert_eq!(got[0].json()["data"]["via"], "outbox.emit");
    let mut check = cluster.connect_db("app");
    check.batch_execute("SET standard_conforming_strings = on").unwrap();
    assert!(ran(&mut check).is_empty());
    wait_sql(&mut check, WAIT, "SELECT pending = 0 FROM outbox.stats");
}

#[test]
fn writers_cannot_forge_identity_headers_nor_pass_payload_limits_through_capture() {
    let (cluster, mut db) = cluster_with_outbox("forge");
    for name in ["outbox-id", "outbox-type", "ce_id", "ce-type", "webhook-id"] {
        let err = db
            .execute("SELECT outbox_emit('t', '{}', 'k', NULL, jsonb_build_object($1::text, 'forged'))", &[&name])
            .unwrap_err();
        assert_eq!(err.as_db_error().unwrap().code().code(), "22023", "{name}");
    }
    db.batch_execute("CREATE TABLE docs (id int PRIMARY KEY, body text); SELECT outbox.capture('docs');").unwrap();
    db.batch_execute("SET outbox.max_payload_size = '64kB'").unwrap();
    let err = db.batch_execute("INSERT INTO docs VALUES (1, repeat('x', 100000))").unwrap_err();
    let e = err.as_db_error().unwrap();
    assert_eq!(e.code().code(), "54000", "{}", e.message());
    assert!(e.message().contains("max_payload_size"), "{}", e.message());
    drop(cluster);
}

#[test]
fn payloads_that_grow_as_text_do_not_blow_the_window() {
    // Control characters print as six-byte escapes: 150 events of 300 kB
    // each become 270 MB of text, for an endpoint that never answers.
    let cluster = Cluster::start("expand", &["outbox.window_memory = '16MB'"]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox").unwrap();
    let rx = Receiver::start();
    rx.respond(|_, _| Reply::Hang);
    webhook(&mut db, "slow", &rx.url("/"), &["*"], json!({"timeout_ms": 60000, "max_in_flight": 4}));
    let pid = worker_pid(&mut db);
    let before = private_mb(pid);
    db.batch_execute(
        "SELECT pg_catalog.count(outbox_emit('big', pg_catalog.to_jsonb(pg_catalog.repeat(pg_catalog.chr(1), 300000)), 'k' || i))
         FROM pg_catalog.generate_series(1, 150) AS i",
    )
    .unwrap();
    let mut peak = before;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        peak = peak.max(private_mb(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("worker private memory: {before:.1} MB before, {peak:.1} MB peak");
    assert!(peak - before < 80.0, "a 16 MB window held {:.1} MB", peak - before);
}
