#!/usr/bin/env bash
# The reliability suite (issue #21): runs every tests/reliability_*.rs in release mode, one test
# at a time, and prints one table of the figures the tests report.
#
#   bash tests/reliability/run.sh          # CI size (what `cargo test` runs too)
#   bash tests/reliability/run.sh --full   # full size (OUTPOST_RELIABILITY_FULL=1)
#   bash tests/reliability/run.sh --debug  # the dev profile instead of --release (quicker build)
#
# Every reliability test prints lines `RELIABILITY {json}` (tests/common/reliability.rs) with at
# least "section" and "name"; this script collects them from the test output (kept in
# target/reliability/output.log) and exits non-zero if any test failed or any figure shows a
# lost or doubled write.
set -uo pipefail
cd "$(dirname "$0")/../.."

full=0
profile=(--release)
for arg in "$@"; do
  case "$arg" in
    --full) full=1 ;;
    --debug) profile=() ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --full, --debug)" >&2; exit 2 ;;
  esac
done
if [ "$full" = 1 ]; then
  export OUTPOST_RELIABILITY_FULL=1
else
  unset OUTPOST_RELIABILITY_FULL
fi

out=target/reliability
mkdir -p "$out"
log="$out/output.log"

tests=()
for file in tests/reliability_*.rs; do
  name=$(basename "$file" .rs)
  tests+=(--test "$name")
done
if [ ${#tests[@]} -eq 0 ]; then
  echo "no tests/reliability_*.rs found" >&2
  exit 1
fi

size=$([ "$full" = 1 ] && echo full || echo ci)
echo "reliability suite ($size size): cargo test ${profile[*]} ${tests[*]} -- --nocapture --test-threads=1; cargo test ${profile[*]} --lib fuzz"
echo "output: $log"
started=$(date +%s)
cargo test "${profile[@]}" --locked "${tests[@]}" -- --nocapture --test-threads=1 >"$log" 2>&1
status=$?
# The fuzz targets (proptest) are unit tests of the library (`src/fuzz.rs`).
cargo test "${profile[@]}" --locked --lib fuzz -- --nocapture --test-threads=1 >>"$log" 2>&1 || status=$?
elapsed=$(( $(date +%s) - started ))

[ ${#profile[@]} -eq 0 ] && size="$size, debug build"
python3 - "$log" "$status" "$elapsed" "$size" <<'PY'
import json, re, sys

log, status, elapsed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
text = open(log, encoding="utf-8", errors="replace").read()
rows = []
for line in text.splitlines():
    at = line.find("RELIABILITY {")
    if at < 0:
        continue
    try:
        rows.append(json.loads(line[at + len("RELIABILITY "):]))
    except json.JSONDecodeError:
        print(f"unparsable figures line: {line}", file=sys.stderr)

passed = sum(int(n) for n in re.findall(r"test result: \w+\. (\d+) passed", text))
failed_tests = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
ignored = sum(int(n) for n in re.findall(r"(\d+) ignored", text))
build_failed = "error: could not compile" in text

order = ["crash", "faults", "resources", "hostile", "fuzz", "isolation"]
sections = sorted({r.get("section", "?") for r in rows},
                  key=lambda s: (order.index(s) if s in order else len(order), s))
ledger = ["acknowledged", "applied_once", "lost", "doubled", "redelivered"]

def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

def cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)

def table(header, body):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
    print(fmt(header))
    print(fmt(["-" * w for w in widths]))
    for row in body:
        print(fmt(row))

print()
print(f"RELIABILITY SUITE — {size} size — {passed} tests passed, {len(failed_tests)} failed, {elapsed} s")
for section in sections:
    srows = [r for r in rows if r.get("section") == section]
    extra = []
    for r in srows:
        for k in r:
            if k not in ("section", "name", "size") and k not in ledger and k not in extra:
                extra.append(k)
    cols = [c for c in ledger if any(c in r for r in srows)] + extra
    print()
    print(f"[{section}]")
    table(["name"] + cols, [[r.get("name", "?")] + [cell(r.get(c)) for c in cols] for r in srows])

def total(key, rows=rows):
    return sum(num(r.get(key)) or 0 for r in rows)

crash = [r for r in rows if r.get("section") == "crash"]
backends = {}
for r in crash:
    b = r.get("backend", "?")
    backends[b] = backends.get(b, 0) + (num(r.get("cycles")) or 0) + (num(r.get("drain_kills")) or 0)
faults = [r for r in rows if r.get("section") == "faults"]
fault_kinds = total("fault_kinds") or len({r.get("name") for r in faults})
recovery = [num(r.get("recovery_to_replay_ms")) for r in faults if num(r.get("recovery_to_replay_ms")) is not None]
print()
print("[totals]")
totals = [
    ("crash cycles (kills) per backend", ", ".join(f"{b}: {n}" for b, n in backends.items()) or "0"),
    ("writes acknowledged", total("acknowledged")),
    ("applied once", total("applied_once")),
    ("lost", total("lost")),
    ("doubled", total("doubled")),
    ("redelivered (allowed: in flight at a crash / answer never received)", total("redelivered")),
    ("fault kinds", fault_kinds),
    ("recovery to first replayed write, max over faults (ms)", max(recovery) if recovery else "-"),
    ("hostile shapes", total("hostile_shapes") or total("shapes", [r for r in rows if r.get("section") == "hostile"])),
    ("fuzz executions", total("fuzz_executions") or total("executions", [r for r in rows if r.get("section") == "fuzz"])),
    ("tests passed / failed / ignored", f"{passed} / {len(failed_tests)} / {ignored}"),
]
table(["figure", "value"], [[k, v] for k, v in totals])

bad = []
if status != 0:
    bad.append(f"cargo test exited with {status}")
if build_failed:
    bad.append("the build failed")
if failed_tests:
    bad.append("failed tests: " + ", ".join(failed_tests))
for r in rows:
    for key in ("lost", "doubled"):
        if (num(r.get(key)) or 0) > 0:
            bad.append(f"{r.get('section')}/{r.get('name')}: {key} {r.get(key)}")
if not rows:
    bad.append("no RELIABILITY figures were reported")
if bad:
    print()
    print("FAILED:")
    for b in bad:
        print(f"  - {b}")
    print(f"(see {log})")
    sys.exit(1)
print()
print("OK: nothing lost, nothing doubled, every test passed")
PY
