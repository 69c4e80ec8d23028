#!/usr/bin/env bash
# A known gap, shown: a client that sends its request and a FIN, then stops reading, while
# the backend answers with 16 MiB. The pump writes the answer into the kernel, forwards the
# FIN, sees FIN both ways and closes cleanly, and the kernel keeps the socket as an orphan in
# LAST-ACK with megabytes queued: held by no process, counted against no cap. This prints,
# twice during the attack, the attacker's sockets on halfguard's port by state, how many the
# process holds, and the bytes queued in those it does not.
# Since conn/delivery.rs (2026-12-05) a clean close waits for the client's queue under
# write_stall, so no orphan should keep bytes past that clock (not re-run since).
#
#   bash benches/compare/run.sh --only rate   # once, to install the peers
#   bash benches/halfclose-orphans.sh [SECS]  # 12 s by default, at most 60
#
# The nginx backend on 17201 serves /big; halfguard runs the guard profile on 17080 (both
# from benches/peers/). Attacker 127.0.0.3, 1000 connections a second, at most 4000 at once.
# Loopback only; every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-12}
[ "$secs" -gt 60 ] && secs=60
source benches/common.sh
ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
mkdir -p "$work/www" "$work/tmp"
cp benches/peers/nginx-backend.conf benches/peers/halfguard-guard.toml "$work/"
head -c $((16 << 20)) /dev/zero >"$work/www/big"
ports_free 17201 17080
nginx -p "$work/" -c "$work/nginx-backend.conf" -e stderr >"$work/nginx.log" 2>&1 &
pids+=($!)
"$HG" run -c "$work/halfguard-guard.toml" >"$work/halfguard.log" 2>&1 &
pids+=($!)
hg=$!
ports_listening 17201 17080
"$LOADGEN" attack --kind halfclose --target 127.0.0.1:17080 --src 127.0.0.3 --conns 4000 \
  --rate 1000 --secs "$secs" --path /big >"$work/attack.out" 2>&1 &
pids+=($!)
attacker=$!

look() {
  echo "== at $1 s: the attacker's sockets on :17080 (TIME-WAIT left out)"
  ss -tanpH "( sport = :17080 )" | awk -v pid="pid=$hg," '
    $5 ~ /^127\.0\.0\.3:/ && $1 != "TIME-WAIT" {
      n[$1]++
      if (index($0, pid)) held++; else { orphan++; queued += $3 }
    }
    END {
      for (s in n) printf "  %-12s %d\n", s, n[s]
      printf "  held by halfguard %d; not held %d, with %.1f MB queued\n",
        held, orphan, queued / 1e6
    }'
}
half=$((secs / 2))
sleep "$half"
look "$half"
sleep $((secs - half - 1))
look $((secs - 1))
wait "$attacker" || true
tail -1 "$work/attack.out" | cut -c1-200
