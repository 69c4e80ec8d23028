#!/usr/bin/env python3
"""Check the halfguard Grafana dashboard against a real /metrics scrape.

Usage:
    curl -s http://127.0.0.1:9901/metrics > scrape.txt     # halfguard's admin.bind
    python3 deploy/grafana/check-dashboard.py scrape.txt [dashboard.json]

The dashboard defaults to halfguard-dashboard.json next to this script. Checks:
  - every panel (rows excepted, panels inside collapsed rows included) has a title, a
    description, a datasource reference and at least one target with a PromQL expr;
  - every metric name used in a PromQL expr or a template variable query (matched by
    halfguard_[a-z_]+) is a series in the scrape; for histograms the _bucket/_sum/_count
    suffix is stripped and the family must be a histogram in the scrape;
  - every label name used (matchers, by/without/on/ignoring/group_*, {{legend}}) is a label
    in the scrape (or one Prometheus adds: le, instance, job), and none names a source
    address;
  - range selectors use [$__rate_interval];
  - every $variable referenced is defined in templating (or is a Grafana built-in);
  - panel ids are unique and every panel has a gridPos.
Exits 0 when all pass, 1 with one line per problem otherwise, 2 on a usage or input error.
Python 3 standard library only.
"""

import json
import os
import re
import sys

METRIC_RE = re.compile(r"halfguard_[a-z_]+")
HISTO_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus itself attaches or that PromQL uses, absent from the raw scrape.
IMPLICIT_LABELS = {"le", "instance", "job", "__name__"}
# A label like these would carry a client address; the dashboard must never show one.
SOURCE_LABEL_RE = re.compile(
    r"(^|_)(src|source|sources|client|peer|remote|addr|address|ip|ipv4|ipv6)(_|$)"
)
GROUPING_RE = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
)
SELECTOR_RE = re.compile(r"\{([^{}]*)\}")
MATCHER_LABEL_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
LEGEND_LABEL_RE = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
RANGE_RE = re.compile(r"\[([^\]]*)\]")
VAR_RE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
SCRAPE_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')


def die(msg):
    print(f"check-dashboard: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_scrape(path):
    """Returns (series names, {family: type}, label names) from Prometheus/OpenMetrics text."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        die(f"cannot read metrics file {path}: {e}")
    series, types, labels = set(), {}, set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", line)
        if not m:
            continue
        series.add(m.group(1))
        rest = line[m.end():]
        if rest.startswith("{"):
            labels.update(SCRAPE_LABEL_RE.findall(rest[: rest.rfind("}") + 1]))
    if not series:
        die(f"{path} holds no samples; is it a /metrics scrape?")
    return series, types, labels


def walk_panels(panels):
    for p in panels or []:
        yield p
        # Collapsed rows keep their children inside the row.
        yield from walk_panels(p.get("panels"))


def metric_known(name, series, types):
    """None if the name is scraped, else a reason string."""
    if name in series:
        return None
    for suf in HISTO_SUFFIXES:
        if name.endswith(suf):
            base = name[: -len(suf)]
            if types.get(base) == "histogram" or base + "_bucket" in series:
                return None
    if types.get(name) == "histogram":
        return "is a histogram family; query its _bucket, _sum or _count series"
    if name + "_total" in series:
        return f"is not a series; did you mean {name}_total?"
    return "is not in the scrape"


def expr_label_names(expr):
    """Label names an expression matches on or groups by."""
    names = set()
    for grp in GROUPING_RE.findall(expr):
        names.update(x.strip() for x in grp.split(",") if x.strip())
    # Strip string literals first so a value like "a=b" cannot look like a matcher.
    for sel in SELECTOR_RE.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        names.update(MATCHER_LABEL_RE.findall(sel))
    return names


def main():
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    scrape_path = sys.argv[1]
    dash_path = sys.argv[2] if len(sys.argv) == 3 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "halfguard-dashboard.json")

    series, types, scrape_labels = parse_scrape(scrape_path)
    try:
        with open(dash_path, encoding="utf-8") as f:
            dash = json.load(f)
    except OSError as e:
        die(f"cannot read dashboard {dash_path}: {e}")
    except json.JSONDecodeError as e:
        die(f"{dash_path} is not valid JSON: {e}")
    if not isinstance(dash, dict) or not isinstance(dash.get("panels"), list):
        die(f"{dash_path} has no top-level 'panels' list; is it a dashboard model?")

    problems = []
    templ = (dash.get("templating") or {}).get("list") or []
    defined_vars = {v.get("name") for v in templ if v.get("name")}
    defined_vars.update(i.get("name") for i in dash.get("__inputs") or [] if i.get("name"))
    allowed_labels = scrape_labels | IMPLICIT_LABELS

    used_metrics = {}  # metric name -> first place it was seen

    def check_vars(where, text):
        for v in VAR_RE.findall(text or ""):
            if not v.startswith("__") and v not in defined_vars:
                problems.append(f"{where}: ${v} is not a template variable")

    def check_labels(where, names):
        for lab in sorted(names):
            if SOURCE_LABEL_RE.search(lab):
                problems.append(f"{where}: label '{lab}' would show a source address")
            elif lab not in allowed_labels:
                problems.append(f"{where}: label '{lab}' is not in the scrape")

    def check_expr(where, expr):
        for name in METRIC_RE.findall(expr):
            used_metrics.setdefault(name, where)
        check_labels(where, expr_label_names(expr))
        for rng in RANGE_RE.findall(expr):
            if rng.strip() != "$__rate_interval":
                problems.append(f"{where}: range [{rng}] should be [$__rate_interval]")
        check_vars(where, expr)

    # Template variables.
    for v in templ:
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and isinstance(q, str):
            where = f"variable ${v.get('name')}"
            for name in METRIC_RE.findall(q):
                used_metrics.setdefault(name, where)
            m = re.match(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$", q)
            if m:
                check_labels(where, {m.group(2)} | expr_label_names(m.group(1)))

    # Panels.
    ids = {}
    n_panels = n_exprs = 0
    for p in walk_panels(dash["panels"]):
        pid = p.get("id")
        title = (p.get("title") or "").strip()
        where = f"panel {pid} '{title}'" if title else f"panel {pid}"
        if pid in ids:
            problems.append(f"{where}: id {pid} also used by '{ids[pid]}'")
        ids[pid] = title
        if not isinstance(p.get("gridPos"), dict):
            problems.append(f"{where}: no gridPos")
        if p.get("type") == "row":
            if not title:
                problems.append(f"{where}: row has no title")
            continue
        n_panels += 1
        if not title:
            problems.append(f"{where}: no title")
        if not (p.get("description") or "").strip():
            problems.append(f"{where}: no description telling an operator what a rise means")
        ds = p.get("datasource")
        if not ds or (isinstance(ds, dict) and not ds.get("uid")):
            problems.append(f"{where}: no datasource reference")
        else:
            check_vars(where, json.dumps(ds))
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        for t in targets:
            twhere = f"{where} target {t.get('refId', '?')}"
            expr = (t.get("expr") or "").strip()
            if not expr:
                problems.append(f"{twhere}: empty expr")
                continue
            n_exprs += 1
            check_expr(twhere, expr)
            if t.get("datasource"):
                check_vars(twhere, json.dumps(t["datasource"]))
            legend = t.get("legendFormat") or ""
            check_labels(twhere + " legend", set(LEGEND_LABEL_RE.findall(legend)))
            check_vars(twhere + " legend", legend)

    for name in sorted(used_metrics):
        why = metric_known(name, series, types)
        if why:
            problems.append(f"{used_metrics[name]}: metric {name} {why}")

    if n_panels == 0:
        problems.append("dashboard has no panels")

    # Families in the scrape that no panel shows: informational only.
    used_families = set()
    for name in used_metrics:
        used_families.add(name)
        for suf in HISTO_SUFFIXES + ("_total",):
            if name.endswith(suf):
                used_families.add(name[: -len(suf)])
    unused = sorted(
        f for f in types
        if f.startswith("halfguard_") and f not in used_families and f + "_total" not in used_families
    )

    if problems:
        for msg in problems:
            print(f"FAIL {msg}")
        print(f"check-dashboard: {len(problems)} problem(s) in {dash_path} "
              f"against {scrape_path}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {n_panels} panels, {n_exprs} exprs, {len(used_metrics)} metric names, "
          f"all present in {scrape_path}")
    if unused:
        print("note: in the scrape but on no panel: " + ", ".join(unused))


if __name__ == "__main__":
    main()
