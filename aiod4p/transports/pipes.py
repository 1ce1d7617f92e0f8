"""The pipe transport: comms over OS socket pairs between processes.

Each message travels as one frame: an 8-byte little-endian length, then the
message pickled with protocol 5. Large contiguous buffers in the message
(numpy arrays and other objects that pickle as a ``PickleBuffer``, of at
least 64 KiB) travel out of band, after the pickle, so they
are copied once into the frame rather than into the pickle and again into
the frame: such a frame has the top bit of its length set, and its payload
is the buffer count (4 bytes), each buffer's length (8 bytes each), the
pickle's length (8 bytes), the pickle (padded with zeros, which unpickling
ignores, so that the buffers start 16-aligned from the frame's header), then
the buffers; the receiver gets writable copies, but a frame whose one buffer
is of ``_KEPT_BUFFER`` bytes or more, and most of the frame, lends it a
writable view of the buffer the socket was read into, if aligned there as a
copy would be, which is then replaced: no second copy of a 200 MB array.
Large ``bytes`` objects in the message are not copied into the pickle: the
pickler hands them over as they are (a ``bytes`` object cannot change while
the socket takes it), and the socket copies them once
(uvloop's transport writes the pieces as they are; asyncio's joins them).
A frame of length 0 is the close marker, so
the reader tells a clean close (:class:`~aiod4p.errors.EndOfChannel`) from a
vanished peer (end of file without the marker:
:class:`~aiod4p.errors.PeerDied`). The socket is read and written by the
event loop's transport (never blocking the loop); buffering is bounded on both
sides: the sender waits while its write buffer is above ``write_buffer``
bytes, and the receiver stops reading the socket while ``max_messages``
decoded messages wait to be received, so a receiver that stops reading
eventually stalls its sender.

A write that finds the peer's socket closed ends the connection, and what
the peer sent that was not yet read is lost: a protocol on top of this comm
closes an end only after the peer said it sends nothing more (as the engine's
links and the multi mapping's control comms do).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import pickle
import socket
import struct
from collections import deque
from typing import Any, cast

from ..errors import ChannelClosed, EndOfChannel, PeerDied, UnpicklableMessage
from ._base import Comm, Undecodable, Wakeups, message_pickler, opened

__all__ = ["PipeComm", "open_pipe_comm", "pipe_comm_pair"]

_HEADER = struct.Struct("<Q")
_CLOSE_MARKER = _HEADER.pack(0)
_WITH_BUFFERS = 1 << 63  # the frame's length flag: buffers follow the pickle
_OUT_OF_BAND = 64 * 1024  # smaller buffers stay in the pickle


_READ_ROOM = 256 * 1024  # the least room each read of the socket is offered
_PIECEWISE = 1 << 20  # a frame at least this long goes to a transport that joins its pieces a piece at a time
_KEPT_BUFFER = 8 << 20  # a read buffer grown past this for a large frame is dropped once it is decoded
_CLOSE_TIMEOUT = 5.0  # seconds aclose() waits for the peer to take what is buffered


class _FrameProtocol(Wakeups, asyncio.BufferedProtocol):
    """Turns the byte stream into messages and tracks the connection's state (:meth:`changed`: data, room, end).

    The socket is read straight into one buffer, which grows to hold a whole
    frame when a large one arrives: its bytes are copied once, by the read,
    before they are unpickled. The one out-of-band buffer of a frame, of
    :data:`_KEPT_BUFFER` bytes or more, is not copied again when aligned in the
    read buffer: the message keeps a view of it (:attr:`lent`), which is then
    replaced, never written again.
    """

    def __init__(self, max_messages: int) -> None:
        super().__init__()
        self.max_messages = max_messages
        self.transport: asyncio.Transport | None = None
        self.messages: deque[Any] = deque()
        self.buffer = bytearray(_READ_ROOM)
        self.start = 0  # the first byte read but not yet decoded
        self.end = 0  # one past the last byte read
        self.reading_paused = False
        self.writing_paused = False
        self.peer_closed = False  # the close marker arrived
        self.lent = False  # a decoded message holds views of self.buffer: replace it before the next read
        self.eof = False  # the stream ended (with or without the marker)
        self.lost = False
        self.gone = asyncio.get_running_loop().create_future()

    # -- asyncio.BufferedProtocol ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        undecoded = self.end - self.start
        needed = _READ_ROOM
        if undecoded >= _HEADER.size:  # the frame under way may need more room than a read's
            (length,) = _HEADER.unpack_from(self.buffer, self.start)
            needed = max(needed, _HEADER.size + (length & ~_WITH_BUFFERS) - undecoded)
        if len(self.buffer) - self.end < needed:
            # Never resized in place (a read may still hold a view of it): moved, or replaced by a larger one.
            if len(self.buffer) >= undecoded + needed:
                self.buffer[:undecoded] = self.buffer[self.start : self.end]
            else:
                larger = bytearray(undecoded + needed)
                larger[:undecoded] = self.buffer[self.start : self.end]
                self.buffer = larger
            self.start, self.end = 0, undecoded
        return memoryview(self.buffer)[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        if self.peer_closed:
            self.start = self.end
        else:
            with memoryview(self.buffer) as whole, whole[self.start : self.end] as view:
                self.start += self._decode(view)
        if self.lent:
            self.lent = False
            rest = self.buffer[self.start : self.end]
            self.buffer = bytearray(max(_READ_ROOM, len(rest)))
            self.buffer[: len(rest)] = rest
            self.start, self.end = 0, len(rest)
        if self.start == self.end:
            self.start = self.end = 0
            if len(self.buffer) > _KEPT_BUFFER:
                self.buffer = bytearray(_READ_ROOM)
        if len(self.messages) >= self.max_messages and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self.wake()

    def _decode(self, view: memoryview) -> int:
        position, size, messages = 0, len(view), self.messages
        unpack_from, header = _HEADER.unpack_from, _HEADER.size
        while size - position >= header:
            (length,) = unpack_from(view, position)
            if length == 0:
                self.peer_closed = True
                return size
            with_buffers = length & _WITH_BUFFERS
            length &= ~_WITH_BUFFERS
            end = position + header + length
            if end > size:
                break
            with view[position + header : end] as frame:
                try:
                    if with_buffers:
                        message, lent = _unpickle(frame)
                        messages.append(message)
                        self.lent |= lent
                    else:
                        messages.append(pickle.loads(frame))
                except Exception as exc:
                    messages.append(Undecodable(exc))
            position = end
        return position

    def eof_received(self) -> bool | None:
        self.eof = True
        self.wake()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.eof = True
        if not self.gone.done():
            self.gone.set_result(None)
        self.wake()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.wake()


class _Pieces:
    """A pickler's file that keeps each write as a piece of the frame: a ``bytes`` object as it is, others copied.

    The pickler writes its frames of up to 64 KiB as ``bytes``, and a larger
    ``bytes`` object of the message as the object itself (no copy); what it
    writes directly from a mutable object (a large ``bytearray``) is copied,
    since the sender may change it before the socket takes it.
    """

    __slots__ = ("pieces",)

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def write(self, data: Any) -> None:
        self.pieces.append(data if type(data) is bytes else bytes(data))


def _pickle(message: Any) -> list[bytes]:
    """The pieces of one frame holding ``message``, its large buffers out of band.

    The buffers are copied once, into one piece: the transport may hold the
    pieces until the socket takes them, while the sender may change its arrays.
    """
    views: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: in the pickle
            return True
        if view.nbytes < _OUT_OF_BAND:
            return True
        views.append(view)
        return False

    writer = _Pieces()
    message_pickler(writer, message, out_of_band).dump(message)
    data = writer.pieces
    size = sum(map(len, data))
    if not views:
        return [_HEADER.pack(size), *data]
    if padding := -(_HEADER.size + 4 + 8 * (len(views) + 1) + size) % _ALIGNMENT:
        data.append(bytes(padding))
        size += padding
    lengths = struct.pack(f"<I{len(views)}QQ", len(views), *(view.nbytes for view in views), size)
    length = len(lengths) + size + sum(view.nbytes for view in views)
    return [_HEADER.pack(length | _WITH_BUFFERS), lengths, *data, b"".join(views)]


_ALIGNMENT = 16  # what malloc gives a copy, and numpy's arrays need (a complex128 element's size)


def _unpickle(frame: memoryview) -> tuple[Any, bool]:
    """The message in a frame written by :func:`_pickle` with buffers, and whether it holds a view of ``frame``
    (of a ``bytearray``, which the caller must then never write again): its one buffer of :data:`_KEPT_BUFFER`
    bytes or more that is most of the frame, aligned in it. Other buffers are copied out: a view would keep the
    whole frame, and a misaligned array is several times slower to compute with."""
    (count,) = struct.unpack_from("<I", frame)
    *sizes, size = struct.unpack_from(f"<{count}QQ", frame, 4)
    position = 4 + 8 * (count + 1)
    data = frame[position : position + size]
    position += size
    if count == 1 and sizes[0] >= max(_KEPT_BUFFER, len(frame) // 2):  # most of the frame: keeps little else
        piece = frame[position : position + sizes[0]]
        if ctypes.addressof(ctypes.c_char.from_buffer(piece)) % _ALIGNMENT == 0:
            return pickle.loads(data, buffers=[piece]), True
    buffers = []
    for length in sizes:
        buffers.append(bytearray(frame[position : position + length]))  # writable, like an in-band array
        position += length
    return pickle.loads(data, buffers=buffers), False


class PipeComm(Comm):
    """One end of a pipe comm; create it with :func:`open_pipe_comm` or :func:`pipe_comm_pair`.

    Safe for several concurrent senders: each message is written whole.
    """

    def __init__(self, transport: asyncio.Transport, protocol: _FrameProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False
        # asyncio's own transports (before Python 3.12) join a frame's pieces into one bytes object, a copy of the
        # frame made on the event loop, before the buffer's copy of what the socket does not take at once.
        self._joins = type(transport).writelines is asyncio.WriteTransport.writelines

    async def send(self, message: Any) -> None:
        """Pickle and send ``message``, waiting while the write buffer is full.

        Raises:
            ChannelClosed: this end was closed.
            PeerDied: the peer closed or vanished.
            UnpicklableMessage: ``message`` cannot be pickled (nothing was sent).
        """
        protocol = self._protocol
        while True:
            if self._closed:
                raise ChannelClosed("send on a closed pipe comm")
            if protocol.eof or protocol.peer_closed:
                raise PeerDied("the peer of this pipe comm is gone")
            if not protocol.writing_paused:
                break
            await protocol.changed()
        try:
            pieces = _pickle(message)
            if self._joins and len(pieces) > 2 and sum(map(len, pieces)) >= _PIECEWISE:
                for piece in pieces:
                    self._transport.write(piece)
            else:
                self._transport.writelines(pieces)
        except Exception as exc:
            raise UnpicklableMessage(f"a message cannot be pickled: {type(exc).__name__}: {exc}", message) from exc

    async def receive(self) -> Any:
        """Receive the next message.

        Raises:
            EndOfChannel: the peer closed cleanly and every message was received.
            PeerDied: the stream ended without the peer's close marker.
            ChannelClosed: this end was closed.
            TransportError: a message could not be unpickled here.
        """
        protocol = self._protocol
        messages = protocol.messages
        while True:
            if self._closed:
                raise ChannelClosed("receive on a closed pipe comm")
            if messages:
                message = messages.popleft()
                if protocol.reading_paused and len(messages) <= protocol.max_messages // 2 and not protocol.lost:
                    protocol.reading_paused = False
                    self._transport.resume_reading()
                return opened(message)
            if protocol.peer_closed:
                raise EndOfChannel()
            if protocol.eof:
                raise PeerDied("the peer of this pipe comm vanished without closing it")
            await protocol.changed()

    async def aclose(self) -> None:
        """Send the close marker, flush, and close the socket.

        Waits at most ``_CLOSE_TIMEOUT`` seconds for the peer to take what is
        buffered, then drops it.
        """
        if self._closed:
            return
        self._closed = True
        protocol, transport = self._protocol, self._transport
        protocol.wake()
        try:
            if not protocol.lost:
                transport.write(_CLOSE_MARKER)
                transport.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        await asyncio.shield(protocol.gone)
        finally:
            if not protocol.lost:
                transport.abort()

    def abort(self) -> None:
        """Drop the connection without the close marker, as a crashed peer would."""
        self._closed = True
        if not self._protocol.lost:
            self._transport.abort()
        self._protocol.wake()


async def open_pipe_comm(
    sock: socket.socket,
    *,
    max_messages: int = 32,
    write_buffer: int = 256 * 1024,
    socket_buffer: int = 4 << 20,
) -> PipeComm:
    """Wrap a connected stream socket (one end of a :func:`socket.socketpair`).

    The comm owns the socket from then on.

    Args:
        sock: a connected ``AF_UNIX`` stream socket.
        max_messages: decoded messages to buffer before the socket is no longer read.
        write_buffer: bytes buffered by the sender before :meth:`PipeComm.send` waits.
        socket_buffer: the kernel's send and receive buffer asked for the socket
            (the kernel caps it at ``net.core.wmem_max`` and ``rmem_max``). The
            default holds a frame of a few megabytes whole, so a receiver busy in
            a PE's call takes it in one turn of its loop, not 208 KiB a turn.

    Raises:
        ValueError: a limit is not positive.
    """
    if max_messages < 1 or write_buffer < 1 or socket_buffer < 1:
        raise ValueError("max_messages, write_buffer and socket_buffer must be at least 1")
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, socket_buffer)
    transport, protocol = await loop.create_unix_connection(lambda: _FrameProtocol(max_messages), sock=sock)
    transport.set_write_buffer_limits(high=write_buffer)
    return PipeComm(transport, protocol)


async def pipe_comm_pair(**options: Any) -> tuple[PipeComm, PipeComm]:
    """Two joined pipe comms in this process (over a socket pair); ``options`` as :func:`open_pipe_comm`."""
    left, right = socket.socketpair()
    try:
        first = await open_pipe_comm(left, **options)
    except BaseException:
        left.close()
        right.close()
        raise
    try:
        second = await open_pipe_comm(right, **options)
    except BaseException:
        right.close()
        with contextlib.suppress(Exception):
            first.abort()
        raise
    return first, second
