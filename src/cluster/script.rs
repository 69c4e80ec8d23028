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
//!
//! What is read is held to what replicas write, since anyone who can write the keys could
//! write anything: a node scored further ahead than `share_ttl` is held to it (a replica
//! is live that long after its sync, no longer) and not read until then; at most
//! `max_replicas - 1` other shares are read, each at most `max_published` per listener
//! (`HSCAN` past that, so the call's work is bounded whatever a hash holds); at most
//! [`super::MAX_BANS`] bans, and a ban ending after now + `kernel.ban_for` is cut to that
//! in Redis, so it ends; a key of the wrong type is replaced rather than failing every
//! call. [`Reply::absorb`] then holds each entry to what one replica could count
//! ([`Bounds`]). Each cut is counted by [`super::Dropped`] reason.

use std::collections::HashMap;
use std::time::Duration;

use super::Dropped;
use crate::guard::{RemoteLoad, SourceKey};

pub(super) const SYNC: &str = r#"
local nodes, bans, share = KEYS[1], KEYS[2], KEYS[3]
local share_prefix, node = ARGV[1], ARGV[2]
local ttl, nshare, nban = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local per_node, max_others = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_bans, ban_max = tonumber(ARGV[8]), tonumber(ARGV[9])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function own(key, kind)
  local ty = redis.call('TYPE', key)['ok']
  if ty ~= 'none' and ty ~= kind then redis.call('DEL', key) end
end
own(nodes, 'zset')
own(bans, 'hash')
redis.call('DEL', share)
local i = 10
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
local ahead = redis.call('ZRANGEBYSCORE', nodes, '(' .. (now + ttl), '+inf', 'LIMIT', 0, 256)
for _, n in ipairs(ahead) do redis.call('ZADD', nodes, now + ttl, n) end
redis.call('PEXPIRE', nodes, ttl)
for j = 0, nban - 1 do
  local src, until_ms = ARGV[i + 2 * j], now + tonumber(ARGV[i + 2 * j + 1])
  local old = tonumber(redis.call('HGET', bans, src) or '0') or 0
  if until_ms > old then redis.call('HSET', bans, src, until_ms) end
end
local bad = 0
local function read(key, limit, out)
  if redis.call('TYPE', key)['ok'] ~= 'hash' then return 0 end
  local function put(f, v)
    if #f <= 1024 and #v <= 64 then
      out[#out + 1] = f
      out[#out + 1] = v
    else
      bad = bad + 1
    end
  end
  local n = redis.call('HLEN', key)
  if n <= limit then
    local h = redis.call('HGETALL', key)
    for k = 1, #h - 1, 2 do put(h[k], h[k + 1]) end
    return 0
  end
  local cursor, got = '0', 0
  repeat
    local r = redis.call('HSCAN', key, cursor, 'COUNT', 256)
    cursor = r[1]
    local h = r[2]
    for k = 1, #h - 1, 2 do
      if got < limit then
        put(h[k], h[k + 1])
        got = got + 1
      end
    end
  until cursor == '0' or got >= limit
  return n - got
end
local live = redis.call('ZREVRANGEBYSCORE', nodes, now + ttl, '(' .. now, 'LIMIT', 0, max_others + 1)
local nlive = redis.call('ZCOUNT', nodes, '(' .. now, now + ttl)
local out = {}
local others, share_left = 0, 0
for _, n in ipairs(live) do
  if n ~= node and others < max_others then
    others = others + 1
    share_left = share_left + read(share_prefix .. n, per_node, out)
  end
end
local b = {}
local bans_left = read(bans, max_bans, b)
local left = {}
local longest, cut = 0, 0
for k = 1, #b, 2 do
  local ms = (tonumber(b[k + 1]) or 0) - now
  if ms > ban_max then
    ms = ban_max
    redis.call('HSET', bans, b[k], now + ms)
    cut = cut + 1
  end
  if ms > 0 then
    ms = math.floor(ms)
    left[#left + 1] = b[k]
    left[#left + 1] = tostring(ms)
    if ms > longest then longest = ms end
  else
    redis.call('HDEL', bans, b[k])
  end
end
if longest > 0 then redis.call('PEXPIRE', bans, longest) end
return {out, left, nlive, {bad, share_left, math.max(0, nlive - 1 - others), bans_left, cut}}
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

/// What a sync keeps of what it reads: Redis is trusted to say which sources to refuse
/// (as a replica can), never to grow the view or to ban for longer than this replica would.
#[derive(Debug, Default)]
pub(super) struct Bounds {
    /// Per active listener: the most one replica's entry may count, field by field (the
    /// per-source cap: more refuses nothing more; a cap that is off, the listener's
    /// `max_conns`: no replica of this config holds more). A listener not here is not
    /// this replica's, and its entries are skipped.
    pub per_listener: HashMap<String, RemoteLoad>,
    /// Sources kept per listener, over every replica and bucket.
    pub view: usize,
    /// The longest a ban read may still run (`kernel.ban_for`).
    pub ban_for: Duration,
}

impl Bounds {
    /// The bound of one entry of `lim`'s listener.
    pub fn of(lim: &crate::config::Limits) -> RemoteLoad {
        let or_all = |cap: u32| if cap == 0 { lim.max_conns } else { cap };
        RemoteLoad {
            conns: or_all(lim.max_conns_per_source),
            half_open: or_all(lim.max_half_open_per_source),
            half_closed: or_all(lim.max_half_closed_per_source),
            // Unused when off; a replica admits at most its part of it when on.
            rate: if lim.conn_rate_per_source == 0 {
                u32::MAX
            } else {
                lim.conn_rate_per_source
            },
        }
    }
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
    /// What was cut, by [`Dropped`] reason.
    pub dropped: [u64; Dropped::ALL.len()],
}

/// The script's answer as Redis sends it: flat share pairs, flat ban pairs, live nodes,
/// and what it cut: entries too long to be ours, then shares, replicas and bans left
/// unread, and bans cut to `ban_for`.
pub(super) type RawReply = (Vec<String>, Vec<String>, i64, Vec<i64>);

impl Reply {
    /// Adds one bucket's answer, within `b`.
    pub fn absorb(&mut self, raw: RawReply, b: &Bounds) {
        let (shares, bans, nodes, cut) = raw;
        let count = |i: usize| cut.get(i).map_or(0, |n| u64::try_from(*n).unwrap_or(0));
        self.bad += count(0);
        self.dropped[Dropped::Share as usize] += count(1);
        self.dropped[Dropped::Replicas as usize] =
            self.dropped[Dropped::Replicas as usize].max(count(2));
        self.dropped[Dropped::Bans as usize] += count(3);
        self.dropped[Dropped::BanCut as usize] += count(4);
        self.nodes = self.nodes.max(u64::try_from(nodes).unwrap_or(0));
        for pair in shares.chunks(2) {
            let parsed = match pair {
                [f, v] => parse_entry(f, v),
                _ => None,
            };
            let Some((listener, source, load)) = parsed else {
                self.bad += 1;
                continue;
            };
            let Some(max) = b.per_listener.get(listener) else {
                continue;
            };
            let kept = RemoteLoad {
                conns: load.conns.min(max.conns),
                half_open: load.half_open.min(max.half_open),
                half_closed: load.half_closed.min(max.half_closed),
                rate: load.rate.min(max.rate),
            };
            if kept != load {
                self.dropped[Dropped::Clamped as usize] += 1;
            }
            let view = self.loads.entry(listener.to_string()).or_default();
            let full = view.len() >= b.view;
            match view.get_mut(&source) {
                Some(l) => l.add(kept),
                None if full => self.dropped[Dropped::View as usize] += 1,
                None => {
                    view.insert(source, kept);
                }
            }
        }
        for pair in bans.chunks(2) {
            let parsed = match pair {
                [s, ms] => s.parse::<SourceKey>().ok().zip(
                    ms.parse::<u64>()
                        .ok()
                        .map(|ms| Duration::from_millis(ms).min(b.ban_for)),
                ),
                _ => None,
            };
            match parsed {
                Some(ban) => self.bans.push(ban),
                None => self.bad += 1,
            }
        }
    }
}

/// One answer alone, summed (the unit tests' way in).
#[cfg(test)]
fn parse(raw: RawReply, b: &Bounds) -> Reply {
    let mut r = Reply::default();
    r.absorb(raw, b);
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

    /// Bounds for listeners `web` and `db`: caps of 10 each, rate 20, views of `view`.
    fn bounds(view: usize) -> Bounds {
        let cap = RemoteLoad {
            conns: 10,
            half_open: 10,
            half_closed: 10,
            rate: 20,
        };
        Bounds {
            per_listener: [("web".to_string(), cap), ("db".to_string(), cap)].into(),
            view,
            ban_for: Duration::from_secs(60),
        }
    }

    #[test]
    fn shares_sum_per_listener_and_source_and_garbage_is_counted() {
        let s = |x: &str| x.to_string();
        let r = parse(
            (
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
                    s("gone|192.0.2.1"),
                    s("1 0 0 0"),
                ],
                vec![s("192.0.2.9"), s("1500"), s("nope"), s("1")],
                3,
                vec![2, 0, 0, 0, 0],
            ),
            &bounds(100),
        );
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
        assert!(!r.loads.contains_key("gone"), "not a listener here");
        assert_eq!(r.bad, 2 + 3);
        assert_eq!(r.bans.len(), 1);
        assert_eq!(r.bans[0].1, Duration::from_millis(1500));
        assert_eq!(r.nodes, 3);
        assert_eq!(r.dropped, [0; Dropped::ALL.len()]);
    }

    #[test]
    fn each_entry_counts_at_most_one_replica_at_the_cap_and_the_view_is_bounded() {
        let s = |x: &str| x.to_string();
        let mut shares = vec![
            // Two replicas' entries for one source: each held to the cap, then summed.
            s("web|192.0.2.1"),
            s("4294967295 4294967295 4294967295 4294967295"),
            s("web|192.0.2.1"),
            s("3 0 0 0"),
        ];
        for i in 2..10 {
            shares.push(format!("web|192.0.2.{i}"));
            shares.push(s("1 0 0 0"));
        }
        let r = parse(
            (
                shares,
                vec![s("192.0.2.9"), s("999999999999")],
                2,
                vec![0, 7, 1, 2, 1],
            ),
            &bounds(4),
        );
        let k: SourceKey = "192.0.2.1".parse().unwrap();
        assert_eq!(
            r.loads["web"][&k],
            RemoteLoad {
                conns: 13,
                half_open: 10,
                half_closed: 10,
                rate: 20
            }
        );
        assert_eq!(r.loads["web"].len(), 4, "the view holds at most 4 sources");
        assert_eq!(r.dropped[Dropped::View as usize], 5);
        assert_eq!(r.dropped[Dropped::Clamped as usize], 1);
        assert_eq!(r.dropped[Dropped::Share as usize], 7);
        assert_eq!(r.dropped[Dropped::Replicas as usize], 1);
        assert_eq!(r.dropped[Dropped::Bans as usize], 2);
        assert_eq!(r.dropped[Dropped::BanCut as usize], 1);
        assert_eq!(
            r.bans[0].1,
            Duration::from_secs(60),
            "no ban outlives ban_for"
        );
    }
}
