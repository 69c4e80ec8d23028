//! PROXY protocol v1 and v2: reading the header a trusted load balancer puts in front of a
//! connection, and writing one in front of a backend connection.
//!
//! The reader consumes exactly the header and nothing after it, byte counts decided from
//! what it has already seen, so the client's first bytes stay in the socket for the pump.
//! A header longer than [`MAX_HEADER`], malformed, or never finished (the caller's first-byte
//! clock) ends that one connection; nothing here can take the process down.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpStream;

/// The v2 signature.
pub const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 line is at most 107 bytes, CRLF included.
pub const V1_MAX: usize = 107;
/// Longest header accepted (v2 with TLVs). Longer is refused, not buffered.
pub const MAX_HEADER: usize = 536;

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("connection closed inside the PROXY header")]
    Closed,
}

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header takes.
    pub len: usize,
    /// The client's and the original destination's addresses; `None` for `LOCAL` (v2) and
    /// `UNKNOWN` (v1), which mean "use the connection's own addresses".
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// What `parse` made of the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Done(Header),
    /// Valid so far; at least this many more bytes belong to the header.
    Incomplete {
        more: usize,
    },
}

/// Parses the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete { more: 1 });
    }
    if buf[0] == V2_SIG[0] {
        parse_v2(buf)
    } else if buf[0] == b'P' {
        parse_v1(buf)
    } else {
        Err(HeaderError::NotProxy)
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let n = buf.len().min(12);
    if buf[..n] != V2_SIG[..n] {
        return Err(HeaderError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete {
            more: 16 - buf.len(),
        });
    }
    let (ver, cmd) = (buf[12] >> 4, buf[12] & 0x0f);
    if ver != 2 {
        return Err(HeaderError::Malformed("v2 version nibble is not 2"));
    }
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER {
        return Err(HeaderError::TooLong);
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete {
            more: len - buf.len(),
        });
    }
    let body = &buf[16..len];
    let addrs = match (cmd, buf[13]) {
        (0x0, _) => None, // LOCAL: the balancer's own connection (e.g. a health check)
        (0x1, 0x11) => {
            let b = body
                .get(..12)
                .ok_or(HeaderError::Malformed("v2 TCP4 addresses cut short"))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]));
            let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            ))
        }
        (0x1, 0x21) => {
            let b = body
                .get(..36)
                .ok_or(HeaderError::Malformed("v2 TCP6 addresses cut short"))?;
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&b[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            ))
        }
        // UNSPEC, UDP or UNIX from a trusted balancer: no TCP source to key on.
        (0x1, _) => None,
        _ => {
            return Err(HeaderError::Malformed(
                "v2 command is neither LOCAL nor PROXY",
            ));
        }
    };
    Ok(Parsed::Done(Header { len, addrs }))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Err(HeaderError::NotProxy);
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(HeaderError::TooLong);
        }
        return Ok(Parsed::Incomplete { more: 1 });
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(HeaderError::TooLong);
    }
    let line = std::str::from_utf8(&buf[PREFIX.len()..end])
        .map_err(|_| HeaderError::Malformed("v1 header is not text"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let addrs = match parts.as_slice() {
        ["UNKNOWN", ..] => None,
        [proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v6 = *proto == "TCP6";
            let ip = |s: &str| -> Result<IpAddr, HeaderError> {
                let ip: IpAddr = s
                    .parse()
                    .map_err(|_| HeaderError::Malformed("v1 address is not an IP"))?;
                if ip.is_ipv6() != v6 {
                    return Err(HeaderError::Malformed("v1 address family does not match"));
                }
                Ok(ip)
            };
            let port = |s: &str| -> Result<u16, HeaderError> {
                if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HeaderError::Malformed("v1 port is not a number"));
                }
                if s.len() > 1 && s.starts_with('0') {
                    return Err(HeaderError::Malformed("v1 port has a leading zero"));
                }
                s.parse()
                    .map_err(|_| HeaderError::Malformed("v1 port is out of range"))
            };
            Some((
                SocketAddr::new(ip(src)?, port(sport)?),
                SocketAddr::new(ip(dst)?, port(dport)?),
            ))
        }
        _ => return Err(HeaderError::Malformed("v1 header has the wrong fields")),
    };
    Ok(Parsed::Done(Header { len, addrs }))
}

/// Reads and consumes exactly one header from `s`. Not cancel-safe in the sense that bytes
/// already consumed are gone: cancel it only to abort the connection (the caller's clock).
pub async fn read_header(s: &TcpStream) -> Result<Header, HeaderError> {
    let mut hdr = [0u8; MAX_HEADER];
    let mut have = 0usize;
    let mut peek = [0u8; MAX_HEADER];
    loop {
        let more = match parse(&hdr[..have])? {
            Parsed::Done(h) => return Ok(h),
            Parsed::Incomplete { more } => more,
        };
        let avail = s
            .peek(&mut peek[..MAX_HEADER - have])
            .await
            .map_err(|_| HeaderError::Closed)?;
        if avail == 0 {
            return Err(HeaderError::Closed);
        }
        // Take only bytes known to belong to the header: for v2 what its length says, for
        // v1 up to the end of the line (everything before a CRLF is header).
        let v1 = if have > 0 {
            hdr[0] == b'P'
        } else {
            peek[0] == b'P'
        };
        let take = if v1 {
            let crlf = if have > 0 && hdr[have - 1] == b'\r' && peek[0] == b'\n' {
                Some(1)
            } else {
                peek[..avail]
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .map(|p| p + 2)
            };
            crlf.unwrap_or(avail)
                .min(V1_MAX.saturating_sub(have))
                .max(1)
        } else {
            avail.min(more)
        };
        match s.try_read(&mut hdr[have..have + take]) {
            Ok(0) => return Err(HeaderError::Closed),
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(HeaderError::Closed),
        }
    }
}

/// A v1 header for a TCP connection from `src` to `dst`.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A v2 header (PROXY command, TCP) for a connection from `src` to `dst`.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let mut out = Vec::with_capacity(52);
    out.extend_from_slice(&V2_SIG);
    out.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// Both addresses in one family (a dual-stack listener can pair a v4 client with a v6
/// local address): IPv4 when both can be, else IPv6.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (canon(src), canon(dst));
    if s.is_ipv4() == d.is_ipv4() {
        return (s, d);
    }
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v) => SocketAddr::new(IpAddr::V6(v.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    (v6(s), v6(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> Header {
        match parse(buf) {
            Ok(Parsed::Done(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = done(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /");
        assert_eq!(h.len, 45);
        assert_eq!(
            h.addrs,
            Some((
                "192.0.2.1:56324".parse().unwrap(),
                "198.51.100.2:443".parse().unwrap()
            ))
        );
        let h = done(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n");
        assert_eq!(h.addrs.unwrap().0, "[2001:db8::1]:1".parse().unwrap());
        assert_eq!(done(b"PROXY UNKNOWN\r\n").addrs, None);
        assert_eq!(done(b"PROXY UNKNOWN 1 2 3 4\r\n").addrs, None);
    }

    #[test]
    fn v1_edge_cases_are_refused() {
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
            b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HeaderError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"PROXZ"), Err(HeaderError::NotProxy));
        assert_eq!(
            parse(b"PROXY TCP4 192.0.2.1"),
            Ok(Parsed::Incomplete { more: 1 })
        );
        assert_eq!(parse(&[b'P'; 200]), Err(HeaderError::NotProxy));
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 120));
        assert_eq!(parse(&long), Err(HeaderError::TooLong));
    }

    #[test]
    fn v2_local_proxy_and_limits() {
        let src: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let dst: SocketAddr = "198.51.100.2:443".parse().unwrap();
        let h = encode_v2(src, dst);
        assert_eq!(h.len(), 28);
        assert_eq!(done(&h).addrs, Some((src, dst)));
        for cut in 0..h.len() {
            assert!(
                matches!(parse(&h[..cut]), Ok(Parsed::Incomplete { .. })),
                "{cut}"
            );
        }
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            done(&local),
            Header {
                len: 16,
                addrs: None
            }
        );
        let mut big = V2_SIG.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0x10, 0x00]);
        assert_eq!(parse(&big), Err(HeaderError::TooLong));
        let mut short = V2_SIG.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(matches!(parse(&short), Err(HeaderError::Malformed(_))));
        let mut v1ver = h.clone();
        v1ver[12] = 0x11;
        assert!(matches!(parse(&v1ver), Err(HeaderError::Malformed(_))));
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let src: SocketAddr = "[2001:db8::7]:1234".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::8]:80".parse().unwrap();
        let mut h = encode_v2(src, dst);
        let tlv = [0x05u8, 0x00, 0x03, b'a', b'b', b'c'];
        let len = u16::from_be_bytes([h[14], h[15]]) + tlv.len() as u16;
        h[14..16].copy_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&tlv);
        h.extend_from_slice(b"payload");
        let parsed = done(&h);
        assert_eq!(parsed.len, 16 + 36 + 6);
        assert_eq!(parsed.addrs, Some((src, dst)));
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let src: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::1]:2".parse().unwrap();
        let v1 = encode_v1(src, dst);
        assert_eq!(v1, b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1 2\r\n");
        assert!(matches!(parse(&v1), Ok(Parsed::Done(_))));
    }
}
