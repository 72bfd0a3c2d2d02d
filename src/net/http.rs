//! HTTP transport: an endpoint's client, one request, and what an answer
//! means.

use super::{kafka, webhook, Failure, NetError, Verdict};
use crate::config::{self, Body, CloudEvents, Flavor, Kind, Secret};
use crate::egress::AllowList;
use crate::event::Event;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Response bytes read at most: enough for an error message or a Kafka
/// batch's results, and small enough that a hostile endpoint cannot fill
/// the worker's memory.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Characters of a response body kept in an error message.
const ERROR_SNIPPET_CHARS: usize = 200;

/// Everything the network side needs to know about an endpoint.
pub struct Target {
    pub kind: Kind,
    pub url: reqwest::Url,
    pub headers: HeaderMap,
    pub timeout: Duration,
    pub body: Body,
    pub secrets: Vec<Secret>,
    pub cloudevents: Option<CloudEvents>,
    pub cluster_id: Option<String>,
    pub flavor: Flavor,
    /// CloudEvents `source`.
    pub source: String,
    /// Where requests may go (outbox.allowed_hosts when the target was made).
    allowed: Arc<AllowList>,
    /// The endpoint's own client: its connection pool, connect timeout and
    /// trusted certificates.
    client: reqwest::Client,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Headers may hold credentials and secrets must never print.
        f.debug_struct("Target").field("kind", &self.kind).field("url", &self.url.as_str()).finish_non_exhaustive()
    }
}

impl Target {
    /// `source` names where events come from (CloudEvents), e.g.
    /// `/outbox/<database>`. Builds the endpoint's HTTP client; no request
    /// is made and no thread started.
    pub fn new(endpoint: &config::Endpoint, source: &str, allowed: Arc<AllowList>) -> Result<Target, NetError> {
        let opts = &endpoint.options;
        let mut headers = HeaderMap::new();
        for (name, value) in &opts.headers {
            // Validated by config::Options::parse.
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
                headers.insert(n, v);
            }
        }
        // By default a redirect is not followed: it would send events
        // somewhere nobody configured. With max_redirects, only to hosts the
        // allow-list allows.
        let policy = match opts.max_redirects {
            0 => reqwest::redirect::Policy::none(),
            max => {
                let allowed = allowed.clone();
                reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() > max {
                        attempt.error(format!("more than {max} redirects"))
                    } else if !allowed.allows(attempt.url()) {
                        let host = attempt.url().host_str().unwrap_or("").to_string();
                        attempt.error(format!("redirect to {host} is not allowed by outbox.allowed_hosts"))
                    } else {
                        attempt.follow()
                    }
                })
            }
        };
        let mut builder = reqwest::Client::builder()
            .redirect(policy)
            .connect_timeout(opts.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(opts.max_in_flight)
            .tcp_nodelay(true)
            .user_agent(concat!("outbox/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &opts.ca_cert {
            for cert in
                reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| NetError(format!("ca_cert: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| NetError(format!("building the HTTP client: {e}")))?;
        Ok(Target {
            kind: endpoint.kind,
            url: endpoint.url.clone(),
            headers,
            timeout: opts.timeout,
            body: opts.body,
            secrets: opts.secrets.clone(),
            cloudevents: opts.cloudevents,
            cluster_id: opts.cluster_id.clone(),
            flavor: opts.flavor,
            source: source.to_string(),
            allowed,
            client,
        })
    }

    /// The URL of `path` below the endpoint's base URL.
    fn below(&self, path: &str) -> reqwest::Url {
        let mut url = self.url.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base}{path}"));
        url
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Send `events` (one request) and tell, per event, whether it was taken.
pub async fn deliver(target: &Target, events: &[Arc<Event>]) -> Vec<Result<(), Failure>> {
    let n = events.len();
    if !target.allowed.allows(&target.url) {
        // Kept, not dropped: delivery resumes once the host is allowed again.
        let message = AllowList::refusal(&target.url).message;
        return vec![Err(Failure { verdict: Verdict::Retry { after: None }, status: None, message }); n];
    }
    let request = match target.kind {
        Kind::Webhook => {
            let r = webhook::build(target, events, now_unix());
            target.client.post(target.url.clone()).headers(r.headers).body(r.body)
        }
        Kind::KafkaRestV2 => target
            .client
            .post(target.below(&kafka::v2_path(&events[0].topic)))
            .headers(target.headers.clone())
            .header(CONTENT_TYPE, kafka::V2_CONTENT_TYPE)
            .header(ACCEPT, kafka::V2_ACCEPT)
            .body(kafka::v2_body(target.body, events)),
        Kind::KafkaRestV3 => target
            .client
            .post(target.below(&kafka::v3_path(target.cluster_id.as_deref().unwrap_or(""), &events[0].topic)))
            .headers(target.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(kafka::v3_body(target.body, events)),
    };
    let response = match request.timeout(target.timeout).send().await {
        Ok(r) => r,
        Err(e) => return vec![Err(transport_failure(e, target.timeout)); n],
    };
    let status = response.status();
    let retry_after =
        response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| parse_retry_after(v, now_unix()));
    let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = match read_capped(response).await {
        Ok(b) => b,
        // The answer was cut short: only a success can be trusted as such.
        Err(e) if !status.is_success() => Vec::from(e.to_string()),
        Err(e) => return vec![Err(transport_failure(e, target.timeout)); n],
    };
    match target.kind {
        Kind::Webhook if status.is_success() => vec![Ok(()); n],
        Kind::Webhook => vec![Err(classify(status, retry_after, &body, location.as_deref())); n],
        Kind::KafkaRestV2 if status.is_success() => kafka::v2_results(target.flavor, &body, n),
        Kind::KafkaRestV3 if status.is_success() => kafka::v3_results(&body, n),
        Kind::KafkaRestV2 | Kind::KafkaRestV3 => kafka::request_failed(status, retry_after, &body, n),
    }
}

/// What a non-2xx answer means.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8], location: Option<&str>) -> Failure {
    let code = status.as_u16();
    let mut message = format!("HTTP {code}");
    if let Some(reason) = status.canonical_reason() {
        message.push(' ');
        message.push_str(reason);
    }
    if let Some(to) = location.filter(|_| status.is_redirection()) {
        message.push_str(&format!(" (redirect to {to} not followed)"));
    }
    let snippet: String = String::from_utf8_lossy(body).chars().take(ERROR_SNIPPET_CHARS).collect();
    let snippet = snippet.trim();
    if !snippet.is_empty() {
        message.push_str(": ");
        message.push_str(snippet);
    }
    let verdict = match code {
        410 => Verdict::Gone,
        408 | 409 | 425 | 429 => Verdict::Retry { after: retry_after },
        300..=499 => Verdict::Reject,
        _ => Verdict::Retry { after: retry_after },
    };
    Failure { verdict, status: Some(code), message }
}

fn transport_failure(e: reqwest::Error, timeout: Duration) -> Failure {
    // The URL is in outbox.stats already; keep it out of error texts.
    let e = e.without_url();
    let message = if e.is_timeout() {
        format!("timed out after {} ms", timeout.as_millis())
    } else if e.is_connect() {
        format!("connection failed: {}", error_chain(&e))
    } else {
        format!("request failed: {}", error_chain(&e))
    };
    Failure { verdict: Verdict::Retry { after: None }, status: None, message }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &HeaderValue, now_unix: u64) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    let at = at.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now_unix)))
}

async fn read_capped(mut response: reqwest::Response) -> reqwest::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_RESPONSE_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_RESPONSE_BYTES {
            break; // dropping the response closes the connection
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let f = |code: u16| classify(StatusCode::from_u16(code).unwrap(), None, b"", None).verdict;
        assert_eq!(f(500), Verdict::Retry { after: None });
        assert_eq!(f(503), Verdict::Retry { after: None });
        assert_eq!(f(429), Verdict::Retry { after: None });
        assert_eq!(f(408), Verdict::Retry { after: None });
        assert_eq!(f(400), Verdict::Reject);
        assert_eq!(f(404), Verdict::Reject);
        assert_eq!(f(422), Verdict::Reject);
        assert_eq!(f(301), Verdict::Reject);
        assert_eq!(f(410), Verdict::Gone);
    }

    #[test]
    fn messages_carry_status_and_a_bounded_snippet() {
        let body = "x".repeat(10_000);
        let f = classify(StatusCode::INTERNAL_SERVER_ERROR, None, body.as_bytes(), None);
        assert!(f.message.starts_with("HTTP 500 Internal Server Error: xxx"));
        assert!(f.message.len() < 300);
        let r = classify(StatusCode::FOUND, None, b"", Some("http://elsewhere/"));
        assert!(r.message.contains("redirect to http://elsewhere/ not followed"));
    }

    #[test]
    fn retry_after_forms() {
        let now = 1_700_000_000;
        assert_eq!(parse_retry_after(&HeaderValue::from_static("7"), now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(now + 30));
        assert_eq!(parse_retry_after(&HeaderValue::from_str(&date).unwrap(), now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon"), now), None);
    }

    #[test]
    fn paths_below_the_base_url() {
        let ep = |url: &str, kind: &str, opts: serde_json::Value| {
            let e = config::Endpoint::parse("k", url, kind, &["*".into()], &opts).unwrap();
            Target::new(&e, "/s", Arc::default()).unwrap()
        };
        let t = ep("http://proxy:8082", "kafka_rest_v2", serde_json::json!({}));
        assert_eq!(t.below(&kafka::v2_path("orders")).as_str(), "http://proxy:8082/topics/orders");
        let t = ep("http://proxy:8082/kafka/", "kafka_rest_v3", serde_json::json!({"cluster_id": "abc"}));
        assert_eq!(
            t.below(&kafka::v3_path("abc", "orders")).as_str(),
            "http://proxy:8082/kafka/v3/clusters/abc/topics/orders/records"
        );
    }
}
