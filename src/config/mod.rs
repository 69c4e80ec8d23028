//! Configuration: `config.toml -> RawConfig -> Config`.
//!
//! [`load`] layers the TOML file and the `HALFGUARD__SECTION__KEY` environment overrides with
//! the `config` crate and deserialises them into the raw structs of [`file`], which refuse
//! unknown keys. [`Config::from_raw`] then applies defaults and per-listener overrides and
//! checks every value, so the rest of the proxy only ever sees a validated, typed `Config`.
//! Every error names the file and the key.
//!
//! Every default is a documented constant below; `config/halfguard.toml` repeats them with
//! the reasoning an operator needs.

mod admin;
mod cluster;
mod file;
mod load;
mod log;
mod pool;

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

pub use admin::{ADMIN_TOKEN_ENV, AdminToken, MIN_TOKEN_LEN, TokenSource};
pub use cluster::{ClusterConfig, RedisUrl, check_node, host_name};
pub use file::{RawConfig, RawDuration, RawLimits, RawTimeouts};
pub use load::{ENV_PREFIX, ENV_SEPARATOR, load, load_with_env, parse};
pub use log::check_filter;
pub use pool::{
    Balance, DEFAULT_COOLOFF, DEFAULT_FALL, DEFAULT_HEALTH_INTERVAL, DEFAULT_RISE, HealthConfig,
    OnDown, PoolConfig, ProxyVersion, ServerConfig,
};

/// Up to 64 concurrent connections per source: generous for a browser or a NATed office,
/// small enough that one host cannot take the proxy's descriptors.
pub const DEFAULT_MAX_CONNS_PER_SOURCE: u32 = 64;
/// Connections of one source silent for longer than the grace. A client speaks at once, so
/// only a connection that has said nothing for `grace` counts; 16 leaves room for a NAT
/// whose users' first bytes are slow, and is still a quarter of the connection cap.
pub const DEFAULT_MAX_HALF_OPEN_PER_SOURCE: u32 = 16;
/// Connections of one source half-closed for longer than the grace: an ordinary close in
/// flight takes milliseconds and never counts; a client that half-closes and waits for a slow
/// answer does, so a NAT gets some room.
pub const DEFAULT_MAX_HALF_CLOSED_PER_SOURCE: u32 = 16;
/// New connections per second per source (GCRA). A browser opens a handful per page; 200/s
/// is a busy NAT or a client pool with connection-per-request, and still stops one address
/// from churning through the backend. Service-to-service traffic or a carrier NAT may need
/// more (or an `allow` entry).
pub const DEFAULT_CONN_RATE_PER_SOURCE: u32 = 200;
/// Burst of new connections a source may open at once before the rate applies.
pub const DEFAULT_CONN_BURST_PER_SOURCE: u32 = 400;
/// Bytes per second (both directions together) below which an OPEN connection is making no
/// progress: mod_reqtimeout's MinRate. A slow mobile link moves 2 kB/s; a drip moves bytes
/// per second.
pub const DEFAULT_MIN_RATE: u32 = 500;
/// How long a connection must stay silent, or half-closed, before it counts against its
/// source's half-open or half-closed cap. Ordinary traffic passes through those states in
/// well under a round trip; a flood that stays in them is held at its cap after this.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);
/// IPv4 sources are counted per address.
pub const DEFAULT_IPV4_PREFIX: u8 = 32;
/// IPv6 sources are counted per /64: one host usually owns a whole /64.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// Coarser source prefixes than these are refused: a per-source cap shared by a /8 (or a
/// typo such as `ipv6_prefix = 6`) caps everyone behind it together, which is a denial of
/// service by configuration. /16 and /32 are a large organisation or a whole provider.
pub const MIN_IPV4_PREFIX: u8 = 16;
pub const MIN_IPV6_PREFIX: u8 = 32;
/// The coarser level: an IPv4 /24 (one organisation's block, a carrier NAT pool)...
pub const DEFAULT_NETWORK_IPV4_PREFIX: u8 = 24;
/// ...and an IPv6 /48 (one site: a home gets a /56 or /48, so 256 or 65,536 /64 sources).
pub const DEFAULT_NETWORK_IPV6_PREFIX: u8 = 48;
/// Connections of one network: 16 sources' worth at the per-source cap, an eighth of
/// `max_conns`, so one home /56 cannot fill the listener with OPEN connections.
pub const DEFAULT_MAX_CONNS_PER_NETWORK: u32 = 1_024;
/// Hard bound on tracked sources, so a spread-out attack cannot grow memory without end.
pub const DEFAULT_MAX_SOURCES: u32 = 65_536;
/// Concurrent connections per listener; each costs two descriptors.
pub const DEFAULT_MAX_CONNS: u32 = 8_192;
/// Silent (half-open) connections per listener.
pub const DEFAULT_MAX_HALF_OPEN: u32 = 2_048;
/// Half-closed connections per listener.
pub const DEFAULT_MAX_HALF_CLOSED: u32 = 2_048;

/// A backend that has not answered a SYN in 3 s is not going to.
pub const DEFAULT_CONNECT: Duration = Duration::from_secs(3);
/// A client that says nothing for 10 s after connecting is not a client (HAProxy's
/// documented inspect-delay pattern, linkerd's detect timeout).
pub const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(10);
/// No byte either way for 5 minutes. Envoy's 1 h default is what issue threads complain of.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);
/// One side has sent FIN and the other direction makes no progress for 30 s.
pub const DEFAULT_HALF_CLOSED: Duration = Duration::from_secs(30);
/// Bytes are queued for a peer that reads nothing for 30 s (slow read).
pub const DEFAULT_WRITE_STALL: Duration = Duration::from_secs(30);
/// How long connections may finish after SIGTERM before they are aborted.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// The client's request before the backend's first byte: 10 s of allowance, plus one second
/// per `min_rate` bytes the client sends, while it keeps sending. mod_reqtimeout's
/// `header=20-40,MinRate=500` is the model; 10 s is already far more than a 2 kB request
/// needs at 2 kB/s, and the rate extension carries uploads of any size at any sane speed.
pub const DEFAULT_REQUEST: Duration = Duration::from_secs(10);

/// Pressure mode starts when a per-listener count passes 80% of its cap...
pub const DEFAULT_HIGH_WATER: f64 = 0.8;
/// ...and ends when every count is back under 60%.
pub const DEFAULT_LOW_WATER: f64 = 0.6;
/// Under pressure a silent connection gets 2 s to speak.
pub const DEFAULT_PRESSURE_FIRST_BYTE: Duration = Duration::from_secs(2);
/// Under pressure a half-closed connection gets 5 s without progress.
pub const DEFAULT_PRESSURE_HALF_CLOSED: Duration = Duration::from_secs(5);
/// Under pressure a trickling client gets 3 s of allowance before the backend answers.
pub const DEFAULT_PRESSURE_REQUEST: Duration = Duration::from_secs(3);
/// Under pressure an OPEN connection with no byte either way for 30 s is ended.
pub const DEFAULT_PRESSURE_IDLE: Duration = Duration::from_secs(30);

/// Accept queue length asked of the kernel (capped by `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: u32 = 4_096;
/// More worker threads than this is a typo, not a machine.
pub const MAX_WORKERS: u32 = 1_024;
/// First keepalive probe after 30 s of silence.
pub const DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Then one probe every 10 s...
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...and the peer is declared dead after 3 unanswered probes: 60 s in all.
pub const DEFAULT_KEEPALIVE_COUNT: u32 = 3;
/// Sent data unacknowledged for 60 s means the peer is gone (TCP_USER_TIMEOUT). Linux also
/// applies it to keepalive: once it has passed since the last ACK and a probe is out, the
/// connection ends, whatever keepalive_count says. So it is kept at the keepalive total
/// (30 s + 10 s x 3), or one lost probe would end a live idle connection.
pub const DEFAULT_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// The kernel's bounds for the `[tcp]` options (include/net/tcp.h: MAX_TCP_KEEPIDLE,
/// MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT; TCP_USER_TIMEOUT is an int of milliseconds). Past
/// them setsockopt says EINVAL, which would fail every listen and every backend connect.
pub const MAX_KEEPALIVE_TIME: Duration = Duration::from_secs(32_767);
pub const MAX_KEEPALIVE_COUNT: u32 = 127;
pub const MAX_USER_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);
/// No duration in the config may be longer than a year (humantime's `"1y"`, 365.25 days):
/// deadlines are `now + clock`, and one far enough out overflows the monotonic clock, which
/// would panic every connection.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// The admin endpoint listens on loopback unless told otherwise: metrics and `/config` are
/// not for the public.
pub const DEFAULT_ADMIN_BIND: &str = "127.0.0.1:9901";
/// Concurrent admin connections: enough for scrapers and probes, too few to matter.
pub const DEFAULT_ADMIN_MAX_CONNS: u32 = 16;
/// Admin connections kept for `/healthz` and `/readyz` on top of `max_conns`, so a flood of
/// admin connections cannot fail the kubelet's probes and restart the pod.
pub const DEFAULT_ADMIN_PROBE_CONNS: u32 = 4;
/// An admin client gets this long to send its request headers (no slowloris on scrapes).
pub const DEFAULT_ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// After SIGTERM, `/readyz` fails this long before accepting stops, so load balancers and
/// Kubernetes endpoints stop sending first.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);

/// A configuration that failed to load or validate. Every variant names the file, or the
/// environment variable that holds the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a value has the wrong type or an unknown key.
    #[error("{file}: {source}")]
    Load {
        file: String,
        #[source]
        source: config::ConfigError,
    },
    /// A value parsed but makes no sense.
    #[error("{file}: `{key}`: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
    /// A `HALFGUARD__*` override holds a bad value, or sets what the environment cannot
    /// (`[[listeners]]`, `[[backends]]`): the variable is named, not the file it overrides.
    #[error("environment variable {var}: `{key}`: {reason}")]
    Env {
        var: String,
        key: String,
        reason: String,
    },
}

/// Which side speaks first on a listener's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP, TLS and most protocols: the client speaks first, so halfguard waits for the
    /// first byte before it spends a backend connection.
    ClientFirst,
    /// SMTP, MySQL, PostgreSQL-less greeting protocols: the backend speaks first, so the
    /// backend is connected at once and the connection counts as half-open until a byte
    /// moves in either direction.
    ServerFirst,
}

/// What to do when a per-listener half-open or half-closed cap is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Abort the oldest connection in that state of the heaviest source (attackers pay).
    Evict,
    /// Refuse the newcomer.
    Reject,
}

/// Whether per-source decisions act or are only counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse, evict and time out as configured.
    Enforce,
    /// Count what would have been refused, evicted or timed out per source, and let the
    /// connection go on; listener-wide caps still act, since they protect halfguard itself.
    Observe,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Observe => "observe",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from, for messages.
    pub file: String,
    pub listeners: Vec<ListenerConfig>,
    pub pressure: PressureConfig,
    pub tcp: TcpConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    /// Every pool: the `[[backends]]` tables, then one per listener using the short form.
    pub pools: Vec<PoolConfig>,
    pub kernel: KernelConfig,
    pub runtime: RuntimeConfig,
    /// `[cluster]`: `None` runs a single node. Read at start only.
    pub cluster: Option<ClusterConfig>,
}

/// `[runtime]`: read at start only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuntimeConfig {
    /// Threads that run connections; `None` = one per CPU this process may use (the
    /// cgroup's CPU quota counts, so a sidecar limited to one CPU gets one).
    pub workers: Option<u32>,
}

impl RuntimeConfig {
    /// The worker count in force: the configured one, or one per usable CPU.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// `[kernel]`: watching the network namespace's kernel, and (with NET_ADMIN) defending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    /// How often the sockets on the listening ports are counted; `None` = never.
    pub census_interval: Option<Duration>,
    /// Install halfguard's own nftables table (needs NET_ADMIN).
    pub enforce: bool,
    /// New SYNs per second per source before the kernel drops them; 0 = no limit.
    pub syn_rate_per_source: u32,
    pub syn_burst_per_source: u32,
    /// Concurrent conntrack entries per source on the listening ports; 0 = no cap.
    pub max_conns_per_source: u32,
    /// SYNs per second, per listener, shared by the sources a full per-source set has no
    /// room for (a set holds the listener's `max_sources`); 0 = let them through.
    pub untracked_syn_rate: u32,
    /// A source refused this many times by its own caps in one census interval goes into
    /// the drop set; 0 = never. SYN_RECV counts (spoofable) and listener-wide refusals
    /// (which hit whoever comes next) never ban anyone.
    pub ban_after: u32,
    pub ban_for: Duration,
}

/// Count the kernel's sockets every 5 s: cheap (one netlink dump), and fresh enough for a
/// dashboard.
pub const DEFAULT_CENSUS_INTERVAL: Duration = Duration::from_secs(5);

/// When a listener's per-source sets are full (a spoofed flood from more addresses than
/// `max_sources` within a few seconds), new sources share this many SYNs per second rather
/// than pass unlimited. SYN cookies keep answering the SYNs that pass.
pub const DEFAULT_UNTRACKED_SYN_RATE: u32 = 1000;

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            census_interval: Some(DEFAULT_CENSUS_INTERVAL),
            enforce: false,
            syn_rate_per_source: 20,
            syn_burst_per_source: 40,
            max_conns_per_source: 0,
            untracked_syn_rate: DEFAULT_UNTRACKED_SYN_RATE,
            ban_after: 0,
            ban_for: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// `[admin]`: the HTTP endpoint for metrics, probes and reload.
///
/// Seeing is public, steering is private: `/healthz`, `/readyz` and `/metrics` answer anyone
/// who reaches the port; `/sources`, `/config` and `POST /reload` need the token or (unless
/// `trust_loopback` is off) a loopback client.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// `None` when configured as `"off"`.
    pub bind: Option<SocketAddr>,
    pub max_conns: u32,
    /// Connections reserved for `/healthz` and `/readyz`, on top of `max_conns`.
    pub probe_conns: u32,
    pub header_timeout: Duration,
    pub drain_delay: Duration,
    /// As configured; the token read from it (or from the environment) is `token`.
    pub token_file: Option<PathBuf>,
    pub token: Option<AdminToken>,
    /// A loopback client needs no token for the private endpoints.
    pub trust_loopback: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            bind: DEFAULT_ADMIN_BIND.parse().ok(),
            max_conns: DEFAULT_ADMIN_MAX_CONNS,
            probe_conns: DEFAULT_ADMIN_PROBE_CONNS,
            header_timeout: DEFAULT_ADMIN_HEADER_TIMEOUT,
            drain_delay: DEFAULT_DRAIN_DELAY,
            token_file: None,
            token: None,
            trust_loopback: true,
        }
    }
}

impl AdminConfig {
    /// True when `other` differs in what is fixed at start (the socket and its connection
    /// slots). The token, `trust_loopback` and `drain_delay` are read per request or per
    /// signal, so a reload changes them at once.
    pub fn needs_restart_for(&self, other: &AdminConfig) -> bool {
        (
            self.bind,
            self.max_conns,
            self.probe_conns,
            self.header_timeout,
        ) != (
            other.bind,
            other.max_conns,
            other.probe_conns,
            other.header_timeout,
        )
    }
}

/// One listener with its limits and timeouts already merged over the top-level ones.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// The name of the pool this listener forwards to.
    pub backend: String,
    pub protocol: Protocol,
    /// Expect a PROXY protocol v1/v2 header from `trusted_proxies`; caps then apply to the
    /// address in the header.
    pub accept_proxy: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub limits: Limits,
    pub timeouts: Timeouts,
}

/// Caps, per source and per listener. A per-source cap of 0 means no cap.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_conns_per_source: u32,
    pub max_half_open_per_source: u32,
    pub max_half_closed_per_source: u32,
    /// New connections per second per source; 0 turns the rate limit off.
    pub conn_rate_per_source: u32,
    pub conn_burst_per_source: u32,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// The coarser per-source level: prefixes that make a network of sources...
    pub network_ipv4_prefix: u8,
    pub network_ipv6_prefix: u8,
    /// ...and its connection cap (0 = none).
    pub max_conns_per_network: u32,
    pub max_sources: u32,
    pub max_conns: u32,
    pub max_half_open: u32,
    pub max_half_closed: u32,
    pub on_full: OnFull,
    /// Sources exempt from per-source caps and rates (still counted against listener caps).
    pub allow: Vec<IpNet>,
    /// Sources refused at accept.
    pub deny: Vec<IpNet>,
    /// Bytes per second below which an OPEN connection is stalled (evictable when the
    /// listener is full) and a client's request stops earning allowance.
    pub min_rate: u32,
    /// How long a state must last before it counts against a per-source cap.
    pub grace: Duration,
    pub mode: Mode,
}

/// The clocks. See the state diagram in README.md.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
    pub half_closed: Duration,
    pub write_stall: Duration,
    /// `None` when configured as `"0s"`.
    pub max_lifetime: Option<Duration>,
    pub drain: Duration,
    /// The request clock's allowance; `None` when configured as `"0s"` (off).
    pub request: Option<Duration>,
    /// A hard bound on the request clock whatever the rate; `None` = none.
    pub request_max: Option<Duration>,
}

/// Shorter clocks while a listener is under pressure.
#[derive(Debug, Clone, PartialEq)]
pub struct PressureConfig {
    pub high_water: f64,
    pub low_water: f64,
    pub first_byte: Duration,
    pub half_closed: Duration,
    pub request: Duration,
    pub idle: Duration,
}

/// Socket options applied to client and backend sockets alike.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpConfig {
    pub backlog: u32,
    pub nodelay: bool,
    /// `None` (configured `"0s"`) leaves keepalive off.
    pub keepalive_idle: Option<Duration>,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
    /// `None` (configured `"0s"`) leaves TCP_USER_TIMEOUT to the kernel default.
    pub user_timeout: Option<Duration>,
    /// Bulk transfers move with splice(2) on Linux, within a pipe budget.
    pub splice: bool,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `halfguard=debug`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns_per_source: DEFAULT_MAX_CONNS_PER_SOURCE,
            max_half_open_per_source: DEFAULT_MAX_HALF_OPEN_PER_SOURCE,
            max_half_closed_per_source: DEFAULT_MAX_HALF_CLOSED_PER_SOURCE,
            conn_rate_per_source: DEFAULT_CONN_RATE_PER_SOURCE,
            conn_burst_per_source: DEFAULT_CONN_BURST_PER_SOURCE,
            ipv4_prefix: DEFAULT_IPV4_PREFIX,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            network_ipv4_prefix: DEFAULT_NETWORK_IPV4_PREFIX,
            network_ipv6_prefix: DEFAULT_NETWORK_IPV6_PREFIX,
            max_conns_per_network: DEFAULT_MAX_CONNS_PER_NETWORK,
            max_sources: DEFAULT_MAX_SOURCES,
            max_conns: DEFAULT_MAX_CONNS,
            max_half_open: DEFAULT_MAX_HALF_OPEN,
            max_half_closed: DEFAULT_MAX_HALF_CLOSED,
            on_full: OnFull::Evict,
            allow: Vec::new(),
            deny: Vec::new(),
            min_rate: DEFAULT_MIN_RATE,
            grace: DEFAULT_GRACE,
            mode: Mode::Enforce,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: DEFAULT_CONNECT,
            first_byte: DEFAULT_FIRST_BYTE,
            idle: DEFAULT_IDLE,
            half_closed: DEFAULT_HALF_CLOSED,
            write_stall: DEFAULT_WRITE_STALL,
            max_lifetime: None,
            drain: DEFAULT_DRAIN,
            request: Some(DEFAULT_REQUEST),
            request_max: None,
        }
    }
}

impl Default for PressureConfig {
    fn default() -> Self {
        PressureConfig {
            high_water: DEFAULT_HIGH_WATER,
            low_water: DEFAULT_LOW_WATER,
            first_byte: DEFAULT_PRESSURE_FIRST_BYTE,
            half_closed: DEFAULT_PRESSURE_HALF_CLOSED,
            request: DEFAULT_PRESSURE_REQUEST,
            idle: DEFAULT_PRESSURE_IDLE,
        }
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            backlog: DEFAULT_BACKLOG,
            nodelay: true,
            keepalive_idle: Some(DEFAULT_KEEPALIVE_IDLE),
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_count: DEFAULT_KEEPALIVE_COUNT,
            user_timeout: Some(DEFAULT_USER_TIMEOUT),
            splice: true,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::ClientFirst => "client-first",
            Protocol::ServerFirst => "server-first",
        }
    }
}

impl OnFull {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFull::Evict => "evict",
            OnFull::Reject => "reject",
        }
    }
}

/// Collects the first error while keys are checked, so each check stays one line.
pub(super) struct Checker<'a> {
    file: &'a str,
}

impl Checker<'_> {
    pub(super) fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl Config {
    /// Applies defaults and overrides to the raw file and checks every value.
    pub fn from_raw(raw: RawConfig, file: &str) -> Result<Config, ConfigError> {
        let ck = Checker { file };
        if raw.listeners.is_empty() {
            return Err(ck.err("listeners", "at least one [[listeners]] table is required"));
        }
        let base_limits = merge_limits(&ck, &Limits::default(), &raw.limits, "limits")?;
        let base_timeouts = merge_timeouts(&Timeouts::default(), &raw.timeouts);
        check_timeouts(&ck, &base_timeouts, "timeouts")?;

        let mut pools = Vec::new();
        for (i, p) in raw.backends.iter().enumerate() {
            let pool = pool::pool_from_raw(&ck, p, i)?;
            if pools.iter().any(|q: &PoolConfig| q.name == pool.name) {
                return Err(ck.err(
                    format!("backends[{i}].name"),
                    format!("{:?} is used by two pools", pool.name),
                ));
            }
            pools.push(pool);
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        let mut listeners = Vec::with_capacity(raw.listeners.len());
        for (i, l) in raw.listeners.iter().enumerate() {
            let at = |k: &str| format!("listeners[{i}].{k}");
            let name = match &l.name {
                Some(n) if !n.trim().is_empty() => n.clone(),
                Some(_) => return Err(ck.err(at("name"), "must not be empty")),
                None => return Err(ck.err(at("name"), "is required")),
            };
            if !names.insert(name.clone()) {
                return Err(ck.err(at("name"), format!("{name:?} is used by two listeners")));
            }
            let bind_s = l
                .bind
                .as_deref()
                .ok_or_else(|| ck.err(at("bind"), "is required"))?;
            let bind: SocketAddr = bind_s
                .parse()
                .map_err(|_| ck.err(at("bind"), format!("{bind_s:?} is not an ip:port address")))?;
            if bind.port() != 0 && !binds.insert(bind) {
                return Err(ck.err(at("bind"), format!("{bind} is bound by two listeners")));
            }
            let backend = match (&l.backends, &l.backend) {
                (Some(_), Some(_)) => {
                    return Err(ck.err(
                        at("backend"),
                        "give either `backend = \"pool\"` or a `backends` list, not both",
                    ));
                }
                (None, None) => {
                    return Err(ck.err(
                        at("backends"),
                        "is required: a list of \"host:port\", or `backend = \"pool\"`",
                    ));
                }
                (None, Some(pool)) => {
                    if !pools.iter().any(|p| &p.name == pool) {
                        return Err(ck.err(
                            at("backend"),
                            format!("no [[backends]] pool is named {pool:?}"),
                        ));
                    }
                    pool.clone()
                }
                (Some(list), None) => {
                    if list.is_empty() {
                        return Err(ck.err(at("backends"), "needs at least one \"host:port\""));
                    }
                    for (j, b) in list.iter().enumerate() {
                        check_host_port(b).map_err(|r| ck.err(at(&format!("backends[{j}]")), r))?;
                    }
                    if pools.iter().any(|p| p.name == name) {
                        return Err(ck.err(
                            at("name"),
                            format!("{name:?} is also a [[backends]] pool's name; the short `backends` list makes a pool named after the listener"),
                        ));
                    }
                    pools.push(PoolConfig::short(&name, list));
                    name.clone()
                }
            };
            let trusted_proxies = match &l.trusted_proxies {
                None => Vec::new(),
                Some(v) => v
                    .iter()
                    .enumerate()
                    .map(|(j, s)| {
                        parse_net(s).map_err(|r| ck.err(at(&format!("trusted_proxies[{j}]")), r))
                    })
                    .collect::<Result<_, _>>()?,
            };
            let accept_proxy = l.accept_proxy.unwrap_or(false);
            if accept_proxy && trusted_proxies.is_empty() {
                return Err(ck.err(
                    at("trusted_proxies"),
                    "accept_proxy needs the load balancers' CIDRs: a PROXY header from anyone would let any client choose its source address",
                ));
            }
            let protocol = match l.protocol.as_deref() {
                None | Some("client-first") => Protocol::ClientFirst,
                Some("server-first") => Protocol::ServerFirst,
                Some(other) => {
                    return Err(ck.err(
                        at("protocol"),
                        format!("{other:?} is not \"client-first\" or \"server-first\""),
                    ));
                }
            };
            let limits = match &l.limits {
                Some(over) => merge_limits(&ck, &base_limits, over, &at("limits"))?,
                None => base_limits.clone(),
            };
            let timeouts = match &l.timeouts {
                Some(over) => {
                    let t = merge_timeouts(&base_timeouts, over);
                    check_timeouts(&ck, &t, &at("timeouts"))?;
                    t
                }
                None => base_timeouts.clone(),
            };
            listeners.push(ListenerConfig {
                name,
                bind,
                backend,
                protocol,
                accept_proxy,
                trusted_proxies,
                limits,
                timeouts,
            });
        }

        let d = PressureConfig::default();
        let p = &raw.pressure;
        let pressure = PressureConfig {
            high_water: p.high_water.unwrap_or(d.high_water),
            low_water: p.low_water.unwrap_or(d.low_water),
            first_byte: p.first_byte.map_or(d.first_byte, |x| x.0),
            half_closed: p.half_closed.map_or(d.half_closed, |x| x.0),
            request: p.request.map_or(d.request, |x| x.0),
            idle: p.idle.map_or(d.idle, |x| x.0),
        };
        for (key, v) in [
            ("pressure.high_water", pressure.high_water),
            ("pressure.low_water", pressure.low_water),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ck.err(key, format!("{v} is not a fraction in (0, 1]")));
            }
        }
        if pressure.low_water >= pressure.high_water {
            return Err(ck.err(
                "pressure.low_water",
                format!(
                    "{} must be below high_water ({}) or pressure mode would flap",
                    pressure.low_water, pressure.high_water
                ),
            ));
        }
        for (key, v) in [
            ("pressure.first_byte", pressure.first_byte),
            ("pressure.half_closed", pressure.half_closed),
            ("pressure.request", pressure.request),
            ("pressure.idle", pressure.idle),
        ] {
            if v.is_zero() {
                return Err(ck.err(key, "must be greater than 0s"));
            }
        }

        let d = TcpConfig::default();
        let t = &raw.tcp;
        let tcp = TcpConfig {
            backlog: t.backlog.unwrap_or(d.backlog),
            nodelay: t.nodelay.unwrap_or(d.nodelay),
            keepalive_idle: t.keepalive_idle.map_or(d.keepalive_idle, |x| nonzero(x.0)),
            keepalive_interval: t.keepalive_interval.map_or(d.keepalive_interval, |x| x.0),
            keepalive_count: t.keepalive_count.unwrap_or(d.keepalive_count),
            user_timeout: t.user_timeout.map_or(d.user_timeout, |x| nonzero(x.0)),
            splice: t.splice.unwrap_or(d.splice),
        };
        if tcp.backlog == 0 {
            return Err(ck.err("tcp.backlog", "must be at least 1"));
        }
        if tcp.keepalive_idle.is_some() {
            if tcp.keepalive_interval < Duration::from_secs(1) {
                return Err(ck.err(
                    "tcp.keepalive_interval",
                    "the kernel counts it in whole seconds: at least \"1s\"",
                ));
            }
            if tcp.keepalive_idle < Some(Duration::from_secs(1)) {
                return Err(ck.err(
                    "tcp.keepalive_idle",
                    "the kernel counts it in whole seconds: at least \"1s\" (or \"0s\" for off)",
                ));
            }
            if tcp.keepalive_count == 0 {
                return Err(ck.err("tcp.keepalive_count", "must be at least 1"));
            }
            if tcp.keepalive_count > MAX_KEEPALIVE_COUNT {
                return Err(ck.err(
                    "tcp.keepalive_count",
                    format!(
                        "{} is more than the kernel allows ({MAX_KEEPALIVE_COUNT})",
                        tcp.keepalive_count
                    ),
                ));
            }
            for (key, v) in [
                ("tcp.keepalive_idle", tcp.keepalive_idle.unwrap_or_default()),
                ("tcp.keepalive_interval", tcp.keepalive_interval),
            ] {
                if v > MAX_KEEPALIVE_TIME {
                    return Err(ck.err(
                        key,
                        format!(
                            "{} is more than the kernel allows (\"32767s\", about 9 hours)",
                            humantime::format_duration(v)
                        ),
                    ));
                }
            }
        }
        if let Some(ut) = tcp.user_timeout
            && ut > MAX_USER_TIMEOUT
        {
            return Err(ck.err(
                "tcp.user_timeout",
                format!(
                    "{} is more than the kernel allows (\"2147483647ms\", about 24.8 days)",
                    humantime::format_duration(ut)
                ),
            ));
        }

        let d = LogConfig::default();
        let log = LogConfig {
            level: raw.log.level.clone().unwrap_or(d.level),
            format: match raw.log.format.as_deref() {
                None | Some("pretty") => LogFormat::Pretty,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(ck.err(
                        "log.format",
                        format!("{other:?} is not \"pretty\" or \"json\""),
                    ));
                }
            },
        };
        check_filter(&log.level).map_err(|r| ck.err("log.level", r))?;

        let d = AdminConfig::default();
        let a = &raw.admin;
        let admin = AdminConfig {
            bind: match a.bind.as_deref().map(str::trim) {
                None => d.bind,
                Some("off") => None,
                Some(b) => Some(b.parse().map_err(|_| {
                    ck.err(
                        "admin.bind",
                        format!("{b:?} is not an ip:port address or \"off\""),
                    )
                })?),
            },
            max_conns: a.max_conns.unwrap_or(d.max_conns),
            probe_conns: a.probe_conns.unwrap_or(d.probe_conns),
            header_timeout: a.header_timeout.map_or(d.header_timeout, |x| x.0),
            drain_delay: a.drain_delay.map_or(d.drain_delay, |x| x.0),
            token_file: match a.token_file.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(p) => Some(PathBuf::from(p)),
            },
            // Read by `load::parse`, which sees the environment; `from_raw` does no I/O.
            token: None,
            trust_loopback: a.trust_loopback.unwrap_or(d.trust_loopback),
        };
        if admin.max_conns == 0 {
            return Err(ck.err("admin.max_conns", "must be at least 1"));
        }
        if admin.header_timeout.is_zero() {
            return Err(ck.err("admin.header_timeout", "must be greater than 0s"));
        }
        if let Some(b) = admin.bind
            && listeners.iter().any(|l| l.bind.port() != 0 && l.bind == b)
        {
            return Err(ck.err("admin.bind", format!("{b} is also a listener's bind")));
        }

        let d = KernelConfig::default();
        let k = &raw.kernel;
        let kernel = KernelConfig {
            census_interval: k
                .census_interval
                .map_or(d.census_interval, |x| nonzero(x.0)),
            enforce: k.enforce.unwrap_or(d.enforce),
            syn_rate_per_source: k.syn_rate_per_source.unwrap_or(d.syn_rate_per_source),
            syn_burst_per_source: k.syn_burst_per_source.unwrap_or(d.syn_burst_per_source),
            max_conns_per_source: k.max_conns_per_source.unwrap_or(d.max_conns_per_source),
            untracked_syn_rate: k.untracked_syn_rate.unwrap_or(d.untracked_syn_rate),
            ban_after: k.ban_after.unwrap_or(d.ban_after),
            ban_for: k.ban_for.map_or(d.ban_for, |x| x.0),
        };
        if kernel.syn_rate_per_source > 0 && kernel.syn_burst_per_source == 0 {
            return Err(ck.err(
                "kernel.syn_burst_per_source",
                "must be at least 1 when syn_rate_per_source is set",
            ));
        }
        if kernel.ban_after > 0 && kernel.ban_for < Duration::from_secs(1) {
            return Err(ck.err(
                "kernel.ban_for",
                "must be at least \"1s\" when ban_after is set",
            ));
        }
        if kernel.ban_after > 0 && kernel.census_interval.is_none() {
            return Err(ck.err(
                "kernel.ban_after",
                "needs kernel.census_interval: bans are fed at each census",
            ));
        }

        let runtime = RuntimeConfig {
            workers: match raw.runtime.workers {
                None | Some(0) => None,
                Some(n) if n > MAX_WORKERS => {
                    return Err(ck.err(
                        "runtime.workers",
                        format!("{n} is more than {MAX_WORKERS}; 0 means one per CPU"),
                    ));
                }
                Some(n) => Some(n),
            },
        };

        let cluster = match &raw.cluster {
            Some(c) => Some(cluster::cluster_from_raw(&ck, c)?),
            None => None,
        };

        Ok(Config {
            file: file.to_string(),
            listeners,
            pressure,
            tcp,
            log,
            admin,
            pools,
            kernel,
            runtime,
            cluster,
        })
    }

    /// The effective configuration in a few lines, for `halfguard check` and the start log.
    pub fn summary(&self) -> String {
        self.to_string()
    }

    /// Settings that are valid but probably not what the operator means.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        for l in &self.listeners {
            if l.limits.max_half_open_per_source > 0 && l.limits.grace >= l.timeouts.first_byte {
                w.push(format!(
                    "listener {:?}: limits.grace ({}) is not below timeouts.first_byte ({}): a silent \
                     connection times out before it counts against max_half_open_per_source",
                    l.name,
                    humantime::format_duration(l.limits.grace),
                    humantime::format_duration(l.timeouts.first_byte)
                ));
            }
        }
        let t = &self.tcp;
        if let (Some(idle), Some(ut)) = (t.keepalive_idle, t.user_timeout) {
            let total = idle + t.keepalive_interval * t.keepalive_count;
            if ut < total {
                w.push(format!(
                    "tcp.user_timeout ({}) is below keepalive_idle + keepalive_interval x keepalive_count ({}): \
                     Linux then ends an idle connection after one unanswered keepalive probe, \
                     whatever keepalive_count says",
                    humantime::format_duration(ut),
                    humantime::format_duration(total)
                ));
            }
        }
        w
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let cap = |c: u32| {
            if c == 0 {
                "none".to_string()
            } else {
                c.to_string()
            }
        };
        writeln!(
            f,
            "config {}: {} listener(s)",
            self.file,
            self.listeners.len()
        )?;
        for l in &self.listeners {
            let (lim, t) = (&l.limits, &l.timeouts);
            writeln!(
                f,
                "listener {:?} on {} ({}{}) -> pool {:?}",
                l.name,
                l.bind,
                l.protocol.as_str(),
                if l.accept_proxy {
                    format!(
                        ", PROXY protocol from {} prefix(es)",
                        l.trusted_proxies.len()
                    )
                } else {
                    String::new()
                },
                l.backend
            )?;
            writeln!(
                f,
                "  caps per listener: conns {}, half-open {}, half-closed {}, sources {}; on full: {}",
                lim.max_conns,
                lim.max_half_open,
                lim.max_half_closed,
                lim.max_sources,
                lim.on_full.as_str()
            )?;
            writeln!(
                f,
                "  caps per source (/{} v4, /{} v6): conns {}, half-open {}, half-closed {}, rate {}/s burst {}; per network (/{} v4, /{} v6): conns {}",
                lim.ipv4_prefix,
                lim.ipv6_prefix,
                cap(lim.max_conns_per_source),
                cap(lim.max_half_open_per_source),
                cap(lim.max_half_closed_per_source),
                cap(lim.conn_rate_per_source),
                lim.conn_burst_per_source,
                lim.network_ipv4_prefix,
                lim.network_ipv6_prefix,
                cap(lim.max_conns_per_network)
            )?;
            writeln!(
                f,
                "  allow {} prefix(es), deny {} prefix(es); min_rate {} B/s, grace {}; mode {}",
                lim.allow.len(),
                lim.deny.len(),
                lim.min_rate,
                d(lim.grace),
                lim.mode.as_str()
            )?;
            writeln!(
                f,
                "  clocks: connect {}, first_byte {}, request {}{}, idle {}, half_closed {}, write_stall {}, max_lifetime {}, drain {}",
                d(t.connect),
                d(t.first_byte),
                t.request.map_or("off".into(), d),
                t.request_max
                    .map_or(String::new(), |m| format!(" (at most {})", d(m))),
                d(t.idle),
                d(t.half_closed),
                d(t.write_stall),
                t.max_lifetime.map_or("none".into(), d),
                d(t.drain)
            )?;
        }
        for p in &self.pools {
            let servers: Vec<String> = p
                .servers
                .iter()
                .map(|s| {
                    let mut x = s.addr.clone();
                    if s.weight != 1 {
                        x += &format!(" weight {}", s.weight);
                    }
                    if s.max_conns > 0 {
                        x += &format!(" max_conns {}", s.max_conns);
                    }
                    x
                })
                .collect();
            writeln!(
                f,
                "pool {:?}: {} [{}]; queue {} for {}; proxy_protocol {}; on_down {}",
                p.name,
                p.balance.as_str(),
                servers.join(", "),
                p.queue_size,
                d(p.queue_timeout),
                match p.proxy_protocol {
                    None => "off",
                    Some(ProxyVersion::V1) => "v1",
                    Some(ProxyVersion::V2) => "v2",
                },
                match p.on_down {
                    OnDown::Keep => "keep",
                    OnDown::Abort => "abort",
                }
            )?;
            let h = &p.health;
            writeln!(
                f,
                "  health: {}; passive: down after {} failures for {}",
                if h.enabled {
                    format!(
                        "every {}, timeout {}, rise {}, fall {}{}",
                        d(h.interval),
                        d(h.timeout),
                        h.rise,
                        h.fall,
                        if h.send.is_some() || h.expect.is_some() {
                            " (send/expect)"
                        } else {
                            ""
                        }
                    )
                } else {
                    "active checks off".into()
                },
                h.fall,
                d(h.cooloff)
            )?;
        }
        writeln!(
            f,
            "pressure: above {:.0}% of a cap until below {:.0}%: first_byte {}, request {}, idle {}, half_closed {}",
            self.pressure.high_water * 100.0,
            self.pressure.low_water * 100.0,
            d(self.pressure.first_byte),
            d(self.pressure.request),
            d(self.pressure.idle),
            d(self.pressure.half_closed)
        )?;
        let t = &self.tcp;
        writeln!(
            f,
            "tcp: backlog {}, nodelay {}, keepalive {}, user_timeout {}, splice {}",
            t.backlog,
            t.nodelay,
            t.keepalive_idle.map_or("off".into(), |i| format!(
                "idle {} interval {} count {}",
                d(i),
                d(t.keepalive_interval),
                t.keepalive_count
            )),
            t.user_timeout.map_or("kernel default".into(), d),
            if t.splice { "on" } else { "off" }
        )?;
        writeln!(
            f,
            "admin: {}, max_conns {} (+{} for probes), header_timeout {}, drain_delay {}",
            self.admin.bind.map_or("off".into(), |b| b.to_string()),
            self.admin.max_conns,
            self.admin.probe_conns,
            d(self.admin.header_timeout),
            d(self.admin.drain_delay)
        )?;
        let token = self.admin.token.as_ref().map(|t| t.source.to_string());
        writeln!(
            f,
            "  /sources, /config, POST /reload: {}",
            match (token, self.admin.trust_loopback) {
                (Some(src), true) => format!("Bearer token from the {src}, or a loopback client"),
                (Some(src), false) => format!("Bearer token from the {src} only"),
                (None, true) => "loopback clients only (no token set)".to_string(),
                (None, false) => "nobody (no token set, loopback not trusted)".to_string(),
            }
        )?;
        let k = &self.kernel;
        writeln!(
            f,
            "kernel: census {}; enforce {}{}",
            k.census_interval
                .map_or("off".into(), |i| format!("every {}", d(i))),
            if k.enforce { "on" } else { "off" },
            if k.enforce {
                format!(
                    " (syn rate {}/s burst {}, ct count {}, untracked sources {}/s, ban after {} for {})",
                    cap(k.syn_rate_per_source),
                    k.syn_burst_per_source,
                    cap(k.max_conns_per_source),
                    cap(k.untracked_syn_rate),
                    cap(k.ban_after),
                    d(k.ban_for)
                )
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "log: level {}, format {}",
            self.log.level,
            match self.log.format {
                LogFormat::Pretty => "pretty",
                LogFormat::Json => "json",
            }
        )?;
        match self.runtime.workers {
            Some(1) => write!(f, "runtime: 1 worker thread"),
            Some(n) => write!(f, "runtime: {n} worker threads"),
            None => write!(
                f,
                "runtime: one worker thread per usable CPU ({} here)",
                self.runtime.worker_threads()
            ),
        }?;
        if let Some(c) = &self.cluster {
            // `RedisUrl` prints without its password.
            write!(
                f,
                "\ncluster: redis {}{}, node {:?}, sync every {} (timeout {}), share_ttl {}, publish above {:.0}% of a cap, at most {} sources per listener, keys {{{}}}:*",
                c.redis,
                if c.redis_cluster {
                    format!(" (Redis Cluster, sources over {} slots)", c.buckets())
                } else {
                    String::new()
                },
                c.node,
                d(c.sync_interval),
                d(c.timeout),
                d(c.share_ttl),
                c.publish_above * 100.0,
                c.max_published,
                c.key_prefix
            )?;
        }
        Ok(())
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

pub(super) fn check_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not \"host:port\""))?;
    if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
        return Err(format!("{s:?} has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{s:?} has no valid port")),
    }
}

fn merge_limits(
    ck: &Checker<'_>,
    base: &Limits,
    raw: &RawLimits,
    at: &str,
) -> Result<Limits, ConfigError> {
    let key = |k: &str| format!("{at}.{k}");
    let on_full = match raw.on_full.as_deref() {
        None => base.on_full,
        Some("evict") => OnFull::Evict,
        Some("reject") => OnFull::Reject,
        Some(other) => {
            return Err(ck.err(
                key("on_full"),
                format!("{other:?} is not \"evict\" or \"reject\""),
            ));
        }
    };
    let mode = match raw.mode.as_deref() {
        None => base.mode,
        Some("enforce") => Mode::Enforce,
        Some("observe") => Mode::Observe,
        Some(other) => {
            return Err(ck.err(
                key("mode"),
                format!("{other:?} is not \"enforce\" or \"observe\""),
            ));
        }
    };
    let nets = |list: &Option<Vec<String>>, k: &str, base: &Vec<IpNet>| match list {
        None => Ok(base.clone()),
        Some(v) => v
            .iter()
            .enumerate()
            .map(|(i, s)| parse_net(s).map_err(|r| ck.err(format!("{}[{i}]", key(k)), r)))
            .collect(),
    };
    let mut l = Limits {
        max_conns_per_source: raw
            .max_conns_per_source
            .unwrap_or(base.max_conns_per_source),
        max_half_open_per_source: raw
            .max_half_open_per_source
            .unwrap_or(base.max_half_open_per_source),
        max_half_closed_per_source: raw
            .max_half_closed_per_source
            .unwrap_or(base.max_half_closed_per_source),
        conn_rate_per_source: raw
            .conn_rate_per_source
            .unwrap_or(base.conn_rate_per_source),
        conn_burst_per_source: raw
            .conn_burst_per_source
            .unwrap_or(base.conn_burst_per_source),
        ipv4_prefix: raw.ipv4_prefix.unwrap_or(base.ipv4_prefix),
        ipv6_prefix: raw.ipv6_prefix.unwrap_or(base.ipv6_prefix),
        network_ipv4_prefix: raw.network_ipv4_prefix.unwrap_or(base.network_ipv4_prefix),
        network_ipv6_prefix: raw.network_ipv6_prefix.unwrap_or(base.network_ipv6_prefix),
        max_conns_per_network: raw
            .max_conns_per_network
            .unwrap_or(base.max_conns_per_network),
        max_sources: raw.max_sources.unwrap_or(base.max_sources),
        max_conns: raw.max_conns.unwrap_or(base.max_conns),
        max_half_open: raw.max_half_open.unwrap_or(base.max_half_open),
        max_half_closed: raw.max_half_closed.unwrap_or(base.max_half_closed),
        on_full,
        allow: nets(&raw.allow, "allow", &base.allow)?,
        deny: nets(&raw.deny, "deny", &base.deny)?,
        min_rate: raw.min_rate.unwrap_or(base.min_rate),
        grace: raw.grace.map_or(base.grace, |x| x.0),
        mode,
    };
    if l.grace > Duration::from_secs(60) {
        return Err(ck.err(
            key("grace"),
            "is at most \"60s\": it is how long ordinary traffic may sit in a state, not a clock",
        ));
    }
    if !(MIN_IPV4_PREFIX..=32).contains(&l.ipv4_prefix) {
        return Err(ck.err(
            key("ipv4_prefix"),
            format!(
                "{} is not in {MIN_IPV4_PREFIX}..=32 (a coarser source makes everyone behind it share one cap)",
                l.ipv4_prefix
            ),
        ));
    }
    if !(MIN_IPV6_PREFIX..=128).contains(&l.ipv6_prefix) {
        return Err(ck.err(
            key("ipv6_prefix"),
            format!(
                "{} is not in {MIN_IPV6_PREFIX}..=128 (a coarser source makes everyone behind it share one cap)",
                l.ipv6_prefix
            ),
        ));
    }
    if !(MIN_IPV4_PREFIX..=l.ipv4_prefix).contains(&l.network_ipv4_prefix) {
        return Err(ck.err(
            key("network_ipv4_prefix"),
            format!(
                "{} is not in {MIN_IPV4_PREFIX}..={} (ipv4_prefix): a network holds sources, and everyone in it shares its cap",
                l.network_ipv4_prefix, l.ipv4_prefix
            ),
        ));
    }
    if !(MIN_IPV6_PREFIX..=l.ipv6_prefix).contains(&l.network_ipv6_prefix) {
        return Err(ck.err(
            key("network_ipv6_prefix"),
            format!(
                "{} is not in {MIN_IPV6_PREFIX}..={} (ipv6_prefix): a network holds sources, and everyone in it shares its cap",
                l.network_ipv6_prefix, l.ipv6_prefix
            ),
        ));
    }
    for (k, v) in [
        ("max_conns", l.max_conns),
        ("max_half_open", l.max_half_open),
        ("max_half_closed", l.max_half_closed),
        ("max_sources", l.max_sources),
    ] {
        if v == 0 {
            return Err(ck.err(
                key(k),
                "must be at least 1 (listener-wide caps cannot be turned off)",
            ));
        }
    }
    // A state cap above the listener's connection cap can never be reached; clamp it so an
    // operator who only lowers `max_conns` gets what they meant.
    l.max_half_open = l.max_half_open.min(l.max_conns);
    l.max_half_closed = l.max_half_closed.min(l.max_conns);
    if l.conn_rate_per_source > 0 && l.conn_burst_per_source == 0 {
        return Err(ck.err(
            key("conn_burst_per_source"),
            "must be at least 1 when conn_rate_per_source is set",
        ));
    }
    Ok(l)
}

/// A CIDR or an address from an allow, deny or trusted list.
///
/// Host bits set (`10.1.2.3/8`) are refused: the operator meant either the network or the
/// address, and guessing the wider one would exempt, deny or trust a whole /8 by a typo.
/// IPv4-mapped IPv6 (`::ffff:10.1.2.0/120`) becomes the IPv4 prefix it names, since
/// incoming addresses are matched in their IPv4 form; left as IPv6 it would never match.
fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => s
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{s:?} is not a CIDR such as \"192.0.2.0/24\" or an address"))?,
    };
    let net = match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .map_err(|e| format!("{s:?}: {e}"))?,
            None => net,
        },
        _ => net,
    };
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set: write {:?} for the network, or {:?} for the one address",
            net.trunc().to_string(),
            IpNet::from(net.addr()).to_string()
        ));
    }
    Ok(net)
}

fn merge_timeouts(base: &Timeouts, raw: &RawTimeouts) -> Timeouts {
    let pick = |v: Option<RawDuration>, b: Duration| v.map_or(b, |x| x.0);
    Timeouts {
        connect: pick(raw.connect, base.connect),
        first_byte: pick(raw.first_byte, base.first_byte),
        idle: pick(raw.idle, base.idle),
        half_closed: pick(raw.half_closed, base.half_closed),
        write_stall: pick(raw.write_stall, base.write_stall),
        max_lifetime: raw.max_lifetime.map_or(base.max_lifetime, |x| nonzero(x.0)),
        drain: pick(raw.drain, base.drain),
        request: raw.request.map_or(base.request, |x| nonzero(x.0)),
        request_max: raw.request_max.map_or(base.request_max, |x| nonzero(x.0)),
    }
}

fn check_timeouts(ck: &Checker<'_>, t: &Timeouts, at: &str) -> Result<(), ConfigError> {
    for (k, v) in [
        ("connect", t.connect),
        ("first_byte", t.first_byte),
        ("idle", t.idle),
        ("half_closed", t.half_closed),
        ("write_stall", t.write_stall),
    ] {
        if v.is_zero() {
            return Err(ck.err(
                format!("{at}.{k}"),
                "must be greater than 0s: every state needs a clock",
            ));
        }
    }
    if let (Some(r), Some(m)) = (t.request, t.request_max)
        && m < r
    {
        return Err(ck.err(
            format!("{at}.request_max"),
            format!(
                "{} is below request ({}): the allowance could never be used",
                humantime::format_duration(m),
                humantime::format_duration(r)
            ),
        ));
    }
    Ok(())
}
