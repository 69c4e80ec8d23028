//! Each cap holds, a second source is unaffected while one is at its cap, eviction takes the
//! oldest of the heaviest source, the rate limit and the deny and allow lists work.

use halfguard::config::OnFull;
use halfguard::stats::{EvictState, Reject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

/// Opens `n` silent connections from `from` and waits until the proxy counts them.
async fn silent(p: &Proxy, from: &str, n: usize) -> Vec<TcpStream> {
    let before = p.snapshot().half_open;
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(connect_from(from, p.addr).await.unwrap());
    }
    wait_for(ms(2000), || {
        (p.snapshot().half_open == before + n).then_some(())
    })
    .await
    .expect("silent connections counted");
    // Silent for a while: now they count against their source, and are evictable.
    past_grace().await;
    v
}

#[tokio::test]
async fn per_source_connection_cap_holds_and_spares_other_sources() {
    // The backend answers only after the client's FIN: the held connections complete no
    // exchange (a source whose connections all did may grow past its cap: tests/it/fair.rs).
    let b = backend(Backend::CollectThenReply).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_conns_per_source = 3;
    let p = Proxy::start(cfg).await;

    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from("127.0.0.2", p.addr).await.unwrap();
        c.write_all(b"ok").await.unwrap();
        held.push(c);
    }
    let mut fourth = connect_from("127.0.0.2", p.addr).await.unwrap();
    expect_reset(&mut fourth, ms(2000)).await;
    assert_eq!(p.stats().rejected(Reject::SourceConns), 1);

    let mut other = connect_from("127.0.0.3", p.addr).await.unwrap();
    other.write_all(b"fine").await.unwrap();
    expect_open(&mut other, ms(100)).await;
    for c in held.iter_mut() {
        c.write_all(b"still").await.unwrap();
        expect_open(c, ms(10)).await;
    }
    drop(held);
    drop(other);
    p.assert_drained(ms(2000)).await;
}

#[tokio::test]
async fn per_source_half_open_cap_refuses_the_silent_newcomer_only() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_half_open_per_source = 2;
    let p = Proxy::start(cfg).await;

    let mut held = silent(&p, "127.0.0.2", 2).await;
    let mut third = connect_from("127.0.0.2", p.addr).await.unwrap();
    expect_reset(&mut third, ms(2000)).await;
    assert_eq!(p.stats().rejected(Reject::SourceHalfOpen), 1);
    // Another source is unaffected.
    let _other = silent(&p, "127.0.0.3", 2).await;
    // The held ones are still there and can still speak.
    assert_eq!(roundtrip(&mut held[0], b"late").await, b"late");
    // Once one of them spoke, the source has room for one more silent connection.
    let _again = silent(&p, "127.0.0.2", 1).await;
}

#[tokio::test]
async fn full_listener_half_open_cap_evicts_the_oldest_of_the_heaviest_source() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_half_open = 4;
    cfg.listeners[0].limits.on_full = OnFull::Evict;
    let p = Proxy::start(cfg).await;

    let mut heavy = silent(&p, "127.0.0.2", 3).await;
    let mut light = silent(&p, "127.0.0.3", 1).await;
    // Full. A newcomer from the light source evicts the heavy source's oldest.
    let mut newcomer = connect_from("127.0.0.3", p.addr).await.unwrap();
    expect_reset(&mut heavy[0], ms(2000)).await;
    assert_eq!(p.stats().evicted(EvictState::HalfOpen), 1);
    expect_open(&mut heavy[1], ms(200)).await;
    expect_open(&mut heavy[2], ms(10)).await;
    expect_open(&mut light[0], ms(10)).await;
    assert_eq!(roundtrip(&mut newcomer, b"in").await, b"in");
    assert_eq!(p.snapshot().half_open, 3);
}

#[tokio::test]
async fn full_listener_half_open_cap_in_reject_mode_refuses_the_newcomer() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_half_open = 2;
    cfg.listeners[0].limits.on_full = OnFull::Reject;
    let p = Proxy::start(cfg).await;

    let mut held = silent(&p, "127.0.0.2", 2).await;
    let mut newcomer = connect_from("127.0.0.3", p.addr).await.unwrap();
    expect_reset(&mut newcomer, ms(2000)).await;
    assert_eq!(p.stats().rejected(Reject::HalfOpenFull), 1);
    assert_eq!(p.stats().evicted(EvictState::HalfOpen), 0);
    expect_open(&mut held[0], ms(100)).await;
}

#[tokio::test]
async fn full_listener_connection_cap_evicts_a_silent_connection_never_an_open_one() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_conns = 3;
    // Every OPEN connection counts as moving data here (a stalled one is evictable: see
    // `stalled::`).
    cfg.listeners[0].limits.min_rate = 0;
    let p = Proxy::start(cfg).await;

    let mut open = connect_from("127.0.0.4", p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut open, b"busy").await, b"busy");
    let mut idle = silent(&p, "127.0.0.2", 2).await;
    let mut newcomer = connect_from("127.0.0.3", p.addr).await.unwrap();
    expect_reset(&mut idle[0], ms(2000)).await;
    assert_eq!(roundtrip(&mut newcomer, b"hi").await, b"hi");
    assert_eq!(roundtrip(&mut open, b"still").await, b"still");
    // Now: one open, one silent, one new open. Evict the last silent one...
    let mut second = connect_from("127.0.0.3", p.addr).await.unwrap();
    expect_reset(&mut idle[1], ms(2000)).await;
    assert_eq!(roundtrip(&mut second, b"hi").await, b"hi");
    // ...and with only open connections left, the next newcomer is refused.
    let mut refused = connect_from("127.0.0.5", p.addr).await.unwrap();
    expect_reset(&mut refused, ms(2000)).await;
    assert_eq!(p.stats().rejected(Reject::ConnsFull), 1);
    assert_eq!(p.snapshot().conns, 3);
}

#[tokio::test]
async fn per_source_half_closed_cap_evicts_the_sources_oldest_half_closed() {
    // The backend never closes, so every client FIN leaves a half-closed connection.
    let b = backend(Backend::Sink).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_half_closed_per_source = 2;
    let p = Proxy::start(cfg).await;

    // Three open connections from one source...
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from("127.0.0.2", p.addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        conns.push(c);
    }
    wait_for(ms(2000), || {
        (p.snapshot().conns == 3 && p.snapshot().half_open == 0).then_some(())
    })
    .await
    .expect("three open connections");
    // ...half-close one after another: the third to enter the state evicts the oldest.
    for (i, c) in conns.iter_mut().enumerate() {
        c.shutdown().await.unwrap();
        let want = (i + 1).min(2);
        wait_for(ms(2000), || {
            (p.snapshot().half_closed == want).then_some(())
        })
        .await
        .expect("half-closed counted");
    }
    expect_reset(&mut conns[0], ms(2000)).await;
    expect_open(&mut conns[1], ms(200)).await;
    expect_open(&mut conns[2], ms(10)).await;
    assert_eq!(p.stats().evicted(EvictState::HalfClosed), 1);
    // At its cap, the source gets no new connection until one ends: no churn.
    let mut refused = connect_from("127.0.0.2", p.addr).await.unwrap();
    expect_reset(&mut refused, ms(2000)).await;
    assert_eq!(p.stats().rejected(Reject::SourceHalfClosed), 1);
    // Another source has its own allowance.
    let mut other = connect_from("127.0.0.3", p.addr).await.unwrap();
    other.write_all(b"bye").await.unwrap();
    other.shutdown().await.unwrap();
    wait_for(ms(2000), || (p.snapshot().half_closed == 3).then_some(()))
        .await
        .unwrap();
    expect_open(&mut conns[1], ms(100)).await;
}

#[tokio::test]
async fn full_listener_half_closed_cap_evicts_from_the_heaviest_source() {
    let b = backend(Backend::Sink).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.max_half_closed = 3;
    let p = Proxy::start(cfg).await;

    async fn half_close(p: &Proxy, from: &str, want: usize) -> TcpStream {
        let mut c = connect_from(from, p.addr).await.unwrap();
        c.write_all(b"bye").await.unwrap();
        c.shutdown().await.unwrap();
        wait_for(ms(2000), || {
            (p.snapshot().half_closed == want).then_some(())
        })
        .await
        .expect("half-closed counted");
        past_grace().await;
        c
    }
    let mut h1 = half_close(&p, "127.0.0.2", 1).await;
    let mut h2 = half_close(&p, "127.0.0.2", 2).await;
    let mut l1 = half_close(&p, "127.0.0.3", 3).await;
    let mut l2 = half_close(&p, "127.0.0.3", 3).await;
    expect_reset(&mut h1, ms(2000)).await;
    expect_open(&mut h2, ms(100)).await;
    expect_open(&mut l1, ms(10)).await;
    expect_open(&mut l2, ms(10)).await;
    assert_eq!(p.stats().evicted(EvictState::HalfClosed), 1);
}

#[tokio::test]
async fn rate_limit_refuses_a_fast_source_and_spares_others() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.conn_rate_per_source = 2;
    cfg.listeners[0].limits.conn_burst_per_source = 5;
    let p = Proxy::start(cfg).await;

    // A churn with no data: connections that go nowhere use up the rate.
    let mut served = 0;
    let mut refused = 0;
    for _ in 0..8 {
        let mut c = connect_from("127.0.0.2", p.addr).await.unwrap();
        match read_end(&mut c, ms(100)).await {
            Seen::Reset => refused += 1,
            _ => served += 1,
        }
    }
    // 5 of burst, and at most one more token refilled during the loop.
    assert!((5..=6).contains(&served), "served {served}");
    assert_eq!(refused, 8 - served);
    assert_eq!(p.stats().rejected(Reject::Rate), refused as u64);
    let mut other = connect_from("127.0.0.3", p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut other, b"fine").await, b"fine");
}

#[tokio::test]
async fn deny_list_refuses_and_allow_list_exempts_from_per_source_caps() {
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    let lim = &mut cfg.listeners[0].limits;
    lim.max_conns_per_source = 1;
    lim.deny = vec!["127.0.0.5/32".parse().unwrap()];
    lim.allow = vec!["127.0.0.6/32".parse().unwrap()];
    let p = Proxy::start(cfg).await;

    let mut denied = connect_from("127.0.0.5", p.addr).await.unwrap();
    expect_reset(&mut denied, ms(2000)).await;
    assert_eq!(p.stats().rejected(Reject::Denied), 1);

    let mut allowed = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from("127.0.0.6", p.addr).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"vip").await, b"vip");
        allowed.push(c);
    }
    // Counted per listener, not per source.
    assert_eq!(p.snapshot().conns, 3);
    assert_eq!(p.snapshot().sources, 0);
    drop(allowed);
    p.assert_drained(ms(2000)).await;
}

#[tokio::test]
async fn ipv4_mapped_entries_in_the_deny_and_allow_lists_match_ipv4_clients() {
    // Clients are matched in their IPv4 form (a dual-stack listener's ::ffff:a.b.c.d too):
    // a list entry written in the mapped form must match them all the same.
    let b = backend(Backend::Echo).await;
    let text = format!(
        "[[listeners]]\nname = \"{L}\"\nbind = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n\
         [limits]\nmax_conns_per_source = 1\nconn_rate_per_source = 0\n\
         deny = [\"::ffff:127.0.0.5\"]\nallow = [\"::ffff:127.0.0.6/128\"]\n\
         [admin]\nbind = \"off\"\n",
        b.addr
    );
    let cfg = halfguard::config::parse(&text, "mapped.toml", Default::default()).unwrap();
    let p = Proxy::start(cfg).await;

    let mut denied = connect_from("127.0.0.5", p.addr).await.unwrap();
    expect_reset(&mut denied, ms(2000)).await;
    assert_eq!(p.stats().rejected(Reject::Denied), 1);
    let mut allowed = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.6", p.addr).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"vip").await, b"vip");
        allowed.push(c);
    }
    assert_eq!(
        p.snapshot().sources,
        0,
        "allow-listed: not tracked per source"
    );
}

/// A client that opens a connection per request and completes each is not a churn flood:
/// each completed exchange gives its place in the rate back, so 1,000 exchanges at full
/// speed from one address, far over the default rate of 200/s, are all served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_per_request_clients_are_not_held_at_the_rate() {
    let b = backend(Backend::Http(0)).await;
    let mut cfg = base_config(&[b.addr]);
    cfg.listeners[0].limits.conn_rate_per_source = 200;
    cfg.listeners[0].limits.conn_burst_per_source = 400;
    let p = Proxy::start(cfg).await;
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let to = p.addr;
        set.spawn(async move {
            let mut ok = 0;
            for _ in 0..250 {
                let Ok(mut c) = connect_from("127.0.0.2", to).await else {
                    continue;
                };
                if c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.is_err() {
                    continue;
                }
                let mut got = Vec::new();
                if c.read_to_end(&mut got).await.is_ok() && got == HTTP_OK {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut served = 0;
    while let Some(n) = set.join_next().await {
        served += n.unwrap();
    }
    let took = t0.elapsed();
    assert_eq!(p.stats().rejected(Reject::Rate), 0, "in {took:?}");
    assert_eq!(served, 1000);
    // Fast enough that the rate alone would have refused some (400 + 200/s).
    assert!(
        took.as_secs_f64() < 2.5,
        "too slow to judge the rate: {took:?}"
    );
}

/// A connection through a PROXY protocol balancer at 127.0.0.1 on behalf of `client`: the
/// v1 header, then `hello` if any (echoed back).
async fn via_balancer(p: &Proxy, client: &str, hello: &[u8]) -> TcpStream {
    let src: std::net::SocketAddr = format!("{client}:40000").parse().unwrap();
    let vip: std::net::SocketAddr = "198.18.1.1:443".parse().unwrap();
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(&halfguard::proxy_protocol::encode_v1(src, vip))
        .await
        .unwrap();
    if !hello.is_empty() {
        assert_eq!(roundtrip(&mut c, hello).await, hello);
    }
    c
}

#[tokio::test]
async fn behind_a_balancer_a_source_at_its_cap_evicts_nobody() {
    // A NAT's six idle connections and a source at its half-open cap fill the listener,
    // all through one PROXY protocol balancer. The capped source reconnecting again and
    // again is refused for its cap, as it would be without the balancer, and costs the NAT
    // nothing: eviction waits until the header names who is asking.
    let b = backend(Backend::Echo).await;
    let mut cfg = base_config(&[b.addr]);
    let l = &mut cfg.listeners[0];
    l.accept_proxy = true;
    l.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    l.limits.max_conns = 8;
    l.limits.max_half_open_per_source = 2;
    let p = Proxy::start(cfg).await;

    let mut nat = Vec::new();
    for _ in 0..6 {
        nat.push(via_balancer(&p, "198.18.0.7", b"hi").await);
    }
    let mut capped = Vec::new();
    for _ in 0..2 {
        capped.push(via_balancer(&p, "198.18.0.8", b"").await);
    }
    // The NAT's idle connections are stalled (evictable), the capped source's silent ones
    // count against its cap: the listener is full.
    wait_for(ms(3000), || {
        let s = p.snapshot();
        (s.conns == 8 && s.stalled == 6 && s.half_open == 2).then_some(())
    })
    .await
    .expect("a full listener: 6 stalled, 2 silent");
    past_grace().await;

    for _ in 0..6 {
        let mut again = via_balancer(&p, "198.18.0.8", b"").await;
        expect_reset(&mut again, ms(2000)).await;
    }
    assert_eq!(p.stats().rejected(Reject::SourceHalfOpen), 6);
    assert_eq!(
        p.stats().evicted(EvictState::Stalled),
        0,
        "a NAT connection was evicted"
    );
    for c in &mut nat {
        assert_eq!(roundtrip(c, b"still").await, b"still");
    }
    // A client that holds nothing still gets in: the NAT's longest stalled makes room.
    let mut client = via_balancer(&p, "198.18.0.9", b"hello").await;
    assert_eq!(roundtrip(&mut client, b"again").await, b"again");
    assert_eq!(p.stats().evicted(EvictState::Stalled), 1);
}
