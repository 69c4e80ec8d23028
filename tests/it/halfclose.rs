//! Half-close forwarded exactly both ways, server-first listeners, RST propagation, and
//! backend failover.

use halfguard::config::Protocol;
use halfguard::stats::Timeout;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn client_fin_is_forwarded_and_the_reply_after_it_arrives() {
    let mut b = backend(Backend::CollectThenReply).await;
    let p = Proxy::start(base_config(&[b.addr])).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let body = vec![7u8; 300 * 1024];
    c.write_all(&body).await.unwrap();
    c.shutdown().await.unwrap();
    // The backend saw every byte then our FIN, and its reply came after the FIN.
    assert_eq!(
        read_end(&mut c, ms(5000)).await,
        Seen::Fin(format!("got {} bytes\n", body.len()).into_bytes())
    );
    let end = b.ends.recv().await.unwrap().unwrap();
    assert_eq!(end, body.len() as u64);
    p.assert_drained(ms(1000)).await;
    assert_eq!(
        p.stats()
            .closed_clean
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn server_fin_is_forwarded_and_the_client_keeps_sending() {
    let mut b = backend(Backend::FinFirst).await;
    let p = Proxy::start(base_config(&[b.addr])).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"start").await.unwrap();
    assert_eq!(
        read_end(&mut c, ms(2000)).await,
        Seen::Fin(b"bye\n".to_vec())
    );
    wait_for(ms(1000), || (p.snapshot().half_closed == 1).then_some(()))
        .await
        .unwrap();
    let more = vec![1u8; 200 * 1024];
    c.write_all(&more).await.unwrap();
    c.shutdown().await.unwrap();
    let got = b.ends.recv().await.unwrap().unwrap();
    assert_eq!(got, 5 + more.len() as u64);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn server_first_backend_greets_a_silent_client() {
    let b = backend(Backend::Greeter).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].protocol = Protocol::ServerFirst;
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let mut hello = [0u8; 6];
    c.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"HELLO\n");
    assert_eq!(
        p.snapshot().half_open,
        0,
        "a byte moved: the connection is open"
    );
    assert_eq!(roundtrip(&mut c, b"EHLO").await, b"EHLO");
}

#[tokio::test]
async fn server_first_connection_stays_half_open_until_a_byte_moves() {
    // A backend that never greets, and a client that never speaks.
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].protocol = Protocol::ServerFirst;
    cfg.listeners[0].timeouts.first_byte = ms(300);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    wait_for(ms(1000), || (p.snapshot().half_open == 1).then_some(()))
        .await
        .unwrap();
    let took = expect_reset(&mut c, ms(3000)).await;
    assert!(
        took >= ms(200) && took < ms(1500),
        "first_byte after {took:?}"
    );
    assert_eq!(p.stats().timed_out(Timeout::FirstByte), 1);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn a_client_reset_is_passed_to_the_backend_as_reset() {
    let mut b = backend(Backend::Sink).await;
    let p = Proxy::start(base_config(&[b.addr])).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"some bytes").await.unwrap();
    wait_for(ms(1000), || {
        (p.snapshot().conns == 1 && p.snapshot().half_open == 0).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(ms(50)).await;
    rst(c);
    let end = tokio::time::timeout(ms(2000), b.ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn a_backend_reset_is_passed_to_the_client_as_reset() {
    // A backend that resets every connection after reading a little.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut b = [0u8; 4];
            let _ = s.read(&mut b).await;
            rst(s);
        }
    });
    let p = Proxy::start(base_config(&[addr])).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"boom").await.unwrap();
    expect_reset(&mut c, ms(2000)).await;
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn a_dead_backend_is_skipped_and_no_backend_means_rst() {
    let b = backend(Backend::Echo).await;
    // A port that refuses: bind, read the port, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let p = Proxy::start(base_config(&[dead, b.addr])).await;
    for _ in 0..4 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"through").await, b"through");
    }
    drop(p);

    let p = Proxy::start(base_config(&[dead])).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"anyone?").await.unwrap();
    expect_reset(&mut c, ms(2000)).await;
    assert_eq!(
        p.stats()
            .backend_unavailable
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn a_client_that_closes_without_speaking_gets_a_clean_fin() {
    let b = backend(Backend::Echo).await;
    let p = Proxy::start(base_config(&[b.addr])).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(read_end(&mut c, ms(2000)).await, Seen::Fin(vec![]));
    p.assert_drained(ms(1000)).await;
}

#[tokio::test]
async fn shutdown_stops_accepting_drains_then_aborts_the_rest() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].timeouts.drain = ms(400);
    let p = Proxy::start(cfg).await;
    let addr = p.addr;
    let mut open = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut open, b"before").await, b"before");

    let handle = p.handle.clone();
    let stopping = tokio::spawn(p.shutdown());
    tokio::time::sleep(ms(100)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    // Still served during the drain...
    assert_eq!(roundtrip(&mut open, b"during").await, b"during");
    // ...and aborted with RST when it ends.
    let took = expect_reset(&mut open, ms(3000)).await;
    assert!(took < ms(1000), "aborted after {took:?}");
    tokio::time::timeout(ms(2000), stopping)
        .await
        .unwrap()
        .unwrap();
    let s = handle.snapshot(L).unwrap();
    assert_eq!(
        (s.conns, s.half_open, s.half_closed, s.sources),
        (0, 0, 0, 0)
    );
    assert_eq!(
        handle
            .stats(L)
            .unwrap()
            .aborted_on_shutdown
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// Sends `n` pseudo-random bytes through an echo backend and checks every byte came back,
/// while reading concurrently (a bulk transfer both ways).
async fn bulk_echo(p: &Proxy, n: usize) {
    let c = TcpStream::connect(p.addr).await.unwrap();
    let (mut r, mut w) = c.into_split();
    let data: Vec<u8> = (0..n as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    let expect = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(n);
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), n);
    assert!(back == expect, "bytes differ after the round trip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfers_arrive_intact_with_and_without_splice() {
    let b = backend(Backend::Echo).await;
    for splice in [true, false] {
        let mut cfg = base_config(&[b.addr]);
        cfg.tcp.splice = splice;
        // Pipes are what the open-files limit leaves after 2 x max_conns: keep that small,
        // so the test holds wherever the hard limit is a few thousand.
        let lim = &mut cfg.listeners[0].limits;
        (lim.max_conns, lim.max_half_open, lim.max_half_closed) = (64, 64, 64);
        let p = Proxy::start(cfg).await;
        bulk_echo(&p, 8 << 20).await;
        let s = p.stats();
        assert_eq!(
            s.bytes_upstream.load(std::sync::atomic::Ordering::Relaxed),
            8 << 20
        );
        assert_eq!(
            s.bytes_downstream
                .load(std::sync::atomic::Ordering::Relaxed),
            8 << 20
        );
        let spliced = s.spliced.load(std::sync::atomic::Ordering::Relaxed);
        if splice {
            assert_eq!(spliced, 2, "both bulk directions moved to splice");
        } else {
            assert_eq!(spliced, 0);
        }
        p.assert_drained(ms(2000)).await;
    }
}
