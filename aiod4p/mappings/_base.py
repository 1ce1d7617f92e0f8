"""The interface every mapping implements."""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import ClassVar

from .._checkpoint import Checkpointing, Session, run_with_recovery
from .._engine import Feed
from .._pe import PE
from .._plan import ExecutionPlan, InstanceRef, PlanOptions
from .._results import ResultSink
from .._stats import InstanceStats

__all__ = ["BaseMapping", "RunControl"]


class RunControl:
    """Between a run's caller and its mapping: drain and suspend requests, and live statistics."""

    def __init__(self) -> None:
        self.draining = False
        self.suspending = False
        self._drain_callbacks: list[Callable[[], None]] = []
        self._suspend_callbacks: list[Callable[[], None]] = []
        self._under_way = False
        self._stats: dict[int, list[InstanceStats]] = {}
        self.instances: dict[InstanceRef, PE] = {}

    def publish_stats(self, worker: int, stats: list[InstanceStats]) -> None:
        """Record the latest statistics of ``worker``'s instances (mappings call this)."""
        self._stats[worker] = stats

    def publish_instances(self, instances: Mapping[InstanceRef, PE]) -> None:
        """Record the PE objects that instances running in this process use (in-process mappings call this)."""
        self.instances.update(instances)

    def stats(self) -> list[InstanceStats]:
        """The latest statistics of every instance published so far."""
        return [entry for worker in sorted(self._stats) for entry in self._stats[worker]]

    @property
    def under_way(self) -> bool:
        """Whether the run's workers run its job: from when the mapping listens for drain requests (:meth:`on_drain`),
        or when its first workers run the job while others still start (:meth:`workers_run`). A drain requested
        from then on is acted on once the mapping listens. It still is between two attempts of a checkpointed
        run: the next attempt drains at once."""
        return self._under_way

    def workers_run(self) -> None:
        """Say that the run's first workers run its job (they may be producing), while the mapping starts others."""
        self._under_way = True

    def on_drain(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when draining is requested (at once if it already was); returns what stops that.

        An attempt of a checkpointed run calls the returned function when it ends: its callback would
        otherwise keep the whole attempt (its workers' comms and buffers, its checkpoints) alive for every
        restart to come.
        """
        self._under_way = True
        return _subscribe(self._drain_callbacks, callback, self.draining)

    def drain(self) -> None:
        """Ask the run to drain; idempotent, and nothing once it is suspending (the suspend's stop stands)."""
        if not (self.draining or self.suspending):
            self.draining = True
            for callback in list(self._drain_callbacks):
                callback()

    def on_suspend(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when suspending is requested (at once if it already was); returns what stops that
        (each attempt of a checkpointed run subscribes its coordinator, as :meth:`on_drain` says)."""
        return _subscribe(self._suspend_callbacks, callback, self.suspending)

    def suspend(self) -> None:
        """Ask the run to stop at a checkpoint taken now (:meth:`aiod4p.WorkflowRun.suspend`); idempotent."""
        if not self.suspending:
            self.suspending = True
            for callback in list(self._suspend_callbacks):
                callback()


def _subscribe(callbacks: list[Callable[[], None]], callback: Callable[[], None], now: bool) -> Callable[[], None]:
    """Add ``callback`` to ``callbacks`` (and call it ``now``); returns what removes it (idempotent)."""
    callbacks.append(callback)
    if now:
        callback()

    def forget() -> None:
        with contextlib.suppress(ValueError):  # already forgotten
            callbacks.remove(callback)

    return forget


def available_cpus(pid: int = 0) -> int:
    """The CPUs process ``pid`` (0: this one) may run on (its affinity: ``taskset``, a cpuset), at least 1."""
    try:
        return len(os.sched_getaffinity(pid)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class BaseMapping(ABC):
    """Places a plan's instances on workers, runs them, and collects results.

    Attributes:
        name: the name users select it by.
        uses_uvloop: run the caller's event loop on uvloop when installed.
        takes_workers: ``workers`` (``-n``) changes the plan.
        uses_processes: every worker is an operating-system process.
        supports_checkpoints: runs take checkpoints and recover (docs/recovery.md).
        reports_stats: runs return per-PE statistics (``--stats``, ``--stats-json``).
        live_inputs: runs take inputs that are iterators, consumed as they go (``--stdin``).
        runs_the_engine: aiod4p's engine runs the PEs, moving items in batches against credits (``--batch-size``,
            ``--credits``, ``--threaded``), not a system that routes them itself (Storm).
        workers_started: what the workers a run starts are called, one and several (how messages name them).
    """

    name: ClassVar[str]
    uses_uvloop: ClassVar[bool] = True
    takes_workers: ClassVar[bool] = True
    uses_processes: ClassVar[bool] = False
    supports_checkpoints: ClassVar[bool] = False
    reports_stats: ClassVar[bool] = True
    live_inputs: ClassVar[bool] = True
    runs_the_engine: ClassVar[bool] = True
    workers_started: ClassVar[tuple[str, str]] = ("worker process", "worker processes")
    checkpointing: Checkpointing | None = None
    """Checkpoints and recovery for the next runs (mappings whose ``supports_checkpoints`` is true)."""
    processes: int | None = None
    """The ``-n`` asked for when the next runs start fewer workers (``aiod4p run``: at most one per CPU):
    what dispel4py's rule shares out among a dispel4py graph's PEs (:attr:`PlanOptions.processes`)."""

    @property
    def shares_cpus(self) -> bool:
        """Every worker of the next run is a process on this machine and competes for its CPUs:
        ``aiod4p run`` then starts at most one per CPU (:func:`available_cpus`) unless ``--oversubscribe``."""
        return False

    def crowded(self) -> tuple[int, int] | None:
        """``(workers, cpus)`` when someone else started the next run's workers (the ranks of the user's
        mpiexec), all on this machine, and more of them than the CPUs they share: instances then go on
        the first ``cpus`` workers only, and the others wait. ``None`` otherwise."""
        return None

    def head_start(self, target: str, workers: int | None) -> contextlib.AbstractContextManager[None]:
        """Start, before the caller loads the workflow ``target`` (the CLI's target), what the next run of
        ``-n workers`` will need, so that it overlaps the load; on leaving, what no run took is stopped.

        A hint only: the next run works the same whether or not it takes what was started, and the
        caller reports an error loading ``target`` itself. The default starts nothing.
        """
        return contextlib.nullcontext()

    @abstractmethod
    def plan_options(self, workers: int | None, batch_size: int, credits: int) -> PlanOptions:
        """Planner options for ``-n workers`` (``None``: the mapping's default)."""

    @abstractmethod
    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        """Run ``plan`` to completion, delivering results to ``sink``.

        Raises:
            PEError: a PE raised.
            WorkerDied: a worker process died.
        """

    async def _recovering(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        attempt: Callable[[ResultSink, Session | None], Awaitable[list[InstanceStats]]],
    ) -> list[InstanceStats]:
        """Run ``plan`` by ``attempt``: once, as ``attempt(sink, None)``, with checkpointing off; with it on,
        under :func:`~aiod4p._checkpoint.run_with_recovery`, each attempt as ``attempt(session.sink, session)``
        (no restart once ``control`` is draining; a stop at a checkpoint once it is suspending).

        Raises:
            CheckpointError: ``restore`` found no complete checkpoint, or one of another graph.
        """
        if self.checkpointing is None:
            return await attempt(sink, None)
        # In this process, no worker dies alone: nothing to restart, and results need not wait for checkpoints.
        checkpointing = self.checkpointing if self.uses_processes else replace(self.checkpointing, restarts=0)
        return await run_with_recovery(
            checkpointing,
            plan,
            feeds,
            sink,
            lambda session: attempt(session.sink, session),
            control,
        )
