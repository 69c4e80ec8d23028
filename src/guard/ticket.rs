//! The RAII ticket: a connection's place in the counts.
//!
//! Every state change goes through the ticket and its `Drop` gives the counts back, whatever
//! path the connection's task ends on (error, cancel, panic, clock). An evicted ticket's
//! counts were already given back by the evictor, under the victim's entry lock, so that the
//! newcomer can take the room at once; the ticket then only notices and does nothing.

use std::sync::Arc;

use super::table::ConnCtl;
use super::{Shared, SourceKey};
use crate::stats::{EvictState, Reject};

/// The accounted states (CLOSED is the ticket's drop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Accepted, nothing has moved yet.
    HalfOpen,
    /// Bytes have moved.
    Open,
    /// One side has sent FIN.
    HalfClosed,
}

impl State {
    fn evict_state(self) -> Option<EvictState> {
        match self {
            State::HalfOpen => Some(EvictState::HalfOpen),
            State::Open => None,
            State::HalfClosed => Some(EvictState::HalfClosed),
        }
    }
}

/// Why a state change was refused: the connection must be aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("evicted to make room")]
    Evicted,
    #[error("refused: {}", .0.as_str())]
    Full(Reject),
}

/// A connection's accounting. Not `Clone`: exactly one per connection.
#[derive(Debug)]
pub struct Ticket {
    pub(super) shared: Arc<Shared>,
    /// `None` for allow-listed sources, which are counted only listener-wide.
    pub(super) key: Option<SourceKey>,
    pub(super) id: u64,
    pub(super) state: State,
    pub(super) ctl: Arc<ConnCtl>,
}

impl Ticket {
    pub fn state(&self) -> State {
        self.state
    }

    /// The source this connection is counted under, `None` when allow-listed.
    pub fn source(&self) -> Option<SourceKey> {
        self.key
    }

    /// The eviction handle: `ctl().evicted()` resolves when another connection evicts this one.
    pub fn ctl(&self) -> &Arc<ConnCtl> {
        &self.ctl
    }

    /// Gives a connection admitted with `Guard::admit_trusted` its real source (from a PROXY
    /// header) and applies the per-source checks to it. On refusal the connection must be
    /// aborted; the refusal is counted.
    pub fn assign_source(&mut self, ip: std::net::IpAddr) -> Result<(), Reject> {
        debug_assert!(self.key.is_none() && self.state == State::HalfOpen);
        self.key = self.shared.assign_source(ip, self.id, &self.ctl)?;
        Ok(())
    }

    /// HALF_OPEN -> OPEN: the first byte moved.
    pub fn open(&mut self) -> Result<(), Refused> {
        debug_assert_eq!(self.state, State::HalfOpen);
        let sh = &self.shared;
        if let Some(key) = &self.key {
            let Some(mut e) = sh.table.map.get_mut(key) else {
                return Err(Refused::Evicted);
            };
            if self.ctl.is_evicted() {
                return Err(Refused::Evicted);
            }
            e.half_open.remove(&self.id);
        } else if self.ctl.is_evicted() {
            return Err(Refused::Evicted);
        }
        sh.counts
            .half_open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.state = State::Open;
        sh.update_pressure();
        Ok(())
    }

    /// OPEN -> HALF_CLOSED: one side sent FIN. Over the source's cap, the source's oldest
    /// half-closed connection is evicted; over the listener's cap, the oldest of the heaviest
    /// source (`on_full = "evict"`) or this one (`"reject"`).
    pub fn half_close(&mut self) -> Result<(), Refused> {
        debug_assert_eq!(self.state, State::Open);
        // An OPEN connection is in no eviction list, so nobody can have evicted it; count it
        // listener-wide first, so an evictor never finds it in a list before it is counted.
        let sh = self.shared.clone();
        let lim = sh.limits.load();
        if !sh.reserve_state(EvictState::HalfClosed, self.id, &lim) {
            return Err(Refused::Full(Reject::HalfClosedFull));
        }
        self.state = State::HalfClosed;
        let cap = lim.max_half_closed_per_source as usize;
        if let Some(key) = &self.key {
            let victim = {
                let Some(mut e) = sh.table.map.get_mut(key) else {
                    return Ok(());
                };
                e.half_closed.insert(self.id, self.ctl.clone());
                if cap > 0 && e.half_closed.len() > cap {
                    e.evict_oldest(EvictState::HalfClosed, self.id)
                } else {
                    None
                }
            };
            if let Some(v) = victim {
                sh.give_back_evicted(EvictState::HalfClosed);
                v.wake();
            }
        }
        sh.update_pressure();
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let sh = &self.shared;
        if self.ctl.is_evicted() {
            return;
        }
        if let Some(key) = &self.key {
            if let Some(mut e) = sh.table.map.get_mut(key) {
                // Re-check under the lock: an evictor may have won the race.
                if self.ctl.is_evicted() {
                    return;
                }
                if let Some(s) = self.state.evict_state() {
                    e.slots(s).remove(&self.id);
                }
                e.conns = e.conns.saturating_sub(1);
            }
            sh.table.remove_if_empty(key);
        }
        sh.give_back(self.state.evict_state());
    }
}
