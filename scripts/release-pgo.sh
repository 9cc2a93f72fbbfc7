#!/usr/bin/env bash
# The release build of dmsc-node with profile-guided optimization (PGO):
# the build for production and for the speed comparison in BENCHMARKS.md.
#
# 1. Builds dmsc-node instrumented (-Cprofile-generate).
# 2. Runs it on a training workload that stands for a node's ordinary day:
#    - `dmsc-node demo` (three nodes in one process: A2A JSON-RPC in both
#      dialects, REST, intent, mTLS and join tokens, revocation, refusals);
#    - two nodes as separate processes, home node and ingress node, and a
#      backend agent; delegations through the plain ingress and the mTLS
#      ingress (a caller certificate enrolled with a join token): POST
#      bodies of 1 KiB and 16 KiB, A2A `message/send` JSON-RPC, GET, a
#      chunked upload, unknown agents (404) - keep-alive connections, as
#      agents hold them.
# 3. Merges the profile (llvm-profdata of rustc's LLVM version) and builds
#    dmsc-node again with it (-Cprofile-use).
#
# The code is the same as `cargo build --release`'s; the compiler lays it
# out and inlines it by what the training ran most. Measured in
# BENCHMARKS.md (session 38): about a fifth less CPU per delegation.
#
# Usage: scripts/release-pgo.sh       -> prints the binary's path
#   (CARGO_TARGET_DIR is honoured; builds go to its pgo-gen/ and pgo-use/)
#        scripts/release-pgo.sh --train-only NODE_BIN BENCH_BIN [REQUESTS]
#   runs the training workload alone with these binaries and checks that
#   the mesh answered it (CI does, with the debug build: the training
#   cannot rot unnoticed). REQUESTS: per connection (4) and ingress (2);
#   default 4000, 32,000 in all.
# A rerun on the same sources reuses the build (the key: every tracked and
# untracked file outside the docs, bench/, chaos-tests/, fuzz/ and .ci/).
# The training's processes listen on free loopback ports chosen at start.
# Needs: llvm-profdata of the same LLVM major version as `rustc -vV` says
#   (Debian/Ubuntu: apt-get install llvm-NN; or rustup component add
#   llvm-tools and set LLVM_PROFDATA to its llvm-profdata), python3.
# Takes two release builds (about 20 minutes on 2 cores) and ~1 minute of
# training; every step is bounded.
set -euo pipefail
shopt -s inherit_errexit
TRAIN_ONLY=""
REQUESTS=4000
if [ "${1:-}" = --train-only ]; then
  [ $# -ge 3 ] || { echo "usage: $0 --train-only NODE_BIN BENCH_BIN [REQUESTS]" >&2; exit 2; }
  TRAIN_ONLY=1 GEN=$(realpath -- "$2") BENCH=$(realpath -- "$3") REQUESTS=${4:-$REQUESTS}
fi
cd "$(dirname "$0")/.."
ROOT=$PWD

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
host=$(rustc -vV | sed -n 's/^host: //p')
command -v python3 >/dev/null || { echo "release-pgo.sh needs python3 (the training load)" >&2; exit 2; }

T="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$T" in /*) ;; *) T="$ROOT/$T" ;; esac
DATA="$T/pgo-data"
W=$(mktemp -d /tmp/dmsc-pgo.XXXXXX)
PIDS=()
# stopped PID TENTHS: whether the process is gone within TENTHS x 0.1 s.
stopped() {
  for _ in $(seq 1 "$2"); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  return 1
}
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do stopped "$p" 100 || kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

OUT="$T/pgo-use/$host/release/dmsc-node"
# The source the binary was built from: a rerun on the same tree (a git
# checkout, committed or not) reuses it instead of training again.
# (Documents and the benchmark scripts do not count.)
source_key() {
  git -C "$ROOT" rev-parse -q --verify HEAD >/dev/null 2>&1 || return 0
  local files=(. ':!*.md' ':!docs' ':!bench' ':!chaos-tests' ':!fuzz' ':!.ci' ':!.gitignore')
  git -C "$ROOT" ls-files -s -- "${files[@]}" | sha256sum
  git -C "$ROOT" diff -- "${files[@]}" | sha256sum
  (cd "$ROOT" && git ls-files -z --others --exclude-standard -- "${files[@]}" | xargs -0r sha256sum) | sha256sum
  rustc -V
}
KEY=$(source_key)
if [ -z "$TRAIN_ONLY" ] && [ -n "$KEY" ] && [ -x "$OUT" ] && [ "$(cat "$T/pgo.key" 2>/dev/null)" = "$KEY" ]; then
  echo "reusing the PGO build of this tree" >&2
  echo "$OUT"
  exit 0
fi

PROFDATA="${LLVM_PROFDATA:-}"
if [ -z "$PROFDATA" ]; then
  for c in "llvm-profdata-$llvm_major" llvm-profdata; do
    command -v "$c" >/dev/null 2>&1 && { PROFDATA=$(command -v "$c"); break; }
  done
fi
have=$([ -n "$PROFDATA" ] && "$PROFDATA" --version 2>/dev/null | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -1 || true)
if [ -z "$TRAIN_ONLY" ] && [ "$have" != "$llvm_major" ]; then
  echo "release-pgo.sh needs llvm-profdata of LLVM $llvm_major (rustc's); found: ${PROFDATA:-none}${have:+ (LLVM $have)}." >&2
  echo "  apt-get install llvm-$llvm_major, or rustup component add llvm-tools and set LLVM_PROFDATA" >&2
  exit 2
fi

# --- 1. the instrumented build (--target: the flags reach only the
# node's own artifacts, not build scripts or proc macros)
if [ -z "$TRAIN_ONLY" ]; then
  echo "1/3 instrumented build" >&2
  RUSTFLAGS="-Cprofile-generate=$DATA" cargo build --release --locked -q -p dmsc-node \
    --target "$host" --target-dir "$T/pgo-gen"
  cargo build --release --locked -q -p dmsc-bench
  GEN="$T/pgo-gen/$host/release/dmsc-node"
  BENCH="$T/release/dmsc-bench"
  rm -rf "$DATA" && mkdir -p "$DATA"
fi

# --- 2. training
echo "2/3 training" >&2
(cd "$W" && LLVM_PROFILE_FILE="$DATA/demo-%m.profraw" timeout 60 "$GEN" demo --duration 12 >"$W/demo.log" 2>&1) \
  || { echo "the demo failed; its output:" >&2; tail -n 20 "$W/demo.log" >&2; exit 1; }

# Free loopback ports (TCP and UDP) for the backend, the overlays, the
# admin APIs and the two ingresses.
read -r P_BACK P_OA P_OB P_AA P_AB P_IN P_TLS < <(python3 - <<'PY'
import socket
held, ports = [], []
while len(ports) < 7:
    t = socket.socket(); t.bind(('127.0.0.1', 0)); p = t.getsockname()[1]
    u = socket.socket(type=socket.SOCK_DGRAM)
    try:
        u.bind(('127.0.0.1', p))
    except OSError:
        t.close(); continue
    held += [t, u]; ports.append(p)
print(*ports)
PY
)
BACKEND=127.0.0.1:$P_BACK
"$BENCH" e2e-backend --listen "$BACKEND" >"$W/backend.log" 2>&1 & PIDS+=($!); BACKEND_PID=$!
"$GEN" ca init --trust-domain pgo.test --out "$W/ca" >/dev/null
for n in a b; do "$GEN" ca issue-node --ca-dir "$W/ca" --name $n --san 127.0.0.1 --out "$W/$n" >/dev/null; done
cat > "$W/a.toml" <<CONF
name = "a"
data_dir = "$W/a/data"
[overlay]
listen = "127.0.0.1:$P_OA"
[tls]
ca = "$W/a/ca.pem"
cert = "$W/a/node.pem"
key = "$W/a/node.key"
[admin]
listen = "127.0.0.1:$P_AA"
[[agents]]
tenant = "train"
url = "http://$BACKEND"
name = "echo"
[[agents.skills]]
id = "echo"
tags = ["echo"]
CONF
cat > "$W/b.toml" <<CONF
name = "b"
data_dir = "$W/b/data"
[overlay]
listen = "127.0.0.1:$P_OB"
bootstrap = ["127.0.0.1:$P_OA"]
[tls]
ca = "$W/b/ca.pem"
cert = "$W/b/node.pem"
key = "$W/b/node.key"
[admin]
listen = "127.0.0.1:$P_AB"
[[ingress]]
listen = "127.0.0.1:$P_IN"
tenant = "train"
[[ingress]]
listen = "127.0.0.1:$P_TLS"
tls = true
auth = ["mtls"]
CONF
# SIGTERM ends them cleanly, which writes their profiles.
LLVM_PROFILE_FILE="$DATA/node-a-%m.profraw" RUST_LOG=warn "$GEN" run --config "$W/a.toml" >"$W/a.log" 2>&1 & PIDS+=($!); NODE_A=$!
LLVM_PROFILE_FILE="$DATA/node-b-%m.profraw" RUST_LOG=warn "$GEN" run --config "$W/b.toml" >"$W/b.log" 2>&1 & PIDS+=($!); NODE_B=$!
timeout -k 5 900 python3 "$ROOT/scripts/pgo-train.py" --plain 127.0.0.1:$P_IN --tls 127.0.0.1:$P_TLS \
  --admin 127.0.0.1:$P_AB --admin-token "$W/b/data/admin.token" --ca "$W/ca/ca.pem" \
  --node-bin "$GEN" --tenant train --agent echo --work "$W" --requests "$REQUESTS" --watch "$BACKEND_PID" "$NODE_A" "$NODE_B" \
  || { echo "the training load failed; node logs:" >&2; tail -n 30 "$W"/a.log "$W"/b.log >&2; exit 1; }
# Still up after the load, and a clean exit on SIGTERM (which is what
# writes an instrumented binary's profile).
for p in "$BACKEND_PID" "$NODE_A" "$NODE_B"; do
  kill -0 "$p" 2>/dev/null || { echo "a training process died; logs:" >&2; tail -n 5 "$W"/*.log >&2; exit 1; }
done
kill -TERM "$NODE_A" "$NODE_B"
for p in "$NODE_A" "$NODE_B"; do
  stopped "$p" 300 || { echo "a node did not stop within 30 s of SIGTERM" >&2; exit 1; }
  wait "$p" || { echo "a node exited with status $? on SIGTERM; logs:" >&2; tail -n 30 "$W"/a.log "$W"/b.log >&2; exit 1; }
done

[ -n "$TRAIN_ONLY" ] && exit 0

# --- 3. the optimized build
echo "3/3 optimized build" >&2
for part in demo node-a node-b; do
  [ -n "$(find "$DATA" -name "$part-*.profraw" -size +0)" ] \
    || { echo "the training wrote no profile for $part into $DATA" >&2; exit 1; }
done
"$PROFDATA" merge -o "$T/pgo.profdata" "$DATA"
RUSTFLAGS="-Cprofile-use=$T/pgo.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
  cargo build --release --locked -q -p dmsc-node --target "$host" --target-dir "$T/pgo-use"
[ -n "$KEY" ] && printf '%s\n' "$KEY" > "$T/pgo.key"
echo "$OUT"
