"""What every rank of an mpi run does, whoever started the mpiexec.

Every rank runs the engine (:class:`aiod4p._engine.Worker`) for the instances
the plan places on it, with an :class:`~aiod4p.transports.mpi.MpiComm` to
every other rank. Besides, each rank k > 0 has a control comm to rank 0 that
carries its results (rank 0 delivers them), then its statistics, or its
error; rank 0 sends drain requests the other way.

Failure: a rank whose worker fails reports the error to rank 0 and waits for
rank 0 to end the job (``MPI_Abort``); if rank 0 never does, it gives up
after :data:`ABORT_GRACE` seconds and fails itself, which makes mpiexec end
the job.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import sys
import termios
import time
from collections.abc import Callable, Mapping
from typing import Any

from mpi4py import MPI

from .._engine import Feed, Worker
from .._plan import ExecutionPlan
from .._results import ResultSink
from .._stats import InstanceStats
from ..errors import Aiod4pError, EndOfChannel, GraphError, PEError, WorkerDied
from ..transports.mpi import MpiComm, MpiEndpoint
from ._mpi_wire import dumps, loads

__all__ = ["ABORT_GRACE", "abort_job", "abort_job_at_exit", "broadcast_plan", "run_rank"]

LINK_KEY, CONTROL_KEY = 1, 2
ABORT_GRACE = 20.0
CAUSE_GRACE = 2.0
_RESULT, _STATS, _ERROR, _DRAIN = "r", "s", "e", "d"


def broadcast_plan(plan: ExecutionPlan | None) -> ExecutionPlan:
    """Give every rank rank 0's plan (collective; other ranks pass anything).

    Raises:
        GraphError: rank 0's plan cannot be pickled (on every rank).
    """
    comm = MPI.COMM_WORLD
    payload: bytes | str | None = None
    if comm.Get_rank() == 0:
        try:
            payload = dumps(plan)
        except Exception as exc:
            payload = f"the mpi mapping ships the workflow to its ranks by pickling, which failed: {exc}"
    payload = comm.bcast(payload, root=0)
    if isinstance(payload, str):
        raise GraphError(payload)
    assert payload is not None
    shipped: ExecutionPlan = loads(payload)
    return shipped


def abort_job(code: int = 1) -> None:
    """End every rank of the job now, once this rank's output has left for mpiexec."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
        _wait_until_read(stream)
    MPI.COMM_WORLD.Abort(code)


def _wait_until_read(stream: Any, limit: float = 1.0) -> None:
    # MPI_Abort tears down mpiexec's forwarding of this rank's pipes: what it has not read yet
    # (the error message, typically) would be lost. Wait, briefly, until the pipe is empty.
    deadline = time.monotonic() + limit
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fd = stream.fileno()
        while time.monotonic() < deadline:
            unread = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
            if int.from_bytes(unread, sys.byteorder) == 0:
                return
            time.sleep(0.005)  # polling the kernel's pipe counter; there is no event for "read"


def abort_job_at_exit(code: int = 1) -> None:
    """End every rank of the job when this process exits (so it can report first)."""
    atexit.register(abort_job, code)


class _ForwardSink:
    """A rank k > 0 hands its results to rank 0."""

    def __init__(self, control: MpiComm) -> None:
        self._control = control

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        await self._control.send((_RESULT, pe, port, items))


async def run_rank(
    plan: ExecutionPlan,
    feeds: Mapping[str, Feed],
    sink: ResultSink | None,
    *,
    max_delay: float,
    on_drain: Callable[[Callable[[], None]], None] | None = None,
    publish: Callable[[int, list[InstanceStats]], None] | None = None,
) -> list[InstanceStats]:
    """Run this rank's share of ``plan``; collective over ``MPI.COMM_WORLD``.

    On rank 0, results of every rank reach ``sink``, ``on_drain`` registers the
    callback that drains every rank, ``publish`` receives each rank's
    statistics, and the statistics of every instance are returned. On the other
    ranks, ``sink``, ``on_drain`` and ``publish`` are not used and the rank's own
    statistics are returned.

    Raises:
        PEError: a PE raised (on rank 0: on any rank; elsewhere: on this
            rank, after :data:`ABORT_GRACE` seconds if rank 0 did not end the job).
        WorkerDied: a rank ended its part without reporting (rank 0).
        TransportError: MPI failed.
    """
    endpoint = MpiEndpoint()
    rank, size = endpoint.rank, endpoint.size
    peers = {other: endpoint.comm(other, LINK_KEY) for other in range(size) if other != rank}
    if rank == 0:
        if sink is None:
            raise ValueError("rank 0 of an mpi run needs a result sink")
        controls = {other: endpoint.comm(other, CONTROL_KEY) for other in range(1, size)}
        worker = Worker(plan, 0, feeds=feeds, results=sink, peers=peers, max_delay=max_delay)
        return await _lead(endpoint, worker, controls, sink, on_drain, publish)
    control = endpoint.comm(0, CONTROL_KEY)
    worker = Worker(plan, rank, feeds=feeds, results=_ForwardSink(control), peers=peers, max_delay=max_delay)
    return await _follow(endpoint, worker, control)


async def _lead(
    endpoint: MpiEndpoint,
    worker: Worker,
    controls: dict[int, MpiComm],
    sink: ResultSink,
    on_drain: Callable[[Callable[[], None]], None] | None,
    publish: Callable[[int, list[InstanceStats]], None] | None,
) -> list[InstanceStats]:
    stats: dict[int, list[InstanceStats]] = {}
    drains: set[asyncio.Task[None]] = set()

    def drain() -> None:
        worker.drain()
        for control in controls.values():
            task = asyncio.get_running_loop().create_task(_send_drain(control))
            drains.add(task)
            task.add_done_callback(drains.discard)

    async def collect(rank: int, control: MpiComm) -> None:
        while True:
            try:
                message = await control.receive()
            except EndOfChannel:
                break
            kind = message[0]
            if kind == _RESULT:
                await sink.emit(message[1], message[2], message[3])
            elif kind == _STATS:
                stats[rank] = message[1]
                if publish is not None:
                    publish(rank, message[1])
            else:
                raise message[1]
        if rank not in stats:
            raise WorkerDied(f"MPI rank {rank} ended its part of the run without reporting")

    if publish is not None:
        publish(0, worker.stats)
    if on_drain is not None:
        on_drain(drain)
    running = asyncio.create_task(worker.run(), name="rank 0 worker")
    tasks: list[asyncio.Task[Any]] = [running]
    tasks += [asyncio.create_task(collect(r, c), name=f"rank {r} control") for r, c in controls.items()]
    try:
        await _first_failure(tasks)
    except BaseException:
        for task in [*tasks, *drains]:
            task.cancel()
        await asyncio.gather(*tasks, *drains, return_exceptions=True)
        raise
    stats[0] = running.result()
    if drains:
        await asyncio.gather(*drains, return_exceptions=True)
    await endpoint.aclose()
    return [entry for rank in sorted(stats) for entry in stats[rank]]


async def _send_drain(control: MpiComm) -> None:
    with contextlib.suppress(Aiod4pError):  # that rank already finished: nothing left to drain
        await control.send((_DRAIN,))


async def _follow(endpoint: MpiEndpoint, worker: Worker, control: MpiComm) -> list[InstanceStats]:
    async def listen() -> None:
        while True:
            try:
                message = await control.receive()
            except EndOfChannel:
                return
            if message[0] == _DRAIN:
                worker.drain()

    listener = asyncio.create_task(listen(), name="rank control listener")
    try:
        stats = await worker.run()
    except Aiod4pError as exc:
        await control.send((_ERROR, exc))
        await asyncio.sleep(ABORT_GRACE)  # rank 0 ends the job; this is only a fallback
        raise
    except BaseException:
        listener.cancel()
        raise
    await control.send((_STATS, stats))
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)
    await endpoint.aclose()
    return stats


async def _first_failure(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for every task; raise the first exception any of them raises.

    A PE's error wins over the transport errors it causes on other ranks
    (whose channels it closed when it failed): after a non-PE error, other
    tasks get :data:`CAUSE_GRACE` seconds to report a :class:`PEError`.
    """
    pending = set(tasks)
    first: BaseException | None = None
    while pending:
        timeout = None if first is None else CAUSE_GRACE
        done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        if not done:
            break
        for task in done:
            error = None if task.cancelled() else task.exception()
            if isinstance(error, PEError):
                raise error
            if error is not None and first is None:
                first = error
    if first is not None:
        raise first
