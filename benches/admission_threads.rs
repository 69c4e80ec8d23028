//! Admission from 1, 2, 4 and 8 OS threads at once on one `Guard` (one source table, one
//! listener): what stops admission scaling past a core or two.
//!
//! Each thread admits a ticket and drops it (`Guard::admit`, as `benches/admission.rs`
//! does), in three shapes:
//!
//! - `own`: every thread its own 1024 sources, in /24 networks of its own: what a real
//!   flood or a crowd of clients looks like, spread over the table's shards. What the
//!   threads still share is listener-wide: the counts, `Stats`, the `Arc` every ticket holds.
//! - `one`: every thread the same source, the worst case: one table entry, one network
//!   entry, one shard lock, besides the listener-wide writes.
//! - `rate`: as `own`, with the per-source rate limiter on (as it is by default) at a rate
//!   no thread reaches, so every admission also asks governor and still succeeds.
//! - `apart`: a `Guard` per thread (nothing shared): not a configuration halfguard runs, but
//!   the ceiling the machine itself gives, so that what `own` and `one` lose beside it is
//!   contention and not a lack of cores.
//!
//! Except in `rate`, the rate limiter is off (`conn_rate_per_source = 0`), as in
//! `benches/admission.rs`.
//!
//! ```text
//! cargo bench --bench admission_threads                  # the table, 2 s per cell, median of 3
//! admission_threads --secs 1 --reps 5 --threads 1,2,4,8 --shape own,one,rate,apart
//! admission_threads --threads 2 --min-cores 1.8 --reps 5  # only runs that had both cores
//! admission_threads --iters 200000 --threads 2 --shape one   # a fixed count, for callgrind
//! ```
//!
//! Without `--bench` or an option (as `cargo test --all-targets` runs it) it runs each shape for 20 ms on
//! 1 and 2 threads, checks that every admission succeeded and every count came back to
//! zero, prints one line and exits.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use halfguard::config::{Limits, PressureConfig};
use halfguard::guard::Guard;
use halfguard::stats::Stats;

/// Bounds whatever the arguments.
const MAX_THREADS: usize = 64;
const MAX_SECS: f64 = 30.0;
const MAX_REPS: usize = 15;
const MAX_ITERS: u64 = 100_000_000;
/// Sources per thread in the `own` shape.
const OWN_SOURCES: u32 = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Own,
    One,
    Rate,
    Apart,
}

impl Shape {
    fn parse(s: &str) -> Option<Shape> {
        match s {
            "own" => Some(Shape::Own),
            "one" => Some(Shape::One),
            "rate" => Some(Shape::Rate),
            "apart" => Some(Shape::Apart),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Shape::Own => "own: one guard, each thread its own 1024 sources",
            Shape::One => "one: one guard, every thread the same source",
            Shape::Rate => "rate: as own, with the rate limiter on (never reached)",
            Shape::Apart => "apart: a guard per thread (nothing shared; the machine's ceiling)",
        }
    }
}

/// How long each thread runs: a time (the table) or a count (for callgrind, where time
/// means nothing).
#[derive(Clone, Copy)]
enum Run {
    For(Duration),
    Iters(u64),
}

fn guard(shape: Shape) -> Guard {
    let rate = match shape {
        // Far above what a thread admits from one source, so none is ever refused.
        Shape::Rate => 1_000_000_000,
        _ => 0,
    };
    let limits = Limits {
        conn_rate_per_source: rate,
        conn_burst_per_source: rate,
        ..Limits::default()
    };
    Guard::new(
        limits,
        &PressureConfig::default(),
        Arc::new(Stats::default()),
    )
}

/// Thread `t`'s `i`-th source: 10.t.x.y, so each thread's sources sit in /24 networks of
/// their own (the per-network count is a table of its own).
fn own_source(t: usize, i: u32) -> IpAddr {
    let i = i % OWN_SOURCES;
    IpAddr::V4(Ipv4Addr::new(10, t as u8, (i >> 8) as u8, i as u8))
}

const ONE_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));

/// One cell: `threads` threads admitting and dropping at once. Returns the admissions each
/// thread made, the CPU time they used in all, and the wall time from the common start to
/// the last thread's end.
fn cell(shape: Shape, threads: usize, run: Run) -> (Vec<u64>, Duration, Duration) {
    let shared = guard(shape);
    let guards: Vec<Guard> = (0..threads)
        .map(|_| match shape {
            Shape::Apart => guard(shape),
            _ => shared.clone(),
        })
        .collect();
    let start = Arc::new(Barrier::new(threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = guards
        .into_iter()
        .enumerate()
        .map(|(t, g)| {
            let (start, stop) = (start.clone(), stop.clone());
            std::thread::spawn(move || {
                start.wait();
                let cpu0 = thread_cpu();
                let mut n = 0u64;
                let mut failed = 0u64;
                let limit = match run {
                    Run::Iters(k) => k,
                    Run::For(_) => MAX_ITERS,
                };
                while n < limit {
                    // The stop flag is read every 64 admissions: a relaxed load of a line
                    // nobody writes until the end costs nothing beside an admission.
                    if n.is_multiple_of(64)
                        && matches!(run, Run::For(_))
                        && stop.load(Ordering::Relaxed)
                    {
                        break;
                    }
                    let ip = match shape {
                        Shape::One => ONE_SOURCE,
                        _ => own_source(t, n as u32),
                    };
                    match g.admit(ip) {
                        Ok(ticket) => drop(ticket),
                        Err(_) => failed += 1,
                    }
                    n += 1;
                }
                let cpu = thread_cpu().saturating_sub(cpu0);
                assert_eq!(
                    failed, 0,
                    "an admission was refused: the figures would mix paths"
                );
                (n, cpu, g)
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    if let Run::For(d) = run {
        std::thread::sleep(d);
        stop.store(true, Ordering::Relaxed);
    }
    let mut counts = Vec::with_capacity(threads);
    let mut guards = Vec::with_capacity(threads);
    let mut cpu = Duration::ZERO;
    for h in handles {
        let (n, c, g) = h.join().expect("bench thread panicked");
        counts.push(n);
        cpu += c;
        guards.push(g);
    }
    let wall = t0.elapsed();
    // Every ticket gave its counts back, once every thread is done: the path measured is
    // the whole round trip.
    for g in guards {
        let s = g.snapshot();
        assert_eq!((s.conns, s.half_open, s.sources), (0, 0, 0));
    }
    (counts, cpu, wall)
}

struct Figures {
    total_per_s: f64,
    per_thread_per_s: f64,
    /// Wall time each thread spends per admission.
    ns_per_admission: f64,
    /// CPU time per admission, whoever ran it: unlike the wall time, what other processes
    /// take of the cores does not change it; waiting on a lock held by a preempted thread,
    /// spinning, and cache lines fetched from the other core do.
    cpu_ns_per_admission: f64,
    /// CPU seconds per wall second: how many threads really ran at once. On a shared
    /// machine two threads may get one core between them, and then nothing contends.
    cores: f64,
    /// Slowest thread's share of the fastest's count: how fair the contention was.
    spread: f64,
}

fn figures(counts: &[u64], cpu: Duration, wall: Duration) -> Figures {
    let total: u64 = counts.iter().sum();
    let secs = wall.as_secs_f64();
    let threads = counts.len() as f64;
    let max = *counts.iter().max().unwrap_or(&1) as f64;
    let min = *counts.iter().min().unwrap_or(&0) as f64;
    Figures {
        total_per_s: total as f64 / secs,
        per_thread_per_s: total as f64 / secs / threads,
        ns_per_admission: secs * 1e9 * threads / total.max(1) as f64,
        cpu_ns_per_admission: cpu.as_secs_f64() * 1e9 / total.max(1) as f64,
        cores: cpu.as_secs_f64() / secs,
        spread: if max > 0.0 { min / max } else { 0.0 },
    }
}

struct Args(Vec<String>);

impl Args {
    fn value(&self, name: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == name)?;
        self.0.get(i + 1).map(String::as_str)
    }

    fn list<T>(&self, name: &str, default: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
        let raw = self.value(name).unwrap_or(default);
        raw.split(',')
            .map(|s| parse(s.trim()).unwrap_or_else(|| die(&format!("bad {name} value: {s}"))))
            .collect()
    }
}

fn die(msg: &str) -> ! {
    eprintln!("admission_threads: {msg}");
    std::process::exit(2)
}

fn main() {
    let args = Args(std::env::args().skip(1).collect());
    // `cargo bench` passes `--bench`; whatever else a test runner passes (nothing, a
    // filter, `--test`) gets the smoke run, never the minute-long table.
    const OPTIONS: [&str; 7] = [
        "--bench",
        "--threads",
        "--shape",
        "--reps",
        "--secs",
        "--iters",
        "--min-cores",
    ];
    if !args.0.iter().any(|a| OPTIONS.contains(&a.as_str())) {
        smoke();
        return;
    }
    let threads = args.list("--threads", "1,2,4,8", |s| {
        s.parse::<usize>()
            .ok()
            .filter(|&n| (1..=MAX_THREADS).contains(&n))
    });
    let shapes = args.list("--shape", "own,one,rate,apart", Shape::parse);
    let reps = args
        .value("--reps")
        .map(|s| s.parse::<usize>().unwrap_or_else(|_| die("bad --reps")))
        .unwrap_or(3)
        .clamp(1, MAX_REPS);
    if let Some(iters) = args.value("--iters") {
        let iters = iters
            .parse::<u64>()
            .unwrap_or_else(|_| die("bad --iters"))
            .clamp(1, MAX_ITERS);
        for &shape in &shapes {
            for &n in &threads {
                let (counts, _, wall) = cell(shape, n, Run::Iters(iters));
                let total: u64 = counts.iter().sum();
                println!("{shape:?} threads={n} admissions={total} wall={wall:?}");
            }
        }
        return;
    }
    let secs = args
        .value("--secs")
        .map(|s| s.parse::<f64>().unwrap_or_else(|_| die("bad --secs")))
        .unwrap_or(2.0)
        .clamp(0.01, MAX_SECS);
    let run = Run::For(Duration::from_secs_f64(secs));
    let min_cores = args
        .value("--min-cores")
        .map(|s| s.parse::<f64>().unwrap_or_else(|_| die("bad --min-cores")))
        .unwrap_or(0.0);
    let max_tries = if min_cores > 0.0 { reps * 10 } else { reps };
    println!(
        "admit+drop on one Guard, {} CPUs, {secs} s per cell, median of {reps} by total rate{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if min_cores > 0.0 {
            format!(
                ", runs kept only when their threads used {min_cores} cores (0.9 per thread if fewer), of at most {max_tries}"
            )
        } else {
            String::new()
        }
    );
    for &shape in &shapes {
        println!();
        println!("{}", shape.describe());
        println!();
        println!(
            "| threads | admissions/s, total (range) | per thread | wall ns per admission, per thread | CPU ns per admission | cores used | slowest/fastest thread |"
        );
        println!("|---|---|---|---|---|---|---|");
        for &n in &threads {
            // Threads contend only while they run at once: with `--min-cores`, a run whose
            // threads got fewer cores between them than that is not kept.
            let need = min_cores.min(n as f64 * 0.9);
            let mut runs: Vec<Figures> = Vec::new();
            let mut tries = 0;
            while runs.len() < reps && tries < max_tries {
                tries += 1;
                let (counts, cpu, wall) = cell(shape, n, run);
                let f = figures(&counts, cpu, wall);
                if f.cores >= need {
                    runs.push(f);
                }
            }
            if runs.is_empty() {
                println!("| {n} | no run of {tries} used {need:.1} cores |");
                continue;
            }
            runs.sort_by(|a, b| a.total_per_s.total_cmp(&b.total_per_s));
            let lo = runs[0].total_per_s;
            let hi = runs[runs.len() - 1].total_per_s;
            let m = &runs[runs.len() / 2];
            println!(
                "| {n} | {} ({}-{}) | {} | {:.0} | {:.0} | {:.2} | {:.2} |",
                thousands(m.total_per_s),
                thousands(lo),
                thousands(hi),
                thousands(m.per_thread_per_s),
                m.ns_per_admission,
                m.cpu_ns_per_admission,
                m.cores,
                m.spread
            );
        }
    }
}

/// What `cargo test --all-targets` runs: every shape briefly on 1 and 2 threads, so the
/// bench cannot rot, in well under a second.
fn smoke() {
    let mut total = 0;
    for shape in [Shape::Own, Shape::One, Shape::Rate, Shape::Apart] {
        for threads in [1, 2] {
            let (counts, _, _) = cell(shape, threads, Run::For(Duration::from_millis(20)));
            assert!(counts.iter().all(|&n| n > 0), "a thread admitted nothing");
            total += counts.iter().sum::<u64>();
        }
    }
    println!(
        "admission_threads: smoke run, {total} admissions; `cargo bench --bench admission_threads` for the table"
    );
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// 1234567.8 -> "1,234,568".
fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
