//! `[cluster]`: per-source caps and bans across replicas, through a real redis-server the
//! test starts on loopback (no persistence) and stops by its PID; a replica killed for real
//! (the binary, SIGKILL); Redis killed and restarted; and Redis that refuses, answers
//! garbage or hangs (a listener of the test's own). Skipped, visibly, without redis-server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use halfguard::cluster::Failure;
use halfguard::config::{self, Config, Limits};
use halfguard::guard::SourceKey;
use halfguard::stats::Reject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::require;
use crate::support::{
    Backend, Need, Proxy, RedisCluster, RedisServer, backend, base_config, connect_from, http, ms,
    wait_until,
};

/// Short, so a test sees several syncs a second; a share outlives three of them.
const INTERVAL: Duration = Duration::from_millis(200);
const TTL: Duration = Duration::from_secs(1);

const WHY: &str = "a real Redis";

/// The `[cluster]` section for `node` against `url`.
fn cluster_toml(url: &str, node: &str) -> String {
    cluster_toml_on(url, node, false)
}

/// The same, against a Redis Cluster when `redis_cluster`.
fn cluster_toml_on(url: &str, node: &str, redis_cluster: bool) -> String {
    format!(
        r#"
[cluster]
redis = "{url}"
redis_cluster = {redis_cluster}
node = "{node}"
sync_interval = "{}ms"
timeout = "150ms"
share_ttl = "{}ms"
key_prefix = "hg-test"
"#,
        INTERVAL.as_millis(),
        TTL.as_millis()
    )
}

/// A replica: the base test config toward `backend`, with `[cluster]` and `limits` tuned.
fn replica(backend: SocketAddr, url: &str, node: &str, tune: impl FnOnce(&mut Limits)) -> Config {
    replica_on(backend, url, node, false, tune)
}

fn replica_on(
    backend: SocketAddr,
    url: &str,
    node: &str,
    redis_cluster: bool,
    tune: impl FnOnce(&mut Limits),
) -> Config {
    let mut c = base_config(&[backend]);
    let text = format!(
        "[[listeners]]\nname = \"x\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n{}",
        cluster_toml_on(url, node, redis_cluster)
    );
    c.cluster = config::parse(&text, "cluster.toml", HashMap::new())
        .expect("cluster section")
        .cluster;
    tune(&mut c.listeners[0].limits);
    // The admin endpoint, for /sources and /metrics.
    c.admin.bind = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    c
}

/// Opens a connection from `from` and sees its byte echoed: `Some` when admitted.
async fn hold(from: &str, to: SocketAddr) -> Option<TcpStream> {
    let mut s = connect_from(from, to).await.ok()?;
    s.write_all(b"x").await.ok()?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(ms(1500), s.read(&mut b)).await {
        Ok(Ok(1)) => Some(s),
        _ => None,
    }
}

/// Of `held`, those still alive (a provisional admission that found no slot is reset
/// within a second).
async fn alive(held: Vec<TcpStream>) -> Vec<TcpStream> {
    tokio::time::sleep(ms(1200)).await;
    let mut out = Vec::new();
    for mut s in held {
        let ok = s.write_all(b"y").await.is_ok() && {
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(ms(1000), s.read(&mut b)).await,
                Ok(Ok(1))
            )
        };
        if ok {
            out.push(s);
        }
    }
    out
}

async fn replicas(
    n: usize,
    backend: SocketAddr,
    url: &str,
    tune: impl Fn(&mut Limits),
) -> Vec<Proxy> {
    replicas_on(n, backend, url, false, tune).await
}

async fn replicas_on(
    n: usize,
    backend: SocketAddr,
    url: &str,
    redis_cluster: bool,
    tune: impl Fn(&mut Limits),
) -> Vec<Proxy> {
    let mut v = Vec::new();
    for i in 0..n {
        let c = replica_on(backend, url, &format!("r{i}"), redis_cluster, &tune);
        v.push(Proxy::start(c).await);
    }
    v
}

/// `n` replicas, each synced at least once within 3 s.
async fn synced_replicas(
    n: usize,
    backend: SocketAddr,
    url: &str,
    tune: impl Fn(&mut Limits),
) -> Vec<Proxy> {
    let ps = replicas(n, backend, url, tune).await;
    assert!(all_up(&ps, Duration::from_secs(3)).await, "replicas sync");
    ps
}

/// Shuts every replica down (each takes its share out of Redis).
async fn stop_all(ps: impl IntoIterator<Item = Proxy>) {
    for p in ps {
        p.shutdown().await;
    }
}

/// Waits until every replica has synced at least once.
async fn all_up(ps: &[Proxy], within: Duration) -> bool {
    wait_until(within, || async {
        ps.iter().all(|p| {
            p.handle
                .cluster()
                .is_some_and(|c| c.up.load(std::sync::atomic::Ordering::Relaxed))
        })
    })
    .await
}

fn up(p: &Proxy) -> bool {
    p.handle
        .cluster()
        .is_some_and(|c| c.up.load(std::sync::atomic::Ordering::Relaxed))
}

/// What the other replicas hold of `source`, as `p` sees it.
fn seen_elsewhere(p: &Proxy, source: &str) -> u32 {
    let key: SourceKey = source.parse().expect("source key");
    p.handle
        .guard(crate::support::L)
        .and_then(|g| g.remote())
        .and_then(|r| r.loads.get(&key).copied())
        .map_or(0, |l| l.conns)
}

/// A connection to the test's Redis at `url`, to look at what the replicas wrote.
async fn redis_at(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test's redis")
}

/// Zeroes Redis's command statistics, for a measurement that reads them after.
async fn reset_command_stats(c: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(c)
        .await
        .expect("resetstat");
}

/// Redis's `INFO commandstats`.
async fn command_stats(c: &mut redis::aio::MultiplexedConnection) -> String {
    redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .expect("info")
}

/// The keys matching `pattern` in the Redis at `url` (one node of a cluster: its own).
async fn keys_on(url: &str, pattern: &str) -> Vec<String> {
    let mut c = redis_at(url).await;
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut c)
        .await
        .expect("KEYS")
}

/// The share keys under the test's prefix (any bucket) on each of `urls`.
async fn share_keys(urls: &[String]) -> Vec<String> {
    let mut all = Vec::new();
    for u in urls {
        all.extend(keys_on(u, "{hg-test*:share:*").await);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_round_robin_over_three_replicas_holds_the_cap_plus_one_sync() {
    require!(WHY; Need::Tool("redis-server"));
    let redis = RedisServer::start(&[]).await;
    round_robin(&redis.url(), false, &[redis.url()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_cap_holds_on_a_three_node_redis_cluster_with_keys_over_every_node() {
    require!("a real Redis Cluster"; Need::Tool("redis-server"), Need::Tool("redis-cli"));
    let cluster = RedisCluster::start(3).await;
    let nodes: Vec<String> = cluster.nodes.iter().map(|r| r.url()).collect();
    round_robin(&cluster.urls(), true, &nodes).await;
}

/// Three replicas on `url`; one source round robin over them holds the cap plus what gets
/// past it during a sync; counts and keys (looked for on each of `nodes`) go back to zero.
async fn round_robin(url: &str, redis_cluster: bool, nodes: &[String]) {
    const CAP: u32 = 10;
    let b = backend(Backend::Echo).await;
    let ps = replicas_on(3, b.addr, url, redis_cluster, |l| {
        l.max_conns_per_source = CAP
    })
    .await;
    assert!(all_up(&ps, Duration::from_secs(3)).await, "replicas sync");

    // 60 attempts, one every 50 ms (four per sync interval), round robin: alone, each
    // replica would hold CAP, 30 in all.
    let mut held = Vec::new();
    for i in 0..60 {
        if let Some(s) = hold("127.0.0.2", ps[i % 3].addr).await {
            held.push(s);
        }
        tokio::time::sleep(ms(50)).await;
    }
    let held = alive(held).await;
    eprintln!(
        "round robin over three replicas (redis_cluster {redis_cluster}), cap {CAP}: {} held",
        held.len()
    );
    // A count reaches the others within two syncs (its own, then theirs): at four attempts
    // an interval, at most eight get past the cap while it travels.
    assert!(
        held.len() >= CAP as usize && held.len() <= CAP as usize + 8,
        "held {} connections over three replicas, cap {CAP}",
        held.len()
    );

    // /sources and the view agree on the cluster-wide count.
    let total = held.len() as u32;
    let agreed = wait_until(Duration::from_secs(2), || async {
        ps.iter().all(|p| {
            let local = p.snapshot().conns as u32;
            local + seen_elsewhere(p, "127.0.0.2") == total
        })
    })
    .await;
    assert!(agreed, "every replica sees {total} connections in all");
    // /sources shows the cluster-wide count beside the local one; /metrics the link.
    let admin = ps[0].handle.admin_addr().expect("admin on");
    let (status, body) = http(admin, "GET", "/sources").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let row = &v["listeners"][0]["sources"][0];
    assert_eq!(row["source"], "127.0.0.2", "{body}");
    assert_eq!(row["conns"], ps[0].snapshot().conns, "{body}");
    assert_eq!(row["cluster"]["conns"], total, "{body}");
    let (_, metrics) = http(admin, "GET", "/metrics").await;
    for line in [
        "halfguard_cluster_up 1",
        "halfguard_cluster_replicas 3",
        "halfguard_cluster_sync_failures_total{reason=\"timeout\"}",
        "halfguard_cluster_staleness_seconds ",
    ] {
        assert!(metrics.contains(line), "{line} not in /metrics");
    }

    if redis_cluster {
        // The buckets' keys live on every primary, not on one.
        for n in nodes {
            assert!(
                !keys_on(n, "{hg-test*").await.is_empty(),
                "no key on {n}: the buckets did not spread"
            );
        }
    }
    // Counters and keys back to zero after the load.
    drop(held);
    for p in &ps {
        p.assert_drained(Duration::from_secs(3)).await;
    }
    let gone = wait_until(Duration::from_secs(3), || async {
        share_keys(nodes).await.is_empty() && ps.iter().all(|p| seen_elsewhere(p, "127.0.0.2") == 0)
    })
    .await;
    assert!(gone, "share keys left: {:?}", share_keys(nodes).await);
    stop_all(ps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_falls_back_to_local_caps_and_the_cluster_cap_returns_with_it() {
    require!(WHY; Need::Tool("redis-server"));
    const CAP: u32 = 4;
    const ATTACKER: &str = "127.0.0.11";
    let mut redis = RedisServer::start(&[]).await;
    let b = backend(Backend::Echo).await;
    let ps = synced_replicas(3, b.addr, &redis.url(), |l| l.max_conns_per_source = CAP).await;
    let others_see = |n: u32| {
        let ps = &ps;
        async move {
            wait_until(Duration::from_secs(3), || async {
                ps[1..].iter().all(|p| seen_elsewhere(p, ATTACKER) == n)
            })
            .await
        }
    };

    // The attacker fills its cap on replica 0: replicas 1 and 2 refuse it.
    let mut on_first = Vec::new();
    for _ in 0..CAP {
        on_first.push(hold(ATTACKER, ps[0].addr).await.expect("admitted"));
    }
    assert!(
        others_see(CAP).await,
        "replicas 1 and 2 see replica 0's share"
    );
    for p in &ps[1..] {
        assert!(hold(ATTACKER, p.addr).await.is_none(), "cluster-wide cap");
    }

    redis.kill();
    let down = wait_until(Duration::from_secs(3), || async {
        ps.iter().all(|p| !up(p))
    })
    .await;
    assert!(down, "every replica notices Redis is gone");
    // Accepting never waits for Redis: a legit client is served at once on every replica.
    for p in &ps {
        let s = tokio::time::timeout(Duration::from_secs(1), hold("127.0.0.12", p.addr)).await;
        assert!(
            matches!(s, Ok(Some(_))),
            "a legit client is served with Redis down"
        );
    }
    // The view ages out: every replica is on its full local cap, no more, no less.
    let dropped = wait_until(Duration::from_secs(3), || async {
        ps.iter().all(|p| {
            p.handle
                .guard(crate::support::L)
                .is_some_and(|g| g.remote().is_none())
        })
    })
    .await;
    assert!(dropped, "the stale cluster view is dropped");
    let mut elsewhere: Vec<Vec<TcpStream>> = Vec::new();
    for p in &ps[1..] {
        let mut held = Vec::new();
        for _ in 0..CAP + 3 {
            if let Some(s) = hold(ATTACKER, p.addr).await {
                held.push(s);
            }
        }
        elsewhere.push(alive(held).await);
    }
    for (i, h) in elsewhere.iter().enumerate() {
        assert_eq!(
            h.len(),
            CAP as usize,
            "replica {} holds its local cap",
            i + 1
        );
    }
    assert!(
        hold(ATTACKER, ps[0].addr).await.is_none(),
        "local cap on replica 0"
    );
    for p in &ps {
        let c = p.handle.cluster().expect("cluster on");
        assert!(
            Failure::ALL.iter().map(|f| c.failures(*f)).sum::<u64>() > 0,
            "failures are counted"
        );
    }

    // Redis back: the cluster view returns within a few intervals...
    redis.restart().await;
    let back = tokio::time::Instant::now();
    assert!(
        all_up(&ps, Duration::from_secs(3)).await,
        "replicas sync again"
    );
    let took = back.elapsed();
    // The backoff waits at most four intervals between attempts.
    assert!(took <= INTERVAL * 10, "back in sync after {took:?}");
    // ...and with it the cluster-wide cap: once replicas 1 and 2 let their attacker
    // connections go, replica 0's still fill the cap, and they refuse the attacker again.
    drop(elsewhere);
    assert!(
        others_see(CAP).await,
        "replicas 1 and 2 see replica 0's share again"
    );
    for p in &ps[1..] {
        assert!(
            hold(ATTACKER, p.addr).await.is_none(),
            "the cluster-wide cap holds again"
        );
    }
    drop(on_first);
    stop_all(ps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_connections_on_one_replica_count_against_the_half_open_cap_on_another() {
    require!(WHY; Need::Tool("redis-server"));
    const CAP: u32 = 4;
    let redis = RedisServer::start(&[]).await;
    let b = backend(Backend::Echo).await;
    let ps = synced_replicas(2, b.addr, &redis.url(), |l| {
        l.max_half_open_per_source = CAP
    })
    .await;
    // CAP silent connections on replica 0, past the grace: its source's half-open cap is
    // full there, and so, once synced, on replica 1.
    let mut silent = Vec::new();
    for _ in 0..CAP {
        silent.push(
            connect_from("127.0.0.81", ps[0].addr)
                .await
                .expect("connect"),
        );
    }
    let key: SourceKey = "127.0.0.81".parse().expect("key");
    let seen = wait_until(Duration::from_secs(3), || async {
        ps[1]
            .handle
            .guard(crate::support::L)
            .and_then(|g| g.remote())
            .and_then(|r| r.loads.get(&key).copied())
            .is_some_and(|l| l.half_open == CAP)
    })
    .await;
    assert!(seen, "replica 1 sees the silent connections");
    assert!(
        hold("127.0.0.81", ps[1].addr).await.is_none(),
        "refused on replica 1 at the cluster-wide half-open cap"
    );
    assert!(ps[1].stats().rejected(Reject::SourceHalfOpen) >= 1);
    assert!(
        hold("127.0.0.82", ps[1].addr).await.is_some(),
        "another source is served"
    );
    drop(silent);
    stop_all(ps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_churning_over_three_replicas_gets_its_rate_about_once() {
    require!(WHY; Need::Tool("redis-server"));
    const RATE: u32 = 40;
    const SECS: u64 = 4;
    let redis = RedisServer::start(&[]).await;
    let b = backend(Backend::Echo).await;
    let ps = synced_replicas(3, b.addr, &redis.url(), |l| {
        l.conn_rate_per_source = RATE;
        l.conn_burst_per_source = 5;
    })
    .await;
    // One short connection after another, round robin, as fast as the source can.
    let end = tokio::time::Instant::now() + Duration::from_secs(SECS);
    let (mut tries, mut admitted) = (0u32, 0u32);
    while tokio::time::Instant::now() < end && tries < 50_000 {
        if hold("127.0.0.91", ps[tries as usize % 3].addr)
            .await
            .is_some()
        {
            admitted += 1;
        }
        tries += 1;
    }
    let alone = 3 * RATE * SECS as u32;
    eprintln!(
        "rate {RATE}/s over three replicas for {SECS} s: {admitted} admitted of {tries} (each alone: {alone})"
    );
    assert!(
        tries > alone * 2,
        "the source could not press hard enough ({tries} tries) to tell"
    );
    // Each replica alone admits RATE a second: three times the rate. Shared, about the
    // rate, plus what passes while the first counts travel and the shares settle.
    assert!(
        admitted <= 2 * RATE * SECS as u32,
        "{admitted} admitted: the rate was not shared"
    );
    stop_all(ps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_keeps_the_cluster_settings_until_restart() {
    let b = backend(Backend::Echo).await;
    // Nothing listens there: the replica runs on local caps, which is all this needs.
    let url = format!("redis://127.0.0.1:{}/0", crate::cli::free_port());
    let p = Proxy::start(replica(b.addr, &url, "r", |_| {})).await;
    let mut next = replica(b.addr, &url, "renamed", |_| {});
    next.listeners[0].limits.max_conns_per_source = 7;
    let changed = p.handle.reload_with(next).await.expect("reload");
    assert!(
        changed.contains("[cluster] (at the next restart)"),
        "{changed}"
    );
    let now = p.handle.config();
    assert_eq!(now.cluster.as_ref().map(|c| c.node.as_str()), Some("r"));
    assert_eq!(now.listeners[0].limits.max_conns_per_source, 7);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replicas_share_is_forgotten_within_the_ttl() {
    require!(WHY; Need::Tool("redis-server"));
    const CAP: u32 = 3;
    let redis = RedisServer::start(&[]).await;
    let b = backend(Backend::Echo).await;
    // The replica to kill is the binary, killed for real (SIGKILL: no cleanup at all).
    let port = crate::cli::free_port();
    let cfg = crate::support::TempDir::file(
        "cluster",
        "halfguard.toml",
        &format!(
            "[[listeners]]\nname = \"{}\"\nbind = \"127.0.0.1:{port}\"\nbackends = [\"{}\"]\n\
             [limits]\nmax_conns_per_source = {CAP}\n[admin]\nbind = \"off\"\n{}",
            crate::support::L,
            b.addr,
            cluster_toml(&redis.url(), "doomed")
        ),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halfguard"));
    cmd.args(["run", "-c"]).arg(&*cfg);
    let mut doomed = crate::cli::Reap(crate::cli::start(cmd));
    let doomed_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let survivor = Proxy::start(replica(b.addr, &redis.url(), "survivor", |l| {
        l.max_conns_per_source = CAP
    }))
    .await;

    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(hold("127.0.0.21", doomed_addr).await.expect("admitted"));
    }
    let seen = wait_until(Duration::from_secs(3), || async {
        seen_elsewhere(&survivor, "127.0.0.21") == CAP
    })
    .await;
    assert!(seen, "the survivor sees the doomed replica's share");
    assert!(
        hold("127.0.0.21", survivor.addr).await.is_none(),
        "the survivor refuses the source at the cluster-wide cap"
    );

    let _ = doomed.0.kill();
    let _ = doomed.0.wait();
    let killed = tokio::time::Instant::now();
    let forgotten = wait_until(TTL * 3, || async {
        seen_elsewhere(&survivor, "127.0.0.21") == 0
    })
    .await;
    let took = killed.elapsed();
    assert!(forgotten, "the dead replica's share never expired");
    // Within the TTL of its last sync, plus the survivor's own sync.
    assert!(took <= TTL + INTERVAL * 3, "forgotten after {took:?}");
    let mut again = Vec::new();
    for _ in 0..CAP {
        again.push(
            hold("127.0.0.21", survivor.addr)
                .await
                .expect("the source gets its whole cap back on the survivor"),
        );
    }
    drop((held, again));
    survivor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ban_on_one_replica_reaches_the_others() {
    require!(WHY; Need::Tool("redis-server"));
    let redis = RedisServer::start(&[]).await;
    let b = backend(Backend::Echo).await;
    let mk = |node: &str| {
        let mut c = replica(b.addr, &redis.url(), node, |l| l.max_conns_per_source = 1);
        // Bans are fed at each census: refused 3 times in one, banned for 5 s.
        c.kernel.census_interval = Some(ms(200));
        c.kernel.ban_after = 3;
        c.kernel.ban_for = Duration::from_secs(5);
        c
    };
    let ps = [Proxy::start(mk("a")).await, Proxy::start(mk("b")).await];
    assert!(all_up(&ps, Duration::from_secs(3)).await, "replicas sync");

    // Refused over and over on replica a (its cap is 1), all at once: two wait for a slot
    // (the provisional slack), the rest are refused on the spot, within one census.
    let first = hold("127.0.0.31", ps[0].addr).await.expect("admitted");
    let to = ps[0].addr;
    let tries: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { hold("127.0.0.31", to).await }))
        .collect();
    for t in tries {
        assert!(t.await.expect("task").is_none(), "over the cap");
    }
    drop(first);
    // ...banned at a's next census, and from the next sync on, on b too.
    let key: SourceKey = "127.0.0.31".parse().expect("key");
    let banned = wait_until(Duration::from_secs(4), || async {
        ps[1]
            .handle
            .guard(crate::support::L)
            .and_then(|g| g.remote())
            .is_some_and(|r| r.banned.contains(&key))
    })
    .await;
    assert!(banned, "the ban reaches the other replica");
    assert!(
        hold("127.0.0.31", ps[1].addr).await.is_none(),
        "the banned source is refused on the other replica"
    );
    assert!(
        ps[1].stats().rejected(Reject::Banned) >= 1,
        "refused for the ban"
    );
    assert!(
        hold("127.0.0.32", ps[1].addr).await.is_some(),
        "another source is not"
    );
    stop_all(ps).await;
}

/// Redis's own clock in ms, the one the script reads.
async fn redis_now_ms(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(c).await.expect("TIME");
    s * 1000 + us / 1000
}

/// `halfguard_cluster_dropped_total{reason}` from `p`'s /metrics.
async fn dropped(p: &Proxy, reason: &str) -> u64 {
    let admin = p.handle.admin_addr().expect("admin on");
    let (_, metrics) = http(admin, "GET", "/metrics").await;
    let line = format!("halfguard_cluster_dropped_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line} not in /metrics"))
}

/// Ten years, in ms: what a hostile writer of the keys would ask for.
const DECADE_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_share_written_by_hand_counts_one_replica_at_most_and_is_forgotten_within_the_ttl() {
    require!(WHY; Need::Tool("redis-server"));
    const CAP: u32 = 3;
    let redis = RedisServer::start(&[]).await;
    let b = backend(Backend::Echo).await;
    let p = Proxy::start(replica(b.addr, &redis.url(), "r0", |l| {
        l.max_conns_per_source = CAP
    }))
    .await;
    assert!(all_up(std::slice::from_ref(&p), Duration::from_secs(3)).await);
    // Someone who can write the keys, and keeps writing them: a "replica" that never
    // expires, holding the most a u32 can say of one source, and another whose share is
    // not even a hash.
    let mut r = redis_at(&redis.url()).await;
    let far = redis_now_ms(&mut r).await + DECADE_MS;
    let n = u32::MAX;
    let mut hostile = redis::pipe();
    hostile
        .hset(
            "{hg-test}:share:evil",
            format!("{}|127.0.0.81", crate::support::L),
            format!("{n} {n} {n} {n}"),
        )
        .ignore()
        .set("{hg-test}:share:evil2", "not a hash")
        .ignore()
        .zadd("{hg-test}:nodes", "evil", far)
        .ignore()
        .zadd("{hg-test}:nodes", "evil2", far)
        .ignore();
    let writer = tokio::spawn(async move {
        for _ in 0..200 {
            let _: Result<(), _> = hostile.query_async(&mut r).await;
            tokio::time::sleep(ms(50)).await;
        }
    });

    // Read, but as one replica at the cap at most: it refuses the source (as a replica
    // holding its cap would: that much a writer of the keys can do), and nothing else.
    let mut most = 0;
    let seen = wait_until(Duration::from_secs(3), || {
        let now = seen_elsewhere(&p, "127.0.0.81");
        most = most.max(now);
        async move { now == CAP }
    })
    .await;
    assert!(
        seen,
        "the entry counts one replica at the cap, not up to {most}"
    );
    assert!(up(&p), "a key of the wrong type does not stop the sync");
    assert!(hold("127.0.0.81", p.addr).await.is_none(), "at the cap");
    assert!(hold("127.0.0.82", p.addr).await.is_some(), "another source");
    assert!(
        dropped(&p, "count_clamped").await >= 1,
        "the clamp is counted"
    );
    writer.abort();
    let _ = writer.await;
    let written = tokio::time::Instant::now();

    // The writer stops: a replica is live for share_ttl after its last sync, whatever
    // score it wrote, so the entry is forgotten and the source gets its cap back.
    let forgotten = wait_until(TTL * 4, || async { seen_elsewhere(&p, "127.0.0.81") == 0 }).await;
    assert!(forgotten, "a replica that never expires is not one");
    assert!(
        written.elapsed() <= TTL + INTERVAL * 4,
        "{:?}",
        written.elapsed()
    );
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(
            hold("127.0.0.81", p.addr)
                .await
                .expect("the whole cap back"),
        );
    }
    drop(held);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ban_written_to_end_in_ten_years_ends_within_ban_for() {
    require!(WHY; Need::Tool("redis-server"));
    const BAN_FOR: Duration = Duration::from_secs(2);
    let redis = RedisServer::start(&[]).await;
    let b = backend(Backend::Echo).await;
    let mut c = replica(b.addr, &redis.url(), "r0", |_| {});
    c.kernel.ban_for = BAN_FOR;
    let p = Proxy::start(c).await;
    assert!(all_up(std::slice::from_ref(&p), Duration::from_secs(3)).await);
    let mut r = redis_at(&redis.url()).await;
    let far = redis_now_ms(&mut r).await + DECADE_MS;
    let _: () = redis::cmd("HSET")
        .arg("{hg-test}:bans")
        .arg("127.0.0.71")
        .arg(far)
        .query_async(&mut r)
        .await
        .expect("write the ban");
    let key: SourceKey = "127.0.0.71".parse().expect("key");
    let banned = || {
        p.handle
            .guard(crate::support::L)
            .and_then(|g| g.remote())
            .is_some_and(|r| r.banned.contains(&key))
    };
    assert!(
        wait_until(Duration::from_secs(3), || async { banned() }).await,
        "the ban is read"
    );
    let seen = tokio::time::Instant::now();
    assert!(hold("127.0.0.71", p.addr).await.is_none(), "banned");
    // Cut to ban_for at the sync that read it, in Redis too: it ends, and stays ended.
    let ended = wait_until(BAN_FOR + INTERVAL * 4, || async { !banned() }).await;
    assert!(
        ended,
        "the ban still runs {:?} after it was read",
        seen.elapsed()
    );
    tokio::time::sleep(INTERVAL * 3).await;
    assert!(!banned(), "and it does not come back");
    assert!(hold("127.0.0.71", p.addr).await.is_some(), "admitted again");
    assert!(dropped(&p, "ban_clamped").await >= 1, "the cut is counted");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_share_of_300k_entries_is_read_bounded_and_the_cut_is_counted() {
    require!(WHY; Need::Tool("redis-server"));
    const MAX_PUBLISHED: u32 = 50;
    const FLOOD: u32 = 300_000;
    const REPLICAS: u32 = 100;
    let redis = RedisServer::start(&[]).await;
    let b = backend(Backend::Echo).await;
    let mut c = replica(b.addr, &redis.url(), "r0", |l| l.max_conns_per_source = 5);
    let cl = c.cluster.as_mut().expect("cluster");
    cl.max_published = MAX_PUBLISHED;
    let max_replicas = cl.max_replicas;
    let p = Proxy::start(c).await;
    assert!(all_up(std::slice::from_ref(&p), Duration::from_secs(3)).await);
    // One "replica" with 300,000 entries, a hundred more with one each; all live a minute.
    let mut r = redis_at(&redis.url()).await;
    let until = redis_now_ms(&mut r).await + 60_000;
    let mut pipe = redis::pipe();
    let mut batch = Vec::new();
    for i in 0..FLOOD {
        let [_, x, y, z] = i.to_be_bytes();
        batch.push((
            format!("{}|10.{x}.{y}.{z}", crate::support::L),
            "1 0 0 0".to_string(),
        ));
        if batch.len() == 1000 {
            pipe.hset_multiple("{hg-test}:share:flood", &batch).ignore();
            batch.clear();
        }
        // Written 10,000 at a time: one pipeline of all of it can outlast the client's
        // response timeout on a loaded machine.
        if (i + 1) % 10_000 == 0 {
            let _: () = pipe.query_async(&mut r).await.expect("write the flood");
            pipe = redis::pipe();
        }
    }
    pipe.zadd("{hg-test}:nodes", "flood", until).ignore();
    for i in 0..REPLICAS {
        pipe.hset(
            format!("{{hg-test}}:share:f{i}"),
            format!("{}|127.1.0.{i}", crate::support::L),
            "1 0 0 0",
        )
        .ignore()
        .zadd("{hg-test}:nodes", format!("f{i}"), until)
        .ignore();
    }
    let _: () = pipe.query_async(&mut r).await.expect("write the flood");

    let cl = p.handle.cluster().expect("cluster on");
    let syncs = cl.syncs.load(std::sync::atomic::Ordering::Relaxed);
    // Syncs go on (before, reading it all took longer than cluster.timeout, every time,
    // and the cluster caps were off), and the view stays within its bounds.
    let going = wait_until(Duration::from_secs(3), || async {
        cl.syncs.load(std::sync::atomic::Ordering::Relaxed) >= syncs + 5
    })
    .await;
    assert!(
        going,
        "syncs stopped: {:?}",
        Failure::ALL.map(|f| cl.failures(f))
    );
    assert!(up(&p));
    let view = p
        .handle
        .guard(crate::support::L)
        .and_then(|g| g.remote())
        .map_or(0, |r| r.loads.len());
    let bound = ((max_replicas - 1) * MAX_PUBLISHED) as usize;
    assert!(view > 0 && view <= bound, "view of {view}, bound {bound}");
    // What a replica writes per listener, per other replica: the flood's share is cut.
    assert!(dropped(&p, "share_full").await >= u64::from(FLOOD - MAX_PUBLISHED));
    // Replicas past max_replicas are not read.
    assert!(dropped(&p, "replicas").await >= u64::from(REPLICAS + 1 - (max_replicas - 1)));
    assert!(hold("127.0.0.83", p.addr).await.is_some(), "a fresh source");
    p.shutdown().await;
}

/// The README's ACL for the replicas' Redis user: its keys, and the commands a sync runs.
const README_ACL: &str = "on >pw-for-hg ~{hg-test}:* resetchannels -@all +evalsha +eval +script|load +ping +time +type +del +hset +hget +hdel +hlen +hgetall +hscan +pexpire +zadd +zrem +zremrangebyscore +zrangebyscore +zrevrangebyscore +zcount";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_sync_as_a_redis_user_that_may_touch_only_their_keys() {
    require!(WHY; Need::Tool("redis-server"));
    let redis = RedisServer::start(&[]).await;
    let mut admin = redis_at(&redis.url()).await;
    let mut acl = redis::cmd("ACL");
    acl.arg("SETUSER").arg("hg");
    for rule in README_ACL.split(' ') {
        acl.arg(rule);
    }
    let _: () = acl.query_async(&mut admin).await.expect("ACL SETUSER");
    let b = backend(Backend::Echo).await;
    let url = format!("redis://hg:pw-for-hg@127.0.0.1:{}/0", redis.port);
    let ps = synced_replicas(2, b.addr, &url, |l| l.max_conns_per_source = 2).await;
    let held = hold("127.0.0.84", ps[0].addr).await.expect("1 of 2");
    let seen = wait_until(Duration::from_secs(3), || async {
        seen_elsewhere(&ps[1], "127.0.0.84") == 1
    })
    .await;
    assert!(
        seen,
        "the count reaches the other replica through the ACL user"
    );
    // The user is of no use for anything else.
    let mut hg = redis_at(&url).await;
    for cmd in [
        redis::cmd("SET").arg("other").arg("x").clone(),
        redis::cmd("HSET")
            .arg("{other}:bans")
            .arg("a")
            .arg("1")
            .clone(),
        redis::cmd("FLUSHALL").clone(),
    ] {
        let r: redis::RedisResult<()> = cmd.query_async(&mut hg).await;
        let e = r.expect_err("refused to the ACL user");
        assert!(e.to_string().to_lowercase().contains("noperm"), "{e}");
    }
    drop(held);
    stop_all(ps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_auth_is_a_counted_failure_and_the_password_never_shows() {
    require!(WHY; Need::Tool("redis-server"));
    let redis = RedisServer::start(&["--requirepass", "right-password-123"]).await;
    let b = backend(Backend::Echo).await;
    let wrong = format!("redis://:wrong-password-456@127.0.0.1:{}/0", redis.port);
    let right = format!("redis://:right-password-123@127.0.0.1:{}/0", redis.port);
    let refused = Proxy::start(replica(b.addr, &wrong, "refused", |_| {})).await;
    let fine = Proxy::start(replica(b.addr, &right, "fine", |_| {})).await;
    assert!(
        all_up(std::slice::from_ref(&fine), Duration::from_secs(3)).await,
        "the right password syncs"
    );
    let c = refused.handle.cluster().expect("cluster on");
    let counted = wait_until(Duration::from_secs(3), || async {
        Failure::ALL.iter().map(|f| c.failures(*f)).sum::<u64>() >= 2
    })
    .await;
    assert!(counted, "refused AUTH is counted, again at each retry");
    assert!(!up(&refused));
    assert!(
        hold("127.0.0.41", refused.addr).await.is_some(),
        "it serves on local caps"
    );
    for p in [&refused, &fine] {
        let shown = p.handle.config().to_string();
        assert!(
            shown.contains("cluster: redis redis://:***@127.0.0.1"),
            "{shown}"
        );
        assert!(!shown.contains("password-"), "{shown}");
    }
    refused.shutdown().await;
    fine.shutdown().await;
}

/// A "Redis" of the test's own: `garbage` answers every read with bytes that are not RESP;
/// otherwise it accepts and never answers.
async fn fake_redis(garbage: bool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            if garbage {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(b"%%% not resp \x00\xff\r\n").await.is_err() {
                            break;
                        }
                    }
                });
            } else if held.len() < 64 {
                held.push(s);
            }
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_answers_garbage_or_hangs_is_counted_and_never_stalls_accept() {
    let b = backend(Backend::Echo).await;
    for garbage in [true, false] {
        let (addr, fake) = fake_redis(garbage).await;
        let p = Proxy::start(replica(
            b.addr,
            &format!("redis://{addr}/0"),
            "lonely",
            |l| l.max_conns_per_source = 2,
        ))
        .await;
        let c = p.handle.cluster().expect("cluster on");
        let counted = wait_until(Duration::from_secs(3), || async {
            Failure::ALL.iter().map(|f| c.failures(*f)).sum::<u64>() >= 2
        })
        .await;
        assert!(counted, "garbage={garbage}: failures are counted");
        if !garbage {
            assert!(c.failures(Failure::Timeout) >= 1, "a hang is a timeout");
        }
        assert!(!up(&p));
        // Accept never waits on the sync: ten clients in a row, each served at once, and
        // the local cap still acts.
        for i in 0..10 {
            let from = format!("127.0.0.{}", 50 + i);
            let s = tokio::time::timeout(Duration::from_secs(1), hold(&from, p.addr)).await;
            assert!(
                matches!(s, Ok(Some(_))),
                "garbage={garbage}: client {i} served"
            );
        }
        let a = hold("127.0.0.60", p.addr).await.expect("1 of 2");
        let b = hold("127.0.0.60", p.addr).await.expect("2 of 2");
        assert!(hold("127.0.0.60", p.addr).await.is_none(), "3 of 2");
        drop((a, b));
        p.shutdown().await;
        fake.abort();
    }
}

#[test]
fn a_bad_cluster_section_names_its_key_and_never_the_password() {
    let listener =
        "[[listeners]]\nname = \"x\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n";
    for (body, key) in [
        ("redis = \"http://user:hunter2-pw@r:6379\"", "cluster.redis"),
        (
            "redis = \"redis://user:hunter2-pw@r:notaport\"",
            "cluster.redis",
        ),
        ("node = \"a\"", "cluster.redis"),
        (
            "redis = \"redis://r:6379\"\nsync_interval = \"1s\"\nshare_ttl = \"2s\"",
            "cluster.share_ttl",
        ),
        (
            "redis = \"redis://r:6379\"\nnode = \"has space\"",
            "cluster.node",
        ),
        (
            "redis = \"redis://r:6379\"\npublish_above = 0.0",
            "cluster.publish_above",
        ),
        (
            "redis = \"redis://r:6379\"\ntimeout = \"2s\"",
            "cluster.timeout",
        ),
        ("redis = \"redis://r:6379\"\nfrob = 1", "cluster.frob"),
    ] {
        let text = format!("{listener}[cluster]\n{body}\n");
        let err = match config::parse(&text, "c.toml", HashMap::new()) {
            Ok(_) => panic!("{body:?} should be refused"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("c.toml"), "{err}");
        assert!(err.contains(&format!("`{key}`")), "{body:?}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    // Absent: a single node, exactly as before.
    let c = config::parse(listener, "c.toml", HashMap::new()).expect("valid");
    assert!(c.cluster.is_none());
    assert!(!c.to_string().contains("cluster"));
    // The URL (and its password) may come from the environment, and never prints.
    let env: HashMap<String, String> = [(
        "HALFGUARD__CLUSTER__REDIS".to_string(),
        "redis://app:hunter2-pw@redis.default.svc:6379/0".to_string(),
    )]
    .into();
    let c = config::parse(listener, "c.toml", env).expect("valid");
    let cl = c.cluster.as_ref().expect("cluster from the environment");
    assert_eq!(cl.sync_interval, ms(500));
    assert!(!cl.node.is_empty(), "the node defaults to the host name");
    let shown = c.to_string();
    assert!(
        shown.contains("redis://app:***@redis.default.svc:6379/0"),
        "{shown}"
    );
    assert!(!shown.contains("hunter2") && !format!("{c:?}").contains("hunter2"));
    // A bad one from the environment names the variable.
    let env: HashMap<String, String> = [(
        "HALFGUARD__CLUSTER__REDIS".to_string(),
        "nope://x".to_string(),
    )]
    .into();
    let err = config::parse(listener, "c.toml", env)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("HALFGUARD__CLUSTER__REDIS"), "{err}");
}

/// Not a test: the staleness figure in the README. From a connection opened on one replica
/// to the other replica's view counting it, with the default `sync_interval` (500 ms);
/// and what Redis spends on it (`INFO commandstats`). Run with
/// `cargo test --test it cluster::measure_staleness -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a test: run it by name"]
async fn measure_staleness() {
    require!(WHY; Need::Tool("redis-server"));
    const SAMPLES: usize = 60;
    let redis = RedisServer::start(&[]).await;
    let b = backend(Backend::Echo).await;
    let mk = |node: &str| {
        let mut c = replica(b.addr, &redis.url(), node, |l| l.max_conns_per_source = 10);
        if let Some(cl) = c.cluster.as_mut() {
            cl.sync_interval = ms(500);
            cl.timeout = ms(250);
            cl.share_ttl = Duration::from_secs(10);
        }
        c
    };
    let ps = [Proxy::start(mk("a")).await, Proxy::start(mk("b")).await];
    assert!(all_up(&ps, Duration::from_secs(3)).await);
    let mut rc = redis_at(&redis.url()).await;
    reset_command_stats(&mut rc).await;
    let started = tokio::time::Instant::now();
    let mut took = Vec::new();
    for i in 0..SAMPLES {
        // Start at a random point of the sync cycle.
        tokio::time::sleep(ms(37 * (i as u64 % 13))).await;
        let s = hold("127.0.0.70", ps[0].addr).await.expect("admitted");
        let t0 = tokio::time::Instant::now();
        assert!(
            wait_until(Duration::from_secs(5), || async {
                seen_elsewhere(&ps[1], "127.0.0.70") == 1
            })
            .await
        );
        took.push(t0.elapsed());
        drop(s);
        assert!(
            wait_until(Duration::from_secs(5), || async {
                seen_elsewhere(&ps[1], "127.0.0.70") == 0
            })
            .await
        );
    }
    let secs = started.elapsed().as_secs_f64();
    took.sort();
    let pct = |p: f64| took[((took.len() - 1) as f64 * p).round() as usize];
    println!(
        "staleness over {SAMPLES} changes (sync_interval 500ms, 2 replicas): p50 {:?}, p99 {:?}, max {:?}",
        pct(0.5),
        pct(0.99),
        took[took.len() - 1]
    );
    let stats = command_stats(&mut rc).await;
    for line in stats.lines().filter(|l| l.starts_with("cmdstat_eval")) {
        println!("{line}");
    }
    let evals: u64 = stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_eval"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    println!(
        "Redis: {evals} script calls in {secs:.1} s from 2 replicas: {:.2} per replica per second",
        evals as f64 / secs / 2.0
    );
    stop_all(ps).await;
}

/// Not a test: what one sync costs Redis as replicas and published sources grow, for the
/// README's sizing. `replicas` in-process replicas each hold 2 connections from each of 50
/// sources (all published), for 10 s. Run with
/// `cargo test --test it cluster::measure_redis_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a test: run it by name"]
async fn measure_redis_cost() {
    require!(WHY; Need::Tool("redis-server"));
    const SOURCES: usize = 50;
    for n in [2usize, 8] {
        let redis = RedisServer::start(&[]).await;
        let b = backend(Backend::Echo).await;
        let mut ps = Vec::new();
        for i in 0..n {
            let mut c = replica(b.addr, &redis.url(), &format!("m{i}"), |l| {
                l.max_conns_per_source = 1000
            });
            if let Some(cl) = c.cluster.as_mut() {
                cl.sync_interval = ms(500);
                cl.timeout = ms(250);
                cl.share_ttl = Duration::from_secs(10);
                cl.publish_above = 0.001;
            }
            ps.push(Proxy::start(c).await);
        }
        let mut held = Vec::new();
        for p in &ps {
            for s in 0..SOURCES {
                for _ in 0..2 {
                    held.push(
                        hold(&format!("127.0.1.{}", s + 1), p.addr)
                            .await
                            .expect("admitted"),
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut rc = redis_at(&redis.url()).await;
        reset_command_stats(&mut rc).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let stats = command_stats(&mut rc).await;
        for line in stats.lines().filter(|l| l.starts_with("cmdstat_evalsha")) {
            println!("{n} replicas x {SOURCES} published sources each: {line}");
        }
        drop(held);
        stop_all(ps).await;
    }
}
