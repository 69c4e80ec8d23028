//! The judge on first messages captured from real clients on loopback
//! (tests/fixtures/first_message/, see its README), on hand-made edge cases, and on random
//! bytes: every growing buffer is Incomplete, then decided once for good.

use proptest::prelude::*;

use super::*;
use Judgement::{Incomplete, Unframed, Whole};

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("../../tests/fixtures/first_message/", $name)).as_slice()
    };
}

/// A captured first message: `len` is where the message ends in the capture (what follows
/// it in the same capture is what the client sent next without waiting).
struct Framed {
    name: &'static str,
    bytes: &'static [u8],
    expect: Expect,
    proto: Proto,
    len: usize,
}

fn framed() -> Vec<Framed> {
    let f = |name, bytes, expect, proto, len| Framed {
        name,
        bytes,
        expect,
        proto,
        len,
    };
    vec![
        f(
            "curl GET",
            fixture!("curl_get.bin"),
            Expect::Http,
            Proto::Http1,
            79,
        ),
        // The head (175 bytes); its 36-byte body came a second later, after curl's wait
        // for `100 Continue`.
        f(
            "curl POST, Expect: 100-continue",
            fixture!("curl_post_expect.bin"),
            Expect::Http,
            Proto::Http1,
            175,
        ),
        // Preface (24), SETTINGS header (9) and 18 bytes of settings; WINDOW_UPDATE and
        // HEADERS follow in the capture.
        f(
            "curl --http2-prior-knowledge",
            fixture!("curl_h2_prior.bin"),
            Expect::Http,
            Proto::Http2,
            51,
        ),
        f(
            "openssl s_client",
            fixture!("openssl_hello.bin"),
            Expect::Tls,
            Proto::Tls,
            317,
        ),
        f(
            "curl https (padded)",
            fixture!("curl_tls_hello.bin"),
            Expect::Tls,
            Proto::Tls,
            517,
        ),
        f(
            "openssl, 1.7 kB hello",
            fixture!("openssl_hello_large.bin"),
            Expect::Tls,
            Proto::Tls,
            1743,
        ),
        // The same hello in four records of at most 512 bytes (-max_send_frag 512).
        f(
            "openssl, 1.7 kB hello in 4 records",
            fixture!("openssl_hello_frag512.bin"),
            Expect::Tls,
            Proto::Tls,
            1758,
        ),
        f(
            "psql startup",
            fixture!("psql_startup.bin"),
            Expect::Postgres,
            Proto::Postgres,
            53,
        ),
        f(
            "psql SSLRequest",
            fixture!("psql_sslrequest.bin"),
            Expect::Postgres,
            Proto::Postgres,
            8,
        ),
    ]
}

const EXPECTS: [Expect; 5] = [
    Expect::Auto,
    Expect::Http,
    Expect::Tls,
    Expect::Postgres,
    Expect::Any,
];

/// Judges every prefix of `buf`, as a connection receiving it a byte at a time would, and
/// checks the contract: Incomplete (never at MAX_FIRST_MESSAGE bytes), then one decision
/// that longer prefixes repeat; a Whole first comes when exactly its `len` bytes are held.
/// Returns the decision and the prefix length that brought it.
fn decides_once(expect: Expect, buf: &[u8]) -> Option<(Judgement, usize)> {
    let mut first: Option<(Judgement, usize)> = None;
    for k in 0..=buf.len() {
        let j = judge(expect, &buf[..k]);
        match (first, j) {
            (None, Incomplete(_)) => {
                assert!(k < MAX_FIRST_MESSAGE, "{expect:?}: Incomplete at {k} bytes")
            }
            (None, Whole { len, .. }) => {
                assert_eq!(len, k, "{expect:?}: first Whole at {k} bytes says {len}");
                first = Some((j, k));
            }
            (None, Unframed) => first = Some((j, k)),
            (Some((d, at)), j) => {
                assert_eq!(j, d, "{expect:?}: {d:?} at {at} bytes, then {j:?} at {k}")
            }
        }
    }
    first
}

#[test]
fn captured_first_messages_are_whole_at_their_end_and_incomplete_before() {
    for f in framed() {
        let mut buf = f.bytes.to_vec();
        buf.extend_from_slice(b"\r\n\x17\x03\x03 bytes of what follows");
        let whole = Whole {
            proto: f.proto,
            len: f.len,
        };
        for expect in [Expect::Auto, f.expect] {
            assert_eq!(
                decides_once(expect, &buf),
                Some((whole, f.len)),
                "{} under {expect:?}",
                f.name
            );
        }
    }
}

#[test]
fn auto_says_which_protocol_once_the_bytes_tell() {
    let cases: [(&[u8], usize, Proto); 5] = [
        // The method and its space.
        (fixture!("curl_get.bin"), 4, Proto::Http1),
        (fixture!("curl_post_expect.bin"), 5, Proto::Http1),
        // "PRI ", the method reserved for the preface.
        (fixture!("curl_h2_prior.bin"), 4, Proto::Http2),
        // The record header and the handshake type.
        (fixture!("openssl_hello.bin"), 6, Proto::Tls),
        // A valid length and code.
        (fixture!("psql_startup.bin"), 8, Proto::Postgres),
    ];
    for (bytes, at, proto) in cases {
        for k in 0..at {
            assert_eq!(
                judge(Expect::Auto, &bytes[..k]),
                Incomplete(None),
                "{k} of {proto:?}"
            );
        }
        assert_eq!(judge(Expect::Auto, &bytes[..at]), Incomplete(Some(proto)));
    }
}

/// The ClientHello's handshake bytes, whatever records the capture had them in.
fn handshake_of(records: &[u8]) -> Vec<u8> {
    let mut hs = Vec::new();
    let mut at = 0;
    while at + 5 <= records.len() {
        let len = usize::from(u16::from_be_bytes([records[at + 3], records[at + 4]]));
        hs.extend_from_slice(&records[at + 5..at + 5 + len]);
        at += 5 + len;
    }
    hs
}

/// The handshake bytes in records of the given sizes (cycled), as a client with a small
/// maximum fragment length, or a middlebox, would cut them.
fn in_records(hs: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = hs;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(size.clamp(1, 16384).min(rest.len()));
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(now.len() as u16).to_be_bytes());
        out.extend_from_slice(now);
        rest = later;
    }
    out
}

const CHANGE_CIPHER_SPEC: [u8; 6] = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];

#[test]
fn a_client_hello_in_several_records_is_whole_at_the_end_of_the_last() {
    let large = handshake_of(fixture!("openssl_hello_large.bin"));
    // The same client and options, cut into 512-byte records (its random differs).
    assert_eq!(
        large.len(),
        handshake_of(fixture!("openssl_hello_frag512.bin")).len()
    );
    assert_eq!(large.len(), 4 + 1734);
    let small = handshake_of(fixture!("openssl_hello.bin"));
    let splits: [&[usize]; 10] = [
        &[1],
        &[2],
        &[3, 1, 2],
        &[4, 5000],
        &[5],
        &[6, 7],
        &[100],
        &[512],
        &[1737, 1],
        &[16384],
    ];
    for hs in [&large, &small] {
        for sizes in splits {
            let mut buf = in_records(hs, sizes);
            let len = buf.len();
            // What a TLS 1.3 client may send next without waiting: a compatibility CCS.
            buf.extend_from_slice(&CHANGE_CIPHER_SPEC);
            assert_eq!(
                decides_once(Expect::Tls, &buf),
                Some((
                    Whole {
                        proto: Proto::Tls,
                        len
                    },
                    len
                )),
                "records of {sizes:?}"
            );
            assert_eq!(
                judge(Expect::Auto, &buf),
                Whole {
                    proto: Proto::Tls,
                    len
                }
            );
        }
    }
}

#[test]
fn a_record_of_another_type_before_the_hello_is_complete_is_unframed() {
    let hs = handshake_of(fixture!("openssl_hello.bin"));
    let mut buf = in_records(&hs[..100], &[100]);
    let at = buf.len();
    buf.extend_from_slice(&CHANGE_CIPHER_SPEC);
    buf.extend_from_slice(&in_records(&hs[100..], &[512]));
    assert_eq!(decides_once(Expect::Auto, &buf), Some((Unframed, at + 1)));
}

#[test]
fn malformed_tls_is_unframed_at_the_byte_that_says_so() {
    let cases: [(&[u8], usize); 8] = [
        (&[0x16, 0x02], 2),
        (&[0x16, 0x03, 0x05], 3),
        // Empty and oversized records.
        (&[0x16, 0x03, 0x01, 0x00, 0x00], 5),
        (&[0x16, 0x03, 0x01, 0x48, 0x01], 5),
        // A ServerHello.
        (&[0x16, 0x03, 0x01, 0x00, 0x50, 0x02], 6),
        // A legacy version 2.3.
        (
            &[0x16, 0x03, 0x01, 0x00, 0x50, 0x01, 0x00, 0x00, 0x4c, 0x02],
            10,
        ),
        (
            &[
                0x16, 0x03, 0x01, 0x00, 0x50, 0x01, 0x00, 0x00, 0x4c, 0x03, 0x05,
            ],
            11,
        ),
        // A hello of 64 KiB cannot be held whole: decided as soon as its length is read.
        (&[0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x01, 0x00, 0x00], 9),
    ];
    for (bytes, at) in cases {
        for expect in [Expect::Auto, Expect::Tls, Expect::Postgres] {
            assert_eq!(
                decides_once(expect, bytes),
                Some((Unframed, at)),
                "{bytes:x?}"
            );
        }
    }
}

/// A keep-alive request's method dripped a byte at a time is told at its space, and every
/// prefix shorter than that is undecided; whatever is not a method is told at once.
#[test]
fn a_dripped_method_is_told_at_its_space() {
    for m in METHODS {
        let line = [m, &b" / HTTP/1.1\r\n"[..]].concat();
        for k in 1..=m.len() {
            assert_eq!(starts_request(&line[..k]), None, "{:?}", &line[..k]);
        }
        assert_eq!(starts_request(&line[..=m.len()]), Some(true));
        assert!(m.len() < REQUEST_PREFIX);
    }
    assert_eq!(
        starts_request(b"\x81\x05"),
        Some(false),
        "a websocket frame"
    );
    assert_eq!(starts_request(b"GETX"), Some(false));
}

#[test]
fn postgres_messages_are_whole_at_their_length() {
    let startup_3_2 = {
        let mut m = vec![0, 0, 0, 18, 0x00, 0x03, 0x00, 0x02];
        m.extend_from_slice(b"user\0app\0\0");
        m
    };
    let cancel = |key: usize| {
        let len = 12 + key as u32;
        let mut m = len.to_be_bytes().to_vec();
        m.extend_from_slice(&PG_CANCEL_REQUEST.to_be_bytes());
        m.extend_from_slice(&4242u32.to_be_bytes());
        m.resize(len as usize, 0xa5);
        m
    };
    let gssenc = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    let cases: [&[u8]; 5] = [&gssenc, &cancel(4), &cancel(32), &cancel(256), &startup_3_2];
    for m in cases {
        let mut buf = m.to_vec();
        buf.extend_from_slice(b"next");
        let whole = Whole {
            proto: Proto::Postgres,
            len: m.len(),
        };
        for expect in [Expect::Auto, Expect::Postgres] {
            assert_eq!(decides_once(expect, &buf), Some((whole, m.len())), "{m:x?}");
        }
    }
}

#[test]
fn what_cannot_be_postgres_is_unframed_at_the_byte_that_says_so() {
    let cases: [(&[u8], usize); 9] = [
        (&[0, 0, 0, 7], 4),
        (&[0, 0, 0x27, 0x11], 4),
        (&[0, 0x28], 2),
        // SSLRequest and CancelRequest with the wrong length.
        (&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2f], 8),
        (&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2e], 8),
        (&[0, 0, 1, 13, 0x04, 0xd2, 0x16, 0x2e], 8),
        // Protocol 2.0, gone since PostgreSQL 14.
        (&[0, 0, 0, 40, 0x00, 0x02, 0x00, 0x00], 6),
        (&[0, 0, 0, 40, 0x04, 0xd2, 0x16, 0x31], 8),
        (&[0, 0, 0, 40, 0x01], 5),
    ];
    for (bytes, at) in cases {
        for expect in [Expect::Auto, Expect::Postgres] {
            assert_eq!(
                decides_once(expect, bytes),
                Some((Unframed, at)),
                "{bytes:x?}"
            );
        }
    }
}

/// The module docs' table: a client that sends a short message and waits must not be held.
#[test]
fn other_protocols_are_unframed_within_their_first_bytes() {
    let kafka: &[u8] = &[0, 0, 0, 0x2b, 0x00, 0x12, 0x00, 0x03, 0, 0, 0, 1];
    let smb2: &[u8] = &[0, 0, 0, 0xb4, 0xfe, b'S', b'M', b'B', 0x40, 0];
    let cases: [(&str, &[u8], usize); 14] = [
        ("redis-cli PING", fixture!("redis_ping.bin"), 1),
        (
            "redis-cli, interactive",
            fixture!("redis_cli_interactive.bin"),
            1,
        ),
        ("inline PING", b"PING\r\n", 2),
        ("inline GET", b"GET key\r\n", 8),
        ("memcached set", b"set k 0 0 5\r\nhello\r\n", 1),
        ("ssh", fixture!("ssh_banner.bin"), 2),
        ("ssh, no comment", b"SSH-2.0-Go\r\n", 2),
        ("amqp", b"AMQP\0\0\x09\x01", 2),
        ("kafka", kafka, 6),
        ("smb2", smb2, 5),
        ("mqtt", &[0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T'], 1),
        ("memcached binary", &[0x80, 0x01, 0x00, 0x03], 1),
        ("cassandra", &[0x04, 0x00, 0x00, 0x01, 0x05], 1),
        ("rdp", &[0x03, 0x00, 0x00, 0x13, 0x0e], 1),
    ];
    for (name, bytes, at) in cases {
        assert_eq!(
            decides_once(Expect::Auto, bytes),
            Some((Unframed, at)),
            "{name}"
        );
    }
    let unframed_first_bytes = (0..=255u8)
        .filter(|&b| judge(Expect::Auto, &[b]) == Unframed)
        .count();
    // All but 0x16 (TLS), 0x00 (PostgreSQL) and the 16 first letters of registered methods.
    assert_eq!(unframed_first_bytes, 238);
}

/// A Redis inline command looks like the start of a request line; the line's end without a
/// version must let it through, or redis-cli and telnet users wait forever.
#[test]
fn an_inline_command_that_looks_like_a_request_line_is_not_held() {
    for expect in [Expect::Auto, Expect::Http] {
        assert_eq!(judge(expect, b"GET key"), Incomplete(Some(Proto::Http1)));
        assert_eq!(judge(expect, b"GET key\r"), Unframed);
        assert_eq!(judge(expect, b"GET key\r\n"), Unframed);
        assert_eq!(judge(expect, b"SET key value\r\n"), Unframed);
        assert_eq!(judge(expect, b"DEL user:1 user:2\r\n"), Unframed);
    }
}

#[test]
fn an_expectation_tries_its_protocol_only() {
    for f in framed() {
        assert_eq!(judge(Expect::Any, f.bytes), Unframed, "{}", f.name);
        for expect in EXPECTS {
            // Under Postgres, a ClientHello is direct SSL negotiation.
            let tried = expect == Expect::Auto
                || expect == f.expect
                || (expect == Expect::Postgres && f.proto == Proto::Tls);
            let j = judge(expect, f.bytes);
            if tried {
                assert_eq!(
                    j,
                    Whole {
                        proto: f.proto,
                        len: f.len
                    },
                    "{} under {expect:?}",
                    f.name
                );
            } else {
                assert_eq!(
                    decides_once(expect, f.bytes),
                    Some((Unframed, usize::from(expect != Expect::Any))),
                    "{} under {expect:?}",
                    f.name
                );
            }
        }
    }
    assert_eq!(judge(Expect::Any, b""), Unframed);
    assert_eq!(judge(Expect::Auto, b""), Incomplete(None));
    assert_eq!(judge(Expect::Http, b""), Incomplete(Some(Proto::Http1)));
    assert_eq!(judge(Expect::Tls, b""), Incomplete(Some(Proto::Tls)));
    assert_eq!(
        judge(Expect::Postgres, b""),
        Incomplete(Some(Proto::Postgres))
    );
}

fn head_with(headers: usize, eol: &str) -> Vec<u8> {
    let mut h = format!("GET /many HTTP/1.1{eol}Host: example{eol}");
    for i in 0..headers {
        h.push_str(&format!("X-Header-{i}: value {i}{eol}"));
    }
    h.push_str(eol);
    h.into_bytes()
}

#[test]
fn a_head_with_more_headers_than_parsed_is_whole_at_its_empty_line() {
    for eol in ["\r\n", "\n"] {
        let head = head_with(200, eol);
        let mut buf = head.clone();
        buf.extend_from_slice(b"body");
        let whole = Whole {
            proto: Proto::Http1,
            len: head.len(),
        };
        assert_eq!(
            decides_once(Expect::Http, &buf),
            Some((whole, head.len())),
            "{eol:?}"
        );
    }
}

#[test]
fn heads_httparse_refuses_are_unframed() {
    let cases: [&[u8]; 6] = [
        b"GET / HTTP/2.0\r\n\r\n",
        // HTTP/0.9
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example\r\n folded\r\n\r\n",
        // Empty lines before the request line: connected as before, not held.
        b"\r\nGET / HTTP/1.1\r\n\r\n",
        // A method token longer than any registered method.
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n\r\n",
    ];
    for bytes in cases {
        for expect in [Expect::Auto, Expect::Http] {
            assert!(
                matches!(decides_once(expect, bytes), Some((Unframed, _))),
                "{:?} under {expect:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}

#[test]
fn a_first_message_longer_than_the_bound_is_unframed_when_the_bound_is_reached() {
    let head = |cookie: usize| {
        let mut h = b"GET / HTTP/1.1\r\nCookie: ".to_vec();
        h.resize(h.len() + cookie, b'c');
        h.extend_from_slice(b"\r\n\r\n");
        h
    };
    let at_bound = head(MAX_FIRST_MESSAGE - head(0).len());
    assert_eq!(at_bound.len(), MAX_FIRST_MESSAGE);
    let whole = Whole {
        proto: Proto::Http1,
        len: MAX_FIRST_MESSAGE,
    };
    assert_eq!(judge(Expect::Auto, &at_bound), whole);
    assert_eq!(
        judge(Expect::Auto, &at_bound[..MAX_FIRST_MESSAGE - 1]),
        Incomplete(Some(Proto::Http1))
    );
    let over = head(MAX_FIRST_MESSAGE + 1000);
    assert_eq!(
        judge(Expect::Auto, &over[..MAX_FIRST_MESSAGE - 1]),
        Incomplete(Some(Proto::Http1))
    );
    assert_eq!(judge(Expect::Auto, &over[..MAX_FIRST_MESSAGE]), Unframed);
    assert_eq!(judge(Expect::Auto, &over), Unframed);
}

#[test]
fn the_h2_preface_must_be_followed_by_settings() {
    let frame = |len: u32, kind: u8, flags: u8, stream: u32| {
        let mut b = H2_PREFACE.to_vec();
        b.extend_from_slice(&len.to_be_bytes()[1..]);
        b.extend_from_slice(&[kind, flags]);
        b.extend_from_slice(&stream.to_be_bytes());
        b.resize(b.len() + len as usize, 0);
        b
    };
    let empty = frame(0, H2_SETTINGS, 0, 0);
    let whole = Whole {
        proto: Proto::Http2,
        len: 33,
    };
    assert_eq!(decides_once(Expect::Http, &empty), Some((whole, 33)));
    // The reserved bit of the stream id is ignored.
    assert_eq!(
        judge(Expect::Auto, &frame(6, H2_SETTINGS, 0, 1 << 31)),
        Whole {
            proto: Proto::Http2,
            len: 39
        }
    );
    let cases = [
        (frame(6, 0x8, 0, 0), 28),
        (frame(0, H2_SETTINGS, H2_FLAG_ACK, 0), 29),
        (frame(7, H2_SETTINGS, 0, 0), 27),
        (frame(16386, H2_SETTINGS, 0, 0), 27),
        (frame(6, H2_SETTINGS, 0, 1), 33),
    ];
    for (bytes, at) in cases {
        assert_eq!(
            decides_once(Expect::Auto, &bytes),
            Some((Unframed, at)),
            "{:x?}",
            &bytes[24..33]
        );
    }
    for k in 4..24 {
        assert_eq!(
            judge(Expect::Auto, &H2_PREFACE[..k]),
            Incomplete(Some(Proto::Http2))
        );
    }
}

fn expect() -> impl Strategy<Value = Expect> {
    proptest::sample::select(EXPECTS.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random bytes, started the way each framing starts so that they get past the first
    /// byte: never a panic, and decided once, whatever the segmentation.
    #[test]
    fn random_bytes_are_decided_once(
        expect in expect(),
        first in proptest::sample::select(vec![0u8, 0x16, b'G', b'P', b'\r', 0x80]),
        rest in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut buf = vec![first];
        buf.extend_from_slice(&rest);
        decides_once(expect, &buf);
    }

    /// Captured messages with a few bytes changed, cut short or followed by junk: the same.
    #[test]
    fn damaged_first_messages_are_decided_once(
        expect in expect(),
        pick in any::<proptest::sample::Index>(),
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
        cut in any::<proptest::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let all = framed();
        let f = pick.get(&all);
        let mut buf = f.bytes.to_vec();
        for (at, b) in &flips {
            *at.get_mut(&mut buf) = *b;
        }
        buf.truncate(cut.index(buf.len() + 1));
        buf.extend_from_slice(&tail);
        decides_once(expect, &buf);
    }

    /// Any cut of a ClientHello into records is whole at the end of the last one.
    #[test]
    fn any_cut_of_a_client_hello_into_records_is_whole(
        sizes in proptest::collection::vec(1usize..700, 1..6),
    ) {
        let hs = handshake_of(fixture!("openssl_hello_large.bin"));
        let buf = in_records(&hs, &sizes);
        let whole = Whole { proto: Proto::Tls, len: buf.len() };
        prop_assert_eq!(judge(Expect::Tls, &buf), whole);
        prop_assert_eq!(judge(Expect::Auto, &buf), whole);
        let k = buf.len() - 1;
        prop_assert_eq!(judge(Expect::Auto, &buf[..k]), Incomplete(Some(Proto::Tls)));
    }

    /// A full buffer is never left undecided.
    #[test]
    fn a_full_buffer_is_decided(
        expect in expect(),
        first in proptest::sample::select(vec![0u8, 0x16, b'G']),
        fill in any::<u8>(),
    ) {
        let mut buf = vec![fill; MAX_FIRST_MESSAGE];
        buf[0] = first;
        prop_assert!(!matches!(judge(expect, &buf), Incomplete(_)));
    }
}
