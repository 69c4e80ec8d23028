//! A clean close waits until what halfguard queued toward the client is delivered: no
//! orphan holding bytes after both FINs, and no byte lost for a client that still reads.

use std::net::SocketAddr;

use halfguard::stats::Timeout;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::support::*;

/// A backend that reads the request to its end, answers `n` bytes and closes.
async fn answers_after_fin(n: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
                let _ = s.write_all(&vec![b'a'; n]).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A client with a small receive buffer: it cannot take much without reading.
async fn small_window_client(to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(to).await.unwrap()
}

/// The proxy's sockets on `port` in a state that follows its close, with bytes queued.
fn orphans_with_bytes(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-tanH"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss runs (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            matches!(f.first(), Some(&("LAST-ACK" | "FIN-WAIT-1" | "CLOSING")))
                && f.get(2)
                    .and_then(|q| q.parse::<u64>().ok())
                    .is_some_and(|q| q > 0)
        })
        .count()
}

#[tokio::test]
async fn a_client_that_half_closes_and_never_reads_leaves_no_orphan() {
    if let Some(why) = missing(&[Need::Tool("ss")], "lists the proxy's orphans") {
        return skip(
            "delivery::a_client_that_half_closes_and_never_reads_leaves_no_orphan",
            &why,
        );
    }
    // Small enough to fit in what the kernel queues toward the client (`notsent_lowat`),
    // so the pump itself never waits: the answer is all written, the FINs cross, and only
    // the queue is left.
    let b = answers_after_fin(100 * 1024).await;
    let mut cfg = base_config(&[b]);
    cfg.listeners[0].timeouts.write_stall = ms(600);
    let p = Proxy::start(cfg).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = small_window_client(p.addr).await;
        c.write_all(b"GET /big HTTP/1.0\r\n\r\n").await.unwrap();
        c.shutdown().await.unwrap();
        held.push(c);
    }
    // Past the write-stall clock (and a look or two): aborted, not handed to the kernel.
    tokio::time::sleep(ms(2500)).await;
    assert_eq!(
        orphans_with_bytes(p.addr.port()),
        0,
        "orphans with bytes queued"
    );
    assert_eq!(p.stats().timed_out(Timeout::WriteStall), 4);
    assert_eq!(p.snapshot().conns, 0);
    for c in held.iter_mut() {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        let end = loop {
            match c.read(&mut buf).await {
                Ok(0) => break "fin",
                Ok(n) => got += n,
                Err(_) => break "reset",
            }
        };
        assert_eq!(end, "reset", "after {got} bytes");
    }
}

/// The same close to a client that reads slowly: halfguard waits, still counting the
/// connection while the kernel delivers, and every byte arrives.
#[tokio::test]
async fn a_slow_reader_after_its_fin_gets_every_byte() {
    // Fits what the kernel queues toward the client, so the FINs cross with it queued.
    let n = 100 * 1024;
    let b = answers_after_fin(n).await;
    let mut cfg = base_config(&[b]);
    cfg.listeners[0].timeouts.write_stall = ms(600);
    let p = Proxy::start(cfg).await;
    let mut c = small_window_client(p.addr).await;
    c.write_all(b"GET /big HTTP/1.0\r\n\r\n").await.unwrap();
    c.shutdown().await.unwrap();
    tokio::time::sleep(ms(300)).await;
    // Both FINs are in, the answer is still queued: the connection is held, counted.
    assert_eq!(p.snapshot().conns, 1, "let go with its answer still queued");
    let mut got = 0;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match tokio::time::timeout(ms(3000), c.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(k)) => got += k,
            other => panic!("after {got} bytes: {other:?}"),
        }
        // About 1 MB/s, in bursts.
        tokio::time::sleep(ms(30)).await;
    }
    assert_eq!(got, n);
    assert_eq!(p.stats().timed_out(Timeout::WriteStall), 0);
    p.assert_drained(ms(2000)).await;
}

/// Bytes in the proxy's send queues on `port` toward 127.0.0.1 clients (ss's Send-Q).
fn send_queued(port: u16) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-tnH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss runs (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// A client that stops reading pins what the kernel queues for it: with the default
/// `tcp.notsent_lowat` that is a little over 128 kB, not the megabytes a send buffer
/// autotunes to (shown in the same test with the option off), copied or spliced.
#[tokio::test]
async fn what_is_queued_toward_a_client_that_stops_reading_stays_small() {
    if let Some(why) = missing(&[Need::Tool("ss")], "reads the proxy's send queues") {
        return skip(
            "delivery::what_is_queued_toward_a_client_that_stops_reading_stays_small",
            &why,
        );
    }
    let b = backend(Backend::Flood).await;
    for splice in [false, true] {
        let mut queued = Vec::new();
        for lowat in [halfguard::config::DEFAULT_NOTSENT_LOWAT, 0] {
            let mut cfg = base_config(&[b.addr]);
            cfg.tcp.notsent_lowat = lowat;
            cfg.tcp.splice = splice;
            let p = Proxy::start(cfg).await;
            let mut c = TcpStream::connect(p.addr).await.unwrap();
            c.write_all(b"GET /flood HTTP/1.0\r\n\r\n").await.unwrap();
            // Read a little, so the exchange starts, then never again.
            let mut first = [0u8; 1024];
            c.read_exact(&mut first).await.unwrap();
            tokio::time::sleep(ms(1000)).await;
            queued.push(send_queued(p.addr.port()));
            drop(c);
        }
        eprintln!(
            "queued toward a client that stopped reading, splice {splice}: {queued:?} (lowat on, off)"
        );
        assert!(
            queued[0] < 512 * 1024,
            "with notsent_lowat: {} bytes",
            queued[0]
        );
        assert!(queued[1] > queued[0] * 2, "without: {} bytes", queued[1]);
    }
}

/// Bytes are a cap like connections: a source whose clients stop reading is cut (or refused)
/// once what is queued toward it passes `max_queued_per_source` (`source_queued`), while
/// another source's slow reader under its own cap is not.
#[tokio::test]
async fn a_source_over_its_byte_cap_is_cut_and_another_is_not() {
    let b = backend(Backend::Flood).await;
    let mut cfg = byte_capped(b.addr, 12 << 20);
    cfg.admin.bind = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let p = Proxy::start(cfg).await;
    let stop_reading = |from: &'static str| {
        let to = p.addr;
        async move {
            let mut c = connect_from(from, to).await.ok()?;
            c.write_all(b"GET /flood HTTP/1.0\r\n\r\n").await.ok()?;
            let mut first = [0u8; 1024];
            c.read_exact(&mut first).await.ok()?;
            Some(c)
        }
    };
    let mut heavy = Vec::new();
    for _ in 0..8 {
        heavy.push(stop_reading("127.0.0.2").await);
    }
    let admitted = heavy.iter().flatten().count();
    let light = stop_reading("127.0.0.3")
        .await
        .expect("the light source's client");
    // Each is weighed soon after its window closes (its send queue, the flood waiting unread
    // in halfguard's socket, the backend's own queue: megabytes each); the heavy source's
    // connections are cut, and its newcomers refused, until it is under its cap.
    tokio::time::sleep(ms(1500)).await;
    let stats = p.stats();
    let cut = stats.rejected(halfguard::stats::Reject::SourceQueued);
    assert!(cut >= 1, "cut {cut}");
    let load = p
        .handle
        .guard(L)
        .unwrap()
        .top_sources(2, halfguard::guard::SourceOrder::Conns);
    let of = |ip: &str| load.iter().find(|l| l.source.to_string() == ip).copied();
    let heavy_load = of("127.0.0.2").expect("the heavy source still holds some");
    assert!(heavy_load.queued <= 12 << 20, "{heavy_load:?}");
    // Established connections were cut, not only newcomers refused.
    assert!(
        heavy_load.conns < admitted,
        "{admitted} admitted: {heavy_load:?}"
    );
    let light_load = of("127.0.0.3").expect("the light source is kept");
    assert_eq!(light_load.conns, 1);
    assert!(light_load.queued > 0, "{light_load:?}");
    assert!(p.snapshot().queued > 0);
    // The scrape shows the bytes under their own name, and only there.
    let admin = p.handle.admin_addr().expect("admin is on");
    let (_, metrics) = http(admin, "GET", "/metrics").await;
    let value = |series: &str| {
        metrics.lines().find_map(|l| {
            let v = l.strip_prefix(series)?.strip_prefix(' ')?;
            v.trim().parse::<f64>().ok()
        })
    };
    let queued = value(&format!("halfguard_queued_bytes{{listener=\"{L}\"}}"));
    assert!(queued.is_some_and(|q| q > 0.0), "{metrics}");
    let stalled_sources = value(&format!(
        "halfguard_sources_in_state{{listener=\"{L}\",state=\"stalled\"}}"
    ));
    assert!(stalled_sources.is_some_and(|n| n <= 2.0), "{metrics}");
    drop((heavy, light));
}

/// A flood of clients that send a request and FIN and never read is held to its source's
/// byte cap within its first looks, well before the one-second progress check, and what a
/// connection weighs includes the backend's own send queue on this host (most of it on
/// loopback: a backend's send buffer starts near 2.6 MB there).
#[tokio::test]
async fn non_readers_are_held_to_their_byte_cap_within_their_first_looks() {
    let b = backend(Backend::Flood).await;
    let p = Proxy::start(byte_capped(b.addr, 8 << 20)).await;
    let held = half_close_and_never_read(p.addr, 24, ms(10)).await;
    // Past the second look of the last ones, before any progress check.
    tokio::time::sleep(ms(300)).await;
    let conns = p.snapshot().conns;
    let queued = p.snapshot().queued;
    let cut = p.stats().rejected(halfguard::stats::Reject::SourceQueued);
    eprintln!("held {conns} of 24, {queued} bytes counted, {cut} refused or cut");
    assert!(cut >= 10, "refused or cut {cut}");
    // Each pins megabytes with the backend's queue counted: a handful fit under 8 MiB.
    assert!(conns <= 5, "{conns} connections held");
    assert!(queued <= (8 << 20) + (4 << 20), "{queued} bytes");
    drop(held);
}

/// A burst of clients that send a request and FIN and never read, all connected before the
/// first of them is weighed (so no newcomer is charged): each takes less than a second's
/// share of what it pins, and its early looks cut the source back to its byte cap, well
/// before a one-second block.
#[tokio::test]
async fn a_burst_of_non_readers_is_cut_back_to_its_byte_cap_before_a_one_second_block() {
    let b = backend(Backend::Flood).await;
    let p = Proxy::start(byte_capped(b.addr, 8 << 20)).await;
    // Back to back, a few milliseconds for all on loopback.
    let held = half_close_and_never_read(p.addr, 12, ms(0)).await;
    let admitted = held.len();
    // Past the early looks (2 and 100 ms after each window closed), before any one-second
    // mark.
    tokio::time::sleep(ms(400)).await;
    let conns = p.snapshot().conns;
    let queued = p.snapshot().queued;
    let cut = p.stats().rejected(halfguard::stats::Reject::SourceQueued);
    eprintln!("{admitted} admitted, {conns} held, {queued} bytes counted, {cut} cut");
    assert!(admitted >= 8, "{admitted} admitted");
    assert!(conns < admitted, "none cut: {conns} of {admitted} held");
    assert!(queued <= (8 << 20) + (4 << 20), "{queued} bytes");
    drop(held);
}

/// A listener whose sources are held to `per_source` bytes queued (no listener-wide byte
/// cap), and whose write-stall clock is far away: only the byte cap ends what does not read.
fn byte_capped(backend: SocketAddr, per_source: u64) -> halfguard::config::Config {
    let mut cfg = base_config(&[backend]);
    cfg.listeners[0].limits.max_queued_per_source = per_source;
    cfg.listeners[0].limits.max_queued = 0;
    cfg.listeners[0].timeouts.write_stall = ms(60_000);
    cfg
}

/// `n` clients of 127.0.0.2, `gap` apart, each sending a request and FIN and never reading;
/// those the proxy let connect.
async fn half_close_and_never_read(
    to: SocketAddr,
    n: usize,
    gap: std::time::Duration,
) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let Ok(mut c) = connect_from("127.0.0.2", to).await else {
            continue;
        };
        let _ = c.write_all(b"GET /flood HTTP/1.0\r\n\r\n").await;
        let _ = c.shutdown().await;
        held.push(c);
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    held
}
