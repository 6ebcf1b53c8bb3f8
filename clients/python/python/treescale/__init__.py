"""TreeScale from Python: publish and subscribe across a TreeScale overlay.

The package binds TreeScale's Rust client (the same protocol code, TLS and
reconnection as the ``treescale`` command line) to asyncio::

    import treescale

    async with await treescale.connect(node="127.0.0.1:7700") as client:
        sub = await client.subscribe("orders.>")
        await client.publish("orders.eu", b"one pizza")
        async for event in sub:
            print(event.topic, event.payload)

See docs/python.md in the TreeScale repository for the whole API.
"""

import atexit

from . import _native
from ._client import (
    Client,
    ConnectionEvent,
    DurableSubscription,
    Subscription,
    connect,
)
from ._native import (
    ClosedError,
    ConnectError,
    Disconnected,
    Error,
    Event,
    InvalidArgument,
    NoResponders,
    PermissionDenied,
    Refused,
    SlowConsumer,
    Timeout,
    Unconfirmed,
)

# Before Python finalizes, the client's threads stop entering it: one that
# did while it finalizes would kill the process.
atexit.register(_native.close_for_exit)

__all__ = [
    "Client",
    "ClosedError",
    "ConnectError",
    "ConnectionEvent",
    "Disconnected",
    "DurableSubscription",
    "Error",
    "Event",
    "InvalidArgument",
    "NoResponders",
    "PermissionDenied",
    "Refused",
    "SlowConsumer",
    "Subscription",
    "Timeout",
    "Unconfirmed",
    "connect",
]
