//! Orders the transactions of one batch by commit.
//!
//! A tick says which transactions committed since the previous tick, not
//! in which order. Transaction ids do not tell either: an id is handed out
//! at the first write, long before the commit. The commit ring in shared
//! memory (shmem::note_commit) records the pre-commit order, which is the
//! commit order of every pair of transactions that waited on each other;
//! the worker reads it and stores each batch's order in its tick.

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

    /// `txids` in commit order: those the ring knows by their pre-commit
    /// sequence, then the others by txid.
    pub fn sort(&self, txids: &mut [i64]) {
        txids.sort_by_key(|t| (self.seq_of.get(t).copied().unwrap_or(u64::MAX), *t));
    }

    #[cfg(test)]
    fn learn(&mut self, txid: i64, seq: u64) {
        self.seq_of.insert(txid, seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_first_by_sequence_then_unknown_by_txid() {
        let mut order = CommitOrder::default();
        order.learn(10, 7);
        order.learn(20, 3);
        let mut txids = vec![30, 10, 5, 20];
        order.sort(&mut txids);
        assert_eq!(txids, [20, 10, 5, 30]);
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
        let mut txids = vec![300, 100];
        order.sort(&mut txids);
        assert_eq!(txids, [100, 300]);
        write(1, 200);
        order.read(&ring);
        let mut txids = vec![300, 200, 100];
        order.sort(&mut txids);
        assert_eq!(txids, [100, 200, 300]);
    }
}
