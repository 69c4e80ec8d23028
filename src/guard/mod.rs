//! The guard: admission, per-source and listener-wide accounting, eviction, pressure.
//!
//! One [`Guard`] per listener. Admission runs the cheapest check first (the design's
//! admission order): deny list -> allow list (exempt from per-source caps, still counted
//! listener-wide) -> listener connection cap -> per-source new-connection rate -> per-source
//! concurrent cap -> per-source half-open and half-closed caps -> listener half-open cap
//! (evict or reject, by `on_full`).
//!
//! Per-source caps judge behaviour over time, not a state at an instant: a connection counts
//! against its source's half-open or half-closed cap only once it has stayed in that state
//! past `limits.grace`, and a newcomer from a source at its connection cap is admitted
//! provisionally for a moment, since the connection it replaces has often ended on the wire
//! already and only its task has not run yet. In observe mode (`limits.mode`) every
//! per-source decision is counted and not acted on; listener-wide caps always act.
//!
//! When a listener cap is full and `on_full = "evict"`, the victim comes from the source
//! holding the most connections that go nowhere (silent, lingering half-closed, or OPEN and
//! stalled below `limits.min_rate`), longest in that state first; a connection that moves
//! data at a healthy rate is never a victim. The heaviest source comes from an index, not a
//! scan ([`heaviest`]).
//!
//! With `[cluster]`, the per-source caps (connections, half-open, half-closed) apply to
//! the source's local counts plus what the other replicas held at their last sync
//! ([`remote`]), a source the others also admit gets this replica's part of its
//! new-connection rate per interval, and a source banned cluster-wide is refused after the
//! allow list. The view
//! is swapped in whole by the cluster's sync task: admission reads it, never waits for it.
//!
//! The listener-wide counts are atomics; a source's counts live in its [`table`] entry. A
//! connection is counted listener-wide *before* it is put in its source's eviction list, so
//! an evictor (which gives counts back on the victim's behalf) can never drive a count
//! below zero.

mod bytes;
mod heaviest;
mod pressure;
mod rate;
mod refusals;
mod remote;
mod source;
mod table;
mod ticket;
mod waiting;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};

pub use remote::{Remote, RemoteLoad, rate_share};
pub use source::SourceKey;
pub use table::{ConnCtl, Stall};
pub use ticket::{Refused, State, Ticket};
pub use waiting::max_waiting;

use crate::config::{Limits, Mode, OnFull, PressureConfig};
use crate::stats::{EvictState, Observed, Reject, Stats};
use pressure::PressureGate;
use rate::SourceRate;
use refusals::Refusals;
use table::{SourceEntry, SourceTable};
use waiting::WaitingRoom;

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
    /// OPEN connections in their source's stalled list (allow-listed ones are never listed).
    stalled: AtomicUsize,
    /// Bytes queued toward the listener's clients (see [`bytes`]).
    queued: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    /// Swapped whole on reload; admission loads it once per decision.
    limits: ArcSwap<Limits>,
    table: SourceTable,
    rate: ArcSwapOption<SourceRate>,
    counts: Counts,
    next_slot: AtomicU64,
    pressure: PressureGate,
    stats: Arc<Stats>,
    refusals: Refusals,
    /// What observe mode let pass, per source.
    observed: Refusals,
    /// Sources whose connections were cut (evicted, or ended by a clock) in the current
    /// window: their newcomers are evictable at once, not only past the grace (see
    /// [`Ticket::mark_if_cut_before`]).
    cut: Refusals,
    /// The source whose blocked connections are cut while the listener's queued bytes are
    /// over `max_queued` (the one holding the most), chosen once a second.
    shedding: ArcSwapOption<SourceKey>,
    /// Connections per network (the coarser prefix of `max_conns_per_network`).
    networks: dashmap::DashMap<SourceKey, u32>,
    /// Entries in `networks`, kept beside it as the source table's `len` is: a DashMap's
    /// `len` read-locks every shard (four per CPU), and a network's first connection checked
    /// the bound with it.
    networks_len: AtomicUsize,
    /// The other replicas' loads (`[cluster]`); `None` for a single node.
    remote: ArcSwapOption<Remote>,
    /// `remote` holds a view: a single node's admission checks this one relaxed load and
    /// never touches the swap.
    has_remote: AtomicBool,
    /// `[cluster]` is on: new connections are counted per source in [`Shared::opened`]
    /// for the cluster-wide rate. Off (a single node), admission never touches the map.
    counting: AtomicBool,
    /// New connections per source since the sync task last took them; at most
    /// `max_sources` keys.
    opened: dashmap::DashMap<SourceKey, u32>,
    /// Connections over their source's cap, waiting for a slot: bounded, evicted first.
    waiting: WaitingRoom,
    /// `[cluster]` is configured: the per-source caps and rate are shared across replicas
    /// and stay hard (a replica cannot tell the others' connections proven, nor spend
    /// their credits), so a pool does not grow past the cap and exchanges earn no rate.
    shared_caps: AtomicBool,
    /// A trusted balancer's connections admitted over a listener cap before their PROXY
    /// header named the source; bounded like the waiting room (see [`Guard::admit_trusted`]).
    unnamed_over: AtomicUsize,
    /// Told at every eviction: a connection parked outside any task (`conn::parked`) has no
    /// waiter of its own on its `ConnCtl`, so its lot listens here for all of them.
    evictions: tokio::sync::Notify,
}

/// A trusted connection's source and network, once its PROXY header named them.
pub(crate) type AssignedSource = (Option<SourceKey>, Option<SourceKey>);

/// One source's load, for `/sources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLoad {
    pub source: SourceKey,
    pub conns: usize,
    pub half_open: usize,
    pub half_closed: usize,
    /// OPEN connections moving less than `limits.min_rate`.
    pub stalled: usize,
    /// Of `stalled`, those idle: nothing moves and nothing waits (a pool between requests).
    pub idle: usize,
    /// Admitted over the source's connection cap, waiting for a slot.
    pub waiting: usize,
    /// Bytes queued toward the source's clients.
    pub queued: u64,
    /// Connections whose first message is held until whole (no backend yet).
    pub holding: usize,
    /// Refusals in the current tally window (about a minute).
    pub refused: u64,
    /// Would-be refusals, evictions and expiries in observe mode, same window.
    pub observed: u64,
}

impl SourceLoad {
    /// Connections that go nowhere: silent or half-closed past the grace, or stalled and
    /// not idle (a slow reader, a drip). An idle connection costs little and is not counted.
    pub fn going_nowhere(&self) -> usize {
        self.half_open + self.half_closed + self.stalled.saturating_sub(self.idle)
    }

    /// Connections moving data now: in no list and not waiting for a slot.
    pub fn moving(&self) -> usize {
        (self.conns).saturating_sub(self.half_open + self.half_closed + self.stalled + self.waiting)
    }

    /// A word for the operator:
    /// - "flooding": most of its connections go nowhere, or it is refused while none of its
    ///   connections moves data (it asks for more than it uses: its extra connections only
    ///   wait, or go nowhere);
    /// - "busy": refused while its connections move data (a NAT or a client pool at its cap
    ///   under pressure: raise the cap or allow-list it);
    /// - "pool": most of its connections are idle after completing exchanges (a connection
    ///   pool, subscribers): cheap, and shed first under pressure;
    /// - "ok".
    ///
    /// Only "flooding" ever suggests a deny.
    pub fn verdict(&self) -> &'static str {
        if self.going_nowhere() * 2 > self.conns {
            "flooding"
        } else if self.refused > 0 {
            if self.moving() > 0 {
                "busy"
            } else {
                "flooding"
            }
        } else if self.idle * 2 > self.conns {
            "pool"
        } else {
            "ok"
        }
    }
}

/// What `/sources` sorts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceOrder {
    Conns,
    HalfOpen,
    HalfClosed,
    Stalled,
    Refused,
    Observed,
    /// Bytes queued toward the source's clients (`queued_bytes`).
    Queued,
}

/// A point-in-time view of a guard's counts, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuardSnapshot {
    pub conns: usize,
    pub half_open: usize,
    pub half_closed: usize,
    /// Of the OPEN connections, those stalled (below `min_rate`).
    pub stalled: usize,
    /// Bytes queued toward the listener's clients.
    pub queued: u64,
    /// Sources holding at least one stalled connection.
    pub stalled_sources: usize,
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
                next_slot: AtomicU64::new(0),
                stats,
                refusals: Refusals::default(),
                observed: Refusals::default(),
                cut: Refusals::default(),
                shedding: ArcSwapOption::empty(),
                networks: dashmap::DashMap::new(),
                networks_len: AtomicUsize::new(0),
                remote: ArcSwapOption::empty(),
                has_remote: AtomicBool::new(false),
                counting: AtomicBool::new(false),
                opened: dashmap::DashMap::new(),
                waiting: WaitingRoom::default(),
                shared_caps: AtomicBool::new(false),
                unnamed_over: AtomicUsize::new(0),
                evictions: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Admission at accept, PROXY protocol included: with `trusted` (the listener expects a
    /// PROXY header), a connection from a trusted balancer is admitted until its header
    /// names the source ([`Guard::admit_trusted`]) and any other is refused
    /// (`untrusted_proxy`); without, the peer is the source ([`Guard::admit`]). A refusal is
    /// already counted.
    pub fn admit_from(
        &self,
        peer: IpAddr,
        trusted: Option<&[ipnet::IpNet]>,
    ) -> Result<Ticket, Reject> {
        match trusted {
            None => self.admit(peer),
            Some(nets) if nets.iter().any(|n| n.contains(&peer.to_canonical())) => {
                self.admit_trusted()
            }
            Some(_) => {
                self.shared.stats.reject(Reject::UntrustedProxy);
                Err(Reject::UntrustedProxy)
            }
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
    /// read: counted per listener only until [`Ticket::assign_source`] gives it its real
    /// source. It evicts nobody here: who it is decides whether it may take anybody's place
    /// (a source at its own cap may not), and that is known only from the header. So at a
    /// full listener it is admitted over the cap, and [`Ticket::assign_source`] makes room
    /// for it with its source's weight, or refuses it. Such connections are bounded like the
    /// waiting room ([`max_waiting`]); beyond that, or with `on_full = "reject"`, a full
    /// listener refuses the newcomer.
    pub fn admit_trusted(&self) -> Result<Ticket, Reject> {
        let sh = &self.shared;
        let lim = sh.limits.load();
        let r = sh.reserve_unnamed(&lim).map(|over| {
            sh.stats.accepted.fetch_add(1, Ordering::Relaxed);
            sh.update_pressure();
            Ticket {
                shared: self.shared.clone(),
                key: None,
                net: None,
                state: State::HalfOpen,
                ctl: Arc::new(ConnCtl::default()),
                listed: None,
                provisional: false,
                trusted: true,
                over,
            }
        });
        if let Err(reason) = r {
            sh.stats.reject(reason);
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
        let mut provisional = false;
        let mut weight = 0;
        if let Some(key) = &key {
            // Past half the listener's byte cap, a source already cut (for the bytes its
            // clients leave queued, or by a clock) gets no newcomer: what it would pin is
            // known, and the room left is the others'. One relaxed load while nobody was cut.
            if lim.mode == Mode::Enforce && sh.cut.has(key) && sh.queued_over(lim, 2) {
                return Err(Reject::QueuedFull);
            }
            let others = sh.others(key);
            // Non-binding look first, so a source at its cap is refused before it can cost
            // anyone an eviction. (Observing, the binding check counts it.)
            match sh.table.map.get(key) {
                Some(e) => {
                    weight = e.going_nowhere();
                    if lim.mode == Mode::Enforce {
                        match check_source(&e, lim, others, sh.no_pools()) {
                            Ok(p) => provisional = p,
                            Err(r) => {
                                drop(e);
                                sh.enforce_or_observe(*key, r, lim)?;
                            }
                        }
                    }
                }
                None if sh.table.len.load(Ordering::Relaxed) >= lim.max_sources as usize => {
                    return Err(Reject::SourcesFull);
                }
                None if others != RemoteLoad::default() && lim.mode == Mode::Enforce => {
                    if let Err(r) =
                        check_source(&SourceEntry::default(), lim, others, sh.no_pools())
                    {
                        sh.enforce_or_observe(*key, r, lim)?;
                    }
                }
                None => {}
            }
        }
        // A newcomer that will only wait for its own source's slot takes nobody's place.
        if provisional {
            weight = usize::MAX;
        }
        let mut t = self.admit_counted(key, provisional, weight, lim)?;
        if let Some(key) = &key {
            sh.count_opened(key, lim);
            if !provisional && sh.cut.has(key) {
                t.mark_if_cut_before();
            }
        }
        Ok(t)
    }

    /// The binding part of admission: a place under the listener caps (evicting when
    /// allowed), then one in the source's entry.
    /// `weight`: how many connections going nowhere the newcomer's source holds already; it
    /// may only take the place of one from a source holding more.
    fn admit_counted(
        &self,
        key: Option<SourceKey>,
        provisional: bool,
        weight: usize,
        lim: &Limits,
    ) -> Result<Ticket, Reject> {
        let sh = &self.shared;
        // The coarser level first: a network at its cap costs nobody an eviction.
        let net = match &key {
            Some(_) => sh.enter_network(key_ip(&key), lim)?,
            None => None,
        };
        let undo_net = |sh: &Shared| {
            if let Some(n) = &net {
                sh.leave_network(n);
            }
        };
        let me = Newcomer {
            key: key.as_ref(),
            weight,
        };
        if !sh.reserve_conn(lim, &me) {
            undo_net(sh);
            return Err(Reject::ConnsFull);
        }
        if !sh.reserve_state(EvictState::HalfOpen, lim, &me) {
            sh.counts.conns.fetch_sub(1, Ordering::AcqRel);
            undo_net(sh);
            return Err(Reject::HalfOpenFull);
        }
        let ctl = Arc::new(ConnCtl::default());
        let mut provisional = provisional;
        if let Some(key) = &key {
            match sh.enter_source(key, lim, Some(&ctl)) {
                Ok(p) => provisional = p,
                Err(reason) => {
                    sh.give_back(Some(EvictState::HalfOpen));
                    undo_net(sh);
                    return Err(reason);
                }
            }
            // The waiting room is bounded listener-wide: full, the newcomer is refused at
            // its source's cap at once rather than hold a half-open place for a second.
            // Flagged before it is in the room: nobody can pick it yet.
            ctl.set_waiting(provisional);
            if provisional && !sh.waiting.enter(*key, &ctl, max_waiting(lim.max_half_open)) {
                sh.undo_provisional(key);
                sh.give_back(Some(EvictState::HalfOpen));
                undo_net(sh);
                return Err(Reject::SourceConns);
            }
        }
        sh.stats.accepted.fetch_add(1, Ordering::Relaxed);
        sh.update_pressure();
        Ok(Ticket {
            shared: self.shared.clone(),
            key,
            net,
            state: State::HalfOpen,
            ctl,
            listed: None,
            provisional,
            trusted: false,
            over: false,
        })
    }

    /// Current counts.
    pub fn snapshot(&self) -> GuardSnapshot {
        let sh = &self.shared;
        GuardSnapshot {
            conns: sh.counts.conns.load(Ordering::Relaxed),
            half_open: sh.counts.half_open.load(Ordering::Relaxed),
            half_closed: sh.counts.half_closed.load(Ordering::Relaxed),
            stalled: sh.counts.stalled.load(Ordering::Relaxed),
            queued: sh.counts.queued.load(Ordering::Relaxed),
            stalled_sources: sh.table.sources_in(EvictState::Stalled),
            sources: sh.table.len.load(Ordering::Relaxed),
            rate_keys: sh.rate.load().as_ref().map_or(0, |r| r.len()),
            pressure: sh.pressure.is_on(),
        }
    }

    /// Sums of the source table's entries (conns, listed half-open, listed half-closed,
    /// stalled), walked entry by entry: tests compare them with the snapshot to prove the two
    /// views agree.
    pub fn table_totals(&self) -> (usize, usize, usize, usize) {
        self.shared
            .table
            .map
            .iter()
            .fold((0, 0, 0, 0), |(c, o, h, st), e| {
                (
                    c + e.conns as usize,
                    o + e.half_open.len(),
                    h + e.half_closed.len(),
                    st + e.stalled.len(),
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
                    stalled: e.stalled.len(),
                    idle: e.idle(),
                    waiting: e.provisional as usize,
                    queued: e.queued,
                    holding: e.holding as usize,
                    refused: 0,
                    observed: 0,
                };
                (*e.key(), load)
            })
            .collect();
        let blank = |source| SourceLoad {
            source,
            conns: 0,
            half_open: 0,
            half_closed: 0,
            stalled: 0,
            idle: 0,
            waiting: 0,
            queued: 0,
            holding: 0,
            refused: 0,
            observed: 0,
        };
        for (key, refused) in self.shared.refusals.snapshot() {
            all.entry(key).or_insert(blank(key)).refused = refused;
        }
        for (key, observed) in self.shared.observed.snapshot() {
            all.entry(key).or_insert(blank(key)).observed = observed;
        }
        let mut v: Vec<SourceLoad> = all.into_values().collect();
        let key = |l: &SourceLoad| match by {
            SourceOrder::Conns => l.conns as u64,
            SourceOrder::HalfOpen => l.half_open as u64,
            SourceOrder::HalfClosed => l.half_closed as u64,
            SourceOrder::Stalled => l.stalled as u64,
            SourceOrder::Refused => l.refused,
            SourceOrder::Observed => l.observed,
            SourceOrder::Queued => l.queued,
        };
        v.sort_by(|a, b| key(b).cmp(&key(a)).then(a.source.cmp(&b.source)));
        v.retain(|l| key(l) > 0);
        v.truncate(n);
        v
    }

    /// The sources their own caps refused in the tally's window (not a listener-wide cap,
    /// which refuses whoever comes next), with those refusals only: what a ban weighs.
    pub(crate) fn own_refusals(&self) -> Vec<(SourceKey, u64)> {
        self.shared.refusals.own()
    }

    /// Is the listener in pressure mode?
    pub fn pressure(&self) -> bool {
        self.shared.pressure.is_on()
    }

    /// Whether memory is short, as the server read it (`crate::memory`): pressure mode is on
    /// while memory or the listener's counts say so; the bell rings when the mode flips.
    pub fn set_memory_pressure(&self, short: bool) {
        self.shared.pressure.set_memory(short);
    }

    /// Is memory one of the reasons the listener is in pressure mode?
    pub fn memory_pressure(&self) -> bool {
        self.shared.pressure.by_memory()
    }

    /// The listener's bell, rung when pressure mode flips (see [`crate::bell`]).
    pub fn bell(&self) -> &crate::bell::Bell {
        self.shared.pressure.bell()
    }

    /// Resolves after an eviction (one permit is kept when nobody waits): the victim's
    /// `ConnCtl` says which. For waiters that watch many connections at once.
    pub fn evictions(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.evictions.notified()
    }

    /// Periodic upkeep: forget rate-limiter keys that are back to a full bucket, so the
    /// limiter's memory follows active sources.
    pub fn housekeep(&self) {
        if let Some(r) = &*self.shared.rate.load() {
            r.housekeep();
        }
        self.shared.refusals.housekeep();
        self.shared.observed.housekeep();
        self.shared.cut.housekeep();
        self.shared.choose_shedding();
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

    /// `[cluster]` is on: caps and rate are shared across replicas and stay hard (see
    /// `Shared::shared_caps`).
    pub fn set_shared_caps(&self, on: bool) {
        self.shared.shared_caps.store(on, Ordering::Relaxed);
    }

    /// Installs the cluster view admission adds to the local counts (`None`: local caps
    /// only, as a single node or while Redis is away).
    pub fn set_remote(&self, remote: Option<Arc<Remote>>) {
        let some = remote.is_some();
        self.shared.remote.store(remote);
        self.shared.has_remote.store(some, Ordering::Release);
    }

    /// The cluster view in force.
    pub fn remote(&self) -> Option<Arc<Remote>> {
        self.shared.remote.load_full()
    }

    /// This replica's share for the cluster: the sources holding at least `at(cap)` of one
    /// of their per-source caps (`at` gives the count that matters for a cap), heaviest
    /// first, at most `max`. A flood from many sources holding little each publishes nothing.
    ///
    /// `elapsed` is the time since the last call: the new connections counted since then
    /// become each source's `rate`, and the count starts again (this also turns counting
    /// on, so a single node, which never calls this, never counts).
    pub fn share(
        &self,
        at: impl Fn(u32) -> u32,
        max: usize,
        elapsed: std::time::Duration,
    ) -> Vec<(SourceKey, RemoteLoad)> {
        let sh = &self.shared;
        sh.counting.store(true, Ordering::Relaxed);
        let lim = sh.limits.load();
        let need = |cap: u32| if cap == 0 { u32::MAX } else { at(cap) };
        let (c, o, h, r) = (
            need(lim.max_conns_per_source),
            need(lim.max_half_open_per_source),
            need(lim.max_half_closed_per_source),
            need(lim.conn_rate_per_source),
        );
        let load_of = |e: &SourceEntry| RemoteLoad {
            conns: e.conns,
            half_open: e.half_open.len() as u32,
            half_closed: e.half_closed.len() as u32,
            rate: 0,
        };
        let mut loads: std::collections::HashMap<SourceKey, RemoteLoad> = sh
            .table
            .map
            .iter()
            .filter_map(|e| {
                let l = load_of(&e);
                (l.conns >= c || l.half_open >= o || l.half_closed >= h).then_some((*e.key(), l))
            })
            .collect();
        let ms = elapsed.as_millis().max(1) as u64;
        let opened: Vec<(SourceKey, u32)> = sh.opened.iter().map(|e| (*e.key(), *e)).collect();
        sh.opened.clear();
        for (key, n) in opened {
            let rate = (u64::from(n) * 1000 / ms).min(u64::from(u32::MAX)) as u32;
            if let Some(l) = loads.get_mut(&key) {
                l.rate = rate;
            } else if rate >= r {
                let mut l = sh
                    .table
                    .map
                    .get(&key)
                    .map_or_else(RemoteLoad::default, |e| load_of(&e));
                l.rate = rate;
                loads.insert(key, l);
            }
        }
        let mut v: Vec<(SourceKey, RemoteLoad)> = loads.into_iter().collect();
        v.sort_by(|a, b| {
            (b.1.conns, b.1.rate)
                .cmp(&(a.1.conns, a.1.rate))
                .then(a.0.cmp(&b.0))
        });
        v.truncate(max);
        v
    }
}

/// The per-source caps against a source's entry plus what the other replicas hold
/// (`others`, zero for a single node). `Ok(true)`: admitted provisionally, over the
/// connection cap by less than the slack, waiting for a slot.
///
/// `hard`: the cap holds whatever the source does (the listener is above its pressure mark,
/// or the cap is shared across replicas). Otherwise a source whose connections have all made
/// progress (a pool between requests, a client that opens a connection per request and
/// completes each) may hold more than its connection cap: it takes nothing that others need
/// while there is room, and its idle connections are the first evicted when the listener
/// fills (see [`pool_fits`]).
fn check_source(
    e: &SourceEntry,
    lim: &Limits,
    others: RemoteLoad,
    hard: bool,
) -> Result<bool, Reject> {
    // A source whose clients leave bytes queued gets no new connection that would take it
    // past its byte cap, each newcomer expected to pin as much as its blocked ones do, until
    // they take the bytes or go.
    if lim.max_queued_per_source > 0
        && e.queued > 0
        && e.queued.saturating_add(e.expected_queued()) > lim.max_queued_per_source
    {
        return Err(Reject::SourceQueued);
    }
    let mut provisional = false;
    let cap = lim.max_conns_per_source;
    let local = e.conns - e.provisional;
    if cap > 0 && local >= cap && !hard && pool_fits(e, cap, false) {
        // Over the cap, and welcome: the per-state caps below still apply.
    } else if cap > 0 && local >= cap {
        // A slot is about to free only if the source's connections can end: one whose
        // connections are mostly stuck (a slow reader's, a silent or lingering flood's) is
        // holding them, and a wait would only let it hold a second cap's worth of sockets.
        if e.provisional >= provisional_slack(cap) || e.stuck() * 2 >= cap as usize {
            return Err(Reject::SourceConns);
        }
        provisional = true;
    } else if cap > 0 && local.saturating_add(others.conns) >= cap {
        // No provisional slot on another replica's count: the slack waits for a local
        // connection whose task has not run yet, which a remote count knows nothing of.
        return Err(Reject::SourceConns);
    }
    if lim.max_half_open_per_source > 0
        && e.half_open.len() + others.half_open as usize >= lim.max_half_open_per_source as usize
    {
        return Err(Reject::SourceHalfOpen);
    }
    // A source whose lingering half-closed connections fill its cap gets no new connection
    // until one ends: otherwise each newcomer, once it lingers, evicts the source's oldest,
    // and a client that sends FIN and never reads churns through connections (and backend
    // bytes) as fast as its rate allows.
    if lim.max_half_closed_per_source > 0
        && e.half_closed.len() + others.half_closed as usize
            >= lim.max_half_closed_per_source as usize
    {
        return Err(Reject::SourceHalfClosed);
    }
    Ok(provisional)
}

/// A source at its connection cap whose connections all go somewhere: none stuck (silent,
/// lingering, a slow reader, a drip), none whose client leaves bytes queued (weighed
/// milliseconds after its window closes, before the stall clocks judge it), none waiting
/// for a slot, and only a few not yet
/// proven by an exchange (a pool opening its next connections; an attacker that opens many
/// and proves none gets no further). Checked only for a source at its cap (it scans the
/// stalled list).
/// `waiter`: asked for a connection already waiting for a slot (the others waiting may
/// then be ahead of it, and do not hold it back).
fn pool_fits(e: &SourceEntry, cap: u32, waiter: bool) -> bool {
    (waiter || e.provisional == 0)
        && e.queued == 0
        && e.unproven() < unproven_slack(cap)
        && e.stuck() == 0
}

/// How many connections not yet proven a source over its cap may hold: an eighth of the
/// cap (8 for the default 64), at least 1.
fn unproven_slack(cap: u32) -> u32 {
    (cap / 8).max(1)
}

/// How many connections a source at its connection cap may have waiting for a slot: a
/// client pool that closes and reconnects at once can be a whole pool ahead of our tasks.
/// Each waits at most `conn::CONFIRM_WAIT`, so a source holds at most twice its cap for that
/// long, and only while fewer than half its connections are stuck.
fn provisional_slack(cap: u32) -> u32 {
    cap.max(2)
}

impl Shared {
    /// The per-source half of admission for a connection already counted per listener
    /// (a PROXY protocol connection whose header named its source): deny, allow, rate,
    /// per-source caps, then the source's half-open list. `over`: it was admitted over a
    /// listener cap, and takes a place now, evicting with its source's weight
    /// ([`Shared::settle_unnamed`]) once its source has passed its own caps.
    /// Returns the source and network keys to count under.
    pub(crate) fn assign_source(&self, ip: IpAddr, over: bool) -> Result<AssignedSource, Reject> {
        let ip = ip.to_canonical();
        let lim = &*self.limits.load();
        // A PROXY connection is past accept: no provisional wait, the cap is strict.
        let r = self.source_of(ip, lim).and_then(|key| {
            let Some(key) = key else {
                if over {
                    self.settle_unnamed(
                        lim,
                        &Newcomer {
                            key: None,
                            weight: 0,
                        },
                    )?;
                }
                return Ok((None, None));
            };
            let net = self.enter_network(ip, lim)?;
            let entered = self.enter_source(&key, lim, None).and_then(|provisional| {
                if provisional {
                    self.undo_provisional(&key);
                    self.enforce_or_observe(key, Reject::SourceConns, lim)?;
                    self.enter_source_unchecked(&key);
                }
                Ok(())
            });
            let settled = entered.and_then(|()| {
                if !over {
                    return Ok(());
                }
                let weight = self.table.map.get(&key).map_or(0, |e| e.going_nowhere());
                let me = Newcomer {
                    key: Some(&key),
                    weight,
                };
                self.settle_unnamed(lim, &me).inspect_err(|_| {
                    if let Some(mut e) = self.table.map.get_mut(&key) {
                        e.conns = e.conns.saturating_sub(1);
                    }
                    self.table.remove_if_empty(&key);
                })
            });
            if let Err(r) = settled {
                if let Some(n) = &net {
                    self.leave_network(n);
                }
                return Err(r);
            }
            self.count_opened(&key, lim);
            Ok((Some(key), net))
        });
        if let Err(reason) = r {
            self.refused(ip, reason);
        }
        r
    }

    /// A trusted balancer's connection before its header: a place under the listener caps
    /// if there is one (`Ok(false)`), else one over them (`Ok(true)`), within the bound and
    /// unless `on_full = "reject"`. Nobody is evicted: see [`Guard::admit_trusted`].
    fn reserve_unnamed(&self, lim: &Limits) -> Result<bool, Reject> {
        let c = &self.counts;
        let conn = try_inc(&c.conns, lim.max_conns as usize);
        let half = try_inc(&c.half_open, lim.max_half_open as usize);
        if conn && half {
            return Ok(false);
        }
        if lim.on_full == OnFull::Reject
            || !try_inc(&self.unnamed_over, max_waiting(lim.max_half_open))
        {
            if conn {
                c.conns.fetch_sub(1, Ordering::AcqRel);
            }
            if half {
                c.half_open.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(if conn {
                Reject::HalfOpenFull
            } else {
                Reject::ConnsFull
            });
        }
        if !conn {
            c.conns.fetch_add(1, Ordering::AcqRel);
        }
        if !half {
            c.half_open.fetch_add(1, Ordering::AcqRel);
        }
        Ok(true)
    }

    /// A connection admitted over a listener cap, now that its source is known and passed
    /// its own caps: while the listener is over `max_conns` or `max_half_open`, it makes room
    /// as any newcomer would, with `me`'s weight; if there is none, it is refused (its
    /// listener-wide counts go back with its ticket).
    fn settle_unnamed(&self, lim: &Limits, me: &Newcomer<'_>) -> Result<(), Reject> {
        let over = |count: &AtomicUsize, max: u32| count.load(Ordering::Acquire) > max as usize;
        for (count, max, states, reason) in [
            (
                &self.counts.conns,
                lim.max_conns,
                &EvictState::ALL[..],
                Reject::ConnsFull,
            ),
            (
                &self.counts.half_open,
                lim.max_half_open,
                &[EvictState::HalfOpen][..],
                Reject::HalfOpenFull,
            ),
        ] {
            let mut tries = 0;
            while over(count, max) {
                tries += 1;
                if tries > 4 || !self.make_room(states, me) {
                    return Err(reason);
                }
            }
        }
        Ok(())
    }

    /// The per-source checks that need no table entry: deny list, allow list (exempt:
    /// `None`), then the source's new-connection rate. Returns the key to count under. In
    /// observe mode a deny or rate refusal is counted and the connection goes on.
    fn source_of(&self, ip: IpAddr, lim: &Limits) -> Result<Option<SourceKey>, Reject> {
        let key = || SourceKey::new(ip, lim.ipv4_prefix, lim.ipv6_prefix);
        if lim.deny.iter().any(|n| n.contains(&ip)) {
            if lim.mode == Mode::Observe {
                self.observed_key(key(), Observed::Reject(Reject::Denied));
            } else {
                return Err(Reject::Denied);
            }
        }
        if lim.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(None);
        }
        let key = key();
        if self.has_remote.load(Ordering::Acquire)
            && let Some(r) = &*self.remote.load()
        {
            if r.banned.contains(&key) {
                self.enforce_or_observe(key, Reject::Banned, lim)?;
            }
            // The cluster-wide rate: this replica's part of it, for this interval.
            if let Some(budget) = r.rate_budget.get(&key)
                && self.opened.get(&key).map_or(0, |n| *n) >= *budget
            {
                self.enforce_or_observe(key, Reject::Rate, lim)?;
            }
        }
        if let Some(rate) = &*self.rate.load()
            && !rate.check(&key, !self.shared_caps.load(Ordering::Relaxed))
        {
            self.enforce_or_observe(key, Reject::Rate, lim)?;
        }
        Ok(Some(key))
    }

    /// A per-source refusal: `Err` (to act on) when enforcing, counted and `Ok` when only
    /// observing. The refusal itself is counted by the caller.
    fn enforce_or_observe(&self, key: SourceKey, r: Reject, lim: &Limits) -> Result<(), Reject> {
        match lim.mode {
            Mode::Enforce => Err(r),
            Mode::Observe => {
                self.observed_key(key, Observed::Reject(r));
                Ok(())
            }
        }
    }

    /// Counts what observe mode let pass, and tallies it against its source.
    fn observed_key(&self, key: SourceKey, what: Observed) {
        self.stats.observe(what);
        self.observed.count(key, false);
    }

    /// Counts a refusal, and tallies it against its source for `/sources` (a denied source
    /// is refused by the operator's choice, not by its behaviour).
    fn refused(&self, ip: IpAddr, reason: Reject) {
        // A banned source is refused for the ban, not for what it does now: no tally, or
        // the ban would feed itself.
        if matches!(reason, Reject::Denied | Reject::Banned) {
            self.stats.reject(reason);
            return;
        }
        let lim = self.limits.load();
        self.refused_key(SourceKey::new(ip, lim.ipv4_prefix, lim.ipv6_prefix), reason);
    }

    /// Counts a refusal of a connection from `key`.
    fn refused_key(&self, key: SourceKey, reason: Reject) {
        self.stats.reject(reason);
        self.refusals
            .count(key, refusals::against_the_source(reason));
    }

    /// Binding per-source check, then the connection is counted in its source's entry.
    /// `Ok(true)`: admitted provisionally (see [`Ticket::confirm`]). In observe mode a cap is
    /// counted and not acted on.
    /// `charge`: the newcomer's control, charged with what its source's blocked connections
    /// pin on average until its own weight is known (`conn::weight` looks soon), so that a
    /// flood of clients that do not read is held to its byte cap before its connections
    /// have filled their buffers, not after.
    fn enter_source(
        &self,
        key: &SourceKey,
        lim: &Limits,
        charge: Option<&ConnCtl>,
    ) -> Result<bool, Reject> {
        use dashmap::mapref::entry::Entry;
        let others = self.others(key);
        match self.table.map.entry(*key) {
            Entry::Occupied(mut o) => {
                let e = o.get_mut();
                // Over the listener's byte cap, a source with bytes queued toward its
                // clients gets no newcomer: the others' do.
                if e.queued > 0 && self.queued_over(lim, 1) && lim.mode == Mode::Enforce {
                    return Err(Reject::QueuedFull);
                }
                let provisional = match check_source(e, lim, others, self.no_pools()) {
                    // Observing, nothing waits: the cap is counted and the connection goes on.
                    Ok(true) if lim.mode == Mode::Observe => {
                        self.observed_key(*key, Observed::Reject(Reject::SourceConns));
                        false
                    }
                    Ok(p) => p,
                    Err(r) if lim.mode == Mode::Observe => {
                        self.observed_key(*key, Observed::Reject(r));
                        false
                    }
                    Err(r) => return Err(r),
                };
                e.conns += 1;
                e.provisional += u32::from(provisional);
                let expected = e.expected_queued();
                if let Some(ctl) = charge
                    && expected > 0
                    && lim.mode == Mode::Enforce
                {
                    ctl.queued.store(expected, Ordering::Relaxed);
                    e.queued += expected;
                    e.blocked += 1;
                    self.counts.queued.fetch_add(expected, Ordering::Relaxed);
                }
                Ok(provisional)
            }
            Entry::Vacant(v) => {
                if others != RemoteLoad::default()
                    && let Err(r) =
                        check_source(&SourceEntry::default(), lim, others, self.no_pools())
                {
                    if lim.mode == Mode::Enforce {
                        return Err(r);
                    }
                    self.observed_key(*key, Observed::Reject(r));
                }
                if self.table.len.fetch_add(1, Ordering::Relaxed) >= lim.max_sources as usize {
                    self.table.len.fetch_sub(1, Ordering::Relaxed);
                    return Err(Reject::SourcesFull);
                }
                v.insert(SourceEntry {
                    conns: 1,
                    ..SourceEntry::default()
                });
                Ok(false)
            }
        }
    }

    /// Counts a connection in its source's network (a coarser prefix), refusing it at
    /// `max_conns_per_network` (observed only, in observe mode). `None` when the cap is off.
    fn enter_network(&self, ip: IpAddr, lim: &Limits) -> Result<Option<SourceKey>, Reject> {
        if lim.max_conns_per_network == 0 {
            return Ok(None);
        }
        let net = SourceKey::new(ip, lim.network_ipv4_prefix, lim.network_ipv6_prefix);
        // Networks are fewer than sources: the same bound keeps memory bounded.
        let mut n = self
            .network_entry(net, lim.max_sources as usize)
            .ok_or(Reject::SourcesFull)?;
        if *n >= lim.max_conns_per_network {
            drop(n);
            let source = SourceKey::new(ip, lim.ipv4_prefix, lim.ipv6_prefix);
            self.enforce_or_observe(source, Reject::NetworkConns, lim)?;
            n = self
                .network_entry(net, usize::MAX)
                .ok_or(Reject::SourcesFull)?;
        }
        *n += 1;
        Ok(Some(net))
    }

    /// `net`'s count, made (at 0) if there is none and fewer than `max` networks are counted.
    /// One lookup, one shard lock.
    fn network_entry(
        &self,
        net: SourceKey,
        max: usize,
    ) -> Option<dashmap::mapref::one::RefMut<'_, SourceKey, u32>> {
        use dashmap::mapref::entry::Entry;
        match self.networks.entry(net) {
            Entry::Occupied(o) => Some(o.into_ref()),
            Entry::Vacant(v) => {
                if self.networks_len.fetch_add(1, Ordering::Relaxed) >= max {
                    self.networks_len.fetch_sub(1, Ordering::Relaxed);
                    return None;
                }
                Some(v.insert(0))
            }
        }
    }

    /// A connection counted in `net` ends. One lock of its shard for the count and the
    /// removal.
    pub(crate) fn leave_network(&self, net: &SourceKey) {
        let gone = self.networks.remove_if_mut(net, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
        if gone.is_some() {
            self.networks_len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes back a provisional admission counted by [`Shared::enter_source`].
    fn undo_provisional(&self, key: &SourceKey) {
        if let Some(mut e) = self.table.map.get_mut(key) {
            e.provisional = e.provisional.saturating_sub(1);
            e.conns = e.conns.saturating_sub(1);
        }
        self.table.remove_if_empty(key);
    }

    /// Counts a connection in its source's entry whatever the caps (observe mode).
    fn enter_source_unchecked(&self, key: &SourceKey) {
        let mut e = self.table.map.entry(*key).or_insert_with(|| {
            self.table.len.fetch_add(1, Ordering::Relaxed);
            SourceEntry::default()
        });
        e.conns += 1;
    }

    /// Counts a new connection of `key` for the cluster-wide rate (`[cluster]` only).
    fn count_opened(&self, key: &SourceKey, lim: &Limits) {
        if !self.counting.load(Ordering::Relaxed) {
            return;
        }
        if let Some(mut n) = self.opened.get_mut(key) {
            *n = n.saturating_add(1);
        } else if self.opened.len() < lim.max_sources as usize {
            *self.opened.entry(*key).or_insert(0) += 1;
        }
    }

    /// Whether the per-source caps are hard now: under pressure, or shared across replicas.
    pub(crate) fn no_pools(&self) -> bool {
        self.pressure.is_on() || self.shared_caps.load(Ordering::Relaxed)
    }

    /// What the other replicas hold of `key`, as of the last sync; zero for a single node.
    pub(crate) fn others(&self, key: &SourceKey) -> RemoteLoad {
        if !self.has_remote.load(Ordering::Acquire) {
            return RemoteLoad::default();
        }
        match &*self.remote.load() {
            Some(r) => r.loads.get(key).copied().unwrap_or_default(),
            None => RemoteLoad::default(),
        }
    }

    fn state_count(&self, s: EvictState) -> &AtomicUsize {
        match s {
            EvictState::HalfOpen => &self.counts.half_open,
            EvictState::HalfClosed => &self.counts.half_closed,
            EvictState::Stalled => &self.counts.stalled,
        }
    }

    /// Takes a place under `max_conns`. When full and `on_full = "evict"`, a connection that
    /// goes nowhere makes room: from the source holding the most of one kind (silent past the
    /// grace, half-closed past the grace, OPEN and stalled), the one longest in that state. A
    /// connection moving data at a healthy rate is never evicted.
    ///
    /// Only a much lighter source may take a heavier one's place (`weight`: the newcomer's
    /// source's connections going nowhere; the victim's must hold more than twice that): a
    /// flood from many sources that holds the listener full cannot churn through its own
    /// connections, so the room it leaves goes to newcomers from sources that hold nothing
    /// useless, the clients.
    fn reserve_conn(&self, lim: &Limits, me: &Newcomer<'_>) -> bool {
        let max = lim.max_conns as usize;
        for _ in 0..4 {
            if try_inc(&self.counts.conns, max) {
                return true;
            }
            if lim.on_full == OnFull::Reject || !self.make_room(&EvictState::ALL, me) {
                return false;
            }
        }
        false
    }

    /// Makes room for `me`: a connection waiting for its own source's slot first (from
    /// another source than `me`'s), else the longest stuck connection of the heaviest source.
    fn make_room(&self, states: &[EvictState], me: &Newcomer<'_>) -> bool {
        if me.weight != usize::MAX && self.evict_waiter(me.key) {
            return true;
        }
        self.evict_heaviest_of(states, me.weight)
    }

    /// Evicts the oldest connection waiting for a slot of a source other than `spare`.
    fn evict_waiter(&self, spare: Option<&SourceKey>) -> bool {
        while let Some((key, ctl)) = self.waiting.pick(spare) {
            if self.table.evict_waiter(&key, &ctl) {
                self.refusals.count(key, true);
                self.give_back_evicted(EvictState::HalfOpen);
                ctl.wake();
                return true;
            }
        }
        false
    }

    /// Takes a place under the listener cap for state `s`, evicting (from a source heavier
    /// than `weight`) when full and allowed.
    fn reserve_state(&self, s: EvictState, lim: &Limits, me: &Newcomer<'_>) -> bool {
        let (count, max) = match s {
            EvictState::HalfOpen => (&self.counts.half_open, lim.max_half_open),
            EvictState::HalfClosed => (&self.counts.half_closed, lim.max_half_closed),
            EvictState::Stalled => return true,
        };
        for _ in 0..4 {
            if try_inc(count, max as usize) {
                return true;
            }
            if lim.on_full == OnFull::Reject {
                return false;
            }
            let room = match s {
                // Only half-open places are ever held by waiters.
                EvictState::HalfOpen => self.make_room(&[s], me),
                _ => self.evict_heaviest_of(&[s], me.weight),
            };
            if !room {
                return false;
            }
        }
        false
    }

    /// Aborts the connection longest in its state of the source holding the most
    /// connections in one of `states` (ties go to the earlier state in `states`), if that
    /// source holds more than twice `weight`.
    fn evict_heaviest_of(&self, states: &[EvictState], weight: usize) -> bool {
        for _ in 0..3 {
            let mut best: Option<(SourceKey, usize, EvictState)> = None;
            for &s in states {
                if let Some((key, n)) = self.table.heaviest(s)
                    && best.is_none_or(|(_, b, _)| n > b)
                {
                    best = Some((key, n, s));
                }
            }
            let Some((key, n, s)) = best else {
                return false;
            };
            // Twice as heavy: among the sources of a flood, whose counts differ by one or
            // two, nobody may evict anybody (each eviction is a reconnect, an accept and a
            // backend connect more); a client, holding none, may always.
            if n <= weight.saturating_mul(2) {
                return false;
            }
            if let Some(victim) = self.table.evict_from(&key, s) {
                self.cut.count(key, true);
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
        self.evictions.notify_one();
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

/// Who asks for a place, for eviction: its source (`None`: allow-listed or not yet known),
/// and how many connections going nowhere that source holds (`usize::MAX`: it will only
/// wait for its own source's slot, and evicts nobody).
struct Newcomer<'a> {
    key: Option<&'a SourceKey>,
    weight: usize,
}

/// The address a source key was made from, as far as the network prefix needs it (the key
/// keeps the leading bits, which are the ones a coarser prefix looks at).
fn key_ip(key: &Option<SourceKey>) -> IpAddr {
    key.map_or(IpAddr::from([0, 0, 0, 0]), |k| k.addr())
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
