//! The pool: what a listener connects through. It ties the other parts together: a
//! connection asks it for a server (`balance.rs`), waits in its bounded queue when every
//! server is full, fails over to another server within the connect budget, and tells
//! passive health (`passive.rs`) what each attempt showed. Its background tasks are the
//! active checks (`health.rs`) and the following of names (`resolve.rs`).
//!
//! A backend that hangs must not turn into held client sockets, so every wait here is
//! bounded by the connection's `timeouts.connect`, the queue included: a server at its
//! `max_conns` takes no more, and when all are, a client waits in a queue of `queue_size`
//! for at most `queue_timeout`.

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::balance::{Balancer, MAX_ATTEMPTS, Pick, ServerSet, Tried};
use super::passive::servers_fault;
use super::slot::{self, RECLAIM_RETRY};
use super::{Lease, health, resolve};
use crate::config::{HealthConfig, PoolConfig, ProxyVersion, TcpConfig};
use crate::histo::{CONNECT_BUCKETS, Histo};
use crate::{proxy_protocol, sockopt};

/// Why no backend connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot resolve backend {backend:?}: {source}")]
    Resolve {
        backend: String,
        #[source]
        source: io::Error,
    },
    #[error("every server of the pool is down")]
    AllDown,
    #[error("every server is at max_conns and the queue is full")]
    QueueFull,
    #[error("every server is at max_conns and the wait ran out")]
    QueueTimeout,
    #[error("the servers tried did not answer within the connect budget")]
    TimedOut,
    #[error("the servers tried refused or failed")]
    Unavailable,
}

/// The addresses a PROXY header toward the server carries.
#[derive(Debug, Clone, Copy)]
pub struct ProxiedAddrs {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// One `[[backends]]` pool (or a listener's `backends` list) as one config version has it.
/// A reload builds a new `Pool` that takes over the old one's counters and queue signal
/// (`Shared`), its queue count and its servers' state, so metrics, health and the queue
/// bound survive the reload.
#[derive(Debug)]
pub struct Pool {
    pub(super) cfg: PoolConfig,
    pub(super) shared: Arc<Shared>,
    balancer: Balancer,
    /// Clients in the queue, shared with the pool this one replaced (and the one that
    /// replaces it): a client still queued in the old pool counts against the new
    /// `queue_size`, so a reload cannot double the queue.
    waiting: Arc<AtomicUsize>,
    /// Stops this pool's health and resolve tasks (on reload or shutdown).
    pub(super) stop: CancellationToken,
}

/// What a pool shares with the leases its connections hold, and carries on to the pool that
/// replaces it on a reload (the slot-freed signal and the counters).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(super) name: String,
    pub(super) servers: ArcSwap<ServerSet>,
    pub(super) health: HealthConfig,
    /// Woken when a lease ends, for a client queued for a slot.
    pub(super) freed: Arc<Notify>,
    connect_time: Arc<Histo>,
    /// Connects that failed on our side, not the server's.
    pub(super) local_errors: Arc<AtomicU64>,
    /// Connections that gave their slot to a queued client.
    pub(super) reclaimed: Arc<AtomicU64>,
    /// When the last local-error warning was logged, in ms since `epoch`.
    pub(super) local_warned_ms: AtomicU64,
    pub(super) epoch: std::time::Instant,
    /// Held while deciding a cool-off, so two servers failing at once cannot both go,
    /// each seeing the other still up.
    pub(super) deciding: Mutex<()>,
}

impl Pool {
    /// Resolves every server; fails when a name does not resolve at start. Servers of
    /// `previous` (the pool this one replaces on a reload) that stay carry their load and
    /// health on.
    pub async fn new(
        cfg: PoolConfig,
        stop: CancellationToken,
        previous: Option<&Pool>,
    ) -> Result<Pool, BackendError> {
        let before = previous.map(|p| p.servers());
        let servers = resolve::servers(&cfg, &stop, before.as_deref()).await?;
        let carry = previous.map(|p| &*p.shared);
        let shared = Shared {
            name: cfg.name.clone(),
            servers: ArcSwap::from_pointee(ServerSet::new(servers)),
            health: cfg.health.clone(),
            freed: carry.map_or_else(Default::default, |c| c.freed.clone()),
            connect_time: carry.map_or_else(
                || Arc::new(Histo::new(CONNECT_BUCKETS)),
                |c| c.connect_time.clone(),
            ),
            local_errors: carry.map_or_else(Default::default, |c| c.local_errors.clone()),
            reclaimed: carry.map_or_else(Default::default, |c| c.reclaimed.clone()),
            local_warned_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            deciding: Mutex::new(()),
        };
        Ok(Pool {
            balancer: Balancer::new(cfg.balance),
            cfg,
            shared: Arc::new(shared),
            waiting: previous.map_or_else(Default::default, |p| p.waiting.clone()),
            stop,
        })
    }

    /// Starts health checks and re-resolution on `tasks`, until the pool's stop token.
    pub fn start(self: &Arc<Self>, tasks: &TaskTracker) {
        if !self.cfg.health.enabled {
            // A server carried over from a pool with checks may be down by them; with no
            // checks left to bring it back, it would stay down for good.
            for s in &self.servers().list {
                s.forget_checks();
            }
        }
        health::start(self, tasks);
        resolve::start(self, tasks);
    }

    /// Stops the pool's background tasks (connections keep their leases).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The servers now.
    pub fn servers(&self) -> Arc<ServerSet> {
        self.shared.servers.load_full()
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.shared
            .servers
            .load()
            .list
            .iter()
            .map(|s| s.addr())
            .collect()
    }

    /// True when at least one server takes new connections.
    pub fn any_up(&self) -> bool {
        self.shared.servers.load().list.iter().any(|s| s.is_up())
    }

    /// Connects that failed on our side (descriptors, ephemeral ports, socket options),
    /// which are not held against any server.
    pub fn local_errors(&self) -> u64 {
        self.shared.local_errors.load(Ordering::Relaxed)
    }

    /// Connections that gave their server slot to a queued client (see `slot.rs`).
    pub fn slots_reclaimed(&self) -> u64 {
        self.shared.reclaimed.load(Ordering::Relaxed)
    }

    pub fn connect_time(&self) -> &Histo {
        &self.shared.connect_time
    }

    /// Connects to a server chosen by the pool's balance, within `budget`, and writes the
    /// PROXY header when the pool sends one.
    pub async fn connect(
        &self,
        tcp: &TcpConfig,
        budget: Duration,
        addrs: ProxiedAddrs,
    ) -> Result<(TcpStream, Lease), BackendError> {
        let deadline = Instant::now() + budget;
        let mut tried = Tried::default();
        let mut last = BackendError::AllDown;
        let set = self.shared.servers.load_full();
        let servers = &set.list;
        // When the wait in the queue ends, set once: a wake-up that finds every server full
        // again waits on, not anew.
        let mut queue_until = None;
        loop {
            if tried.len() >= MAX_ATTEMPTS.min(servers.len()) {
                return Err(last);
            }
            let i = match self.balancer.pick(&set, tried.as_slice()) {
                Pick::Server(i) => i,
                Pick::AllDown => return Err(last),
                Pick::AllFull => {
                    let until = *queue_until.get_or_insert_with(|| {
                        deadline.min(Instant::now() + self.cfg.queue_timeout)
                    });
                    self.wait_for_room(until, &set, tried.as_slice()).await?;
                    continue;
                }
            };
            let server = &servers[i];
            if !server.try_reserve() {
                continue; // lost a race for the last slot: pick again
            }
            let lease = Lease {
                server: server.clone(),
                pool: self.shared.clone(),
                epoch: server.down_epoch(),
                reset_early: Default::default(),
                slot: (server.max_conns > 0).then(|| server.state.slots.register()),
            };
            tried.push(i);
            let now = Instant::now();
            if now >= deadline {
                return Err(BackendError::TimedOut);
            }
            // Share what is left of the budget among the attempts still possible, so one
            // server that swallows SYNs cannot use it all.
            let left = MAX_ATTEMPTS.min(servers.len()) - tried.len() + 1;
            let attempt = (deadline - now) / left as u32;
            let addr = server.addr();
            let t0 = Instant::now();
            let result = tokio::time::timeout(attempt, sockopt::connect(addr, tcp)).await;
            match result {
                Ok(Ok(mut stream)) => {
                    self.shared.connect_time.observe(t0.elapsed());
                    server.passive_success();
                    if let Some(v) = self.cfg.proxy_protocol {
                        let header = match v {
                            ProxyVersion::V1 => {
                                proxy_protocol::encode_v1(addrs.client, addrs.local)
                            }
                            ProxyVersion::V2 => {
                                proxy_protocol::encode_v2(addrs.client, addrs.local)
                            }
                        };
                        // A fresh socket's send buffer is empty: this does not wait.
                        if stream.write_all(&header).await.is_err() {
                            last = BackendError::Unavailable;
                            continue;
                        }
                    }
                    return Ok((stream, lease));
                }
                Ok(Err(e)) if !servers_fault(&e) => {
                    // Ours (descriptors, ports, a socket option): another server may still
                    // work, and this one is not to blame.
                    self.shared.local_error(&e);
                    last = BackendError::Unavailable;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "backend connect failed");
                    last = BackendError::Unavailable;
                }
                Err(_) => {
                    tracing::debug!(%addr, "backend connect timed out");
                    last = BackendError::TimedOut;
                }
            }
            if let Some(check) = self.shared.passive_failure(server, false) {
                // Wait for the verdict (within the budget), so the next client meets it.
                let _ = tokio::time::timeout_at(deadline, check).await;
            }
            drop(lease);
        }
    }

    /// Waits in the bounded queue until a slot frees (or `until`), or refuses. While it
    /// waits, it claims the slot of a connection that is not making progress on a request
    /// (see `slot.rs`), looking again every `RECLAIM_RETRY` as connections go idle.
    async fn wait_for_room(
        &self,
        until: Instant,
        set: &ServerSet,
        tried: &[usize],
    ) -> Result<(), BackendError> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.cfg.queue_size as usize {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(BackendError::QueueFull);
        }
        let r = loop {
            // Listening before the claim, so that the slot it frees is not missed.
            let mut freed = pin!(self.shared.freed.notified());
            freed.as_mut().enable();
            slot::reclaim(set, tried);
            let wake = until.min(Instant::now() + RECLAIM_RETRY);
            match tokio::time::timeout_at(wake, freed).await {
                Ok(()) => break Ok(()),
                Err(_) if Instant::now() >= until => break Err(BackendError::QueueTimeout),
                Err(_) => {}
            }
        };
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        r
    }
}
