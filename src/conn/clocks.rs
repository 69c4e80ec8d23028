//! The clocks, as a pure function of a connection's progress.
//!
//! A clock measures lack of progress, so what it says follows from a few stamps (when a
//! byte last moved, when a side sent FIN, the client's current burst, since when bytes wait
//! for a peer) and the policy: no timer is reset per read. The connection's phases call
//! [`half_open_due`] and [`open_due`] each turn, sleep until the earliest answer, and act on
//! it; the kernel send-queue look that may put an expiry off lives with the pump, since it
//! asks the kernel. Unit tests drive these functions with tokio's paused clock.

use std::time::Duration;

use tokio::time::Instant;

use super::pump::{BURST_GAP, Burst, Side};
use crate::config::{PressureConfig, Timeouts};
use crate::stats::Timeout;

/// With bytes in flight at a clock's expiry, the kernel send queues are looked at this often
/// until the peer's drain can be judged over a window
/// ([`crate::config::SLOW_READER_WINDOW`]); also how soon a request burst that paused at its
/// deadline is looked at again. How long in all a clock may be put off is the listener's
/// `timeouts.slow_reader_max`: a reader at 2 kB/s frees too little of a send buffer the
/// kernel autotuned to megabytes for the pump to write again (a socket is writable once half
/// its queue is free), so its clocks do run out and stay out while it reads.
pub const RECHECK: Duration = Duration::from_secs(1);
/// How often an OPEN connection weighs its progress against `min_rate`.
pub const STALL_WINDOW: Duration = Duration::from_secs(1);
/// The first look comes sooner: a flood of connections that trickle fills a listener at once,
/// and they must be evictable before legit newcomers are refused for long. An ordinary
/// exchange is over before it.
pub const FIRST_STALL_CHECK: Duration = Duration::from_millis(250);

/// What the clocks read from a listener's policy.
#[derive(Clone, Copy, Debug)]
pub struct Rules<'a> {
    pub timeouts: &'a Timeouts,
    pub pressure: &'a PressureConfig,
    /// `limits.min_rate`: bytes per second that count as progress.
    pub min_rate: u32,
    /// `limits.mode = "observe"`: a clock that ran out is counted, then disarmed.
    pub observe: bool,
}

impl Rules<'_> {
    /// The silent clock, shortened under pressure.
    pub fn first_byte(&self, pressure: bool) -> Duration {
        shortened(self.timeouts.first_byte, pressure, self.pressure.first_byte)
    }

    /// The half-closed clock, shortened under pressure.
    pub fn half_closed(&self, pressure: bool) -> Duration {
        shortened(
            self.timeouts.half_closed,
            pressure,
            self.pressure.half_closed,
        )
    }

    /// The idle clock, shortened under pressure.
    pub fn idle(&self, pressure: bool) -> Duration {
        shortened(self.timeouts.idle, pressure, self.pressure.idle)
    }

    /// When the request clock ends the client's `burst` (before the backend's first byte):
    /// the allowance, plus a second per `min_rate` bytes, within `request_max`. `None` when
    /// the clock is off.
    pub fn request_deadline(&self, pressure: bool, burst: Burst) -> Option<Instant> {
        let mut allow = self.timeouts.request?;
        if pressure {
            allow = allow.min(self.pressure.request);
        }
        if self.min_rate > 0 {
            allow += Duration::from_secs_f64(burst.bytes as f64 / f64::from(self.min_rate));
        }
        if let Some(max) = self.timeouts.request_max {
            allow = allow.min(max);
        }
        Some(burst.start + allow)
    }

    /// When `max_lifetime` ends a connection accepted at `accepted`, if it is set.
    pub fn lifetime(&self, accepted: Instant) -> Option<(Instant, Timeout)> {
        self.timeouts
            .max_lifetime
            .map(|l| (accepted + l, Timeout::MaxLifetime))
    }
}

fn shortened(t: Duration, pressure: bool, under_pressure: Duration) -> Duration {
    if pressure { t.min(under_pressure) } else { t }
}

/// Clocks that observe mode already counted for this connection, and so no longer arms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed(u16);

impl Observed {
    pub fn has(self, t: Timeout) -> bool {
        self.0 & (1 << t as u16) != 0
    }
    pub fn set(&mut self, t: Timeout) {
        self.0 |= 1 << t as u16;
    }
}

/// The earliest of the clocks that are armed: those not already observed, when observing.
struct Earliest {
    observing: bool,
    observed: Observed,
    best: Option<(Instant, Timeout)>,
}

impl Earliest {
    fn new(rules: &Rules<'_>, observed: Observed) -> Earliest {
        Earliest {
            observing: rules.observe,
            observed,
            best: None,
        }
    }

    fn arm(&mut self, c: Option<(Instant, Timeout)>) {
        if let Some((at, t)) = c
            && !(self.observing && self.observed.has(t))
            && self.best.is_none_or(|(b, _)| at < b)
        {
            self.best = Some((at, t));
        }
    }
}

/// HALF_OPEN: the first-byte clock and `max_lifetime`, whichever comes first.
pub fn half_open_due(
    rules: &Rules<'_>,
    pressure: bool,
    observed: Observed,
    accepted: Instant,
) -> Option<(Instant, Timeout)> {
    let mut e = Earliest::new(rules, observed);
    e.arm(Some((
        accepted + rules.first_byte(pressure),
        Timeout::FirstByte,
    )));
    e.arm(rules.lifetime(accepted));
    e.best
}

/// What an OPEN or HALF_CLOSED connection's pump has recorded.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// The last time a byte moved either way.
    pub last_activity: Instant,
    /// Who sent FIN, and when.
    pub closed: Option<(Side, Instant)>,
    /// After a FIN: the last time a byte moved in the direction still open.
    pub open_direction_progress: Instant,
    /// The client's current burst, while the server has said nothing.
    pub request_burst: Option<Burst>,
    /// Since when some direction has bytes for a peer that takes none.
    pub stalled_since: Option<Instant>,
}

/// What the clocks say at one turn of an OPEN or HALF_CLOSED connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Due {
    /// The earliest clock and when it runs out (at or before now: it has).
    pub clock: Option<(Instant, Timeout)>,
    /// When to look at a request burst again, though no clock runs out then.
    pub request_wake: Option<Instant>,
    /// Progress moved the clocks past an extension by itself: the extension is over.
    pub extension_over: bool,
}

/// OPEN and HALF_CLOSED: the idle clock (or, after a FIN, the half-closed one, counted from
/// the later of the FIN and the last progress in the direction still open), write-stall,
/// the request clock, and `max_lifetime`. `extended`: an expiry the kernel send-queue look
/// put off until then (never `max_lifetime`'s or the request clock's).
pub fn open_due(
    rules: &Rules<'_>,
    pressure: bool,
    observed: Observed,
    accepted: Instant,
    p: &Progress,
    extended: Option<Instant>,
    now: Instant,
) -> Due {
    let mut e = Earliest::new(rules, observed);
    let t = rules.timeouts;
    // The request clock: the client's burst before the backend's first byte. A burst still
    // going after its allowance ends the connection; one that paused before it (the client
    // waits for the backend) is looked at again soon, in case it resumes.
    let mut request_wake = None;
    if p.closed.is_none()
        && let Some(burst) = p.request_burst
        && let Some(deadline) = rules.request_deadline(pressure, burst)
    {
        if burst.last > deadline {
            e.arm(Some((now, Timeout::Request)));
        } else if deadline > now {
            request_wake = Some(deadline);
        } else if now.saturating_duration_since(burst.last) < BURST_GAP {
            request_wake = Some(now + RECHECK);
        } else {
            // The burst is over; a new one cannot run out before a whole allowance.
            request_wake = Some(now + t.request.unwrap_or(RECHECK).max(RECHECK));
        }
    }
    match p.closed {
        None => e.arm(Some((
            p.last_activity + rules.idle(pressure),
            Timeout::Idle,
        ))),
        Some((_, at)) => {
            let since = p.open_direction_progress.max(at);
            e.arm(Some((
                since + rules.half_closed(pressure),
                Timeout::HalfClosed,
            )));
        }
    }
    e.arm(
        p.stalled_since
            .map(|s| (s + t.write_stall, Timeout::WriteStall)),
    );
    let mut extension_over = false;
    if let (Some(ext), Some((at, c))) = (extended, e.best) {
        if at > now {
            extension_over = true;
        } else {
            e.best = Some((at.max(ext), c));
        }
    }
    e.arm(rules.lifetime(accepted));
    Due {
        clock: e.best,
        request_wake,
        extension_over,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            idle: ms(30_000),
            half_closed: ms(5_000),
            write_stall: ms(10_000),
            request: Some(ms(10_000)),
            request_max: None,
            max_lifetime: None,
            ..Timeouts::default()
        }
    }

    fn pressure() -> PressureConfig {
        PressureConfig {
            first_byte: ms(2_000),
            half_closed: ms(1_000),
            request: ms(3_000),
            idle: ms(4_000),
            ..PressureConfig::default()
        }
    }

    fn rules<'a>(t: &'a Timeouts, p: &'a PressureConfig) -> Rules<'a> {
        Rules {
            timeouts: t,
            pressure: p,
            min_rate: 500,
            observe: false,
        }
    }

    fn idle_since(at: Instant) -> Progress {
        Progress {
            last_activity: at,
            closed: None,
            open_direction_progress: at,
            request_burst: None,
            stalled_since: None,
        }
    }

    /// The open clocks of a connection accepted at `start`, nothing observed yet.
    fn open_at(
        r: &Rules<'_>,
        pressure: bool,
        start: Instant,
        p: &Progress,
        extended: Option<Instant>,
        now: Instant,
    ) -> Due {
        open_due(r, pressure, Observed::default(), start, p, extended, now)
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_clock_counts_from_the_last_byte_and_pressure_shortens_it() {
        let (t, pr) = (timeouts(), pressure());
        let r = rules(&t, &pr);
        let start = Instant::now();
        advance(ms(7_000)).await;
        let p = idle_since(Instant::now());
        let now = Instant::now();
        let due = open_at(&r, false, start, &p, None, now);
        assert_eq!(due.clock, Some((now + ms(30_000), Timeout::Idle)));
        let due = open_at(&r, true, start, &p, None, now);
        assert_eq!(due.clock, Some((now + ms(4_000), Timeout::Idle)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_half_closed_clock_starts_at_the_fin_or_later_progress_never_before() {
        let (t, pr) = (timeouts(), pressure());
        let r = rules(&t, &pr);
        let start = Instant::now();
        // Bytes moved at 1 s, FIN at 3 s: the clock counts from the FIN.
        let moved = start + ms(1_000);
        advance(ms(3_000)).await;
        let fin = Instant::now();
        let mut p = Progress {
            closed: Some((Side::Client, fin)),
            ..idle_since(moved)
        };
        p.open_direction_progress = moved;
        let due = open_at(&r, false, start, &p, None, fin);
        assert_eq!(due.clock, Some((fin + ms(5_000), Timeout::HalfClosed)));
        // The open direction moves at 6 s: from then.
        advance(ms(3_000)).await;
        p.open_direction_progress = Instant::now();
        let due = open_at(&r, false, start, &p, None, Instant::now());
        assert_eq!(
            due.clock,
            Some((Instant::now() + ms(5_000), Timeout::HalfClosed))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_earns_a_second_per_min_rate_bytes_then_runs_out() {
        let (t, pr) = (timeouts(), pressure());
        let r = rules(&t, &pr);
        let start = Instant::now();
        // 1000 bytes so far: 10 s + 2 s of allowance.
        let mut burst = Burst {
            start,
            bytes: 1000,
            last: start,
        };
        let mut p = Progress {
            request_burst: Some(burst),
            ..idle_since(start)
        };
        let due = open_at(&r, false, start, &p, None, start);
        assert_eq!(due.request_wake, Some(start + ms(12_000)));
        assert_ne!(due.clock.map(|c| c.1), Some(Timeout::Request));
        // Still trickling past the deadline: the request clock runs out now.
        advance(ms(12_500)).await;
        let now = Instant::now();
        burst.last = now;
        burst.bytes += 10;
        p.request_burst = Some(burst);
        p.last_activity = now;
        let due = open_at(&r, false, start, &p, None, now);
        assert_eq!(due.clock, Some((now, Timeout::Request)));
        // Under pressure the allowance is 3 s: the same burst ran out long ago.
        let due = open_at(&r, true, start, &p, None, now);
        assert_eq!(due.clock, Some((now, Timeout::Request)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_paused_before_its_deadline_is_not_cut() {
        let (t, pr) = (timeouts(), pressure());
        let r = rules(&t, &pr);
        let start = Instant::now();
        // A whole request at once, then the client waits (a long poll).
        let burst = Burst {
            start,
            bytes: 300,
            last: start,
        };
        let p = Progress {
            request_burst: Some(burst),
            ..idle_since(start)
        };
        advance(ms(25_000)).await;
        let now = Instant::now();
        let due = open_at(&r, false, start, &p, None, now);
        assert_eq!(due.clock.map(|c| c.1), Some(Timeout::Idle));
        assert!(due.clock.is_some_and(|c| c.0 > now));
        assert_eq!(due.request_wake, Some(now + ms(10_000)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_extension_puts_off_an_expiry_but_never_the_lifetime() {
        let mut t = timeouts();
        t.max_lifetime = Some(ms(40_000));
        let pr = pressure();
        let r = rules(&t, &pr);
        let start = Instant::now();
        advance(ms(31_000)).await;
        let now = Instant::now();
        let p = idle_since(start);
        // Idle ran out at 30 s; the kernel look put it off to now + 1 s.
        let due = open_at(&r, false, start, &p, Some(now + ms(1_000)), now);
        assert_eq!(due.clock, Some((now + ms(1_000), Timeout::Idle)));
        assert!(!due.extension_over);
        // Progress moved idle past now by itself: the extension is over.
        let fresh = idle_since(now);
        let due = open_at(&r, false, start, &fresh, Some(now + ms(1_000)), now);
        assert!(due.extension_over);
        // The lifetime is not extended.
        advance(ms(9_500)).await;
        let now = Instant::now();
        let due = open_at(&r, false, start, &p, Some(now + ms(5_000)), now);
        assert_eq!(due.clock, Some((start + ms(40_000), Timeout::MaxLifetime)));
    }

    #[tokio::test(start_paused = true)]
    async fn observe_mode_disarms_a_clock_it_already_counted() {
        let (t, pr) = (timeouts(), pressure());
        let mut r = rules(&t, &pr);
        r.observe = true;
        let start = Instant::now();
        let mut seen = Observed::default();
        assert_eq!(
            half_open_due(&r, false, seen, start),
            Some((start + t.first_byte, Timeout::FirstByte))
        );
        seen.set(Timeout::FirstByte);
        assert_eq!(half_open_due(&r, false, seen, start), None);
        // Pressure shortens the silent clock.
        r.observe = false;
        assert_eq!(
            half_open_due(&r, true, seen, start),
            Some((start + ms(2_000).min(t.first_byte), Timeout::FirstByte))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_stall_comes_before_idle_when_sooner() {
        let (t, pr) = (timeouts(), pressure());
        let r = rules(&t, &pr);
        let start = Instant::now();
        let p = Progress {
            stalled_since: Some(start),
            ..idle_since(start)
        };
        let due = open_at(&r, false, start, &p, None, start);
        assert_eq!(due.clock, Some((start + ms(10_000), Timeout::WriteStall)));
    }
}
