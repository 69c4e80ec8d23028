#!/usr/bin/env bash
# One of two backends is killed under steady load: what share of client connections fail,
# and how long until the dead server stops being tried.
#
#   bash benches/failover.sh [SECS]
#
# Loopback only (ports 18180-18183), bounded in time; stops what it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
. benches/common.sh

cfg=$(mktemp --suffix=.toml)
cat >"$cfg" <<TOML
[[listeners]]
name = "bench"
bind = "127.0.0.1:18180"
backend = "app"

[[backends]]
name = "app"
servers = [{ addr = "127.0.0.1:18181" }, { addr = "127.0.0.1:18182" }]
[backends.health]
interval = "2s"

[limits]
max_conns_per_source = 0
max_half_open_per_source = 0
conn_rate_per_source = 0

[admin]
bind = "127.0.0.1:18183"
[log]
level = "warn"
TOML
"$LOADGEN" echo --listen 127.0.0.1:18181 --secs 120 >/dev/null & A=$!; pids+=($A)
"$LOADGEN" echo --listen 127.0.0.1:18182 --secs 120 >/dev/null & pids+=($!)
"$HG" run -c "$cfg" & pids+=($!)
sleep 1
"$LOADGEN" cps --target 127.0.0.1:18180 --conns 8 --secs "$SECS" > /tmp/failover-cps.txt & L=$!; pids+=($L)
sleep $((SECS / 2))
t0=$(date +%s%N)
kill "$A"
echo "killed backend 127.0.0.1:18181 at $(date +%T.%N | cut -c1-12)"
# Poll the dead server's connect errors: once they stop growing, nothing tries it any more.
last=-1; stable_since=0
for _ in $(seq 1 400); do
  errs=$(curl -s 127.0.0.1:18183/metrics | awk '/^halfguard_backend_connect_errors_total\{backend="app",server="127.0.0.1:18181"\}/ {print $2}')
  up=$(curl -s 127.0.0.1:18183/metrics | awk '/^halfguard_backend_up\{backend="app",server="127.0.0.1:18181"\}/ {print $2}')
  now=$(date +%s%N)
  if [ "$up" = "0" ] && [ -z "${down_ms:-}" ]; then down_ms=$(( (now - t0) / 1000000 )); fi
  if [ "$errs" != "$last" ]; then last=$errs; stable_since=$now; fi
  if [ -n "${down_ms:-}" ] && [ $(( (now - stable_since) / 1000000 )) -gt 1000 ]; then break; fi
  sleep 0.01
done
wait "$L"
echo "dead server marked down after ${down_ms:-?} ms; connect attempts to it: $last (last one $(( (stable_since - t0) / 1000000 )) ms after the kill)"
cat /tmp/failover-cps.txt
