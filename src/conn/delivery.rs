//! DELIVERY: both FINs are in, and what halfguard queued toward the client is not yet
//! delivered.
//!
//! A close hands the socket to the kernel with whatever sits in its send queue: toward a
//! client that half-closed and stopped reading, that is an orphan in LAST-ACK or FIN_WAIT
//! holding megabytes that no cap counts, for as long as the kernel's retries last. So a clean
//! close waits here first, still counted (half-closed, against its source's cap past the
//! grace, evictable when the listener is full), until the kernel send queue is empty; the
//! write-stall clock judges the wait (it restarts whenever the queue shrinks), and past it
//! the connection is aborted with RST, which frees the queue at once. A client that reads
//! what it asked for costs one `SIOCOUTQ` at its close.

use std::pin::pin;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, sleep};

use super::{End, ListenerCtx, Watched, expire};
use crate::guard::{State, Ticket};
use crate::sockopt;
use crate::stats::Timeout;

/// The first look at a queue that did not drain comes this soon; later looks back off.
const FIRST_LOOK: Duration = Duration::from_millis(20);
/// How often a queue that does not drain is looked at, at most.
const MAX_LOOK: Duration = Duration::from_millis(500);

/// The bytes still queued toward the client at a clean close, if any: only then is there a
/// wait ([`delivered`]), whose state the caller boxes so that it does not sit in every open
/// connection's future.
pub(super) fn queued(client: &TcpStream) -> Option<u32> {
    sockopt::unacked(client).filter(|&q| q > 0)
}

/// Waits until the client's send queue (`queued` bytes at the close) is delivered, then says
/// the connection ended clean.
pub(super) async fn delivered(
    ctx: &ListenerCtx,
    ticket: &mut Ticket,
    client: &TcpStream,
    w: &mut Watched,
    mut queued: u32,
) -> End {
    // Both FINs came in one turn: the connection was never counted half-closed.
    if ticket.state() == State::Open
        && let Err(r) = ticket.half_close()
    {
        return End::from_refused(r);
    }
    let since = Instant::now();
    let mut progress = since;
    let mut lingering = false;
    let mut look = FIRST_LOOK;
    let ctl = ticket.ctl().clone();
    let mut evicted = pin!(ctl.evicted());
    loop {
        // Made before the look, so that no ring falls between them.
        let mut bell = pin!(w.next_ring(ctx));
        if let Err(end) = w.heard(ctx) {
            return end;
        }
        tokio::select! {
            biased;
            _ = &mut evicted => return End::Evicted,
            _ = &mut bell => continue,
            _ = sleep(look) => {}
        }
        look = (look * 2).min(MAX_LOOK);
        let now = Instant::now();
        // The client reset (its socket was closed with our bytes on the way): nothing is
        // queued any more, whatever the sequence numbers the send-queue size comes from say.
        if !matches!(client.take_error(), Ok(None)) {
            return End::PEER_ERROR;
        }
        match sockopt::unacked(client) {
            None | Some(0) => return End::Clean,
            Some(q) if q < queued => {
                queued = q;
                progress = now;
            }
            Some(_) => {}
        }
        // Counted against the byte caps while it waits, as a blocked connection is.
        if let Err(r) = ticket.set_queued(u64::from(queued)) {
            return End::Refused(r);
        }
        if !lingering && since + w.policy.grace <= now {
            lingering = true;
            if let Err(r) = ticket.lingering() {
                return End::from_refused(r);
            }
        }
        if progress + w.policy.timeouts.write_stall <= now {
            if expire(ticket, &mut w.observed, Timeout::WriteStall) {
                return End::TimedOut(Timeout::WriteStall);
            }
            // Observing: the close goes ahead as it always did.
            return End::Clean;
        }
    }
}
