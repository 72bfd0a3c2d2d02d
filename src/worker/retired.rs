//! Requests that dropped endpoint states still have out.
//!
//! An endpoint's state is dropped and built anew from the tables when its
//! topics or kind change, when its step fails, when its options stop
//! parsing, or after an error of the whole step. The new state sends again
//! from the persisted cursor, while the old state's last request of a lane
//! may still be on its way (its chain sends nothing after that one: the
//! state's gate closes when it is dropped). Were the new state to send at
//! once, a key could have two requests out and the receiver would hold
//! both at once, in no order. So a new state of the endpoint sends nothing
//! until every request of its dropped states came back (their outcomes
//! are not applied: those events are read again).
//!
//! Every request reports an outcome (a panic in delivery too), so the
//! wait ends when the last one comes. `until` only keeps a request that
//! somehow never reported from stopping the endpoint for good: it is the
//! longest a request may take once it went out (net::request_bound) and
//! GRACE. One that had not gone out when its state was dropped never will
//! (net::build_request looks at the gate the drop closed), however long
//! it still waits to be built.

use super::endpoint::EndpointState;
use crate::net::Outcome;
use std::time::{Duration, Instant};

/// Beyond the longest a request may take once it went out: its outcome
/// reaching the main thread, and a late scheduler.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Retired {
    out: Vec<Out>,
}

struct Out {
    /// Endpoint ids are those of one installation of the extension.
    extension: u32,
    endpoint_id: i32,
    incarnation: u64,
    /// Requests (jobs) whose last outcome has not come back.
    requests: usize,
    until: Instant,
}

impl Retired {
    /// `ep`, of the installation `extension`, is being dropped, and its
    /// endpoint stays: remember the requests it has out.
    pub fn note(&mut self, extension: Option<u32>, ep: &EndpointState, now: Instant) {
        let (requests, bound) = ep.requests_out();
        if let Some(extension) = extension {
            self.wait_for(extension, ep.id, ep.incarnation, requests, now + bound + GRACE);
        }
    }

    fn wait_for(&mut self, extension: u32, endpoint_id: i32, incarnation: u64, requests: usize, until: Instant) {
        if requests > 0 {
            self.out.push(Out { extension, endpoint_id, incarnation, requests, until });
        }
    }

    /// An outcome no state took: if it is the last of a dropped state's
    /// request, that request is no longer out.
    pub fn on_outcome(&mut self, outcome: &Outcome) {
        if outcome.chained {
            return; // its chain sends one more request, the last
        }
        if let Some(i) = self.out.iter().position(|o| o.incarnation == outcome.incarnation) {
            self.out[i].requests -= 1;
            if self.out[i].requests == 0 {
                self.out.swap_remove(i);
            }
        }
    }

    /// Whether the endpoint must not send yet.
    pub fn holds(&self, extension: Option<u32>, endpoint_id: i32) -> bool {
        self.out.iter().any(|o| Some(o.extension) == extension && o.endpoint_id == endpoint_id)
    }

    /// Stop waiting for requests that never reported in time: the
    /// endpoints and how many requests each did not see come back.
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

    /// When the earliest wait ends by time.
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
    fn an_endpoint_waits_until_its_old_requests_came_back() {
        let now = Instant::now();
        let mut retired = Retired::default();
        retired.wait_for(1, 7, 1, 2, now + Duration::from_secs(5));
        retired.wait_for(1, 7, 2, 0, now);
        assert!(retired.holds(Some(1), 7));
        assert!(!retired.holds(Some(1), 8) && !retired.holds(Some(2), 7) && !retired.holds(None, 7));
        retired.on_outcome(&last(1, true));
        retired.on_outcome(&last(1, false));
        retired.on_outcome(&last(3, false));
        assert!(retired.holds(Some(1), 7), "a chained outcome is not a request's last; incarnation 3 is not retired");
        retired.on_outcome(&last(1, false));
        assert!(!retired.holds(Some(1), 7));

        retired.wait_for(1, 7, 4, 1, now + Duration::from_secs(5));
        assert_eq!(retired.next_end(), Some(now + Duration::from_secs(5)));
        assert!(retired.expire(now + Duration::from_secs(4)).is_empty());
        assert_eq!(retired.expire(now + Duration::from_secs(5)), vec![(7, 1)]);
        assert!(!retired.holds(Some(1), 7) && retired.next_end().is_none());
    }
}
