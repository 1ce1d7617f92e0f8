"""Credit-based channels between PE instances.

A channel joins one sender instance to one receiving instance. The sender
holds ``credits`` (batches it may have in flight) and waits when it has fewer
than a batch takes: one, or one per ``bytes_per_credit`` bytes of a batch
the sender measured as larger than that (a single item of hundreds of MB),
at most all of them. The receiver gives back what a batch took when its
actor takes the batch from the inbox. So the inbox of an instance never holds more than
``channels x credits`` batches (one per channel where each is that large), and
a receiver never blocks on delivery, which keeps a worker's transport pump
free of head-of-line deadlocks.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from typing import Any, Final, Protocol

__all__ = ["EOS", "Barrier", "CreditSource", "CreditedSender", "Inbox", "LocalChannel", "Message", "SenderChannel"]


class _EndOfStream:
    __slots__ = ()

    def __repr__(self) -> str:
        return "EOS"


EOS: Final = _EndOfStream()


class Barrier:
    """Checkpoint barrier ``id``: travels in-band like :data:`EOS` (no credit) and counts as no items.

    Everything a channel carried before it belongs to checkpoint ``id``;
    everything after it, to the next (see :mod:`aiod4p._checkpoint`).
    """

    __slots__ = ("id",)

    def __init__(self, id: int) -> None:
        self.id = id

    def __len__(self) -> int:
        return 0

    def __reduce__(self) -> tuple[type[Barrier], tuple[int]]:
        return Barrier, (self.id,)

    def __repr__(self) -> str:
        return f"Barrier({self.id})"


class CreditSource(Protocol):
    """The sending end as the receiver sees it: where credits go back."""

    def release(self) -> None: ...


# (credit source, destination port or None for a feed batch, items or EOS)
Message = tuple[CreditSource, str | None, Any]


class SenderChannel(Protocol):
    """The sending end of a channel."""

    credits: int

    def takes(self, count: int, size: int = 0) -> int: ...

    async def send(self, port: str | None, items: list[Any], size: int = 0) -> None: ...

    def close(self) -> None: ...

    def mark(self, barrier: Barrier) -> None: ...


class Inbox:
    """An instance's multi-producer inbox; bounded by the senders' credits."""

    __slots__ = ("_queue", "_waiter", "max_queued_items", "queued_items")

    def __init__(self) -> None:
        self._queue: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.queued_items = 0
        self.max_queued_items = 0

    def put(self, message: Message) -> None:
        """Deliver a message; never blocks (credits bound the queue)."""
        items = message[2]
        if items is not EOS:
            self.queued_items += len(items)
            if self.queued_items > self.max_queued_items:
                self.max_queued_items = self.queued_items
        self._queue.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._queue

    def requeue(self, messages: list[Message]) -> None:
        """Put messages taken earlier back in front, in their order (a checkpoint's blocked channels)."""
        for message in reversed(messages):
            items = message[2]
            if items is not EOS:
                self.queued_items += len(items)
            self._queue.appendleft(message)
        waiter = self._waiter
        if messages and waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Message:
        """Take the oldest message, waiting for one."""
        while not self._queue:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._queue.popleft()
        items = message[2]
        if items is not EOS:
            self.queued_items -= len(items)
        return message


class CreditedSender:
    """The sending end of a channel: :meth:`send` waits until it has the credits a batch takes, then delivers.

    :meth:`returned` gives back, batch by batch in the order they were sent, the
    credits each took.
    """

    __slots__ = ("_taken", "_total", "_waiter", "bytes_per_credit", "closed", "credits")

    def __init__(self, credits: int, bytes_per_credit: int = sys.maxsize) -> None:
        self.credits = credits
        self.bytes_per_credit = bytes_per_credit
        self._total = credits
        self._taken: deque[int] = deque()  # the credits each batch in flight took, oldest first
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def takes(self, count: int, size: int = 0) -> int:
        """The credits a batch of ``count`` items of about ``size`` bytes in all takes: one per
        ``bytes_per_credit`` bytes (rounded up), at least one and at most all of the channel's."""
        return min(-(-size // self.bytes_per_credit), self._total) or 1

    async def send(self, port: str | None, items: list[Any], size: int = 0) -> None:
        """Deliver a batch of about ``size`` bytes, waiting until the channel has the credits it takes."""
        weight = self.takes(len(items), size)
        while self.credits < weight:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.credits -= weight
        self._taken.append(weight)
        self._deliver(port, items)

    def returned(self, batches: int = 1) -> None:
        """The receiver took the oldest ``batches`` batches in flight: give back the credits they took."""
        taken = self._taken
        self.credits += taken.popleft() if batches == 1 else sum(taken.popleft() for _ in range(batches))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Send end of stream (needs no credit); idempotent."""
        if not self.closed:
            self.closed = True
            self._deliver(None, EOS)

    def mark(self, barrier: Barrier) -> None:
        """Send a checkpoint barrier (needs no credit); nothing once closed."""
        if not self.closed:
            self._deliver(None, barrier)

    def _deliver(self, port: str | None, items: Any) -> None:
        raise NotImplementedError


class LocalChannel(CreditedSender):
    """A channel whose two ends share one event loop.

    A batch takes one credit per ``unit`` items (rounded up), or more where its
    bytes take more (:meth:`CreditedSender.takes`), at most all of the channel's
    credits; the receiver returns them when it takes the batch: so a batch may
    carry up to ``credits x unit`` items, and the channel never has more than
    ``credits x unit`` items in flight however its batches are sized (one
    credit per batch when ``unit`` is unbounded).
    """

    __slots__ = ("_inbox", "unit")

    def __init__(
        self, inbox: Inbox, credits: int, unit: int = sys.maxsize, bytes_per_credit: int = sys.maxsize
    ) -> None:
        super().__init__(credits, bytes_per_credit)
        self._inbox = inbox
        self.unit = unit

    def takes(self, count: int, size: int = 0) -> int:
        return min(max(-(-count // self.unit), -(-size // self.bytes_per_credit)), self._total) or 1

    def _deliver(self, port: str | None, items: Any) -> None:
        self._inbox.put((self, port, items))

    def release(self) -> None:
        self.returned()
