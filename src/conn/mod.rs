//! One connection's task: the state machine and its clocks.
//!
//! ```text
//! HALF_OPEN --first byte--> OPEN --FIN from one side--> HALF_CLOSED(side) --FIN--> CLOSED
//!   first_byte              request, idle, write_stall  half_closed, write_stall
//!   (silent past grace:     (below min_rate: stalled,   (past grace: counts against
//!    counts per source)      evictable when full)         the source's cap)
//! ```
//! plus `connect` while a backend connects and `max_lifetime` throughout. Whatever ends a
//! connection other than a FIN both ways (clock, eviction, reset, backend failure, shutdown)
//! aborts both sockets with RST, so halfguard keeps no FIN_WAIT or TIME_WAIT of its own.
//!
//! Clocks measure lack of progress: they are rearmed lazily from the pump's progress stamps
//! (no timer reset per read), and before a clock aborts it looks at the kernel send queues,
//! since a peer still acknowledging our bytes is slow, not gone. The `request` clock is the
//! exchange that never starts: before the backend's first byte, a client that keeps
//! trickling (no pause of 5 s) gets `request` plus one second per `min_rate` bytes it sends.
//! Every `STALL_WINDOW` (the first time sooner) an OPEN connection compares the bytes it
//! moved with `min_rate`: below it, it joins its source's stalled list, where a full listener
//! finds its victims; and if it is still in its request, its client's bytes wait in the
//! kernel until the next check, so that a drip costs a wake-up a second, not one per byte.
//!
//! In observe mode a clock that runs out is counted and disarmed for that connection, which
//! goes on.

mod pump;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

pub use pump::{BUF_SIZE, Event, KernelQueues, Pump, PumpError, Side};

use crate::backend::{BackendError, Lease, Pool, ProxiedAddrs};
use crate::config::{PressureConfig, Protocol, TcpConfig, Timeouts};
use crate::guard::{Guard, Refused, Ticket};
use crate::stats::{Reject, Stats, Timeout};
use crate::{proxy_protocol, sockopt};

/// What a reload may change for a listener's connections, swapped whole.
#[derive(Debug)]
pub struct Policy {
    pub protocol: Protocol,
    /// Expect a PROXY protocol header first, from these balancers only.
    pub accept_proxy: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub timeouts: Timeouts,
    /// `limits.min_rate`: bytes per second that count as progress.
    pub min_rate: u32,
    /// `limits.grace`: how long a state lasts before it counts against the source's cap.
    pub grace: Duration,
    /// `limits.mode = "observe"`: clocks are counted, not acted on.
    pub observe: bool,
    pub pressure: PressureConfig,
    pub tcp: TcpConfig,
    pub backends: Arc<Pool>,
}

/// What every connection of one listener shares.
#[derive(Debug)]
pub struct ListenerCtx {
    pub name: String,
    /// The policy in force; connections load it at start and again when `epoch` moves.
    pub policy: ArcSwap<Policy>,
    /// Bumped on reload so live connections pick up new clocks at once.
    pub epoch: watch::Sender<u64>,
    pub guard: Guard,
    pub stats: Arc<Stats>,
    /// Fired when the drain period after shutdown is over: abort what is left.
    pub abort: CancellationToken,
}

impl Policy {
    /// The silent clock, shortened under pressure.
    fn first_byte(&self, pressure: bool) -> Duration {
        let t = self.timeouts.first_byte;
        if pressure {
            t.min(self.pressure.first_byte)
        } else {
            t
        }
    }

    /// The half-closed clock, shortened under pressure.
    fn half_closed(&self, pressure: bool) -> Duration {
        let t = self.timeouts.half_closed;
        if pressure {
            t.min(self.pressure.half_closed)
        } else {
            t
        }
    }

    /// The idle clock, shortened under pressure.
    fn idle(&self, pressure: bool) -> Duration {
        let t = self.timeouts.idle;
        if pressure {
            t.min(self.pressure.idle)
        } else {
            t
        }
    }

    /// When the request clock ends the client's `burst` (before the backend's first byte):
    /// the allowance, plus a second per `min_rate` bytes, within `request_max`. `None` when
    /// the clock is off.
    fn request_deadline(&self, pressure: bool, burst: pump::Burst) -> Option<Instant> {
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
    fn lifetime(&self, accepted: Instant) -> Option<(Instant, Timeout)> {
        self.timeouts
            .max_lifetime
            .map(|l| (accepted + l, Timeout::MaxLifetime))
    }
}

impl ListenerCtx {
    /// Installs a new policy; live connections switch to its clocks at once.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
        self.epoch.send_modify(|e| *e += 1);
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// FIN both ways (or a client that closed before saying anything).
    Clean,
    Timeout(Timeout),
    Evicted,
    /// Refused after admission (counted where it was refused).
    Refused,
    Backend,
    PeerError,
    /// The server reset the connection before any byte moved either way: passive health
    /// counts it (after a client byte, the client may have provoked it).
    PeerErrorFromServerBeforeFirstByte,
    Shutdown,
}

/// A clock expiry that a kernel send queue still moving postpones by at most this much.
const RECHECK: Duration = Duration::from_secs(1);
/// With bytes in flight at an expiry, the second look comes this soon, to tell a queue that
/// moves from one that is stuck.
const FIRST_LOOK: Duration = Duration::from_millis(200);
/// However well its queue drains, a clock that ran out is put off by the kernel send-queue
/// look for at most this long in all: a reader draining at `min_rate` wakes the pump (which
/// resets the clocks) long before, so only a peer that keeps the queue barely moving meets it.
const MAX_EXTENSION: Duration = Duration::from_secs(300);
/// How often an OPEN connection weighs its progress against `min_rate`.
pub const STALL_WINDOW: Duration = Duration::from_secs(1);
/// The first look comes sooner: a flood of connections that trickle fills a listener at once,
/// and they must be evictable before legit newcomers are refused for long. An ordinary
/// exchange is over before it.
pub const FIRST_STALL_CHECK: Duration = Duration::from_millis(250);
/// How long a connection admitted over its source's connection cap waits for a slot.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(1);

/// Clocks that observe mode already counted for this connection, and so no longer arms.
#[derive(Clone, Copy, Debug, Default)]
struct Observed(u16);

impl Observed {
    fn has(self, t: Timeout) -> bool {
        self.0 & (1 << t as u16) != 0
    }
    fn set(&mut self, t: Timeout) {
        self.0 |= 1 << t as u16;
    }
}

/// The earliest of the clocks that are armed: those not already observed, when observing.
struct Clocks {
    observing: bool,
    observed: Observed,
    best: Option<(Instant, Timeout)>,
}

impl Clocks {
    /// The mode comes with the policy the connection already holds: no shared load per turn.
    fn new(policy: &Policy, observed: Observed) -> Clocks {
        Clocks {
            observing: policy.observe,
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

/// A clock ran out: `true` when the connection must end, `false` when observe mode counted
/// it (and it is now disarmed for this connection).
fn expire(ticket: &Ticket, observed: &mut Observed, clock: Timeout) -> bool {
    if ticket.observe(crate::stats::Observed::TimeOut(clock)) {
        observed.set(clock);
        false
    } else {
        true
    }
}

/// Serves one admitted connection to its end.
pub async fn serve(ctx: Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr, mut ticket: Ticket) {
    let accepted = Instant::now();
    let mut server = None;
    let end = run(&ctx, &client, peer, &mut server, &mut ticket, accepted).await;
    if end == End::PeerErrorFromServerBeforeFirstByte
        && let Some((_, lease)) = &server
    {
        lease.early_reset();
    }
    let stats = &ctx.stats;
    match end {
        End::Clean => {
            stats.closed_clean.fetch_add(1, Relaxed);
        }
        End::Timeout(t) => stats.time_out(t),
        End::Evicted | End::Refused => {} // counted by the evictor or refuser
        End::Backend => {
            stats.backend_unavailable.fetch_add(1, Relaxed);
        }
        End::PeerError | End::PeerErrorFromServerBeforeFirstByte => {
            stats.peer_errors.fetch_add(1, Relaxed);
        }
        End::Shutdown => {
            stats.aborted_on_shutdown.fetch_add(1, Relaxed);
        }
    }
    if end != End::Clean {
        sockopt::abort(&client);
        if let Some((s, _)) = &server {
            sockopt::abort(s);
        }
    }
    // Sockets close here (the lease with the server socket), then the ticket gives the
    // counts back.
    drop(server);
    drop(client);
    drop(ticket);
    stats.duration.observe(accepted.elapsed());
}

/// A connection admitted over its source's connection cap waits for a connection of its
/// source to end (usually one that already ended on the wire and whose task has not run
/// yet); none does within `CONFIRM_WAIT`: refused.
async fn confirm_slot(ticket: &mut Ticket, abort: &CancellationToken) -> Result<(), End> {
    let until = Instant::now() + CONFIRM_WAIT;
    let mut nap = Duration::from_millis(1);
    loop {
        match ticket.confirm() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(_) => return Err(End::Evicted),
        }
        let now = Instant::now();
        if now >= until {
            if ticket.refuse_provisional() {
                return Err(End::Refused);
            }
            return Ok(());
        }
        tokio::select! {
            biased;
            _ = abort.cancelled() => return Err(End::Shutdown),
            _ = sleep_until((now + nap).min(until)) => {}
        }
        nap = (nap * 2).min(Duration::from_millis(64));
    }
}

async fn run(
    ctx: &ListenerCtx,
    client: &TcpStream,
    peer: SocketAddr,
    server_slot: &mut Option<(TcpStream, Lease)>,
    ticket: &mut Ticket,
    accepted: Instant,
) -> End {
    let ctl = ticket.ctl().clone();
    // A child token of its own: polling it locks this connection's waiter list, not the
    // listener's, which every connection would share.
    let abort = ctx.abort.child_token();
    if ticket.is_provisional()
        && let Err(end) = confirm_slot(ticket, &abort).await
    {
        return end;
    }
    let mut pressure = ctx.guard.pressure_watch();
    let mut epoch = ctx.epoch.subscribe();
    let mut policy = ctx.policy.load_full();
    let mut observed = Observed::default();
    // The local address costs a syscall: only a PROXY header toward the servers needs it.
    let local = if policy.backends.config().proxy_protocol.is_some() {
        match client.local_addr() {
            Ok(l) => l,
            Err(_) => return End::PeerError,
        }
    } else {
        peer
    };
    let mut addrs = ProxiedAddrs {
        client: peer,
        local,
    };

    // A trusted balancer's PROXY header, within the first-byte clock; from here on the
    // source is the one it names. Whether a header comes was decided at accept and travels
    // with the ticket: a reload in between cannot change it.
    if ticket.is_trusted() {
        let deadline = accepted + policy.first_byte(*pressure.borrow_and_update());
        let header = tokio::select! {
            biased;
            _ = ctl.evicted() => return End::Evicted,
            _ = abort.cancelled() => return End::Shutdown,
            // Boxed: its buffers would otherwise sit in every connection's task.
            h = Box::pin(proxy_protocol::read_header(client)) => h,
            _ = sleep_until(deadline) => return End::Timeout(Timeout::FirstByte),
        };
        match header {
            Ok(h) => {
                if let Some((src, dst)) = h.addrs {
                    addrs = ProxiedAddrs {
                        client: src,
                        local: dst,
                    };
                    if ticket.assign_source(src.ip()).is_err() {
                        return End::Refused;
                    }
                }
            }
            Err(_) => {
                ctx.stats.reject(Reject::ProxyHeader);
                return End::Refused;
            }
        }
    }

    // HALF_OPEN.
    if policy.protocol == Protocol::ServerFirst {
        // The backend speaks first: connect now; the connection stays half-open until a
        // byte moves either way.
        let connect = tokio::select! {
            biased;
            _ = ctl.evicted() => return End::Evicted,
            _ = abort.cancelled() => return End::Shutdown,
            r = Box::pin(policy.backends.connect(&policy.tcp, policy.timeouts.connect, addrs)) => r,
        };
        match connect {
            Ok(s) => *server_slot = Some(s),
            Err(e) => return backend_end(ctx, &e),
        }
    }
    // Most clients have spoken by the time they are accepted: look once, straight away,
    // rather than wait for the event loop to say the socket is readable.
    let mut first = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    let spoke = match socket2::SockRef::from(client).peek(&mut first) {
        Ok(0) if server_slot.is_none() => return End::Clean,
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => return End::PeerError,
    };
    if !spoke {
        // Registered once for the whole silent phase, not once per wake-up.
        let mut evicted = pin!(ctl.evicted());
        let mut aborted = pin!(abort.cancelled());
        let mut peek = [0u8; 1];
        // Silent past the grace: counted against the source's half-open cap from then on.
        let mut counted = ticket.source().is_none();
        loop {
            let fb = policy.first_byte(*pressure.borrow_and_update());
            let mut clocks = Clocks::new(&policy, observed);
            clocks.arm(Some((accepted + fb, Timeout::FirstByte)));
            clocks.arm(policy.lifetime(accepted));
            let clock = clocks.best;
            let grace = (!counted).then_some(accepted + policy.grace);
            let wake = match (clock.map(|c| c.0), grace) {
                (Some(c), Some(g)) => c.min(g),
                (Some(c), None) => c,
                (None, Some(g)) => g,
                (None, None) => Instant::now() + Duration::from_secs(3600),
            };
            let server_ready = async {
                match server_slot.as_ref() {
                    Some((s, _)) => s.readable().await,
                    None => std::future::pending().await,
                }
            };
            // Wait for readiness first: a peek on a fresh socket would only say EAGAIN.
            let client_spoke = async {
                client.readable().await?;
                client.peek(&mut peek).await
            };
            tokio::select! {
                biased;
                _ = &mut evicted => return End::Evicted,
                _ = &mut aborted => return End::Shutdown,
                r = client_spoke => match r {
                    // Closed before saying anything, and nothing was asked of a backend.
                    Ok(0) if server_slot.is_none() => return End::Clean,
                    Ok(_) => break,
                    Err(_) => return End::PeerError,
                },
                r = server_ready => match r {
                    Ok(()) => break,
                    Err(_) => return End::PeerError,
                },
                _ = sleep_until(wake) => {
                    let now = Instant::now();
                    if let Some((at, c)) = clock
                        && at <= now
                        && expire(ticket, &mut observed, c)
                    {
                        return End::Timeout(c);
                    }
                    if grace.is_some_and(|g| g <= now) {
                        counted = true;
                        match ticket.silent() {
                            Ok(()) => {}
                            Err(Refused::Evicted) => return End::Evicted,
                            Err(Refused::Full(_)) => return End::Refused,
                        }
                    }
                }
                _ = changed(&mut pressure) => {}
                _ = changed(&mut epoch) => policy = ctx.policy.load_full(),
            }
        }
    }

    // OPEN.
    if ticket.open().is_err() {
        return End::Evicted;
    }
    if server_slot.is_none() {
        let connect = tokio::select! {
            biased;
            _ = abort.cancelled() => return End::Shutdown,
            r = Box::pin(policy.backends.connect(&policy.tcp, policy.timeouts.connect, addrs)) => r,
        };
        match connect {
            Ok(s) => *server_slot = Some(s),
            Err(e) => return backend_end(ctx, &e),
        }
    }
    let Some((server, lease)) = server_slot.as_ref() else {
        return End::Backend;
    };

    // Boxed: the pump and its clocks go on the heap only once bytes move, so a silent
    // connection's task stays small.
    let open = Open {
        ticket,
        abort: &abort,
        lease,
        client,
        server,
    };
    Box::pin(pump_until_end(
        ctx,
        open,
        (pressure, epoch),
        (policy, observed),
        accepted,
    ))
    .await
}

/// What the OPEN and HALF_CLOSED phases work on.
struct Open<'a> {
    ticket: &'a mut Ticket,
    /// This connection's child of the listener's abort token.
    abort: &'a CancellationToken,
    lease: &'a Lease,
    client: &'a TcpStream,
    server: &'a TcpStream,
}

/// OPEN and HALF_CLOSED: moves bytes until both sides sent FIN or a clock runs out.
async fn pump_until_end(
    ctx: &ListenerCtx,
    open: Open<'_>,
    (mut pressure, mut epoch): (watch::Receiver<bool>, watch::Receiver<u64>),
    (mut policy, mut observed): (Arc<Policy>, Observed),
    accepted: Instant,
) -> End {
    let Open {
        ticket,
        abort,
        lease,
        client,
        server,
    } = open;
    let mut pump = Pump::new(client, server, &ctx.stats, policy.tcp.splice);
    let ctl = ticket.ctl().clone();
    // Registered once for the connection, not once per wake-up.
    let mut evicted = pin!(ctl.evicted());
    let mut aborted = pin!(abort.cancelled());
    let mut lease_down = pin!(lease.aborted());
    // Who sent FIN, and when: the half-closed clock counts from the later of that moment
    // and the last progress in the still-open direction, never from before the FIN.
    let mut closed: Option<(Side, Instant)> = None;
    // Half-closed past the grace: counted against the source's cap.
    let mut lingering = false;
    // Set when a kernel send queue was seen moving as a clock expired; `since`: when the
    // first of those extensions began, for `MAX_EXTENSION`.
    let mut extended: Option<Instant> = None;
    let mut extended_since: Option<Instant> = None;
    // The progress check: when it comes next, and the bytes moved at the last one.
    let mut next_check = Instant::now() + FIRST_STALL_CHECK;
    let mut last_check = Instant::now();
    let mut moved_at_check = 0u64;
    let mut sleep = pin!(sleep_until(Instant::now() + policy.timeouts.idle));
    loop {
        let under_pressure = *pressure.borrow_and_update();
        let now = Instant::now();
        let mut clocks = Clocks::new(&policy, observed);
        let t = &policy.timeouts;
        // The request clock: the client's burst before the backend's first byte. A burst
        // still going after its allowance ends the connection; one that paused before it
        // (the client waits for the backend) is looked at again soon, in case it resumes.
        let mut request_wake = None;
        if closed.is_none()
            && let Some(burst) = pump.request_burst()
            && let Some(deadline) = policy.request_deadline(under_pressure, burst)
        {
            if burst.last > deadline {
                clocks.arm(Some((now, Timeout::Request)));
            } else if deadline > now {
                request_wake = Some(deadline);
            } else if now.saturating_duration_since(burst.last) < pump::BURST_GAP {
                request_wake = Some(now + RECHECK);
            } else {
                // The burst is over; a new one cannot run out before a whole allowance.
                request_wake = Some(now + t.request.unwrap_or(RECHECK).max(RECHECK));
            }
        }
        match closed {
            None => clocks.arm(Some((
                pump.last_activity() + policy.idle(under_pressure),
                Timeout::Idle,
            ))),
            Some((side, at)) => {
                let linger = policy.half_closed(under_pressure);
                let since = pump.last_open_progress(side).max(at);
                clocks.arm(Some((since + linger, Timeout::HalfClosed)));
            }
        }
        clocks.arm(
            pump.stalled_since()
                .map(|s| (s + t.write_stall, Timeout::WriteStall)),
        );
        if let (Some(e), Some((at, c))) = (extended, clocks.best) {
            if at > now {
                // Progress moved the clock past now by itself: the extension is over.
                extended = None;
                extended_since = None;
                pump.forget_looks();
            } else {
                clocks.best = Some((at.max(e), c));
            }
        }
        clocks.arm(policy.lifetime(accepted));
        let clock = clocks.best;
        if let Some((deadline, clock)) = clock
            && deadline <= now
        {
            // Out of time by the progress stamps. A peer still acknowledging our bytes is
            // slow, not gone: look again shortly rather than discard its bytes with an RST.
            let within = extended_since.is_none_or(|s| now.duration_since(s) < MAX_EXTENSION);
            if clock != Timeout::MaxLifetime && clock != Timeout::Request && within {
                let look = match pump.kernel_progress(policy.min_rate) {
                    KernelQueues::Moving => Some(RECHECK),
                    KernelQueues::FirstLook => Some(FIRST_LOOK),
                    KernelQueues::Empty | KernelQueues::Stuck => None,
                };
                if let Some(after) = look {
                    extended = Some(now + after);
                    extended_since.get_or_insert(now);
                    continue;
                }
            }
            if expire(ticket, &mut observed, clock) {
                return End::Timeout(clock);
            }
            extended = None;
            extended_since = None;
            pump.forget_looks();
            continue;
        }
        // The progress check, and a half-closed connection's grace.
        if closed.is_none() && next_check <= now {
            let total = pump.total();
            let window = now.saturating_duration_since(last_check).as_secs_f64();
            let floor = f64::from(policy.min_rate) * window;
            let stalled = ((total - moved_at_check) as f64) < floor;
            let r = if stalled {
                ticket.stall()
            } else {
                ticket.unstall()
            };
            if r.is_err() {
                return End::Evicted;
            }
            moved_at_check = total;
            last_check = now;
            next_check = now + STALL_WINDOW;
            // A client that trickles its request below the rate: its bytes wait in the
            // kernel between two checks and go on in one write (see `Pump::hold_client`).
            // Only while the request clock judges it, never in observe mode.
            if stalled
                && !policy.observe
                && policy.timeouts.request.is_some()
                && pump.request_burst().is_some()
            {
                let enough = u64::from(policy.min_rate) * STALL_WINDOW.as_secs();
                pump.hold_client(next_check, enough);
            }
        }
        if let Some((_, at)) = closed
            && !lingering
            && at + policy.grace <= now
        {
            lingering = true;
            if ticket.lingering().is_err() {
                return End::Evicted;
            }
        }
        let mut wake = clock.map_or(now + Duration::from_secs(3600), |c| c.0);
        if let Some(r) = request_wake {
            wake = wake.min(r);
        }
        match closed {
            None => wake = wake.min(next_check),
            Some((_, at)) if !lingering => wake = wake.min(at + policy.grace),
            Some(_) => {}
        }
        if sleep.deadline() != wake {
            sleep.as_mut().reset(wake);
        }
        tokio::select! {
            biased;
            _ = &mut evicted => return End::Evicted,
            _ = &mut aborted => return End::Shutdown,
            // The server was marked down and its pool aborts its connections.
            _ = &mut lease_down => return End::Backend,
            ev = poll_fn(|cx| pump.poll_event(cx)) => match ev {
                Ok(Event::Closed) => return End::Clean,
                // A stall shortens the deadline: recompute it.
                Ok(Event::Stalled) => {}
                Ok(Event::HalfClosed(side)) => {
                    closed = Some((side, Instant::now()));
                    match ticket.half_close() {
                        Ok(()) => {}
                        Err(Refused::Evicted) => return End::Evicted,
                        Err(Refused::Full(r)) => {
                            ctx.stats.reject(r);
                            return End::Refused;
                        }
                    }
                }
                Err(e) if e.side == Side::Server && !pump.server_spoke() && !pump.client_spoke() => {
                    return End::PeerErrorFromServerBeforeFirstByte;
                }
                Err(_) => return End::PeerError,
            },
            // Progress may have moved the deadline since: the loop recomputes it.
            _ = &mut sleep => {}
            _ = changed(&mut pressure) => {}
            _ = changed(&mut epoch) => policy = ctx.policy.load_full(),
        }
    }
}

fn backend_end(ctx: &ListenerCtx, e: &BackendError) -> End {
    match e {
        BackendError::TimedOut => End::Timeout(Timeout::Connect),
        BackendError::QueueTimeout => End::Timeout(Timeout::Queue),
        BackendError::QueueFull => {
            ctx.stats.reject(Reject::QueueFull);
            End::Refused
        }
        BackendError::AllDown | BackendError::Unavailable | BackendError::Resolve { .. } => {
            End::Backend
        }
    }
}

/// Resolves when the watched value changes; never, once its sender is gone.
async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
