//! `[[backends]]`: named pools of servers with balancing, health checks, a bounded queue and
//! PROXY protocol toward the servers. A listener's short `backends = ["host:port", ...]` is a
//! pool of its own, named after the listener, with these defaults.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::addr::ServerAddr;
use super::choice::choice;
use super::file::RawDuration;
use super::{Checker, ConfigError, dur};

/// HAProxy's defaults: a check every 2 s, up after 2 good ones, down after 3 bad ones.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// A server marked down by failed connects (passive health) gets no traffic this long,
/// unless active checks bring it back first.
pub const DEFAULT_COOLOFF: Duration = Duration::from_secs(10);
/// Names are resolved again this often; a name that stops resolving keeps its last address.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Clients that may wait for a server slot when every server is at its `max_conns`.
pub const DEFAULT_QUEUE_SIZE: u32 = 128;
/// How long a queued client waits at most (and never longer than `timeouts.connect`).
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);

/// One `[[backends]]` table: a named pool of servers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: Option<String>,
    #[serde(default)]
    pub servers: Vec<RawServer>,
    /// A [`Balance`] spelling.
    pub balance: Option<String>,
    pub queue_size: Option<u32>,
    pub queue_timeout: Option<RawDuration>,
    /// `"off"` or a [`ProxyVersion`] spelling.
    pub proxy_protocol: Option<String>,
    /// An [`OnDown`] spelling.
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

choice! {
    /// How a pool picks a server for a new connection.
    pub enum Balance {
        /// Weighted round robin.
        RoundRobin = "round-robin",
        /// The server with the fewest active connections per unit of weight.
        LeastConn = "least-conn",
        /// Two servers at random, the less loaded of them (power of two choices).
        RandomTwo = "random-two",
    }
}

choice! {
    /// PROXY protocol version sent to the servers (`"off"` in the file: none).
    pub enum ProxyVersion {
        /// The text header.
        V1 = "v1",
        /// The binary header.
        V2 = "v2",
    }
}

choice! {
    /// What happens to a server's open connections when it is marked down.
    pub enum OnDown {
        /// They carry on: a server that fails its checks may still serve what it has.
        Keep = "keep",
        /// They are aborted with RST, so clients retry elsewhere at once.
        Abort = "abort",
    }
}

/// One server as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `host:port`; a name is resolved at start and every `resolve_interval`.
    pub addr: ServerAddr,
    pub weight: u32,
    /// Concurrent connections to this server; 0 = no cap.
    pub max_conns: u32,
}

/// Active and passive health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Active checks on (passive marking always is).
    pub enabled: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Bytes written after connecting, if any.
    pub send: Option<Vec<u8>>,
    /// A prefix the reply must start with, if any.
    pub expect: Option<Vec<u8>>,
    /// Passive down time after `fall` consecutive failed connects or early resets.
    pub cooloff: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            send: None,
            expect: None,
            cooloff: DEFAULT_COOLOFF,
        }
    }
}

/// A validated pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    pub servers: Vec<ServerConfig>,
    pub balance: Balance,
    pub queue_size: u32,
    pub queue_timeout: Duration,
    pub proxy_protocol: Option<ProxyVersion>,
    pub on_down: OnDown,
    pub resolve_interval: Duration,
    pub health: HealthConfig,
}

impl PoolConfig {
    /// The pool behind a listener's short `backends = [...]` list: passive health only, as
    /// with nginx's or a bare HAProxy `server` line; declare a `[[backends]]` pool for active
    /// checks.
    pub fn short(name: &str, servers: Vec<ServerAddr>) -> PoolConfig {
        PoolConfig {
            name: name.to_string(),
            servers: servers
                .into_iter()
                .map(|addr| ServerConfig {
                    addr,
                    weight: 1,
                    max_conns: 0,
                })
                .collect(),
            balance: Balance::RoundRobin,
            queue_size: DEFAULT_QUEUE_SIZE,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            proxy_protocol: None,
            on_down: OnDown::Keep,
            resolve_interval: DEFAULT_RESOLVE_INTERVAL,
            health: HealthConfig {
                enabled: false,
                ..HealthConfig::default()
            },
        }
    }
}

impl PoolConfig {
    /// `backends[i]`. Its name is checked against the other pools' by the caller.
    pub(super) fn from_raw(
        ck: &Checker<'_>,
        raw: &RawPool,
        i: usize,
    ) -> Result<PoolConfig, ConfigError> {
        let at = |k: &str| format!("backends[{i}].{k}");
        let name = match raw.name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => return Err(ck.err(at("name"), "is required")),
        };
        if raw.servers.is_empty() {
            return Err(ck.err(at("servers"), "needs at least one { addr = \"host:port\" }"));
        }
        let servers = raw
            .servers
            .iter()
            .enumerate()
            .map(|(j, s)| ServerConfig::from_raw(ck, s, &at(&format!("servers[{j}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let d = PoolConfig::short(&name, Vec::new());
        let balance = ck.choice(raw.balance.as_deref(), at("balance"), d.balance)?;
        let proxy_protocol =
            ck.choice_or_off(raw.proxy_protocol.as_deref(), at("proxy_protocol"))?;
        let on_down = ck.choice(raw.on_down.as_deref(), at("on_down"), d.on_down)?;
        let health = HealthConfig::from_raw(ck, raw.health.as_ref(), &at("health"))?;
        let resolve_interval = raw.resolve_interval.map_or(d.resolve_interval, |x| x.0);
        if resolve_interval.is_zero() {
            return Err(ck.err(at("resolve_interval"), "must be greater than 0s"));
        }
        Ok(PoolConfig {
            name,
            servers,
            balance,
            queue_size: raw.queue_size.unwrap_or(d.queue_size),
            queue_timeout: raw.queue_timeout.map_or(d.queue_timeout, |x| x.0),
            proxy_protocol,
            on_down,
            resolve_interval,
            health,
        })
    }
}

impl ServerConfig {
    /// One `servers` entry, at key `at`.
    fn from_raw(ck: &Checker<'_>, s: &RawServer, at: &str) -> Result<ServerConfig, ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        let addr = (s.addr.as_deref())
            .ok_or_else(|| ck.err(key("addr"), "is required"))?
            .parse()
            .map_err(|r| ck.err(key("addr"), r))?;
        let weight = s.weight.unwrap_or(1);
        if weight == 0 || weight > 256 {
            return Err(ck.err(key("weight"), format!("{weight} is not in 1..=256")));
        }
        Ok(ServerConfig {
            addr,
            weight,
            max_conns: s.max_conns.unwrap_or(0),
        })
    }
}

impl HealthConfig {
    /// A declared pool's `health` table, at key `at`: active checks on unless told
    /// otherwise.
    fn from_raw(
        ck: &Checker<'_>,
        raw: Option<&RawHealth>,
        at: &str,
    ) -> Result<HealthConfig, ConfigError> {
        let d = HealthConfig::default();
        let none = RawHealth::default();
        let h = raw.unwrap_or(&none);
        let health = HealthConfig {
            enabled: h.enabled.unwrap_or(d.enabled),
            interval: h.interval.map_or(d.interval, |x| x.0),
            timeout: h.timeout.map_or(d.timeout, |x| x.0),
            rise: h.rise.unwrap_or(d.rise),
            fall: h.fall.unwrap_or(d.fall),
            send: h.send.clone().filter(|s| !s.is_empty()).map(unescape),
            expect: h.expect.clone().filter(|s| !s.is_empty()).map(unescape),
            cooloff: h.cooloff.map_or(d.cooloff, |x| x.0),
        };
        for (k, v) in [("interval", health.interval), ("timeout", health.timeout)] {
            if v.is_zero() {
                return Err(ck.err(format!("{at}.{k}"), "must be greater than 0s"));
            }
        }
        for (k, v) in [("rise", health.rise), ("fall", health.fall)] {
            if v == 0 {
                return Err(ck.err(format!("{at}.{k}"), "must be at least 1"));
            }
        }
        Ok(health)
    }
}

/// `addr`, then its weight and cap where they are not the defaults.
impl fmt::Display for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if self.weight != 1 {
            write!(f, " weight {}", self.weight)?;
        }
        if self.max_conns > 0 {
            write!(f, " max_conns {}", self.max_conns)?;
        }
        Ok(())
    }
}

/// Two lines: the pool, and its health checks.
impl fmt::Display for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(ToString::to_string).collect();
        writeln!(
            f,
            "pool {:?}: {} [{}]; queue {} for {}; proxy_protocol {}; on_down {}",
            self.name,
            self.balance.as_str(),
            servers.join(", "),
            self.queue_size,
            dur(self.queue_timeout),
            self.proxy_protocol.map_or("off", ProxyVersion::as_str),
            self.on_down.as_str()
        )?;
        write!(f, "{}", self.health)
    }
}

/// One line, indented under its pool.
impl fmt::Display for HealthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let active = if self.enabled {
            format!(
                "every {}, timeout {}, rise {}, fall {}{}",
                dur(self.interval),
                dur(self.timeout),
                self.rise,
                self.fall,
                if self.send.is_some() || self.expect.is_some() {
                    " (send/expect)"
                } else {
                    ""
                }
            )
        } else {
            "active checks off".into()
        };
        write!(
            f,
            "  health: {active}; passive: down after {} failures for {}",
            self.fall,
            dur(self.cooloff)
        )
    }
}

/// `\r`, `\n`, `\t`, `\\` and `\xNN` in health `send`/`expect`, so a TOML basic string can
/// carry a binary probe and a literal string can still say `\r\n`.
fn unescape(s: String) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let (byte, used) = match b[i + 1] {
                b'r' => (Some(b'\r'), 2),
                b'n' => (Some(b'\n'), 2),
                b't' => (Some(b'\t'), 2),
                b'\\' => (Some(b'\\'), 2),
                b'x' if i + 3 < b.len() => (
                    std::str::from_utf8(&b[i + 2..i + 4])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok()),
                    4,
                ),
                _ => (None, 1),
            };
            if let Some(byte) = byte {
                out.push(byte);
                i += used;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn health_probe_escapes() {
        assert_eq!(super::unescape(r"PING\r\n".into()), b"PING\r\n");
        assert_eq!(super::unescape(r"\x00\x01z\q".into()), b"\x00\x01z\\q");
    }
}
