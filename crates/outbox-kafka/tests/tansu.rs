//! Against a real Kafka-protocol broker (Tansu 0.6, memory storage).

mod common;

use common::*;
use outbox_kafka::{partition_for_key, Compression, Config, Delivered, ProduceError, Producer, Record};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn config(addr: &str) -> Config {
    let mut c = Config::new(vec![addr.to_string()]);
    c.client_id = "outbox-kafka-test".into();
    c.request_timeout = Duration::from_secs(10);
    c.connect_timeout = Duration::from_secs(2);
    // Tansu creates a topic on a metadata request that allows it.
    c.allow_auto_create_topics = false;
    c
}

fn record(key: &str, i: usize) -> Record {
    Record {
        key: Some(key.as_bytes().to_vec()),
        value: format!("{{\"key\":\"{key}\",\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 40)).into_bytes(),
        headers: vec![("seq".into(), i.to_string().into_bytes()), ("source".into(), b"outbox".to_vec())],
        timestamp_ms: 1_700_000_000_000 + i as i64,
    }
}

fn all_ok(results: &[Result<Delivered, ProduceError>]) -> Vec<Delivered> {
    results.iter().map(|r| r.clone().unwrap_or_else(|e| panic!("not delivered: {e}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_over_fifty_keys() {
    let broker = Tansu::start();
    let admin = admin(&broker.addr, None).await;
    create_topic(&admin, "events", 3).await;

    let mut cfg = config(&broker.addr);
    // Small requests, so that each partition's records span several batches.
    cfg.max_request_bytes = 64 * 1024;
    let producer = Producer::new(cfg);
    let records: Vec<Record> = (0..10_000).map(|i| record(&format!("key-{}", i % 50), i)).collect();
    let results = producer.send("events", records.clone()).await;
    assert_eq!(results.len(), records.len());
    let delivered = all_ok(&results);
    for (r, d) in records.iter().zip(&delivered) {
        assert_eq!(d.partition, partition_for_key(r.key.as_ref().unwrap(), 3));
        assert!(d.offset >= 0);
    }

    let consumed = consume_all(&admin, "events", 3).await;
    assert_eq!(consumed.len(), 10_000);
    // Offsets reported = where the records are.
    let by_position: BTreeMap<(i32, i64), &Consumed> = consumed.iter().map(|c| ((c.partition, c.offset), c)).collect();
    for (r, d) in records.iter().zip(&delivered) {
        let c = by_position[&(d.partition, d.offset)];
        assert_eq!(c.key, r.key);
        assert_eq!(c.value, r.value);
        assert_eq!(c.timestamp_ms, r.timestamp_ms);
        let headers: BTreeMap<String, Vec<u8>> = r.headers.iter().cloned().collect();
        assert_eq!(c.headers, headers);
    }
    // Per key: all in partition_for_key, in input order.
    let mut per_key: BTreeMap<Vec<u8>, Vec<&Consumed>> = BTreeMap::new();
    for c in &consumed {
        per_key.entry(c.key.clone().unwrap()).or_default().push(c);
    }
    assert_eq!(per_key.len(), 50);
    for (key, cs) in per_key {
        let want_partition = partition_for_key(&key, 3);
        let seqs: Vec<usize> = cs
            .iter()
            .map(|c| {
                assert_eq!(c.partition, want_partition);
                String::from_utf8(c.headers["seq"].clone()).unwrap().parse().unwrap()
            })
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "per-key order");
        assert_eq!(seqs.len(), 200);
    }
    producer.close().await;
}

/// Tansu's API versions as the client negotiates them (printed, and the
/// ones idempotence needs asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_offers_idempotence_apis() {
    use kafka_protocol::messages::ApiVersionsRequest;
    let broker = Tansu::start();
    let mut raw = Raw::connect(&broker.addr).await;
    let r = raw.call(&ApiVersionsRequest::default(), 0).await;
    let get = |key: i16| r.api_keys.iter().find(|k| k.api_key == key).map(|k| (k.min_version, k.max_version));
    for (key, name) in [
        (0, "Produce"),
        (3, "Metadata"),
        (17, "SaslHandshake"),
        (18, "ApiVersions"),
        (22, "InitProducerId"),
        (36, "SaslAuthenticate"),
    ] {
        println!("{name} ({key}): {:?}", get(key));
    }
    assert!(get(22).is_some_and(|(_, max)| max >= 3), "InitProducerId v3+");
    assert!(get(0).is_some_and(|(_, max)| max >= 7), "Produce v7+");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_codec() {
    let broker = Tansu::start();
    let admin = admin(&broker.addr, None).await;
    let codecs = [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];
    for codec in codecs {
        let topic = format!("codec-{codec:?}").to_lowercase();
        create_topic(&admin, &topic, 3).await;
        let mut cfg = config(&broker.addr);
        cfg.compression = codec;
        let producer = Producer::new(cfg);
        let records: Vec<Record> = (0..3000).map(|i| record(&format!("k{}", i % 11), i)).collect();
        let delivered = all_ok(&producer.send(&topic, records.clone()).await);
        // A second call: batches after the first carry later sequence numbers.
        let more: Vec<Record> = (3000..3100).map(|i| record(&format!("k{}", i % 11), i)).collect();
        let delivered_more = all_ok(&producer.send(&topic, more.clone()).await);
        let consumed = consume_all(&admin, &topic, 3).await;
        assert_eq!(consumed.len(), 3100, "{codec:?}");
        let by_position: BTreeMap<(i32, i64), &Consumed> =
            consumed.iter().map(|c| ((c.partition, c.offset), c)).collect();
        for (r, d) in records.iter().chain(&more).zip(delivered.iter().chain(&delivered_more)) {
            let c = by_position[&(d.partition, d.offset)];
            assert_eq!((&c.key, &c.value, c.timestamp_ms), (&r.key, &r.value, r.timestamp_ms), "{codec:?}");
            assert_eq!(c.headers["seq"], r.headers[0].1);
        }
        producer.close().await;
    }
}

/// One key, 20,000 records in sends of 500, one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_key_rate() {
    let broker = Tansu::start();
    let admin = admin(&broker.addr, None).await;
    create_topic(&admin, "hot", 3).await;
    let producer = Producer::new(config(&broker.addr));
    let value = vec![b'v'; 200];
    // Warm up: connect, metadata, producer id.
    all_ok(&producer.send("hot", vec![Record::new(Some(b"warm".to_vec()), value.clone())]).await);
    let started = Instant::now();
    let mut offsets = Vec::new();
    for batch in 0..40 {
        let records: Vec<Record> = (0..500)
            .map(|i| Record {
                key: Some(b"the-hot-key".to_vec()),
                value: value.clone(),
                headers: vec![("n".into(), (batch * 500 + i).to_string().into_bytes())],
                timestamp_ms: -1,
            })
            .collect();
        offsets.extend(all_ok(&producer.send("hot", records).await));
    }
    let elapsed = started.elapsed();
    let rate = 20_000.0 / elapsed.as_secs_f64();
    println!(
        "hot key: 20000 records in sends of 500 in {:.3} s = {:.0} records/s ({} build)",
        elapsed.as_secs_f64(),
        rate,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    let p = partition_for_key(b"the-hot-key", 3);
    assert!(offsets.iter().all(|d| d.partition == p));
    assert!(offsets.windows(2).all(|w| w[1].offset == w[0].offset + 1), "consecutive offsets");
    let consumed: Vec<Consumed> =
        consume_all(&admin, "hot", 3).await.into_iter().filter(|c| c.key.as_deref() == Some(b"the-hot-key")).collect();
    assert_eq!(consumed.len(), 20_000);
    for (i, c) in consumed.iter().enumerate() {
        assert_eq!(c.headers["n"], i.to_string().into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_then_restarted() {
    let mut broker = Tansu::start();
    let admin_client = admin(&broker.addr, None).await;
    create_topic(&admin_client, "events", 3).await;
    let mut cfg = config(&broker.addr);
    cfg.request_timeout = Duration::from_secs(5);
    let producer = Producer::new(cfg);
    let batch = |n: usize| (0..n).map(|i| record(&format!("k{}", i % 5), i)).collect::<Vec<_>>();
    all_ok(&producer.send("events", batch(100)).await);

    broker.kill();
    let started = Instant::now();
    let results = producer.send("events", batch(10)).await;
    let took = started.elapsed();
    for r in &results {
        assert!(matches!(r, Err(ProduceError::Unreachable { .. })), "{r:?}");
    }
    println!("while down: {} after {took:?}", results[0].as_ref().unwrap_err());
    assert!(took <= Duration::from_secs(6), "bounded by request_timeout: {took:?}");

    broker.restart();
    // Memory storage: the topic (and the producer id) are gone.
    let admin_client = admin(&broker.addr, None).await;
    let results = producer.send("events", batch(3)).await;
    assert!(results.iter().all(|r| r.as_ref().unwrap_err().name() == "UNKNOWN_TOPIC_OR_PARTITION"), "{results:?}");
    create_topic(&admin_client, "events", 3).await;
    // The broker forgot our producer id (UNKNOWN_PRODUCER_ID): the producer
    // takes a new one and carries on.
    let records = batch(200);
    let delivered = all_ok(&producer.send("events", records.clone()).await);
    let consumed = consume_all(&admin_client, "events", 3).await;
    assert_eq!(consumed.len(), 200);
    for (r, d) in records.iter().zip(&delivered) {
        let c = consumed.iter().find(|c| c.partition == d.partition && c.offset == d.offset).unwrap();
        assert_eq!(c.value, r.value);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_is_fatal() {
    // With allow_auto_create_topics = false (Tansu honours it).
    let broker = Tansu::start();
    let producer = Producer::new(config(&broker.addr));
    let started = Instant::now();
    let results = producer.send("no-such-topic", vec![record("k", 1), record("j", 2)]).await;
    for r in &results {
        match r {
            Err(ProduceError::Fatal { code: 3, name: "UNKNOWN_TOPIC_OR_PARTITION", .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_is_auto_created_when_allowed() {
    let broker = Tansu::start();
    let mut cfg = config(&broker.addr);
    cfg.allow_auto_create_topics = true;
    let producer = Producer::new(cfg);
    let delivered = all_ok(&producer.send("created-on-demand", vec![record("k", 1)]).await);
    assert_eq!(delivered[0].offset, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_too_large_is_fatal_and_others_still_go() {
    let broker = Tansu::start();
    let admin = admin(&broker.addr, None).await;
    create_topic(&admin, "big", 1).await;
    let producer = Producer::new(config(&broker.addr));
    let mut huge = record("k", 1);
    huge.value = vec![b'x'; 20 * 1024 * 1024];
    let results = producer.send("big", vec![record("k", 0), huge, record("k", 2)]).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    match &results[1] {
        Err(ProduceError::Fatal { code: 10, name: "MESSAGE_TOO_LARGE", message }) => println!("{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(results[2].as_ref().unwrap().offset, results[0].as_ref().unwrap().offset + 1);
}

/// Tansu enforces idempotent sequences: a batch whose response was lost is
/// re-sent with the same producer id and sequence, the broker answers
/// DUPLICATE_SEQUENCE_NUMBER, and the log holds it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_response_is_not_duplicated() {
    let front_port = free_port();
    let broker = Tansu::start_with(&[], Some(format!("127.0.0.1:{front_port}")));
    let front = Front::start(front_port, broker.addr.clone(), None).await;
    let admin_client = admin(&broker.addr, None).await;
    create_topic(&admin_client, "idem", 1).await;

    let producer = Producer::new(config(&format!("127.0.0.1:{front_port}")));
    all_ok(&producer.send("idem", vec![record("k", 0)]).await);
    front.drop_produce_responses.store(1, std::sync::atomic::Ordering::SeqCst);
    let results = producer.send("idem", (1..=50).map(|i| record("k", i)).collect()).await;
    all_ok(&results);
    assert_eq!(front.drop_produce_responses.load(std::sync::atomic::Ordering::SeqCst), 0, "a response was dropped");
    all_ok(&producer.send("idem", (51..=60).map(|i| record("k", i)).collect()).await);

    let consumed = consume_all(&admin_client, "idem", 1).await;
    let seqs: Vec<String> = consumed.iter().map(|c| String::from_utf8(c.headers["seq"].clone()).unwrap()).collect();
    assert_eq!(seqs, (0..=60).map(|i| i.to_string()).collect::<Vec<_>>(), "each record once, in order");
}

/// Several tasks producing to one key at once: each task's records keep
/// their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_keep_their_order() {
    let broker = Tansu::start();
    let admin_client = admin(&broker.addr, None).await;
    create_topic(&admin_client, "shared", 3).await;
    let producer = Producer::new(config(&broker.addr));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..25 {
                let records = (0..40)
                    .map(|i| Record {
                        key: Some(b"same-key".to_vec()),
                        value: format!("{t}:{}", b * 40 + i).into_bytes(),
                        headers: vec![],
                        timestamp_ms: -1,
                    })
                    .collect();
                all_ok(&producer.send("shared", records).await);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let consumed = consume_all(&admin_client, "shared", 3).await;
    assert_eq!(consumed.len(), 4000);
    let mut last = [-1i64; 4];
    for c in consumed {
        let v = String::from_utf8(c.value).unwrap();
        let (t, n) = v.split_once(':').unwrap();
        let (t, n): (usize, i64) = (t.parse().unwrap(), n.parse().unwrap());
        assert_eq!(n, last[t] + 1, "task {t} out of order");
        last[t] = n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_records_spread_round_robin() {
    let broker = Tansu::start();
    let admin_client = admin(&broker.addr, None).await;
    create_topic(&admin_client, "spread", 3).await;
    let producer = Producer::new(config(&broker.addr));
    let mut partitions = std::collections::BTreeSet::new();
    for i in 0..6 {
        let results =
            all_ok(&producer.send("spread", vec![Record::new(None, vec![i]), Record::new(None, vec![i])]).await);
        assert_eq!(results[0].partition, results[1].partition, "one partition per call (sticky)");
        assert_eq!(results[1].offset, results[0].offset + 1);
        partitions.insert(results[0].partition);
    }
    assert_eq!(partitions.len(), 3);
}
