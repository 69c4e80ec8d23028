//! Real clients through halfguard with the shipped defaults: curl, ab and h2load against
//! nginx; psql and pgbench against PostgreSQL (with and without SSL negotiation);
//! redis-benchmark and redis-cli against redis-server; ssh, scp and port forwarding against
//! sshd; websockets, a server-sent-events stream and a long poll against a faithful in-test
//! server (no Debian package serves those). Every server is started by the test on loopback
//! and stopped by its PID. halfguard runs in-process with `config/halfguard.toml` as shipped
//! but for the listener's bind and backend and the admin endpoint, and every client comes
//! from one address, 127.0.0.1, as the clients behind a NAT or a sidecar's do: the rows a
//! proxy's per-source caps, rate and clocks must not break.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use halfguard::config::{self, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::require;
use crate::support::{L, Need, Proxy, RedisServer, TempDir, counted_echo, free_port, skip};

/// `config/halfguard.toml` as shipped, changed only where a test must: the listener binds
/// 127.0.0.1:0 and forwards to `backend`, and the admin endpoint is off (tests run side by
/// side). The listener is renamed to the helpers' [`L`], a label only. The environment's
/// `HALFGUARD__*` variables are not applied: the shipped defaults are what is tested.
fn shipped(backend: SocketAddr) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/halfguard.toml");
    let text = std::fs::read_to_string(&path).expect("read config/halfguard.toml");
    let text = replace_once(&text, "name = \"public\"", &format!("name = \"{L}\""));
    let text = replace_once(&text, "bind = \"0.0.0.0:18080\"", "bind = \"127.0.0.1:0\"");
    let text = replace_once(
        &text,
        "backends = [\"127.0.0.1:18081\"]",
        &format!("backends = [\"{backend}\"]"),
    );
    let text = replace_once(&text, "bind = \"127.0.0.1:9901\"", "bind = \"off\"");
    config::parse(&text, &path.display().to_string(), HashMap::new())
        .expect("the shipped config, with its bind, backend and admin changed, is valid")
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "config/halfguard.toml should hold `{from}` once"
    );
    text.replacen(from, to, 1)
}

/// halfguard with the shipped defaults in front of `backend`.
async fn proxy_to(backend: SocketAddr) -> Proxy {
    Proxy::start(shipped(backend)).await
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A port in 17000-19999 that was free a moment ago, for servers that must be told one.
fn server_port() -> u16 {
    for _ in 0..200 {
        let p = free_port();
        if (17000..20000).contains(&p) {
            return p;
        }
        // Outside the range: probe one inside it instead.
        let candidate = 17000 + (p % 3000);
        if std::net::TcpListener::bind(local(candidate)).is_ok() {
            return candidate;
        }
    }
    panic!("no free port in 17000-19999");
}

/// A server process the test started: stopped by its PID when dropped (SIGTERM, then
/// SIGKILL after 5 s). Its stderr goes to a file shown when it fails to start.
struct Daemon {
    what: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(what: &'static str, cmd: &mut Command, log: PathBuf) -> Daemon {
        let err = std::fs::File::create(&log).expect("create a log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Daemon {
            what,
            child: Some(child),
            log,
        }
    }

    async fn wait_listening(&self, addr: SocketAddr) {
        let end = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).await.is_err() {
            if Instant::now() >= end {
                panic!(
                    "{} did not listen on {addr}: {}",
                    self.what,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Runs a client to its end, killed by its PID past `limit`: its status and output.
async fn run(mut cmd: Command, limit: Duration) -> Output {
    tokio::task::spawn_blocking(move || {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let pid = child.id().to_string();
        let done = Arc::new(AtomicBool::new(false));
        let watch = done.clone();
        std::thread::spawn(move || {
            let end = std::time::Instant::now() + limit;
            while std::time::Instant::now() < end {
                if watch.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !watch.load(Ordering::Acquire) {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        let out = child.wait_with_output().expect("wait for the client");
        done.store(true, Ordering::Release);
        out
    })
    .await
    .expect("client thread")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts the client exited 0, and returns its stdout.
fn ok(what: &str, out: &Output) -> String {
    assert!(out.status.success(), "{what} failed: {}", text(out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The number after `label` in `s` (`"Failed requests:"`), up to the next non-digit.
fn number_after(s: &str, label: &str) -> Option<f64> {
    let rest = &s[s.find(label)? + label.len()..];
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// `len` bytes that do not compress and are the same in every run.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// `sha256sum` of a file.
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn write_noise(dir: &Path, name: &str, len: usize) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, noise(len)).expect("write a test file");
    p
}

/// The uid and gid of a user, from `id`.
fn ids_of(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .status()
        .expect("run chown");
    assert!(st.success(), "chown {}", path.display());
}

// ---------------------------------------------------------------------------------------
// nginx: curl, ab, h2load, and a keep-alive connection idle between requests.

/// nginx on two loopback ports: HTTP/1.1 on `h1`, HTTP/2 with prior knowledge on `h2`.
/// It serves `www/`, and keeps every request body posted to `/upload` in `body/`
/// (`client_body_in_file_only`), naming the file in an `X-Body-File` header, so a test can
/// hash what arrived.
struct Nginx {
    h1: u16,
    h2: u16,
    dir: TempDir,
    _d: Daemon,
}

impl Nginx {
    async fn start() -> Nginx {
        let dir = TempDir::new("nginx");
        let d = dir.path();
        for sub in ["www", "body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(d.join(sub)).expect("create nginx dirs");
        }
        std::fs::write(d.join("www/small.txt"), vec![b'x'; 612]).expect("write small.txt");
        // Two picks may land on the same free port: nginx then refuses a duplicate listen.
        let h1 = server_port();
        let h2 = std::iter::repeat_with(server_port)
            .find(|&p| p != h1)
            .expect("a second free port");
        let user = if crate::support::is_root() {
            "user root;"
        } else {
            ""
        };
        let p = d.display();
        let conf = format!(
            r#"{user}
worker_processes 1;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # A connection serves any number of requests: at its default 1000, nginx ends an HTTP/2
    # connection with GOAWAY, and h2load counts what it had in flight as errors.
    keepalive_requests 1000000;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{h1};
        listen 127.0.0.1:{h2} http2;
        root {p}/www;
        client_max_body_size 200m;
        location = /upload {{
            client_body_in_file_only on;
            add_header X-Body-File $request_body_file always;
            proxy_pass http://127.0.0.1:{h1}/sink;
        }}
        location = /sink {{ return 200 "stored\n"; }}
    }}
}}
"#
        );
        std::fs::write(d.join("nginx.conf"), conf).expect("write nginx.conf");
        let daemon = Daemon::spawn(
            "nginx",
            Command::new("nginx")
                .arg("-e")
                .arg(d.join("error.log"))
                .arg("-p")
                .arg(d)
                .arg("-c")
                .arg(d.join("nginx.conf")),
            d.join("stderr.log"),
        );
        daemon.wait_listening(local(h1)).await;
        daemon.wait_listening(local(h2)).await;
        Nginx {
            h1,
            h2,
            dir,
            _d: daemon,
        }
    }

    fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }
}

const NGINX: &str = "a real nginx";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_get_post_chunked_and_expect_100_continue_arrive_intact() {
    require!(NGINX; Need::Tool("nginx"), Need::Tool("curl"), Need::Tool("sha256sum"));
    let nginx = Nginx::start().await;
    let proxy = proxy_to(local(nginx.h1)).await;
    let base = format!("http://{}", proxy.addr);
    let tmp = TempDir::new("curl");

    // GET: a 50 MB file comes back whole.
    let big = write_noise(&nginx.www(), "big.bin", 50 << 20);
    let got = tmp.path().join("got.bin");
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail", "--max-time", "30", "-o"])
        .arg(&got)
        .arg(format!("{base}/big.bin"));
    ok("curl GET", &run(c, Duration::from_secs(40)).await);
    assert_eq!(sha256(&got), sha256(&big), "GET: the body differs");

    // POST 50 MB with `Expect: 100-continue`: the head is held whole, the backend answers
    // 100 Continue, and only then does the body flow; nginx keeps what arrived.
    let mut c = Command::new("curl");
    // curl waits up to 30 s for the 100 Continue (not its 1 s default): a proxy that held
    // the head for more bytes would time the upload out instead of passing after a second.
    c.args([
        "-sS",
        "-v",
        "--fail",
        "--max-time",
        "30",
        "--expect100-timeout",
        "30",
    ])
    .args(["-H", "Expect: 100-continue", "--data-binary"])
    .arg(format!("@{}", big.display()))
    .args(["-w", "%header{x-body-file}", "-o", "/dev/null"])
    .arg(format!("{base}/upload"));
    let out = run(c, Duration::from_secs(40)).await;
    let stored = ok("curl POST 50 MB", &out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP/1.1 100 Continue"),
        "curl saw no 100 Continue: {}",
        text(&out)
    );
    assert_eq!(
        sha256(Path::new(stored.trim())),
        sha256(&big),
        "POST: the body nginx stored differs"
    );

    // A chunked upload of unknown length (curl reads it from stdin as a stream).
    let five = write_noise(tmp.path(), "five.bin", 5 << 20);
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!(
        "cat {} | curl -sS --fail --max-time 30 -H 'Transfer-Encoding: chunked' \
         --data-binary @- -w '%header{{x-body-file}}' -o /dev/null {base}/upload",
        five.display()
    ));
    let stored = ok("curl chunked POST", &run(c, Duration::from_secs(40)).await);
    assert_eq!(
        sha256(Path::new(stored.trim())),
        sha256(&five),
        "chunked POST: the body nginx stored differs"
    );
    drop(proxy);
}

/// ab's summary: (complete, failed, non-2xx, keep-alive requests, requests per second).
fn ab_summary(out: &str) -> (f64, f64, f64, f64, f64) {
    (
        number_after(out, "Complete requests:").unwrap_or(-1.0),
        number_after(out, "Failed requests:").unwrap_or(-1.0),
        number_after(out, "Non-2xx responses:").unwrap_or(0.0),
        number_after(out, "Keep-Alive requests:").unwrap_or(0.0),
        number_after(out, "Requests per second:").unwrap_or(0.0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_keepalive_100_and_new_connection_per_request_get_no_error() {
    require!(NGINX; Need::Tool("nginx"), Need::Tool("ab"));
    let nginx = Nginx::start().await;
    let proxy = proxy_to(local(nginx.h1)).await;
    let url = format!("http://{}/small.txt", proxy.addr);

    // 100 keep-alive connections at once from one address: past max_conns_per_source (64).
    let mut c = Command::new("ab");
    c.args(["-k", "-c", "100", "-n", "20000", "-s", "10", &url]);
    let out = run(c, Duration::from_secs(60)).await;
    let s = ok("ab -k -c 100", &out);
    let (complete, failed, non2xx, keepalive, rps) = ab_summary(&s);
    assert_eq!(
        (complete, failed, non2xx),
        (20000.0, 0.0, 0.0),
        "ab -k -c 100: {s}"
    );
    assert!(keepalive >= 19000.0, "ab -k reused no connections: {s}");
    eprintln!("ab -k -c 100: {rps} requests/s");

    // A new connection per request, far above conn_rate_per_source (200/s).
    let mut c = Command::new("ab");
    c.args(["-c", "50", "-n", "5000", "-s", "10", &url]);
    let out = run(c, Duration::from_secs(60)).await;
    let s = ok("ab -c 50", &out);
    let (complete, failed, non2xx, _, rps) = ab_summary(&s);
    assert_eq!(
        (complete, failed, non2xx),
        (5000.0, 0.0, 0.0),
        "ab -c 50: {s}"
    );
    assert!(
        number_after(&s, "Document Length:") == Some(612.0),
        "ab: wrong body: {s}"
    );
    eprintln!("ab -c 50 (a connection per request): {rps} requests/s");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_with_prior_knowledge_gets_no_error() {
    require!(NGINX; Need::Tool("nginx"), Need::Tool("h2load"));
    let nginx = Nginx::start().await;
    let proxy = proxy_to(local(nginx.h2)).await;
    let mut c = Command::new("h2load");
    // 100 connections at once from one address, each held for 3 s: past
    // max_conns_per_source (64) for longer than a newcomer may wait for a slot.
    c.args(["-D", "3", "-c", "100", "-m", "10"])
        .arg(format!("http://{}/small.txt", proxy.addr));
    let out = run(c, Duration::from_secs(60)).await;
    let s = ok("h2load", &out);
    let line = s
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_default();
    let total = number_after(line, "requests:").unwrap_or(0.0);
    assert!(total > 1000.0, "h2load: {s}");
    // At the deadline each client has its 10 streams started and not done: not errors.
    let count = |word: &str| -> f64 {
        line.split(',')
            .find(|p| p.trim_end().ends_with(word))
            .and_then(|p| {
                p.split_whitespace()
                    .next()
                    .map(|n| n.parse().unwrap_or(-1.0))
            })
            .unwrap_or(-1.0)
    };
    assert_eq!(
        (count("done"), count("succeeded")),
        (total, total),
        "h2load: {s}"
    );
    assert_eq!(
        (count("failed"), count("errored"), count("timeout")),
        (0.0, 0.0, 0.0),
        "h2load: {s}"
    );
    assert!(
        number_after(&s, "status codes:").unwrap_or(0.0) >= total
            && s.contains(" 2xx, 0 3xx, 0 4xx, 0 5xx"),
        "h2load: {s}"
    );
    // Every one of the 100 clients was served: the slowest client's rate is not zero (a
    // client refused at connect starts no request, and counts no error in -D mode).
    let slowest = s
        .lines()
        .find(|l| l.starts_with("req/s"))
        .and_then(|l| number_after(l, ":"))
        .unwrap_or(0.0);
    assert!(slowest > 0.0, "a client got no request through: {s}");
    eprintln!("h2load -c 100 -m 10 -D 3: {total} requests, slowest client {slowest}/s");
    assert!(
        s.contains("Application protocol: h2c"),
        "h2load did not speak h2c: {s}"
    );
    drop(proxy);
}

// ---------------------------------------------------------------------------------------
// PostgreSQL: psql and pgbench, with and without SSL negotiation.

/// The newest `/usr/lib/postgresql/<version>/bin` that holds a server.
fn pg_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// A PostgreSQL server of the test's own: initdb into a temp dir, trust authentication,
/// `ssl=on` with a self-signed certificate, listening on 127.0.0.1 only, its socket in the
/// temp dir. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user
/// (or `nobody`), which owns the temp dir.
struct Postgres {
    port: u16,
    bin: PathBuf,
    _d: Daemon,
    _dir: TempDir,
}

impl Postgres {
    async fn start(bin: &Path) -> Postgres {
        let dir = TempDir::new("pg");
        let d = dir.path().to_path_buf();
        let key = d.join("server.key");
        let cert = d.join("server.crt");
        let st = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl");
        assert!(st.success(), "openssl req");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        // As root, the server runs as an unprivileged user that owns the temp dir.
        let runas: Option<&str> = if crate::support::is_root() {
            let user = ["postgres", "nobody"]
                .into_iter()
                .find(|u| ids_of(u).is_some())
                .expect("a postgres or nobody user");
            let (uid, gid) = ids_of(user).expect("ids");
            chown_tree(&d, uid, gid);
            Some(user)
        } else {
            None
        };
        let as_user = |prog: &str| -> Command {
            let prog = bin.join(prog);
            match runas {
                Some(u) => {
                    let mut c = Command::new("runuser");
                    c.args(["-u", u, "--"]).arg(prog);
                    c
                }
                None => Command::new(prog),
            }
        };
        let data = d.join("data");
        let out = as_user("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--no-locale")
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb: {}", text(&out));
        let port = server_port();
        let daemon = Daemon::spawn(
            "postgres",
            as_user("postgres")
                .arg("-D")
                .arg(&data)
                .args(["-c", "listen_addresses=127.0.0.1", "-c"])
                .arg(format!("port={port}"))
                .arg("-c")
                .arg(format!("unix_socket_directories={}", d.display()))
                .args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={}", cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", key.display()))
                // Speed only: nothing here is about durability.
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"]),
            d.join("postgres.log"),
        );
        daemon.wait_listening(local(port)).await;
        let pg = Postgres {
            port,
            bin: bin.to_path_buf(),
            _d: daemon,
            _dir: dir,
        };
        // Listening is not yet accepting logins: wait for a query to pass.
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let out = run(
                pg.client("psql", pg.port, "disable", &["-Atc", "select 1"]),
                Duration::from_secs(10),
            )
            .await;
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < end,
                "postgres never answered: {}",
                text(&out)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pg
    }

    /// `prog` (psql, pgbench) of this server's version toward 127.0.0.1:`port` as
    /// `postgres`, with `sslmode`: `disable` sends the startup packet at once, `require` an
    /// SSLRequest and then a TLS ClientHello.
    fn client(&self, prog: &str, port: u16, sslmode: &str, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        for (k, _) in std::env::vars() {
            if k.starts_with("PG") {
                c.env_remove(k);
            }
        }
        c.env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PGSSLMODE", sslmode)
            .env("PGCONNECT_TIMEOUT", "10")
            .args(args);
        c
    }
}

const POSTGRES: &str = "a real PostgreSQL";

/// Skips the calling test, visibly, without a PostgreSQL server and its clients.
macro_rules! pg_or_skip {
    ($test:expr) => {{
        require!(POSTGRES; Need::Tool("openssl"));
        match pg_bin() {
            Some(b) => b,
            None => {
                skip($test, "a PostgreSQL server (/usr/lib/postgresql/<version>/bin)");
                return;
            }
        }
    }};
}

/// Asserts a pgbench run completed every transaction with no failure, and returns its tps.
fn pgbench_ok(what: &str, out: &Output, expect: Option<u64>) -> f64 {
    let s = ok(what, out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("error") && !err.contains("abort"),
        "{what}: {}",
        text(out)
    );
    let done = number_after(&s, "number of transactions actually processed:").unwrap_or(-1.0);
    if let Some(n) = expect {
        assert_eq!(done, n as f64, "{what}: {s}");
    } else {
        assert!(done > 0.0, "{what}: {s}");
    }
    if s.contains("number of failed transactions") {
        assert_eq!(
            number_after(&s, "number of failed transactions:"),
            Some(0.0),
            "{what}: {s}"
        );
    }
    number_after(&s, "tps =").unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_and_without_ssl_gets_its_data_whole() {
    let bin = pg_or_skip!("real_clients::psql_with_and_without_ssl_gets_its_data_whole");
    let pg = Postgres::start(&bin).await;
    let proxy = proxy_to(local(pg.port)).await;
    let port = proxy.addr.port();
    // About 2 MB of rows back, compared with the same query straight to the server.
    let q = "select string_agg(i::text || md5(i::text), ',') from generate_series(1, 50000) i";
    let direct = ok(
        "psql direct",
        &run(
            pg.client("psql", pg.port, "disable", &["-Atc", q]),
            Duration::from_secs(20),
        )
        .await,
    );
    assert!(
        direct.len() > 1_500_000,
        "the query returned {} bytes",
        direct.len()
    );
    for (mode, ssl) in [("disable", "f"), ("require", "t")] {
        let got = ok(
            &format!("psql sslmode={mode}"),
            &run(
                pg.client("psql", port, mode, &["-Atc", q]),
                Duration::from_secs(20),
            )
            .await,
        );
        assert!(got == direct, "psql sslmode={mode}: the rows differ");
        let on = ok(
            &format!("psql sslmode={mode}"),
            &run(
                pg.client(
                    "psql",
                    port,
                    mode,
                    &[
                        "-Atc",
                        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                    ],
                ),
                Duration::from_secs(20),
            )
            .await,
        );
        assert_eq!(on.trim(), ssl, "sslmode={mode}: TLS in use should be {ssl}");
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_80_clients_with_and_without_ssl_get_no_error() {
    let bin = pg_or_skip!("real_clients::pgbench_80_clients_with_and_without_ssl_get_no_error");
    let pg = Postgres::start(&bin).await;
    let proxy = proxy_to(local(pg.port)).await;
    let port = proxy.addr.port();
    let init = run(
        pg.client("pgbench", port, "disable", &["-i", "-s", "1", "-q"]),
        Duration::from_secs(60),
    )
    .await;
    ok("pgbench -i", &init);
    // 80 connections at once from one address (PostgreSQL's own limit is 100): past
    // max_conns_per_source (64). With SSL every one opens with an SSLRequest, then TLS.
    for mode in ["disable", "require"] {
        let out = run(
            pg.client(
                "pgbench",
                port,
                mode,
                &["-n", "-c", "80", "-j", "2", "-t", "20"],
            ),
            Duration::from_secs(60),
        )
        .await;
        let tps = pgbench_ok(&format!("pgbench -c 80 sslmode={mode}"), &out, Some(1600));
        eprintln!("pgbench -c 80 -t 20 sslmode={mode}: {tps} tps");
    }
    // The data is whole: every transaction's history row arrived.
    let rows = ok(
        "psql",
        &run(
            pg.client(
                "psql",
                pg.port,
                "disable",
                &["-Atc", "select count(*) from pgbench_history"],
            ),
            Duration::from_secs(20),
        )
        .await,
    );
    assert_eq!(rows.trim(), "3200", "pgbench_history rows");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_new_connection_per_transaction_gets_no_error() {
    let bin = pg_or_skip!("real_clients::pgbench_new_connection_per_transaction_gets_no_error");
    let pg = Postgres::start(&bin).await;
    let proxy = proxy_to(local(pg.port)).await;
    let port = proxy.addr.port();
    ok(
        "pgbench -i",
        &run(
            pg.client("pgbench", port, "disable", &["-i", "-s", "1", "-q"]),
            Duration::from_secs(60),
        )
        .await,
    );
    // A new connection per transaction (-C), select-only, for 6 s: as many new connections
    // a second as this machine makes, from one address, well past the burst of 400.
    let out = run(
        pg.client(
            "pgbench",
            port,
            "disable",
            &["-C", "-S", "-c", "16", "-j", "2", "-T", "6"],
        ),
        Duration::from_secs(60),
    )
    .await;
    let tps = pgbench_ok("pgbench -C", &out, None);
    let done = number_after(
        &String::from_utf8_lossy(&out.stdout),
        "number of transactions actually processed:",
    )
    .unwrap_or(0.0);
    eprintln!("pgbench -C -S -c 16 -T 6: {done} connections, {tps} per second");
    drop(proxy);
}

// ---------------------------------------------------------------------------------------
// Redis: redis-benchmark with 100 clients, a big value, and an idle subscriber.

const REDIS: &str = "a real Redis";

/// `calls=` of one command in `INFO commandstats`, asked of the server directly.
fn redis_calls(port: u16, cmd: &str) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "commandstats"])
        .output()
        .expect("run redis-cli");
    let s = String::from_utf8_lossy(&out.stdout);
    let label = format!("cmdstat_{cmd}:calls=");
    number_after(&s, &label).unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_100_clients_gets_no_error() {
    require!(REDIS; Need::Tool("redis-server"), Need::Tool("redis-benchmark"), Need::Tool("redis-cli"));
    let redis = RedisServer::start(&[]).await;
    let proxy = proxy_to(local(redis.port)).await;
    let port = proxy.addr.port().to_string();
    // 100 clients at once from one address: past max_conns_per_source (64).
    let mut c = Command::new("redis-benchmark");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-c",
        "100",
        "-n",
        "20000",
        "-q",
    ])
    .args(["-t", "ping,set,get,lpush,lpop", "-d", "256"]);
    let out = run(c, Duration::from_secs(60)).await;
    let s = ok("redis-benchmark -c 100", &out);
    let all = text(&out);
    assert!(
        !all.contains("Error") && !all.contains("rror:") && !all.contains("disconnected"),
        "redis-benchmark: {all}"
    );
    for t in ["PING_INLINE", "PING_MBULK", "SET", "GET", "LPUSH", "LPOP"] {
        assert!(
            s.contains(&format!("{t}: ")),
            "redis-benchmark: no {t} result: {s}"
        );
    }
    // Every request reached the server once.
    for cmd in ["set", "get", "lpush", "lpop"] {
        assert_eq!(redis_calls(redis.port, cmd), 20000, "{cmd} calls");
    }
    // A 1 MB value goes in and comes back whole.
    let tmp = TempDir::new("redis");
    let value: String = noise(768 << 10)
        .chunks(3)
        .map(|c| format!("{:02x}", c[0]))
        .collect();
    let f = tmp.path().join("value");
    std::fs::write(&f, &value).expect("write the value");
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("redis-cli -p {port} -x set big < {}", f.display()));
    assert_eq!(
        ok("redis-cli -x set", &run(c, Duration::from_secs(20)).await).trim(),
        "OK"
    );
    let mut c = Command::new("redis-cli");
    c.args(["-p", &port, "--raw", "get", "big"]);
    let got = ok("redis-cli get", &run(c, Duration::from_secs(20)).await);
    assert!(got.trim_end() == value, "the value came back different");
    drop(proxy);
}

/// Past `timeouts.request` and `first_byte` (10 s each), the clocks that could take an idle
/// subscriber for a stalled exchange.
const SUBSCRIBER_QUIET: Duration = Duration::from_secs(11);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_redis_subscriber_still_gets_its_message() {
    require!(REDIS; Need::Tool("redis-server"), Need::Tool("redis-cli"));
    let redis = RedisServer::start(&[]).await;
    let proxy = proxy_to(local(redis.port)).await;
    let port = proxy.addr.port().to_string();
    let mut sub = Command::new("redis-cli")
        .args(["-p", &port, "subscribe", "news"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-cli subscribe");
    let lines = BufReader::new(sub.stdout.take().expect("stdout"));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for l in lines.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .ok()
            .flatten()
    };
    // redis-cli to a pipe prints each reply element on a line: subscribe, news, 1.
    for want in ["subscribe", "news", "1"] {
        assert_eq!(
            next().await.as_deref(),
            Some(want),
            "subscribe confirmation"
        );
    }
    tokio::time::sleep(SUBSCRIBER_QUIET).await;
    let mut c = Command::new("redis-cli");
    c.args(["-p", &port, "publish", "news", "still-here"]);
    let receivers = ok("redis-cli publish", &run(c, Duration::from_secs(10)).await);
    assert_eq!(receivers.trim(), "1", "the subscriber is gone");
    for want in ["message", "news", "still-here"] {
        assert_eq!(next().await.as_deref(), Some(want), "the published message");
    }
    let _ = sub.kill();
    let _ = sub.wait();
    drop(proxy);
}

/// The issue's SUBSCRIBE idle past 5 minutes was reset by the old `timeouts.idle` (5 min):
/// the default is now at least an hour, and the pressure figure applies only under pressure.
#[test]
fn the_shipped_idle_clock_lets_a_subscriber_sit_an_hour() {
    let c = shipped(local(19999));
    let idle = c.listeners[0].timeouts.idle;
    assert!(
        idle >= Duration::from_secs(3600),
        "timeouts.idle is {idle:?}"
    );
    // And the default when the key is left out, not only the shipped file's line.
    let bare = config::parse(
        "[[listeners]]\nname = \"x\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n",
        "bare.toml",
        HashMap::new(),
    )
    .expect("a bare config");
    let idle = bare.listeners[0].timeouts.idle;
    assert!(
        idle >= Duration::from_secs(3600),
        "the default idle is {idle:?}"
    );
}

// ---------------------------------------------------------------------------------------
// OpenSSH: ssh, scp (SFTP underneath) and a forwarded port.

/// sshd on a loopback port with a temp host key, letting in root with a temp key only.
struct Sshd {
    port: u16,
    dir: TempDir,
    _d: Daemon,
}

impl Sshd {
    async fn start() -> Sshd {
        let dir = TempDir::new("sshd");
        let d = dir.path();
        for (name, file) in [("host", "host_key"), ("client", "id")] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(d.join(file))
                .status()
                .expect("run ssh-keygen");
            assert!(st.success(), "ssh-keygen");
        }
        std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).expect("authorized_keys");
        // sshd's privilege separation directory, as its package would make at boot.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let port = server_port();
        let sshd = which("sshd");
        let daemon = Daemon::spawn(
            "sshd",
            Command::new(sshd)
                .args(["-D", "-e", "-f", "/dev/null", "-p"])
                .arg(port.to_string())
                .args(["-o", "ListenAddress=127.0.0.1", "-o"])
                .arg(format!("HostKey={}", d.join("host_key").display()))
                .arg("-o")
                .arg(format!(
                    "AuthorizedKeysFile={}",
                    d.join("authorized_keys").display()
                ))
                .args([
                    "-o",
                    "PidFile=none",
                    "-o",
                    "StrictModes=no",
                    "-o",
                    "UsePAM=no",
                ])
                .args(["-o", "PermitRootLogin=prohibit-password"])
                .args(["-o", "PasswordAuthentication=no"])
                .args(["-o", "AllowTcpForwarding=yes"])
                .args(["-o", "Subsystem=sftp internal-sftp"]),
            d.join("sshd.log"),
        );
        daemon.wait_listening(local(port)).await;
        Sshd {
            port,
            dir,
            _d: daemon,
        }
    }

    /// `prog` (ssh, scp) with the test's key and no known-hosts file, toward `port`.
    fn client(&self, prog: &str, port: u16) -> Command {
        let mut c = Command::new(prog);
        c.args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-o"])
            .arg("ConnectTimeout=10")
            .arg("-i")
            .arg(self.dir.path().join("id"))
            .arg(if prog == "scp" { "-P" } else { "-p" })
            .arg(port.to_string());
        c
    }
}

/// The full path of a program on `PATH` (sshd must be started by its absolute path).
fn which(prog: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(prog))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(prog))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_scp_and_port_forwarding_work() {
    require!("sshd logs in as root only when run as root";
        Need::Root, Need::Tool("sshd"), Need::Tool("ssh"), Need::Tool("scp"),
        Need::Tool("ssh-keygen"), Need::Tool("sha256sum"));
    let sshd = Sshd::start().await;
    let proxy = proxy_to(local(sshd.port)).await;
    let port = proxy.addr.port();
    let tmp = TempDir::new("ssh");

    let mut c = sshd.client("ssh", port);
    c.args(["root@127.0.0.1", "echo", "hello-from-sshd"]);
    let said = ok("ssh echo", &run(c, Duration::from_secs(20)).await);
    assert_eq!(said.trim(), "hello-from-sshd");

    // scp up and back down: 20 MB whole both ways.
    let up = write_noise(tmp.path(), "up.bin", 20 << 20);
    let remote = tmp.path().join("remote.bin");
    let down = tmp.path().join("down.bin");
    let mut c = sshd.client("scp", port);
    c.arg("-q")
        .arg(&up)
        .arg(format!("root@127.0.0.1:{}", remote.display()));
    ok("scp up", &run(c, Duration::from_secs(30)).await);
    let mut c = sshd.client("scp", port);
    c.arg("-q")
        .arg(format!("root@127.0.0.1:{}", remote.display()))
        .arg(&down);
    ok("scp down", &run(c, Duration::from_secs(30)).await);
    assert_eq!(sha256(&remote), sha256(&up), "scp up: the file differs");
    assert_eq!(sha256(&down), sha256(&up), "scp down: the file differs");

    // A forwarded port (ssh -L) toward an echo server: 2 MB there and back.
    let echo = counted_echo(local(0)).await;
    let fwd = server_port();
    let mut c = sshd.client("ssh", port);
    c.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("127.0.0.1:{fwd}:{}", echo.addr))
        .arg("root@127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let tunnel = Daemon::spawn("ssh -L", &mut c, tmp.path().join("ssh-L.log"));
    tunnel.wait_listening(local(fwd)).await;
    let data = noise(2 << 20);
    let mut s = TcpStream::connect(local(fwd))
        .await
        .expect("connect the tunnel");
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.expect("send through the tunnel");
    };
    let mut back = vec![0u8; data.len()];
    let recv = async {
        tokio::time::timeout(Duration::from_secs(20), r.read_exact(&mut back))
            .await
            .expect("the tunnel echoes in time")
            .expect("read through the tunnel");
    };
    tokio::join!(send, recv);
    assert!(back == data, "the tunnel's bytes differ");
    drop(s);
    drop(tunnel);
    drop(proxy);
}

// ---------------------------------------------------------------------------------------
// A faithful in-test HTTP/1.1 server for what no Debian package serves by itself: a long
// poll, a server-sent-events stream, and websockets (RFC 6455 handshake and frames).

/// Serves, per connection and keep-alive:
/// - `GET /poll/<ms>`: answers `done` after `<ms>` milliseconds;
/// - `GET /sse/<n>/<every ms>/<pause ms>`: a `text/event-stream` (chunked) of `n` events,
///   one every `<every ms>`, with a silence of `<pause ms>` before the last;
/// - `GET /ws` with an Upgrade: a websocket that echoes every message, and answers a close.
async fn http_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve_http(s));
        }
    });
    (addr, task)
}

async fn serve_http(mut s: TcpStream) -> std::io::Result<()> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(e) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break e;
            }
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            got.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&got[..end]).to_string();
        got.drain(..end + 4);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let parts: Vec<u64> = path
            .split('/')
            .skip(2)
            .filter_map(|p| p.parse().ok())
            .collect();
        if path.starts_with("/poll/") {
            tokio::time::sleep(Duration::from_millis(parts[0])).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
                .await?;
        } else if path.starts_with("/sse/") {
            let (n, every, pause) = (parts[0], parts[1], parts[2]);
            s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
            .await?;
            for i in 0..n {
                let wait = if i + 1 == n { pause } else { every };
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                let ev = sse_event(i);
                s.write_all(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes())
                    .await?;
            }
            s.write_all(b"0\r\n\r\n").await?;
        } else if path == "/ws" {
            let key = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("sec-websocket-key")
                        .then(|| v.trim().to_string())
                })
                .unwrap_or_default();
            s.write_all(
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    ws_accept(&key)
                )
                .as_bytes(),
            )
            .await?;
            let mut conn = Ws {
                s,
                buf: std::mem::take(&mut got),
            };
            while let Some((op, payload)) = conn.read().await? {
                if op == 8 {
                    conn.send(8, &payload, false).await?;
                    return Ok(());
                }
                conn.send(op, &payload, false).await?;
            }
            return Ok(());
        } else {
            s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await?;
        }
    }
}

/// The server-sent event number `i`, as the stream carries it.
fn sse_event(i: u64) -> String {
    format!("id: {i}\ndata: event {i} {}\n\n", "x".repeat(100))
}

/// One side of a websocket: frames in and out, masked from the client (RFC 6455 5.3).
struct Ws {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Ws {
    async fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        let mut b = [0u8; 16 * 1024];
        while self.buf.len() < n {
            let k = self.s.read(&mut b).await?;
            if k == 0 {
                return Ok(false);
            }
            self.buf.extend_from_slice(&b[..k]);
        }
        Ok(true)
    }

    /// The next frame's opcode and payload (unmasked), or `None` at EOF.
    async fn read(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        if !self.fill(2).await? {
            return Ok(None);
        }
        let op = self.buf[0] & 0x0f;
        let masked = self.buf[1] & 0x80 != 0;
        let (len, mut at) = match self.buf[1] & 0x7f {
            126 => {
                self.fill(4).await?;
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                self.fill(10).await?;
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        let mask = if masked {
            self.fill(at + 4).await?;
            let m = [
                self.buf[at],
                self.buf[at + 1],
                self.buf[at + 2],
                self.buf[at + 3],
            ];
            at += 4;
            Some(m)
        } else {
            None
        };
        if !self.fill(at + len).await? {
            return Ok(None);
        }
        let mut payload: Vec<u8> = self.buf.drain(..at + len).skip(at).collect();
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        Ok(Some((op, payload)))
    }

    async fn send(&mut self, op: u8, payload: &[u8], mask: bool) -> std::io::Result<()> {
        let mut f = vec![0x80 | op];
        let m = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        self.s.write_all(&f).await
    }
}

/// A websocket client's handshake on `s` (through the proxy), checking the server's accept.
async fn ws_connect(to: SocketAddr) -> Ws {
    let mut s = TcpStream::connect(to).await.expect("connect");
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("send the upgrade");
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    let end = loop {
        if let Some(e) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break e;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("the upgrade is answered")
            .expect("read the upgrade");
        assert!(n > 0, "closed during the upgrade");
        got.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade answered {head}");
    // RFC 6455's own example key and accept.
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "bad accept: {head}"
    );
    got.drain(..end + 4);
    Ws { s, buf: got }
}

/// `Sec-WebSocket-Accept` for `key`: base64(SHA-1(key + the RFC's GUID)).
fn ws_accept(key: &str) -> String {
    let digest = sha1(format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes());
    base64(&digest)
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, c) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A websocket through the proxy: messages of every size echo back whole, then a close
/// handshake. `quiet`: a silence with the socket open between the two halves.
async fn websocket_session(to: SocketAddr, quiet: Duration) {
    let mut ws = ws_connect(to).await;
    let sizes = [1usize, 125, 126, 65535, 65536, 1 << 20];
    for (round, pause) in [(0, Duration::ZERO), (1, quiet)] {
        tokio::time::sleep(pause).await;
        for (i, n) in sizes.iter().enumerate() {
            let msg = noise(*n + round * 7 + i);
            ws.send(2, &msg, true).await.expect("send a message");
            let (op, back) = tokio::time::timeout(Duration::from_secs(10), ws.read())
                .await
                .expect("the echo comes in time")
                .expect("read the echo")
                .expect("the websocket is still open");
            assert_eq!(op, 2, "opcode");
            assert!(back == msg, "message of {n} bytes came back different");
        }
    }
    ws.send(8, &[0x03, 0xe8], true).await.expect("send close");
    let (op, _) = ws
        .read()
        .await
        .expect("read the close")
        .expect("a close frame back");
    assert_eq!(op, 8, "the server answers the close");
}

/// curl reading `/sse/...` through `to`: every event arrives whole and in order.
async fn sse_session(to: SocketAddr, n: u64, every_ms: u64, pause_ms: u64) {
    let mut c = Command::new("curl");
    c.args(["-sS", "-N", "--fail", "--max-time", "60"])
        .arg(format!("http://{to}/sse/{n}/{every_ms}/{pause_ms}"));
    let out = run(c, Duration::from_secs(70)).await;
    let body = ok("curl SSE", &out);
    let want: String = (0..n).map(sse_event).collect();
    assert!(
        body == want,
        "the event stream differs: got {} bytes, want {}",
        body.len(),
        want.len()
    );
}

const CURL: &str = "curl";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_and_an_event_stream_arrive_whole() {
    require!(CURL; Need::Tool("curl"));
    let (server, task) = http_server().await;
    let proxy = proxy_to(server).await;
    tokio::join!(
        websocket_session(proxy.addr, Duration::from_millis(500)),
        sse_session(proxy.addr, 20, 100, 2000),
    );
    drop(proxy);
    task.abort();
}

/// A long poll answered after 25 s, a keep-alive connection idle 40 s between requests
/// (to nginx, whose keep-alive lasts 75 s), an event stream silent for 30 s and a websocket
/// silent for 30 s, all at once: past every shipped clock shorter than `idle` (first_byte,
/// request 10 s; keepalive probes at 30 s; pressure.idle 30 s, which applies only under
/// pressure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_and_quiet_keepalive_streams_outlive_the_short_clocks() {
    require!(NGINX; Need::Tool("nginx"), Need::Tool("curl"));
    let (server, task) = http_server().await;
    let proxy = proxy_to(server).await;
    let nginx = Nginx::start().await;
    let web = proxy_to(local(nginx.h1)).await;

    let long_poll = async {
        let started = Instant::now();
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail", "--max-time", "60"])
            .arg(format!("http://{}/poll/25000", proxy.addr));
        let body = ok("curl long poll", &run(c, Duration::from_secs(70)).await);
        assert_eq!(body, "done");
        assert!(started.elapsed() >= Duration::from_secs(25));
    };
    let keepalive = async {
        let mut s = TcpStream::connect(web.addr).await.expect("connect");
        let req = format!("GET /small.txt HTTP/1.1\r\nHost: {}\r\n\r\n", web.addr);
        for round in 0..2 {
            if round == 1 {
                tokio::time::sleep(Duration::from_secs(40)).await;
            }
            s.write_all(req.as_bytes()).await.expect("send a request");
            let mut got = Vec::new();
            let mut b = [0u8; 4096];
            while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(&[b'x'; 612])) {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                    .await
                    .expect("an answer in time")
                    .expect("read the answer");
                assert!(
                    n > 0,
                    "the keep-alive connection was closed (round {round})"
                );
                got.extend_from_slice(&b[..n]);
            }
            assert!(got.starts_with(b"HTTP/1.1 200 OK"), "round {round}");
        }
    };
    tokio::join!(
        long_poll,
        keepalive,
        sse_session(proxy.addr, 5, 200, 30_000),
        websocket_session(proxy.addr, Duration::from_secs(30)),
    );
    drop(web);
    drop(proxy);
    task.abort();
}
