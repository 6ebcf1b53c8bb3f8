#!/bin/bash
# Two builds of treescale, measured in turns on one workload: a publisher on
# one node, a subscriber on a second, 1,000,000 events of 128 B through
# `treescale bench`. Prints msg/s, lost, and the CPU both nodes spent (from
# /proc), which the host's noise moves less than rates. Alternating runs
# share the noise; compare medians.
#
#   benches/ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [-- NODE_FLAGS...]
#
# Keep the old build out of the shared target/ (docs/performance.md):
#   git worktree add /tmp/old REV && (cd /tmp/old && cargo build --release)
# A flag given after `--` goes to every node of both builds; to measure a
# flag, pass the same binary twice through a wrapper that adds it.
set -eu
if [ $# -lt 2 ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
OLD=$1 NEW=$2
shift 2
ROUNDS=3
if [ $# -gt 0 ] && [ "$1" != -- ]; then ROUNDS=$1; shift; fi
[ "${1:-}" = -- ] && shift
DIR=$(mktemp -d)
export TREESCALE_CERTS=$DIR/certs
"$OLD" certs init >/dev/null
# Every node this script started ends with it, also on failure.
cleanup() {
  local jobs
  jobs=$(jobs -p)
  [ -z "$jobs" ] || kill $jobs 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

cpu_ms() { awk '{ print ($14 + $15) * 10 }' "/proc/$1/stat"; }

run() {
  local bin=$1 label=$2 cluster="ab-$$-$RANDOM"
  shift 2
  rm -rf "$DIR/n1" "$DIR/n2"
  "$bin" node --listen 127.0.0.1:7811 --data-dir "$DIR/n1" --cluster "$cluster" \
    --interface lo --no-mdns "$@" >"$DIR/n1.log" 2>&1 &
  local first=$!
  "$bin" node --listen 127.0.0.1:7812 --data-dir "$DIR/n2" --cluster "$cluster" \
    --interface lo --no-mdns --peer 127.0.0.1:7811 "$@" >"$DIR/n2.log" 2>&1 &
  local second=$!
  sleep 2
  local result
  result=$("$bin" bench --node 127.0.0.1:7811 --node 127.0.0.1:7812 --msgs 1000000 --json | tail -1)
  local cpu=$(($(cpu_ms $first) + $(cpu_ms $second)))
  kill $first $second
  wait $first $second 2>/dev/null || true
  python3 -c 'import json, sys
r = json.loads(sys.argv[1])
rate, lost = r["msgs_per_sec"], r["lost"]
print(f"{sys.argv[2]}  {rate:>9,.0f} msg/s  lost {lost}  nodes {sys.argv[3]} ms CPU")' \
    "$result" "$label" "$cpu"
}

node_flags=("$@")
for _ in $(seq "$ROUNDS"); do
  run "$OLD" old "${node_flags[@]}"
  run "$NEW" new "${node_flags[@]}"
done
