#!/usr/bin/env bash
# Isolation under flood (issue 12): tenant B's latency and errors while
# tenant A sends 10x its rate limit, in alternating rounds of one run.
# The servers (backend and both nodes, one process) are pinned to CPU 0,
# the load (A's and B's, one thread) to CPU 1, as in bench/e2e.sh, so the
# flood's client side does not run on the nodes' core. Bounded: about
# 2 x rounds x secs seconds (48 s by default).
# Usage: bench/flood.sh [extra flags, e.g. --rounds 10 --quiet-x 0]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p dmsc-bench
BIN="${CARGO_TARGET_DIR:-target}/release/dmsc-bench"
PIN0=""; PIN1=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN0="taskset -c 0"; PIN1="taskset -c 1"; fi
coproc SERVE { RUST_LOG=error $PIN0 "$BIN" flood-serve "$@"; }
read -r ADDRS <&"${SERVE[0]}"
echo "servers: $ADDRS (pinned: ${PIN0:-no})" >&2
$PIN1 "$BIN" flood-load --addrs "$ADDRS" "$@"
# Closing its stdin stops the servers, which report the audit log.
exec {SERVE[1]}>&-
cat <&"${SERVE[0]}"
wait "${SERVE_PID:-}" 2>/dev/null || true
