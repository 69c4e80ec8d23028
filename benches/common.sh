# Sourced by the measurement scripts: builds halfguard and loadgen in release, sets $HG and
# $LOADGEN, and stops every PID pushed onto `pids` when the script exits.
cargo build --release --bin halfguard --bench loadgen >/dev/null 2>&1
HG=target/release/halfguard
LOADGEN=$(ls -t target/release/deps/loadgen-* | grep -v '\.d$' | head -1)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
