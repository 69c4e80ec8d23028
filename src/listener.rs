//! The accept loop: admission at accept, RST for refusals, and no busy spin when the process
//! runs out of descriptors.
//!
//! accept() failing with EMFILE/ENFILE leaves the listening socket readable, so a loop that
//! retries at once spins a core (tokio#3529). Such errors are counted and the loop backs off
//! (5 ms doubling to 1 s) while connections close and free descriptors; errors that belong to
//! one connection that left first (ECONNABORTED...) are skipped.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::{self, ListenerCtx};
use crate::sockopt;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until `stop`, spawning admitted connections on `tracker`. The listening socket is
/// closed once this and the server's handle on it are gone.
pub async fn accept_loop(
    listener: Arc<TcpListener>,
    ctx: Arc<ListenerCtx>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::ZERO;
    // Registered once, not once per accepted connection.
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                let admitted = {
                    let policy = ctx.policy.load();
                    let trusted = policy.accept_proxy.then_some(&policy.trusted_proxies[..]);
                    ctx.guard.admit_from(peer.ip(), trusted)
                };
                match admitted {
                    Ok(ticket) => {
                        tracker.spawn(conn::serve(ctx.clone(), stream, peer, ticket));
                    }
                    // Refused before any buffer or task exists: RST and forget it.
                    Err(_) => sockopt::abort(&stream),
                }
            }
            Err(e) if is_per_connection(&e) => {}
            Err(_) => {
                ctx.stats.accept_errors.fetch_add(1, Relaxed);
                backoff = (backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}
