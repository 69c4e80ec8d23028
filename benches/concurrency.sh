#!/usr/bin/env bash
# Keep-alive at several concurrencies, halfguard beside HAProxy in one run: wrk -t2 -cN for
# 6 s each on the perf profiles (benches/peers/), the same backend (nginx /small), the two
# proxies alternated at each N. Prints req/s, p50, p99 and how much of the cores sat idle
# (/proc/stat). For "what does the tail pay at a few concurrent requests?" (`[runtime]
# slice`): benches/compare measures one concurrency (64).
#
#   bash benches/compare/run.sh --only rate          # once, to install the peers and wrk
#   bash benches/concurrency.sh [ROUNDS [N...]]      # default: 2 rounds of 8 16 32 64
#   HG_ENV="HALFGUARD__RUNTIME__SLICE=0s" bash benches/concurrency.sh   # halfguard with
#                                                    # settings from the environment
#   HG_BIN=/path/to/older/halfguard bash benches/concurrency.sh         # another build
#
# Loopback only (halfguard 17080, HAProxy 17081, backend 17201); every process it starts is
# stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
[ "$rounds" -ge 1 ] && [ "$rounds" -le 10 ] || { echo "concurrency: ROUNDS 1..10" >&2; exit 1; }
shift || true
concurrencies=("$@")
[ ${#concurrencies[@]} -gt 0 ] || concurrencies=(8 16 32 64)
for n in "${concurrencies[@]}"; do
  [ "$n" -ge 2 ] && [ "$n" -le 1000 ] || { echo "concurrency: N 2..1000" >&2; exit 1; }
done
source benches/common.sh
need concurrency wrk haproxy nginx
perf_work
if [ -n "${HG_ENV:-}" ]; then
  printf '#!/bin/sh\nexec env %s %s "$@"\n' "$HG_ENV" "$(realpath "$HG")" >"$work/halfguard"
  chmod +x "$work/halfguard"
  HG=$work/halfguard
fi
perf_peers_start "$work"
sleep 1

# idle share of both cores over a command, then its wrk summary
one() {
  local name=$1 port=$2 n=$3 s0 out idle
  s0=$(head -1 /proc/stat)
  out=$(wrk -t2 -c"$n" -d6s --latency "http://127.0.0.1:$port/small")
  idle=$(cores_idle_since "$s0")
  echo "$out" | awk -v name="$name" -v n="$n" -v idle="$idle" '
    /Requests\/sec/ {r = $2} /^ +50%/ {p50 = $2} /^ +99%/ {p99 = $2}
    END {printf "%-4s %-9s %10s req/s  p50 %-9s p99 %-9s idle %s%%\n", n, name, r, p50, p99, idle}'
}
echo "c    proxy          req/s  p50           p99           cores idle"
for r in $(seq "$rounds"); do
  for n in "${concurrencies[@]}"; do
    one HAProxy 17081 "$n"
    one halfguard 17080 "$n"
  done
done
