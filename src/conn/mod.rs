//! One connection's task: its phases, in the order it lives them, and how it ended.
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
//! The files, one phase each: [`half_open`] (a provisional slot confirmed, a trusted
//! balancer's PROXY header, the server-first connect, the silent wait for a first byte),
//! [`parked`] (where a connection that has not spoken when admitted waits instead, without
//! a task, until its first byte: [`start`] decides),
//! [`open`] (the pump loop through OPEN and HALF_CLOSED, the progress check, the kernel
//! send-queue look before a clock aborts), [`clocks`] (what the clocks say, a pure function of
//! the progress the [`pump`] records), and [`policy`] (what a listener's connections share).
//! [`serve`] runs the phases and counts how the connection ended, once: a refusal or an
//! eviction is counted by the guard that decided it, every other end here.

mod clocks;
mod delivery;
mod half_open;
mod holding;
mod open;
mod parked;
mod policy;
mod pump;
mod weight;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

pub use clocks::{FIRST_STALL_CHECK, STALL_WINDOW};
pub use half_open::CONFIRM_WAIT;
pub use parked::Lot;
pub use policy::{ListenerCtx, Policy};
pub use pump::{BUF_SIZE, Event, KernelQueues, Pump, PumpError, Side};

use crate::backend::{BackendError, Lease, ProxiedAddrs};
use crate::guard::{Refused, Ticket};
use crate::sockopt;
use crate::stats::{Reject, Timeout};
use clocks::Observed;

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// FIN both ways (or a client that closed before saying anything).
    Clean,
    TimedOut(Timeout),
    /// Aborted to make room for a newcomer: counted by the guard when it chose the victim,
    /// under the state the victim was in.
    Evicted,
    /// Refused after admission, for this reason: counted by the guard that refused it.
    Refused(Reject),
    /// No backend to be had: all down, the name unresolved, or none answering.
    Backend,
    /// Gave its backend slot to a queued client, not making progress on a request: counted
    /// by the pool (`Lease::give_up`).
    Reclaimed,
    /// A socket failed (a reset, a kernel timeout). `server_before_any_byte`: the server
    /// reset the connection before any byte moved either way, which passive health counts
    /// against it (after a client byte, the client may have provoked it).
    PeerError {
        server_before_any_byte: bool,
    },
    Shutdown,
}

impl End {
    const PEER_ERROR: End = End::PeerError {
        server_before_any_byte: false,
    };

    fn from_refused(r: Refused) -> End {
        match r {
            Refused::Evicted => End::Evicted,
            Refused::Full(reason) => End::Refused(reason),
        }
    }

    fn from_backend(ticket: &Ticket, e: &BackendError) -> End {
        match e {
            BackendError::TimedOut => End::TimedOut(Timeout::Connect),
            BackendError::QueueTimeout => End::TimedOut(Timeout::Queue),
            BackendError::QueueFull => {
                ticket.refuse(Reject::QueueFull);
                End::Refused(Reject::QueueFull)
            }
            BackendError::AllDown | BackendError::Unavailable | BackendError::Resolve { .. } => {
                End::Backend
            }
        }
    }
}

/// The policy a connection runs under, the clocks observe mode has already counted for it,
/// and the rings of the listener's bell (pressure, reload, abort) it has acted on.
struct Watched {
    policy: Arc<Policy>,
    observed: Observed,
    rung: u64,
    /// Which of the bell's shards this connection waits on.
    shard: usize,
}

impl Watched {
    fn new(ctx: &ListenerCtx, shard: usize) -> Watched {
        Watched {
            rung: ctx.guard.bell().rung(),
            policy: ctx.policy.load_full(),
            observed: Observed::default(),
            shard,
        }
    }

    /// The waiter for the bell's next ring. Make it before [`Watched::heard`], which then
    /// sees any ring the waiter would not.
    fn next_ring<'a>(&self, ctx: &'a ListenerCtx) -> Notified<'a> {
        ctx.guard.bell().next_ring(self.shard)
    }

    /// If the bell rang since the last look: `Err(End::Shutdown)` once the listener aborts
    /// what is left, or else the policy in force (a reload's). Pressure is read where it is
    /// used.
    fn heard(&mut self, ctx: &ListenerCtx) -> Result<(), End> {
        let rung = ctx.guard.bell().rung();
        if rung == self.rung {
            return Ok(());
        }
        self.rung = rung;
        if ctx.is_aborted() {
            return Err(End::Shutdown);
        }
        self.policy = ctx.policy.load_full();
        Ok(())
    }
}

/// A clock ran out: `true` when the connection must end, `false` when observe mode counted
/// it (and it is now disarmed for this connection).
fn expire(ticket: &Ticket, observed: &mut Observed, clock: Timeout) -> bool {
    if ticket.observe(crate::stats::Observed::TimeOut(clock)) {
        observed.set(clock);
        false
    } else {
        ticket.cut_by_clock();
        true
    }
}

/// Serves one admitted connection to its end, and counts the end.
///
/// An `async` block, not an `async fn`: a function's arguments would be kept twice in the
/// task (as arguments and as the locals they move into), and a silent connection is little
/// more than its task.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
///
/// `looked`: what the look at accept saw (`conn::start`): the client has spoken, and this is
/// the judgement of its first bytes; `None` when nothing looked yet (a parked connection
/// woken, or one that was not looked at).
fn serve(
    ctx: Arc<ListenerCtx>,
    client: TcpStream,
    peer: SocketAddr,
    mut ticket: Ticket,
    accepted: Instant,
    looked: Option<Option<holding::Held>>,
) -> impl Future<Output = ()> + Send {
    async move {
        let mut server = None;
        let at = (peer, accepted, looked);
        let end = match phases(&ctx, &client, at, &mut server, &mut ticket).await {
            Ok(open::Exit::End(end)) | Err(end) => end,
            Ok(open::Exit::Park(stamps)) => match server {
                Some((server, lease)) => {
                    let conn = (client, server);
                    return parked::park_idle(&ctx, conn, lease, ticket, accepted, stamps);
                }
                None => End::Backend,
            },
        };
        finish(&ctx, end, client, server, ticket, accepted);
    }
}

/// A connection woken from the lot after it parked idle (`conn::parked`): back in the pump
/// loop where it left it, until it ends or parks again.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn resume(
    ctx: Arc<ListenerCtx>,
    (client, server): (TcpStream, TcpStream),
    lease: Lease,
    mut ticket: Ticket,
    accepted: Instant,
    stamps: pump::Stamps,
    shard: usize,
) -> impl Future<Output = ()> + Send {
    async move {
        let w = Watched::new(&ctx, shard);
        // The drain ended as it woke: the bell rang before this connection listened.
        let exit = if ctx.is_aborted() {
            open::Exit::End(End::Shutdown)
        } else {
            let o = open::Open {
                ctx: &ctx,
                ticket: &mut ticket,
                lease: &lease,
                client: &client,
                server: &server,
                accepted,
                http1: stamps.http1,
                resumed: Some(&stamps),
            };
            o.pump_until_end(w).await
        };
        match exit {
            open::Exit::End(end) => {
                finish(&ctx, end, client, Some((server, lease)), ticket, accepted)
            }
            open::Exit::Park(stamps) => {
                parked::park_idle(&ctx, (client, server), lease, ticket, accepted, stamps);
            }
        }
    }
}

/// The end of a connection, with a task or without (refused by the look at accept, parked,
/// or at the end of its task; no server before it connected one): counted once, both sockets reset unless
/// it closed cleanly, then closed (the lease with the server socket), and the ticket gives
/// the counts back last.
fn finish<S: std::os::fd::AsFd>(
    ctx: &ListenerCtx,
    end: End,
    client: S,
    server: Option<(S, Lease)>,
    ticket: Ticket,
    accepted: Instant,
) {
    if let End::PeerError {
        server_before_any_byte: true,
    } = end
        && let Some((_, lease)) = &server
    {
        lease.early_reset();
    }
    count_end(&ctx.stats, end);
    if end != End::Clean {
        sockopt::abort(&client);
        if let Some((s, _)) = &server {
            sockopt::abort(s);
        }
    }
    drop(server);
    drop(client);
    drop(ticket);
    ctx.stats.duration.observe(accepted.elapsed());
}

/// Counts how a connection ended, once (a refusal, an eviction or a reclaim was counted by
/// whoever decided it).
fn count_end(stats: &crate::stats::Stats, end: End) {
    match end {
        End::Clean => {
            stats.closed_clean.fetch_add(1, Relaxed);
        }
        End::TimedOut(t) => stats.time_out(t),
        End::Evicted | End::Refused(_) => {} // counted by the guard that decided it
        End::Reclaimed => {}                 // counted by the pool
        End::Backend => {
            stats.backend_unavailable.fetch_add(1, Relaxed);
        }
        End::PeerError { .. } => {
            stats.peer_errors.fetch_add(1, Relaxed);
        }
        End::Shutdown => {
            stats.aborted_on_shutdown.fetch_add(1, Relaxed);
        }
    }
}

/// Starts an admitted connection. A client that has not spoken by now is parked
/// (`conn::parked`): no task, no tokio registration, until its first byte. To tell, the
/// socket is looked at once here, and that look is the one the connection's task would make
/// first, handed to it: a client that sent its request with its handshake (most) costs no
/// syscall more than before, and is never parked.
///
/// Parked only on the plain path: a connection waiting for its source's slot, a trusted
/// balancer's (its PROXY header comes first) and a server-first listener's (connected now)
/// start their task at once, as do all under observe mode.
pub fn start(
    ctx: &Arc<ListenerCtx>,
    lot: Option<&Arc<Lot>>,
    tracker: &TaskTracker,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    ticket: Ticket,
) {
    let accepted = Instant::now();
    let mut looked = None;
    let (mut stream, mut ticket) = (stream, ticket);
    if let Some(lot) = lot
        && !ticket.is_provisional()
        && !ticket.is_trusted()
    {
        let (expect, max, plain) = {
            let p = ctx.policy.load();
            (
                p.first_message,
                p.max_first_message,
                p.protocol == crate::config::Protocol::ClientFirst && !p.observe,
            )
        };
        if plain {
            // The look the task would make first (`phases`): the whole first message when
            // the listener holds it, one byte otherwise.
            let look = if expect == crate::first_message::Expect::Any {
                holding::look_at(&stream, expect, 1).map(|(n, _)| (n, None))
            } else {
                holding::look_at(&stream, expect, max)
            };
            match look {
                Err(end) => return finish(ctx, end, stream, None, ticket, accepted),
                Ok((0, _)) => {
                    let r = parked::Record::new(stream, ticket, peer, accepted);
                    match lot.park(ctx, r) {
                        Ok(()) => return,
                        // The lot is closed (the listener stops) or epoll refused it: a task.
                        Err(r) => (stream, ticket) = r.into_parts(),
                    }
                }
                Ok((_, held)) => looked = Some(held),
            }
        }
    }
    spawn(ctx, tracker, stream, peer, ticket, accepted, looked);
}

/// The connection's task, from its socket given to tokio.
fn spawn(
    ctx: &Arc<ListenerCtx>,
    tracker: &TaskTracker,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    ticket: Ticket,
    accepted: Instant,
    looked: Option<Option<holding::Held>>,
) {
    match TcpStream::from_std(stream) {
        Ok(stream) => {
            tracker.spawn(serve(ctx.clone(), stream, peer, ticket, accepted, looked));
        }
        // The reactor would not take it (out of memory): the socket is closed, and the
        // ticket gives its counts back as it drops.
        Err(_) => {
            ctx.stats.accept_errors.fetch_add(1, Relaxed);
        }
    }
}

/// The phases in order; each returns early with the end it met (`Err`).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn phases<'a>(
    ctx: &'a ListenerCtx,
    client: &'a TcpStream,
    (peer, accepted, looked): (SocketAddr, Instant, Option<Option<holding::Held>>),
    server_slot: &'a mut Option<(TcpStream, Lease)>,
    ticket: &'a mut Ticket,
) -> impl Future<Output = Result<open::Exit, End>> + 'a {
    // An `async` block for the reason `serve` is one.
    async move {
        if ticket.is_provisional() {
            half_open::confirm_slot(ticket, ctx).await?;
        }
        let mut w = Watched::new(ctx, usize::from(peer.port()));
        // Aborted before this connection listened for the bell: it would not hear of it.
        if ctx.is_aborted() {
            return Err(End::Shutdown);
        }
        // The local address costs a syscall: only a PROXY header toward the servers needs it.
        let local = if w.policy.backends.config().proxy_protocol.is_some() {
            client.local_addr().map_err(|_| End::PEER_ERROR)?
        } else {
            peer
        };
        let mut addrs = ProxiedAddrs {
            client: peer,
            local,
        };
        let mut hs = half_open::HalfOpen {
            ctx,
            client,
            ticket,
            accepted,
        };
        if hs.ticket.is_trusted() {
            // Boxed: only a trusted balancer's connections read a header, and not for long.
            addrs = Box::pin(hs.proxy_header(&mut w, addrs)).await?;
        }
        if w.policy.protocol == crate::config::Protocol::ServerFirst {
            *server_slot = Some(hs.connect(&mut w, addrs).await?);
        }
        // On a client-first listener nothing reaches a backend before the client's first
        // message is whole. Most clients have sent it, whole, by the time they are accepted:
        // the one look that judges it is also the look for a first byte.
        let expect = w.policy.first_message;
        let holds = server_slot.is_none() && expect != crate::first_message::Expect::Any;
        let (mut spoke, mut first) = (false, None);
        if let Some(held) = looked {
            // Looked at accept (`start`): it spoke, and this is what it said.
            (spoke, first) = (true, held);
        } else if holds {
            let h = holding::Holding {
                ctx,
                client,
                ticket: &mut *hs.ticket,
                accepted,
            };
            let (n, held) = h.look(expect, w.policy.max_first_message, false)?;
            (spoke, first) = (n > 0, held);
        }
        if !spoke {
            hs.first_byte(&mut w, server_slot.as_ref().map(|s| &s.0), holds)
                .await?;
        }
        let held = match first {
            Some(held) => held,
            // Boxed, as the pump is: most first messages are whole at the first look.
            None if holds => {
                let mut h = holding::Holding {
                    ctx,
                    client,
                    ticket: &mut *hs.ticket,
                    accepted,
                };
                Box::pin(h.first_message(&mut w, expect)).await?
            }
            None => holding::Held::Unframed,
        };

        // OPEN.
        ticket.open().map_err(End::from_refused)?;
        if server_slot.is_none() {
            let hs = half_open::HalfOpen {
                ctx,
                client,
                ticket,
                accepted,
            };
            *server_slot = Some(hs.connect(&mut w, addrs).await?);
        }
        let Some((server, lease)) = server_slot.as_ref() else {
            return Err(End::Backend);
        };
        // Boxed: the pump and its clocks go on the heap only once bytes move, so a silent
        // connection's task stays small.
        let o = open::Open {
            ctx,
            ticket,
            lease,
            client,
            server,
            accepted,
            http1: held == holding::Held::Whole(crate::first_message::Proto::Http1),
            resumed: None,
        };
        Ok(Box::pin(o.pump_until_end(w)).await)
    }
}

#[cfg(test)]
mod tests {
    /// The size of what `make` returns, without making it (the closure is never called).
    fn output_size<A, T>(_make: impl FnOnce(A) -> T) -> usize {
        std::mem::size_of::<T>()
    }

    /// A held connection is little more than its task and, once bytes moved, the boxed pump
    /// loop: what those futures keep is what every held connection costs in memory. The
    /// task (tokio's cell, the `serve` future and about 112 bytes, rounded up to 128) stays
    /// at 1,024 bytes; the loop keeps the pump, its timer, its three waiters and the byte weight, and little
    /// of a turn's reckoning beside them (not the wait at a clean close, boxed when it is
    /// needed). Sizes are the release build's (`cargo test --release --lib conn::tests`):
    /// a debug build lays futures out larger.
    #[test]
    #[cfg_attr(debug_assertions, ignore = "sizes are the release build's")]
    fn a_held_connection_s_futures_stay_small() {
        let serve = output_size(|(ctx, client, peer, ticket, accepted, looked)| {
            super::serve(ctx, client, peer, ticket, accepted, looked)
        });
        let open =
            output_size(|(o, w): (super::open::Open<'static>, super::Watched)| o.pump_until_end(w));
        let waiters = std::mem::size_of::<super::Pump<'static>>()
            + std::mem::size_of::<tokio::time::Sleep>()
            + std::mem::size_of::<tokio::sync::futures::Notified<'static>>()
            + output_size(|l: &'static crate::backend::Lease| l.aborted())
            + output_size(|c: &'static crate::guard::ConnCtl| c.evicted())
            + std::mem::size_of::<super::weight::Weight>();
        eprintln!(
            "serve future: {serve} bytes, pump loop future: {open} bytes ({waiters} of it the pump, its timer, its waiters and its weight)"
        );
        assert!(serve <= 912, "serve future: {serve} bytes");
        assert!(open <= waiters + 512, "pump loop future: {open} bytes");
    }
}
