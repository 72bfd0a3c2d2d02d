//! Cleanup by table rotation (PgQ's design, with two tables).
//!
//! outbox_emit writes into the current events table. Every
//! `outbox.retention` the worker makes the other table current, provided
//! it is empty. The table it left is emptied with one TRUNCATE as soon as
//! every endpoint is past everything in it.
//!
//! Why that is safe: an emitter takes its transaction id first and reads
//! the current table after, so every event in the table we left has a txid
//! below `left_txid` (the xmax of a snapshot taken once the switch was
//! published). When the oldest tick any endpoint still reads from has an
//! xmin above `left_txid`, all those transactions are over and every
//! endpoint has finished their events.

use crate::shmem;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

struct Table {
    slot: usize,
    current: bool,
    age_s: f64,
    left_txid: Option<i64>,
    empty: bool,
}

fn tables() -> SpiResult<Vec<Table>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT slot::pg_catalog.int4, current, extract(epoch FROM pg_catalog.now() - since)::pg_catalog.float8, left_txid, empty
             FROM outbox.rotation ORDER BY slot",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Table {
                slot: row.get::<i32>(1)?.unwrap_or(0) as usize,
                current: row.get(2)?.unwrap_or(false),
                age_s: row.get(3)?.unwrap_or(0.0),
                left_txid: row.get(4)?,
                empty: row.get(5)?.unwrap_or(true),
            });
        }
        Ok(out)
    })
}

/// Tell emitters which table is current. Runs inside a transaction that
/// read outbox.rotation, so a concurrent DROP EXTENSION waits for it.
pub fn publish_current(worker: usize) -> SpiResult<()> {
    let current = tables()?.into_iter().find(|t| t.current).map(|t| t.slot);
    shmem::publish_events_table(worker, current);
    Ok(())
}

/// One maintenance pass; runs in its own transaction. Returns what it did,
/// for the log.
pub fn maintain(worker: usize, retention_s: f64) -> SpiResult<Option<String>> {
    let tables = tables()?;
    let (Some(current), Some(other)) = (tables.iter().find(|t| t.current), tables.iter().find(|t| !t.current)) else {
        return Ok(None);
    };

    if !other.empty {
        let Some(left_txid) = other.left_txid else {
            // A switch whose second half never ran: the switch is published
            // (at start-up at the latest), so a snapshot's xmax now bounds
            // every txid written to the table we left.
            set_left_txid(other.slot)?;
            return Ok(None);
        };
        let horizon = Spi::get_one::<i64>(
            "SELECT t.snap_xmin FROM outbox.ticks AS t
             WHERE t.id = (SELECT coalesce(pg_catalog.min(p.tick), (SELECT pg_catalog.max(id) FROM outbox.ticks)) FROM outbox.progress AS p)",
        )?;
        if horizon.is_some_and(|h| h > left_txid) {
            // lock_timeout: never queue behind a reader of the table.
            Spi::run("SET LOCAL lock_timeout = '200ms'")?;
            Spi::run(&format!("TRUNCATE outbox.events_{}", other.slot))?;
            Spi::run_with_args(
                "UPDATE outbox.rotation SET empty = true, left_txid = NULL WHERE slot = $1",
                &[(other.slot as i16).into()],
            )?;
            return Ok(Some(format!("emptied outbox.events_{}", other.slot)));
        }
        return Ok(None);
    }

    let has_events = Spi::get_one::<bool>(&format!("SELECT EXISTS (SELECT FROM outbox.events_{})", current.slot))?;
    if current.age_s >= retention_s && has_events == Some(true) {
        Spi::run_with_args(
            "UPDATE outbox.rotation SET current = (slot = $1),
                    since = CASE WHEN slot = $1 THEN pg_catalog.now() ELSE since END,
                    empty = CASE WHEN slot = $1 THEN false ELSE empty END",
            &[(other.slot as i16).into()],
        )?;
        shmem::publish_events_table(worker, Some(other.slot));
        // A new statement, so a new snapshot: taken after the publish.
        set_left_txid(current.slot)?;
        return Ok(Some(format!("outbox.events_{} is now current", other.slot)));
    }
    Ok(None)
}

fn set_left_txid(slot: usize) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE outbox.rotation SET left_txid = pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text::bigint WHERE slot = $1",
        &[(slot as i16).into()],
    )
}

/// Forget ticks no endpoint reads from anymore (keeps the latest).
pub fn drop_old_ticks() -> SpiResult<()> {
    Spi::run(
        "DELETE FROM outbox.ticks
         WHERE id < (SELECT coalesce(pg_catalog.min(p.tick), (SELECT pg_catalog.max(id) FROM outbox.ticks)) FROM outbox.progress AS p)
           AND id < (SELECT pg_catalog.max(id) FROM outbox.ticks)",
    )
}
