#!/usr/bin/env bash
# The cheapest refusal: a connect flood from many sources, every one refused, against
# halfguard and HAProxy (`tcp-request connection reject`) in the same run, rounds alternated;
# then halfguard with its kernel layer on, where the sources it bans are dropped by nftables.
#
#   benches/refusal.sh [SECS] [CONNS] [SOURCES] [ROUNDS]     (default 10 100 200 2)
#   KIND=deny|rate   deny: every source is in limits.deny / HAProxy rejects `src`
#                    (the default); rate: every source is over a rate of 1 connection a
#                    second (halfguard conn_rate_per_source, HAProxy sc0_conn_rate), so
#                    about SOURCES connections a second are admitted and fail to connect
#                    to a backend nobody listens on.
#   HG_BASE=BIN      another halfguard build (an older commit's) measured in the same
#                    rounds, as `halfguard-base`.
#   KERNEL=off       skip the kernel-layer run (it needs root and nft; skipped visibly
#                    without them).
#   CALLGRIND=1      also count instructions per refusal under valgrind's callgrind.
#
# The load is `loadgen refuse`: CONNS workers in a closed loop, each connecting from the next
# of 127.0.1.1..SOURCES and waiting for the RST, as `wrk -c` does with a connection per
# request. Figures: refused connections per second (counted by the client), and the
# proxy's CPU (utime+stime from /proc/PID/stat, over the flood) per refusal. The load
# generator runs on the same cores. Loopback only, ports 17380-17392; every process it
# starts is stopped by PID; the work directory is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/common.sh

SECS=${1:-10}
CONNS=${2:-100}
SOURCES=${3:-200}
ROUNDS=${4:-2}
KIND=${KIND:-deny}
case $KIND in deny | rate) ;; *) echo "KIND: deny or rate" >&2; exit 2 ;; esac
HG_PORT=17380
HA_PORT=17381
BASE_PORT=17382
ADMIN_PORT=17390
# Nothing listens here: an admitted connection (KIND=rate) fails at its backend connect.
DEAD_BACKEND=127.0.0.1:17392
TICK=$(getconf CLK_TCK)
WORK=$(mktemp -d)
trap 'cleanup; rm -rf "$WORK"' EXIT

# hg_config PORT ENFORCE: halfguard refusing every source of the flood.
hg_config() {
  local port=$1 enforce=$2 limits
  if [ "$KIND" = deny ]; then
    limits='deny = ["127.0.1.0/24"]'
  else
    limits=$'conn_rate_per_source = 1\nconn_burst_per_source = 1'
  fi
  cat <<EOF
[[listeners]]
name = "refuse"
bind = "127.0.0.1:$port"
backends = ["$DEAD_BACKEND"]
# Connect at once: an admitted connection fails at the dead backend and ends, as HAProxy's.
protocol = "server-first"

[limits]
$limits

[kernel]
census_interval = "1s"
enforce = $enforce
ban_after = 5
ban_for = "60s"

[timeouts]
drain = "1s"

[admin]
bind = "127.0.0.1:$ADMIN_PORT"

[log]
level = "error"
EOF
}

ha_config() {
  local rule
  if [ "$KIND" = deny ]; then
    rule='tcp-request connection reject if { src 127.0.1.0/24 }'
  else
    rule=$'stick-table type ip size 100k expire 60s store conn_rate(1s)\n    tcp-request connection track-sc0 src\n    tcp-request connection reject if { sc0_conn_rate gt 1 }'
  fi
  cat <<EOF
global
    nbthread 2
    maxconn 9000

defaults
    mode tcp
    retries 0
    timeout connect 3s
    timeout client 10s
    timeout server 10s

frontend refuse
    bind 127.0.0.1:$HA_PORT backlog 4096
    $rule
    default_backend dead

backend dead
    server s1 $DEAD_BACKEND
EOF
}

# start NAME: starts one proxy and sets pid (and port).
start() {
  case $1 in
    halfguard | halfguard-kernel | halfguard-base)
      local bin=$HG enforce=false
      port=$HG_PORT
      [ "$1" = halfguard-kernel ] && enforce=true
      [ "$1" = halfguard-base ] && bin=$HG_BASE && port=$BASE_PORT
      hg_config "$port" "$enforce" >"$WORK/$1.toml"
      ports_free "$port" "$ADMIN_PORT"
      "$bin" run -c "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
      pid=$!
      ;;
    haproxy)
      port=$HA_PORT
      ha_config >"$WORK/haproxy.cfg"
      ports_free "$port"
      haproxy -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
      pid=$!
      ;;
  esac
  pids+=("$pid")
  ports_listening "$port"
}

stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# measure NAME [CONNECT_MS]: one flood against NAME; prints a table row.
measure() {
  local name=$1 connect_ms=${2:-3000} c0 c1 out refused attempts took per_s cpu_us
  start "$name"
  [ "$name" = halfguard-kernel ] && sleep 2 # the table installed, the first census run
  c0=$(cpu_ticks "$pid")
  out=$("$LOADGEN" refuse --target "127.0.0.1:$port" --sources "$SOURCES" --conns "$CONNS" \
    --secs "$SECS" --connect-ms "$connect_ms")
  c1=$(cpu_ticks "$pid")
  if [ "$name" = halfguard-kernel ]; then
    dropped=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" |
      awk '/^halfguard_kernel_dropped_total/ {s += $2} END {print s + 0}')
  fi
  stop "$pid"
  refused=$(jq .refused <<<"$out")
  attempts=$(jq .attempts <<<"$out")
  took=$(jq .secs <<<"$out")
  per_s=$(jq .refused_per_s <<<"$out")
  cpu_us=$(awk -v c=$((c1 - c0)) -v t="$TICK" -v n="$refused" \
    'BEGIN { printf "%.2f", n ? c * 1e6 / t / n : 0 }')
  local cpu_attempt
  cpu_attempt=$(awk -v c=$((c1 - c0)) -v t="$TICK" -v n="$attempts" \
    'BEGIN { printf "%.2f", n ? c * 1e6 / t / n : 0 }')
  printf '| %s | %s | %s | %s | %s | %.0f | %s | %s |\n' "$name" "$KIND" "$attempts" \
    "$refused" "$per_s" "$(awk -v c=$((c1 - c0)) -v t="$TICK" -v s="$took" \
      'BEGIN { print c / t / s * 100 }')" "$cpu_us" "$cpu_attempt"
  [ "$name" = halfguard-kernel ] && echo "  (nftables dropped $dropped packets; $(jq -c '{connect_timeouts, wait_timeouts, answered}' <<<"$out"))"
  return 0
}

echo "refusal flood: $SECS s, $CONNS connections, $SOURCES sources, KIND=$KIND, $(nproc) cores, loadgen on the same cores"
echo
echo "| proxy | refusal | attempts | refused | refused/s | proxy CPU % | µs CPU per refusal | µs CPU per attempt |"
echo "|---|---|---|---|---|---|---|---|"
names=(halfguard haproxy)
[ -n "${HG_BASE:-}" ] && names=(halfguard-base halfguard haproxy)
for r in $(seq "$ROUNDS"); do
  for n in "${names[@]}"; do measure "$n"; done
done

if [ "${KERNEL:-on}" != off ]; then
  if [ "$(id -u)" != 0 ] || ! command -v nft >/dev/null; then
    echo "SKIPPED kernel layer on: needs root and nft"
  else
    # The kernel layer drops what halfguard bans (sources refused by their own caps: the
    # rate, not the deny list) and SYNs over 20/s per source. A SYN dropped is retried by
    # the client after 1 s: a short connect timeout keeps the flood going.
    saved=$KIND
    KIND=rate
    for r in $(seq "$ROUNDS"); do measure halfguard-kernel 200; done
    KIND=$saved
  fi
fi

if [ "${CALLGRIND:-0}" = 1 ]; then
  # Instructions per refusal: a short, gentle flood (valgrind runs one thread at a time) under
  # callgrind, whole process, divided by the refusals the client counted.
  for n in halfguard ${HG_BASE:+halfguard-base}; do
    bin=$HG
    [ "$n" = halfguard-base ] && bin=$HG_BASE
    hg_config "$HG_PORT" false >"$WORK/cg.toml"
    ports_free "$HG_PORT" "$ADMIN_PORT"
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$n.out" "$bin" run \
      -c "$WORK/cg.toml" >"$WORK/cg.log" 2>&1 &
    cg=$!
    pids+=("$cg")
    ports_listening "$HG_PORT"
    sleep 2
    out=$("$LOADGEN" refuse --target "127.0.0.1:$HG_PORT" --sources "$SOURCES" --conns 8 \
      --secs 5)
    kill -INT "$cg"
    wait "$cg" 2>/dev/null || true
    refused=$(jq .refused <<<"$out")
    total=$(callgrind_annotate "$WORK/cg.$n.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "callgrind $n: $refused refusals, $total instructions in all (startup included): $(awk -v t="$total" -v n="$refused" 'BEGIN { printf "%.0f", t / n }') per refusal"
  done
fi
