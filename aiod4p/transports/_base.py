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
        """Drop this end at once without a goodbye, as a crashed peer would:
        the peer sees :class:`PeerDied`. Idempotent."""

    async def __aenter__(self) -> Comm:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
