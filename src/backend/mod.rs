//! Backend pools: balancing, bounded waiting, retries within the connect budget, passive and
//! active health, re-resolution, and PROXY protocol toward the servers.
//!
//! A backend that dies, hangs or slows down must not turn into held client sockets:
//! - a server marked down (active checks, or `fall` consecutive failed connects) gets no new
//!   connections; with every server down a newcomer is refused at once;
//! - a client never judges a server: passive health counts only what a client cannot cause
//!   (a refused or timed-out connect, a reset before any byte either way), failures on our
//!   side (descriptors, ephemeral ports) are counted as ours, and the last server up is
//!   taken out only when a check confirms what the connections saw;
//! - a server at its `max_conns` takes no more; when all are, a client waits in a bounded
//!   queue for at most `queue_timeout`;
//! - a failed connect moves on to another server, each tried at most once, and the whole
//!   thing (queue included) never takes longer than `timeouts.connect`.
//!
//! A server given by name is every address the name resolves to (a headless Kubernetes
//! service, DNS round robin), each a server of its own with its own checks; the set follows
//! the name at every `resolve_interval`.

mod health;
mod server;

use std::io;
use std::net::SocketAddr;
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

pub use server::{Lease, Server};

use crate::config::{Balance, HealthConfig, PoolConfig, ProxyVersion, TcpConfig};
use crate::metrics::{CONNECT_BUCKETS, Histo};
use crate::{proxy_protocol, sockopt};

/// At most this many servers are tried for one connection.
const MAX_ATTEMPTS: usize = 3;
/// Connect failures on our side are logged at most this often (they come in floods).
const LOCAL_WARN_EVERY_MS: u64 = 10_000;

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

/// The servers a pool balances over at one moment; replaced whole when a name's addresses
/// change, so a connection picks from one consistent set.
#[derive(Debug)]
pub struct ServerSet {
    pub list: Vec<Arc<Server>>,
    /// Weighted round-robin order: each server index appears `weight` times, interleaved.
    schedule: Vec<usize>,
}

impl ServerSet {
    fn new(list: Vec<Arc<Server>>) -> ServerSet {
        let schedule = interleave(&list.iter().map(|s| s.weight).collect::<Vec<_>>());
        ServerSet { list, schedule }
    }
}

/// A pool of servers.
#[derive(Debug)]
pub struct Pool {
    cfg: PoolConfig,
    shared: Arc<Shared>,
    next: AtomicUsize,
    rng: AtomicU64,
    waiting: AtomicUsize,
    /// Stops this pool's health and resolve tasks (on reload or shutdown).
    stop: CancellationToken,
}

/// What a pool shares with the leases its connections hold, and carries on to the pool that
/// replaces it on a reload (the slot-freed signal, counters, and its servers' state).
#[derive(Debug)]
pub(crate) struct Shared {
    name: String,
    servers: ArcSwap<ServerSet>,
    health: HealthConfig,
    /// Woken when a lease ends, for a client queued for a slot.
    freed: Arc<Notify>,
    connect_time: Arc<Histo>,
    /// Connects that failed on our side, not the server's.
    local_errors: Arc<AtomicU64>,
    /// When the last local-error warning was logged, in ms since `epoch`.
    local_warned_ms: AtomicU64,
    epoch: std::time::Instant,
    /// Held while deciding a cool-off, so two servers failing at once cannot both go,
    /// each seeing the other still up.
    deciding: Mutex<()>,
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
        let mut servers: Vec<Arc<Server>> = Vec::with_capacity(cfg.servers.len());
        let before = previous.map(|p| p.servers());
        for (entry, s) in cfg.servers.iter().enumerate() {
            let addrs = resolve(&s.addr)
                .await
                .map_err(|source| BackendError::Resolve {
                    backend: s.addr.clone(),
                    source,
                })?;
            for addr in addrs {
                let label = server::label(s, addr);
                // Each old server's state goes to one new server at most.
                let carried = before.as_ref().and_then(|b| {
                    b.list
                        .iter()
                        .find(|o| {
                            o.label() == label
                                && o.addr() == addr
                                && !servers.iter().any(|n| n.same(o))
                        })
                        .map(|o| o.state.clone())
                });
                servers.push(Arc::new(Server::new(
                    s,
                    entry,
                    addr,
                    stop.child_token(),
                    carried,
                )));
            }
        }
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
            local_warned_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            deciding: Mutex::new(()),
        };
        Ok(Pool {
            cfg,
            shared: Arc::new(shared),
            next: AtomicUsize::new(0),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            waiting: AtomicUsize::new(0),
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

    /// Follows `entry`'s name to `addrs`: servers at addresses it still resolves to are
    /// kept with their health and load, new addresses become new servers, and servers at
    /// addresses it no longer has stop their checks and take no new connections (their
    /// connections run on). Returns the new servers, whose checks the caller starts.
    fn follow(&self, entry: usize, addrs: &[SocketAddr]) -> Vec<Arc<Server>> {
        let Some(cfg) = self.cfg.servers.get(entry) else {
            return Vec::new();
        };
        let cur = self.shared.servers.load_full();
        let (mut list, gone): (Vec<_>, Vec<_>) = cur
            .list
            .iter()
            .cloned()
            .partition(|s| s.entry != entry || addrs.contains(&s.addr()));
        for old in &gone {
            tracing::info!(pool = %self.cfg.name, server = old.label(), "backend name no longer resolves to this address; removed");
            old.stop.cancel();
        }
        let added: Vec<_> = addrs
            .iter()
            .filter(|a| !list.iter().any(|s| s.entry == entry && s.addr() == **a))
            .map(|&a| Arc::new(Server::new(cfg, entry, a, self.stop.child_token(), None)))
            .collect();
        for new in &added {
            tracing::info!(pool = %self.cfg.name, server = new.label(), "backend name resolves to a new address; added");
        }
        if !gone.is_empty() || !added.is_empty() {
            list.extend(added.iter().cloned());
            self.shared.servers.store(Arc::new(ServerSet::new(list)));
        }
        added
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
        loop {
            if tried.len() >= MAX_ATTEMPTS.min(servers.len()) {
                return Err(last);
            }
            let i = match self.pick(&set, tried.as_slice()) {
                Pick::Server(i) => i,
                Pick::AllDown => return Err(last),
                Pick::AllFull => {
                    self.wait_for_room(deadline).await?;
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
                // Its own child: each connection waits on its own list, not the server's.
                down: server.down_token().child_token(),
                reset_early: Default::default(),
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

    /// Waits in the bounded queue until a slot frees, or refuses.
    async fn wait_for_room(&self, deadline: Instant) -> Result<(), BackendError> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.cfg.queue_size as usize {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(BackendError::QueueFull);
        }
        let until = deadline.min(Instant::now() + self.cfg.queue_timeout);
        let r = tokio::time::timeout_at(until, self.shared.freed.notified()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        r.map_err(|_| BackendError::QueueTimeout)
    }

    /// Chooses a server without allocating: it runs for every new connection.
    fn pick(&self, set: &ServerSet, tried: &[usize]) -> Pick {
        let servers = &set.list;
        let up = |i: &usize| !tried.contains(i) && servers[*i].is_up();
        let room = |i: &usize| up(i) && servers[*i].has_room();
        let n = servers.len();
        if !(0..n).any(|i| up(&i)) {
            return Pick::AllDown;
        }
        let rooms = (0..n).filter(room).count();
        if rooms == 0 {
            return Pick::AllFull;
        }
        // Load per unit of weight, compared without division.
        let lighter = |a: usize, b: usize| {
            let (sa, sb) = (&servers[a], &servers[b]);
            u64::from(sa.active()) * u64::from(sb.weight)
                < u64::from(sb.active()) * u64::from(sa.weight)
        };
        let nth_room = |k: usize| (0..n).filter(room).nth(k % rooms).unwrap_or(0);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        Pick::Server(match self.cfg.balance {
            Balance::RoundRobin => {
                let len = set.schedule.len();
                (0..len)
                    .map(|k| set.schedule[(start + k) % len])
                    .find(room)
                    .unwrap_or_else(|| nth_room(0))
            }
            Balance::LeastConn => {
                // Rotate the starting point so ties spread instead of piling on the first.
                let mut best = nth_room(start);
                for k in 1..rooms {
                    let c = nth_room(start + k);
                    if lighter(c, best) {
                        best = c;
                    }
                }
                best
            }
            Balance::RandomTwo => {
                let r = self.random();
                let a = nth_room(r as usize);
                let b = nth_room((r >> 32) as usize);
                if lighter(b, a) { b } else { a }
            }
        })
    }

    fn random(&self) -> u64 {
        // splitmix64 over a shared counter: cheap, and good enough to spread choices.
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Shared {
    /// One failure that was `server`'s doing (a failed connect, or with `early` a reset
    /// before any byte moved). `fall` of a kind in a row take it out for `cooloff` while
    /// another server is up; the last server up is taken out only when a check fails too,
    /// since passive evidence alone can be a client's doing (a flood that fills the
    /// server's accept queue) and taking out the last server refuses everyone.
    /// Returns the check that decides, when one was started.
    fn passive_failure(
        self: &Arc<Self>,
        server: &Arc<Server>,
        early: bool,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let h = &self.health;
        if !server.count_failure(h.fall, early) {
            return None;
        }
        {
            let Ok(_deciding) = self.deciding.lock() else {
                return None;
            };
            let others_up = self
                .servers
                .load()
                .list
                .iter()
                .any(|s| !s.same(server) && s.is_up());
            if others_up {
                server.cool_off(h.cooloff);
                tracing::warn!(
                    pool = %self.name,
                    server = server.label(),
                    cooloff = ?h.cooloff,
                    "backend server failed {} times in a row; cooling off",
                    h.fall
                );
                watch(server, h, early);
                return None;
            }
        }
        // A task of its own: whoever waits for it may give up, the check still concludes.
        server
            .start_confirming()
            .then(|| tokio::spawn(self.clone().confirm(server.clone(), early)))
    }

    /// Checks the last server up after `fall` failures: cooled off if the check fails,
    /// kept (and said once) if it passes.
    async fn confirm(self: Arc<Self>, server: Arc<Server>, early: bool) {
        let ok = health::check(&server, &self.health).await;
        server.done_confirming();
        if !ok {
            server.cool_off(self.health.cooloff);
            watch(&server, &self.health, early);
            tracing::warn!(
                pool = %self.name,
                server = server.label(),
                cooloff = ?self.health.cooloff,
                "backend server failed {} times in a row and its check; cooling off (it was the last server up)",
                self.health.fall
            );
        } else if server.hold() {
            tracing::warn!(
                pool = %self.name,
                server = server.label(),
                "backend server failed {} times in a row but passes its check; it stays in rotation (the last server up)",
                self.health.fall
            );
        }
    }

    /// A connect that failed on our side: counted, and logged at a bounded rate.
    fn local_error(&self, e: &io::Error) {
        let n = self.local_errors.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.epoch.elapsed().as_millis() as u64 + LOCAL_WARN_EVERY_MS;
        let last = self.local_warned_ms.load(Ordering::Relaxed);
        if now >= last + LOCAL_WARN_EVERY_MS
            && self
                .local_warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                pool = %self.name,
                error = %e,
                local_errors = n,
                "backend connects fail on this host, not at the servers (descriptors or ephemeral ports exhausted?); the servers are not held responsible"
            );
        }
    }
}

/// Whether a failed connect is the server's doing, or the network's on the way to it: it
/// refused, did not answer, or is unreachable. Anything else (EMFILE, ENFILE, ENOBUFS,
/// EADDRNOTAVAIL for want of ephemeral ports, EINVAL from a socket option) happened here.
fn servers_fault(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::ETIMEDOUT
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ECONNRESET
                | libc::ECONNABORTED
        )
    )
}

/// The servers tried for one connection (at most [`MAX_ATTEMPTS`]), without a heap.
#[derive(Default)]
struct Tried {
    ids: [usize; MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    fn push(&mut self, i: usize) {
        if self.len < MAX_ATTEMPTS {
            self.ids[self.len] = i;
            self.len += 1;
        }
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_slice(&self) -> &[usize] {
        &self.ids[..self.len]
    }
}

enum Pick {
    Server(usize),
    AllDown,
    AllFull,
}

/// `host:port` to every address of the name, each once, in the resolver's order.
async fn resolve(hostport: &str) -> io::Result<Vec<SocketAddr>> {
    if let Ok(a) = hostport.parse() {
        return Ok(vec![a]);
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in tokio::net::lookup_host(hostport).await? {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the name has no address",
        ));
    }
    Ok(addrs)
}

/// Weighted round-robin order with the servers interleaved (not `aaab` but `abaa`-like):
/// position k of weight w goes to slot k/w on a common scale.
fn interleave(weights: &[u32]) -> Vec<usize> {
    let mut slots: Vec<(u64, usize)> = Vec::new();
    for (i, &w) in weights.iter().enumerate() {
        for k in 0..w {
            // Spread server i's w turns evenly over [0, 1), scaled to integers.
            slots.push(((u64::from(k) * 2 + 1) * 1_000_000 / (u64::from(w) * 2), i));
        }
    }
    slots.sort();
    slots.into_iter().map(|(_, i)| i).collect()
}

/// Follows a cool-off to its end (and logs it). After failed connects the check runs each
/// interval meanwhile and a good one ends it early; after early resets it runs its course,
/// since a connect that succeeds proves nothing against a server that resets.
fn watch(server: &Arc<Server>, h: &HealthConfig, early: bool) {
    health::watch_cooloff(server.clone(), (!early).then(|| h.clone()));
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_what_the_server_does_is_its_fault() {
        use std::io::Error;
        for e in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH] {
            assert!(super::servers_fault(&Error::from_raw_os_error(e)));
        }
        for e in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EADDRNOTAVAIL,
            libc::ENOBUFS,
            libc::EINVAL,
        ] {
            assert!(!super::servers_fault(&Error::from_raw_os_error(e)));
        }
        assert!(!super::servers_fault(&Error::other("no errno")));
    }

    #[test]
    fn weighted_round_robin_interleaves_by_weight() {
        let s = super::interleave(&[3, 1]);
        assert_eq!(s.len(), 4);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 3);
        assert_ne!(s, vec![0, 0, 0, 1], "interleaved, not clumped");
        assert_eq!(super::interleave(&[1, 1, 1]), vec![0, 1, 2]);
    }
}
