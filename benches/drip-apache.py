#!/usr/bin/env python3
"""The measuring half of benches/drip-apache.sh (stdlib only; that script starts and stops
every process, this one only looks).

    drip-apache.py sample --out FILE --secs N --port P --status-port S [--admin A]
    drip-apache.py settle --port P --status-port S [--secs 45]
    drip-apache.py table DIR

`sample` looks once a second, for N seconds, at the Apache backend: its scoreboard
(`server-status?auto` on its own port; with mpm_worker that request waits for a free worker
like any other, so it times out when all 64 are held), the connections Apache has accepted
(`ss -p`: an accepted connection holds one of mpm_worker's threads until it ends), how long
each has been held, and, with --admin, halfguard's connection gauges and counters. It writes
one JSON document: the samples and their summary. `settle` waits until Apache holds no
connection and its scoreboard shows only the status request, so a run does not inherit the
last one's workers. `table` prints the Markdown table of every run in DIR.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request

# A connection Apache has held this long is not a legit request (those take milliseconds):
# a dripper, or a proxy's idle keep-alive connection (state K in the scoreboard).
HELD_SECS = 2.0
DRIP_PREFIX = "127.0.1."


def status(port, timeout=0.8):
    """BusyWorkers, IdleWorkers and the scoreboard's count per state, or None when Apache
    did not answer in time."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server-status?auto",
                                    timeout=timeout) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        v = v.strip()
        if k == "BusyWorkers":
            out["busy"] = int(v)
        elif k == "IdleWorkers":
            out["idle"] = int(v)
        elif k == "Scoreboard":
            out["board"] = {c: v.count(c) for c in sorted(set(v))}
    return out if "busy" in out else None


def sockets(port):
    """The established connections on Apache's port: [(peer, accepted)], accepted when a
    process holds the socket (not still in the accept queue); and the accept queue."""
    r = subprocess.run(["ss", "-tnpH", "state", "established", "(", "sport", "=", f":{port}",
                        ")"], capture_output=True, text=True, timeout=10)
    conns = []
    for line in r.stdout.splitlines():
        addrs = [p for p in line.split() if re.match(r"^[\d.]+:\d+$", p)]
        if len(addrs) >= 2:
            conns.append((addrs[1], "users:" in line))
    r = subprocess.run(["ss", "-ltnH", "sport", "=", f":{port}"], capture_output=True,
                       text=True, timeout=10)
    queue = None
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "LISTEN":
            # Summed: halfguard's worker threads each listen on a socket of their own.
            queue = (queue or 0) + int(parts[1])
    return conns, queue


def prom(port):
    """halfguard's /metrics as {name: [(labels, value)]}, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or line.startswith("#"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        try:
            out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
        except ValueError:
            pass
    return out


def hg_view(m):
    """What a sample keeps of halfguard's metrics: gauges by state, counters by label."""
    if m is None:
        return None

    def by(name, key):
        return {l.get(key): v for l, v in m.get(name, []) if v}

    return {
        "connections": by("halfguard_connections", "state"),
        "rejected": by("halfguard_connections_rejected_total", "reason"),
        "timed_out": by("halfguard_connections_timed_out_total", "timeout"),
        "evicted": by("halfguard_connections_evicted_total", "state"),
        "accepted": sum(v for _, v in m.get("halfguard_connections_accepted_total", [])),
        "backend_active": sum(v for _, v in m.get("halfguard_backend_active", [])),
        "pressure": sum(v for _, v in m.get("halfguard_pressure", [])),
    }


def builds():
    """Compilers running beside the bench (other work on the machine: cargo's rustc)."""
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    n += f.read().strip() == "rustc"
            except OSError:
                pass
    return n


def pct(xs, p):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def sample(a):
    t0 = time.monotonic()
    first_seen = {}
    samples = []
    before = hg_view(prom(a.admin)) if a.admin else None
    while time.monotonic() - t0 < a.secs:
        tick = time.monotonic()
        st = status(a.status_port)
        conns, queue = sockets(a.port)
        now = time.monotonic()
        seen = {}
        for peer, accepted in conns:
            if accepted:
                seen[peer] = first_seen.get(peer, now)
        first_seen = seen
        pt = {
            "t": round(tick - t0, 1),
            "status": st,
            "accepted": len(seen),
            "held": sum(1 for v in seen.values() if now - v >= HELD_SECS),
            # Who: a dripper (127.0.1.x) straight to Apache, or the front's address.
            "held_peers": sorted(p for p, v in seen.items() if now - v >= HELD_SECS)[:8],
            "from_drippers": sum(1 for p in seen if p.startswith(DRIP_PREFIX)),
            "queued": sum(1 for _, acc in conns if not acc),
            "accept_queue": queue,
            "load": os.getloadavg()[0],
            "builds": builds(),
        }
        if a.admin:
            pt["halfguard"] = hg_view(prom(a.admin))
        samples.append(pt)
        time.sleep(max(0.05, 1 - (time.monotonic() - tick)))
    after = hg_view(prom(a.admin)) if a.admin else None
    reached = [s["status"] for s in samples if s["status"]]
    # The status request is itself a busy worker, in W: left out of both counts. Unanswered,
    # it waited for a free worker: every one was busy.
    busy = [s["status"]["busy"] - 1 if s["status"] else a.workers for s in samples]
    reading = [s.get("board", {}).get("R", 0) for s in reached]
    summary = {
        "samples": len(samples),
        "status_unreachable": len(samples) - len(reached),
        "busy_max": max(busy, default=None), "busy_median": pct(busy, 0.5),
        "reading_max": max(reading, default=None), "reading_median": pct(reading, 0.5),
        "accepted_max": max((s["accepted"] for s in samples), default=None),
        "accepted_median": pct([s["accepted"] for s in samples], 0.5),
        "held_max": max((s["held"] for s in samples), default=None),
        "held_median": pct([s["held"] for s in samples], 0.5),
        "from_drippers_max": max((s["from_drippers"] for s in samples), default=None),
        "accept_queue_max": max((s["accept_queue"] or 0 for s in samples), default=None),
        "load_start": round(samples[0]["load"], 2) if samples else None,
        "builds_max": max((s["builds"] for s in samples), default=None),
        "builds_seconds": sum(1 for s in samples if s["builds"]),
    }
    if a.admin:
        hs = [s["halfguard"] for s in samples if s.get("halfguard")]
        states = sorted({k for h in hs for k in h["connections"]})
        summary["halfguard"] = {
            "connections_max": {k: max(h["connections"].get(k, 0) for h in hs)
                                for k in states},
            "backend_active_max": max((h["backend_active"] for h in hs), default=None),
            "pressure_max": max((h["pressure"] for h in hs), default=None),
        }
        if before and after:
            for key in ("rejected", "timed_out", "evicted"):
                summary["halfguard"][key] = {
                    k: int(v - before[key].get(k, 0)) for k, v in after[key].items()
                    if v - before[key].get(k, 0)}
            summary["halfguard"]["accepted"] = int(after["accepted"] - before["accepted"])
    with open(a.out, "w") as f:
        json.dump({"summary": summary, "samples": samples}, f, indent=1)


def lingering(port):
    """Sockets on Apache's port in any state but LISTEN and TIME-WAIT: established ones,
    those still in the handshake (SYN-RECV: the accept queue was full), and those whose
    client has gone but Apache has not accepted yet (CLOSE-WAIT)."""
    r = subprocess.run(["ss", "-tanH", "(", "sport", "=", f":{port}", ")"],
                       capture_output=True, text=True, timeout=10)
    return [l.split()[0] for l in r.stdout.splitlines()
            if l.split() and l.split()[0] not in ("LISTEN", "TIME-WAIT")]


def settle(a):
    end = time.monotonic() + a.secs
    while time.monotonic() < end:
        st = status(a.status_port)
        left = lingering(a.port)
        if st and st["busy"] <= 1 and not left:
            return
        time.sleep(0.5)
    print(f"drip-apache: Apache still busy after {a.secs} s: {st}, sockets "
          f"{ {s: left.count(s) for s in set(left)} }", file=sys.stderr)


def load(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    # The load generator prints one JSON line last.
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def statuses(path):
    """`uniq -c` of Apache's statuses: {status: count}."""
    try:
        with open(path) as f:
            return {p[1]: int(p[0]) for p in (l.split() for l in f) if len(p) == 2}
    except (OSError, ValueError):
        return {}


def fmt(v, d=0):
    if v is None:
        return "—"
    return f"{v:,.{d}f}"


def table(a):
    d = a.dir
    fronts = [l.strip() for l in open(os.path.join(d, "fronts")) if l.strip()]
    labels = dict(l.rstrip("\n").split("\t", 1)
                  for l in open(os.path.join(d, "labels")) if "\t" in l)
    head = ["front", "legit requests", "legit success",
            "legit failed: reset / timeout / connect / other", "legit p50 / p99 (ms)",
            "Apache workers busy, max / median (status unanswered: all)",
            "workers reading a request (R), max / median",
            "connections Apache holds, max / median", "of them held ≥ 2 s, max",
            "status unanswered (of samples)", "408s in Apache's log", "400s in Apache's log, during / after",
            "drip connections made",
            "load at start", "seconds with a rustc beside"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    verdicts = []
    for fr in fronts:
        lg = load(os.path.join(d, f"{fr}.legit.out")) or {}
        atk = load(os.path.join(d, f"{fr}.attack.out")) or {}
        try:
            with open(os.path.join(d, f"{fr}.sample.json")) as f:
                sm = json.load(f)["summary"]
        except (OSError, ValueError):
            sm = {}
        n408, n400 = (statuses(os.path.join(d, f"{fr}.logstatus{w}"))
                      for w in ("", "-after"))
        n408, n400 = n408.get("408", 0), (n408.get("400", 0), n400.get("400", 0))
        unreach = sm.get("status_unreachable")
        busy = f"{fmt(sm.get('busy_max'))} / {fmt(sm.get('busy_median'))}"
        rows.append("| " + " | ".join([
            labels.get(fr, fr),
            fmt(lg.get("requests")),
            f"{fmt(lg.get('success_pct'), 2)}%" if lg else "—",
            " / ".join(fmt(lg.get(k)) for k in ("fail_reset", "fail_timeout", "fail_connect",
                                                  "fail_bad_response")),
            f"{fmt((lg.get('p50_us') or 0) / 1e3, 1)} / {fmt((lg.get('p99_us') or 0) / 1e3, 1)}"
            if lg.get("ok") else "—",
            busy,
            f"{fmt(sm.get('reading_max'))} / {fmt(sm.get('reading_median'))}",
            f"{fmt(sm.get('accepted_max'))} / {fmt(sm.get('accepted_median'))}",
            fmt(sm.get("held_max")),
            f"{fmt(unreach)} of {fmt(sm.get('samples'))}",
            fmt(n408),
            f"{fmt(n400[0])} / {fmt(n400[1])}",
            fmt(atk.get("connected")),
            fmt(sm.get("load_start"), 1),
            fmt(sm.get("builds_seconds")),
        ]) + " |")
        hg = sm.get("halfguard")
        if hg:
            notes.append(f"- {labels.get(fr, fr)}: halfguard_connections max by state "
                         f"{hg.get('connections_max')}; backend connections max "
                         f"{fmt(hg.get('backend_active_max'))}; pressure max "
                         f"{fmt(hg.get('pressure_max'))}; during the run: accepted "
                         f"{fmt(hg.get('accepted'))}, rejected {hg.get('rejected')}, "
                         f"timed out {hg.get('timed_out')}, evicted {hg.get('evicted')}")
            ok = (lg.get("success_pct") or 0) >= 99.9 and lg.get("p99_us") is not None \
                and lg["p99_us"] < 100_000 and (sm.get("held_max") or 0) == 0 \
                and not unreach and (sm.get("reading_max") or 0) <= 1 and not n408
            verdicts.append(f"- {labels.get(fr, fr)}: target (success ≥ 99.9%, p99 < 100 ms, "
                            f"no worker held by a dripper) {'met' if ok else 'NOT met'}")
    meta = {}
    try:
        with open(os.path.join(d, "meta")) as f:
            meta = dict(l.rstrip("\n").split("=", 1) for l in f if "=" in l)
    except OSError:
        pass
    print(f"Many-source drip against Apache (mpm_worker, 64 threads): {meta.get('drip', '')}")
    print(f"{meta.get('versions', '')}")
    print()
    print("\n".join(rows))
    print()
    for n in notes + verdicts:
        print(n)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--out", required=True)
    s.add_argument("--secs", type=float, required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--status-port", type=int, required=True)
    s.add_argument("--admin", type=int)
    s.add_argument("--workers", type=int, default=64)
    s = sub.add_parser("settle")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--status-port", type=int, required=True)
    s.add_argument("--secs", type=float, default=45)
    s = sub.add_parser("table")
    s.add_argument("dir")
    a = ap.parse_args()
    a.secs = min(getattr(a, "secs", 0) or 0, 180)
    {"sample": sample, "settle": settle, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()
