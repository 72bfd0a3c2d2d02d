//! `search_path = pg_catalog, pg_temp` for SQL the extension runs on behalf
//! of someone else.
//!
//! A name in SQL text is looked up along the session's search_path: a
//! function, operator or type planted in a schema there would run in place
//! of the built-in. With pg_catalog first and pg_temp last, built-ins win,
//! and functions and operators are never looked up in pg_temp at all.
//! Every table and extension function is named with its schema besides.

use pgrx::pg_sys;

/// Run `f` with the search_path pinned, restoring the caller's afterwards
/// (an error in `f` restores it when the (sub)transaction aborts).
pub fn pinned<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the same calls fmgr makes for a function's SET clause.
    let level = unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        level
    };
    let r = f();
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    r
}
