"""The async mapping: every instance is a task in the caller's event loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

from .._checkpoint import Session, WorkerCheckpoints, drive
from .._engine import Feed, Worker
from .._plan import ExecutionPlan, PlanOptions
from .._results import ResultSink
from .._stats import InstanceStats
from ._base import BaseMapping, RunControl

__all__ = ["AsyncMapping"]


class AsyncMapping(BaseMapping):
    """One event loop; ``-n N`` runs N instances of each PE whose parallelism is unset."""

    name = "async"
    fixed_order: ClassVar[bool] = False
    supports_checkpoints = True
    workers_started = ("PE instance", "PE instances")

    def plan_options(self, workers: int | None, batch_size: int, credits: int) -> PlanOptions:
        return PlanOptions(workers=1, default_parallelism=workers or 1, batch_size=batch_size, credits=credits)

    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        async def attempt(sink: ResultSink, session: Session | None) -> list[InstanceStats]:
            worker = Worker(
                plan, 0, feeds=feeds, results=sink, max_delay=max_delay, fixed_order=self.fixed_order, shares_loop=True
            )
            if session is None:
                _publish(worker, control)
                return await worker.run()
            producers = [ref for ref, actor in worker.actors.items() if actor.results]
            gate = session.gate(producers, worker.results.emit)
            checkpoints = WorkerCheckpoints(
                worker,
                session.store,
                session.restored,
                session.first,
                session.coordinator.add_parts,
                gate,
                interval=session.config.interval,
                attempt=session.attempt,
            )
            forget_drain = _publish(worker, control)
            try:
                stats: list[InstanceStats] = await drive(session, checkpoints.trigger, worker.run())
            finally:
                forget_drain()  # a restart's next attempt has its own worker: let this one go
            await checkpoints.final_checkpoint(session.coordinator)
            return stats

        return await self._recovering(plan, feeds, sink, control, attempt)


def _publish(worker: Worker, control: RunControl) -> Callable[[], None]:
    """Let ``control`` drain ``worker`` and see its live statistics and instances; returns what stops the draining."""
    forget_drain = control.on_drain(worker.drain)
    control.publish_stats(0, worker.stats)  # live objects, updated as the run goes
    control.publish_instances(worker.instances)
    return forget_drain
