//! The cluster view: what the other replicas hold per source, as of their last sync.
//!
//! With `[cluster]`, a per-source cap applies to the sum over the replicas. Admission never
//! waits on the network for it: the cluster's sync task swaps in a fresh [`Remote`] every
//! interval, and admission adds the counts it finds there to the source's live local counts.
//! Without `[cluster]` there is no view, and admission is what it always was.

use std::collections::{HashMap, HashSet};

use super::SourceKey;

/// One source's connections on the other replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteLoad {
    pub conns: u32,
    /// Silent past the grace.
    pub half_open: u32,
    /// Half-closed past the grace.
    pub half_closed: u32,
    /// New connections per second over the last sync interval.
    pub rate: u32,
}

impl RemoteLoad {
    pub fn add(&mut self, o: RemoteLoad) {
        self.conns = self.conns.saturating_add(o.conns);
        self.half_open = self.half_open.saturating_add(o.half_open);
        self.half_closed = self.half_closed.saturating_add(o.half_closed);
        self.rate = self.rate.saturating_add(o.rate);
    }
}

/// The other replicas' loads, and the sources banned cluster-wide. Built whole by the sync
/// task and swapped in; never changed in place, so admission reads it without a lock.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Remote {
    pub loads: HashMap<SourceKey, RemoteLoad>,
    /// Refused at accept until the sync task drops them (their `ban_for` is over).
    pub banned: HashSet<SourceKey>,
    /// New connections this replica may admit per source in the current sync interval,
    /// for the sources the others also admit: its part of `conn_rate_per_source`.
    pub rate_budget: HashMap<SourceKey, u32>,
}

/// This replica's part of a cluster-wide rate of `rate` per second for one source, of which
/// the others admitted `others` per second and this one `here`, in the last interval.
///
/// Proportional to what each admitted (so N replicas that see one source alike settle on
/// `rate / N` each at once, instead of swinging between all and nothing), and never less
/// than what the others leave (so a replica the source only now reaches is not starved).
pub fn rate_share(rate: u32, here: u32, others: u32) -> u32 {
    let proportional = if here == 0 {
        0
    } else {
        (u64::from(rate) * u64::from(here) / (u64::from(here) + u64::from(others))) as u32
    };
    proportional.max(rate.saturating_sub(others)).min(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_seeing_one_source_alike_share_its_rate() {
        // Three replicas, alike: a third each, at once.
        assert_eq!(rate_share(90, 40, 80), 30);
        // Alone: the whole rate.
        assert_eq!(rate_share(90, 40, 0), 90);
        // Newly reached: what the others leave.
        assert_eq!(rate_share(90, 0, 60), 30);
        assert_eq!(rate_share(90, 0, 120), 0);
    }
}
