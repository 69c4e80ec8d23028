//! The kernel layer (Linux): see what accept() never shows, and stop SYN floods before it.
//!
//! A user-space proxy never sees a SYN flood (the half-open sockets live in the kernel's
//! SYN queue) nor the sockets a half-closed flood leaves behind. Every
//! `kernel.census_interval` halfguard counts its namespace's sockets on its listening ports
//! by state and SYN_RECV sources by prefix ([`census`]). With `kernel.enforce` and
//! NET_ADMIN it also installs its own nftables table ([`nft`]): per-source SYN rate and
//! concurrent caps, and a timed drop set fed with sources that keep hitting caps. Without the
//! privilege it says so once and runs without it.

pub mod census;
pub mod nft;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::KernelConfig;
use crate::guard::{SourceKey, SourceOrder};
use crate::server::State;

/// SYN_RECV sources kept per listener in a census.
const TOP: usize = 20;

/// One census.
#[derive(Debug, Default, Clone)]
pub struct Census {
    /// Per listener: name, port, and socket counts in [`census::STATES`] order.
    pub sockets: Vec<(String, u16, [u64; census::STATES.len()])>,
    /// Per listener: the heaviest SYN_RECV sources.
    pub syn_recv: Vec<(String, Vec<(SourceKey, u64)>)>,
    /// `TcpExt: SyncookiesSent` and `ListenOverflows` of the namespace.
    pub syncookies_sent: u64,
    pub listen_overflows: u64,
}

/// The kernel layer's state.
#[derive(Debug, Default)]
pub(crate) struct Kernel {
    pub census: ArcSwap<Census>,
    /// Our nftables table is installed.
    pub enforcing: AtomicBool,
    /// Sources put in the drop set.
    pub bans: AtomicU64,
    /// The one "cannot enforce" warning was logged.
    warned: AtomicBool,
}

impl Kernel {
    /// Applies `k` for listening `ports`: installs or replaces the table when enforcing,
    /// removes ours when no longer asked to.
    pub fn apply(&self, ports: &[u16], k: &KernelConfig) {
        if k.enforce {
            match nft::install(ports, k) {
                Ok(()) => {
                    if !self.enforcing.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            ?ports,
                            "kernel enforcement on: nftables table inet halfguard installed"
                        );
                    }
                }
                Err(e) => {
                    self.enforcing.store(false, Ordering::Relaxed);
                    if !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            "kernel enforcement unavailable (it needs NET_ADMIN and the nft tool); running without it"
                        );
                    }
                }
            }
        } else if self.enforcing.swap(false, Ordering::Relaxed) {
            self.remove();
        }
    }

    /// Removes our table (on exit, or when enforcement is turned off).
    pub fn remove(&self) {
        match nft::remove() {
            Ok(()) => tracing::info!("nftables table inet halfguard removed"),
            Err(e) => tracing::warn!(error = %e, "cannot remove the nftables table inet halfguard"),
        }
    }
}

/// Warns once at start when SYN cookies are off in this namespace.
pub fn warn_if_no_syncookies() {
    if census::syncookies_off() {
        tracing::warn!(
            "net.ipv4.tcp_syncookies is 0: a SYN flood can fill the listen queue; set it to 1"
        );
    }
}

/// Counts, every census interval, until the server stops; feeds the drop set.
pub(crate) async fn run(state: Arc<State>) {
    let mut last_refused: HashMap<(String, SourceKey), u64> = HashMap::new();
    let mut banned_until: HashMap<SourceKey, Instant> = HashMap::new();
    loop {
        let k = state.config().kernel.clone();
        let Some(every) = k.census_interval else {
            // Off for now; a reload may turn it on.
            if sleep_or_stop(&state, Duration::from_secs(5)).await {
                return;
            }
            continue;
        };
        let listeners: Vec<_> = state
            .listeners()
            .into_iter()
            .filter(|r| !r.is_retired())
            .map(|r| (r.ctx.name.clone(), r.addr.port(), r.ctx.guard.clone()))
            .collect();
        let ports: Vec<u16> = listeners.iter().map(|l| l.1).collect();
        let seen = tokio::task::spawn_blocking(move || census::dump(&ports)).await;
        let seen = match seen {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "socket census failed");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let mut census = Census::default();
        let mut ban: Vec<SourceKey> = Vec::new();
        for (name, port, guard) in &listeners {
            let mut counts = [0u64; census::STATES.len()];
            let mut syn: HashMap<SourceKey, u64> = HashMap::new();
            let lim = guard.limits();
            for s in seen.iter().filter(|s| s.local_port == *port) {
                if let Some(i) = census::STATES.iter().position(|(_, st)| *st == s.state) {
                    counts[i] += 1;
                }
                if s.state == 3 {
                    *syn.entry(SourceKey::new(s.remote, lim.ipv4_prefix, lim.ipv6_prefix))
                        .or_default() += 1;
                }
            }
            let mut top: Vec<(SourceKey, u64)> = syn.into_iter().collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            if k.ban_after > 0 {
                ban.extend(
                    top.iter()
                        .filter(|(_, n)| *n >= u64::from(k.ban_after))
                        .map(|(key, _)| *key),
                );
                // Sources the guard keeps refusing: refusals since the last census.
                for l in guard.top_sources(usize::MAX, SourceOrder::Refused) {
                    let prev = last_refused
                        .insert((name.clone(), l.source), l.refused)
                        .unwrap_or(0);
                    if l.refused.saturating_sub(prev) >= u64::from(k.ban_after) {
                        ban.push(l.source);
                    }
                }
            }
            top.truncate(TOP);
            census.sockets.push((name.clone(), *port, counts));
            census.syn_recv.push((name.clone(), top));
        }
        if let Some((cookies, overflows)) = census::netstat() {
            census.syncookies_sent = cookies;
            census.listen_overflows = overflows;
        }
        state.kernel().census.store(Arc::new(census));

        let now = Instant::now();
        banned_until.retain(|_, until| *until > now);
        ban.sort();
        ban.dedup();
        ban.retain(|s| !banned_until.contains_key(s));
        if !ban.is_empty() && state.kernel().enforcing.load(Ordering::Relaxed) {
            match nft::ban(&ban, k.ban_for.as_secs().max(1)) {
                Ok(()) => {
                    state
                        .kernel()
                        .bans
                        .fetch_add(ban.len() as u64, Ordering::Relaxed);
                    tracing::warn!(count = ban.len(), ban_for = ?k.ban_for, "sources put in the kernel drop set");
                    for s in ban {
                        banned_until.insert(s, now + k.ban_for);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot add to the kernel drop set"),
            }
        }
        if last_refused.len() > 65_536 {
            last_refused.clear();
        }
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
