//! Pressure mode: shorter clocks while a listener is close to one of its caps.
//!
//! Like Envoy's overload manager `reduce_timeouts`, but on our own counts: above
//! `high_water` x a cap the `first_byte` and `half_closed` clocks shrink to their `[pressure]`
//! values, for new and existing connections; they grow back only when every count is under
//! `low_water` x its cap, so the mode does not flap at the threshold.
//!
//! Memory is the other input: the server reads the kernel's and the cgroup's memory once a
//! second (`crate::memory`) and hands every listener the verdict ([`PressureGate::set_memory`]);
//! the guard never reads `/proc` itself. The mode is on while either input is.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use crate::bell::Bell;
use crate::config::{Limits, PressureConfig};

/// Tracks the mode for one listener and tells connection tasks when it flips.
#[derive(Debug)]
pub(crate) struct PressureGate {
    /// The inputs on now ([`BY_CONNS`], [`BY_MEMORY`]); the mode is on while any is. One
    /// atomic for both, so exactly one caller sees the mode flip and rings the bell.
    on: AtomicU8,
    /// Per count (conns, half-open, half-closed): above this, pressure starts.
    high: [AtomicUsize; 3],
    /// Per count: pressure ends once every count is at or below this.
    low: [AtomicUsize; 3],
    /// The listener's bell: rung when the mode flips, and by the listener itself on reload
    /// and at the end of the drain.
    bell: Bell,
}

/// The listener's counts are above their high-water mark (until all are below low water).
const BY_CONNS: u8 = 1;
/// Memory is short, as the server last read it.
const BY_MEMORY: u8 = 2;

impl PressureGate {
    pub fn new(limits: &Limits, p: &PressureConfig) -> PressureGate {
        let gate = PressureGate {
            on: AtomicU8::new(0),
            high: Default::default(),
            low: Default::default(),
            bell: Bell::default(),
        };
        gate.set(limits, p);
        gate
    }

    /// Sets the thresholds (at start and on reload).
    pub fn set(&self, limits: &Limits, p: &PressureConfig) {
        let caps = [
            limits.max_conns,
            limits.max_half_open,
            limits.max_half_closed,
        ];
        for (i, c) in caps.into_iter().enumerate() {
            let at = |f: f64| (f64::from(c) * f).floor() as usize;
            self.high[i].store(at(p.high_water), Ordering::Relaxed);
            self.low[i].store(at(p.low_water), Ordering::Relaxed);
        }
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed) != 0
    }

    /// Is memory one of the reasons the mode is on?
    pub fn by_memory(&self) -> bool {
        self.on.load(Ordering::Relaxed) & BY_MEMORY != 0
    }

    pub fn bell(&self) -> &Bell {
        &self.bell
    }

    /// Turns `input` on; rings the bell if the mode was off. True if this call set it.
    fn raise(&self, input: u8) -> bool {
        let old = self.on.fetch_or(input, Ordering::AcqRel);
        if old == 0 {
            self.bell.ring();
        }
        old & input == 0
    }

    /// Turns `input` off; rings the bell if that ends the mode. True if this call cleared it.
    fn lower(&self, input: u8) -> bool {
        let old = self.on.fetch_and(!input, Ordering::AcqRel);
        if old == input {
            self.bell.ring();
        }
        old & input != 0
    }

    /// The memory input, as the server's upkeep last read it (it logs the flips, once for
    /// every listener). A load when nothing changes.
    pub fn set_memory(&self, short: bool) {
        if short != self.by_memory() {
            if short {
                self.raise(BY_MEMORY);
            } else {
                self.lower(BY_MEMORY);
            }
        }
    }

    /// Re-evaluates the counts' input. A few loads and compares; the bell rings only when
    /// the mode flips.
    pub fn update(&self, counts: [usize; 3]) {
        let on = self.on.load(Ordering::Relaxed) & BY_CONNS != 0;
        if !on
            && counts
                .iter()
                .zip(&self.high)
                .any(|(&c, h)| c > h.load(Ordering::Relaxed))
        {
            if self.raise(BY_CONNS) {
                tracing::warn!(
                    conns = counts[0],
                    half_open = counts[1],
                    half_closed = counts[2],
                    "pressure mode on: first_byte and half_closed clocks shortened"
                );
            }
        } else if on
            && counts
                .iter()
                .zip(&self.low)
                .all(|(&c, l)| c <= l.load(Ordering::Relaxed))
            && self.lower(BY_CONNS)
        {
            if self.is_on() {
                tracing::info!("connections back under low water; pressure stays on for memory");
            } else {
                tracing::info!("pressure mode off: clocks back to normal");
            }
        }
    }
}
