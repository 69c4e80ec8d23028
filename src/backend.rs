//! Backends, first cut: the listener's `backends` list, round robin, a connect clock per
//! attempt, and on failure the next backend, each at most once.
//!
//! Names are resolved once when the listener starts. Pools, health checks and PROXY protocol
//! come later (issue 3); this module is the place they grow.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::TcpConfig;
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

/// The listener's backends in configured order.
#[derive(Debug)]
pub struct Backends {
    addrs: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Backends {
    /// Resolves each `host:port` to its first address.
    pub async fn resolve(list: &[String]) -> Result<Backends, BackendError> {
        let mut addrs = Vec::with_capacity(list.len());
        for b in list {
            let first = tokio::net::lookup_host(b.as_str())
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
            addrs.push(first);
        }
        Ok(Backends {
            addrs,
            next: AtomicUsize::new(0),
        })
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Connects to the next backend in turn; on failure tries the others once each, every
    /// attempt bounded by `timeout`.
    pub async fn connect(
        &self,
        tcp: &TcpConfig,
        timeout: Duration,
    ) -> Result<TcpStream, BackendError> {
        let n = self.addrs.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut timed_out = false;
        for i in 0..n {
            let addr = self.addrs[(start + i) % n];
            let Ok(sock) = sockopt::backend_socket(addr, tcp) else {
                continue;
            };
            match tokio::time::timeout(timeout, sock.connect(addr)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => {
                    timed_out = false;
                    tracing::debug!(%addr, error = %e, "backend connect failed");
                }
                Err(_) => {
                    timed_out = true;
                    tracing::debug!(%addr, "backend connect timed out");
                }
            }
        }
        Err(if timed_out {
            BackendError::TimedOut
        } else {
            BackendError::Unavailable
        })
    }
}
