//! `[runtime]`: the tokio runtime's worker threads. Read at start only.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::file::RawDuration;
use super::{Checker, ConfigError, dur};
use crate::turn::{MAX_SLICE, MIN_SLICE};

/// The turn a worker asks the kernel for (`crate::turn`): the kernel's shortest, so the
/// deadline a yield pushes back moves by a tenth of a millisecond, not a default slice's 1-3.
pub const DEFAULT_SLICE: Duration = MIN_SLICE;

/// More worker threads than this is a typo, not a machine.
pub const MAX_WORKERS: u32 = 1_024;

/// `[runtime]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub workers: Option<u32>,
    pub per_worker: Option<bool>,
    pub slice: Option<RawDuration>,
}

/// `[runtime]`: read at start only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuntimeConfig {
    /// Threads that run connections; `None` = one per CPU this process may use (the
    /// cgroup's CPU quota counts, so a sidecar limited to one CPU gets one).
    pub workers: Option<u32>,
    /// Each worker thread runs its own event loop and keeps the connections it accepted
    /// (`crate::shards`), as HAProxy's threads do (the default); off, the workers share one
    /// work-stealing scheduler, which hands a busy thread's connections to an idle one.
    pub per_worker: bool,
    /// How long a worker thread asks the kernel to run at a time, and with it, that it hands
    /// its core on before sleeping (`crate::turn`); zero: the kernel's turns, no hand-on.
    pub slice: Duration,
}

impl RuntimeConfig {
    pub(super) fn from_raw(ck: &Checker<'_>, raw: &RawRuntime) -> Result<Self, ConfigError> {
        let workers = match raw.workers {
            None | Some(0) => None,
            Some(n) if n > MAX_WORKERS => {
                return Err(ck.err(
                    "runtime.workers",
                    format!("{n} is more than {MAX_WORKERS}; 0 means one per CPU"),
                ));
            }
            Some(n) => Some(n),
        };
        let slice = raw.slice.map_or(DEFAULT_SLICE, |d| d.0);
        if !slice.is_zero() && !(MIN_SLICE..=MAX_SLICE).contains(&slice) {
            return Err(ck.err(
                "runtime.slice",
                format!(
                    "{} is outside the kernel's {}..{}; \"0s\" leaves the kernel's own",
                    dur(slice),
                    dur(MIN_SLICE),
                    dur(MAX_SLICE)
                ),
            ));
        }
        Ok(RuntimeConfig {
            workers,
            per_worker: raw.per_worker.unwrap_or(true),
            slice,
        })
    }

    /// The worker count in force: the configured one, or one per usable CPU.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl fmt::Display for RuntimeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.workers {
            Some(1) => write!(f, "runtime: 1 worker thread"),
            Some(n) => write!(f, "runtime: {n} worker threads"),
            None => write!(
                f,
                "runtime: one worker thread per usable CPU ({} here)",
                self.worker_threads()
            ),
        }?;
        if !self.per_worker {
            write!(
                f,
                ", sharing one work-stealing scheduler (per_worker = false)"
            )?;
        } else if self.worker_threads() > 1 {
            write!(
                f,
                ", each with its own event loop and listening socket (SO_REUSEPORT)"
            )?;
        }
        if self.slice.is_zero() {
            write!(f, "; the kernel's turns (slice = \"0s\")")
        } else {
            write!(
                f,
                "; {} turns, each worker yielding its core before it sleeps",
                dur(self.slice)
            )
        }
    }
}
