//! SCRAM-SHA-256/512 client (RFC 5802, RFC 7677) as Kafka speaks it: GS2
//! header `n,,` (no channel binding, no authzid), no SASLprep of the
//! password (Kafka's ScramFormatter uses its UTF-8 bytes as they are).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    fn hmac(self) -> hmac::Algorithm {
        match self {
            ScramHash::Sha256 => hmac::HMAC_SHA256,
            ScramHash::Sha512 => hmac::HMAC_SHA512,
        }
    }
    fn digest(self) -> &'static digest::Algorithm {
        match self {
            ScramHash::Sha256 => &digest::SHA256,
            ScramHash::Sha512 => &digest::SHA512,
        }
    }
    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            ScramHash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            ScramHash::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }
    fn len(self) -> usize {
        match self {
            ScramHash::Sha256 => 32,
            ScramHash::Sha512 => 64,
        }
    }
}

/// Most iterations a server may ask for: Kafka's own limit (it stores
/// 4096..=16384). The server picks the count and the client pays it in
/// CPU on the network thread, before any timeout can interrupt: a broker
/// (or whoever sits between, without TLS) asking for a million would hold
/// up every endpoint's deliveries for the better part of a second per
/// connection.
const MAX_ITERATIONS: u32 = 16_384;

/// One SCRAM exchange. Holds the password only until the proof is computed.
pub(crate) struct ScramClient {
    hash: ScramHash,
    nonce: String,
    client_first_bare: String,
    password: Vec<u8>,
    server_signature: Option<Vec<u8>>,
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClient").field("hash", &self.hash).finish_non_exhaustive()
    }
}

fn saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// A fresh client nonce: 24 random bytes, base64 (printable, no comma).
pub(crate) fn new_nonce() -> Result<String, String> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 24];
    ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| "no randomness for the SCRAM nonce".to_string())?;
    Ok(B64.encode(b))
}

impl ScramClient {
    pub(crate) fn new(hash: ScramHash, username: &str, password: &str, nonce: String) -> ScramClient {
        let client_first_bare = format!("n={},r={}", saslname(username), nonce);
        ScramClient { hash, nonce, client_first_bare, password: password.as_bytes().to_vec(), server_signature: None }
    }

    pub(crate) fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// The client-final message for the server-first message.
    pub(crate) fn client_final(&mut self, server_first: &str) -> Result<String, String> {
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(B64.decode(v).map_err(|_| "SCRAM: bad salt from server".to_string())?),
                Some(("i=", v)) => iterations = v.parse::<u32>().ok(),
                Some(("m=", _)) => return Err("SCRAM: server requires an unsupported extension".into()),
                Some(("e=", v)) => return Err(format!("SCRAM: server error {v}")),
                _ => {}
            }
        }
        let nonce = nonce.ok_or("SCRAM: server-first message without nonce")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err("SCRAM: server nonce does not extend the client nonce".into());
        }
        let salt = salt.ok_or("SCRAM: server-first message without salt")?;
        let iterations = match iterations {
            Some(i) if i > MAX_ITERATIONS => {
                return Err(format!(
                    "SCRAM: the server asks for {i} iterations, more than {MAX_ITERATIONS} (Kafka's own limit)"
                ))
            }
            i => i.and_then(NonZeroU32::new).ok_or("SCRAM: missing or unacceptable iteration count")?,
        };

        let mut salted = vec![0u8; self.hash.len()];
        pbkdf2::derive(self.hash.pbkdf2(), iterations, &salt, &self.password, &mut salted);
        self.password.iter_mut().for_each(|b| *b = 0);
        self.password.clear();

        let salted_key = hmac::Key::new(self.hash.hmac(), &salted);
        let client_key = hmac::sign(&salted_key, b"Client Key");
        let stored_key = digest::digest(self.hash.digest(), client_key.as_ref());
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{},{}", self.client_first_bare, server_first, without_proof);
        let client_signature =
            hmac::sign(&hmac::Key::new(self.hash.hmac(), stored_key.as_ref()), auth_message.as_bytes());
        let proof: Vec<u8> = client_key.as_ref().iter().zip(client_signature.as_ref()).map(|(a, b)| a ^ b).collect();
        let server_key = hmac::sign(&salted_key, b"Server Key");
        let server_signature =
            hmac::sign(&hmac::Key::new(self.hash.hmac(), server_key.as_ref()), auth_message.as_bytes());
        self.server_signature = Some(server_signature.as_ref().to_vec());
        salted.iter_mut().for_each(|b| *b = 0);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Check the server-final message: the server proves it knows the password too.
    pub(crate) fn verify_server_final(&self, server_final: &str) -> Result<(), String> {
        let expected = self.server_signature.as_ref().ok_or("SCRAM: server-final before client-final")?;
        for attr in server_final.split(',') {
            match attr.split_at_checked(2) {
                Some(("e=", v)) => return Err(format!("SCRAM: server error {v}")),
                Some(("v=", v)) => {
                    let got = B64.decode(v).map_err(|_| "SCRAM: bad server signature encoding".to_string())?;
                    // Constant-time comparison.
                    let same = got.len() == expected.len()
                        && got.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
                    return if same { Ok(()) } else { Err("SCRAM: server signature does not verify".into()) };
                }
                _ => {}
            }
        }
        Err("SCRAM: server-final message without verifier".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7677_sha256_vector() {
        let mut c = ScramClient::new(ScramHash::Sha256, "user", "pencil", "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(c.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        assert_eq!(
            c.client_final(server_first).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        c.verify_server_final("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
        assert!(c.verify_server_final("v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").is_err());
        assert!(c.verify_server_final("e=invalid-proof").is_err());
    }

    #[test]
    fn more_iterations_than_kafka_stores_are_refused() {
        let server_first = |i: u32| format!("r=cnonceSERVER,s={},i={i}", B64.encode(b"0123456789abcdef"));
        let mut c = ScramClient::new(ScramHash::Sha256, "u", "p", "cnonce".into());
        c.client_first();
        assert!(c.client_final(&server_first(16_385)).unwrap_err().contains("16385 iterations, more than 16384"));
        let mut c = ScramClient::new(ScramHash::Sha256, "u", "p", "cnonce".into());
        c.client_first();
        assert!(c.client_final(&server_first(16_384)).is_ok());
    }

    /// A server side of SCRAM-SHA-512, computed independently from the
    /// stored credentials, checks the proof (there is no RFC vector for 512).
    #[test]
    fn sha512_proof_verifies_against_stored_key() {
        let (user, password, salt, iterations) = ("al=ice,", "secret", b"0123456789abcdef", 4096);
        let mut c = ScramClient::new(ScramHash::Sha512, user, password, "cnonce".into());
        assert_eq!(c.client_first(), "n,,n=al=3Dice=2C,r=cnonce");
        let server_first = format!("r=cnonceSERVER,s={},i={iterations}", B64.encode(salt));
        let client_final = c.client_final(&server_first).unwrap();

        // Server: StoredKey from the password as `kafka-configs --add-config SCRAM-SHA-512=...` stores it.
        let mut salted = [0u8; 64];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA512,
            NonZeroU32::new(iterations).unwrap(),
            salt,
            password.as_bytes(),
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA512, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored_key = digest::digest(&digest::SHA512, client_key.as_ref());
        let (without_proof, proof) = client_final.rsplit_once(",p=").unwrap();
        assert_eq!(without_proof, "c=biws,r=cnonceSERVER");
        let auth_message = format!("n=al=3Dice=2C,r=cnonce,{server_first},{without_proof}");
        let sig = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA512, stored_key.as_ref()), auth_message.as_bytes());
        let recovered: Vec<u8> = B64.decode(proof).unwrap().iter().zip(sig.as_ref()).map(|(a, b)| a ^ b).collect();
        assert_eq!(digest::digest(&digest::SHA512, &recovered).as_ref(), stored_key.as_ref());

        let server_key = hmac::sign(&key, b"Server Key");
        let server_sig = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA512, server_key.as_ref()), auth_message.as_bytes());
        c.verify_server_final(&format!("v={}", B64.encode(server_sig))).unwrap();
    }

    #[test]
    fn rejects_bad_server_first() {
        let mut c = ScramClient::new(ScramHash::Sha256, "u", "p", "abc".into());
        assert!(c.client_final("r=xyz123,s=AAAA,i=4096").is_err(), "nonce must extend ours");
        assert!(c.client_final("r=abc,s=AAAA,i=4096").is_err(), "nonce must be longer");
        assert!(c.client_final("r=abcd,s=AAAA,i=0").is_err());
        assert!(c.client_final("r=abcd,s=AAAA,i=999999999").is_err());
        assert!(c.client_final("m=ext,r=abcd,s=AAAA,i=4096").is_err());
    }

    #[test]
    fn nonce_is_printable() {
        let n = new_nonce().unwrap();
        assert_eq!(n.len(), 32);
        assert!(!n.contains(','));
    }

    #[test]
    fn debug_hides_password() {
        let c = ScramClient::new(ScramHash::Sha256, "u", "hunter2", "n".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
