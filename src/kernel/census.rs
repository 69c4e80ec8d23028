//! The socket census: one sock_diag netlink dump of the namespace's TCP sockets, counted by
//! state on halfguard's listening ports and, for SYN_RECV, by source prefix; plus the
//! kernel's SYN cookie and listen-overflow counters from `/proc/net/netstat`.
//!
//! No privilege is needed to dump one's own network namespace. A sidecar shares the pod's,
//! so this also sees what reaches the service around halfguard. With SYN cookies active the
//! kernel keeps no request socket, so SYN_RECV reads low during a flood: the cookie counter
//! is exported beside it for that reason.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};

/// The TCP states counted, in `STATES` order.
pub const STATES: [(&str, u8); 7] = [
    ("syn_recv", 3),
    ("established", 1),
    ("fin_wait1", 4),
    ("fin_wait2", 5),
    ("close_wait", 8),
    ("last_ack", 9),
    ("time_wait", 6),
];

/// One socket the dump found on a watched port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub local_port: u16,
    pub state: u8,
    pub remote: IpAddr,
}

/// Dumps every TCP socket (both families) in the states of [`STATES`] whose local port is
/// one of `ports`. Blocking: run it off the async workers.
pub fn dump(ports: &[u16]) -> io::Result<Vec<Seen>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_family(family, ports, &mut out)?;
    }
    Ok(out)
}

fn dump_family(family: u8, ports: &[u16], out: &mut Vec<Seen>) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let states = StateFlags::SYN_RECV
        | StateFlags::ESTABLISHED
        | StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::TIME_WAIT;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    socket.send(&buf[..], 0)?;

    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut rx[..], 0)?;
        if size == 0 {
            return Ok(());
        }
        let mut offset = 0;
        while offset < size {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    if ports.contains(&id.source_port) {
                        out.push(Seen {
                            local_port: id.source_port,
                            state: r.header.state,
                            remote: id.destination_address.to_canonical(),
                        });
                    }
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::other(format!("sock_diag: {e:?}")));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// `TcpExt` counters from `/proc/net/netstat`: (SyncookiesSent, ListenOverflows).
pub fn netstat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    parse_netstat(&text)
}

pub(crate) fn parse_netstat(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let map: HashMap<&str, u64> = names
        .iter()
        .zip(values.iter())
        .skip(1)
        .filter_map(|(n, v)| Some((*n, v.parse().ok()?)))
        .collect();
    Some((
        *map.get("SyncookiesSent").unwrap_or(&0),
        *map.get("ListenOverflows").unwrap_or(&0),
    ))
}

/// True when `net.ipv4.tcp_syncookies` is 0 in this namespace.
pub fn syncookies_off() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syncookies")
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netstat_counters_are_read_by_name() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops\n\
                    TcpExt: 12 3 45 45\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_netstat(text), Some((12, 45)));
    }

    #[test]
    fn the_dump_sees_an_established_connection_on_a_watched_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s, _) = l.accept().unwrap();
        let seen = dump(&[port]).unwrap();
        assert!(
            seen.iter().any(|s| s.local_port == port && s.state == 1),
            "{seen:?}"
        );
    }
}
