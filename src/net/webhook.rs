//! Webhook requests: the JSON envelope and the Standard Webhooks headers.

use super::Target;
use crate::config::Body;
use crate::event::Event;
use serde::Serialize;
use serde_json::value::RawValue;

/// The event as delivered (DESIGN.md, "Wire formats").
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    topic: &'a str,
    key: Option<&'a str>,
    #[serde(rename = "type")]
    event_type: Option<&'a str>,
    timestamp: &'a str,
    data: &'a RawValue,
    headers: &'a RawValue,
}

fn raw(json: &str) -> &RawValue {
    // Postgres produced this text from a jsonb value: it is valid JSON.
    serde_json::from_str(json).unwrap_or_else(|_| serde_json::from_str("null").expect("null is JSON"))
}

/// The JSON envelope of an event.
pub fn envelope(event: &Event) -> String {
    let envelope = Envelope {
        id: &event.id,
        topic: &event.topic,
        key: event.key.as_deref(),
        event_type: event.event_type.as_deref(),
        timestamp: &event.timestamp,
        data: raw(&event.payload),
        headers: raw(&event.headers),
    };
    serde_json::to_string(&envelope).expect("serializing borrowed JSON cannot fail")
}

/// The body a webhook endpoint receives for `event`.
pub fn body(target: &Target, event: &Event) -> String {
    match target.body {
        Body::Envelope => envelope(event),
        Body::Data => event.payload.clone(),
    }
}

/// Build the POST for one event. `now_unix` becomes `webhook-timestamp`.
pub fn request(client: &reqwest::Client, target: &Target, event: &Event, now_unix: u64) -> reqwest::RequestBuilder {
    let mut request = client
        .post(target.url.clone())
        .timeout(target.timeout)
        .headers(target.headers.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &event.id)
        .header("webhook-timestamp", now_unix.to_string());
    if target.body == Body::Data {
        // The bare payload carries no envelope: name the event in headers.
        request = request.header("outbox-topic", &event.topic);
        if let Some(t) = event.event_type.as_deref().filter(|t| is_header_safe(t)) {
            request = request.header("outbox-type", t);
        }
        if let Some(k) = event.key.as_deref().filter(|k| is_header_safe(k)) {
            request = request.header("outbox-key", k);
        }
    }
    request.body(body(target, event))
}

fn is_header_safe(value: &str) -> bool {
    reqwest::header::HeaderValue::from_str(value).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;
    use std::time::SystemTime;

    pub fn sample() -> Event {
        Event {
            position: Position { batch: 1, rank: 1, txid: 10, n: 1 },
            id: "0190a0a0-0000-7000-8000-000000000001".into(),
            topic: "orders".into(),
            key: Some("o-1".into()),
            event_type: Some("created".into()),
            payload: r#"{"total": 12.5, "items": [1, 2]}"#.into(),
            headers: r#"{"trace": "t1"}"#.into(),
            timestamp: "2026-11-26T18:00:00.000001Z".into(),
            created: SystemTime::now(),
        }
    }

    #[test]
    fn envelope_has_every_field_and_embeds_json() {
        let v: serde_json::Value = serde_json::from_str(&envelope(&sample())).unwrap();
        assert_eq!(v["id"], "0190a0a0-0000-7000-8000-000000000001");
        assert_eq!(v["topic"], "orders");
        assert_eq!(v["key"], "o-1");
        assert_eq!(v["type"], "created");
        assert_eq!(v["timestamp"], "2026-11-26T18:00:00.000001Z");
        assert_eq!(v["data"]["items"][1], 2);
        assert_eq!(v["headers"]["trace"], "t1");
    }

    #[test]
    fn missing_key_and_type_are_null() {
        let mut e = sample();
        e.key = None;
        e.event_type = None;
        let v: serde_json::Value = serde_json::from_str(&envelope(&e)).unwrap();
        assert!(v["key"].is_null() && v["type"].is_null());
    }
}
