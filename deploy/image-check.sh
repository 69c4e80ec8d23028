#!/usr/bin/env bash
# deploy/image-check.sh: prove the Dockerfile's runtime stage on a machine with no Docker
# engine and no access to image registries.
#
#   sudo bash deploy/image-check.sh          # from the repository root; Linux, as root
#
# What it does, and why each step stands in for what it replaces:
#  1. Builds the release binary with the Dockerfile's own command
#     (`cargo build --release --locked --bin halfguard`); HALFGUARD_BIN=path skips this.
#  2. Builds a stand-in for the runtime base image (distroless cc, which cannot be pulled
#     here) with podman: FROM scratch + exactly the shared libraries `ldd` lists for the
#     binary + /etc/passwd and /etc/group with distroless's nonroot user (65532).
#  3. Builds the image from the Dockerfile's runtime stage, copied VERBATIM, with the
#     stand-in base passed as RUNTIME_IMAGE and the builder stage replaced by a `scratch`
#     stage holding the host-built binary at the same path (/out/halfguard).
#  4. Checks the .dockerignore: builds a `COPY . /ctx/` image from the repository and looks
#     at what reached the build context.
#  5. Mounts the image (`podman image mount`; `podman run` is refused by this machine's
#     rlimits) and starts its ENTRYPOINT + CMD the way a container runtime would: as PID 1
#     of a new PID namespace, in a network namespace this script creates, chrooted into a
#     read-only bind of the image, as the image's USER, with no_new_privs, no capabilities
#     and only the image's environment.
#  6. Passes traffic through it from a second network namespace over a veth pair
#     (198.18.0.0/15 addresses only), to a backend on 127.0.0.1 inside the first one; checks
#     that a silent connection is reset by the first_byte clock, probes /healthz, /readyz and
#     /metrics when the binary serves them, sends SIGHUP (reload; must not kill PID 1), then
#     SIGTERM, and checks the drain (/readyz 503 while still serving) and exit 0.
# Everything it creates (namespaces, mounts, images, processes) is removed on exit, even on
# failure. It prints the image size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '[image-check] %s\n' "$*"; }
fail() { printf '[image-check] FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (podman image mount, network namespaces, chroot)"
for tool in podman ip curl ss setpriv chroot unshare sha256sum; do
  command -v "$tool" >/dev/null || fail "missing $tool (apt-get install podman iproute2 curl)"
done
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3) || fail "missing python3"

# ---- state and cleanup -------------------------------------------------------------
TAG=$$
WORK=$(mktemp -d /tmp/halfguard-image-check.XXXXXX)
BASE_IMG=localhost/halfguard-check/runtime-base:$TAG
IMG=localhost/halfguard-check/halfguard:$TAG
CTX_IMG=localhost/halfguard-check/context:$TAG
NS_SRV=hgic-srv-$TAG
NS_CLI=hgic-cli-$TAG
BACKEND_PID=
RUNNER_PID=
HG_PID=
MOUNTED=()

stop_pid() { # stop_pid PID: SIGTERM, then SIGKILL after 3 s; only our own children.
  local pid=$1 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

descendants() { # descendants PID: its children, grandchildren, ... (parents first)
  local c
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do echo "$c"; descendants "$c"; done
}

cleanup() {
  local rc=$? pid tree
  set +e
  # The runner's tree (unshare, halfguard), deepest first: halfguard does not die with
  # unshare (a parent-death signal does not survive chroot's change of uid).
  if [ -n "$RUNNER_PID" ]; then
    tree=$(descendants "$RUNNER_PID" | tac)
    for pid in $HG_PID $tree; do stop_pid "$pid"; done
    stop_pid "$RUNNER_PID"
  fi
  stop_pid "$BACKEND_PID"
  wait 2>/dev/null
  ip netns del "$NS_CLI" 2>/dev/null
  ip netns del "$NS_SRV" 2>/dev/null
  for img in "${MOUNTED[@]}"; do podman image unmount "$img" >/dev/null 2>&1; done
  podman rmi -f "$CTX_IMG" >/dev/null 2>&1
  if [ -z "${KEEP_IMAGE:-}" ]; then
    podman rmi -f "$IMG" "$BASE_IMG" >/dev/null 2>&1
  else
    say "kept $IMG and its base $BASE_IMG (KEEP_IMAGE set)"
  fi
  rm -rf "$WORK"
  [ $rc = 0 ] || say "failed (exit $rc); namespaces, mounts and images cleaned up"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. the binary -------------------------------------------------------------------
grep -q 'cargo build --release --locked --bin halfguard' Dockerfile \
  || fail "the Dockerfile no longer builds with 'cargo build --release --locked --bin halfguard'; update this script"
if [ -n "${HALFGUARD_BIN:-}" ]; then
  BIN=$HALFGUARD_BIN
  say "using HALFGUARD_BIN=$BIN"
else
  say "cargo build --release --locked --bin halfguard"
  cargo build --release --locked --bin halfguard
  # Where cargo put it: CARGO_TARGET_DIR, a build.target-dir setting, or ./target.
  BIN=$(cargo metadata --format-version 1 --no-deps --locked \
    | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release/halfguard
fi
[ -x "$BIN" ] || fail "no binary at $BIN"

# ---- 2. a stand-in for the runtime base (distroless cc: glibc, libgcc, nonroot) --------
RUNTIME_BASE=$(sed -n 's/^ARG RUNTIME_IMAGE=//p' Dockerfile)
[ -n "$RUNTIME_BASE" ] || fail "the Dockerfile has no 'ARG RUNTIME_IMAGE=...'; update this script"
say "stand-in for $RUNTIME_BASE: scratch + the libraries ldd lists + nonroot user"
R=$WORK/base/rootfs
mkdir -p "$R"/{etc,tmp,proc,sys,dev,home/nonroot,usr/local/bin}
chmod 1777 "$R/tmp"
LIBS=$(ldd "$BIN" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}')
[ -n "$LIBS" ] || fail "ldd lists no libraries for $BIN"
for lib in $LIBS; do
  mkdir -p "$R$(dirname "$lib")"
  cp -L "$lib" "$R$lib"
  say "  + $lib"
done
cat >"$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$R/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
printf 'hosts: files dns\n' >"$R/etc/nsswitch.conf"
printf 'FROM scratch\nCOPY rootfs/ /\n' >"$WORK/base/Containerfile"
podman build -q --pull=never -t "$BASE_IMG" "$WORK/base" >/dev/null

# ---- 3. the Dockerfile's runtime stage, verbatim ---------------------------------------
FIRST_FROM=$(grep -n '^FROM ' Dockerfile | head -1 | cut -d: -f1)
LAST_FROM=$(grep -n '^FROM ' Dockerfile | tail -1 | cut -d: -f1)
sed -n "${LAST_FROM}p" Dockerfile | grep -q ' AS runtime$' \
  || fail "the Dockerfile's last stage is not 'AS runtime'; update this script"
[ "$(sed -n "${LAST_FROM},\$p" Dockerfile | grep -c '^COPY --from=builder /out/halfguard ')" = 1 ] \
  || fail "the runtime stage must take the binary with 'COPY --from=builder /out/halfguard ...'"
CF=$WORK/ctx/Containerfile
mkdir -p "$WORK/ctx"
{
  sed -n "1,$((FIRST_FROM - 1))p" Dockerfile      # the global ARGs
  printf '# image-check: the builder stage, replaced by the host-built binary\n'
  printf 'FROM scratch AS builder\nCOPY halfguard-host-build /out/halfguard\n\n'
  sed -n "${LAST_FROM},\$p" Dockerfile            # the runtime stage, verbatim
} >"$CF"
install -m 0755 "$BIN" "$WORK/ctx/halfguard-host-build"
# The build-context files the runtime stage copies (COPY without --from).
sed -n "${LAST_FROM},\$p" Dockerfile | awk '$1=="COPY" && $2 !~ /^--from/ {
    for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' | while read -r src; do
  [ -e "$src" ] || fail "the runtime stage copies $src, which does not exist"
  mkdir -p "$WORK/ctx/$(dirname "$src")"
  cp -a "$src" "$WORK/ctx/$src"
done
say "podman build: the Dockerfile's runtime stage on the stand-in base"
podman build -q --pull=never --layers=false --build-arg "RUNTIME_IMAGE=$BASE_IMG" -t "$IMG" \
  -f "$CF" "$WORK/ctx" >/dev/null

podman image inspect "$IMG" >"$WORK/inspect.json"
# Entrypoint + Cmd, User, Env, ports, exactly as the image records them.
"$PY" - "$WORK/inspect.json" "$WORK" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))[0]["Config"]
work = sys.argv[2]
argv = (cfg.get("Entrypoint") or []) + (cfg.get("Cmd") or [])
open(f"{work}/argv", "w").write("\0".join(argv))
open(f"{work}/user", "w").write(cfg.get("User") or "")
open(f"{work}/env", "w").write("\0".join(cfg.get("Env") or []))
print("image config: User=%s Entrypoint=%s Cmd=%s ExposedPorts=%s StopSignal=%s" % (
    cfg.get("User"), cfg.get("Entrypoint"), cfg.get("Cmd"),
    sorted((cfg.get("ExposedPorts") or {}).keys()), cfg.get("StopSignal")))
EOF
USER_SPEC=$(cat "$WORK/user")
[[ "$USER_SPEC" =~ ^[0-9]+:[0-9]+$ ]] || fail "image USER is '$USER_SPEC', expected numeric uid:gid"
IMG_UID=${USER_SPEC%%:*}
IMG_GID=${USER_SPEC##*:}
[ "$IMG_UID" != 0 ] || fail "the image runs as root"
mapfile -d '' -t ARGV <"$WORK/argv"
mapfile -d '' -t IMG_ENV <"$WORK/env"
[ ${#IMG_ENV[@]} -gt 0 ] || IMG_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)

bytes_mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1000000 }'; }
IMG_SIZE=$(podman image inspect --format '{{.Size}}' "$IMG")
BASE_SIZE=$(podman image inspect --format '{{.Size}}' "$BASE_IMG")
BIN_SIZE=$(stat -c %s "$BIN")
say "image size: $(bytes_mb "$IMG_SIZE") MB (stand-in base $(bytes_mb "$BASE_SIZE") MB + runtime stage $(bytes_mb $((IMG_SIZE - BASE_SIZE))) MB; binary $(bytes_mb "$BIN_SIZE") MB)"

# ---- 4. the .dockerignore ----------------------------------------------------------------
say "build context as .dockerignore leaves it"
printf 'FROM scratch\nCOPY . /ctx/\n' >"$WORK/Containerfile.ctx"
podman build -q --pull=never -f "$WORK/Containerfile.ctx" -t "$CTX_IMG" "$ROOT" >/dev/null
CTX_MNT=$(podman image mount "$CTX_IMG")
MOUNTED+=("$CTX_IMG")
for p in target .git; do
  [ ! -e "$CTX_MNT/ctx/$p" ] || fail ".dockerignore lets $p into the build context"
done
COPIED_CONFIG=$(sed -n "${LAST_FROM},\$p" Dockerfile | awk '$1=="COPY" && $2 !~ /^--/ {print $2}')
for p in Cargo.toml Cargo.lock src/main.rs $COPIED_CONFIG; do
  [ -e "$CTX_MNT/ctx/$p" ] || fail ".dockerignore keeps $p out of the build context"
done
say "  context: $(du -sh "$CTX_MNT/ctx" | cut -f1), no target/ or .git/, has Cargo.toml Cargo.lock src/ $COPIED_CONFIG"
podman image unmount "$CTX_IMG" >/dev/null
MOUNTED=()

# ---- 5. the image's root filesystem --------------------------------------------------
MNT=$(podman image mount "$IMG")
MOUNTED+=("$IMG")
[ "$(sha256sum <"$MNT${ARGV[0]}")" = "$(sha256sum <"$BIN")" ] \
  || fail "the image's ${ARGV[0]} is not the binary that was built"
CFG_IN_IMAGE=
for ((i = 0; i < ${#ARGV[@]} - 1; i++)); do
  [ "${ARGV[$i]}" = -c ] && CFG_IN_IMAGE=${ARGV[$((i + 1))]}
done
[ -n "$CFG_IN_IMAGE" ] && [ -f "$MNT$CFG_IN_IMAGE" ] || fail "the image's CMD names no config file that exists"

# Ports and timings from the baked config (defaults from config/halfguard.toml).
"$PY" - "$MNT$CFG_IN_IMAGE" config/halfguard.toml >"$WORK/ports" <<'EOF'
import re, sys, tomllib
cfg = tomllib.load(open(sys.argv[1], "rb"))
dflt = tomllib.load(open(sys.argv[2], "rb"))
def get(sec, key):
    return cfg.get(sec, {}).get(key, dflt[sec][key])
def secs(d):
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u]
               for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", d))
l = cfg["listeners"][0]
data = l["bind"].rsplit(":", 1)[1]
bhost, bport = l["backends"][0].rsplit(":", 1)
admin = get("admin", "bind")
aport = "" if admin == "off" else admin.rsplit(":", 1)[1]
fb = secs(l.get("timeouts", {}).get("first_byte", get("timeouts", "first_byte")))
print(data, bhost, bport, aport, fb, secs(get("admin", "drain_delay")), secs(get("timeouts", "drain")))
EOF
read -r DATA_PORT BACKEND_HOST BACKEND_PORT ADMIN_PORT FIRST_BYTE DRAIN_DELAY DRAIN <"$WORK/ports"
[ "$BACKEND_HOST" = 127.0.0.1 ] || fail "the baked config's backend is $BACKEND_HOST, expected loopback (sidecar)"
say "baked config $CFG_IN_IMAGE: data :$DATA_PORT -> $BACKEND_HOST:$BACKEND_PORT, admin :${ADMIN_PORT:-off}, first_byte ${FIRST_BYTE}s, drain_delay ${DRAIN_DELAY}s, drain ${DRAIN}s"

# ---- network namespaces: srv (halfguard + backend) <-veth-> cli ---------------------
ip netns add "$NS_SRV"
ip netns add "$NS_CLI"
ip -n "$NS_SRV" link set lo up
ip -n "$NS_CLI" link set lo up
ip -n "$NS_SRV" link add veth0 type veth peer name veth0 netns "$NS_CLI"
ip -n "$NS_SRV" addr add 198.18.0.2/30 dev veth0
ip -n "$NS_CLI" addr add 198.18.0.1/30 dev veth0
ip -n "$NS_SRV" link set veth0 up
ip -n "$NS_CLI" link set veth0 up
SRV=198.18.0.2

# Runs argv from the image the way a container runtime would (see the header).
MOUNT_SETUP='set -e
r=$1; shift
mount --bind "$IMGROOT" "$r"
mount -o remount,bind,ro "$r"
mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys"
mount -t tmpfs -o nosuid,mode=755,size=64k tmpfs "$r/dev"
for d in null zero random urandom; do touch "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"; done
mount -t tmpfs -o nosuid,nodev,mode=1777,size=1m tmpfs "$r/tmp"
exec "$@"'
in_image() { # in_image ARGV...: runs in $NS_SRV, PID 1 of a new PID namespace.
  mkdir -p "$WORK/root"
  IMGROOT=$MNT ip netns exec "$NS_SRV" unshare --mount --pid --fork --kill-child -- \
    sh -c "$MOUNT_SETUP" sh "$WORK/root" \
    env -i "${IMG_ENV[@]}" setpriv --no-new-privs -- \
    chroot --userspec="$IMG_UID:$IMG_GID" --groups="$IMG_GID" "$WORK/root" "$@"
}

VERSION=$(in_image "${ARGV[0]}" --version) || fail "halfguard --version fails inside the image"
say "inside the image: $VERSION"
in_image "${ARGV[0]}" check -c "$CFG_IN_IMAGE" >"$WORK/check.out" 2>&1 \
  || { cat "$WORK/check.out"; fail "halfguard check fails on the image's own config"; }
say "inside the image: halfguard check -c $CFG_IN_IMAGE -> $(tail -1 "$WORK/check.out")"

# ---- 6. traffic ---------------------------------------------------------------------
mkdir -p "$WORK/www"
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/www/token.txt"
head -c 8388608 /dev/urandom >"$WORK/www/big.bin"
chmod -R a+rX "$WORK"
ip netns exec "$NS_SRV" setpriv --reuid=65534 --regid=65534 --clear-groups -- \
  "$PY" -m http.server "$BACKEND_PORT" --bind 127.0.0.1 --directory "$WORK/www" \
  >"$WORK/backend.log" 2>&1 &
BACKEND_PID=$!

listening() { ip netns exec "$NS_SRV" ss -Hltn "sport = :$1" | grep -q .; }
wait_listen() { # wait_listen PORT WHAT
  local i
  for i in $(seq 100); do
    listening "$1" && return 0
    [ -z "${3:-}" ] || kill -0 "$3" 2>/dev/null || { cat "$WORK/hg.log" >&2; fail "$2 exited"; }
    sleep 0.1
  done
  fail "$2 does not listen on :$1"
}
wait_listen "$BACKEND_PORT" "the backend"

say "start: ${ARGV[*]} (uid $IMG_UID, read-only root, netns $NS_SRV)"
START=$(date +%s.%N)
in_image "${ARGV[@]}" >"$WORK/hg.log" 2>&1 &
RUNNER_PID=$!
wait_listen "$DATA_PORT" "halfguard" "$RUNNER_PID"
# The runner is a subshell -> unshare -> halfguard (sh, env, setpriv and chroot exec'd it).
HG_PID=
for pid in $(descendants "$RUNNER_PID"); do
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = halfguard ] && HG_PID=$pid
done
[ -n "$HG_PID" ] || fail "no halfguard process under the runner"
[ "$(awk '/^NSpid:/{print $NF}' /proc/"$HG_PID"/status)" = 1 ] || fail "halfguard is not PID 1 of its namespace"
NSPID=$(awk '/^NSpid:/{print $NF}' /proc/"$HG_PID"/status)
read -r _ RU EU SU FU < <(grep '^Uid:' /proc/"$HG_PID"/status)
read -r _ RG EG SG FG < <(grep '^Gid:' /proc/"$HG_PID"/status)
CAPS=$(awk '/^CapEff:/{print $2}' /proc/"$HG_PID"/status)
NNP=$(awk '/^NoNewPrivs:/{print $2}' /proc/"$HG_PID"/status)
ROOT_OPTS=$(awk '$5=="/" {print $6}' /proc/"$HG_PID"/mountinfo)
[ "$RU $EU $SU $FU" = "$IMG_UID $IMG_UID $IMG_UID $IMG_UID" ] || fail "uids are $RU $EU $SU $FU"
[ "$RG $EG $SG $FG" = "$IMG_GID $IMG_GID $IMG_GID $IMG_GID" ] || fail "gids are $RG $EG $SG $FG"
[ "$CAPS" = 0000000000000000 ] || fail "effective capabilities $CAPS"
[[ ",$ROOT_OPTS," == *,ro,* ]] || fail "root filesystem is mounted $ROOT_OPTS, not ro"
say "halfguard runs as uid $RU gid $RG, PID $NSPID in its PID namespace, CapEff $CAPS, NoNewPrivs $NNP, root $ROOT_OPTS"

cli() { ip netns exec "$NS_CLI" "$@"; }

# A silent client: the first_byte clock must reset it. Started first, checked last.
cli "$PY" - "$SRV" "$DATA_PORT" >"$WORK/silent.out" 2>&1 <<'EOF' &
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.settimeout(60)
t = time.monotonic()
try:
    data = s.recv(1)
    print(f"closed {time.monotonic() - t:.1f} data={data!r}")
except ConnectionResetError:
    print(f"reset {time.monotonic() - t:.1f}")
EOF
SILENT_PID=$!

GOT=$(cli curl -sS --max-time 10 "http://$SRV:$DATA_PORT/token.txt") || fail "GET through halfguard failed"
[ "$GOT" = "$(cat "$WORK/www/token.txt")" ] || fail "GET through halfguard returned '$GOT'"
say "GET /token.txt from 198.18.0.1 through halfguard: token matches"
SUM=$(cli curl -sS --max-time 30 "http://$SRV:$DATA_PORT/big.bin" | sha256sum)
[ "$SUM" = "$(sha256sum <"$WORK/www/big.bin")" ] || fail "8 MiB download through halfguard differs"
say "GET /big.bin (8 MiB) through halfguard: sha256 matches"
URLS=()
for i in $(seq 20); do URLS+=(-o /dev/null "http://$SRV:$DATA_PORT/token.txt?$i"); done
CODES=$(cli curl -sS --no-progress-meter --max-time 20 --parallel --parallel-max 10 -w '%{http_code}\n' "${URLS[@]}" 2>"$WORK/parallel.err" | sort | uniq -c | tr -s ' ')
[ "$CODES" = " 20 200" ] || fail "20 parallel GETs: $CODES"
say "20 parallel GETs through halfguard: all 200"

ADMIN=0
if [ -n "$ADMIN_PORT" ] && listening "$ADMIN_PORT"; then
  ADMIN=1
  for path in /healthz /readyz /metrics; do
    code=$(cli curl -s -o "$WORK/admin.out" -w '%{http_code}' --max-time 5 "http://$SRV:$ADMIN_PORT$path") || true
    [ "$code" = 200 ] || fail "GET $path on the admin port from outside the pod: HTTP $code"
  done
  say "admin :$ADMIN_PORT from 198.18.0.1: /healthz, /readyz and /metrics answer 200 ($(grep -c '^halfguard' "$WORK/admin.out" || true) halfguard metric lines)"
  # Steering is private: without a token, what reveals clients or reloads is loopback-only.
  for req in "GET /sources" "GET /config" "POST /reload"; do
    code=$(cli curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X "${req% *}" "http://$SRV:$ADMIN_PORT${req#* }") || true
    [ "$code" = 403 ] || fail "$req on the admin port from outside the pod: HTTP $code, expected 403"
  done
  say "admin :$ADMIN_PORT from 198.18.0.1: /sources, /config and POST /reload answer 403 (no token set)"
else
  say "SKIP admin checks: nothing listens on :${ADMIN_PORT:-off} (this build has no admin server yet)"
fi

# SIGHUP: a live reload of the same file; it must never kill PID 1.
kill -HUP "$HG_PID"
sleep 0.5
kill -0 "$HG_PID" 2>/dev/null || { cat "$WORK/hg.log" >&2; fail "halfguard died on SIGHUP"; }
GOT=$(cli curl -sS --max-time 5 "http://$SRV:$DATA_PORT/token.txt") || fail "no traffic after SIGHUP"
if grep -q 'config reloaded' "$WORK/hg.log"; then
  say "SIGHUP: config reloaded, still serving"
else
  say "SIGHUP: still running and serving (no 'config reloaded' in the log: no live reload in this build)"
fi

wait "$SILENT_PID" || true
SILENT=$(cat "$WORK/silent.out")
read -r how secs_ <<<"$SILENT"
[ "$how" = reset ] || fail "a silent connection was not reset: $SILENT"
awk -v s="$secs_" -v fb="$FIRST_BYTE" 'BEGIN { exit !(s >= fb - 0.5 && s <= fb + 3) }' \
  || fail "a silent connection was reset after ${secs_}s, first_byte is ${FIRST_BYTE}s"
say "a silent connection was reset (RST) after ${secs_}s (first_byte ${FIRST_BYTE}s)"

# ---- SIGTERM: readiness off, drain, exit 0 ------------------------------------------
say "SIGTERM to halfguard (PID 1 in its namespace)"
T0=$(date +%s.%N)
kill -TERM "$HG_PID"
if [ "$ADMIN" = 1 ] && awk -v d="$DRAIN_DELAY" 'BEGIN { exit !(d >= 1) }'; then
  code=
  for i in $(seq 20); do
    code=$(cli curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://$SRV:$ADMIN_PORT/readyz") || true
    [ "$code" != 200 ] && break
    sleep 0.05
  done
  [ "$code" != 200 ] || fail "/readyz still answers 200 after SIGTERM"
  GOT=$(cli curl -sS --max-time 5 "http://$SRV:$DATA_PORT/token.txt") \
    || fail "during drain_delay the data port must still serve"
  say "during drain_delay: /readyz answers ${code:-no response}, the data port still serves"
fi
LIMIT=$(awk -v a="$DRAIN_DELAY" -v b="$DRAIN" 'BEGIN { print int(a + b + 5) }')
RC=
for i in $(seq $((LIMIT * 10))); do
  if ! kill -0 "$RUNNER_PID" 2>/dev/null; then
    set +e; wait "$RUNNER_PID"; RC=$?; set -e
    break
  fi
  sleep 0.1
done
RUNNER_PID=
HG_PID=
[ -n "$RC" ] || fail "halfguard did not exit within drain_delay + drain + 5s (${LIMIT}s)"
STOP=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
[ "$RC" = 0 ] || { cat "$WORK/hg.log" >&2; fail "halfguard exited $RC after SIGTERM"; }
grep -q 'no longer accepting' "$WORK/hg.log" || fail "no 'no longer accepting' in the log"
say "halfguard exited 0, ${STOP}s after SIGTERM"

stop_pid "$BACKEND_PID"
BACKEND_PID=
say "PASS: image $(bytes_mb "$IMG_SIZE") MB; traffic from 198.18.0.1 -> :$DATA_PORT -> 127.0.0.1:$BACKEND_PORT; uid $IMG_UID; admin checks $([ "$ADMIN" = 1 ] && echo ran || echo skipped)"
