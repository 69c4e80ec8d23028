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
mod refusals;
mod source;
mod table;
mod ticket;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;

pub use source::SourceKey;
pub use table::ConnCtl;
pub use ticket::{Refused, State, Ticket};

use crate::config::{Limits, OnFull, PressureConfig};
use crate::stats::{EvictState, Reject, Stats};
use pressure::PressureGate;
use rate::SourceRate;
use refusals::Refusals;
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
    /// Swapped whole on reload; admission loads it once per decision.
    limits: ArcSwap<Limits>,
    table: SourceTable,
    rate: ArcSwapOption<SourceRate>,
    counts: Counts,
    next_id: AtomicU64,
    pressure: PressureGate,
    stats: Arc<Stats>,
    refusals: Refusals,
}

/// One source's load, for `/sources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLoad {
    pub source: SourceKey,
    pub conns: usize,
    pub half_open: usize,
    pub half_closed: usize,
    /// Refusals in the current tally window (about a minute).
    pub refused: u64,
}

/// What `/sources` sorts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceOrder {
    Conns,
    HalfOpen,
    HalfClosed,
    Refused,
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
        let rate = SourceRate::new(&limits).map(Arc::new);
        Guard {
            shared: Arc::new(Shared {
                pressure: PressureGate::new(&limits, pressure),
                limits: ArcSwap::from_pointee(limits),
                table: SourceTable::new(),
                rate: ArcSwapOption::new(rate),
                counts: Counts::default(),
                next_id: AtomicU64::new(0),
                stats,
                refusals: Refusals::default(),
            }),
        }
    }

    /// Decides whether a connection from `peer` may be accepted, and if so counts it as
    /// HALF_OPEN. The refusal is already counted in the listener's stats.
    pub fn admit(&self, peer: IpAddr) -> Result<Ticket, Reject> {
        let ip = peer.to_canonical();
        let r = self.try_admit(ip);
        if let Err(reason) = r {
            self.shared.refused(ip, reason);
        }
        r
    }

    /// Admits a connection from a trusted PROXY protocol balancer before its header is
    /// read: counted per listener only, like an allow-listed source, until
    /// [`Ticket::assign_source`] gives it its real source.
    pub fn admit_trusted(&self) -> Result<Ticket, Reject> {
        let r = self.admit_counted(None, &self.shared.limits.load());
        if let Err(reason) = r {
            self.shared.stats.reject(reason);
        }
        r
    }

    fn try_admit(&self, ip: IpAddr) -> Result<Ticket, Reject> {
        let sh = &self.shared;
        let lim = &*sh.limits.load();
        if lim.on_full == OnFull::Reject
            && sh.counts.conns.load(Ordering::Relaxed) >= lim.max_conns as usize
        {
            return Err(Reject::ConnsFull);
        }
        let key = sh.source_of(ip, lim)?;
        if let Some(key) = &key {
            // Non-binding look first, so a source at its cap is refused before it can cost
            // anyone an eviction.
            match sh.table.map.get(key) {
                Some(e) => check_source(&e, lim)?,
                None if sh.table.len.load(Ordering::Relaxed) >= lim.max_sources as usize => {
                    return Err(Reject::SourcesFull);
                }
                None => {}
            }
        }

        self.admit_counted(key, lim)
    }

    /// The binding part of admission: a place under the listener caps (evicting when
    /// allowed), then one in the source's half-open list.
    fn admit_counted(&self, key: Option<SourceKey>, lim: &Limits) -> Result<Ticket, Reject> {
        let sh = &self.shared;
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        if !sh.reserve_conn(id, lim) {
            return Err(Reject::ConnsFull);
        }
        if !sh.reserve_state(EvictState::HalfOpen, id, lim) {
            sh.counts.conns.fetch_sub(1, Ordering::AcqRel);
            return Err(Reject::HalfOpenFull);
        }
        let ctl = Arc::new(ConnCtl::default());
        if let Some(key) = &key
            && let Err(reason) = sh.enter_source(key, id, &ctl, lim)
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
            rate_keys: sh.rate.load().as_ref().map_or(0, |r| r.len()),
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

    /// The `n` heaviest sources by `by`: live connections from the source table, refusals
    /// from the bounded refusal tally.
    pub fn top_sources(&self, n: usize, by: SourceOrder) -> Vec<SourceLoad> {
        let mut all: std::collections::HashMap<SourceKey, SourceLoad> = self
            .shared
            .table
            .map
            .iter()
            .map(|e| {
                let load = SourceLoad {
                    source: *e.key(),
                    conns: e.conns as usize,
                    half_open: e.half_open.len(),
                    half_closed: e.half_closed.len(),
                    refused: 0,
                };
                (*e.key(), load)
            })
            .collect();
        for (key, refused) in self.shared.refusals.snapshot() {
            all.entry(key)
                .or_insert(SourceLoad {
                    source: key,
                    conns: 0,
                    half_open: 0,
                    half_closed: 0,
                    refused: 0,
                })
                .refused = refused;
        }
        let mut v: Vec<SourceLoad> = all.into_values().collect();
        let key = |l: &SourceLoad| match by {
            SourceOrder::Conns => l.conns as u64,
            SourceOrder::HalfOpen => l.half_open as u64,
            SourceOrder::HalfClosed => l.half_closed as u64,
            SourceOrder::Refused => l.refused,
        };
        v.sort_by(|a, b| key(b).cmp(&key(a)).then(a.source.cmp(&b.source)));
        v.retain(|l| key(l) > 0);
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
        if let Some(r) = &*self.shared.rate.load() {
            r.housekeep();
        }
        self.shared.refusals.housekeep();
    }

    /// The limits in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.shared.limits.load_full()
    }

    /// Applies new limits at once. Live connections keep their accounting (a ticket knows
    /// its own source key); new connections are admitted under the new caps. The rate
    /// limiter starts afresh when its quota or bound changed.
    pub fn reload(&self, limits: Limits, pressure: &PressureConfig) {
        let sh = &self.shared;
        let old = sh.limits.load_full();
        if (
            old.conn_rate_per_source,
            old.conn_burst_per_source,
            old.max_sources,
        ) != (
            limits.conn_rate_per_source,
            limits.conn_burst_per_source,
            limits.max_sources,
        ) {
            sh.rate.store(SourceRate::new(&limits).map(Arc::new));
        }
        sh.pressure.set(&limits, pressure);
        sh.limits.store(Arc::new(limits));
        sh.update_pressure();
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.shared.stats
    }
}

fn check_source(e: &SourceEntry, lim: &Limits) -> Result<(), Reject> {
    if lim.max_conns_per_source > 0 && e.conns >= lim.max_conns_per_source {
        return Err(Reject::SourceConns);
    }
    if lim.max_half_open_per_source > 0
        && e.half_open.len() >= lim.max_half_open_per_source as usize
    {
        return Err(Reject::SourceHalfOpen);
    }
    // A source whose half-closed connections fill its cap gets no new connection until one
    // ends: otherwise each newcomer, once it half-closes, evicts the source's oldest, and a
    // client that sends FIN and never reads churns through connections (and backend bytes)
    // as fast as its rate allows.
    if lim.max_half_closed_per_source > 0
        && e.half_closed.len() >= lim.max_half_closed_per_source as usize
    {
        return Err(Reject::SourceHalfClosed);
    }
    Ok(())
}

impl Shared {
    /// The per-source half of admission for a connection already counted per listener
    /// (a PROXY protocol connection whose header named its source): deny, allow, rate,
    /// per-source caps, then the source's half-open list.
    pub(crate) fn assign_source(
        &self,
        ip: IpAddr,
        id: u64,
        ctl: &Arc<ConnCtl>,
    ) -> Result<Option<SourceKey>, Reject> {
        let ip = ip.to_canonical();
        let lim = &*self.limits.load();
        let r = self.source_of(ip, lim).and_then(|key| {
            if let Some(key) = &key {
                self.enter_source(key, id, ctl, lim)?;
            }
            Ok(key)
        });
        if let Err(reason) = r {
            self.refused(ip, reason);
        }
        r
    }

    /// The per-source checks that need no table entry: deny list, allow list (exempt:
    /// `None`), then the source's new-connection rate. Returns the key to count under.
    fn source_of(&self, ip: IpAddr, lim: &Limits) -> Result<Option<SourceKey>, Reject> {
        if lim.deny.iter().any(|n| n.contains(&ip)) {
            return Err(Reject::Denied);
        }
        if lim.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(None);
        }
        let key = SourceKey::new(ip, lim.ipv4_prefix, lim.ipv6_prefix);
        if let Some(rate) = &*self.rate.load()
            && !rate.check(&key)
        {
            return Err(Reject::Rate);
        }
        Ok(Some(key))
    }

    /// Counts a refusal, and tallies it against its source for `/sources` (a denied source
    /// is refused by the operator's choice, not by its behaviour).
    fn refused(&self, ip: IpAddr, reason: Reject) {
        self.stats.reject(reason);
        if reason != Reject::Denied {
            let lim = self.limits.load();
            self.refusals
                .count(SourceKey::new(ip, lim.ipv4_prefix, lim.ipv6_prefix));
        }
    }

    /// Binding per-source check, then the connection joins its source's half-open list.
    fn enter_source(
        &self,
        key: &SourceKey,
        id: u64,
        ctl: &Arc<ConnCtl>,
        lim: &Limits,
    ) -> Result<(), Reject> {
        use dashmap::mapref::entry::Entry;
        match self.table.map.entry(*key) {
            Entry::Occupied(mut o) => {
                let e = o.get_mut();
                check_source(e, lim)?;
                e.conns += 1;
                e.half_open.insert(id, ctl.clone());
            }
            Entry::Vacant(v) => {
                if self.table.len.fetch_add(1, Ordering::Relaxed) >= lim.max_sources as usize {
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
    fn reserve_conn(&self, spare: u64, lim: &Limits) -> bool {
        let max = lim.max_conns as usize;
        for _ in 0..4 {
            if try_inc(&self.counts.conns, max) {
                return true;
            }
            if lim.on_full == OnFull::Reject
                || !(self.evict_heaviest(EvictState::HalfOpen, spare)
                    || self.evict_heaviest(EvictState::HalfClosed, spare))
            {
                return false;
            }
        }
        false
    }

    /// Takes a place under the listener cap for state `s`, evicting when full and allowed.
    fn reserve_state(&self, s: EvictState, spare: u64, lim: &Limits) -> bool {
        let (count, max) = match s {
            EvictState::HalfOpen => (&self.counts.half_open, lim.max_half_open),
            EvictState::HalfClosed => (&self.counts.half_closed, lim.max_half_closed),
        };
        for _ in 0..4 {
            if try_inc(count, max as usize) {
                return true;
            }
            if lim.on_full == OnFull::Reject || !self.evict_heaviest(s, spare) {
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
