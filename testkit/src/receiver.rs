//! A real HTTP/1.1 server on 127.0.0.1 that records every request and
//! answers as the test tells it to: a status, a delay, a hang, a reset.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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
    /// Never answer (until the client gives up).
    Hang,
    /// Close the connection without answering.
    Close,
    /// Start a 200 answer, then close the connection halfway through it.
    Partial,
    /// An answer with a body of this many bytes (streamed).
    Big(u16, usize),
}

impl Reply {
    /// Whether this reply acknowledges (2xx, sent in full).
    pub fn acks(&self) -> bool {
        match self {
            Reply::Status(c) | Reply::Full { status: c, .. } | Reply::Big(c, _) => (200..300).contains(c),
            Reply::After(_, then) => then.acks(),
            Reply::Hang | Reply::Close | Reply::Partial => false,
        }
    }
}

type Responder = dyn Fn(&Request, usize) -> Reply + Send + Sync;

struct Shared {
    requests: Mutex<Vec<Request>>,
    arrived: Condvar,
    responder: Mutex<Arc<Responder>>,
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Requests received so far.
    count: AtomicUsize,
    /// Keep every request (tests); benchmarks only count.
    keep: std::sync::atomic::AtomicBool,
}

pub struct Receiver {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Receiver {
    /// Start a receiver that answers 200 to everything.
    pub fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            responder: Mutex::new(Arc::new(|_: &Request, _: usize| Reply::Status(200))),
            connections: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            keep: std::sync::atomic::AtomicBool::new(true),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                std::thread::spawn(move || serve(stream, s));
            }
        });
        Receiver { port, shared }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Decide every following answer; the closure also gets the number of
    /// requests received before this one.
    pub fn respond(&self, f: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) {
        *self.shared.responder.lock().unwrap() = Arc::new(f);
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

fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true); // or every answer waits out Nagle + delayed ACK
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let Some(request) = read_request(&mut reader) else { return };
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let keep_alive = request.header("connection").is_none_or(|c| !c.eq_ignore_ascii_case("close"));
        let reply = if shared.keep.load(Ordering::SeqCst) {
            // Numbered and kept under one lock, so that `seen` is the
            // request's place in `requests()`.
            let mut requests = shared.requests.lock().unwrap();
            let seen = shared.count.fetch_add(1, Ordering::SeqCst);
            let responder = shared.responder.lock().unwrap().clone();
            let reply = responder(&request, seen);
            requests.push(request);
            shared.arrived.notify_all();
            reply
        } else {
            let seen = shared.count.fetch_add(1, Ordering::SeqCst);
            let responder = shared.responder.lock().unwrap().clone();
            responder(&request, seen)
        };
        let answered = answer(&mut writer, reply);
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !answered || !keep_alive {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request { method, path, headers, body, at: Instant::now() })
}

/// Write the reply; false when the connection must be dropped.
fn answer(writer: &mut TcpStream, reply: Reply) -> bool {
    match reply {
        Reply::Status(code) => answer(writer, Reply::Full { status: code, headers: vec![], body: vec![] }),
        Reply::After(delay, then) => {
            std::thread::sleep(delay);
            answer(writer, *then)
        }
        Reply::Hang => {
            std::thread::sleep(Duration::from_secs(3600));
            false
        }
        Reply::Close => false,
        Reply::Partial => {
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"partial");
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
            true
        }
        Reply::Full { status, headers, body } => {
            let mut head = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
            for (n, v) in headers {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            head.push_str("\r\n");
            writer.write_all(head.as_bytes()).is_ok() && writer.write_all(&body).is_ok()
        }
    }
}
