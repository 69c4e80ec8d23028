//! One scrape of `/metrics`, arranged per listener, and rates from the scrape before.
//!
//! Everything is taken as the running halfguard names it: each `state` of
//! `halfguard_connections`, each label value of a per-listener counter, each counter family
//! with a `listener` label. A version with a new state, reason or clock is shown in full by
//! this one, and a version without a family simply has no line for it.

use std::time::Instant;

use super::exposition::Sample;

/// Per-listener counter families shown first, in this order, under these titles; any other
/// `*_total` family with a `listener` label follows under its own name.
const KNOWN_FAMILIES: &[(&str, &str)] = &[
    ("halfguard_connections_accepted_total", "accepted"),
    ("halfguard_connections_rejected_total", "refused"),
    ("halfguard_connections_evicted_total", "evicted"),
    ("halfguard_connections_timed_out_total", "timed out"),
    ("halfguard_connections_closed_total", "closed"),
    ("halfguard_observed_total", "observed"),
    ("halfguard_bytes_total", "bytes"),
];

/// The gauge of connections by state.
const CONNECTIONS: &str = "halfguard_connections";
/// The caps those states are drawn against; `state="all"` is the listener's `max_conns`.
const LIMITS: &str = "halfguard_connections_limit";
/// The label value of [`LIMITS`] for the cap that every state counts toward.
pub const ALL_STATES: &str = "all";

/// A counter's value, and its rate since the previous scrape once there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Counter {
    /// The counter's labels other than `listener`, joined with `/` (empty if none).
    pub key: String,
    pub total: f64,
    /// Per second; `None` on the first scrape.
    pub rate: Option<f64>,
}

/// One counter metric of one listener, by label value.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub metric: String,
    pub title: String,
    pub counters: Vec<Counter>,
}

impl Family {
    pub fn get(&self, key: &str) -> Option<&Counter> {
        self.counters.iter().find(|c| c.key == key)
    }
}

/// A listener's states, caps, pressure and counters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Listener {
    pub name: String,
    /// `halfguard_connections` by `state`, in the order exposed.
    pub states: Vec<(String, f64)>,
    /// `halfguard_connections_limit` by `state`; absent from versions without it.
    pub caps: Vec<(String, f64)>,
    pub pressure: Option<bool>,
    pub families: Vec<Family>,
    /// The kernel's sockets on the listener's port by TCP state, when the census runs.
    pub kernel_sockets: Vec<(String, f64)>,
    /// `halfguard_queued_bytes`: toward clients that do not read.
    pub queued: Option<f64>,
    /// `limits.max_queued` as applied (`halfguard_queued_bytes_limit`, scope `listener`).
    pub queued_cap: Option<f64>,
}

impl Listener {
    pub fn family(&self, metric: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.metric == metric)
    }

    /// The cap `state` is measured against: its own, or the listener's connection cap.
    pub fn cap_of(&self, state: &str) -> Option<f64> {
        let find = |s: &str| self.caps.iter().find(|(k, _)| k == s).map(|(_, v)| *v);
        find(state).or_else(|| find(ALL_STATES))
    }
}

/// A backend server and its load.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub backend: String,
    pub server: String,
    pub up: Option<bool>,
    pub active: Option<f64>,
}

/// The namespace-wide kernel figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Kernel {
    /// True when the census reported sockets, i.e. it runs.
    pub census: bool,
    /// Kernel counters by name (`syncookies_sent`, `listen_overflows`, `bans`, ...), a
    /// labelled one once per label value (`dropped/syn_rate`), so each has its own rate.
    pub counters: Vec<Counter>,
    pub enforcing: Option<bool>,
}

/// The kernel's and the cgroup's memory; a figure the running version does not expose (or
/// could not read) is absent, not zero.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Memory {
    pub tcp: Option<f64>,
    /// `tcp_mem` in bytes by `level` (`low`, `pressure`, `high`).
    pub tcp_limits: Vec<(String, f64)>,
    pub orphans: Option<f64>,
    /// `halfguard_cgroup_memory_bytes` by `kind` (`usage`, `limit`, `sockets`, ...).
    pub cgroup: Vec<(String, f64)>,
    pub pressure: Option<bool>,
}

/// One scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub at: Instant,
    pub listeners: Vec<Listener>,
    pub servers: Vec<Server>,
    pub kernel: Kernel,
    pub memory: Memory,
    /// Sources holding a connection, all listeners.
    pub sources: Option<f64>,
}

impl Snapshot {
    /// Arranges the samples of one scrape taken at `at`.
    pub fn from_samples(samples: &[Sample], at: Instant) -> Snapshot {
        let mut s = Snapshot {
            at,
            listeners: Vec::new(),
            servers: Vec::new(),
            kernel: Kernel::default(),
            memory: Memory::default(),
            sources: None,
        };
        for x in samples {
            let name = x.name.as_str();
            if let Some(l) = x.label("listener") {
                let listener = s.listener_mut(l);
                match name {
                    CONNECTIONS => {
                        if let Some(st) = x.label("state") {
                            listener.states.push((st.to_string(), x.value));
                        }
                    }
                    LIMITS => {
                        if let Some(st) = x.label("state") {
                            listener.caps.push((st.to_string(), x.value));
                        }
                    }
                    "halfguard_pressure" => listener.pressure = Some(x.value > 0.0),
                    "halfguard_kernel_sockets" => {
                        if let Some(st) = x.label("state") {
                            listener.kernel_sockets.push((st.to_string(), x.value));
                        }
                        s.kernel.census = true;
                    }
                    "halfguard_queued_bytes" => listener.queued = Some(x.value),
                    "halfguard_queued_bytes_limit" if x.label("scope") == Some("listener") => {
                        listener.queued_cap = Some(x.value);
                    }
                    _ if name.ends_with("_total") => push_counter(listener, x),
                    _ => {}
                }
                continue;
            }
            if let Some(backend) = x.label("backend")
                && let Some(server) = x.label("server")
            {
                let srv = match s
                    .servers
                    .iter()
                    .position(|v| v.backend == backend && v.server == server)
                {
                    Some(i) => &mut s.servers[i],
                    None => {
                        s.servers.push(Server {
                            backend: backend.to_string(),
                            server: server.to_string(),
                            up: None,
                            active: None,
                        });
                        let last = s.servers.len() - 1;
                        &mut s.servers[last]
                    }
                };
                match name {
                    "halfguard_backend_up" => srv.up = Some(x.value > 0.0),
                    "halfguard_backend_active" => srv.active = Some(x.value),
                    _ => {}
                }
                continue;
            }
            match name {
                "halfguard_sources" => s.sources = Some(x.value),
                "halfguard_kernel_enforcing" => s.kernel.enforcing = Some(x.value > 0.0),
                "halfguard_kernel_tcp_memory_bytes" => s.memory.tcp = Some(x.value),
                "halfguard_kernel_tcp_orphans" => s.memory.orphans = Some(x.value),
                "halfguard_memory_pressure" => s.memory.pressure = Some(x.value > 0.0),
                "halfguard_kernel_tcp_memory_limit_bytes" => {
                    if let Some(l) = x.label("level") {
                        s.memory.tcp_limits.push((l.to_string(), x.value));
                    }
                }
                "halfguard_cgroup_memory_bytes" => {
                    if let Some(k) = x.label("kind") {
                        s.memory.cgroup.push((k.to_string(), x.value));
                    }
                }
                _ if name.starts_with("halfguard_kernel_") && name.ends_with("_total") => {
                    let stem = name
                        .trim_start_matches("halfguard_kernel_")
                        .trim_end_matches("_total");
                    let key = std::iter::once(stem)
                        .chain(x.labels.iter().map(|(_, v)| v.as_str()))
                        .collect::<Vec<_>>()
                        .join("/");
                    s.kernel.counters.push(Counter {
                        key,
                        total: x.value,
                        rate: None,
                    });
                }
                _ => {}
            }
        }
        for l in &mut s.listeners {
            l.families.sort_by_key(|f| {
                KNOWN_FAMILIES
                    .iter()
                    .position(|(m, _)| *m == f.metric)
                    .unwrap_or(KNOWN_FAMILIES.len())
            });
        }
        s
    }

    fn listener_mut(&mut self, name: &str) -> &mut Listener {
        let i = match self.listeners.iter().position(|l| l.name == name) {
            Some(i) => i,
            None => {
                self.listeners.push(Listener {
                    name: name.to_string(),
                    ..Listener::default()
                });
                self.listeners.len() - 1
            }
        };
        &mut self.listeners[i]
    }

    /// Fills every counter's rate from `prev`, the scrape before this one. A counter that
    /// went down was reset (the halfguard restarted, or the listener was re-created by a
    /// reload): its whole value is the increase, as Prometheus' `rate()` takes it.
    pub fn with_rates_from(mut self, prev: &Snapshot) -> Snapshot {
        let secs = self.at.saturating_duration_since(prev.at).as_secs_f64();
        if secs <= 0.0 {
            return self;
        }
        let rate = |now: f64, before: Option<f64>| {
            let d = match before {
                Some(b) if now >= b => now - b,
                // A counter new since the last scrape started at zero within the interval.
                _ => now,
            };
            Some(d / secs)
        };
        for l in &mut self.listeners {
            let old = prev.listeners.iter().find(|p| p.name == l.name);
            for f in &mut l.families {
                let old_f = old.and_then(|o| o.family(&f.metric));
                for c in &mut f.counters {
                    c.rate = rate(c.total, old_f.and_then(|o| o.get(&c.key)).map(|o| o.total));
                }
            }
        }
        for c in &mut self.kernel.counters {
            let before = prev
                .kernel
                .counters
                .iter()
                .find(|o| o.key == c.key)
                .map(|o| o.total);
            c.rate = rate(c.total, before);
        }
        self
    }
}

fn push_counter(l: &mut Listener, x: &Sample) {
    let key: Vec<&str> = x
        .labels
        .iter()
        .filter(|(k, _)| k != "listener")
        .map(|(_, v)| v.as_str())
        .collect();
    let counter = Counter {
        key: key.join("/"),
        total: x.value,
        rate: None,
    };
    if let Some(f) = l.families.iter_mut().find(|f| f.metric == x.name) {
        f.counters.push(counter);
        return;
    }
    let title = KNOWN_FAMILIES
        .iter()
        .find(|(m, _)| *m == x.name)
        .map(|(_, t)| t.to_string())
        .unwrap_or_else(|| {
            x.name
                .trim_start_matches("halfguard_")
                .trim_end_matches("_total")
                .replace('_', " ")
        });
    l.families.push(Family {
        metric: x.name.clone(),
        title,
        counters: vec![counter],
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::exposition::parse;
    use super::*;

    const SCRAPE: &str = r#"
halfguard_connections{listener="public",state="half_open"} 40
halfguard_connections{listener="public",state="open"} 7
halfguard_connections{listener="public",state="half_closed"} 1
halfguard_connections{listener="public",state="stalled"} 2
halfguard_connections_limit{listener="public",state="all"} 8192
halfguard_connections_limit{listener="public",state="half_open"} 2048
halfguard_connections_accepted_total{listener="public"} 100
halfguard_connections_rejected_total{listener="public",reason="source_half_open"} 10
halfguard_connections_rejected_total{listener="public",reason="rate"} 0
halfguard_connections_evicted_total{listener="public",state="stalled"} 3
halfguard_connections_timed_out_total{listener="public",timeout="request"} 4
halfguard_observed_total{listener="public",action="reject",reason="source_half_open"} 6
halfguard_bytes_total{listener="public",direction="upstream"} 1000
halfguard_accept_errors_total{listener="public"} 0
halfguard_pressure{listener="public"} 1
halfguard_kernel_sockets{listener="public",state="syn_recv"} 12
halfguard_sources 3
halfguard_backend_up{backend="public",server="127.0.0.1:1"} 0
halfguard_backend_active{backend="public",server="127.0.0.1:1"} 5
halfguard_kernel_syncookies_sent_total 50
halfguard_connection_duration_seconds_count{listener="public"} 9
"#;

    fn snap(text: &str, at: Instant) -> Snapshot {
        Snapshot::from_samples(&parse(text), at)
    }

    #[test]
    fn every_state_and_label_value_is_taken_as_exposed() {
        let s = snap(SCRAPE, Instant::now());
        assert_eq!(s.listeners.len(), 1);
        let l = &s.listeners[0];
        let states: Vec<&str> = l.states.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(states, ["half_open", "open", "half_closed", "stalled"]);
        assert_eq!(l.cap_of("half_open"), Some(2048.0));
        assert_eq!(l.cap_of("stalled"), Some(8192.0), "no own cap: max_conns");
        assert_eq!(l.pressure, Some(true));
        let titles: Vec<&str> = l.families.iter().map(|f| f.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "accepted",
                "refused",
                "evicted",
                "timed out",
                "observed",
                "bytes",
                "accept errors"
            ]
        );
        let f = |m: &str| l.family(m).unwrap();
        assert_eq!(
            f("halfguard_connections_accepted_total").counters[0].key,
            ""
        );
        assert_eq!(
            f("halfguard_observed_total").counters[0].key,
            "reject/source_half_open"
        );
        assert!(
            f("halfguard_connections_evicted_total")
                .get("stalled")
                .is_some()
        );
        assert!(s.kernel.census);
        assert_eq!(s.kernel.counters[0].key, "syncookies_sent");
        assert_eq!(s.sources, Some(3.0));
        assert_eq!(
            s.servers,
            vec![Server {
                backend: "public".into(),
                server: "127.0.0.1:1".into(),
                up: Some(false),
                active: Some(5.0)
            }]
        );
    }

    #[test]
    fn rates_are_counter_deltas_over_the_time_between_scrapes() {
        let t0 = Instant::now();
        let a = snap(SCRAPE, t0);
        assert_eq!(a.listeners[0].families[0].counters[0].rate, None);
        let later = SCRAPE
            .replace(
                "accepted_total{listener=\"public\"} 100",
                "accepted_total{listener=\"public\"} 300",
            )
            .replace(
                "reason=\"source_half_open\"} 10",
                "reason=\"source_half_open\"} 2",
            )
            .replace("syncookies_sent_total 50", "syncookies_sent_total 150")
            + "halfguard_connections_rejected_total{listener=\"public\",reason=\"new_reason\"} 8\n";
        let b = snap(&later, t0 + Duration::from_secs(2)).with_rates_from(&a);
        let l = &b.listeners[0];
        let rate = |m: &str, k: &str| l.family(m).unwrap().get(k).unwrap().rate;
        assert_eq!(
            rate("halfguard_connections_accepted_total", ""),
            Some(100.0)
        );
        assert_eq!(
            rate("halfguard_connections_rejected_total", "source_half_open"),
            Some(1.0),
            "a counter that went down was reset: its value is the increase"
        );
        assert_eq!(
            rate("halfguard_connections_rejected_total", "new_reason"),
            Some(4.0),
            "a label value new since the last scrape counts from zero"
        );
        assert_eq!(
            rate("halfguard_connections_rejected_total", "rate"),
            Some(0.0)
        );
        assert_eq!(b.kernel.counters[0].rate, Some(50.0));
    }

    #[test]
    fn a_scrape_at_the_same_instant_leaves_rates_unknown() {
        let t0 = Instant::now();
        let a = snap(SCRAPE, t0);
        let b = snap(SCRAPE, t0).with_rates_from(&a);
        assert_eq!(b.listeners[0].families[0].counters[0].rate, None);
    }

    #[test]
    fn an_older_version_without_caps_or_families_still_reads() {
        let s = snap(
            "halfguard_connections{listener=\"a\",state=\"open\"} 1\n",
            Instant::now(),
        );
        let l = &s.listeners[0];
        assert_eq!(l.cap_of("open"), None);
        assert_eq!(l.pressure, None);
        assert!(l.families.is_empty());
        assert!(!s.kernel.census);
    }
}
