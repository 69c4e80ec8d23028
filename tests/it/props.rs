//! Property tests: PROXY headers round-trip and never panic on junk; source keys aggregate
//! exactly by prefix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use halfguard::guard::SourceKey;
use halfguard::proxy_protocol::{MAX_HEADER, Parsed, encode_v1, encode_v2, parse};
use proptest::prelude::*;

fn v4() -> impl Strategy<Value = SocketAddr> {
    (any::<u32>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(Ipv4Addr::from(a).into(), p))
}

fn v6() -> impl Strategy<Value = SocketAddr> {
    (any::<u128>(), any::<u16>())
        .prop_filter("not v4-mapped", |(a, _)| {
            Ipv6Addr::from(*a).to_ipv4_mapped().is_none()
        })
        .prop_map(|(a, p)| SocketAddr::new(Ipv6Addr::from(a).into(), p))
}

fn pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![(v4(), v4()), (v6(), v6())]
}

proptest! {
    #[test]
    fn v1_and_v2_headers_round_trip((src, dst) in pair(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        for mut h in [encode_v1(src, dst), encode_v2(src, dst)] {
            let len = h.len();
            h.extend_from_slice(&tail);
            match parse(&h) {
                Ok(Parsed::Done(got)) => {
                    prop_assert_eq!(got.len, len);
                    prop_assert_eq!(got.addrs, Some((src, dst)));
                }
                other => prop_assert!(false, "{:?}", other),
            }
            // Every strict prefix asks for more.
            for cut in 0..len {
                let incomplete = matches!(parse(&h[..cut]), Ok(Parsed::Incomplete { .. }));
                prop_assert!(incomplete, "cut {}", cut);
            }
        }
    }

    #[test]
    fn junk_never_panics_and_never_overreads(data in proptest::collection::vec(any::<u8>(), 0..700)) {
        if let Ok(Parsed::Done(h)) = parse(&data) {
            prop_assert!(h.len <= data.len() && h.len <= MAX_HEADER);
        }
    }

    #[test]
    fn junk_after_a_valid_prefix_never_panics(
        v2 in any::<bool>(),
        (src, dst) in pair(),
        cut in 0usize..60,
        junk in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let h = if v2 { encode_v2(src, dst) } else { encode_v1(src, dst) };
        let mut data = h[..cut.min(h.len())].to_vec();
        data.extend_from_slice(&junk);
        let _ = parse(&data);
    }

    #[test]
    fn ipv4_sources_share_a_key_exactly_when_their_prefix_matches(a in any::<u32>(), b in any::<u32>(), p in 1u8..=32) {
        let ka = SourceKey::new(IpAddr::V4(a.into()), p, 64);
        let kb = SourceKey::new(IpAddr::V4(b.into()), p, 64);
        let mask = u32::MAX << (32 - u32::from(p));
        prop_assert_eq!(ka == kb, a & mask == b & mask);
        // A v4-mapped v6 address is the same source as the v4 one.
        let mapped = SourceKey::new(IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped()), p, 64);
        prop_assert_eq!(mapped, ka);
    }

    #[test]
    fn ipv6_sources_share_a_key_exactly_when_their_prefix_matches(a in any::<u128>(), b in any::<u128>(), p in 1u8..=128) {
        let (ia, ib) = (Ipv6Addr::from(a), Ipv6Addr::from(b));
        let wraps_v4 = |x: u128| Ipv6Addr::from(x).to_ipv4_mapped().is_some() || x >> 32 == NAT64 >> 32;
        prop_assume!(!wraps_v4(a) && !wraps_v4(b));
        let ka = SourceKey::new(IpAddr::V6(ia), 32, p);
        let kb = SourceKey::new(IpAddr::V6(ib), 32, p);
        let mask = u128::MAX << (128 - u32::from(p));
        prop_assert_eq!(ka == kb, a & mask == b & mask);
    }

    #[test]
    fn nat64_clients_are_the_ipv4_sources_they_embed(a in any::<u32>(), b in any::<u32>(), p in 1u8..=32, p6 in 1u8..=128) {
        let nat64 = |x: u32| IpAddr::V6(Ipv6Addr::from(NAT64 | u128::from(x)));
        let ka = SourceKey::new(nat64(a), p, p6);
        prop_assert_eq!(ka, SourceKey::new(IpAddr::V4(a.into()), p, p6));
        let mask = u32::MAX << (32 - u32::from(p));
        prop_assert_eq!(ka == SourceKey::new(nat64(b), p, p6), a & mask == b & mask);
    }
}

/// `64:ff9b::/96`, the well-known NAT64 prefix.
const NAT64: u128 = 0x0064_ff9b << 96;
