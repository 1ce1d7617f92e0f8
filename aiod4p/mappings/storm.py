"""The storm mapping: run the workflow as an Apache Storm topology and collect its results.

Storm routes the tuples itself, so this mapping does not run the engine's
router: it compiles the plan into a streamparse project (see
:mod:`aiod4p.storm`), submits it with ``sparse submit`` to the cluster the
user configured (checking first that its Nimbus answers), and waits: every
task of the topology connects back to this process (:class:`RunReport`)
and sends the results of unconnected ports, its errors and its end of
stream. Once every task has finished, the topology is killed and the run
returns, as on every other mapping. A fatal error or a dead worker fails the
run (the topology is killed too); draining the run (SIGINT/SIGTERM in the
CLI) deactivates the topology, which makes the spouts stop their PEs and
finish their streams, so that the run still ends through ``postprocess``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import streamparse  # noqa: F401 - the storm extra: without it get_mapping() explains how to install it

from .._engine import Feed
from .._plan import ExecutionPlan
from .._results import ResultSink
from .._stats import InstanceStats
from .._threads import finished_in_thread
from ..errors import Aiod4pError
from ..storm import build_project, topology_name
from ..storm._cluster import (
    ENV_NAME,
    Cluster,
    deactivate,
    find_cluster,
    kill,
    nimbus,
    probe,
    submit,
    submit_env,
    topology_facts,
)
from ..storm._project import DEFAULT_CONF, target_name
from ..storm._run import RunReport
from ..storm._spec import DEFAULT_MAX_REPLAYS
from ._base import BaseMapping, RunControl
from .asyncio import AsyncMapping

__all__ = ["DEFAULT_CONF", "StormMapping"]

logger = logging.getLogger("aiod4p.storm")


class StormMapping(BaseMapping):
    """Runs the workflow on the Storm cluster named by the user's configuration.

    Args:
        nimbus: ``HOST[:PORT]`` of Nimbus, overriding the configuration.
        target: the workflow target, which names the topology.
        name: the topology name (default: from ``target``, else ``aiod4p``);
            a run adds a suffix of its own, so that runs never collide.
        conf: Storm configuration for the topology (``topology.*`` keys,
            ``aiod4p.max_replays``), over the ``options`` of the streamparse
            environment in use, which are over :data:`DEFAULT_CONF`.
        max_replays: replays of a failed tuple before the run fails.
        callback_host: the address the cluster's workers reach this process
            at (default: the one this machine uses to reach Nimbus).
        start_timeout: seconds to wait for every task of the topology to start.

    After a run, :attr:`facts` holds what Nimbus said about the topology while
    it ran (see :func:`aiod4p.storm._cluster.topology_facts`).
    """

    name = "storm"
    uses_uvloop = False
    reports_stats = False  # Storm keeps its own (the Storm UI)
    live_inputs = False  # the spouts' inputs are stored in the topology
    runs_the_engine = False  # Storm routes each tuple to a task that calls the PE

    def __init__(
        self,
        nimbus: str | None = None,
        target: str | None = None,
        name: str | None = None,
        conf: Mapping[str, Any] | None = None,
        max_replays: int = DEFAULT_MAX_REPLAYS,
        callback_host: str | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        self.nimbus = nimbus
        self.topology = topology_name(name or (target_name(target) if target else "aiod4p"))
        self.conf = dict(conf or {})
        self.max_replays = max_replays
        self.callback_host = callback_host
        self.start_timeout = start_timeout
        self.submitted: str | None = None
        self.facts: dict[str, Any] = {}

    # -n N: N tasks for every PE whose parallelism is unset, as the async mapping's instances.
    plan_options = AsyncMapping.plan_options

    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        """Submit the topology, deliver its results to ``sink`` until every task has finished, kill it.

        Returns no statistics (Storm keeps its own: the Storm UI).

        Raises:
            MappingUnavailable: no Storm cluster is configured, or its Nimbus does not answer
                (checked before anything else is done).
            GraphError, InputError: the workflow or its inputs cannot become a topology.
            PEError: a PE raised (a root PE, ``postprocess``, or an item still failing after its replays).
            WorkerDied: a Storm worker died during the run.
            Aiod4pError: the submission failed, or the topology did not start in time.
        """
        cluster: Cluster = find_cluster(self.nimbus)
        summary = await asyncio.to_thread(probe, cluster)
        token = secrets.token_hex(8)
        report = RunReport(sink, token)
        address = await report.listen(self.callback_host or _reachable_address(cluster))
        name = f"{self.topology}-{token[:8]}"
        # From here a drain is a Storm drain (a signal no longer stops start-up where it is): it waits
        # until every task runs, then deactivates the topology; a second signal cancels the run.
        draining: list[asyncio.Task[None]] = []
        over = False  # a drain asked for once the run is over has nothing left to do

        def drain() -> None:
            if not over:
                draining.append(asyncio.ensure_future(self._drain(report, cluster)))

        control.on_drain(drain)
        submitted = False
        failed = True
        killed = False
        try:
            with tempfile.TemporaryDirectory(prefix="aiod4p-storm-project-") as tmp:
                project = build_project(
                    plan,
                    Path(tmp) / name,
                    name=name,
                    inputs=dict(feeds),
                    envs={ENV_NAME: submit_env(cluster)},
                    max_replays=self.max_replays,
                    report=address,
                    token=token,
                )
                report.expect(project.spec)
                self.topology = project.name
                logger.info("submitting topology %s to %s", project.name, summary)
                submitted = True
                self.submitted = await finished_in_thread(submit, project, cluster, self.conf)
            await self._wait(report, cluster)
            for task in draining:
                await task
            failed = report.failed
        finally:
            over = True
            for task in draining:
                task.cancel()
            await asyncio.gather(*draining, return_exceptions=True)
            try:
                if submitted:
                    if report.failed and report.stopped_only:  # why the worker shut down: Nimbus knows, until the kill
                        report.storm_errors = await asyncio.to_thread(_errors, cluster, self.topology)
                    killed = await self._kill(cluster, failed)
            finally:
                # The tasks of a killed topology soon close their connections; those of one Nimbus did not kill
                # go on, so a failed run waits for their last reports only after a kill.
                await report.close(grace=30 if report.failed and killed else 0)
        if report.failed:
            raise report.error()
        return []

    async def _kill(self, cluster: Cluster, failed: bool) -> bool:
        """Kill the run's topology; if Nimbus does not, say how to, as an error of the run unless it ``failed`` already.

        Returns:
            Whether Nimbus killed it.

        Raises:
            Aiod4pError: Nimbus did not kill it (and the run had not failed).
        """
        try:
            await asyncio.to_thread(kill, cluster, self.topology)
        except Exception as exc:
            message = (
                f"Nimbus at {cluster.address} did not kill topology {self.topology} ({type(exc).__name__}: {exc});"
                f" kill it with: storm kill {self.topology} -w 0"
            )
            if not failed:
                raise Aiod4pError(message) from exc
            logger.error("%s", message)
            return False
        return True

    async def _wait(self, report: RunReport, cluster: Cluster) -> None:
        """Wait until every task has finished or the run failed."""
        try:
            async with asyncio.timeout(self.start_timeout):
                await report.started_or_ended()
        except TimeoutError:
            raise Aiod4pError(
                f"topology {self.topology} did not start within {self.start_timeout:.0f} s"
                f" ({len(report.started)} of {len(report.expected)} tasks reported);"
                f" {await asyncio.to_thread(_errors, cluster, self.topology)}"
            ) from None
        if report.all_started.is_set():  # it may have ended already; it is killed only after this wait
            self.facts = await asyncio.to_thread(topology_facts, cluster, self.topology)
            logger.info("topology %s runs (%s)", self.topology, self.facts["id"])
        await report.ended.wait()

    async def _drain(self, report: RunReport, cluster: Cluster) -> None:
        """Deactivate the topology once every task runs (only a running topology deactivates); if Nimbus does not,
        fail the run, which would otherwise wait for an end that never comes."""
        await report.started_or_ended()
        if report.ended.is_set():
            return
        logger.warning("draining topology %s: deactivating it; its spouts stop and finish their streams", self.topology)
        try:
            await asyncio.to_thread(deactivate, cluster, self.topology)
        except Exception as exc:
            report.fail(
                Aiod4pError(
                    f"cannot drain topology {self.topology}: Nimbus at {cluster.address} did not deactivate it"
                    f" ({type(exc).__name__}: {exc})"
                )
            )


def _reachable_address(cluster: Cluster) -> str:
    """The address of this machine on the route to Nimbus (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe_socket:
        try:
            probe_socket.connect((cluster.host, cluster.port))
        except OSError:
            return "127.0.0.1"
        address: str = probe_socket.getsockname()[0]
        return address


def _errors(cluster: Cluster, name: str) -> str:
    """What Nimbus knows about a topology that did not start: its components' errors, or that no worker was
    assigned to it, and how many worker slots the cluster has free."""
    try:
        info = topology_facts(cluster, name)["info"]
        if not info.executors:
            with nimbus(cluster) as client:
                supervisors = client.getClusterInfo().supervisors or []
    except Exception as exc:
        return f"Nimbus gives no information ({type(exc).__name__}: {exc})"
    errors = [f"{component}: {e.error.splitlines()[0]}" for component, es in (info.errors or {}).items() for e in es]
    if errors:
        return "Nimbus reports: " + "; ".join(errors[:5])
    if not info.executors:
        slots = sum(s.num_workers for s in supervisors)
        free = slots - sum(s.num_used_workers for s in supervisors)
        if free:
            return f"Nimbus assigned it no worker ({free} of the cluster's {slots} worker slots are free)"
        return (
            f"Nimbus assigned it no worker: all {slots} worker slots of the cluster are taken (by other topologies:"
            " kill one, or give the supervisors more slots)"
        )
    return "Nimbus reports no error (see the worker logs)"
