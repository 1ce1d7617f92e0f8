"""Large buffers cross a pipe comm out of band (pickle protocol 5), and arrive whole and writable."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from aiod4p.transports.pipes import _HEADER, _WITH_BUFFERS, _pickle, pipe_comm_pair


def test_large_buffers_leave_the_pickle_and_small_ones_stay() -> None:
    big = b"".join(_pickle({"trace": pickle.PickleBuffer(bytearray(range(256)) * 1024)}))
    small = b"".join(_pickle({"trace": pickle.PickleBuffer(bytearray(100))}))
    assert _HEADER.unpack_from(big)[0] & _WITH_BUFFERS
    assert not _HEADER.unpack_from(small)[0] & _WITH_BUFFERS
    assert pickle.loads(small[_HEADER.size :]) == {"trace": bytearray(100)}


async def test_a_buffer_changed_after_send_arrives_as_it_was_sent() -> None:
    left, right = await pipe_comm_pair()
    trace = bytearray(8 << 20)  # more than the socket holds: the transport keeps what it could not write yet
    async with asyncio.timeout(30):
        await left.send(("trace", pickle.PickleBuffer(trace)))
        trace[:] = b"\xff" * len(trace)
        name, received = await right.receive()
    assert name == "trace" and received == bytearray(8 << 20)
    await left.aclose()
    await right.aclose()


def test_a_large_bytes_object_goes_to_the_socket_as_it_is() -> None:
    """A bytes object cannot change: the frame holds the object itself, not a copy in the pickle."""
    blob = bytes(range(256)) * 4096
    pieces = _pickle(("blob", blob, [b"small", "text"]))
    assert any(piece is blob for piece in pieces)
    frame = b"".join(pieces)
    assert _HEADER.unpack_from(frame)[0] == len(frame) - _HEADER.size
    assert pickle.loads(frame[_HEADER.size :]) == ("blob", blob, [b"small", "text"])


async def test_a_large_bytearray_changed_after_send_arrives_as_it_was_sent() -> None:
    """An in-band bytearray that the pickler hands over whole is copied: the sender may change it."""
    left, right = await pipe_comm_pair()
    data = bytearray(8 << 20)  # more than the socket holds: the transport keeps what it could not write yet
    async with asyncio.timeout(30):
        await left.send(("data", data, b"\x01" * 100_000))
        data[:] = b"\xff" * len(data)
        name, received, blob = await right.receive()
    assert (name, received, blob) == ("data", bytearray(8 << 20), b"\x01" * 100_000)
    await left.aclose()
    await right.aclose()


async def test_messages_with_large_buffers_arrive_whole_and_in_order() -> None:
    left, right = await pipe_comm_pair()
    payloads = [(index, bytearray([index]) * (100_000 + index), [bytearray(70_000), "x"]) for index in range(20)]
    wrapped = [(index, pickle.PickleBuffer(a), [pickle.PickleBuffer(b), c]) for index, a, (b, c) in payloads]
    async with asyncio.timeout(30):
        sender = asyncio.create_task(_send_all(left, wrapped))
        received = [await right.receive() for _ in payloads]
        await sender
    assert received == payloads
    received[0][1][0] = 7  # writable, as an in-band bytearray would be
    await left.aclose()
    await right.aclose()


async def test_numpy_arrays_round_trip_out_of_band() -> None:
    np = pytest.importorskip("numpy")
    left, right = await pipe_comm_pair()
    arrays = [np.arange(50_000, dtype=np.float64) * index for index in range(3)]
    views = [np.arange(200_000, dtype=np.int32)[::2]]  # not contiguous: pickled in band
    async with asyncio.timeout(30):
        await left.send(arrays + views)
        got = await right.receive()
    assert all((a == b).all() for a, b in zip(got, arrays + views, strict=True))
    got[0][0] = 1.5  # writable
    await left.aclose()
    await right.aclose()


async def _send_all(comm: object, payloads: list[object]) -> None:
    for payload in payloads:
        await comm.send(payload)  # type: ignore[attr-defined]
