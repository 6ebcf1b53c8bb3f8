import treescale


async def test_publish_and_subscribe_on_one_node(cluster):
    node = cluster.node("a")
    async with await cluster.connect(node) as client:
        sub = await client.subscribe("orders.>")
        await client.publish("orders.eu", b"one pizza", headers={"k": "v"})
        event = await sub.next()
        assert event is not None
        assert (event.topic, event.payload, event.headers) == ("orders.eu", b"one pizza", {"k": "v"})
