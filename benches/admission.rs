//! Criterion micro-benchmark of the admission path: `Guard::admit` and dropping the ticket,
//! from one source and from many.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use halfguard::config::{Limits, PressureConfig};
use halfguard::guard::Guard;
use halfguard::stats::Stats;

fn admission(c: &mut Criterion) {
    let limits = Limits {
        conn_rate_per_source: 0,
        ..Limits::default()
    };
    let guard = Guard::new(
        limits,
        &PressureConfig::default(),
        Arc::new(Stats::default()),
    );
    let one = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    c.bench_function("admit+open+drop, one source", |b| {
        b.iter(|| {
            let mut t = guard.admit(one).expect("admitted");
            t.open().expect("opened");
        })
    });
    let mut i = 0u32;
    c.bench_function("admit+drop, 65k sources", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let ip = IpAddr::V4(Ipv4Addr::from(0xC612_0000 | (i & 0xffff)));
            drop(guard.admit(ip).expect("admitted"));
        })
    });
    let rated = Guard::new(
        Limits::default(),
        &PressureConfig::default(),
        Arc::new(Stats::default()),
    );
    c.bench_function("admit+drop with the rate limiter, 65k sources", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let ip = IpAddr::V4(Ipv4Addr::from(0xC612_0000 | (i & 0xffff)));
            drop(rated.admit(ip));
        })
    });
}

criterion_group!(benches, admission);
criterion_main!(benches);
