//! `[pressure]`: shorter clocks while a listener is near one of its caps.
//!
//! A listener enters pressure mode when a per-listener count passes `high_water` of its cap
//! and leaves it when every count is back under `low_water`; the gap keeps it from flapping.
//! Every listener enters it as well while memory is short (`crate::memory`): the kernel's TCP
//! memory past `tcp_mem_high` of `tcp_mem`'s pressure value, or the cgroup's usage past
//! `memory_high` of its limit; it leaves below `tcp_mem_low` and `memory_low`.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::file::RawDuration;
use super::{Checker, ConfigError, dur};

/// Pressure mode starts when a per-listener count passes 80% of its cap...
pub const DEFAULT_HIGH_WATER: f64 = 0.8;
/// ...and ends when every count is back under 60%.
pub const DEFAULT_LOW_WATER: f64 = 0.6;
/// Memory pressure starts when the cgroup's usage (less its inactive file cache) passes 80%
/// of its limit: room left for a burst of socket buffers before the OOM killer picks a
/// process of the container, which may be halfguard...
pub const DEFAULT_MEMORY_HIGH: f64 = 0.8;
/// ...and ends back under 70%.
pub const DEFAULT_MEMORY_LOW: f64 = 0.7;
/// Memory pressure starts when the kernel's TCP memory passes 90% of `tcp_mem`'s pressure
/// value. A fraction of the kernel's own threshold rather than of its hard limit: past
/// the pressure value the kernel shrinks the buffers of every socket, a healthy client's
/// as much as a stalled one's, so halfguard sheds its stalled connections just before, to
/// keep the kernel from having to...
pub const DEFAULT_TCP_MEM_HIGH: f64 = 0.9;
/// ...and ends back under 75% of it, where the kernel's own default low value sits (Linux
/// sets `tcp_mem` to 3/4, 1 and 3/2 of its pressure value).
pub const DEFAULT_TCP_MEM_LOW: f64 = 0.75;
/// Under pressure a silent connection gets 2 s to speak.
pub const DEFAULT_PRESSURE_FIRST_BYTE: Duration = Duration::from_secs(2);
/// Under pressure a half-closed connection gets 5 s without progress.
pub const DEFAULT_PRESSURE_HALF_CLOSED: Duration = Duration::from_secs(5);
/// Under pressure a trickling client gets 3 s of allowance before the backend answers.
pub const DEFAULT_PRESSURE_REQUEST: Duration = Duration::from_secs(3);
/// Under pressure an OPEN connection with no byte either way for 30 s is ended.
pub const DEFAULT_PRESSURE_IDLE: Duration = Duration::from_secs(30);

/// `[pressure]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPressure {
    pub high_water: Option<f64>,
    pub low_water: Option<f64>,
    pub memory_high: Option<f64>,
    pub memory_low: Option<f64>,
    pub tcp_mem_high: Option<f64>,
    pub tcp_mem_low: Option<f64>,
    pub first_byte: Option<RawDuration>,
    pub half_closed: Option<RawDuration>,
    pub request: Option<RawDuration>,
    pub idle: Option<RawDuration>,
}

/// Shorter clocks while a listener is under pressure.
#[derive(Debug, Clone, PartialEq)]
pub struct PressureConfig {
    pub high_water: f64,
    pub low_water: f64,
    /// Fractions of the memory cgroup's limit (the tightest on the way to the root).
    pub memory_high: f64,
    pub memory_low: f64,
    /// Fractions of `net.ipv4.tcp_mem`'s pressure value (its second number).
    pub tcp_mem_high: f64,
    pub tcp_mem_low: f64,
    pub first_byte: Duration,
    pub half_closed: Duration,
    pub request: Duration,
    pub idle: Duration,
}

impl Default for PressureConfig {
    fn default() -> Self {
        PressureConfig {
            high_water: DEFAULT_HIGH_WATER,
            low_water: DEFAULT_LOW_WATER,
            memory_high: DEFAULT_MEMORY_HIGH,
            memory_low: DEFAULT_MEMORY_LOW,
            tcp_mem_high: DEFAULT_TCP_MEM_HIGH,
            tcp_mem_low: DEFAULT_TCP_MEM_LOW,
            first_byte: DEFAULT_PRESSURE_FIRST_BYTE,
            half_closed: DEFAULT_PRESSURE_HALF_CLOSED,
            request: DEFAULT_PRESSURE_REQUEST,
            idle: DEFAULT_PRESSURE_IDLE,
        }
    }
}

impl PressureConfig {
    pub(super) fn from_raw(ck: &Checker<'_>, p: &RawPressure) -> Result<Self, ConfigError> {
        let d = PressureConfig::default();
        let pressure = PressureConfig {
            high_water: p.high_water.unwrap_or(d.high_water),
            low_water: p.low_water.unwrap_or(d.low_water),
            memory_high: p.memory_high.unwrap_or(d.memory_high),
            memory_low: p.memory_low.unwrap_or(d.memory_low),
            tcp_mem_high: p.tcp_mem_high.unwrap_or(d.tcp_mem_high),
            tcp_mem_low: p.tcp_mem_low.unwrap_or(d.tcp_mem_low),
            first_byte: p.first_byte.map_or(d.first_byte, |x| x.0),
            half_closed: p.half_closed.map_or(d.half_closed, |x| x.0),
            request: p.request.map_or(d.request, |x| x.0),
            idle: p.idle.map_or(d.idle, |x| x.0),
        };
        for (key, v) in [
            ("pressure.high_water", pressure.high_water),
            ("pressure.low_water", pressure.low_water),
            ("pressure.memory_high", pressure.memory_high),
            ("pressure.memory_low", pressure.memory_low),
            ("pressure.tcp_mem_high", pressure.tcp_mem_high),
            ("pressure.tcp_mem_low", pressure.tcp_mem_low),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ck.err(key, format!("{v} is not a fraction in (0, 1]")));
            }
        }
        for (low_key, low, high_key, high) in [
            (
                "low_water",
                pressure.low_water,
                "high_water",
                pressure.high_water,
            ),
            (
                "memory_low",
                pressure.memory_low,
                "memory_high",
                pressure.memory_high,
            ),
            (
                "tcp_mem_low",
                pressure.tcp_mem_low,
                "tcp_mem_high",
                pressure.tcp_mem_high,
            ),
        ] {
            if low >= high {
                return Err(ck.err(
                    format!("pressure.{low_key}"),
                    format!("{low} must be below {high_key} ({high}) or pressure mode would flap"),
                ));
            }
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
        Ok(pressure)
    }
}

impl fmt::Display for PressureConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pressure: above {:.0}% of a cap until below {:.0}%, above {:.0}% of the memory cgroup's limit until below {:.0}%, above {:.0}% of tcp_mem's pressure value until below {:.0}%: first_byte {}, request {}, idle {}, half_closed {}",
            self.high_water * 100.0,
            self.low_water * 100.0,
            self.memory_high * 100.0,
            self.memory_low * 100.0,
            self.tcp_mem_high * 100.0,
            self.tcp_mem_low * 100.0,
            dur(self.first_byte),
            dur(self.request),
            dur(self.idle),
            dur(self.half_closed)
        )
    }
}
