//! An endpoint's `options` object.
//!
//! Each key is declared once, in the `options!` table below: its field,
//! type, default, parser and the line of help shown in errors. The macro
//! turns the table into the `Options` struct, its `Default`, the list of
//! known keys and the parsing of a JSON object.

use super::{json_type, shorten, shown, ConfigError, Kind, Result};
use serde_json::{Map, Value};
use std::time::Duration;

/// What happens to later events of a key whose event went to dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDead {
    /// Later events wait until the dead one is replayed or discarded.
    Block,
    /// Later events go on; the dead one stays in dead letters.
    Skip,
}

/// Which HTTP an endpoint's requests go over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.1, or HTTP/2 when a TLS server offers it (ALPN).
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only: over TLS, or over plain TCP with prior knowledge
    /// (h2c); one connection carries many requests at once.
    Http2,
}

/// What a webhook body (or Kafka record value) carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// The JSON envelope with id, topic, key, type, timestamp, data, headers.
    Envelope,
    /// The bare payload; id and type travel in headers.
    Data,
}

/// CloudEvents 1.0 HTTP binding mode of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudEvents {
    /// Attributes in ce-* headers, the payload as body.
    Binary,
    /// One application/cloudevents+json document (or a batch of them).
    Structured,
}

/// Which Kafka REST v2 implementation an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Confluent,
    /// Redpanda's HTTP Proxy: v2 paths, but only partition/key/value fields
    /// and one response entry per partition.
    Redpanda,
}

/// A Standard Webhooks signing key. Never printed.
#[derive(Clone, PartialEq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How a `kafka` endpoint authenticates (SASL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sasl {
    Plain,
    ScramSha256,
    ScramSha512,
}

/// Compression of a `kafka` endpoint's record batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

/// A password option. Never printed.
#[derive(Clone, PartialEq)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

/// Reads one key of the options object: `None` when it is absent or null
/// (the default applies), an error naming the key when it is malformed.
type Parser<T> = fn(&Map<String, Value>, &str) -> Result<Option<T>>;

macro_rules! options {
    ($(
        $(#[doc = $field_doc:literal])*
        $key:literal => $field:ident: $ty:ty = $default:expr, $parse:expr, $help:literal;
    )*) => {
        /// The validated `options` of an endpoint, with defaults filled in.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Options {
            $($(#[doc = $field_doc])* pub $field: $ty,)*
        }

        impl Default for Options {
            fn default() -> Self {
                Options { $($field: $default,)* }
            }
        }

        /// Every key `options` may hold, with what it means; anything else
        /// is an error.
        pub const OPTIONS: &[(&str, &str)] = &[$(($key, $help),)*];

        impl Options {
            fn from_map(map: &Map<String, Value>) -> Result<Options> {
                let defaults = Options::default();
                Ok(Options {
                    $($field: {
                        let parse: Parser<$ty> = $parse;
                        parse(map, $key)?.unwrap_or(defaults.$field)
                    },)*
                })
            }
        }
    };
}

options! {
    "headers" => headers: Vec<(String, String)> = Vec::new(), headers,
        "extra HTTP headers, an object of names to string values";
    "timeout_ms" => timeout: Duration = Duration::from_secs(10), |m, k| millis(m, k, 1, 300_000),
        "timeout of one request in milliseconds, default 10000";
    "connect_timeout_ms" => connect_timeout: Duration = Duration::from_secs(5), |m, k| millis(m, k, 1, 300_000),
        "timeout to establish a connection in milliseconds, default 5000";
    "max_in_flight" => max_in_flight: usize = 16, |m, k| count(m, k, 1, 1024),
        "requests in flight at once (one per ordering key), default 16";
    "batch_size" => batch_size: usize = 1, |m, k| count(m, k, 1, 10_000),
        "events per request: Kafka REST records, or a CloudEvents batch; default 100 for Kafka, 1 otherwise";
    /// Events of one key in one request (Kafka kinds): they are appended
    /// to the key's partition in order, all or none.
    "max_per_key" => max_per_key: usize = 1, |m, k| count(m, k, 1, 10_000),
        "events of one key in one request (Kafka kinds; see the README on order), default 1";
    "linger_ms" => linger: Duration = Duration::from_millis(5), |m, k| millis(m, k, 0, 10_000),
        "how long a batch may wait to fill up while a request is in flight, default 5";
    "max_attempts" => max_attempts: Option<u32> = None, |m, k| Ok(int(m, k, 1, 1_000_000)?.map(|v| Some(v as u32))),
        "attempts before an event goes to dead letters, default unlimited";
    "max_age_s" => max_age: Option<Duration> = None,
        |m, k| Ok(int(m, k, 1, 365 * 86_400)?.map(|s| Some(Duration::from_secs(s as u64)))),
        "seconds after emit when a failing event goes to dead letters (total time), default unlimited";
    "backoff_base_ms" => backoff_base: Duration = Duration::from_millis(500), |m, k| millis(m, k, 1, 3_600_000),
        "first retry delay ceiling in milliseconds, doubled per attempt, default 500";
    "backoff_max_ms" => backoff_max: Duration = Duration::from_secs(60), |m, k| millis(m, k, 1, 86_400_000),
        "largest retry delay in milliseconds, default 60000";
    "on_dead" => on_dead: OnDead = OnDead::Block,
        |m, k| choice(m, k, &[("block", OnDead::Block), ("skip", OnDead::Skip)]),
        "'block' or 'skip': what later events of a key do while one of its events is dead";
    "body" => body: Body = Body::Envelope, |m, k| choice(m, k, &[("envelope", Body::Envelope), ("data", Body::Data)]),
        "'envelope' (default) or 'data' for the bare payload";
    /// Signing keys, newest first; several while a key is being rotated.
    "secret" => secrets: Vec<Secret> = Vec::new(), secrets,
        "Standard Webhooks signing secret 'whsec_<base64>', or an array of them while rotating";
    "cloudevents" => cloudevents: Option<CloudEvents> = None,
        |m, k| Ok(choice(m, k, &[("binary", CloudEvents::Binary), ("structured", CloudEvents::Structured)])?.map(Some)),
        "'binary' or 'structured': CloudEvents 1.0 HTTP binding for webhooks";
    "cluster_id" => cluster_id: Option<String> = None, cluster_id,
        "Kafka cluster id, required by kafka_rest_v3";
    "flavor" => flavor: Flavor = Flavor::Confluent,
        |m, k| choice(m, k, &[("confluent", Flavor::Confluent), ("redpanda", Flavor::Redpanda)]),
        "'confluent' (default) or 'redpanda' for kafka_rest_v2";
    /// PEM certificates trusted for HTTPS besides the usual roots.
    "ca_cert" => ca_cert: Option<String> = None, ca_cert,
        "PEM certificate(s) to trust for HTTPS besides the public roots";
    "http_version" => http_version: HttpVersion = HttpVersion::Auto,
        |m, k| choice(m, k, &[("auto", HttpVersion::Auto), ("1.1", HttpVersion::Http1), ("2", HttpVersion::Http2)]),
        "'auto' (default: HTTP/1.1, or HTTP/2 when an HTTPS server offers it), '1.1', or '2' (HTTP/2 only, \
         also over plain http:// with prior knowledge)";
    /// Redirects followed (to allowed hosts only); 0: none.
    "max_redirects" => max_redirects: usize = 0, |m, k| count(m, k, 0, 10),
        "redirects followed, to hosts outbox.allowed_hosts allows; default 0 (none)";
    /// The Kafka topic, `{topic}` standing for the event's topic.
    "topic" => topic: Option<String> = None, topic_template,
        "Kafka topic for the records: a name, or a template such as 'outbox.{topic}'; default the event topic";
    "tls" => tls: bool = false, flag,
        "true: connect to the Kafka brokers with TLS (certificates verified; see ca_cert); default false";
    "sasl_mechanism" => sasl: Option<Sasl> = None,
        |m, k| Ok(choice(m, k, &[("PLAIN", Sasl::Plain), ("SCRAM-SHA-256", Sasl::ScramSha256),
                                  ("SCRAM-SHA-512", Sasl::ScramSha512)])?.map(Some)),
        "'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512', with sasl_username and sasl_password";
    "sasl_username" => sasl_username: Option<String> = None, |m, k| Ok(text(m, k, 1, 255)?.map(Some)),
        "SASL user name for the Kafka brokers";
    /// Never shown in messages or logs.
    "sasl_password" => sasl_password: Option<Password> = None,
        |m, k| Ok(text(m, k, 1, 1024)?.map(|p| Some(Password(p)))),
        "SASL password for the Kafka brokers (kept like a webhook secret)";
    "create_topics" => create_topics: bool = false, flag,
        "true: let the brokers create a missing topic (if their own setting allows); default false, \
         a missing topic sends its events to dead letters";
    "compression" => compression: Compression = Compression::None,
        |m, k| choice(m, k, &[("none", Compression::None), ("gzip", Compression::Gzip), ("snappy", Compression::Snappy),
                              ("lz4", Compression::Lz4), ("zstd", Compression::Zstd)]),
        "'none' (default), 'gzip', 'snappy', 'lz4' or 'zstd': compression of Kafka record batches";
}

fn option_hint(key: &str) -> String {
    let doc = OPTIONS.iter().find(|(k, _)| *k == key).map_or("", |(_, d)| d);
    format!("{key}: {doc}.")
}

/// Headers the worker sets itself; an endpoint may not override them.
const RESERVED_HEADERS: &[&str] = &["content-type", "content-length", "host", "transfer-encoding", "connection"];
const RESERVED_PREFIXES: &[&str] = &["webhook-", "ce-"];

impl Options {
    pub fn parse(options: &Value) -> Result<Options> {
        let Value::Object(map) = options else {
            return Err(ConfigError::new(format!("options must be a JSON object, got {}", json_type(options)))
                .hint("e.g. options => '{\"timeout_ms\": 5000}'"));
        };
        if let Some(unknown) = map.keys().find(|k| !OPTIONS.iter().any(|(known, _)| known == k)) {
            let known: Vec<&str> = OPTIONS.iter().map(|(k, _)| *k).collect();
            return Err(ConfigError::new(format!("unknown endpoint option {:?}", shorten(unknown)))
                .hint(format!("Known options: {}.", known.join(", "))));
        }
        let opts = Options::from_map(map)?;
        if opts.backoff_max < opts.backoff_base {
            return Err(ConfigError::new(format!(
                "backoff_max_ms ({}) is smaller than backoff_base_ms ({})",
                opts.backoff_max.as_millis(),
                opts.backoff_base.as_millis()
            ))
            .hint("The retry delay grows from backoff_base_ms up to backoff_max_ms."));
        }
        Ok(opts)
    }

    /// Check what only makes sense for some kinds, and fill in kind
    /// defaults (Kafka batches by default).
    pub(super) fn for_kind(mut self, kind: Kind, given: &Map<String, Value>) -> Result<Options> {
        let is_given = |key: &str| given.get(key).is_some_and(|v| !v.is_null());
        let only = |key: &str, what: &str| -> Result<()> {
            if is_given(key) {
                return Err(
                    ConfigError::new(format!("option {key} applies to {what} endpoints only")).hint(option_hint(key))
                );
            }
            Ok(())
        };
        if kind != Kind::Kafka {
            for key in ["tls", "sasl_mechanism", "sasl_username", "sasl_password", "compression", "create_topics"] {
                only(key, "kafka")?;
            }
        }
        match kind {
            Kind::Webhook => {
                only("max_per_key", "Kafka")?;
                only("topic", "Kafka")?;
                only("cluster_id", "kafka_rest_v3")?;
                only("flavor", "kafka_rest_v2")?;
                if self.batch_size > 1 && self.cloudevents != Some(CloudEvents::Structured) {
                    return Err(ConfigError::new("a webhook sends one event per request")
                        .hint("batch_size > 1 needs cloudevents = 'structured' (CloudEvents batch mode)."));
                }
            }
            Kind::KafkaRestV2 | Kind::KafkaRestV3 => {
                only("secret", "webhook")?;
                only("cloudevents", "webhook")?;
                if kind == Kind::KafkaRestV2 {
                    only("cluster_id", "kafka_rest_v3")?;
                } else {
                    only("flavor", "kafka_rest_v2")?;
                    if self.cluster_id.is_none() {
                        return Err(ConfigError::new("kafka_rest_v3 needs option cluster_id").hint(
                            "GET /v3/clusters on the REST proxy lists it; options => '{\"cluster_id\": \"...\"}'.",
                        ));
                    }
                }
                if !is_given("batch_size") {
                    self.batch_size = 100;
                }
            }
            Kind::Kafka => {
                for key in ["secret", "headers", "max_redirects"] {
                    only(key, "HTTP")?;
                }
                only("cluster_id", "kafka_rest_v3")?;
                only("flavor", "kafka_rest_v2")?;
                let sasl = [is_given("sasl_mechanism"), is_given("sasl_username"), is_given("sasl_password")];
                if sasl.contains(&true) && sasl.contains(&false) {
                    return Err(ConfigError::new(
                        "SASL needs sasl_mechanism, sasl_username and sasl_password together",
                    )
                    .hint(option_hint("sasl_mechanism")));
                }
                // A CA to trust means TLS.
                self.tls |= self.ca_cert.is_some();
                if !is_given("batch_size") {
                    self.batch_size = 500;
                }
                // The records of one key in a request form one batch of
                // one partition: written all or none, in order.
                if !is_given("max_per_key") {
                    self.max_per_key = self.batch_size;
                }
            }
        }
        if let Some(topic) = &self.topic {
            // A fixed name is checked now; a template once filled in.
            if !topic.contains("{topic}") {
                super::check_kafka_topic(topic)?;
            }
        }
        Ok(self)
    }
}

fn secrets(map: &Map<String, Value>, key: &str) -> Result<Option<Vec<Secret>>> {
    // Messages here never repeat the secret itself.
    let one = |v: &Value| -> Result<Secret> {
        let hint = "Secrets are 'whsec_' followed by the base64 of 16 to 64 random bytes (Standard Webhooks).";
        let Some(text) = v.as_str() else {
            return Err(ConfigError::new("option secret must be a string or an array of strings").hint(hint));
        };
        let Some(encoded) = text.strip_prefix("whsec_") else {
            return Err(ConfigError::new("option secret must start with whsec_").hint(hint));
        };
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| ConfigError::new("option secret is not valid base64 after whsec_").hint(hint))?;
        if !(16..=64).contains(&key.len()) {
            return Err(ConfigError::new(format!("option secret decodes to {} bytes", key.len())).hint(hint));
        }
        Ok(Secret(key))
    };
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(list)) if !list.is_empty() && list.len() <= 10 => {
            list.iter().map(one).collect::<Result<_>>().map(Some)
        }
        Some(Value::Array(_)) => {
            Err(ConfigError::new("option secret must list 1 to 10 secrets").hint(option_hint(key)))
        }
        Some(v) => Ok(Some(vec![one(v)?])),
    }
}

fn ca_cert(map: &Map<String, Value>, key: &str) -> Result<Option<Option<String>>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(pem)) => {
            let ok = pem.contains("-----BEGIN CERTIFICATE-----")
                && reqwest::Certificate::from_pem_bundle(pem.as_bytes()).is_ok_and(|c| !c.is_empty());
            if ok {
                Ok(Some(Some(pem.clone())))
            } else {
                Err(ConfigError::new("option ca_cert is not a PEM certificate").hint(option_hint(key)))
            }
        }
        Some(_) => Err(ConfigError::new("option ca_cert must be a string").hint(option_hint(key))),
    }
}

fn cluster_id(map: &Map<String, Value>, key: &str) -> Result<Option<Option<String>>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(c)) if !c.is_empty() && c.chars().all(|ch| ch.is_ascii_graphic() && ch != '/') => {
            Ok(Some(Some(c.clone())))
        }
        Some(v) => Err(ConfigError::new(format!("option {key} must be a cluster id string, got {}", shown(v)))
            .hint(option_hint(key))),
    }
}

fn flag(map: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => {
            Err(ConfigError::new(format!("option {key} must be true or false, got {}", shown(v)))
                .hint(option_hint(key)))
        }
    }
}

/// A string of `min` to `max` bytes without control characters. Never
/// repeated in messages (it may be a credential).
fn text(map: &Map<String, Value>, key: &str, min: usize, max: usize) -> Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if (min..=max).contains(&s.len()) && !s.chars().any(char::is_control) => {
            Ok(Some(s.clone()))
        }
        Some(v) => Err(ConfigError::new(format!(
            "option {key} must be a string of {min} to {max} bytes without control characters, got {}",
            json_type(v)
        ))
        .hint(option_hint(key))),
    }
}

/// `topic`: a Kafka topic name in which `{topic}` may stand for the
/// event's topic.
fn topic_template(map: &Map<String, Value>, key: &str) -> Result<Option<Option<String>>> {
    let Some(t) = text(map, key, 1, 249)? else { return Ok(None) };
    let filled = t.replace("{topic}", "x");
    if super::check_kafka_topic(&filled).is_err() {
        return Err(ConfigError::new(format!("option topic {:?} is not a Kafka topic name or template", shorten(&t)))
            .hint(option_hint(key)));
    }
    Ok(Some(Some(t)))
}

fn int(map: &Map<String, Value>, key: &str, min: i64, max: i64) -> Result<Option<i64>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(i) if (min..=max).contains(&i) => Ok(Some(i)),
            _ => {
                Err(ConfigError::new(format!("option {key} must be an integer from {min} to {max}, got {}", shown(v)))
                    .hint(option_hint(key)))
            }
        },
    }
}

fn count(map: &Map<String, Value>, key: &str, min: i64, max: i64) -> Result<Option<usize>> {
    Ok(int(map, key, min, max)?.map(|v| v as usize))
}

fn millis(map: &Map<String, Value>, key: &str, min: i64, max: i64) -> Result<Option<Duration>> {
    Ok(int(map, key, min, max)?.map(|ms| Duration::from_millis(ms as u64)))
}

fn choice<T: Copy>(map: &Map<String, Value>, key: &str, allowed: &[(&str, T)]) -> Result<Option<T>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if allowed.iter().any(|(name, _)| name == s) => {
            Ok(allowed.iter().find(|(name, _)| name == s).map(|(_, v)| *v))
        }
        Some(v) => {
            let names: Vec<&str> = allowed.iter().map(|(name, _)| *name).collect();
            Err(ConfigError::new(format!("option {key} must be one of {}, got {}", names.join(", "), shown(v)))
                .hint(option_hint(key)))
        }
    }
}

fn headers(map: &Map<String, Value>, key: &str) -> Result<Option<Vec<(String, String)>>> {
    let hint = "headers is an object of header names to string values, e.g. {\"authorization\": \"Bearer ...\"}.";
    let headers = match map.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(h)) => h,
        Some(other) => {
            return Err(
                ConfigError::new(format!("option headers must be an object, got {}", json_type(other))).hint(hint)
            )
        }
    };
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(ConfigError::new(format!("invalid header name {:?}", shorten(name))).hint(hint));
        }
        if RESERVED_HEADERS.contains(&lower.as_str()) || RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p)) {
            return Err(ConfigError::new(format!("header {:?} is set by outbox itself", shorten(name)))
                .hint("content-type, webhook-* and ce-* headers cannot be overridden."));
        }
        let Value::String(value) = value else {
            return Err(ConfigError::new(format!("header {:?} must have a string value", shorten(name))).hint(hint));
        };
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            return Err(ConfigError::new(format!(
                "header {:?} has a value that is not a valid HTTP header value",
                shorten(name)
            ))
            .hint("Header values are visible ASCII without line breaks."));
        }
        out.push((lower, value.clone()));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_defaults_and_values() {
        assert_eq!(Options::parse(&json!({})).unwrap(), Options::default());
        let o = Options::parse(&json!({
            "timeout_ms": 2500, "max_in_flight": 4, "max_attempts": 3, "max_age_s": 60,
            "backoff_base_ms": 10, "backoff_max_ms": 100, "on_dead": "skip", "body": "data",
            "headers": {"Authorization": "Bearer x"}
        }))
        .unwrap();
        assert_eq!(o.timeout, Duration::from_millis(2500));
        assert_eq!(o.max_in_flight, 4);
        assert_eq!(o.max_attempts, Some(3));
        assert_eq!(o.max_age, Some(Duration::from_secs(60)));
        assert_eq!(o.on_dead, OnDead::Skip);
        assert_eq!(o.body, Body::Data);
        assert_eq!(o.headers, vec![("authorization".to_string(), "Bearer x".to_string())]);
    }

    #[test]
    fn options_errors() {
        let e = Options::parse(&json!({"timeout": 5})).unwrap_err();
        assert_eq!(e.message, "unknown endpoint option \"timeout\"");
        assert!(e.hint.unwrap().contains("timeout_ms"));
        assert!(Options::parse(&json!([])).unwrap_err().message.contains("JSON object"));
        assert!(Options::parse(&json!({"timeout_ms": 0})).unwrap_err().message.contains("from 1 to 300000"));
        assert!(Options::parse(&json!({"timeout_ms": "5"})).is_err());
        assert!(Options::parse(&json!({"max_in_flight": 1.5})).is_err());
        assert!(Options::parse(&json!({"on_dead": "drop"})).unwrap_err().message.contains("block, skip"));
        assert!(Options::parse(&json!({"headers": []})).is_err());
        assert!(Options::parse(&json!({"headers": {"webhook-id": "x"}}))
            .unwrap_err()
            .message
            .contains("set by outbox"));
        assert!(Options::parse(&json!({"headers": {"bad name": "x"}})).is_err());
        assert!(Options::parse(&json!({"headers": {"x": "a\nb"}})).is_err());
        assert!(Options::parse(&json!({"headers": {"x": 1}})).is_err());
        assert!(Options::parse(&json!({"backoff_base_ms": 100, "backoff_max_ms": 10})).is_err());
    }

    #[test]
    fn secrets_are_checked_without_being_repeated() {
        let parse = |v: serde_json::Value| Options::parse(&json!({ "secret": v }));
        let one = parse(json!("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        assert_eq!(one.secrets.len(), 1);
        let two =
            parse(json!(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"])).unwrap();
        assert_eq!(two.secrets.len(), 2);
        for bad in [json!("hunter2-plain"), json!("whsec_!!!notbase64"), json!("whsec_AAAA"), json!(5), json!([])] {
            let e = parse(bad.clone()).unwrap_err();
            assert!(!e.message.contains("hunter2") && !e.message.contains("notbase64"), "{}", e.message);
        }
        assert!(!format!("{one:?}").contains("MfKQ"), "Debug must not print secrets");
    }

    #[test]
    fn ca_certificates() {
        assert!(Options::parse(&json!({"ca_cert": "not a certificate"})).unwrap_err().message.contains("PEM"));
    }
}
