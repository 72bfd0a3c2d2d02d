//! Topics, topic patterns, endpoint names and URLs.

use super::{ConfigError, Result};

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

/// A Kafka broker to bootstrap from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Most brokers a `kafka://` URL may list.
const MAX_BROKERS: usize = 32;

/// Check a Kafka endpoint's address: `kafka://host:port,host:port`
/// (`[::1]:9092` for IPv6; port 9092 when left out), nothing else.
pub fn parse_brokers(url: &str) -> Result<Vec<Broker>> {
    let hint = "Kafka endpoints are 'kafka://host:port' or 'kafka://host1:9092,host2:9092' (the bootstrap brokers); \
                TLS and SASL are options.";
    let bad = |what: String| ConfigError::new(what).hint(hint);
    let Some(list) = url.strip_prefix("kafka://") else {
        return Err(bad("a kafka endpoint URL must start with kafka://".into()));
    };
    let list = list.strip_suffix('/').unwrap_or(list);
    if list.contains(['/', '?', '#', '@']) {
        return Err(bad("a kafka endpoint URL holds brokers only (no path, query or credentials)".into()));
    }
    let mut brokers = Vec::new();
    for item in list.split(',').map(str::trim) {
        let (host, port) = match item.strip_prefix('[') {
            Some(rest) => {
                let (host, after) = rest.split_once(']').ok_or_else(|| bad(format!("invalid broker {item:?}")))?;
                if host.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(bad(format!("invalid broker {item:?}")));
                }
                (host, after.strip_prefix(':'))
            }
            None => match item.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (item, None),
            },
        };
        let port = match port {
            None => 9092,
            Some(p) => {
                p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad(format!("invalid port in {item:?}")))?
            }
        };
        let name_ok = |h: &str| {
            !h.is_empty() && h.len() <= 253 && h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        };
        if !(name_ok(host) || host.parse::<std::net::IpAddr>().is_ok()) {
            return Err(bad(format!("invalid broker host in {item:?}")));
        }
        brokers.push(Broker { host: host.to_ascii_lowercase(), port });
    }
    if brokers.len() > MAX_BROKERS {
        return Err(bad(format!("{} brokers, more than {MAX_BROKERS}", brokers.len())));
    }
    Ok(brokers)
}
#[cfg(test)]
mod tests {
    use super::*;

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
    fn brokers() {
        let b = parse_brokers("kafka://k1:9093, K2,[::1]:19092/").unwrap();
        assert_eq!(b.iter().map(ToString::to_string).collect::<Vec<_>>(), ["k1:9093", "k2:9092", "[::1]:19092"]);
        for bad in [
            "http://k:9092",
            "kafka://",
            "kafka://k:0",
            "kafka://k:x",
            "kafka://u:p@k:9092",
            "kafka://k/t",
            "kafka://k:9092,,k2",
            "kafka://[k]:1",
            "kafka://a b:1",
        ] {
            assert!(parse_brokers(bad).is_err(), "{bad}");
        }
        assert!(parse_brokers(&format!("kafka://{}", vec!["k:1"; 33].join(","))).is_err());
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
}
