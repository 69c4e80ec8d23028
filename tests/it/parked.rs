//! Silent connections wait in their listener's lot (`conn::parked`), outside any task, and
//! live there exactly as they would in one: the first-byte clock resets them, a byte wakes
//! them into a proxied connection, an eviction and pressure reach them.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use halfguard::config::OnFull;
use halfguard::stats::{EvictState, Timeout};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

fn parked(p: &Proxy) -> u64 {
    p.stats().parked.load(Relaxed)
}

/// Waits until `n` connections are parked (and counted half-open).
async fn until_parked(p: &Proxy, n: u64) {
    wait_for(ms(2000), || {
        (parked(p) == n && p.snapshot().half_open as u64 >= n).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{n} parked, saw {}", parked(p)));
}

#[tokio::test]
async fn a_silent_connection_is_parked_and_reset_at_its_first_byte_clock() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.first_byte = ms(400);
    let p = Proxy::start(cfg).await;

    let start = Instant::now();
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    until_parked(&p, 1).await;
    let took = start.elapsed() + expect_reset(&mut c, ms(2000)).await;
    assert!(
        took >= ms(380) && took < ms(1000),
        "reset after {took:?}, the clock is 400 ms"
    );
    assert_eq!(p.stats().timed_out(Timeout::FirstByte), 1);
    assert_eq!(parked(&p), 0);
    p.assert_drained(ms(2000)).await;
}

#[tokio::test]
async fn a_parked_connection_that_speaks_is_proxied() {
    let b = backend(Backend::Echo).await;
    let p = Proxy::start(base_config(&[b.addr])).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    until_parked(&p, 1).await;
    tokio::time::sleep(ms(100)).await;
    assert_eq!(roundtrip(&mut c, b"hello").await, b"hello");
    assert_eq!(parked(&p), 0, "woken into its task");
    assert_eq!(p.snapshot().half_open, 0);
    assert_eq!(roundtrip(&mut c, b"again").await, b"again");
    drop(c);
    p.assert_drained(ms(2000)).await;
    assert_eq!(p.stats().timed_out(Timeout::FirstByte), 0);
}

#[tokio::test]
async fn an_evicted_parked_connection_is_reset_at_once() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_half_open = 4;
    cfg.listeners[0].limits.on_full = OnFull::Evict;
    let p = Proxy::start(cfg).await;

    let mut heavy = Vec::new();
    for _ in 0..3 {
        heavy.push(connect_from("127.0.0.2", p.addr).await.unwrap());
    }
    let _light = connect_from("127.0.0.3", p.addr).await.unwrap();
    until_parked(&p, 4).await;
    past_grace().await;
    // Full: a newcomer evicts the heavy source's oldest, which sits in the lot.
    let start = Instant::now();
    let _newcomer = connect_from("127.0.0.3", p.addr).await.unwrap();
    expect_reset(&mut heavy[0], ms(2000)).await;
    let took = start.elapsed();
    // The lot sweeps within 5 ms of an eviction; the rest is the connect and the RST's trip.
    assert!(
        took < ms(100),
        "reset {took:?} after the newcomer connected"
    );
    assert_eq!(p.stats().evicted(EvictState::HalfOpen), 1);
    expect_open(&mut heavy[1], ms(100)).await;
    wait_for(ms(1000), || (parked(&p) == 4).then_some(()))
        .await
        .expect("three left and the newcomer parked");
}

#[tokio::test]
async fn pressure_shortens_a_parked_connections_clock() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.first_byte = Duration::from_secs(30);
    cfg.listeners[0].limits.max_half_open = 10;
    cfg.pressure.high_water = 0.5; // above 5 half-open
    cfg.pressure.low_water = 0.05;
    cfg.pressure.first_byte = ms(300);
    let p = Proxy::start(cfg).await;

    let mut early = Vec::new();
    for _ in 0..4 {
        early.push(TcpStream::connect(p.addr).await.unwrap());
    }
    until_parked(&p, 4).await;
    tokio::time::sleep(ms(400)).await;
    assert!(!p.snapshot().pressure);
    assert_eq!(parked(&p), 4, "the 30 s clock still holds them");
    let mut late = Vec::new();
    for _ in 0..2 {
        late.push(TcpStream::connect(p.addr).await.unwrap());
    }
    // Pressure: the early ones are past 300 ms and go at once.
    let start = Instant::now();
    for c in early.iter_mut() {
        expect_reset(c, ms(2000)).await;
    }
    assert!(start.elapsed() < ms(500), "took {:?}", start.elapsed());
    for c in late.iter_mut() {
        expect_reset(c, ms(2000)).await;
    }
    assert_eq!(p.stats().timed_out(Timeout::FirstByte), 6);
    assert_eq!(parked(&p), 0);
}

#[tokio::test]
async fn a_parked_connection_waits_out_the_drain_then_is_reset_and_the_server_stops() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.drain = ms(400);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    until_parked(&p, 1).await;
    let handle = p.handle.clone();
    let stats = p.stats();
    let start = Instant::now();
    let stopping = tokio::spawn(p.shutdown());
    let took = expect_reset(&mut c, ms(3000)).await;
    assert!(
        took >= ms(350) && took < ms(1500),
        "reset {took:?} into a 400 ms drain"
    );
    tokio::time::timeout(ms(2000), stopping)
        .await
        .expect("the lot ends with its last record")
        .unwrap();
    assert!(start.elapsed() < ms(2500));
    assert_eq!(stats.aborted_on_shutdown.load(Relaxed), 1);
    assert_eq!(stats.parked.load(Relaxed), 0);
    let s = handle.snapshot(L).unwrap();
    assert_eq!((s.conns, s.half_open), (0, 0));
}

#[tokio::test]
async fn a_reload_that_shortens_first_byte_reaches_parked_connections() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.first_byte = Duration::from_secs(30);
    let mut shorter = cfg.clone();
    shorter.listeners[0].timeouts.first_byte = ms(300);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    until_parked(&p, 1).await;
    tokio::time::sleep(ms(400)).await;
    p.handle.reload_with(shorter).await.expect("reload");
    // Already past 300 ms: it goes at once.
    let took = expect_reset(&mut c, ms(2000)).await;
    assert!(took < ms(500), "reset {took:?} after the reload");
    assert_eq!(p.stats().timed_out(Timeout::FirstByte), 1);
    assert_eq!(parked(&p), 0);
}
