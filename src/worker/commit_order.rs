//! Orders the transactions of one batch by commit.
//!
//! A tick says which transactions committed since the previous tick, not
//! in which order. Transaction ids do not tell either: an id is handed out
//! at the first write, long before the commit. The commit ring in shared
//! memory (shmem::note_commit) records the pre-commit order, which is the
//! commit order of every pair of transactions that waited on each other;
//! the worker reads it and stores each batch's order in its tick.

use super::store::Txn;
use crate::shmem::{CommitRing, COMMIT_RING};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// The largest batch (in transactions) whose order is stored in its tick;
/// bigger batches (after the worker was down) fall back to txid order.
pub const MAX_ORDERED: usize = 1_000;

#[derive(Default)]
pub struct CommitOrder {
    /// Next ring sequence number to read.
    next_seq: u64,
    /// Numbers taken but not yet written when last read.
    unwritten: Vec<u64>,
    seq_of: HashMap<i64, u64>,
}

impl CommitOrder {
    /// Take in what the ring recorded since the last call.
    pub fn read(&mut self, ring: &CommitRing) {
        let end = ring.next.load(Ordering::Acquire);
        // Entries older than the ring's size are overwritten: skip them.
        let oldest = end.saturating_sub(COMMIT_RING as u64);
        let start = self.next_seq.max(oldest);
        let retry = std::mem::take(&mut self.unwritten);
        for seq in retry.into_iter().filter(|s| *s >= oldest).chain(start..end) {
            let slot = &ring.slots[(seq % COMMIT_RING as u64) as usize];
            let stamp = slot.seq_plus_one.load(Ordering::Acquire);
            if stamp == seq + 1 {
                self.seq_of.insert(slot.txid.load(Ordering::Relaxed) as i64, seq);
            } else if stamp < seq + 1 {
                // Taken, not written yet: that transaction has not
                // committed. Look again next time.
                self.unwritten.push(seq);
            }
        }
        self.next_seq = end;
        // Forget what no new batch can contain anymore.
        let forget_before = end.saturating_sub(2 * COMMIT_RING as u64);
        self.seq_of.retain(|_, s| *s >= forget_before);
    }

    /// Transactions in commit order. The ring knows every transaction that
    /// committed since this worker started, except when more committed than
    /// it holds: the ones it does not know are older (committed before a
    /// crash or restart, or overwritten). They come first, by commit
    /// timestamp when `track_commit_timestamp` is on, else by txid; then
    /// the known ones by their pre-commit sequence.
    pub fn sort(&self, txns: &mut [Txn]) {
        txns.sort_by_key(|t| match self.seq_of.get(&t.txid) {
            None => (0, t.committed_at.unwrap_or(i64::MIN), t.txid as u64),
            Some(seq) => (1, 0, *seq),
        });
    }

    #[cfg(test)]
    fn learn(&mut self, txid: i64, seq: u64) {
        self.seq_of.insert(txid, seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txns(ids: &[(i64, Option<i64>)]) -> Vec<Txn> {
        ids.iter().map(|(txid, committed_at)| Txn { txid: *txid, committed_at: *committed_at }).collect()
    }

    fn ids(txns: &[Txn]) -> Vec<i64> {
        txns.iter().map(|t| t.txid).collect()
    }

    #[test]
    fn unknown_first_by_commit_time_then_known_by_sequence() {
        let mut order = CommitOrder::default();
        order.learn(10, 7);
        order.learn(20, 3);
        // 5 and 30 committed before the ring knew them (a crash, say): 30
        // committed first although its id is higher.
        let mut t = txns(&[(30, Some(100)), (10, None), (5, Some(200)), (20, None)]);
        order.sort(&mut t);
        assert_eq!(ids(&t), [30, 5, 20, 10]);
        // Without commit timestamps, the unknown ones go by txid.
        let mut t = txns(&[(30, None), (10, None), (5, None), (20, None)]);
        order.sort(&mut t);
        assert_eq!(ids(&t), [5, 30, 20, 10]);
    }

    #[test]
    fn reads_the_ring_and_waits_for_unwritten_slots() {
        let ring = Box::<CommitRing>::default();
        let write = |seq: u64, txid: u64| {
            let slot = &ring.slots[seq as usize % COMMIT_RING];
            slot.txid.store(txid, Ordering::Relaxed);
            slot.seq_plus_one.store(seq + 1, Ordering::Release);
        };
        ring.next.store(3, Ordering::Release);
        write(0, 100);
        write(2, 300); // seq 1 was taken but is not written yet
        let mut order = CommitOrder::default();
        order.read(&ring);
        let mut t = txns(&[(300, None), (100, None)]);
        order.sort(&mut t);
        assert_eq!(ids(&t), [100, 300]);
        write(1, 200);
        order.read(&ring);
        let mut t = txns(&[(300, None), (200, None), (100, None)]);
        order.sort(&mut t);
        assert_eq!(ids(&t), [100, 200, 300]);
    }
}
