//! The screen as lines of text: one layout for the live view and for `--once`.
//!
//! The live view shows one listener and fits what it has into the terminal's rows (80x24 is
//! the size it is laid out for); `--once` shows every listener in full as plain text. Without
//! colour (`NO_COLOR`, `TERM=dumb`, or `--once`) every styled span loses its style and bars are
//! drawn in ASCII, so nothing is carried by colour alone.

use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};

use super::app::App;
use super::model::{Counter, Family, Listener, Snapshot};
use super::sources::Table;

/// Width of the first column (state names, family titles).
const TITLE: usize = 13;
/// Fewest rows kept for the sources table in the live view.
const MIN_SOURCE_ROWS: usize = 3;

/// How to lay the lines out.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub width: u16,
    /// Rows available; `None` for `--once`, which prints everything.
    pub height: Option<u16>,
    pub colour: bool,
}

impl Layout {
    pub(super) fn live(&self) -> bool {
        self.height.is_some()
    }

    fn style(&self, s: Style) -> Style {
        if self.colour { s } else { Style::default() }
    }

    pub(super) fn span(&self, text: impl Into<String>, s: Style) -> Span<'static> {
        Span::styled(text.into(), self.style(s))
    }

    fn width(&self) -> usize {
        usize::from(self.width.max(40))
    }
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}
fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}
pub(super) fn red() -> Style {
    Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
}
fn yellow() -> Style {
    Style::default().fg(Color::Yellow)
}
fn green() -> Style {
    Style::default().fg(Color::Green)
}
fn cyan() -> Style {
    Style::default().fg(Color::Cyan)
}

/// The whole screen.
pub fn lines(app: &App, at: Layout) -> Vec<Line<'static>> {
    let mut out = vec![header(app, at)];
    if let Some(e) = &app.metrics_error {
        let retry = if at.live() {
            format!(
                "; retrying every {}",
                humantime::format_duration(app.interval)
            )
        } else {
            String::new()
        };
        out.extend(wrapped(&format!("! {e}{retry}"), at, red()));
    }
    let Some(snap) = &app.snapshot else {
        if app.metrics_error.is_none() {
            out.push(Line::from(
                at.span("waiting for the first answer...", dim()),
            ));
        }
        return fit(out, Vec::new(), app, at);
    };
    if snap.listeners.is_empty() {
        out.push(Line::from(at.span(
            "no listener in /metrics (is this a halfguard admin endpoint?)",
            yellow(),
        )));
    }
    let names = app.listeners();
    let shown: Vec<&Listener> = if at.live() {
        app.selected()
            .and_then(|n| snap.listeners.iter().find(|l| l.name == n))
            .into_iter()
            .collect()
    } else {
        snap.listeners.iter().collect()
    };
    out.extend(super::memory::lines(snap, &shown, at));
    let mut tail = Vec::new();
    for (i, l) in shown.iter().enumerate() {
        if i > 0 {
            out.push(Line::default());
        }
        out.push(listener_line(l, snap, &names, app, at));
        out.extend(bars(l, at));
        out.extend(counters(l, at));
        if snap.kernel.census {
            out.extend(kernel(l, snap, app.table(&l.name), at));
        }
        if !at.live() {
            out.push(Line::default());
            match sources_error(app) {
                Some(e) => out.extend(wrapped(&format!("! {e}"), at, yellow())),
                None if app.sources_error.is_some() => {}
                None => out.extend(sources(app.table(&l.name), &app.sort, None, at)),
            }
        }
    }
    if shown.is_empty() && !at.live() {
        for t in &app.tables {
            out.push(Line::from(
                at.span(format!("listener {}", t.listener), bold()),
            ));
            out.extend(sources(Some(t), &app.sort, None, at));
        }
    }
    if !at.live() && !snap.servers.is_empty() {
        out.push(Line::default());
    }
    out.extend(backends(snap, at));
    if at.live() {
        match (sources_error(app), &app.sources_error, app.selected()) {
            (Some(e), _, _) => tail.extend(wrapped(&format!("! {e}"), at, yellow())),
            (None, None, Some(name)) => {
                tail.extend(sources(app.table(&name), &app.sort, Some(usize::MAX), at));
            }
            _ => {}
        }
    }
    fit(out, tail, app, at)
}

/// The `/sources` failure worth a line of its own: not when `/metrics` failed the same way.
fn sources_error(app: &App) -> Option<&str> {
    let e = app.sources_error.as_deref()?;
    (app.metrics_error.as_deref() != Some(e)).then_some(e)
}

/// In the live view: the body, then as many source rows as the rows left allow, then the key
/// help on the last row. `--once` keeps everything.
fn fit(
    mut body: Vec<Line<'static>>,
    mut sources: Vec<Line<'static>>,
    app: &App,
    at: Layout,
) -> Vec<Line<'static>> {
    let Some(h) = at.height else {
        return body;
    };
    let h = usize::from(h);
    let footer = footer(app, at);
    // The sources block keeps its title, header and a few rows; the body gives way first.
    let keep_sources = sources.len().min(MIN_SOURCE_ROWS + 3);
    let body_room = h.saturating_sub(1 + keep_sources);
    body.truncate(body_room);
    sources.truncate(h.saturating_sub(1 + body.len()));
    body.extend(sources);
    body.truncate(h.saturating_sub(1));
    while body.len() + 1 < h {
        body.push(Line::default());
    }
    body.push(footer);
    body
}

fn header(app: &App, at: Layout) -> Line<'static> {
    let mut spans = vec![
        at.span("halfguard top", bold()),
        Span::raw(format!("  {}", app.endpoint)),
    ];
    if at.live() {
        spans.push(Span::raw(format!(
            "  every {}",
            humantime::format_duration(app.interval)
        )));
        if let Some(s) = &app.snapshot
            && app.metrics_error.is_some()
        {
            spans.push(at.span(
                format!("  STALE: last answer {}s ago", s.at.elapsed().as_secs()),
                red(),
            ));
        }
    }
    Line::from(spans)
}

fn listener_line(
    l: &Listener,
    snap: &Snapshot,
    names: &[String],
    app: &App,
    at: Layout,
) -> Line<'static> {
    let mut spans = vec![at.span(format!("listener {}", l.name), bold().fg(Color::Cyan))];
    match l.pressure {
        Some(true) => spans.push(at.span("  pressure ON", red())),
        Some(false) => spans.push(at.span("  pressure off", green())),
        None => {}
    }
    if let Some(n) = snap.sources {
        spans.push(Span::raw(format!("  sources {}", count(n))));
    }
    if at.live() && names.len() > 1 {
        spans.push(at.span(
            format!("  (l: {}/{})", app.listener + 1, names.len()),
            dim(),
        ));
    }
    Line::from(spans)
}

/// One bar per state, against its own cap or the listener's connection cap.
fn bars(l: &Listener, at: Layout) -> Vec<Line<'static>> {
    let w = at.width();
    // "  name  [bar]  n / cap"
    let bar_w = w.saturating_sub(2 + TITLE + 1 + 19 + 1).max(10);
    l.states
        .iter()
        .map(|(state, n)| {
            let cap = l.cap_of(state);
            let name: String = state.chars().take(TITLE - 1).collect();
            let mut spans = vec![Span::raw(format!("  {name:<TITLE$}"))];
            match cap {
                Some(c) if c > 0.0 => {
                    let share = (n / c).clamp(0.0, 1.0);
                    let mut fill = (share * bar_w as f64).round() as usize;
                    if *n > 0.0 && fill == 0 {
                        fill = 1;
                    }
                    let colour = if share >= 0.8 {
                        red()
                    } else if share >= 0.5 {
                        yellow()
                    } else {
                        green()
                    };
                    let (full, empty) = if at.colour {
                        ('█', '░')
                    } else {
                        ('#', '.')
                    };
                    spans.push(at.span(full.to_string().repeat(fill), colour));
                    spans.push(at.span(empty.to_string().repeat(bar_w - fill), dim()));
                    spans.push(Span::raw(format!(" {:>8} / {:<8}", count(*n), count(c))));
                }
                _ => spans.push(Span::raw(format!("{:bar_w$} {:>8}", "", count(*n)))),
            }
            Line::from(spans)
        })
        .collect()
}

/// The counter families: rates per second (and totals in `--once`).
fn counters(l: &Listener, at: Layout) -> Vec<Line<'static>> {
    let mut out = Vec::new();
    let accepted = l.family("halfguard_connections_accepted_total");
    let bytes = l.family("halfguard_bytes_total");
    // Accepted and bytes share the first line.
    let mut items: Vec<Vec<Span<'static>>> = Vec::new();
    if let Some(c) = accepted.and_then(|f| f.get("")) {
        items.push(vec![Span::raw(format!("accepted {}", value(c, false, at)))]);
    }
    if let Some(f) = bytes {
        for (key, label) in [("upstream", "up"), ("downstream", "down")] {
            if let Some(c) = f.get(key) {
                items.push(vec![Span::raw(format!("{label} {}", value(c, true, at)))]);
            }
        }
    }
    let rates_known = l
        .families
        .iter()
        .any(|f| f.counters.iter().any(|c| c.rate.is_some()));
    // Before the second scrape there are only totals.
    let (first, per) = if rates_known {
        ("rate/s", "/s")
    } else {
        ("totals", "")
    };
    if !items.is_empty() {
        out.extend(wrap(&format!("  {first}"), items, at, 2));
    }
    for f in &l.families {
        if f.metric == "halfguard_connections_accepted_total" || f.metric == "halfguard_bytes_total"
        {
            continue;
        }
        out.extend(family(f, per, at));
    }
    out
}

fn family(f: &Family, per: &str, at: Layout) -> Vec<Line<'static>> {
    let main = matches!(
        f.title.as_str(),
        "refused" | "evicted" | "timed out" | "closed"
    );
    let weight = |c: &Counter| match (at.live(), c.rate) {
        (true, Some(r)) => r,
        _ => c.total,
    };
    let mut shown: Vec<&Counter> = f.counters.iter().filter(|c| weight(c) > 0.0).collect();
    // Heaviest first: what fires most is what the operator looks for.
    shown.sort_by(|a, b| weight(b).total_cmp(&weight(a)));
    // The main families always have a line, so "nothing refused" is visible; others only
    // when something moves.
    if shown.is_empty() && !main {
        return Vec::new();
    }
    let style = if f.title == "refused" || f.title == "evicted" {
        yellow()
    } else {
        Style::default()
    };
    let items: Vec<Vec<Span<'static>>> = if shown.is_empty() {
        vec![vec![at.span("-", dim())]]
    } else {
        shown
            .iter()
            .map(|c| {
                let key = if c.key.is_empty() { "all" } else { &c.key };
                vec![
                    at.span(key.to_string(), style),
                    Span::raw(format!(" {}", value(c, false, at))),
                ]
            })
            .collect()
    };
    let max = if at.live() { 2 } else { usize::MAX };
    wrap(&format!("  {}{per}", f.title), items, at, max)
}

/// A counter as shown: its rate in the live view (its total before the first rate), and in
/// `--once` the rate and the total.
fn value(c: &Counter, bytes: bool, at: Layout) -> String {
    let r = |v: f64| if bytes { byte_rate(v) } else { rate(v) };
    let t = |v: f64| if bytes { byte_count(v) } else { count(v) };
    match (c.rate, at.live()) {
        (Some(x), true) => r(x),
        (Some(x), false) => format!("{} (total {})", r(x), t(c.total)),
        (None, _) => t(c.total),
    }
}

/// `halfguard_kernel_dropped_total`, one counter per nftables rule.
const DROPPED: &str = "dropped/";

/// What a drop rule drops, for the rule names this version knows; a newer rule is shown by
/// its own name.
fn dropped(rule: &str) -> &str {
    match rule {
        // Every packet from a source in the drop set.
        "ban" => "banned",
        // SYNs from a source over `syn_rate_per_source`.
        "syn_rate" => "SYN over rate",
        // New connections from a source over `max_conns_per_source`.
        "conns" => "new conn over cap",
        // SYNs from sources a full per-source set has no room for, over their shared limit.
        "untracked" => "untracked SYN",
        other => other,
    }
}

fn kernel(l: &Listener, snap: &Snapshot, table: Option<&Table>, at: Layout) -> Vec<Line<'static>> {
    let mut items: Vec<Vec<Span<'static>>> = Vec::new();
    for (state, n) in &l.kernel_sockets {
        if state == "syn_recv" || *n > 0.0 {
            items.push(vec![Span::raw(format!(
                "{} {}",
                state.to_uppercase(),
                count(*n)
            ))]);
        }
    }
    let (drops, others): (Vec<&Counter>, Vec<&Counter>) = snap
        .kernel
        .counters
        .iter()
        .partition(|c| c.key.starts_with(DROPPED));
    for c in others {
        let v = match c.rate {
            Some(r) if at.live() => format!("{}/s", rate(r)),
            Some(r) => format!("{}/s (total {})", rate(r), count(c.total)),
            None => count(c.total),
        };
        let hot = c.rate.is_some_and(|r| r > 0.0);
        items.push(vec![at.span(
            format!("{} {v}", c.key),
            if hot { yellow() } else { Style::default() },
        )]);
    }
    if let Some(on) = snap.kernel.enforcing {
        items.push(vec![Span::raw(if on { "nft on" } else { "nft off" })]);
    }
    let max = if at.live() { 2 } else { usize::MAX };
    let mut out = wrap("kernel", items, at, max);
    if snap.kernel.enforcing == Some(true) || drops.iter().any(|c| c.total > 0.0) {
        let items = drops
            .iter()
            .map(|c| {
                let rule = c.key.strip_prefix(DROPPED).unwrap_or(&c.key);
                let hot = c.rate.is_some_and(|r| r > 0.0);
                let style = if hot { yellow() } else { Style::default() };
                vec![at.span(format!("{} {}", dropped(rule), value(c, false, at)), style)]
            })
            .collect();
        out.extend(wrap("  dropped/s", items, at, max));
    }
    if let Some(t) = table
        && !t.syn_recv.is_empty()
    {
        let items = t
            .syn_recv
            .iter()
            .map(|(s, n)| {
                vec![
                    at.span(s.clone(), cyan()),
                    Span::raw(format!(" {}", count(*n))),
                ]
            })
            .collect();
        out.extend(wrap(
            "  SYN_RECV by",
            items,
            at,
            if at.live() { 1 } else { usize::MAX },
        ));
    }
    out
}

fn backends(snap: &Snapshot, at: Layout) -> Vec<Line<'static>> {
    if snap.servers.is_empty() {
        return Vec::new();
    }
    let mut items = Vec::new();
    let mut last_backend = "";
    for s in &snap.servers {
        let mut spans = Vec::new();
        if s.backend != last_backend {
            spans.push(at.span(format!("{}: ", s.backend), bold()));
            last_backend = &s.backend;
        }
        spans.push(Span::raw(s.server.clone()));
        match s.up {
            Some(true) => spans.push(at.span(" up", green())),
            Some(false) => spans.push(at.span(" DOWN", red())),
            None => {}
        }
        if let Some(a) = s.active {
            spans.push(Span::raw(format!(" {}", count(a))));
        }
        items.push(spans);
    }
    let max = if at.live() { 2 } else { usize::MAX };
    wrap("backends", items, at, max)
}

/// Room for the longest verdict, "flooding".
const VERDICT_W: usize = 8;

/// The sources table, sorted by `sort`; `rows` bounds it (the live view cuts it to fit).
fn sources(
    table: Option<&Table>,
    sort: &str,
    rows: Option<usize>,
    at: Layout,
) -> Vec<Line<'static>> {
    let Some(t) = table else {
        return vec![Line::from(at.span("sources: none listed", dim()))];
    };
    if t.rows.is_empty() {
        return vec![Line::from(
            at.span("sources: none holding or refused", dim()),
        )];
    }
    let w = at.width();
    let src_w = t
        .rows
        .iter()
        .map(|r| r.source.len())
        .max()
        .unwrap_or(0)
        .clamp(15, 39);
    // As many columns as fit, the sorted one always among them.
    let widths: Vec<usize> = t.columns.iter().map(|c| c.len().max(6)).collect();
    let mut cols: Vec<usize> = Vec::new();
    // The verdict after the source ("flooding" suggests a deny; "busy" and "pool" never).
    let verdicts = t.rows.iter().any(|r| r.verdict.is_some());
    let mut used = src_w + if verdicts { VERDICT_W + 2 } else { 0 };
    for (i, cw) in widths.iter().enumerate() {
        if used + 2 + cw <= w {
            cols.push(i);
            used += 2 + cw;
        }
    }
    if let Some(si) = t.columns.iter().position(|c| c == sort)
        && !cols.contains(&si)
        && let Some(last) = cols.last_mut()
    {
        *last = si;
    }
    let mut out = vec![Line::from(vec![
        at.span("heaviest sources", bold()),
        Span::raw(format!(" of {} by ", t.listener)),
        at.span(sort.to_string(), bold().fg(Color::Cyan)),
    ])];
    let mut head = vec![Span::raw(format!("{:<src_w$}", "SOURCE"))];
    if verdicts {
        head.push(at.span(format!("  {:<VERDICT_W$}", "VERDICT"), bold()));
    }
    for &i in &cols {
        let name = t.columns[i].to_uppercase();
        let cw = widths[i];
        let s = if t.columns[i] == sort {
            bold().add_modifier(Modifier::UNDERLINED)
        } else {
            bold()
        };
        head.push(Span::raw("  "));
        head.push(at.span(format!("{name:>cw$}"), s));
    }
    out.push(Line::from(head));
    for r in t.rows.iter().take(rows.unwrap_or(usize::MAX)) {
        let mut spans = vec![at.span(format!("{:<src_w$}", r.source), cyan())];
        if verdicts {
            let v = r.verdict.as_deref().unwrap_or("-");
            let style = match v {
                "flooding" => Style::default().fg(Color::Red),
                "busy" => Style::default().fg(Color::Yellow),
                "pool" => Style::default().fg(Color::Green),
                _ => dim(),
            };
            spans.push(at.span(format!("  {v:<VERDICT_W$}"), style));
        }
        for &i in &cols {
            let cw = widths[i];
            let bytes = t.columns[i].ends_with("_bytes");
            let v = r.values[i].map(if bytes { byte_count } else { count });
            let v = v.unwrap_or_else(|| "-".into());
            spans.push(Span::raw(format!("  {v:>cw$}")));
        }
        out.push(Line::from(spans));
    }
    out
}

fn footer(app: &App, at: Layout) -> Line<'static> {
    let n = app.columns().len();
    let keys = if n > 0 {
        format!(" s/S/1-{} sort ", n.min(9))
    } else {
        " s sort ".to_string()
    };
    let mut spans = vec![
        at.span(keys, Style::default().add_modifier(Modifier::REVERSED)),
        Span::raw(" "),
    ];
    if app.listeners().len() > 1 {
        spans.push(at.span(
            " l/L listener ",
            Style::default().add_modifier(Modifier::REVERSED),
        ));
        spans.push(Span::raw(" "));
    }
    spans.push(at.span(
        " q quit ",
        Style::default().add_modifier(Modifier::REVERSED),
    ));
    Line::from(spans)
}

/// `title` in the first column, then `items` separated by two spaces, continued on
/// further lines under the first item; at most `max` lines, the last saying how many more.
pub(super) fn wrap(
    title: &str,
    items: Vec<Vec<Span<'static>>>,
    at: Layout,
    max: usize,
) -> Vec<Line<'static>> {
    let w = at.width();
    let indent = TITLE + 2;
    let width = |item: &Vec<Span<'static>>| -> usize { item.iter().map(|s| s.width()).sum() };
    // Items per line, then laid out.
    let mut rows: Vec<Vec<Vec<Span<'static>>>> = vec![Vec::new()];
    let title = if title.len() >= indent {
        format!("{title} ")
    } else {
        title.to_string()
    };
    let mut used = title.len().max(indent);
    let total = items.len();
    let mut placed = 0;
    for item in items {
        let iw = width(&item);
        let row = rows.last_mut().map(|r| r.len()).unwrap_or(0);
        if row > 0 && used + 2 + iw > w {
            if rows.len() >= max {
                break;
            }
            rows.push(Vec::new());
            used = indent;
        }
        used += if rows.last().is_some_and(|r| !r.is_empty()) {
            2 + iw
        } else {
            iw
        };
        if let Some(r) = rows.last_mut() {
            r.push(item);
        }
        placed += 1;
    }
    if placed < total
        && let Some(last) = rows.last_mut()
    {
        // Make room for the "+N more" on the last line.
        loop {
            let more = format!("+{} more", total - placed);
            let line_w: usize = indent + last.iter().map(|i| width(i) + 2).sum::<usize>();
            if line_w + more.len() <= w || last.len() <= 1 {
                last.push(vec![Span::raw(more)]);
                break;
            }
            last.pop();
            placed -= 1;
        }
    }
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let lead = if i == 0 {
                format!("{title:<indent$}")
            } else {
                " ".repeat(indent)
            };
            let mut spans = vec![Span::raw(lead)];
            for (j, item) in row.into_iter().enumerate() {
                if j > 0 {
                    spans.push(Span::raw("  "));
                }
                spans.extend(item);
            }
            Line::from(spans)
        })
        .collect()
}

/// `text` word-wrapped to the width in the live view; one line, for grep, in `--once`.
fn wrapped(text: &str, at: Layout, style: Style) -> Vec<Line<'static>> {
    if !at.live() {
        return vec![Line::from(at.span(text.to_string(), style))];
    }
    let w = at.width();
    let mut out = Vec::new();
    let mut cur = String::new();
    for word in text.split(' ') {
        if !cur.is_empty() && cur.len() + 1 + word.len() > w {
            out.push(Line::from(at.span(std::mem::take(&mut cur), style)));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    out.push(Line::from(at.span(cur, style)));
    out
}

/// Lines as plain text, trailing spaces trimmed.
pub fn plain(lines: &[Line<'_>]) -> String {
    let mut s = String::new();
    for l in lines {
        let text: String = l.spans.iter().map(|s| s.content.as_ref()).collect();
        s.push_str(text.trim_end());
        s.push('\n');
    }
    s
}

/// A count: exact below 100000, then k, M, G.
pub fn count(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a < 100_000.0 {
        if v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    } else if a < 1e6 {
        format!("{:.0}k", v / 1e3)
    } else if a < 1e9 {
        format!("{:.1}M", v / 1e6)
    } else {
        format!("{:.1}G", v / 1e9)
    }
}

/// A rate per second: one decimal below 10.
pub fn rate(v: f64) -> String {
    if v.abs() < 10.0 && v != 0.0 {
        format!("{v:.1}")
    } else {
        count(v.round())
    }
}

pub(super) fn byte_count(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn byte_rate(v: f64) -> String {
    format!("{}/s", byte_count(v))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use ratatui::widgets::Paragraph;

    use super::super::app::{App, Fetched};
    use super::*;

    fn metrics(accepted: u64, refused: u64) -> String {
        let mut m = String::new();
        for l in ["public", "api"] {
            m += &format!(
                "halfguard_connections{{listener=\"{l}\",state=\"half_open\"}} 1800\n\
                 halfguard_connections{{listener=\"{l}\",state=\"open\"}} 7\n\
                 halfguard_connections{{listener=\"{l}\",state=\"half_closed\"}} 0\n\
                 halfguard_connections{{listener=\"{l}\",state=\"stalled\"}} 2\n\
                 halfguard_connections_limit{{listener=\"{l}\",state=\"all\"}} 8192\n\
                 halfguard_connections_limit{{listener=\"{l}\",state=\"half_open\"}} 2048\n\
                 halfguard_connections_limit{{listener=\"{l}\",state=\"half_closed\"}} 2048\n\
                 halfguard_pressure{{listener=\"{l}\"}} 1\n\
                 halfguard_connections_accepted_total{{listener=\"{l}\"}} {accepted}\n\
                 halfguard_bytes_total{{listener=\"{l}\",direction=\"upstream\"}} {}\n\
                 halfguard_bytes_total{{listener=\"{l}\",direction=\"downstream\"}} {}\n",
                accepted * 1000,
                accepted * 5000
            );
            for r in [
                "denied",
                "conns_full",
                "rate",
                "source_conns",
                "source_half_open",
                "source_half_closed",
                "half_open_full",
                "half_closed_full",
                "sources_full",
            ] {
                m += &format!(
                    "halfguard_connections_rejected_total{{listener=\"{l}\",reason=\"{r}\"}} {refused}\n"
                );
            }
            for (f, k, v) in [
                ("evicted", "state", "half_open"),
                ("evicted", "state", "stalled"),
                ("timed_out", "timeout", "first_byte"),
                ("timed_out", "timeout", "request"),
                ("closed", "end", "clean"),
            ] {
                m += &format!(
                    "halfguard_connections_{f}_total{{listener=\"{l}\",{k}=\"{v}\"}} {refused}\n"
                );
            }
            m += &format!("halfguard_kernel_sockets{{listener=\"{l}\",state=\"syn_recv\"}} 300\n");
        }
        m += "halfguard_sources 4000\nhalfguard_kernel_syncookies_sent_total 9000\n";
        m += "halfguard_kernel_tcp_orphans 3\nhalfguard_memory_pressure 1\n";
        for i in 0..6 {
            m += &format!(
                "halfguard_backend_up{{backend=\"public\",server=\"10.0.0.{i}:8080\"}} 1\n"
            );
            m += &format!(
                "halfguard_backend_active{{backend=\"public\",server=\"10.0.0.{i}:8080\"}} 3\n"
            );
        }
        m
    }

    fn sources_json() -> String {
        let rows: Vec<String> = (0..20)
            .map(|i| {
                format!(
                    r#"{{"source":"198.18.{i}.1","conns":{},"half_open":{i},"half_closed":0,"stalled":0,"queued_bytes":{},"refused":{},"verdict":"{}"}}"#,
                    20 - i,
                    i << 20,
                    i * 100,
                    if i == 0 { "pool" } else { "flooding" }
                )
            })
            .collect();
        format!(
            r#"{{"listeners":[{{"listener":"public","sources":[{}],"kernel_syn_recv":[{{"source":"198.18.0.1","syn_recv":120}}]}},{{"listener":"api","sources":[]}}]}}"#,
            rows.join(",")
        )
    }

    fn busy_app() -> App {
        let mut a = App::new(
            "127.0.0.1:9901".into(),
            Duration::from_secs(1),
            "conns".into(),
        );
        let t0 = Instant::now();
        for (i, (acc, refd)) in [(1000, 10), (1600, 5000)].into_iter().enumerate() {
            a.update(Fetched {
                at: t0 + Duration::from_secs(i as u64),
                metrics: Some(Ok(metrics(acc, refd))),
                sources: Ok(sources_json()),
            });
        }
        a
    }

    fn render(a: &App, w: u16, h: u16, colour: bool) -> String {
        let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
        let ls = lines(
            a,
            Layout {
                width: w,
                height: Some(h),
                colour,
            },
        );
        assert!(
            ls.len() <= usize::from(h),
            "{} lines for {h} rows",
            ls.len()
        );
        if w >= 80 {
            for l in &ls {
                assert!(l.width() <= usize::from(w), "too wide: {l:?}");
            }
        }
        term.draw(|f| f.render_widget(Paragraph::new(ls.clone()), f.area()))
            .unwrap();
        let buf = term.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn a_busy_listener_fits_80x24_with_its_heaviest_sources() {
        let a = busy_app();
        let screen = render(&a, 80, 24, true);
        assert!(screen.contains("listener public"), "{screen}");
        assert!(screen.contains("pressure ON"), "{screen}");
        assert!(screen.contains("MEMORY PRESSURE  orphans 3"), "{screen}");
        assert!(screen.contains("half_open"), "{screen}");
        assert!(screen.contains("1800 / 2048"), "{screen}");
        assert!(
            screen.contains("stalled"),
            "a state new to this version: {screen}"
        );
        assert!(screen.contains("source_half_open"), "{screen}");
        // Each source's verdict beside it: a pool is told from a flood.
        assert!(screen.contains("VERDICT"), "{screen}");
        assert!(screen.contains("flooding"), "{screen}");
        assert!(screen.contains("SYN_RECV 300"), "{screen}");
        assert!(screen.contains("syncookies_sent"), "{screen}");
        assert!(
            screen.contains("198.18.0.1"),
            "the heaviest source: {screen}"
        );
        assert!(
            screen.lines().last().unwrap().contains("q quit"),
            "{screen}"
        );
        assert!(screen.contains("HALF_OPEN"), "{screen}");
    }

    #[test]
    fn each_nft_drop_figure_says_what_it_drops_at_its_own_rate() {
        let m = |ban: u32, syn: u32, conns: u32, untracked: u32| {
            format!(
                "halfguard_kernel_sockets{{listener=\"public\",state=\"syn_recv\"}} 3\n\
                 halfguard_kernel_syncookies_sent_total 0\n\
                 halfguard_kernel_enforcing 1\n\
                 halfguard_kernel_dropped_total{{rule=\"ban\"}} {ban}\n\
                 halfguard_kernel_dropped_total{{rule=\"syn_rate\"}} {syn}\n\
                 halfguard_kernel_dropped_total{{rule=\"conns\"}} {conns}\n\
                 halfguard_kernel_dropped_total{{rule=\"untracked\"}} {untracked}\n"
            )
        };
        let mut a = App::new("x".into(), Duration::from_secs(1), "conns".into());
        let t0 = Instant::now();
        for (i, text) in [m(10, 1000, 50, 0), m(40, 1200, 80, 4)]
            .into_iter()
            .enumerate()
        {
            a.update(Fetched {
                at: t0 + Duration::from_secs(i as u64),
                metrics: Some(Ok(text)),
                sources: Ok(sources_json()),
            });
        }
        let screen = render(&a, 80, 24, false);
        // The figures and what each drops, however the line wraps.
        let at = screen.find("  dropped/s").expect("a line of nft drops");
        let block: Vec<&str> = screen[at..]
            .lines()
            .enumerate()
            .take_while(|(i, l)| *i == 0 || l.starts_with(&" ".repeat(TITLE + 2)))
            .map(|(_, l)| l)
            .collect();
        assert_eq!(
            block
                .join(" ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            "dropped/s banned 30 SYN over rate 200 new conn over cap 30 untracked SYN 4.0",
            "{screen}"
        );
        assert!(!screen.contains("dropped 0"), "{screen}");
        let text = plain(&lines(
            &a,
            Layout {
                width: 80,
                height: None,
                colour: false,
            },
        ));
        assert!(
            text.contains("SYN over rate 200 (total 1200)")
                && text.contains("banned 30 (total 40)"),
            "{text}"
        );
    }

    #[test]
    fn without_colour_there_are_no_styles_and_bars_are_ascii() {
        let a = busy_app();
        let ls = lines(
            &a,
            Layout {
                width: 80,
                height: Some(24),
                colour: false,
            },
        );
        for l in &ls {
            for s in &l.spans {
                assert_eq!(s.style, Style::default(), "{s:?}");
                assert!(s.content.is_ascii(), "{s:?}");
            }
        }
        assert!(plain(&ls).contains("####"));
    }

    #[test]
    fn small_and_large_terminals_do_not_break_the_layout() {
        let a = busy_app();
        for (w, h) in [(40, 10), (80, 24), (200, 60), (60, 3), (80, 1)] {
            render(&a, w, h, true);
        }
        let empty = App::new("x".into(), Duration::from_secs(1), "conns".into());
        let s = render(&empty, 80, 24, false);
        assert!(s.contains("waiting for the first answer"), "{s}");
    }

    #[test]
    fn once_lists_every_listener_with_rates_and_totals() {
        let a = busy_app();
        let text = plain(&lines(
            &a,
            Layout {
                width: 80,
                height: None,
                colour: false,
            },
        ));
        assert!(
            text.contains("listener public") && text.contains("listener api"),
            "{text}"
        );
        assert!(
            text.contains("source_half_open 4990 (total 5000)"),
            "rate and total: {text}"
        );
        assert!(text.contains("accepted 600 (total 1600)"), "{text}");
        assert!(text.contains("up 585.9 KiB/s"), "{text}");
        assert!(text.contains("198.18.19.1"), "every listed source: {text}");
        let row = text.lines().find(|l| l.starts_with("198.18.5.1 ")).unwrap();
        assert!(row.ends_with(" 5.0 MiB"), "{text}");
        assert!(!text.contains("q quit"), "{text}");
    }

    #[test]
    fn numbers_stay_short() {
        assert_eq!(count(42.0), "42");
        assert_eq!(count(99_999.0), "99999");
        assert_eq!(count(123_456.0), "123k");
        assert_eq!(count(2_500_000.0), "2.5M");
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(0.25), "0.2");
        assert_eq!(rate(412.4), "412");
        assert_eq!(byte_rate(3.5 * 1024.0 * 1024.0), "3.5 MiB/s");
        assert_eq!(byte_rate(12.0), "12 B/s");
    }
}
