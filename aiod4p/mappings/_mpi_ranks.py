"""What every rank of an mpi run does, whoever started the mpiexec.

Every rank runs the engine (:class:`aiod4p._engine.Worker`) for the instances
the plan places on it, with an :class:`~aiod4p.transports.mpi.MpiComm` to
every other rank. Rank 0 is the launcher of the others as far as the worker
host (:mod:`aiod4p.mappings._host`) is concerned: every rank k > 0 serves its
worker over an MPI control comm to rank 0, rank 0 serves its own worker over
an in-memory comm, and one supervisor on rank 0 watches them all
(:class:`RankZero`).

Failure: a rank whose worker fails reports the error to rank 0 and waits for
rank 0 to end the job (``MPI_Abort``); if rank 0 never does, it gives up
after :data:`FOLLOWER_ABORT_GRACE` seconds and fails itself, which makes mpiexec end
the job. Under the user's mpiexec, every rank says whether it goes on to run
the workflow or leaves while starting (:class:`StartUp`), so that all go on
or all end.
"""

from __future__ import annotations

import array
import asyncio
import atexit
import contextlib
import fcntl
import functools
import sys
import termios
import time
from collections.abc import Mapping
from typing import Any

from mpi4py import MPI

from .._checkpoint import RelayCheckpoints, WorkerSpec, attach_worker
from .._engine import Feed, Worker
from .._plan import ExecutionPlan
from .._results import ResultSink
from .._signals import Stopped
from .._stats import InstanceStats
from ..errors import GraphError, WorkerDied
from ..transports import Comm, memory_comm_pair
from ..transports.mpi import MpiEndpoint
from ._base import RunControl
from ._host import STATS_INTERVAL, ForwardSink, Supervisor, serve, serve_job
from ._mpi_env import SaidByRankZero, forget_shared_memory, forget_topology_file
from ._shipping import Job, ship, unship

__all__ = [
    "ABORTED",
    "FOLLOWER_ABORT_GRACE",
    "RankZero",
    "StartUp",
    "abort_job",
    "abort_job_at_exit",
    "broadcast_plan",
    "every_rank_here",
    "every_rank_ready",
    "run_follower",
]

LINK_KEY, CONTROL_KEY = 1, 2
FOLLOWER_ABORT_GRACE = 20.0
CAUSE_GRACE = 2.0
ABORTED = 130  # the exit status of a run that a signal stopped while it started (aiod4p run's)
_FAILED = -1  # what a rank that failed while starting says (StartUp.leave)


async def _completion(request: MPI.Request) -> None:
    """Wait until ``request`` completes, polling: a rank blocked in an MPICH call spins at 100% CPU, which
    would slow the launcher and the other ranks while they load the workflow."""
    delay = 0.0005
    while not request.Test():
        await asyncio.sleep(delay)
        delay = min(2 * delay, 0.005)


def _forget_job_files() -> None:
    forget_shared_memory()
    forget_topology_file()


async def every_rank_here() -> None:
    """Wait until every rank has reached this point, without spinning."""
    await _completion(MPI.COMM_WORLD.Ibarrier())


async def every_rank_ready() -> None:
    """Wait until every rank has reached this point, without spinning (:func:`every_rank_here`); then no rank
    is starting, and this one forgets the names of its shared memory and of its proxy's topology file, so that
    no end of the job leaves them behind (see :func:`forget_shared_memory`, :func:`forget_topology_file`).
    Call it as soon as MPI is initialized: until then, only a launcher that noted them removes them."""
    await every_rank_here()
    _forget_job_files()


class StartUp:
    """This rank's say, under the user's mpiexec, in whether the job goes on to run the workflow.

    Every rank says it once, collectively and without spinning: it goes on (:meth:`go_on`, with the plan),
    or it leaves while starting (:meth:`leave`: a signal stopped it, or it failed: it could not load or plan
    the workflow, say); and hears what every other rank said. Then every rank goes on, or every rank ends by itself,
    through ``MPI_Finalize``. A rank that simply exited left the others waiting for it forever: in
    ``MPI_Init``, spinning at full CPU, if it had not initialized MPI (Hydra ends a job only when a rank
    that connected to it exits), else in a collective call.

    A rank that said it goes on and is then stopped before every rank has said still leaves: if every
    other rank goes on, it ends the job (``MPI_Abort``).
    """

    def __init__(self) -> None:
        self._said = array.array("i", [0])
        self._heard = array.array("i", [0] * MPI.COMM_WORLD.Get_size())
        self._request: MPI.Request | None = None
        self._reason = ""  # why this rank failed, as it said with its state
        self.reasons: dict[int, str] = {}  # why each rank that failed while starting failed
        self._told = False  # this rank has taken part in telling the reasons (once, as every rank does)
        self.agreed = False  # every rank has said whether it goes on (and the failures' reasons are known)

    @property
    def all_went_on(self) -> bool:
        """Every rank has said, and said it goes on."""
        return self.agreed and not any(self._heard)

    async def _say(self, state: int, reason: str = "") -> None:
        """Say ``state`` (0: going on, else why this rank leaves; ``reason``: the error of a rank that failed)
        unless this rank has said already; wait until every rank has, hear the reasons of those that failed,
        then forget the job's files (:func:`every_rank_ready`)."""
        if self._request is None:
            self._said[0], self._reason = state, reason
            self._request = MPI.COMM_WORLD.Iallgather([self._said, MPI.INT], [self._heard, MPI.INT])
        await _completion(self._request)
        if not self._told:
            self._told = True  # before the call: a signal handled after it must not make this rank call it again
            if _FAILED in self._heard:
                # Every rank gets here right after the exchange above completed: a short blocking call.
                told = MPI.COMM_WORLD.allgather(self._reason)
                self.reasons = {rank: told[rank] for rank, state in enumerate(self._heard) if state == _FAILED}
        self.agreed = True
        _forget_job_files()

    def said_by_rank_zero(self, reason: str | None) -> bool:
        """Whether rank 0 says what this rank would, once every rank has said: that this rank failed while
        starting, for ``reason``, or (``None``: this rank went on) that another one did. Rank 0 then says
        either its own error or, having gone on, which ranks failed and why; never when a signal stopped it."""
        if MPI.COMM_WORLD.Get_rank() == 0:
            return False
        if self._heard[0] == 0:
            return True
        return self._heard[0] == _FAILED and (reason is None or self.reasons.get(0) == reason)

    async def go_on(self) -> None:
        """Say that this rank goes on, and wait until every rank has said whether it does.

        Raises:
            Stopped: another rank was stopped by a signal while it started: the run ends on every rank.
            WorkerDied: another rank failed while starting (loading or planning the workflow; it says why):
                likewise.
        """
        await self._say(0)
        left = {rank: state for rank, state in enumerate(self._heard) if state}
        if stopped := [state for state in left.values() if state > 0]:
            raise Stopped(stopped[0])
        if left:
            by_reason: dict[str, list[int]] = {}
            for rank, reason in self.reasons.items():
                by_reason.setdefault(reason, []).append(rank)
            why = "; ".join(
                f"MPI rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {reason or 'failed'}"
                for reason, ranks in by_reason.items()
            )
            failure = WorkerDied if not self.said_by_rank_zero(None) else SaidByRankZero
            raise failure(f"the workflow failed to start, so no rank runs it: {why}")

    async def leave(self, signum: int | None, reason: str = "") -> None:
        """Say that this rank leaves (stopped by signal ``signum``; ``None``: it failed, for ``reason``), unless
        it has said already, and wait until every rank has said. If every rank goes on (this one had said so
        before it was stopped), end the whole job now: exit status :data:`ABORTED` for a signal, else 1."""
        await self._say(_FAILED if signum is None else signum, reason)
        if self.all_went_on:
            abort_job(1 if signum is None else ABORTED)


async def broadcast_plan(plan: ExecutionPlan | None, start_up: StartUp) -> ExecutionPlan:
    """Give every rank rank 0's plan once every rank goes on (collective; other ranks pass anything).

    Raises:
        Stopped: another rank was stopped by a signal while it started (:meth:`StartUp.go_on`).
        WorkerDied: another rank failed while starting.
        GraphError: rank 0's plan cannot be pickled (on every rank).
        TargetError: this rank cannot load the workflow's code.
    """
    comm = MPI.COMM_WORLD
    payload: bytes | str | None = None
    if comm.Get_rank() == 0:
        assert plan is not None
        try:
            payload = ship(Job(plan, {}, 0.0, 0.0), "start the MPI ranks")
        except GraphError as exc:
            payload = str(exc)
    await start_up.go_on()
    payload = comm.bcast(payload, root=0)
    if isinstance(payload, str):
        raise GraphError(payload)
    assert payload is not None
    return unship(payload, f"MPI rank {comm.Get_rank()}").plan


def abort_job(code: int = 1) -> None:
    """End every rank of the job now, once this rank's output has left for mpiexec."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
        _wait_until_read(stream)
    MPI.COMM_WORLD.Abort(code)


def _wait_until_read(stream: Any) -> None:
    # MPI_Abort tears down mpiexec's forwarding of this rank's pipes: what it has not read yet
    # (the error message, typically) would be lost. Wait, briefly, until the pipe is empty.
    deadline = time.monotonic() + 1.0
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


class RankZero:
    """Rank 0 of a job: its own share of the plan, and the supervisor of every rank.

    Run it directly under the user's mpiexec, or :func:`~aiod4p.mappings._host.serve`
    it to a launching process (it is a :class:`~aiod4p.mappings._host.Servable`).
    Collective over ``MPI.COMM_WORLD`` with :func:`run_follower` on the other ranks.

    Args:
        plan: the plan every rank runs.
        feeds: the feeds of the roots on rank 0.
        sink: where the results of every rank go.
        control: drain requests and statistics (a new one if ``None``).
        max_delay: the engine's batching delay.
        interval: seconds between two statistics reports of a rank.
        checkpoints: take checkpoints so (launched runs only); ``upward`` is the comm to the launcher.
    """

    def __init__(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl | None = None,
        *,
        max_delay: float,
        interval: float = STATS_INTERVAL,
        checkpoints: WorkerSpec | None = None,
        upward: Comm | None = None,
    ) -> None:
        self.plan = plan
        self.spec = checkpoints
        self.upward = upward
        self.checkpoints: RelayCheckpoints | None = None
        self.feeds = feeds
        self.sink = sink
        self.control = control or RunControl()
        self.max_delay = max_delay
        self.interval = interval

    @property
    def stats(self) -> list[InstanceStats]:
        """The latest statistics of every rank."""
        return self.control.stats()

    def drain(self) -> None:
        self.control.drain()

    async def run(self) -> list[InstanceStats]:
        """Run the job; returns the final statistics of every instance on every rank.

        Raises:
            PEError: a PE raised, on any rank.
            WorkerDied: a rank ended its part without reporting, or MPI failed (a rank died).
            TransportError: a channel failed otherwise (an item that cannot be pickled).
        """
        endpoint = MpiEndpoint()
        peers = {other: endpoint.comm(other, LINK_KEY) for other in range(1, endpoint.size)}
        controls: dict[int, Comm] = {other: endpoint.comm(other, CONTROL_KEY) for other in range(1, endpoint.size)}
        near, far = memory_comm_pair()
        controls[0] = near
        sink = ForwardSink.for_plan(far, "rank 0", self.plan.options)
        worker = Worker(self.plan, 0, feeds=self.feeds, results=sink, peers=peers, max_delay=self.max_delay)
        if self.spec is not None:
            assert self.upward is not None
            attach_worker(worker, self.spec, far)
            self.checkpoints = RelayCheckpoints(self.spec, controls, self.upward, self.sink)
        local = asyncio.create_task(serve(worker, far, name="MPI rank 0", sink=sink, interval=self.interval))
        supervisor = Supervisor(
            self.plan,
            dict(sorted(controls.items())),
            self.sink,
            self.control,
            grace=CAUSE_GRACE,
            death=functools.partial(_silent, endpoint),
            checkpoints=self.checkpoints,
        )
        try:
            stats = await supervisor.run()
        except BaseException:
            local.cancel()
            await asyncio.gather(local, return_exceptions=True)
            raise
        await local
        await endpoint.aclose()
        return stats


async def _silent(endpoint: MpiEndpoint, rank: int) -> str:
    """Why rank ``rank``'s control comm ended without its report. When MPI failed on this rank, every comm
    ended at once: which rank died, only mpiexec knows (the launcher asks it)."""
    if endpoint.failure is not None:
        return f"{endpoint.failure} (MPI rank {rank} could not report)"
    return f"MPI rank {rank} ended its part of the run without reporting"


async def run_follower(job: Job | Exception) -> bool:
    """Serve this rank's (k > 0) share of ``job`` to rank 0; collective with :class:`RankZero`. ``job`` may be why
    this rank could not load it (see :func:`~aiod4p.mappings._shipping.unship_or_error`): reported as a failure.

    Returns:
        Whether the rank's run succeeded. On a failure, reported to rank 0,
        it waits up to :data:`FOLLOWER_ABORT_GRACE` seconds for rank 0 to end the job.
    """
    endpoint = MpiEndpoint()
    rank = endpoint.rank
    peers = {other: endpoint.comm(other, LINK_KEY) for other in range(endpoint.size) if other != rank}
    control = endpoint.comm(0, CONTROL_KEY)
    succeeded = await serve_job(
        job, rank, control, peers, name=f"MPI rank {rank}", launcher="MPI rank 0", goodbye_timeout=FOLLOWER_ABORT_GRACE
    )
    if succeeded:
        await endpoint.aclose()
    return succeeded
