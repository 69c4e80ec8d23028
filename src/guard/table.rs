//! The source table: live connections per source, and who to evict.
//!
//! An entry exists only while its source holds a connection, so memory follows live
//! connections and the table has a hard bound (`max_sources`). Each entry keeps the
//! connections that may be evicted in three lists, in the order they entered: silent and
//! half-closed connections once past their grace (ordinary traffic passes through those
//! states faster and is never listed), and OPEN connections that stalled. Eviction aborts the
//! one longest in its state: the newest half-closed connection is usually an ordinary close in
//! flight, the oldest is the one lingering; the longest stalled is the one making least
//! progress.
//!
//! Locking rule (dashmap can deadlock across shards, xacrimon/dashmap#369): never hold an
//! entry guard while touching another entry. Victim search asks the heaviest-source index
//! with no guard held, then locks the one victim entry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use dashmap::DashMap;
use tokio::sync::Notify;

use super::SourceKey;
use super::heaviest::Heaviest;
use crate::stats::EvictState;

/// The handle another task uses to abort a connection it evicts.
#[derive(Debug, Default)]
pub struct ConnCtl {
    evicted: AtomicBool,
    notify: Notify,
    /// What a stalled connection was doing at its last progress check (a [`Stall`]).
    stall: AtomicU8,
    /// Completed an exchange, and counted in its source's `proven` (set under the entry
    /// lock, so an evictor gives the count back for it).
    proven: AtomicBool,
    /// Its first message is held until whole (counted in its source's `holding`; set under
    /// the entry lock, so an evictor gives the count back for it).
    holding: AtomicBool,
    /// Bytes queued toward this connection's client, as it last reported them (see
    /// `guard::bytes`).
    pub(crate) queued: std::sync::atomic::AtomicU64,
    /// Admitted over its source's cap and still waiting for a slot (set and cleared under
    /// its source's entry lock, so an evictor never takes a connection that got its slot).
    waiting: AtomicBool,
}

/// Why a connection moves less than `min_rate`, as its last progress check saw it. Only an
/// idle one costs little: a pool's connection between requests, a subscriber, a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Stall {
    /// Nothing moved and nothing waits.
    Idle = 0,
    /// Bytes wait for a peer that takes none (a slow reader).
    Blocked = 1,
    /// The client trickles its request (a drip).
    Dripping = 2,
}

impl ConnCtl {
    /// Bytes this connection is counted as pinning: as it last reported them, or as it was
    /// charged at admission.
    pub fn queued_bytes(&self) -> u64 {
        self.queued.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the last progress check saw.
    pub fn stall(&self) -> Stall {
        match self.stall.load(Ordering::Relaxed) {
            1 => Stall::Blocked,
            2 => Stall::Dripping,
            _ => Stall::Idle,
        }
    }

    /// Set by the connection at each progress check.
    pub fn set_stall(&self, s: Stall) {
        self.stall.store(s as u8, Ordering::Relaxed);
    }

    /// Whether the connection's first message is held (see `conn::holding`).
    pub fn is_holding(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }

    /// Call with the connection's entry locked, when counting it in `holding`.
    pub(crate) fn set_holding(&self, on: bool) {
        self.holding.store(on, Ordering::Relaxed);
    }

    /// Whether the connection completed an exchange.
    pub fn is_proven(&self) -> bool {
        self.proven.load(Ordering::Relaxed)
    }

    /// Call with the connection's entry locked, when counting it in `proven`.
    pub(crate) fn set_proven(&self) {
        self.proven.store(true, Ordering::Relaxed);
    }

    /// Marks the connection as waiting for a slot, or not. Call with its entry locked.
    pub(crate) fn set_waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Relaxed);
    }

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

/// Connections of one source in one state, longest in that state first (keyed by a sequence
/// number taken when the connection entered the list).
pub(crate) type Slots = BTreeMap<u64, Arc<ConnCtl>>;

/// One source's live connections.
#[derive(Debug, Default)]
pub(crate) struct SourceEntry {
    pub conns: u32,
    /// Of `conns`, admitted over `max_conns_per_source` and waiting for a slot to free (a
    /// connection of this source that ended on the wire but whose task has not yet run).
    pub provisional: u32,
    /// Of `conns`, those that completed an exchange (the client spoke, the server answered).
    pub proven: u32,
    /// Bytes queued toward the source's clients, as its connections last reported them.
    pub queued: u64,
    /// Of `conns`, those counted in `queued` (reported blocked with bytes, or charged at
    /// admission with the source's average): `queued / blocked` is what a newcomer of this
    /// source is expected to pin.
    pub blocked: u32,
    /// Of `conns`, those whose first message is held until whole (no backend yet).
    pub holding: u32,
    /// Silent for longer than the grace.
    pub half_open: Slots,
    /// Half-closed for longer than the grace.
    pub half_closed: Slots,
    /// OPEN and moving less than `min_rate`.
    pub stalled: Slots,
}

impl SourceEntry {
    pub fn slots(&mut self, s: EvictState) -> &mut Slots {
        match s {
            EvictState::HalfOpen => &mut self.half_open,
            EvictState::HalfClosed => &mut self.half_closed,
            EvictState::Stalled => &mut self.stalled,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.conns == 0
    }

    /// Connections in a list: silent or half-closed past the grace, or stalled.
    pub fn going_nowhere(&self) -> usize {
        self.half_open.len() + self.half_closed.len() + self.stalled.len()
    }

    /// Connections that will not end soon on their own: silent (or holding a first
    /// message) or half-closed past the grace, or stalled with bytes their peer does not
    /// take or a request the client drips. An idle keep-alive connection (stalled, nothing
    /// waiting) may end any moment and is not counted. A scan of the stalled list, made only
    /// for a source at its connection cap.
    pub fn stuck(&self) -> usize {
        self.half_open.len() + self.half_closed.len() + self.stalled.len() - self.idle()
    }

    /// Stalled connections that are idle (see [`Stall::Idle`]).
    pub fn idle(&self) -> usize {
        self.stalled
            .values()
            .filter(|c| c.stall() == Stall::Idle)
            .count()
    }

    /// One connection of the source is gone (it ended, or was evicted): its counts go,
    /// with what its flags say it was counted in. Call with the entry locked.
    pub fn release(&mut self, ctl: &ConnCtl) {
        self.conns = self.conns.saturating_sub(1);
        if ctl.is_proven() {
            self.proven = self.proven.saturating_sub(1);
        }
        if ctl.is_holding() {
            self.holding = self.holding.saturating_sub(1);
        }
    }

    /// What one more connection of this source is expected to pin: the average of those
    /// blocked with bytes now (0 when none is).
    pub fn expected_queued(&self) -> u64 {
        if self.queued == 0 {
            return 0;
        }
        self.queued / u64::from(self.blocked.max(1))
    }

    /// Connections admitted (not waiting for a slot) that have not completed an exchange.
    pub fn unproven(&self) -> u32 {
        self.conns
            .saturating_sub(self.provisional)
            .saturating_sub(self.proven)
    }
}

/// The table, with a counter kept beside it so the bound check is one atomic load, and one
/// heaviest-source index per evictable state.
#[derive(Debug)]
pub(crate) struct SourceTable {
    pub map: DashMap<SourceKey, SourceEntry>,
    pub len: AtomicUsize,
    heaviest: [Heaviest; EvictState::ALL.len()],
}

impl SourceTable {
    pub fn new() -> SourceTable {
        SourceTable {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
            heaviest: Default::default(),
        }
    }

    /// Puts a connection in `key`'s list for state `s`. Call with `key`'s entry locked (`e`).
    pub fn list(
        &self,
        e: &mut SourceEntry,
        key: &SourceKey,
        s: EvictState,
        slot: u64,
        ctl: &Arc<ConnCtl>,
    ) {
        if e.slots(s).insert(slot, ctl.clone()).is_none() {
            self.heaviest[s as usize].inc(key);
        }
    }

    /// Takes a connection out of `key`'s list for state `s`. Call with `key`'s entry locked.
    pub fn unlist(
        &self,
        e: &mut SourceEntry,
        key: &SourceKey,
        s: EvictState,
        slot: u64,
    ) -> Option<Arc<ConnCtl>> {
        let ctl = e.slots(s).remove(&slot)?;
        self.heaviest[s as usize].dec(key);
        Some(ctl)
    }

    /// Evicts the connection longest in state `s` of the source `e` (locked), other than
    /// `spare`: marks it and takes its place in the source. The caller gives back the
    /// listener-wide counts and wakes the victim once the lock is released.
    pub fn evict_oldest_of(
        &self,
        e: &mut SourceEntry,
        key: &SourceKey,
        s: EvictState,
        spare: u64,
    ) -> Option<Arc<ConnCtl>> {
        let slot = *e.slots(s).keys().find(|&&slot| slot != spare)?;
        let ctl = self.unlist(e, key, s, slot)?;
        e.release(&ctl);
        ctl.mark();
        Some(ctl)
    }

    /// Evicts `ctl`, a connection of `key` waiting for a slot over its source's cap: marks
    /// it and takes it out of the source's counts. `false` if it is gone or confirmed already.
    /// The caller gives back the listener-wide counts and wakes it.
    pub fn evict_waiter(&self, key: &SourceKey, ctl: &Arc<ConnCtl>) -> bool {
        {
            let Some(mut e) = self.map.get_mut(key) else {
                return false;
            };
            if ctl.is_evicted() || !ctl.waiting.load(Ordering::Relaxed) {
                return false;
            }
            ctl.set_waiting(false);
            e.provisional = e.provisional.saturating_sub(1);
            e.release(ctl);
            ctl.mark();
        }
        self.remove_if_empty(key);
        true
    }

    /// Drops the entry for `key` if it holds nothing. Call with no guard held.
    pub fn remove_if_empty(&self, key: &SourceKey) {
        if self.map.remove_if(key, |_, e| e.is_empty()).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The source holding the most connections in state `s`, and how many. O(1).
    pub fn heaviest(&self, s: EvictState) -> Option<(SourceKey, usize)> {
        self.heaviest[s as usize].top()
    }

    /// Sources holding at least one connection in state `s`.
    pub fn sources_in(&self, s: EvictState) -> usize {
        self.heaviest[s as usize].len()
    }

    /// Evicts the connection longest in state `s` of `key`.
    pub fn evict_from(&self, key: &SourceKey, s: EvictState) -> Option<Arc<ConnCtl>> {
        let victim = {
            let mut e = self.map.get_mut(key)?;
            self.evict_oldest_of(&mut e, key, s, u64::MAX)?
        };
        self.remove_if_empty(key);
        Some(victim)
    }
}
