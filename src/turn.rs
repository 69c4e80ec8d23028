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

use std::cell::Cell;
use std::io;
use std::sync::Once;
use std::time::Duration;

/// The kernel's bounds on a custom slice (`kernel/sched/syscalls.c`).
pub const MIN_SLICE: Duration = Duration::from_micros(100);
pub const MAX_SLICE: Duration = Duration::from_millis(100);

/// This thread's state: not yet asked, yielding before sleep, or not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turns {
    Unset,
    Short,
    Long,
}

thread_local! {
    static TURNS: Cell<Turns> = const { Cell::new(Turns::Unset) };
}

static UNSUPPORTED: Once = Once::new();

/// Called by a worker about to sleep (tokio's park hook). The first call on a thread asks the
/// kernel for turns of `slice` (`Duration::ZERO`: the kernel's default, and no yield); from
/// then on, if the kernel kept it, yields the core before each sleep.
pub fn before_sleep(slice: Duration) {
    let turns = TURNS.with(|t| {
        if t.get() == Turns::Unset {
            t.set(match ask(slice) {
                Ok(true) => Turns::Short,
                Ok(false) => Turns::Long,
                Err(e) => {
                    UNSUPPORTED.call_once(|| {
                        tracing::info!(
                            "runtime.slice: this kernel keeps no custom slice (Linux 6.12+): {e}; workers sleep without yielding first"
                        )
                    });
                    Turns::Long
                }
            });
        }
        t.get()
    });
    if turns == Turns::Short {
        // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
        #[allow(unsafe_code)]
        unsafe {
            libc::sched_yield()
        };
    }
}

/// Asks for `slice` on the calling thread; `Ok(true)` when the kernel reports it back.
/// A thread under a real-time or deadline policy, or `slice` zero, is left alone (`Ok(false)`).
pub fn ask(slice: Duration) -> io::Result<bool> {
    if slice.is_zero() {
        return Ok(false);
    }
    let mut attr = get(0)?;
    if attr.sched_policy != libc::SCHED_OTHER as u32
        && attr.sched_policy != libc::SCHED_BATCH as u32
    {
        return Ok(false);
    }
    let want = slice.clamp(MIN_SLICE, MAX_SLICE).as_nanos() as u64;
    attr.sched_runtime = want;
    // Keep what the thread has (nice, utilization clamps): only the slice changes.
    attr.sched_flags = 0;
    set(0, &attr)?;
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

    #[allow(unsafe_code)]
    fn unsafe_gettid() -> i32 {
        // SAFETY: gettid takes no arguments.
        unsafe { libc::gettid() }
    }
}
