//! Which database workers run, and as whom.
//!
//! The postmaster starts one launcher. It is connected to no database, runs
//! no SQL and reads only the shared catalogs (pg_database, pg_authid): for
//! each database in `outbox.databases` that exists, it starts a worker as a
//! dynamic background worker connected as the role `outbox_worker` (created
//! by CREATE EXTENSION, never a superuser), and starts it again when it
//! stops, with a growing pause when it keeps failing. A database that does
//! not exist yet, or a cluster where no CREATE EXTENSION ran yet, is waited
//! for quietly (one log line per change).
//!
//! A worker leaves its database when a statement needs it free of
//! connections (utility_hook.rs); the launcher starts it again once that
//! statement is over.

use crate::{guc, shmem};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// The role database workers connect as.
pub const WORKER_ROLE: &str = "outbox_worker";
/// How often the launcher looks when nothing wakes it.
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// A worker that stopped sooner than this after its start failed: the next
/// start waits longer (1 s, 2 s, 4 s, ... up to MAX_PAUSE).
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Register the launcher (postmaster, at preload).
pub fn register() {
    BackgroundWorkerBuilder::new("outbox launcher")
        .set_type("outbox launcher")
        .set_library("outbox")
        .set_function("outbox_launcher_main")
        .enable_spi_access()
        // Only a primary delivers; a promoted standby starts its launcher.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// What the launcher knows of one configured database.
struct Database {
    name: String,
    worker: Option<(DynamicBackgroundWorker, Instant)>,
    failures: u32,
    next_start: Instant,
    /// Why it is not running, as last logged (logged again only when it
    /// changes).
    waiting: Option<String>,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_launcher_main(_arg: pg_sys::Datum) {
    super::attach_signal_handlers();
    // No database: shared catalogs only, and no SQL can run here.
    BackgroundWorker::connect_worker_to_spi(None, None);
    shmem::publish_launcher();
    let now = Instant::now();
    let mut databases: Vec<Database> = guc::databases()
        .into_iter()
        .take(shmem::MAX_DATABASES)
        .map(|name| Database { name, worker: None, failures: 0, next_start: now, waiting: None })
        .collect();
    loop {
        for (index, db) in databases.iter_mut().enumerate() {
            look_after(index, db);
        }
        let next = databases.iter().filter(|d| d.worker.is_none()).map(|d| d.next_start).min();
        let wait = next.map_or(LOOK_EVERY, |t| t.saturating_duration_since(Instant::now()).min(LOOK_EVERY));
        if !BackgroundWorker::wait_latch(Some(wait.max(Duration::from_millis(10)))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: main thread, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}

fn look_after(index: usize, db: &mut Database) {
    let now = Instant::now();
    if let Some((worker, started)) = &db.worker {
        if worker.pid().is_ok() || matches!(worker.pid(), Err(pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted)) {
            return;
        }
        // It stopped: start it again, sooner when it had run a while.
        db.failures = if started.elapsed() < HEALTHY_AFTER { db.failures + 1 } else { 0 };
        let pause = Duration::from_secs(1 << db.failures.min(6)).min(MAX_PAUSE);
        db.next_start = now + pause;
        db.worker = None;
    }
    if now < db.next_start || shmem::releasing(index) || shmem::has_worker(index) {
        return;
    }
    match worker_target(&db.name) {
        // Looked at again on the next wake-up (CREATE EXTENSION and
        // CREATE DATABASE wake the launcher) or after LOOK_EVERY.
        Err(why) => {
            if db.waiting.as_deref() != Some(why.as_str()) {
                pgrx::log!("outbox launcher: no worker for database {:?} yet: {why}", db.name);
                db.waiting = Some(why);
            }
        }
        Ok((db_oid, role_oid)) => {
            db.waiting = None;
            // Commits there take their place in the order from now on.
            shmem::publish_database(index, db_oid);
            match start_worker(index, &db.name, db_oid, role_oid) {
                Ok(worker) => db.worker = Some((worker, now)),
                Err(()) => {
                    pgrx::warning!(
                        "outbox launcher: could not start the worker for database {:?}; \
                         max_worker_processes may be too low",
                        db.name
                    );
                    db.next_start = now + MAX_PAUSE;
                }
            }
        }
    }
}

/// The oids of the database and of the worker's role, or why not.
fn worker_target(name: &str) -> Result<(pg_sys::Oid, pg_sys::Oid), String> {
    // SAFETY: catalog reads in a transaction of our own, main thread.
    let (db, role) = unsafe {
        pg_sys::StartTransactionCommand();
        let db = find_in_catalog::<pg_sys::FormData_pg_database, _>(pg_sys::DatabaseRelationId, |d| {
            (pgrx::name_data_to_str(&d.datname) == name).then_some(d.oid)
        });
        let role = find_in_catalog::<pg_sys::FormData_pg_authid, _>(pg_sys::AuthIdRelationId, |a| {
            (pgrx::name_data_to_str(&a.rolname) == WORKER_ROLE).then_some((a.oid, a.rolsuper))
        });
        pg_sys::CommitTransactionCommand();
        (db, role)
    };
    let Some(db_oid) = db else {
        return Err("the database does not exist (the worker starts when it is created)".into());
    };
    match role {
        None => Err(format!("role {WORKER_ROLE} does not exist yet: run CREATE EXTENSION outbox in the database (ALTER EXTENSION outbox UPDATE after an upgrade from 0.1.0)")),
        Some((_, true)) => Err(format!("role {WORKER_ROLE} is a superuser; the worker never runs as one")),
        Some((role_oid, false)) => Ok((db_oid, role_oid)),
    }
}

/// The first row of shared catalog `relid` (pg_database, pg_authid) for
/// which `pick` says something. A plain heap scan: without a database the
/// launcher cannot use the catalog caches, whose indexes need pg_class.
///
/// # Safety
/// Inside a transaction; `T` is the catalog's row struct.
unsafe fn find_in_catalog<T, R>(relid: pg_sys::Oid, pick: impl Fn(&T) -> Option<R>) -> Option<R> {
    use pg_sys::ScanOptions::*;
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetCatalogSnapshot(relid));
        let flags = SO_TYPE_SEQSCAN | SO_ALLOW_STRAT | SO_ALLOW_SYNC | SO_ALLOW_PAGEMODE | SO_TEMP_SNAPSHOT;
        let scan = pg_sys::heap_beginscan(rel, snapshot, 0, std::ptr::null_mut(), std::ptr::null_mut(), flags);
        let mut found = None;
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            if let Some(r) = pick(&*pg_sys::heap_tuple_get_struct::<T>(tuple)) {
                found = Some(r);
                break;
            }
        }
        pg_sys::heap_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found
    }
}

fn start_worker(
    index: usize,
    name: &str,
    db_oid: pg_sys::Oid,
    role_oid: pg_sys::Oid,
) -> Result<DynamicBackgroundWorker, ()> {
    BackgroundWorkerBuilder::new(&format!("outbox worker {name}"))
        .set_type("outbox worker")
        .set_library("outbox")
        .set_function("outbox_worker_main")
        .set_argument((index as i32).into_datum())
        .set_extra(&format!("{} {}", db_oid.to_u32(), role_oid.to_u32()))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // The launcher restarts it.
        .set_restart_time(None)
        // SAFETY: MyProcPid is set in every process.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .map_err(|_| ())
}

/// The database and role a worker was started for (its `bgw_extra`).
pub fn worker_target_of(extra: &str) -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    let mut parts = extra.split(' ').map(|p| p.parse::<u32>().ok().map(pg_sys::Oid::from));
    Some((parts.next()??, parts.next()??))
}
