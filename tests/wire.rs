//! Wire formats end to end: Kafka REST v2/v3 (and Redpanda's variant) into
//! a real Kafka-protocol broker, Standard Webhooks signatures checked by an
//! independent verifier, CloudEvents, HTTPS certificate checks.
#![cfg(not(feature = "pg_test"))]

use base64::Engine as _;
use hmac::{Hmac, Mac};
use outbox_testkit::kafka::{Api, Broker, Consumed, RestProxy, CLUSTER_ID};
use outbox_testkit::*;
use serde_json::json;
use sha2::Sha256;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Check what the broker holds: every event once or more, and per key the
/// first occurrences in commit order (1, 2, 3, ...). Returns the
/// duplicates.
fn check_topic(records: &[Consumed], expected: i64) -> usize {
    let mut seen = HashSet::new();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut partitions_of_key: BTreeMap<String, HashSet<i32>> = BTreeMap::new();
    for r in records {
        let id = r.value["id"].as_str().expect("the record value is the envelope").to_string();
        let key = r.key.clone().expect("keyed");
        partitions_of_key.entry(key.clone()).or_default().insert(r.partition);
        if seen.insert(id) {
            per_key.entry(key).or_default().push(r.value["data"]["n"].as_i64().unwrap());
        }
    }
    assert_eq!(seen.len() as i64, expected, "every committed event is in Kafka");
    for (key, ns) in &per_key {
        let want: Vec<i64> = (1..=ns.len() as i64).collect();
        assert_eq!(ns, &want, "{key}: not in commit order");
        assert_eq!(partitions_of_key[key].len(), 1, "{key}: one key, one partition");
        assert_eq!(serde_json::from_str::<String>(key).unwrap(), r_key(records, key));
    }
    records.len() - seen.len()
}

fn r_key(records: &[Consumed], key: &str) -> String {
    let r = records.iter().find(|r| r.key.as_deref() == Some(key)).unwrap();
    r.value["key"].as_str().unwrap().to_string()
}

#[test]
fn kafka_rest_v2_batches_into_the_broker_in_per_key_order() {
    let broker = Broker::start();
    broker.create_topic("orders");
    let proxy = RestProxy::start(&broker, Api::ConfluentV2);
    let (cluster, mut db) = cluster_with_outbox("kafka-v2");
    endpoint(&mut db, "kafka", "kafka_rest_v2", &proxy.url(), &["orders"], json!({"batch_size": 50}));
    // Some records are refused as retriable on the way: those, and only
    // those, are sent again.
    proxy.fail_next.store(7, std::sync::atomic::Ordering::SeqCst);
    let n = concurrent_load(&cluster, "orders", 75);
    wait_sql(&mut db, WAIT_LONG, &format!("SELECT delivered = {n} AND pending = 0 FROM outbox.stats"));
    let records = broker.consume("orders");
    let dups = check_topic(&records, n);
    assert_eq!(dups, 0, "partial failures resend only the failed records");
    let requests = proxy.http.requests().len() as i64;
    println!("{n} events in {requests} Kafka REST v2 requests");
    assert!(requests < n, "records are batched");
    let failed: i64 = db.query_one("SELECT failed_attempts FROM outbox.stats", &[]).unwrap().get(0);
    assert_eq!(failed, 7);
}

#[test]
fn kafka_rest_v3_sends_records_with_headers() {
    let broker = Broker::start();
    broker.create_topic("orders");
    let proxy = RestProxy::start(&broker, Api::ConfluentV3);
    let (cluster, mut db) = cluster_with_outbox("kafka-v3");
    endpoint(&mut db, "kafka", "kafka_rest_v3", &proxy.url(), &["orders"], json!({"cluster_id": CLUSTER_ID}));
    proxy.fail_next.store(3, std::sync::atomic::Ordering::SeqCst);
    let n = concurrent_load(&cluster, "orders", 40);
    wait_sql(&mut db, WAIT_LONG, &format!("SELECT delivered = {n} AND pending = 0 FROM outbox.stats"));
    let records = broker.consume("orders");
    assert_eq!(check_topic(&records, n), 0);
    let r = &records[0];
    assert_eq!(r.headers["outbox-id"], r.value["id"].as_str().unwrap());
    assert_eq!(r.headers["outbox-type"], "counted");
    assert_eq!(r.headers["h"], "v", "event headers become record headers");
    assert!(proxy.http.requests().iter().all(|q| q.path == format!("/v3/clusters/{CLUSTER_ID}/topics/orders/records")));
}

#[test]
fn redpanda_flavor_retries_whole_batches() {
    let broker = Broker::start();
    broker.create_topic("orders");
    let proxy = RestProxy::start(&broker, Api::RedpandaV2);
    let (cluster, mut db) = cluster_with_outbox("redpanda");
    endpoint(&mut db, "rp", "kafka_rest_v2", &proxy.url(), &["orders"], json!({"flavor": "redpanda"}));
    proxy.fail_next.store(2, std::sync::atomic::Ordering::SeqCst);
    let n = concurrent_load(&cluster, "orders", 25);
    wait_sql(&mut db, WAIT_LONG, &format!("SELECT delivered = {n} AND pending = 0 FROM outbox.stats"));
    let dups = check_topic(&broker.consume("orders"), n);
    println!("redpanda: {dups} duplicates from whole-batch retries");
    let error: String = db.query_one("SELECT last_error FROM outbox.stats", &[]).unwrap().get(0);
    assert!(error.contains("Redpanda HTTP Proxy: partition 0: Kafka error 5"), "{error}");
}

#[test]
fn kafka_rest_errors_are_clear_in_dead_letters() {
    let broker = Broker::start();
    broker.create_topic("orders");
    let v2 = RestProxy::start(&broker, Api::ConfluentV2);
    let v3 = RestProxy::start(&broker, Api::ConfluentV3);
    let (_cluster, mut db) = cluster_with_outbox("kafka-errors");
    endpoint(&mut db, "v2", "kafka_rest_v2", &v2.url(), &["missing"], json!({}));
    endpoint(&mut db, "v3", "kafka_rest_v3", &v3.url(), &["orders"], json!({"cluster_id": "nope"}));
    endpoint(&mut db, "v2-any", "kafka_rest_v2", &v2.url(), &["bad:*"], json!({}));
    emit(&mut db, "missing", json!({}), Some("k"));
    emit(&mut db, "orders", json!({}), Some("k"));
    emit(&mut db, "bad:topic", json!({}), Some("k"));
    wait_sql(&mut db, WAIT_LONG, "SELECT count(*) = 3 FROM outbox.dead_letters");
    let errors: BTreeMap<String, String> = db
        .query("SELECT endpoint, last_error FROM outbox.dead_letters", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(errors["v2"], "Kafka REST HTTP 404 Not Found: error_code 40401: Topic not found.");
    assert_eq!(errors["v3"], "Kafka REST HTTP 404 Not Found: error_code 404: Cluster nope cannot be found.");
    assert!(errors["v2-any"].contains("not a valid Kafka topic"), "{}", errors["v2-any"]);
}

/// An independent Standard Webhooks verifier: the spec, not our code.
fn verify(secret_b64: &str, r: &Request) -> bool {
    let key = base64::engine::general_purpose::STANDARD.decode(secret_b64).unwrap();
    let (id, ts) = (r.header("webhook-id").unwrap(), r.header("webhook-timestamp").unwrap());
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    let expected = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    r.header("webhook-signature").unwrap_or("").split(' ').any(|s| s == expected)
}

#[test]
fn standard_webhooks_signatures_verify_and_secrets_stay_secret() {
    let (cluster, mut db) = cluster_with_outbox("signatures");
    let rx = Receiver::start();
    let old = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let new = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
    webhook(&mut db, "signed", &rx.url("/"), &["*"], json!({"secret": format!("whsec_{old}")}));
    let id = emit(&mut db, "t", json!({"n": 1}), Some("k"));
    let got = rx.wait_for(1, WAIT_LONG);
    assert_eq!(got[0].header("webhook-id"), Some(id.as_str()));
    assert!(verify(old, &got[0]));
    let ts: u64 = got[0].header("webhook-timestamp").unwrap().parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(now.abs_diff(ts) < 60);

    // Rotation: both keys sign while consumers move over.
    db.execute(
        "SELECT outbox.alter_endpoint('signed', jsonb_build_object('secret', jsonb_build_array($1::text, $2::text)))",
        &[&format!("whsec_{new}"), &format!("whsec_{old}")],
    )
    .unwrap();
    emit(&mut db, "t", json!({"n": 2}), Some("k"));
    let got = rx.wait_for(2, WAIT_LONG);
    assert_eq!(got[1].header("webhook-signature").unwrap().split(' ').count(), 2);
    assert!(verify(old, &got[1]) && verify(&new, &got[1]));
    let mut tampered = got[1].clone();
    tampered.body.push(b' ');
    assert!(!verify(old, &tampered), "the verifier checks the body");

    // A rejected secret is not repeated in the error; secrets show nowhere
    // but in the admin-only endpoints table. (Passed as a bind parameter,
    // as the README asks: PostgreSQL logs failing statements' text.)
    let bad = json!({"secret": "whsec_s3cr3t-not-base64!"}).to_string();
    let err = db.execute("SELECT outbox.alter_endpoint('signed', $1::text::jsonb)", &[&bad]).unwrap_err();
    let text = format!("{err:?}");
    assert!(!text.contains("s3cr3t"), "{text}");
    let stats: String = db.query_one("SELECT row_to_json(s)::text FROM outbox.stats AS s", &[]).unwrap().get(0);
    assert!(!stats.contains(old) && !stats.contains(&new));
    let log = cluster.log();
    assert!(!log.contains(old) && !log.contains(&new) && !log.contains("s3cr3t"), "a secret reached the server log");
}

#[test]
fn cloudevents_binary_structured_and_batched() {
    let (_cluster, mut db) = cluster_with_outbox("cloudevents");
    let rx = Receiver::start();
    webhook(&mut db, "binary", &rx.url("/binary"), &["*"], json!({"cloudevents": "binary"}));
    webhook(&mut db, "structured", &rx.url("/structured"), &["*"], json!({"cloudevents": "structured"}));
    webhook(
        &mut db,
        "batch",
        &rx.url("/batch"),
        &["*"],
        json!({"cloudevents": "structured", "batch_size": 10, "linger_ms": 200}),
    );
    db.execute("SELECT outbox.pause_endpoint('batch')", &[]).unwrap();
    let id = emit(&mut db, "orders.created", json!({"total": 5}), Some("o-1"));
    for i in 0..5 {
        emit(&mut db, "orders.created", json!({"i": i}), Some(&format!("k{i}")));
    }
    db.execute("SELECT outbox.resume_endpoint('batch')", &[]).unwrap();
    let got = rx.wait_until(WAIT_LONG, "all", |r| {
        let by = |p: &str| r.iter().filter(|x| x.path == p).count();
        by("/binary") == 6
            && by("/structured") == 6
            && r.iter().filter(|x| x.path == "/batch").map(|x| x.json().as_array().map_or(0, Vec::len)).sum::<usize>()
                >= 6
    });
    let binary = got.iter().find(|r| r.path == "/binary" && r.header("ce-id") == Some(id.as_str())).unwrap();
    assert_eq!(binary.header("ce-specversion"), Some("1.0"));
    assert_eq!(binary.header("ce-type"), Some("orders.created"));
    assert_eq!(binary.header("ce-source"), Some("/outbox/postgres"));
    assert_eq!(binary.header("ce-subject"), Some("o-1"));
    assert!(binary.header("ce-time").unwrap().ends_with('Z'));
    assert_eq!(binary.json(), json!({"total": 5}));

    let structured = got.iter().find(|r| r.path == "/structured" && r.json()["id"] == id.as_str()).unwrap();
    assert_eq!(structured.header("content-type"), Some("application/cloudevents+json; charset=utf-8"));
    let ce = structured.json();
    assert_eq!(
        (ce["specversion"].as_str(), ce["type"].as_str(), ce["subject"].as_str()),
        (Some("1.0"), Some("orders.created"), Some("o-1"))
    );
    assert_eq!(ce["data"], json!({"total": 5}));

    let batches: Vec<&Request> = got.iter().filter(|r| r.path == "/batch").collect();
    assert!(batches
        .iter()
        .all(|b| b.header("content-type") == Some("application/cloudevents-batch+json; charset=utf-8")));
    assert!(batches.iter().any(|b| b.json().as_array().unwrap().len() > 1), "events were batched");
}

/// A one-request-at-a-time HTTPS server with a self-signed certificate:
/// the server, its certificate (PEM) and how many requests it answered.
fn tls_server() -> (Receiver, String, Arc<std::sync::Mutex<usize>>) {
    let (server, pem) = Receiver::start_https();
    let served = Arc::new(std::sync::Mutex::new(0));
    let count = served.clone();
    server.respond(move |_, _| {
        *count.lock().unwrap() += 1;
        Reply::Status(200)
    });
    (server, pem, served)
}

#[test]
fn https_checks_certificates_unless_the_ca_is_configured() {
    let (server, pem, served) = tls_server();
    let port = server.port;
    let (_cluster, mut db) = cluster_with_outbox("https");
    webhook(&mut db, "tls", &format!("https://127.0.0.1:{port}/hook"), &["*"], json!({}));
    emit(&mut db, "t", json!({}), Some("k"));
    wait_sql(&mut db, WAIT_LONG, "SELECT last_error IS NOT NULL AND delivered = 0 FROM outbox.stats");
    let error: String = db.query_one("SELECT last_error FROM outbox.stats", &[]).unwrap().get(0);
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert_eq!(*served.lock().unwrap(), 0);

    db.execute("SELECT outbox.alter_endpoint('tls', jsonb_build_object('ca_cert', $1::text))", &[&pem]).unwrap();
    wait_sql(&mut db, WAIT_LONG, "SELECT delivered = 1 AND pending = 0 FROM outbox.stats");
    assert_eq!(*served.lock().unwrap(), 1);
}

#[test]
fn http2_carries_many_requests_on_one_connection_in_per_key_order() {
    let (_cluster, mut db) = cluster_with_outbox("http2");
    let h2 = H2Receiver::start();
    webhook(&mut db, "h2", &h2.url("/h2"), &["t"], json!({"http_version": "2", "max_in_flight": 32}));
    // 20 keys, 10 events each, one transaction per round.
    for seq in 0..10 {
        db.execute(
            "SELECT count(outbox_emit('t', jsonb_build_object('seq', $1::int), 'k' || i)) FROM generate_series(1, 20) AS i",
            &[&seq],
        )
        .unwrap();
    }
    let got = h2.wait_for(200, WAIT);
    let mut per_key: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for r in &got {
        let body = r.json();
        per_key
            .entry(body["key"].as_str().unwrap().to_string())
            .or_default()
            .push(body["data"]["seq"].as_i64().unwrap());
    }
    assert_eq!(per_key.len(), 20);
    for (key, seqs) in &per_key {
        assert_eq!(seqs, &(0..10).collect::<Vec<i64>>(), "order of key {key}");
    }
    // Many requests at once on a connection: with HTTP/1.1 the 32 in
    // flight would need 32 connections. (Requests that start together
    // before the first connection is up may open a second one.)
    assert!(h2.connections() <= 2, "{} HTTP/2 connections for 32 requests in flight", h2.connections());

    // '1.1' to a receiver that only speaks HTTP/1.1, and a bad value.
    let rx = Receiver::start();
    webhook(&mut db, "h1", &rx.url("/h1"), &["u"], json!({"http_version": "1.1"}));
    emit(&mut db, "u", json!({}), Some("k"));
    rx.wait_for(1, WAIT);
    let err = db
        .execute(
            "SELECT outbox.create_endpoint('bad', 'http://127.0.0.1:9/', options => '{\"http_version\": \"3\"}')",
            &[],
        )
        .unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("http_version must be one of auto, 1.1, 2"), "{err}");
}

#[test]
fn kept_alive_connections_the_server_closes_cost_no_attempt() {
    let (_cluster, mut db) = cluster_with_outbox("closing");
    let rx = Receiver::start();
    // Every answer ends its connection unannounced: the worker finds the
    // connection it kept closed, either before it sends on it or after.
    rx.respond(|_, _| Reply::ThenClose(Box::new(Reply::Status(200))));
    webhook(
        &mut db,
        "closing",
        &rx.url("/"),
        &["t"],
        json!({"max_in_flight": 4, "backoff_base_ms": 60000, "backoff_max_ms": 60000}),
    );
    for seq in 0..20 {
        db.execute(
            "SELECT count(outbox_emit('t', jsonb_build_object('seq', $1::int), 'k' || i)) FROM generate_series(1, 10) AS i",
            &[&seq],
        )
        .unwrap();
    }
    wait_sql(&mut db, WAIT, "SELECT (delivered = 200 AND pending = 0) OR failed_attempts > 0 FROM outbox.stats");
    let (failed, error): (i64, Option<String>) = {
        let r = db.query_one("SELECT failed_attempts, last_error FROM outbox.stats", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((failed, error), (0, None), "a closed kept-alive connection is no failed delivery");
    let got = rx.requests();
    let ids: HashSet<String> = got.iter().map(|r| r.json()["id"].as_str().unwrap().to_string()).collect();
    assert_eq!((got.len(), ids.len()), (200, 200), "each event once");
    assert!(rx.connections() >= 200, "{} connections: the receiver did not close them", rx.connections());
}
