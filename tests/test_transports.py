"""Every transport passes the conformance suite; pipe-specific behaviour across real processes."""

from __future__ import annotations

import asyncio
import enum
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conformance import CHECKS, Check, TransportUnderTest
from hypothesis import given
from hypothesis import strategies as st

from aiod4p import transports
from aiod4p.errors import EndOfChannel, MappingUnavailable, PeerDied, TransportError, UnpicklableMessage
from aiod4p.transports import Comm, MemoryComm, get_transport, memory_comm_pair, pipes
from aiod4p.transports.pipes import PipeComm, open_pipe_comm, pipe_comm_pair


async def _memory_pair() -> tuple[Comm, Comm]:
    return memory_comm_pair(capacity=8)


async def _pipe_pair() -> tuple[Comm, Comm]:
    return await pipe_comm_pair(max_messages=8, write_buffer=64 * 1024, socket_buffer=208 * 1024)


# Pipe bound: 8 decoded messages + the socket's kernel buffers (about 2 x 208 KiB)
# + the 64 KiB write buffer, in 64 KiB messages, with room for a partial frame.
TRANSPORTS = [
    TransportUnderTest("memory", _memory_pair, max_buffered=8),
    TransportUnderTest("pipe", _pipe_pair, max_buffered=8 + 16 + 2),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.name)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_conformance(transport: TransportUnderTest, check: Check) -> None:
    async with asyncio.timeout(20):
        await check(transport)


# -- pipe specifics ------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 1


MEMO_FREE = [
    ([(0, 7, "input", [("w1", 1), ("w2", 1)])], True),  # a link message: as many tuples as strings
    ([(number, 2.5, None, True) for number in range(3)], True),
    ([(1, 2.5, None, True)] * 3, False),  # a part next to itself
    ([[[[[[1]]]]]], True),  # six levels
    ([[[[[[[1]]]]]]], False),  # seven
    (["a", "a", "a"], False),  # bare strings: the memo writes a repeated one once
    ([("a", "b", "c")], False),
    ([{"ra": 1.0}], False),  # a dict's keys repeat from item to item
    ([np.zeros(3)], False),
    ([(1, True.__class__)], False),
    ([("a",), "b"], True),  # two containers, two strings
    ([("a",), "b", "c"], False),  # one string more
    ([(Color.RED, 1)], False),  # an int subclass
    ([("k", 1), ("x" * 1024, 1)], True),
    ([("x" * 1025, 1)], False),  # a long string: the memo writes it once where it repeats
    ([("y" * 1000, i) for i in range(4200)], False),  # over 4 MiB of strings
    (list(range(1 << 18)), False),  # more parts than are walked
    ([("k", ((0,) * 1000,) * 1000)], False),  # a part next to itself: 1,000 copies
    ([[("a", 1)], [("a", 1)]], True),  # equal parts, not the same
]


@pytest.mark.parametrize(("message", "free"), MEMO_FREE, ids=range(len(MEMO_FREE)))
def test_plain_batches_are_pickled_without_the_memo_and_anything_else_with_it(message: Any, free: bool) -> None:
    from aiod4p import _speedups
    from aiod4p.transports import _base

    assert _base.memo_free is _speedups.memo_free
    assert _speedups.memo_free(message) is free
    assert _base._memo_free(message) is False  # without the C module every message keeps the memo
    assert bool(_base.message_pickler(io.BytesIO(), message).fast) is free


PLAIN_LEAVES = st.one_of(
    st.text(max_size=8), st.binary(max_size=8), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()
)
PLAIN_TREES = st.recursive(
    PLAIN_LEAVES, lambda inner: st.lists(inner, max_size=6) | st.tuples(inner, inner), max_leaves=40
)


@given(tree=PLAIN_TREES, shared=st.booleans())
def test_any_message_comes_back_equal_with_or_without_the_memo(tree: Any, shared: bool) -> None:
    from aiod4p.transports import _base

    message = [tree, tree] if shared else tree  # a part referenced twice
    data = io.BytesIO()
    _base.message_pickler(data, message).dump(message)
    assert pickle.loads(data.getvalue()) == message
    plain = _base.pickled_plain(message)
    assert plain is None or pickle.loads(plain) == message


def test_a_list_that_holds_itself_is_not_memo_free() -> None:
    from aiod4p import _speedups

    loop: list[Any] = [1]
    loop.append(loop)
    assert _speedups.memo_free(loop) is False


@pytest.mark.asyncio
async def test_an_unpicklable_message_fails_alone() -> None:
    async with asyncio.timeout(10):
        a, b = await pipe_comm_pair()
        try:
            with pytest.raises(UnpicklableMessage, match="cannot be pickled") as caught:
                await a.send(("item", lambda: None))
            assert caught.value.message[0] == "item"
            await a.send("still fine")
            assert await b.receive() == "still fine"
        finally:
            await a.aclose()
            await b.aclose()


class _FailsToLoad:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def _explode() -> None:
    raise RuntimeError("cannot rebuild")


@pytest.mark.asyncio
async def test_an_undecodable_message_raises_and_the_next_ones_arrive() -> None:
    async with asyncio.timeout(10):
        a, b = await pipe_comm_pair()
        try:
            await a.send(_FailsToLoad())
            await a.send("next")
            with pytest.raises(TransportError, match="cannot unpickle a message: RuntimeError: cannot rebuild"):
                await b.receive()
            assert await b.receive() == "next"
        finally:
            await a.aclose()
            await b.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("limit", ["max_messages", "write_buffer", "socket_buffer"])
async def test_limits_must_be_positive(limit: str) -> None:
    left, right = socket.socketpair()
    with left, right, pytest.raises(ValueError, match="at least 1"):
        await open_pipe_comm(left, **{limit: 0})


def _wmem_max() -> int:
    """The largest send buffer the kernel grants a socket."""
    return int(Path("/proc/sys/net/core/wmem_max").read_text())


@pytest.mark.asyncio
async def test_the_socket_holds_a_frame_of_megabytes_where_the_kernel_allows() -> None:
    allowed = _wmem_max()
    left, right = socket.socketpair()
    comm = await open_pipe_comm(left)
    try:
        # Linux reports twice what was asked (its bookkeeping), capped at twice wmem_max.
        assert left.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * min(4 << 20, allowed)
    finally:
        comm.abort()
        right.close()


async def test_frames_of_megabytes_cross_whole_among_small_ones_however_the_transport_writes_them() -> None:
    """asyncio's own transport (before Python 3.12) joins a frame's pieces into one bytes object, a copy of the frame
    made on the event loop: 20 MB items fed to multi -n 2 lagged a service's 10 ms ticker 73-125 ms at p99 (50-89 ms
    written a piece at a time), and took 2.1-2.5 s against 1.2-1.6 s. A frame of a megabyte or more goes to such a
    transport a piece at a time; uvloop's writes the pieces as they are."""
    uvloop = sys.modules.get("uvloop")
    on_uvloop = uvloop is not None and isinstance(asyncio.get_running_loop(), uvloop.Loop)
    a, b = await pipe_comm_pair()
    assert a._joins == (not on_uvloop and sys.version_info < (3, 12))
    array = np.arange(600_000, dtype=np.float64)  # 4.8 MB, out of band
    blob = bytearray(os.urandom(3 << 20))  # in band
    messages: list[Any] = ["before", [array, blob, "small"], "between", bytes(2 << 20), "after"]
    try:
        async with asyncio.timeout(20):
            sending = asyncio.gather(*(a.send(message) for message in messages))  # concurrent senders
            received = [await b.receive() for _ in messages]
            await sending
    finally:
        a.abort()
        b.abort()
    assert received[0] == "before" and received[2:] == messages[2:]
    assert np.array_equal(received[1][0], array) and received[1][1:] == [blob, "small"]


def _read(protocol: pipes._FrameProtocol, stream: bytes) -> None:
    """Give ``protocol`` the bytes of ``stream`` in reads of at most 4 MiB, as a socket gives them."""
    position = 0
    while position < len(stream):
        with protocol.get_buffer(-1) as room:
            count = min(len(room), len(stream) - position, 4 << 20)
            room[:count] = stream[position : position + count]
        protocol.buffer_updated(count)
        position += count


async def test_the_arrays_of_a_frame_of_megabytes_arrive_without_a_second_copy() -> None:
    """The receiver read a frame into its buffer, then copied each array out of it: a 200 MB array took its worker
    to 433 MB. A frame of ``_KEPT_BUFFER`` bytes or more lends its arrays the read buffer (234 MB), which is then
    replaced: the arrays stay writable and their own, and what follows them in the buffer still decodes."""
    array = np.arange(2 << 20, dtype=np.float64)  # 16 MiB
    stream = b"".join([*pipes._pickle([array, "with it"]), *pipes._pickle("next")])
    protocol = pipes._FrameProtocol(max_messages=32)
    tracemalloc.start()
    try:
        _read(protocol, stream)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (received, note), following = protocol.messages
    assert np.array_equal(received, array) and (note, following) == ("with it", "next")
    assert peak < 1.5 * array.nbytes, (peak, array.nbytes)
    assert received.flags.aligned and received.ctypes.data % 16 == 0  # as fast to compute with as a copy
    received[:] = -1.0  # writable, and no one else's: the buffer the protocol reads into next is another
    again = b"".join(pipes._pickle("again"))
    with protocol.get_buffer(-1) as room:
        room[: len(again)] = again
    protocol.buffer_updated(len(again))
    assert protocol.messages[-1] == "again" and float(received.sum()) == -array.size


def _owner(array: np.ndarray) -> Any:
    """The object that holds ``array``'s memory."""
    base: Any = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


@pytest.mark.parametrize(
    "message",
    [
        [np.full(1 << 20, float(n)) for n in range(3)],  # a batch of arrays of 8 MiB
        (b"x" * (20 << 20), np.zeros(10_000)),  # one small array in a large frame
        (b"x" * (20 << 20), np.zeros(1 << 20)),  # an array of 8 MiB beside larger bytes
    ],
    ids=["several-arrays", "a-small-array", "an-array-beside-larger-bytes"],
)
async def test_an_array_that_does_not_make_its_frame_is_copied_out_so_that_keeping_it_keeps_no_more(
    message: Any,
) -> None:
    """A PE keeping one array of a batch (a window, a pair to correlate later), or a small array beside large
    bytes, would keep the whole frame if the array held a view of it."""
    protocol = pipes._FrameProtocol(max_messages=32)
    _read(protocol, b"".join(pipes._pickle(message)))
    (received,) = protocol.messages
    arrays = [(got, sent) for got, sent in zip(received, message, strict=True) if isinstance(sent, np.ndarray)]
    assert all(np.array_equal(got, sent) and len(_owner(got)) == got.nbytes for got, sent in arrays)


_CHILD = textwrap.dedent(
    """
    import asyncio, os, socket, sys
    from aiod4p.transports.pipes import open_pipe_comm

    async def main(fd, mode):
        comm = await open_pipe_comm(socket.socket(fileno=fd))
        for i in range(100):
            await comm.send(("child", i))
        if mode == "close":
            await comm.aclose()
        elif mode == "exit":
            os._exit(3)
        else:
            await comm.send("ready")
            await comm.receive()  # until killed

    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
    """
)


def _spawn(mode: str, fd: int) -> subprocess.Popen[bytes]:
    # Its own session: signals other tests send to their process group never reach it.
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(fd), mode], pass_fds=[fd], start_new_session=True)


async def _child(mode: str) -> tuple[subprocess.Popen[bytes], PipeComm]:
    mine, theirs = socket.socketpair()
    with theirs:
        process = _spawn(mode, theirs.fileno())
    return process, await open_pipe_comm(mine)


async def _exited(process: subprocess.Popen[bytes]) -> None:
    """Wait (through a pidfd, no child watcher) until ``process`` exits; kill it after 10 s."""
    if process.poll() is not None:
        return
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(process.pid)  # works until the process is reaped, which only poll() and wait() do
    try:
        ended = loop.create_future()
        loop.add_reader(pidfd, lambda: ended.done() or ended.set_result(None))
        try:
            async with asyncio.timeout(10):
                await ended
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
        if process.poll() is None:
            process.kill()
        process.wait()  # reaps at once: the process has ended


async def _receive_until_end(comm: PipeComm) -> tuple[list[Any], BaseException]:
    received: list[Any] = []
    while True:
        try:
            received.append(await comm.receive())
        except (EndOfChannel, PeerDied) as exc:
            return received, exc


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["close", "exit", "kill"])
async def test_a_child_process_closing_exiting_or_killed(mode: str) -> None:
    async with asyncio.timeout(20):
        process, comm = await _child(mode)
        try:
            if mode == "kill":
                for i in range(100):
                    assert await comm.receive() == ("child", i)
                assert await comm.receive() == "ready"
                os.kill(process.pid, signal.SIGKILL)
            received, end = await _receive_until_end(comm)
            if mode == "close":
                assert isinstance(end, EndOfChannel)
                assert received == [("child", i) for i in range(100)]
            else:
                assert isinstance(end, PeerDied)
            with pytest.raises(PeerDied):
                await comm.send("anyone?")
        finally:
            await comm.aclose()
            await _exited(process)
        assert process.returncode == {"close": 0, "exit": 3, "kill": -signal.SIGKILL}[mode]


# -- the registry --------------------------------------------------------------------


def test_transports_are_found_by_name() -> None:
    assert get_transport("memory") is MemoryComm
    assert get_transport("pipes") is PipeComm
    for name in transports.TRANSPORTS:
        try:
            comm = get_transport(name)
        except MappingUnavailable:
            continue  # its extra is not installed
        assert issubclass(comm, Comm) and not getattr(comm, "__abstractmethods__", None), name


def test_an_unknown_transport_is_a_clear_error() -> None:
    with pytest.raises(MappingUnavailable, match=r"unknown transport .carrier-pigeon.*memory, pipes"):
        get_transport("carrier-pigeon")
