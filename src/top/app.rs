//! What `top` knows and where the user is in it: the last scrape and the one before (for
//! rates), the last `/sources`, what failed, the listener shown and the sort column.
//!
//! Terminal-free, so keys and refreshes are tested as plain calls.

use std::time::{Duration, Instant};

use super::endpoint::FetchError;
use super::exposition;
use super::model::Snapshot;
use super::sources::{self, Table};

/// A key the view acts on, whatever the terminal library calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Tab,
    BackTab,
    Esc,
    /// Ctrl-C, which raw mode delivers as a key rather than a signal.
    Interrupt,
}

/// What a key asks of the screen loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Redraw,
    Quit,
}

/// One refresh: both answers, taken at `at`.
#[derive(Debug)]
pub struct Fetched {
    pub at: Instant,
    /// `None`: not asked this time. A new sort column asks only for `/sources`, so rates
    /// stay measured over whole intervals.
    pub metrics: Option<Result<String, FetchError>>,
    pub sources: Result<String, FetchError>,
}

/// The view's state.
#[derive(Debug)]
pub struct App {
    pub endpoint: String,
    pub interval: Duration,
    pub snapshot: Option<Snapshot>,
    pub tables: Vec<Table>,
    pub metrics_error: Option<String>,
    pub sources_error: Option<String>,
    /// Index into [`App::listeners`].
    pub listener: usize,
    /// The `/sources` column sorted by.
    pub sort: String,
}

impl App {
    pub fn new(endpoint: String, interval: Duration, sort: String) -> App {
        App {
            endpoint,
            interval,
            snapshot: None,
            tables: Vec::new(),
            metrics_error: None,
            sources_error: None,
            listener: 0,
            sort,
        }
    }

    /// Takes one refresh. A failed fetch keeps what was shown before and says why; the
    /// next refresh tries again.
    pub fn update(&mut self, f: Fetched) {
        match f.metrics {
            None => {}
            Some(Ok(text)) => {
                let snap = Snapshot::from_samples(&exposition::parse(&text), f.at);
                self.snapshot = Some(match &self.snapshot {
                    Some(prev) => snap.with_rates_from(prev),
                    None => snap,
                });
                self.metrics_error = None;
            }
            Some(Err(e)) => self.metrics_error = Some(e.to_string()),
        }
        match f
            .sources
            .map_err(|e| e.to_string())
            .and_then(|b| sources::parse(&b))
        {
            Ok(t) => {
                self.tables = t;
                self.sources_error = None;
            }
            Err(e) => self.sources_error = Some(e),
        }
        self.resort();
        let n = self.listeners().len();
        if self.listener >= n {
            self.listener = n.saturating_sub(1);
        }
    }

    /// Listener names, as `/metrics` lists them (else as `/sources` does).
    pub fn listeners(&self) -> Vec<String> {
        match &self.snapshot {
            Some(s) if !s.listeners.is_empty() => {
                s.listeners.iter().map(|l| l.name.clone()).collect()
            }
            _ => self.tables.iter().map(|t| t.listener.clone()).collect(),
        }
    }

    pub fn selected(&self) -> Option<String> {
        self.listeners().get(self.listener).cloned()
    }

    pub fn table(&self, listener: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.listener == listener)
    }

    /// The columns sort keys cycle through: the shown listener's, or every listener's.
    pub fn columns(&self) -> Vec<String> {
        if let Some(t) = self.selected().and_then(|l| self.table(&l))
            && !t.columns.is_empty()
        {
            return t.columns.clone();
        }
        let mut all: Vec<String> = Vec::new();
        for t in &self.tables {
            for c in &t.columns {
                if !all.contains(c) {
                    all.push(c.clone());
                }
            }
        }
        all
    }

    fn resort(&mut self) {
        for t in &mut self.tables {
            t.sort_by(&self.sort);
        }
    }

    /// `s`/`S` next/previous sort column, `1`-`9` a column by number, `l`/Tab and
    /// `L`/Shift-Tab next/previous listener, `q`, Esc or Ctrl-C quits.
    pub fn on_key(&mut self, k: Key) -> Action {
        match k {
            Key::Char('q' | 'Q') | Key::Esc | Key::Interrupt => Action::Quit,
            Key::Char('l') | Key::Tab => self.step_listener(1),
            Key::Char('L') | Key::BackTab => self.step_listener(-1),
            Key::Char('s') => self.step_sort(1),
            Key::Char('S') => self.step_sort(-1),
            Key::Char(d @ '1'..='9') => {
                let cols = self.columns();
                let i = d as usize - '1' as usize;
                match cols.get(i) {
                    Some(c) => {
                        self.sort = c.clone();
                        self.resort();
                        Action::Redraw
                    }
                    None => Action::Nothing,
                }
            }
            _ => Action::Nothing,
        }
    }

    fn step_listener(&mut self, by: isize) -> Action {
        let n = self.listeners().len();
        if n < 2 {
            return Action::Nothing;
        }
        self.listener = (self.listener as isize + by).rem_euclid(n as isize) as usize;
        Action::Redraw
    }

    fn step_sort(&mut self, by: isize) -> Action {
        let cols = self.columns();
        if cols.is_empty() {
            return Action::Nothing;
        }
        let at = cols.iter().position(|c| *c == self.sort);
        let next = match at {
            Some(i) => (i as isize + by).rem_euclid(cols.len() as isize) as usize,
            None => 0,
        };
        self.sort = cols[next].clone();
        self.resort();
        Action::Redraw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "halfguard_connections{listener=\"a\",state=\"open\"} 1\n\
                           halfguard_connections{listener=\"b\",state=\"open\"} 2\n\
                           halfguard_connections_accepted_total{listener=\"a\"} 10\n";
    const SOURCES: &str = r#"{"listeners":[
        {"listener":"a","sources":[
            {"source":"10.0.0.1","conns":9,"half_open":0,"half_closed":0,"refused":1},
            {"source":"10.0.0.2","conns":2,"half_open":2,"half_closed":0,"refused":7}]},
        {"listener":"b","sources":[]}]}"#;

    fn fetched(at: Instant, metrics: &str) -> Fetched {
        Fetched {
            at,
            metrics: Some(Ok(metrics.to_string())),
            sources: Ok(SOURCES.to_string()),
        }
    }

    fn app() -> App {
        let mut a = App::new("x".into(), Duration::from_secs(1), "conns".into());
        a.update(fetched(Instant::now(), METRICS));
        a
    }

    fn first(a: &App) -> String {
        a.table("a").unwrap().rows[0].source.clone()
    }

    #[test]
    fn sort_keys_cycle_through_the_columns_and_reorder() {
        let mut a = app();
        assert_eq!(first(&a), "10.0.0.1");
        assert_eq!(a.on_key(Key::Char('s')), Action::Redraw);
        assert_eq!(a.sort, "half_open");
        assert_eq!(first(&a), "10.0.0.2");
        a.on_key(Key::Char('S'));
        a.on_key(Key::Char('S'));
        assert_eq!(a.sort, "refused", "S goes back, wrapping");
        assert_eq!(first(&a), "10.0.0.2");
        a.on_key(Key::Char('1'));
        assert_eq!(a.sort, "conns");
        assert_eq!(a.on_key(Key::Char('9')), Action::Nothing);
    }

    #[test]
    fn listener_keys_wrap_and_quit_keys_quit() {
        let mut a = app();
        assert_eq!(a.selected().as_deref(), Some("a"));
        a.on_key(Key::Tab);
        assert_eq!(a.selected().as_deref(), Some("b"));
        a.on_key(Key::Char('l'));
        assert_eq!(a.selected().as_deref(), Some("a"));
        a.on_key(Key::BackTab);
        assert_eq!(a.selected().as_deref(), Some("b"));
        // b lists no source: its sort keys come from every listener's columns.
        assert_eq!(a.on_key(Key::Char('s')), Action::Redraw);
        for k in [Key::Char('q'), Key::Esc, Key::Interrupt] {
            assert_eq!(a.on_key(k), Action::Quit);
        }
        assert_eq!(a.on_key(Key::Char('x')), Action::Nothing);
    }

    #[test]
    fn a_failed_refresh_keeps_the_last_view_and_says_why() {
        let mut a = app();
        let t0 = a.snapshot.as_ref().unwrap().at;
        a.update(Fetched {
            at: t0 + Duration::from_secs(1),
            metrics: Some(Err(FetchError::Missing {
                path: "/metrics".into(),
            })),
            sources: Err(FetchError::Missing {
                path: "/sources".into(),
            }),
        });
        assert!(a.metrics_error.as_deref().unwrap().contains("/metrics"));
        assert!(a.sources_error.as_deref().unwrap().contains("/sources"));
        assert_eq!(
            a.snapshot.as_ref().unwrap().at,
            t0,
            "the last good scrape stays"
        );
        // The next good one clears the errors and has rates against the last good one.
        a.update(fetched(
            t0 + Duration::from_secs(2),
            &METRICS.replace("} 10", "} 30"),
        ));
        assert!(a.metrics_error.is_none() && a.sources_error.is_none());
        let s = a.snapshot.as_ref().unwrap();
        assert_eq!(s.listeners[0].families[0].counters[0].rate, Some(10.0));
    }

    #[test]
    fn a_sources_only_refresh_leaves_the_scrape_and_its_rates_alone() {
        let mut a = app();
        let t0 = a.snapshot.as_ref().unwrap().at;
        a.update(fetched(
            t0 + Duration::from_secs(1),
            &METRICS.replace("} 10", "} 20"),
        ));
        let before = a.snapshot.clone();
        a.update(Fetched {
            at: t0 + Duration::from_millis(1050),
            metrics: None,
            sources: Ok(SOURCES.replace("\"refused\":7", "\"refused\":70")),
        });
        assert_eq!(a.snapshot, before);
        let t = a.table("a").unwrap();
        assert_eq!(t.value(&t.rows[1], "refused"), Some(70.0));
    }

    #[test]
    fn a_listener_removed_by_a_reload_moves_the_selection_back() {
        let mut a = app();
        a.on_key(Key::Tab);
        let t = a.snapshot.as_ref().unwrap().at + Duration::from_secs(1);
        a.update(fetched(
            t,
            "halfguard_connections{listener=\"a\",state=\"open\"} 1\n",
        ));
        assert_eq!(a.selected().as_deref(), Some("a"));
    }
}
