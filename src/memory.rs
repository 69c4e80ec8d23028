//! The kernel memory halfguard's sockets draw on: the kernel's TCP memory against `tcp_mem`,
//! and the memory cgroup halfguard runs in against its limit.
//!
//! A stalled connection costs more than a descriptor: the bytes queued toward a peer that
//! does not read sit in kernel memory, and that memory is a budget. Past `tcp_mem`'s
//! pressure value the kernel shrinks every socket's buffers, legitimate ones too; past its
//! high value it drops packets and kills orphans. Under a cgroup limit (a sidecar's
//! container), socket buffers are charged to the container (cgroup v2 always; v1 in
//! `memory.kmem.tcp.*` once a limit is set there), and at the limit the OOM killer picks a
//! process of it, possibly halfguard. Either is worth shedding stalled connections for
//! before it happens, which is what pressure mode does; this module only reads the state.
//!
//! Reads are two or three small files under `/proc` and a handful under `/sys/fs/cgroup`,
//! once a second. A file that is missing or does not parse leaves its part `None`: the
//! reading is never an error and never panics. The root the paths hang from is a
//! [`MemorySource`], `/` unless a test points it at a directory of fake files (Envoy's
//! "fake resource monitor" pattern).
//!
//! This is a leaf: it imports only the config (the `[pressure]` marks; `budget` cuts the
//! listeners' byte caps from the room it finds).

use std::path::{Path, PathBuf};

use crate::config::PressureConfig;

/// A v1 limit at or above this is "no limit": the kernel writes `PAGE_COUNTER_MAX` pages,
/// 9223372036854771712 on 4 KiB pages, a little under `i64::MAX`, never `u64::MAX`.
const V1_NO_LIMIT: u64 = 1 << 62;

/// Where the files are read from: `/` in production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySource {
    root: PathBuf,
}

impl Default for MemorySource {
    fn default() -> Self {
        MemorySource {
            root: PathBuf::from("/"),
        }
    }
}

/// What a reading found. Each part is `None` when its files are missing or unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryState {
    /// Pages the kernel has allocated to TCP sockets, every namespace of the host together
    /// (`/proc/net/sockstat`, `TCP: ... mem`).
    pub tcp_pages: Option<u64>,
    /// `net.ipv4.tcp_mem`, in pages: low, pressure, high.
    pub tcp_mem: Option<[u64; 3]>,
    /// Orphaned TCP sockets (closed by their process, still holding memory), this network
    /// namespace.
    pub orphans: Option<u64>,
    /// The bytes in one page (`sockstat` and `tcp_mem` count pages).
    pub page_size: u64,
    /// The memory cgroup nearest its limit: (usage, limit) in bytes, usage less the
    /// inactive file cache (what the kernel reclaims first, as the kubelet counts a
    /// container's working set). `None`: no limit on the way to the root.
    pub cgroup: Option<(u64, u64)>,
    /// cgroup v2: bytes of socket memory charged to halfguard's cgroup (`memory.stat`
    /// `sock`), which counts against `memory.max`.
    pub sockets: Option<u64>,
    /// cgroup v1: TCP memory against its own limit (`memory.kmem.tcp.*`), when one is set.
    pub tcp_cgroup: Option<(u64, u64)>,
}

/// What put memory pressure on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The kernel's TCP memory against `tcp_mem`.
    TcpMem,
    /// The cgroup's usage against its limit.
    Cgroup,
    /// cgroup v1: the cgroup's TCP memory against `memory.kmem.tcp.limit_in_bytes`.
    CgroupTcp,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::TcpMem => "tcp_mem",
            Cause::Cgroup => "cgroup",
            Cause::CgroupTcp => "cgroup_tcp",
        }
    }
}

/// What the server keeps between two readings: where to read, the last reading, and the
/// verdict it gave (the hysteresis needs it).
#[derive(Debug, Clone, Default)]
pub struct MemoryWatch {
    source: MemorySource,
    last: MemoryState,
    short: bool,
}

impl MemoryWatch {
    /// Where the next readings come from.
    pub fn set_source(&mut self, source: MemorySource) {
        self.source = source;
    }

    pub fn source(&self) -> &MemorySource {
        &self.source
    }

    /// Takes a reading (made without holding whatever guards this watch) and decides; a
    /// flip is logged here, once, not once per listener. Returns whether memory is short.
    pub fn update(&mut self, now: MemoryState, cfg: &PressureConfig) -> bool {
        let cause = now.cause(cfg, self.short);
        let short = cause.is_some();
        if short != self.short {
            let mib = |b: Option<u64>| b.map(|b| b >> 20);
            let cgroup = now
                .cgroup
                .map(|(u, l)| format!("{} of {} MiB", u >> 20, l >> 20));
            if let Some(cause) = cause {
                tracing::warn!(
                    cause = cause.as_str(),
                    tcp_mib = mib(now.tcp_bytes()),
                    tcp_mem_pressure_mib = mib(now.tcp_mem_bytes().map(|m| m[1])),
                    orphans = now.orphans,
                    cgroup = cgroup.as_deref(),
                    "memory pressure: every listener in pressure mode, clocks shortened"
                );
            } else {
                tracing::info!(
                    tcp_mib = mib(now.tcp_bytes()),
                    cgroup = cgroup.as_deref(),
                    "memory pressure over"
                );
            }
        }
        self.short = short;
        self.last = now;
        short
    }

    /// The last reading.
    pub fn last(&self) -> &MemoryState {
        &self.last
    }

    /// Whether the last reading found memory short.
    pub fn short(&self) -> bool {
        self.short
    }
}

impl MemorySource {
    /// Reads from `root` instead of `/`: `root/proc/net/sockstat`, `root/sys/fs/cgroup/...`.
    pub fn at(root: impl Into<PathBuf>) -> MemorySource {
        MemorySource { root: root.into() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    fn text(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }

    /// Reads the state now. Never fails: what cannot be read is `None`.
    pub fn read(&self) -> MemoryState {
        let sockstat = self.text("proc/net/sockstat");
        let tcp = sockstat.as_deref().and_then(parse_sockstat);
        let mut state = MemoryState {
            tcp_pages: tcp.and_then(|t| t.0),
            orphans: tcp.and_then(|t| t.1),
            tcp_mem: self
                .text("proc/sys/net/ipv4/tcp_mem")
                .as_deref()
                .and_then(parse_tcp_mem),
            page_size: page_size(),
            ..MemoryState::default()
        };
        match self
            .text("proc/self/cgroup")
            .as_deref()
            .and_then(parse_proc_cgroup)
        {
            Some(Membership::V1(path)) => {
                let base = self.path("sys/fs/cgroup/memory");
                state.cgroup = tightest(&base, &path, &V1_FILES);
                state.tcp_cgroup = tightest(&base, &path, &V1_TCP_FILES);
            }
            Some(Membership::V2(path)) => {
                let base = self.path("sys/fs/cgroup");
                state.cgroup = tightest(&base, &path, &V2_FILES);
                state.sockets = read(&base.join(rel(&path)).join("memory.stat"))
                    .and_then(|s| stat_value(&s, "sock"));
            }
            None => {}
        }
        state
    }
}

impl MemoryState {
    /// The kernel's TCP memory in bytes.
    pub fn tcp_bytes(&self) -> Option<u64> {
        self.tcp_pages.map(|p| p.saturating_mul(self.page_size))
    }

    /// `tcp_mem` in bytes: low, pressure, high.
    pub fn tcp_mem_bytes(&self) -> Option<[u64; 3]> {
        self.tcp_mem
            .map(|m| m.map(|p| p.saturating_mul(self.page_size)))
    }

    /// Whether memory is short, with hysteresis: off, one part above its high mark turns it
    /// on; on, it stays on until every part is at or below its low mark.
    pub fn under_pressure(&self, cfg: &PressureConfig, was_on: bool) -> bool {
        self.cause(cfg, was_on).is_some()
    }

    /// The first part above its mark (the high mark when `was_on` is false, the low one
    /// when it is true), if any.
    pub fn cause(&self, cfg: &PressureConfig, was_on: bool) -> Option<Cause> {
        let (mem, tcp) = if was_on {
            (cfg.memory_low, cfg.tcp_mem_low)
        } else {
            (cfg.memory_high, cfg.tcp_mem_high)
        };
        let over = |used: u64, limit: u64, f: f64| used as f64 > limit as f64 * f;
        if let (Some(used), Some(m)) = (self.tcp_pages, self.tcp_mem)
            && m[1] > 0
            && over(used, m[1], tcp)
        {
            return Some(Cause::TcpMem);
        }
        if let Some((used, limit)) = self.cgroup
            && over(used, limit, mem)
        {
            return Some(Cause::Cgroup);
        }
        if let Some((used, limit)) = self.tcp_cgroup
            && over(used, limit, mem)
        {
            return Some(Cause::CgroupTcp);
        }
        None
    }
}

/// Which memory cgroup a process is in, from `/proc/self/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// The v1 hierarchy holding the `memory` controller, and the path in it.
    V1(String),
    /// The v2 (unified) hierarchy, and the path in it.
    V2(String),
}

/// Parses `/proc/self/cgroup` (`hierarchy-id:controllers:path` per line). A v1 line naming
/// the `memory` controller wins over the v2 line: on a hybrid host the unified hierarchy is
/// mounted beside v1 but the memory controller stays with v1.
pub fn parse_proc_cgroup(text: &str) -> Option<Membership> {
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        if ctrl.split(',').any(|c| c == "memory") {
            return Some(Membership::V1(path.to_string()));
        }
        if id == "0" && ctrl.is_empty() {
            v2 = Some(Membership::V2(path.to_string()));
        }
    }
    v2
}

/// The `TCP:` line of `/proc/net/sockstat`: (`mem` in pages, `orphan`). `None` without a
/// `TCP:` line; a field missing or not a number is `None` on its own.
pub fn parse_sockstat(text: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        words
            .chunks(2)
            .find(|kv| kv[0] == name)
            .and_then(|kv| kv.get(1)?.parse().ok())
    };
    Some((field("mem"), field("orphan")))
}

/// `net.ipv4.tcp_mem`: exactly three numbers of pages, in order.
pub fn parse_tcp_mem(text: &str) -> Option<[u64; 3]> {
    let v: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    v.try_into().ok()
}

/// A limit file: `Some(Some(bytes))`, `Some(None)` for no limit (v2 `max`, a v1 value
/// near `i64::MAX`), `None` when it does not parse.
pub fn parse_limit(text: &str) -> Option<Option<u64>> {
    let t = text.trim();
    if t == "max" {
        return Some(None);
    }
    let v: u64 = t.parse().ok()?;
    Some((v < V1_NO_LIMIT).then_some(v))
}

/// One `key value` line of a `memory.stat`.
pub fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The files a hierarchy keeps a cgroup's limit, usage and reclaimable cache in.
struct Files {
    limit: &'static str,
    usage: &'static str,
    /// `memory.stat` keys of the inactive file cache, subtracted from usage; the first
    /// present is taken (v1's `total_` one counts the descendants too).
    inactive: &'static [&'static str],
}

const V2_FILES: Files = Files {
    limit: "memory.max",
    usage: "memory.current",
    inactive: &["inactive_file"],
};

const V1_FILES: Files = Files {
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    inactive: &["total_inactive_file", "inactive_file"],
};

/// Socket buffers are not file cache: nothing to subtract.
const V1_TCP_FILES: Files = Files {
    limit: "memory.kmem.tcp.limit_in_bytes",
    usage: "memory.kmem.tcp.usage_in_bytes",
    inactive: &[],
};

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// A cgroup path relative to its hierarchy's mount point.
fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// Of the cgroup at `path` and its ancestors, the one with a limit whose usage is the
/// largest share of it: a limit set on a parent (a pod, a systemd slice) binds the leaf as
/// well. Ancestors not visible in this mount (a container sees its own cgroup as the
/// root) are skipped, the root is always looked at.
fn tightest(base: &Path, path: &str, files: &Files) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64)> = None;
    let mut p = rel(path);
    loop {
        let dir = base.join(p);
        if let Some(Some(limit)) = read(&dir.join(files.limit))
            .as_deref()
            .and_then(parse_limit)
            && limit > 0
            && let Some(usage) = read(&dir.join(files.usage)).and_then(|s| s.trim().parse().ok())
        {
            let stat = read(&dir.join("memory.stat")).unwrap_or_default();
            let inactive = files
                .inactive
                .iter()
                .find_map(|k| stat_value(&stat, k))
                .unwrap_or(0);
            let used: u64 = u64::saturating_sub(usage, inactive);
            let share = |(u, l): (u64, u64)| u as f64 / l as f64;
            if best.is_none_or(|b| share((used, limit)) > share(b)) {
                best = Some((used, limit));
            }
        }
        if p.is_empty() {
            return best;
        }
        p = p.rsplit_once('/').map_or("", |(parent, _)| parent);
    }
}

/// The page size `sockstat` and `tcp_mem` count in.
#[allow(unsafe_code)]
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is handed over.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

pub mod budget;
pub mod peer;

#[cfg(test)]
mod tests;
