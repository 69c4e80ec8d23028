#!/usr/bin/env bash
# halfguard side by side with HAProxy and nginx, on loopback: one command from a clean clone
# on Debian.
#
#   bash benches/compare/run.sh [--reps N] [--only bulk,rate,memory,attack,kmem,drip,busy]
#       [--attack-secs S] [--cgroup] [--drip-every MS,MS] [--busy-secs S] [--proxies halfguard,...] [--cluster]
#
# Installs what is missing (haproxy, nginx with the stream module, iperf3, wrk, iproute2,
# python3) with apt-get, builds halfguard and the load generator (benches/loadgen.rs) in
# release, writes the peers' configs into benches/peers/, runs every workload against each
# proxy in turn and prints one table; the JSON goes to benches/compare/results.json.
# About 23 minutes on 2 cores. Loopback only (127.0.0.1-3 and 127.0.1.1-200), ports
# 17000-17299.
set -euo pipefail
cd "$(dirname "$0")/../.."

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  # Keep the packages' own services from starting (nginx would take port 80) while they
  # install, unless a policy is already in place.
  policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | sudo_ tee /usr/sbin/policy-rc.d >/dev/null
    sudo_ chmod +x /usr/sbin/policy-rc.d
    policy=1
  fi
  sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ -z "$policy" ] || sudo_ rm -f /usr/sbin/policy-rc.d
fi

echo "== building halfguard and benches/loadgen.rs (release)" >&2
# loadgen in a target directory of its own: a bench target builds the package's binaries
# too, with the dev-dependencies' features (tokio's test-util, whose clock takes a lock at
# every reading), and would leave that halfguard in target/release.
cargo build --release --bin halfguard >&2
loadgen=$(CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/loadgen cargo build --release --bench loadgen --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    j = json.loads(l)
    if j.get("reason") == "compiler-artifact" and j["target"]["name"] == "loadgen" and j.get("executable"):
        print(j["executable"])')
target_dir=${CARGO_TARGET_DIR:-target}
[ -x "$loadgen" ] || { echo "compare: no loadgen binary" >&2; exit 1; }

# Everything runs with the hard open-files limit (20000 here): 2 descriptors per proxied
# connection.
ulimit -n "$(ulimit -Hn)"
exec python3 benches/compare/compare.py --halfguard "$target_dir/release/halfguard" \
  --loadgen "$loadgen" "$@"
