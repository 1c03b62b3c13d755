#!/usr/bin/env bash
# Benchmarks for outpost on this machine (loopback only). Not a test: prints figures, and with
# `all` every target of issue #18 (and the side-by-side loads of issue #17) with its ratio, in one
# run on the same machine, ending with a summary table.
#
#   bash bench/run.sh [proxy|stale|writes|drain|probe|rss|burst|loadtest|redis|all]  (default: all)
#
# Environment: DURATION (each wrk row, default 10s), DRAIN_ITEMS (20000), PROBE_OUTAGES (seconds,
# "6 12"), RSS_DEPTHS ("100000 250000 500000 1000000"), WRITES_C ("1 16 64"), BURST_BODY (bytes,
# 1048576), PROXY_ROUNDS (interleaved rounds of the pass-through comparison, 3), OUTPOST_BIN (skip
# the release build and use this binary).
#
# proxy:  pass-through req/s, p50/p99 and CPU per request (wrk -t2 -c64, small JSON answer, fast
#         nginx upstream): direct, nginx reverse proxy, a bare hyper proxy (examples/bare_proxy.rs:
#         the floor of the stack outpost is built on; BARE_BIN skips its build), outpost
#         network-first (caching on), outpost network-only. The four proxies run side by side and
#         are loaded in turn, PROXY_ROUNDS times; each row is the median of its rounds.
# stale:  upstream down, an expired (stale) copy cached: nginx `proxy_cache_use_stale`, Varnish
#         grace, outpost (offline answers from its cache); req/s, p99, CPU per request; and the
#         ceiling: a static nginx answer (2 workers, no proxy, no lookup), the most this load
#         generator gets from any server on this machine.
# writes: acknowledged durable writes/s (202 after fsync), upstream down, concurrency $WRITES_C.
# drain:  replay drain rate, default exactly-once bound and progress_sync = 10ms, 1 and 16
#         partitions (DRAIN_ITEMS queued each time); timed from the first replayed item to an
#         empty queue (noticing the upstream is back is the probe's figure), with outpost's CPU
#         per item. DRAIN_CASES ("SYNC:PARTITIONS ...") runs only those cases.
# probe:  default settings, one write queued, upstream down for each of PROBE_OUTAGES s, then up:
#         time until the queue is drained (the first replayed write answered).
# rss:    RSS with RSS_DEPTHS queued mutations (upstream down).
# burst:  RSS under 64, then 640 (10x) concurrent BURST_BODY-byte writes, upstream down, against
#         the bound the configured limits give.
# loadtest: `outpost loadtest` replaying tests/fixtures/har/chrome.har through outpost into the
#         built-in mock upstream, closed loop (32 in flight), without and with two outages; it waits
#         up to 300 s for the queue to drain (one partition drains at ~1.5 k/s) before counting.
# redis:  acknowledged writes/s against the Redis backend (appendfsync always / everysec); not in
#         `all` (no issue #18 target).
#
# CPU per request = (utime + stime of the server's processes after the wrk run - before) / the
# requests wrk completed, from /proc/PID/stat (nginx: master and workers; Varnish: manager and
# child; outpost: its one process). The load generator and the upstream are not counted.
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

. bench/lib.sh
need wrk wrk
need nginx nginx-light
need curl curl
case "$WHAT" in stale|all) need varnishd varnish ;; esac
case "$WHAT" in redis) need redis-server redis-server ;; esac

wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
py() { python3 -c "$1"; }

if [ -n "${OUTPOST_BIN:-}" ]; then
  OUTPOST=$OUTPOST_BIN
else
  cargo build --release --quiet
  OUTPOST="$ROOT/target/release/outpost"
fi
# The stack's floor for the pass-through rows (examples/bare_proxy.rs); BARE_BIN skips the build.
bare_bin() {
  if [ -n "${BARE_BIN:-}" ]; then echo "$BARE_BIN"; return; fi
  cargo build --release --quiet --example bare_proxy && echo "$ROOT/target/release/examples/bare_proxy"
}
TICKS=$(getconf CLK_TCK)

# Summary rows: target | figure | target value | ratio / met.
SUMMARY=()
summary() { SUMMARY+=("$(printf '| %s | %s | %s | %s |' "$@")"); }
verdict() { py "print('met' if $1 else 'NOT met')"; }

# ---------------------------------------------------------------------------------------------
# Servers

UP=$(free_port)
# nginx answering from its configuration: `name port workers` writes and starts nginx-NAME.conf.
start_answering_nginx() {
  local name=$1 port=$2 workers=$3
  cat > "$WORK/nginx-$name.conf" <<CONF
worker_processes $workers;
pid $WORK/nginx-$name.pid;
error_log $WORK/nginx-$name.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$port;
    location /orders { default_type application/json; return 201 '{"id":1,"ok":true}'; }
    location /p/ { default_type application/json; return 201 '{"id":1,"ok":true}'; }
    location /stale/ { default_type application/json; add_header Cache-Control "max-age=1"; return 200 '{"id":1,"name":"water filter","stock":12}'; }
    location / { default_type application/json; add_header Cache-Control "max-age=60"; return 200 '{"id":1,"name":"water filter","stock":12}'; }
  }
}
CONF
  nginx -p "$WORK" -c "$WORK/nginx-$name.conf"
  wait_port "$port"
}
start_upstream() { start_answering_nginx up "$UP" 1; }
start_upstream_at() { UP=$1; start_upstream; }
stop_upstream() { nginx -p "$WORK" -c "$WORK/nginx-up.conf" -s stop 2>/dev/null || true; sleep 0.5; }

NGX=$(free_port)
# Workers run as the current user (as root, nginx would switch them to nobody, who cannot write
# the cache in this run's private work directory).
NGINX_USER=""
[ "$(id -u)" = 0 ] && NGINX_USER="user root;"
start_nginx_proxy() {  # args: extra http-level and location-level directives (cache)
  local http_extra=${1:-} loc_extra=${2:-}
  cat > "$WORK/nginx-proxy.conf" <<CONF
$NGINX_USER
worker_processes auto;
pid $WORK/nginx-proxy.pid;
error_log $WORK/nginx-proxy.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$UP; keepalive 128; }
  $http_extra
  server {
    listen 127.0.0.1:$NGX;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; $loc_extra }
  }
}
CONF
  nginx -p "$WORK" -c "$WORK/nginx-proxy.conf"
  wait_port "$NGX"
  NGINX_PID=$(cat "$WORK/nginx-proxy.pid")
}
stop_nginx_proxy() { nginx -p "$WORK" -c "$WORK/nginx-proxy.conf" -s stop 2>/dev/null || true; sleep 0.5; }

# The load generator's ceiling: nginx with as many workers as cores answering the same small
# JSON from its configuration (no proxy, no cache lookup): no server answers this load faster
# on this machine, since wrk shares its two cores.
STATIC=$(free_port)
start_static() {
  start_answering_nginx static "$STATIC" auto
  STATIC_PID=$(cat "$WORK/nginx-static.pid")
}
stop_static() { nginx -p "$WORK" -c "$WORK/nginx-static.conf" -s stop 2>/dev/null || true; sleep 0.5; }

VARNISH=$(free_port)
start_varnish() {
  mkdir -p "$WORK/varnish"
  cat > "$WORK/varnish.vcl" <<VCL
vcl 4.1;
backend app {
  .host = "127.0.0.1"; .port = "$UP";
  .probe = { .url = "/"; .interval = 500ms; .timeout = 200ms; .window = 2; .threshold = 1; }
}
sub vcl_backend_response { set beresp.grace = 1h; }
VCL
  varnishd -F -j none -n "$WORK/varnish/work" -a 127.0.0.1:"$VARNISH" -f "$WORK/varnish.vcl" \
    -s malloc,64m > "$WORK/varnish.log" 2>&1 &
  VARNISH_PID=$!
  PIDS+=("$VARNISH_PID")
  wait_port "$VARNISH"
}
stop_varnish() { kill "$VARNISH_PID" 2>/dev/null || true; wait "$VARNISH_PID" 2>/dev/null || true; }

start_outpost() {  # args: extra serve args...
  local port admin
  port=$(free_port); admin=$(free_port)
  "$OUTPOST" serve --listen 127.0.0.1:"$port" --admin-listen 127.0.0.1:"$admin" "$@" > "$WORK/outpost.log" 2>&1 &
  OUTPOST_PID=$!
  PIDS+=("$OUTPOST_PID")
  OUTPOST_PORT=$port; ADMIN_PORT=$admin
  wait_port "$port"
  wait_port "$admin"
}
stop_outpost() { kill "$OUTPOST_PID" 2>/dev/null || true; wait "$OUTPOST_PID" 2>/dev/null || true; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' /proc/"$1"/status; }
depth() { curl -s "http://127.0.0.1:$ADMIN_PORT/status" | grep -o '"queue_depth":[0-9]*' | cut -d: -f2; }

# CPU ticks (utime + stime) of the given processes and their children.
cpu_ticks() {
  local total=0 p q v
  for p in "$@"; do
    for q in $p $(pgrep -P "$p" || true); do
      v=$(sed 's/^.*) //' /proc/"$q"/stat 2>/dev/null | awk '{print $12 + $13}')
      total=$((total + ${v:-0}))
    done
  done
  echo "$total"
}

# wrk → "req/s p50 p99 non2xx requests cpu_us_per_request"; CPU of the processes in $CPU_PIDS.
measure() {
  local url=$1 conns=${2:-64} threads=${3:-2} script=${4:-}
  local out c0 c1
  c0=$(cpu_ticks ${CPU_PIDS:-})
  if [ -n "$script" ]; then
    out=$(wrk -t"$threads" -c"$conns" -d"$DURATION" --latency -s "$script" "$url")
  else
    out=$(wrk -t"$threads" -c"$conns" -d"$DURATION" --latency "$url")
  fi
  c1=$(cpu_ticks ${CPU_PIDS:-})
  local rps p50 p99 non2xx n cpu
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  cpu=$(py "print(f'{($c1 - $c0) / $TICKS / max($n, 1) * 1e6:.1f}' if '${CPU_PIDS:-}' else '-')")
  echo "$rps $p50 $p99 ${non2xx:-0} $n $cpu"
}
# Python for the scripts below: ms(v) turns wrk's "306.00us", "1.02ms" or "1.20s" into ms.
PY_MS="
def ms(v):
    for u, f in (('us', 1e-3), ('ms', 1), ('s', 1e3)):
        if v.endswith(u): return float(v[:-len(u)]) * f
    return float('nan')"
ms() { py "$PY_MS
print(ms('$1'))"; }
ratio() { py "print(f'{$1 / $2:.2f}x')"; }

row() { printf '| %-46s | %10s | %8s | %8s | %10s |\n' "$@"; }
header() { row "setup" "$1" "p50" "p99" "CPU µs/req"; row "---" "---" "---" "---" "---"; }

# ---------------------------------------------------------------------------------------------
# Pass-through

# One setup's rounds (measure's output, a line each) → "rps p50 p99 cpu per-round-rps": the median
# of each column (p50 and p99 in ms), and each round's req/s.
median_of() {
  ROWS=$1 py "$PY_MS
import os, statistics as st
rows = [r.split() for r in os.environ['ROWS'].strip().splitlines()]
rps = [float(r[0]) for r in rows]
cpu = [float(r[5]) for r in rows if r[5] != '-']
print(f'{st.median(rps):.2f}', f'{st.median([ms(r[1]) for r in rows]):.2f}ms',
      f'{st.median([ms(r[2]) for r in rows]):.2f}ms',
      f'{st.median(cpu):.1f}' if cpu else '-', ','.join(f'{x:.0f}' for x in rps))"
}

bench_proxy() {
  local rounds=${PROXY_ROUNDS:-3}
  echo "## Pass-through (wrk -t2 -c64 -d$DURATION, small JSON answer, nginx upstream with 1 worker; medians of $rounds interleaved rounds)"
  header "req/s"
  start_upstream
  CPU_PIDS="" read -r rps p50 p99 _ < <(CPU_PIDS="" measure "http://127.0.0.1:$UP/products")
  row "direct to upstream (nginx, 1 worker)" "$rps" "$p50" "$p99" "-"
  # Every proxy runs for the whole comparison and each round loads them in turn, so that the
  # machine's drift (this shared box moves by 20 % within minutes) reaches all of them alike.
  start_nginx_proxy
  local bare bare_port bare_pid
  bare=$(bare_bin); bare_port=$(free_port)
  "$bare" 127.0.0.1:"$bare_port" 127.0.0.1:"$UP" 2 > "$WORK/bare.log" 2>&1 &
  bare_pid=$!; PIDS+=("$bare_pid")
  wait_port "$bare_port"
  printf '[replay]\nrate_limit = 0\n' > "$WORK/proxy.toml"
  start_outpost --config "$WORK/proxy.toml" --upstream "http://127.0.0.1:$UP" --data-dir "$WORK/data-proxy"
  local nf_pid=$OUTPOST_PID nf_port=$OUTPOST_PORT
  printf '[replay]\nrate_limit = 0\n[[route]]\npath = "/"\nread = "network-only"\n' > "$WORK/proxy-no.toml"
  start_outpost --config "$WORK/proxy-no.toml" --upstream "http://127.0.0.1:$UP" --data-dir "$WORK/data-proxy-no"
  local no_pid=$OUTPOST_PID no_port=$OUTPOST_PORT
  local ngx_rows="" bare_rows="" nf_rows="" no_rows="" r
  for r in $(seq "$rounds"); do
    ngx_rows+="$(CPU_PIDS=$NGINX_PID measure "http://127.0.0.1:$NGX/products")"$'\n'
    bare_rows+="$(CPU_PIDS=$bare_pid measure "http://127.0.0.1:$bare_port/products")"$'\n'
    nf_rows+="$(CPU_PIDS=$nf_pid measure "http://127.0.0.1:$nf_port/products")"$'\n'
    no_rows+="$(CPU_PIDS=$no_pid measure "http://127.0.0.1:$no_port/products")"$'\n'
  done
  kill "$bare_pid" "$nf_pid" "$no_pid" 2>/dev/null || true
  wait "$bare_pid" "$nf_pid" "$no_pid" 2>/dev/null || true
  stop_nginx_proxy
  stop_upstream
  local ngx_rps ngx_p50 ngx_p99 ngx_cpu ngx_all bare_rps bare_p50 bare_p99 bare_cpu bare_all
  local nf_rps nf_p50 nf_p99 nf_cpu nf_all no_rps no_p50 no_p99 no_cpu no_all
  read -r ngx_rps ngx_p50 ngx_p99 ngx_cpu ngx_all < <(median_of "$ngx_rows")
  read -r bare_rps bare_p50 bare_p99 bare_cpu bare_all < <(median_of "$bare_rows")
  read -r nf_rps nf_p50 nf_p99 nf_cpu nf_all < <(median_of "$nf_rows")
  read -r no_rps no_p50 no_p99 no_cpu no_all < <(median_of "$no_rows")
  row "nginx reverse proxy (keepalive pool)" "$ngx_rps" "$ngx_p50" "$ngx_p99" "$ngx_cpu"
  row "bare hyper proxy (examples/bare_proxy.rs)" "$bare_rps" "$bare_p50" "$bare_p99" "$bare_cpu"
  row "outpost network-first (forward + store)" "$nf_rps" "$nf_p50" "$nf_p99" "$nf_cpu"
  row "outpost network-only" "$no_rps" "$no_p50" "$no_p99" "$no_cpu"
  echo
  echo "req/s in each round: nginx $ngx_all; bare $bare_all; network-first $nf_all; network-only $no_all"
  local per_round
  per_round=$(py "
a = [float(x) for x in '$nf_all'.split(',')]; b = [float(x) for x in '$ngx_all'.split(',')]
print(', '.join(f'{x / y:.2f}x' for x, y in zip(a, b)))")
  echo "network-first / nginx: $(ratio "$nf_rps" "$ngx_rps") req/s (each round: $per_round), p99 $nf_p99 vs $ngx_p99, CPU/req $(ratio "$nf_cpu" "$ngx_cpu");" \
    "network-only / nginx: $(ratio "$no_rps" "$ngx_rps") req/s, CPU/req $(ratio "$no_cpu" "$ngx_cpu")"
  echo
  local nf_p99ms ngx_p99ms
  nf_p99ms=$(ms "$nf_p99"); ngx_p99ms=$(ms "$ngx_p99")
  summary "network-first req/s vs nginx reverse proxy (medians of $rounds rounds)" "$nf_rps vs $ngx_rps ($(ratio "$nf_rps" "$ngx_rps"); rounds: $per_round)" ">= 1.0x (aim 1.3x)" "$(verdict "$nf_rps >= $ngx_rps")"
  summary "network-first p99 vs nginx" "$nf_p99 vs $ngx_p99" "<= nginx" "$(verdict "$nf_p99ms <= $ngx_p99ms")"
  summary "network-only req/s vs nginx, vs network-first" "$no_rps ($(ratio "$no_rps" "$ngx_rps") nginx, $(ratio "$no_rps" "$nf_rps") network-first), p99 $no_p99" "above network-first" "$(verdict "$no_rps > $nf_rps")"
  summary "CPU per request, pass-through (µs)" "nginx $ngx_cpu, network-first $nf_cpu ($(ratio "$nf_cpu" "$ngx_cpu")), network-only $no_cpu ($(ratio "$no_cpu" "$ngx_cpu"))" "reported" "-"
  summary "the stack's floor: a bare hyper proxy vs nginx" "$bare_rps req/s ($(ratio "$bare_rps" "$ngx_rps")), CPU $bare_cpu µs/req ($(ratio "$bare_cpu" "$ngx_cpu")); network-first is $(ratio "$nf_rps" "$bare_rps") of it" "reported" "-"
}

# ---------------------------------------------------------------------------------------------
# Stale serving with the upstream down

bench_stale() {
  echo "## Stale serving, upstream down (wrk -t2 -c64 -d$DURATION; the cached copy expired, max-age=1)"
  header "req/s"
  local url_path=/stale/item
  # nginx: proxy_cache with use_stale (and background update, the fastest stale setting).
  start_upstream
  mkdir -p "$WORK/nginx-cache"
  start_nginx_proxy "proxy_cache_path $WORK/nginx-cache keys_zone=c:10m;" \
    "proxy_cache c; proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504; proxy_cache_background_update on; proxy_cache_lock on;"
  curl -s -o /dev/null "http://127.0.0.1:$NGX$url_path"
  stop_upstream; sleep 1.6
  local st; st=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NGX$url_path")
  read -r n_rps _p50 n_p99 n_non _ n_cpu < <(CPU_PIDS=$NGINX_PID measure "http://127.0.0.1:$NGX$url_path")
  row "nginx proxy_cache_use_stale" "$n_rps" "$_p50" "$n_p99" "$n_cpu"
  [ "$st" = 200 ] && [ "$n_non" = 0 ] || echo "  (nginx: first stale answer $st, non-2xx $n_non)" >&2
  stop_nginx_proxy
  # Varnish: grace 1h, backend probe (sick while down).
  start_upstream
  start_varnish
  sleep 1.2  # the probe sees the backend healthy
  curl -s -o /dev/null "http://127.0.0.1:$VARNISH$url_path"
  stop_upstream; sleep 1.6
  st=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$VARNISH$url_path")
  read -r v_rps _p50 v_p99 v_non _ v_cpu < <(CPU_PIDS=$VARNISH_PID measure "http://127.0.0.1:$VARNISH$url_path")
  row "Varnish grace (1h, backend probe)" "$v_rps" "$_p50" "$v_p99" "$v_cpu"
  [ "$st" = 200 ] && [ "$v_non" = 0 ] || echo "  (varnish: first stale answer $st, non-2xx $v_non)" >&2
  stop_varnish
  # outpost: network-first, offline → its cached copy.
  start_upstream
  printf '[replay]\nrate_limit = 0\n' > "$WORK/stale.toml"
  start_outpost --config "$WORK/stale.toml" --upstream "http://127.0.0.1:$UP" --data-dir "$WORK/data-stale"
  curl -s -o /dev/null "http://127.0.0.1:$OUTPOST_PORT$url_path"
  stop_upstream; sleep 1.6
  st=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$OUTPOST_PORT$url_path")
  read -r o_rps _p50 o_p99 o_non _ o_cpu < <(CPU_PIDS=$OUTPOST_PID measure "http://127.0.0.1:$OUTPOST_PORT$url_path")
  row "outpost network-first, offline (from cache)" "$o_rps" "$_p50" "$o_p99" "$o_cpu"
  [ "$st" = 200 ] && [ "$o_non" = 0 ] || echo "  (outpost: first stale answer $st, non-2xx $o_non)" >&2
  stop_outpost
  # The ceiling: the same answer from a static nginx, nothing looked up.
  start_static
  read -r c_rps _p50 c_p99 _ _ c_cpu < <(CPU_PIDS=$STATIC_PID measure "http://127.0.0.1:$STATIC$url_path")
  row "ceiling: static nginx answer (2 workers)" "$c_rps" "$_p50" "$c_p99" "$c_cpu"
  stop_static
  echo
  local best; best=$(py "print(max($n_rps, $v_rps))")
  echo "outpost / nginx: $(ratio "$o_rps" "$n_rps"), outpost / Varnish: $(ratio "$o_rps" "$v_rps"); CPU/req outpost / nginx $(ratio "$o_cpu" "$n_cpu"), / Varnish $(ratio "$o_cpu" "$v_cpu")"
  echo
  summary "stale serving, upstream down, vs the better of nginx use_stale and Varnish grace" "outpost $o_rps, nginx $n_rps, Varnish $v_rps ($(ratio "$o_rps" "$best"))" ">= 2x" "$(verdict "$o_rps >= 2 * $best")"
  summary "stale serving vs the load generator's ceiling (a static nginx answer)" "outpost $(ratio "$o_rps" "$c_rps") of $c_rps; 2x the better would be $(py "print(round(2 * $best))") req/s ($(ratio "2 * $best" "$c_rps") of the ceiling)" "-" "-"
  summary "CPU per request, stale serving (µs)" "outpost $o_cpu, nginx $n_cpu, Varnish $v_cpu, static nginx $c_cpu" "reported" "-"
}

# ---------------------------------------------------------------------------------------------
# Durable writes

post_script() {
  cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"product":1,"qty":1,"note":"benchmark order"}'
wrk.headers["Content-Type"] = "application/json"
LUA
  echo "$WORK/post.lua"
}

offline_config() {  # file; the upstream port nothing listens on
  cat > "$1" <<CONF
[upstream]
url = "http://127.0.0.1:$2"
[replay]
rate_limit = 0
[queue]
# The bench queues past the default limits (1 000 000 items, 1 GiB) on purpose.
max_depth = 0
max_bytes = 0
[cache]
enabled = false
CONF
}

bench_writes_with() {  # label, serve args...
  local label=$1; shift
  local script; script=$(post_script)
  local dead; dead=$(free_port)
  offline_config "$WORK/outbox.toml" "$dead"
  start_outpost --config "$WORK/outbox.toml" "$@"
  curl -s -o /dev/null -X POST "http://127.0.0.1:$OUTPOST_PORT/warmup" || true
  for c in ${WRITES_C:-1 16 64}; do
    local t=$(( c < 2 ? 1 : 2 ))
    read -r rps p50 p99 non2xx _ cpu < <(CPU_PIDS=$OUTPOST_PID measure "http://127.0.0.1:$OUTPOST_PORT/orders" "$c" "$t" "$script")
    row "$label, concurrency $c" "$rps" "$p50" "$p99" "$cpu"
    [ "$non2xx" = "0" ] || echo "  (non-2xx answers: $non2xx)" >&2
    [ "$c" = 64 ] && W64_RPS=$rps && W64_P99=$p99
  done
  echo "queued: $(depth)" >&2
  stop_outpost
}

bench_writes() {
  echo "## Durable writes (202 after fsync), upstream down (wrk POST, -d$DURATION)"
  header "writes/s"
  W64_RPS=""
  bench_writes_with "embedded (redb, group commit)" --data-dir "$WORK/data-outbox"
  echo
  [ -n "$W64_RPS" ] && summary "durable acknowledged writes, c64" "$W64_RPS /s, p99 $W64_P99" ">= 40 000 /s" "$(verdict "$W64_RPS >= 40000")"
}

# ---------------------------------------------------------------------------------------------
# Replay drain

drain_once() {  # label, progress_sync, partitions → DRAINED (items/s)
  local label=$1 sync=$2 parts=$3 n=${DRAIN_ITEMS:-20000}
  local dead; dead=$(free_port)
  drain_config "$WORK/drain.toml" "$dead" "$sync"
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
  # The clock starts at the first replayed item: noticing that the upstream is back is the
  # probe row's figure, not the drain's.
  local t0 t1 c0 c1 from left
  while left=$(depth) && [ "$left" -ge "$queued" ]; do sleep 0.01; done
  t0=$(date +%s.%N); c0=$(cpu_ticks "$OUTPOST_PID"); from=$left
  while [ "$(depth)" -gt 0 ]; do sleep 0.02; done
  t1=$(date +%s.%N); c1=$(cpu_ticks "$OUTPOST_PID")
  DRAINED=$(py "print(round($from / ($t1 - $t0)))")
  py "print(f'| {\"$label\":46} | {$from:>10} | {$t1 - $t0:6.2f} s | {$DRAINED:>8,} /s | {($c1 - $c0) / $TICKS / $from * 1e6:.1f} |')"
  stop_outpost
  stop_upstream
}

bench_drain() {
  echo "## Replay drain into nginx (items queued with the upstream down, then drained; rate limit off)"
  echo "| setup | items | time | replayed | outpost CPU µs/item |"
  echo "|---|---|---|---|---|"
  if [ -n "${DRAIN_CASES:-}" ]; then
    local case
    for case in $DRAIN_CASES; do drain_once "${case#*:} partitions, progress_sync = ${case%%:*}" "${case%%:*}" "${case#*:}"; done
    return
  fi
  drain_once "1 partition, default (fsync per answer)" 0s 1; local d1=$DRAINED
  drain_once "16 partitions, default (fsyncs grouped)" 0s 16; local d16=$DRAINED
  drain_once "1 partition, progress_sync = 10ms" 10ms 1; local w1=$DRAINED
  drain_once "16 partitions, progress_sync = 10ms" 10ms 16; local w16=$DRAINED
  echo
  summary "replay drain, 1 partition, default bound" "$d1 /s" ">= 1 500 /s" "$(verdict "$d1 >= 1500")"
  summary "replay drain, 16 partitions, default bound" "$d16 /s" ">= 10 000 /s" "$(verdict "$d16 >= 10000")"
  summary "replay drain, progress_sync = 10ms (1 / 16 partitions)" "$w1 /s / $w16 /s" ">= 25 000 /s" "1: $(verdict "$w1 >= 25000"), 16: $(verdict "$w16 >= 25000")"
}

# ---------------------------------------------------------------------------------------------
# Upstream back → first replayed write

bench_probe() {
  local outages=${PROBE_OUTAGES:-6 12} worst=0 outage took
  echo "## Upstream back → first replayed write (default settings; outages of ${outages// /, } s)"
  echo "| outage | upstream listening again → queue drained (first replayed write answered) |"
  echo "|---|---|"
  for outage in $outages; do
    local port; port=$(free_port)
    rm -rf "$WORK/data-probe"
    start_outpost --upstream "http://127.0.0.1:$port" --data-dir "$WORK/data-probe"
    local code; code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
      -d '{"qty":1}' "http://127.0.0.1:$OUTPOST_PORT/orders")
    [ "$code" = 202 ] || echo "  (the write answered $code, not 202)" >&2
    sleep "$outage"
    start_upstream_at "$port"
    local t0 t1; t0=$(date +%s.%N)
    while [ "$(depth)" != 0 ]; do sleep 0.01; done
    t1=$(date +%s.%N)
    took=$(py "print(f'{$t1 - $t0:.3f}')")
    echo "| $outage s | $took s |"
    worst=$(py "print(max($worst, $took))")
    stop_outpost
    stop_upstream
  done
  echo
  summary "upstream back → first replayed write (default settings, outages ${outages// /, } s)" "worst $worst s" "< 1 s" "$(verdict "$worst < 1")"
}

# ---------------------------------------------------------------------------------------------
# Memory

bench_rss() {
  echo "## RSS with a deep queue (small writes queued with the upstream down; default store.page_cache_bytes, 8 MiB)"
  echo "| queued | RSS MB | database file MB |"
  echo "|---|---|---|"
  local dead; dead=$(free_port)
  offline_config "$WORK/rss.toml" "$dead"
  rm -rf "$WORK/data-rss"
  start_outpost --config "$WORK/rss.toml" --data-dir "$WORK/data-rss"
  local script; script=$(post_script)
  echo "| 0 | $(rss_mb "$OUTPOST_PID") | - |"
  local first="" last="" d
  for target in ${RSS_DEPTHS:-100000 250000 500000 1000000}; do
    while [ "$(depth)" -lt "$target" ]; do
      wrk -t2 -c64 -d2s -s "$script" "http://127.0.0.1:$OUTPOST_PORT/orders" >/dev/null
    done
    d=$(depth); last=$(rss_mb "$OUTPOST_PID")
    [ -n "$first" ] || first=$last
    echo "| $d | $last | $(du -sm "$WORK/data-rss" | cut -f1) |"
  done
  echo
  stop_outpost
  # Flat: ten times the depth costs less than a tenth more memory.
  summary "RSS with ${d} queued mutations" "$last MB (at the first depth: $first MB)" "< 100 MB, flat (deepest <= 1.1 x first)" "$(verdict "$last < 100 and $last <= 1.1 * $first")"
}

bench_burst() {
  local size=${BURST_BODY:-1048576}
  echo "## RSS under a burst of large bodies ($size bytes each, upstream down, every one queued; -d$DURATION)"
  echo "| concurrency | writes/s | non-2xx | peak RSS MB | RSS once settled MB |"
  echo "|---|---|---|---|---|"
  local dead; dead=$(free_port)
  offline_config "$WORK/burst.toml" "$dead"
  rm -rf "$WORK/data-burst"
  start_outpost --config "$WORK/burst.toml" --data-dir "$WORK/data-burst"
  python3 -c "print('x' * $size, end='')" > "$WORK/big.body"
  cat > "$WORK/big.lua" <<LUA
local f = io.open("$WORK/big.body", "rb"); local body = f:read("*a"); f:close()
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/big/" .. i, {["Content-Type"] = "application/octet-stream"}, body)
end
LUA
  local base; base=$(rss_mb "$OUTPOST_PID")
  local peak_all=0 c
  for c in 64 640; do
    ( peak=0; while kill -0 "$OUTPOST_PID" 2>/dev/null; do
        r=$(awk '/VmRSS/ {print $2}' /proc/"$OUTPOST_PID"/status 2>/dev/null || echo 0)
        [ "${r:-0}" -gt "$peak" ] && peak=$r && echo "$peak" > "$WORK/peak"
        sleep 0.05; done ) &
    local sampler=$!
    echo 0 > "$WORK/peak"
    read -r rps _ _ non _ _ < <(CPU_PIDS="" measure "http://127.0.0.1:$OUTPOST_PORT/" "$c" 2 "$WORK/big.lua")
    # Requests wrk left in flight are still being stored: let them finish.
    local before=-1 now
    for _ in $(seq 1 60); do
      now=$(depth); [ "$now" = "$before" ] && break; before=$now; sleep 1
    done
    kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
    local peak; peak=$(py "print(f'{$(cat "$WORK/peak") / 1024:.1f}')")
    echo "| $c | $rps | $non | $peak | $(rss_mb "$OUTPOST_PID") |"
    peak_all=$(py "print(max($peak_all, $peak))")
  done
  echo
  # What the configured limits allow (defaults; the memory cache is off here): the process at
  # rest; the store's page cache (store.page_cache_bytes, 8 MiB); the bodies held at once
  # (queue.max_buffered_bytes, 64 MiB), each about three times at its peak (the body, its
  # encoded record, the store's pages in the write group); and what hyper has read ahead on
  # each connection waiting for its turn (at most its 64 KiB first read).
  local bound; bound=$(py "print(f'{$base + 8 * 1.048576 + 3 * 64 * 1.048576 + 640 * 0.065536:.0f}')")
  echo "base RSS $base MB; bound from the limits: $base + 8 MiB (store.page_cache_bytes) + 3 x 64 MiB (queue.max_buffered_bytes: body, encoded record, store pages) + 640 x 64 KiB (read-ahead of waiting connections) = $bound MB"
  echo
  stop_outpost
  summary "RSS under a 10x burst of large bodies (640 x $size B)" "peak $peak_all MB" "<= $bound MB (limits)" "$(verdict "$peak_all <= $bound")"
}

# ---------------------------------------------------------------------------------------------
# Redis backend

bench_redis() {
  need redis-server redis-server
  echo "## Durable writes against the Redis backend (wrk POST, -d$DURATION)"
  header "writes/s"
  for fsync in always everysec; do
    local rp; rp=$(free_port)
    mkdir -p "$WORK/redis-$fsync"
    redis-server --bind 127.0.0.1 --port "$rp" --dir "$WORK/redis-$fsync" --save "" --appendonly yes --appendfsync "$fsync" --daemonize no > "$WORK/redis-$fsync.log" 2>&1 &
    local rpid=$!; PIDS+=("$rpid")
    wait_port "$rp"
    bench_writes_with "redis appendfsync $fsync" --redis "redis://127.0.0.1:$rp/"
    kill "$rpid"; wait "$rpid" 2>/dev/null || true
  done
  echo
}

# ---------------------------------------------------------------------------------------------
# HAR-driven load

bench_loadtest() {
  echo "## outpost loadtest through outpost into its mock upstream (chrome.har, --concurrency 32, $DURATION)"
  echo "| setup | req/s | p50 ms | p99 ms | acknowledged | lost | applied twice | drain ms |"
  echo "|---|---|---|---|---|---|---|---|"
  local secs=${DURATION%s}
  local lost_total=0 twice_total=0
  for outages in "" "--outage $((secs / 5))s+$((secs / 5))s --outage $((secs * 3 / 5))s+$((secs / 10 + 1))s"; do
    local mock; mock=$(free_port)
    rm -rf "$WORK/data-lt" "$WORK/lt.json"
    start_outpost --upstream "http://127.0.0.1:$mock" --data-dir "$WORK/data-lt"
    # shellcheck disable=SC2086
    "$OUTPOST" loadtest --har "$ROOT/tests/fixtures/har/chrome.har" --target "http://127.0.0.1:$OUTPOST_PORT" \
      --mock-upstream "127.0.0.1:$mock" $outages --duration "$DURATION" --concurrency 32 \
      --admin "http://127.0.0.1:$ADMIN_PORT" --drain-timeout 300s --report "$WORK/lt.json" > /dev/null 2>&1 || true
    local res
    res=$(python3 - "$WORK/lt.json" "${outages:-no outage}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); m = r.get("mutations", {})
print(f"| {sys.argv[2]:46} | {r['throughput_rps']:>8,.0f} | {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} "
      f"| {m.get('acknowledged')} | {m.get('lost')} | {m.get('applied_twice')} | {m.get('drain_ms')} |")
print(m.get('lost', 1), m.get('applied_twice', 1))
PY
    ) || res=$'| loadtest failed: no report |\n1 1'
    echo "$res" | head -1
    read -r l t < <(echo "$res" | tail -1)
    lost_total=$((lost_total + l)); twice_total=$((twice_total + t))
    stop_outpost
  done
  echo
  summary "HAR-driven load (outpost loadtest, with and without outages)" "lost $lost_total, applied twice $twice_total" "0 and 0" "$(verdict "$lost_total == 0 and $twice_total == 0")"
}

print_summary() {
  [ "${#SUMMARY[@]}" -gt 0 ] || return 0
  echo "## Summary (issue #18 targets; one run, same machine)"
  echo "| target | figure | target value | ratio / met? |"
  echo "|---|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
}

echo "# outpost benchmarks — $(date -u '+%F %H:%M UTC'), $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
case "$WHAT" in
  proxy) bench_proxy ;;
  stale) bench_stale ;;
  writes|outbox) bench_writes ;;
  drain) bench_drain ;;
  probe) bench_probe ;;
  rss) bench_rss ;;
  burst) bench_burst ;;
  redis) bench_redis ;;
  loadtest) bench_loadtest ;;
  all) bench_proxy; bench_stale; bench_writes; bench_drain; bench_probe; bench_rss; bench_burst; bench_loadtest ;;
  *) echo "usage: $0 [proxy|stale|writes|drain|probe|rss|burst|loadtest|redis|all]" >&2; exit 2 ;;
esac
print_summary
