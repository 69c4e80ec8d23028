//! Worker threads (`[runtime] per_worker`): each accepts on a socket of its own, one that
//! stalls does not strand the connections the kernel queued for it, and a reload's `[tcp]`
//! reaches every socket.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::cli::{BIN, free_port, run_config, signal, temp_config, wait_exit};
use crate::require;
use crate::support::*;

/// A cgroup v1 freezer holding one thread, thawed and removed however the test ends.
struct Frozen {
    dir: PathBuf,
    tid: String,
}

impl Frozen {
    /// Freezes thread `tid` alone (cgroup v1 places threads, not only processes), or `None`
    /// without a writable freezer hierarchy.
    fn thread(tid: &str) -> Option<Frozen> {
        let v1 = Path::new("/sys/fs/cgroup/freezer");
        let dir = v1.join(format!("halfguard-test-{}", std::process::id()));
        if !v1.join("tasks").exists() || std::fs::create_dir(&dir).is_err() {
            return None;
        }
        let f = Frozen {
            dir,
            tid: tid.to_string(),
        };
        std::fs::write(f.dir.join("tasks"), tid).ok()?;
        std::fs::write(f.dir.join("freezer.state"), "FROZEN").ok()?;
        for _ in 0..100 {
            let state = std::fs::read_to_string(f.dir.join("freezer.state")).unwrap_or_default();
            if state.trim() == "FROZEN" {
                return Some(f);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        let parent = self.dir.parent().map(|p| p.join("tasks"));
        if let Some(parent) = parent {
            let _ = std::fs::write(parent, &self.tid);
        }
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The kernel queues a new connection on one worker's socket by its 4-tuple's hash; with
/// that worker stalled (here frozen), the others take what waits there when they go idle.
/// Without that, about half of these connections would wait for the frozen thread.
#[tokio::test]
async fn a_stalled_worker_s_queued_connections_are_served_by_the_others() {
    require!("a cgroup v1 freezer of our own"; Need::Root);
    let b = backend(Backend::Echo).await;
    let admin_port = free_port();
    let (cfg, port) = temp_config(
        b.addr,
        &format!("bind = \"127.0.0.1:{admin_port}\""),
        "[runtime]\nworkers = 2\nper_worker = true\n",
    );
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let child = run_config(&cfg);
    let pid = child.0.id();
    let worker = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            comm.starts_with("halfguard-worke")
                .then(|| t.file_name().to_string_lossy().into_owned())
        })
        .next()
        .expect("a worker thread");
    let Some(_frozen) = Frozen::thread(&worker) else {
        return skip(
            "workers::a_stalled_worker_s_queued_connections_are_served_by_the_others",
            "a writable cgroup v1 freezer hierarchy at /sys/fs/cgroup/freezer",
        );
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut stranded = 0;
    for i in 0..24u32 {
        // An idle thread looks every 100 ms: a second is a loose bound, a stranded one never
        // comes.
        let served = tokio::time::timeout(Duration::from_secs(1), async {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let msg = format!("hello {i}");
            roundtrip(&mut c, msg.as_bytes()).await == msg.as_bytes()
        })
        .await;
        if !matches!(served, Ok(true)) {
            stranded += 1;
        }
    }
    assert_eq!(
        stranded, 0,
        "connections left waiting for the frozen worker"
    );
    // The taking is counted: the operator's sign of a stalled thread.
    let (_, body) = http(admin, "GET", "/metrics").await;
    let stolen = body
        .lines()
        .find_map(|l| l.strip_prefix("halfguard_accepts_stolen_total{listener=\"cli\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(stolen.is_some_and(|n| n > 0), "stolen: {stolen:?}\n{body}");
}

/// The keepalive timers of the established connections accepted on `port`, in seconds
/// (`ss`'s `timer:(keepalive,29sec,0)`; some versions print `5.496ms` for 5.5 s, which
/// this reads as 5.5 ms: either way below a 7 s idle, far below the default 30 s).
fn keepalive_timers(port: u16) -> Vec<f64> {
    let out = Command::new("ss")
        .args([
            "-tnoH",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let t = l.split("timer:(keepalive,").nth(1)?;
            let t = t.split(',').next()?;
            let secs = if let Some(m) = t.strip_suffix("min") {
                m.parse::<f64>().ok()? * 60.0
            } else if let Some(ms) = t.strip_suffix("ms") {
                ms.parse::<f64>().ok()? / 1000.0
            } else {
                t.strip_suffix("sec")?.parse().ok()?
            };
            Some(secs)
        })
        .collect()
}

/// Each worker thread accepts on a socket of its own, and accepted sockets take their
/// keepalive from it: a reload's `[tcp]` must reach every one of them, not only the first.
#[tokio::test]
async fn a_reloaded_tcp_section_reaches_every_worker_s_listening_socket() {
    require!("reads the accepted sockets' timers"; Need::Tool("ss"));
    let b = backend(Backend::Echo).await;
    let admin_port = free_port();
    let admin = format!("bind = \"127.0.0.1:{admin_port}\"");
    let runtime = "[runtime]\nworkers = 3\nper_worker = true\n";
    let (cfg, port) = temp_config(b.addr, &admin, runtime);
    let _child = run_config(&cfg);
    let text = std::fs::read_to_string(&*cfg).unwrap();
    std::fs::write(&*cfg, format!("{text}\n[tcp]\nkeepalive_idle = \"7s\"\n")).unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let (status, body) = http(admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    // 24 connections over three sockets: each socket gets some (all on one: 3^-23).
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = Vec::new();
    for i in 0..24u32 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let msg = format!("hello {i}");
        assert_eq!(roundtrip(&mut c, msg.as_bytes()).await, msg.as_bytes());
        held.push(c);
    }
    let timers = keepalive_timers(port);
    assert_eq!(timers.len(), 24, "{timers:?}");
    assert!(
        timers.iter().all(|&t| t <= 7.0),
        "every accepted socket has the reloaded keepalive_idle (7s): {timers:?}"
    );
}

/// The worker threads' sockets set `SO_REUSEPORT`, with which a second halfguard on the
/// same address would join the first's group and take half its connections; it must still
/// be told the port is in use, and exit 3, as with one socket.
#[tokio::test]
async fn a_second_instance_on_the_same_address_is_refused_not_joined() {
    let b = backend(Backend::Echo).await;
    let runtime = "[runtime]\nworkers = 2\nper_worker = true\n";
    let (cfg, port) = temp_config(b.addr, "bind = \"off\"", runtime);
    let _first = run_config(&cfg);
    let mut second = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&*cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let code = wait_exit(&mut second, Duration::from_secs(10));
    let mut said = String::new();
    if let Some(mut e) = second.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut said);
    }
    assert_eq!(code, Some(3), "the second instance: {said}");
    assert!(said.contains("Address already in use"), "{said}");
    // The first serves on.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"still").await, b"still");
}

/// The slice each of `pid`'s threads runs with, in nanoseconds, by thread name.
fn slices(pid: u32) -> Vec<(String, i32, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let tid: i32 = t.file_name().to_string_lossy().parse().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let slice = halfguard::turn::slice_of(tid).ok()?;
            Some((comm.trim().to_string(), tid, slice))
        })
        .collect()
}

/// The kernel's default slice, when it keeps a custom one (Linux 6.12+); otherwise `None`,
/// after skipping `test` visibly.
fn custom_slices(test: &str) -> Option<u64> {
    let kernel = std::thread::spawn(|| {
        let default = halfguard::turn::slice_of(0);
        (default, halfguard::turn::ask(Duration::from_micros(100)))
    })
    .join()
    .unwrap();
    match kernel {
        (Ok(d), Ok(true)) => Some(d),
        (d, kept) => {
            let what = format!("a kernel with custom slices (Linux 6.12+): {d:?} {kept:?}");
            skip(test, &what);
            None
        }
    }
}

/// Waits up to 5 s for `ok` to hold of `pid`'s threads' slices; returns the last reading.
fn slices_until(pid: u32, ok: impl Fn(&[(String, i32, u64)]) -> bool) -> Vec<(String, i32, u64)> {
    let mut seen = slices(pid);
    for _ in 0..100 {
        if ok(&seen) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        seen = slices(pid);
    }
    seen
}

/// `[runtime] slice`: every worker thread asks the kernel for short turns as it first goes
/// idle (and, with them, yields its core before sleeping: `halfguard::turn`). The kernel
/// reports each thread's slice: the kernel's own on a worker admitting connections in a
/// burst, the default 100 µs on the main worker and each `halfguard-worker-N` once idle, the
/// configured one on a shared scheduler's workers, and the kernel's own everywhere with
/// `slice = "0s"`.
#[tokio::test]
async fn every_worker_thread_runs_with_the_configured_slice() {
    let Some(kernel_default) =
        custom_slices("workers::every_worker_thread_runs_with_the_configured_slice")
    else {
        return;
    };
    let b = backend(Backend::Echo).await;
    let run = |runtime: &str| {
        let (cfg, port) = temp_config(b.addr, "bind = \"off\"", runtime);
        (run_config(&cfg), cfg, port)
    };

    let (child, cfg, port) = run("[runtime]\nworkers = 2\nper_worker = true\n");
    let pid = child.0.id();
    // A connection served on each socket's thread at least once makes every worker busy
    // then idle again, whichever the kernel hashed it to. One that admitted 4 of them runs
    // the kernel's turns until it sleeps again 10 ms later (`keep_looking` wakes it within
    // 100 ms): hence the wait.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let workers = |s: &[(String, i32, u64)]| -> Vec<u64> {
        s.iter()
            .filter(|(comm, tid, _)| *tid as u32 == pid || comm.starts_with("halfguard-worke"))
            .map(|t| t.2)
            .collect()
    };
    // While connections keep coming (a worker admitting 4 within 10 ms, `listener::admit`
    // telling `turn`), a worker runs the kernel's turns: seen at least once in the burst.
    let mut admitting = false;
    for _ in 0..64 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"turn").await, b"turn");
        admitting |= workers(&slices(pid)).contains(&kernel_default);
    }
    assert!(
        admitting,
        "no worker switched to the kernel's turns while admitting"
    );
    let seen = slices_until(pid, |s| workers(s) == [100_000, 100_000]);
    assert_eq!(workers(&seen), [100_000, 100_000], "{seen:?}");
    drop(child);
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&*cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("; 100us turns, each worker yielding its core"),
        "{text}"
    );

    let (child, _cfg, _) = run("[runtime]\nworkers = 2\nper_worker = false\nslice = \"250us\"\n");
    let pid = child.0.id();
    let count = |s: &[(String, i32, u64)]| s.iter().filter(|t| t.2 == 250_000).count();
    let seen = slices_until(pid, |s| count(s) == 2);
    assert_eq!(count(&seen), 2, "two shared workers at 250 µs: {seen:?}");
    drop(child);

    let (child, _cfg, _) = run("[runtime]\nworkers = 2\nslice = \"0s\"\n");
    let pid = child.0.id();
    std::thread::sleep(Duration::from_millis(300));
    let seen = slices(pid);
    assert!(
        !seen.is_empty() && seen.iter().all(|t| t.2 == kernel_default),
        "the kernel's {kernel_default} ns everywhere: {seen:?}"
    );
}

/// How many times `pid`'s threads called `sched_yield` during `rounds` echoes on each of
/// `conns`, as `strace -c` counts them (attached to every thread, detached by SIGINT). The
/// connections keep exchanging while strace attaches, so none goes idle (and parks) before
/// the count starts. strace prints nothing for a call never made, so the worker's sleeps
/// (`epoll_wait`) are counted too: none would mean strace counted nothing, not that the
/// worker never yielded.
async fn yields_during(pid: u32, conns: &mut [TcpStream], rounds: usize) -> u64 {
    let strace = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-c",
            "-e",
            "trace=sched_yield,epoll_wait,epoll_pwait",
            "-p",
        ])
        .arg(pid.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strace");
    let traced = || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the tasks");
        tasks.flatten().all(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            status
                .lines()
                .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
        })
    };
    for _ in 0..1000 {
        if traced() {
            break;
        }
        exchange(conns, 1).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(traced(), "strace did not attach to every thread");
    exchange(conns, rounds).await;
    signal(&strace, "INT");
    let out = tokio::task::spawn_blocking(move || strace.wait_with_output())
        .await
        .unwrap()
        .expect("strace's summary");
    let text = String::from_utf8_lossy(&out.stderr);
    let calls = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.split_whitespace().last() == Some(name))
            .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        calls("epoll_wait") + calls("epoll_pwait") > 0,
        "strace counted no sleep of the worker: {text}"
    );
    calls("sched_yield")
}

/// `halfguard::turn`: a worker carrying a few streams (connections in their open phase,
/// counted by `conn::open`) sleeps without yielding its core, since the yield's wait would
/// land on their next events and make most of their tail; one carrying many yields before
/// it sleeps. Seen by counting the worker's `sched_yield` calls while 2, then 16, keep-alive
/// connections exchange.
#[tokio::test]
async fn a_worker_carrying_a_few_streams_sleeps_without_yielding_its_core() {
    require!("strace"; Need::Tool("strace"));
    if custom_slices("workers::a_worker_carrying_a_few_streams_sleeps_without_yielding_its_core")
        .is_none()
    {
        return;
    }
    let b = backend(Backend::Echo).await;
    let (cfg, port) = temp_config(b.addr, "bind = \"off\"", "[runtime]\nworkers = 1\n");
    let child = run_config(&cfg);
    let pid = child.0.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut conns = Vec::new();
    for _ in 0..2 {
        conns.push(TcpStream::connect(addr).await.unwrap());
    }
    exchange(&mut conns, 1).await;
    let few = yields_during(pid, &mut conns, 100).await;
    assert_eq!(few, 0, "a worker carrying 2 streams yielded its core");
    while conns.len() < 16 {
        conns.push(TcpStream::connect(addr).await.unwrap());
    }
    exchange(&mut conns, 1).await;
    let many = yields_during(pid, &mut conns, 20).await;
    assert!(
        many > 0,
        "a worker carrying 16 streams never yielded its core"
    );
}

/// `rounds` echoes on each of `conns` in turn.
async fn exchange(conns: &mut [TcpStream], rounds: usize) {
    for _ in 0..rounds {
        for c in conns.iter_mut() {
            assert_eq!(roundtrip(c, b"turn").await, b"turn");
        }
    }
}
