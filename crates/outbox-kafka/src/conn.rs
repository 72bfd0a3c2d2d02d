//! One connection per broker: resolve through the configured resolver, TCP,
//! optional TLS, ApiVersions, optional SASL; then one request at a time.
//!
//! A request takes the connection out of its slot and puts it back only
//! after a complete response: a failed, timed-out or cancelled request drops
//! the connection (closing it), and the next request reconnects.

use crate::error::{self, SASL_AUTHENTICATION_FAILED};
use crate::response::{
    self, ApiVersions, InitProducerId, Metadata, Produce, Response, SaslAuthenticate, SaslHandshake,
};
use crate::scram::{new_nonce, ScramClient, ScramHash};
use crate::{Mechanism, Resolve, Sasl};
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiVersionsRequest, InitProducerIdRequest, MetadataRequest, ProduceRequest, RequestHeader, SaslAuthenticateRequest,
    SaslHandshakeRequest,
};
use kafka_protocol::protocol::{Encodable, HeaderVersion, StrBytes};
use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout_at, Instant};

/// A request this client sends (kafka-protocol encodes it) and the response
/// it reads (decoded by `response`, which bounds what a broker can make it
/// allocate).
pub(crate) trait Request: Encodable + HeaderVersion {
    const KEY: i16;
    type Response: Response;
}

macro_rules! request {
    ($req:ty, $resp:ty, $key:expr) => {
        impl Request for $req {
            const KEY: i16 = $key;
            type Response = $resp;
        }
    };
}
request!(ProduceRequest, Produce, 0);
request!(MetadataRequest, Metadata, 3);
request!(SaslHandshakeRequest, SaslHandshake, 17);
request!(ApiVersionsRequest, ApiVersions, 18);
request!(InitProducerIdRequest, InitProducerId, 22);
request!(SaslAuthenticateRequest, SaslAuthenticate, 36);

/// Largest response accepted, checked on the length prefix before allocating
/// (each exchange in flight holds one). What the producer asks for answers
/// in far less: produce results, metadata of the topics it sends to,
/// versions, authentication.
pub(crate) const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// What one producer's responses may take at once, read and decoded: each
/// counts its bytes and what decoding may make of them
/// (`response::decoded_budget`: four times its size and 64 KiB). Responses are read as they come, so
/// one producer holds one to many at a time; without a bound, a broker that
/// advertises many addresses, each answering 8 MB, would multiply it.
const RESPONSE_BUDGET: usize = 64 * 1024 * 1024;

/// A producer's share of memory for responses.
#[derive(Clone)]
pub(crate) struct ResponseBudget(Arc<Semaphore>);

impl ResponseBudget {
    pub(crate) fn new() -> ResponseBudget {
        ResponseBudget(Arc::new(Semaphore::new(RESPONSE_BUDGET)))
    }

    /// Room for a response of `len` bytes, waited for.
    async fn reserve(&self, len: usize) -> OwnedSemaphorePermit {
        let cost = len.saturating_add(response::decoded_budget(len)).min(RESPONSE_BUDGET) as u32;
        // Never closed, so the permit always comes.
        self.0.clone().acquire_many_owned(cost).await.expect("the semaphore is never closed")
    }
}

/// A decoded response, holding its room in the producer's budget until
/// it is dropped.
pub(crate) struct Held<T> {
    value: T,
    _room: OwnedSemaphorePermit,
}

impl<T> std::ops::Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What every connection needs to know.
pub(crate) struct Settings {
    pub client_id: String,
    pub tls: Option<Result<tokio_rustls::TlsConnector, String>>,
    pub sasl: Option<Sasl>,
    pub resolver: Arc<dyn Resolve>,
    pub connect_timeout: Duration,
    pub responses: ResponseBudget,
}

impl Settings {
    /// Remove the SASL password from text that came from a broker.
    pub(crate) fn scrub(&self, text: &str) -> String {
        match &self.sasl {
            Some(s) if !s.password.is_empty() => text.replace(&s.password, "<redacted>"),
            _ => text.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ConnError {
    /// Could not open or set up the connection (resolve, TCP, TLS,
    /// ApiVersions): nothing of the request was sent.
    Unreachable(String),
    /// The broker refused the credentials or mechanism: final.
    Auth { code: i16, message: String },
    /// The broker supports no version of the API that we speak.
    Unsupported(String),
    /// The request failed on an open connection. `sent`: some of it may have
    /// reached the broker, so its effect is unknown. `timed_out`: the
    /// deadline ran out (rather than an I/O or protocol error).
    Lost { message: String, sent: bool, timed_out: bool },
}

pub(crate) struct Broker {
    pub addr: String,
    slot: tokio::sync::Mutex<Option<Established>>,
}

struct Established {
    addr: String,
    io: Box<dyn Io>,
    versions: HashMap<i16, (i16, i16)>,
    next_correlation: i32,
}

/// Split "host:port" / "[v6]:port".
pub(crate) fn split_host_port(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("broker address {addr:?} has no port"))?;
    let port = port.parse::<u16>().map_err(|_| format!("broker address {addr:?} has a bad port"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return Err(format!("broker address {addr:?} has no host"));
    }
    Ok((host, port))
}

impl Broker {
    pub(crate) fn new(addr: String) -> Broker {
        Broker { addr, slot: tokio::sync::Mutex::new(None) }
    }

    /// Drop the connection (waits for a request in flight).
    pub(crate) async fn disconnect(&self) {
        self.slot.lock().await.take();
    }

    /// Send `req` at the highest version both sides support within
    /// `versions`; the response and the version used.
    pub(crate) async fn call<Q: Request>(
        &self,
        settings: &Settings,
        req: &Q,
        versions: RangeInclusive<i16>,
        deadline: Instant,
    ) -> Result<(Held<Q::Response>, i16), ConnError> {
        let Ok(mut slot) = timeout_at(deadline, self.slot.lock()).await else {
            return Err(ConnError::Lost {
                message: format!("timed out waiting for the connection to {}", self.addr),
                sent: false,
                timed_out: true,
            });
        };
        let mut conn = match slot.take() {
            Some(c) => c,
            None => Established::open(settings, &self.addr, deadline).await?,
        };
        let Some(version) = conn.pick(Q::KEY, &versions) else {
            let message = format!(
                "broker {} supports no version {:?} of API {} (it offers {:?})",
                self.addr,
                versions,
                Q::KEY,
                conn.versions.get(&Q::KEY)
            );
            *slot = Some(conn);
            return Err(ConnError::Unsupported(message));
        };
        match timeout_at(deadline, conn.round_trip(settings, req, version)).await {
            Ok(Ok(resp)) => {
                *slot = Some(conn);
                Ok((resp, version))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnError::Lost {
                message: format!("no response from {} in time", self.addr),
                sent: true,
                timed_out: true,
            }),
        }
    }
}

fn lost(addr: &str, what: &str, e: impl std::fmt::Display) -> ConnError {
    ConnError::Lost { message: format!("{what} {addr}: {e}"), sent: true, timed_out: false }
}

impl Established {
    async fn open(settings: &Settings, addr: &str, deadline: Instant) -> Result<Established, ConnError> {
        let connect_deadline = deadline.min(Instant::now() + settings.connect_timeout);
        match timeout_at(connect_deadline, Self::open_inner(settings, addr)).await {
            Ok(r) => r,
            Err(_) => Err(ConnError::Unreachable(format!("connecting to {addr} timed out"))),
        }
    }

    async fn open_inner(settings: &Settings, addr: &str) -> Result<Established, ConnError> {
        let (host, port) = split_host_port(addr).map_err(ConnError::Unreachable)?;
        let addrs = settings.resolver.resolve(host, port).await.map_err(ConnError::Unreachable)?;
        if addrs.is_empty() {
            return Err(ConnError::Unreachable(format!("{host} resolved to no address")));
        }
        let mut last = String::new();
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("cannot connect to {addr} ({a}): {e}"),
            }
        }
        let tcp = tcp.ok_or(ConnError::Unreachable(last))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &settings.tls {
            None => Box::new(tcp),
            Some(Err(e)) => return Err(ConnError::Unreachable(format!("TLS configuration: {e}"))),
            Some(Ok(connector)) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| ConnError::Unreachable(format!("TLS: bad server name {host:?}: {e}")))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ConnError::Unreachable(format!("TLS handshake with {addr} failed: {e}")))?;
                Box::new(tls)
            }
        };
        let mut conn = Established { addr: addr.to_string(), io, versions: HashMap::new(), next_correlation: 1 };
        conn.api_versions(settings, addr).await?;
        if let Some(sasl) = &settings.sasl {
            conn.authenticate(settings, sasl, addr).await?;
        }
        Ok(conn)
    }

    fn pick(&self, key: i16, ours: &RangeInclusive<i16>) -> Option<i16> {
        let (min, max) = *self.versions.get(&key)?;
        let v = (*ours.end()).min(max);
        (v >= (*ours.start()).max(min)).then_some(v)
    }

    async fn exchange(
        &mut self,
        settings: &Settings,
        api_key: i16,
        version: i16,
        header_version: i16,
        response_header_version: i16,
        body: impl FnOnce(&mut BytesMut) -> anyhow::Result<()>,
    ) -> Result<(Bytes, OwnedSemaphorePermit), ConnError> {
        let correlation = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(api_key)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(StrBytes::from_string(settings.client_id.clone())));
        let mut buf = BytesMut::with_capacity(256);
        buf.put_i32(0);
        let encoded = header.encode(&mut buf, header_version).and_then(|_| body(&mut buf));
        if let Err(e) = encoded {
            return Err(ConnError::Lost {
                message: format!("cannot encode request: {e}"),
                sent: false,
                timed_out: false,
            });
        }
        let len = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        self.io.write_all(&buf).await.map_err(|e| lost(&self.addr, "write to", e))?;
        self.io.flush().await.map_err(|e| lost(&self.addr, "write to", e))?;

        let mut len = [0u8; 4];
        self.io.read_exact(&mut len).await.map_err(|e| lost(&self.addr, "read from", e))?;
        let len = i32::from_be_bytes(len);
        if len < 4 || len as usize > MAX_RESPONSE_BYTES {
            return Err(ConnError::Lost {
                message: format!("response of {len} bytes refused (limit {MAX_RESPONSE_BYTES})"),
                sent: true,
                timed_out: false,
            });
        }
        let room = settings.responses.reserve(len as usize).await;
        let mut resp = BytesMut::zeroed(len as usize);
        self.io.read_exact(&mut resp).await.map_err(|e| lost(&self.addr, "read from", e))?;
        let mut resp = resp.freeze();
        let got = response::read_header(&mut resp, response_header_version)
            .map_err(|e| lost(&self.addr, "bad response header from", e))?;
        if got != correlation {
            return Err(lost(
                &self.addr,
                "response out of order from",
                format!("correlation id {got} != {correlation}"),
            ));
        }
        Ok((resp, room))
    }

    async fn round_trip<Q: Request>(
        &mut self,
        settings: &Settings,
        req: &Q,
        version: i16,
    ) -> Result<Held<Q::Response>, ConnError> {
        let (body, room) = self
            .exchange(
                settings,
                Q::KEY,
                version,
                Q::header_version(version),
                <Q::Response as Response>::header_version(version),
                |buf| req.encode(buf, version),
            )
            .await?;
        let resp = Q::Response::decode(body, version).map_err(|e| ConnError::Lost {
            message: format!("bad response: {e}"),
            sent: true,
            timed_out: false,
        })?;
        Ok(Held { value: resp, _room: room })
    }

    async fn api_versions(&mut self, settings: &Settings, addr: &str) -> Result<(), ConnError> {
        let unreachable = |e: ConnError| match e {
            ConnError::Lost { message, .. } => ConnError::Unreachable(format!("ApiVersions with {addr}: {message}")),
            other => other,
        };
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("outbox-kafka"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let body = self
            .exchange(settings, ApiVersionsRequest::KEY, 3, ApiVersionsRequest::header_version(3), 0, |buf| {
                req.encode(buf, 3)
            })
            .await
            .map_err(unreachable)?;
        let resp = match ApiVersions::decode(body.0, 3) {
            Ok(r) if r.error_code == 0 => r,
            _ => {
                // A broker without v3 answers in v0 with UNSUPPORTED_VERSION: ask again in v0.
                let body = self
                    .exchange(settings, ApiVersionsRequest::KEY, 0, ApiVersionsRequest::header_version(0), 0, |buf| {
                        ApiVersionsRequest::default().encode(buf, 0)
                    })
                    .await
                    .map_err(unreachable)?;
                let r = ApiVersions::decode(body.0, 0)
                    .map_err(|e| ConnError::Unreachable(format!("bad ApiVersions response from {addr}: {e}")))?;
                if r.error_code != 0 {
                    return Err(ConnError::Unreachable(format!(
                        "ApiVersions refused by {addr}: {}",
                        error::error_name(r.error_code)
                    )));
                }
                r
            }
        };
        self.versions = resp.api_keys.iter().map(|&(key, min, max)| (key, (min, max))).collect();
        Ok(())
    }

    async fn sasl_round(&mut self, settings: &Settings, version: i16, bytes: Vec<u8>) -> Result<Bytes, ConnError> {
        let req = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(bytes));
        let resp = self.round_trip(settings, &req, version).await.map_err(|e| match e {
            ConnError::Lost { message, .. } => ConnError::Unreachable(format!("SASL: {message}")),
            other => other,
        })?;
        if resp.error_code != 0 {
            let detail = resp.error_message.as_deref().map(|m| settings.scrub(m)).unwrap_or_default();
            return Err(ConnError::Auth {
                code: resp.error_code,
                message: format!("SASL authentication refused: {detail}"),
            });
        }
        Ok(resp.auth_bytes.clone())
    }

    async fn authenticate(&mut self, settings: &Settings, sasl: &Sasl, addr: &str) -> Result<(), ConnError> {
        let mechanism = sasl.mechanism.kafka_name();
        let auth_err = |message: String| ConnError::Auth { code: SASL_AUTHENTICATION_FAILED, message };
        if self.pick(SaslHandshakeRequest::KEY, &(1..=1)).is_none() {
            return Err(ConnError::Unsupported(format!("broker {addr} does not offer SaslHandshake v1")));
        }
        let handshake = SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism));
        let resp = self.round_trip(settings, &handshake, 1).await.map_err(|e| match e {
            ConnError::Lost { message, .. } => ConnError::Unreachable(format!("SaslHandshake with {addr}: {message}")),
            other => other,
        })?;
        if resp.error_code != 0 {
            return Err(ConnError::Auth {
                code: resp.error_code,
                message: format!(
                    "broker {addr} refused SASL mechanism {mechanism} (enabled: {})",
                    resp.mechanisms.join(", ")
                ),
            });
        }
        let Some(version) = self.pick(SaslAuthenticateRequest::KEY, &(0..=2)) else {
            return Err(ConnError::Unsupported(format!("broker {addr} does not offer SaslAuthenticate")));
        };
        match sasl.mechanism {
            Mechanism::Plain => {
                let mut msg = Vec::with_capacity(2 + sasl.username.len() + sasl.password.len());
                msg.push(0);
                msg.extend_from_slice(sasl.username.as_bytes());
                msg.push(0);
                msg.extend_from_slice(sasl.password.as_bytes());
                self.sasl_round(settings, version, msg).await?;
            }
            Mechanism::ScramSha256 | Mechanism::ScramSha512 => {
                let hash = if sasl.mechanism == Mechanism::ScramSha256 { ScramHash::Sha256 } else { ScramHash::Sha512 };
                let mut scram = ScramClient::new(hash, &sasl.username, &sasl.password, new_nonce().map_err(auth_err)?);
                let server_first = self.sasl_round(settings, version, scram.client_first().into_bytes()).await?;
                let server_first = std::str::from_utf8(&server_first)
                    .map_err(|_| auth_err("SCRAM: server-first message is not UTF-8".into()))?;
                let client_final = scram.client_final(server_first).map_err(auth_err)?;
                let server_final = self.sasl_round(settings, version, client_final.into_bytes()).await?;
                let server_final = std::str::from_utf8(&server_final)
                    .map_err(|_| auth_err("SCRAM: server-final message is not UTF-8".into()))?;
                scram.verify_server_final(server_final).map_err(auth_err)?;
            }
        }
        Ok(())
    }
}

/// The rustls connector for `tls`: webpki roots plus `ca_pem`, ring provider.
pub(crate) fn tls_connector(tls: &crate::Tls) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = &tls.ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("ca_pem: {e}"))?;
            roots.add(cert).map_err(|e| format!("ca_pem: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("ca_pem holds no certificate".into());
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("k1:9092").unwrap(), ("k1", 9092));
        assert_eq!(split_host_port("[::1]:9093").unwrap(), ("::1", 9093));
        assert!(split_host_port("k1").is_err());
        assert!(split_host_port(":9092").is_err());
        assert!(split_host_port("k1:99999").is_err());
    }

    #[test]
    fn bad_ca_pem() {
        assert!(tls_connector(&crate::Tls { ca_pem: Some("not a pem".into()) }).is_err());
        assert!(tls_connector(&crate::Tls { ca_pem: None }).is_ok());
    }

    /// Two responses of the largest size are not held at once by one
    /// producer (each counts 40 MB of its 64), while small ones still fit
    /// beside one.
    #[tokio::test]
    async fn responses_held_at_once_are_bounded() {
        let budget = ResponseBudget::new();
        let wait = Duration::from_millis(50);
        let largest = budget.reserve(MAX_RESPONSE_BYTES).await;
        assert!(tokio::time::timeout(wait, budget.reserve(MAX_RESPONSE_BYTES)).await.is_err());
        let mut small = Vec::new();
        for _ in 0..100 {
            small.push(tokio::time::timeout(wait, budget.reserve(1000)).await.expect("room for a small one"));
        }
        drop(largest);
        drop(small);
        let _room = tokio::time::timeout(wait, budget.reserve(MAX_RESPONSE_BYTES)).await.expect("room again");
    }

    #[test]
    fn scrub_removes_password() {
        let s = Settings {
            client_id: "c".into(),
            tls: None,
            sasl: Some(Sasl { mechanism: Mechanism::Plain, username: "u".into(), password: "pw123".into() }),
            resolver: Arc::new(crate::SystemResolver),
            connect_timeout: Duration::from_secs(1),
            responses: ResponseBudget::new(),
        };
        assert_eq!(s.scrub("bad password pw123 for u"), "bad password <redacted> for u");
    }
}
