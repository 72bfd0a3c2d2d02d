//! Endpoint configuration and what writers may put in an event.
//!
//! Plain Rust, shared by the SQL functions (which reject bad input before
//! anything is stored) and the worker (which builds its delivery settings
//! from the stored rows with the very same code):
//!
//! - [`names`]: topics, topic patterns, endpoint names and URLs;
//! - [`options`]: an endpoint's `options` object, each key declared once;
//! - [`event_limits`]: bounds on what a writer puts in an event.

mod event_limits;
mod names;
mod options;

pub use event_limits::{check_event_headers, check_key_and_type};
pub use names::{
    check_endpoint_name, check_kafka_topic, check_topic, check_topic_pattern, parse_brokers, parse_url, Broker,
};
pub use options::{Body, CloudEvents, Compression, Flavor, HttpVersion, OnDead, Options, Sasl, Secret};

use serde_json::{Map, Value};

/// A configuration problem, phrased for the person who typed the SQL.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub message: String,
    pub hint: Option<String>,
}

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ConfigError { message: message.into(), hint: None }
    }

    pub(crate) fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Name the SQL function the error is raised from, as its callers see it.
    pub fn in_function(self, function: &str) -> Self {
        ConfigError { message: format!("{function}: {}", self.message), hint: self.hint }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

type Result<T> = std::result::Result<T, ConfigError>;

/// How an endpoint is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Webhook,
    /// Confluent REST Proxy API v2 (or Redpanda's HTTP Proxy).
    KafkaRestV2,
    /// Confluent REST Proxy API v3.
    KafkaRestV3,
    /// The Kafka protocol, straight to the brokers.
    Kafka,
}

impl Kind {
    pub fn parse(kind: &str) -> Result<Kind> {
        match kind {
            "webhook" => Ok(Kind::Webhook),
            "kafka_rest_v2" => Ok(Kind::KafkaRestV2),
            "kafka_rest_v3" => Ok(Kind::KafkaRestV3),
            "kafka" => Ok(Kind::Kafka),
            other => Err(ConfigError::new(format!("unknown endpoint kind {other:?}"))
                .hint("Endpoint kinds are 'webhook', 'kafka', 'kafka_rest_v2' and 'kafka_rest_v3'.")),
        }
    }

    /// Whether events become Kafka records (natively or through a proxy).
    pub fn is_kafka(self) -> bool {
        matches!(self, Kind::KafkaRestV2 | Kind::KafkaRestV3 | Kind::Kafka)
    }
}

/// Where an endpoint is: an HTTP(S) URL, or Kafka brokers
/// (`kafka://host:port,host:port`).
#[derive(Debug, Clone, PartialEq)]
pub enum Address {
    Http(reqwest::Url),
    Brokers(Vec<Broker>),
}

impl Address {
    /// The hosts a delivery connects to first (brokers may name others).
    pub fn hosts(&self) -> Vec<&str> {
        match self {
            Address::Http(url) => url.host_str().into_iter().collect(),
            Address::Brokers(brokers) => brokers.iter().map(|b| b.host.as_str()).collect(),
        }
    }
}

/// A whole endpoint as stored, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub name: String,
    pub kind: Kind,
    pub address: Address,
    pub topics: Vec<String>,
    pub options: Options,
}

impl Endpoint {
    pub fn parse(name: &str, url: &str, kind: &str, topics: &[String], options: &Value) -> Result<Endpoint> {
        check_endpoint_name(name)?;
        let kind = Kind::parse(kind)?;
        let address = match kind {
            Kind::Kafka => Address::Brokers(parse_brokers(url)?),
            _ => Address::Http(parse_url(url)?),
        };
        if topics.is_empty() {
            return Err(ConfigError::new("topics must not be empty").hint("Use '{*}' to receive every topic."));
        }
        for pattern in topics {
            check_topic_pattern(pattern)?;
        }
        let given = options.as_object().cloned().unwrap_or_default();
        let options = Options::parse(options)?.for_kind(kind, &given)?;
        if kind.is_kafka() && options.topic.is_none() {
            for pattern in topics.iter().filter(|p| !p.contains(['*', '?'])) {
                check_kafka_topic(pattern)?;
            }
        }
        Ok(Endpoint { name: name.to_string(), kind, address, topics: topics.to_vec(), options })
    }

    /// The Kafka topic an event of `topic` goes to: the `topic` option with
    /// `{topic}` replaced, or the event's topic. It may still be a name
    /// Kafka refuses (check_kafka_topic), which fails that event alone.
    pub fn kafka_topic(&self, topic: &str) -> String {
        match &self.options.topic {
            Some(template) => template.replace("{topic}", topic),
            None => topic.to_string(),
        }
    }
}

/// Merge `patch` into `base` the way outbox.alter_endpoint documents it:
/// keys of `patch` replace those of `base`, a JSON null removes the key.
pub fn merge_options(base: &Value, patch: &Value) -> Result<Value> {
    let Value::Object(patch) = patch else {
        return Err(ConfigError::new(format!("options must be a JSON object, got {}", json_type(patch))));
    };
    let mut merged = match base {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    for (k, v) in patch {
        if v.is_null() {
            merged.remove(k);
        } else {
            merged.insert(k.clone(), v.clone());
        }
    }
    Ok(Value::Object(merged))
}

/// The kind of a JSON value, for messages that must not repeat the value.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An option value as shown in a message. Options may hold credentials and
/// messages reach clients and the server log, so only numbers and booleans
/// are repeated; other values are named by their JSON type.
pub(crate) fn shown(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => json_type(other).to_string(),
    }
}

/// A name as shown in a message: at most 64 characters.
pub(crate) fn shorten(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &name[..i]),
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn endpoints() {
        let ok = Endpoint::parse("hooks", "http://127.0.0.1:1/", "webhook", &["*".into()], &json!({})).unwrap();
        assert_eq!(ok.kind, Kind::Webhook);
        assert!(Endpoint::parse("bad name", "http://x/", "webhook", &["*".into()], &json!({})).is_err());
        assert!(Endpoint::parse("a", "http://x/", "smtp", &["*".into()], &json!({})).is_err());
        assert!(Endpoint::parse("a", "http://x/", "webhook", &[], &json!({})).is_err());
        assert!(Endpoint::parse("a", "http://x/", "webhook", &["".into()], &json!({})).is_err());
    }

    #[test]
    fn kinds_and_their_options() {
        let ep = |kind: &str, opts: serde_json::Value| Endpoint::parse("e", "http://x/", kind, &["*".into()], &opts);
        let kafka = ep("kafka_rest_v2", json!({})).unwrap();
        assert_eq!((kafka.kind, kafka.options.batch_size), (Kind::KafkaRestV2, 100));
        assert_eq!(
            ep("kafka_rest_v2", json!({"flavor": "redpanda", "batch_size": 7})).unwrap().options.flavor,
            Flavor::Redpanda
        );
        assert!(ep("kafka_rest_v3", json!({})).unwrap_err().message.contains("needs option cluster_id"));
        assert!(ep("kafka_rest_v3", json!({"cluster_id": "c1"})).is_ok());
        assert!(ep("kafka_rest_v2", json!({"cluster_id": "c1"})).unwrap_err().message.contains("kafka_rest_v3"));
        assert!(ep("kafka_rest_v3", json!({"cluster_id": "c1", "flavor": "redpanda"})).is_err());
        assert!(ep("kafka_rest_v2", json!({"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"})).is_err());
        assert!(ep("webhook", json!({"batch_size": 5})).unwrap_err().message.contains("one event per request"));
        assert_eq!(
            ep("webhook", json!({"cloudevents": "structured", "batch_size": 5})).unwrap().options.cloudevents,
            Some(CloudEvents::Structured)
        );
        assert!(ep("webhook", json!({"cloudevents": "stream"})).is_err());
        assert!(Endpoint::parse("e", "http://x/", "kafka_rest_v2", &["bad:topic".into()], &json!({})).is_err());
        assert!(Endpoint::parse("e", "http://x/", "kafka_rest_v2", &["orders.*".into()], &json!({})).is_ok());
    }

    #[test]
    fn merging() {
        let merged = merge_options(&json!({"a": 1, "b": 2}), &json!({"b": null, "c": 3})).unwrap();
        assert_eq!(merged, json!({"a": 1, "c": 3}));
        assert!(merge_options(&json!({}), &json!(1)).is_err());
    }
}
