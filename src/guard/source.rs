//! Source keys: a client address aggregated to the prefix that one party controls.
//!
//! Counting per address would let one IPv6 host open a connection from each of its 2^64
//! addresses, so sources are keyed by prefix (IPv4 /32 and IPv6 /64 by default). An
//! IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack listener reports) is the
//! IPv4 client it wraps and is keyed as such, so it cannot dodge the IPv4 caps.
//!
//! So is an address in the well-known NAT64 prefix `64:ff9b::/96` (RFC 6052): a translator
//! in front of an IPv6-only service writes every IPv4 client as `64:ff9b::` plus its IPv4
//! address, so keyed per /64 they would all be one source, one cap for the whole IPv4
//! Internet. The local-use prefix `64:ff9b:1::/48` (RFC 8215) is left as IPv6: a network
//! carves translation prefixes of its own length out of it (/64 and /96 are both seen), so
//! where the IPv4 address sits cannot be read from the address alone.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A source: an address masked to its prefix. Never used as a metric label.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
pub struct SourceKey {
    addr: IpAddr,
    prefix: u8,
}

/// One write of the whole key: the derived hash made four (the address family, the octets'
/// length, the octets, the prefix), each a round of the tables' keyed SipHash, and a
/// connection looks its source and network up about ten times.
impl std::hash::Hash for SourceKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 18];
        let (family, bits) = match self.addr {
            IpAddr::V4(a) => (4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (6, u128::from(a)),
        };
        b[..16].copy_from_slice(&bits.to_le_bytes());
        b[16] = family;
        b[17] = self.prefix;
        state.write(&b);
    }
}

impl SourceKey {
    /// Canonicalises `ip` (an IPv4-mapped or NAT64 address is its IPv4 client) and masks it
    /// to `v4_prefix` or `v6_prefix` bits.
    pub fn new(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> SourceKey {
        let ip = match ip.to_canonical() {
            IpAddr::V6(a) => nat64_client(a).map_or(IpAddr::V6(a), IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(a) => {
                let prefix = v4_prefix.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                SourceKey {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)),
                    prefix,
                }
            }
            IpAddr::V6(a) => {
                let prefix = v6_prefix.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                SourceKey {
                    addr: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)),
                    prefix,
                }
            }
        }
    }

    /// The key every source shares once the rate limiter's table is full.
    pub(crate) const OVERFLOW: SourceKey = SourceKey {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        prefix: 0,
    };

    /// The first address of the prefix.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// An IPv4 key's address as its clients arrive through a NAT64 translator (the key
    /// covers them too), for rules that see packets and not keys.
    pub fn nat64_addr(&self) -> Option<Ipv6Addr> {
        match self.addr {
            IpAddr::V4(a) => Some(Ipv6Addr::from(
                NAT64_PREFIX << 32 | u128::from(u32::from(a)),
            )),
            IpAddr::V6(_) => None,
        }
    }
}

/// The IPv4 client a NAT64 address in `64:ff9b::/96` wraps (its last 32 bits).
fn nat64_client(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(a);
    (bits >> 32 == NAT64_PREFIX).then(|| Ipv4Addr::from(bits as u32))
}

/// `64:ff9b::/96`, its 96 bits.
const NAT64_PREFIX: u128 = 0x0064_ff9b << 64;

/// A source key as [`fmt::Display`] writes it (`192.0.2.7`, `2001:db8::/64`): how replicas
/// name sources to each other.
impl std::str::FromStr for SourceKey {
    type Err = ();

    fn from_str(s: &str) -> Result<SourceKey, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| ())?)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| ())?;
        let full = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(full);
        if prefix > full {
            return Err(());
        }
        let key = SourceKey::new(addr, prefix, prefix);
        // Only the canonical form: host bits set, or a mapped address, is not a key.
        (key.addr == addr).then_some(key).ok_or(())
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if self.prefix == full {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, v4: u8, v6: u8) -> String {
        SourceKey::new(s.parse().unwrap(), v4, v6).to_string()
    }

    /// The one-write hash agrees with equality (a prefix's hosts share a bucket) and keeps
    /// apart what equality keeps apart: the family and the prefix length.
    #[test]
    fn the_hash_follows_the_key() {
        use std::hash::BuildHasher;
        let h = std::hash::RandomState::new();
        let k = |s: &str, v4: u8, v6: u8| SourceKey::new(s.parse().unwrap(), v4, v6);
        assert_eq!(
            h.hash_one(k("192.0.2.7", 24, 64)),
            h.hash_one(k("192.0.2.200", 24, 64))
        );
        assert_eq!(
            h.hash_one(k("2001:db8::1", 32, 64)),
            h.hash_one(k("2001:db8::ffff", 32, 64))
        );
        assert_ne!(
            h.hash_one(k("192.0.2.7", 32, 64)),
            h.hash_one(k("::c000:207", 32, 128))
        );
        assert_ne!(
            h.hash_one(k("192.0.2.0", 24, 64)),
            h.hash_one(k("192.0.2.0", 25, 64))
        );
    }

    #[test]
    fn ipv4_is_masked_to_its_prefix() {
        assert_eq!(key("192.0.2.77", 32, 64), "192.0.2.77");
        assert_eq!(key("192.0.2.77", 24, 64), "192.0.2.0/24");
        assert_eq!(key("192.0.2.77", 1, 64), "128.0.0.0/1");
    }

    #[test]
    fn ipv6_hosts_in_one_slash_64_share_a_key() {
        let a = SourceKey::new("2001:db8:1:2::1".parse().unwrap(), 32, 64);
        let b = SourceKey::new("2001:db8:1:2:ffff::9".parse().unwrap(), 32, 64);
        let c = SourceKey::new("2001:db8:1:3::1".parse().unwrap(), 32, 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn a_key_reads_back_what_it_prints() {
        for (ip, v4, v6) in [
            ("192.0.2.77", 32, 64),
            ("192.0.2.77", 24, 64),
            ("2001:db8:1:2::1", 32, 64),
            ("2001:db8:1:2::1", 32, 128),
        ] {
            let k = SourceKey::new(ip.parse().unwrap(), v4, v6);
            assert_eq!(k.to_string().parse::<SourceKey>(), Ok(k));
        }
        assert!("192.0.2.77/24".parse::<SourceKey>().is_err());
        assert!("::ffff:192.0.2.1".parse::<SourceKey>().is_err());
        assert!("garbage".parse::<SourceKey>().is_err());
        assert!("192.0.2.0/33".parse::<SourceKey>().is_err());
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_source() {
        let mapped = SourceKey::new("::ffff:192.0.2.1".parse().unwrap(), 32, 64);
        let plain = SourceKey::new("192.0.2.1".parse().unwrap(), 32, 64);
        assert_eq!(mapped, plain);
    }

    #[test]
    fn a_nat64_client_is_keyed_by_the_ipv4_address_it_wraps() {
        // Two IPv4 clients behind one translator: two sources, not one /64.
        assert_eq!(key("64:ff9b::198.51.100.7", 32, 64), "198.51.100.7");
        assert_eq!(key("64:ff9b::c633:6408", 32, 64), "198.51.100.8");
        assert_eq!(key("64:ff9b::198.51.100.7", 24, 64), "198.51.100.0/24");
        assert_eq!(
            SourceKey::new("64:ff9b::198.51.100.7".parse().unwrap(), 32, 64),
            SourceKey::new("198.51.100.7".parse().unwrap(), 32, 64)
        );
        // Only the well-known /96: the rest of 64:ff9b::/32 and the local-use /48 stay IPv6.
        assert_eq!(key("64:ff9b:0:0:1::7", 32, 64), "64:ff9b::/64");
        assert_eq!(key("64:ff9b:1::c633:6407", 32, 64), "64:ff9b:1::/64");
        assert!("64:ff9b::c633:6407".parse::<SourceKey>().is_err());
    }
}
