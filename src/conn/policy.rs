//! What a listener's connections share: the policy a reload swaps whole, and the guard,
//! stats and abort token that live as long as the listener.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::clocks::Rules;
use crate::backend::Pool;
use crate::config::{PressureConfig, Protocol, TcpConfig, Timeouts};
use crate::guard::Guard;
use crate::stats::Stats;

/// What a reload may change for a listener's connections, swapped whole.
#[derive(Debug)]
pub struct Policy {
    pub protocol: Protocol,
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
    /// The policy in force; connections load it at start and again when `epoch` moves.
    pub policy: ArcSwap<Policy>,
    /// Bumped on reload so live connections pick up new clocks at once.
    pub epoch: watch::Sender<u64>,
    pub guard: Guard,
    pub stats: Arc<Stats>,
    /// Fired when the drain period after shutdown is over: abort what is left.
    pub abort: CancellationToken,
}

impl ListenerCtx {
    /// Installs a new policy; live connections switch to its clocks at once.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
        self.epoch.send_modify(|e| *e += 1);
    }
}
