//! Each clock fires, aborts with RST, and gives its counts back.

use std::time::Duration;

use halfguard::stats::Timeout;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

#[tokio::test]
async fn first_byte_clock_aborts_a_silent_client() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.first_byte = ms(200);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    wait_for(ms(1000), || (p.snapshot().half_open == 1).then_some(()))
        .await
        .unwrap();
    let took = expect_reset(&mut c, ms(3000)).await;
    assert!(took >= ms(150), "aborted too early: {took:?}");
    assert!(took < ms(1500), "aborted too late: {took:?}");
    assert_eq!(p.stats().timed_out(Timeout::FirstByte), 1);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn a_client_that_speaks_in_time_is_served() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.first_byte = ms(300);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    tokio::time::sleep(ms(150)).await;
    assert_eq!(roundtrip(&mut c, b"hello").await, b"hello");
    // Past the first-byte clock, the open connection is still served.
    tokio::time::sleep(ms(400)).await;
    assert_eq!(roundtrip(&mut c, b"again").await, b"again");
    assert_eq!(p.stats().timed_out(Timeout::FirstByte), 0);
    c.shutdown().await.unwrap();
    assert_eq!(read_end(&mut c, ms(2000)).await, Seen::Fin(vec![]));
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn idle_clock_aborts_both_sides() {
    let mut b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.idle = ms(300);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"ping").await, b"ping");
    let took = expect_reset(&mut c, ms(3000)).await;
    assert!(
        took >= ms(250) && took < ms(1500),
        "idle fired after {took:?}"
    );
    // The backend was aborted too, with RST.
    let end = tokio::time::timeout(ms(2000), b.ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        end.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset,
        "backend should see RST"
    );
    assert_eq!(p.stats().timed_out(Timeout::Idle), 1);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn traffic_keeps_the_idle_clock_away() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.idle = ms(250);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    for _ in 0..8 {
        assert_eq!(roundtrip(&mut c, b"tick").await, b"tick");
        tokio::time::sleep(ms(100)).await;
    }
    assert_eq!(p.stats().timed_out(Timeout::Idle), 0);
}

#[tokio::test]
async fn half_closed_clock_aborts_a_lingering_backend() {
    // The client sends FIN; the backend reads it and never answers nor closes.
    let mut b = backend(Backend::Sink).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.half_closed = ms(300);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap();
    wait_for(ms(1000), || (p.snapshot().half_closed == 1).then_some(()))
        .await
        .unwrap();
    let took = expect_reset(&mut c, ms(3000)).await;
    assert!(
        took >= ms(200) && took < ms(1500),
        "half_closed fired after {took:?}"
    );
    let end = tokio::time::timeout(ms(2000), b.ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_err(), "backend should see RST");
    assert_eq!(p.stats().timed_out(Timeout::HalfClosed), 1);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn bytes_in_the_open_direction_reset_the_half_closed_clock() {
    // The backend sends FIN first; the client keeps sending for longer than the clock.
    let mut b = backend(Backend::FinFirst).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.half_closed = ms(300);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"hi").await.unwrap();
    assert_eq!(
        read_end(&mut c, ms(2000)).await,
        Seen::Fin(b"bye\n".to_vec())
    );
    for i in 0..8 {
        if i > 0 {
            tokio::time::sleep(ms(100)).await;
        }
        c.write_all(b"more").await.unwrap();
    }
    // Now stop: the clock runs out 300 ms after the last byte, not before.
    let stopped = Instant::now();
    assert_eq!(
        p.stats().timed_out(Timeout::HalfClosed),
        0,
        "progress must reset the clock"
    );
    wait_for(ms(3000), || {
        (p.stats().timed_out(Timeout::HalfClosed) == 1).then_some(())
    })
    .await
    .expect("half_closed clock fires once the client stops");
    let took = stopped.elapsed();
    assert!(took >= ms(290) && took < ms(1500), "fired after {took:?}");
    let end = tokio::time::timeout(ms(2000), b.ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_err(), "backend should see RST");
    drop(c);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn write_stall_clock_aborts_a_client_that_reads_nothing() {
    let b = backend(Backend::Flood).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.write_stall = ms(300);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"go").await.unwrap();
    // Read nothing: the kernel buffers fill, then halfguard's writes stall.
    let start = Instant::now();
    wait_for(ms(10_000), || {
        (p.stats().timed_out(Timeout::WriteStall) == 1).then_some(())
    })
    .await
    .expect("write_stall clock fires");
    // The clock, then the kernel send queues watched for a whole window in which nothing is
    // acknowledged, plus filling the buffers.
    let took = start.elapsed();
    let window = halfguard::config::SLOW_READER_WINDOW;
    assert!(took >= window, "fired after {took:?}, before the window");
    assert!(took < window + ms(2500), "fired after {took:?}");
    // What was buffered is readable, then the RST.
    let mut buf = vec![0u8; 1 << 16];
    let end = loop {
        match c.read(&mut buf).await {
            Ok(0) => break "fin",
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "rst",
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(end, "rst");
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn a_slow_reader_that_keeps_reading_is_not_a_stall() {
    let b = backend(Backend::Flood).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.write_stall = ms(300);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"go").await.unwrap();
    // Let the buffers fill, then read a little at a time for well past the clock.
    tokio::time::sleep(ms(200)).await;
    let mut buf = vec![0u8; 64 * 1024];
    let until = Instant::now() + ms(1500);
    while Instant::now() < until {
        c.read_exact(&mut buf).await.expect("still served");
        tokio::time::sleep(ms(50)).await;
    }
    assert_eq!(p.stats().timed_out(Timeout::WriteStall), 0);
}

/// A backend that answers `go` with `len` bytes, then FIN.
async fn sends_then_fin(len: usize) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut go = [0u8; 2];
                s.read_exact(&mut go).await?;
                s.write_all(&vec![b'x'; len]).await?;
                s.shutdown().await
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_slow_reader_taking_its_bytes_in_chunks_is_not_cut_and_gets_all_of_them() {
    // A phone on a slow link: a small receive buffer, 2 kB taken in one go now and then
    // (about once a second, gaps up to 1.7 s), so the window opens in steps and for most of
    // the time nothing is acknowledged. That is four times `min_rate`. The backend sends
    // more than the kernel buffers hold, so halfguard's writes stall and the write-stall
    // clock runs out again and again while the reader reads: only the kernel send-queue
    // check stands between it and an RST.
    const LEN: usize = 8 << 20;
    let b = sends_then_fin(LEN).await;
    let mut cfg = base_config(&[b]);
    cfg.listeners[0].timeouts.write_stall = ms(500);
    let p = Proxy::start(cfg).await;

    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut c = sock.connect(p.addr).await.unwrap();
    c.write_all(b"go").await.unwrap();
    let mut got = 0usize;
    let mut chunk = vec![0u8; 2048];
    // Let the buffers fill, then about 12 s of chunks.
    tokio::time::sleep(ms(300)).await;
    for gap in [300, 1700, 500, 1500].repeat(3) {
        match tokio::time::timeout(ms(3000), c.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => got += n,
            other => panic!("the slow reader was cut after {got} bytes: {other:?}"),
        }
        tokio::time::sleep(ms(gap)).await;
    }
    assert!(
        p.stats().timed_out(Timeout::WriteStall) == 0,
        "write_stall expired"
    );
    // Then it reads the rest at once: every byte, and a clean FIN.
    match read_end(&mut c, ms(30_000)).await {
        Seen::Fin(rest) => assert_eq!(got + rest.len(), LEN),
        other => panic!("after {got} bytes: {other:?}"),
    }
    assert_eq!(p.stats().timed_out(Timeout::WriteStall), 0);
    drop(c);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn max_lifetime_ends_even_a_busy_connection() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.max_lifetime = Some(ms(400));
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let start = Instant::now();
    let mut ended = None;
    for _ in 0..30 {
        if c.write_all(b"x").await.is_err() {
            ended = Some(start.elapsed());
            break;
        }
        let mut one = [0u8; 1];
        match c.read(&mut one).await {
            Ok(1) => tokio::time::sleep(ms(50)).await,
            _ => {
                ended = Some(start.elapsed());
                break;
            }
        }
    }
    let took = ended.expect("max_lifetime ended the connection");
    assert!(took >= ms(350) && took < ms(1500), "ended after {took:?}");
    assert_eq!(p.stats().timed_out(Timeout::MaxLifetime), 1);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn connect_clock_aborts_when_the_backend_does_not_answer() {
    // A listener whose accept queue is full drops SYNs: connects to it hang.
    let (_hung, hung_addr, _fillers) = full_listener().await;
    let mut cfg = base_config(&[hung_addr]);
    cfg.listeners[0].timeouts.connect = ms(300);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"hello?").await.unwrap();
    let took = expect_reset(&mut c, ms(3000)).await;
    assert!(
        took >= ms(250) && took < ms(1500),
        "connect clock fired after {took:?}"
    );
    assert_eq!(p.stats().timed_out(Timeout::Connect), 1);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn pressure_shortens_the_first_byte_clock_of_existing_connections() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.first_byte = Duration::from_secs(30);
    cfg.listeners[0].limits.max_half_open = 10;
    cfg.pressure.high_water = 0.5; // above 5 half-open
    // Stays on until none is left: otherwise the first late one to go could end pressure
    // before the other's shortened clock runs out, which is hysteresis doing its job.
    cfg.pressure.low_water = 0.05;
    cfg.pressure.first_byte = ms(300);
    let p = Proxy::start(cfg).await;

    let mut early = Vec::new();
    for _ in 0..4 {
        early.push(TcpStream::connect(p.addr).await.unwrap());
    }
    wait_for(ms(1000), || (p.snapshot().half_open == 4).then_some(()))
        .await
        .unwrap();
    tokio::time::sleep(ms(400)).await;
    assert!(!p.snapshot().pressure, "4 of 10 is below high water");
    assert_eq!(p.snapshot().half_open, 4, "the 30 s clock still holds them");

    let mut late = Vec::new();
    for _ in 0..2 {
        late.push(TcpStream::connect(p.addr).await.unwrap());
    }
    // 6 > 5: pressure. The four early ones are already past 300 ms: they go at once.
    let start = Instant::now();
    for c in early.iter_mut() {
        expect_reset(c, ms(2000)).await;
    }
    assert!(
        start.elapsed() < ms(1000),
        "early ones took {:?}",
        start.elapsed()
    );
    for c in late.iter_mut() {
        expect_reset(c, ms(2000)).await;
    }
    assert_eq!(p.stats().timed_out(Timeout::FirstByte), 6);
    p.assert_drained(ms(1000)).await;
    assert!(!p.snapshot().pressure, "pressure ends below low water");
}

#[tokio::test]
async fn the_half_closed_clock_starts_at_the_fin_not_before() {
    // The client uploads for longer than half_closed while the backend says nothing, then
    // sends FIN; the backend answers after reading it all. Nothing may be aborted: the
    // still-open direction was silent before the FIN, which the clock must not count.
    // The answer comes 1.5 s after the FIN: within half_closed (2 s), and later than the
    // 1 s a moving kernel send queue can buy, so only a clock started at the FIN lets it
    // through.
    let b = backend(Backend::CollectThenReplyAfter(1500)).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.half_closed = ms(2000);
    cfg.listeners[0].timeouts.idle = ms(5000);
    let p = Proxy::start(cfg).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    for _ in 0..25 {
        c.write_all(b"chunk").await.unwrap();
        tokio::time::sleep(ms(100)).await;
    }
    c.shutdown().await.unwrap();
    assert_eq!(
        read_end(&mut c, ms(4000)).await,
        Seen::Fin(b"got 125 bytes\n".to_vec())
    );
    assert_eq!(p.stats().timed_out(Timeout::HalfClosed), 0);
}
