//! An idle worker thread takes the connections waiting on its siblings' listening sockets.
//!
//! With a socket per worker thread (`listener::sibling`), the kernel queues each new
//! connection for one thread, by its 4-tuple's hash, and it waits there while that thread is
//! busy or its core is taken by other work, however idle the other threads are. In
//! `benches/compare` (connection per request, wrk and nginx on the same two cores) that put
//! p99 at 1.14x-1.19x HAProxy's, where one descriptor every thread watched gave 0.97x-1.05x
//! (and woke every thread for every connection). So a worker about to sleep (tokio's park
//! hook, which may spawn work instead of sleeping) first accepts what waits on its siblings'
//! sockets in each group, at most once a millisecond (its own it leaves to its accept loop,
//! so `halfguard_accepts_stolen_total` counts only what another thread's queue held): a few
//! `accept4` calls that find nothing when the queues are empty, and the connections of a
//! stalled thread otherwise. Admission is the accept loop's own (`listener::admit`); the
//! connection then stays on the thread that took it, parking in that thread's lot. A thread
//! with nothing to do sleeps until an event, so each also wakes every 100 ms
//! ([`keep_looking`]).

use std::cell::Cell;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::conn::ListenerCtx;
use crate::{listener, sockopt};

/// How often a worker going idle looks at the queues, at most.
const EVERY: Duration = Duration::from_millis(1);
/// How long a connection queued for a stalled thread waits, at most, when every other
/// thread sleeps too: each wakes this often to look ([`keep_looking`]).
const IDLE_LOOK: Duration = Duration::from_millis(100);
/// Connections taken from one socket per look, at most: the rest wait for its own thread or
/// the next look.
const BATCH: usize = 16;

/// One listener's sockets, one per worker thread, and where its connections are tracked.
#[derive(Debug)]
struct Group {
    ctx: Arc<ListenerCtx>,
    tracker: TaskTracker,
    /// Copies of the descriptors, each with its `sockopt::cookie`; each thread's accept loop
    /// owns its own as well.
    sockets: Vec<(std::net::TcpListener, Option<u64>)>,
}

static GROUPS: LazyLock<ArcSwap<Vec<Arc<Group>>>> = LazyLock::new(ArcSwap::default);

thread_local! {
    static LOOKED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Lets idle workers take connections from `sockets`, the listener's sockets in one
/// `SO_REUSEPORT` group, until [`unregister`].
pub fn register(
    ctx: &Arc<ListenerCtx>,
    tracker: &TaskTracker,
    sockets: Vec<std::net::TcpListener>,
) {
    let group = Arc::new(Group {
        ctx: ctx.clone(),
        tracker: tracker.clone(),
        sockets: sockets
            .into_iter()
            .map(|s| {
                let cookie = sockopt::cookie(&s);
                (s, cookie)
            })
            .collect(),
    });
    GROUPS.rcu(|groups| {
        let mut next = Vec::clone(groups);
        next.push(group.clone());
        next
    });
}

/// Stops taking connections for `ctx`'s listener and closes the copies of its sockets.
pub fn unregister(ctx: &Arc<ListenerCtx>) {
    GROUPS.rcu(|groups| {
        groups
            .iter()
            .filter(|g| !Arc::ptr_eq(&g.ctx, ctx))
            .cloned()
            .collect::<Vec<_>>()
    });
}

/// The park hook's part: accepts and admits what waits on every registered socket, unless
/// this thread looked less than [`EVERY`] ago. Connections it starts are spawned on the
/// calling thread's runtime, which then runs them instead of sleeping.
pub fn at_park() {
    let groups = GROUPS.load();
    if groups.is_empty() {
        return;
    }
    let now = Instant::now();
    if LOOKED
        .with(Cell::get)
        .is_some_and(|t| now.duration_since(t) < EVERY)
    {
        return;
    }
    LOOKED.with(|l| l.set(Some(now)));
    for g in groups.iter() {
        let mut lot = None;
        for (s, cookie) in &g.sockets {
            // This thread's own queue is its accept loop's: what waits there is not stolen.
            if cookie.is_some_and(listener::is_mine) {
                continue;
            }
            for _ in 0..BATCH {
                match sockopt::accept(s) {
                    Ok((stream, peer)) => {
                        g.ctx.stats.stolen.fetch_add(1, Relaxed);
                        let lot = lot.get_or_insert_with(|| g.ctx.lot());
                        listener::admit(&g.ctx, lot.as_ref(), &g.tracker, stream, peer);
                    }
                    Err(e) if listener::is_per_connection(&e) => {}
                    Err(_) => break,
                }
            }
        }
    }
}

/// Runs on each worker thread for the life of its runtime: a wake-up every [`IDLE_LOOK`],
/// so a connection queued for a stalled thread waits at most about that long even when no
/// other thread has work of its own.
pub async fn keep_looking() {
    let mut tick = tokio::time::interval(IDLE_LOOK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The look itself is the park hook's, once this task yields.
    }
}
