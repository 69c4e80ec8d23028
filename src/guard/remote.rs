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
}

impl RemoteLoad {
    pub fn add(&mut self, o: RemoteLoad) {
        self.conns = self.conns.saturating_add(o.conns);
        self.half_open = self.half_open.saturating_add(o.half_open);
        self.half_closed = self.half_closed.saturating_add(o.half_closed);
    }
}

/// The other replicas' loads, and the sources banned cluster-wide. Built whole by the sync
/// task and swapped in; never changed in place, so admission reads it without a lock.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Remote {
    pub loads: HashMap<SourceKey, RemoteLoad>,
    /// Refused at accept until the sync task drops them (their `ban_for` is over).
    pub banned: HashSet<SourceKey>,
}
