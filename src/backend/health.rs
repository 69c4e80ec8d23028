//! A pool's background work: active health checks per server and periodic re-resolution of
//! server names, which adds and removes servers as a name's addresses change.
//!
//! A check is a TCP connect, optionally a `send` and a reply that must start with `expect`,
//! within `timeout`. `rise` good checks in a row bring a server up, `fall` bad ones take it
//! down (HAProxy's `inter 2s rise 2 fall 3` by default). Check connections are closed with
//! RST so they leave no TIME_WAIT behind, check after check.
//!
//! A passive cool-off after failed connects is probed with the same check every `interval`:
//! a server that answers again (it was started after halfguard, or restarted) takes
//! connections at once instead of after the whole `cooloff`. Either way its return is
//! logged.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use super::{Pool, Server, resolve};
use crate::config::{HealthConfig, OnDown};

pub(super) fn start(pool: &Arc<Pool>, tasks: &TaskTracker) {
    if pool.cfg.health.enabled {
        for server in &pool.servers().list {
            tasks.spawn(check_loop(pool.clone(), server.clone()));
        }
    }
    if pool
        .cfg
        .servers
        .iter()
        .any(|s| s.addr.parse::<std::net::SocketAddr>().is_err())
    {
        tasks.spawn(resolve_loop(pool.clone(), tasks.clone()));
    }
}

async fn check_loop(pool: Arc<Pool>, server: Arc<Server>) {
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

/// Watches `server`'s cool-off until it ends, and logs its end. With `probe`, the check runs
/// every `interval` meanwhile and a good one ends the cool-off early. Bounded by the
/// cool-off itself, and stops with the server.
pub(super) fn watch_cooloff(server: Arc<Server>, probe: Option<HealthConfig>) {
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
                && check(&server, h).await
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

/// One check.
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

async fn resolve_loop(pool: Arc<Pool>, tasks: TaskTracker) {
    let mut tick = tokio::time::interval(pool.cfg.resolve_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // resolved at start already
    let mut failing = vec![false; pool.cfg.servers.len()];
    loop {
        tokio::select! {
            _ = pool.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (entry, cfg) in pool.cfg.servers.iter().enumerate() {
            if cfg.addr.parse::<std::net::SocketAddr>().is_ok() {
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(5), resolve(&cfg.addr)).await {
                Ok(Ok(addrs)) => {
                    if failing[entry] {
                        tracing::info!(server = %cfg.addr, ?addrs, "backend name resolves again");
                        failing[entry] = false;
                    }
                    for new in pool.follow(entry, &addrs) {
                        if pool.cfg.health.enabled {
                            tasks.spawn(check_loop(pool.clone(), new));
                        }
                    }
                }
                _ => {
                    if !failing[entry] {
                        tracing::warn!(
                            server = %cfg.addr,
                            "backend name no longer resolves; keeping its last addresses"
                        );
                        failing[entry] = true;
                    }
                }
            }
        }
    }
}
