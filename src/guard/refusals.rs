//! A bounded tally of refusals per source, so `/sources` can name who is being refused
//! without a per-connection log line and without memory that grows with the attack.
//!
//! At most [`MAX_KEYS`] sources are tallied; once full, only sources already in the tally
//! are counted. The tally starts afresh every [`WINDOW`], so it shows who is being refused
//! now, not who was last week.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::SourceKey;

pub const MAX_KEYS: usize = 4096;
pub const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct Refusals {
    map: DashMap<SourceKey, AtomicU64>,
    started: std::sync::Mutex<Instant>,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            map: DashMap::new(),
            started: std::sync::Mutex::new(Instant::now()),
        }
    }
}

impl Refusals {
    pub fn count(&self, key: SourceKey) {
        if let Some(c) = self.map.get(&key) {
            c.fetch_add(1, Ordering::Relaxed);
        } else if self.map.len() < MAX_KEYS {
            self.map
                .entry(key)
                .or_insert_with(|| AtomicU64::new(0))
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Vec<(SourceKey, u64)> {
        self.map
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect()
    }

    /// Starts a new window when the current one is over.
    pub fn housekeep(&self) {
        let Ok(mut started) = self.started.lock() else {
            return;
        };
        if started.elapsed() >= WINDOW {
            self.map.clear();
            self.map.shrink_to_fit();
            *started = Instant::now();
        }
    }
}
