#!/usr/bin/env bash
# Where a new connection's time goes: halfguard against HAProxy on the new-connection-per-
# request workload of benches/compare (wrk -t2 -c64, Connection: close, 128-byte body from
# nginx), with what each proxy costs per request: user and system CPU, voluntary and
# involuntary context switches, and TCP segments sent on loopback (all processes).
#
#   bash benches/compare/run.sh --only rate   # once, to install the peers and wrk
#   bash benches/newconn-cost.sh [ROUNDS] [SECS]
#   THREADS=1 bash benches/newconn-cost.sh    # halfguard workers = HAProxy nbthread = 1
#   SHAPE=keep-alive bash benches/newconn-cost.sh   # the same figures for keep-alive requests
#
# Uses the perf profiles in benches/peers/ (same ports: backend 17201, halfguard 17080,
# HAProxy 17081). Loopback only; every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-4}
source benches/common.sh
need newconn-cost wrk haproxy nginx nstat
case ${SHAPE:-close} in
  close) close=(-H "Connection: close") ;;
  keep-alive) close=() ;;
  *) echo "newconn-cost: SHAPE is close or keep-alive" >&2; exit 1 ;;
esac
perf_work
if [ -n "${THREADS:-}" ]; then
  sed -i "s/^    nbthread .*/    nbthread $THREADS/" "$work/haproxy-perf.cfg"
  printf '\n[runtime]\nworkers = %s\n' "$THREADS" >>"$work/halfguard-perf.toml"
fi
perf_peers_start "$work"

# measure NAME PID PORT: one wrk run, figures per request.
measure() {
  local name=$1 pid=$2 port=$3 tck
  tck=$(getconf CLK_TCK)
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  read -r v0 n0 < <(cat /proc/"$pid"/task/*/status |
    awk '/^voluntary_ctxt/{v+=$2} /^nonvoluntary_ctxt/{n+=$2} END{print v, n}')
  nstat -n >/dev/null
  out=$(wrk -t2 -c64 -d"${secs}s" "${close[@]}" --latency "http://127.0.0.1:$port/small")
  segs=$(nstat 2>/dev/null | awk '$1=="TcpOutSegs"{print $2}')
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  read -r v1 n1 < <(cat /proc/"$pid"/task/*/status |
    awk '/^voluntary_ctxt/{v+=$2} /^nonvoluntary_ctxt/{n+=$2} END{print v, n}')
  reqs=$(awk '/requests in/{print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  p99=$(awk '$1=="99%"{print $2}' <<<"$out")
  python3 -c "
r = $reqs
print(f'| $name | {$rps:,.0f} | $p99 | {($u1-$u0)/$tck/r*1e6:.1f} | {($s1-$s0)/$tck/r*1e6:.1f} '
      f'| {($v1-$v0)/r:.2f} | {($n1-$n0)/r:.2f} | {${segs:-0}/r:.1f} |')"
}

echo "| proxy | req/s | p99 | user µs/req | sys µs/req | voluntary cs/req | involuntary cs/req | segments/req |"
echo "|---|---|---|---|---|---|---|---|"
for _ in $(seq "$rounds"); do
  measure halfguard "$hg_pid" 17080
  measure HAProxy "$ha_pid" 17081
done
