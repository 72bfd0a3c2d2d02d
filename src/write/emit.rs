//! `outbox_emit`: the write path. Runs in the caller's transaction, so the
//! event exists exactly when that transaction commits.
//!
//! Written against the raw fmgr interface rather than `#[pg_extern]` so the
//! payload `jsonb` goes into the row as the caller's datum: no round trip
//! through text and serde on the hot path; the row is written directly
//! (heap.rs).
//!
//! Writers may call it but have no rights on the events tables: the write
//! does not go through the executor's permission checks. (SECURITY DEFINER
//! would do the same, but measured here the function manager's SECURITY
//! DEFINER path cost 12 % of a whole write transaction.) Nothing here runs
//! SQL: no name the caller could plant (types, functions, operators in a
//! schema of the caller's search_path) is ever looked up with more rights
//! than the caller has.

use super::{commit, heap};
use crate::config;
use crate::error::{OrRaise, SqlError};
use crate::{guc, shmem};
use pgrx::fcinfo::{pg_arg_is_null, pg_getarg, pg_getarg_datum_raw};
use pgrx::pg_sys;
use pgrx::prelude::*;

extension_sql!(
    r#"
CREATE FUNCTION outbox_emit(
    topic      text,
    payload    jsonb,
    key        text  DEFAULT NULL,
    event_type text  DEFAULT NULL,
    headers    jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'outbox_emit';

COMMENT ON FUNCTION outbox_emit(text, jsonb, text, text, jsonb) IS
'Emit an event in the current transaction; returns its id. Delivered after commit, in order per key.';

-- The same function in schema outbox, where only the extension creates
-- objects: a call written outbox.emit(...) cannot be taken over by a
-- function someone created in the extension's schema (see
-- docs/security.md).
CREATE FUNCTION outbox.emit(
    topic      text,
    payload    jsonb,
    key        text  DEFAULT NULL,
    event_type text  DEFAULT NULL,
    headers    jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'outbox_emit';

COMMENT ON FUNCTION outbox.emit(text, jsonb, text, text, jsonb) IS
'outbox_emit, in schema outbox: call it schema-qualified where others can create functions in the extension''s schema.';
"#,
    name = "emit",
    requires = ["schema"]
);

/// Raise an error unless the jsonb `payload` fits outbox.max_payload_size;
/// returns its size (uncompressed). `place` names the caller in the
/// message.
pub fn check_payload_size(payload: pg_sys::Datum, place: &str) -> usize {
    // SAFETY: a jsonb datum of the caller.
    let size = unsafe { pg_sys::toast_raw_datum_size(payload) };
    let max = guc::MAX_PAYLOAD_SIZE.get().max(0) as usize;
    if size > max {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("{place}: payload is {size} bytes, more than outbox.max_payload_size ({max} bytes)"),
        )
        .hint("Send a reference to large data instead, or raise outbox.max_payload_size.")
        .raise();
    }
    size
}

/// A checked event, as datums valid for the current call.
pub struct NewEvent {
    pub topic: pg_sys::Datum,
    pub payload: pg_sys::Datum,
    pub key: Option<pg_sys::Datum>,
    pub event_type: Option<pg_sys::Datum>,
    /// None: an empty object.
    pub headers: Option<pg_sys::Datum>,
    /// Bytes the event takes once read (payload uncompressed, plus key, type
    /// and headers): what the worker counts against its memory window.
    pub size: usize,
}

/// Write `event` into the current events table, in the current top-level
/// transaction; returns its id.
///
/// # Safety
/// Main thread, inside a read-write transaction; the datums are valid.
pub unsafe fn write(event: NewEvent) -> pgrx::Uuid {
    // Assigns a transaction id if the caller had none yet; the event
    // belongs to the caller's top-level transaction.
    let txid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
    let n = commit::next_event_number(txid);
    let id = pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes());

    // The worker publishes the current events table in shared memory;
    // without a worker (or right after CREATE EXTENSION) read the rotation
    // row itself. The transaction id was taken above, before this read:
    // rotation relies on that order.
    let table = shmem::events_table(unsafe { pg_sys::MyDatabaseId })
        .unwrap_or_else(|| unsafe { heap::current_table_from_rotation() });
    let row = heap::Row {
        txid: txid as i64,
        n,
        id: id.into_datum().expect("a uuid is never null"),
        topic: event.topic,
        key: event.key,
        event_type: event.event_type,
        payload: event.payload,
        headers: event.headers.unwrap_or_else(|| pgrx::JsonB(serde_json::json!({})).into_datum().expect("not null")),
        created_at: unsafe { pg_sys::GetCurrentTransactionStartTimestamp() },
        size: event.size.min(i32::MAX as usize) as i32,
    };
    unsafe { heap::insert(table.min(1), &row) };
    id
}

/// Raise the error INSERT would raise on a hot standby or in a read-only
/// transaction, with a hint.
pub fn refuse_read_only() {
    // SAFETY: plain reads of backend state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        SqlError::new(PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION, "outbox_emit: cannot emit on a hot standby")
            .hint("Emit on the primary, in the transaction that writes the business rows.")
            .raise();
    }
    if unsafe { pg_sys::XactReadOnly } {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "outbox_emit: cannot emit in a read-only transaction",
        )
        .hint("An event is a write: emit in a read-write transaction, like the INSERT it goes with.")
        .raise();
    }
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_outbox_emit() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// # Safety
/// Called by the function manager with the five arguments declared above.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_emit(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    if !shmem::available() {
        SqlError::new(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "outbox is not loaded at server start")
            .hint("Add 'outbox' to shared_preload_libraries in postgresql.conf and restart the server.")
            .raise();
    }

    // Like INSERT: no writes on a standby or in a read-only transaction.
    refuse_read_only();

    let topic: &str = unsafe { pg_getarg(fcinfo, 0) }.unwrap_or_else(|| {
        SqlError::new(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "outbox_emit: topic must not be null")
            .hint("Pass the event's topic, e.g. outbox_emit('orders.created', payload).")
            .raise()
    });
    config::check_topic(topic).map_err(|e| e.in_function("outbox_emit")).or_raise();

    if unsafe { pg_arg_is_null(fcinfo, 1) } {
        SqlError::new(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "outbox_emit: payload must not be null")
            .hint("Pass 'null'::jsonb to send a JSON null.")
            .raise();
    }
    let payload = unsafe { pg_getarg_datum_raw(fcinfo, 1) };
    let size = check_payload_size(payload, "outbox_emit");

    let key: Option<&str> = unsafe { pg_getarg(fcinfo, 2) };
    let event_type: Option<&str> = unsafe { pg_getarg(fcinfo, 3) };
    config::check_key_and_type(key, event_type).map_err(|e| e.in_function("outbox_emit")).or_raise();

    let (headers, headers_size) = if unsafe { pg_arg_is_null(fcinfo, 4) } {
        (None, 2)
    } else {
        // Headers are small; reading them through serde is fine.
        let value: pgrx::JsonB = unsafe { pg_getarg(fcinfo, 4) }.expect("checked for null above");
        config::check_event_headers(&value.0).map_err(|e| e.in_function("outbox_emit")).or_raise();
        let datum = unsafe { pg_getarg_datum_raw(fcinfo, 4) };
        (Some(datum), unsafe { pg_sys::toast_raw_datum_size(datum) })
    };

    let arg = |i: usize| unsafe { (!pg_arg_is_null(fcinfo, i)).then(|| pg_getarg_datum_raw(fcinfo, i)) };
    let event = NewEvent {
        topic: unsafe { pg_getarg_datum_raw(fcinfo, 0) },
        payload,
        key: arg(2),
        event_type: arg(3),
        headers,
        size: size + topic.len() + key.map_or(0, str::len) + event_type.map_or(0, str::len) + headers_size,
    };
    // SAFETY: main thread, in the caller's transaction; the datums are the
    // caller's arguments.
    let id = unsafe { write(event) };
    id.into_datum().expect("a uuid is never null")
}
