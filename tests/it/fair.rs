//! Fair caps: a busy address doing ordinary connection-per-request traffic is not refused by
//! the per-source caps (its connections pass through half-open and half-closed for a moment,
//! and close and reconnect faster than halfguard's tasks run), while the floods those caps
//! exist for stay held at them; and observe mode, which counts what enforcement would do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use halfguard::config::{Config, Limits, Mode};
use halfguard::stats::{Observed, Reject, Timeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

/// `workers` clients from one address, each doing connect -> request -> answer -> close in a
/// loop for `secs` seconds. Returns (exchanges served, exchanges failed).
async fn busy_address(to: SocketAddr, workers: usize, secs: u64) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + std::time::Duration::from_secs(secs);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (ok, failed) = (ok.clone(), failed.clone());
        set.spawn(async move {
            while Instant::now() < end {
                let served = async {
                    let mut s = connect_from("127.0.0.2", to).await.ok()?;
                    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
                    let mut got = Vec::new();
                    tokio::time::timeout(ms(2000), s.read_to_end(&mut got))
                        .await
                        .ok()?
                        .ok()?;
                    (got == HTTP_OK).then_some(())
                }
                .await;
                match served {
                    Some(()) => ok.fetch_add(1, Ordering::Relaxed),
                    None => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while set.join_next().await.is_some() {}
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// The shipped per-source caps (64 connections, 16 silent, 16 half-closed), the rate limit
/// lifted to isolate the caps.
fn shipped_caps(b: SocketAddr) -> halfguard::Config {
    let mut cfg = base_config(&[b]);
    cfg.listeners[0].limits = Limits {
        conn_rate_per_source: 0,
        ..Limits::default()
    };
    cfg
}

async fn busy_address_is_not_refused(workers: usize) {
    let _ = halfguard::sockopt::raise_nofile();
    let b = backend(Backend::Http(0)).await;
    let p = Proxy::start(shipped_caps(b.addr)).await;
    let (ok, failed) = busy_address(p.addr, workers, 3).await;
    let stats = p.stats();
    let refused: u64 = Reject::ALL.iter().map(|&r| stats.rejected(r)).sum();
    let total = ok + failed;
    eprintln!("concurrency {workers}: {ok} served, {failed} failed, {refused} refused");
    assert!(total > 100, "too few exchanges to judge: {total}");
    // Fewer than 0.1% refused.
    assert!(
        refused * 1000 < total,
        "{refused} refusals of {total} (half_open {}, half_closed {}, conns {})",
        stats.rejected(Reject::SourceHalfOpen),
        stats.rejected(Reject::SourceHalfClosed),
        stats.rejected(Reject::SourceConns)
    );
    assert!(failed * 1000 < total, "{failed} failed of {total}");
    p.assert_drained(ms(3000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_address_at_concurrency_32_is_not_refused() {
    busy_address_is_not_refused(32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_address_at_its_connection_cap_is_not_refused() {
    // 64 = max_conns_per_source: every reconnect meets a source at its cap whose closing
    // connection's task may not have run yet.
    busy_address_is_not_refused(64).await;
}

/// Two connections from 127.0.0.2 held against a cap of two (each sent a byte, and with
/// `echo` read it back), then, `settle` later, a third: how long until its RST.
async fn third_over_a_cap_of_two(
    p: &Proxy,
    echo: bool,
    settle: Duration,
) -> (Vec<TcpStream>, Duration) {
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.2", p.addr).await.unwrap();
        if echo {
            assert_eq!(roundtrip(&mut c, b"x").await, b"x");
        } else {
            c.write_all(b"x").await.unwrap();
        }
        held.push(c);
    }
    tokio::time::sleep(settle).await;
    let mut third = connect_from("127.0.0.2", p.addr).await.unwrap();
    let _ = third.write_all(b"x").await;
    let after = expect_reset(&mut third, ms(2000)).await;
    (held, after)
}

fn cap_of_two(b: SocketAddr) -> Config {
    let mut cfg = base_config(&[b]);
    cfg.listeners[0].limits.max_conns_per_source = 2;
    cfg
}

#[tokio::test]
async fn a_held_connection_over_the_cap_is_still_refused() {
    // The backend answers only after the client's FIN: the two held connections never
    // complete an exchange, so the source is no pool that may grow past its cap.
    let b = backend(Backend::CollectThenReply).await;
    let p = Proxy::start(cap_of_two(b.addr)).await;
    // The third waits a moment for a slot (none frees: the two are held), then RST.
    let (mut held, after) = third_over_a_cap_of_two(&p, false, Duration::ZERO).await;
    assert!(
        after >= ms(800) && after < ms(1800),
        "refused after a wait: {after:?}"
    );
    assert_eq!(p.stats().rejected(Reject::SourceConns), 1);
    // A close frees the slot for the next one at once.
    drop(held.pop());
    let mut fourth = connect_from("127.0.0.2", p.addr).await.unwrap();
    fourth.write_all(b"in").await.unwrap();
    expect_open(&mut fourth, ms(1500)).await;
    assert_eq!(p.stats().rejected(Reject::SourceConns), 1);
}

/// A pool from one address, its connections each proven by an exchange and idle between
/// requests, is not held at the per-source cap while the listener has room: 200 connections
/// against the default cap of 64, none refused, every one served again after a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_proven_connections_grows_past_the_cap() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_conns_per_source = 64;
    let p = Proxy::start(cfg).await;
    let mut pool = Vec::new();
    for i in 0..200 {
        let mut c = connect_from("127.0.0.2", p.addr).await.unwrap();
        let msg = format!("hello {i}");
        let back = tokio::time::timeout(ms(2000), roundtrip(&mut c, msg.as_bytes()))
            .await
            .unwrap_or_else(|_| panic!("connection {i} answered"));
        assert_eq!(back, msg.as_bytes());
        pool.push(c);
    }
    assert_eq!(p.stats().rejected(Reject::SourceConns), 0);
    // Idle a while (past the progress checks), then every connection works again.
    tokio::time::sleep(ms(1500)).await;
    for c in pool.iter_mut() {
        assert_eq!(roundtrip(c, b"again").await, b"again");
    }
    let load = p
        .handle
        .guard(L)
        .unwrap()
        .top_sources(1, halfguard::guard::SourceOrder::Conns);
    assert_eq!(load[0].conns, 200);
    assert_ne!(load[0].verdict(), "flooding");
    drop(pool);
    p.assert_drained(ms(3000)).await;
}

/// A pool idle between requests is called a pool, never flooding.
#[tokio::test]
async fn an_idle_pool_is_called_a_pool() {
    let b = backend(Backend::Echo).await;
    let p = Proxy::start(base_config(&[b.addr])).await;
    let mut pool = Vec::new();
    for _ in 0..10 {
        let mut c = connect_from("127.0.0.2", p.addr).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"x").await, b"x");
        pool.push(c);
    }
    // Past the first progress checks: stalled, and idle.
    tokio::time::sleep(ms(1500)).await;
    let load = p
        .handle
        .guard(L)
        .unwrap()
        .top_sources(1, halfguard::guard::SourceOrder::Conns);
    assert_eq!((load[0].conns, load[0].stalled, load[0].idle), (10, 10, 10));
    assert_eq!(load[0].verdict(), "pool");
}

/// A source at its cap whose connections are slow readers (bytes waiting that they never
/// take) is not about to free a slot: a newcomer is refused at once, where a client pool with
/// idle connections waits (above).
#[tokio::test]
async fn a_slow_reader_at_its_cap_gets_no_wait_for_a_slot() {
    let b = backend(Backend::Flood).await;
    let p = Proxy::start(cap_of_two(b.addr)).await;
    // Their windows fill at once; the progress check a second after the first (1.25 s)
    // finds them stalled with bytes waiting.
    let (_held, after) = third_over_a_cap_of_two(&p, false, ms(1800)).await;
    assert!(
        after < ms(500),
        "refused at once, not after a wait: {after:?}"
    );
    assert_eq!(p.stats().rejected(Reject::SourceConns), 1);
}

#[tokio::test]
async fn a_silent_flood_is_held_at_the_half_open_cap_after_the_grace() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_half_open_per_source = 4;
    let p = Proxy::start(cfg).await;
    let mut flood = Vec::new();
    for _ in 0..12 {
        if let Ok(s) = connect_from("127.0.0.2", p.addr).await {
            flood.push(s);
        }
    }
    // Past the grace, four stay; the rest are refused, and newcomers too.
    wait_for(ms(2000), || (p.snapshot().half_open == 4).then_some(()))
        .await
        .expect("held at the cap");
    assert_eq!(p.stats().rejected(Reject::SourceHalfOpen), 8);
    let mut late = connect_from("127.0.0.2", p.addr).await.unwrap();
    expect_reset(&mut late, ms(1000)).await;
    assert_eq!(p.stats().rejected(Reject::SourceHalfOpen), 9);
}

#[tokio::test]
async fn observe_mode_holds_a_silent_flood_counts_it_and_a_reload_enforces_at_once() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    {
        let lim = &mut cfg.listeners[0].limits;
        lim.max_half_open_per_source = 2;
        lim.max_conns_per_source = 6;
        lim.mode = Mode::Observe;
    }
    cfg.listeners[0].timeouts.first_byte = ms(300);
    let enforce = {
        let mut c = cfg.clone();
        c.listeners[0].limits.mode = Mode::Enforce;
        c
    };
    let p = Proxy::start(cfg).await;

    let mut flood = Vec::new();
    for _ in 0..10 {
        flood.push(connect_from("127.0.0.2", p.addr).await.unwrap());
    }
    // Past the grace and the first-byte clock (the four over the connection cap first wait
    // a second for a slot, as they would when enforced): all ten are still held...
    tokio::time::sleep(ms(1800)).await;
    assert_eq!(p.snapshot().conns, 10);
    for s in flood.iter_mut() {
        expect_open(s, ms(10)).await;
    }
    // ...and what enforcement would have done is counted.
    let stats = p.stats();
    let o = |what| stats.observed(what);
    assert_eq!(o(Observed::TimeOut(Timeout::FirstByte)), 10);
    assert_eq!(o(Observed::Reject(Reject::SourceHalfOpen)), 8);
    assert!(o(Observed::Reject(Reject::SourceConns)) >= 4);
    assert_eq!(stats.rejected(Reject::SourceHalfOpen), 0);
    assert_eq!(stats.timed_out(Timeout::FirstByte), 0);
    let top = p
        .handle
        .guard(L)
        .unwrap()
        .top_sources(1, halfguard::guard::SourceOrder::Observed);
    assert_eq!(top[0].source.to_string(), "127.0.0.2");
    assert!(top[0].observed >= 22, "{:?}", top[0]);

    // Enforce: the clocks that already ran out end the flood at once.
    p.handle.reload_with(enforce).await.unwrap();
    for s in flood.iter_mut() {
        expect_reset(s, ms(1000)).await;
    }
    assert_eq!(stats.timed_out(Timeout::FirstByte), 10);
    p.assert_drained(ms(2000)).await;
}

/// The review's reproduction: four sources each hold their cap of idle keep-alive
/// connections and reconnect the moment a wait for a slot ends. Waiters are few and evicted
/// first, so a client from another address still finds a half-open place every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_newcomers_never_fill_the_half_open_cap() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_conns_per_source = 4;
    cfg.listeners[0].limits.max_half_open = 16;
    let p = Proxy::start(cfg).await;
    let mut held = Vec::new();
    for a in 1..=4 {
        for _ in 0..4 {
            let mut c = connect_from(&format!("127.0.3.{a}"), p.addr).await.unwrap();
            assert_eq!(roundtrip(&mut c, b"x").await, b"x");
            held.push(c);
        }
    }
    let end = Instant::now() + Duration::from_secs(4);
    let mut churn = tokio::task::JoinSet::new();
    for a in 1..=4 {
        for _ in 0..4 {
            let to = p.addr;
            churn.spawn(async move {
                while Instant::now() < end {
                    match connect_from(&format!("127.0.3.{a}"), to).await {
                        // Silent until cut (a wait for a slot ends in RST).
                        Ok(mut s) => {
                            let mut buf = [0u8; 16];
                            let _ = tokio::time::timeout(ms(1500), s.read(&mut buf)).await;
                        }
                        Err(_) => tokio::time::sleep(ms(5)).await,
                    }
                }
            });
        }
    }
    tokio::time::sleep(ms(300)).await;
    let mut served = 0;
    for _ in 0..40 {
        let tried = async {
            let mut c = connect_from("127.0.4.1", p.addr).await.ok()?;
            c.write_all(b"hi").await.ok()?;
            let mut back = [0u8; 2];
            c.read_exact(&mut back).await.ok()?;
            (&back == b"hi").then_some(())
        };
        if let Ok(Some(())) = tokio::time::timeout(ms(1000), tried).await {
            served += 1;
        }
        tokio::time::sleep(ms(50)).await;
    }
    while churn.join_next().await.is_some() {}
    assert_eq!(served, 40, "legit client served {served} of 40");
    drop(held);
    p.assert_drained(ms(3000)).await;
}
