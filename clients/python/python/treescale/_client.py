"""The asyncio API over the native client (``_native``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Dict, List, Mapping, Optional, Sequence, Union

from . import _native
from ._native import Error, Event, InvalidArgument

Payload = Union[bytes, bytearray, str]
"""What an event carries: bytes as given, or text sent as UTF-8."""


async def connect(
    node: Union[str, Sequence[str], None] = None,
    *,
    interfaces: Optional[Sequence[str]] = None,
    cluster: Optional[str] = None,
    certs: Union[str, "os.PathLike[str]", None] = None,
    insecure: bool = False,
    token: Optional[str] = None,
    name: str = "python",
    connect_timeout: Optional[float] = None,
    reconnect_for: Optional[float] = None,
    buffer_bytes: Optional[int] = None,
    retain_bytes: Optional[int] = None,
    keep_alive: Optional[float] = None,
    idle_timeout: Optional[float] = None,
) -> Client:
    """Connects to a node of the cluster and returns the client.

    ``node`` is ``"HOST:PORT"`` or a list of them: the first that answers is
    used, and after losing it the client reconnects by itself to any of
    them. Without it (and without ``TREESCALE_NODE`` in the environment),
    the client finds a node over mDNS, on ``interfaces`` only if given
    (``["lo"]`` for nodes on this machine).

    ``cluster`` (default ``TREESCALE_CLUSTER``, else ``"treescale"``) limits
    discovery to nodes of that cluster. ``certs`` is the certs dir holding
    the cluster CA (default ``TREESCALE_CERTS``, else the user's, as the
    command line uses); ``insecure=True`` runs without one, for labs only.
    ``token`` (default ``TREESCALE_TOKEN``), from ``treescale certs issue
    token``, is shown instead of a client certificate: the certs dir then
    needs only the cluster's ``ca.crt``.

    Durations are in seconds. ``connect_timeout`` (5 s) bounds the first
    connection; ``reconnect_for`` bounds reconnecting after a loss (default
    forever); ``buffer_bytes`` (8 MiB) bounds at-most-once events kept while
    disconnected; ``retain_bytes`` (8 MiB) the confirmed at-least-once events
    kept to send again through another node. ``keep_alive`` (0.3 s) and
    ``idle_timeout`` (1.5 s) set how fast a dead node is noticed.

    Raises ConnectError when no node answers within the timeout.
    """
    if node is None:
        node = os.environ.get("TREESCALE_NODE") or None
    if isinstance(node, str):
        nodes = [n.strip() for n in node.split(",") if n.strip()]
    else:
        nodes = list(node or [])
    if certs is None and "TREESCALE_CERTS" in os.environ:
        certs = os.environ["TREESCALE_CERTS"]
    if token is None:
        token = os.environ.get("TREESCALE_TOKEN") or None
    native = await _native.connect(
        nodes=nodes,
        interfaces=list(interfaces or []),
        cluster=cluster if cluster is not None else os.environ.get("TREESCALE_CLUSTER"),
        certs=os.fspath(certs) if certs is not None else None,
        insecure=insecure,
        token=token,
        name=name,
        connect_timeout=connect_timeout,
        reconnect_for=reconnect_for,
        buffer_bytes=buffer_bytes,
        retain_bytes=retain_bytes,
        keep_alive=keep_alive,
        idle_timeout=idle_timeout,
    )
    return Client(native)


QOS = ("at-most-once", "at-least-once")


class Client:
    """A connection to a node of the cluster, kept up across node failures.

    Made by :func:`connect`. Use it as ``async with``, or call
    :meth:`close` when done. Publishing, subscribing and requests may run
    concurrently from many tasks.
    """

    def __init__(self, native: _native.NativeClient) -> None:
        self._native = native

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def publish(
        self,
        topic: str,
        payload: Payload,
        *,
        headers: Optional[Mapping[str, str]] = None,
        qos: str = "at-most-once",
        to: Optional[str] = None,
    ) -> Awaitable[str]:
        """Publishes an event; the awaitable returns its id.

        At most once (the default), it returns as soon as the event is
        queued, waiting only while the publish queue is full. With
        ``qos="at-least-once"`` it returns once the node has stored the
        event on disk; durable subscriptions then receive it exactly once.
        ``to`` (a node's name, id or id prefix of 4+ hex digits) sends it
        only to the subscribers of that node; a name no node has reaches
        no one.
        """
        pairs = list(headers.items()) if headers else None
        if qos == "at-most-once":
            return self._native.publish(topic, payload, pairs, to)
        if qos != "at-least-once":
            raise InvalidArgument(f"qos must be one of {QOS}, not {qos!r}")
        if to is not None:
            raise InvalidArgument("to= works at most once only")
        return self._native.publish_at_least_once(topic, payload, pairs)

    async def subscribe(self, pattern: str, *, group: Optional[str] = None) -> Subscription:
        """Receives every event whose topic matches ``pattern``.

        Topics are dot-separated; ``*`` matches one token and a final ``>``
        the rest. With ``group``, joins that queue group instead: each
        matching event goes to one member of the group across the overlay.
        """
        return Subscription(await self._native.subscribe(pattern, group))

    async def subscribe_durable(
        self,
        name: str,
        pattern: str,
        *,
        max_events: Optional[int] = None,
        max_bytes: Optional[int] = None,
        max_age: Optional[float] = None,
        ack_wait: Optional[float] = None,
        handled: int = 0,
    ) -> DurableSubscription:
        """Attaches to durable subscription ``name``, creating it with
        ``pattern`` if it does not exist.

        Its events wait in the store of its home node while no one is
        attached, and arrive exactly once and in order. Acknowledge each
        with ``event.ack()``; one not acknowledged within ``ack_wait``
        (30 s) is delivered again. The retention limits bound what it keeps
        (at the limit, at-least-once publishes to it are refused).
        ``handled`` is the last position this program already handled, to
        skip on redelivery.
        """
        native = await self._native.subscribe_durable(
            name,
            pattern,
            max_events=max_events,
            max_bytes=max_bytes,
            max_age=max_age,
            ack_wait=ack_wait,
            handled=handled,
        )
        return DurableSubscription(native)

    def request(
        self,
        topic: str,
        payload: Payload,
        *,
        headers: Optional[Mapping[str, str]] = None,
        timeout: float = 5.0,
    ) -> Awaitable[Event]:
        """Sends a request and returns the first answer.

        Raises NoResponders at once when nothing in the overlay subscribes
        to ``topic``, and Timeout when no answer comes within ``timeout``
        seconds.
        """
        pairs = list(headers.items()) if headers else None
        return self._native.request(topic, payload, pairs, timeout)

    def respond(
        self,
        request: Event,
        payload: Payload,
        *,
        headers: Optional[Mapping[str, str]] = None,
    ) -> Awaitable[None]:
        """Answers ``request`` (an event whose ``is_request`` is true)."""
        pairs = list(headers.items()) if headers else None
        return self._native.respond(request, payload, pairs)

    def flush(self) -> Awaitable[None]:
        """Returns once the node has routed every event published before."""
        return self._native.flush()

    async def wait_for_interest(self, topic: str, timeout: float = 2.0) -> bool:
        """Waits until some subscription in the overlay matches ``topic``;
        False if none appeared within ``timeout`` seconds."""
        return await self._native.wait_for_interest(topic, timeout)

    async def status(self, node: Optional[str] = None) -> Dict[str, Any]:
        """The node's status, as ``treescale status --json`` prints it.
        With ``node`` (an id, 64 hex digits), that node's, anywhere in the
        tree, asked through this client's node."""
        result: Dict[str, Any] = json.loads(await self._native.status(node))
        return result

    async def tree(self, node: Optional[str] = None) -> List[Dict[str, Any]]:
        """The node's subtree, itself first: at the root, the whole tree.
        With ``node``, that node's subtree, anywhere in the tree."""
        result: List[Dict[str, Any]] = json.loads(await self._native.tree(node))
        return result

    def connection_events(self) -> AsyncIterator[ConnectionEvent]:
        """The changes of the connection from now on: lost, restored,
        closed. Ends when the client is gone."""
        return _connection_events(self._native.connection_events())

    async def closed(self) -> Error:
        """Waits until the client has closed for good (closed, refused by
        its node, disconnected as a slow consumer, or it gave up
        reconnecting), and returns why."""
        try:
            await self._native.closed()
        except Error as error:
            return error
        raise AssertionError("the native client ends only with an error")

    async def close(self) -> None:
        """Flushes what was published, then closes the connection for good."""
        await self._native.close()

    @property
    def node_id(self) -> str:
        """The id of the node this client is connected to (or was, while
        it reconnects)."""
        return self._native.node_id

    @property
    def node_name(self) -> str:
        return self._native.node_name

    @property
    def node_addr(self) -> str:
        return self._native.node_addr

    @property
    def user(self) -> Optional[str]:
        """The user name in the client's certificate; None when insecure."""
        return self._native.user

    @property
    def grant(self) -> Dict[str, List[str]]:
        """What the node lets this client do: the topic patterns it may
        ``publish`` to and ``subscribe`` to."""
        grant: Dict[str, List[str]] = json.loads(self._native.grant)
        return grant

    @property
    def is_connected(self) -> bool:
        return self._native.is_connected

    @property
    def late_replies(self) -> int:
        """Answers that came after their request timed out, dropped."""
        return self._native.late_replies


class Subscription:
    """The events of a subscription, in the order the node sent them.

    Iterate with ``async for``; the iteration ends when the subscription
    does (unsubscribed, or the client closed). Cancelling a task waiting in
    it loses no event.
    """

    def __init__(self, native: _native.NativeSubscription) -> None:
        self._native = native

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        event = await self.next()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next(self) -> Optional[Event]:
        """The next event; None once the subscription has ended."""
        native = self._native
        while True:
            event = native.try_next()
            if event is not None:
                return event
            if not await native.wait():
                return None

    async def next_batch(self) -> List[Event]:
        """Every event received and not yet taken, waiting for at least
        one: for consumers that handle events in bulk. Empty once the
        subscription has ended."""
        native = self._native
        while True:
            batch = native.take_ready()
            if batch or not await native.wait():
                return batch

    def unsubscribe(self) -> None:
        """Ends the subscription; events received and not taken are dropped."""
        self._native.unsubscribe()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.unsubscribe()


class DurableSubscription(Subscription):
    """The events of a durable subscription, each exactly once and in
    order; acknowledge each with ``event.ack()``. Unsubscribing only
    detaches: the subscription and its stored events stay."""

    @property
    def backlog(self) -> int:
        """Events the node held for this subscription when it attached."""
        backlog = self._native.backlog
        assert backlog is not None, "a durable subscription knows its backlog"
        return backlog


@dataclass(frozen=True)
class ConnectionEvent:
    """A change of the client's connection."""

    kind: str
    """``"disconnected"`` (the client is reconnecting), ``"reconnected"``
    (every subscription restored) or ``"closed"`` (for good)."""
    reason: Optional[str] = None
    node_id: Optional[str] = None
    node_name: Optional[str] = None
    node_addr: Optional[str] = None


async def _connection_events(native: _native.ConnectionEvents) -> AsyncIterator[ConnectionEvent]:
    while True:
        change = await native.next()
        if change is None:
            return
        kind, reason, node_id, node_name, node_addr = change
        yield ConnectionEvent(kind, reason, node_id, node_name, node_addr)
