//! Every function of the SQL surface, fed bad arguments: each call fails
//! with a clear error that names the offending value, and nothing changes.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::*;

/// (SQL, SQLSTATE, texts the message must contain)
const CASES: &[(&str, &str, &[&str])] = &[
    // outbox_emit
    ("SELECT outbox_emit(NULL, '{}')", "22004", &["outbox_emit: topic must not be null"]),
    ("SELECT outbox_emit('', '{}')", "22023", &["topic must not be empty"]),
    ("SELECT outbox_emit('a b', '{}')", "22023", &["\"a b\"", "' '"]),
    ("SELECT outbox_emit('orders.*', '{}')", "22023", &["\"orders.*\"", "'*'"]),
    ("SELECT outbox_emit(repeat('x', 300), '{}')", "22023", &["300 characters"]),
    ("SELECT outbox_emit('t', NULL)", "22004", &["payload must not be null"]),
    ("SELECT outbox_emit('t', 'not json')", "22P02", &["json"]),
    ("SELECT outbox_emit('t', '{}', headers => '\"x\"')", "22023", &["headers must be a JSON object, got a string"]),
    ("SELECT outbox_emit('t', '{}', headers => '{\"a\": [1]}')", "22023", &["header \"a\"", "got an array"]),
    ("SELECT outbox_emit(1, 2)", "42883", &["outbox_emit"]),
    // create_endpoint
    ("SELECT outbox.create_endpoint(NULL, 'http://127.0.0.1:1/')", "22004", &["name must not be null"]),
    ("SELECT outbox.create_endpoint('e', NULL)", "22004", &["url must not be null"]),
    ("SELECT outbox.create_endpoint('e', 'not a url')", "22023", &["\"not a url\""]),
    ("SELECT outbox.create_endpoint('e', 'file:///etc/passwd')", "22023", &["\"file:///etc/passwd\"", "http or https"]),
    ("SELECT outbox.create_endpoint('e', 'http://u:p@127.0.0.1/')", "22023", &["credentials"]),
    ("SELECT outbox.create_endpoint('e e', 'http://127.0.0.1:1/')", "22023", &["\"e e\""]),
    ("SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', 'smtp')", "22023", &["\"smtp\""]),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', topics => '{}')",
        "22023",
        &["topics must not be empty"],
    ),
    ("SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', topics => '{\"a b\"}')", "22023", &["\"a b\""]),
    ("SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', topics => '{[x]}')", "22023", &["\"[x]\""]),
    ("SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"bogus\": 1}')", "22023", &["\"bogus\""]),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"backoff_base_ms\": -1}')",
        "22023",
        &["backoff_base_ms", "-1"],
    ),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"max_attempts\": 0}')",
        "22023",
        &["max_attempts", "got 0"],
    ),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"timeout_ms\": 1000000000}')",
        "22023",
        &["timeout_ms", "1000000000"],
    ),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"max_in_flight\": 100000}')",
        "22023",
        &["max_in_flight", "100000"],
    ),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"backoff_max_ms\": 1.5}')",
        "22023",
        &["backoff_max_ms", "1.5"],
    ),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"linger_ms\": -5}')",
        "22023",
        &["linger_ms", "-5"],
    ),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', 'kafka_rest_v2', options => '{\"batch_size\": 0}')",
        "22023",
        &["batch_size", "got 0"],
    ),
    ("SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', 'kafka_rest_v3')", "22023", &["cluster_id"]),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"on_dead\": \"explode\"}')",
        "22023",
        &["on_dead", "one of block, skip, got a string"],
    ),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"secret\": \"hunter2\"}')",
        "22023",
        &["whsec_"],
    ),
    (
        "SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '{\"headers\": {\"host\": \"x\"}}')",
        "22023",
        &["\"host\""],
    ),
    ("SELECT outbox.create_endpoint('e', 'http://127.0.0.1:1/', options => '[1]')", "22023", &["got an array"]),
    // the other endpoint functions
    ("SELECT outbox.alter_endpoint('ghost', '{}')", "42704", &["\"ghost\""]),
    ("SELECT outbox.alter_endpoint('existing', '{\"timeout_ms\": 0}')", "22023", &["timeout_ms", "got 0"]),
    ("SELECT outbox.alter_endpoint('existing', url => 'ftp://x/')", "22023", &["\"ftp://x/\""]),
    ("SELECT outbox.alter_endpoint('existing', topics => '{NULL}')", "22004", &["topics"]),
    ("SELECT outbox.drop_endpoint('ghost')", "42704", &["\"ghost\""]),
    ("SELECT outbox.pause_endpoint('ghost')", "42704", &["\"ghost\""]),
    ("SELECT outbox.resume_endpoint(NULL)", "22004", &["name must not be null"]),
    ("SELECT outbox.replay()", "22023", &["say which dead letters"]),
    ("SELECT outbox.replay(endpoint => 'ghost')", "42704", &["\"ghost\""]),
    ("SELECT outbox.discard(endpoint => 'ghost')", "42704", &["\"ghost\""]),
    ("SELECT outbox.replay(event_id => 'not-a-uuid')", "22P02", &["not-a-uuid"]),
    // capture
    ("SELECT outbox.capture(NULL)", "22004", &["table must not be null"]),
    ("SELECT outbox.capture('no_such_table')", "42P01", &["no_such_table"]),
    ("SELECT outbox.capture('a_view')", "42809", &["a_view", "not a table"]),
    ("SELECT outbox.capture('plain')", "22023", &["plain", "no primary key"]),
    ("SELECT outbox.capture('plain', key_columns => '{nope}')", "42703", &["nope"]),
    ("SELECT outbox.capture('plain', key_columns => '{a}', columns => '{\"x; drop\"}')", "42703", &["\"x; drop\""]),
    ("SELECT outbox.capture('plain', key_columns => '{a}', operations => '{truncate}')", "22023", &["{truncate}"]),
    ("SELECT outbox.capture('plain', key_columns => '{a}', topic => 'a b')", "22023", &["\"a b\""]),
    ("SELECT outbox.capture('plain', key_columns => '{a}', condition => 'NEW.a >')", "22023", &["invalid condition"]),
    (
        "SELECT outbox.capture('plain', key_columns => '{a}', condition => 'true) EXECUTE FUNCTION now() --')",
        "22023",
        &["condition"],
    ),
    ("SELECT outbox.uncapture('plain')", "42704", &["plain", "not captured"]),
];

/// Everything the extension keeps, as one comparable text.
const STATE: &str = "SELECT concat_ws('|',
    (SELECT string_agg(row_to_json(e)::text, ',' ORDER BY id) FROM outbox.endpoints AS e),
    (SELECT string_agg(row_to_json(c)::text, ',' ORDER BY tbl) FROM outbox.captures AS c),
    (SELECT count(*) FROM outbox.events),
    (SELECT count(*) FROM outbox.parked),
    (SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger WHERE NOT tgisinternal))";

#[test]
fn every_bad_argument_fails_clearly_and_changes_nothing() {
    let (_cluster, mut db) = cluster_with_outbox("badinput");
    db.batch_execute(
        "CREATE TABLE plain (a int, b text);
         CREATE VIEW a_view AS SELECT 1 AS x;
         SELECT outbox.create_endpoint('existing', 'http://127.0.0.1:9/');",
    )
    .unwrap();
    let before: String = db.query_one(STATE, &[]).unwrap().get(0);
    let mut failures = Vec::new();
    for (sql, state, texts) in CASES {
        match db.batch_execute(sql) {
            Ok(()) => failures.push(format!("{sql}: succeeded")),
            Err(e) => {
                let db_error = e.as_db_error().expect("a server error");
                let message = format!("{} {}", db_error.message(), db_error.hint().unwrap_or(""));
                if db_error.code().code() != *state {
                    failures.push(format!("{sql}: SQLSTATE {} (wanted {state}): {message}", db_error.code().code()));
                }
                for t in *texts {
                    if !message.contains(t) {
                        failures.push(format!("{sql}: {message:?} does not mention {t:?}"));
                    }
                }
            }
        }
        let after: String = db.query_one(STATE, &[]).unwrap().get(0);
        if after != before {
            failures.push(format!("{sql}: changed the state"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}

#[test]
fn hostile_identifiers_cannot_inject_through_capture() {
    let (_cluster, mut db) = cluster_with_outbox("hostile");
    db.batch_execute(
        r#"CREATE TABLE victim (id int PRIMARY KEY);
           INSERT INTO victim VALUES (1);
           CREATE SCHEMA "s'; DROP TABLE victim; --";
           CREATE TABLE "s'; DROP TABLE victim; --"."t"" ); DROP TABLE victim; --" (
               "k'); DROP TABLE victim; --" int PRIMARY KEY,
               "$$ DROP TABLE victim $$" text);"#,
    )
    .unwrap();
    let table = r#""s'; DROP TABLE victim; --"."t"" ); DROP TABLE victim; --""#;
    db.execute(
        "SELECT outbox.capture($1::text::regclass, topic => 'hostile', columns => ARRAY['k''); DROP TABLE victim; --', '$$ DROP TABLE victim $$'])",
        &[&table],
    )
    .unwrap();
    db.batch_execute(&format!(r#"INSERT INTO {table} VALUES (1, 'x'); UPDATE {table} SET "$$ DROP TABLE victim $$" = 'y'; DELETE FROM {table};"#))
        .unwrap();
    let events: i64 = db.query_one("SELECT count(*) FROM outbox.events WHERE topic = 'hostile'", &[]).unwrap().get(0);
    assert_eq!(events, 3);
    let key: String =
        db.query_one("SELECT key FROM outbox.events WHERE topic = 'hostile' LIMIT 1", &[]).unwrap().get(0);
    assert_eq!(key, "1");
    let victim: i64 = db.query_one("SELECT count(*) FROM victim", &[]).unwrap().get(0);
    assert_eq!(victim, 1, "the victim table survived");
    db.execute("SELECT outbox.uncapture($1::text::regclass)", &[&table]).unwrap();
}
