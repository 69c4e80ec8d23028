//! Choosing a server for a new connection: weighted round robin, least connections, or the
//! lighter of two at random, over the servers that are up and have room, never one this
//! connection has tried already.
//!
//! Apart from the pool because it is pure logic over the servers' state (no sockets, no
//! waiting), so unit tests can set servers down, full or busy and watch the choice. It runs
//! for every new connection, so it does not allocate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::Server;
use crate::config::Balance;

/// At most this many servers are tried for one connection. The connect budget is shared
/// among the attempts still possible, so a cap keeps each attempt long enough for a server
/// that is slow to answer but alive.
pub(super) const MAX_ATTEMPTS: usize = 3;

/// The servers a pool balances over at one moment; replaced whole when a name's addresses
/// change, so a connection picks from one consistent set.
#[derive(Debug)]
pub struct ServerSet {
    pub list: Vec<Arc<Server>>,
    /// Weighted round-robin order: each server index appears `weight` times, interleaved.
    schedule: Vec<usize>,
}

impl ServerSet {
    pub(super) fn new(list: Vec<Arc<Server>>) -> ServerSet {
        let schedule = interleave(&list.iter().map(|s| s.weight).collect::<Vec<_>>());
        ServerSet { list, schedule }
    }
}

/// A pool's selection state. Shared by every connection of the pool, so its cursors are
/// atomics that connections advance without a lock.
#[derive(Debug)]
pub(super) struct Balancer {
    balance: Balance,
    /// Where round robin (and least-conn's tie-break) starts next.
    next: AtomicUsize,
    rng: AtomicU64,
}

/// What [`Balancer::pick`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pick {
    /// The index in the [`ServerSet`] to connect to.
    Server(usize),
    /// No server left to try: every one is down or tried (fail now, never queue).
    AllDown,
    /// Some server is up but every such one is at `max_conns` (queue for a slot).
    AllFull,
}

impl Balancer {
    pub(super) fn new(balance: Balance) -> Balancer {
        Balancer {
            balance,
            next: AtomicUsize::new(0),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// Chooses a server without allocating: it runs for every new connection.
    pub(super) fn pick(&self, set: &ServerSet, tried: &[usize]) -> Pick {
        let servers = &set.list;
        let up = |i: &usize| !tried.contains(i) && servers[*i].is_up();
        let room = |i: &usize| up(i) && servers[*i].has_room();
        let n = servers.len();
        if !(0..n).any(|i| up(&i)) {
            return Pick::AllDown;
        }
        let rooms = (0..n).filter(room).count();
        if rooms == 0 {
            return Pick::AllFull;
        }
        // Load per unit of weight, compared without division.
        let lighter = |a: usize, b: usize| {
            let (sa, sb) = (&servers[a], &servers[b]);
            u64::from(sa.active()) * u64::from(sb.weight)
                < u64::from(sb.active()) * u64::from(sa.weight)
        };
        let nth_room = |k: usize| (0..n).filter(room).nth(k % rooms).unwrap_or(0);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        Pick::Server(match self.balance {
            Balance::RoundRobin => {
                let len = set.schedule.len();
                (0..len)
                    .map(|k| set.schedule[(start + k) % len])
                    .find(room)
                    .unwrap_or_else(|| nth_room(0))
            }
            Balance::LeastConn => {
                // Rotate the starting point so ties spread instead of piling on the first.
                let mut best = nth_room(start);
                for k in 1..rooms {
                    let c = nth_room(start + k);
                    if lighter(c, best) {
                        best = c;
                    }
                }
                best
            }
            Balance::RandomTwo => {
                let r = self.random();
                let a = nth_room(r as usize);
                let b = nth_room((r >> 32) as usize);
                if lighter(b, a) { b } else { a }
            }
        })
    }

    fn random(&self) -> u64 {
        // splitmix64 over a shared counter: cheap, and good enough to spread choices.
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The servers tried for one connection (at most [`MAX_ATTEMPTS`]), without a heap: a
/// failover must not come back to a server that just failed it.
#[derive(Default)]
pub(super) struct Tried {
    ids: [usize; MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    pub(super) fn push(&mut self, i: usize) {
        if self.len < MAX_ATTEMPTS {
            self.ids[self.len] = i;
            self.len += 1;
        }
    }
    pub(super) fn len(&self) -> usize {
        self.len
    }
    pub(super) fn as_slice(&self) -> &[usize] {
        &self.ids[..self.len]
    }
}

/// Weighted round-robin order with the servers interleaved (not `aaab` but `abaa`-like):
/// position k of weight w goes to slot k/w on a common scale.
fn interleave(weights: &[u32]) -> Vec<usize> {
    let mut slots: Vec<(u64, usize)> = Vec::new();
    for (i, &w) in weights.iter().enumerate() {
        for k in 0..w {
            // Spread server i's w turns evenly over [0, 1), scaled to integers.
            slots.push(((u64::from(k) * 2 + 1) * 1_000_000 / (u64::from(w) * 2), i));
        }
    }
    slots.sort();
    slots.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::ServerConfig;

    const POLICIES: [Balance; 3] = [Balance::RoundRobin, Balance::LeastConn, Balance::RandomTwo];

    /// Servers of these weights, all up, none busy; no socket is opened.
    fn set(weights: &[u32], max_conns: u32) -> ServerSet {
        let list = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 17000 + i as u16));
                let cfg = ServerConfig {
                    addr: addr.into(),
                    weight,
                    max_conns,
                };
                Arc::new(Server::new(&cfg, i, addr, CancellationToken::new(), None))
            })
            .collect();
        ServerSet::new(list)
    }

    /// `n` first attempts (nothing tried yet), as connections make them.
    fn picks(b: &Balancer, set: &ServerSet, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| match b.pick(set, &[]) {
                Pick::Server(i) => i,
                other => panic!("expected a server, got {other:?}"),
            })
            .collect()
    }

    fn counts(picks: &[usize], servers: usize) -> Vec<usize> {
        (0..servers)
            .map(|s| picks.iter().filter(|&&p| p == s).count())
            .collect()
    }

    #[test]
    fn round_robin_gives_each_server_its_weight_in_every_cycle() {
        let set = set(&[3, 1, 2], 0);
        let b = Balancer::new(Balance::RoundRobin);
        let all = picks(&b, &set, 6 * 4);
        for cycle in all.chunks(6) {
            assert_eq!(counts(cycle, 3), [3, 1, 2], "one cycle: {cycle:?}");
        }
        // Interleaved, so a heavy server does not take its turns in one burst.
        let heavy = interleave(&[3, 1]);
        assert_eq!(counts(&heavy, 2), [3, 1]);
        assert_ne!(heavy, [0, 0, 0, 1], "interleaved, not clumped");
        assert_eq!(interleave(&[1, 1, 1]), [0, 1, 2]);
    }

    #[test]
    fn a_server_down_or_cooling_off_gets_no_new_connections() {
        for policy in POLICIES {
            let set = set(&[1, 1, 1], 0);
            // Down by its active checks (fall = 1), and cooling off after passive failures.
            assert_eq!(set.list[1].check_result(false, 1, 1), Some(false));
            set.list[2].cool_off(Duration::from_secs(600));
            let b = Balancer::new(policy);
            assert_eq!(counts(&picks(&b, &set, 30), 3), [30, 0, 0], "{policy:?}");
            // Back up by its checks (rise = 1): it takes its share again.
            assert_eq!(set.list[1].check_result(true, 1, 1), Some(true));
            let back = counts(&picks(&b, &set, 30), 3);
            assert!(back[1] > 0 && back[2] == 0, "{policy:?}: {back:?}");
        }
    }

    #[test]
    fn a_full_server_is_passed_over_and_all_full_is_not_all_down() {
        for policy in POLICIES {
            let set = set(&[1, 1], 1);
            let b = Balancer::new(policy);
            assert!(set.list[0].try_reserve());
            assert_eq!(counts(&picks(&b, &set, 10), 2), [0, 10], "{policy:?}");
            // Every server at max_conns: the client may queue for a slot.
            assert!(set.list[1].try_reserve());
            assert_eq!(b.pick(&set, &[]), Pick::AllFull, "{policy:?}");
            // Every server down: refused at once, even though they are also full.
            for s in &set.list {
                s.check_result(false, 1, 1);
            }
            assert_eq!(b.pick(&set, &[]), Pick::AllDown, "{policy:?}");
        }
    }

    #[test]
    fn failover_tries_each_server_once() {
        for policy in POLICIES {
            // Unequal weights, so round robin's schedule names a server more than once.
            let set = set(&[3, 1, 2], 0);
            let b = Balancer::new(policy);
            for connection in 0..12 {
                let mut tried = Tried::default();
                while let Pick::Server(i) = b.pick(&set, tried.as_slice()) {
                    assert!(
                        !tried.as_slice().contains(&i),
                        "{policy:?}, connection {connection}: server {i} again after {:?}",
                        tried.as_slice()
                    );
                    tried.push(i);
                    assert!(tried.len() <= MAX_ATTEMPTS, "{policy:?}: no end");
                }
                let mut order = tried.as_slice().to_vec();
                order.sort();
                assert_eq!(order, [0, 1, 2], "{policy:?}: every server, once");
                // With every server tried, the connection fails instead of queueing.
                assert_eq!(b.pick(&set, tried.as_slice()), Pick::AllDown);
            }
        }
        // A connection keeps no more than it may try, and never overflows.
        let mut tried = Tried::default();
        for i in 0..MAX_ATTEMPTS + 2 {
            tried.push(i);
        }
        assert_eq!(tried.as_slice(), (0..MAX_ATTEMPTS).collect::<Vec<_>>());
    }

    #[test]
    fn least_conn_goes_to_the_least_load_per_unit_of_weight() {
        let b = Balancer::new(Balance::LeastConn);
        let even = set(&[1, 1, 1], 0);
        // Ties spread over the servers instead of piling on the first.
        assert_eq!(counts(&picks(&b, &even, 30), 3), [10, 10, 10]);
        for _ in 0..2 {
            even.list[0].try_reserve();
        }
        even.list[1].try_reserve();
        assert_eq!(counts(&picks(&b, &even, 10), 3), [0, 0, 10]);
        // 2 connections on a weight of 3 is less load than 1 on a weight of 1.
        let weighted = set(&[3, 1], 0);
        for _ in 0..2 {
            weighted.list[0].try_reserve();
        }
        weighted.list[1].try_reserve();
        assert_eq!(counts(&picks(&b, &weighted, 10), 2), [10, 0]);
    }

    #[test]
    fn random_two_spreads_and_leans_to_the_lighter() {
        let b = Balancer::new(Balance::RandomTwo);
        let even = set(&[1, 1, 1], 0);
        let spread = counts(&picks(&b, &even, 300), 3);
        assert!(spread.iter().all(|&n| n >= 50), "spread: {spread:?}");
        // The busy server wins only when both draws fall on it (about one in four).
        let busy = set(&[1, 1], 0);
        for _ in 0..5 {
            busy.list[0].try_reserve();
        }
        let lean = counts(&picks(&b, &busy, 200), 2);
        assert!(lean[1] > 2 * lean[0], "lean: {lean:?}");
    }
}
