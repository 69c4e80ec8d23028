//! Active health: a check per server every `interval`, which takes a server out of rotation
//! before clients meet its failures, and brings it back when it answers again.
//!
//! A check is a TCP connect, optionally a `send` and a reply that must start with `expect`,
//! within `timeout`. `rise` good checks in a row bring a server up, `fall` bad ones take it
//! down (HAProxy's `inter 2s rise 2 fall 3` by default), so one lost SYN does not flap it.
//! Check connections are closed with RST so they leave no TIME_WAIT behind, check after
//! check.
//!
//! The same check also serves passive health (`passive.rs`): it confirms failures before
//! the last server up is taken out, and probes a server cooling off.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use super::{Pool, Server};
use crate::config::{HealthConfig, OnDown};

/// Starts a check loop per server when the pool has active checks.
pub(super) fn start(pool: &Arc<Pool>, tasks: &TaskTracker) {
    if pool.cfg.health.enabled {
        for server in &pool.servers().list {
            tasks.spawn(check_loop(pool.clone(), server.clone()));
        }
    }
}

/// Checks `server` every interval until the pool stops or the server is removed.
pub(super) async fn check_loop(pool: Arc<Pool>, server: Arc<Server>) {
    let h = &pool.cfg.health;
    let mut tick = tokio::time::interval(h.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Cancelled with the pool's, or when the server is removed.
            _ = server.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ok = check(&server, h).await;
        match server.check_result(ok, h.rise, h.fall) {
            Some(true) => {
                tracing::info!(pool = %pool.cfg.name, server = server.label(), "backend server up")
            }
            Some(false) => {
                tracing::warn!(pool = %pool.cfg.name, server = server.label(), "backend server down");
                if pool.cfg.on_down == OnDown::Abort {
                    server.abort_all();
                }
            }
            None => {}
        }
    }
}

/// One check; true when the server answered as configured within `timeout`. Bounded by
/// `timeout` whatever the server does, so a server that hangs cannot stall its loop.
pub(super) async fn check(server: &Server, h: &HealthConfig) -> bool {
    let addr = server.addr();
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        if let Some(send) = &h.send {
            s.write_all(send).await.ok()?;
        }
        let ok = match &h.expect {
            None => true,
            Some(want) => {
                let mut got = vec![0u8; want.len()];
                s.read_exact(&mut got).await.is_ok() && &got == want
            }
        };
        let _ = s.set_zero_linger();
        Some(ok)
    };
    matches!(
        tokio::time::timeout(h.timeout, attempt).await,
        Ok(Some(true))
    )
}
