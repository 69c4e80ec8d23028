//! String choices such as `on_full = "evict"`: each enum's spellings are written once, in
//! its [`choice!`] declaration, and its `as_str`, its parser and the error that lists the
//! allowed values are all made from that one list, so they cannot disagree.
//!
//! The raw tables keep the value as written and the section's `from_raw` parses it through
//! [`Checker::choice`](super::Checker::choice), rather than serde while deserialising: the
//! error is then raised where the key is checked, after the keys read before it (as the
//! config's other checks are), and it reads `"x" is not "evict" or "reject"` where serde
//! would say "unknown variant". The `config` crate hands over a number or a boolean written
//! for a string as its text, so `on_full = 5` is `"5" is not ...` too.

/// An enum whose values are spelt in the config file; implemented by [`choice!`].
pub(crate) trait Choice: Copy + 'static {
    /// Every value, in the order messages list them.
    const ALL: &'static [Self];

    /// The spelling in the config file.
    fn spelling(self) -> &'static str;
}

/// Declares a `Copy` enum with its config spellings: `Variant = "spelling"`.
macro_rules! choice {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $spelling:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// The spelling in the config file, as `check` and `/config` print it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $spelling, )+
                }
            }
        }

        impl $crate::config::choice::Choice for $name {
            const ALL: &'static [$name] = &[$( $name::$variant, )+];

            fn spelling(self) -> &'static str {
                self.as_str()
            }
        }
    };
}
pub(super) use choice;

/// The value of `T` spelt `s`, or why not, naming every spelling.
pub(super) fn parse<T: Choice>(s: &str) -> Result<T, String> {
    T::ALL
        .iter()
        .copied()
        .find(|c| c.spelling() == s)
        .ok_or_else(|| not_one_of(s, T::ALL.iter().map(|c| c.spelling())))
}

/// The spelling that turns an optional choice off.
const OFF: &str = "off";

/// `"off"` as `None`, else the value of `T` spelt `s`; the error names `"off"` first.
pub(super) fn parse_or_off<T: Choice>(s: &str) -> Result<Option<T>, String> {
    if s == OFF {
        return Ok(None);
    }
    parse(s).map(Some).map_err(|_| {
        not_one_of(
            s,
            std::iter::once(OFF).chain(T::ALL.iter().map(|c| c.spelling())),
        )
    })
}

/// `"x" is not "a", "b" or "c"`.
fn not_one_of<'a>(s: &str, spellings: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = spellings.map(|c| format!("{c:?}")).collect();
    let listed = match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    format!("{s:?} is not {listed}")
}

#[cfg(test)]
mod tests {
    use super::super::{Balance, LogFormat, Mode, OnDown, OnFull, Protocol, ProxyVersion};
    use super::*;

    /// Every value reads back from its own spelling, and no two share one.
    fn round_trips<T: Choice + PartialEq + std::fmt::Debug>() {
        for &c in T::ALL {
            assert_eq!(parse::<T>(c.spelling()), Ok(c), "{}", c.spelling());
            assert_eq!(parse_or_off::<T>(c.spelling()), Ok(Some(c)));
            let same = T::ALL.iter().filter(|o| o.spelling() == c.spelling());
            assert_eq!(same.count(), 1, "{} is spelt twice", c.spelling());
        }
        assert_eq!(parse_or_off::<T>("off"), Ok(None));
    }

    #[test]
    fn every_choice_round_trips_through_its_spelling() {
        round_trips::<OnFull>();
        round_trips::<Mode>();
        round_trips::<Protocol>();
        round_trips::<LogFormat>();
        round_trips::<Balance>();
        round_trips::<ProxyVersion>();
        round_trips::<OnDown>();
    }

    #[test]
    fn a_bad_value_is_named_with_every_choice() {
        assert_eq!(
            parse::<OnFull>("evicted").unwrap_err(),
            r#""evicted" is not "evict" or "reject""#
        );
        assert_eq!(
            parse::<Balance>("Round-Robin").unwrap_err(),
            r#""Round-Robin" is not "round-robin", "least-conn" or "random-two""#
        );
        assert_eq!(
            parse_or_off::<ProxyVersion>("v3").unwrap_err(),
            r#""v3" is not "off", "v1" or "v2""#
        );
        assert_eq!(
            parse::<Protocol>("").unwrap_err(),
            r#""" is not "client-first" or "server-first""#
        );
    }
}
