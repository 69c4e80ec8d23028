//! Pools: health checks that take a dead server out and bring it back, least-conn, the
//! bounded queue, `on_down = "abort"`, and PROXY protocol in and out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use halfguard::config::{self, Config};
use halfguard::proxy_protocol;
use halfguard::stats::Reject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::support::*;

fn pool_config(listener_extra: &str, pool: &str) -> Config {
    let text = format!(
        r#"
[[listeners]]
name = "{L}"
bind = "127.0.0.1:0"
backend = "app"
{listener_extra}

[[backends]]
{pool}

[limits]
max_conns_per_source = 0
max_half_open_per_source = 0
conn_rate_per_source = 0

[admin]
bind = "off"
"#
    );
    config::parse(&text, "test.toml", HashMap::new()).expect("valid test config")
}

fn servers(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect();
    format!("servers = [{}]", list.join(", "))
}

fn up(p: &Proxy, server: SocketAddr) -> bool {
    p.handle
        .backend_servers("app")
        .into_iter()
        .find(|(label, _, _)| label == &server.to_string())
        .map(|(_, up, _)| up)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_is_taken_out_by_checks_and_returns_after_rise() {
    let a = counted_echo("127.0.0.1:0".parse().unwrap()).await;
    let b = counted_echo("127.0.0.1:0".parse().unwrap()).await;
    let a_addr = a.addr;
    let cfg = pool_config(
        "",
        &format!(
            "name = \"app\"\n{}\n[backends.health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 3\n",
            servers(&[a.addr, b.addr])
        ),
    );
    let p = Proxy::start(cfg).await;

    // Steady load in the background: one client connection every 10 ms for 3 s.
    let addr = p.addr;
    let load = tokio::spawn(async move {
        let mut ok = 0u32;
        let mut failed = Vec::new();
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            let started = Instant::now();
            let r = async {
                let mut c = TcpStream::connect(addr).await?;
                c.write_all(b"ping").await?;
                let mut back = [0u8; 4];
                c.read_exact(&mut back).await?;
                std::io::Result::Ok(())
            };
            match tokio::time::timeout(ms(1000), r).await {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => failed.push((started, Instant::now(), e.to_string())),
                Err(_) => failed.push((started, Instant::now(), "timed out".to_string())),
            }
            tokio::time::sleep(ms(10)).await;
        }
        (ok, failed)
    });

    tokio::time::sleep(ms(500)).await;
    assert!(up(&p, a_addr));
    let killed = Instant::now();
    drop(a);
    wait_for(ms(2000), || (!up(&p, a_addr)).then_some(()))
        .await
        .expect("the killed server is marked down");
    let took = killed.elapsed();
    // fall x interval = 300 ms, plus one interval of phase and the check timeout.
    assert!(took < ms(700), "marked down after {took:?}");

    tokio::time::sleep(ms(500)).await;
    let back = counted_echo(a_addr).await;
    let restarted = Instant::now();
    wait_for(ms(2000), || up(&p, a_addr).then_some(()))
        .await
        .expect("the server returns");
    assert!(
        restarted.elapsed() < ms(600),
        "back after {:?}",
        restarted.elapsed()
    );

    // Retries make every connection that starts after the kill succeed. The one a client
    // had in flight at the kill instant may sit in the dying server's accept queue, and the
    // kernel resets those when the listener closes: that loss is the server's, for any
    // proxy, and it is the only one allowed.
    let (ok, failed) = load.await.unwrap();
    let outside: Vec<String> = failed
        .iter()
        .filter(|(started, ended, _)| !(*started <= killed && killed <= *ended))
        .map(|(started, _, why)| {
            format!(
                "{why}, started {:?} after the kill",
                started.saturating_duration_since(killed)
            )
        })
        .collect();
    assert!(
        outside.is_empty() && failed.len() <= 1,
        "clients failed while a server died ({ok} ok, {} failed): {outside:?}",
        failed.len()
    );
    assert!(ok > 50, "load ran ({ok})");
    assert!(
        back.served.load(Ordering::Relaxed) > 0,
        "traffic returned to the server"
    );
}

#[tokio::test]
async fn least_conn_sends_new_connections_to_the_less_loaded_server() {
    // Server "hold" keeps every connection; server "quick" closes each at once. Round robin
    // would give "hold" every other connection; least-conn gives it one, then sends the rest
    // to "quick", whose connections end as they come.
    let hold = backend(Backend::Sink).await;
    let quick = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let quick_addr = quick.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = quick.accept().await {
            drop(s);
        }
    });
    let cfg = pool_config(
        "",
        &format!(
            "name = \"app\"\nbalance = \"least-conn\"\n{}\n[backends.health]\nenabled = false\n",
            servers(&[hold.addr, quick_addr])
        ),
    );
    let p = Proxy::start(cfg).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        match read_end(&mut c, ms(150)).await {
            // "quick" closed it: the client closes too, and the lease comes back.
            Seen::Fin(_) | Seen::Reset => drop(c),
            Seen::Open => held.push(c),
        }
    }
    let active = |label: SocketAddr| {
        p.handle
            .backend_servers("app")
            .into_iter()
            .find(|s| s.0 == label.to_string())
            .map_or(0, |s| s.2)
    };
    assert_eq!(
        held.len(),
        1,
        "only the first connection (a tie) went to hold"
    );
    assert_eq!(active(hold.addr), 1);
}

#[tokio::test]
async fn a_full_server_queues_briefly_then_refuses() {
    // The server answers once the client has said all (its FIN): until then each client
    // awaits its answer, and keeps its slot.
    let b = backend(Backend::CollectThenReply).await;
    let cfg = pool_config(
        "",
        &format!(
            "name = \"app\"\nservers = [{{ addr = \"{}\", max_conns = 1 }}]\nqueue_size = 1\nqueue_timeout = \"300ms\"\n",
            b.addr
        ),
    );
    let p = Proxy::start(cfg).await;
    let mut first = TcpStream::connect(p.addr).await.unwrap();
    first.write_all(b"1").await.unwrap();
    tokio::time::sleep(ms(50)).await;
    // The second waits in the queue and gets the slot when the first leaves.
    let mut second = TcpStream::connect(p.addr).await.unwrap();
    second.write_all(b"22").await.unwrap();
    tokio::time::sleep(ms(50)).await;
    // The third finds the queue full: refused at once.
    let mut third = TcpStream::connect(p.addr).await.unwrap();
    third.write_all(b"3").await.unwrap();
    expect_reset(&mut third, ms(1000)).await;
    assert_eq!(p.stats().rejected(Reject::QueueFull), 1);
    first.shutdown().await.unwrap();
    assert_eq!(
        read_end(&mut first, ms(2000)).await,
        Seen::Fin(b"got 1 bytes\n".to_vec())
    );
    drop(first);
    tokio::time::sleep(ms(100)).await;
    // A queued client that never gets a slot is refused when queue_timeout runs out.
    let mut fourth = TcpStream::connect(p.addr).await.unwrap();
    fourth.write_all(b"4").await.unwrap();
    let took = expect_reset(&mut fourth, ms(2000)).await;
    assert!(took >= ms(250) && took < ms(1000), "queue wait {took:?}");
    assert_eq!(p.stats().timed_out(halfguard::stats::Timeout::Queue), 1);
    second.shutdown().await.unwrap();
    assert_eq!(
        read_end(&mut second, ms(2000)).await,
        Seen::Fin(b"got 2 bytes\n".to_vec())
    );
}

/// `on_down = "abort"`: the server goes down while its connection is open and moving bytes
/// (the pump loop, which looks at the server's abort only when woken for it), and the
/// client is reset soon after. The server accepts every connection, so the health checks
/// cannot take the client's place (with `on_down = "keep"` this test fails: the client
/// stays open).
#[tokio::test]
async fn on_down_abort_resets_a_connection_that_is_moving_bytes() {
    let (addr, mut rx, stop) = stoppable_echo_backend().await;
    let cfg = pool_config(
        "",
        &format!(
            "name = \"app\"\non_down = \"abort\"\n{}\n[backends.health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2\n",
            servers(&[addr])
        ),
    );
    let p = Proxy::start(cfg).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    c.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"hello", "the connection is open and moving bytes");
    let _server_side = rx.recv().await.unwrap();
    stop.send(()).unwrap();
    let took = expect_reset(&mut c, ms(3000)).await;
    assert!(took < ms(1500), "aborted after {took:?}");
    assert_eq!(p.stats().backend_unavailable.load(Ordering::Relaxed), 1);
}

/// A backend that reads a PROXY header, reports its addresses, then echoes.
async fn proxy_aware_backend() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Option<(SocketAddr, SocketAddr)>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(h) = proxy_protocol::read_header(&s).await else {
                    return;
                };
                let _ = tx.send(h.addrs);
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn proxy_protocol_out_v1_and_v2_carry_the_client_address() {
    for v in ["v1", "v2"] {
        let (backend, mut seen) = proxy_aware_backend().await;
        let cfg = pool_config(
            "",
            &format!(
                "name = \"app\"\nproxy_protocol = \"{v}\"\n{}\n[backends.health]\nenabled = false\n",
                servers(&[backend])
            ),
        );
        let p = Proxy::start(cfg).await;
        let mut c = connect_from("127.0.0.2", p.addr).await.unwrap();
        assert_eq!(
            roundtrip(&mut c, b"data after the header").await,
            b"data after the header"
        );
        let (src, dst) = seen.recv().await.unwrap().expect("addresses in the header");
        assert_eq!(src, c.local_addr().unwrap(), "{v}: client address");
        assert_eq!(dst, p.addr, "{v}: the address the client connected to");
    }
}

#[tokio::test]
async fn proxy_protocol_in_keys_caps_on_the_header_source_and_round_trips() {
    let (backend, mut seen) = proxy_aware_backend().await;
    let text_listener = "accept_proxy = true\ntrusted_proxies = [\"127.0.0.0/8\"]\n[listeners.limits]\nmax_conns_per_source = 1\n";
    let cfg = pool_config(
        text_listener,
        &format!(
            "name = \"app\"\nproxy_protocol = \"v2\"\n{}\n[backends.health]\nenabled = false\n",
            servers(&[backend])
        ),
    );
    let p = Proxy::start(cfg).await;
    let client: SocketAddr = "198.18.0.7:40000".parse().unwrap();
    let vip: SocketAddr = "198.18.1.1:443".parse().unwrap();

    // v1 in, v2 out: the backend sees the client from the header, not the balancer.
    let mut one = TcpStream::connect(p.addr).await.unwrap();
    let mut hello = proxy_protocol::encode_v1(client, vip);
    hello.extend_from_slice(b"first");
    one.write_all(&hello).await.unwrap();
    let mut back = [0u8; 5];
    one.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"first");
    assert_eq!(seen.recv().await.unwrap(), Some((client, vip)));

    // The same source through the same balancer: over its cap of 1, the second gets in
    // only because the first completed an exchange (a pool may grow while the listener
    // has room) ...
    let mut two = TcpStream::connect(p.addr).await.unwrap();
    two.write_all(&proxy_protocol::encode_v2(client, vip))
        .await
        .unwrap();
    past_grace().await;
    // ... and one that has not proven itself holds the source at its cap.
    let mut over = TcpStream::connect(p.addr).await.unwrap();
    over.write_all(&proxy_protocol::encode_v2(client, vip))
        .await
        .unwrap();
    over.write_all(b"second").await.unwrap();
    expect_reset(&mut over, ms(2000)).await;
    assert_eq!(p.stats().rejected(Reject::SourceConns), 1);
    expect_open(&mut two, ms(10)).await;

    // Another source through the same balancer is its own source.
    let other: SocketAddr = "198.18.0.8:40001".parse().unwrap();
    let mut three = TcpStream::connect(p.addr).await.unwrap();
    three
        .write_all(&proxy_protocol::encode_v2(other, vip))
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut three, b"third").await, b"third");
    assert_eq!(seen.recv().await.unwrap(), Some((other, vip)));
    let top = p
        .handle
        .guard(L)
        .unwrap()
        .top_sources(10, halfguard::guard::SourceOrder::Conns);
    let keys: Vec<String> = top.iter().map(|s| s.source.to_string()).collect();
    assert!(keys.contains(&"198.18.0.7".to_string()) && keys.contains(&"198.18.0.8".to_string()));
    assert!(
        !keys.iter().any(|k| k.starts_with("127.")),
        "the balancer is not a source: {keys:?}"
    );
}

#[tokio::test]
async fn bad_proxy_headers_cost_one_connection_each() {
    let b = backend(Backend::Echo).await;
    let cfg = pool_config(
        "accept_proxy = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        &format!(
            "name = \"app\"\n{}\n[backends.health]\nenabled = false\n",
            servers(&[b.addr])
        ),
    );
    let mut cfg = cfg;
    cfg.listeners[0].timeouts.first_byte = ms(300);
    let p = Proxy::start(cfg).await;

    // Not a header, a malformed one, an oversized one: RST each, counted.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"PROXY TCP4 198.18.0.1 198.18.0.2 99999 1\r\n",
        &[b'P', b'R', b'O', b'X', b'Y', b' ', b'U'].repeat(30),
    ] {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(junk).await.unwrap();
        expect_reset(&mut c, ms(2000)).await;
    }
    assert_eq!(p.stats().rejected(Reject::ProxyHeader), 3);
    // A header that never finishes: the first-byte clock.
    let mut slow = TcpStream::connect(p.addr).await.unwrap();
    slow.write_all(b"PROXY TCP4 198.18").await.unwrap();
    let took = expect_reset(&mut slow, ms(2000)).await;
    assert!(took < ms(1000), "{took:?}");
    assert_eq!(p.stats().timed_out(halfguard::stats::Timeout::FirstByte), 1);
    // From an address outside trusted_proxies: refused at accept.
    let mut untrusted = connect_from("127.0.0.2", p.addr).await.unwrap();
    untrusted
        .write_all(&proxy_protocol::encode_v1(
            "198.18.0.1:1".parse().unwrap(),
            "198.18.0.2:2".parse().unwrap(),
        ))
        .await
        .unwrap_or(());
    expect_reset(&mut untrusted, ms(2000)).await;
    assert_eq!(p.stats().rejected(Reject::UntrustedProxy), 1);
    // And the process carries on serving good headers.
    let mut good = TcpStream::connect(p.addr).await.unwrap();
    good.write_all(&proxy_protocol::encode_v2(
        "198.18.0.1:1".parse().unwrap(),
        "198.18.0.2:2".parse().unwrap(),
    ))
    .await
    .unwrap();
    assert_eq!(roundtrip(&mut good, b"fine").await, b"fine");
}

#[tokio::test]
async fn a_backend_that_answers_its_syn_late_is_still_reached() {
    // Most connects complete inside connect() (loopback); this one does not: the backend's
    // accept queue is full, so its first SYN is dropped and only the retransmit (about 1 s
    // later) gets through, after the queue has been drained.
    let (late, late_addr, fillers) = full_listener().await;
    let mut cfg = pool_config("", &format!("name = \"app\"\n{}", servers(&[late_addr])));
    cfg.listeners[0].timeouts.connect = ms(5000);
    let p = Proxy::start(cfg).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"late?").await.unwrap();
    tokio::time::sleep(ms(300)).await;
    // Drain the queue, then serve: echo on whatever arrives from now on.
    late.set_nonblocking(true).unwrap();
    let late = TcpListener::from_std(late.into()).unwrap();
    drop(fillers);
    let _echo = echo_on(late);
    let mut back = [0u8; 5];
    tokio::time::timeout(ms(4000), c.read_exact(&mut back))
        .await
        .expect("the late backend answered within the connect budget")
        .expect("bytes came back");
    assert_eq!(&back, b"late?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_comes_back_ends_its_cooloff_at_the_next_probe() {
    // Nothing listens there yet: halfguard started before its backend.
    let late = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let cfg = pool_config(
        "",
        &format!(
            "name = \"app\"\n{}\n[backends.health]\nenabled = false\ninterval = \"200ms\"\ntimeout = \"200ms\"\nfall = 2\ncooloff = \"60s\"\n",
            servers(&[late])
        ),
    );
    let p = Proxy::start(cfg).await;
    // `fall` failed connects: the server cools off for a minute.
    for _ in 0..2 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        expect_reset(&mut c, ms(2000)).await;
    }
    assert!(!up(&p, late), "cooling off after `fall` failures");

    // The backend starts: the next probe finds it, long before the minute is over.
    let back = counted_echo(late).await;
    wait_for(ms(3000), || up(&p, late).then_some(()))
        .await
        .expect("a good probe ends the cool-off");
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"back").await, b"back");
    assert_eq!(back.served.load(Ordering::Relaxed), 1);
}
