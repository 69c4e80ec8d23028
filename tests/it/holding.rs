//! Holding the first message: on a client-first listener nothing reaches a backend before
//! the client's first message is whole, so a drip never holds one of a backend's few
//! workers, and a drip that never completes is cut without the backend ever seeing it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use halfguard::config::{Config, FirstMessage};
use halfguard::stats::{Reject, Timeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::support::*;

/// `sources` x `per_source` connections from 127.0.5.x that send a request line and then a
/// header a byte every 200 ms, reconnecting when cut, until `until`.
fn drip(
    to: SocketAddr,
    sources: u8,
    per_source: usize,
    until: Instant,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for a in 1..=sources {
        for _ in 0..per_source {
            set.spawn(async move {
                while Instant::now() < until {
                    let Ok(mut s) = connect_from(&format!("127.0.5.{a}"), to).await else {
                        tokio::time::sleep(ms(20)).await;
                        continue;
                    };
                    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Drip: ")
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    while Instant::now() < until && s.write_all(b"a").await.is_ok() {
                        tokio::time::sleep(ms(200)).await;
                    }
                }
            });
        }
    }
    set
}

/// `n` requests from 127.0.6.1, one connection each: how many were answered within a second.
async fn legit(to: SocketAddr, n: usize) -> usize {
    let mut served = 0;
    for _ in 0..n {
        let one = async {
            let mut c = connect_from("127.0.6.1", to).await.ok()?;
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .ok()?;
            let mut got = vec![0u8; HTTP_OK_KEEPALIVE.len()];
            c.read_exact(&mut got).await.ok()?;
            (got == HTTP_OK_KEEPALIVE).then_some(())
        };
        if let Ok(Some(())) = tokio::time::timeout(ms(1000), one).await {
            served += 1;
        }
        tokio::time::sleep(ms(50)).await;
    }
    served
}

fn config(b: SocketAddr, first_message: FirstMessage) -> Config {
    let mut cfg = base_config(&[b]);
    cfg.listeners[0].first_message = first_message;
    cfg
}

/// 40 drippers from 10 sources against a backend with 4 workers: held, they never take one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pool_backend_survives_a_many_source_drip() {
    let pool = worker_pool(4, Duration::from_secs(20)).await;
    let p = Proxy::start(config(pool.addr, FirstMessage::Auto)).await;
    let until = Instant::now() + Duration::from_secs(30);
    let mut drippers = drip(p.addr, 10, 4, until);
    tokio::time::sleep(ms(300)).await;
    let served = legit(p.addr, 20).await;
    assert_eq!(served, 20, "legit requests answered");
    // The backend took the legit client's connections and nothing else.
    assert_eq!(pool.served_conns.load(Ordering::Relaxed), 20);
    assert!(p.stats().holding.load(Ordering::Relaxed) >= 30);
    drippers.abort_all();
    while drippers.join_next().await.is_some() {}
}

/// The same drip with holding off (`first_message = "any"`, the behaviour before): the
/// drippers take the backend's workers, and the legit client is not served. Shows the test
/// above measures what it claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_holding_the_same_drip_takes_the_workers() {
    let pool = worker_pool(4, Duration::from_secs(20)).await;
    let p = Proxy::start(config(pool.addr, FirstMessage::Any)).await;
    let until = Instant::now() + Duration::from_secs(30);
    let mut drippers = drip(p.addr, 10, 4, until);
    tokio::time::sleep(ms(300)).await;
    let served = legit(p.addr, 4).await;
    assert!(served <= 1, "{served} of 4 served with holding off");
    drippers.abort_all();
    while drippers.join_next().await.is_some() {}
}

/// A drip that never completes its head is cut by the request clock, counted as
/// `first_message`, and the backend never saw a connection.
#[tokio::test]
async fn a_first_message_that_never_completes_times_out_before_any_backend() {
    let pool = worker_pool(4, Duration::from_secs(20)).await;
    let mut cfg = config(pool.addr, FirstMessage::Auto);
    cfg.listeners[0].timeouts.request = Some(ms(600));
    let p = Proxy::start(cfg).await;
    let mut c = connect_from("127.0.5.1", p.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let t0 = Instant::now();
    let cut = async {
        loop {
            if c.write_all(b"a").await.is_err() {
                break;
            }
            let mut b = [0u8; 1];
            if let Ok(r) = tokio::time::timeout(ms(100), c.read(&mut b)).await {
                assert!(r.is_err() || r.is_ok_and(|n| n == 0), "no answer expected");
                break;
            }
        }
    };
    tokio::time::timeout(ms(3000), cut).await.expect("cut");
    let after = t0.elapsed();
    // 600 ms of allowance plus a second per 500 bytes of the ~40 sent.
    assert!(after >= ms(500) && after < ms(1500), "cut after {after:?}");
    assert_eq!(p.stats().timed_out(Timeout::FirstMessage), 1);
    assert_eq!(p.stats().timed_out(Timeout::Request), 0);
    assert_eq!(pool.served_conns.load(Ordering::Relaxed), 0);
    p.assert_drained(ms(2000)).await;
}

/// A head that comes in pieces is forwarded once whole, its body after it; a protocol that
/// is not framed (a one-byte message waiting for its echo) connects at once.
#[tokio::test]
async fn split_heads_bodies_and_unframed_messages_get_through() {
    let b = backend(Backend::Echo).await;
    let p = Proxy::start(config(b.addr, FirstMessage::Auto)).await;
    // Unframed: answered at once.
    let mut c = connect_from("127.0.0.1", p.addr).await.unwrap();
    let t0 = Instant::now();
    assert_eq!(roundtrip(&mut c, b"x").await, b"x");
    assert!(t0.elapsed() < ms(500), "{:?}", t0.elapsed());
    drop(c);
    // A head in three pieces, then a 200 kB body at about 400 kB/s.
    let c = connect_from("127.0.0.1", p.addr).await.unwrap();
    let body = vec![b'b'; 200 * 1024];
    let head = format!(
        "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let expected = head.len() + body.len();
    let reader = {
        let (mut r, mut w) = c.into_split();
        let head = head.clone();
        let writer = tokio::spawn(async move {
            for piece in head.as_bytes().chunks(20) {
                w.write_all(piece).await.unwrap();
                tokio::time::sleep(ms(50)).await;
            }
            for chunk in body.chunks(8 * 1024) {
                w.write_all(chunk).await.unwrap();
                tokio::time::sleep(ms(20)).await;
            }
            w
        });
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < expected {
            let n = tokio::time::timeout(ms(3000), r.read(&mut buf))
                .await
                .expect("echo in time")
                .unwrap();
            assert!(n > 0, "closed after {got} bytes");
            got += n;
        }
        writer.await.unwrap();
        got
    };
    assert_eq!(reader, expected);
    assert_eq!(p.stats().timed_out(Timeout::FirstMessage), 0);
}

/// Past the grace a held connection counts against its source's half-open cap, as a silent
/// one does: a source cannot hold more drips than that.
#[tokio::test]
async fn held_drips_count_against_the_source_half_open_cap() {
    let b = backend(Backend::Echo).await;
    let mut cfg = config(b.addr, FirstMessage::Auto);
    cfg.listeners[0].limits.max_half_open_per_source = 2;
    let p = Proxy::start(cfg).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from("127.0.5.7", p.addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        held.push(c);
    }
    past_grace().await;
    tokio::time::sleep(ms(200)).await;
    assert_eq!(p.stats().rejected(Reject::SourceHalfOpen), 1);
    assert_eq!(p.snapshot().half_open, 2);
    // `/sources` says what they wait for: their first message.
    let load = p
        .handle
        .guard(L)
        .unwrap()
        .top_sources(1, halfguard::guard::SourceOrder::HalfOpen);
    assert_eq!((load[0].half_open, load[0].holding), (2, 2));
    drop(held);
    p.assert_drained(ms(2000)).await;
    let after = p
        .handle
        .guard(L)
        .unwrap()
        .top_sources(1, halfguard::guard::SourceOrder::Conns);
    assert!(after.is_empty(), "{after:?}");
}

/// A head held over two segments, then a body far larger than the socket buffers at full
/// speed, with and without splice: the look that held the head left the client's readiness
/// cleared with the receive queue full, so the pump must read straight from the kernel
/// until it has drained it (a full queue brings no new event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_head_then_a_bulk_body_arrives_whole() {
    let b = backend(Backend::Echo).await;
    for splice in [true, false] {
        let mut cfg = config(b.addr, FirstMessage::Auto);
        cfg.tcp.splice = splice;
        let lim = &mut cfg.listeners[0].limits;
        (lim.max_conns, lim.max_half_open, lim.max_half_closed) = (64, 64, 64);
        let p = Proxy::start(cfg).await;
        let c = connect_from("127.0.0.1", p.addr).await.unwrap();
        let (mut r, mut w) = c.into_split();
        let n = 8usize << 20;
        let head = format!("PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n");
        let total = head.len() + n;
        let writer = tokio::spawn(async move {
            let (a, z) = head.as_bytes().split_at(10);
            w.write_all(a).await.unwrap();
            tokio::time::sleep(ms(100)).await;
            w.write_all(z).await.unwrap();
            w.write_all(&vec![7u8; n]).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = 0;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let got = tokio::time::timeout(ms(5000), r.read(&mut buf))
                .await
                .expect("bytes keep coming")
                .unwrap();
            if got == 0 {
                break;
            }
            back += got;
        }
        writer.await.unwrap();
        assert_eq!(back, total, "splice {splice}");
        p.assert_drained(ms(2000)).await;
    }
}

/// On an HTTP/1 keep-alive connection every request is clocked, not only the first: a
/// client that completes one exchange and then drips its second request is cut by the
/// request clock like a first one, and its worker is given back.
#[tokio::test]
async fn a_later_request_that_drips_is_cut_like_a_first_one() {
    let pool = worker_pool(2, Duration::from_secs(20)).await;
    let mut cfg = config(pool.addr, FirstMessage::Auto);
    cfg.listeners[0].timeouts.request = Some(ms(800));
    let p = Proxy::start(cfg).await;
    let mut c = connect_from("127.0.5.9", p.addr).await.unwrap();
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = vec![0u8; HTTP_OK_KEEPALIVE.len()];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(got, HTTP_OK_KEEPALIVE);
    // The second request: a line, then a byte every 200 ms, never the blank line.
    c.write_all(b"GET /2 HTTP/1.1\r\n").await.unwrap();
    let t0 = Instant::now();
    let mut cut = false;
    for _ in 0..30 {
        tokio::time::sleep(ms(200)).await;
        if c.write_all(b"X").await.is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut, "the dripping second request was not cut");
    let after = t0.elapsed();
    assert!(after >= ms(700) && after < ms(4000), "cut after {after:?}");
    assert_eq!(p.stats().timed_out(Timeout::Request), 1);
}

/// A client that sends part of a request head and then FIN can never complete it: the
/// connection ends there, and no backend worker is taken to answer a torn request (a drip
/// flood whose clients exit would otherwise send every one's half to the backend).
#[tokio::test]
async fn a_torn_first_message_never_reaches_the_backend() {
    let pool = worker_pool(4, Duration::from_secs(20)).await;
    let p = Proxy::start(config(pool.addr, FirstMessage::Auto)).await;
    let mut c = connect_from("127.0.5.3", p.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Drip: ")
        .await
        .unwrap();
    tokio::time::sleep(ms(100)).await;
    c.shutdown().await.unwrap();
    assert!(matches!(read_end(&mut c, ms(2000)).await, Seen::Fin(got) if got.is_empty()));
    assert_eq!(pool.served_conns.load(Ordering::Relaxed), 0);
    p.assert_drained(ms(2000)).await;
}
