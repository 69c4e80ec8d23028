//! The live view's terminal: raw mode and the alternate screen while it runs, and the
//! terminal given back as it was on `q`, Ctrl-C, SIGTERM, SIGINT, SIGHUP or a panic. When the
//! terminal itself is gone (EOF or EIO on stdin, a hangup), the view ends too.
//!
//! Fetching runs on the tokio runtime and hands each refresh over a channel, so a slow or
//! dead admin endpoint never delays a key: `q` quits within a tenth of a second whatever
//! the endpoint does.

use std::sync::mpsc;
use std::time::Duration;

use ratatui::DefaultTerminal;
use ratatui::widgets::Paragraph;

use super::app::{Action, App, Fetched};
use super::endpoint::Endpoint;
use super::input::{self, Input};
use super::signals::Signals;
use super::view::{self, Layout};
use super::{Options, TopError, fetch, fetch_sources, fetch_timeout};

/// How often signals are looked at while no key comes.
const TICK: Duration = Duration::from_millis(100);

/// The terminal in raw mode on the alternate screen; restored when dropped, which also
/// happens while a panic unwinds (ratatui's panic hook restores it before the message).
struct Tui(DefaultTerminal);

impl Tui {
    fn start() -> Result<Tui, TopError> {
        match ratatui::try_init() {
            Ok(t) => Ok(Tui(t)),
            Err(e) => {
                // Raw mode may be on already when a later step failed.
                ratatui::restore();
                Err(e.into())
            }
        }
    }
}

impl Drop for Tui {
    fn drop(&mut self) {
        let _ = self.0.show_cursor();
        // While a panic unwinds, ratatui's hook has restored the terminal already and the
        // panic message is on the main screen; leaving the alternate screen a second time
        // would move the cursor back over that message.
        if !std::thread::panicking() {
            ratatui::restore();
        }
    }
}

pub(super) fn show(opts: Options, rt: &tokio::runtime::Runtime) -> Result<(), TopError> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(TopError::NoTerminal);
    }
    let signals = Signals::watch(rt)?;
    let (tx, rx) = mpsc::channel::<Fetched>();
    let (sort_tx, sort_rx) = tokio::sync::watch::channel(opts.sort.clone());
    let fetcher = rt.spawn(fetch_loop(
        opts.endpoint.clone(),
        opts.interval,
        sort_rx,
        tx,
    ));
    let mut app = App::new(opts.endpoint.to_string(), opts.interval, opts.sort.clone());
    let result = Tui::start()
        .and_then(|mut tui| event_loop(&mut tui.0, &mut app, &rx, &sort_tx, &signals, opts.colour));
    fetcher.abort();
    result
}

fn event_loop(
    term: &mut DefaultTerminal,
    app: &mut App,
    rx: &mpsc::Receiver<Fetched>,
    sort_tx: &tokio::sync::watch::Sender<String>,
    signals: &Signals,
    colour: bool,
) -> Result<(), TopError> {
    let mut dirty = true;
    while !signals.quit() {
        while let Ok(f) = rx.try_recv() {
            app.update(f);
            dirty = true;
        }
        if signals.resized() || dirty {
            term.draw(|frame| {
                let area = frame.area();
                let lines = view::lines(
                    app,
                    Layout {
                        width: area.width,
                        height: Some(area.height),
                        colour,
                    },
                );
                frame.render_widget(Paragraph::new(lines), area);
            })?;
            dirty = false;
        }
        let keys = match input::wait(TICK)? {
            Input::Gone => break,
            Input::Keys(keys) => keys,
        };
        for key in keys {
            // A seam for the test that a panic gives the terminal back (debug builds only).
            #[cfg(debug_assertions)]
            if let super::app::Key::Char(c) = key
                && std::env::var("HALFGUARD_TOP_PANIC_KEY").is_ok_and(|v| v == c.to_string())
            {
                panic!("HALFGUARD_TOP_PANIC_KEY {c} pressed");
            }
            match app.on_key(key) {
                Action::Quit => return Ok(()),
                Action::Redraw => {
                    dirty = true;
                    // The next fetch asks the server for the heaviest by the new column.
                    sort_tx.send_if_modified(|s| {
                        let changed = *s != app.sort;
                        s.clone_from(&app.sort);
                        changed
                    });
                }
                Action::Nothing => {}
            }
        }
    }
    Ok(())
}

/// Fetches every interval (and at once when the sort column changes) until the view is gone.
async fn fetch_loop(
    endpoint: Endpoint,
    interval: Duration,
    mut sort: tokio::sync::watch::Receiver<String>,
    tx: mpsc::Sender<Fetched>,
) {
    let within = fetch_timeout(interval);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let resort = tokio::select! {
            _ = tick.tick() => false,
            changed = sort.changed() => if changed.is_err() { return } else { true },
        };
        let by = sort.borrow_and_update().clone();
        let f = if resort {
            Fetched {
                sources: fetch_sources(&endpoint, &by, within).await,
                metrics: None,
                at: std::time::Instant::now(),
            }
        } else {
            fetch(&endpoint, &by, within).await
        };
        if tx.send(f).is_err() {
            return;
        }
    }
}
