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
}

criterion_group!(benches, admission);
criterion_main!(benches);
