//! What a backend on this host holds for a connection: its socket's send queue.
//!
//! A client that stops reading stops halfguard reading its backend, and then the backend's
//! own socket fills: on loopback its send buffer starts near 2.6 MB (ten segments of a 64 kB
//! MSS, doubled) and grows to `tcp_wmem`'s maximum. That memory is this host's when the
//! backend runs beside halfguard (a sidecar's pod, a container on the same node), and it is
//! most of what a stalled connection pins, yet no socket of halfguard's shows it. The kernel
//! does: `sock_diag` answers, for one socket named by its four-tuple, how many bytes it has
//! queued (`idiag_wqueue`, what `ss` prints as Send-Q). One exact lookup, no dump: a
//! request and an answer on a netlink socket each worker thread keeps.
//!
//! A backend elsewhere is not found (`ENOENT`): its memory is not this host's, and the
//! caller stops asking for that connection. Anything unexpected is `None`, never an error
//! on the connection's path.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then the socket id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_sockid`: ports, two 16-byte addresses, interface, cookie.
const SOCKID_LEN: usize = 4 + 16 + 16 + 4 + 8;
/// `idiag_wqueue` in `struct inet_diag_msg`: after family/state/timer/retrans, the id,
/// `expires` and `rqueue`.
const WQUEUE_AT: usize = NLMSG_HDR + 4 + SOCKID_LEN + 4 + 4;

/// Whether the answer names a socket, says there is none here, or could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerQueue {
    /// The peer's socket is on this host, with this many bytes in its send queue.
    Local(u32),
    /// No such socket here: the peer is on another host (or already gone).
    Elsewhere,
    /// The kernel could not be asked (no netlink, a refused socket, a short answer).
    Unknown,
}

thread_local! {
    static DIAG: RefCell<Option<Socket>> = const { RefCell::new(None) };
}

/// The send queue of the socket at `peer` whose own peer is `local` (the other end of our
/// connection from `local` to `peer`), if it is on this host.
pub fn send_queue(local: SocketAddr, peer: SocketAddr) -> PeerQueue {
    let (local, peer) = (canonical(local), canonical(peer));
    if local.is_ipv4() != peer.is_ipv4() {
        return PeerQueue::Unknown;
    }
    DIAG.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = open();
        }
        let Some(sock) = slot.as_ref() else {
            return PeerQueue::Unknown;
        };
        let answer = ask(sock, local, peer);
        if answer == PeerQueue::Unknown {
            // A socket in a bad state (a half-read answer) is not reused.
            *slot = None;
        }
        answer
    })
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn open() -> Option<Socket> {
    let s = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM.cloexec(),
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )
    .ok()?;
    // The kernel answers within the send; the timeout only guards against the unexpected.
    s.set_read_timeout(Some(std::time::Duration::from_millis(20)))
        .ok()?;
    Some(s)
}

fn ask(sock: &Socket, local: SocketAddr, peer: SocketAddr) -> PeerQueue {
    let req = request(local, peer);
    if sock.send(&req).ok() != Some(req.len()) {
        return PeerQueue::Unknown;
    }
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 512];
    let Ok(n) = sock.recv(&mut buf) else {
        return PeerQueue::Unknown;
    };
    // SAFETY: recv initialised the first n bytes.
    #[allow(unsafe_code)]
    let got: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
    parse(got)
}

/// The request: an exact lookup (no dump) of the TCP socket bound to `peer` and connected
/// to `local`, in any state.
fn request(local: SocketAddr, peer: SocketAddr) -> [u8; NLMSG_HDR + REQ_LEN] {
    let mut m = [0u8; NLMSG_HDR + REQ_LEN];
    m[0..4].copy_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    // seq and pid stay 0: one request at a time on this socket.
    let r = &mut m[NLMSG_HDR..];
    r[0] = if peer.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    };
    r[1] = libc::IPPROTO_TCP as u8;
    r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    let id = &mut r[8..];
    id[0..2].copy_from_slice(&peer.port().to_be_bytes());
    id[2..4].copy_from_slice(&local.port().to_be_bytes());
    put_ip(&mut id[4..20], peer.ip());
    put_ip(&mut id[20..36], local.ip());
    // Interface 0: any. Cookie INET_DIAG_NOCOOKIE: not checked.
    id[40..48].copy_from_slice(&[0xff; 8]);
    m
}

fn put_ip(dst: &mut [u8], ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => dst[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => dst.copy_from_slice(&v6.octets()),
    }
}

fn parse(got: &[u8]) -> PeerQueue {
    if got.len() < NLMSG_HDR {
        return PeerQueue::Unknown;
    }
    let kind = u16::from_ne_bytes([got[4], got[5]]);
    if kind == NLMSG_ERROR {
        let code = got
            .get(NLMSG_HDR..NLMSG_HDR + 4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        return match code {
            Some(c) if c == -libc::ENOENT => PeerQueue::Elsewhere,
            _ => PeerQueue::Unknown,
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return PeerQueue::Unknown;
    }
    match got.get(WQUEUE_AT..WQUEUE_AT + 4) {
        Some(b) => PeerQueue::Local(u32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        None => PeerQueue::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    /// A peer on this host that writes what we do not read is found, with its queue; one
    /// that has nothing queued is found empty; a four-tuple nobody holds is elsewhere.
    #[tokio::test]
    async fn a_local_peers_send_queue_is_read_and_an_absent_one_is_elsewhere() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = l.accept().unwrap();
        let (local, peer) = (ours.local_addr().unwrap(), ours.peer_addr().unwrap());
        match send_queue(local, peer) {
            PeerQueue::Local(0) => {}
            other => panic!("an idle peer: {other:?}"),
        }
        theirs.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        while written < 64 << 20 {
            match theirs.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        let PeerQueue::Local(q) = send_queue(local, peer) else {
            panic!("the writing peer was not found");
        };
        // Whatever did not fit in our receive queue (we read nothing) waits in theirs.
        ours.set_nonblocking(true).unwrap();
        let ours = tokio::net::TcpStream::from_std(ours).unwrap();
        let unread = crate::sockopt::unread(&ours).unwrap_or(0) as usize;
        assert!(q > 0, "{written} written, yet nothing queued");
        // Every byte is in one queue or the other (or both, received and not yet acked).
        assert!(q as usize <= written, "{q} queued of {written} written");
        assert!(
            q as usize + unread >= written,
            "{q} queued there and {unread} here, of {written} written"
        );
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(send_queue(local, nobody), PeerQueue::Elsewhere);
    }

    #[test]
    fn short_or_foreign_answers_are_unknown() {
        assert_eq!(parse(&[]), PeerQueue::Unknown);
        let mut m = [0u8; NLMSG_HDR + 4];
        m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m[NLMSG_HDR..].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(parse(&m), PeerQueue::Unknown);
        m[NLMSG_HDR..].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse(&m), PeerQueue::Elsewhere);
        let mut short = [0u8; NLMSG_HDR + 8];
        short[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert_eq!(parse(&short), PeerQueue::Unknown);
    }
}
