//! The accept loop: admission at accept, RST for refusals, and no busy spin when the process
//! runs out of descriptors.
//!
//! A refusal is the cheapest thing halfguard does, and under a connect flood it is most of
//! what it does. So the loop waits on the listening socket's readiness itself and accepts
//! with plain accept4(2) until the queue is empty (a batch per wake-up); a socket is handed
//! to tokio (registered with epoll) only once admitted. A refused one costs accept,
//! `SO_LINGER 0` and close: no epoll_ctl, no allocation, no task.
//!
//! accept() failing with EMFILE/ENFILE leaves the listening socket readable, so a loop that
//! retries at once spins a core (tokio#3529). Such errors are counted and the loop backs off
//! (5 ms doubling to 1 s) while connections close and free descriptors; errors that belong to
//! one connection that left first (ECONNABORTED...) are skipped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::{self, ListenerCtx};
use crate::sockopt;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Accepts per wake-up before the loop yields its worker: as fair to other tasks as tokio's
/// own accept, which gives up its turn after 128 operations.
const BATCH: usize = 64;

/// A listening socket whose readiness the accept loop watches itself (see the module doc).
pub type Listening = AsyncFd<std::net::TcpListener>;

thread_local! {
    /// The listening sockets this thread's accept loops watch, by `sockopt::cookie`: what
    /// `crate::steal` leaves to them.
    static MINE: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether an accept loop on this thread watches the socket `cookie` names.
pub(crate) fn is_mine(cookie: u64) -> bool {
    MINE.with(|m| m.borrow().contains(&cookie))
}

/// The calling thread's claim on a listening socket, for as long as its accept loop runs.
struct Claim(Option<u64>);

impl Claim {
    fn new(l: &std::net::TcpListener) -> Claim {
        let cookie = sockopt::cookie(l);
        if let Some(c) = cookie {
            MINE.with(|m| m.borrow_mut().push(c));
        }
        Claim(cookie)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(c) = self.0 {
            // The thread may be gone already (a runtime shutting down drops its tasks last).
            let _ = MINE.try_with(|m| m.borrow_mut().retain(|x| *x != c));
        }
    }
}

/// Moves a bound tokio listener under the accept loop's own readiness watch.
pub fn listening(l: TcpListener) -> io::Result<Listening> {
    listening_std(l.into_std()?)
}

/// As [`listening`], for a listening socket not yet registered anywhere (a worker thread's
/// copy of the descriptor, `crate::shards`): registered with the calling runtime.
#[allow(unsafe_code)]
pub fn listening_std(l: std::net::TcpListener) -> io::Result<Listening> {
    // SAFETY: the AsyncFd owns the listener, so its descriptor stays open, and is the same
    // one, for as long as the registration lives.
    unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// A worker thread's own listening socket on `main`'s address (`crate::shards`): a socket
/// of its own in `main`'s `SO_REUSEPORT` group, so the kernel hands each new connection to
/// one thread's queue and wakes that thread alone; or, when `main` was bound without
/// `SO_REUSEPORT` (a caller's socket) or a second bind fails, a copy of `main`'s descriptor,
/// which every thread's accept loop watches: each wakes for every new connection and one
/// wins it (a refusal flood then cost 7.0 µs of CPU a refusal, 5.8-6.1 with a socket per
/// thread, 4.6-4.8 with one accept loop on the shared scheduler: `benches/refusal.sh`). The
/// flag says which.
pub fn sibling(
    main: &std::net::TcpListener,
    tcp: &crate::config::TcpConfig,
) -> io::Result<(std::net::TcpListener, bool)> {
    if sockopt::reuses_port(main) {
        let own = main
            .local_addr()
            .and_then(|addr| sockopt::listen_std(addr, tcp, true));
        if let Ok(own) = own {
            return Ok((own, true));
        }
    }
    Ok((main.try_clone()?, false))
}

/// Accepts until `stop`, spawning admitted connections on `tracker`. The listening socket is
/// closed once this and the server's handle on it are gone.
pub async fn accept_loop(
    listener: Arc<Listening>,
    ctx: Arc<ListenerCtx>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    // Silent connections wait in the lot, not in tasks (see `conn::parked`); without one
    // (the kernel refused an epoll set) each gets its task as before.
    let lot = conn::Lot::new(tracker.clone()).ok();
    if let Some(lot) = &lot {
        ctx.set_lot(lot);
        tracker.spawn(lot.clone().run(ctx.clone(), tracker.clone(), stop.clone()));
    }
    let _claim = Claim::new(listener.get_ref());
    let mut backoff = Duration::ZERO;
    // Registered once, not once per accepted connection.
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        let ready = tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = listener.readable() => r,
        };
        let mut failed = false;
        let mut full = true;
        match ready {
            Ok(mut ready) => {
                for _ in 0..BATCH {
                    match sockopt::accept(ready.get_inner()) {
                        Ok((stream, peer)) => {
                            backoff = Duration::ZERO;
                            admit(&ctx, lot.as_ref(), &tracker, stream, peer);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            ready.clear_ready();
                            full = false;
                            break;
                        }
                        Err(e) if is_per_connection(&e) => {}
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
            }
            // The reactor is gone (the runtime shuts down): nothing more will be accepted.
            Err(_) => break,
        }
        if failed {
            ctx.stats.accept_errors.fetch_add(1, Relaxed);
            backoff = (backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
            tokio::select! {
                _ = &mut stopped => break,
                _ = tokio::time::sleep(backoff) => {}
            }
        } else if full {
            // The queue still holds connections: take them after the others had a turn.
            tokio::task::yield_now().await;
        }
    }
}

/// Admission of one accepted socket: refused, it is reset and closed here, before it costs a
/// registration or a task; admitted, it is started (`conn::start`: a task, or the lot when
/// it has not spoken yet).
pub(crate) fn admit(
    ctx: &Arc<ListenerCtx>,
    lot: Option<&Arc<conn::Lot>>,
    tracker: &TaskTracker,
    stream: std::net::TcpStream,
    peer: SocketAddr,
) {
    let admitted = {
        let policy = ctx.policy.load();
        let trusted = policy.accept_proxy.then_some(&policy.trusted_proxies[..]);
        ctx.guard.admit_from(peer.ip(), trusted)
    };
    match admitted {
        Ok(ticket) => {
            crate::turn::admitted();
            conn::start(ctx, lot, tracker, stream, peer, ticket)
        }
        // Refused: RST and forget it.
        Err(_) => sockopt::abort(&stream),
    }
}

pub(crate) fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}
