"""Checkpoints and recovery: aligned in-band barriers (Chandy-Lamport, as Flink does it).

* A **coordinator** (:class:`Coordinator`, in the process that runs the
  results) triggers checkpoint ``n`` every ``interval`` seconds, one at a time.
* Every **source** (a root PE instance) then takes a snapshot at its next safe
  point: between two feed batches (a :class:`~aiod4p._channels.Barrier` sent
  in its feed channel) or, within its calls, between two chunks of their
  output (an async generator's, a ``SourcePE``'s: its position in its stream;
  plain calls': the state their batch found and what they delivered, which a
  restore makes again and drops); and forwards barrier ``n`` on each of its
  output channels, behind what it wrote before.
* Every other instance **aligns** (:class:`Aligner`): a channel that delivered
  barrier ``n`` is blocked (its messages wait, unread, so its sender runs out
  of credits and stalls: alignment is back-pressure on the fast channels)
  until every open input channel delivered it; then the instance flushes its
  outputs, snapshots its state (:mod:`aiod4p._state`), forwards the barrier
  and unblocks.
* An instance that finished counts with its final state.
* **Results** pass a :class:`ResultGate`: results written after barrier ``n``
  wait until every producer passed it; the gate then *commits* ``n`` (the
  ``--results`` file is flushed and its length recorded) and lets them go.
* Checkpoint ``n`` is **complete** when every instance's state is on disk and
  the results are committed: the coordinator writes ``MANIFEST.json`` last
  (temporary file, fsync, rename). A directory without a valid manifest, or
  whose parts do not match it, is torn and never used.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
import stat
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TextIO, TypeVar

from . import __version__
from ._channels import Barrier, Message
from ._engine import HELD_FEEDS, calls_take_turns
from ._frames import short_repr
from ._groupings import All, GroupBy
from ._pe import PE
from ._plan import ExecutionPlan, InstanceRef
from ._results import ResultRecord, ResultSink, record_line
from ._sizes import approximate_batch_size
from ._state import NOT_MADE, capture, check_keyed_state, excluded_attributes, fixed_attributes, restore_state
from ._threads import finished_in_thread
from .errors import (
    CheckpointError,
    MappingUnavailable,
    PeerDied,
    TransportError,
    WorkerDied,
    reader_went_away,
    writing,
)

if TYPE_CHECKING:
    from ._engine import Feed, ReadAhead, Worker, _Actor
    from ._graph import Edge
    from ._stats import InstanceStats
    from .transports import Comm

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "Checkpointing",
    "Coordinator",
    "ResultGate",
    "ResultsLog",
    "RunRequests",
    "Session",
    "Suspended",
    "WorkerCheckpoints",
    "in_checkpoint_store",
    "replayable_feed",
    "resumed_feed",
    "run_with_recovery",
]

logger = logging.getLogger("aiod4p.checkpoint")

T = TypeVar("T")

MANIFEST = "MANIFEST.json"
LOCK = "aiod4p.lock"
"""The lock file in a checkpoint directory: the run that uses the directory holds ``flock`` on it."""
RUN = "RUN.json"
"""Where the last fresh run (not a restore) in a checkpoint directory started: a restore takes no checkpoint before."""
_PREFIX = "chk-"
FORMAT = 1
"""The version of the checkpoint format this aiod4p writes and reads (a manifest's ``version``)."""


@dataclass(frozen=True)
class Checkpointing:
    """How a run takes checkpoints and recovers.

    Attributes:
        directory: where checkpoints are written (``chk-NNNNNNNN/`` per checkpoint).
        interval: seconds between the end of one checkpoint and the trigger of the next.
        keep: complete checkpoints kept (older ones are deleted).
        restore: resume from the newest complete checkpoint in ``directory``.
        restarts: restart the whole run from the last checkpoint this many times when a worker dies.
        results_path: the ``--results`` file, written exactly once per result (truncated on restore).
        results_counted: with ``results_path``, the file alone gets the results: the run's reader gets none, and
            this is called instead with the number of the results each checkpoint commits, once it is complete,
            and with the rest when the run ends, also when it fails (not when it is aborted or suspended: those
            are not counted, and a restore makes them again). Nothing is held for a reader.
    """

    directory: str | os.PathLike[str]
    interval: float = 1.0
    keep: int = 3
    restore: bool = False
    restarts: int = 0
    results_path: str | None = None
    results_counted: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        if self.results_counted is not None and self.results_path is None:
            raise ValueError("Checkpointing: results_counted needs results_path, the file that gets the results")
        if not self.interval > 0:
            raise ValueError(f"Checkpointing: interval must be positive, not {self.interval}")
        if self.keep < 1:
            raise ValueError(f"Checkpointing: keep must be at least 1, not {self.keep}")
        if self.restarts < 0:
            raise ValueError(f"Checkpointing: restarts must be at least 0, not {self.restarts}")


# -- storage ------------------------------------------------------------------------------
def in_checkpoint_store(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> bool:
    """Whether the checkpoints of ``directory`` would write or remove ``path``: the directory itself, its
    :data:`LOCK` or :data:`RUN` (or their temporary files), or anything in a checkpoint (after symbolic links);
    other files in the directory are left alone."""
    try:
        inside = Path(path).resolve().relative_to(Path(directory).resolve())
    except ValueError:
        return False
    return not inside.parts or inside.parts[0].startswith((LOCK, RUN, _PREFIX))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so that a reader sees all of it or nothing.

    ``sync_dir=False`` leaves the directory entry unsynced: the caller syncs
    the directory once for many files (:meth:`CheckpointStore.commit`).
    """
    # A name per writer: two writers of one file in a process (MPI rank 0 relays and runs worker 0) never meet.
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        _fsync_dir(path.parent)


_held_locks: set[int] = set()
"""The descriptors of the directory locks this process holds (:meth:`CheckpointStore.locked`)."""


def _drop_inherited_locks() -> None:
    """In a forked child (a multi worker): close its copies of the parent's lock descriptors.

    A ``flock`` belongs to the open file, which a fork shares: closing the child's copy leaves the
    parent's lock as it is, and the lock then ends with the process that runs the coordinator, not with
    the last of its workers. (An explicit unlock here would release the parent's lock: never done.)
    """
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _lock_holder(fd: int) -> str:
    """`` (pid N)``: the process that holds the lock of ``fd``'s file, as it wrote it; empty if unknown."""
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0))})"
    return ""


def _part_name(ref: InstanceRef) -> str:
    return f"{urllib.parse.quote(ref.pe, safe='')}.{ref.index}.state"


def _label(n: int, directory: Path) -> str:
    """``checkpoint N in DIR``: checkpoint ``n`` in ``directory``, for messages."""
    return f"checkpoint {n} in {directory}"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its id, manifest, the saved state of every instance, and the directory it is in."""

    id: int
    manifest: dict[str, Any]
    states: dict[InstanceRef, dict[str, Any]]
    directory: Path

    @property
    def label(self) -> str:
        """``checkpoint N in DIR``, for messages."""
        return _label(self.id, self.directory)

    @property
    def results_offset(self) -> int | None:
        """The committed length of the results file, if the run wrote one."""
        offset: int | None = self.manifest.get("results_offset")  # checked when loaded (_check_manifest)
        return offset

    @property
    def results_tail(self) -> dict[str, Any] | None:
        """The last bytes of the results file before :attr:`results_offset`: ``{"size", "sha256"}`` (``None``:
        not recorded, by a stream or an older version)."""
        tail: dict[str, Any] | None = self.manifest.get("results_tail")  # checked when loaded (_check_manifest)
        return tail

    def parallelism(self, pe: str) -> int:
        """Instances PE ``pe`` had when the checkpoint was taken.

        Raises:
            CheckpointError: the checkpoint has no PE ``pe`` (another graph).
        """
        try:
            count: int = self.manifest["parallelism"][pe]  # checked when loaded (_check_manifest)
            return count
        except KeyError:
            raise CheckpointError(f"{self.label} has no PE {pe}: it was taken of another graph") from None

    def check(self, plan: ExecutionPlan) -> None:
        """Whether ``plan`` can resume from the checkpoint: it was taken of the same graph (the same PEs, by id,
        the same connections, grouped alike: :func:`_groupings_of_edges`), and the state of a PE whose instance
        count changed can be shared out.

        Raises:
            CheckpointError: a PE or a connection that one of them lacks, or a connection grouped otherwise (named,
                with both groupings): another graph, whose keyed state the restored instances do not hold. Or an
                attribute the PE's class names in ``checkpoint_fixed`` that the workflow changed (:meth:`_check_fixed`).
                Or a PE
                restored with another instance count, not all of its instances finished and none of its state
                ``keyed_state``, whose saved state cannot be shared out (:meth:`_check_shared_out`): the PE and
                the attributes are named.
        """
        for pe in plan.placement:
            self.parallelism(pe)
        extra = sorted(set(self.manifest["parallelism"]) - set(plan.placement))
        if extra:
            raise CheckpointError(
                f"{self.label} has PE {extra[0]}, which this workflow has not: it was taken of another graph"
            )
        saved = self.manifest.get("edges", [])  # a manifest written before connections were recorded has none
        differ = sorted(set(saved) ^ set(_edges(plan))) if "edges" in self.manifest else []
        if differ:
            whose = "the checkpoint's graph" if differ[0] in saved else "this workflow"
            raise CheckpointError(f"{self.label} was taken of another graph: only {whose} connects {differ[0]}")
        grouped = self.manifest.get("groupings", {})  # a manifest written before groupings were recorded has none
        for edge, grouping in sorted(_groupings_of_edges(plan).items()):
            if edge in grouped and grouped[edge] != grouping:
                raise CheckpointError(
                    f"{self.label} was taken of another graph: its connection {edge} is grouped {grouped[edge]},"
                    f" this workflow's {grouping} (its PEs' state holds what the items grouped so made)"
                )
        for pe, placement in plan.placement.items():
            old = self.parallelism(pe)
            if old != placement.parallelism and not placement.is_root:  # a root's is refused with its position
                self._check_shared_out(plan, pe, old, placement.parallelism)
            self._check_fixed(plan, pe)

    def _check_fixed(self, plan: ExecutionPlan, pe: str) -> None:
        """Refuse to restore PE ``pe`` if the workflow changed an attribute its class names in ``checkpoint_fixed``:
        state that the restored state was made with (a window's size and step: its windows under way hold that many
        items), which the workflow's value cannot replace and the checkpoint's must not silently override."""
        states = [self.states[InstanceRef(pe, i)] for i in range(self.parallelism(pe))]
        if all(state["finished"] for state in states):
            return  # its instances do not run again
        built, saved = plan.pes[pe], states[0]["pe"].get("attributes", {})
        for name in fixed_attributes(built):
            if name in saved and not _same(saved[name], getattr(built, name)):
                raise CheckpointError(
                    f"{self.label}: PE {pe}'s {name} is {short_repr(getattr(built, name))} in this workflow and was"
                    f" {short_repr(saved[name])} when the checkpoint was taken: its state was made with that {name},"
                    f" which a restore cannot change (restore with the {name} it had, or start the run afresh,"
                    " without --restore)"
                )

    def _check_shared_out(self, plan: ExecutionPlan, pe: str, old: int, new: int) -> None:
        """Refuse to give PE ``pe``'s non-keyed state of ``old`` instances to ``new``: instance ``i`` would take that
        of old instance ``i % old``, duplicating it (or dropping it, with fewer).

        It is shared out only where that is right: every instance had finished (none runs again), part of it is
        ``keyed_state`` (keys go where their items now go, the rest by index), or each attribute (or what
        ``snapshot()`` returned) is, in every old instance, as the PE was built (nothing the items made), or is
        the same in every old instance and every input of the PE is broadcast (``ALL``: each instance sees
        every item, so each holds what all of them would). One instance's state, with any other grouping, holds
        what its share of the items made: copied to several instances, or split among them, it would be wrong.
        """
        if all(self.states[InstanceRef(pe, i)]["finished"] for i in range(old)):
            return  # its instances do not run again
        saved = [self.states[InstanceRef(pe, i)]["pe"] for i in range(old)]
        if any("keyed" in state for state in saved):
            return  # its keys move to the instances they now reach; its other attributes go by index
        inputs = [edge.grouping for edge in plan.graph.edges if edge.dest == pe]
        broadcast = bool(inputs) and all(isinstance(grouping, All) for grouping in inputs)
        built = _built_state(plan.pes[pe])
        if "custom" in saved[0]:
            values = {"what snapshot() returned": ([state.get("custom") for state in saved], built.get("custom"))}
        else:
            excluded = excluded_attributes(plan.pes[pe])  # a checkpoint written before they were named holds them
            names = sorted({name for state in saved for name in state["attributes"]} - excluded)
            initial = built.get("attributes", {})
            values = {name: ([state["attributes"].get(name) for state in saved], initial.get(name)) for name in names}
        differ = [
            name
            for name, (held, initial) in values.items()
            if not all(_same(value, initial) for value in held)
            and not (broadcast and all(_same(value, held[0]) for value in held))
        ]
        if differ:
            grouped = ", ".join(sorted({str(grouping) for grouping in inputs}))
            why = (
                "its instances hold different state"
                if broadcast
                else f"its inputs ({grouped}) are not all broadcast: each instance's state holds what its items made"
            )
            raise CheckpointError(
                f"PE {pe} had {old} instance{'s' if old > 1 else ''} in checkpoint {self.id}, now {new}, and its"
                f" state ({', '.join(differ)}) is not as built, none of it in keyed_state, and {why}: it cannot be"
                f" shared out among {new} (restore with the same -n, or declare the PE's keyed_state, or name a"
                " cache or configuration in checkpoint_exclude)"
            )


def _built_state(pe: PE) -> dict[str, Any]:
    """The state of ``pe`` as the graph built it, before any run (``{}`` if its ``snapshot()`` fails there)."""
    try:
        return capture(pe, None)
    except Exception:  # a snapshot() that needs what preprocess() sets: no initial state to compare with
        return {}


def _same(one: Any, other: Any) -> bool:
    """Whether two saved values are the same: equal, or pickled alike (objects that compare by identity)."""
    try:
        if bool(one == other):
            return True
    except Exception:  # numpy arrays, say: no single truth value
        pass
    try:
        return pickle.dumps(one) == pickle.dumps(other)
    except Exception:
        return False


def _edge_name(edge: Edge) -> str:
    """A connection as a manifest names it: ``"source.port -> dest.port"``."""
    return f"{edge.source}.{edge.source_port} -> {edge.dest}.{edge.dest_port}"


def _edges(plan: ExecutionPlan) -> list[str]:
    """The connections of the graph ``plan`` runs, as a manifest records them (:func:`_edge_name`)."""
    return sorted(_edge_name(edge) for edge in plan.graph.edges)


def _groupings_of_edges(plan: ExecutionPlan) -> dict[str, str]:
    """The grouping of each connection of the graph ``plan`` runs, by its name (:func:`_edge_name`), as a
    manifest records them: its kind, and a ``group_by``'s key fields or key function's name (``group_by[0]``,
    ``group_by(word_of)``), which say where keyed state goes. A grouping whose text holds an address (an
    object's default ``repr``, a dataclass holding a function), which differs from process to process, is
    named by its class alone, without its module (which depends on how the workflow was loaded)."""
    names = {}
    for edge in plan.graph.edges:
        text = str(edge.grouping)
        names[_edge_name(edge)] = type(edge.grouping).__qualname__ if " at 0x" in text else text
    return names


class CheckpointStore:
    """The checkpoints in one directory, written atomically, the last ``keep`` kept."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = Checkpointing.keep) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self._torn: set[int] = set()  # the torn checkpoints logged: each is logged once
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = "it is a file" if self.directory.is_file() else exc.strerror or exc
            raise CheckpointError(f"cannot create checkpoint directory {self.directory}: {reason}") from exc

    def path(self, n: int) -> Path:
        return self.directory / f"{_PREFIX}{n:08d}"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's advisory lock while the block runs: one run at a time uses a directory.

        The lock is ``fcntl.flock`` on :data:`LOCK` in the directory (created if need be; it holds the
        pid of the holder, for the message of a run refused). The run that coordinates checkpoints
        holds it for its whole life, over its restarts (one lock, taken once); it is released when the
        block ends, however it ends, and by the kernel when the process ends, even by SIGKILL. Worker
        processes forked meanwhile do not keep it (:func:`_drop_inherited_locks`).

        Raises:
            CheckpointError: another run holds the lock (in another process, or in this one: a lock is
                per open file), or the lock file cannot be opened or locked (named, with the system's
                reason). A file system that has no locks (``ENOLCK``, ``EOPNOTSUPP``) gets a warning, and
                the block runs without the lock.
        """
        path = self.directory / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CheckpointError(
                f"cannot lock checkpoint directory {self.directory}: {path}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise CheckpointError(
                f"checkpoint directory {self.directory} is in use by another run{holder}: two runs cannot take"
                " checkpoints into one directory (give this run another --checkpoint-dir, or wait for that"
                " run to end)"
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise CheckpointError(
                    f"cannot lock checkpoint directory {self.directory}: {path}: {exc.strerror or exc}"
                ) from exc
            logger.warning(
                "cannot lock checkpoint directory %s (%s): make sure no other run uses it", self.directory, exc.strerror
            )
            fd = -1  # a file system without locks (some network ones): the run goes on unguarded, as it used to
        if fd < 0:
            yield
            return
        _held_locks.add(fd)
        try:
            with contextlib.suppress(OSError):  # the pid is for messages only
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            _held_locks.discard(fd)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # the last descriptor of the open file here: the lock goes with it

    def ids(self) -> list[int]:
        """Every checkpoint id with a directory, complete or not, in increasing order."""
        found = []
        for entry in self.directory.glob(f"{_PREFIX}*"):
            with contextlib.suppress(ValueError):
                found.append(int(entry.name[len(_PREFIX) :]))
        return sorted(found)

    def start_run(self) -> int:
        """A fresh run (not a restore) starts: record that the checkpoints now in the directory are of earlier runs
        (:data:`RUN`), so that no restore takes one of them; returns the id of the newest (0: none).

        Raises:
            CheckpointError: the record cannot be written (named, with the system's reason).
        """
        after = max(self.ids(), default=0)
        path = self.directory / RUN
        try:
            _atomic_write(path, json.dumps({"after": after, "pid": os.getpid(), "started": time.time()}).encode())
        except OSError as exc:
            raise CheckpointError(
                f"cannot start a run in checkpoint directory {self.directory}: {path}: {exc.strerror or exc}"
            ) from exc
        return after

    def end_run(self) -> None:
        """The last fresh run in the directory (restored or not) has ended, its input done or drained: say so in
        :data:`RUN`, so that a fresh run after it is not warned of an unfinished one (:meth:`unfinished_run`)."""
        if (record := self._run_record()) is not None:
            with contextlib.suppress(OSError):
                _atomic_write(self.directory / RUN, json.dumps({**record, "ended": True}).encode())

    def unfinished_run(self) -> str | None:
        """The newest complete checkpoint of the last fresh run in the directory (its :attr:`Checkpoint.label`), if
        that run did not end (it was killed, failed, or aborted: :meth:`end_run` was not called), else ``None``.
        Its states are not unpickled: the workflow's code may have changed since, and a fresh run needs none."""
        record = self._run_record()
        if record is None or record.get("ended") or not _is_count(record.get("after"), 0):
            return None
        found = self._newest(record["after"] + 1, self._read)
        return None if found is None else _label(found[0], self.directory)

    def run_started_after(self) -> int:
        """The id of the newest checkpoint before the last fresh run in the directory started (0: no fresh run
        recorded one, :data:`RUN` missing).

        Raises:
            CheckpointError: :data:`RUN` is there but unreadable or damaged (named): taken as 0, a restore would
                resume a checkpoint of an earlier run, whose results file the last run started afresh.
        """
        path = self.directory / RUN
        if not path.exists():
            return 0
        record = self._run_record()
        if record is not None and _is_count(record.get("after"), 0):
            return int(record["after"])
        newest = self._newest(0, self._read)
        raise CheckpointError(
            f"--restore: {path}, which says where the last run in {self.directory} started, cannot be read or is"
            " damaged, so which checkpoints are of that run is unknown: nothing was restored (start the run afresh,"
            " without --restore"
            + (
                f"; or remove {path} to resume the newest complete checkpoint, {newest[0]}, whichever run took it)"
                if newest is not None
                else ")"
            )
        )

    def _run_record(self) -> dict[str, Any] | None:
        """What :data:`RUN` says of the last fresh run in the directory; ``None`` if nothing readable."""
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((self.directory / RUN).read_bytes())
            if isinstance(record, dict):
                return record
        return None

    def write_part(self, n: int, ref: InstanceRef, data: bytes, finished: bool = False) -> dict[str, Any]:
        """Save the state of instance ``ref`` for checkpoint ``n``; returns its manifest entry (which says so when
        the state is the instance's final one, ``finished``: it ran its ``postprocess``).

        Raises:
            CheckpointError: the file cannot be written (named, with the system's reason).
        """
        folder = self.path(n)
        name = _part_name(ref)
        try:
            folder.mkdir(exist_ok=True)
            _atomic_write(folder / name, data, sync_dir=False)  # the commit syncs the folder once for all parts
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {n}: {folder / name}: {exc.strerror or exc}") from exc
        entry = {"pe": ref.pe, "index": ref.index, "file": name, "size": len(data), "sha256": _digest(data)}
        if finished:
            entry["finished"] = True
        return entry

    def write_finals(self, n: int, finals: Iterable[tuple[InstanceRef, bytes]]) -> list[dict[str, Any]]:
        """Save the final states of finished instances, ``(ref, data)``, for checkpoint ``n``; their entries."""
        return [self.write_part(n, ref, data, finished=True) for ref, data in finals]

    def commit(self, n: int, manifest: dict[str, Any]) -> None:
        """Complete checkpoint ``n`` (its parts' names synced, then its manifest); keep only the newest ``keep``.

        Raises:
            CheckpointError: the manifest cannot be written (named, with the system's reason).
        """
        try:
            _fsync_dir(self.path(n))
            _atomic_write(self.path(n) / MANIFEST, json.dumps(manifest, indent=1).encode())
        except OSError as exc:
            raise CheckpointError(f"cannot commit checkpoint {n}: {self.path(n)}: {exc.strerror or exc}") from exc
        complete = [i for i in self.ids() if i <= n and (self.path(i) / MANIFEST).exists()]
        keep = set(complete[-self.keep :])
        for i in self.ids():
            if i < n and i not in keep:
                shutil.rmtree(self.path(i), ignore_errors=True)

    def load(self, n: int) -> Checkpoint | None:
        """Checkpoint ``n`` if it is complete and whole, else ``None`` (torn: never used; logged, once).

        Raises:
            CheckpointError: it is whole, but in a format other than :data:`FORMAT` (an aiod4p of another
                version wrote it: the format and that version are named), or a part's state cannot be unpickled
                here: the workflow's code changed since (a class its state holds was renamed or removed). The
                part and the reason are named; an older checkpoint would fail alike.
        """
        whole = self._read(n)
        if whole is None:
            return None
        manifest, parts = whole
        if manifest.get("version") != FORMAT:
            writer = manifest.get("aiod4p")
            raise CheckpointError(
                f"{_label(n, self.directory)} is in checkpoint format {short_repr(manifest.get('version'))}"
                f"{f' (written by aiod4p {short_repr(writer)})' if writer is not None else ''}, and this aiod4p"
                f" ({__version__}) reads format {FORMAT}: restore it with the aiod4p that wrote it, or start the"
                " run afresh, without --restore"
            )
        states: dict[InstanceRef, dict[str, Any]] = {}
        for ref, (name, data) in parts.items():
            try:
                states[ref] = pickle.loads(data)
            except Exception as exc:
                raise CheckpointError(
                    f"{_label(n, self.directory)}: the state of PE {ref.pe} instance {ref.index} ({name})"
                    f" cannot be loaded: {type(exc).__name__}: {exc} (was the workflow's code changed since?)"
                ) from exc
        return Checkpoint(n, manifest, states, self.directory)

    def _read(self, n: int) -> tuple[dict[str, Any], dict[InstanceRef, tuple[str, bytes]]] | None:
        """Checkpoint ``n``'s manifest and its parts (file name, pickled state), if it is complete and whole, else
        ``None`` (torn: logged, once)."""
        folder = self.path(n)
        parts: dict[InstanceRef, tuple[str, bytes]] = {}
        try:
            manifest = json.loads((folder / MANIFEST).read_bytes())
            _check_manifest(manifest)
            for part in manifest["parts"]:
                data = (folder / part["file"]).read_bytes()
                if len(data) != part["size"] or _digest(data) != part["sha256"]:
                    raise ValueError(f"part {part['file']} does not match the manifest")
                parts[InstanceRef(part["pe"], part["index"])] = (part["file"], data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if folder.exists() and n not in self._torn:
                self._torn.add(n)
                reason = (
                    f"{MANIFEST} is not a checkpoint's manifest ({type(exc).__name__}: {exc})"
                    if isinstance(exc, (KeyError, TypeError, json.JSONDecodeError))
                    else exc
                )
                logger.warning("ignoring torn checkpoint %s: %s", folder, reason)
            return None
        return manifest, parts

    def latest(self, since: int = 0) -> Checkpoint | None:
        """The newest complete checkpoint whose id is at least ``since``."""
        found = self._newest(since, self.load)
        return None if found is None else found[1]

    def _newest(self, since: int, read: Callable[[int], T | None]) -> tuple[int, T] | None:
        """The newest checkpoint whose id is at least ``since`` that ``read`` finds complete: its id, and what
        ``read`` gave."""
        for n in reversed(self.ids()):
            if n < since:
                break
            if (got := read(n)) is not None:
                return n, got
        return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_count(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_manifest(manifest: Any) -> None:
    """Check that ``manifest``, read back from a :data:`MANIFEST` that parses, is shaped as
    :class:`Coordinator` writes one: a manifest damaged but still JSON (a digit changed, a hand edit) is then
    torn, as one that does not parse, not a restore failing further on with a ``KeyError`` in a worker, a
    misleading "taken of another graph", or a results file left unchecked.

    Raises:
        KeyError: a key every manifest has is missing (``parts``, ``parallelism``).
        TypeError: a value is not what the coordinator writes there (named), or the parts are not one per
            instance of the counts in ``parallelism``.
    """
    parts, parallelism = manifest["parts"], manifest["parallelism"]
    if not isinstance(parallelism, dict) or not all(_is_count(n, 1) for n in parallelism.values()):
        raise TypeError(f"its parallelism is not an instance count per PE: {short_repr(parallelism)}")
    fields = {"pe": str, "index": int, "file": str, "size": int, "sha256": str}
    if not isinstance(parts, list) or not all(
        isinstance(part, dict) and all(isinstance(part.get(key), kind) for key, kind in fields.items())
        for part in parts
    ):
        raise TypeError("its parts are not each a pe, index, file, size and sha256")
    instances = {(pe, i) for pe, n in parallelism.items() for i in range(n)}
    if len(parts) != len(instances) or {(part["pe"], part["index"]) for part in parts} != instances:
        raise TypeError("its parts are not one per instance of its parallelism")
    edges = manifest.get("edges", [])  # absent in a manifest written before connections were recorded
    if not isinstance(edges, list) or not all(isinstance(edge, str) for edge in edges):
        raise TypeError(f"its edges are not connections: {short_repr(edges)}")
    groupings = manifest.get("groupings", {})  # absent in a manifest written before groupings were recorded
    if not isinstance(groupings, dict) or not all(isinstance(name, str) for name in groupings.values()):
        raise TypeError(f"its groupings are not a grouping per connection: {short_repr(groupings)}")
    offset = manifest.get("results_offset")
    if offset is not None and not _is_count(offset, 0):
        raise TypeError(f"its results_offset is not a length: {offset!r}")
    tail = manifest.get("results_tail")  # absent in a manifest written before it was recorded
    if tail is not None and not (
        isinstance(tail, dict) and _is_count(tail.get("size"), 0) and isinstance(tail.get("sha256"), str)
    ):
        raise TypeError(f"its results_tail is not a size and digest: {short_repr(tail)}")


# -- results ------------------------------------------------------------------------------
class ResultGate:
    """Holds back the results written after a barrier until every producer has passed it.

    ``producers`` are the result-writing instances (or workers) that report
    with :meth:`mark` (passed barrier ``n``) and :meth:`finish` (wrote their
    last result). Once every active producer passed ``n``, ``commit(n)`` is
    awaited; results are handed to ``emit`` so that everything written before
    barrier ``n`` precedes commit ``n`` and nothing written after it does.

    Commits come one at a time, in order: commit ``n`` waits until the results
    held for the commits before it have all been handed to ``emit`` (which may
    wait for a reader that is behind). Once every producer has finished, the
    gate commits up to the last checkpoint triggered or passed by any producer,
    whichever is later (a run may end before a trigger reaches the gate; its
    producers' barriers did), so that nothing stays held.
    """

    def __init__(
        self,
        producers: Iterable[Hashable],
        emit: Callable[[str, str, list[Any]], Awaitable[None]],
        commit: Callable[[int], Awaitable[None]],
        first: int = 0,
    ) -> None:
        self._marks: dict[Hashable, int] = dict.fromkeys(producers, first)
        self._emit = emit
        self._commit = commit
        self._held: dict[int, collections.deque[tuple[str, str, list[Any]]]] = {}  # by the commit they wait for
        self.committed = first
        self._triggered = first
        self._passed = first  # the last barrier a producer passed
        self._advancing = asyncio.Lock()

    def sink(self, producer: Hashable) -> _GateSink:
        """The result sink of one producer."""
        return _GateSink(self, producer)

    async def emit(self, producer: Hashable, pe: str, port: str, items: list[Any]) -> None:
        epoch = self._marks.get(producer, self.committed)
        if epoch > self.committed:
            self._held.setdefault(epoch, collections.deque()).append((pe, port, items))
        else:
            await self._emit(pe, port, items)

    async def mark(self, producer: Hashable, n: int) -> None:
        if producer in self._marks:
            self._marks[producer] = n
            self._passed = max(self._passed, n)
        await self._advance()

    async def finish(self, producer: Hashable) -> None:
        self._marks.pop(producer, None)
        await self._advance()

    async def trigger(self, n: int) -> None:
        """Checkpoint ``n`` started: with no producer left, it commits at once."""
        self._triggered = n
        await self._advance()

    async def _advance(self) -> None:
        """Commit what every producer passed, each commit after the results held for the one before were handed on.

        One caller at a time: a second would commit ``n + 1`` while the first still hands on what ``n``
        released, and those results would follow commit ``n + 1`` in the file, where a restore from it
        truncates them. A held result leaves the gate only as it is handed on, so that a caller cancelled
        meanwhile (the coordinator, when the run ends) leaves the rest to the next one.
        """
        async with self._advancing:
            while True:
                for epoch in sorted(k for k in self._held if k <= self.committed):
                    released = self._held[epoch]
                    while released:
                        await self._emit(*released.popleft())
                    del self._held[epoch]
                low = min(self._marks.values()) if self._marks else max(self._triggered, self._passed)
                if self.committed >= low:
                    return
                await self._commit(self.committed + 1)
                self.committed += 1


class _GateSink:
    __slots__ = ("_gate", "_producer")

    def __init__(self, gate: ResultGate, producer: Hashable) -> None:
        self._gate = gate
        self._producer = producer

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        await self._gate.emit(self._producer, pe, port, items)


class ResultsLog:
    """The ``--results`` file of a checkpointed run, in front of the run's own sink.

    Opened at ``offset`` (the committed length of the restored checkpoint,
    described by ``checkpoint`` in messages: whatever follows is truncated)
    or, with no offset, empty (created if need be); :meth:`commit` flushes
    and syncs it and returns its length. A file that is not a regular one
    (``/dev/null``, a named pipe) is a stream: it has no length to commit or
    truncate, and cannot be synced; it is only flushed, and written from where
    it stands.

    Raises:
        CheckpointError: the file cannot be opened; or, with an offset, it is
            shorter than the offset, or it is missing and the offset is not 0
            (a missing file at offset 0 is created): the checkpoint's results
            are not all there, and nothing is written.
    """

    def __init__(
        self,
        path: str,
        sink: ResultSink,
        offset: int | None,
        checkpoint: str = "the checkpoint",
        tail: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self._sink = sink
        with writing("results", path, CheckpointError):
            self._out: TextIO = _open_results(path, offset, checkpoint, tail)
        self._regular = stat.S_ISREG(os.fstat(self._out.fileno()).st_mode)
        self.tail: dict[str, Any] | None = None
        """The last bytes committed (:meth:`commit`), as :attr:`Checkpoint.results_tail`."""

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        """Write ``items`` to the file, then hand them on.

        Raises:
            CheckpointError: the file cannot be written (a full disk, a named pipe whose reader left: named,
                with the reason).
        """
        with writing("results", self.path, CheckpointError), _reader_gone(self.path):
            self._out.write("".join(record_line(ResultRecord(pe, port, item)) for item in items))
        await self._sink.emit(pe, port, items)

    def commit(self) -> int | None:
        """Flush and sync the file; its length (``None`` for a stream, which has none).

        Raises:
            CheckpointError: it cannot be written (named, with the system's reason).
        """
        with writing("results", self.path, CheckpointError), _reader_gone(self.path):
            self._out.flush()
            if not self._regular:
                return None
            os.fsync(self._out.fileno())
            length = self._out.tell()
            size = min(length, RESULTS_TAIL)
            self.tail = {"size": size, "sha256": _digest(os.pread(self._out.fileno(), size, length - size))}
        return length

    def rewind(self, offset: int | None) -> None:
        """Cut the file back to ``offset``, the length a checkpoint committed (a stream, or ``None``: nothing to
        cut): the run stopped at that checkpoint, and what it wrote after it is written again when the checkpoint
        is restored.

        Raises:
            CheckpointError: the file cannot be cut (named, with the system's reason).
        """
        if offset is None or not self._regular:
            return
        with writing("results", self.path, CheckpointError):
            self._out.flush()
            os.ftruncate(self._out.fileno(), offset)
            os.fsync(self._out.fileno())

    def close(self) -> None:
        """Close the file, without raising: a run that ends has committed every result already (:meth:`commit`
        raises what fails), and a run that failed raises its own failure, not that of flushing what no
        checkpoint commits (a restore truncates it)."""
        with contextlib.suppress(OSError):
            self._out.close()


@contextlib.contextmanager
def _reader_gone(path: str) -> Iterator[None]:
    """A ``BrokenPipeError`` (a named pipe whose reader left) as a :class:`CheckpointError` naming ``path``:
    the results are lost, and no PE is to blame."""
    try:
        yield
    except BrokenPipeError:
        raise reader_went_away("results", path, CheckpointError) from None


class _Commits(Generic[T]):
    """What a run under ``--restarts`` (or with ``results_counted``) holds (results, or their numbers), by the
    checkpoint that commits it."""

    def __init__(self) -> None:
        self._open: list[T] = []  # emitted since the last seal
        self._sealed: collections.deque[tuple[int, list[T]]] = collections.deque()

    def hold(self, held: T) -> None:
        """Hold ``held`` under the next checkpoint sealed."""
        self._open.append(held)

    def seal(self, n: int) -> None:
        """Checkpoint ``n`` commits everything held so far."""
        self._sealed.append((n, self._open))
        self._open = []

    def complete(self, n: int) -> list[T]:
        """Checkpoint ``n`` is complete: take what it (and any earlier one) commits, in order."""
        committed: list[T] = []
        while self._sealed and self._sealed[0][0] <= n:
            committed += self._sealed.popleft()[1]
        return committed

    def release(self) -> list[T]:
        """The run is over: take everything held, in order."""
        held = [entry for _, entries in self._sealed for entry in entries] + self._open
        self.discard()
        return held

    def discard(self) -> None:
        """A restart or a suspend: drop everything held."""
        self._sealed.clear()
        self._open = []


class HeldResults:
    """The run's results sink under ``--restarts``: each result is handed on once a checkpoint that
    commits it has completed, so that a restart, which produces again what followed the checkpoint it
    resumes from, never hands a result on twice.

    The results emitted until checkpoint ``n`` commits them (:meth:`seal`) wait for ``n`` to complete
    (:meth:`complete`); :meth:`deliver`, a task of its own, hands them on in order. :meth:`emit` waits
    while more than ``backlog`` results, or more than ``max_bytes`` of them
    (:func:`~aiod4p._sizes.approximate_batch_size`), are ready for a slow ``sink`` (back-pressure), never on a
    checkpoint. At a restart, :meth:`discard` drops those no complete checkpoint commits; when the run
    is over, :meth:`finish` hands on all the others.
    """

    def __init__(self, sink: ResultSink, backlog: int, max_bytes: int) -> None:
        self._sink = sink
        self._backlog = backlog
        self._max_bytes = max_bytes
        self._commits: _Commits[tuple[str, str, list[Any]]] = _Commits()
        self._ready: collections.deque[tuple[str, str, list[Any], int]] = collections.deque()  # and their bytes
        self._waiting = 0  # the items in ``_ready``
        self._waiting_bytes = 0  # and their bytes
        self._room = asyncio.Event()
        self._room.set()
        self._filled = asyncio.Event()
        self._emptied = asyncio.Event()
        self._emptied.set()
        self._failure: Exception | None = None

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        """Hold ``items`` (under the checkpoint that commits what is emitted now), then wait while the reader
        is behind; raises what the sink raised, once it did."""
        if self._failure is not None:
            raise self._failure
        self._commits.hold((pe, port, items))
        await self._room.wait()

    def seal(self, n: int) -> None:
        """Checkpoint ``n`` commits every result emitted so far."""
        self._commits.seal(n)

    def complete(self, n: int) -> None:
        """Checkpoint ``n`` is complete: what it commits is ready."""
        self._make_ready(self._commits.complete(n))

    async def finish(self) -> None:
        """The run is over: hand every result held on (the run will not produce them again), and wait until
        :meth:`deliver` did; raises what the sink raised, if it did."""
        if self._failure is not None:
            raise self._failure
        self._make_ready(self._commits.release())
        await self._emptied.wait()
        if self._failure is not None:
            raise self._failure

    def behind(self) -> int:
        """The results ready that the reader has not taken yet while they are more than the backlog, in number or in
        bytes (the run waits for the reader meanwhile, and so does every checkpoint: its sources' barriers wait
        behind what they write); 0 while the run does not wait for it."""
        return 0 if self._room.is_set() else self._waiting

    def discard(self) -> None:
        """A restart or a suspend: drop what no complete checkpoint commits (the restarted or restored run produces it
        again)."""
        self._commits.discard()

    async def deliver(self) -> None:
        """Hand the ready results on, in order; runs until cancelled, or until the sink raises (the
        failure is raised by the next :meth:`emit` and by :meth:`finish`)."""
        while True:
            await self._filled.wait()
            pe, port, items, nbytes = self._ready[0]
            try:
                await self._sink.emit(pe, port, items)
            except Exception as exc:
                self._failure = exc
                self._room.set()
                self._emptied.set()
                return
            self._ready.popleft()
            self._waiting -= len(items)
            self._waiting_bytes -= nbytes
            if not self._behind():
                self._room.set()
            if not self._ready:
                self._filled.clear()
                self._emptied.set()

    def _make_ready(self, batches: list[tuple[str, str, list[Any]]]) -> None:
        if batches and self._failure is None:  # else no reader takes them: emit raises instead of waiting
            for pe, port, items in batches:
                nbytes = approximate_batch_size(items)
                self._ready.append((pe, port, items, nbytes))
                self._waiting += len(items)
                self._waiting_bytes += nbytes
            self._filled.set()
            self._emptied.clear()
            if self._behind():
                self._room.clear()

    def _behind(self) -> bool:
        """Whether more results are ready than the reader may be behind by, in number or in bytes."""
        return self._waiting > self._backlog or self._waiting_bytes > self._max_bytes


class HeldCounts:
    """:class:`HeldResults` for a run whose results go to its file alone (:attr:`Checkpointing.results_counted`):
    it holds the number of the results a checkpoint commits, not the results, and calls ``counted`` with it once
    the checkpoint is complete; there is no reader to wait for."""

    def __init__(self, counted: Callable[[int], None]) -> None:
        self._counted = counted
        self._commits: _Commits[int] = _Commits()

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        self._commits.hold(len(items))

    def seal(self, n: int) -> None:
        """Checkpoint ``n`` commits every result emitted so far."""
        self._commits.seal(n)

    def complete(self, n: int) -> None:
        """Checkpoint ``n`` is complete: what it commits is counted."""
        if committed := self._commits.complete(n):
            self._counted(sum(committed))

    async def finish(self) -> None:
        """The run is over: count every result held (the run will not produce them again)."""
        self._counted(sum(self._commits.release()))

    def behind(self) -> int:
        """0: no reader is behind."""
        return 0

    def discard(self) -> None:
        """A restart or a suspend: drop what no complete checkpoint commits (the restarted or restored run produces it
        again)."""
        self._commits.discard()

    async def deliver(self) -> None:
        """Nothing to deliver: :meth:`complete` counts."""


class Held(Protocol):
    """What a run under ``--restarts`` (or with ``results_counted``) holds until checkpoints commit it:
    :class:`HeldResults` or :class:`HeldCounts`."""

    async def emit(self, pe: str, port: str, items: list[Any]) -> None: ...
    def seal(self, n: int) -> None: ...
    def complete(self, n: int) -> None: ...
    async def finish(self) -> None: ...
    def behind(self) -> int: ...
    def discard(self) -> None: ...
    async def deliver(self) -> None: ...


RESULTS_TAIL = 4096
"""The last bytes of the results file a checkpoint records the digest of: a restore checks them there."""


def _open_results(path: str, offset: int | None, checkpoint: str, tail: Mapping[str, Any] | None = None) -> TextIO:
    """``path`` open for writing (and reading) at ``offset`` (truncated there), or empty with no offset; a file that
    is not a regular one (a stream: see :class:`ResultsLog`) is open for writing only, from where it stands.

    Nothing is written before the file is known to hold the ``offset`` bytes committed, ending with ``tail``
    (:attr:`Checkpoint.results_tail`) when given.

    Raises:
        CheckpointError: the file is shorter than ``offset``, or does not end there with ``tail`` (another file, or
            rewritten since), or is missing while ``offset`` is not 0.
        OSError: it cannot be opened.
    """
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        return open(path, "w", encoding="utf-8")  # a stream (/dev/null, a named pipe): nothing to truncate
    if offset is None:
        return open(path, "w+", encoding="utf-8")
    try:
        out = open(path, "r+", encoding="utf-8")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        if offset:
            raise CheckpointError(
                f"the results file of the checkpointed run is missing: {path} ({checkpoint} committed"
                f" {offset} bytes of it); nothing was written (put the file back, or start the run afresh,"
                " without --restore)"
            ) from None
        return open(path, "w+", encoding="utf-8")  # nothing was committed: a new file
    try:
        size = os.fstat(out.fileno()).st_size
        if size < offset:
            raise CheckpointError(
                f"the results file {path} is {size} bytes, shorter than the {offset} bytes {checkpoint}"
                " committed: it was truncated or replaced since; nothing was written (put the whole file back,"
                " or start the run afresh, without --restore)"
            )
        if tail is not None and _digest(os.pread(out.fileno(), tail["size"], offset - tail["size"])) != tail["sha256"]:
            raise CheckpointError(
                f"the results file {path} does not end, at the {offset} bytes {checkpoint} committed, with what it"
                " committed: it is another run's, or it was rewritten since; nothing was written (give the results"
                " file of the checkpointed run, or start the run afresh, without --restore)"
            )
        out.truncate(offset)
        out.seek(offset)
    except BaseException:
        out.close()
        raise
    return out


# -- the coordinator ------------------------------------------------------------------------
class Suspended(Exception):
    """A run stopped at checkpoint ``checkpoint``, as asked (:meth:`Coordinator.suspend`): what followed it is made
    again when the checkpoint is restored. Not a failure: the run's caller hears of it as a run that ended
    (:attr:`aiod4p.WorkflowRun.suspended`).

    Attributes:
        checkpoint: the id of the checkpoint that ``restore`` resumes.
        results_offset: the length of the ``--results`` file that checkpoint committed (``None``: none).
    """

    def __init__(self, checkpoint: int, results_offset: int | None) -> None:
        super().__init__(f"suspended at checkpoint {checkpoint}")
        self.checkpoint = checkpoint
        self.results_offset = results_offset


class RunRequests(Protocol):
    """What a run's caller asks of a checkpointed run while it goes (:class:`~aiod4p.mappings.RunControl`)."""

    @property
    def draining(self) -> bool:
        """Whether the run drains."""

    @property
    def suspending(self) -> bool:
        """Whether the run is to stop at a checkpoint taken now."""

    def on_suspend(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when suspending is requested (at once if it already was); returns what stops that."""


class Coordinator:
    """Triggers checkpoints one at a time and completes them.

    Args:
        store: where checkpoints go.
        plan: the plan run; every instance must report its state.
        interval: seconds between a checkpoint's completion and the next trigger.
        first: the id of the checkpoint the run started from (0: none).
        results: the results file, committed with every checkpoint, if any.
        held: the results held until a checkpoint commits them (with ``--restarts``), if any.
        stall: seconds after a trigger before a checkpoint not complete is reported (a warning naming what it
            waits for), then at doubled delays; by default :data:`STALL_SECONDS` or 10 intervals, the longer.
    """

    def __init__(
        self,
        store: CheckpointStore,
        plan: ExecutionPlan,
        interval: float,
        first: int,
        results: ResultsLog | None,
        held: Held | None = None,
        stall: float | None = None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.interval = interval
        self.stall = stall if stall is not None else max(STALL_SECONDS, 10 * interval)
        self.results = results
        self.held = held
        self.expected = {(ref.pe, ref.index) for ref in plan.instances()}
        self.next_id = max([first, *store.ids()]) + 1
        self.first_of_run = self.next_id
        self._parts: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}
        self._offsets: dict[int, int | None] = {}
        self._tails: dict[int, dict[str, Any] | None] = {}
        self._started: dict[int, float] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._stall_timer: asyncio.TimerHandle | None = None
        self._suspending = False
        self._hurry = asyncio.Event()  # set from a suspend request until a checkpoint stops the run, or comes too late
        self._suspended: Suspended | None = None

    async def drive(self, trigger: Callable[[int], Awaitable[None]]) -> None:
        """Trigger a checkpoint every ``interval`` seconds after the previous one completed, at once when the run
        is to be suspended (:meth:`suspend`); runs until cancelled.

        Raises:
            Suspended: a checkpoint completed once the run was to be suspended: the run stops at it.
        """
        try:
            while True:
                await self._idle.wait()
                if self._suspended is not None:
                    raise self._suspended
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await self._hurry.wait()
                self._idle.clear()
                n = self.take_id()
                self._stall_timer = asyncio.get_running_loop().call_later(self.stall, self._report_stall, n, self.stall)
                await trigger(n)
        finally:
            if self._stall_timer is not None:
                self._stall_timer.cancel()

    def _report_stall(self, n: int, after: float) -> None:
        """Warn if checkpoint ``n`` has not completed ``after`` seconds after its trigger, naming what it waits for;
        then check again after twice as long (until :meth:`drive` ends)."""
        if n not in self._started:
            return  # complete
        self._stall_timer = asyncio.get_running_loop().call_later(2 * after, self._report_stall, n, 2 * after)
        missing = sorted(self.expected - self._parts.get(n, {}).keys())
        waits = []
        if missing:
            named = ", ".join(f"PE {pe} instance {index}" for pe, index in missing[:STALL_NAMED])
            more = len(missing) - STALL_NAMED
            waits.append(f"no state yet from {named}" + (f" and {more} more instances" if more > 0 else ""))
        if n not in self._offsets:
            waits.append("results not committed yet")
        behind = self.held.behind() if self.held is not None else 0
        logger.warning(
            "checkpoint %d has not completed in %.1f s: %s (%s)",
            n,
            time.perf_counter() - self._started[n],
            "; ".join(waits),
            f"{behind} results of complete checkpoints wait for their reader, which is behind: the workflow waits"
            " for it, and every checkpoint with it"
            if behind
            else "a worker or PE that hangs holds every checkpoint back",
        )

    def suspend(self) -> None:
        """Suspend the run: take a checkpoint now (or let the one under way complete), and stop the run at it
        (:meth:`drive` raises :class:`Suspended`), unless every instance has finished by then: the run then ends as
        any run does. Idempotent."""
        self._suspending = True
        self._hurry.set()

    def take_id(self) -> int:
        """The id of the next checkpoint, taken now."""
        n = self.next_id
        self.next_id += 1
        self._started[n] = time.perf_counter()
        return n

    def add_parts(self, n: int, parts: Iterable[dict[str, Any]]) -> None:
        """Record instances' saved state for checkpoint ``n``."""
        table = self._parts.setdefault(n, {})
        for part in parts:
            table[(part["pe"], part["index"])] = part
        self._maybe_complete(n)

    async def commit_results(self, n: int) -> None:
        """Every result written before barrier ``n`` has been delivered: commit them with ``n``."""
        self._offsets[n] = self.results.commit() if self.results is not None else None
        self._tails[n] = self.results.tail if self.results is not None else None
        if self.held is not None:
            self.held.seal(n)
        self._maybe_complete(n)

    def _maybe_complete(self, n: int) -> None:
        parts = self._parts.get(n, {})
        if n not in self._offsets or parts.keys() < self.expected:
            return
        offset = self._offsets[n]
        manifest = {
            "version": FORMAT,
            "aiod4p": __version__,  # for the message of an aiod4p that cannot read the format
            "id": n,
            "created": time.time(),
            "parallelism": {pe: placement.parallelism for pe, placement in self.plan.placement.items()},
            "edges": _edges(self.plan),
            "groupings": _groupings_of_edges(self.plan),
            "parts": sorted(parts.values(), key=lambda part: (part["pe"], part["index"])),
            "results_offset": offset,
            "results_tail": self._tails[n],
        }
        # In the loop, not in a thread: on the async mapping this loop runs the workflow too, and a thread then
        # waited for the interpreter's lock for seconds (measured) while the run kept it busy.
        self.store.commit(n, manifest)
        del self._parts[n], self._offsets[n], self._tails[n]
        if self.held is not None:
            self.held.complete(n)
        seconds = time.perf_counter() - self._started.pop(n, time.perf_counter())
        size = sum(part["size"] for part in parts.values())
        logger.info("checkpoint %d complete in %.3f s, %d bytes", n, seconds, size)
        if self._suspending and self._suspended is None:
            if all(part.get("finished") for part in parts.values()):
                self._hurry.clear()  # every instance ran its postprocess: too late, the run ends by itself
            else:
                self._suspended = Suspended(n, offset)
        self._idle.set()


# -- the worker side ---------------------------------------------------------------------
class Aligner:
    """One instance's side of checkpoints: barrier alignment, snapshots, restore."""

    def __init__(self, actor: _Actor, runtime: WorkerCheckpoints, first: int) -> None:
        self.actor = actor
        self.runtime = runtime
        self.blocked: set[Any] = set()
        self.stash: list[Message] = []
        self.current = 0  # the checkpoint being aligned (0: none)
        self.done = first  # the last checkpoint snapshotted
        self.due = first  # the last checkpoint triggered (sources)
        self.base = 0  # feed elements consumed before the restored checkpoint
        self.resume_outputs = 0  # outputs of the interrupted call already delivered
        self.in_call = False
        self.waiting: ReadAhead | None = None  # a root's source while it has nothing ready
        self.calls = 0  # calls completed in this run (roots whose calls checkpoints are taken within)
        self.outputs = 0  # outputs of the current call
        # A root whose calls are plain (a generator, or a call that writes): checkpoints may be taken within the
        # calls of a batch (:meth:`within`), as they hand on what they wrote, saving the PE's state as the batch
        # found it (call_state) and what its calls delivered on each port; a restore makes those calls again from
        # that state and drops what they had delivered (the actor's ``delivered``).
        self.within_calls = actor.is_root and calls_take_turns(actor.pe) and not actor.traced
        self.call_state: dict[str, Any] | None = None
        self.restoring: dict[str, Any] | None = None
        self.slots: dict[Any, int] = {}  # the key group of every keyed-state key (:func:`capture`)

    # -- alignment -------------------------------------------------------------
    async def intercept(self, message: Message, remaining: int) -> bool:
        """Whether the run loop must skip ``message``: a barrier, or a message of a blocked channel."""
        source, _, items = message
        if self.blocked and source in self.blocked:
            self.stash.append(message)
            return True
        if items.__class__ is not Barrier:
            return False
        if items.id > self.done:
            self.current = items.id
            self.blocked.add(source)
            await self.check(remaining)
        return True

    async def check(self, remaining: int) -> None:
        """Snapshot once every open input channel delivered the barrier; then unblock them."""
        if self.current and len(self.blocked) >= remaining:
            await self.snapshot(self.current)
            self.current = 0
            self.blocked.clear()
            stash, self.stash = self.stash, []
            self.actor.inbox.requeue(stash)

    # -- sources -----------------------------------------------------------------
    def call_started(self, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A root's async generator call starts; after a restore, it resumes where the checkpoint left it."""
        self.in_call = True
        skip, self.resume_outputs = self.resume_outputs, 0
        self.outputs = skip
        if not skip or not replayable(self.actor.pe):  # a live stream goes on from where it stands: nothing dropped
            return source
        seek = getattr(self.actor.pe, "seek", None)
        if callable(seek):
            seek(skip)
            return source
        return _dropping(source, skip)

    def within(self, calls: int) -> bool:
        """Whether checkpoints are taken within the ``calls`` of the batch a root whose calls are plain is about
        to make: where they may take long, so that a checkpoint would wait for them (the batch's copy of the
        PE's state, :meth:`calls_begin`, costs a pickling of it): the first batch, whose pace is unknown (a
        source's one endless call), a batch whose calls take the checkpoint interval or more at the pace
        measured so far; and while a restored root has outputs to drop."""
        if not self.within_calls:
            return False
        actor = self.actor
        pace = actor.pace
        return pace is None or pace * calls >= self.runtime.interval or bool(actor.delivered)

    def calls_begin(self) -> None:
        """The calls of a batch that checkpoints are taken within (:meth:`within`) begin: the PE's state as they
        find it is kept (a copy: the calls may change it)."""
        actor = self.actor
        self.in_call = True
        self.call_state = pickle.loads(_pickled(actor.ref, capture(actor.pe, None, self.slots)))
        actor.call_outputs = {}

    async def within_call(self) -> None:
        """The calls of a root that takes checkpoints within them routed what they wrote so far: a due
        checkpoint is taken here."""
        if self.due > self.done:
            await self.snapshot(self.due)

    def calls_ended(self, calls: int) -> None:
        """The ``calls`` of the batch begun by :meth:`calls_begin` ended, and what they wrote was routed."""
        self.call_ended(calls)
        self.call_state = self.actor.call_outputs = None

    async def pumped(self, count: int) -> None:
        """``count`` outputs of the current call were routed; a due checkpoint is taken here."""
        self.outputs += count
        if self.due > self.done:
            await self.snapshot(self.due)

    async def idle(self, source: ReadAhead) -> None:
        """Wait until ``source`` has items ready, taking the checkpoints triggered meanwhile.

        A live source may have nothing to say for hours; its checkpoints (and the results they
        commit) must not wait for its next item.
        """
        self.waiting = source
        try:
            while True:
                if self.due > self.done:
                    await self.snapshot(self.due)
                    continue  # a trigger may have come during the snapshot: wait() would miss its interrupt
                if source.ready():
                    return
                await source.wait()
        finally:
            self.waiting = None

    def call_ended(self, calls: int = 1) -> None:
        self.in_call = False
        self.calls += calls
        self.outputs = 0

    # -- snapshots -------------------------------------------------------------
    def _state(self, finished: bool) -> dict[str, Any]:
        """Where the instance stands: its PE's state and, for a root, its position in its input.

        A root's position is the feed elements it consumed and the outputs of
        the call under way; a restored root whose interrupted call has not
        resumed yet still stands where the restored checkpoint left it
        (``resume_outputs``), or a checkpoint taken before the call resumes
        would replay what that call had already delivered.
        """
        actor = self.actor
        consumed = self.calls if self.in_call else int(actor.stats.done("items_in"))
        counters = actor.stats.counters()
        if actor.is_root:  # a restore takes the element of an interrupted call again: it counts it then
            counters["items_in"] = self.base + consumed
            if self.in_call:  # and the batch of that element
                counters["batches_in"] -= 1
        state = self.call_state
        # Delivered since the feed position: what the batch's calls made so far, and what a restored checkpoint's
        # calls had delivered that they have not made again yet (a checkpoint before they did keeps it).
        ports = dict(actor.delivered)
        for port, count in (actor.call_outputs or {}).items():
            ports[port] = ports.get(port, 0) + count
        return {
            "pe": capture(actor.pe, self.runtime.grouping(actor.ref.pe), self.slots) if state is None else state,
            "feed": self.base + consumed if actor.is_root else 0,
            "outputs": self.outputs if self.in_call else self.resume_outputs,
            "port_outputs": ports,
            "finished": finished,
            "stats": counters,
        }

    async def snapshot(self, n: int) -> None:
        """Flush what was written, capture the state, forward the barriers, then write the state for every
        checkpoint up to ``n`` (the barriers need not wait for the disk)."""
        actor = self.actor
        await actor._route_outputs()
        await actor._flush_all()
        ids = range(self.done + 1, n + 1)
        data = _pickled(actor.ref, self._state(False))
        for k in ids:
            for channel in actor.outgoing:
                channel.mark(Barrier(k))
        self.done = n
        if actor.results:
            await self.runtime.gate.mark(actor.ref, n)
        await self.runtime.save(actor.ref, ids, data)

    async def finished(self) -> None:
        """The instance ended: its final state stands for every later checkpoint."""
        await self.runtime.finish(self, self._state(True))
        if self.actor.results:
            await self.runtime.gate.finish(self.actor.ref)

    def restore(self) -> bool:
        """Restore the PE's state (after ``preprocess``, whose outputs are dropped); whether it had finished."""
        own = self.restoring
        if own is None:
            return False
        actor = self.actor
        for buffer in actor.buffers.values():
            buffer.clear()
        everyone = self.runtime.restored_states(actor.ref.pe)
        plan = actor.worker.plan
        restore_state(
            actor.pe,
            own["pe"],
            everyone,
            self.runtime.grouping(actor.ref.pe),
            actor.ref.index,
            plan.placement[actor.ref.pe].parallelism,
        )
        self.restoring = None
        return bool(own["finished"])


class WorkerCheckpoints:
    """The checkpoints of one engine worker: attaches an :class:`Aligner` to every instance.

    Args:
        worker: the engine worker, not yet running.
        store: where instance states are written.
        restored: the checkpoint to resume from, if any.
        first: the id before the first checkpoint this run triggers.
        report: called with ``(n, parts)`` once every local instance saved its state for ``n``.
        gate: where result-writing instances deliver (their results pass it).
        interval: the run's :attr:`Checkpointing.interval`.
        attempt: the attempt of the run (:attr:`Session.attempt`), which the instances' statistics record.
    """

    def __init__(
        self,
        worker: Worker,
        store: CheckpointStore,
        restored: Checkpoint | None,
        first: int,
        report: Callable[[int, list[dict[str, Any]]], Awaitable[None] | None],
        gate: ResultGate,
        *,
        interval: float,
        attempt: int = 0,
    ) -> None:
        self.worker = worker
        self.interval = interval
        self.store = store
        self.restored = restored
        self.report = report
        self.gate = gate
        self.triggered = first
        self.on_all_finished: Callable[[list[FinalState]], Awaitable[None]] | None = None
        self._parts: dict[int, list[dict[str, Any]]] = {}
        self._final: dict[InstanceRef, tuple[Aligner, bytes]] = {}
        self._saving = 0  # saves under way
        self._reported = asyncio.Event()  # set while no save is under way and every part saved was reported
        self._reported.set()
        self._groupings = _groupings(worker.plan)
        for ref, actor in worker.actors.items():
            aligner = Aligner(actor, self, first)
            actor.stats.attempt = attempt
            if restored is not None:
                own = _own_state(restored, worker.plan, ref)
                aligner.restoring = own
                aligner.base = own["feed"]
                aligner.resume_outputs = own["outputs"]
                if replayable(actor.pe):  # else a live stream goes on from where it stands: nothing dropped
                    actor.delivered = own.get("port_outputs", {})
                if actor.recorder is not None:
                    actor.recorder.record.restored = restored.id
                    actor.recorder.fed = aligner.base
                    if own["finished"]:  # it does not run again: its record, of nothing done, is its final one
                        actor.stats.provenance = actor.recorder.part()
                actor.stats.carry(_carried_stats(restored, worker.plan, ref))
            actor.aligner = aligner
            if actor.results:
                actor.results_sink = gate.sink(ref)
        worker.checkpoints = self

    def grouping(self, pe: str) -> GroupBy | None:
        return self._groupings.get(pe)

    def restored_states(self, pe: str) -> list[dict[str, Any]]:
        assert self.restored is not None
        return [state["pe"] for ref, state in self.restored.states.items() if ref.pe == pe]

    def resumed_feed(self, ref: InstanceRef, feed: Feed) -> Feed:
        """The feed of root instance ``ref`` without what the restored checkpoint had consumed. A feed that goes
        on from where it stands (neither :func:`replayable_feed` nor ``replayed``: a launcher's pumped feed says
        whether it resumed it) gives new elements, not those of the restored checkpoint's interrupted calls:
        nothing of their outputs is dropped."""
        actor = self.worker.actors[ref]
        assert actor.aligner is not None
        if not (replayable_feed(feed) or getattr(feed, "replayed", False)):
            actor.delivered = {}
        return resumed_feed(feed, actor.aligner.base)

    async def trigger(self, n: int) -> None:
        """Start checkpoint ``n`` here: sources snapshot at their next safe point; finished instances report."""
        self.triggered = n
        for ref, actor in self.worker.actors.items():
            aligner = actor.aligner
            assert aligner is not None
            if ref in self._final:
                await self._save_final(ref)
            elif actor.is_root:
                aligner.due = n
                if aligner.waiting is not None:
                    aligner.waiting.interrupt()
                channel = self.worker._feed_channels.get(ref)
                if channel is not None:
                    channel.mark(Barrier(n))
        await self.gate.trigger(n)

    async def save(self, ref: InstanceRef, ids: Iterable[int], data: bytes, finished: bool = False) -> None:
        """Write ``data``, the saved state of instance ``ref`` (its final one, ``finished``), as its part of every
        checkpoint in ``ids``.

        The files are written and synced in a thread: the disk's sync (milliseconds) must not stall the
        worker's other instances, which go on with the stream meanwhile.
        """
        self._saving += 1
        self._reported.clear()
        try:
            for n in ids:
                await self._add(n, await finished_in_thread(self.store.write_part, n, ref, data, finished))
        finally:
            self._saving -= 1
            self._settle()

    async def started(self) -> None:
        """The worker starts: one with no instance has finished them all, and says so at once (its launcher's
        results gate would otherwise wait for it for ever, once it ended before a checkpoint reached it)."""
        if self.on_all_finished is not None and not self.worker.actors:
            await self.on_all_finished([])

    async def finish(self, aligner: Aligner, state: dict[str, Any]) -> None:
        ref = aligner.actor.ref
        self._final[ref] = (aligner, _pickled(ref, state))
        await self._save_final(ref)
        if self.on_all_finished is not None and len(self._final) == len(self.worker.actors):
            # The finals say which checkpoints each instance saved: those parts must have been reported first.
            await self._reported.wait()
            await self.on_all_finished([(ref, data, aligner.done) for ref, (aligner, data) in self._final.items()])

    async def final_checkpoint(self, coordinator: Coordinator) -> None:
        """Once every instance here finished (the run ended, or was drained): a last checkpoint of their
        final states, committing every result, so that restoring the run resumes nothing."""
        n = coordinator.take_id()
        store = self.store
        coordinator.add_parts(
            n, await finished_in_thread(store.write_finals, n, [(ref, data) for ref, (_, data) in self._final.items()])
        )
        await coordinator.commit_results(n)

    async def _save_final(self, ref: InstanceRef) -> None:
        aligner, data = self._final[ref]
        ids = range(aligner.done + 1, self.triggered + 1)
        aligner.done = self.triggered
        await self.save(ref, ids, data, finished=True)

    async def _add(self, n: int, part: dict[str, Any]) -> None:
        parts = self._parts.setdefault(n, [])
        parts.append(part)
        if len(parts) == len(self.worker.actors):
            del self._parts[n]
            reported = self.report(n, parts)
            if reported is not None:
                await reported

    def _settle(self) -> None:
        if self._saving or self._parts:
            self._reported.clear()
        else:
            self._reported.set()


def _pickled(ref: InstanceRef, state: dict[str, Any]) -> bytes:
    try:
        return pickle.dumps(state, protocol=5)
    except Exception as exc:
        raise CheckpointError(
            f"the state of PE {ref} cannot be saved: {type(exc).__name__}: {exc}"
            " (give the PE snapshot()/restore(state), or keep such attributes out of it)"
        ) from exc


def _groupings(plan: ExecutionPlan) -> dict[str, GroupBy]:
    found: dict[str, GroupBy] = {}
    for routes in plan.routes.values():
        for route in routes:
            if isinstance(route.grouping, GroupBy):
                found[route.dest] = route.grouping
    return found


def _own_state(checkpoint: Checkpoint, plan: ExecutionPlan, ref: InstanceRef) -> dict[str, Any]:
    """The saved state instance ``ref`` resumes from (parallelism may have changed)."""
    old = checkpoint.parallelism(ref.pe)
    new = plan.placement[ref.pe].parallelism
    if old != new:
        if plan.placement[ref.pe].is_root:
            had = f"{old} instance{'s' if old > 1 else ''}"
            raise CheckpointError(
                f"root PE {ref.pe} had {had} in checkpoint {checkpoint.id}, now {new}: a source's position in its input"
                f" cannot be shared out among another number of instances (restore it with {had})"
            )
        finished = [checkpoint.states[InstanceRef(ref.pe, i)]["finished"] for i in range(old)]
        if any(finished) and not all(finished):
            raise CheckpointError(
                f"PE {ref.pe} had some instances finished in checkpoint {checkpoint.id}: restore it with the same -n"
            )
    return checkpoint.states[InstanceRef(ref.pe, ref.index % old)]


def _carried_stats(checkpoint: Checkpoint, plan: ExecutionPlan, ref: InstanceRef) -> dict[str, float]:
    """The statistics counters instance ``ref`` goes on from: those its PE's instances saved in ``checkpoint``,
    old instance ``j`` counted by new instance ``j % new`` (so each PE's totals stay whatever ``-n``)."""
    old = checkpoint.parallelism(ref.pe)
    new = plan.placement[ref.pe].parallelism
    carried: dict[str, float] = {}
    for j in range(ref.index, old, new):
        for name, value in checkpoint.states[InstanceRef(ref.pe, j)].get("stats", {}).items():
            carried[name] = carried.get(name, 0) + value
    return carried


def replayable(source: object) -> bool:
    """Whether a feed or root PE can be read again from the start: not if it says so (``replayable = False``:
    stdin, sockets). Such a source is never skipped on a restore, since skipping would drop new, live items."""
    return getattr(source, "replayable", True) is not False


def replayable_feed(feed: Feed) -> bool:
    """Whether a restore can skip what ``feed`` gave before: a count, a list, a tuple, a range, or a
    :func:`replayable` object with ``seek(offset)`` (the offset protocol)."""
    if isinstance(feed, (int, *HELD_FEEDS)):
        return True
    return callable(getattr(feed, "seek", None)) and replayable(feed)


def resumed_feed(feed: Feed, skip: int) -> Feed:
    """``feed`` without its first ``skip`` elements, if it is replayable.

    Replayable: counts, lists, tuples, ranges, and any object with a
    ``seek(offset)`` method (the offset protocol: after ``seek(n)`` it yields
    from its element ``n`` on) that is :func:`replayable`. Anything else is fed
    from where it stands: a stream with ``seek`` that cannot be replayed
    (stdin) is not sought, which would drop its next ``skip`` lines.
    """
    if not skip or not replayable_feed(feed):
        return feed
    if isinstance(feed, int):
        return max(feed - skip, 0)
    if isinstance(feed, HELD_FEEDS):
        return feed[skip:]
    feed.seek(skip)  # type: ignore[union-attr]
    return feed


def unreplayable(plan: ExecutionPlan, feeds: Mapping[str, Feed]) -> list[str]:
    """The root PEs whose input cannot be replayed after a restore (at-most-once for what was in flight)."""
    names = []
    for pe_id, pe in plan.pes.items():
        if not plan.placement[pe_id].is_root:
            continue
        if not replayable_feed(feeds.get(pe_id, 0)) or not replayable(pe):
            names.append(pe_id)
    return names


async def _dropping(source: AsyncIterator[Any], skip: int) -> AsyncIterator[Any]:
    async for item in source:
        if skip:
            skip -= 1
            continue
        yield item


# -- running with recovery -------------------------------------------------------------------
@dataclass
class Session:
    """One attempt of a checkpointed run: what a mapping needs to run it."""

    config: Checkpointing
    store: CheckpointStore
    restored: Checkpoint | None
    coordinator: Coordinator
    sink: ResultSink
    attempt: int = 0
    """0 for the run's first attempt, one more at each restart (the instances' statistics record it)."""

    @property
    def first(self) -> int:
        """The id before the first checkpoint this attempt triggers."""
        return self.coordinator.next_id - 1

    def gate(self, producers: Iterable[Hashable], emit: Callable[[str, str, list[Any]], Awaitable[None]]) -> ResultGate:
        """The top gate of the results: its commits complete checkpoints."""
        return ResultGate(producers, emit, self.coordinator.commit_results, self.first)

    def spec(self) -> WorkerSpec:
        """What worker processes need to take part (shipped with their job).

        The directory is made absolute here: a worker may run in another working directory (a Ray
        actor runs in the one its cluster was started in), and a relative one is the caller's.
        """
        restored = self.restored
        return WorkerSpec(
            str(self.store.directory.absolute()),
            self.store.keep,
            restored.id if restored else None,
            self.first,
            self.attempt,
            self.config.interval,
        )

    def resumed(self, pumped: list[tuple[str, int, Feed]]) -> list[tuple[str, int, Feed]]:
        """The ``(pe, worker, feed)`` feeds a launcher pumps, without what the restored checkpoint consumed.

        A pumped feed goes to its PE's instance 0; the worker that runs it
        cannot replay it, the launcher does (:func:`resumed_feed`).
        """
        if self.restored is None:
            return pumped
        states = self.restored.states
        return [(pe, wid, resumed_feed(feed, states[InstanceRef(pe, 0)]["feed"])) for pe, wid, feed in pumped]


STALL_SECONDS = 30.0
"""Seconds after which a checkpoint that has not completed is reported, at least (:class:`Coordinator`)."""

STALL_NAMED = 10
"""The most instances a warning of a checkpoint that has not completed names: the others are counted (a worker that
hangs holds back the state of every instance on it, and of those it feeds: thousands, in a large plan)."""

HELD_BACKLOG = 65_536
"""Results ready for a slow reader beyond which a run under ``--restarts`` waits for it (:class:`HeldResults`; and
beyond :attr:`~aiod4p.PlanOptions.result_bytes` of them)."""

RESTARTED = (WorkerDied, PeerDied)
"""Failures after which ``--restarts`` restarts a run (a PE's own error is not retried)."""


async def run_with_recovery(
    config: Checkpointing,
    plan: ExecutionPlan,
    feeds: Mapping[str, Feed],
    sink: ResultSink,
    attempt: Callable[[Session], Awaitable[list[InstanceStats]]],
    requests: RunRequests,
) -> list[InstanceStats]:
    """Run ``attempt`` with checkpoints; after a dead worker, restart it from the last checkpoint.

    Not once the run is draining (``requests``): the restored sources would stop where the checkpoint left them,
    and what the run had accepted after it would be lost. The run fails instead; ``--restore`` resumes it
    from that checkpoint. Nor once it is suspending: it stops at its newest complete checkpoint, if it has one.

    A run asked to suspend (``requests``) takes a checkpoint at once and stops at it: no PE's ``postprocess``
    runs, what followed the checkpoint is dropped from the ``--results`` file and from what is held (a restore
    makes it again), and the run is not recorded as ended, so that ``restore`` resumes it.

    With ``restarts``, ``sink`` gets each result once a checkpoint that commits it is complete
    (:class:`HeldResults`), and every result when the run ends, however it ends but cancelled: a restart
    produces again what followed its checkpoint, and ``sink`` still gets each result once. (The
    ``--results`` file is written at once, and truncated to the checkpoint by a restart.) With
    ``results_counted``, with or without ``restarts``, ``sink`` gets nothing: the file alone gets the results,
    and their numbers are counted the same way (:class:`HeldCounts`).

    The run holds the directory's lock (:meth:`CheckpointStore.locked`) from before its first attempt to
    the end of its last one: another run cannot use the directory meanwhile; its own restarts do.

    Raises:
        Suspended: the run stopped at a checkpoint, as asked.
        CheckpointError: ``restore`` found no complete checkpoint (or no directory), or one of another
            graph; another run uses the directory; the ``--results`` file does not hold what the restored
            checkpoint committed (:class:`ResultsLog`).
        WorkerDied: a worker died, ``restarts`` times already or while draining.
        MappingUnavailable: the workers of an attempt could not start (a restart's saying what resumes the run).
    """
    if config.restore and not os.path.lexists(config.directory):  # noqa: ASYNC240 - one stat, instant
        raise CheckpointError(f"--restore: no complete checkpoint in {config.directory}: the directory does not exist")
    if not config.restarts and config.results_counted is None:
        return await _attempts(config, plan, feeds, sink, attempt, requests, None)
    held: Held = (
        HeldResults(sink, HELD_BACKLOG, plan.options.result_bytes)
        if config.results_counted is None
        else HeldCounts(config.results_counted)
    )
    delivering = asyncio.create_task(held.deliver(), name="results of complete checkpoints")
    try:
        try:
            stats = await _attempts(config, plan, feeds, held, attempt, requests, held)
        except Suspended:
            held.discard()
            await held.finish()
            raise
        except Exception:
            # A failed run hands on what it produced, as its --results file holds it; its own failure is
            # what it raises, also when the reader failed too.
            with contextlib.suppress(Exception):
                await held.finish()
            raise
        await held.finish()
        return stats
    finally:
        delivering.cancel()
        await asyncio.wait({delivering})


async def _attempts(
    config: Checkpointing,
    plan: ExecutionPlan,
    feeds: Mapping[str, Feed],
    sink: ResultSink,
    attempt: Callable[[Session], Awaitable[list[InstanceStats]]],
    requests: RunRequests,
    held: Held | None,
) -> list[InstanceStats]:
    """The attempts of :func:`run_with_recovery`: results go to ``sink`` (``held`` when it is given)."""
    groupings = _groupings(plan)
    for pe_id, pe in plan.pes.items():  # before anything runs, not at the first checkpoint
        name = getattr(pe, "keyed_state", None)
        check_keyed_state(pe, groupings.get(pe_id), NOT_MADE if name is None else pe.__dict__.get(name, NOT_MADE))
    store = CheckpointStore(config.directory, config.keep)
    with store.locked():
        for pe_id in unreplayable(plan, feeds):
            logger.warning(
                "checkpoints: the input of PE %s cannot be replayed; after a restore, what it had in flight is lost",
                pe_id,
            )
        # An async iterator (an async generator) is read once: a restart's attempt would find it stopped
        # (cancelled while the dead attempt read it) and end its root early, dropping the rest silently.
        one_shot = [pe_id for pe_id, feed in feeds.items() if isinstance(feed, AsyncIterator)]
        if config.restarts and one_shot:
            logger.warning(
                "checkpoints: the input of PE %s is an async iterator, which a restart cannot read again: a dead"
                " worker fails the run (give a LiveFeed fed from it, or a source PE, to restart)",
                one_shot[0],
            )
        restore, restarts = config.restore, 0
        # A restore resumes the last fresh run, never an earlier one, whose results file that run started afresh.
        if config.restore:
            started_after = store.run_started_after()
        else:
            if (unfinished := store.unfinished_run()) is not None:
                logger.warning(
                    "%s is of a run that did not end (killed, failed, aborted or suspended), which --restore would"
                    " have resumed: this run starts afresh%s, and from now on --restore resumes this one",
                    unfinished[:1].upper() + unfinished[1:],
                    f" (its results file {config.results_path} emptied)" if config.results_path is not None else "",
                )
            started_after = store.start_run()
        since = started_after + 1
        while True:
            restored = store.latest(since) if restore else None
            if config.restore and restored is None and restarts == 0:
                _no_checkpoint_to_restore(store, since)
            if restored is not None:
                restored.check(plan)
                logger.warning("restoring checkpoint %d from %s", restored.id, store.directory)
                if restored.results_offset is not None and config.results_path is None:
                    logger.warning(
                        "checkpoint %d committed %d bytes of a results file, and this run writes none: the results"
                        " before it are in that file only, and what followed them there is not truncated (give"
                        " --results FILE to continue it exactly once)",
                        restored.id,
                        restored.results_offset,
                    )
                if restored.results_offset is None and config.results_path is not None:
                    _check_no_results_to_lose(restored, config.results_path)
            log = (
                ResultsLog(
                    config.results_path,
                    sink,
                    restored.results_offset if restored is not None else None,
                    f"checkpoint {restored.id} in {store.directory}" if restored is not None else "the checkpoint",
                    restored.results_tail if restored is not None else None,
                )
                if config.results_path is not None
                else None
            )
            coordinator = Coordinator(store, plan, config.interval, restored.id if restored else 0, log, held)
            forget_suspend = requests.on_suspend(coordinator.suspend)
            try:
                session = Session(config, store, restored, coordinator, log if log is not None else sink, restarts)
                stats = await attempt(session)
                store.end_run()
                return stats
            except Suspended as stop:
                if log is not None:
                    log.rewind(stop.results_offset)
                raise
            except MappingUnavailable as exc:
                if not restarts:
                    raise
                # The workers of a restart could not start (a node lost with the dead worker, its CPUs gone too).
                raise MappingUnavailable(
                    f"{exc}; restart {restarts} of {config.restarts} could not start its workers:"
                    f" {_resume_hint(store, since)}"
                ) from exc
            except RESTARTED as exc:
                if requests.suspending and (newest := store.latest(since)) is not None:
                    if log is not None:
                        log.rewind(newest.results_offset)
                    logger.warning("suspended at checkpoint %d after: %s", newest.id, str(exc))
                    raise Suspended(newest.id, newest.results_offset) from exc
                if restarts >= config.restarts:
                    if not isinstance(exc, WorkerDied):
                        raise
                    used = (
                        f"after {restarts} restart{'s' if restarts != 1 else ''} (--restarts {config.restarts})"
                        if restarts
                        else "not restarted (--restarts 0)"
                    )
                    raise WorkerDied(f"{exc}; {used}: {_resume_hint(store, since)}") from exc
                if requests.draining:
                    raise WorkerDied(
                        f"{exc}; not restarted, since the run was draining (a restart would stop its sources"
                        f" where the checkpoint left them, and lose what they had produced since):"
                        f" {_resume_hint(store, since)}"
                    ) from exc
                if one_shot:
                    raise WorkerDied(
                        f"{exc}; not restarted, since the input of PE {one_shot[0]} is an async iterator, which"
                        f" a restart cannot read again (give a LiveFeed fed from it, or a source PE):"
                        f" {_resume_hint(store, since)}"
                    ) from exc
                restarts += 1
                restore = True
                if held is not None:
                    held.discard()
                # Its text, not the error: a handler that keeps its records (pytest's) would keep the error's
                # traceback, and with it the frames of the attempt that ended, its workers' comms and buffers.
                logger.warning("restart %d of %d after: %s", restarts, config.restarts, str(exc))
            finally:
                forget_suspend()  # else the run's control keeps this attempt's coordinator through every restart
                if log is not None:
                    log.close()


def _check_no_results_to_lose(restored: Checkpoint, path: str) -> None:
    """Refuse to restore ``restored``, which committed no results file (its run wrote its results to stdout, or
    kept none), into the results file ``path`` if it is a regular file that holds something: with no committed
    length to truncate it to, it would be emptied, another run's results (or the checkpointed run's own, which
    went to stdout and were redirected there) with it.

    Raises:
        CheckpointError: ``path`` is a regular file that is not empty (named, with its size).
    """
    with contextlib.suppress(OSError):  # missing: made new; not a file: a stream, written from where it stands
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size:
            raise CheckpointError(
                f"the results file {path} holds {info.st_size} bytes, but {restored.label} committed none of a"
                " results file (its run wrote its results to stdout, or to none), so it has no length to continue"
                " it from: nothing was written (give --results a new or empty file, which gets what follows the"
                " checkpoint, or start the run afresh, without --restore)"
            )


def _no_checkpoint_to_restore(store: CheckpointStore, since: int) -> None:
    """Raise the error of a restore that finds no complete checkpoint of the last run (at least ``since``)."""
    # Its id only: unpickled (or its format checked), the checkpoint of an earlier run, of an older aiod4p or of
    # workflow code since changed, would fail this message with a reason that is not why nothing is restored.
    earlier = store._newest(0, store._read)
    if earlier is None:
        raise CheckpointError(f"--restore: no complete checkpoint in {store.directory}")
    raise CheckpointError(
        f"--restore: no complete checkpoint of the last run in {store.directory}, which started after checkpoint"
        f" {since - 1}: it was stopped before its first checkpoint completed; checkpoint {earlier[0]} is of an earlier"
        " run, which that run did not resume (it started afresh, and its results file too): start the run afresh,"
        " without --restore"
    )


def _resume_hint(store: CheckpointStore, since: int) -> str:
    """What resumes a run that failed, from its newest complete checkpoint (at least ``since``)."""
    newest = store.latest(since)
    if newest is None:
        return "no checkpoint had completed"
    return f"--restore resumes it from checkpoint {newest.id} in {store.directory}"


async def drive(session: Session, trigger: Callable[[int], Awaitable[None]], main: Awaitable[Any]) -> Any:
    """Await ``main`` while the session's coordinator triggers checkpoints through ``trigger``."""
    driver = asyncio.create_task(session.coordinator.drive(trigger), name="checkpoint coordinator")
    running = asyncio.ensure_future(main)
    try:
        await asyncio.wait({driver, running}, return_when=asyncio.FIRST_COMPLETED)
        if driver.done():
            driver.result()  # the coordinator failed (it runs until cancelled): so does the run
        return await running
    finally:
        for task in (driver, running):
            task.cancel()
        await asyncio.gather(driver, running, return_exceptions=True)


# -- on worker processes (the worker host, aiod4p.mappings._host) ------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to take checkpoints: shipped with its job."""

    directory: str
    """Absolute: a worker may run in another working directory than the caller's."""
    keep: int
    restored: int | None
    first: int
    attempt: int
    interval: float


@dataclass(frozen=True)
class Trigger:
    """Launcher -> worker: start checkpoint ``id``."""

    id: int


@dataclass(frozen=True)
class Saved:
    """Worker -> launcher: every instance of the worker saved its state for checkpoint ``id``."""

    id: int
    parts: list[dict[str, Any]]


@dataclass(frozen=True)
class Committed:
    """Worker -> launcher: every result the worker wrote before barrier ``id`` was sent before this."""

    id: int


FinalState = tuple[InstanceRef, bytes, int]
"""An instance that finished: its final state and the last checkpoint it saved a part for itself."""


@dataclass(frozen=True)
class Finals:
    """Worker -> launcher: every instance of the worker finished; their final states."""

    states: list[FinalState]


def attach_worker(worker: Worker, spec: WorkerSpec, control: Comm) -> WorkerCheckpoints:
    """Make engine ``worker`` (in a worker process) take checkpoints, reporting on ``control``.

    Raises:
        CheckpointError: the checkpoint to restore is gone or torn.
    """
    store = CheckpointStore(spec.directory, spec.keep)
    restored = None
    if spec.restored is not None:
        restored = store.load(spec.restored)
        if restored is None:
            raise CheckpointError(f"checkpoint {spec.restored} in {spec.directory} cannot be read by this worker")

    async def report(n: int, parts: list[dict[str, Any]]) -> None:
        await control.send(Saved(n, parts))

    async def commit(n: int) -> None:
        await control.send(Committed(n))

    async def finals(states: list[FinalState]) -> None:
        await control.send(Finals(states))

    producers = [ref for ref, actor in worker.actors.items() if actor.results]
    gate = ResultGate(producers, worker.results.emit, commit, spec.first)
    checkpoints = WorkerCheckpoints(
        worker, store, restored, spec.first, report, gate, interval=spec.interval, attempt=spec.attempt
    )
    checkpoints.on_all_finished = finals
    return checkpoints


def _stand_ins(states: list[FinalState], n: int) -> list[tuple[InstanceRef, bytes]]:
    """The final states that stand for checkpoint ``n`` in flight: those of the instances that saved no part
    for it themselves. An instance that did keeps that part (its snapshot at barrier ``n``, which its
    downstream's snapshots match), even though its worker finished before the trigger of ``n`` reached it."""
    return [(ref, data) for ref, data, saved in states if saved < n] if n else []


class HostCheckpoints(Protocol):
    """What a :class:`~aiod4p.mappings._host.Supervisor` calls when its run takes checkpoints."""

    async def drive(self) -> None: ...

    async def emit(self, wid: int, pe: str, port: str, items: list[Any]) -> None: ...

    async def receive(self, wid: int, message: Any) -> bool: ...

    async def finish(self) -> None: ...


class LauncherCheckpoints:
    """The launcher's side of a checkpointed run on worker processes.

    It triggers checkpoints on every worker (:class:`Trigger`), hands their
    saved parts to the coordinator, and gates results per worker: results a
    worker sent after its :class:`Committed` ``n`` wait until every worker
    committed ``n``. A worker whose instances all finished (:class:`Finals`)
    is stood in for: the launcher writes their final states itself.
    """

    def __init__(self, session: Session, controls: Mapping[int, Comm]) -> None:
        self.session = session
        self.controls = controls
        self.gate = session.gate(controls.keys(), session.sink.emit)
        self._finals: list[tuple[InstanceRef, bytes]] = []
        self._inflight = 0

    async def drive(self) -> None:
        """Trigger checkpoints until cancelled."""
        await self.session.coordinator.drive(self._trigger)

    async def _trigger(self, n: int) -> None:
        self._inflight = n
        for comm in self.controls.values():
            with contextlib.suppress(TransportError):  # that worker already finished
                await comm.send(Trigger(n))
        self._save_finals(n)
        await self.gate.trigger(n)

    async def finish(self) -> None:
        """Once every worker finished (the run ended, or was drained): a last checkpoint of the instances'
        final states, committing every result, so that restoring the run resumes nothing."""
        coordinator, store = self.session.coordinator, self.session.store
        n = coordinator.take_id()
        coordinator.add_parts(n, store.write_finals(n, self._finals))
        await coordinator.commit_results(n)

    def _save_finals(self, n: int) -> None:
        if self._finals:
            store = self.session.store
            self.session.coordinator.add_parts(n, store.write_finals(n, self._finals))

    async def emit(self, wid: int, pe: str, port: str, items: list[Any]) -> None:
        await self.gate.emit(wid, pe, port, items)

    async def receive(self, wid: int, message: Any) -> bool:
        """Handle a worker's checkpoint message; whether ``message`` was one."""
        match message:
            case Saved(n, parts):
                self.session.coordinator.add_parts(n, parts)
            case Committed(n):
                await self.gate.mark(wid, n)
            case Finals(states):
                self._finals.extend((ref, data) for ref, data, _ in states)
                n = self._inflight
                stand_ins = _stand_ins(states, n)
                if stand_ins:
                    store = self.session.store
                    self.session.coordinator.add_parts(n, store.write_finals(n, stand_ins))
                await self.gate.finish(wid)
            case _:
                return False
        return True


class RelayCheckpoints:
    """A relay's side: MPI rank 0 between the launcher (which coordinates) and the ranks.

    Triggers from the launcher go to every rank; the ranks' saved parts go up;
    results are gated per rank and committed upward (:class:`Committed`), on
    ``upward``, the comm results leave by; ranks whose instances all finished
    are stood in for, as :class:`LauncherCheckpoints` does.
    """

    def __init__(self, spec: WorkerSpec, controls: Mapping[int, Comm], upward: Comm, sink: ResultSink) -> None:
        self.store = CheckpointStore(spec.directory, spec.keep)
        self.controls = controls
        self.upward = upward
        self.gate = ResultGate(controls.keys(), sink.emit, self._commit, spec.first)
        self._finals: list[FinalState] = []
        self._finished: set[int] = set()
        self._inflight = 0

    async def _commit(self, n: int) -> None:
        await self.upward.send(Committed(n))

    async def drive(self) -> None:
        """The launcher triggers: nothing to do until cancelled."""
        await asyncio.get_running_loop().create_future()

    async def trigger(self, n: int) -> None:
        """Checkpoint ``n``, triggered by the launcher."""
        self._inflight = n
        for comm in self.controls.values():
            with contextlib.suppress(TransportError):
                await comm.send(Trigger(n))
        await self._save_finals(n)
        await self.gate.trigger(n)

    async def finish(self) -> None:
        """Nothing: the launcher takes the run's last checkpoint, from the finals this relay sent up."""

    async def _save_finals(self, n: int) -> None:
        if self._finals:
            await self.upward.send(Saved(n, self.store.write_finals(n, [(ref, data) for ref, data, _ in self._finals])))

    async def emit(self, wid: int, pe: str, port: str, items: list[Any]) -> None:
        await self.gate.emit(wid, pe, port, items)

    async def receive(self, wid: int, message: Any) -> bool:
        match message:
            case Saved():
                await self.upward.send(message)
            case Committed(n):
                await self.gate.mark(wid, n)
            case Finals(states):
                self._finals.extend(states)
                self._finished.add(wid)
                n = self._inflight
                stand_ins = _stand_ins(states, n)
                if stand_ins:
                    await self.upward.send(Saved(n, self.store.write_finals(n, stand_ins)))
                await self.gate.finish(wid)
                if len(self._finished) == len(self.controls):
                    await self.upward.send(Finals(self._finals))
            case _:
                return False
        return True
