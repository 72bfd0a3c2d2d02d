//! The worker's one error type, and running work in a transaction or in a
//! subtransaction, so that an error undoes exactly that work.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::panic::AssertUnwindSafe;

/// Something the worker could not do; said in words for the log and for
/// `outbox.stats.last_error`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerError(pub String);

pub type Result<T> = std::result::Result<T, WorkerError>;

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<pgrx::spi::SpiError> for WorkerError {
    fn from(e: pgrx::spi::SpiError) -> Self {
        WorkerError(e.to_string())
    }
}

impl From<String> for WorkerError {
    fn from(s: String) -> Self {
        WorkerError(s)
    }
}

fn caught(e: &CaughtError) -> WorkerError {
    let report = match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    WorkerError(report.message().to_string())
}

/// Run `f` in a transaction of its own: committed when `f` succeeds,
/// aborted when it fails or raises an SQL error (which comes back as an
/// error instead of ending the worker).
pub fn transaction<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    // SAFETY: main thread, outside any transaction.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    PgTryBuilder::new(AssertUnwindSafe(move || {
        let r = f();
        // SAFETY: ends the transaction started above.
        unsafe {
            pg_sys::PopActiveSnapshot();
            if r.is_ok() {
                pg_sys::CommitTransactionCommand();
            } else {
                pg_sys::AbortCurrentTransaction();
            }
        }
        r
    }))
    .catch_others(|e| {
        // SAFETY: the error left the transaction in an aborted state.
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err(caught(&e))
    })
    .execute()
}

/// Run `f` in a subtransaction of the current transaction: when it fails
/// (or raises an SQL error), what it did is rolled back and the rest of the
/// transaction goes on.
///
/// Every query of the worker runs as a read-write SPI statement
/// (`client.update`, `prepare_mut`), reads included: pgrx runs a SELECT
/// read-only while the current (sub)transaction has no id, and a read-only
/// SPI statement uses the snapshot the step's transaction began with: it
/// would miss the tick just taken and events committed since, and a batch
/// would look complete without them.
pub fn subtransaction<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    // SAFETY: main thread, inside a transaction; the same steps PL/pgSQL
    // takes for a block with an EXCEPTION clause.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let restore = move || unsafe {
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    };
    PgTryBuilder::new(AssertUnwindSafe(move || {
        let r = f();
        // SAFETY: ends the subtransaction begun above.
        unsafe {
            if r.is_ok() {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
        }
        restore();
        r
    }))
    .catch_others(move |e| {
        // SAFETY: the error was copied and flushed by pgrx; roll back.
        unsafe {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        restore();
        Err(caught(&e))
    })
    .execute()
}
