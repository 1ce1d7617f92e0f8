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
import importlib.machinery
import io
import pickle
import struct
import sys
import types
from collections.abc import AsyncIterator
from typing import Any

from .._loading import import_file

__all__ = ["SocketFeed", "dumps", "loads", "read_frame", "write_frame"]


class _Pickler(pickle.Pickler):
    """Pickles classes that cannot be found by name (made by ``type()`` at run
    time, as dispel4py's monitoring wrappers do) by value: name, bases and
    attributes. Everything else pickles as usual. Records the top-level
    modules of the classes and functions it meets."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)):
            self.modules.add(getattr(obj, "__module__", None) or "")
        if not isinstance(obj, type) or _findable(obj):
            return NotImplemented
        namespace = {k: v for k, v in vars(obj).items() if k not in ("__dict__", "__weakref__")}
        return type(obj), (obj.__name__, obj.__bases__, namespace)


def _findable(cls: type) -> bool:
    target: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is cls


def _file_only(name: str) -> str | None:
    """The file of top-level module ``name`` if it was loaded from a file that
    an import by name would not find (e.g. with ``spec_from_file_location``)."""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if "." in name or not path or name == "__main__":
        return None
    if importlib.machinery.PathFinder.find_spec(name, sys.path) is not None:
        return None
    return str(path)


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` for another process; run-time classes travel by value,
    and modules the other process could not import by name travel as the
    path of their file (see :func:`loads`).

    Raises:
        pickle.PicklingError, TypeError, AttributeError: ``obj`` cannot be pickled.
    """
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    files = {name: path for name in sorted(pickler.modules) if (path := _file_only(name)) is not None}
    return pickle.dumps((files, buffer.getvalue()), pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    """Unpickle what :func:`dumps` made, loading the modules it names from their files first.

    Raises:
        Exception: whatever unpickling or loading a module raises.
    """
    files, payload = pickle.loads(data)
    for name, path in files.items():
        if name not in sys.modules:
            import_file(name, path)
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
