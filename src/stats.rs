//! Per-listener counters, and the once-a-second summary that replaces per-connection logs.
//!
//! Under attack a log line per refused connection is itself a denial of service (on the proxy
//! and on the log pipeline), so every refusal, eviction and clock expiry is an atomic add
//! here, and [`Summary`] logs at most one line per category per interval. The reasons are
//! closed enums with static names, ready to become metric labels; a source address never is.

use crate::histo::{DURATION_BUCKETS, Histo};
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
    /// The source's network (a coarser prefix) is at `max_conns_per_network`.
    NetworkConns,
    /// The source is banned cluster-wide (`[cluster]`): a replica's kernel layer banned it,
    /// or its caps refused it `kernel.ban_after` times; for `kernel.ban_for`.
    Banned,
    /// The bytes queued toward the source (what its connections' peers do not take) are
    /// over `max_queued_per_source`: one of its blocked connections is cut.
    SourceQueued,
    /// The bytes queued toward the listener's clients are over `max_queued`: the blocked
    /// connections of the source holding the most are cut.
    QueuedFull,
}

impl Reject {
    pub const ALL: [Reject; 16] = [
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
        Reject::NetworkConns,
        Reject::Banned,
        Reject::SourceQueued,
        Reject::QueuedFull,
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
            Reject::NetworkConns => "network_conns",
            Reject::Banned => "banned",
            Reject::SourceQueued => "source_queued",
            Reject::QueuedFull => "queued_full",
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
    /// The client kept trickling bytes, below `limits.min_rate`, longer than the `request`
    /// allowance before the backend's first byte: an exchange that never starts.
    Request,
    /// The client's first message did not come whole within the request clock: it was held
    /// (see `conn::holding`) and no backend ever saw it.
    FirstMessage,
}

impl Timeout {
    pub const ALL: [Timeout; 9] = [
        Timeout::FirstByte,
        Timeout::Idle,
        Timeout::HalfClosed,
        Timeout::WriteStall,
        Timeout::MaxLifetime,
        Timeout::Connect,
        Timeout::Queue,
        Timeout::Request,
        Timeout::FirstMessage,
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
            Timeout::Request => "request",
            Timeout::FirstMessage => "first_message",
        }
    }
}

/// The accounted states a connection can be evicted from: silent for a while, half-closed
/// for a while, and OPEN but stalled (moving less than `limits.min_rate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EvictState {
    HalfOpen,
    HalfClosed,
    Stalled,
}

impl EvictState {
    pub const ALL: [EvictState; 3] = [
        EvictState::HalfOpen,
        EvictState::HalfClosed,
        EvictState::Stalled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EvictState::HalfOpen => "half_open",
            EvictState::HalfClosed => "half_closed",
            EvictState::Stalled => "stalled",
        }
    }
}

/// What observe mode would have done to a connection (and did not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Refused at accept, or when it matured into a capped state.
    Reject(Reject),
    /// Evicted by its own source's cap.
    Evict(EvictState),
    /// Ended by a clock.
    TimeOut(Timeout),
}

impl Observed {
    /// The `action` label.
    pub fn action(self) -> &'static str {
        match self {
            Observed::Reject(_) => "reject",
            Observed::Evict(_) => "evict",
            Observed::TimeOut(_) => "time_out",
        }
    }

    /// The `reason` label: the refusal reason, the cap that would evict, or the clock.
    pub fn reason(self) -> &'static str {
        match self {
            Observed::Reject(r) => r.as_str(),
            Observed::Evict(EvictState::HalfClosed) => "source_half_closed",
            Observed::Evict(EvictState::HalfOpen) => "source_half_open",
            Observed::Evict(EvictState::Stalled) => "stalled",
            Observed::TimeOut(t) => t.as_str(),
        }
    }

    /// Every (action, reason) pair observe mode can count, in a fixed order. Listener-wide
    /// caps and the backend's clocks always act, so they never appear here.
    pub fn all() -> impl Iterator<Item = Observed> {
        [
            Reject::Denied,
            Reject::Rate,
            Reject::SourceConns,
            Reject::SourceHalfOpen,
            Reject::SourceHalfClosed,
            Reject::NetworkConns,
        ]
        .into_iter()
        .map(Observed::Reject)
        .chain(std::iter::once(Observed::Evict(EvictState::HalfClosed)))
        .chain(
            [
                Timeout::FirstByte,
                Timeout::Request,
                Timeout::FirstMessage,
                Timeout::Idle,
                Timeout::HalfClosed,
                Timeout::WriteStall,
                Timeout::MaxLifetime,
            ]
            .into_iter()
            .map(Observed::TimeOut),
        )
    }

    fn slot(self) -> usize {
        match self {
            Observed::Reject(r) => r as usize,
            Observed::Evict(e) => Reject::ALL.len() + e as usize,
            Observed::TimeOut(t) => Reject::ALL.len() + EvictState::ALL.len() + t as usize,
        }
    }
}

const OBSERVED_SLOTS: usize = Reject::ALL.len() + EvictState::ALL.len() + Timeout::ALL.len();

/// Counters for one listener. Every field only ever grows.
#[derive(Debug)]
pub struct Stats {
    pub accepted: AtomicU64,
    rejected: [AtomicU64; Reject::ALL.len()],
    evicted: [AtomicU64; EvictState::ALL.len()],
    timed_out: [AtomicU64; Timeout::ALL.len()],
    /// What observe mode let pass, by what it would have done.
    observed: [AtomicU64; OBSERVED_SLOTS],
    /// Client to backend bytes.
    pub bytes_upstream: AtomicU64,
    /// Backend to client bytes.
    pub bytes_downstream: AtomicU64,
    /// accept() failures other than a client that left first (EMFILE, ENFILE, ENOBUFS...).
    pub accept_errors: AtomicU64,
    /// Connections an idle worker thread took from another's listening socket
    /// (`crate::steal`): a thread that keeps being stolen from is stalled or overloaded.
    pub stolen: AtomicU64,
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
    /// Connections whose client has spoken and whose first message is held until whole,
    /// before any backend (a gauge).
    pub holding: AtomicU64,
    /// Of the silent connections, those parked outside any task until their first byte
    /// (a gauge, see `conn::parked`).
    pub parked: AtomicU64,
    /// Open connections idle after an exchange, parked with both sockets outside any task
    /// until either speaks (a gauge, see `conn::parked`).
    pub parked_idle: AtomicU64,
    /// 1 when a probe of a client-first listener's server saw it greet before the client
    /// spoke: the listener wants `protocol = "server-first"` (a gauge, see
    /// `server::greeting`).
    pub server_first_suspected: AtomicU64,
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
            observed: Default::default(),
            bytes_upstream: AtomicU64::new(0),
            bytes_downstream: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            stolen: AtomicU64::new(0),
            backend_unavailable: AtomicU64::new(0),
            peer_errors: AtomicU64::new(0),
            closed_clean: AtomicU64::new(0),
            aborted_on_shutdown: AtomicU64::new(0),
            spliced: AtomicU64::new(0),
            holding: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            parked_idle: AtomicU64::new(0),
            server_first_suspected: AtomicU64::new(0),
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
    pub fn observe(&self, o: Observed) {
        self.observed[o.slot()].fetch_add(1, Relaxed);
    }
    pub fn observed(&self, o: Observed) -> u64 {
        self.observed[o.slot()].load(Relaxed)
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

    /// Logs what changed since the previous tick. `top` names the most refused source, asked
    /// only when something was refused.
    pub fn tick(&mut self, listener: &str, stats: &Stats, top: &dyn Fn() -> Option<TopRefused>) {
        let now = Snapshot::of(stats);
        log_diff(listener, &self.last, &now, top);
        self.last = now;
    }
}

/// The most refused source of the last window, for the refusal summary: enough to tell a busy
/// address at its cap (its connections move data) from a flooding one (they go nowhere).
#[derive(Debug, Clone)]
pub struct TopRefused {
    pub source: String,
    pub refused: u64,
    pub conns: usize,
    /// Of `conns`: silent or half-closed past the grace, or stalled.
    pub going_nowhere: usize,
    pub verdict: &'static str,
}

struct Snapshot {
    rejected: [u64; Reject::ALL.len()],
    evicted: [u64; EvictState::ALL.len()],
    timed_out: [u64; Timeout::ALL.len()],
    observed: [u64; OBSERVED_SLOTS],
    accept_errors: u64,
    /// Connections holding their first message now (a gauge, not a difference).
    holding: u64,
}

impl Snapshot {
    fn of(s: &Stats) -> Snapshot {
        Snapshot {
            rejected: Reject::ALL.map(|r| s.rejected(r)),
            evicted: EvictState::ALL.map(|e| s.evicted(e)),
            timed_out: Timeout::ALL.map(|t| s.timed_out(t)),
            observed: std::array::from_fn(|i| s.observed[i].load(Relaxed)),
            accept_errors: s.accept_errors.load(Relaxed),
            holding: s.holding.load(Relaxed),
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

fn log_diff(listener: &str, last: &Snapshot, now: &Snapshot, top: &dyn Fn() -> Option<TopRefused>) {
    if let Some(l) = diff_line(
        &last.rejected,
        &now.rejected,
        Reject::ALL.map(Reject::as_str),
    ) {
        match top() {
            Some(t) => tracing::info!(
                listener,
                counts = %l,
                top_source = %t.source,
                top_refused = t.refused,
                top_conns = t.conns,
                top_going_nowhere = t.going_nowhere,
                top_verdict = t.verdict,
                "connections refused"
            ),
            None => tracing::info!(listener, counts = %l, "connections refused"),
        }
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
        // How many first messages are held now, beside the ones the clock ended: a drip
        // flood shows as both.
        tracing::info!(
            listener,
            counts = %l,
            first_message_held = now.holding,
            "connections timed out"
        );
    }
    let observed: Vec<String> = Observed::all()
        .filter(|o| now.observed[o.slot()] > last.observed[o.slot()])
        .map(|o| {
            let n = now.observed[o.slot()] - last.observed[o.slot()];
            format!("{}:{}={n}", o.action(), o.reason())
        })
        .collect();
    if !observed.is_empty() {
        tracing::info!(
            listener,
            counts = %observed.join(" "),
            "observe mode: would have refused, evicted or timed out (and did not)"
        );
    }
    if now.accept_errors > last.accept_errors {
        tracing::warn!(
            listener,
            count = now.accept_errors - last.accept_errors,
            "accept failed (descriptors exhausted?), backing off"
        );
    }
}
