//! One endpoint as the worker sees it: its configuration, the window of
//! events read from the stream (the scheduler), its parked lanes, its read
//! position and health, and the figures not yet written to
//! `outbox.progress`.

use super::parked::{self, Parked};
use super::store::{Cursor, EndpointRow, ParkRow, ParkedHead, ProgressUpdate};
use crate::config::{self, OnDead};
use crate::egress::Egress;
use crate::event::{Event, Position};
use crate::net::{Failure, NetError, Target, Verdict};
use crate::schedule::{LaneId, Scheduler};
use std::collections::VecDeque;
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

pub struct EndpointState {
    pub id: i32,
    pub generation: u64,
    pub target: Arc<Target>,
    pub like: Vec<String>,
    pub active: bool,
    pub sched: Scheduler<Arc<Event>>,
    pub parked: Parked,
    /// Parked lanes must be (re)read from the table.
    pub parked_stale: bool,
    /// Events to copy into outbox.parked in the next transaction.
    pub to_park: Vec<ParkRow>,
    /// Where reading continues.
    pub read: Cursor,
    /// What `outbox.progress` says.
    saved: Cursor,
    consecutive_failures: u32,
    /// Set from Retry-After: send nothing before this instant.
    hold_until: Option<Instant>,
    latencies: VecDeque<f64>,
    // Not yet written:
    delivered: i64,
    failed_attempts: i64,
    succeeded: bool,
    last_error: Option<String>,
    latency_changed: bool,
    reported: (i32, i32),
    /// Set when the endpoint answered 410 Gone; written as disabled_reason.
    pub gone: Option<String>,
    /// CloudEvents source of this database's events.
    source: String,
    /// Egress settings the target was built with.
    egress: Arc<Egress>,
    /// Requests in flight (a batch is one request).
    requests: usize,
    /// A partial batch has been waiting since (see linger_ms).
    lingering_since: Option<Instant>,
}

impl EndpointState {
    pub fn new(
        row: &EndpointRow,
        config: config::Endpoint,
        generation: u64,
        source: &str,
        egress: &Arc<Egress>,
    ) -> Result<EndpointState, NetError> {
        Ok(EndpointState {
            id: row.id,
            generation,
            target: Arc::new(Target::new(config, source, egress.clone())?),
            egress: egress.clone(),
            like: row.like.clone(),
            active: row.active,
            sched: Scheduler::default(),
            parked: Parked::default(),
            parked_stale: true,
            to_park: Vec::new(),
            read: row.cursor,
            saved: row.cursor,
            consecutive_failures: 0,
            hold_until: None,
            latencies: VecDeque::new(),
            delivered: 0,
            failed_attempts: 0,
            succeeded: false,
            last_error: None,
            latency_changed: false,
            reported: (0, 0),
            gone: None,
            source: source.to_string(),
            requests: 0,
            lingering_since: None,
        })
    }

    /// Take a changed configuration without losing loaded events, when
    /// what was loaded is still what the endpoint wants.
    pub fn reconfigure(&mut self, row: &EndpointRow, config: &config::Endpoint, egress: &Arc<Egress>) -> bool {
        if row.like != self.like || config.kind != self.config().kind {
            return false;
        }
        if config != self.config() || **egress != *self.egress {
            match Target::new(config.clone(), &self.source, egress.clone()) {
                Ok(target) => self.target = Arc::new(target),
                Err(_) => return false,
            }
            self.egress = egress.clone();
        }
        if row.active && !self.active {
            // Resumed (also after 410 Gone): try waiting lanes right away.
            self.gone = None;
            self.hold_until = None;
            self.sched.wake_all();
        }
        self.active = row.active;
        // Replay, discard and on_dead changes show in the parked table.
        self.parked_stale = true;
        true
    }

    /// The endpoint's configuration, as its target holds it.
    pub fn config(&self) -> &config::Endpoint {
        &self.target.endpoint
    }

    fn block_on_dead(&self) -> bool {
        self.config().options.on_dead == OnDead::Block
    }

    /// Take in the parked lanes as the table has them, keeping lanes that
    /// have an event loaded or in flight.
    pub fn load_parked(&mut self, heads: Vec<ParkedHead>, now: Instant) {
        let mut lanes = std::mem::take(&mut self.parked.lanes);
        for head in heads {
            let lane = lane_of(head.key.as_deref(), head.position);
            let busy = lanes
                .get(&lane)
                .is_some_and(|l| matches!(l.status, parked::Status::InFlight(_) | parked::Status::Ready(_)));
            if busy {
                let l = lanes.remove(&lane).expect("checked");
                self.parked.lanes.insert(lane, l);
                continue;
            }
            let status = if head.dead {
                parked::Status::Blocked
            } else {
                parked::Status::Due(now + Duration::from_secs_f64(head.due_in_s.max(0.0)))
            };
            let event_id = head.key.is_none().then_some(head.event_id);
            self.parked
                .lanes
                .insert(lane, parked::Lane { status, attempts: head.attempts, event_id, behind_window: false });
        }
        // Lanes gone from the table stay only while busy.
        for (id, l) in lanes {
            if matches!(l.status, parked::Status::InFlight(_) | parked::Status::Ready(_)) {
                self.parked.lanes.insert(id, l);
            }
        }
        self.parked_stale = false;
    }

    /// Lanes and unkeyed events whose first parked row to read now.
    pub fn parked_to_load(&mut self, now: Instant) -> (Vec<String>, Vec<String>, Vec<LaneId>) {
        for (id, lane) in self.parked.lanes.iter_mut() {
            lane.behind_window = self.sched.has_lane(id);
        }
        let room = self.send_limit(now).saturating_sub(self.requests) * self.config().options.batch_size;
        let (next, due) = self.parked.to_load(now, room);
        let mut keys = Vec::new();
        let mut solo = Vec::new();
        let asked: Vec<LaneId> = next.into_iter().chain(due).collect();
        for id in &asked {
            match id {
                LaneId::Key(k) => keys.push(k.clone()),
                LaneId::Solo(_) => {
                    if let Some(eid) = self.parked.lanes.get(id).and_then(|l| l.event_id.clone()) {
                        solo.push(eid);
                    }
                }
            }
        }
        (keys, solo, asked)
    }

    /// The first rows read for the lanes in `asked`.
    pub fn parked_loaded(&mut self, asked: Vec<LaneId>, heads: Vec<ParkedHead>, now: Instant) {
        let mut found = std::collections::HashSet::new();
        for head in heads {
            let lane_id = lane_of(head.key.as_deref(), head.position);
            found.insert(lane_id.clone());
            let Some(lane) = self.parked.lanes.get_mut(&lane_id) else { continue };
            lane.attempts = head.attempts;
            lane.status = match head.event {
                _ if head.dead => parked::Status::Blocked,
                Some(event) if head.due_in_s <= 0.0 => parked::Status::Ready(Arc::new(event)),
                _ => parked::Status::Due(now + Duration::from_secs_f64(head.due_in_s.max(0.0))),
            };
        }
        // No rows left: the lane returns to the stream.
        for id in asked.into_iter().filter(|id| !found.contains(id)) {
            self.parked.lanes.remove(&id);
        }
    }

    /// How many more events the window takes.
    pub fn window_room(&self, max_events: usize, max_bytes: usize) -> usize {
        if self.sched.bytes() >= max_bytes {
            return 0;
        }
        max_events.saturating_sub(self.sched.len())
    }

    /// Events read from the stream: queued, or parked behind their lane.
    pub fn push(&mut self, event: Event) {
        let lane = LaneId::of(event.key.as_deref(), event.position);
        let position = event.position;
        self.read.after = Some((position.rank, position.n));
        if self.parked.contains(&lane) {
            self.to_park.push(ParkRow::waiting(position));
            return;
        }
        let size = event.size();
        self.sched.push(lane, position, Arc::new(event), size);
    }

    /// When the oldest event of the window is waiting out a backoff, and
    /// the window is full or that event failed a few times, move its lane
    /// to outbox.parked so other lanes and the cursor go on.
    pub fn park_stuck_lanes(&mut self, max_events: usize, max_bytes: usize, now: Instant) {
        if self.is_down() {
            return;
        }
        while let Some(lane) = self.sched.stuck_lane() {
            let full = self.sched.len() >= max_events || self.sched.bytes() >= max_bytes;
            if !full && self.sched.attempts(&lane) < PARK_AFTER_ATTEMPTS {
                break;
            }
            let Some(taken) = self.sched.take_lane(&lane) else { break };
            let due = taken.due.unwrap_or(now);
            let event_id = matches!(lane, LaneId::Solo(_)).then(|| taken.events[0].1.id.clone());
            for (i, (position, _)) in taken.events.iter().enumerate() {
                self.to_park.push(if i == 0 {
                    // The head keeps its failures and its next attempt.
                    ParkRow {
                        attempts: taken.attempts,
                        retry_in: Some(due.saturating_duration_since(now)),
                        error: self.last_error.clone(),
                        ..ParkRow::waiting(*position)
                    }
                } else {
                    ParkRow::waiting(*position)
                });
            }
            self.parked.lanes.insert(
                lane,
                parked::Lane {
                    status: parked::Status::Due(due),
                    attempts: taken.attempts,
                    event_id,
                    behind_window: false,
                },
            );
        }
    }

    fn is_down(&self) -> bool {
        self.consecutive_failures >= DOWN_AFTER_FAILURES
    }

    /// Requests in flight, from the window and from parked lanes.
    pub fn in_flight(&self) -> usize {
        self.sched.in_flight() + self.parked.in_flight()
    }

    /// How many requests may be in flight now.
    pub fn send_limit(&self, now: Instant) -> usize {
        if !self.active || self.gone.is_some() || self.hold_until.is_some_and(|t| t > now) {
            return 0;
        }
        if self.is_down() {
            1
        } else {
            self.config().options.max_in_flight
        }
    }

    pub fn next_wake(&self) -> Option<Instant> {
        let linger_ends = self.lingering_since.map(|t| t + self.config().options.linger);
        [self.sched.next_wake(), self.parked.next_wake(), self.hold_until, linger_ends].into_iter().flatten().min()
    }

    /// Requests to send now, each a batch of events (one event per lane;
    /// one topic per batch), parked lanes first (they are older). A partial
    /// batch waits up to linger_ms while another request is in flight.
    pub fn take_jobs(&mut self, now: Instant) -> Vec<Vec<(LaneId, Arc<Event>)>> {
        self.sched.wake_due(now);
        let limit = self.send_limit(now);
        let batch = self.config().options.batch_size;
        let mut jobs = Vec::new();
        while self.requests < limit {
            let ready = self.parked.ready_len() + self.sched.ready_len();
            if ready == 0 {
                self.lingering_since = None;
                break;
            }
            if ready < batch && self.requests > 0 {
                let since = *self.lingering_since.get_or_insert(now);
                if now < since + self.config().options.linger {
                    break;
                }
            }
            self.lingering_since = None;
            let mut events = self.parked.take_ready(batch);
            while events.len() < batch {
                let Some(d) = self.sched.next() else { break };
                events.push((d.lane, d.item));
            }
            for group in self.by_topic(events, now) {
                self.requests += 1;
                jobs.push(group);
            }
        }
        jobs
    }

    /// Split a batch by topic (one topic per Kafka request). Events whose
    /// topic Kafka cannot take fail here, for good.
    fn by_topic(&mut self, events: Vec<(LaneId, Arc<Event>)>, now: Instant) -> Vec<Vec<(LaneId, Arc<Event>)>> {
        let mut groups: Vec<Vec<(LaneId, Arc<Event>)>> = Vec::new();
        for (lane, event) in events {
            if self.config().kind.is_kafka() {
                if let Err(e) = config::check_kafka_topic(&event.topic) {
                    let failure = Failure { verdict: Verdict::Reject, status: None, message: e.message };
                    let position = event.position;
                    self.on_outcome(&lane, position, Err(failure), now);
                    continue;
                }
            }
            match groups.iter_mut().find(|g| g[0].1.topic == event.topic || !self.config().kind.is_kafka()) {
                Some(g) => g.push((lane, event)),
                None => groups.push(vec![(lane, event)]),
            }
        }
        groups
    }

    /// A request came back (its events' outcomes follow).
    pub fn job_done(&mut self) {
        self.requests = self.requests.saturating_sub(1);
    }

    /// An outcome from the network side.
    pub fn on_outcome(&mut self, lane: &LaneId, position: Position, result: Result<(), Failure>, now: Instant) {
        let (event, parked) = match self.parked.in_flight_event(lane, position) {
            Some(e) => (e, true),
            None => match self.sched.head(lane).filter(|e| e.position == position) {
                Some(e) => (e, false),
                // From state rebuilt since: the event is read again.
                None => return,
            },
        };
        match result {
            Ok(()) => self.on_success(lane, &event, parked),
            Err(failure) => self.on_failure(lane, &event, parked, failure, now),
        }
    }

    fn on_success(&mut self, lane: &LaneId, event: &Event, parked: bool) {
        if parked {
            self.parked.delivered(lane, event);
        } else {
            self.sched.finish_head(lane);
        }
        let ms = SystemTime::now().duration_since(event.created).unwrap_or_default().as_secs_f64() * 1000.0;
        if self.latencies.len() == LATENCY_SAMPLES {
            self.latencies.pop_front();
        }
        self.latencies.push_back(ms);
        self.latency_changed = true;
        if self.is_down() {
            // The endpoint is back: lanes waiting out their backoff because
            // of the outage need not wait any longer.
            self.sched.wake_all();
        }
        self.consecutive_failures = 0;
        self.hold_until = None;
        self.delivered += 1;
        self.succeeded = true;
    }

    fn on_failure(&mut self, lane: &LaneId, event: &Event, parked: bool, failure: Failure, now: Instant) {
        self.failed_attempts += 1;
        self.consecutive_failures += 1;
        self.last_error = Some(failure.message.clone());
        let attempts =
            1 + if parked { self.parked.lanes.get(lane).map_or(0, |l| l.attempts) } else { self.sched.attempts(lane) };
        let opts = &self.config().options;
        let age = SystemTime::now().duration_since(event.created).unwrap_or_default();
        let exhausted =
            opts.max_attempts.is_some_and(|max| attempts >= max) || opts.max_age.is_some_and(|max| age >= max);
        let retry_at = match failure.verdict {
            Verdict::Gone => {
                // The event stays: it goes out when the endpoint is resumed.
                self.gone = Some(failure.message.clone());
                Some(now)
            }
            Verdict::Retry { .. } if exhausted => None,
            Verdict::Reject => None,
            Verdict::Retry { after } => {
                let delay = backoff(attempts, opts.backoff_base, opts.backoff_max, rand::random::<f64>());
                // Retry-After arrives capped (net/failure.rs): adding it to
                // a clock cannot overflow.
                if let Some(a) = after {
                    self.hold_until = Some(now + a);
                }
                Some(now + after.map_or(delay, |a| a.max(delay)))
            }
        };
        match (retry_at, parked) {
            (Some(at), true) => self.parked.retry(lane, event, at, now, failure.status, failure.message),
            (Some(at), false) => {
                self.sched.retry_head(lane, at);
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
        self.to_park.push(ParkRow {
            position: event.position,
            dead: true,
            attempts,
            retry_in: None,
            status: failure.status,
            error: Some(failure.message),
        });
        if self.block_on_dead() && matches!(lane, LaneId::Key(_)) {
            // Out of flight, then out of the window with everything behind it.
            self.sched.retry_head(lane, Instant::now());
            if let Some(taken) = self.sched.take_lane(lane) {
                for (position, _) in taken.events.into_iter().skip(1) {
                    self.to_park.push(ParkRow::waiting(position));
                }
            }
            self.parked.lanes.insert(
                lane.clone(),
                parked::Lane { status: parked::Status::Blocked, attempts, event_id: None, behind_window: false },
            );
        } else {
            self.sched.finish_head(lane);
        }
    }

    /// The cursor to persist: just before the first unfinished event, or
    /// where reading stopped when everything loaded is finished.
    pub fn cursor(&self) -> Cursor {
        match self.sched.first_unfinished() {
            Some(p) => Cursor { tick: p.batch - 1, after: Some((p.rank, p.n - 1)) },
            None => self.read,
        }
    }

    /// What to write to outbox.progress, if anything changed.
    pub fn progress(&self) -> Option<ProgressUpdate> {
        let cursor = self.cursor();
        let gauges = (self.in_flight() as i32, self.sched.retrying() as i32);
        let changed = cursor != self.saved
            || self.delivered != 0
            || self.failed_attempts != 0
            || self.last_error.is_some()
            || self.latency_changed
            || gauges != self.reported;
        changed.then(|| ProgressUpdate {
            endpoint_id: self.id,
            cursor: (cursor != self.saved).then_some(cursor),
            delivered: self.delivered,
            failed_attempts: self.failed_attempts,
            in_flight: gauges.0,
            retrying: gauges.1,
            succeeded: self.succeeded,
            last_error: self.last_error.clone(),
            latency_ms: self.latency_changed.then(|| percentiles(&self.latencies)),
        })
    }

    /// `update` was committed.
    pub fn saved(&mut self, update: &ProgressUpdate) {
        if let Some(c) = update.cursor {
            self.saved = c;
        }
        self.delivered -= update.delivered;
        self.failed_attempts -= update.failed_attempts;
        self.succeeded = false;
        if self.last_error == update.last_error {
            self.last_error = None;
        }
        self.latency_changed = false;
        self.reported = (update.in_flight, update.retrying);
    }
}

fn lane_of(key: Option<&str>, position: Position) -> LaneId {
    LaneId::of(key, position)
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

    #[test]
    fn percentile_picks() {
        let s: VecDeque<f64> = (1..=100).map(f64::from).collect();
        let (p50, p99) = percentiles(&s);
        assert!((50.0..=51.0).contains(&p50));
        assert!((98.0..=100.0).contains(&p99));
    }
}
