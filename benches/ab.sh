#!/bin/bash
# Two builds of treescale, measured in turns on one workload through
# `treescale bench`, with the CPU the nodes spent during it (from /proc),
# which the host's noise moves less than rates. Alternating runs share the
# noise; compare medians, not counts of rounds one side won.
#
#   benches/ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [-- NODE_FLAGS...]
#
# AB_WORKLOAD picks the workload (the rows of `cargo bench --bench compare`):
#   two-nodes  (default) 1,000,000 events of 128 B, publisher on one node,
#              subscriber on a second: msg/s
#   fan-out    500,000 events of 512 B to a subscriber on each of 4 nodes,
#              after the tree settled: deliveries/s
#   latency    50,000 events at 10,000/s across 2 nodes: p50 and p99
#              (AB_MSGS sets the count: a longer run, less noise)
#
# Keep the old build out of the shared target/ (docs/performance.md):
#   git worktree add /tmp/old REV && (cd /tmp/old && cargo build --release)
# A flag given after `--` goes to every node of both builds; to measure a
# flag, pass the same binary twice through a wrapper that adds it.
set -eu
if [ $# -lt 2 ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
OLD=$1 NEW=$2
shift 2
ROUNDS=3
if [ $# -gt 0 ] && [ "$1" != -- ]; then ROUNDS=$1; shift; fi
[ "${1:-}" = -- ] && shift
case ${AB_WORKLOAD:-two-nodes} in
  two-nodes) NODES=2 SETTLE=2 WORKLOAD=(--msgs 1000000) ;;
  # A tree of 4 may still rebalance 5 s after it formed (benches/compare.rs).
  fan-out) NODES=4 SETTLE=8 WORKLOAD=(--msgs 500000 --subs 4 --spread --size 512) ;;
  latency) NODES=2 SETTLE=2 WORKLOAD=(--msgs ${AB_MSGS:-50000} --rate 10000) ;;
  *)
    echo "error: AB_WORKLOAD is two-nodes, fan-out or latency, not '$AB_WORKLOAD'" >&2
    exit 2
    ;;
esac
. "$(dirname "$0")/common/scratch.sh"
export TREESCALE_CERTS=$DIR/certs
"$OLD" certs init >/dev/null

cpu_ms() { awk '{ print ($14 + $15) * 10 }' "/proc/$1/stat"; }
nodes_cpu_ms() {
  local total=0 pid
  for pid in "$@"; do total=$((total + $(cpu_ms "$pid"))); done
  echo $total
}

run() {
  local bin=$1 label=$2 cluster="ab-$$-$RANDOM"
  shift 2
  local pids=() addrs=() i addr
  for i in $(seq "$NODES"); do
    addr=127.0.0.1:$((7810 + i))
    rm -rf "$DIR/n$i"
    # The first node is every other's peer: no multicast needed.
    local peer=()
    [ "$i" = 1 ] || peer=(--peer 127.0.0.1:7811)
    "$bin" node --listen "$addr" --data-dir "$DIR/n$i" --cluster "$cluster" \
      --interface lo --no-mdns "${peer[@]}" "$@" >"$DIR/n$i.log" 2>&1 &
    pids+=($!)
    addrs+=(--node "$addr")
  done
  sleep "$SETTLE"
  local before result
  before=$(nodes_cpu_ms "${pids[@]}")
  result=$("$bin" bench "${addrs[@]}" "${WORKLOAD[@]}" --json | tail -1)
  local cpu=$(($(nodes_cpu_ms "${pids[@]}") - before))
  kill "${pids[@]}"
  wait "${pids[@]}" 2>/dev/null || true
  python3 -c 'import json, sys
r = json.loads(sys.argv[1])
rate, lost = r["msgs_per_sec"], r["lost"]
line = f"{sys.argv[2]}  {rate:>9,.0f} msg/s  lost {lost}  nodes {sys.argv[3]} ms CPU"
if "p99_us" in r:
    line += "  p50 %d us  p99 %d us" % (r["p50_us"], r["p99_us"])
print(line)' \
    "$result" "$label" "$cpu"
}

node_flags=("$@")
# The order alternates (old new, new old, ...): the host's load drifts
# within minutes, and a fixed order gave one build the later, busier
# slot of every round (the same binary twice: one side lower in 7 of 8).
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then
    run "$OLD" old "${node_flags[@]}"
    run "$NEW" new "${node_flags[@]}"
  else
    run "$NEW" new "${node_flags[@]}"
    run "$OLD" old "${node_flags[@]}"
  fi
done
