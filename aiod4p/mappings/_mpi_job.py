"""The program every rank of an mpi run started by :class:`MpiMapping` executes.

    mpiexec -n N python -m aiod4p.mappings._mpi_job JOB_FILE SOCKET [dispel4py]

Rank 0 reads the job (a pickled dict: ``plan``, ``feeds``, ``streamed``,
``max_delay``), broadcasts it, and talks to the launcher over the local
socket (see :mod:`aiod4p.mappings._mpi_wire`): results, statistics and the
outcome go back, drain requests and streamed inputs come in. If the run
fails, rank 0 reports the error and ends the whole job with ``MPI_Abort``.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpi4py import MPI

from .._api import loop_factory
from .._engine import Feed
from .._logging import configure_logging
from .._stats import InstanceStats
from ..errors import Aiod4pError, TargetError
from ._mpi_ranks import abort_job, run_rank
from ._mpi_wire import SocketFeed, loads, read_frame, write_frame

__all__ = ["main"]


class _SocketSink:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        await write_frame(self._writer, ("r", pe, port, items))


def _load(payload: bytes) -> dict[str, Any]:
    try:
        job: dict[str, Any] = loads(payload)
    except Exception as exc:
        raise TargetError(
            f"MPI rank {MPI.COMM_WORLD.Get_rank()} cannot load the workflow ({type(exc).__name__}: {exc});"
            " its PE classes must be importable by the ranks"
        ) from exc
    return job


async def _lead(job_path: str, address: str) -> int:
    reader, writer = await asyncio.open_unix_connection(address)
    await write_frame(writer, ("control",))
    drain_callbacks: list[Callable[[], None]] = []
    drained = False

    async def listen() -> None:
        nonlocal drained
        try:
            while True:
                await read_frame(reader)  # the only request is drain
                drained = True
                for callback in drain_callbacks:
                    callback()
        except (asyncio.IncompleteReadError, ConnectionError):
            abort_job(1)  # the launcher is gone: nobody wants this run any more

    def on_drain(callback: Callable[[], None]) -> None:
        drain_callbacks.append(callback)
        if drained:
            callback()

    listener = asyncio.create_task(listen())
    stats: dict[int, list[InstanceStats]] = {}
    try:
        payload = MPI.COMM_WORLD.bcast(Path(job_path).read_bytes(), root=0)  # noqa: ASYNC240 - small, at start
        job = _load(payload)
        feeds: dict[str, Feed] = dict(job["feeds"])
        feeds.update({pe_id: SocketFeed(address, pe_id) for pe_id in job["streamed"]})
        await run_rank(
            job["plan"],
            feeds,
            _SocketSink(writer),
            max_delay=job["max_delay"],
            on_drain=on_drain,
            publish=lambda rank, entries: stats.__setitem__(rank, entries),
        )
        await write_frame(writer, ("s", stats))
        await write_frame(writer, ("done",))
    except Exception as exc:
        error = exc if isinstance(exc, Aiod4pError) else Aiod4pError(f"MPI rank 0 failed: {type(exc).__name__}: {exc}")
        try:
            await write_frame(writer, ("e", error))
        except Exception:
            await write_frame(writer, ("e", Aiod4pError(str(error))))
        abort_job(1)
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)
    writer.close()
    return 0


async def _follow() -> int:
    job = _load(MPI.COMM_WORLD.bcast(None, root=0))
    await run_rank(job["plan"], job["feeds"], None, max_delay=job["max_delay"])
    return 0


def main(argv: list[str]) -> int:
    """Run this rank; returns its exit status (a failure aborts the whole job)."""
    rank = MPI.COMM_WORLD.Get_rank()
    configure_logging()  # PE.log() messages reach this rank's stderr, which the launcher relays
    if argv[2:] == ["dispel4py"]:  # the launcher ran a dispel4py workflow
        from .. import compat

        compat.install()
    with asyncio.Runner(loop_factory=loop_factory(True)) as runner:
        try:
            return runner.run(_lead(argv[0], argv[1]) if rank == 0 else _follow())
        except Exception:
            traceback.print_exc()
            abort_job(1)
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
