"""The comm interface every transport backend implements, and what backends share to implement it."""

from __future__ import annotations

import asyncio
import io
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import TransportError

__all__ = ["DEFAULT_CAPACITY", "Comm", "Undecodable", "Wakeups", "message_pickler", "opened", "pickled_plain"]

DEFAULT_CAPACITY = 16
"""Messages a comm's receiving end buffers before its sender waits, unless asked otherwise."""


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


class Wakeups:
    """Lets tasks wait until the state they check changes: :meth:`changed` waits for the next :meth:`wake`."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self) -> None:
        """Wait until the next :meth:`wake`."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


@dataclass(frozen=True)
class Undecodable:
    """Stands among received messages for one that could not be unpickled; receiving it raises (:func:`opened`)."""

    error: Exception


def opened(message: Any) -> Any:
    """The received ``message`` itself.

    Raises:
        TransportError: it is an :class:`Undecodable`: it could not be unpickled here.
    """
    if isinstance(message, Undecodable):
        error = message.error
        raise TransportError(f"cannot unpickle a message: {type(error).__name__}: {error}") from error
    return message


def message_pickler(
    file: Any, message: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool | None] | None = None
) -> pickle.Pickler:
    """A protocol-5 pickler writing to ``file``, to pickle ``message`` (its ``dump`` is the caller's).

    A message of plain data that is mostly tuples and lists (batches of
    ``(word, 1)``) is pickled without the pickler's memo (its ``fast`` is set):
    remembering each tuple cost more than writing it (pickling and unpickling
    such a batch took about a third less time without it). It comes back
    equal; a part referenced twice comes back as two copies, as it would from
    two messages (``memo_free`` says which messages: none whose copies would
    make it much larger).
    """
    pickler = pickle.Pickler(file, protocol=5, buffer_callback=buffer_callback)
    pickler.fast = memo_free(message)
    return pickler


def pickled_plain(message: Any) -> bytes | None:
    """``message`` pickled without the memo where :func:`message_pickler` would leave it out, else ``None``
    (for a transport that pickles other messages its own way)."""
    data = io.BytesIO()
    pickler = message_pickler(data, message)
    if not pickler.fast:
        return None
    pickler.dump(message)
    return data.getvalue()


def _memo_free(message: Any) -> bool:
    """``aiod4p._speedups.memo_free`` where it was not built: a walk in Python costs what the memo would save."""
    return False


try:
    from .._speedups import memo_free
except ImportError:  # built without a C compiler
    memo_free = _memo_free
