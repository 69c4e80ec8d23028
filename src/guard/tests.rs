//! The guard's accounting without sockets: admission order, eviction choice, and counts that
//! return to zero under concurrent use from both cores.

use std::net::IpAddr;
use std::sync::Arc;

use super::*;
use crate::config::{Limits, OnFull, PressureConfig};
use crate::stats::{EvictState, Observed, Reject, Stats};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn open_limits() -> Limits {
    Limits {
        max_conns_per_source: 0,
        max_half_open_per_source: 0,
        max_half_closed_per_source: 0,
        conn_rate_per_source: 0,
        ..Limits::default()
    }
}

fn guard(limits: Limits) -> Guard {
    Guard::new(
        limits,
        &PressureConfig::default(),
        Arc::new(Stats::default()),
    )
}

fn assert_consistent(g: &Guard) {
    let s = g.snapshot();
    let (c, o, h, st) = g.table_totals();
    // Allow-listed connections are counted listener-wide only, and only connections past
    // their grace are listed, so the table may hold less.
    assert!(
        c <= s.conns && o <= s.half_open && h <= s.half_closed && st == s.stalled,
        "{s:?} vs {:?}",
        (c, o, h, st)
    );
}

#[test]
fn deny_wins_over_allow_and_allow_skips_per_source_caps() {
    let g = guard(Limits {
        max_conns_per_source: 1,
        deny: vec!["192.0.2.0/24".parse().unwrap()],
        allow: vec![
            "192.0.2.0/24".parse().unwrap(),
            "198.18.0.9/32".parse().unwrap(),
        ],
        ..open_limits()
    });
    assert_eq!(g.admit(ip("192.0.2.1")).unwrap_err(), Reject::Denied);
    let held: Vec<_> = (0..5).map(|_| g.admit(ip("198.18.0.9")).unwrap()).collect();
    assert_eq!(g.snapshot().conns, 5);
    assert_eq!(
        g.snapshot().sources,
        0,
        "allow-listed sources are not tracked per source"
    );
    drop(held);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn ipv4_mapped_clients_share_the_ipv4_cap() {
    let g = guard(Limits {
        max_conns_per_source: 2,
        ..open_limits()
    });
    let _a = g.admit(ip("198.18.0.1")).unwrap();
    let _b = g.admit(ip("::ffff:198.18.0.1")).unwrap();
    // Over the cap only provisionally (a slack of 2), then refused.
    let p: Vec<_> = (0..2)
        .map(|_| g.admit(ip("::ffff:198.18.0.1")).unwrap())
        .collect();
    assert!(p.iter().all(Ticket::is_provisional));
    assert_eq!(
        g.admit(ip("::ffff:198.18.0.1")).unwrap_err(),
        Reject::SourceConns
    );
    assert_eq!(g.snapshot().sources, 1);
}

#[test]
fn listener_half_open_cap_evicts_the_oldest_of_the_heaviest_source() {
    let g = guard(Limits {
        max_half_open: 4,
        ..open_limits()
    });
    let mut a: Vec<_> = (0..3).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    let mut b1 = g.admit(ip("198.18.0.2")).unwrap();
    // Only connections silent past the grace are evictable.
    for t in a.iter_mut().chain(std::iter::once(&mut b1)) {
        t.silent().unwrap();
    }
    let b2 = g.admit(ip("198.18.0.2")).unwrap();
    assert!(a[0].ctl().is_evicted(), "oldest of the heaviest");
    assert!(!a[1].ctl().is_evicted() && !a[2].ctl().is_evicted());
    assert!(!b1.ctl().is_evicted() && !b2.ctl().is_evicted());
    assert_eq!(g.snapshot().half_open, 4);
    assert_eq!(g.stats().evicted(EvictState::HalfOpen), 1);
    assert_consistent(&g);
    // The evicted ticket's drop gives nothing back twice.
    drop(a);
    assert_eq!(g.snapshot().half_open, 2);
    drop((b1, b2));
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn an_evicted_ticket_cannot_change_state() {
    let g = guard(Limits {
        max_half_open: 1,
        ..open_limits()
    });
    let mut first = g.admit(ip("198.18.0.1")).unwrap();
    first.silent().unwrap();
    let _second = g.admit(ip("198.18.0.2")).unwrap();
    assert_eq!(first.open(), Err(Refused::Evicted));
}

#[test]
fn reject_mode_refuses_instead_of_evicting() {
    let g = guard(Limits {
        max_half_open: 2,
        on_full: OnFull::Reject,
        ..open_limits()
    });
    let _a = g.admit(ip("198.18.0.1")).unwrap();
    let _b = g.admit(ip("198.18.0.1")).unwrap();
    assert_eq!(g.admit(ip("198.18.0.2")).unwrap_err(), Reject::HalfOpenFull);
    assert_eq!(
        g.snapshot().conns,
        2,
        "a refused newcomer leaves no count behind"
    );
    assert_eq!(g.snapshot().sources, 1, "nor a source entry");
}

#[test]
fn entering_half_closed_over_the_source_cap_evicts_the_sources_oldest() {
    let g = guard(Limits {
        max_half_closed_per_source: 2,
        ..open_limits()
    });
    let mut t: Vec<_> = (0..3).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    let mut other = g.admit(ip("198.18.0.2")).unwrap();
    for x in t.iter_mut().chain(std::iter::once(&mut other)) {
        x.open().unwrap();
    }
    other.half_close().unwrap();
    other.lingering().unwrap();
    for x in t.iter_mut() {
        x.half_close().unwrap();
    }
    // An ordinary close in flight counts against nothing: the source is not at its cap yet.
    assert!(t.iter().all(|x| !x.ctl().is_evicted()));
    for x in t.iter_mut() {
        x.lingering().unwrap();
    }
    assert!(t[0].ctl().is_evicted());
    assert!(!t[1].ctl().is_evicted() && !t[2].ctl().is_evicted());
    assert!(!other.ctl().is_evicted(), "other sources are not touched");
    assert_eq!(g.snapshot().half_closed, 3);
    drop(t);
    drop(other);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn a_full_source_table_refuses_new_sources_only() {
    let g = guard(Limits {
        max_sources: 2,
        ..open_limits()
    });
    let _a = g.admit(ip("198.18.0.1")).unwrap();
    let _b = g.admit(ip("198.18.0.2")).unwrap();
    assert_eq!(g.admit(ip("198.18.0.3")).unwrap_err(), Reject::SourcesFull);
    let _a2 = g
        .admit(ip("198.18.0.1"))
        .expect("a known source still gets in");
}

/// Near the bound (16) every check reads the limiter's size; far from it (300) one in 64
/// does, and the bound holds all the same as the keys climb to it.
#[test]
fn rate_limiter_keys_stay_bounded_by_max_sources() {
    for max in [16u32, 300] {
        let g = guard(Limits {
            max_sources: max,
            conn_rate_per_source: 1,
            conn_burst_per_source: 1,
            ..open_limits()
        });
        for i in 0..2 * max {
            drop(g.admit(IpAddr::from(std::net::Ipv4Addr::from(0xC612_0000u32 | i))));
        }
        let keys = g.snapshot().rate_keys;
        assert!(keys <= max as usize + 1, "max {max}: {:?}", g.snapshot());
    }
}

#[test]
fn pressure_turns_on_above_high_water_and_off_below_low_water() {
    let g = Guard::new(
        Limits {
            max_half_open: 10,
            ..open_limits()
        },
        &PressureConfig {
            high_water: 0.5,
            low_water: 0.2,
            ..PressureConfig::default()
        },
        Arc::new(Stats::default()),
    );
    let mut t: Vec<_> = (0..5).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    assert!(!g.pressure(), "5 is not above 5");
    t.push(g.admit(ip("198.18.0.1")).unwrap());
    assert!(g.pressure());
    t.truncate(3);
    assert!(g.pressure(), "3 is above low water (2): hysteresis");
    t.truncate(2);
    assert!(!g.pressure());
}

#[test]
fn memory_pressure_is_pressure_and_the_bell_rings_only_when_the_mode_flips() {
    let g = Guard::new(
        Limits {
            max_half_open: 10,
            ..open_limits()
        },
        &PressureConfig {
            high_water: 0.5,
            low_water: 0.2,
            ..PressureConfig::default()
        },
        Arc::new(Stats::default()),
    );
    let rung = || g.bell().rung();
    let r0 = rung();
    g.set_memory_pressure(true);
    assert!(g.pressure() && g.memory_pressure());
    assert_eq!(rung(), r0 + 1, "off to on: one ring");
    g.set_memory_pressure(true);
    assert_eq!(rung(), r0 + 1, "no change, no ring");
    // The counts pass their mark while memory already holds the mode on: no flip.
    let mut t: Vec<_> = (0..6).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    assert_eq!(rung(), r0 + 1);
    g.set_memory_pressure(false);
    assert!(
        g.pressure() && !g.memory_pressure(),
        "the counts still hold it"
    );
    assert_eq!(rung(), r0 + 1);
    t.truncate(2);
    assert!(!g.pressure());
    assert_eq!(rung(), r0 + 2, "on to off: one ring");
    g.set_memory_pressure(false);
    assert_eq!(rung(), r0 + 2);
}

/// xorshift64*.
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed >> 12;
    *seed ^= *seed << 25;
    *seed ^= *seed >> 27;
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[test]
fn counts_return_to_zero_under_concurrent_use_from_both_cores() {
    let g = guard(Limits {
        max_conns_per_source: 50,
        max_half_open_per_source: 20,
        max_half_closed_per_source: 4,
        max_conns: 300,
        max_half_open: 60,
        max_half_closed: 30,
        max_sources: 40,
        conn_rate_per_source: 0,
        ..Limits::default()
    });
    let threads: Vec<_> = (0..4u64)
        .map(|n| {
            let g = g.clone();
            std::thread::spawn(move || {
                let mut seed = 0x9E37_79B9_7F4A_7C15 ^ (n + 1);
                let mut held: Vec<Ticket> = Vec::new();
                for _ in 0..50_000 {
                    let r = rng(&mut seed);
                    match r % 6 {
                        0 | 1 => {
                            let src = IpAddr::from(std::net::Ipv4Addr::from(
                                0xC612_0000u32 | ((r >> 8) as u32 % 64),
                            ));
                            if let Ok(t) = g.admit(src) {
                                held.push(t);
                            }
                        }
                        2 if !held.is_empty() => {
                            let i = (r >> 16) as usize % held.len();
                            if held[i].state() == State::HalfOpen && held[i].open().is_err() {
                                held.swap_remove(i);
                            }
                        }
                        3 if !held.is_empty() => {
                            let i = (r >> 16) as usize % held.len();
                            let t = &mut held[i];
                            let r = match (t.state(), r >> 40 & 3) {
                                (State::HalfOpen, _) => t.silent(),
                                (State::Open, 0) => t.half_close(),
                                (State::Open, 1) => t.stall(),
                                (State::Open, _) => t.unstall(),
                                (State::HalfClosed, _) => t.lingering(),
                            };
                            if r.is_err() {
                                held.swap_remove(i);
                            }
                        }
                        4 | 5 if !held.is_empty() => {
                            let i = (r >> 16) as usize % held.len();
                            held.swap_remove(i);
                        }
                        _ => {}
                    }
                    held.retain(|t| !t.ctl().is_evicted());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(g.snapshot().conns, 0, "{:?}", g.snapshot());
    assert_eq!(g.snapshot(), GuardSnapshot::default());
    assert_eq!(g.table_totals(), (0, 0, 0, 0));
}

/// A source's OPEN connections, `stalled` of them stalled.
fn open_from(g: &Guard, src: &str, n: usize, stalled: usize) -> Vec<Ticket> {
    (0..n)
        .map(|i| {
            let mut t = g.admit(ip(src)).unwrap();
            t.open().unwrap();
            if i < stalled {
                t.stall().unwrap();
            }
            t
        })
        .collect()
}

#[test]
fn a_full_listener_evicts_the_heaviest_sources_longest_stalled_and_never_a_healthy_one() {
    let g = guard(Limits {
        max_conns: 10,
        ..open_limits()
    });
    let heavy = open_from(&g, "198.18.0.1", 4, 4);
    let light = open_from(&g, "198.18.0.2", 2, 2);
    let healthy = open_from(&g, "198.18.0.3", 4, 0);
    assert_eq!(g.snapshot().stalled, 6);
    assert_eq!(g.snapshot().stalled_sources, 2);
    // Full: each newcomer takes the place of the heaviest source's longest stalled.
    let n1 = g.admit(ip("198.18.0.9")).unwrap();
    assert!(heavy[0].ctl().is_evicted());
    let n2 = g.admit(ip("198.18.0.9")).unwrap();
    assert!(heavy[1].ctl().is_evicted());
    assert!(light.iter().all(|t| !t.ctl().is_evicted()));
    // Now both hold two stalled: either may go, but never a healthy connection.
    let _n3 = g.admit(ip("198.18.0.9")).unwrap();
    let _n4 = g.admit(ip("198.18.0.9")).unwrap();
    let _n5 = g.admit(ip("198.18.0.9")).unwrap();
    let _n6 = g.admit(ip("198.18.0.9")).unwrap();
    assert!(healthy.iter().all(|t| !t.ctl().is_evicted()));
    assert_eq!(g.snapshot().stalled, 0);
    assert_eq!(g.stats().evicted(EvictState::Stalled), 6);
    // Nothing stalled is left: the next newcomer is refused, the healthy keep going.
    assert_eq!(g.admit(ip("198.18.0.9")).unwrap_err(), Reject::ConnsFull);
    assert!(healthy.iter().all(|t| !t.ctl().is_evicted()));
    drop((heavy, light, healthy, n1, n2));
    assert_consistent(&g);
}

#[test]
fn a_connection_moving_again_leaves_the_stalled_list() {
    let g = guard(Limits {
        max_conns: 2,
        ..open_limits()
    });
    let mut a = open_from(&g, "198.18.0.1", 2, 2);
    a[0].unstall().unwrap();
    a[1].unstall().unwrap();
    assert_eq!(g.snapshot().stalled, 0);
    assert_eq!(g.admit(ip("198.18.0.2")).unwrap_err(), Reject::ConnsFull);
    drop(a);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn a_fresh_silent_connection_does_not_count_against_its_sources_cap() {
    let g = guard(Limits {
        max_half_open_per_source: 2,
        ..open_limits()
    });
    // Ten accepted at once, none silent past the grace yet: all admitted.
    let mut t: Vec<_> = (0..10)
        .map(|_| g.admit(ip("198.18.0.1")).unwrap())
        .collect();
    // Past the grace, two are counted; the third silent one is refused.
    t[0].silent().unwrap();
    t[1].silent().unwrap();
    assert_eq!(t[2].silent(), Err(Refused::Full(Reject::SourceHalfOpen)));
    assert_eq!(g.stats().rejected(Reject::SourceHalfOpen), 1);
    // The source is at its cap: a newcomer is refused at once.
    assert_eq!(
        g.admit(ip("198.18.0.1")).unwrap_err(),
        Reject::SourceHalfOpen
    );
    // The others spoke in time: they never counted.
    for x in &mut t[3..] {
        x.open().unwrap();
    }
    drop(t);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn a_source_at_its_cap_gets_a_provisional_slot_that_a_closing_connection_confirms() {
    let g = guard(Limits {
        max_conns_per_source: 4,
        ..open_limits()
    });
    let mut held: Vec<_> = (0..4).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    // Over the cap by at most the slack (the cap again), provisionally.
    let mut p1 = g.admit(ip("198.18.0.1")).unwrap();
    let mut p2 = g.admit(ip("198.18.0.1")).unwrap();
    let more: Vec<_> = (0..2).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    assert!(p1.is_provisional() && p2.is_provisional());
    assert!(more.iter().all(Ticket::is_provisional));
    assert_eq!(g.admit(ip("198.18.0.1")).unwrap_err(), Reject::SourceConns);
    assert_eq!(p1.confirm(), Ok(false), "no slot yet");
    // One ends: one provisional connection gets its slot, the other still waits.
    held.pop();
    assert_eq!(p1.confirm(), Ok(true));
    assert_eq!(p2.confirm(), Ok(false));
    assert!(p2.refuse_provisional(), "enforced: the connection ends");
    drop(p2);
    drop(more);
    assert_eq!(g.stats().rejected(Reject::SourceConns), 2);
    drop((held, p1));
    assert_eq!(g.snapshot(), GuardSnapshot::default());
    assert_eq!(g.table_totals(), (0, 0, 0, 0));
}

#[test]
fn a_source_whose_connections_are_stuck_gets_no_provisional_slot() {
    let g = guard(Limits {
        max_conns_per_source: 4,
        ..open_limits()
    });
    let mut held: Vec<_> = (0..4).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    for t in &mut held {
        t.open().unwrap();
        // Idle (a keep-alive pool between requests): stalled, nothing waiting.
        t.stall().unwrap();
    }
    // Idle connections may end any moment: a newcomer waits for a slot.
    let p = g.admit(ip("198.18.0.1")).unwrap();
    assert!(p.is_provisional());
    drop(p);
    // One slow reader of four: still a wait.
    held[0].ctl().set_stall(Stall::Blocked);
    assert!(g.admit(ip("198.18.0.1")).unwrap().is_provisional());
    // Half of them slow readers: no wait, refused at the cap.
    held[1].ctl().set_stall(Stall::Blocked);
    assert_eq!(g.admit(ip("198.18.0.1")).unwrap_err(), Reject::SourceConns);
    // Taking bytes again: the wait is back.
    held[1].ctl().set_stall(Stall::Idle);
    assert!(g.admit(ip("198.18.0.1")).unwrap().is_provisional());
    drop(held);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn observe_mode_counts_per_source_refusals_and_admits() {
    let g = guard(Limits {
        max_conns_per_source: 2,
        max_half_open_per_source: 1,
        deny: vec!["198.18.0.66/32".parse().unwrap()],
        mode: crate::config::Mode::Observe,
        ..open_limits()
    });
    let mut t: Vec<_> = (0..6).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    t.push(g.admit(ip("198.18.0.66")).unwrap());
    // Six from one source against a cap of 2: observing, none of the four over it waits
    // for a slot; each is counted and goes on.
    assert!(t.iter().all(|x| !x.is_provisional()));
    t[0].silent().unwrap();
    t[1].silent().unwrap();
    assert_eq!(g.snapshot().conns, 7);
    let o = |r| g.stats().observed(Observed::Reject(r));
    assert_eq!(o(Reject::SourceConns), 4);
    assert_eq!(o(Reject::SourceHalfOpen), 1);
    assert_eq!(o(Reject::Denied), 1);
    assert_eq!(g.stats().rejected(Reject::SourceConns), 0);
    let top = g.top_sources(1, SourceOrder::Observed);
    assert_eq!(top[0].observed, 5);
    // Listener-wide caps still act.
    drop(t);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn a_keyed_ticket_cannot_be_rekeyed() {
    let g = guard(open_limits());
    let mut t = g.admit(ip("198.18.0.1")).unwrap();
    assert_eq!(t.assign_source(ip("198.18.0.2")), Err(Reject::ProxyHeader));
    assert_eq!(t.source().unwrap().to_string(), "198.18.0.1");
    drop(t);
    let mut t = g.admit_trusted().unwrap();
    t.assign_source(ip("198.18.0.3")).unwrap();
    assert_eq!(t.assign_source(ip("198.18.0.4")), Err(Reject::ProxyHeader));
    drop(t);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn a_source_cannot_take_the_place_of_one_no_heavier_than_itself() {
    let g = guard(Limits {
        max_conns: 6,
        ..open_limits()
    });
    // Three sources hold two stalled connections each: the listener is full.
    let held: Vec<_> = ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
        .into_iter()
        .flat_map(|s| open_from(&g, s, 2, 2))
        .collect();
    // One of them asks for more: nobody is heavier than it, so it is refused...
    assert_eq!(g.admit(ip("198.18.0.1")).unwrap_err(), Reject::ConnsFull);
    assert!(held.iter().all(|t| !t.ctl().is_evicted()));
    // ...while a source that holds nothing useless takes the place of a stalled one.
    let _client = g.admit(ip("198.18.0.9")).unwrap();
    assert_eq!(g.stats().evicted(EvictState::Stalled), 1);
}

#[test]
fn a_network_of_sources_has_its_own_cap() {
    let g = guard(Limits {
        max_conns_per_source: 4,
        max_conns_per_network: 6,
        ..open_limits()
    });
    // Three addresses of one /24: four each would be twelve; the network holds six.
    let mut held = Vec::new();
    for host in 1..=3 {
        for _ in 0..2 {
            held.push(g.admit(ip(&format!("198.18.0.{host}"))).unwrap());
        }
    }
    assert_eq!(g.admit(ip("198.18.0.4")).unwrap_err(), Reject::NetworkConns);
    // Another /24 is another network; a connection that ends frees its network's place.
    let _other = g.admit(ip("198.18.1.1")).unwrap();
    held.pop();
    let _again = g.admit(ip("198.18.0.4")).unwrap();
    // IPv6: a home /56 is 256 sources of /64, one network of /48.
    let v6: Vec<_> = (0..6)
        .map(|i| g.admit(ip(&format!("2001:db8:0:{i}::1"))).unwrap())
        .collect();
    assert_eq!(
        g.admit(ip("2001:db8:0:ff::1")).unwrap_err(),
        Reject::NetworkConns
    );
    // The count kept beside the network table (its bound) follows it.
    let counted = |g: &Guard| g.shared.networks_len.load(Ordering::Relaxed);
    assert_eq!(counted(&g), g.shared.networks.len());
    assert!(counted(&g) >= 2);
    drop((held, v6, _other, _again));
    assert_eq!(g.snapshot(), GuardSnapshot::default());
    assert!(g.shared.networks.is_empty());
    assert_eq!(counted(&g), 0);
}

#[test]
fn waiters_are_bounded_per_listener_and_never_take_a_place_a_client_needs() {
    // The review's reproduction: cap 4 per source, 16 half-open places, four sources each
    // holding 4 and churning waiters.
    let g = guard(Limits {
        max_conns_per_source: 4,
        max_half_open: 16,
        ..open_limits()
    });
    let attackers: Vec<IpAddr> = (1..=4).map(|i| ip(&format!("198.18.0.{i}"))).collect();
    let mut held = Vec::new();
    for a in &attackers {
        for _ in 0..4 {
            let mut t = g.admit(*a).unwrap();
            t.open().unwrap(); // an idle keep-alive connection: OPEN, not half-open
            held.push(t);
        }
    }
    // At most an eighth of the half-open places wait; the rest are refused at once.
    let mut waiting = Vec::new();
    for a in &attackers {
        for _ in 0..4 {
            if let Ok(t) = g.admit(*a) {
                assert!(t.is_provisional());
                waiting.push(t);
            }
        }
    }
    assert_eq!(waiting.len(), max_waiting(16));
    assert_eq!(g.stats().rejected(Reject::SourceConns), 16 - 2);
    // Fill the rest of the half-open places with silent clients of other sources...
    let mut clients: Vec<_> = (0..14)
        .map(|i| g.admit(ip(&format!("198.18.1.{i}"))).unwrap())
        .collect();
    assert_eq!(g.snapshot().half_open, 16);
    // ... then a newcomer from yet another source evicts a waiter, not a client.
    clients.push(g.admit(ip("198.18.2.1")).unwrap());
    clients.push(g.admit(ip("198.18.2.2")).unwrap());
    assert_eq!(g.stats().evicted(EvictState::HalfOpen), 2);
    assert!(waiting.iter().all(|t| t.ctl().is_evicted()));
    assert!(clients.iter().all(|t| !t.ctl().is_evicted()));
    // With no waiter left, a full listener refuses (nothing else is evictable yet).
    assert_eq!(g.admit(ip("198.18.2.3")).unwrap_err(), Reject::HalfOpenFull);
    // An evicted waiter learns it at its next look, and its counts were given back.
    assert!(waiting.iter_mut().all(|t| t.confirm().is_err()));
    drop((waiting, clients, held));
    assert_eq!(g.snapshot(), GuardSnapshot::default());
    assert_eq!(g.table_totals(), (0, 0, 0, 0));
}

#[test]
fn a_waiter_evicts_nobody_and_is_not_evicted_by_its_own_source() {
    let g = guard(Limits {
        max_conns_per_source: 2,
        max_half_open: 8,
        ..open_limits()
    });
    let held: Vec<_> = (0..2).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    let w = g.admit(ip("198.18.0.1")).unwrap();
    assert!(w.is_provisional());
    let others: Vec<_> = (0..5)
        .map(|i| g.admit(ip(&format!("198.18.1.{i}"))).unwrap())
        .collect();
    assert_eq!(g.snapshot().half_open, 8);
    // Full: the waiter's own source gets no eviction for its next waiter.
    assert!(g.admit(ip("198.18.0.1")).is_err());
    assert!(!w.ctl().is_evicted());
    assert_eq!(g.stats().evicted(EvictState::HalfOpen), 0);
    drop((held, w, others));
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn observing_nothing_waits() {
    let g = guard(Limits {
        max_conns_per_source: 2,
        mode: crate::config::Mode::Observe,
        ..open_limits()
    });
    let t: Vec<_> = (0..5).map(|_| g.admit(ip("198.18.0.1")).unwrap()).collect();
    assert!(t.iter().all(|t| !t.is_provisional()));
    assert_eq!(g.stats().observed(Observed::Reject(Reject::SourceConns)), 3);
    drop(t);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn a_balancers_newcomer_over_a_full_listener_is_bounded_and_settles_or_is_refused() {
    let g = guard(Limits {
        max_conns: 16,
        max_half_open: 16,
        ..open_limits()
    });
    let mut held: Vec<Ticket> = (0..16)
        .map(|_| g.admit(ip("198.18.0.1")).unwrap())
        .collect();
    for t in &mut held {
        t.silent().unwrap();
    }
    // Full: trusted newcomers wait over the cap, at most an eighth of max_half_open.
    let mut over: Vec<Ticket> = (0..2).map(|_| g.admit_trusted().unwrap()).collect();
    assert_eq!(g.admit_trusted().err(), Some(Reject::ConnsFull));
    assert_eq!(g.snapshot().conns, 18);
    assert_eq!(g.stats().evicted(EvictState::HalfOpen), 0);
    // Named as the heavy source itself: it may not take its own source's place.
    let mut mine = over.pop().unwrap();
    assert_eq!(mine.assign_source(ip("198.18.0.1")), Err(Reject::ConnsFull));
    drop(mine);
    // Named as a source holding nothing: the heavy source's oldest silent one makes room.
    let mut other = over.pop().unwrap();
    other.assign_source(ip("198.18.0.2")).unwrap();
    assert_eq!(g.stats().evicted(EvictState::HalfOpen), 1);
    assert_eq!(g.snapshot().conns, 16);
    // The place over the cap is free again.
    let mut local = g.admit_trusted().unwrap();
    drop(held.pop());
    local.keep_unnamed().unwrap();
    drop((held, other, local));
    assert_consistent(&g);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn a_source_cut_before_gets_newcomers_evictable_before_their_grace() {
    let g = guard(Limits {
        max_conns: 4,
        ..open_limits()
    });
    let src = |i: u8| ip(&format!("198.18.3.{i}"));
    // Four sources, one young connection each: a full listener with nothing evictable yet.
    let mut held: Vec<_> = (1..=4).map(|i| g.admit(src(i)).unwrap()).collect();
    assert_eq!(g.admit(ip("198.18.4.1")).unwrap_err(), Reject::ConnsFull);
    // A clock cuts source 1's connection; it reconnects at once.
    held[0].cut_by_clock();
    held.remove(0);
    held.push(g.admit(src(1)).unwrap());
    // That newcomer is evictable before its grace: a client finds room.
    let client = g.admit(ip("198.18.4.1")).unwrap();
    assert_eq!(g.stats().evicted(EvictState::HalfOpen), 1);
    assert!(held[3].ctl().is_evicted());
    // Evicted, source 1 is on record again; the others are not, and keep their place.
    assert!(held[..3].iter().all(|t| !t.ctl().is_evicted()));
    drop((held, client));
    assert_eq!(g.snapshot(), GuardSnapshot::default());
    assert_eq!(g.table_totals(), (0, 0, 0, 0));
}

#[test]
fn bytes_queued_are_capped_per_source_and_the_heaviest_source_sheds_first() {
    let g = guard(Limits {
        max_queued_per_source: 40_000,
        max_queued: 64_000,
        ..open_limits()
    });
    let a: Vec<_> = (0..2).map(|_| g.admit(ip("198.18.5.1")).unwrap()).collect();
    let b: Vec<_> = (0..2).map(|_| g.admit(ip("198.18.5.2")).unwrap()).collect();
    let c = g.admit(ip("198.18.5.3")).unwrap();
    assert_eq!(a[0].set_queued(30_000), Ok(()));
    // Over the source's cap: the connection reporting it is cut, counted.
    assert_eq!(a[1].set_queued(20_000), Err(Reject::SourceQueued));
    assert_eq!(g.stats().rejected(Reject::SourceQueued), 1);
    a[1].set_queued(0).unwrap();
    assert_eq!(b[0].set_queued(30_000), Ok(()));
    assert_eq!(c.set_queued(500), Ok(()));
    assert_eq!(g.snapshot().queued, 60_500);
    // Over the listener's: a source holding a sixty-fourth of the cap or more has its
    // reporting connections cut; a light one (a client briefly behind) is spared.
    assert_eq!(b[1].set_queued(5_000), Err(Reject::QueuedFull));
    assert_eq!(c.set_queued(600), Ok(()), "a light source is spared");
    // Past half the listener's cap, a source cut for its bytes gets no newcomer (the one
    // cut by its own cap neither); a source never cut does.
    assert_eq!(g.admit(ip("198.18.5.2")).err(), Some(Reject::QueuedFull));
    assert_eq!(g.admit(ip("198.18.5.1")).err(), Some(Reject::QueuedFull));
    let d = g
        .admit(ip("198.18.5.4"))
        .expect("a source never cut is admitted");
    // Once a second the heaviest is chosen too.
    g.housekeep();
    assert_eq!(b[0].set_queued(30_000), Err(Reject::QueuedFull));
    // Ending gives the bytes back.
    drop((a, b, c, d));
    assert_eq!(g.snapshot().queued, 0);
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn under_memory_pressure_the_byte_heavy_go_first() {
    let g = guard(Limits {
        max_queued_per_source: 0,
        max_queued: 640_000,
        ..open_limits()
    });
    let heavy: Vec<_> = (0..2)
        .map(|_| g.admit(ip("198.18.5.20")).unwrap())
        .collect();
    let light = g.admit(ip("198.18.5.21")).unwrap();
    // 300,000 of 640,000: under the cap, nobody is cut.
    assert_eq!(heavy[0].set_queued(150_000), Ok(()));
    assert_eq!(heavy[1].set_queued(150_000), Ok(()));
    assert_eq!(light.set_queued(200), Ok(()));
    // `/sources?by=queued_bytes` lists the heavy first.
    let by_bytes: Vec<_> = g
        .top_sources(3, SourceOrder::Queued)
        .iter()
        .map(|l| (l.source.to_string(), l.queued))
        .collect();
    assert_eq!(
        by_bytes,
        [
            ("198.18.5.20".to_string(), 300_000),
            ("198.18.5.21".to_string(), 200)
        ]
    );
    // Memory is short: the cap counts as a quarter of itself (160,000), and the heavy source
    // is cut as its connections report; a light one (a client briefly behind) is spared.
    g.set_memory_pressure(true);
    assert_eq!(heavy[0].set_queued(150_000), Err(Reject::QueuedFull));
    assert_eq!(light.set_queued(300), Ok(()), "a light source is spared");
    // Memory is no longer short: the same weight is within the cap again.
    g.set_memory_pressure(false);
    assert_eq!(heavy[1].set_queued(150_000), Ok(()));
    drop((heavy, light));
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn a_newcomer_is_charged_what_its_sources_blocked_connections_pin_until_weighed() {
    let g = guard(Limits {
        max_queued_per_source: 25_000,
        max_queued: 0,
        ..open_limits()
    });
    let first = g.admit(ip("198.18.5.9")).unwrap();
    assert_eq!(first.set_queued(10_000), Ok(()));
    // The second is charged the source's average at admission...
    let second = g.admit(ip("198.18.5.9")).unwrap();
    assert_eq!(second.ctl().queued_bytes(), 10_000);
    assert_eq!(g.snapshot().queued, 20_000);
    // ...and a third would take the source past its cap: refused before it connects.
    assert_eq!(g.admit(ip("198.18.5.9")).err(), Some(Reject::SourceQueued));
    // Its own look replaces the charge: a client that reads pins nothing.
    assert_eq!(second.set_queued(0), Ok(()));
    assert_eq!(g.snapshot().queued, 10_000);
    let third = g.admit(ip("198.18.5.9")).expect("room again");
    // Another source is neither charged nor refused.
    let other = g.admit(ip("198.18.5.10")).unwrap();
    assert_eq!(other.ctl().queued_bytes(), 0);
    drop((first, second, third, other));
    assert_eq!(g.snapshot(), GuardSnapshot::default());
}

#[test]
fn a_source_whose_extra_connections_only_wait_is_never_called_busy() {
    // Four idle keep-alive connections held, four more waiting for a slot and refused.
    let load = SourceLoad {
        source: SourceKey::new(ip("198.18.6.1"), 32, 64),
        conns: 8,
        half_open: 0,
        half_closed: 0,
        stalled: 4,
        idle: 4,
        waiting: 4,
        queued: 0,
        holding: 0,
        refused: 12,
        observed: 0,
    };
    assert_eq!(load.verdict(), "flooding");
    // The same source with connections that move data is busy (a pool at its cap).
    let busy = SourceLoad {
        stalled: 0,
        idle: 0,
        waiting: 0,
        ..load
    };
    assert_eq!(busy.verdict(), "busy");
    // And with nothing refused, an idle pool is a pool.
    let pool = SourceLoad {
        waiting: 0,
        conns: 4,
        refused: 0,
        ..load
    };
    assert_eq!(pool.verdict(), "pool");
}
