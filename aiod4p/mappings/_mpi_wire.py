"""The local socket between a launching process and rank 0 of its mpiexec job.

Frames are a 4-byte big-endian length and a pickle. Rank 0 opens one control
connection (first frame ``("control",)``) and one connection per streamed
input (first frame ``("feed", pe_id)``).

Control, rank 0 -> launcher: ``("r", pe, port, items)`` results,
``("s", {rank: stats})`` statistics of every rank, ``("e", error)`` the run
failed, ``("done",)`` the run finished. Launcher -> rank 0: ``("d",)`` drain.
Feed, launcher -> rank 0: ``("i", items)`` input elements, ``("end",)``, or
``("e", error)`` the input raised.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import struct
import sys
from collections.abc import AsyncIterator
from typing import Any

from .._loading import ship_code

__all__ = ["SocketFeed", "dumps", "loads", "read_frame", "write_frame"]


class _Pickler(pickle.Pickler):
    """Pickles classes that cannot be found by name (made by ``type()`` at run
    time, as dispel4py's monitoring wrappers do) by value: name, bases and
    attributes. Everything else pickles as usual."""

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, type) or _findable(obj):
            return NotImplemented
        namespace = {k: v for k, v in vars(obj).items() if k not in ("__dict__", "__weakref__")}
        return type(obj), (obj.__name__, obj.__bases__, namespace)


def _findable(cls: type) -> bool:
    target: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is cls


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` for another process; run-time classes travel by value,
    with the code the other process must load first (see
    :func:`aiod4p._loading.ship_code`).

    Raises:
        pickle.PicklingError, TypeError, AttributeError: ``obj`` cannot be pickled.
    """
    buffer = io.BytesIO()
    _Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    payload = buffer.getvalue()
    return pickle.dumps((ship_code(payload), payload), pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    """Unpickle what :func:`dumps` made, loading the code shipped with it first.

    Raises:
        Exception: whatever unpickling or loading a module raises.
    """
    shipment, payload = pickle.loads(data)
    shipment.load()
    return pickle.loads(payload)


_LENGTH = struct.Struct(">I")


async def write_frame(writer: asyncio.StreamWriter, message: Any) -> None:
    """Send one message, waiting while the socket's buffer is full.

    Raises:
        pickle.PicklingError, TypeError, AttributeError: ``message`` cannot be pickled.
        ConnectionError: the other side is gone.
    """
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(data)) + data)
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """Receive one message.

    Raises:
        asyncio.IncompleteReadError: the other side closed the connection.
    """
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


class SocketFeed:
    """The input of one root PE, streamed by the launcher over a local socket."""

    def __init__(self, address: str, pe_id: str) -> None:
        self.address = address
        self.pe_id = pe_id

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._elements()

    async def _elements(self) -> AsyncIterator[Any]:
        reader, writer = await asyncio.open_unix_connection(self.address)
        try:
            await write_frame(writer, ("feed", self.pe_id))
            while True:
                message = await read_frame(reader)
                if message[0] == "i":
                    for element in message[1]:
                        yield element
                elif message[0] == "end":
                    return
                else:
                    raise message[1]
        finally:
            writer.close()
