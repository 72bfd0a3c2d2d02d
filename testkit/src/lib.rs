//! What outbox's end-to-end tests, the demo and the benchmark run against:
//! a real cluster, a real HTTP receiver, a real Kafka-protocol broker, and
//! the helpers the tests share.

pub mod cluster;
pub mod exporter;
pub mod faults;
pub mod h2;
pub mod http;
pub mod kafka;
pub mod outbox;
pub mod process;
pub mod receiver;

pub use cluster::{connect_port, free_port, Cluster};
pub use h2::H2Receiver;
pub use outbox::*;
pub use process::{die_with_parent, private_mb, rss_fields};
pub use receiver::{Receiver, Reply, Request};

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The outbox crate's directory, where `target/` is (the kit lives in its
/// `testkit/`).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit/ is inside the outbox crate").to_path_buf()
}

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(30);

/// The same, with a Kafka broker or TLS in the way (tests/wire.rs).
pub const WAIT_LONG: Duration = Duration::from_secs(60);

/// Whether to run the sizes the README reports (`OUTBOX_FULL=1`).
pub fn full() -> bool {
    std::env::var_os("OUTBOX_FULL").is_some()
}
