//! The source table: live connections per source, and who to evict.
//!
//! An entry exists only while its source holds a connection, so memory follows live
//! connections and the table has a hard bound (`max_sources`). Each entry keeps its
//! half-open and half-closed connections in arrival order: eviction aborts the **oldest**,
//! because the newest half-closed connection is usually an ordinary close in flight while the
//! oldest is the one lingering.
//!
//! Locking rule (dashmap can deadlock across shards, xacrimon/dashmap#369): never hold an
//! entry guard while touching another entry. Victim search iterates with no guard held, then
//! locks the one victim entry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use dashmap::DashMap;
use tokio::sync::Notify;

use super::SourceKey;
use crate::stats::EvictState;

/// The handle another task uses to abort a connection it evicts.
#[derive(Debug, Default)]
pub struct ConnCtl {
    evicted: AtomicBool,
    notify: Notify,
}

impl ConnCtl {
    /// True once this connection was evicted; its counts are already given back.
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// Resolves when the connection is evicted. Cancel-safe: the flag is checked first, and
    /// `notify_waiters` also reaches a waiter created but not yet polled.
    pub async fn evicted(&self) {
        while !self.is_evicted() {
            self.notify.notified().await;
        }
    }

    /// Marks the connection evicted. Call with the victim's entry locked.
    fn mark(&self) {
        self.evicted.store(true, Ordering::Release);
    }

    /// Wakes the victim's task. Call after the entry lock is released.
    pub(crate) fn wake(&self) {
        // Every waiter: a connection may hold more than one (one per phase).
        self.notify.notify_waiters();
    }
}

/// Connections of one source in one state, oldest (lowest id) first.
pub(crate) type Slots = BTreeMap<u64, Arc<ConnCtl>>;

/// One source's live connections.
#[derive(Debug, Default)]
pub(crate) struct SourceEntry {
    pub conns: u32,
    pub half_open: Slots,
    pub half_closed: Slots,
}

impl SourceEntry {
    pub fn slots(&mut self, s: EvictState) -> &mut Slots {
        match s {
            EvictState::HalfOpen => &mut self.half_open,
            EvictState::HalfClosed => &mut self.half_closed,
        }
    }

    fn slots_ref(&self, s: EvictState) -> &Slots {
        match s {
            EvictState::HalfOpen => &self.half_open,
            EvictState::HalfClosed => &self.half_closed,
        }
    }

    /// Removes the oldest connection in state `s` other than `spare`, marking it evicted.
    /// The caller gives back the global counts and wakes the victim.
    pub fn evict_oldest(&mut self, s: EvictState, spare: u64) -> Option<Arc<ConnCtl>> {
        let slots = self.slots(s);
        let id = *slots.keys().find(|&&id| id != spare)?;
        let ctl = slots.remove(&id)?;
        self.conns -= 1;
        ctl.mark();
        Some(ctl)
    }

    pub fn is_empty(&self) -> bool {
        self.conns == 0
    }
}

/// The table, with a counter kept beside it so the bound check is one atomic load.
#[derive(Debug)]
pub(crate) struct SourceTable {
    pub map: DashMap<SourceKey, SourceEntry>,
    pub len: AtomicUsize,
}

impl SourceTable {
    pub fn new() -> SourceTable {
        SourceTable {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
        }
    }

    /// Drops the entry for `key` if it holds nothing. Call with no guard held.
    pub fn remove_if_empty(&self, key: &SourceKey) {
        if self.map.remove_if(key, |_, e| e.is_empty()).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The source holding the most connections in state `s`, not counting connection
    /// `spare`. O(sources): it runs only when a listener-wide cap is full.
    pub fn heaviest(&self, s: EvictState, spare: u64) -> Option<SourceKey> {
        let mut best: Option<(SourceKey, usize)> = None;
        for r in self.map.iter() {
            let slots = r.slots_ref(s);
            let n = slots.len() - usize::from(slots.contains_key(&spare));
            if n > 0 && best.is_none_or(|(_, b)| n > b) {
                best = Some((*r.key(), n));
            }
        }
        best.map(|(k, _)| k)
    }

    /// Evicts the oldest connection in state `s` of `key`, other than `spare`.
    pub fn evict_from(&self, key: &SourceKey, s: EvictState, spare: u64) -> Option<Arc<ConnCtl>> {
        let victim = {
            let mut e = self.map.get_mut(key)?;
            e.evict_oldest(s, spare)?
        };
        self.remove_if_empty(key);
        Some(victim)
    }
}
