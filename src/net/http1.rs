//! Plain HTTP/1.1 to an endpoint's own origin over kept-alive connections
//! of our own: the task that sends a request writes it and reads its answer
//! on the connection itself.
//!
//! Why not reqwest, nor hyper: measured on this project's machine (2
//! cores, loopback, 64 requests in flight), reqwest's pooled client costs
//! 52–59 µs of CPU per request, hyper's connection API 25–38 µs (every
//! request and every piece of its answer passes through the connection's
//! own task), and writing and reading the socket in the requesting task
//! 19–24 µs. One event per request makes that the worker's largest cost.
//! Everything else (TLS, HTTP/2, a proxy, redirects to another origin)
//! stays with reqwest (http.rs), and the rules of a request (egress,
//! redirects, headers, the size of an answer) stay in http.rs's `send`.
//!
//! What is ours is small: a request is one buffer; an answer's head is
//! parsed by httparse (hyper's own parser) and bounded; its body is framed
//! as RFC 9112 §6.3 says (no body, `Content-Length`, `chunked`, or up to
//! the connection's end) and read up to the caller's cap. A connection is
//! kept only when its answer was HTTP/1.1, did not ask to close, and was
//! read to its exact end.
//!
//! Connections are checked like reqwest's: the host's addresses are
//! resolved and filtered by `outbox.allowed_hosts` at connect time
//! (resolve.rs), with the endpoint's connect timeout.

use super::failure::{self, Failure};
use super::resolve;
use crate::egress::Egress;
use bytes::{Buf, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use reqwest::{StatusCode, Url};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long a connection may wait unused in the pool (as reqwest's
/// `pool_idle_timeout` in http.rs).
const IDLE: Duration = Duration::from_secs(60);
/// An answer's head (status line, headers; a chunked body's trailers)
/// larger than this fails the request (hyper allowed about 400 KB).
const MAX_HEAD_BYTES: usize = 256 * 1024;
/// Interim (1xx) answers skipped before the final one, at most.
const MAX_INTERIM: usize = 8;
/// Header fields of one answer, at most.
const MAX_HEADERS: usize = 128;
/// The longest request target (path and query) sent.
const MAX_TARGET_BYTES: usize = 16 * 1024;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// An answer: its status and headers, and at most the caller's cap of its
/// body, or why reading the body failed (the status stands either way).
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Result<Vec<u8>, Failure>,
}

/// The kept-alive connections to one origin (`http://host:port`).
pub struct Pool {
    host: String,
    port: u16,
    /// The `Host` header of every request.
    authority: String,
    egress: Arc<Egress>,
    connect_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<(Conn, Instant)>>,
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
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        HeaderValue::from_str(&authority).ok()?;
        // An IPv6 literal is bracketed in the URL, not for the resolver.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Some(Pool { host, port, authority, egress, connect_timeout, max_idle, idle: Mutex::new(Vec::new()) })
    }

    /// POST `body` to `url` (of this pool's origin) with `headers`, all of
    /// it within `timeout`; the answer, with at most `max_body` bytes of
    /// its body. A body cut short (by the timeout too) keeps its status.
    pub async fn post(
        &self,
        url: &Url,
        headers: &HeaderMap,
        body: &[u8],
        timeout: Duration,
        max_body: usize,
    ) -> Result<Answer, Failure> {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || failure::timed_out(timeout);
        let request = self.encode(url, headers, body)?;
        // A kept-alive connection the server closed meanwhile fails before
        // an answer is read; the request goes again, once, on a new
        // connection. The server may have read it: delivery is at least
        // once. So does a 408 on a kept-alive connection: the server timed
        // the connection out, maybe before our request came (RFC 9110
        // §15.5.9 lets a client repeat it).
        let mut reuse = true;
        loop {
            let idle = if reuse { self.take_idle() } else { None };
            reuse = idle.is_some();
            let mut conn = match idle {
                Some(c) => c,
                None => tokio::time::timeout_at(deadline, self.connect()).await.map_err(|_| timed_out())??,
            };
            let head = match tokio::time::timeout_at(deadline, conn.exchange(&request)).await {
                Err(_) => return Err(timed_out()),
                Ok(Ok(head)) if reuse && head.status == StatusCode::REQUEST_TIMEOUT => {
                    reuse = false;
                    continue;
                }
                Ok(Ok(head)) => head,
                Ok(Err(Broken::BeforeAnswer(_))) if reuse => {
                    reuse = false;
                    continue;
                }
                Ok(Err(Broken::BeforeAnswer(why) | Broken::Answer(why))) => return Err(failure::request_failed(&why)),
            };
            let body = match tokio::time::timeout_at(deadline, conn.read_body(&head, max_body)).await {
                Err(_) => Err(timed_out()),
                Ok(Err(why)) => Err(failure::request_failed(&why)),
                Ok(Ok((body, ended))) => {
                    if ended && head.keep_alive {
                        self.give_back(conn);
                    }
                    Ok(body)
                }
            };
            return Ok(Answer { status: head.status, headers: head.headers, body });
        }
    }

    /// The request as it goes on the wire: one buffer, one write.
    fn encode(&self, url: &Url, headers: &HeaderMap, body: &[u8]) -> Result<Vec<u8>, Failure> {
        let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
        // The URL crate escapes what a target may not hold; only a
        // same-origin redirect's overlong path could fail here, tried again
        // later like any request that could not be sent.
        let usable =
            target.starts_with('/') && target.len() <= MAX_TARGET_BYTES && target.bytes().all(|b| b.is_ascii_graphic());
        if !usable {
            return Err(Failure::retry(format!("unusable URL path: {}", failure::snippet(target.as_bytes()))));
        }
        let mut out = Vec::with_capacity(256 + body.len());
        for part in [b"POST ", target.as_bytes(), b" HTTP/1.1\r\nhost: ", self.authority.as_bytes(), b"\r\n"] {
            out.extend_from_slice(part);
        }
        // Framing and the connection are ours to say. Names and values
        // are checked by the http crate: no line breaks get through.
        for (name, value) in headers {
            if [HOST, CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION].contains(name) {
                continue;
            }
            for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                out.extend_from_slice(part);
            }
        }
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        Ok(out)
    }

    /// An idle connection still fit for a request: not too old, and with
    /// nothing from the server since its last answer (its end, or an
    /// unasked answer such as a 408 before closing, retires it).
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < IDLE && conn.quiet() {
                return Some(conn);
            }
        }
        None
    }

    fn give_back(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    async fn connect(&self) -> Result<Conn, Failure> {
        let refused = |e: String| failure::connect_failed(&failure::snippet(e.as_bytes()));
        let addresses =
            resolve::allowed_addresses(&self.egress, &self.host, self.port, false).await.map_err(refused)?;
        let mut last = String::new();
        for address in addresses {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(Conn { stream, buf: BytesMut::new() });
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("connect timed out after {} ms", self.connect_timeout.as_millis()),
            }
        }
        Err(refused(last))
    }
}

/// How an exchange broke: before any byte of an answer came (on a
/// kept-alive connection: the server had closed it), or after.
enum Broken {
    BeforeAnswer(String),
    Answer(String),
}

/// An answer's head, and how its body is framed.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    /// HTTP/1.1, no `Connection: close`, and framing that ends by itself.
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// One connection: its socket, and bytes read but not used yet (taking
/// from the front costs nothing, however small the pieces: a hostile
/// answer of one-byte chunks costs what its bytes cost).
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Nothing to read, nor the connection's end: asked of the socket
    /// itself, not of tokio's readiness, which lags what the kernel holds
    /// until the runtime next polls for events (under load, or while the
    /// thread is busy, milliseconds): bytes that came in that window would
    /// be read as the answer to the next request. One failed `recv` per
    /// request is the price (under a microsecond).
    fn quiet(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut byte = 0u8;
        // SAFETY: peeks at most one byte into `byte`, without waiting.
        let n = unsafe {
            libc::recv(self.stream.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
    }

    /// Write `request`, read the head of its answer. The server may answer
    /// before it has read the whole request (a 413, say) and stop reading
    /// it: the answer is read while the request is written, and once a
    /// final one comes writing stops (interim ones are passed over). A
    /// request not written whole leaves the connection unfit for another.
    async fn exchange(&mut self, request: &[u8]) -> Result<Head, Broken> {
        self.buf.clear();
        let mut scan = HeadScan::default();
        let mut sent = 0;
        let (mut write_error, mut read_error) = (None, None);
        let mut early = None;
        while sent < request.len() {
            tokio::select! {
                biased;
                ready = self.stream.writable() => match ready.and_then(|()| self.stream.try_write(&request[sent..])) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        write_error = Some(e.to_string());
                        break;
                    }
                },
                // Something to read before the request is out. tokio's flag
                // can be stale (it stays set after a read that filled the
                // buffer exactly), so the socket is asked; a failed try
                // clears it. Interim answers (an unasked 100 Continue, a
                // proxy's 103) and a head that has not ended yet do not
                // stop the writing: the server may want the whole body
                // before it answers. A final answer (a 413, say), the
                // connection's end or an error do.
                Ok(()) = self.stream.readable() => {
                    self.buf.reserve(READ_SIZE);
                    match self.stream.try_read_buf(&mut self.buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Ok(n) if n > 0 => {
                            if let Some(head) = scan.next(&mut self.buf)? {
                                early = Some(head);
                                break;
                            }
                        }
                        Ok(_) => break,
                        Err(e) => {
                            read_error = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
        }
        let head = match early {
            Some(head) => Ok(head),
            None => self.read_head(&mut scan).await,
        };
        let mut head = match head {
            // No answer to read after a failed write: the request did not
            // arrive whole (on a kept-alive connection: the server had
            // closed it).
            Err(Broken::BeforeAnswer(why)) => {
                return Err(Broken::BeforeAnswer(write_error.or(read_error).unwrap_or(why)))
            }
            other => other?,
        };
        head.keep_alive &= sent == request.len();
        Ok(head)
    }

    /// Read the head of an answer, past interim 1xx answers (a few), on
    /// from what `scan` has seen.
    async fn read_head(&mut self, scan: &mut HeadScan) -> Result<Head, Broken> {
        loop {
            if let Some(head) = scan.next(&mut self.buf)? {
                return Ok(head);
            }
            let before = self.buf.is_empty() && scan.interim == 0;
            match self.fill().await {
                Ok(0) if before => return Err(Broken::BeforeAnswer("connection closed before an answer".into())),
                Ok(0) => return Err(Broken::Answer("connection closed in an answer's head".into())),
                Ok(_) => {}
                Err(e) if before => return Err(Broken::BeforeAnswer(e.to_string())),
                Err(e) => return Err(Broken::Answer(e.to_string())),
            }
        }
    }

    /// Read the body `head` frames, keeping at most `max` bytes; whether
    /// it was read to its exact end with nothing after it (else the
    /// connection is not used again).
    async fn read_body(&mut self, head: &Head, max: usize) -> Result<(Vec<u8>, bool), String> {
        let mut body = Vec::new();
        let ended = match head.framing {
            Framing::Empty => true,
            Framing::Length(n) => self.read_exact_into(n, &mut body, max).await?,
            Framing::UntilClose => {
                loop {
                    let take = self.buf.len().min(max - body.len());
                    body.extend_from_slice(&self.buf[..take]);
                    self.buf.advance(take);
                    if body.len() >= max || self.fill().await.map_err(|e| e.to_string())? == 0 {
                        break;
                    }
                }
                false
            }
            Framing::Chunked => self.read_chunked(&mut body, max).await?,
        };
        Ok((body, ended && self.buf.is_empty()))
    }

    /// `n` bytes of body into `body`, up to `max`; false when the cap cut
    /// them (the rest is not read: the connection is not used again).
    async fn read_exact_into(&mut self, n: u64, body: &mut Vec<u8>, max: usize) -> Result<bool, String> {
        let mut left = n;
        loop {
            let take = (self.buf.len() as u64).min(left) as usize;
            let keep = take.min(max - body.len());
            body.extend_from_slice(&self.buf[..keep]);
            if keep < take || (body.len() >= max && left > take as u64) {
                return Ok(false);
            }
            self.buf.advance(take);
            left -= take as u64;
            if left == 0 {
                return Ok(true);
            }
            if self.fill().await.map_err(|e| e.to_string())? == 0 {
                return Err("connection closed before the answer's body ended".into());
            }
        }
    }

    /// A chunked body into `body` (up to `max`), through its trailers.
    async fn read_chunked(&mut self, body: &mut Vec<u8>, max: usize) -> Result<bool, String> {
        loop {
            // The size line is parsed once a CR has come, as the head is once
            // it has ended: httparse settles the line at its first CR
            // (complete at CRLF, else invalid), and takes anything else
            // after a ';' as an extension, LF included.
            let mut scanned: usize = 0;
            let (used, size) = loop {
                // httparse takes an empty size line for the last chunk.
                if self.buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
                    return Err("invalid chunk in the answer's body".into());
                }
                let ended = self.buf[scanned.saturating_sub(1)..].contains(&b'\r');
                scanned = self.buf.len();
                if ended {
                    match httparse::parse_chunk_size(&self.buf) {
                        Ok(httparse::Status::Complete(found)) => break found,
                        Ok(httparse::Status::Partial) => {}
                        Err(_) => return Err("invalid chunk in the answer's body".into()),
                    }
                }
                if self.buf.len() > MAX_HEAD_BYTES {
                    return Err("invalid chunk in the answer's body".into());
                }
                self.fill_some().await?;
            };
            self.buf.advance(used);
            if size == 0 {
                return self.skip_trailers().await.map(|()| true);
            }
            if !self.read_exact_into(size, body, max).await? {
                return Ok(false);
            }
            while self.buf.len() < 2 {
                self.fill_some().await?;
            }
            if &self.buf[..2] != b"\r\n" {
                return Err("invalid chunk in the answer's body".into());
            }
            self.buf.advance(2);
        }
    }

    /// The trailer fields after the last chunk, up to the empty line.
    async fn skip_trailers(&mut self) -> Result<(), String> {
        // Lines end in CRLF or a bare LF, as httparse reads heads.
        // Looked for in what came since the last look (and the two bytes
        // before it): a dripped trailer is not searched again whole.
        let find = |buf: &[u8], from: usize, what: &[u8]| {
            buf[from..].windows(what.len()).position(|w| w == what).map(|p| p + from)
        };
        let mut scanned: usize = 0;
        loop {
            let from = scanned.saturating_sub(2);
            scanned = self.buf.len();
            let end = if self.buf.starts_with(b"\r\n") {
                Some(2)
            } else if self.buf.starts_with(b"\n") {
                Some(1)
            } else {
                [find(&self.buf, from, b"\n\r\n").map(|p| p + 3), find(&self.buf, from, b"\n\n").map(|p| p + 2)]
                    .into_iter()
                    .flatten()
                    .min()
            };
            if let Some(end) = end {
                self.buf.advance(end);
                return Ok(());
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(format!("an answer's trailers over {} KB", MAX_HEAD_BYTES / 1024));
            }
            self.fill_some().await?;
        }
    }

    /// Read more into `buf`: how many bytes (0 at the connection's end).
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(READ_SIZE);
        self.stream.read_buf(&mut self.buf).await
    }

    /// As `fill`, where the connection's end is an error.
    async fn fill_some(&mut self) -> Result<(), String> {
        match self.fill().await {
            Ok(0) => Err("connection closed before the answer's body ended".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Where an answer's head is in the bytes read so far.
///
/// The head is parsed only once the bytes hold its end (a blank line),
/// looked for in what came since the last look: a server dripping its head
/// a byte at a time would otherwise have the whole of it parsed again
/// after every byte (up to 256 KB, some 30 GB of parsing in all), the
/// runtime's thread busy with it for the request's whole timeout.
#[derive(Default)]
struct HeadScan {
    /// Bytes at the front of the buffer already looked through.
    scanned: usize,
    /// Interim answers passed over.
    interim: usize,
}

impl HeadScan {
    /// The final head at the front of `buf`, taken from it, past interim
    /// answers; None while it has not ended.
    fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Head>, Broken> {
        loop {
            // Blank lines before the status line, which httparse skips, go
            // first: after them a blank line can only be the head's end (and
            // a server dripping them cannot have the rest parsed again).
            let blank = leading_blank_lines(buf);
            buf.advance(blank);
            self.scanned = self.scanned.saturating_sub(blank);
            // Something other than HTTP (an SSH or SMTP banner, a TLS
            // alert) fails at once, not when its head would have ended:
            // it may never send a blank line, and the request would wait
            // out its timeout.
            let start = buf.len().min(5);
            if buf[..start] != b"HTTP/"[..start] {
                return Err(Broken::Answer("invalid answer: not HTTP/1.x".into()));
            }
            let from = self.scanned.saturating_sub(2);
            let ended = buf[from..].windows(2).any(|w| w == b"\n\n" || w == b"\n\r");
            self.scanned = buf.len();
            if ended {
                if let Some(head) = parse_head(buf).map_err(Broken::Answer)? {
                    self.scanned = 0;
                    if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                        self.interim += 1;
                        if self.interim > MAX_INTERIM {
                            return Err(Broken::Answer(format!("more than {MAX_INTERIM} interim answers")));
                        }
                        continue;
                    }
                    return Ok(Some(head));
                }
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Err(Broken::Answer(format!("an answer's head over {} KB", MAX_HEAD_BYTES / 1024)));
            }
            return Ok(None);
        }
    }
}

/// Bytes of the blank lines (CRLF or a bare LF) `buf` starts with.
fn leading_blank_lines(buf: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match &buf[at..] {
            [b'\r', b'\n', ..] => at += 2,
            [b'\n', ..] => at += 1,
            _ => return at,
        }
    }
}

/// The head at the start of `buf`, consumed from it; None while
/// incomplete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut fields);
    let used = match answer.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid answer: {e}")),
    };
    let status = answer
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| "invalid answer: no status".to_string())?;
    let mut headers = HeaderMap::with_capacity(answer.headers.len());
    for field in answer.headers.iter() {
        // httparse accepted the bytes; the few the http crate refuses (a
        // value with a control character) are dropped, not fatal.
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(field.name.as_bytes()), HeaderValue::from_bytes(field.value))
        {
            headers.append(name, value);
        }
    }
    let framing = framing(status, answer.version == Some(1), &headers)?;
    let close = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
    // Both framings at once is how requests get smuggled: believe the
    // chunks, never reuse the connection.
    let both = headers.contains_key(TRANSFER_ENCODING) && headers.contains_key(CONTENT_LENGTH);
    // A 408 is what a server sends when it gives up on a connection, asked
    // or not: never send another request after one.
    let keep_alive = answer.version == Some(1)
        && !close
        && !both
        && status != StatusCode::REQUEST_TIMEOUT
        && framing != Framing::UntilClose
        && status != StatusCode::SWITCHING_PROTOCOLS;
    buf.advance(used);
    Ok(Some(Head { status, headers, framing, keep_alive }))
}

/// How the body of an answer with `status` and `headers` ends (RFC 9112
/// §6.3, for a client that sent a POST); `http11`: an HTTP/1.1 answer
/// (in an HTTP/1.0 one a transfer coding is faulty framing: §6.1).
fn framing(status: StatusCode, http11: bool, headers: &HeaderMap) -> Result<Framing, String> {
    if status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        // Chunked only when it is the last coding applied.
        let last = headers.get_all(TRANSFER_ENCODING).iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).last();
        return Ok(match last {
            Some(coding) if http11 && coding.trim_ascii().eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let n = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| "invalid answer: bad content-length".to_string())?;
            if length.is_some_and(|l| l != n) {
                return Err("invalid answer: conflicting content-lengths".into());
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn head(raw: &str) -> Result<Option<Head>, String> {
        parse_head(&mut BytesMut::from(raw.as_bytes()))
    }

    fn framed(raw: &str) -> (Framing, bool) {
        let h = head(raw).unwrap().unwrap();
        (h.framing, h.keep_alive)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(framed("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"), (Framing::Length(5), true));
        assert_eq!(framed("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"), (Framing::Length(5), true));
        assert_eq!(framed("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"), (Framing::Chunked, true));
        assert_eq!(framed("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n"), (Framing::UntilClose, false));
        assert_eq!(framed("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"), (Framing::Empty, true));
        assert_eq!(framed("HTTP/1.1 200 OK\r\n\r\n"), (Framing::UntilClose, false));
        assert_eq!(framed("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"), (Framing::Length(0), false));
        assert_eq!(framed("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"), (Framing::UntilClose, false));
        assert!(!framed("HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n").1);
        // Both framings: the chunks, and the connection is not kept.
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"),
            (Framing::Chunked, false)
        );
    }

    #[test]
    fn bad_heads_fail_and_partial_ones_wait() {
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n").unwrap().is_none());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n").is_err());
        assert!(head("SMTP ready\r\n\r\n").is_err());
    }

    /// A server on loopback that answers the requests of each connection
    /// with the next of `answers` (raw bytes), closing after those marked
    /// so; counts connections.
    pub(in crate::net) async fn server(
        answers: Vec<(&'static [u8], bool)>,
    ) -> (Url, Arc<std::sync::atomic::AtomicUsize>) {
        server_in_pieces(answers, 7).await
    }

    /// As `server`, each answer written in pieces of `piece` bytes.
    async fn server_in_pieces(
        answers: Vec<(&'static [u8], bool)>,
        piece: usize,
    ) -> (Url, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let answers = Arc::new(Mutex::new(answers.into_iter()));
        let url = scripted(move |mut socket| {
            counted.fetch_add(1, Ordering::SeqCst);
            let answers = answers.clone();
            async move {
                let mut seen = Vec::new();
                // One request: its head, then content-length bytes.
                while let Some(end) = read_until(&mut socket, &mut seen, head_end).await {
                    let length = content_length(&seen[..end]);
                    let Some(whole) = read_body_of(&mut socket, &mut seen, end, length).await else { return };
                    seen.drain(..whole);
                    let Some((answer, close)) = answers.lock().unwrap().next() else { return };
                    // In pieces, as a network may deliver it.
                    for piece in answer.chunks(piece) {
                        socket.write_all(piece).await.unwrap();
                        socket.flush().await.unwrap();
                    }
                    if close {
                        return;
                    }
                }
            }
        })
        .await;
        (url.join("/hook?x=1").unwrap(), connections)
    }

    /// The content-length of a request head (0 without one).
    fn content_length(head: &[u8]) -> usize {
        let head = String::from_utf8_lossy(head).to_lowercase();
        head.lines().find_map(|l| l.strip_prefix("content-length: ")).map_or(0, |v| v.trim().parse().unwrap())
    }

    /// Read into `seen` the `length` bytes of body after the head that
    /// ends at `end`; where the request ends, or None if the connection
    /// ends first.
    async fn read_body_of(
        socket: &mut tokio::net::TcpStream,
        seen: &mut Vec<u8>,
        end: usize,
        length: usize,
    ) -> Option<usize> {
        read_until(socket, seen, |seen: &[u8]| (seen.len() >= end + length).then_some(end + length)).await
    }

    /// Where the request head at the start of `seen` ends (past its empty
    /// line), once it is there.
    fn head_end(seen: &[u8]) -> Option<usize> {
        seen.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4)
    }

    /// Read from `socket` into `seen` until `done` finds what it wants;
    /// None if the connection ends first.
    async fn read_until(
        socket: &mut tokio::net::TcpStream,
        seen: &mut Vec<u8>,
        done: impl Fn(&[u8]) -> Option<usize>,
    ) -> Option<usize> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(found) = done(seen) {
                return Some(found);
            }
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn pool(url: &Url) -> Pool {
        let egress = Egress { allowed: crate::egress::AllowList::parse("127.0.0.1").unwrap(), proxy: None };
        Pool::for_origin(url, Arc::new(egress), Duration::from_secs(2), 8).unwrap()
    }

    async fn post(pool: &Pool, url: &Url, max: usize) -> Result<Answer, Failure> {
        pool.post(url, &HeaderMap::new(), b"{\"a\":1}", Duration::from_secs(2), max).await
    }

    fn text(answer: &Answer) -> String {
        String::from_utf8(answer.body.as_ref().expect("a whole body").clone()).unwrap()
    }

    #[tokio::test]
    async fn bodies_by_length_and_by_chunks_keep_the_connection() {
        let (url, connections) = server(vec![
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false),
            (b"HTTP/1.1 202 Accepted\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nt: 1\r\n\r\n", false),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        ])
        .await;
        let pool = pool(&url);
        let first = post(&pool, &url, 1024).await.unwrap();
        assert_eq!((first.status.as_u16(), text(&first)), (200, "hello".to_string()));
        let second = post(&pool, &url, 1024).await.unwrap();
        assert_eq!((second.status.as_u16(), text(&second)), (202, "abcde".to_string()));
        let third = post(&pool, &url, 1024).await.unwrap();
        assert_eq!((third.status.as_u16(), text(&third)), (204, String::new()));
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_to_the_end_of_the_connection_or_over_the_cap_ends_it() {
        let (url, connections) = server(vec![
            (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
            (b"HTTP/1.1 500 Oops\r\ncontent-length: 26\r\n\r\nabcdefghijklmnopqrstuvwxyz", false),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
        ])
        .await;
        let pool = pool(&url);
        assert_eq!(text(&post(&pool, &url, 1024).await.unwrap()), "until the end");
        let capped = post(&pool, &url, 4).await.unwrap();
        assert_eq!((capped.status.as_u16(), text(&capped)), (500, "abcd".to_string()));
        assert_eq!(text(&post(&pool, &url, 1024).await.unwrap()), "ok");
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_is_replaced_once() {
        let (url, connections) = server(vec![
            (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", true),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n2", false),
        ])
        .await;
        let pool = pool(&url);
        post(&pool, &url, 1024).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(text(&post(&pool, &url, 1024).await.unwrap()), "2");
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// CPU time of the calling thread.
    fn thread_cpu() -> Duration {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: fills `t`.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    /// A server that answers with `head` (its bytes in pieces of 50, a
    /// little apart: each read brings one), then `rest`; the answer, and
    /// the CPU time this thread spent reading it.
    async fn dripped(head: Vec<u8>, rest: &'static [u8]) -> (Answer, Duration) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut socket, _) = listener.accept().unwrap();
            socket.set_nodelay(true).unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request);
            for piece in head.chunks(50) {
                if socket.write_all(piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_micros(300));
            }
            let _ = socket.write_all(rest);
            std::thread::sleep(Duration::from_secs(2));
        });
        let before = thread_cpu();
        let answer = pool(&url).post(&url, &HeaderMap::new(), b"{}", Duration::from_secs(60), 1024).await.unwrap();
        (answer, thread_cpu() - before)
    }

    // Each of these dripped 200 KB: parsing everything again after each
    // of 4,000 reads took 1.5 s of CPU or more in a debug build.

    #[tokio::test]
    async fn a_dripped_head_is_not_parsed_again_for_each_piece() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..100 {
            head.extend_from_slice(format!("x-drip-{i:03}: {}\r\n", "d".repeat(2035)).as_bytes());
        }
        let (answer, cpu) = dripped(head, b"content-length: 2\r\n\r\nok").await;
        assert_eq!((answer.status.as_u16(), text(&answer)), (200, "ok".to_string()));
        assert!(cpu < Duration::from_millis(600), "{cpu:?} of CPU to read a 200 KB head");
    }

    #[tokio::test]
    async fn dripped_blank_lines_before_the_head_are_not_parsed_again() {
        let (answer, cpu) = dripped(vec![b'\n'; 200_000], b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        assert_eq!((answer.status.as_u16(), text(&answer)), (200, "ok".to_string()));
        assert!(cpu < Duration::from_millis(600), "{cpu:?} of CPU for 200 KB of blank lines");
    }

    #[tokio::test]
    async fn a_dripped_chunk_extension_is_not_parsed_again() {
        let mut head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;".to_vec();
        head.extend(std::iter::repeat_n(b'\n', 200_000));
        let (answer, cpu) = dripped(head, b"\r\nok\r\n0\r\n\r\n").await;
        assert_eq!((answer.status.as_u16(), text(&answer)), (200, "ok".to_string()));
        assert!(cpu < Duration::from_millis(600), "{cpu:?} of CPU for a 200 KB chunk extension");
    }

    #[tokio::test]
    async fn a_408_on_a_kept_connection_sends_the_request_again_on_a_new_one() {
        let url = scripted(|mut socket| async move {
            read_head_of(&mut socket).await;
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst").await;
            read_head_of(&mut socket).await;
            let _ = socket.write_all(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let pool = pool(&url);
        assert_eq!(text(&post(&pool, &url, 1024).await.unwrap()), "first");
        let second = post(&pool, &url, 1024).await.unwrap();
        assert_eq!((second.status.as_u16(), text(&second)), (200, "first".to_string()), "sent again, answered");
    }

    #[tokio::test]
    async fn no_request_follows_a_408_on_its_connection() {
        // Even one that does not say it closes: a server that timed the
        // connection out may have sent it unasked, and an answer of ours
        // may still be on its way.
        let (url, connections) = server(vec![
            (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
        ])
        .await;
        let pool = pool(&url);
        assert_eq!(post(&pool, &url, 1024).await.unwrap().status.as_u16(), 408);
        assert_eq!(text(&post(&pool, &url, 1024).await.unwrap()), "ok");
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// tokio keeps a socket "readable" after a read that did not drain it
    /// to `WouldBlock`, as reading a whole answer does. A request larger
    /// than the socket's buffers, sent next on that connection, must not
    /// take that stale flag for an early answer and stop writing.
    #[tokio::test]
    async fn a_large_request_on_a_kept_connection_is_written_whole() {
        // An answer of exactly one read's size, written at once: the read
        // fills the buffer and leaves the flag set.
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", READ_SIZE - 42);
        assert_eq!(head.len(), 42);
        let exact: &'static [u8] = format!("{head}{}", "o".repeat(READ_SIZE - 42)).into_bytes().leak();
        let (url, connections) = server_in_pieces(
            vec![(exact, false), (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbig", false)],
            usize::MAX,
        )
        .await;
        let pool = pool(&url);
        assert_eq!(post(&pool, &url, READ_SIZE).await.unwrap().body.unwrap().len(), READ_SIZE - 42);
        let large = vec![b'x'; 16 << 20];
        let answer = pool.post(&url, &HeaderMap::new(), &large, Duration::from_secs(5), 1024).await;
        assert_eq!(text(&answer.unwrap()), "big");
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn broken_answers_fail_their_request() {
        let (url, _) = server(vec![
            (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", true),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", true),
            (b"NOT HTTP\r\n\r\n", true),
        ])
        .await;
        let pool = pool(&url);
        let cut = post(&pool, &url, 1024).await.unwrap();
        assert_eq!(cut.status.as_u16(), 200);
        assert!(cut.body.unwrap_err().message.contains("closed before the answer's body ended"));
        assert!(post(&pool, &url, 1024).await.unwrap().body.unwrap_err().message.contains("invalid chunk"));
        assert!(post(&pool, &url, 1024).await.err().unwrap().message.contains("invalid answer"));
    }

    /// A listener on loopback whose connections `serve` handles, one task
    /// each.
    async fn scripted<F, Fut>(serve: F) -> Url
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket));
            }
        });
        url
    }

    /// Read until the end of a request's head.
    async fn read_head_of(socket: &mut tokio::net::TcpStream) {
        read_until(socket, &mut Vec::new(), head_end).await;
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_request_is_read_is_heard() {
        // A server that refuses a large body after its head, and reads no
        // more of it.
        let url = scripted(|mut socket| async move {
            read_head_of(&mut socket).await;
            let _ = socket.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let pool = pool(&url);
        let big = vec![b'x'; 32 * 1024 * 1024];
        let started = Instant::now();
        let answer = pool.post(&url, &HeaderMap::new(), &big, Duration::from_secs(3), 1024).await.unwrap();
        assert_eq!(answer.status.as_u16(), 413);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    /// An interim answer (here an unasked 100 Continue; a proxy's 103
    /// Early Hints alike) while the request is still being written is
    /// passed over and the rest written: the server answers only once it
    /// has the whole body.
    #[tokio::test]
    async fn an_interim_answer_during_a_large_request_does_not_stop_it() {
        let url = scripted(|mut socket| async move {
            let mut seen = Vec::new();
            let end = read_until(&mut socket, &mut seen, head_end).await.unwrap();
            let _ = socket.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            let length = content_length(&seen[..end]);
            assert_eq!(length, 8 << 20, "the request's body");
            if read_body_of(&mut socket, &mut seen, end, length).await.is_some() {
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let pool = pool(&url);
        let large = vec![b'x'; 8 << 20];
        let answer = pool.post(&url, &HeaderMap::new(), &large, Duration::from_secs(3), 1024).await;
        assert_eq!(text(&answer.unwrap()), "ok");
    }

    /// A server that speaks another protocol, without ever sending a
    /// blank line, fails the request at once.
    #[tokio::test]
    async fn an_answer_that_is_not_http_fails_at_once() {
        let url = scripted(|mut socket| async move {
            read_head_of(&mut socket).await;
            let _ = socket.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let started = Instant::now();
        let failure = post(&pool(&url), &url, 1024).await.err().unwrap();
        assert!(failure.message.contains("not HTTP"), "{}", failure.message);
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_spoke_on_is_not_used() {
        // After its answer the server sends an unasked 408 and closes (as
        // servers do at their idle timeout): the next request must get
        // its own answer, on a new connection.
        let url = scripted(|mut socket| async move {
            read_head_of(&mut socket).await;
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = socket
                .write_all(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let pool = pool(&url);
        assert_eq!(text(&post(&pool, &url, 1024).await.unwrap()), "first");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = post(&pool, &url, 1024).await.unwrap();
        assert_eq!((second.status.as_u16(), text(&second)), (200, "first".to_string()));
    }

    #[tokio::test]
    async fn a_body_of_one_byte_chunks_is_read_whole() {
        let url = scripted(|mut socket| async move {
            read_head_of(&mut socket).await;
            let mut answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for i in 0..100_000u32 {
                answer.extend_from_slice(format!("1\r\n{}\r\n", i % 10).as_bytes());
            }
            answer.extend_from_slice(b"0\r\n\r\n");
            let _ = socket.write_all(&answer).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let answer = post(&pool(&url), &url, 1 << 20).await.unwrap();
        let body = text(&answer);
        assert_eq!(body.len(), 100_000);
        assert!(body.starts_with("0123456789") && body.ends_with("789"));
    }

    #[tokio::test]
    async fn endless_interim_answers_and_empty_chunk_sizes_fail() {
        let interim = scripted(|mut socket| async move {
            read_head_of(&mut socket).await;
            while socket.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_ok() {}
        })
        .await;
        let failed = post(&pool(&interim), &interim, 1024).await.err().unwrap();
        assert!(failed.message.contains("interim answers"), "{}", failed.message);
        let empty = scripted(|mut socket| async move {
            read_head_of(&mut socket).await;
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let answer = post(&pool(&empty), &empty, 1024).await.unwrap();
        assert!(answer.body.unwrap_err().message.contains("invalid chunk"));
    }

    #[test]
    fn a_head_is_consumed_and_the_rest_kept() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"[..]);
        let first = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(first.status, StatusCode::CONTINUE);
        assert_eq!(&buf[..], b"HTTP/1.1 201 Created\r\n");
        assert!(parse_head(&mut buf).unwrap().is_none());
    }
}
