"""The in-memory transport: two comms joined inside one event loop."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from ..errors import ChannelClosed, EndOfChannel, PeerDied
from ._base import DEFAULT_CAPACITY, Comm

__all__ = ["MemoryComm", "memory_comm_pair"]


class _Pipe:
    """One direction: a bounded FIFO with reader and writer wake-ups."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: deque[Any] = deque()
        self.closed = False  # the writer closed cleanly
        self.broken = False  # the writer vanished
        self.reader_gone = False
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    def wake(self) -> None:
        self.readable.set()
        self.writable.set()


class MemoryComm(Comm):
    """An end of an in-memory comm pair; see :func:`memory_comm_pair`."""

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming
        self._closed = False

    async def send(self, message: Any) -> None:
        while True:
            if self._closed:
                raise ChannelClosed("send on a closed comm")
            if self._out.reader_gone:
                raise PeerDied("the peer of this in-memory comm is gone")
            if len(self._out.items) < self._out.capacity:
                break
            self._out.writable.clear()
            await self._out.writable.wait()
        self._out.items.append(message)
        self._out.readable.set()

    async def receive(self) -> Any:
        while True:
            if self._closed:
                raise ChannelClosed("receive on a closed comm")
            if self._in.items:
                message = self._in.items.popleft()
                self._in.writable.set()
                return message
            if self._in.closed:
                raise EndOfChannel()
            if self._in.broken:
                raise PeerDied("the peer of this in-memory comm vanished")
            self._in.readable.clear()
            await self._in.readable.wait()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.closed = True
        self._in.reader_gone = True
        self._out.wake()
        self._in.wake()

    def abort(self) -> None:
        """Vanish without closing, as a crashed peer would."""
        self._closed = True
        self._out.broken = True
        self._in.reader_gone = True
        self._out.wake()
        self._in.wake()


def memory_comm_pair(capacity: int = DEFAULT_CAPACITY) -> tuple[MemoryComm, MemoryComm]:
    """Two joined comms; each direction buffers at most ``capacity`` messages."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, not {capacity}")
    a_to_b, b_to_a = _Pipe(capacity), _Pipe(capacity)
    return MemoryComm(a_to_b, b_to_a), MemoryComm(b_to_a, a_to_b)
