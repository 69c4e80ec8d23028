//! The server: every listener's accept loop, upkeep tasks, and the graceful shutdown.
//!
//! Shutdown: stop accepting (the listening sockets close), let connections finish for their
//! listener's `timeouts.drain`, then abort what is left with RST and return.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{BackendError, Backends};
use crate::config::Config;
use crate::conn::ListenerCtx;
use crate::guard::{Guard, GuardSnapshot};
use crate::stats::Stats;
use crate::{listener, sockopt, stats};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {listener:?}: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {listener:?}: {source}")]
    Backend {
        listener: String,
        #[source]
        source: BackendError,
    },
    #[error("{given} listening sockets given for {configured} configured listeners")]
    ListenerCount { given: usize, configured: usize },
}

/// How often rate-limiter keys are swept and summaries logged.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// A bound, not yet running server.
pub struct Server {
    listeners: Vec<(TcpListener, Arc<ListenerCtx>)>,
}

/// A view into a running server's counts, for tests and (later) the admin endpoint.
#[derive(Clone)]
pub struct Handle {
    listeners: Vec<(String, Guard, Arc<Stats>, SocketAddr)>,
}

impl Server {
    /// Binds every configured listener and resolves its backends.
    pub async fn bind(config: &Config) -> Result<Server, ServerError> {
        let mut sockets = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let s = sockopt::listen(l.bind, &config.tcp).map_err(|source| ServerError::Bind {
                listener: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            sockets.push(s);
        }
        Server::from_listeners(config, sockets).await
    }

    /// Uses sockets the caller bound (tests bind port 0), one per configured listener, in
    /// order. The `[tcp]` options are applied to them.
    pub async fn from_listeners(
        config: &Config,
        sockets: Vec<TcpListener>,
    ) -> Result<Server, ServerError> {
        if sockets.len() != config.listeners.len() {
            return Err(ServerError::ListenerCount {
                given: sockets.len(),
                configured: config.listeners.len(),
            });
        }
        let mut listeners = Vec::with_capacity(sockets.len());
        for (socket, l) in sockets.into_iter().zip(&config.listeners) {
            let _ = sockopt::apply(socket2::SockRef::from(&socket), &config.tcp);
            let backends =
                Backends::resolve(&l.backends)
                    .await
                    .map_err(|source| ServerError::Backend {
                        listener: l.name.clone(),
                        source,
                    })?;
            let stats = Arc::new(Stats::default());
            let ctx = ListenerCtx {
                name: l.name.clone(),
                protocol: l.protocol,
                timeouts: l.timeouts.clone(),
                pressure: config.pressure.clone(),
                tcp: config.tcp.clone(),
                backends,
                guard: Guard::new(l.limits.clone(), &config.pressure, stats.clone()),
                stats,
                abort: CancellationToken::new(),
            };
            listeners.push((socket, Arc::new(ctx)));
        }
        Ok(Server { listeners })
    }

    pub fn handle(&self) -> Handle {
        Handle {
            listeners: self
                .listeners
                .iter()
                .map(|(s, c)| {
                    let addr = s.local_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
                    (c.name.clone(), c.guard.clone(), c.stats.clone(), addr)
                })
                .collect(),
        }
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop_accept = CancellationToken::new();
        let stop_upkeep = CancellationToken::new();
        let conns = TaskTracker::new();
        let upkeep = TaskTracker::new();
        let mut ctxs = Vec::new();
        for (socket, ctx) in self.listeners {
            let addr = socket.local_addr().ok();
            tracing::info!(
                listener = %ctx.name,
                addr = ?addr,
                backends = ?ctx.backends.addrs(),
                "listening"
            );
            upkeep.spawn(listener::accept_loop(
                socket,
                ctx.clone(),
                stop_accept.clone(),
                conns.clone(),
            ));
            upkeep.spawn(stats::summarise(
                ctx.name.clone(),
                ctx.stats.clone(),
                UPKEEP_EVERY,
                stop_upkeep.clone(),
            ));
            let guard = ctx.guard.clone();
            let stop = stop_upkeep.clone();
            upkeep.spawn(async move {
                let mut tick = tokio::time::interval(UPKEEP_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => guard.housekeep(),
                    }
                }
            });
            ctxs.push(ctx);
        }

        shutdown.await;
        stop_accept.cancel();
        conns.close();
        let open = conns.len();
        tracing::info!(open, "no longer accepting; draining connections");
        for ctx in &ctxs {
            let ctx = ctx.clone();
            let conns = conns.clone();
            upkeep.spawn(async move {
                tokio::select! {
                    _ = conns.wait() => {}
                    _ = tokio::time::sleep(ctx.timeouts.drain) => {
                        ctx.abort.cancel();
                    }
                }
            });
        }
        conns.wait().await;
        let aborted: u64 = ctxs
            .iter()
            .map(|c| {
                c.stats
                    .aborted_on_shutdown
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum();
        stop_upkeep.cancel();
        upkeep.close();
        upkeep.wait().await;
        tracing::info!(aborted, "stopped");
    }
}

impl Handle {
    /// Listener names, bound addresses, in configured order.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|(n, _, _, a)| (n.clone(), *a))
            .collect()
    }

    /// The bound address of listener `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.find(name).map(|l| l.3)
    }

    pub fn guard(&self, name: &str) -> Option<&Guard> {
        self.find(name).map(|l| &l.1)
    }

    pub fn stats(&self, name: &str) -> Option<&Arc<Stats>> {
        self.find(name).map(|l| &l.2)
    }

    pub fn snapshot(&self, name: &str) -> Option<GuardSnapshot> {
        self.guard(name).map(Guard::snapshot)
    }

    fn find(&self, name: &str) -> Option<&(String, Guard, Arc<Stats>, SocketAddr)> {
        self.listeners.iter().find(|l| l.0 == name)
    }
}

/// Binds `config`'s listeners and serves until `shutdown`: the one call `main` makes.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let server = Server::bind(config).await?;
    server.run(shutdown).await;
    Ok(())
}
