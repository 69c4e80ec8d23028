//! Histograms made of atomics, for the hot path to observe into and a scrape to read.
//!
//! A leaf: the counters that observe ([`crate::stats`], the backend pools) and the exposition
//! that reads ([`crate::metrics`]) both use it, and neither has to know the other.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Seconds; connections live from milliseconds to hours.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];
/// Seconds; a backend connect on a LAN takes well under a millisecond.
pub const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 3.0,
];

/// A histogram made of atomics, so observing costs two or three relaxed adds.
#[derive(Debug)]
pub struct Histo {
    bounds: &'static [f64],
    /// One per bound, plus +Inf.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histo {
    pub fn new(bounds: &'static [f64]) -> Histo {
        Histo {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < secs);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts as prometheus-client wants them).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        (
            self.sum_nanos.load(Relaxed) as f64 / 1e9,
            counts.iter().sum(),
            buckets,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_count_each_observation_once() {
        let h = Histo::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(100));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 5.65).abs() < 1e-9);
        assert_eq!(buckets, vec![(0.1, 2), (1.0, 1), (f64::INFINITY, 1)]);
    }
}
