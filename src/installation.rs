//! Which installation of the extension this database has, and which one
//! this library runs. After a new library is installed, a database keeps
//! the tables of the version it had until ALTER EXTENSION outbox UPDATE;
//! the worker waits and the admin functions refuse until then
//! (docs/operations.md, "Upgrades").

use pgrx::pg_sys;

/// The extension version this library implements: the version a fresh
/// CREATE EXTENSION installs, and the one the worker and the admin
/// functions require of an installation.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The oid and version of extension outbox in this database, read from
/// pg_extension through its index: no SQL to parse and plan (the worker
/// asks on every step).
pub fn installed() -> (Option<u32>, Option<String>) {
    let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
    // SAFETY: in a transaction; a catalog index scan as get_extension_oid
    // does it, and attributes read from the tuple it returns.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::ExtensionRelationId, lock);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            pg_sys::Anum_pg_extension_extname as pg_sys::AttrNumber,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_NAMEEQ),
            pg_sys::Datum::from(c"outbox".as_ptr()),
        );
        let scan = pg_sys::systable_beginscan(
            rel,
            pg_sys::Oid::from(pg_sys::ExtensionNameIndexId),
            true,
            std::ptr::null_mut(),
            1,
            &mut key,
        );
        let tuple = pg_sys::systable_getnext(scan);
        let found = if tuple.is_null() {
            (None, None)
        } else {
            let desc = (*rel).rd_att;
            let attr = |n: u32| {
                std::num::NonZeroUsize::new(n as usize).and_then(|n| pgrx::htup::heap_getattr_raw(tuple, n, desc))
            };
            let oid = attr(pg_sys::Anum_pg_extension_oid).map(|d| d.value() as u32);
            let version = attr(pg_sys::Anum_pg_extension_extversion).map(|d| {
                let text = pg_sys::text_to_cstring(d.cast_mut_ptr());
                let version = std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned();
                pg_sys::pfree(text.cast());
                version
            });
            (oid, version)
        };
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, lock);
        found
    }
}
