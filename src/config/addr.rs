//! Addresses as an operator writes them: a server's `host:port`, and the networks of the
//! allow, deny and trusted-proxy lists.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

/// A server's `host:port` as configured, parsed once: an address to connect to, or a name
/// to resolve.
///
/// It prints as the operator wrote it (`check`, `/config`, the logs, the `server` metric
/// label), so `[0:0::1]:80` or `db:080` reads back unchanged, not in a normalised form that
/// would no longer match the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    text: String,
    target: Target,
}

/// Where a [`ServerAddr`] points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address: connected to as is, never looked up.
    Ip(SocketAddr),
    /// A name: resolved at start and every `resolve_interval`, each of its addresses a
    /// server of its own.
    Name { host: String, port: u16 },
}

impl ServerAddr {
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A name to resolve, not an address.
    pub fn is_name(&self) -> bool {
        matches!(self.target, Target::Name { .. })
    }

    pub fn port(&self) -> u16 {
        match &self.target {
            Target::Ip(a) => a.port(),
            Target::Name { port, .. } => *port,
        }
    }

    /// As configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// An `ip:port`, or a `host:port` with a port above 0; the error says which part is wrong.
impl FromStr for ServerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<ServerAddr, String> {
        let target = match s.parse::<SocketAddr>() {
            Ok(addr) => Target::Ip(addr),
            Err(_) => {
                let (host, port) = s
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{s:?} is not \"host:port\""))?;
                if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
                    return Err(format!("{s:?} has no valid host"));
                }
                match port.parse::<u16>() {
                    Ok(port) if port > 0 => Target::Name {
                        host: host.to_string(),
                        port,
                    },
                    _ => return Err(format!("{s:?} has no valid port")),
                }
            }
        };
        Ok(ServerAddr {
            text: s.to_string(),
            target,
        })
    }
}

impl From<SocketAddr> for ServerAddr {
    fn from(addr: SocketAddr) -> ServerAddr {
        ServerAddr {
            text: addr.to_string(),
            target: Target::Ip(addr),
        }
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A CIDR or an address from an allow, deny or trusted list.
///
/// Host bits set (`10.1.2.3/8`) are refused: the operator meant either the network or the
/// address, and guessing the wider one would exempt, deny or trust a whole /8 by a typo.
/// IPv4-mapped IPv6 (`::ffff:10.1.2.0/120`) becomes the IPv4 prefix it names, since
/// incoming addresses are matched in their IPv4 form; left as IPv6 it would never match.
pub(super) fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => s
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{s:?} is not a CIDR such as \"192.0.2.0/24\" or an address"))?,
    };
    let net = match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .map_err(|e| format!("{s:?}: {e}"))?,
            None => net,
        },
        _ => net,
    };
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set: write {:?} for the network, or {:?} for the one address",
            net.trunc().to_string(),
            IpNet::from(net.addr()).to_string()
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_address_is_parsed_once_and_prints_as_written() {
        for (text, target) in [
            ("127.0.0.1:9000", Target::Ip(([127, 0, 0, 1], 9000).into())),
            ("[0:0::1]:9000", Target::Ip("[::1]:9000".parse().unwrap())),
            (
                "db.internal:5432",
                Target::Name {
                    host: "db.internal".into(),
                    port: 5432,
                },
            ),
            (
                "localhost:09000",
                Target::Name {
                    host: "localhost".into(),
                    port: 9000,
                },
            ),
        ] {
            let a: ServerAddr = text.parse().unwrap();
            assert_eq!(a.target(), &target, "{text}");
            assert_eq!(a.is_name(), matches!(target, Target::Name { .. }), "{text}");
            assert_eq!(a.to_string(), text);
        }
        for (text, why) in [
            ("localhost", "is not \"host:port\""),
            (":80", "has no valid host"),
            ("a b:80", "has no valid host"),
            ("[::1]", "has no valid host"),
            ("localhost:0", "has no valid port"),
            ("localhost:http", "has no valid port"),
            ("localhost:70000", "has no valid port"),
        ] {
            let err = text.parse::<ServerAddr>().unwrap_err();
            assert_eq!(err, format!("{text:?} {why}"));
        }
    }
}
