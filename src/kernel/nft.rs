//! halfguard's own nftables table: per-source SYN rate and concurrent caps on the listening
//! ports, and a timed drop set fed with sources that keep hitting caps.
//!
//! Rules go in as text through `nft -f -` (no C library, no GPL crate). Loading is one
//! transaction that first declares and deletes the table, so a stale table left by a
//! crashed run is replaced, and a reload swaps the rules atomically. The table is deleted on
//! exit. Only this table is ever touched.

use std::io::{self, Write};
use std::process::{Command, Stdio};

use crate::config::KernelConfig;
use crate::guard::SourceKey;

/// The table's name, in the `inet` family (IPv4 and IPv6 at once).
pub const TABLE: &str = "halfguard";

/// The ruleset for listening `ports`.
pub fn ruleset(ports: &[u16], k: &KernelConfig) -> String {
    let ports = if ports.is_empty() {
        "0".to_string()
    } else {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rules = vec![
        format!("tcp dport {{ {ports} }} ip saddr @ban4 counter drop"),
        format!("tcp dport {{ {ports} }} ip6 saddr @ban6 counter drop"),
    ];
    if k.syn_rate_per_source > 0 {
        for (set, addr) in [("syn4", "ip saddr"), ("syn6", "ip6 saddr")] {
            rules.push(format!(
                "tcp dport {{ {ports} }} tcp flags & (fin | syn | rst | ack) == syn add @{set} {{ {addr} limit rate over {}/second burst {} packets }} counter drop",
                k.syn_rate_per_source, k.syn_burst_per_source
            ));
        }
    }
    if k.max_conns_per_source > 0 {
        for (set, addr) in [("conn4", "ip saddr"), ("conn6", "ip6 saddr")] {
            rules.push(format!(
                "tcp dport {{ {ports} }} ct state new add @{set} {{ {addr} ct count over {} }} counter drop",
                k.max_conns_per_source
            ));
        }
    }
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \x20 set ban4 {{ type ipv4_addr; flags interval, timeout; }}\n\
         \x20 set ban6 {{ type ipv6_addr; flags interval, timeout; }}\n\
         \x20 set syn4 {{ type ipv4_addr; size 65535; flags dynamic, timeout; timeout 60s; }}\n\
         \x20 set syn6 {{ type ipv6_addr; size 65535; flags dynamic, timeout; timeout 60s; }}\n\
         \x20 set conn4 {{ type ipv4_addr; size 65535; flags dynamic; }}\n\
         \x20 set conn6 {{ type ipv6_addr; size 65535; flags dynamic; }}\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter - 5; policy accept;\n\
         {}\n\
         \x20 }}\n\
         }}\n",
        rules
            .iter()
            .map(|r| format!("    {r}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> io::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Installs (or atomically replaces) the table.
pub fn install(ports: &[u16], k: &KernelConfig) -> io::Result<()> {
    nft(&ruleset(ports, k))
}

/// Deletes the table, if there is one.
pub fn remove() -> io::Result<()> {
    nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

/// Puts `sources` in the drop set for `secs` seconds.
pub fn ban(sources: &[SourceKey], secs: u64) -> io::Result<()> {
    let (v4, v6): (Vec<&SourceKey>, Vec<&SourceKey>) =
        sources.iter().partition(|k| k.addr().is_ipv4());
    let mut script = String::new();
    for (set, keys) in [("ban4", v4), ("ban6", v6)] {
        if keys.is_empty() {
            continue;
        }
        let elems: Vec<String> = keys
            .iter()
            .map(|k| format!("{}/{} timeout {secs}s", k.addr(), k.prefix()))
            .collect();
        script.push_str(&format!(
            "add element inet {TABLE} {set} {{ {} }}\n",
            elems.join(", ")
        ));
    }
    if script.is_empty() {
        return Ok(());
    }
    nft(&script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_replaces_itself_and_covers_the_ports() {
        let k = KernelConfig {
            enforce: true,
            max_conns_per_source: 32,
            ..KernelConfig::default()
        };
        let r = ruleset(&[18080, 18443], &k);
        assert!(r.starts_with("table inet halfguard\ndelete table inet halfguard\n"));
        assert!(r.contains("tcp dport { 18080, 18443 } ip saddr @ban4 counter drop"));
        assert!(r.contains("limit rate over 20/second burst 40 packets"));
        assert!(r.contains("ct count over 32"));
        let off = KernelConfig {
            syn_rate_per_source: 0,
            ..KernelConfig::default()
        };
        assert!(!ruleset(&[1], &off).contains("limit rate"));
        assert!(!ruleset(&[1], &off).contains("ct count"));
    }
}
