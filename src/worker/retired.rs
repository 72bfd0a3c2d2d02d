//! Requests that dropped endpoint states still have out.
//!
//! An endpoint's state is dropped and built anew from the tables when its
//! topics or kind change, when its step fails, when its options stop
//! parsing, or when the extension is installed anew. The new state sends
//! again from the persisted cursor, while the old state's last request of
//! a lane may still be on its way (its chain stops after it: the state's
//! gate closes when it is dropped). Were the new state to send at once, a
//! key could have two requests out, the receiver would hold both at once
//! and see them in no order. So a new state of the endpoint sends nothing
//! until every request of its dropped states came back (their outcomes
//! are not applied: those events are read again), or until those
//! requests' own time is up.

use super::endpoint::EndpointState;
use crate::net::Outcome;
use std::time::{Duration, Instant};

/// Beyond a request's timeout and its connect timeout: building it, and
/// its outcome reaching the main thread.
const GRACE: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Retired {
    out: Vec<Out>,
}

struct Out {
    endpoint_id: i32,
    incarnation: u64,
    /// Requests (jobs) whose last outcome has not come back.
    requests: usize,
    /// When waiting for them ends anyway: a request that has not come back
    /// by then no longer waits for an answer.
    until: Instant,
}

impl Retired {
    /// `ep` is being dropped: remember the requests it has out.
    pub fn note(&mut self, ep: &EndpointState, now: Instant) {
        let requests = ep.requests_out();
        let options = &ep.config().options;
        let until = now + options.connect_timeout + options.timeout + GRACE;
        self.wait_for(ep.id, ep.incarnation, requests, until);
    }

    fn wait_for(&mut self, endpoint_id: i32, incarnation: u64, requests: usize, until: Instant) {
        if requests > 0 {
            self.out.push(Out { endpoint_id, incarnation, requests, until });
        }
    }

    /// An outcome no state took: if it is the last of a dropped state's
    /// request, that request is no longer out.
    pub fn on_outcome(&mut self, outcome: &Outcome) {
        if outcome.chained {
            return; // its chain goes on (it stops after this request)
        }
        if let Some(i) = self.out.iter().position(|o| o.incarnation == outcome.incarnation) {
            self.out[i].requests -= 1;
            if self.out[i].requests == 0 {
                self.out.swap_remove(i);
            }
        }
    }

    /// Whether the endpoint must not send yet.
    pub fn holds(&self, endpoint_id: i32) -> bool {
        self.out.iter().any(|o| o.endpoint_id == endpoint_id)
    }

    /// Stop waiting for requests whose time is up: the endpoints and how
    /// many requests each did not see come back.
    pub fn expire(&mut self, now: Instant) -> Vec<(i32, usize)> {
        let mut over = Vec::new();
        self.out.retain(|o| {
            if o.until <= now {
                over.push((o.endpoint_id, o.requests));
            }
            o.until > now
        });
        over
    }

    /// When the earliest wait ends by time (the worker wakes for outcomes
    /// by itself).
    pub fn next_end(&self) -> Option<Instant> {
        self.out.iter().map(|o| o.until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn last(incarnation: u64, chained: bool) -> Outcome {
        Outcome { endpoint_id: 7, incarnation, results: Vec::new(), chained, answered: SystemTime::now() }
    }

    #[test]
    fn an_endpoint_waits_until_its_old_requests_came_back_or_their_time_is_up() {
        let now = Instant::now();
        let mut retired = Retired::default();
        retired.wait_for(7, 1, 2, now + Duration::from_secs(5));
        retired.wait_for(7, 2, 0, now);
        assert!(retired.holds(7) && !retired.holds(8));
        retired.on_outcome(&last(1, true));
        retired.on_outcome(&last(1, false));
        retired.on_outcome(&last(3, false));
        assert!(retired.holds(7), "a chained outcome is not a request's last, and incarnation 3 is not retired");
        retired.on_outcome(&last(1, false));
        assert!(!retired.holds(7));

        retired.wait_for(7, 4, 1, now + Duration::from_secs(5));
        assert_eq!(retired.next_end(), Some(now + Duration::from_secs(5)));
        assert!(retired.expire(now + Duration::from_secs(4)).is_empty());
        assert_eq!(retired.expire(now + Duration::from_secs(5)), vec![(7, 1)]);
        assert!(!retired.holds(7) && retired.next_end().is_none());
    }
}
