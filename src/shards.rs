//! The worker threads connections run on, each with its own event loop (`[runtime]
//! per_worker`, on by default).
//!
//! Then `halfguard run` starts one single-threaded tokio runtime per worker, each with its
//! own epoll set and timer wheel: the thread that runs the server (the control plane too:
//! admin, health checks, upkeep) and the others, registered here. Every listener's accept
//! loop runs on each of them over a listening socket of its own, the sockets bound to one
//! address in one `SO_REUSEPORT` group (`listener::sibling`), and a connection stays on the
//! thread that accepted it, as HAProxy's threads and nginx's workers keep theirs. A shared
//! work-stealing runtime (`per_worker = false`) spends a sixth of a keep-alive request's
//! instructions on its own bookkeeping (6,888 against 5,808 per
//! request, `benches/per-request.sh keep-alive`) and its workers take turns on one epoll set;
//! in exchange it hands a busy thread's connections to an idle one, which matters when the
//! proxy shares its cores with a busy service (a sidecar). Each thread's accept loop has
//! its own parking lot, and a connection that parks idle goes to its thread's and wakes
//! there (`ListenerCtx::lot`). The kernel hands a new connection to one socket, by its
//! 4-tuple's hash, and wakes that thread alone: over a shared descriptor every thread woke
//! for every connection, and a refusal flood cost 7.0 µs of CPU a refusal instead of 5.9
//! (`benches/refusal.sh`). The trade-off of HAProxy's and nginx's `reuseport`, a
//! connection waiting in its socket's queue for a busy thread while another is idle, is
//! undone by the idle one taking it (`crate::steal`). A socket the caller bound without
//! `SO_REUSEPORT` (tests, a library caller) is shared by descriptor copies instead.
//!
//! Nothing registered (one worker, `per_worker = false`, tests, a library caller): the
//! accept loops run on the caller's runtime only.

use std::sync::OnceLock;

use tokio::runtime::Handle;

static EXTRA: OnceLock<Vec<Handle>> = OnceLock::new();

/// Registers the runtimes of the worker threads besides the caller's, once per process.
pub fn set(extra: Vec<Handle>) {
    let _ = EXTRA.set(extra);
}

/// The runtimes besides the one the server runs on.
pub fn extra() -> &'static [Handle] {
    EXTRA.get().map_or(&[], |v| v.as_slice())
}

/// Worker threads running connections: the registered ones and the caller's, or the
/// current runtime's workers when none is registered.
pub fn workers() -> usize {
    match EXTRA.get() {
        Some(v) => v.len() + 1,
        None => Handle::try_current().map_or(1, |rt| rt.metrics().num_workers()),
    }
}
