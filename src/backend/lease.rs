//! A connection's hold on a server: the slot it takes under `max_conns`, the signal that
//! aborts it when the server goes down (`on_down = "abort"`), and what the connection tells
//! passive health about the server.
//!
//! A lease gives its slot back when dropped, on every path a connection can end by, so a
//! server's load can never leak; the drop also wakes one client queued for a slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use tokio_util::sync::CancellationToken;

use super::Server;
use super::pool::Shared;

/// A connection's hold on a server slot: gives the slot back, and wakes one queued client,
/// when dropped.
#[derive(Debug)]
pub struct Lease {
    pub(super) server: Arc<Server>,
    pub(super) pool: Arc<Shared>,
    pub(super) down: CancellationToken,
    /// Set by [`Lease::early_reset`], so the drop does not count the connection as fine.
    pub(super) reset_early: AtomicBool,
}

impl Lease {
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Resolves when the server is marked down and its pool aborts its connections.
    pub async fn aborted(&self) {
        self.down.cancelled().await
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
        self.server.release();
        self.pool.freed.notify_one();
    }
}
