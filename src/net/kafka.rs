//! Kafka, natively: events become records produced straight to the brokers
//! by an idempotent producer with acks=all (crates/outbox-kafka).
//!
//! A request is one `send` of one topic's records. The records of one key
//! form one batch of that key's partition, which the broker appends all or
//! none, in order; the producer keeps one request in flight per partition
//! and retries a batch unchanged, so retries neither reorder nor duplicate
//! inside Kafka. Partitions follow the Java client's murmur2 partitioner.

use super::failure::{snippet, Failure};
use super::{envelope, resolve, Gate, Target};
use crate::config::{self, Broker, CloudEvents, Compression, Sasl};
use crate::egress::{AllowList, Egress};
use crate::event::Event;
use outbox_kafka::{Config, ProduceError, Producer, Record, Resolve, ResolveFuture};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// The producer of an endpoint. No connection is made until the first
/// request; every connection, to the brokers listed and to those the
/// cluster names in its metadata, passes the egress rules.
pub fn producer(brokers: &[Broker], opts: &config::Options, egress: Arc<Egress>) -> Producer {
    let mut c = Config::new(brokers.iter().map(ToString::to_string).collect());
    c.client_id = concat!("outbox/", env!("CARGO_PKG_VERSION")).into();
    c.tls = opts.tls.then(|| outbox_kafka::Tls { ca_pem: opts.ca_cert.clone() });
    c.sasl = match (opts.sasl, &opts.sasl_username, &opts.sasl_password) {
        (Some(mechanism), Some(username), Some(password)) => Some(outbox_kafka::Sasl {
            mechanism: match mechanism {
                Sasl::Plain => outbox_kafka::Mechanism::Plain,
                Sasl::ScramSha256 => outbox_kafka::Mechanism::ScramSha256,
                Sasl::ScramSha512 => outbox_kafka::Mechanism::ScramSha512,
            },
            username: username.clone(),
            password: password.0.clone(),
        }),
        _ => None,
    };
    c.compression = match opts.compression {
        Compression::None => outbox_kafka::Compression::None,
        Compression::Gzip => outbox_kafka::Compression::Gzip,
        Compression::Snappy => outbox_kafka::Compression::Snappy,
        Compression::Lz4 => outbox_kafka::Compression::Lz4,
        Compression::Zstd => outbox_kafka::Compression::Zstd,
    };
    // Topics are infrastructure: a misspelt topic must not appear in the
    // cluster unless the endpoint asks for it.
    c.allow_auto_create_topics = opts.create_topics;
    c.request_timeout = opts.timeout;
    c.connect_timeout = opts.connect_timeout;
    c.resolver = Arc::new(EgressResolver { egress });
    Producer::new(c)
}

/// Send `events` (one Kafka topic) as one request; the outcome of each.
pub async fn deliver(
    producer: &Producer,
    target: &Target,
    gate: &Gate,
    events: &[Arc<Event>],
) -> Vec<Result<(), Failure>> {
    let topic = target.endpoint.kafka_topic(&events[0].topic);
    let records = match super::build_request(gate, events, || events.iter().map(|e| record(target, e)).collect()).await
    {
        Ok(records) => records,
        Err(failure) => return vec![Err(failure); events.len()],
    };
    producer.send(&topic, records).await.into_iter().map(|r| r.map(|_| ()).map_err(failure)).collect()
}

/// The record of an event: the key is the ordering key; the value and
/// headers follow the endpoint's `body` and `cloudevents` options.
pub fn record(target: &Target, event: &Event) -> Record {
    let opts = target.options();
    let (value, headers) = match opts.cloudevents {
        // CloudEvents Kafka protocol binding, binary mode: attributes in
        // ce_ headers, the data as value.
        Some(CloudEvents::Binary) => {
            let mut h = vec![
                ("ce_specversion".to_string(), "1.0".to_string()),
                ("ce_id".into(), event.id.clone()),
                ("ce_source".into(), target.source.clone()),
                ("ce_type".into(), envelope::ce_type(event).to_string()),
                ("ce_time".into(), event.timestamp.clone()),
                ("content-type".into(), "application/json".into()),
            ];
            if let Some(key) = &event.key {
                h.push(("ce_subject".into(), key.clone()));
            }
            h.extend(envelope::record_headers(event));
            (event.payload.clone().into_bytes(), h)
        }
        Some(CloudEvents::Structured) => {
            let doc = serde_json::to_vec(&envelope::structured(&target.source, event)).expect("serializable");
            let mut h = vec![("content-type".to_string(), "application/cloudevents+json; charset=UTF-8".to_string())];
            h.extend(envelope::record_headers(event));
            (doc, h)
        }
        // The envelope or the bare data (`body`), as for the REST kinds.
        None => (envelope::value(opts.body, event).into_bytes(), envelope::record_headers(event)),
    };
    Record {
        key: event.key.as_ref().map(|k| k.clone().into_bytes()),
        value,
        headers: headers.into_iter().map(|(n, v)| (n, v.into_bytes())).collect(),
        timestamp_ms: event.created.duration_since(UNIX_EPOCH).map_or(-1, |d| d.as_millis() as i64),
    }
}

/// Kafka errors that say the endpoint's configuration or the cluster's
/// grants are wrong, not the record: retried (and shown in last_error)
/// rather than sending every event to dead letters until someone fixes
/// them.
const CONFIGURATION_ERRORS: &[&str] = &[
    "SASL_AUTHENTICATION_FAILED",
    "UNSUPPORTED_SASL_MECHANISM",
    "ILLEGAL_SASL_STATE",
    "UNSUPPORTED_COMPRESSION_TYPE",
    "CLUSTER_AUTHORIZATION_FAILED",
    "UNSUPPORTED_VERSION",
];

/// What a producer error means for the event.
pub fn failure(e: ProduceError) -> Failure {
    let message = format!("Kafka {}: {}", e.name(), snippet(e.message().as_bytes()));
    match e {
        ProduceError::Fatal { name, .. } if !CONFIGURATION_ERRORS.contains(&name) => Failure::reject(message),
        _ => Failure::retry(message),
    }
}

/// Resolves broker names under `outbox.allowed_hosts`: the host must be
/// allowed and so must every address connected to (net/resolve.rs).
struct EgressResolver {
    egress: Arc<Egress>,
}

impl Resolve for EgressResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(async move {
            if !self.egress.allowed.allows_host(host) {
                return Err(AllowList::host_refusal(host).message);
            }
            resolve::allowed_addresses(&self.egress, host, port, false).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::envelope::tests::sample;
    use serde_json::json;

    fn target(options: serde_json::Value) -> Target {
        let ep = config::Endpoint::parse("k", "kafka://127.0.0.1:9092", "kafka", &["*".into()], &options).unwrap();
        Target::new(ep, "/outbox/db", Arc::default()).unwrap()
    }

    fn header<'a>(r: &'a Record, name: &str) -> Option<&'a str> {
        r.headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    #[test]
    fn a_record_carries_key_envelope_identity_and_the_events_headers() {
        let r = record(&target(json!({})), &sample());
        assert_eq!(r.key.as_deref(), Some(&b"o-1"[..]));
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        assert_eq!((v["id"].as_str(), v["data"]["total"].as_f64()), (Some(sample().id.as_str()), Some(12.5)));
        assert_eq!(header(&r, "outbox-id"), Some(sample().id.as_str()));
        assert_eq!(header(&r, "outbox-type"), Some("created"));
        assert_eq!(header(&r, "trace"), Some("t1"));
        assert!(r.timestamp_ms > 0);
        let bare = record(&target(json!({"body": "data"})), &sample());
        assert_eq!(bare.value, sample().payload.as_bytes());
    }

    #[test]
    fn cloudevents_kafka_binding() {
        let binary = record(&target(json!({"cloudevents": "binary"})), &sample());
        assert_eq!(header(&binary, "ce_specversion"), Some("1.0"));
        assert_eq!(header(&binary, "ce_id"), Some(sample().id.as_str()));
        assert_eq!(header(&binary, "ce_source"), Some("/outbox/db"));
        assert_eq!(header(&binary, "ce_type"), Some("created"));
        assert_eq!(header(&binary, "ce_subject"), Some("o-1"));
        assert_eq!(binary.value, sample().payload.as_bytes());
        let structured = record(&target(json!({"cloudevents": "structured"})), &sample());
        assert_eq!(header(&structured, "content-type"), Some("application/cloudevents+json; charset=UTF-8"));
        let v: serde_json::Value = serde_json::from_slice(&structured.value).unwrap();
        assert_eq!(v["specversion"], "1.0");
    }

    #[test]
    fn record_errors_go_to_dead_letters_configuration_errors_are_retried() {
        let fatal = |name: &'static str| ProduceError::Fatal { code: 1, name, message: "m".into() };
        assert_eq!(failure(fatal("MESSAGE_TOO_LARGE")).verdict, crate::net::Verdict::Reject);
        assert_eq!(failure(fatal("TOPIC_AUTHORIZATION_FAILED")).verdict, crate::net::Verdict::Reject);
        assert!(failure(fatal("MESSAGE_TOO_LARGE")).message.starts_with("Kafka MESSAGE_TOO_LARGE"));
        assert!(matches!(failure(fatal("SASL_AUTHENTICATION_FAILED")).verdict, crate::net::Verdict::Retry { .. }));
        let down = failure(ProduceError::Unreachable { message: "x".repeat(5000) });
        assert!(matches!(down.verdict, crate::net::Verdict::Retry { .. }) && down.message.len() < 300);
    }

    #[test]
    fn topics_map_by_template() {
        let ep = |o: serde_json::Value| config::Endpoint::parse("k", "kafka://k", "kafka", &["*".into()], &o);
        assert_eq!(ep(json!({})).unwrap().kafka_topic("orders.paid"), "orders.paid");
        assert_eq!(ep(json!({"topic": "outbox.{topic}"})).unwrap().kafka_topic("orders"), "outbox.orders");
        assert_eq!(ep(json!({"topic": "all-events"})).unwrap().kafka_topic("orders"), "all-events");
        assert!(ep(json!({"topic": "bad topic"})).is_err());
    }

    #[test]
    fn sasl_passwords_never_print_and_come_together() {
        let ep = |o: serde_json::Value| config::Endpoint::parse("k", "kafka://k", "kafka", &["*".into()], &o);
        let ok = ep(json!({"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": "hunter2"}));
        assert!(!format!("{:?}", ok.unwrap()).contains("hunter2"));
        let half = ep(json!({"sasl_mechanism": "PLAIN", "sasl_password": "hunter2"})).unwrap_err();
        assert!(!half.message.contains("hunter2") && half.message.contains("together"));
        assert!(ep(json!({"sasl_password": 5})).unwrap_err().message.contains("a number"));
        assert!(ep(json!({"headers": {"a": "b"}})).unwrap_err().message.contains("HTTP"));
        let kafka = ep(json!({})).unwrap();
        assert_eq!((kafka.options.batch_size, kafka.options.max_per_key), (500, 500));
    }
}
