//! An endpoint as the network side needs it: its validated configuration,
//! whole, and how to reach it (an HTTP client, or a Kafka producer).

use super::http::Client;
use super::{kafka, NetError};
use crate::config::{self, Address};
use crate::egress::Egress;
use reqwest::Url;
use std::sync::Arc;

pub struct Target {
    pub endpoint: config::Endpoint,
    /// CloudEvents `source` of this database's events (`/outbox/<db>`).
    pub source: String,
    pub transport: Transport,
}

/// How requests reach the endpoint.
pub enum Transport {
    Http(Box<Http>),
    Kafka(outbox_kafka::Producer),
}

/// An HTTP endpoint: its client and base URL.
pub struct Http {
    pub client: Client,
    pub url: Url,
}

impl Http {
    /// The URL of `path` below the endpoint's base URL.
    pub fn below(&self, path: &str) -> Url {
        let mut url = self.url.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base}{path}"));
        url
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Options hold credentials: never print them.
        f.debug_struct("Target").field("kind", &self.endpoint.kind).finish_non_exhaustive()
    }
}

impl Target {
    /// Builds the endpoint's HTTP client or Kafka producer; no connection
    /// is made and no thread started.
    pub fn new(endpoint: config::Endpoint, source: &str, egress: Arc<Egress>) -> Result<Target, NetError> {
        let transport = match &endpoint.address {
            Address::Http(url) => Transport::Http(Box::new(Http {
                client: Client::new(url, &endpoint.options, egress)?,
                url: url.clone(),
            })),
            Address::Brokers(brokers) => Transport::Kafka(kafka::producer(brokers, &endpoint.options, egress)),
        };
        Ok(Target { endpoint, source: source.to_string(), transport })
    }

    pub fn options(&self) -> &config::Options {
        &self.endpoint.options
    }
}
