#!/usr/bin/env bash
# Real clients, from one address (127.0.0.1), straight to their server, through halfguard with
# the shipped defaults (config/halfguard.toml with only bind, backends and admin changed),
# and through HAProxy in `mode tcp` (no per-source rule): errors as each client counts them,
# and throughput. Prints a markdown table (benches/README.md, "Real clients").
#
#   bash benches/real-clients.sh            # as root (sshd, and postgres run as `postgres`)
#
# Needs nginx, haproxy, curl, ab, h2load, redis-server, redis-benchmark, PostgreSQL's server
# and pgbench (/usr/lib/postgresql/<ver>/bin), sshd, ssh and scp. Everything listens on
# 127.0.0.1:17300-17399, every load is bounded, and what it starts is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -n "${HG_BIN:-}" ] || cargo build --release --bin halfguard >/dev/null 2>&1
HG=${HG_BIN:-target/release/halfguard}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/halfguard-real-clients.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# Servers: nginx HTTP/1.1 17301 and h2c 17302, redis 17303, postgres 17304, sshd 17305.
listening() { for _ in $(seq 100); do ss -Htln "sport = :$1" | grep -q . && return; sleep 0.1; done; echo "nothing on $1" >&2; exit 1; }
# An earlier run's halfguard keeps accepting for admin.drain_delay (5 s) after SIGTERM.
for p in 17301 17302 17303 17304 17305 173{11..15} 173{21..25}; do
  for _ in $(seq 100); do ss -Htln "sport = :$p" | grep -q . || break; sleep 0.1; done
done
mkdir -p "$work/www" "$work/body" "$work/pg" "$work/ssh"
head -c 612 /dev/zero | tr '\0' x >"$work/www/small.txt"
head -c $((50 << 20)) /dev/urandom >"$work/big.bin"
cat >"$work/nginx.conf" <<EOF
user root;
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work/body;
  client_max_body_size 200m;
  server {
    listen 127.0.0.1:17301;
    listen 127.0.0.1:17302 http2;
    root $work/www;
    location = /upload { client_body_in_file_only clean; proxy_pass http://127.0.0.1:17301/sink; }
    location = /sink { return 200 "stored\n"; }
  }
}
EOF
nginx -e "$work/nginx.err" -p "$work" -c "$work/nginx.conf" &
pids+=($!)
redis-server --port 17303 --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null &
pids+=($!)
chown postgres "$work/pg"
runuser -u postgres -- "$PGBIN/initdb" -D "$work/pg/data" -A trust -U postgres --no-sync >/dev/null
runuser -u postgres -- "$PGBIN/postgres" -D "$work/pg/data" -c listen_addresses=127.0.0.1 \
  -c port=17304 -c unix_socket_directories="$work/pg" -c fsync=off \
  -c synchronous_commit=off >"$work/pg.log" 2>&1 &
pids+=($!)
ssh-keygen -q -t ed25519 -N '' -f "$work/ssh/host"
ssh-keygen -q -t ed25519 -N '' -f "$work/ssh/id"
cp "$work/ssh/id.pub" "$work/ssh/auth"
mkdir -p /run/sshd
"$(command -v sshd)" -D -e -f /dev/null -p 17305 -o ListenAddress=127.0.0.1 -o HostKey="$work/ssh/host" \
  -o AuthorizedKeysFile="$work/ssh/auth" -o PidFile=none -o StrictModes=no -o UsePAM=no \
  -o PermitRootLogin=prohibit-password -o "Subsystem=sftp internal-sftp" 2>"$work/sshd.log" &
pids+=($!)
for p in 17301 17302 17303 17304 17305; do listening $p; done
sleep 1

# Proxies: halfguard (shipped defaults) on 173{1..5}1+10, HAProxy mode tcp on +20.
ha="$work/haproxy.cfg"
cat >"$ha" <<EOF
global
  maxconn 9000
defaults
  mode tcp
  timeout connect 3s
  timeout client 1h
  timeout server 1h
EOF
for s in 1 2 3 4 5; do
  sed -e "s/^bind = \"0.0.0.0:18080\"/bind = \"127.0.0.1:173$((s + 10))\"/" \
    -e "s/^backends = \[\"127.0.0.1:18081\"\]/backends = [\"127.0.0.1:1730$s\"]/" \
    -e 's/^bind = "127.0.0.1:9901"/bind = "off"/' config/halfguard.toml >"$work/hg$s.toml"
  "$HG" run -c "$work/hg$s.toml" >"$work/hg$s.log" 2>&1 &
  pids+=($!)
  printf 'listen l%s\n  bind 127.0.0.1:173%s\n  server s 127.0.0.1:1730%s\n' "$s" $((s + 20)) "$s" >>"$ha"
done
haproxy -f "$ha" >"$work/haproxy.log" 2>&1 &
pids+=($!)
for s in 1 2 3 4 5; do listening 173$((s + 10)); listening 173$((s + 20)); done
PGENV=(env PGHOST=127.0.0.1 PGUSER=postgres PGDATABASE=postgres)
"${PGENV[@]}" PGPORT=17304 "$PGBIN/pgbench" -i -s 1 -q >/dev/null 2>&1

# port SERVER VIA: the port of server SERVER (1..5) direct, through halfguard or HAProxy.
port() { case $2 in direct) echo 1730$1 ;; halfguard) echo 173$(($1 + 10)) ;; haproxy) echo 173$(($1 + 20)) ;; esac; }

# Each row prints "errors|throughput".
row_ab_k() {
  out=$(ab -k -c 100 -n 50000 -s 10 "http://127.0.0.1:$(port 1 "$1")/small.txt" 2>&1) || { echo "aborted|-"; return; }
  echo "$(awk '/^Failed requests/{print $3}' <<<"$out")|$(awk '/^Requests per second/{printf "%d req/s", $4}' <<<"$out")"
}
row_ab() {
  out=$(ab -c 50 -n 10000 -s 10 "http://127.0.0.1:$(port 1 "$1")/small.txt" 2>&1) || { echo "aborted|-"; return; }
  echo "$(awk '/^Failed requests/{print $3}' <<<"$out")|$(awk '/^Requests per second/{printf "%d req/s", $4}' <<<"$out")"
}
row_h2load() {
  out=$(h2load -D 5 -c 100 -m 10 "http://127.0.0.1:$(port 2 "$1")/small.txt" 2>&1) || { echo "aborted|-"; return; }
  # A client refused at connect starts nothing and counts no error: count idle clients too.
  idle=$(awk '/^req\/s/{print ($3 == "0.00") ? "some clients served nothing" : ""}' <<<"$out")
  errs=$(awk '/^requests:/{gsub(",",""); print $10 + $12 + $14}' <<<"$out")
  echo "$errs${idle:+ ($idle)}|$(awk '/^finished in/{gsub(",",""); printf "%d req/s", $4}' <<<"$out")"
}
row_curl_post() {
  out=$(curl -sS --fail --expect100-timeout 30 -H 'Expect: 100-continue' --data-binary @"$work/big.bin" \
    -o /dev/null -w '%{speed_upload}' "http://127.0.0.1:$(port 1 "$1")/upload" 2>&1) || { echo "1|-"; return; }
  echo "0|$(awk '{printf "%d MB/s", $1 / 1048576}' <<<"$out")"
}
row_pgbench() {
  out=$("${PGENV[@]}" PGPORT="$(port 4 "$1")" PGSSLMODE=disable "$PGBIN/pgbench" -n -S -c 80 -j 2 -T 5 2>&1) || { echo "aborted|-"; return; }
  echo "$(awk '/number of failed/{print $5}' <<<"$out")|$(awk '/^tps/{printf "%d tps", $3}' <<<"$out")"
}
row_pgbench_C() {
  out=$("${PGENV[@]}" PGPORT="$(port 4 "$1")" PGSSLMODE=disable "$PGBIN/pgbench" -n -C -S -c 16 -j 2 -T 5 2>&1) || { echo "aborted|-"; return; }
  echo "$(awk '/number of failed/{print $5}' <<<"$out")|$(awk '/^tps/{printf "%d conn/s", $3}' <<<"$out")"
}
row_redis() {
  out=$(redis-benchmark -p "$(port 3 "$1")" -c 100 -n 100000 -q -t set,get 2>&1) || { echo "aborted|-"; return; }
  grep -q rror <<<"$out" && { echo "errors|-"; return; }
  echo "0|$(tr '\r' '\n' <<<"$out" | awk '/requests per second/{s += $2; n++} END {printf "%d req/s", s / n}')"
}
row_scp() {
  start=$(date +%s.%N)
  scp -q -F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
    -i "$work/ssh/id" -P "$(port 5 "$1")" "$work/big.bin" "root@127.0.0.1:$work/up.bin" 2>/dev/null || { echo "1|-"; return; }
  cmp -s "$work/big.bin" "$work/up.bin" || { echo "corrupt|-"; return; }
  echo "0|$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%d MB/s", 50 / (e - s)}')"
}

echo "| client | direct: errors | direct | halfguard: errors | halfguard | HAProxy: errors | HAProxy |"
echo "|---|---|---|---|---|---|---|"
for r in "ab -k -c 100 -n 50000:row_ab_k" "ab -c 50 -n 10000 (no -k):row_ab" \
  "h2load -c 100 -m 10 -D 5 (h2c):row_h2load" "curl 50 MB POST, Expect: 100-continue:row_curl_post" \
  "pgbench -S -c 80 -T 5:row_pgbench" "pgbench -C -S -c 16 -T 5:row_pgbench_C" \
  "redis-benchmark -c 100 -n 100000 -t set,get:row_redis" "scp 50 MB:row_scp"; do
  name=${r%:*}
  fn=${r##*:}
  line="| $name"
  for via in direct halfguard haproxy; do
    IFS='|' read -r e t <<<"$($fn $via)"
    line+=" | $e | $t"
    sleep 1
  done
  echo "$line |"
done
