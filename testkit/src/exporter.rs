//! The real Prometheus PostgreSQL exporter (Debian's
//! prometheus-postgres-exporter) on a free loopback port, and a reader of
//! what it serves on /metrics (the Prometheus text format).

use crate::cluster::{free_port, tests_dir};
use crate::{die_with_parent, WAIT};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `make setup` puts the exporter (Debian package
/// prometheus-postgres-exporter), or $OUTBOX_POSTGRES_EXPORTER.
pub fn exporter_binary() -> PathBuf {
    let p = std::env::var_os("OUTBOX_POSTGRES_EXPORTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus-postgres-exporter"));
    assert!(
        p.exists(),
        "{} is missing: `make setup` installs it (Debian package prometheus-postgres-exporter; make test runs setup)",
        p.display()
    );
    p
}

/// The exporter's process. Dropping the Exporter kills it; should the test
/// process die first, the kernel kills it ([`die_with_parent`]).
pub struct Exporter {
    process: Child,
    pub port: u16,
    log: PathBuf,
}

impl Exporter {
    /// Start the exporter on 127.0.0.1 with `DATA_SOURCE_NAME` = `dsn` and
    /// `args` (besides the listen address), and wait until it listens.
    /// Spawn it from the test's own thread (see [`die_with_parent`]).
    pub fn start(dsn: &str, args: &[&str]) -> Exporter {
        let port = free_port();
        std::fs::create_dir_all(tests_dir()).expect("create the tests dir");
        let log = tests_dir().join(format!("postgres-exporter-{port}.log"));
        let out = std::fs::File::create(&log).expect("create the exporter's log");
        let err = out.try_clone().expect("clone the log's handle");
        let mut command = Command::new(exporter_binary());
        let process = die_with_parent(&mut command)
            // Only what we give it (no PG_EXPORTER_* or DATA_SOURCE_* of
            // ours), and the run's mark. Run in the tests' directory:
            // testkit/leftovers.sh then sees it, should it outlive the test.
            .env_clear()
            .envs(std::env::var_os("OUTBOX_TESTS_RUN").map(|run| ("OUTBOX_TESTS_RUN", run)))
            .env("DATA_SOURCE_NAME", dsn)
            .current_dir(tests_dir())
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start prometheus-postgres-exporter");
        let mut exporter = Exporter { process, port, log };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = exporter.process.try_wait() {
                panic!("prometheus-postgres-exporter exited ({status}):\n{}", exporter.log());
            }
            assert!(Instant::now() < deadline, "the exporter did not listen on {port}:\n{}", exporter.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        exporter
    }

    /// What the exporter logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /metrics: the body, after checking for a 200.
    pub fn scrape(&self) -> String {
        let (status, body) = http_get(self.port, "/metrics");
        assert_eq!(status, 200, "GET /metrics answered {status}:\n{body}\nexporter log:\n{}", self.log());
        body
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        if std::thread::panicking() {
            eprintln!("exporter log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A plain HTTP/1.0 GET on loopback `port`: (status, body). HTTP/1.0 so
/// that the answer is neither chunked nor kept alive: the body ends with
/// the connection.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the exporter");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: text/plain\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read the answer");
    let answer = String::from_utf8(answer).expect("the answer is UTF-8");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// One sample of the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A scrape, parsed: its samples and the `# TYPE` of each metric family.
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    /// Parse the Prometheus text format (version 0.0.4); panics on what
    /// it cannot read.
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line: {line}"));
                m.types.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                m.samples.push(parse_sample(line));
            }
        }
        m
    }

    /// The samples of metric `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The one sample of `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> =
            self.named(name).filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v))).collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}: expected one sample, found {found:?}");
        found[0].value
    }
}

fn parse_sample(line: &str) -> Sample {
    let bad = || -> ! { panic!("bad sample line: {line}") };
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad());
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches(',');
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = r.split_once("=\"").unwrap_or_else(|| bad());
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bad(),
                    },
                    Some((_, c)) => value.push(c),
                    None => bad(),
                }
            };
            labels.insert(key.to_string(), value);
            r = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next().unwrap_or_else(|| bad());
    let value = match value {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| bad()),
    };
    Sample { name, labels, value }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_text_format() {
        let m = Metrics::parse(
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n,}\"} 3\nb NaN\nc 1.5e+09\n",
        );
        assert_eq!(m.types["a_total"], "counter");
        assert_eq!(m.value("a_total", &[("x", "1")]), 3.0);
        assert_eq!(m.samples[0].label("y"), Some("q\"\\\n,}"));
        assert!(m.value("b", &[]).is_nan());
        assert_eq!(m.value("c", &[]), 1.5e9);
    }
}
