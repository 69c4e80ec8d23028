//! The raw shape of the TOML file, exactly as an operator writes it.
//!
//! Every struct refuses unknown keys, so a typo (`frist_byte`) is an error that names the key
//! instead of a silently ignored line. Every value is optional here: defaults and the
//! per-listener overrides are applied in [`super::Config::from_raw`], which is also where the
//! meaning of each value is checked.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub pressure: RawPressure,
    #[serde(default)]
    pub tcp: RawTcp,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub backends: Vec<RawPool>,
    #[serde(default)]
    pub kernel: RawKernel,
    #[serde(default)]
    pub runtime: RawRuntime,
    /// `None`: a single node, no Redis.
    pub cluster: Option<RawCluster>,
}

/// `[cluster]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis: Option<String>,
    pub node: Option<String>,
    pub sync_interval: Option<RawDuration>,
    pub share_ttl: Option<RawDuration>,
    pub timeout: Option<RawDuration>,
    pub publish_above: Option<f64>,
    pub max_published: Option<u32>,
    pub key_prefix: Option<String>,
    pub redis_cluster: Option<bool>,
}

/// `[runtime]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub workers: Option<u32>,
}

/// `[kernel]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKernel {
    pub census_interval: Option<RawDuration>,
    pub enforce: Option<bool>,
    pub syn_rate_per_source: Option<u32>,
    pub syn_burst_per_source: Option<u32>,
    pub max_conns_per_source: Option<u32>,
    pub untracked_syn_rate: Option<u32>,
    pub ban_after: Option<u32>,
    pub ban_for: Option<RawDuration>,
}

/// One `[[backends]]` table: a named pool of servers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: Option<String>,
    #[serde(default)]
    pub servers: Vec<RawServer>,
    pub balance: Option<String>,
    pub queue_size: Option<u32>,
    pub queue_timeout: Option<RawDuration>,
    pub proxy_protocol: Option<String>,
    pub on_down: Option<String>,
    pub resolve_interval: Option<RawDuration>,
    pub health: Option<RawHealth>,
}

/// One server of a pool: `{ addr = "host:port", weight = 1, max_conns = 0 }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub addr: Option<String>,
    pub weight: Option<u32>,
    pub max_conns: Option<u32>,
}

/// `[backends.health]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub enabled: Option<bool>,
    pub interval: Option<RawDuration>,
    pub timeout: Option<RawDuration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub send: Option<String>,
    pub expect: Option<String>,
    pub cooloff: Option<RawDuration>,
}

/// One `[[listeners]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<String>,
    pub bind: Option<String>,
    /// The short form: a pool of these servers, named after the listener.
    pub backends: Option<Vec<String>>,
    /// The long form: the name of a `[[backends]]` pool.
    pub backend: Option<String>,
    pub protocol: Option<String>,
    pub accept_proxy: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
    /// Keys set here replace the top-level `[limits]` for this listener only.
    pub limits: Option<RawLimits>,
    /// Keys set here replace the top-level `[timeouts]` for this listener only.
    pub timeouts: Option<RawTimeouts>,
}

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
    pub on_full: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub min_rate: Option<u32>,
    pub grace: Option<RawDuration>,
    pub mode: Option<String>,
}

/// `[timeouts]`, also the shape of `[listeners.timeouts]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<RawDuration>,
    pub first_byte: Option<RawDuration>,
    pub idle: Option<RawDuration>,
    pub half_closed: Option<RawDuration>,
    pub write_stall: Option<RawDuration>,
    pub max_lifetime: Option<RawDuration>,
    pub drain: Option<RawDuration>,
    pub request: Option<RawDuration>,
    pub request_max: Option<RawDuration>,
}

/// `[pressure]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPressure {
    pub high_water: Option<f64>,
    pub low_water: Option<f64>,
    pub first_byte: Option<RawDuration>,
    pub half_closed: Option<RawDuration>,
    pub request: Option<RawDuration>,
    pub idle: Option<RawDuration>,
}

/// `[tcp]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTcp {
    pub backlog: Option<u32>,
    pub nodelay: Option<bool>,
    pub keepalive_idle: Option<RawDuration>,
    pub keepalive_interval: Option<RawDuration>,
    pub keepalive_count: Option<u32>,
    pub user_timeout: Option<RawDuration>,
    pub splice: Option<bool>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: Option<String>,
    pub max_conns: Option<u32>,
    pub probe_conns: Option<u32>,
    pub token_file: Option<String>,
    pub trust_loopback: Option<bool>,
    pub header_timeout: Option<RawDuration>,
    pub drain_delay: Option<RawDuration>,
}

/// A duration written the way operators write them: `"250ms"`, `"5s"`, `"5m"`.
///
/// A bare number is refused on purpose: `first_byte = 5` could mean seconds or milliseconds,
/// and guessing wrong by a factor of 1000 is how a proxy ends up holding sockets for hours.
/// So is anything over [`super::MAX_DURATION`]: `now + clock` must never overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDuration(pub Duration);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with a unit, such as \"250ms\", \"5s\" or \"5m\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawDuration, E> {
                let d = humantime::parse_duration(s.trim()).map_err(|e| {
                    E::custom(format!(
                        "invalid duration {s:?}: {e} (write e.g. \"250ms\", \"5s\", \"5m\")"
                    ))
                })?;
                if d > super::MAX_DURATION {
                    return Err(E::custom(format!(
                        "{s:?} is longer than a year (\"1y\"): no clock needs that, and a deadline that far overflows the clock"
                    )));
                }
                Ok(RawDuration(d))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Err(E::custom(format!(
                    "duration {v} has no unit: write e.g. \"{v}s\" or \"{v}ms\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDuration, E> {
                self.visit_i64(v as i64)
            }
        }
        d.deserialize_any(V)
    }
}
