//! An endpoint as the network side needs it: its validated configuration,
//! whole, and its HTTP client.

use super::http::Client;
use super::NetError;
use crate::config;
use crate::egress::Egress;
use reqwest::Url;
use std::sync::Arc;

pub struct Target {
    pub endpoint: config::Endpoint,
    /// CloudEvents `source` of this database's events (`/outbox/<db>`).
    pub source: String,
    pub client: Client,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Options hold credentials: never print them.
        f.debug_struct("Target")
            .field("kind", &self.endpoint.kind)
            .field("url", &self.endpoint.url.as_str())
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Builds the endpoint's HTTP client; no request is made and no thread
    /// started.
    pub fn new(endpoint: config::Endpoint, source: &str, egress: Arc<Egress>) -> Result<Target, NetError> {
        let client = Client::new(&endpoint.options, egress)?;
        Ok(Target { endpoint, source: source.to_string(), client })
    }

    pub fn options(&self) -> &config::Options {
        &self.endpoint.options
    }

    /// The URL of `path` below the endpoint's base URL.
    pub fn below(&self, path: &str) -> Url {
        let mut url = self.endpoint.url.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base}{path}"));
        url
    }
}
