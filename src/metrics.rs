//! Prometheus metrics, read from the counters the proxy keeps anyway.
//!
//! The hot path only ever does atomic adds on [`crate::stats::Stats`], the backend counters
//! and the [`Histo`]grams below; nothing is formatted or locked per connection. A scrape walks
//! the running listeners and encodes what it finds through a prometheus-client `Collector`,
//! so every value is read at scrape time and a listener removed by a reload simply
//! disappears from the output. Labels are static sets (listener, state, reason, timeout,
//! direction, backend, server): never a source address.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::server::State;
use crate::stats::{EvictState, Observed, Reject, Stats, Timeout};

/// Seconds; connections live from milliseconds to hours.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];
/// Seconds; a backend connect on a LAN takes well under a millisecond.
pub const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 3.0,
];

/// A histogram made of atomics, so observing costs two or three relaxed adds.
#[derive(Debug)]
pub struct Histo {
    bounds: &'static [f64],
    /// One per bound, plus +Inf.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histo {
    pub fn new(bounds: &'static [f64]) -> Histo {
        Histo {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < secs);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts as prometheus-client wants them).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        (
            self.sum_nanos.load(Relaxed) as f64 / 1e9,
            counts.iter().sum(),
            buckets,
        )
    }
}

/// Reads every metric from the server state at scrape time.
#[derive(Debug)]
pub(crate) struct Collector {
    pub state: std::sync::Arc<State>,
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

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let listeners = self.state.listeners();
        // A listener a reload moved to a new bind runs beside its retiring predecessor until
        // that one drains: one name, one set of counters (shared), one series. Their
        // connections add up.
        let mut ls: Vec<(&str, crate::guard::GuardSnapshot, &Stats)> = Vec::new();
        for l in &listeners {
            let snap = l.ctx.guard.snapshot();
            match ls.iter_mut().find(|(n, _, _)| *n == l.ctx.name) {
                Some((_, s, _)) => {
                    s.conns += snap.conns;
                    s.half_open += snap.half_open;
                    s.half_closed += snap.half_closed;
                    s.stalled += snap.stalled;
                    s.stalled_sources += snap.stalled_sources;
                    s.sources += snap.sources;
                    s.rate_keys += snap.rate_keys;
                    s.pressure |= snap.pressure;
                }
                None => ls.push((l.ctx.name.as_str(), snap, &l.ctx.stats)),
            }
        }
        let e = &mut enc;

        let mut v = Vec::new();
        for (name, snap, _) in &ls {
            let open = snap
                .conns
                .saturating_sub(snap.half_open + snap.half_closed + snap.stalled);
            for (state, n) in [
                ("half_open", snap.half_open),
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
            "Connections by accounted state; open and stalled are both OPEN, stalled moving less than limits.min_rate.",
            &v,
        )?;

        let mut v = Vec::new();
        for (name, snap, _) in &ls {
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

        // One sample per listener, or per listener and label value, read from its Stats.
        let one = |get: &dyn Fn(&Stats) -> u64| -> Vec<Sample<'_, u64>> {
            ls.iter()
                .map(|(n, _, s)| (vec![("listener", *n)], get(s)))
                .collect()
        };
        let by = |key: &'static str, get: &dyn Fn(&Stats) -> Vec<(&'static str, u64)>| {
            let mut v: Vec<Sample<'_, u64>> = Vec::new();
            for (n, _, s) in &ls {
                for (label, x) in get(s) {
                    v.push((vec![("listener", *n), (key, label)], x));
                }
            }
            v
        };

        let v = one(&|s| s.accepted.load(Relaxed));
        counter(
            e,
            "halfguard_connections_accepted",
            "Connections admitted.",
            &v,
        )?;

        let v = by("reason", &|s| {
            Reject::ALL.map(|r| (r.as_str(), s.rejected(r))).to_vec()
        });
        counter(
            e,
            "halfguard_connections_rejected",
            "Connections refused with RST, by reason.",
            &v,
        )?;

        let v = by("state", &|s| {
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

        let v = by("timeout", &|s| {
            Timeout::ALL.map(|t| (t.as_str(), s.timed_out(t))).to_vec()
        });
        counter(
            e,
            "halfguard_connections_timed_out",
            "Connections aborted by a clock, by clock.",
            &v,
        )?;

        let mut v: Vec<Sample<'_, u64>> = Vec::new();
        for (n, _, s) in &ls {
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

        let v = by("end", &|s| {
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
        for l in &listeners {
            let (name, retired) = (l.ctx.name.as_str(), l.is_retired());
            match limits.iter_mut().find(|(n, _, _)| *n == name) {
                Some(x) if x.1 && !retired => *x = (name, retired, l.ctx.guard.limits()),
                Some(_) => {}
                None => limits.push((name, retired, l.ctx.guard.limits())),
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

        // The descriptor budget: what the caps above were cut from, and the pipes splice
        // takes on demand within their own share.
        let fds = self.state.fds();
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

        let v = by("direction", &|s| {
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

        let v = one(&|s| s.spliced.load(Relaxed));
        counter(
            e,
            "halfguard_spliced_directions",
            "Connection directions that moved to zero-copy splice as bulk transfers.",
            &v,
        )?;

        let v = one(&|s| s.accept_errors.load(Relaxed));
        counter(
            e,
            "halfguard_accept_errors",
            "accept() failures such as EMFILE; the accept loop backs off.",
            &v,
        )?;

        let pools = self.state.pools();
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

        let kernel = self.state.kernel();
        let census = kernel.census.load_full();
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
            &[(vec![], i64::from(kernel.enforcing.load(Relaxed)))],
        )?;
        counter(
            e,
            "halfguard_kernel_bans",
            "Sources put in the kernel drop set.",
            &[(vec![], kernel.bans.load(Relaxed))],
        )?;
        let dropped: Vec<_> = crate::kernel::nft::COUNTERS
            .iter()
            .zip(&kernel.dropped)
            .map(|(rule, n)| (vec![("rule", *rule)], n.load(Relaxed)))
            .collect();
        counter(
            e,
            "halfguard_kernel_dropped",
            "Packets halfguard's nftables rules dropped, by rule: ban (the drop set), syn_rate and conns (a source over its limit), untracked (the shared limit of sources a full per-source set has no room for). Read at each census.",
            &dropped,
        )?;

        if let Some(c) = self.state.cluster() {
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
        }

        // What the process runs on, so a dashboard can tell a CPU limit from a slow backend.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            gauge(
                e,
                "halfguard_runtime_workers",
                "Worker threads running connections ([runtime] workers).",
                &[(vec![], rt.metrics().num_workers() as i64)],
            )?;
        }

        let reloads = self.state.reloads();
        counter(
            e,
            "halfguard_config_reloads",
            "Configuration reloads by result.",
            &[
                (vec![("result", "success")], reloads.0),
                (vec![("result", "failure")], reloads.1),
            ],
        )?;

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
}

/// Renders the Prometheus text exposition.
pub(crate) fn render(state: std::sync::Arc<State>) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Collector { state }));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_count_each_observation_once() {
        let h = Histo::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(100));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 5.65).abs() < 1e-9);
        assert_eq!(buckets, vec![(0.1, 2), (1.0, 1), (f64::INFINITY, 1)]);
    }
}
