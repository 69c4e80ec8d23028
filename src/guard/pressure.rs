//! Pressure mode: shorter clocks while a listener is close to one of its caps.
//!
//! Like Envoy's overload manager `reduce_timeouts`, but on our own counts: above
//! `high_water` x a cap the `first_byte` and `half_closed` clocks shrink to their `[pressure]`
//! values, for new and existing connections; they grow back only when every count is under
//! `low_water` x its cap, so the mode does not flap at the threshold.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::bell::Bell;
use crate::config::{Limits, PressureConfig};

/// Tracks the mode for one listener and tells connection tasks when it flips.
#[derive(Debug)]
pub(crate) struct PressureGate {
    on: AtomicBool,
    /// Per count (conns, half-open, half-closed): above this, pressure starts.
    high: [AtomicUsize; 3],
    /// Per count: pressure ends once every count is at or below this.
    low: [AtomicUsize; 3],
    /// The listener's bell: rung when the mode flips, and by the listener itself on reload
    /// and at the end of the drain.
    bell: Bell,
}

impl PressureGate {
    pub fn new(limits: &Limits, p: &PressureConfig) -> PressureGate {
        let gate = PressureGate {
            on: AtomicBool::new(false),
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
        self.on.load(Ordering::Relaxed)
    }

    pub fn bell(&self) -> &Bell {
        &self.bell
    }

    /// Re-evaluates the mode from the current counts. A few loads and compares; the bell
    /// rings only when the mode flips.
    pub fn update(&self, counts: [usize; 3]) {
        let on = self.is_on();
        if !on
            && counts
                .iter()
                .zip(&self.high)
                .any(|(&c, h)| c > h.load(Ordering::Relaxed))
        {
            if self
                .on
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.bell.ring();
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
            && self
                .on
                .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.bell.ring();
            tracing::info!("pressure mode off: clocks back to normal");
        }
    }
}
