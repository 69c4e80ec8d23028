//! Per-source new-connection rate (GCRA, governor keyed by source).
//!
//! governor keeps a key until `retain_recent` finds its bucket full again, so memory grows
//! with distinct sources between sweeps (boinkor-net/governor#171). The listener sweeps once
//! a second, and the limiter has the same hard bound as the source table: once `max_sources`
//! keys are live, sources without a key share one overflow bucket instead of growing it.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use governor::{DefaultKeyedRateLimiter, Quota};

use super::SourceKey;
use crate::config::Limits;

/// governor's `len()` walks every shard of its map (four per core) under their read locks:
/// it is read once in this many checks while the limiter is far from its bound, and at every
/// check within this many keys of it. Fewer checks than that come between two reads, and a
/// check adds a key at most, so the bound holds as before.
const LEN_EVERY: u32 = 64;

#[derive(Debug)]
pub(crate) struct SourceRate {
    limiter: DefaultKeyedRateLimiter<SourceKey>,
    max_keys: usize,
    /// The limiter's key count at its last reading, and the checks made (see [`LEN_EVERY`]).
    len_seen: AtomicUsize,
    checks: AtomicU32,
    /// Milliseconds since `epoch` of the last inline sweep, so a full table is swept at most
    /// every 100 ms on the accept path.
    last_sweep_ms: AtomicU64,
    epoch: Instant,
    /// Connections a source got back by completing an exchange: spent when its bucket is
    /// empty, so only connections that go nowhere use up its rate. At most `max_keys`
    /// sources, at most a burst each; halved every second (see [`SourceRate::housekeep`]).
    credits: dashmap::DashMap<SourceKey, u32>,
    burst: u32,
}

impl SourceRate {
    /// `None` when `conn_rate_per_source` is 0 (no rate limit).
    pub fn new(limits: &Limits) -> Option<SourceRate> {
        let rate = NonZeroU32::new(limits.conn_rate_per_source)?;
        let burst = NonZeroU32::new(limits.conn_burst_per_source).unwrap_or(rate);
        Some(SourceRate {
            limiter: DefaultKeyedRateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
            max_keys: limits.max_sources as usize,
            len_seen: AtomicUsize::new(0),
            checks: AtomicU32::new(0),
            last_sweep_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            credits: dashmap::DashMap::new(),
            burst: burst.get(),
        })
    }

    /// True when `key` may open one more connection now: its bucket has room, or it has a
    /// credit from a connection that completed an exchange.
    /// `credits`: spend them (not with `[cluster]`, whose rate is shared).
    pub fn check(&self, key: &SourceKey, credits: bool) -> bool {
        self.check_bucket(key) || (credits && self.spend(key))
    }

    /// One connection of `key` completed an exchange: it gives back what it took.
    pub fn earn(&self, key: &SourceKey) {
        if let Some(mut c) = self.credits.get_mut(key) {
            *c = (*c + 1).min(self.burst);
        } else if self.credits.len() < self.max_keys {
            let mut c = self.credits.entry(*key).or_insert(0);
            *c = (*c + 1).min(self.burst);
        }
    }

    fn spend(&self, key: &SourceKey) -> bool {
        match self.credits.get_mut(key) {
            Some(mut c) if *c > 0 => {
                *c -= 1;
                true
            }
            _ => false,
        }
    }

    /// Whether the limiter holds `max_keys` keys, read as [`LEN_EVERY`] says.
    fn full(&self) -> bool {
        let seen = self.len_seen.load(Ordering::Relaxed);
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if seen + (LEN_EVERY as usize) < self.max_keys && !n.is_multiple_of(LEN_EVERY) {
            return false;
        }
        let len = self.limiter.len();
        self.len_seen.store(len, Ordering::Relaxed);
        len >= self.max_keys
    }

    fn check_bucket(&self, key: &SourceKey) -> bool {
        if self.full() {
            let now = self.epoch.elapsed().as_millis() as u64;
            let last = self.last_sweep_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= 100
                && self
                    .last_sweep_ms
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.limiter.retain_recent();
            }
            if self.limiter.len() >= self.max_keys {
                return self.limiter.check_key(&SourceKey::OVERFLOW).is_ok();
            }
        }
        self.limiter.check_key(key).is_ok()
    }

    pub fn housekeep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        // Credits fade: a source earns them by what it does now, not by last hour's traffic.
        self.credits.retain(|_, c| {
            *c /= 2;
            *c > 0
        });
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }
}
