//! Turning a pool's configured `servers` into servers, and keeping a name's servers in step
//! with what the name resolves to.
//!
//! A server given by name is every address the name resolves to (a headless Kubernetes
//! service, DNS round robin), each a server of its own with its own checks and load. The
//! set follows the name every `resolve_interval`: an address that appears becomes a new
//! server, one that goes stops taking connections (those open run on), and a name that
//! stops resolving keeps its last addresses, since a resolver outage is no reason to
//! refuse every client. A server given as an address is never looked up.
//!
//! On a reload the new pool's servers take over the state (load, health) of the old pool's
//! servers at the same address, so open connections still count against `max_conns` and a
//! server that is down stays down.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::balance::ServerSet;
use super::{BackendError, Pool, Server, health, server};
use crate::config::{PoolConfig, ServerAddr, Target};

/// A lookup that hangs must not hold up the next round (nor the pool's stop).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Every configured server at every address it resolves to now; fails when a name does not
/// resolve, since a pool that starts without its servers would refuse everyone. Servers of
/// `previous` (the pool being replaced on a reload) that stay carry their load and health on.
pub(super) async fn servers(
    cfg: &PoolConfig,
    stop: &CancellationToken,
    previous: Option<&ServerSet>,
) -> Result<Vec<Arc<Server>>, BackendError> {
    let mut servers: Vec<Arc<Server>> = Vec::with_capacity(cfg.servers.len());
    for (entry, s) in cfg.servers.iter().enumerate() {
        let addrs = resolve(&s.addr)
            .await
            .map_err(|source| BackendError::Resolve {
                backend: s.addr.to_string(),
                source,
            })?;
        for addr in addrs {
            let label = server::label(s, addr);
            // Each old server's state goes to one new server at most.
            let carried = previous.and_then(|b| {
                b.list
                    .iter()
                    .find(|o| {
                        o.label() == label && o.addr() == addr && !servers.iter().any(|n| n.same(o))
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
    Ok(servers)
}

/// Starts following the pool's names, if it has any, until the pool stops.
pub(super) fn start(pool: &Arc<Pool>, tasks: &TaskTracker) {
    if pool.cfg.servers.iter().any(|s| s.addr.is_name()) {
        tasks.spawn(resolve_loop(pool.clone(), tasks.clone()));
    }
}

async fn resolve_loop(pool: Arc<Pool>, tasks: TaskTracker) {
    let mut tick = tokio::time::interval(pool.cfg.resolve_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // resolved at start already
    let mut failing = vec![false; pool.cfg.servers.len()];
    loop {
        tokio::select! {
            _ = pool.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (entry, cfg) in pool.cfg.servers.iter().enumerate() {
            if !cfg.addr.is_name() {
                continue;
            }
            match tokio::time::timeout(LOOKUP_TIMEOUT, resolve(&cfg.addr)).await {
                Ok(Ok(addrs)) => {
                    if failing[entry] {
                        tracing::info!(server = %cfg.addr, ?addrs, "backend name resolves again");
                        failing[entry] = false;
                    }
                    for new in follow(&pool, entry, &addrs) {
                        if pool.cfg.health.enabled {
                            tasks.spawn(health::check_loop(pool.clone(), new));
                        }
                    }
                }
                _ => {
                    if !failing[entry] {
                        tracing::warn!(
                            server = %cfg.addr,
                            "backend name no longer resolves; keeping its last addresses"
                        );
                        failing[entry] = true;
                    }
                }
            }
        }
    }
}

/// Follows `entry`'s name to `addrs`: servers at addresses it still resolves to are
/// kept with their health and load, new addresses become new servers, and servers at
/// addresses it no longer has stop their checks and take no new connections (their
/// connections run on). Returns the new servers, whose checks the caller starts.
fn follow(pool: &Pool, entry: usize, addrs: &[SocketAddr]) -> Vec<Arc<Server>> {
    let Some(cfg) = pool.cfg.servers.get(entry) else {
        return Vec::new();
    };
    let cur = pool.shared.servers.load_full();
    let (mut list, gone): (Vec<_>, Vec<_>) = cur
        .list
        .iter()
        .cloned()
        .partition(|s| s.entry != entry || addrs.contains(&s.addr()));
    for old in &gone {
        tracing::info!(pool = %pool.cfg.name, server = old.label(), "backend name no longer resolves to this address; removed");
        old.stop.cancel();
    }
    let added: Vec<_> = addrs
        .iter()
        .filter(|a| !list.iter().any(|s| s.entry == entry && s.addr() == **a))
        .map(|&a| Arc::new(Server::new(cfg, entry, a, pool.stop.child_token(), None)))
        .collect();
    for new in &added {
        tracing::info!(pool = %pool.cfg.name, server = new.label(), "backend name resolves to a new address; added");
    }
    if !gone.is_empty() || !added.is_empty() {
        list.extend(added.iter().cloned());
        pool.shared.servers.store(Arc::new(ServerSet::new(list)));
    }
    added
}

/// A configured server to every address of its name, each once, in the resolver's order;
/// an address is itself.
async fn resolve(addr: &ServerAddr) -> io::Result<Vec<SocketAddr>> {
    let (host, port) = match addr.target() {
        Target::Ip(a) => return Ok(vec![*a]),
        Target::Name { host, port } => (host.as_str(), *port),
    };
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in tokio::net::lookup_host((host, port)).await? {
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
