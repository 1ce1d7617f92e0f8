"""The ray mapping: the plan's workers as Ray actors, each an event loop running the engine.

It is the multi mapping with actors in place of processes: the same plan
(instance ``i`` of every PE on worker ``i % N``), the same worker loop, control
messages, result forwarding, feed pump and supervision (inherited from the
multi mapping). What is Ray's is here:

- joining a cluster: ``ray.init(address=...)`` (``None``: the ``RAY_ADDRESS``
  environment variable, else a new local Ray); the mapping disconnects (and
  stops a Ray it started) after the run, unless Ray was initialised already;
- placing workers: one actor per worker with ``num_cpus`` and ``resources``
  each, spread over the nodes (``scheduling_strategy="SPREAD"``);
- the comms: :mod:`aiod4p.transports.ray` (actor calls with credits);
- shipping code: the plan travels pickled by Ray's cloudpickle; the
  workflow's own modules (neither installed nor the standard library) travel
  by value, so a worker on another node needs only aiod4p and the libraries;
- dead workers: a pending call to each actor fails when it dies
  (:class:`~aiod4p.errors.WorkerDied`); actors are killed after the run.
"""

from __future__ import annotations

import asyncio
import os
import pickletools
import sys
from collections.abc import Callable, Mapping
from importlib.metadata import packages_distributions
from types import ModuleType
from typing import Any

import ray
from ray import cloudpickle

from .. import compat
from .._engine import Feed
from .._plan import ExecutionPlan
from .._results import ResultSink
from .._stats import InstanceStats
from ..errors import GraphError, MappingUnavailable
from ..transports.ray import DriverComm
from ._base import RunControl
from ._ray_worker import CONTROL, RayWorker, ShippedCode
from .multi import _FEED_WINDOW, MultiMapping, _modules_to_preload, _MultiRun, _unpicklable

__all__ = ["RayMapping"]

OBJECT_STORE_MEMORY = 200 * 1024 * 1024  # bytes of a local Ray's object store

_RemoteWorker: Any = None  # ray.remote(RayWorker), made once

# Ray's cloudpickle and cluster_resources have no annotations.
_dumps: Callable[..., bytes] = cloudpickle.dumps
_by_value: Callable[[ModuleType], None] = cloudpickle.register_pickle_by_value
_not_by_value: Callable[[ModuleType], None] = cloudpickle.unregister_pickle_by_value
_cluster_resources: Callable[[], dict[str, float]] = ray.cluster_resources


class RayMapping(MultiMapping):
    """Ray actors joined by actor calls; ``-n N`` workers (default: one per local CPU).

    Args:
        address: the Ray cluster to join (``"auto"``, ``"HOST:PORT"``,
            ``"ray://HOST:10001"``); ``None``: ``RAY_ADDRESS``, else a new local Ray.
        num_cpus: CPUs each worker actor reserves (Ray's ``num_cpus``).
        resources: custom resources each worker actor reserves.
        runtime_env: Ray's runtime environment for the run (``working_dir``,
            ``pip``, ...), when this mapping connects to Ray.
        start_timeout: seconds to wait for the cluster to start every worker.
        stats_interval: seconds between the workers' statistics reports.
        grace: seconds to wait, after a worker failed because another one
            did, for the root cause to be reported.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        start_timeout: float = 60.0,
        stats_interval: float = 0.5,
        grace: float = 1.0,
    ) -> None:
        super().__init__(stats_interval=stats_interval, grace=grace)
        self.address = address
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.runtime_env = dict(runtime_env or {})
        self.start_timeout = start_timeout

    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        """Run ``plan`` on Ray actors.

        Raises:
            PEError: a PE raised in a worker (with its original traceback text).
            WorkerDied: a worker actor died before finishing.
            GraphError: a PE cannot be pickled.
            InputError: an input cannot be pickled.
            TransportError: an item or result cannot be pickled (naming the PE and port).
            MappingUnavailable: Ray cannot be joined, or cannot start the workers.
        """
        connected = ray.is_initialized()
        if not connected:
            await asyncio.to_thread(self._connect)
        try:
            return await _RayRun(self, plan, feeds, sink, control, max_delay).run()
        finally:
            if not connected:
                await asyncio.to_thread(ray.shutdown)

    def _connect(self) -> None:
        """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray."""
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        try:
            if self.address is None and not _ray_address_set():
                ray.init(object_store_memory=OBJECT_STORE_MEMORY, **options)
            else:
                ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or "RAY_ADDRESS"
            raise MappingUnavailable(f"cannot join the Ray cluster at {where}: {exc}") from exc


def _ray_address_set() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))


class _RayRun(_MultiRun):
    """One execution: actors, comms, supervision (the latter inherited from the multi mapping)."""

    mapping: RayMapping

    def __init__(
        self,
        mapping: RayMapping,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> None:
        super().__init__(mapping, plan, feeds, sink, control, max_delay)
        self.method = "spawn"  # Ray's workers are fresh interpreters: the plan and feeds travel pickled
        self.actors: list[Any] = []
        self.preload: list[tuple[str, str]] = []
        self.places: list[tuple[str, int]] = []
        self.serving: list[asyncio.Future[Any]] = []
        self.alive: list[asyncio.Future[Any]] = []

    def _pickle_plan(self) -> bytes:
        """The plan pickled with cloudpickle; modules that workers cannot import by name travel by value.

        Raises:
            GraphError: a PE (or the plan) cannot be pickled.
        """
        plan = self.plan
        try:
            by_reference = _dumps(plan, protocol=5)
        except Exception as exc:
            culprit = _unpicklable(plan.pes, _dumps)
            if culprit is None:
                raise GraphError(f"the workflow cannot be pickled to start Ray actors: {exc}") from exc
            pe_id, pe_exc = culprit
            raise GraphError(
                f"PE {pe_id} cannot be pickled to start Ray actors: {type(pe_exc).__name__}: {pe_exc}"
            ) from pe_exc
        # Classes pickled by name (dispel4py PEs) need their module importable: preloaded from its file.
        self.preload = _modules_to_preload(by_reference)
        local = _user_modules(by_reference)
        if not local:
            return by_reference
        for module in local:
            _by_value(module)
        try:
            return _dumps(plan, protocol=5)
        finally:
            for module in local:
                _not_by_value(module)

    # -- how workers start and which comm joins them ------------------------------
    async def _start_actors(self, payloads: list[Any]) -> None:
        global _RemoteWorker
        if _RemoteWorker is None:
            _RemoteWorker = ray.remote(RayWorker)
        mapping, n = self.mapping, self.plan.workers
        options: dict[str, Any] = {"num_cpus": mapping.num_cpus, "scheduling_strategy": "SPREAD", "max_restarts": 0}
        if mapping.resources:
            options["resources"] = mapping.resources
        self.actors = [_RemoteWorker.options(name=None, **options).remote(wid) for wid in range(n)]
        self.alive = [_future(actor.alive.remote()) for actor in self.actors]
        started = [_future(actor.where.remote()) for actor in self.actors]
        try:
            async with asyncio.timeout(mapping.start_timeout):
                self.places = list(await asyncio.gather(*started))
        except TimeoutError:
            raise MappingUnavailable(
                f"the Ray cluster did not start {n} worker actors of {mapping.num_cpus} CPU"
                f"{'' if mapping.num_cpus == 1 else 's'}{f' and {mapping.resources}' if mapping.resources else ''}"
                f" each within {mapping.start_timeout:g} s; its resources: {_cluster_resources()}"
            ) from None
        finally:
            for future in started:
                future.cancel()
        peers: list[set[int]] = [set() for _ in range(n)]
        for spec in self.plan.channels:
            if spec.source_worker != spec.dest_worker:
                peers[spec.source_worker].add(spec.dest_worker)
                peers[spec.dest_worker].add(spec.source_worker)
        plan_ref = ray.put(payloads[0][0])  # one copy in the object store for every worker
        self.serving = [
            _future(
                actor.serve.remote(
                    plan_ref,
                    payloads[wid][1],
                    {peer: self.actors[peer] for peer in sorted(peers[wid])},
                    self.max_delay,
                    mapping.stats_interval,
                    ShippedCode(tuple(path for path in sys.path if path), self.preload, compat.installed()),
                )
            )
            for wid, actor in enumerate(self.actors)
        ]
        self.comms = [DriverComm(actor, CONTROL) for actor in self.actors]

    async def run(self) -> list[InstanceStats]:
        payloads, pumped = self._payloads()
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self._start_actors(payloads)
            n = len(self.actors)
            watchers = [asyncio.create_task(self._watch(wid), name=f"watch worker {wid}") for wid in range(n)]
            for pe_id, host, _ in pumped:
                self.credits[(pe_id, host)] = asyncio.Semaphore(_FEED_WINDOW)
            pumps = [asyncio.create_task(self._pump(pe_id, host, feed)) for pe_id, host, feed in pumped]
            tasks = [*watchers, *pumps]
            self.control.on_drain(self._drain)
            await self._supervise(watchers, pumps)
            return [entry for wid in sorted(self.final) for entry in self.final[wid]]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, *self._posts, return_exceptions=True)
            for comm in self.comms:
                comm.abort()
            await self._stop_actors()

    async def _stop_actors(self) -> None:
        """Kill every actor of the run and wait (``grace`` seconds at most) until Ray confirms it is gone."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.alive:
            await asyncio.wait(self.alive, timeout=self.mapping.grace * 5)
        for future in (*self.alive, *self.serving):
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a killed actor's calls fail, as expected
            future.cancel()

    async def _exited(self, wid: int) -> None:
        """Wait until worker ``wid``'s actor died or its serve call ended."""
        await asyncio.wait({self.alive[wid], self.serving[wid]}, return_when=asyncio.FIRST_COMPLETED)

    def _death(self, wid: int) -> str:
        node, pid = self.places[wid] if wid < len(self.places) else ("?", "?")
        causes = [f.exception() for f in (self.alive[wid], self.serving[wid]) if f.done() and not f.cancelled()]
        cause = next((str(c).strip().splitlines()[0] for c in causes if c is not None), "it stopped responding")
        return f"worker actor {wid} (pid {pid} on Ray node {node[:12]}) died before the run finished: {cause}"


def _user_modules(data: bytes) -> list[ModuleType]:
    """The modules a pickle refers to that are the user's code: neither the standard library nor installed.

    They travel by value: a worker on another node has the installed
    distributions (aiod4p, the libraries), not the workflow's own files.
    """
    installed = packages_distributions()
    names = {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str) and arg in sys.modules}
    return [
        sys.modules[name]
        for name in sorted(names)
        if name != "__main__"  # cloudpickle ships it by value by itself
        and getattr(sys.modules[name], "__file__", None)
        and name.partition(".")[0] not in installed
        and name.partition(".")[0] not in sys.stdlib_module_names
    ]


def _future(ref: Any) -> asyncio.Future[Any]:
    """An asyncio future of a Ray object reference."""
    return asyncio.wrap_future(ref.future())
