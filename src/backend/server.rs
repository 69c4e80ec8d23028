//! One backend server's state: its address, health and load. A configured name with
//! several addresses is one `Server` per address, so each has its own health and load.
//!
//! Health and load live in a [`ServerState`] of their own, shared by every `Server` value
//! that stands for the same address: a reload that changes a pool builds new `Server`s, and
//! those that stay carry the state on, so connections still open on the old pool count
//! against `max_conns`, and a server that is down stays down until its checks say otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio_util::sync::CancellationToken;

use super::slot::Slots;
use crate::config::ServerConfig;

/// One address of a pool. Held in an `Arc` by the pool's set and by every lease on it, so a
/// server removed from the set (its name moved) lives on until its last connection ends.
#[derive(Debug)]
pub struct Server {
    /// The metric label: the address as configured, or `host:port@address` for one of
    /// a name's addresses.
    label: String,
    addr: SocketAddr,
    /// Which `servers` entry of the pool this came from.
    pub(super) entry: usize,
    /// Stops this server's background tasks (its checks, the watch on its cool-off): the
    /// pool stops, or its name no longer resolves to this address.
    pub(super) stop: CancellationToken,
    pub(super) weight: u32,
    pub(super) max_conns: u32,
    pub(super) state: Arc<ServerState>,
}

/// What a server is and carries across reloads: load, health, counters.
#[derive(Debug)]
pub(super) struct ServerState {
    /// Connections holding a lease.
    active: AtomicU32,
    /// Active health: flipped by `rise`/`fall` consecutive check results.
    up: AtomicBool,
    checks_ok: AtomicU32,
    checks_bad: AtomicU32,
    /// Passive health: failed connects in a row (a connect that works ends the run)...
    failures: AtomicU32,
    /// ...and resets before any byte moved in a row (a connection that gets further, or
    /// ends any other way, ends the run). Counted apart because a connect that works
    /// says nothing about what the server does next.
    early_resets: AtomicU32,
    /// Passive cool-off end, in ms since `epoch`; 0 = none.
    cool_until_ms: AtomicU64,
    epoch: Instant,
    connect_errors: AtomicU64,
    /// When keeping the last server up in rotation was last said, in ms since `epoch`
    /// (0 = never): at most once a minute, however often it happens.
    held_said_ms: AtomicU64,
    /// A check confirming passive failures is under way.
    confirming: AtomicBool,
    /// Moved on when the server goes down and the pool aborts its connections: a lease
    /// taken in an earlier epoch is aborted. A flag read per wake-up of a connection, and
    /// no allocation per lease (a child cancellation token was 112 bytes a connection, and
    /// a lock at each look).
    down_epoch: AtomicU64,
    /// Told after `down_epoch` moves.
    down: Notify,
    /// The slots of its connections, registered only under `max_conns`.
    pub(super) slots: Slots,
}

impl ServerState {
    fn new() -> ServerState {
        ServerState {
            active: AtomicU32::new(0),
            up: AtomicBool::new(true),
            checks_ok: AtomicU32::new(0),
            checks_bad: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            early_resets: AtomicU32::new(0),
            cool_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            connect_errors: AtomicU64::new(0),
            held_said_ms: AtomicU64::new(0),
            confirming: AtomicBool::new(false),
            down_epoch: AtomicU64::new(0),
            down: Notify::new(),
            slots: Slots::default(),
        }
    }
}

/// The metric label of `addr` reached through the configured `cfg.addr`: a name's addresses
/// need one each, and the name in it says where the address came from.
pub(super) fn label(cfg: &ServerConfig, addr: SocketAddr) -> String {
    if cfg.addr.is_name() {
        format!("{}@{}", cfg.addr, addr.ip())
    } else {
        cfg.addr.to_string()
    }
}

impl Server {
    /// A server at `addr`; with `carried`, the state of the server it replaces.
    pub(super) fn new(
        cfg: &ServerConfig,
        entry: usize,
        addr: SocketAddr,
        stop: CancellationToken,
        carried: Option<Arc<ServerState>>,
    ) -> Server {
        Server {
            label: label(cfg, addr),
            addr,
            entry,
            stop,
            weight: cfg.weight.max(1),
            max_conns: cfg.max_conns,
            state: carried.unwrap_or_else(|| Arc::new(ServerState::new())),
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Eligible for new connections: up by active checks and not cooling off.
    pub fn is_up(&self) -> bool {
        self.state.up.load(Relaxed) && !self.cooling()
    }

    fn cooling(&self) -> bool {
        let until = self.state.cool_until_ms.load(Relaxed);
        until != 0 && self.now_ms() < until
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.state.epoch.elapsed().as_millis() as u64 + 1
    }

    pub fn active(&self) -> u32 {
        self.state.active.load(Relaxed)
    }

    pub fn connect_errors(&self) -> u64 {
        self.state.connect_errors.load(Relaxed)
    }

    /// Room for one more connection under `max_conns`.
    pub(super) fn has_room(&self) -> bool {
        self.max_conns == 0 || self.active() < self.max_conns
    }

    /// Takes a slot if there is room.
    pub(super) fn try_reserve(&self) -> bool {
        self.state
            .active
            .fetch_update(Relaxed, Relaxed, |a| {
                (self.max_conns == 0 || a < self.max_conns).then_some(a + 1)
            })
            .is_ok()
    }

    pub(super) fn release(&self) {
        self.state.active.fetch_sub(1, Relaxed);
    }

    /// One failure that was the server's doing: a refused or timed-out connect, or (with
    /// `early`) a reset before any byte either way. Returns true when it makes `fall` of
    /// its kind in a row.
    pub(super) fn count_failure(&self, fall: u32, early: bool) -> bool {
        self.state.connect_errors.fetch_add(1, Relaxed);
        let run = if early {
            &self.state.early_resets
        } else {
            &self.state.failures
        };
        let n = run.fetch_add(1, Relaxed) + 1;
        n >= fall && !self.cooling()
    }

    /// A connection to the server ended other than by an early reset.
    pub(super) fn not_reset_early(&self) {
        // Read first: the common case writes nothing to a line every connection shares.
        if self.state.early_resets.load(Relaxed) != 0 {
            self.state.early_resets.store(0, Relaxed);
        }
    }

    /// What is left of the running cool-off, and its end (to tell it from a later one).
    pub(super) fn cooloff_left(&self) -> Option<(Duration, u64)> {
        let until = self.state.cool_until_ms.load(Relaxed);
        let now = self.now_ms();
        (until != 0 && now < until).then(|| (Duration::from_millis(until - now), until))
    }

    /// Ends the cool-off that ends at `until`, if it still runs. Returns true when it did.
    pub(super) fn end_cooloff(&self, until: u64) -> bool {
        until > self.now_ms()
            && self
                .state
                .cool_until_ms
                .compare_exchange(until, 0, Relaxed, Relaxed)
                .is_ok()
    }

    /// Takes the server out of rotation for `cooloff`.
    pub(super) fn cool_off(&self, cooloff: Duration) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(cooloff.as_millis()).unwrap_or(u64::MAX));
        self.state.cool_until_ms.store(until, Relaxed);
        self.state.failures.store(0, Relaxed);
        self.state.early_resets.store(0, Relaxed);
    }

    /// Keeps the last server up in rotation despite `fall` failures; true when that is to
    /// be said (not within a minute of the last time).
    pub(super) fn hold(&self) -> bool {
        const SAY_EVERY_MS: u64 = 60_000;
        self.state.failures.store(0, Relaxed);
        self.state.early_resets.store(0, Relaxed);
        let now = self.now_ms() + SAY_EVERY_MS;
        let last = self.state.held_said_ms.load(Relaxed);
        now >= last + SAY_EVERY_MS
            && self
                .state
                .held_said_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }

    /// Starts a confirming check unless one is under way.
    pub(super) fn start_confirming(&self) -> bool {
        !self.state.confirming.swap(true, Relaxed)
    }

    pub(super) fn done_confirming(&self) {
        self.state.confirming.store(false, Relaxed);
    }

    /// A connect that worked ends a run of failed connects.
    pub(super) fn passive_success(&self) {
        // Read first: the common case writes nothing to a line every connect shares.
        if self.state.failures.load(Relaxed) != 0 {
            self.state.failures.store(0, Relaxed);
        }
    }

    /// The same server (the same address, carried across a reload), whichever `Server`
    /// value stands for it.
    pub(super) fn same(&self, other: &Server) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    /// Forgets the active checks' verdict: a pool whose checks were turned off must not
    /// keep a server down that nothing would ever bring back.
    pub(super) fn forget_checks(&self) {
        self.state.up.store(true, Relaxed);
        self.state.checks_ok.store(0, Relaxed);
        self.state.checks_bad.store(0, Relaxed);
    }

    /// One active check result. Returns `Some(new_up)` when the server changed state.
    pub(super) fn check_result(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        let s = &self.state;
        if ok {
            s.checks_bad.store(0, Relaxed);
            let n = s.checks_ok.fetch_add(1, Relaxed) + 1;
            if !s.up.load(Relaxed) && n >= rise {
                s.up.store(true, Relaxed);
                // Back by active checks: forget the passive cool-off too.
                s.cool_until_ms.store(0, Relaxed);
                return Some(true);
            }
        } else {
            s.checks_ok.store(0, Relaxed);
            let n = s.checks_bad.fetch_add(1, Relaxed) + 1;
            if s.up.load(Relaxed) && n >= fall {
                s.up.store(false, Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// The epoch a new lease is taken in; [`Server::abort_all`] ends it.
    pub(super) fn down_epoch(&self) -> u64 {
        self.state.down_epoch.load(Acquire)
    }

    /// Told by [`Server::abort_all`], after the epoch moved.
    pub(super) fn down_notified(&self) -> Notified<'_> {
        self.state.down.notified()
    }

    /// Aborts every connection to this server (`on_down = "abort"`).
    pub(super) fn abort_all(&self) {
        self.state.down_epoch.fetch_add(1, Release);
        self.state.down.notify_waiters();
        // After the epoch moved: a waiter that wakes finds its lease aborted.
        super::lease::DOWN.notify_waiters();
    }
}
