//! Criterion micro-benchmarks of the admission path: `Guard::admit` and dropping the
//! ticket, from one source and from many, with and without the rate limiter, and the source
//! table under contention from both cores.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use halfguard::config::{Limits, PressureConfig};
use halfguard::guard::Guard;
use halfguard::stats::Stats;

fn guard(limits: Limits) -> Guard {
    Guard::new(
        limits,
        &PressureConfig::default(),
        Arc::new(Stats::default()),
    )
}

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xC612_0000 | (i & 0xffff)))
}

fn admission(c: &mut Criterion) {
    let no_rate = Limits {
        conn_rate_per_source: 0,
        ..Limits::default()
    };
    let g = guard(no_rate.clone());
    let one = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    c.bench_function("admit+open+drop, one source", |b| {
        b.iter(|| {
            let mut t = g.admit(one).expect("admitted");
            t.open().expect("opened");
        })
    });
    let mut i = 0u32;
    c.bench_function("admit+drop, 65k sources", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            drop(g.admit(ip(i)).expect("admitted"));
        })
    });
    let rated = guard(Limits::default());
    c.bench_function("admit+drop with the rate limiter, 65k sources", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            drop(rated.admit(ip(i)));
        })
    });

    // Both cores: a second thread admits and drops from the same 64 sources while the
    // measured thread does too, so the source table's shards and the listener counters
    // are contended.
    let shared = guard(no_rate);
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (g, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut j = 0u32;
            while !stop.load(Ordering::Relaxed) {
                j = j.wrapping_add(1);
                if let Ok(mut t) = g.admit(ip(j % 64)) {
                    let _ = t.open();
                }
            }
        })
    };
    c.bench_function(
        "admit+open+drop, 64 sources, contended by a second core",
        |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                if let Ok(mut t) = shared.admit(ip(i % 64)) {
                    let _ = t.open();
                }
            })
        },
    );
    stop.store(true, Ordering::Relaxed);
    let _ = other.join();

    full_listener(c);
}

/// A listener full of connections that go nowhere, one from each of 100,000 sources: every
/// admission must find the heaviest source and evict from it. With a scan of the source
/// table this cost grew with the number of sources; the per-state index keeps it flat.
fn full_listener(c: &mut Criterion) {
    const SOURCES: u32 = 100_000;
    let many = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i & 0x00ff_ffff)));
    let limits = Limits {
        conn_rate_per_source: 0,
        max_conns: SOURCES,
        max_half_open: SOURCES,
        max_sources: 4 * SOURCES,
        ..Limits::default()
    };
    for (name, stalled) in [("silent", false), ("stalled", true)] {
        let g = guard(limits.clone());
        let hold = |g: &Guard, i: u32| {
            let mut t = g.admit(many(i)).expect("admitted");
            if stalled {
                t.open().expect("opened");
                t.stall().expect("stalled");
            } else {
                t.silent().expect("listed");
            }
            t
        };
        let mut held: Vec<_> = (0..SOURCES).map(|i| hold(&g, i)).collect();
        assert_eq!(g.snapshot().conns, SOURCES as usize);
        let mut next = SOURCES;
        c.bench_function(
            &format!("admit on a full listener, 100k sources each with one {name} connection"),
            |b| {
                b.iter(|| {
                    next = next.wrapping_add(1);
                    let t = hold(&g, next);
                    // The newcomer keeps its place; an evicted ticket it replaces is a no-op.
                    held[(next % SOURCES) as usize] = t;
                })
            },
        );
        drop(held);
    }
}

criterion_group!(benches, admission);
criterion_main!(benches);
