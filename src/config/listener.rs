//! `[[listeners]]`: an address to accept on, the pool it forwards to, which side speaks
//! first, and its own `limits` and `timeouts` over the top-level ones.
//!
//! A listener's checks that involve other listeners or the pools (unique names and binds,
//! the pool it names) go through [`super::Taken`], in the order the keys are read, so the
//! first mistake in the file is the one reported.

use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::addr::parse_net;
use super::choice::choice;
use super::{
    Checker, ConfigError, Limits, PoolConfig, RawLimits, RawTimeouts, Taken, Timeouts, dur,
};

/// One `[[listeners]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<String>,
    pub bind: Option<String>,
    /// The short form: a pool of these servers, named after the listener.
    pub backends: Option<Vec<String>>,
    /// The long form: the name of a `[[backends]]` pool.
    pub backend: Option<String>,
    /// A [`Protocol`] spelling.
    pub protocol: Option<String>,
    /// A [`FirstMessage`] spelling.
    pub first_message: Option<String>,
    pub accept_proxy: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
    /// Keys set here replace the top-level `[limits]` for this listener only.
    pub limits: Option<RawLimits>,
    /// Keys set here replace the top-level `[timeouts]` for this listener only.
    pub timeouts: Option<RawTimeouts>,
}

choice! {
    /// Which side speaks first on a listener's protocol.
    pub enum Protocol {
        /// HTTP, TLS and most protocols: the client speaks first, so halfguard waits for the
        /// first byte before it spends a backend connection.
        ClientFirst = "client-first",
        /// SMTP, MySQL, PostgreSQL-less greeting protocols: the backend speaks first, so the
        /// backend is connected at once and the connection counts as half-open until a byte
        /// moves in either direction.
        ServerFirst = "server-first",
    }
}

choice! {
    /// What a client-first listener's first message is, so that a backend is connected only
    /// once it is whole (see `conn::holding`).
    pub enum FirstMessage {
        /// Recognised from the first bytes: HTTP/1, HTTP/2 with prior knowledge, TLS,
        /// PostgreSQL; anything else connects at the first byte.
        Auto = "auto",
        /// Only an HTTP/1 request head (or an HTTP/2 preface) is held.
        Http = "http",
        /// Only a TLS ClientHello is held.
        Tls = "tls",
        /// Only a PostgreSQL startup packet (or SSL/GSS request) is held.
        Postgres = "postgres",
        /// Nothing is held: the backend is connected at the first byte.
        Any = "any",
    }
}

/// One listener with its limits and timeouts already merged over the top-level ones.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// The name of the pool this listener forwards to.
    pub backend: String,
    pub protocol: Protocol,
    /// Held until whole before the backend is connected (client-first listeners only).
    pub first_message: FirstMessage,
    /// Expect a PROXY protocol v1/v2 header from `trusted_proxies`; caps then apply to the
    /// address in the header.
    pub accept_proxy: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub limits: Limits,
    pub timeouts: Timeouts,
}

impl ListenerConfig {
    /// `listeners[i]`, over the top-level `limits` and `timeouts`. A short `backends` list
    /// becomes a pool in `taken`.
    pub(super) fn from_raw(
        ck: &Checker<'_>,
        l: &RawListener,
        i: usize,
        (limits, timeouts): (&Limits, &Timeouts),
        taken: &mut Taken,
    ) -> Result<ListenerConfig, ConfigError> {
        let at = |k: &str| format!("listeners[{i}].{k}");
        let name = match &l.name {
            Some(n) if !n.trim().is_empty() => n.clone(),
            Some(_) => return Err(ck.err(at("name"), "must not be empty")),
            None => return Err(ck.err(at("name"), "is required")),
        };
        taken.listener_name(ck, &name, at("name"))?;
        let bind_s = l
            .bind
            .as_deref()
            .ok_or_else(|| ck.err(at("bind"), "is required"))?;
        let bind: SocketAddr = bind_s
            .parse()
            .map_err(|_| ck.err(at("bind"), format!("{bind_s:?} is not an ip:port address")))?;
        taken.bind(ck, bind, at("bind"))?;
        let backend = backend(ck, l, &name, &at, taken)?;
        let trusted_proxies = match &l.trusted_proxies {
            None => Vec::new(),
            Some(v) => v
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    parse_net(s).map_err(|r| ck.err(at(&format!("trusted_proxies[{j}]")), r))
                })
                .collect::<Result<_, _>>()?,
        };
        let accept_proxy = l.accept_proxy.unwrap_or(false);
        if accept_proxy && trusted_proxies.is_empty() {
            return Err(ck.err(
                at("trusted_proxies"),
                "accept_proxy needs the load balancers' CIDRs: a PROXY header from anyone would let any client choose its source address",
            ));
        }
        let protocol = ck.choice(l.protocol.as_deref(), at("protocol"), Protocol::ClientFirst)?;
        let first_message = ck.choice(
            l.first_message.as_deref(),
            at("first_message"),
            FirstMessage::Auto,
        )?;
        let limits = match &l.limits {
            Some(over) => Limits::from_raw(ck, limits, over, &at("limits"))?,
            None => limits.clone(),
        };
        let timeouts = match &l.timeouts {
            Some(over) => Timeouts::from_raw(ck, timeouts, over, &at("timeouts"))?,
            None => timeouts.clone(),
        };
        Ok(ListenerConfig {
            name,
            bind,
            backend,
            protocol,
            first_message,
            accept_proxy,
            trusted_proxies,
            limits,
            timeouts,
        })
    }

    /// Valid, but probably not what the operator means.
    pub(super) fn warning(&self) -> Option<String> {
        let (lim, t) = (&self.limits, &self.timeouts);
        (lim.max_half_open_per_source > 0 && lim.grace >= t.first_byte).then(|| {
            format!(
                "listener {:?}: limits.grace ({}) is not below timeouts.first_byte ({}): a silent \
                 connection times out before it counts against max_half_open_per_source",
                self.name,
                dur(lim.grace),
                dur(t.first_byte)
            )
        })
    }
}

/// The pool a listener forwards to: a `[[backends]]` pool by name, or its own short list.
fn backend(
    ck: &Checker<'_>,
    l: &RawListener,
    name: &str,
    at: &impl Fn(&str) -> String,
    taken: &mut Taken,
) -> Result<String, ConfigError> {
    match (&l.backends, &l.backend) {
        (Some(_), Some(_)) => Err(ck.err(
            at("backend"),
            "give either `backend = \"pool\"` or a `backends` list, not both",
        )),
        (None, None) => Err(ck.err(
            at("backends"),
            "is required: a list of \"host:port\", or `backend = \"pool\"`",
        )),
        (None, Some(pool)) => {
            taken.pool_named(ck, pool, at("backend"))?;
            Ok(pool.clone())
        }
        (Some(list), None) => {
            if list.is_empty() {
                return Err(ck.err(at("backends"), "needs at least one \"host:port\""));
            }
            let servers = (list.iter().enumerate())
                .map(|(j, b)| {
                    b.parse()
                        .map_err(|r| ck.err(at(&format!("backends[{j}]")), r))
                })
                .collect::<Result<_, _>>()?;
            taken.short_pool(ck, PoolConfig::short(name, servers), at("name"))?;
            Ok(name.to_string())
        }
    }
}

/// Five lines: the listener, its caps (three) and its clocks.
impl fmt::Display for ListenerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "listener {:?} on {} ({}{}{}) -> pool {:?}",
            self.name,
            self.bind,
            self.protocol.as_str(),
            match self.protocol {
                Protocol::ClientFirst => format!(", first message {}", self.first_message.as_str()),
                Protocol::ServerFirst => String::new(),
            },
            if self.accept_proxy {
                format!(
                    ", PROXY protocol from {} prefix(es)",
                    self.trusted_proxies.len()
                )
            } else {
                String::new()
            },
            self.backend
        )?;
        writeln!(f, "{}", self.limits)?;
        write!(f, "{}", self.timeouts)
    }
}
