//! Shared memory: where each database's worker can be woken.
//!
//! One entry per configured database (its index in `outbox.databases`).
//! The worker publishes its PGPROC index in its entry; backends set that process's latch when they commit events or
//! change endpoints (see write/commit.rs). A bumped `config_version` tells the
//! worker to reload endpoints. The worker also publishes which events table
//! is current, so outbox_emit need not look it up (see worker/rotation.rs).

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};

pub const MAX_DATABASES: usize = 16;

#[derive(Default)]
pub struct DatabaseEntry {
    /// Pid of the worker that owns this entry, 0 when none: at most one
    /// worker per database, whoever started it.
    owner_pid: AtomicI32,
    /// Pid of a backend running a statement that needs the database free
    /// of connections (DROP DATABASE, say), 0 for none: the worker leaves
    /// and is not started again until that statement is over.
    releasing: AtomicI32,
    db_oid: AtomicU32,
    /// `procno + 1` of the running worker, 0 when none runs.
    proc_plus_one: AtomicU32,
    config_version: AtomicU64,
    /// `1 + ` the events table outbox_emit writes into, 0 when unknown.
    events_table_plus_one: AtomicU32,
    /// The worker has endpoints to deliver to: commits should wake it.
    wants_commits: AtomicBool,
    /// A wake-up was sent and the worker has not started its next step
    /// yet: further commits need not send another (one signal, not one per
    /// commit).
    wake_pending: AtomicBool,
}

// SAFETY: plain atomics, no pointers.
unsafe impl PGRXSharedMemory for DatabaseEntry {}

static DATABASES: PgAtomic<[DatabaseEntry; MAX_DATABASES]> = unsafe { PgAtomic::new(c"outbox_databases") };

/// `procno + 1` of the launcher, 0 when none runs.
static LAUNCHER: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"outbox_launcher") };

/// The end of the latest commit record of a transaction that emitted
/// (WAL position): what the worker flushes before sending, in case that
/// commit was asynchronous (worker/mod.rs, flush_wal).
static COMMIT_END: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"outbox_commit_end") };

/// Set in the postmaster during preload and inherited by every child.
static AVAILABLE: AtomicBool = AtomicBool::new(false);

pub fn init() {
    init_rings(crate::guc::databases().len().min(MAX_DATABASES));
    pg_shmem_init!(DATABASES);
    pg_shmem_init!(LAUNCHER);
    pg_shmem_init!(COMMIT_END);
    AVAILABLE.store(true, Ordering::Relaxed);
}

/// Whether the library was preloaded (and shared memory exists).
pub fn available() -> bool {
    AVAILABLE.load(Ordering::Relaxed)
}

fn entries() -> Option<&'static [DatabaseEntry; MAX_DATABASES]> {
    available().then(|| DATABASES.get())
}

/// This process's PGPROC index.
fn my_procno() -> u32 {
    // SAFETY: MyProc points into ProcGlobal->allProcs for any process with
    // shared memory access; the difference is this process's PGPROC index.
    unsafe { pg_sys::MyProc.offset_from((*pg_sys::ProcGlobal).allProcs) as u32 }
}

fn set_latch_of(proc_plus_one: u32) {
    if proc_plus_one == 0 {
        return;
    }
    // SAFETY: PGPROC entries live for the whole life of shared memory, so
    // even a stale index points at a valid latch (waking the wrong process
    // is harmless).
    unsafe {
        let proc = (*pg_sys::ProcGlobal).allProcs.add((proc_plus_one - 1) as usize);
        pg_sys::SetLatch(&raw mut (*proc).procLatch);
    }
}

/// Become the worker of database `index`; false when another worker is.
pub fn claim_worker(index: usize, pid: i32) -> bool {
    let Some(entries) = entries() else { return false };
    entries[index].owner_pid.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

/// Stop being the worker of database `index` (at exit), if this process is.
pub fn leave_worker(index: usize, pid: i32) {
    if let Some(entries) = entries() {
        let entry = &entries[index];
        if entry.owner_pid.load(Ordering::Acquire) == pid {
            entry.proc_plus_one.store(0, Ordering::Release);
            entry.owner_pid.store(0, Ordering::Release);
        }
    }
}

/// Whether database `index` has a worker.
pub fn has_worker(index: usize) -> bool {
    entries().is_some_and(|s| s[index].owner_pid.load(Ordering::Acquire) != 0)
}

/// Backend `pid` asks the worker of database `index` to let go of its database
/// (`true`), or is done (`false`; only the backend that asked can).
pub fn set_releasing(index: usize, pid: i32, releasing: bool) {
    let Some(entries) = entries() else { return };
    let entry = &entries[index];
    if releasing {
        entry.releasing.store(pid, Ordering::Release);
        set_latch_of(entry.proc_plus_one.load(Ordering::Acquire));
    } else {
        let _ = entry.releasing.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
    }
    wake_launcher();
}

pub fn releasing(index: usize) -> bool {
    entries().is_some_and(|s| s[index].releasing.load(Ordering::Acquire) != 0)
}

/// Called by the launcher once it runs.
pub fn publish_launcher() {
    if available() {
        LAUNCHER.get().store(my_procno() + 1, Ordering::Release);
    }
}

/// Wake the launcher (a database or the worker role may have appeared).
pub fn wake_launcher() {
    if available() {
        set_latch_of(LAUNCHER.get().load(Ordering::Acquire));
    }
}

/// Called by the worker of database `index` once connected to `db_oid`.
pub fn publish_worker(index: usize, db_oid: pg_sys::Oid) {
    let Some(entries) = entries() else { return };
    let entry = &entries[index];
    entry.db_oid.store(db_oid.to_u32(), Ordering::Release);
    entry.proc_plus_one.store(my_procno() + 1, Ordering::Release);
}

fn entry_of(db_oid: pg_sys::Oid) -> Option<&'static DatabaseEntry> {
    entries()?.iter().find(|s| s.db_oid.load(Ordering::Acquire) == db_oid.to_u32())
}

/// The events table outbox_emit writes into in `db_oid`, if a worker
/// published it.
pub fn events_table(db_oid: pg_sys::Oid) -> Option<usize> {
    let v = entry_of(db_oid)?.events_table_plus_one.load(Ordering::Acquire);
    (v > 0).then(|| v as usize - 1)
}

pub fn publish_events_table(index: usize, table: Option<usize>) {
    if let Some(entries) = entries() {
        entries[index].events_table_plus_one.store(table.map_or(0, |t| t as u32 + 1), Ordering::Release);
    }
}

/// Forget the published table of `db_oid` (the extension was created anew:
/// until its worker looks again, outbox_emit asks the table).
pub fn forget_events_table(db_oid: pg_sys::Oid) {
    if let Some(entry) = entry_of(db_oid) {
        entry.events_table_plus_one.store(0, Ordering::Release);
    }
}

/// The worker of database `index` starts a step: the next commit wakes it
/// again. Returns whether a commit woke it since the last call (true when
/// unknown); call before reading the tables.
pub fn worker_awake(index: usize) -> bool {
    entries().is_none_or(|entries| entries[index].wake_pending.swap(false, Ordering::AcqRel))
}

/// Whether commits should wake the worker of database `index` (it has endpoints).
pub fn want_commits(index: usize, want: bool) {
    if let Some(entries) = entries() {
        entries[index].wants_commits.store(want, Ordering::Release);
    }
}

pub fn config_version(index: usize) -> u64 {
    entries().map_or(0, |s| s[index].config_version.load(Ordering::Acquire))
}

/// The counter behind `config_version`, for the worker's network side to
/// watch (net::Gate): shared memory stays mapped for the process's life.
pub fn config_counter(index: usize) -> Option<&'static AtomicU64> {
    entries().map(|s| &s[index].config_version)
}

/// Wake the worker serving `db_oid`, optionally telling it that endpoint
/// configuration changed. Runs in commit callbacks: must not fail.
pub fn wake_worker(db_oid: pg_sys::Oid, config_changed: bool) {
    let Some(entries) = entries() else { return };
    for entry in entries.iter().filter(|s| s.db_oid.load(Ordering::Acquire) == db_oid.to_u32()) {
        if config_changed {
            entry.config_version.fetch_add(1, Ordering::AcqRel);
        } else if !entry.wants_commits.load(Ordering::Acquire) || entry.wake_pending.swap(true, Ordering::AcqRel) {
            // No endpoint to deliver to, or the worker is woken already.
            continue;
        }
        set_latch_of(entry.proc_plus_one.load(Ordering::Acquire));
    }
}

/// Commit order, as seen just before each commit: one ring per listed
/// database, so that commits in one database never push another's out.
///
/// Every transaction that emitted events takes the next sequence number of
/// its database's ring in its pre-commit callback and writes its txid into
/// it. Transactions that conflict (one waits for the other's row lock)
/// reach pre-commit in their commit order, so the worker uses these numbers
/// to order the transactions that became visible in the same tick
/// (worker/ticks.rs).
pub const COMMIT_RING: usize = 65_536;

#[derive(Default)]
pub struct CommitEntry {
    /// `seq + 1` of the entry written here, 0 when never written.
    pub seq_plus_one: AtomicU64,
    pub txid: AtomicU64,
}

pub struct CommitRing {
    pub next: AtomicU64,
    pub entries: [CommitEntry; COMMIT_RING],
}

impl CommitRing {
    /// A ring in zeroed memory (all-zero is a valid, empty ring): a megabyte
    /// is never built on a stack.
    #[cfg(test)]
    pub fn boxed() -> Box<CommitRing> {
        // SAFETY: atomics of zero are valid values.
        unsafe { Box::<CommitRing>::new_zeroed().assume_init() }
    }
}

/// The rings, one per listed database, in shared memory set up
/// by hand (zeroed, not built by value as pg_shmem_init! would).
static mut RINGS: *mut CommitRing = std::ptr::null_mut();
static mut RING_COUNT: usize = 0;
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

fn rings_size() -> usize {
    // SAFETY: set once in _PG_init.
    std::mem::size_of::<CommitRing>() * unsafe { RING_COUNT }
}

/// Ask for the rings' shared memory (postmaster, at preload).
fn init_rings(count: usize) {
    // SAFETY: _PG_init runs once, in the postmaster, before any backend.
    unsafe {
        RING_COUNT = count;
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        {
            PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(request_rings);
        }
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        pg_sys::RequestAddinShmemSpace(rings_size());
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup_rings);
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pg_guard]
unsafe extern "C-unwind" fn request_rings() {
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(rings_size());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup_rings() {
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock; // AddinShmemInitLock
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let ptr = pg_sys::ShmemInitStruct(c"outbox_commit_rings".as_ptr(), rings_size(), &mut found);
        if !found {
            std::ptr::write_bytes(ptr.cast::<u8>(), 0, rings_size());
        }
        RINGS = ptr.cast::<CommitRing>();
        pg_sys::LWLockRelease(lock);
    }
}

/// The ring of database `index`.
pub fn commit_ring(index: usize) -> Option<&'static CommitRing> {
    // SAFETY: RINGS points at RING_COUNT rings for the life of the server.
    unsafe { (available() && !RINGS.is_null() && index < RING_COUNT).then(|| &*RINGS.add(index)) }
}

/// Record that `txid` of database `db_oid` is about to commit (pre-commit
/// callback; must not fail).
pub fn note_commit(db_oid: pg_sys::Oid, txid: u64) {
    let Some(entries) = entries() else { return };
    let Some(index) = entries.iter().position(|s| s.db_oid.load(Ordering::Acquire) == db_oid.to_u32()) else {
        return; // no worker reads this database's commits
    };
    let Some(ring) = commit_ring(index) else { return };
    let seq = ring.next.fetch_add(1, Ordering::AcqRel);
    let entry = &ring.entries[(seq % COMMIT_RING as u64) as usize];
    entry.txid.store(txid, Ordering::Relaxed);
    entry.seq_plus_one.store(seq + 1, Ordering::Release);
}

/// Where the launcher found database `db_oid` for database `index`: commits
/// there are noted from now on, even before its worker runs.
pub fn publish_database(index: usize, db_oid: pg_sys::Oid) {
    if let Some(entries) = entries() {
        entries[index].db_oid.store(db_oid.to_u32(), Ordering::Release);
    }
}

/// A transaction that emitted committed, its commit record ending at `end`
/// (commit callback; must not fail).
pub fn note_commit_end(end: u64) {
    if available() {
        COMMIT_END.get().fetch_max(end, Ordering::AcqRel);
    }
}

/// The end of the latest commit record of a transaction that emitted.
pub fn commit_end() -> u64 {
    if available() {
        COMMIT_END.get().load(Ordering::Acquire)
    } else {
        0
    }
}
