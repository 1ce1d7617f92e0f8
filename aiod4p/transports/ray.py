"""The Ray transport: comms between Ray actors, carried by actor method calls.

A comm end lives in an async Ray actor whose class derives from
:class:`RayCommHost`; it is named by a key, unique in that actor. A message is
pickled when it is sent (so a message that cannot be pickled fails its own
:meth:`~Comm.send` with :class:`~aiod4p.errors.UnpicklableMessage`), and
travels in a call of the peer actor's :meth:`RayCommHost.aiod4p_deliver`
carrying the sequence number of its first message (Ray does not promise that
an async actor runs calls in the order they were made: the receiver reorders
by sequence number) and unpickles it when it is received (an actor may still be loading the job
that brings a message's classes). A sender keeps at most ``window`` deliveries in flight;
while they are, what it sends waits and leaves in the next delivery, up to
``batch`` messages in one call. Flow control is end-to-end: a delivery waits
in the receiving actor until its first message is within ``capacity`` of the
last one received, so at most ``capacity + (window + 1) * batch`` messages of
one comm are buffered whatever the receiver does.

Each end watches its peer with a call of :meth:`RayCommHost.aiod4p_watch`
that returns when the peer's end is aborted, and fails when the peer actor
dies (Ray reports a dead actor to every caller with a pending call): the
receiver then sees :class:`~aiod4p.errors.PeerDied` after what arrived.

The caller of a Ray program (the driver) is not an actor and cannot be
called: its end of a comm with an actor (:class:`DriverComm`) sends by
delivery like any end, and receives by calling
:meth:`RayCommHost.aiod4p_take`, which returns what the actor's end
(:class:`PulledComm`) queued for it.
"""

from __future__ import annotations

import asyncio
import io
import pickle
from collections import deque
from typing import Any

from ..errors import ChannelClosed, EndOfChannel, PeerDied, UnpicklableMessage
from ._base import DEFAULT_CAPACITY, Comm, Undecodable, Wakeups, message_pickler, opened

__all__ = ["DriverComm", "PulledComm", "RayComm", "RayCommHost", "ray_comm_pair"]

WINDOW = 4  # deliveries a sending end keeps in flight
BATCH = 16  # messages one delivery carries at most

_CLOSE = "<aiod4p: end of channel>"  # the last message of an end closed cleanly
_GONE = "gone"  # a delivery's answer when the receiving end is closed or aborted
_ABORTED = "aborted"  # a watch's answer when the watched end was aborted


def _is_close(message: Any) -> bool:
    return isinstance(message, str) and message == _CLOSE


def _dumps(message: Any) -> bytes:
    """``message`` pickled for a delivery.

    Raises:
        UnpicklableMessage: it cannot be pickled.
    """
    data = io.BytesIO()
    try:
        message_pickler(data, message).dump(message)
    except Exception as exc:
        raise UnpicklableMessage(f"a message cannot be pickled: {type(exc).__name__}: {exc}", message) from exc
    return data.getvalue()


_CLOSE_DATA = _dumps(_CLOSE)  # as it arrives


def _loads(data: bytes) -> Any:
    try:
        return pickle.loads(data)
    except Exception as exc:
        return Undecodable(exc)


class _Mailbox(Wakeups):
    """The receiving state of one comm end, in the actor that hosts it (:meth:`changed`: something
    arrives, is taken, or the end's state changes)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.arrived: dict[int, bytes] = {}  # sequence number -> message, pickled
        self.next = 0  # the sequence number receive() returns next
        self.outbox: deque[Any] = deque()  # pull mode: messages the driver takes
        self.state = "open"  # "closed" or "aborted": this end is over

    def end(self, state: str) -> None:
        if self.state == "open":
            self.state = state
            self.arrived.clear()
            self.wake()


class RayCommHost:
    """Base of an async Ray actor class that hosts comm ends (its peers call these methods)."""

    _aiod4p_mailboxes: dict[str, _Mailbox]

    def mailbox(self, key: str) -> _Mailbox:
        """The mailbox of this actor's end ``key`` (made on first use, by whichever side comes first)."""
        try:
            boxes = self._aiod4p_mailboxes
        except AttributeError:
            boxes = self._aiod4p_mailboxes = {}
        box = boxes.get(key)
        if box is None:
            box = boxes[key] = _Mailbox(DEFAULT_CAPACITY)
        return box

    async def aiod4p_deliver(self, key: str, seq: int, data: list[bytes]) -> str | None:
        """Accept the pickled messages ``seq``, ``seq + 1``, ... for end ``key`` once the first is
        within the end's capacity (at once when they end with the close marker)."""
        box = self.mailbox(key)
        while box.state == "open" and seq >= box.next + box.capacity and data[-1] != _CLOSE_DATA:
            await box.changed()
        if box.state != "open":
            return _GONE
        for offset, message in enumerate(data):
            box.arrived[seq + offset] = message
        box.wake()
        return None

    async def aiod4p_watch(self, key: str) -> str:
        """Return when end ``key`` is aborted (``"aborted"``) or closed (``"closed"``)."""
        box = self.mailbox(key)
        while box.state == "open":
            await box.changed()
        return box.state

    async def aiod4p_take(self, key: str) -> list[bytes] | None:
        """What end ``key`` queued for the driver, pickled (waiting for something); ``None``: the end was
        aborted."""
        box = self.mailbox(key)
        while not box.outbox and box.state != "aborted":
            await box.changed()
        if not box.outbox:
            return None
        taken = list(box.outbox)
        box.outbox.clear()
        box.wake()
        return taken


class _Sender:
    """Delivers messages to a peer end: ``window`` calls at most in flight, ``batch`` messages at most
    in one call (those sent while the window is full)."""

    def __init__(self, peer: Any, peer_key: str, window: int, batch: int) -> None:
        if window < 1 or batch < 1:
            raise ValueError("window and batch must be at least 1")
        self.peer = peer
        self.peer_key = peer_key
        self.window = window
        self.batch = batch
        self.seq = 0  # the sequence number of the first pending message
        self.pending: list[bytes] = []  # pickled, waiting for room in the window
        self.in_flight: set[asyncio.Future[Any]] = set()
        self.gone = False  # the peer end is closed, aborted or dead
        self._room = asyncio.Event()
        self._room.set()

    async def send(self, message: Any) -> None:
        """Raises:
        UnpicklableMessage: ``message`` cannot be pickled (nothing was sent).
        PeerDied: the peer end is gone.
        """
        data = _dumps(message)
        while len(self.pending) >= self.batch and not self.gone:
            self._room.clear()
            await self._room.wait()
        if self.gone:
            raise PeerDied("the peer of this Ray comm is gone")
        self.pending.append(data)
        if len(self.in_flight) < self.window:
            self._flush()

    def post(self, message: Any) -> None:
        """Deliver ``message`` after what is pending, now, whatever the window (for the close marker)."""
        self.pending.append(_dumps(message))
        self._flush()

    def _flush(self) -> None:
        data, self.pending = self.pending, []
        ref = self.peer.aiod4p_deliver.remote(self.peer_key, self.seq, data)
        self.seq += len(data)
        delivered = asyncio.wrap_future(ref.future())
        self.in_flight.add(delivered)
        delivered.add_done_callback(self._delivered)

    def _delivered(self, delivered: asyncio.Future[Any]) -> None:
        self.in_flight.discard(delivered)
        if delivered.cancelled() or delivered.exception() is not None or delivered.result() == _GONE:
            self.gone = True
        elif self.pending:
            self._flush()
        self._room.set()


class _RayEnd(Comm):
    """What every end does: receive from its mailbox in sequence order, close, abort."""

    def __init__(self, box: _Mailbox) -> None:
        self._box = box
        self._closed = False
        self._peer_closed = False
        self._peer_gone = False

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise ChannelClosed(f"{action} on a closed Ray comm")

    def _peer_lost(self, watch: asyncio.Future[Any]) -> None:
        if watch.cancelled() or watch.exception() is not None or watch.result() == _ABORTED:
            self._peer_gone = True
            self._box.wake()

    async def receive(self) -> Any:
        """Receive the next message.

        Raises:
            EndOfChannel: the peer closed cleanly and every message was received.
            PeerDied: the peer was aborted or its actor died.
            ChannelClosed: this end was closed.
        """
        box = self._box
        while True:
            self._check_open("receive")
            if self._peer_closed:
                raise EndOfChannel()
            if box.next in box.arrived:
                # unpickled as it is received, not as it arrives: this actor may still be loading the job
                # whose classes (those of a notebook's __main__, for one) a message needs
                data = box.arrived.pop(box.next)
                box.next += 1
                box.wake()
                if data == _CLOSE_DATA:
                    self._peer_closed = True
                    raise EndOfChannel()
                return opened(_loads(data))
            if self._peer_gone:
                raise PeerDied("the peer of this Ray comm vanished without closing it")
            await box.changed()

    def _finish(self, state: str) -> None:
        self._closed = True
        self._box.end(state)

    def abort(self) -> None:
        """Drop this end without a goodbye, as a crashed peer would: the peer sees PeerDied."""
        self._finish(_ABORTED)


class RayComm(_RayEnd):
    """An end in a Ray actor joined to an end in another (or the same) actor.

    Args:
        host: the actor hosting this end.
        key: this end's name in ``host``.
        peer: the handle of the actor hosting the other end.
        peer_key: the other end's name in ``peer``.
        capacity: messages this end buffers before deliveries to it wait.
        window: deliveries in flight at most.
        batch: messages one delivery carries at most.
    """

    def __init__(
        self,
        host: RayCommHost,
        key: str,
        peer: Any,
        peer_key: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        window: int = WINDOW,
        batch: int = BATCH,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        super().__init__(host.mailbox(key))
        self._box.capacity = capacity
        self._sender = _Sender(peer, peer_key, window, batch)
        self._watch = asyncio.wrap_future(peer.aiod4p_watch.remote(peer_key).future())
        self._watch.add_done_callback(self._peer_lost)

    async def send(self, message: Any) -> None:
        """Send ``message``, waiting while ``window`` deliveries are in flight and ``batch`` messages wait.

        Raises:
            ChannelClosed: this end was closed.
            PeerDied: the peer closed, was aborted or died.
            UnpicklableMessage: ``message`` cannot be serialized (nothing was sent).
        """
        self._check_open("send")
        if self._peer_closed or self._peer_gone:
            raise PeerDied("the peer of this Ray comm is gone")
        await self._sender.send(message)

    async def aclose(self) -> None:
        """Send the end-of-channel marker after what was sent; this end then refuses to work."""
        if self._closed:
            return
        self._finish("closed")
        self._watch.cancel()
        if not (self._peer_closed or self._peer_gone or self._sender.gone):
            self._sender.post(_CLOSE)

    def abort(self) -> None:
        super().abort()
        self._watch.cancel()


class PulledComm(_RayEnd):
    """An actor's end of its comm with the driver: what it sends waits until the driver takes it.

    Args:
        host: the actor hosting this end.
        key: this end's name in ``host``.
        capacity: messages queued for the driver before :meth:`send` waits.
    """

    def __init__(self, host: RayCommHost, key: str, *, capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(host.mailbox(key))
        self._capacity = capacity

    async def send(self, message: Any) -> None:
        """Queue ``message`` for the driver, waiting while ``capacity`` messages are queued.

        Raises:
            ChannelClosed: this end was closed.
            PeerDied: the driver closed its end.
            UnpicklableMessage: ``message`` cannot be pickled (nothing was sent).
        """
        data = _dumps(message)
        box = self._box
        while True:
            self._check_open("send")
            if self._peer_closed:
                raise PeerDied("the driver closed its end of this Ray comm")
            if len(box.outbox) < self._capacity:
                break
            await box.changed()
        box.outbox.append(data)
        box.wake()

    async def aclose(self) -> None:
        """Queue the end-of-channel marker for the driver."""
        if self._closed:
            return
        self._closed = True
        box = self._box
        box.outbox.append(_CLOSE_DATA)
        box.state = "closed"
        box.arrived.clear()
        box.wake()


class DriverComm(Comm):
    """The driver's end of its comm with an actor's :class:`PulledComm`.

    Args:
        actor: the handle of the actor hosting the other end.
        key: the other end's name in ``actor``.
        window: deliveries in flight at most.
        batch: messages one delivery carries at most.
    """

    def __init__(self, actor: Any, key: str, *, window: int = WINDOW, batch: int = BATCH) -> None:
        self._actor = actor
        self._key = key
        self._sender = _Sender(actor, key, window, batch)
        self._received: deque[Any] = deque()
        self._taking: asyncio.Future[Any] | None = None
        self._closed = False
        self._peer_closed = False

    async def send(self, message: Any) -> None:
        """Deliver ``message`` to the actor.

        Raises:
            ChannelClosed: this end was closed.
            PeerDied: the actor's end is closed or gone, or the actor died.
            UnpicklableMessage: ``message`` cannot be serialized (nothing was sent).
        """
        if self._closed:
            raise ChannelClosed("send on a closed Ray comm")
        if self._peer_closed:
            raise PeerDied("the actor closed its end of this Ray comm")
        await self._sender.send(message)

    async def receive(self) -> Any:
        """Receive the actor's next message.

        Raises:
            EndOfChannel: the actor closed its end and every message was received.
            PeerDied: the actor's end was aborted, or the actor died.
            ChannelClosed: this end was closed.
        """
        while True:
            if self._closed:
                raise ChannelClosed("receive on a closed Ray comm")
            if self._received:
                message = self._received.popleft()
                if _is_close(message):
                    self._peer_closed = True
                    self._received.clear()
                    raise EndOfChannel()
                return opened(message)
            if self._peer_closed:
                raise EndOfChannel()
            if self._taking is None:
                self._taking = asyncio.wrap_future(self._actor.aiod4p_take.remote(self._key).future())
            # A cancelled receive leaves the take running: the next one gets its messages.
            try:
                taken = await asyncio.shield(self._taking)
            except Exception as exc:
                raise PeerDied(f"the actor of this Ray comm died: {exc}") from exc
            finally:
                if self._taking.done():
                    self._taking = None
            if taken is None:
                raise PeerDied("the actor's end of this Ray comm was aborted")
            self._received.extend(_loads(data) for data in taken)

    async def aclose(self) -> None:
        """Send the end-of-channel marker to the actor; this end then refuses to work."""
        if self._closed:
            return
        self._closed = True
        if not self._peer_closed and not self._sender.gone:
            self._sender.post(_CLOSE)
        self.abort()

    def abort(self) -> None:
        """Stop taking messages (the actor's end learns of it only if the actor goes)."""
        self._closed = True
        if self._taking is not None:
            self._taking.cancel()
            self._taking = None


def ray_comm_pair(host: RayCommHost, handle: Any, name: str, **options: Any) -> tuple[RayComm, RayComm]:
    """Two joined comms, both in the actor ``host`` (whose handle is ``handle``); for tests.

    Their messages still travel as Ray actor calls.
    """
    return (
        RayComm(host, f"{name}.a", handle, f"{name}.b", **options),
        RayComm(host, f"{name}.b", handle, f"{name}.a", **options),
    )
