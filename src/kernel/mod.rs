//! The kernel layer (Linux): see what accept() never shows, and stop SYN floods before it.
//!
//! A user-space proxy never sees a SYN flood (the half-open sockets live in the kernel's
//! SYN queue) nor the sockets a half-closed flood leaves behind. Every
//! `kernel.census_interval` halfguard counts its namespace's sockets on its listening ports
//! by state and SYN_RECV sources by prefix ([`census`]). With `kernel.enforce` and
//! NET_ADMIN it also installs its own nftables table ([`nft`]): per-source SYN rate and
//! concurrent caps that follow each listener's prefixes and exemptions, and a timed drop set
//! fed with sources that keep hitting their own caps. Without the privilege it says so once
//! and runs without it.
//!
//! What the kernel has is reconciled with what the config asks: a failed install is retried
//! at every census (the old table keeps protecting meanwhile; `halfguard_kernel_enforcing`
//! says 0), the table is removed on exit whenever one may exist, and the drop set's live
//! entries are carried into every reinstall. `nft` runs on the blocking pool, one at a time.
//!
//! The server drives it: it hands each census the listeners to watch ([`Watched`]) and the
//! table's [`Target`]s, and applies the bans the census returns. This layer never reads the
//! server's state, so which sources a census bans ([`Tally::earned`]) is a plain function
//! of the guard's tallies, testable on its own.

pub mod census;
pub mod nft;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::KernelConfig;
use crate::guard::{Guard, SourceKey};
use nft::Target;

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

/// What the table should be, and what is known of the kernel's.
#[derive(Debug)]
struct Table {
    /// `None`: no table wanted.
    want: Option<(Vec<Target>, KernelConfig)>,
    /// The kernel has what `want` says.
    in_sync: bool,
    /// A table of ours may be in the kernel (at start: one a crashed run left).
    maybe_present: bool,
    /// This process installed a table at some point.
    installed_once: bool,
    /// The last attempt failed (warned once per streak).
    failing: bool,
    /// Live bans, carried into every reinstall.
    banned_until: HashMap<SourceKey, Instant>,
    /// The drop sets of the table in the kernel.
    ban_sets: std::collections::BTreeSet<nft::BanSet>,
    /// Counter values at the last read, to turn the table's counters (reset by every
    /// reinstall) into totals that only grow.
    last_counters: [u64; nft::COUNTERS.len()],
}

impl Default for Table {
    fn default() -> Self {
        Table {
            want: None,
            in_sync: false,
            maybe_present: true,
            installed_once: false,
            failing: false,
            banned_until: HashMap::new(),
            ban_sets: Default::default(),
            last_counters: [0; nft::COUNTERS.len()],
        }
    }
}

/// The kernel layer's state.
#[derive(Debug, Default)]
pub(crate) struct Kernel {
    pub census: ArcSwap<Census>,
    /// Our nftables table is installed as the config says.
    pub enforcing: AtomicBool,
    /// Sources put in the drop set.
    pub bans: AtomicU64,
    /// Sources that earned a ban while enforcing, and were not put in the drop set.
    pub ban_failures: AtomicU64,
    /// Packets dropped by our rules, per [`nft::COUNTERS`] name, since start.
    pub dropped: [AtomicU64; nft::COUNTERS.len()],
    /// One nft run at a time; holds what the table should be.
    table: tokio::sync::Mutex<Table>,
}

/// The counts a scrape reads.
#[derive(Debug, Clone)]
pub struct KernelCounts {
    /// The last census.
    pub census: Arc<Census>,
    /// Our nftables table is installed as the config says.
    pub enforcing: bool,
    /// Sources put in the drop set since start.
    pub bans: u64,
    /// Sources that earned a ban while enforcing, and were not put in the drop set.
    pub ban_failures: u64,
    /// Packets dropped by our rules, per [`nft::COUNTERS`] name, since start.
    pub dropped: [u64; nft::COUNTERS.len()],
}

/// A listener a census watches.
#[derive(Debug, Clone)]
pub(crate) struct Watched {
    pub name: String,
    /// The bound port, where the kernel's sockets are counted.
    pub port: u16,
    /// Its per-source refusal tally, and its prefixes and allow list.
    pub guard: Guard,
    /// Behind a PROXY-protocol balancer: the kernel sees the balancer, so no bans.
    pub proxied: bool,
}

/// What a census remembers of the last one, to tell the refusals of one interval.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Per (listener, source): refusals by the source's own caps in the guard's tally at
    /// the last census.
    last_refused: HashMap<(String, SourceKey), u64>,
}

impl Tally {
    /// The sources of listener `name` that earned a ban since the last census, given the
    /// refusals their own caps made, in the guard's tally now (`refused`).
    ///
    /// Bans only on refusals the source earned with its own caps, after a completed
    /// handshake: SYN_RECV sources can be spoofed (a flood "from" a victim would get the
    /// victim banned), and listener-wide refusals fall on whoever comes next, so the guard
    /// keeps them out of this count; how many of those there were, or whom they fell on,
    /// changes nothing to a source's own. Behind a PROXY-protocol balancer the kernel sees
    /// the balancer, not the source: no bans there. Never a source the listener's allow
    /// list holds.
    pub(crate) fn earned(
        &mut self,
        name: &str,
        refused: impl IntoIterator<Item = (SourceKey, u64)>,
        proxied: bool,
        allow: &[ipnet::IpNet],
        k: &KernelConfig,
    ) -> Vec<SourceKey> {
        let mut ban = Vec::new();
        for (source, refused) in refused {
            let prev = self
                .last_refused
                .insert((name.to_string(), source), refused)
                .unwrap_or(0);
            // The tally starts afresh every minute: a smaller count is a new window.
            let delta = if refused >= prev {
                refused - prev
            } else {
                refused
            };
            if k.ban_after > 0
                && !proxied
                && delta >= u64::from(k.ban_after)
                && !allow.iter().any(|n| n.contains(&source.addr()))
            {
                ban.push(source);
            }
        }
        ban
    }

    /// Forgets everything when the tally grows past any real need (a churn of sources).
    fn bound(&mut self) {
        if self.last_refused.len() > 65_536 {
            self.last_refused.clear();
        }
    }
}

/// Runs blocking `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

impl Kernel {
    /// Asks for the table `k` describes for `targets` (none when not enforcing) and brings
    /// the kernel there; a failure is retried at every census.
    pub async fn apply(&self, targets: Vec<Target>, k: &KernelConfig) {
        let mut t = self.table.lock().await;
        let want = k.enforce.then(|| (targets, k.clone()));
        if t.want != want || !t.in_sync {
            t.want = want;
            t.in_sync = false;
            self.reconcile(&mut t).await;
        }
    }

    /// Retries what did not go in.
    pub(crate) async fn retry(&self) {
        let mut t = self.table.lock().await;
        if !t.in_sync {
            self.reconcile(&mut t).await;
        }
    }

    async fn reconcile(&self, t: &mut Table) {
        let now = Instant::now();
        t.banned_until.retain(|_, until| *until > now);
        match t.want.clone() {
            Some((targets, k)) => {
                let bans: Vec<(SourceKey, u64)> = t
                    .banned_until
                    .iter()
                    .map(|(s, until)| (*s, (*until - now).as_secs().max(1)))
                    .collect();
                let ports: Vec<u16> = targets.iter().map(|t| t.port).collect();
                let sets = nft::ban_sets(&targets, bans.iter().map(|(s, _)| s));
                match blocking(move || nft::install(&targets, &k, &bans)).await {
                    Ok(()) => {
                        t.ban_sets = sets;
                        t.maybe_present = true;
                        t.installed_once = true;
                        t.in_sync = true;
                        t.failing = false;
                        t.last_counters = [0; nft::COUNTERS.len()];
                        if !self.enforcing.swap(true, Ordering::Relaxed) {
                            tracing::info!(
                                ?ports,
                                "kernel enforcement on: nftables table inet halfguard installed"
                            );
                        }
                    }
                    Err(e) => {
                        self.enforcing.store(false, Ordering::Relaxed);
                        if !std::mem::replace(&mut t.failing, true) {
                            tracing::warn!(
                                error = %e,
                                "kernel enforcement unavailable (it needs NET_ADMIN and the nft tool); running without it, retrying at each census"
                            );
                        }
                    }
                }
            }
            None => {
                self.enforcing.store(false, Ordering::Relaxed);
                if !t.maybe_present {
                    t.in_sync = true;
                    return;
                }
                match blocking(nft::remove).await {
                    Ok(removed) => {
                        if removed {
                            tracing::info!("nftables table inet halfguard removed");
                        }
                        t.maybe_present = false;
                        t.in_sync = true;
                        t.failing = false;
                    }
                    Err(e) if !t.installed_once => {
                        // A look for a table a crashed run left, by a process that never
                        // enforced: most have no NET_ADMIN or no nft, and that is fine.
                        tracing::debug!(error = %e, "no stale nftables table inet halfguard removed");
                        t.maybe_present = false;
                        t.in_sync = true;
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut t.failing, true) {
                            tracing::warn!(error = %e, "cannot remove the nftables table inet halfguard; retrying at each census");
                        }
                    }
                }
            }
        }
    }

    /// Removes our table on exit, whenever one may be there.
    pub async fn remove(&self) {
        let mut t = self.table.lock().await;
        t.want = None;
        t.in_sync = false;
        self.reconcile(&mut t).await;
    }

    /// Puts `sources` in the drop set for `ban_for`, and remembers them for reinstalls. A
    /// ban that cannot go in while enforcement is on (no table, nft failing) is counted in
    /// `ban_failures`.
    pub(crate) async fn ban(&self, mut sources: Vec<SourceKey>, ban_for: Duration) {
        let mut t = self.table.lock().await;
        let now = Instant::now();
        t.banned_until.retain(|_, until| *until > now);
        sources.retain(|s| !t.banned_until.contains_key(s));
        if sources.is_empty() || t.want.is_none() {
            return;
        }
        let added = if !self.enforcing.load(Ordering::Relaxed) {
            Err(std::io::Error::other("the table is not installed"))
        } else if sources
            .iter()
            .flat_map(nft::BanSet::of)
            .all(|(set, _)| t.ban_sets.contains(&set))
        {
            let secs = ban_for.as_secs().max(1);
            let list = sources.clone();
            blocking(move || nft::ban(&list, secs)).await
        } else {
            // A prefix no listener keys by now (a reload changed it since the tally
            // counted): a reinstall makes its set, the bans carried in.
            for s in &sources {
                t.banned_until.insert(*s, now + ban_for);
            }
            t.in_sync = false;
            self.reconcile(&mut t).await;
            if t.in_sync {
                Ok(())
            } else {
                for s in &sources {
                    t.banned_until.remove(s);
                }
                Err(std::io::Error::other(
                    "the table with its set was not installed",
                ))
            }
        };
        match added {
            Ok(()) => {
                self.bans.fetch_add(sources.len() as u64, Ordering::Relaxed);
                tracing::warn!(
                    count = sources.len(),
                    ?ban_for,
                    "sources put in the kernel drop set"
                );
                for s in sources {
                    t.banned_until.insert(s, now + ban_for);
                }
            }
            Err(e) => {
                self.ban_failures
                    .fetch_add(sources.len() as u64, Ordering::Relaxed);
                // Without a table, its failure was warned of already (once per streak).
                if self.enforcing.load(Ordering::Relaxed) {
                    tracing::warn!(error = %e, count = sources.len(), "cannot add to the kernel drop set");
                }
            }
        }
    }

    /// Adds what the table's counters gained since the last read to the totals.
    pub(crate) async fn read_counters(&self) {
        let mut t = self.table.lock().await;
        if !self.enforcing.load(Ordering::Relaxed) {
            return;
        }
        let Ok(now) = blocking(nft::counters).await else {
            return;
        };
        for (i, n) in now.iter().enumerate() {
            // A reinstall starts the table's counters at zero.
            let gained = n.checked_sub(t.last_counters[i]).unwrap_or(*n);
            self.dropped[i].fetch_add(gained, Ordering::Relaxed);
        }
        t.last_counters = now;
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

impl Kernel {
    /// What a scrape reads.
    pub(crate) fn counts(&self) -> KernelCounts {
        KernelCounts {
            census: self.census.load_full(),
            enforcing: self.enforcing.load(Ordering::Relaxed),
            bans: self.bans.load(Ordering::Relaxed),
            ban_failures: self.ban_failures.load(Ordering::Relaxed),
            dropped: std::array::from_fn(|i| self.dropped[i].load(Ordering::Relaxed)),
        }
    }

    /// One census of `listeners`: counts their kernel sockets and SYN_RECV sources, stores
    /// the result for scrapes, and returns the sources that earned a ban since the last one
    /// (never one that `targets`, the table's view of every listener, exempts), sorted.
    /// The caller bans them ([`Kernel::ban`]), then reads the counters.
    pub(crate) async fn census(
        &self,
        listeners: &[Watched],
        targets: &[Target],
        k: &KernelConfig,
        tally: &mut Tally,
    ) -> Vec<SourceKey> {
        let ports: Vec<u16> = listeners.iter().map(|l| l.port).collect();
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
        for Watched {
            name,
            port,
            guard,
            proxied,
        } in listeners
        {
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
            let refused = guard.own_refusals();
            ban.extend(tally.earned(name, refused, *proxied, &lim.allow, k));
            top.truncate(TOP);
            census.sockets.push((name.clone(), *port, counts));
            census.syn_recv.push((name.clone(), top));
        }
        if let Some((cookies, overflows)) = census::netstat() {
            census.syncookies_sent = cookies;
            census.listen_overflows = overflows;
        }
        self.census.store(Arc::new(census));
        tally.bound();
        // Never a source another listener exempts (its allow list, its balancers).
        let exempt: Vec<&ipnet::IpNet> = targets.iter().flat_map(|t| &t.exempt).collect();
        ban.retain(|s| !exempt.iter().any(|n| n.contains(&s.addr())));
        ban.sort();
        ban.dedup();
        ban
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str) -> SourceKey {
        SourceKey::new(ip.parse().unwrap(), 32, 128)
    }

    #[test]
    fn a_ban_takes_refusals_of_its_own_in_one_interval() {
        let k = KernelConfig {
            ban_after: 10,
            ..KernelConfig::default()
        };
        let (a, b) = (key("198.18.0.1"), key("198.18.0.2"));
        let allow: Vec<ipnet::IpNet> = vec!["198.18.0.2/32".parse().unwrap()];
        let mut t = Tally::default();
        // First census: 12 refusals each; b is allowed.
        let ban = t.earned("web", [(a, 12), (b, 12)], false, &allow, &k);
        assert_eq!(ban, vec![a]);
        // Next: 8 more, under ban_after.
        assert!(t.earned("web", [(a, 20)], false, &[], &k).is_empty());
        // The tally's new window (a smaller count) counts whole.
        assert_eq!(t.earned("web", [(a, 11)], false, &[], &k), vec![a]);
        // Behind a PROXY balancer, or with bans off: never.
        assert!(t.earned("lb", [(a, 50)], true, &[], &k).is_empty());
        let off = KernelConfig {
            ban_after: 0,
            ..KernelConfig::default()
        };
        assert!(t.earned("web", [(a, 100)], false, &[], &off).is_empty());
    }

    /// An attacker that fills the listener (so that it, and everyone else, is refused
    /// listener-wide) and also runs past its own rate is banned; a client refused only
    /// because the listener was full is not.
    #[test]
    fn listener_wide_refusals_neither_ban_a_client_nor_shield_an_attacker() {
        use crate::config::{Limits, OnFull, PressureConfig};
        use crate::stats::Reject;
        let guard = Guard::new(
            Limits {
                max_conns: 4,
                on_full: OnFull::Reject,
                conn_rate_per_source: 1,
                conn_burst_per_source: 4,
                max_conns_per_source: 0,
                max_half_open_per_source: 0,
                max_half_closed_per_source: 0,
                ..Limits::default()
            },
            &PressureConfig::default(),
            Arc::new(crate::stats::Stats::default()),
        );
        let (attacker, client): (std::net::IpAddr, std::net::IpAddr) =
            ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap());
        // The attacker holds every place: 20 listener-wide refusals, half of them its own.
        let held: Vec<_> = (0..4).map(|_| guard.admit(attacker).unwrap()).collect();
        for _ in 0..10 {
            assert_eq!(guard.admit(client).unwrap_err(), Reject::ConnsFull);
            assert_eq!(guard.admit(attacker).unwrap_err(), Reject::ConnsFull);
        }
        drop(held);
        // Then it runs past its own rate (its burst is spent): 12 refusals of its own.
        let mut own = 0;
        for _ in 0..12 {
            match guard.admit(attacker) {
                Err(Reject::Rate) => own += 1,
                Err(r) => panic!("{r:?}"),
                Ok(_) => {}
            }
        }
        assert!(own >= 10, "{own}");
        let k = KernelConfig {
            ban_after: 10,
            ..KernelConfig::default()
        };
        let mut t = Tally::default();
        let ban = t.earned("web", guard.own_refusals(), false, &[], &k);
        assert_eq!(ban, vec![key("198.18.0.1")]);
    }
}
