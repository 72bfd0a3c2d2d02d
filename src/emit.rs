//! `outbox_emit`: the write path. Runs in the caller's transaction, so the
//! event exists exactly when that transaction commits.
//!
//! Written against the raw fmgr interface rather than `#[pg_extern]` so the
//! payload `jsonb` goes into the row as the caller's datum: no round trip
//! through text and serde on the hot path; the row is written directly
//! (events.rs).
//!
//! Writers may call it but have no rights on the events tables: the write
//! does not go through the executor's permission checks. (SECURITY DEFINER
//! would do the same, but measured here the function manager's SECURITY
//! DEFINER path cost 12 % of a whole write transaction.)

use crate::config;
use crate::error::{OrRaise, SqlError};
use crate::{events, guc, shmem, xact};
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
"#,
    name = "emit",
    requires = ["schema"]
);

/// Runs the enclosed work as another role; restores the caller's role when
/// dropped (also when an error unwinds; a transaction abort would restore it
/// too).
struct AsRole {
    user: pg_sys::Oid,
    context: i32,
}

impl AsRole {
    fn switch_to(role: pg_sys::Oid) -> AsRole {
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        // SAFETY: plain reads and writes of the backend's current user.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            pg_sys::SetUserIdAndSecContext(role, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        }
        AsRole { user, context }
    }
}

impl Drop for AsRole {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}

/// Which events table is current, from outbox.rotation (read as the
/// extension's owner: writers have no rights on it).
fn current_table_from_sql() -> usize {
    Spi::connect(|client| {
        let owner = client
            .select("SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'outbox'", Some(1), &[])
            .and_then(|t| t.first().get_one::<pg_sys::Oid>())
            .ok()
            .flatten()
            .unwrap_or(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID));
        let _as_owner = AsRole::switch_to(owner);
        client
            .select("SELECT slot::int4 FROM outbox.rotation WHERE current", Some(1), &[])
            .and_then(|t| t.first().get_one::<i32>())
            .ok()
            .flatten()
            .unwrap_or(0) as usize
    })
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
    let size = unsafe { pg_sys::toast_raw_datum_size(payload) };
    let max = guc::MAX_PAYLOAD_SIZE.get().max(0) as usize;
    if size > max {
        SqlError::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("outbox_emit: payload is {size} bytes, more than outbox.max_payload_size ({max} bytes)"),
        )
        .hint("Send a reference to large data instead, or raise outbox.max_payload_size.")
        .raise();
    }

    let headers = if unsafe { pg_arg_is_null(fcinfo, 4) } {
        None
    } else {
        // Headers are small; reading them through serde is fine.
        let value: pgrx::JsonB = unsafe { pg_getarg(fcinfo, 4) }.expect("checked for null above");
        config::check_event_headers(&value.0).map_err(|e| e.in_function("outbox_emit")).or_raise();
        Some(unsafe { pg_getarg_datum_raw(fcinfo, 4) })
    };

    // SAFETY: assigns a transaction id if the caller had none yet; the event
    // belongs to the caller's top-level transaction.
    let txid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
    let n = xact::next_event_number(txid);
    let txid = txid as i64;
    let id = pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes());

    // The worker publishes the current events table in shared memory;
    // without a worker (or right after CREATE EXTENSION) ask the table. The
    // transaction id was taken above, before this read: rotation relies on
    // that order.
    let table = shmem::events_table(unsafe { pg_sys::MyDatabaseId }).unwrap_or_else(current_table_from_sql);
    let arg = |i: usize| unsafe { (!pg_arg_is_null(fcinfo, i)).then(|| pg_getarg_datum_raw(fcinfo, i)) };
    let row = events::Row {
        txid,
        n,
        id: id.into_datum().expect("a uuid is never null"),
        topic: unsafe { pg_getarg_datum_raw(fcinfo, 0) },
        key: arg(2),
        event_type: arg(3),
        payload,
        headers: headers.unwrap_or_else(|| pgrx::JsonB(serde_json::json!({})).into_datum().expect("not null")),
        created_at: unsafe { pg_sys::GetCurrentTransactionStartTimestamp() },
    };
    // SAFETY: main thread, in the caller's transaction; the datums are the
    // caller's arguments or allocated in this call's memory context.
    unsafe { events::insert(table.min(1), &row) };

    id.into_datum().expect("a uuid is never null")
}
