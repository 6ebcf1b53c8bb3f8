"""Delivery guarantees, permissions and memory under a long stream."""

import asyncio
import gc

import pytest
import treescale

PERMISSIONS = """
[users.admin]
publish = [">"]
subscribe = [">"]

[users.alice]
publish = ["orders.>"]
subscribe = ["orders.*"]
"""


async def test_at_least_once_and_a_durable_subscription_survive_a_node_restart(cluster):
    node = cluster.node("home")
    total, restart_at = 600, 250
    subscriber = await cluster.connect(node)
    publisher = await cluster.connect(node)
    try:
        durable = await subscriber.subscribe_durable("billing", "orders.>", ack_wait=2)
        assert durable.backlog == 0
        received = []

        async def consume():
            async for event in durable:
                received.append(int(event.payload))
                event.ack()
                if len(received) == total:
                    return

        consumer = asyncio.ensure_future(consume())
        for i in range(total):
            if i == restart_at:
                node.restart()
            event_id = await publisher.publish("orders.eu", str(i), qos="at-least-once")
            assert event_id
        await asyncio.wait_for(consumer, 30)
        assert received == list(range(total)), "each event exactly once, in order"
    finally:
        await subscriber.close()
        await publisher.close()


async def test_a_durable_subscription_keeps_events_while_no_one_is_attached(cluster):
    node = cluster.node("home")
    async with await cluster.connect(node) as client:
        first = await client.subscribe_durable("audit", "audit.>")
        first.unsubscribe()
        for i in range(50):
            await client.publish("audit.login", str(i), qos="at-least-once")
        again = await client.subscribe_durable("audit", "audit.>")
        assert again.backlog == 50
        positions = []
        async for event in again:
            positions.append(event.position)
            assert int(event.payload) == len(positions) - 1
            if len(positions) == 50:
                event.ack()
                break
        assert positions == sorted(positions) and len(set(positions)) == 50


async def test_what_permissions_deny_raises_permission_denied(cluster):
    (cluster.certs / "permissions.toml").write_text(PERMISSIONS)
    alice_certs = cluster.dir / "alice"
    cluster.run(["certs", "issue", "client", "--name", "alice", "--out", str(alice_certs)])
    node = cluster.node("guarded")
    async with await treescale.connect(node.addr, certs=alice_certs) as alice:
        assert alice.user == "alice"
        assert alice.grant == {"publish": ["orders.>"], "subscribe": ["orders.*"]}
        with pytest.raises(treescale.PermissionDenied, match="alice"):
            await alice.subscribe("secret.>")
        with pytest.raises(treescale.PermissionDenied, match="alice"):
            await alice.publish("secret.plans", b"x")
        with pytest.raises(treescale.PermissionDenied, match="alice"):
            await alice.publish("secret.plans", b"x", qos="at-least-once")
        with pytest.raises(treescale.PermissionDenied, match="alice"):
            await alice.request("secret.plans", b"x")
        # What is granted works.
        sub = await alice.subscribe("orders.eu")
        await alice.publish("orders.eu", b"allowed")
        event = await asyncio.wait_for(sub.next(), 5)
        assert event is not None and event.payload == b"allowed"


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_a_hundred_thousand_events_through_python_leave_memory_bounded(cluster):
    node = cluster.node("a")
    async with await cluster.connect(node) as publisher, await cluster.connect(node) as reader:
        sub = await reader.subscribe("load")
        payload = bytes(512)

        # In windows of 1,000, so what the subscription buffers stays small
        # and the same from run to run: RSS then moves only if events are kept.
        async def stream(count):
            for _ in range(count // 1_000):
                for _ in range(1_000):
                    await publisher.publish("load", payload)
                await publisher.flush()
                for _ in range(1_000):
                    event = await asyncio.wait_for(sub.next(), 10)
                    assert event is not None and len(event.payload) == 512

        await stream(20_000)  # warms up buffers and allocator pools
        gc.collect()
        start = rss_bytes()
        await stream(50_000)
        gc.collect()
        middle = rss_bytes()
        await stream(50_000)
        gc.collect()
        end = rss_bytes()
        # Kept, each event would hold at least its 512 B payload: 25.6 MB per
        # 50,000, 51.2 MB over the run.
        mib = 2**20
        assert end - middle < 6 * mib, f"RSS grew {(end - middle) / mib:.1f} MiB over 50,000 events"
        assert end - start < 12 * mib, f"RSS grew {(end - start) / mib:.1f} MiB over 100,000 events"


async def test_a_token_from_the_cli_stands_in_for_a_certificate(cluster):
    (cluster.certs / "permissions.toml").write_text(PERMISSIONS)
    node = cluster.node("guarded")
    token = cluster.run(["certs", "issue", "token", "--name", "alice", "--ttl", "1h"]).strip()
    # Only the CA's certificate: no client certificate, no CA key.
    holder = cluster.dir / "holder"
    holder.mkdir()
    (holder / "ca.crt").write_bytes((cluster.certs / "ca.crt").read_bytes())
    async with await treescale.connect(node.addr, certs=holder, token=token) as alice:
        assert alice.user == "alice"
        with pytest.raises(treescale.PermissionDenied, match="alice"):
            await alice.subscribe("secret.>")
        sub = await alice.subscribe("orders.eu")
        await alice.publish("orders.eu", b"by token")
        event = await asyncio.wait_for(sub.next(), 5)
        assert event is not None and event.payload == b"by token"
    with pytest.raises(treescale.ConnectError, match="token refused: malformed token"):
        await treescale.connect(node.addr, certs=holder, token="not-a-token")


async def test_a_python_subscriber_that_stops_reading_is_told_it_was_a_slow_consumer(cluster):
    node = cluster.node("a", "--max-consumer-bytes", "4MiB")
    async with await cluster.connect(node) as publisher, await cluster.connect(node) as healthy:
        stalled = await cluster.connect(node)
        # Subscribed, and never read: the client's buffer fills, then QUIC's,
        # then what the node may keep for it.
        _ignored = await stalled.subscribe("flood")
        reading = await healthy.subscribe("flood")
        assert await publisher.wait_for_interest("flood", 10)
        total = 40_000
        received = 0

        async def read():
            nonlocal received
            while received < total:
                received += len(await reading.next_batch())

        reader = asyncio.ensure_future(read())
        payload = bytes(1024)
        for _ in range(total):
            await publisher.publish("flood", payload)
        await publisher.flush()
        why = await asyncio.wait_for(stalled.closed(), 30)
        assert isinstance(why, treescale.SlowConsumer), why
        assert "--max-consumer-bytes" in str(why)
        await asyncio.wait_for(reader, 30)
        assert received == total, "the healthy subscriber lost events"
