#!/usr/bin/env python3
"""Where an event's latency goes, hop by hop, from `perf script` output.

    hop_trace.py TRACE PUB HOP [HOP...]    (each NAME=PID, or a PID)

TRACE is `perf script -F comm,pid,tid,cpu,time,event,trace` of a recording
with the tracepoints that benches/hop-trace.sh asks for. PUB is the process
that publishes and subscribes (a `treescale bench`, or the harness of
`benches/compare.rs`); each HOP is a process the events pass, in order.

An event's path is followed from packet to packet: PUB's `sendmsg` of a
packet with events (more than ACK_ONLY bytes), the first `recvmmsg` of the
next process after it, that process's next such `sendmsg`, and so on back
to PUB. Between two processes it is a hop (from the `sendmsg` to the
`recvmmsg`'s return); inside one, its work. At one event a millisecond
each packet is one event; at higher rates a packet carries a burst.

Each hop is also told by how its receiver woke: by the sender's `sendmsg`
itself (the receiver's CPU took it at once), through its own idle CPU (the
kernel queues the wake-up there and interrupts that CPU: in a VM, a halted
virtual CPU that must be run again), or not at all (it was running).
"""

import bisect
import collections
import re
import sys

# Packets of at most this many bytes carry no event (an ACK is ~36).
ACK_ONLY = 100
# A packet whose way around took longer was not followed correctly (or
# waited on something else, such as a lost packet); it is left out.
LONGEST_US = 5000

MODES = ("woken by the send", "woken through its idle CPU", "already running")

LINE = re.compile(r"^\s*(\S+)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
WAKEE = re.compile(r" pid=(\d+)")


def read(path):
    events = []
    with open(path) as lines:
        for line in lines:
            m = LINE.match(line)
            if m:
                comm, pid, tid, _cpu, time, name, rest = m.groups()
                events.append((float(time) * 1e6, int(pid), int(tid), name, rest, comm))
    events.sort(key=lambda e: e[0])
    return events


def quantiles(values):
    values = sorted(values)
    at = lambda q: values[min(len(values) - 1, int(q * len(values)))]
    return f"n={len(values):6}  p50 {at(.5):5.0f}  p90 {at(.9):5.0f}  p99 {at(.99):5.0f}"


def packets_and_wakes(events, pids):
    """Each process's event packets out (send start, send end, wakes made
    during the send), its receives, and every wake-up of its threads."""
    sends = collections.defaultdict(list)
    receives = collections.defaultdict(list)
    wakes = collections.defaultdict(list)
    tids = collections.defaultdict(set)
    for _, pid, tid, _, _, _ in events:
        if pid in pids:
            tids[pid].add(tid)
    owner = {tid: pid for pid, ts in tids.items() for tid in ts}
    sending = {}
    for time, pid, tid, name, rest, comm in events:
        if name == "syscalls:sys_enter_sendmsg" and pid in pids:
            sending[tid] = (time, [])
        elif name == "syscalls:sys_exit_sendmsg" and tid in sending:
            start, woken = sending.pop(tid)
            if int(rest, 16) > ACK_ONLY:
                sends[pid].append((start, time, woken))
        elif name == "syscalls:sys_exit_recvmmsg" and pid in pids:
            if 0 < int(rest, 16) < 2**63:
                receives[pid].append(time)
        elif name == "sched:sched_wakeup":
            wakee = owner.get(int(WAKEE.search(rest).group(1)))
            if wakee is not None:
                wakes[wakee].append(time)
                if tid in sending:
                    sending[tid][1].append(wakee)
    return sends, receives, wakes


def after(times, t):
    i = bisect.bisect_right(times, t)
    return times[i] if i < len(times) else None


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__.strip())
    events = read(sys.argv[1])
    chain, names = [], {}
    for arg in sys.argv[2:]:
        name, _, pid = arg.rpartition("=")
        chain.append(int(pid))
        names[int(pid)] = name or pid
    sends, receives, wakes = packets_and_wakes(events, set(chain))
    send_starts = {p: [s[0] for s in sends[p]] for p in chain}
    stages = []
    for i, pid in enumerate(chain):
        nxt = chain[(i + 1) % len(chain)]
        if i > 0:
            stages.append(f"in {names[pid]}")
        stages.append(f"hop {names[pid]} -> {names[nxt]}")
    times = collections.defaultdict(list)
    modes = collections.defaultdict(list)
    for start, end, woken in sends[chain[0]]:
        t, parts, hop_modes = start, [], []
        for i, pid in enumerate(chain):
            nxt = chain[(i + 1) % len(chain)]
            received = after(receives[nxt], t)
            if received is None:
                break
            wake = after(wakes[nxt], end)
            if nxt in woken:
                mode = MODES[0]
            elif wake is not None and wake < received:
                mode = MODES[1]
            else:
                mode = MODES[2]
            hop_modes.append((f"hop {names[pid]} -> {names[nxt]}", mode, received - t))
            parts.append(received - t)
            if i + 1 == len(chain):
                break
            k = bisect.bisect_left(send_starts[nxt], received)
            if k == len(sends[nxt]):
                break
            t, end, woken = sends[nxt][k]
            parts.append(t - received)
        if len(parts) != len(stages) or sum(parts) > LONGEST_US:
            continue
        for stage, value in zip(stages, parts):
            times[stage].append(value)
        times["total"].append(sum(parts))
        for hop, mode, value in hop_modes:
            modes[(hop, mode)].append(value)
    if not times["total"]:
        sys.exit("no packet was followed around the chain: are the pids right?")
    print("µs from packet to packet (a hop: sendmsg to recvmmsg's return; in: recvmmsg's return to sendmsg)")
    for stage in stages + ["total"]:
        print(f"  {stage:28} {quantiles(times[stage])}")
    print("hops by how the receiver woke")
    for hop in (stage for stage in stages if stage.startswith("hop")):
        for mode in MODES:
            values = modes.get((hop, mode))
            if values:
                share = 100 * len(values) / len(times["total"])
                print(f"  {hop:28} {mode:27} {share:3.0f}%  {quantiles(values)}")


if __name__ == "__main__":
    main()
