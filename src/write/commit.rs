//! Backend-local transaction state and the commit hook that wakes the
//! worker.
//!
//! One raw transaction callback is registered per backend, the first time it
//! emits an event or changes an endpoint. Just before commit it records the
//! transaction's place in the commit order; after commit it sets the
//! worker's latch (the commit is visible by then, so the worker finds the
//! rows); on abort it only forgets. A rolled-back transaction wakes nobody.

use crate::shmem;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Events emitted by the current top-level transaction; also the source
    /// of each event's sequence number inside its transaction.
    static EMITTED: Cell<i32> = const { Cell::new(0) };
    static CONFIG_CHANGED: Cell<bool> = const { Cell::new(false) };
    /// The top-level transaction id the events were emitted under.
    static TXID: Cell<u64> = const { Cell::new(0) };
}

fn ensure_registered() {
    if !REGISTERED.get() {
        // SAFETY: registering a plain C callback with no argument.
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
        REGISTERED.set(true);
    }
}

/// Record one more event of transaction `txid`; returns its sequence
/// number (1, 2, ...) inside the transaction.
pub fn next_event_number(txid: u64) -> i32 {
    ensure_registered();
    TXID.set(txid);
    let n = EMITTED.get().checked_add(1).unwrap_or_else(|| {
        crate::error::SqlError::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            "outbox_emit: too many events in one transaction",
        )
        .hint("Emit at most 2147483647 events per transaction.")
        .raise()
    });
    EMITTED.set(n);
    n
}

/// Tell the worker, at commit, that endpoint configuration changed.
pub fn note_config_changed() {
    ensure_registered();
    CONFIG_CHANGED.set(true);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        // Last moment before the commit record: take a place in the commit
        // order (see shmem::note_commit).
        // SAFETY: MyDatabaseId is set in every backend that can emit.
        XACT_EVENT_PRE_COMMIT if EMITTED.get() > 0 => shmem::note_commit(unsafe { pg_sys::MyDatabaseId }, TXID.get()),
        XACT_EVENT_COMMIT => {
            let emitted = EMITTED.replace(0) > 0;
            if emitted {
                // SAFETY: set by this commit, read in this backend.
                shmem::note_commit_end(unsafe { pg_sys::XactLastCommitEnd });
            }
            let changed = CONFIG_CHANGED.replace(false);
            if emitted || changed {
                // SAFETY: MyDatabaseId is set in every backend that can emit.
                shmem::wake_worker(unsafe { pg_sys::MyDatabaseId }, changed);
            }
            if changed {
                // CREATE EXTENSION may have made the worker's role.
                shmem::wake_launcher();
            }
        }
        // A prepared transaction commits later, possibly in another
        // backend: the worker's poll timer picks its events up.
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_PARALLEL_ABORT => {
            EMITTED.set(0);
            CONFIG_CHANGED.set(false);
        }
        _ => {}
    }
}
