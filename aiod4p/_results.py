"""Results: the items written to output ports that are not connected."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import datetime
import functools
import hashlib
import json
import logging
import numbers
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, overload

from ._sizes import approximate_batch_size, approximate_size
from .errors import Aiod4pError

__all__ = ["QueueSink", "ResultRecord", "ResultSink", "Results", "data_digest", "record_line"]

logger = logging.getLogger("aiod4p")


class ResultRecord(NamedTuple):
    """One result: ``data`` written by PE ``pe`` on its unconnected output ``port``."""

    pe: str
    port: str
    data: Any

    def to_json(self) -> dict[str, Any]:
        """The JSON Lines record: ``{"pe": ..., "output": ..., "data": ...}``."""
        return {"pe": self.pe, "output": self.port, "data": self.data}


def record_line(record: ResultRecord) -> str:
    """The JSON Lines line of ``record`` (newline included).

    Values JSON has no type for are written as faithfully as JSON allows:
    numpy arrays and scalars (anything with ``tolist()``) as lists and
    numbers, bytes as ``{"base64": "..."}``, sets as lists (sorted where they sort), dates and times
    (anything with ``isoformat()``: obspy's ``UTCDateTime`` too; numpy's ``datetime64`` of any unit) in ISO 8601;
    durations (``datetime.timedelta``, pandas' ``Timedelta``, numpy's ``timedelta64`` of any unit but years,
    months and none) as their seconds, a number (``None`` for NaT), also as dict keys;
    anything else as its ``repr``, with a warning once per type. Dict keys
    JSON does not take (a tuple, a numpy integer, a date) are written as the
    number a numpy scalar is, a date or time in ISO 8601, else as their
    ``repr``, with the same warning.
    NaN and the infinities are written ``NaN``, ``Infinity``, ``-Infinity``, which ``json.loads`` reads back.

    Raises:
        Aiod4pError: JSON cannot write ``record.data`` (it holds itself, or is nested deeper than Python
            recurses), naming the PE and port.
    """
    try:
        return "".join([_record_head(record.pe, record.port), *_data_pieces(record.data), "}\n"])
    except (ValueError, RecursionError) as exc:
        what = f"a result of PE {record.pe} on port {record.port}"
        raise Aiod4pError(f"{what} cannot be written as JSON: {exc}") from None


def data_digest(data: Any) -> str:
    """A digest of ``data``'s JSON as :func:`record_line` writes it (its record's ``data``), without the warnings of
    a type written as its repr. The value ``json.loads`` reads back from that JSON has the same digest (JSON
    written so is written alike again), so a result written by ``--results`` is found by its line.

    Raises:
        ValueError, RecursionError: JSON cannot write ``data`` (as :func:`record_line`).
    """
    token = _quiet.set(True)
    try:
        pieces = _data_pieces(data)
    finally:
        _quiet.reset(token)
    digest = hashlib.blake2b(digest_size=16)
    for piece in pieces:
        digest.update(piece.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _data_pieces(data: Any) -> list[str]:
    """The JSON of ``data`` as :func:`record_line` writes it, in pieces (see :func:`_pieces`)."""
    if approximate_size(data)[0] < _LARGE:
        return [_encode_value(data)]
    return _pieces(data, _WALKED_DEPTH)


_LARGE = 1 << 20  # bytes of a result (as approximate_size counts them) from which large arrays in it are looked for
_CHUNK = 1 << 14  # elements of a large array encoded at a time
_WALKED = 64  # the most elements of a tuple, list or dict looked into for large arrays
_WALKED_DEPTH = 3  # how deep


def _encode_value(value: Any) -> str:
    try:
        return _encode(value)
    except TypeError:  # a dict key json refuses: it calls no default for keys
        return _encode(_json_keys(value))


def _pieces(value: Any, depth: int) -> list[str]:
    """The JSON of ``value``, in pieces: a numpy array of more than :data:`_CHUNK` elements (the value, or one in
    its small tuples, lists and dicts, ``depth`` levels down) a chunk of elements at a time, as
    :func:`_encode_value` writes it whole. The whole array as Python objects took about ten times its size, and
    the encoding, C code that holds the main thread, kept a signal's handler from running until it ended: a 100 MB
    array's record made Ctrl-C wait 20 seconds, and a second Ctrl-C meanwhile was lost."""
    numpy = sys.modules.get("numpy")  # numpy's arrays alone: another library's may take size() as a method
    if (
        numpy is not None
        and isinstance(value, numpy.ndarray)
        and value.ndim
        and value.size > _CHUNK
        and type(_listed(value[:1])) is list
    ):
        rows = len(value)
        per_row = value.size // rows
        if per_row > _CHUNK:
            if getattr(value[0], "ndim", 0) >= value.ndim:  # rows as deep as the whole (numpy's matrix)
                return [_encode_value(value)]
            parts = [piece for row in value for piece in (*_pieces(row, 0), ", ")]
        else:
            step = max(1, _CHUNK // per_row)
            parts = [
                piece
                for start in range(0, rows, step)
                for piece in (_encode_value(value[start : start + step])[1:-1], ", ")
            ]
        return ["[", *parts[:-1], "]"]
    kind = type(value)
    if depth and (kind is list or kind is tuple) and 0 < len(value) <= _WALKED:
        parts = [piece for element in value for piece in (*_pieces(element, depth - 1), ", ")]
        return ["[", *parts[:-1], "]"]
    if depth and kind is dict and 0 < len(value) <= _WALKED:
        parts = []
        for key, element in value.items():
            parts += [_encode_value({key: 0})[1:-4], ": ", *_pieces(element, depth - 1), ", "]
        return ["{", *parts[:-1], "}"]
    return [_encode_value(value)]


@functools.lru_cache(maxsize=4096)
def _record_head(pe: str, port: str) -> str:
    """What :meth:`ResultRecord.to_json` encodes to before the data, as ``json.dumps`` writes it."""
    return '{"pe": ' + _encode(pe) + ', "output": ' + _encode(port) + ', "data": '


_KEY_TYPES = (str, int, float, bool, type(None))


def _json_keys(value: Any) -> Any:
    """``value`` with the keys of its dicts, at any depth, made ones JSON takes."""
    if isinstance(value, dict):
        return {_json_key(key): _json_keys(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_keys(item) for item in value]
    return value


def _json_key(key: Any) -> Any:
    if isinstance(key, _KEY_TYPES):
        return key
    if isinstance(plain := _listed(key), _KEY_TYPES):
        return plain
    if isinstance(key, datetime.timedelta):
        return key.total_seconds()
    isoformat = getattr(key, "isoformat", None)
    if callable(isoformat):
        return isoformat()
    _warn_repr(f"{type(key).__module__}.{type(key).__qualname__} (as a dict key)")
    return repr(key)


_FINER_THAN_MICROSECONDS = frozenset({"ns", "ps", "fs", "as"})


def _plain(value: Any, tolist: Callable[[], Any]) -> Any:
    """``value.tolist()``: the Python list or number a numpy array or scalar is; ``value`` itself when that gives
    back its own type, except numpy's long doubles, which no Python type holds: the nearest float or complex.
    A ``datetime64`` finer than microseconds, whose ``tolist()`` gives integers, gives its times in ISO 8601
    (``None`` for NaT), as a coarser one's ``datetime`` objects are written; a ``timedelta64``, whose ``tolist()``
    gives integers or ``timedelta`` objects by its unit, gives its seconds (``None`` for NaT)."""
    dtype = getattr(value, "dtype", None)
    kind = getattr(dtype, "kind", None)
    if kind in ("M", "m") and (numpy := sys.modules.get("numpy")) is not None:
        if kind == "M" and numpy.datetime_data(dtype)[0] in _FINER_THAN_MICROSECONDS:
            text = numpy.asarray(numpy.datetime_as_string(value)).astype(object)
            text[numpy.isnat(value)] = None
            return text.tolist()
        if kind == "m" and numpy.datetime_data(dtype)[0] not in ("Y", "M", "generic"):  # no fixed length
            seconds = numpy.asarray(value / numpy.timedelta64(1, "s")).astype(object)
            seconds[numpy.isnat(value)] = None
            return seconds.tolist()
    plain = tolist()
    if type(plain) is type(value) and isinstance(value, numbers.Complex):
        return float(value) if isinstance(value, numbers.Real) else complex(value)
    return plain


def _listed(value: Any) -> Any:
    """What :func:`_plain` makes of ``value``; ``value`` itself if it has no ``tolist()``, or one that fails
    (astropy's ``Quantity`` refuses: it is then written as its repr)."""
    tolist = getattr(value, "tolist", None)
    if not callable(tolist):
        return value
    try:
        return _plain(value, tolist)
    except MemoryError:
        raise
    except Exception:  # another library's refusal (astropy's NotImplementedError, torch's RuntimeError): its repr
        return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)) or (
        isinstance(value, memoryview) and value.format == "B" and value.c_contiguous
    ):  # before tolist(): a memoryview of bytes gives a list of ints (of other items, their values: kept)
        return {"base64": base64.b64encode(value).decode("ascii")}
    if type(plain := _listed(value)) is not type(value):
        return plain
    if isinstance(value, (set, frozenset)):
        try:  # sorted where its elements sort: a set of strings is written in the same order in every process
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    isoformat = getattr(value, "isoformat", None)  # datetime's types, obspy's UTCDateTime, ...
    if callable(isoformat):
        return isoformat()
    _warn_repr(f"{type(value).__module__}.{type(value).__qualname__}")
    return repr(value)


_encode = json.JSONEncoder(default=_jsonable).encode
"""``json.dumps(value, default=_jsonable)``, with one encoder for every record: ``json.dumps`` makes one a call."""


_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("aiod4p_results_quiet", default=False)
"""Set while :func:`data_digest` encodes: no result is written then, so none is said to be written as its repr."""


def _warn_repr(kind: str) -> None:
    if not _quiet.get():
        _warn_repr_once(kind)


@functools.cache
def _warn_repr_once(kind: str) -> None:
    logger.warning("results of type %s are written as their repr (JSON has no type for them)", kind)


class ResultSink(Protocol):
    """Where a worker delivers results, in batches."""

    async def emit(self, pe: str, port: str, items: list[Any]) -> None: ...


class Results(Sequence[ResultRecord]):
    """The results of a run, in the order they were collected."""

    def __init__(self, records: list[ResultRecord] | None = None) -> None:
        self.records: list[ResultRecord] = records if records is not None else []

    @overload
    def __getitem__(self, index: int) -> ResultRecord: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ResultRecord]: ...
    def __getitem__(self, index: int | slice) -> ResultRecord | Sequence[ResultRecord]:
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ResultRecord]:
        return iter(self.records)

    def by_port(self) -> dict[tuple[str, str], list[Any]]:
        """The data of every ``(pe, port)``, in order."""
        grouped: dict[tuple[str, str], list[Any]] = {}
        for record in self.records:
            grouped.setdefault((record.pe, record.port), []).append(record.data)
        return grouped

    def data(self, pe: str | None = None, port: str | None = None) -> list[Any]:
        """The data of every record, optionally only of PE ``pe`` and/or ``port``."""
        return [r.data for r in self.records if (pe is None or r.pe == pe) and (port is None or r.port == port)]

    def __repr__(self) -> str:
        return f"Results({len(self.records)} records)"


class QueueSink:
    """Hands result batches to a consumer through a queue bounded by batches and by bytes.

    The workflow waits when the consumer falls ``max_batches`` batches, or ``max_bytes`` bytes of results
    (:func:`~aiod4p._sizes.approximate_batch_size`), behind; a batch larger than ``max_bytes`` (an item larger
    than it) waits until the queue is empty. The consumer takes ``(records, nbytes)`` entries from
    :attr:`queue` and hands each to :meth:`taken`.
    """

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self.queue: asyncio.Queue[tuple[list[ResultRecord], int]] = asyncio.Queue(max_batches)
        self.max_bytes = max_bytes
        self.queued_bytes = 0  # of the batches queued, or waiting for a place in the queue
        self._room = asyncio.Event()

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        nbytes = approximate_batch_size(items)
        while self.queued_bytes and self.queued_bytes + nbytes > self.max_bytes:
            self._room.clear()
            await self._room.wait()
        self.queued_bytes += nbytes
        await self.queue.put(([ResultRecord(pe, port, item) for item in items], nbytes))

    def taken(self, entry: tuple[list[ResultRecord], int]) -> list[ResultRecord]:
        """The records of ``entry``, taken from :attr:`queue`: its bytes make room."""
        records, nbytes = entry
        self.queued_bytes -= nbytes
        self._room.set()
        return records
