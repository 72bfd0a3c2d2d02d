//! The row trigger behind `outbox.capture()`: inserts, updates and deletes
//! of a captured table become events in the writing transaction.
//!
//! It runs with the rights of whoever writes the table, never more: turning
//! a row into JSON may run code the table's owner wrote (a cast to json of
//! one of their types), and such code must never run with the extension
//! owner's rights. The event row is then written the way `outbox_emit`
//! writes it (emit::write), so writers of a captured table publish its
//! changes without being granted the writer role.

use super::emit::{self, NewEvent};
use crate::error::{OrRaise, SqlError};
use crate::{config, search_path};
use pgrx::pg_sys::{self, Datum};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

extension_sql!(
    r#"
-- The capture trigger (src/write/capture.rs). Not SECURITY DEFINER: it runs as
-- the writer of the table. Its arguments: topic, key columns (a text[]
-- literal), captured columns (a text[] literal, or empty for all).
CREATE FUNCTION outbox._capture_row() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_capture_row';
"#,
    name = "capture_row",
    requires = ["schema"]
);

/// The event of one row change: the payload (NULL for an update that
/// changed none of the captured columns) and the key. Built-ins only, all
/// named in pg_catalog, run with the search_path pinned.
/// $1 operation, $2 schema, $3 table, $4 OLD and $5 NEW (the table's row
/// type), $6 key columns and $7 captured columns (text[] literals, '' for
/// all columns).
const EVENT_SQL: &str = "
WITH r AS (SELECT pg_catalog.to_jsonb($4) AS b, pg_catalog.to_jsonb($5) AS a,
                  $6::pg_catalog.text[] AS keys, nullif($7, '')::pg_catalog.text[] AS cols),
     f AS (SELECT CASE WHEN r.cols IS NULL THEN r.b
                       ELSE (SELECT pg_catalog.jsonb_object_agg(e.k, e.v) FROM pg_catalog.jsonb_each(r.b) AS e(k, v)
                             WHERE e.k = ANY (r.cols)) END AS b,
                  CASE WHEN r.cols IS NULL THEN r.a
                       ELSE (SELECT pg_catalog.jsonb_object_agg(e.k, e.v) FROM pg_catalog.jsonb_each(r.a) AS e(k, v)
                             WHERE e.k = ANY (r.cols)) END AS a
           FROM r)
SELECT CASE WHEN $1 = 'update' AND r.cols IS NOT NULL AND f.b IS NOT DISTINCT FROM f.a THEN NULL
            ELSE pg_catalog.jsonb_build_object('op', $1, 'schema', $2, 'table', $3, 'before', f.b, 'after', f.a)
       END,
       CASE WHEN pg_catalog.cardinality(r.keys) = 1 THEN coalesce(r.a, r.b) ->> r.keys[1]
            ELSE (SELECT pg_catalog.jsonb_agg(coalesce(r.a, r.b) -> u.k ORDER BY u.o)
                  FROM pg_catalog.unnest(r.keys) WITH ORDINALITY AS u(k, o))::pg_catalog.text
       END
FROM r, f";

thread_local! {
    /// EVENT_SQL planned once per row type, for the backend's life.
    static PLANS: RefCell<HashMap<u32, pg_sys::SPIPlanPtr>> = RefCell::new(HashMap::new());
}

fn fail(message: impl Into<String>) -> ! {
    SqlError::new(PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION, message)
        .hint("outbox._capture_row is attached by outbox.capture(); call that instead of CREATE TRIGGER.")
        .raise()
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_outbox_capture_row() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// # Safety
/// Called by the trigger manager.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_capture_row(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    let context = unsafe { (*fcinfo).context };
    if context.is_null() || unsafe { (*context).type_ } != pg_sys::NodeTag::T_TriggerData {
        fail("outbox._capture_row can only run as a trigger");
    }
    let data = context as *mut pg_sys::TriggerData;
    let (event, trigger, rel) = unsafe { ((*data).tg_event, (*data).tg_trigger, (*data).tg_relation) };
    if event & pg_sys::TRIGGER_EVENT_ROW == 0 || event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER
    {
        fail("outbox._capture_row must be an AFTER ... FOR EACH ROW trigger");
    }
    let (op, old, new) = unsafe {
        match event & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => ("insert", std::ptr::null_mut(), (*data).tg_trigtuple),
            pg_sys::TRIGGER_EVENT_UPDATE => ("update", (*data).tg_trigtuple, (*data).tg_newtuple),
            pg_sys::TRIGGER_EVENT_DELETE => ("delete", (*data).tg_trigtuple, std::ptr::null_mut()),
            _ => fail("outbox._capture_row captures inserts, updates and deletes"),
        }
    };
    let args: Vec<String> = unsafe {
        let n = (*trigger).tgnargs as usize;
        (0..n).map(|i| CStr::from_ptr(*(*trigger).tgargs.add(i)).to_string_lossy().into_owned()).collect()
    };
    let [topic, key_columns, columns] = args.as_slice() else {
        fail("outbox._capture_row takes three arguments");
    };

    let desc = unsafe { (*rel).rd_att };
    let row_type = unsafe { (*desc).tdtypeid };
    let schema = unsafe {
        let ns = pg_sys::get_namespace_name((*(*rel).rd_rel).relnamespace);
        CStr::from_ptr(ns).to_string_lossy().into_owned()
    };
    let table = unsafe { pgrx::name_data_to_str(&(*(*rel).rd_rel).relname).to_string() };
    let composite =
        |tuple: pg_sys::HeapTuple| (!tuple.is_null()).then(|| unsafe { pg_sys::heap_copy_tuple_as_datum(tuple, desc) });
    let (old, new) = (composite(old), composite(new));

    let Some((payload, key)) =
        search_path::pinned(|| unsafe { build_event(row_type, [op, &schema, &table], old, new, key_columns, columns) })
    else {
        return Datum::from(0); // nothing changed that is captured
    };

    let place = || format!("outbox capture of {schema}.{table}");
    emit::check_payload_size(payload, &place());
    config::check_topic(topic).map_err(|e| e.in_function(&place())).or_raise();
    config::check_key_and_type(key.as_deref(), None).map_err(|e| e.in_function(&place())).or_raise();
    let text = |s: &str| s.into_datum().expect("text is never null");
    let event = NewEvent {
        topic: text(topic),
        payload,
        key: key.as_deref().map(text),
        event_type: Some(text(op)),
        headers: None,
        size: unsafe { pg_sys::toast_raw_datum_size(payload) } + topic.len() + key.map_or(0, |k| k.len()) + 8,
    };
    // SAFETY: main thread, in the writer's transaction.
    unsafe { emit::write(event) };
    Datum::from(0)
}

/// Run EVENT_SQL through SPI; returns the payload (copied out of SPI's
/// memory) and the key, or None when the change is not news.
///
/// # Safety
/// Main thread, inside a transaction; `old`/`new` are composite datums of
/// `row_type`.
unsafe fn build_event(
    row_type: pg_sys::Oid,
    names: [&str; 3],
    old: Option<Datum>,
    new: Option<Datum>,
    key_columns: &str,
    columns: &str,
) -> Option<(Datum, Option<String>)> {
    use pg_sys::TEXTOID;
    let texts: Vec<CString> = names
        .iter()
        .chain([&key_columns, &columns])
        .map(|s| CString::new(*s).unwrap_or_else(|_| fail("a name contains a NUL character")))
        .collect();
    let text = |i: usize| unsafe { Datum::from(pg_sys::cstring_to_text(texts[i].as_ptr())) };
    let mut values =
        [text(0), text(1), text(2), old.unwrap_or(Datum::from(0)), new.unwrap_or(Datum::from(0)), text(3), text(4)];
    let nulls: [std::ffi::c_char; 7] = [
        b' ' as _,
        b' ' as _,
        b' ' as _,
        if old.is_some() { b' ' } else { b'n' } as _,
        if new.is_some() { b' ' } else { b'n' } as _,
        b' ' as _,
        b' ' as _,
    ];
    unsafe {
        if pg_sys::SPI_connect() < 0 {
            fail("could not connect to SPI");
        }
        let plan = PLANS.with(|plans| {
            *plans.borrow_mut().entry(row_type.to_u32()).or_insert_with(|| {
                let sql = CString::new(EVENT_SQL).expect("no NUL");
                let mut types = [TEXTOID, TEXTOID, TEXTOID, row_type, row_type, TEXTOID, TEXTOID];
                let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
                if plan.is_null() {
                    fail("could not plan the capture query");
                }
                pg_sys::SPI_keepplan(plan);
                plan
            })
        });
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 1);
        if rc != pg_sys::SPI_OK_SELECT as i32 || pg_sys::SPI_processed != 1 {
            fail("the capture query returned no row");
        }
        let table = pg_sys::SPI_tuptable;
        let tuple = *(*table).vals;
        let mut null = false;
        let payload = pg_sys::SPI_getbinval(tuple, (*table).tupdesc, 1, &mut null);
        let payload = (!null).then(|| pg_sys::SPI_datumTransfer(payload, false, -1));
        let key = pg_sys::SPI_getbinval(tuple, (*table).tupdesc, 2, &mut null);
        let key = (!null).then(|| String::from_datum(key, false)).flatten();
        pg_sys::SPI_finish();
        payload.map(|p| (p, key))
    }
}

/// Whether `sql` is exactly one `CREATE TRIGGER` statement that calls
/// `outbox._capture_row` with `args`, with a WHEN clause if and only if
/// `with_when`. capture() builds its statement from a user's condition;
/// parsing it the way the server will proves the condition stayed an
/// expression (no second statement, no other function).
pub fn is_capture_trigger(sql: &str, with_when: bool, args: &[String]) -> bool {
    let Ok(text) = CString::new(sql) else { return false };
    // SAFETY: the raw parser only allocates in the current memory context;
    // a syntax error is raised as an SQL error.
    unsafe {
        let list = pg_sys::raw_parser(text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if list.is_null() || (*list).length != 1 {
            return false;
        }
        let raw = (*(*list).elements).ptr_value as *mut pg_sys::RawStmt;
        let stmt = (*raw).stmt;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_CreateTrigStmt {
            return false;
        }
        let stmt = stmt as *mut pg_sys::CreateTrigStmt;
        strings((*stmt).funcname) == ["outbox", "_capture_row"]
            && strings((*stmt).args) == args
            && (*stmt).whenClause.is_null() != with_when
            && (*stmt).row
    }
}

/// The strings of a list of String nodes (names, trigger arguments).
unsafe fn strings(list: *mut pg_sys::List) -> Vec<String> {
    if list.is_null() {
        return Vec::new();
    }
    let mut out = Vec::new();
    unsafe {
        for i in 0..(*list).length as usize {
            let node = (*(*list).elements.add(i)).ptr_value as *mut pg_sys::Node;
            #[cfg(any(feature = "pg13", feature = "pg14"))]
            let s = (*(node as *mut pg_sys::Value)).val.str_;
            #[cfg(not(any(feature = "pg13", feature = "pg14")))]
            let s = (*(node as *mut pg_sys::String)).sval;
            if s.is_null() {
                out.push(String::new());
            } else {
                out.push(CStr::from_ptr(s).to_string_lossy().into_owned());
            }
        }
    }
    out
}
