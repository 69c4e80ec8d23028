//! Bytes are a cap like connections: what is queued toward a source's clients.
//!
//! A connection whose client stops reading pins kernel memory that no connection count
//! shows: its send queue toward the client, and what its backend sent that halfguard has not
//! read (the backend keeps sending until that queue is full too). The kernel's `tcp_mem` is
//! host-wide, so once clients that do not read fill it every socket on the host starves.
//!
//! A connection that is stalled with bytes its client does not take reports them at each
//! progress check ([`Ticket::set_queued`]); its source's entry and the listener keep the
//! sums. Over `limits.max_queued_per_source`, the reporting connection of that source is cut
//! (`source_queued`): a source's connections go one a second until it is under its cap. Over
//! `limits.max_queued`, the source holding the most bytes (chosen once a second by
//! [`Shared::choose_shedding`]) and any source holding a sixty-fourth of the cap have their
//! blocked connections cut (`queued_full`): heaviest sources first, as with the other
//! listener caps. A source cut for its bytes is remembered (the cut record): while the
//! listener holds more than half its cap, it gets no newcomer, and the others' newcomers do.
//!
//! A newcomer of a source whose connections are blocked with bytes is charged their
//! average at admission (refused if that takes the source past its cap), until its own
//! first look (`conn::weight`) replaces the charge with what it pins: a flood of clients
//! that do not read meets its cap before its connections have filled their buffers.
//!
//! A cut is an RST both ways, which frees the client's queue at once and makes the backend
//! drop what it still had to send.
//!
//! Under memory pressure (the kernel's TCP memory or the cgroup near its limit, see
//! `crate::memory`) the listener's cap counts as a [`MEMORY_SHRINK`]th of itself: the
//! byte-heavy blocked connections are the first to go, before the clocks' shorter values
//! reach the merely idle, because they are what holds the memory.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Shared, Ticket};
use crate::stats::Reject;

impl Ticket {
    /// Reports the bytes queued toward this connection's client now (0 once it takes them
    /// again). `Err`: over a byte cap, the connection must be cut; the refusal is counted.
    pub fn set_queued(&self, bytes: u64) -> Result<(), Reject> {
        self.report_queued(bytes, true)
    }

    /// As [`Ticket::set_queued`], for a client blocked for less than a progress check's
    /// window: the bytes count at once (the source's newcomers are charged and refused by
    /// them, and over the listener's cap the heavy are cut, the host's memory being at
    /// stake), but its source's own cap does not cut it yet. A client that pauses its
    /// downloads for a moment is not one that stopped reading.
    pub fn set_queued_early(&self, bytes: u64) -> Result<(), Reject> {
        self.report_queued(bytes, false)
    }

    fn report_queued(&self, bytes: u64, cut_source: bool) -> Result<(), Reject> {
        let sh = &self.shared;
        let old = self.ctl.queued.swap(bytes, Ordering::Relaxed);
        if old == bytes && bytes == 0 {
            return Ok(());
        }
        add(&sh.counts.queued, old, bytes);
        let lim = sh.limits.load();
        let Some(key) = self.key else {
            return Ok(());
        };
        let source = match sh.table.map.get_mut(&key) {
            Some(mut e) if !self.ctl.is_evicted() => {
                e.queued = e.queued.saturating_sub(old).saturating_add(bytes);
                match (old, bytes) {
                    (0, b) if b > 0 => e.blocked += 1,
                    (o, 0) if o > 0 => e.blocked = e.blocked.saturating_sub(1),
                    _ => {}
                }
                e.queued
            }
            _ => return Ok(()),
        };
        if bytes == 0 || self.observing() {
            return Ok(());
        }
        if cut_source && lim.max_queued_per_source > 0 && source > lim.max_queued_per_source {
            sh.refused_key(key, Reject::SourceQueued);
            sh.cut.count(key, true);
            return Err(Reject::SourceQueued);
        }
        // Over the listener's cap: the heaviest source's connections go, and those of any
        // source holding a sixty-fourth of the cap or more (1 MiB of the default 64 MiB) as
        // they report, so that a flood from many sources is cut within its first looks,
        // not one source a second.
        if sh.queued_over(&lim, 1)
            && (source.saturating_mul(HEAVY_SHARE) >= sh.queued_cap(&lim)
                || sh.shedding.load().as_deref() == Some(&key))
        {
            sh.stats.reject(Reject::QueuedFull);
            // Remembered: while the listener holds more than half its byte cap, this source
            // gets no newcomer (`Guard::admit`), even once its connections are gone.
            sh.cut.count(key, true);
            return Err(Reject::QueuedFull);
        }
        Ok(())
    }

    /// Gives back what the connection last reported; on every end, eviction included.
    pub(super) fn give_back_queued(&self) {
        let old = self.ctl.queued.swap(0, Ordering::Relaxed);
        if old == 0 {
            return;
        }
        let sh = &self.shared;
        add(&sh.counts.queued, old, 0);
        if let Some(key) = &self.key
            && let Some(mut e) = sh.table.map.get_mut(key)
        {
            e.queued = e.queued.saturating_sub(old);
            e.blocked = e.blocked.saturating_sub(1);
        }
    }
}

/// A source holding this fraction of the listener's byte cap or more is heavy.
const HEAVY_SHARE: u64 = 64;

/// Under memory pressure the listener's byte cap counts as this fraction of itself.
const MEMORY_SHRINK: u64 = 4;

impl Shared {
    /// The listener's byte cap in force: `max_queued`, or a [`MEMORY_SHRINK`]th of it while
    /// memory is short (0: no cap).
    pub(super) fn queued_cap(&self, lim: &crate::config::Limits) -> u64 {
        if self.pressure.by_memory() {
            (lim.max_queued / MEMORY_SHRINK).max(1).min(lim.max_queued)
        } else {
            lim.max_queued
        }
    }

    /// The listener holds more queued bytes than its cap in force over `divisor` (1: over
    /// it; 2: past half of it, where room is kept for sources not yet cut for their bytes).
    pub(super) fn queued_over(&self, lim: &crate::config::Limits, divisor: u64) -> bool {
        let cap = self.queued_cap(lim);
        cap > 0 && self.counts.queued.load(Ordering::Relaxed) > cap / divisor
    }

    /// Once a second: over `max_queued`, the source holding the most queued bytes is the one
    /// whose blocked connections are cut; under it, none. A scan of the table, made only
    /// while the listener is over its byte cap.
    pub(super) fn choose_shedding(&self) {
        if !self.queued_over(&self.limits.load(), 1) {
            if self.shedding.load().is_some() {
                self.shedding.store(None);
            }
            return;
        }
        let heaviest = self
            .table
            .map
            .iter()
            .filter(|e| e.queued > 0)
            .max_by_key(|e| e.queued)
            .map(|e| Arc::new(*e.key()));
        self.shedding.store(heaviest);
    }
}

/// `c` moves from `old` to `new` (never below zero).
fn add(c: &std::sync::atomic::AtomicU64, old: u64, new: u64) {
    if new >= old {
        c.fetch_add(new - old, Ordering::Relaxed);
    } else {
        let d = old - new;
        let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(d))
        });
    }
}
