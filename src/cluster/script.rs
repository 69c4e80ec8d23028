//! The sync script: one Redis round trip per interval publishes this replica's share and
//! reads everybody else's.
//!
//! Layout, all under one hash tag (`{prefix}`, or `{prefix:b}` for bucket `b` of a Redis
//! Cluster, see [`bucket_of`]) so one script's keys share a slot:
//! - `{prefix}:share:<node>`: a hash, `<listener>|<source>` -> `"conns half_open half_closed"`,
//!   rewritten whole at each sync and expiring `share_ttl` after it, so a replica that dies
//!   is forgotten within that bound whatever happens to the others;
//! - `{prefix}:nodes`: a sorted set, node -> the server time (ms) its share expires; the
//!   script reads the shares of the live ones and drops the others;
//! - `{prefix}:bans`: a hash, source -> the server time (ms) its ban ends.
//!
//! Counts are per-node shares summed on read, never a shared counter another replica
//! increments: a replica that dies mid-way cannot leave a count behind (HAProxy's peers went
//! negative that way). Time is Redis's own (`TIME`), so replicas' clocks need not agree.
//! The script is sent once and invoked by its hash afterwards (`EVALSHA`).

use std::collections::HashMap;
use std::time::Duration;

use crate::guard::{RemoteLoad, SourceKey};

pub(super) const SYNC: &str = r#"
local nodes, bans, share = KEYS[1], KEYS[2], KEYS[3]
local share_prefix, node = ARGV[1], ARGV[2]
local ttl, nshare, nban = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', share)
local i = 6
local batch = {}
for j = 0, nshare - 1 do
  batch[#batch + 1] = ARGV[i + 2 * j]
  batch[#batch + 1] = ARGV[i + 2 * j + 1]
  if #batch >= 1000 then
    redis.call('HSET', share, unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('HSET', share, unpack(batch)) end
if nshare > 0 then redis.call('PEXPIRE', share, ttl) end
i = i + 2 * nshare
redis.call('ZADD', nodes, now + ttl, node)
redis.call('ZREMRANGEBYSCORE', nodes, '-inf', now)
redis.call('PEXPIRE', nodes, ttl)
for j = 0, nban - 1 do
  local src, until_ms = ARGV[i + 2 * j], now + tonumber(ARGV[i + 2 * j + 1])
  local old = tonumber(redis.call('HGET', bans, src) or '0') or 0
  if until_ms > old then redis.call('HSET', bans, src, until_ms) end
end
local live = redis.call('ZRANGE', nodes, 0, -1)
local out = {}
for _, n in ipairs(live) do
  if n ~= node then
    local h = redis.call('HGETALL', share_prefix .. n)
    for k = 1, #h do out[#out + 1] = h[k] end
  end
end
local b = redis.call('HGETALL', bans)
local left = {}
local longest = 0
for k = 1, #b, 2 do
  local ms = (tonumber(b[k + 1]) or 0) - now
  if ms > 0 then
    left[#left + 1] = b[k]
    left[#left + 1] = tostring(ms)
    if ms > longest then longest = ms end
  else
    redis.call('HDEL', bans, b[k])
  end
end
if longest > 0 then redis.call('PEXPIRE', bans, longest) end
return {out, left, #live}
"#;

/// One bucket's keys under `prefix`, hash-tagged so one script touches one slot.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub nodes: String,
    pub bans: String,
    pub share_prefix: String,
}

impl Keys {
    /// Bucket `bucket` of `buckets` (one bucket: the plain `{prefix}` tag).
    pub fn new(prefix: &str, bucket: u32, buckets: u32) -> Keys {
        let tag = if buckets <= 1 {
            prefix.to_string()
        } else {
            format!("{prefix}:{bucket}")
        };
        Keys {
            nodes: format!("{{{tag}}}:nodes"),
            bans: format!("{{{tag}}}:bans"),
            share_prefix: format!("{{{tag}}}:share:"),
        }
    }

    pub fn share(&self, node: &str) -> String {
        format!("{}{node}", self.share_prefix)
    }
}

/// The bucket a source's entries and ban live in: a hash every replica computes alike
/// (FNV-1a of the printed key), so on a Redis Cluster the sources spread over
/// `buckets` hash slots and each bucket's script runs where its slot lives.
pub(super) fn bucket_of(source: &SourceKey, buckets: u32) -> u32 {
    if buckets <= 1 {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in source.to_string().bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h % buckets
}

/// A share entry's field: the listener and the source.
pub(super) fn field(listener: &str, source: &SourceKey) -> String {
    format!("{listener}|{source}")
}

/// A share entry's value: `conns half_open half_closed rate`.
pub(super) fn value(l: &RemoteLoad) -> String {
    format!("{} {} {} {}", l.conns, l.half_open, l.half_closed, l.rate)
}

/// What one sync brought back.
#[derive(Debug, Default)]
pub(super) struct Reply {
    /// Per listener name: the other replicas' loads, summed.
    pub loads: HashMap<String, HashMap<SourceKey, RemoteLoad>>,
    /// Banned sources and how long their ban still runs.
    pub bans: Vec<(SourceKey, Duration)>,
    /// Live replicas, this one included.
    pub nodes: u64,
    /// Entries that did not parse (another version, or something else writing our keys).
    pub bad: u64,
}

impl Reply {
    /// Adds another bucket's answer.
    pub fn merge(&mut self, o: Reply) {
        for (listener, loads) in o.loads {
            let mine = self.loads.entry(listener).or_default();
            for (source, load) in loads {
                mine.entry(source).or_default().add(load);
            }
        }
        self.bans.extend(o.bans);
        self.nodes = self.nodes.max(o.nodes);
        self.bad += o.bad;
    }
}

/// The script's answer as Redis sends it: flat share pairs, flat ban pairs, live nodes.
pub(super) type RawReply = (Vec<String>, Vec<String>, i64);

/// Sums the raw reply.
pub(super) fn parse(raw: RawReply) -> Reply {
    let (shares, bans, nodes) = raw;
    let mut r = Reply {
        nodes: u64::try_from(nodes).unwrap_or(0),
        ..Reply::default()
    };
    for pair in shares.chunks(2) {
        let parsed = match pair {
            [f, v] => parse_entry(f, v),
            _ => None,
        };
        match parsed {
            Some((listener, source, load)) => r
                .loads
                .entry(listener.to_string())
                .or_default()
                .entry(source)
                .or_default()
                .add(load),
            None => r.bad += 1,
        }
    }
    for pair in bans.chunks(2) {
        let parsed = match pair {
            [s, ms] => s
                .parse::<SourceKey>()
                .ok()
                .zip(ms.parse::<u64>().ok().map(Duration::from_millis)),
            _ => None,
        };
        match parsed {
            Some(b) => r.bans.push(b),
            None => r.bad += 1,
        }
    }
    r
}

fn parse_entry<'a>(field: &'a str, value: &str) -> Option<(&'a str, SourceKey, RemoteLoad)> {
    let (listener, source) = field.rsplit_once('|')?;
    let source = source.parse::<SourceKey>().ok()?;
    let mut n = value.split(' ').map(|x| x.parse::<u32>().ok());
    let load = RemoteLoad {
        conns: n.next()??,
        half_open: n.next()??,
        half_closed: n.next()??,
        rate: n.next()??,
    };
    n.next().is_none().then_some((listener, source, load))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_spread_sources_and_one_bucket_is_the_plain_tag() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..200u32 {
            let k = SourceKey::new(std::net::IpAddr::from(i.to_be_bytes()), 32, 64);
            assert_eq!(bucket_of(&k, 1), 0);
            seen.insert(bucket_of(&k, 16));
        }
        assert_eq!(seen.len(), 16);
        assert_eq!(Keys::new("hg", 0, 1).nodes, "{hg}:nodes");
        assert_eq!(Keys::new("hg", 3, 16).share("n"), "{hg:3}:share:n");
    }

    #[test]
    fn shares_sum_per_listener_and_source_and_garbage_is_counted() {
        let s = |x: &str| x.to_string();
        let r = parse((
            vec![
                s("web|192.0.2.1"),
                s("3 1 0 7"),
                s("web|192.0.2.1"),
                s("2 0 1 5"),
                s("db|192.0.2.1"),
                s("5 0 0 0"),
                s("web|not-an-ip"),
                s("1 0 0 0"),
                s("web|192.0.2.2"),
                s("1 x 0 0"),
            ],
            vec![s("192.0.2.9"), s("1500"), s("nope"), s("1")],
            3,
        ));
        let k: SourceKey = "192.0.2.1".parse().unwrap();
        assert_eq!(
            r.loads["web"][&k],
            RemoteLoad {
                conns: 5,
                half_open: 1,
                half_closed: 1,
                rate: 12
            }
        );
        assert_eq!(r.loads["db"][&k].conns, 5);
        assert_eq!(r.bad, 3);
        assert_eq!(r.bans.len(), 1);
        assert_eq!(r.bans[0].1, Duration::from_millis(1500));
        assert_eq!(r.nodes, 3);
    }
}
