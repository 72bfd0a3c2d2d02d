//! Ticks, and the commit order of the transactions between two ticks.
//!
//! A tick is a snapshot the worker takes: which transactions had committed
//! when it looked. The events of batch N are those of transactions visible
//! at tick N and not at tick N-1 (PgQ's design): a transaction that commits
//! late lands in a later batch, and one left open elsewhere delays nothing
//! but itself.
//!
//! A snapshot says which transactions committed, not in which order, and
//! transaction ids do not tell either (an id is handed out at the first
//! write, long before the commit). Every transaction that emitted takes a
//! number in shared memory just before it commits (shmem::note_commit, and
//! the utility hook for COMMIT PREPARED): for two transactions that waited
//! on each other that is their commit order. The worker reads those numbers
//! when it takes a tick and stores the batch's order in the tick, whatever
//! the batch's size. Transactions it has no number for (they committed
//! before the server restarted, or more committed than the ring holds
//! between two ticks) come first, by commit timestamp when
//! `track_commit_timestamp` is on, else by transaction id; the tick counts
//! them (`inexact`) and `outbox.stats` shows how many such batches an
//! endpoint read. See docs/design.md.

use super::error::Result;
use super::stream::prepared;
use crate::shmem::{CommitRing, COMMIT_RING};
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A tick as the worker reads batches with it.
#[derive(Debug, Clone)]
pub struct Tick {
    pub id: i64,
    pub xmax: i64,
    pub xip: Vec<i64>,
    /// The batch's transactions in commit order; None only for ticks taken
    /// by version 0.1.0, whose large batches were stored unordered.
    pub order: Option<Vec<i64>>,
    /// Transactions of the batch whose place came from commit timestamps
    /// or transaction ids rather than from the commit ring.
    pub inexact: i32,
    /// How many events each transaction of `order` wrote (all topics):
    /// known for ticks this worker took since it started, so that a batch
    /// of many small transactions is read in one statement (see
    /// stream::read_ordered). Not stored: ticks loaded from the table read
    /// a few transactions at first, as before.
    pub sizes: Option<Vec<i64>>,
}

/// A transaction of a new batch, with its commit timestamp (microseconds)
/// when PostgreSQL tracks them, and how many events it wrote.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Txn {
    pub txid: i64,
    pub committed_at: Option<i64>,
    pub events: i64,
}

/// Commits noted since this worker started reading the ring.
#[derive(Default)]
pub struct CommitOrder {
    /// Next ring sequence number to read.
    next_seq: u64,
    /// Numbers taken but not yet written when last read.
    unwritten: Vec<u64>,
    seq_of: HashMap<i64, u64>,
    /// What `seq_of` learned, oldest first (near enough: a number read
    /// late comes after newer ones), so that forgetting costs what it
    /// forgets. A `retain` over `seq_of` on every tick cost all it held:
    /// after a burst it holds 131,072 commits, and at 1,000 events/s (a
    /// tick per commit) that scan was some 200 µs of the worker's CPU per
    /// event.
    learned: VecDeque<(u64, i64)>,
}

impl CommitOrder {
    /// Take in what the ring recorded since the last call.
    pub fn read(&mut self, ring: &CommitRing) {
        let end = ring.next.load(Ordering::Acquire);
        // Entries older than the ring's size are overwritten: skip them.
        let oldest = end.saturating_sub(COMMIT_RING as u64);
        let start = self.next_seq.max(oldest);
        let retry = std::mem::take(&mut self.unwritten);
        for seq in retry.into_iter().filter(|s| *s >= oldest).chain(start..end) {
            let entry = &ring.entries[(seq % COMMIT_RING as u64) as usize];
            let stamp = entry.seq_plus_one.load(Ordering::Acquire);
            if stamp == seq + 1 {
                self.learn(entry.txid.load(Ordering::Relaxed) as i64, seq);
            } else if stamp < seq + 1 {
                // Taken, not written yet: that transaction has not
                // committed. Look again next time.
                self.unwritten.push(seq);
            }
        }
        self.next_seq = end;
        // Forget what no new batch can contain anymore.
        let forget_before = end.saturating_sub(2 * COMMIT_RING as u64);
        while let Some(&(seq, txid)) = self.learned.front() {
            if seq >= forget_before {
                break;
            }
            self.learned.pop_front();
            if self.seq_of.get(&txid) == Some(&seq) {
                self.seq_of.remove(&txid);
            }
        }
    }

    fn learn(&mut self, txid: i64, seq: u64) {
        // A transaction noted twice (a COMMIT PREPARED that failed and was
        // run again) committed at its last note, whichever is read first.
        let known = self.seq_of.entry(txid).or_insert(seq);
        *known = (*known).max(seq);
        self.learned.push_back((seq, txid));
    }

    /// Whether the ring told this transaction's place.
    pub fn knows(&self, txid: i64) -> bool {
        self.seq_of.contains_key(&txid)
    }

    /// Put `txns` in commit order; returns how many were ordered by commit
    /// timestamp or transaction id (not known to the ring). Those are older
    /// than every known one, so they come first.
    pub fn sort(&self, txns: &mut [Txn]) -> usize {
        txns.sort_by_key(|t| match self.seq_of.get(&t.txid) {
            None => (0, t.committed_at.unwrap_or(i64::MIN), t.txid as u64),
            Some(seq) => (1, 0, *seq),
        });
        txns.iter().filter(|t| !self.knows(t.txid)).count()
    }

    /// Commits noted in the ring and not yet read.
    pub fn unread(&self, ring: &CommitRing) -> u64 {
        ring.next.load(Ordering::Acquire).saturating_sub(self.next_seq)
    }
}

/// Whether a commit wakes the worker, and when it must come back by itself
/// for commits that wait for a paced tick. While commits already noted wait
/// for such a tick, later ones do not wake the worker (at high rates every
/// commit woke it for a step that did nothing); it comes back when the pace
/// ends, whatever happens in between. The same when a step itself noted
/// commits and left them for the pace. Before, the worker asked again after
/// the step whether the tick might still wait; when the pace had ended
/// during the step the answer was no, and it slept a whole poll interval
/// with those commits unticked (and, when wake-ups were off, the commits of
/// that second waking nobody).
#[derive(Debug, Default)]
pub struct CommitWakes {
    back_by: Option<Instant>,
}

impl CommitWakes {
    /// At the start of a step: whether commit wake-ups must be asked for
    /// again (shmem::worker_awake). Not while commits wait for a paced
    /// tick that ends at `pace_ends`.
    pub fn step(&mut self, paced: bool, pace_ends: Instant) -> bool {
        self.back_by = paced.then_some(pace_ends);
        !paced
    }

    /// This step left commits it noted for a paced tick that ends at
    /// `pace_ends`: come back by then. Until the next step.
    pub fn defer(&mut self, pace_ends: Instant) {
        self.back_by = Some(self.back_by.map_or(pace_ends, |t| t.min(pace_ends)));
    }

    /// Commit wake-ups were asked for again (a tick is taken).
    pub fn armed(&mut self) {
        self.back_by = None;
    }

    /// The latest the worker may sleep until.
    pub fn wake_by(&self) -> Option<Instant> {
        self.back_by
    }
}

/// How fast transactions that emit commit, from the commit ring's count,
/// measured over windows of at least RATE_WINDOW (a burst of two commits
/// in a quiet second is not a high rate).
pub struct CommitRate {
    since: Instant,
    count_then: u64,
    per_second: f64,
}

const RATE_WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

impl CommitRate {
    pub fn new(now: Instant) -> CommitRate {
        CommitRate { since: now, count_then: 0, per_second: 0.0 }
    }

    /// Look at the ring's count; a window that is long enough ends.
    pub fn update(&mut self, ring: &CommitRing, now: Instant) {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= RATE_WINDOW {
            let count = ring.next.load(Ordering::Acquire);
            self.per_second = count.saturating_sub(self.count_then) as f64 / elapsed.as_secs_f64();
            self.since = now;
            self.count_then = count;
        }
    }

    /// Commits per second in the last window.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }
}

// The statements of a tick, prepared once (stream::prepared): they run on
// every step that finds new commits, and at 1,000 events/s parsing and
// planning them each time was most of the worker's main thread (and of
// the latency, commit to receiver).

// The latest tick, read when the worker does not know it (after it
// started, or after a step failed).
const LAST_TICK: &str = "SELECT id, snap_xmax, snap_xip FROM outbox.ticks ORDER BY id DESC LIMIT 1";

// The transactions whose events became visible since the last tick, a row
// each, with how many events each wrote. (Their commit timestamps come
// from COMMIT_TIMESTAMPS, for those the commit ring did not see: asking
// for every one cost a third of this statement, most of it starting the
// executor for two sorted aggregates.)
const COMMITTED_SINCE: &str = "SELECT txid, pg_catalog.count(*) FROM (
     SELECT txid FROM outbox.events WHERE txid = ANY ($2)
     UNION ALL
     SELECT txid FROM outbox.events WHERE txid >= $1 AND txid < $3) AS e
 WHERE NOT txid = ANY ($4)
 GROUP BY txid";

// Commit timestamps (microseconds) of the transactions in $1, when
// track_commit_timestamp is on.
const COMMIT_TIMESTAMPS: &str = "SELECT x,
        CASE WHEN pg_catalog.current_setting('track_commit_timestamp')::boolean
             THEN (extract(epoch FROM pg_catalog.pg_xact_commit_timestamp(
                       (x % 4294967296)::pg_catalog.text::pg_catalog.xid)) * 1000000)::bigint
        END
 FROM pg_catalog.unnest($1::pg_catalog.int8[]) AS x";

const INSERT_TICK: &str = "INSERT INTO outbox.ticks (id, snap_xmin, snap_xmax, snap_xip, commit_order, inexact)
 VALUES ($1, $2, $3, $4, $5, $6)";

const LOAD_TICKS: &str = "SELECT id, snap_xmax, snap_xip, commit_order, inexact FROM outbox.ticks WHERE id = ANY ($1)";

/// The latest tick's id and snapshot, as far as the next tick needs them.
#[derive(Debug, Clone, PartialEq)]
struct LastTick {
    id: i64,
    xmax: i64,
    xip: Vec<i64>,
}

/// Takes ticks: the commit order it learned from the commit ring, and the
/// latest tick as this worker took it.
///
/// The worker is the only one to insert ticks, so the latest one is kept
/// in memory instead of read from the table on every tick (at middle rates
/// a tick per step, and that read was a fifth of taking it). What a failed
/// step's transaction took may be rolled back: the worker calls `forget`
/// then, and the next tick reads the table. Should the table still differ
/// (a tick inserted by hand), the next insert collides with its id and
/// fails the step, which forgets too.
#[derive(Default)]
pub struct Ticker {
    order: CommitOrder,
    last: Option<LastTick>,
}

impl Ticker {
    /// Commits noted in the ring and not yet read.
    pub fn unread(&self, ring: &CommitRing) -> u64 {
        self.order.unread(ring)
    }

    /// The step's transaction failed, or the tables are not the ones the
    /// latest tick was taken in: read the latest tick again next time.
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// The latest tick's id (read from the table when not known).
    pub fn latest(&mut self) -> Result<i64> {
        if let Some(last) = &self.last {
            return Ok(last.id);
        }
        let last = Spi::connect_mut(read_last)?;
        let id = last.id;
        self.last = Some(last);
        Ok(id)
    }

    /// Take a new tick if transactions committed since the last one, or
    /// `always`; returns the latest tick id either way, and the tick when
    /// it is new (the endpoints read up to it next: no need to load it).
    pub fn take(&mut self, always: bool, ring: Option<&CommitRing>) -> Result<(i64, Option<Tick>)> {
        use pg_sys::{INT4OID, INT8ARRAYOID, INT8OID};
        let (order, known) = (&mut self.order, &mut self.last);
        Ok(Spi::connect_mut(|client| {
            // Taken out: a failure below leaves it unknown.
            let last = match known.take() {
                Some(last) => last,
                None => read_last(client)?,
            };
            let (xmin, xmax, xip) = current_snapshot();
            let plan = prepared(client, COMMITTED_SINCE, &[INT8OID, INT8ARRAYOID, INT8OID, INT8ARRAYOID])?;
            let mut txns = Vec::new();
            let args = [last.xmax.into(), last.xip.clone().into(), xmax.into(), xip.clone().into()];
            for row in client.update(&*plan, None, &args)? {
                if let Some(txid) = row.get::<i64>(1)? {
                    txns.push(Txn { txid, committed_at: None, events: row.get::<i64>(2)?.unwrap_or_default() });
                }
            }
            if txns.is_empty() && !always {
                let id = last.id;
                *known = Some(last);
                return pgrx::spi::SpiResult::Ok((id, None));
            }
            // Read the ring after the snapshot: every transaction the
            // snapshot sees as committed wrote its number before that.
            if let Some(ring) = ring {
                order.read(ring);
            }
            let unknown: Vec<i64> = txns.iter().map(|t| t.txid).filter(|t| !order.knows(*t)).collect();
            if !unknown.is_empty() {
                let plan = prepared(client, COMMIT_TIMESTAMPS, &[INT8ARRAYOID])?;
                let mut stamps = HashMap::with_capacity(unknown.len());
                for row in client.update(&*plan, None, &[unknown.into()])? {
                    if let Some(txid) = row.get::<i64>(1)? {
                        stamps.insert(txid, row.get::<i64>(2)?);
                    }
                }
                for t in &mut txns {
                    t.committed_at = stamps.get(&t.txid).copied().flatten();
                }
            }
            let inexact = order.sort(&mut txns) as i32;
            let commit_order: Vec<i64> = txns.iter().map(|t| t.txid).collect();
            let id = last.id + 1;
            let plan =
                prepared(client, INSERT_TICK, &[INT8OID, INT8OID, INT8OID, INT8ARRAYOID, INT8ARRAYOID, INT4OID])?;
            client.update(
                &*plan,
                None,
                &[id.into(), xmin.into(), xmax.into(), xip.clone().into(), commit_order.clone().into(), inexact.into()],
            )?;
            *known = Some(LastTick { id, xmax, xip: xip.clone() });
            let sizes = txns.iter().map(|t| t.events).collect();
            Ok((id, Some(Tick { id, xmax, xip, order: Some(commit_order), inexact, sizes: Some(sizes) })))
        })?)
    }
}

/// The latest tick, from the table.
fn read_last(client: &mut SpiClient<'_>) -> SpiResult<LastTick> {
    let plan = prepared(client, LAST_TICK, &[])?;
    let row = client.update(&*plan, Some(1), &[])?.first();
    Ok(LastTick { id: row.get(1)?.unwrap_or(0), xmax: row.get(2)?.unwrap_or(0), xip: row.get(3)?.unwrap_or_default() })
}

/// A snapshot taken now, as `pg_current_snapshot()` gives it: xmin, xmax
/// and the transactions in progress, as 64-bit ids, sorted, without
/// duplicates (a prepared transaction shows twice for a moment). Taken
/// without a statement: at a tick per commit, `SELECT
/// pg_current_snapshot()` was one of the five statements of every step.
pub(crate) fn current_snapshot() -> (i64, i64, Vec<i64>) {
    // SAFETY: called in a transaction, in READ COMMITTED (session.rs), so
    // this is a fresh snapshot, as a statement would take; its fields are
    // copied before anything else can take another.
    let (xmin, xmax, xip32, next) = unsafe {
        let snap = &*pg_sys::GetTransactionSnapshot();
        let xip = if snap.xcnt == 0 || snap.xip.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(snap.xip, snap.xcnt as usize).to_vec()
        };
        // Read after the snapshot: every xid in it is below.
        (snap.xmin, snap.xmax, xip, pg_sys::ReadNextFullTransactionId().value)
    };
    let mut xip: Vec<i64> = xip32.into_iter().map(|x| widen(x.into_inner(), next)).collect();
    xip.sort_unstable();
    xip.dedup();
    (widen(xmin.into_inner(), next), widen(xmax.into_inner(), next), xip)
}

/// A 32-bit xid from a snapshot as the 64-bit id `pg_current_xact_id()`
/// gave its transaction, given `next`, the next 64-bit id, read after the
/// snapshot: the epoch of `next`, or the one before for an xid above
/// `next`'s (assigned before the 32-bit counter wrapped). As PostgreSQL's
/// `pg_current_snapshot()` does; special xids (below 3) stay as they are.
fn widen(xid: u32, next: u64) -> i64 {
    if xid < 3 {
        return i64::from(xid);
    }
    let mut epoch = (next >> 32) as u32;
    if xid > next as u32 {
        epoch = epoch.wrapping_sub(1);
    }
    ((u64::from(epoch) << 32) | u64::from(xid)) as i64
}

/// `xmin:xmax:xip,...`, the text of a pg_snapshot.
#[cfg(any(test, feature = "pg_test"))]
pub(crate) fn parse_snapshot(text: &str) -> Option<(i64, i64, Vec<i64>)> {
    let mut parts = text.split(':');
    let xmin = parts.next()?.parse().ok()?;
    let xmax = parts.next()?.parse().ok()?;
    let xip = match parts.next()? {
        "" => Vec::new(),
        list => list.split(',').map(|x| x.parse().ok()).collect::<Option<Vec<i64>>>()?,
    };
    parts.next().is_none().then_some((xmin, xmax, xip))
}

/// Ticks by id.
pub fn load(ids: &[i64]) -> Result<Vec<Tick>> {
    Ok(Spi::connect_mut(|client| {
        let plan = prepared(client, LOAD_TICKS, &[pg_sys::INT8ARRAYOID])?;
        let rows = client.update(&*plan, None, &[ids.to_vec().into()])?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Tick {
                id: row.get(1)?.unwrap_or_default(),
                xmax: row.get(2)?.unwrap_or_default(),
                xip: row.get(3)?.unwrap_or_default(),
                order: row.get(4)?,
                inexact: row.get(5)?.unwrap_or(0),
                sizes: None,
            });
        }
        pgrx::spi::SpiResult::Ok(out)
    })?)
}

/// Forget ticks no endpoint reads from anymore (keeps the latest). Nothing
/// is dropped while an endpoint has not started (see
/// store::start_new_endpoints).
pub fn drop_old() -> Result<()> {
    Spi::run(
        "DELETE FROM outbox.ticks
         WHERE id < (SELECT coalesce(pg_catalog.min(p.tick), (SELECT pg_catalog.max(id) FROM outbox.ticks))
                     FROM outbox.progress AS p)
           AND id < (SELECT pg_catalog.max(id) FROM outbox.ticks)
           AND NOT EXISTS (SELECT FROM outbox.progress AS p WHERE p.tick IS NULL)",
    )?;
    Ok(())
}

/// The ticks endpoints read between, loaded on demand and forgotten when
/// no endpoint needs them.
#[derive(Default)]
pub struct Ticks {
    loaded: HashMap<i64, Tick>,
}

impl Ticks {
    /// Make sure ticks `ids` are loaded (those that exist).
    pub fn need(&mut self, ids: impl IntoIterator<Item = i64>) -> Result<()> {
        let missing: Vec<i64> = ids.into_iter().filter(|id| !self.loaded.contains_key(id)).collect();
        if !missing.is_empty() {
            for t in load(&missing)? {
                self.loaded.insert(t.id, t);
            }
        }
        Ok(())
    }

    /// A tick just taken, as `load` would read it.
    pub fn insert(&mut self, tick: Tick) {
        self.loaded.insert(tick.id, tick);
    }

    pub fn get(&self, id: i64) -> Option<&Tick> {
        self.loaded.get(&id)
    }

    /// Keep only ticks `keep` says are still needed.
    pub fn retain(&mut self, keep: impl Fn(i64) -> bool) {
        self.loaded.retain(|id, _| keep(*id));
    }

    pub fn clear(&mut self) {
        self.loaded.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txns(ids: &[(i64, Option<i64>)]) -> Vec<Txn> {
        ids.iter().map(|(txid, committed_at)| Txn { txid: *txid, committed_at: *committed_at, events: 1 }).collect()
    }

    fn ids(txns: &[Txn]) -> Vec<i64> {
        txns.iter().map(|t| t.txid).collect()
    }

    #[test]
    fn the_commit_rate_is_measured_over_whole_windows() {
        let ring = CommitRing::boxed();
        let t0 = Instant::now();
        let mut rate = CommitRate::new(t0);
        ring.next.store(10, Ordering::Release);
        // Ten commits within a window are not yet a rate.
        rate.update(&ring, t0 + RATE_WINDOW / 2);
        assert_eq!(rate.per_second(), 0.0);
        rate.update(&ring, t0 + RATE_WINDOW * 2);
        assert!((rate.per_second() - 10.0 / (RATE_WINDOW * 2).as_secs_f64()).abs() < 1e-6);
        // A quiet window brings it down to nothing.
        rate.update(&ring, t0 + RATE_WINDOW * 4);
        assert_eq!(rate.per_second(), 0.0);
    }

    /// The pace may end during the step that left commit wake-ups off: the
    /// worker's sleep is still bounded by it, however late it asks, and
    /// the next step asks for wake-ups again.
    #[test]
    fn commits_left_unwoken_bound_the_sleep_until_the_pace_ends() {
        let t0 = Instant::now();
        let pace_ends = t0 + std::time::Duration::from_millis(4);
        let mut wakes = CommitWakes::default();
        assert!(!wakes.step(true, pace_ends), "left off while the tick is paced");
        // The step outlived the pace: the sleep ends at once, not after a
        // poll interval.
        assert_eq!(wakes.wake_by(), Some(pace_ends));
        assert!(wakes.step(false, pace_ends), "asked for again once the pace is over");
        assert_eq!(wakes.wake_by(), None, "commits wake the worker");
        wakes.step(true, pace_ends);
        wakes.armed();
        assert_eq!(wakes.wake_by(), None, "a tick asked for them again");
        // A step that started with nothing unticked, noted commits and
        // left them for the pace: it comes back by the pace's end too,
        // and the next step forgets it.
        assert!(wakes.step(false, pace_ends));
        wakes.defer(pace_ends);
        assert_eq!(wakes.wake_by(), Some(pace_ends));
        wakes.step(false, pace_ends);
        assert_eq!(wakes.wake_by(), None);
    }

    #[test]
    fn snapshot_xids_take_the_epoch_of_the_next_id_or_the_one_before() {
        let next = (7u64 << 32) | 100;
        assert_eq!(widen(100, next), (7 << 32) | 100, "xmax may be the next id itself");
        assert_eq!(widen(42, next), (7 << 32) | 42);
        assert_eq!(widen(4_000_000_000, next), (6 << 32) | 4_000_000_000, "before the counter wrapped");
        assert_eq!(widen(2, next), 2, "frozen xid");
        assert_eq!(widen(5, 100), 5, "epoch 0");
    }

    #[test]
    fn snapshots_are_read_from_their_text() {
        assert_eq!(parse_snapshot("10:20:"), Some((10, 20, vec![])));
        assert_eq!(parse_snapshot("10:20:10,14,15"), Some((10, 20, vec![10, 14, 15])));
        assert_eq!(
            parse_snapshot("5000000000:5000000003:5000000001"),
            Some((5000000000, 5000000003, vec![5000000001]))
        );
        for bad in ["", "10", "10:20", "10:20:x", "10:20:1,", "10:20:1:2", "a:20:"] {
            assert_eq!(parse_snapshot(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unknown_first_by_commit_time_then_known_by_sequence() {
        let mut order = CommitOrder::default();
        order.learn(10, 7);
        order.learn(20, 3);
        // 5 and 30 committed before the ring knew them (a crash, say): 30
        // committed first although its id is higher.
        let mut t = txns(&[(30, Some(100)), (10, None), (5, Some(200)), (20, None)]);
        assert_eq!(order.sort(&mut t), 2);
        assert_eq!(ids(&t), [30, 5, 20, 10]);
        // Without commit timestamps, the unknown ones go by txid.
        let mut t = txns(&[(30, None), (10, None), (5, None), (20, None)]);
        order.sort(&mut t);
        assert_eq!(ids(&t), [5, 30, 20, 10]);
    }

    #[test]
    fn a_transaction_noted_twice_takes_its_last_place() {
        let mut order = CommitOrder::default();
        order.learn(10, 5);
        order.learn(20, 4);
        order.learn(10, 3); // the earlier note, read late
        let mut t = txns(&[(10, None), (20, None)]);
        assert_eq!(order.sort(&mut t), 0);
        assert_eq!(ids(&t), [20, 10]);
    }

    #[test]
    fn any_number_of_known_transactions_is_exact() {
        let mut order = CommitOrder::default();
        // Commit order is the reverse of the ids, for 50,000 transactions.
        for i in 0..50_000i64 {
            order.learn(100_000 - i, i as u64);
        }
        let mut t: Vec<Txn> = (50_001..=100_000).map(|txid| Txn { txid, committed_at: None, events: 1 }).collect();
        assert_eq!(order.sort(&mut t), 0);
        assert!(t.windows(2).all(|w| w[0].txid > w[1].txid));
    }

    /// What the ring noted 2 × COMMIT_RING commits ago is forgotten, and
    /// forgetting costs what is forgotten: a tick after a burst does not
    /// go over every commit still remembered (it did, with `retain`: 1,000
    /// ticks of one commit each took seconds in a debug build).
    #[test]
    fn old_commits_are_forgotten_without_going_over_the_rest() {
        let ring = CommitRing::boxed();
        let mut next = 0u64;
        let mut commit = |ring: &CommitRing, txid: u64| {
            let entry = &ring.entries[next as usize % COMMIT_RING];
            entry.txid.store(txid, Ordering::Relaxed);
            entry.seq_plus_one.store(next + 1, Ordering::Release);
            next += 1;
            ring.next.store(next, Ordering::Release);
        };
        let mut order = CommitOrder::default();
        // A burst: 2 × COMMIT_RING commits, read as they come.
        for txid in 1..=2 * COMMIT_RING as u64 {
            commit(&ring, txid);
            if txid % 1000 == 0 {
                order.read(&ring);
            }
        }
        order.read(&ring);
        assert_eq!(order.seq_of.len(), 2 * COMMIT_RING);
        let started = Instant::now();
        for txid in 1_000_001..1_001_001u64 {
            commit(&ring, txid);
            order.read(&ring);
        }
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_millis(200), "1,000 ticks took {took:?}");
        // The first thousand are forgotten, the rest known.
        assert_eq!(order.seq_of.len(), 2 * COMMIT_RING);
        assert!(!order.seq_of.contains_key(&1000) && order.seq_of.contains_key(&1001));
        assert_eq!(order.learned.len(), 2 * COMMIT_RING);
    }

    #[test]
    fn reads_the_ring_and_waits_for_unwritten_entries() {
        let ring = CommitRing::boxed();
        let write = |seq: u64, txid: u64| {
            let entry = &ring.entries[seq as usize % COMMIT_RING];
            entry.txid.store(txid, Ordering::Relaxed);
            entry.seq_plus_one.store(seq + 1, Ordering::Release);
        };
        ring.next.store(3, Ordering::Release);
        write(0, 100);
        write(2, 300); // seq 1 was taken but is not written yet
        let mut order = CommitOrder::default();
        order.read(&ring);
        let mut t = txns(&[(300, None), (100, None)]);
        order.sort(&mut t);
        assert_eq!(ids(&t), [100, 300]);
        write(1, 200);
        order.read(&ring);
        let mut t = txns(&[(300, None), (200, None), (100, None)]);
        assert_eq!(order.sort(&mut t), 0);
        assert_eq!(ids(&t), [100, 200, 300]);
    }
}
