"""Connecting, publishing and subscribing through one node, and the errors
a program meets first."""

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
import treescale


async def test_connect_by_address_publish_and_subscribe(cluster):
    node = cluster.node("a")
    async with await cluster.connect(node) as client:
        assert client.node_name == "a"
        assert client.node_addr == node.addr
        assert client.is_connected
        sub = await client.subscribe("orders.>")
        event_id = await client.publish("orders.eu", b"one pizza", headers={"k": "v"})
        await client.publish("orders.us", "text goes as UTF-8: \u00e9")
        first = await sub.next()
        assert first is not None
        assert (first.topic, first.payload, first.headers) == ("orders.eu", b"one pizza", {"k": "v"})
        assert first.id == event_id
        assert first.origin == client.node_id
        assert first.position is None and not first.is_request
        second = await sub.next()
        assert second is not None and second.payload == "text goes as UTF-8: \u00e9".encode()


async def test_connect_by_mdns_on_lo(cluster):
    node = cluster.node("found")
    client = await treescale.connect(
        interfaces=["lo"], cluster=cluster.name, certs=cluster.certs, connect_timeout=10
    )
    try:
        assert client.node_addr == node.addr
        status = await client.status()
        assert status["name"] == "found" and status["cluster"] == cluster.name
    finally:
        await client.close()


async def test_nothing_listening_is_a_connect_error_naming_the_address(cluster):
    nowhere = "127.0.0.1:9"
    with pytest.raises(treescale.ConnectError, match="127.0.0.1:9"):
        await treescale.connect(nowhere, certs=cluster.certs, connect_timeout=1)


async def test_bad_arguments_raise_invalid_argument(cluster):
    node = cluster.node("a")
    async with await cluster.connect(node) as client:
        with pytest.raises(treescale.InvalidArgument, match="topic"):
            await client.publish("orders..eu", b"x")
        with pytest.raises(treescale.InvalidArgument, match="qos"):
            await client.publish("orders.eu", b"x", qos="twice")
        with pytest.raises(treescale.InvalidArgument):
            await client.subscribe("orders.>.eu")
        with pytest.raises(treescale.InvalidArgument, match="1048576"):
            await client.publish("orders.eu", bytes(2 << 20))
        with pytest.raises(treescale.InvalidArgument, match="timeout"):
            await client.request("svc.echo", b"x", timeout=-1)
        with pytest.raises(TypeError):
            await client.publish("orders.eu", 42)  # type: ignore[arg-type]
        with pytest.raises(treescale.InvalidArgument, match="durable"):
            sub = await client.subscribe("orders.>")
            await client.publish("orders.eu", b"x")
            event = await sub.next()
            assert event is not None
            event.ack()


async def test_status_tree_and_a_closed_client(cluster):
    node = cluster.node("a")
    client = await cluster.connect(node)
    status = await client.status()
    assert status["addr"] == node.addr and status["id"] == client.node_id
    tree = await client.tree()
    assert [entry["name"] for entry in tree] == ["a"]
    await client.close()
    assert not client.is_connected
    why = await asyncio.wait_for(client.closed(), 5)
    assert isinstance(why, treescale.ClosedError) and "closed" in str(why)
    with pytest.raises(treescale.ClosedError):
        await client.status()
    with pytest.raises(treescale.ClosedError):
        await client.publish("orders.eu", b"after close")


async def test_next_batch_takes_what_arrived_together(cluster):
    node = cluster.node("a")
    async with await cluster.connect(node) as client:
        sub = await client.subscribe("bulk")
        for i in range(1000):
            await client.publish("bulk", str(i))
        await client.flush()
        received = []
        while len(received) < 1000:
            batch = await sub.next_batch()
            assert batch, "a batch is never empty while the subscription lasts"
            received.extend(int(e.payload) for e in batch)
        assert received == list(range(1000))


async def test_cancelling_a_pending_next_loses_nothing_and_leaves_the_client_usable(cluster):
    node = cluster.node("a")
    async with await cluster.connect(node) as client:
        sub = await client.subscribe("late")
        for _ in range(5):
            waiting = asyncio.ensure_future(sub.next())
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        # A request cancelled while it waits for its answer.
        answering = await client.subscribe("svc.slow")
        pending = asyncio.ensure_future(client.request("svc.slow", b"?", timeout=10))
        await asyncio.sleep(0.1)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        request = await answering.next()
        assert request is not None and request.is_request

        await client.publish("late", b"after the cancels")
        event = await asyncio.wait_for(sub.next(), 5)
        assert event is not None and event.payload == b"after the cancels"


async def test_unsubscribe_ends_the_iteration(cluster):
    node = cluster.node("a")
    async with await cluster.connect(node) as client:
        sub = await client.subscribe("ends")
        await client.publish("ends", b"one")
        received = []

        async def read():
            async for event in sub:
                received.append(event.payload)
                sub.unsubscribe()

        await asyncio.wait_for(read(), 5)
        assert received == [b"one"]


def test_an_interpreter_exiting_with_work_in_flight_neither_hangs_nor_crashes(cluster):
    node = cluster.node("a")
    # Publishes not awaited fill the publish buffer, so later ones become
    # asyncio futures that complete while Python exits: a runtime thread
    # entering Python then would kill the process (as it did, one run in
    # three, with pyo3-async-runtimes).
    script = textwrap.dedent(
        f"""
        import asyncio, treescale

        async def main():
            client = await treescale.connect({node.addr!r}, certs={str(cluster.certs)!r})
            sub = await client.subscribe("never")
            asyncio.ensure_future(sub.next())   # left waiting
            for i in range(20000):
                client.publish("never.mind", bytes(128))
                if i % 256 == 0:
                    await client.flush()
            print("connected", flush=True)

        asyncio.run(main())
        """
    )
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, timeout=30, env=os.environ.copy()
        )
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout == b"connected\n"


async def test_insecure_mode_works_only_with_an_insecure_node(cluster):
    lab = cluster.node("lab", "--insecure")
    async with await treescale.connect(lab.addr, insecure=True) as client:
        assert client.user is None
        sub = await client.subscribe("lab.>")
        await client.publish("lab.x", b"no CA here")
        event = await asyncio.wait_for(sub.next(), 5)
        assert event is not None and event.payload == b"no CA here"
    guarded = cluster.node("guarded")
    with pytest.raises(treescale.ConnectError, match="showed no certificate and no token"):
        await treescale.connect(guarded.addr, insecure=True, connect_timeout=2)


async def test_any_node_of_the_tree_is_asked_through_the_clients_own(cluster):
    nodes = cluster.nodes_in_one_tree(2)
    async with await cluster.connect(nodes[0]) as client:
        here = await client.status()
        other = next(p["id"] for p in here["peers"] if p["role"] in ("parent", "child"))
        there = await client.status(node=other)
        assert there["id"] == other and there["root"] == here["root"]
        whole = await client.tree(node=here["root"])
        assert sorted(entry["name"] for entry in whole) == ["node0", "node1"]
        with pytest.raises(treescale.Refused, match="no node eeeeeeeeee in this tree"):
            await client.status(node="ee" * 32)
        with pytest.raises(treescale.InvalidArgument, match="not a node id"):
            await client.status(node="nonsense")
