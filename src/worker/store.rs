//! The worker's SQL: everything it reads from and writes to the outbox
//! tables. Every function runs inside a transaction opened by the caller
//! (see `transaction` in mod.rs) and never waits on the network.

use super::parked;
use crate::event::{Event, Position};
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiHeapTupleData, SpiResult};
use pgrx::JsonB;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// A tick: which transactions had committed when the worker looked, and
/// the commit order of those that became visible since the previous tick.
#[derive(Debug, Clone)]
pub struct Tick {
    pub id: i64,
    pub xmax: i64,
    pub xip: Vec<i64>,
    pub order: Option<Vec<i64>>,
}

/// A transaction of a new batch, with its commit timestamp (microseconds)
/// when PostgreSQL tracks them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Txn {
    pub txid: i64,
    pub committed_at: Option<i64>,
}

/// "Batches up to `tick` are done; inside batch `tick + 1`, everything up
/// to and including position `after` = (rank, n) is done."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub tick: i64,
    pub after: Option<(i64, i32)>,
}

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
}

/// An event to copy into outbox.parked.
#[derive(Debug)]
pub struct ParkRow {
    pub position: Position,
    pub dead: bool,
    pub attempts: u32,
    /// When a pending row's first attempt from the table is due.
    pub retry_in: Option<Duration>,
    pub status: Option<u16>,
    pub error: Option<String>,
}

impl ParkRow {
    /// An event queued behind its lane's first row.
    pub fn waiting(position: Position) -> ParkRow {
        ParkRow { position, dead: false, attempts: 0, retry_in: None, status: None, error: None }
    }
}

/// A parked lane's first row, as loaded for the worker.
pub struct ParkedHead {
    pub key: Option<String>,
    pub event_id: String,
    pub position: Position,
    pub dead: bool,
    pub attempts: u32,
    /// Seconds until due (negative: overdue).
    pub due_in_s: f64,
    /// The event itself, when asked for.
    pub event: Option<Event>,
}

fn client_err(e: pgrx::spi::SpiError) -> String {
    e.to_string()
}

/// The oid of the outbox extension in this database, if it is created.
pub fn extension_oid() -> Result<Option<u32>, String> {
    Spi::get_one::<pg_sys::Oid>("SELECT x.oid FROM pg_catalog.pg_extension AS x WHERE x.extname = 'outbox'")
        .map(|o| o.map(|o| o.to_u32()))
        .map_err(client_err)
}

pub fn load_endpoints() -> Result<Vec<EndpointRow>, String> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT e.id, e.name, e.url, e.kind, e.topics, outbox._like_patterns(e.topics), e.options,
                    NOT e.paused AND e.disabled_reason IS NULL,
                    p.tick, p.after_rank, p.after_n
             FROM outbox.endpoints AS e JOIN outbox.progress AS p ON p.endpoint_id = e.id
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
                cursor: Cursor { tick: row.get(9)?.unwrap_or_default(), after },
            });
        }
        SpiResult::Ok(out)
    })
    .map_err(client_err)
}

/// The latest tick's id.
pub fn latest_tick() -> Result<i64, String> {
    Spi::get_one::<i64>("SELECT pg_catalog.max(id) FROM outbox.ticks").map(|id| id.unwrap_or(0)).map_err(client_err)
}

/// Take a new tick if events committed since the last one, or `always`;
/// returns the latest tick id either way. `order` sorts the new batch's
/// transactions into commit order; it is consulted after the snapshot is
/// taken, so it knows every transaction the snapshot sees as committed.
pub fn take_tick(always: bool, order: impl FnOnce(&mut Vec<Txn>) -> bool) -> Result<i64, String> {
    Spi::connect_mut(|client| {
        let row = client
            .select(
                "SELECT last.id, last.snap_xmax, last.snap_xip,
                        pg_catalog.pg_snapshot_xmin(s)::pg_catalog.text::bigint, pg_catalog.pg_snapshot_xmax(s)::pg_catalog.text::bigint,
                        ARRAY(SELECT x::pg_catalog.text::bigint FROM pg_catalog.pg_snapshot_xip(s) AS x)
                 FROM (SELECT id, snap_xmax, snap_xip FROM outbox.ticks ORDER BY id DESC LIMIT 1) AS last,
                      pg_catalog.pg_current_snapshot() AS s",
                Some(1),
                &[],
            )?
            .first();
        let last_id: i64 = row.get(1)?.unwrap_or(0);
        let last_xmax: i64 = row.get(2)?.unwrap_or(0);
        let last_xip: Vec<i64> = row.get(3)?.unwrap_or_default();
        let (xmin, xmax, xip): (i64, i64, Vec<i64>) =
            (row.get(4)?.unwrap_or(0), row.get(5)?.unwrap_or(0), row.get(6)?.unwrap_or_default());
        // Transactions whose events became visible since the last tick
        // (one more than we order, to know when there are too many), with
        // their commit timestamps when track_commit_timestamp is on.
        let row = client
            .select(
                "SELECT coalesce(pg_catalog.array_agg(txid ORDER BY txid), '{}'), coalesce(pg_catalog.array_agg(ts ORDER BY txid), '{}')
                 FROM (SELECT txid,
                              CASE WHEN pg_catalog.current_setting('track_commit_timestamp')::pg_catalog.bool
                                   THEN (extract(epoch FROM pg_catalog.pg_xact_commit_timestamp((txid % 4294967296)::pg_catalog.text::pg_catalog.xid))
                                         * 1000000)::bigint
                              END AS ts
                       FROM (SELECT DISTINCT txid FROM (
                                 SELECT txid FROM outbox.events WHERE txid = ANY ($2)
                                 UNION ALL
                                 SELECT txid FROM outbox.events WHERE txid >= $1 AND txid < $3) AS e
                             WHERE NOT txid = ANY ($4)
                             LIMIT $5) AS d) AS t",
                Some(1),
                &[
                    last_xmax.into(),
                    last_xip.into(),
                    xmax.into(),
                    xip.clone().into(),
                    (super::commit_order::MAX_ORDERED as i64 + 1).into(),
                ],
            )?
            .first();
        let ids: Vec<i64> = row.get(1)?.unwrap_or_default();
        let stamps: Vec<Option<i64>> = row.get(2)?.unwrap_or_default();
        if ids.is_empty() && !always {
            return Ok(last_id);
        }
        let mut txns: Vec<Txn> =
            ids.into_iter().zip(stamps).map(|(txid, committed_at)| Txn { txid, committed_at }).collect();
        let ordered = order(&mut txns);
        let commit_order: Option<Vec<i64>> = ordered.then(|| txns.iter().map(|t| t.txid).collect());
        client.update(
            "INSERT INTO outbox.ticks (id, snap_xmin, snap_xmax, snap_xip, commit_order) VALUES ($1, $2, $3, $4, $5)",
            None,
            &[(last_id + 1).into(), xmin.into(), xmax.into(), xip.into(), commit_order.into()],
        )?;
        SpiResult::Ok(last_id + 1)
    })
    .map_err(client_err)
}

pub fn load_ticks(ids: &[i64]) -> Result<Vec<Tick>, String> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT id, snap_xmax, snap_xip, commit_order FROM outbox.ticks WHERE id = ANY ($1)",
            None,
            &[ids.to_vec().into()],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Tick {
                id: row.get(1)?.unwrap_or_default(),
                xmax: row.get(2)?.unwrap_or_default(),
                xip: row.get(3)?.unwrap_or_default(),
                order: row.get(4)?,
            });
        }
        SpiResult::Ok(out)
    })
    .map_err(client_err)
}

/// The columns an Event is built from (see `event_from`), of table alias e.
macro_rules! event_columns {
    () => {
        "e.txid, e.n, e.id::pg_catalog.text, e.topic, e.key, e.type, e.payload::pg_catalog.text, e.headers::pg_catalog.text,
         pg_catalog.to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
         extract(epoch FROM e.created_at)::pg_catalog.float8"
    };
}

thread_local! {
    /// The worker's hot statements, planned once per process.
    static PREPARED: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

fn prepared(
    client: &SpiClient<'_>,
    sql: &'static str,
    types: &[pg_sys::Oid],
    mutating: bool,
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    if let Some(plan) = PREPARED.with(|m| m.borrow().get(sql).cloned()) {
        return Ok(plan);
    }
    let types: Vec<PgOid> = types.iter().map(|t| PgOid::from(*t)).collect();
    let plan = if mutating { client.prepare_mut(sql, &types)? } else { client.prepare(sql, &types)? };
    let plan = Rc::new(plan.keep());
    PREPARED.with(|m| m.borrow_mut().insert(sql, plan.clone()));
    Ok(plan)
}

/// Build an Event from a row whose first column is the rank, followed by
/// `event_columns!()`.
fn event_from(row: &SpiHeapTupleData<'_>, batch: i64, rank: i64) -> SpiResult<Event> {
    let epoch: f64 = row.get(11)?.unwrap_or_default();
    Ok(Event {
        position: Position { batch, rank, txid: row.get(2)?.unwrap_or_default(), n: row.get(3)?.unwrap_or_default() },
        id: row.get(4)?.unwrap_or_default(),
        topic: row.get(5)?.unwrap_or_default(),
        key: row.get(6)?,
        event_type: row.get(7)?,
        payload: row.get(8)?.unwrap_or_else(|| "null".into()),
        headers: row.get(9)?.unwrap_or_else(|| "{}".into()),
        timestamp: row.get(10)?.unwrap_or_default(),
        created: SystemTime::UNIX_EPOCH + Duration::from_secs_f64(epoch.max(0.0)),
    })
}

// The reads below return at most $limit rows and stop after the row whose
// size (outbox.events.size: payload uncompressed, key, type, headers)
// crosses $bytes, so one page never holds much more than the window has
// room for, whatever writers put in their events. Each row also says how
// many rows the LIMIT let through (`candidates`): fewer rows than that
// means the byte budget cut the page.

/// Rest of one transaction's events after emit number `after_n`, by index.
/// $1 txid, $2 after_n, $3 patterns, $4 limit, $5 bytes.
const READ_TRANSACTION: &str = concat!(
    "SELECT 0::pg_catalog.int8, ",
    event_columns!(),
    ", e.candidates
     FROM (SELECT w.*, pg_catalog.sum(w.size) OVER (ORDER BY w.n) AS upto, pg_catalog.count(*) OVER () AS candidates
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
    "SELECT e.i, ",
    event_columns!(),
    ", e.candidates
     FROM (SELECT w.*, pg_catalog.sum(w.size) OVER (ORDER BY w.i, w.n) AS upto,
                  pg_catalog.count(*) OVER () AS candidates
           FROM (SELECT o.i, x.* FROM pg_catalog.unnest($1::pg_catalog.int8[]) WITH ORDINALITY AS o(txid, i)
                 CROSS JOIN LATERAL (SELECT * FROM outbox.events AS y
                                     WHERE y.txid = o.txid AND y.topic LIKE ANY ($2) ORDER BY y.n LIMIT $3) AS x
                 ORDER BY o.i, x.n LIMIT $3) AS w) AS e
     WHERE e.upto - e.size < $4
     ORDER BY e.i, e.n"
);

/// Batches too large to order: txid order, over two index ranges
/// (transactions in progress at `lo`, and those that started after it), so
/// that events `lo` already saw are never scanned, however long ago an
/// open transaction elsewhere began.
/// $1 lo.xip, $2 lo.xmax, $3 hi.xmax, $4/$5 after (txid, n), $6 hi.xip,
/// $7 patterns, $8 limit, $9 bytes.
const READ_UNORDERED: &str = concat!(
    "SELECT e.txid, ",
    event_columns!(),
    ", e.candidates
     FROM (SELECT w.*, pg_catalog.sum(w.size) OVER (ORDER BY w.txid, w.n) AS upto,
                  pg_catalog.count(*) OVER () AS candidates
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

/// Whether a query's rows were all it had: fewer than `limit` candidates,
/// none cut by the byte budget.
fn all_of_it(rows: usize, candidates: i64, limit: i64) -> bool {
    candidates < limit && rows as i64 == candidates
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
) -> Result<Page, String> {
    Spi::connect(|client| match &hi.order {
        Some(order) => read_ordered(client, hi.id, order, after, like, limit, bytes),
        None => {
            use pg_sys::{INT4OID, INT8ARRAYOID, INT8OID, TEXTARRAYOID};
            let (after_rank, after_n) = after.unwrap_or((-1, 0));
            let plan = prepared(
                client,
                READ_UNORDERED,
                &[INT8ARRAYOID, INT8OID, INT8OID, INT8OID, INT4OID, INT8ARRAYOID, TEXTARRAYOID, INT8OID, INT8OID],
                false,
            )?;
            let rows = client.select(
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
            let mut events = Vec::with_capacity(rows.len());
            let mut candidates = 0;
            for row in rows {
                let rank: i64 = row.get(1)?.unwrap_or_default();
                candidates = row.get(12)?.unwrap_or_default();
                events.push(event_from(&row, hi.id, rank)?);
            }
            let complete = all_of_it(events.len(), candidates, limit);
            Ok(Page { events, complete })
        }
    })
    .map_err(client_err)
}

fn read_ordered(
    client: &SpiClient<'_>,
    batch: i64,
    order: &[i64],
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
        let plan = prepared(client, READ_TRANSACTION, &[INT8OID, INT4OID, TEXTARRAYOID, INT8OID, INT8OID], false)?;
        let rows = client.select(
            &*plan,
            None,
            &[order[rank as usize - 1].into(), after_n.into(), like.to_vec().into(), limit.into(), bytes.into()],
        )?;
        let mut candidates = 0;
        let before = events.len();
        for row in rows {
            candidates = row.get(12)?.unwrap_or_default();
            let event = event_from(&row, batch, rank)?;
            used += event.size() as i64;
            events.push(event);
        }
        if !all_of_it(events.len() - before, candidates, limit) {
            return Ok(Page { events, complete: false });
        }
    }
    // Then the following transactions, a few at first, more when they turn
    // out small: rows scanned stay near the rows returned.
    let mut next = rank.max(0) as usize;
    let mut width = 4;
    while next < order.len() {
        let remaining = limit - events.len() as i64;
        let room = bytes - used;
        if remaining <= 0 || room <= 0 {
            return Ok(Page { events, complete: false });
        }
        let end = (next + width).min(order.len());
        let plan = prepared(client, READ_TRANSACTIONS, &[INT8ARRAYOID, TEXTARRAYOID, INT8OID, INT8OID], false)?;
        let rows = client.select(
            &*plan,
            None,
            &[order[next..end].to_vec().into(), like.to_vec().into(), remaining.into(), room.into()],
        )?;
        let mut candidates = 0;
        let before = events.len();
        for row in rows {
            let i: i64 = row.get(1)?.unwrap_or_default();
            candidates = row.get(12)?.unwrap_or_default();
            let event = event_from(&row, batch, next as i64 + i)?;
            used += event.size() as i64;
            events.push(event);
        }
        if !all_of_it(events.len() - before, candidates, remaining) {
            return Ok(Page { events, complete: false });
        }
        next = end;
        width = (width * 4).min(1024);
    }
    Ok(Page { events, complete: true })
}

pub fn save_progress(client: &mut SpiClient<'_>, u: &ProgressUpdate) -> SpiResult<()> {
    let (tick, after_rank, after_n) = match u.cursor {
        Some(c) => (Some(c.tick), c.after.map(|a| a.0), c.after.map(|a| a.1)),
        None => (None, None, None),
    };
    let (p50, p99) = match u.latency_ms {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    client.update(
        "UPDATE outbox.progress SET
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
             updated_at = pg_catalog.now()
         WHERE endpoint_id = $1",
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
        ],
    )?;
    Ok(())
}

/// Copy events from the stream into outbox.parked, in the given order
/// (which becomes their order inside each lane). They are still in the
/// events tables: rotation only empties a table every persisted cursor has
/// passed, and these are not passed yet.
pub fn park(client: &mut SpiClient<'_>, endpoint_id: i32, rows: &[ParkRow]) -> SpiResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: &dyn Fn(&ParkRow) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
    // Volatile nextval() is evaluated after the sort (PostgreSQL postpones
    // volatile target expressions past ORDER BY), so seq follows u.ord.
    client.update(
        "INSERT INTO outbox.parked (endpoint_id, event_id, seq, batch, rank, txid, n, topic, key, type, payload,
                                    headers, created_at, state, attempts, next_attempt_at, last_status, last_error,
                                    failed_at)
         SELECT $1, e.id, pg_catalog.nextval('outbox.parked_seq'), u.batch, u.rank, e.txid, e.n, e.topic, e.key, e.type,
                e.payload, e.headers, e.created_at,
                CASE WHEN u.dead THEN 'dead' ELSE 'pending' END, u.attempts,
                CASE WHEN NOT u.dead THEN pg_catalog.now() + u.retry_ms * interval '1 millisecond' END,
                u.status, u.error, CASE WHEN u.dead THEN pg_catalog.now() END
         FROM ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::bigint[]),
                         pg_catalog.unnest($4::bigint[]), pg_catalog.unnest($5::int[]),
                         pg_catalog.unnest($6::pg_catalog.bool[]), pg_catalog.unnest($7::int[]),
                         pg_catalog.unnest($8::pg_catalog.float8[]), pg_catalog.unnest($9::int[]),
                         pg_catalog.unnest($10::pg_catalog.text[])) WITH ORDINALITY
                  AS u(batch, rank, txid, n, dead, attempts, retry_ms, status, error, ord)
         JOIN outbox.events AS e ON e.txid = u.txid AND e.n = u.n
         ORDER BY u.ord
         ON CONFLICT (endpoint_id, event_id) DO NOTHING",
        None,
        &[
            endpoint_id.into(),
            col(&|r| r.position.batch).into(),
            col(&|r| r.position.rank).into(),
            col(&|r| r.position.txid).into(),
            rows.iter().map(|r| r.position.n).collect::<Vec<i32>>().into(),
            rows.iter().map(|r| r.dead).collect::<Vec<bool>>().into(),
            rows.iter().map(|r| r.attempts as i32).collect::<Vec<i32>>().into(),
            rows.iter().map(|r| r.retry_in.unwrap_or_default().as_secs_f64() * 1000.0).collect::<Vec<f64>>().into(),
            rows.iter().map(|r| r.status.map(i32::from)).collect::<Vec<Option<i32>>>().into(),
            rows.iter().map(|r| r.error.clone()).collect::<Vec<Option<String>>>().into(),
        ],
    )?;
    Ok(())
}

/// Record what happened to parked events.
pub fn write_parked(client: &mut SpiClient<'_>, endpoint_id: i32, writes: &[parked::Write]) -> SpiResult<()> {
    for w in writes {
        match w {
            parked::Write::Delivered { event_id } => client.update(
                "DELETE FROM outbox.parked WHERE endpoint_id = $1 AND event_id = $2::pg_catalog.uuid",
                None,
                &[endpoint_id.into(), event_id.as_str().into()],
            )?,
            parked::Write::Failed { event_id, attempts, retry_in, status, error } => client.update(
                "UPDATE outbox.parked SET attempts = $3, next_attempt_at = pg_catalog.now() + $4 * interval '1 millisecond',
                        last_status = $5, last_error = $6
                 WHERE endpoint_id = $1 AND event_id = $2::pg_catalog.uuid",
                None,
                &[
                    endpoint_id.into(),
                    event_id.as_str().into(),
                    (*attempts as i32).into(),
                    (retry_in.as_secs_f64() * 1000.0).into(),
                    status.map(i32::from).into(),
                    error.as_str().into(),
                ],
            )?,
            parked::Write::Dead { event_id, attempts, status, error } => client.update(
                "UPDATE outbox.parked SET state = 'dead', attempts = $3, next_attempt_at = NULL,
                        last_status = $4, last_error = $5, failed_at = pg_catalog.now()
                 WHERE endpoint_id = $1 AND event_id = $2::pg_catalog.uuid",
                None,
                &[
                    endpoint_id.into(),
                    event_id.as_str().into(),
                    (*attempts as i32).into(),
                    status.map(i32::from).into(),
                    error.as_str().into(),
                ],
            )?,
        };
    }
    Ok(())
}

/// The first row of every parked lane of an endpoint. With `block`, a
/// keyed lane whose first row is dead is listed too (it blocks its key).
pub fn parked_lanes(endpoint_id: i32, block: bool) -> Result<Vec<ParkedHead>, String> {
    parked_query(
        "SELECT DISTINCT ON (key, CASE WHEN key IS NULL THEN event_id END) {COLUMNS}
         FROM outbox.parked
         WHERE endpoint_id = $1 AND (state = 'pending' OR ($2 AND key IS NOT NULL))
         ORDER BY key, CASE WHEN key IS NULL THEN event_id END, seq",
        false,
        &[endpoint_id.into(), block.into()],
    )
}

/// The first rows, with their events, of the given keyed lanes and
/// unkeyed events.
pub fn parked_heads(
    endpoint_id: i32,
    keys: &[String],
    solo_ids: &[String],
    block: bool,
) -> Result<Vec<ParkedHead>, String> {
    parked_query(
        "(SELECT DISTINCT ON (key) {COLUMNS} FROM outbox.parked
          WHERE endpoint_id = $1 AND key = ANY ($2) AND (state = 'pending' OR $4)
          ORDER BY key, seq)
         UNION ALL
         SELECT {COLUMNS} FROM outbox.parked
         WHERE endpoint_id = $1 AND key IS NULL AND event_id = ANY ($3::pg_catalog.uuid[]) AND state = 'pending'",
        true,
        &[endpoint_id.into(), keys.to_vec().into(), solo_ids.to_vec().into(), block.into()],
    )
}

fn parked_query(
    sql: &str,
    with_event: bool,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Result<Vec<ParkedHead>, String> {
    let sql = sql.replace(
        "{COLUMNS}",
        "key, event_id::pg_catalog.text, batch, rank, txid, n, state = 'dead', attempts,
         coalesce(extract(epoch FROM next_attempt_at - pg_catalog.now()), 0)::pg_catalog.float8,
         topic, type, payload::pg_catalog.text, headers::pg_catalog.text,
         pg_catalog.to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
         extract(epoch FROM created_at)::pg_catalog.float8",
    );
    Spi::connect(|client| {
        let rows = client.select(&sql, None, args)?;
        let mut out = Vec::new();
        for row in rows {
            let position = Position {
                batch: row.get(3)?.unwrap_or_default(),
                rank: row.get(4)?.unwrap_or_default(),
                txid: row.get(5)?.unwrap_or_default(),
                n: row.get(6)?.unwrap_or_default(),
            };
            let key: Option<String> = row.get(1)?;
            let event_id: String = row.get(2)?.unwrap_or_default();
            let event = if with_event {
                let epoch: f64 = row.get(15)?.unwrap_or_default();
                Some(Event {
                    position,
                    id: event_id.clone(),
                    topic: row.get(10)?.unwrap_or_default(),
                    key: key.clone(),
                    event_type: row.get(11)?,
                    payload: row.get(12)?.unwrap_or_else(|| "null".into()),
                    headers: row.get(13)?.unwrap_or_else(|| "{}".into()),
                    timestamp: row.get(14)?.unwrap_or_default(),
                    created: SystemTime::UNIX_EPOCH + Duration::from_secs_f64(epoch.max(0.0)),
                })
            } else {
                None
            };
            out.push(ParkedHead {
                key,
                event_id,
                position,
                dead: row.get(7)?.unwrap_or(false),
                attempts: row.get::<i32>(8)?.unwrap_or(0).max(0) as u32,
                due_in_s: row.get(9)?.unwrap_or(0.0),
                event,
            });
        }
        SpiResult::Ok(out)
    })
    .map_err(client_err)
}

pub fn disable_endpoint(client: &mut SpiClient<'_>, endpoint_id: i32, reason: &str) -> SpiResult<()> {
    client.update(
        "UPDATE outbox.endpoints SET disabled_reason = $2, updated_at = pg_catalog.now() WHERE id = $1",
        None,
        &[endpoint_id.into(), reason.into()],
    )?;
    Ok(())
}
