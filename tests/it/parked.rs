//! Silent connections wait in their listener's lot (`conn::parked`), outside any task, and
//! live there exactly as they would in one: the first-byte clock resets them, a byte wakes
//! them into a proxied connection, an eviction and pressure reach them. Open connections idle
//! after an exchange park there too, with both sockets: their idle clock and lifetime, a byte
//! or a FIN from either side, an eviction and a server's abort reach them as in a task.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use halfguard::config::OnFull;
use halfguard::stats::{EvictState, Timeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

fn parked_idle(p: &Proxy) -> u64 {
    p.stats().parked_idle.load(Relaxed)
}

/// Waits until `n` connections are parked idle after an exchange (none silent).
async fn until_parked_idle(p: &Proxy, n: u64) {
    // Parked at the first progress check that finds it idle a second (`open::IDLE_PARK`).
    wait_for(ms(3500), || (parked_idle(p) == n).then_some(()))
        .await
        .unwrap_or_else(|| panic!("{n} parked idle, saw {}", parked_idle(p)));
    assert_eq!(parked(p), 0, "none parked silent");
}

/// A backend that keeps each connection it accepts and hands it to the test, which speaks
/// for the server.
async fn held_backend() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<TcpStream>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = tx.send(s);
        }
    });
    (addr, rx)
}

/// Client says `hello`, the server answers `world`: one exchange.
async fn exchange(c: &mut TcpStream, s: &mut TcpStream) {
    c.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    s.write_all(b"world").await.unwrap();
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"world");
}

/// The first exchange of a new client connection `c`: returns the server's side of it, which
/// the backend handed over on `accepted`.
async fn first_exchange(
    c: &mut TcpStream,
    accepted: &mut tokio::sync::mpsc::UnboundedReceiver<TcpStream>,
) -> TcpStream {
    c.write_all(b"hello").await.unwrap();
    let mut s = accepted.recv().await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    s.write_all(b"world").await.unwrap();
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"world");
    s
}

/// Sends `len` patterned bytes from `from` while `to` reads them, and checks every byte.
async fn bulk(from: &mut TcpStream, to: &mut TcpStream, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut got = vec![0u8; len];
    let (w, r) = tokio::join!(from.write_all(&data), to.read_exact(&mut got));
    w.unwrap();
    r.unwrap();
    assert!(got == data, "{len} bytes arrive whole and in order");
}

#[tokio::test]
async fn an_idle_connection_parks_after_an_exchange_and_wakes_for_either_side() {
    let (b, mut accepted) = held_backend().await;
    let p = Proxy::start(base_config(&[b])).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let mut s = first_exchange(&mut c, &mut accepted).await;
    until_parked_idle(&p, 1).await;
    assert_eq!(p.snapshot().conns, 1, "still counted open");

    // The client speaks again: woken, a request and its answer, then a large one each way.
    exchange(&mut c, &mut s).await;
    assert_eq!(parked_idle(&p), 0, "woken into a task");
    bulk(&mut c, &mut s, 1 << 20).await;
    bulk(&mut s, &mut c, 4 << 20).await;

    // Parked again, then the server speaks first.
    until_parked_idle(&p, 1).await;
    s.write_all(b"push").await.unwrap();
    let mut push = [0u8; 4];
    c.read_exact(&mut push).await.unwrap();
    assert_eq!(&push, b"push");
    exchange(&mut c, &mut s).await;

    drop((c, s));
    p.assert_drained(ms(2000)).await;
    assert_eq!(parked_idle(&p), 0);
    assert_eq!(p.stats().timed_out(Timeout::Idle), 0);
}

#[tokio::test]
async fn a_parked_idle_connection_is_reset_by_its_idle_clock_and_its_lifetime() {
    for lifetime in [false, true] {
        let (b, mut accepted) = held_backend().await;
        let mut cfg = base_config(&[b]);
        if lifetime {
            cfg.listeners[0].timeouts.max_lifetime = Some(ms(2500));
        } else {
            cfg.listeners[0].timeouts.idle = ms(2500);
        }
        let p = Proxy::start(cfg).await;

        let start = Instant::now();
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        let mut s = first_exchange(&mut c, &mut accepted).await;
        // Both clocks count from about now: the last byte, the accept.
        let last = Instant::now();
        until_parked_idle(&p, 1).await;
        expect_reset(&mut c, ms(4000)).await;
        let took = if lifetime { start } else { last }.elapsed();
        assert!(
            took >= ms(2450) && took < ms(3000),
            "reset {took:?} after the clock's start, the clock is 2.5 s (lifetime: {lifetime})"
        );
        // The server's side is reset too.
        assert_eq!(read_end(&mut s, ms(1000)).await, Seen::Reset);
        let clock = if lifetime {
            Timeout::MaxLifetime
        } else {
            Timeout::Idle
        };
        assert_eq!(p.stats().timed_out(clock), 1, "lifetime: {lifetime}");
        assert_eq!(parked_idle(&p), 0);
        p.assert_drained(ms(2000)).await;
    }
}

#[tokio::test]
async fn a_fin_reaches_the_other_side_of_a_parked_idle_connection() {
    let (b, mut accepted) = held_backend().await;
    let p = Proxy::start(base_config(&[b])).await;

    // The client half-closes: its FIN reaches the server, whose answer after it reaches
    // the client, then the server's FIN.
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let mut s = first_exchange(&mut c, &mut accepted).await;
    until_parked_idle(&p, 1).await;
    c.shutdown().await.unwrap();
    assert_eq!(read_end(&mut s, ms(2000)).await, Seen::Fin(Vec::new()));
    s.write_all(b"after your fin").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(
        read_end(&mut c, ms(2000)).await,
        Seen::Fin(b"after your fin".to_vec())
    );
    p.assert_drained(ms(2000)).await;
    assert_eq!(p.stats().closed_clean.load(Relaxed), 1);

    // The server closes: the client sees its FIN.
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let mut s = first_exchange(&mut c, &mut accepted).await;
    until_parked_idle(&p, 1).await;
    s.shutdown().await.unwrap();
    assert_eq!(read_end(&mut c, ms(2000)).await, Seen::Fin(Vec::new()));
    drop((c, s));
    p.assert_drained(ms(2000)).await;
    assert_eq!(p.stats().closed_clean.load(Relaxed), 2);
}

#[tokio::test]
async fn an_eviction_reaches_a_parked_idle_connection() {
    let (b, mut accepted) = held_backend().await;
    let mut cfg = base_config(&[b]);
    cfg.listeners[0].limits.max_conns = 2;
    cfg.listeners[0].limits.on_full = OnFull::Evict;
    let p = Proxy::start(cfg).await;

    let mut heavy = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.2", p.addr).await.unwrap();
        let s = first_exchange(&mut c, &mut accepted).await;
        heavy.push((c, s));
    }
    until_parked_idle(&p, 2).await;
    assert_eq!(
        p.snapshot().stalled,
        2,
        "idle: stalled, evictable when full"
    );
    // Full: a newcomer takes the place of one of them, which sits in the lot.
    let start = Instant::now();
    let mut newcomer = connect_from("127.0.0.3", p.addr).await.unwrap();
    let mut reset = None;
    for (i, (c, _)) in heavy.iter_mut().enumerate() {
        if read_end(c, ms(300)).await == Seen::Reset {
            reset = Some((i, start.elapsed()));
            break;
        }
    }
    let (i, took) = reset.expect("one of the parked idle connections is reset");
    // The lot sweeps within 5 ms of an eviction; the rest is the connect and the RST's trip.
    assert!(
        took < ms(100),
        "reset {took:?} after the newcomer connected"
    );
    assert_eq!(p.stats().evicted(EvictState::Stalled), 1);
    assert_eq!(parked_idle(&p), 1);
    // The other is still served, and so is the newcomer.
    let (c, s) = &mut heavy[1 - i];
    exchange(c, s).await;
    newcomer.write_all(b"hello").await.unwrap();
    let mut s = accepted.recv().await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
}

/// `on_down = "abort"` reaches a connection parked idle: the lot hears of the abort and
/// resets it, counted as the task counts it (`backend_unavailable`).
#[tokio::test]
async fn on_down_abort_reaches_a_parked_idle_connection() {
    let (addr, mut rx, stop) = stoppable_echo_backend().await;
    let text = format!(
        r#"
[[listeners]]
name = "{L}"
bind = "127.0.0.1:0"
backend = "app"

[[backends]]
name = "app"
on_down = "abort"
servers = [{{ addr = "{addr}" }}]
[backends.health]
interval = "100ms"
timeout = "100ms"
fall = 2

[limits]
max_conns_per_source = 0
max_half_open_per_source = 0
conn_rate_per_source = 0

[admin]
bind = "off"
"#
    );
    let cfg = halfguard::config::parse(&text, "test.toml", Default::default()).unwrap();
    let p = Proxy::start(cfg).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"hello").await, b"hello");
    let _server_side = rx.recv().await.unwrap();
    until_parked_idle(&p, 1).await;
    stop.send(()).unwrap();
    // Two failed checks 100 ms apart, then the server is down and its connections aborted:
    // the lot resets this one at once.
    let down = wait_for(ms(3000), || {
        let up = p
            .handle
            .backend_servers("app")
            .into_iter()
            .any(|(_, up, _)| up);
        (!up).then(Instant::now)
    })
    .await
    .expect("the server is marked down");
    expect_reset(&mut c, ms(3000)).await;
    let took = down.elapsed();
    assert!(
        took < ms(100),
        "reset {took:?} after the server was marked down"
    );
    assert_eq!(p.stats().backend_unavailable.load(Relaxed), 1);
    assert_eq!(parked_idle(&p), 0);
    p.assert_drained(ms(2000)).await;
}
