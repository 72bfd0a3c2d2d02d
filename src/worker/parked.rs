//! Lanes that live in `outbox.parked` instead of the worker's window: the
//! model and its SQL.
//!
//! A lane (ordering key) is parked when its head failed long enough to
//! fill the window or hold back the cursor, or went to dead letters while
//! `on_dead` is `block`. From then on its events are copied to
//! outbox.parked as they are read, and the lane is worked off from that
//! table, one event at a time, in order. Other lanes never wait for it.
//! When its last row is gone, the lane returns to the stream.
//!
//! The table is the truth; memory holds at most `cap` lanes. The head of a
//! lane (its first pending row, or its first row when a dead row blocks)
//! carries `next_attempt_at`; rows behind it carry none until they become
//! the head. When every parked lane fits in memory (`complete`), the worker
//! needs no more; when they do not (many dead keys, say), it asks the table
//! which keys of a page are parked, and which heads are due.

use super::error::{Result, WorkerError};
use super::rows;
use super::stream::{event_at, event_columns};
use crate::event::{Event, Position};
use crate::schedule::LaneId;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub enum Status {
    /// Its first row is dead and `on_dead` is `block`.
    Blocked,
    /// Its first row is due at this instant (to be loaded from the table).
    Due(Instant),
    /// Loaded, waiting for room among the requests in flight.
    Ready(Arc<Event>),
    InFlight(Arc<Event>),
    /// The first row changed (delivered, or dead and skipped): find the
    /// next one, or unpark the lane.
    Next,
}

#[derive(Debug)]
pub struct Lane {
    pub status: Status,
    /// Failed attempts of the first row.
    pub attempts: u32,
    /// For an unkeyed lane, its one event's id.
    pub event_id: Option<String>,
    /// Events of the same key are still in the window
    /// (a replayed key): wait for those first, or the key would have two
    /// events in flight.
    pub behind_window: bool,
}

impl Lane {
    pub fn new(status: Status, attempts: u32, event_id: Option<String>) -> Lane {
        Lane { status, attempts, event_id, behind_window: false }
    }

    /// Its head is loaded and may be sent now.
    fn ready(&self) -> bool {
        matches!(self.status, Status::Ready(_)) && !self.behind_window
    }

    fn busy(&self) -> bool {
        matches!(self.status, Status::Ready(_) | Status::InFlight(_) | Status::Next)
    }
}

/// What happened to a parked event, written in the worker's next
/// transaction.
#[derive(Debug)]
pub enum Write {
    Delivered { event_id: String, key: Option<String> },
    Failed { event_id: String, attempts: u32, retry_in: Duration, status: Option<u16>, error: String },
    Dead { event_id: String, key: Option<String>, attempts: u32, status: Option<u16>, error: String },
}

/// An event to copy from the stream into outbox.parked.
#[derive(Debug)]
pub struct ParkRow {
    pub position: Position,
    /// For messages.
    pub event_id: String,
    pub dead: bool,
    pub attempts: u32,
    /// A lane's first row: when its next attempt is due. Rows queued
    /// behind it have none.
    pub retry_in: Option<Duration>,
    pub status: Option<u16>,
    pub error: Option<String>,
}

impl ParkRow {
    /// An event queued behind its lane's first row.
    pub fn waiting(position: Position, event_id: &str) -> ParkRow {
        ParkRow {
            position,
            event_id: event_id.to_string(),
            dead: false,
            attempts: 0,
            retry_in: None,
            status: None,
            error: None,
        }
    }
}

/// A parked lane's first row, as loaded.
pub struct Head {
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

/// An endpoint's parked lanes.
pub struct Parked {
    lanes: HashMap<LaneId, Lane>,
    /// Most lanes held in memory.
    cap: usize,
    /// Every parked lane is in `lanes`; if not, the table is asked.
    complete: bool,
    /// Lanes must be (re)read from the table.
    stale: bool,
    writes: Vec<Write>,
    to_park: Vec<ParkRow>,
}

impl Parked {
    pub fn new(cap: usize) -> Parked {
        Parked {
            lanes: HashMap::new(),
            cap: cap.max(1),
            complete: false,
            stale: true,
            writes: Vec::new(),
            to_park: Vec::new(),
        }
    }

    /// Read the lanes again (replay, discard and on_dead show there).
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    /// Whether `lane` is known to be parked.
    pub fn contains(&self, lane: &LaneId) -> bool {
        self.lanes.contains_key(lane)
    }

    /// Whether keys not in memory may still be parked (ask the table).
    pub fn partial(&self) -> bool {
        !self.complete
    }

    pub fn insert(&mut self, lane: LaneId, status: Status, attempts: u32, event_id: Option<String>) {
        self.lanes.insert(lane, Lane::new(status, attempts, event_id));
    }

    /// Whether the next step must open a transaction for these lanes: rows
    /// to write, lanes to (re)read, or heads to load.
    pub fn wants_step(&self, now: Instant) -> bool {
        self.stale
            || !self.complete
            || !self.writes.is_empty()
            || !self.to_park.is_empty()
            || self.lanes.values().any(|l| match l.status {
                Status::Next => true,
                Status::Due(at) => at <= now && !l.behind_window,
                _ => false,
            })
    }

    /// Queue `row` to be copied into the table.
    pub fn park(&mut self, row: ParkRow) {
        self.to_park.push(row);
    }

    /// Lanes whose head could be sent now (loaded, and not behind the
    /// window).
    pub fn ready_len(&self) -> usize {
        self.lanes.values().filter(|l| l.ready()).count()
    }

    pub fn in_flight(&self) -> usize {
        self.lanes.values().filter(|l| matches!(l.status, Status::InFlight(_))).count()
    }

    pub fn attempts(&self, lane: &LaneId) -> u32 {
        self.lanes.get(lane).map_or(0, |l| l.attempts)
    }

    /// Note which lanes also have events in the window.
    pub fn set_behind_window(&mut self, in_window: impl Fn(&LaneId) -> bool) {
        for (id, lane) in self.lanes.iter_mut() {
            lane.behind_window = in_window(id);
        }
    }

    /// Lanes whose first row must be read from the table now: due ones and
    /// those whose first row changed. At most `limit` due ones.
    pub fn to_load(&self, now: Instant, limit: usize) -> Vec<LaneId> {
        let mut next: Vec<LaneId> =
            self.lanes.iter().filter(|(_, l)| matches!(l.status, Status::Next)).map(|(id, _)| id.clone()).collect();
        let mut due: Vec<(Instant, &LaneId)> = self
            .lanes
            .iter()
            .filter_map(|(id, l)| match l.status {
                Status::Due(at) if at <= now && !l.behind_window => Some((at, id)),
                _ => None,
            })
            .collect();
        due.sort();
        next.extend(due.into_iter().take(limit).map(|(_, id)| id.clone()));
        next
    }

    /// The earliest instant a lane in memory becomes due.
    pub fn next_due(&self) -> Option<Instant> {
        self.lanes
            .values()
            .filter_map(|l| match l.status {
                Status::Due(at) if !l.behind_window => Some(at),
                _ => None,
            })
            .min()
    }

    /// Loaded lanes ready to send, oldest first.
    pub fn take_ready(&mut self, limit: usize) -> Vec<(LaneId, Arc<Event>)> {
        let mut ready: Vec<(Position, LaneId)> = self
            .lanes
            .iter()
            .filter_map(|(id, l)| match &l.status {
                Status::Ready(e) if l.ready() => Some((e.position, id.clone())),
                _ => None,
            })
            .collect();
        ready.sort();
        ready.truncate(limit);
        let mut out = Vec::with_capacity(ready.len());
        for (_, id) in ready {
            let lane = self.lanes.get_mut(&id).expect("listed above");
            if let Status::Ready(e) = std::mem::replace(&mut lane.status, Status::Next) {
                lane.status = Status::InFlight(e.clone());
                out.push((id, e));
            }
        }
        out
    }

    /// The event in flight on `lane`, when `position` is it.
    pub fn in_flight_event(&self, lane: &LaneId, position: Position) -> Option<Arc<Event>> {
        match &self.lanes.get(lane)?.status {
            Status::InFlight(e) if e.position == position => Some(e.clone()),
            _ => None,
        }
    }

    pub fn delivered(&mut self, lane_id: &LaneId, event: &Event) {
        self.writes.push(Write::Delivered { event_id: event.id.clone(), key: event.key.clone() });
        self.after_first_row_gone(lane_id);
    }

    /// The event in flight on `lane` was never sent (net::Verdict::Unsent):
    /// ready again, no attempt counted, nothing to write.
    pub fn put_back(&mut self, lane_id: &LaneId) {
        if let Some(lane) = self.lanes.get_mut(lane_id) {
            if let Status::InFlight(e) = &lane.status {
                lane.status = Status::Ready(e.clone());
            }
        }
    }

    pub fn retry(
        &mut self,
        lane_id: &LaneId,
        event: &Event,
        at: Instant,
        now: Instant,
        status: Option<u16>,
        error: String,
    ) {
        if let Some(lane) = self.lanes.get_mut(lane_id) {
            lane.attempts += 1;
            lane.status = Status::Due(at);
            self.writes.push(Write::Failed {
                event_id: event.id.clone(),
                attempts: lane.attempts,
                retry_in: at.saturating_duration_since(now),
                status,
                error,
            });
        }
    }

    pub fn dead(&mut self, lane_id: &LaneId, event: &Event, block: bool, status: Option<u16>, error: String) {
        let attempts = self.lanes.get(lane_id).map_or(0, |l| l.attempts + 1);
        let blocks = block && matches!(lane_id, LaneId::Key(_));
        // Under `skip` the next row of the key becomes its head.
        let key = if blocks { None } else { event.key.clone() };
        self.writes.push(Write::Dead { event_id: event.id.clone(), key, attempts, status, error });
        match self.lanes.get_mut(lane_id) {
            Some(lane) if blocks => lane.status = Status::Blocked,
            _ => self.after_first_row_gone(lane_id),
        }
    }

    fn after_first_row_gone(&mut self, lane_id: &LaneId) {
        match lane_id {
            // An unkeyed lane holds one event.
            LaneId::Solo(_) => {
                self.lanes.remove(lane_id);
            }
            LaneId::Key(_) => {
                if let Some(lane) = self.lanes.get_mut(lane_id) {
                    lane.status = Status::Next;
                    lane.attempts = 0;
                }
            }
        }
    }

    /// Take in lanes as the table lists them (first rows, without their
    /// events), keeping lanes that are busy in memory.
    fn load(&mut self, heads: Vec<Head>, complete: bool, now: Instant) {
        let mut kept: HashMap<LaneId, Lane> =
            std::mem::take(&mut self.lanes).into_iter().filter(|(_, l)| l.busy()).collect();
        for head in heads {
            let lane = LaneId::of(head.key.as_deref(), head.position);
            if kept.contains_key(&lane) {
                continue;
            }
            let status = if head.dead { Status::Blocked } else { Status::Due(now + due_in(head.due_in_s)) };
            let event_id = head.key.is_none().then_some(head.event_id);
            kept.insert(lane, Lane::new(status, head.attempts, event_id));
        }
        self.lanes = kept;
        self.complete = complete;
        self.stale = false;
    }

    /// First rows read for `asked` lanes, or for due lanes the table found;
    /// lanes asked for that have no rows left return to the stream.
    fn loaded(&mut self, asked: &[LaneId], heads: Vec<Head>, now: Instant) {
        let mut found = HashSet::new();
        for head in heads {
            let id = LaneId::of(head.key.as_deref(), head.position);
            found.insert(id.clone());
            let lane = self.lanes.entry(id).or_insert_with(|| Lane::new(Status::Next, 0, None));
            if matches!(lane.status, Status::InFlight(_) | Status::Ready(_)) {
                continue;
            }
            if head.key.is_none() {
                lane.event_id = Some(head.event_id.clone());
            }
            lane.attempts = head.attempts;
            lane.status = match head.event {
                _ if head.dead => Status::Blocked,
                Some(event) if head.due_in_s <= 0.0 => Status::Ready(Arc::new(event)),
                _ => Status::Due(now + due_in(head.due_in_s)),
            };
        }
        for id in asked.iter().filter(|id| !found.contains(*id)) {
            self.lanes.remove(id);
        }
        // Memory holds at most `cap` lanes: idle ones leave (the table has
        // them) and are found again when due.
        if self.lanes.len() > self.cap {
            let idle: Vec<LaneId> = self
                .lanes
                .iter()
                .filter(|(_, l)| matches!(l.status, Status::Due(_) | Status::Blocked))
                .map(|(id, _)| id.clone())
                .take(self.lanes.len() - self.cap)
                .collect();
            for id in idle {
                self.lanes.remove(&id);
            }
            self.complete = false;
        }
    }

    // ------------------------------------------------------------------
    // The table.

    /// Write outcomes and copy queued events into outbox.parked. Must
    /// commit no later than the cursor that passes the copied events.
    pub fn flush(&mut self, client: &mut SpiClient<'_>, endpoint_id: i32, block: bool) -> Result<()> {
        write_outcomes(client, endpoint_id, &self.writes, block)?;
        self.writes.clear();
        copy(client, endpoint_id, &self.to_park)?;
        self.to_park.clear();
        Ok(())
    }

    /// Read the lanes again if asked to.
    pub fn refresh(&mut self, endpoint_id: i32, block: bool, now: Instant) -> Result<()> {
        if self.stale {
            let (heads, complete) = lanes(endpoint_id, block, self.cap)?;
            self.load(heads, complete, now);
        }
        Ok(())
    }

    /// Of the `keys` of a page read from the stream, those parked in the
    /// table (only asked when not every lane is in memory).
    pub fn keys_parked(&self, endpoint_id: i32, block: bool, keys: &[String]) -> Result<HashSet<String>> {
        if self.complete || keys.is_empty() {
            return Ok(HashSet::new());
        }
        let rows = Spi::connect_mut(|client| {
            let rows = client.update(
                "SELECT DISTINCT key FROM outbox.parked
                 WHERE endpoint_id = $1 AND key = ANY ($2) AND (state = 'pending' OR $3)",
                None,
                &[endpoint_id.into(), keys.to_vec().into(), block.into()],
            )?;
            let mut out = HashSet::new();
            for row in rows {
                if let Some(k) = row.get::<String>(1)? {
                    out.insert(k);
                }
            }
            SpiResult::Ok(out)
        })?;
        Ok(rows)
    }

    /// Load the first rows of lanes that are due or moved on, at most
    /// `room` due ones; when not every lane is in memory, also heads the
    /// table has due. `in_window`: whether the window holds events of a
    /// lane's key (see `set_behind_window`); lanes loaded here are marked
    /// too, since their heads may be ready at once.
    pub fn load_heads(
        &mut self,
        endpoint_id: i32,
        block: bool,
        room: usize,
        now: Instant,
        in_window: impl Fn(&LaneId) -> bool,
    ) -> Result<()> {
        self.set_behind_window(&in_window);
        let asked = self.to_load(now, room);
        let mut keys = Vec::new();
        let mut solo = Vec::new();
        for id in &asked {
            match id {
                LaneId::Key(k) => keys.push(k.to_string()),
                LaneId::Solo(_) => {
                    if let Some(eid) = self.lanes.get(id).and_then(|l| l.event_id.clone()) {
                        solo.push(eid);
                    }
                }
            }
        }
        if !asked.is_empty() {
            let heads = heads_of(endpoint_id, &keys, &solo, block)?;
            self.loaded(&asked, heads, now);
        }
        let loaded = self.lanes.values().filter(|l| matches!(l.status, Status::Ready(_) | Status::InFlight(_))).count();
        if !self.complete && room > loaded {
            let busy: Vec<String> = self
                .lanes
                .values()
                .filter_map(|l| match &l.status {
                    Status::Ready(e) | Status::InFlight(e) => Some(e.id.clone()),
                    _ => None,
                })
                .collect();
            let heads = due_heads(endpoint_id, block, &busy, (room - loaded) as i64)?;
            self.loaded(&[], heads, now);
        }
        self.set_behind_window(in_window);
        Ok(())
    }
}

fn due_in(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.clamp(0.0, 86_400.0 * 365.0))
}

/// Promote the next row of `key` to be its lane's head (due now), after
/// the head was delivered or skipped.
const PROMOTE_NEXT: &str = "
UPDATE outbox.parked SET next_attempt_at = coalesce(next_attempt_at, pg_catalog.now())
WHERE endpoint_id = $1 AND state = 'pending'
  AND event_id = (SELECT q.event_id FROM outbox.parked AS q
                  WHERE q.endpoint_id = $1 AND q.key = $2 AND (q.state = 'pending' OR $3)
                  ORDER BY q.seq LIMIT 1)";

fn write_outcomes(client: &mut SpiClient<'_>, endpoint_id: i32, writes: &[Write], block: bool) -> Result<()> {
    for w in writes {
        match w {
            Write::Delivered { event_id, key } => {
                client.update(
                    "DELETE FROM outbox.parked WHERE endpoint_id = $1 AND event_id = $2::pg_catalog.uuid",
                    None,
                    &[endpoint_id.into(), event_id.as_str().into()],
                )?;
                if let Some(key) = key {
                    client.update(PROMOTE_NEXT, None, &[endpoint_id.into(), key.as_str().into(), block.into()])?;
                }
            }
            Write::Failed { event_id, attempts, retry_in, status, error } => {
                client.update(
                    "UPDATE outbox.parked SET attempts = $3,
                            next_attempt_at = pg_catalog.now() + $4 * interval '1 millisecond',
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
                )?;
            }
            Write::Dead { event_id, key, attempts, status, error } => {
                client.update(
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
                )?;
                if let Some(key) = key {
                    client.update(PROMOTE_NEXT, None, &[endpoint_id.into(), key.as_str().into(), false.into()])?;
                }
            }
        }
    }
    Ok(())
}

/// Copy events from the stream into outbox.parked, in the given order
/// (which becomes their order inside each lane). They are still in the
/// events tables: rotation only empties a table every persisted cursor has
/// passed, and these are not passed yet. Should one be missing all the
/// same, that is an error, never a silent loss.
fn copy(client: &mut SpiClient<'_>, endpoint_id: i32, rows: &[ParkRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: &dyn Fn(&ParkRow) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
    // Volatile nextval() is evaluated after the sort (PostgreSQL postpones
    // volatile target expressions past ORDER BY), so seq follows u.ord.
    // Rows already parked (ON CONFLICT) are fine; rows missing from the
    // events table come back in `missing`.
    let row = client
        .update(
            "WITH u AS (
                 SELECT * FROM ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::bigint[]),
                                          pg_catalog.unnest($4::bigint[]), pg_catalog.unnest($5::int[]),
                                          pg_catalog.unnest($6::pg_catalog.bool[]), pg_catalog.unnest($7::int[]),
                                          pg_catalog.unnest($8::pg_catalog.float8[]), pg_catalog.unnest($9::int[]),
                                          pg_catalog.unnest($10::pg_catalog.text[])) WITH ORDINALITY
                     AS u(batch, rank, txid, n, dead, attempts, retry_ms, status, error, ord)),
             ins AS (
                 INSERT INTO outbox.parked (endpoint_id, event_id, seq, batch, rank, txid, n, topic, key, type,
                                            payload, headers, created_at, state, attempts, next_attempt_at,
                                            last_status, last_error, failed_at)
                 SELECT $1, e.id, pg_catalog.nextval('outbox.parked_seq'), u.batch, u.rank, e.txid, e.n, e.topic,
                        e.key, e.type, e.payload, e.headers, e.created_at,
                        CASE WHEN u.dead THEN 'dead' ELSE 'pending' END, u.attempts,
                        CASE WHEN NOT u.dead AND u.retry_ms IS NOT NULL
                             THEN pg_catalog.now() + u.retry_ms * interval '1 millisecond' END,
                        u.status, u.error, CASE WHEN u.dead THEN pg_catalog.now() END
                 FROM u JOIN outbox.events AS e ON e.txid = u.txid AND e.n = u.n
                 ORDER BY u.ord
                 ON CONFLICT (endpoint_id, event_id) DO NOTHING
                 RETURNING 1)
             SELECT pg_catalog.array_agg(u.ord ORDER BY u.ord) FILTER (
                        WHERE NOT EXISTS (SELECT FROM outbox.events AS e WHERE e.txid = u.txid AND e.n = u.n))
             FROM u",
            None,
            &[
                endpoint_id.into(),
                col(&|r| r.position.batch).into(),
                col(&|r| r.position.rank).into(),
                col(&|r| r.position.txid).into(),
                rows.iter().map(|r| r.position.n).collect::<Vec<i32>>().into(),
                rows.iter().map(|r| r.dead).collect::<Vec<bool>>().into(),
                rows.iter().map(|r| r.attempts as i32).collect::<Vec<i32>>().into(),
                rows.iter().map(|r| r.retry_in.map(|d| d.as_secs_f64() * 1000.0)).collect::<Vec<Option<f64>>>().into(),
                rows.iter().map(|r| r.status.map(i32::from)).collect::<Vec<Option<i32>>>().into(),
                rows.iter().map(|r| r.error.clone()).collect::<Vec<Option<String>>>().into(),
            ],
        )?
        .first();
    let missing: Vec<i64> = row.get(1)?.unwrap_or_default();
    if let Some(first) = missing.first() {
        let r = &rows[*first as usize - 1];
        return Err(WorkerError(format!(
            "event {} (transaction {}, number {}) is missing from outbox.events and cannot be parked{}",
            r.event_id,
            r.position.txid,
            r.position.n,
            if missing.len() > 1 { format!(", with {} more", missing.len() - 1) } else { String::new() }
        )));
    }
    Ok(())
}

/// Columns of a parked head: key, event id, position, dead, attempts, due
/// in seconds, then `event_columns!` (from column 10).
const HEAD_COLUMNS: &str = concat!(
    "p.key, p.event_id::pg_catalog.text, p.batch, p.rank, p.txid, p.n, p.state = 'dead', p.attempts,
     coalesce(extract(epoch FROM p.next_attempt_at - pg_catalog.now()), 0)::pg_catalog.float8, ",
    event_columns!("p", "p.event_id")
);

fn head_query(sql: &str, with_event: bool, args: &[pgrx::datum::DatumWithOid<'_>]) -> Result<Vec<Head>> {
    let sql = sql.replace("{COLUMNS}", HEAD_COLUMNS);
    Ok(Spi::connect_mut(|client| {
        let rows = client.update(&sql, None, args)?;
        rows::each(rows, |row| {
            let position = Position {
                batch: row.i64(3)?.unwrap_or_default(),
                rank: row.i64(4)?.unwrap_or_default(),
                txid: row.i64(5)?.unwrap_or_default(),
                n: row.i32(6)?.unwrap_or_default(),
            };
            Ok(Head {
                key: row.text(1)?,
                event_id: row.text(2)?.unwrap_or_default(),
                position,
                dead: row.bool(7)?.unwrap_or(false),
                attempts: row.i32(8)?.unwrap_or(0).max(0) as u32,
                due_in_s: row.f64(9)?.unwrap_or(0.0),
                event: if with_event { Some(event_at(row, 10, position)?) } else { None },
            })
        })
    })?)
}

/// The first row of at most `cap` parked lanes of an endpoint (keyed lanes
/// whose first row is dead too, with `block`), and whether that was all.
fn lanes(endpoint_id: i32, block: bool, cap: usize) -> Result<(Vec<Head>, bool)> {
    let mut heads = head_query(
        "SELECT DISTINCT ON (p.key, CASE WHEN p.key IS NULL THEN p.event_id END) {COLUMNS}
         FROM outbox.parked AS p
         WHERE p.endpoint_id = $1 AND (p.state = 'pending' OR ($2 AND p.key IS NOT NULL))
         ORDER BY p.key, CASE WHEN p.key IS NULL THEN p.event_id END, p.seq
         LIMIT $3",
        false,
        &[endpoint_id.into(), block.into(), (cap as i64 + 1).into()],
    )?;
    let complete = heads.len() <= cap;
    heads.truncate(cap);
    Ok((heads, complete))
}

/// The first rows, with their events, of the given keyed lanes and
/// unkeyed events.
fn heads_of(endpoint_id: i32, keys: &[String], solo_ids: &[String], block: bool) -> Result<Vec<Head>> {
    head_query(
        "(SELECT DISTINCT ON (p.key) {COLUMNS} FROM outbox.parked AS p
          WHERE p.endpoint_id = $1 AND p.key = ANY ($2) AND (p.state = 'pending' OR $4)
          ORDER BY p.key, p.seq)
         UNION ALL
         SELECT {COLUMNS} FROM outbox.parked AS p
         WHERE p.endpoint_id = $1 AND p.key IS NULL AND p.event_id = ANY ($3::pg_catalog.uuid[])
           AND p.state = 'pending'",
        true,
        &[endpoint_id.into(), keys.to_vec().into(), solo_ids.to_vec().into(), block.into()],
    )
}

/// Heads the table has due now, soonest first, other than `busy` ones: a
/// head is the first row of its lane that is pending (or dead, with
/// `block`), and only heads carry next_attempt_at (index parked_due).
fn due_heads(endpoint_id: i32, block: bool, busy: &[String], limit: i64) -> Result<Vec<Head>> {
    head_query(
        "SELECT {COLUMNS} FROM outbox.parked AS p
         WHERE p.endpoint_id = $1 AND p.state = 'pending' AND p.next_attempt_at <= pg_catalog.now()
           AND NOT p.event_id = ANY ($3::pg_catalog.uuid[])
           AND NOT EXISTS (SELECT FROM outbox.parked AS q
                           WHERE q.endpoint_id = p.endpoint_id AND q.key = p.key AND q.seq < p.seq
                             AND (q.state = 'pending' OR $2))
         ORDER BY p.next_attempt_at
         LIMIT $4",
        true,
        &[endpoint_id.into(), block.into(), busy.to_vec().into(), limit.into()],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn event(n: i32) -> Arc<Event> {
        Arc::new(Event {
            position: Position { batch: 1, rank: 1, txid: 1, n },
            id: format!("id-{n}"),
            topic: "t".into(),
            key: Some("k".into()),
            event_type: None,
            payload: "{}".into(),
            headers: "{}".into(),
            timestamp: String::new(),
            created: SystemTime::now(),
        })
    }

    fn head(key: &str, due_in_s: f64, with_event: Option<i32>) -> Head {
        Head {
            key: Some(key.into()),
            event_id: format!("e-{key}"),
            position: Position { batch: 1, rank: 1, txid: 1, n: 1 },
            dead: false,
            attempts: 1,
            due_in_s,
            event: with_event.map(|n| (*event(n)).clone()),
        }
    }

    #[test]
    fn due_lanes_load_oldest_first_and_ready_ones_go_in_order() {
        let now = Instant::now();
        let mut p = Parked::new(100);
        p.insert(LaneId::Key("late".into()), Status::Due(now), 0, None);
        p.insert(LaneId::Key("early".into()), Status::Due(now - Duration::from_secs(5)), 0, None);
        p.insert(LaneId::Key("future".into()), Status::Due(now + Duration::from_secs(5)), 0, None);
        p.insert(LaneId::Key("blocked".into()), Status::Blocked, 0, None);
        assert_eq!(p.to_load(now, 10), [LaneId::Key("early".into()), LaneId::Key("late".into())]);
        assert_eq!(p.to_load(now, 1).len(), 1);
        assert_eq!(p.next_due(), Some(now - Duration::from_secs(5)));

        p.lanes.get_mut(&LaneId::Key("late".into())).unwrap().status = Status::Ready(event(2));
        p.lanes.get_mut(&LaneId::Key("early".into())).unwrap().status = Status::Ready(event(1));
        let sent = p.take_ready(1);
        assert_eq!(sent[0].1.position.n, 1);
        assert_eq!(p.in_flight(), 1);
    }

    #[test]
    fn outcomes_move_lanes_on() {
        let now = Instant::now();
        let k = LaneId::Key("k".into());
        let mut p = Parked::new(100);
        p.insert(k.clone(), Status::InFlight(event(1)), 0, None);
        assert!(p.in_flight_event(&k, event(1).position).is_some());
        p.retry(&k, &event(1), now + Duration::from_secs(1), now, Some(500), "HTTP 500".into());
        assert!(matches!(p.lanes[&k].status, Status::Due(_)));
        assert_eq!(p.lanes[&k].attempts, 1);
        p.dead(&k, &event(1), true, Some(500), "HTTP 500".into());
        assert!(matches!(p.lanes[&k].status, Status::Blocked));
        p.lanes.get_mut(&k).unwrap().status = Status::InFlight(event(2));
        p.delivered(&k, &event(2));
        assert!(matches!(p.lanes[&k].status, Status::Next));
        assert_eq!(p.writes.len(), 3);

        let solo = LaneId::Solo(event(3).position);
        p.insert(solo.clone(), Status::InFlight(event(3)), 0, None);
        p.dead(&solo, &event(3), true, None, "x".into());
        assert!(!p.contains(&solo), "an unkeyed dead event blocks nothing");
    }

    /// A parked lane whose key still has events in the window (a replayed
    /// dead letter under on_dead=skip, say) is not handed out, even when
    /// its head is loaded and due: the key would have two events in flight.
    #[test]
    fn a_lane_behind_the_window_waits_for_it() {
        let k = LaneId::Key("k".into());
        let mut p = Parked::new(100);
        p.insert(k.clone(), Status::Ready(event(1)), 0, None);
        p.set_behind_window(|id| *id == k);
        assert_eq!((p.ready_len(), p.take_ready(1).len()), (0, 0));
        p.set_behind_window(|_| false);
        assert_eq!((p.ready_len(), p.take_ready(1).len()), (1, 1));
    }

    #[test]
    fn memory_holds_at_most_cap_lanes() {
        let now = Instant::now();
        let mut p = Parked::new(2);
        p.load(vec![head("a", 10.0, None), head("b", 10.0, None)], false, now);
        assert!(p.partial());
        // The table offers due heads: they are taken, idle lanes leave.
        p.loaded(&[], vec![head("c", -1.0, Some(3)), head("d", -1.0, Some(4))], now);
        assert!(p.lanes.len() <= 2 || p.lanes.values().filter(|l| l.busy()).count() == p.lanes.len());
        assert_eq!(p.ready_len(), 2);
    }
}
