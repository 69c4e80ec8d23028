//! The admin endpoint as `halfguard top` sees it: where it is, and one GET to it.
//!
//! One request per connection (`Connection: close`) through hyper's client connection: no
//! pool and no TLS, because the admin endpoint speaks plain HTTP on loopback or on the pod's
//! own network, and a fresh connection per refresh is what a scrape does anyway. Every
//! failure is a [`FetchError`] that reads as one line on screen, never a panic.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::StatusCode;
use hyper::header::{AUTHORIZATION, CONNECTION, HOST, HeaderValue};
use hyper_util::rt::TokioIo;

/// The port `[admin] bind` defaults to, used when `--admin` names a host without one.
pub const DEFAULT_PORT: u16 = 9901;

/// A response body larger than this is not an admin answer worth showing.
const MAX_BODY: usize = 16 << 20;

/// Where the admin endpoint is, and the token to show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`, as connected to and sent in `Host`.
    authority: String,
    /// A path prefix before `/metrics`, for an endpoint behind a path-routing proxy.
    prefix: String,
    token: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    // The token stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("authority", &self.authority)
            .field("prefix", &self.prefix)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.authority, self.prefix)
    }
}

/// Why one GET gave nothing to show.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    // The io error is in the message, not a `source`, so a chain printer says it once.
    #[error("cannot reach the admin endpoint at {at}: {err}")]
    Connect { at: String, err: std::io::Error },
    #[error("no answer from the admin endpoint at {at} within {}", humantime::format_duration(*.within))]
    Timeout { at: String, within: Duration },
    #[error(
        "{path}: {status}: this halfguard wants an admin token (--token or HALFGUARD_ADMIN_TOKEN)"
    )]
    NeedsToken { path: String, status: StatusCode },
    #[error("{path}: {status}: the admin token was refused")]
    TokenRefused { path: String, status: StatusCode },
    #[error("{path}: not found: this halfguard is a version without it")]
    Missing { path: String },
    #[error("{path}: {status}: {body}")]
    Status {
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("the admin endpoint at {at} broke the HTTP exchange: {why}")]
    Http { at: String, why: String },
    #[error("the admin token cannot be sent in an HTTP header")]
    BadToken,
}

/// `--admin` that is not an address.
#[derive(Debug, thiserror::Error)]
#[error("--admin {given:?}: {why}")]
pub struct BadEndpoint {
    given: String,
    why: &'static str,
}

impl Endpoint {
    /// Reads `--admin`: `host:port`, `host` (port 9901), `[v6]:port`, a bare IPv6 address,
    /// each with an optional `http://` in front and a path prefix behind.
    pub fn parse(given: &str, token: Option<String>) -> Result<Endpoint, BadEndpoint> {
        let bad = |why| BadEndpoint {
            given: given.to_string(),
            why,
        };
        let s = given.trim();
        if s.starts_with("https://") {
            return Err(bad(
                "https is not supported: the admin endpoint speaks plain HTTP",
            ));
        }
        let s = s.strip_prefix("http://").unwrap_or(s);
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(Endpoint::from_addr(
                SocketAddr::new(ip, DEFAULT_PORT),
                token,
            ));
        }
        let (authority, prefix) = match s.find('/') {
            Some(i) => (&s[..i], s[i..].trim_end_matches('/')),
            None => (s, ""),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains(char::is_whitespace) || authority.contains('@') {
            return Err(bad("not a host:port"));
        }
        let has_port = match authority.rfind(':') {
            Some(i) => {
                let port = &authority[i + 1..];
                if authority.starts_with('[') && !authority[..i].ends_with(']') {
                    false
                } else if port.parse::<u16>().is_err() {
                    return Err(bad("the port is not a number from 0 to 65535"));
                } else {
                    true
                }
            }
            None => false,
        };
        let authority = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:{DEFAULT_PORT}")
        };
        Ok(Endpoint {
            authority,
            prefix: prefix.to_string(),
            token,
        })
    }

    /// The endpoint a halfguard bound to `bind` serves; a wildcard bind is reached on the
    /// loopback address of its family, from this host or from another container in the pod.
    pub fn from_addr(bind: SocketAddr, token: Option<String>) -> Endpoint {
        let mut a = bind;
        if a.ip().is_unspecified() {
            a.set_ip(match a {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        Endpoint {
            authority: a.to_string(),
            prefix: String::new(),
            token,
        }
    }

    /// GETs `path` (with its query) and returns the body of a 200, within `within`.
    pub async fn get(&self, path: &str, within: Duration) -> Result<String, FetchError> {
        match tokio::time::timeout(within, self.exchange(path)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout {
                at: self.to_string(),
                within,
            }),
        }
    }

    async fn exchange(&self, path: &str) -> Result<String, FetchError> {
        let at = self.to_string();
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|err| FetchError::Connect {
                at: at.clone(),
                err,
            })?;
        let http = |e: &dyn std::fmt::Display| FetchError::Http {
            at: at.clone(),
            why: e.to_string(),
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| http(&e))?;
        // The connection is driven beside the request, and dropped with it.
        let driver = tokio::spawn(conn);
        let _abort = AbortOnDrop(driver);
        let full = format!("{}{path}", self.prefix);
        let mut req = hyper::Request::get(full.as_str())
            .header(HOST, self.authority.as_str())
            .header(CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| http(&e))?;
        if let Some(t) = &self.token {
            let v =
                HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| FetchError::BadToken)?;
            req.headers_mut().insert(AUTHORIZATION, v);
        }
        let res = sender.send_request(req).await.map_err(|e| http(&e))?;
        let status = res.status();
        let body = Limited::new(res.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| http(&*e))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        let path = path.split('?').next().unwrap_or(path).to_string();
        match status {
            StatusCode::OK => Ok(body),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if self.token.is_none() => {
                Err(FetchError::NeedsToken { path, status })
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(FetchError::TokenRefused { path, status })
            }
            StatusCode::NOT_FOUND => Err(FetchError::Missing { path }),
            _ => Err(FetchError::Status {
                path,
                status,
                body: body
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(120)
                    .collect(),
            }),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> String {
        Endpoint::parse(s, None).unwrap().to_string()
    }

    #[test]
    fn admin_addresses_in_the_forms_people_type() {
        assert_eq!(parsed("127.0.0.1:9902"), "127.0.0.1:9902");
        assert_eq!(parsed("http://127.0.0.1:9902/"), "127.0.0.1:9902");
        assert_eq!(parsed("localhost"), "localhost:9901");
        assert_eq!(
            parsed("halfguard.ns.svc:80/admin/"),
            "halfguard.ns.svc:80/admin"
        );
        assert_eq!(parsed("[::1]:9902"), "[::1]:9902");
        assert_eq!(parsed("[::1]"), "[::1]:9901");
        assert_eq!(parsed("::1"), "[::1]:9901");
        assert_eq!(parsed("10.0.0.7"), "10.0.0.7:9901");
        for bad in ["", "https://x:1", "host:99999", "host:port", "http:///x"] {
            assert!(Endpoint::parse(bad, None).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_wildcard_bind_is_reached_on_loopback() {
        let e = Endpoint::from_addr("0.0.0.0:9901".parse().unwrap(), None);
        assert_eq!(e.to_string(), "127.0.0.1:9901");
        let e = Endpoint::from_addr("[::]:9901".parse().unwrap(), None);
        assert_eq!(e.to_string(), "[::1]:9901");
        let e = Endpoint::from_addr("10.1.2.3:9901".parse().unwrap(), None);
        assert_eq!(e.to_string(), "10.1.2.3:9901");
    }

    #[test]
    fn the_token_stays_out_of_debug_output() {
        let e = Endpoint::parse("127.0.0.1:1", Some("s3cret".into())).unwrap();
        assert!(!format!("{e:?} {e}").contains("s3cret"));
    }
}
