//! The baseline: the classic polling relay, as a team would write it, in
//! its own process (this program, run as `bench relay <mode> <db port>
//! <http port>`). Workers claim rows with FOR UPDATE SKIP LOCKED, POST
//! them over a kept-alive connection, mark them done, commit. The PgQ
//! consumer and the CDC relay run the same way.

use outbox_testkit::cluster::bindir;
use outbox_testkit::http::read_message;
use outbox_testkit::{connect_port, die_with_parent, Cluster, Receiver};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The relay, started as a process of its own (which ends with the
/// benchmark, however that ends).
pub fn command(cluster: &Cluster, rx: &Receiver, mode: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    die_with_parent(&mut c);
    c.args(["relay", mode, &cluster.port.to_string(), &rx.port.to_string()]);
    c
}

const WORKERS: usize = 16;
const BATCH: i64 = 100;
const POLL: Duration = Duration::from_millis(10);

pub fn main(args: &[String]) {
    let mode = args[0].clone();
    let (db_port, http_port): (u16, u16) = (args[1].parse().unwrap(), args[2].parse().unwrap());
    if mode == "pgq" || mode == "pgq-follow" {
        let stop_after = args.get(3).and_then(|n| n.parse().ok());
        pgq_consumer(db_port, http_port, stop_after);
        return;
    }
    if mode == "cdc" || mode == "cdc-follow" {
        let stop_after = args.get(3).and_then(|n| n.parse().ok());
        cdc_relay(db_port, http_port, stop_after);
        return;
    }
    let handles: Vec<_> = (0..WORKERS)
        .map(|w| {
            let mode = mode.clone();
            std::thread::spawn(move || worker(&mode, w as i32, db_port, http_port))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// `drain`: claim any rows (SKIP LOCKED), until none are left;
/// `drain-ordered`: each worker owns the keys hashing to it, so one
/// key's events go out one after another; `follow`: like `drain`, for
/// ever, polling every 10 ms when idle.
fn worker(mode: &str, me: i32, db_port: u16, http_port: u16) {
    let mut db = connect_port(db_port);
    let mut http = Http::connect(http_port);
    loop {
        let mut tx = db.transaction().unwrap();
        let rows = if mode == "drain-ordered" {
            tx.query(
                "SELECT id, key, payload::text FROM relay_outbox
                 WHERE NOT done AND part = $2 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&BATCH, &me],
            )
            .unwrap()
        } else {
            tx.query(
                "SELECT id, key, payload::text FROM relay_outbox WHERE NOT done ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&BATCH],
            )
            .unwrap()
        };
        if rows.is_empty() {
            tx.commit().unwrap();
            if mode != "follow" {
                let left: bool = db
                    .query_one(
                        "SELECT EXISTS (SELECT FROM relay_outbox WHERE NOT done AND ($1 = 'drain' OR part = $2))",
                        &[&mode, &me],
                    )
                    .unwrap()
                    .get(0);
                if !left {
                    return;
                }
            }
            std::thread::sleep(POLL);
            continue;
        }
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.get(0);
            let key: String = r.get(1);
            let payload: String = r.get(2);
            http.post(&post_body(id, &key, &payload));
            ids.push(id);
        }
        tx.execute("UPDATE relay_outbox SET done = true WHERE id = ANY ($1)", &[&ids]).unwrap();
        tx.commit().unwrap();
    }
}

/// A PgQ consumer (queue `bench`, consumer `relay`), as PgQ's own
/// consumers work: take the next batch (pgqd made the ticks), POST its
/// events in order over one connection, finish the batch, commit. One
/// consumer: PgQ's order is the batch's, one event after another.
/// `stop_after`: end once that many events went out (a drain); none:
/// follow for ever, polling every 10 ms when there is no batch.
fn pgq_consumer(db_port: u16, http_port: u16, stop_after: Option<i64>) {
    let mut db = connect_port(db_port);
    let mut http = Http::connect(http_port);
    let mut sent = 0i64;
    while stop_after.is_none_or(|n| sent < n) {
        let mut tx = db.transaction().unwrap();
        let batch: Option<i64> = tx.query_one("SELECT pgq.next_batch('bench', 'relay')", &[]).unwrap().get(0);
        let Some(batch) = batch else {
            tx.commit().unwrap();
            std::thread::sleep(POLL);
            continue;
        };
        let rows = tx
            .query("SELECT ev_id, coalesce(ev_extra1, ''), ev_data FROM pgq.get_batch_events($1)", &[&batch])
            .unwrap();
        for r in &rows {
            let (id, key, data): (i64, String, String) = (r.get(0), r.get(1), r.get(2));
            http.post(&post_body(id, &key, &data));
        }
        sent += rows.len() as i64;
        tx.query_one("SELECT pgq.finish_batch($1)", &[&batch]).unwrap();
        tx.commit().unwrap();
    }
}

/// The CDC relay ("outbox table + CDC", as Debezium's outbox pattern):
/// pg_recvlogical streams slot `cdc` (wal2json, format 2: one JSON
/// object a row), and each insert is POSTed as it comes, one after
/// another over one connection: commit order, so per-key order.
/// Captured are cdc_outbox (an event is a row: its key and payload) and
/// orders, for the write path, where the business row itself is the
/// event (as when CDC streams a table; capturing orders is what puts
/// decoding on that path). `relay_id` is the row's id.
/// `stop_after`: end once that many distinct ids went out (a drain); a
/// duplicate is posted but is no progress. None: follow for ever.
fn cdc_relay(db_port: u16, http_port: u16, stop_after: Option<usize>) {
    let mut recv = Command::new(bindir().join("pg_recvlogical"));
    die_with_parent(&mut recv);
    let mut recv = recv
        .args(["-h", "127.0.0.1", "-p", &db_port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-S", "cdc", "--start", "--no-loop", "-f", "-"])
        .args(["-o", "format-version=2", "-o", "include-transaction=false"])
        .args(["-o", "add-tables=public.cdc_outbox,public.orders"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("pg_recvlogical runs");
    let mut http = Http::connect(http_port);
    let mut posted = HashSet::new();
    for line in BufReader::new(recv.stdout.take().unwrap()).lines() {
        let Some((id, body)) = cdc_event(&line.expect("pg_recvlogical's output")) else { continue };
        http.post(&body);
        posted.insert(id);
        if stop_after.is_some_and(|n| posted.len() >= n) {
            let _ = recv.kill();
            let _ = recv.wait();
            return;
        }
    }
    panic!("pg_recvlogical ended ({:?}) after {} events", recv.wait(), posted.len());
}

/// An insert decoded by wal2json (format 2) as the relay's POST body,
/// with the row's id; None for anything else (updates, truncates).
/// wal2json gives a jsonb value as a string holding its text: that text
/// is embedded as JSON, as the polling relay embeds `payload::text`.
fn cdc_event(line: &str) -> Option<(i64, String)> {
    let change: Value = serde_json::from_str(line).expect("wal2json emits JSON");
    if change["action"] != "I" {
        return None;
    }
    let mut row: serde_json::Map<String, Value> = change["columns"]
        .as_array()?
        .iter()
        .map(|c| (c["name"].as_str().unwrap_or_default().to_string(), c["value"].clone()))
        .collect();
    let id = row["id"].as_i64().expect("a captured row has a bigint id");
    let key = match row.remove("key") {
        Some(Value::String(key)) => key,
        _ => id.to_string(),
    };
    let data = match row.remove("payload") {
        Some(Value::String(text)) => text,
        Some(json) => json.to_string(),
        None => Value::Object(row).to_string(),
    };
    Some((id, post_body(id, &key, &data)))
}

/// What every relay here POSTs: the row's id (`relay_id`, which the
/// latency receiver matches), its key, and its payload's JSON text.
fn post_body(id: i64, key: &str, data: &str) -> String {
    format!("{{\"relay_id\":{id},\"key\":{},\"data\":{data}}}", serde_json::to_string(key).unwrap())
}

/// pgqd, PgQ's ticker daemon, for the bench cluster: a tick every 50 ms
/// when events wait (the queue is set to tick on any event), so a batch
/// is ready soon after a commit.
pub fn start_pgqd(cluster: &Cluster, dir: &std::path::Path) -> Option<std::process::Child> {
    let ini = dir.join("pgqd.ini");
    std::fs::write(
        &ini,
        format!(
            "[pgqd]\nlogfile = {}\npidfile = {}\nbase_connstr = host=127.0.0.1 port={} user=postgres\n\
             initial_database = postgres\ndatabase_list = postgres\nticker_period = 0.05\n",
            dir.join("pgqd.log").display(),
            dir.join("pgqd.pid").display(),
            cluster.port
        ),
    )
    .ok()?;
    let mut c = Command::new("pgqd");
    die_with_parent(&mut c);
    c.arg(&ini).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().ok()
}

/// A minimal keep-alive HTTP/1.1 client (as lean as a relay gets).
struct Http {
    port: u16,
    stream: BufReader<TcpStream>,
}

impl Http {
    fn connect(port: u16) -> Http {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        Http { port, stream: BufReader::new(s) }
    }

    fn post(&mut self, body: &str) {
        let req = format!(
            "POST / HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if self.stream.get_mut().write_all(req.as_bytes()).is_err() || !self.read_response() {
            *self = Http::connect(self.port);
            self.post(body);
        }
    }

    fn read_response(&mut self) -> bool {
        read_message(&mut self.stream).is_some_and(|m| m.is_success())
    }
}
