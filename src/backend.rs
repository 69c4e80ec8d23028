//! Backends, first cut: the listener's `backends` list, round robin, a connect clock per
//! attempt, and on failure the next backend, each at most once.
//!
//! Names are resolved once when the listener starts. Pools, health checks and PROXY protocol
//! come later (issue 3); this module is the place they grow.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::TcpConfig;
use crate::metrics::{CONNECT_BUCKETS, Histo};
use crate::sockopt;

/// Why no backend connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot resolve backend {backend:?}: {source}")]
    Resolve {
        backend: String,
        #[source]
        source: io::Error,
    },
    #[error("every backend failed; the last one timed out")]
    TimedOut,
    #[error("every backend refused or failed")]
    Unavailable,
}

/// One backend server and what halfguard has seen of it.
#[derive(Debug)]
pub struct ServerStats {
    addr: SocketAddr,
    /// As configured (`host:port`), the metric label.
    label: String,
    /// Passive health: false after a failed connect, true after a successful one.
    up: AtomicBool,
    connect_errors: AtomicU64,
}

impl ServerStats {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn label(&self) -> &str {
        &self.label
    }
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
    pub fn connect_errors(&self) -> u64 {
        self.connect_errors.load(Ordering::Relaxed)
    }
}

/// A listener's backend pool, in configured order.
#[derive(Debug)]
pub struct Backends {
    /// The pool's name, for metrics: the listener's name for a `backends = [...]` list.
    name: String,
    servers: Vec<ServerStats>,
    next: AtomicUsize,
    connect_time: Histo,
}

impl Backends {
    /// Resolves each `host:port` to its first address.
    pub async fn resolve(name: &str, list: &[String]) -> Result<Backends, BackendError> {
        let mut servers = Vec::with_capacity(list.len());
        for b in list {
            let addr = tokio::net::lookup_host(b.as_str())
                .await
                .and_then(|mut it| {
                    it.next().ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "no address for this name")
                    })
                })
                .map_err(|source| BackendError::Resolve {
                    backend: b.clone(),
                    source,
                })?;
            servers.push(ServerStats {
                addr,
                label: b.clone(),
                up: AtomicBool::new(true),
                connect_errors: AtomicU64::new(0),
            });
        }
        Ok(Backends {
            name: name.to_string(),
            servers,
            next: AtomicUsize::new(0),
            connect_time: Histo::new(CONNECT_BUCKETS),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn servers(&self) -> &[ServerStats] {
        &self.servers
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.addr).collect()
    }

    /// True when at least one server is considered up.
    pub fn any_up(&self) -> bool {
        self.servers.iter().any(ServerStats::is_up)
    }

    pub fn connect_time(&self) -> &Histo {
        &self.connect_time
    }

    /// Connects to the next backend in turn; on failure tries the others once each, every
    /// attempt bounded by `timeout`.
    pub async fn connect(
        &self,
        tcp: &TcpConfig,
        timeout: Duration,
    ) -> Result<TcpStream, BackendError> {
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut timed_out = false;
        for i in 0..n {
            let server = &self.servers[(start + i) % n];
            let addr = server.addr;
            let Ok(sock) = sockopt::backend_socket(addr, tcp) else {
                continue;
            };
            let t0 = Instant::now();
            match tokio::time::timeout(timeout, sock.connect(addr)).await {
                Ok(Ok(s)) => {
                    self.connect_time.observe(t0.elapsed());
                    server.up.store(true, Ordering::Relaxed);
                    return Ok(s);
                }
                Ok(Err(e)) => {
                    timed_out = false;
                    tracing::debug!(%addr, error = %e, "backend connect failed");
                }
                Err(_) => {
                    timed_out = true;
                    tracing::debug!(%addr, "backend connect timed out");
                }
            }
            server.up.store(false, Ordering::Relaxed);
            server.connect_errors.fetch_add(1, Ordering::Relaxed);
        }
        Err(if timed_out {
            BackendError::TimedOut
        } else {
            BackendError::Unavailable
        })
    }
}
