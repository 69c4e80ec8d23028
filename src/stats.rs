//! Per-listener counters, and the once-a-second summary that replaces per-connection logs.
//!
//! Under attack a log line per refused connection is itself a denial of service (on the proxy
//! and on the log pipeline), so every refusal, eviction and clock expiry is an atomic add
//! here, and [`summarise`] logs at most one line per category per interval. The reasons are
//! closed enums with static names, ready to become metric labels; a source address never is.

use crate::metrics::{DURATION_BUCKETS, Histo};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a connection was refused at accept (or, for `HalfClosedFull` in reject mode, when it
/// tried to enter the half-closed state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// The source is in the deny list.
    Denied,
    /// The listener is at `max_conns` and nothing could be evicted.
    ConnsFull,
    /// The source opens connections faster than `conn_rate_per_source`.
    Rate,
    /// The source is at `max_conns_per_source`.
    SourceConns,
    /// The source is at `max_half_open_per_source`.
    SourceHalfOpen,
    /// The source holds `max_half_closed_per_source` half-closed connections.
    SourceHalfClosed,
    /// The listener is at `max_half_open` and nothing could be evicted.
    HalfOpenFull,
    /// The listener is at `max_half_closed` and nothing could be evicted.
    HalfClosedFull,
    /// The source table holds `max_sources` sources.
    SourcesFull,
    /// A PROXY protocol header was malformed, too long, or cut short.
    ProxyHeader,
    /// A connection to a PROXY protocol listener came from outside `trusted_proxies`.
    UntrustedProxy,
    /// Every backend server was at `max_conns` and the pool's queue was full.
    QueueFull,
}

impl Reject {
    pub const ALL: [Reject; 12] = [
        Reject::Denied,
        Reject::ConnsFull,
        Reject::Rate,
        Reject::SourceConns,
        Reject::SourceHalfOpen,
        Reject::SourceHalfClosed,
        Reject::HalfOpenFull,
        Reject::HalfClosedFull,
        Reject::SourcesFull,
        Reject::ProxyHeader,
        Reject::UntrustedProxy,
        Reject::QueueFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Denied => "denied",
            Reject::ConnsFull => "conns_full",
            Reject::Rate => "rate",
            Reject::SourceConns => "source_conns",
            Reject::SourceHalfOpen => "source_half_open",
            Reject::SourceHalfClosed => "source_half_closed",
            Reject::HalfOpenFull => "half_open_full",
            Reject::HalfClosedFull => "half_closed_full",
            Reject::SourcesFull => "sources_full",
            Reject::ProxyHeader => "proxy_header",
            Reject::UntrustedProxy => "untrusted_proxy",
            Reject::QueueFull => "queue_full",
        }
    }
}

/// Which clock ended a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    FirstByte,
    Idle,
    HalfClosed,
    WriteStall,
    MaxLifetime,
    Connect,
    /// Waited in a pool's queue for `queue_timeout` without a server slot.
    Queue,
}

impl Timeout {
    pub const ALL: [Timeout; 7] = [
        Timeout::FirstByte,
        Timeout::Idle,
        Timeout::HalfClosed,
        Timeout::WriteStall,
        Timeout::MaxLifetime,
        Timeout::Connect,
        Timeout::Queue,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Timeout::FirstByte => "first_byte",
            Timeout::Idle => "idle",
            Timeout::HalfClosed => "half_closed",
            Timeout::WriteStall => "write_stall",
            Timeout::MaxLifetime => "max_lifetime",
            Timeout::Connect => "connect",
            Timeout::Queue => "queue",
        }
    }
}

/// The accounted states a connection can be evicted from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictState {
    HalfOpen,
    HalfClosed,
}

impl EvictState {
    pub const ALL: [EvictState; 2] = [EvictState::HalfOpen, EvictState::HalfClosed];

    pub fn as_str(self) -> &'static str {
        match self {
            EvictState::HalfOpen => "half_open",
            EvictState::HalfClosed => "half_closed",
        }
    }
}

/// Counters for one listener. Every field only ever grows.
#[derive(Debug)]
pub struct Stats {
    pub accepted: AtomicU64,
    rejected: [AtomicU64; Reject::ALL.len()],
    evicted: [AtomicU64; EvictState::ALL.len()],
    timed_out: [AtomicU64; Timeout::ALL.len()],
    /// Client to backend bytes.
    pub bytes_upstream: AtomicU64,
    /// Backend to client bytes.
    pub bytes_downstream: AtomicU64,
    /// accept() failures other than a client that left first (EMFILE, ENFILE, ENOBUFS...).
    pub accept_errors: AtomicU64,
    /// Connections aborted because no backend could be reached (not counting connect timeouts).
    pub backend_unavailable: AtomicU64,
    /// Connections ended by a reset or a kernel timeout (keepalive, TCP_USER_TIMEOUT) on
    /// either socket.
    pub peer_errors: AtomicU64,
    /// Connections that ended with a clean FIN both ways.
    pub closed_clean: AtomicU64,
    /// Connections aborted by shutdown after the drain period.
    pub aborted_on_shutdown: AtomicU64,
    /// Directions that switched to splice (zero-copy) as bulk transfers.
    pub spliced: AtomicU64,
    /// Lifetime of admitted connections.
    pub duration: Histo,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            accepted: AtomicU64::new(0),
            rejected: Default::default(),
            evicted: Default::default(),
            timed_out: Default::default(),
            bytes_upstream: AtomicU64::new(0),
            bytes_downstream: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            backend_unavailable: AtomicU64::new(0),
            peer_errors: AtomicU64::new(0),
            closed_clean: AtomicU64::new(0),
            aborted_on_shutdown: AtomicU64::new(0),
            spliced: AtomicU64::new(0),
            duration: Histo::new(DURATION_BUCKETS),
        }
    }
}

impl Stats {
    pub fn reject(&self, r: Reject) {
        self.rejected[r as usize].fetch_add(1, Relaxed);
    }
    pub fn rejected(&self, r: Reject) -> u64 {
        self.rejected[r as usize].load(Relaxed)
    }
    pub fn evict(&self, s: EvictState) {
        self.evicted[s as usize].fetch_add(1, Relaxed);
    }
    pub fn evicted(&self, s: EvictState) -> u64 {
        self.evicted[s as usize].load(Relaxed)
    }
    pub fn time_out(&self, t: Timeout) {
        self.timed_out[t as usize].fetch_add(1, Relaxed);
    }
    pub fn timed_out(&self, t: Timeout) -> u64 {
        self.timed_out[t as usize].load(Relaxed)
    }
}

/// Remembers what was last logged for one listener, so each tick logs only what changed:
/// at most one line each for refusals, evictions, expiries and accept errors, and nothing
/// when nothing happened.
pub struct Summary {
    last: Snapshot,
}

impl Summary {
    pub fn new(stats: &Stats) -> Summary {
        Summary {
            last: Snapshot::of(stats),
        }
    }

    /// Logs what changed since the previous tick.
    pub fn tick(&mut self, listener: &str, stats: &Stats) {
        let now = Snapshot::of(stats);
        log_diff(listener, &self.last, &now);
        self.last = now;
    }
}

struct Snapshot {
    rejected: [u64; Reject::ALL.len()],
    evicted: [u64; EvictState::ALL.len()],
    timed_out: [u64; Timeout::ALL.len()],
    accept_errors: u64,
}

impl Snapshot {
    fn of(s: &Stats) -> Snapshot {
        Snapshot {
            rejected: Reject::ALL.map(|r| s.rejected(r)),
            evicted: EvictState::ALL.map(|e| s.evicted(e)),
            timed_out: Timeout::ALL.map(|t| s.timed_out(t)),
            accept_errors: s.accept_errors.load(Relaxed),
        }
    }
}

fn diff_line<const N: usize>(last: &[u64; N], now: &[u64; N], names: [&str; N]) -> Option<String> {
    let parts: Vec<String> = (0..N)
        .filter(|&i| now[i] > last[i])
        .map(|i| format!("{}={}", names[i], now[i] - last[i]))
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

fn log_diff(listener: &str, last: &Snapshot, now: &Snapshot) {
    if let Some(l) = diff_line(
        &last.rejected,
        &now.rejected,
        Reject::ALL.map(Reject::as_str),
    ) {
        tracing::info!(listener, counts = %l, "connections refused");
    }
    if let Some(l) = diff_line(
        &last.evicted,
        &now.evicted,
        EvictState::ALL.map(EvictState::as_str),
    ) {
        tracing::info!(listener, counts = %l, "connections evicted");
    }
    if let Some(l) = diff_line(
        &last.timed_out,
        &now.timed_out,
        Timeout::ALL.map(Timeout::as_str),
    ) {
        tracing::info!(listener, counts = %l, "connections timed out");
    }
    if now.accept_errors > last.accept_errors {
        tracing::warn!(
            listener,
            count = now.accept_errors - last.accept_errors,
            "accept failed (descriptors exhausted?), backing off"
        );
    }
}
