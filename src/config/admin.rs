//! `[admin]`: the HTTP endpoint for metrics, probes and reload.
//!
//! Seeing is public, steering is private: `/healthz`, `/readyz` and `/metrics` answer anyone
//! who reaches the port; `/sources`, `/config` and `POST /reload` need the token (see
//! [`super::token`]) or, unless `trust_loopback` is off, a loopback client.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::file::RawDuration;
use super::{AdminToken, Checker, ConfigError, dur};

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

/// `[admin]`: the HTTP endpoint for metrics, probes and reload.
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
    /// The section as written; the token itself is read by `load::parse`, which sees the
    /// environment (`from_raw` does no I/O).
    pub(super) fn from_raw(ck: &Checker<'_>, a: &RawAdmin) -> Result<AdminConfig, ConfigError> {
        let d = AdminConfig::default();
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
            token: None,
            trust_loopback: a.trust_loopback.unwrap_or(d.trust_loopback),
        };
        if admin.max_conns == 0 {
            return Err(ck.err("admin.max_conns", "must be at least 1"));
        }
        if admin.header_timeout.is_zero() {
            return Err(ck.err("admin.header_timeout", "must be greater than 0s"));
        }
        Ok(admin)
    }

    /// What runs after a reload to `new`: the socket and its connection slots as they
    /// were started (`bind`, `max_conns`, `probe_conns`, `header_timeout`), and what is read
    /// per request or per signal as `new` says, so a leaked token rotated in the file stops
    /// working at the reload, not at the next restart.
    pub fn reloaded(&self, new: &AdminConfig) -> AdminConfig {
        AdminConfig {
            token_file: new.token_file.clone(),
            token: new.token.clone(),
            trust_loopback: new.trust_loopback,
            drain_delay: new.drain_delay,
            ..self.clone()
        }
    }

    /// The keys that differ from `other` and that a reload applies at once (the token's
    /// content counts as `token`, never printed).
    pub fn live_changes(&self, other: &AdminConfig) -> Vec<&'static str> {
        [
            (
                self.token != other.token || self.token_file != other.token_file,
                "token",
            ),
            (
                self.trust_loopback != other.trust_loopback,
                "trust_loopback",
            ),
            (self.drain_delay != other.drain_delay, "drain_delay"),
        ]
        .into_iter()
        .filter_map(|(c, k)| c.then_some(k))
        .collect()
    }

    /// The keys that differ from `other` and wait for the next restart: the socket and its
    /// slots are made once, at start.
    pub fn restart_changes(&self, other: &AdminConfig) -> Vec<&'static str> {
        [
            (self.bind != other.bind, "bind"),
            (self.max_conns != other.max_conns, "max_conns"),
            (self.probe_conns != other.probe_conns, "probe_conns"),
            (
                self.header_timeout != other.header_timeout,
                "header_timeout",
            ),
        ]
        .into_iter()
        .filter_map(|(c, k)| c.then_some(k))
        .collect()
    }
}

/// Two lines: the endpoint, and who may use its private paths.
impl fmt::Display for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "admin: {}, max_conns {} (+{} for probes), header_timeout {}, drain_delay {}",
            self.bind.map_or("off".into(), |b| b.to_string()),
            self.max_conns,
            self.probe_conns,
            dur(self.header_timeout),
            dur(self.drain_delay)
        )?;
        let token = self.token.as_ref().map(|t| t.source.to_string());
        write!(
            f,
            "  /sources, /config, POST /reload: {}",
            match (token, self.trust_loopback) {
                (Some(src), true) => format!("Bearer token from the {src}, or a loopback client"),
                (Some(src), false) => format!("Bearer token from the {src} only"),
                (None, true) => "loopback clients only (no token set)".to_string(),
                (None, false) => "nobody (no token set, loopback not trusted)".to_string(),
            }
        )
    }
}
