#!/usr/bin/env bash
# Connections per second through halfguard (and through HAProxy, when installed, in the same
# run), against the no-proxy figure; and RSS per held silent connection.
#
#   bash benches/measure.sh [SECS] [HOLD]
#
# Loopback only, ports 18080-18082; every load is bounded in time and count; the processes
# it starts are stopped by PID when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
HOLD=${2:-5000}
CONNS=${CONNS:-32}

. benches/common.sh

ulimit -n "$(ulimit -Hn)"
"$LOADGEN" echo --listen 127.0.0.1:18081 --secs 600 >/dev/null & pids+=($!)
"$HG" run -c benches/halfguard-bench.toml & HG_PID=$!; pids+=($HG_PID)

HAPROXY_PID=
if command -v haproxy >/dev/null 2>&1; then
  cfg=$(mktemp)
  cat >"$cfg" <<EOF
global
  maxconn 7000
defaults
  mode tcp
  timeout connect 3s
  timeout client 5m
  timeout server 5m
  timeout client-fin 30s
listen bench
  bind 127.0.0.1:18082
  option splice-auto
  server s1 127.0.0.1:18081
EOF
  haproxy -f "$cfg" -db >/dev/null 2>&1 & HAPROXY_PID=$!; pids+=($HAPROXY_PID)
fi
sleep 1

echo "== new connection per request (connect, 64 B echo, close), $CONNS workers, ${SECS}s each"
"$LOADGEN" cps --target 127.0.0.1:18081 --conns "$CONNS" --secs "$SECS" | sed 's/^/no-proxy  /'
"$LOADGEN" cps --target 127.0.0.1:18080 --conns "$CONNS" --secs "$SECS" | sed 's/^/halfguard /'
[ -n "$HAPROXY_PID" ] && "$LOADGEN" cps --target 127.0.0.1:18082 --conns "$CONNS" --secs "$SECS" | sed 's/^/haproxy   /'

echo "== RSS per held silent connection ($HOLD connections)"
sleep 2
"$LOADGEN" hold --target 127.0.0.1:18080 --count "$HOLD" --secs 3 --pid "$HG_PID" | sed 's/^/halfguard /'
if [ -n "$HAPROXY_PID" ]; then
  "$LOADGEN" hold --target 127.0.0.1:18082 --count "$HOLD" --secs 3 --pid "$HAPROXY_PID" | sed 's/^/haproxy   /'
fi
