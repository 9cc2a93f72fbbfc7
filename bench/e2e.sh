#!/usr/bin/env bash
# End-to-end overhead on loopback, side by side in one run:
#   direct client -> backend  vs  client -> node ingress -> backend (local agent)
#   vs  client -> node b ingress -> QUIC (mutual TLS 1.3) -> node a -> backend.
# Servers (backend and both nodes, one process) are pinned to CPU 0 and get
# one tokio worker; the load generator is pinned to CPU 1. Bounded: about
# (rates x paths x secs + paths x secs) x rounds seconds.
# Usage: bench/e2e.sh [extra e2e-load flags, e.g. --rates 500,2000 --secs 5 --rounds 2]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p dmsc-bench
BIN="${CARGO_TARGET_DIR:-target}/release/dmsc-bench"
PIN0=""; PIN1=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN0="taskset -c 0"; PIN1="taskset -c 1"; fi
coproc SERVE { RUST_LOG=error $PIN0 "$BIN" e2e-serve; }
read -r ADDRS <&"${SERVE[0]}"
echo "servers: $ADDRS (pinned: ${PIN0:-no})" >&2
$PIN1 "$BIN" e2e-load --addrs "$ADDRS" "$@"
exec {SERVE[1]}>&-
wait "$SERVE_PID" 2>/dev/null || true
