//! What a writer may put in an event: keys, types and headers are bounded
//! so that one event can fail only itself (and fit an index entry).

use super::{json_type, shorten, ConfigError, Result};
use serde_json::Value;

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
