//! Zero-copy forwarding on Linux: `splice(2)` from the reading socket into a pipe and from
//! the pipe into the writing socket, so bulk bytes never cross into user space.
//!
//! A pipe costs two descriptors, so pipes are a budget, like HAProxy's `maxpipes`: a
//! direction switches to splice only once it proves to be bulk (a read fills the whole copy
//! buffer) and a pipe is available; everything else keeps the small-buffer path. Pipes are
//! opened on demand and empty ones go back to a free list for the next bulk connection. The
//! budget is set aside inside the descriptor budget ([`crate::fds`]), beside the listener
//! caps, so a pipe never takes a descriptor an accept needs, and splice has pipes whatever
//! `max_conns` says.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes a pipe holds: one splice moves up to this much.
pub const PIPE_SIZE: usize = 256 * 1024;
/// Never more pipes than this, whatever the descriptor budget.
pub use crate::fds::MAX_PIPES;
/// Empty pipes kept open for reuse.
const KEEP_FREE: usize = 64;

/// A pipe for one direction of one connection.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

#[derive(Debug)]
struct PipePool {
    free: Mutex<Vec<Pipe>>,
    /// Pipes open now, free ones included.
    live: AtomicUsize,
    budget: AtomicUsize,
}

static POOL: PipePool = PipePool {
    free: Mutex::new(Vec::new()),
    live: AtomicUsize::new(0),
    budget: AtomicUsize::new(0),
};

/// Sets how many pipes may be open at once (0 turns splicing off).
pub fn set_budget(n: usize) {
    let n = n.min(MAX_PIPES);
    POOL.budget.store(n, Ordering::Relaxed);
    // A smaller budget closes free pipes beyond it at once; pipes in use close as they end.
    if let Ok(mut f) = POOL.free.lock() {
        while live() > n && f.pop().is_some() {}
    }
}

/// The budget in force.
pub fn budget() -> usize {
    POOL.budget.load(Ordering::Relaxed)
}

/// Pipes open now, in use or free.
pub fn live() -> usize {
    POOL.live.load(Ordering::Relaxed)
}

/// Empty pipes open on the free list, waiting for the next bulk direction.
pub fn free() -> usize {
    POOL.free.lock().map(|f| f.len()).unwrap_or(0)
}

/// Pipes held by connections now.
pub fn in_use() -> usize {
    live().saturating_sub(free())
}

impl Pipe {
    /// A pipe from the free list, or a new one within the budget.
    pub fn get() -> Option<Pipe> {
        if let Ok(mut f) = POOL.free.lock()
            && let Some(p) = f.pop()
        {
            return Some(p);
        }
        let budget = POOL.budget.load(Ordering::Relaxed);
        POOL.live
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |l| {
                (l < budget).then_some(l + 1)
            })
            .ok()?;
        match new_pipe() {
            Ok(p) => Some(p),
            Err(_) => {
                POOL.live.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }

    /// Gives an empty pipe back for reuse. A pipe that may hold bytes must be dropped.
    pub fn put_back(self) {
        if let Ok(mut f) = POOL.free.lock()
            && f.len() < KEEP_FREE
        {
            f.push(self);
        }
    }

    /// The pipe's (read end, write end), valid while the pipe lives.
    pub fn fds(&self) -> (RawFd, RawFd) {
        (self.r.as_raw_fd(), self.w.as_raw_fd())
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        POOL.live.fetch_sub(1, Ordering::AcqRel);
    }
}

#[allow(unsafe_code)]
fn new_pipe() -> io::Result<Pipe> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own; on success they are
    // ours to own exactly once.
    let (r, w) = unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    // A bigger pipe moves more per call; the kernel may refuse (pipe-max-size), which only
    // costs speed.
    // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own.
    unsafe {
        libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int);
    }
    Ok(Pipe { r, w })
}

/// Moves up to `len` bytes from `from` to `to`, one of them a pipe, without blocking.
#[allow(unsafe_code)]
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed from live owners for the duration of the call;
    // null offsets are required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
