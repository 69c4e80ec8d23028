//! The waiting room: connections admitted over their source's connection cap, waiting for a
//! slot (`conn::CONFIRM_WAIT` at most).
//!
//! A waiter is a half-open connection like any other, counted against `max_half_open`, but
//! it takes a place that a client from another source may need. So the room is bounded per
//! listener ([`max_waiting`]), and a waiter is the first thing a newcomer from another source
//! evicts when a listener cap is full: sources that hold their cap and reconnect the moment
//! a wait ends cannot keep the listener's half-open cap full of their waiters.
//!
//! The room is small by construction, so one mutex and a scan are enough. Locking rule: the
//! room's lock is never held while a table entry is locked by the same thread.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::SourceKey;
use super::table::ConnCtl;

/// How many connections may wait for a slot in one listener: an eighth of its half-open
/// cap (at least one), so that waiters never hold more than a small part of the places
/// silent newcomers need.
pub fn max_waiting(max_half_open: u32) -> usize {
    (max_half_open as usize / 8).max(1)
}

#[derive(Debug, Default)]
pub(crate) struct WaitingRoom {
    /// Oldest first.
    waiters: Mutex<VecDeque<(SourceKey, Arc<ConnCtl>)>>,
}

impl WaitingRoom {
    /// Takes a place if fewer than `max` wait.
    pub fn enter(&self, key: SourceKey, ctl: &Arc<ConnCtl>, max: usize) -> bool {
        let mut w = self.lock();
        if w.len() >= max {
            return false;
        }
        w.push_back((key, ctl.clone()));
        true
    }

    /// Gives a waiter's place back (confirmed, refused, evicted or ended).
    pub fn leave(&self, ctl: &Arc<ConnCtl>) {
        let mut w = self.lock();
        if let Some(i) = w.iter().position(|(_, c)| Arc::ptr_eq(c, ctl)) {
            w.remove(i);
        }
    }

    /// Takes out the oldest waiter whose source is not `spare`, for eviction.
    pub fn pick(&self, spare: Option<&SourceKey>) -> Option<(SourceKey, Arc<ConnCtl>)> {
        let mut w = self.lock();
        let i = w.iter().position(|(k, _)| Some(k) != spare)?;
        w.remove(i)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(SourceKey, Arc<ConnCtl>)>> {
        // A panic while holding it cannot leave the deque inconsistent: use it as it is.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}
