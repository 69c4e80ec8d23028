//! The server's periodic work, each a task that ends with the server: once a second the
//! upkeep (rate-limiter sweeps, the summary log, reading memory for every listener's
//! pressure mode, reaping drained listeners and giving their descriptors back to the caps); every `kernel.census_interval` the kernel census and its
//! bans; and the view of the listeners the cluster sync reads.
//!
//! The kernel and cluster layers never read the server: what they need is handed to them
//! from here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::State;
use crate::conn::ListenerCtx;
use crate::guard::Guard;
use crate::kernel::nft::Target;
use crate::kernel::{Tally, Watched};
use crate::stats::Summary;

/// How often rate-limiter keys are swept, summaries logged and retired listeners reaped.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Upkeep ticks between two looks at the stalled connections (while there are some).
const STALLED_SUMMARY_EVERY: u64 = 10;

/// Whether `now` stalled connections are worth an INFO line after `last` were logged: they
/// appeared, or doubled, or halved. A steady few (one idle client below `min_rate`) are
/// said once, not every ten seconds.
fn stalled_news(last: usize, now: usize) -> bool {
    now > 0 && (last == 0 || now >= last * 2 || now * 2 <= last)
}

/// Once a second: sweep rate-limiter keys, log what changed, drop drained retired listeners.
pub(super) async fn upkeep(state: Arc<State>) {
    // One per set of counters: a listener and its replacement (same name, new bind) share
    // theirs, and must not log the same events twice. Read through the one still accepting.
    let mut summaries: Vec<(Arc<ListenerCtx>, Summary)> = Vec::new();
    let mut ticks = 0u64;
    // Stalled connections last said at INFO, per listener name.
    let mut stalled_said: std::collections::HashMap<String, usize> = Default::default();
    let mut greetings = super::greeting::Watch::default();
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = state.stop_upkeep.cancelled() => true,
            _ = tick.tick() => false,
        };
        let listeners = state.listeners();
        let short = state.read_memory();
        for r in &listeners {
            r.ctx.guard.set_memory_pressure(short);
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
        greetings.tick(&state, &listeners);
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
                let said = stalled_said.entry(ctx.name.clone()).or_default();
                if stalled_news(*said, snap.stalled) {
                    *said = snap.stalled;
                    tracing::info!(
                        listener = %ctx.name,
                        stalled = snap.stalled,
                        sources = snap.stalled_sources,
                        conns = snap.conns,
                        "connections stalled: OPEN below limits.min_rate (evictable when the listener is full)"
                    );
                } else if snap.stalled == 0 {
                    *said = 0;
                }
            }
        }
        ticks += 1;
        if let Ok(mut l) = state.listeners.lock() {
            l.retain(|r| !(r.is_retired() && r.ctx.guard.snapshot().conns == 0));
            summaries.retain(|(c, _)| l.iter().any(|r| Arc::ptr_eq(&c.stats, &r.ctx.stats)));
            stalled_said.retain(|n, _| summaries.iter().any(|(c, _)| c.name == *n));
        }
        state.refit_fds();
        if stopping {
            break;
        }
    }
}

/// Drives the kernel layer: a census every `kernel.census_interval` until the server stops;
/// feeds the drop set (and, with `[cluster]`, every replica's bans) and retries the table.
pub(super) async fn census(state: Arc<State>) {
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

impl State {
    /// Reads the kernel's and the cgroup's memory (a few small files, read outside the
    /// lock a scrape takes) and says whether it is short.
    pub(super) fn read_memory(&self) -> bool {
        let source = match self.memory.lock() {
            Ok(m) => m.source().clone(),
            Err(_) => return false,
        };
        let now = source.read();
        let cfg = &self.config().pressure;
        self.memory.lock().is_ok_and(|mut m| m.update(now, cfg))
    }

    /// The kernel's view of the active listeners: port, prefixes, size and exemptions.
    pub(super) fn targets(&self) -> Vec<Target> {
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
                proxied: r.ctx.policy.load().accept_proxy,
            })
            .collect()
    }
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

    fn ban_for(&self) -> Duration {
        self.config().kernel.ban_for
    }

    fn stopping(&self) -> impl Future<Output = ()> + Send {
        self.stop_upkeep.cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::stalled_news;

    #[test]
    fn a_steady_stalled_count_is_said_once() {
        assert!(stalled_news(0, 1), "appearing is news");
        assert!(!stalled_news(1, 1), "one idle connection, again: not news");
        assert!(!stalled_news(0, 0));
        assert!(!stalled_news(10, 12) && !stalled_news(10, 6));
        assert!(
            stalled_news(10, 20) && stalled_news(10, 5),
            "doubled or halved"
        );
        assert!(!stalled_news(3, 0), "gone: nothing to say");
    }
}
