"""Live sources: PEs and feeds that read unbounded streams.

Two forms of every source:

* a **stream** (an async iterable with a ``drain()`` method) that can be
  given as the feed of a root PE: ``start(graph, {"parse": LineStream()})``;
* a **source PE** (:class:`SourcePE`, a :class:`ProducerPE` whose
  ``produce()`` is an async generator) that is a node of the graph, usable
  from Python and from ``aiod4p run`` like any other PE.

Back-pressure: a stream is only read when the workflow asks for the next
item, so a source stops reading when the workflow is behind (a TCP peer's
send then blocks on a full socket buffer; a pipe writer blocks on a full
pipe). UDP cannot push back: datagrams that arrive while ``max_pending``
are already waiting are dropped, counted in ``dropped`` and reported in a
warning.

Drain (SIGINT/SIGTERM in the CLI, :meth:`WorkflowRun.drain` in Python): a
stream stops waiting for more input. It still yields what it can read
without waiting (what is already in a pipe, a TCP connection's receive
buffer or a followed file), then ends; so every line written to a pipe
before the signal, and every line TCP acknowledged to its sender, reaches
the workflow. A regular file that is not followed stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import socket
import stat
import sys
import termios
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ._pe import ProducerPE
from ._sizes import approximate_size
from .errors import Aiod4pError, InputError

__all__ = [
    "AsyncIterSource",
    "DatagramStream",
    "FileGeneration",
    "LineStream",
    "LinesSource",
    "LiveFeed",
    "SocketStream",
    "SourcePE",
    "TCPSource",
    "TimerSource",
    "TimerStream",
    "UDPSource",
    "iterate",
    "bad_line",
    "DEAD_LETTER",
    "DEFAULT_LINE_POLICY",
    "LINE_POLICIES",
    "MAX_GENERATIONS",
    "MAX_LINE_BYTES",
    "MAX_PENDING_BYTES",
]

logger = logging.getLogger(__name__)


class _Waker:
    """The one future a stream waits on; ``drain`` resolves it early."""

    def __init__(self) -> None:
        self.draining = False
        self._future: asyncio.Future[None] | None = None

    def drain(self) -> None:
        self.draining = True
        self.wake()

    def wake(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(
        self, arrange: Callable[[], Callable[[], object]] | None = None, *, drained_too: bool = False
    ) -> None:
        """Wait until woken or drained (at once if draining, unless ``drained_too``: then until woken, for a
        stream whose drain still has to receive); ``arrange()`` may set up a wake-up and return its undo."""
        if self.draining and not drained_too:
            return
        future = asyncio.get_running_loop().create_future()
        self._future = future
        undo = arrange() if arrange is not None else None
        try:
            await future
        finally:
            self._future = None
            if undo is not None:
                undo()


MAX_LINE_BYTES = 64 * 1024 * 1024
"""The default longest line a line source accepts (64 MiB, newline excluded).

Large enough for any sane JSON record (a line is one record), small enough
that one runaway line (a binary file, a missing newline) cannot take the
machine's memory: a line is held whole while it is read and decoded, and a
decoded JSON object takes several times its size.
"""

MAX_PENDING_BYTES = 16 * 1024 * 1024
"""The default bytes of items a live source holds for the workflow (16 MiB; a socket's as received, a
:class:`LiveFeed`'s as guessed from the items): beyond them a TCP source stops reading (its senders are
held back), a UDP source drops datagrams and ``LiveFeed.send`` waits, as they do beyond their count of
items. Heavy items reach the bound long before the count does."""

LINE_POLICIES = ("fail", "skip", "dead-letter")
DEFAULT_LINE_POLICY = "fail"
"""What a line source does with a bad line (longer than its maximum, or not
valid JSON / UTF-8 when it parses JSON): ``fail`` (the default) ends the run
with an :class:`InputError` naming the source and line number; ``skip`` logs
a warning, counts the line in ``skipped`` and goes on; ``dead-letter`` hands a
:func:`bad_line` record to the dead-letter output (a source PE's
``dead_letter`` port; the ``dead_letter`` callback of a stream) and goes on."""

_POLL_INTERVAL = 0.05  # seconds between two looks at a followed file that has nothing new
_MAX_PENDING_LINES = 1024  # lines a TCP source holds for the workflow before it stops reading
_MAX_PENDING_DATAGRAMS = 65536  # datagrams a UDP source holds for the workflow before it drops them
_SOCKET_MODES = ("server", "client")

DEAD_LETTER = "dead_letter"
"""The output port of a source PE that gets its bad lines under ``on_bad="dead-letter"``."""

_SAMPLE_BYTES = 1024  # of an over-long line kept in its dead letter
_WARNED_BAD_LINES = 10  # bad lines of a stream skipped with a warning each; the others are only counted


def bad_line(source: str, line: int, error: str, text: str, size: int) -> dict[str, Any]:
    """The dead letter of a bad line: a JSON-ready dict.

    ``text`` is the line decoded as UTF-8 with replacement characters (the
    first 1 KiB only of an over-long line); ``size`` its length in bytes.
    """
    return {"source": source, "line": line, "error": error, "text": text, "size": size}


def _json_item(line: bytes) -> Any:
    """The item of the JSON line ``line``: UTF-8, a byte-order mark before it ignored (as RFC 8259 allows).

    Raises:
        ValueError: the line is bad; the message says why: ``not UTF-8 (...)`` or ``not valid JSON (...)``.
    """
    try:
        text = line.decode("utf-8")  # json.loads(bytes) would take UTF-16 and UTF-32 too
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        try:
            return json.loads(text)
        except ValueError:
            if not text.startswith("\ufeff"):  # looked for once the line failed: a valid line pays nothing for it
                raise
            return json.loads(text[1:])
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


class _TooLong:
    """A line longer than the maximum: only its size and first bytes are kept."""

    __slots__ = ("head", "size")

    def __init__(self, head: bytes, size: int) -> None:
        self.head, self.size = head, size


class _LineSplitter:
    """Splits a byte stream into lines (without their newline), in time linear in the bytes.

    A line longer than ``max_line`` bytes is not held: it comes out as a
    :class:`_TooLong` once its end (or the end of the stream) is reached.
    """

    __slots__ = ("_chunks", "_head", "_max", "_size")

    def __init__(self, max_line: int) -> None:
        self._chunks: list[bytes] = []  # the partial line; joined once, when its newline comes
        self._size = 0  # of the partial line, also while an over-long one is being skipped
        self._head = b""  # the first bytes of an over-long line
        self._max = max_line

    def feed(self, data: bytes) -> list[bytes | _TooLong]:
        lines: list[bytes | _TooLong] = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._add(data[start:end])
            lines.append(self._take())
            start = end + 1
        if start < len(data):
            self._add(data[start:] if start else data)
        return lines

    def finish(self) -> list[bytes | _TooLong]:
        return [self._take()] if self._size else []

    @property
    def partial(self) -> bool:
        """Whether a line has begun and not ended."""
        return self._size > 0

    @property
    def size(self) -> int:
        """The bytes of the line begun and not ended."""
        return self._size

    def _add(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size <= self._max:
            self._chunks.append(piece)
        elif self._chunks or not self._head:  # just went over: keep the head (not a copy of the line), drop the rest
            head = b""
            for chunk in (*self._chunks, piece):
                head += chunk[: _SAMPLE_BYTES - len(head)]
                if len(head) == _SAMPLE_BYTES:
                    break
            self._head = head
            self._chunks.clear()

    def _take(self) -> bytes | _TooLong:
        line: bytes | _TooLong
        if self._size > self._max:
            line = _TooLong(self._head, self._size)
        else:
            line = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size, self._head = 0, b""
        return line


class _LineReader:
    """Numbers, decodes and polices the lines of one source (a file, a pipe, one TCP connection)."""

    def __init__(
        self,
        origin: str,
        as_json: bool,
        max_line: int,
        on_bad: str,
        dead_letter: Callable[[dict[str, Any]], object] | None,
        counter: _Counter,
    ) -> None:
        self.origin, self.json, self.max_line = origin, as_json, max_line
        self.on_bad, self.dead_letter, self.counter = on_bad, dead_letter, counter
        self.splitter = _LineSplitter(max_line)
        self.number = 0
        self.skip = 0  # items to read again and drop (a restored checkpoint's offset); bad lines among them are silent

    @property
    def partial(self) -> bool:
        """Whether a line has begun and not ended."""
        return self.splitter.partial

    def feed(self, data: bytes) -> list[Any]:
        return self._items(self.splitter.feed(data))

    def finish(self) -> list[Any]:
        return self._items(self.splitter.finish())

    def cut(self, why: str) -> list[Any]:
        """The items of the line begun and not ended when the source ended: a line, as a file's last one, unless
        JSON is read and it is not valid JSON: then it is a record cut off (``why``), a bad line (``on_bad``)."""
        items: list[Any] = []
        for line in self.splitter.finish():
            if self.json and not self.skip and isinstance(line, bytes) and line.strip() and not self._valid(line):
                self.number += 1
                self._bad(f"{why} ({len(line)} bytes without a newline)", line, len(line))
            else:
                items.extend(self._items([line]))
        return items

    def _items(self, lines: list[bytes | _TooLong]) -> list[Any]:
        items = []
        for line in lines:
            self.number += 1
            if self.skip:
                if not isinstance(line, _TooLong) and (not self.json or self._valid(line)):
                    self.skip -= 1
                continue
            if isinstance(line, _TooLong):
                limit = f"{self.max_line} bytes ({line.size} bytes; --max-line, or max_line=, raises the limit)"
                self._bad(f"longer than {limit}", line.head, line.size)
            elif not self.json:
                items.append(line.decode("utf-8", "replace").rstrip("\r"))
            elif line.strip():
                try:
                    items.append(_json_item(line))
                except ValueError as exc:
                    self._bad(str(exc), line, len(line))
        return items

    @staticmethod
    def _valid(line: bytes) -> bool:
        """Whether a JSON line decodes to an item (read again to skip it)."""
        if not line.strip():
            return False
        try:
            _json_item(line)
        except ValueError:
            return False
        return True

    def _bad(self, error: str, text: bytes, size: int) -> None:
        where = f"{self.origin}, line {self.number}"
        if self.on_bad == "fail":
            raise InputError(f"{where}: {error}: {text[:80]!r}")
        self.counter.skipped += 1
        if self.on_bad == "skip" or self.dead_letter is None:
            if self.counter.skipped <= _WARNED_BAD_LINES:  # a binary file must not flood stderr: a line each
                last = self.counter.skipped == _WARNED_BAD_LINES
                logger.warning(
                    "%s: %s; line skipped (on_bad=%r)%s",
                    where,
                    error,
                    self.on_bad,
                    "; further bad lines are skipped without a warning, and counted" if last else "",
                )
            return
        self.dead_letter(bad_line(self.origin, self.number, error, text.decode("utf-8", "replace"), size))


class _Counter:
    """The bad lines a stream skipped or dead-lettered, over all its connections."""

    __slots__ = ("skipped",)

    def __init__(self) -> None:
        self.skipped = 0


def _check_int(value: object, option: str, what: str, least: int = 1, *, most: int | None = None) -> None:
    """Refuse ``value`` of option ``option`` of ``what`` (a class name) unless it is an int from ``least`` to
    ``most``: a ``TypeError`` for another type (``bool`` included), a ``ValueError`` out of range."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what}: {option} must be an int, not {value!r}")
    if value < least or (most is not None and value > most):
        span = f"at least {least}" if most is None else f"{least} to {most}"
        raise ValueError(f"{what}: {option} must be {span}, not {value}")


def _check_limit(value: int | None, option: str, what: str) -> None:
    """``None`` (no limit), or an int of at least 1."""
    if value is not None:
        _check_int(value, f"{option} (None for no limit)", what)


def _check_line_options(max_line: int, on_bad: str, what: str) -> None:
    _check_int(max_line, "max_line (bytes)", what)
    if on_bad not in LINE_POLICIES:
        raise ValueError(f"{what}: on_bad must be one of {', '.join(LINE_POLICIES)}, not {on_bad!r}")


def _check_socket_options(port: int, max_pending: int, max_pending_bytes: int, what: str) -> None:
    _check_int(port, "port", what, 0, most=65535)
    _check_int(max_pending, "max_pending", what)
    _check_int(max_pending_bytes, "max_pending_bytes", what)


def _check_mode(mode: str, what: str) -> None:
    if mode not in _SOCKET_MODES:
        raise ValueError(f"{what} mode must be 'server' or 'client', not {mode!r}")


def _check_seconds(seconds: object, option: str, what: str) -> None:
    """A positive, finite number of seconds (not NaN, not infinite)."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        raise TypeError(f"{what}: {option} must be a number of seconds, not {seconds!r}")
    if not 0 < seconds < math.inf:
        raise ValueError(f"{what}: {option} must be positive and finite (seconds), not {seconds}")


# -- lines from stdin, a pipe or a file -------------------------------------------

_HEAD_BYTES = 256  # of a followed file's content, kept to tell it from the file truncated and written again
MAX_GENERATIONS = 1024
"""The file generations a followed path keeps (:attr:`LineStream.generations`): the newest. A restore needs the one
its checkpoint's line lies in, and that line is one the run had delivered, at most a few batches (of 256 items by
default, each generation at least one of them) behind what the stream read; without a bound, a file truncated once a
second (rewritten in place) added a generation a second to memory and to every checkpoint, for as long as it ran."""


@dataclass
class FileGeneration:
    """One file a followed path held: from its creation, or its truncation, to its rotation or truncation.

    ``first`` is the number of items the stream had yielded before it (the
    offset protocol's count), ``head`` its first bytes once read (up to 256):
    a restore finds the item of its offset in the generation it lies in, and
    goes on in the file at the path only if that is the same generation (the
    same device and inode, and those first bytes).
    """

    dev: int
    ino: int
    first: int
    head: bytes = b""

    @classmethod
    def of(cls, fd: int, first: int) -> FileGeneration:
        opened = os.fstat(fd)
        return cls(opened.st_dev, opened.st_ino, first)

    def holds(self, fd: int) -> bool:
        """Whether ``fd`` is this generation's file, as far as can be known (a copy truncated and written again
        with the same first bytes cannot be told apart)."""
        opened = os.fstat(fd)
        return (opened.st_dev, opened.st_ino) == (self.dev, self.ino) and os.pread(fd, len(self.head), 0) == self.head


class LineStream:
    """Lines (or JSON Lines) from stdin, a file descriptor or a file, as an async iterable.

    Args:
        source: ``None`` for stdin, a file descriptor, or a path.
        json: parse each non-empty line as JSON (else yield the line as ``str``).
        follow: for a regular file, keep reading as it grows (``tail -f``),
            polling every ``poll_interval`` seconds; restart from the top if
            the file is truncated (its size fell below what was read: as
            logrotate's ``copytruncate`` does), and go on with the new file
            once the path names another one (rotated away, as logrotate's
            ``create`` does: ``tail -F``), from its top, after the end of the
            old one. The unterminated last line of a file rotated away or
            truncated is a line of its own, never joined to the next file's first.
        from_end: with ``follow``, start at the current end of the file.
        generations: with ``follow``, where the stream records the files the
            path held (:class:`FileGeneration`), so that a :meth:`seek` after a
            truncation or a rotation finds its line in the right one; a
            source PE keeps it in its checkpointed state. By default the
            stream's own (kept over its iterations in one process).
        max_line: the longest line accepted, in bytes (default
            :data:`MAX_LINE_BYTES`, 64 MiB); a longer one is a bad line and
            is never held in memory whole.
        on_bad: what to do with a bad line (over-long, or not valid JSON):
            ``"fail"``, ``"skip"`` or ``"dead-letter"`` (see :data:`LINE_POLICIES`).
        dead_letter: with ``on_bad="dead-letter"``, called with the
            :func:`bad_line` record of every bad line.

    Pipes, terminals and sockets are read without blocking the event loop;
    a regular file is read directly. Reading is linear in the bytes read,
    whatever the line lengths. Iterate it once. ``skipped`` counts the bad
    lines skipped or dead-lettered.

    Raises (while iterating):
        InputError: the file cannot be opened or read, or a line is bad
            under ``on_bad="fail"`` (the message names the source and line).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | int | None = None,
        *,
        json: bool = False,
        follow: bool = False,
        from_end: bool = False,
        poll_interval: float = _POLL_INTERVAL,
        chunk_size: int = 65536,
        max_line: int = MAX_LINE_BYTES,
        on_bad: str = DEFAULT_LINE_POLICY,
        dead_letter: Callable[[dict[str, Any]], object] | None = None,
        generations: list[FileGeneration] | None = None,
    ) -> None:
        _check_line_options(max_line, on_bad, "LineStream")
        _check_seconds(poll_interval, "poll_interval", "LineStream")
        _check_int(chunk_size, "chunk_size", "LineStream")
        self.source = source
        self.generations: list[FileGeneration] = [] if generations is None else generations
        self.json = json
        self.follow = follow
        self.from_end = from_end
        self.poll_interval = poll_interval
        self.chunk_size = chunk_size
        self.max_line, self.on_bad, self.dead_letter = max_line, on_bad, dead_letter
        self._counter = _Counter()
        self._waker = _Waker()
        self._skip = 0
        self._origin: int | None = None  # where stdin or a descriptor that is a regular file was first read
        self.bytes_read = 0
        """The bytes read since the current iteration began (the engine's read-ahead counts the lines by them)."""

    def seek(self, offset: int) -> None:
        """The offset protocol (checkpoints): start with line ``offset`` (counted as yielded); call before iterating.

        A followed path whose file was truncated or rotated since that line was read holds other lines: the
        stream then reads the new file from its top (the lines the old one got after ``offset`` are lost, not
        replaced by the new one's). It tells by :attr:`generations`; without them, it drops ``offset`` lines of
        the file at the path.
        """
        self._skip = offset

    @property
    def replayable(self) -> bool:
        """A file can be read again from a line offset, also as stdin or a file descriptor (``< data.jsonl``:
        each reading starts where the first one did); a pipe, a terminal or a socket cannot, nor a file followed
        from its end (``tail -f``: it starts wherever the end is then)."""
        if self.follow and self.from_end:
            return False
        if self.source is not None and not isinstance(self.source, int):
            return True
        try:
            fd = sys.stdin.fileno() if self.source is None else self.source
            return stat.S_ISREG(os.fstat(fd).st_mode)
        except (OSError, ValueError, AttributeError):  # a closed or replaced stdin
            return False

    @property
    def skipped(self) -> int:
        """Bad lines skipped or dead-lettered so far."""
        return self._counter.skipped

    @property
    def origin(self) -> str:
        if self.source is None:
            return "stdin"
        if isinstance(self.source, int):
            return f"file descriptor {self.source}"
        return f"file {os.fspath(self.source)}"

    def drain(self) -> None:
        """Stop waiting for input: yield what can be read at once, then end."""
        self._waker.drain()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._lines()

    def _open(self) -> tuple[int, bool]:
        if self.source is None:
            return sys.stdin.fileno(), False
        if isinstance(self.source, int):
            return self.source, False
        try:
            return os.open(self.source, os.O_RDONLY), True
        except OSError as exc:
            raise InputError(f"cannot open {self.origin}: {exc.strerror or exc}") from exc

    def _replaced(self, fd: int) -> bool:
        """Whether the path read names another file than ``fd`` now (it was rotated, and a new one made)."""
        assert self.source is not None and not isinstance(self.source, int)
        try:
            named = os.stat(self.source)
        except OSError:  # renamed away, the new file not made yet: the old one may still grow
            return False
        opened = os.fstat(fd)
        return (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino)

    def _resume(self, fd: int, offset: int) -> int:
        """The items of followed file ``fd`` to drop, for a stream that starts with item ``offset``.

        The generation item ``offset`` lies in is the last to begin at or before it: if ``fd`` is still that
        file, its items before ``offset`` are dropped; if not (truncated or rotated since), all of ``fd`` is new,
        and none is. :attr:`generations` is cut back to that generation, ``fd``'s added when it is another.
        """
        known = [generation for generation in self.generations if generation.first <= offset]
        if not self.generations:  # nothing recorded: the file at the path is the one the offset counts in
            self.generations[:] = [FileGeneration.of(fd, 0)]
            return offset
        self.generations[:] = known
        if known and known[-1].holds(fd):
            return offset - known[-1].first
        # Not that file any more (or its generation was among the oldest, dropped: replaced since, then, too).
        logger.warning(
            "%s was truncated or rotated since its item %d was read: the new file is read from its top (lines the"
            " old one got after that item, if any, are not read)",
            self.origin,
            offset,
        )
        self._begin_generation(fd, offset)
        return 0

    def _begin_generation(self, fd: int, first: int) -> None:
        """Record file ``fd`` as the path's generation from item ``first`` on, dropping those no restore can need:
        one that yielded nothing (a later one begins at the same item, and a restore takes the last to begin at or
        before its line), and all but the newest :data:`MAX_GENERATIONS`."""
        generations = self.generations
        while generations and generations[-1].first >= first:
            generations.pop()
        generations.append(FileGeneration.of(fd, first))
        del generations[:-MAX_GENERATIONS]

    async def _lines(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        fd, owned = self._open()
        reader = _LineReader(self.origin, self.json, self.max_line, self.on_bad, self.dead_letter, self._counter)
        reader.skip, self._skip, waker = self._skip, 0, self._waker  # a seek holds for one iteration
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        followed = regular and owned and self.follow and not self.from_end
        if followed:
            reader.skip = self._resume(fd, reader.skip)
        top = self.generations[-1].first if followed else 0  # the items before the current file
        counted = reader.skip  # the items of the current file counted before (the skip) or yielded since
        if regular and not owned:  # stdin or a descriptor: a reading again (a restart) starts as a path's does
            if self._origin is None:
                self._origin = os.lseek(fd, 0, os.SEEK_CUR)
            else:
                os.lseek(fd, self._origin, os.SEEK_SET)
        blocking = os.get_blocking(fd)
        if not regular:
            os.set_blocking(fd, False)
        elif self.follow and self.from_end:
            os.lseek(fd, 0, os.SEEK_END)

        def when_readable() -> Callable[[], object]:
            loop.add_reader(fd, waker.wake)
            return lambda: loop.remove_reader(fd)

        def after_poll() -> Callable[[], object]:
            return loop.call_later(self.poll_interval, waker.wake).cancel

        left: int | None = None  # once draining: the bytes there were to read when the drain came
        self.bytes_read = 0
        switch: str | None = None  # the path's file was "truncated" or "rotated" away
        try:
            while True:
                if followed and switch is None and not self.generations[-1].holds(fd):
                    switch = "truncated"  # and written past where it was read: its first bytes are others
                if switch is not None:
                    for item in reader.finish():  # its unterminated last line: a line of its own
                        counted += 1
                        yield item
                    if switch == "truncated":
                        os.lseek(fd, 0, os.SEEK_SET)
                    else:
                        old, fd = fd, self._open()[0]
                        os.close(old)
                    if followed:
                        top += counted - reader.skip
                        self._begin_generation(fd, top)
                    counted = reader.skip = 0  # every line of the new file is new
                    switch = None
                    continue
                if waker.draining and left is None:
                    # a file not followed: the line under way (its rest is there), no more
                    left = 0 if regular and not self.follow else _readable_now(fd, regular)
                if left is not None and left <= 0 and not reader.partial:
                    break  # not until the pipe is empty: a writer faster than the run would never let it end
                try:
                    data = os.read(fd, self.chunk_size if left is None or left <= 0 else min(self.chunk_size, left))
                except BlockingIOError:  # nothing in the pipe now
                    if waker.draining:
                        break
                    await waker.wait(when_readable)
                    continue
                except OSError as exc:
                    raise InputError(f"cannot read {self.origin}: {exc.strerror or exc}") from exc
                if not data:
                    if regular and self.follow and waker.draining and reader.partial:
                        # Its writer was writing that line when the drain came: not a record (a followed file's
                        # end is no line's end), discarded as a TCP connection's is.
                        logger.warning(
                            "%s: the drain came in the middle of a line, %d bytes without a newline yet at the"
                            " file's end: discarded",
                            reader.origin,
                            reader.splitter.size,
                        )
                        return
                    if not (regular and self.follow) or waker.draining:
                        break
                    if os.fstat(fd).st_size < os.lseek(fd, 0, os.SEEK_CUR):
                        switch = "truncated"
                    elif owned and self._replaced(fd):  # the old one was read to its end just now
                        switch = "rotated"
                    else:
                        await waker.wait(after_poll)
                    continue
                if left is not None:
                    if left <= 0 and (end := data.find(b"\n")) >= 0:
                        data = data[: end + 1]  # the rest of the line under way when the drain came, no more
                    left -= len(data)
                self.bytes_read += len(data)
                if followed and len(self.generations[-1].head) < _HEAD_BYTES:
                    self.generations[-1].head = os.pread(fd, _HEAD_BYTES, 0)
                for item in reader.feed(data):
                    counted += 1
                    yield item
            for item in reader.finish():
                yield item
        finally:
            if not regular:
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, blocking)
            if owned:
                os.close(fd)


def _readable_now(fd: int, regular: bool) -> int | None:
    """The bytes ``fd`` holds now: a regular file's after the current offset, or what a pipe, socket or
    terminal has buffered (``FIONREAD``); ``None`` if it cannot tell (read until it would block)."""
    if regular:
        return max(os.fstat(fd).st_size - os.lseek(fd, 0, os.SEEK_CUR), 0)
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder, signed=True)
    except OSError:
        return None


# -- sockets --------------------------------------------------------------------------


class _Pending:
    """Decoded items from sockets, waiting for the workflow; full at ``high`` items or ``high_bytes`` bytes
    (as received), when it pauses the readers, which it resumes at half of both."""

    def __init__(self, waker: _Waker, high: int, high_bytes: int) -> None:
        self.items: deque[Any] = deque()
        self.waker = waker
        self.high, self.high_bytes = high, high_bytes
        # The bytes of the pushes not all taken yet, each push counted whole until its last item is taken
        # (a push is one read: at most a socket buffer). Settled when needed, not on every take.
        self._bytes = 0
        self._pushes: deque[tuple[int, int]] = deque()  # (the items taken once it is all taken, its bytes)
        self._pushed = self._taken = 0
        self.paused: set[asyncio.Transport] = set()
        self.error: BaseException | None = None

    @property
    def full(self) -> bool:
        return len(self.items) >= self.high or self._settled_bytes() >= self.high_bytes

    def _settled_bytes(self) -> int:
        pushes, taken = self._pushes, self._taken
        while pushes and pushes[0][0] <= taken:
            self._bytes -= pushes.popleft()[1]
        return self._bytes

    def push(self, items: list[Any], transport: asyncio.Transport | None, size: int) -> None:
        """Queue ``items``, read from ``size`` bytes; pause ``transport`` (if given) when the queue is full."""
        if not items:
            return
        self.items.extend(items)
        self._pushed += len(items)
        self._pushes.append((self._pushed, size))
        self._bytes += size
        self.waker.wake()
        if transport is not None and transport not in self.paused and not transport.is_closing() and self.full:
            transport.pause_reading()
            self.paused.add(transport)

    def take(self) -> Any:
        item = self.items.popleft()
        self._taken += 1
        if self.paused and len(self.items) <= self.high // 2 and self._settled_bytes() <= self.high_bytes // 2:
            for transport in self.paused:
                if not transport.is_closing():
                    transport.resume_reading()
            self.paused.clear()
        return item

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.waker.wake()


def _endpoint(address: Any) -> str:
    """``host:port`` of a socket address (``[host]:port`` for IPv6)."""
    if not isinstance(address, tuple) or len(address) < 2:
        return str(address)
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _LineProtocol(asyncio.Protocol):
    """One TCP connection of a :class:`SocketStream`; its lines' origin names the peer (and, for a server's
    client, the address it connected to)."""

    reader: _LineReader  # once connected

    def __init__(self, stream: SocketStream, pending: _Pending) -> None:
        self.stream = stream
        self.pending = pending
        self.transport: asyncio.Transport | None = None
        self.unqueued = 0  # bytes received whose lines are not queued yet (a line begun)
        self.received = 0  # bytes received on the connection
        self.last: int | None = None  # once draining: the bytes to receive before closing (what the kernel held)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        stream, peer = self.stream, _endpoint(transport.get_extra_info("peername"))
        if stream.mode == "server":
            origin = f"TCP client {peer} of {_endpoint(transport.get_extra_info('sockname'))}"
        else:
            origin = f"TCP {peer}"
        self.reader = _LineReader(
            origin, stream.json, stream.max_line, stream.on_bad, stream.dead_letter, stream._counter
        )
        stream._connected(self)

    def _push(self, read: Callable[[], list[Any]]) -> None:
        try:
            items = read()
        except InputError as exc:
            self.pending.fail(exc)
            return
        if items:
            self.pending.push(items, self.transport, self.unqueued)
            self.unqueued = 0

    def drain(self) -> None:
        """Receive what the kernel holds for the connection now (``FIONREAD``), then close it."""
        assert self.transport is not None
        if self.transport.is_closing():  # the peer closed it, and it is being closed: all was received
            return
        sock = self.transport.get_extra_info("socket")
        held = None if sock is None else _readable_now(sock.fileno(), False)
        if held is None:
            logger.warning("%s: the drain cannot tell what the connection holds: closed at once", self.reader.origin)
            held = 0
        self.last = self.received + held
        if held <= 0:
            self.close()

    def close(self) -> None:
        """Close the connection after a drain: a line begun and not ended is not a record, and is discarded."""
        assert self.transport is not None
        if self.transport.is_closing():
            return
        if self.reader.partial:
            logger.warning(
                "%s: the drain closed the connection in the middle of a line: its %d bytes received are discarded",
                self.reader.origin,
                self.reader.splitter.size,
            )
        self.transport.close()
        self.stream._disconnected(self)

    def data_received(self, data: bytes) -> None:
        self.unqueued += len(data)
        self.received += len(data)
        self._push(lambda: self.reader.feed(data))
        if self.last is not None and self.received >= self.last:
            self.close()

    def eof_received(self) -> bool:
        """The peer closed: a JSON line it began and did not end is a bad line (a client that died mid-line)."""
        self._push(lambda: self.reader.cut("the connection ended mid-line"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is closed. Lost (``exc``: the peer reset it, or it failed) rather than ended by the peer
        or closed by the stream, a line it began and did not end is its last line, as at an end of stream (a JSON
        line that is not valid JSON a bad line: a client that died mid-line)."""
        if exc is not None:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            self._push(lambda: self.reader.cut(f"the connection was lost mid-line: {reason}"))
        if self.transport is not None:
            self.pending.paused.discard(self.transport)
        self.stream._disconnected(self)


class SocketStream:
    """Lines (or JSON Lines) from TCP connections, as an async iterable.

    ``mode="server"`` listens on ``host:port`` and merges the lines of every
    client (``port=0`` picks a free port; ``on_listen(address)`` is called once
    listening); with ``connections=N`` it accepts N clients and ends when they
    have all closed, else it runs until drained. ``mode="client"`` connects to
    ``host:port`` and ends when the peer closes. Read again (a run restarted
    after a dead worker: the restart closed the connections), it listens or
    connects anew, and accepts N clients anew.

    Back-pressure: when ``max_pending`` items, or items read from
    ``max_pending_bytes`` bytes, wait for the workflow, the stream stops
    reading its sockets until half of both are left, so TCP flow control
    slows the senders down.

    Bad lines (``max_line``, ``on_bad``, ``dead_letter``, ``skipped``): as
    :class:`LineStream`; each connection numbers its own lines, and the
    messages name the peer. As in a file, a connection's last line needs no
    newline, whether the client closed the connection or reset it; but with
    ``json``, a last line that is not valid JSON is a record cut off (a
    client that died while sending): a bad line, ``the connection ended
    mid-line`` (``the connection was lost mid-line: Connection reset by
    peer`` after a reset), which ``on_bad`` handles.

    Raises (while iterating):
        InputError: cannot listen or connect, or a line is bad under ``on_bad="fail"``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        mode: str = "server",
        json: bool = False,
        connections: int | None = None,
        on_listen: Callable[[tuple[str, int]], Any] | None = None,
        max_pending: int = _MAX_PENDING_LINES,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        max_line: int = MAX_LINE_BYTES,
        on_bad: str = DEFAULT_LINE_POLICY,
        dead_letter: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        _check_mode(mode, "SocketStream")
        _check_line_options(max_line, on_bad, "SocketStream")
        _check_socket_options(port, max_pending, max_pending_bytes, "SocketStream")
        _check_limit(connections, "connections", "SocketStream")
        self.max_line, self.on_bad, self.dead_letter = max_line, on_bad, dead_letter
        self._counter = _Counter()
        self.host, self.port, self.mode, self.json = host, port, mode, json
        self.connections = connections
        self.on_listen = on_listen
        self.max_pending, self.max_pending_bytes = max_pending, max_pending_bytes
        self.address: tuple[str, int] | None = None
        self._waker = _Waker()
        self._open: set[_LineProtocol] = set()
        self._accepted = 0
        self._server: asyncio.Server | None = None
        self._pending = _Pending(self._waker, max_pending, max_pending_bytes)

    @property
    def skipped(self) -> int:
        """Bad lines skipped or dead-lettered so far."""
        return self._counter.skipped

    @property
    def pending(self) -> int:
        """Items read from the sockets and not yet taken by the workflow."""
        return len(self._pending.items)

    @property
    def paused(self) -> bool:
        """Whether reading is paused because the workflow is behind."""
        return bool(self._pending.paused)

    def drain(self) -> None:
        """Stop accepting; yield what the connections hold now, then end.

        The listening socket is closed (new connections are refused). Each open connection is still read up to
        what its kernel buffer holds when the drain comes (``FIONREAD``: bytes TCP has acknowledged to the
        peer), then closed; every line read is yielded. What a client sends after that is not read, nor
        waited for (a client that sends faster than the run would keep it from ending): closing a connection
        with unread bytes resets it, so the client can tell. A line that a connection began and had not ended
        when it was closed is not a record: it is discarded, with a warning naming the connection.
        """
        if self._waker.draining:
            return
        self._waker.drain()
        if self._server is not None:
            self._server.close()
        for protocol in list(self._open):
            protocol.drain()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._lines()

    def _connected(self, protocol: _LineProtocol) -> None:
        self._accepted += 1
        if self.connections is not None and self._accepted > self.connections:
            assert protocol.transport is not None
            protocol.transport.close()
            return
        self._open.add(protocol)
        if self.connections is not None and self._accepted >= self.connections and self._server is not None:
            self._server.close()
        if self._waker.draining:  # accepted before the drain closed the listening socket: what it holds is read
            protocol.drain()

    def _disconnected(self, protocol: _LineProtocol) -> None:
        self._open.discard(protocol)
        self._waker.wake()

    def _finished(self) -> bool:
        if self._open:
            return False
        if self.mode == "client" or self._waker.draining:
            return True
        return self.connections is not None and self._accepted >= self.connections

    async def _lines(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        pending = self._pending
        self._accepted = 0  # a reading again (a restart, which closed the clients' connections) accepts anew
        where = f"{self.host}:{self.port}"
        try:
            if self.mode == "server":
                try:
                    self._server = await loop.create_server(lambda: _LineProtocol(self, pending), self.host, self.port)
                except OSError as exc:
                    raise InputError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
                self.address = self._server.sockets[0].getsockname()[:2]
                if self._waker.draining:  # drained before listening: refuse what comes from now on
                    self._server.close()
                if self.on_listen is not None:
                    self.on_listen(self.address)
            else:
                try:
                    await loop.create_connection(lambda: _LineProtocol(self, pending), self.host, self.port)
                except OSError as exc:
                    raise InputError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
            while True:
                while pending.items:
                    yield pending.take()
                if pending.error is not None:
                    raise pending.error
                if self._finished():
                    break
                await self._waker.wait(drained_too=True)  # a drain ends when the connections have delivered
        finally:
            if self._server is not None:
                self._server.close()
            for protocol in list(self._open):
                if protocol.transport is not None:
                    protocol.transport.close()
            if self._server is not None:
                await self._server.wait_closed()


class _DatagramProtocol(asyncio.DatagramProtocol):
    """The datagrams of one reading of a :class:`DatagramStream`; bad lines are numbered within their datagram,
    which is named by its number (counting every datagram received) and its sender."""

    def __init__(self, stream: DatagramStream, pending: _Pending) -> None:
        self.stream = stream
        self.pending = pending
        self.reader = _LineReader("", stream.json, stream.max_line, stream.on_bad, stream.dead_letter, stream._counter)
        self.where = ""  # the bound address, once bound
        self.number = 0

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.pending.waker.draining:  # what comes after the drain is not received: a sender could keep it going
            return
        self.number += 1
        stream = self.stream
        if self.pending.full:
            stream.dropped += 1
            if stream.dropped == 1:
                logger.warning(
                    "UDP %s: the workflow is behind (%d items or %d bytes wait: max_pending, max_pending_bytes):"
                    " datagrams are dropped from datagram %d on; their count is logged when the stream ends",
                    self.where,
                    stream.max_pending,
                    stream.max_pending_bytes,
                    self.number,
                )
            return
        reader = self.reader
        reader.origin, reader.number = f"UDP {self.where}, datagram {self.number} from {_endpoint(addr)}", 0
        try:
            items = reader.feed(data) + reader.finish()
        except InputError as exc:
            self.pending.fail(exc)
            return
        if not stream.json:
            items = [item for item in items if item.strip()]
        self.pending.push(items, None, len(data))

    def error_received(self, exc: Exception) -> None:
        self.pending.fail(InputError(f"UDP socket {self.where} failed: {exc}"))


class DatagramStream:
    """Datagrams received on a UDP socket (each non-empty line of one is an item).

    ``on_listen(address)`` is called once bound (``port=0`` picks a free
    port). Runs until drained, or until ``count`` items have been received.
    UDP has no flow control: datagrams arriving while ``max_pending`` items,
    or items received in ``max_pending_bytes`` bytes, wait are dropped and
    counted in ``dropped``; the first drop is logged as a warning, and so is
    their count when the stream ends.

    Bad lines (``max_line``, ``on_bad``, ``dead_letter``, ``skipped``): as
    :class:`LineStream`; a bad line is named by its datagram's number
    (counting every datagram received, dropped ones too), its sender, and its
    line in the datagram (``UDP 127.0.0.1:9000, datagram 2 from
    127.0.0.1:50123, line 1: not valid JSON ...``).

    Raises (while iterating):
        InputError: cannot bind, the socket fails, or a line is bad under ``on_bad="fail"``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        json: bool = False,
        count: int | None = None,
        on_listen: Callable[[tuple[str, int]], Any] | None = None,
        max_pending: int = _MAX_PENDING_DATAGRAMS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        max_line: int = MAX_LINE_BYTES,
        on_bad: str = DEFAULT_LINE_POLICY,
        dead_letter: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        _check_line_options(max_line, on_bad, "DatagramStream")
        _check_socket_options(port, max_pending, max_pending_bytes, "DatagramStream")
        _check_limit(count, "count", "DatagramStream")
        self.host, self.port, self.json, self.count = host, port, json, count
        self.on_listen = on_listen
        self.max_pending, self.max_pending_bytes = max_pending, max_pending_bytes
        self.max_line, self.on_bad, self.dead_letter = max_line, on_bad, dead_letter
        self._counter = _Counter()
        self.dropped = 0
        self.address: tuple[str, int] | None = None
        self._waker = _Waker()

    @property
    def skipped(self) -> int:
        """Bad lines skipped or dead-lettered so far."""
        return self._counter.skipped

    def drain(self) -> None:
        """Stop receiving (datagrams that come from now on are ignored); yield what was received, then end."""
        self._waker.drain()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items()

    async def _items(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        pending = _Pending(self._waker, self.max_pending, self.max_pending_bytes)
        sock: socket.socket | None = None
        try:  # bound here, not by the loop: uvloop leaks its transport when binding fails
            family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.bind(address)
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise InputError(f"cannot bind UDP {self.host}:{self.port}: {exc.strerror or exc}") from exc
        protocol = _DatagramProtocol(self, pending)
        protocol.where = _endpoint(sock.getsockname())
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        received = 0
        try:
            self.address = transport.get_extra_info("sockname")[:2]
            if self.on_listen is not None:
                self.on_listen(self.address)
            while self.count is None or received < self.count:
                while pending.items and (self.count is None or received < self.count):
                    received += 1
                    yield pending.take()
                if pending.error is not None:
                    raise pending.error
                if self._waker.draining or received == self.count:
                    break
                await self._waker.wait()
        finally:
            transport.close()
            if self.dropped:
                logger.warning(
                    "UDP %s: %d datagram%s dropped in all, the workflow being behind (max_pending=%d,"
                    " max_pending_bytes=%d)",
                    protocol.where,
                    self.dropped,
                    "s" if self.dropped != 1 else "",
                    self.max_pending,
                    self.max_pending_bytes,
                )


# -- timer ------------------------------------------------------------------------------


class TimerStream:
    """A tick every ``interval`` seconds: ``{"tick": n, "time": unix_time}``.

    Ticks are scheduled on a fixed grid from the start; ticks missed while
    the workflow was behind are skipped, never bunched. Ends after ``count``
    ticks (``None``: never) or when drained.
    """

    def __init__(self, interval: float, *, count: int | None = None) -> None:
        _check_seconds(interval, "interval", "TimerStream")
        _check_limit(count, "count", "TimerStream")
        self.interval = interval
        self.count = count
        self._waker = _Waker()
        self._skip = 0

    def seek(self, offset: int) -> None:
        """The offset protocol (checkpoints): start with tick ``offset``, at once; call before iterating."""
        self._skip = offset

    def drain(self) -> None:
        """Stop ticking."""
        self._waker.drain()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._ticks()

    async def _ticks(self) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        waker, interval = self._waker, self.interval
        slot = emitted = self._skip
        self._skip = 0  # one run only
        start = loop.time() - slot * interval
        while self.count is None or emitted < self.count:
            yield {"tick": slot, "time": time.time()}
            emitted += 1
            slot = max(slot + 1, int((loop.time() - start) / interval) + 1)  # skip missed slots
            handle = loop.call_at(start + slot * interval, waker.wake)
            await waker.wait()
            handle.cancel()
            if waker.draining:
                break


# -- a feed that application code writes into ----------------------------------------------------


class LiveFeed:
    """A root's feed that application code writes into, with back-pressure.

    Give it as the input of a root PE, then ``await feed.send(item)`` from
    application code: ``send`` waits while ``maxsize`` items, or items of
    ``max_bytes`` bytes (as guessed: numpy arrays, bytes, strings and
    containers of them), are queued and not yet taken by the workflow; an
    item is taken into an empty feed whatever its size. :meth:`close` ends
    the stream after the queued items (draining the run closes it too).

    A feed feeds one run at a time (:meth:`claim`): a run started with a feed
    that another run, not ended, has is refused, since each run would take
    some of its items. Once that run ended, a later run may take the feed up,
    with the items left queued, unless the feed was closed and a run read it
    to its end (its stream is over).
    """

    def __init__(self, maxsize: int = 1024, max_bytes: int = MAX_PENDING_BYTES) -> None:
        _check_int(maxsize, "maxsize", "LiveFeed")
        _check_int(max_bytes, "max_bytes", "LiveFeed")
        self.maxsize, self.max_bytes = maxsize, max_bytes
        self._items: deque[tuple[Any, int]] = deque()  # with the size of each
        self._bytes = 0
        self._has_items = asyncio.Event()
        self._senders: deque[asyncio.Event] = deque()  # the senders waiting for room, in the order they came
        self.closed = False
        self.ended = False  # the run stopped taking items (until a restart of the run takes them again)
        self._readers = 0
        self._read = asyncio.Event()  # set while a run takes items
        self._run: object = None  # the run the feed feeds, until it ends
        self._fed = ""  # the PE it feeds in that run
        self._over = False  # closed, and a run read it to its end

    def claim(self, run: object, pe: str) -> None:
        """Make the feed the input of PE ``pe`` of ``run`` until :meth:`release` (more PEs of ``run`` may share it).

        Raises:
            InputError: another run has the feed and has not ended, or the feed was closed and a run read it to
                its end; the PE is named.
        """
        if self._run is not None and self._run is not run:
            raise InputError(
                f"the LiveFeed given as the input of PE {pe} is already feeding another run (its PE {self._fed}),"
                " which has not ended: a LiveFeed feeds one run at a time (each run would take some of its items);"
                " give each run a LiveFeed of its own"
            )
        if self._over:
            raise InputError(
                f"the LiveFeed given as the input of PE {pe} was closed and an earlier run read it to its end:"
                " its stream is over; give this run a new LiveFeed"
            )
        self._run, self._fed = run, pe

    def release(self, run: object) -> None:
        """``run`` ended: a later run may claim the feed."""
        if self._run is run:
            self._run = None

    def full(self) -> bool:
        return len(self._items) >= self.maxsize or self._bytes >= self.max_bytes

    def _append(self, item: Any) -> None:
        size = approximate_size(item)[0]
        self._items.append((item, size))
        self._bytes += size
        self._has_items.set()

    def _check_open(self) -> None:
        if self.closed or self.ended:
            raise Aiod4pError("cannot send to a closed feed (the feed was closed, or its run has drained or ended)")

    def send_nowait(self, item: Any) -> None:
        """Queue ``item`` without waiting.

        Raises:
            Aiod4pError: the feed is closed or its run is over.
            asyncio.QueueFull: the feed is full (``maxsize`` items, or ``max_bytes``, are waiting).
        """
        self._check_open()
        if self.full():
            raise asyncio.QueueFull
        self._append(item)

    async def send(self, item: Any) -> None:
        """Queue ``item``, waiting while the feed is full, in turn: senders that wait for room are served in the
        order they came (one sending in a loop does not shut the others out).

        Raises:
            Aiod4pError: the feed is closed or its run is over (also while waiting).
        """
        if not self.has_turn():  # no coroutine per item while there is room and nobody waits
            await self.wait_turn()
        self.send_nowait(item)

    def has_turn(self) -> bool:
        """Whether a sender may queue an item now without waiting: the feed has room and nobody waits for it."""
        return not (self._senders or self.full())

    async def wait_turn(self, unless: asyncio.Future[Any] | None = None) -> bool:
        """Wait for this sender's turn, behind the senders already waiting, with room in the feed for it: ``True``,
        and the caller queues its item (:meth:`send_nowait`) before it awaits anything. ``False`` as soon as the
        feed is closed, its run stopped taking items, or ``unless`` is done. Cancelled, it leaves the line and
        nothing is queued.

        With room for N items the first N senders in line are woken at once, and take their turns in order."""
        turn = asyncio.Event()
        self._senders.append(turn)

        def wake(_: object) -> None:
            turn.set()

        if unless is not None:
            unless.add_done_callback(wake)
        try:
            while not (self.closed or self.ended or (unless is not None and unless.done())):
                if self._senders[0] is turn and not self.full():
                    return True
                turn.clear()
                await turn.wait()
            return False
        finally:
            if unless is not None:
                unless.remove_done_callback(wake)
            self._senders.remove(turn)
            self._wake_next()

    def _wake_next(self) -> None:
        """Wake the senders in line that the feed has room for (every one once it is over: they return)."""
        if self.closed or self.ended:
            waking: Iterable[asyncio.Event] = self._senders
        elif self.full():
            return
        else:
            waking = itertools.islice(self._senders, self.maxsize - len(self._items))
        for turn in waking:
            turn.set()

    def close(self) -> None:
        """End the stream once the queued items are taken; idempotent."""
        self.closed = True
        self._has_items.set()
        self._wake_next()

    drain = close

    async def wait_read(self) -> None:
        """Wait until a run takes items from the feed: at once while one does, and after a run restarted from a
        checkpoint (``--restarts``), once the new attempt takes them again."""
        await self._read.wait()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._take()

    async def _take(self) -> AsyncIterator[Any]:
        items = self._items
        self._readers += 1
        self.ended = False
        self._read.set()
        try:
            while True:
                while not items:
                    if self.closed:
                        self._over = True
                        return
                    self._has_items.clear()
                    await self._has_items.wait()
                item, size = items.popleft()
                self._bytes -= size
                if self._senders and not self._senders[-1].is_set():  # else every sender in line is woken
                    self._wake_next()
                yield item
        finally:
            self._readers -= 1
            if not self._readers:
                self.ended = True
                self._read.clear()
            self._wake_next()


async def iterate(iterable: AsyncIterable[Any]) -> AsyncGenerator[Any, None]:
    """The items of ``iterable``, iterated inside its context when it has one.

    An aiostream pipeline (anything with a ``stream()`` method returning an
    async context manager) is iterated as ``async with pipeline.stream()``,
    as aiostream wants; another async context manager is entered first. Use
    it to give a pipeline as a feed: ``{"pe": iterate(pipeline)}``.
    """
    opener = getattr(iterable, "stream", None)
    context: Any = opener() if callable(opener) else iterable
    if hasattr(context, "__aenter__"):
        async with context as entered:
            async for item in entered:
                yield item
    else:
        async for item in iterable:
            yield item


# -- source PEs ------------------------------------------------------------------------------


class SourcePE(ProducerPE):
    """A live source PE: writes every item of :meth:`open`'s stream to ``output``.

    Subclasses implement :meth:`open`, returning a fresh async iterable (a
    stream of this module, or any async iterator). The PE keeps only its
    configuration, so it can be copied and pickled; the stream is created
    when the run starts. When the run drains, the stream's own ``drain()``
    is called (it yields what it holds, then ends); a stream without one is
    cancelled.
    """

    replayable = True
    """Whether the stream can be replayed after a checkpoint's restore (see docs/recovery.md)."""

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name, parallelism=1)
        self._stream: Any = None
        self._task: asyncio.Task[Any] | None = None
        self._draining = False
        self._seek = 0

    def seek(self, offset: int) -> None:
        """The offset protocol (checkpoints): the next :meth:`produce` starts with item ``offset``.

        The stream's own ``seek(offset)`` is used if it has one; else its first
        ``offset`` items are read and dropped.
        """
        self._seek = offset

    def open(self) -> AsyncIterable[Any]:
        """A new stream of this source's items."""
        raise NotImplementedError(f"source PE {self.label} does not implement open()")

    @property
    def bytes_read(self) -> int | None:
        """The running stream's ``bytes_read`` (a line stream's), if it tells one: the engine's read-ahead of
        the PE's items counts them by it, without measuring them."""
        read = getattr(self._stream, "bytes_read", None)
        return read if type(read) is int else None

    def drain(self) -> None:
        """Ask the running stream to finish (called by the engine when the run drains)."""
        self._draining = True
        stop = getattr(self._stream, "drain", None)
        if callable(stop):
            stop()
        elif self._task is not None:
            self._task.cancel()

    async def produce(self) -> AsyncIterator[Any]:
        self._stream = self.open()
        self._task = asyncio.current_task()
        if self._draining:
            self.drain()
        skip, self._seek = self._seek, 0
        seek = getattr(self._stream, "seek", None)
        if skip and callable(seek):
            seek(skip)
            skip = 0
        try:
            async with contextlib.aclosing(iterate(self._stream)) as items:
                async for item in items:
                    if skip:
                        skip -= 1
                        continue
                    yield item
        finally:
            runtime = self._runtime
            if runtime is not None and runtime.stats is not None:  # a line stream's bad lines, in the statistics
                runtime.stats.skipped += getattr(self._stream, "skipped", 0)
            self._stream = self._task = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_stream=None, _task=None, _draining=False, _seek=0)
        return state


class _BadLines(SourcePE):
    """A source PE of lines: ``max_line`` and ``on_bad`` as :class:`LineStream`.

    Under ``on_bad="dead-letter"`` the PE has a second output,
    ``dead_letter`` (:data:`DEAD_LETTER`), that gets the :func:`bad_line`
    record of every bad line (a result, when not connected).

    A source PE's options are its configuration, not its state: a checkpoint does not save them, and a restore
    takes them from the workflow (``on_bad="skip"`` after a bad line failed the run), with the position from the
    checkpoint. Those that say what the position counts (a :class:`LinesSource`'s path, ``json``, ``max_line``...)
    are saved instead, and a restore that changes them is refused (``checkpoint_fixed``).
    """

    checkpoint_exclude: ClassVar[tuple[str, ...]] = ("on_bad",)

    def __init__(self, *, max_line: int, on_bad: str, name: str | None) -> None:
        _check_line_options(max_line, on_bad, type(self).__name__)
        super().__init__(name=name)
        self.max_line, self.on_bad = max_line, on_bad
        if on_bad == "dead-letter":
            self.add_output(DEAD_LETTER)

    def _dead_letter(self, record: dict[str, Any]) -> None:
        self.write(DEAD_LETTER, record)


class LinesSource(_BadLines):
    """Lines or JSON Lines from stdin (``path=None``) or a file, optionally followed (``tail -f``).

    Options as :class:`LineStream`; see :class:`_BadLines` for ``on_bad="dead-letter"``. Its state in a
    checkpoint is its position and ``generations`` (the files a followed path held). Its position counts the
    items of that file as its ``path``, ``json``, ``follow``, ``from_end`` and ``max_line`` made them (which lines
    are items, from which end, in which file generation): a restore that changes one of them is refused, naming
    it; ``on_bad`` and ``poll_interval`` are taken from the workflow.
    """

    checkpoint_exclude = ("poll_interval",)
    checkpoint_fixed = ("path", "json", "follow", "from_end", "max_line")  # what its position counts

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        json: bool = False,
        follow: bool = False,
        from_end: bool = False,
        poll_interval: float = _POLL_INTERVAL,
        max_line: int = MAX_LINE_BYTES,
        on_bad: str = DEFAULT_LINE_POLICY,
        name: str | None = None,
    ) -> None:
        _check_seconds(poll_interval, "poll_interval", "LinesSource")
        super().__init__(max_line=max_line, on_bad=on_bad, name=name)
        self.path = None if path is None else os.fspath(path)
        self.json, self.follow, self.from_end, self.poll_interval = json, follow, from_end, poll_interval
        self.generations: list[FileGeneration] = []  # state: the files a followed path held, for a restore

    @property
    def replayable(self) -> bool:  # type: ignore[override]
        """A file can be replayed; stdin, and a file followed from its end, cannot."""
        return self.path is not None and not (self.follow and self.from_end)

    def open(self) -> LineStream:
        return LineStream(
            self.path,
            json=self.json,
            follow=self.follow,
            from_end=self.from_end,
            poll_interval=self.poll_interval,
            max_line=self.max_line,
            on_bad=self.on_bad,
            dead_letter=self._dead_letter,
            generations=self.generations,
        )


class TCPSource(_BadLines):
    """Lines or JSON Lines from TCP clients (``mode="server"``) or a TCP server (``mode="client"``).

    Options as :class:`SocketStream`; the bound address is in ``address``
    once listening. See :class:`_BadLines` for ``on_bad="dead-letter"``.
    """

    replayable = False
    checkpoint_exclude = (
        *("host", "port", "mode", "json", "connections", "on_listen", "max_pending", "max_pending_bytes"),
        "address",  # where this run listens: the workflow's host and port say where a restored one does
        "max_line",  # not replayable: no position to count lines for, all its options are configuration
    )

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        mode: str = "server",
        json: bool = False,
        connections: int | None = None,
        on_listen: Callable[[tuple[str, int]], Any] | None = None,
        max_pending: int = _MAX_PENDING_LINES,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        max_line: int = MAX_LINE_BYTES,
        on_bad: str = DEFAULT_LINE_POLICY,
        name: str | None = None,
    ) -> None:
        _check_mode(mode, "TCPSource")
        _check_socket_options(port, max_pending, max_pending_bytes, "TCPSource")
        _check_limit(connections, "connections", "TCPSource")
        super().__init__(max_line=max_line, on_bad=on_bad, name=name)
        self.host, self.port, self.mode, self.json = host, port, mode, json
        self.connections, self.on_listen = connections, on_listen
        self.max_pending, self.max_pending_bytes = max_pending, max_pending_bytes
        self.address: tuple[str, int] | None = None

    def _listening(self, address: tuple[str, int]) -> None:
        self.address = address
        if self.on_listen is not None:
            self.on_listen(address)

    def open(self) -> SocketStream:
        return SocketStream(
            self.host,
            self.port,
            mode=self.mode,
            json=self.json,
            connections=self.connections,
            on_listen=self._listening,
            max_pending=self.max_pending,
            max_pending_bytes=self.max_pending_bytes,
            max_line=self.max_line,
            on_bad=self.on_bad,
            dead_letter=self._dead_letter,
        )


class UDPSource(_BadLines):
    """Datagrams on a UDP socket; options as :class:`DatagramStream`. See :class:`_BadLines` for
    ``on_bad="dead-letter"``."""

    replayable = False
    checkpoint_exclude = (  # not replayable: no position to count datagrams for, all its options are configuration
        *("host", "port", "json", "count", "on_listen", "max_pending", "max_pending_bytes", "max_line"),
    )

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        json: bool = False,
        count: int | None = None,
        on_listen: Callable[[tuple[str, int]], Any] | None = None,
        max_pending: int = _MAX_PENDING_DATAGRAMS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        max_line: int = MAX_LINE_BYTES,
        on_bad: str = DEFAULT_LINE_POLICY,
        name: str | None = None,
    ) -> None:
        _check_socket_options(port, max_pending, max_pending_bytes, "UDPSource")
        _check_limit(count, "count", "UDPSource")
        super().__init__(max_line=max_line, on_bad=on_bad, name=name)
        self.host, self.port, self.json, self.count = host, port, json, count
        self.on_listen = on_listen
        self.max_pending, self.max_pending_bytes = max_pending, max_pending_bytes

    def open(self) -> DatagramStream:
        return DatagramStream(
            self.host,
            self.port,
            json=self.json,
            count=self.count,
            on_listen=self.on_listen,
            max_pending=self.max_pending,
            max_pending_bytes=self.max_pending_bytes,
            max_line=self.max_line,
            on_bad=self.on_bad,
            dead_letter=self._dead_letter,
        )


class TimerSource(SourcePE):
    """A tick every ``interval`` seconds; options as :class:`TimerStream`."""

    checkpoint_exclude = ("interval", "count")  # its position counts ticks whatever their interval and count

    def __init__(self, interval: float, *, count: int | None = None, name: str | None = None) -> None:
        _check_seconds(interval, "interval", "TimerSource")
        _check_limit(count, "count", "TimerSource")
        super().__init__(name=name)
        self.interval, self.count = interval, count

    def open(self) -> TimerStream:
        return TimerStream(self.interval, count=self.count)


class AsyncIterSource(SourcePE):
    """Any async iterable as a source: ``factory(*args, **kwargs)`` makes it when the run starts.

    The factory (e.g. a function building an aiostream pipeline) is called
    once per run, so the PE stays reusable; use a module-level function for
    mappings that pickle PEs. Draining cancels the iteration unless the
    iterable has a ``drain()`` method.
    """

    checkpoint_exclude = ("factory", "args", "kwargs")

    def __init__(self, factory: Callable[..., AsyncIterable[Any]], *args: Any, name: str | None = None, **kwargs: Any):
        super().__init__(name=name or getattr(factory, "__name__", None))
        self.factory, self.args, self.kwargs = factory, args, kwargs

    def open(self) -> AsyncIterable[Any]:
        stream = self.factory(*self.args, **self.kwargs)
        if not isinstance(stream, AsyncIterable):
            raise InputError(
                f"source PE {self.label}: its factory returned {type(stream).__name__}, not an async iterable"
            )
        return stream
