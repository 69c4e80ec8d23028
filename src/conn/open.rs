//! OPEN and HALF_CLOSED: the pump loop, until both sides sent FIN or something ends it.
//!
//! Each turn asks the clocks ([`super::clocks::open_due`]) what runs out when, sleeps until
//! then or until the pump reports an event, and acts. Before a clock aborts, it looks at the
//! kernel send queues, since a peer still acknowledging our bytes is slow, not gone. Every
//! `STALL_WINDOW` (the first time sooner) the connection weighs the bytes it moved against
//! `min_rate`: below it, it joins its source's stalled list, where a full listener finds its
//! victims; and if it is still in its request, its client's bytes wait in the kernel until
//! the next check, so that a drip costs a wake-up a second, not one per byte. Under a server's
//! `max_conns`, the check also tells the lease whether the connection may give its slot to a
//! queued client ([`Yield`]); claimed, it looks at itself once more and ends or declines.

use std::future::poll_fn;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

use super::clocks::{FIRST_STALL_CHECK, Progress, RECHECK, STALL_WINDOW, open_due};
use super::pump::{Event, KernelQueues, Pump, Side, Stamps};
use super::weight::Weight;
use super::{End, ListenerCtx, Watched, expire};
use crate::backend::Lease;
use crate::guard::{Refused, Stall, Ticket};
use crate::stats::Timeout;

/// What the OPEN and HALF_CLOSED phases work on.
pub(super) struct Open<'a> {
    pub ctx: &'a ListenerCtx,
    pub ticket: &'a mut Ticket,
    pub lease: &'a Lease,
    pub client: &'a TcpStream,
    pub server: &'a TcpStream,
    pub accepted: Instant,
    /// The first message was an HTTP/1 request head: every later request is clocked too.
    pub http1: bool,
    /// Woken from the lot: the progress its pump had made when it parked.
    pub resumed: Option<&'a Stamps>,
}

/// How the pump loop leaves: the connection ended, or it is idle and parks (`conn::parked`),
/// its pump's progress in the stamps.
pub(super) enum Exit {
    End(End),
    Park(Stamps),
}

/// How long an open connection is idle, nothing outstanding, before it leaves its task for
/// the lot (looked at by the progress check, once a second). Parking and waking cost three
/// `epoll_ctl`s and a task: a keep-alive client between requests that come more often than
/// this never pays them, and a pool's connection that sits for seconds or minutes costs a
/// record instead of a task, its pump loop and two tokio registrations.
pub const IDLE_PARK: Duration = Duration::from_secs(1);

/// Where the progress check stands: when it comes next, and what it saw last.
struct ProgressCheck {
    next: Instant,
    last: Instant,
    moved: u64,
    /// Of `moved`, the client's.
    from_client: u64,
    /// Why the connection may give its backend slot up, as the last check saw it (only
    /// under a server's `max_conns`).
    yields: Option<Yield>,
}

/// Why a connection may give its backend slot to a client queued for one: it holds a
/// worker of the backend without making progress on a request. A connection that awaits the
/// server's answer (a long poll) or moves at the rate never yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Yield {
    /// It drips its request, below the rate, for longer than a check's window.
    Dripping,
    /// The server's bytes wait for it to read them.
    ReadsSlowly,
    /// Nothing outstanding: its last byte came before the server's (a keep-alive connection
    /// between requests).
    Idle,
}

impl Yield {
    /// What the progress check saw, as a reason to yield.
    fn of(stalled: bool, kind: Stall, pump: &Pump<'_>) -> Option<Yield> {
        if !stalled {
            return None;
        }
        match kind {
            Stall::Dripping => Some(Yield::Dripping),
            Stall::Blocked if pump.client_reads_slowly() => Some(Yield::ReadsSlowly),
            // The server does not take the client's bytes: busy, not idle.
            Stall::Blocked => None,
            Stall::Idle => (!pump.awaits_answer()).then_some(Yield::Idle),
        }
    }

    /// Whether the reason still holds now that its slot is claimed: bytes moved since the
    /// check (a new request, an answer) may have ended it.
    fn holds(self, pump: &Pump<'_>) -> bool {
        match self {
            Yield::Dripping => pump.request_burst().is_some(),
            Yield::ReadsSlowly => pump.client_reads_slowly() || !pump.awaits_answer(),
            Yield::Idle => !pump.awaits_answer(),
        }
    }
}

impl Open<'_> {
    /// Moves bytes until both sides sent FIN or a clock, an eviction, the pool or shutdown
    /// ends the connection.
    pub async fn pump_until_end(self, mut w: Watched) -> Exit {
        let Open {
            ctx,
            ticket,
            lease,
            client,
            server,
            accepted,
            http1,
            resumed,
        } = self;
        // Counted while it lives: a worker carrying a few streams sleeps without yielding
        // (`turn`).
        let _carried = crate::turn::carry();
        let mut pump = Pump::new(client, server, &ctx.stats, w.policy.tcp.splice, http1);
        if let Some(s) = resumed {
            pump.restore(s);
        }
        let ctl = ticket.ctl().clone();
        // Registered once for the connection, not once per wake-up.
        let mut evicted = pin!(ctl.evicted());
        let mut lease_down = pin!(lease.aborted());
        // Only under a server's `max_conns` (boxed: nothing in the task otherwise).
        let mut claim = lease.yields_on_claim().then(|| Box::pin(lease.claimed()));
        let mut bell = pin!(w.next_ring(ctx));
        // Whether each waiter holds the task's waker (see `Waiter`), and the bell's count of
        // rings when its waiter was made.
        let (mut evicted_w, mut lease_w, mut bell_w) = (Waiter::NEW, Waiter::NEW, Waiter::NEW);
        let mut bell_at = ctx.guard.bell().rung();
        // Who sent FIN, and when: the half-closed clock counts from the later of that moment
        // and the last progress in the still-open direction, never from before the FIN.
        let mut closed: Option<(Side, Instant)> = None;
        // Half-closed past the grace: counted against the source's cap.
        let mut lingering = false;
        // (until, since): set when a kernel send queue was seen moving (or not yet judged)
        // as a clock expired; `since`: when the first of those extensions began, for
        // `timeouts.slow_reader_max`. Boxed: rare, and every held connection's future would
        // keep it.
        let mut extended: Option<Box<(Instant, Instant)>> = None;
        let start = Instant::now();
        let mut check = ProgressCheck {
            next: start + FIRST_STALL_CHECK,
            last: start,
            moved: pump.total(),
            from_client: pump.client_total(),
            yields: None,
        };
        let mut sleep = pin!(sleep_until(start + w.policy.timeouts.idle));
        // What a client that stops taking its bytes pins, weighed for the byte caps.
        let mut weight = Weight::new(ticket, start);
        loop {
            if let Err(end) = w.heard(ctx) {
                return Exit::End(end);
            }
            let under_pressure = ctx.guard.pressure();
            let now = Instant::now();
            // Scoped: what is borrowed would otherwise be kept in the future across the wait.
            let due = {
                let progress = Progress {
                    last_activity: pump.last_activity(),
                    closed,
                    open_direction_progress: closed
                        .map_or(now, |(side, _)| pump.last_open_progress(side)),
                    request_burst: pump.request_burst(),
                    stalled_since: pump.stalled_since(),
                };
                let rules = w.policy.rules();
                open_due(
                    &rules,
                    under_pressure,
                    w.observed,
                    accepted,
                    &progress,
                    extended.as_ref().map(|e| e.0),
                    now,
                )
            };
            if due.extension_over {
                extended = None;
                pump.forget_looks();
            }
            if let Some((deadline, clock)) = due.clock
                && deadline <= now
            {
                // Out of time by the progress stamps. A peer still acknowledging our bytes is
                // slow, not gone: look again shortly rather than discard its bytes with an RST.
                let within = match (
                    extended.as_ref().map(|e| e.1),
                    w.policy.timeouts.slow_reader_max,
                ) {
                    (Some(s), Some(max)) => now.duration_since(s) < max,
                    _ => true,
                };
                if clock != Timeout::MaxLifetime && clock != Timeout::Request && within {
                    let look = match pump.kernel_progress(w.policy.min_rate) {
                        KernelQueues::Moving | KernelQueues::Watching => true,
                        KernelQueues::Empty | KernelQueues::Stuck => false,
                    };
                    if look {
                        match &mut extended {
                            Some(e) => e.0 = now + RECHECK,
                            None => extended = Some(Box::new((now + RECHECK, now))),
                        }
                        continue;
                    }
                }
                if expire(ticket, &mut w.observed, clock) {
                    return Exit::End(End::TimedOut(clock));
                }
                extended = None;
                pump.forget_looks();
                continue;
            }
            if closed.is_none() && check.next <= now {
                // Nothing moved over the check's whole window: what it says of the
                // connection now it would say at every check while the connection parks.
                let quiet = pump.total() == check.moved;
                if let Err(r) = weigh_progress(ticket, lease, &mut pump, &w, &mut check, now) {
                    return Exit::End(End::from_refused(r));
                }
                // Idle long enough, on the plain path, with nothing outstanding and no bytes
                // weighed: out of the task, into the lot.
                if quiet
                    && claim.is_none()
                    && extended.is_none()
                    && !w.policy.observe
                    && weight.due().is_none()
                    && ticket.ctl().queued_bytes() == 0
                    && now.saturating_duration_since(pump.last_activity()) >= IDLE_PARK
                    && let Some(stamps) = pump.parkable()
                    && ctx.lot().is_some_and(|l| l.takes_idle())
                {
                    return Exit::Park(stamps);
                }
            }
            if weight.due().is_some_and(|at| at <= now)
                && let Err(r) = weight.look(ticket, &pump, server, now)
            {
                return Exit::End(End::from_refused(r));
            }
            // A half-closed connection's grace.
            if let Some((_, at)) = closed
                && !lingering
                && at + w.policy.grace <= now
            {
                lingering = true;
                if let Err(r) = ticket.lingering() {
                    return Exit::End(End::from_refused(r));
                }
            }
            let mut wake = due.clock.map_or(now + Duration::from_secs(3600), |c| c.0);
            if let Some(r) = due.request_wake {
                wake = wake.min(r);
            }
            if let Some(at) = weight.due() {
                wake = wake.min(at);
            }
            match closed {
                None => wake = wake.min(check.next),
                Some((_, at)) if !lingering => wake = wake.min(at + w.policy.grace),
                Some(_) => {}
            }
            if sleep.deadline() != wake {
                sleep.as_mut().reset(wake);
            }
            tokio::select! {
                biased;
                _ = poll_fn(|cx| evicted_w.poll(evicted.as_mut(), ctl.is_evicted(), cx)) => {
                    return Exit::End(End::Evicted);
                }
                // The server was marked down and its pool aborts its connections.
                _ = poll_fn(|cx| lease_w.poll(lease_down.as_mut(), lease.is_aborted(), cx)) => {
                    return Exit::End(End::Backend);
                }
                ev = poll_fn(|cx| pump.poll_event(cx)) => match ev {
                    Ok(Event::Closed) => {
                        lease.may_yield(false);
                        prove(ticket, &pump);
                        drop(pump);
                        // Boxed: the wait's state would sit in every open connection's
                        // future, and few clean closes find bytes still queued.
                        let Some(queued) = super::delivery::queued(client) else {
                            return Exit::End(End::Clean);
                        };
                        let wait = super::delivery::delivered(ctx, ticket, client, &mut w, queued);
                        return Exit::End(Box::pin(wait).await);
                    }
                    // A stall shortens the deadline: recompute it. A client that stopped
                    // taking bytes is weighed soon.
                    Ok(Event::Stalled) => weight.on_stall(&pump),
                    Ok(Event::Exchanged) => ticket.prove(),
                    Ok(Event::HalfClosed(side)) => {
                        // No progress check from now on: a half-closed connection yields
                        // nothing (the half-closed clock ends it).
                        lease.may_yield(false);
                        check.yields = None;
                        closed = Some((side, Instant::now()));
                        if let Err(r) = ticket.half_close() {
                            return Exit::End(End::from_refused(r));
                        }
                    }
                    Err(e) => {
                        prove(ticket, &pump);
                        return Exit::End(End::PeerError {
                            server_before_any_byte: e.side == Side::Server
                                && !pump.server_spoke()
                                && !pump.client_spoke(),
                        });
                    }
                },
                // A queued client claims the slot. After the pump, which has just taken what
                // the peers sent, so the look is at the connection as it is now.
                _ = poll_fn(|cx| claim.as_mut().map_or(Poll::Pending, |c| c.as_mut().poll(cx))) => {
                    if closed.is_none() && check.yields.is_some_and(|y| y.holds(&pump)) {
                        lease.give_up();
                        return Exit::End(End::Reclaimed);
                    }
                    lease.may_yield(false);
                    check.yields = None;
                    if let Some(c) = &mut claim {
                        c.set(lease.claimed());
                    }
                }
                // Progress may have moved the deadline since: the loop recomputes it.
                _ = &mut sleep => {}
                // Pressure, a reload or the end of the drain: the loop looks.
                _ = poll_fn(|cx| {
                    let rang = ctx.guard.bell().rung() != bell_at;
                    bell_w.poll(bell.as_mut(), rang, cx)
                }) => {
                    bell.set(w.next_ring(ctx));
                    bell_w = Waiter::NEW;
                    bell_at = ctx.guard.bell().rung();
                }
            }
        }
    }
}

/// A waiter the pump loop selects on (an eviction, the lease's abort, the bell) keeps the
/// task's waker from its first poll until it fires, and what fires it sets a flag first. So
/// after that first poll it is polled again only when its flag says it may have fired:
/// polling it on every wake-up took its lock to find nothing, three times per wake-up, twice
/// per request of a keep-alive connection. Only for waiters that never answer `Pending`
/// without holding the waker (no cooperative budget: a `Notified`, a cancellation, not a
/// timer), in a task whose every poll passes the same task's waker.
#[derive(Clone, Copy)]
struct Waiter {
    polled: bool,
}

impl Waiter {
    const NEW: Waiter = Waiter { polled: false };

    fn poll<F: Future>(
        &mut self,
        fut: std::pin::Pin<&mut F>,
        fired: bool,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<F::Output> {
        if self.polled && !fired {
            return Poll::Pending;
        }
        self.polled = true;
        fut.poll(cx)
    }
}

/// Once the connection has completed an exchange (the client spoke, the server answered),
/// the ticket knows: its source may hold more than its cap while there is room, and gets back
/// what the connection took of its rate.
fn prove(ticket: &mut Ticket, pump: &Pump<'_>) {
    if pump.server_spoke() && pump.client_spoke() {
        ticket.prove();
    }
}

/// The progress check: the bytes moved both ways since the last one against `min_rate`.
/// Below it the connection is stalled (evictable when the listener is full), and a client
/// still in its request has its bytes held in the kernel until the next check (see
/// `Pump::hold_client`); only while the request clock judges it, never in observe mode.
fn weigh_progress(
    ticket: &mut Ticket,
    lease: &Lease,
    pump: &mut Pump<'_>,
    w: &Watched,
    check: &mut ProgressCheck,
    now: Instant,
) -> Result<(), Refused> {
    let total = pump.total();
    let window = now.saturating_duration_since(check.last).as_secs_f64();
    let floor = f64::from(w.policy.min_rate) * window;
    let stalled = ((total - check.moved) as f64) < floor;
    if stalled {
        ticket.stall()?;
    } else {
        ticket.unstall()?;
    }
    // Why it is stalled: a slow reader (bytes its peer does not take) or a drip (the client
    // still sending its request below the rate, for longer than a check's window: a request
    // sent at once and then waited on, a long poll, is not one) will not end soon and keeps
    // its source at its caps; an idle connection (a pool between requests) may end any
    // moment, and costs little.
    let from_client = pump.client_total();
    let kind = if pump.stalled_since().is_some() {
        Stall::Blocked
    } else if from_client > check.from_client
        && pump
            .request_burst()
            .is_some_and(|b| b.last.saturating_duration_since(b.start) >= STALL_WINDOW)
    {
        Stall::Dripping
    } else {
        Stall::Idle
    };
    ticket.ctl().set_stall(kind);
    if lease.yields_on_claim() {
        check.yields = Yield::of(stalled, kind, pump);
        lease.may_yield(check.yields.is_some());
    }
    check.from_client = from_client;
    check.moved = total;
    check.last = now;
    check.next = now + STALL_WINDOW;
    if stalled
        && !w.policy.observe
        && w.policy.timeouts.request.is_some()
        && pump.request_burst().is_some()
    {
        let enough = u64::from(w.policy.min_rate) * STALL_WINDOW.as_secs();
        pump.hold_client(check.next, enough);
    }
    Ok(())
}
