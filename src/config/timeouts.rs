//! `[timeouts]` and `[listeners.timeouts]`: the clocks of a connection's states.
//!
//! As with limits, a listener's table replaces single keys of the top-level one:
//! [`Timeouts::from_raw`] takes the `Timeouts` it overrides. See the state diagram in
//! README.md for which clock runs when.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::file::RawDuration;
use super::{Checker, ConfigError, dur, nonzero};

/// A backend that has not answered a SYN in 3 s is not going to.
pub const DEFAULT_CONNECT: Duration = Duration::from_secs(3);
/// A client that says nothing for 10 s after connecting is not a client (HAProxy's
/// documented inspect-delay pattern, linkerd's detect timeout).
pub const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(10);
/// No byte either way for an hour, Envoy's TCP proxy default: a connection that completed
/// exchanges and sits idle (a pool between requests, a pub/sub or LISTEN subscriber, an ssh
/// session, a tunnel, a websocket) costs little and must not be cut at five minutes; dead
/// peers are found by keepalive, and under pressure `pressure.idle` (30 s) sheds idle
/// connections first.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(3600);
/// One side has sent FIN and the other direction makes no progress for 30 s.
pub const DEFAULT_HALF_CLOSED: Duration = Duration::from_secs(30);
/// Bytes are queued for a peer that reads nothing for 30 s (slow read).
pub const DEFAULT_WRITE_STALL: Duration = Duration::from_secs(30);
/// How long connections may finish after SIGTERM before they are aborted.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// The client's request before the backend's first byte: 10 s of allowance, plus one second
/// per `min_rate` bytes the client sends, while it keeps sending. mod_reqtimeout's
/// `header=20-40,MinRate=500` is the model; 10 s is already far more than a 2 kB request
/// needs at 2 kB/s, and the rate extension carries uploads of any size at any sane speed.
pub const DEFAULT_REQUEST: Duration = Duration::from_secs(10);
/// How long in all a clock that ran out may be put off while the peer still takes its bytes
/// at `min_rate` (judged over [`SLOW_READER_WINDOW`]); the count starts again whenever
/// halfguard can write to it. The kernel makes a socket writable once half its send queue is
/// free, so a 2 kB/s reader (a phone on EDGE) behind a 1 MB send buffer keeps the write-stall
/// clock run out for about 4 minutes at a stretch; 5 minutes, the idle default, covers it,
/// and a peer that takes just the floor rate to hold a socket is let go in the end.
pub const DEFAULT_SLOW_READER_MAX: Duration = Duration::from_secs(300);
/// The window over which the kernel send-queue check judges a peer's drain. A slow mobile
/// link does not acknowledge steadily: a 3G radio waking from idle takes about 2 s, an EDGE
/// round trip is 0.5-1 s, and a reader app takes its bytes a buffer at a time, so for a
/// second or two at a stretch nothing is acknowledged and then several kilobytes are at once.
/// 5 s holds two or three such bursts; a shorter window cuts those readers, a longer one
/// only keeps a peer that takes nothing longer (it is cut at most this long after its clock).
pub const SLOW_READER_WINDOW: Duration = Duration::from_secs(5);

/// `[timeouts]`, also the shape of `[listeners.timeouts]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<RawDuration>,
    pub first_byte: Option<RawDuration>,
    pub idle: Option<RawDuration>,
    pub half_closed: Option<RawDuration>,
    pub write_stall: Option<RawDuration>,
    pub max_lifetime: Option<RawDuration>,
    pub drain: Option<RawDuration>,
    pub request: Option<RawDuration>,
    pub request_max: Option<RawDuration>,
    pub slow_reader_max: Option<RawDuration>,
}

/// The clocks. See the state diagram in README.md.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
    pub half_closed: Duration,
    pub write_stall: Duration,
    /// `None` when configured as `"0s"`.
    pub max_lifetime: Option<Duration>,
    pub drain: Duration,
    /// The request clock's allowance; `None` when configured as `"0s"` (off).
    pub request: Option<Duration>,
    /// A hard bound on the request clock whatever the rate; `None` = none.
    pub request_max: Option<Duration>,
    /// How long in all the kernel send-queue check may put off a clock for a peer still
    /// taking its bytes; `None` when configured as `"0s"` (no bound but `max_lifetime`).
    pub slow_reader_max: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: DEFAULT_CONNECT,
            first_byte: DEFAULT_FIRST_BYTE,
            idle: DEFAULT_IDLE,
            half_closed: DEFAULT_HALF_CLOSED,
            write_stall: DEFAULT_WRITE_STALL,
            max_lifetime: None,
            drain: DEFAULT_DRAIN,
            request: Some(DEFAULT_REQUEST),
            request_max: None,
            slow_reader_max: Some(DEFAULT_SLOW_READER_MAX),
        }
    }
}

impl Timeouts {
    /// `raw` (the table at key `at`) over `base`, checked.
    pub(super) fn from_raw(
        ck: &Checker<'_>,
        base: &Timeouts,
        raw: &RawTimeouts,
        at: &str,
    ) -> Result<Timeouts, ConfigError> {
        let pick = |v: Option<RawDuration>, b: Duration| v.map_or(b, |x| x.0);
        let t = Timeouts {
            connect: pick(raw.connect, base.connect),
            first_byte: pick(raw.first_byte, base.first_byte),
            idle: pick(raw.idle, base.idle),
            half_closed: pick(raw.half_closed, base.half_closed),
            write_stall: pick(raw.write_stall, base.write_stall),
            max_lifetime: raw.max_lifetime.map_or(base.max_lifetime, |x| nonzero(x.0)),
            drain: pick(raw.drain, base.drain),
            request: raw.request.map_or(base.request, |x| nonzero(x.0)),
            request_max: raw.request_max.map_or(base.request_max, |x| nonzero(x.0)),
            slow_reader_max: raw
                .slow_reader_max
                .map_or(base.slow_reader_max, |x| nonzero(x.0)),
        };
        t.check(ck, at)?;
        Ok(t)
    }

    fn check(&self, ck: &Checker<'_>, at: &str) -> Result<(), ConfigError> {
        for (k, v) in [
            ("connect", self.connect),
            ("first_byte", self.first_byte),
            ("idle", self.idle),
            ("half_closed", self.half_closed),
            ("write_stall", self.write_stall),
        ] {
            if v.is_zero() {
                return Err(ck.err(
                    format!("{at}.{k}"),
                    "must be greater than 0s: every state needs a clock",
                ));
            }
        }
        if let (Some(r), Some(m)) = (self.request, self.request_max)
            && m < r
        {
            return Err(ck.err(
                format!("{at}.request_max"),
                format!(
                    "{} is below request ({}): the allowance could never be used",
                    dur(m),
                    dur(r)
                ),
            ));
        }
        if let Some(m) = self.slow_reader_max
            && m < SLOW_READER_WINDOW
        {
            return Err(ck.err(
                format!("{at}.slow_reader_max"),
                format!(
                    "{} is below the {} window over which a slow reader's drain is judged: \
                     every peer with bytes queued would be cut before it could be judged \
                     (\"0s\" = no bound)",
                    dur(m),
                    dur(SLOW_READER_WINDOW)
                ),
            ));
        }
        Ok(())
    }
}

/// One line, indented under the listener it belongs to.
impl fmt::Display for Timeouts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "  clocks: connect {}, first_byte {}, request {}{}, idle {}, half_closed {}, write_stall {}, slow_reader_max {}, max_lifetime {}, drain {}",
            dur(self.connect),
            dur(self.first_byte),
            self.request.map_or("off".into(), dur),
            self.request_max
                .map_or(String::new(), |m| format!(" (at most {})", dur(m))),
            dur(self.idle),
            dur(self.half_closed),
            dur(self.write_stall),
            self.slow_reader_max.map_or("none".into(), dur),
            self.max_lifetime.map_or("none".into(), dur),
            dur(self.drain)
        )
    }
}
