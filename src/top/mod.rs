//! `halfguard top`: a live terminal view of a running halfguard, read from its admin
//! endpoint, for the operator who has a shell in the pod during an attack and no dashboard.
//!
//! It is a client of `/metrics` and `/sources` only, in the same binary but on its own
//! runtime, so the proxy's hot path does not know it exists. Rates are counter deltas between
//! two scrapes; states, reasons, clocks and source columns are taken as the running version
//! names them, so a newer halfguard is shown in full by an older `top`.
//!
//! - [`endpoint`]: where the admin endpoint is, and one GET.
//! - [`exposition`]: the Prometheus text read back into samples.
//! - [`model`]: a scrape arranged per listener, and rates.
//! - [`sources`]: the `/sources` tables.
//! - [`memory`]: the memory line: queued bytes, kernel TCP memory, orphans, the cgroup.
//! - [`app`]: what the view knows and the keys that move it.
//! - [`view`]: the screen as lines, for the live view and `--once`.
//! - `screen`: the terminal: raw mode, the alternate screen, and restoring it all.
//! - `input`: keys read from stdin, and the terminal's end (EOF, EIO, hangup).
//! - `signals`: SIGTERM, SIGINT and SIGHUP end the view; SIGWINCH redraws it.

pub mod app;
pub mod endpoint;
pub mod exposition;
mod input;
pub mod memory;
pub mod model;
mod screen;
mod signals;
pub mod sources;
pub mod view;

use std::time::{Duration, Instant};

use app::{App, Fetched};
use endpoint::{Endpoint, FetchError};

/// Sources asked of `/sources` per listener: more than 24 rows can show.
const TOP_SOURCES: usize = 20;

/// The shortest refresh interval; shorter would make the view a load on the admin endpoint.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// What `halfguard top` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub endpoint: Endpoint,
    pub interval: Duration,
    /// The `/sources` column to sort by at start.
    pub sort: String,
    pub colour: bool,
}

/// Why `top` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("needs a terminal on stdin and stdout; --once prints a plain-text snapshot")]
    NoTerminal,
    #[error("the terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// Colour unless `NO_COLOR` is set to something or the terminal is `dumb`.
pub fn colour_wanted() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
    !no_color && !dumb
}

/// How long one fetch may take: at least two seconds, so a slow scrape across the pod still
/// lands, and at most ten.
fn fetch_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(2), Duration::from_secs(10))
}

/// One refresh: `/metrics` and `/sources` side by side.
async fn fetch(endpoint: &Endpoint, sort: &str, within: Duration) -> Fetched {
    let metrics = async {
        let r = endpoint.get("/metrics", within).await;
        (r, Instant::now())
    };
    let ((metrics, at), sources) = tokio::join!(metrics, fetch_sources(endpoint, sort, within));
    Fetched {
        at,
        metrics: Some(metrics),
        sources,
    }
}

/// `/sources` sorted by the server on `sort`, so the heaviest by that column are the ones
/// listed; a version that cannot sort on it is asked for its default order.
async fn fetch_sources(
    endpoint: &Endpoint,
    sort: &str,
    within: Duration,
) -> Result<String, FetchError> {
    let plain = format!("/sources?top={TOP_SOURCES}");
    if sort.is_empty() || !sort.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return endpoint.get(&plain, within).await;
    }
    match endpoint.get(&format!("{plain}&by={sort}"), within).await {
        Err(FetchError::Status { status, .. }) if status == hyper::StatusCode::BAD_REQUEST => {
            endpoint.get(&plain, within).await
        }
        r => r,
    }
}

/// `--once`: two scrapes one interval apart, as plain text with rates and totals. Fails
/// when the first `/metrics` does; a `/sources` failure is a line in the text.
pub async fn once(opts: &Options) -> Result<String, TopError> {
    let within = fetch_timeout(opts.interval);
    let mut app = App::new(opts.endpoint.to_string(), opts.interval, opts.sort.clone());
    let first = fetch(&opts.endpoint, &opts.sort, within).await;
    let first = match first {
        Fetched {
            metrics: Some(Err(e)),
            ..
        } => return Err(e.into()),
        f => f,
    };
    app.update(first);
    tokio::time::sleep(opts.interval).await;
    app.update(fetch(&opts.endpoint, &opts.sort, within).await);
    let lines = view::lines(
        &app,
        view::Layout {
            width: 80,
            height: None,
            colour: false,
        },
    );
    Ok(view::plain(&lines))
}

/// The live view, until `q`, Ctrl-C, a signal or the terminal's end; the terminal is
/// restored however it ends.
pub fn live(opts: Options, rt: &tokio::runtime::Runtime) -> Result<(), TopError> {
    screen::show(opts, rt)
}
