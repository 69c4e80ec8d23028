//! HOLDING: the client has spoken, and its first message stays in the kernel until it is
//! whole; only then is a backend connected.
//!
//! A backend's workers are scarcer than halfguard's sockets (Apache has 64, PostgreSQL 100):
//! a client that drips its request must not hold one. So on a client-first listener the
//! connection stays HALF_OPEN after its first byte, its bytes are looked at (`MSG_PEEK`, never
//! taken: the pump reads them once the backend is there, and halfguard holds no buffer for a
//! dripping client), and [`crate::first_message::judge`] says when the first message is whole:
//! an HTTP/1 request head, an HTTP/2 preface and its SETTINGS, a TLS ClientHello, a PostgreSQL
//! startup packet. A protocol it does not frame connects at once, as before.
//!
//! The request clock judges the wait (its allowance plus a second per `min_rate` bytes, within
//! `request_max`; the first-byte clock when the request clock is off): a message that does not
//! complete in time ends with RST, counted as `timed_out{timeout="first_message"}`, and no
//! backend ever saw it. Past `limits.grace` the connection counts against its source's
//! half-open cap, like a silent one, and is evictable when the listener is full. A message
//! that fills `limits.max_first_message` connects (it came at `min_rate` or better, or the
//! clock would have ended it); one whose client sent FIN before it was whole ends there (it
//! can never be whole), closed cleanly, and no backend sees it.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::pin;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

use super::half_open::{Woke, poll_woke};
use super::pump::Burst;
use super::{End, ListenerCtx, Watched, expire};
use crate::first_message::{Expect, Judgement, Proto, judge};
use crate::guard::Ticket;
use crate::sockopt;
use crate::stats::Timeout;

thread_local! {
    /// Where a held first message is looked at: one per worker thread, not per connection.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A connection whose client has spoken, before its backend.
pub(super) struct Holding<'a> {
    pub ctx: &'a ListenerCtx,
    pub client: &'a TcpStream,
    pub ticket: &'a mut Ticket,
    pub accepted: Instant,
}

/// How the wait ended, when it lets the connection go on to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Held {
    /// The first message is whole.
    Whole(Proto),
    /// Not a protocol halfguard frames, or the listener frames none: connect at once.
    Unframed,
    /// The message filled `max_first_message`, or observe mode let a late one go on.
    AsIs,
}

/// Counts the connection as holding (the `first_message` state) while it waits.
struct Gauge<'a>(&'a ListenerCtx);

impl<'a> Gauge<'a> {
    fn new(ctx: &'a ListenerCtx) -> Gauge<'a> {
        ctx.stats
            .holding
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Gauge(ctx)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        (self.0.stats.holding).fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Holding<'_> {
    /// Waits until the first message is whole (or the protocol is one halfguard does not
    /// frame), within the request clock. Called when [`Holding::look`] found it incomplete:
    /// most first messages come whole in the first segment, and are judged before anything
    /// waits (or is allocated).
    pub async fn first_message(&mut self, w: &mut Watched, expect: Expect) -> Result<Held, End> {
        let _gauge = Gauge::new(self.ctx);
        // Counted in its source's entry too, for `/sources`; a connection that ends here
        // gives the count back with its ticket.
        self.ticket.set_holding(true);
        let r = self.wait_whole(w, expect).await;
        self.ticket.set_holding(false);
        r
    }

    async fn wait_whole(&mut self, w: &mut Watched, expect: Expect) -> Result<Held, End> {
        let max = w.policy.max_first_message;
        let (mut seen, first) = self.look(expect, max, true)?;
        if let Some(held) = first {
            return Ok(held);
        }
        let start = Instant::now();
        let ctl = self.ticket.ctl().clone();
        let mut evicted = pin!(ctl.evicted());
        let mut bell = pin!(w.next_ring(self.ctx));
        let mut sleep = pin!(sleep_until(start));
        let mut counted = false;
        loop {
            w.heard(self.ctx)?;
            let pressure = self.ctx.guard.pressure();
            let rules = w.policy.rules();
            let now = Instant::now();
            let burst = Burst {
                start,
                bytes: seen as u64,
                last: now,
            };
            let clock = match rules.request_deadline(pressure, burst) {
                Some(at) => at,
                None => self.accepted + rules.first_byte(pressure),
            };
            let clock = match rules.lifetime(self.accepted) {
                Some((at, _)) => clock.min(at),
                None => clock,
            };
            let grace = (!counted).then_some(self.accepted + w.policy.grace);
            let wake = grace.map_or(clock, |g| g.min(clock));
            if sleep.deadline() != wake {
                sleep.as_mut().reset(wake);
            }
            let woke = poll_fn(|cx| {
                poll_woke(
                    cx,
                    evicted.as_mut(),
                    self.client,
                    None,
                    sleep.as_mut(),
                    bell.as_mut(),
                )
            })
            .await;
            match woke {
                Woke::Evicted => return Err(End::Evicted),
                Woke::Client(Err(_)) | Woke::Server(_) => return Err(End::PEER_ERROR),
                Woke::Client(Ok(())) => {
                    let (n, held) = self.look(expect, max, true)?;
                    if let Some(held) = held {
                        return Ok(held);
                    }
                    // Readable and nothing new: the client sent FIN, or the wake-up was
                    // stale. After a FIN the message can never be whole: it ends here, and
                    // no backend is connected only to answer a torn request (a drip flood
                    // whose clients exit would otherwise send each one's half to a worker).
                    if n == seen && read_closed(self.client) {
                        // Taken, so that the close is a FIN, not the RST a socket with
                        // unread bytes gets.
                        self.discard(n);
                        return Err(End::Clean);
                    }
                    seen = n;
                }
                Woke::Clock => {
                    let now = Instant::now();
                    if clock <= now {
                        let t = match rules.lifetime(self.accepted) {
                            Some((at, t)) if at <= now => t,
                            _ => Timeout::FirstMessage,
                        };
                        if expire(self.ticket, &mut w.observed, t) {
                            return Err(End::TimedOut(t));
                        }
                        return Ok(Held::AsIs);
                    }
                    if grace.is_some_and(|g| g <= now) {
                        counted = true;
                        self.ticket.silent().map_err(End::from_refused)?;
                    }
                }
                Woke::Bell => bell.set(w.next_ring(self.ctx)),
            }
        }
    }

    /// Looks at what the client has sent so far, without taking it: how many bytes, and
    /// whether the wait is over. `wait`: the connection waits after this look, so the
    /// socket's readiness is cleared first, and bytes arriving after the look wake it again
    /// (the pump then reads straight from the kernel until it has drained what was there:
    /// see `Pump`'s fresh reads). The first look does not touch it, so a whole message
    /// costs the pump nothing more.
    pub fn look(
        &self,
        expect: Expect,
        max: usize,
        wait: bool,
    ) -> Result<(usize, Option<Held>), End> {
        if wait {
            let _ = self
                .client
                .try_io(Interest::READABLE, || -> io::Result<()> {
                    Err(io::ErrorKind::WouldBlock.into())
                });
        }
        look_at(self.client, expect, max)
    }
}

/// One look at what the client has sent so far, not taken: how many bytes (0: nothing yet),
/// and whether the wait for the first message is over. `Err(End::Clean)` when the client
/// closed before saying anything. Also made at accept, on a socket tokio does not watch yet
/// (see `conn::start`).
pub(super) fn look_at(
    client: &impl std::os::fd::AsFd,
    expect: Expect,
    max: usize,
) -> Result<(usize, Option<Held>), End> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < max {
            s.resize(max, 0);
        }
        let n = match sockopt::peek(client, &mut s[..max]) {
            Ok(0) => return Err(End::Clean),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => return Err(End::PEER_ERROR),
        };
        let held = match judge(expect, &s[..n]) {
            Judgement::Whole { proto, .. } => Some(Held::Whole(proto)),
            Judgement::Unframed => Some(Held::Unframed),
            Judgement::Incomplete(_) if n >= max => Some(Held::AsIs),
            Judgement::Incomplete(_) => None,
        };
        Ok((n, held))
    })
}

impl Holding<'_> {
    /// Reads and drops up to `n` held bytes.
    fn discard(&self, n: usize) {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let n = n.min(s.len());
            let _ = io::Read::read(&mut &*socket2::SockRef::from(self.client), &mut s[..n]);
        });
    }
}

/// Whether the client has sent FIN (bytes may still be unread).
#[allow(unsafe_code)]
fn read_closed(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd, owned here; a zero timeout never blocks.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
