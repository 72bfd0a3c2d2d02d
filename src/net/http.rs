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
use super::resolve;
use super::NetError;
use crate::config::{self, HttpVersion};
use crate::egress::{AllowList, Egress};
use reqwest::header::HeaderMap;
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
    egress: Arc<Egress>,
    /// The endpoint's `headers` option: sent with every request to the
    /// endpoint's origin, never after a redirect to another.
    own_headers: HeaderMap,
    timeout: Duration,
    max_redirects: usize,
}

impl Client {
    pub fn new(opts: &config::Options, egress: Arc<Egress>) -> Result<Client, NetError> {
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
            .user_agent(concat!("outbox/", env!("CARGO_PKG_VERSION")));
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
        Ok(Client { inner, egress, own_headers, timeout: opts.timeout, max_redirects: opts.max_redirects })
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
            let mut all = headers.clone();
            if url.origin() == origin {
                all.extend(self.own_headers.clone());
            }
            let response = self
                .inner
                .post(url.clone())
                .headers(all)
                .body(body.clone())
                .timeout(self.timeout)
                .send()
                .await
                .map_err(|e| failure::transport(e, self.timeout))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| failure::parse_retry_after(v, SystemTime::now()));
            let location = response.headers().get(reqwest::header::LOCATION).map(|v| v.as_bytes().to_vec());
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
            let body = match read_capped(response).await {
                Ok(b) => b,
                // The answer was cut short: only a success can be trusted as
                // such.
                Err(e) if !status.is_success() => Vec::from(e.to_string()),
                Err(e) => return Err(failure::transport(e, self.timeout)),
            };
            return Ok(Answer { status, retry_after, location, body });
        }
        unreachable!("the loop returns")
    }
}

async fn read_capped(mut response: reqwest::Response) -> reqwest::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_RESPONSE_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_RESPONSE_BYTES {
            break; // dropping the response closes the connection
        }
    }
    Ok(body)
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
