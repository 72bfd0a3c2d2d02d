//! Kafka REST proxies: Confluent API v2 (and Redpanda's HTTP Proxy, which
//! speaks v2 with differences) and Confluent API v3. A request carries a
//! batch of records for one topic; the record key is the event's ordering
//! key, so Kafka keeps per-key order inside a partition. The worker puts
//! several events of one key in a request only when the endpoint's
//! max_per_key allows it (see the README on what that assumes of the
//! proxy).

use super::failure::{self, Failure, Verdict};
use super::http::{Answer, Request};
use super::target::Http;
use super::{envelope, Gate, Target};
use crate::config::{Body, Flavor, Kind};
use crate::event::Event;
use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::sync::Arc;

pub const V2_CONTENT_TYPE: &str = "application/vnd.kafka.json.v2+json";
pub const V2_ACCEPT: &str = "application/vnd.kafka.v2+json";

/// Send `events` (one topic) as one request; the outcome of each record.
pub async fn deliver(http: &Http, target: &Target, gate: &Gate, events: &[Arc<Event>]) -> Vec<Result<(), Failure>> {
    let n = events.len();
    let request = match super::build_request(gate, events, || request(http, target, events)).await {
        Ok(request) => request,
        Err(failure) => return vec![Err(failure); n],
    };
    match http.client.send(request).await {
        Ok(answer) => results(target, &answer, n),
        Err(failure) => vec![Err(failure); n],
    }
}

/// The request for `events`, which share one topic.
pub fn request(http: &Http, target: &Target, events: &[Arc<Event>]) -> Request {
    let opts = target.options();
    let topic = &target.endpoint.kafka_topic(&events[0].topic);
    let mut headers = HeaderMap::new();
    let (url, body) = match target.endpoint.kind {
        Kind::KafkaRestV3 => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let cluster = opts.cluster_id.as_deref().unwrap_or("");
            (http.below(&v3_path(cluster, topic)), v3_body(opts.body, events))
        }
        _ => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(V2_CONTENT_TYPE));
            headers.insert(ACCEPT, HeaderValue::from_static(V2_ACCEPT));
            (http.below(&v2_path(topic)), v2_body(opts.body, events))
        }
    };
    Request { url, headers, body }
}

/// What an answer says of each of the `n` records sent.
pub fn results(target: &Target, answer: &Answer, n: usize) -> Vec<Result<(), Failure>> {
    match target.endpoint.kind {
        _ if !answer.status.is_success() => request_failed(answer, n),
        Kind::KafkaRestV3 => v3_results(&answer.body, n),
        _ => v2_results(target.options().flavor, &answer.body, n),
    }
}

/// A request path below the proxy's base URL.
pub fn v2_path(topic: &str) -> String {
    format!("/topics/{topic}")
}

pub fn v3_path(cluster_id: &str, topic: &str) -> String {
    format!("/v3/clusters/{cluster_id}/topics/{topic}/records")
}

#[derive(Serialize)]
struct V2Record<'a> {
    key: Option<&'a str>,
    value: &'a RawValue,
}

#[derive(Serialize)]
struct V2Body<'a> {
    records: Vec<V2Record<'a>>,
}

/// `{"records": [{"key": .., "value": ..}, ..]}`; the same shape suits
/// Redpanda, which accepts no other record fields.
pub fn v2_body(body: Body, events: &[Arc<Event>]) -> Vec<u8> {
    let values: Vec<String> = events.iter().map(|e| envelope::value(body, e)).collect();
    let records =
        events.iter().zip(&values).map(|(e, v)| V2Record { key: e.key.as_deref(), value: envelope::raw(v) }).collect();
    serde_json::to_vec(&V2Body { records }).expect("serializable")
}

#[derive(Serialize)]
struct V3Data<'a> {
    #[serde(rename = "type")]
    data_type: &'static str,
    data: &'a RawValue,
}

#[derive(Serialize)]
struct V3Header {
    name: String,
    /// base64 of the header's bytes
    value: String,
}

#[derive(Serialize)]
struct V3Record<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<V3Data<'a>>,
    value: V3Data<'a>,
    headers: Vec<V3Header>,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

/// One JSON object per record, concatenated (newline-separated): the v3
/// streaming form, answered with one result object per record, in order.
pub fn v3_body(body: Body, events: &[Arc<Event>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        let value = envelope::value(body, e);
        let key_json = e.key.as_deref().map(|k| serde_json::to_string(k).expect("a string serializes"));
        let headers =
            envelope::record_headers(e).into_iter().map(|(name, v)| V3Header { name, value: b64(&v) }).collect();
        let record = V3Record {
            key: key_json.as_deref().map(|k| V3Data { data_type: "JSON", data: envelope::raw(k) }),
            value: V3Data { data_type: "JSON", data: envelope::raw(&value) },
            headers,
        };
        serde_json::to_writer(&mut out, &record).expect("serializable");
        out.push(b'\n');
    }
    out
}

fn retry(message: String) -> Result<(), Failure> {
    Err(Failure { verdict: Verdict::Retry { after: None }, status: Some(200), message })
}

/// The proxy's error body, `{"error_code": 40401, "message": ".."}`, in
/// words.
fn error_words(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let code = v.get("error_code")?;
    let message = v.get("message").and_then(Value::as_str).unwrap_or("");
    Some(format!(
        "error_code {}: {}",
        failure::snippet(code.to_string().as_bytes()),
        failure::snippet(message.as_bytes())
    ))
}

/// A non-2xx answer fails the whole request.
fn request_failed(answer: &Answer, n: usize) -> Vec<Result<(), Failure>> {
    let mut failure = answer.failure();
    failure.message = match error_words(&answer.body) {
        Some(words) => {
            let bare = failure::classify(answer.status, answer.retry_after, b"", None);
            format!("Kafka REST {}: {words}", bare.message)
        }
        None => format!("Kafka REST {}", failure.message),
    };
    vec![Err(failure); n]
}

/// Results of a 200 answer from a v2 proxy, one per record sent.
pub fn v2_results(flavor: Flavor, body: &[u8], n: usize) -> Vec<Result<(), Failure>> {
    let parsed: Option<Vec<Value>> =
        serde_json::from_slice::<Value>(body).ok().and_then(|v| v.get("offsets").and_then(Value::as_array).cloned());
    let Some(offsets) = parsed else {
        return vec![retry("Kafka REST: response without offsets".into()); n];
    };
    match flavor {
        Flavor::Confluent => {
            if offsets.len() != n {
                return vec![retry(format!("Kafka REST: {} offsets for {n} records", offsets.len())); n];
            }
            offsets
                .iter()
                .map(|o| match o.get("error_code").filter(|c| !c.is_null()) {
                    None => Ok(()),
                    Some(code) => {
                        let text = o.get("error").and_then(Value::as_str).unwrap_or("");
                        let message = format!(
                            "Kafka REST record error_code {}: {}",
                            failure::snippet(code.to_string().as_bytes()),
                            failure::snippet(text.as_bytes())
                        );
                        // 50003: retriable Kafka error; anything else is final.
                        let verdict =
                            if code.as_i64() == Some(50003) { Verdict::Retry { after: None } } else { Verdict::Reject };
                        Err(Failure { verdict, status: Some(200), message })
                    }
                })
                .collect()
        }
        // One entry per partition, Kafka protocol error codes inline: which
        // record failed is unknown, so the whole batch goes again.
        Flavor::Redpanda => {
            let errors: Vec<String> = offsets
                .iter()
                .filter_map(|o| {
                    let code = o.get("error_code").and_then(Value::as_i64).filter(|c| *c != 0)?;
                    let partition = o.get("partition").cloned().unwrap_or(Value::Null);
                    Some(format!("partition {partition}: Kafka error {code}"))
                })
                .collect();
            if errors.is_empty() {
                vec![Ok(()); n]
            } else {
                vec![retry(format!("Redpanda HTTP Proxy: {}", errors.join(", "))); n]
            }
        }
    }
}

/// Results of a 200 answer from a v3 proxy: concatenated result objects,
/// one per record in the order sent.
pub fn v3_results(body: &[u8], n: usize) -> Vec<Result<(), Failure>> {
    let mut out = Vec::with_capacity(n);
    for item in serde_json::Deserializer::from_slice(body).into_iter::<Value>().take(n) {
        let Ok(v) = item else { break };
        let code = v.get("error_code").and_then(Value::as_i64).unwrap_or(0);
        out.push(match code {
            200 => Ok(()),
            _ => {
                let message = v.get("message").and_then(Value::as_str).unwrap_or("");
                let message = format!("Kafka REST record error_code {code}: {}", failure::snippet(message.as_bytes()));
                let verdict = match code {
                    429 | 500..=599 => Verdict::Retry { after: None },
                    400..=499 => Verdict::Reject,
                    _ => Verdict::Retry { after: None },
                };
                Err(Failure { verdict, status: Some(code.clamp(0, 999) as u16), message })
            }
        });
    }
    while out.len() < n {
        out.push(retry(format!("Kafka REST: {} results for {n} records", out.len())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::envelope::tests::sample;

    fn events(n: usize) -> Vec<Arc<Event>> {
        (0..n)
            .map(|i| {
                let mut e = sample();
                e.id = format!("id-{i}");
                e.key = if i == 1 { None } else { Some(format!("k{i}")) };
                Arc::new(e)
            })
            .collect()
    }

    #[test]
    fn v2_body_has_key_and_value_per_record() {
        let v: Value = serde_json::from_slice(&v2_body(Body::Envelope, &events(2))).unwrap();
        let records = v["records"].as_array().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["key"], "k0");
        assert!(records[1]["key"].is_null());
        assert_eq!(records[0]["value"]["id"], "id-0");
        assert_eq!(records[0]["value"]["data"]["total"], 12.5);
        assert_eq!(records[0].as_object().unwrap().len(), 2, "only key and value (Redpanda accepts no more)");
        let bare: Value = serde_json::from_slice(&v2_body(Body::Data, &events(1))).unwrap();
        assert_eq!(bare["records"][0]["value"]["items"][0], 1);
    }

    #[test]
    fn v3_body_is_concatenated_records_with_types_and_headers() {
        let body = v3_body(Body::Envelope, &events(2));
        let records: Vec<Value> =
            serde_json::Deserializer::from_slice(&body).into_iter::<Value>().map(Result::unwrap).collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["key"], serde_json::json!({"type": "JSON", "data": "k0"}));
        assert!(records[1].get("key").is_none());
        assert_eq!(records[0]["value"]["type"], "JSON");
        assert_eq!(records[0]["value"]["data"]["id"], "id-0");
        let headers = records[0]["headers"].as_array().unwrap();
        let decode = |s: &Value| {
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s.as_str().unwrap()).unwrap()).unwrap()
        };
        assert_eq!(headers[0]["name"], "outbox-id");
        assert_eq!(decode(&headers[0]["value"]), "id-0");
        assert_eq!(headers[1]["name"], "outbox-type");
        assert_eq!(decode(&headers[1]["value"]), "created");
        assert_eq!(headers[2]["name"], "trace");
        assert_eq!(decode(&headers[2]["value"]), "t1");
    }

    #[test]
    fn v2_partial_failures() {
        let body = br#"{"key_schema_id":null,"value_schema_id":null,"offsets":[
            {"partition":0,"offset":10,"error_code":null,"error":null},
            {"partition":1,"offset":-1,"error_code":50003,"error":"Leader not available"},
            {"partition":1,"offset":-1,"error_code":50002,"error":"Record too large"}]}"#;
        let r = v2_results(Flavor::Confluent, body, 3);
        assert!(r[0].is_ok());
        let retry = r[1].as_ref().unwrap_err();
        assert_eq!(retry.verdict, Verdict::Retry { after: None });
        assert!(retry.message.contains("50003") && retry.message.contains("Leader not available"));
        assert_eq!(r[2].as_ref().unwrap_err().verdict, Verdict::Reject);
        let short = v2_results(Flavor::Confluent, br#"{"offsets":[]}"#, 2);
        assert!(short.iter().all(|x| matches!(x, Err(f) if f.verdict == Verdict::Retry { after: None })));
        assert!(v2_results(Flavor::Confluent, b"not json", 1)[0].is_err());
    }

    #[test]
    fn redpanda_answers_per_partition() {
        let ok = v2_results(Flavor::Redpanda, br#"{"offsets":[{"partition":0,"offset":5}]}"#, 3);
        assert!(ok.iter().all(Result::is_ok));
        let failed = v2_results(
            Flavor::Redpanda,
            br#"{"offsets":[{"partition":0,"offset":5},{"partition":2,"offset":-1,"error_code":6}]}"#,
            2,
        );
        assert!(failed.iter().all(Result::is_err));
        assert!(failed[0].as_ref().unwrap_err().message.contains("partition 2: Kafka error 6"));
    }

    #[test]
    fn v3_results_in_order() {
        let body = br#"{"error_code":200,"cluster_id":"c","topic_name":"t","partition_id":0,"offset":1}
{"error_code":429,"message":"Too many requests"}{"error_code":400,"message":"Bad key"}"#;
        let r = v3_results(body, 4);
        assert!(r[0].is_ok());
        assert_eq!(r[1].as_ref().unwrap_err().verdict, Verdict::Retry { after: None });
        assert_eq!(r[2].as_ref().unwrap_err().verdict, Verdict::Reject);
        assert!(r[2].as_ref().unwrap_err().message.contains("Bad key"));
        assert!(r[3].as_ref().unwrap_err().message.contains("3 results for 4"));
    }

    #[test]
    fn whole_request_errors_name_the_proxy_error() {
        let cases: [(u16, &[u8], Verdict); 5] = [
            (404, br#"{"error_code":40401,"message":"Topic orders not found."}"#, Verdict::Reject),
            (415, br#"{"error_code":415,"message":"HTTP 415 Unsupported Media Type"}"#, Verdict::Reject),
            (
                422,
                br#"{"error_code":42205,"message":"Request includes keys and uses a format that requires schemas"}"#,
                Verdict::Reject,
            ),
            (429, br#"{"error_code":42901,"message":"Request rate limit exceeded"}"#, Verdict::Retry { after: None }),
            (503, b"<html>unavailable</html>", Verdict::Retry { after: None }),
        ];
        for (status, body, verdict) in cases {
            let answer = Answer {
                status: reqwest::StatusCode::from_u16(status).unwrap(),
                retry_after: None,
                location: None,
                body: body.to_vec(),
            };
            let r = request_failed(&answer, 2);
            assert_eq!(r.len(), 2);
            let f = r[0].as_ref().unwrap_err();
            assert_eq!(f.verdict, verdict, "{status}");
            assert!(f.message.starts_with(&format!("Kafka REST HTTP {status}")), "{}", f.message);
            if status == 404 {
                assert!(f.message.contains("error_code 40401: Topic orders not found."), "{}", f.message);
            }
        }
    }
}
