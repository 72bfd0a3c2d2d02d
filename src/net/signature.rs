//! Standard Webhooks signatures (https://www.standardwebhooks.com):
//! `webhook-signature: v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">`,
//! one space-separated signature per secret while keys are rotated.

use crate::config::Secret;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The `webhook-signature` header value, or None without secrets.
pub fn sign(secrets: &[Secret], id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
    if secrets.is_empty() {
        return None;
    }
    let signatures: Vec<String> = secrets
        .iter()
        .map(|secret| {
            let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes keys of any length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect();
    Some(signatures.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(encoded: &str) -> Secret {
        Secret(base64::engine::general_purpose::STANDARD.decode(encoded).unwrap())
    }

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // The example from the Standard Webhooks specification and its
        // reference libraries.
        let s = secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let sig = sign(&[s], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig.as_deref(), Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="));
    }

    #[test]
    fn one_signature_per_secret_while_rotating() {
        let sig = sign(&[secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Secret(vec![7; 32])], "id", 1, b"{}").unwrap();
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_ne!(parts[0], parts[1]);
        assert!(sign(&[], "id", 1, b"{}").is_none());
    }
}
