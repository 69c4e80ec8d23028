#!/usr/bin/env bash
# System calls per connection-per-request exchange through halfguard, for a client that
# speaks at once and for one that waits 5 ms after its handshake (a parked connection:
# conn/parked.rs). N sequential connections, each sends a 36-byte request and FIN and reads
# the echo to EOF (`loadgen echo` backend); `strace -c -f` on every thread of halfguard.
# Used where benches/syscalls.sh's fixed ports (17080, 17201) were taken by other work.
#
#   bash benches/parked-syscalls.sh BIN N fast|late [PORT_PREFIX]
#
# e.g. `bash benches/parked-syscalls.sh target/release/halfguard 1000 late 1871`: listener
# 18710, backend 18712, admin 18713 (a fresh prefix per run: the clients' TIME_WAIT stays on
# the ports of the last). Loopback only; stops what it started by PID.
set -euo pipefail
BIN=$1 N=$2 MODE=$3 P=${4:-1865}
cd "$(dirname "$0")/.."
CARGO_TARGET_DIR=target/loadgen cargo build --release --bench loadgen >/dev/null 2>&1
LOADGEN=$(ls -t target/loadgen/release/deps/loadgen-* | grep -v '\.d$' | head -1)
w=$(mktemp -d)
sed -e "s/18640/${P}0/; s/18642/${P}2/; s/18643/${P}3/" > $w/hg.toml <<'TOML'
[[listeners]]
name = "held"
bind = "127.0.0.1:18640"
backends = ["127.0.0.1:18642"]
[limits]
max_conns_per_source = 9000
max_half_open_per_source = 9000
max_half_closed_per_source = 9000
max_conns_per_network = 9000
conn_rate_per_source = 0
[timeouts]
drain = "1s"
[admin]
bind = "127.0.0.1:18643"
[log]
level = "warn"
TOML
"$LOADGEN" echo --listen 127.0.0.1:${P}2 >/dev/null 2>&1 & ep=$!
"$BIN" run --config $w/hg.toml >/dev/null 2>&1 & hp=$!
trap 'kill $ep $hp 2>/dev/null || true; rm -rf "$w"' EXIT
sleep 1
client() { python3 - "$1" "$MODE" "${P}0" <<'EOF'
import socket, sys, time
n, mode = int(sys.argv[1]), sys.argv[2]
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=5)
    if mode == "late": time.sleep(0.005)
    s.sendall(b"GET /small HTTP/1.0\r\nHost: bench\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        b = s.recv(65536)
        if not b: break
        got += b
    s.close()
    assert len(got) == 36, len(got)
EOF
}
client 50
args=(); for t in /proc/$hp/task/*; do args+=(-p "${t##*/}"); done
strace -c -f -o $w/out.strace "${args[@]}" 2>/dev/null & st=$!
sleep 1
client "$N"
kill -INT $st; wait $st || true
python3 - "$N" $w/out.strace <<'EOF'
import sys
n=int(sys.argv[1]); tot=0; rows=[]
for line in open(sys.argv[2]):
    f=line.split()
    if len(f)>=5 and f[0][0].isdigit() and f[-1]!="total":
        c=int(f[3]); tot+=c; rows.append((f[-1],c))
print(" ".join(f"{k}={v/n:.2f}" for k,v in sorted(rows,key=lambda r:-r[1]) if v/n>=0.01))
print(f"total per request: {tot/n:.2f}")
EOF
