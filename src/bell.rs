//! A listener-wide bell: what every live connection of a listener must hear of (pressure
//! mode flipping, a reload, the end of the drain), told with one waiter per connection.
//!
//! Two watch channels and a cancellation token per connection did this before, at about 400
//! bytes in every connection's task and a token on the heap: a silent connection is little
//! more than its task, so that was a sixth of what it cost. A connection keeps one
//! [`tokio::sync::Notified`] from the bell and the count of rings it has acted on; when the
//! count moves it looks at what it watches (pressure, policy, abort) again.
//!
//! The waiters are spread over shards, as tokio's own watch channel does, so that a busy
//! connection re-polling its waiter takes one of several locks, not the one every
//! connection of the listener would share.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, futures::Notified};

const SHARDS: usize = 8;

/// Each on a cache line of its own (128 bytes: adjacent lines are fetched in pairs on
/// x86-64): a connection registering its waiter writes its shard's lock, and every
/// connection reads `rung` at each turn; sharing a line would make one bounce the other.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Line<T>(T);

/// One listener's bell; its guard owns it and rings it when pressure flips, the listener
/// on reload and at the end of the drain.
#[derive(Debug, Default)]
pub struct Bell {
    rung: Line<AtomicU64>,
    shards: [Line<Notify>; SHARDS],
}

impl Bell {
    /// Wakes every waiter. Whatever it announces is in place before the call.
    pub fn ring(&self) {
        self.rung.0.fetch_add(1, Ordering::SeqCst);
        for s in &self.shards {
            s.0.notify_waiters();
        }
    }

    /// How many times it rang: a waiter compares it with the count it last acted on.
    pub fn rung(&self) -> u64 {
        self.rung.0.load(Ordering::SeqCst)
    }

    /// Resolves at the next ring. It hears every ring from the moment it is made, polled or
    /// not: make it, then look at [`Bell::rung`], then wait, and no ring is missed.
    /// `shard`: any number that spreads waiters (a port, a counter).
    pub fn next_ring(&self, shard: usize) -> Notified<'_> {
        self.shards[shard % SHARDS].0.notified()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn ready<F: Future>(f: std::pin::Pin<&mut F>) -> bool {
        matches!(
            f.poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(_)
        )
    }

    #[test]
    fn a_waiter_made_before_a_ring_hears_it_even_if_never_polled_before() {
        let bell = Bell::default();
        let seen = bell.rung();
        let mut heard = pin!(bell.next_ring(3));
        bell.ring();
        assert!(ready(heard.as_mut()));
        assert_ne!(bell.rung(), seen);
    }

    #[test]
    fn every_shard_hears_a_ring() {
        let bell = Bell::default();
        let mut ears: Vec<_> = (0..SHARDS * 2)
            .map(|i| Box::pin(bell.next_ring(i)))
            .collect();
        for e in &mut ears {
            assert!(!ready(e.as_mut()));
        }
        bell.ring();
        for e in &mut ears {
            assert!(ready(e.as_mut()));
        }
    }
}
