//! The stream: reading the events of a batch for one endpoint, from where
//! it is, in commit order, a page that fits its window at a time.

use super::error::Result;
use super::rows::{self, Row};
use super::ticks::Tick;
use crate::event::{Event, Position};
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// "Batches up to `tick` are done; inside batch `tick + 1`, everything up
/// to and including position `after` = (rank, n) is done."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub tick: i64,
    pub after: Option<(i64, i32)>,
}

/// The 7 columns an Event's content is read from (see `event_at`), of the
/// table alias `$t` whose event id is `$id`.
macro_rules! event_columns {
    ($t:literal, $id:literal) => {
        concat!(
            $id,
            "::pg_catalog.text, ",
            $t,
            ".topic, ",
            $t,
            ".key, ",
            $t,
            ".type, ",
            $t,
            ".payload::pg_catalog.text, ",
            $t,
            ".headers::pg_catalog.text, ",
            $t,
            ".created_at"
        )
    };
}
pub(crate) use event_columns;

/// The Event at `position` whose `event_columns!` start at column `first`
/// (1-based) of `row`: the one reader of rows into events, for the stream
/// and for parked events.
pub fn event_at(row: &Row, first: usize, position: Position) -> SpiResult<Event> {
    let (timestamp, created) = crate::event::timestamp(row.timestamptz(first + 6)?.unwrap_or(0));
    Ok(Event {
        position,
        id: row.text(first)?.unwrap_or_default(),
        topic: row.text(first + 1)?.unwrap_or_default(),
        key: row.text(first + 2)?,
        event_type: row.text(first + 3)?,
        payload: row.text(first + 4)?.unwrap_or_else(|| "null".into()),
        headers: row.text(first + 5)?.unwrap_or_else(|| "{}".into()),
        timestamp,
        created,
    })
}

/// A row of the reads below: rank, txid, n, then `event_columns!`.
fn stream_event(row: &Row, batch: i64, rank: i64) -> SpiResult<Event> {
    let position = Position { batch, rank, txid: row.i64(2)?.unwrap_or_default(), n: row.i32(3)?.unwrap_or_default() };
    event_at(row, 4, position)
}

thread_local! {
    /// The worker's most frequent statements, planned once per process.
    static PREPARED: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// `sql` planned once per process (a plan that survives its transaction).
pub(super) fn prepared(
    client: &mut SpiClient<'_>,
    sql: &'static str,
    types: &[pg_sys::Oid],
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    if let Some(plan) = PREPARED.with(|m| m.borrow().get(sql).cloned()) {
        return Ok(plan);
    }
    let types: Vec<PgOid> = types.iter().map(|t| PgOid::from(*t)).collect();
    let plan = Rc::new(client.prepare_mut(sql, &types)?.keep());
    PREPARED.with(|m| m.borrow_mut().insert(sql, plan.clone()));
    Ok(plan)
}

// The reads below return at most $limit rows and stop after the row whose
// size (outbox.events.size: payload uncompressed, key, type, headers)
// crosses $bytes, so one page never holds much more than the window has
// room for, whatever writers put in their events. Each row also says the
// size of the rows up to it (`upto`), which tells whether the budget may
// have cut the page (see `all_of_it`); counting the rows the LIMIT let
// through instead took a second window over the whole page, a fifth of
// the statement.

/// Rest of one transaction's events after emit number `after_n`, by index.
/// $1 txid, $2 after_n, $3 patterns, $4 limit, $5 bytes.
const READ_TRANSACTION: &str = concat!(
    "SELECT 0::pg_catalog.int8, e.txid, e.n, ",
    event_columns!("e", "e.id"),
    ", e.upto
     FROM (SELECT w.*, pg_catalog.sum(w.size) OVER (ORDER BY w.n) AS upto
           FROM (SELECT * FROM outbox.events AS y
                 WHERE y.txid = $1 AND y.n > $2 AND y.topic LIKE ANY ($3) ORDER BY y.n LIMIT $4) AS w) AS e
     WHERE e.upto - e.size < $5
     ORDER BY e.n"
);

/// Events of the next transactions in commit order (ordinal in the slice
/// first). Each transaction contributes at most $3 rows, and the text
/// columns are built after the limits, so a page costs what it returns.
/// $1 txids, $2 patterns, $3 limit, $4 bytes.
const READ_TRANSACTIONS: &str = concat!(
    "SELECT e.i, e.txid, e.n, ",
    event_columns!("e", "e.id"),
    ", e.upto
     FROM (SELECT w.*, pg_catalog.sum(w.size) OVER (ORDER BY w.i, w.n) AS upto
           FROM (SELECT o.i, x.* FROM pg_catalog.unnest($1::pg_catalog.int8[]) WITH ORDINALITY AS o(txid, i)
                 CROSS JOIN LATERAL (SELECT * FROM outbox.events AS y
                                     WHERE y.txid = o.txid AND y.topic LIKE ANY ($2) ORDER BY y.n LIMIT $3) AS x
                 ORDER BY o.i, x.n LIMIT $3) AS w) AS e
     WHERE e.upto - e.size < $4
     ORDER BY e.i, e.n"
);

/// Batches of version 0.1.0 ticks that stored no order: txid order, over
/// two index ranges
/// (transactions in progress at `lo`, and those that started after it), so
/// that events `lo` already saw are never scanned, however long ago an
/// open transaction elsewhere began.
/// $1 lo.xip, $2 lo.xmax, $3 hi.xmax, $4/$5 after (txid, n), $6 hi.xip,
/// $7 patterns, $8 limit, $9 bytes.
const READ_UNORDERED: &str = concat!(
    "SELECT e.txid, e.txid, e.n, ",
    event_columns!("e", "e.id"),
    ", e.upto
     FROM (SELECT w.*, pg_catalog.sum(w.size) OVER (ORDER BY w.txid, w.n) AS upto
           FROM (SELECT * FROM (SELECT * FROM outbox.events WHERE txid = ANY ($1) AND (txid, n) > ($4, $5)
                                UNION ALL
                                SELECT * FROM outbox.events WHERE txid >= $2 AND txid < $3 AND (txid, n) > ($4, $5)) AS u
                 WHERE NOT u.txid = ANY ($6) AND u.topic LIKE ANY ($7)
                 ORDER BY u.txid, u.n
                 LIMIT $8) AS w) AS e
     WHERE e.upto - e.size < $9
     ORDER BY e.txid, e.n"
);

/// A page of a batch.
pub struct Page {
    pub events: Vec<Event>,
    /// Everything of the batch after the starting position was read.
    pub complete: bool,
}

/// How many of the transactions with these sizes a page of `room` rows
/// holds: those whose events all fit, and at least one.
fn fitting(sizes: &[i64], room: i64) -> usize {
    let mut total = 0i64;
    let fit = sizes.iter().take_while(|s| {
        total = total.saturating_add(**s);
        total <= room
    });
    fit.count().max(1).min(sizes.len())
}

/// Whether a query's rows were all it had: fewer than `limit`, and none
/// cut by the byte budget `bytes`. The rows kept are those that start
/// within the budget (sizes are never negative), so had one been cut, the
/// last kept would end (`upto`) at or past it. That can also happen with
/// nothing cut: then the next read finds nothing more, one read too many.
fn all_of_it(rows: usize, last_upto: i64, limit: i64, bytes: i64) -> bool {
    (rows as i64) < limit && last_upto < bytes
}

/// Events of the batch between ticks `lo` and `hi` (committed after `lo`,
/// visible at `hi`) that match `like`, after position `after` = (rank, n),
/// in order: at most `limit`, and about `bytes` of them.
pub fn read_batch(
    lo: &Tick,
    hi: &Tick,
    after: Option<(i64, i32)>,
    like: &[String],
    limit: i64,
    bytes: i64,
) -> Result<Page> {
    Ok(Spi::connect_mut(|client| match &hi.order {
        Some(order) => {
            let sizes = hi.sizes.as_deref().filter(|s| s.len() == order.len());
            read_ordered(client, hi.id, order, sizes, after, like, limit, bytes)
        }
        None => {
            use pg_sys::{INT4OID, INT8ARRAYOID, INT8OID, TEXTARRAYOID};
            let (after_rank, after_n) = after.unwrap_or((-1, 0));
            let plan = prepared(
                client,
                READ_UNORDERED,
                &[INT8ARRAYOID, INT8OID, INT8OID, INT8OID, INT4OID, INT8ARRAYOID, TEXTARRAYOID, INT8OID, INT8OID],
            )?;
            let rows = client.update(
                &*plan,
                None,
                &[
                    lo.xip.clone().into(),
                    lo.xmax.into(),
                    hi.xmax.into(),
                    after_rank.into(),
                    after_n.into(),
                    hi.xip.clone().into(),
                    like.to_vec().into(),
                    limit.into(),
                    bytes.into(),
                ],
            )?;
            let mut upto = 0;
            let events = rows::each(rows, |row| {
                upto = row.i64(11)?.unwrap_or_default();
                stream_event(row, hi.id, row.i64(1)?.unwrap_or_default())
            })?;
            let complete = all_of_it(events.len(), upto, limit, bytes);
            Ok(Page { events, complete })
        }
    })?)
}

/// `sizes`: how many events each transaction of `order` wrote, when the
/// tick knows it.
#[allow(clippy::too_many_arguments)]
fn read_ordered(
    client: &mut SpiClient<'_>,
    batch: i64,
    order: &[i64],
    sizes: Option<&[i64]>,
    after: Option<(i64, i32)>,
    like: &[String],
    limit: i64,
    bytes: i64,
) -> SpiResult<Page> {
    use pg_sys::{INT4OID, INT8ARRAYOID, INT8OID, TEXTARRAYOID};
    let mut events = Vec::new();
    let mut used = 0i64;
    let (rank, after_n) = after.unwrap_or((0, 0));
    // The transaction we stopped in (ranks are 1-based).
    if rank >= 1 && rank as usize <= order.len() {
        let plan = prepared(client, READ_TRANSACTION, &[INT8OID, INT4OID, TEXTARRAYOID, INT8OID, INT8OID])?;
        let rows = client.update(
            &*plan,
            None,
            &[order[rank as usize - 1].into(), after_n.into(), like.to_vec().into(), limit.into(), bytes.into()],
        )?;
        let mut upto = 0;
        let before = events.len();
        events.extend(rows::each(rows, |row| {
            upto = row.i64(11)?.unwrap_or_default();
            stream_event(row, batch, rank)
        })?);
        used += events[before..].iter().map(|e| e.size() as i64).sum::<i64>();
        if !all_of_it(events.len() - before, upto, limit, bytes) {
            return Ok(Page { events, complete: false });
        }
    }
    // Then the following transactions: as many as the page has room for
    // when their sizes are known (at middle rates a tick's batch is a few
    // dozen small transactions, read in one statement rather than two or
    // three); otherwise a few at first, more when they turn out small.
    // Either way rows scanned stay near the rows returned.
    let mut next = rank.max(0) as usize;
    let mut width = 4;
    while next < order.len() {
        let remaining = limit - events.len() as i64;
        let room = bytes - used;
        if remaining <= 0 || room <= 0 {
            return Ok(Page { events, complete: false });
        }
        let end = match sizes {
            Some(sizes) => next + fitting(&sizes[next..], remaining),
            None => (next + width).min(order.len()),
        };
        let plan = prepared(client, READ_TRANSACTIONS, &[INT8ARRAYOID, TEXTARRAYOID, INT8OID, INT8OID])?;
        let rows = client.update(
            &*plan,
            None,
            &[order[next..end].to_vec().into(), like.to_vec().into(), remaining.into(), room.into()],
        )?;
        let mut upto = 0;
        let before = events.len();
        events.extend(rows::each(rows, |row| {
            upto = row.i64(11)?.unwrap_or_default();
            stream_event(row, batch, next as i64 + row.i64(1)?.unwrap_or_default())
        })?);
        used += events[before..].iter().map(|e| e.size() as i64).sum::<i64>();
        if !all_of_it(events.len() - before, upto, remaining, room) {
            return Ok(Page { events, complete: false });
        }
        next = end;
        width = (width * 4).min(1024);
    }
    Ok(Page { events, complete: true })
}

#[cfg(test)]
mod tests {
    use super::{all_of_it, fitting};

    #[test]
    fn a_page_is_whole_only_when_neither_the_limit_nor_the_budget_may_have_cut_it() {
        assert!(all_of_it(3, 300, 10, 1000), "three rows of 100 bytes, room for more");
        assert!(!all_of_it(10, 300, 10, 1000), "the limit was reached");
        assert!(!all_of_it(3, 1200, 10, 1000), "the last row ends past the budget");
        assert!(!all_of_it(3, 1000, 10, 1000), "the last row ends at the budget");
        assert!(all_of_it(0, 0, 10, 1000), "nothing there");
    }

    #[test]
    fn a_page_takes_the_transactions_that_fit_and_at_least_one() {
        assert_eq!(fitting(&[1, 1, 1, 1], 1000), 4);
        assert_eq!(fitting(&[400, 400, 400], 1000), 2);
        assert_eq!(fitting(&[400, 600, 1], 1000), 2);
        // A transaction larger than the page is read alone, a page at a time.
        assert_eq!(fitting(&[5000, 1], 1000), 1);
        assert_eq!(fitting(&[1], 0), 1);
    }
}
