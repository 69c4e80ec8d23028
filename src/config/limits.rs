//! `[limits]` and `[listeners.limits]`: caps per source, per network and per listener.
//!
//! A listener's `limits` table replaces single keys of the top-level one, so the top-level
//! table is checked first, over the built-in defaults, and each listener's is then merged
//! over it: [`Limits::from_raw`] takes the `Limits` it overrides.

use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::addr::parse_net;
use super::choice::choice;
use super::file::RawDuration;
use super::{Checker, ConfigError, cap, dur, rate};

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

/// How much of a client's first message halfguard holds before it connects a backend
/// (see `conn::holding`): nginx's `large_client_header_buffers` (4 x 8 kB) holds as much, so
/// any request head nginx takes fits, and a ClientHello (under 2 kB, post-quantum ones
/// included) or a startup packet (10 kB at most) fits many times over.
pub const DEFAULT_MAX_FIRST_MESSAGE: u32 = 32 * 1024;
/// The bounds of `max_first_message`: a request line needs more than the lower, and the
/// bytes stay in the client socket's receive queue, which the upper must fit in.
const FIRST_MESSAGE_BOUNDS: std::ops::RangeInclusive<u32> = 256..=1024 * 1024;

/// Bytes queued toward one source's clients (its connections' kernel send queues, and what
/// their backends sent that halfguard has not read, and their own queues on this host):
/// 12 MiB is a hundred connections' worth at `tcp.notsent_lowat`, and three of a client that
/// stopped reading a big answer from a backend on loopback; with the transient of a flood's
/// first milliseconds, one source's peak stays near 20 MB of kernel memory.
pub const DEFAULT_MAX_QUEUED_PER_SOURCE: u64 = 12 << 20;
/// Bytes queued toward one listener's clients: 64 MiB, so that clients that stop reading
/// take neither the host's `tcp_mem` nor a 256 MiB sidecar's memory (socket buffers are
/// charged to the container on cgroup v2), counting the backends' queues on this host.
pub const DEFAULT_MAX_QUEUED: u64 = 64 << 20;

/// A grace longer than this is a clock, not a grace.
const MAX_GRACE: Duration = Duration::from_secs(60);

/// `[limits]`, also the shape of `[listeners.limits]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_conns_per_source: Option<u32>,
    pub max_half_open_per_source: Option<u32>,
    pub max_half_closed_per_source: Option<u32>,
    pub conn_rate_per_source: Option<u32>,
    pub conn_burst_per_source: Option<u32>,
    pub ipv4_prefix: Option<u8>,
    pub ipv6_prefix: Option<u8>,
    pub network_ipv4_prefix: Option<u8>,
    pub network_ipv6_prefix: Option<u8>,
    pub max_conns_per_network: Option<u32>,
    pub max_sources: Option<u32>,
    pub max_conns: Option<u32>,
    pub max_half_open: Option<u32>,
    pub max_half_closed: Option<u32>,
    /// An [`OnFull`] spelling, parsed by [`Limits::from_raw`].
    pub on_full: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub min_rate: Option<u32>,
    pub grace: Option<RawDuration>,
    pub max_first_message: Option<u32>,
    pub max_queued_per_source: Option<u64>,
    pub max_queued: Option<u64>,
    /// A [`Mode`] spelling.
    pub mode: Option<String>,
}

choice! {
    /// What to do when a per-listener half-open or half-closed cap is full.
    pub enum OnFull {
        /// Abort the oldest connection in that state of the heaviest source (attackers pay).
        Evict = "evict",
        /// Refuse the newcomer.
        Reject = "reject",
    }
}

choice! {
    /// Whether per-source decisions act or are only counted.
    pub enum Mode {
        /// Refuse, evict and time out as configured.
        Enforce = "enforce",
        /// Count what would have been refused, evicted or timed out per source, and let the
        /// connection go on; listener-wide caps still act, since they protect halfguard
        /// itself.
        Observe = "observe",
    }
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
    /// Bytes of a client's first message held before a backend is connected anyway.
    pub max_first_message: u32,
    /// Bytes queued toward one source, and toward the listener (0 = no cap).
    pub max_queued_per_source: u64,
    pub max_queued: u64,
    pub mode: Mode,
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
            max_first_message: DEFAULT_MAX_FIRST_MESSAGE,
            max_queued_per_source: DEFAULT_MAX_QUEUED_PER_SOURCE,
            max_queued: DEFAULT_MAX_QUEUED,
            mode: Mode::Enforce,
        }
    }
}

impl Limits {
    /// `raw` (the table at key `at`) over `base`, checked.
    pub(super) fn from_raw(
        ck: &Checker<'_>,
        base: &Limits,
        raw: &RawLimits,
        at: &str,
    ) -> Result<Limits, ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        let on_full = ck.choice(raw.on_full.as_deref(), key("on_full"), base.on_full)?;
        let mode = ck.choice(raw.mode.as_deref(), key("mode"), base.mode)?;
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
            max_first_message: raw.max_first_message.unwrap_or(base.max_first_message),
            max_queued_per_source: raw
                .max_queued_per_source
                .unwrap_or(base.max_queued_per_source),
            max_queued: raw.max_queued.unwrap_or(base.max_queued),
            mode,
        };
        l.check(ck, at)?;
        // A state cap above the listener's connection cap can never be reached; clamp it so
        // an operator who only lowers `max_conns` gets what they meant.
        l.max_half_open = l.max_half_open.min(l.max_conns);
        l.max_half_closed = l.max_half_closed.min(l.max_conns);
        Ok(l)
    }

    /// The checks of values that parsed.
    fn check(&self, ck: &Checker<'_>, at: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        if self.grace > MAX_GRACE {
            return Err(ck.err(
                key("grace"),
                "is at most \"60s\": it is how long ordinary traffic may sit in a state, not a clock",
            ));
        }
        if !FIRST_MESSAGE_BOUNDS.contains(&self.max_first_message) {
            return Err(ck.err(
                key("max_first_message"),
                format!(
                    "{} is not in {}..={} (bytes of a first message held in the kernel)",
                    self.max_first_message,
                    FIRST_MESSAGE_BOUNDS.start(),
                    FIRST_MESSAGE_BOUNDS.end()
                ),
            ));
        }
        let coarse = "(a coarser source makes everyone behind it share one cap)";
        if !(MIN_IPV4_PREFIX..=32).contains(&self.ipv4_prefix) {
            return Err(ck.err(
                key("ipv4_prefix"),
                format!(
                    "{} is not in {MIN_IPV4_PREFIX}..=32 {coarse}",
                    self.ipv4_prefix
                ),
            ));
        }
        if !(MIN_IPV6_PREFIX..=128).contains(&self.ipv6_prefix) {
            return Err(ck.err(
                key("ipv6_prefix"),
                format!(
                    "{} is not in {MIN_IPV6_PREFIX}..=128 {coarse}",
                    self.ipv6_prefix
                ),
            ));
        }
        let holds = "a network holds sources, and everyone in it shares its cap";
        if !(MIN_IPV4_PREFIX..=self.ipv4_prefix).contains(&self.network_ipv4_prefix) {
            return Err(ck.err(
                key("network_ipv4_prefix"),
                format!(
                    "{} is not in {MIN_IPV4_PREFIX}..={} (ipv4_prefix): {holds}",
                    self.network_ipv4_prefix, self.ipv4_prefix
                ),
            ));
        }
        if !(MIN_IPV6_PREFIX..=self.ipv6_prefix).contains(&self.network_ipv6_prefix) {
            return Err(ck.err(
                key("network_ipv6_prefix"),
                format!(
                    "{} is not in {MIN_IPV6_PREFIX}..={} (ipv6_prefix): {holds}",
                    self.network_ipv6_prefix, self.ipv6_prefix
                ),
            ));
        }
        for (k, v) in [
            ("max_conns", self.max_conns),
            ("max_half_open", self.max_half_open),
            ("max_half_closed", self.max_half_closed),
            ("max_sources", self.max_sources),
        ] {
            if v == 0 {
                return Err(ck.err(
                    key(k),
                    "must be at least 1 (listener-wide caps cannot be turned off)",
                ));
            }
        }
        if self.conn_rate_per_source > 0 && self.conn_burst_per_source == 0 {
            return Err(ck.err(
                key("conn_burst_per_source"),
                "must be at least 1 when conn_rate_per_source is set",
            ));
        }
        Ok(())
    }
}

/// Three lines, indented under the listener they belong to.
impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  caps per listener: conns {}, half-open {}, half-closed {}, sources {}; on full: {}",
            self.max_conns,
            self.max_half_open,
            self.max_half_closed,
            self.max_sources,
            self.on_full.as_str()
        )?;
        writeln!(
            f,
            "  caps per source (/{} v4, /{} v6): conns {}, half-open {}, half-closed {}, rate {}; per network (/{} v4, /{} v6): conns {}",
            self.ipv4_prefix,
            self.ipv6_prefix,
            cap(self.max_conns_per_source),
            cap(self.max_half_open_per_source),
            cap(self.max_half_closed_per_source),
            rate(self.conn_rate_per_source, Some(self.conn_burst_per_source)),
            self.network_ipv4_prefix,
            self.network_ipv6_prefix,
            cap(self.max_conns_per_network)
        )?;
        write!(
            f,
            "  allow {} prefix(es), deny {} prefix(es); min_rate {} B/s, grace {}, first message held up to {} B; bytes queued per source {}, per listener {}; mode {}",
            self.allow.len(),
            self.deny.len(),
            self.min_rate,
            dur(self.grace),
            self.max_first_message,
            bytes_cap(self.max_queued_per_source),
            bytes_cap(self.max_queued),
            self.mode.as_str()
        )
    }
}

/// A byte cap as `check` prints it.
fn bytes_cap(n: u64) -> String {
    if n == 0 {
        "none".to_string()
    } else if n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} B")
    }
}
