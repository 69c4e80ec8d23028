//! Addresses as an operator writes them: a server's `host:port`, and the networks of the
//! allow, deny and trusted-proxy lists.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// `Ok` when `s` is an `ip:port` or a `host:port` with a port above 0.
pub(super) fn check_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not \"host:port\""))?;
    if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
        return Err(format!("{s:?} has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{s:?} has no valid port")),
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
