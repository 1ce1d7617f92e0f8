"""The launcher's side of a mapping that starts its own hosted workers (multi, ray).

Such a mapping's run is always the same four steps around what is its own:
prepare the job (:func:`~aiod4p.mappings._host.prepare_job`), start the
workers with the job (its :class:`Launch`), supervise them
(:class:`~aiod4p.mappings._host.Supervisor`), then stop them and abort
their comms whatever happened; with checkpointing on, each attempt of the
run does so (:meth:`~aiod4p.mappings._base.BaseMapping._recovering`).
:class:`HostedMapping` does these steps once; a mapping says only how its
workers start, end, and die.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Mapping
from typing import Protocol

from .._checkpoint import LauncherCheckpoints, Session
from .._engine import Feed
from .._plan import ExecutionPlan, PlanOptions
from .._results import ResultSink
from .._stats import InstanceStats
from ..transports import Comm
from ._base import BaseMapping, RunControl, available_cpus
from ._host import GRACE, STATS_INTERVAL, Supervisor, prepare_job
from ._shipping import Job

__all__ = ["HostedMapping", "Launch"]


class Launch(Protocol):
    """One run's workers, as a :class:`HostedMapping` starts them.

    Attributes:
        ships_held_feeds: list and tuple feeds travel with the job (its workers get it as it is, as forked
            processes do, or one pickling of it reaches them all); else the launcher pumps them to the worker
            that reads each (:func:`~aiod4p.mappings._host.split_feeds`).
    """

    ships_held_feeds: bool

    async def start(self, job: Job, control: RunControl) -> Mapping[int, Comm]:
        """Start a worker for each worker id of ``job.plan``, each given ``job``; their control comms by id.

        ``control.draining`` says whether the run has been asked to drain: a launch that hands the job over once
        its workers have started (Ray's actors, once Ray is joined) hands it over drained if the drain came
        meanwhile, as :attr:`Job.drained` says (a ``Drain`` message would reach the workers once their sources had
        produced). A launch whose first workers run the job while it starts the others says so
        (:meth:`RunControl.workers_run`): a first signal then drains the run rather than aborting it. Whatever
        started before a failure is stopped by :meth:`stop`.
        """
        ...

    async def exited(self, wid: int) -> None:
        """Wait until worker ``wid`` has ended."""
        ...

    async def death(self, wid: int) -> str:
        """Why worker ``wid`` ended before the run finished, for :class:`~aiod4p.errors.WorkerDied`."""
        ...

    async def stop(self, finished: bool) -> None:
        """Stop whatever is left of the workers (``finished``: the run ended well; they may leave on their own)."""
        ...


class HostedMapping(BaseMapping):
    """Workers this mapping starts, each running the worker host; ``-n N`` workers (default: one per CPU).

    Args:
        stats_interval: seconds between the workers' statistics reports.
        grace: seconds to wait, after a worker failed because another one
            did, for the root cause to be reported (and for a dead worker's
            last messages).
    """

    uses_processes = True
    supports_checkpoints = True

    def __init__(self, *, stats_interval: float = STATS_INTERVAL, grace: float = GRACE) -> None:
        self.stats_interval = stats_interval
        self.grace = grace

    def plan_options(self, workers: int | None, batch_size: int, credits: int) -> PlanOptions:
        return PlanOptions(
            workers=workers or available_cpus(),
            default_parallelism=None,
            batch_size=batch_size,
            credits=credits,
            processes=self.processes,
        )

    @abstractmethod
    def launch(self, plan: ExecutionPlan) -> Launch:
        """The workers of one run of ``plan``, not started yet."""

    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        """Run ``plan`` on the workers that :meth:`launch` starts.

        Raises:
            PEError: a PE raised in a worker (with its original traceback text).
            WorkerDied: a worker ended before finishing.
            GraphError: a PE cannot be pickled for the workers.
            InputError: an input cannot be pickled.
            TransportError: an item or result cannot be pickled (naming the PE and port).
            MappingUnavailable: the workers cannot be started (as the mapping says).
        """
        return await self._recovering(
            plan,
            feeds,
            sink,
            control,
            lambda sink, session: self._attempt(plan, feeds, sink, control, max_delay, session),
        )

    async def _attempt(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
        session: Session | None,
    ) -> list[InstanceStats]:
        """One run on new workers (one attempt of a checkpointed run, with its ``session``)."""
        launch = self.launch(plan)
        job, pumped = prepare_job(
            plan, feeds, max_delay, self.stats_interval, session, control, ship_held=launch.ships_held_feeds
        )
        comms: Mapping[int, Comm] = {}
        finished = False
        try:
            comms = await launch.start(job, control)
            supervisor = Supervisor(
                plan,
                comms,
                sink,
                control,
                pumped=pumped,
                grace=self.grace,
                exited=launch.exited,
                death=functools.partial(_death_naming_instances, launch, plan),
                checkpoints=LauncherCheckpoints(session, comms) if session is not None else None,
            )
            stats = await supervisor.run()
            finished = True
            return stats
        finally:
            try:
                await launch.stop(finished)
            finally:
                for comm in comms.values():
                    comm.abort()


async def _death_naming_instances(launch: Launch, plan: ExecutionPlan, wid: int) -> str:
    """Why worker ``wid`` died, and the PE instances it ran (one of them may have ended it: ``os._exit``, a crash
    in an extension, the memory it took)."""
    return f"{await launch.death(wid)}; it ran {plan.instances_on(wid)}"
