"""The exceptions aiod4p raises: one tree rooted at :class:`Aiod4pError`.

::

    Aiod4pError
    ├── GraphError            the graph is invalid (a port, a cycle, an id, a grouping's key)
    ├── InputError            the inputs of a run are invalid
    ├── TargetError           a workflow file or module cannot be loaded
    ├── MappingUnavailable    an unknown mapping, or one whose extra is not installed
    ├── PEError               a PE raised (its id, instance, port or stage, traceback)
    ├── WorkerDied            a worker process, MPI rank or Ray actor ended before the run
    ├── CheckpointError       a checkpoint cannot be taken or restored
    └── TransportError        a channel between workers failed
        ├── ChannelClosed         this end was closed
        ├── EndOfChannel          the peer closed cleanly (a normal event)
        ├── PeerDied              the peer vanished
        └── UnpicklableMessage    a message cannot be pickled (nothing was sent)

Errors from back ends (pipes, MPI, Storm, Ray, the file system) are mapped into
this tree with ``raise ... from exc``, so callers only ever need to catch these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = [
    "Aiod4pError",
    "CheckpointError",
    "GraphError",
    "InputError",
    "MappingUnavailable",
    "PEError",
    "TargetError",
    "TransportError",
    "PeerDied",
    "ChannelClosed",
    "EndOfChannel",
    "UnpicklableMessage",
    "WorkerDied",
]


class Aiod4pError(Exception):
    """Base class of every error aiod4p raises on purpose."""


class GraphError(Aiod4pError):
    """The workflow graph is invalid: unknown port, cycle, duplicate id, ..."""


class InputError(Aiod4pError):
    """The inputs given to a run are invalid (unknown PE, bad JSON, bad count)."""


class TargetError(Aiod4pError):
    """A workflow target (``module:attr`` or ``file.py[:attr]``) cannot be loaded."""


class MappingUnavailable(Aiod4pError):
    """A mapping is unknown, or its optional dependencies are not installed."""


class PEError(Aiod4pError):
    """A processing element raised while the run was executing.

    Attributes:
        pe: the PE id.
        instance: the instance index of that PE.
        port: the input port being processed, or the lifecycle stage
            (``"preprocess"``, ``"postprocess"``) when no item was involved.
        traceback_text: the formatted traceback of the original exception,
            kept as text so it survives crossing process boundaries.
    """

    def __init__(self, pe: str, instance: int, port: str, message: str, traceback_text: str = ""):
        self.pe = pe
        self.instance = instance
        self.port = port
        self.message = message
        self.traceback_text = traceback_text
        super().__init__(f"PE {pe}[{instance}] failed on {_where(port)}: {message}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_arrived, (self.pe, self.instance, self.port, self.message, self.traceback_text))


class _RemoteTraceback(Exception):
    """The traceback of a PE's exception in another process, shown as the cause of the :class:`PEError` that
    arrived from there (as :mod:`concurrent.futures` shows a worker's): where the PE's code failed."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


def _arrived(pe: str, instance: int, port: str, message: str, traceback_text: str) -> PEError:
    """A :class:`PEError` unpickled in another process: caused by its traceback there."""
    error = PEError(pe, instance, port, message, traceback_text)
    if traceback_text:
        error.__cause__ = _RemoteTraceback(traceback_text)
    return error


def _where(port: str) -> str:
    if port in ("preprocess", "postprocess", "feed"):
        return port
    return f"input port {port!r}"


class TransportError(Aiod4pError):
    """A channel between workers failed."""


class ChannelClosed(TransportError):
    """The local end of a channel was closed; no more messages can pass."""


class EndOfChannel(TransportError):
    """The peer closed the channel cleanly: a normal event, not a failure."""


class PeerDied(TransportError):
    """The other end of a channel vanished without closing it cleanly."""


class UnpicklableMessage(TransportError):
    """A message could not be pickled, so nothing was sent; ``message`` is the object that failed.

    It travels (pickled) as a plain :class:`TransportError`: the message may be what cannot be pickled.
    """

    def __init__(self, text: str, message: object = None) -> None:
        super().__init__(text)
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        return (TransportError, (str(self),))


class WorkerDied(Aiod4pError):
    """A worker process (or MPI rank) exited before the run finished."""


class CheckpointError(Aiod4pError):
    """A checkpoint cannot be taken or restored (unpicklable state, a plan that does not match)."""


def reader_went_away(what: str, where: str, error: type[Aiod4pError] = Aiod4pError) -> Aiod4pError:
    """The error for ``where``, a named pipe whose reader went away while ``what`` was written to it: what
    was written is lost, unlike a ``| head`` on stdout, where the user asked for no more."""
    return error(f"cannot write {what} to {where}: its reader went away")


@contextlib.contextmanager
def writing(what: str, where: str, error: type[Aiod4pError] = Aiod4pError) -> Iterator[None]:
    """Turn a failed write of ``what`` to ``where`` (a full disk, an I/O error) into ``error``, naming both
    and the system's reason: ``cannot write results to out.jsonl: No space left on device``.

    A ``BrokenPipeError`` passes through: the reader went away, which a command reports by its own status.
    """
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise error(f"cannot write {what} to {where}: {exc.strerror or exc}") from exc
