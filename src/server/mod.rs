//! The server: the top of the house. It owns the running listeners, the pools, the kernel
//! layer and the cluster view, starts and stops them, and is the only module that sees all
//! of them; every other module is below it and none imports it.
//!
//! # Layout
//!
//! - here: [`Server`] (bind, run, the graceful stop), [`Handle`] (a view for tests, the
//!   admin endpoint and signals), and the shared state they hold.
//! - `running`: starting listeners and their accept loops, and the pools they forward to.
//! - `reload`: applying a new config to what runs, and SIGHUP.
//! - `upkeep`: the periodic work: sweeps and summaries, the kernel census, the cluster
//!   sync's view of the listeners.
//! - `greeting`: probing a client-first listener's server, seldom, when its connections
//!   time out silent, to say when it greets first (it wants `protocol = "server-first"`).
//! - `admin`: the admin HTTP endpoint, the server's face to probes, scrapers and operators.
//!
//! Shutdown: `/readyz` fails first (for `admin.drain_delay` on SIGTERM, so load balancers
//! stop sending), then accepting stops, connections drain for their listener's
//! `timeouts.drain`, and what is left is aborted with RST. From the shutdown signal on,
//! reloads are refused (one under way is waited for), and every accept loop, whenever it
//! was started, stops with the server: nothing can keep a draining process alive.

mod admin;
mod greeting;
mod reload;
mod running;
mod upkeep;

pub use reload::reload_on_sighup;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{BackendError, Pool};
use crate::config::{Config, ConfigError};
use crate::conn::ListenerCtx;
use crate::fds::Budget;
use crate::guard::{Guard, GuardSnapshot};
use crate::memory::budget::QueueBudget;
use crate::shutdown::Signal;
use crate::sockopt;
use crate::stats::Stats;
use running::{announce, announce_queues, bind_listener, new_ctx, set_splice_budget};

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

/// A listener as it runs.
#[derive(Debug)]
pub(crate) struct Running {
    pub ctx: Arc<ListenerCtx>,
    /// The configured bind (port 0 stays 0 here), to tell a moved listener on reload.
    bind: SocketAddr,
    /// The bound address.
    pub addr: SocketAddr,
    /// Shared with the accept loop; taken on retirement so the socket really closes.
    socket: Mutex<Option<Arc<crate::listener::Listening>>>,
    /// Copies of the worker threads' own sockets on this address (`listener::sibling`),
    /// for a reload's [tcp]; dropped with `socket`.
    siblings: Mutex<Vec<std::net::TcpListener>>,
    stop_accept: CancellationToken,
    /// Removed from the config: no longer accepting, draining its connections.
    retired: AtomicBool,
}

/// Everything the server, the admin endpoint and handles share.
#[derive(Debug)]
pub(crate) struct State {
    /// The configuration in force. `[log]`, `[runtime]`, `[cluster]` and the admin socket
    /// are read at start only, so here they stay as they were at start, whatever a reload
    /// brought.
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
    /// The byte caps in force: `max_queued` lowered to fit the memory limits found.
    queues: ArcSwap<QueueBudget>,
    /// `[cluster]`: the shared view's state; `None` for a single node. Fixed at start.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The kernel's and the cgroup's memory, read by the upkeep: an input of pressure mode.
    memory: Mutex<crate::memory::MemoryWatch>,
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
        let sockets = (sockets.into_iter().zip(&config.listeners))
            .map(|(s, l)| running::watch(l, s))
            .collect::<Result<Vec<_>, _>>()?;
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
            queues: ArcSwap::from_pointee(QueueBudget::plan(
                &config,
                &crate::memory::MemorySource::default().read(),
            )),
            cluster: config
                .cluster
                .clone()
                .map(|c| Arc::new(crate::cluster::Cluster::new(c))),
            memory: Mutex::default(),
        });
        for socket in &sockets {
            sockopt::apply(socket2::SockRef::from(socket), &config.tcp)?;
        }
        let pools = state.build_pools(&config).await?;
        let fds = state.fds.load_full();
        let queues = state.queues.load_full();
        let ctxs = config
            .listeners
            .iter()
            .map(|l| new_ctx(l, &config, &pools, None, (&fds, &queues)))
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
        announce_queues(&queues);
        set_splice_budget(&fds);
        // Memory is read once before the first connection: it applies to that one, and no
        // scrape finds the memory gauges missing.
        let short = state.read_memory();
        for ((socket, l), ctx) in sockets.into_iter().zip(&config.listeners).zip(ctxs) {
            ctx.guard.set_memory_pressure(short);
            state.start_listener(socket, ctx, l.bind, &config.tcp);
        }
        crate::kernel::warn_if_no_syncookies();
        state.kernel.apply(state.targets(), &config.kernel).await;
        state.tasks.spawn(upkeep::census(state.clone()));
        state.tasks.spawn(upkeep::upkeep(state.clone()));
        if let Some(c) = &state.cluster {
            state
                .tasks
                .spawn(crate::cluster::sync::sync_loop(state.clone(), c.clone()));
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
                        _ = tokio::time::sleep(drain) => ctx.abort_all(),
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
                r.ctx.abort_all();
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

impl State {
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

    /// Where the upkeep reads memory from (`/proc`, `/sys/fs/cgroup`) from its next tick
    /// on: tests point it at a directory of fake files.
    pub fn read_memory_from(&self, source: crate::memory::MemorySource) {
        if let Ok(mut m) = self.state.memory.lock() {
            m.set_source(source);
        }
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
