# Shared by the bench scripts (sourced, not run): tools, ports, the binary, callgrind totals.

# `need BIN PACKAGE`: install the Debian package when the command is missing.
need() {
  local bin=$1 pkg=$2
  if ! command -v "$bin" >/dev/null 2>&1; then
    echo "installing $pkg" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  fi
}

# A free loopback port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# The outpost binary to measure: $OUTPOST_BIN, or a fresh release build.
outpost_bin() {
  if [ -n "${OUTPOST_BIN:-}" ]; then echo "$OUTPOST_BIN"; else cargo build --release --quiet && echo target/release/outpost; fi
}

# `callgrind_total DIR`: the instructions counted in DIR/cg.out* (one file per thread).
callgrind_total() {
  local total=0 f t
  for f in "$1"/cg.out*; do
    t=$({ grep -m1 '^totals:' "$f" || true; } | awk '{print $2}'); total=$((total + ${t:-0}))
  done
  echo "$total"
}

# `drain_config FILE UPSTREAM_PORT PROGRESS_SYNC`: the drain benches' outpost config: replay
# unthrottled, queue limits off, no cache, one partition per `/p/N` path.
drain_config() {
  cat > "$1" <<CONF
[upstream]
url = "http://127.0.0.1:$2"
[replay]
rate_limit = 0
progress_sync = "$3"
[queue]
max_depth = 0
max_bytes = 0
[cache]
enabled = false
[[route]]
path = "/p/"
partition = "path"
CONF
}
