//! Server-first found, not guessed: a client-first listener whose silent connections time
//! out at `first_byte` probes its server once, and says when that server greets first.

use std::collections::HashMap;
use std::net::SocketAddr;

use halfguard::config;
use tokio::net::TcpStream;

use crate::support::*;

const GAUGE: &str = "halfguard_server_first_suspected{listener=\"t\"}";

/// A client-first listener toward `backend` with a 300 ms `first_byte`, admin on port 0.
async fn proxy(backend: SocketAddr) -> (Proxy, SocketAddr) {
    let text = format!(
        "[[listeners]]\nname = \"{L}\"\nbind = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n\
         [limits]\nconn_rate_per_source = 0\nmax_conns_per_source = 0\n\
         [timeouts]\nfirst_byte = \"300ms\"\n[tcp]\nkeepalive_idle = \"0s\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n"
    );
    let cfg = config::parse(&text, "greeting.toml", HashMap::new()).expect("valid config");
    let p = Proxy::start(cfg).await;
    let admin = p.handle.admin_addr().expect("admin is on");
    (p, admin)
}

async fn suspected(admin: SocketAddr) -> Option<f64> {
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(GAUGE)?.trim().parse().ok())
}

/// A client that connects and says nothing, aborted at `first_byte`.
async fn silent_client(p: &Proxy) {
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    expect_reset(&mut c, ms(3000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greeting_server_behind_a_client_first_listener_is_found() {
    let mut b = backend(Backend::Greeter).await;
    let (p, admin) = proxy(b.addr).await;
    assert_eq!(suspected(admin).await, Some(0.0));

    silent_client(&p).await;
    // The upkeep sees the timeout within a second; the probe hears HELLO at once.
    let mut found = None;
    for _ in 0..40 {
        if suspected(admin).await == Some(1.0) {
            found = Some(());
            break;
        }
        tokio::time::sleep(ms(100)).await;
    }
    assert!(
        found.is_some(),
        "the gauge did not turn 1: {:?}",
        suspected(admin).await
    );
    // One probe, one backend connection: nothing per client connection.
    tokio::time::timeout(ms(2000), b.ends.recv())
        .await
        .expect("the probe's connection ended");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_probed_once_and_not_suspected() {
    let mut b = backend(Backend::Echo).await;
    let (p, admin) = proxy(b.addr).await;

    silent_client(&p).await;
    // The probe connects, hears nothing for a second, and closes.
    tokio::time::timeout(ms(4000), b.ends.recv())
        .await
        .expect("a probe reached the server");
    assert_eq!(suspected(admin).await, Some(0.0));

    // More timeouts within the probe interval probe nothing more.
    silent_client(&p).await;
    tokio::time::sleep(ms(2500)).await;
    assert!(
        b.ends.try_recv().is_err(),
        "probed again within the interval"
    );
    p.shutdown().await;
}
