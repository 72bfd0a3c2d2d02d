//! An idempotent Kafka producer over tokio, in pure Rust (rustls for TLS).
//!
//! ```no_run
//! # async fn demo() {
//! use outbox_kafka::{Config, Producer, Record};
//! let producer = Producer::new(Config::new(vec!["broker-1:9092".into()]));
//! let results = producer
//!     .send("events", vec![Record::new(Some(b"order-7".to_vec()), b"{}".to_vec())])
//!     .await;
//! for r in results {
//!     match r {
//!         Ok(d) => println!("partition {} offset {}", d.partition, d.offset),
//!         Err(e) => println!("{e}"),
//!     }
//! }
//! producer.close().await;
//! # }
//! ```
//!
//! See README.md for what is supported and how failures are classified.

mod batch;
mod compression;
mod conn;
mod error;
mod murmur2;
mod producer;
mod response;
mod scram;

pub use compression::Compression;
pub use error::{error_name, ProduceError};
pub use murmur2::{murmur2, partition_for_key};
pub use producer::Producer;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The future a [`Resolve`] returns.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<SocketAddr>, String>> + Send + 'a>>;

/// Turns a broker's host name and port into addresses to connect to. Every
/// connection the producer opens goes through it: bootstrap servers and the
/// brokers that metadata names (advertised listeners), IP literals included,
/// so an implementation can enforce an egress allow-list. Return `Err` (the
/// text ends up in `ProduceError::Unreachable`) to refuse a host.
pub trait Resolve: Send + Sync {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a>;
}

/// Resolves with the system resolver (`tokio::net::lookup_host`: IP
/// literals directly, names on tokio's blocking pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(async move {
            tokio::net::lookup_host((host, port))
                .await
                .map(|addrs| addrs.collect())
                .map_err(|e| format!("cannot resolve {host}: {e}"))
        })
    }
}

/// TLS to the brokers, always verifying certificates and host names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tls {
    /// PEM certificates trusted in addition to the public (webpki) roots.
    pub ca_pem: Option<String>,
}

/// SASL mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl Mechanism {
    pub fn kafka_name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// SASL credentials. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Sasl {
    pub mechanism: Mechanism,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Producer settings. `Config::new` fills in the defaults.
#[derive(Clone)]
pub struct Config {
    /// "host:port" of one or more brokers ("[::1]:9092" for IPv6).
    pub bootstrap: Vec<String>,
    pub client_id: String,
    pub tls: Option<Tls>,
    pub sasl: Option<Sasl>,
    pub compression: Compression,
    /// Bound on one `send` call, retries included (default 30 s).
    pub request_timeout: Duration,
    /// Bound on opening one connection: resolve, TCP, TLS, ApiVersions and
    /// SASL (default 10 s).
    pub connect_timeout: Duration,
    pub resolver: Arc<dyn Resolve>,
    /// Largest produce request, like the Java client's `max.request.size`
    /// (default 1 MiB). A record whose encoding alone exceeds it fails with
    /// `MESSAGE_TOO_LARGE` without being sent; larger sets of records are
    /// split into several batches.
    pub max_request_bytes: usize,
    /// Ask the broker to create unknown topics (Metadata
    /// `allow_auto_topic_creation`, like the Java client's
    /// `allow.auto.create.topics`); the broker's own setting still decides.
    /// Default true.
    pub allow_auto_create_topics: bool,
}

impl Config {
    pub fn new(bootstrap: Vec<String>) -> Config {
        Config {
            bootstrap,
            client_id: "outbox".into(),
            tls: None,
            sasl: None,
            compression: Compression::None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            resolver: Arc::new(SystemResolver),
            max_request_bytes: 1024 * 1024,
            allow_auto_create_topics: true,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("bootstrap", &self.bootstrap)
            .field("client_id", &self.client_id)
            .field("tls", &self.tls)
            .field("sasl", &self.sasl)
            .field("compression", &self.compression)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("allow_auto_create_topics", &self.allow_auto_create_topics)
            .finish_non_exhaustive()
    }
}

/// One record to produce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Decides the partition (murmur2); `None` spreads records round-robin.
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// Record headers, in order; a name may repeat.
    pub headers: Vec<(String, Vec<u8>)>,
    /// CreateTime in milliseconds since the epoch; negative means "now".
    pub timestamp_ms: i64,
}

impl Record {
    /// A record stamped with the current time, without headers.
    pub fn new(key: Option<Vec<u8>>, value: Vec<u8>) -> Record {
        Record { key, value, headers: Vec::new(), timestamp_ms: -1 }
    }
}

/// Where a record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Delivered {
    pub partition: i32,
    /// The record's offset; -1 when the broker reported the batch as a
    /// duplicate of one it had already written (DUPLICATE_SEQUENCE_NUMBER)
    /// without giving the original offset.
    pub offset: i64,
}

/// CPU-heavy moments at once, at most: each holds a thread of its own
/// (and the memory of what it builds) while it runs.
static HEAVY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Run `work`; when it is `heavy` (CPU-bound for a long moment), under
/// `tokio::task::block_in_place`, so the runtime's other tasks move to
/// another thread meanwhile, and no more than two at once in the process
/// (request building and batch compression alike: a burst of large
/// events must not become a thread per endpoint, each burning a core of
/// the database server). `block_in_place` only works on a thread of a
/// multi-thread runtime (elsewhere it panics): anywhere else `work` just
/// runs.
pub async fn cpu_bound<R>(heavy: bool, work: impl FnOnce() -> R) -> R {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if heavy && multi_thread {
        // Never closed, so the permit always comes.
        let _permit = HEAVY.acquire().await;
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let mut c = Config::new(vec!["k:9092".into()]);
        c.sasl = Some(Sasl { mechanism: Mechanism::ScramSha512, username: "svc".into(), password: "s3cr3t-pw".into() });
        let s = format!("{c:?}");
        assert!(!s.contains("s3cr3t-pw"), "{s}");
        assert!(s.contains("<redacted>"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn two_heavy_moments_at_most_run_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        static NOW: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                tokio::spawn(cpu_bound(true, || {
                    MOST.fetch_max(NOW.fetch_add(1, SeqCst) + 1, SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    NOW.fetch_sub(1, SeqCst);
                }))
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(MOST.load(SeqCst), 2);
    }

    #[test]
    fn producer_is_send_sync() {
        fn is<T: Send + Sync + 'static>() {}
        is::<Producer>();
        is::<Config>();
        is::<ProduceError>();
    }
}
