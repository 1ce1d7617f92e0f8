"""The storm mapping: build the workflow's Storm topology and submit it to a cluster.

Storm routes the tuples itself, so this mapping does not run the engine's
router: it compiles the plan into a streamparse project (see
:mod:`aiod4p.storm`) and submits it with ``sparse submit``. Before anything
else it checks that a Storm cluster is configured and that its Nimbus
answers. The topology then runs on the cluster until it is killed
(``storm kill NAME``); its results stay there (see docs/storm.md).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import streamparse  # noqa: F401 - the storm extra: without it get_mapping() explains how to install it

from .._engine import Feed
from .._loading import _split
from .._plan import ExecutionPlan, PlanOptions
from .._results import ResultSink
from .._stats import InstanceStats
from ..storm import build_project, topology_name
from ..storm._cluster import ENV_NAME, Cluster, find_cluster, probe, submit, submit_env
from ._base import BaseMapping, RunControl

__all__ = ["StormMapping"]

logger = logging.getLogger("aiod4p.storm")


class StormMapping(BaseMapping):
    """Submits the workflow to the Storm cluster named by the user's configuration.

    Args:
        nimbus: ``HOST[:PORT]`` of Nimbus, overriding the configuration.
        target: the workflow target, which names the topology.
        name: the topology name (default: from ``target``, else ``aiod4p``).
    """

    name = "storm"
    uses_uvloop = False

    def __init__(self, nimbus: str | None = None, target: str | None = None, name: str | None = None) -> None:
        self.nimbus = nimbus
        self.topology = topology_name(name or (_target_name(target) if target else "aiod4p"))
        self.submitted: str | None = None

    def plan_options(self, workers: int | None, batch_size: int, credits: int) -> PlanOptions:
        # -n N: N tasks for every PE whose parallelism is unset (as the async mapping's instances).
        return PlanOptions(workers=1, default_parallelism=workers or 1, batch_size=batch_size, credits=credits)

    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        """Check the cluster, build the topology and submit it; returns at once (no statistics).

        Raises:
            MappingUnavailable: no Storm cluster is configured, or its Nimbus does not answer
                (checked before anything else is done).
            GraphError, InputError: the workflow or its inputs cannot become a topology.
            Aiod4pError: the submission failed.
        """
        cluster: Cluster = find_cluster(self.nimbus)
        summary = await asyncio.to_thread(probe, cluster)
        logger.info("submitting topology %s to %s", self.topology, summary)
        with tempfile.TemporaryDirectory(prefix="aiod4p-storm-project-") as tmp:
            project = build_project(
                plan,
                Path(tmp) / self.topology,
                name=self.topology,
                inputs=dict(feeds),
                envs={ENV_NAME: submit_env(cluster)},
            )
            self.submitted = await asyncio.to_thread(submit, project, cluster)
        self.topology = project.name
        logger.warning(
            "topology %s runs on Storm (%s) until killed (storm kill %s); its results stay in Storm",
            project.name,
            cluster.address,
            project.name,
        )
        return []


def _target_name(target: str) -> str:
    spec, attr = _split(target)
    if attr:
        return attr
    return Path(spec).stem if spec.endswith(".py") else spec.rpartition(".")[2]
