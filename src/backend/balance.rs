//! Choosing a server for a new connection: weighted round robin, least connections, or the
//! lighter of two at random, over the servers that are up and have room, never one this
//! connection has tried already.
//!
//! Apart from the pool because it is pure logic over the servers' state (no sockets, no
//! clock), so unit tests can set servers down, full or busy and watch the choice; and
//! because it runs for every new connection, so it must not allocate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::Server;
use crate::config::Balance;

/// At most this many servers are tried for one connection: a pool of many dead servers
/// must not eat the whole connect budget one SYN at a time.
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
