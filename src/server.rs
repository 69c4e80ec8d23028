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
//! `timeouts.drain`, and what is left is aborted with RST.

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
use crate::shutdown::Signal;
use crate::stats::{Stats, Summary};
use crate::{admin, listener, sockopt};

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
    config: ArcSwap<Config>,
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
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    admin_addr: Option<SocketAddr>,
    kernel: crate::kernel::Kernel,
    /// The descriptor budget in force: effective listener caps and the pipe budget.
    fds: ArcSwap<Budget>,
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
            listeners: Mutex::new(Vec::new()),
            pools: Mutex::new(Vec::new()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            conns: TaskTracker::new(),
            tasks: TaskTracker::new(),
            stop_upkeep: CancellationToken::new(),
            reload_lock: tokio::sync::Mutex::new(()),
            kernel: crate::kernel::Kernel::default(),
            fds: ArcSwap::from_pointee(Budget::current(&config)),
        });
        let pools = state.build_pools(&config).await?;
        state.switch_pools(pools.clone());
        let fds = state.fds.load_full();
        announce(&fds);
        set_splice_budget(&fds);
        for (socket, l) in sockets.into_iter().zip(&config.listeners) {
            let _ = sockopt::apply(socket2::SockRef::from(&socket), &config.tcp);
            state.start_listener(socket, new_ctx(l, &config, &pools, &fds)?, l.bind);
        }
        crate::kernel::warn_if_no_syncookies();
        state.kernel.apply(&state.ports(), &config.kernel);
        state.tasks.spawn(crate::kernel::run(state.clone()));
        state.tasks.spawn(upkeep(state.clone()));
        Ok(Server { state, admin })
    }

    pub fn handle(&self) -> Handle {
        Handle {
            state: self.state.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = Signal>) {
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
        state.draining.store(true, Ordering::SeqCst);
        let delay = state.config.load().admin.drain_delay;
        if signal == Signal::Terminate && !delay.is_zero() {
            tracing::info!(
                ?delay,
                "not ready; still accepting while load balancers catch up"
            );
            tokio::time::sleep(delay).await;
        }
        let listeners = state.listeners();
        for r in &listeners {
            r.stop_accepting();
        }
        state.conns.close();
        tracing::info!(
            open = state.conns.len(),
            "no longer accepting; draining connections"
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
        state.conns.wait().await;
        let aborted: u64 = listeners
            .iter()
            .map(|r| r.ctx.stats.aborted_on_shutdown.load(Ordering::Relaxed))
            .sum();
        state.stop_upkeep.cancel();
        state.tasks.close();
        state.tasks.wait().await;
        if state.kernel.enforcing.load(Ordering::Relaxed) {
            state.kernel.remove();
        }
        tracing::info!(aborted, "stopped");
    }
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

fn new_ctx(
    l: &ListenerConfig,
    config: &Config,
    pools: &[Arc<Pool>],
    fds: &Budget,
) -> Result<Arc<ListenerCtx>, ServerError> {
    let stats = Arc::new(Stats::default());
    Ok(Arc::new(ListenerCtx {
        name: l.name.clone(),
        policy: ArcSwap::from_pointee(policy(l, config, pool_for(l, pools)?)),
        epoch: watch::Sender::new(0),
        guard: Guard::new(fds.limits(l), &config.pressure, stats.clone()),
        stats,
        abort: CancellationToken::new(),
    }))
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
            let pool = Pool::new(cfg.clone(), self.stop_upkeep.child_token())
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
        let stop = CancellationToken::new();
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

    /// Resolves when the server is stopping for good.
    pub(crate) async fn stopping(&self) {
        self.stop_upkeep.cancelled().await
    }

    /// The bound ports of the active listeners.
    fn ports(&self) -> Vec<u16> {
        self.listeners()
            .iter()
            .filter(|r| !r.is_retired())
            .map(|r| r.addr.port())
            .collect()
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

    /// Applies `new` as described in the module docs.
    pub(crate) async fn reload(&self, new: Config) -> Result<(), ServerError> {
        let _one = self.reload_lock.lock().await;
        let r = self.try_reload(new).await;
        match &r {
            Ok(()) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!("config reloaded");
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "reload refused; the running config stays");
            }
        }
        r
    }

    async fn try_reload(&self, new: Config) -> Result<(), ServerError> {
        // Plan and do everything fallible first.
        let fds = Budget::current(&new);
        let pools = self.build_pools(&new).await?;
        let mut updates = Vec::new();
        let mut adds = Vec::new();
        for l in &new.listeners {
            match self.active(&l.name) {
                Some(r) if r.bind == l.bind => updates.push((r, l, pool_for(l, &pools)?)),
                _ => adds.push((l, bind_listener(l, &new)?, new_ctx(l, &new, &pools, &fds)?)),
            }
        }
        // Apply.
        self.switch_pools(pools);
        for (r, l, pool) in updates {
            r.ctx.guard.reload(fds.limits(l), &new.pressure);
            r.ctx.set_policy(policy(l, &new, pool));
            if let Ok(s) = r.socket.lock()
                && let Some(s) = s.as_ref()
            {
                let _ = sockopt::apply(socket2::SockRef::from(&**s), &new.tcp);
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
            let _ = sockopt::apply(socket2::SockRef::from(&socket), &new.tcp);
            self.start_listener(socket, ctx, l.bind);
        }
        set_splice_budget(&fds);
        if fds.listeners != self.fds.load().listeners {
            announce(&fds);
        }
        self.fds.store(Arc::new(fds));
        self.kernel.apply(&self.ports(), &new.kernel);
        let old = self.config.load();
        for (changed, section) in [
            (new.admin != old.admin, "[admin]"),
            (new.log != old.log, "[log]"),
            (new.runtime != old.runtime, "[runtime]"),
        ] {
            if changed {
                tracing::warn!("{section} changes take effect at the next restart");
            }
        }
        self.config.store(Arc::new(new));
        Ok(())
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

/// Once a second: sweep rate-limiter keys, log what changed, drop drained retired listeners.
async fn upkeep(state: Arc<State>) {
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
            if !summaries.iter().any(|(c, _)| Arc::ptr_eq(c, &r.ctx)) {
                summaries.push((r.ctx.clone(), Summary::new(&r.ctx.stats)));
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
            summaries.retain(|(c, _)| l.iter().any(|r| Arc::ptr_eq(c, &r.ctx)));
        }
        if stopping {
            break;
        }
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

    /// Re-reads the config file (and `HALFGUARD__*` overrides) and applies it. On error the
    /// running configuration stays.
    pub async fn reload(&self) -> Result<(), ServerError> {
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

    /// Applies `config` as a reload would.
    pub async fn reload_with(&self, config: Config) -> Result<(), ServerError> {
        self.state.reload(config).await
    }

    /// `Ok` when `/readyz` would say ready.
    pub fn readiness(&self) -> Result<(), String> {
        self.state.readiness()
    }
}
