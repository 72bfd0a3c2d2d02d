//! Feature: monitoring with what operators already run. The real
//! prometheus-postgres-exporter, given monitoring/queries.yaml and a login
//! role that is a member of pg_monitor, exports what outbox.stats says;
//! monitoring/alerts.yml passes promtool's checks and its unit tests.
#![cfg(not(feature = "pg_test"))]

use outbox_testkit::exporter::{exporter_binary, Exporter, Metrics};
use outbox_testkit::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// One row of outbox.stats, as the test reads it.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    endpoint: String,
    kind: String,
    state: String,
    pending: i64,
    in_flight: i32,
    retrying: i64,
    delivered: i64,
    failed_attempts: i64,
    dead: i64,
    inexact_order_batches: i64,
    /// Seconds; changes with now(), so not part of "settled".
    oldest_pending_age: Option<f64>,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    last_success_at: Option<f64>,
    last_error_at: Option<f64>,
}

fn stats(db: &mut postgres::Client) -> Vec<Row> {
    db.query(
        "SELECT endpoint, kind, state, pending, in_flight, retrying, delivered,
                failed_attempts, dead, inexact_order_batches,
                extract(epoch FROM oldest_pending_age)::float8, latency_p50_ms, latency_p99_ms,
                extract(epoch FROM last_success_at)::float8, extract(epoch FROM last_error_at)::float8
         FROM outbox.stats ORDER BY endpoint",
        &[],
    )
    .expect("read outbox.stats")
    .iter()
    .map(|r| Row {
        endpoint: r.get(0),
        kind: r.get(1),
        state: r.get(2),
        pending: r.get(3),
        in_flight: r.get(4),
        retrying: r.get(5),
        delivered: r.get(6),
        failed_attempts: r.get(7),
        dead: r.get(8),
        inexact_order_batches: r.get(9),
        oldest_pending_age: r.get(10),
        latency_p50_ms: r.get(11),
        latency_p99_ms: r.get(12),
        last_success_at: r.get(13),
        last_error_at: r.get(14),
    })
    .collect()
}

/// The same figures, the age left out.
fn settled(before: &[Row], after: &[Row]) -> bool {
    let strip =
        |rows: &[Row]| -> Vec<Row> { rows.iter().map(|r| Row { oldest_pending_age: None, ..r.clone() }).collect() };
    strip(before) == strip(after)
}

fn monitoring_file(name: &str) -> PathBuf {
    project_root().join("monitoring").join(name)
}

/// Every outbox metric queries.yaml defines, with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("outbox_pending", "gauge"),
    ("outbox_in_flight", "gauge"),
    ("outbox_retrying", "gauge"),
    ("outbox_delivered_total", "counter"),
    ("outbox_failed_attempts_total", "counter"),
    ("outbox_dead_letters", "gauge"),
    ("outbox_inexact_order_batches_total", "counter"),
    ("outbox_oldest_pending_age_seconds", "gauge"),
    ("outbox_latency_p50_seconds", "gauge"),
    ("outbox_latency_p99_seconds", "gauge"),
    ("outbox_last_success_timestamp_seconds", "gauge"),
    ("outbox_last_error_timestamp_seconds", "gauge"),
    ("outbox_endpoint_status", "gauge"),
    ("outbox_worker_up", "gauge"),
];

const STATES: [&str; 3] = ["active", "paused", "disabled"];

#[test]
fn the_exporter_reports_what_outbox_stats_says() {
    exporter_binary(); // there, or fail now with how to get it
    let (cluster, mut db) = cluster_with_outbox("monitoring");
    db.batch_execute("CREATE ROLE outbox_monitor LOGIN; GRANT pg_monitor TO outbox_monitor;").unwrap();

    // ok accepts everything; strict rejects "bad" events (dead letters,
    // and with on_dead = block the next event of that key waits); gone
    // answers 410 (disabled); down is a closed port (retrying); paused is
    // a Kafka endpoint paused before anything is emitted.
    let rx = Receiver::start();
    rx.respond(|r, _| match r.path.as_str() {
        "/gone" => Reply::Status(410),
        "/strict" if r.json()["data"]["bad"] == true => {
            Reply::Full { status: 422, headers: vec![], body: b"{\"error\": \"no such customer\"}".to_vec() }
        }
        _ => Reply::Status(200),
    });
    let closed = free_port();
    webhook(&mut db, "ok", &rx.url("/ok"), &["orders"], json!({}));
    webhook(&mut db, "strict", &rx.url("/strict"), &["orders"], json!({}));
    webhook(&mut db, "gone", &rx.url("/gone"), &["orders"], json!({}));
    // A long backoff, so that its failed attempts stop changing while the
    // test compares.
    webhook(
        &mut db,
        "down",
        &format!("http://127.0.0.1:{closed}/hooks"),
        &["orders"],
        json!({"backoff_base_ms": 60_000, "backoff_max_ms": 60_000}),
    );
    db.batch_execute(&format!(
        "SELECT outbox.create_endpoint('paused', 'kafka://127.0.0.1:{closed}', 'kafka', '{{orders}}');
         SELECT outbox.pause_endpoint('paused');"
    ))
    .unwrap();

    emit(&mut db, "orders", json!({"n": 1}), Some("a"));
    emit(&mut db, "orders", json!({"n": 2, "bad": true}), Some("b"));
    emit(&mut db, "orders", json!({"n": 3}), Some("b"));
    emit(&mut db, "orders", json!({"n": 4}), Some("c"));

    let expected = "SELECT count(*) = 5 AND bool_and(CASE endpoint
             WHEN 'ok' THEN delivered = 4 AND pending = 0 AND state = 'active'
             WHEN 'strict' THEN delivered = 2 AND dead = 1 AND pending = 1
             WHEN 'gone' THEN state = 'disabled' AND pending = 4
             WHEN 'down' THEN retrying > 0 AND pending = 4 AND in_flight = 0 AND last_error IS NOT NULL
             WHEN 'paused' THEN state = 'paused' AND pending = 4 END)
         FROM outbox.stats";
    let deadline = Instant::now() + WAIT;
    while !db.query_one(expected, &[]).unwrap().get::<_, bool>(0) {
        assert!(Instant::now() < deadline, "outbox.stats did not reach the scenario: {:#?}", stats(&mut db));
        std::thread::sleep(Duration::from_millis(50));
    }

    let queries = monitoring_file("queries.yaml");
    let exporter = Exporter::start(
        &format!("postgresql://outbox_monitor@127.0.0.1:{}/postgres?sslmode=disable", cluster.port),
        &[
            &format!("--extend.query-path={}", queries.display()),
            "--disable-default-metrics",
            "--disable-settings-metrics",
            "--no-collector.database",
            "--no-collector.bgwriter",
        ],
    );

    // The exporter's view must be the one outbox.stats gives at the same
    // time: read the view before and after a scrape, until nothing moved
    // in between (the age aside, which grows with the clock).
    let mut monitor = cluster.connect_as("postgres", "outbox_monitor");
    let deadline = Instant::now() + WAIT;
    let (before, metrics, after) = loop {
        let before = stats(&mut monitor);
        let text = exporter.scrape();
        let after = stats(&mut monitor);
        if settled(&before, &after) {
            break (before, Metrics::parse(&text), after);
        }
        assert!(Instant::now() < deadline, "outbox.stats kept changing:\n{before:#?}\n{after:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = exporter.log();
    let ctx = || format!("exporter log:\n{log}");
    // URLs (a webhook URL often carries its token) and endpoints' words are
    // not the monitoring role's to read, nor to export.
    let denied = monitor.query("SELECT url FROM outbox.stats", &[]).unwrap_err();
    assert_eq!(denied.code(), Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE));
    let words: Vec<(String, String, Option<String>)> = db
        .query("SELECT endpoint, url, last_error FROM outbox.stats", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();

    // The exporter itself: connected, every query ran, the file loaded.
    assert_eq!(metrics.value("pg_up", &[]), 1.0, "{}", ctx());
    assert_eq!(metrics.value("pg_exporter_last_scrape_error", &[]), 0.0, "{}", ctx());
    let file = queries.display().to_string();
    assert_eq!(metrics.value("pg_exporter_user_queries_load_error", &[("filename", &file)]), 0.0, "{}", ctx());
    assert_eq!(metrics.value("outbox_worker_up", &[("database", "postgres")]), 1.0);

    // Only the families queries.yaml defines, with their types.
    let outbox: Vec<_> = metrics.samples.iter().filter(|s| s.name.starts_with("outbox_")).collect();
    let names: BTreeSet<&str> = outbox.iter().map(|s| s.name.as_str()).collect();
    let defined: BTreeSet<&str> = FAMILIES.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, defined, "outbox metrics exported");
    for (name, kind) in FAMILIES {
        assert_eq!(metrics.types.get(*name).map(String::as_str), Some(*kind), "# TYPE of {name}");
    }

    // Labels: database, endpoint, kind (state on the status only), and the
    // exporter's own server. Never a url or an error text.
    for s in &outbox {
        let keys: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
        let mut allowed = BTreeSet::from(["server", "database"]);
        if s.name != "outbox_worker_up" {
            allowed.extend(["endpoint", "kind"]);
        }
        if s.name == "outbox_endpoint_status" {
            allowed.insert("state");
        }
        assert_eq!(keys, allowed, "labels of {s:?}");
        for (endpoint, url, last_error) in &words {
            for v in s.labels.values() {
                assert!(!v.contains(url.as_str()), "{s:?} carries the url of {endpoint}");
                assert!(last_error.as_ref().is_none_or(|e| v != e), "{s:?} carries the last error of {endpoint}");
            }
        }
    }
    assert_eq!(metrics.value("outbox_endpoint_status", &[("endpoint", "down"), ("state", "active")]), 1.0);

    // Every endpoint, every figure.
    let exported: BTreeSet<&str> = metrics.named("outbox_pending").filter_map(|s| s.label("endpoint")).collect();
    let listed: BTreeSet<&str> = after.iter().map(|r| r.endpoint.as_str()).collect();
    assert_eq!(exported, listed);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    for (b, a) in before.iter().zip(&after) {
        let l = [("database", "postgres"), ("endpoint", a.endpoint.as_str()), ("kind", a.kind.as_str())];
        let got = |name: &str| metrics.value(name, &l);
        let e = &a.endpoint;
        assert_eq!(got("outbox_pending"), a.pending as f64, "{e} pending");
        assert_eq!(got("outbox_in_flight"), a.in_flight as f64, "{e} in_flight");
        assert_eq!(got("outbox_retrying"), a.retrying as f64, "{e} retrying");
        assert_eq!(got("outbox_delivered_total"), a.delivered as f64, "{e} delivered");
        assert_eq!(got("outbox_failed_attempts_total"), a.failed_attempts as f64, "{e} failed_attempts");
        assert_eq!(got("outbox_dead_letters"), a.dead as f64, "{e} dead");
        assert_eq!(got("outbox_inexact_order_batches_total"), a.inexact_order_batches as f64, "{e} inexact");
        let age = got("outbox_oldest_pending_age_seconds");
        let (lo, hi) = (b.oldest_pending_age.unwrap_or(0.0), a.oldest_pending_age.unwrap_or(0.0));
        assert!(lo - 1e-6 <= age && age <= hi + 1e-6, "{e} oldest pending age {age}, outbox.stats {lo}..{hi}");
        for (name, ms) in
            [("outbox_latency_p50_seconds", a.latency_p50_ms), ("outbox_latency_p99_seconds", a.latency_p99_ms)]
        {
            let v = got(name);
            match ms {
                None => assert!(v.is_nan(), "{e} {name} {v}: no deliveries yet"),
                Some(ms) => assert!(close(v, ms / 1000.0), "{e} {name} {v}, outbox.stats {ms} ms"),
            }
        }
        for (name, at) in [
            ("outbox_last_success_timestamp_seconds", a.last_success_at),
            ("outbox_last_error_timestamp_seconds", a.last_error_at),
        ] {
            let v = got(name);
            assert!(close(v, at.unwrap_or(0.0)), "{e} {name} {v}, outbox.stats {at:?}");
        }
        for state in STATES {
            let v = metrics.value("outbox_endpoint_status", &[l[0], l[1], l[2], ("state", state)]);
            assert_eq!(
                v,
                f64::from(u8::from(a.state == state)),
                "{e} status{{state={state}}}, outbox.stats {}",
                a.state
            );
        }
    }

    // What the scenario made, as the exporter shows it.
    let of = |name: &str, endpoint: &str| metrics.value(name, &[("endpoint", endpoint)]);
    assert_eq!(of("outbox_delivered_total", "ok"), 4.0);
    assert!(of("outbox_latency_p99_seconds", "ok") >= of("outbox_latency_p50_seconds", "ok"));
    assert_eq!(of("outbox_dead_letters", "strict"), 1.0);
    assert!(of("outbox_retrying", "down") > 0.0 && of("outbox_failed_attempts_total", "down") > 0.0);
    assert!(of("outbox_oldest_pending_age_seconds", "paused") > 0.0);
    for (endpoint, state) in [("ok", "active"), ("gone", "disabled"), ("paused", "paused")] {
        assert_eq!(metrics.value("outbox_endpoint_status", &[("endpoint", endpoint), ("state", state)]), 1.0);
    }
}

/// promtool (Debian package prometheus): the rule file is valid and its
/// alerts fire as monitoring/alerts_test.yml says.
#[test]
fn alert_rules_pass_promtool() {
    let promtool = std::env::var_os("OUTBOX_PROMTOOL").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/promtool".into());
    assert!(
        promtool.exists(),
        "{} is missing: `make setup` installs it (Debian package prometheus; make test runs setup)",
        promtool.display()
    );
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(monitoring_file("")).output().expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
