//! Delivery order for one endpoint, as plain data structures.
//!
//! Events are grouped in lanes, one per ordering key (events without a key
//! each get a lane of their own). A lane sends its events strictly one after
//! another: the next goes out only when the previous one was acknowledged.
//! Where one request appends several events of a key in order, all or
//! none (a Kafka partition), a lane may hand out a run of its next events
//! at once; after a failure it sends its head alone until that succeeds.
//! Lanes are independent, so a failing key holds back only itself.
//!
//! The scheduler also remembers which loaded events are unfinished, so the
//! worker can persist "everything before this position is done".

use crate::event::Position;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// The ordering lane of an event. A key is shared, not copied, by the
/// window, the jobs and their outcomes (a batch of 500 events cloned it
/// 500 times each way).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LaneId {
    Key(Arc<str>),
    /// An unkeyed event: ordered with nothing else.
    Solo(Position),
}

impl LaneId {
    pub fn of(key: Option<&str>, position: Position) -> LaneId {
        match key {
            Some(k) => LaneId::Key(k.into()),
            None => LaneId::Solo(position),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneState {
    /// Waiting in the ready queue.
    Ready,
    InFlight,
    /// Failed; due again at this instant.
    Backoff(Instant),
}

struct Entry<T> {
    position: Position,
    item: T,
    bytes: usize,
}

struct Lane<T> {
    queue: VecDeque<Entry<T>>,
    state: LaneState,
    /// Failed attempts of the head event.
    attempts: u32,
}

/// The next events of one lane, handed out together, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Run<T> {
    pub lane: LaneId,
    /// Of the first event; 1 for the first try.
    pub attempt: u32,
    pub events: Vec<(Position, T)>,
    /// Events of the lane wait behind the run: they go out only after its
    /// outcome.
    pub more: bool,
}

/// A lane removed from the scheduler (see `take_lane`).
pub struct TakenLane<T> {
    pub attempts: u32,
    pub due: Option<Instant>,
    pub events: Vec<(Position, T)>,
}

pub struct Scheduler<T> {
    lanes: HashMap<LaneId, Lane<T>>,
    ready: VecDeque<LaneId>,
    backoff: BinaryHeap<Reverse<(Instant, LaneId)>>,
    unfinished: BTreeMap<Position, LaneId>,
    in_flight: usize,
    /// Lanes in state Ready.
    ready_lanes: usize,
    bytes: usize,
}

impl<T: Clone> Default for Scheduler<T> {
    fn default() -> Self {
        Scheduler {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            backoff: BinaryHeap::new(),
            unfinished: BTreeMap::new(),
            in_flight: 0,
            ready_lanes: 0,
            bytes: 0,
        }
    }
}

impl<T: Clone> Scheduler<T> {
    /// Add an event at the end of its lane. Events must be pushed in
    /// position order.
    pub fn push(&mut self, lane: LaneId, position: Position, item: T, bytes: usize) {
        debug_assert!(self.unfinished.last_key_value().is_none_or(|(last, _)| *last < position));
        self.unfinished.insert(position, lane.clone());
        self.bytes += bytes;
        let entry = Entry { position, item, bytes };
        match self.lanes.get_mut(&lane) {
            Some(l) => l.queue.push_back(entry),
            None => {
                self.lanes.insert(
                    lane.clone(),
                    Lane { queue: VecDeque::from([entry]), state: LaneState::Ready, attempts: 0 },
                );
                self.ready.push_back(lane);
                self.ready_lanes += 1;
            }
        }
    }

    /// The next events of a ready lane, at most `max` of them: its head and
    /// the events queued behind it that `fits(head, event)` (same
    /// destination), or the head alone while it is being retried (so a
    /// failure costs one event's attempt, and an event too large to share a
    /// request is found).
    pub fn next_run(&mut self, max: usize, fits: impl Fn(&T, &T) -> bool) -> Option<Run<T>> {
        while let Some(lane_id) = self.ready.pop_front() {
            let Some(lane) = self.lanes.get_mut(&lane_id) else {
                continue;
            };
            if lane.state != LaneState::Ready {
                continue;
            }
            let take = if lane.attempts > 0 { 1 } else { max.max(1) };
            let head = &lane.queue.front().expect("lanes are never empty").item;
            let events: Vec<_> = lane
                .queue
                .iter()
                .take(take)
                .take_while(|e| fits(head, &e.item))
                .map(|e| (e.position, e.item.clone()))
                .collect();
            lane.state = LaneState::InFlight;
            self.in_flight += 1;
            self.ready_lanes -= 1;
            let more = lane.queue.len() > events.len();
            return Some(Run { lane: lane_id, attempt: lane.attempts + 1, events, more });
        }
        None
    }

    /// The head of `lane` was acknowledged (or given up on): drop it and let
    /// the lane's next event go.
    pub fn finish_head(&mut self, lane_id: &LaneId) -> Option<(Position, T)> {
        let lane = self.lanes.get_mut(lane_id)?;
        match lane.state {
            LaneState::InFlight => self.in_flight -= 1,
            LaneState::Ready => self.ready_lanes -= 1,
            LaneState::Backoff(_) => {}
        }
        let head = lane.queue.pop_front().expect("lanes are never empty");
        self.unfinished.remove(&head.position);
        self.bytes -= head.bytes;
        lane.attempts = 0;
        if lane.queue.is_empty() {
            self.lanes.remove(lane_id);
        } else {
            lane.state = LaneState::Ready;
            self.ready.push_back(lane_id.clone());
            self.ready_lanes += 1;
        }
        Some((head.position, head.item))
    }

    /// The head of `lane` was acknowledged while the rest of its run is
    /// still being sent (a chain, net::Job::chain): drop it, and the lane stays
    /// in flight until the run's last outcome.
    pub fn finish_head_in_run(&mut self, lane_id: &LaneId) -> Option<(Position, T)> {
        let lane = self.lanes.get_mut(lane_id)?;
        if lane.state != LaneState::InFlight || lane.queue.len() < 2 {
            // Not a run with events left behind its head: as usual.
            return self.finish_head(lane_id);
        }
        let head = lane.queue.pop_front().expect("two events at least");
        self.unfinished.remove(&head.position);
        self.bytes -= head.bytes;
        lane.attempts = 0;
        Some((head.position, head.item))
    }

    /// The head of `lane` failed; try it again at `retry_at`. Returns the
    /// number of failed attempts so far. The lane may be ready again when
    /// the events of a run before its head were acknowledged.
    pub fn retry_head(&mut self, lane_id: &LaneId, retry_at: Instant) -> u32 {
        let Some(lane) = self.lanes.get_mut(lane_id) else {
            return 0;
        };
        match lane.state {
            LaneState::InFlight => self.in_flight -= 1,
            LaneState::Ready => self.ready_lanes -= 1,
            LaneState::Backoff(_) => {}
        }
        lane.attempts += 1;
        lane.state = LaneState::Backoff(retry_at);
        self.backoff.push(Reverse((retry_at, lane_id.clone())));
        lane.attempts
    }

    /// The head of `lane` was handed out but never sent: ready again at
    /// once, no attempt counted. The lane may be ready anyway when the
    /// events of a run before its head were acknowledged.
    pub fn put_back_head(&mut self, lane_id: &LaneId) {
        let Some(lane) = self.lanes.get_mut(lane_id) else { return };
        if lane.state == LaneState::InFlight {
            self.in_flight -= 1;
            lane.state = LaneState::Ready;
            self.ready.push_back(lane_id.clone());
            self.ready_lanes += 1;
        }
    }

    /// The event at the head of `lane`.
    pub fn head(&self, lane_id: &LaneId) -> Option<T> {
        self.lanes.get(lane_id).and_then(|l| l.queue.front()).map(|e| e.item.clone())
    }

    /// Failed attempts of the head of `lane` so far.
    pub fn attempts(&self, lane_id: &LaneId) -> u32 {
        self.lanes.get(lane_id).map_or(0, |l| l.attempts)
    }

    /// Make lanes whose backoff has ended ready again.
    pub fn wake_due(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.backoff.peek() {
            if *at > now {
                break;
            }
            let Reverse((at, lane_id)) = self.backoff.pop().expect("peeked");
            if let Some(lane) = self.lanes.get_mut(&lane_id) {
                if lane.state == LaneState::Backoff(at) {
                    lane.state = LaneState::Ready;
                    self.ready.push_back(lane_id);
                    self.ready_lanes += 1;
                }
            }
        }
    }

    /// Make every lane in backoff ready now (an endpoint came back).
    pub fn wake_all(&mut self) {
        let now = self.backoff.iter().map(|Reverse((at, _))| *at).max();
        if let Some(now) = now {
            self.wake_due(now);
        }
    }

    /// When the earliest backoff ends.
    pub fn next_wake(&self) -> Option<Instant> {
        self.backoff.peek().map(|Reverse((at, _))| *at)
    }

    /// The first loaded event that is not finished.
    pub fn first_unfinished(&self) -> Option<Position> {
        self.unfinished.first_key_value().map(|(p, _)| *p)
    }

    /// The lane of the first unfinished event, when that lane is waiting
    /// out a backoff (the one to move out when the window is full).
    pub fn stuck_lane(&self) -> Option<LaneId> {
        let (_, lane) = self.unfinished.first_key_value()?;
        let state = self.lanes.get(lane)?.state;
        matches!(state, LaneState::Backoff(_)).then(|| lane.clone())
    }

    /// Whether `lane` has loaded events.
    pub fn has_lane(&self, lane: &LaneId) -> bool {
        self.lanes.contains_key(lane)
    }

    /// Remove a lane that is not in flight, with all its events in order,
    /// the failed attempts of its head and when that one is due again.
    pub fn take_lane(&mut self, lane_id: &LaneId) -> Option<TakenLane<T>> {
        if self.lanes.get(lane_id)?.state == LaneState::InFlight {
            return None;
        }
        let lane = self.lanes.remove(lane_id)?;
        if lane.state == LaneState::Ready {
            self.ready_lanes -= 1;
        }
        let due = match lane.state {
            LaneState::Backoff(at) => Some(at),
            _ => None,
        };
        let mut events = Vec::with_capacity(lane.queue.len());
        for e in lane.queue {
            self.unfinished.remove(&e.position);
            self.bytes -= e.bytes;
            events.push((e.position, e.item));
        }
        Some(TakenLane { attempts: lane.attempts, due, events })
    }

    /// Loaded, unfinished events.
    pub fn len(&self) -> usize {
        self.unfinished.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Lanes whose head could be sent now.
    pub fn ready_len(&self) -> usize {
        self.ready_lanes
    }

    /// Lanes whose head failed and waits for its next attempt.
    pub fn retrying(&self) -> usize {
        self.lanes.values().filter(|l| matches!(l.state, LaneState::Backoff(_))).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pos(n: i32) -> Position {
        Position { batch: 1, rank: 1, txid: 100, n }
    }

    fn key(k: &str) -> LaneId {
        LaneId::Key(k.into())
    }

    /// One event handed out (a run of one).
    struct One<T> {
        lane: LaneId,
        item: T,
        attempt: u32,
    }

    trait NextOne<T> {
        fn next(&mut self) -> Option<One<T>>;
    }

    impl<T: Clone> NextOne<T> for Scheduler<T> {
        fn next(&mut self) -> Option<One<T>> {
            let mut run = self.next_run(1, |_, _| true)?;
            let (_, item) = run.events.pop()?;
            Some(One { lane: run.lane, item, attempt: run.attempt })
        }
    }

    /// A chain's events are acknowledged one by one while the rest of it
    /// is still being sent: the lane stays in flight (nothing of it is
    /// handed out twice) until its last outcome; a failure in it leaves
    /// the events not sent in the lane, behind the failed one.
    #[test]
    fn a_lane_stays_in_flight_until_its_chain_ends() {
        let mut s = Scheduler::default();
        for n in 1..=5 {
            s.push(key("a"), pos(n), n, 1);
        }
        let run = s.next_run(4, |_, _| true).unwrap();
        assert_eq!((run.events.len(), run.more), (4, true));
        assert_eq!(s.finish_head_in_run(&key("a")), Some((pos(1), 1)));
        assert_eq!(s.finish_head_in_run(&key("a")), Some((pos(2), 2)));
        assert_eq!((s.in_flight(), s.ready_len(), s.len()), (1, 0, 3));
        assert!(s.next_run(4, |_, _| true).is_none(), "in flight still");
        assert_eq!(s.first_unfinished(), Some(pos(3)));
        // Event 3 failed: the chain ended there; 4 was not sent.
        s.retry_head(&key("a"), Instant::now());
        s.wake_due(Instant::now());
        let again = s.next_run(4, |_, _| true).unwrap();
        assert_eq!((again.events, again.attempt), (vec![(pos(3), 3)], 2), "the failed head alone");
        s.finish_head(&key("a"));
        let rest = s.next_run(4, |_, _| true).unwrap();
        assert_eq!(rest.events, vec![(pos(4), 4), (pos(5), 5)]);
        s.finish_head_in_run(&key("a"));
        // The chain's last outcome: its head is finished as usual.
        s.finish_head(&key("a"));
        assert_eq!((s.len(), s.in_flight()), (0, 0));
    }

    #[test]
    fn a_run_says_whether_events_of_its_lane_wait_behind_it() {
        let mut s = Scheduler::default();
        s.push(key("a"), pos(1), "a1", 1);
        s.push(key("a"), pos(2), "a2", 1);
        s.push(key("a"), pos(3), "a3", 1);
        s.push(key("b"), pos(4), "b1", 1);
        let a = s.next_run(2, |_, _| true).unwrap();
        assert_eq!((a.events.len(), a.more), (2, true));
        let b = s.next_run(2, |_, _| true).unwrap();
        assert_eq!((b.events.len(), b.more), (1, false));
        s.finish_head(&key("a"));
        s.finish_head(&key("a"));
        let last = s.next_run(2, |_, _| true).unwrap();
        assert_eq!((last.events.len(), last.more), (1, false));
    }

    #[test]
    fn one_in_flight_per_key_in_order() {
        let mut s = Scheduler::default();
        s.push(key("a"), pos(1), "a1", 1);
        s.push(key("a"), pos(2), "a2", 1);
        s.push(key("b"), pos(3), "b1", 1);
        let d1 = s.next().unwrap();
        let d2 = s.next().unwrap();
        assert_eq!((d1.item, d2.item), ("a1", "b1"));
        assert!(s.next().is_none(), "a2 must wait for a1");
        assert_eq!((s.in_flight(), s.ready_len()), (2, 0));
        s.finish_head(&key("a"));
        assert_eq!(s.ready_len(), 1);
        assert_eq!(s.next().unwrap().item, "a2");
        assert_eq!(s.ready_len(), 0);
    }

    #[test]
    fn a_failing_key_holds_back_only_itself() {
        let mut s = Scheduler::default();
        let t0 = Instant::now();
        s.push(key("a"), pos(1), "a1", 1);
        s.push(key("a"), pos(2), "a2", 1);
        s.push(key("b"), pos(3), "b1", 1);
        s.push(key("b"), pos(4), "b2", 1);
        let a = s.next().unwrap();
        let b = s.next().unwrap();
        assert_eq!(s.retry_head(&a.lane, t0 + Duration::from_secs(1)), 1);
        s.finish_head(&b.lane);
        assert_eq!(s.next().unwrap().item, "b2");
        assert!(s.next().is_none());
        s.wake_due(t0);
        assert!(s.next().is_none(), "not due yet");
        assert_eq!(s.next_wake(), Some(t0 + Duration::from_secs(1)));
        s.wake_due(t0 + Duration::from_secs(1));
        let retry = s.next().unwrap();
        assert_eq!((retry.item, retry.attempt), ("a1", 2));
        assert_eq!(s.retrying(), 0);
    }

    #[test]
    fn unkeyed_events_are_independent() {
        let mut s = Scheduler::default();
        s.push(LaneId::of(None, pos(1)), pos(1), 1, 1);
        s.push(LaneId::of(None, pos(2)), pos(2), 2, 1);
        assert!(s.next().is_some());
        assert!(s.next().is_some());
    }

    #[test]
    fn first_unfinished_tracks_out_of_order_completion() {
        let mut s = Scheduler::default();
        s.push(key("a"), pos(1), (), 10);
        s.push(key("b"), pos(2), (), 20);
        s.push(key("c"), pos(3), (), 30);
        let a = s.next().unwrap();
        let b = s.next().unwrap();
        let c = s.next().unwrap();
        s.finish_head(&b.lane);
        s.finish_head(&c.lane);
        assert_eq!(s.first_unfinished(), Some(pos(1)));
        assert_eq!((s.len(), s.bytes()), (1, 10));
        s.finish_head(&a.lane);
        assert_eq!(s.first_unfinished(), None);
        assert_eq!((s.len(), s.bytes(), s.in_flight()), (0, 0, 0));
    }

    #[test]
    fn a_lane_in_backoff_can_be_taken_out_whole() {
        let mut s = Scheduler::default();
        let later = Instant::now() + Duration::from_secs(60);
        s.push(key("a"), pos(1), "a1", 1);
        s.push(key("b"), pos(2), "b1", 1);
        s.push(key("a"), pos(3), "a2", 1);
        let a = s.next().unwrap();
        let b = s.next().unwrap();
        assert_eq!(s.stuck_lane(), None, "a is in flight");
        assert!(s.take_lane(&a.lane).is_none(), "in flight lanes stay");
        s.retry_head(&a.lane, later);
        assert_eq!(s.stuck_lane(), Some(key("a")));
        let taken = s.take_lane(&key("a")).unwrap();
        assert_eq!((taken.attempts, taken.due), (1, Some(later)));
        assert_eq!(taken.events.iter().map(|(_, e)| *e).collect::<Vec<_>>(), ["a1", "a2"]);
        assert_eq!(s.first_unfinished(), Some(pos(2)));
        assert!(!s.has_lane(&key("a")));
        s.wake_due(later);
        s.finish_head(&b.lane);
        assert!(s.next().is_none() && s.len() == 0 && s.bytes() == 0);
    }

    #[test]
    fn a_run_hands_out_a_lanes_next_events_and_a_retry_sends_the_head_alone() {
        let mut s = Scheduler::default();
        let t0 = Instant::now();
        for n in 1..=5 {
            s.push(key("a"), pos(n), n, 1);
        }
        s.push(key("b"), pos(6), 6, 1);
        let run = s.next_run(3, |_, _| true).unwrap();
        assert_eq!(run.events.iter().map(|(_, e)| *e).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((s.in_flight(), s.ready_len()), (1, 1));
        assert_eq!(s.next_run(3, |_, _| true).unwrap().events.len(), 1, "b has one event");
        assert!(s.next_run(3, |_, _| true).is_none(), "a is in flight");
        // 1 acknowledged, 2 failed: 2 is retried alone, 3 is sent again after.
        s.finish_head(&key("a"));
        assert_eq!(s.retry_head(&key("a"), t0), 1);
        assert_eq!((s.in_flight(), s.ready_len(), s.retrying()), (1, 0, 1));
        s.wake_due(t0);
        let retry = s.next_run(3, |_, _| true).unwrap();
        assert_eq!((retry.attempt, retry.events.iter().map(|(_, e)| *e).collect::<Vec<_>>()), (2, vec![2]));
        s.finish_head(&key("a"));
        assert_eq!(s.next_run(10, |_, _| true).unwrap().events.iter().map(|(_, e)| *e).collect::<Vec<_>>(), [3, 4, 5]);
        for _ in 0..3 {
            s.finish_head(&key("a"));
        }
        s.finish_head(&key("b"));
        assert!(s.next_run(1, |_, _| true).is_none());
        // A run stops where the destination changes.
        for n in 7..=9 {
            s.push(key("c"), pos(n), n, 1);
        }
        let run = s.next_run(10, |head, e| (head % 2) == (e % 2)).unwrap();
        assert_eq!(run.events.iter().map(|(_, e)| *e).collect::<Vec<_>>(), [7]);
        for _ in 7..=9 {
            s.finish_head(&key("c"));
        }
        assert_eq!((s.len(), s.in_flight(), s.ready_len(), s.bytes()), (0, 0, 0, 0));
    }

    #[test]
    fn wake_all_ends_every_backoff() {
        let mut s = Scheduler::default();
        let far = Instant::now() + Duration::from_secs(3600);
        s.push(key("a"), pos(1), (), 1);
        s.push(key("b"), pos(2), (), 1);
        let a = s.next().unwrap();
        let b = s.next().unwrap();
        s.retry_head(&a.lane, far);
        s.retry_head(&b.lane, far + Duration::from_secs(1));
        s.wake_all();
        assert!(s.next().is_some() && s.next().is_some());
    }
}
