//! A bounded tally of refusals per source, so `/sources` can name who is being refused
//! without a per-connection log line and without memory that grows with the attack.
//!
//! At most [`MAX_KEYS`] sources are tallied; once full, only sources already in the tally
//! are counted. The tally starts afresh every [`WINDOW`], so it shows who is being refused
//! now, not who was last week.
//!
//! Each source has two counts: every refusal (what `/sources` shows), and those its own caps
//! made (what the kernel layer bans on). A listener-wide cap refuses whoever comes next, so
//! such a refusal says nothing of the source; but a source that is also refused by its own
//! caps must not hide those behind the listener-wide ones it, or anyone, causes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::SourceKey;
use crate::stats::Reject;

pub const MAX_KEYS: usize = 4096;
pub const WINDOW: Duration = Duration::from_secs(60);

/// A refusal made by a cap of the source's own (`rate`, `source_conns`, `source_half_open`,
/// `source_half_closed`): evidence against the source. Every other refusal reason is a cap
/// shared with others (the listener's, the network's) or the operator's choice.
pub fn against_the_source(reason: Reject) -> bool {
    matches!(
        reason,
        Reject::Rate
            | Reject::SourceConns
            | Reject::SourceHalfOpen
            | Reject::SourceHalfClosed
            | Reject::SourceQueued
    )
}

/// One source's counts in the current window.
#[derive(Debug, Default)]
struct Count {
    all: AtomicU64,
    own: AtomicU64,
}

impl Count {
    fn add(&self, own: bool) {
        self.all.fetch_add(1, Ordering::Relaxed);
        if own {
            self.own.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Refusals {
    map: DashMap<SourceKey, Count>,
    /// Something was counted in this window.
    any: std::sync::atomic::AtomicBool,
    started: std::sync::Mutex<Instant>,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            map: DashMap::new(),
            any: std::sync::atomic::AtomicBool::new(false),
            started: std::sync::Mutex::new(Instant::now()),
        }
    }
}

impl Refusals {
    /// Counts one against `key`; `own` when the source's own cap made it.
    pub fn count(&self, key: SourceKey, own: bool) {
        if let Some(c) = self.map.get(&key) {
            c.add(own);
        } else if self.map.len() < MAX_KEYS {
            self.map.entry(key).or_default().add(own);
        }
        // After the insert, so a window that starts between them does not lose it.
        self.any.store(true, Ordering::Relaxed);
    }

    /// Whether `key` was counted in this window. One relaxed load when nobody was (a
    /// DashMap's `is_empty` would lock every shard, on every admission).
    pub fn has(&self, key: &SourceKey) -> bool {
        self.any.load(Ordering::Relaxed) && self.map.contains_key(key)
    }

    /// Every source's count, whatever made it.
    pub fn snapshot(&self) -> Vec<(SourceKey, u64)> {
        self.map
            .iter()
            .map(|e| (*e.key(), e.value().all.load(Ordering::Relaxed)))
            .collect()
    }

    /// The sources their own caps refused, with those counts only.
    pub fn own(&self) -> Vec<(SourceKey, u64)> {
        self.map
            .iter()
            .map(|e| (*e.key(), e.value().own.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Starts a new window when the current one is over.
    pub fn housekeep(&self) {
        let Ok(mut started) = self.started.lock() else {
            return;
        };
        if started.elapsed() >= WINDOW {
            self.any.store(false, Ordering::Relaxed);
            self.map.clear();
            self.map.shrink_to_fit();
            *started = Instant::now();
        }
    }
}
