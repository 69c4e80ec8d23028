//! `[cluster]`: per-source caps summed over every replica, through one Redis.
//!
//! An attacker spread over N replicas would otherwise get N times every per-source cap. The
//! section is optional: absent, halfguard is a single node and never speaks to Redis. The
//! Redis URL may carry a password, so it is kept in a [`RedisUrl`] whose `Display` and
//! `Debug` hide it: `/config`, `halfguard check` and the log print the rest of the section.
//! The node name defaults to the host name (in Kubernetes, the pod's name), filled in by
//! `load::parse`, since [`super::Config::from_raw`] does no I/O.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::file::RawDuration;
use super::{Checker, ConfigError, dur};

/// Twice a second: a spread flood gets about half a second of slack, and a replica sends
/// Redis two small scripts a second.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(500);
/// A replica that stops refreshing its share (SIGKILL, node lost) is forgotten this long
/// after its last sync, so survivors never refuse a source on a dead replica's count.
pub const DEFAULT_SHARE_TTL: Duration = Duration::from_secs(10);
/// One sync may take this long before it counts as failed; admission never waits for it.
/// The default is this or `sync_interval`, whichever is shorter (see [`default_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// A source is published once it holds a tenth of a per-source cap on this replica: the
/// cluster-wide cap is then exact up to ten replicas sharing a source evenly, and a flood
/// from a million sources holding one connection each publishes nothing.
pub const DEFAULT_PUBLISH_ABOVE: f64 = 0.1;
/// At most this many sources per listener per sync (the heaviest): the hard bound on what
/// one replica writes, and on what each replica reads per peer.
pub const DEFAULT_MAX_PUBLISHED: u32 = 1_000;
/// At most this many replicas' shares are read per sync (this one's aside): with
/// `max_published`, the bound on the view each replica holds, whatever Redis holds.
pub const DEFAULT_MAX_REPLICAS: u32 = 32;
/// `(max_replicas - 1) x max_published` may not exceed this: a view of a million entries
/// per listener is already hundreds of megabytes to read every interval.
pub const MAX_VIEW: u64 = 1_000_000;
/// Keys live under `<key_prefix>:`, so several deployments can share one Redis.
pub const DEFAULT_KEY_PREFIX: &str = "halfguard";
/// Node names longer than this are a mistake (a pod name is at most 63 characters).
pub const MAX_NODE_LEN: usize = 253;
/// With `redis_cluster`, sources are spread over this many hash slots (one hash tag per
/// bucket), so the shares and their traffic spread over the cluster's primaries.
pub const CLUSTER_BUCKETS: u32 = 16;

/// `[cluster]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis: Option<String>,
    pub node: Option<String>,
    pub sync_interval: Option<RawDuration>,
    pub share_ttl: Option<RawDuration>,
    pub timeout: Option<RawDuration>,
    pub publish_above: Option<f64>,
    pub max_published: Option<u32>,
    pub max_replicas: Option<u32>,
    pub key_prefix: Option<String>,
    pub redis_cluster: Option<bool>,
}

/// A Redis URL whose password never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URLs themselves (one, or a Redis Cluster's seed nodes), for the client only.
    pub fn expose(&self) -> Vec<&str> {
        self.0.split(',').map(str::trim).collect()
    }

    /// The URL(s) with the password (if any) replaced by `***`.
    pub fn redacted(&self) -> String {
        self.expose()
            .into_iter()
            .map(redact_one)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One URL with its password replaced by `***`.
fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable>".into();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            let hidden = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                // `redis://secret@host`: redis-rs reads a lone userinfo as the password.
                "***".to_string()
            };
            format!("{scheme}://{hidden}@{host}{path}")
        }
        None => url.to_string(),
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

/// The validated `[cluster]` section. Read at start only.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub redis: RedisUrl,
    /// This replica's name; empty until `load::parse` fills in the host name.
    pub node: String,
    pub sync_interval: Duration,
    pub share_ttl: Duration,
    pub timeout: Duration,
    /// The fraction of a per-source cap a source must hold here to be published.
    pub publish_above: f64,
    pub max_published: u32,
    /// The replicas read per sync, this one included; more are dropped (counted).
    pub max_replicas: u32,
    pub key_prefix: String,
    /// `redis` names a Redis Cluster's seed nodes: the crate's cluster client, and sources
    /// spread over [`CLUSTER_BUCKETS`] hash slots.
    pub redis_cluster: bool,
}

impl ClusterConfig {
    /// The smallest count of a cap of `cap` that gets a source published (at least 1).
    pub fn publish_at(&self, cap: u32) -> u32 {
        ((f64::from(cap) * self.publish_above).ceil() as u32).max(1)
    }

    /// How many hash-tagged buckets the keys are spread over: 1 on a single Redis.
    pub fn buckets(&self) -> u32 {
        if self.redis_cluster {
            CLUSTER_BUCKETS
        } else {
            1
        }
    }
}

/// `cluster.timeout` when the file leaves it out: [`DEFAULT_TIMEOUT`], or the interval
/// when that is shorter, so an operator who only shortens `sync_interval` is not refused
/// for a key they never wrote.
pub fn default_timeout(sync_interval: Duration) -> Duration {
    DEFAULT_TIMEOUT.min(sync_interval)
}

/// Checks a node name (from the file, the environment or the host name).
pub fn check_node(node: &str) -> Result<(), String> {
    if node.is_empty() {
        return Err("must not be empty".into());
    }
    if node.len() > MAX_NODE_LEN {
        return Err(format!("is longer than {MAX_NODE_LEN} characters"));
    }
    if let Some(c) = node.chars().find(|c| !c.is_ascii_graphic() || *c == '|') {
        return Err(format!(
            "{node:?} has {:?}: use letters, digits, '-', '.' or '_' (a host or pod name)",
            c.escape_default().to_string()
        ));
    }
    Ok(())
}

impl ClusterConfig {
    pub(super) fn from_raw(
        ck: &Checker<'_>,
        raw: &RawCluster,
    ) -> Result<ClusterConfig, ConfigError> {
        let redis_cluster = raw.redis_cluster.unwrap_or(false);
        let redis = redis_url(ck, raw.redis.as_deref(), redis_cluster)?;
        let node = raw.node.as_deref().map(str::trim).unwrap_or_default();
        if !node.is_empty() {
            check_node(node).map_err(|r| ck.err("cluster.node", r))?;
        }
        let sync_interval = raw.sync_interval.map_or(DEFAULT_SYNC_INTERVAL, |x| x.0);
        let c = ClusterConfig {
            redis,
            node: node.to_string(),
            sync_interval,
            share_ttl: raw.share_ttl.map_or(DEFAULT_SHARE_TTL, |x| x.0),
            timeout: raw
                .timeout
                .map_or_else(|| default_timeout(sync_interval), |x| x.0),
            publish_above: raw.publish_above.unwrap_or(DEFAULT_PUBLISH_ABOVE),
            max_published: raw.max_published.unwrap_or(DEFAULT_MAX_PUBLISHED),
            max_replicas: raw.max_replicas.unwrap_or(DEFAULT_MAX_REPLICAS),
            key_prefix: raw
                .key_prefix
                .clone()
                .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_string()),
            redis_cluster,
        };
        c.check(ck)?;
        Ok(c)
    }

    /// The checks of values that parsed, Redis URL and node name aside.
    fn check(&self, ck: &Checker<'_>) -> Result<(), ConfigError> {
        if self.sync_interval < Duration::from_millis(10) {
            return Err(ck.err(
                "cluster.sync_interval",
                "is at least \"10ms\": each sync is a Redis round trip",
            ));
        }
        if self.share_ttl < self.sync_interval * 3 {
            return Err(ck.err(
                "cluster.share_ttl",
                format!(
                    "{} is less than three sync intervals ({}): a live replica's share would expire between two syncs",
                    dur(self.share_ttl),
                    dur(self.sync_interval * 3)
                ),
            ));
        }
        if self.timeout.is_zero() || self.timeout > self.sync_interval {
            return Err(ck.err(
                "cluster.timeout",
                format!(
                    "must be above 0s and at most sync_interval ({}): a sync must end before the next",
                    dur(self.sync_interval)
                ),
            ));
        }
        if !(self.publish_above > 0.0 && self.publish_above <= 1.0) {
            return Err(ck.err(
                "cluster.publish_above",
                format!("{} is not a fraction in (0, 1]", self.publish_above),
            ));
        }
        if self.max_published == 0 || self.max_published > 100_000 {
            return Err(ck.err(
                "cluster.max_published",
                "must be in 1..=100000: it bounds what each replica writes and reads per sync",
            ));
        }
        let view = u64::from(self.max_replicas.saturating_sub(1)) * u64::from(self.max_published);
        if self.max_replicas < 2 || view > MAX_VIEW {
            return Err(ck.err(
                "cluster.max_replicas",
                format!(
                    "must be at least 2, and (max_replicas - 1) x max_published ({view}) at most {MAX_VIEW}: it bounds the view each replica reads"
                ),
            ));
        }
        if self.key_prefix.is_empty()
            || self.key_prefix.contains(|ch: char| !ch.is_ascii_graphic())
            || self.key_prefix.contains(['{', '}'])
        {
            return Err(ck.err(
                "cluster.key_prefix",
                "must be printable ASCII without spaces or braces",
            ));
        }
        Ok(())
    }
}

/// `cluster.redis`: one `redis://` URL, or with `redis_cluster` a Redis Cluster's seed
/// nodes. Never echoes the URL in an error: it may hold the password.
fn redis_url(
    ck: &Checker<'_>,
    raw: Option<&str>,
    redis_cluster: bool,
) -> Result<RedisUrl, ConfigError> {
    let url = raw.map(str::trim).unwrap_or_default();
    if url.is_empty() {
        return Err(ck.err(
            "cluster.redis",
            "is required with [cluster]: \"redis://[user:password@]host:port/db\" (or set HALFGUARD__CLUSTER__REDIS); remove [cluster] for a single node",
        ));
    }
    let redis = RedisUrl(url.to_string());
    let shown = redis.redacted();
    let urls = redis.expose();
    if urls.len() > 1 && !redis_cluster {
        return Err(ck.err(
            "cluster.redis",
            format!("{shown}: several URLs are a Redis Cluster's seed nodes; set cluster.redis_cluster = true, or give one URL"),
        ));
    }
    for one in urls {
        let shown = redact_one(one);
        if one.starts_with("rediss://") {
            return Err(ck.err(
                "cluster.redis",
                format!("{shown}: rediss:// (TLS) is not supported by this build; use redis:// over a trusted network or a TLS sidecar"),
            ));
        }
        if !one.starts_with("redis://") {
            return Err(ck.err(
                "cluster.redis",
                format!("{shown} is not a redis:// URL (redis://[user:password@]host:port/db)"),
            ));
        }
        if let Err(e) = redis::Client::open(one) {
            return Err(ck.err(
                "cluster.redis",
                format!("{shown} is not a valid Redis URL ({})", e.category()),
            ));
        }
    }
    Ok(redis)
}

/// One line; the Redis URL without its password.
impl fmt::Display for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster: redis {}{}, node {:?}, sync every {} (timeout {}), share_ttl {}, publish above {:.0}% of a cap, at most {} sources per listener, at most {} replicas read, keys {{{}}}:*",
            self.redis,
            if self.redis_cluster {
                format!(" (Redis Cluster, sources over {} slots)", self.buckets())
            } else {
                String::new()
            },
            self.node,
            dur(self.sync_interval),
            dur(self.timeout),
            dur(self.share_ttl),
            self.publish_above * 100.0,
            self.max_published,
            self.max_replicas,
            self.key_prefix
        )
    }
}

/// This host's name, the default node name (a pod's name in Kubernetes).
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_prints() {
        for (url, shown) in [
            (
                "redis://user:s3cret@10.0.0.1:6379/0",
                "redis://user:***@10.0.0.1:6379/0",
            ),
            ("redis://:s3cret@r:6379", "redis://:***@r:6379"),
            ("redis://s3cret@r:6379/2", "redis://***@r:6379/2"),
            ("redis://r:6379/0", "redis://r:6379/0"),
            (
                "redis://:s3cret@a:7000, redis://:s3cret@b:7001",
                "redis://:***@a:7000,redis://:***@b:7001",
            ),
        ] {
            let u = RedisUrl(url.into());
            assert_eq!(u.to_string(), shown);
            assert!(!format!("{u:?}").contains("s3cret"));
        }
    }

    fn parse(body: &str) -> Result<ClusterConfig, String> {
        let text = format!(
            "[[listeners]]\nname = \"x\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n[cluster]\nredis = \"redis://r:6379\"\nnode = \"n\"\n{body}\n"
        );
        crate::config::parse(&text, "c.toml", std::collections::HashMap::new())
            .map(|c| c.cluster.expect("cluster"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_default_timeout_follows_a_short_interval_and_an_explicit_one_still_must_fit() {
        let ms = Duration::from_millis;
        assert_eq!(parse("").expect("defaults").timeout, DEFAULT_TIMEOUT);
        let c = parse("sync_interval = \"200ms\"").expect("no timeout written");
        assert_eq!(c.timeout, ms(200));
        let c = parse("sync_interval = \"2s\"\nshare_ttl = \"10s\"").expect("long");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        let err = parse("sync_interval = \"200ms\"\ntimeout = \"300ms\"").expect_err("over");
        assert!(err.contains("`cluster.timeout`"), "{err}");
    }

    #[test]
    fn the_view_bound_is_checked_naming_max_replicas() {
        assert_eq!(
            parse("").expect("defaults").max_replicas,
            DEFAULT_MAX_REPLICAS
        );
        for body in [
            "max_replicas = 1",
            "max_replicas = 1000\nmax_published = 10000",
        ] {
            let err = parse(body).expect_err(body);
            assert!(err.contains("`cluster.max_replicas`"), "{body}: {err}");
        }
        assert_eq!(parse("max_replicas = 2").expect("two").max_replicas, 2);
    }
}
