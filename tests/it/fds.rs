//! Descriptors are a cap like any other: a `max_conns` the open-files limit cannot hold is
//! lowered to fit (said by `check`, at start and in `/metrics`), so a flood past it meets
//! the caps and eviction, never EMFILE; and splice has pipes whatever `max_conns` says,
//! within a bound of their own, copying when none is free.
//!
//! Each test runs the `halfguard` binary under its own `ulimit -n` (a `bash -c` wrapper), so
//! nothing depends on the caller's limits.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use halfguard::fds::Budget;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{Reap, free_port, logs, start, temp_config};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_halfguard");

/// Every per-source cap and rate off, so only the listener cap and eviction meet a flood.
// Every per-source cap off, the byte cap too: these tests pause downloads from one address
// on purpose (holding pipes), which the byte cap would rightly refuse more of.
const OPEN_LIMITS: &str = "[limits]\nmax_conns_per_source = 0\nmax_half_open_per_source = 0\n\
                           max_half_closed_per_source = 0\nconn_rate_per_source = 0\n\
                           max_queued_per_source = 0\ngrace = \"50ms\"\n";

/// `halfguard <args>` under a hard and soft open-files limit of `nofile`.
fn limited(nofile: u64, args: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("ulimit -n {nofile} && exec {BIN} {args}"));
    cmd
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn sum(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name && labels.iter().all(|x| series.contains(x)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// One slow-drip connection after another from `from`: a byte, then a byte every 300 ms;
/// reconnects when it is evicted or refused, until `stop`.
async fn drip_slot(from: String, to: SocketAddr, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(mut s)) = tokio::time::timeout(ms(1000), connect_from(&from, to)).await else {
            tokio::time::sleep(ms(50)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            if s.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(ms(300)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_above_the_open_files_limit_is_lowered_and_a_flood_meets_the_caps() {
    // The flood and the backend's side of it live in this process.
    let _ = halfguard::sockopt::raise_nofile();
    const NOFILE: u64 = 256;
    const FLOOD: usize = 150;
    let b = backend(Backend::Echo).await;
    let admin_port = free_port();
    let (cfg, port) = temp_config(
        b.addr,
        &format!("bind = \"127.0.0.1:{admin_port}\""),
        &format!("{OPEN_LIMITS}max_conns = 1000\n[timeouts]\ndrain = \"500ms\"\n"),
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let plan = Budget::plan(&halfguard::config::load(&cfg).unwrap(), NOFILE);
    let eff = plan.effective("cli").unwrap();
    assert!(
        (eff as usize) < FLOOD && 2 * FLOOD as u64 > NOFILE,
        "the flood must overrun both the lowered cap and the limit: {plan}"
    );

    // `check` under the same limit says what `run` will do.
    let out = limited(NOFILE, &format!("check -c {}", cfg.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("\"cli\" max_conns {eff} lowered from 1000"))
            && text.contains(&format!(
                "warning: listener \"cli\": limits.max_conns 1000 lowered to {eff}"
            )),
        "{text}"
    );

    let child = Reap(start(limited(NOFILE, &format!("run -c {}", cfg.display()))));
    let m = scrape(admin).await;
    let cap = |state: &str| {
        sum(
            &m,
            "halfguard_connections_limit",
            &["listener=\"cli\"", &format!("state=\"{state}\"")],
        )
    };
    assert_eq!(cap("all"), f64::from(eff), "{m}");
    assert!(cap("half_open") <= f64::from(eff));
    assert_eq!(
        sum(&m, "halfguard_connections_limit_configured", &[]),
        1000.0
    );
    assert_eq!(sum(&m, "halfguard_open_files_limit", &[]), NOFILE as f64);

    // 150 drip connections from 10 sources: twice as many descriptors as the process has.
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = JoinSet::new();
    for i in 0..FLOOD {
        flood.spawn(drip_slot(
            format!("127.0.1.{}", 1 + i % 10),
            addr,
            stop.clone(),
        ));
    }
    // Let the flood fill the listener and its connections show they go nowhere.
    tokio::time::sleep(ms(1500)).await;

    // A client from elsewhere is served, every time, while the flood goes on.
    let (mut ok, mut tries) = (0u32, 0u32);
    let end = Instant::now() + ms(2000);
    while Instant::now() < end {
        tries += 1;
        let served = async {
            let mut c = connect_from("127.0.0.3", addr).await.ok()?;
            c.write_all(b"legit").await.ok()?;
            let mut back = [0u8; 5];
            c.read_exact(&mut back).await.ok()?;
            (&back == b"legit").then_some(())
        };
        if let Ok(Some(())) = tokio::time::timeout(ms(2000), served).await {
            ok += 1;
        }
        tokio::time::sleep(ms(50)).await;
    }
    let m = scrape(admin).await;
    let held = sum(&m, "halfguard_connections", &["listener=\"cli\""]);
    let open_fds = std::fs::read_dir(format!("/proc/{}/fd", child.0.id()))
        .map(|d| d.count())
        .unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    while flood.join_next().await.is_some() {}

    let met = sum(
        &m,
        "halfguard_connections_evicted_total",
        &["listener=\"cli\""],
    ) + sum(
        &m,
        "halfguard_connections_rejected_total",
        &["listener=\"cli\""],
    );
    let accept_errors = sum(&m, "halfguard_accept_errors_total", &[]);
    let connect_errors = sum(&m, "halfguard_backend_connect_errors_total", &[]);
    let unavailable = sum(
        &m,
        "halfguard_connections_closed_total",
        &["end=\"backend_unavailable\""],
    );
    eprintln!(
        "cap {eff} (pipes {}), held {held}, descriptors open {open_fds} of {NOFILE}, \
         evicted+refused {met}, legit {ok}/{tries}",
        plan.pipes
    );
    assert_eq!(accept_errors, 0.0, "accept ran out of descriptors:\n{m}");
    assert_eq!(connect_errors, 0.0, "a backend connect failed:\n{m}");
    assert_eq!(unavailable, 0.0, "a client lost its backend:\n{m}");
    assert!(held <= f64::from(eff), "over the lowered cap: {held}");
    assert!(
        met > 0.0,
        "the flood past the cap was met by the caps:\n{m}"
    );
    assert!(
        ok * 100 >= tries * 95,
        "legit client served {ok} of {tries}"
    );
    // Said once, at start, however long the flood.
    let said = logs()
        .matches(&format!("limits.max_conns 1000 lowered to {eff}"))
        .count();
    assert_eq!(said, 1, "{}", logs());
    drop(child);
}

/// `halfguard run` under `nofile` with `max_conns`, in front of a flood backend; returns the
/// child, the listener, the admin endpoint and the budget it runs with.
async fn bulk_proxy(
    flood: SocketAddr,
    nofile: u64,
    max_conns: u32,
) -> (Reap, SocketAddr, SocketAddr, Budget) {
    let admin_port = free_port();
    let (cfg, port) = temp_config(
        flood,
        &format!("bind = \"127.0.0.1:{admin_port}\""),
        &format!("{OPEN_LIMITS}max_conns = {max_conns}\n[timeouts]\ndrain = \"500ms\"\n"),
    );
    let plan = Budget::plan(&halfguard::config::load(&cfg).unwrap(), nofile);
    let child = Reap(start(limited(nofile, &format!("run -c {}", cfg.display()))));
    (
        child,
        format!("127.0.0.1:{port}").parse().unwrap(),
        format!("127.0.0.1:{admin_port}").parse().unwrap(),
        plan,
    )
}

/// Asks the flood backend to start and reads `n` bytes of it.
async fn download(c: &mut TcpStream, n: usize) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(ms(5000), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => got += k,
        }
    }
    got
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_engages_whatever_max_conns_says() {
    // Far more than 1024 descriptors can hold: before, this left splice no pipe at all.
    let b = backend(Backend::Flood).await;
    let (_child, addr, admin, plan) = bulk_proxy(b.addr, 1024, 100_000).await;
    assert!(plan.pipes > 0, "{plan}");

    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"go").await.unwrap();
    assert!(download(&mut c, 4 << 20).await >= 4 << 20);
    // Stop reading: the spliced direction holds its pipe with bytes in it.
    tokio::time::sleep(ms(300)).await;
    let m = scrape(admin).await;
    assert_eq!(
        sum(&m, "halfguard_splice_pipes_limit", &[]),
        plan.pipes as f64,
        "{m}"
    );
    assert!(
        sum(&m, "halfguard_spliced_directions_total", &[]) >= 1.0,
        "bulk moved to splice:\n{m}"
    );
    assert!(
        sum(&m, "halfguard_splice_pipes", &["state=\"in_use\""]) >= 1.0,
        "the pipe in use is shown:\n{m}"
    );
    // And the bytes keep coming.
    assert!(download(&mut c, 4 << 20).await >= 4 << 20);
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_beyond_the_pipe_budget_keeps_copying() {
    // A limit that leaves three pipes for eight connections.
    let b = backend(Backend::Flood).await;
    let (_child, addr, admin, plan) = bulk_proxy(b.addr, 104, 1000).await;
    assert!(
        plan.pipes >= 1 && plan.pipes < 6 && plan.effective("cli").unwrap() >= 6,
        "{plan}"
    );

    // Six bulk downloads that each stop reading halfway, holding a full pipe if they have one.
    let mut conns = Vec::new();
    for _ in 0..6 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"go").await.unwrap();
        assert!(download(&mut c, 2 << 20).await >= 2 << 20);
        conns.push(c);
    }
    tokio::time::sleep(ms(300)).await;
    let m = scrape(admin).await;
    let in_use = sum(&m, "halfguard_splice_pipes", &["state=\"in_use\""]);
    assert!(
        in_use >= 1.0 && in_use <= plan.pipes as f64,
        "pipes in use {in_use} within the budget {}:\n{m}",
        plan.pipes
    );
    // Every one of them still moves: those without a pipe copy.
    for c in &mut conns {
        assert!(download(c, 2 << 20).await >= 2 << 20, "a download stalled");
    }
    let m = scrape(admin).await;
    assert_eq!(sum(&m, "halfguard_accept_errors_total", &[]), 0.0);
    assert_eq!(sum(&m, "halfguard_backend_connect_errors_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_fits_a_raised_max_conns_to_the_limit_too() {
    const NOFILE: u64 = 256;
    let b = backend(Backend::Echo).await;
    let admin_port = free_port();
    let body = |max: u32| format!("{OPEN_LIMITS}max_conns = {max}\n");
    let (cfg, port) = temp_config(
        b.addr,
        &format!("bind = \"127.0.0.1:{admin_port}\""),
        &body(50),
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Reap(start(limited(NOFILE, &format!("run -c {}", cfg.display()))));
    let all = |m: &str| sum(m, "halfguard_connections_limit", &["state=\"all\""]);
    assert_eq!(all(&scrape(admin).await), 50.0, "50 fits as configured");

    // Raised past what the limit holds: the reload lowers it, and says so once.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("max_conns = 50", "max_conns = 1000")).unwrap();
    let eff = Budget::plan(&halfguard::config::load(&cfg).unwrap(), NOFILE)
        .effective("cli")
        .unwrap();
    assert!(eff < 1000);
    for _ in 0..2 {
        let (status, _) = http(admin, "POST", "/reload").await;
        assert_eq!(status, 200);
        let m = scrape(admin).await;
        assert_eq!(all(&m), f64::from(eff), "{m}");
        assert_eq!(
            sum(&m, "halfguard_connections_limit_configured", &[]),
            1000.0
        );
    }
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"still").await, b"still");
    tokio::time::sleep(ms(200)).await;
    let said = logs().matches("limits.max_conns 1000 lowered to").count();
    assert_eq!(said, 1, "{}", logs());
    drop(child);
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gives_its_pipe_back() {
    let b = backend(Backend::Flood).await;
    let (_child, addr, admin, _plan) = bulk_proxy(b.addr, 1024, 100).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"go").await.unwrap();
    assert!(download(&mut c, 4 << 20).await >= 4 << 20);
    let in_use = |m: &str| sum(m, "halfguard_splice_pipes", &["state=\"in_use\""]);
    assert!(in_use(&scrape(admin).await) >= 1.0, "bulk took a pipe");
    // A reader that keeps the pipe waiting over a second is slow: once what the pipe holds
    // is delivered, the pipe goes back and the direction copies through its small buffer.
    tokio::time::sleep(ms(1500)).await;
    assert!(download(&mut c, 8 << 20).await >= 8 << 20);
    let m = scrape(admin).await;
    assert_eq!(in_use(&m), 0.0, "the slow direction kept its pipe:\n{m}");
    // The bytes keep coming, without a pipe.
    assert!(download(&mut c, 4 << 20).await >= 4 << 20);
    assert_eq!(in_use(&scrape(admin).await), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_listener_draining_beside_the_new_one_stays_within_the_limit() {
    // The held connections and the backend's side of them live in this process.
    let _ = halfguard::sockopt::raise_nofile();
    const NOFILE: u64 = 256;
    const HELD: usize = 70;
    let b = backend(Backend::Echo).await;
    let admin_port = free_port();
    let (cfg, port) = temp_config(
        b.addr,
        &format!("bind = \"127.0.0.1:{admin_port}\""),
        &format!("{OPEN_LIMITS}max_conns = 80\n[tcp]\nsplice = false\n"),
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let loaded = halfguard::config::load(&cfg).unwrap();
    assert_eq!(
        Budget::plan(&loaded, NOFILE).effective("cli"),
        Some(80),
        "80 fits as configured"
    );
    // Both listeners' worth would not: the test is about the old one's share.
    assert!(Budget::plan(&loaded, NOFILE).reserve + 4 * HELD as u64 > NOFILE);
    let child = Reap(start(limited(NOFILE, &format!("run -c {}", cfg.display()))));
    let all = |m: &str| {
        sum(
            m,
            "halfguard_connections_limit",
            &["listener=\"cli\"", "state=\"all\""],
        )
    };

    let mut old = Vec::new();
    for _ in 0..HELD {
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"old").await, b"old");
        old.push(c);
    }
    // The listener moves; its 70 connections drain beside the new socket.
    let moved = free_port();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{moved}")),
    )
    .unwrap();
    let (status, body) = http(admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let beside = Budget::plan_beside(&loaded, NOFILE, HELD as u64)
        .effective("cli")
        .unwrap();
    assert!(beside < 80);
    assert_eq!(all(&scrape(admin).await), f64::from(beside));

    // As many again on the new socket: the caps meet them, not EMFILE.
    let new_addr: SocketAddr = format!("127.0.0.1:{moved}").parse().unwrap();
    let mut new = Vec::new();
    let mut served = 0;
    for _ in 0..HELD {
        let Ok(mut c) = TcpStream::connect(new_addr).await else {
            continue;
        };
        let echoed = async {
            c.write_all(b"n").await.ok()?;
            let mut back = [0u8; 1];
            c.read_exact(&mut back).await.ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(ms(2000), echoed).await {
            served += 1;
        }
        new.push(c);
    }
    let m = scrape(admin).await;
    let accept_errors = sum(&m, "halfguard_accept_errors_total", &[]);
    let connect_errors = sum(&m, "halfguard_backend_connect_errors_total", &[]);
    let unavailable = sum(
        &m,
        "halfguard_connections_closed_total",
        &["end=\"backend_unavailable\""],
    );
    eprintln!("cap beside the drain {beside}, served {served} of {HELD}");
    assert_eq!(accept_errors, 0.0, "accept ran out of descriptors:\n{m}");
    assert_eq!(connect_errors, 0.0, "a backend connect failed:\n{m}");
    assert_eq!(unavailable, 0.0, "a client lost its backend:\n{m}");
    assert!(served >= 1, "the new socket serves");
    for c in &mut old {
        assert_eq!(
            roundtrip(c, b"o").await,
            b"o",
            "a draining connection was lost"
        );
    }

    // The old connections end: the cap grows back to what is configured.
    drop(old);
    drop(new);
    let end = Instant::now() + ms(5000);
    loop {
        let m = scrape(admin).await;
        if all(&m) == 80.0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the cap grows back once the drain is over:\n{m}"
        );
        tokio::time::sleep(ms(100)).await;
    }
    drop(child);
}
