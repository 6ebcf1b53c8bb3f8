"""Clusters of real `treescale node` processes for the tests.

As in the Rust tests, every node listens on 127.0.0.1 with mDNS on `lo`
only, in a cluster named for its test with a CA of its own, so tests never
join each other's nodes; every process a test starts is killed when it
ends, pass or fail, and the nodes' logs are shown when it fails.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
import treescale

REPO = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("TREESCALE_BIN", REPO / "target" / "debug" / "treescale"))


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_SPAN = 5000
# Below the kernel's ephemeral range, so a client's socket cannot take a
# node's port between picking it and the node binding it; above the range
# the Rust tests pick from, should both ever run at once.
_PORTS = itertools.count(random.randrange(_SPAN))


def free_port() -> int:
    """A port free now for UDP and TCP, never handed out twice in a run."""
    low = _ephemeral_low() - 2 * _SPAN
    while True:
        port = low + next(_PORTS) % _SPAN
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            try:
                udp.bind(("127.0.0.1", port))
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class Node:
    """One `treescale node` process; `restart` keeps its port and data."""

    def __init__(self, cluster: "Cluster", name: str, extra: List[str]) -> None:
        self.cluster = cluster
        self.name = name
        self.addr = f"127.0.0.1:{free_port()}"
        self.data_dir = cluster.dir / f"data-{name}"
        self.log = cluster.dir / f"{name}.log"
        self.extra = extra
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.start()

    def start(self) -> None:
        args = [
            "node",
            "--listen",
            self.addr,
            "--interface",
            "lo",
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "-v",
            *self.extra,
        ]
        with open(self.log, "ab") as log:
            self.process = self.cluster.spawn(args, stderr=log)
        self.cluster.wait_until(
            lambda: f"listening on {self.addr}" in self.log.read_text(errors="replace"),
            f"node {self.name} to listen on {self.addr}",
        )

    def kill(self) -> None:
        """Stops the node at once, as a crash would (SIGKILL)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()


class Cluster:
    """A test's own cluster: its name, CA, nodes and processes."""

    def __init__(self, name: str, dir: Path) -> None:
        self.name = name
        self.dir = dir
        self.certs = dir / "certs"
        self.processes: List[subprocess.Popen[bytes]] = []
        self.nodes: List[Node] = []
        self.env = {
            **os.environ,
            "TREESCALE_CLUSTER": name,
            "TREESCALE_CERTS": str(self.certs),
        }
        self.env.pop("TREESCALE_NODE", None)
        self.env.pop("TREESCALE_TOKEN", None)
        self.env.pop("RUST_LOG", None)
        self.run(["certs", "init"])

    def spawn(self, args: List[str], **kwargs) -> "subprocess.Popen[bytes]":
        process = subprocess.Popen([str(BIN), *args], env=self.env, **kwargs)
        self.processes.append(process)
        return process

    def run(self, args: List[str], input: Optional[bytes] = None, timeout: float = 30) -> str:
        """Runs a `treescale` command to its end; its stdout."""
        done = subprocess.run(
            [str(BIN), *args], env=self.env, input=input, capture_output=True, timeout=timeout
        )
        assert done.returncode == 0, f"treescale {' '.join(args)}: {done.stderr.decode()}"
        return done.stdout.decode()

    def node(self, name: str, *extra: str) -> Node:
        node = Node(self, name, list(extra))
        self.nodes.append(node)
        return node

    def nodes_in_one_tree(self, count: int) -> List[Node]:
        """Starts `count` nodes and waits until they form one tree."""
        nodes = [self.node(f"node{i}") for i in range(count)]

        def one_root() -> bool:
            roots = set()
            for node in nodes:
                status = json.loads(self.run(["status", "--json", "--node", node.addr]))
                roots.add(status["root"])
                if status.get("subtree", 0) == count:
                    roots.add("complete")
            return len(roots - {"complete"}) == 1 and "complete" in roots

        self.wait_until(one_root, f"{count} nodes to form one tree", timeout=30)
        return nodes

    async def connect(self, node: Node, **options) -> treescale.Client:
        return await treescale.connect(node.addr, certs=self.certs, **options)

    @staticmethod
    def wait_until(condition, what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout}s for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()

    def logs(self) -> Dict[str, str]:
        return {n.name: n.log.read_text(errors="replace") for n in self.nodes if n.log.exists()}


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def cluster(request, tmp_path: Path) -> Iterator[Cluster]:
    assert BIN.exists(), f"{BIN} is missing: run `cargo build` first, or set TREESCALE_BIN"
    short = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:24]
    cluster = Cluster(f"py-{short}-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            for name, log in cluster.logs().items():
                print(f"---- log of {name} ----\n{log}")
