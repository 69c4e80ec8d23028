//! `halfguard top`: `--once` against a live halfguard under a silent flood and against a dead
//! address, the admin token, and the live view driven for real in tmux (keys in, screen
//! out, the terminal given back).

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cli::{Reap, free_port, start, temp_config};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_halfguard");

/// Per-source caps that a silent flood from one address runs into, and a first-byte clock
/// long enough that the flood is still there when `top` looks.
const FLOOD_LIMITS: &str = "[limits]\nmax_half_open_per_source = 5\nmax_conns_per_source = 0\n\
     conn_rate_per_source = 0\ngrace = \"100ms\"\n[timeouts]\nfirst_byte = \"60s\"\nidle = \"60s\"\n";

/// A halfguard started from a file with its admin endpoint on loopback.
struct Live {
    _child: Reap,
    cfg: crate::support::TempFile,
    addr: SocketAddr,
    admin: SocketAddr,
}

fn live_halfguard(backend: SocketAddr) -> Live {
    let admin_port = free_port();
    let (cfg, port) = temp_config(
        backend,
        &format!("bind = \"127.0.0.1:{admin_port}\""),
        FLOOD_LIMITS,
    );
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-c"]).arg(&cfg);
    let child = Reap(start(cmd));
    Live {
        _child: child,
        cfg,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        admin: format!("127.0.0.1:{admin_port}").parse().unwrap(),
    }
}

/// Silent connections from 127.0.0.2 until the proxy refuses some for the source's
/// half-open cap (bounded: 60 connections, 10 s); returns them, held open.
async fn silent_flood(h: &Live) -> Vec<TcpStream> {
    let mut held = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    for _ in 0..60 {
        if let Ok(s) = connect_from("127.0.0.2", h.addr).await {
            held.push(s);
        }
        let metrics = http(h.admin, "GET", "/metrics").await.1;
        let refused = metrics.lines().any(|l| {
            l.starts_with("halfguard_connections_rejected_total{")
                && l.contains("reason=\"source_half_open\"")
                && !l.ends_with(" 0")
        });
        if refused || Instant::now() > end {
            break;
        }
        tokio::time::sleep(ms(50)).await;
    }
    // The connections opened within the grace are counted half-open at once but judged only
    // after it: let it pass, so the listener's count and the source's agree.
    tokio::time::sleep(ms(400)).await;
    held
}

/// `top` with `args`, its output once it exits (bounded by `--once`'s own timeouts).
async fn top(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("top")
        .args(args)
        .env_remove("HALFGUARD_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run halfguard top"))
        .await
        .unwrap()
}

/// The value in `column` of the sources row for `source`, in `top`'s text.
fn cell(text: &str, source: &str, column: &str) -> Option<String> {
    let mut header: Option<Vec<&str>> = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"SOURCE") {
            header = Some(words);
        } else if words.first() == Some(&source)
            && let Some(h) = &header
        {
            let i = h.iter().position(|c| *c == column)?;
            return words.get(i).map(|s| s.to_string());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_names_the_flooded_source_its_half_open_count_and_the_refusal_reason() {
    let b = backend(Backend::Echo).await;
    let h = live_halfguard(b.addr);
    let _flood = silent_flood(&h).await;

    // No --admin: the endpoint comes from the config's [admin] bind.
    let cfg = h.cfg.to_string_lossy().to_string();
    let out = top(&["--once", "--interval", "300ms", "-c", &cfg], &[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains('\x1b'),
        "--once prints no terminal control: {text:?}"
    );
    assert!(text.contains("listener cli"), "{text}");
    assert!(
        text.contains("source_half_open"),
        "the refusal reason: {text}"
    );
    // The source and its half-open count, as /sources has them.
    let (_, body) = http(h.admin, "GET", "/sources?by=half_open").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let want = v["listeners"][0]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "127.0.0.2")
        .map(|s| s["half_open"].to_string())
        .expect("the flooding source is in /sources");
    assert_ne!(want, "0");
    assert_eq!(
        cell(&text, "127.0.0.2", "HALF_OPEN").as_deref(),
        Some(want.as_str()),
        "{text}"
    );
    assert!(
        text.contains("half_open") && text.contains(&format!("{want} / ")),
        "the half-open bar against its cap: {text}"
    );
}

#[tokio::test]
async fn once_against_a_dead_address_says_so_and_exits_non_zero() {
    let port = free_port();
    let admin = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let out = top(&["--once", "--admin", &admin], &[]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot reach the admin endpoint at {admin}"))
            && err.contains("refused"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "gave up in {:?}",
        t0.elapsed()
    );

    let out = top(&["--once", "--admin", "https://127.0.0.1:1"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("https is not supported"));
}

/// An admin endpoint that serves `/metrics` to anyone and `/sources` only with the token,
/// as halfguard's does when an admin token is configured. Serves until dropped.
async fn token_endpoint(token: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let req = String::from_utf8_lossy(&req).to_string();
            let authorized = req
                .lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {token}")));
            let (status, body) = if req.starts_with("GET /metrics ") {
                (
                    "200 OK",
                    "halfguard_connections{listener=\"tok\",state=\"open\"} 1\n".to_string(),
                )
            } else if !authorized {
                ("401 Unauthorized", "admin token required\n".to_string())
            } else {
                (
                    "200 OK",
                    r#"{"listeners":[{"listener":"tok","sources":[{"source":"192.0.2.9","conns":1}]}]}"#
                        .to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_sent_and_a_missing_one_is_named() {
    let (addr, task) = token_endpoint("s3cret").await;
    let admin = addr.to_string();
    let base = ["--once", "--interval", "100ms", "--admin", admin.as_str()];

    let out = top(&base, &[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "metrics alone still show: {text}");
    assert!(text.contains("listener tok"), "{text}");
    assert!(
        text.contains("/sources: 401 Unauthorized")
            && text.contains("--token or HALFGUARD_ADMIN_TOKEN"),
        "{text}"
    );

    let out = top(&base, &[("HALFGUARD_ADMIN_TOKEN", "s3cret")]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("192.0.2.9"), "{text}");

    let mut args = base.to_vec();
    args.extend(["--token", "wrong"]);
    let out = top(&args, &[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/sources: 401 Unauthorized: the admin token was refused"),
        "{text}"
    );
    task.abort();
}

/// A private tmux server (its own socket), killed with everything in it when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn available() -> bool {
        Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn new() -> Tmux {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Tmux {
            socket: format!("halfguard-it-{}-{n}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The visible screen, text only (`escapes`: with colours and attributes).
    fn screen(&self, escapes: bool) -> String {
        let mut args = vec!["capture-pane", "-p", "-t", "top"];
        if escapes {
            args.push("-e");
        }
        self.run(&args)
    }

    fn var(&self, name: &str) -> String {
        self.run(&["display-message", "-p", "-t", "top", name])
            .trim()
            .to_string()
    }

    /// Waits (at most 15 s) for a screen that `ok` accepts, and returns it.
    async fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.screen(false);
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < end, "no {what} on screen:\n{s}");
            tokio::time::sleep(ms(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The shell line tmux runs: `top`, then what the terminal is like after it.
/// Each run tags its lines, so one run's output is not taken for the next's.
fn shell_line(admin: SocketAddr, env: &str, tag: &str) -> String {
    format!(
        "{env} {BIN} top --admin {admin} --interval 300ms; echo \"{tag} exited $?\"; \
         echo \"{tag} modes\" $(stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo); \
         exec sleep 120"
    )
}

/// The source rows in screen order.
fn source_rows(screen: &str) -> Vec<String> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("SOURCE"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("127.0.0."))
        .map(str::to_string)
        .collect()
}

/// After `top` ended: it said so with exit 0, and the terminal is back in cooked mode with
/// echo, on the main screen, with a cursor.
async fn assert_restored(t: &Tmux, tag: &str, code: i32) {
    let modes_line = format!("{tag} modes");
    let s = t.wait_for("exit line", |s| s.contains(&modes_line)).await;
    assert!(s.contains(&format!("{tag} exited {code}")), "{s}");
    let modes: Vec<&str> = s
        .lines()
        .find(|l| l.contains(&modes_line))
        .unwrap()
        .split_whitespace()
        .collect();
    assert!(
        modes.contains(&"icanon") && modes.contains(&"echo"),
        "raw mode left on: {modes:?}"
    );
    assert_eq!(
        t.var("#{alternate_on}"),
        "0",
        "still on the alternate screen"
    );
    assert_eq!(t.var("#{cursor_flag}"), "1", "cursor left hidden");
}

/// Whether `s` (a capture with escapes) sets any foreground or background colour.
fn has_colour(s: &str) -> bool {
    s.split("\x1b[").skip(1).any(|seq| {
        let Some(end) = seq.find(|c: char| c.is_ascii_alphabetic()) else {
            return false;
        };
        seq[end..].starts_with('m')
            && seq[..end].split(';').any(|p| {
                p.parse::<u32>()
                    .is_ok_and(|n| (30..=48).contains(&n) && n != 39 || (90..=107).contains(&n))
            })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_in_tmux_shows_the_flood_sorts_and_quits_restoring_the_terminal() {
    if !Tmux::available() {
        eprintln!("SKIPPED: tmux is not installed (CI installs it)");
        return;
    }
    let b = backend(Backend::Echo).await;
    let h = live_halfguard(b.addr);
    let _flood = silent_flood(&h).await;
    // A busier, well-behaved source: more connections than the flood holds, none silent.
    let mut busy = Vec::new();
    for _ in 0..64 {
        let mut s = connect_from("127.0.0.3", h.addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"x").await, b"x");
        busy.push(s);
    }

    let t = Tmux::new();
    t.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "80",
        "-y",
        "24",
        &shell_line(h.admin, "env", "first"),
    ]);
    let s = t
        .wait_for("both sources", |s| {
            s.contains("127.0.0.2") && s.contains("127.0.0.3")
        })
        .await;
    assert_eq!(
        t.var("#{alternate_on}"),
        "1",
        "the view uses the alternate screen"
    );
    assert!(s.contains("listener cli"), "{s}");
    assert!(s.contains("by conns"), "{s}");
    assert_eq!(source_rows(&s)[0], "127.0.0.3", "by connections:\n{s}");
    assert!(
        has_colour(&t.screen(true)),
        "colour when the terminal has it"
    );

    // `s`: the next column, half-open, puts the silent flood first.
    t.run(&["send-keys", "-t", "top", "s"]);
    let s = t
        .wait_for("sort by half_open", |s| {
            s.contains("by half_open") && source_rows(s).first().is_some_and(|r| r == "127.0.0.2")
        })
        .await;
    assert!(s.contains("HALF_OPEN"), "{s}");

    t.run(&["send-keys", "-t", "top", "q"]);
    assert_restored(&t, "first", 0).await;

    // Again without colour, ended by Ctrl-C.
    t.run(&[
        "respawn-pane",
        "-k",
        "-t",
        "top",
        &shell_line(h.admin, "env NO_COLOR=1", "second"),
    ]);
    let s = t
        .wait_for("the flooded source", |s| s.contains("127.0.0.2"))
        .await;
    assert!(s.contains("#"), "ASCII bars without colour:\n{s}");
    assert!(!has_colour(&t.screen(true)), "NO_COLOR: no colour");
    t.run(&["send-keys", "-t", "top", "C-c"]);
    assert_restored(&t, "second", 0).await;

    // A panic (a debug build's test seam) gives the terminal back too, and says so.
    t.run(&[
        "respawn-pane",
        "-k",
        "-t",
        "top",
        &shell_line(
            h.admin,
            "env RUST_BACKTRACE=0 HALFGUARD_TOP_PANIC_KEY=!",
            "third",
        ),
    ]);
    t.wait_for("the flooded source", |s| s.contains("127.0.0.2"))
        .await;
    t.run(&["send-keys", "-t", "top", "!"]);
    assert_restored(&t, "third", 101).await;
    assert!(
        t.screen(false)
            .contains("HALFGUARD_TOP_PANIC_KEY ! pressed")
    );
}

/// The PID of `top` in the pane: the pane's process when it is `top` (`exec`), else the
/// shell's child.
fn top_pid(t: &Tmux) -> String {
    let pane = t.var("#{pane_pid}");
    if std::fs::read_to_string(format!("/proc/{pane}/comm")).is_ok_and(|c| c.trim() == "halfguard")
    {
        return pane;
    }
    let children = std::fs::read_to_string(format!("/proc/{pane}/task/{pane}/children")).unwrap();
    children
        .split_whitespace()
        .next()
        .expect("top runs under the pane's shell")
        .to_string()
}

/// Whether `pid` has ended: gone, or a zombie (nothing reaps orphans in some containers).
fn ended(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                == Some("Z")
        }
    }
}

/// Waits for `pid` to end, failing after `within` with how much CPU it was using.
async fn assert_ends(pid: &str, within: Duration, what: &str) {
    let t0 = Instant::now();
    while !ended(pid) {
        if t0.elapsed() > within {
            let ps = Command::new("ps")
                .args(["-o", "pid,stat,pcpu,comm", "-p", pid])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            let _ = Command::new("kill").args(["-KILL", pid]).status();
            panic!("top still runs {within:?} after {what}:\n{ps}");
        }
        tokio::time::sleep(ms(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_ends_when_its_terminal_is_closed() {
    if !Tmux::available() {
        eprintln!("SKIPPED: tmux is not installed (CI installs it)");
        return;
    }
    let b = backend(Backend::Echo).await;
    let h = live_halfguard(b.addr);
    let top = format!("{BIN} top --admin {} --interval 300ms", h.admin);
    // Under a shell, as from a prompt: the closing terminal hangs up the shell (the session
    // leader), and `top` sees only its input end. Then as the pane's own process (`exec`),
    // which the hangup reaches as SIGHUP too.
    for (how, line) in [
        ("under a shell", format!("{top}; echo exited")),
        ("as the session leader", format!("exec {top}")),
    ] {
        let t = Tmux::new();
        t.run(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "80",
            "-y",
            "24",
            &line,
        ]);
        t.wait_for("the listener", |s| s.contains("listener cli"))
            .await;
        let pid = top_pid(&t);
        t.run(&["kill-session", "-t", "top"]);
        assert_ends(
            &pid,
            Duration::from_secs(2),
            &format!("its tmux session was killed ({how})"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sigint_and_sighup_end_the_live_view_and_give_the_terminal_back() {
    if !Tmux::available() {
        eprintln!("SKIPPED: tmux is not installed (CI installs it)");
        return;
    }
    let b = backend(Backend::Echo).await;
    let h = live_halfguard(b.addr);
    let t = Tmux::new();
    // `kill`, a supervisor, or a login shell passing on its hangup while the terminal stays.
    for (i, sig) in ["TERM", "INT", "HUP"].into_iter().enumerate() {
        let line = shell_line(h.admin, "env", sig);
        if i == 0 {
            t.run(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "80",
                "-y",
                "24",
                &line,
            ]);
        } else {
            t.run(&["respawn-pane", "-k", "-t", "top", &line]);
        }
        t.wait_for("the listener", |s| s.contains("listener cli"))
            .await;
        let pid = top_pid(&t);
        assert!(
            Command::new("kill")
                .args([&format!("-{sig}"), pid.as_str()])
                .status()
                .unwrap()
                .success()
        );
        assert_ends(&pid, Duration::from_secs(2), &format!("SIG{sig}")).await;
        assert_restored(&t, sig, 0).await;
    }
}
