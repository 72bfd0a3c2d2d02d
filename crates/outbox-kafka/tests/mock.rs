//! Error paths against a scripted Kafka-protocol broker (requests decoded,
//! responses encoded with kafka-protocol): timeouts, lost responses,
//! sequence errors, splitting, fatal codes, oversized frames, SASL.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{decode_request_header_from_buffer, Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol::records::RecordBatchDecoder;
use outbox_kafka::{Config, Delivered, Mechanism, ProduceError, Producer, Record, Sasl};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOPIC: &str = "t";

#[derive(Clone, Debug)]
struct Produced {
    partition: i32,
    producer_id: i64,
    epoch: i16,
    base_sequence: i32,
    count: i32,
    bytes: Bytes,
}

#[allow(dead_code)]
enum Reply {
    Ok,
    Code(i16),
    /// Never answer.
    Hang,
    /// Close the connection without answering (after taking the batch).
    Close,
    /// Answer with a length prefix of 2 GiB - 1.
    HugeFrame,
    /// Refuse with this code and message.
    Said(i16, String),
    /// Accept, at this base offset.
    At(i64),
    /// Accept, the response listing this many other topics (named
    /// "other-topic-" and 28 digits) first.
    Among(usize),
}

type Script = Box<dyn FnMut(&Produced, usize) -> Reply + Send>;

#[derive(Default)]
struct Log {
    produced: Vec<Produced>,
    init_producer_id: usize,
    metadata: usize,
    next_offset: HashMap<i32, i64>,
    next_pid: i64,
}

struct Mock {
    addr: String,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Options {
    partitions: i32,
    script: Script,
    /// A server for one SASL mechanism.
    sasl: Option<(&'static str, Arc<dyn SaslServer>)>,
    /// The API (key) whose every response says its first array holds
    /// 2^31 - 1 (or 2^32 - 2, compact) elements, and ends there.
    hostile: Option<i16>,
}

/// A server side of SASL, one exchange per connection.
trait SaslServer: Send + Sync {
    /// The reply to a client message, or Err(message) to refuse.
    fn step(&self, state: &mut Vec<u8>, input: &[u8]) -> Result<(Vec<u8>, bool), String>;
}

impl Mock {
    async fn start(opts: Options) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Log { next_pid: 1000, ..Default::default() }));
        let shared = Arc::new(Shared {
            port,
            partitions: opts.partitions,
            script: Mutex::new(opts.script),
            sasl: opts.sasl,
            hostile: opts.hostile,
            log: log.clone(),
        });
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.spawn(serve(s, shared.clone()));
            }
        });
        Mock { addr: format!("127.0.0.1:{port}"), log, task }
    }

    fn produced(&self) -> Vec<Produced> {
        self.log.lock().unwrap().produced.clone()
    }
}

struct Shared {
    port: u16,
    partitions: i32,
    script: Mutex<Script>,
    sasl: Option<(&'static str, Arc<dyn SaslServer>)>,
    hostile: Option<i16>,
    log: Arc<Mutex<Log>>,
}

async fn respond<R: Encodable + HeaderVersion>(s: &mut TcpStream, correlation: i32, version: i16, resp: R) {
    let mut buf = BytesMut::new();
    ResponseHeader::default().with_correlation_id(correlation).encode(&mut buf, R::header_version(version)).unwrap();
    resp.encode(&mut buf, version).unwrap();
    let _ = s.write_all(&(buf.len() as i32).to_be_bytes()).await;
    let _ = s.write_all(&buf).await;
}

/// A well-formed start of the response to `key` at `version`, then the
/// length of its first array at the largest the field holds, then nothing.
async fn hostile_answer(s: &mut TcpStream, key: i16, version: i16, correlation: i32) {
    // (first flexible version, the fields before the first array)
    let (flexible_from, before): (i16, &[u8]) = match key {
        18 => (3, &[0, 0]),        // ApiVersions: error code
        3 => (9, &[0, 0, 0, 0]),   // Metadata: throttle time
        0 => (9, &[]),             // Produce: the topics come first
        17 => (i16::MAX, &[0, 0]), // SaslHandshake: error code
        other => panic!("no array leads the response to API {other}"),
    };
    let flexible = version >= flexible_from;
    let mut frame = correlation.to_be_bytes().to_vec();
    if flexible && key != 18 {
        frame.push(0); // the response header's tagged fields (ApiVersions' header has none)
    }
    frame.extend_from_slice(before);
    if flexible {
        frame.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // varint 2^32 - 1: 2^32 - 2 elements
    } else {
        frame.extend_from_slice(&i32::MAX.to_be_bytes());
    }
    let _ = s.write_all(&(frame.len() as i32).to_be_bytes()).await;
    let _ = s.write_all(&frame).await;
}

async fn serve(mut s: TcpStream, sh: Arc<Shared>) {
    let mut sasl_state = Vec::new();
    let mut mechanism_ok = false;
    loop {
        let Ok(len) = s.read_i32().await else { return };
        let mut frame = vec![0u8; len as usize];
        if s.read_exact(&mut frame).await.is_err() {
            return;
        }
        let mut buf = Bytes::from(frame);
        let header = decode_request_header_from_buffer(&mut buf).unwrap();
        let (key, version, corr) = (header.request_api_key, header.request_api_version, header.correlation_id);
        if sh.hostile == Some(key) {
            hostile_answer(&mut s, key, version, corr).await;
            continue;
        }
        match key {
            18 => {
                let keys = [(0, 3, 11), (3, 0, 12), (17, 0, 1), (18, 0, 3), (22, 0, 4), (36, 0, 2)]
                    .iter()
                    .map(|&(k, min, max)| {
                        ApiVersion::default().with_api_key(k).with_min_version(min).with_max_version(max)
                    })
                    .collect();
                respond(&mut s, corr, version, ApiVersionsResponse::default().with_api_keys(keys)).await;
            }
            3 => {
                MetadataRequest::decode(&mut buf, version).unwrap();
                sh.log.lock().unwrap().metadata += 1;
                let partitions = (0..sh.partitions)
                    .map(|p| MetadataResponsePartition::default().with_partition_index(p).with_leader_id(BrokerId(1)))
                    .collect();
                let resp = MetadataResponse::default()
                    .with_brokers(vec![MetadataResponseBroker::default()
                        .with_node_id(BrokerId(1))
                        .with_host(StrBytes::from_static_str("127.0.0.1"))
                        .with_port(sh.port as i32)])
                    .with_topics(vec![MetadataResponseTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_static_str(TOPIC))))
                        .with_partitions(partitions)]);
                respond(&mut s, corr, version, resp).await;
            }
            22 => {
                let pid = {
                    let mut log = sh.log.lock().unwrap();
                    log.init_producer_id += 1;
                    log.next_pid += 1;
                    log.next_pid
                };
                respond(&mut s, corr, version, InitProducerIdResponse::default().with_producer_id(ProducerId(pid)))
                    .await;
            }
            17 => {
                let req = SaslHandshakeRequest::decode(&mut buf, version).unwrap();
                let offered = sh.sasl.as_ref().map(|(m, _)| *m).unwrap_or("");
                mechanism_ok = req.mechanism.as_str() == offered;
                let resp = SaslHandshakeResponse::default()
                    .with_error_code(if mechanism_ok { 0 } else { 33 })
                    .with_mechanisms(vec![StrBytes::from_static_str(offered)]);
                respond(&mut s, corr, version, resp).await;
            }
            36 => {
                let req = SaslAuthenticateRequest::decode(&mut buf, version).unwrap();
                let server = sh.sasl.as_ref().map(|(_, s)| s.clone());
                let resp = match server.filter(|_| mechanism_ok).map(|srv| srv.step(&mut sasl_state, &req.auth_bytes)) {
                    Some(Ok((reply, _done))) => SaslAuthenticateResponse::default().with_auth_bytes(Bytes::from(reply)),
                    Some(Err(m)) => SaslAuthenticateResponse::default()
                        .with_error_code(58)
                        .with_error_message(Some(StrBytes::from_string(m))),
                    None => SaslAuthenticateResponse::default().with_error_code(34),
                };
                respond(&mut s, corr, version, resp).await;
            }
            0 => {
                let req = ProduceRequest::decode(&mut buf, version).unwrap();
                assert_eq!(req.acks, -1, "acks=all");
                let mut responses = Vec::new();
                let mut others = 0;
                for t in &req.topic_data {
                    let mut parts = Vec::new();
                    for p in &t.partition_data {
                        let bytes = p.records.clone().unwrap();
                        let info = RecordBatchDecoder::decode_batch_info(&mut bytes.clone()).unwrap();
                        assert_eq!(info.len(), 1, "one batch per partition");
                        let i = &info[0];
                        let produced = Produced {
                            partition: p.index,
                            producer_id: i.producer_id,
                            epoch: i.producer_epoch,
                            base_sequence: i.base_sequence,
                            count: i.record_count,
                            bytes,
                        };
                        let nth = {
                            let mut log = sh.log.lock().unwrap();
                            log.produced.push(produced.clone());
                            log.produced.len() - 1
                        };
                        let reply = (sh.script.lock().unwrap())(&produced, nth);
                        let mut message = None;
                        let (code, base) = match reply {
                            Reply::Ok | Reply::Among(_) => {
                                if let Reply::Among(n) = reply {
                                    others = n;
                                }
                                let mut log = sh.log.lock().unwrap();
                                let next = log.next_offset.entry(p.index).or_insert(0);
                                let base = *next;
                                *next += produced.count as i64;
                                (0, base)
                            }
                            Reply::At(base) => (0, base),
                            Reply::Code(c) => (c, -1),
                            Reply::Said(c, m) => {
                                message = Some(StrBytes::from_string(m));
                                (c, -1)
                            }
                            Reply::Hang => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                            Reply::Close => return,
                            Reply::HugeFrame => {
                                let _ = s.write_all(&i32::MAX.to_be_bytes()).await;
                                let _ = s.write_all(&[0u8; 64]).await;
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                        };
                        parts.push(
                            PartitionProduceResponse::default()
                                .with_index(p.index)
                                .with_error_code(code)
                                .with_base_offset(base)
                                .with_error_message(
                                    message.or((code != 0).then(|| StrBytes::from_static_str("scripted"))),
                                ),
                        );
                    }
                    responses.push(
                        TopicProduceResponse::default().with_name(t.name.clone()).with_partition_responses(parts),
                    );
                }
                let mut listed: Vec<_> = (0..others)
                    .map(|i| {
                        TopicProduceResponse::default()
                            .with_name(TopicName(StrBytes::from_string(format!("other-topic-{i:028}"))))
                    })
                    .collect();
                listed.append(&mut responses);
                let responses = listed;
                respond(&mut s, corr, version, ProduceResponse::default().with_responses(responses)).await;
            }
            other => panic!("unexpected API {other}"),
        }
    }
}

fn opts(script: impl FnMut(&Produced, usize) -> Reply + Send + 'static) -> Options {
    Options { partitions: 1, script: Box::new(script), sasl: None, hostile: None }
}

fn config(addr: &str) -> Config {
    let mut c = Config::new(vec![addr.to_string()]);
    c.request_timeout = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(1);
    c
}

fn records(n: usize, size: usize) -> Vec<Record> {
    (0..n).map(|i| Record::new(Some(b"k".to_vec()), format!("{i:0size$}").into_bytes())).collect()
}

fn ok(results: &[Result<Delivered, ProduceError>]) -> Vec<Delivered> {
    results.iter().map(|r| r.clone().unwrap_or_else(|e| panic!("{e}"))).collect()
}

#[tokio::test]
async fn hanging_broker_is_bounded_by_the_timeouts() {
    // Accepts connections, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut cfg = config(&addr);
    cfg.request_timeout = Duration::from_secs(2);
    cfg.connect_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let results = Producer::new(cfg).send(TOPIC, records(3, 10)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2600), "{took:?}");
    for r in &results {
        assert!(matches!(r, Err(ProduceError::Unreachable { .. })), "{r:?}");
    }
}

#[tokio::test]
async fn produce_that_never_returns_is_retriable_within_request_timeout() {
    let mock = Mock::start(opts(|_, _| Reply::Hang)).await;
    let mut cfg = config(&mock.addr);
    cfg.request_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let results = Producer::new(cfg).send(TOPIC, records(3, 10)).await;
    assert!(started.elapsed() < Duration::from_millis(2600), "{:?}", started.elapsed());
    for r in &results {
        match r {
            Err(ProduceError::Retriable { name: "REQUEST_TIMED_OUT", .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn not_leader_refreshes_metadata_and_retries() {
    let mock = Mock::start(opts(|_, nth| if nth == 0 { Reply::Code(6) } else { Reply::Ok })).await;
    let producer = Producer::new(config(&mock.addr));
    let d = ok(&producer.send(TOPIC, records(5, 10)).await);
    assert_eq!(d.iter().map(|d| d.offset).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert!(mock.log.lock().unwrap().metadata >= 2, "metadata refreshed");
    let p = mock.produced();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].bytes, p[1].bytes, "the same batch again");
}

#[tokio::test]
async fn lost_response_resends_the_same_batch_and_duplicate_is_success() {
    let mock = Mock::start(opts(|_, nth| match nth {
        0 => Reply::Ok,
        1 => Reply::Close,
        _ => Reply::Code(46), // DUPLICATE_SEQUENCE_NUMBER
    }))
    .await;
    let producer = Producer::new(config(&mock.addr));
    ok(&producer.send(TOPIC, records(2, 10)).await);
    let d = ok(&producer.send(TOPIC, records(3, 10)).await);
    assert!(d.iter().all(|d| d.offset == -1 && d.partition == 0), "{d:?}");
    let p = mock.produced();
    assert!(p.iter().all(|p| p.partition == 0));
    assert_eq!(p.len(), 3);
    assert_eq!((p[0].producer_id, p[0].epoch, p[0].base_sequence, p[0].count), (1001, 0, 0, 2));
    assert_eq!((p[1].producer_id, p[1].base_sequence, p[1].count), (1001, 2, 3));
    assert_eq!(p[1].bytes, p[2].bytes, "retry is byte-identical: same producer id, epoch, sequence");
    assert_eq!(mock.log.lock().unwrap().init_producer_id, 1, "InitProducerId once");
}

#[tokio::test]
async fn out_of_order_sequence_takes_a_new_producer_id() {
    let mock = Mock::start(opts(|_, nth| match nth {
        1 => Reply::Code(45), // OUT_OF_ORDER_SEQUENCE_NUMBER
        _ => Reply::Ok,
    }))
    .await;
    let producer = Producer::new(config(&mock.addr));
    ok(&producer.send(TOPIC, records(4, 10)).await);
    ok(&producer.send(TOPIC, records(4, 10)).await);
    let p = mock.produced();
    assert_eq!(p.len(), 3);
    assert_eq!((p[0].producer_id, p[0].base_sequence), (1001, 0));
    assert_eq!((p[1].producer_id, p[1].base_sequence), (1001, 4));
    assert_eq!((p[2].producer_id, p[2].base_sequence), (1002, 0), "re-initialised, sequence reset");
    assert_eq!(mock.log.lock().unwrap().init_producer_id, 2);
}

#[tokio::test]
async fn unknown_producer_id_takes_a_new_producer_id() {
    let mock = Mock::start(opts(|_, nth| if nth == 0 { Reply::Code(59) } else { Reply::Ok })).await;
    let producer = Producer::new(config(&mock.addr));
    ok(&producer.send(TOPIC, records(2, 10)).await);
    let p = mock.produced();
    assert_eq!((p[1].producer_id, p[1].base_sequence), (1002, 0));
}

#[tokio::test]
async fn giving_up_on_an_unknown_outcome_retires_the_sequence() {
    // Every attempt of the first batch loses its response: its outcome is
    // unknown, so its sequence numbers must not carry other records.
    let mock = Mock::start(opts(|p, _| if p.count == 3 { Reply::Close } else { Reply::Ok })).await;
    let producer = Producer::new(config(&mock.addr));
    let results = producer.send(TOPIC, records(3, 10)).await;
    for r in &results {
        match r {
            Err(ProduceError::Retriable { name: "NETWORK_EXCEPTION", .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    ok(&producer.send(TOPIC, records(2, 10)).await);
    let p = mock.produced();
    let last = p.last().unwrap();
    assert_eq!(last.count, 2);
    assert_ne!(last.producer_id, p[0].producer_id, "a new producer id");
    assert_eq!(last.base_sequence, 0);
}

#[tokio::test]
async fn giving_up_on_a_refused_batch_keeps_the_sequence() {
    // NOT_ENOUGH_REPLICAS: the broker did not write it; the sequence is free.
    let mock = Mock::start(opts(|p, _| if p.count == 3 { Reply::Code(19) } else { Reply::Ok })).await;
    let producer = Producer::new(config(&mock.addr));
    ok(&producer.send(TOPIC, records(1, 10)).await);
    let results = producer.send(TOPIC, records(3, 10)).await;
    for r in &results {
        match r {
            Err(ProduceError::Retriable { code: 19, name: "NOT_ENOUGH_REPLICAS", .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    ok(&producer.send(TOPIC, records(2, 10)).await);
    let p = mock.produced();
    assert_eq!(p.iter().filter(|p| p.count == 3).count(), 6, "six attempts");
    let last = p.last().unwrap();
    assert_eq!((last.producer_id, last.base_sequence), (p[0].producer_id, 1));
}

#[tokio::test]
async fn message_too_large_splits_and_only_the_oversized_record_fails() {
    let mock = Mock::start(opts(|p, _| if p.bytes.len() > 2000 { Reply::Code(10) } else { Reply::Ok })).await;
    let producer = Producer::new(config(&mock.addr));
    let mut rs = records(20, 300);
    rs.insert(7, Record::new(Some(b"k".to_vec()), vec![b'x'; 5000]));
    let results = producer.send(TOPIC, rs).await;
    for (i, r) in results.iter().enumerate() {
        if i == 7 {
            match r {
                Err(ProduceError::Fatal { code: 10, name: "MESSAGE_TOO_LARGE", .. }) => {}
                other => panic!("{other:?}"),
            }
        } else {
            r.as_ref().unwrap();
        }
    }
    let offsets: Vec<i64> = results.iter().filter_map(|r| r.as_ref().ok()).map(|d| d.offset).collect();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>(), "the rest in order");
    // Accepted batches carry consecutive sequences.
    let mut seq = 0;
    for p in mock.produced().iter().filter(|p| p.bytes.len() <= 2000) {
        assert_eq!(p.base_sequence, seq);
        seq += p.count;
    }
    assert_eq!(seq, 20);
}

#[tokio::test]
async fn fatal_codes_keep_kafka_names() {
    for (code, name) in [
        (29, "TOPIC_AUTHORIZATION_FAILED"),
        (87, "INVALID_RECORD"),
        (2, "CORRUPT_MESSAGE"),
        (18, "RECORD_LIST_TOO_LARGE"),
    ] {
        let mock = Mock::start(opts(move |_, _| Reply::Code(code))).await;
        let results = Producer::new(config(&mock.addr)).send(TOPIC, records(1, 10)).await;
        match &results[0] {
            Err(ProduceError::Fatal { code: c, name: n, .. }) if *c == code && *n == name => {}
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(mock.produced().len(), 1, "{name}: not retried");
    }
}

#[tokio::test]
async fn oversized_response_is_refused_without_allocating() {
    let mock = Mock::start(opts(|_, _| Reply::HugeFrame)).await;
    let results = Producer::new(config(&mock.addr)).send(TOPIC, records(1, 10)).await;
    match &results[0] {
        Err(ProduceError::Retriable { name: "NETWORK_EXCEPTION", message, .. }) => {
            assert!(message.contains("refused"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

/// A broker's array lengths are checked against the bytes that follow
/// before anything is reserved. Before, kafka-protocol reserved what the
/// length said (up to 137 GB here): the allocation failed and the process
/// aborted, which in the worker restarts the whole PostgreSQL cluster.
#[tokio::test]
async fn array_lengths_a_broker_cannot_back_fail_its_request_only() {
    for key in [18, 3, 0, 17] {
        let (mechanism, sasl): (_, Option<(&'static str, Arc<dyn SaslServer>)>) = if key == 17 {
            let server: Arc<dyn SaslServer> =
                Arc::new(RsaslServer { inner: Rsasl::new("svc", "pw"), mechanism: "PLAIN" });
            (Some(Mechanism::Plain), Some(("PLAIN", server)))
        } else {
            (None, None)
        };
        let mock =
            Mock::start(Options { partitions: 1, script: Box::new(|_, _| Reply::Ok), sasl, hostile: Some(key) }).await;
        let mut cfg = config(&mock.addr);
        cfg.request_timeout = Duration::from_secs(2);
        cfg.sasl = mechanism.map(|mechanism| Sasl { mechanism, username: "svc".into(), password: "pw".into() });
        let started = Instant::now();
        let results = Producer::new(cfg).send(TOPIC, records(1, 10)).await;
        match &results[0] {
            Err(e @ (ProduceError::Unreachable { .. } | ProduceError::Retriable { .. })) => {
                assert!(e.to_string().contains("array"), "API {key}: {e}")
            }
            other => panic!("API {key}: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "API {key}: {:?}", started.elapsed());
    }
}

/// A broker's text goes into the error of every record of the batch: it
/// is cut to a bounded size first (4 MB said to 50 records was 200 MB).
#[tokio::test]
async fn a_brokers_long_message_is_cut_before_every_record_gets_it() {
    let long = "x".repeat(4 << 20);
    let mock = Mock::start(opts(move |_, _| Reply::Said(87, long.clone()))).await;
    let results = Producer::new(config(&mock.addr)).send(TOPIC, records(50, 10)).await;
    for r in &results {
        match r {
            Err(e @ ProduceError::Fatal { code: 87, message, .. }) => {
                assert!(message.len() <= 1100, "{} bytes", message.len());
                assert!(e.to_string().contains("xxxx"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Offsets near the end of the range: no overflow (a panic in a debug
/// build, with the batch's sequence never advanced), the records past it
/// have no offset.
#[tokio::test]
async fn a_base_offset_at_the_end_of_the_range_does_not_overflow() {
    let mock = Mock::start(opts(|_, nth| if nth == 0 { Reply::At(i64::MAX - 1) } else { Reply::Ok })).await;
    let producer = Producer::new(config(&mock.addr));
    let offsets: Vec<i64> = ok(&producer.send(TOPIC, records(4, 10)).await).iter().map(|d| d.offset).collect();
    assert_eq!(offsets, [i64::MAX - 1, i64::MAX, -1, -1]);
    ok(&producer.send(TOPIC, records(2, 10)).await);
    let produced = mock.produced();
    assert_eq!((produced[1].base_sequence, produced[1].count), (4, 2), "the sequence went on");
}

/// The response's entries are looked up once, not scanned again for every
/// partition of the request (190,000 topics, 2,000 partitions: 3.8e8
/// comparisons on the runtime's thread, which no timeout interrupts).
#[tokio::test]
async fn a_long_produce_response_is_read_once_for_all_partitions() {
    let mut options = opts(|_, _| Reply::Among(190_000));
    options.partitions = 2_000;
    let mock = Mock::start(options).await;
    let mut cfg = config(&mock.addr);
    cfg.request_timeout = Duration::from_secs(30);
    let producer = Producer::new(cfg);
    let records: Vec<Record> =
        (0..4_000).map(|i| Record::new(Some(format!("key-{i}").into_bytes()), b"v".to_vec())).collect();
    let started = Instant::now();
    let delivered = ok(&producer.send(TOPIC, records).await);
    let took = started.elapsed();
    let partitions: std::collections::HashSet<i32> = delivered.iter().map(|d| d.partition).collect();
    assert!(partitions.len() > 1_500, "{} partitions", partitions.len());
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn a_failed_batch_stops_the_partition_behind_it() {
    // The first batch of the partition keeps failing: the later ones (same
    // call) are not sent, so a retry by the caller cannot reorder them.
    let mock = Mock::start(Options {
        partitions: 1,
        script: Box::new(|p, _| if p.base_sequence == 0 { Reply::Code(7) } else { Reply::Ok }),
        sasl: None,
        hostile: None,
    })
    .await;
    let mut cfg = config(&mock.addr);
    cfg.max_request_bytes = 4096;
    let results = Producer::new(cfg).send(TOPIC, records(100, 200)).await;
    assert!(results.iter().all(|r| matches!(r, Err(ProduceError::Retriable { code: 7, .. }))), "{:?}", &results[..2]);
    assert!(mock.produced().iter().all(|p| p.base_sequence == 0), "nothing behind the failed batch was sent");
}

#[tokio::test]
async fn keyed_and_unkeyed_partitioning() {
    let mock =
        Mock::start(Options { partitions: 6, script: Box::new(|_, _| Reply::Ok), sasl: None, hostile: None }).await;
    let producer = Producer::new(config(&mock.addr));
    let d =
        ok(&producer.send(TOPIC, vec![Record::new(Some(b"a".to_vec()), vec![1]), Record::new(None, vec![2])]).await);
    assert_eq!(d[0].partition, 4, "murmur2(\"a\") over 6 partitions, as the Java client");
    let d2 = ok(&producer.send(TOPIC, vec![Record::new(None, vec![3])]).await);
    assert_ne!(d[1].partition, d2[0].partition, "round-robin between calls");
}

// ---- SASL, against the SCRAM/PLAIN server side of `rsasl` (independent of
// this crate's client code).

struct Rsasl {
    config: Arc<rsasl::config::SASLConfig>,
    session: Mutex<Option<rsasl::prelude::Session<Verdict>>>,
}

struct Verdict;
impl rsasl::validate::Validation for Verdict {
    type Value = bool;
}

struct Users {
    user: &'static str,
    password: &'static str,
}

impl rsasl::callback::SessionCallback for Users {
    fn callback(
        &self,
        _session: &rsasl::callback::SessionData,
        context: &rsasl::callback::Context<'_>,
        request: &mut rsasl::callback::Request<'_>,
    ) -> Result<(), rsasl::prelude::SessionError> {
        use rsasl::mechanisms::scram::properties::ScramStoredPassword;
        use rsasl::property::AuthId;
        if context.get_ref::<AuthId>() != Some(self.user) {
            return Ok(());
        }
        if request.is::<ScramStoredPassword>() {
            let mechanism = _session.mechanism().mechanism.as_str();
            let (alg, hmac, digest, len) = if mechanism == "SCRAM-SHA-256" {
                (ring::pbkdf2::PBKDF2_HMAC_SHA256, ring::hmac::HMAC_SHA256, &ring::digest::SHA256, 32)
            } else {
                (ring::pbkdf2::PBKDF2_HMAC_SHA512, ring::hmac::HMAC_SHA512, &ring::digest::SHA512, 64)
            };
            let salt = b"mock-salt";
            let mut salted = vec![0u8; len];
            ring::pbkdf2::derive(
                alg,
                std::num::NonZeroU32::new(4096).unwrap(),
                salt,
                self.password.as_bytes(),
                &mut salted,
            );
            let key = ring::hmac::Key::new(hmac, &salted);
            let client_key = ring::hmac::sign(&key, b"Client Key");
            let stored_key = ring::digest::digest(digest, client_key.as_ref());
            let server_key = ring::hmac::sign(&key, b"Server Key");
            request.satisfy::<ScramStoredPassword>(&ScramStoredPassword::new(
                4096,
                salt,
                stored_key.as_ref(),
                server_key.as_ref(),
            ))?;
        }
        Ok(())
    }

    fn validate(
        &self,
        session: &rsasl::callback::SessionData,
        context: &rsasl::callback::Context<'_>,
        validate: &mut rsasl::validate::Validate<'_>,
    ) -> Result<(), rsasl::validate::ValidationError> {
        use rsasl::property::{AuthId, Password};
        let ok = if session.mechanism().mechanism.as_str() == "PLAIN" {
            context.get_ref::<AuthId>() == Some(self.user)
                && context.get_ref::<Password>() == Some(self.password.as_bytes())
        } else {
            context.get_ref::<AuthId>() == Some(self.user)
        };
        validate.with::<Verdict, _>(|| Ok(ok))?;
        Ok(())
    }
}

impl Rsasl {
    fn new(user: &'static str, password: &'static str) -> Arc<Rsasl> {
        let config =
            rsasl::config::SASLConfig::builder().with_defaults().with_callback(Users { user, password }).unwrap();
        Arc::new(Rsasl { config, session: Mutex::new(None) })
    }
}

struct RsaslServer {
    inner: Arc<Rsasl>,
    mechanism: &'static str,
}

impl SaslServer for RsaslServer {
    fn step(&self, _state: &mut Vec<u8>, input: &[u8]) -> Result<(Vec<u8>, bool), String> {
        use rsasl::prelude::*;
        let mut guard = self.inner.session.lock().unwrap();
        if guard.is_none() {
            let server = SASLServer::<Verdict>::new(self.inner.config.clone());
            let mech = Mechname::parse(self.mechanism.as_bytes()).unwrap();
            *guard = Some(server.start_suggested(mech).map_err(|e| e.to_string())?);
        }
        let session = guard.as_mut().unwrap();
        let mut out = Vec::new();
        let state = session.step(Some(input), &mut out).map_err(|e| format!("authentication failed: {e}"))?;
        if state.is_finished() {
            let ok = guard.take().unwrap().validation().unwrap_or(false);
            if !ok {
                return Err("authentication failed: invalid credentials".into());
            }
            return Ok((out, true));
        }
        Ok((out, false))
    }
}

#[tokio::test]
async fn sasl_scram_and_plain_against_rsasl() {
    for (mechanism, name) in [
        (Mechanism::ScramSha256, "SCRAM-SHA-256"),
        (Mechanism::ScramSha512, "SCRAM-SHA-512"),
        (Mechanism::Plain, "PLAIN"),
    ] {
        for (password, should_work) in [("right-pw", true), ("wrong-pw-QQQ", false)] {
            let server: Arc<dyn SaslServer> =
                Arc::new(RsaslServer { inner: Rsasl::new("svc", "right-pw"), mechanism: name });
            let mock = Mock::start(Options {
                partitions: 1,
                script: Box::new(|_, _| Reply::Ok),
                sasl: Some((name, server)),
                hostile: None,
            })
            .await;
            let mut cfg = config(&mock.addr);
            cfg.sasl = Some(Sasl { mechanism, username: "svc".into(), password: password.into() });
            let results = Producer::new(cfg).send(TOPIC, records(2, 10)).await;
            if should_work {
                ok(&results);
            } else {
                match &results[0] {
                    Err(e @ ProduceError::Fatal { code: 58, name: "SASL_AUTHENTICATION_FAILED", .. }) => {
                        assert!(!e.to_string().contains(password), "{e}");
                    }
                    other => panic!("{name} wrong password: {other:?}"),
                }
                assert!(mock.produced().is_empty());
            }
        }
    }
}

#[tokio::test]
async fn sasl_mechanism_not_enabled_is_fatal() {
    let server: Arc<dyn SaslServer> =
        Arc::new(RsaslServer { inner: Rsasl::new("svc", "pw"), mechanism: "SCRAM-SHA-512" });
    let mock = Mock::start(Options {
        partitions: 1,
        script: Box::new(|_, _| Reply::Ok),
        sasl: Some(("SCRAM-SHA-512", server)),
        hostile: None,
    })
    .await;
    let mut cfg = config(&mock.addr);
    cfg.sasl = Some(Sasl { mechanism: Mechanism::ScramSha256, username: "svc".into(), password: "pw".into() });
    let results = Producer::new(cfg).send(TOPIC, records(1, 10)).await;
    match &results[0] {
        Err(ProduceError::Fatal { code: 33, name: "UNSUPPORTED_SASL_MECHANISM", message }) => {
            assert!(message.contains("SCRAM-SHA-512"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_batch_waiting_to_be_compressed_is_bounded_by_request_timeout() {
    // Both permits for heavy work are taken for 3 s: the large batch waits
    // for its turn to be compressed, and is given up, unsent, when
    // `request_timeout` has run out.
    let held = Arc::new(std::sync::Barrier::new(3));
    for _ in 0..2 {
        let held = held.clone();
        tokio::spawn(outbox_kafka::cpu_bound(true, move || {
            held.wait();
            std::thread::sleep(Duration::from_secs(3));
        }));
    }
    held.wait(); // both taken (this thread runs the test, not the runtime's tasks)
    let mock = Mock::start(opts(|_, _| Reply::Ok)).await;
    let mut cfg = config(&mock.addr);
    cfg.request_timeout = Duration::from_secs(1);
    cfg.compression = outbox_kafka::Compression::Gzip;
    let started = Instant::now();
    let results = Producer::new(cfg).send(TOPIC, records(100, 4096)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1600), "{took:?}");
    for r in &results {
        assert!(matches!(r, Err(ProduceError::Retriable { name: "REQUEST_TIMED_OUT", .. })), "{r:?}");
    }
    assert!(mock.produced().is_empty(), "nothing was sent");
}
