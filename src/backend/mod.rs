//! Backend pools: balancing, bounded waiting, retries within the connect budget, passive and
//! active health, re-resolution, and PROXY protocol toward the servers.
//!
//! A backend that dies, hangs or slows down must not turn into held client sockets:
//! - a server marked down (active checks, or `fall` consecutive failed connects) gets no new
//!   connections; with every server down a newcomer is refused at once;
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use server::{Lease, Server};

use crate::config::{Balance, PoolConfig, ProxyVersion, TcpConfig};
use crate::metrics::{CONNECT_BUCKETS, Histo};
use crate::{proxy_protocol, sockopt};

/// At most this many servers are tried for one connection.
const MAX_ATTEMPTS: usize = 3;

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
    servers: ArcSwap<ServerSet>,
    next: AtomicUsize,
    rng: AtomicU64,
    waiting: AtomicUsize,
    freed: Arc<Notify>,
    connect_time: Histo,
    /// Stops this pool's health and resolve tasks (on reload or shutdown).
    stop: CancellationToken,
}

impl Pool {
    /// Resolves every server; fails when a name does not resolve at start.
    pub async fn new(cfg: PoolConfig, stop: CancellationToken) -> Result<Pool, BackendError> {
        let mut servers = Vec::with_capacity(cfg.servers.len());
        for (entry, s) in cfg.servers.iter().enumerate() {
            let addrs = resolve(&s.addr)
                .await
                .map_err(|source| BackendError::Resolve {
                    backend: s.addr.clone(),
                    source,
                })?;
            for addr in addrs {
                servers.push(Arc::new(Server::new(s, entry, addr, stop.child_token())));
            }
        }
        Ok(Pool {
            cfg,
            servers: ArcSwap::from_pointee(ServerSet::new(servers)),
            next: AtomicUsize::new(0),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            waiting: AtomicUsize::new(0),
            freed: Arc::new(Notify::new()),
            connect_time: Histo::new(CONNECT_BUCKETS),
            stop,
        })
    }

    /// Starts health checks and re-resolution on `tasks`, until the pool's stop token.
    pub fn start(self: &Arc<Self>, tasks: &TaskTracker) {
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
        self.servers.load_full()
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.load().list.iter().map(|s| s.addr()).collect()
    }

    /// True when at least one server takes new connections.
    pub fn any_up(&self) -> bool {
        self.servers.load().list.iter().any(|s| s.is_up())
    }

    /// Follows `entry`'s name to `addrs`: servers at addresses it still resolves to are
    /// kept with their health and load, new addresses become new servers, and servers at
    /// addresses it no longer has stop their checks and take no new connections (their
    /// connections run on). Returns the new servers, whose checks the caller starts.
    fn follow(&self, entry: usize, addrs: &[SocketAddr]) -> Vec<Arc<Server>> {
        let Some(cfg) = self.cfg.servers.get(entry) else {
            return Vec::new();
        };
        let cur = self.servers.load_full();
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
            .map(|&a| Arc::new(Server::new(cfg, entry, a, self.stop.child_token())))
            .collect();
        for new in &added {
            tracing::info!(pool = %self.cfg.name, server = new.label(), "backend name resolves to a new address; added");
        }
        if !gone.is_empty() || !added.is_empty() {
            list.extend(added.iter().cloned());
            self.servers.store(Arc::new(ServerSet::new(list)));
        }
        added
    }

    pub fn connect_time(&self) -> &Histo {
        &self.connect_time
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
        let set = self.servers.load_full();
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
                freed: self.freed.clone(),
                // Its own child: each connection waits on its own list, not the server's.
                down: server.down_token().child_token(),
                fall: self.cfg.health.fall,
                cooloff: self.cfg.health.cooloff,
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
                    self.connect_time.observe(t0.elapsed());
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
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "backend connect failed");
                    last = BackendError::Unavailable;
                }
                Err(_) => {
                    tracing::debug!(%addr, "backend connect timed out");
                    last = BackendError::TimedOut;
                }
            }
            if server.passive_failure(self.cfg.health.fall, self.cfg.health.cooloff) {
                tracing::warn!(
                    pool = %self.cfg.name,
                    server = server.label(),
                    cooloff = ?self.cfg.health.cooloff,
                    "backend server failed {} connects in a row; cooling off",
                    self.cfg.health.fall
                );
                health::watch_cooloff(server.clone(), Some(self.cfg.health.clone()));
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
        let r = tokio::time::timeout_at(until, self.freed.notified()).await;
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

#[cfg(test)]
mod tests {
    #[test]
    fn weighted_round_robin_interleaves_by_weight() {
        let s = super::interleave(&[3, 1]);
        assert_eq!(s.len(), 4);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 3);
        assert_ne!(s, vec![0, 0, 0, 1], "interleaved, not clumped");
        assert_eq!(super::interleave(&[1, 1, 1]), vec![0, 1, 2]);
    }
}
