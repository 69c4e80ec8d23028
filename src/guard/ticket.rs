//! The RAII ticket: a connection's place in the counts.
//!
//! Every state change goes through the ticket and its `Drop` gives the counts back, whatever
//! path the connection's task ends on (error, cancel, panic, clock). An evicted ticket's
//! counts were already given back by the evictor, under the victim's entry lock, so that the
//! newcomer can take the room at once; the ticket then only notices and does nothing.
//!
//! A connection is counted listener-wide in its state from the moment it enters it, but it
//! joins its source's list for that state (what the per-source caps count and what eviction
//! picks from) only once it has stayed there a while: silent past the grace, half-closed past
//! the grace, OPEN below the minimum rate. Ordinary traffic passes through those states and
//! never costs its source a refusal.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::table::ConnCtl;
use super::{Shared, SourceKey};
use crate::config::Mode;
use crate::stats::{EvictState, Observed, Reject};

/// The accounted states (CLOSED is the ticket's drop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Accepted, nothing has moved yet.
    HalfOpen,
    /// Bytes have moved.
    Open,
    /// One side has sent FIN.
    HalfClosed,
}

/// Why a state change was refused: the connection must be aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("evicted to make room")]
    Evicted,
    #[error("refused: {}", .0.as_str())]
    Full(Reject),
}

/// A connection's accounting. Not `Clone`: exactly one per connection.
#[derive(Debug)]
pub struct Ticket {
    pub(super) shared: Arc<Shared>,
    /// `None` for allow-listed sources and for a trusted balancer's connection before its
    /// PROXY header named the source: counted only listener-wide.
    pub(super) key: Option<SourceKey>,
    /// The source's network, when `max_conns_per_network` counts it.
    pub(super) net: Option<SourceKey>,
    pub(super) state: State,
    pub(super) ctl: Arc<ConnCtl>,
    /// The source list this connection sits in, and its place there.
    pub(super) listed: Option<(EvictState, u64)>,
    /// Admitted over the source's connection cap, waiting for a slot.
    pub(super) provisional: bool,
    /// Admitted from a trusted PROXY protocol balancer: its source comes from the header.
    /// Decided at accept, so a reload cannot make a keyed connection read a header.
    pub(super) trusted: bool,
    /// A trusted connection admitted over a listener cap before its header: it holds one of
    /// the listener's places for those until its source is known (see `Guard::admit_trusted`).
    pub(super) over: bool,
}

impl Ticket {
    pub fn state(&self) -> State {
        self.state
    }

    /// The source this connection is counted under, `None` when allow-listed.
    pub fn source(&self) -> Option<SourceKey> {
        self.key
    }

    /// The eviction handle: `ctl().evicted()` resolves when another connection evicts this one.
    pub fn ctl(&self) -> &Arc<ConnCtl> {
        &self.ctl
    }

    /// Admitted from a trusted balancer: a PROXY header comes first.
    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// Counts a refusal decided on the way, outside the guard's own checks (a bad PROXY
    /// header, a backend queue that is full): every refusal is counted by the guard, so the
    /// connection's task never counts one itself.
    pub fn refuse(&self, reason: Reject) {
        self.shared.stats.reject(reason);
    }

    /// Admitted over its source's connection cap: [`Ticket::confirm`] must succeed soon.
    pub fn is_provisional(&self) -> bool {
        self.provisional
    }

    /// Is this listener's per-source policy only observed?
    pub(super) fn observing(&self) -> bool {
        self.shared.limits.load().mode == Mode::Observe
    }

    /// Gives a connection admitted with `Guard::admit_trusted` its real source (from a PROXY
    /// header) and applies the per-source checks to it. On refusal the connection must be
    /// aborted; the refusal is counted. Only a trusted ticket that has no source yet may be
    /// keyed: re-keying would give back counts under the wrong source.
    pub fn assign_source(&mut self, ip: std::net::IpAddr) -> Result<(), Reject> {
        if !self.trusted || self.key.is_some() || self.state != State::HalfOpen {
            self.shared.stats.reject(Reject::ProxyHeader);
            return Err(Reject::ProxyHeader);
        }
        (self.key, self.net) = self.shared.assign_source(ip, self.over)?;
        self.trusted = false;
        self.settled();
        Ok(())
    }

    /// A trusted balancer's connection that stays its own (a PROXY `LOCAL` header, the
    /// balancer's health check): admitted over a listener cap, it takes a place now as an
    /// unkeyed newcomer would, or is refused (counted).
    pub fn keep_unnamed(&mut self) -> Result<(), Reject> {
        if self.over {
            let lim = self.shared.limits.load();
            let me = super::Newcomer {
                key: None,
                weight: 0,
            };
            if let Err(r) = self.shared.settle_unnamed(&lim, &me) {
                self.shared.stats.reject(r);
                return Err(r);
            }
            self.settled();
        }
        Ok(())
    }

    /// No longer over a listener cap: gives back the place among those admitted over it.
    fn settled(&mut self) {
        if std::mem::take(&mut self.over) {
            self.shared.unnamed_over.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A provisional connection asks again for a slot under its source's cap. `Ok(true)`:
    /// confirmed; `Ok(false)`: the source is still full.
    pub fn confirm(&mut self) -> Result<bool, Refused> {
        if !self.provisional {
            return Ok(true);
        }
        let Some(key) = &self.key else {
            self.provisional = false;
            return Ok(true);
        };
        let sh = &self.shared;
        let cap = sh.limits.load().max_conns_per_source;
        // With [cluster], the slot must be free across the replicas too.
        let others = sh.others(key).conns;
        let hard = sh.no_pools();
        let mut e = entry(sh, key, &self.ctl)?;
        if cap == 0
            || (e.conns - e.provisional).saturating_add(others) < cap
            || (!hard && super::pool_fits(&e, cap, true))
        {
            e.provisional -= 1;
            self.provisional = false;
            self.ctl.set_waiting(false);
            drop(e);
            sh.waiting.leave(&self.ctl);
            return Ok(true);
        }
        Ok(false)
    }

    /// A provisional connection found no slot in time: counted as refused at its source's
    /// cap, and `true`: the connection must be aborted. In observe mode it is counted as a
    /// would-be refusal and goes on as an ordinary connection (`false`).
    pub fn refuse_provisional(&mut self) -> bool {
        let Some(key) = self.key else {
            return false;
        };
        let sh = &self.shared;
        if sh.limits.load().mode == Mode::Observe {
            sh.observed_key(key, Observed::Reject(Reject::SourceConns));
            if let Some(mut e) = sh.table.map.get_mut(&key)
                && !self.ctl.is_evicted()
            {
                e.provisional = e.provisional.saturating_sub(1);
                self.provisional = false;
                self.ctl.set_waiting(false);
            }
            sh.waiting.leave(&self.ctl);
            return false;
        }
        sh.refused_key(key, Reject::SourceConns);
        true
    }

    /// The connection's first message is held until whole (`true`), or no longer is: its
    /// source's `holding` count, for `/sources`. Only connections that wait for it pay the
    /// lock; a first message that comes whole never gets here.
    pub fn set_holding(&self, on: bool) {
        let Some(key) = &self.key else {
            return;
        };
        if let Ok(mut e) = entry(&self.shared, key, &self.ctl)
            && self.ctl.is_holding() != on
        {
            self.ctl.set_holding(on);
            if on {
                e.holding += 1;
            } else {
                e.holding = e.holding.saturating_sub(1);
            }
        }
    }

    /// A newcomer from a source whose connections were cut in this window (evicted, or
    /// ended by a clock) is evictable at once, before its grace: thousands of sources that
    /// each hold one drip and reconnect the moment they are cut would otherwise keep a full
    /// listener full of connections too young to evict, and a client would find no room. It
    /// joins its source's half-open list at once (and counts there against the source's
    /// half-open cap for later newcomers); it leaves it when it speaks.
    pub(super) fn mark_if_cut_before(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        let sh = self.shared.clone();
        if let Ok(mut e) = entry(&sh, &key, &self.ctl) {
            let slot = sh.next_slot.fetch_add(1, Ordering::Relaxed);
            sh.table
                .list(&mut e, &key, EvictState::HalfOpen, slot, &self.ctl);
            self.listed = Some((EvictState::HalfOpen, slot));
        }
    }

    /// A clock ended this connection: its source has a record of being cut (see
    /// [`Ticket::mark_if_cut_before`]).
    pub fn cut_by_clock(&self) {
        if let Some(key) = self.key {
            self.shared.cut.count(key, true);
        }
    }

    /// HALF_OPEN past the grace with nothing said: the connection now counts against its
    /// source's half-open cap. At the cap it is refused (the source has enough silent
    /// connections already), unless the listener only observes.
    pub fn silent(&mut self) -> Result<(), Refused> {
        debug_assert_eq!(self.state, State::HalfOpen);
        let sh = self.shared.clone();
        let Some(key) = self.key else {
            return Ok(());
        };
        if self.listed.is_some() {
            return Ok(());
        }
        self.stop_waiting()?;
        let lim = sh.limits.load();
        let cap = lim.max_half_open_per_source as usize;
        let others = sh.others(&key).half_open as usize;
        {
            let mut e = entry(&sh, &key, &self.ctl)?;
            if cap > 0 && e.half_open.len() + others >= cap {
                if lim.mode == Mode::Enforce {
                    drop(e);
                    sh.refused_key(key, Reject::SourceHalfOpen);
                    return Err(Refused::Full(Reject::SourceHalfOpen));
                }
                sh.observed_key(key, Observed::Reject(Reject::SourceHalfOpen));
            }
            let slot = sh.next_slot.fetch_add(1, Ordering::Relaxed);
            sh.table
                .list(&mut e, &key, EvictState::HalfOpen, slot, &self.ctl);
            self.listed = Some((EvictState::HalfOpen, slot));
        }
        Ok(())
    }

    /// A connection that changes state no longer only waits for a slot: it leaves the
    /// waiting room (whose evictor takes only half-open connections out of no list), still
    /// counted as provisional until it is confirmed or ends. Connections confirm their slot
    /// before anything else, so this only guards the accounting.
    fn stop_waiting(&mut self) -> Result<(), Refused> {
        if !self.provisional {
            return Ok(());
        }
        if let Some(key) = &self.key {
            let e = entry(&self.shared, key, &self.ctl)?;
            self.ctl.set_waiting(false);
            drop(e);
        }
        self.shared.waiting.leave(&self.ctl);
        Ok(())
    }

    /// HALF_OPEN -> OPEN: the first byte moved.
    pub fn open(&mut self) -> Result<(), Refused> {
        debug_assert_eq!(self.state, State::HalfOpen);
        self.stop_waiting()?;
        self.leave_list()?;
        self.shared.counts.half_open.fetch_sub(1, Ordering::AcqRel);
        self.state = State::Open;
        self.shared.update_pressure();
        Ok(())
    }

    /// The connection completed an exchange (the client spoke and the server answered): its
    /// source may hold more than its connection cap while the listener has room, and the
    /// connection gives back what it took of its source's new-connection rate (a client that
    /// opens a connection per request and completes each is not a churn flood). Once.
    pub fn prove(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        if self.ctl.is_proven() {
            return;
        }
        let sh = &self.shared;
        // Under the entry lock, so an evictor that takes this connection gives it back.
        if let Ok(mut e) = entry(sh, &key, &self.ctl) {
            e.proven += 1;
            self.ctl.set_proven();
        }
        if let Some(rate) = &*sh.rate.load() {
            rate.earn(&key);
        }
    }

    /// OPEN, and moving less than `min_rate`: the connection joins its source's stalled list
    /// (evictable when the listener is full, longest stalled first).
    pub fn stall(&mut self) -> Result<(), Refused> {
        debug_assert_eq!(self.state, State::Open);
        if self.listed.is_some() {
            return Ok(());
        }
        let sh = self.shared.clone();
        let Some(key) = self.key else {
            return Ok(());
        };
        let mut e = entry(&sh, &key, &self.ctl)?;
        let slot = sh.next_slot.fetch_add(1, Ordering::Relaxed);
        sh.table
            .list(&mut e, &key, EvictState::Stalled, slot, &self.ctl);
        self.listed = Some((EvictState::Stalled, slot));
        sh.counts.stalled.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// OPEN and moving again at a healthy rate: out of the stalled list.
    pub fn unstall(&mut self) -> Result<(), Refused> {
        if !matches!(self.listed, Some((EvictState::Stalled, _))) {
            return Ok(());
        }
        self.leave_list()?;
        self.shared.counts.stalled.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }

    /// Is this connection in its source's stalled list?
    pub fn is_stalled(&self) -> bool {
        matches!(self.listed, Some((EvictState::Stalled, _)))
    }

    /// Leaves whatever source list the connection is in, noticing an eviction first.
    fn leave_list(&mut self) -> Result<(), Refused> {
        let sh = &self.shared;
        if let Some(key) = &self.key {
            let mut e = entry(sh, key, &self.ctl)?;
            if let Some((s, slot)) = self.listed.take() {
                sh.table.unlist(&mut e, key, s, slot);
            }
        } else if self.ctl.is_evicted() {
            return Err(Refused::Evicted);
        }
        Ok(())
    }

    /// OPEN -> HALF_CLOSED: one side sent FIN. Counted listener-wide at once (over the
    /// listener's cap, the oldest lingering connection of the heaviest source is evicted, or
    /// this one refused with `on_full = "reject"`); counted against the source's cap only if
    /// it is still half-closed after the grace ([`Ticket::lingering`]).
    pub fn half_close(&mut self) -> Result<(), Refused> {
        debug_assert_eq!(self.state, State::Open);
        let was_stalled = self.is_stalled();
        self.leave_list()?;
        let sh = self.shared.clone();
        if was_stalled {
            sh.counts.stalled.fetch_sub(1, Ordering::AcqRel);
        }
        let lim = sh.limits.load();
        // An OPEN connection out of every list cannot be evicted; count it listener-wide
        // first, so an evictor never finds it in a list before it is counted.
        let me = super::Newcomer {
            key: None,
            weight: 0,
        };
        if !sh.reserve_state(EvictState::HalfClosed, &lim, &me) {
            self.refuse(Reject::HalfClosedFull);
            return Err(Refused::Full(Reject::HalfClosedFull));
        }
        self.state = State::HalfClosed;
        sh.update_pressure();
        Ok(())
    }

    /// HALF_CLOSED past the grace: the connection now counts against its source's cap. Over
    /// it, the source's connection longest half-closed is evicted (the newest is usually an
    /// ordinary close in flight; the oldest is the one lingering).
    pub fn lingering(&mut self) -> Result<(), Refused> {
        debug_assert_eq!(self.state, State::HalfClosed);
        if self.listed.is_some() {
            return Ok(());
        }
        let sh = self.shared.clone();
        let Some(key) = self.key else {
            return Ok(());
        };
        let lim = sh.limits.load();
        let cap = lim.max_half_closed_per_source as usize;
        let victim = {
            let mut e = entry(&sh, &key, &self.ctl)?;
            let slot = sh.next_slot.fetch_add(1, Ordering::Relaxed);
            sh.table
                .list(&mut e, &key, EvictState::HalfClosed, slot, &self.ctl);
            self.listed = Some((EvictState::HalfClosed, slot));
            if cap > 0 && e.half_closed.len() > cap {
                if lim.mode == Mode::Enforce {
                    sh.table
                        .evict_oldest_of(&mut e, &key, EvictState::HalfClosed, slot)
                } else {
                    drop(e);
                    sh.observed_key(key, Observed::Evict(EvictState::HalfClosed));
                    None
                }
            } else {
                None
            }
        };
        if let Some(v) = victim {
            sh.give_back_evicted(EvictState::HalfClosed);
            v.wake();
        }
        Ok(())
    }

    /// The listener observes, and a clock or cap would have ended this connection: counted,
    /// and the connection goes on. `false` when the listener enforces: act.
    pub fn observe(&self, what: Observed) -> bool {
        if !self.observing() {
            return false;
        }
        match self.key {
            Some(key) => self.shared.observed_key(key, what),
            None => self.shared.stats.observe(what),
        }
        true
    }
}

/// `key`'s entry, locked, unless this connection was evicted (checked under the lock, so an
/// evictor that won the race is seen): every state change starts here.
fn entry<'a>(
    sh: &'a Shared,
    key: &SourceKey,
    ctl: &ConnCtl,
) -> Result<dashmap::mapref::one::RefMut<'a, SourceKey, super::table::SourceEntry>, Refused> {
    let e = sh.table.map.get_mut(key).ok_or(Refused::Evicted)?;
    if ctl.is_evicted() {
        return Err(Refused::Evicted);
    }
    Ok(e)
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.settled();
        let sh = &self.shared;
        // Not part of what an evictor gives back: the ticket always returns it.
        if let Some(net) = &self.net {
            sh.leave_network(net);
        }
        self.give_back_queued();
        if self.ctl.is_evicted() {
            return;
        }
        if let Some(key) = &self.key {
            // One lookup and one lock of the entry's shard both give the counts back and
            // drop the entry once empty (the shard's lock word is written by every thread
            // that takes it).
            let mut evicted = false;
            let gone = sh.table.map.remove_if_mut(key, |_, e| {
                // Re-check under the lock: an evictor may have won the race.
                if self.ctl.is_evicted() {
                    evicted = true;
                    return false;
                }
                if let Some((s, slot)) = self.listed {
                    sh.table.unlist(e, key, s, slot);
                }
                if self.provisional {
                    e.provisional = e.provisional.saturating_sub(1);
                }
                e.release(&self.ctl);
                e.is_empty()
            });
            if evicted {
                return;
            }
            if gone.is_some() {
                sh.table.len.fetch_sub(1, Ordering::Relaxed);
            }
            if self.provisional {
                sh.waiting.leave(&self.ctl);
            }
        }
        let state = match self.state {
            State::HalfOpen => Some(EvictState::HalfOpen),
            State::HalfClosed => Some(EvictState::HalfClosed),
            State::Open if self.is_stalled() => Some(EvictState::Stalled),
            State::Open => None,
        };
        sh.give_back(state);
    }
}
