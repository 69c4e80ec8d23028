#!/usr/bin/env bash
# System calls per proxied connection, halfguard and HAProxy in one run: N sequential
# HTTP/1.0 requests, each on a new connection (`GET /small`, 128-byte body from nginx),
# through each proxy with `strace -c` attached to every thread of the proxy (and nothing else).
# Sequential on purpose: with one connection at a time nothing is batched, so the figure is
# what one connection costs, not how well a busy event loop amortises its waits.
#
#   bash benches/compare/run.sh --only rate   # once, to install the peers
#   bash benches/syscalls.sh [N]              # N requests per proxy, default 3000
#
# Uses the perf profiles in benches/peers/ (backend 17201, halfguard 17080, HAProxy 17081).
# Loopback only; every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-3000}
[ "$n" -ge 100 ] && [ "$n" -le 100000 ] || { echo "syscalls: N between 100 and 100000" >&2; exit 1; }
source benches/common.sh
need syscalls haproxy nginx strace python3
perf_work
perf_peers_start "$work"

# requests PORT COUNT: sequential HTTP/1.0 exchanges; fails loudly on a short answer.
requests() {
  python3 - "$1" "$2" <<'EOF'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 120
bad = 0
for _ in range(n):
    if time.monotonic() > deadline:
        sys.exit("syscalls: out of time")
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /small HTTP/1.0\r\nHost: bench\r\n\r\n")
    got = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += b
    s.close()
    if not got.startswith(b"HTTP/1.1 200") or not got.endswith(b"\n"):
        bad += 1
if bad:
    sys.exit(f"syscalls: {bad} of {n} answers were not whole")
EOF
}

# count NAME PID PORT: strace -c on every thread of PID during N requests.
count() {
  local name=$1 pid=$2 port=$3 args=()
  requests "$port" 50 # warm up: the first connections pay for lazy setup
  for t in /proc/"$pid"/task/*; do args+=(-p "${t##*/}"); done
  strace -c -f -o "$work/$name.strace" "${args[@]}" 2>/dev/null &
  local st=$!
  sleep 1 # strace attaches
  requests "$port" "$n"
  kill -INT "$st"
  wait "$st" || true
}

count halfguard "$hg_pid" 17080
count haproxy "$ha_pid" 17081

python3 - "$n" "$work/halfguard.strace" "$work/haproxy.strace" <<'EOF'
import sys
n = int(sys.argv[1])
def parse(path):
    calls = {}
    for line in open(path):
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            calls[f[-1]] = int(f[3])
    return calls
hg, ha = parse(sys.argv[2]), parse(sys.argv[3])
names = sorted(set(hg) | set(ha), key=lambda k: -(hg.get(k, 0) + ha.get(k, 0)))
print(f"system calls per proxied connection ({n} sequential HTTP/1.0 requests each)")
print(f"{'syscall':<16}{'halfguard':>10}{'haproxy':>10}")
for k in names:
    a, b = hg.get(k, 0) / n, ha.get(k, 0) / n
    if a >= 0.05 or b >= 0.05:
        print(f"{k:<16}{a:>10.2f}{b:>10.2f}")
ta, tb = sum(hg.values()) / n, sum(ha.values()) / n
print(f"{'total':<16}{ta:>10.2f}{tb:>10.2f}")
print(f"halfguard / haproxy: {ta / tb:.2f}x")
EOF
