//! The guard: admission, per-source and listener-wide accounting, eviction, pressure.
//!
//! One [`Guard`] per listener. Admission runs the cheapest check first (DESIGN.md):
//! deny list -> allow list (exempt from per-source caps, still counted listener-wide) ->
//! listener connection cap -> per-source new-connection rate -> per-source concurrent cap ->
//! per-source half-open cap -> listener half-open cap (evict or reject, by `on_full`).
//!
//! The listener-wide counts are atomics; a source's counts live in its [`table`] entry. A
//! connection is counted listener-wide *before* it is put in its source's eviction list, so
//! an evictor (which gives counts back on the victim's behalf) can never drive a count
//! below zero.

mod pressure;
mod rate;
mod source;
mod table;
mod ticket;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::watch;

pub use source::SourceKey;
pub use table::ConnCtl;
pub use ticket::{Refused, State, Ticket};

use crate::config::{Limits, OnFull, PressureConfig};
use crate::stats::{EvictState, Reject, Stats};
use pressure::PressureGate;
use rate::SourceRate;
use table::{SourceEntry, SourceTable};

/// Admission and accounting for one listener. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Guard {
    shared: Arc<Shared>,
}

/// Listener-wide connection counts.
#[derive(Debug, Default)]
struct Counts {
    conns: AtomicUsize,
    half_open: AtomicUsize,
    half_closed: AtomicUsize,
}

#[derive(Debug)]
pub(crate) struct Shared {
    limits: Limits,
    table: SourceTable,
    rate: Option<SourceRate>,
    counts: Counts,
    next_id: AtomicU64,
    pressure: PressureGate,
    stats: Arc<Stats>,
}

/// A point-in-time view of a guard's counts, for tests, `check` and (later) metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuardSnapshot {
    pub conns: usize,
    pub half_open: usize,
    pub half_closed: usize,
    /// Entries in the source table.
    pub sources: usize,
    /// Keys in the rate limiter.
    pub rate_keys: usize,
    pub pressure: bool,
}

impl Guard {
    pub fn new(limits: Limits, pressure: &PressureConfig, stats: Arc<Stats>) -> Guard {
        let rate = SourceRate::new(&limits);
        Guard {
            shared: Arc::new(Shared {
                pressure: PressureGate::new(&limits, pressure),
                limits,
                table: SourceTable::new(),
                rate,
                counts: Counts::default(),
                next_id: AtomicU64::new(0),
                stats,
            }),
        }
    }

    /// Decides whether a connection from `peer` may be accepted, and if so counts it as
    /// HALF_OPEN. The refusal is already counted in the listener's stats.
    pub fn admit(&self, peer: IpAddr) -> Result<Ticket, Reject> {
        let r = self.try_admit(peer.to_canonical());
        if let Err(reason) = r {
            self.shared.stats.reject(reason);
        }
        r
    }

    fn try_admit(&self, ip: IpAddr) -> Result<Ticket, Reject> {
        let sh = &self.shared;
        let lim = &sh.limits;
        if lim.deny.iter().any(|n| n.contains(&ip)) {
            return Err(Reject::Denied);
        }
        let exempt = lim.allow.iter().any(|n| n.contains(&ip));
        if lim.on_full == OnFull::Reject
            && sh.counts.conns.load(Ordering::Relaxed) >= lim.max_conns as usize
        {
            return Err(Reject::ConnsFull);
        }
        let key = (!exempt).then(|| SourceKey::new(ip, lim.ipv4_prefix, lim.ipv6_prefix));
        if let Some(key) = &key {
            if let Some(rate) = &sh.rate
                && !rate.check(key)
            {
                return Err(Reject::Rate);
            }
            // Non-binding look first, so a source at its cap is refused before it can cost
            // anyone an eviction.
            match sh.table.map.get(key) {
                Some(e) => sh.check_source(&e)?,
                None if sh.table.len.load(Ordering::Relaxed) >= lim.max_sources as usize => {
                    return Err(Reject::SourcesFull);
                }
                None => {}
            }
        }

        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        if !sh.reserve_conn(id) {
            return Err(Reject::ConnsFull);
        }
        if !sh.reserve_state(EvictState::HalfOpen, id) {
            sh.counts.conns.fetch_sub(1, Ordering::AcqRel);
            return Err(Reject::HalfOpenFull);
        }
        let ctl = Arc::new(ConnCtl::default());
        if let Some(key) = &key
            && let Err(reason) = sh.enter_source(key, id, &ctl)
        {
            sh.give_back(Some(EvictState::HalfOpen));
            return Err(reason);
        }
        sh.stats.accepted.fetch_add(1, Ordering::Relaxed);
        sh.update_pressure();
        Ok(Ticket {
            shared: self.shared.clone(),
            key,
            id,
            state: State::HalfOpen,
            ctl,
        })
    }

    /// Current counts.
    pub fn snapshot(&self) -> GuardSnapshot {
        let sh = &self.shared;
        GuardSnapshot {
            conns: sh.counts.conns.load(Ordering::Relaxed),
            half_open: sh.counts.half_open.load(Ordering::Relaxed),
            half_closed: sh.counts.half_closed.load(Ordering::Relaxed),
            sources: sh.table.len.load(Ordering::Relaxed),
            rate_keys: sh.rate.as_ref().map_or(0, SourceRate::len),
            pressure: sh.pressure.is_on(),
        }
    }

    /// Sums of the source table's entries (conns, half-open, half-closed), walked entry by
    /// entry: tests compare them with the snapshot to prove the two views agree.
    pub fn table_totals(&self) -> (usize, usize, usize) {
        self.shared
            .table
            .map
            .iter()
            .fold((0, 0, 0), |(c, o, h), e| {
                (
                    c + e.conns as usize,
                    o + e.half_open.len(),
                    h + e.half_closed.len(),
                )
            })
    }

    /// The `n` sources with the most connections, heaviest first.
    pub fn top_sources(&self, n: usize) -> Vec<(SourceKey, u32, usize, usize)> {
        let mut v: Vec<_> = self
            .shared
            .table
            .map
            .iter()
            .map(|e| (*e.key(), e.conns, e.half_open.len(), e.half_closed.len()))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// Is the listener in pressure mode?
    pub fn pressure(&self) -> bool {
        self.shared.pressure.is_on()
    }

    /// A receiver that sees pressure mode flip.
    pub fn pressure_watch(&self) -> watch::Receiver<bool> {
        self.shared.pressure.subscribe()
    }

    /// Periodic upkeep: forget rate-limiter keys that are back to a full bucket, so the
    /// limiter's memory follows active sources.
    pub fn housekeep(&self) {
        if let Some(r) = &self.shared.rate {
            r.housekeep();
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.shared.stats
    }
}

impl Shared {
    fn check_source(&self, e: &SourceEntry) -> Result<(), Reject> {
        let lim = &self.limits;
        if lim.max_conns_per_source > 0 && e.conns >= lim.max_conns_per_source {
            return Err(Reject::SourceConns);
        }
        if lim.max_half_open_per_source > 0
            && e.half_open.len() >= lim.max_half_open_per_source as usize
        {
            return Err(Reject::SourceHalfOpen);
        }
        Ok(())
    }

    /// Binding per-source check, then the connection joins its source's half-open list.
    fn enter_source(&self, key: &SourceKey, id: u64, ctl: &Arc<ConnCtl>) -> Result<(), Reject> {
        use dashmap::mapref::entry::Entry;
        match self.table.map.entry(*key) {
            Entry::Occupied(mut o) => {
                let e = o.get_mut();
                self.check_source(e)?;
                e.conns += 1;
                e.half_open.insert(id, ctl.clone());
            }
            Entry::Vacant(v) => {
                if self.table.len.fetch_add(1, Ordering::Relaxed)
                    >= self.limits.max_sources as usize
                {
                    self.table.len.fetch_sub(1, Ordering::Relaxed);
                    return Err(Reject::SourcesFull);
                }
                let mut e = SourceEntry {
                    conns: 1,
                    ..SourceEntry::default()
                };
                e.half_open.insert(id, ctl.clone());
                v.insert(e);
            }
        }
        Ok(())
    }

    fn state_count(&self, s: EvictState) -> &AtomicUsize {
        match s {
            EvictState::HalfOpen => &self.counts.half_open,
            EvictState::HalfClosed => &self.counts.half_closed,
        }
    }

    /// Takes a place under `max_conns`. When full and `on_full = "evict"`, a silent
    /// connection, else a half-closed one, of the heaviest source makes room: an open
    /// connection is never evicted.
    fn reserve_conn(&self, spare: u64) -> bool {
        let max = self.limits.max_conns as usize;
        for _ in 0..4 {
            if try_inc(&self.counts.conns, max) {
                return true;
            }
            if self.limits.on_full == OnFull::Reject
                || !(self.evict_heaviest(EvictState::HalfOpen, spare)
                    || self.evict_heaviest(EvictState::HalfClosed, spare))
            {
                return false;
            }
        }
        false
    }

    /// Takes a place under the listener cap for state `s`, evicting when full and allowed.
    fn reserve_state(&self, s: EvictState, spare: u64) -> bool {
        let (count, max) = match s {
            EvictState::HalfOpen => (&self.counts.half_open, self.limits.max_half_open),
            EvictState::HalfClosed => (&self.counts.half_closed, self.limits.max_half_closed),
        };
        for _ in 0..4 {
            if try_inc(count, max as usize) {
                return true;
            }
            if self.limits.on_full == OnFull::Reject || !self.evict_heaviest(s, spare) {
                return false;
            }
        }
        false
    }

    /// Aborts the oldest connection in state `s` of the source holding the most of them.
    fn evict_heaviest(&self, s: EvictState, spare: u64) -> bool {
        for _ in 0..3 {
            let Some(key) = self.table.heaviest(s, spare) else {
                return false;
            };
            if let Some(victim) = self.table.evict_from(&key, s, spare) {
                self.give_back_evicted(s);
                victim.wake();
                return true;
            }
        }
        false
    }

    /// Gives back an evicted connection's listener-wide counts.
    fn give_back_evicted(&self, s: EvictState) {
        self.stats.evict(s);
        self.give_back(Some(s));
    }

    /// Gives back one connection, and its state's count when it has one.
    fn give_back(&self, s: Option<EvictState>) {
        if let Some(s) = s {
            self.state_count(s).fetch_sub(1, Ordering::AcqRel);
        }
        self.counts.conns.fetch_sub(1, Ordering::AcqRel);
        self.update_pressure();
    }

    fn update_pressure(&self) {
        self.pressure.update([
            self.counts.conns.load(Ordering::Relaxed),
            self.counts.half_open.load(Ordering::Relaxed),
            self.counts.half_closed.load(Ordering::Relaxed),
        ]);
    }
}

/// Increments `c` unless it is already at `max`.
fn try_inc(c: &AtomicUsize, max: usize) -> bool {
    c.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
        (v < max).then_some(v + 1)
    })
    .is_ok()
}

#[cfg(test)]
mod tests;
