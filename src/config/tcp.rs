//! `[tcp]`: socket options applied to client and backend sockets alike.
//!
//! Every value is held to the kernel's own bounds here: past them setsockopt says EINVAL,
//! which would fail every listen and every backend connect at run time instead of at
//! `halfguard check`.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::file::RawDuration;
use super::{Checker, ConfigError, dur, nonzero};

/// Accept queue length asked of the kernel (capped by `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: u32 = 4_096;
/// Unsent bytes the kernel queues toward one client (`TCP_NOTSENT_LOWAT`, set on the
/// listening socket and inherited by every accepted one). Without it a client that stops
/// reading has its send buffer autotuned up to `tcp_wmem`'s maximum (4 MB): 128 kB bounds
/// what halfguard queues for it, while a client that reads still gets the whole window in
/// flight (only bytes not yet sent count) and a write wakes halfguard once a half is gone.
pub const DEFAULT_NOTSENT_LOWAT: u32 = 128 * 1024;
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
    pub notsent_lowat: Option<u32>,
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
    /// `TCP_NOTSENT_LOWAT` toward clients, in bytes; 0 leaves the kernel's default.
    pub notsent_lowat: u32,
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
            notsent_lowat: DEFAULT_NOTSENT_LOWAT,
        }
    }
}

impl TcpConfig {
    pub(super) fn from_raw(ck: &Checker<'_>, t: &RawTcp) -> Result<TcpConfig, ConfigError> {
        let d = TcpConfig::default();
        let tcp = TcpConfig {
            backlog: t.backlog.unwrap_or(d.backlog),
            nodelay: t.nodelay.unwrap_or(d.nodelay),
            keepalive_idle: t.keepalive_idle.map_or(d.keepalive_idle, |x| nonzero(x.0)),
            keepalive_interval: t.keepalive_interval.map_or(d.keepalive_interval, |x| x.0),
            keepalive_count: t.keepalive_count.unwrap_or(d.keepalive_count),
            user_timeout: t.user_timeout.map_or(d.user_timeout, |x| nonzero(x.0)),
            splice: t.splice.unwrap_or(d.splice),
            notsent_lowat: t.notsent_lowat.unwrap_or(d.notsent_lowat),
        };
        if tcp.backlog == 0 {
            return Err(ck.err("tcp.backlog", "must be at least 1"));
        }
        if tcp.keepalive_idle.is_some() {
            tcp.check_keepalive(ck)?;
        }
        if let Some(ut) = tcp.user_timeout
            && ut > MAX_USER_TIMEOUT
        {
            return Err(ck.err(
                "tcp.user_timeout",
                format!(
                    "{} is more than the kernel allows (\"2147483647ms\", about 24.8 days)",
                    dur(ut)
                ),
            ));
        }
        Ok(tcp)
    }

    /// Keepalive is on: its three values must be what the kernel takes.
    fn check_keepalive(&self, ck: &Checker<'_>) -> Result<(), ConfigError> {
        if self.keepalive_interval < Duration::from_secs(1) {
            return Err(ck.err(
                "tcp.keepalive_interval",
                "the kernel counts it in whole seconds: at least \"1s\"",
            ));
        }
        if self.keepalive_idle < Some(Duration::from_secs(1)) {
            return Err(ck.err(
                "tcp.keepalive_idle",
                "the kernel counts it in whole seconds: at least \"1s\" (or \"0s\" for off)",
            ));
        }
        if self.keepalive_count == 0 {
            return Err(ck.err("tcp.keepalive_count", "must be at least 1"));
        }
        if self.keepalive_count > MAX_KEEPALIVE_COUNT {
            return Err(ck.err(
                "tcp.keepalive_count",
                format!(
                    "{} is more than the kernel allows ({MAX_KEEPALIVE_COUNT})",
                    self.keepalive_count
                ),
            ));
        }
        for (key, v) in [
            (
                "tcp.keepalive_idle",
                self.keepalive_idle.unwrap_or_default(),
            ),
            ("tcp.keepalive_interval", self.keepalive_interval),
        ] {
            if v > MAX_KEEPALIVE_TIME {
                return Err(ck.err(
                    key,
                    format!(
                        "{} is more than the kernel allows (\"32767s\", about 9 hours)",
                        dur(v)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Valid, but probably not what the operator means.
    pub(super) fn warning(&self) -> Option<String> {
        let (idle, ut) = (self.keepalive_idle?, self.user_timeout?);
        let total = idle + self.keepalive_interval * self.keepalive_count;
        (ut < total).then(|| {
            format!(
                "tcp.user_timeout ({}) is below keepalive_idle + keepalive_interval x keepalive_count ({}): \
                 Linux then ends an idle connection after one unanswered keepalive probe, \
                 whatever keepalive_count says",
                dur(ut),
                dur(total)
            )
        })
    }
}

impl fmt::Display for TcpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tcp: backlog {}, nodelay {}, keepalive {}, user_timeout {}, splice {}, notsent_lowat {}",
            self.backlog,
            self.nodelay,
            self.keepalive_idle.map_or("off".into(), |i| format!(
                "idle {} interval {} count {}",
                dur(i),
                dur(self.keepalive_interval),
                self.keepalive_count
            )),
            self.user_timeout.map_or("kernel default".into(), dur),
            if self.splice { "on" } else { "off" },
            if self.notsent_lowat == 0 {
                "kernel default".to_string()
            } else {
                format!("{} B", self.notsent_lowat)
            }
        )
    }
}
