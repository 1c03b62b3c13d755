#!/usr/bin/env bash
# Takes docs/status-page.png: the status page during an outage, with queued writes, dead letters
# and an earlier outage in the timeline. Needs chromium (apt-get install -y chromium), python3
# and a built outpost (cargo build). Loopback only; takes about three minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${OUTPOST_BIN:-target/debug/outpost}
WORK=$(mktemp -d)
UP=127.0.0.1:18999 PROXY=127.0.0.1:18080 ADMIN=127.0.0.1:19901
cleanup() { kill "$UPSTREAM_PID" "$OUTPOST_PID" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

cat > "$WORK/upstream.py" <<'PY'
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def answer(self, status, doc, cache=None):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        if cache: self.send_header("cache-control", cache)
        self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        self.answer(200, [{"id": 1, "name": "tea"}, {"id": 2, "name": "cups"}], "max-age=60")
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        order = json.loads(self.rfile.read(n) or b"{}")
        if order.get("qty", 0) <= 0:
            self.answer(422, {"errors": [{"message": "qty must be positive", "path": "/qty"}]})
        elif order.get("qty") > 100:
            self.answer(409, {"error": "out of stock", "available": 12})
        else:
            self.answer(201, {"id": self.headers.get("idempotency-key"), **order})
HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
PY
upstream_up() { python3 "$WORK/upstream.py" 127.0.0.1 18999 & UPSTREAM_PID=$!; sleep 0.5; }
upstream_down() { kill "$UPSTREAM_PID"; wait "$UPSTREAM_PID" 2>/dev/null || true; }
order() { curl -s -o /dev/null -w "POST /orders $2 -> %{http_code}\n" -X POST -H "Idempotency-Key: $1" \
  -H 'content-type: application/json' -d "$2" "http://$PROXY/orders"; }

cat > "$WORK/outpost.toml" <<TOML
[upstream]
probe_interval = "100ms"
probe_interval_max = "1s"
TOML
upstream_up
"$BIN" serve --config "$WORK/outpost.toml" --listen $PROXY --admin-listen $ADMIN \
  --upstream "http://$UP" --data-dir "$WORK/data" 2> "$WORK/outpost.log" & OUTPOST_PID=$!
sleep 1
curl -s -o /dev/null "http://$PROXY/products"
order order-1001 '{"product":1,"qty":2}'
upstream_down
curl -s -o /dev/null -w "GET /products (offline) -> %{http_code}\n" "http://$PROXY/products"
order order-1002 '{"product":1,"qty":0}'
order order-1003 '{"product":2,"qty":500}'
order order-1004 '{"product":2,"qty":3}'
sleep 20
upstream_up
sleep 3
upstream_down
curl -s -o /dev/null "http://$PROXY/products"
for i in 1005 1006 1007; do order "order-$i" "{\"product\":1,\"qty\":${i: -1}}"; sleep 5; done
sleep "${OUTAGE_SECONDS:-150}"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1250 \
  --virtual-time-budget=4000 --screenshot="$PWD/docs/status-page.png" "http://$ADMIN/" 2>/dev/null
echo "wrote docs/status-page.png"
