#!/usr/bin/env bash
# Keep-alive and connection-per-request rates of two halfguard builds beside HAProxy, in one
# run, alternated: wrk -t2 -c50 for 6 s each on the perf profiles (benches/peers/), the same
# backend (nginx /small). For "did this change cost the happy path?" on a noisy machine.
#
#   bash benches/compare/run.sh --only rate       # once, to install the peers and wrk
#   HG_A=target/release/halfguard HG_B=/path/to/older/halfguard bash benches/ab-happy-path.sh [ROUNDS]
#
# Loopback only (halfguard 17080, HAProxy 17081, backend 17201); every process it starts is
# stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
[ "$rounds" -ge 1 ] && [ "$rounds" -le 10 ] || { echo "ab-happy-path: ROUNDS 1..10" >&2; exit 1; }
: "${HG_A:=target/release/halfguard}"
: "${HG_B:?HG_B: the other build to compare}"
source benches/common.sh
ulimit -n "$(ulimit -Hn)"
rate() {
  wrk -t2 -c50 -d6 "$@" 2>/dev/null | awk '/Requests\/sec/ {print $2}'
}
one() {
  local bin=$1 tag=$2 work
  HG=$bin
  work=$(mktemp -d)
  perf_peers_files "$work"
  perf_peers_start "$work"
  printf '%s\thalfguard\tkeep-alive %s\tclose %s\n' "$tag" \
    "$(rate http://127.0.0.1:17080/small)" "$(rate -H 'Connection: close' http://127.0.0.1:17080/small)"
  printf '%s\tHAProxy\tkeep-alive %s\tclose %s\n' "$tag" \
    "$(rate http://127.0.0.1:17081/small)" "$(rate -H 'Connection: close' http://127.0.0.1:17081/small)"
  cleanup
  pids=()
  rm -rf "$work"
  sleep 1
}
for _ in $(seq "$rounds"); do
  one "$HG_A" A
  one "$HG_B" B
done
