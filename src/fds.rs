//! The descriptor budget: what the open-files limit can hold, cut into listener caps and
//! splice pipes, so a flood meets the caps and the eviction policy, never EMFILE.
//!
//! A proxied connection costs two descriptors (client and backend), a splice pipe two more.
//! When the configured `max_conns` promise more than the limit can hold, the caps are
//! lowered to fit, as HAProxy lowers `maxconn` to what `ulimit -n` allows, and the operator
//! is told once. The budget is:
//!
//! - the soft open-files limit (after start-up raised it to the hard one),
//! - minus a reserve for everything else the process opens: stdio, the runtime, signal and
//!   netlink sockets, `nft` children, the listening sockets, the admin endpoint and its
//!   connections (probes' reserved slots included), health checks, the resolver, the
//!   `[cluster]` sync's Redis connections, and accepts in flight that will be refused;
//! - minus two per connection still held by a listener a reload removed or moved: it drains
//!   beside its replacement, and its share comes back as its connections end;
//! - the rest is shared by connections and pipes. Pipes are reserved *inside* the budget (a
//!   quarter of the connections, HAProxy's `maxpipes` default, at most [`MAX_PIPES`]), so
//!   splice works whatever `max_conns` says and a pipe never takes the descriptor an accept
//!   or a backend connect needs. Pipes are still opened on demand only; a bulk direction
//!   that finds none free keeps copying.
//!
//! Several listeners share the process's descriptors, so when the caps must be lowered each
//! keeps its share of the configured total.

use std::fmt;

use crate::config::{Config, Limits, ListenerConfig};

/// Never more pipes than this, whatever the limit leaves: 4096 pipes of 256 KiB are a GiB of
/// kernel memory at most, and far more bulk streams than one proxy carries at once.
pub const MAX_PIPES: usize = 4096;
/// Set aside whatever the config says: stdio, the runtime's epoll and wakers, signal and
/// netlink sockets, `nft` children, accepts in flight that are refused or evicted (each
/// holds a descriptor for a moment), and spare.
pub const BASE_RESERVE: u64 = 64;
/// Health checks and resolver lookups of a backend name that may stand for several
/// addresses.
const PER_NAME: u64 = 4;
/// Pipes are reserved for this fraction of the connections (1/4, HAProxy's `maxpipes`).
const CONNS_PER_PIPE: u64 = 4;
/// `[cluster]` on one Redis: its multiplexed connection, and one more while a reconnect
/// after a failed sync overlaps the old connection's close (or resolves the host name).
const REDIS_ONE: u64 = 2;
/// `[cluster]` on a Redis Cluster: the client holds a connection to every node of the slot
/// map, primaries and replicas, beside its seeds; this covers a primary and a replica for
/// each of the buckets the keys are spread over (a larger cluster eats into the spare).
const REDIS_CLUSTER_NODES: u64 = 2 * 16;

/// One listener's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerShare {
    pub name: String,
    /// `limits.max_conns` as configured.
    pub configured: u32,
    /// The cap admission applies: the configured one, or lower when it does not fit.
    pub effective: u32,
}

/// The open-files limit, cut up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// The soft open-files limit the budget is cut from.
    pub limit: u64,
    /// Descriptors set aside for everything but proxied connections and pipes.
    pub reserve: u64,
    /// Connections still held by listeners a reload removed or moved, draining beside the
    /// new ones: two descriptors each, set aside before the listeners' caps are cut.
    pub draining: u64,
    /// Per listener, in config order.
    pub listeners: Vec<ListenerShare>,
    /// Pipes splice may hold at once (0: splice off or no room).
    pub pipes: usize,
    /// `tcp.splice` is on (and the platform has it).
    pub splice: bool,
}

impl Budget {
    /// Cuts `limit` descriptors for `config`.
    pub fn plan(config: &Config, limit: u64) -> Budget {
        Budget::plan_beside(config, limit, 0)
    }

    /// Cuts `limit` descriptors for `config` beside `draining` connections of listeners
    /// that no longer accept (a reload removed or moved them): those hold their
    /// descriptors until they end, so the caps shrink by them and grow back as they go.
    pub fn plan_beside(config: &Config, limit: u64, draining: u64) -> Budget {
        let reserve = reserve(config);
        let avail = limit.saturating_sub(reserve).saturating_sub(2 * draining);
        let splice = cfg!(target_os = "linux") && config.tcp.splice;
        let pipes_for = |conns: u64| {
            if splice {
                (conns / CONNS_PER_PIPE).min(MAX_PIPES as u64)
            } else {
                0
            }
        };
        let want: u64 = config
            .listeners
            .iter()
            .map(|l| u64::from(l.limits.max_conns))
            .sum();
        let conns = if 2 * want + 2 * pipes_for(want) <= avail {
            want
        } else if !splice {
            avail / 2
        } else {
            // The most connections c with 2c + 2 * min(c/4, MAX_PIPES) <= avail.
            let c = avail * 2 / 5;
            if pipes_for(c) == MAX_PIPES as u64 {
                avail.saturating_sub(2 * MAX_PIPES as u64) / 2
            } else {
                c
            }
            .min(want)
        };
        let pipes = if splice {
            (avail.saturating_sub(2 * conns) / 2).min(MAX_PIPES as u64) as usize
        } else {
            0
        };
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let configured = l.limits.max_conns;
                let effective = if conns >= want {
                    configured
                } else {
                    // Each keeps its share of the configured total; at least one.
                    let share = u64::from(configured) * conns / want.max(1);
                    (share.max(1)).min(u64::from(configured)) as u32
                };
                ListenerShare {
                    name: l.name.clone(),
                    configured,
                    effective,
                }
            })
            .collect();
        Budget {
            limit,
            reserve,
            draining,
            listeners,
            pipes,
            splice,
        }
    }

    /// The budget for `config` under this process's open-files limit now.
    pub fn current(config: &Config) -> Budget {
        Budget::plan(config, open_files_limit())
    }

    /// The same, beside `draining` connections of listeners that no longer accept.
    pub fn current_beside(config: &Config, draining: u64) -> Budget {
        Budget::plan_beside(config, open_files_limit(), draining)
    }

    /// The cap admission applies on listener `name`.
    pub fn effective(&self, name: &str) -> Option<u32> {
        self.listeners
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.effective)
    }

    /// `l`'s limits with `max_conns` at its effective value (and the state caps clamped
    /// to it, as validation clamps them to the configured one).
    pub fn limits(&self, l: &ListenerConfig) -> Limits {
        let mut lim = l.limits.clone();
        if let Some(max) = self.effective(&l.name) {
            lim.max_conns = max;
            lim.max_half_open = lim.max_half_open.min(max);
            lim.max_half_closed = lim.max_half_closed.min(max);
        }
        lim
    }

    /// Some listener's cap was lowered to fit.
    pub fn lowered(&self) -> bool {
        self.listeners.iter().any(|s| s.effective < s.configured)
    }

    /// Connections all listeners may hold together.
    pub fn conns(&self) -> u64 {
        self.listeners.iter().map(|s| u64::from(s.effective)).sum()
    }

    /// `, 2 per connection for N ... draining ...`, or nothing when no listener drains.
    fn draining_words(&self) -> String {
        if self.draining == 0 {
            String::new()
        } else {
            format!(
                ", 2 per connection for {} connection(s) of listeners draining after a reload",
                self.draining
            )
        }
    }

    /// What the operator should hear, once: a line per lowered listener.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let configured: u64 = self.listeners.iter().map(|s| u64::from(s.configured)).sum();
        for s in self.listeners.iter().filter(|s| s.effective < s.configured) {
            w.push(format!(
                "listener {:?}: limits.max_conns {} lowered to {} to fit the open-files limit ({}): \
                 2 descriptors per connection, {} splice pipes (2 each) and {} reserved{}; \
                 an open-files limit of {} keeps every max_conns as configured \
                 (LimitNOFILE, ulimit -n, --ulimit nofile)",
                s.name,
                s.configured,
                s.effective,
                self.limit,
                self.pipes,
                self.reserve,
                self.draining_words(),
                needed(configured, self.reserve, self.splice) + 2 * self.draining,
            ));
        }
        w
    }
}

/// Descriptors `conns` connections need, with pipes for a quarter of them when splicing.
fn needed(conns: u64, reserve: u64, splice: bool) -> u64 {
    let pipes = if splice {
        (conns / CONNS_PER_PIPE).min(MAX_PIPES as u64)
    } else {
        0
    };
    reserve + 2 * conns + 2 * pipes
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "descriptors: open-files limit {}; {} reserved{}, 2 per connection for {} connection(s) (",
            self.limit,
            self.reserve,
            self.draining_words(),
            self.conns()
        )?;
        for (i, s) in self.listeners.iter().enumerate() {
            let sep = if i > 0 { ", " } else { "" };
            if s.effective < s.configured {
                write!(
                    f,
                    "{sep}{:?} max_conns {} lowered from {}",
                    s.name, s.effective, s.configured
                )?;
            } else {
                write!(f, "{sep}{:?} max_conns {}", s.name, s.effective)?;
            }
        }
        if self.splice {
            write!(f, "), 2 per splice pipe for up to {} pipe(s)", self.pipes)
        } else {
            write!(f, "); splice off")
        }
    }
}

/// Descriptors set aside for what is not a proxied connection or a pipe.
fn reserve(config: &Config) -> u64 {
    let mut r = BASE_RESERVE + config.listeners.len() as u64;
    if config.admin.bind.is_some() {
        r += 1 + u64::from(config.admin.max_conns) + u64::from(config.admin.probe_conns);
    }
    if let Some(c) = &config.cluster {
        r += if c.redis_cluster {
            c.redis.expose().len() as u64 + REDIS_CLUSTER_NODES
        } else {
            REDIS_ONE
        };
    }
    for p in &config.pools {
        let names = p.servers.iter().filter(|s| s.addr.is_name()).count() as u64;
        if p.health.enabled {
            // One check at a time per server; a name may stand for several.
            r += p.servers.len() as u64 - names + names * PER_NAME;
        }
        if names > 0 {
            r += PER_NAME;
        }
    }
    r
}

/// The soft open-files limit now; unknown counts as no limit.
pub fn open_files_limit() -> u64 {
    #[cfg(unix)]
    {
        crate::sockopt::nofile().unwrap_or(u64::MAX)
    }
    #[cfg(not(unix))]
    {
        u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(listeners: &[(&str, u32)], splice: bool, admin: bool) -> Config {
        let mut text = String::new();
        for (i, (name, max)) in listeners.iter().enumerate() {
            text += &format!(
                "[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:{}\"\nbackends = [\"127.0.0.1:9\"]\n[listeners.limits]\nmax_conns = {max}\n",
                17100 + i
            );
        }
        text += &format!("[tcp]\nsplice = {splice}\n");
        text += if admin {
            "[admin]\nbind = \"127.0.0.1:17199\"\n"
        } else {
            "[admin]\nbind = \"off\"\n"
        };
        crate::config::parse(&text, "t.toml", HashMap::new()).expect("valid")
    }

    /// Descriptors the plan promises: it must fit the limit.
    fn used(b: &Budget) -> u64 {
        b.reserve + 2 * b.draining + 2 * b.conns() + 2 * b.pipes as u64
    }

    #[test]
    fn a_cap_that_fits_is_kept_and_pipes_get_what_is_left() {
        let c = config(&[("a", 8192)], true, true);
        let b = Budget::plan(&c, 65_536);
        assert!(!b.lowered());
        assert_eq!(b.effective("a"), Some(8192));
        assert_eq!(b.pipes, MAX_PIPES);
        assert!(used(&b) <= 65_536);
        assert!(b.warnings().is_empty());
    }

    #[test]
    fn a_cap_that_does_not_fit_is_lowered_and_pipes_keep_a_quarter() {
        // The case: 12,000 on a 20,000 limit.
        let c = config(&[("a", 12_000)], true, true);
        let b = Budget::plan(&c, 20_000);
        let eff = u64::from(b.effective("a").unwrap());
        assert!(eff < 10_000 && eff > 7_000, "{b}");
        assert!(b.pipes as u64 >= eff / 4, "{b}");
        assert!(used(&b) <= 20_000, "{b}");
        assert_eq!(b.warnings().len(), 1);
        assert!(b.warnings()[0].contains("lowered to"), "{:?}", b.warnings());
        assert_eq!(b.limits(&c.listeners[0]).max_conns as u64, eff);
        assert!(b.limits(&c.listeners[0]).max_half_open as u64 <= eff);
    }

    #[test]
    fn a_cap_that_fits_only_without_pipes_still_leaves_pipes() {
        // 2 x 9,900 fits 20,000 but leaves no pipe: the cap gives way to a quarter of pipes.
        let c = config(&[("a", 9_900)], true, false);
        let b = Budget::plan(&c, 20_000);
        assert!(b.lowered());
        assert!(b.pipes as u64 >= b.conns() / 4, "{b}");
        assert!(used(&b) <= 20_000);
        // Without splice nothing is set aside for pipes and the cap fits.
        let c = config(&[("a", 9_900)], false, false);
        let b = Budget::plan(&c, 20_000);
        assert!(!b.lowered(), "{b}");
        assert_eq!(b.pipes, 0);
    }

    #[test]
    fn a_huge_cap_keeps_splice_at_the_pipe_bound() {
        let c = config(&[("a", 1_000_000)], true, true);
        let b = Budget::plan(&c, 1_048_576);
        assert!(b.lowered());
        assert_eq!(b.pipes, MAX_PIPES);
        assert!(used(&b) <= 1_048_576);
        assert!(b.conns() > 500_000, "{b}");
    }

    #[test]
    fn listeners_share_a_lowered_budget_by_their_configured_caps() {
        let c = config(&[("a", 30_000), ("b", 10_000)], true, true);
        let b = Budget::plan(&c, 20_000);
        let (a, bb) = (b.effective("a").unwrap(), b.effective("b").unwrap());
        assert!(a < 30_000 && bb < 10_000);
        assert!((2.9..=3.1).contains(&(f64::from(a) / f64::from(bb))), "{b}");
        assert!(used(&b) <= 20_000, "{b}");
        assert_eq!(b.warnings().len(), 2);
    }

    #[test]
    fn draining_connections_shrink_the_caps_until_they_are_gone() {
        let c = config(&[("a", 100)], false, false);
        let full = Budget::plan(&c, 300);
        assert_eq!(full.effective("a"), Some(100), "{full}");
        // A moved listener still holds 80 connections: 160 descriptors the new one cannot
        // have, whatever its cap says.
        let beside = Budget::plan_beside(&c, 300, 80);
        assert!(beside.effective("a").unwrap() < 100, "{beside}");
        assert!(used(&beside) <= 300, "{beside}");
        assert!(
            beside
                .to_string()
                .contains("80 connection(s) of listeners draining")
        );
        assert!(
            beside.warnings()[0].contains("draining"),
            "{:?}",
            beside.warnings()
        );
        // As they end, the cap grows back.
        let fewer = Budget::plan_beside(&c, 300, 20);
        assert!(fewer.effective("a") > beside.effective("a"), "{fewer}");
        assert_eq!(Budget::plan_beside(&c, 300, 0), full);
    }

    #[test]
    fn the_reserve_counts_probe_slots_and_redis_connections() {
        let with = |extra: &str| {
            let text = format!(
                "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:17100\"\nbackends = [\"127.0.0.1:9\"]\n{extra}"
            );
            reserve(&crate::config::parse(&text, "t.toml", HashMap::new()).expect("valid"))
        };
        let admin = |probes: u32| {
            format!("[admin]\nbind = \"127.0.0.1:17199\"\nmax_conns = 16\nprobe_conns = {probes}\n")
        };
        // Each slot an admin connection may hold is a descriptor, probes' too.
        assert_eq!(with(&admin(4)) - with(&admin(0)), 4);
        assert_eq!(
            with(&admin(0)),
            BASE_RESERVE + 1 + (1 + 16),
            "the listener, the admin socket and its slots"
        );
        let node = "node = \"n1\"\n";
        let one = format!("[cluster]\nredis = \"redis://127.0.0.1:17379\"\n{node}");
        assert_eq!(with(&one) - with(""), REDIS_ONE);
        let cluster = format!(
            "[cluster]\nredis = \"redis://127.0.0.1:17379,redis://127.0.0.1:17380\"\nredis_cluster = true\n{node}"
        );
        assert_eq!(with(&cluster) - with(""), 2 + REDIS_CLUSTER_NODES);
    }

    #[test]
    fn a_limit_below_the_reserve_leaves_one_connection_and_no_pipe() {
        let c = config(&[("a", 100)], true, true);
        let b = Budget::plan(&c, 48);
        assert_eq!(b.effective("a"), Some(1));
        assert_eq!(b.pipes, 0);
    }
}
