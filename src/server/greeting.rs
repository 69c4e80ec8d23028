//! Server-first found, not guessed: when a client-first listener's connections keep timing
//! out silent at `first_byte`, one of its pool's servers is probed once
//! (`backend::Pool::probe_greeting`); a server that greets before the client speaks means
//! the listener wants `protocol = "server-first"`, and a WARN line and the
//! `halfguard_server_first_suspected` gauge say so.
//!
//! Bounded whatever the traffic: the upkeep looks once a second at one counter per
//! listener, nothing runs per connection, and a listener is probed at most once per
//! [`PROBE_EVERY`], never again once a probe found a greeting (until a reload changes its
//! policy). Seldom on purpose: a probe is a connection that never logs in, which MySQL for
//! one counts toward `max_connect_errors` and blocks the host for.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{Running, State};
use crate::config::Protocol;
use crate::conn::Policy;
use crate::stats::Timeout;

/// At most one probe per listener this often.
const PROBE_EVERY: Duration = Duration::from_secs(600);
/// How long a probe waits for a greeting: servers greet at once (SMTP, MySQL, FTP).
const GREETING_WAIT: Duration = Duration::from_secs(1);
/// A probe's connect gets the listener's `timeouts.connect`, but never longer than this.
const MAX_CONNECT: Duration = Duration::from_secs(5);

/// What the upkeep remembers per listener name.
#[derive(Default)]
pub(super) struct Watch {
    seen: HashMap<String, Seen>,
}

struct Seen {
    /// `timed_out{first_byte}` at the last look.
    first_byte: u64,
    probed: Option<Instant>,
    /// The policy the last probe was made under: a greeting found stops the probes until
    /// a reload installs another.
    policy: Weak<Policy>,
}

impl Watch {
    /// Once a second: probes where `first_byte` timeouts grew on a client-first listener.
    pub(super) fn tick(&mut self, state: &Arc<State>, listeners: &[Arc<Running>]) {
        let now = Instant::now();
        let active = || listeners.iter().filter(|r| !r.is_retired());
        self.seen
            .retain(|name, _| active().any(|r| r.ctx.name == *name));
        for r in active() {
            let (ctx, policy) = (&r.ctx, r.ctx.policy.load_full());
            let stats = &ctx.stats;
            if policy.protocol == Protocol::ServerFirst {
                stats.server_first_suspected.store(0, Relaxed);
                self.seen.remove(&ctx.name);
                continue;
            }
            let timed_out = stats.timed_out(Timeout::FirstByte);
            let seen = self.seen.entry(ctx.name.clone()).or_insert(Seen {
                first_byte: timed_out,
                probed: None,
                policy: Weak::new(),
            });
            let grew = timed_out > seen.first_byte;
            seen.first_byte = timed_out;
            let found = stats.server_first_suspected.load(Relaxed) == 1
                && std::ptr::eq(seen.policy.as_ptr(), Arc::as_ptr(&policy));
            let due = seen.probed.is_none_or(|t| now >= t + PROBE_EVERY);
            if !grew || found || !due {
                continue;
            }
            seen.probed = Some(now);
            seen.policy = Arc::downgrade(&policy);
            let (name, stats, state) = (ctx.name.clone(), stats.clone(), state.clone());
            state.clone().tasks.spawn(async move {
                let connect = policy.timeouts.connect.min(MAX_CONNECT);
                let probe = policy.backends.probe_greeting(connect, GREETING_WAIT);
                let result = tokio::select! {
                    _ = state.stopping() => return,
                    r = probe => r,
                };
                match result {
                    Ok(g) if g.spoke_first => {
                        stats.server_first_suspected.store(1, Relaxed);
                        tracing::warn!(
                            listener = %name,
                            server = %g.server,
                            "connections time out silent at timeouts.first_byte and the server \
                             greets before the client speaks: a server-first protocol on a \
                             client-first listener; set protocol = \"server-first\" on it"
                        );
                    }
                    Ok(_) => stats.server_first_suspected.store(0, Relaxed),
                    Err(e) => {
                        tracing::debug!(listener = %name, error = %e, "greeting probe failed")
                    }
                }
            });
        }
    }
}
