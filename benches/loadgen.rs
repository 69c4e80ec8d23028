//! Load generator for the measurements in the README: loopback only, bounded in count and
//! time, stops by itself.
//!
//! ```text
//! cargo bench --bench loadgen -- echo  --listen 127.0.0.1:18081 --secs 60
//! cargo bench --bench loadgen -- cps   --target 127.0.0.1:18080 --conns 32 --secs 10
//! cargo bench --bench loadgen -- hold  --target 127.0.0.1:18080 --count 5000 --secs 5 --pid PID
//! ```
//! `echo` is a backend; `cps` opens, exchanges `--payload` bytes with, and closes
//! connections from `--conns` workers and prints connections per second and latency
//! percentiles; `hold` opens `--count` silent connections and prints the RSS growth of
//! process `--pid` per held connection. Run without arguments (as `cargo test
//! --all-targets` does), it prints this usage and exits.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Hard caps, whatever the arguments say: the traffic rules want every loop bounded.
const MAX_SECS: u64 = 120;
const MAX_CONNS: usize = 256;
const MAX_HOLD: usize = 9_000;

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == name)?;
        self.0.get(i + 1).map(String::as_str)
    }
    fn num(&self, name: &str, default: u64) -> u64 {
        self.get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
    fn addr(&self, name: &str) -> SocketAddr {
        let a: SocketAddr = self
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage(&format!("{name} ADDR is required")));
        let loopback = match a.ip() {
            IpAddr::V4(v) => v.is_loopback(),
            IpAddr::V6(v) => v.is_loopback(),
        };
        if !loopback {
            usage("only loopback addresses are allowed");
        }
        a
    }
}

fn usage(why: &str) -> ! {
    eprintln!("loadgen: {why}\nusage: loadgen echo|cps|hold ... (see benches/loadgen.rs)");
    std::process::exit(2)
}

fn main() {
    let args = Args(std::env::args().skip(1).collect());
    let Some(mode) = args.0.first().cloned().filter(|m| !m.starts_with('-')) else {
        println!("loadgen: no mode given (echo | cps | hold); nothing to do");
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
            _ => usage("unknown mode"),
        }
    });
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
                    let mut s = TcpStream::connect(target).await?;
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
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "cps target={target} conns={conns} payload={} secs={elapsed:.1} connections={} errors={errors} cps={:.0} p50_us={:.0} p99_us={:.0}",
        payload.len(),
        lat.len(),
        lat.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99)
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

async fn hold(args: &Args, secs: u64) {
    let target = args.addr("--target");
    let count = (args.num("--count", 1000) as usize).min(MAX_HOLD);
    let pid = args.num("--pid", 0) as u32;
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        match TcpStream::connect(target).await {
            Ok(s) => held.push(s),
            Err(e) => {
                eprintln!("hold: connect failed after {}: {e}", held.len());
                break;
            }
        }
    }
    // Let the proxy accept and settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = rss_kib(pid);
    println!(
        "hold target={target} held={} rss_before_kib={} rss_held_kib={} per_conn_bytes={}",
        held.len(),
        before.map_or("?".into(), |v| v.to_string()),
        during.map_or("?".into(), |v| v.to_string()),
        match (before, during) {
            (Some(b), Some(d)) if !held.is_empty() => (((d as f64 - b as f64) * 1024.0)
                / held.len() as f64)
                .round()
                .to_string(),
            _ => "?".into(),
        }
    );
    tokio::time::sleep(Duration::from_secs(secs.saturating_sub(2))).await;
}
