//! HALF_OPEN: from accept to the first byte.
//!
//! A connection admitted over its source's cap first waits for a slot; a trusted balancer's
//! connection reads its PROXY header, which names the real source; a server-first listener
//! connects to the backend now (the backend speaks first); then the connection waits,
//! silent, for a byte either way, within `first_byte`. Silent past `limits.grace`, it counts
//! against its source's half-open cap.

use std::pin::pin;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::clocks::half_open_due;
use super::{End, ListenerCtx, Policy, Watched, changed, expire};
use crate::backend::{Lease, ProxiedAddrs};
use crate::guard::Ticket;
use crate::proxy_protocol;
use crate::stats::{Reject, Timeout};

/// How long a connection admitted over its source's connection cap waits for a slot.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(1);

/// A provisional connection waits for a connection of its source to end (usually one that
/// already ended on the wire and whose task has not run yet); none does within
/// `CONFIRM_WAIT`: refused.
pub(super) async fn confirm_slot(
    ticket: &mut Ticket,
    abort: &CancellationToken,
) -> Result<(), End> {
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
                return Err(End::Refused(Reject::SourceConns));
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

/// A connection before its first byte.
pub(super) struct HalfOpen<'a> {
    pub ctx: &'a ListenerCtx,
    pub client: &'a TcpStream,
    pub ticket: &'a mut Ticket,
    /// This connection's child of the listener's abort token.
    pub abort: &'a CancellationToken,
    pub accepted: Instant,
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
        let pressure = w.pressure();
        let deadline = self.accepted + w.policy.rules().first_byte(pressure);
        let header = tokio::select! {
            biased;
            _ = ctl.evicted() => return Err(End::Evicted),
            _ = self.abort.cancelled() => return Err(End::Shutdown),
            // Boxed: its buffers would otherwise sit in every connection's task.
            h = Box::pin(proxy_protocol::read_header(self.client)) => h,
            _ = sleep_until(deadline) => return Err(End::TimedOut(Timeout::FirstByte)),
        };
        let Ok(h) = header else {
            self.ticket.refuse(Reject::ProxyHeader);
            return Err(End::Refused(Reject::ProxyHeader));
        };
        let Some((src, dst)) = h.addrs else {
            // LOCAL (a balancer's health check): the connection stays its own.
            return Ok(addrs);
        };
        self.ticket.assign_source(src.ip()).map_err(End::Refused)?;
        Ok(ProxiedAddrs {
            client: src,
            local: dst,
        })
    }

    /// Connects to a backend of the pool in force.
    pub async fn connect(
        &self,
        policy: &Policy,
        addrs: ProxiedAddrs,
    ) -> Result<(TcpStream, Lease), End> {
        let ctl = self.ticket.ctl().clone();
        let connect = tokio::select! {
            biased;
            _ = ctl.evicted() => return Err(End::Evicted),
            _ = self.abort.cancelled() => return Err(End::Shutdown),
            r = Box::pin(policy.backends.connect(&policy.tcp, policy.timeouts.connect, addrs)) => r,
        };
        connect.map_err(|e| End::from_backend(self.ticket, &e))
    }

    /// Waits for a first byte either way (`server`: already connected, server-first),
    /// within the first-byte clock. `Ok` when one came; `Err(End::Clean)` when the client
    /// closed before saying anything and nothing was asked of a backend.
    pub async fn first_byte(
        &mut self,
        w: &mut Watched,
        server: Option<&TcpStream>,
    ) -> Result<(), End> {
        // Most clients have spoken by the time they are accepted: look once, straight away,
        // rather than wait for the event loop to say the socket is readable.
        let mut first = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(self.client).peek(&mut first) {
            Ok(0) if server.is_none() => return Err(End::Clean),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(End::PEER_ERROR),
        }
        let ctl = self.ticket.ctl().clone();
        // Registered once for the whole silent phase, not once per wake-up.
        let mut evicted = pin!(ctl.evicted());
        let mut aborted = pin!(self.abort.cancelled());
        let mut peek = [0u8; 1];
        // Silent past the grace: counted against the source's half-open cap from then on.
        let mut counted = self.ticket.source().is_none();
        loop {
            let pressure = w.pressure();
            let clock = half_open_due(&w.policy.rules(), pressure, w.observed, self.accepted);
            let grace = (!counted).then_some(self.accepted + w.policy.grace);
            let wake = match (clock.map(|c| c.0), grace) {
                (Some(c), Some(g)) => c.min(g),
                (Some(c), None) => c,
                (None, Some(g)) => g,
                (None, None) => Instant::now() + Duration::from_secs(3600),
            };
            let server_ready = async {
                match server {
                    Some(s) => s.readable().await,
                    None => std::future::pending().await,
                }
            };
            // Wait for readiness first: a peek on a fresh socket would only say EAGAIN.
            let client_spoke = async {
                self.client.readable().await?;
                self.client.peek(&mut peek).await
            };
            tokio::select! {
                biased;
                _ = &mut evicted => return Err(End::Evicted),
                _ = &mut aborted => return Err(End::Shutdown),
                r = client_spoke => return match r {
                    // Closed before saying anything, and nothing was asked of a backend.
                    Ok(0) if server.is_none() => Err(End::Clean),
                    Ok(_) => Ok(()),
                    Err(_) => Err(End::PEER_ERROR),
                },
                r = server_ready => return r.map_err(|_| End::PEER_ERROR),
                _ = sleep_until(wake) => {
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
                _ = changed(&mut w.pressure) => {}
                _ = changed(&mut w.epoch) => w.reload(self.ctx),
            }
        }
    }
}
