//! A connection's slot on a server with `max_conns`, as the pool sees it: whether the
//! connection may give it up, and the call that asks it to.
//!
//! A backend with a fixed number of workers (Apache's `MaxRequestWorkers`, PostgreSQL's
//! `max_connections`) gives each connection one for as long as it is open, whatever it
//! does. When every slot is taken and a client whose first message is whole waits in the
//! queue, a slot held by a connection that is not making progress on a request (it drips
//! its next request, reads its answer too slowly, or sits idle after the server's last byte)
//! is taken back for it. The connection says at each of its progress checks whether it may
//! yield ([`Slot::set_yieldable`]); the pool claims the slot that has yielded longest
//! ([`reclaim`]); the connection, woken, looks at itself once more and either ends (its
//! lease's drop gives the queued client the slot) or declines, which wakes the queue to look
//! again. A connection that awaits the server's answer never yields.
//!
//! Only a server with `max_conns` registers its slots: without a cap nobody queues, and a
//! connection costs nothing here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::ServerSet;

/// A queued client looks for a slot to take back this often while it waits: connections
/// become yieldable at their progress checks, about once a second.
pub(super) const RECLAIM_RETRY: Duration = Duration::from_millis(250);

/// The pool asked for the slot.
const CLAIMED: u64 = u64::MAX;

/// One lease's slot, shared by the connection holding it and its server's list.
#[derive(Debug, Default)]
pub(super) struct Slot {
    /// 0 while the connection makes progress or awaits an answer; [`CLAIMED`] once the pool
    /// asked for the slot; otherwise when the connection began to yield it, in ms since
    /// its server's epoch (plus one, so that it is never 0).
    state: AtomicU64,
    /// Woken when the pool claims the slot.
    claim: Notify,
}

impl Slot {
    /// The connection may yield its slot, since `now_ms` unless it already did.
    pub(super) fn set_yieldable(&self, now_ms: u64) {
        let _ = self
            .state
            .compare_exchange(0, now_ms.clamp(1, CLAIMED - 1), Relaxed, Relaxed);
    }

    /// The connection keeps its slot. True when that declines a claim: the caller wakes
    /// the queue, whose client asks another connection.
    pub(super) fn set_busy(&self) -> bool {
        // Read first: a connection at work writes nothing, check after check.
        self.state.load(Relaxed) != 0 && self.state.swap(0, Relaxed) == CLAIMED
    }

    pub(super) fn is_claimed(&self) -> bool {
        self.state.load(Relaxed) == CLAIMED
    }

    /// Resolves when the pool claims the slot.
    pub(super) async fn claimed(&self) {
        loop {
            let woken = self.claim.notified();
            if self.is_claimed() {
                return;
            }
            woken.await;
        }
    }

    /// Claims the slot if it still yields since `since`.
    fn claim(&self, since: u64) -> bool {
        let won = self
            .state
            .compare_exchange(since, CLAIMED, Relaxed, Relaxed)
            .is_ok();
        if won {
            self.claim.notify_one();
        }
        won
    }
}

/// The slots of one server's connections, carried across reloads with its load.
#[derive(Debug, Default)]
pub(super) struct Slots(Mutex<Vec<Arc<Slot>>>);

impl Slots {
    pub(super) fn register(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot::default());
        if let Ok(mut list) = self.0.lock() {
            list.push(slot.clone());
        }
        slot
    }

    pub(super) fn unregister(&self, slot: &Arc<Slot>) {
        if let Ok(mut list) = self.0.lock()
            && let Some(i) = list.iter().position(|s| Arc::ptr_eq(s, slot))
        {
            list.swap_remove(i);
        }
    }

    /// Keeps in `best` whichever yields longest: the one it holds or one of these.
    fn oldest(&self, best: &mut Option<(u64, Arc<Slot>)>) {
        let Ok(list) = self.0.lock() else {
            return;
        };
        for s in list.iter() {
            let since = s.state.load(Relaxed);
            if since != 0 && since != CLAIMED && best.as_ref().is_none_or(|b| since < b.0) {
                *best = Some((since, s.clone()));
            }
        }
    }
}

/// Asks the connection that has yielded its slot longest, on a server of `set` that is up,
/// full and not in `tried`, to give it up. True when one was asked.
pub(super) fn reclaim(set: &ServerSet, tried: &[usize]) -> bool {
    // A connection may stop yielding while it is chosen: choose again, a few times.
    for _ in 0..3 {
        let mut best = None;
        for (i, s) in set.list.iter().enumerate() {
            if s.max_conns > 0 && !s.has_room() && s.is_up() && !tried.contains(&i) {
                s.state.slots.oldest(&mut best);
            }
        }
        let Some((since, slot)) = best else {
            return false;
        };
        if slot.claim(since) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_yielding_longest_is_claimed_once_and_a_busy_one_never() {
        let slots = Slots::default();
        let (busy, young, old) = (slots.register(), slots.register(), slots.register());
        young.set_yieldable(20);
        old.set_yieldable(10);
        // Yielding again keeps the first moment.
        old.set_yieldable(30);
        let mut best = None;
        slots.oldest(&mut best);
        let (since, chosen) = best.expect("a yielding slot");
        assert!(Arc::ptr_eq(&chosen, &old) && since == 10);
        assert!(chosen.claim(since));
        assert!(!chosen.claim(since), "claimed twice");
        assert!(old.is_claimed());
        // A claimed slot is not chosen again; then the young one, never the busy one.
        let mut best = None;
        slots.oldest(&mut best);
        assert!(best.is_some_and(|(_, s)| Arc::ptr_eq(&s, &young)));
        young.set_busy();
        let mut best = None;
        slots.oldest(&mut best);
        assert!(best.is_none());
        assert!(!busy.is_claimed());
        // Declining a claim says so, and a slot that stopped yielding cannot be claimed.
        assert!(old.set_busy());
        assert!(!old.set_busy());
        assert!(!old.claim(10));
        slots.unregister(&old);
        assert_eq!(slots.0.lock().map(|l| l.len()).unwrap_or(0), 2);
    }
}
