//! The raw shape of the TOML file, exactly as an operator writes it: the whole file here,
//! each section's table in the section's own file (`limits.rs`: `RawLimits`, ...), and the
//! one value type they share, [`RawDuration`].
//!
//! Every struct refuses unknown keys, so a typo (`frist_byte`) is an error that names the key
//! instead of a silently ignored line. Every value is optional here: defaults and the
//! per-listener overrides are applied by each section's `from_raw`, which is also where the
//! meaning of each value is checked.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::{
    RawAdmin, RawCluster, RawKernel, RawLimits, RawListener, RawLog, RawPool, RawPressure,
    RawRuntime, RawTcp, RawTimeouts,
};

/// No duration in the config may be longer than a year (humantime's `"1y"`, 365.25 days):
/// deadlines are `now + clock`, and one far enough out overflows the monotonic clock, which
/// would panic every connection.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

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

/// A duration written the way operators write them: `"250ms"`, `"5s"`, `"5m"`.
///
/// A bare number is refused on purpose: `first_byte = 5` could mean seconds or milliseconds,
/// and guessing wrong by a factor of 1000 is how a proxy ends up holding sockets for hours.
/// So is anything over [`MAX_DURATION`]: `now + clock` must never overflow.
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
                if d > MAX_DURATION {
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
