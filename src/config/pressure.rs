//! `[pressure]`: shorter clocks while a listener is near one of its caps.
//!
//! A listener enters pressure mode when a per-listener count passes `high_water` of its cap
//! and leaves it when every count is back under `low_water`; the gap keeps it from flapping.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::file::RawDuration;
use super::{Checker, ConfigError, dur};

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

impl PressureConfig {
    pub(super) fn from_raw(ck: &Checker<'_>, p: &RawPressure) -> Result<Self, ConfigError> {
        let d = PressureConfig::default();
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
        Ok(pressure)
    }
}

impl fmt::Display for PressureConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pressure: above {:.0}% of a cap until below {:.0}%: first_byte {}, request {}, idle {}, half_closed {}",
            self.high_water * 100.0,
            self.low_water * 100.0,
            dur(self.first_byte),
            dur(self.request),
            dur(self.idle),
            dur(self.half_closed)
        )
    }
}
