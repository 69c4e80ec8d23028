"""Kernel TCP memory under floods of clients that do not read (issue 26), for compare.py's
`kmem` phase: every proxy in the guard profile, one flood at a time, a legit client beside
it, and the host's TCP memory (`/proc/net/sockstat`, pages of 4 KiB) sampled every 50 ms.

The floods, each a `GET /big` (16 MiB) from clients whose receive buffer is 1 KiB:
- `halfclose`: one source, the request and a FIN, never read (4000 at most, 1000/s);
- `slowread`: one source, the request, then 1 KiB a second, no FIN;
- `halfclose-many`: 200 sources x 10 connections doing the half-close;
and, for each, the sockets the kernel keeps on the proxy's port that no proxy process holds
(orphans) with the bytes they queue, and their oldest age as `ss` sees them.

With `--cgroup`, each proxy runs in a cgroup v1 memory group of 256 MiB whose TCP memory is
limited to 256 MiB too (`memory.kmem.tcp.limit_in_bytes`, v1's stand-in for v2's socket
charging); the rows then say whether it was OOM-killed and how often the TCP limit refused.
The figure is the host's whole TCP memory, the backend's and the clients' sockets included:
what a sidecar's node pays.
"""

import os
import threading
import time

PAGE = 4096
FLOODS = [
    # name, loadgen attack arguments
    ("halfclose", ["--kind", "halfclose", "--src", "127.0.0.3", "--conns", "4000",
                   "--rate", "1000", "--rcvbuf", "1024"]),
    ("slowread", ["--kind", "slowread", "--src", "127.0.0.3", "--conns", "4000",
                  "--rate", "1000", "--rcvbuf", "1024", "--read-bps", "1024"]),
    ("halfclose-many", ["--kind", "halfclose", "--sources", "200", "--conns", "2000",
                        "--rate", "1000", "--rcvbuf", "1024"]),
]
CGROUP_ROOT = "/sys/fs/cgroup/memory"
CGROUP_LIMIT = 256 << 20


def tcp_mem_bytes():
    """The host's TCP memory (`mem`, in pages) and orphans, from /proc/net/sockstat."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                p = line.split()
                d = dict(zip(p[1::2], p[2::2]))
                return int(d["mem"]) * PAGE, int(d["orphan"])
    return 0, 0


class Sampler(threading.Thread):
    """Peak host TCP memory and orphans while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop_ = threading.Event()
        self.peak = 0
        self.peak_orphans = 0
        self.samples = []

    def run(self):
        t0 = time.monotonic()
        while not self.stop_.is_set():
            mem, orphans = tcp_mem_bytes()
            self.peak = max(self.peak, mem)
            self.peak_orphans = max(self.peak_orphans, orphans)
            self.samples.append((round(time.monotonic() - t0, 2), mem))
            time.sleep(0.05)

    def done(self):
        self.stop_.set()
        self.join()


def orphans_on(run, port, pids, prefix):
    """Sockets on `port` whose peer starts with `prefix` that no process in `pids` holds,
    not in TIME-WAIT: how many, the bytes in their send queues, and the oldest one's
    `lastrcv` in seconds (`ss -i`: since it last received, which for an orphan of a client
    that sent FIN and stopped is about its age)."""
    rc, out, err = run(["ss", "-tanpiH", "sport", "=", f":{port}"], timeout=30)
    n = queued = 0
    oldest_ms = 0
    marks = [f"pid={p}," for p in pids]
    lines = out.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        info = ""
        # With -i, the TCP info is on the next (indented) line.
        if i + 1 < len(lines) and lines[i + 1][:1].isspace():
            info = lines[i + 1]
            i += 1
        i += 1
        parts = line.split()
        if len(parts) < 5 or not parts[4].startswith(prefix):
            continue
        if parts[0] in ("TIME-WAIT", "SYN-RECV", "LISTEN"):
            continue
        if any(m in line for m in marks):
            continue
        n += 1
        try:
            queued += int(parts[2])
        except ValueError:
            pass
        for tok in info.split():
            if tok.startswith("lastrcv:"):
                try:
                    oldest_ms = max(oldest_ms, int(tok.split(":")[1]))
                except ValueError:
                    pass
    return {"orphans": n, "orphan_queued_bytes": queued, "oldest_orphan_s": oldest_ms / 1000}


class Cgroup:
    """A v1 memory group for one proxy, or None where it cannot be made."""

    def __init__(self, name):
        self.path = os.path.join(CGROUP_ROOT, f"halfguard-bench-{name}-{os.getpid()}")
        os.makedirs(self.path, exist_ok=True)
        self.write("memory.limit_in_bytes", CGROUP_LIMIT)
        self.write("memory.kmem.tcp.limit_in_bytes", CGROUP_LIMIT)

    @staticmethod
    def available():
        return os.access(CGROUP_ROOT, os.W_OK) and os.path.exists(
            os.path.join(CGROUP_ROOT, "memory.kmem.tcp.limit_in_bytes"))

    def write(self, key, value):
        with open(os.path.join(self.path, key), "w") as f:
            f.write(str(value))

    def read(self, key):
        try:
            with open(os.path.join(self.path, key)) as f:
                return f.read()
        except OSError:
            return ""

    def add(self, pids):
        for pid in pids:
            try:
                self.write("cgroup.procs", pid)
            except OSError:
                pass

    def figures(self):
        oom = dict(l.split() for l in self.read("memory.oom_control").splitlines() if l)
        num = lambda k: int(self.read(k).strip() or 0)
        return {"max_usage_bytes": num("memory.max_usage_in_bytes"),
                "tcp_max_usage_bytes": num("memory.kmem.tcp.max_usage_in_bytes"),
                "tcp_failcnt": num("memory.kmem.tcp.failcnt"),
                "oom_kills": int(oom.get("oom_kill", 0))}

    def remove(self):
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def phase_kmem(c, env, res):
    """`c` is compare.py (its helpers and constants)."""
    secs = env.args.attack_secs
    use_cgroup = env.args.cgroup
    if use_cgroup and not Cgroup.available():
        c.log("  kmem: SKIPPED the cgroup run: no writable cgroup v1 memory controller with "
              "kmem.tcp at " + CGROUP_ROOT)
        use_cgroup = False
    out = {"secs": secs, "cgroup_limit_bytes": CGROUP_LIMIT if use_cgroup else None,
           "floods": {}}
    for flood, argv in FLOODS:
        for name in c.NAMES:
            port = c.PROXIES[name]["http"]
            p = env.start_proxy(name, "guard")
            pids = c.pids_of(p)
            group = None
            if use_cgroup:
                group = Cgroup(name)
                group.add(pids)
            time.sleep(0.5)
            base, _ = tcp_mem_bytes()
            sampler = Sampler()
            sampler.start()
            t0 = time.monotonic()
            atk = c.start_loadgen(env, ["attack", "--target", f"127.0.0.1:{port}", "--secs",
                                        str(secs), "--path", "/big"] + argv, "attacker")
            lg = c.legit(env, port, secs)
            looks = []
            for at in (secs / 2, secs - 1):
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                prefix = "127.0.1." if "--sources" in argv else "127.0.0.3:"
                looks.append({"t": at, **orphans_on(c.run, port, pids, prefix)})
            a = c.finish_loadgen(atk, secs + 20)
            l = c.finish_loadgen(lg, secs + 20)
            sampler.done()
            alive = p.poll() is None
            env.stop_proxy(p)
            row = {"base_bytes": base, "peak_bytes": sampler.peak,
                   "peak_over_base_bytes": max(0, sampler.peak - base),
                   "peak_orphans": sampler.peak_orphans, "looks": looks,
                   "legit": l, "attacker": a, "proxy_alive": alive}
            if group:
                row["cgroup"] = group.figures()
                group.remove()
            out["floods"][f"{flood}/{name}"] = row
            c.log(f"  kmem {flood:14} {name:9}: peak TCP memory "
                  f"{row['peak_over_base_bytes'] / 1e6:.1f} MB over {base / 1e6:.1f}; legit "
                  f"{l and l['success_pct']}%; orphans {[x['orphans'] for x in looks]} "
                  f"({[round(x['orphan_queued_bytes'] / 1e6, 1) for x in looks]} MB, oldest "
                  f"{[x['oldest_orphan_s'] for x in looks]} s)"
                  + (f"; cgroup {row['cgroup']}" if group else "") + f"; alive {alive}")
            # Let the kernel free what the flood left (TIME-WAIT, orphans) before the next.
            time.sleep(3)
    res["kmem"] = out


def table_rows(c, res, add):
    k = res["kmem"]
    for flood, _ in FLOODS:
        e = {n: k["floods"].get(f"{flood}/{n}") for n in c.NAMES}
        if not all(e.values()):
            continue
        add(f"{flood}: peak host TCP memory over idle (MB)",
            {n: e[n]["peak_over_base_bytes"] / 1e6 for n in c.NAMES}, better="lower")
        add(f"{flood}: legit success (%)",
            {n: (e[n]["legit"] or {}).get("success_pct") for n in c.NAMES}, digits=2,
            better="higher")
        add(f"{flood}: orphans at the end (not held by the proxy)",
            {n: e[n]["looks"][-1]["orphans"] for n in c.NAMES}, digits=0, better="lower")
        if k.get("cgroup_limit_bytes"):
            add(f"{flood}: in a 256 MiB cgroup: OOM kills",
                {n: e[n]["cgroup"]["oom_kills"] for n in c.NAMES}, digits=0, better="lower")


TARGET_MB = {"halfclose": 20, "slowread": 20, "halfclose-many": 128}


def targets(res):
    out = []
    k = res["kmem"]
    for flood, _ in FLOODS:
        e = k["floods"].get(f"{flood}/halfguard")
        if not e:
            continue
        mb = e["peak_over_base_bytes"] / 1e6
        out.append((f"{flood}: peak host TCP memory <= {TARGET_MB[flood]} MB",
                    mb <= TARGET_MB[flood], f"{mb:.1f} MB"))
        legit = (e["legit"] or {}).get("success_pct")
        out.append((f"{flood}: legit success >= 99.9%", legit is not None and legit >= 99.9,
                    f"{legit}%"))
    return out
