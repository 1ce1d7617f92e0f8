"""The ray mapping's worker: a Ray actor serving its share of the job with the worker host.

What is Ray's is only where messages travel: the control comm is a
:class:`~aiod4p.transports.ray.PulledComm` (the driver takes what the worker
sends), and the comms to other workers are
:class:`~aiod4p.transports.ray.RayComm` ends joining actors. The rest is the
worker host's (:func:`~aiod4p.mappings._host.serve_job`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from ..transports.ray import PulledComm, RayComm, RayCommHost
from ._host import serve_job
from ._shipping import IMPORTABLE, unship_or_error

__all__ = ["CONTROL", "RayWorker", "link_key"]

CONTROL = "control"  # the name of a worker's end of its comm with the driver
_IMPORTABLE_ON_RAY = (
    f"{IMPORTABLE}, on its node: install what they import on the cluster's nodes, or ship the directories of the"
    " workflow's own modules (aiod4p run --working-dir DIR, or a runtime environment's py_modules)"
)


def link_key(peer: int) -> str:
    """The name, in a worker actor, of its end of the comm with worker ``peer``."""
    return f"worker {peer}"


def _extend_path(paths: Sequence[str]) -> None:
    """Add to ``sys.path`` the entries of ``paths`` that it lacks and that exist on this node."""
    sys.path.extend(path for path in paths if path not in sys.path and os.path.isdir(path))


class RayWorker(RayCommHost):
    """Worker ``wid`` of one run; the mapping starts it as a Ray actor (``ray.remote(RayWorker)``)."""

    def __init__(self, wid: int) -> None:
        self.wid = wid

    async def where(self) -> tuple[str, int]:
        """The id of the Ray node this actor runs on, and its process id (answered once it started)."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    async def serve(
        self, payload: bytes, peers: Mapping[int, Any], paths: Sequence[str], argv: Sequence[str], cwd: str
    ) -> None:
        """Run this worker's share of the shipped job, joined to the ``peers`` actors (by worker id).

        ``paths`` is the driver's ``sys.path``: the entries that exist on this
        node (relative ones from the worker's working directory, below) are
        added to the worker's (classes pickled by name, as dispel4py PEs are,
        import their modules from there). ``argv`` is the driver's
        ``sys.argv``, which becomes the worker's before the job's modules are
        imported (a workflow may read the command line at import, as
        multiprocessing's spawned workers let it). ``cwd`` is the driver's
        working directory, which becomes the worker's if it exists on this
        node (a PE opens relative paths there, as on multi; the actor
        started in its cluster's), unless a runtime environment's
        ``working_dir`` gave the worker its own. Returns once the driver
        closed its end of the control comm.
        """
        name = f"worker {self.wid}"
        sys.argv = list(argv)
        if not ray.get_runtime_context().runtime_env.get("working_dir"):  # else Ray's copy of it, as asked
            with contextlib.suppress(OSError):  # not on this node
                os.chdir(cwd)
        _extend_path(paths)  # in the directory relative entries are found from ("lib", a notebook's "..")
        control = PulledComm(self, CONTROL)
        comms = {peer: RayComm(self, link_key(peer), handle, link_key(self.wid)) for peer, handle in peers.items()}
        try:
            job = unship_or_error(payload, f"Ray worker actor {self.wid}", _IMPORTABLE_ON_RAY)
            await serve_job(job, self.wid, control, comms, name=name, launcher="the Ray driver")
        finally:
            for comm in comms.values():
                comm.abort()

    async def alive(self) -> None:
        """Never returns: the driver's pending call fails when this actor dies."""
        await asyncio.Event().wait()
