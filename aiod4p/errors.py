"""The exceptions aiod4p raises: one tree rooted at :class:`Aiod4pError`.

::

    Aiod4pError                   what no subclass names (a missing tool, an unreadable file, a closed feed)
    ├── GraphError                the graph or a PE is invalid (a port, a cycle, an id, a grouping's key, a pickle)
    ├── InputError                the inputs of a run are invalid or cannot be read
    ├── TargetError               a workflow file or module cannot be loaded
    ├── MappingUnavailable        a mapping or transport is unknown, or cannot run here
    ├── PEError                   a PE raised (its id, instance, port or stage, traceback)
    ├── WorkerDied                a worker process, MPI rank, Ray actor or Storm task ended early
    ├── CheckpointError           a checkpoint cannot be taken or restored
    └── TransportError            a message between workers, or a worker and its launcher, cannot be carried
        ├── ChannelClosed             this end was closed
        ├── EndOfChannel              the peer closed cleanly (a normal event, not a failure)
        ├── PeerDied                  the peer vanished
        ├── UnpicklableMessage        a message cannot be pickled (nothing was sent)
        └── aiod4p.storm.WireError    an item aiod4p.storm's wire encoding of Storm's multilang protocol refuses

Each class's docstring says when it is raised. Errors from back ends (pipes,
MPI, Storm, Ray, the file system) are mapped into this tree with ``raise ...
from exc``, so a failed run, load or build raises one of these; an invalid
argument (a negative number of workers, an unknown start method) raises
:class:`ValueError` or :class:`TypeError`, as Python's own functions do.
Every public class here is also reachable as ``aiod4p.<name>``. The error that ends a run raised by
:func:`aiod4p.run`, :func:`aiod4p.run_async` or :meth:`aiod4p.WorkflowRun.results` carries the results the
run gave before it failed, in its ``partial_results``; so does the ``KeyboardInterrupt`` that :func:`aiod4p.run`
raises once an interrupt has drained its run.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._results import Results

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
    """Base class of every error aiod4p raises on purpose; raised itself where no subclass names the failure
    (Graphviz's ``dot`` or an optional package such as ``prov`` or ``matplotlib`` missing, a statistics or
    provenance file that cannot be read, a feed that is closed, Storm's ``sparse submit`` failing).

    Attributes:
        partial_results: on the error that ended a run, as :func:`aiod4p.run`, :func:`aiod4p.run_async` and
            :meth:`aiod4p.WorkflowRun.results` raise it, the results the run gave before it failed (but those a
            reader already took from the run by iterating it); ``None`` on every other error.
    """

    partial_results: Results | None = None


class GraphError(Aiod4pError):
    """The workflow graph, or a PE in it, is invalid: an unknown or twice-declared port, a required input left
    unconnected, a cycle, a duplicate id, a parallelism that is not positive, a plan needing more channels than
    a run can be given; a PE that breaks its contract while running (writes to an undeclared port, returns what
    is not a dict, has a grouping key that fails on an item); a PE that cannot be copied for its instances or
    pickled for its workers."""


class InputError(Aiod4pError):
    """The inputs of a run are invalid (an unknown or non-root PE, a negative count, bad JSON, an input that
    cannot be pickled for its workers or stored in a Storm topology), or a live source cannot be read (a file
    or socket that cannot be opened, a bad line under the ``fail`` policy, a :class:`~aiod4p.sources.LiveFeed`
    already feeding another run)."""


class TargetError(Aiod4pError):
    """A workflow target (``module:attr`` or ``file.py[:attr]``) cannot be loaded, here or in a worker, or holds
    no single workflow graph; or a Storm project cannot be written or read back."""


class MappingUnavailable(Aiod4pError):
    """A mapping or transport is unknown, or cannot run here: its extra is not installed (the message gives
    the install command), or what it runs on is missing or unreachable (``mpiexec``, a Ray or Storm cluster)."""


class PEError(Aiod4pError):
    """A processing element raised while the run was executing.

    Attributes:
        pe: the PE id.
        instance: the instance index of that PE.
        port: the input port being processed; or, when no input item was involved,
            the lifecycle stage (``"preprocess"``, ``"postprocess"``) or
            ``"feed"`` (a root PE called without input, or the run's input for
            it, failed).
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


class _StdoutClosed(Aiod4pError):
    """A PE wrote to its process's stdout, a pipe whose reader went away (``aiod4p run ... | head``): the run
    stops, and the command exits quietly with the status of a closed ``--results -`` (141), as Unix tools do."""


def stdout_closed(exc: BaseException) -> bool:
    """Whether ``exc`` is a write to this process's stdout that failed because its reader went away: a
    ``BrokenPipeError`` while file descriptor 1 is a pipe whose read end is closed. A ``BrokenPipeError`` of
    another pipe or socket (a PE's own) is not, while stdout's reader is there."""
    if not isinstance(exc, BrokenPipeError):
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(1).st_mode):
            return False
    except OSError:  # closed
        return False
    poll = select.poll()
    poll.register(1, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))  # the write end of a pipe with no reader


class TransportError(Aiod4pError):
    """A message between workers, or between a worker and its launcher, cannot be carried: the comm failed (the
    subclasses), an item or result cannot be pickled (or, on Storm, encoded) to cross, a message cannot be
    unpickled where it arrives, or a peer sent what the protocol does not allow.

    ``except TransportError`` also catches :class:`EndOfChannel`, which is no failure.
    """


class ChannelClosed(TransportError):
    """The local end of a channel was closed; no more messages can pass."""


class EndOfChannel(TransportError):
    """The peer closed the channel cleanly: a normal event, not a failure. :meth:`~aiod4p.transports.Comm.receive`
    raises it once every message the peer sent has been received; nothing else does."""


class PeerDied(TransportError):
    """The other end of a channel vanished without closing it cleanly (or closed it before the goodbye of the
    protocol on top: a worker's link, a launcher's control comm)."""


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
    """A worker (a process of the multi mapping, an MPI rank, a Ray actor, a Storm task) ended before the run
    finished; with checkpoints, a death the run was not restarted after (the message says why)."""


class CheckpointError(Aiod4pError):
    """A checkpoint cannot be taken or restored: a state that cannot be saved, a checkpoint directory that
    cannot be written or is locked by another run, no complete checkpoint to restore, a checkpoint of another
    graph or of other instance counts, a PE's ``keyed_state`` or ``snapshot()`` misdeclared, checkpoints asked
    of a run the mapping cannot checkpoint (mpi under the user's own ``mpiexec``)."""


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
