//! An event as the worker hands it to the network side.

use std::time::SystemTime;

/// Where an event sits in the delivery order: its batch (the tick in which
/// its transaction became visible), its transaction's rank in the batch's
/// commit order, then its emit number in the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub batch: i64,
    /// Place in the batch's commit order (1, 2, ...), or the txid in a
    /// batch taken before commit orders were recorded (worker/ticks.rs).
    pub rank: i64,
    /// Identifies the event together with `n`.
    pub txid: i64,
    pub n: i32,
}

/// A committed event. Strings hold what Postgres produced: `payload` and
/// `headers` are JSON text, `timestamp` is RFC 3339.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub position: Position,
    pub id: String,
    pub topic: String,
    pub key: Option<String>,
    pub event_type: Option<String>,
    pub payload: String,
    pub headers: String,
    pub timestamp: String,
    /// When the event was emitted, for latency figures.
    pub created: SystemTime,
}

impl Event {
    /// Rough memory held by this event, for the worker's memory bound.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Event>()
            + self.id.len()
            + self.topic.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.event_type.as_ref().map_or(0, String::len)
            + self.payload.len()
            + self.headers.len()
            + self.timestamp.len()
    }
}
