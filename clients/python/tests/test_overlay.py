"""Python clients with the command line and with each other, across a tree
of three node processes."""

import asyncio
import collections
import subprocess

import pytest
import treescale

COUNT = 2000


async def test_a_python_subscriber_gets_what_treescale_pub_sends_across_three_nodes(cluster):
    first, _, last = cluster.nodes_in_one_tree(3)
    async with await cluster.connect(last) as client:
        sub = await client.subscribe("orders.>")
        lines = "".join(f"{i}\n" for i in range(COUNT)).encode()
        await asyncio.to_thread(
            cluster.run, ["pub", "--node", first.addr, "--wait", "10s", "orders.eu"], lines
        )
        received = []
        while len(received) < COUNT:
            event = await asyncio.wait_for(sub.next(), 10)
            assert event is not None
            received.append(int(event.payload))
        assert received == list(range(COUNT)), "each event once, in order"
        assert event.origin != client.node_id, "it entered the overlay at another node"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sub.next(), 0.5)


async def test_treescale_sub_gets_what_python_publishes_across_three_nodes(cluster):
    first, _, last = cluster.nodes_in_one_tree(3)
    sub = cluster.spawn(
        ["sub", "--node", last.addr, "--count", str(COUNT), "orders.eu"], stdout=subprocess.PIPE
    )
    async with await cluster.connect(first) as client:
        assert await client.wait_for_interest("orders.eu", 10)
        for i in range(COUNT):
            await client.publish("orders.eu", str(i))
        await client.flush()
    out, _ = await asyncio.to_thread(sub.communicate, timeout=20)
    assert sub.returncode == 0
    assert out.decode().splitlines() == [str(i) for i in range(COUNT)]


async def test_a_queue_group_of_python_members_shares_each_event_once(cluster):
    nodes = cluster.nodes_in_one_tree(3)
    members = [await cluster.connect(node) for node in nodes]
    try:
        subs = [await m.subscribe("jobs", group="workers") for m in members]
        publisher = members[0]
        assert await publisher.wait_for_interest("jobs", 10)
        # Every member's interest must have reached the publisher's node.
        await asyncio.sleep(1)
        total = 3000
        for i in range(total):
            await publisher.publish("jobs", str(i))
        await publisher.flush()
        got = collections.defaultdict(list)

        async def drain(index, sub):
            while True:
                event = await sub.next()
                got[index].append(int(event.payload))

        readers = [asyncio.ensure_future(drain(i, s)) for i, s in enumerate(subs)]
        deadline = asyncio.get_running_loop().time() + 15
        while sum(map(len, got.values())) < total and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a duplicate would arrive now
        for reader in readers:
            reader.cancel()
        everything = sorted(sum(got.values(), []))
        assert everything == list(range(total)), "each job exactly once"
        shares = [len(got[i]) for i in range(3)]
        assert all(share >= total // 3 * 0.9 for share in shares), shares
    finally:
        for member in members:
            await member.close()


async def test_request_reply_across_nodes(cluster):
    first, _, last = cluster.nodes_in_one_tree(3)
    async with await cluster.connect(first) as caller, await cluster.connect(last) as service:
        with pytest.raises(treescale.NoResponders, match="svc.upper"):
            await caller.request("svc.upper", b"nobody", timeout=5)
        requests = await service.subscribe("svc.upper")

        async def serve():
            async for request in requests:
                await service.respond(request, request.payload.upper(), headers={"by": "py"})

        server = asyncio.ensure_future(serve())
        assert await caller.wait_for_interest("svc.upper", 10)
        answers = await asyncio.gather(
            *(caller.request("svc.upper", f"hello {i}", timeout=5) for i in range(100))
        )
        assert [a.payload for a in answers] == [f"HELLO {i}".encode() for i in range(100)]
        assert answers[0].headers == {"by": "py"}
        server.cancel()

        # A responder that never answers.
        _silent = await service.subscribe("svc.silent")
        assert await caller.wait_for_interest("svc.silent", 10)
        with pytest.raises(treescale.Timeout, match="svc.silent"):
            await caller.request("svc.silent", b"?", timeout=0.5)


async def test_a_client_holding_two_nodes_moves_to_the_other_when_its_node_dies(cluster):
    a, b = cluster.nodes_in_one_tree(2)
    client = await treescale.connect([a.addr, b.addr], certs=cluster.certs)
    try:
        assert client.node_addr == a.addr
        changes = client.connection_events()
        sub = await client.subscribe("after")
        a.kill()
        lost = await asyncio.wait_for(changes.__anext__(), 10)
        assert lost.kind == "disconnected" and lost.reason
        back = await asyncio.wait_for(changes.__anext__(), 10)
        assert back.kind == "reconnected"
        assert (back.node_addr, back.node_name) == (b.addr, b.name)
        assert client.node_addr == b.addr
        async with await cluster.connect(b) as publisher:
            await publisher.publish("after", b"published after the move")
        event = await asyncio.wait_for(sub.next(), 5)
        assert event is not None and event.payload == b"published after the move"
    finally:
        await client.close()
