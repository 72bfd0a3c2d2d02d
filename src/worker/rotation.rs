//! Cleanup by table rotation (PgQ's design, with two tables).
//!
//! outbox_emit writes into the current events table. Every
//! `outbox.retention` the worker makes the other table current, provided
//! it is empty. The table it left is emptied with one TRUNCATE as soon as
//! every endpoint is past everything in it.
//!
//! Why that is safe (docs/design.md has the whole argument): an emitter
//! takes its transaction id first and reads which table is current after,
//! so every event in the table we left has a txid below `left_txid`, the
//! worker's own transaction id taken in a transaction that starts after the
//! switch committed and was published. When the oldest tick any endpoint
//! still reads from has an xmin above `left_txid`, all those transactions
//! are over and every endpoint has finished their events. An endpoint that
//! has not started yet (its tick is still NULL) holds everything back.

use super::error::Result;
use crate::shmem;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

struct Table {
    /// Which one: outbox.events_0 or outbox.events_1 (`slot` in outbox.rotation).
    table: usize,
    current: bool,
    age_s: f64,
    left_txid: Option<i64>,
    empty: bool,
}

fn tables() -> SpiResult<Vec<Table>> {
    Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT slot::pg_catalog.int4, current, extract(epoch FROM pg_catalog.now() - since)::pg_catalog.float8, left_txid, empty
             FROM outbox.rotation ORDER BY slot",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Table {
                table: row.get::<i32>(1)?.unwrap_or(0) as usize,
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
pub fn publish_current(worker: usize) -> Result<()> {
    let current = tables()?.into_iter().find(|t| t.current).map(|t| t.table);
    shmem::publish_events_table(worker, current);
    Ok(())
}

/// What a maintenance pass did.
#[derive(Debug, PartialEq)]
pub enum Done {
    Nothing,
    /// Table `table` is current now: publish it once this commits.
    Switched(usize),
    /// The table left behind is bounded (left_txid set).
    Bounded(usize),
    /// Table `table` was emptied.
    Emptied(usize),
}

/// One maintenance pass; runs in its own transaction.
pub fn maintain(retention_s: f64) -> Result<Done> {
    Ok(rotate(retention_s)?)
}

fn rotate(retention_s: f64) -> SpiResult<Done> {
    let tables = tables()?;
    let (Some(current), Some(other)) = (tables.iter().find(|t| t.current), tables.iter().find(|t| !t.current)) else {
        return Ok(Done::Nothing);
    };

    if !other.empty {
        let Some(left_txid) = other.left_txid else {
            // The second half of a switch, in a transaction of its own that
            // began after the switch committed and was published: every
            // transaction that could still write into the table we left
            // took its id before, so ours bounds them all.
            set_left_txid(other.table)?;
            return Ok(Done::Bounded(other.table));
        };
        let horizon = Spi::get_one::<i64>(
            "SELECT t.snap_xmin FROM outbox.ticks AS t
             WHERE t.id = (SELECT coalesce(pg_catalog.min(p.tick), (SELECT pg_catalog.max(id) FROM outbox.ticks))
                           FROM outbox.progress AS p)
               AND NOT EXISTS (SELECT FROM outbox.progress AS p WHERE p.tick IS NULL)",
        )?;
        if horizon.is_some_and(|h| h > left_txid) {
            // lock_timeout: never queue behind a reader of the table.
            Spi::run("SET LOCAL lock_timeout = '200ms'")?;
            Spi::run(&format!("TRUNCATE outbox.events_{}", other.table))?;
            Spi::run_with_args(
                "UPDATE outbox.rotation SET empty = true, left_txid = NULL WHERE slot = $1",
                &[(other.table as i16).into()],
            )?;
            return Ok(Done::Emptied(other.table));
        }
        return Ok(Done::Nothing);
    }

    let has_events = Spi::get_one::<bool>(&format!("SELECT EXISTS (SELECT FROM outbox.events_{})", current.table))?;
    if current.age_s >= retention_s && has_events == Some(true) {
        Spi::run_with_args(
            "UPDATE outbox.rotation SET current = (slot = $1),
                    since = CASE WHEN slot = $1 THEN pg_catalog.now() ELSE since END,
                    empty = CASE WHEN slot = $1 THEN false ELSE empty END",
            &[(other.table as i16).into()],
        )?;
        // Published by the caller once this commits; left_txid is set by
        // the next pass, in a transaction that starts after that (above).
        return Ok(Done::Switched(other.table));
    }
    Ok(Done::Nothing)
}

fn set_left_txid(table: usize) -> SpiResult<()> {
    // pg_current_xact_id() assigns this transaction its id now: higher than
    // every id handed out before.
    Spi::run_with_args(
        "UPDATE outbox.rotation SET left_txid = pg_catalog.pg_current_xact_id()::pg_catalog.text::bigint
         WHERE slot = $1",
        &[(table as i16).into()],
    )
}
