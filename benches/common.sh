# Sourced by the measurement scripts: builds halfguard and loadgen in release, sets $HG (or
# takes HG_BIN, another build of halfguard to compare, e.g. an older commit's) and $LOADGEN, stops every PID pushed onto `pids` when the script exits, and starts the perf
# profile's peers (perf_peers_files, perf_peers_start).
# loadgen in a target directory of its own: built beside a bench, halfguard gets the
# dev-dependencies' features (tokio's test-util: a lock at every clock reading).
cargo build --release --bin halfguard >/dev/null 2>&1
CARGO_TARGET_DIR=target/loadgen cargo build --release --bench loadgen >/dev/null 2>&1
HG=${HG_BIN:-target/release/halfguard}
LOADGEN=$(ls -t target/loadgen/release/deps/loadgen-* | grep -v '\.d$' | head -1)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# need SCRIPT TOOL...: exits, naming SCRIPT and the first TOOL not on PATH.
need() {
  local script=$1 tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null || {
      echo "$script: $tool missing (run benches/compare/run.sh first, which installs the peers;" \
        "apt-get install the rest: strace, valgrind, nghttp2-client for h2load)" >&2
      exit 1
    }
  done
}

# cores_idle_since "S0": the share (%) of the machine's CPU time left idle since S0, a
# reading of `head -1 /proc/stat` taken before.
cores_idle_since() {
  local s0 s1
  read -ra s0 <<<"$1"
  read -ra s1 < <(head -1 /proc/stat)
  local t0=$((s0[1] + s0[2] + s0[3] + s0[4] + s0[5] + s0[6] + s0[7]))
  local t1=$((s1[1] + s1[2] + s1[3] + s1[4] + s1[5] + s1[6] + s1[7]))
  echo $(((s1[4] - s0[4]) * 100 / (t1 - t0)))
}

# perf_work: the soft descriptor limit raised to the hard one, and a scratch directory in
# $work, holding the perf profile's files (perf_peers_files) and removed on exit with every
# process the script started.
perf_work() {
  ulimit -n "$(ulimit -Hn)"
  work=$(mktemp -d)
  trap 'cleanup; rm -rf "$work"' EXIT
  perf_peers_files "$work"
}

# perf_peers_files WORK: the perf profile's configs (benches/peers/) and the backend's
# 128-byte /small in WORK, to edit before perf_peers_start.
perf_peers_files() {
  mkdir -p "$1/www" "$1/tmp"
  head -c 127 /dev/zero | tr '\0' . >"$1/www/small" && echo >>"$1/www/small"
  cp benches/peers/nginx-backend.conf benches/peers/haproxy-perf.cfg \
    benches/peers/halfguard-perf.toml "$1/"
}

# perf_peers_start WORK: the nginx backend (17201), HAProxy (17081) and halfguard (17080)
# on WORK's configs, once a proxy of an earlier run has left the ports; sets ha_pid and
# hg_pid, and returns when all three listen.
# ports_free PORT...: waits (10 s at most each) for an earlier run to leave the ports.
ports_free() {
  local port
  for port in "$@"; do
    for _ in $(seq 50); do
      ss -Htln "sport = :$port" | grep -q . || break
      sleep 0.2
    done
  done
}

# ports_listening PORT...: waits (5 s at most each) until something listens on each.
ports_listening() {
  local port
  for port in "$@"; do
    for _ in $(seq 50); do
      ss -Htln "sport = :$port" | grep -q . && break
      sleep 0.1
    done
  done
}

perf_peers_start() {
  local work=$1
  ports_free 17201 17080 17081
  nginx -p "$work/" -c "$work/nginx-backend.conf" -e stderr >"$work/nginx.log" 2>&1 &
  pids+=($!)
  haproxy -f "$work/haproxy-perf.cfg" >"$work/haproxy.log" 2>&1 &
  pids+=($!)
  ha_pid=$!
  "$HG" run -c "$work/halfguard-perf.toml" >"$work/halfguard.log" 2>&1 &
  pids+=($!)
  hg_pid=$!
  ports_listening 17201 17080 17081
}
