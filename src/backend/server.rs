//! One backend server's state: its address, health, load, and the lease a connection holds
//! on it. A configured name with several addresses is one `Server` per address, so each
//! has its own health and load.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;

/// A server of a pool.
#[derive(Debug)]
pub struct Server {
    /// The metric label: the address as configured, or `host:port@address` for one of
    /// a name's addresses.
    label: String,
    addr: SocketAddr,
    /// Which `servers` entry of the pool this came from.
    pub(super) entry: usize,
    /// Stops this server's health checks: the pool stops, or its name no longer resolves
    /// to this address.
    pub(super) stop: CancellationToken,
    pub(super) weight: u32,
    pub(super) max_conns: u32,
    /// Connections holding a lease.
    active: AtomicU32,
    /// Active health: flipped by `rise`/`fall` consecutive check results.
    up: AtomicBool,
    checks_ok: AtomicU32,
    checks_bad: AtomicU32,
    /// Passive health: consecutive failed connects or early resets.
    failures: AtomicU32,
    /// Passive cool-off end, in ms since `epoch`; 0 = none.
    cool_until_ms: AtomicU64,
    epoch: Instant,
    connect_errors: AtomicU64,
    /// Cancelled when the server goes down and the pool aborts its connections.
    down: Mutex<CancellationToken>,
}

impl Server {
    pub(super) fn new(
        cfg: &ServerConfig,
        entry: usize,
        addr: SocketAddr,
        stop: CancellationToken,
    ) -> Server {
        let label = if cfg.addr.parse::<SocketAddr>().is_ok() {
            cfg.addr.clone()
        } else {
            format!("{}@{}", cfg.addr, addr.ip())
        };
        Server {
            label,
            addr,
            entry,
            stop,
            weight: cfg.weight.max(1),
            max_conns: cfg.max_conns,
            active: AtomicU32::new(0),
            up: AtomicBool::new(true),
            checks_ok: AtomicU32::new(0),
            checks_bad: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            cool_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            connect_errors: AtomicU64::new(0),
            down: Mutex::new(CancellationToken::new()),
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
        self.up.load(Relaxed) && !self.cooling()
    }

    fn cooling(&self) -> bool {
        let until = self.cool_until_ms.load(Relaxed);
        until != 0 && self.now_ms() < until
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }

    pub fn connect_errors(&self) -> u64 {
        self.connect_errors.load(Relaxed)
    }

    /// Room for one more connection under `max_conns`.
    pub(super) fn has_room(&self) -> bool {
        self.max_conns == 0 || self.active() < self.max_conns
    }

    /// Takes a slot if there is room.
    pub(super) fn try_reserve(&self) -> bool {
        self.active
            .fetch_update(Relaxed, Relaxed, |a| {
                (self.max_conns == 0 || a < self.max_conns).then_some(a + 1)
            })
            .is_ok()
    }

    pub(super) fn release(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    /// A failed connect or a reset before the server's first byte. Returns true when this
    /// failure started a cool-off.
    pub(super) fn passive_failure(&self, fall: u32, cooloff: std::time::Duration) -> bool {
        self.connect_errors.fetch_add(1, Relaxed);
        let n = self.failures.fetch_add(1, Relaxed) + 1;
        if n >= fall && !self.cooling() {
            let until = self.now_ms() + cooloff.as_millis() as u64;
            self.cool_until_ms.store(until, Relaxed);
            self.failures.store(0, Relaxed);
            return true;
        }
        false
    }

    /// What is left of the running cool-off, and its end (to tell it from a later one).
    pub(super) fn cooloff_left(&self) -> Option<(std::time::Duration, u64)> {
        let until = self.cool_until_ms.load(Relaxed);
        let now = self.now_ms();
        (until != 0 && now < until).then(|| (std::time::Duration::from_millis(until - now), until))
    }

    /// Ends the cool-off that ends at `until`, if it still runs. Returns true when it did.
    pub(super) fn end_cooloff(&self, until: u64) -> bool {
        until > self.now_ms()
            && self
                .cool_until_ms
                .compare_exchange(until, 0, Relaxed, Relaxed)
                .is_ok()
    }

    pub(super) fn passive_success(&self) {
        self.failures.store(0, Relaxed);
    }

    /// One active check result. Returns `Some(new_up)` when the server changed state.
    pub(super) fn check_result(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.checks_bad.store(0, Relaxed);
            let n = self.checks_ok.fetch_add(1, Relaxed) + 1;
            if !self.up.load(Relaxed) && n >= rise {
                self.up.store(true, Relaxed);
                // Back by active checks: forget the passive cool-off too.
                self.cool_until_ms.store(0, Relaxed);
                return Some(true);
            }
        } else {
            self.checks_ok.store(0, Relaxed);
            let n = self.checks_bad.fetch_add(1, Relaxed) + 1;
            if self.up.load(Relaxed) && n >= fall {
                self.up.store(false, Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// The token connections to this server watch; cancelled by [`Server::abort_all`].
    pub(super) fn down_token(&self) -> CancellationToken {
        self.down
            .lock()
            .map(|t| t.clone())
            .unwrap_or_else(|_| CancellationToken::new())
    }

    /// Aborts every connection to this server (`on_down = "abort"`).
    pub(super) fn abort_all(&self) {
        if let Ok(mut t) = self.down.lock() {
            t.cancel();
            *t = CancellationToken::new();
        }
    }
}

/// A connection's hold on a server slot: gives the slot back, and wakes one queued client,
/// when dropped.
#[derive(Debug)]
pub struct Lease {
    pub(super) server: Arc<Server>,
    pub(super) freed: Arc<Notify>,
    pub(super) down: CancellationToken,
    pub(super) fall: u32,
    pub(super) cooloff: std::time::Duration,
}

impl Lease {
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Resolves when the server is marked down and its pool aborts its connections.
    pub async fn aborted(&self) {
        self.down.cancelled().await
    }

    /// The server reset the connection before sending a byte: passive health counts it.
    pub fn early_reset(&self) {
        if self.server.passive_failure(self.fall, self.cooloff) {
            tracing::warn!(server = %self.server.label, "backend server resets connections; cooling off");
            // A connect that succeeds proves nothing against a server that resets: no probe.
            super::health::watch_cooloff(self.server.clone(), None);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.server.release();
        self.freed.notify_one();
    }
}
