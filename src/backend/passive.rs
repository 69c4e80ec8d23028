//! Passive health: what a pool's connections learn about a server, judged without letting
//! a client judge it.
//!
//! - Only what a client cannot cause counts against a server: a refused or timed-out
//!   connect, or a reset before any byte either way. Failures on our side (descriptors,
//!   ephemeral ports, a socket option) are counted as ours and logged at a bounded rate.
//! - `fall` such failures in a row take a server out for `cooloff` while another server is
//!   up. The last server up is taken out only when an active check confirms what the
//!   connections saw: a flood that fills its accept queue looks the same from here, and
//!   taking out the last server refuses everyone.
//! - A cool-off after failed connects is probed with the active check every `interval`: a
//!   server that answers again (started after halfguard, or restarted) takes connections
//!   at once instead of after the whole `cooloff`. Either way its return is logged.
//!
//! The per-server runs and cool-off live in the server's state (`server.rs`); this file
//! decides what to do with them.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::pool::Shared;
use super::{Server, health};
use crate::config::HealthConfig;

/// Connect failures on our side are logged at most this often (they come in floods).
const LOCAL_WARN_EVERY_MS: u64 = 10_000;

impl Shared {
    /// One failure that was `server`'s doing (a failed connect, or with `early` a reset
    /// before any byte moved). `fall` of a kind in a row take it out for `cooloff` while
    /// another server is up; the last server up is taken out only when a check fails too,
    /// since passive evidence alone can be a client's doing (a flood that fills the
    /// server's accept queue) and taking out the last server refuses everyone.
    /// Returns the check that decides, when one was started.
    pub(super) fn passive_failure(
        self: &Arc<Self>,
        server: &Arc<Server>,
        early: bool,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let h = &self.health;
        if !server.count_failure(h.fall, early) {
            return None;
        }
        {
            let Ok(_deciding) = self.deciding.lock() else {
                return None;
            };
            let others_up = self
                .servers
                .load()
                .list
                .iter()
                .any(|s| !s.same(server) && s.is_up());
            if others_up {
                server.cool_off(h.cooloff);
                tracing::warn!(
                    pool = %self.name,
                    server = server.label(),
                    cooloff = ?h.cooloff,
                    "backend server failed {} times in a row; cooling off",
                    h.fall
                );
                watch(server, h, early);
                return None;
            }
        }
        // A task of its own: whoever waits for it may give up, the check still concludes.
        server
            .start_confirming()
            .then(|| tokio::spawn(self.clone().confirm(server.clone(), early)))
    }

    /// Checks the last server up after `fall` failures: cooled off if the check fails,
    /// kept (and said once) if it passes.
    async fn confirm(self: Arc<Self>, server: Arc<Server>, early: bool) {
        let ok = health::check(&server, &self.health).await;
        server.done_confirming();
        if !ok {
            server.cool_off(self.health.cooloff);
            watch(&server, &self.health, early);
            tracing::warn!(
                pool = %self.name,
                server = server.label(),
                cooloff = ?self.health.cooloff,
                "backend server failed {} times in a row and its check; cooling off (it was the last server up)",
                self.health.fall
            );
        } else if server.hold() {
            tracing::warn!(
                pool = %self.name,
                server = server.label(),
                "backend server failed {} times in a row but passes its check; it stays in rotation (the last server up)",
                self.health.fall
            );
        }
    }

    /// A connect that failed on our side: counted, and logged at a bounded rate.
    pub(super) fn local_error(&self, e: &io::Error) {
        let n = self.local_errors.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.epoch.elapsed().as_millis() as u64 + LOCAL_WARN_EVERY_MS;
        let last = self.local_warned_ms.load(Ordering::Relaxed);
        if now >= last + LOCAL_WARN_EVERY_MS
            && self
                .local_warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                pool = %self.name,
                error = %e,
                local_errors = n,
                "backend connects fail on this host, not at the servers (descriptors or ephemeral ports exhausted?); the servers are not held responsible"
            );
        }
    }
}

/// Whether a failed connect is the server's doing, or the network's on the way to it: it
/// refused, did not answer, or is unreachable. Anything else (EMFILE, ENFILE, ENOBUFS,
/// EADDRNOTAVAIL for want of ephemeral ports, EINVAL from a socket option) happened here.
pub(super) fn servers_fault(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::ETIMEDOUT
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ECONNRESET
                | libc::ECONNABORTED
        )
    )
}

/// Follows a cool-off to its end (and logs it). After failed connects the check runs each
/// interval meanwhile and a good one ends it early; after early resets it runs its course,
/// since a connect that succeeds proves nothing against a server that resets.
fn watch(server: &Arc<Server>, h: &HealthConfig, early: bool) {
    watch_cooloff(server.clone(), (!early).then(|| h.clone()));
}

/// Watches `server`'s cool-off until it ends, and logs its end. With `probe`, the check runs
/// every `interval` meanwhile and a good one ends the cool-off early. Bounded by the
/// cool-off itself, and stops with the server.
fn watch_cooloff(server: Arc<Server>, probe: Option<HealthConfig>) {
    let Some((_, until)) = server.cooloff_left() else {
        return;
    };
    tokio::spawn(async move {
        loop {
            let left = match server.cooloff_left() {
                Some((left, u)) if u == until => left,
                // Ended by someone else (active checks), or over: over is worth saying.
                _ => break,
            };
            let wait = probe.as_ref().map_or(left, |h| h.interval.min(left));
            tokio::select! {
                _ = server.stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if let Some(h) = &probe
                && health::check(&server, h).await
                && server.end_cooloff(until)
            {
                tracing::info!(
                    server = server.label(),
                    "backend server answers again; cool-off ended early"
                );
                return;
            }
        }
        if server.cooloff_left().is_none() && server.is_up() {
            tracing::info!(
                server = server.label(),
                "backend server cool-off over; it takes new connections again"
            );
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_what_the_server_does_is_its_fault() {
        use std::io::Error;
        for e in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH] {
            assert!(super::servers_fault(&Error::from_raw_os_error(e)));
        }
        for e in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EADDRNOTAVAIL,
            libc::ENOBUFS,
            libc::EINVAL,
        ] {
            assert!(!super::servers_fault(&Error::from_raw_os_error(e)));
        }
        assert!(!super::servers_fault(&Error::other("no errno")));
    }
}
