#!/usr/bin/env bash
# What a bulk byte costs each proxy, in figures that do not depend on the machine's speed:
# CPU milliseconds, splice(2) and epoll_wait calls and context switches per GB moved, beside
# the throughput and the share of the cores left idle. iperf3 -P STREAMS for 4 s through the
# perf profiles' bulk listeners (benches/peers/: halfguard 17180, HAProxy 17181 with
# splice-auto) to one iperf3 server, the two proxies alternated, counted by `perf stat` on
# the proxy's PID (syscall tracepoints: root, or a kernel.perf_event_paranoid that allows).
#
#   bash benches/compare/run.sh --only bulk     # once, to install the peers and iperf3
#   bash benches/bulk-cost.sh [ROUNDS [STREAMS]]  # default: 2 rounds of 8 streams
#
# Loopback only (halfguard 17080/17180, HAProxy 17081/17181, backends 17201/17202); every
# process it starts is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2} streams=${2:-8}
[ "$rounds" -ge 1 ] && [ "$rounds" -le 10 ] || { echo "bulk-cost: ROUNDS 1..10" >&2; exit 1; }
[ "$streams" -ge 1 ] && [ "$streams" -le 32 ] || { echo "bulk-cost: STREAMS 1..32" >&2; exit 1; }
source benches/common.sh
need bulk-cost perf iperf3 haproxy nginx
perf_work
ports_free 17202
iperf3 -s -p 17202 >/dev/null 2>&1 &
pids+=($!)
perf_peers_start "$work"
ports_listening 17202 17180 17181
sleep 1

events=syscalls:sys_enter_splice,syscalls:sys_enter_epoll_wait,task-clock,context-switches
# one NAME PORT PID: a 4 s run through PORT while perf counts PID.
one() {
  local name=$1 port=$2 pid=$3 s0 out idle
  perf stat -x, -e "$events" -p "$pid" -o "$work/perf" -- sleep 4 &
  local perf_pid=$!
  s0=$(head -1 /proc/stat)
  out=$(iperf3 -c 127.0.0.1 -p "$port" -t 4 -P "$streams" -J | python3 -c '
import json, sys
d = json.load(sys.stdin)["end"]["sum_received"]
print(round(d["bits_per_second"] / 1e9, 2), d["bytes"])')
  idle=$(cores_idle_since "$s0")
  wait "$perf_pid"
  read -r gbps bytes <<<"$out"
  awk -F, -v name="$name" -v gbps="$gbps" -v bytes="$bytes" -v idle="$idle" '
    /splice/ {sp = $1} /epoll_wait/ {ew = $1} /task-clock/ {ms = $1} /context-switches/ {cs = $1}
    END {
      gb = bytes / 1e9
      printf "%-9s %6.2f Gbit/s  idle %2d%%  CPU %6.1f ms/GB  splice %7.0f/GB  epoll_wait %6.0f/GB  switches %5.0f/GB\n",
        name, gbps, idle, ms / gb, sp / gb, ew / gb, cs / gb
    }' "$work/perf"
}
echo "iperf3 -P $streams, 4 s a run"
for _ in $(seq "$rounds"); do
  one halfguard 17180 "$hg_pid"
  one HAProxy 17181 "$ha_pid"
done
