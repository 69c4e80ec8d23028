#!/usr/bin/env bash
# Instructions and system calls per proxied request, halfguard, HAProxy and nginx's stream
# proxy: figures that do not depend on the machine's speed (wrk's req/s do). Each proxy runs
# on the perf profile's shape (benches/peers/) in front of the same nginx serving the
# 128-byte /small, once under `valgrind --tool=callgrind` (instructions executed, Ir) and
# once under `strace -f -c` (system calls), while `h2load --h1` sends exactly N requests on
# C connections:
#
#   keep-alive   N requests spread over C keep-alive connections
#   close        N requests, each on a new connection (`Connection: close`; h2load reconnects)
#
# Each count is taken at two sizes, N1 and N2, each in a fresh proxy stopped by SIGTERM at
# the end, and the figure is (count(N2) - count(N1)) / (N2 - N1): start-up, shutdown and
# the C connections' set-up of the keep-alive shape cancel out.
#
# For comparable counts each proxy runs one thread for connections: halfguard with
# `[runtime] workers = 1`, HAProxy with `nbthread 1`, nginx with one worker and no master
# process (valgrind runs one thread at a time anyway). C defaults to 1: one request in
# flight, so that nothing is batched and the figure is what one request costs, not how well
# a busy event loop amortises its waits; try C=50 for wrk's shape (under valgrind the proxy
# is slow, so its batches differ from a real run).
#
#   bash benches/compare/run.sh --only rate   # once, to install the peers
#   bash benches/per-request.sh [keep-alive|close|all]   # default all
#   N1=1000 N2=5000 C=1 HG_BIN=/path/to/halfguard KEEP=/tmp/dir bash benches/per-request.sh
#
# KEEP=DIR keeps every run's callgrind and strace files there, as TOOL.PROXY.SHAPE.N
# (`callgrind_annotate` them). What a proxy does by the second (halfguard's upkeep, timer
# wheels) is counted over each run's wall time, which valgrind stretches: run it on a quiet
# machine. Loopback only (halfguard 17480, HAProxy 17481, nginx 17482, backend 17601: the
# perf ports + 400); every process it starts is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-all}
n1=${N1:-1000}
n2=${N2:-5000}
c=${C:-1}
case $shape in keep-alive | close | all) ;; *) echo "per-request: keep-alive|close|all" >&2; exit 1 ;; esac
[ "$n1" -ge "$c" ] && [ "$n2" -gt "$n1" ] && [ "$n2" -le 100000 ] && [ "$c" -ge 1 ] && [ "$c" -le 100 ] ||
  { echo "per-request: C <= N1 < N2 <= 100000, 1 <= C <= 100" >&2; exit 1; }
source benches/common.sh
need per-request haproxy nginx valgrind strace h2load
perf_work
# The kernel census (a sock_diag dump of every socket on the ports, every 5 s) is off: it
# costs by the second, not by the request, and the N2 run lasts longer than the N1 run.
printf '\n[runtime]\nworkers = 1\n\n[kernel]\ncensus_interval = "0s"\n' >>"$work/halfguard-perf.toml"
sed -i 's/^\(\s*nbthread\) .*/\1 1/' "$work/haproxy-perf.cfg"
# nginx's stream proxy, the lean reference (no admission, no first-message judge, no clocks):
# one worker, no master process, so that valgrind and strace see the worker itself.
sed -e 's/^worker_processes .*/worker_processes 1;\nmaster_process off;/' \
  -e 's/^pid .*/pid nginx-proxy.pid;/' benches/peers/nginx-perf.conf >"$work/nginx-proxy.conf"
# Ports of their own (the perf profile's, moved by 400), so that another bench's load on the
# perf ports never lands here.
perl -pi -e 's/\b(17[012]\d\d)\b/$1 + 400/ge' "$work"/*.cfg "$work"/*.toml "$work"/*.conf
grep -q 'nbthread 1' "$work/haproxy-perf.cfg" || { echo "per-request: no nbthread in haproxy-perf.cfg" >&2; exit 1; }
ports_free 17601
nginx -p "$work/" -c "$work/nginx-backend.conf" -e stderr >"$work/nginx.log" 2>&1 &
pids+=($!)
ports_listening 17601

# load SHAPE PORT N: exactly N requests through PORT; fails unless all N got a 2xx.
load() {
  local extra=() out
  [ "$1" = close ] && extra=(-H 'Connection: close')
  out=$(h2load --h1 -n "$3" -c "$c" "${extra[@]}" "http://127.0.0.1:$2/small")
  grep -q "status codes: $3 2xx" <<<"$out" || { echo "per-request: not $3 answers:" >&2; echo "$out" >&2; return 1; }
}

# run TOOL PROXY SHAPE N: the proxy under TOOL (callgrind|strace) for N requests; prints
# the count (Ir, or system calls).
run() {
  local tool=$1 proxy=$2 shape=$3 n=$4 port cmd out=$work/$1-$2-$3-$4 pid
  case $proxy in
    halfguard) port=17480 cmd=("$HG" run -c "$work/halfguard-perf.toml") ;;
    haproxy) port=17481 cmd=(haproxy -f "$work/haproxy-perf.cfg") ;;
    nginx) port=17482 cmd=(nginx -p "$work/" -c "$work/nginx-proxy.conf" -e stderr) ;;
  esac
  ports_free "$port"
  case $tool in
    callgrind) valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]}" >"$out.log" 2>&1 & ;;
    strace) strace -f -c -o "$out" "${cmd[@]}" >"$out.log" 2>&1 & ;;
  esac
  pid=$!
  pids+=("$pid")
  for _ in $(seq 300); do
    ss -Htln "sport = :$port" | grep -q . && break
    sleep 0.1
  done
  load "$shape" "$port" "$n" || { kill -KILL "$pid"; wait "$pid" || true; return 1; }
  # Under strace the proxy is strace's child; under valgrind it is the process itself.
  local target=$pid
  [ "$tool" = strace ] && target=$(pgrep -P "$pid" | head -1)
  kill -TERM "$target"
  # nginx under valgrind sometimes sleeps on in epoll_wait through the first SIGTERM (its
  # handler ran, the wait was not interrupted); a second one ends it.
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -TERM "$target" 2>/dev/null || true
  wait "$pid" || true
  case $tool in
    callgrind) awk '/^summary:/ {print $2}' "$out" ;;
    # % time, seconds, usecs/call, calls, [errors], "total"
    strace) awk '$NF == "total" {print $4}' "$out" ;;
  esac
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP" && cp "$out" "$KEEP/$tool.$proxy.$shape.$n"
  fi
}

# per SHAPE PROXY TOOL: the count per request, diffed between N1 and N2.
per() {
  local a b
  a=$(run "$3" "$2" "$1" "$n1")
  b=$(run "$3" "$2" "$1" "$n2")
  [ -n "$a" ] && [ -n "$b" ] || { echo "per-request: no $3 count for $2 ($1)" >&2; exit 1; }
  awk -v a="$a" -v b="$b" -v d=$((n2 - n1)) -v f="$4" 'BEGIN {printf f, (b - a) / d}'
}

echo "per request, (count(N2=$n2) - count(N1=$n1)) / (N2 - N1), C=$c connection(s) at a time,"
echo "one thread for connections in each proxy ($HG; HAProxy $(haproxy -v | awk 'NR==1 {print $3}');"
echo "nginx $(nginx -v 2>&1 | sed 's|.*/||') stream)"
printf '%-11s %-10s %14s %14s\n' shape proxy instructions syscalls
for s in keep-alive close; do
  [ "$shape" = all ] || [ "$shape" = "$s" ] || continue
  for p in halfguard haproxy nginx; do
    printf '%-11s %-10s %14s %14s\n' "$s" "$p" "$(per "$s" "$p" callgrind '%.0f')" "$(per "$s" "$p" strace '%.2f')"
  done
done
