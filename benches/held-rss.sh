#!/usr/bin/env bash
# RSS per held connection, halfguard beside HAProxy, in two shapes: silent (connected, no
# byte) and idle after one exchange (one byte sent and echoed back, then nothing, as a
# pool's connections sit), at 1,000 and 4,000 held; with the kernel's share per held
# connection beside it.
#
#   bash benches/held-rss.sh [--reps 2] [--counts 1000,4000] [--proxies halfguard,haproxy]
#
# Each point starts the proxy afresh, holds the connections with `loadgen hold [--exchange
# 1]` (benches/loadgen.rs) against a `loadgen echo` backend, and prints the proxy's RSS
# growth per held connection and the kernel's share beside it. The kernel's share is what
# the proxy's sockets take: the descriptors the proxy gained per held connection (one
# socket silent, two after an exchange) times the slab objects a TCP socket takes
# (/proc/slabinfo object sizes: TCP, sock_inode_cache, dentry, filp, eventpoll_epi; a
# cache merged into another is not listed and not counted), plus the growth of TCP buffer
# memory (/proc/net/sockstat `mem` pages, for all sockets: after an exchange the queues
# are empty, so it stays near 0). Object sizes, not slab totals: on a machine shared with
# other work the totals move by more than a run's sockets. RSS is not timing: it is stable
# on a shared machine.
# RSS is read SETTLE_MS (default 5000) after the last connection is held: a pool's
# connections sit for seconds to minutes, and halfguard parks one idle a second after its
# exchange (`conn::parked`), its workers giving the freed memory back within the next
# second; read at 2 s, most of the burst's tasks are still there.
# Loopback only, ports 18640-18643.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=2 counts=1000,4000 proxies=halfguard,haproxy
SETTLE_MS=${SETTLE_MS:-5000}
while [ $# -gt 0 ]; do
  case $1 in
    --reps) reps=$2; shift 2 ;;
    --counts) counts=$2; shift 2 ;;
    --proxies) proxies=$2; shift 2 ;;
    *) echo "held-rss: unknown argument $1" >&2; exit 2 ;;
  esac
done
source benches/common.sh
command -v haproxy >/dev/null || { echo "held-rss: haproxy not installed" >&2; exit 1; }
work=$(mktemp -d)
trap 'cleanup; rm -rf "$work"' EXIT
ulimit -n 20000

HG_PORT=18640 HA_PORT=18641 ECHO_PORT=18642 ADMIN_PORT=18643
cat >"$work/halfguard.toml" <<TOML
# One listener, halfguard's defaults but for the per-source caps, raised so that one load
# generator on one address is not throttled (as benches/peers/halfguard-perf.toml).
[[listeners]]
name = "held"
bind = "127.0.0.1:$HG_PORT"
backends = ["127.0.0.1:$ECHO_PORT"]
[limits]
max_conns_per_source = 9000
max_half_open_per_source = 9000
max_half_closed_per_source = 9000
max_conns_per_network = 9000
conn_rate_per_source = 0
max_conns = 9000
max_half_open = 9000
max_half_closed = 9000
[pressure]
high_water = 0.95
low_water = 0.9
[timeouts]
drain = "1s"
[admin]
bind = "127.0.0.1:$ADMIN_PORT"
[log]
level = "warn"
TOML
cat >"$work/haproxy.cfg" <<CFG
# benches/peers/haproxy-perf.cfg's http frontend, on this script's ports.
global
    nbthread 2
    maxconn 9000
defaults
    mode tcp
    timeout connect 3s
    timeout client 1h
    timeout server 1h
    timeout client-fin 30s
    timeout server-fin 30s
    option clitcpka
    option srvtcpka
frontend held
    bind 127.0.0.1:$HA_PORT backlog 4096
    maxconn 9000
    stick-table type ip size 100k expire 60s store conn_cur,conn_rate(1s)
    tcp-request connection track-sc0 src
    tcp-request connection reject if { sc0_conn_cur gt 9000 }
    tcp-request inspect-delay 10s
    tcp-request content accept if { req.len gt 0 }
    tcp-request content reject
    default_backend held
backend held
    server s1 127.0.0.1:$ECHO_PORT
CFG

# sock_bytes: the slab objects one TCP socket takes (bytes).
sock_bytes() {
  if [ -r /proc/slabinfo ]; then
    awk '$1 ~ /^(TCP|sock_inode_cache|dentry|filp|eventpoll_epi)$/ { s += $4 } END { print s + 0 }' /proc/slabinfo
  else
    echo 0
  fi
}
tcp_mem() { awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat; }
per_sock=$(sock_bytes)
echo "one TCP socket's slab objects: $per_sock bytes (0: /proc/slabinfo unreadable, not root)"

# point PORT PID COUNT EXCHANGE: one hold; prints `held rss_bytes kernel_bytes tcp_mem_bytes`
# per held connection.
point() {
  local m0 m1 out
  m0=$(tcp_mem)
  out=$("$LOADGEN" hold --target 127.0.0.1:$1 --count "$3" --exchange "$4" --settle-ms "$SETTLE_MS" \
    --secs 2 --pid "$2" | grep '^hold ')
  m1=$(tcp_mem)
  local held rss f0 f1
  held=$(sed -n 's/.* held=\([0-9]*\).*/\1/p' <<<"$out")
  rss=$(sed -n 's/.*per_conn_bytes=\([-0-9?]*\).*/\1/p' <<<"$out")
  f0=$(sed -n 's/.*fds_before=\([0-9]*\).*/\1/p' <<<"$out")
  f1=$(sed -n 's/.*fds_held=\([0-9]*\).*/\1/p' <<<"$out")
  [ "${held:-0}" -gt 0 ] || { echo "0 ? ? ?"; return; }
  echo "$held $rss $(((f1 - f0) * per_sock / held)) $(((m1 - m0) * 4096 / held))"
}

printf '%-10s %-9s %6s %4s %6s %10s %13s %11s\n' proxy shape count rep held rss_B/conn kernel_B/conn tcp_mem_B
for count in ${counts//,/ }; do
  # A fresh echo backend per count (loadgen stops by itself after at most 120 s).
  ports_free $ECHO_PORT
  "$LOADGEN" echo --listen 127.0.0.1:$ECHO_PORT --secs 120 >/dev/null &
  echo_pid=$!
  pids+=($echo_pid)
  ports_listening $ECHO_PORT
  for proxy in ${proxies//,/ }; do
    for ex in 0 1; do
      shape=$([ $ex = 0 ] && echo silent || echo exchanged)
      for rep in $(seq "$reps"); do
        if [ "$proxy" = halfguard ]; then
          ports_free $HG_PORT $ADMIN_PORT
          "$HG" run -c "$work/halfguard.toml" >>"$work/halfguard.log" 2>&1 &
          port=$HG_PORT
        else
          ports_free $HA_PORT
          haproxy -db -f "$work/haproxy.cfg" >>"$work/haproxy.log" 2>&1 &
          port=$HA_PORT
        fi
        ppid=$!
        pids+=($ppid)
        ports_listening $port
        sleep 0.5
        read -r held rss k m < <(point $port $ppid "$count" $ex)
        printf '%-10s %-9s %6s %4s %6s %10s %13s %11s\n' "$proxy" $shape "$count" "$rep" "$held" "$rss" "$k" "$m"
        kill "$ppid" 2>/dev/null || true
        wait "$ppid" 2>/dev/null || true
        sleep 1
      done
    done
  done
  kill "$echo_pid" 2>/dev/null || true
  wait "$echo_pid" 2>/dev/null || true
done
