//! Starting what runs: a listener's context (its policy, guard and counters) and its accept
//! loop, and the backend pools listeners forward to.
//!
//! Shared by the start and by reloads, so a listener a reload adds starts exactly as one
//! the start binds; what can fail here (binding, resolving) is done before anything is
//! applied.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;

use super::{Running, ServerError, State};
use crate::backend::{BackendError, Pool};
use crate::config::{Config, Limits, ListenerConfig, TcpConfig};
use crate::conn::{ListenerCtx, Policy};
use crate::fds::Budget;
use crate::guard::Guard;
use crate::listener::{self, Listening};
use crate::memory::budget::QueueBudget;
use crate::sockopt;
use crate::stats::Stats;

/// Pipes for splice: the share of the descriptor budget set aside for them.
pub(super) fn set_splice_budget(fds: &Budget) {
    #[cfg(target_os = "linux")]
    crate::splice::set_budget(fds.pipes);
    #[cfg(not(target_os = "linux"))]
    let _ = fds;
}

/// Says how the descriptors are cut, and warns for every cap lowered to fit.
pub(super) fn announce(fds: &Budget) {
    tracing::info!("{fds}");
    for w in fds.warnings() {
        tracing::warn!("{w}");
    }
}

/// Says what the byte caps share, and warns for every cap lowered to fit.
pub(super) fn announce_queues(queues: &QueueBudget) {
    tracing::info!("{queues}");
    for w in queues.warnings() {
        tracing::warn!("{w}");
    }
}

/// `l`'s limits as applied: `max_conns` as the descriptors allow, the byte caps as memory
/// does.
pub(super) fn limits(l: &ListenerConfig, (fds, queues): (&Budget, &QueueBudget)) -> Limits {
    queues.fit(l, fds.limits(l))
}

pub(super) fn bind_listener(
    l: &ListenerConfig,
    config: &Config,
) -> Result<TcpListener, ServerError> {
    // In the worker threads' `SO_REUSEPORT` group when there are other workers, each with a
    // socket of its own on this address (`listener::sibling`).
    let reuse_port = !crate::shards::extra().is_empty();
    let taken = if reuse_port {
        sockopt::refuse_if_taken(l.bind)
    } else {
        Ok(())
    };
    taken
        .and_then(|()| sockopt::listen_std(l.bind, &config.tcp, reuse_port))
        .and_then(TcpListener::from_std)
        .map_err(|source| ServerError::Bind {
            listener: l.name.clone(),
            addr: l.bind,
            source,
        })
}

/// `socket` under the accept loop's own readiness watch ([`listener::listening`]), before
/// anything is applied: this can fail (the reactor out of memory), starting can not.
pub(super) fn watch(l: &ListenerConfig, socket: TcpListener) -> Result<Listening, ServerError> {
    listener::listening(socket).map_err(|source| ServerError::Bind {
        listener: l.name.clone(),
        addr: l.bind,
        source,
    })
}

pub(super) fn policy(l: &ListenerConfig, config: &Config, backends: Arc<Pool>) -> Policy {
    use crate::config::FirstMessage;
    use crate::first_message::Expect;
    Policy {
        protocol: l.protocol,
        first_message: match l.first_message {
            FirstMessage::Auto => Expect::Auto,
            FirstMessage::Http => Expect::Http,
            FirstMessage::Tls => Expect::Tls,
            FirstMessage::Postgres => Expect::Postgres,
            FirstMessage::Any => Expect::Any,
        },
        max_first_message: l.limits.max_first_message as usize,
        accept_proxy: l.accept_proxy,
        trusted_proxies: l.trusted_proxies.clone(),
        timeouts: l.timeouts.clone(),
        min_rate: l.limits.min_rate,
        grace: l.limits.grace,
        observe: l.limits.mode == crate::config::Mode::Observe,
        pressure: config.pressure.clone(),
        tcp: config.tcp.clone(),
        backends,
    }
}

/// The pool a listener forwards to. Validation guarantees it exists; a config built by
/// hand that names none is refused rather than trusted.
pub(super) fn pool_for(l: &ListenerConfig, pools: &[Arc<Pool>]) -> Result<Arc<Pool>, ServerError> {
    pools
        .iter()
        .find(|p| p.name() == l.backend)
        .cloned()
        .ok_or_else(|| ServerError::Backend {
            pool: l.backend.clone(),
            source: BackendError::AllDown,
        })
}

/// A listener's context. `stats` carries the counters of the listener it replaces (same
/// name, new bind), so its metric series go on rather than appear twice or start over.
pub(super) fn new_ctx(
    l: &ListenerConfig,
    config: &Config,
    pools: &[Arc<Pool>],
    stats: Option<Arc<Stats>>,
    budgets: (&Budget, &QueueBudget),
) -> Result<Arc<ListenerCtx>, ServerError> {
    let stats = stats.unwrap_or_default();
    let guard = Guard::new(limits(l, budgets), &config.pressure, stats.clone());
    guard.set_shared_caps(config.cluster.is_some());
    Ok(Arc::new(ListenerCtx::new(
        l.name.clone(),
        policy(l, config, pool_for(l, pools)?),
        guard,
        stats,
    )))
}

impl Running {
    pub(super) fn stop_accepting(&self) {
        self.stop_accept.cancel();
        if let Ok(mut s) = self.socket.lock() {
            s.take();
        }
        if let Ok(mut s) = self.siblings.lock() {
            s.clear();
        }
        crate::steal::unregister(&self.ctx);
    }

    /// Applies `[tcp]` to every socket of this listener (accepted sockets inherit it).
    pub(super) fn apply_tcp(&self, tcp: &TcpConfig) -> Result<(), sockopt::SockoptError> {
        if let Ok(s) = self.socket.lock()
            && let Some(s) = s.as_ref()
        {
            sockopt::apply(socket2::SockRef::from(&**s), tcp)?;
        }
        if let Ok(siblings) = self.siblings.lock() {
            for s in siblings.iter() {
                sockopt::apply(socket2::SockRef::from(s), tcp)?;
            }
        }
        Ok(())
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

impl State {
    /// The pools `config` asks for: the running pool where its settings are unchanged (its
    /// health state and open connections carry on), a new one, resolved, otherwise.
    pub(super) async fn build_pools(&self, config: &Config) -> Result<Vec<Arc<Pool>>, ServerError> {
        let current = self.pools.lock().map(|p| p.clone()).unwrap_or_default();
        let mut out = Vec::with_capacity(config.pools.len());
        for cfg in &config.pools {
            if let Some(p) = current.iter().find(|p| p.config() == cfg) {
                out.push(p.clone());
                continue;
            }
            // A changed pool: its servers that stay carry their load and health on.
            let previous = current.iter().find(|p| p.name() == cfg.name);
            let pool = Pool::new(
                cfg.clone(),
                self.stop_upkeep.child_token(),
                previous.map(|p| &**p),
            )
            .await
            .map_err(|source| ServerError::Backend {
                pool: cfg.name.clone(),
                source,
            })?;
            out.push(Arc::new(pool));
        }
        Ok(out)
    }

    /// Starts the new pools' background tasks and stops those of pools no longer used.
    pub(super) fn switch_pools(&self, next: Vec<Arc<Pool>>) {
        let Ok(mut cur) = self.pools.lock() else {
            return;
        };
        for p in &next {
            if !cur.iter().any(|c| Arc::ptr_eq(c, p)) {
                p.start(&self.tasks);
            }
        }
        for c in cur.iter() {
            if !next.iter().any(|p| Arc::ptr_eq(c, p)) {
                c.stop();
            }
        }
        *cur = next;
    }

    pub(super) fn start_listener(
        &self,
        socket: Listening,
        ctx: Arc<ListenerCtx>,
        bind: SocketAddr,
        tcp: &TcpConfig,
    ) {
        let socket = Arc::new(socket);
        let addr = socket.get_ref().local_addr().unwrap_or(bind);
        // A child of the server's: cancelled at shutdown even if started after it began.
        let stop = self.accepting.child_token();
        tracing::info!(
            listener = %ctx.name,
            %addr,
            backends = ?ctx.policy.load().backends.addrs(),
            "listening"
        );
        self.tasks.spawn(listener::accept_loop(
            socket.clone(),
            ctx.clone(),
            stop.clone(),
            self.conns.clone(),
        ));
        // Each other worker thread accepts on a socket of its own (or a copy of this one's
        // descriptor), registered with its own epoll set; its connections stay on it
        // (`crate::shards`). A copy of each socket of its own stays here, for a reload's
        // [tcp] and for retirement.
        let mut siblings = Vec::new();
        for rt in crate::shards::extra() {
            let copy = match listener::sibling(socket.get_ref(), tcp) {
                Ok((own, is_own)) => {
                    if is_own && let Ok(dup) = own.try_clone() {
                        siblings.push(dup);
                    }
                    own
                }
                Err(e) => {
                    tracing::warn!(listener = %ctx.name, error = %e, "a worker thread cannot accept on this listener");
                    continue;
                }
            };
            let (ctx, stop, conns) = (ctx.clone(), stop.clone(), self.conns.clone());
            rt.spawn(self.tasks.track_future(async move {
                match listener::listening_std(copy) {
                    Ok(l) => listener::accept_loop(Arc::new(l), ctx, stop, conns).await,
                    Err(e) => {
                        tracing::warn!(listener = %ctx.name, error = %e, "a worker thread cannot accept on this listener")
                    }
                }
            }));
        }
        // Idle workers take what waits on a busy one's socket (`crate::steal`).
        if !siblings.is_empty() {
            let copies = std::iter::once(socket.get_ref().try_clone())
                .chain(siblings.iter().map(|s| s.try_clone()))
                .filter_map(Result::ok)
                .collect();
            crate::steal::register(&ctx, &self.conns, copies);
        }
        let running = Arc::new(Running {
            ctx,
            bind,
            addr,
            socket: Mutex::new(Some(socket)),
            siblings: Mutex::new(siblings),
            stop_accept: stop,
            retired: AtomicBool::new(false),
        });
        if let Ok(mut l) = self.listeners.lock() {
            l.push(running);
        }
    }
}
