//! One endpoint as the worker sees it: its configuration, the window of
//! loaded events (through the scheduler), read position, health and the
//! figures not yet written to `outbox.progress`.

use super::store::{Cursor, DeadLetter, EndpointRow, ProgressUpdate};
use crate::config;
use crate::event::Event;
use crate::net::{Failure, Target, Verdict};
use crate::schedule::{LaneId, Scheduler};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Consecutive failures after which the endpoint is treated as down: one
/// request at a time probes it instead of every lane hammering it.
const DOWN_AFTER_FAILURES: u32 = 3;
/// Latency samples kept for the p50/p99 in outbox.stats.
const LATENCY_SAMPLES: usize = 1024;

pub struct EndpointState {
    pub id: i32,
    pub generation: u64,
    pub config: config::Endpoint,
    pub target: Arc<Target>,
    pub like: Vec<String>,
    pub active: bool,
    pub sched: Scheduler<Arc<Event>>,
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
    pub dead: Vec<DeadLetter>,
    pub gone: Option<String>,
}

impl EndpointState {
    pub fn new(row: &EndpointRow, config: config::Endpoint, generation: u64) -> EndpointState {
        EndpointState {
            id: row.id,
            generation,
            target: Arc::new(Target::new(&config)),
            config,
            like: row.like.clone(),
            active: row.active,
            sched: Scheduler::default(),
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
            dead: Vec::new(),
            gone: None,
        }
    }

    /// Take a changed configuration without losing loaded events, when
    /// what was loaded is still what the endpoint wants.
    pub fn reconfigure(&mut self, row: &EndpointRow, config: &config::Endpoint) -> bool {
        if row.like != self.like {
            return false;
        }
        if *config != self.config {
            self.target = Arc::new(Target::new(config));
            self.config = config.clone();
        }
        if row.active && !self.active {
            // Resumed (also after 410 Gone): try waiting lanes right away.
            self.gone = None;
            self.sched.wake_all();
        }
        self.active = row.active;
        true
    }

    /// Whether the window has room for more events.
    pub fn window_room(&self, max_events: usize, max_bytes: usize) -> usize {
        if self.sched.bytes() >= max_bytes {
            return 0;
        }
        max_events.saturating_sub(self.sched.len())
    }

    pub fn push(&mut self, event: Event) {
        let lane = LaneId::of(event.key.as_deref(), event.position);
        let position = event.position;
        let size = event.size();
        self.read.after = Some((position.rank, position.n));
        self.sched.push(lane, position, Arc::new(event), size);
    }

    /// How many requests may be in flight now.
    pub fn send_limit(&self, now: Instant) -> usize {
        if !self.active || self.gone.is_some() || self.hold_until.is_some_and(|t| t > now) {
            return 0;
        }
        if self.consecutive_failures >= DOWN_AFTER_FAILURES {
            1
        } else {
            self.config.options.max_in_flight
        }
    }

    pub fn next_wake(&self) -> Option<Instant> {
        [self.sched.next_wake(), self.hold_until].into_iter().flatten().min()
    }

    pub fn on_success(&mut self, lane: &LaneId, now: SystemTime) {
        if let Some((_, event)) = self.sched.finish_head(lane) {
            let ms = now.duration_since(event.created).unwrap_or_default().as_secs_f64() * 1000.0;
            if self.latencies.len() == LATENCY_SAMPLES {
                self.latencies.pop_front();
            }
            self.latencies.push_back(ms);
            self.latency_changed = true;
        }
        if self.consecutive_failures >= DOWN_AFTER_FAILURES {
            // The endpoint is back: lanes waiting out their backoff because
            // of the outage need not wait any longer.
            self.sched.wake_all();
        }
        self.consecutive_failures = 0;
        self.hold_until = None;
        self.delivered += 1;
        self.succeeded = true;
    }

    pub fn on_failure(&mut self, lane: &LaneId, event: &Event, failure: Failure, now: Instant) {
        self.failed_attempts += 1;
        self.consecutive_failures += 1;
        let attempts = self.sched.attempts(lane) + 1;
        let opts = &self.config.options;
        let age = SystemTime::now().duration_since(event.created).unwrap_or_default();
        let exhausted =
            opts.max_attempts.is_some_and(|max| attempts >= max) || opts.max_age.is_some_and(|max| age >= max);
        self.last_error = Some(failure.message.clone());
        match failure.verdict {
            Verdict::Gone => {
                self.gone = Some(failure.message);
                // The event stays unfinished: it goes out when the endpoint
                // is resumed.
                self.sched.retry_head(lane, now);
            }
            Verdict::Reject => self.give_up(lane, event, attempts, failure),
            Verdict::Retry { .. } if exhausted => self.give_up(lane, event, attempts, failure),
            Verdict::Retry { after } => {
                let delay = backoff(attempts, opts.backoff_base, opts.backoff_max, rand::random::<f64>());
                let delay = after.map_or(delay, |a| a.max(delay));
                if let Some(a) = after {
                    self.hold_until = Some(now + a);
                }
                self.sched.retry_head(lane, now + delay);
            }
        }
    }

    fn give_up(&mut self, lane: &LaneId, event: &Event, attempts: u32, failure: Failure) {
        self.dead.push(DeadLetter {
            endpoint_id: self.id,
            position: event.position,
            attempts: attempts as i32,
            status: failure.status.map(i32::from),
            error: failure.message,
        });
        self.sched.finish_head(lane);
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
        let gauges = (self.sched.in_flight() as i32, self.sched.retrying() as i32);
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
