"""The program every rank of an mpi run started by :class:`MpiMapping` executes.

    mpiexec -n N python -m aiod4p.mappings._mpi_job SOCKET [TARGET]

The launcher may start the ranks before it has a job for them: with the
workflow's ``TARGET`` (as given to ``aiod4p run``), every rank imports the
workflow's module while the launcher loads and plans it (a head start; see
:func:`aiod4p._loading.preload`). Rank 0 connects to the launcher's local
socket, takes the launcher's stdin as its own (:func:`._mpi_env.take_stdin`),
receives the job (shipped by :func:`aiod4p.mappings._shipping.ship`),
and broadcasts it once every rank is ready; the ranks wait for it without
spinning. Rank 0 then serves the whole job to the launcher
(:class:`~aiod4p.mappings._mpi_ranks.RankZero` under
:func:`~aiod4p.mappings._host.serve`): results, statistics and the outcome go
back, drain requests and pumped inputs come in. If the run fails, rank 0
reports the error and ends the whole job with ``MPI_Abort``; if the launcher
goes away before sending the job, rank 0 ends the job quietly.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import traceback

from mpi4py import MPI

from .._api import loop_factory
from .._loading import preload
from .._logging import configure_logging, launcher_logging
from .._signals import report_crashes
from .._threads import exit_past_threads
from ..transports.pipes import open_pipe_comm
from ._host import ForwardSink, fail, pumped_feeds, serve
from ._mpi_env import receive_job, take_launcher_state, take_stdin
from ._mpi_ranks import RankZero, abort_job, every_rank_here, every_rank_ready, run_follower
from ._shipping import unship_or_error

__all__ = ["main"]


async def _lead(sock: socket.socket) -> None:
    try:
        await take_stdin(sock)
        payload = await receive_job(sock)
    except ConnectionError:
        abort_job(1)  # the launcher gave up the run (it failed to load the workflow, and reported it)
        return
    name = "MPI rank 0"
    await every_rank_here()  # the other ranks wait there for the job without spinning (a bcast would spin)
    # Loaded before the control comm opens: it unpickles messages as they arrive, and a pumped item may be
    # of a class the job brings along (a notebook's, which loading sets on this process's __main__).
    loaded = unship_or_error(MPI.COMM_WORLD.bcast(payload, root=0), name)
    control = await open_pipe_comm(sock)
    try:
        if isinstance(loaded, Exception):
            raise loaded
        job = loaded
        feeds, pumped = pumped_feeds(job.feeds, control)
        sink = ForwardSink.for_plan(control, "the launching process", job.plan.options)
        group = RankZero(
            job.plan,
            feeds,
            sink,
            max_delay=job.max_delay,
            interval=job.interval,
            checkpoints=job.checkpoints,
            upward=control,
        )
        if job.drained:
            group.drain()
    except Exception as exc:
        await fail(control, name, exc)
        abort_job(1)
        return
    if not await serve(group, control, name=name, sink=sink, pumped=pumped, interval=job.interval):
        abort_job(1)  # the error is reported (or the launcher is gone): end every rank


async def _follow() -> None:
    await every_rank_here()  # until rank 0 has the job
    # A job this rank cannot load is reported to rank 0 (run_follower), as a PE's error is: rank 0 names it to the
    # launcher, where mpiexec's exit status followed the rank's traceback, twice.
    job = unship_or_error(MPI.COMM_WORLD.bcast(None, root=0), f"MPI rank {MPI.COMM_WORLD.Get_rank()}")
    if not await run_follower(job):
        abort_job(1)


def main(argv: list[str]) -> int:
    """Run this rank (``argv``: the launcher's socket, and optionally the workflow's target to import
    ahead); returns its exit status (a failure aborts the whole job)."""
    address, *target = argv
    report_crashes()
    take_launcher_state()
    rank = MPI.COMM_WORLD.Get_rank()
    configure_logging(*(launcher_logging() or (0, False)))  # PE.log() messages reach this rank's stderr, relayed
    with asyncio.Runner(loop_factory=loop_factory(True)) as runner:
        # First: from here on, no end of the job leaves its shared memory and topology file behind. The launcher
        # notes them once it has handed the job over; a job that ended before (a rank killed while it imported
        # the workflow, or just after the hand-over) left them.
        runner.run(every_rank_ready())
        sock: socket.socket | None = None
        if rank == 0:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(address)
            sock.setblocking(False)
        if target:
            from .. import compat  # the CLI installs it before it loads a workflow: import the same way

            compat.install()
            preload(target[0])
        try:
            runner.run(_lead(sock) if sock is not None else _follow())
        except Exception:
            traceback.print_exc()
            abort_job(1)
            return 1
    return 0


if __name__ == "__main__":
    # A thread a PE left running would keep the rank alive (Python waits for it before finalizing MPI), and
    # the launcher would wait for the rank, 30 s, then stop it.
    exit_past_threads(main(sys.argv[1:]), MPI.Finalize)
