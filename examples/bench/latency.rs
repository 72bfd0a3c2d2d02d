//! Latency, commit to receiver, at a paced rate: outbox and the polling
//! relay, PgQ, CDC.

use crate::{cdc, relay};
use outbox_testkit::{Cluster, Receiver, Reply};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Emitted at the paced rate before anything is counted: the same for
/// every system measured. Without it a short run's p99 is its start (the
/// outbox endpoint's first connections, the relay's), not its steady state.
const WARM_UP: Duration = Duration::from_secs(1);

/// Before each system's latency is measured: what earlier parts left
/// behind (dirty buffers of a drained backlog, autovacuum of its tables)
/// is done, so that it does not weigh on whichever system happens to be
/// measured first. Waits at most 30 s for autovacuum.
pub fn settle(db: &mut postgres::Client) {
    db.batch_execute("CHECKPOINT").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let busy: i64 = db
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'", &[])
            .unwrap()
            .get(0);
        if busy == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
}

/// Emit at `rate` events/s for `secs`, after WARM_UP, from several
/// connections: each runs `sql` ($1 the event's number, prepared once per
/// connection, as the capacity's writers do) as a transaction of its own,
/// and `id` reads the event's id from the row it returns (after commit).
/// Only events of the `secs` after the warm-up are noted.
pub fn paced<F>(
    cluster: &Cluster,
    rate: f64,
    secs: u64,
    sql: &'static str,
    id: F,
) -> Arc<Mutex<HashMap<String, Instant>>>
where
    F: Fn(&postgres::Row) -> String + Send + Sync + 'static,
{
    let committed = Arc::new(Mutex::new(HashMap::new()));
    // Enough writers that the rate holds when the machine is saturated: a
    // writer waits for its commit, which at 80 % of the maximum takes a
    // millisecond or two, and a writer that falls behind never catches up.
    // With a writer per 1,500 events/s, "8,400 events/s" wrote 4,500-5,000
    // through the worker and 2,800-3,000 through the relay (whose 16
    // processes took the writers' CPU): neither was measured at the rate.
    let threads = ((rate / 500.0).ceil() as usize).clamp(1, 16);
    let id = Arc::new(id);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (mut c, id_of, committed) = (cluster.connect(), id.clone(), committed.clone());
            let statement = c.prepare(sql).unwrap();
            let interval = Duration::from_secs_f64(threads as f64 / rate);
            std::thread::spawn(move || {
                let start = Instant::now() + Duration::from_secs_f64(t as f64 / rate);
                let mut i: i64 = 0;
                while Instant::now().saturating_duration_since(start) < WARM_UP + Duration::from_secs(secs) {
                    let due = start + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let n = i * threads as i64 + t as i64;
                    let id = id_of(&c.query_one(&statement, &[&n]).unwrap());
                    let at = Instant::now();
                    if due >= start + WARM_UP {
                        committed.lock().unwrap().insert(id, at);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    committed
}

/// A receiver noting when each id (from the JSON body's `id`, or the
/// relay's `i`) arrived.
pub fn timing_receiver(field: &'static str) -> (Receiver, Arc<Mutex<HashMap<String, Instant>>>) {
    let arrived = Arc::new(Mutex::new(HashMap::new()));
    let a = arrived.clone();
    let rx = Receiver::start();
    rx.forget_requests();
    rx.respond(move |r, _| {
        if let Ok(v) = serde_json::from_slice::<Value>(&r.body) {
            let id = match &v[field] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            a.lock().unwrap().entry(id).or_insert(r.at);
        }
        Reply::Status(200)
    });
    (rx, arrived)
}

/// Latencies of one run, and the rate the writers reached while they were
/// counted (events over the span of their commits).
pub struct Latency {
    pub ms: Vec<f64>,
    pub rate: f64,
}

pub fn latencies(committed: &Mutex<HashMap<String, Instant>>, arrived: &Mutex<HashMap<String, Instant>>) -> Latency {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (c, a) = (committed.lock().unwrap(), arrived.lock().unwrap());
        if c.keys().all(|k| a.contains_key(k)) || Instant::now() > deadline {
            let ms = c
                .iter()
                .filter_map(|(k, t)| a.get(k).map(|at| at.saturating_duration_since(*t).as_secs_f64() * 1000.0))
                .collect();
            let span = match (c.values().min(), c.values().max()) {
                (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64(),
                _ => 0.0,
            };
            let rate = if span > 0.0 { c.len() as f64 / span } else { 0.0 };
            return Latency { ms, rate };
        }
        drop((c, a));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Commit to receiver through the worker at `rate`, and the worker's CPU
/// per event emitted meanwhile (µs, user + system, warm-up included): at
/// middle rates a step carries few events, and its fixed cost shows here.
pub fn latency_outbox(cluster: &Cluster, db: &mut postgres::Client, rate: f64, secs: u64) -> (Latency, f64) {
    let (rx, arrived) = timing_receiver("id");
    db.execute(
        "SELECT outbox.create_endpoint('latency', $1, topics => '{latency}', options => '{\"max_in_flight\": 64}')",
        &[&rx.url("/")],
    )
    .unwrap();
    let pid = outbox_testkit::worker_pid(db);
    let cpu = outbox_testkit::cpu_seconds(pid);
    let emitted = Arc::new(AtomicUsize::new(0));
    let counted = emitted.clone();
    let emit =
        "SELECT outbox_emit('latency', jsonb_build_object('i', $1::bigint), 'key-' || ($1::bigint % 1000))::text";
    let committed = paced(cluster, rate, secs, emit, move |row| {
        counted.fetch_add(1, Ordering::Relaxed);
        row.get(0)
    });
    let lat = latencies(&committed, &arrived);
    let cpu_us = (outbox_testkit::cpu_seconds(pid) - cpu) * 1e6 / emitted.load(Ordering::Relaxed).max(1) as f64;
    db.execute("SELECT outbox.drop_endpoint('latency')", &[]).unwrap();
    (lat, cpu_us)
}

pub fn latency_relay(cluster: &Cluster, db: &mut postgres::Client, rate: f64, secs: u64) -> Latency {
    db.batch_execute("TRUNCATE relay_outbox").unwrap();
    through_relay(
        cluster,
        "follow",
        "INSERT INTO relay_outbox (key, payload) VALUES ('key-' || ($1::bigint % 1000), jsonb_build_object('i', $1::bigint)) RETURNING id",
        rate,
        secs,
    )
}

/// Commit to receiver through PgQ: pgq.insert_event in the transaction,
/// pgqd ticking, one consumer posting (relay.rs, `pgq-follow`).
pub fn latency_pgq(cluster: &Cluster, rate: f64, secs: u64) -> Latency {
    through_relay(
        cluster,
        "pgq-follow",
        "SELECT pgq.insert_event('bench', 'ev', jsonb_build_object('i', $1::bigint)::text,
                                 'key-' || ($1::bigint % 1000), NULL, NULL, NULL)",
        rate,
        secs,
    )
}

/// Commit to receiver through logical decoding, on the CDC cluster: an
/// INSERT into cdc_outbox, wal2json decoding it from a fresh slot,
/// pg_recvlogical streaming it, one relay posting (relay.rs,
/// `cdc-follow`).
pub fn latency_cdc(cdc: &Cluster, rate: f64, secs: u64) -> Latency {
    let mut db = cdc.connect();
    db.batch_execute("TRUNCATE cdc_outbox").unwrap();
    cdc::fresh_slot(&mut db);
    through_relay(
        cdc,
        "cdc-follow",
        "INSERT INTO cdc_outbox (key, payload) VALUES ('key-' || ($1::bigint % 1000), jsonb_build_object('i', $1::bigint)) RETURNING id",
        rate,
        secs,
    )
}

/// Latencies of events written by `write` ($1 the event's number; it
/// returns the id the relay posts as `relay_id`) and posted by the relay
/// process in `mode`. Every event must arrive: a relay that loses one
/// fails the run rather than leaving it out of the figures.
fn through_relay(cluster: &Cluster, mode: &str, write: &'static str, rate: f64, secs: u64) -> Latency {
    let (rx, arrived) = timing_receiver("relay_id");
    let mut relay = relay::command(cluster, &rx, mode).spawn().expect("the relay runs");
    let committed = paced(cluster, rate, secs, write, |row| row.get::<_, i64>(0).to_string());
    let lat = latencies(&committed, &arrived);
    let _ = relay.kill();
    let _ = relay.wait();
    let sent = committed.lock().unwrap().len();
    assert_eq!(lat.ms.len(), sent, "{mode}: events received, of those committed");
    lat
}
