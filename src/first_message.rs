//! The first message of a client-first connection: whether the bytes held so far make it
//! whole, so that a backend worker is taken only once there is something for it to serve.
//!
//! A backend has few workers (Apache 64, PostgreSQL 100); a client that drips its request a
//! byte at a time would hold one for as long as it drips. So halfguard holds a new client's
//! bytes until [`judge`] says the first message is [`Judgement::Whole`] (an HTTP/1 request
//! head, the HTTP/2 preface and its SETTINGS frame, a TLS ClientHello, a PostgreSQL startup
//! packet), then connects and forwards it in one write. What it cannot frame is
//! [`Judgement::Unframed`] and is connected at once, as before: a parse halfguard does not
//! own never refuses a client, the backend keeps the last word on its own protocol.
//!
//! # What the caller can rely on
//!
//! - **Decided once, whatever the segmentation.** Call [`judge`] with all the bytes held
//!   since the first one. Along any growing buffer the answers are `Incomplete` for a while,
//!   then either `Whole { len }` (first when exactly `len` bytes are held, and the same for
//!   every longer buffer) or `Unframed` (and `Unframed` for every longer buffer). So the
//!   first decision is final and does not depend on how TCP cut the bytes.
//! - **Bounded.** Never `Incomplete` once [`MAX_FIRST_MESSAGE`] bytes are held, and never
//!   `Whole` longer than that: a hold buffer of that size cannot fill up undecided. Bigger
//!   first messages (a 40 KiB cookie) are `Unframed`, i.e. connected at once as before.
//! - **Cheap and safe.** No allocation (HTTP/1 headers go to an uninitialised array on the
//!   stack), no panic on any input, linear in the bytes held: the common call is a single
//!   one on the first segment, under 100 ns for a curl GET head and under 50 ns for a
//!   ClientHello (benches/README.md). A buffer dripped a byte at a time is judged anew each
//!   time, so call it when bytes arrived, not on a timer.
//!
//! # Recognising a protocol under [`Expect::Auto`]
//!
//! The first byte routes: `0x16` can only be a TLS record, `0x00` only a PostgreSQL length
//! (it is at most 10000), anything else only an HTTP method, and only one of IANA's
//! registered methods, in upper case (`GET`, `POST`, ... `PROPFIND`), followed by a space: a
//! client of another protocol that sends a few bytes and waits (`x`, `hello`, `ping`) is
//! `Unframed` at its first byte that leaves the list. `Incomplete(None)` means "could still
//! become one": a prefix of a registered method not yet followed by its space (at most 18
//! bytes: `UPDATEREDIRECTREF` has 17), a TLS prefix before its handshake type byte (6
//! bytes), a PostgreSQL length and code before both are read and valid (8 bytes).
//!
//! A client that sends a short message and waits for the answer must never be held: these
//! first messages come out `Unframed` after the number of bytes shown (all in one segment in
//! practice, so at the first call). The tests check each row.
//!
//! | client's first message | `Unframed` after |
//! |---|---|
//! | Redis RESP `*1\r\n$4\r\nPING\r\n` (redis-cli, every client library) | 1 byte (`*` starts no method) |
//! | Redis or memcached inline `PING\r\n` | 2 bytes (`PI` starts no method) |
//! | Redis or memcached inline `GET key\r\n` | 8 bytes: it looks like a request line until the `\r` (8th byte) where `httparse` wants ` HTTP/1.x` |
//! | memcached `set k 0 0 5\r\n...` | 1 byte (methods are upper case) |
//! | SSH `SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u6\r\n`, `SSH-2.0-Go\r\n` | 2 bytes (`SS`) |
//! | AMQP `AMQP\0\0\x09\x01` | 2 bytes (`AM`) |
//! | Kafka (length, then the API key) | 6 bytes |
//! | SMB2 over TCP (`\0` + length, then `\xfeSMB`) | 5 bytes |
//! | MQTT CONNECT (`0x10`), memcached binary (`0x80`), Cassandra (`0x04`), RDP (`0x03`) | 1 byte |
//! | random bytes | 1 byte for 238 of the 256 first-byte values |
//!
//! MySQL, SMTP, FTP, IMAP, POP3 and NATS are server-first: their clients send nothing until
//! greeted, so their listeners must be server-first and this module never sees them.
//!
//! Auto is a heuristic in one direction only: a message of another protocol that happens to
//! start like a framed one (a MongoDB length whose low byte is `0x16`, say) is held until
//! its bytes contradict the framing or [`MAX_FIRST_MESSAGE`]. A listener that knows its
//! protocol says so ([`Expect::Http`], [`Expect::Tls`], [`Expect::Postgres`]).
//!
//! # The framings
//!
//! - **HTTP/1.x**: the request head, up to and including its empty line, as `httparse` (the
//!   parser hyper uses) finds it with room for 128 headers. More headers than that: the
//!   head still ends at the first empty line, found by a scan (hyper itself allows 100, so
//!   such a request is the backend's to refuse, not ours to hold forever). A parse error is
//!   `Unframed`, under `Expect::Http` too: the backend answers it as it always did. A body
//!   (a POST sent after `Expect: 100-continue`) is not waited for.
//! - **HTTP/2 with prior knowledge** (h2c): the 24-byte preface and the first frame, which
//!   must be a SETTINGS frame (type 4, no ACK, stream 0, a payload of whole 6-byte settings
//!   within the 16384-byte default frame size). The client's HEADERS usually follow in the
//!   same segment and are forwarded with it, but are not waited for.
//! - **TLS**: the whole ClientHello, which may span several TCP segments and several
//!   handshake records (each with its own 5-byte header); whole at the end of the record
//!   that completes it. Record headers must say handshake (`0x16`), version `0x03 0x00..=4`,
//!   a length of 1 to 18432 bytes; the handshake must be a ClientHello (`0x01`) with a
//!   `0x03 0x00..=4` legacy version. A record of another type before the ClientHello is
//!   complete is `Unframed`.
//! - **PostgreSQL**: a length (including itself, 8 to 10000) then a code: SSLRequest and
//!   GSSENCRequest (length 8), CancelRequest (16, or up to 268 for protocol 3.2's longer
//!   keys), a StartupMessage of protocol 3.x. After an SSLRequest the client waits for the
//!   server's one-byte answer, so the SSLRequest alone is the first message. Under
//!   `Expect::Postgres` a TLS ClientHello is accepted too: PostgreSQL 17's
//!   `sslnegotiation=direct` starts with one.

use std::mem::MaybeUninit;

/// The longest first message held. Longer ones are connected at once, as before this
/// module existed: it covers nginx's default request head room and any real ClientHello
/// (post-quantum ones are about 1.8 kB), and bounds what one held connection can cost.
pub const MAX_FIRST_MESSAGE: usize = 32 * 1024;

/// Headers `httparse` parses in place; more fall back to a scan for the empty line.
const MAX_HEADERS: usize = 128;

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A frame header.
const H2_FRAME_HEAD: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's initial value: a longer first frame is a protocol error.
const H2_MAX_FRAME: usize = 16384;
const H2_SETTINGS: u8 = 0x4;
const H2_FLAG_ACK: u8 = 0x1;

const TLS_HANDSHAKE: u8 = 0x16;
const TLS_CLIENT_HELLO: u8 = 0x01;
const TLS_RECORD_HEAD: usize = 5;
/// The largest record RFC 8446 lets a peer send (ciphertext bound), lenient on purpose.
const TLS_MAX_RECORD: usize = 16384 + 2048;
/// Handshake type, u24 length and legacy version: what is checked of the handshake.
const TLS_HELLO_CHECKED: usize = 6;

const PG_MAX_LEN: u32 = 10000;
const PG_SSL_REQUEST: u32 = 80877103;
const PG_GSSENC_REQUEST: u32 = 80877104;
const PG_CANCEL_REQUEST: u32 = 80877102;
/// Protocol 3.0's key is 4 bytes; 3.2 (PostgreSQL 18) allows up to 256.
const PG_CANCEL_LEN: std::ops::RangeInclusive<u32> = 16..=12 + 256;
const PG_MAJOR_3: u32 = 3;

/// What a listener expects its clients' first message to be (config `first_message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expect {
    /// Recognise HTTP/1, HTTP/2 with prior knowledge, TLS and PostgreSQL by their first
    /// bytes; anything else is connected at once.
    #[default]
    Auto,
    /// HTTP/1.x or HTTP/2 with prior knowledge.
    Http,
    /// A TLS ClientHello.
    Tls,
    /// A PostgreSQL SSLRequest, GSSENCRequest, CancelRequest or StartupMessage, or a TLS
    /// ClientHello (direct SSL negotiation).
    Postgres,
    /// Nothing is framed: connect at the first byte.
    Any,
}

/// The protocol a first message was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
    Tls,
    Postgres,
}

impl Proto {
    /// A static name, fit for a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Http1 => "http1",
            Proto::Http2 => "http2",
            Proto::Tls => "tls",
            Proto::Postgres => "postgres",
        }
    }
}

/// What the bytes held so far are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// More bytes are needed. `Some(p)`: recognised as `p` already (under an explicit
    /// [`Expect`], the protocol expected until the bytes say more); `None`: still ambiguous
    /// (only under [`Expect::Auto`]).
    Incomplete(Option<Proto>),
    /// Whole: the first `len` bytes are the first message. Bytes after it belong to what
    /// follows (a request body, the next frames) and are forwarded with it.
    Whole { proto: Proto, len: usize },
    /// Not a protocol halfguard frames (or [`Expect::Any`]): connect at once.
    Unframed,
}

/// One protocol's view of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Cannot be this protocol.
    No,
    /// Could still be, not recognised yet.
    Maybe,
    /// Recognised, not whole yet.
    Partial(Proto),
    Whole(Proto, usize),
}

/// Judges the bytes held since the connection's first byte. See the module docs for what
/// the caller can rely on.
pub fn judge(expect: Expect, buf: &[u8]) -> Judgement {
    let (verdict, expected) = match expect {
        Expect::Any => return Judgement::Unframed,
        Expect::Auto => (auto(buf), None),
        Expect::Http => (http(buf), Some(Proto::Http1)),
        Expect::Tls => (tls(buf), Some(Proto::Tls)),
        Expect::Postgres => (postgres_or_tls(buf), Some(Proto::Postgres)),
    };
    match verdict {
        Verdict::Whole(proto, len) if len <= MAX_FIRST_MESSAGE => Judgement::Whole { proto, len },
        Verdict::Maybe | Verdict::Partial(_) if buf.len() < MAX_FIRST_MESSAGE => {
            Judgement::Incomplete(match verdict {
                Verdict::Partial(p) => Some(p),
                _ => expected,
            })
        }
        _ => Judgement::Unframed,
    }
}

fn auto(buf: &[u8]) -> Verdict {
    match buf.first() {
        None => Verdict::Maybe,
        Some(&TLS_HANDSHAKE) => tls(buf),
        Some(0) => postgres(buf),
        Some(_) => http(buf),
    }
}

fn postgres_or_tls(buf: &[u8]) -> Verdict {
    match buf.first() {
        Some(&TLS_HANDSHAKE) => tls(buf),
        _ => postgres(buf),
    }
}

fn http(buf: &[u8]) -> Verdict {
    let n = buf.len().min(H2_PREFACE.len());
    // "PRI " is the method RFC 9113 reserved for the preface.
    if n >= 4 && buf[..n] == H2_PREFACE[..n] {
        h2(buf)
    } else {
        http1(buf)
    }
}

/// The methods of IANA's HTTP method registry (RFC 9110 and the WebDAV, versioning and
/// binding extensions), as they must be sent: upper case. A client-first message that is
/// not one of these followed by a space is not held as HTTP: a short message of another
/// protocol (`x`, `hello`, `ping`) must never wait for a request head that will not come.
const METHODS: [&[u8]; 40] = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"QUERY",
    b"PRI",
    b"ACL",
    b"BASELINE-CONTROL",
    b"BIND",
    b"CHECKIN",
    b"CHECKOUT",
    b"COPY",
    b"LABEL",
    b"LINK",
    b"LOCK",
    b"MERGE",
    b"MKACTIVITY",
    b"MKCALENDAR",
    b"MKCOL",
    b"MKREDIRECTREF",
    b"MKWORKSPACE",
    b"MOVE",
    b"ORDERPATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"REBIND",
    b"REPORT",
    b"SEARCH",
    b"UNBIND",
    b"UNCHECKOUT",
    b"UNLINK",
    b"UNLOCK",
    b"UPDATE",
    b"UPDATEREDIRECTREF",
    b"VERSION-CONTROL",
];

/// Whether `buf` starts with a registered method and its space (`Verdict::Whole` standing
/// for "yes", with the method's length), could still (`Maybe`), or cannot (`No`).
fn method(buf: &[u8]) -> Verdict {
    let mut maybe = false;
    for m in METHODS {
        if buf.len() > m.len() {
            if buf.starts_with(m) && buf[m.len()] == b' ' {
                return Verdict::Whole(Proto::Http1, m.len());
            }
        } else if m.starts_with(buf) {
            maybe = true;
        }
    }
    if maybe { Verdict::Maybe } else { Verdict::No }
}

/// Whether `buf` begins with an HTTP/1 request line's method and space: a keep-alive
/// connection's next request, for the request clock (see `conn::pump`). `None` while `buf`
/// is too short to tell: a method dripped a byte at a time is told once its space comes.
pub fn starts_request(buf: &[u8]) -> Option<bool> {
    match method(buf) {
        Verdict::Whole(..) => Some(true),
        Verdict::Maybe => None,
        _ => Some(false),
    }
}

/// The longest prefix [`starts_request`] may need to tell: the longest method and its space.
pub const REQUEST_PREFIX: usize = {
    let (mut i, mut max) = (0, 0);
    while i < METHODS.len() {
        if METHODS[i].len() > max {
            max = METHODS[i].len();
        }
        i += 1;
    }
    max + 1
};

fn http1(buf: &[u8]) -> Verdict {
    match method(buf) {
        Verdict::Whole(..) => {}
        Verdict::Maybe => return Verdict::Maybe,
        _ => return Verdict::No,
    }
    let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => Verdict::Whole(Proto::Http1, len),
        Ok(httparse::Status::Partial) => Verdict::Partial(Proto::Http1),
        Err(httparse::Error::TooManyHeaders) => match head_end(buf) {
            Some(len) => Verdict::Whole(Proto::Http1, len),
            None => Verdict::Partial(Proto::Http1),
        },
        Err(_) => Verdict::No,
    }
}

/// The end of the first empty line (`\n\n` or `\n\r\n`, as `httparse` accepts both).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\n') {
        let lf = from + i;
        match (buf.get(lf + 1), buf.get(lf + 2)) {
            (Some(b'\n'), _) => return Some(lf + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(lf + 3),
            _ => from = lf + 1,
        }
    }
    None
}

/// `buf` starts with at least 4 bytes of the preface.
fn h2(buf: &[u8]) -> Verdict {
    let Some(frame) = buf.get(H2_PREFACE.len()..) else {
        return Verdict::Partial(Proto::Http2);
    };
    let head = &frame[..frame.len().min(H2_FRAME_HEAD)];
    let payload = match *head {
        [a, b, c, ..] => usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c),
        _ => 0,
    };
    let bad = payload > H2_MAX_FRAME
        || payload % 6 != 0
        || head.get(3).is_some_and(|&t| t != H2_SETTINGS)
        || head.get(4).is_some_and(|&f| f & H2_FLAG_ACK != 0)
        // The stream id (its top bit reserved) is 0.
        || head.get(5).is_some_and(|&b| b & 0x7f != 0)
        || head.get(6..).is_some_and(|s| s.iter().any(|&b| b != 0));
    if bad {
        return Verdict::No;
    }
    let len = H2_PREFACE.len() + H2_FRAME_HEAD + payload;
    if head.len() == H2_FRAME_HEAD && buf.len() >= len {
        Verdict::Whole(Proto::Http2, len)
    } else {
        Verdict::Partial(Proto::Http2)
    }
}

fn tls(buf: &[u8]) -> Verdict {
    // The first handshake bytes, gathered across records (a record may hold just one).
    let mut hello = [0u8; TLS_HELLO_CHECKED];
    let mut seen = 0usize;
    let mut pos = 0usize;
    let undecided = |seen: usize| {
        if seen == 0 {
            Verdict::Maybe
        } else {
            Verdict::Partial(Proto::Tls)
        }
    };
    loop {
        let head = &buf[pos..buf.len().min(pos + TLS_RECORD_HEAD)];
        let head_ok = head.first().is_none_or(|&t| t == TLS_HANDSHAKE)
            && head.get(1).is_none_or(|&v| v == 3)
            && head.get(2).is_none_or(|&v| v <= 4);
        if !head_ok {
            return Verdict::No;
        }
        let [_, _, _, hi, lo] = *head else {
            return undecided(seen);
        };
        let record = usize::from(u16::from_be_bytes([hi, lo]));
        if record == 0 || record > TLS_MAX_RECORD {
            return Verdict::No;
        }
        let start = pos + TLS_RECORD_HEAD;
        let body = &buf[start..buf.len().min(start + record)];
        let at = seen.min(TLS_HELLO_CHECKED);
        let take = (TLS_HELLO_CHECKED - at).min(body.len());
        hello[at..at + take].copy_from_slice(&body[..take]);
        seen += body.len();
        let got = seen.min(TLS_HELLO_CHECKED);
        let hello_ok = (got < 1 || hello[0] == TLS_CLIENT_HELLO)
            && (got < 5 || hello[4] == 3)
            && (got < 6 || hello[5] <= 4);
        if !hello_ok {
            return Verdict::No;
        }
        if got >= 4 {
            let total = 4
                + (usize::from(hello[1]) << 16 | usize::from(hello[2]) << 8)
                + usize::from(hello[3]);
            // At least one record header in front of it.
            if TLS_RECORD_HEAD + total > MAX_FIRST_MESSAGE {
                return Verdict::No;
            }
            if seen >= total && body.len() == record {
                return Verdict::Whole(Proto::Tls, start + record);
            }
        }
        if body.len() < record {
            return undecided(seen);
        }
        pos = start + record;
    }
}

fn postgres(buf: &[u8]) -> Verdict {
    // A length of at most 10000 (0x2710) starts 0x00, then at most 0x27.
    if buf.first().is_some_and(|&b| b != 0) || buf.get(1).is_some_and(|&b| b > 0x27) {
        return Verdict::No;
    }
    let Some(len) = be32(buf, 0) else {
        return Verdict::Maybe;
    };
    if !(8..=PG_MAX_LEN).contains(&len) {
        return Verdict::No;
    }
    let code = &buf[4..buf.len().min(8)];
    let could_be = [0, PG_MAJOR_3 as u8].starts_with(&code[..code.len().min(2)])
        || [PG_SSL_REQUEST, PG_GSSENC_REQUEST, PG_CANCEL_REQUEST]
            .iter()
            .any(|c| c.to_be_bytes().starts_with(code));
    if !could_be {
        return Verdict::No;
    }
    let Some(code) = be32(buf, 4) else {
        return Verdict::Maybe;
    };
    let fits = match code {
        PG_SSL_REQUEST | PG_GSSENC_REQUEST => len == 8,
        PG_CANCEL_REQUEST => PG_CANCEL_LEN.contains(&len),
        // A StartupMessage: major 3, any minor.
        c => c >> 16 == PG_MAJOR_3,
    };
    if !fits {
        return Verdict::No;
    }
    let len = len as usize;
    if buf.len() >= len {
        Verdict::Whole(Proto::Postgres, len)
    } else {
        Verdict::Partial(Proto::Postgres)
    }
}

fn be32(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)?.try_into().ok().map(u32::from_be_bytes)
}

#[cfg(test)]
mod tests;
