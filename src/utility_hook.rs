//! Statements of every backend that matter to outbox, seen through the
//! ProcessUtility hook:
//!
//! - DROP DATABASE, ALTER DATABASE ... RENAME / SET TABLESPACE and CREATE
//!   DATABASE ... TEMPLATE need a database free of connections: when the
//!   caller owns the database (or is a superuser), the worker of a listed
//!   database leaves for the duration of the statement and is started
//!   again after it (done or failed). Nobody else can make it leave.
//! - COMMIT PREPARED commits a transaction outside its own backend: it
//!   takes its place in the commit order here (worker/ticks.rs).

use crate::{guc, search_path, shmem};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Install the utility hook (every backend, at preload).
pub fn install() {
    // SAFETY: _PG_init runs once per process, before any statement.
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// The gid of a COMMIT PREPARED statement.
unsafe fn commit_prepared_gid(stmt: *mut pg_sys::Node) -> Option<&'static CStr> {
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_TransactionStmt {
            return None;
        }
        let t = stmt as *mut pg_sys::TransactionStmt;
        if (*t).kind != pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED || (*t).gid.is_null() {
            return None;
        }
        Some(CStr::from_ptr((*t).gid))
    }
}

/// Give the prepared transaction `gid` its place in the commit order, just
/// before it commits: like a transaction committing in its own backend, it
/// still holds its locks, so anything that waited for it commits later.
///
/// pg_guard turns a failure (a cancel, say) into the statement's ERROR,
/// raised before anything committed, rather than swallowing it halfway
/// through SPI.
#[pg_guard]
unsafe extern "C-unwind" fn note_commit_prepared(gid: *const std::ffi::c_char) {
    // SAFETY: the gid of the statement being run.
    let gid = unsafe { CStr::from_ptr(gid) }.to_string_lossy().into_owned();
    let xid = search_path::pinned(|| {
        Spi::get_one_with_args::<i64>(
            "SELECT transaction::pg_catalog.text::pg_catalog.int8 FROM pg_catalog.pg_prepared_xacts WHERE gid = $1",
            &[gid.as_str().into()],
        )
        .ok()
        .flatten()
    });
    if let Some(xid) = xid {
        // A 32-bit xid of a prepared transaction is older than the next
        // one to be assigned: its epoch is the next one's, or one less.
        // SAFETY: reads the shared counter.
        let next = unsafe { pg_sys::ReadNextFullTransactionId() }.value;
        let (epoch, next32) = (next >> 32, next & 0xffff_ffff);
        let xid = xid as u64 & 0xffff_ffff;
        let full = if xid <= next32 { (epoch << 32) | xid } else { (epoch.saturating_sub(1) << 32) | xid };
        // SAFETY: MyDatabaseId is set in every backend.
        shmem::note_commit(unsafe { pg_sys::MyDatabaseId }, full);
    }
}

/// The index of the configured database a statement needs free of
/// connections, if any, and if the caller may run that statement (owns the
/// database, or is a superuser): a statement that will be refused anyway
/// must not make the worker leave. A failed catalog lookup is the
/// statement's ERROR (pg_guard), as it would have been without the hook.
#[pg_guard]
unsafe extern "C-unwind" fn database_to_release(stmt: *mut pg_sys::Node, top_level: bool) -> isize {
    // All but RENAME refuse to run in a transaction block or a function
    // (PreventInTransactionBlock): they would fail right after the worker
    // was told to go.
    // SAFETY: transaction-state queries.
    let in_block = unsafe { pg_sys::IsTransactionBlock() || pg_sys::IsSubTransaction() } || !top_level;
    if in_block && unsafe { (*stmt).type_ } != pg_sys::NodeTag::T_RenameStmt {
        return -1;
    }
    match unsafe { database_of(stmt) } {
        Some((index, oid)) if may_own(oid) => index as isize,
        _ => -1,
    }
}

/// Whether the current user owns database `oid` or is a superuser.
fn may_own(oid: pg_sys::Oid) -> bool {
    // SAFETY: catalog-cache lookups inside the statement's transaction.
    unsafe {
        let user = pg_sys::GetUserId();
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        let owner = pg_sys::pg_database_ownercheck(oid, user);
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        let owner = pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, oid, user);
        owner || pg_sys::superuser_arg(user)
    }
}

/// The listed database (index, oid) a statement needs free of connections.
unsafe fn database_of(stmt: *mut pg_sys::Node) -> Option<(usize, pg_sys::Oid)> {
    if stmt.is_null() {
        return None;
    }
    let name = unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_DropdbStmt => (*(stmt as *mut pg_sys::DropdbStmt)).dbname,
            pg_sys::NodeTag::T_RenameStmt
                if (*(stmt as *mut pg_sys::RenameStmt)).renameType == pg_sys::ObjectType::OBJECT_DATABASE =>
            {
                (*(stmt as *mut pg_sys::RenameStmt)).subname
            }
            // Only SET TABLESPACE needs the database to itself.
            pg_sys::NodeTag::T_AlterDatabaseStmt => {
                let alter = stmt as *mut pg_sys::AlterDatabaseStmt;
                option_text((*alter).options, c"tablespace")?;
                (*alter).dbname
            }
            pg_sys::NodeTag::T_CreatedbStmt => {
                let options = (*(stmt as *mut pg_sys::CreatedbStmt)).options;
                option_text(options, c"template")?
            }
            _ => return None,
        }
    };
    if name.is_null() {
        return None;
    }
    let index = guc::database_index(unsafe { CStr::from_ptr(name) }.to_bytes())?;
    let oid = unsafe { pg_sys::get_database_oid(name, true) };
    (oid != pg_sys::InvalidOid).then_some((index, oid))
}

/// The text of option `name` in a list of DefElem.
unsafe fn option_text(options: *mut pg_sys::List, name: &CStr) -> Option<*mut std::ffi::c_char> {
    if options.is_null() {
        return None;
    }
    unsafe {
        for i in 0..(*options).length as usize {
            let def = (*(*options).elements.add(i)).ptr_value as *mut pg_sys::DefElem;
            if !(*def).defname.is_null() && CStr::from_ptr((*def).defname) == name && !(*def).arg.is_null() {
                // A template is written as a name (a String node).
                let arg = (*def).arg;
                #[cfg(not(any(feature = "pg13", feature = "pg14")))]
                if (*arg).type_ == pg_sys::NodeTag::T_String {
                    return Some((*(arg as *mut pg_sys::String)).sval);
                }
                #[cfg(any(feature = "pg13", feature = "pg14"))]
                if (*arg).type_ == pg_sys::NodeTag::T_String {
                    return Some((*(arg as *mut pg_sys::Value)).val.str_);
                }
                return None;
            }
        }
    }
    None
}

// The hook runs around every utility statement of every backend, so it adds
// nothing to the others: no pg_guard (which would turn every DDL error into
// a Rust panic and back), nothing that can fail. The previous hook is called
// through plain C declarations; an ERROR raised below unwinds through these
// frames, which hold only plain values.
unsafe extern "C-unwind" {
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query: *const std::ffi::c_char,
        #[cfg(not(feature = "pg13"))] read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
    #[link_name = "pg_re_throw"]
    fn re_throw() -> !;
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    #[cfg(not(feature = "pg13"))] read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let run = || unsafe {
        #[cfg(not(feature = "pg13"))]
        match PREVIOUS_HOOK {
            Some(hook) => hook(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => standard_process_utility(pstmt, query, read_only_tree, context, params, env, dest, qc),
        }
        #[cfg(feature = "pg13")]
        match PREVIOUS_HOOK {
            Some(hook) => hook(pstmt, query, context, params, env, dest, qc),
            None => standard_process_utility(pstmt, query, context, params, env, dest, qc),
        }
    };
    let stmt = unsafe { (*pstmt).utilityStmt };
    if stmt.is_null() {
        return run();
    }
    let tag = unsafe { (*stmt).type_ };
    if tag == pg_sys::NodeTag::T_TransactionStmt {
        if let Some(gid) = unsafe { commit_prepared_gid(stmt) } {
            unsafe { note_commit_prepared(gid.as_ptr()) };
            run();
            // Committed now: the worker reads its events at once, not at
            // its next tick.
            // SAFETY: MyDatabaseId is set in every backend (COMMIT
            // PREPARED runs in the database that prepared).
            shmem::wake_worker(unsafe { pg_sys::MyDatabaseId }, false);
            return;
        }
        return run();
    }
    let may_release = matches!(
        tag,
        pg_sys::NodeTag::T_DropdbStmt
            | pg_sys::NodeTag::T_RenameStmt
            | pg_sys::NodeTag::T_AlterDatabaseStmt
            | pg_sys::NodeTag::T_CreatedbStmt
    );
    let top_level = context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL;
    let release = if may_release { unsafe { database_to_release(stmt, top_level) } } else { -1 };
    match usize::try_from(release).ok() {
        None => run(),
        Some(index) => unsafe { released(index, run) },
    }
}

/// Run `statement` with the worker of database `index` away from its database;
/// it may come back when the statement is over, done or failed (an error is
/// re-thrown as it was, PG_FINALLY-style).
unsafe fn released(index: usize, statement: impl FnOnce()) {
    // SAFETY: MyProcPid is set in every process.
    let pid = unsafe { pg_sys::MyProcPid };
    shmem::set_releasing(index, pid, true);
    unsafe {
        let prev_stack = pg_sys::PG_exception_stack;
        let prev_context = pg_sys::error_context_stack;
        let jumped = cee_scape::call_with_sigsetjmp(false, |buffer| {
            pg_sys::PG_exception_stack = buffer as *const _ as *mut _;
            statement();
            0
        });
        pg_sys::PG_exception_stack = prev_stack;
        pg_sys::error_context_stack = prev_context;
        shmem::set_releasing(index, pid, false);
        if jumped != 0 {
            re_throw();
        }
    }
}
