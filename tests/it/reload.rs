//! What a reload must not do: keep a draining process alive, apply socket options the kernel
//! refuses, forget the load and health of servers that stay, or split a listener's metrics.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use halfguard::config::{self, Config};
use halfguard::shutdown::Signal;
use halfguard::{Server, ServerError};
use tokio::net::TcpStream;

use crate::support::*;

/// A proxy whose stop the test triggers without waiting for the drain.
struct Started {
    handle: halfguard::Handle,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(config: Config) -> Started {
    let server = Server::bind(config).await.expect("proxy binds");
    let handle = server.handle();
    let addr = handle.addr(L).expect("listener t");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
        Signal::Interrupt
    }));
    Started {
        handle,
        addr,
        stop: Some(tx),
        task,
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse(text: &str) -> Config {
    config::parse(text, "test.toml", HashMap::new()).expect("valid test config")
}

/// One listener `t` on `bind` toward `backend`, admin on 127.0.0.1:0, plus `extra`.
fn one_listener(bind: &str, backend: SocketAddr, extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"{L}\"\nbind = \"{bind}\"\nbackends = [\"{backend}\"]\n\
         [limits]\nmax_conns_per_source = 0\nconn_rate_per_source = 0\n\
         [admin]\nbind = \"127.0.0.1:0\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_draining_is_refused_and_the_server_still_stops() {
    let b = backend(Backend::Echo).await;
    let base = one_listener("127.0.0.1:0", b.addr, "[timeouts]\ndrain = \"1s\"");
    let mut s = start(parse(&base)).await;
    // A connection that stays open keeps the drain going for its full second.
    let mut held = TcpStream::connect(s.addr).await.unwrap();
    assert_eq!(roundtrip(&mut held, b"hi").await, b"hi");

    let _ = s.stop.take().unwrap().send(());
    wait_for(ms(2000), || {
        (s.handle.readiness() == Err("draining".into())).then_some(())
    })
    .await
    .expect("draining");
    tokio::time::sleep(ms(100)).await;
    // A reload that would add a listener, mid-drain.
    let more = format!(
        "{base}\n[[listeners]]\nname = \"late\"\nbind = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        b.addr
    );
    let r = s.handle.reload_with(parse(&more)).await;
    assert!(matches!(r, Err(ServerError::Draining)), "{r:?}");
    assert!(s.handle.addr("late").is_none(), "no listener added");

    // The held connection is aborted at the end of the drain, and the server returns.
    expect_reset(&mut held, Duration::from_secs(3)).await;
    tokio::time::timeout(Duration::from_secs(3), &mut s.task)
        .await
        .expect("the server stops after its drain")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_options_the_kernel_refuses_are_refused_at_start_and_on_reload() {
    let b = backend(Backend::Echo).await;
    let good = base_config(&[b.addr]);
    let bad_ones = [
        ("tcp.keepalive_count", {
            let mut c = good.clone();
            c.tcp.keepalive_idle = Some(Duration::from_secs(30));
            c.tcp.keepalive_count = 200;
            c
        }),
        ("tcp.user_timeout", {
            let mut c = good.clone();
            c.tcp.user_timeout = Some(Duration::from_millis(i32::MAX as u64 + 1));
            c
        }),
    ];
    // Built by hand (a file would not pass `check`): at start, the option is named, not
    // reported as a failure to bind.
    for (key, cfg) in &bad_ones {
        let e = Server::bind(cfg.clone()).await.err().expect("refused");
        let msg = e.to_string();
        assert!(
            msg.contains(key) && !msg.contains("cannot bind"),
            "{key}: {msg}"
        );
    }
    // On reload: refused, and the running options stay in force for every connect.
    let p = Proxy::start(good).await;
    for (key, cfg) in bad_ones {
        let r = p.handle.reload_with(cfg).await;
        assert!(
            matches!(&r, Err(ServerError::TcpOptions(e)) if e.option == key),
            "{key}: {r:?}"
        );
        for _ in 0..4 {
            let mut c = TcpStream::connect(p.addr).await.unwrap();
            assert_eq!(roundtrip(&mut c, b"still").await, b"still");
        }
    }
    assert!(
        p.handle.backend_servers(L).iter().all(|(_, up, _)| *up),
        "servers blamed for our options"
    );
}

fn pool_config(servers: &str, extra: &str) -> Config {
    parse(&format!(
        "[[listeners]]\nname = \"{L}\"\nbind = \"127.0.0.1:0\"\nbackend = \"app\"\n\
         [[backends]]\nname = \"app\"\nservers = [{servers}]\n{extra}\n\
         [limits]\nmax_conns_per_source = 0\nmax_half_open_per_source = 0\nconn_rate_per_source = 0\n\
         [admin]\nbind = \"off\"\n"
    ))
}

fn server(p: &Proxy, addr: SocketAddr) -> (bool, u32) {
    p.handle
        .backend_servers("app")
        .into_iter()
        .find(|(l, _, _)| l == &addr.to_string())
        .map(|(_, up, active)| (up, active))
        .expect("server listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_pool_keeps_the_load_of_the_servers_that_stay() {
    let b = backend(Backend::Echo).await;
    let servers = format!("{{ addr = \"{}\", max_conns = 1 }}", b.addr);
    let cfg = |timeout: &str| {
        pool_config(
            &servers,
            &format!(
                "queue_size = 0\nqueue_timeout = \"{timeout}\"\n[backends.health]\nenabled = false\n"
            ),
        )
    };
    let p = Proxy::start(cfg("1s")).await;
    let mut first = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut first, b"one").await, b"one");
    assert_eq!(server(&p, b.addr), (true, 1));

    // The pool changes (not its server): the open connection still counts.
    p.handle.reload_with(cfg("2s")).await.unwrap();
    assert_eq!(server(&p, b.addr), (true, 1));
    let mut second = TcpStream::connect(p.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut second, b"two")
        .await
        .unwrap();
    expect_reset(&mut second, ms(2000)).await;
    assert_eq!(server(&p, b.addr), (true, 1), "max_conns = 1 exceeded");

    // The old connection's slot comes back to the same count.
    rst(first);
    wait_for(ms(2000), || (server(&p, b.addr).1 == 0).then_some(()))
        .await
        .expect("slot given back");
    let mut third = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut third, b"three").await, b"three");
    assert_eq!(server(&p, b.addr), (true, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_pool_keeps_its_queue_bound() {
    // Answers once the client said all: until then a client awaits its answer and keeps
    // its slot (an idle one would give it to the queued client).
    let b = backend(Backend::CollectThenReply).await;
    let servers = format!("{{ addr = \"{}\", max_conns = 1 }}", b.addr);
    let cfg = |timeout: &str| {
        pool_config(
            &servers,
            &format!(
                "queue_size = 1\nqueue_timeout = \"{timeout}\"\n[backends.health]\nenabled = false\n"
            ),
        )
    };
    let p = Proxy::start(cfg("5s")).await;
    let mut first = TcpStream::connect(p.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut first, b"one")
        .await
        .unwrap();
    tokio::time::sleep(ms(50)).await;
    // The second fills the queue of one.
    let mut second = TcpStream::connect(p.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut second, b"two")
        .await
        .unwrap();
    tokio::time::sleep(ms(200)).await;

    // The pool changes: the client still queued in the old one counts against the new
    // queue, so the third finds it full and is refused at once.
    p.handle.reload_with(cfg("6s")).await.unwrap();
    let mut third = TcpStream::connect(p.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut third, b"three")
        .await
        .unwrap();
    expect_reset(&mut third, ms(2000)).await;
    assert_eq!(
        p.stats().rejected(halfguard::stats::Reject::QueueFull),
        1,
        "a reload doubled the queue"
    );

    // The queued client gets the slot when the first leaves.
    rst(first);
    tokio::io::AsyncWriteExt::shutdown(&mut second)
        .await
        .unwrap();
    assert_eq!(
        read_end(&mut second, ms(2000)).await,
        Seen::Fin(b"got 3 bytes\n".to_vec()),
        "the queued client is served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_pool_keeps_a_down_server_down() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let alive = backend(Backend::Echo).await;
    let servers = format!("{{ addr = \"{dead}\" }}, {{ addr = \"{}\" }}", alive.addr);
    let checks = |interval: &str| {
        pool_config(
            &servers,
            &format!(
                "[backends.health]\ninterval = \"{interval}\"\ntimeout = \"100ms\"\nfall = 2\n"
            ),
        )
    };
    let p = Proxy::start(checks("100ms")).await;
    wait_for(ms(3000), || (!server(&p, dead).0).then_some(()))
        .await
        .expect("the dead server is marked down");

    // Checks every 5 s now: only the carried state can say it is down before then.
    p.handle.reload_with(checks("5s")).await.unwrap();
    assert!(!server(&p, dead).0, "a reload brought a down server back");
    assert!(server(&p, alive.addr).0);
    for _ in 0..4 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"x").await, b"x");
    }

    // With the checks turned off, nothing would ever bring it back: it is up again, left
    // to passive health.
    let off = pool_config(&servers, "[backends.health]\nenabled = false\n");
    p.handle.reload_with(off).await.unwrap();
    assert!(server(&p, dead).0);
}

/// Every sample's name and labels, to find the ones that appear twice.
fn duplicates(scrape: &str) -> Vec<String> {
    let mut seen = HashSet::new();
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(k, _)| k.to_string()))
        .filter(|k| !seen.insert(k.clone()))
        .collect()
}

fn sample(scrape: &str, key: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.rsplit_once(' ')
            .filter(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_moved_to_a_new_bind_keeps_one_metric_series() {
    let b = backend(Backend::Echo).await;
    let p = Proxy::start(parse(&one_listener("127.0.0.1:0", b.addr, ""))).await;
    let admin = p.handle.admin_addr().expect("admin on");
    let mut old = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut old, b"old").await, b"old");

    // Same name, new address: the old listener drains beside the new one.
    p.handle
        .reload_with(parse(&one_listener("127.0.0.2:0", b.addr, "")))
        .await
        .unwrap();
    let moved = p.handle.addr(L).unwrap();
    assert_ne!(moved, p.addr);
    let mut new = TcpStream::connect(moved).await.unwrap();
    assert_eq!(roundtrip(&mut new, b"new").await, b"new");
    assert_eq!(roundtrip(&mut old, b"still").await, b"still");

    let (status, scrape) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(duplicates(&scrape), Vec::<String>::new(), "{scrape}");
    // One series that goes on counting, and holds both listeners' connections.
    let l = format!("listener=\"{L}\"");
    assert_eq!(
        sample(
            &scrape,
            &format!("halfguard_connections_accepted_total{{{l}}}")
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &scrape,
            &format!("halfguard_connections{{{l},state=\"open\"}}")
        ),
        Some(2.0)
    );
}
