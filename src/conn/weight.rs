//! What a connection whose client does not take its bytes pins, weighed soon after it
//! blocks: the byte caps (`guard::bytes`) act on the weight before the backend's answer
//! has filled every buffer on the way.
//!
//! A client that stops reading pins its send queue here, what its backend sent that waits
//! unread in our socket, and, when the backend runs on this host, the backend's own send
//! queue (on loopback it starts near 2.6 MB: most of the cost). All of it lands within
//! milliseconds of the answer, so the progress check's one look a second is too late: a
//! flood of such clients would reach every cap's worth of connections first. The first look
//! comes [`FIRST_LOOK`] after the client's window closes, the second at [`SECOND_LOOK`]
//! (the backend's queue has filled by then), then one a [`STALL_WINDOW`] while it stays
//! blocked, half-closed connections included. A client that takes bytes again before a look
//! costs nothing but that look's timer: bulk transfers block and unblock all the time.
//! Early looks count the bytes (the source's newcomers are charged and refused by them, and
//! over the listener's cap the heavy are cut). The source's own cap cuts a connection once it
//! has been blocked a [`STALL_WINDOW`], or as soon as a look finds that since the last one
//! (or since the pump started) it took less than a second's share of what it pins (a reader
//! that would need seconds to drain its queue, or none at all): a bulk reader whose window
//! shuts many times a second is not one that left.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::clocks::STALL_WINDOW;
use super::pump::Pump;
use crate::guard::{Refused, Ticket};
use crate::memory::peer::{self, PeerQueue};

/// How long a client's window stays closed before its bytes are weighed: soon, because a
/// flood's connections arrive a millisecond apart and each pulls megabytes within a few, and
/// until the first look none of them is charged to its source's newcomers (10 ms let a
/// burst of one source reach 59 MB of kernel memory; 2 ms, 25). A reader whose window shuts
/// longer costs a look (two ioctls and one netlink round trip) and nothing else.
pub const FIRST_LOOK: Duration = Duration::from_millis(2);
/// The second look: the backend's send queue has filled by then.
pub const SECOND_LOOK: Duration = Duration::from_millis(100);

/// Where the backend's socket is, as far as the kernel told.
enum Backend {
    /// Not asked yet.
    Unasked,
    /// On this host: our end's address and the backend's (boxed: most connections never ask).
    Here(Box<(SocketAddr, SocketAddr)>),
    /// Elsewhere, or not to be found: its memory is not this host's.
    Elsewhere,
}

pub(super) struct Weight {
    next: Option<Instant>,
    backend: Backend,
    /// At the last look (at first, the pump's start): when, and the bytes the client had
    /// taken by then.
    seen: (Instant, u64),
}

impl Weight {
    /// A connection charged at admission with its source's expected weight is looked at
    /// once its backend has had time to answer, blocked or not: the look replaces the
    /// charge with what it pins.
    pub fn new(ticket: &Ticket, now: Instant) -> Self {
        let charged = ticket.ctl().queued_bytes() > 0;
        Weight {
            next: charged.then(|| now + SECOND_LOOK),
            backend: Backend::Unasked,
            seen: (now, 0),
        }
    }

    /// The pump reported a stall: if its client stopped taking bytes, look soon.
    pub fn on_stall(&mut self, pump: &Pump<'_>) {
        if self.next.is_none()
            && let Some(since) = pump.client_blocked_since()
        {
            self.next = Some(since + FIRST_LOOK);
        }
    }

    /// When the next look is due.
    pub fn due(&self) -> Option<Instant> {
        self.next
    }

    /// The look: a client still blocked reports what it pins (over a byte cap, the
    /// connection is to be cut); one that took its bytes reports none.
    pub fn look(
        &mut self,
        ticket: &Ticket,
        pump: &Pump<'_>,
        server: &TcpStream,
        now: Instant,
    ) -> Result<(), Refused> {
        let sent = pump.client_send_queue();
        let taken = pump.delivered_to_client(sent);
        // Slow: since the last look (or its start) it took less than a second's share of
        // `pinned` (a paused or dripping reader; a bulk reader drains its queue many times
        // a second, however often its window shuts).
        let (at, before) = self.seen;
        let slow = |pinned: u64| {
            let took = u128::from(taken.saturating_sub(before));
            let share = u128::from(pinned) * now.saturating_duration_since(at).as_micros();
            took * 1_000_000 < share
        };
        let reported = ticket.ctl().queued_bytes();
        let since = pump.client_blocked_since();
        let blocked = match since {
            Some(since) => now.saturating_duration_since(since),
            // Its window is open: one that reads reports nothing; a slow reader that took
            // a few bytes still pins what it did.
            None if slow(reported) => Duration::ZERO,
            None => {
                self.next = None;
                self.seen = (now, taken);
                return ticket.set_queued(0).map_err(Refused::Full);
            }
        };
        if blocked < FIRST_LOOK && !slow(reported) {
            self.next = since.map(|since| since + FIRST_LOOK);
            return Ok(());
        }
        self.next = Some(match since {
            Some(since) if blocked < SECOND_LOOK => since + SECOND_LOOK,
            _ => now + STALL_WINDOW,
        });
        self.seen = (now, taken);
        let queued = self.queued(pump, server, sent);
        // Its source's cap cuts a client blocked for a progress check's window, or one
        // that takes its bytes too slowly to ever drain what it pins; not one that paused
        // for a moment: until then its bytes only hold its source's newcomers back.
        if blocked >= STALL_WINDOW || slow(queued.max(reported)) {
            ticket.set_queued(queued)
        } else {
            ticket.set_queued_early(queued)
        }
        .map_err(Refused::Full)
    }

    /// Bytes queued toward the client: ours (its send queue, the backend's unread bytes)
    /// and the backend's own send queue when it is on this host.
    fn queued(&mut self, pump: &Pump<'_>, server: &TcpStream, sent: u64) -> u64 {
        pump.queued_toward_client(sent) + u64::from(self.backend_queue(server))
    }

    fn backend_queue(&mut self, server: &TcpStream) -> u32 {
        if matches!(self.backend, Backend::Unasked) {
            self.backend = match (server.local_addr(), server.peer_addr()) {
                (Ok(l), Ok(p)) => Backend::Here(Box::new((l, p))),
                _ => Backend::Elsewhere,
            };
        }
        let Backend::Here(addrs) = &self.backend else {
            return 0;
        };
        match peer::send_queue(addrs.0, addrs.1) {
            PeerQueue::Local(q) => q,
            PeerQueue::Elsewhere | PeerQueue::Unknown => {
                self.backend = Backend::Elsewhere;
                0
            }
        }
    }
}
