//! Passive health judges a server only on what a client cannot cause: a client that makes a
//! real server reset it cannot take that server out; the last server up stays in rotation
//! unless a check agrees it is gone; running out of descriptors here is not the server's
//! fault.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use halfguard::config::{self, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cli::{Reap, free_port, start};
use crate::support::*;

/// python3's `http.server` on 127.0.0.1, killed (by its PID) when dropped.
struct PyHttp {
    addr: SocketAddr,
    child: Child,
}

impl Drop for PyHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_http_server() -> PyHttp {
    let dir = std::env::temp_dir().join(format!("halfguard-pyhttp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), "hello\n").unwrap();
    let mut child = Command::new("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs (CI installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    let port: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    PyHttp {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        child,
    }
}

fn pool(servers: &[SocketAddr], protocol: &str, extra: &str) -> Config {
    let list: Vec<String> = servers
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect();
    let text = format!(
        r#"
[[listeners]]
name = "{L}"
bind = "127.0.0.1:0"
backend = "app"
protocol = "{protocol}"

[[backends]]
name = "app"
servers = [{}]
{extra}

[limits]
max_conns_per_source = 0
max_half_open_per_source = 0
conn_rate_per_source = 0

[admin]
bind = "off"
"#,
        list.join(", ")
    );
    config::parse(&text, "test.toml", HashMap::new()).expect("valid test config")
}

/// (label, up) of every server of pool "app".
fn ups(p: &Proxy) -> Vec<(String, bool)> {
    p.handle
        .backend_servers("app")
        .into_iter()
        .map(|(l, up, _)| (l, up))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_makes_the_server_reset_cannot_take_it_out() {
    // The attack from the review: `\r\n` makes http.server close without answering, and
    // bytes after that make its kernel answer with RST, before the server ever spoke.
    let a = python_http_server();
    let b = python_http_server();
    let p = Proxy::start(pool(
        &[a.addr, b.addr],
        "client-first",
        "[backends.health]\nenabled = false\n",
    ))
    .await;
    // In rounds of six at once (three per server), as the review did: no connect that
    // works comes between the resets.
    for _ in 0..3 {
        let mut round = Vec::new();
        for _ in 0..6 {
            let mut c = TcpStream::connect(p.addr).await.unwrap();
            c.write_all(b"\r\n").await.unwrap();
            round.push(c);
        }
        for c in &mut round {
            // The server's FIN, forwarded.
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout(ms(2000), c.read(&mut buf)).await;
        }
        for _ in 0..3 {
            for c in &mut round {
                let _ = c.write_all(b"xx").await;
            }
            tokio::time::sleep(ms(20)).await;
        }
        drop(round);
    }
    tokio::time::sleep(ms(200)).await;
    assert_eq!(
        ups(&p),
        vec![(a.addr.to_string(), true), (b.addr.to_string(), true)],
        "a client took a server out"
    );
    assert!(p.handle.readiness().is_ok(), "{:?}", p.handle.readiness());
    // And real requests are served.
    for _ in 0..2 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        match read_end(&mut c, ms(3000)).await {
            Seen::Fin(body) => assert!(
                String::from_utf8_lossy(&body).starts_with("HTTP/1.0 200"),
                "{}",
                String::from_utf8_lossy(&body)
            ),
            other => panic!("request not served: {other:?}"),
        }
    }
}

/// A backend that resets every connection 50 ms after accepting it while `broken`, and
/// greets otherwise (a plain TCP check has connected and gone by then).
async fn flaky() -> (SocketAddr, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            if b.load(Ordering::Relaxed) {
                tokio::spawn(async move {
                    tokio::time::sleep(ms(50)).await;
                    rst(s);
                });
            } else {
                tokio::spawn(async move {
                    let _ = s.write_all(b"HELLO\n").await;
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        }
    });
    (addr, broken)
}

/// A server-first client: the greeting, or how it ended.
async fn greeted(p: &Proxy) -> Seen {
    // The reset can come so fast that the connect itself reports it.
    let Ok(mut c) = TcpStream::connect(p.addr).await else {
        return Seen::Reset;
    };
    let mut buf = [0u8; 6];
    match tokio::time::timeout(ms(2000), c.read_exact(&mut buf)).await {
        Ok(Ok(_)) => Seen::Fin(buf.to_vec()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Seen::Reset,
        Ok(Err(_)) => Seen::Fin(Vec::new()),
        Err(_) => Seen::Open,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_server_up_stays_in_rotation_while_its_check_passes() {
    // A server-first backend that resets before greeting (an app still starting behind a
    // listening socket): resets before any byte count against it. Beside a healthy server,
    // it is cooled off as before...
    let (bad, broken) = flaky().await;
    let good = backend(Backend::Greeter).await;
    let p = Proxy::start(pool(
        &[bad, good.addr],
        "server-first",
        "[backends.health]\nenabled = false\n",
    ))
    .await;
    for _ in 0..8 {
        let _ = greeted(&p).await;
    }
    assert_eq!(
        ups(&p),
        vec![(bad.to_string(), false), (good.addr.to_string(), true)]
    );
    drop(p);

    // ...but alone, it stays: a plain TCP check still connects, so the evidence is not
    // enough to refuse every client for the cool-off. Once the app is up, it is served at
    // once, not after `cooloff`.
    let p = Proxy::start(pool(
        &[bad],
        "server-first",
        "[backends.health]\nenabled = false\ncooloff = \"30s\"\n",
    ))
    .await;
    for _ in 0..8 {
        assert_eq!(greeted(&p).await, Seen::Reset);
    }
    tokio::time::sleep(ms(200)).await;
    assert_eq!(ups(&p), vec![(bad.to_string(), true)]);
    assert!(p.handle.readiness().is_ok());
    broken.store(false, Ordering::Relaxed);
    assert_eq!(greeted(&p).await, Seen::Fin(b"HELLO\n".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_server_goes_when_its_check_agrees() {
    // A dead server (its port refuses): connects fail, and so does the check that follows.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let p = Proxy::start(pool(
        &[dead],
        "client-first",
        "[backends.health]\nenabled = false\n",
    ))
    .await;
    for _ in 0..3 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        expect_reset(&mut c, ms(2000)).await;
    }
    wait_for(ms(2000), || p.handle.readiness().is_err().then_some(()))
        .await
        .expect("not ready once the check confirms the server is gone");
    assert_eq!(ups(&p), vec![(dead.to_string(), false)]);
}

/// The value of `name{labels}` in a scrape.
fn sample(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_not_the_servers_fault() {
    crate::require!("prlimit to lower a running process's limit"; crate::support::Need::Tool("prlimit"));
    // halfguard with few descriptors, and a server-first listener, which connects to a
    // server as soon as it accepts: with one descriptor left, the accept takes it and the
    // backend socket() fails with EMFILE. The parity of what is left depends on what the
    // process opened at start, so the limit is tried twice, one apart.
    let a = backend(Backend::Echo).await;
    let b = backend(Backend::Echo).await;
    for limit in [40, 41] {
        let port = free_port();
        let admin = free_port();
        let dir =
            std::env::temp_dir().join(format!("halfguard-emfile-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("halfguard.toml");
        std::fs::write(
            &cfg,
            format!(
                "[[listeners]]\nname = \"sf\"\nbind = \"127.0.0.1:{port}\"\nbackend = \"app\"\nprotocol = \"server-first\"\n\
                 [[backends]]\nname = \"app\"\nservers = [{{ addr = \"{}\" }}, {{ addr = \"{}\" }}]\n\
                 [backends.health]\nenabled = false\n\
                 [limits]\nmax_conns_per_source = 0\nmax_half_open_per_source = 0\nconn_rate_per_source = 0\n\
                 [kernel]\ncensus_interval = \"0s\"\n[tcp]\nsplice = false\n\
                 [admin]\nbind = \"127.0.0.1:{admin}\"\n",
                a.addr, b.addr
            ),
        )
        .unwrap();
        // Started with room (halfguard cuts its caps to the limit it starts with), then the
        // limit is lowered under it, so the backend socket() can meet EMFILE.
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(format!(
            "ulimit -n 1024 && exec {} run -c {}",
            env!("CARGO_BIN_EXE_halfguard"),
            cfg.display()
        ));
        let child = Reap(start(cmd));
        let lowered = Command::new("prlimit")
            .args([
                "--pid",
                &child.0.id().to_string(),
                &format!("--nofile={limit}:{limit}"),
            ])
            .status()
            .expect("prlimit");
        assert!(lowered.success(), "prlimit --pid");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Hold connections until one is reset (EMFILE at the backend socket) or hangs
        // (EMFILE at accept: the other parity).
        let mut held = Vec::new();
        let mut resets = 0;
        let mut hung = false;
        for _ in 0..40 {
            // The reset can come before the connect or the write returns.
            let exchange = async {
                let mut c = TcpStream::connect(addr).await?;
                c.write_all(b"x").await?;
                let mut one = [0u8; 1];
                let n = c.read(&mut one).await?;
                std::io::Result::Ok((n, c))
            };
            match tokio::time::timeout(ms(1000), exchange).await {
                Ok(Ok((1, c))) => held.push(c),
                Ok(_) => {
                    resets += 1;
                    if resets == 6 {
                        break;
                    }
                }
                Err(_) => {
                    hung = true;
                    break;
                }
            }
        }
        if hung {
            drop(child);
            continue;
        }
        assert_eq!(resets, 6, "never ran out of descriptors");
        // Free some, and look: no server was blamed, both still take connections.
        for c in held.drain(..4) {
            rst(c);
        }
        tokio::time::sleep(ms(300)).await;
        let admin = SocketAddr::from(([127, 0, 0, 1], admin));
        let (status, scrape) = http(admin, "GET", "/metrics").await;
        assert_eq!(status, 200);
        drop(child);
        for s in [a.addr, b.addr] {
            let labels = format!("{{backend=\"app\",server=\"{s}\"}}");
            assert_eq!(
                sample(&scrape, &format!("halfguard_backend_up{labels}")),
                Some(1.0),
                "{s} blamed for our EMFILE:\n{scrape}"
            );
            assert_eq!(
                sample(
                    &scrape,
                    &format!("halfguard_backend_connect_errors_total{labels}")
                ),
                Some(0.0)
            );
        }
        let local = sample(
            &scrape,
            "halfguard_backend_local_errors_total{backend=\"app\"}",
        )
        .unwrap_or(0.0);
        assert!(local >= 6.0, "local errors counted: {local}");
        return;
    }
    panic!("neither limit left exactly one descriptor");
}
