//! Memory as an input of pressure mode: fake `/proc` files (Envoy's "fake resource
//! monitor") turn it on and off and shorten a live clock; a real v1 memory cgroup shows in
//! `/metrics`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use halfguard::config;
use halfguard::memory::MemorySource;
use halfguard::stats::Timeout;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::cli::{Reap, start, temp_config};
use crate::require;
use crate::support::*;

/// A silent connection's clock is 10 s normally, 300 ms under pressure; the connection
/// marks are far away (only memory can turn pressure on here). tcp_mem's pressure value
/// is 2000 pages: memory pressure above 1800, over at 1500.
fn config_text(backend: SocketAddr) -> String {
    format!(
        r#"
[[listeners]]
name = "{L}"
bind = "127.0.0.1:0"
backends = ["{backend}"]

[limits]
conn_rate_per_source = 0
max_conns_per_source = 0
max_half_open_per_source = 0
max_half_closed_per_source = 0

[timeouts]
first_byte = "10s"

[pressure]
first_byte = "300ms"
tcp_mem_high = 0.9
tcp_mem_low = 0.75

[tcp]
keepalive_idle = "0s"

[admin]
bind = "127.0.0.1:0"
"#
    )
}

/// Writes the fake kernel's TCP memory, in pages, as `/proc/net/sockstat` says it.
fn tcp_pages(root: &Path, pages: u64) {
    std::fs::write(
        root.join("proc/net/sockstat"),
        format!(
            "sockets: used 9\nTCP: inuse 3 orphan 7 tw 0 alloc 3 mem {pages}\nUDP: inuse 0 mem 0\n"
        ),
    )
    .unwrap();
}

/// The value of the sample `series` (name and labels, exactly) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_tcp_memory_past_its_mark_cuts_a_silent_connection_at_the_pressure_clock() {
    let b = backend(Backend::Echo).await;
    let file = TempDir::file("memory", "halfguard.toml", &config_text(b.addr));
    let cfg = config::load_with_env(&file, HashMap::new()).expect("valid test config");
    let root = TempDir::new("memory-root");
    std::fs::create_dir_all(root.path().join("proc/net")).unwrap();
    std::fs::create_dir_all(root.path().join("proc/sys/net/ipv4")).unwrap();
    std::fs::write(
        root.path().join("proc/sys/net/ipv4/tcp_mem"),
        "1500\t2000\t3000\n",
    )
    .unwrap();
    tcp_pages(root.path(), 100);
    let p = Proxy::start(cfg).await;
    p.handle
        .read_memory_from(MemorySource::at(root.path().to_path_buf()));
    let admin = p.handle.admin_addr().expect("admin is on");

    // Plenty of memory: a silent connection keeps its 10 s.
    let metrics = wait_for_scrape(admin, "halfguard_kernel_tcp_orphans", 7.0).await;
    assert_eq!(sample(&metrics, "halfguard_memory_pressure"), Some(0.0));
    let mut early = TcpStream::connect(p.addr).await.unwrap();
    expect_open(&mut early, ms(1200)).await;
    assert!(!p.snapshot().pressure);

    // The kernel's TCP memory passes 90% of tcp_mem's pressure value.
    tcp_pages(root.path(), 1900);
    let on = Instant::now();
    assert!(
        wait_for(ms(2500), || p.snapshot().pressure.then_some(()))
            .await
            .is_some(),
        "memory pressure did not turn pressure mode on"
    );
    // The connection already older than 300 ms hears the bell and goes at once.
    let took = expect_reset(&mut early, ms(2000)).await;
    assert!(
        on.elapsed() < ms(2500),
        "the live connection went {took:?} after pressure: the bell was not heard"
    );
    // A new silent one gets the pressure clock: 300 ms, not 10 s.
    let mut late = TcpStream::connect(p.addr).await.unwrap();
    let took = expect_reset(&mut late, ms(3000)).await;
    assert!(
        took >= ms(250) && took < ms(1500),
        "pressure first_byte fired after {took:?}"
    );
    assert_eq!(p.stats().timed_out(Timeout::FirstByte), 2);
    let metrics = scrape(admin).await;
    assert_eq!(sample(&metrics, "halfguard_memory_pressure"), Some(1.0));
    assert_eq!(
        sample(&metrics, &format!("halfguard_pressure{{listener=\"{L}\"}}")),
        Some(1.0)
    );
    let bytes = sample(&metrics, "halfguard_kernel_tcp_memory_bytes").expect("tcp memory");
    let page = bytes / 1900.0;
    assert!(
        page >= 4096.0 && page.fract() == 0.0,
        "sockstat's pages in bytes: {bytes}"
    );
    assert_eq!(
        sample(
            &metrics,
            "halfguard_kernel_tcp_memory_limit_bytes{level=\"pressure\"}"
        ),
        Some(2000.0 * page)
    );

    // Back to 1600 pages: below the high mark but above the low one, pressure stays.
    tcp_pages(root.path(), 1600);
    tokio::time::sleep(ms(1500)).await;
    assert!(p.snapshot().pressure, "hysteresis: 1600 is above 1500");
    // Under the low mark, it ends, and a silent connection has its 10 s again.
    tcp_pages(root.path(), 1400);
    assert!(
        wait_for(ms(2500), || (!p.snapshot().pressure).then_some(()))
            .await
            .is_some(),
        "memory pressure did not end"
    );
    let mut calm = TcpStream::connect(p.addr).await.unwrap();
    expect_open(&mut calm, ms(800)).await;
    assert_eq!(
        sample(&scrape(admin).await, "halfguard_memory_pressure"),
        Some(0.0)
    );
    drop(calm);
    p.assert_drained(ms(2000)).await;
}

/// Scrapes until `series` reads `want` (the upkeep reads memory once a second).
async fn wait_for_scrape(admin: SocketAddr, series: &str, want: f64) -> String {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let s = scrape(admin).await;
        if sample(&s, series) == Some(want) || Instant::now() >= end {
            return s;
        }
        tokio::time::sleep(ms(100)).await;
    }
}

/// A v1 memory cgroup of our own, removed when dropped (once it is empty).
struct Cgroup(std::path::PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_v1_memory_cgroup_limit_shows_in_metrics() {
    require!("a memory cgroup of our own"; Need::Root);
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let dir = v1.join(format!("halfguard-test-{}", std::process::id()));
    if !v1.join("cgroup.procs").exists() || std::fs::create_dir(&dir).is_err() {
        skip(
            "memory::a_real_v1_memory_cgroup_limit_shows_in_metrics",
            "a writable cgroup v1 memory hierarchy at /sys/fs/cgroup/memory",
        );
        return;
    }
    let cg = Cgroup(dir);
    const LIMIT: u64 = 192 << 20;
    std::fs::write(cg.0.join("memory.limit_in_bytes"), LIMIT.to_string()).unwrap();

    let b = backend(Backend::Echo).await;
    let admin_port = crate::cli::free_port();
    let (cfg, _port) = temp_config(b.addr, &format!("bind = \"127.0.0.1:{admin_port}\""), "");
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    // In the cgroup before halfguard starts (the shell joins it, then becomes halfguard):
    // the byte caps are cut from the limit at start.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$1" && exec "$2" run -c "$3""#)
        .arg("sh")
        .arg(cg.0.join("cgroup.procs"))
        .arg(env!("CARGO_BIN_EXE_halfguard"))
        .arg(&cfg);
    let mut child = Reap(start(cmd));

    let metrics = wait_for_scrape(
        admin,
        "halfguard_cgroup_memory_bytes{kind=\"limit\"}",
        LIMIT as f64,
    )
    .await;
    assert_eq!(
        sample(&metrics, "halfguard_cgroup_memory_bytes{kind=\"limit\"}"),
        Some(LIMIT as f64),
        "{metrics}"
    );
    let usage = sample(&metrics, "halfguard_cgroup_memory_bytes{kind=\"usage\"}")
        .expect("usage beside the limit");
    assert!(usage < LIMIT as f64, "usage {usage}");
    assert_eq!(sample(&metrics, "halfguard_memory_pressure"), Some(0.0));
    // The shipped 64 MiB byte cap does not fit a quarter of 192 MiB: lowered to 48 MiB, the
    // per-source cap in proportion (12 to 9 MiB).
    let cap = |scope: &str| {
        sample(
            &metrics,
            &format!("halfguard_queued_bytes_limit{{listener=\"cli\",scope=\"{scope}\"}}"),
        )
    };
    assert_eq!(cap("listener"), Some((48u64 << 20) as f64), "{metrics}");
    assert_eq!(cap("source"), Some((9u64 << 20) as f64));

    let _ = child.0.kill();
    let _ = child.0.wait();
    // The cgroup empties as the process is reaped; `Cgroup` removes it.
    let gone = std::fs::read_to_string(cg.0.join("cgroup.procs")).unwrap_or_default();
    assert!(gone.trim().is_empty(), "left in the cgroup: {gone}");
}

/// The byte caps are cut from the memory found: at a reload that finds `tcp_mem`'s pressure
/// mark at 128 MiB, the listeners' caps share an eighth of it (16 MiB), and the shipped caps
/// are lowered in proportion; a scrape shows them as applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_caps_are_lowered_to_fit_the_memory_found() {
    let b = backend(Backend::Echo).await;
    let file = TempDir::file("memory", "halfguard.toml", &config_text(b.addr));
    let cfg = config::load_with_env(&file, HashMap::new()).expect("valid test config");
    let shipped = cfg.listeners[0].limits.clone();
    let p = Proxy::start(cfg.clone()).await;
    let admin = p.handle.admin_addr().expect("admin is on");
    let applied = || p.handle.guard(L).unwrap().limits();
    let root = TempDir::new("memory-budget-root");
    std::fs::create_dir_all(root.path().join("proc/net")).unwrap();
    std::fs::create_dir_all(root.path().join("proc/sys/net/ipv4")).unwrap();
    let pages = (128u64 << 20) / page_size();
    std::fs::write(
        root.path().join("proc/sys/net/ipv4/tcp_mem"),
        format!("{}\t{pages}\t{}\n", pages / 2, pages * 2),
    )
    .unwrap();
    tcp_pages(root.path(), 10);
    p.handle
        .read_memory_from(MemorySource::at(root.path().to_path_buf()));
    p.handle.reload_with(cfg).await.expect("the reload applies");
    let lim = applied();
    assert_eq!(lim.max_queued, 16 << 20, "an eighth of 128 MiB");
    assert_eq!(
        lim.max_queued_per_source,
        shipped.max_queued_per_source * (16 << 20) / shipped.max_queued,
        "the per-source cap in the same proportion"
    );
    let metrics = scrape(admin).await;
    assert_eq!(
        sample(
            &metrics,
            &format!("halfguard_queued_bytes_limit{{listener=\"{L}\",scope=\"listener\"}}")
        ),
        Some((16u64 << 20) as f64),
        "{metrics}"
    );
}

/// The page size `sockstat` and `tcp_mem` count in.
fn page_size() -> u64 {
    let out = Command::new("getconf").arg("PAGESIZE").output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}
