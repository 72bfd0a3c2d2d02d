//! Why a delivery failed and what to do about it, decided in one place for
//! every protocol: HTTP statuses, transport errors, `Retry-After`.

use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use std::time::{Duration, SystemTime};

/// Characters of an answer (body, `Location`) kept in an error message:
/// enough to read, small enough that an endpoint cannot fill
/// `outbox.progress` or the dead letters.
const SNIPPET_CHARS: usize = 200;
/// The longest `Retry-After` honoured (one hour): a larger value waits
/// this long, an unreadable one is ignored. Either way it cannot overflow
/// a clock, and an endpoint that asks for a long pause holds back only
/// itself.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Why a delivery failed, and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub verdict: Verdict,
    /// HTTP status, when the endpoint answered.
    pub status: Option<u16>,
    /// For people: status, a bit of the response, or the transport error.
    pub message: String,
}

impl Failure {
    /// Whether the failure says the endpoint itself is unavailable (a
    /// retry with no answer at all: refused, reset, timed out; or 429,
    /// 502, 503, 504) rather than that it refused this event (a 500 for
    /// one key while other keys go through; a reject, with or without an
    /// answer).
    pub fn endpoint_unavailable(&self) -> bool {
        matches!(self.verdict, Verdict::Retry { .. }) && matches!(self.status, None | Some(429 | 502 | 503 | 504))
    }

    /// Whether the failure may stop the whole endpoint (a hold from
    /// Retry-After, 410 Gone, or the start of an outage) rather than only
    /// its own event.
    pub fn may_hold_the_endpoint(&self) -> bool {
        self.endpoint_unavailable() || matches!(self.verdict, Verdict::Gone | Verdict::Retry { after: Some(_) })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Worth trying again, no sooner than `after` when the endpoint said so.
    Retry { after: Option<Duration> },
    /// The endpoint refused this event for good (most 4xx).
    Reject,
    /// The endpoint is gone (410): stop sending to it.
    Gone,
    /// Never sent: its state changed while it waited to go out (the gate
    /// closed, net::Gate). Not the endpoint's doing and not an attempt:
    /// the event goes out again when the worker hands it out anew.
    Unsent,
}

impl Failure {
    pub fn retry(message: impl Into<String>) -> Failure {
        Failure { verdict: Verdict::Retry { after: None }, status: None, message: message.into() }
    }

    pub fn unsent(message: impl Into<String>) -> Failure {
        Failure { verdict: Verdict::Unsent, status: None, message: message.into() }
    }

    pub fn reject(message: impl Into<String>) -> Failure {
        Failure { verdict: Verdict::Reject, status: None, message: message.into() }
    }
}

/// Text from an endpoint, fit for an error message: at most SNIPPET_CHARS
/// characters, control characters replaced, trimmed.
pub fn snippet(bytes: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(bytes)
        .chars()
        .take(SNIPPET_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    if bytes.len() > text.len() && text.chars().count() == SNIPPET_CHARS {
        format!("{text}...")
    } else {
        text.to_string()
    }
}

/// What a non-2xx answer means. `location` is named in the message for
/// redirects that were not followed.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8], location: Option<&[u8]>) -> Failure {
    let code = status.as_u16();
    let mut message = format!("HTTP {code}");
    if let Some(reason) = status.canonical_reason() {
        message.push(' ');
        message.push_str(reason);
    }
    if let Some(to) = location.filter(|_| status.is_redirection()) {
        message.push_str(&format!(" (redirect to {} not followed)", snippet(to)));
    }
    let body = snippet(body);
    if !body.is_empty() {
        message.push_str(": ");
        message.push_str(&body);
    }
    let verdict = match code {
        410 => Verdict::Gone,
        408 | 409 | 425 | 429 => Verdict::Retry { after: retry_after },
        300..=499 => Verdict::Reject,
        _ => Verdict::Retry { after: retry_after },
    };
    Failure { verdict, status: Some(code), message }
}

/// A request through reqwest that got no usable answer.
pub fn transport(e: reqwest::Error, timeout: Duration) -> Failure {
    // The URL is in outbox.stats already; keep it out of error texts.
    let e = e.without_url();
    if e.is_timeout() {
        timed_out(timeout)
    } else if e.is_connect() {
        connect_failed(&error_chain(&e))
    } else {
        request_failed(&error_chain(&e))
    }
}

/// No (whole) answer within the endpoint's `timeout`.
pub fn timed_out(timeout: Duration) -> Failure {
    Failure::retry(format!("timed out after {} ms", timeout.as_millis()))
}

/// No connection; `why` is already fit for a message (a snippet).
pub fn connect_failed(why: &str) -> Failure {
    Failure::retry(format!("connection failed: {why}"))
}

/// The request failed on an open connection; `why` as for connect_failed.
pub fn request_failed(why: &str) -> Failure {
    Failure::retry(format!("request failed: {why}"))
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
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
    snippet(out.as_bytes())
}

/// `Retry-After` as delta-seconds or an HTTP date, at most
/// MAX_RETRY_AFTER; None when unreadable.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let wait = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Digits beyond u64 are "very long" too.
        Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX).min(MAX_RETRY_AFTER.as_secs()))
    } else {
        let at = httpdate::parse_http_date(text).ok()?;
        at.duration_since(now).unwrap_or_default()
    };
    Some(wait.min(MAX_RETRY_AFTER))
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

    /// Only a retry can mean the endpoint is unavailable (no answer, or 429,
    /// 502, 503, 504). A reject is about its event, also when no status
    /// came with it (a topic Kafka cannot take, refused before sending),
    /// and an unsent request says nothing of the endpoint.
    #[test]
    fn only_a_retry_can_say_the_endpoint_is_unavailable() {
        assert!(Failure::retry("connection refused").may_hold_the_endpoint());
        let at = |status| Failure { status: Some(status), ..Failure::retry("") };
        assert!(at(503).endpoint_unavailable() && !at(500).endpoint_unavailable());
        assert!(!Failure::reject("not a valid Kafka topic name").may_hold_the_endpoint());
        assert!(!Failure::unsent("not sent").may_hold_the_endpoint());
    }

    #[test]
    fn messages_carry_status_and_a_bounded_snippet() {
        let body = "x".repeat(10_000);
        let f = classify(StatusCode::INTERNAL_SERVER_ERROR, None, body.as_bytes(), None);
        assert!(f.message.starts_with("HTTP 500 Internal Server Error: xxx"));
        assert!(f.message.len() < 300);
        let r = classify(StatusCode::FOUND, None, b"", Some(b"http://elsewhere/"));
        assert!(r.message.contains("redirect to http://elsewhere/ not followed"));
        // A hostile Location is bounded and stripped of control characters.
        let long = format!("http://x/{}\r\nset-cookie: a", "y".repeat(100_000));
        let r = classify(StatusCode::FOUND, None, b"", Some(long.as_bytes()));
        assert!(r.message.len() < 300 && !r.message.contains('\n'), "{}", r.message);
    }

    #[test]
    fn retry_after_forms_and_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let parse = |s: &str| parse_retry_after(&HeaderValue::from_str(s).unwrap(), now);
        assert_eq!(parse("7"), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse(&date), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse(&past), Some(Duration::ZERO));
        assert_eq!(parse("soon"), None);
        assert_eq!(parse("-5"), None);
        assert_eq!(parse("18446744073709551615"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse("99999999999999999999999999"), Some(MAX_RETRY_AFTER));
    }
}
