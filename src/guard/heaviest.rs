//! The heaviest source in one evictable state, found without a scan.
//!
//! When a listener cap is full, every admission asks "which source holds the most silent
//! (or half-closed, or stalled) connections?". Scanning the source table for it costs
//! O(sources) per admission, and a flood from a hundred thousand sources makes that the
//! accept loop's whole day. Counts only ever move by one, so sources sit in buckets by count
//! (a bucket-queue): moving a source up or down is O(1) and the heaviest is the top
//! non-empty bucket.
//!
//! Only evictable transitions touch this (a connection silent or half-closed past its grace,
//! an OPEN connection that stalls): a connection that opens, moves its bytes and closes never
//! takes the lock. Lock order: a source-table entry may be held while this lock is taken,
//! never the reverse.

use std::collections::HashMap;
use std::sync::Mutex;

use super::SourceKey;

#[derive(Debug, Default)]
pub(crate) struct Heaviest {
    inner: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// Each tracked source: its count and its index in `by_count[count]`.
    pos: HashMap<SourceKey, (usize, usize)>,
    /// `by_count[n]` holds the sources with exactly `n` (index 0 unused).
    by_count: Vec<Vec<SourceKey>>,
    /// The highest `n` whose bucket may be non-empty.
    max: usize,
}

impl Buckets {
    fn take_out(&mut self, count: usize, idx: usize) {
        let bucket = &mut self.by_count[count];
        bucket.swap_remove(idx);
        if let Some(moved) = bucket.get(idx)
            && let Some(p) = self.pos.get_mut(moved)
        {
            p.1 = idx;
        }
    }

    fn put_in(&mut self, key: SourceKey, count: usize) {
        if self.by_count.len() <= count {
            self.by_count.resize_with(count + 1, Vec::new);
        }
        let bucket = &mut self.by_count[count];
        bucket.push(key);
        self.pos.insert(key, (count, bucket.len() - 1));
        self.max = self.max.max(count);
    }

    fn settle_max(&mut self) {
        while self.max > 0 && self.by_count[self.max].is_empty() {
            self.max -= 1;
        }
    }
}

impl Heaviest {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // A panic elsewhere cannot leave the buckets half-moved (each method finishes its
        // moves before returning), so a poisoned lock is still sound to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key` holds one more.
    pub fn inc(&self, key: &SourceKey) {
        let mut b = self.lock();
        let count = match b.pos.get(key).copied() {
            Some((count, idx)) => {
                b.take_out(count, idx);
                count
            }
            None => 0,
        };
        b.put_in(*key, count + 1);
    }

    /// `key` holds one less.
    pub fn dec(&self, key: &SourceKey) {
        let mut b = self.lock();
        let Some((count, idx)) = b.pos.get(key).copied() else {
            return;
        };
        b.take_out(count, idx);
        if count > 1 {
            b.put_in(*key, count - 1);
        } else {
            b.pos.remove(key);
        }
        b.settle_max();
    }

    /// One of the sources holding the most, and how many it holds.
    pub fn top(&self) -> Option<(SourceKey, usize)> {
        let b = self.lock();
        b.by_count.get(b.max)?.last().map(|k| (*k, b.max))
    }

    /// How many `key` holds.
    #[cfg(test)]
    pub fn count(&self, key: &SourceKey) -> usize {
        self.lock().pos.get(key).map_or(0, |p| p.0)
    }

    /// Sources tracked (those holding at least one).
    pub fn len(&self) -> usize {
        self.lock().pos.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> SourceKey {
        SourceKey::new(std::net::IpAddr::from([198, 18, 0, i]), 32, 64)
    }

    #[test]
    fn the_top_follows_every_move() {
        let h = Heaviest::default();
        assert_eq!(h.top(), None);
        h.inc(&k(1));
        h.inc(&k(2));
        h.inc(&k(2));
        assert_eq!(h.top(), Some((k(2), 2)));
        h.inc(&k(1));
        h.inc(&k(1));
        assert_eq!(h.top(), Some((k(1), 3)));
        h.dec(&k(1));
        h.dec(&k(1));
        // Both hold 1 and 2: the top is k(2) with 2.
        assert_eq!(h.top(), Some((k(2), 2)));
        h.dec(&k(2));
        h.dec(&k(2));
        assert_eq!(h.top(), Some((k(1), 1)));
        h.dec(&k(1));
        assert_eq!(h.top(), None);
        assert_eq!(h.len(), 0);
        // A dec for a source that holds nothing is ignored.
        h.dec(&k(9));
        assert_eq!(h.count(&k(9)), 0);
    }

    #[test]
    fn agrees_with_a_scan_under_random_moves() {
        let h = Heaviest::default();
        let mut truth = [0usize; 32];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let i = (seed % 32) as usize;
            if seed & 0x100 != 0 || truth[i] == 0 {
                truth[i] += 1;
                h.inc(&k(i as u8));
            } else {
                truth[i] -= 1;
                h.dec(&k(i as u8));
            }
            let max = *truth.iter().max().unwrap();
            match h.top() {
                None => assert_eq!(max, 0),
                Some((key, n)) => {
                    assert_eq!(n, max);
                    let j = (0..32).find(|&j| k(j as u8) == key).unwrap();
                    assert_eq!(truth[j], max);
                }
            }
        }
    }
}
