"""The ray mapping: the plan's workers as Ray actors, each an event loop running the engine.

Like every multi-process mapping, it contributes only how workers start and
which comm joins them (see ``docs/worker-host.md``); the worker host
(:mod:`aiod4p.mappings._host`) does the rest: results, statistics, drain,
pumped feeds, failures. What is Ray's (joining a cluster, starting the actors,
stopping them) is in :mod:`aiod4p.mappings._ray_run`, which a run imports, with
Ray, in a thread as it starts: importing Ray holds the interpreter for a
quarter of a second or more, and the caller's event loop with it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._engine import Feed
from .._plan import ExecutionPlan
from .._results import ResultSink
from .._stats import InstanceStats
from ..errors import MappingUnavailable
from ..transports import Comm
from ._base import RunControl, available_cpus
from ._host import GRACE, STATS_INTERVAL
from ._hosted import HostedMapping
from ._shipping import Job

if TYPE_CHECKING:
    from ._ray_run import RayRun

if importlib.util.find_spec("ray") is None:  # the mapping's registry names the extra that brings it
    raise ModuleNotFoundError("No module named 'ray'", name="ray")

__all__ = ["RayMapping"]

OBJECT_STORE_MEMORY = 200 * 1024 * 1024  # bytes of a local Ray's object store
PROBE_TIMEOUT = 5.0  # seconds the head's GCS port has to accept a connection and answer
# An HTTP/2 client's connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with a
# SETTINGS frame (its 4th byte, the frame type, is 4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HOST_PORT = re.compile(r"\[?(?P<host>[^\[\]/]+?)\]?:(?P<port>\d+)")


class RayMapping(HostedMapping):
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

    Raises:
        ValueError: ``address`` is empty (a shell variable that was not set, say).
    """

    name = "ray"
    workers_started = ("actor", "actors")

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        start_timeout: float = 60.0,
        stats_interval: float = STATS_INTERVAL,
        grace: float = GRACE,
    ) -> None:
        super().__init__(stats_interval=stats_interval, grace=grace)
        if address is not None and not address.strip():
            raise ValueError(
                f"the Ray address (--address) is empty ({address!r}): give the cluster's (auto, HOST:PORT or"
                " ray://HOST:10001), or none to use RAY_ADDRESS or start a local Ray"
            )
        self.address = address
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.runtime_env = dict(runtime_env or {})
        self.start_timeout = start_timeout

    @property
    def shares_cpus(self) -> bool:
        """The run starts a local Ray (no ``address``, no ``RAY_ADDRESS``, no connection yet), whose
        workers all share this machine's CPUs."""
        ray = sys.modules.get("ray")  # not imported yet: not initialised
        return self._starts_local_ray() and not (ray is not None and ray.is_initialized())

    def _starts_local_ray(self) -> bool:
        return self.address is None and not os.environ.get("RAY_ADDRESS")

    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        """As :meth:`HostedMapping.execute`; with ``restarts``, the connection to Ray that the first attempt makes
        is kept until the last one ends, so that a restart does not start (and stop) a local Ray again."""
        if self.checkpointing is None or not self.checkpointing.restarts:
            return await super().execute(plan, feeds, sink, control, max_delay)
        module = await asyncio.to_thread(importlib.import_module, "aiod4p.mappings._ray_run")
        async with module.kept_connection():
            return await super().execute(plan, feeds, sink, control, max_delay)

    def launch(self, plan: ExecutionPlan) -> _RayLaunch:
        """Ray actors for a run of ``plan``; starting them raises :class:`~aiod4p.errors.MappingUnavailable`
        when Ray cannot be joined or cannot start them."""
        return _RayLaunch(self, plan)

    def _connect(self, workers: int) -> bool:
        """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray with room for ``workers``
        actors (as many CPUs as this process may use, or more when they need more, as the multi mapping starts
        as many processes as it is given); whether it started one. Called in a thread, Ray imported."""
        import ray

        if logging.getLogger().getEffectiveLevel() >= logging.ERROR:  # aiod4p run -q: Ray's own notes too
            logging.getLogger("ray").setLevel(logging.ERROR)
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        if self._starts_local_ray():
            cpus = max(available_cpus(), math.ceil(workers * self.num_cpus))
            try:
                # "local": a new Ray even where `ray start` ran (its address file, perhaps stale, would be joined)
                ray.init(address="local", num_cpus=cpus, object_store_memory=OBJECT_STORE_MEMORY, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise MappingUnavailable(f"cannot start a local Ray: {exc}") from exc
            return True
        address = self.address or os.environ["RAY_ADDRESS"]
        where = self.address or f"{address} (RAY_ADDRESS)"
        if (problem := _not_a_gcs(address)) is not None:
            raise MappingUnavailable(f"cannot join the Ray cluster at {where}: {problem}")
        try:
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MappingUnavailable(f"cannot join the Ray cluster at {where}: {exc}") from exc
        return False


def _not_a_gcs(address: str) -> str | None:
    """Why ``HOST:PORT`` is not the GCS of a Ray head, or ``None`` if it may be (or ``address`` is another
    form: ``auto``, ``ray://...``). ``ray.init`` retries a port that refuses or does not speak gRPC for
    about a quarter of an hour."""
    if (found := _HOST_PORT.fullmatch(address)) is None or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    try:
        probe = socket.create_connection((found["host"], int(found["port"])), timeout=PROBE_TIMEOUT)
    except socket.gaierror as exc:
        return f"unknown host {found['host']!r} ({exc.strerror})"
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT:g} s"
    except OSError as exc:
        return f"nothing listens there ({exc.strerror or exc})"
    with probe:
        try:
            probe.sendall(_HTTP2_PREFACE)
            answer = b""
            while len(answer) < 4 and (piece := probe.recv(9 - len(answer))):
                answer += piece
        except TimeoutError:
            return f"no answer within {PROBE_TIMEOUT:g} s"
        except OSError:  # the connection was reset: by a server that does not speak HTTP/2
            answer = b""
    if len(answer) < 4 or answer[3] != 4:
        return "that port is not a Ray head's (its GCS port, 6379 unless `ray start --head --port` chose another)"
    return None


class _RayLaunch:
    """A run's Ray actors: a :class:`~aiod4p.mappings._ray_run.RayRun`, made once its module is imported."""

    ships_held_feeds = True  # the job is pickled once, for every actor

    def __init__(self, mapping: RayMapping, plan: ExecutionPlan) -> None:
        self.mapping = mapping
        self.plan = plan
        self.run: RayRun | None = None

    async def start(self, job: Job, control: RunControl) -> Mapping[int, Comm]:
        """Import :mod:`~aiod4p.mappings._ray_run` (and Ray) in a thread, then start the run's actors
        (:meth:`~aiod4p.mappings._ray_run.RayRun.start`, which says what it raises)."""
        module = await asyncio.to_thread(importlib.import_module, "aiod4p.mappings._ray_run")
        self.run = module.RayRun(self.mapping, self.plan)
        return await self.run.start(job, control)

    async def exited(self, wid: int) -> None:
        assert self.run is not None
        await self.run.exited(wid)

    async def death(self, wid: int) -> str:
        assert self.run is not None
        return await self.run.death(wid)

    async def stop(self, finished: bool) -> None:
        if self.run is not None:
            await self.run.stop(finished)
