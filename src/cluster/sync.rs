//! The sync task: every `sync_interval`, publish this replica's share, read the others',
//! and swap a fresh view into every listener's guard.
//!
//! Nothing here is on the accept path: a sync that hangs holds this task only, for at most
//! `cluster.timeout`. A failure drops the connection, counts by reason, logs once per
//! change of state, and retries with a backoff that doubles from one interval up to four;
//! once the view is three intervals old it is dropped too, and each replica is on its full
//! local caps (one slow sync is not an outage). A replica that stops
//! cleanly takes its share out of Redis; one that is killed is forgotten `share_ttl` later.
//!
//! The server runs it and hands it what it reads ([`Listeners`]): this layer never knows
//! how the server keeps its listeners.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError};

use super::script::{self, Keys};
use super::{Cluster, Dropped, Failure, MAX_BANS};
use crate::guard::{Guard, Remote, SourceKey};

/// The longest wait between two attempts while Redis is away, in sync intervals.
const MAX_BACKOFF_INTERVALS: u32 = 4;
/// At most one log line about what syncs cut from Redis per this long (the counter has
/// the rest).
const DROP_LOG_EVERY: Duration = Duration::from_secs(60);
/// A view this many intervals old is dropped at the next failed attempt: one slow sync
/// is not an outage, and the last counts are a better guess than none for that long.
const KEEP_VIEW_INTERVALS: u32 = 3;

/// Where the script runs: one Redis, or a Redis Cluster (each bucket's call routed to the
/// primary holding its slot). Both are multiplexed: clones share one connection per node.
#[derive(Clone)]
enum Conn {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// How to open a [`Conn`].
enum Client {
    One(redis::Client, AsyncConnectionConfig),
    Cluster(redis::cluster::ClusterClient),
}

impl Client {
    fn new(cfg: &crate::config::ClusterConfig) -> Result<Client, RedisError> {
        let urls = cfg.redis.expose();
        if cfg.redis_cluster {
            let c = redis::cluster::ClusterClient::builder(urls)
                .connection_timeout(cfg.timeout)
                .response_timeout(cfg.timeout)
                .retries(0)
                .build()?;
            return Ok(Client::Cluster(c));
        }
        let one = urls.first().copied().unwrap_or_default();
        let conn_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout));
        Ok(Client::One(redis::Client::open(one)?, conn_cfg))
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        match self {
            Client::One(c, cfg) => c
                .get_multiplexed_async_connection_with_config(cfg)
                .await
                .map(Conn::One),
            Client::Cluster(c) => c.get_async_connection().await.map(Conn::Cluster),
        }
    }
}

impl Conn {
    async fn invoke(
        &mut self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<script::RawReply, RedisError> {
        match self {
            Conn::One(c) => inv.invoke_async(c).await,
            Conn::Cluster(c) => inv.invoke_async(c).await,
        }
    }

    async fn leave(&mut self, p: &redis::Pipeline) -> Result<(), RedisError> {
        match self {
            Conn::One(c) => p.query_async(c).await,
            Conn::Cluster(c) => p.query_async(c).await,
        }
    }
}

/// What the last attempt told, for the one log line per change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Starting,
    Up,
    Down,
}

/// What the sync reads of the server that runs it.
pub(crate) trait Listeners: Send + Sync + 'static {
    /// The listeners accepting now (not those a reload retired): name and guard.
    fn active(&self) -> Vec<(String, Guard)>;
    /// How long a ban lasts here (`kernel.ban_for`): no ban read from Redis runs longer.
    fn ban_for(&self) -> Duration;
    /// Resolves when the server is stopping for good.
    fn stopping(&self) -> impl Future<Output = ()> + Send;
}

/// Runs until the server stops.
pub(crate) async fn sync_loop(state: Arc<impl Listeners>, cluster: Arc<Cluster>) {
    let cfg = cluster.config.clone();
    let client = match Client::new(&cfg) {
        Ok(c) => c,
        Err(e) => {
            // Validation parsed this URL already; say so and stay on local caps.
            tracing::error!(redis = %cfg.redis, error = %e, "cluster: cannot use the Redis URL; per-source caps stay local");
            return;
        }
    };
    let buckets = cfg.buckets();
    let keys: Vec<Keys> = (0..buckets)
        .map(|b| Keys::new(&cfg.key_prefix, b, buckets))
        .collect();
    let sync_script = redis::Script::new(script::SYNC);
    let mut con: Option<Conn> = None;
    let mut link = Link::Starting;
    let mut backoff = cfg.sync_interval;
    // Bans in force as Redis last said, kept through an outage until they end.
    let mut bans: HashMap<SourceKey, Instant> = HashMap::new();
    let mut wait = Duration::ZERO;
    let mut last_share = Instant::now();
    let mut drop_log = DropLog::default();
    loop {
        tokio::select! {
            _ = state.stopping() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let since = last_share.elapsed();
        last_share = Instant::now();
        let attempt = sync_once(
            &*state,
            &cluster,
            &client,
            &mut con,
            &keys,
            &sync_script,
            since,
        )
        .await;
        let now = Instant::now();
        match attempt {
            Ok((reply, here)) => {
                bans = reply
                    .bans
                    .iter()
                    .map(|(s, left)| (*s, now + *left))
                    .collect();
                install(&*state, &cluster, reply.loads, &here, &bans);
                cluster.nodes.store(reply.nodes, Relaxed);
                cluster.bad_entries.fetch_add(reply.bad, Relaxed);
                cluster.drop_counts(&reply.dropped);
                drop_log.note(&reply.dropped, now);
                cluster.synced();
                cluster.up.store(true, Relaxed);
                if link != Link::Up {
                    tracing::info!(
                        redis = %cfg.redis,
                        node = %cfg.node,
                        replicas = reply.nodes,
                        "cluster: Redis in sync; per-source caps are cluster-wide"
                    );
                    link = Link::Up;
                }
                backoff = cfg.sync_interval;
                wait = cfg.sync_interval;
            }
            Err((why, error)) => {
                con = None;
                cluster.fail(why);
                cluster.up.store(false, Relaxed);
                bans.retain(|_, until| *until > now);
                if cluster.staleness() >= cfg.sync_interval * KEEP_VIEW_INTERVALS {
                    install(&*state, &cluster, HashMap::new(), &HashMap::new(), &bans);
                }
                if link != Link::Down {
                    tracing::warn!(
                        redis = %cfg.redis,
                        reason = why.as_str(),
                        %error,
                        "cluster: Redis unavailable; retrying, and on full local per-source caps once the cluster view is three intervals old, until it is back (bans already known stay)"
                    );
                    link = Link::Down;
                }
                wait = backoff;
                backoff = (backoff * 2).min(cfg.sync_interval * MAX_BACKOFF_INTERVALS);
            }
        }
    }
    leave(&cluster, con, &keys).await;
}

/// One sync: connects if needed, runs the script once per bucket (all buckets at once,
/// within one `cluster.timeout`), and sums the answers.
async fn sync_once(
    state: &impl Listeners,
    cluster: &Cluster,
    client: &Client,
    con: &mut Option<Conn>,
    keys: &[Keys],
    sync_script: &redis::Script,
    since: Duration,
) -> Result<(script::Reply, LocalRates), (Failure, String)> {
    let cfg = &cluster.config;
    if con.is_none() {
        let c = tokio::time::timeout(cfg.timeout, client.connect())
            .await
            .map_err(|_| (Failure::Timeout, "connect timed out".to_string()))?
            .map_err(|e| (classify(&e, Failure::Connect), e.to_string()))?;
        *con = Some(c);
    }
    let Some(c) = con.as_ref() else {
        return Err((Failure::Connect, "no connection".into()));
    };
    let buckets = keys.len() as u32;
    let max = cfg.max_published as usize;
    let active = state.active();
    let bounds = Arc::new(script::Bounds {
        per_listener: active
            .iter()
            .map(|(name, g)| (name.clone(), script::Bounds::of(&g.limits())))
            .collect(),
        view: (cfg.max_replicas.saturating_sub(1) as usize).saturating_mul(max),
        ban_for: state.ban_for(),
    });
    // What one replica writes: `max_published` per listener (a bucket may hold it all).
    let per_node = max.saturating_mul(active.len().max(1));
    let mut share: Vec<Vec<(String, String)>> = vec![Vec::new(); keys.len()];
    let mut published = 0u64;
    let mut here: LocalRates = HashMap::new();
    for (name, guard) in active {
        for (source, load) in guard.share(|cap| cfg.publish_at(cap), max, since) {
            if load.rate > 0 {
                here.entry(name.clone())
                    .or_default()
                    .insert(source, load.rate);
            }
            let b = script::bucket_of(&source, buckets) as usize;
            if let Some(v) = share.get_mut(b) {
                v.push((script::field(&name, &source), script::value(&load)));
                published += 1;
            }
        }
    }
    let new_bans = cluster.take_bans();
    let mut bans: Vec<Vec<(String, u64)>> = vec![Vec::new(); keys.len()];
    for (s, d) in &new_bans {
        if let Some(v) = bans.get_mut(script::bucket_of(s, buckets) as usize) {
            v.push((s.to_string(), d.as_millis() as u64));
        }
    }
    let mut calls = tokio::task::JoinSet::new();
    for ((k, share), bans) in keys.iter().zip(share).zip(bans) {
        let mut c = c.clone();
        let script = sync_script.clone();
        let k = k.clone();
        let node = cfg.node.clone();
        let ttl = cfg.share_ttl.as_millis() as u64;
        let others = cfg.max_replicas.saturating_sub(1);
        let ban_max = bounds.ban_for.as_millis() as u64;
        calls.spawn(async move {
            let mut inv = script.prepare_invoke();
            inv.key(&k.nodes)
                .key(&k.bans)
                .key(k.share(&node))
                .arg(&k.share_prefix)
                .arg(&node)
                .arg(ttl)
                .arg(share.len())
                .arg(bans.len())
                .arg(per_node)
                .arg(others)
                .arg(MAX_BANS)
                .arg(ban_max);
            for (f, v) in &share {
                inv.arg(f).arg(v);
            }
            for (s, ms) in &bans {
                inv.arg(s).arg(*ms);
            }
            c.invoke(&inv).await
        });
    }
    let all = async {
        let mut reply = script::Reply::default();
        while let Some(r) = calls.join_next().await {
            match r {
                Ok(Ok(v)) => reply.absorb(v, &bounds),
                Ok(Err(e)) => return Err((classify(&e, Failure::Error), e.to_string())),
                Err(e) => return Err((Failure::Error, e.to_string())),
            }
        }
        Ok(reply)
    };
    let done = match tokio::time::timeout(cfg.timeout, all).await {
        Err(_) => Err((Failure::Timeout, "no answer in time".into())),
        Ok(r) => r,
    };
    // Calls still out (after a timeout, or an error in one bucket) end with the set.
    calls.abort_all();
    match done {
        Ok(reply) => {
            cluster.published.store(published, Relaxed);
            Ok((reply, here))
        }
        Err(e) => {
            cluster.return_bans(new_bans);
            Err(e)
        }
    }
}

/// What syncs cut since the last line, logged at most once per [`DROP_LOG_EVERY`]: a
/// writer of the keys that is hostile or broken is seen, and cannot flood the log.
#[derive(Default)]
struct DropLog {
    since: [u64; Dropped::ALL.len()],
    last: Option<Instant>,
}

impl DropLog {
    fn note(&mut self, dropped: &[u64; Dropped::ALL.len()], now: Instant) {
        for (s, n) in self.since.iter_mut().zip(dropped) {
            *s += n;
        }
        // A count over the cap is also a replica's connections waiting for a slot for a
        // moment, or one that only observes: counted, but alone not worth a line.
        let worth = Dropped::ALL
            .iter()
            .any(|d| *d != Dropped::Clamped && self.since[*d as usize] > 0);
        if !worth
            || self
                .last
                .is_some_and(|t| now.duration_since(t) < DROP_LOG_EVERY)
        {
            return;
        }
        let n = |d: Dropped| self.since[d as usize];
        tracing::warn!(
            share_full = n(Dropped::Share),
            replicas = n(Dropped::Replicas),
            view_full = n(Dropped::View),
            bans = n(Dropped::Bans),
            count_clamped = n(Dropped::Clamped),
            ban_clamped = n(Dropped::BanCut),
            "cluster: Redis held more than a replica writes; cut to the bounds (is something else writing the keys, or a replica with another config?)"
        );
        self.since = Default::default();
        self.last = Some(now);
    }
}

/// New connections per second per source on this replica, per listener, over the last
/// interval (the sources it published).
type LocalRates = HashMap<String, HashMap<SourceKey, u32>>;

/// Hands every active listener's guard its part of the view, with its part of each shared
/// source's rate for the coming interval.
fn install(
    state: &impl Listeners,
    cluster: &Cluster,
    mut loads: HashMap<String, HashMap<SourceKey, crate::guard::RemoteLoad>>,
    here: &LocalRates,
    bans: &HashMap<SourceKey, Instant>,
) {
    let banned: HashSet<SourceKey> = bans.keys().copied().collect();
    cluster.banned.store(banned.len() as u64, Relaxed);
    let interval = cluster.config.sync_interval.as_secs_f64();
    let mut remote_sources = 0;
    for (name, guard) in state.active() {
        let l = loads.remove(&name).unwrap_or_default();
        remote_sources += l.len() as u64;
        // An empty view and no view decide alike; no view costs admission nothing.
        if l.is_empty() && banned.is_empty() {
            guard.set_remote(None);
            continue;
        }
        let rate = guard.limits().conn_rate_per_source;
        let mine = here.get(&name);
        let rate_budget = if rate == 0 {
            HashMap::new()
        } else {
            l.iter()
                .filter(|(_, o)| o.rate > 0)
                .map(|(k, o)| {
                    let h = mine.and_then(|m| m.get(k)).copied().unwrap_or(0);
                    let per_sec = crate::guard::rate_share(rate, h, o.rate);
                    (*k, (f64::from(per_sec) * interval).ceil() as u32)
                })
                .collect()
        };
        guard.set_remote(Some(Arc::new(Remote {
            loads: l,
            banned: banned.clone(),
            rate_budget,
        })));
    }
    cluster.remote_sources.store(remote_sources, Relaxed);
}

/// Takes this replica's share out of Redis at a clean stop, so the others need not wait
/// for it to expire. Best effort, within `cluster.timeout` per bucket.
async fn leave(cluster: &Cluster, con: Option<Conn>, keys: &[Keys]) {
    let Some(mut c) = con else {
        return;
    };
    let node = &cluster.config.node;
    for k in keys {
        // One slot per pipeline: on a Redis Cluster each bucket is its own.
        let mut p = redis::pipe();
        p.del(k.share(node)).ignore().zrem(&k.nodes, node).ignore();
        let done = tokio::time::timeout(cluster.config.timeout, c.leave(&p)).await;
        if !matches!(done, Ok(Ok(()))) {
            tracing::debug!(
                "cluster: could not remove this replica's share at stop; it expires on its own"
            );
            return;
        }
    }
}

/// Names a Redis error's cause; `default` for what is neither a timeout, a lost
/// connection, nor an answer we cannot read.
fn classify(e: &RedisError, default: Failure) -> Failure {
    if e.is_timeout() {
        return Failure::Timeout;
    }
    match e.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => Failure::Reply,
        ErrorKind::Io if e.is_connection_refusal() || e.is_connection_dropped() => Failure::Connect,
        ErrorKind::AuthenticationFailed => Failure::Connect,
        _ => default,
    }
}
