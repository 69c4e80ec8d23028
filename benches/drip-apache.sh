#!/usr/bin/env bash
# The many-source slow drip against a thread-per-request backend: Apache httpd 2.4 with 64
# worker threads (mpm_worker, mod_reqtimeout as Debian ships it), alone and behind each front
# in turn: halfguard with its shipped defaults (config/halfguard.toml, changed only in bind,
# backends and the admin port), the same with `servers[].max_conns = 64`, HAProxy `mode tcp`,
# HAProxy `mode http` (http-buffer-request, timeout http-request 10s), nginx `stream` and
# nginx `http` proxy (client_header_timeout 10s). The question: does a dripper ever hold one
# of Apache's workers, and does a legit client still get served?
#
#   bash benches/drip-apache.sh
#   DRIP_WARMUP=2 DRIP_LEGIT_SECS=6 DRIP_FRONTS=none,halfguard bash benches/drip-apache.sh
#
# Per front: 200 sources (127.0.1.1-200) x 20 connections, each a request line and then a
# header one byte every 2 s, reopened when cut (benches/loadgen.rs `attack --kind drip`);
# after a warm-up, a legit client on 127.0.0.3 in a closed loop for 25 s (connect, GET /,
# read the whole answer, close: `loadgen http --closed`); meanwhile, once a second, Apache's
# scoreboard (server-status on its own port), the connections Apache holds and for how long
# (ss), and halfguard's /metrics (benches/drip-apache.py). Prints one Markdown table; every
# file of the run (configs, logs, JSON) stays in the temp dir it names.
#
# Environment (defaults are the issue's): DRIP_WARMUP (5 s), DRIP_LEGIT_SECS (25 s),
# DRIP_SOURCES (200), DRIP_PER_SOURCE (20), DRIP_EVERY_MS (2000), DRIP_RATE (new drip
# connections a second, 1000), DRIP_LEGIT_TIMEOUT_MS (5000), DRIP_FRONTS (all, in the order
# above: none,halfguard,halfguard-cap,haproxy-tcp,haproxy-http,nginx-stream,nginx-http).
# About 5 minutes with the defaults. Installs apache2, haproxy and nginx (with its stream
# module) with apt-get when missing, without starting their services. Loopback only, ports
# 17400-17499; every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

warmup=${DRIP_WARMUP:-5}
legit_secs=${DRIP_LEGIT_SECS:-25}
sources=${DRIP_SOURCES:-200}
per_source=${DRIP_PER_SOURCE:-20}
every_ms=${DRIP_EVERY_MS:-2000}
rate=${DRIP_RATE:-1000}
legit_timeout_ms=${DRIP_LEGIT_TIMEOUT_MS:-5000}
fronts=${DRIP_FRONTS:-none,halfguard,halfguard-cap,haproxy-tcp,haproxy-http,nginx-stream,nginx-http}
workers=64
# Ports: Apache, its status, and one per front (halfguard's admin beside it).
apache_port=17401
status_port=17402
declare -A port=([none]=$apache_port [halfguard]=17410 [halfguard-cap]=17411
  [haproxy-tcp]=17420 [haproxy-http]=17421 [nginx-stream]=17430 [nginx-http]=17431)
declare -A admin=([halfguard]=17490 [halfguard-cap]=17491)
declare -A label=([none]="Apache alone"
  [halfguard]="halfguard, shipped defaults"
  [halfguard-cap]="halfguard, shipped defaults + servers max_conns = $workers"
  [haproxy-tcp]="HAProxy mode tcp"
  [haproxy-http]="HAProxy mode http, http-buffer-request, timeout http-request 10s"
  [nginx-stream]="nginx stream"
  [nginx-http]="nginx http proxy, client_header_timeout 10s")
for f in ${fronts//,/ }; do
  [ -n "${port[$f]:-}" ] || { echo "drip-apache: unknown front $f" >&2; exit 2; }
done
[ $((warmup + legit_secs)) -le 110 ] || { echo "drip-apache: warm-up + legit at most 110 s" >&2; exit 2; }

apache2_bin=$(command -v apache2 || echo /usr/sbin/apache2)
need=()
[ -x "$apache2_bin" ] || need+=(apache2)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing: ${need[*]}" >&2
  sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  # Keep the packages' own services (Apache and nginx on port 80 of every address) from
  # starting while they install, unless a policy is already in place.
  policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | sudo_ tee /usr/sbin/policy-rc.d >/dev/null
    sudo_ chmod +x /usr/sbin/policy-rc.d
    policy=1
  fi
  sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ -z "$policy" ] || sudo_ rm -f /usr/sbin/policy-rc.d
  apache2_bin=$(command -v apache2 || echo /usr/sbin/apache2)
fi

echo "== building halfguard and benches/loadgen.rs (release)" >&2
source benches/common.sh
ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d /tmp/drip-apache.XXXXXX)
# Apache's children run as www-data and read the static index from here.
chmod 755 "$work"
mkdir -p "$work/apache/www" "$work/apache/run" "$work/nginx-stream" "$work/nginx-http"
echo "hello from apache" >"$work/apache/www/index.html"
echo "== run dir: $work" >&2

# Apache: Debian's apache2.conf, mpm_worker.conf and reqtimeout.conf where they speak, sized
# to 64 threads in one process.
mods=/usr/lib/apache2/modules
cat >"$work/apache/apache.conf" <<EOF
ServerRoot "$work/apache"
ServerName localhost
DefaultRuntimeDir "$work/apache/run"
PidFile "$work/apache/run/apache2.pid"
Mutex file:$work/apache/run default
ErrorLog "$work/apache/error.log"
LogLevel warn
User www-data
Group www-data
LoadModule mpm_worker_module $mods/mod_mpm_worker.so
LoadModule authz_core_module $mods/mod_authz_core.so
LoadModule authz_host_module $mods/mod_authz_host.so
LoadModule reqtimeout_module $mods/mod_reqtimeout.so
LoadModule status_module $mods/mod_status.so
LoadModule dir_module $mods/mod_dir.so
Listen 127.0.0.1:$apache_port
Listen 127.0.0.1:$status_port

# mpm_worker: one process of $workers threads ($workers workers in all).
StartServers 1
ServerLimit 1
ThreadLimit $workers
ThreadsPerChild $workers
MaxRequestWorkers $workers
MinSpareThreads 25
MaxSpareThreads 75
MaxConnectionsPerChild 0

# apache2.conf as Debian ships it.
Timeout 300
KeepAlive On
MaxKeepAliveRequests 100
KeepAliveTimeout 5

# reqtimeout.conf as Debian ships it.
RequestReadTimeout header=20-40,minrate=500
RequestReadTimeout body=10,minrate=500

# Status, duration (µs) and client of every request: a dripper that held a worker until
# mod_reqtimeout cut it shows as a 408.
LogFormat "%>s %D %a" short
CustomLog "$work/apache/access.log" short

ExtendedStatus On
DocumentRoot "$work/apache/www"
DirectoryIndex index.html
<Directory />
    Require all denied
</Directory>
<Directory "$work/apache/www">
    Require all granted
</Directory>
<VirtualHost 127.0.0.1:$status_port>
    <Location /server-status>
        SetHandler server-status
        Require ip 127.0.0.0/8
    </Location>
</VirtualHost>
EOF

# halfguard: config/halfguard.toml, changed only in bind, backends and the admin port.
hg_conf() { # NAME PORT ADMIN
  sed -e "s|^bind = \"0.0.0.0:18080\"|bind = \"127.0.0.1:$2\"|" \
    -e "s|^backends = \[\"127.0.0.1:18081\"\]|backends = [\"127.0.0.1:$apache_port\"]|" \
    -e "s|^bind = \"127.0.0.1:9901\"|bind = \"127.0.0.1:$3\"|" config/halfguard.toml >"$work/$1.toml"
  [ "$(grep -c "127.0.0.1:$2\"\|127.0.0.1:$3\"\|127.0.0.1:$apache_port\"" "$work/$1.toml")" = 3 ] ||
    { echo "drip-apache: config/halfguard.toml changed shape; fix hg_conf" >&2; exit 1; }
}
hg_conf halfguard "${port[halfguard]}" "${admin[halfguard]}"
hg_conf halfguard-cap "${port[halfguard-cap]}" "${admin[halfguard-cap]}"
# ... plus, in the second, the one knob the issue allows: a cap per server.
sed -i "s|^backends = \[\"127.0.0.1:$apache_port\"\]|backend = \"apache\"|" "$work/halfguard-cap.toml"
cat >>"$work/halfguard-cap.toml" <<EOF

[[backends]]
name = "apache"
servers = [{ addr = "127.0.0.1:$apache_port", max_conns = $workers }]
EOF

haproxy_conf() { # NAME MODE PORT EXTRA
  cat >"$work/$1.cfg" <<EOF
global
    nbthread 2
    maxconn 9000

defaults
    mode $2
    timeout connect 3s
    timeout client 30s
    timeout server 30s
$4
frontend fe
    bind 127.0.0.1:$3 backlog 4096
    maxconn 9000
    default_backend apache

backend apache
    server apache 127.0.0.1:$apache_port
EOF
}
haproxy_conf haproxy-tcp tcp "${port[haproxy-tcp]}" ""
haproxy_conf haproxy-http http "${port[haproxy-http]}" "    option http-buffer-request
    timeout http-request 10s"

nginx_conf() { # NAME BLOCK
  cat >"$work/$1.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
user root;
worker_processes 2;
worker_rlimit_nofile 20000;
pid nginx.pid;
error_log error.log warn;
events {
    worker_connections 19000;
}
$2
EOF
}
nginx_conf nginx-stream "stream {
    server {
        listen 127.0.0.1:${port[nginx-stream]} backlog=4096;
        proxy_pass 127.0.0.1:$apache_port;
        proxy_connect_timeout 3s;
    }
}"
nginx_conf nginx-http "http {
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {
        listen 127.0.0.1:${port[nginx-http]} backlog=4096;
        client_header_timeout 10s;
        location / {
            proxy_pass http://127.0.0.1:$apache_port;
            proxy_connect_timeout 3s;
        }
    }
}"
mkdir -p "$work/nginx-http/tmp"

ports_free $apache_port $status_port "${port[@]}" "${admin[@]}"
"$apache2_bin" -f "$work/apache/apache.conf" -DFOREGROUND >"$work/apache/stderr.log" 2>&1 &
pids+=($!)
apache=$!
ports_listening $apache_port $status_port
kill -0 "$apache" 2>/dev/null && ss -Htln "sport = :$status_port" | grep -q . ||
  { echo "drip-apache: Apache did not start:" >&2; cat "$work/apache/stderr.log" >&2; exit 1; }
python3 benches/drip-apache.py settle --port $apache_port --status-port $status_port --secs 10

conns=$((sources * per_source))
{
  echo "drip=$sources sources x $per_source = $conns connections, a byte every $every_ms ms, at most $rate new a second; legit 127.0.0.3 closed loop ${legit_secs} s after ${warmup} s, timeout ${legit_timeout_ms} ms"
  echo "versions=$("$apache2_bin" -v | head -1 | sed 's/Server version: //'); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1 | sed 's/nginx version: //'); $("$HG" --version) $(git describe --always --dirty); $(nproc) CPUs"
} >"$work/meta"
: >"$work/fronts"
: >"$work/labels"

for f in ${fronts//,/ }; do
  p=${port[$f]}
  a=${admin[$f]:-}
  front=
  case $f in
    halfguard*)
      "$HG" run -c "$work/$f.toml" >"$work/$f.log" 2>&1 &
      front=$! ;;
    haproxy-*)
      haproxy -db -f "$work/$f.cfg" >"$work/$f.log" 2>&1 &
      front=$! ;;
    nginx-*)
      nginx -p "$work/$f/" -c "$work/$f.conf" -e stderr >"$work/$f.log" 2>&1 &
      front=$! ;;
  esac
  [ -z "$front" ] || pids+=("$front")
  ports_listening "$p" ${a:+"$a"}
  sleep 0.5
  echo "== $f: drip on 127.0.0.1:$p (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  log_before=$(wc -l <"$work/apache/access.log")
  python3 benches/drip-apache.py sample --out "$work/$f.sample.json" \
    --secs $((warmup + legit_secs)) --port $apache_port --status-port $status_port \
    --workers "$workers" ${a:+--admin "$a"} &
  sampler=$!
  pids+=($sampler)
  "$LOADGEN" attack --kind drip --target "127.0.0.1:$p" --sources "$sources" --conns "$conns" \
    --rate "$rate" --every "$every_ms" --secs $((warmup + legit_secs + 1)) >"$work/$f.attack.out" 2>&1 &
  attacker=$!
  pids+=($attacker)
  sleep "$warmup"
  "$LOADGEN" http --closed --target "127.0.0.1:$p" --src 127.0.0.3 --path / \
    --timeout-ms "$legit_timeout_ms" --secs "$legit_secs" >"$work/$f.legit.out" 2>&1 || true
  log_mid=$(wc -l <"$work/apache/access.log")
  wait "$sampler" || true
  wait "$attacker" || true
  if [ -n "$front" ]; then
    kill "$front" 2>/dev/null || true
    wait "$front" || true
  fi
  python3 benches/drip-apache.py settle --port $apache_port --status-port $status_port
  # Apache's answers by status: while the legit client ran, and after (the drippers' last
  # second, their close and the front's stop).
  sed -n "$((log_before + 1)),${log_mid}p" "$work/apache/access.log" | awk '{print $1}' |
    sort | uniq -c | sort -rn >"$work/$f.logstatus"
  tail -n +$((log_mid + 1)) "$work/apache/access.log" | awk '{print $1}' | sort | uniq -c |
    sort -rn >"$work/$f.logstatus-after"
  echo "   legit: $(tail -1 "$work/$f.legit.out" | cut -c1-300)" >&2
  echo "$f" >>"$work/fronts"
  printf '%s\t%s\n' "$f" "${label[$f]}" >>"$work/labels"
done

python3 benches/drip-apache.py table "$work" | tee "$work/table.md"
echo "(run dir: $work)"
