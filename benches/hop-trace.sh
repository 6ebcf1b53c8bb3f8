#!/bin/bash
# Where an event's latency goes, hop by hop: a 2-node latency run under
# `perf record` of a few syscalls and scheduler events (cheap enough to
# leave the timing as it is, where strace multiplies it), followed packet
# by packet by benches/hop_trace.py.
#
#   benches/hop-trace.sh nodes BINARY [RATE]   publisher -> node -> node -> subscriber
#   benches/hop-trace.sh relays [RATE]         the same through 2 bare quinn relays
#                                              as processes (benches/compare.rs)
#
# RATE is events per second (default 1,000: one event a packet); the run
# lasts 10 s. Needs `perf` and the right to trace the whole system (root,
# or kernel.perf_event_paranoid = -1). Every process it starts ends with it.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}
[ $# -ge 1 ] || usage
KIND=$1
shift
case $KIND in
  nodes)
    [ $# -ge 1 ] || usage
    BIN=$1
    shift
    ;;
  relays) ;;
  *) usage ;;
esac
RATE=${1:-1000}
case $RATE in
  '' | *[!0-9]* | 0) echo "error: RATE is events per second, a whole number above 0, not '$RATE'" >&2; exit 2 ;;
esac
command -v perf >/dev/null || { echo "error: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }

. "$HERE/common/scratch.sh"

EVENTS=syscalls:sys_enter_sendmsg,syscalls:sys_exit_sendmsg,syscalls:sys_exit_recvmmsg
EVENTS=$EVENTS,sched:sched_wakeup,sched:sched_switch
record() {
  perf record -q -a -o "$DIR/perf.data" -e "$EVENTS" -- "$@" >"$DIR/run.out" 2>"$DIR/run.err" ||
    { cat "$DIR/run.err" >&2; echo "error: perf record failed (are you root?)" >&2; exit 1; }
}

if [ "$KIND" = nodes ]; then
  export TREESCALE_CERTS=$DIR/certs
  "$BIN" certs init >/dev/null
  cluster=trace-$$-$RANDOM
  "$BIN" node --listen 127.0.0.1:7851 --data-dir "$DIR/n1" --cluster "$cluster" \
    --interface lo --no-mdns >"$DIR/n1.log" 2>&1 &
  N1=$!
  "$BIN" node --listen 127.0.0.1:7852 --data-dir "$DIR/n2" --cluster "$cluster" \
    --interface lo --no-mdns --peer 127.0.0.1:7851 >"$DIR/n2.log" 2>&1 &
  N2=$!
  sleep 2
  record "$BIN" bench --node 127.0.0.1:7851 --node 127.0.0.1:7852 \
    --rate "$RATE" --msgs $((RATE * 10)) --json
  tail -1 "$DIR/run.out" | python3 -c 'import json, sys
r = json.load(sys.stdin)
print("treescale bench: p50 %d us, p99 %d us, lost %d" % (r["p50_us"], r["p99_us"], r["lost"]))'
else
  (cd "$HERE/.." && cargo bench --bench compare --no-run -q)
  COMPARE=$(cd "$HERE/.." && cargo bench --bench compare --no-run 2>&1 |
    sed -n 's/.*Executable benches\/compare.rs (\(.*\))/\1/p')
  record env COMPARE_RELAY_CHAIN="2,$RATE" "$COMPARE"
  cat "$DIR/run.out"
fi
perf script -i "$DIR/perf.data" -F comm,pid,tid,cpu,time,event,trace 2>/dev/null >"$DIR/trace.txt"
# The processes that sent at least 100 packets: the chain's.
senders=$(awk '$5 == "syscalls:sys_exit_sendmsg:" { split($2, p, "/"); n[p[1]]++ }
  END { for (pid in n) if (n[pid] >= 100) print pid }' "$DIR/trace.txt")
if [ "$KIND" = nodes ]; then
  # perf ran the bench: the one process besides the nodes that sent.
  bench=$(echo "$senders" | grep -vx -e "$N1" -e "$N2" | head -1)
  CHAIN="bench=$bench node1=$N1 node2=$N2"
else
  # The harness starts the relay next to the subscriber first.
  harness=$(echo "$senders" | sort -n | head -1)
  CHAIN="harness=$harness"
  i=1
  for relay in $(echo "$senders" | sort -n | tail -n +2 | sort -rn); do
    CHAIN="$CHAIN relay$i=$relay"
    i=$((i + 1))
  done
fi
python3 "$HERE/hop_trace.py" "$DIR/trace.txt" $CHAIN
