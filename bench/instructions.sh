#!/usr/bin/env bash
# User-space instructions per proxied request (valgrind --tool=callgrind on the release binary):
# a figure that does not move with the machine's load, unlike req/s. Not a test.
#
#   bash bench/instructions.sh [network-first|network-only|stale ...]   (default: all three)
#
# For each mode: nginx (1 worker) as the upstream, outpost under callgrind with instrumentation
# off, 200 warm-up requests, instrumentation on, N requests (N=3000) sent one at a time over four
# keep-alive connections, instrumentation off. Prints instructions per request.
# KEEP=DIR keeps each mode's callgrind files in DIR/MODE (for callgrind_annotate). Under valgrind
# the cache keys' SHA-256 runs in its portable form (about 7 k instructions per key; natively the
# CPU's SHA instructions do it for a fraction of that). OUTPOST_BIN skips the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-3000}
MODES=${*:-network-first network-only stale}
. bench/lib.sh
need valgrind valgrind
need nginx nginx-light
OUTPOST=$(outpost_bin)
WORK=$(mktemp -d /tmp/outpost-instr.XXXXXX)
OPID=""
cleanup() {
  [ -n "$OPID" ] && kill "$OPID" 2>/dev/null || true
  nginx -p "$WORK" -c "$WORK/up.conf" -s stop 2>/dev/null || true
  sleep 0.3; rm -rf "$WORK"
}
trap cleanup EXIT
client() {  # port path count: sequential GETs over 4 keep-alive connections, each read whole
  PYTHONPATH=bench python3 - "$@" <<'PY'
import socket, sys
from http1 import exchange
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: wrk\r\n\r\n".encode()
for i in range(n):
    head = exchange(conns[i % 4], req)
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit(f"unexpected answer: {head[:40]!r}")
PY
}
UP=$(free_port)
cat > "$WORK/up.conf" <<CONF
worker_processes 1; pid $WORK/up.pid; error_log $WORK/up.err warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP;
    location /stale/ { default_type application/json; add_header Cache-Control "max-age=1"; return 200 '{"id":1,"name":"water filter","stock":12}'; }
    location / { default_type application/json; add_header Cache-Control "max-age=60"; return 200 '{"id":1,"name":"water filter","stock":12}'; } } }
CONF
echo "| mode | instructions/request |"
echo "|---|---|"
for mode in $MODES; do
  nginx -p "$WORK" -c "$WORK/up.conf"
  case $mode in
    network-first) cfg='[replay]\nrate_limit = 0\n'; path=/products ;;
    network-only) cfg='[replay]\nrate_limit = 0\n[[route]]\npath = "/"\nread = "network-only"\n'; path=/products ;;
    stale) cfg='[replay]\nrate_limit = 0\n'; path=/stale/item ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
  printf "$cfg" > "$WORK/o.toml"
  port=$(free_port); admin=$(free_port)
  rm -rf "$WORK/data" "$WORK"/cg.out*
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/cg.out" \
    "$OUTPOST" serve --listen 127.0.0.1:"$port" --admin-listen 127.0.0.1:"$admin" --config "$WORK/o.toml" \
    --upstream "http://127.0.0.1:$UP" --data-dir "$WORK/data" > "$WORK/o.log" 2>&1 &
  OPID=$!
  for _ in $(seq 1 200); do curl -s -o /dev/null "http://127.0.0.1:$port$path" && break; sleep 0.2; done
  if [ "$mode" = stale ]; then nginx -p "$WORK" -c "$WORK/up.conf" -s stop; sleep 1.6; fi
  client "$port" "$path" 200
  callgrind_control -i on "$OPID" >/dev/null
  client "$port" "$path" "$N"
  callgrind_control -i off "$OPID" >/dev/null
  callgrind_control -d "$OPID" >/dev/null
  sleep 0.5
  kill "$OPID"; wait "$OPID" 2>/dev/null || true; OPID=""
  nginx -p "$WORK" -c "$WORK/up.conf" -s stop 2>/dev/null || true; sleep 0.3
  echo "| $mode | $(( $(callgrind_total "$WORK") / N )) |"
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP/$mode"; cp "$WORK"/cg.out* "$KEEP/$mode/"; fi
done
