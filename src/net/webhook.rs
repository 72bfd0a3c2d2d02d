//! Webhooks: the outbox envelope or CloudEvents 1.0 (binary, structured
//! or batched), with Standard Webhooks headers and signatures. Any 2xx
//! acknowledges every event of the request.

use super::envelope::{self, ce_type, structured};
use super::failure::Failure;
use super::http::Request;
use super::target::Http;
use super::{signature, Gate, Target};
use crate::config::{Body, CloudEvents};
use crate::event::Event;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::Url;
use std::sync::Arc;

/// Send `events` (one, or a CloudEvents batch) in one request.
pub async fn deliver(
    http: &Http,
    target: &Target,
    gate: &Gate,
    events: &[Arc<Event>],
    now_unix: u64,
) -> Vec<Result<(), Failure>> {
    let request = match super::build_request(gate, events, || request(&http.url, target, events, now_unix)).await {
        Ok(request) => request,
        Err(failure) => return vec![Err(failure); events.len()],
    };
    let outcome = match http.client.send(request).await {
        Ok(answer) if answer.status.is_success() => Ok(()),
        Ok(answer) => Err(answer.failure()),
        Err(failure) => Err(failure),
    };
    vec![outcome; events.len()]
}

fn put(headers: &mut HeaderMap, name: &'static str, value: &str) {
    // Values that cannot be header values (control characters in a key,
    // say) are left out rather than failing the delivery.
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// The request for `events`: one event, or several when the endpoint
/// takes CloudEvents batches. `now_unix` becomes `webhook-timestamp`.
pub fn request(url: &Url, target: &Target, events: &[Arc<Event>], now_unix: u64) -> Request {
    let first = &events[0];
    let opts = target.options();
    let mut headers = HeaderMap::new();
    let body: Vec<u8> = match opts.cloudevents {
        None => {
            put(&mut headers, "content-type", "application/json");
            if opts.body == Body::Data {
                // The bare payload carries no envelope: name the event here.
                put(&mut headers, "outbox-topic", &first.topic);
                if let Some(t) = first.event_type.as_deref() {
                    put(&mut headers, "outbox-type", t);
                }
                if let Some(k) = first.key.as_deref() {
                    put(&mut headers, "outbox-key", k);
                }
            }
            envelope::value(opts.body, first).into_bytes()
        }
        Some(CloudEvents::Binary) => {
            put(&mut headers, "content-type", "application/json");
            put(&mut headers, "ce-specversion", "1.0");
            put(&mut headers, "ce-id", &first.id);
            put(&mut headers, "ce-source", &target.source);
            put(&mut headers, "ce-type", ce_type(first));
            put(&mut headers, "ce-time", &first.timestamp);
            put(&mut headers, "ce-topic", &first.topic);
            if let Some(k) = first.key.as_deref() {
                put(&mut headers, "ce-subject", k);
            }
            first.payload.clone().into_bytes()
        }
        Some(CloudEvents::Structured) if events.len() == 1 => {
            put(&mut headers, "content-type", "application/cloudevents+json; charset=utf-8");
            serde_json::to_vec(&structured(&target.source, first)).expect("serializable")
        }
        Some(CloudEvents::Structured) => {
            put(&mut headers, "content-type", "application/cloudevents-batch+json; charset=utf-8");
            let batch: Vec<_> = events.iter().map(|e| structured(&target.source, e)).collect();
            serde_json::to_vec(&batch).expect("serializable")
        }
    };
    // Standard Webhooks: the first event's id names the message (a batch
    // carries each event's own id inside).
    put(&mut headers, "webhook-id", &first.id);
    put(&mut headers, "webhook-timestamp", &now_unix.to_string());
    if let Some(sig) = signature::sign(&opts.secrets, &first.id, now_unix, &body) {
        put(&mut headers, "webhook-signature", &sig);
    }
    debug_assert!(headers.contains_key(CONTENT_TYPE));
    Request { url: url.clone(), headers, body }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Secret};
    use crate::net::envelope::tests::sample;
    use serde_json::json;

    fn target(options: serde_json::Value) -> Target {
        let ep = config::Endpoint::parse("t", "http://127.0.0.1:1/", "webhook", &["*".into()], &options).unwrap();
        Target::new(ep, "/outbox/db", Arc::default()).unwrap()
    }

    fn url() -> Url {
        Url::parse("http://127.0.0.1:1/").unwrap()
    }

    fn header<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
        r.headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn plain_webhook_with_standard_headers_and_signature() {
        let t = target(json!({"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "headers": {"x-a": "b"}}));
        let r = request(&url(), &t, &[Arc::new(sample())], 1614265330);
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        assert_eq!(header(&r, "webhook-id"), Some("0190a0a0-0000-7000-8000-000000000001"));
        assert_eq!(header(&r, "webhook-timestamp"), Some("1614265330"));
        assert_eq!(header(&r, "x-a"), None, "the endpoint's own headers are the client's (http.rs)");
        let expected =
            signature::sign(&t.options().secrets, "0190a0a0-0000-7000-8000-000000000001", 1614265330, &r.body).unwrap();
        assert_eq!(header(&r, "webhook-signature"), Some(expected.as_str()));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["data"]["total"], 12.5);
    }

    #[test]
    fn bare_data_names_the_event_in_headers() {
        let r = request(&url(), &target(json!({"body": "data"})), &[Arc::new(sample())], 1);
        assert_eq!(r.body, sample().payload.as_bytes());
        assert_eq!(header(&r, "outbox-topic"), Some("orders"));
        assert_eq!(header(&r, "outbox-type"), Some("created"));
        assert_eq!(header(&r, "outbox-key"), Some("o-1"));
        assert!(header(&r, "webhook-signature").is_none());
    }

    #[test]
    fn cloudevents_binary_mode() {
        let r = request(&url(), &target(json!({"cloudevents": "binary"})), &[Arc::new(sample())], 1);
        assert_eq!(header(&r, "ce-specversion"), Some("1.0"));
        assert_eq!(header(&r, "ce-id"), Some("0190a0a0-0000-7000-8000-000000000001"));
        assert_eq!(header(&r, "ce-source"), Some("/outbox/db"));
        assert_eq!(header(&r, "ce-type"), Some("created"));
        assert_eq!(header(&r, "ce-subject"), Some("o-1"));
        assert_eq!(header(&r, "ce-time"), Some("2026-11-26T18:00:00.000001Z"));
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        assert_eq!(r.body, sample().payload.as_bytes());
    }

    #[test]
    fn cloudevents_structured_and_batched() {
        let t = target(json!({"cloudevents": "structured", "batch_size": 10}));
        let one = request(&url(), &t, &[Arc::new(sample())], 1);
        assert_eq!(header(&one, "content-type"), Some("application/cloudevents+json; charset=utf-8"));
        let v: serde_json::Value = serde_json::from_slice(&one.body).unwrap();
        assert_eq!(v["specversion"], "1.0");
        let mut second = sample();
        second.id = "0190a0a0-0000-7000-8000-000000000002".into();
        let batch = request(&url(), &t, &[Arc::new(sample()), Arc::new(second)], 1);
        assert_eq!(header(&batch, "content-type"), Some("application/cloudevents-batch+json; charset=utf-8"));
        let v: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(v[1]["id"], "0190a0a0-0000-7000-8000-000000000002");
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(format!("{:?}", Secret(vec![1, 2, 3])), "Secret(..)");
        let t = target(json!({"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}));
        assert!(!format!("{t:?}").contains("MfKQ"));
    }
}
