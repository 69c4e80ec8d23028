#!/usr/bin/env bash
# Where TIME_WAIT lands on clean closes, and how many client-first closes per second a
# non-loopback backend address sustains before the ephemeral ports run out.
#
#   sudo bash benches/timewait.sh [PORTS] [SECS]
#
# Runs in a network namespace of its own (root): halfguard on 127.0.0.1:18080 forwards to a
# backend on 198.18.0.1:18081, an address of a veth interface, so the backend leg is not
# loopback (Linux's default tcp_tw_reuse = 2 reuses TIME_WAIT ports on loopback only). The
# backend reads until the client's FIN, answers and closes: a client-first close, the
# case where halfguard forwards the FIN and so is the active closer toward the backend.
#
# 1. 200 clean closes: TIME_WAIT sockets on halfguard's backend leg and on the backend.
# 2. With ip_local_port_range narrowed to PORTS ports (default 1000), closes as fast as one
#    client makes them for SECS seconds (default 5), without and with the sysctl file's
#    net.ipv4.tcp_tw_reuse (each in a fresh namespace). Prints closes that worked and
#    failed, and the rate. The full default range has 28232 ports.
# Uses target/debug/halfguard (cargo build first). Stops what it starts by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
PORTS=${1:-1000}
SECS=${2:-5}
BIN=${HALFGUARD_BIN:-${CARGO_TARGET_DIR:-target}/debug/halfguard}
[ -x "$BIN" ] || { echo "timewait: no $BIN (cargo build first)" >&2; exit 1; }
NS=hgtw-$$
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NS"
in_ns() { ip netns exec "$NS" "$@"; }
in_ns ip link set lo up
in_ns ip link add dummy0 type veth peer name dummy1
in_ns ip addr add 198.18.0.1/24 dev dummy0
in_ns ip link set dummy0 up; in_ns ip link set dummy1 up

cat >"$WORK/backend.py" <<'EOF'
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.0.1", 18081)); s.listen(1024)
def h(c):
    try:
        while c.recv(4096):
            pass
        c.sendall(b"ok")
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=h, args=(c,), daemon=True).start()
EOF
cat >"$WORK/client.py" <<'EOF'
import socket, sys, time
n, secs = int(sys.argv[1]), float(sys.argv[2])
ok = bad = 0
end = time.monotonic() + secs
t0 = time.monotonic()
while (n == 0 or ok + bad < n) and time.monotonic() < end:
    c = socket.socket(); c.settimeout(2)
    try:
        c.connect(("127.0.0.1", 18080)); c.sendall(b"x"); c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = c.recv(16)
            if not d:
                break
            got += d
        ok += got == b"ok"; bad += got != b"ok"
    except OSError:
        bad += 1
    finally:
        c.close()
print(ok, bad, round(time.monotonic() - t0, 2))
EOF
cat >"$WORK/hg.toml" <<EOF
[[listeners]]
name = "tw"
bind = "127.0.0.1:18080"
backends = ["198.18.0.1:18081"]
[limits]
conn_rate_per_source = 0
max_conns_per_source = 0
[admin]
bind = "off"
[log]
level = "error"
EOF

in_ns python3 "$WORK/backend.py" & PIDS+=($!)
# Passive health would cool the only server off once connects fail: keep it simple and
# count what the client sees.
start_hg() { in_ns "$BIN" run -c "$WORK/hg.toml" & HG=$!; PIDS+=($HG); sleep 0.5; }
stop_hg() { kill "$HG"; wait "$HG" 2>/dev/null || true; }
tw() { in_ns ss -Htan state time-wait "$1" | wc -l; }

start_hg
read -r ok bad _ < <(in_ns python3 "$WORK/client.py" 200 30)
echo "1. 200 client-first closes ($ok ok, $bad failed): TIME_WAIT on halfguard's backend leg $(tw 'dport = :18081'), on the backend $(tw 'sport = :18081'), on halfguard's client leg $(tw 'sport = :18080')"
stop_hg

sysctl_from_file() { sed -n "s/^[[:space:]]*-\{0,1\}$1[[:space:]]*=[[:space:]]*//p" deploy/sysctl/90-halfguard.conf | head -1; }
run() { # run LABEL
  start_hg
  read -r ok bad took < <(in_ns python3 "$WORK/client.py" 0 "$SECS")
  stop_hg
  echo "   $1: $ok closes ok, $bad failed in ${took}s ($(awk -v o="$ok" -v t="$took" 'BEGIN{printf "%.0f", o/t}')/s)"
}
echo "2. ports $((40000)) to $((40000 + PORTS - 1)) ($PORTS), closes as fast as one client makes them for ${SECS}s:"
for remedy in none tw_reuse; do
  ip netns del "$NS" 2>/dev/null || true
  ip netns add "$NS"
  in_ns ip link set lo up
  in_ns ip link add dummy0 type veth peer name dummy1
  in_ns ip addr add 198.18.0.1/24 dev dummy0
  in_ns ip link set dummy0 up; in_ns ip link set dummy1 up
  in_ns sysctl -qw net.ipv4.ip_local_port_range="40000 $((40000 + PORTS - 1))"
  if [ "$remedy" = tw_reuse ]; then
    in_ns sysctl -qw net.ipv4.tcp_tw_reuse="$(sysctl_from_file net.ipv4.tcp_tw_reuse)"
  fi
  in_ns python3 "$WORK/backend.py" & PIDS+=($!)
  sleep 0.3
  run "$remedy (tcp_tw_reuse $(in_ns cat /proc/sys/net/ipv4/tcp_tw_reuse))"
done
