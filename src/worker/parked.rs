//! Lanes that live in `outbox.parked` instead of the worker's window.
//!
//! A lane (ordering key) is parked when its head failed long enough to
//! fill the window, or went to dead letters while `on_dead` is `block`.
//! From then on its events are copied to outbox.parked as they are read,
//! and the lane is worked off from that table, one event at a time, in
//! order. Other lanes never wait for it. When its last row is gone, the
//! lane returns to the stream.
//!
//! This module keeps the in-memory view: which lanes are parked and what
//! each waits for. The SQL lives in store.rs.

use crate::event::{Event, Position};
use crate::schedule::LaneId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub enum Status {
    /// Its first row is dead and `on_dead` is `block`.
    Blocked,
    /// Its first row is due at this instant (to be loaded from the table).
    Due(Instant),
    /// Loaded, waiting for a free request slot.
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
    /// Another incarnation of the lane still has events in the window
    /// (a replayed key): wait for those first, or the key would have two
    /// events in flight.
    pub behind_window: bool,
}

/// A write to outbox.parked, done in the worker's next transaction.
#[derive(Debug)]
pub enum Write {
    Delivered { event_id: String },
    Failed { event_id: String, attempts: u32, retry_in: Duration, status: Option<u16>, error: String },
    Dead { event_id: String, attempts: u32, status: Option<u16>, error: String },
}

#[derive(Default)]
pub struct Parked {
    pub lanes: HashMap<LaneId, Lane>,
    pub writes: Vec<Write>,
}

impl Parked {
    pub fn contains(&self, lane: &LaneId) -> bool {
        self.lanes.contains_key(lane)
    }

    pub fn ready_len(&self) -> usize {
        self.lanes.values().filter(|l| matches!(l.status, Status::Ready(_))).count()
    }

    pub fn in_flight(&self) -> usize {
        self.lanes.values().filter(|l| matches!(l.status, Status::InFlight(_))).count()
    }

    /// Lanes whose first row must be read from the table now: due ones and
    /// those whose first row changed. At most `limit` due ones.
    pub fn to_load(&self, now: Instant, limit: usize) -> (Vec<LaneId>, Vec<LaneId>) {
        let next: Vec<LaneId> =
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
        (next, due.into_iter().take(limit).map(|(_, id)| id.clone()).collect())
    }

    /// The earliest instant a lane becomes due.
    pub fn next_wake(&self) -> Option<Instant> {
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
                Status::Ready(e) => Some((e.position, id.clone())),
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
        self.writes.push(Write::Delivered { event_id: event.id.clone() });
        self.after_first_row_gone(lane_id);
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
        self.writes.push(Write::Dead { event_id: event.id.clone(), attempts, status, error });
        match self.lanes.get_mut(lane_id) {
            Some(lane) if block && matches!(lane_id, LaneId::Key(_)) => lane.status = Status::Blocked,
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

    fn lane(status: Status) -> Lane {
        Lane { status, attempts: 0, event_id: None, behind_window: false }
    }

    #[test]
    fn due_lanes_load_oldest_first_and_ready_ones_go_in_order() {
        let now = Instant::now();
        let mut p = Parked::default();
        p.lanes.insert(LaneId::Key("late".into()), lane(Status::Due(now)));
        p.lanes.insert(LaneId::Key("early".into()), lane(Status::Due(now - Duration::from_secs(5))));
        p.lanes.insert(LaneId::Key("future".into()), lane(Status::Due(now + Duration::from_secs(5))));
        p.lanes.insert(LaneId::Key("blocked".into()), lane(Status::Blocked));
        let (next, due) = p.to_load(now, 10);
        assert!(next.is_empty());
        assert_eq!(due, [LaneId::Key("early".into()), LaneId::Key("late".into())]);
        assert_eq!(p.to_load(now, 1).1.len(), 1);
        assert_eq!(p.next_wake(), Some(now - Duration::from_secs(5)));

        p.lanes.get_mut(&LaneId::Key("late".into())).unwrap().status = Status::Ready(event(2));
        p.lanes.get_mut(&LaneId::Key("early".into())).unwrap().status = Status::Ready(event(1));
        let sent = p.take_ready(1);
        assert_eq!(sent[0].1.n(), 1);
        assert_eq!(p.in_flight(), 1);
    }

    #[test]
    fn outcomes_move_lanes_on() {
        let now = Instant::now();
        let k = LaneId::Key("k".into());
        let mut p = Parked::default();
        p.lanes.insert(k.clone(), lane(Status::InFlight(event(1))));
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
        p.lanes.insert(solo.clone(), lane(Status::InFlight(event(3))));
        p.dead(&solo, &event(3), true, None, "x".into());
        assert!(!p.contains(&solo), "an unkeyed dead event blocks nothing");
    }

    impl Event {
        fn n(&self) -> i32 {
            self.position.n
        }
    }
}
