#!/usr/bin/env python3
"""Checks that the deployment files agree with each other and with the configs they carry.

Usage: python3 deploy/check-manifests.py --bin target/release/halfguard [--root .]

It parses the Dockerfile, the Kubernetes manifests, the compose file and the systemd unit,
extracts the halfguard config each one uses (the ConfigMap's TOML, the file compose mounts,
the file the Dockerfile bakes in, config/halfguard.toml for systemd), runs
`halfguard check` on it, and compares ports, the config path, the probe endpoints, the
security settings and the shutdown timings. Every disagreement is printed; the exit code
is 1 if there was any. Defaults for keys a config omits are read from
config/halfguard.toml, the annotated default config, so they follow the code's defaults.

Needs Python 3.11+ (tomllib) and PyYAML.
"""

import argparse
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib

import yaml

FAILURES = []
CHECKS = 0


def ok(cond, what):
    """Records one check: `what` says what must hold."""
    global CHECKS
    CHECKS += 1
    if not cond:
        FAILURES.append(what)
        print(f"  FAIL: {what}")
    return cond


def section(title):
    print(f"-- {title}")


# --- durations ----------------------------------------------------------------------

UNITS = {
    "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60,
    "h": 3600, "hr": 3600, "d": 86400,
}


def seconds(text, bare_unit=None):
    """Parses "250ms", "5s", "1m30s", "1min 30s" (and, with bare_unit, "45") to seconds."""
    text = str(text).strip()
    if bare_unit is not None and re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) * UNITS[bare_unit]
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    if not parts or re.sub(r"[\d.\sa-z]", "", text):
        raise ValueError(f"cannot read duration {text!r}")
    total = 0.0
    for num, unit in parts:
        if unit not in UNITS:
            raise ValueError(f"unknown unit {unit!r} in {text!r}")
        total += float(num) * UNITS[unit]
    return total


# --- halfguard configs --------------------------------------------------------------

class Hg:
    """One halfguard config: the file, its effective values, and what the checks need."""

    def __init__(self, path, label, defaults, hg_bin):
        self.path = path
        self.label = label
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        r = subprocess.run([hg_bin, "check", "-c", path], capture_output=True, text=True,
                           env=clean_env())
        ok(r.returncode == 0,
           f"{label}: `halfguard check` passes (exit {r.returncode}: {r.stderr.strip()})")
        eff = {k: dict(v) for k, v in defaults.items()}
        for k, v in raw.items():
            if k != "listeners":
                eff.setdefault(k, {}).update(v)
        self.raw = raw
        self.listeners = raw.get("listeners", [])
        self.timeouts = eff.get("timeouts", {})
        self.admin = eff.get("admin", {})
        self.limits = eff.get("limits", {})
        self.drain = seconds(self.timeouts.get("drain", "30s"))
        self.drain_delay = seconds(self.admin.get("drain_delay", "5s"))
        self.admin_bind = self.admin.get("bind", "127.0.0.1:9901")

    def listener_ports(self):
        return [split_hostport(l["bind"])[1] for l in self.listeners]

    def admin_port(self):
        if self.admin_bind == "off":
            return None
        return split_hostport(self.admin_bind)[1]

    def admin_host(self):
        return split_hostport(self.admin_bind)[0]

    def stop_budget(self):
        """Seconds SIGTERM may take: /readyz fails for drain_delay, then the drain."""
        return self.drain_delay + self.drain

    def nofile_needed(self):
        """The open-files limit that keeps every max_conns as configured (src/fds.rs):
        2 per connection, 2 per splice pipe for a quarter of them (at most 4096), and the
        reserve (64, a listener's socket, the admin endpoint, health checks)."""
        conns = sum(int(l.get("limits", {}).get("max_conns", self.limits.get("max_conns", 8192)))
                    for l in self.listeners)
        splice = self.raw.get("tcp", {}).get("splice", True)
        pipes = min(conns // 4, 4096) if splice else 0
        reserve = 64 + len(self.listeners)
        if self.admin_bind != "off":
            reserve += 1 + int(self.admin.get("max_conns", 16))
        for p in self.raw.get("backends", []):
            reserve += 4 * len(p.get("servers", [])) + 4
        return reserve + 2 * conns + 2 * pipes

    def backends(self):
        """(host, port) of every server: a listener's short `backends` list, or the servers
        of the `[[backends]]` pool its `backend` names."""
        pools = {p.get("name"): p for p in self.raw.get("backends", [])}
        out = []
        for l in self.listeners:
            addrs = list(l.get("backends", []))
            if "backend" in l:
                addrs += [s["addr"] for s in pools.get(l["backend"], {}).get("servers", [])]
            out += [split_hostport(a) for a in addrs]
        return out


def clean_env():
    """The environment without HALFGUARD_* overrides, so checks see the files alone."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HALFGUARD")}


def split_hostport(s):
    s = str(s)
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", s) or re.fullmatch(r"([^:]+):(\d+)", s)
    if not m:
        raise ValueError(f"not host:port: {s!r}")
    return m.group(1), int(m.group(2))


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host):
    return host in ("0.0.0.0", "::")


def config_path_from_argv(argv):
    """The -c/--config value in an argv, or None."""
    for i, a in enumerate(argv):
        if a in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


# --- Dockerfile -------------------------------------------------------------------

class Dockerfile:
    def __init__(self, path):
        self.path = path
        text = open(path).read()
        # Join continuation lines, drop comments.
        text = re.sub(r"\\\n", " ", text)
        self.lines = [l.strip() for l in text.splitlines()
                      if l.strip() and not l.strip().startswith("#")]
        self.args = {}
        self.stages = []  # [(from_line, [instructions])]
        for l in self.lines:
            op, _, rest = l.partition(" ")
            op = op.upper()
            if op == "ARG" and not self.stages:
                k, _, v = rest.partition("=")
                self.args[k.strip()] = v.strip()
            elif op == "FROM":
                self.stages.append((rest, []))
            elif self.stages:
                self.stages[-1][1].append((op, rest.strip()))
        self.runtime = self.stages[-1][1] if self.stages else []

    def last(self, op):
        vals = [rest for o, rest in self.runtime if o == op]
        return vals[-1] if vals else None

    def json_list(self, op):
        v = self.last(op)
        return json.loads(v) if v else None

    def all_text(self):
        return "\n".join(self.lines)

    def from_image(self, stage):
        ref = self.stages[stage][0].split()[0]
        m = re.fullmatch(r"\$\{?(\w+)\}?", ref)
        return self.args.get(m.group(1), ref) if m else ref


def check_dockerfile(root, hg_bin, defaults):
    section("Dockerfile")
    df = Dockerfile(os.path.join(root, "Dockerfile"))
    ok(len(df.stages) >= 2, "Dockerfile: multi-stage (a builder and a runtime stage)")
    builder = df.from_image(0)
    runtime = df.from_image(-1)
    ok(re.search(r"(^|/)rust:\d+\.\d+(\.\d+)?-", builder) is not None,
       f"Dockerfile: builder is the official Rust image with a pinned version tag ({builder})")
    ok(not runtime.endswith(":latest") and ":" in runtime,
       f"Dockerfile: runtime base pinned by tag ({runtime})")
    ok("cargo build --release --locked" in df.all_text(),
       "Dockerfile: `cargo build --release --locked`")
    entry = df.json_list("ENTRYPOINT")
    cmd = df.json_list("CMD")
    ok(entry == ["/usr/local/bin/halfguard"],
       f"Dockerfile: ENTRYPOINT [\"/usr/local/bin/halfguard\"] (got {entry})")
    ok(cmd is not None and cmd[:1] == ["run"], f"Dockerfile: CMD starts with run (got {cmd})")
    cfg_path = config_path_from_argv(cmd or [])
    ok(cfg_path == "/etc/halfguard/halfguard.toml",
       f"Dockerfile: CMD reads /etc/halfguard/halfguard.toml (got {cfg_path})")
    user = df.last("USER")
    uid = None
    if ok(user is not None and re.fullmatch(r"\d+(:\d+)?", user),
          f"Dockerfile: USER is numeric, so runAsNonRoot can verify it (got {user})"):
        uid = int(user.split(":")[0])
        ok(uid != 0, "Dockerfile: USER is not root")
    baked = None
    for op, rest in df.runtime:
        if op == "COPY" and not rest.startswith("--from") and rest.split()[-1] == cfg_path:
            baked = os.path.join(root, rest.split()[0])
    hg = None
    if ok(baked is not None and os.path.isfile(baked),
          f"Dockerfile: a COPY puts a config from the repository at {cfg_path}"):
        hg = Hg(baked, os.path.relpath(baked, root), defaults, hg_bin)
        exposed = set()
        for rest in [r for o, r in df.runtime if o == "EXPOSE"]:
            for p in rest.split():
                exposed.add(int(p.split("/")[0]))
        want = set(hg.listener_ports()) | ({hg.admin_port()} - {None})
        ok(exposed == want,
           f"Dockerfile: EXPOSE {sorted(exposed)} equals the baked config's ports {sorted(want)}")
        ok(hg.admin_port() is not None and not is_loopback(hg.admin_host()),
           f"{hg.label}: admin.bind is not loopback ({hg.admin_bind}), so probes from "
           "outside the container reach it")
    ok(df.last("STOPSIGNAL") in (None, "SIGTERM"), "Dockerfile: stop signal is SIGTERM")
    return {"uid": uid, "config_path": cfg_path, "cmd": cmd, "baked": hg}


def check_dockerignore(root):
    section(".dockerignore")
    path = os.path.join(root, ".dockerignore")
    if not ok(os.path.isfile(path), ".dockerignore exists"):
        return
    pats = [l.strip().rstrip("/") for l in open(path) if l.strip() and not l.startswith("#")]
    ok("target" in pats, ".dockerignore excludes target")
    ok(".git" in pats, ".dockerignore excludes .git")
    # The exact behaviour (what reaches the build context) is tested by image-check.sh.


# --- Kubernetes ------------------------------------------------------------------

def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def port_number(container, port):
    """A probe's or Service's port (number or name) as a number, using the container's ports."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def sleep_seconds(container):
    """How long a container's preStop hook keeps it alive, if it is a plain sleep."""
    pre = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = " ".join(str(x) for x in (pre.get("exec") or {}).get("command", []))
    m = re.search(r"sleep\(?\s*(\d+(?:\.\d+)?)", cmd)
    return float(m.group(1)) if m else None


def effective_sc(pod_sc, c):
    sc = dict(pod_sc or {})
    sc.update(c.get("securityContext") or {})
    return sc


def check_kubernetes(root, hg_bin, defaults, docker):
    kdir = os.path.join(root, "deploy", "kubernetes")
    section("Kubernetes (deploy/kubernetes)")
    docs = []
    for name in sorted(os.listdir(kdir)):
        if name.endswith((".yaml", ".yml")):
            p = os.path.join(kdir, name)
            try:
                docs += [(name, d) for d in load_yaml_docs(p)]
            except yaml.YAMLError as e:
                ok(False, f"{name}: parses as YAML ({e})")
    for name, d in docs:
        ok(isinstance(d, dict) and "apiVersion" in d and "kind" in d
           and "name" in d.get("metadata", {}),
           f"{name}: every document has apiVersion, kind and metadata.name")
    by_kind = {}
    for name, d in docs:
        by_kind.setdefault(d.get("kind"), []).append((name, d))
    deps = by_kind.get("Deployment", [])
    if not ok(len(deps) == 1, "kubernetes: exactly one Deployment"):
        return
    dname, dep = deps[0]
    spec = dep["spec"]
    tmpl = spec["template"]
    pod = tmpl["spec"]
    labels = tmpl["metadata"].get("labels", {})
    ok(all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()),
       f"{dname}: the selector matches the pod template's labels")
    containers = pod["containers"]
    hgc = [c for c in containers if c["name"] == "halfguard"]
    if not ok(len(hgc) == 1, f"{dname}: one container named halfguard"):
        return
    hgc = hgc[0]
    others = [c for c in containers if c is not hgc]
    ok(len(others) >= 1, f"{dname}: an app container beside the halfguard sidecar")

    # Which config does the halfguard container read, and where does it come from?
    argv = (hgc.get("command") or ["/usr/local/bin/halfguard"]) + \
        (hgc.get("args") if "args" in hgc else (docker["cmd"] or []))
    env = {e["name"]: e.get("value") for e in hgc.get("env", [])}
    cfg_path = config_path_from_argv(argv) or env.get("HALFGUARD_CONFIG")
    ok(cfg_path == docker["config_path"],
       f"{dname}: halfguard reads {docker['config_path']} like the image's CMD (got {cfg_path})")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mount = None
    for m in hgc.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if cfg_path and (cfg_path == mp or cfg_path.startswith(mp + "/")):
            mount = m
    hg = None
    if ok(mount is not None, f"{dname}: a volume is mounted at {cfg_path}"):
        ok(mount.get("readOnly") is True, f"{dname}: the config volume is mounted readOnly")
        vol = vols.get(mount["name"], {})
        cm_ref = vol.get("configMap")
        if ok(cm_ref is not None, f"{dname}: the config volume is a ConfigMap"):
            if mount.get("subPath"):
                key = mount["subPath"]
            else:
                rel = cfg_path[len(mount["mountPath"].rstrip("/")) + 1:]
                key = rel
                for item in cm_ref.get("items", []):
                    if item["path"] == rel:
                        key = item["key"]
            cms = [d for _, d in by_kind.get("ConfigMap", [])
                   if d["metadata"]["name"] == cm_ref["name"]]
            if ok(len(cms) == 1, f"kubernetes: ConfigMap {cm_ref['name']} is defined"):
                text = cms[0].get("data", {}).get(key)
                if ok(text is not None, f"ConfigMap {cm_ref['name']}: has key {key}"):
                    same = [os.path.relpath(os.path.join(dp, f), root)
                            for dp, _, fs in os.walk(os.path.join(root, "config"))
                            for f in fs if f.endswith(".toml")
                            and open(os.path.join(dp, f)).read() == text]
                    ok(len(same) >= 1, f"ConfigMap {cm_ref['name']}: its {key} is a verbatim "
                       "copy of a config under config/ (keep them in sync)")
                    if same:
                        print(f"  ConfigMap {cm_ref['name']}/{key} == {same[0]}")
                    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as t:
                        t.write(text)
                    try:
                        hg = Hg(t.name, f"ConfigMap {cm_ref['name']}/{key}", defaults, hg_bin)
                    finally:
                        os.unlink(t.name)
    if hg is None:
        return

    # Ports.
    cports = {p["containerPort"] for p in hgc.get("ports", [])}
    for lp in hg.listener_ports():
        ok(lp in cports, f"{dname}: listener port {lp} is a containerPort of halfguard")
    ap = hg.admin_port()
    ok(ap is not None and ap in cports, f"{dname}: admin port {ap} is a containerPort")
    ok(ap is not None and is_wildcard(hg.admin_host()),
       f"{hg.label}: admin.bind {hg.admin_bind} listens on the pod address (kubelet probes)")
    ok(cports <= set(hg.listener_ports()) | {ap},
       f"{dname}: halfguard declares no containerPort its config does not listen on")
    ann = tmpl["metadata"].get("annotations", {})
    if "prometheus.io/port" in ann:
        ok(int(ann["prometheus.io/port"]) == ap,
           f"{dname}: prometheus.io/port annotation is the admin port {ap}")

    # Probes.
    for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        pr = hgc.get(kind)
        if ok(pr is not None and "httpGet" in pr, f"{dname}: halfguard has an httpGet {kind}"):
            hget = pr["httpGet"]
            ok(hget.get("path") == path, f"{dname}: {kind} path is {path} (got {hget.get('path')})")
            ok(port_number(hgc, hget.get("port")) == ap,
               f"{dname}: {kind} port {hget.get('port')} is the admin port {ap}")
            ok(hget.get("scheme", "HTTP") == "HTTP", f"{dname}: {kind} uses plain HTTP")
    rp = hgc.get("readinessProbe") or {}
    seen = rp.get("periodSeconds", 10) * rp.get("failureThreshold", 3)
    ok(seen <= hg.drain_delay,
       f"{dname}: readiness failure is seen within drain_delay "
       f"({seen}s vs {hg.drain_delay:g}s)")

    # Shutdown timing.
    grace = pod.get("terminationGracePeriodSeconds", 30)
    ok(grace > hg.stop_budget(),
       f"{dname}: terminationGracePeriodSeconds {grace} > drain_delay + drain "
       f"({hg.stop_budget():g}s)")

    # The app: on loopback, on the backend port, outliving halfguard's drain.
    for host, port in hg.backends():
        ok(is_loopback(host), f"{hg.label}: backend {host}:{port} is on loopback (sidecar)")
        serving = [c for c in others
                   if str(port) in [str(x) for x in (c.get("command", []) + c.get("args", []))]]
        if ok(serving, f"{dname}: an app container is started on port {port}"):
            for c in serving:
                argv = [str(x) for x in c.get("command", []) + c.get("args", [])]
                ok(any(is_loopback(a) for a in argv),
                   f"{dname}: container {c['name']} binds loopback only")
                ok(port not in {p["containerPort"] for p in c.get("ports", [])},
                   f"{dname}: container {c['name']} does not declare {port} as a pod port")
                s = sleep_seconds(c)
                ok(s is not None and hg.stop_budget() <= s < grace,
                   f"{dname}: container {c['name']} preStop keeps it serving through "
                   f"halfguard's drain ({s}s, need >= {hg.stop_budget():g}s and < {grace}s)")

    # Security and resources, for every container.
    for c in containers:
        sc = effective_sc(pod.get("securityContext"), c)
        n = f"{dname}: container {c['name']}"
        ok(sc.get("runAsNonRoot") is True, f"{n}: runAsNonRoot")
        ok(sc.get("runAsUser", 1) != 0, f"{n}: runAsUser is not 0")
        ok(sc.get("readOnlyRootFilesystem") is True, f"{n}: readOnlyRootFilesystem")
        ok(sc.get("allowPrivilegeEscalation") is False, f"{n}: allowPrivilegeEscalation false")
        ok(sc.get("privileged") is not True, f"{n}: not privileged")
        caps = sc.get("capabilities") or {}
        ok("ALL" in (caps.get("drop") or []), f"{n}: capabilities drop ALL")
        ok(not caps.get("add"), f"{n}: no capability added")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                ok(r in (res.get(kind) or {}), f"{n}: resources.{kind}.{r} is set")
    sc = effective_sc(pod.get("securityContext"), hgc)
    if docker["uid"] is not None:
        ok(sc.get("runAsUser") in (None, docker["uid"]),
           f"{dname}: halfguard's runAsUser matches the image's USER {docker['uid']}")
    ok(pod.get("automountServiceAccountToken") is False,
       f"{dname}: automountServiceAccountToken false (halfguard needs no API access)")

    # Services.
    svcs = by_kind.get("Service", [])
    ok(len(svcs) >= 1, "kubernetes: a Service")
    for sname, svc in svcs:
        s = svc["spec"]
        ok(all(labels.get(k) == v for k, v in s.get("selector", {}).items())
           and s.get("selector"), f"{sname}: the Service selects the Deployment's pods")
        for p in s.get("ports", []):
            tp = port_number(hgc, p.get("targetPort", p.get("port")))
            ok(tp in hg.listener_ports(),
               f"{sname}: port {p.get('port')} targets a halfguard listener "
               f"({p.get('targetPort')} -> {tp}, listeners {hg.listener_ports()})")
            ok(tp != ap, f"{sname}: the admin port is not exposed by the Service")
        if s.get("type", "ClusterIP") in ("LoadBalancer", "NodePort"):
            ok(s.get("externalTrafficPolicy") == "Local",
               f"{sname}: externalTrafficPolicy Local, so per-source caps see client addresses")


# --- compose ---------------------------------------------------------------------

def parse_compose_port(p):
    """Returns (host_ip or None, host_port or None, container_port) for short or long syntax."""
    if isinstance(p, dict):
        return p.get("host_ip"), p.get("published"), int(p["target"])
    s = str(p).split("/")[0]
    m = re.fullmatch(r"(?:(\[[^\]]+\]|[\d.]+):)?(?:(\d+):)?(\d+)", s)
    if not m:
        raise ValueError(f"cannot read port {p!r}")
    host_ip = m.group(1).strip("[]") if m.group(1) else None
    return host_ip, m.group(2), int(m.group(3))


def check_compose(root, hg_bin, defaults, docker):
    cdir = os.path.join(root, "deploy", "compose")
    path = os.path.join(cdir, "compose.yaml")
    section("compose (deploy/compose/compose.yaml)")
    try:
        doc = yaml.safe_load(open(path))
    except yaml.YAMLError as e:
        ok(False, f"compose.yaml parses as YAML ({e})")
        return
    services = doc.get("services", {})
    hgs = [n for n, s in services.items() if "build" in s or
           str(s.get("image", "")).split("/")[-1].startswith("halfguard")]
    if not ok(hgs == ["halfguard"], f"compose: one halfguard service (got {hgs})"):
        return
    svc = services["halfguard"]
    b = svc.get("build", {})
    ctx = os.path.normpath(os.path.join(cdir, b.get("context", ".")))
    ok(os.path.samefile(os.path.join(ctx, b.get("dockerfile", "Dockerfile")),
                        os.path.join(root, "Dockerfile")),
       "compose: halfguard is built from the repository's Dockerfile")
    cmd = svc.get("command", docker["cmd"])
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    cfg_path = config_path_from_argv(cmd or []) or \
        (svc.get("environment") or {}).get("HALFGUARD_CONFIG")
    ok(cfg_path == docker["config_path"],
       f"compose: halfguard reads {docker['config_path']} (got {cfg_path})")
    src = None
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            s, t, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "rw")
        else:
            s, t, mode = v.get("source"), v.get("target"), ("ro" if v.get("read_only") else "rw")
        if t == cfg_path:
            src = os.path.normpath(os.path.join(cdir, s))
            ok("ro" in mode.split(","), "compose: the config is mounted read-only")
    if not ok(src is not None and os.path.isfile(src),
              f"compose: a file from the repository is mounted at {cfg_path}"):
        return
    hg = Hg(src, os.path.relpath(src, root), defaults, hg_bin)

    published = [parse_compose_port(p) for p in svc.get("ports", [])]
    targets = {c for _, _, c in published}
    for lp in hg.listener_ports():
        ok(lp in targets, f"compose: listener port {lp} is published")
    ap = hg.admin_port()
    ok(ap is not None and not is_loopback(hg.admin_host()),
       f"{hg.label}: admin.bind {hg.admin_bind} is not loopback, so Docker can publish it")
    for hip, _, c in published:
        if c == ap:
            ok(hip is not None and is_loopback(hip),
               f"compose: the admin port is published on the host's loopback only (got {hip})")
        else:
            ok(c in hg.listener_ports(), f"compose: published port {c} is a halfguard listener")

    # Backends: compose services on a shared network, started on that port, not published.
    hg_nets = set(svc.get("networks", ["default"]))
    deps = svc.get("depends_on", {})
    deps = deps if isinstance(deps, dict) else {d: {} for d in deps}
    for host, port in hg.backends():
        if not ok(host in services, f"{hg.label}: backend host {host} is a compose service"):
            continue
        app = services[host]
        argv = app.get("command", [])
        argv = shlex.split(argv) if isinstance(argv, str) else [str(x) for x in argv]
        ok(str(port) in argv or port in {parse_compose_port(p)[2] for p in app.get("expose", [])},
           f"compose: service {host} is started on port {port}")
        ok(not app.get("ports"), f"compose: service {host} publishes no port (only via halfguard)")
        ok(hg_nets & set(app.get("networks", ["default"])),
           f"compose: halfguard and {host} share a network")
        ok(host in deps, f"compose: halfguard depends_on {host} (its name must resolve at start)")

    grace = seconds(svc.get("stop_grace_period", "10s"))
    ok(grace > hg.stop_budget(),
       f"compose: stop_grace_period {grace:g}s > drain_delay + drain ({hg.stop_budget():g}s)")
    ok(svc.get("stop_signal", "SIGTERM") == "SIGTERM", "compose: stop_signal SIGTERM")
    user = str(svc.get("user", docker["uid"]))
    ok(user.split(":")[0] not in ("0", "root"), f"compose: halfguard runs as non-root ({user})")
    ok(svc.get("read_only") is True, "compose: halfguard's root filesystem is read-only")
    ok("ALL" in svc.get("cap_drop", []), "compose: halfguard drops all capabilities")
    ok(not svc.get("cap_add"), "compose: halfguard adds no capability")
    ok("no-new-privileges:true" in svc.get("security_opt", []), "compose: no-new-privileges")
    nofile = (svc.get("ulimits") or {}).get("nofile")
    if isinstance(nofile, dict):
        nofile = nofile.get("soft")
    ok(nofile is not None and int(nofile) >= hg.nofile_needed(),
       f"compose: ulimits.nofile {nofile} >= what max_conns needs ({hg.nofile_needed()})")


# --- systemd ---------------------------------------------------------------------

def parse_unit(path):
    out = {}
    sec = None
    for line in open(path):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            sec = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        out.setdefault((sec, k.strip()), []).append(v.strip())
    return out


def check_systemd(root, hg_bin, defaults):
    path = os.path.join(root, "deploy", "systemd", "halfguard.service")
    section("systemd (deploy/systemd/halfguard.service)")
    u = parse_unit(path)

    def get(k, sec="Service"):
        v = u.get((sec, k))
        return v[-1] if v else None

    start = shlex.split(get("ExecStart") or "")
    ok(start[:2] == ["/usr/local/bin/halfguard", "run"],
       f"unit: ExecStart runs /usr/local/bin/halfguard run (got {start[:2]})")
    cfg_path = config_path_from_argv(start)
    ok(cfg_path == "/etc/halfguard/halfguard.toml",
       f"unit: the config is /etc/halfguard/halfguard.toml (got {cfg_path})")
    pre = [shlex.split(x.lstrip("-")) for x in u.get(("Service", "ExecStartPre"), [])]
    ok(any(p[1:2] == ["check"] and config_path_from_argv(p) == cfg_path for p in pre),
       "unit: ExecStartPre runs `halfguard check` on the same config")
    # The unit's install instructions copy config/halfguard.toml to /etc/halfguard.
    hg = Hg(os.path.join(root, "config", "halfguard.toml"), "config/halfguard.toml",
            defaults, hg_bin)
    stop = seconds(get("TimeoutStopSec") or "90s", bare_unit="s")
    ok(stop > hg.stop_budget(),
       f"unit: TimeoutStopSec {stop:g}s > drain_delay + drain ({hg.stop_budget():g}s)")
    ok(get("KillSignal") == "SIGTERM", "unit: KillSignal=SIGTERM")
    ok("-HUP" in (get("ExecReload") or "") and "$MAINPID" in (get("ExecReload") or ""),
       "unit: ExecReload sends SIGHUP to the main process")
    nofile = get("LimitNOFILE") or "0"
    nofile = int(nofile.split(":")[0]) if nofile.split(":")[0].isdigit() else 0
    ok(nofile >= hg.nofile_needed(),
       f"unit: LimitNOFILE {nofile} >= what max_conns needs ({hg.nofile_needed()})")
    ok(get("DynamicUser") == "yes" or (get("User") not in (None, "root", "0")),
       "unit: runs as DynamicUser or a dedicated non-root User")
    for k, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                    ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                    ("CapabilityBoundingSet", ""), ("AmbientCapabilities", "")):
        ok(get(k) == want, f"unit: {k}={want} (got {get(k)!r})")
    fam = set((get("RestrictAddressFamilies") or "").split())
    ok(fam == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"},
       f"unit: RestrictAddressFamilies is AF_INET AF_INET6 AF_UNIX AF_NETLINK (got {sorted(fam)})")
    filters = u.get(("Service", "SystemCallFilter"), [])
    ok("@system-service" in filters, "unit: SystemCallFilter=@system-service")
    ok(not any(f.startswith("~") and "@resources" in f for f in filters),
       "unit: @resources is not denied (halfguard raises RLIMIT_NOFILE with setrlimit)")
    ok(get("RestartPreventExitStatus") == "2",
       "unit: a bad config (exit 2) is not restarted in a loop")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the halfguard binary")
    ap.add_argument("--root", default=".", help="the repository root")
    a = ap.parse_args()
    root = os.path.abspath(a.root)
    hg_bin = os.path.abspath(a.bin)
    with open(os.path.join(root, "config", "halfguard.toml"), "rb") as f:
        defaults = {k: v for k, v in tomllib.load(f).items() if isinstance(v, dict)}
    docker = check_dockerfile(root, hg_bin, defaults)
    check_dockerignore(root)
    check_kubernetes(root, hg_bin, defaults, docker)
    check_compose(root, hg_bin, defaults, docker)
    check_systemd(root, hg_bin, defaults)
    if FAILURES:
        print(f"check-manifests: {len(FAILURES)} of {CHECKS} checks failed:")
        for f in FAILURES:
            print(f"  - {f}")
        return 1
    print(f"check-manifests: all {CHECKS} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
