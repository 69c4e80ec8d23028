#!/usr/bin/env python3
"""halfguard side by side with HAProxy and nginx, on loopback. Started by run.sh.

    python3 benches/compare/compare.py --halfguard BIN --loadgen BIN [--reps 3]
        [--only bulk,rate,memory,attack,drip,busy] [--attack-secs 30] [--json FILE]

Writes the peers' configs into benches/peers/ (the reference configs, committed), starts
the backends (nginx serving static files, iperf3 -s), then runs every workload against
halfguard, HAProxy and nginx in turn, and prints one Markdown table with every figure and
the ratios halfguard/HAProxy and halfguard/nginx, the targets of the issue met or not, and
writes everything to a JSON file. Stdlib only. Loopback only, ports 17000-17299; every
load is bounded in count and time; the processes it starts are stopped by PID.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kmem  # noqa: E402  (beside this file)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PEERS = os.path.join(ROOT, "benches", "peers")
WORK = os.path.join(ROOT, "target", "compare")

# Ports: one "http" listener (to the HTTP backend) and one "bulk" listener (to iperf3 -s)
# per proxy.
HTTP_BACKEND = 17201
IPERF_BACKEND = 17202
PROXIES = {
    "halfguard": {"http": 17080, "bulk": 17180, "admin": 17090},
    # The stats page (CSV) is in the drip and busy profiles only: their refusal counts.
    "haproxy": {"http": 17081, "bulk": 17181, "stats": 17091},
    "nginx": {"http": 17082, "bulk": 17182},
}
NAMES = ["halfguard", "haproxy", "nginx"]
LEGIT_SRC = "127.0.0.2"
ATTACK_SRC = "127.0.0.3"

# The policy, in halfguard's terms: the defaults, read from config/halfguard.toml (the
# guard profile of halfguard sets none of these, so it runs with exactly these). The peers
# get the same numbers wherever they have the same knob.
SHIPPED_CONFIG = os.path.join(ROOT, "config", "halfguard.toml")
LIMIT_KEYS = ("max_conns_per_source", "max_half_open_per_source", "max_half_closed_per_source",
              "conn_rate_per_source", "conn_burst_per_source", "grace", "min_rate", "max_conns",
              "on_full")
TIMEOUT_KEYS = ("first_byte", "request", "idle", "half_closed", "connect")
# What config/halfguard.toml said when this script was last changed; used only when Python
# has no tomllib (before 3.11).
GUARD_FALLBACK = {
    "max_conns_per_source": 64, "max_half_open_per_source": 16,
    "max_half_closed_per_source": 16, "conn_rate_per_source": 200,
    "conn_burst_per_source": 400, "grace": "1s", "min_rate": 500, "max_conns": 8192,
    "on_full": "evict", "first_byte": "10s", "request": "10s", "idle": "5m",
    "half_closed": "30s", "connect": "3s",
}


def shipped_defaults():
    try:
        import tomllib
    except ImportError:
        print("compare: no tomllib (Python < 3.11): using the defaults this script knows",
              file=sys.stderr)
        return dict(GUARD_FALLBACK)
    try:
        with open(SHIPPED_CONFIG, "rb") as f:
            c = tomllib.load(f)
        limits, timeouts = c.get("limits", {}), c.get("timeouts", {})
        return {**{k: limits.get(k, GUARD_FALLBACK[k]) for k in LIMIT_KEYS},
                **{k: timeouts.get(k, GUARD_FALLBACK[k]) for k in TIMEOUT_KEYS}}
    except (OSError, ValueError) as e:
        sys.exit(f"compare: cannot read the shipped defaults in {SHIPPED_CONFIG}: {e}")


GUARD = shipped_defaults()
# The performance profile: the same mechanisms and clocks, with the per-source numbers
# raised so that one load generator on one address is not throttled (8000 held connections
# from one source in the memory workload), and no connection rate limit (nginx has none).
PERF_SOURCE_CAP = 9000
# Connections per process: 2 descriptors per proxied connection, 20000 descriptors.
MAX_CONNS = 9000
HAPROXY_MAXPIPES = 400
# The bulk listener holds few connections in every profile but "bulk", so that the HTTP
# listener keeps its cap within the descriptors.
BULK_MAX_CONNS = 64
# The bulk phase's own profile (the perf profile otherwise): its bulk listener promises
# 15000 connections, more than 20000 descriptors hold; halfguard lowers the caps to fit and
# still splices (pipes come out of their own share of the budget, on demand). HAProxy refuses
# to start with a global maxconn that does not fit: its bulk frontend promises 15000 within
# the global 9000, with its maxpipes.
BULK_PROFILE_MAX_CONNS = 15000

# The many-source slow drip (issue 11): 200 sources x 20 connections, each a request line and
# then a header that never ends, one byte every `--drip-every` ms, against a listener that
# holds 3000 connections; halfguard's defaults must stop it on their own (no request or
# min_rate set). The legit client is alone on 127.0.0.3.
DRIP = {
    "sources": 200, "per_source": 20, "rate": 1000,
    "max_conns": 3000, "max_conns_per_source": 50,
    "first_byte": "5s", "idle": "30s", "on_full": "evict",
}
DRIP_LEGIT_SRC = "127.0.0.3"
# A probe straight to the HTTP backend during each drip run, at a rate that adds nothing:
# what the backend and the machine alone do to a request's latency then.
DRIP_PROBE_SRC = "127.0.0.4"
DRIP_PROBE_RATE = 10
DRIP_ATTACK_PREFIX = "127.0.1."
DRIP_P99_US = 50_000  # target: legit p99 under 50 ms

# A busy legit address (issue 16): one client address, a new connection per request, at
# these concurrencies, with the per-source caps (64 concurrent; halfguard's shipped state
# caps) and no per-source rate limit.
BUSY_CONCURRENCY = (16, 32, 64)

SMALL_BODY = b"halfguard bench: a small static body of 128 bytes, served by nginx as the HTTP backend of every proxy in the comparison.\n"
SMALL_BODY = SMALL_BODY.ljust(128, b".")[:127] + b"\n"
BIG_BYTES = 16 << 20

# Attacks: (kind, attacker sockets at most, new attacker connections per second at most).
ATTACKS = [
    ("silent", 4000, 1000),
    ("halfclose", 4000, 1000),
    ("slowread", 4000, 1000),
    ("churn", 256, 5000),
]
LEGIT_RATE = 40  # requests/s, each on a new connection: under the per-source rate (200/s)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# configs


def bulk_cap(profile):
    """The bulk listener's connection cap, and the comment that says why."""
    if profile == "bulk":
        return BULK_PROFILE_MAX_CONNS, ("# More than the descriptors hold: lowered to fit, "
                                        "splice all the same.")
    return BULK_MAX_CONNS, "# Few connections here, so that the HTTP listener keeps its cap."


def halfguard_toml(profile):
    p = PROXIES["halfguard"]
    bulk_cap_, bulk_comment = bulk_cap(profile)
    head = f"""# halfguard, {profile} profile, for benches/compare (generated by compare.py; do not edit).
"""
    if profile == "guard":
        head += """# The attack runs: halfguard's defaults (config/halfguard.toml) for every cap and clock.
"""
    elif profile == "drip":
        head += f"""# The many-source slow drip: a listener of {DRIP['max_conns']} connections, {DRIP['max_conns_per_source']} per source,
# evict when full, first byte {DRIP['first_byte']}, idle {DRIP['idle']}; everything else (the request clock,
# min_rate, grace, the state caps, the rate limit, pressure) at halfguard's defaults, but for
# the per-network cap: the bench's 200 sources share 127.0.1.0/24, which the default cap
# (1024 per /24) alone would hold; off, the flood is what 200 sources in 200 networks do.
"""
    elif profile == "busy":
        head += """# A busy legit address: halfguard's defaults (64 connections per source, the shipped
# half-open and half-closed caps and grace) with the per-source rate limit lifted.
"""
    else:
        head += f"""# The happy-path runs: halfguard's default clocks; the per-source caps raised to
# {PERF_SOURCE_CAP} so that one load generator on one address is not throttled; no rate limit.
"""
    s = head + f"""
[[listeners]]
name = "http"
bind = "127.0.0.1:{p['http']}"
backends = ["127.0.0.1:{HTTP_BACKEND}"]

[[listeners]]
name = "bulk"
bind = "127.0.0.1:{p['bulk']}"
backends = ["127.0.0.1:{IPERF_BACKEND}"]
[listeners.limits]
{bulk_comment}
max_conns = {bulk_cap_}
"""
    if profile == "drip":
        s += f"""
[limits]
max_conns = {DRIP['max_conns']}
max_conns_per_source = {DRIP['max_conns_per_source']}
on_full = "{DRIP['on_full']}"
max_conns_per_network = 0
"""
    if profile == "busy":
        s += """
[limits]
conn_rate_per_source = 0
"""
    if profile in ("perf", "bulk"):
        s += f"""
[limits]
max_conns_per_source = {PERF_SOURCE_CAP}
max_half_open_per_source = {PERF_SOURCE_CAP}
max_half_closed_per_source = {PERF_SOURCE_CAP}
# The load generator's one address is its /24 too (the per-network cap is 1024 by default).
max_conns_per_network = {PERF_SOURCE_CAP}
conn_rate_per_source = 0
max_conns = {MAX_CONNS}
max_half_open = {MAX_CONNS}
max_half_closed = {MAX_CONNS}

[pressure]
# 8000 held silent connections must not start pressure mode (its 2 s silent clock).
high_water = 0.95
low_water = 0.9
"""
    s += "\n[timeouts]\n"
    if profile == "drip":
        s += f"""first_byte = "{DRIP['first_byte']}"
idle = "{DRIP['idle']}"
"""
    s += f"""drain = "1s"

[admin]
bind = "127.0.0.1:{p['admin']}"

[log]
level = "warn"
"""
    return s


def profile_policy(profile):
    """The numbers a profile gives every proxy: per-source cap and rate (0 = none), the
    HTTP listener's connection cap, and the first-byte and idle clocks."""
    p = {"source_cap": GUARD["max_conns_per_source"], "rate": GUARD["conn_rate_per_source"],
         "http_max_conns": MAX_CONNS, "first_byte": GUARD["first_byte"], "idle": GUARD["idle"]}
    if profile in ("perf", "bulk"):
        p.update(source_cap=PERF_SOURCE_CAP, rate=0)
    elif profile == "busy":
        p.update(rate=0)
    elif profile == "drip":
        p.update(source_cap=DRIP["max_conns_per_source"], http_max_conns=DRIP["max_conns"],
                 first_byte=DRIP["first_byte"], idle=DRIP["idle"])
    return p


def haproxy_cfg(profile):
    p = PROXIES["haproxy"]
    pol = profile_policy(profile)
    if profile in ("perf", "bulk"):
        rules = f"""    # Per-source concurrent cap, raised like halfguard's perf profile; no rate limit.
    tcp-request connection reject if {{ sc0_conn_cur gt {pol['source_cap']} }}"""
    else:
        rules = f"""    # Per-source concurrent cap (halfguard: max_conns_per_source); HAProxy has no cap by
    # TCP state.
    tcp-request connection reject if {{ sc0_conn_cur gt {pol['source_cap']} }}"""
        if pol["rate"]:
            rules += f"""
    # Per-source connection rate (halfguard: conn_rate_per_source; HAProxy has no burst).
    tcp-request connection reject if {{ sc0_conn_rate gt {pol['rate']} }}"""
        else:
            rules += """
    # No per-source connection rate limit (lifted for halfguard too)."""
    fe = ""
    for name, port, backend_port, maxconn in (
        ("http", p["http"], HTTP_BACKEND, pol["http_max_conns"]),
        ("bulk", p["bulk"], IPERF_BACKEND, bulk_cap(profile)[0]),
    ):
        fe += f"""
frontend {name}
    bind 127.0.0.1:{port} backlog 4096 tcp-ut 30s
    maxconn {maxconn}
    stick-table type ip size 100k expire 60s store conn_cur,conn_rate(1s)
    tcp-request connection track-sc0 src
{rules}
    # First-byte clock: a connection that sends nothing within {pol['first_byte']} is refused.
    tcp-request inspect-delay {pol['first_byte']}
    tcp-request content accept if {{ req.len gt 0 }}
    tcp-request content reject
    default_backend {name}

backend {name}
    server s1 127.0.0.1:{backend_port} tcp-ut 30s
"""
    if profile in ("drip", "busy"):
        fe += f"""
# Counters for the comparison (denied connections, current sessions): GET /stats;csv.
frontend stats
    mode http
    bind 127.0.0.1:{p['stats']}
    maxconn 16
    timeout client 5s
    stats enable
    stats uri /stats
"""
    return f"""# HAProxy 2.6, {profile} profile, for benches/compare (generated by compare.py; do not edit).
# Tuned to go fast: 2 threads (2 cores), splice-auto with a pipe budget that fits the
# descriptor limit (20000 per process: {MAX_CONNS} connections x 2 + {HAPROXY_MAXPIPES} pipes x 2).
# A global maxconn that does not fit is fatal to HAProxy ("Cannot raise FD limit"), so in the
# bulk profile only the bulk frontend promises {BULK_PROFILE_MAX_CONNS}, within the global {MAX_CONNS}.
global
    nbthread 2
    maxconn {MAX_CONNS}
    maxpipes {HAPROXY_MAXPIPES}

defaults
    mode tcp
    option splice-auto
    # Idle clock (halfguard: timeouts.idle) and connect budget (timeouts.connect).
    timeout connect {GUARD['connect']}
    timeout client {pol['idle']}
    timeout server {pol['idle']}
    # Half-close clock (halfguard: timeouts.half_closed).
    timeout client-fin {GUARD['half_closed']}
    timeout server-fin {GUARD['half_closed']}
    # Dead peers: keepalive 60s/10s/6 and TCP_USER_TIMEOUT 30s, as halfguard's [tcp].
    option clitcpka
    option srvtcpka
    clitcpka-idle 60s
    clitcpka-intvl 10s
    clitcpka-cnt 6
    srvtcpka-idle 60s
    srvtcpka-intvl 10s
    srvtcpka-cnt 6
{fe}"""


def nginx_proxy_conf(profile):
    p = PROXIES["nginx"]
    pol = profile_policy(profile)
    zones = ""
    listener_cap = ""
    if pol["http_max_conns"] != MAX_CONNS:
        # worker_connections is per worker and counts both sides of a proxied connection
        # and the listeners, so it cannot say "3000 client connections on this listener"
        # with 2 workers; limit_conn on a key that is the same for every client (the
        # server's port) can, exactly, shared by the workers.
        zones = """
    # The HTTP listener's connection cap (halfguard: max_conns; HAProxy: maxconn on the
    # frontend): limit_conn on a key every client of the server shares.
    limit_conn_zone $server_port zone=listener:1m;"""
        listener_cap = f"""
        limit_conn listener {pol['http_max_conns']};"""
    servers = ""
    for port, backend_port, cap in ((p["http"], HTTP_BACKEND, listener_cap),
                                    (p["bulk"], IPERF_BACKEND, "")):
        servers += f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096 so_keepalive=60s:10s:6;
        # Per-source concurrent cap (halfguard: max_conns_per_source).
        limit_conn src {pol['source_cap']};{cap}
        proxy_pass 127.0.0.1:{backend_port};
        proxy_connect_timeout {GUARD['connect']};
        # Idle clock (halfguard: timeouts.idle). nginx has no half-close clock and no
        # first-byte clock in plain stream proxying; proxy_timeout covers both.
        proxy_timeout {pol['idle']};
        # Forward half-closes as halfguard and HAProxy do (off would end both sides at the
        # first FIN, which breaks protocols that half-close).
        proxy_half_close on;
        proxy_socket_keepalive on;
    }}
"""
    return f"""# nginx 1.22 stream proxy, {profile} profile, for benches/compare (generated by compare.py;
# do not edit). Run as: nginx -p PREFIX/ -c THIS -e stderr. 2 workers (2 cores).
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
user root;
worker_processes 2;
worker_rlimit_nofile 20000;
pid nginx.pid;
error_log error.log warn;

events {{
    worker_connections 19000;
}}

stream {{
    # No per-source connection rate limit exists in nginx stream (limit_req is HTTP only).
    limit_conn_zone $binary_remote_addr zone=src:10m;{zones}
    tcp_nodelay on;
{servers}}}
"""


def nginx_backend_conf():
    return f"""# nginx as the HTTP backend of every proxy in benches/compare (generated by compare.py;
# do not edit): /small is {len(SMALL_BODY)} bytes, /big is {BIG_BYTES >> 20} MiB.
daemon off;
user root;
worker_processes 1;
worker_rlimit_nofile 20000;
pid nginx.pid;
error_log error.log warn;

events {{
    worker_connections 19000;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    default_type application/octet-stream;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {{
        listen 127.0.0.1:{HTTP_BACKEND} backlog=4096;
        root www;
    }}
}}
"""


# `--cluster`: halfguard's profiles gain a [cluster] section toward a redis-server the run
# starts on this port (and stops), to show what the cluster sync costs the happy path.
CLUSTER_REDIS_PORT = 17298
CLUSTER = False


def with_cluster(toml):
    """A halfguard profile with `[cluster]` on, when the run asks for it."""
    if not CLUSTER:
        return toml
    return toml + f"""
[cluster]
# --cluster: the sync runs against a local redis-server (one replica: it publishes its heavy
# sources and reads nobody's).
redis = "redis://127.0.0.1:{CLUSTER_REDIS_PORT}/0"
node = "bench"
"""


def write_configs():
    # The cluster variant goes beside the run's other files, not over the committed ones.
    peers = os.path.join(WORK, "peers-cluster") if CLUSTER else PEERS
    os.makedirs(peers, exist_ok=True)
    files = {
        "halfguard-perf.toml": halfguard_toml("perf"),
        "halfguard-bulk.toml": halfguard_toml("bulk"),
        "haproxy-bulk.cfg": haproxy_cfg("bulk"),
        "nginx-bulk.conf": nginx_proxy_conf("perf").replace("perf profile", "bulk profile (the perf one)"),
        "halfguard-guard.toml": halfguard_toml("guard"),
        "haproxy-perf.cfg": haproxy_cfg("perf"),
        "haproxy-guard.cfg": haproxy_cfg("guard"),
        "nginx-perf.conf": nginx_proxy_conf("perf"),
        "nginx-guard.conf": nginx_proxy_conf("guard"),
        "halfguard-drip.toml": halfguard_toml("drip"),
        "haproxy-drip.cfg": haproxy_cfg("drip"),
        "nginx-drip.conf": nginx_proxy_conf("drip"),
        "halfguard-busy.toml": halfguard_toml("busy"),
        "haproxy-busy.cfg": haproxy_cfg("busy"),
        "nginx-busy.conf": nginx_proxy_conf("busy"),
        "nginx-backend.conf": nginx_backend_conf(),
    }
    for name, text in files.items():
        if name.startswith("halfguard-"):
            text = with_cluster(text)
        with open(os.path.join(peers, name), "w") as f:
            f.write(text)
    return {n: os.path.join(peers, n) for n in files}


# ------------------------------------------------------------------------------------------
# processes

STARTED = []


def start(name, cmd, cwd=None):
    os.makedirs(os.path.join(WORK, "logs"), exist_ok=True)
    out = open(os.path.join(WORK, "logs", name + ".log"), "ab")
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                         start_new_session=True)
    p.name = name
    STARTED.append(p)
    return p


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in STARTED:
        STARTED.remove(p)


def stop_all():
    for p in list(STARTED):
        stop(p)


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                if int(st.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def pids_of(p):
    return [p.pid] + children(p.pid)


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def fd_count(pids):
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


def cpu_secs(pids):
    """User + system CPU seconds the processes have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            pass
    return total


def runq_wait_secs(pids):
    """Seconds the processes' threads spent runnable but waiting for a CPU (schedstat), so
    far: how much a busy machine held the proxy back."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return total / 1e9


def accept_queue(port):
    """Connections the kernel completed on the listener and the proxy has not accepted yet
    (Recv-Q of the LISTEN sockets, summed: halfguard's worker threads each have one in an
    SO_REUSEPORT group), or None."""
    rc, out, err = run(["ss", "-ltnH", "sport", "=", f":{port}"], timeout=30)
    queued = None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "LISTEN" and parts[3].endswith(f":{port}"):
            queued = (queued or 0) + int(parts[1])
    return queued


def wait_port(port, timeout=10.0, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.returncode}; see {WORK}/logs/")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Env:
    def __init__(self, args, cfg):
        self.args = args
        self.cfg = cfg

    def start_proxy(self, name, profile):
        """Starts one proxy with a profile's config and waits for its listeners."""
        if name == "halfguard":
            p = start(f"halfguard-{profile}",
                      [self.args.halfguard, "run", "-c", self.cfg[f"halfguard-{profile}.toml"]])
        elif name == "haproxy":
            p = start(f"haproxy-{profile}",
                      ["haproxy", "-db", "-f", self.cfg[f"haproxy-{profile}.cfg"]])
        else:
            prefix = os.path.join(WORK, f"nginx-{profile}")
            os.makedirs(prefix, exist_ok=True)
            p = start(f"nginx-{profile}", ["nginx", "-p", prefix + "/", "-e", "stderr",
                                           "-c", self.cfg[f"nginx-{profile}.conf"]])
        for port in (PROXIES[name]["http"], PROXIES[name]["bulk"]):
            wait_port(port, proc=p)
        if name == "nginx":
            # Let the workers come up.
            end = time.monotonic() + 5
            while len(children(p.pid)) < 2 and time.monotonic() < end:
                time.sleep(0.05)
        time.sleep(0.3)
        return p

    def stop_proxy(self, p):
        stop(p, signal.SIGINT if p.name.startswith("halfguard") else signal.SIGTERM)


# ------------------------------------------------------------------------------------------
# workloads


def run(cmd, timeout):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def iperf(port, streams, secs):
    for attempt in range(4):
        rc, out, err = run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(secs),
                            "-O", "1", "-P", str(streams), "-J"], timeout=secs + 30)
        try:
            j = json.loads(out)
        except ValueError:
            j = {"error": (err or out)[-300:]}
        if "error" not in j:
            return j["end"]["sum_received"]["bits_per_second"] / 1e9
        log(f"  iperf3 -p {port} -P {streams}: {j['error']}; retrying")
        time.sleep(1.5)
    return None


def to_us(v, unit):
    return float(v) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def wrk(port, close, secs, conns):
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "3s"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://127.0.0.1:{port}/small")
    rc, out, err = run(cmd, timeout=secs + 30)
    r = {"rps": None}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    for pct, v, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        r[f"p{pct}_us"] = to_us(v, unit)
    m = re.search(r"(\d+) requests in", out)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = sum(map(int, m.groups())) if m else 0
    r["socket_errors_by"] = (dict(zip(("connect", "read", "write", "timeout"),
                                      map(int, m.groups()))) if m else {})
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non_2xx"] = int(m.group(1)) if m else 0
    if r["rps"] is None:
        log(f"  wrk failed: {out[-300:]} {err[-300:]}")
    return r


def kv(line):
    return dict(x.split("=", 1) for x in line.split() if "=" in x)


def hold(loadgen, port, count, pids):
    rc, out, err = run([loadgen, "hold", "--target", f"127.0.0.1:{port}", "--count",
                        str(count), "--secs", "2", "--settle-ms", "2000",
                        "--pid", ",".join(map(str, pids))], timeout=60)
    line = next((l for l in out.splitlines() if l.startswith("hold ")), None)
    if line is None:
        log(f"  hold failed: {out[-300:]} {err[-300:]}")
        return None
    r = kv(line)
    return {k: (float(v) if re.fullmatch(r"-?[\d.]+", v) else v) for k, v in r.items()}


def sockets_held(port, pids, peer_ip):
    """Sockets on the proxy's listening port whose peer is `peer_ip` (an address, or a
    prefix ending in "." such as "127.0.1."): those a proxy process holds a descriptor for,
    and all that the kernel keeps (accept queue, orphans), without TIME-WAIT."""
    peer = peer_ip if peer_ip.endswith(".") else peer_ip + ":"
    rc, out, err = run(["ss", "-tanpH", "sport", "=", f":{port}"], timeout=30)
    held = kernel = 0
    marks = [f"pid={p}," for p in pids]
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[4].startswith(peer):
            continue
        if parts[0] in ("TIME-WAIT", "SYN-RECV", "LISTEN"):
            continue
        kernel += 1
        if any(m in line for m in marks):
            held += 1
    return held, kernel


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------------------------------
# the phases


def phase_bulk(env, res, proxies):
    secs = env.args.bulk_secs
    targets = [("none", IPERF_BACKEND)] + [(n, PROXIES[n]["bulk"]) for n in NAMES]
    runs = {f"{t}/{s}": [] for t, _ in targets for s in (1, 8)}
    for rep in range(env.args.reps):
        for streams in (1, 8):
            for t, port in targets:
                g = iperf(port, streams, secs)
                runs[f"{t}/{streams}"].append(g)
                log(f"  bulk rep {rep + 1} {t:9} P{streams}: {g and round(g, 2)} Gbit/s")
    res["bulk"] = {k: {"runs": v, "median_gbps": median(v)} for k, v in runs.items()}


def phase_rate(env, res, proxies):
    secs = env.args.wrk_secs
    targets = [("none", HTTP_BACKEND)] + [(n, PROXIES[n]["http"]) for n in NAMES]
    out = {}
    for mode in ("keepalive", "close"):
        runs = {t: [] for t, _ in targets}
        for rep in range(env.args.reps):
            for t, port in targets:
                r = wrk(port, mode == "close", secs, env.args.wrk_conns)
                runs[t].append(r)
                log(f"  wrk {mode:9} rep {rep + 1} {t:9}: {r.get('rps')} req/s "
                    f"p50 {r.get('p50_us')} us p99 {r.get('p99_us')} us "
                    f"errors {r['socket_errors']} non-2xx {r['non_2xx']}")
        out[mode] = {t: {"runs": v,
                         "median_rps": median([r.get("rps") for r in v]),
                         "median_p50_us": median([r.get("p50_us") for r in v]),
                         "median_p99_us": median([r.get("p99_us") for r in v]),
                         "errors": sum(r["socket_errors"] + r["non_2xx"] for r in v)}
                     for t, v in runs.items()}
    res["rate"] = out


def phase_memory(env, res):
    out = {}
    for name in NAMES:
        for count in (1000, 8000):
            runs = []
            for rep in range(env.args.reps):
                p = env.start_proxy(name, "perf")
                time.sleep(0.5)
                r = hold(env.args.loadgen, PROXIES[name]["http"], count, pids_of(p))
                env.stop_proxy(p)
                runs.append(r)
                log(f"  hold {name:9} {count:5} rep {rep + 1}: {r}")
                time.sleep(0.5)
            out[f"{name}/{count}"] = {
                "runs": runs,
                "median_bytes_per_conn": median([r and r.get("per_conn_bytes") for r in runs]),
                "held": min((r or {}).get("held", 0) for r in runs),
            }
    res["memory"] = out


def legit(env, port, secs, src=LEGIT_SRC):
    return start_loadgen(env, ["http", "--target", f"127.0.0.1:{port}", "--src", src,
                               "--rate", str(LEGIT_RATE), "--secs", str(secs),
                               "--timeout-ms", "3000", "--path", "/small"], "legit")


def start_loadgen(env, argv, name):
    p = subprocess.Popen([env.args.loadgen] + argv, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    p.name = name
    STARTED.append(p)
    return p


def finish_loadgen(p, timeout):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    if p in STARTED:
        STARTED.remove(p)
    for line in out.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    log(f"  {p.name} printed nothing: {err[-300:]}")
    return None


def caps_for(name, kind):
    """The cap each proxy is configured with for the attacker's sockets in that attack."""
    per_source = GUARD["max_conns_per_source"]
    if name == "halfguard":
        return {"silent": GUARD["max_half_open_per_source"],
                "halfclose": GUARD["max_half_closed_per_source"],
                "slowread": per_source, "churn": per_source}[kind]
    return per_source


def phase_attack(env, res):
    secs = env.args.attack_secs
    base_secs = env.args.baseline_secs
    samples_at = [5, 10, secs - 0.5]
    out = {"baseline": {}, "attacks": {}}
    for name in NAMES:
        port = PROXIES[name]["http"]
        p = env.start_proxy(name, "guard")
        r = finish_loadgen(legit(env, port, base_secs), base_secs + 15)
        env.stop_proxy(p)
        out["baseline"][name] = r
        log(f"  baseline {name:9}: {r}")
    for kind, conns, rate in ATTACKS:
        for name in NAMES:
            port = PROXIES[name]["http"]
            p = env.start_proxy(name, "guard")
            pids = pids_of(p)
            idle = {"fds": fd_count(pids), "rss_kib": rss_kib(pids)}
            t0 = time.monotonic()
            atk = start_loadgen(env, ["attack", "--kind", kind, "--target", f"127.0.0.1:{port}",
                                      "--src", ATTACK_SRC, "--conns", str(conns), "--rate",
                                      str(rate), "--secs", str(secs), "--path", "/big"],
                                "attacker")
            lg = legit(env, port, secs)
            base_mem, _ = kmem.tcp_mem_bytes()
            sampler = kmem.Sampler()
            sampler.start()
            samples = []
            for at in samples_at:
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                held, kernel = sockets_held(port, pids, ATTACK_SRC)
                samples.append({"t": at, "held": held, "kernel": kernel,
                                "fds": fd_count(pids), "rss_kib": rss_kib(pids)})
            a = finish_loadgen(atk, secs + 20)
            l = finish_loadgen(lg, secs + 20)
            sampler.done()
            alive = p.poll() is None
            env.stop_proxy(p)
            out["attacks"][f"{kind}/{name}"] = {"legit": l, "attacker": a, "samples": samples,
                                                "idle": idle, "cap": caps_for(name, kind),
                                                "proxy_alive": alive,
                                                "peak_tcp_mem_bytes": max(0, sampler.peak
                                                                          - base_mem)}
            log(f"  attack {kind:9} {name:9}: legit {l and l['success_pct']:.4}% "
                f"p99 {l and l['p99_us']} us; held "
                f"{[s['held'] for s in samples]} (kernel {[s['kernel'] for s in samples]}); "
                f"fds {[s['fds'] for s in samples]}; attacker {a}")
            time.sleep(1)
    res["attack"] = out


def prom(port):
    """halfguard's /metrics as {name: [(labels, value)]}, or None when it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        log(f"  /metrics on {port}: {e}")
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


def prom_sum(metrics, name, **want):
    if metrics is None:
        return None
    return sum(v for labels, v in metrics.get(name, [])
               if all(labels.get(k) == w for k, w in want.items()))


def prom_by(metrics, name, key, **want):
    """{label value: sample} of one metric, for the samples matching `want`."""
    if metrics is None:
        return None
    return {labels.get(key): v for labels, v in metrics.get(name, [])
            if all(labels.get(k) == w for k, w in want.items())}


def prom_delta(after, before):
    if after is None or before is None:
        return None
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def haproxy_stats(frontend="http"):
    """The frontend's row of HAProxy's stats CSV (dcon: denied by tcp-request connection
    rules; scur: current sessions), or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PROXIES['haproxy']['stats']}/stats;csv",
                                    timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        log(f"  HAProxy stats: {e}")
        return None
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return None
    head = lines[0][2:].split(",")
    for line in lines[1:]:
        row = dict(zip(head, line.split(",")))
        if row.get("pxname") == frontend and row.get("svname") == "FRONTEND":
            return {k: int(v) for k, v in row.items() if v.isdigit()}
    return None


def nginx_limited(profile):
    """How many connections nginx refused by limit_conn so far (its error log has a line for
    each, at the default limit_conn_log_level, error), by zone."""
    counts = {}
    for path in (os.path.join(WORK, f"nginx-{profile}", "error.log"),
                 os.path.join(WORK, "logs", f"nginx-{profile}.log")):
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    m = re.search(r'limiting connections by zone "(\w+)"', line)
                    if m:
                        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        except OSError:
            pass
    return counts


def refusals(name, profile):
    """The proxy's own count of refused connections on the HTTP listener so far, by reason
    (halfguard: halfguard_connections_rejected_total; HAProxy: dcon, denied by the
    tcp-request connection rules; nginx: limit_conn lines in its error log), or None."""
    if name == "halfguard":
        return prom_by(prom(PROXIES["halfguard"]["admin"]), "halfguard_connections_rejected_total",
                       "reason", listener="http")
    if name == "haproxy":
        st = haproxy_stats()
        return None if st is None else {"dcon": st.get("dcon", 0)}
    return nginx_limited(profile)


def phase_drip(env, res):
    """The many-source slow drip (issue 11), one run per drip interval and proxy."""
    secs = env.args.attack_secs
    conns = DRIP["sources"] * DRIP["per_source"]
    out = {}
    for every in env.args.drip_every:
        for name in NAMES:
            port = PROXIES[name]["http"]
            p = env.start_proxy(name, "drip")
            pids = pids_of(p)
            idle = {"fds": fd_count(pids), "rss_kib": rss_kib(pids)}
            before = prom(PROXIES["halfguard"]["admin"]) if name == "halfguard" else None
            load = os.getloadavg()[0]
            cpu0, wait0 = cpu_secs(pids), runq_wait_secs(pids)
            t0 = time.monotonic()
            atk = start_loadgen(env, ["attack", "--kind", "drip", "--target",
                                      f"127.0.0.1:{port}", "--sources", str(DRIP["sources"]),
                                      "--conns", str(conns), "--rate", str(DRIP["rate"]),
                                      "--every", str(every), "--secs", str(secs)], "attacker")
            lg = legit(env, port, secs, src=DRIP_LEGIT_SRC)
            probe = start_loadgen(env, ["http", "--target", f"127.0.0.1:{HTTP_BACKEND}", "--src",
                                        DRIP_PROBE_SRC, "--rate", str(DRIP_PROBE_RATE),
                                        "--secs", str(secs), "--timeout-ms", "3000",
                                        "--path", "/small"], "probe")
            # Once a second: the proxy's descriptors, RSS and accept queue (halfguard: its
            # stalled gauge); at 5 s, 10 s and 2 s before the end, the attacker's sockets
            # (ss). Everything is read before the attacker stops.
            marks = [5, 10, secs - 2]
            samples, series = [], []
            while time.monotonic() < t0 + secs - 1.5:
                t = time.monotonic() - t0
                pids = pids_of(p)  # nginx workers, if one was restarted
                pt = {"t": round(t, 1), "fds": fd_count(pids), "rss_kib": rss_kib(pids),
                      "accept_queue": accept_queue(port)}
                if name == "halfguard":
                    m = prom(PROXIES["halfguard"]["admin"])
                    pt["stalled"] = prom_sum(m, "halfguard_connections", listener="http",
                                             state="stalled")
                    pt["conns"] = prom_sum(m, "halfguard_connections", listener="http")
                    pt["pressure"] = prom_sum(m, "halfguard_pressure", listener="http")
                elif name == "haproxy":
                    st = haproxy_stats()
                    pt["conns"] = st and st.get("scur")
                series.append(pt)
                if marks and t >= marks[0]:
                    marks.pop(0)
                    held, kernel = sockets_held(port, pids, DRIP_ATTACK_PREFIX)
                    samples.append({**pt, "held": held, "kernel": kernel})
                time.sleep(max(0.05, 1 - (time.monotonic() - t0 - t)))
            if marks:
                held, kernel = sockets_held(port, pids, DRIP_ATTACK_PREFIX)
                samples.append({**series[-1], "held": held, "kernel": kernel})
            cpu, waited = cpu_secs(pids) - cpu0, runq_wait_secs(pids) - wait0
            wall = time.monotonic() - t0
            extra = {}
            if name == "halfguard":
                after = prom(PROXIES["halfguard"]["admin"])
                for metric, key in (("halfguard_connections_evicted_total", "state"),
                                    ("halfguard_connections_timed_out_total", "timeout"),
                                    ("halfguard_connections_rejected_total", "reason"),
                                    ("halfguard_accept_errors_total", "listener")):
                    extra[metric] = prom_delta(prom_by(after, metric, key, listener="http"),
                                               prom_by(before, metric, key, listener="http"))
                extra["halfguard_observed_total"] = prom_sum(after, "halfguard_observed_total",
                                                             listener="http")
            elif name == "haproxy":
                extra["stats"] = haproxy_stats()
            else:
                extra["limit_conn_refusals"] = nginx_limited("drip")
            a = finish_loadgen(atk, secs + 20)
            l = finish_loadgen(lg, secs + 20)
            pr = finish_loadgen(probe, secs + 20)
            alive = p.poll() is None
            env.stop_proxy(p)
            fds_max = max((x["fds"] for x in series), default=None)
            out[f"{every}/{name}"] = {
                "every_ms": every, "legit": l, "attacker": a, "backend_probe": pr,
                "samples": samples,
                "series": series, "idle": idle, "fds_max": fds_max,
                "load_at_start": round(load, 2), "cpu_pct": round(100 * cpu / wall, 1),
                "runq_wait_pct": round(100 * waited / wall, 1),
                "accept_queue_max": max((x["accept_queue"] or 0 for x in series), default=None),
                "fds_cap": idle["fds"] + 2 * DRIP["max_conns"],
                "stalled_max": max((x.get("stalled") or 0 for x in series), default=None)
                if name == "halfguard" else None,
                "proxy_alive": alive, **extra}
            ev = (extra.get("halfguard_connections_evicted_total") or {}).get("stalled")
            to = (extra.get("halfguard_connections_timed_out_total") or {}).get("request")
            log(f"  drip {every:5} ms {name:9}: legit {l and round(l['success_pct'], 3)}% "
                f"p50 {l and l['p50_us']} p99 {l and l['p99_us']} us "
                f"(failed: {l and {k: v for k, v in l.items() if k.startswith('fail_') and v}}); "
                f"backend probe p50 {pr and pr['p50_us']} p99 {pr and pr['p99_us']} us; "
                f"held {[x['held'] for x in samples]}; fds max {fds_max} "
                f"(idle {idle['fds']}); accept queue max {out[f'{every}/{name}']['accept_queue_max']}; "
                f"CPU {out[f'{every}/{name}']['cpu_pct']}% of a core, waited for one "
                f"{out[f'{every}/{name}']['runq_wait_pct']}% (load {load:.1f} at start); "
                + (f"evicted stalled {ev}, timed out request {to}, "
                   f"{ {k: v for k, v in extra.items() if k != 'halfguard_observed_total'} }; "
                   if name == "halfguard" else f"{extra}; ")
                + f"attacker {a}")
            if not alive:
                log(f"  {name} died during the drip; see {WORK}/logs/")
            time.sleep(1)
    res["drip"] = out


def phase_busy(env, res):
    """A busy legit address (issue 16): wrk, a new connection per request, from one address
    (127.0.0.1) at each concurrency; the refusals each proxy counts, and what wrk saw."""
    secs = env.args.busy_secs
    procs = {n: env.start_proxy(n, "busy") for n in NAMES}
    runs = {f"{n}/{c}": [] for n in NAMES for c in BUSY_CONCURRENCY}
    for rep in range(env.args.reps):
        for c in BUSY_CONCURRENCY:
            for name in NAMES:
                before = refusals(name, "busy")
                load = os.getloadavg()[0]
                r = wrk(PROXIES[name]["http"], True, secs, c)
                r["load_at_start"] = round(load, 2)
                time.sleep(0.3)
                after = refusals(name, "busy")
                d = prom_delta(after, before)
                r["refused_by"] = d
                r["refused"] = None if d is None else sum(d.values())
                r["client_failed"] = r["socket_errors"] + r["non_2xx"]
                runs[f"{name}/{c}"].append(r)
                log(f"  busy c={c:<3} rep {rep + 1} {name:9}: {r.get('rps')} req/s, refused "
                    f"{r['refused']} {d or ''}, client saw {r['client_failed']} failed "
                    f"{r['socket_errors_by']} non-2xx {r['non_2xx']} (load {load:.1f} at start)")
                # Let the address's connections drain before the next run.
                time.sleep(1.5)
    alive = {n: p.poll() is None for n, p in procs.items()}
    for p in procs.values():
        env.stop_proxy(p)
    res["busy"] = {k: {"runs": v,
                       "median_rps": median([r.get("rps") for r in v]),
                       "median_refused": median([r["refused"] for r in v]),
                       "median_client_failed": median([r["client_failed"] for r in v])}
                   for k, v in runs.items()}
    res["busy_alive"] = alive


# ------------------------------------------------------------------------------------------
# report


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v, digits=None):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if digits is not None:
        return f"{v:.{digits}f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(res):
    rows = []  # (figure, none, hg, haproxy, nginx, better)

    def add(label, vals, none=None, digits=None, better=""):
        hg, ha, ng = (vals.get(n) for n in ("halfguard", "haproxy", "nginx"))
        rows.append([label, fmt(none, digits), fmt(hg, digits), fmt(ha, digits), fmt(ng, digits),
                     fmt(ratio(hg, ha), 2) + ("x" if ratio(hg, ha) is not None else ""),
                     fmt(ratio(hg, ng), 2) + ("x" if ratio(hg, ng) is not None else ""),
                     better])

    if "bulk" in res:
        for s in (1, 8):
            b = res["bulk"]
            add(f"bulk throughput, {s} stream{'s' if s > 1 else ''} (Gbit/s)",
                {n: b[f"{n}/{s}"]["median_gbps"] for n in NAMES},
                none=b[f"none/{s}"]["median_gbps"], better="higher")
    if "rate" in res:
        for mode, label in (("keepalive", "keep-alive"), ("close", "new connection per request")):
            r = res["rate"][mode]
            add(f"{label}: requests/s", {n: r[n]["median_rps"] for n in NAMES},
                none=r["none"]["median_rps"], better="higher")
            add(f"{label}: p50 (µs)", {n: r[n]["median_p50_us"] for n in NAMES},
                none=r["none"]["median_p50_us"], better="lower")
            add(f"{label}: p99 (µs)", {n: r[n]["median_p99_us"] for n in NAMES},
                none=r["none"]["median_p99_us"], better="lower")
            add(f"{label}: errors (all runs)", {n: r[n]["errors"] for n in NAMES},
                none=r["none"]["errors"], digits=0, better="lower")
    if "memory" in res:
        for c in (1000, 8000):
            m = res["memory"]
            add(f"RSS per held idle connection, {c // 1000}k held (bytes)",
                {n: m[f"{n}/{c}"]["median_bytes_per_conn"] for n in NAMES}, better="lower")
    if "attack" in res:
        a = res["attack"]
        add("no attack: legit success (%)",
            {n: (a["baseline"][n] or {}).get("success_pct") for n in NAMES}, digits=2,
            better="higher")
        add("no attack: legit p99 (µs)",
            {n: (a["baseline"][n] or {}).get("p99_us") for n in NAMES}, better="lower")
        for kind, _, _ in ATTACKS:
            e = {n: a["attacks"].get(f"{kind}/{n}") for n in NAMES}
            if not all(e.values()):
                continue
            add(f"{kind}: legit success (%)",
                {n: (e[n]["legit"] or {}).get("success_pct") for n in NAMES}, digits=2,
                better="higher")
            add(f"{kind}: legit p99 (µs)",
                {n: (e[n]["legit"] or {}).get("p99_us") for n in NAMES}, better="lower")
            for i, t in enumerate(("5 s", "10 s", "30 s")):
                add(f"{kind}: attacker sockets held at {t}",
                    {n: e[n]["samples"][i]["held"] for n in NAMES}, digits=0, better="lower")
            add(f"{kind}: cap on attacker sockets", {n: e[n]["cap"] for n in NAMES}, digits=0)
            add(f"{kind}: attacker sockets in the kernel at 30 s (held + orphans + accept queue)",
                {n: e[n]["samples"][-1]["kernel"] for n in NAMES}, digits=0, better="lower")
            add(f"{kind}: peak host TCP memory over idle (MB)",
                {n: e[n].get("peak_tcp_mem_bytes", 0) / 1e6 for n in NAMES}, better="lower")
            add(f"{kind}: proxy descriptors at 30 s",
                {n: e[n]["samples"][-1]["fds"] for n in NAMES}, digits=0, better="lower")
            add(f"{kind}: proxy RSS at 30 s (MiB)",
                {n: e[n]["samples"][-1]["rss_kib"] / 1024 for n in NAMES}, digits=1,
                better="lower")
            add(f"{kind}: attacker connections made",
                {n: (e[n]["attacker"] or {}).get("connected") for n in NAMES}, digits=0)
    if "drip" in res:
        d = res["drip"]
        for every in sorted({v["every_ms"] for v in d.values()}, reverse=True):
            e = {n: d.get(f"{every}/{n}") for n in NAMES}
            if not all(e.values()):
                continue
            k = f"drip, a byte every {every / 1000:g} s"
            add(f"{k}: legit success (%)",
                {n: (e[n]["legit"] or {}).get("success_pct") for n in NAMES}, digits=2,
                better="higher")
            add(f"{k}: legit p50 (µs)",
                {n: (e[n]["legit"] or {}).get("p50_us") for n in NAMES}, better="lower")
            add(f"{k}: legit p99 (µs)",
                {n: (e[n]["legit"] or {}).get("p99_us") for n in NAMES}, better="lower")
            add(f"{k}: straight to the backend meanwhile (no proxy, {DRIP_PROBE_RATE}/s): p99 (µs)",
                {n: (e[n].get("backend_probe") or {}).get("p99_us") for n in NAMES},
                better="lower")
            for i, t in enumerate(("5 s", "10 s", "the end")):
                add(f"{k}: attacker connections held at {t}",
                    {n: (e[n]["samples"][i]["held"] if len(e[n]["samples"]) > i else None)
                     for n in NAMES}, digits=0, better="lower")
            add(f"{k}: proxy descriptors, most seen",
                {n: e[n]["fds_max"] for n in NAMES}, digits=0, better="lower")
            add(f"{k}: descriptor cap (idle + 2 x {DRIP['max_conns']})",
                {n: e[n]["fds_cap"] for n in NAMES}, digits=0)
            add(f"{k}: accept queue, most seen",
                {n: e[n].get("accept_queue_max") for n in NAMES}, digits=0, better="lower")
            add(f"{k}: proxy CPU (% of one core)",
                {n: e[n].get("cpu_pct") for n in NAMES}, digits=0)
            add(f"{k}: proxy threads waiting for a CPU (% of the run, summed)",
                {n: e[n].get("runq_wait_pct") for n in NAMES}, digits=0, better="lower")
            add(f"{k}: machine load (1-minute average) at the start",
                {n: e[n].get("load_at_start") for n in NAMES}, digits=1)
            hg = e["halfguard"]
            add(f"{k}: stalled connections, most seen",
                {"halfguard": hg.get("stalled_max")}, digits=0)
            add(f"{k}: evicted while stalled",
                {"halfguard": (hg.get("halfguard_connections_evicted_total") or {}).get(
                    "stalled", 0)}, digits=0)
            add(f"{k}: timed out by the request clock",
                {"halfguard": (hg.get("halfguard_connections_timed_out_total") or {}).get(
                    "request", 0)}, digits=0)
            add(f"{k}: attacker connections made",
                {n: (e[n]["attacker"] or {}).get("connected") for n in NAMES}, digits=0)
            add(f"{k}: attacker connection lifetime, median (s)",
                {n: ((e[n]["attacker"] or {}).get("lifetime_ms_p50") or 0) / 1000
                 if (e[n]["attacker"] or {}).get("ended_by_target") else None for n in NAMES},
                digits=1)
    if "kmem" in res:
        kmem.table_rows(sys.modules[__name__], res, add)
    if "busy" in res:
        b = res["busy"]
        for c in BUSY_CONCURRENCY:
            e = {n: b.get(f"{n}/{c}") for n in NAMES}
            if not all(e.values()):
                continue
            k = f"busy address, {c} at once"
            add(f"{k}: requests/s", {n: e[n]["median_rps"] for n in NAMES}, better="higher")
            add(f"{k}: refused (the proxy's count)",
                {n: e[n]["median_refused"] for n in NAMES}, digits=0, better="lower")
            add(f"{k}: failed requests (wrk)",
                {n: e[n]["median_client_failed"] for n in NAMES}, digits=0, better="lower")
    head = ["figure", "no proxy", "halfguard", "HAProxy", "nginx", "hg/HAProxy", "hg/nginx",
            "better"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def targets(res):
    """Each target of the issue: (text, met or not or None when not measured, figures)."""
    out = []
    if "bulk" in res:
        b = res["bulk"]
        for s in (1, 8):
            hg, ha = b[f"halfguard/{s}"]["median_gbps"], b[f"haproxy/{s}"]["median_gbps"]
            r = ratio(hg, ha)
            out.append((f"bulk {s} stream(s) >= 1.0x HAProxy", r is not None and r >= 1.0,
                        f"{fmt(hg)} vs {fmt(ha)} Gbit/s = {fmt(r, 2)}x "
                        f"(no proxy {fmt(b[f'none/{s}']['median_gbps'])})"))
    if "rate" in res:
        for mode in ("close", "keepalive"):
            r = res["rate"][mode]
            hg, ha = r["halfguard"], r["haproxy"]
            q = ratio(hg["median_rps"], ha["median_rps"])
            out.append((f"{mode} request rate >= 1.0x HAProxy", q is not None and q >= 1.0,
                        f"{fmt(hg['median_rps'])} vs {fmt(ha['median_rps'])} req/s = {fmt(q, 2)}x"))
            ok = (hg["median_p99_us"] is not None and ha["median_p99_us"] is not None
                  and hg["median_p99_us"] <= ha["median_p99_us"])
            out.append((f"{mode} p99 <= HAProxy's", ok,
                        f"{fmt(hg['median_p99_us'])} vs {fmt(ha['median_p99_us'])} µs"))
    if "memory" in res:
        m = res["memory"]
        for c in (1000, 8000):
            hg = m[f"halfguard/{c}"]["median_bytes_per_conn"]
            ha = m[f"haproxy/{c}"]["median_bytes_per_conn"]
            ok = hg is not None and ha is not None and hg <= ha and hg < 4096
            out.append((f"RSS per idle connection ({c}) <= HAProxy's and < 4 KiB", ok,
                        f"{fmt(hg)} vs {fmt(ha)} bytes"))
    if "attack" in res:
        a = res["attack"]
        base = (a["baseline"].get("halfguard") or {}).get("p99_us")
        for kind, _, _ in ATTACKS:
            e = a["attacks"].get(f"{kind}/halfguard")
            if not e:
                continue
            l = e["legit"] or {}
            succ = l.get("success_pct")
            out.append((f"{kind}: legit success >= 99.9%", succ is not None and succ >= 99.9,
                        f"{fmt(succ, 2)}% of {l.get('requests')}"))
            p99 = l.get("p99_us")
            out.append((f"{kind}: legit p99 <= 2x no-attack", p99 is not None and base is not None
                        and p99 <= 2 * base, f"{fmt(p99)} µs vs 2 x {fmt(base)} µs"))
            held = [s["held"] for s in e["samples"]]
            out.append((f"{kind}: attacker sockets held <= cap", max(held) <= e["cap"],
                        f"held {held} at 5/10/30 s, cap {e['cap']}"))
    if "drip" in res:
        for key, e in sorted(res["drip"].items(), key=lambda kv: -kv[1]["every_ms"]):
            if not key.endswith("/halfguard"):
                continue
            k = f"drip every {e['every_ms'] / 1000:g} s"
            l = e["legit"] or {}
            succ = l.get("success_pct")
            out.append((f"{k}: legit success >= 99.9%", succ is not None and succ >= 99.9,
                        f"{fmt(succ, 2)}% of {l.get('requests')}"))
            p99 = l.get("p99_us")
            out.append((f"{k}: legit p99 < {DRIP_P99_US // 1000} ms",
                        p99 is not None and p99 < DRIP_P99_US, f"{fmt(p99)} µs"))
            out.append((f"{k}: descriptors within the listener cap",
                        e["fds_max"] is not None and e["fds_max"] <= e["fds_cap"],
                        f"at most {e['fds_max']} vs {e['idle']['fds']} idle + 2 x "
                        f"{DRIP['max_conns']} = {e['fds_cap']}"))
    if "kmem" in res:
        out += kmem.targets(res)
    if "busy" in res:
        b = res["busy"]
        for c in BUSY_CONCURRENCY:
            hg, ha = b.get(f"halfguard/{c}"), b.get(f"haproxy/{c}")
            if not hg or not ha:
                continue
            # The proxy's own count where it has one, else what the client saw.
            h = hg["median_refused"] if hg["median_refused"] is not None \
                else hg["median_client_failed"]
            a = ha["median_refused"] if ha["median_refused"] is not None \
                else ha["median_client_failed"]
            out.append((f"busy address at {c}: refusals <= 2x HAProxy's + 100",
                        h is not None and a is not None and h <= 2 * a + 100,
                        f"{fmt(h, 0)} vs {fmt(a, 0)} (limit {fmt(None if a is None else 2 * a + 100, 0)}); "
                        f"{fmt(hg['median_rps'])} vs {fmt(ha['median_rps'])} req/s"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--halfguard", required=True)
    ap.add_argument("--loadgen", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="bulk,rate,memory,attack,kmem,drip,busy")
    ap.add_argument("--bulk-secs", type=int, default=4)
    ap.add_argument("--wrk-secs", type=int, default=5)
    ap.add_argument("--wrk-conns", type=int, default=64)
    ap.add_argument("--attack-secs", type=int, default=30)
    ap.add_argument("--baseline-secs", type=int, default=10)
    ap.add_argument("--drip-every", default="2000,200",
                    help="drip intervals in ms, one run each (comma-separated)")
    ap.add_argument("--busy-secs", type=int, default=5)
    ap.add_argument("--proxies", default=",".join(NAMES),
                    help="a subset of halfguard,haproxy,nginx, for a quick look at one "
                         "(the table compares only what ran)")
    ap.add_argument("--cgroup", action="store_true",
                    help="the kmem phase runs each proxy in a cgroup v1 memory group of 256 MiB "
                         "(TCP memory limited to the same)")
    ap.add_argument("--cluster", action="store_true",
                    help="halfguard with [cluster] on, against a redis-server this run starts "
                         f"on 127.0.0.1:{CLUSTER_REDIS_PORT}")
    ap.add_argument("--json", default=os.path.join(ROOT, "benches", "compare", "results.json"))
    args = ap.parse_args()
    chosen = [n for n in args.proxies.split(",") if n]
    if not chosen or set(chosen) - set(NAMES):
        sys.exit(f"compare: --proxies takes a subset of {','.join(NAMES)}: {args.proxies}")
    NAMES[:] = [n for n in NAMES if n in chosen]
    phases = set(args.only.split(","))
    unknown = phases - {"bulk", "rate", "memory", "attack", "kmem", "drip", "busy"}
    if unknown:
        sys.exit(f"compare: unknown phase(s) {sorted(unknown)}: "
                 f"--only takes bulk,rate,memory,attack,kmem,drip,busy")
    args.attack_secs = max(12, min(args.attack_secs, 60))
    args.busy_secs = max(1, min(args.busy_secs, 30))
    try:
        args.drip_every = [max(10, min(int(x), 10_000)) for x in args.drip_every.split(",") if x]
    except ValueError:
        sys.exit(f"compare: --drip-every: milliseconds, comma-separated: {args.drip_every}")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    busy = [p for p in [HTTP_BACKEND, IPERF_BACKEND]
            + [v for d in PROXIES.values() for v in d.values()] if not port_free(p)]
    if busy:
        sys.exit(f"compare: ports in use: {busy}; is another comparison running?")

    global CLUSTER
    CLUSTER = args.cluster
    if CLUSTER and not shutil.which("redis-server"):
        sys.exit("compare: --cluster needs redis-server (apt-get install redis-server)")
    cfg = write_configs()
    t_start = time.time()
    res = {"meta": {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(), "cpus": os.cpu_count(), "nofile": hard,
        "halfguard": subprocess.run([args.halfguard, "--version"], capture_output=True,
                                    text=True).stdout.strip(),
        "halfguard_commit": subprocess.run(["git", "-C", ROOT, "describe", "--always",
                                            "--dirty"], capture_output=True,
                                           text=True).stdout.strip(),
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True,
                                  text=True).stdout.splitlines()[0],
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "reps": args.reps, "legit_rate": LEGIT_RATE, "attacks": ATTACKS, "guard": GUARD,
        "drip": DRIP, "busy_concurrency": BUSY_CONCURRENCY, "cluster": CLUSTER,
    }}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        # Backends.
        www = os.path.join(WORK, "backend", "www")
        os.makedirs(www, exist_ok=True)
        os.makedirs(os.path.join(WORK, "backend", "tmp"), exist_ok=True)
        with open(os.path.join(www, "small"), "wb") as f:
            f.write(SMALL_BODY)
        big = os.path.join(www, "big")
        if not os.path.exists(big) or os.path.getsize(big) != BIG_BYTES:
            with open(big, "wb") as f:
                f.write(os.urandom(1 << 20) * (BIG_BYTES >> 20))
        start("backend-nginx", ["nginx", "-p", os.path.join(WORK, "backend") + "/", "-e",
                                "stderr", "-c", cfg["nginx-backend.conf"]])
        start("backend-iperf3", ["iperf3", "-s", "-p", str(IPERF_BACKEND)])
        if CLUSTER:
            start("redis", ["redis-server", "--bind", "127.0.0.1", "--port",
                            str(CLUSTER_REDIS_PORT), "--save", "", "--appendonly", "no"])
            wait_port(CLUSTER_REDIS_PORT)
        wait_port(HTTP_BACKEND)
        wait_port(IPERF_BACKEND)
        env = Env(args, cfg)

        if "bulk" in phases:
            log(f"== bulk throughput (iperf3, {args.bulk_secs} s after 1 s omitted; the bulk "
                f"profile: the bulk listener promises {BULK_PROFILE_MAX_CONNS} connections)")
            procs = {n: env.start_proxy(n, "bulk") for n in NAMES}
            phase_bulk(env, res, procs)
            for p in procs.values():
                env.stop_proxy(p)
        if "rate" in phases:
            log("== happy path: the perf profile of every proxy, running side by side")
            procs = {n: env.start_proxy(n, "perf") for n in NAMES}
            log(f"== request rate (wrk -t2 -c{args.wrk_conns}, {args.wrk_secs} s, /small)")
            phase_rate(env, res, procs)
            for p in procs.values():
                env.stop_proxy(p)
        if "memory" in phases:
            log("== RSS per held idle connection (a fresh proxy for each run)")
            phase_memory(env, res)
        if "attack" in phases:
            log(f"== legit service under attack (guard profile; legit {LEGIT_SRC} at "
                f"{LEGIT_RATE}/s, attacker {ATTACK_SRC}, {args.attack_secs} s)")
            phase_attack(env, res)
        if "kmem" in phases:
            log(f"== kernel TCP memory under floods of clients that do not read (guard "
                f"profile; GET /big, client SO_RCVBUF 1 KiB; legit {LEGIT_SRC} at "
                f"{LEGIT_RATE}/s; {args.attack_secs} s"
                + ("; each proxy in a 256 MiB memory cgroup" if args.cgroup else "") + ")")
            kmem.phase_kmem(sys.modules[__name__], env, res)
        if "drip" in phases:
            log(f"== many-source slow drip (drip profile; {DRIP['sources']} sources x "
                f"{DRIP['per_source']} from {DRIP_ATTACK_PREFIX}1-{DRIP['sources']}, a byte every "
                f"{args.drip_every} ms; legit {DRIP_LEGIT_SRC} at {LEGIT_RATE}/s; "
                f"{args.attack_secs} s)")
            phase_drip(env, res)
        if "busy" in phases:
            log(f"== a busy legit address (busy profile; wrk, Connection: close, "
                f"{BUSY_CONCURRENCY} at once, {args.busy_secs} s, {args.reps} reps)")
            phase_busy(env, res)
    finally:
        stop_all()
    res["meta"]["seconds"] = round(time.time() - t_start)
    tbl = table(res)
    tg = targets(res)
    res["table_markdown"] = tbl
    res["targets"] = [{"target": t, "met": m, "figures": f} for t, m, f in tg]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print()
    print(f"halfguard vs HAProxy vs nginx on loopback ({res['meta']['halfguard']} "
          f"{res['meta']['halfguard_commit']}; {res['meta']['haproxy'].split(' - ')[0]}; "
          f"{res['meta']['nginx']}; {os.cpu_count()} CPUs; medians of {args.reps} runs; "
          f"attacks one run each)")
    print()
    print(tbl)
    print()
    print("Targets (halfguard):")
    for t, m, f in tg:
        print(f"- [{'met' if m else 'NOT met'}] {t}: {f}")
    print()
    print(f"{res['meta']['seconds']} s; JSON: {os.path.relpath(args.json, ROOT)}")


if __name__ == "__main__":
    main()
