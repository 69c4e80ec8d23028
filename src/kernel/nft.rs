//! halfguard's own nftables table: per-source SYN rate and concurrent caps on the listening
//! ports, and a timed drop set fed with sources that keep hitting their own caps.
//!
//! The rules agree with the proxy: each listener's rules count sources by the listener's
//! `ipv4_prefix` and `ipv6_prefix`, its `limits.allow` (and, with `accept_proxy`, its
//! `trusted_proxies`) are exempt from every rule, and a source tracker holds as many
//! sources as the listener's `max_sources`. A SYN-rate entry lives until its bucket would be
//! full again after the source's last SYN (no longer has nothing to remember), so one-shot
//! spoofed SYNs leave the set within seconds. When a set is full all the same, the sources
//! it has no room for share one limit (`untracked_syn_rate`) instead of passing unlimited.
//!
//! The drop set is one set per family and prefix length ([`BanSet`]): a ban is a source key,
//! and listeners key sources by prefixes of their own. In one interval set a /24 ban and a
//! /32 ban inside it overlap, and nft refuses the second; and a /24 earned on a listener
//! that counts per /24 would drop 256 separate sources on a listener that counts per /32.
//! So each set holds masked addresses of one length (its elements never overlap), and a
//! listener drops the bans as long as its own prefix or longer: a host banned elsewhere is
//! dropped everywhere, a network only where networks are the unit. An IPv4 ban also drops
//! the client through a NAT64 translator (`64:ff9b::/96`), as the guard keys it.
//!
//! Rules go in as text through `nft -f -` (no C library, no GPL crate). Loading is one
//! transaction that first declares and deletes the table, so a stale table left by a
//! crashed run is replaced, and a reload swaps the rules atomically; the drop set's live
//! entries are written into the same transaction, so a reload never lifts a ban. Only this
//! table is ever touched. `nft` is a child process that blocks: callers run it off the
//! async workers.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use crate::config::KernelConfig;
use crate::guard::SourceKey;

/// The table's name, in the `inet` family (IPv4 and IPv6 at once).
pub const TABLE: &str = "halfguard";

/// The named counters the drop rules count into, read back for the metrics.
pub const COUNTERS: [&str; 4] = ["ban", "syn_rate", "conns", "untracked"];

/// One listening port as the rules see it: the listener's source prefixes and exemptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub port: u16,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// The size of each per-source set.
    pub max_sources: u32,
    /// `limits.allow`, and `trusted_proxies` when the listener accepts the PROXY protocol.
    pub exempt: Vec<IpNet>,
}

/// An IPv4-mapped IPv6 prefix as the IPv4 prefix it is (packets carry IPv4 addresses).
fn unmapped(n: &IpNet) -> IpNet {
    if let IpNet::V6(v6) = n
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(net) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(net);
    }
    *n
}

/// `ip saddr`, masked to `prefix` when it is shorter than the address.
fn key(v6: bool, prefix: u8) -> String {
    let (field, bits) = if v6 {
        ("ip6 saddr", 128)
    } else {
        ("ip saddr", 32)
    };
    if prefix >= bits {
        return field.to_string();
    }
    let shift = u32::from(bits - prefix);
    let mask: IpAddr = if v6 {
        IpAddr::V6(u128::MAX.checked_shl(shift).unwrap_or(0).into())
    } else {
        IpAddr::V4(u32::MAX.checked_shl(shift).unwrap_or(0).into())
    };
    format!("{field} & {mask}")
}

/// What a drop set holds: sources of one family, or IPv4 sources as a NAT64 translator
/// writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BanKind {
    V4,
    V6,
    Nat64,
}

/// A drop set: the banned sources of one kind and one prefix length, as masked addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BanSet {
    pub kind: BanKind,
    /// The source key's prefix (for [`BanKind::Nat64`], the IPv4 prefix).
    pub prefix: u8,
}

impl BanSet {
    pub fn name(self) -> String {
        let kind = match self.kind {
            BanKind::V4 => "4",
            BanKind::V6 => "6",
            BanKind::Nat64 => "64",
        };
        format!("ban{kind}_{}", self.prefix)
    }

    /// The packet's source, masked as the set's elements are.
    fn source(self) -> String {
        match self.kind {
            BanKind::V4 => key(false, self.prefix),
            BanKind::V6 => key(true, self.prefix),
            BanKind::Nat64 => key(true, 96 + self.prefix.min(32)),
        }
    }

    fn family(self) -> &'static str {
        match self.kind {
            BanKind::V4 => "ipv4_addr",
            BanKind::V6 | BanKind::Nat64 => "ipv6_addr",
        }
    }

    /// The sets a ban of `source` goes into, with its element in each.
    pub fn of(source: &SourceKey) -> Vec<(BanSet, IpAddr)> {
        let prefix = source.prefix();
        match source.nat64_addr() {
            Some(nat64) => vec![
                (
                    BanSet {
                        kind: BanKind::V4,
                        prefix,
                    },
                    source.addr(),
                ),
                (
                    BanSet {
                        kind: BanKind::Nat64,
                        prefix,
                    },
                    IpAddr::V6(nat64),
                ),
            ],
            None => vec![(
                BanSet {
                    kind: BanKind::V6,
                    prefix,
                },
                source.addr(),
            )],
        }
    }

    /// Whether listener `t` drops what this set holds: bans as long as the prefix the
    /// listener keys that family by, or longer.
    fn applies_to(self, t: &Target) -> bool {
        self.prefix
            >= match self.kind {
                BanKind::V4 | BanKind::Nat64 => t.ipv4_prefix,
                BanKind::V6 => t.ipv6_prefix,
            }
    }
}

/// The drop sets a table has: one per prefix a listener keys sources by, in each kind, and
/// one per prefix of a live ban (a reload may have changed the listener that earned it).
pub fn ban_sets<'a>(
    targets: &[Target],
    bans: impl IntoIterator<Item = &'a SourceKey>,
) -> BTreeSet<BanSet> {
    let mut sets = BTreeSet::new();
    for t in targets {
        for (kind, prefix) in [
            (BanKind::V4, t.ipv4_prefix),
            (BanKind::Nat64, t.ipv4_prefix),
            (BanKind::V6, t.ipv6_prefix),
        ] {
            sets.insert(BanSet { kind, prefix });
        }
    }
    for b in bans {
        sets.extend(BanSet::of(b).into_iter().map(|(s, _)| s));
    }
    sets
}

/// How long a SYN-rate entry outlives its source's last SYN: until its bucket would be full
/// again, after which a fresh entry is the same thing.
pub fn syn_entry_secs(k: &KernelConfig) -> u64 {
    let rate = u64::from(k.syn_rate_per_source.max(1));
    u64::from(k.syn_burst_per_source).div_ceil(rate) + 1
}

/// The ruleset for `targets`, with `bans` (source, seconds left) already in the drop set.
pub fn ruleset(targets: &[Target], k: &KernelConfig, bans: &[(SourceKey, u64)]) -> String {
    const SYN: &str = "tcp flags & (fin | syn | rst | ack) == syn";
    let ban_sets = ban_sets(targets, bans.iter().map(|(s, _)| s));
    let mut sets: Vec<String> = ban_sets
        .iter()
        .map(|b| format!("set {} {{ type {}; flags timeout; }}", b.name(), b.family()))
        .collect();
    let mut rules = Vec::new();
    let untracked = (k.untracked_syn_rate > 0).then(|| {
        format!(
            "limit rate over {}/second burst {} packets counter name \"untracked\" drop",
            k.untracked_syn_rate,
            u64::from(k.untracked_syn_rate) * 2
        )
    });
    for (i, t) in targets.iter().enumerate() {
        let dport = format!("tcp dport {}", t.port);
        for (v6, family, addr) in [(false, "ipv4_addr", "ip"), (true, "ipv6_addr", "ip6")] {
            let f = if v6 { 6 } else { 4 };
            let exempt: Vec<String> = t
                .exempt
                .iter()
                .map(unmapped)
                .filter(|n| matches!(n, IpNet::V6(_)) == v6)
                .map(|n| n.trunc().to_string())
                .collect();
            if !exempt.is_empty() {
                sets.push(format!(
                    "set allow{f}_{i} {{ type {family}; flags interval; auto-merge; elements = {{ {} }}; }}",
                    exempt.join(", ")
                ));
                rules.push(format!("{dport} {addr} saddr @allow{f}_{i} return"));
            }
            for b in ban_sets
                .iter()
                .filter(|b| (b.kind != BanKind::V4) == v6 && b.applies_to(t))
            {
                rules.push(format!(
                    "{dport} {} @{} counter name \"ban\" drop",
                    b.source(),
                    b.name()
                ));
            }
            let src = key(v6, if v6 { t.ipv6_prefix } else { t.ipv4_prefix });
            let size = t.max_sources.max(1);
            if k.syn_rate_per_source > 0 {
                sets.push(format!(
                    "set syn{f}_{i} {{ type {family}; size {size}; flags dynamic, timeout; timeout {}s; }}",
                    syn_entry_secs(k)
                ));
                // `update` restarts the entry's timeout at every SYN.
                rules.push(format!(
                    "{dport} {SYN} update @syn{f}_{i} {{ {src} limit rate over {}/second burst {} packets }} counter name \"syn_rate\" drop",
                    k.syn_rate_per_source, k.syn_burst_per_source
                ));
                if let Some(u) = &untracked {
                    rules.push(format!("{dport} {SYN} {src} != @syn{f}_{i} {u}"));
                }
            }
            if k.max_conns_per_source > 0 {
                sets.push(format!(
                    "set conn{f}_{i} {{ type {family}; size {size}; flags dynamic; }}"
                ));
                rules.push(format!(
                    "{dport} ct state new add @conn{f}_{i} {{ {src} ct count over {} }} counter name \"conns\" drop",
                    k.max_conns_per_source
                ));
                if let Some(u) = &untracked {
                    rules.push(format!(
                        "{dport} {SYN} ct state new {src} != @conn{f}_{i} {u}"
                    ));
                }
            }
        }
    }
    let counters: Vec<String> = COUNTERS
        .iter()
        .map(|c| format!("counter {c} {{ }}"))
        .collect();
    let mut script = format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         {}\n\
         {}\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter - 5; policy accept;\n\
         {}\n\
         \x20 }}\n\
         }}\n",
        counters
            .iter()
            .map(|c| format!("  {c}"))
            .collect::<Vec<_>>()
            .join("\n"),
        sets.iter()
            .map(|s| format!("  {s}"))
            .collect::<Vec<_>>()
            .join("\n"),
        rules
            .iter()
            .map(|r| format!("    {r}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    script.push_str(&ban_script(bans));
    script
}

/// Runs `nft -f -` with `script`. Blocking.
fn nft(script: &str) -> io::Result<String> {
    nft_args(&["-f", "-"], script)
}

fn nft_args(args: &[&str], script: &str) -> io::Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        // Errors are matched on (a missing table): keep them in English.
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Installs (or atomically replaces) the table, bans included. Blocking.
pub fn install(targets: &[Target], k: &KernelConfig, bans: &[(SourceKey, u64)]) -> io::Result<()> {
    nft(&ruleset(targets, k, bans)).map(|_| ())
}

/// Deletes the table: `Ok(true)` when there was one, `Ok(false)` when there was none.
/// Blocking.
pub fn remove() -> io::Result<bool> {
    match nft(&format!("delete table inet {TABLE}\n")) {
        Ok(_) => Ok(true),
        Err(e) if e.to_string().contains("No such file or directory") => Ok(false),
        Err(e) => Err(e),
    }
}

fn ban_script(bans: &[(SourceKey, u64)]) -> String {
    let mut by_set: std::collections::BTreeMap<BanSet, Vec<String>> = Default::default();
    for (k, secs) in bans {
        for (set, elem) in BanSet::of(k) {
            by_set
                .entry(set)
                .or_default()
                .push(format!("{elem} timeout {}s", secs.max(&1)));
        }
    }
    by_set
        .into_iter()
        .map(|(set, elems)| {
            format!(
                "add element inet {TABLE} {} {{ {} }}\n",
                set.name(),
                elems.join(", ")
            )
        })
        .collect()
}

/// Puts `sources` in the drop set for `secs` seconds. Blocking.
pub fn ban(sources: &[SourceKey], secs: u64) -> io::Result<()> {
    let bans: Vec<(SourceKey, u64)> = sources.iter().map(|s| (*s, secs)).collect();
    let script = ban_script(&bans);
    if script.is_empty() {
        return Ok(());
    }
    nft(&script).map(|_| ())
}

/// The named counters' packet counts, in [`COUNTERS`] order. Blocking.
pub fn counters() -> io::Result<[u64; COUNTERS.len()]> {
    let out = nft_args(&["-j", "list", "counters", "table", "inet", TABLE], "")?;
    Ok(parse_counters(&out))
}

fn parse_counters(json: &str) -> [u64; COUNTERS.len()] {
    let mut got = [0u64; COUNTERS.len()];
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return got;
    };
    for item in v["nftables"].as_array().into_iter().flatten() {
        let c = &item["counter"];
        if let (Some(name), Some(packets)) = (c["name"].as_str(), c["packets"].as_u64())
            && let Some(i) = COUNTERS.iter().position(|n| *n == name)
        {
            got[i] = packets;
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(exempt: &[&str]) -> Target {
        Target {
            port: 18080,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            max_sources: 1000,
            exempt: exempt.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn the_ruleset_agrees_with_the_listener() {
        let k = KernelConfig {
            enforce: true,
            max_conns_per_source: 32,
            ..KernelConfig::default()
        };
        let t = [target(&[
            "198.18.0.0/24",
            "::ffff:198.18.1.0/120",
            "2001:2::/48",
        ])];
        let ban: SourceKey = SourceKey::new("198.18.9.9".parse().unwrap(), 32, 64);
        let r = ruleset(&t, &k, &[(ban, 30)]);
        assert!(r.starts_with("table inet halfguard\ndelete table inet halfguard\n"));
        // Exempt first, in both families (the mapped prefix as IPv4).
        assert!(
            r.contains("elements = { 198.18.0.0/24, 198.18.1.0/24 }"),
            "{r}"
        );
        assert!(r.contains("elements = { 2001:2::/48 }"), "{r}");
        let allow = r.find("@allow4_0 return").unwrap();
        assert!(allow < r.find("@ban4_24").unwrap());
        // Counted per /24 and per /64, refreshed per SYN, sized by max_sources.
        assert!(r.contains("update @syn4_0 { ip saddr & 255.255.255.0 limit rate over 20/second burst 40 packets }"), "{r}");
        assert!(
            r.contains("ip6 saddr & ffff:ffff:ffff:ffff:: limit rate"),
            "{r}"
        );
        assert!(
            r.contains("size 1000; flags dynamic, timeout; timeout 3s;"),
            "{r}"
        );
        assert!(r.contains("ct count over 32"));
        // Sources a full set has no room for share one limit.
        assert!(
            r.contains("ip saddr & 255.255.255.0 != @syn4_0 limit rate over 1000/second"),
            "{r}"
        );
        // Live bans go into the same transaction.
        assert!(
            r.ends_with(
                "add element inet halfguard ban4_32 { 198.18.9.9 timeout 30s }\n\
                 add element inet halfguard ban64_32 { 64:ff9b::c612:909 timeout 30s }\n"
            ),
            "{r}"
        );
        let off = KernelConfig {
            syn_rate_per_source: 0,
            ..KernelConfig::default()
        };
        let r = ruleset(&[target(&[])], &off, &[]);
        assert!(!r.contains("limit rate") && !r.contains("ct count") && !r.contains("@allow"));
    }

    /// Listeners that key sources by different prefixes: a ban of one length never lands in
    /// another's set (no overlap for nft to refuse), and a listener drops only bans as long
    /// as its own prefix or longer (a /24 never drops a /32 listener's 256 sources).
    #[test]
    fn bans_go_in_one_set_per_prefix_and_drop_at_the_listeners_prefix_or_longer() {
        let k = KernelConfig {
            enforce: true,
            ..KernelConfig::default()
        };
        let host = Target {
            port: 18080,
            ipv4_prefix: 32,
            ..target(&[])
        };
        let net = Target {
            port: 18081,
            ipv4_prefix: 24,
            ..target(&[])
        };
        let h: SourceKey = SourceKey::new("198.18.0.5".parse().unwrap(), 32, 64);
        let n: SourceKey = SourceKey::new("198.18.0.5".parse().unwrap(), 24, 64);
        let v6: SourceKey = SourceKey::new("2001:2::1".parse().unwrap(), 32, 64);
        let r = ruleset(&[host, net], &k, &[(h, 30), (n, 20), (v6, 10)]);
        for set in ["ban4_32", "ban4_24", "ban64_32", "ban64_24", "ban6_64"] {
            assert!(
                r.contains(&format!("set {set} {{ type ")),
                "{set} declared: {r}"
            );
        }
        assert!(!r.contains("interval, timeout"), "{r}");
        let drops = |port: u16| -> Vec<&str> {
            r.lines()
                .map(str::trim)
                .filter(|l| l.starts_with(&format!("tcp dport {port} ")) && l.contains("\"ban\""))
                .collect()
        };
        assert_eq!(
            drops(18080),
            [
                "tcp dport 18080 ip saddr @ban4_32 counter name \"ban\" drop",
                "tcp dport 18080 ip6 saddr & ffff:ffff:ffff:ffff:: @ban6_64 counter name \"ban\" drop",
                "tcp dport 18080 ip6 saddr @ban64_32 counter name \"ban\" drop",
            ]
        );
        assert_eq!(
            drops(18081),
            [
                "tcp dport 18081 ip saddr & 255.255.255.0 @ban4_24 counter name \"ban\" drop",
                "tcp dport 18081 ip saddr @ban4_32 counter name \"ban\" drop",
                "tcp dport 18081 ip6 saddr & ffff:ffff:ffff:ffff:: @ban6_64 counter name \"ban\" drop",
                "tcp dport 18081 ip6 saddr & ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00 @ban64_24 counter name \"ban\" drop",
                "tcp dport 18081 ip6 saddr @ban64_32 counter name \"ban\" drop",
            ]
        );
        for elem in [
            "ban4_32 { 198.18.0.5 timeout 30s }",
            "ban4_24 { 198.18.0.0 timeout 20s }",
            "ban64_24 { 64:ff9b::c612:0 timeout 20s }",
            "ban6_64 { 2001:2:: timeout 10s }",
        ] {
            assert!(r.contains(elem), "{elem}: {r}");
        }
    }

    #[test]
    fn counters_are_read_by_name() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"counter": {"family": "inet", "name": "syn_rate", "table": "halfguard", "packets": 12, "bytes": 720}}, {"counter": {"name": "ban", "packets": 3, "bytes": 1}}]}"#;
        assert_eq!(parse_counters(json), [3, 12, 0, 0]);
        assert_eq!(parse_counters("garbage"), [0; 4]);
    }
}
