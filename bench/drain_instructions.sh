#!/usr/bin/env bash
# User-space instructions per drained item (valgrind --tool=callgrind on the release binary):
# a drain figure that does not move with the machine's load, unlike items/s. Not a test.
#
#   bash bench/drain_instructions.sh
#
# N items (2000) are queued over 16 `partition = "path"` partitions with the upstream down
# (instrumentation off), then nginx (1 worker) starts as the upstream and instrumentation is on
# until the queue is empty. Environment: N, SYNC (`replay.progress_sync`, default 10ms),
# OUTPOST_BIN (skip the release build), KEEP=DIR (keep the callgrind files). WRITES=1 counts the
# queueing instead (instructions per durable write: instrumentation on from the first write to
# the last, 16 connections one write at a time each) and stops there.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}; SYNC=${SYNC:-10ms}
. bench/lib.sh
need valgrind valgrind
need nginx nginx-light
OUTPOST=$(outpost_bin)
W=$(mktemp -d /tmp/outpost-drain-instr.XXXXXX)
OPID=""
cleanup() {
  [ -n "$OPID" ] && kill "$OPID" 2>/dev/null || true
  nginx -p "$W" -c "$W/up.conf" -s stop 2>/dev/null || true
  sleep 0.3; rm -rf "$W"
}
trap cleanup EXIT
UP=$(free_port); PORT=$(free_port); ADMIN=$(free_port)
cat > "$W/up.conf" <<CONF
worker_processes 1; pid $W/up.pid; error_log $W/up.err warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { default_type application/json; return 201 '{"id":1,"ok":true}'; } } }
CONF
drain_config "$W/drain.toml" "$UP" "$SYNC"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$W/cg.out" "$OUTPOST" serve \
  --listen 127.0.0.1:"$PORT" --admin-listen 127.0.0.1:"$ADMIN" --config "$W/drain.toml" \
  --data-dir "$W/data" > "$W/o.log" 2>&1 &
OPID=$!
depth() { curl -s "http://127.0.0.1:$ADMIN/status" | grep -o '"queue_depth":[0-9]*' | cut -d: -f2; }
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$ADMIN/status" && break; sleep 0.3; done
[ -n "${WRITES:-}" ] && callgrind_control -i on "$OPID" >/dev/null
# 16 clients, one per partition, one write at a time each.
PYTHONPATH=bench python3 - "$PORT" "$N" <<'PY'
import socket, sys, concurrent.futures
from http1 import exchange
port, n = int(sys.argv[1]), int(sys.argv[2])
def run(part):
    s = socket.create_connection(("127.0.0.1", port))
    body = b'{"qty":1}'
    for _ in range(part, n, 16):
        head = exchange(s, b"POST /p/%d HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (part, len(body), body))
        if not head.startswith(b"HTTP/1.1 202"):
            sys.exit(f"expected a 202: {head[:40]!r}")
with concurrent.futures.ThreadPoolExecutor(16) as ex:
    list(ex.map(run, range(16)))
PY
queued=$(depth)
if [ -z "${WRITES:-}" ]; then
  callgrind_control -i on "$OPID" >/dev/null
  nginx -p "$W" -c "$W/up.conf"
  while [ "$(depth)" -gt 0 ]; do sleep 0.2; done
fi
callgrind_control -i off "$OPID" >/dev/null
callgrind_control -d "$OPID" >/dev/null
sleep 0.5
kill "$OPID"; wait "$OPID" 2>/dev/null || true; OPID=""
if [ -n "${WRITES:-}" ]; then
  echo "queued $queued durable writes (16 connections): $(( $(callgrind_total "$W") / queued )) instructions per write"
else
  echo "drained $queued items (16 partitions, progress_sync = $SYNC): $(( $(callgrind_total "$W") / queued )) instructions per item"
fi
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$W"/cg.out* "$KEEP/"; fi
