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

/// PostgreSQL's epoch (2000-01-01 UTC) in microseconds after Unix's.
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;
/// 0001-01-01 and 9999-12-31T23:59:59.999999, in microseconds after
/// PostgreSQL's epoch: RFC 3339 has four-digit years.
const FIRST_US: i64 = -63_082_281_600_000_000;
const LAST_US: i64 = 252_455_615_999_999_999;

/// A timestamptz (microseconds after 2000-01-01 UTC) as RFC 3339 in UTC
/// with microseconds, and as a SystemTime (not before 1970). Formatted
/// here rather than by to_char in the read query: the worker reads every
/// event's timestamp, and to_char with extract(epoch) was a tenth of its
/// read. Values outside years 1-9999 (infinity) are clamped to them.
pub fn timestamp(pg_us: i64) -> (String, SystemTime) {
    let us = pg_us.clamp(FIRST_US, LAST_US) + PG_EPOCH_UNIX_US;
    let (days, of_day) = (us.div_euclid(86_400_000_000), us.rem_euclid(86_400_000_000));
    let (y, m, d) = civil_from_days(days);
    let (secs, micros) = (of_day / 1_000_000, of_day % 1_000_000);
    // Digits written by hand: `format!` was most of this function's cost,
    // which the worker pays for every event it reads.
    let mut text = String::with_capacity(27);
    let mut put = |value: i64, width: u32, after: char| {
        for place in (0..width).rev() {
            text.push(char::from(b'0' + (value / 10_i64.pow(place) % 10) as u8));
        }
        text.push(after);
    };
    put(y, 4, '-');
    put(i64::from(m), 2, '-');
    put(i64::from(d), 2, 'T');
    put(secs / 3600, 2, ':');
    put(secs / 60 % 60, 2, ':');
    put(secs % 60, 2, '.');
    put(micros, 6, 'Z');
    let created = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(us.max(0) as u64);
    (text, created)
}

/// Year, month, day of the proleptic Gregorian calendar, `days` after
/// 1970-01-01 (H. Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153; // March = 0
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_print_as_to_char_did() {
        let text = |us| timestamp(us).0;
        assert_eq!(text(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(text(762_525_296_789_012), "2024-02-29T12:34:56.789012Z");
        assert_eq!(text(-1), "1999-12-31T23:59:59.999999Z");
        assert_eq!(text(3_160_857_600_000_001), "2100-03-01T00:00:00.000001Z");
        assert_eq!(text(-3_150_579_599_500_000), "1900-02-28T23:00:00.500000Z");
        assert_eq!(text(-PG_EPOCH_UNIX_US), "1970-01-01T00:00:00.000000Z");
        assert_eq!(text(i64::MIN), "0001-01-01T00:00:00.000000Z");
        assert_eq!(text(i64::MAX), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn timestamps_as_system_time() {
        assert_eq!(timestamp(0).1, SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_800));
        assert_eq!(timestamp(1_500_000).1, SystemTime::UNIX_EPOCH + Duration::from_micros(946_684_801_500_000));
        assert_eq!(timestamp(i64::MIN).1, SystemTime::UNIX_EPOCH, "not before 1970");
    }
}
