//! The worker's database session: who it connects as, and settings nobody
//! else chooses for it.
//!
//! The worker connects as `outbox_worker`, never a superuser. Database and
//! role defaults (ALTER DATABASE/ROLE ... SET) are the database owner's to
//! choose, so the settings its SQL depends on are set here, after they
//! applied: a planted function, operator or type in a schema of the
//! owner's search_path is never found, and a default such as
//! `default_transaction_read_only` or `statement_timeout` cannot stop it.

use pgrx::pg_sys;
use std::ffi::CStr;

/// Settings the worker's SQL assumes, overriding any database or role
/// default.
const PINNED: &[(&CStr, &CStr)] = &[
    (c"search_path", c"pg_catalog, pg_temp"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"statement_timeout", c"0"),
    // Below deadlock_timeout: the worker, not a user's DDL (DROP EXTENSION
    // in a migration, say), gives up when the two wait on each other; it
    // tries again a moment later.
    (c"lock_timeout", c"100ms"),
    (c"idle_in_transaction_session_timeout", c"0"),
    (c"TimeZone", c"UTC"),
    (c"DateStyle", c"ISO, MDY"),
    (c"IntervalStyle", c"postgres"),
    (c"extra_float_digits", c"1"),
    // What the worker commits is its own bookkeeping (cursors, ticks,
    // parked rows): a crash that loses the last of it sends those events
    // again, which at-least-once allows; what must be durable before
    // anything is sent, the events' commits, is flushed explicitly
    // (flush_wal in mod.rs). An fsync per step was a tenth of the
    // worker's CPU and delayed every send behind it. Rotation, rare,
    // commits synchronously all the same (mod.rs, maintain).
    (c"synchronous_commit", c"off"),
    // The worker's statements are few and prepared once; a custom plan for
    // every execution was planning cost on every step.
    (c"plan_cache_mode", c"force_generic_plan"),
    (c"row_security", c"off"),
    (c"standard_conforming_strings", c"on"),
    (c"backslash_quote", c"safe_encoding"),
];

/// Connect to the database as the worker role.
pub fn connect(db_oid: pg_sys::Oid, role_oid: pg_sys::Oid) {
    // PostgreSQL 17 lets a background worker connect as a role without
    // LOGIN; before that, outbox_worker has LOGIN (and no password).
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    let flags = pg_sys::BGWORKER_BYPASS_ROLELOGINCHECK;
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    let flags = 0;
    // SAFETY: called once, from the worker's main function.
    unsafe { pg_sys::BackgroundWorkerInitializeConnectionByOid(db_oid, role_oid, flags) };
    pin_settings();
}

/// Set PINNED (again after a configuration reload).
pub fn pin_settings() {
    for (name, value) in PINNED {
        // SAFETY: plain GUC assignments, as a SET command would make them.
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SET,
                true,
                pg_sys::PGERROR as i32,
                false,
            );
        }
    }
}

/// The name of the connected database.
pub fn database_name() -> String {
    // SAFETY: catalog lookup in a transaction of our own.
    unsafe {
        pg_sys::StartTransactionCommand();
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        let out = if name.is_null() { String::new() } else { CStr::from_ptr(name).to_string_lossy().into_owned() };
        pg_sys::CommitTransactionCommand();
        out
    }
}
