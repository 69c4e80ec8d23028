//! A connection's hold on a server: the slot it takes under `max_conns` (and whether it may
//! give it up to a queued client, see `slot.rs`), the signal that aborts it when the server
//! goes down (`on_down = "abort"`), and what the connection tells passive health about the
//! server.
//!
//! A lease gives its slot back when dropped, on every path a connection can end by, so a
//! server's load can never leak; the drop also wakes one client queued for a slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use super::Server;
use super::pool::Shared;
use super::slot::Slot;

/// Told when any server's connections are aborted (`on_down = "abort"`), after its down
/// epoch moved: for a waiter that holds many leases and no task per lease (the
/// parking lot's idle connections, `conn::parked`), so that it looks at [`Lease::is_aborted`]
/// only when a server went down, and costs nothing while none does.
pub(super) static DOWN: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Resolves after some server's connections were aborted (see [`DOWN`]); a waiter made
/// before the abort hears of it even if not yet polled.
pub fn aborts() -> tokio::sync::futures::Notified<'static> {
    DOWN.notified()
}

/// A connection's hold on a server slot: gives the slot back, and wakes one queued client,
/// when dropped.
#[derive(Debug)]
pub struct Lease {
    pub(super) server: Arc<Server>,
    pub(super) pool: Arc<Shared>,
    /// The server's down epoch when the lease was taken.
    pub(super) epoch: u64,
    /// Set by [`Lease::early_reset`], so the drop does not count the connection as fine.
    pub(super) reset_early: AtomicBool,
    /// Under the server's `max_conns`: the slot a queued client may claim.
    pub(super) slot: Option<Arc<Slot>>,
}

impl Lease {
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Resolves when the server is marked down and its pool aborts its connections.
    pub async fn aborted(&self) {
        loop {
            let mut told = std::pin::pin!(self.server.down_notified());
            // Listening before the look: an abort between the two is not missed.
            told.as_mut().enable();
            if self.is_aborted() {
                return;
            }
            told.await;
        }
    }

    /// Whether [`Lease::aborted`] has resolved or would: a flag read, for a waiter that is
    /// not polled again until it says so.
    pub fn is_aborted(&self) -> bool {
        self.server.down_epoch() != self.epoch
    }

    /// Whether the slot is one a queued client may claim (the server has `max_conns`): only
    /// then is it worth telling [`Lease::may_yield`].
    pub fn yields_on_claim(&self) -> bool {
        self.slot.is_some()
    }

    /// Whether the connection, at its progress check, may give its slot to a queued client:
    /// it is not making progress on a request and does not await an answer.
    pub fn may_yield(&self, yes: bool) {
        let Some(slot) = &self.slot else {
            return;
        };
        if yes {
            slot.set_yieldable(self.server.now_ms());
        } else if slot.set_busy() {
            // A claim declined: the queue asks another connection.
            self.pool.freed.notify_one();
        }
    }

    /// Resolves when the pool claims the slot for a queued client. The connection looks at
    /// itself once more: it ends ([`Lease::give_up`]) or declines (`may_yield(false)`).
    pub async fn claimed(&self) {
        match &self.slot {
            Some(slot) => slot.claimed().await,
            None => std::future::pending().await,
        }
    }

    /// The connection ends to give its slot to the queued client that claimed it: counted
    /// here, the slot goes with the lease's drop.
    pub fn give_up(&self) {
        self.pool.reclaimed.fetch_add(1, Relaxed);
    }

    /// The server reset the connection before sending a byte and before any byte of the
    /// client reached it: nothing the client did can have caused that, so passive health
    /// counts it. (A reset after client bytes is not counted: a client could provoke it.)
    pub fn early_reset(&self) {
        self.reset_early.store(true, Relaxed);
        // The check, if one starts, concludes on its own.
        let _ = self.pool.passive_failure(&self.server, true);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !*self.reset_early.get_mut() {
            self.server.not_reset_early();
        }
        if let Some(slot) = &self.slot {
            self.server.state.slots.unregister(slot);
        }
        self.server.release();
        self.pool.freed.notify_one();
    }
}
