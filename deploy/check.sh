#!/usr/bin/env bash
# deploy/check.sh: the CI check for everything under deploy/, the Dockerfile and config/.
#
#   bash deploy/check.sh        # from the repository root, as root, on Debian/Ubuntu
#
# 1. `halfguard check` on every TOML under config/ and deploy/ (and a bad config must fail).
# 2. deploy/check-manifests.py: the Dockerfile, Kubernetes manifests, compose file and systemd
#    unit parse and agree with the configs they carry (ports, config path, probes on
#    /healthz and /readyz at the admin port, security settings, shutdown timings), and the
#    ConfigMap's TOML passes `halfguard check`. A few deliberate mistakes must be caught.
# 3. systemd-analyze verify and security --offline on the unit.
# 4. The sysctl file, applied inside a throwaway network namespace (never to the host).
# 5. deploy/image-check.sh: builds the image's runtime stage with podman and passes traffic
#    through it (SKIP_IMAGE_CHECK=1 skips it).
#
# HALFGUARD_BIN=path uses that binary instead of `cargo build --release --locked`; the build
# goes where cargo puts it (CARGO_TARGET_DIR or build.target-dir are honoured).
# Installs what it needs with apt-get. Exits non-zero if anything disagrees.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '[deploy-check] %s\n' "$*"; }
FAILED=()
failed() { printf '[deploy-check] FAIL: %s\n' "$*" >&2; FAILED+=("$*"); }

# The checks look at the files alone, not at overrides from this environment.
for v in $(compgen -e); do
  case $v in HALFGUARD_BIN) ;; HALFGUARD*) unset "$v" ;; esac
done

# ---- tools ---------------------------------------------------------------------------
PY=/usr/bin/python3
need=()
[ -x "$PY" ] || need+=(python3)
{ [ -x "$PY" ] && "$PY" -c 'import yaml' 2>/dev/null; } || need+=(python3-yaml)
command -v ip >/dev/null && command -v ss >/dev/null || need+=(iproute2)
command -v systemd-analyze >/dev/null || need+=(systemd)
[ -x /bin/kill ] || need+=(procps)   # the unit's ExecReload; verify checks it exists
if [ -z "${SKIP_IMAGE_CHECK:-}" ]; then
  command -v podman >/dev/null || need+=(podman)
  command -v curl >/dev/null || need+=(curl)
fi
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || { echo "missing: ${need[*]} (and no apt-get)" >&2; exit 1; }
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
"$PY" -c 'import tomllib, yaml' || { echo "$PY needs tomllib (3.11+) and PyYAML" >&2; exit 1; }

# ---- the binary ------------------------------------------------------------------------
if [ -n "${HALFGUARD_BIN:-}" ]; then
  BIN=$(readlink -f "$HALFGUARD_BIN")
else
  say "cargo build --release --locked --bin halfguard"
  cargo build --release --locked --bin halfguard
  # Where cargo put it: CARGO_TARGET_DIR, a build.target-dir setting, or ./target.
  TARGET_DIR=$(cargo metadata --format-version 1 --no-deps --locked \
    | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  BIN=$TARGET_DIR/release/halfguard
fi
[ -x "$BIN" ] || { echo "no halfguard binary at $BIN" >&2; exit 1; }
say "binary: $BIN ($("$BIN" --version))"

# ---- 1. every TOML passes `halfguard check` ---------------------------------------------
say "1. halfguard check on every TOML under config/ and deploy/"
n=0
while IFS= read -r -d '' f; do
  n=$((n + 1))
  if out=$("$BIN" check -c "$f" 2>&1); then
    say "  ok   $f"
  else
    printf '%s\n' "$out" >&2
    failed "halfguard check -c $f"
  fi
done < <(find config deploy -name '*.toml' -print0 | sort -z)
[ "$n" -gt 0 ] || failed "no TOML found under config/ or deploy/"
set +e
HALFGUARD__LIMITS__MAX_CONNS=0 "$BIN" check -c config/halfguard.toml >/dev/null 2>&1
rc=$?
set -e
[ "$rc" = 2 ] || failed "halfguard check accepts a bad config (exit $rc, expected 2)"

# ---- 2. manifests agree with their configs -----------------------------------------------
say "2. Dockerfile, Kubernetes, compose and systemd agree with their configs"
"$PY" deploy/check-manifests.py --bin "$BIN" --root "$ROOT" || failed "deploy/check-manifests.py"

say "   the checker catches deliberate mistakes"
MUT=$(mktemp -d /tmp/halfguard-deploy-check.XXXXXX)
trap 'rm -rf "$MUT" || true' EXIT
mutate() { # mutate FILE SED-EXPR WHAT
  rm -rf "$MUT/r" && mkdir -p "$MUT/r"
  cp -r Dockerfile .dockerignore config deploy "$MUT/r/"
  sed -i "$2" "$MUT/r/$1"
  cmp -s "$1" "$MUT/r/$1" && { failed "mutation '$3' changed nothing in $1"; return; }
  if "$PY" deploy/check-manifests.py --bin "$BIN" --root "$MUT/r" >"$MUT/out" 2>&1; then
    failed "check-manifests.py missed: $3"
  else
    say "  caught: $3"
  fi
}
mutate deploy/kubernetes/deployment.yaml 's#path: /readyz#path: /ready#' "readiness probe on /ready"
mutate deploy/kubernetes/deployment.yaml 's#terminationGracePeriodSeconds: 50#terminationGracePeriodSeconds: 30#' "grace period shorter than the drain"
mutate deploy/kubernetes/configmap.yaml 's#0.0.0.0:9901#127.0.0.1:9901#' "admin on loopback in the pod"
mutate deploy/kubernetes/service.yaml 's#targetPort: public#targetPort: admin#' "Service exposing the admin port"
mutate deploy/compose/compose.yaml 's#"127.0.0.1:9901:9901"#"9901:9901"#' "compose publishing the admin port to the world"
mutate deploy/systemd/halfguard.service 's#^TimeoutStopSec=.*#TimeoutStopSec=20s#' "TimeoutStopSec shorter than the drain"
mutate Dockerfile 's#^EXPOSE .*#EXPOSE 8080/tcp#' "EXPOSE without the admin port"

# ---- 3. systemd-analyze -------------------------------------------------------------------
say "3. systemd-analyze verify and security on deploy/systemd/halfguard.service"
# verify insists the binaries exist: point the copy at the one just built.
sed "s#/usr/local/bin/halfguard#$BIN#g" deploy/systemd/halfguard.service >"$MUT/halfguard.service"
if out=$(systemd-analyze verify --man=no "$MUT/halfguard.service" 2>&1) && [ -z "$out" ]; then
  say "  verify: clean"
else
  printf '%s\n' "$out" >&2
  failed "systemd-analyze verify deploy/systemd/halfguard.service"
fi
if out=$(systemd-analyze security --offline=true --threshold=20 "$MUT/halfguard.service" 2>&1); then
  say "  security: $(printf '%s\n' "$out" | grep -o 'Overall exposure level.*' | sed 's/ for [^:]*:/:/')"
else
  printf '%s\n' "$out" | grep -E '^✗|Overall' >&2 || true
  failed "systemd-analyze security: exposure above 2.0"
fi

# ---- 4. the sysctl file, in a throwaway network namespace ----------------------------------
say "4. deploy/sysctl/90-halfguard.conf in a throwaway network namespace"
if [ "$(id -u)" != 0 ]; then
  failed "the sysctl check needs root (ip netns add)"
else
  NS=hgcheck-sysctl-$$
  ip netns add "$NS"
  trap 'set +e; ip netns del "$NS" 2>/dev/null; rm -rf "$MUT"; true' EXIT
  while IFS= read -r line; do
    line=${line%%#*}
    [[ "$line" =~ [^[:space:]] ]] || continue
    optional=0
    line=$(printf '%s' "$line" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
    [[ "$line" == -* ]] && { optional=1; line=${line#-}; }
    key=$(printf '%s' "${line%%=*}" | tr -d '[:space:]')
    want=$(printf '%s' "${line#*=}" | sed 's/^[[:space:]]*//' | tr -s ' \t' ' ')
    path=/proc/sys/${key//.//}
    if ! ip netns exec "$NS" test -e "$path"; then
      if [ "$optional" = 1 ]; then say "  skip $key: not on this kernel (module not loaded)"; continue; fi
      failed "sysctl $key does not exist"; continue
    fi
    host_before=$(cat "$path" 2>/dev/null || true)
    if ! ip netns exec "$NS" sh -c 'printf "%s\n" "$2" > "$1"' sh "$path" "$want" 2>/dev/null; then
      if [ "$optional" = 1 ] && ! ip netns exec "$NS" test -w "$path"; then
        say "  skip $key: host-wide, only settable in the initial namespace"; continue
      fi
      failed "sysctl $key refuses $want"; continue
    fi
    got=$(ip netns exec "$NS" cat "$path" | tr -s ' \t' ' ')
    host_after=$(cat "$path" 2>/dev/null || true)
    if [ "$host_after" != "$host_before" ]; then
      printf '%s\n' "$host_before" >"$path" || true
      failed "sysctl $key is not per network namespace: this check must not set it (restored)"
      continue
    fi
    [ "$got" = "$want" ] && say "  ok   $key = $want" || failed "sysctl $key reads back '$got', wanted '$want'"
  done <deploy/sysctl/90-halfguard.conf
  ip netns del "$NS"
fi

# ---- 5. the image ------------------------------------------------------------------------
if [ -n "${SKIP_IMAGE_CHECK:-}" ]; then
  say "5. SKIP deploy/image-check.sh (SKIP_IMAGE_CHECK set)"
else
  say "5. deploy/image-check.sh"
  HALFGUARD_BIN=$BIN timeout 240 bash deploy/image-check.sh || failed "deploy/image-check.sh"
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  say "${#FAILED[@]} failure(s):"
  printf '  - %s\n' "${FAILED[@]}" >&2
  exit 1
fi
say "all deployment checks passed"
exit 0
