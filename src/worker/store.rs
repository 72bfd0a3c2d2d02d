//! The worker's SQL about endpoints and their progress. Every function runs
//! inside a transaction opened by the caller and never waits on the
//! network.

use super::error::Result;
use super::stream::Cursor;
use crate::installation::LIBRARY_VERSION;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use pgrx::JsonB;

/// An endpoint row with its progress.
pub struct EndpointRow {
    pub id: i32,
    pub name: String,
    pub url: String,
    pub kind: String,
    pub topics: Vec<String>,
    pub like: Vec<String>,
    pub options: serde_json::Value,
    pub active: bool,
    /// When resume_endpoint last ran (seconds since the epoch).
    pub resumed_at: Option<f64>,
    pub cursor: Cursor,
}

/// What the worker learned about one endpoint since it last wrote.
#[derive(Debug, Default)]
pub struct ProgressUpdate {
    pub endpoint_id: i32,
    pub cursor: Option<Cursor>,
    pub delivered: i64,
    pub failed_attempts: i64,
    pub in_flight: i32,
    pub retrying: i32,
    pub succeeded: bool,
    pub last_error: Option<String>,
    pub latency_ms: Option<(f64, f64)>,
    pub inexact_batches: i64,
}

/// The oid of the outbox extension in this database, if it is created,
/// held for the rest of the transaction: a lock on one of its tables keeps
/// DROP EXTENSION from completing meanwhile, so every later statement of
/// the transaction (each with a snapshot of its own) sees the same
/// installation. Without it, a reinstall committing in the middle of a
/// step would have the old state written into the new tables.
///
/// An installation of another version (0.1.0 after this library was
/// installed, before ALTER EXTENSION outbox UPDATE) counts as none: its
/// tables are not the ones this worker knows. Its version is returned
/// alongside, for the log.
pub fn pin_extension() -> Result<(Option<u32>, Option<String>)> {
    // Catalog reads through the index and a lock, no SQL: this runs every
    // step, and parsing and planning three statements was a fifth of the
    // worker's main thread under load.
    let (oid, version) = crate::installation::installed();
    if oid.is_none() || version.as_deref() != Some(LIBRARY_VERSION) {
        return Ok((None, version));
    }
    // SAFETY: in a transaction; names looked up in the catalogs.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
        let rotation = pg_sys::get_relname_relid(c"rotation".as_ptr(), schema);
        if rotation == pg_sys::InvalidOid {
            return Ok((None, version));
        }
        pg_sys::LockRelationOid(rotation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    let (oid, version) = crate::installation::installed();
    Ok((oid.filter(|_| version.as_deref() == Some(LIBRARY_VERSION)), version))
}

/// Give endpoints created since the last look their first tick: the latest
/// tick that does not see the creating transaction as committed, so every
/// event committed after the endpoint was created is in a later batch.
///
/// That tick exists: until the creating transaction commits it is the
/// latest tick (never dropped), and from the commit on, neither ticks nor
/// events tables are dropped while an endpoint has not started (see
/// ticks::drop_old and rotation.rs). Before the extension's own transaction
/// commits, tick 0 lists it as in progress.
pub fn start_new_endpoints() -> Result<()> {
    // An endpoint without progress came from pg_restore (progress is not
    // dumped): it starts clean, with what commits after this transaction.
    Spi::run(
        "INSERT INTO outbox.progress (endpoint_id, tick, start_xid)
         SELECT e.id, NULL, pg_catalog.pg_current_xact_id()::pg_catalog.text::pg_catalog.int8
         FROM outbox.endpoints AS e
         WHERE NOT EXISTS (SELECT FROM outbox.progress AS p WHERE p.endpoint_id = e.id)",
    )?;
    Spi::run(
        "UPDATE outbox.progress AS p
         SET tick = coalesce((SELECT pg_catalog.max(t.id) FROM outbox.ticks AS t
                              WHERE p.start_xid >= t.snap_xmax OR p.start_xid = ANY (t.snap_xip)),
                             (SELECT pg_catalog.min(t.id) FROM outbox.ticks AS t))
         WHERE p.tick IS NULL",
    )?;
    Ok(())
}

/// Every endpoint with its progress.
pub fn load_endpoints() -> Result<Vec<EndpointRow>> {
    Ok(Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT e.id, e.name, e.url, e.kind, e.topics, outbox._like_patterns(e.topics), e.options,
                    NOT e.paused AND e.disabled_reason IS NULL,
                    p.tick, p.after_rank, p.after_n, extract(epoch FROM e.resumed_at)::pg_catalog.float8
             FROM outbox.endpoints AS e JOIN outbox.progress AS p ON p.endpoint_id = e.id
             WHERE p.tick IS NOT NULL
             ORDER BY e.id",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for row in rows {
            let after = match (row.get::<i64>(10)?, row.get::<i32>(11)?) {
                (Some(t), Some(n)) => Some((t, n)),
                _ => None,
            };
            out.push(EndpointRow {
                id: row.get(1)?.unwrap_or_default(),
                name: row.get(2)?.unwrap_or_default(),
                url: row.get(3)?.unwrap_or_default(),
                kind: row.get(4)?.unwrap_or_default(),
                topics: row.get(5)?.unwrap_or_default(),
                like: row.get(6)?.unwrap_or_default(),
                options: row.get::<JsonB>(7)?.map(|j| j.0).unwrap_or_default(),
                active: row.get(8)?.unwrap_or(false),
                resumed_at: row.get(12)?,
                cursor: Cursor { tick: row.get(9)?.unwrap_or_default(), after },
            });
        }
        SpiResult::Ok(out)
    })?)
}

/// Record an error of the worker's own on an endpoint (its step failed).
pub fn report_error(endpoint_id: i32, message: &str) -> Result<()> {
    Spi::run_with_args(
        "UPDATE outbox.progress SET last_error = $2, last_error_at = pg_catalog.now() WHERE endpoint_id = $1",
        &[endpoint_id.into(), message.into()],
    )?;
    Ok(())
}

/// Write an endpoint's progress and figures.
pub fn save_progress(client: &mut SpiClient<'_>, u: &ProgressUpdate) -> SpiResult<()> {
    let (tick, after_rank, after_n) = match u.cursor {
        Some(c) => (Some(c.tick), c.after.map(|a| a.0), c.after.map(|a| a.1)),
        None => (None, None, None),
    };
    let (p50, p99) = match u.latency_ms {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    use pg_sys::{BOOLOID, FLOAT8OID, INT4OID, INT8OID, TEXTOID};
    // Prepared once: it runs for every endpoint on every step.
    let plan = super::stream::prepared(
        client,
        SAVE_PROGRESS,
        &[
            INT4OID, INT8OID, INT8OID, INT4OID, INT8OID, INT8OID, INT4OID, INT4OID, BOOLOID, TEXTOID, FLOAT8OID,
            FLOAT8OID, INT8OID,
        ],
    )?;
    client.update(
        &*plan,
        None,
        &[
            u.endpoint_id.into(),
            tick.into(),
            after_rank.into(),
            after_n.into(),
            u.delivered.into(),
            u.failed_attempts.into(),
            u.in_flight.into(),
            u.retrying.into(),
            u.succeeded.into(),
            u.last_error.clone().into(),
            p50.into(),
            p99.into(),
            u.inexact_batches.into(),
        ],
    )?;
    Ok(())
}

const SAVE_PROGRESS: &str = "UPDATE outbox.progress SET
             tick = coalesce($2, tick),
             after_rank = CASE WHEN $2 IS NULL THEN after_rank ELSE $3 END,
             after_n = CASE WHEN $2 IS NULL THEN after_n ELSE $4 END,
             delivered = delivered + $5,
             failed_attempts = failed_attempts + $6,
             in_flight = $7,
             retrying = $8,
             last_success_at = CASE WHEN $9 THEN pg_catalog.now() ELSE last_success_at END,
             last_error = coalesce($10, last_error),
             last_error_at = CASE WHEN $10 IS NULL THEN last_error_at ELSE pg_catalog.now() END,
             latency_p50_ms = coalesce($11, latency_p50_ms),
             latency_p99_ms = coalesce($12, latency_p99_ms),
             inexact_batches = inexact_batches + $13,
             updated_at = pg_catalog.now()
         WHERE endpoint_id = $1";

/// Disable an endpoint (it answered 410 Gone) until resume_endpoint.
pub fn disable_endpoint(client: &mut SpiClient<'_>, endpoint_id: i32, reason: &str) -> SpiResult<()> {
    client.update(
        "UPDATE outbox.endpoints SET disabled_reason = $2, updated_at = pg_catalog.now() WHERE id = $1",
        None,
        &[endpoint_id.into(), reason.into()],
    )?;
    Ok(())
}
