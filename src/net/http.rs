//! HTTP transport: the shared client, one delivery, and what an answer means.

use super::{webhook, Failure, Verdict};
use crate::config::{self, Body};
use crate::event::Event;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;
use std::time::{Duration, SystemTime};

/// Response bytes read at most: enough for an error message, and small
/// enough that a hostile endpoint cannot fill the worker's memory.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Characters of a response body kept in an error message.
const ERROR_SNIPPET_CHARS: usize = 200;

/// Everything the network side needs to know about an endpoint.
#[derive(Debug)]
pub struct Target {
    pub url: reqwest::Url,
    pub headers: HeaderMap,
    pub timeout: Duration,
    pub body: Body,
}

impl Target {
    pub fn new(endpoint: &config::Endpoint) -> Target {
        let mut headers = HeaderMap::new();
        for (name, value) in &endpoint.options.headers {
            // Validated by config::Options::parse.
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
                headers.insert(n, v);
            }
        }
        Target { url: endpoint.url.clone(), headers, timeout: endpoint.options.timeout, body: endpoint.options.body }
    }
}

pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        // A redirect would send events somewhere nobody configured.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .user_agent(concat!("outbox/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Send one event; Ok when the endpoint acknowledged it.
pub async fn deliver(client: &reqwest::Client, target: &Target, event: &Event) -> Result<(), Failure> {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    let request = webhook::request(client, target, event, now);
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Err(transport_failure(e, target.timeout)),
    };
    let status = response.status();
    let retry_after = response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| parse_retry_after(v, now));
    let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    if status.is_success() {
        // Drain (bounded) so the connection can be reused.
        let _ = read_capped(response).await;
        return Ok(());
    }
    let body = read_capped(response).await.unwrap_or_default();
    Err(classify(status, retry_after, &body, location.as_deref()))
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
}
