//! Any bytes from a client must end in a header, a request for more, or an error: never a
//! panic, and never a header longer than the input or than MAX_HEADER.
#![no_main]

use halfguard::proxy_protocol::{MAX_HEADER, Parsed, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Done(h)) = parse(data) {
        assert!(h.len <= data.len());
        assert!(h.len <= MAX_HEADER);
        // Whatever follows the header does not change it.
        assert_eq!(parse(&data[..h.len]), Ok(Parsed::Done(h)));
    }
});
