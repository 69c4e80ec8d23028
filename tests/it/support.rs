//! Shared helpers: a proxy on 127.0.0.1:0, real backends, clients from chosen loopback
//! addresses, assertions on RST versus FIN, temp dirs that clean up after themselves, and
//! the visible skip of a test that needs root or a tool this machine lacks.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use halfguard::config::{self, Config};
use halfguard::guard::GuardSnapshot;
use halfguard::shutdown::Signal;
use halfguard::{Handle, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The listener name every test proxy uses.
pub const L: &str = "t";

/// `limits.grace` in [`base_config`]: a connection counts against its source's half-open or
/// half-closed cap (and becomes evictable) this long after entering the state.
pub const GRACE: Duration = Duration::from_millis(50);

/// Waits until connections that just entered a state are past the grace.
pub async fn past_grace() {
    tokio::time::sleep(GRACE * 3).await;
}

/// A config with one listener on 127.0.0.1:0 toward `backends`, every per-source cap and the
/// rate limit off, so a test turns on exactly what it tests. The grace before a state counts
/// per source is [`GRACE`].
pub fn base_config(backends: &[SocketAddr]) -> Config {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let text = format!(
        r#"
[[listeners]]
name = "{L}"
bind = "127.0.0.1:0"
backends = [{}]

[limits]
max_conns_per_source = 0
max_half_open_per_source = 0
max_half_closed_per_source = 0
conn_rate_per_source = 0
max_queued_per_source = 0
# Short, so tests of the per-source state caps need not wait a second.
grace = "50ms"

[tcp]
keepalive_idle = "0s"
user_timeout = "0s"

[admin]
bind = "off"
"#,
        list.join(", ")
    );
    config::parse(&text, "test.toml", HashMap::new()).expect("base config is valid")
}

/// A running proxy.
pub struct Proxy {
    pub handle: Handle,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(config: Config) -> Proxy {
        raise_nofile();
        let server = Server::bind(config).await.expect("proxy binds");
        let handle = server.handle();
        let addr = handle.addr(L).expect("listener t");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
            Signal::Interrupt
        }));
        Proxy {
            handle,
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn snapshot(&self) -> GuardSnapshot {
        self.handle.snapshot(L).expect("listener t")
    }

    pub fn stats(&self) -> std::sync::Arc<halfguard::stats::Stats> {
        self.handle.stats(L).expect("listener t")
    }

    /// Waits until every count is back to zero, or panics with the last snapshot.
    pub async fn assert_drained(&self, within: Duration) {
        let snap = wait_for(within, || {
            let s = self.snapshot();
            (s.conns == 0 && s.half_open == 0 && s.half_closed == 0 && s.sources == 0).then_some(s)
        })
        .await;
        assert!(
            snap.is_some(),
            "counts did not return to zero: {:?}",
            self.snapshot()
        );
        let guard = self.handle.guard(L).expect("listener t");
        assert_eq!(
            guard.table_totals(),
            (0, 0, 0, 0),
            "source table entries left behind"
        );
    }

    /// Stops accepting and drains, as SIGTERM does.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Polls `f` every 10 ms until it returns `Some`, for at most `within`.
pub async fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An echo server that counts the connections that sent it bytes (health checks, which
/// connect and send nothing, are not counted).
pub struct Counted {
    pub addr: SocketAddr,
    pub served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves echo on `l` until dropped.
pub fn echo_on(l: TcpListener) -> Counted {
    let addr = l.local_addr().expect("addr");
    let served = Arc::new(AtomicU64::new(0));
    let count = served.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut first = true;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if std::mem::take(&mut first) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Counted { addr, served, task }
}

/// A counted echo server on `addr` (port 0 picks one).
pub async fn counted_echo(addr: SocketAddr) -> Counted {
    echo_on(TcpListener::bind(addr).await.expect("bind echo"))
}

/// A listener on 127.0.0.1 whose accept queue is full, so the kernel drops the SYNs sent to
/// it: connects hang until it accepts. The fillers keep it full while they are held.
pub async fn full_listener() -> (socket2::Socket, SocketAddr, Vec<TcpStream>) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(ms(200), TcpStream::connect(addr)).await {
            fillers.push(s);
        }
    }
    (l, addr, fillers)
}

/// What a backend does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// Echoes until EOF, then sends FIN.
    Echo,
    /// Reads until EOF, then answers `got <n>` and sends FIN: data after the client's FIN.
    CollectThenReply,
    /// The same, but thinks this many milliseconds before answering.
    CollectThenReplyAfter(u64),
    /// Writes `HELLO\n` first, then echoes until EOF.
    Greeter,
    /// Reads and discards forever, never closes.
    Sink,
    /// Writes `chunk` bytes as fast as the client takes them, forever.
    Flood,
    /// Sends `bye\n` then FIN at once, and keeps reading: the server half-closes first.
    FinFirst,
    /// HTTP/1.0-like: reads until an empty line, answers `HTTP/1.0 200 OK` with a short
    /// body after this many milliseconds, then FIN. Bytes that never finish a request get
    /// no answer.
    Http(u64),
}

/// What [`Backend::Http`] answers.
pub const HTTP_OK: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// A running backend and the results its connections reported.
pub struct BackendServer {
    pub addr: SocketAddr,
    /// How each finished backend connection ended: `Ok(bytes read)` on FIN, `Err` on reset.
    pub ends: tokio::sync::mpsc::UnboundedReceiver<io::Result<u64>>,
    task: JoinHandle<()>,
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend whose health checks and client connections are accepted alike: a connection
/// that sends five bytes gets them echoed and is handed over on the channel, kept open.
/// Sending on the oneshot closes the listener, so the checks are refused from then on (for
/// `on_down = "abort"`).
pub async fn stoppable_echo_backend() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<TcpStream>,
    oneshot::Sender<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<TcpStream>();
    let (stop, mut stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                Ok((mut s, _)) = l.accept() => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut b = [0u8; 5];
                        if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
                            let _ = tx.send(s);
                        }
                    });
                }
            }
        }
    });
    (addr, rx, stop)
}

pub async fn backend(kind: Backend) -> BackendServer {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = l.local_addr().expect("addr");
    let (tx, ends) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = serve_backend(kind, s).await;
                let _ = tx.send(r);
            });
        }
    });
    BackendServer { addr, ends, task }
}

async fn serve_backend(kind: Backend, mut s: TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    match kind {
        Backend::Echo | Backend::Greeter => {
            if let Backend::Greeter = kind {
                s.write_all(b"HELLO\n").await?;
            }
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    s.shutdown().await?;
                    return Ok(total);
                }
                total += n as u64;
                s.write_all(&buf[..n]).await?;
            }
        }
        Backend::CollectThenReply | Backend::CollectThenReplyAfter(_) => {
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            if let Backend::CollectThenReplyAfter(think) = kind {
                tokio::time::sleep(Duration::from_millis(think)).await;
            }
            // Data after the client's FIN, in several writes with pauses.
            s.write_all(format!("got {total}").as_bytes()).await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
            s.write_all(b" bytes\n").await?;
            s.shutdown().await?;
            Ok(total)
        }
        Backend::Sink => loop {
            if s.read(&mut buf).await? == 0 {
                // Never answer, never close: linger half-closed, watching for the RST (a
                // read after FIN only ever says EOF again; SO_ERROR tells the reset).
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Some(e) = s.take_error()? {
                        return Err(e);
                    }
                }
            }
        },
        Backend::Flood => loop {
            s.write_all(&buf).await?;
        },
        Backend::Http(think) => {
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(got.len() as u64);
                }
                got.extend_from_slice(&buf[..n]);
            }
            tokio::time::sleep(Duration::from_millis(think)).await;
            s.write_all(HTTP_OK).await?;
            s.shutdown().await?;
            Ok(got.len() as u64)
        }
        Backend::FinFirst => {
            s.write_all(b"bye\n").await?;
            s.shutdown().await?;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(total);
                }
                total += n as u64;
            }
        }
    }
}

/// Connects to `to` from the loopback address `from` (any 127.x.y.z works on Linux), so a
/// test can act as several sources.
pub async fn connect_from(from: &str, to: SocketAddr) -> io::Result<TcpStream> {
    let ip: IpAddr = from.parse().expect("loopback address");
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(ip, 0))?;
    s.connect(to).await
}

/// How a connection ended, seen from our side.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Orderly FIN after `n` bytes.
    Fin(Vec<u8>),
    /// RST.
    Reset,
    /// Nothing happened within the wait.
    Open,
}

/// Reads until FIN, RST or `within` passes, collecting bytes.
pub async fn read_end(s: &mut TcpStream, within: Duration) -> Seen {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => return Seen::Open,
            Ok(Ok(0)) => return Seen::Fin(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => return Seen::Reset,
            Ok(Err(e)) => panic!("unexpected read error: {e}"),
        }
    }
}

/// Asserts the proxy aborted `s` with RST within `within`, and returns when it did.
pub async fn expect_reset(s: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let seen = read_end(s, within).await;
    assert_eq!(seen, Seen::Reset, "expected RST");
    start.elapsed()
}

/// Asserts nothing arrives on `s` for `quiet` (the connection is still held open).
pub async fn expect_open(s: &mut TcpStream, quiet: Duration) {
    assert_eq!(
        read_end(s, quiet).await,
        Seen::Open,
        "expected the connection to stay open"
    );
}

/// Sends `msg`, reads back exactly as many bytes.
pub async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.expect("read echo");
    back
}

/// Closes `s` with RST instead of FIN.
pub fn rst(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One HTTP/1.1 request with `Connection: close`: (status, body). The Host is the address,
/// as curl sends it.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect to admin");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("admin answers in time")
        .expect("read response");
    let raw = String::from_utf8_lossy(&raw).to_string();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Raises this process's soft open-files limit to the hard one, once, as `halfguard run`
/// does for itself: an in-process proxy sizes its splice pipes from that limit, so a test
/// must not depend on the caller's `ulimit -Sn` (1024 on most desktops).
pub fn raise_nofile() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = halfguard::sockopt::raise_nofile();
    });
}

/// A directory under the system temp dir, removed with its contents when dropped, so a
/// test run (passed or failed) leaves nothing in /tmp.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// `$TMPDIR/halfguard-it-<pid>-<tag>-<n>`.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "halfguard-it-{}-{tag}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A file written into a fresh temp dir; the dir goes when the returned value does.
    pub fn file(tag: &str, name: &str, text: &str) -> TempFile {
        let dir = TempDir::new(tag);
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write a temp file");
        TempFile { path, _dir: dir }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file in a [`TempDir`] of its own; use it as a path.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    _dir: TempDir,
}

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempFile {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<OsStr> for TempFile {
    fn as_ref(&self) -> &OsStr {
        self.path.as_os_str()
    }
}

/// Something a test needs that an unprivileged user, or a machine without the tool, lacks.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// Effective uid 0 (network namespaces, nftables, mounts).
    Root,
    /// A program on `PATH`.
    Tool(&'static str),
    /// `unshare -rm`: a user and mount namespace of our own without root (most distributions
    /// allow it; some turn unprivileged user namespaces off).
    UserNamespace,
}

/// Set (CI does) to turn a skip into a failure, so a test that should run never passes by
/// skipping.
pub const REQUIRE_ALL: &str = "HALFGUARD_TEST_REQUIRE_ALL";

/// What of `needs` is missing here, in words ("root (ip netns)", "hping3"), or `None`.
pub fn missing(needs: &[Need], why: &str) -> Option<String> {
    let lacking: Vec<String> = needs
        .iter()
        .filter(|n| !have(**n))
        .map(|n| match n {
            Need::Root => format!("root ({why})"),
            Need::Tool(t) => format!("`{t}` on PATH"),
            Need::UserNamespace => "unprivileged user namespaces (`unshare -rm`)".to_string(),
        })
        .collect();
    (!lacking.is_empty()).then(|| lacking.join(", "))
}

fn have(need: Need) -> bool {
    match need {
        Need::Root => is_root(),
        Need::Tool(t) => on_path(t),
        Need::UserNamespace => std::process::Command::new("unshare")
            .args(["-rm", "true"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
    }
}

/// The owner of `/proc/self` is the effective uid: root without an unsafe `geteuid`.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(d.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Reports a skipped test on the real stderr (libtest captures `eprintln!`, so a passing
/// test's message would never be seen), or fails it when [`REQUIRE_ALL`] is set.
pub fn skip(test: &str, what: &str) {
    let test = test
        .trim_start_matches("it::")
        .split("::{{closure}}")
        .next()
        .unwrap_or(test)
        .trim_end_matches("::here");
    if std::env::var_os(REQUIRE_ALL).is_some() {
        panic!("{test}: needs {what}, and {REQUIRE_ALL} is set");
    }
    let _ = writeln!(io::stderr(), "SKIPPED {test}: needs {what}");
}

/// Returns from the calling test, after saying so, when something it needs is missing:
/// `require!("ip netns, nftables"; Need::Root, Need::Tool("nft"));`
#[macro_export]
macro_rules! require {
    ($why:expr; $($need:expr),+ $(,)?) => {
        if let Some(what) = $crate::support::missing(&[$($need),+], $why) {
            fn here() {}
            fn name_of<T>(_: T) -> &'static str {
                std::any::type_name::<T>()
            }
            $crate::support::skip(name_of(here), &what);
            return;
        }
    };
}

/// A port on 127.0.0.1 that was free a moment ago (bound on port 0, then released), for a
/// program that cannot be told port 0, such as redis-server.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("addr").port()
}

/// A redis-server of the test's own on loopback, without persistence, stopped (by its PID,
/// the child we spawned) when dropped or killed.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    args: Vec<String>,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts one on a free port with `extra` arguments (`--requirepass x`).
    pub async fn start(extra: &[&str]) -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
            _dir: TempDir::new("redis"),
        };
        r.restart().await;
        r
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (again) on the same port, and waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &self._dir.path().display().to_string()])
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let up = wait_until(Duration::from_secs(5), || async {
            match TcpStream::connect(addr).await {
                Ok(mut s) => {
                    // Any answer to PING (PONG, or NOAUTH with a password) means it serves.
                    let _ = s.write_all(b"PING\r\n").await;
                    let mut b = [0u8; 1];
                    matches!(
                        tokio::time::timeout(ms(200), s.read(&mut b)).await,
                        Ok(Ok(1))
                    )
                }
                Err(_) => false,
            }
        })
        .await;
        assert!(up, "redis-server did not come up on {addr}");
    }

    /// SIGKILL, as a crash: nothing is saved, clients see their connections reset.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls the async `f` every 20 ms until it says true, for at most `within`.
pub async fn wait_until<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Redis Cluster of `n` primaries on loopback (no replicas, no persistence), each a
/// [`RedisServer`] of the test's own, joined with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(n: usize) -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..n {
            // The bus port too: the default (port + 10000) may be past 65535.
            let bus = free_port().to_string();
            nodes.push(
                RedisServer::start(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                ])
                .await,
            );
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = RedisCluster { nodes };
        let ok = wait_until(Duration::from_secs(10), || async {
            c.nodes.iter().all(|r| {
                std::process::Command::new("redis-cli")
                    .args(["-p", &r.port.to_string(), "cluster", "info"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
            })
        })
        .await;
        assert!(ok, "the Redis Cluster did not reach cluster_state:ok");
        c
    }

    /// The seed URLs, comma-separated, as `cluster.redis` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|r| r.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A backend with a fixed pool of `workers`, as Apache's worker MPM or PostgreSQL: a
/// connection is accepted only when a worker is free, and holds it until it ends. Each
/// worker reads an HTTP/1 request head (giving up after `header_timeout`, as Apache's
/// mod_reqtimeout does), answers [`HTTP_OK`], and serves the next request on the same
/// connection until the client closes or stays quiet for `header_timeout`.
pub struct WorkerPool {
    pub addr: SocketAddr,
    /// Connections a worker took, ever.
    pub served_conns: Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn worker_pool(workers: usize, header_timeout: Duration) -> WorkerPool {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind pool");
    let addr = l.local_addr().expect("addr");
    let served_conns = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(workers));
    let count = served_conns.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = sem.clone().acquire_owned().await else {
                return;
            };
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let _permit = permit;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        if s.write_all(HTTP_OK_KEEPALIVE).await.is_err() {
                            return;
                        }
                    }
                    match tokio::time::timeout(header_timeout, s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    WorkerPool {
        addr,
        served_conns,
        task,
    }
}

/// What [`worker_pool`] answers: a keep-alive HTTP/1.1 response.
pub const HTTP_OK_KEEPALIVE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
