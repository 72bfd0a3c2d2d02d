//! One endpoint as the worker sees it.
//!
//! Its state is grouped by concern: `setup` (configuration and target),
//! `window` (events read from the stream, in lanes), `parked` (lanes worked
//! off from outbox.parked), `cursor` (where reading is and what is
//! persisted), `health` (failures, holds, requests in flight) and `stats`
//! (figures not yet written). The worker drives it through a narrow
//! interface: `sync` does the endpoint's database work for a step (in a
//! subtransaction of its own, see mod.rs), `take_jobs` hands out requests,
//! `on_outcome` takes their results, `next_wake` says when it needs the
//! worker again.

use super::error::Result;
use super::parked::{ParkRow, Parked, Status};
use super::store::{self, EndpointRow, ProgressUpdate};
use super::stream::{self, Cursor};
use super::ticks::Ticks;
use crate::config::{self, OnDead};
use crate::egress::Egress;
use crate::event::{Event, Position};
use crate::net::{request_bound, Failure, Gate, Job, NetError, Outcome, Target, Verdict};
use crate::schedule::{LaneId, Scheduler};
use pgrx::prelude::*;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Consecutive failures after which the endpoint is treated as down: one
/// request at a time probes it instead of every lane hammering it, and no
/// lane is parked (the endpoint is the problem, not the lane).
const DOWN_AFTER_FAILURES: u32 = 3;
/// A lane whose head failed this often while holding back the cursor is
/// parked even when the window has room: a stuck cursor would keep the
/// events tables from being rotated (and a restart would resend all that
/// followed).
const PARK_AFTER_ATTEMPTS: u32 = 3;
/// Latency samples kept for the p50/p99 in outbox.stats.
const LATENCY_SAMPLES: usize = 1024;
/// Progress is written within this long of a change, not on every step: an
/// UPDATE of outbox.progress per step was an eighth of the worker's CPU in
/// an HTTP drain. Losing what was not written yet costs resends after a
/// crash (at-least-once), never events: the cursor written is always
/// behind what was delivered, and parked copies are written before it.
const SAVE_EVERY: Duration = Duration::from_millis(10);
/// Events read per endpoint per step, so one step stays short: a page of
/// 1,000 takes about 2 ms, and while the main thread reads it hands out
/// nothing (chains that end wait for it). With 5,000 a drain's network
/// side ran dry during reads.
const READ_PER_STEP: usize = 1_000;
/// Rows per read query.
const PAGE: usize = 1_000;
/// How much larger an event may be as text than its stored size says:
/// jsonb prints a control character as a six-byte \u escape. Pages are cut
/// by stored sizes times this, so whatever writers put in their payloads a
/// page holds no more text than the window has room for.
const WORST_TEXT_EXPANSION: usize = 6;
/// Events of one lane handed out as one job when an endpoint takes one
/// event per request (a chain, net::Job): the network side sends them one after
/// another. Bounded so that a hot key's run ends now and then and the
/// main thread sees its progress.
const CHAIN_LENGTH: usize = 32;

/// What a step gives every endpoint.
pub struct Step<'a> {
    pub ticks: &'a mut Ticks,
    pub latest_tick: i64,
    /// outbox.window_events, outbox.window_memory (bytes).
    pub window: (usize, usize),
    pub now: Instant,
}

/// Configuration and where requests go.
struct Setup {
    target: Arc<Target>,
    egress: Arc<Egress>,
    /// CloudEvents source of this database's events.
    source: String,
    /// Topic patterns as LIKE patterns.
    like: Vec<String>,
    /// Not paused, not disabled.
    active: bool,
    /// resume_endpoint last seen.
    resumed_at: Option<f64>,
}

/// Where reading is, and what outbox.progress says.
struct Cursors {
    read: Cursor,
    saved: Cursor,
    /// Batches read whose commit order was not exact (ticks.rs), not yet
    /// written.
    inexact_batches: i64,
}

/// How the endpoint is doing.
#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    /// Set from Retry-After: send nothing before this instant. The
    /// endpoint's own word: only its end or resume_endpoint lifts it.
    hold_until: Option<Instant>,
    /// While the endpoint is down, the next probe waits until then. The
    /// worker's guess: a success ends it.
    down_until: Option<Instant>,
    /// Set when the endpoint answered 410 Gone; written as disabled_reason.
    gone: Option<String>,
    /// Whether `gone` was written.
    gone_written: bool,
    /// Requests in flight (a batch is one request).
    requests: usize,
    /// The longest one of them may take (`request_bound`), over the targets
    /// they went out with: a new target's options do not shorten the
    /// requests already out.
    request_bound: Duration,
    /// A partial batch has been waiting since (see linger_ms).
    lingering_since: Option<Instant>,
    /// The last read stopped with events left to read (the window was
    /// full, or the step's share was read): a backlog, whose outcomes
    /// make room for it.
    behind: bool,
}

/// Of a request that came back.
#[derive(Clone, Copy)]
struct Sent {
    /// When the endpoint answered, for the latency figures.
    answered: SystemTime,
    /// The request was one of a chain that goes on (net::Outcome).
    chained: bool,
}

/// Figures not yet written to outbox.progress.
#[derive(Default)]
struct Stats {
    latencies: VecDeque<f64>,
    delivered: i64,
    failed_attempts: i64,
    succeeded: bool,
    last_error: Option<String>,
    latency_changed: bool,
    reported: (i32, i32),
    /// Since when progress changed without being written (see SAVE_EVERY).
    unsaved_since: Option<Instant>,
}

pub struct EndpointState {
    pub id: i32,
    /// Which incarnation of this state sent a job: outcomes of an older one
    /// are dropped (the events are read again from the tables).
    pub incarnation: u64,
    setup: Setup,
    window: Scheduler<Arc<Event>>,
    parked: Parked,
    cursor: Cursors,
    health: Health,
    stats: Stats,
    /// Set while chains handed out may go on (see `stop_chains`).
    chains_open: Arc<AtomicBool>,
}

impl Drop for EndpointState {
    fn drop(&mut self) {
        // Rebuilt, removed or the worker stops: chains of this state must
        // not go on sending what a new state will read and send again.
        self.chains_open.store(false, Ordering::Release);
    }
}

impl EndpointState {
    pub fn new(
        row: &EndpointRow,
        config: config::Endpoint,
        incarnation: u64,
        source: &str,
        egress: &Arc<Egress>,
        parked_cap: usize,
    ) -> std::result::Result<EndpointState, NetError> {
        Ok(EndpointState {
            id: row.id,
            incarnation,
            setup: Setup {
                target: Arc::new(Target::new(config, source, egress.clone())?),
                egress: egress.clone(),
                source: source.to_string(),
                like: row.like.clone(),
                active: row.active,
                resumed_at: row.resumed_at,
            },
            window: Scheduler::default(),
            parked: Parked::new(parked_cap),
            cursor: Cursors { read: row.cursor, saved: row.cursor, inexact_batches: 0 },
            health: Health::default(),
            stats: Stats::default(),
            chains_open: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The endpoint's configuration, as its target holds it.
    pub fn config(&self) -> &config::Endpoint {
        &self.setup.target.endpoint
    }

    pub fn is_active(&self) -> bool {
        self.setup.active
    }

    /// The cursor outbox.progress holds, as far as this state knows.
    pub fn saved_cursor(&self) -> Cursor {
        self.cursor.saved
    }

    /// Requests handed out whose last outcome has not come back, and the
    /// longest the one on its way may still take.
    pub fn requests_out(&self) -> (usize, Duration) {
        (self.health.requests, self.health.request_bound)
    }

    /// The tick reading continues after.
    pub fn read_tick(&self) -> i64 {
        self.cursor.read.tick
    }

    /// Take a changed configuration without losing loaded events, when
    /// what was loaded is still what the endpoint wants. False: build the
    /// state anew from the persisted cursor.
    pub fn reconfigure(&mut self, row: &EndpointRow, config: &config::Endpoint, egress: &Arc<Egress>) -> bool {
        if row.like != self.setup.like || config.kind != self.config().kind {
            return false;
        }
        let retarget = config != self.config() || **egress != *self.setup.egress;
        if retarget || row.active != self.setup.active {
            // Paused, or sent elsewhere or otherwise: chains stop after the
            // request they are on.
            self.stop_chains();
        }
        if retarget {
            match Target::new(config.clone(), &self.setup.source, egress.clone()) {
                Ok(target) => self.setup.target = Arc::new(target),
                Err(_) => return false,
            }
            self.setup.egress = egress.clone();
        }
        if row.active && (!self.setup.active || row.resumed_at != self.setup.resumed_at) {
            // Resumed (also after 410 Gone, or while not paused): try
            // waiting lanes right away.
            self.health.gone = None;
            self.health.gone_written = false;
            self.health.hold_until = None;
            self.health.down_until = None;
            self.window.wake_all();
        }
        self.setup.resumed_at = row.resumed_at;
        self.setup.active = row.active;
        // Replay, discard and on_dead changes show in the parked table.
        self.parked.mark_stale();
        true
    }

    fn block_on_dead(&self) -> bool {
        self.config().options.on_dead == OnDead::Block
    }

    // ------------------------------------------------------------------
    // The database part of a step.

    /// Everything this endpoint does in the database during a step:
    /// persist what it learned, take in parked lanes, read new events.
    /// Returns how many events it read. Runs in a subtransaction: should it
    /// fail, the worker rebuilds this state from the tables and nothing it
    /// wrote remains.
    pub fn sync(&mut self, step: &mut Step) -> Result<usize> {
        let (block, now) = (self.block_on_dead(), step.now);
        self.write_back(now, false)?;
        self.parked.refresh(self.id, block, now)?;
        if !self.setup.active {
            return Ok(0);
        }
        self.park_stuck_lanes(step.window, now);
        let read = self.read_events(step)?;
        self.flush_parked()?;
        let room = self.send_limit(now).saturating_sub(self.health.requests) * self.config().options.batch_size;
        self.parked.load_heads(self.id, block, room, now, |id| self.window.has_lane(id))?;
        Ok(read)
    }

    /// Whether the next step must open a transaction for this endpoint:
    /// something to write that must not wait (parked rows, a 410), progress
    /// unwritten for SAVE_EVERY, a lane to park, parked lanes to read, or
    /// room in the window while `unread` events may wait (ticks not read
    /// yet, or commits not ticked yet). Otherwise the step only hands out
    /// requests, which needs no transaction.
    pub fn wants_step(&self, now: Instant, window: (usize, usize), unread: bool) -> bool {
        let (max_events, max_bytes) = window;
        let gone_unwritten = self.health.gone.is_some() && !self.health.gone_written && self.setup.active;
        let save_due = self.save_due().is_some_and(|t| t <= now);
        // Refilled at half: a step reads up to READ_PER_STEP events, not
        // one page per outcome. And whenever requests could go out but
        // nothing loaded is ready (its lanes are in flight or wait out
        // retries): later keys must not wait for those.
        let half = self.window.len() <= max_events / 2 && self.window.bytes() <= max_bytes / 2;
        let stalled =
            self.window.ready_len() + self.parked.ready_len() == 0 && self.health.requests < self.send_limit(now);
        let refill = self.setup.active && unread && self.window_room(max_events, max_bytes) > 0 && (half || stalled);
        gone_unwritten || save_due || refill || self.lane_to_park(window).is_some() || self.parked.wants_step(now)
    }

    /// When unwritten progress must be written.
    pub fn save_due(&self) -> Option<Instant> {
        self.stats.unsaved_since.map(|t| t + SAVE_EVERY)
    }

    fn mark_unsaved(&mut self, now: Instant) {
        self.stats.unsaved_since.get_or_insert(now);
    }

    /// Write what the worker learned: parked and dead events and outcomes
    /// of parked events at once, a 410 at once, progress when SAVE_EVERY
    /// has passed since it changed (or `force`: the state is about to be
    /// dropped). Parked copies are written before the cursor that passes
    /// them.
    pub fn write_back(&mut self, now: Instant, force: bool) -> Result<()> {
        self.flush_parked()?;
        let save = force || self.save_due().is_some_and(|t| t <= now);
        let update = if save { self.progress() } else { None };
        let gone = self.health.gone.clone().filter(|_| !self.health.gone_written && self.setup.active);
        Spi::connect_mut(|client| {
            if let Some(reason) = &gone {
                store::disable_endpoint(client, self.id, reason)?;
            }
            if let Some(update) = &update {
                store::save_progress(client, update)?;
            }
            Ok::<(), super::error::WorkerError>(())
        })?;
        if gone.is_some() {
            self.health.gone_written = true;
            self.setup.active = false;
        }
        if let Some(update) = update {
            self.saved(&update);
        }
        if save {
            self.stats.unsaved_since = None;
        }
        Ok(())
    }

    fn flush_parked(&mut self) -> Result<()> {
        let (id, block) = (self.id, self.block_on_dead());
        Spi::connect_mut(|client| self.parked.flush(client, id, block))
    }

    /// Read the next events of the stream into the window, a page that fits
    /// at a time; returns how many.
    fn read_events(&mut self, step: &mut Step) -> Result<usize> {
        let (max_events, max_bytes) = step.window;
        let mut budget = READ_PER_STEP;
        loop {
            let room = self.window_room(max_events, max_bytes).min(budget).min(PAGE);
            let lo_id = self.cursor.read.tick;
            if room == 0 || lo_id >= step.latest_tick {
                self.health.behind = lo_id < step.latest_tick;
                return Ok(READ_PER_STEP - budget);
            }
            step.ticks.need(lo_id..=(lo_id + 64).min(step.latest_tick))?;
            let (Some(lo), Some(hi)) = (step.ticks.get(lo_id), step.ticks.get(lo_id + 1)) else {
                return Ok(READ_PER_STEP - budget); // not there (yet): next step
            };
            let bytes = (max_bytes.saturating_sub(self.window.bytes()) / WORST_TEXT_EXPANSION).max(1) as i64;
            let page = stream::read_batch(lo, hi, self.cursor.read.after, &self.setup.like, room as i64, bytes)?;
            let inexact = hi.inexact > 0;
            budget = budget.saturating_sub(page.events.len());
            self.mark_unsaved(step.now);
            self.take_page(page.events)?;
            if page.complete {
                self.cursor.read = Cursor { tick: lo_id + 1, after: None };
                if inexact {
                    self.cursor.inexact_batches += 1;
                }
            }
        }
    }

    /// Events read from the stream: into the window, or parked behind their
    /// lane when it is parked.
    fn take_page(&mut self, events: Vec<Event>) -> Result<()> {
        let parked_keys = if self.parked.partial() {
            let keys: HashSet<String> = events
                .iter()
                .filter_map(|e| e.key.clone())
                .filter(|k| !self.parked.contains(&LaneId::Key(k.as_str().into())))
                .collect();
            self.parked.keys_parked(self.id, self.block_on_dead(), &keys.into_iter().collect::<Vec<_>>())?
        } else {
            HashSet::new()
        };
        for event in events {
            let lane = LaneId::of(event.key.as_deref(), event.position);
            let position = event.position;
            self.cursor.read.after = Some((position.rank, position.n));
            let in_table = event.key.as_ref().is_some_and(|k| parked_keys.contains(k));
            if self.parked.contains(&lane) || in_table {
                self.parked.park(ParkRow::waiting(position, &event.id));
                continue;
            }
            let size = event.size();
            self.window.push(lane, position, Arc::new(event), size);
        }
        Ok(())
    }

    /// How many more events the window takes.
    fn window_room(&self, max_events: usize, max_bytes: usize) -> usize {
        if self.window.bytes() >= max_bytes {
            return 0;
        }
        max_events.saturating_sub(self.window.len())
    }

    /// When the oldest event of the window is waiting out a backoff, and
    /// the window is full or that event failed a few times, move its lane
    /// to outbox.parked so other lanes and the cursor go on.
    fn park_stuck_lanes(&mut self, window: (usize, usize), now: Instant) {
        while let Some(lane) = self.lane_to_park(window) {
            let Some(taken) = self.window.take_lane(&lane) else { break };
            let due = taken.due.unwrap_or(now);
            let event_id = matches!(lane, LaneId::Solo(_)).then(|| taken.events[0].1.id.clone());
            for (i, (position, event)) in taken.events.iter().enumerate() {
                self.parked.park(if i == 0 {
                    // The head keeps its failures and its next attempt.
                    ParkRow {
                        attempts: taken.attempts,
                        retry_in: Some(due.saturating_duration_since(now)),
                        error: self.stats.last_error.clone(),
                        ..ParkRow::waiting(*position, &event.id)
                    }
                } else {
                    ParkRow::waiting(*position, &event.id)
                });
            }
            self.parked.insert(lane, Status::Due(due), taken.attempts, event_id);
        }
    }

    /// The lane park_stuck_lanes moves out next, if any.
    fn lane_to_park(&self, (max_events, max_bytes): (usize, usize)) -> Option<LaneId> {
        if self.is_down() {
            return None;
        }
        let lane = self.window.stuck_lane()?;
        let full = self.window.len() >= max_events || self.window.bytes() >= max_bytes;
        (full || self.window.attempts(&lane) >= PARK_AFTER_ATTEMPTS).then_some(lane)
    }

    // ------------------------------------------------------------------
    // Requests and their outcomes.

    /// Chains handed out so far send no further request once the one they
    /// are on is answered; later jobs get chains of their own.
    pub fn stop_chains(&mut self) {
        self.chains_open.store(false, Ordering::Release);
        self.chains_open = Arc::new(AtomicBool::new(true));
    }

    fn is_down(&self) -> bool {
        self.health.consecutive_failures >= DOWN_AFTER_FAILURES
    }

    /// Requests in flight, from the window and from parked lanes.
    fn in_flight(&self) -> usize {
        self.window.in_flight() + self.parked.in_flight()
    }

    /// Until when nothing may be sent (a Retry-After, or an outage's
    /// pause), if that is later than `now`.
    fn held_until(&self, now: Instant) -> Option<Instant> {
        self.health.hold_until.into_iter().chain(self.health.down_until).max().filter(|t| *t > now)
    }

    /// How many requests may be in flight now.
    fn send_limit(&self, now: Instant) -> usize {
        if !self.setup.active || self.health.gone.is_some() || self.held_until(now).is_some() {
            return 0;
        }
        if self.is_down() {
            1
        } else {
            self.config().options.max_in_flight
        }
    }

    /// When this endpoint next has something to do that no outcome or
    /// commit will wake the worker for: a backoff or a hold ending, a
    /// parked lane coming due, a partial batch done lingering. Never an
    /// instant in the past: what is due now was handled by the step.
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        if !self.setup.active || self.health.gone.is_some() {
            return None; // resume_endpoint wakes the worker
        }
        if let Some(hold) = self.held_until(now) {
            return Some(hold);
        }
        if self.health.requests >= self.send_limit(now) {
            return None; // an outcome comes first
        }
        let linger_ends = self
            .health
            .lingering_since
            .filter(|_| self.window.ready_len() + self.parked.ready_len() > 0)
            .map(|t| t + self.config().options.linger);
        [self.window.next_wake(), self.parked.next_due(), linger_ends].into_iter().flatten().filter(|t| *t > now).min()
    }

    /// Requests to send now, each a batch of events (up to max_per_key
    /// events per lane, in order; one topic per batch), parked lanes first
    /// (they are older). A partial
    /// batch waits up to linger_ms while another request is in flight.
    /// `config`: the worker's configuration counter and the version its
    /// endpoints were loaded under (chains stop when it moves, net::Gate).
    pub fn take_jobs(&mut self, now: Instant, config: Option<(&'static AtomicU64, u64)>) -> Vec<Job> {
        self.window.wake_due(now);
        let limit = self.send_limit(now);
        let batch = self.config().options.batch_size;
        let linger = self.config().options.linger;
        let bound = request_bound(self.config());
        let mut jobs = Vec::new();
        while self.health.requests < limit {
            let ready = self.parked.ready_len() + self.window.ready_len();
            if ready == 0 {
                self.health.lingering_since = None;
                break;
            }
            if ready < batch && self.health.requests > 0 {
                let since = *self.health.lingering_since.get_or_insert(now);
                if now < since + linger {
                    break;
                }
            }
            self.health.lingering_since = None;
            let mut events = self.parked.take_ready(batch);
            // Lanes whose next events wait for this request's outcome
            // (parked lanes: their next events are in outbox.parked). A
            // lane has one run in a request at most.
            let mut waiting: Vec<LaneId> = events.iter().map(|(lane, _)| lane.clone()).collect();
            let per_key = self.config().options.max_per_key;
            // One event per request: a lane's next events go as a chain.
            let chains = batch == 1 && !self.config().kind.is_kafka();
            let mut chain = Vec::new();
            while events.len() < batch {
                let max = if chains { CHAIN_LENGTH } else { per_key.min(batch - events.len()) };
                let Some(run) = self.window.next_run(max, |head, e| chains || head.topic == e.topic) else { break };
                if run.more {
                    waiting.push(run.lane.clone());
                }
                let mut run_events = run.events.into_iter().map(|(_, e)| (run.lane.clone(), e));
                if chains {
                    events.extend(run_events.next());
                    chain.extend(run_events);
                } else {
                    events.extend(run_events);
                }
            }
            self.mark_unsaved(now);
            let taken = events.len();
            let groups = self.by_topic(events, now);
            // Mostly one request takes every event: then a waiting lane is
            // in it, and no set of lanes need be built.
            let whole = groups.len() == 1 && groups[0].len() == taken;
            let set: Option<HashSet<&LaneId>> = (!whole && !waiting.is_empty()).then(|| waiting.iter().collect());
            for group in groups {
                self.health.requests += 1;
                self.health.request_bound = self.health.request_bound.max(bound);
                let eager = match &set {
                    Some(set) => group.iter().any(|(lane, _)| set.contains(lane)),
                    None => whole && !waiting.is_empty(),
                };
                jobs.push(Job {
                    endpoint_id: self.id,
                    incarnation: self.incarnation,
                    target: self.setup.target.clone(),
                    events: group,
                    eager,
                    chain: std::mem::take(&mut chain),
                    // The gate as it stands when the job is handed out.
                    gate: Gate { open: self.chains_open.clone(), config },
                });
            }
        }
        // Requests wait for a free slot, or a partial batch for the one in
        // flight, or a backlog for room in the window: every outcome lets
        // something go.
        if self.health.behind || self.window.ready_len() + self.parked.ready_len() > 0 {
            for job in &mut jobs {
                job.eager = true;
            }
        }
        jobs
    }

    /// Split a batch by topic (one topic per Kafka request). Events whose
    /// topic Kafka cannot take fail here, for good.
    fn by_topic(&mut self, events: Vec<(LaneId, Arc<Event>)>, now: Instant) -> Vec<Vec<(LaneId, Arc<Event>)>> {
        let kafka = self.config().kind.is_kafka();
        let mut groups: Vec<Vec<(LaneId, Arc<Event>)>> = Vec::new();
        for (lane, event) in events {
            if kafka {
                if let Err(e) = config::check_kafka_topic(&self.config().kafka_topic(&event.topic)) {
                    let sent = Sent { answered: SystemTime::now(), chained: false };
                    self.on_result(&lane, event.position, Err(Failure::reject(e.message)), now, sent);
                    continue;
                }
            }
            match groups.iter_mut().find(|g| g[0].1.topic == event.topic || !kafka) {
                Some(g) => g.push((lane, event)),
                None => groups.push(vec![(lane, event)]),
            }
        }
        groups
    }

    /// A request came back with what the endpoint did with each event.
    pub fn on_outcome(&mut self, outcome: Outcome, now: Instant) {
        if outcome.results.iter().any(|(_, _, r)| r.as_ref().is_err_and(Failure::may_hold_the_endpoint)) {
            // The network side closed the gate of the jobs handed out so
            // far; later ones get a new one, once this step has seen what
            // the failure means (whether or not its event is still here
            // to apply it to: its gate stays closed either way).
            self.stop_chains();
        }
        if !outcome.chained {
            self.health.requests = self.health.requests.saturating_sub(1);
            if self.health.requests == 0 {
                self.health.request_bound = Duration::ZERO;
            }
        }
        self.mark_unsaved(now);
        let sent = Sent { answered: outcome.answered, chained: outcome.chained };
        for (lane, position, result) in outcome.results {
            self.on_result(&lane, position, result, now, sent);
        }
    }

    fn on_result(
        &mut self,
        lane: &LaneId,
        position: Position,
        result: std::result::Result<(), Failure>,
        now: Instant,
        sent: Sent,
    ) {
        let (event, parked) = match self.parked.in_flight_event(lane, position) {
            Some(e) => (e, true),
            None => match self.window.head(lane).filter(|e| e.position == position) {
                Some(e) => (e, false),
                // From state rebuilt since: the event is read again.
                None => return,
            },
        };
        match result {
            Ok(()) => self.on_success(lane, &event, parked, sent),
            Err(failure) => self.on_failure(lane, &event, parked, failure, now),
        }
    }

    fn on_success(&mut self, lane: &LaneId, event: &Event, parked: bool, sent: Sent) {
        if parked {
            self.parked.delivered(lane, event);
        } else if sent.chained {
            self.window.finish_head_in_run(lane);
        } else {
            self.window.finish_head(lane);
        }
        let ms = sent.answered.duration_since(event.created).unwrap_or_default().as_secs_f64() * 1000.0;
        if self.stats.latencies.len() == LATENCY_SAMPLES {
            self.stats.latencies.pop_front();
        }
        self.stats.latencies.push_back(ms);
        self.stats.latency_changed = true;
        if self.is_down() {
            // The endpoint is back: lanes waiting out their backoff because
            // of the outage need not wait any longer.
            self.window.wake_all();
        }
        self.health.consecutive_failures = 0;
        // The endpoint is not down: its pause is over. A Retry-After hold
        // stays: nothing is sent while it lasts, so this success is of a
        // request sent before it, and the endpoint's Retry-After was the
        // later word.
        self.health.down_until = None;
        self.stats.delivered += 1;
        self.stats.succeeded = true;
    }

    fn on_failure(&mut self, lane: &LaneId, event: &Event, parked: bool, failure: Failure, now: Instant) {
        if failure.verdict == Verdict::Unsent {
            // Never went out (its gate had closed): not an attempt, and
            // nothing about the endpoint. The next hand-out sends it under
            // what holds now.
            if parked {
                self.parked.put_back(lane);
            } else {
                self.window.put_back_head(lane);
            }
            return;
        }
        self.stats.failed_attempts += 1;
        self.health.consecutive_failures += 1;
        self.stats.last_error = Some(failure.message.clone());
        let attempts = 1 + if parked { self.parked.attempts(lane) } else { self.window.attempts(lane) };
        let opts = &self.config().options;
        let (base, max) = (opts.backoff_base, opts.backoff_max);
        let age = SystemTime::now().duration_since(event.created).unwrap_or_default();
        let exhausted =
            opts.max_attempts.is_some_and(|max| attempts >= max) || opts.max_age.is_some_and(|max| age >= max);
        let retry_at = match failure.verdict {
            Verdict::Gone => {
                // The event stays: it goes out when the endpoint is resumed.
                self.health.gone = Some(failure.message.clone());
                Some(now)
            }
            Verdict::Retry { .. } if exhausted => None,
            Verdict::Reject => None,
            Verdict::Unsent => return, // put back above
            Verdict::Retry { after } => {
                let delay = backoff(attempts, base, max, rand::random::<f64>());
                // Retry-After arrives capped (net/failure.rs): adding it to
                // a clock cannot overflow. Answers to requests sent before
                // the hold may ask less: none lifts what an earlier one
                // asked.
                if let Some(a) = after {
                    self.health.hold_until = Some(self.health.hold_until.map_or(now + a, |h| h.max(now + a)));
                }
                if self.is_down() && failure.endpoint_unavailable() {
                    // Down: the next probe waits out the endpoint's own
                    // backoff. Each probe tries another waiting key, so
                    // pacing by the keys' backoffs alone let a refused
                    // connection loop through a thousand keys a second.
                    // Failures of some keys while others go through (a 500
                    // for one customer) are the keys' to wait out: they
                    // are parked, the endpoint is not held.
                    // Half the ceiling at least: never a run of near-zero
                    // pauses.
                    let failures = self.health.consecutive_failures - DOWN_AFTER_FAILURES + 1;
                    let unit = 0.5 + rand::random::<f64>() / 2.0;
                    let pause = now + backoff(failures, base, max, unit);
                    self.health.down_until = Some(self.health.down_until.map_or(pause, |h| h.max(pause)));
                }
                Some(now + after.map_or(delay, |a| a.max(delay)))
            }
        };
        match (retry_at, parked) {
            (Some(at), true) => self.parked.retry(lane, event, at, now, failure.status, failure.message),
            (Some(at), false) => {
                self.window.retry_head(lane, at);
            }
            (None, true) => {
                let block = self.block_on_dead();
                self.parked.dead(lane, event, block, failure.status, failure.message);
            }
            (None, false) => self.dead_from_window(lane, event, attempts, failure),
        }
    }

    /// The head of a window lane goes to dead letters. With on_dead=block
    /// its key's later events are parked behind it; otherwise they go on.
    fn dead_from_window(&mut self, lane: &LaneId, event: &Event, attempts: u32, failure: Failure) {
        self.parked.park(ParkRow {
            dead: true,
            attempts,
            status: failure.status,
            error: Some(failure.message),
            ..ParkRow::waiting(event.position, &event.id)
        });
        if self.block_on_dead() && matches!(lane, LaneId::Key(_)) {
            // Out of flight, then out of the window with everything behind it.
            self.window.retry_head(lane, Instant::now());
            if let Some(taken) = self.window.take_lane(lane) {
                for (position, e) in taken.events.into_iter().skip(1) {
                    self.parked.park(ParkRow::waiting(position, &e.id));
                }
            }
            self.parked.insert(lane.clone(), Status::Blocked, attempts, None);
        } else {
            self.window.finish_head(lane);
        }
    }

    // ------------------------------------------------------------------
    // Progress.

    /// The cursor to persist: just before the first unfinished event, or
    /// where reading stopped when everything loaded is finished.
    fn persisted_cursor(&self) -> Cursor {
        match self.window.first_unfinished() {
            Some(p) => Cursor { tick: p.batch - 1, after: Some((p.rank, p.n - 1)) },
            None => self.cursor.read,
        }
    }

    /// What to write to outbox.progress, if anything changed.
    fn progress(&self) -> Option<ProgressUpdate> {
        let cursor = self.persisted_cursor();
        let gauges = (self.in_flight() as i32, self.window.retrying() as i32);
        let s = &self.stats;
        let changed = cursor != self.cursor.saved
            || s.delivered != 0
            || s.failed_attempts != 0
            || s.last_error.is_some()
            || s.latency_changed
            || gauges != s.reported
            || self.cursor.inexact_batches != 0;
        changed.then(|| ProgressUpdate {
            endpoint_id: self.id,
            cursor: (cursor != self.cursor.saved).then_some(cursor),
            delivered: s.delivered,
            failed_attempts: s.failed_attempts,
            in_flight: gauges.0,
            retrying: gauges.1,
            succeeded: s.succeeded,
            last_error: s.last_error.clone(),
            latency_ms: s.latency_changed.then(|| percentiles(&s.latencies)),
            inexact_batches: self.cursor.inexact_batches,
        })
    }

    /// `update` was written (and commits with the step, or the state is
    /// rebuilt).
    fn saved(&mut self, update: &ProgressUpdate) {
        if let Some(c) = update.cursor {
            self.cursor.saved = c;
        }
        self.cursor.inexact_batches -= update.inexact_batches;
        let s = &mut self.stats;
        s.delivered -= update.delivered;
        s.failed_attempts -= update.failed_attempts;
        s.succeeded = false;
        if s.last_error == update.last_error {
            s.last_error = None;
        }
        s.latency_changed = false;
        s.reported = (update.in_flight, update.retrying);
    }
}

/// Exponential backoff with full jitter: a uniformly random delay between
/// zero and `base * 2^(attempt-1)`, capped at `max`. `unit` is in [0, 1).
pub fn backoff(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(30));
    let ceiling = exp.min(max);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

fn percentiles(samples: &VecDeque<f64>) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    let mut sorted: Vec<f64> = samples.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let top = |a| backoff(a, base, max, 0.999_999);
        assert!(top(1) <= base && top(1) > base / 2);
        assert!(top(3) <= base * 4 && top(3) > base * 3);
        assert!(top(30) <= max && top(30) > max / 2);
        assert_eq!(backoff(4, base, max, 0.0), Duration::ZERO);
        assert!(backoff(u32::MAX, base, max, 0.5) <= max);
    }

    fn row(options: serde_json::Value) -> EndpointRow {
        EndpointRow {
            id: 1,
            name: "t".into(),
            url: "http://127.0.0.1:1/".into(),
            kind: "webhook".into(),
            topics: vec!["*".into()],
            like: vec!["%".into()],
            options,
            active: true,
            resumed_at: None,
            cursor: Cursor { tick: 0, after: None },
        }
    }

    fn config_of(row: &EndpointRow) -> config::Endpoint {
        config::Endpoint::parse("t", &row.url, "webhook", &row.topics, &row.options).unwrap()
    }

    fn state(options: serde_json::Value) -> EndpointState {
        let row = row(options);
        EndpointState::new(&row, config_of(&row), 1, "/outbox/db", &Arc::default(), 100).unwrap()
    }

    /// Event number `n` (of topic `t`) with key `key`.
    fn event(key: &str, n: i32) -> Event {
        Event {
            position: Position { batch: 1, rank: 1, txid: 10, n },
            id: format!("id-{n}"),
            topic: "t".into(),
            key: Some(key.into()),
            event_type: None,
            payload: "{}".into(),
            headers: "{}".into(),
            timestamp: String::new(),
            created: SystemTime::now(),
        }
    }

    /// Event `n` of key `key` into the window.
    fn push(ep: &mut EndpointState, key: &str, n: i32) {
        let event = event(key, n);
        ep.window.push(LaneId::Key(key.into()), event.position, Arc::new(event), 1);
    }

    /// One event loaded for each of `n` keys.
    fn load(ep: &mut EndpointState, n: i32) {
        for n in 1..=n {
            push(ep, &format!("k{n}"), n);
        }
    }

    /// An endpoint with one event loaded for each of `n` keys, all handed
    /// out.
    fn all_sent(n: i32) -> (EndpointState, Vec<Job>) {
        let mut ep = state(serde_json::json!({ "max_in_flight": n }));
        load(&mut ep, n);
        let jobs = ep.take_jobs(Instant::now(), None);
        assert_eq!(jobs.len(), n as usize);
        (ep, jobs)
    }

    fn outcome(job: &Job, result: std::result::Result<(), Failure>) -> Outcome {
        let (lane, event) = &job.events[0];
        Outcome {
            endpoint_id: 1,
            incarnation: 1,
            results: vec![(lane.clone(), event.position, result)],
            chained: false,
            answered: SystemTime::now(),
        }
    }

    /// The pause an outage earns (the endpoint counted as down) is the
    /// worker's guess, and a success proves it wrong: it ends, even when
    /// the success came from a request sent before the failures. A
    /// Retry-After is the endpoint's own word: a success of a request sent
    /// before it does not end it.
    #[test]
    fn a_success_ends_an_outage_pause_but_not_a_retry_after_hold() {
        let (mut ep, jobs) = all_sent(16);
        let now = Instant::now();
        for job in &jobs[..15] {
            ep.on_outcome(outcome(job, Err(Failure::retry("connection reset"))), now);
        }
        assert!(ep.is_down() && ep.send_limit(now) == 0, "down, and paused");
        ep.on_outcome(outcome(&jobs[15], Ok(())), now);
        assert_eq!(ep.send_limit(now), 16, "back: the pause is over");

        let (mut ep, jobs) = all_sent(2);
        let held = Failure {
            verdict: Verdict::Retry { after: Some(Duration::from_secs(2)) },
            status: Some(429),
            message: "HTTP 429".into(),
        };
        ep.on_outcome(outcome(&jobs[0], Err(held)), now);
        ep.on_outcome(outcome(&jobs[1], Ok(())), now);
        assert_eq!(ep.send_limit(now + Duration::from_secs(1)), 0, "held for the 2 s the endpoint asked");
        assert_eq!(ep.send_limit(now + Duration::from_secs(3)), 2);
    }

    /// Two requests out when the endpoint starts to push back: its answers
    /// ask 60 s and then 2 s. Nothing went out between them, so the later,
    /// shorter one does not shorten the first: the hold lasts 60 s.
    #[test]
    fn a_shorter_retry_after_does_not_cut_a_longer_hold() {
        let (mut ep, jobs) = all_sent(2);
        let now = Instant::now();
        let asked = |secs| Failure {
            verdict: Verdict::Retry { after: Some(Duration::from_secs(secs)) },
            status: Some(429),
            message: "HTTP 429".into(),
        };
        ep.on_outcome(outcome(&jobs[0], Err(asked(60))), now);
        ep.on_outcome(outcome(&jobs[1], Err(asked(2))), now + Duration::from_millis(5));
        assert_eq!(ep.send_limit(now + Duration::from_secs(3)), 0, "held for the 60 s asked first");
        assert!(ep.send_limit(now + Duration::from_secs(61)) > 0);
    }

    /// One request carried two events of a key (Kafka REST with
    /// max_per_key): the first failed with a 500, the second with a 503,
    /// which may hold the endpoint, so the network side closed the
    /// endpoint's gate. The state applies the first and cannot place the
    /// second (it is no longer the lane's head). Its next requests must
    /// still get an open gate, or every one would come back unsent.
    #[test]
    fn a_failure_that_may_hold_the_endpoint_renews_the_gate_also_when_its_event_is_not_placed() {
        let (mut ep, jobs) = all_sent(2);
        let now = Instant::now();
        let (lane, event) = &jobs[0].events[0];
        let failed = |status| Err(Failure { status: Some(status), ..Failure::retry(format!("HTTP {status}")) });
        let behind = Position { n: 99, ..event.position };
        jobs[0].gate.close();
        let outcome = Outcome {
            endpoint_id: 1,
            incarnation: 1,
            results: vec![(lane.clone(), event.position, failed(500)), (lane.clone(), behind, failed(503))],
            chained: false,
            answered: SystemTime::now(),
        };
        ep.on_outcome(outcome, now);
        ep.window.wake_all();
        let again = ep.take_jobs(now, None);
        assert_eq!(again.len(), 1, "the failed event goes out again");
        assert!(again[0].gate.is_open());
    }

    /// A request that came back unsent (its gate had closed before it went
    /// out) is no attempt and says nothing of the endpoint: its event is
    /// handed out again at once, with no failure counted.
    #[test]
    fn an_unsent_request_is_handed_out_again_with_no_attempt_counted() {
        let (mut ep, jobs) = all_sent(4);
        let now = Instant::now();
        for job in &jobs {
            ep.on_outcome(outcome(job, Err(Failure::unsent("not sent"))), now);
        }
        let lane = jobs[0].events[0].0.clone();
        assert_eq!(ep.window.attempts(&lane), 0);
        assert_eq!((ep.health.consecutive_failures, ep.stats.failed_attempts), (0, 0));
        assert!(ep.stats.last_error.is_none());
        assert_eq!(ep.send_limit(now), 4, "not held, not down");
        let positions = |jobs: &[Job]| jobs.iter().map(|j| j.events[0].1.position).collect::<Vec<_>>();
        assert_eq!(positions(&ep.take_jobs(now, None)), positions(&jobs), "every event goes out again");
    }

    /// What a dropped state's requests may still take (worker::retired)
    /// is what the options they went out with allow: lowering the timeout
    /// does not shorten the requests already out.
    #[test]
    fn requests_out_keep_the_longest_bound_they_went_out_with() {
        let slow = serde_json::json!({"max_in_flight": 2, "timeout_ms": 60_000, "max_redirects": 1});
        let mut ep = state(slow);
        assert_eq!(ep.requests_out(), (0, Duration::ZERO));
        load(&mut ep, 2);
        let jobs = ep.take_jobs(Instant::now(), None);
        let bound = Duration::from_secs(2 * 60 + 5);
        assert_eq!(ep.requests_out(), (2, bound), "two hops of 60 s, and the connect timeout");
        let fast = row(serde_json::json!({"max_in_flight": 2, "timeout_ms": 1000}));
        assert!(ep.reconfigure(&fast, &config_of(&fast), &Arc::default()));
        assert_eq!(ep.requests_out(), (2, bound));
        let now = Instant::now();
        ep.on_outcome(outcome(&jobs[0], Ok(())), now);
        assert_eq!(ep.requests_out(), (1, bound));
        ep.on_outcome(outcome(&jobs[1], Ok(())), now);
        assert_eq!(ep.requests_out(), (0, Duration::ZERO));
    }

    /// A request's outcome wakes the main thread at once when a lane in it
    /// has more events waiting for that outcome, and may wait a moment
    /// otherwise.
    #[test]
    fn a_request_is_eager_when_a_lane_in_it_has_more_events_waiting() {
        let batched = serde_json::json!({ "batch_size": 10, "cloudevents": "structured", "max_in_flight": 1 });
        let mut ep = state(batched.clone());
        for (key, n) in [("a", 1), ("b", 2), ("a", 3)] {
            push(&mut ep, key, n);
        }
        let jobs = ep.take_jobs(Instant::now(), None);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].events.len(), 2, "one event of each key (max_per_key 1)");
        assert!(jobs[0].eager, "a's second event waits for this request");

        let mut ep = state(batched);
        for (key, n) in [("a", 1), ("b", 2)] {
            push(&mut ep, key, n);
        }
        let jobs = ep.take_jobs(Instant::now(), None);
        assert_eq!(jobs[0].events.len(), 2);
        assert!(!jobs[0].eager, "nothing waits for this request");
    }

    #[test]
    fn percentile_picks() {
        let s: VecDeque<f64> = (1..=100).map(f64::from).collect();
        let (p50, p99) = percentiles(&s);
        assert!((50.0..=51.0).contains(&p50));
        assert!((98.0..=100.0).contains(&p99));
    }
}
