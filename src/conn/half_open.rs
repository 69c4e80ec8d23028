//! HALF_OPEN: from accept to the first byte.
//!
//! A connection admitted over its source's cap first waits for a slot; a trusted balancer's
//! connection reads its PROXY header, which names the real source; a server-first listener
//! connects to the backend now (the backend speaks first); then the connection waits,
//! silent, for a byte either way, within `first_byte`. Silent past `limits.grace`, it counts
//! against its source's half-open cap.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::time::{Instant, sleep_until};

use super::clocks::half_open_due;
use super::{End, ListenerCtx, Watched, expire};
use crate::backend::{Lease, ProxiedAddrs};
use crate::guard::Ticket;
use crate::proxy_protocol;
use crate::stats::{Reject, Timeout};

/// How long a connection admitted over its source's connection cap waits for a slot.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(1);

/// A provisional connection waits for a connection of its source to end (usually one that
/// already ended on the wire and whose task has not run yet); none does within
/// `CONFIRM_WAIT`: refused.
pub(super) async fn confirm_slot(ticket: &mut Ticket, ctx: &ListenerCtx) -> Result<(), End> {
    let until = Instant::now() + CONFIRM_WAIT;
    let mut nap = Duration::from_millis(1);
    loop {
        match ticket.confirm() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(_) => return Err(End::Evicted),
        }
        // Looked at every nap (64 ms at most) rather than waited on.
        if ctx.is_aborted() {
            return Err(End::Shutdown);
        }
        let now = Instant::now();
        if now >= until {
            if ticket.refuse_provisional() {
                return Err(End::Refused(Reject::SourceConns));
            }
            return Ok(());
        }
        sleep_until((now + nap).min(until)).await;
        nap = (nap * 2).min(Duration::from_millis(64));
    }
}

/// A connection before its first byte.
pub(super) struct HalfOpen<'a> {
    pub ctx: &'a ListenerCtx,
    pub client: &'a TcpStream,
    pub ticket: &'a mut Ticket,
    pub accepted: Instant,
}

/// What woke a connection before its backend (silent, or holding its first message).
pub(super) enum Woke {
    Evicted,
    Client(io::Result<()>),
    Server(io::Result<()>),
    Clock,
    /// Pressure, a reload or the end of the drain.
    Bell,
}

/// One poll of what a connection waits on before its backend: its eviction, the client's
/// readiness (and the server's, when connected first), its clock and the listener's bell.
/// Polled in place from the phase's own `poll_fn`, so the wait adds no future to a task
/// that may be little more than it.
pub(super) fn poll_woke(
    cx: &mut std::task::Context<'_>,
    evicted: std::pin::Pin<&mut impl Future<Output = ()>>,
    client: &TcpStream,
    server: Option<&TcpStream>,
    sleep: std::pin::Pin<&mut tokio::time::Sleep>,
    bell: std::pin::Pin<&mut Notified<'_>>,
) -> Poll<Woke> {
    if evicted.poll(cx).is_ready() {
        return Poll::Ready(Woke::Evicted);
    }
    if let Poll::Ready(r) = client.poll_read_ready(cx) {
        return Poll::Ready(Woke::Client(r));
    }
    if let Some(s) = server
        && let Poll::Ready(r) = s.poll_read_ready(cx)
    {
        return Poll::Ready(Woke::Server(r));
    }
    if sleep.poll(cx).is_ready() {
        return Poll::Ready(Woke::Clock);
    }
    if bell.poll(cx).is_ready() {
        return Poll::Ready(Woke::Bell);
    }
    Poll::Pending
}

impl HalfOpen<'_> {
    /// A trusted balancer's PROXY header, within the first-byte clock; from here on the
    /// source is the one it names. Whether a header comes was decided at accept and travels
    /// with the ticket: a reload in between cannot change it.
    pub async fn proxy_header(
        &mut self,
        w: &mut Watched,
        addrs: ProxiedAddrs,
    ) -> Result<ProxiedAddrs, End> {
        let ctl = self.ticket.ctl().clone();
        let mut bell = pin!(w.next_ring(self.ctx));
        w.heard(self.ctx)?;
        let pressure = self.ctx.guard.pressure();
        let mut timeout = pin!(sleep_until(
            self.accepted + w.policy.rules().first_byte(pressure)
        ));
        let mut evicted = pin!(ctl.evicted());
        // Boxed: its buffers would otherwise sit in every connection's task.
        let mut read = Box::pin(proxy_protocol::read_header(self.client));
        let header = loop {
            tokio::select! {
                biased;
                _ = &mut evicted => return Err(End::Evicted),
                h = &mut read => break h,
                _ = &mut timeout => return Err(End::TimedOut(Timeout::FirstByte)),
                _ = &mut bell => {
                    bell.set(w.next_ring(self.ctx));
                    w.heard(self.ctx)?;
                }
            }
        };
        let Ok(h) = header else {
            self.ticket.refuse(Reject::ProxyHeader);
            return Err(End::Refused(Reject::ProxyHeader));
        };
        let Some((src, dst)) = h.addrs else {
            // LOCAL (a balancer's health check): the connection stays its own.
            self.ticket.keep_unnamed().map_err(End::Refused)?;
            return Ok(addrs);
        };
        self.ticket.assign_source(src.ip()).map_err(End::Refused)?;
        Ok(ProxiedAddrs {
            client: src,
            local: dst,
        })
    }

    /// Connects to a backend of the pool in force. A ring while it connects is acted on
    /// here only if it ends the connection (the drain is over); a reload's policy is taken
    /// by the next phase's look, so the connect borrows the policy rather than holding a
    /// count on it that every connection of the listener would share.
    pub async fn connect(
        &self,
        w: &mut Watched,
        addrs: ProxiedAddrs,
    ) -> Result<(TcpStream, Lease), End> {
        // Made before the look, so that no ring falls between them.
        let mut bell = pin!(w.next_ring(self.ctx));
        w.heard(self.ctx)?;
        let w = &*w;
        let policy = &w.policy;
        let ctl = self.ticket.ctl().clone();
        let mut evicted = pin!(ctl.evicted());
        let mut connect = Box::pin(policy.backends.connect(
            &policy.tcp,
            policy.timeouts.connect,
            addrs,
        ));
        let connect = loop {
            tokio::select! {
                biased;
                _ = &mut evicted => return Err(End::Evicted),
                r = &mut connect => break r,
                _ = &mut bell => {
                    if self.ctx.is_aborted() {
                        return Err(End::Shutdown);
                    }
                    bell.set(w.next_ring(self.ctx));
                }
            }
        };
        connect.map_err(|e| End::from_backend(self.ticket, &e))
    }

    /// Waits for a first byte either way (`server`: already connected, server-first),
    /// within the first-byte clock. `Ok` when one came; `Err(End::Clean)` when the client
    /// closed before saying anything and nothing was asked of a backend.
    ///
    /// A silent connection spends its life here, so this wait is what it costs: the sockets'
    /// readiness is polled in place (no future of its own), one timer is reset rather than
    /// made anew, and eviction and the listener's bell are the only waiters it registers.
    /// `looked`: the caller already looked and found nothing (the first message's look).
    pub async fn first_byte(
        &mut self,
        w: &mut Watched,
        server: Option<&TcpStream>,
        looked: bool,
    ) -> Result<(), End> {
        // Most clients have spoken by the time they are accepted: look once, straight away,
        // rather than wait for the event loop to say the socket is readable.
        if !looked {
            match self.peek(true) {
                Ok(0) if server.is_none() => return Err(End::Clean),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(End::PEER_ERROR),
            }
        }
        let ctl = self.ticket.ctl().clone();
        // Registered once for the whole silent phase, not once per wake-up.
        let mut evicted = pin!(ctl.evicted());
        let mut bell = pin!(w.next_ring(self.ctx));
        let mut sleep = pin!(sleep_until(self.accepted));
        // Silent past the grace: counted against the source's half-open cap from then on.
        let mut counted = self.ticket.source().is_none();
        loop {
            w.heard(self.ctx)?;
            let pressure = self.ctx.guard.pressure();
            let clock = half_open_due(&w.policy.rules(), pressure, w.observed, self.accepted);
            let grace = (!counted).then_some(self.accepted + w.policy.grace);
            let wake = match (clock.map(|c| c.0), grace) {
                (Some(c), Some(g)) => c.min(g),
                (Some(c), None) => c,
                (None, Some(g)) => g,
                (None, None) => Instant::now() + Duration::from_secs(3600),
            };
            if sleep.deadline() != wake {
                sleep.as_mut().reset(wake);
            }
            let woke = poll_fn(|cx| {
                poll_woke(
                    cx,
                    evicted.as_mut(),
                    self.client,
                    server,
                    sleep.as_mut(),
                    bell.as_mut(),
                )
            })
            .await;
            match woke {
                Woke::Evicted => return Err(End::Evicted),
                Woke::Client(Err(_)) | Woke::Server(Err(_)) => return Err(End::PEER_ERROR),
                // Readable may be stale: a peek that would block clears it, and the wait
                // goes on.
                Woke::Client(Ok(())) => match self.peek(false) {
                    // Closed before saying anything, and nothing was asked of a backend.
                    Ok(0) if server.is_none() => return Err(End::Clean),
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(End::PEER_ERROR),
                },
                Woke::Server(Ok(())) => return Ok(()),
                Woke::Clock => {
                    let now = Instant::now();
                    if let Some((at, c)) = clock
                        && at <= now
                        && expire(self.ticket, &mut w.observed, c)
                    {
                        return Err(End::TimedOut(c));
                    }
                    if grace.is_some_and(|g| g <= now) {
                        counted = true;
                        self.ticket.silent().map_err(End::from_refused)?;
                    }
                }
                // The loop looks at what it announces.
                Woke::Bell => bell.set(w.next_ring(self.ctx)),
            }
        }
    }

    /// One byte looked at, not taken: the pump reads it with what follows. `fresh`: no
    /// readiness event has come yet (tokio would not even try), so straight to the kernel;
    /// otherwise a peek that would block clears the readiness, so the next poll waits for
    /// new bytes.
    fn peek(&self, fresh: bool) -> io::Result<usize> {
        let mut first = [MaybeUninit::<u8>::uninit(); 1];
        let mut peek = || SockRef::from(self.client).peek(&mut first);
        if fresh {
            peek()
        } else {
            self.client.try_io(Interest::READABLE, peek)
        }
    }
}
