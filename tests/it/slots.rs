//! Backend slots favour progress: with `servers[].max_conns` at a backend's worker count, a
//! client whose first message is whole waits in the queue, and gets the slot of a connection
//! that is not making progress on a request (dripping its next request, idle after the
//! answer), taken back and counted; a connection that awaits its answer keeps its slot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use halfguard::config::{self, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n";

/// One listener toward the pool `app` of one server with `max_conns`, a queue that waits
/// longer than the tests look, per-source caps off, and the admin endpoint on.
fn slots_config(server: SocketAddr, max_conns: u32) -> Config {
    let text = format!(
        r#"
[[listeners]]
name = "{L}"
bind = "127.0.0.1:0"
backend = "app"

[[backends]]
name = "app"
servers = [{{ addr = "{server}", max_conns = {max_conns} }}]
queue_timeout = "4s"
[backends.health]
enabled = false

[limits]
max_conns_per_source = 0
max_half_open_per_source = 0
conn_rate_per_source = 0

[timeouts]
connect = "8s"

[admin]
bind = "127.0.0.1:0"
"#
    );
    config::parse(&text, "test.toml", HashMap::new()).expect("valid test config")
}

async fn reclaimed(p: &Proxy) -> f64 {
    let admin = p.handle.admin_addr().expect("admin on");
    let (status, scrape) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let key = "halfguard_backend_slots_reclaimed_total{backend=\"app\"} ";
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(key)?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the scrape:\n{scrape}"))
}

/// Sends `REQUEST` and reads the worker pool's keep-alive answer, within `within`.
async fn request(s: &mut TcpStream, within: Duration) -> Result<(), String> {
    s.write_all(REQUEST).await.map_err(|e| e.to_string())?;
    let mut got = vec![0u8; HTTP_OK_KEEPALIVE.len()];
    match tokio::time::timeout(within, s.read_exact(&mut got)).await {
        Ok(Ok(_)) if got == HTTP_OK_KEEPALIVE => Ok(()),
        Ok(Ok(_)) => Err(format!("answered {:?}", String::from_utf8_lossy(&got))),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// A keep-alive client that completed a request and holds its connection.
async fn served_client(p: &Proxy) -> TcpStream {
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    request(&mut s, ms(2000))
        .await
        .expect("the first requests are served");
    s
}

/// Whether the peer ended `s` (a reset or a close), looking for `within`.
async fn ended(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dripped_second_request_gives_its_slot_to_a_waiting_request() {
    let workers = 2;
    let b = worker_pool(workers, Duration::from_secs(30)).await;
    let p = Proxy::start(slots_config(b.addr, workers as u32)).await;
    // Every worker is held by a keep-alive client that drips its second request, a byte
    // every 200 ms (within the backend's header timeout, and the request clock's 10 s).
    let mut drippers = Vec::new();
    for _ in 0..workers {
        let s = served_client(&p).await;
        let cut = Arc::new(AtomicBool::new(false));
        let seen = cut.clone();
        drippers.push((
            tokio::spawn(async move {
                let mut s = s;
                for &byte in REQUEST.iter().take(40) {
                    if s.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(ms(200)).await;
                }
                // Reset by halfguard (the write may still have gone into the buffer).
                seen.store(ended(&mut s, ms(100)).await, Ordering::Relaxed);
            }),
            cut,
        ));
    }
    // Dripping for longer than a progress check's window: they may yield.
    tokio::time::sleep(ms(1600)).await;

    let t0 = Instant::now();
    let mut legit = TcpStream::connect(p.addr).await.unwrap();
    let served = request(&mut legit, ms(1500)).await;
    let took = t0.elapsed();
    assert_eq!(served, Ok(()), "the legit request waited behind the drips");
    assert!(took < ms(1500), "served after {took:?}");
    assert_eq!(reclaimed(&p).await, 1.0, "one dripper's slot taken back");
    let mut cut = 0;
    for (task, c) in drippers {
        task.await.unwrap();
        cut += usize::from(c.load(Ordering::Relaxed));
    }
    assert_eq!(cut, 1, "exactly one dripper was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_keeps_its_slot_and_the_newcomer_waits_its_turn() {
    // The server answers 2 s after the request: a long poll.
    let b = backend(Backend::Http(2000)).await;
    let p = Proxy::start(slots_config(b.addr, 1)).await;
    let poll_req = b"GET /poll HTTP/1.1\r\nHost: app\r\n\r\n";
    let mut poll = TcpStream::connect(p.addr).await.unwrap();
    poll.write_all(poll_req).await.unwrap();
    // Past two progress checks of the long poll: idle, awaiting its answer.
    tokio::time::sleep(ms(1300)).await;

    // The newcomer queues (and looks for a slot to take back, again and again).
    let t0 = Instant::now();
    let mut newcomer = TcpStream::connect(p.addr).await.unwrap();
    newcomer.write_all(poll_req).await.unwrap();

    let mut answer = Vec::new();
    tokio::time::timeout(ms(3000), poll.read_to_end(&mut answer))
        .await
        .expect("the long poll ends")
        .expect("the long poll is answered, not reset");
    assert_eq!(answer, HTTP_OK, "the long poll gets its whole answer");
    drop(poll);
    // Its slot goes to the newcomer, answered 2 s after it reaches the server.
    let mut answer = Vec::new();
    tokio::time::timeout(ms(4000), newcomer.read_to_end(&mut answer))
        .await
        .expect("the newcomer is served")
        .expect("the newcomer is answered, not reset");
    assert_eq!(answer, HTTP_OK);
    let took = t0.elapsed();
    assert!(
        took >= ms(2400),
        "the newcomer took the long poll's slot: {took:?}"
    );
    assert_eq!(reclaimed(&p).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_give_their_slots_to_newcomers() {
    let workers = 2;
    let b = worker_pool(workers, Duration::from_secs(30)).await;
    let p = Proxy::start(slots_config(b.addr, workers as u32)).await;
    let mut idle = Vec::new();
    for _ in 0..workers {
        idle.push(served_client(&p).await);
    }
    // Idle past their first progress check.
    tokio::time::sleep(ms(600)).await;

    // Newcomers, one after the other: each takes the slot of the connection idle longest
    // (never the previous newcomer's, idle for a shorter time), and keeps it.
    let mut newcomers = Vec::new();
    for n in 1..=workers {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(request(&mut s, ms(1500)).await, Ok(()), "newcomer {n}");
        assert!(
            t0.elapsed() < ms(1500),
            "newcomer {n} served after {:?}",
            t0.elapsed()
        );
        newcomers.push(s);
    }
    assert_eq!(reclaimed(&p).await, workers as f64);
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(ended(s, ms(500)).await, "idle connection {i} still open");
    }
}
