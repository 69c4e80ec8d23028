//! What a listener's connections share: the policy a reload swaps whole, and the guard,
//! stats and abort flag that live as long as the listener.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::clocks::Rules;
use crate::backend::Pool;
use crate::config::{PressureConfig, Protocol, TcpConfig, Timeouts};
use crate::guard::Guard;
use crate::stats::Stats;

/// What a reload may change for a listener's connections, swapped whole.
#[derive(Debug)]
pub struct Policy {
    pub protocol: Protocol,
    /// What a client-first listener holds until whole before it connects a backend.
    pub first_message: crate::first_message::Expect,
    /// `limits.max_first_message`: held bytes past which the backend is connected anyway.
    pub max_first_message: usize,
    /// Expect a PROXY protocol header first, from these balancers only.
    pub accept_proxy: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub timeouts: Timeouts,
    /// `limits.min_rate`: bytes per second that count as progress.
    pub min_rate: u32,
    /// `limits.grace`: how long a state lasts before it counts against the source's cap.
    pub grace: Duration,
    /// `limits.mode = "observe"`: clocks are counted, not acted on.
    pub observe: bool,
    pub pressure: PressureConfig,
    pub tcp: TcpConfig,
    pub backends: Arc<Pool>,
}

impl Policy {
    /// What the clocks read from it.
    pub fn rules(&self) -> Rules<'_> {
        Rules {
            timeouts: &self.timeouts,
            pressure: &self.pressure,
            min_rate: self.min_rate,
            observe: self.observe,
        }
    }
}

/// What every connection of one listener shares.
#[derive(Debug)]
pub struct ListenerCtx {
    pub name: String,
    /// The policy in force; connections load it at start and again when the guard's bell
    /// rings.
    pub policy: ArcSwap<Policy>,
    pub guard: Guard,
    pub stats: Arc<Stats>,
    /// Set when the drain period after shutdown is over: what is left is aborted. Told with
    /// the guard's bell, which every connection hears anyway (see [`crate::bell`]).
    aborted: AtomicBool,
    /// The listener's parking lots, one per accept loop (one per worker thread with
    /// `[runtime] per_worker`), each with the thread that runs it: a connection that parks
    /// after an exchange goes to its own thread's lot, and wakes on its thread (weak, so that
    /// a lot's epoll set closes with its task).
    lots: std::sync::Mutex<Vec<(std::thread::ThreadId, std::sync::Weak<super::Lot>)>>,
}

impl ListenerCtx {
    pub fn new(name: String, policy: Policy, guard: Guard, stats: Arc<Stats>) -> ListenerCtx {
        ListenerCtx {
            name,
            policy: ArcSwap::from_pointee(policy),
            guard,
            stats,
            aborted: AtomicBool::new(false),
            lots: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Aborts every connection left (each ends with RST, counted as aborted on shutdown).
    pub fn abort_all(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.guard.bell().ring();
    }

    /// Whether `abort_all` was called. A connection looks when it starts and whenever the
    /// bell rang, so it cannot miss the call.
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    /// A lot connections of this listener park in (see `conn::parked`), run by the calling
    /// thread's accept loop.
    pub fn set_lot(&self, lot: &Arc<super::Lot>) {
        if let Ok(mut l) = self.lots.lock() {
            l.retain(|(_, w)| w.strong_count() > 0);
            l.push((std::thread::current().id(), Arc::downgrade(lot)));
        }
    }

    /// The calling thread's lot if it has one that still runs, else any that does: looked
    /// up once per park, never per request.
    pub(crate) fn lot(&self) -> Option<Arc<super::Lot>> {
        let lots = self.lots.lock().ok()?;
        let here = std::thread::current().id();
        let mine = lots.iter().find(|(t, _)| *t == here);
        mine.and_then(|(_, w)| w.upgrade())
            .or_else(|| lots.iter().find_map(|(_, w)| w.upgrade()))
    }

    /// Installs a new policy; live connections switch to its clocks at once.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
        self.guard.bell().ring();
    }
}
