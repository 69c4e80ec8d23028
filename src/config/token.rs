//! The admin token: the secret that opens `/sources`, `/config` and `POST /reload` to a
//! client that is not on loopback.
//!
//! It comes from the environment ([`ADMIN_TOKEN_ENV`]) or from a file (`[admin] token_file`),
//! never from the config text itself, so `/config`, `halfguard check` and the start log can
//! print the whole configuration without it. Its `Debug` is redacted for the same reason.
//! The token is read again at every reload, so a rotated secret file takes effect without a
//! restart.

use std::fmt;
use std::path::{Path, PathBuf};

/// The environment variable that holds the admin token itself. Clients of the admin
/// endpoint (`curl`, `halfguard top`) read the same variable and send
/// `Authorization: Bearer <token>`.
pub const ADMIN_TOKEN_ENV: &str = "HALFGUARD_ADMIN_TOKEN";

/// Shorter tokens are refused: a token is the only thing between the network and a reload.
pub const MIN_TOKEN_LEN: usize = 16;

/// Where a token came from, for messages and `/config` (never the token itself).
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    Env,
    File(PathBuf),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Env => write!(f, "environment variable {ADMIN_TOKEN_ENV}"),
            TokenSource::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

/// The admin token. Compared in constant time; printed as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    secret: String,
    pub source: TokenSource,
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminToken(<redacted>, from {})", self.source)
    }
}

impl AdminToken {
    /// Checks `text` (a file's content or a variable's value, trailing whitespace dropped).
    pub fn new(text: &str, source: TokenSource) -> Result<AdminToken, String> {
        let secret = text.trim_end();
        if secret.is_empty() {
            return Err("the token is empty".into());
        }
        if let Some(bad) = secret.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "the token has a character that cannot travel in an HTTP header ({:?}); use printable ASCII without spaces",
                bad.escape_default().to_string()
            ));
        }
        if secret.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the token has {} characters; use at least {MIN_TOKEN_LEN} (for example `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        Ok(AdminToken {
            secret: secret.to_string(),
            source,
        })
    }

    /// Reads a token file. Relative paths are taken from the config file's directory.
    pub fn from_file(path: &Path, config_file: &str) -> Result<AdminToken, String> {
        let full = if path.is_relative() {
            Path::new(config_file)
                .parent()
                .map_or_else(|| path.to_path_buf(), |d| d.join(path))
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&full)
            .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
        AdminToken::new(&text, TokenSource::File(full.clone()))
            .map_err(|r| format!("{}: {r}", full.display()))
    }

    /// True when `given` is the token. The time taken depends on the token's length only,
    /// not on how much of `given` matches.
    pub fn matches(&self, given: &[u8]) -> bool {
        let want = self.secret.as_bytes();
        let mut diff = u8::from(given.len() != want.len());
        for (i, w) in want.iter().enumerate() {
            diff |= given.get(i).copied().unwrap_or(0) ^ w;
        }
        std::hint::black_box(diff) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_itself_only_and_never_prints() {
        let t = AdminToken::new("0123456789abcdef\n", TokenSource::Env).unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeX"));
        assert!(!t.matches(b"0123456789abcdef0"));
        assert!(!t.matches(b"0123456789abcde"));
        assert!(!t.matches(b""));
        assert!(!format!("{t:?}").contains("0123"));
        assert!(AdminToken::new("short", TokenSource::Env).is_err());
        assert!(AdminToken::new("has a space in it, long enough", TokenSource::Env).is_err());
        assert!(AdminToken::new("  \n", TokenSource::Env).is_err());
    }
}
