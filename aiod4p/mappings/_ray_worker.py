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
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray

from .. import compat
from .._engine import Feed
from .._plan import ExecutionPlan
from ..transports.ray import PulledComm, RayComm, RayCommHost
from ._multi_worker import serve

__all__ = ["CONTROL", "RayWorker", "ShippedCode", "link_key"]

CONTROL = "control"  # the name of a worker's end of its comm with the driver


def link_key(peer: int) -> str:
    """The name, in a worker actor, of its end of the comm with worker ``peer``."""
    return f"worker {peer}"


@dataclass(frozen=True)
class ShippedCode:
    """What a worker needs to import the workflow's code as the driver does, besides the plan itself.

    Attributes:
        paths: the driver's ``sys.path``; the entries that exist on the worker's node are added to its own
            (classes pickled by name, as dispel4py PEs are, import their modules from there).
        preload: modules the driver loaded from files that are not importable by name, imported from
            those files first (the multi mapping's preload), when the files are on the worker's node.
        dispel4py: the driver serves dispel4py's modules from aiod4p, so the worker does too.
    """

    paths: tuple[str, ...]
    preload: list[tuple[str, str]]
    dispel4py: bool

    def install(self) -> None:
        if self.dispel4py:
            compat.install()
        sys.path.extend(path for path in self.paths if path not in sys.path and os.path.isdir(path))


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
        code: ShippedCode,
    ) -> None:
        """Run this worker's share of the plan, joined to the ``peers`` actors (by worker id).

        Returns once the driver closed its end of the control comm.
        """
        code.install()
        comms = {peer: RayComm(self, link_key(peer), handle, link_key(self.wid)) for peer, handle in peers.items()}
        control = PulledComm(self, CONTROL)
        await serve(self.wid, plan_data, feeds_data, code.preload, control, comms, max_delay, interval)

    async def alive(self) -> None:
        """Never returns: the driver's pending call fails when this actor dies."""
        await asyncio.Event().wait()
