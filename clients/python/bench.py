"""Throughput of 128 B events from Python: TreeScale's client beside
nats-py, in the same run, with programs of the same shape.

    pip install ./clients/python nats-py     # and nats-server on PATH
    python clients/python/bench.py [--msgs N] [--size BYTES] [--runs R] [--json]

It starts one `treescale node` (mDNS on lo only, its own cluster and CA in a
temporary dir) and two nats-servers, all on 127.0.0.1, and stops them when
it ends. Two workloads, each through one server:

- publish: one client publishes N events and flushes;
- publish→subscribe: one client publishes N events while another, in the
  same process and event loop, reads them with `async for`.

TreeScale's connections are always TLS; nats-server runs twice, plaintext
(as nats-py users most often run it) and with TLS (a certificate made with
openssl), so both ratios show. Events not received are counted as lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        return tcp.getsockname()[1]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"error: {what} did not start within {timeout}s")
        time.sleep(0.05)


class Servers:
    """A treescale node and two nats-servers (plaintext, and TLS with a
    certificate made here by openssl), stopped however the bench ends."""

    def __init__(self, treescale_bin: str, nats_bin: str) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="treescale-bench-")
        self.processes: List[subprocess.Popen[bytes]] = []
        root = Path(self.dir.name)
        self.env = {
            **os.environ,
            "TREESCALE_CLUSTER": f"bench-{os.getpid()}",
            "TREESCALE_CERTS": str(root / "certs"),
        }
        subprocess.run([treescale_bin, "certs", "init"], env=self.env, check=True, capture_output=True)
        self.treescale_addr = f"127.0.0.1:{free_port()}"
        log = open(root / "node.log", "wb")
        self.processes.append(
            subprocess.Popen(
                [
                    treescale_bin,
                    "node",
                    "--listen",
                    self.treescale_addr,
                    "--interface",
                    "lo",
                    "--data-dir",
                    str(root / "data"),
                ],
                env=self.env,
                stderr=log,
            )
        )
        wait_for(lambda: b"listening on" in (root / "node.log").read_bytes(), "treescale node")
        nats_port = free_port()
        self.nats_url = f"nats://127.0.0.1:{nats_port}"
        self.processes.append(
            subprocess.Popen(
                [nats_bin, "-a", "127.0.0.1", "-p", str(nats_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_for(lambda: _accepts(nats_port), "nats-server")
        cert, key = root / "nats.crt", root / "nats.key"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        self.nats_ca = str(cert)
        tls_port = free_port()
        self.nats_tls_url = f"tls://127.0.0.1:{tls_port}"
        self.processes.append(
            subprocess.Popen(
                [
                    nats_bin,
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(tls_port),
                    "--tls",
                    "--tlscert",
                    str(cert),
                    "--tlskey",
                    str(key),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_for(lambda: _accepts(tls_port), "nats-server with TLS")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.dir.cleanup()


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class System:
    """One client library's side of the bench, in the same shape for both."""

    name: str
    # The publishing and the subscribing client, once connected.
    pub: Any
    sub_client: Any

    def __init__(self, servers: Servers) -> None:
        self.servers = servers

    async def connect(self) -> None: ...

    # Both libraries publish and flush with the same calls.
    async def publish(self, payload: bytes) -> None:
        await self.pub.publish(TOPIC, payload)

    async def flush(self) -> None:
        await self.pub.flush()

    async def subscribe(self) -> None: ...

    def events(self) -> AsyncIterator[object]:
        """What the subscriber iterates over with `async for`."""
        raise NotImplementedError

    async def receive(self, count: int, timeout: float) -> int:
        """Reads up to `count` events within `timeout`; how many came."""
        received = 0

        async def read() -> None:
            nonlocal received
            async for _ in self.events():
                received += 1
                if received == count:
                    return

        try:
            await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            pass
        return received

    async def close(self) -> None:
        await self.pub.close()
        await self.sub_client.close()


TOPIC = "bench.python"


class TreeScale(System):
    name = "treescale"

    async def connect(self) -> None:
        import treescale

        certs = self.servers.env["TREESCALE_CERTS"]
        self.pub = await treescale.connect(self.servers.treescale_addr, certs=certs)
        self.sub_client = await treescale.connect(self.servers.treescale_addr, certs=certs)

    async def subscribe(self) -> None:
        self.sub = await self.sub_client.subscribe(TOPIC)
        await self.pub.wait_for_interest(TOPIC, 5)

    def events(self) -> AsyncIterator[object]:
        return self.sub


class Nats(System):
    name = "nats-py"

    async def connect(self) -> None:
        import nats

        self.pub = await nats.connect(self.servers.nats_url)
        self.sub_client = await nats.connect(self.servers.nats_url)

    async def subscribe(self) -> None:
        self.sub = await self.sub_client.subscribe(TOPIC)
        await self.sub_client.flush()

    def events(self) -> AsyncIterator[object]:
        return self.sub.messages


class NatsTls(Nats):
    """nats-py through nats-server with TLS: encrypted, as TreeScale always is."""

    name = "nats-py TLS"

    async def connect(self) -> None:
        import ssl

        import nats

        context = ssl.create_default_context(cafile=self.servers.nats_ca)
        self.pub = await nats.connect(self.servers.nats_tls_url, tls=context)
        self.sub_client = await nats.connect(self.servers.nats_tls_url, tls=context)


async def publish_only(system: System, msgs: int, payload: bytes) -> Dict[str, float]:
    await system.connect()
    try:
        start = time.perf_counter()
        for _ in range(msgs):
            await system.publish(payload)
        await system.flush()
        elapsed = time.perf_counter() - start
        return {"events_per_sec": msgs / elapsed, "lost": 0}
    finally:
        await system.close()


async def publish_subscribe(system: System, msgs: int, payload: bytes) -> Dict[str, float]:
    await system.connect()
    try:
        await system.subscribe()

        async def send() -> None:
            for _ in range(msgs):
                await system.publish(payload)
            await system.flush()

        start = time.perf_counter()
        sending = asyncio.ensure_future(send())
        received = await system.receive(msgs, timeout=max(30.0, msgs / 10_000))
        elapsed = time.perf_counter() - start
        await sending
        return {"events_per_sec": received / elapsed, "lost": msgs - received}
    finally:
        await system.close()


WORKLOADS: Dict[str, Callable[[System, int, bytes], Awaitable[Dict[str, float]]]] = {
    "publish": publish_only,
    "publish→subscribe": publish_subscribe,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--msgs", type=int, default=200_000, help="events per run (200000)")
    parser.add_argument("--size", type=int, default=128, help="payload bytes (128)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each workload; the best is kept (3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--treescale-bin",
        default=None,
        help="the treescale binary (default: on PATH, else target/release or target/debug)",
    )
    args = parser.parse_args()

    treescale_bin = (
        args.treescale_bin
        or shutil.which("treescale")
        or next(
            (
                str(p)
                for p in (REPO / "target/release/treescale", REPO / "target/debug/treescale")
                if p.exists()
            ),
            None,
        )
    )
    nats_bin = shutil.which("nats-server")
    if treescale_bin is None:
        sys.exit("error: no treescale binary; build it with `cargo build --release` or pass --treescale-bin")
    if nats_bin is None:
        sys.exit("error: nats-server is not on PATH (Debian: apt-get install nats-server)")
    try:
        import nats  # noqa: F401
    except ImportError:
        sys.exit("error: nats-py is not installed: pip install nats-py")

    servers = Servers(treescale_bin, nats_bin)
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    try:
        payload = bytes(args.size)
        for workload, run in WORKLOADS.items():
            results[workload] = {}
            for make in (TreeScale, Nats, NatsTls):
                best: Optional[Dict[str, float]] = None
                for _ in range(args.runs):
                    if not args.json:
                        print(f"{workload}: {make.name}...", file=sys.stderr, flush=True)
                    result = asyncio.run(run(make(servers), args.msgs, payload))
                    if best is None or result["events_per_sec"] > best["events_per_sec"]:
                        best = result
                assert best is not None
                results[workload][make.name] = best
    finally:
        servers.stop()

    if args.json:
        print(json.dumps({"msgs": args.msgs, "size": args.size, "results": results}))
        return
    print(
        f"{args.msgs} events of {args.size} B, best of {args.runs} runs; "
        "ratios are TreeScale's rate over the peer's"
    )
    print(
        f"{'workload':<20} {'treescale':>14} {'nats-py':>14} {'ratio':>7} {'nats-py TLS':>14} {'ratio':>7}"
        "  lost (treescale / nats-py / TLS)"
    )
    for workload, by_system in results.items():
        ours, plain, tls = (by_system[n] for n in ("treescale", "nats-py", "nats-py TLS"))
        rate = ours["events_per_sec"]
        print(
            f"{workload:<20} {rate:>12,.0f}/s {plain['events_per_sec']:>12,.0f}/s "
            f"{rate / plain['events_per_sec']:>6.2f}× {tls['events_per_sec']:>12,.0f}/s "
            f"{rate / tls['events_per_sec']:>6.2f}×  "
            f"{ours['lost']:.0f} / {plain['lost']:.0f} / {tls['lost']:.0f}"
        )


if __name__ == "__main__":
    main()
