//! Prometheus metrics, read from the counters the proxy keeps anyway.
//!
//! The hot path only ever does atomic adds on [`crate::stats::Stats`], the backend counters
//! and the [`Histo`]grams; nothing is formatted or locked per connection. At a scrape the
//! server gathers a [`Snapshot`] of what runs (its listeners with their counters, caps and
//! guard counts, the pools, the kernel layer's census, the cluster) and this module encodes
//! it through a prometheus-client `Collector`, so every value is read at scrape time and a
//! listener removed by a reload simply disappears from the output. The snapshot is why this
//! module does not know the server: the server uses it, never the other way round. Labels are static sets (listener, state, reason, timeout,
//! direction, backend, server): never a source address.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::backend::Pool;
use crate::cluster::Cluster;
use crate::config::Limits;
use crate::fds::Budget;
use crate::guard::GuardSnapshot;
use crate::histo::Histo;
use crate::kernel::KernelCounts;
use crate::memory::MemoryState;
use crate::stats::{EvictState, Observed, Reject, Stats, Timeout};

/// What a scrape reads, gathered by the server at scrape time: plain values, and handles to
/// the counters the hot path adds to (read here, never written).
#[derive(Debug)]
pub struct Snapshot {
    /// Every running listener, active and retiring, in start order.
    pub listeners: Vec<ListenerSnapshot>,
    /// The descriptor budget in force: what the caps were cut from.
    pub fds: Arc<Budget>,
    /// The pools in force.
    pub pools: Vec<Arc<Pool>>,
    /// The kernel layer's last census and its table's counters.
    pub kernel: KernelCounts,
    /// `[cluster]`: the shared view's state; `None` for a single node.
    pub cluster: Option<Arc<Cluster>>,
    /// (successful, failed) reloads so far.
    pub reloads: (u64, u64),
    /// The upkeep's last reading of the kernel's and the cgroup's memory, and whether it
    /// found memory short.
    pub memory: (MemoryState, bool),
}

/// One running listener, as a scrape sees it.
#[derive(Debug)]
pub struct ListenerSnapshot {
    pub name: String,
    /// Removed by a reload and draining: its connections still count, its caps no longer
    /// are the listener's.
    pub retired: bool,
    /// Connections and sources in each accounted state, now.
    pub guard: GuardSnapshot,
    /// The caps applied (after the descriptor budget).
    pub limits: Arc<Limits>,
    /// The counters; a listener a reload moved shares its predecessor's.
    pub stats: Arc<Stats>,
}

/// Encodes a [`Snapshot`] when the registry asks.
#[derive(Debug)]
struct Collector {
    snap: Snapshot,
}

/// A label set and its value.
type Sample<'a, T> = (Vec<(&'a str, &'a str)>, T);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[Sample<'_, u64>],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    if let [(labels, v)] = samples
        && labels.is_empty()
    {
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in samples {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[Sample<'_, i64>],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, v)] = samples
        && labels.is_empty()
    {
        // No label set at all, rather than an empty `{}`.
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A gauge with no labels and a fractional value (seconds).
fn gauge_f(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[Sample<'_, &Histo>],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        let (sum, count, buckets) = h.snapshot();
        m.encode_family(labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;
    }
    Ok(())
}

/// One row per listener name: a listener a reload moved to a new bind runs beside its
/// retiring predecessor until that one drains: one name, one set of counters (shared), one
/// series. Their connections add up.
type Row<'a> = (&'a str, GuardSnapshot, &'a Stats);

fn rows(listeners: &[ListenerSnapshot]) -> Vec<Row<'_>> {
    let mut ls: Vec<Row<'_>> = Vec::new();
    for l in listeners {
        let snap = l.guard;
        match ls.iter_mut().find(|(n, _, _)| *n == l.name) {
            Some((_, s, _)) => {
                s.conns += snap.conns;
                s.half_open += snap.half_open;
                s.half_closed += snap.half_closed;
                s.stalled += snap.stalled;
                s.stalled_sources += snap.stalled_sources;
                s.queued += snap.queued;
                s.sources += snap.sources;
                s.rate_keys += snap.rate_keys;
                s.pressure |= snap.pressure;
            }
            None => ls.push((l.name.as_str(), snap, &l.stats)),
        }
    }
    ls
}

/// One sample per listener, read from its Stats.
fn one<'a>(ls: &[Row<'a>], get: &dyn Fn(&Stats) -> u64) -> Vec<Sample<'a, u64>> {
    ls.iter()
        .map(|(n, _, s)| (vec![("listener", *n)], get(s)))
        .collect()
}

/// One sample per listener and label value, read from its Stats.
fn by<'a>(
    ls: &[Row<'a>],
    key: &'static str,
    get: &dyn Fn(&Stats) -> Vec<(&'static str, u64)>,
) -> Vec<Sample<'a, u64>> {
    let mut v: Vec<Sample<'a, u64>> = Vec::new();
    for (n, _, s) in ls {
        for (label, x) in get(s) {
            v.push((vec![("listener", *n), (key, label)], x));
        }
    }
    v
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let snap = &self.snap;
        let ls = rows(&snap.listeners);
        let e = &mut enc;
        states(e, &ls)?;
        outcomes(e, &ls)?;
        sources_and_caps(e, &ls, &snap.listeners)?;
        descriptors(e, &snap.fds)?;
        traffic(e, &ls)?;
        backend_servers(e, &snap.pools)?;
        kernel(e, &snap.kernel)?;
        memory(e, &snap.memory.0, snap.memory.1)?;
        if let Some(c) = &snap.cluster {
            cluster(e, c)?;
        }
        process(e, snap.reloads)?;
        durations(e, &ls)?;
        backend_connects(e, &snap.pools)
    }
}

/// Connections and stalled sources by accounted state.
fn states(e: &mut DescriptorEncoder, ls: &[Row<'_>]) -> std::fmt::Result {
    let mut v = Vec::new();
    for (name, snap, stats) in ls {
        let open = snap
            .conns
            .saturating_sub(snap.half_open + snap.half_closed + snap.stalled);
        // Of the half-open connections, those whose client has spoken and whose first
        // message is held until whole (no backend yet).
        let holding = (stats.holding.load(Relaxed) as usize).min(snap.half_open);
        for (state, n) in [
            ("half_open", snap.half_open - holding),
            ("first_message", holding),
            ("open", open),
            ("stalled", snap.stalled),
            ("half_closed", snap.half_closed),
        ] {
            v.push((vec![("listener", *name), ("state", state)], n as i64));
        }
    }
    gauge(
        e,
        "halfguard_connections",
        "Connections by accounted state; open and stalled are both OPEN, stalled moving less than limits.min_rate; first_message is HALF_OPEN with the client's first message held until whole, before any backend.",
        &v,
    )?;

    let parked: Vec<Sample<'_, i64>> = ls
        .iter()
        .flat_map(|(name, _, stats)| {
            [
                ("silent", stats.parked.load(Relaxed)),
                ("idle", stats.parked_idle.load(Relaxed)),
            ]
            .map(|(kind, n)| (vec![("listener", *name), ("kind", kind)], n as i64))
        })
        .collect();
    gauge(
        e,
        "halfguard_parked_connections",
        "Connections parked outside any task (conn::parked): kind silent, half_open until their first byte; kind idle, open and idle after an exchange until either side speaks.",
        &parked,
    )?;

    let mut v = Vec::new();
    for (name, snap, _) in ls {
        v.push((
            vec![("listener", *name), ("state", "stalled")],
            snap.stalled_sources as i64,
        ));
    }
    gauge(
        e,
        "halfguard_sources_in_state",
        "Sources holding at least one connection in the state.",
        &v,
    )?;
    let q: Vec<Sample<'_, i64>> = ls
        .iter()
        .map(|(name, snap, _)| (vec![("listener", *name)], snap.queued as i64))
        .collect();
    gauge(
        e,
        "halfguard_queued_bytes",
        "Bytes queued toward the listener's clients by connections whose clients do not take them (their send queues and what their backends sent that waits unread), as the connections last reported; capped by limits.max_queued.",
        &q,
    )?;
    Ok(())
}

/// How connections were admitted, refused, evicted, clocked out, observed and closed.
fn outcomes(e: &mut DescriptorEncoder, ls: &[Row<'_>]) -> std::fmt::Result {
    let v = one(ls, &|s| s.accepted.load(Relaxed));
    counter(
        e,
        "halfguard_connections_accepted",
        "Connections admitted.",
        &v,
    )?;

    let v = by(ls, "reason", &|s| {
        Reject::ALL.map(|r| (r.as_str(), s.rejected(r))).to_vec()
    });
    counter(
        e,
        "halfguard_connections_rejected",
        "Connections refused with RST, by reason.",
        &v,
    )?;

    let v = by(ls, "state", &|s| {
        EvictState::ALL
            .map(|st| (st.as_str(), s.evicted(st)))
            .to_vec()
    });
    counter(
        e,
        "halfguard_connections_evicted",
        "Connections aborted to make room, by the state they were in.",
        &v,
    )?;

    let v = by(ls, "timeout", &|s| {
        Timeout::ALL.map(|t| (t.as_str(), s.timed_out(t))).to_vec()
    });
    counter(
        e,
        "halfguard_connections_timed_out",
        "Connections aborted by a clock, by clock.",
        &v,
    )?;

    let v: Vec<Sample<'_, i64>> = (ls.iter())
        .map(|(n, _, s)| {
            let suspected = s.server_first_suspected.load(Relaxed);
            (vec![("listener", *n)], suspected as i64)
        })
        .collect();
    gauge(
        e,
        "halfguard_server_first_suspected",
        "1 when this client-first listener's first_byte timeouts grew and a probe saw its server greet first: the listener wants protocol = \"server-first\".",
        &v,
    )?;

    let mut v: Vec<Sample<'_, u64>> = Vec::new();
    for (n, _, s) in ls {
        for o in Observed::all() {
            v.push((
                vec![
                    ("listener", *n),
                    ("action", o.action()),
                    ("reason", o.reason()),
                ],
                s.observed(o),
            ));
        }
    }
    counter(
        e,
        "halfguard_observed",
        "Observe mode: what per-source caps, rates and clocks would have done, and did not.",
        &v,
    )?;

    let v = by(ls, "end", &|s| {
        vec![
            ("clean", s.closed_clean.load(Relaxed)),
            ("peer_error", s.peer_errors.load(Relaxed)),
            ("backend_unavailable", s.backend_unavailable.load(Relaxed)),
            ("shutdown", s.aborted_on_shutdown.load(Relaxed)),
        ]
    });
    counter(
        e,
        "halfguard_connections_closed",
        "Connections that ended other than by refusal, eviction or clock.",
        &v,
    )?;
    Ok(())
}

/// Sources held, pressure mode, and the caps the state gauges are drawn against.
fn sources_and_caps(
    e: &mut DescriptorEncoder,
    ls: &[Row<'_>],
    listeners: &[ListenerSnapshot],
) -> std::fmt::Result {
    let sources: usize = ls.iter().map(|(_, s, _)| s.sources).sum();
    gauge(
        e,
        "halfguard_sources",
        "Sources (address prefixes) holding at least one connection.",
        &[(vec![], sources as i64)],
    )?;

    let v: Vec<_> = ls
        .iter()
        .map(|(n, s, _)| (vec![("listener", *n)], i64::from(s.pressure)))
        .collect();
    gauge(
        e,
        "halfguard_pressure",
        "1 while the listener is in pressure mode.",
        &v,
    )?;

    // The caps the state gauges are drawn against (`halfguard top`, dashboards): `all` is
    // the listener's connection cap, which every state counts toward.
    let mut v = Vec::new();
    // One per name: the caps of the listener still accepting, not of one draining.
    let mut limits: Vec<(&str, bool, _)> = Vec::new();
    for l in listeners {
        let (name, retired) = (l.name.as_str(), l.retired);
        match limits.iter_mut().find(|(n, _, _)| *n == name) {
            Some(x) if x.1 && !retired => *x = (name, retired, &l.limits),
            Some(_) => {}
            None => limits.push((name, retired, &l.limits)),
        }
    }
    for (name, _, lim) in &limits {
        for (state, cap) in [
            ("all", lim.max_conns),
            ("half_open", lim.max_half_open),
            ("half_closed", lim.max_half_closed),
        ] {
            v.push((vec![("listener", *name), ("state", state)], i64::from(cap)));
        }
    }
    gauge(
        e,
        "halfguard_connections_limit",
        "The listener's cap on connections in the state (all: on every connection), as applied: max_conns lowered to fit the open-files limit when it does not.",
        &v,
    )?;
    let q: Vec<_> = (limits.iter())
        .flat_map(|(name, _, lim)| {
            [
                ("listener", lim.max_queued),
                ("source", lim.max_queued_per_source),
            ]
            .map(|(scope, cap)| {
                let cap = i64::try_from(cap).unwrap_or(i64::MAX);
                (vec![("listener", *name), ("scope", scope)], cap)
            })
        })
        .collect();
    gauge(
        e,
        "halfguard_queued_bytes_limit",
        "The byte caps as applied (0: none): limits.max_queued (scope listener) and max_queued_per_source (scope source), lowered to fit the memory limits found at start or reload when they do not.",
        &q,
    )?;
    Ok(())
}

/// The descriptor budget: what the caps were cut from, and the pipes splice takes on demand
/// within their own share.
fn descriptors(e: &mut DescriptorEncoder, fds: &Budget) -> std::fmt::Result {
    let v: Vec<_> = fds
        .listeners
        .iter()
        .map(|l| (vec![("listener", l.name.as_str())], i64::from(l.configured)))
        .collect();
    gauge(
        e,
        "halfguard_connections_limit_configured",
        "limits.max_conns as configured; above halfguard_connections_limit{state=\"all\"} when it was lowered to fit the open-files limit.",
        &v,
    )?;
    gauge(
        e,
        "halfguard_open_files_limit",
        "The soft open-files limit the listener caps and the pipe budget were cut from.",
        &[(vec![], i64::try_from(fds.limit).unwrap_or(i64::MAX))],
    )?;
    #[cfg(target_os = "linux")]
    {
        gauge(
            e,
            "halfguard_splice_pipes",
            "Splice pipes open: in_use held by bulk directions, free kept for the next one.",
            &[
                (vec![("state", "in_use")], crate::splice::in_use() as i64),
                (vec![("state", "free")], crate::splice::free() as i64),
            ],
        )?;
        gauge(
            e,
            "halfguard_splice_pipes_limit",
            "Pipes splice may hold at once (two descriptors each); a bulk direction that finds none keeps copying.",
            &[(vec![], crate::splice::budget() as i64)],
        )?;
    }
    Ok(())
}

/// Bytes forwarded, spliced directions and accept errors.
fn traffic(e: &mut DescriptorEncoder, ls: &[Row<'_>]) -> std::fmt::Result {
    let v = by(ls, "direction", &|s| {
        vec![
            ("upstream", s.bytes_upstream.load(Relaxed)),
            ("downstream", s.bytes_downstream.load(Relaxed)),
        ]
    });
    counter(
        e,
        "halfguard_bytes",
        "Bytes forwarded: upstream is client to backend.",
        &v,
    )?;

    let v = one(ls, &|s| s.spliced.load(Relaxed));
    counter(
        e,
        "halfguard_spliced_directions",
        "Connection directions that moved to zero-copy splice as bulk transfers.",
        &v,
    )?;

    let v = one(ls, &|s| s.accept_errors.load(Relaxed));
    counter(
        e,
        "halfguard_accept_errors",
        "accept() failures such as EMFILE; the accept loop backs off.",
        &v,
    )?;

    let v = one(ls, &|s| s.stolen.load(Relaxed));
    counter(
        e,
        "halfguard_accepts_stolen",
        "Connections an idle worker thread took from another worker's listening socket.",
        &v,
    )?;
    Ok(())
}

/// Each backend server: up, active connections, failed connects.
fn backend_servers(e: &mut DescriptorEncoder, pools: &[Arc<Pool>]) -> std::fmt::Result {
    let sets: Vec<_> = pools.iter().map(|p| (p, p.servers())).collect();
    let mut up = Vec::new();
    let mut active = Vec::new();
    let mut errs = Vec::new();
    for (p, set) in &sets {
        for s in &set.list {
            let labels = vec![("backend", p.name()), ("server", s.label())];
            up.push((labels.clone(), i64::from(s.is_up())));
            active.push((labels.clone(), i64::from(s.active())));
            errs.push((labels, s.connect_errors()));
        }
    }
    gauge(
        e,
        "halfguard_backend_up",
        "1 while the server takes new connections: up by its health checks and not cooling off after failed connects.",
        &up,
    )?;
    gauge(
        e,
        "halfguard_backend_active",
        "Connections to the server now.",
        &active,
    )?;
    counter(
        e,
        "halfguard_backend_connect_errors",
        "Failed or timed-out connects to the server.",
        &errs,
    )?;
    Ok(())
}

/// The kernel layer: the last census, the SYN cookie and overflow counters, enforcement.
fn kernel(e: &mut DescriptorEncoder, kernel: &KernelCounts) -> std::fmt::Result {
    let census = &kernel.census;
    let mut v = Vec::new();
    for (name, _, counts) in &census.sockets {
        for ((state, _), n) in crate::kernel::census::STATES.iter().zip(counts) {
            v.push((
                vec![("listener", name.as_str()), ("state", *state)],
                *n as i64,
            ));
        }
    }
    gauge(
        e,
        "halfguard_kernel_sockets",
        "The kernel's TCP sockets on the listener's port by state, at the last census (SYN_RECV reads low while SYN cookies are sent).",
        &v,
    )?;
    counter(
        e,
        "halfguard_kernel_syncookies_sent",
        "SYN cookies the namespace's kernel sent (TcpExt SyncookiesSent).",
        &[(vec![], census.syncookies_sent)],
    )?;
    counter(
        e,
        "halfguard_kernel_listen_overflows",
        "Connections the namespace's kernel dropped because a listen queue was full (TcpExt ListenOverflows).",
        &[(vec![], census.listen_overflows)],
    )?;
    gauge(
        e,
        "halfguard_kernel_enforcing",
        "1 while halfguard's nftables table is installed.",
        &[(vec![], i64::from(kernel.enforcing))],
    )?;
    counter(
        e,
        "halfguard_kernel_bans",
        "Sources put in the kernel drop set.",
        &[(vec![], kernel.bans)],
    )?;
    counter(
        e,
        "halfguard_kernel_ban_failures",
        "Sources that earned a ban while kernel.enforce is on and could not be put in the drop set (no table installed, nft failing).",
        &[(vec![], kernel.ban_failures)],
    )?;
    let dropped: Vec<_> = crate::kernel::nft::COUNTERS
        .iter()
        .zip(&kernel.dropped)
        .map(|(rule, n)| (vec![("rule", *rule)], *n))
        .collect();
    counter(
        e,
        "halfguard_kernel_dropped",
        "Packets halfguard's nftables rules dropped, by rule: ban (the drop set), syn_rate and conns (a source over its limit), untracked (the shared limit of sources a full per-source set has no room for). Read at each census.",
        &dropped,
    )?;
    Ok(())
}

/// `[cluster]`: the sync with Redis and the shared view.
fn cluster(e: &mut DescriptorEncoder, c: &Cluster) -> std::fmt::Result {
    gauge(
        e,
        "halfguard_cluster_up",
        "1 while the last sync with Redis succeeded and per-source caps are cluster-wide; 0 while each replica enforces its full local caps.",
        &[(vec![], i64::from(c.up.load(Relaxed)))],
    )?;
    counter(
        e,
        "halfguard_cluster_syncs",
        "Successful syncs with Redis (publish this replica's share, read the others').",
        &[(vec![], c.syncs.load(Relaxed))],
    )?;
    let v: Vec<_> = crate::cluster::Failure::ALL
        .iter()
        .map(|f| (vec![("reason", f.as_str())], c.failures(*f)))
        .collect();
    counter(
        e,
        "halfguard_cluster_sync_failures",
        "Failed syncs with Redis by reason: connect (refused, unreachable, AUTH), timeout (no answer within cluster.timeout), error (Redis said no), reply (an answer that is not ours).",
        &v,
    )?;
    gauge_f(
        e,
        "halfguard_cluster_staleness_seconds",
        "Age of the cluster view: time since the last successful sync (since start before the first).",
        c.staleness().as_secs_f64(),
    )?;
    gauge(
        e,
        "halfguard_cluster_replicas",
        "Live replicas at the last sync, this one included.",
        &[(vec![], c.nodes.load(Relaxed) as i64)],
    )?;
    gauge(
        e,
        "halfguard_cluster_published_sources",
        "Sources this replica published at the last sync (above cluster.publish_above of a cap; at most cluster.max_published per listener).",
        &[(vec![], c.published.load(Relaxed) as i64)],
    )?;
    gauge(
        e,
        "halfguard_cluster_remote_sources",
        "Sources the other replicas hold, as of the last sync.",
        &[(vec![], c.remote_sources.load(Relaxed) as i64)],
    )?;
    gauge(
        e,
        "halfguard_cluster_banned_sources",
        "Sources banned on every replica now.",
        &[(vec![], c.banned.load(Relaxed) as i64)],
    )?;
    counter(
        e,
        "halfguard_cluster_bad_entries",
        "Entries in other replicas' shares that did not parse, skipped.",
        &[(vec![], c.bad_entries.load(Relaxed))],
    )?;
    let v: Vec<_> = crate::cluster::Dropped::ALL
        .iter()
        .map(|d| (vec![("reason", d.as_str())], c.dropped(*d)))
        .collect();
    counter(
        e,
        "halfguard_cluster_dropped",
        "What syncs cut from what Redis held, by reason: share_full (entries of a replica's share past what a replica writes), replicas (live replicas past cluster.max_replicas, unread), view_full (entries past the view's bound), bans (bans past the bound, unread), count_clamped (entries counting more than a replica could hold, kept at that), ban_clamped (bans ending past now + kernel.ban_for, cut).",
        &v,
    )?;
    Ok(())
}

/// Kernel memory: TCP's against `tcp_mem`, orphans, the cgroup's against its limit, and
/// whether that put every listener in pressure mode. A part that could not be read is
/// absent; the cgroup's only where a limit is set.
fn memory(e: &mut DescriptorEncoder, m: &MemoryState, short: bool) -> std::fmt::Result {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    if let Some(b) = m.tcp_bytes() {
        gauge(
            e,
            "halfguard_kernel_tcp_memory_bytes",
            "Memory the kernel holds for TCP sockets, the whole host (/proc/net/sockstat mem x page size).",
            &[(vec![], i(b))],
        )?;
    }
    if let Some([low, pressure, high]) = m.tcp_mem_bytes() {
        gauge(
            e,
            "halfguard_kernel_tcp_memory_limit_bytes",
            "net.ipv4.tcp_mem in bytes: low (the kernel leaves pressure below it), pressure (it shrinks every socket's buffers above it), high (it refuses memory to sockets above it).",
            &[
                (vec![("level", "low")], i(low)),
                (vec![("level", "pressure")], i(pressure)),
                (vec![("level", "high")], i(high)),
            ],
        )?;
    }
    if let Some(n) = m.orphans {
        gauge(
            e,
            "halfguard_kernel_tcp_orphans",
            "TCP sockets closed by their process and still held by the kernel (FIN_WAIT, LAST_ACK, CLOSING), this network namespace.",
            &[(vec![], i(n))],
        )?;
    }
    let mut v = Vec::new();
    if let Some((usage, limit)) = m.cgroup {
        v.push((vec![("kind", "usage")], i(usage)));
        v.push((vec![("kind", "limit")], i(limit)));
    }
    if let Some(sock) = m.sockets.or(m.tcp_cgroup.map(|t| t.0)) {
        v.push((vec![("kind", "sockets")], i(sock)));
    }
    if let Some((_, limit)) = m.tcp_cgroup {
        v.push((vec![("kind", "sockets_limit")], i(limit)));
    }
    if !v.is_empty() {
        gauge(
            e,
            "halfguard_cgroup_memory_bytes",
            "halfguard's memory cgroup: usage (less inactive file cache) and limit of the cgroup nearest its limit, where one is set; sockets: socket buffers charged to it (v2 memory.stat sock, v1 memory.kmem.tcp.usage_in_bytes); sockets_limit: v1's memory.kmem.tcp.limit_in_bytes.",
            &v,
        )?;
    }
    gauge(
        e,
        "halfguard_memory_pressure",
        "1 while kernel TCP memory or the cgroup's usage is past its [pressure] mark: every listener is in pressure mode (halfguard_pressure).",
        &[(vec![], i64::from(short))],
    )
}

/// What the process runs on, so a dashboard can tell a CPU limit from a slow backend, and
/// its reloads.
fn process(e: &mut DescriptorEncoder, reloads: (u64, u64)) -> std::fmt::Result {
    gauge(
        e,
        "halfguard_runtime_workers",
        "Worker threads running connections ([runtime] workers).",
        &[(vec![], crate::shards::workers() as i64)],
    )?;

    counter(
        e,
        "halfguard_config_reloads",
        "Configuration reloads by result.",
        &[
            (vec![("result", "success")], reloads.0),
            (vec![("result", "failure")], reloads.1),
        ],
    )?;
    Ok(())
}

/// How long connections lived.
fn durations(e: &mut DescriptorEncoder, ls: &[Row<'_>]) -> std::fmt::Result {
    let v: Vec<_> = ls
        .iter()
        .map(|(n, _, s)| (vec![("listener", *n)], &s.duration))
        .collect();
    histogram(
        e,
        "halfguard_connection_duration_seconds",
        "Lifetime of admitted connections, from accept to close.",
        &v,
    )?;
    Ok(())
}

/// Backend connects: those that failed on this host, and how long the others took; slots
/// taken back for queued clients.
fn backend_connects(e: &mut DescriptorEncoder, pools: &[Arc<Pool>]) -> std::fmt::Result {
    let v: Vec<_> = pools
        .iter()
        .map(|p| (vec![("backend", p.name())], p.local_errors()))
        .collect();
    counter(
        e,
        "halfguard_backend_local_errors",
        "Backend connects that failed on this host (descriptors, ephemeral ports, socket options), not held against any server.",
        &v,
    )?;
    let v: Vec<_> = pools
        .iter()
        .map(|p| (vec![("backend", p.name())], p.slots_reclaimed()))
        .collect();
    counter(
        e,
        "halfguard_backend_slots_reclaimed",
        "Connections aborted to give their server slot (max_conns) to a queued client: they were dripping a request, reading slowly or idle after the answer.",
        &v,
    )?;
    let v: Vec<_> = pools
        .iter()
        .map(|p| (vec![("backend", p.name())], p.connect_time()))
        .collect();
    histogram(
        e,
        "halfguard_backend_connect_seconds",
        "Time to connect to a backend server, successful attempts.",
        &v,
    )?;
    Ok(())
}

/// Renders the Prometheus text exposition of `snap`.
pub(crate) fn render(snap: Snapshot) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Collector { snap }));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}
