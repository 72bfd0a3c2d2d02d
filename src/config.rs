//! Endpoint configuration: names, topics, URLs and the `options` object.
//!
//! Plain Rust, shared by the SQL functions (which reject bad input before
//! anything is stored) and the worker (which builds its delivery settings
//! from the stored rows with the very same code).

use serde_json::{Map, Value};
use std::time::Duration;

/// A configuration problem, phrased for the person who typed the SQL.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub message: String,
    pub hint: Option<String>,
}

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        ConfigError { message: message.into(), hint: None }
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
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

/// Longest topic: Kafka's limit, so that every topic can also be a Kafka topic.
pub const MAX_TOPIC_LEN: usize = 249;
const TOPIC_CHARS_HINT: &str =
    "Topics use letters, digits and . _ - : / (at most 249 characters), e.g. 'orders.created'.";

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')
}

/// Check an event topic.
pub fn check_topic(topic: &str) -> Result<()> {
    if topic.is_empty() {
        return Err(ConfigError::new("topic must not be empty").hint(TOPIC_CHARS_HINT));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(ConfigError::new(format!("topic is {} characters long, longer than {MAX_TOPIC_LEN}", topic.len()))
            .hint(TOPIC_CHARS_HINT));
    }
    if let Some(bad) = topic.chars().find(|c| !is_topic_char(*c)) {
        return Err(ConfigError::new(format!("topic {topic:?} contains the character {bad:?}")).hint(TOPIC_CHARS_HINT));
    }
    Ok(())
}

/// Kafka's own topic rule, checked when events go to a Kafka endpoint.
pub fn check_kafka_topic(topic: &str) -> Result<()> {
    let ok = !topic.is_empty()
        && topic != "."
        && topic != ".."
        && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(format!("{topic:?} is not a valid Kafka topic"))
            .hint("Kafka topics use letters, digits, . _ and - only."))
    }
}

/// Check a topic pattern: a topic in which `*` matches any run of
/// characters and `?` exactly one.
pub fn check_topic_pattern(pattern: &str) -> Result<()> {
    let hint = "Patterns are topics with * (any characters) and ? (one character), e.g. 'orders.*' or '*'.";
    if pattern.is_empty() || pattern.len() > MAX_TOPIC_LEN {
        return Err(ConfigError::new(format!("invalid topic pattern {pattern:?}")).hint(hint));
    }
    if let Some(bad) = pattern.chars().find(|c| !is_topic_char(*c) && *c != '*' && *c != '?') {
        return Err(ConfigError::new(format!("topic pattern {pattern:?} contains the character {bad:?}")).hint(hint));
    }
    Ok(())
}

/// Check an endpoint name.
pub fn check_endpoint_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(format!("invalid endpoint name {name:?}"))
            .hint("Endpoint names use letters, digits, _ - and . (at most 63 characters)."))
    }
}

/// How an endpoint is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Webhook,
    /// Confluent REST Proxy API v2 (or Redpanda's HTTP Proxy).
    KafkaRestV2,
    /// Confluent REST Proxy API v3.
    KafkaRestV3,
}

impl Kind {
    pub fn parse(kind: &str) -> Result<Kind> {
        match kind {
            "webhook" => Ok(Kind::Webhook),
            "kafka_rest_v2" => Ok(Kind::KafkaRestV2),
            "kafka_rest_v3" => Ok(Kind::KafkaRestV3),
            other => Err(ConfigError::new(format!("unknown endpoint kind {other:?}"))
                .hint("Endpoint kinds are 'webhook', 'kafka_rest_v2' and 'kafka_rest_v3'.")),
        }
    }

    pub fn is_kafka(self) -> bool {
        matches!(self, Kind::KafkaRestV2 | Kind::KafkaRestV3)
    }
}

/// Check an endpoint URL: absolute http(s) with a host, no credentials.
pub fn parse_url(url: &str) -> Result<reqwest::Url> {
    let hint = "Endpoint URLs are absolute http:// or https:// URLs, e.g. 'https://example.com/hooks/orders'.";
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConfigError::new(format!("invalid endpoint URL {url:?}: {e}")).hint(hint))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::new(format!("endpoint URL {url:?} must use http or https")).hint(hint));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(format!("endpoint URL {url:?} has no host")).hint(hint));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // The URL is shown in outbox.stats; credentials belong in headers.
        return Err(ConfigError::new("endpoint URL must not contain credentials")
            .hint("Pass them as a header instead: options => '{\"headers\": {\"authorization\": \"...\"}}'."));
    }
    Ok(parsed)
}

/// What happens to later events of a key whose event went to dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDead {
    /// Later events wait until the dead one is replayed or discarded.
    Block,
    /// Later events go on; the dead one stays in dead letters.
    Skip,
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

/// The validated `options` of an endpoint, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_in_flight: usize,
    pub batch_size: usize,
    pub linger: Duration,
    pub max_attempts: Option<u32>,
    pub max_age: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub on_dead: OnDead,
    pub body: Body,
    /// Signing keys, newest first; several while a key is being rotated.
    pub secrets: Vec<Secret>,
    pub cloudevents: Option<CloudEvents>,
    pub cluster_id: Option<String>,
    pub flavor: Flavor,
    /// PEM certificates trusted for HTTPS besides the usual roots.
    pub ca_cert: Option<String>,
    /// Redirects followed (to allowed hosts only); 0: none.
    pub max_redirects: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_in_flight: 16,
            batch_size: 1,
            linger: Duration::from_millis(5),
            max_attempts: None,
            max_age: None,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            on_dead: OnDead::Block,
            body: Body::Envelope,
            secrets: Vec::new(),
            cloudevents: None,
            cluster_id: None,
            flavor: Flavor::Confluent,
            ca_cert: None,
            max_redirects: 0,
        }
    }
}

/// Every key `options` may hold, with what it means; anything else is an
/// error.
pub const OPTIONS: &[(&str, &str)] = &[
    ("headers", "extra HTTP headers, an object of names to string values"),
    ("timeout_ms", "timeout of one request in milliseconds, default 10000"),
    ("connect_timeout_ms", "timeout to establish a connection in milliseconds, default 5000"),
    ("max_in_flight", "requests in flight at once (one per ordering key), default 16"),
    (
        "batch_size",
        "events per request: Kafka REST records, or a CloudEvents batch; default 100 for Kafka, 1 otherwise",
    ),
    ("linger_ms", "how long a batch may wait to fill up while a request is in flight, default 5"),
    ("max_attempts", "attempts before an event goes to dead letters, default unlimited"),
    ("max_age_s", "seconds after emit when a failing event goes to dead letters (total time), default unlimited"),
    ("backoff_base_ms", "first retry delay ceiling in milliseconds, doubled per attempt, default 500"),
    ("backoff_max_ms", "largest retry delay in milliseconds, default 60000"),
    ("on_dead", "'block' or 'skip': what later events of a key do while one of its events is dead"),
    ("body", "'envelope' (default) or 'data' for the bare payload"),
    ("secret", "Standard Webhooks signing secret 'whsec_<base64>', or an array of them while rotating"),
    ("cloudevents", "'binary' or 'structured': CloudEvents 1.0 HTTP binding for webhooks"),
    ("cluster_id", "Kafka cluster id, required by kafka_rest_v3"),
    ("flavor", "'confluent' (default) or 'redpanda' for kafka_rest_v2"),
    ("ca_cert", "PEM certificate(s) to trust for HTTPS besides the public roots"),
    ("max_redirects", "redirects followed, to hosts outbox.allowed_hosts allows; default 0 (none)"),
];

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
        let d = Options::default();
        let opts = Options {
            headers: parse_headers(map)?,
            timeout: millis(map, "timeout_ms", 1, 300_000)?.unwrap_or(d.timeout),
            connect_timeout: millis(map, "connect_timeout_ms", 1, 300_000)?.unwrap_or(d.connect_timeout),
            max_in_flight: int(map, "max_in_flight", 1, 1024)?.map_or(d.max_in_flight, |v| v as usize),
            batch_size: int(map, "batch_size", 1, 10_000)?.map_or(d.batch_size, |v| v as usize),
            linger: millis(map, "linger_ms", 0, 10_000)?.unwrap_or(d.linger),
            max_attempts: int(map, "max_attempts", 1, 1_000_000)?.map(|v| v as u32),
            max_age: int(map, "max_age_s", 1, 365 * 86_400)?.map(|s| Duration::from_secs(s as u64)),
            backoff_base: millis(map, "backoff_base_ms", 1, 3_600_000)?.unwrap_or(d.backoff_base),
            backoff_max: millis(map, "backoff_max_ms", 1, 86_400_000)?.unwrap_or(d.backoff_max),
            on_dead: match choice(map, "on_dead", &["block", "skip"])? {
                Some("skip") => OnDead::Skip,
                Some(_) => OnDead::Block,
                None => d.on_dead,
            },
            body: match choice(map, "body", &["envelope", "data"])? {
                Some("data") => Body::Data,
                Some(_) => Body::Envelope,
                None => d.body,
            },
            secrets: parse_secrets(map)?,
            cloudevents: match choice(map, "cloudevents", &["binary", "structured"])? {
                Some("binary") => Some(CloudEvents::Binary),
                Some(_) => Some(CloudEvents::Structured),
                None => None,
            },
            cluster_id: match map.get("cluster_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(c)) if !c.is_empty() && c.chars().all(|ch| ch.is_ascii_graphic() && ch != '/') => {
                    Some(c.clone())
                }
                Some(v) => {
                    return Err(ConfigError::new(format!(
                        "option cluster_id must be a cluster id string, got {}",
                        shown(v)
                    ))
                    .hint(option_hint("cluster_id")))
                }
            },
            flavor: match choice(map, "flavor", &["confluent", "redpanda"])? {
                Some("redpanda") => Flavor::Redpanda,
                _ => Flavor::Confluent,
            },
            ca_cert: parse_ca_cert(map)?,
            max_redirects: int(map, "max_redirects", 0, 10)?.map_or(d.max_redirects, |v| v as usize),
        };
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
    fn for_kind(mut self, kind: Kind, given: &Map<String, Value>) -> Result<Options> {
        let only = |key: &str, what: &str| -> Result<()> {
            if given.get(key).is_some_and(|v| !v.is_null()) {
                return Err(
                    ConfigError::new(format!("option {key} applies to {what} endpoints only")).hint(option_hint(key))
                );
            }
            Ok(())
        };
        match kind {
            Kind::Webhook => {
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
                if given.get("batch_size").is_none_or(Value::is_null) {
                    self.batch_size = 100;
                }
            }
        }
        Ok(self)
    }
}

fn parse_secrets(map: &Map<String, Value>) -> Result<Vec<Secret>> {
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
    match map.get("secret") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) if !list.is_empty() && list.len() <= 10 => list.iter().map(one).collect(),
        Some(Value::Array(_)) => {
            Err(ConfigError::new("option secret must list 1 to 10 secrets").hint(option_hint("secret")))
        }
        Some(v) => Ok(vec![one(v)?]),
    }
}

fn parse_ca_cert(map: &Map<String, Value>) -> Result<Option<String>> {
    match map.get("ca_cert") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(pem)) => {
            let ok = pem.contains("-----BEGIN CERTIFICATE-----")
                && reqwest::Certificate::from_pem_bundle(pem.as_bytes()).is_ok_and(|c| !c.is_empty());
            if ok {
                Ok(Some(pem.clone()))
            } else {
                Err(ConfigError::new("option ca_cert is not a PEM certificate").hint(option_hint("ca_cert")))
            }
        }
        Some(_) => Err(ConfigError::new("option ca_cert must be a string").hint(option_hint("ca_cert"))),
    }
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

fn millis(map: &Map<String, Value>, key: &str, min: i64, max: i64) -> Result<Option<Duration>> {
    Ok(int(map, key, min, max)?.map(|ms| Duration::from_millis(ms as u64)))
}

fn choice<'a>(map: &'a Map<String, Value>, key: &str, allowed: &[&str]) -> Result<Option<&'a str>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(Some(s.as_str())),
        Some(v) => {
            Err(ConfigError::new(format!("option {key} must be one of {}, got {}", allowed.join(", "), shown(v)))
                .hint(option_hint(key)))
        }
    }
}

fn parse_headers(map: &Map<String, Value>) -> Result<Vec<(String, String)>> {
    let hint = "headers is an object of header names to string values, e.g. {\"authorization\": \"Bearer ...\"}.";
    let headers = match map.get("headers") {
        None | Some(Value::Null) => return Ok(Vec::new()),
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
    Ok(out)
}

/// A whole endpoint as stored, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub name: String,
    pub kind: Kind,
    pub url: reqwest::Url,
    pub topics: Vec<String>,
    pub options: Options,
}

impl Endpoint {
    pub fn parse(name: &str, url: &str, kind: &str, topics: &[String], options: &Value) -> Result<Endpoint> {
        check_endpoint_name(name)?;
        let kind = Kind::parse(kind)?;
        let url = parse_url(url)?;
        if topics.is_empty() {
            return Err(ConfigError::new("topics must not be empty").hint("Use '{*}' to receive every topic."));
        }
        for pattern in topics {
            check_topic_pattern(pattern)?;
        }
        let given = options.as_object().cloned().unwrap_or_default();
        let options = Options::parse(options)?.for_kind(kind, &given)?;
        if kind.is_kafka() {
            for pattern in topics.iter().filter(|p| !p.contains(['*', '?'])) {
                check_kafka_topic(pattern)?;
            }
        }
        Ok(Endpoint { name: name.to_string(), kind, url, topics: topics.to_vec(), options })
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

/// Longest ordering key, in bytes. Keys are aggregate ids; the limit keeps
/// every key an index entry of outbox.parked (B-tree entries hold at most
/// about 2.7 kB) and bounds what one event costs the worker.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest event type, in bytes.
pub const MAX_TYPE_BYTES: usize = 256;
/// Most event headers, and their largest size as JSON text.
pub const MAX_HEADERS: usize = 64;
pub const MAX_HEADERS_BYTES: usize = 8192;

/// Check an event's key and type (outbox_emit, capture).
pub fn check_key_and_type(key: Option<&str>, event_type: Option<&str>) -> Result<()> {
    if let Some(key) = key.filter(|k| k.len() > MAX_KEY_BYTES) {
        return Err(ConfigError::new(format!("key is {} bytes long, longer than {MAX_KEY_BYTES}", key.len()))
            .hint("The key names the aggregate (an order id, say); use a shorter id or a hash of it."));
    }
    if let Some(t) = event_type.filter(|t| t.len() > MAX_TYPE_BYTES) {
        return Err(ConfigError::new(format!("event_type is {} bytes long, longer than {MAX_TYPE_BYTES}", t.len()))
            .hint("Event types are short names such as 'order.paid'."));
    }
    Ok(())
}

/// Check event headers given to outbox_emit: an object of strings, at most
/// MAX_HEADERS of them and MAX_HEADERS_BYTES in all. Values are never
/// repeated in messages (they may be tokens).
pub fn check_event_headers(headers: &Value) -> Result<()> {
    let hint = "Event headers are a JSON object of string values, e.g. '{\"trace-id\": \"abc\"}'.";
    let Value::Object(map) = headers else {
        return Err(ConfigError::new(format!("headers must be a JSON object, got {}", json_type(headers))).hint(hint));
    };
    if map.len() > MAX_HEADERS {
        return Err(ConfigError::new(format!("{} headers, more than {MAX_HEADERS}", map.len())).hint(hint));
    }
    let mut bytes = 2;
    for (name, value) in map {
        let lower = name.to_ascii_lowercase();
        if ["outbox-", "ce_", "ce-", "webhook-"].iter().any(|p| lower.starts_with(p)) {
            return Err(ConfigError::new(format!("header {:?} is set by outbox itself", shorten(name))).hint(
                "Names starting with outbox-, ce_, ce- and webhook- carry the event's own id and type: \
                 choose another name.",
            ));
        }
        let Value::String(text) = value else {
            return Err(ConfigError::new(format!(
                "header {:?} must have a string value, got {}",
                shorten(name),
                json_type(value)
            ))
            .hint(hint));
        };
        bytes += name.len() + text.len() + 6;
    }
    if bytes > MAX_HEADERS_BYTES {
        return Err(ConfigError::new(format!("headers are about {bytes} bytes, more than {MAX_HEADERS_BYTES}"))
            .hint("Headers carry small metadata (trace ids, tenants); put data in the payload."));
    }
    Ok(())
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
fn shown(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => json_type(other).to_string(),
    }
}

/// A name as shown in a message: at most 64 characters.
fn shorten(name: &str) -> String {
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
    fn topics() {
        assert!(check_topic("orders").is_ok());
        assert!(check_topic("orders.created-v2/eu:1_x").is_ok());
        assert_eq!(check_topic("").unwrap_err().message, "topic must not be empty");
        assert!(check_topic("has space").unwrap_err().message.contains("' '"));
        assert!(check_topic("a*").is_err());
        assert!(check_topic(&"x".repeat(250)).unwrap_err().message.contains("250"));
        assert!(check_topic(&"x".repeat(249)).is_ok());
    }

    #[test]
    fn patterns() {
        assert!(check_topic_pattern("orders.*").is_ok());
        assert!(check_topic_pattern("order?").is_ok());
        assert!(check_topic_pattern("").is_err());
        assert!(check_topic_pattern("a b").is_err());
    }

    #[test]
    fn urls() {
        assert!(parse_url("https://example.com/hook").is_ok());
        assert!(parse_url("http://127.0.0.1:8080").is_ok());
        assert!(parse_url("ftp://example.com").unwrap_err().message.contains("http or https"));
        assert!(parse_url("not a url").unwrap_err().message.contains("invalid endpoint URL"));
        assert!(parse_url("https://user:pw@example.com").unwrap_err().message.contains("credentials"));
        assert!(parse_url("/relative").is_err());
    }

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

    #[test]
    fn merging() {
        let merged = merge_options(&json!({"a": 1, "b": 2}), &json!({"b": null, "c": 3})).unwrap();
        assert_eq!(merged, json!({"a": 1, "c": 3}));
        assert!(merge_options(&json!({}), &json!(1)).is_err());
    }

    #[test]
    fn event_headers() {
        assert!(check_event_headers(&json!({})).is_ok());
        assert!(check_event_headers(&json!({"a": "b"})).is_ok());
        assert!(check_event_headers(&json!([1])).is_err());
        assert!(check_event_headers(&json!({"a": 1})).unwrap_err().message.contains("string value"));
        for reserved in ["outbox-id", "Outbox-Type", "ce_id", "ce-source", "webhook-id"] {
            let e = check_event_headers(&json!({ reserved: "forged" })).unwrap_err();
            assert!(e.message.contains("set by outbox"), "{reserved}: {}", e.message);
        }
    }
}
