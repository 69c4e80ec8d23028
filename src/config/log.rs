//! `[log]`: the level filter and the output format, and what `log.level` (and `RUST_LOG`)
//! may say.
//!
//! tracing's filter syntax takes any word as a target, so `"verbose"` or
//! `"halfgaurd=debug"` parse fine and then match nothing: the process runs silent, errors
//! included. halfguard logs only under its own crate name, so a filter is held to what can
//! match: levels, and `halfguard` or `halfguard::module` targets.

use std::fmt;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use super::choice::choice;
use super::{Checker, ConfigError};

/// The crate every halfguard event is logged under.
const TARGET: &str = "halfguard";

const LEVELS: &str = "off, error, warn, info, debug or trace";

/// `Ok` when `filter` is a level or a list of `level` and `halfguard[::module]=level`
/// directives; otherwise what is wrong with it, in words.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.trim().is_empty() {
        return Err(format!("is empty; give a level ({LEVELS})"));
    }
    for directive in filter.split(',').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        let (target, level) = match directive.rsplit_once('=') {
            Some((t, l)) => (Some(t.trim()), l.trim()),
            None => (None, directive),
        };
        if level.parse::<LevelFilter>().is_err() {
            return Err(match target {
                None => format!("{directive:?} is not a level ({LEVELS})"),
                Some(_) => format!("{directive:?}: {level:?} is not a level ({LEVELS})"),
            });
        }
        if let Some(t) = target {
            // A span filter (`target[span{field}]`) is tracing's; the target before it is ours.
            let name = t.split('[').next().unwrap_or(t).trim();
            if !name.is_empty() && name != TARGET && !name.starts_with("halfguard::") {
                return Err(format!(
                    "{directive:?}: halfguard logs nothing under {name:?}; targets are \
                     \"{TARGET}\" or \"{TARGET}::module\""
                ));
            }
        }
    }
    EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("{filter:?} is not a filter: {e}"))
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    /// A [`LogFormat`] spelling.
    pub format: Option<String>,
}

choice! {
    /// Log output format.
    pub enum LogFormat {
        /// For a person at a terminal.
        Pretty = "pretty",
        /// One JSON object a line, for a log pipeline.
        Json = "json",
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `halfguard=debug`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

impl LogConfig {
    pub(super) fn from_raw(ck: &Checker<'_>, raw: &RawLog) -> Result<LogConfig, ConfigError> {
        let d = LogConfig::default();
        let log = LogConfig {
            level: raw.level.clone().unwrap_or(d.level),
            format: ck.choice(raw.format.as_deref(), "log.format", d.format)?,
        };
        check_filter(&log.level).map_err(|r| ck.err("log.level", r))?;
        Ok(log)
    }
}

impl fmt::Display for LogConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "log: level {}, format {}",
            self.level,
            self.format.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::check_filter;

    #[test]
    fn levels_and_our_own_targets_pass_typos_do_not() {
        for ok in [
            "info",
            "WARN",
            "debug,halfguard::stats=trace",
            "halfguard=debug",
            "off",
        ] {
            assert!(check_filter(ok).is_ok(), "{ok}: {:?}", check_filter(ok));
        }
        for bad in [
            "verbose",
            "verbos",
            "halfgaurd=debug",
            "halfguard=loud",
            "",
            "info,hyper=debug",
        ] {
            assert!(check_filter(bad).is_err(), "{bad} passed");
        }
    }
}
