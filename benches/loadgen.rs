//! Load and attack generator for the measurements in `benches/` (see `benches/README.md`):
//! loopback only, bounded in count and time, stops by itself.
//!
//! ```text
//! loadgen echo   --listen 127.0.0.1:18081 --secs 60
//! loadgen cps    --target 127.0.0.1:18080 --conns 32 --secs 10
//! loadgen hold   --target 127.0.0.1:18080 --count 5000 --secs 5 --pid PID[,PID...] [--src IP]
//!                [--exchange N]
//! loadgen http   --target 127.0.0.1:17080 --src 127.0.0.2 --rate 40 --secs 30 [--path /small]
//!                [--closed [--pause-ms 0]]
//! loadgen attack --kind silent|halfclose|slowread|churn|drip --target 127.0.0.1:17080
//!                (--src 127.0.0.3 | --sources 200) --conns 4000 --rate 1000 --secs 30
//!                [--path /big] [--every 2000] [--rcvbuf 1024] [--read-bps 1024]
//! loadgen refuse --target 127.0.0.1:17080 --sources 200 --conns 100 --secs 10
//!                [--connect-ms 3000]
//! ```
//! - `echo` is a backend that echoes what it reads.
//! - `cps` opens, exchanges `--payload` bytes with, and closes connections from `--conns`
//!   workers and prints connections per second and latency percentiles.
//! - `hold` opens `--count` silent connections and prints the RSS growth (summed over the
//!   `--pid` list) per held connection, and the descriptors those processes hold.
//!   `--exchange N` makes each connection first send N bytes (`x`) and read them back (the
//!   backend is an `echo`) before it sits idle, as a pool's connections do after their first
//!   exchange.
//! - `http` is a legitimate client: open loop, `--rate` requests per second, each on a new
//!   connection (`Connection: close`), from `--src`. It prints one JSON line: requests,
//!   successes (status 200 and the whole body within `--timeout-ms`), failures by kind, and
//!   latency percentiles (connect to last byte). `--closed` makes it a closed loop instead:
//!   one request at a time, the next `--pause-ms` after the last ended (success or not), as
//!   a user's browser or a health checker does; `--rate` is then ignored.
//! - `attack` keeps up to `--conns` attacker connections from `--src`, opening at most
//!   `--rate` per second, and reopens one whenever the target ends it:
//!   `silent` connects and sends nothing; `halfclose` sends a request for `--path`, then FIN,
//!   and never reads; `slowread` sends that request and never reads (no FIN); `churn`
//!   connects and closes at once (a connect/close rate flood); `drip` sends a request line
//!   (`GET / HTTP/1.1`) and then a header that never ends, one byte every `--every`
//!   milliseconds (the slow-drip or slowloris attack). `--sources N` spreads the connections
//!   evenly over N addresses, 127.0.1.1 to 127.0.1.N (a many-source flood), instead of one
//!   `--src`. `--rcvbuf` sets the attacker sockets' `SO_RCVBUF` before they connect (a client
//!   that offers a tiny window); `--read-bps` makes a `slowread` connection take that many
//!   bytes a second instead of none. It prints one JSON line.
//! - `refuse` is a closed-loop connect flood against a target that refuses: `--conns`
//!   workers, each connecting from the next of `--sources` addresses (127.0.1.1 to
//!   127.0.1.N), waiting for the target to end the connection (RST or FIN, a refusal) and
//!   connecting again at once, as `wrk -c` does with a connection per request. It prints one
//!   JSON line: attempts, refusals (a reset seen at connect counts: the target accepted and
//!   reset it before the connect was seen done), connections the target
//!   answered with bytes, and connects that failed or timed out (`--connect-ms`, 3 s by
//!   default: a SYN dropped in the kernel is retried by the client, and a short timeout keeps
//!   the flood going).
//!
//! Every address (target, listen, source) must be a loopback address. Run without
//! arguments (as `cargo test --all-targets` does), it exits at once, silently.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Hard caps, whatever the arguments say: the traffic rules want every loop bounded.
const MAX_SECS: u64 = 120;
const MAX_CONNS: usize = 256;
const MAX_HOLD: usize = 9_000;
/// Attacker sockets open at once (200 sources x 20 for the many-source drip), and new
/// attacker connections per second.
const MAX_ATTACK_CONNS: usize = 4_000;
const MAX_ATTACK_RATE: u64 = 20_000;
/// Legit requests per second, and requests in flight.
const MAX_HTTP_RATE: u64 = 5_000;
const MAX_IN_FLIGHT: usize = 512;
/// Attacker source addresses (`--sources`), 127.0.1.1 to 127.0.1.254 at most.
const MAX_SOURCES: u64 = 254;
/// Drip interval bounds (`--every`, milliseconds).
const MIN_EVERY_MS: u64 = 10;
const MAX_EVERY_MS: u64 = 60_000;

struct Args(Vec<String>);

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_loopback(),
        IpAddr::V6(v) => v.is_loopback(),
    }
}

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == name)?;
        self.0.get(i + 1).map(String::as_str)
    }
    fn num(&self, name: &str, default: u64) -> u64 {
        match self.get(name) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| usage(&format!("{name}: not a number: {v}"))),
        }
    }
    fn addr(&self, name: &str) -> SocketAddr {
        let a: SocketAddr = self
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage(&format!("{name} ADDR is required")));
        if !is_loopback(a.ip()) {
            usage("only loopback addresses are allowed");
        }
        a
    }
    /// `--src IP`: the loopback address connections are made from (default: the kernel's).
    fn src(&self) -> Option<IpAddr> {
        let v = self.get("--src")?;
        let ip: IpAddr = v
            .parse()
            .unwrap_or_else(|_| usage(&format!("--src: not an address: {v}")));
        if !is_loopback(ip) {
            usage("only loopback addresses are allowed");
        }
        Some(ip)
    }
}

fn usage(why: &str) -> ! {
    eprintln!(
        "loadgen: {why}\nusage: loadgen echo|cps|hold|http|attack ... (see benches/loadgen.rs)"
    );
    std::process::exit(2)
}

fn main() {
    let args = Args(std::env::args().skip(1).collect());
    // `cargo test --all-targets` and `cargo bench` run every bench target with no mode (or
    // only cargo's own flags): there is nothing to do, and nothing worth saying.
    let Some(mode) = args.0.first().cloned().filter(|m| !m.starts_with('-')) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let secs = args.num("--secs", 10).min(MAX_SECS);
    rt.block_on(async {
        match mode.as_str() {
            "echo" => echo(args.addr("--listen"), secs).await,
            "cps" => cps(&args, secs).await,
            "hold" => hold(&args, secs).await,
            "http" => http(&args, secs).await,
            "attack" => attack(&args, secs).await,
            "refuse" => refuse(&args, secs).await,
            _ => usage("unknown mode"),
        }
    });
}

/// A TCP connection to `target`, from `src` when given. The port is picked at connect
/// (`IP_BIND_ADDRESS_NO_PORT`), so a bound source does not exhaust ports as fast as a plain
/// `bind(ip:0)` would.
async fn connect_from(src: Option<IpAddr>, target: SocketAddr) -> std::io::Result<TcpStream> {
    connect_with(src, target, None).await
}

/// `connect_from` with the socket's receive buffer set before the handshake (so the window
/// the client offers is that small from its SYN on), as a client with `SO_RCVBUF` does.
async fn connect_with(
    src: Option<IpAddr>,
    target: SocketAddr,
    rcvbuf: Option<u32>,
) -> std::io::Result<TcpStream> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(bytes) = rcvbuf {
        sock.set_recv_buffer_size(bytes)?;
    }
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int we own, on a socket we own.
        let _ = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    sock.connect(target).await
}

/// The kernel's TCP state of a socket (`tcpi_state`: 1 established, 4/5 FIN_WAIT1/2,
/// 7 closed, 8 CLOSE_WAIT, ...), or 0 when it cannot be read.
fn tcp_state(s: &TcpStream) -> u8 {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a buffer we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r == 0 && len > 0 { info[0] } else { 0 }
}

/// Is the connection still held by the other side? Established, or our FIN sent and theirs
/// not yet received.
fn peer_holds(s: &TcpStream) -> bool {
    matches!(tcp_state(s), 1 | 4 | 5)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

async fn echo(listen: SocketAddr, secs: u64) {
    let l = TcpListener::bind(listen).await.expect("bind");
    println!("echo: listening on {listen} for {secs}s");
    let _ = tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    })
    .await;
}

async fn cps(args: &Args, secs: u64) {
    let target = args.addr("--target");
    let src = args.src();
    let conns = (args.num("--conns", 32) as usize).clamp(1, MAX_CONNS);
    let payload = vec![b'x'; args.num("--payload", 64).clamp(1, 1 << 20) as usize];
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Arc::new(payload);
    let mut workers = Vec::new();
    let start = Instant::now();
    for _ in 0..conns {
        let (stop, payload) = (stop.clone(), payload.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut back = vec![0u8; payload.len()];
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = async {
                    let mut s = connect_from(src, target).await?;
                    s.set_nodelay(true)?;
                    s.write_all(&payload).await?;
                    s.read_exact(&mut back).await?;
                    s.shutdown().await?;
                    // Wait for the server's FIN, so the connection is really over.
                    let mut end = [0u8; 1];
                    match s.read(&mut end).await? {
                        0 => std::io::Result::Ok(()),
                        _ => Err(std::io::Error::other("bytes after the echo")),
                    }
                }
                .await;
                match ok {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.expect("worker");
        lat.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "cps target={target} conns={conns} payload={} secs={elapsed:.1} connections={} errors={errors} cps={:.0} p50_us={:.0} p99_us={:.0}",
        payload.len(),
        lat.len(),
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    );
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// RSS summed over several processes (a master and its workers), if all can be read.
fn rss_sum_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| rss_kib(p)).sum()
}

fn fds(pids: &[u32]) -> usize {
    pids.iter()
        .map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |d| d.count()))
        .sum()
}

async fn hold(args: &Args, secs: u64) {
    let target = args.addr("--target");
    let src = args.src();
    let count = (args.num("--count", 1000) as usize).min(MAX_HOLD);
    let pids: Vec<u32> = args
        .get("--pid")
        .unwrap_or("")
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let settle = Duration::from_millis(args.num("--settle-ms", 1500).min(10_000));
    let exchange = vec![b'x'; args.num("--exchange", 0).min(64 * 1024) as usize];
    let before = rss_sum_kib(&pids);
    let fds_before = fds(&pids);
    let mut held = Vec::with_capacity(count);
    let mut back = vec![0u8; exchange.len()];
    for _ in 0..count {
        let open = async {
            let mut s = connect_from(src, target).await?;
            if !exchange.is_empty() {
                s.set_nodelay(true)?;
                s.write_all(&exchange).await?;
                s.read_exact(&mut back).await?;
            }
            std::io::Result::Ok(s)
        };
        match tokio::time::timeout(Duration::from_secs(3), open).await {
            Ok(Ok(s)) => held.push(s),
            Ok(Err(e)) => {
                eprintln!("hold: connect failed after {}: {e}", held.len());
                break;
            }
            Err(_) => {
                eprintln!("hold: connect timed out after {}", held.len());
                break;
            }
        }
    }
    // Let the proxy accept and settle.
    tokio::time::sleep(settle).await;
    let during = rss_sum_kib(&pids);
    let alive = held.iter().filter(|s| peer_holds(s)).count();
    println!(
        "hold target={target} exchange={} held={} alive={alive} rss_before_kib={} rss_held_kib={} per_conn_bytes={} fds_before={fds_before} fds_held={}",
        exchange.len(),
        held.len(),
        before.map_or("?".into(), |v| v.to_string()),
        during.map_or("?".into(), |v| v.to_string()),
        match (before, during) {
            (Some(b), Some(d)) if !held.is_empty() => (((d as f64 - b as f64) * 1024.0)
                / held.len() as f64)
                .round()
                .to_string(),
            _ => "?".into(),
        },
        fds(&pids)
    );
    tokio::time::sleep(Duration::from_secs(secs.saturating_sub(2))).await;
}

/// What one legit request came to.
enum Outcome {
    Ok(Duration),
    Connect,
    Reset,
    Timeout,
    BadResponse,
}

/// One request on a new connection: status 200 and a body as long as `Content-Length`.
async fn one_request(src: Option<IpAddr>, target: SocketAddr, req: &[u8]) -> Outcome {
    let t = Instant::now();
    let mut s = match connect_from(src, target).await {
        Ok(s) => s,
        Err(_) => return Outcome::Connect,
    };
    let _ = s.set_nodelay(true);
    if s.write_all(req).await.is_err() {
        return Outcome::Reset;
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > (1 << 20) {
                    return Outcome::BadResponse;
                }
            }
            Err(_) => return Outcome::Reset,
        }
    }
    let elapsed = t.elapsed();
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.is_empty() {
            Outcome::Reset
        } else {
            Outcome::BadResponse
        };
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Outcome::BadResponse;
    }
    let body = buf.len() - head_end - 4;
    let len_ok = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_none_or(|n| n == body);
    if len_ok {
        Outcome::Ok(elapsed)
    } else {
        Outcome::BadResponse
    }
}

async fn http(args: &Args, secs: u64) {
    let target = args.addr("--target");
    let src = args.src();
    let rate = args.num("--rate", 40).clamp(1, MAX_HTTP_RATE);
    let timeout = Duration::from_millis(args.num("--timeout-ms", 3000).clamp(10, 30_000));
    let path = args.get("--path").unwrap_or("/small").to_string();
    let req: Arc<[u8]> = format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: loadgen\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
    .into();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::new()));
    let mut overloaded = 0u64;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let closed = args.0.iter().any(|a| a == "--closed");
    let pause = Duration::from_millis(args.num("--pause-ms", 0).min(10_000));
    let mut tasks = tokio::task::JoinSet::new();
    // A closed loop: each request waits for the last (a stuck one holds the loop up to
    // `--timeout-ms`, so a slow target gets fewer requests, not more failures).
    while closed && Instant::now() < end {
        let o = tokio::time::timeout(timeout, one_request(src, target, &req))
            .await
            .unwrap_or(Outcome::Timeout);
        results.lock().expect("results").push(o);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    while !closed && Instant::now() < end {
        tick.tick().await;
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            overloaded += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (req, in_flight, results) = (req.clone(), in_flight.clone(), results.clone());
        tasks.spawn(async move {
            let o = tokio::time::timeout(timeout, one_request(src, target, &req))
                .await
                .unwrap_or(Outcome::Timeout);
            results.lock().expect("results").push(o);
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let results = std::mem::take(&mut *results.lock().expect("results"));
    let (mut connect, mut reset, mut timed_out, mut bad) = (0u64, 0u64, 0u64, 0u64);
    let mut lat = Vec::with_capacity(results.len());
    for o in &results {
        match o {
            Outcome::Ok(d) => lat.push(*d),
            Outcome::Connect => connect += 1,
            Outcome::Reset => reset += 1,
            Outcome::Timeout => timed_out += 1,
            Outcome::BadResponse => bad += 1,
        }
    }
    lat.sort();
    let requests = results.len() as u64 + overloaded;
    let ok = lat.len() as u64;
    println!(
        "{}",
        serde_json::json!({
            "mode": "http", "target": target.to_string(),
            "src": src.map(|s| s.to_string()), "rate": (!closed).then_some(rate),
            "closed": closed, "secs": secs,
            "requests": requests, "ok": ok,
            "success_pct": if requests > 0 { ok as f64 * 100.0 / requests as f64 } else { 0.0 },
            "fail_connect": connect, "fail_reset": reset, "fail_timeout": timed_out,
            "fail_bad_response": bad, "fail_overloaded": overloaded,
            "p50_us": percentile(&lat, 0.50).round(), "p99_us": percentile(&lat, 0.99).round(),
            "max_us": lat.last().map_or(0.0, |d| (d.as_secs_f64() * 1e6).round()),
        })
    );
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Silent,
    HalfClose,
    SlowRead,
    Churn,
    Drip,
}

#[derive(Default)]
struct AttackStats {
    attempts: AtomicU64,
    connected: AtomicU64,
    connect_errors: AtomicU64,
    ended_by_target: AtomicU64,
    live: AtomicUsize,
    max_live: AtomicUsize,
    /// Bytes the drip sent after its request line.
    dripped: AtomicU64,
    /// Bytes the slow readers took (`--read-bps`).
    read: AtomicU64,
    /// How long each connection the target ended had lived, in milliseconds.
    lifetimes_ms: Mutex<Vec<u32>>,
    /// Failed connects by cause (errno name, or "timeout").
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl AttackStats {
    fn connect_failed(&self, cause: String) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
        *self
            .errors
            .lock()
            .expect("errors")
            .entry(cause)
            .or_default() += 1;
    }

    fn ended(&self, born: Instant) {
        self.ended_by_target.fetch_add(1, Ordering::Relaxed);
        let ms = born.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
        self.lifetimes_ms.lock().expect("lifetimes").push(ms);
    }
}

/// The drip's endless header: a name, then the same byte for ever, never a line end.
const DRIP_HEADER: &[u8] = b"X-Drip: ";

/// A drip connection after its request line: one header byte every `every` until the target
/// ends the connection (a read sees its FIN or RST, or a write fails) or the attack ends.
/// Whatever the target answers is read and dropped. Returns true when the target ended it.
async fn drip(s: &mut TcpStream, every: Duration, end: Instant, st: &AttackStats) -> bool {
    let mut next = Instant::now() + every;
    let mut sent = 0usize;
    let mut sink = [0u8; 4096];
    loop {
        let wake = next.min(end);
        tokio::select! {
            r = s.read(&mut sink) => match r {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            },
            () = tokio::time::sleep_until(wake.into()) => {
                if Instant::now() >= end {
                    return false;
                }
                let byte = DRIP_HEADER.get(sent).copied().unwrap_or(b'a');
                if s.write_all(&[byte]).await.is_err() {
                    return true;
                }
                sent += 1;
                st.dripped.fetch_add(1, Ordering::Relaxed);
                next += every;
            }
        }
    }
}

/// One attacker connection: connect, do what the kind does, then hold until the target ends
/// the connection or the attack ends.
/// How a client socket behaves beyond its kind: its receive buffer, and how many bytes a
/// second a `slowread` connection takes (0: none).
#[derive(Clone, Copy)]
struct Reader {
    rcvbuf: Option<u32>,
    bps: u64,
}

/// A slow reader: `bps` bytes a second in one read each second, until the target ends the
/// connection or the attack ends. Returns true when the target ended it.
async fn read_slowly(s: &mut TcpStream, bps: u64, end: Instant, st: &AttackStats) -> bool {
    let mut buf = vec![0u8; bps.clamp(1, 1 << 20) as usize];
    loop {
        let now = Instant::now();
        if now >= end {
            return false;
        }
        tokio::time::sleep((end - now).min(Duration::from_secs(1))).await;
        if Instant::now() >= end {
            return false;
        }
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => {
                st.read.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => {
                if !peer_holds(s) {
                    return true;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn attack_one(
    kind: Kind,
    src: Option<IpAddr>,
    target: SocketAddr,
    req: Arc<[u8]>,
    every: Duration,
    reader: Reader,
    end: Instant,
    st: Arc<AttackStats>,
) {
    st.attempts.fetch_add(1, Ordering::Relaxed);
    let connect = connect_with(src, target, reader.rcvbuf);
    let s = match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            st.connect_failed(format!("{:?}", e.kind()));
            return;
        }
        Err(_) => {
            st.connect_failed("timeout".into());
            return;
        }
    };
    st.connected.fetch_add(1, Ordering::Relaxed);
    let born = Instant::now();
    let mut s = s;
    match kind {
        Kind::Churn => return,
        Kind::Silent => {}
        Kind::HalfClose | Kind::SlowRead | Kind::Drip => {
            if s.write_all(&req).await.is_err() {
                st.ended(born);
                return;
            }
            if kind == Kind::HalfClose {
                let _ = s.shutdown().await;
            }
            if kind == Kind::Drip {
                if drip(&mut s, every, end, &st).await {
                    st.ended(born);
                }
                return;
            }
            if kind == Kind::SlowRead && reader.bps > 0 {
                if read_slowly(&mut s, reader.bps, end, &st).await {
                    st.ended(born);
                }
                return;
            }
        }
    }
    // Never read: look at the kernel's state of the socket once a second instead.
    loop {
        let now = Instant::now();
        if now >= end {
            return;
        }
        tokio::time::sleep((end - now).min(Duration::from_secs(1))).await;
        if !peer_holds(&s) {
            st.ended(born);
            return;
        }
    }
}

async fn attack(args: &Args, secs: u64) {
    let target = args.addr("--target");
    let kind = match args.get("--kind") {
        Some("silent") => Kind::Silent,
        Some("halfclose") => Kind::HalfClose,
        Some("slowread") => Kind::SlowRead,
        Some("churn") => Kind::Churn,
        Some("drip") => Kind::Drip,
        _ => usage("--kind silent|halfclose|slowread|churn|drip is required"),
    };
    // One source (`--src`, or the kernel's pick), or `--sources N` addresses 127.0.1.1..N.
    let sources: Vec<Option<IpAddr>> = match args.get("--sources") {
        None => vec![args.src()],
        Some(_) if args.get("--src").is_some() => usage("--src and --sources exclude each other"),
        Some(_) => {
            let n = args.num("--sources", 1);
            if !(1..=MAX_SOURCES).contains(&n) {
                usage(&format!("--sources: 1 to {MAX_SOURCES}"));
            }
            (1..=n as u8)
                .map(|i| Some(IpAddr::from([127, 0, 1, i])))
                .collect()
        }
    };
    let conns = (args.num("--conns", 1000) as usize).clamp(1, MAX_ATTACK_CONNS);
    let rate = args.num("--rate", 1000).clamp(1, MAX_ATTACK_RATE);
    let every = Duration::from_millis(args.num("--every", 2000).clamp(MIN_EVERY_MS, MAX_EVERY_MS));
    let reader = Reader {
        rcvbuf: args
            .get("--rcvbuf")
            .map(|_| args.num("--rcvbuf", 0).clamp(256, 8 << 20) as u32),
        bps: args.num("--read-bps", 0).min(1 << 20),
    };
    let path = args.get("--path").unwrap_or("/big").to_string();
    let req: Arc<[u8]> = match kind {
        Kind::Drip => b"GET / HTTP/1.1\r\n".as_slice().into(),
        _ => format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n")
            .into_bytes()
            .into(),
    };
    // Each source holds at most its share of `conns`; a connection the target ends is
    // reopened from a source below its share, so every source stays at its share.
    let share = conns.div_ceil(sources.len());
    let per_source: Arc<Vec<AtomicUsize>> =
        Arc::new(sources.iter().map(|_| AtomicUsize::new(0)).collect());
    let mut cursor = 0usize;
    let st = Arc::new(AttackStats::default());
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut started = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < end {
        // Token bucket without a burst: at most `rate` new connections per elapsed second.
        let allowed = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while started < allowed && st.live.load(Ordering::Relaxed) < conns {
            // The next source below its share; there is one, since the shares add up to
            // `conns` or more and fewer than `conns` are live.
            let Some(i) = (0..sources.len())
                .map(|k| (cursor + k) % sources.len())
                .find(|&i| per_source[i].load(Ordering::Relaxed) < share)
            else {
                break;
            };
            cursor = i + 1;
            per_source[i].fetch_add(1, Ordering::Relaxed);
            started += 1;
            let live = st.live.fetch_add(1, Ordering::Relaxed) + 1;
            st.max_live.fetch_max(live, Ordering::Relaxed);
            let (st, req, per_source, src) =
                (st.clone(), req.clone(), per_source.clone(), sources[i]);
            tasks.spawn(async move {
                attack_one(kind, src, target, req, every, reader, end, st.clone()).await;
                per_source[i].fetch_sub(1, Ordering::Relaxed);
                st.live.fetch_sub(1, Ordering::Relaxed);
            });
        }
        // Do not bank unused tokens while at the connection cap.
        if st.live.load(Ordering::Relaxed) >= conns {
            started = started.max(allowed);
        }
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Every connection task ends by `end` (connects are bounded to 3 s).
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let mut life = std::mem::take(&mut *st.lifetimes_ms.lock().expect("lifetimes"));
    life.sort_unstable();
    let life_pct = |p: f64| -> u32 {
        life.get(((life.len() as f64 * p) as usize).min(life.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{}",
        serde_json::json!({
            "mode": "attack",
            "kind": args.get("--kind"), "target": target.to_string(),
            "src": if sources.len() == 1 { sources[0].map(|s| s.to_string()) } else { None },
            "sources": sources.len(),
            "conns": conns, "rate": rate, "secs": secs,
            "every_ms": (kind == Kind::Drip).then_some(every.as_millis() as u64),
            "attempts": st.attempts.load(Ordering::Relaxed),
            "connected": st.connected.load(Ordering::Relaxed),
            "connect_errors": st.connect_errors.load(Ordering::Relaxed),
            "ended_by_target": st.ended_by_target.load(Ordering::Relaxed),
            "max_live": st.max_live.load(Ordering::Relaxed),
            "dripped_bytes": st.dripped.load(Ordering::Relaxed),
            "read_bytes": st.read.load(Ordering::Relaxed),
            "lifetime_ms_p50": life_pct(0.50), "lifetime_ms_p90": life_pct(0.90),
            "connect_errors_by": *st.errors.lock().expect("errors"),
        })
    );
}

/// Counts of a `refuse` run.
#[derive(Default)]
struct RefuseStats {
    attempts: AtomicU64,
    refused: AtomicU64,
    answered: AtomicU64,
    connect_errors: AtomicU64,
    connect_timeouts: AtomicU64,
    wait_timeouts: AtomicU64,
}

async fn refuse(args: &Args, secs: u64) {
    let target = args.addr("--target");
    let n = args.num("--sources", 1);
    if !(1..=MAX_SOURCES).contains(&n) {
        usage(&format!("--sources: 1 to {MAX_SOURCES}"));
    }
    let sources: Arc<[IpAddr]> = (1..=n as u8)
        .map(|i| IpAddr::from([127, 0, 1, i]))
        .collect();
    let conns = (args.num("--conns", 100) as usize).clamp(1, MAX_CONNS);
    let connect_wait = Duration::from_millis(args.num("--connect-ms", 3000).clamp(10, 10_000));
    let st = Arc::new(RefuseStats::default());
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..conns {
        let (st, sources) = (st.clone(), sources.clone());
        tasks.spawn(async move {
            let mut i = w;
            while Instant::now() < end {
                let src = sources[i % sources.len()];
                i += conns;
                st.attempts.fetch_add(1, Ordering::Relaxed);
                let s = match tokio::time::timeout(connect_wait, connect_from(Some(src), target))
                    .await
                {
                    Ok(Ok(s)) => s,
                    // The target accepted and reset it before the connect was seen done.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        st.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Err(_)) => {
                        st.connect_errors.fetch_add(1, Ordering::Relaxed);
                        // A refused connect (nothing listens) must not spin.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    Err(_) => {
                        st.connect_timeouts.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let mut s = s;
                let mut b = [0u8; 1];
                match tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => st.refused.fetch_add(1, Ordering::Relaxed),
                    Ok(Ok(_)) => st.answered.fetch_add(1, Ordering::Relaxed),
                    Err(_) => st.wait_timeouts.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let took = start.elapsed().as_secs_f64();
    let refused = st.refused.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "mode": "refuse", "target": target.to_string(), "sources": n,
            "conns": conns, "secs": took,
            "attempts": st.attempts.load(Ordering::Relaxed),
            "refused": refused,
            "refused_per_s": (refused as f64 / took).round(),
            "answered": st.answered.load(Ordering::Relaxed),
            "connect_errors": st.connect_errors.load(Ordering::Relaxed),
            "connect_timeouts": st.connect_timeouts.load(Ordering::Relaxed),
            "wait_timeouts": st.wait_timeouts.load(Ordering::Relaxed),
        })
    );
}
