//! The `halfguard` binary: `check`, `--version`, `run` with a graceful SIGTERM, and an accept
//! loop that survives running out of descriptors.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_halfguard");

fn fixture(p: &str) -> String {
    format!("{}/tests/fixtures/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_prints_the_effective_config_and_exits_0() {
    let out = Command::new(BIN)
        .args(["check", "-c", &fixture("valid/minimal.toml")])
        .env("HALFGUARD__TIMEOUTS__FIRST_BYTE", "2s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("listener \"web\" on 127.0.0.1:17080"),
        "{stdout}"
    );
    assert!(
        stdout.contains("first_byte 2s"),
        "env override shown: {stdout}"
    );
}

#[test]
fn check_warns_of_a_server_first_port_behind_a_client_first_listener() {
    let out = Command::new(BIN)
        .args(["check", "-c", &fixture("valid/server_first_ports.toml")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let warned: Vec<&str> = (stdout.lines())
        .filter(|l| l.starts_with("warning:") && l.contains("server-first"))
        .collect();
    // "mail" is server-first already, "imaps" is on IMAP's TLS port (the client speaks first).
    assert_eq!(warned.len(), 1, "{stdout}");
    for want in [
        "listener \"db\"",
        "\"127.0.0.1:3306\"",
        "MySQL/MariaDB",
        "set protocol = \"server-first\"",
    ] {
        assert!(warned[0].contains(want), "{want:?} not in: {}", warned[0]);
    }
}

#[test]
fn check_into_a_pipe_closed_early_exits_quietly() {
    // `halfguard check | head -1`, with the reader gone before the first write: every write
    // meets a closed pipe.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(["check", "-c", &fixture("valid/minimal.toml")])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn check_prints_a_rate_that_is_off_as_none() {
    let check = |rate: &str| {
        let out = Command::new(BIN)
            .args(["check", "-c", &fixture("valid/minimal.toml")])
            .env("HALFGUARD__LIMITS__CONN_RATE_PER_SOURCE", rate)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let off = check("0");
    assert!(off.contains(", rate none;"), "{off}");
    assert!(!off.contains("none/s") && !off.contains("burst"), "{off}");
    let on = check("7");
    assert!(on.contains(", rate 7/s burst "), "{on}");
}

#[test]
fn check_names_file_and_key_and_exits_2() {
    let f = fixture("invalid/unknown_key.toml");
    let out = Command::new(BIN)
        .args(["check", "-c", &f])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&f) && stderr.contains("limits.max_conn"),
        "{stderr}"
    );

    let out = Command::new(BIN)
        .args(["check", "-c", "/nonexistent/halfguard.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/halfguard.toml"));
}

#[test]
fn version_is_printed() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("halfguard "));
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config file in a fresh temp dir, with a listener on a free port toward `backend`;
/// `admin` is the body of the `[admin]` table. The dir goes when the file does.
pub(crate) fn temp_config(
    backend: std::net::SocketAddr,
    admin: &str,
    extra: &str,
) -> (TempFile, u16) {
    let port = free_port();
    let file = TempDir::file(
        "cli",
        "halfguard.toml",
        &format!(
            "[[listeners]]\nname = \"cli\"\nbind = \"127.0.0.1:{port}\"\nbackends = [\"{backend}\"]\n[admin]\n{admin}\n{extra}\n"
        ),
    );
    (file, port)
}

/// A started halfguard, killed however the test ends, so a failed assertion leaves no
/// process behind.
pub(crate) struct Reap(pub Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `halfguard run -c cfg`, started and listening, killed however the test ends.
pub(crate) fn run_config(cfg: &std::path::Path) -> Reap {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-c"]).arg(cfg);
    Reap(start(cmd))
}

/// Starts `cmd` and waits until its log says it listens. If it exits first, the test fails
/// with what it said, so the real cause (a bind, a mount, a permission) shows.
pub(crate) fn start(mut cmd: Command) -> Child {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn halfguard");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut said = String::new();
    let mut listening = false;
    for line in lines.by_ref() {
        let line = line.unwrap_or_default();
        said.push_str(&line);
        said.push('\n');
        if line.contains("listening") {
            listening = true;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "halfguard did not start:\n{said}"
        );
    }
    if !listening {
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        panic!("halfguard exited before listening ({status}):\n{said}");
    }
    // Keep draining stderr so the child never blocks on a full pipe; keep what it says.
    let log = std::sync::Arc::new(std::sync::Mutex::new(said));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(mut s) = sink.lock() {
                s.push_str(&line);
                s.push('\n');
            }
        }
    });
    LOGS.with(|l| *l.borrow_mut() = Some(log));
    child
}

thread_local! {
    static LOGS: std::cell::RefCell<Option<std::sync::Arc<std::sync::Mutex<String>>>> =
        const { std::cell::RefCell::new(None) };
}

/// What the last child started on this thread logged so far.
pub(crate) fn logs() -> String {
    LOGS.with(|l| {
        l.borrow()
            .as_ref()
            .and_then(|m| m.lock().ok().map(|s| s.clone()))
            .unwrap_or_default()
    })
}

fn sigterm(child: &Child) {
    let rc = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
}

pub(crate) fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_then_drains_then_exits_0() {
    let b = backend(Backend::Echo).await;
    let admin_port = free_port();
    let (cfg, port) = temp_config(
        b.addr,
        &format!("bind = \"127.0.0.1:{admin_port}\"\ndrain_delay = \"700ms\""),
        "[timeouts]\ndrain = \"1500ms\"\n",
    );
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-c"]).arg(&cfg);
    let mut child = start(cmd);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(http(admin, "GET", "/readyz").await.0, 200);

    // One connection finishes its exchange during the drain; one never does.
    let mut finishing = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut finishing, b"a").await, b"a");
    let mut lingering = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut lingering, b"b").await, b"b");

    // SIGHUP reloads (the file is unchanged) and kills nothing.
    let rc = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    tokio::time::sleep(ms(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop halfguard"
    );
    assert_eq!(roundtrip(&mut lingering, b"b").await, b"b");
    let metrics = http(admin, "GET", "/metrics").await.1;
    assert!(
        metrics.contains("halfguard_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );

    let t0 = Instant::now();
    sigterm(&child);
    tokio::time::sleep(ms(200)).await;
    // First not ready, but still accepting, so load balancers can catch up...
    assert_eq!(http(admin, "GET", "/readyz").await.0, 503);
    let mut late = TcpStream::connect(addr)
        .await
        .expect("still accepting during drain_delay");
    assert_eq!(roundtrip(&mut late, b"late").await, b"late");
    drop(late);
    // ...then no longer accepting...
    tokio::time::sleep(ms(800)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener should be closed"
    );
    // ...but open connections still flow and can close cleanly.
    assert_eq!(roundtrip(&mut finishing, b"c").await, b"c");
    finishing.shutdown().await.unwrap();
    assert_eq!(read_end(&mut finishing, ms(2000)).await, Seen::Fin(vec![]));
    // The one left open is aborted with RST when the drain period ends, then exit 0.
    expect_reset(&mut lingering, Duration::from_secs(5)).await;
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let took = t0.elapsed();
    assert!(
        took >= ms(2100) && took < ms(5000),
        "delay + drain took {took:?}"
    );
}

/// True once `pid` catches signal `sig` (its bit in `SigCgt` of `/proc/<pid>/status`).
fn catches(pid: u32, sig: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("SigCgt:"))?.trim();
            u64::from_str_radix(hex, 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_the_server_binds_is_a_reload_not_the_end() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::ExitStatusExt;
    const SIGHUP: u32 = 1;
    const SIGTERM: u32 = 15;
    let b = backend(Backend::Echo).await;
    let (cfg, port) = temp_config(b.addr, "bind = \"off\"", "");
    // halfguard's stderr is a socket we filled: its first log line, the summary `bind`
    // prints once everything bound, blocks until we read. That holds it inside `bind`
    // for as long as the test needs, whatever the machine's speed.
    let (mut full, mut reader) = UnixStream::pair().unwrap();
    full.set_nonblocking(true).unwrap();
    while full.write(&[b'.'; 4096]).is_ok() {}
    while full.write(b".").is_ok() {}
    full.set_nonblocking(false).unwrap();
    let child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stderr(Stdio::from(std::os::fd::OwnedFd::from(full)))
        .spawn()
        .unwrap();
    let mut child = Reap(child);
    let pid = child.0.id();
    // It catches SIGTERM from just before `bind`: from there on it is binding, or blocked
    // in its first log line inside it.
    let end = Instant::now() + Duration::from_secs(10);
    while !catches(pid, SIGTERM) {
        assert!(Instant::now() < end, "halfguard never got to bind");
        assert!(child.0.try_wait().unwrap().is_none(), "halfguard exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child.0, "HUP");
    std::thread::sleep(Duration::from_millis(200));
    if let Some(status) = child.0.try_wait().unwrap() {
        panic!(
            "a SIGHUP during bind ended halfguard ({status}, signal {:?})",
            status.signal()
        );
    }
    assert!(catches(pid, SIGHUP));

    // Let it log: it starts, then reloads for the SIGHUP it caught while binding.
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = said.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let log = || said.lock().map(|s| s.clone()).unwrap_or_default();
    let end = Instant::now() + Duration::from_secs(10);
    while !log().contains("config reloaded") {
        assert!(
            Instant::now() < end,
            "no reload after the SIGHUP:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(log().contains("SIGHUP received: reloading"), "{}", log());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"up").await, b"up");
    assert!(child.0.try_wait().unwrap().is_none());
}

#[test]
fn run_with_a_bad_config_exits_2() {
    let out = Command::new(BIN)
        .args(["run", "-c", &fixture("invalid/zero_clock.toml")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let mut s = String::new();
    out.stderr.as_slice().read_to_string(&mut s).unwrap();
    assert!(s.contains("timeouts.half_closed"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loop_survives_running_out_of_descriptors() {
    let b = backend(Backend::Echo).await;
    let (cfg, port) = temp_config(
        b.addr,
        "bind = \"off\"",
        "[limits]\nmax_conns_per_source = 0\nmax_half_open_per_source = 0\nconn_rate_per_source = 0\n[timeouts]\ndrain = \"500ms\"\n",
    );
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("SKIP: needs prlimit (util-linux) to lower a running process's limit");
        return;
    }
    // halfguard fits its caps to the limit it starts with; a limit lowered under it (here
    // to 48 descriptors in all, which a few dozen connections exhaust) is what is left to
    // run out of.
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!(
        "ulimit -n 1024 && exec {BIN} run -c {}",
        cfg.display()
    ));
    let mut child = start(cmd);
    let lowered = Command::new("prlimit")
        .args(["--pid", &child.id().to_string(), "--nofile=48:48"])
        .status()
        .unwrap();
    assert!(lowered.success(), "prlimit --pid");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Hold far more connections than the proxy has descriptors for.
    let mut flood = Vec::new();
    for _ in 0..80 {
        if let Ok(Ok(c)) = tokio::time::timeout(ms(500), TcpStream::connect(addr)).await {
            flood.push(c);
        }
    }
    tokio::time::sleep(ms(1500)).await;
    assert!(
        logs().contains("accept failed"),
        "EMFILE was counted and summarised: {}",
        logs()
    );
    // Still alive, and once descriptors are free it serves again.
    assert!(child.try_wait().unwrap().is_none(), "halfguard died");
    for c in flood.drain(..) {
        rst(c);
    }
    tokio::time::sleep(ms(1500)).await;
    let mut c = tokio::time::timeout(ms(3000), TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .unwrap();
    let back = tokio::time::timeout(ms(3000), roundtrip(&mut c, b"alive"))
        .await
        .expect("served after the flood");
    assert_eq!(back, b"alive");
    sigterm(&child);
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(40)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

/// `[runtime] per_worker`: each worker thread has its own event loop and accepts on the
/// listener itself; connections are served, `check` and the gauge say so, and SIGTERM
/// drains the connections every thread holds and exits 0.
#[tokio::test]
async fn per_worker_runtimes_each_accept_serve_and_drain() {
    let b = backend(Backend::Echo).await;
    let admin_port = free_port();
    let (cfg, port) = temp_config(
        b.addr,
        &format!("bind = \"127.0.0.1:{admin_port}\""),
        "[runtime]\nworkers = 3\nper_worker = true\n[timeouts]\ndrain = \"2s\"\n",
    );
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-c"]).arg(&cfg);
    let child = Reap(start(cmd));
    let pid = child.0.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = Vec::new();
    for i in 0..40u32 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let msg = format!("hello {i}");
        assert_eq!(roundtrip(&mut c, msg.as_bytes()).await, msg.as_bytes());
        held.push(c);
    }
    // The two other workers are threads of their own, each with its event loop.
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    let workers = names
        .iter()
        .filter(|n| n.starts_with("halfguard-worke"))
        .count();
    assert_eq!(workers, 2, "threads: {names:?}");
    // Each worker listens on a socket of its own in one SO_REUSEPORT group, so a new
    // connection wakes one thread, not all three.
    let listening = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .unwrap()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&format!(":{port:04X}")) && f[3] == "0A"
        })
        .count();
    assert_eq!(listening, 3, "listening sockets on port {port}");
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.lines().any(|l| l == "halfguard_runtime_workers 3"),
        "{body}"
    );
    // Idle a second after their exchange, they park, each in its own thread's lot...
    let want = "halfguard_parked_connections{listener=\"cli\",kind=\"idle\"} 40";
    let mut parked = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, body) = http(admin, "GET", "/metrics").await;
        if body.lines().any(|l| l == want) {
            parked = true;
            break;
        }
    }
    assert!(parked, "no `{want}`");
    // ...and every one wakes and still works, whichever thread accepted it.
    for (i, c) in held.iter_mut().enumerate() {
        let msg = format!("again {i}");
        assert_eq!(roundtrip(c, msg.as_bytes()).await, msg.as_bytes());
    }
    let mut child = child;
    sigterm(&child.0);
    let code =
        tokio::task::spawn_blocking(move || wait_exit(&mut child.0, Duration::from_secs(40)))
            .await
            .unwrap();
    assert_eq!(code, Some(0));
    drop(held);

    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "runtime: 3 worker threads, each with its own event loop and listening socket"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn runtime_workers_sets_the_worker_threads_and_check_reports_them() {
    let b = backend(Backend::Echo).await;
    for (workers, env) in [("3", None), ("0", Some("1"))] {
        let admin_port = free_port();
        let (cfg, port) = temp_config(
            b.addr,
            &format!("bind = \"127.0.0.1:{admin_port}\""),
            &format!("[runtime]\nworkers = {workers}\n"),
        );
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "-c"]).arg(&cfg);
        if let Some(n) = env {
            cmd.env("HALFGUARD__RUNTIME__WORKERS", n);
        }
        let child = Reap(start(cmd));
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"hi").await, b"hi");
        let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let (status, body) = http(admin, "GET", "/metrics").await;
        drop(child);
        assert_eq!(status, 200);
        let want = format!("halfguard_runtime_workers {}", env.unwrap_or(workers));
        assert!(
            body.lines().any(|l| l == want),
            "workers = {workers}, env {env:?}: no `{want}` in\n{body}"
        );

        let out = Command::new(BIN)
            .args(["check", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let want = if workers == "3" {
            "runtime: 3 worker threads"
        } else {
            "runtime: one worker thread per usable CPU"
        };
        assert!(text.contains(want), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_aborts_the_drain_and_exits_130() {
    let b = backend(Backend::Echo).await;
    let (cfg, port) = temp_config(b.addr, "bind = \"off\"", "[timeouts]\ndrain = \"30s\"\n");
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-c"]).arg(&cfg);
    let mut child = Reap(start(cmd));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut open = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut open, b"x").await, b"x");

    // The first Ctrl-C drains, and says for how long...
    signal(&child.0, "INT");
    tokio::time::sleep(ms(500)).await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the first SIGINT drains"
    );
    let log = logs();
    assert!(
        log.contains("draining connections for up to 30s"),
        "the drain line says how long: {log}"
    );
    // ...the second one ends it: the connection left is aborted, and halfguard exits.
    signal(&child.0, "INT");
    expect_reset(&mut open, Duration::from_secs(5)).await;
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child.0, Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(code, Some(130), "{}", logs());
}

/// Sends `sig` ("INT", "TERM") to `child`.
pub(crate) fn signal(child: &Child, sig: &str) {
    let rc = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
}

/// A config with one listener on `bind` toward `backend`, no admin, small caps (so no
/// open-files warning adds a line).
fn small_config(bind: &str, backend: &str) -> TempFile {
    TempDir::file(
        "cli",
        "halfguard.toml",
        &format!(
            "[[listeners]]\nname = \"web\"\nbind = \"{bind}\"\nbackends = [\"{backend}\"]\n\
             [limits]\nmax_conns = 16\n[admin]\nbind = \"off\"\n"
        ),
    )
}

#[test]
fn a_port_in_use_is_one_line_and_exit_3() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = taken.local_addr().unwrap().to_string();
    let cfg = small_config(&bind, "127.0.0.1:9");
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(&format!("cannot bind {bind}")), "{stderr}");
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
}

/// `args` run in a network namespace of their own (loopback up, no route out), so a name
/// lookup fails at once and no query leaves the machine.
fn offline(args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.arg(if is_root() { "-n" } else { "-rn" })
        .args(["sh", "-c", "ip link set lo up && exec \"$@\"", "sh", BIN])
        .args(args);
    cmd
}

#[test]
fn a_backend_name_that_does_not_resolve_is_a_warning_in_check_and_one_line_in_run() {
    crate::require!("a network namespace"; Need::Tool("unshare"), Need::Tool("ip"));
    if !is_root() {
        crate::require!("a network namespace"; Need::UserNamespace);
    }
    let cfg = small_config("127.0.0.1:0", "halfguard-test.invalid:80");
    let path = cfg.to_str().unwrap();

    let out = offline(&["check", "-c", path]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "warning: pool \"web\": backend \"halfguard-test.invalid:80\" does not resolve"
        ) && stdout.trim_end().ends_with("ok"),
        "{stdout}"
    );

    let out = offline(&["run", "-c", path])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert_eq!(
        stderr.matches("halfguard-test.invalid").count(),
        1,
        "said once: {stderr}"
    );
}

#[test]
fn a_rust_log_that_would_silence_the_process_is_refused() {
    let cfg = small_config("127.0.0.1:0", "127.0.0.1:9");
    for filter in ["verbos", "halfgaurd=debug"] {
        for command in ["check", "run"] {
            let mut child = Command::new(BIN)
                .args([command, "-c"])
                .arg(&cfg)
                .env("RUST_LOG", filter)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // A `run` that accepted the filter would serve on, silently: bounded wait.
            let code = wait_exit(&mut child, Duration::from_secs(5));
            let mut stderr = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
            assert_eq!(code, Some(2), "{command} with RUST_LOG={filter}: {stderr}");
            assert!(stderr.contains("RUST_LOG"), "{command} {filter}: {stderr}");
        }
    }
}

#[test]
fn help_tells_signals_admin_environment_and_exit_codes() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "SIGHUP",
        "second SIGTERM or SIGINT",
        "127.0.0.1:9901",
        "HALFGUARD__SECTION__KEY",
        "Exit codes",
        "130",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }
}
