"""The ray mapping's worker: a Ray actor hosting the engine, as a multi worker process does.

Everything a worker does is the multi mapping's worker loop
(:func:`~aiod4p.mappings._multi_worker.serve`): the same control messages,
result sink, feed credits and error reports. What is Ray's is only where they
travel: the control comm is a :class:`~aiod4p.transports.ray.PulledComm` (the
driver takes what the worker sends), and the comms to other workers are
:class:`~aiod4p.transports.ray.RayComm` ends joining actors.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

import ray

from .._engine import Feed
from .._plan import ExecutionPlan
from ..transports.ray import PulledComm, RayComm, RayCommHost
from ._multi_worker import serve

__all__ = ["CONTROL", "RayWorker", "link_key"]

CONTROL = "control"  # the name of a worker's end of its comm with the driver


def link_key(peer: int) -> str:
    """The name, in a worker actor, of its end of the comm with worker ``peer``."""
    return f"worker {peer}"


class RayWorker(RayCommHost):
    """Worker ``wid`` of one run; the mapping starts it as a Ray actor (``ray.remote(RayWorker)``)."""

    def __init__(self, wid: int) -> None:
        self.wid = wid

    async def where(self) -> tuple[str, int]:
        """The id of the Ray node this actor runs on, and its process id (answered once it started)."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    async def serve(
        self,
        plan_data: ExecutionPlan | bytes,
        feeds_data: Mapping[str, Feed] | bytes,
        peers: Mapping[int, Any],
        max_delay: float,
        interval: float,
    ) -> None:
        """Run this worker's share of the plan, joined to the ``peers`` actors (by worker id).

        Returns once the driver closed its end of the control comm.
        """
        comms = {peer: RayComm(self, link_key(peer), handle, link_key(self.wid)) for peer, handle in peers.items()}
        await serve(self.wid, plan_data, feeds_data, [], PulledComm(self, CONTROL), comms, max_delay, interval)

    async def alive(self) -> None:
        """Never returns: the driver's pending call fails when this actor dies."""
        await asyncio.Event().wait()
