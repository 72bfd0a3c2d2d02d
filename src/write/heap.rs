//! Writing one event row, without the executor.
//!
//! outbox_emit runs in every business transaction, so its cost is the
//! extension's cost. Going through SPI meant a second executor run (plan
//! check, executor start and end, a memory context) for one row; this
//! forms the tuple and inserts it and its index entries directly, as the
//! executor itself would for a table without triggers, constraints beyond
//! NOT NULL, or expression indexes (the events tables have none of those,
//! and the function checks).

use crate::error::SqlError;
use pgrx::pg_sys::{self, Datum};
use pgrx::prelude::*;

/// The columns of outbox.events_N, in table order.
pub struct Row {
    pub txid: i64,
    pub n: i32,
    pub id: Datum,
    pub topic: Datum,
    pub key: Option<Datum>,
    pub event_type: Option<Datum>,
    pub payload: Datum,
    pub headers: Datum,
    pub created_at: pg_sys::TimestampTz,
    /// Bytes the event takes once read, for the worker's memory window.
    pub size: i32,
}

const COLUMNS: usize = 10;
/// Version 0.1.0's events tables had no `size`, the last column. Between
/// installing this library and ALTER EXTENSION outbox UPDATE, a database
/// still has them, and its applications must go on emitting: the row is
/// written without it.
const COLUMNS_0_1_0: usize = COLUMNS - 1;

fn broken(what: &str) -> ! {
    SqlError::new(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("outbox_emit: {what}"))
        .hint("The outbox schema was changed by hand; recreate the extension.")
        .raise()
}

/// The oid of `outbox.<name>`.
fn relation(name: &std::ffi::CStr) -> pg_sys::Oid {
    let schema = unsafe { pg_sys::get_namespace_oid(c"outbox".as_ptr(), true) };
    if schema == pg_sys::InvalidOid {
        broken("schema outbox does not exist");
    }
    let relid = unsafe { pg_sys::get_relname_relid(name.as_ptr(), schema) };
    if relid == pg_sys::InvalidOid {
        broken(&format!("table outbox.{} does not exist", name.to_string_lossy()));
    }
    relid
}

/// Which events table is current, read from outbox.rotation directly (used
/// when no worker published it in shared memory). A heap scan rather than
/// SQL: the caller is a writer without rights on the table, and no query
/// text means no name resolved under the caller's search_path.
///
/// # Safety
/// Main thread, inside a transaction.
pub unsafe fn current_table_from_rotation() -> usize {
    let relid = relation(c"rotation");
    let mut current = None;
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        if (*desc).natts < 2 {
            broken("outbox.rotation has an unexpected shape");
        }
        let snapshot = pg_sys::GetLatestSnapshot();
        let flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE;
        let scan = pg_sys::heap_beginscan(rel, snapshot, 0, std::ptr::null_mut(), std::ptr::null_mut(), flags);
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let one = std::num::NonZeroUsize::new(1).expect("1");
            let two = std::num::NonZeroUsize::new(2).expect("2");
            let table = pgrx::htup::heap_getattr_raw(tuple, one, desc).map(|d| d.value() as i16);
            let is_current = pgrx::htup::heap_getattr_raw(tuple, two, desc).is_some_and(|d| d.value() & 0xff != 0);
            if is_current {
                current = table;
            }
        }
        pg_sys::heap_endscan(scan);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    match current {
        Some(0) => 0,
        Some(1) => 1,
        _ => broken("outbox.rotation names no current events table"),
    }
}

/// Insert `row` into outbox.events_`table` as the current command.
///
/// # Safety
/// Main thread, inside a transaction; datums valid for the call.
pub unsafe fn insert(table: usize, row: &Row) {
    let relid = relation(if table == 0 { c"events_0" } else { c"events_1" });
    let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    unsafe {
        let rel = pg_sys::table_open(relid, lock);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        if !matches!(natts, COLUMNS | COLUMNS_0_1_0) || !(*rel).trigdesc.is_null() {
            broken("its events table has an unexpected shape");
        }
        let values: [Datum; COLUMNS] = [
            Datum::from(row.txid),
            Datum::from(row.n),
            row.id,
            row.topic,
            row.key.unwrap_or(Datum::from(0)),
            row.event_type.unwrap_or(Datum::from(0)),
            row.payload,
            row.headers,
            Datum::from(row.created_at),
            Datum::from(row.size),
        ];
        let mut nulls = [false; COLUMNS];
        nulls[4] = row.key.is_none();
        nulls[5] = row.event_type.is_none();
        // heap_form_tuple reads natts values: with the 0.1.0 layout, all
        // but `size`.
        let tuple = pg_sys::heap_form_tuple(desc, values.as_ptr().cast_mut(), nulls.as_mut_ptr());
        // Uses the current command id, toasts large values, logs WAL and
        // counts the insert, like the executor's insert.
        pg_sys::simple_heap_insert(rel, tuple);

        let indexes = pg_sys::RelationGetIndexList(rel);
        if !indexes.is_null() {
            for i in 0..(*indexes).length {
                let index_oid = (*(*indexes).elements.add(i as usize)).oid_value;
                let index = pg_sys::index_open(index_oid, lock);
                let info = pg_sys::BuildIndexInfo(index);
                if !(*info).ii_Expressions.is_null() || !(*info).ii_Predicate.is_null() {
                    broken("an index on its events table is not a plain column index");
                }
                let keys = (*info).ii_NumIndexAttrs as usize;
                let mut index_values = vec![Datum::from(0); keys];
                let mut index_nulls = vec![false; keys];
                for k in 0..keys {
                    let attno = (*info).ii_IndexAttrNumbers[k] as usize;
                    index_values[k] = values[attno - 1];
                    index_nulls[k] = nulls[attno - 1];
                }
                let check = if (*info).ii_Unique {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
                } else {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
                };
                pg_sys::index_insert(
                    index,
                    index_values.as_mut_ptr(),
                    index_nulls.as_mut_ptr(),
                    &raw mut (*tuple).t_self,
                    rel,
                    check,
                    false,
                    info,
                );
                pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
            }
            pg_sys::list_free(indexes);
        }
        pg_sys::heap_freetuple(tuple);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}
