//! The signals the live view acts on: SIGTERM, SIGINT (from `kill`: raw mode turns Ctrl-C
//! into a key) and SIGHUP (a login shell passing on its terminal's hangup) end it the way
//! `q` does, so the terminal is given back; SIGWINCH redraws it at the new size.
//!
//! They are registered before the terminal is touched: a view that no signal could end
//! does not start. The screen loop looks at the flags at least every tick.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::signal::unix::{SignalKind, signal};

/// What the signals asked since the screen loop last looked; watching stops when dropped.
pub struct Signals {
    flags: Arc<Flags>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Flags {
    quit: AtomicBool,
    resized: AtomicBool,
}

impl Signals {
    pub fn watch(rt: &tokio::runtime::Runtime) -> io::Result<Signals> {
        let _in_rt = rt.enter();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut winch = signal(SignalKind::window_change())?;
        let flags = Arc::new(Flags::default());
        let f = flags.clone();
        let task = rt.spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => break,
                    _ = winch.recv() => f.resized.store(true, Ordering::Relaxed),
                }
            }
            f.quit.store(true, Ordering::Relaxed);
        });
        Ok(Signals { flags, task })
    }

    pub fn quit(&self) -> bool {
        self.flags.quit.load(Ordering::Relaxed)
    }

    /// Whether the terminal changed size since the last call.
    pub fn resized(&self) -> bool {
        self.flags.resized.swap(false, Ordering::Relaxed)
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.task.abort();
    }
}
