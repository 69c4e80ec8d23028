//! Cluster mode: per-source caps and bans shared by every replica through Redis.
//!
//! Every replica of a service runs its own halfguard; an attacker spread over N of them
//! would get N times each per-source cap, and a source banned on one would be a stranger to
//! the others. With `[cluster]`, a background task ([`sync`]) publishes, every
//! `sync_interval`, this replica's per-source counts and new connections per second for the
//! sources that matter (above `publish_above` of a cap, at most `max_published` per
//! listener) and reads the other replicas' shares ([`script`]), then hands each listener's
//! guard a fresh view. Admission reads that view and its own live counts; it never waits
//! for Redis.
//!
//! When Redis is down, slow or answers nonsense, the view is dropped (once it is three
//! intervals old) and each replica enforces its full local caps (the single-node
//! guarantee; an attacker gets at most N times the cap until Redis is back), bans already
//! learned stay until they end, and the state change is logged once. The task reconnects
//! with a backoff of at most four intervals, so the cluster view returns within a few
//! intervals of Redis.
//!
//! Redis is trusted as a replica is, no more: whoever can write the keys can make a source
//! count as much as a replica at its cap holds (so refuse it, while they keep writing) and
//! ban it for `kernel.ban_for`, but cannot grow a replica's view past its bounds, ban for
//! longer, keep a dead "replica" alive past `share_ttl`, or make a sync slow enough to turn
//! the cluster caps off ([`script`] says how; [`Dropped`] counts what was cut).

pub mod script;
pub mod sync;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::config::ClusterConfig;
use crate::guard::SourceKey;

/// Bans waiting for the next sync; more than this in one interval are dropped (the
/// kernel layer bans at most what it finds per census, and that is bounded by the tally).
const MAX_PENDING_BANS: usize = 4_096;

/// Why a sync failed: a closed set, ready to be a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection (refused, unreachable, AUTH refused).
    Connect,
    /// No answer within `cluster.timeout`.
    Timeout,
    /// Redis answered with an error.
    Error,
    /// The answer was not what the script returns (not Redis, or another program's keys).
    Reply,
}

impl Failure {
    pub const ALL: [Failure; 4] = [
        Failure::Connect,
        Failure::Timeout,
        Failure::Error,
        Failure::Reply,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Error => "error",
            Failure::Reply => "reply",
        }
    }
}

/// What a sync read from Redis and did not take as written: a closed set, ready to be a
/// metric label. Whoever can write the keys is trusted to refuse sources (as a replica
/// can), never to grow a replica's view, ban for longer than `kernel.ban_for`, or stall the
/// sync; these say what was cut to that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Entries of one replica's share past the bound a replica writes
    /// (`max_published` per listener), not read.
    Share,
    /// Live replicas past `max_replicas`, whose shares were not read (counted in replicas).
    Replicas,
    /// Entries past the bound on the view of one listener (`(max_replicas - 1) x
    /// max_published`), read but not kept (several buckets of a Redis Cluster).
    View,
    /// Bans past [`MAX_BANS`], not read.
    Bans,
    /// Entries with a count above what one replica could hold, kept at that bound (a
    /// replica may hold more than a cap for a moment, or when it only observes: more
    /// refuses nothing more).
    Clamped,
    /// Bans ending later than now + `kernel.ban_for`, cut to it (in Redis too).
    BanCut,
}

impl Dropped {
    pub const ALL: [Dropped; 6] = [
        Dropped::Share,
        Dropped::Replicas,
        Dropped::View,
        Dropped::Bans,
        Dropped::Clamped,
        Dropped::BanCut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Share => "share_full",
            Dropped::Replicas => "replicas",
            Dropped::View => "view_full",
            Dropped::Bans => "bans",
            Dropped::Clamped => "count_clamped",
            Dropped::BanCut => "ban_clamped",
        }
    }
}

/// Bans read per sync at most (per bucket): a replica queues at most
/// [`MAX_PENDING_BANS`] per interval, and a ban lives `kernel.ban_for`.
pub const MAX_BANS: u32 = 4 * MAX_PENDING_BANS as u32;

/// The cluster's state, shared by the sync task, the ban feed and the metrics.
#[derive(Debug)]
pub struct Cluster {
    pub config: ClusterConfig,
    /// The last sync succeeded: per-source caps are cluster-wide.
    pub up: AtomicBool,
    pub syncs: AtomicU64,
    failures: [AtomicU64; Failure::ALL.len()],
    dropped: [AtomicU64; Dropped::ALL.len()],
    /// Share entries from other replicas that did not parse.
    pub bad_entries: AtomicU64,
    /// Sources this replica published at the last sync (all listeners).
    pub published: AtomicU64,
    /// Sources the other replicas hold, at the last sync (all listeners).
    pub remote_sources: AtomicU64,
    /// Live replicas at the last sync, this one included.
    pub nodes: AtomicU64,
    /// Sources banned cluster-wide now.
    pub banned: AtomicU64,
    /// When the view in force was read; `None` before the first sync.
    last_ok: Mutex<Option<Instant>>,
    started: Instant,
    /// Bans to publish at the next sync, with their length.
    pending_bans: Mutex<HashMap<SourceKey, Duration>>,
}

impl Cluster {
    pub fn new(config: ClusterConfig) -> Cluster {
        Cluster {
            config,
            up: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            failures: Default::default(),
            dropped: Default::default(),
            bad_entries: AtomicU64::new(0),
            published: AtomicU64::new(0),
            remote_sources: AtomicU64::new(0),
            nodes: AtomicU64::new(0),
            banned: AtomicU64::new(0),
            last_ok: Mutex::new(None),
            started: Instant::now(),
            pending_bans: Mutex::new(HashMap::new()),
        }
    }

    /// Bans `sources` on every replica for `ban_for`, from the next sync on.
    pub fn ban(&self, sources: &[SourceKey], ban_for: Duration) {
        let Ok(mut p) = self.pending_bans.lock() else {
            return;
        };
        for s in sources {
            if p.len() >= MAX_PENDING_BANS && !p.contains_key(s) {
                break;
            }
            let d = p.entry(*s).or_default();
            *d = (*d).max(ban_for);
        }
    }

    /// Takes the bans waiting for a sync.
    fn take_bans(&self) -> HashMap<SourceKey, Duration> {
        self.pending_bans
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Puts back bans a failed sync could not publish (newer ones win).
    fn return_bans(&self, bans: HashMap<SourceKey, Duration>) {
        if let Ok(mut p) = self.pending_bans.lock() {
            for (s, d) in bans {
                if p.len() < MAX_PENDING_BANS {
                    p.entry(s).or_insert(d);
                }
            }
        }
    }

    pub fn failures(&self, f: Failure) -> u64 {
        self.failures[f as usize].load(Relaxed)
    }

    /// What syncs cut from what Redis held, by reason, since start.
    pub fn dropped(&self, d: Dropped) -> u64 {
        self.dropped[d as usize].load(Relaxed)
    }

    fn drop_counts(&self, counts: &[u64; Dropped::ALL.len()]) {
        for (c, n) in self.dropped.iter().zip(counts) {
            c.fetch_add(*n, Relaxed);
        }
    }

    fn fail(&self, f: Failure) {
        self.failures[f as usize].fetch_add(1, Relaxed);
    }

    fn synced(&self) {
        self.syncs.fetch_add(1, Relaxed);
        if let Ok(mut t) = self.last_ok.lock() {
            *t = Some(Instant::now());
        }
    }

    /// How old the cluster view is: since the last good sync (or since start, before one).
    pub fn staleness(&self) -> Duration {
        let last = self.last_ok.lock().ok().and_then(|t| *t);
        last.unwrap_or(self.started).elapsed()
    }
}
