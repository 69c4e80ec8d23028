//! The admin endpoint: `GET /metrics`, `/healthz`, `/readyz`, `/sources?top=N&by=...`,
//! `/config`, and `POST /reload`.
//!
//! It must stay reachable while the data port is under attack, and must not become a target
//! itself: it has its own header clock (`admin.header_timeout`) and its own connection cap
//! (`admin.max_conns`). At the cap, the oldest admin connection is dropped to make room,
//! the same rule the proxy applies to silent connections, so a slowloris on the admin port
//! cannot keep a scrape out.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AdminConfig;
use crate::guard::SourceOrder;
use crate::server::{Handle, State};

/// `/sources` never lists more than this many sources per listener.
const MAX_TOP: usize = 1000;

/// Serves the admin endpoint until `stop`.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    cfg: AdminConfig,
    stop: CancellationToken,
) {
    let open: Arc<Mutex<VecDeque<(u64, CancellationToken)>>> = Arc::default();
    let mut next_id = 0u64;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoint listening");
    }
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let Ok((stream, _)) = accepted else {
            // EMFILE and friends: the data path's accept loop logs and counts them.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let id = next_id;
        next_id += 1;
        let token = stop.child_token();
        if let Ok(mut q) = open.lock() {
            if q.len() >= cfg.max_conns as usize
                && let Some((_, oldest)) = q.pop_front()
            {
                oldest.cancel();
            }
            q.push_back((id, token.clone()));
        }
        let state = state.clone();
        let open = open.clone();
        let header_timeout = cfg.header_timeout;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, state).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = token.cancelled() => {}
            }
            if let Ok(mut q) = open.lock() {
                q.retain(|(i, _)| *i != id);
            }
        });
    }
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

async fn route(req: Request<Incoming>, state: Arc<State>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, crate::metrics::render(state));
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
        (&Method::GET, "/config") => text(StatusCode::OK, format!("{}\n", state.config())),
        (&Method::POST, "/reload") => {
            let handle = Handle::from_state(state.clone());
            match handle.reload().await {
                Ok(()) => text(StatusCode::OK, format!("reloaded\n{}\n", state.config())),
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
                    _ => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            "by must be conns, half_open, half_closed, stalled, refused or observed\n",
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
            let rows: Vec<serde_json::Value> = r
                .ctx
                .guard
                .top_sources(top_n, by)
                .into_iter()
                .map(|l| {
                    serde_json::json!({
                        "source": l.source.to_string(),
                        "conns": l.conns,
                        "half_open": l.half_open,
                        "half_closed": l.half_closed,
                        "stalled": l.stalled,
                        "refused": l.refused,
                        "observed": l.observed,
                        "verdict": l.verdict(),
                    })
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
