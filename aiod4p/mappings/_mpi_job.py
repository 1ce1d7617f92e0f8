"""The program every rank of an mpi run started by :class:`MpiMapping` executes.

    mpiexec -n N python -m aiod4p.mappings._mpi_job JOB_FILE SOCKET

Rank 0 reads the job (shipped by :func:`aiod4p.mappings._shipping.ship`),
broadcasts it, connects to the launcher's local socket and serves the whole
job to it (:class:`~aiod4p.mappings._mpi_ranks.RankZero` under
:func:`~aiod4p.mappings._host.serve`): results, statistics and the outcome go
back, drain requests and pumped inputs come in. If the run fails, rank 0
reports the error and ends the whole job with ``MPI_Abort``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import traceback
from pathlib import Path

from mpi4py import MPI

from .._api import loop_factory
from .._logging import configure_logging
from ..transports.pipes import open_pipe_comm
from ._host import ForwardSink, fail, pumped_feeds, serve
from ._mpi_ranks import RankZero, abort_job, run_follower
from ._shipping import unship

__all__ = ["main"]


async def _lead(job_path: str, address: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    control = await open_pipe_comm(sock)
    name = "MPI rank 0"
    try:
        payload = MPI.COMM_WORLD.bcast(Path(job_path).read_bytes(), root=0)  # noqa: ASYNC240 - small, at start
        job = unship(payload, name)
        feeds, pumped = pumped_feeds(job.feeds, control)
        sink = ForwardSink(control, "the launching process")
        group = RankZero(
            job.plan,
            feeds,
            sink,
            max_delay=job.max_delay,
            interval=job.interval,
            checkpoints=job.checkpoints,
            upward=control,
        )
    except Exception as exc:
        await fail(control, name, exc)
        abort_job(1)
        return
    if not await serve(group, control, name=name, pumped=pumped, interval=job.interval):
        abort_job(1)  # the error is reported (or the launcher is gone): end every rank


async def _follow() -> None:
    job = unship(MPI.COMM_WORLD.bcast(None, root=0), f"MPI rank {MPI.COMM_WORLD.Get_rank()}")
    if not await run_follower(
        job.plan, job.feeds, max_delay=job.max_delay, interval=job.interval, checkpoints=job.checkpoints
    ):
        abort_job(1)


def main(argv: list[str]) -> int:
    """Run this rank; returns its exit status (a failure aborts the whole job)."""
    rank = MPI.COMM_WORLD.Get_rank()
    configure_logging()  # PE.log() messages reach this rank's stderr, which the launcher relays
    with asyncio.Runner(loop_factory=loop_factory(True)) as runner:
        try:
            runner.run(_lead(argv[0], argv[1]) if rank == 0 else _follow())
        except Exception:
            traceback.print_exc()
            abort_job(1)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
