//! Live reload (SIGHUP or `POST /reload`): re-reads the config file and applies it without
//! dropping established connections.
//!
//! Caps, clocks, allow and deny lists and backends change at once for the listeners that
//! stay; new listeners are bound; removed ones stop accepting and drain. Everything that can
//! fail (parsing, validation, binding, resolving) is done before anything is applied, so a
//! bad config is refused whole and the running one stays. The admin token,
//! `trust_loopback` and `drain_delay` apply at once (a rotated token must not wait for a
//! restart); the admin socket and its slots, `[log]`, `[runtime]` and `[cluster]` wait for a
//! restart, and the reload's answer, its log and `/config` say so.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::running::{
    self, announce, announce_queues, bind_listener, new_ctx, policy, pool_for, set_splice_budget,
};
use super::{Handle, Running, ServerError, State};
use crate::config::Config;
use crate::fds::Budget;
use crate::memory::budget::QueueBudget;
use crate::shutdown::Hangups;
use crate::sockopt;

impl State {
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
        let old = self.config.load_full();
        // What runs keeps the start-time sections (and the admin socket); what waits for a
        // restart is `loaded`.
        let mut running = new.clone();
        running.admin = old.admin.reloaded(&new.admin);
        running.log = old.log.clone();
        running.runtime = old.runtime.clone();
        running.cluster = old.cluster.clone();
        // Cut for what runs (the admin socket and the Redis connections are the start's),
        // beside the connections of every listener that drains once this applies.
        let fds = Budget::current_beside(&running, self.draining_conns(Some(&new)));
        // The byte caps from memory as it is now (where the upkeep reads it).
        let memory = self
            .memory
            .lock()
            .map(|m| m.source().clone())
            .unwrap_or_default();
        let queues = QueueBudget::plan(&running, &memory.read());
        let pools = self.build_pools(&new).await?;
        let mut updates = Vec::new();
        let mut adds = Vec::new();
        for l in &new.listeners {
            match self.active(&l.name) {
                Some(r) if r.bind == l.bind => updates.push((r, l, pool_for(l, &pools)?)),
                replaced => {
                    let socket = running::watch(l, bind_listener(l, &new)?)?;
                    sockopt::apply(socket2::SockRef::from(&socket), &new.tcp)?;
                    let stats = replaced.map(|r| r.ctx.stats.clone());
                    adds.push((l, socket, new_ctx(l, &new, &pools, stats, (&fds, &queues))?));
                }
            }
        }
        // Apply.
        self.switch_pools(pools);
        for (r, l, pool) in updates {
            r.ctx
                .guard
                .reload(running::limits(l, (&fds, &queues)), &new.pressure);
            r.ctx.set_policy(policy(l, &new, pool));
            if let Err(e) = r.apply_tcp(&new.tcp) {
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
            self.start_listener(socket, ctx, l.bind, &new.tcp);
        }
        set_splice_budget(&fds);
        if fds.listeners != self.fds.load().listeners {
            announce(&fds);
        }
        self.fds.store(Arc::new(fds));
        if queues != **self.queues.load() {
            announce_queues(&queues);
        }
        self.queues.store(Arc::new(queues));
        self.kernel.apply(self.targets(), &new.kernel).await;
        let admin_waits = new.admin.restart_changes(&old.admin);
        if !admin_waits.is_empty() {
            tracing::warn!(
                "admin.{} changes take effect at the next restart",
                admin_waits.join(", admin.")
            );
        }
        for (changed, section) in [
            (new.log != old.log, "[log]"),
            (new.runtime != old.runtime, "[runtime]"),
            (new.cluster != old.cluster, "[cluster]"),
        ] {
            if changed {
                tracing::warn!("{section} changes take effect at the next restart");
            }
        }
        let changed = changes(&self.loaded.load(), &new);
        self.config.store(Arc::new(running));
        self.loaded.store(Arc::new(new));
        Ok(changed)
    }

    /// Connections held by listeners that no longer accept: those retired, and, with
    /// `next`, those a reload to `next` retires (removed, or moved to a new bind).
    fn draining_conns(&self, next: Option<&Config>) -> u64 {
        self.listeners()
            .iter()
            .filter(|r| {
                r.is_retired()
                    || next.is_some_and(|c| {
                        !c.listeners
                            .iter()
                            .any(|l| l.name == r.ctx.name && l.bind == r.bind)
                    })
            })
            .map(|r| r.ctx.guard.snapshot().conns as u64)
            .sum()
    }

    /// Cuts the descriptor budget again as draining listeners' connections end (called
    /// once a second by the upkeep): the caps a reload shrank for them grow back. Left to
    /// the reload when one is under way.
    pub(super) fn refit_fds(&self) {
        let Ok(_one) = self.reload_lock.try_lock() else {
            return;
        };
        let draining = self.draining_conns(None);
        let before = self.fds.load_full();
        if draining == before.draining {
            return;
        }
        let config = self.config.load_full();
        let fds = Budget::current_beside(&config, draining);
        let queues = self.queues.load_full();
        for r in self.listeners().iter().filter(|r| !r.is_retired()) {
            if let Some(l) = config.listeners.iter().find(|l| l.name == r.ctx.name) {
                r.ctx
                    .guard
                    .reload(running::limits(l, (&fds, &queues)), &config.pressure);
            }
        }
        set_splice_budget(&fds);
        if draining == 0 && fds.listeners != before.listeners {
            // The drain is over: said once, as the reload said the cut for it.
            announce(&fds);
        } else {
            tracing::debug!("{fds}");
        }
        self.fds.store(Arc::new(fds));
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
                _ = tokio::time::sleep(drain) => ctx.abort_all(),
                _ = stop.cancelled() => {}
            }
        });
    }
}

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
    let section = |changed: bool, what: &str| changed.then(|| what.to_string());
    let admin = |keys: Vec<&str>, when: &str| {
        (!keys.is_empty()).then(|| format!("[admin] {}{when}", keys.join(", ")))
    };
    out.extend(
        [
            section(old.pressure != new.pressure, "[pressure]"),
            section(old.tcp != new.tcp, "[tcp]"),
            section(old.kernel != new.kernel, "[kernel]"),
            admin(new.admin.live_changes(&old.admin), ""),
            admin(
                new.admin.restart_changes(&old.admin),
                " (at the next restart)",
            ),
            section(old.log != new.log, "[log] (at the next restart)"),
            section(
                old.runtime != new.runtime,
                "[runtime] (at the next restart)",
            ),
            section(
                old.cluster != new.cluster,
                "[cluster] (at the next restart)",
            ),
        ]
        .into_iter()
        .flatten(),
    );
    if out.is_empty() {
        "nothing".to_string()
    } else {
        out.join("; ")
    }
}

/// Reloads through `handle` on every SIGHUP `hangups` catches (it was caught before the
/// server bound, so one sent while it started is a reload now), for as long as the process
/// runs.
pub async fn reload_on_sighup(handle: Handle, mut hangups: Hangups) {
    if !hangups.caught() {
        tracing::warn!("cannot listen for SIGHUP; reload with POST /reload");
        return;
    }
    while hangups.next().await.is_some() {
        tracing::info!("SIGHUP received: reloading");
        // The outcome is logged and counted by the reload itself.
        let _ = handle.reload().await;
    }
}
