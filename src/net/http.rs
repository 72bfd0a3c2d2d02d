//! HTTP transport: one endpoint's client and sending one request. What a
//! request holds and what an answer means belongs to the protocols
//! (webhook.rs, kafka_rest.rs); what a failure means to failure.rs.
//!
//! Egress is enforced here: the URL's host must be allowed before every
//! request and redirect, and every address a name resolves to is checked
//! at connect time (Resolver). Proxies come from `outbox.http_proxy` only,
//! never from the server's environment. Redirects are followed only when
//! the endpoint allows some (`max_redirects`), only 307 and 308 (the other
//! kinds turn the POST into a GET and drop the event), and the endpoint's
//! own headers, which may be credentials, never go to another origin.

use super::failure::{self, Failure};
use super::http1;
use super::resolve;
use super::NetError;
use crate::config::{self, HttpVersion};
use crate::egress::{AllowList, Egress};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, USER_AGENT};
use reqwest::{StatusCode, Url};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Response bytes read at most: enough for an error message or a Kafka
/// batch's results, and small enough that a hostile endpoint cannot fill
/// the worker's memory.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// One request, as a protocol built it.
#[derive(Debug)]
pub struct Request {
    pub url: Url,
    /// Headers the protocol sets (content type, signatures, ...).
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// An answer: its status, what it asks of us, and at most
/// MAX_RESPONSE_BYTES of its body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    /// The raw `Location` header, for messages about redirects.
    pub location: Option<Vec<u8>>,
    pub body: Vec<u8>,
}

impl Answer {
    /// The failure this non-2xx answer means.
    pub fn failure(&self) -> Failure {
        failure::classify(self.status, self.retry_after, &self.body, self.location.as_deref())
    }
}

/// An endpoint's HTTP client: its connection pool, timeouts, trusted
/// certificates, its own headers, and where it may connect.
pub struct Client {
    inner: reqwest::Client,
    /// Plain HTTP/1.1 to the endpoint's own origin goes over these
    /// connections instead of reqwest's (http1.rs says why); None for
    /// TLS, HTTP/2 and through a proxy.
    lean: Option<(url::Origin, http1::Pool)>,
    egress: Arc<Egress>,
    /// The endpoint's `headers` option: sent with every request to the
    /// endpoint's origin, never after a redirect to another.
    own_headers: HeaderMap,
    timeout: Duration,
    max_redirects: usize,
}

const AGENT: &str = concat!("outbox/", env!("CARGO_PKG_VERSION"));

/// One hop's answer, before the rules of `send` apply to it: its status,
/// what its headers ask, and its body (at most MAX_RESPONSE_BYTES) or why
/// reading it failed.
struct Hop {
    status: StatusCode,
    retry_after: Option<Duration>,
    location: Option<Vec<u8>>,
    body: Result<Vec<u8>, Failure>,
}

impl Hop {
    fn new(status: StatusCode, headers: &HeaderMap, body: Result<Vec<u8>, Failure>) -> Hop {
        Hop {
            status,
            retry_after: headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| failure::parse_retry_after(v, SystemTime::now())),
            location: headers.get(reqwest::header::LOCATION).map(|v| v.as_bytes().to_vec()),
            body,
        }
    }
}

impl Client {
    /// The client of the endpoint at `url` (its origin may get the lean
    /// HTTP/1.1 connections).
    pub fn new(url: &Url, opts: &config::Options, egress: Arc<Egress>) -> Result<Client, NetError> {
        let mut own_headers = HeaderMap::new();
        for (name, value) in &opts.headers {
            // Validated by config::Options::parse.
            if let (Ok(n), Ok(v)) = (name.parse::<reqwest::header::HeaderName>(), value.parse()) {
                own_headers.insert(n, v);
            }
        }
        let mut builder = reqwest::Client::builder()
            // Redirects are followed by `send`, which knows the rules.
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(Resolver { egress: egress.clone() }))
            .connect_timeout(opts.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(opts.max_in_flight)
            .tcp_nodelay(true)
            .user_agent(AGENT);
        builder = match opts.http_version {
            HttpVersion::Auto => builder,
            HttpVersion::Http1 => builder.http1_only(),
            // Many requests at once on one connection: no pool of
            // connections per request in flight.
            HttpVersion::Http2 => builder.http2_prior_knowledge(),
        };
        builder = match &egress.proxy {
            None => builder.no_proxy(),
            Some(proxy) => builder
                .proxy(reqwest::Proxy::all(proxy.as_str()).map_err(|e| NetError(format!("outbox.http_proxy: {e}")))?),
        };
        if let Some(pem) = &opts.ca_cert {
            for cert in
                reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| NetError(format!("ca_cert: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let inner = builder.build().map_err(|e| NetError(format!("building the HTTP client: {e}")))?;
        // Plain http:// speaks HTTP/1.1 under `auto` too (no h2c upgrade).
        let lean = (egress.proxy.is_none() && opts.http_version != HttpVersion::Http2)
            .then(|| http1::Pool::for_origin(url, egress.clone(), opts.connect_timeout, opts.max_in_flight))
            .flatten()
            .map(|pool| (url.origin(), pool));
        Ok(Client { inner, lean, egress, own_headers, timeout: opts.timeout, max_redirects: opts.max_redirects })
    }

    /// POST `request`, following allowed redirects; the answer, whatever
    /// its status, or why there is none.
    pub async fn send(&self, request: Request) -> Result<Answer, Failure> {
        let Request { mut url, headers, body } = request;
        // One copy of the body, shared by every attempt.
        let body = bytes::Bytes::from(body);
        let origin = url.origin();
        for hop in 0.. {
            if !self.egress.allowed.allows(&url) {
                // Kept, not dropped: delivery resumes once the host is
                // allowed again.
                let refusal = AllowList::refusal(&url).message;
                return Err(Failure::retry(if hop == 0 {
                    refusal
                } else {
                    format!("redirect to {} is not allowed by outbox.allowed_hosts", url.host_str().unwrap_or(""))
                }));
            }
            let moved;
            let here = if hop == 0 {
                &origin
            } else {
                moved = url.origin();
                &moved
            };
            let mut all = headers.clone();
            if *here == origin {
                all.extend(self.own_headers.clone());
            }
            let Hop { status, retry_after, location, body } = match &self.lean {
                Some((lean_origin, pool)) if lean_origin == here => {
                    // What reqwest adds, unless the endpoint's headers set it.
                    all.entry(USER_AGENT).or_insert(HeaderValue::from_static(AGENT));
                    all.entry(ACCEPT).or_insert(HeaderValue::from_static("*/*"));
                    let answer = pool.post(&url, &all, &body, self.timeout, MAX_RESPONSE_BYTES).await?;
                    Hop::new(answer.status, &answer.headers, answer.body)
                }
                _ => self.reqwest_hop(&url, all, body.clone()).await?,
            };
            let redirect = matches!(status, StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT);
            if let (true, Some(to)) = (redirect && self.max_redirects > 0, &location) {
                if hop >= self.max_redirects {
                    return Err(Failure::retry(format!("more than {} redirects", self.max_redirects)));
                }
                let next = std::str::from_utf8(to).ok().and_then(|to| url.join(to).ok());
                let Some(next) = next.filter(|n| matches!(n.scheme(), "http" | "https")) else {
                    return Err(Failure::reject(format!(
                        "HTTP {} with an unusable Location: {}",
                        status.as_u16(),
                        failure::snippet(to)
                    )));
                };
                url = next;
                continue;
            }
            let body = match body {
                Ok(b) => b,
                // The answer was cut short: only a success can be trusted as
                // such.
                Err(cut) if !status.is_success() => cut.message.into_bytes(),
                Err(cut) => return Err(cut),
            };
            return Ok(Answer { status, retry_after, location, body });
        }
        unreachable!("the loop returns")
    }

    /// One request through reqwest (TLS, HTTP/2, a proxy, another origin).
    async fn reqwest_hop(&self, url: &Url, headers: HeaderMap, body: bytes::Bytes) -> Result<Hop, Failure> {
        let mut response = self
            .inner
            .post(url.clone())
            .headers(headers)
            .body(body)
            // Up to the end of the answer's body, as http1's Pool::post.
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| failure::transport(e, self.timeout))?;
        let mut read = Vec::new();
        let whole = loop {
            match response.chunk().await {
                Ok(Some(chunk)) if append_capped(&mut read, &chunk) => {}
                // Dropping the response closes the connection.
                Ok(Some(_)) => break Ok(read),
                Ok(None) => break Ok(read),
                Err(e) => break Err(failure::transport(e, self.timeout)),
            }
        };
        Ok(Hop::new(response.status(), response.headers(), whole))
    }
}

/// Append `chunk` to `body` up to MAX_RESPONSE_BYTES; false once full.
fn append_capped(body: &mut Vec<u8>, chunk: &[u8]) -> bool {
    let room = MAX_RESPONSE_BYTES - body.len();
    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    body.len() < MAX_RESPONSE_BYTES
}

/// Resolves names like the system does, then keeps only the addresses the
/// allow-list lets a connection go to (see egress.rs). The proxy, chosen
/// by the server's administrator, is exempt.
struct Resolver {
    egress: Arc<Egress>,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.egress.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let is_proxy = egress
                .proxy
                .as_deref()
                .and_then(|p| Url::parse(p).ok())
                .is_some_and(|p| p.host_str().is_some_and(|h| h.eq_ignore_ascii_case(&host)));
            let allowed = resolve::allowed_addresses(&egress, &host, 0, is_proxy).await?;
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}
