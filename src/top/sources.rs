//! The heaviest sources of each listener, read from `/sources`.
//!
//! Every numeric field of an entry is a column and a sort key, so a column a later version
//! adds (`stalled`, say) is shown and sortable without a change here.

use serde_json::Value;

/// Columns shown first, in this order; others follow alphabetically.
const PREFERRED: &[&str] = &[
    "conns",
    "half_open",
    "half_closed",
    "stalled",
    "queued_bytes",
    "refused",
];

/// One source's counts, aligned with [`Table::columns`] (`None`: not given for this one).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub source: String,
    pub values: Vec<Option<f64>>,
    /// What the proxy calls the source ("flooding", "busy", "pool", "ok"), if it says.
    pub verdict: Option<String>,
}

/// One listener's entry in `/sources`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    pub listener: String,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    /// The kernel's heaviest SYN_RECV sources at the last census.
    pub syn_recv: Vec<(String, f64)>,
}

impl Table {
    /// Heaviest first by `column`, then by address; rows without it go last. A column this
    /// table lacks leaves the order as served.
    pub fn sort_by(&mut self, column: &str) {
        let Some(i) = self.columns.iter().position(|c| c == column) else {
            return;
        };
        self.rows.sort_by(|a, b| {
            let (x, y) = (a.values[i].unwrap_or(-1.0), b.values[i].unwrap_or(-1.0));
            y.total_cmp(&x).then_with(|| a.source.cmp(&b.source))
        });
    }

    pub fn value(&self, row: &Row, column: &str) -> Option<f64> {
        let i = self.columns.iter().position(|c| c == column)?;
        row.values.get(i).copied().flatten()
    }
}

/// Reads the `/sources` JSON; the error says what was not as expected.
pub fn parse(body: &str) -> Result<Vec<Table>, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("/sources is not JSON: {e}"))?;
    let listeners = v
        .get("listeners")
        .and_then(Value::as_array)
        .ok_or("/sources has no \"listeners\" list")?;
    Ok(listeners.iter().map(table).collect())
}

fn table(l: &Value) -> Table {
    let listener = l
        .get("listener")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let entries: Vec<(String, Vec<(String, f64)>)> = l
        .get("sources")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(entry).collect())
        .unwrap_or_default();
    let verdicts: Vec<Option<String>> = l
        .get("sources")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|e| e.get("source").and_then(Value::as_str).is_some())
                .map(|e| e.get("verdict").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut columns: Vec<String> = Vec::new();
    for (_, fields) in &entries {
        for (k, _) in fields {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
    }
    columns.sort_by_key(|c| {
        (
            PREFERRED
                .iter()
                .position(|p| p == c)
                .unwrap_or(PREFERRED.len()),
            c.clone(),
        )
    });
    let rows = entries
        .into_iter()
        .zip(verdicts.into_iter().chain(std::iter::repeat(None)))
        .map(|((source, fields), verdict)| Row {
            values: columns
                .iter()
                .map(|c| fields.iter().find(|(k, _)| k == c).map(|(_, v)| *v))
                .collect(),
            source,
            verdict,
        })
        .collect();
    let syn_recv = l
        .get("kernel_syn_recv")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(entry)
                .filter_map(|(s, f)| Some((s, f.first()?.1)))
                .collect()
        })
        .unwrap_or_default();
    Table {
        listener,
        columns,
        rows,
        syn_recv,
    }
}

/// `{"source": "...", <numeric fields>...}`; an entry without a source is skipped.
fn entry(e: &Value) -> Option<(String, Vec<(String, f64)>)> {
    let obj = e.as_object()?;
    let source = obj.get("source")?.as_str()?.to_string();
    let fields = obj
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect();
    Some((source, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"listeners":[
        {"listener":"public","sources":[
            {"source":"127.0.0.2","conns":5,"half_open":5,"half_closed":0,"refused":15,"stalled":0,"verdict":"flooding"},
            {"source":"127.0.0.3","conns":8,"half_open":0,"half_closed":1,"refused":0,"stalled":3,"queued_bytes":4096,"zeta":1,"note":"x"}
        ],"kernel_syn_recv":[{"source":"198.18.0.9","syn_recv":12}]},
        {"listener":"api","sources":[],"kernel_syn_recv":[]}
    ]}"#;

    #[test]
    fn every_numeric_field_is_a_column_known_ones_first() {
        let t = parse(BODY).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0].columns,
            [
                "conns",
                "half_open",
                "half_closed",
                "stalled",
                "queued_bytes",
                "refused",
                "zeta"
            ]
        );
        assert_eq!(t[0].rows[0].source, "127.0.0.2");
        assert_eq!(t[0].value(&t[0].rows[0], "refused"), Some(15.0));
        assert_eq!(t[0].value(&t[0].rows[0], "zeta"), None);
        assert_eq!(t[0].syn_recv, vec![("198.18.0.9".to_string(), 12.0)]);
        // The verdict is kept beside the numbers; a source without one has none.
        assert_eq!(t[0].rows[0].verdict.as_deref(), Some("flooding"));
        assert_eq!(t[0].rows[1].verdict, None);
        assert!(t[1].rows.is_empty() && t[1].columns.is_empty());
    }

    #[test]
    fn sorting_by_any_column_puts_the_heaviest_first() {
        let mut t = parse(BODY).unwrap().remove(0);
        let order =
            |t: &Table| -> Vec<String> { t.rows.iter().map(|r| r.source.clone()).collect() };
        t.sort_by("conns");
        assert_eq!(order(&t), ["127.0.0.3", "127.0.0.2"]);
        t.sort_by("half_open");
        assert_eq!(order(&t), ["127.0.0.2", "127.0.0.3"]);
        t.sort_by("stalled");
        assert_eq!(order(&t), ["127.0.0.3", "127.0.0.2"]);
        t.sort_by("zeta");
        assert_eq!(
            order(&t),
            ["127.0.0.3", "127.0.0.2"],
            "missing values go last"
        );
        t.sort_by("no_such_column");
        assert_eq!(order(&t), ["127.0.0.3", "127.0.0.2"]);
    }

    #[test]
    fn not_the_expected_json_is_an_error_not_a_panic() {
        assert!(parse("not json").is_err());
        assert!(parse("{}").is_err());
        let t = parse(r#"{"listeners":[{"sources":[{"conns":1},7]}]}"#).unwrap();
        assert_eq!(t[0].listener, "?");
        assert!(t[0].rows.is_empty());
    }
}
