//! A real HTTP/1.1 server on 127.0.0.1 (plain, or HTTPS with a self-signed
//! certificate) that records every request and answers as the test tells
//! it to: a status, a delay, a hang, a reset. Dropping it stops it: the
//! listener closes, open connections are cut, hanging answers end.

use crate::http;
use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Lower-cased names.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// How to answer one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Wait, then answer.
    After(Duration, Box<Reply>),
    /// Never answer (until the client gives up, or the receiver stops).
    Hang,
    /// Close the connection without answering.
    Close,
    /// Start a 200 answer, then close the connection halfway through it.
    Partial,
    /// An answer with a body of this many bytes (streamed).
    Big(u16, usize),
    /// Send this status and the start of a body, then nothing more (the
    /// connection stays open until the client gives up).
    Stalled(u16),
    /// Answer, then close the connection a moment later without saying
    /// so (as a server's idle timeout does to a kept-alive connection).
    ThenClose(Box<Reply>),
}

impl Reply {
    /// Whether this reply acknowledges (2xx, sent in full).
    pub fn acks(&self) -> bool {
        match self {
            Reply::Status(c) | Reply::Full { status: c, .. } | Reply::Big(c, _) => (200..300).contains(c),
            Reply::After(_, then) | Reply::ThenClose(then) => then.acks(),
            Reply::Hang | Reply::Close | Reply::Partial | Reply::Stalled(_) => false,
        }
    }
}

type Responder = dyn Fn(&Request, usize) -> Reply + Send + Sync;

fn ok_to_all() -> Arc<Responder> {
    Arc::new(|_: &Request, _: usize| Reply::Status(200))
}

struct Shared {
    requests: Mutex<Vec<Request>>,
    arrived: Condvar,
    /// Read by every request of every connection: a lock readers do not
    /// wait on each other for (a mutex here put a benchmark's 64 connection
    /// threads to sleep on each other, which no real receiver does).
    responder: RwLock<Arc<Responder>>,
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Requests received so far.
    count: AtomicUsize,
    /// Keep every request (tests); benchmarks only count.
    keep: AtomicBool,
    /// Connections being served, to cut them when the receiver stops.
    open: Mutex<Open>,
    /// A connection ended.
    closed: Condvar,
    /// Set once, when the receiver stops; `stop` wakes whoever waits on it.
    stopping: Mutex<bool>,
    stop: Condvar,
}

#[derive(Default)]
struct Open {
    next: u64,
    streams: HashMap<u64, TcpStream>,
}

impl Shared {
    fn stopping(&self) -> bool {
        *self.stopping.lock().unwrap()
    }

    /// Sleep for `d`, or less if the receiver stops: whether it still runs.
    fn pause(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut stopping = self.stopping.lock().unwrap();
        while !*stopping {
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            stopping = self.stop.wait_timeout(stopping, deadline - now).unwrap().0;
        }
        false
    }

    /// Note an accepted connection; `None` when it cannot be watched (or
    /// the receiver stops), and then it is not served.
    fn track(&self, stream: &TcpStream) -> Option<u64> {
        let clone = stream.try_clone().ok()?;
        let mut open = self.open.lock().unwrap();
        if self.stopping() {
            return None;
        }
        open.next += 1;
        let id = open.next;
        open.streams.insert(id, clone);
        Some(id)
    }

    fn untrack(&self, id: u64) {
        self.open.lock().unwrap().streams.remove(&id);
        self.closed.notify_all();
    }
}

pub struct Receiver {
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Start a receiver that answers 200 to everything.
    pub fn start() -> Receiver {
        Receiver::start_with(None)
    }

    /// As [`Receiver::start`], over HTTPS with a fresh self-signed
    /// certificate for 127.0.0.1; also returns that certificate (PEM), the
    /// CA a client must trust.
    pub fn start_https() -> (Receiver, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let pem = cert.cert.pem();
        let chain = vec![cert.cert.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap(),
        );
        (Receiver::start_with(Some(config)), pem)
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            responder: RwLock::new(ok_to_all()),
            connections: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            keep: AtomicBool::new(true),
            open: Mutex::new(Open::default()),
            closed: Condvar::new(),
            stopping: Mutex::new(false),
            stop: Condvar::new(),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stopping() {
                    return;
                }
                let Ok(stream) = stream else { continue };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let Some(id) = s.track(&stream) else { continue };
                let (s, tls) = (s.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_nodelay(true); // or every answer waits out Nagle + delayed ACK
                    match tls {
                        None => serve(stream, &s, id),
                        Some(config) => {
                            if let Ok(conn) = rustls::ServerConnection::new(config) {
                                serve(rustls::StreamOwned::new(conn, stream), &s, id);
                            }
                        }
                    }
                    s.untrack(id);
                });
            }
        });
        Receiver { port, shared, accept: Some(accept) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Decide every following answer; the closure also gets the number of
    /// requests received before this one.
    pub fn respond(&self, f: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) {
        *self.shared.responder.write().unwrap() = Arc::new(f);
    }

    /// From now on answer 500 to events whose key starts with `prefix`
    /// (a receiver that rejects some customers) and 200 to the rest.
    pub fn fail_keys_starting_with(&self, prefix: &'static str) {
        self.respond(move |r, _| {
            if r.json()["key"].as_str().is_some_and(|k| k.starts_with(prefix)) {
                Reply::Status(500)
            } else {
                Reply::Status(200)
            }
        });
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Wait until `pred` holds for the requests received, or panic after
    /// `timeout` with what arrived.
    pub fn wait_until(&self, timeout: Duration, what: &str, pred: impl Fn(&[Request]) -> bool) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        let mut requests = self.shared.requests.lock().unwrap();
        loop {
            if pred(&requests) {
                return requests.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}; {} requests arrived", requests.len());
            }
            requests = self.shared.arrived.wait_timeout(requests, deadline - now).unwrap().0;
        }
    }

    /// Stop keeping requests (the responder still sees each one): for
    /// long benchmark runs.
    pub fn forget_requests(&self) {
        self.shared.keep.store(false, Ordering::SeqCst);
    }

    /// Requests received so far, kept or not.
    pub fn count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The most requests that were being answered at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Wait for at least `n` requests.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.wait_until(timeout, &format!("{n} requests"), |r| r.len() >= n)
    }
}

/// How long dropping a receiver waits for its connections' threads (a
/// responder may be in the middle of something).
const STOP_WAIT: Duration = Duration::from_secs(10);

impl Drop for Receiver {
    fn drop(&mut self) {
        *self.shared.stopping.lock().unwrap() = true;
        self.shared.stop.notify_all();
        // The listener thread sees `stopping` at its next connection: make
        // one, then it returns and the listener closes.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // Let go of what the responder holds (a broker's client, say).
        *self.shared.responder.write().unwrap() = ok_to_all();
        // Cut every connection: reads and writes fail, the threads return.
        let mut open = self.shared.open.lock().unwrap();
        for stream in open.streams.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + STOP_WAIT;
        while !open.streams.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                eprintln!("receiver on port {}: {} connections still busy", self.port, open.streams.len());
                return;
            }
            open = self.shared.closed.wait_timeout(open, deadline - now).unwrap().0;
        }
    }
}

/// Answer requests on one connection until it closes, the client asks to
/// close, an answer must not be followed by another, or the receiver stops.
fn serve(stream: impl Read + Write, shared: &Shared, id: u64) {
    let mut conn = BufReader::new(stream);
    loop {
        let Some(request) = read_request(&mut conn) else { return };
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let keep_alive = request.header("connection").is_none_or(|c| !c.eq_ignore_ascii_case("close"));
        let reply = if shared.keep.load(Ordering::SeqCst) {
            // Numbered and kept under one lock, so that `seen` is the
            // request's place in `requests()`.
            let mut requests = shared.requests.lock().unwrap();
            let seen = shared.count.fetch_add(1, Ordering::SeqCst);
            let responder = shared.responder.read().unwrap().clone();
            let reply = responder(&request, seen);
            requests.push(request);
            shared.arrived.notify_all();
            reply
        } else {
            let seen = shared.count.fetch_add(1, Ordering::SeqCst);
            let responder = shared.responder.read().unwrap().clone();
            responder(&request, seen)
        };
        let answered = answer(conn.get_mut(), reply, shared);
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !answered || !keep_alive || shared.stopping() {
            if let Some(tcp) = shared.open.lock().unwrap().streams.get(&id) {
                let _ = tcp.shutdown(Shutdown::Both);
            }
            return;
        }
    }
}

fn read_request(conn: &mut BufReader<impl Read>) -> Option<Request> {
    let m = http::read_message(conn)?;
    let mut start = m.start.split_whitespace();
    let method = start.next()?.to_string();
    let path = start.next()?.to_string();
    Some(Request { method, path, headers: m.headers, body: m.body, at: Instant::now() })
}

/// Write the reply; false when the connection must be dropped.
fn answer(writer: &mut impl Write, reply: Reply, shared: &Shared) -> bool {
    match reply {
        Reply::Status(code) => answer(writer, Reply::Full { status: code, headers: vec![], body: vec![] }, shared),
        Reply::After(delay, then) => shared.pause(delay) && answer(writer, *then, shared),
        Reply::Hang => {
            shared.pause(Duration::from_secs(3600));
            false
        }
        Reply::Close => false,
        Reply::ThenClose(then) => {
            answer(writer, *then, shared);
            // Long enough for a client keeping the connection to send its
            // next request on it, which is then never read.
            shared.pause(Duration::from_millis(5));
            false
        }
        Reply::Stalled(status) => {
            let _ = writer.write_all(format!("HTTP/1.1 {status} X\r\ncontent-length: 1000\r\n\r\n{{").as_bytes());
            let _ = writer.flush();
            shared.pause(Duration::from_secs(3600));
            false
        }
        Reply::Partial => {
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"partial");
            let _ = writer.flush();
            false
        }
        Reply::Big(status, size) => {
            let head = format!("HTTP/1.1 {status} X\r\ncontent-length: {size}\r\n\r\n");
            if writer.write_all(head.as_bytes()).is_err() {
                return false;
            }
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len());
                if writer.write_all(&chunk[..n]).is_err() {
                    return false; // the client stopped reading: fine
                }
                left -= n;
            }
            writer.flush().is_ok()
        }
        Reply::Full { status, headers, body } => {
            let mut head = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
            for (n, v) in headers {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            head.push_str("\r\n");
            writer.write_all(head.as_bytes()).is_ok() && writer.write_all(&body).is_ok() && writer.flush().is_ok()
        }
    }
}
