//! The server: the running listeners, live reload, upkeep, and the graceful shutdown.
//!
//! Reload (SIGHUP or `POST /reload`) re-reads the config file and applies it without dropping
//! established connections: caps, clocks, allow and deny lists and backends change at once
//! for the listeners that stay; new listeners are bound; removed ones stop accepting and
//! drain. Everything that can fail (parsing, validation, binding, resolving) is done before
//! anything is applied, so a bad config is refused whole and the running one stays.
//!
//! Shutdown: `/readyz` fails first (for `admin.drain_delay` on SIGTERM, so load balancers
//! stop sending), then accepting stops, connections drain for their listener's
//! `timeouts.drain`, and what is left is aborted with RST. From the shutdown signal on,
//! reloads are refused (one under way is waited for), and every accept loop, whenever it
//! was started, stops with the server: nothing can keep a draining process alive.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{BackendError, Pool};
use crate::config::{Config, ConfigError, ListenerConfig};
use crate::conn::{ListenerCtx, Policy};
use crate::fds::Budget;
use crate::guard::{Guard, GuardSnapshot};
use crate::kernel::nft::Target;
use crate::kernel::{Tally, Watched};
use crate::shutdown::Signal;
use crate::stats::{Stats, Summary};
use crate::{admin, listener, metrics, sockopt};

/// Why the server could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {listener:?}: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin endpoint: cannot bind {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("pool {pool:?}: {source}")]
    Backend {
        pool: String,
        #[source]
        source: BackendError,
    },
    #[error(transparent)]
    Config(#[from] Box<ConfigError>),
    #[error("{given} listening sockets given for {configured} configured listeners")]
    ListenerCount { given: usize, configured: usize },
    #[error("[tcp]: {0}")]
    TcpOptions(#[from] sockopt::SockoptError),
    #[error("shutting down: reloads are refused while draining")]
    Draining,
}

/// How often rate-limiter keys are swept, summaries logged and retired listeners reaped.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// A listener as it runs.
#[derive(Debug)]
pub(crate) struct Running {
    pub ctx: Arc<ListenerCtx>,
    /// The configured bind (port 0 stays 0 here), to tell a moved listener on reload.
    bind: SocketAddr,
    /// The bound address.
    pub addr: SocketAddr,
    /// Shared with the accept loop; taken on retirement so the socket really closes.
    socket: Mutex<Option<Arc<TcpListener>>>,
    stop_accept: CancellationToken,
    /// Removed from the config: no longer accepting, draining its connections.
    retired: AtomicBool,
}

/// Everything the server, the admin endpoint and handles share.
#[derive(Debug)]
pub(crate) struct State {
    /// The configuration in force. `[admin]`, `[log]` and `[runtime]` are read at start
    /// only, so here they stay as they were at start, whatever a reload brought.
    config: ArcSwap<Config>,
    /// The configuration as the file and environment last gave it: what `config` becomes
    /// at the next restart.
    loaded: ArcSwap<Config>,
    listeners: Mutex<Vec<Arc<Running>>>,
    /// The pools in force; listeners hold theirs through their policy.
    pools: Mutex<Vec<Arc<Pool>>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    draining: AtomicBool,
    /// Every connection task, across listeners and reloads.
    conns: TaskTracker,
    /// Accept loops and upkeep.
    tasks: TaskTracker,
    stop_upkeep: CancellationToken,
    /// The parent of every accept loop's stop token, cancelled at shutdown.
    accepting: CancellationToken,
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    admin_addr: Option<SocketAddr>,
    kernel: crate::kernel::Kernel,
    /// The descriptor budget in force: effective listener caps and the pipe budget.
    fds: ArcSwap<Budget>,
    /// `[cluster]`: the shared view's state; `None` for a single node. Fixed at start.
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// A bound, running server, waiting for [`Server::run`] to be told when to stop.
pub struct Server {
    state: Arc<State>,
    admin: Option<TcpListener>,
}

/// A view into a running server: counts for tests and the admin endpoint, and reload.
#[derive(Debug, Clone)]
pub struct Handle {
    state: Arc<State>,
}

impl Server {
    /// Binds every configured listener and the admin endpoint, resolves backends, and starts
    /// accepting.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        // Options the kernel refuses are named as such, not as "cannot bind".
        sockopt::probe(&config.tcp)?;
        let mut sockets = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            sockets.push(bind_listener(l, &config)?);
        }
        Server::from_listeners(config, sockets).await
    }

    /// Uses sockets the caller bound (tests bind port 0), one per configured listener, in
    /// order. The `[tcp]` options are applied to them.
    pub async fn from_listeners(
        config: Config,
        sockets: Vec<TcpListener>,
    ) -> Result<Server, ServerError> {
        if sockets.len() != config.listeners.len() {
            return Err(ServerError::ListenerCount {
                given: sockets.len(),
                configured: config.listeners.len(),
            });
        }
        let admin = match config.admin.bind {
            Some(addr) => Some(
                sockopt::listen(addr, &crate::config::TcpConfig::default())
                    .map_err(|source| ServerError::AdminBind { addr, source })?,
            ),
            None => None,
        };
        let state = Arc::new(State {
            admin_addr: admin.as_ref().and_then(|a| a.local_addr().ok()),
            config: ArcSwap::from_pointee(config.clone()),
            loaded: ArcSwap::from_pointee(config.clone()),
            listeners: Mutex::new(Vec::new()),
            pools: Mutex::new(Vec::new()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            conns: TaskTracker::new(),
            tasks: TaskTracker::new(),
            stop_upkeep: CancellationToken::new(),
            accepting: CancellationToken::new(),
            reload_lock: tokio::sync::Mutex::new(()),
            kernel: crate::kernel::Kernel::default(),
            fds: ArcSwap::from_pointee(Budget::current(&config)),
            cluster: config
                .cluster
                .clone()
                .map(|c| Arc::new(crate::cluster::Cluster::new(c))),
        });
        for socket in &sockets {
            sockopt::apply(socket2::SockRef::from(socket), &config.tcp)?;
        }
        let pools = state.build_pools(&config).await?;
        let fds = state.fds.load_full();
        let ctxs = config
            .listeners
            .iter()
            .map(|l| new_ctx(l, &config, &pools, None, &fds))
            .collect::<Result<Vec<_>, _>>()?;
        // Everything that can fail has passed: a start that fails says one thing (the
        // error), not a summary of a config that never ran.
        for line in config.to_string().lines() {
            tracing::info!("{line}");
        }
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        state.switch_pools(pools);
        announce(&fds);
        set_splice_budget(&fds);
        for ((socket, l), ctx) in sockets.into_iter().zip(&config.listeners).zip(ctxs) {
            state.start_listener(socket, ctx, l.bind);
        }
        crate::kernel::warn_if_no_syncookies();
        state.kernel.apply(state.targets(), &config.kernel).await;
        state.tasks.spawn(census(state.clone()));
        state.tasks.spawn(upkeep(state.clone()));
        if let Some(c) = &state.cluster {
            state
                .tasks
                .spawn(crate::cluster::sync::run(state.clone(), c.clone()));
        }
        Ok(Server { state, admin })
    }

    pub fn handle(&self) -> Handle {
        Handle {
            state: self.state.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = Signal>) {
        self.run_until(shutdown, std::future::pending()).await;
    }

    /// Serves until `shutdown` resolves, then drains; if `force` resolves before the drain
    /// is over (a second Ctrl-C: whoever asked does not want to wait), what is left is
    /// aborted with RST at once.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = Signal>,
        force: impl Future<Output = Signal>,
    ) -> Stopped {
        let state = self.state;
        if let Some(admin) = self.admin {
            let cfg = state.config.load().admin.clone();
            state.tasks.spawn(admin::serve(
                admin,
                state.clone(),
                cfg,
                state.stop_upkeep.clone(),
            ));
        }

        let signal = shutdown.await;
        tokio::pin!(force);
        let mut forced = false;
        state.draining.store(true, Ordering::SeqCst);
        // A reload under way finishes first (every later one is refused), so no listener
        // it adds can escape the stop below.
        drop(state.reload_lock.lock().await);
        let delay = state.config.load().admin.drain_delay;
        if signal == Signal::Terminate && !delay.is_zero() {
            tracing::info!(
                "not ready; still accepting for {} while load balancers catch up",
                humantime::format_duration(delay)
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut force => forced = true,
            }
        }
        let listeners = state.listeners();
        state.accepting.cancel();
        for r in &listeners {
            r.stop_accepting();
        }
        state.conns.close();
        if !forced {
            let longest = listeners
                .iter()
                .map(|r| r.ctx.policy.load().timeouts.drain)
                .max()
                .unwrap_or_default();
            tracing::info!(
                open = state.conns.len(),
                "no longer accepting; draining connections for up to {} (timeouts.drain), \
                 then aborting what is left; a second SIGINT or SIGTERM aborts them now",
                humantime::format_duration(longest)
            );
            for r in &listeners {
                let ctx = r.ctx.clone();
                let conns = state.conns.clone();
                let drain = ctx.policy.load().timeouts.drain;
                state.tasks.spawn(async move {
                    tokio::select! {
                        _ = conns.wait() => {}
                        _ = tokio::time::sleep(drain) => ctx.abort.cancel(),
                    }
                });
            }
            tokio::select! {
                _ = state.conns.wait() => {}
                _ = &mut force => forced = true,
            }
        }
        if forced {
            tracing::warn!(
                open = state.conns.len(),
                "second stop signal: aborting the connections left and exiting"
            );
            for r in state.listeners() {
                r.ctx.abort.cancel();
            }
            state.conns.wait().await;
        }
        let aborted: u64 = listeners
            .iter()
            .map(|r| r.ctx.stats.aborted_on_shutdown.load(Ordering::Relaxed))
            .sum();
        state.stop_upkeep.cancel();
        state.tasks.close();
        state.tasks.wait().await;
        // Also after a failed reinstall: the table left from before must not outlive us.
        state.kernel.remove().await;
        tracing::info!(aborted, "stopped");
        if forced {
            Stopped::Forced
        } else {
            Stopped::Drained
        }
    }
}

/// How [`Server::run_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every connection finished, or was aborted when its drain ran out.
    Drained,
    /// A second signal cut the drain short.
    Forced,
}

/// Binds `config`'s listeners and serves until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = Signal>,
) -> Result<(), ServerError> {
    let server = Server::bind(config).await?;
    server.run(shutdown).await;
    Ok(())
}

/// Pipes for splice: the share of the descriptor budget set aside for them.
fn set_splice_budget(fds: &Budget) {
    #[cfg(target_os = "linux")]
    crate::splice::set_budget(fds.pipes);
    #[cfg(not(target_os = "linux"))]
    let _ = fds;
}

/// Says how the descriptors are cut, and warns for every cap lowered to fit.
fn announce(fds: &Budget) {
    tracing::info!("{fds}");
    for w in fds.warnings() {
        tracing::warn!("{w}");
    }
}

fn bind_listener(l: &ListenerConfig, config: &Config) -> Result<TcpListener, ServerError> {
    sockopt::listen(l.bind, &config.tcp).map_err(|source| ServerError::Bind {
        listener: l.name.clone(),
        addr: l.bind,
        source,
    })
}

fn policy(l: &ListenerConfig, config: &Config, backends: Arc<Pool>) -> Policy {
    Policy {
        protocol: l.protocol,
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
fn pool_for(l: &ListenerConfig, pools: &[Arc<Pool>]) -> Result<Arc<Pool>, ServerError> {
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
fn new_ctx(
    l: &ListenerConfig,
    config: &Config,
    pools: &[Arc<Pool>],
    stats: Option<Arc<Stats>>,
    fds: &Budget,
) -> Result<Arc<ListenerCtx>, ServerError> {
    let stats = stats.unwrap_or_default();
    Ok(Arc::new(ListenerCtx {
        name: l.name.clone(),
        policy: ArcSwap::from_pointee(policy(l, config, pool_for(l, pools)?)),
        epoch: watch::Sender::new(0),
        guard: Guard::new(fds.limits(l), &config.pressure, stats.clone()),
        stats,
        abort: CancellationToken::new(),
    }))
}

/// What the cluster sync reads of the server.
impl crate::cluster::sync::Listeners for State {
    fn active(&self) -> Vec<(String, Guard)> {
        self.listeners()
            .iter()
            .filter(|r| !r.is_retired())
            .map(|r| (r.ctx.name.clone(), r.ctx.guard.clone()))
            .collect()
    }

    fn stopping(&self) -> impl Future<Output = ()> + Send {
        self.stop_upkeep.cancelled()
    }
}

impl Running {
    fn stop_accepting(&self) {
        self.stop_accept.cancel();
        if let Ok(mut s) = self.socket.lock() {
            s.take();
        }
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

impl State {
    /// The pools `config` asks for: the running pool where its settings are unchanged (its
    /// health state and open connections carry on), a new one, resolved, otherwise.
    async fn build_pools(&self, config: &Config) -> Result<Vec<Arc<Pool>>, ServerError> {
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
    fn switch_pools(&self, next: Vec<Arc<Pool>>) {
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

    fn start_listener(&self, socket: TcpListener, ctx: Arc<ListenerCtx>, bind: SocketAddr) {
        let socket = Arc::new(socket);
        let addr = socket.local_addr().unwrap_or(bind);
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
        let running = Arc::new(Running {
            ctx,
            bind,
            addr,
            socket: Mutex::new(Some(socket)),
            stop_accept: stop,
            retired: AtomicBool::new(false),
        });
        if let Ok(mut l) = self.listeners.lock() {
            l.push(running);
        }
    }

    /// The kernel's view of the active listeners: port, prefixes, size and exemptions.
    fn targets(&self) -> Vec<Target> {
        self.listeners()
            .iter()
            .filter(|r| !r.is_retired())
            .map(|r| {
                let lim = r.ctx.guard.limits();
                let policy = r.ctx.policy.load();
                let mut exempt = lim.allow.clone();
                if policy.accept_proxy {
                    exempt.extend(policy.trusted_proxies.iter().copied());
                }
                Target {
                    port: r.addr.port(),
                    ipv4_prefix: lim.ipv4_prefix,
                    ipv6_prefix: lim.ipv6_prefix,
                    max_sources: lim.max_sources,
                    exempt,
                }
            })
            .collect()
    }

    /// The active listeners, as a census watches them.
    fn watched(&self) -> Vec<Watched> {
        self.listeners()
            .into_iter()
            .filter(|r| !r.is_retired())
            .map(|r| Watched {
                name: r.ctx.name.clone(),
                port: r.addr.port(),
                guard: r.ctx.guard.clone(),
                stats: r.ctx.stats.clone(),
                proxied: r.ctx.policy.load().accept_proxy,
            })
            .collect()
    }

    /// What a scrape reads, gathered now.
    pub(crate) fn metrics(&self) -> metrics::Snapshot {
        metrics::Snapshot {
            listeners: self
                .listeners()
                .iter()
                .map(|r| metrics::ListenerSnapshot {
                    name: r.ctx.name.clone(),
                    retired: r.is_retired(),
                    guard: r.ctx.guard.snapshot(),
                    limits: r.ctx.guard.limits(),
                    stats: r.ctx.stats.clone(),
                })
                .collect(),
            fds: self.fds(),
            pools: self.pools(),
            kernel: self.kernel.counts(),
            cluster: self.cluster.clone(),
            reloads: self.reloads(),
        }
    }

    /// The listeners, active and retiring.
    pub(crate) fn listeners(&self) -> Vec<Arc<Running>> {
        self.listeners.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn active(&self, name: &str) -> Option<Arc<Running>> {
        self.listeners()
            .into_iter()
            .find(|r| r.ctx.name == name && !r.is_retired())
    }

    pub(crate) fn kernel(&self) -> &crate::kernel::Kernel {
        &self.kernel
    }

    /// The cluster's state, when `[cluster]` is on.
    pub(crate) fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// Resolves when the server is stopping for good.
    pub(crate) async fn stopping(&self) {
        self.stop_upkeep.cancelled().await
    }

    /// The pools in force.
    pub(crate) fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// (successful, failed) reloads so far.
    pub(crate) fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The descriptor budget in force.
    pub(crate) fn fds(&self) -> Arc<Budget> {
        self.fds.load_full()
    }

    /// Ready: not draining, and every active listener has a backend that is up.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining".into());
        }
        for r in self.listeners().iter().filter(|r| !r.is_retired()) {
            if !r.ctx.policy.load().backends.any_up() {
                return Err(format!("listener {:?}: no backend is up", r.ctx.name));
            }
        }
        Ok(())
    }

    /// Applies `new` as described in the module docs; returns what changed, in words.
    pub(crate) async fn reload(&self, new: Config) -> Result<String, ServerError> {
        let _one = self.reload_lock.lock().await;
        let r = if self.draining.load(Ordering::SeqCst) {
            Err(ServerError::Draining)
        } else {
            self.try_reload(new).await
        };
        match &r {
            Ok(changed) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(changed = changed.as_str(), "config reloaded");
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "reload refused; the running config stays");
            }
        }
        r
    }

    /// Applies `new`; returns what changed, in words, for the log.
    async fn try_reload(&self, new: Config) -> Result<String, ServerError> {
        // Plan and do everything fallible first.
        sockopt::probe(&new.tcp)?;
        let fds = Budget::current(&new);
        let pools = self.build_pools(&new).await?;
        let mut updates = Vec::new();
        let mut adds = Vec::new();
        for l in &new.listeners {
            match self.active(&l.name) {
                Some(r) if r.bind == l.bind => updates.push((r, l, pool_for(l, &pools)?)),
                replaced => {
                    let socket = bind_listener(l, &new)?;
                    sockopt::apply(socket2::SockRef::from(&socket), &new.tcp)?;
                    let stats = replaced.map(|r| r.ctx.stats.clone());
                    adds.push((l, socket, new_ctx(l, &new, &pools, stats, &fds)?));
                }
            }
        }
        // Apply.
        self.switch_pools(pools);
        for (r, l, pool) in updates {
            r.ctx.guard.reload(fds.limits(l), &new.pressure);
            r.ctx.set_policy(policy(l, &new, pool));
            if let Ok(s) = r.socket.lock()
                && let Some(s) = s.as_ref()
                && let Err(e) = sockopt::apply(socket2::SockRef::from(&**s), &new.tcp)
            {
                // The probe took these options: this is not expected, and too late to refuse.
                tracing::warn!(listener = %r.ctx.name, error = %e, "cannot apply [tcp] to the listening socket");
            }
        }
        for r in self.listeners() {
            let kept = new
                .listeners
                .iter()
                .any(|l| l.name == r.ctx.name && l.bind == r.bind);
            if !kept && !r.is_retired() {
                self.retire(&r);
            }
        }
        for (l, socket, ctx) in adds {
            self.start_listener(socket, ctx, l.bind);
        }
        set_splice_budget(&fds);
        if fds.listeners != self.fds.load().listeners {
            announce(&fds);
        }
        self.fds.store(Arc::new(fds));
        self.kernel.apply(self.targets(), &new.kernel).await;
        let old = self.config.load_full();
        for (changed, section) in [
            (new.admin.needs_restart_for(&old.admin), "[admin]"),
            (new.log != old.log, "[log]"),
            (new.runtime != old.runtime, "[runtime]"),
            (new.cluster != old.cluster, "[cluster]"),
        ] {
            if changed {
                tracing::warn!("{section} changes take effect at the next restart");
            }
        }
        let changed = changes(&self.loaded.load(), &new);
        // What runs keeps the start-time sections; what waits for a restart is `loaded`.
        let mut running = new.clone();
        running.admin = old.admin.clone();
        running.log = old.log.clone();
        running.runtime = old.runtime.clone();
        running.cluster = old.cluster.clone();
        self.config.store(Arc::new(running));
        self.loaded.store(Arc::new(new));
        Ok(changed)
    }

    /// The effective configuration for `/config`: what runs, then the settings the file
    /// now holds that wait for a restart.
    pub(crate) fn config_text(&self) -> String {
        let running = self.config.load().to_string();
        let loaded = self.loaded.load().to_string();
        let waiting: Vec<&str> = loaded
            .lines()
            .filter(|l| !running.lines().any(|r| r == *l))
            .collect();
        if waiting.is_empty() {
            return running;
        }
        let mut out = running;
        out.push_str("\nwaiting for a restart (the file now says):");
        for l in waiting {
            out.push_str("\n  ");
            out.push_str(l);
        }
        out
    }

    /// Stops accepting on a listener removed by a reload; its connections drain for its
    /// `timeouts.drain`, then are aborted.
    fn retire(&self, r: &Arc<Running>) {
        r.retired.store(true, Ordering::Relaxed);
        r.stop_accepting();
        tracing::info!(listener = %r.ctx.name, addr = %r.addr, "listener removed; draining");
        let ctx = r.ctx.clone();
        let drain = ctx.policy.load().timeouts.drain;
        let stop = self.stop_upkeep.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(drain) => ctx.abort.cancel(),
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Upkeep ticks between two lines about stalled connections (while there are some).
const STALLED_SUMMARY_EVERY: u64 = 10;

/// What a reload from `old` to `new` changes, in words: `listener "web": limits, timeouts;
/// pool "app"; [tcp]`, or `nothing`.
fn changes(old: &Config, new: &Config) -> String {
    let mut out: Vec<String> = Vec::new();
    for l in &new.listeners {
        let Some(o) = old.listeners.iter().find(|o| o.name == l.name) else {
            out.push(format!("listener {:?} added", l.name));
            continue;
        };
        if o.bind != l.bind {
            out.push(format!("listener {:?} moved to {}", l.name, l.bind));
            continue;
        }
        let parts: Vec<&str> = [
            (o.backend != l.backend, "backend"),
            (o.protocol != l.protocol, "protocol"),
            (
                o.accept_proxy != l.accept_proxy || o.trusted_proxies != l.trusted_proxies,
                "PROXY protocol",
            ),
            (o.limits != l.limits, "limits"),
            (o.timeouts != l.timeouts, "timeouts"),
        ]
        .into_iter()
        .filter_map(|(c, what)| c.then_some(what))
        .collect();
        if !parts.is_empty() {
            out.push(format!("listener {:?}: {}", l.name, parts.join(", ")));
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|l| l.name == o.name) {
            out.push(format!("listener {:?} removed", o.name));
        }
    }
    for p in &new.pools {
        match old.pool(&p.name) {
            None => out.push(format!("pool {:?} added", p.name)),
            Some(o) if o != p => out.push(format!("pool {:?}", p.name)),
            Some(_) => {}
        }
    }
    for o in &old.pools {
        if new.pool(&o.name).is_none() {
            out.push(format!("pool {:?} removed", o.name));
        }
    }
    for (changed, what) in [
        (old.pressure != new.pressure, "[pressure]"),
        (old.tcp != new.tcp, "[tcp]"),
        (old.kernel != new.kernel, "[kernel]"),
        (old.admin != new.admin, "[admin] (at the next restart)"),
        (old.log != new.log, "[log] (at the next restart)"),
        (
            old.runtime != new.runtime,
            "[runtime] (at the next restart)",
        ),
        (
            old.cluster != new.cluster,
            "[cluster] (at the next restart)",
        ),
    ] {
        if changed {
            out.push(what.to_string());
        }
    }
    if out.is_empty() {
        "nothing".to_string()
    } else {
        out.join("; ")
    }
}

/// Once a second: sweep rate-limiter keys, log what changed, drop drained retired listeners.
async fn upkeep(state: Arc<State>) {
    // One per set of counters: a listener and its replacement (same name, new bind) share
    // theirs, and must not log the same events twice. Read through the one still accepting.
    let mut summaries: Vec<(Arc<ListenerCtx>, Summary)> = Vec::new();
    let mut ticks = 0u64;
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = state.stop_upkeep.cancelled() => true,
            _ = tick.tick() => false,
        };
        let listeners = state.listeners();
        for r in &listeners {
            match summaries
                .iter_mut()
                .find(|(c, _)| Arc::ptr_eq(&c.stats, &r.ctx.stats))
            {
                Some((c, _)) if !r.is_retired() => *c = r.ctx.clone(),
                Some(_) => {}
                None => summaries.push((r.ctx.clone(), Summary::new(&r.ctx.stats))),
            }
            r.ctx.guard.housekeep();
        }
        for (ctx, summary) in &mut summaries {
            let top = || {
                let l = ctx
                    .guard
                    .top_sources(1, crate::guard::SourceOrder::Refused)
                    .into_iter()
                    .next()?;
                Some(crate::stats::TopRefused {
                    source: l.source.to_string(),
                    refused: l.refused,
                    conns: l.conns,
                    going_nowhere: l.going_nowhere(),
                    verdict: l.verdict(),
                })
            };
            summary.tick(&ctx.name, &ctx.stats, &top);
            if ticks.is_multiple_of(STALLED_SUMMARY_EVERY) {
                let snap = ctx.guard.snapshot();
                if snap.stalled > 0 {
                    tracing::info!(
                        listener = %ctx.name,
                        stalled = snap.stalled,
                        sources = snap.stalled_sources,
                        conns = snap.conns,
                        "connections stalled: OPEN below limits.min_rate (evictable when the listener is full)"
                    );
                }
            }
        }
        ticks += 1;
        if let Ok(mut l) = state.listeners.lock() {
            l.retain(|r| !(r.is_retired() && r.ctx.guard.snapshot().conns == 0));
            summaries.retain(|(c, _)| l.iter().any(|r| Arc::ptr_eq(&c.stats, &r.ctx.stats)));
        }
        if stopping {
            break;
        }
    }
}

/// Drives the kernel layer: a census every `kernel.census_interval` until the server stops;
/// feeds the drop set (and, with `[cluster]`, every replica's bans) and retries the table.
async fn census(state: Arc<State>) {
    let mut tally = Tally::default();
    loop {
        state.kernel.retry().await;
        let k = state.config().kernel.clone();
        let Some(every) = k.census_interval else {
            // Off for now; a reload may turn it on.
            if sleep_or_stop(&state, Duration::from_secs(5)).await {
                return;
            }
            continue;
        };
        let ban = state
            .kernel
            .census(&state.watched(), &state.targets(), &k, &mut tally)
            .await;
        if !ban.is_empty() {
            // Every replica refuses it too, from the next cluster sync on.
            if let Some(c) = &state.cluster {
                c.ban(&ban, k.ban_for);
            }
            state.kernel.ban(ban, k.ban_for).await;
        }
        state.kernel.read_counters().await;
        if sleep_or_stop(&state, every).await {
            return;
        }
    }
}

async fn sleep_or_stop(state: &State, d: Duration) -> bool {
    tokio::select! {
        _ = state.stopping() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

impl Handle {
    pub(crate) fn from_state(state: Arc<State>) -> Handle {
        Handle { state }
    }

    fn find(&self, name: &str) -> Option<Arc<Running>> {
        self.state.active(name)
    }

    /// Active listener names and bound addresses, in order.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.state
            .listeners()
            .iter()
            .filter(|r| !r.is_retired())
            .map(|r| (r.ctx.name.clone(), r.addr))
            .collect()
    }

    /// The bound address of listener `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.find(name).map(|r| r.addr)
    }

    /// The admin endpoint's bound address, when it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.state.admin_addr
    }

    pub fn guard(&self, name: &str) -> Option<Guard> {
        self.find(name).map(|r| r.ctx.guard.clone())
    }

    pub fn stats(&self, name: &str) -> Option<Arc<Stats>> {
        self.find(name).map(|r| r.ctx.stats.clone())
    }

    pub fn snapshot(&self, name: &str) -> Option<GuardSnapshot> {
        self.find(name).map(|r| r.ctx.guard.snapshot())
    }

    /// The servers of pool `pool`: (label, takes new connections, active connections).
    pub fn backend_servers(&self, pool: &str) -> Vec<(String, bool, u32)> {
        self.state
            .pools()
            .iter()
            .filter(|p| p.name() == pool)
            .flat_map(|p| {
                p.servers()
                    .list
                    .iter()
                    .map(|s| (s.label().to_string(), s.is_up(), s.active()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.state.config()
    }

    /// The descriptor budget in force: effective listener caps and the pipe budget.
    pub fn fds(&self) -> Arc<Budget> {
        self.state.fds()
    }

    /// The cluster's state (sync counts, failures, staleness), when `[cluster]` is on.
    pub fn cluster(&self) -> Option<Arc<crate::cluster::Cluster>> {
        self.state.cluster.clone()
    }

    /// Re-reads the config file (and `HALFGUARD__*` overrides) and applies it, returning
    /// what changed in words (`listener "web": limits; pool "app"`, or `nothing`). On error
    /// the running configuration stays.
    pub async fn reload(&self) -> Result<String, ServerError> {
        if self.state.draining.load(Ordering::SeqCst) {
            // Said without reading the file: whatever it holds, it will not be applied.
            return self.state.reload(Config::clone(&self.state.config())).await;
        }
        let path = std::path::PathBuf::from(&self.state.config.load().file);
        match crate::config::load(&path) {
            Ok(c) => self.reload_with(c).await,
            Err(e) => {
                self.state.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "reload refused; the running config stays");
                Err(Box::new(e).into())
            }
        }
    }

    /// Applies `config` as a reload would; returns what changed.
    pub async fn reload_with(&self, config: Config) -> Result<String, ServerError> {
        self.state.reload(config).await
    }

    /// `Ok` when `/readyz` would say ready.
    pub fn readiness(&self) -> Result<(), String> {
        self.state.readiness()
    }
}

/// Reloads through `handle` on every SIGHUP, for as long as the process runs.
pub async fn reload_on_sighup(handle: Handle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /reload");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading");
            // The outcome is logged and counted by the reload itself.
            let _ = handle.reload().await;
        }
    }
    #[cfg(not(unix))]
    drop(handle);
}
