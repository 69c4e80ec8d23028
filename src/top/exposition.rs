//! The Prometheus text exposition, read back into samples.
//!
//! `top` reads whatever names and label values the running halfguard exposes rather than a
//! fixed list, so a state, reason or clock added in a later version shows up without a
//! change here, and a line it cannot read (a syntax of a newer format) is skipped, never
//! fatal.

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample in `text` that reads as one; comments and unreadable lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(line).collect()
}

fn line(l: &str) -> Option<Sample> {
    let l = l.trim();
    if l.is_empty() || l.starts_with('#') {
        return None;
    }
    let name_end = l.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &l[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &l[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let (ls, after) = label_set(r)?;
        labels = ls;
        rest = after;
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Reads `k="v",...}` and returns the labels and what follows the `}`.
fn label_set(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels() {
        let text = "# HELP halfguard_sources Sources.\n\
                    # TYPE halfguard_sources gauge\n\
                    halfguard_sources 3\n\
                    halfguard_connections{listener=\"public\",state=\"half_open\"} 12\n\
                    halfguard_bytes_total{listener=\"a b\",direction=\"upstream\"} 1.5e3 1700000000\n\
                    # EOF\n";
        let s = parse(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "halfguard_sources");
        assert!(s[0].labels.is_empty());
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].label("state"), Some("half_open"));
        assert_eq!(s[1].label("listener"), Some("public"));
        assert_eq!(s[2].label("listener"), Some("a b"));
        assert_eq!(s[2].value, 1500.0);
    }

    #[test]
    fn escaped_label_values_and_special_values() {
        let s =
            parse("m{l=\"q\\\"uote\\\\,}\",x=\"n\\nl\"} +Inf\nm{l=\"a\"} NaN\nm{le=\"0.1\",} -2\n");
        assert_eq!(s[0].label("l"), Some("q\"uote\\,}"));
        assert_eq!(s[0].label("x"), Some("n\nl"));
        assert!(s[0].value.is_infinite());
        assert!(s[1].value.is_nan());
        assert_eq!(s[2].value, -2.0);
    }

    #[test]
    fn unreadable_lines_are_skipped_not_fatal() {
        let s = parse("m{l=\"open} 1\nm{l} 2\n{x=\"1\"} 3\nm notanumber\nok 4\n");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "ok");
    }
}
