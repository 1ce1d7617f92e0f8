"""The comm interface every transport backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["Comm"]


class Comm(ABC):
    """One end of an ordered, reliable, bidirectional message pipe.

    Messages arrive in the order they were sent. Buffering is bounded: when
    the peer stops receiving, :meth:`send` eventually waits.
    """

    @abstractmethod
    async def send(self, message: Any) -> None:
        """Send one message, waiting while the pipe is full.

        Raises:
            ChannelClosed: this end was closed.
            PeerDied: the peer vanished.
            UnpicklableMessage: ``message`` cannot be serialised (nothing was
                sent; in-process transports never raise it).
        """

    @abstractmethod
    async def receive(self) -> Any:
        """Receive the next message, waiting for one.

        Raises:
            EndOfChannel: the peer closed its end cleanly and every message
                it sent has been received.
            PeerDied: the peer vanished without closing.
            ChannelClosed: this end was closed.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close this end: the peer sees :class:`EndOfChannel` after the
        messages already sent. Idempotent; always releases resources."""

    @abstractmethod
    def abort(self) -> None:
        """Abandon this end at once, as a crashed worker would: the peer gets
        :class:`PeerDied` (not :class:`EndOfChannel`) once it has received
        what was already delivered. Never blocks; idempotent; later calls on
        this end raise :class:`ChannelClosed`. Launchers abort the comms of a
        failed run."""

    async def __aenter__(self) -> Comm:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
