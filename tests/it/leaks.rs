//! Accounting cannot leak: thousands of connections ending every which way, on both sides,
//! then every count, the source table and the rate limiter's keys are back to zero.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::support::*;

/// xorshift64*: a reproducible random stream without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A backend that ends each connection at random: echo and FIN, RST after a few bytes,
/// RST at once, or FIN at once.
async fn chaos_backend(seed: u64) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seq = Arc::new(AtomicU64::new(seed));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut rng = Rng(seq.fetch_add(0x9E37_79B9, Ordering::Relaxed) | 1);
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                match rng.below(4) {
                    0 => loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = s.shutdown().await;
                                break;
                            }
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    },
                    1 => {
                        let _ = s.read(&mut buf).await;
                        rst(s);
                    }
                    2 => rst(s),
                    _ => drop(s),
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_abrupt_ends_leave_every_count_at_zero() {
    const CONNS: u64 = 3000;
    let backend = chaos_backend(0x5EED).await;
    let mut cfg = base_config(&[backend]);
    {
        let l = &mut cfg.listeners[0];
        // Caps on, so admission, eviction and refusal paths all run.
        l.limits.max_conns_per_source = 40;
        l.limits.max_half_open_per_source = 20;
        l.limits.max_half_closed_per_source = 5;
        l.limits.max_half_open = 30;
        l.limits.max_half_closed = 10;
        l.limits.conn_rate_per_source = 100_000;
        l.limits.conn_burst_per_source = 100_000;
        l.timeouts.first_byte = ms(150);
        l.timeouts.half_closed = ms(150);
        l.timeouts.idle = ms(300);
    }
    let p = Proxy::start(cfg).await;
    let addr = p.addr;
    let limit = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..CONNS {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let from = format!("127.0.1.{}", 1 + i % 50);
        let mut rng = Rng(0xC0FFEE ^ (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let Ok(mut c) = connect_from(&from, addr).await else {
                return;
            };
            let mut buf = [0u8; 512];
            match rng.below(7) {
                0 => rst(c),
                1 => drop(c),
                2 => {
                    let _ = c.write_all(b"hello").await;
                    rst(c);
                }
                3 => {
                    let _ = c.write_all(b"hello").await;
                    let _ = tokio::time::timeout(ms(50), c.read(&mut buf)).await;
                    let _ = c.shutdown().await;
                    let _ = tokio::time::timeout(ms(200), c.read(&mut buf)).await;
                }
                4 => {
                    // Silent until the clock or a random give-up.
                    tokio::time::sleep(ms(rng.below(250))).await;
                    rst(c);
                }
                5 => {
                    let _ = c.write_all(b"data then FIN and vanish").await;
                    let _ = c.shutdown().await;
                    tokio::time::sleep(ms(rng.below(250))).await;
                    drop(c);
                }
                _ => {
                    let _ = c.write_all(&[9u8; 4000]).await;
                    tokio::time::sleep(ms(rng.below(100))).await;
                    rst(c);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    p.assert_drained(Duration::from_secs(10)).await;
    // The rate limiter forgets keys once their buckets refill (here: within milliseconds).
    let guard = p.handle.guard(L).unwrap();
    tokio::time::sleep(ms(100)).await;
    guard.housekeep();
    let snap = p.snapshot();
    assert_eq!(snap.rate_keys, 0, "rate limiter keys left: {snap:?}");
    assert!(!snap.pressure);
    let accepted = p.stats().accepted.load(Ordering::Relaxed);
    assert!(
        accepted > CONNS / 2,
        "most connections were admitted ({accepted})"
    );
}
