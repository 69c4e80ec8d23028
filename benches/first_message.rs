//! Criterion micro-benchmarks of `first_message::judge` on the happy path: one call on a
//! first segment that holds the whole first message, as most new connections make it.

use criterion::{Criterion, criterion_group, criterion_main};
use halfguard::first_message::{Expect, judge};
use std::hint::black_box;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("../tests/fixtures/first_message/", $name)).as_slice()
    };
}

fn first_message(c: &mut Criterion) {
    let cases: [(&str, Expect, &[u8]); 6] = [
        (
            "curl GET head, 79 B, auto",
            Expect::Auto,
            fixture!("curl_get.bin"),
        ),
        (
            "curl GET head, 79 B, http",
            Expect::Http,
            fixture!("curl_get.bin"),
        ),
        (
            "curl ClientHello, 517 B, auto",
            Expect::Auto,
            fixture!("curl_tls_hello.bin"),
        ),
        (
            "openssl ClientHello, 1.7 kB in 4 records, auto",
            Expect::Auto,
            fixture!("openssl_hello_frag512.bin"),
        ),
        (
            "psql startup, 53 B, auto",
            Expect::Auto,
            fixture!("psql_startup.bin"),
        ),
        (
            "redis-cli PING, 14 B, auto (unframed)",
            Expect::Auto,
            fixture!("redis_ping.bin"),
        ),
    ];
    for (name, expect, bytes) in cases {
        c.bench_function(name, |b| {
            b.iter(|| judge(black_box(expect), black_box(bytes)))
        });
    }
}

criterion_group!(benches, first_message);
criterion_main!(benches);
