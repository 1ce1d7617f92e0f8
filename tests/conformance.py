"""The transport conformance suite: what every comm backend must do.

Every check is a coroutine function taking a :class:`TransportUnderTest`, so
any backend can run the same checks wherever its comms live (pytest here; an
MPI backend runs them under ``mpiexec``)::

    for check in CHECKS:
        await check(transport)

A check opens fresh comm pairs with ``transport.make_pair()`` and closes
every comm it opened, passing or failing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiod4p.errors import ChannelClosed, EndOfChannel, PeerDied
from aiod4p.transports import Comm

__all__ = ["CHECKS", "Check", "TransportUnderTest"]


@dataclass(frozen=True)
class TransportUnderTest:
    """How the checks drive one backend.

    Attributes:
        name: shown in test ids.
        make_pair: opens two joined comms (both usable from this event loop).
        max_buffered: the most 64 KiB messages a sender may get sent while its
            receiver does not read (the transport's buffering bound).
    """

    name: str
    make_pair: Callable[[], Awaitable[tuple[Comm, Comm]]]
    max_buffered: int


Check = Callable[[TransportUnderTest], Awaitable[None]]


@asynccontextmanager
async def _pair(transport: TransportUnderTest) -> AsyncIterator[tuple[Comm, Comm]]:
    a, b = await transport.make_pair()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def _receive_all(comm: Comm) -> list[object]:
    received: list[object] = []
    while True:
        try:
            received.append(await comm.receive())
        except EndOfChannel:
            return received


async def check_order(transport: TransportUnderTest) -> None:
    """Messages arrive in the order they were sent, in both directions at once."""
    count = 2000
    async with _pair(transport) as (a, b):

        async def pump(sender: Comm, tag: str) -> None:
            for i in range(count):
                await sender.send((tag, i, [i] * (i % 7)))

        async def drain(receiver: Comm) -> list[object]:
            return [await receiver.receive() for _ in range(count)]

        results = await asyncio.gather(pump(a, "ab"), pump(b, "ba"), drain(b), drain(a))
        assert results[2] == [("ab", i, [i] * (i % 7)) for i in range(count)]
        assert results[3] == [("ba", i, [i] * (i % 7)) for i in range(count)]


async def check_concurrent_senders(transport: TransportUnderTest) -> None:
    """Several tasks sending on one comm: every message arrives whole, each sender's in order."""
    senders, count = 4, 300
    async with _pair(transport) as (a, b):

        async def pump(tag: int) -> None:
            for i in range(count):
                await a.send((tag, i, b"x" * (i * 37 % 5000)))

        async def drain() -> list[Any]:
            return [await b.receive() for _ in range(senders * count)]

        received = (await asyncio.gather(drain(), *(pump(tag) for tag in range(senders))))[0]
        for tag in range(senders):
            mine = [(i, len(payload)) for t, i, payload in received if t == tag]
            assert mine == [(i, i * 37 % 5000) for i in range(count)]


async def check_end_of_stream(transport: TransportUnderTest) -> None:
    """After the peer closes, every message it sent arrives, then EndOfChannel, every time."""
    async with _pair(transport) as (a, b):

        async def send_then_close() -> None:
            await _send_all(a, list(range(100)))
            await a.aclose()

        closing = asyncio.create_task(send_then_close())
        assert await _receive_all(b) == list(range(100))
        await closing
        for _ in range(2):
            try:
                await b.receive()
            except EndOfChannel:
                continue
            raise AssertionError("receive after the end of the channel must raise EndOfChannel")


async def check_large_messages(transport: TransportUnderTest) -> None:
    """Messages larger than any buffer pass intact, between small ones."""
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB
    async with _pair(transport) as (a, b):
        sending = asyncio.create_task(_send_all(a, ["before", big, {"nested": [big[:1000]] * 3}, "after"]))
        received = [await b.receive() for _ in range(4)]
        await sending
        assert received == ["before", big, {"nested": [big[:1000]] * 3}, "after"]


async def check_plain_batches(transport: TransportUnderTest) -> None:
    """Batches of plain data (tuples, lists, strings, numbers), with parts referenced twice, arrive equal."""
    shared = ("station-1", 2.5, None, True, b"raw")
    pair_of = [shared, shared]
    messages: list[object] = [
        [(0, 7, "input", [(f"w{i % 13}", i) for i in range(500)])],  # what the engine's links send
        [(0, 7, "input", [shared] * 50 + [pair_of] * 3 + [[[[[[1]]]]]])],
        ["a repeated string"] * 300,
        [(1, -(2**80), 1e300, float("inf"), "é\udcff")],
    ]
    async with _pair(transport) as (a, b):
        sending = asyncio.create_task(_send_all(a, messages))
        received = [await b.receive() for _ in messages]
        await sending
        assert received == messages


async def _send_all(comm: Comm, messages: list[object]) -> None:
    for message in messages:
        await comm.send(message)


async def check_backpressure(transport: TransportUnderTest) -> None:
    """A receiver that stops reading stalls its sender within the buffering bound; nothing is lost."""
    payload = b"p" * (64 * 1024)
    total = transport.max_buffered * 3 + 10
    async with _pair(transport) as (a, b):
        sent = 0

        async def pump() -> None:
            nonlocal sent
            for i in range(total):
                await a.send((i, payload))
                sent += 1

        sender = asyncio.create_task(pump())
        try:
            # Without back-pressure the sender finishes at once; with it, it stalls.
            done, _ = await asyncio.wait({sender}, timeout=0.5)
            assert not done, f"{transport.name}: the sender was never stopped by a receiver that does not read"
            assert sent <= transport.max_buffered, f"{transport.name}: {sent} messages buffered"
            for i in range(total):
                index, data = await b.receive()
                assert (index, len(data)) == (i, len(payload))
            await sender
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


async def check_close_semantics(transport: TransportUnderTest) -> None:
    """A closed end refuses to send or receive; closing is idempotent and wakes a waiting receive."""
    async with _pair(transport) as (a, b):
        waiting = asyncio.create_task(a.receive())
        await asyncio.sleep(0)  # let it start waiting
        await a.aclose()
        await a.aclose()
        await _expect(waiting, ChannelClosed)
        await _expect(a.send("late"), ChannelClosed)
        await _expect(a.receive(), ChannelClosed)
        # The peer sees the end of the channel, then cannot send any more.
        assert await _receive_all(b) == []
        await _expect(b.send("to nobody"), PeerDied)


async def check_dead_peer(transport: TransportUnderTest) -> None:
    """A peer that aborts (vanishes without closing): PeerDied after what it sent, never EndOfChannel;
    the aborted end refuses to send, and aborting again does nothing."""
    async with _pair(transport) as (a, b):
        for i in range(3):
            await a.send(i)
        a.abort()
        a.abort()
        await _expect(a.send("late"), ChannelClosed)
        received: list[object] = []
        while True:
            try:
                received.append(await b.receive())
            except PeerDied:
                break
            except EndOfChannel:
                raise AssertionError(f"{transport.name}: a vanished peer looked like a clean close") from None
        assert received == list(range(len(received))) and len(received) <= 3
        await _expect(b.send("to nobody"), PeerDied)


async def _expect(awaitable: Awaitable[object], error: type[BaseException]) -> None:
    try:
        await awaitable
    except error:
        return
    raise AssertionError(f"expected {error.__name__}")


CHECKS: list[Check] = [
    check_order,
    check_concurrent_senders,
    check_end_of_stream,
    check_large_messages,
    check_plain_batches,
    check_backpressure,
    check_close_semantics,
    check_dead_peer,
]
