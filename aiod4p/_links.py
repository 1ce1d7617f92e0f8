"""Channels between instances on different workers, carried over a comm.

One :class:`PeerLink` per pair of workers multiplexes every channel between
them. Its messages are tuples tagged by the constants below (small ints: they
travel with every batch): ``(DATA, channel, port, items)``, ``(END, channel)``
end of stream, ``(CREDIT, channel, n)`` the receiver took n batches (the
credits they took go back), ``(BYE,)`` this worker sends nothing more.
Queued messages travel as one list per comm message. (The control messages
between a launcher and its workers are another vocabulary:
:mod:`aiod4p.mappings._host`.)
"""

from __future__ import annotations

import asyncio
import pickle
from typing import TYPE_CHECKING, Any

from ._channels import EOS, CreditedSender, Inbox
from ._frames import short_repr
from .errors import EndOfChannel, PeerDied, TransportError, UnpicklableMessage
from .transports import Comm

if TYPE_CHECKING:
    from ._plan import ExecutionPlan

__all__ = ["BYE", "CREDIT", "DATA", "END", "PeerLink", "RemoteChannel", "RemoteSource", "unpicklable_item"]

DATA, END, CREDIT, BYE = 0, 1, 2, 3


class RemoteChannel(CreditedSender):
    """The sending end of a channel whose receiver is on another worker."""

    __slots__ = ("_channel_id", "_link")

    def __init__(self, link: PeerLink, channel_id: int, credits: int, bytes_per_credit: int) -> None:
        super().__init__(credits, bytes_per_credit)
        self._link = link
        self._channel_id = channel_id
        link.senders[channel_id] = self

    def _deliver(self, port: str | None, items: Any) -> None:
        if items is EOS:
            self._link.post((END, self._channel_id))
        else:
            self._link.post((DATA, self._channel_id, port, items))


class RemoteSource:
    """The receiving end's view of a remote sender: returns its credits."""

    __slots__ = ("_channel_id", "_link")

    def __init__(self, link: PeerLink, channel_id: int) -> None:
        self._link = link
        self._channel_id = channel_id

    def release(self) -> None:
        self._link.post((CREDIT, self._channel_id, 1))


class PeerLink:
    """Every channel between this worker and one peer worker."""

    def __init__(self, comm: Comm, peer: int) -> None:
        self.comm = comm
        self.peer = peer
        self.senders: dict[int, RemoteChannel] = {}
        self.receivers: dict[int, tuple[Inbox, RemoteSource]] = {}
        self._outbox: list[tuple[Any, ...]] = []
        self._wake = asyncio.Event()
        self._finishing = False

    def add_receiver(self, channel_id: int, inbox: Inbox) -> None:
        self.receivers[channel_id] = (inbox, RemoteSource(self, channel_id))

    @property
    def pending(self) -> bool:
        """Whether messages are queued that the writer has not yet handed to the comm."""
        return bool(self._outbox)

    def post(self, message: tuple[Any, ...]) -> None:
        """Queue a message for the peer; never blocks."""
        self._outbox.append(message)
        self._wake.set()

    def finish(self) -> None:
        """Say goodbye once everything queued so far has been sent."""
        if not self._finishing:
            self._finishing = True
            self.post((BYE,))

    async def write_loop(self) -> None:
        """Send queued messages until goodbye has been sent."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                batch, self._outbox = self._outbox, []
                await self.comm.send(batch)
                if batch[-1][0] == BYE:
                    return

    async def read_loop(self) -> None:
        """Dispatch the peer's messages until it says goodbye.

        Raises:
            PeerDied: the peer's comm ended before its goodbye.
        """
        receivers, senders = self.receivers, self.senders
        while True:
            try:
                batch = await self.comm.receive()
            except EndOfChannel:
                raise PeerDied(f"worker {self.peer} closed its channels before finishing") from None
            for message in batch:
                kind = message[0]
                if kind == DATA:
                    inbox, source = receivers[message[1]]
                    inbox.put((source, message[2], message[3]))
                elif kind == CREDIT:
                    senders[message[1]].returned(message[2])
                elif kind == END:
                    inbox, source = receivers[message[1]]
                    inbox.put((source, None, EOS))
                else:
                    return


def unpicklable_item(plan: ExecutionPlan, error: UnpicklableMessage) -> TransportError:
    """Name the PE, output port, item and destination behind link messages that failed to pickle.

    Every multi-process mapping reports an item that cannot cross to another
    worker with this message.
    """
    channels = {spec.channel_id: spec for spec in plan.channels}
    for message in error.message if isinstance(error.message, list) else []:
        if message[0] != DATA:
            continue
        for item in message[3]:
            try:
                pickle.dumps(item, protocol=5)
            except Exception as exc:
                spec = channels[message[1]]
                source_port = next(
                    (
                        route.source_port
                        for route in plan.routes[spec.source.pe]
                        if route.dest == spec.dest.pe and route.dest_port == message[2]
                    ),
                    "?",
                )
                return TransportError(
                    f"PE {spec.source} wrote an item on output port {source_port!r} that cannot be pickled to"
                    f" reach {spec.dest.pe}.{message[2]} on worker {spec.dest_worker}: {short_repr(item)}"
                    f" ({type(exc).__name__}: {exc})"
                )
    return TransportError(str(error))
