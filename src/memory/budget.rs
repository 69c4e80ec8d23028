//! The byte caps cut from the memory halfguard may pin: `limits.max_queued` lowered to fit
//! the container's memory limit and the kernel's TCP memory, as `crate::fds` lowers
//! `max_conns` to fit the open-files limit.
//!
//! What a client that stops reading pins is kernel memory: on cgroup v2 it is charged to
//! the container, so a sidecar whose listeners may queue more than its memory limit is one
//! flood away from reclaim or the OOM killer; on the host, `tcp_mem`'s pressure mark is where
//! the kernel starts shrinking every socket's buffers. The room the listeners' byte caps
//! share is the least of:
//!
//! - a quarter of the tightest cgroup memory limit on the way to the root (the rest is
//!   halfguard's own memory, the kernel's per-buffer overhead the counts do not see, and
//!   spare);
//! - half of the cgroup v1 TCP limit (`memory.kmem.tcp.limit_in_bytes`), when one is set;
//! - an eighth of `tcp_mem`'s pressure mark: other processes on the host need TCP memory too.
//!
//! When the configured caps add up to more, each listener keeps its share of the room, and its
//! per-source cap shrinks in the same proportion; the operator is told once, as for
//! descriptors. A cap of 0 (none) is the operator's choice and is left alone. With the shipped
//! defaults (64 MiB per listener) nothing is lowered under a 256 MiB limit or on a host with
//! 512 MiB of `tcp_mem` pressure mark; under 128 MiB a lone listener gets 32 MiB.
//!
//! The plan is made at start and at each reload, from a reading of the memory state.

use std::fmt;

use super::MemoryState;
use crate::config::{Config, Limits, ListenerConfig};

/// Of a cgroup memory limit, the share the byte caps may take together.
const CGROUP_SHARE: u64 = 4;
/// Of a cgroup v1 TCP limit, the share the byte caps may take together.
const CGROUP_TCP_SHARE: u64 = 2;
/// Of `tcp_mem`'s pressure mark, the share the byte caps may take together.
const TCP_MEM_SHARE: u64 = 8;

/// What bounds the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    Cgroup,
    CgroupTcp,
    TcpMem,
}

impl Basis {
    fn describe(self) -> &'static str {
        match self {
            Basis::Cgroup => "a quarter of the cgroup memory limit",
            Basis::CgroupTcp => "half of the cgroup's TCP memory limit",
            Basis::TcpMem => "an eighth of net.ipv4.tcp_mem's pressure mark",
        }
    }
}

/// One listener's byte caps, configured and applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueShare {
    pub name: String,
    pub configured: u64,
    pub effective: u64,
    pub per_source_configured: u64,
    pub per_source_effective: u64,
}

/// The byte caps in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueBudget {
    /// The bytes the listeners' caps may take together, and what set it; `None`: nothing to
    /// go by (no limit found), the caps stand as configured.
    pub room: Option<(u64, Basis)>,
    pub listeners: Vec<QueueShare>,
}

impl QueueBudget {
    /// The caps of `config`'s listeners within the room `state` leaves.
    pub fn plan(config: &Config, state: &MemoryState) -> QueueBudget {
        let room = room(state);
        let total: u64 = config
            .listeners
            .iter()
            .map(|l| l.limits.max_queued)
            .fold(0, u64::saturating_add);
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let lim = &l.limits;
                let mut s = QueueShare {
                    name: l.name.clone(),
                    configured: lim.max_queued,
                    effective: lim.max_queued,
                    per_source_configured: lim.max_queued_per_source,
                    per_source_effective: lim.max_queued_per_source,
                };
                if let Some((room, _)) = room
                    && total > room
                    && lim.max_queued > 0
                {
                    s.effective = scale(lim.max_queued, room, total);
                    if lim.max_queued_per_source > 0 {
                        s.per_source_effective = scale(lim.max_queued_per_source, room, total);
                    }
                }
                s
            })
            .collect();
        QueueBudget { room, listeners }
    }

    /// `lim` (listener `l`'s, as the descriptor budget left them) with its byte caps as
    /// applied.
    pub fn fit(&self, l: &ListenerConfig, mut lim: Limits) -> Limits {
        if let Some(s) = self.listeners.iter().find(|s| s.name == l.name) {
            lim.max_queued = s.effective;
            lim.max_queued_per_source = s.per_source_effective;
        }
        lim
    }

    /// What the operator should hear, once: a line per lowered listener.
    pub fn warnings(&self) -> Vec<String> {
        let Some((room, basis)) = self.room else {
            return Vec::new();
        };
        self.listeners
            .iter()
            .filter(|s| s.effective < s.configured)
            .map(|s| {
                format!(
                    "listener {:?}: limits.max_queued {} lowered to {} (max_queued_per_source {} to {}): \
                     the listeners' byte caps share {} bytes, {}; raise the memory limit or lower the caps",
                    s.name,
                    s.configured,
                    s.effective,
                    s.per_source_configured,
                    s.per_source_effective,
                    room,
                    basis.describe()
                )
            })
            .collect()
    }
}

impl fmt::Display for QueueBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.room {
            Some((room, basis)) => write!(
                f,
                "byte caps: {} MiB to share ({})",
                room >> 20,
                basis.describe()
            )?,
            None => write!(f, "byte caps: no memory limit found")?,
        }
        for (i, s) in self.listeners.iter().enumerate() {
            let sep = if i == 0 { ": " } else { ", " };
            write!(f, "{sep}{:?} max_queued {} MiB", s.name, s.effective >> 20)?;
        }
        Ok(())
    }
}

/// The least of what each limit found leaves, and which one it was.
fn room(state: &MemoryState) -> Option<(u64, Basis)> {
    [
        state.cgroup.map(|(_, l)| (l / CGROUP_SHARE, Basis::Cgroup)),
        state
            .tcp_cgroup
            .map(|(_, l)| (l / CGROUP_TCP_SHARE, Basis::CgroupTcp)),
        state
            .tcp_mem_bytes()
            .map(|m| (m[1] / TCP_MEM_SHARE, Basis::TcpMem)),
    ]
    .into_iter()
    .flatten()
    .min_by_key(|(b, _)| *b)
}

/// `v`'s share of `room` among caps adding up to `total` (never 0, which means no cap).
fn scale(v: u64, room: u64, total: u64) -> u64 {
    let s = u128::from(v) * u128::from(room) / u128::from(total.max(1));
    u64::try_from(s).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn config(caps: &[(u64, u64)]) -> Config {
        let mut text = String::new();
        for (i, (max, per)) in caps.iter().enumerate() {
            text += &format!(
                "[[listeners]]\nname = \"l{i}\"\nbind = \"127.0.0.1:{}\"\nbackends = [\"127.0.0.1:9\"]\n[listeners.limits]\nmax_queued = {max}\nmax_queued_per_source = {per}\n",
                17100 + i
            );
        }
        crate::config::parse(&text, "t.toml", std::collections::HashMap::new()).expect("valid")
    }

    fn state(cgroup: Option<u64>, tcp_cgroup: Option<u64>, tcp_mem: Option<u64>) -> MemoryState {
        MemoryState {
            cgroup: cgroup.map(|l| (0, l)),
            tcp_cgroup: tcp_cgroup.map(|l| (0, l)),
            tcp_mem: tcp_mem.map(|p| [p / 4096, p / 4096, p / 4096]),
            page_size: 4096,
            ..MemoryState::default()
        }
    }

    #[test]
    fn the_shipped_caps_fit_a_256_mib_sidecar_and_shrink_in_a_128_mib_one() {
        let c = config(&[(64 * MIB, 16 * MIB)]);
        let fits = QueueBudget::plan(&c, &state(Some(256 * MIB), None, Some(1536 * MIB)));
        assert_eq!(fits.room, Some((64 * MIB, Basis::Cgroup)));
        assert_eq!(fits.listeners[0].effective, 64 * MIB);
        assert!(fits.warnings().is_empty());
        let small = QueueBudget::plan(&c, &state(Some(128 * MIB), None, Some(1536 * MIB)));
        let lim = small.fit(&c.listeners[0], c.listeners[0].limits.clone());
        assert_eq!(
            (lim.max_queued, lim.max_queued_per_source),
            (32 * MIB, 8 * MIB)
        );
        let w = small.warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("limits.max_queued") && w[0].contains("cgroup"),
            "{w:?}"
        );
    }

    #[test]
    fn listeners_share_the_tightest_room_and_a_cap_of_none_stays_none() {
        // No cgroup: an eighth of tcp_mem's pressure mark (64 MiB) for 64 + 32 + none.
        let c = config(&[(64 * MIB, 16 * MIB), (32 * MIB, 0), (0, 0)]);
        let b = QueueBudget::plan(&c, &state(None, None, Some(512 * MIB)));
        assert_eq!(b.room, Some((64 * MIB, Basis::TcpMem)));
        let eff: Vec<_> = b
            .listeners
            .iter()
            .map(|s| (s.effective, s.per_source_effective))
            .collect();
        assert_eq!(
            eff,
            [
                (64 * MIB * 2 / 3, 16 * MIB * 2 / 3),
                (32 * MIB * 2 / 3, 0),
                (0, 0)
            ]
        );
        // A v1 TCP limit tighter than both.
        let b = QueueBudget::plan(&c, &state(Some(1 << 40), Some(48 * MIB), Some(512 * MIB)));
        assert_eq!(b.room, Some((24 * MIB, Basis::CgroupTcp)));
    }

    #[test]
    fn nothing_to_go_by_leaves_the_caps_as_configured() {
        let c = config(&[(64 * MIB, 16 * MIB)]);
        let b = QueueBudget::plan(&c, &MemoryState::default());
        assert_eq!(b.room, None);
        assert_eq!(b.listeners[0].effective, 64 * MIB);
        assert!(b.warnings().is_empty());
        assert!(b.to_string().contains("no memory limit"));
    }
}
