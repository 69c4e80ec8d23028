//! A worker thread's turns on its core (`[runtime] slice`): short ones, and its core handed
//! on before it sleeps.
//!
//! Why: on a host whose cores the backend and the clients share (a sidecar's pod, the
//! benches), a worker that sleeps the moment its events run out leaves its core idle while
//! the next ones are microseconds away: the backend's reply to the request it just passed
//! on. Waking an idle core costs the most in a VM, where it halts. Under keep-alive at full
//! load (`benches/compare`'s shape, two vCPUs shared with wrk and nginx) a fifth of both cores
//! sat idle, with halfguard and with HAProxy alike, and either proxy served 15-20% more with
//! one thread than with two.
//!
//! So a worker about to sleep first yields its core (`sched_yield`) to whatever waits for it,
//! and looks for events again when it gets the core back: those that came meanwhile are
//! served without a sleep and a wake-up. Idle time fell to 1-6% and keep-alive rose by a
//! fifth. Alone, that yield cost p99: Linux's scheduler (EEVDF, 6.6+) pushes a yielder's
//! deadline back by its whole slice (milliseconds by default), so a worker that has yielded
//! waits that long behind the others when its events arrive (p99 1.5-2.4 ms against 1.2).
//! A short slice, asked for through `sched_setattr` (a custom slice, Linux 6.12+), makes that
//! push short and lets a woken worker run sooner, and with it p99 fell below what it was.
//! A kernel that cannot keep a custom slice gets neither: the worker sleeps as before.
//!
//! Neither pays where a worker admits new connections all the time (connection per request,
//! its cores busy): there, short turns and the yield cost p99 5-7% (`benches/compare`),
//! since a worker preempted or yielded mid-stream leaves what waits in its accept queue
//! behind the other tasks' longer turns. So a worker that admitted 4 connections in the last
//! 10 ms ([`ADMITTING`]) runs the kernel's turns and sleeps at once, and switches back when
//! its admissions slow down.
//!
//! Nor where a worker carries a few streams (1 to [`FEW_STREAMS`] - 1 connections in their
//! open phase, `conn::open`): the yield's wait, up to a turn of whatever took the core, lands
//! on their next events, and with few streams that wait is most of their tail (wrk -c8
//! keep-alive, 4 streams a worker: p99 224-307 µs against 114-164 without the yield and
//! HAProxy's 159-188). With many streams their events queue behind each other anyway, and
//! the yield both serves more and shortens the tail (-c64: p99 1.0-1.1 ms against 1.2). With
//! none, no stream waits on it, and a refusal flood's connections gather in its accept
//! queue while it yields: bigger batches, less CPU a refusal.

use std::cell::Cell;
use std::io;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The kernel's bounds on a custom slice (`kernel/sched/syscalls.c`).
pub const MIN_SLICE: Duration = Duration::from_micros(100);
pub const MAX_SLICE: Duration = Duration::from_millis(100);

/// This thread's turns: not yet asked, the kernel's (it keeps no custom slice, or the slice
/// is zero), or switchable, and then short now or not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turns {
    Unset,
    Kernels,
    Custom { short: bool },
}

thread_local! {
    static TURNS: Cell<Turns> = const { Cell::new(Turns::Unset) };
    /// Connections this thread admitted since it last went idle.
    static ADMITTED: Cell<u32> = const { Cell::new(0) };
    /// When this thread went idle after its last [`BUSY`] admissions, newest first.
    static RECENT: Cell<[Option<Instant>; BUSY]> = const { Cell::new([None; BUSY]) };
    /// Streams carried by tasks this thread started ([`carry`]). An atomic, leaked once per
    /// thread, so that a task a shared scheduler moved gives its count back where it took it.
    static CARRYING: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
}

/// A worker carrying at least one stream but fewer than this does not yield (see the module
/// doc): 4 streams a worker paid for the yield in their tail, 16 gained from it.
pub const FEW_STREAMS: u32 = 12;

/// A stream being carried: counted on the thread that made it while it lives.
pub struct Carried(&'static AtomicU32);

/// Called as a connection enters its open phase (`conn::open`), kept until it leaves it.
pub fn carry() -> Carried {
    let count = CARRYING.with(|c| *c);
    count.fetch_add(1, Ordering::Relaxed);
    Carried(count)
}

impl Drop for Carried {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The streams tasks started on this thread carry now.
fn carrying() -> u32 {
    CARRYING.with(|c| c.load(Ordering::Relaxed))
}

/// A worker that admitted [`BUSY`] connections within this long keeps the kernel's turns and
/// does not yield: one admitting 400 a second or more never switches, where a trickle (what
/// a rate limit lets through a refusal flood) does not stop it.
pub const ADMITTING: Duration = Duration::from_millis(10);
/// See [`ADMITTING`].
pub const BUSY: usize = 4;

/// Called as a connection is admitted on this thread (`listener::admit`). A refused one does
/// not count: no one waits on it.
pub fn admitted() {
    ADMITTED.with(|a| a.set(a.get().saturating_add(1)));
}

static UNSUPPORTED: Once = Once::new();

/// Called by a worker about to sleep (tokio's park hook). The first call on a thread finds
/// whether the kernel keeps a custom slice. From then on: having admitted [`BUSY`]
/// connections within [`ADMITTING`], the thread runs the kernel's turns and sleeps at once;
/// otherwise it runs turns of `slice` and yields its core before it sleeps, unless it
/// carries a few streams ([`FEW_STREAMS`]). Switching costs a system call, only when the
/// thread's load changes kind. `slice` zero: the kernel's turns, no yield. Returns whether
/// it yielded.
pub fn before_sleep(slice: Duration) -> bool {
    let turns = TURNS.with(|t| {
        if t.get() == Turns::Unset {
            t.set(match ask(slice) {
                Ok(true) => Turns::Custom { short: true },
                Ok(false) => Turns::Kernels,
                Err(e) => {
                    UNSUPPORTED.call_once(|| {
                        tracing::info!(
                            "runtime.slice: this kernel keeps no custom slice (Linux 6.12+): {e}; workers sleep without yielding first"
                        )
                    });
                    Turns::Kernels
                }
            });
        }
        t.get()
    });
    let admitted = ADMITTED.with(|a| a.replace(0)) as usize;
    let Turns::Custom { short } = turns else {
        return false;
    };
    let now = Instant::now();
    let oldest = RECENT.with(|r| {
        let mut recent = r.get();
        for _ in 0..admitted.min(BUSY) {
            recent.rotate_right(1);
            recent[0] = Some(now);
        }
        r.set(recent);
        recent[BUSY - 1]
    });
    let admitting = oldest.is_some_and(|t| now.duration_since(t) < ADMITTING);
    if admitting == short {
        // The kernel's turns while admitting, `slice` otherwise. A thread the kernel stops
        // letting switch (a seccomp or policy change) stays as it is and yields no more.
        let want = if admitting { Duration::ZERO } else { slice };
        let next = match switch(want) {
            Ok(_) => Turns::Custom { short: !admitting },
            Err(_) => Turns::Kernels,
        };
        TURNS.with(|t| t.set(next));
        if next == Turns::Kernels {
            return false;
        }
    }
    if admitting || (1..FEW_STREAMS).contains(&carrying()) {
        return false;
    }
    // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
    #[allow(unsafe_code)]
    unsafe {
        libc::sched_yield()
    };
    true
}

/// Sets the calling thread's slice to `slice`, zero being the kernel's default, and keeps
/// the rest (policy, nice, reset-on-fork; utilization clamps change only when their flags
/// are set).
/// Returns the nanoseconds asked for.
fn switch(slice: Duration) -> io::Result<u64> {
    let mut attr = get(0)?;
    attr.sched_runtime = if slice.is_zero() {
        0
    } else {
        slice.clamp(MIN_SLICE, MAX_SLICE).as_nanos() as u64
    };
    attr.sched_flags &= SCHED_FLAG_RESET_ON_FORK;
    set(0, &attr)?;
    Ok(attr.sched_runtime)
}

/// Asks for `slice` on the calling thread; `Ok(true)` when the kernel reports it back.
/// A thread under a real-time or deadline policy, or `slice` zero, is left alone (`Ok(false)`).
pub fn ask(slice: Duration) -> io::Result<bool> {
    if slice.is_zero() {
        return Ok(false);
    }
    let attr = get(0)?;
    if attr.sched_policy != libc::SCHED_OTHER as u32
        && attr.sched_policy != libc::SCHED_BATCH as u32
    {
        return Ok(false);
    }
    let want = switch(slice)?;
    // Before 6.12 the kernel takes a fair thread's runtime and ignores it, and reports 0.
    let got = get(0)?.sched_runtime;
    if got == want {
        Ok(true)
    } else {
        Err(io::Error::other(format!(
            "asked for a {}µs slice, the kernel reports {}µs",
            want / 1_000,
            got / 1_000
        )))
    }
}

/// The slice thread `tid` (of any process) runs with, in nanoseconds, as the kernel reports
/// it: the custom one, or its default (6.12+; 0 before).
pub fn slice_of(tid: i32) -> io::Result<u64> {
    Ok(get(tid)?.sched_runtime)
}

/// `struct sched_attr` (`include/uapi/linux/sched/types.h`), its first version's 56 bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// `include/uapi/linux/sched.h`.
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

const ATTR_SIZE: u32 = std::mem::size_of::<SchedAttr>() as u32;

#[allow(unsafe_code)]
fn get(tid: i32) -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: the kernel writes at most ATTR_SIZE bytes into a live, aligned local.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            ATTR_SIZE,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

#[allow(unsafe_code)]
fn set(tid: i32, attr: &SchedAttr) -> io::Result<()> {
    let attr = SchedAttr {
        size: ATTR_SIZE,
        ..*attr
    };
    // SAFETY: the kernel reads `size` bytes from a live local.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a kernel with custom slices, a thread that asks gets the slice and reports it; a
    /// zero slice asks nothing. Each test runs on a thread of its own, so the setting dies
    /// with it.
    #[test]
    fn a_thread_that_asks_for_a_short_slice_runs_with_it() {
        std::thread::spawn(|| {
            let before = get(0).expect("sched_getattr");
            assert!(!ask(Duration::ZERO).expect("zero asks nothing"));
            assert_eq!(
                get(0).expect("sched_getattr").sched_runtime,
                before.sched_runtime
            );
            match ask(Duration::from_micros(150)) {
                Ok(kept) => {
                    assert!(kept);
                    let tid = unsafe_gettid();
                    assert_eq!(slice_of(tid).expect("slice_of"), 150_000);
                    assert_eq!(get(0).expect("sched_getattr").sched_nice, before.sched_nice);
                }
                Err(e) => eprintln!("SKIPPED: this kernel keeps no custom slice: {e}"),
            }
        })
        .join()
        .expect("the thread ran");
    }

    /// A worker runs short turns and yields before each sleep, but runs the kernel's turns
    /// and does not yield within [`ADMITTING`] of its [`BUSY`]th recent admission; with a
    /// zero slice it never yields.
    #[test]
    fn a_worker_yields_before_sleeping_unless_it_admits_connections() {
        std::thread::spawn(|| {
            let kernels = get(0).expect("sched_getattr").sched_runtime;
            if let Err(e) = ask(Duration::from_micros(100)) {
                return eprintln!("SKIPPED: this kernel keeps no custom slice: {e}");
            }
            let tid = unsafe_gettid();
            assert!(before_sleep(DEFAULT));
            assert!(before_sleep(DEFAULT));
            assert_eq!(slice_of(tid).expect("slice_of"), 100_000);
            admitted();
            assert!(before_sleep(DEFAULT), "one admission is a trickle");
            for _ in 0..BUSY {
                admitted();
            }
            assert!(!before_sleep(DEFAULT), "a sleep after BUSY admissions");
            assert_eq!(
                slice_of(tid).expect("slice_of"),
                kernels,
                "the kernel's turns"
            );
            assert!(!before_sleep(DEFAULT), "and the next, within ADMITTING");
            std::thread::sleep(ADMITTING + Duration::from_millis(2));
            assert!(before_sleep(DEFAULT), "then it yields again");
            assert_eq!(slice_of(tid).expect("slice_of"), 100_000);
        })
        .join()
        .expect("the thread ran");
        std::thread::spawn(|| {
            admitted();
            assert!(!before_sleep(Duration::ZERO));
            assert!(!before_sleep(Duration::ZERO), "a zero slice never yields");
        })
        .join()
        .expect("the thread ran");
    }

    /// A worker carrying none yields; one carrying a few streams does not; one carrying
    /// [`FEW_STREAMS`] or more yields again. A stream counts where it was made, wherever it
    /// ends.
    #[test]
    fn a_worker_carrying_a_few_streams_sleeps_without_yielding() {
        std::thread::spawn(|| {
            if let Err(e) = ask(DEFAULT) {
                return eprintln!("SKIPPED: this kernel keeps no custom slice: {e}");
            }
            assert!(before_sleep(DEFAULT), "no stream: it yields");
            let mut streams = vec![carry()];
            assert!(!before_sleep(DEFAULT), "one stream: it sleeps at once");
            while streams.len() < FEW_STREAMS as usize - 1 {
                streams.push(carry());
            }
            assert!(!before_sleep(DEFAULT), "FEW_STREAMS - 1: it sleeps at once");
            streams.push(carry());
            assert!(before_sleep(DEFAULT), "FEW_STREAMS: it yields");
            let moved = streams.pop().expect("a stream");
            std::thread::spawn(move || drop(moved))
                .join()
                .expect("the thread ran");
            assert_eq!(carrying(), FEW_STREAMS - 1, "given back where it was taken");
            assert!(!before_sleep(DEFAULT));
            streams.clear();
            assert_eq!(carrying(), 0);
            assert!(before_sleep(DEFAULT), "none again: it yields");
        })
        .join()
        .expect("the thread ran");
    }

    const DEFAULT: Duration = Duration::from_micros(100);

    #[allow(unsafe_code)]
    fn unsafe_gettid() -> i32 {
        // SAFETY: gettid takes no arguments.
        unsafe { libc::gettid() }
    }
}
