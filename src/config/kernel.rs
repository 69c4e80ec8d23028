//! `[kernel]`: watching the network namespace's kernel, and (with NET_ADMIN) defending it.
//!
//! The census counts the sockets on the listening ports; `enforce` installs halfguard's own
//! nftables table, whose per-source SYN rate, conntrack cap and ban set act before a
//! connection reaches the accept queue.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::file::RawDuration;
use super::{Checker, ConfigError, cap, dur, nonzero, rate};

/// Count the kernel's sockets every 5 s: cheap (one netlink dump), and fresh enough for a
/// dashboard.
pub const DEFAULT_CENSUS_INTERVAL: Duration = Duration::from_secs(5);

/// When a listener's per-source sets are full (a spoofed flood from more addresses than
/// `max_sources` within a few seconds), new sources share this many SYNs per second rather
/// than pass unlimited. SYN cookies keep answering the SYNs that pass.
pub const DEFAULT_UNTRACKED_SYN_RATE: u32 = 1000;

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

impl KernelConfig {
    pub(super) fn from_raw(ck: &Checker<'_>, k: &RawKernel) -> Result<Self, ConfigError> {
        let d = KernelConfig::default();
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
        Ok(kernel)
    }
}

impl fmt::Display for KernelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel: census {}; enforce {}",
            self.census_interval
                .map_or("off".into(), |i| format!("every {}", dur(i))),
            if self.enforce { "on" } else { "off" },
        )?;
        if self.enforce {
            write!(
                f,
                " (syn rate {}, ct count {}, untracked sources {}, ban after {} for {})",
                rate(self.syn_rate_per_source, Some(self.syn_burst_per_source)),
                cap(self.max_conns_per_source),
                rate(self.untracked_syn_rate, None),
                cap(self.ban_after),
                dur(self.ban_for)
            )?;
        }
        Ok(())
    }
}
