//! Whether a pool's server speaks first: connect, send nothing, and see whether bytes come.
//!
//! A server-first protocol (SMTP, MySQL, FTP, ...) behind a client-first listener looks,
//! from the proxy, like clients that never speak: each connection waits for a client byte
//! that the client, itself waiting for the greeting, never sends, and ends at
//! `timeouts.first_byte`. The port alone is a guess (`check` makes it); a probe is the
//! evidence. The server layer asks for one when a client-first listener's `first_byte`
//! timeouts grow, seldom (see `server::greeting`).
//!
//! A probe is one connection that sends nothing but the pool's PROXY header (the one a real
//! connection would send, with the probe's own addresses), waits a bounded time and closes.
//! It takes no slot of the server and tells passive health nothing: it judges the protocol,
//! not the server.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Pool;
use crate::config::ProxyVersion;
use crate::proxy_protocol;

/// What one probe saw.
#[derive(Debug, Clone)]
pub struct Greeting {
    /// The server probed, as configured.
    pub server: String,
    /// It sent bytes before the probe sent any (beyond the PROXY header).
    pub spoke_first: bool,
}

impl Pool {
    /// Probes one server (the first one up, else the first): connects within `connect`,
    /// then waits up to `wait` for a byte. An error is a server that could not be reached,
    /// which says nothing about its protocol.
    pub async fn probe_greeting(&self, connect: Duration, wait: Duration) -> io::Result<Greeting> {
        let set = self.servers();
        let server = (set.list.iter().find(|s| s.is_up()))
            .or_else(|| set.list.first())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the pool has no server"))?;
        let spoke_first = probe(server.addr(), self.cfg.proxy_protocol, connect, wait).await?;
        Ok(Greeting {
            server: server.label().to_string(),
            spoke_first,
        })
    }
}

async fn probe(
    addr: SocketAddr,
    proxy: Option<ProxyVersion>,
    connect: Duration,
    wait: Duration,
) -> io::Result<bool> {
    let mut s = tokio::time::timeout(connect, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    if let Some(v) = proxy {
        let (local, peer) = (s.local_addr()?, s.peer_addr()?);
        let header = match v {
            ProxyVersion::V1 => proxy_protocol::encode_v1(local, peer),
            ProxyVersion::V2 => proxy_protocol::encode_v2(local, peer),
        };
        s.write_all(&header).await?;
    }
    let mut buf = [0u8; 512];
    // A server that closes at once, or resets, did not greet either.
    let spoke = matches!(
        tokio::time::timeout(wait, s.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    );
    // A close with RST: no TIME_WAIT here, and nothing half-said left on the server.
    let _ = s.set_zero_linger();
    Ok(spoke)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn server(greet: bool) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    if greet {
                        let _ = s.write_all(b"220 ready\r\n").await;
                    }
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_greeting_is_seen_and_silence_is_not() {
        let wait = Duration::from_millis(300);
        let connect = Duration::from_secs(1);
        let (greeter, silent) = (server(true).await, server(false).await);
        assert!(probe(greeter, None, connect, wait).await.unwrap());
        assert!(!probe(silent, None, connect, wait).await.unwrap());
        // The PROXY header is ours, not a greeting.
        assert!(
            !probe(silent, Some(ProxyVersion::V2), connect, wait)
                .await
                .unwrap()
        );
    }
}
