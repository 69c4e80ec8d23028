//! The admin endpoint: `GET /metrics`, `/healthz`, `/readyz`, `/sources?top=N&by=...`,
//! `/config`, and `POST /reload`.
//!
//! Seeing is public, steering is private. Probes and scrapers (`/healthz`, `/readyz`,
//! `/metrics`) answer anyone who reaches the port, so it can be bound to the pod address for
//! the kubelet. What reveals clients or changes behaviour (`/sources`, `/config`,
//! `POST /reload`) needs `Authorization: Bearer <token>` (the token from
//! `HALFGUARD_ADMIN_TOKEN` or `[admin] token_file`) or, unless `trust_loopback` is off, a
//! loopback client that names the host by address or `localhost` (a page whose name was
//! rebound to 127.0.0.1 sends its own name). `POST /reload` also refuses anything a browser
//! sends cross-site: an `Origin`, a `Sec-Fetch-Site` other than `none`, a form content
//! type, a body.
//!
//! It must stay reachable while the data port is under attack, and must not become a target
//! itself: it has its own header clock (`admin.header_timeout`) and connection caps. The
//! socket hands over connections only once their request arrived (TCP_DEFER_ACCEPT), so a
//! connection is sorted at accept by its first bytes: `GET /healthz` and `GET /readyz` take
//! one of `admin.probe_conns` reserved slots (one request each), everything else one of
//! `admin.max_conns`. At a cap, the oldest connection of the client source (an address, an
//! IPv6 /64, as the data path keys them) holding the most slots of that kind is dropped for
//! the newcomer, so a flood, however fast and from however many addresses of its /64,
//! evicts itself and not the kubelet's probe.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Handle, State};
use crate::config::AdminConfig;
use crate::guard::{SourceKey, SourceOrder};
use crate::metrics;
use crate::sockopt;

impl State {
    /// What a scrape reads, gathered now.
    fn metrics(&self) -> metrics::Snapshot {
        metrics::Snapshot {
            listeners: self
                .listeners()
                .iter()
                .map(|r| metrics::ListenerSnapshot {
                    name: r.ctx.name.clone(),
                    retired: r.is_retired(),
                    guard: r.ctx.guard.snapshot(),
                    limits: r.ctx.guard.limits(),
                    stats: r.ctx.stats.clone(),
                })
                .collect(),
            fds: self.fds(),
            pools: self.pools(),
            kernel: self.kernel.counts(),
            cluster: self.cluster.clone(),
            reloads: self.reloads(),
            memory: self
                .memory
                .lock()
                .map(|m| (m.last().clone(), m.short()))
                .unwrap_or_default(),
        }
    }
}

/// `/sources` never lists more than this many sources per listener.
const MAX_TOP: usize = 1000;

/// What an admin connection is, by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Opened with a liveness or readiness probe: a reserved slot, one request.
    Probe,
    General,
}

/// Sorts a connection by the bytes it has sent so far.
fn classify(first: &[u8]) -> Class {
    for path in [&b"GET /healthz"[..], b"GET /readyz"] {
        if let Some(rest) = first.strip_prefix(path)
            && matches!(rest.first(), Some(b' ' | b'?'))
        {
            return Class::Probe;
        }
    }
    Class::General
}

struct Slot {
    id: u64,
    class: Class,
    source: SourceKey,
    stop: CancellationToken,
}

/// The admin connections open now, each in its class's slots.
struct Slots {
    open: Mutex<Vec<Slot>>,
    general: usize,
    probes: usize,
}

impl Slots {
    /// Takes a slot of `class` for connection `id` from `peer`. At the class's cap, the
    /// oldest connection of the source (IPv4 /32, IPv6 /64) holding the most slots of that
    /// class gives its up.
    fn enter(&self, id: u64, class: Class, peer: IpAddr, stop: CancellationToken) {
        let cap = match class {
            Class::Probe => self.probes,
            Class::General => self.general,
        };
        let Ok(mut open) = self.open.lock() else {
            return;
        };
        if open.iter().filter(|s| s.class == class).count() >= cap {
            // Per source: (slots held, its oldest connection's id). Ids grow with time.
            let mut by_peer: HashMap<SourceKey, (usize, u64)> = HashMap::new();
            for s in open.iter().filter(|s| s.class == class) {
                let e = by_peer.entry(s.source).or_insert((0, s.id));
                e.0 += 1;
                e.1 = e.1.min(s.id);
            }
            let victim = by_peer
                .values()
                .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
                .map(|(_, oldest)| *oldest);
            if let Some(i) = victim.and_then(|v| open.iter().position(|s| s.id == v)) {
                open.swap_remove(i).stop.cancel();
            }
        }
        open.push(Slot {
            id,
            class,
            source: SourceKey::new(peer, 32, 64),
            stop,
        });
    }

    fn leave(&self, id: u64) {
        if let Ok(mut open) = self.open.lock()
            && let Some(i) = open.iter().position(|s| s.id == id)
        {
            open.swap_remove(i);
        }
    }
}

/// Serves the admin endpoint until `stop`.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    cfg: AdminConfig,
    stop: CancellationToken,
) {
    let slots = Arc::new(Slots {
        open: Mutex::new(Vec::new()),
        general: cfg.max_conns as usize,
        probes: cfg.probe_conns as usize,
    });
    let mut next_id = 0u64;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoint listening");
    }
    let defer = cfg.header_timeout.as_secs().clamp(1, 60) as u32;
    if let Err(e) = sockopt::defer_accept(&listener, defer) {
        tracing::debug!(error = %e, "admin: TCP_DEFER_ACCEPT unavailable");
    }
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let Ok((stream, peer)) = accepted else {
            // EMFILE and friends: the data path's accept loop logs and counts them.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let mut first = [0u8; 16];
        let n = sockopt::peek_now(&stream, &mut first);
        let class = match classify(&first[..n]) {
            Class::Probe if slots.probes > 0 => Class::Probe,
            _ => Class::General,
        };
        let id = next_id;
        next_id += 1;
        let token = stop.child_token();
        let peer_ip = peer.ip().to_canonical();
        slots.enter(id, class, peer_ip, token.clone());
        let state = state.clone();
        let slots = slots.clone();
        let header_timeout = cfg.header_timeout;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, state, peer_ip).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(class == Class::General)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = token.cancelled() => {}
            }
            slots.leave(id);
        });
    }
}

/// The answer refusing a private endpoint to this request, or `None` when it may pass.
fn refusal(
    req: &Request<Incoming>,
    peer: IpAddr,
    cfg: &AdminConfig,
) -> Option<Response<Full<Bytes>>> {
    let headers = req.headers();
    if let Some(auth) = headers.get(hyper::header::AUTHORIZATION) {
        let given = auth.as_bytes();
        let ok = given.len() > 7
            && given[..7].eq_ignore_ascii_case(b"bearer ")
            && cfg.token.as_ref().is_some_and(|t| t.matches(&given[7..]));
        return (!ok).then(|| unauthorized("the token is not the admin token"));
    }
    if cfg.trust_loopback && peer.is_loopback() {
        return (!host_is_an_address(headers)).then(|| {
            text(
                StatusCode::FORBIDDEN,
                "forbidden: a loopback client must name the host by address or as localhost\n",
            )
        });
    }
    Some(if cfg.token.is_some() {
        unauthorized("this endpoint needs Authorization: Bearer <token>")
    } else {
        text(
            StatusCode::FORBIDDEN,
            "forbidden: this endpoint answers loopback clients only; set [admin] token_file or HALFGUARD_ADMIN_TOKEN to reach it from elsewhere\n",
        )
    })
}

fn unauthorized(why: &str) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::UNAUTHORIZED, format!("unauthorized: {why}\n"));
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"halfguard admin\""),
    );
    r
}

/// True when the Host header (if any) is an IP address or `localhost`, with or without a
/// port: what curl, probes and scripts send, and never what a rebound name sends.
fn host_is_an_address(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(hyper::header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// A reload must come from a script, not from a page: browsers mark cross-site requests
/// (`Origin`, `Sec-Fetch-Site`) and HTML forms can only send bodies of the CORS "simple"
/// content types. A reload takes no body at all.
fn cross_site(headers: &HeaderMap) -> Option<&'static str> {
    if headers.contains_key(hyper::header::ORIGIN) {
        return Some("a request with an Origin header");
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() != b"none")
    {
        return Some("a request a browser marked as from a page");
    }
    if let Some(ct) = headers.get(hyper::header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        if [
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "text/plain",
        ]
        .iter()
        .any(|f| ct.starts_with(f))
        {
            return Some("a form");
        }
    }
    let length = headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if length > 0 || headers.contains_key(hyper::header::TRANSFER_ENCODING) {
        return Some("a request with a body");
    }
    None
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = text(status, v.to_string());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn route(req: Request<Incoming>, state: Arc<State>, peer: IpAddr) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let private = matches!(
        (req.method(), path),
        (&Method::GET, "/sources" | "/config") | (&Method::POST, "/reload")
    );
    if private {
        if req.method() == Method::POST
            && let Some(what) = cross_site(req.headers())
        {
            return text(
                StatusCode::FORBIDDEN,
                format!("forbidden: {what} cannot reload; use curl -X POST without a body\n"),
            );
        }
        if let Some(refused) = refusal(&req, peer, &state.config().admin) {
            return refused;
        }
    }
    match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, metrics::render(state.metrics()));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => match state.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET, "/sources") => sources(req.uri().query().unwrap_or(""), &state),
        (&Method::GET, "/config") => text(StatusCode::OK, format!("{}\n", state.config_text())),
        (&Method::POST, "/reload") => {
            let handle = Handle::from_state(state.clone());
            match handle.reload().await {
                Ok(changed) => text(
                    StatusCode::OK,
                    format!("reloaded; changed: {changed}\n{}\n", state.config_text()),
                ),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("reload refused: {e}\n")),
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/sources" | "/config" | "/reload") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics /healthz /readyz /sources /config, or POST /reload\n",
        ),
    }
}

fn sources(query: &str, state: &State) -> Response<Full<Bytes>> {
    let mut top_n = 10usize;
    let mut by = SourceOrder::Conns;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "top" => match v.parse::<usize>() {
                Ok(n) => top_n = n.min(MAX_TOP),
                Err(_) => return text(StatusCode::BAD_REQUEST, "top must be a number\n"),
            },
            "by" => {
                by = match v {
                    "conns" => SourceOrder::Conns,
                    "half_open" => SourceOrder::HalfOpen,
                    "half_closed" => SourceOrder::HalfClosed,
                    "stalled" => SourceOrder::Stalled,
                    "refused" => SourceOrder::Refused,
                    "observed" => SourceOrder::Observed,
                    "queued_bytes" => SourceOrder::Queued,
                    _ => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            "by must be conns, half_open, half_closed, stalled, refused, observed or queued_bytes\n",
                        );
                    }
                }
            }
            _ => {}
        }
    }
    let census = state.kernel().census.load_full();
    let listeners: Vec<serde_json::Value> = state
        .listeners()
        .iter()
        .map(|r| {
            let syn_recv: Vec<serde_json::Value> = census
                .syn_recv
                .iter()
                .find(|(n, _)| n == &r.ctx.name)
                .map(|(_, top)| {
                    top.iter()
                        .take(top_n)
                        .map(|(k, n)| serde_json::json!({ "source": k.to_string(), "syn_recv": n }))
                        .collect()
                })
                .unwrap_or_default();
            // With [cluster]: the counts over every replica, beside this one's.
            let remote = state.cluster().map(|_| r.ctx.guard.remote());
            let rows: Vec<serde_json::Value> = r
                .ctx
                .guard
                .top_sources(top_n, by)
                .into_iter()
                .map(|l| {
                    let mut row = serde_json::json!({
                        "source": l.source.to_string(),
                        "conns": l.conns,
                        "half_open": l.half_open,
                        "half_closed": l.half_closed,
                        "stalled": l.stalled,
                        "idle": l.idle,
                        "waiting": l.waiting,
                        "queued_bytes": l.queued,
                        "first_message": l.holding,
                        "refused": l.refused,
                        "observed": l.observed,
                        "verdict": l.verdict(),
                    });
                    if let Some(remote) = &remote {
                        let o = remote
                            .as_ref()
                            .and_then(|v| v.loads.get(&l.source).copied())
                            .unwrap_or_default();
                        row["cluster"] = serde_json::json!({
                            "conns": l.conns + o.conns as usize,
                            "half_open": l.half_open + o.half_open as usize,
                            "half_closed": l.half_closed + o.half_closed as usize,
                            "banned": remote.as_ref().is_some_and(|v| v.banned.contains(&l.source)),
                        });
                    }
                    row
                })
                .collect();
            serde_json::json!({ "listener": r.ctx.name, "sources": rows, "kernel_syn_recv": syn_recv })
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "listeners": listeners }),
    )
}
