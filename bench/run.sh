#!/usr/bin/env bash
# Benchmarks for outpost on this machine (loopback only). Not a test: prints figures.
#
#   bash bench/run.sh [proxy|outbox|drain|redis|loadtest|all]    (default: all)
#
# proxy:  requests/s and p50/p99 with wrk (2 threads, 64 connections, 10 s) against a fast
#         upstream (nginx returning a small JSON), directly, through nginx as a plain reverse
#         proxy, through outpost (network-first, feeding its cache), and through outpost with
#         the upstream stopped (stale reads from memory).
# outbox: acknowledged durable writes/s (202 after fsync) at concurrency 1, 16, 64 with the
#         upstream down; then the replay drain rate of the queue (>= 100 000 items) into the
#         fast upstream, and outpost's RSS before and after queueing.
# drain:  replay drain rate with the default exactly-once bound (each answer fsynced before the
#         partition's next send) and with replay.progress_sync = "10ms", for one partition and
#         for 16 partitions (DRAIN_ITEMS items queued each time, default 20 000).
# redis:  acknowledged writes/s against the Redis backend, appendfsync always and everysec.
# loadtest: `outpost loadtest` replaying tests/fixtures/har/chrome.har (a GET and a POST) through
#         outpost into the built-in mock upstream, closed loop (32 in flight) for $DURATION,
#         without and with two outages; req/s, p50/p99 and the mutation accounting.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHAT=${1:-all}
DURATION=${DURATION:-10s}
WORK=$(mktemp -d /tmp/outpost-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for conf in "$WORK"/nginx-*.conf; do [ -f "$conf" ] && nginx -p "$WORK" -c "$conf" -s stop 2>/dev/null || true; done
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

need() {
  local bin=$1 pkg=$2
  if ! command -v "$bin" >/dev/null 2>&1; then
    echo "installing $pkg" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq "$pkg" >/dev/null
  fi
}
need wrk wrk
need nginx nginx-light
need redis-server redis-server
need curl curl

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

cargo build --release --quiet
OUTPOST="$ROOT/target/release/outpost"

UP=$(free_port); NGX=$(free_port)
start_upstream() {
  cat > "$WORK/nginx-up.conf" <<CONF
worker_processes 1;
pid $WORK/nginx-up.pid;
error_log $WORK/nginx-up.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UP;
    location /orders { default_type application/json; return 201 '{"id":1,"ok":true}'; }
    location / { default_type application/json; add_header Cache-Control "max-age=60"; return 200 '{"id":1,"name":"water filter","stock":12}'; }
  }
}
CONF
  nginx -p "$WORK" -c "$WORK/nginx-up.conf"
  wait_port "$UP"
}
stop_upstream() { nginx -p "$WORK" -c "$WORK/nginx-up.conf" -s stop 2>/dev/null || true; sleep 0.5; }

start_nginx_proxy() {
  cat > "$WORK/nginx-proxy.conf" <<CONF
worker_processes auto;
pid $WORK/nginx-proxy.pid;
error_log $WORK/nginx-proxy.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
  nginx -p "$WORK" -c "$WORK/nginx-proxy.conf"
  wait_port "$NGX"
}

# wrk → "req/s p50 p99"
measure() {
  local url=$1 conns=${2:-64} threads=${3:-2} script=${4:-}
  local out
  if [ -n "$script" ]; then
    out=$(wrk -t"$threads" -c"$conns" -d"$DURATION" --latency -s "$script" "$url")
  else
    out=$(wrk -t"$threads" -c"$conns" -d"$DURATION" --latency "$url")
  fi
  local rps p50 p99 non2xx
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  echo "$rps $p50 $p99 ${non2xx:-0}"
}

start_outpost() {  # args: extra serve args...
  local port admin
  port=$(free_port); admin=$(free_port)
  "$OUTPOST" serve --listen 127.0.0.1:"$port" --admin-listen 127.0.0.1:"$admin" "$@" > "$WORK/outpost.log" 2>&1 &
  OUTPOST_PID=$!
  PIDS+=("$OUTPOST_PID")
  OUTPOST_PORT=$port; ADMIN_PORT=$admin
  wait_port "$port"
}
stop_outpost() { kill "$OUTPOST_PID" 2>/dev/null || true; wait "$OUTPOST_PID" 2>/dev/null || true; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' /proc/"$1"/status; }
depth() { curl -s "http://127.0.0.1:$ADMIN_PORT/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["queue_depth"])'; }

row() { printf '| %-44s | %10s | %8s | %8s |\n' "$@"; }

bench_proxy() {
  echo "## Pass-through (wrk -t2 -c64 -d$DURATION, small JSON answer)"
  row "setup" "req/s" "p50" "p99"
  row "---" "---" "---" "---"
  start_upstream
  read -r rps p50 p99 _ < <(measure "http://127.0.0.1:$UP/products")
  row "direct to upstream (nginx, 1 worker)" "$rps" "$p50" "$p99"
  local direct=$rps
  start_nginx_proxy
  read -r rps p50 p99 _ < <(measure "http://127.0.0.1:$NGX/products")
  row "nginx reverse proxy (keepalive pool)" "$rps" "$p50" "$p99"
  echo "nginx/direct: $(python3 -c "print(f'{$rps/$direct:.0%}')")" >&2
  nginx -p "$WORK" -c "$WORK/nginx-proxy.conf" -s stop
  cat > "$WORK/proxy.toml" <<CONF
[replay]
rate_limit = 0
CONF
  start_outpost --config "$WORK/proxy.toml" --upstream "http://127.0.0.1:$UP" --data-dir "$WORK/data-proxy"
  read -r rps p50 p99 _ < <(measure "http://127.0.0.1:$OUTPOST_PORT/products")
  row "outpost network-first (forward + store)" "$rps" "$p50" "$p99"
  echo "outpost/direct: $(python3 -c "print(f'{$rps/$direct:.0%}')")" >&2
  stop_upstream
  curl -s -o /dev/null "http://127.0.0.1:$OUTPOST_PORT/products"
  read -r rps p50 p99 non2xx < <(measure "http://127.0.0.1:$OUTPOST_PORT/products")
  row "outpost, upstream down (stale from memory)" "$rps" "$p50" "$p99"
  [ "$non2xx" = "0" ] || echo "warning: $non2xx non-2xx answers offline" >&2
  stop_outpost
  echo
}

post_script() {
  cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"product":1,"qty":1,"note":"benchmark order"}'
wrk.headers["Content-Type"] = "application/json"
LUA
  echo "$WORK/post.lua"
}

bench_writes() {  # label, serve args...
  local label=$1; shift
  local script; script=$(post_script)
  local dead; dead=$(free_port)  # nothing listens: the upstream is down
  cat > "$WORK/outbox.toml" <<CONF
[upstream]
url = "http://127.0.0.1:$dead"
[replay]
rate_limit = 0
[cache]
enabled = false
CONF
  start_outpost --config "$WORK/outbox.toml" "$@"
  curl -s -o /dev/null -X POST "http://127.0.0.1:$OUTPOST_PORT/warmup" || true
  local rss0; rss0=$(rss_mb "$OUTPOST_PID")
  for c in 1 16 64; do
    local t=$(( c < 2 ? 1 : 2 ))
    read -r rps p50 p99 non2xx < <(measure "http://127.0.0.1:$OUTPOST_PORT/orders" "$c" "$t" "$script")
    row "$label, concurrency $c" "$rps" "$p50" "$p99"
    [ "$non2xx" = "0" ] || echo "  (non-2xx answers: $non2xx)" >&2
  done
  WRITES_DEPTH=$(depth)
  echo "queued: $WRITES_DEPTH; outpost RSS ${rss0} MB before, $(rss_mb "$OUTPOST_PID") MB after" >&2
  DEAD_PORT=$dead
}

bench_outbox() {
  echo "## Durable writes (202 after fsync), upstream down (wrk POST, -d$DURATION)"
  row "setup" "writes/s" "p50" "p99"
  row "---" "---" "---" "---"
  bench_writes "embedded (redb, group commit)" --data-dir "$WORK/data-outbox"
  while [ "$(depth)" -lt 100000 ]; do
    wrk -t2 -c64 -d5s -s "$WORK/post.lua" "http://127.0.0.1:$OUTPOST_PORT/orders" >/dev/null
  done
  local n; n=$(depth)
  local rss_full; rss_full=$(rss_mb "$OUTPOST_PID")
  echo
  echo "## Replay drain"
  UP=$DEAD_PORT start_upstream_at "$DEAD_PORT"
  local t0 t1; t0=$(date +%s.%N)
  while [ "$(depth)" -gt 0 ]; do sleep 0.1; done
  t1=$(date +%s.%N)
  python3 -c "n=$n; t=$t1-$t0; print(f'| drained {n} queued writes into nginx | {t:.2f} s | {n/t:,.0f} replayed/s | RSS with queue full: $rss_full MB, after: $(rss_mb "$OUTPOST_PID") MB |')"
  stop_outpost
  nginx -p "$WORK" -c "$WORK/nginx-up.conf" -s stop 2>/dev/null || true
  sleep 0.5
  echo
}

start_upstream_at() { UP=$1; start_upstream; }

# Queue DRAIN_ITEMS writes with the upstream down, bring it up, time the drain.
drain_once() {  # label, progress_sync, partitions
  local label=$1 sync=$2 parts=$3 n=${DRAIN_ITEMS:-20000}
  local dead; dead=$(free_port)
  cat > "$WORK/drain.toml" <<CONF
[upstream]
url = "http://127.0.0.1:$dead"
probe_interval = "50ms"
probe_interval_max = "200ms"
[replay]
rate_limit = 0
progress_sync = "$sync"
[cache]
enabled = false
[[route]]
path = "/p/"
partition = "path"
CONF
  cat > "$WORK/drain.lua" <<LUA
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/p/" .. (i % $parts), {["Content-Type"] = "application/json"}, '{"qty":1}')
end
LUA
  rm -rf "$WORK/data-drain"
  start_outpost --config "$WORK/drain.toml" --data-dir "$WORK/data-drain"
  while [ "$(depth)" -lt "$n" ]; do
    wrk -t2 -c64 -d2s -s "$WORK/drain.lua" "http://127.0.0.1:$OUTPOST_PORT/" >/dev/null
  done
  local queued; queued=$(depth)
  start_upstream_at "$dead"
  local t0 t1; t0=$(date +%s.%N)
  while [ "$(depth)" -gt 0 ]; do sleep 0.05; done
  t1=$(date +%s.%N)
  python3 -c "n=$queued; t=$t1-$t0; print(f'| {\"$label\":44} | {n:>7} | {t:6.2f} s | {n/t:>8,.0f} /s |')"
  stop_outpost
  nginx -p "$WORK" -c "$WORK/nginx-up.conf" -s stop 2>/dev/null || true
  sleep 0.5
}

bench_drain() {
  echo "## Replay drain into nginx (items queued with the upstream down, then drained)"
  echo "| setup | items | time | replayed |"
  echo "|---|---|---|---|"
  drain_once "1 partition, default (fsync per answer)" 0s 1
  drain_once "16 partitions, default (fsyncs shared)" 0s 16
  drain_once "1 partition, progress_sync = 10ms" 10ms 1
  drain_once "16 partitions, progress_sync = 10ms" 10ms 16
  echo
}

bench_redis() {
  echo "## Durable writes against the Redis backend (wrk POST, -d$DURATION)"
  row "setup" "writes/s" "p50" "p99"
  row "---" "---" "---" "---"
  for fsync in always everysec; do
    local rp; rp=$(free_port)
    mkdir -p "$WORK/redis-$fsync"
    redis-server --bind 127.0.0.1 --port "$rp" --dir "$WORK/redis-$fsync" --save "" --appendonly yes --appendfsync "$fsync" --daemonize no > "$WORK/redis-$fsync.log" 2>&1 &
    local rpid=$!; PIDS+=("$rpid")
    wait_port "$rp"
    bench_writes "redis appendfsync $fsync" --redis "redis://127.0.0.1:$rp/"
    stop_outpost
    kill "$rpid"; wait "$rpid" 2>/dev/null || true
  done
  echo
}

bench_loadtest() {
  echo "## outpost loadtest through outpost into its mock upstream (chrome.har, --concurrency 32, $DURATION)"
  echo "| setup | req/s | p50 ms | p99 ms | acknowledged | lost | applied twice | drain ms |"
  echo "|---|---|---|---|---|---|---|---|"
  local secs=${DURATION%s}
  for outages in "" "--outage $((secs / 5))s+$((secs / 5))s --outage $((secs * 3 / 5))s+$((secs / 10 + 1))s"; do
    local mock; mock=$(free_port)
    rm -rf "$WORK/data-lt"
    start_outpost --upstream "http://127.0.0.1:$mock" --data-dir "$WORK/data-lt"
    # shellcheck disable=SC2086
    "$OUTPOST" loadtest --har "$ROOT/tests/fixtures/har/chrome.har" --target "http://127.0.0.1:$OUTPOST_PORT" \
      --mock-upstream "127.0.0.1:$mock" $outages --duration "$DURATION" --concurrency 32 \
      --admin "http://127.0.0.1:$ADMIN_PORT" --report "$WORK/lt.json" > /dev/null 2>&1 || true
    python3 - "$WORK/lt.json" "${outages:-no outage}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); m = r.get("mutations", {})
print(f"| {sys.argv[2]:44} | {r['throughput_rps']:>8,.0f} | {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} "
      f"| {m.get('acknowledged')} | {m.get('lost')} | {m.get('applied_twice')} | {m.get('drain_ms')} |")
PY
    stop_outpost
  done
  echo
}

echo "# outpost benchmarks — $(date -u +%F), $(nproc) cores, $(uname -r)"
echo
case "$WHAT" in
  proxy) bench_proxy ;;
  outbox) bench_outbox ;;
  drain) bench_drain ;;
  redis) bench_redis ;;
  loadtest) bench_loadtest ;;
  all) bench_proxy; bench_outbox; bench_drain; bench_redis; bench_loadtest ;;
  *) echo "usage: $0 [proxy|outbox|drain|redis|loadtest|all]" >&2; exit 2 ;;
esac
