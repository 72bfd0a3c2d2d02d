//! What an event looks like on the wire: the outbox envelope (webhook body,
//! Kafka record value) and the CloudEvents 1.0 structured form.

use crate::config::Body;
use crate::event::Event;
use serde::Serialize;
use serde_json::value::RawValue;

/// The event as delivered (README, "Endpoint kinds").
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

/// JSON text produced by Postgres from a jsonb value.
pub fn raw(json: &str) -> &RawValue {
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

/// The body (or record value) for `event`: the envelope, or the bare data.
pub fn value(body: Body, event: &Event) -> String {
    match body {
        Body::Envelope => envelope(event),
        Body::Data => event.payload.clone(),
    }
}

/// The headers of an event as a Kafka record (REST v3 and native):
/// `outbox-id`, `outbox-type` when there is one, then the event's own
/// headers (their names never start with `outbox-`, config/event_limits.rs).
pub fn record_headers(event: &Event) -> Vec<(String, String)> {
    let mut headers = vec![("outbox-id".to_string(), event.id.clone())];
    if let Some(t) = event.event_type.as_deref() {
        headers.push(("outbox-type".into(), t.to_string()));
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&event.headers) {
        for (name, v) in map {
            if let serde_json::Value::String(s) = v {
                headers.push((name, s));
            }
        }
    }
    headers
}

/// CloudEvents `type`: the event type, or the topic when there is none
/// (the attribute is required).
pub fn ce_type(event: &Event) -> &str {
    event.event_type.as_deref().unwrap_or(&event.topic)
}

/// A CloudEvents 1.0 event in structured JSON form.
#[derive(Serialize)]
pub struct StructuredEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    time: &'a str,
    datacontenttype: &'static str,
    /// Extension attribute: the outbox topic.
    topic: &'a str,
    data: &'a RawValue,
}

pub fn structured<'a>(source: &'a str, event: &'a Event) -> StructuredEvent<'a> {
    StructuredEvent {
        specversion: "1.0",
        id: &event.id,
        source,
        event_type: ce_type(event),
        subject: event.key.as_deref(),
        time: &event.timestamp,
        datacontenttype: "application/json",
        topic: &event.topic,
        data: raw(&event.payload),
    }
}

#[cfg(test)]
pub mod tests {
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
        assert_eq!(value(Body::Data, &e), e.payload);
    }

    #[test]
    fn structured_cloudevent_has_the_required_attributes() {
        let e = sample();
        let v = serde_json::to_value(structured("/outbox/shop", &e)).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], e.id.as_str());
        assert_eq!(v["source"], "/outbox/shop");
        assert_eq!(v["type"], "created");
        assert_eq!(v["subject"], "o-1");
        assert_eq!(v["time"], "2026-11-26T18:00:00.000001Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["total"], 12.5);
        let mut untyped = e.clone();
        untyped.event_type = None;
        untyped.key = None;
        let v = serde_json::to_value(structured("/s", &untyped)).unwrap();
        assert_eq!(v["type"], "orders");
        assert!(v.get("subject").is_none());
    }
}
