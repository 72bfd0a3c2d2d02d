//! `outbox_emit`: the write path. Runs in the caller's transaction, so the
//! event exists exactly when that transaction commits.
//!
//! Written against the raw fmgr interface rather than `#[pg_extern]` so the
//! payload `jsonb` goes to the INSERT as the caller's datum: no round trip
//! through text and serde on the hot path.

use crate::config;
use crate::error::{OrRaise, SqlError};
use crate::{guc, shmem, xact};
use pgrx::datum::DatumWithOid;
use pgrx::fcinfo::{pg_arg_is_null, pg_getarg, pg_getarg_datum_raw};
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use std::cell::OnceCell;

extension_sql!(
    r#"
CREATE FUNCTION outbox_emit(
    topic      text,
    payload    jsonb,
    key        text  DEFAULT NULL,
    event_type text  DEFAULT NULL,
    headers    jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE c VOLATILE PARALLEL UNSAFE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'outbox_emit';

COMMENT ON FUNCTION outbox_emit(text, jsonb, text, text, jsonb) IS
'Emit an event in the current transaction; returns its id. Delivered after commit, in order per key.';
"#,
    name = "emit",
    requires = ["schema"]
);

/// One INSERT per events table (see the rotation in sql/schema.sql).
const INSERTS: [&str; 2] = [
    "INSERT INTO outbox.events_0 (txid, n, id, topic, key, type, payload, headers) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    "INSERT INTO outbox.events_1 (txid, n, id, topic, key, type, payload, headers) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
];
const CURRENT_TABLE: &str = "SELECT slot::int4 FROM outbox.rotation WHERE current";

/// Statements planned once per backend.
struct Plans {
    current_table: OnceCell<OwnedPreparedStatement>,
    inserts: [OnceCell<OwnedPreparedStatement>; 2],
}

thread_local! {
    static PLANS: Plans = const {
        Plans { current_table: OnceCell::new(), inserts: [OnceCell::new(), OnceCell::new()] }
    };
}

fn kept<'a>(
    client: &pgrx::spi::SpiClient<'_>,
    cell: &'a OnceCell<OwnedPreparedStatement>,
    sql: &str,
    args: &[PgOid],
) -> &'a OwnedPreparedStatement {
    if cell.get().is_none() {
        let plan = client.prepare_mut(sql, args).unwrap_or_else(|e| panic!("preparing {sql:?}: {e}")).keep();
        let _ = cell.set(plan);
    }
    cell.get().expect("just set")
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
    config::check_topic(topic).map_err(|e| prefixed(e, "outbox_emit")).or_raise();

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
        config::check_event_headers(&value.0).map_err(|e| prefixed(e, "outbox_emit")).or_raise();
        Some(unsafe { pg_getarg_datum_raw(fcinfo, 4) })
    };

    // SAFETY: assigns a transaction id if the caller had none yet; the event
    // belongs to the caller's top-level transaction.
    let txid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
    let n = xact::next_event_number(txid);
    let txid = txid as i64;
    let id = pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes());

    let text_arg = |i: usize| unsafe {
        if pg_arg_is_null(fcinfo, i) {
            DatumWithOid::null_oid(pg_sys::TEXTOID)
        } else {
            DatumWithOid::new(pg_getarg_datum_raw(fcinfo, i), pg_sys::TEXTOID)
        }
    };
    let args = unsafe {
        [
            DatumWithOid::from(txid),
            DatumWithOid::from(n),
            DatumWithOid::from(id),
            DatumWithOid::new(pg_getarg_datum_raw(fcinfo, 0), pg_sys::TEXTOID),
            text_arg(2),
            text_arg(3),
            DatumWithOid::new(payload, pg_sys::JSONBOID),
            match headers {
                Some(h) => DatumWithOid::new(h, pg_sys::JSONBOID),
                None => DatumWithOid::from(pgrx::JsonB(serde_json::json!({}))),
            },
        ]
    };

    Spi::connect_mut(|client| {
        PLANS.with(|plans| {
            // The worker publishes the current table in shared memory;
            // without a worker (or right after CREATE EXTENSION) ask the
            // table. The transaction id was taken before this read: the
            // rotation relies on that order.
            let table = shmem::events_table(unsafe { pg_sys::MyDatabaseId }).unwrap_or_else(|| {
                let plan = kept(client, &plans.current_table, CURRENT_TABLE, &[]);
                let found = client.update(plan, Some(1), &[]).and_then(|t| t.first().get_one::<i32>());
                found.ok().flatten().unwrap_or(0) as usize
            });
            let oids = [
                PgOid::from(pg_sys::INT8OID),
                PgOid::from(pg_sys::INT4OID),
                PgOid::from(pg_sys::UUIDOID),
                PgOid::from(pg_sys::TEXTOID),
                PgOid::from(pg_sys::TEXTOID),
                PgOid::from(pg_sys::TEXTOID),
                PgOid::from(pg_sys::JSONBOID),
                PgOid::from(pg_sys::JSONBOID),
            ];
            let table = table.min(1);
            let plan = kept(client, &plans.inserts[table], INSERTS[table], &oids);
            client.update(plan, None, &args).expect("insert into outbox events");
        })
    });

    id.into_datum().expect("a uuid is never null")
}

fn prefixed(e: config::ConfigError, function: &str) -> config::ConfigError {
    config::ConfigError { message: format!("{function}: {}", e.message), hint: e.hint }
}
