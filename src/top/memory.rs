//! The memory line: what clients that do not read hold, against what the kernel and the
//! container allow.
//!
//! Clients that stop reading take memory outside halfguard's heap: their send queues count
//! toward the host's `tcp_mem` and, on cgroup v2, the container's limit. During such an
//! attack the operator needs these figures beside the connection counts, in one line. A
//! figure the running version does not expose, or could not read, is left out rather than
//! shown as 0, which would read as "nothing held".

use ratatui::text::{Line, Span};

use super::model::{Listener, Snapshot};
use super::view::{Layout, byte_count, count, red, wrap};

/// The `tcp_mem` level the kernel figure is drawn against: past it the kernel shrinks every
/// socket's buffers, which is when clients that read start to suffer too.
const MARK: &str = "pressure";

/// The memory line (wrapped onto a second in the live view when narrow) for the listeners
/// `shown`; nothing when the running version exposes none of it.
pub fn lines(snap: &Snapshot, shown: &[&Listener], at: Layout) -> Vec<Line<'static>> {
    let m = &snap.memory;
    let mut items: Vec<Vec<Span<'static>>> = Vec::new();
    // First, so it survives a line cut short.
    if m.pressure == Some(true) {
        items.push(vec![at.span("MEMORY PRESSURE", red())]);
    }
    for l in shown {
        let Some(q) = l.queued else { continue };
        // The cap is per listener: name it once there is more than one.
        let mut text = if snap.listeners.len() > 1 {
            format!("queued {} {}", l.name, byte_count(q))
        } else {
            format!("queued {}", byte_count(q))
        };
        // 0 is no cap.
        if let Some(cap) = l.queued_cap.filter(|c| *c > 0.0) {
            text += &format!(" of {}", byte_count(cap));
        }
        items.push(vec![Span::raw(text)]);
    }
    // Orphans before the two long figures, so that at 80 columns all fit on two lines.
    if let Some(n) = m.orphans {
        items.push(vec![Span::raw(format!("orphans {}", count(n)))]);
    }
    if let Some(tcp) = m.tcp {
        let mut text = format!("kernel TCP {}", byte_count(tcp));
        if let Some((_, v)) = m.tcp_limits.iter().find(|(level, _)| level == MARK) {
            text += &format!(" of {}", byte_count(*v));
        }
        items.push(vec![Span::raw(text)]);
    }
    let cgroup = |kind: &str| m.cgroup.iter().find(|(k, _)| k == kind).map(|(_, v)| *v);
    if let Some(u) = cgroup("usage") {
        let mut text = format!("cgroup {}", byte_count(u));
        if let Some(l) = cgroup("limit") {
            text += &format!(" of {}", byte_count(l));
        }
        items.push(vec![Span::raw(text)]);
    }
    if items.is_empty() {
        return Vec::new();
    }
    let max = if at.live() { 2 } else { usize::MAX };
    wrap("memory", items, at, max)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::exposition::parse;
    use super::super::view::plain;
    use super::*;

    const SCRAPE: &str = r#"
halfguard_connections{listener="public",state="open"} 7
halfguard_queued_bytes{listener="public"} 12897484
halfguard_queued_bytes_limit{listener="public",scope="listener"} 67108864
halfguard_queued_bytes_limit{listener="public",scope="source"} 16777216
halfguard_kernel_tcp_memory_bytes 125829120
halfguard_kernel_tcp_memory_limit_bytes{level="low"} 1073741824
halfguard_kernel_tcp_memory_limit_bytes{level="pressure"} 1717986918
halfguard_kernel_tcp_memory_limit_bytes{level="high"} 2576980377
halfguard_kernel_tcp_orphans 3
halfguard_cgroup_memory_bytes{kind="usage"} 104857600
halfguard_cgroup_memory_bytes{kind="limit"} 268435456
halfguard_memory_pressure 0
"#;

    fn text(metrics: &str, at: Layout) -> String {
        let snap = Snapshot::from_samples(&parse(metrics), Instant::now());
        let shown: Vec<&Listener> = snap.listeners.iter().collect();
        plain(&lines(&snap, &shown, at))
    }

    const ONCE: Layout = Layout {
        width: 200,
        height: None,
        colour: false,
    };

    #[test]
    fn the_line_names_every_figure_the_endpoint_exposes() {
        let t = text(SCRAPE, ONCE);
        assert_eq!(
            t.split_whitespace().collect::<Vec<_>>().join(" "),
            "memory queued 12.3 MiB of 64.0 MiB orphans 3 kernel TCP 120.0 MiB of 1.6 GiB \
             cgroup 100.0 MiB of 256.0 MiB",
        );
        assert!(!t.contains("PRESSURE"), "{t}");
    }

    #[test]
    fn memory_pressure_is_marked_in_red_only_while_on() {
        let on = SCRAPE.replace("halfguard_memory_pressure 0", "halfguard_memory_pressure 1");
        let t = text(&on, ONCE);
        assert!(
            t.starts_with("memory         MEMORY PRESSURE  queued"),
            "{t}"
        );
        let snap = Snapshot::from_samples(&parse(&on), Instant::now());
        let colour = Layout {
            colour: true,
            ..ONCE
        };
        let ls = lines(&snap, &[&snap.listeners[0]], colour);
        let marker = ls[0]
            .spans
            .iter()
            .find(|s| s.content == "MEMORY PRESSURE")
            .expect("a marker span");
        assert_eq!(marker.style, red());
    }

    #[test]
    fn a_figure_missing_from_metrics_is_left_out_not_shown_as_zero() {
        let without = |names: &[&str]| -> String {
            SCRAPE
                .lines()
                .filter(|l| !names.iter().any(|n| l.starts_with(n)))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        let t = text(
            &without(&[
                "halfguard_cgroup_memory_bytes",
                "halfguard_kernel_tcp_orphans",
                "halfguard_queued_bytes_limit",
            ]),
            ONCE,
        );
        assert!(!t.contains("cgroup") && !t.contains("orphans"), "{t}");
        assert!(
            t.contains("queued 12.3 MiB  kernel TCP"),
            "no cap exposed: {t}"
        );
        // A cap of 0 is no cap.
        let t = text(
            &SCRAPE.replace("scope=\"listener\"} 67108864", "scope=\"listener\"} 0"),
            ONCE,
        );
        assert!(t.contains("queued 12.3 MiB  orphans"), "{t}");
        assert!(t.contains("kernel TCP 120.0 MiB of 1.6 GiB"), "{t}");
        // A kernel figure without tcp_mem is the figure alone.
        let t = text(&without(&["halfguard_kernel_tcp_memory_limit_bytes"]), ONCE);
        assert!(t.contains("kernel TCP 120.0 MiB  cgroup"), "{t}");
        // A version that exposes none of it has no memory line at all.
        let t = text(
            "halfguard_connections{listener=\"a\",state=\"open\"} 1\n",
            ONCE,
        );
        assert_eq!(t, "");
    }

    #[test]
    fn each_listener_is_named_when_there_are_several_and_80_columns_hold_it_in_two_lines() {
        let two = SCRAPE.replace("halfguard_memory_pressure 0", "halfguard_memory_pressure 1")
            + "halfguard_queued_bytes{listener=\"api\"} 0\n";
        let t = text(&two, ONCE);
        assert!(
            t.contains("queued public 12.3 MiB of 64.0 MiB  queued api 0 B"),
            "{t}"
        );
        // The live view shows one listener, named since there are two.
        let snap = Snapshot::from_samples(&parse(&two), Instant::now());
        let live = Layout {
            width: 80,
            height: Some(24),
            colour: false,
        };
        let t = plain(&lines(&snap, &[&snap.listeners[0]], live));
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(t.lines().all(|l| l.len() <= 80), "{t}");
        assert!(
            t.contains("queued public") && !t.contains("api") && t.contains("cgroup"),
            "{t}"
        );
        assert!(!t.contains("more"), "every figure shown: {t}");
    }
}
