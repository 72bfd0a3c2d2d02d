//! The fault suite's load generator and checker.
//!
//! Writers commit events together with a ledger row (same transaction): the
//! ledger is the truth of what committed. Per key, a counter row updated in
//! the same transaction numbers the key's events in commit order. Events of
//! rolled-back transactions and savepoints are remembered in memory; none
//! of them may ever arrive. The checker compares the ledger, the receivers'
//! records and the dead letters.

use crate::cluster::try_connect as connect;
use crate::receiver::Request;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A small, seedable random generator (xorshift*): the randomized scenario
/// must be replayable from its printed seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Create the ledger and key counters (test tables, not the extension's).
pub fn prepare(db: &mut postgres::Client, keys: usize) {
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS ledger (id uuid PRIMARY KEY, key text NOT NULL, n int NOT NULL);
         CREATE TABLE IF NOT EXISTS counters (key text PRIMARY KEY, n int NOT NULL);",
    )
    .unwrap();
    db.execute(
        "INSERT INTO counters SELECT 'key-' || i, 0 FROM generate_series(0, $1::int - 1) AS i ON CONFLICT DO NOTHING",
        &[&(keys as i32)],
    )
    .unwrap();
}

/// How writers behave.
#[derive(Clone)]
pub struct Load {
    pub writers: usize,
    pub keys: usize,
    pub rollback_percent: u64,
    pub savepoint_percent: u64,
    /// Pause between transactions of one writer.
    pub pace: Duration,
    /// Transactions stay open up to this long (a random time) before they
    /// end: they overlap ticks, rotations and endpoint changes.
    pub hold_max: Duration,
    pub seed: u64,
    pub topic: String,
}

/// Running writers; `stop` ends them.
pub struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
    /// Ids of events whose transaction or savepoint was rolled back.
    pub rolled_back: Arc<Mutex<HashSet<String>>>,
    pub attempted: Arc<AtomicU64>,
}

/// Where writers connect: changes on failover.
pub type Port = Arc<std::sync::atomic::AtomicU16>;

impl Writers {
    pub fn start(port: Port, load: Load) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let rolled_back = Arc::new(Mutex::new(HashSet::new()));
        let attempted = Arc::new(AtomicU64::new(0));
        let handles = (0..load.writers)
            .map(|w| {
                let (stop, rolled_back, attempted, port, load) =
                    (stop.clone(), rolled_back.clone(), attempted.clone(), port.clone(), load.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(load.seed.wrapping_add(w as u64 * 7919));
                    let mut db: Option<postgres::Client> = None;
                    while !stop.load(Ordering::SeqCst) {
                        let Some(c) = db.as_mut() else {
                            db = connect(port.load(Ordering::SeqCst));
                            if db.is_none() {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            continue;
                        };
                        attempted.fetch_add(1, Ordering::SeqCst);
                        match one_transaction(c, &mut rng, &load, &rolled_back) {
                            Ok(()) => {}
                            // The server went away (a fault of the test):
                            // reconnect; the ledger says what committed.
                            Err(_) => db = None,
                        }
                        std::thread::sleep(load.pace);
                    }
                })
            })
            .collect();
        Writers { stop, handles, rolled_back, attempted }
    }

    pub fn stop(self) -> HashSet<String> {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = h.join();
        }
        let set = self.rolled_back.lock().unwrap().clone();
        set
    }
}

fn one_transaction(
    c: &mut postgres::Client,
    rng: &mut Rng,
    load: &Load,
    rolled_back: &Mutex<HashSet<String>>,
) -> Result<(), postgres::Error> {
    let key = format!("key-{}", rng.below(load.keys as u64));
    let mut tx = c.transaction()?;
    let n: i32 = tx.query_one("UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n", &[&key])?.get(0);
    let emit = "SELECT outbox_emit($1, jsonb_build_object('n', $2::int, 'key', $3::text), $3)::text";
    let id: String = tx.query_one(emit, &[&load.topic, &n, &key])?.get(0);
    tx.execute("INSERT INTO ledger VALUES ($1::text::uuid, $2, $3)", &[&id, &key, &n])?;
    if rng.chance(load.savepoint_percent) {
        // An event in a savepoint that is rolled back: must never arrive.
        let mut sp = tx.transaction()?;
        let gone: String = sp.query_one(emit, &[&load.topic, &-1i32, &key])?.get(0);
        sp.rollback()?;
        rolled_back.lock().unwrap().insert(gone);
    }
    if !load.hold_max.is_zero() {
        std::thread::sleep(Duration::from_millis(rng.below(load.hold_max.as_millis() as u64 + 1)));
    }
    if rng.chance(load.rollback_percent) {
        tx.rollback()?;
        rolled_back.lock().unwrap().insert(id);
    } else {
        tx.commit()?;
    }
    Ok(())
}

/// One delivery as a receiver saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub key: String,
    pub n: i64,
    pub at: Instant,
    /// Answered 2xx.
    pub acked: bool,
    pub acked_at: Instant,
}

/// Receivers record deliveries here (the responder decides `acked`).
#[derive(Default, Clone)]
pub struct Log(pub Arc<Mutex<Vec<Seen>>>);

impl Log {
    pub fn record(&self, r: &Request, acked: bool) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) else { return };
        let (Some(id), Some(key), Some(n)) = (v["id"].as_str(), v["key"].as_str(), v["data"]["n"].as_i64()) else {
            return;
        };
        self.0.lock().unwrap().push(Seen {
            id: id.into(),
            key: key.into(),
            n,
            at: r.at,
            acked,
            acked_at: Instant::now(),
        });
    }

    pub fn acked_ids(&self) -> HashSet<String> {
        self.0.lock().unwrap().iter().filter(|s| s.acked).map(|s| s.id.clone()).collect()
    }
}

#[derive(Debug, Serialize, Clone)]
pub struct Summary {
    pub scenario: String,
    pub faults_injected: u64,
    pub committed: u64,
    pub delivered_unique: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub order_violations: u64,
    pub rolled_back_delivered: u64,
    pub passed: bool,
}

fn dead_letters(db: &mut postgres::Client, endpoint: &str) -> Option<HashSet<String>> {
    db.query("SELECT event_id::text FROM outbox.dead_letters WHERE endpoint = $1", &[&endpoint])
        .ok()
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
}

/// Wait until every committed event was acknowledged by `endpoint`'s
/// receiver (its `log`) or is one of its dead letters.
pub fn wait_all_delivered(db_port: u16, endpoint: &str, log: &Log, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(mut db) = connect(db_port) {
            let committed: Option<Vec<String>> =
                db.query("SELECT id::text FROM ledger", &[]).ok().map(|rows| rows.iter().map(|r| r.get(0)).collect());
            let dead = dead_letters(&mut db, endpoint).unwrap_or_default();
            if let Some(committed) = committed {
                let acked = log.acked_ids();
                if committed.iter().all(|id| acked.contains(id) || dead.contains(id)) {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The committed events whose transaction committed inside `(from, to)`
/// (microseconds since the epoch, by commit timestamp; needs
/// track_commit_timestamp), for endpoints that existed only for a while.
pub fn committed_between(db: &mut postgres::Client, from: i64, to: i64) -> HashSet<String> {
    db.query(
        "SELECT id::text FROM ledger
         WHERE (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint > $1
           AND (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint < $2",
        &[&from, &to],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Compare what committed with what arrived at each endpoint: `logs` pairs
/// an endpoint name with its receiver's log.
pub fn check(
    scenario: &str,
    faults: u64,
    cluster_port: u16,
    logs: &[(&str, &Log)],
    rolled_back: &HashSet<String>,
) -> Summary {
    let mut db = connect(cluster_port).expect("connect for the check");
    let ledger: HashMap<String, (String, i64)> = db
        .query("SELECT id::text, key, n FROM ledger", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get::<_, i32>(2) as i64)))
        .collect();
    let mut s = Summary {
        scenario: scenario.into(),
        faults_injected: faults,
        committed: ledger.len() as u64,
        delivered_unique: 0,
        duplicates: 0,
        lost: 0,
        order_violations: 0,
        rolled_back_delivered: 0,
        passed: false,
    };
    for (endpoint, log) in logs {
        let dead = dead_letters(&mut db, endpoint).expect("dead letters");
        let seen = log.0.lock().unwrap().clone();
        let acked: Vec<&Seen> = seen.iter().filter(|x| x.acked).collect();
        let unique: HashSet<&str> = acked.iter().map(|x| x.id.as_str()).collect();
        s.delivered_unique += unique.len() as u64;
        s.duplicates += (acked.len() - unique.len()) as u64;
        s.lost += ledger.keys().filter(|id| !unique.contains(id.as_str()) && !dead.contains(*id)).count() as u64;
        // Anything that arrived and never committed: rolled back, or a
        // phantom.
        s.rolled_back_delivered += seen
            .iter()
            .map(|x| x.id.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|id| rolled_back.contains(*id) || !ledger.contains_key(*id))
            .count() as u64;
        // Per key: first arrivals in commit order, and the next event of a
        // key sent only after the previous one was acknowledged.
        let mut first_arrival: HashMap<&str, Instant> = HashMap::new();
        let mut first_ack: HashMap<&str, Instant> = HashMap::new();
        let mut per_key: BTreeMap<&str, Vec<(Instant, i64, &str)>> = BTreeMap::new();
        // Receiver threads log in the order they get to it, not in time
        // order: take the earliest arrival and acknowledgement of each id.
        for x in &seen {
            let a = first_arrival.entry(x.id.as_str()).or_insert(x.at);
            *a = (*a).min(x.at);
            if x.acked {
                let k = first_ack.entry(x.id.as_str()).or_insert(x.acked_at);
                *k = (*k).min(x.acked_at);
            }
        }
        for (id, at) in &first_arrival {
            if let Some((key, n)) = ledger.get(*id) {
                per_key.entry(key.as_str()).or_default().push((*at, *n, id));
            }
        }
        for events in per_key.values_mut() {
            events.sort();
            for w in events.windows(2) {
                let ((_, n0, id0), (at1, n1, _)) = (w[0], w[1]);
                let acked_before = first_ack.get(id0).is_some_and(|a| *a <= at1) || dead.contains(id0);
                if n1 < n0 || !acked_before {
                    s.order_violations += 1;
                    if s.order_violations <= 5 {
                        println!(
                            "{scenario}: order violation: {id0} (n {n0}) then n {n1} {:?} later; n {n0} acked first: {acked_before}",
                            at1.saturating_duration_since(w[0].0)
                        );
                    }
                }
            }
        }
    }
    s.passed = s.lost == 0 && s.order_violations == 0 && s.rolled_back_delivered == 0 && s.committed > 0;
    write_summary(&s);
    s
}

static SUMMARY_LOCK: Mutex<()> = Mutex::new(());

/// target/faults/summary.json: one object per scenario, rebuilt from the
/// per-scenario files so parallel tests each add theirs.
fn write_summary(s: &Summary) {
    let _guard = SUMMARY_LOCK.lock().unwrap();
    let dir = crate::project_root().join("target/faults");
    let scenarios = dir.join("scenarios");
    std::fs::create_dir_all(&scenarios).unwrap();
    std::fs::write(scenarios.join(format!("{}.json", s.scenario)), serde_json::to_string_pretty(s).unwrap()).unwrap();
    let mut all: Vec<serde_json::Value> = std::fs::read_dir(&scenarios)
        .unwrap()
        .flatten()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    all.sort_by_key(|v| v["scenario"].as_str().unwrap_or("").to_string());
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&all).unwrap()).unwrap();
    println!("{}", serde_json::to_string(s).unwrap());
}
