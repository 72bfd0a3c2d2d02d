//! Plain HTTP/1.1 to an endpoint's own origin over kept-alive connections
//! of our own, driven by hyper's connection API.
//!
//! Why not reqwest for these: measured on this project's machine (2
//! cores, loopback, 64 requests in flight), reqwest's pooled client costs
//! 52–59 µs of CPU per request against 25–38 µs for hyper's connection
//! API under a pool like this one; reqwest parses the URL into a URI,
//! matches proxies, merges default headers and hands every request to the
//! connection's task through its pool's channels. One event per request
//! makes that the worker's largest cost. Everything else (TLS, HTTP/2, a
//! proxy, redirects to another origin) stays with reqwest (http.rs),
//! and the rules of a request (egress, redirects, headers, the size of an
//! answer) stay in http.rs's `send`, for both.
//!
//! Connections are checked like reqwest's: the host's addresses are
//! resolved and filtered by `outbox.allowed_hosts` at connect time
//! (resolve.rs), with the endpoint's connect timeout.

use super::failure::{self, Failure};
use super::resolve;
use crate::egress::Egress;
use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use reqwest::header::{HeaderMap, HeaderValue, HOST};
use reqwest::Url;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// How long a connection may wait unused in the pool (as reqwest's
/// `pool_idle_timeout` in http.rs).
const IDLE: Duration = Duration::from_secs(60);

pub type Response = hyper::Response<hyper::body::Incoming>;

/// The kept-alive connections to one origin (`http://host:port`).
pub struct Pool {
    host: String,
    port: u16,
    /// The `Host` header of every request.
    authority: HeaderValue,
    egress: Arc<Egress>,
    connect_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<(SendRequest<Full<Bytes>>, Instant)>>,
}

/// A connection lent out for one request; given back with `reuse` once
/// the answer was read whole, closed when dropped otherwise.
pub struct Lent<'a> {
    pool: &'a Pool,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Lent<'_> {
    pub fn reuse(mut self) {
        if let Some(sender) = self.sender.take() {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < self.pool.max_idle {
                idle.push((sender, Instant::now()));
            }
        }
    }
}

impl Pool {
    /// A pool for `url`'s origin, when it is plain HTTP (None otherwise).
    pub fn for_origin(url: &Url, egress: Arc<Egress>, connect_timeout: Duration, max_idle: usize) -> Option<Pool> {
        if url.scheme() != "http" {
            return None;
        }
        let host = url.host_str()?.to_string();
        let port = url.port_or_known_default()?;
        let authority = match url.port() {
            Some(p) => HeaderValue::from_str(&format!("{host}:{p}")).ok()?,
            None => HeaderValue::from_str(&host).ok()?,
        };
        // An IPv6 literal is bracketed in the URL, not for the resolver.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Some(Pool { host, port, authority, egress, connect_timeout, max_idle, idle: Mutex::new(Vec::new()) })
    }

    /// POST `body` to `url` (of this pool's origin) with `headers`; the
    /// answer's head, its body still to be read, and the connection.
    pub async fn post(&self, url: &Url, mut headers: HeaderMap, body: Bytes) -> Result<(Response, Lent<'_>), Failure> {
        let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
        // Only a same-origin redirect's path could fail here (too long):
        // tried again later, like any request that could not be sent.
        let uri: hyper::Uri = target.parse().map_err(|e| Failure::retry(format!("unusable URL path: {e}")))?;
        headers.insert(HOST, self.authority.clone());
        // A kept-alive connection the server closed meanwhile fails before
        // an answer is read; the request goes again, once, on a new
        // connection. The server may have read it: delivery is at least
        // once.
        let mut reused = true;
        loop {
            let idle = if reused { self.take_idle() } else { None };
            let mut sender = match idle {
                Some(s) => s,
                None => {
                    reused = false;
                    self.connect().await?
                }
            };
            let mut request = hyper::Request::new(Full::new(body.clone()));
            *request.method_mut() = hyper::Method::POST;
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = headers.clone();
            match sender.send_request(request).await {
                Ok(response) => return Ok((response, Lent { pool: self, sender: Some(sender) })),
                Err(e) if reused && (e.is_canceled() || e.is_closed() || e.is_incomplete_message()) => {
                    reused = false;
                    continue;
                }
                Err(e) => return Err(failure::request_failed(&e)),
            }
        }
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((sender, since)) = idle.pop() {
            if since.elapsed() < IDLE && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let refused = |e: String| failure::connect_failed(&failure::snippet(e.as_bytes()));
        let addresses =
            resolve::allowed_addresses(&self.egress, &self.host, self.port, false).await.map_err(refused)?;
        let mut last = String::new();
        for address in addresses {
            let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    last = e.to_string();
                    continue;
                }
                Err(_) => {
                    last = format!("connect timed out after {} ms", self.connect_timeout.as_millis());
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| refused(failure::error_chain(&e)))?;
            // The connection's own task: it ends when the connection closes
            // or every handle to it is dropped.
            tokio::spawn(async move {
                let _ = connection.await;
            });
            return Ok(sender);
        }
        Err(refused(last))
    }
}
