#!/usr/bin/env bash
# The reference comparison of PERFORMANCE.md, in one run, every server its
# own process as users run them:
#   direct    oha -> backend
#   nginx     oha -> nginx -> mutual TLS 1.3 -> nginx -> backend
#   haproxy   oha -> HAProxy -> mutual TLS 1.3 -> HAProxy -> backend
#   dmsc      oha -> dmsc-node b (ingress) -> QUIC, mutual TLS 1.3 -> dmsc-node a -> backend
#   dmsc-mtls the same, oha calling node b's TLS ingress with a client
#             certificate (enrolled with a join token, as an agent does)
# Backend: `dmsc-bench e2e-backend` (hyper, answers 1 KiB). Proxies: one
# worker each, keep-alive upstream pools, TLS 1.3 with client certificates
# between the hops and session reuse. dmsc: the production build (profile-
# guided, scripts/release-pgo.sh; see DMSC_BENCH_BUILD), audit log on (the default),
# plain ingress. All servers pinned to CPU 0, oha to CPU 1.
# Load: oha open-loop at fixed rates with latency correction (-q RATE
# --latency-correction), 1 KiB POST bodies; then a max-throughput run (-c 32).
# CPU per request: run time of the path's server processes (schedstat) over
# the 2000/s run (and the 500/s run), divided by the requests answered.
# Rounds alternate the order of the paths; the table has every round.
#
# Needs: nginx (nginx-light), haproxy, openssl, oha (`cargo install oha`),
# taskset, and for the profile-guided build llvm-profdata of rustc's LLVM
# (apt-get install llvm-22 for rustc 1.95). Bounded: about rounds x paths x (rates + 1) x SECS seconds.
# Usage: bench/compare.sh [SECS] [ROUNDS]     (default 5 2)
# DMSC_BENCH_AUDIT=off runs the dmsc nodes with the audit log off (to see
# what it costs; the comparison itself is with it on, the default).
# DMSC_BENCH_PROFILE=FILE records a perf profile (-g, 999 Hz) of the two
# dmsc nodes under max load instead (needs perf: apt-get install linux-perf);
# DMSC_BENCH_PROFILE_RATE="-c 1" records every event instead of sampling
# (e.g. DMSC_BENCH_PROFILE_EVENT=probe_dmsc:m after
# `perf probe -x <build> -a 'm=_rjem_malloc'`: where allocations come from).
# DMSC_BENCH_TRACE=1 traces the two nodes' system calls at 200/s (or
# DMSC_BENCH_TRACE_RATE), one request at a time, and prints where a
# delegation's time goes between them.
# DMSC_BENCH_HOPS=1 shows, for nginx and dmsc (or DMSC_BENCH_PATHS), how
# each server thread's runs on the shared CPU split into reacting to a
# request or answer and the work after passing it on (bench/hops.py), and
# the path's server-side latency per request with what its slowest 1 % ran
# into (bench/tail.py).
# DMSC_BENCH_SYSCALLS=1 (or =max, or =RATE) counts their system calls per request
# (other perf events with DMSC_BENCH_STAT_EVENTS, e.g. probe_libc:malloc
# after `perf probe -x <libc> -a malloc`).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-5}"
ROUNDS="${2:-2}"
RATES=(500 2000)
AUDIT=true
[ "${DMSC_BENCH_AUDIT:-on}" = off ] && AUDIT=false
# DMSC_BENCH_AUDIT_FSYNC=POLICY sets the nodes' audit.fsync (default: theirs).
FSYNC=""
[ -n "${DMSC_BENCH_AUDIT_FSYNC:-}" ] && FSYNC="fsync = \"$DMSC_BENCH_AUDIT_FSYNC\""
for tool in nginx haproxy openssl oha taskset python3; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "compare.sh needs $tool (apt-get install nginx-light haproxy openssl util-linux; cargo install oha)" >&2
    exit 2
  }
done
cargo build --release -q -p dmsc-bench -p dmsc-node
T="${CARGO_TARGET_DIR:-target}/release"
# The nodes run the production build: the profile-guided one
# (scripts/release-pgo.sh: two more release builds, about 20 minutes, the
# first time for a tree's sources, reused after; needs llvm-profdata of
# rustc's LLVM). The plain build above is still made (dmsc-bench, and the
# node for DMSC_BENCH_BUILD=release). DMSC_BENCH_BUILD=release
# runs the plain `cargo build --release` instead; DMSC_NODE_BIN=path runs
# any build (DMSC_NODE_BIN_B below: an A/B comparison).
if [ -z "${DMSC_NODE_BIN:-}" ]; then
  case "${DMSC_BENCH_BUILD:-pgo}" in
    pgo) DMSC_NODE_BIN=$(scripts/release-pgo.sh) || {
           echo "compare.sh: no profile-guided build (above); DMSC_BENCH_BUILD=release measures the plain release build" >&2
           exit 2
         } ;;
    release) DMSC_NODE_BIN="$T/dmsc-node" ;;
    *) echo "DMSC_BENCH_BUILD is pgo or release" >&2; exit 2 ;;
  esac
fi
NODE="$DMSC_NODE_BIN"
W=$(mktemp -d /tmp/dmsc-compare.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${DMSC_BENCH_KEEP:-}" ] && cp "$W"/*.log /tmp/ 2>/dev/null; rm -rf "$W"
}
trap cleanup EXIT
PIN0="taskset -c 0"
PIN1="taskset -c 1"
BACKEND=127.0.0.1:18000
head -c 1024 /dev/zero | tr '\0' 'x' > "$W/body"

# --- backend
$PIN0 "$T/dmsc-bench" e2e-backend --listen "$BACKEND" & PIDS+=($!); BACKEND_PID=$!

# --- certificates for the proxy chains (openssl, made here, one day)
( cd "$W"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca -keyout ca.key -out ca.pem 2>/dev/null
  for n in front back; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=$n -keyout $n.key -out $n.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:%s\n' "$n" > $n.ext
    openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile $n.ext -out $n.pem 2>/dev/null
    cat $n.pem $n.key > $n.combined.pem
  done )

# --- nginx chain: 18080 -> mTLS -> 18443 -> backend
common="worker_processes 1; daemon off; error_log $W/nginx-error.log error; events { worker_connections 4096; }"
cat > "$W/nginx-back.conf" <<CONF
$common pid $W/nginx-back.pid;
http { access_log off; upstream b { server $BACKEND; keepalive 64; }
  server { listen 127.0.0.1:18443 ssl; ssl_protocols TLSv1.3;
    ssl_certificate $W/back.pem; ssl_certificate_key $W/back.key;
    ssl_client_certificate $W/ca.pem; ssl_verify_client on;
    ssl_session_cache shared:S:1m;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat > "$W/nginx-front.conf" <<CONF
$common pid $W/nginx-front.pid;
http { access_log off; upstream f { server 127.0.0.1:18443; keepalive 64; }
  server { listen 127.0.0.1:18080;
    location / { proxy_pass https://f; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;
      proxy_ssl_certificate $W/front.pem; proxy_ssl_certificate_key $W/front.key;
      proxy_ssl_trusted_certificate $W/ca.pem; proxy_ssl_verify on; proxy_ssl_name back; } } }
CONF
$PIN0 nginx -c "$W/nginx-back.conf" -p "$W" & PIDS+=($!); NGX_B=$!
$PIN0 nginx -c "$W/nginx-front.conf" -p "$W" & PIDS+=($!); NGX_F=$!

# --- HAProxy chain: 18081 -> mTLS -> 18444 -> backend
cat > "$W/haproxy-back.cfg" <<CONF
global
  nbthread 1
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:18444 ssl crt $W/back.combined.pem ca-file $W/ca.pem verify required ssl-min-ver TLSv1.3
  default_backend be
backend be
  server s $BACKEND
CONF
cat > "$W/haproxy-front.cfg" <<CONF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:18081
  default_backend be
backend be
  server s 127.0.0.1:18444 ssl crt $W/front.combined.pem ca-file $W/ca.pem verify required sni str(back) verifyhost back ssl-min-ver TLSv1.3 ssl-reuse
CONF
$PIN0 haproxy -f "$W/haproxy-back.cfg" -db & PIDS+=($!); HAP_B=$!
$PIN0 haproxy -f "$W/haproxy-front.cfg" -db & PIDS+=($!); HAP_F=$!

# --- dmsc: node a is home to the backend, node b has the ingress
( cd "$W"
  "$NODE" ca init --trust-domain bench.test --out dca >/dev/null
  for n in a b; do "$NODE" ca issue-node --ca-dir dca --name $n --san 127.0.0.1 --out $n >/dev/null; done )
# dmsc_pair PREFIX BIN PORT_OFFSET: nodes PREFIXa (home of the backend) and
# PREFIXb (ingress on 18082 + offset), both running BIN.
dmsc_pair() {
  local x=$1 bin=$2 o=$3 audit=$AUDIT fsync=$FSYNC
  # DMSC_BENCH_AUDIT_B / DMSC_BENCH_AUDIT_FSYNC_B / DMSC_BENCH_AUDIT_LINGER_B
  # set them for the dmsc-b pair.
  if [ -n "$x" ]; then
    [ -n "${DMSC_BENCH_AUDIT_B:-}" ] && { audit=true; [ "$DMSC_BENCH_AUDIT_B" = off ] && audit=false; }
    [ -n "${DMSC_BENCH_AUDIT_FSYNC_B:-}" ] && fsync="fsync = \"$DMSC_BENCH_AUDIT_FSYNC_B\""
    [ -n "${DMSC_BENCH_AUDIT_LINGER_B:-}" ] && fsync="$fsync
linger_ms = $DMSC_BENCH_AUDIT_LINGER_B"
  fi
  cat > "$W/${x}a.toml" <<CONF
name = "a"
data_dir = "$W/${x}a/data"
[overlay]
listen = "127.0.0.1:$((17401 + o))"
[tls]
ca = "$W/a/ca.pem"
cert = "$W/a/node.pem"
key = "$W/a/node.key"
[admin]
listen = "127.0.0.1:$((19401 + o))"
[audit]
enabled = $audit
$fsync
[[agents]]
tenant = "bench"
url = "http://$BACKEND"
name = "echo"
[[agents.skills]]
id = "echo"
tags = ["echo"]
CONF
  cat > "$W/${x}b.toml" <<CONF
name = "b"
data_dir = "$W/${x}b/data"
[overlay]
listen = "127.0.0.1:$((17402 + o))"
bootstrap = ["127.0.0.1:$((17401 + o))"]
[tls]
ca = "$W/b/ca.pem"
cert = "$W/b/node.pem"
key = "$W/b/node.key"
[admin]
listen = "127.0.0.1:$((19402 + o))"
[audit]
enabled = $audit
$fsync
[[ingress]]
listen = "127.0.0.1:$((18082 + o))"
tenant = "bench"
# The same node's TLS ingress: callers prove who they are with a client
# certificate (path dmsc-mtls).
[[ingress]]
listen = "127.0.0.1:$((18083 + o))"
tls = true
auth = ["mtls"]
CONF
  RUST_LOG=error $PIN0 "$bin" run --config "$W/${x}a.toml" >"$W/${x}a.log" 2>&1 & PIDS+=($!); PAIR_A=$!
  RUST_LOG=error $PIN0 "$bin" run --config "$W/${x}b.toml" >"$W/${x}b.log" 2>&1 & PIDS+=($!); PAIR_B=$!
}
dmsc_pair "" "$NODE" 0
DMSC_A=$PAIR_A
DMSC_B=$PAIR_B
# DMSC_NODE_BIN_B=path adds the path `dmsc-b`: a second pair of nodes
# running that build (ingress 18092), for before/after in one run.
if [ -n "${DMSC_NODE_BIN_B:-}" ]; then
  dmsc_pair x "$DMSC_NODE_BIN_B" 10
  DMSCX_A=$PAIR_A
  DMSCX_B=$PAIR_B
fi

# wait until every path answers
ready() { curl -fsS -o /dev/null -m 2 -H "Host: $2" -d x "http://$1/" 2>/dev/null; }
for i in $(seq 1 100); do
  if ready $BACKEND x && ready 127.0.0.1:18080 x && ready 127.0.0.1:18081 x && ready 127.0.0.1:18082 echo.bench.dmsc \
    && { [ -z "${DMSC_NODE_BIN_B:-}" ] || ready 127.0.0.1:18092 echo.bench.dmsc; }; then
    break
  fi
  [ "$i" = 100 ] && { echo "a path never answered; logs in $W" >&2; tail -n 5 "$W"/*.log >&2; exit 1; }
  sleep 0.2
done

# A caller certificate for the mTLS ingress, as an agent gets one: a join
# token from node b's admin API, exchanged at its TLS ingress.
TOKEN=$("$NODE" token create --tenant bench --agent caller --admin 127.0.0.1:19402 --admin-token "$W/b/data/admin.token")
curl -fsS --cacert "$W/dca/ca.pem" https://127.0.0.1:18083/v1/enroll -d "{\"token\":\"$TOKEN\"}" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); open(sys.argv[1]+"/caller.pem","w").write(d["certificate_chain"]); open(sys.argv[1]+"/caller.key","w").write(d["private_key"])' "$W"
MTLS=(--cacert "$W/dca/ca.pem" --cert "$W/caller.pem" --key "$W/caller.key")
code=$(curl -sS -o "$W/mtls-check" -w "%{http_code}" --cacert "$W/dca/ca.pem" --cert "$W/caller.pem" --key "$W/caller.key" \
  -H "Host: echo.bench.dmsc" -d x https://127.0.0.1:18083/ || true)
[ "$code" = 200 ] || { echo "the mTLS ingress answered $code: $(cat "$W/mtls-check" 2>/dev/null)" >&2; exit 1; }

if [ -n "${DMSC_BENCH_PROFILE:-}" ]; then
  # Profile the two dmsc nodes at max load instead of the comparison:
  # perf report -i "$DMSC_BENCH_PROFILE" --no-children --sort dso,symbol
  perf record ${DMSC_BENCH_PROFILE_EVENT:+-e "$DMSC_BENCH_PROFILE_EVENT"} ${DMSC_BENCH_PROFILE_RATE:--F 999} --call-graph "${DMSC_BENCH_CALLGRAPH:-fp}" -o "$DMSC_BENCH_PROFILE" -p "$DMSC_A,$DMSC_B" -- sleep "$SECS" >/dev/null 2>&1 &
  PERF=$!
  # DMSC_BENCH_PROFILE_QPS=2000 profiles at that fixed rate instead (where
  # the per-request CPU of a lightly loaded node goes).
  if [ -n "${DMSC_BENCH_PROFILE_QPS:-}" ]; then load=(-q "$DMSC_BENCH_PROFILE_QPS" --latency-correction -c 64); else load=(-c 32); fi
  $PIN1 oha -z "${SECS}s" --no-tui "${load[@]}" -m POST -D "$W/body" -H "Host: echo.bench.dmsc" http://127.0.0.1:18082/ | grep -E "Requests/sec|Success rate"
  wait "$PERF" || true
  exit 0
fi
if [ -n "${DMSC_BENCH_PACKETS:-}" ]; then
  # The overlay's datagrams at 2000/s, by direction and size (needs tcpdump).
  timeout "$((SECS + 1))" tcpdump -i lo -nn -q -w "$W/pcap" udp port 17401 >/dev/null 2>&1 &
  TCPD=$!
  sleep 0.5
  n=$($PIN1 oha -z "${SECS}s" --no-tui -q 2000 --latency-correction -c 64 -m POST -D "$W/body" -H "Host: echo.bench.dmsc" --output-format json http://127.0.0.1:18082/ \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["statusCodeDistribution"].get("200", 0))')
  wait "$TCPD" || true
  echo "requests answered: $n; overlay datagrams per request by direction and size:"
  tcpdump -r "$W/pcap" -nn -q 2>/dev/null > "$W/pkts"; cp "$W/pkts" /tmp/pkts.txt; awk -v n="$n" '{ split($3, s, "."); size = $NF; b = size < 100 ? "<100" : size < 300 ? "100-299" : size < 1000 ? "300-999" : ">=1000"; k = (s[5] == 17401 ? "to b" : "to a") " " b; c[k]++ } END { for (k in c) printf "%8.2f %s\n", c[k] / n, k }' "$W/pkts" | sort -k2
  exit 0
fi
if [ -n "${DMSC_BENCH_TRACE:-}" ]; then
  # Where a lightly loaded delegation's time goes (needs perf): the two
  # nodes' system calls at 200/s, one request at a time, cut into segments
  # by bench/trace-segments.py.
  # DMSC_BENCH_TRACE_EVENTS=... traces other system calls (then only the
  # raw trace is kept, in DMSC_BENCH_TRACE_OUT, e.g. to see every wake-up).
  perf trace -e "${DMSC_BENCH_TRACE_EVENTS:-recvfrom,sendto,writev,sendmsg,recvmmsg}" -p "$DMSC_B,$DMSC_A" -o "$W/trace" >/dev/null 2>&1 &
  TRACE=$!
  sleep 0.5
  $PIN1 oha -z "${SECS}s" --no-tui -q "${DMSC_BENCH_TRACE_RATE:-200}" --latency-correction -c 1 -m POST -D "$W/body" -H "Host: echo.bench.dmsc" http://127.0.0.1:18082/ >/dev/null
  sleep 0.2
  kill -INT "$TRACE" 2>/dev/null || true
  wait "$TRACE" || true
  [ -n "${DMSC_BENCH_TRACE_OUT:-}" ] && cp "$W/trace" "$DMSC_BENCH_TRACE_OUT"
  [ -z "${DMSC_BENCH_TRACE_EVENTS:-}" ] && python3 "$(dirname "$0")/trace-segments.py" "$W/trace" "$DMSC_B" "$DMSC_A"
  exit 0
fi
if [ -n "${DMSC_BENCH_HOPS:-}" ]; then
  # Where a light request's time goes, hop by hop, for each path of
  # DMSC_BENCH_PATHS (default "nginx dmsc") at DMSC_BENCH_HOPS_RATE (500/s):
  # every scheduler switch and send on CPU 0, where all servers run
  # (needs perf), read by bench/hops.py.
  declare -A HOP_PIDS=([nginx]="$BACKEND_PID=backend $NGX_F=nginx-front $NGX_B=nginx-back"
    [haproxy]="$BACKEND_PID=backend $HAP_F=haproxy-front $HAP_B=haproxy-back"
    [dmsc]="$BACKEND_PID=backend $DMSC_B=dmsc-ingress $DMSC_A=dmsc-home")
  declare -A HOP_FRONT=([nginx]="$NGX_F" [haproxy]="$HAP_F" [dmsc]="$DMSC_B")
  declare -A HOP_URL=([nginx]=127.0.0.1:18080 [haproxy]=127.0.0.1:18081 [dmsc]=127.0.0.1:18082)
  declare -A HOP_HOST=([nginx]=x [haproxy]=x [dmsc]=echo.bench.dmsc)
  for p in ${DMSC_BENCH_PATHS:-nginx dmsc}; do
    # DMSC_BENCH_HOPS=profile also samples the CPU (call graphs; use a build
    # with debug info) and charges the samples to each hop's phases
    # (bench/critical.py): what the critical path is made of.
    prof=()
    [ "$DMSC_BENCH_HOPS" = profile ] && prof=(-F 10000 -e cycles --call-graph dwarf,8192)
    # perf itself on the client CPU: its own writes stay out of the trace.
    $PIN1 perf record -C 0 "${prof[@]}" -e sched:sched_switch -e 'syscalls:sys_enter_send*' -e syscalls:sys_enter_writev \
      -e syscalls:sys_enter_write -e syscalls:sys_enter_recvfrom -o "$W/hops.data" -- sleep "$SECS" >/dev/null 2>&1 &
    PERF=$!
    n=$($PIN1 oha -z "${SECS}s" --no-tui -q "${DMSC_BENCH_HOPS_RATE:-500}" --latency-correction -c 64 -m POST -D "$W/body" \
      -H "Host: ${HOP_HOST[$p]}" --output-format json "http://${HOP_URL[$p]}/" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["statusCodeDistribution"].get("200", 0))')
    wait "$PERF" || true
    echo "== $p"
    perf script -i "$W/hops.data" -F tid,time,event,trace 2>/dev/null > "$W/hops.txt"
    # shellcheck disable=SC2086
    python3 "$(dirname "$0")/hops.py" "$W/hops.txt" "$n" ${HOP_PIDS[$p]}
    python3 "$(dirname "$0")/tail.py" "$W/hops.txt" "${HOP_FRONT[$p]}"
    # DMSC_BENCH_HOPS_OUT=PREFIX keeps the trace (PREFIX.PATH).
    [ -n "${DMSC_BENCH_HOPS_OUT:-}" ] && cp "$W/hops.txt" "$DMSC_BENCH_HOPS_OUT.$p"
    if [ "$DMSC_BENCH_HOPS" = profile ]; then
      perf script -i "$W/hops.data" -F comm,tid,time,event,trace,ip,sym,dso 2>/dev/null > "$W/critical.txt"
      # shellcheck disable=SC2086
      python3 "$(dirname "$0")/critical.py" "$W/critical.txt" ${HOP_PIDS[$p]} ${DMSC_BENCH_CRITICAL_OWNER:-}
      [ -n "${DMSC_BENCH_CRITICAL_OUT:-}" ] && cp "$W/critical.txt" "$DMSC_BENCH_CRITICAL_OUT.$p"
    fi
  done
  exit 0
fi
if [ -n "${DMSC_BENCH_SYSCALLS:-}" ]; then
  # Count the two dmsc nodes' system calls per request at 2000/s (or at max
  # load with DMSC_BENCH_SYSCALLS=max) instead of the comparison (needs
  # perf): where the kernel time of the profile comes from.
  perf stat -x, -e "${DMSC_BENCH_STAT_EVENTS:-syscalls:sys_enter_*}" -p "$DMSC_A,$DMSC_B" -o "$W/stat" -- sleep "$SECS" >/dev/null 2>&1 &
  PERF=$!
  case "$DMSC_BENCH_SYSCALLS" in
    max) load=(-c 32) ;;
    [0-9]*) load=(-q "$DMSC_BENCH_SYSCALLS" --latency-correction -c 64) ;;
    *) load=(-q 2000 --latency-correction -c 64) ;;
  esac
  n=$($PIN1 oha -z "${SECS}s" --no-tui "${load[@]}" -m POST -D "$W/body" -H "Host: echo.bench.dmsc" --output-format json http://127.0.0.1:18082/ \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["statusCodeDistribution"].get("200", 0))')
  wait "$PERF" || true
  echo "requests answered: $n; system calls per request (both nodes):"
  awk -F, -v n="$n" '$1+0 > 0 { sub("syscalls:sys_enter_", "", $3); printf "%8.2f %s\n", $1 / n, $3 }' "$W/stat" | sort -rn
  exit 0
fi
declare -A ADDR=([direct]=$BACKEND [nginx]=127.0.0.1:18080 [haproxy]=127.0.0.1:18081 [dmsc]=127.0.0.1:18082 [dmsc-mtls]=127.0.0.1:18083 [dmsc-b]=127.0.0.1:18092)
declare -A HOST=([direct]=x [nginx]=x [haproxy]=x [dmsc]=echo.bench.dmsc [dmsc-mtls]=echo.bench.dmsc [dmsc-b]=echo.bench.dmsc)
declare -A SERVERS=([direct]="$BACKEND_PID" [nginx]="$BACKEND_PID $NGX_F $NGX_B" [haproxy]="$BACKEND_PID $HAP_F $HAP_B" [dmsc]="$BACKEND_PID $DMSC_A $DMSC_B" [dmsc-mtls]="$BACKEND_PID $DMSC_A $DMSC_B")
[ -n "${DMSC_NODE_BIN_B:-}" ] && SERVERS[dmsc-b]="$BACKEND_PID $DMSCX_A $DMSCX_B"

# nginx and haproxy fork workers: count the whole process tree of each PID.
# Prints the CPU time in nanoseconds, exact (the scheduler's run time of
# every thread, /proc/PID/task/TID/schedstat, not /proc/PID/stat's 10 ms
# ticks), and how many times those threads were scheduled.
schedstat() {
  local p
  for p in $(for r in $1; do echo "$r"; pgrep -P "$r" || true; done); do
    cat /proc/"$p"/task/*/schedstat 2>/dev/null || true
  done | awk '{ t += $1; n += $3 } END { printf "%.0f %.0f\n", t, n }'
}
declare -A cpus runs

oha_run() { # path extra-args... -> json
  local url="http://${ADDR[$1]}/" tls=()
  [ "$1" = dmsc-mtls ] && { url="https://${ADDR[$1]}/"; tls=("${MTLS[@]}"); }
  $PIN1 oha -z "${SECS}s" --no-tui --output-format json -m POST -D "$W/body" \
    -H "Host: ${HOST[$1]}" "${tls[@]}" "${@:2}" "$url" 2>/dev/null
}
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

# DMSC_BENCH_PATHS="nginx dmsc" runs a subset (quick A/B runs against nginx).
default_paths="direct nginx haproxy dmsc dmsc-mtls${DMSC_NODE_BIN_B:+ dmsc-b}"
read -r -a PATHS <<< "${DMSC_BENCH_PATHS:-$default_paths}"
echo "| round | path | p50 @500 | p99 @500 | p50 @2000 | p99 @2000 | ok @2000 | max req/s | server CPU/request @2000 | @500 | times scheduled/request @500 |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
  order=("${PATHS[@]}")
  if [ $((round % 2)) = 0 ]; then
    order=()
    for ((i = ${#PATHS[@]} - 1; i >= 0; i--)); do order+=("${PATHS[$i]}"); done
  fi
  for p in "${order[@]}"; do
    row="| $round | $p"
    for rate in "${RATES[@]}"; do
      read -r t0 s0 < <(schedstat "${SERVERS[$p]}")
      j=$(oha_run "$p" -q "$rate" --latency-correction -c 64)
      # DMSC_BENCH_JSON=DIR keeps each run's oha report (connection times
      # under "details": the TLS handshakes of the mTLS path, for one).
      [ -n "${DMSC_BENCH_JSON:-}" ] && echo "$j" > "$DMSC_BENCH_JSON/$round-$p-$rate.json"
      read -r t1 s1 < <(schedstat "${SERVERS[$p]}")
      p50=$(echo "$j" | field '"%.3f ms" % (d["latencyPercentiles"]["p50"]*1000)')
      p99=$(echo "$j" | field '"%.3f ms" % (d["latencyPercentiles"]["p99"]*1000)')
      row="$row | $p50 | $p99"
      ok=$(echo "$j" | field 'd["statusCodeDistribution"].get("200", 0)')
      cpus[$rate]=$(python3 -c "print('%.0f us' % (($t1 - $t0) / 1e3 / max($ok, 1)))")
      runs[$rate]=$(python3 -c "print('%.1f' % (($s1 - $s0) / max($ok, 1)))")
      [ "$rate" = 2000 ] && row="$row | $ok"
    done
    j=$(oha_run "$p" -c 32)
    rps=$(echo "$j" | field '"%.0f" % d["summary"]["requestsPerSec"]')
    echo "$row | $rps | ${cpus[2000]} | ${cpus[500]} | ${runs[500]} |"
  done
done
echo
echo "command: bench/compare.sh $SECS $ROUNDS (dmsc-node: $NODE${DMSC_NODE_BIN_B:+, dmsc-b: $DMSC_NODE_BIN_B}; audit log: $AUDIT); servers pinned to CPU 0, oha to CPU 1; $(date -u +%F)"
