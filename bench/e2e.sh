#!/usr/bin/env bash
# End-to-end overhead on loopback, side by side in one run:
#   direct client -> backend
#   client -> node ingress -> backend (local agent)
#   client -> node b ingress -> QUIC (mutual TLS 1.3) -> node a -> backend
#   client -> nginx -> mutual TLS 1.3 -> nginx -> backend (when nginx is
#   installed: `apt-get install nginx-light`; certificates made here, openssl)
# Servers (backend and both nodes in one process; both nginx, one worker
# each) are pinned to CPU 0; the load generator to CPU 1. Bounded: about
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

NGINX_ARGS=()
NGX=""
if command -v nginx >/dev/null 2>&1; then
  NGX=$(mktemp -d /tmp/dmsc-e2e-nginx.XXXXXX)
  BACKEND=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["direct"])' "$ADDRS")
  ( cd "$NGX"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca -keyout ca.key -out ca.pem 2>/dev/null
    for n in front back; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=$n -keyout $n.key -out $n.csr 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1,DNS:%s\n' "$n" > $n.ext
      openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile $n.ext -out $n.pem 2>/dev/null
    done )
  common="worker_processes 1; daemon off; error_log $NGX/error.log error; events { worker_connections 4096; }"
  cat > "$NGX/back.conf" <<CONF
$common pid $NGX/back.pid;
http { access_log off; upstream b { server $BACKEND; keepalive 64; }
  server { listen 127.0.0.1:18443 ssl; ssl_protocols TLSv1.3;
    ssl_certificate $NGX/back.pem; ssl_certificate_key $NGX/back.key;
    ssl_client_certificate $NGX/ca.pem; ssl_verify_client on;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
  cat > "$NGX/front.conf" <<CONF
$common pid $NGX/front.pid;
http { access_log off; upstream f { server 127.0.0.1:18443; keepalive 64; }
  server { listen 127.0.0.1:18080;
    location / { proxy_pass https://f; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;
      proxy_ssl_certificate $NGX/front.pem; proxy_ssl_certificate_key $NGX/front.key;
      proxy_ssl_trusted_certificate $NGX/ca.pem; proxy_ssl_verify on; proxy_ssl_name back; } } }
CONF
  $PIN0 nginx -c "$NGX/back.conf" -p "$NGX" &
  $PIN0 nginx -c "$NGX/front.conf" -p "$NGX" &
  sleep 1
  NGINX_ARGS=(--nginx 127.0.0.1:18080)
  echo "nginx chain: 127.0.0.1:18080 -> mTLS 1.3 -> 127.0.0.1:18443 -> $BACKEND" >&2
else
  echo "nginx not installed: the nginx chain column is skipped (apt-get install nginx-light)" >&2
fi
cleanup() {
  [ -n "$NGX" ] && for p in "$NGX"/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null; done
  true
}
trap cleanup EXIT
$PIN1 "$BIN" e2e-load --addrs "$ADDRS" "${NGINX_ARGS[@]}" "$@"
exec {SERVE[1]}>&-
wait "$SERVE_PID" 2>/dev/null || true
