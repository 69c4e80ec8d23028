//! Any bytes from a client must be judged without a panic, and a whole first message must
//! be whole at its own length and incomplete one byte short of it, whatever follows it:
//! the decision must not depend on how TCP cut the bytes.
#![no_main]

use halfguard::first_message::{Expect, Judgement, MAX_FIRST_MESSAGE, judge};
use libfuzzer_sys::fuzz_target;

const EXPECTS: [Expect; 5] = [Expect::Auto, Expect::Http, Expect::Tls, Expect::Postgres, Expect::Any];

fuzz_target!(|data: &[u8]| {
    for expect in EXPECTS {
        let j = judge(expect, data);
        if let Judgement::Whole { len, .. } = j {
            assert!(len <= data.len() && len <= MAX_FIRST_MESSAGE);
            assert_eq!(judge(expect, &data[..len]), j);
            assert!(matches!(judge(expect, &data[..len - 1]), Judgement::Incomplete(_)));
        }
        if data.len() >= MAX_FIRST_MESSAGE {
            assert!(!matches!(j, Judgement::Incomplete(_)));
        }
    }
});
