"""The mpi mapping: the workflow's instances on the ranks of an MPI job.

Two ways to run:

* under mpiexec (``mpiexec -n 4 aiod4p run wf:graph --mapping mpi``): every
  rank runs this mapping; rank 0's plan is broadcast, every rank runs the
  engine for its instances, rank 0 collects results and statistics (the
  other ranks report none);
* launched (``aiod4p run wf:graph --mapping mpi -n 4`` or
  ``aiod4p.run(graph, mapping="mpi", workers=4)``): the mapping starts the
  mpiexec of the installed MPI itself, ships the plan in a file, and streams
  results, statistics, errors and non-list inputs over a local socket to and
  from rank 0.

Instance ``i`` of a PE runs on rank ``i % ranks``; channels between ranks are
:class:`~aiod4p.transports.mpi.MpiComm` s. Needs the ``mpi`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .._engine import Feed
from .._plan import ExecutionPlan, PlanOptions
from .._results import ResultSink
from .._stats import InstanceStats
from ..errors import GraphError, InputError, MappingUnavailable, WorkerDied
from ._base import BaseMapping, RunControl
from ._mpi_env import INSTALL_HINT, find_mpiexec, job_size, mpiexec_extra_args
from ._mpi_wire import dumps, read_frame, write_frame

__all__ = ["MpiMapping"]

_STATIC_FEEDS = (int, list, tuple, range)
_STDERR_LINES = 20
_EXIT_TIMEOUT = 30.0


class MpiMapping(BaseMapping):
    """Runs a plan on MPI ranks; ``-n`` is the number of ranks (default: the CPU count).

    Attributes:
        follower: this process is an MPI rank other than 0 of a job started by
            the user's mpiexec: it reports no results (rank 0 does).
    """

    name = "mpi"
    uses_processes = True

    def __init__(self) -> None:
        self.size = job_size()
        self.follower = self.size is not None and _job_rank() != 0

    def plan_options(self, workers: int | None, batch_size: int, credits: int) -> PlanOptions:
        """Raises:
        ValueError: under mpiexec, ``workers`` differs from the job's size.
        """
        if self.size is not None:
            if workers is not None and workers != self.size:
                raise ValueError(
                    f"this mpi run has {self.size} ranks (from mpiexec); -n {workers} does not match it: drop -n"
                )
            workers = self.size
        return PlanOptions(
            workers=workers or os.cpu_count() or 1, default_parallelism=None, batch_size=batch_size, credits=credits
        )

    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        """Run ``plan`` on MPI ranks.

        Raises:
            PEError: a PE raised, on any rank.
            WorkerDied: a rank or the mpiexec died.
            MappingUnavailable: mpi4py or mpiexec is missing.
            GraphError: the workflow cannot be pickled for the ranks.
            InputError: a streamed input feeds a root placed on a rank other than 0.
        """
        if self.size is not None:
            return await self._run_in_job(plan, feeds, sink, control, max_delay)
        return await _launch(plan, feeds, sink, control, max_delay)

    async def _run_in_job(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        try:
            from ._mpi_ranks import abort_job_at_exit, broadcast_plan, run_rank
        except ImportError as exc:
            raise MappingUnavailable(f"the mpi mapping needs mpi4py: {INSTALL_HINT}") from exc
        shipped = broadcast_plan(plan)
        try:
            return await run_rank(
                shipped, feeds, sink, max_delay=max_delay, on_drain=control.on_drain, publish=control.publish_stats
            )
        except BaseException:
            abort_job_at_exit(1)  # end every rank once this one has reported (MPI_Finalize would hang)
            raise


def _job_rank() -> int:
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _split_feeds(plan: ExecutionPlan, feeds: Mapping[str, Feed]) -> tuple[dict[str, Feed], dict[str, Feed]]:
    """Feeds shipped in the job file, and feeds streamed to rank 0 over the socket."""
    static: dict[str, Feed] = {}
    streamed: dict[str, Feed] = {}
    for pe_id, feed in feeds.items():
        if isinstance(feed, _STATIC_FEEDS):
            static[pe_id] = feed
            continue
        if any(worker != 0 for worker in plan.placement[pe_id].workers):
            raise InputError(
                f"PE {pe_id} has instances on several MPI ranks; give it a list or a count as input"
                " (an iterator or async iterator can only feed a root on rank 0)"
            )
        streamed[pe_id] = feed
    return static, streamed


def _job_bytes(plan: ExecutionPlan, static: dict[str, Feed], streamed: Iterable[str], max_delay: float) -> bytes:
    job = {"plan": plan, "feeds": static, "streamed": list(streamed), "max_delay": max_delay}
    try:
        return dumps(job)
    except Exception as exc:
        raise GraphError(
            f"the mpi mapping ships the workflow and its inputs to the ranks by pickling, which failed:"
            f" {type(exc).__name__}: {exc} (define PEs and functions at module level, not in __main__ or as lambdas)"
        ) from exc


def _check_importable(plan: ExecutionPlan) -> None:
    for pe_id, pe in plan.pes.items():
        if type(pe).__module__ == "__main__":
            raise GraphError(
                f"PE {pe_id}: its class {type(pe).__name__} is defined in __main__, which the MPI ranks cannot"
                " import; define it in a module"
            )


async def _launch(
    plan: ExecutionPlan, feeds: Mapping[str, Feed], sink: ResultSink, control: RunControl, max_delay: float
) -> list[InstanceStats]:
    from .. import compat  # whether the ranks must serve dispel4py's modules too

    mpiexec = find_mpiexec()
    _check_importable(plan)
    static, streamed = _split_feeds(plan, feeds)
    payload = _job_bytes(plan, static, streamed, max_delay)
    with tempfile.TemporaryDirectory(prefix="aiod4p-mpi-") as directory:
        job_path = Path(directory, "job.pickle")
        job_path.write_bytes(payload)  # noqa: ASYNC240 - a small local file, before anything runs
        address = str(Path(directory, "rank0.sock"))
        job = _Job(sink, control, streamed)
        server = await asyncio.start_unix_server(job.connected, path=address)
        try:
            command = [
                mpiexec,
                *mpiexec_extra_args(),
                "-n",
                str(plan.workers),
                sys.executable,
                "-m",
                "aiod4p.mappings._mpi_job",
                str(job_path),
                address,
                *(["dispel4py"] if compat.installed() else []),
            ]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [p for p in sys.path if p] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            )
            try:
                process = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise MappingUnavailable(f"cannot start {mpiexec}: {exc}") from exc
            try:
                return await job.run(process)
            finally:
                await _stop(process)
        finally:
            server.close()
            await job.close()
            await server.wait_closed()


async def _stop(process: asyncio.subprocess.Process) -> None:
    """End the mpiexec and its ranks if still running, and reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(3):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


class _Job:
    """The launcher's side of a launched run: serves rank 0's connections."""

    def __init__(self, sink: ResultSink, control: RunControl, streamed: dict[str, Feed]) -> None:
        self.sink = sink
        self.control = control
        self.streamed = streamed
        self.outcome: asyncio.Future[list[InstanceStats]] = asyncio.get_running_loop().create_future()
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_LINES)
        self.handlers: set[asyncio.Task[Any]] = set()
        self.writer: asyncio.StreamWriter | None = None
        self.relay: asyncio.Task[None] | None = None
        self.control_task: asyncio.Task[Any] | None = None

    async def connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            hello = await read_frame(reader)
            if hello[0] == "control":
                self.control_task = task
                await self._control(reader, writer)
            else:
                await self._feed(hello[1], writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # rank 0 went away; the mpiexec's exit tells why
        except Exception as exc:
            if not self.outcome.done():
                self.outcome.set_exception(exc)
        finally:
            self.handlers.discard(task)
            writer.close()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.control.on_drain(self._drain)
        stats: dict[int, list[InstanceStats]] = {}
        while True:
            message = await read_frame(reader)
            kind = message[0]
            if kind == "r":
                await self.sink.emit(message[1], message[2], message[3])
            elif kind == "s":
                stats = message[1]
                for rank in sorted(stats):
                    self.control.publish_stats(rank, stats[rank])
            elif kind == "e":
                if not self.outcome.done():
                    self.outcome.set_exception(message[1])
                return
            else:
                if not self.outcome.done():
                    self.outcome.set_result([entry for rank in sorted(stats) for entry in stats[rank]])
                return

    def _drain(self) -> None:
        writer = self.writer
        if writer is not None and not writer.is_closing():
            task = asyncio.get_running_loop().create_task(write_frame(writer, ("d",)))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    async def _feed(self, pe_id: str, writer: asyncio.StreamWriter) -> None:
        feed = self.streamed[pe_id]
        try:
            if isinstance(feed, Iterable):
                iterator = iter(feed)
                while chunk := [element for _, element in zip(range(256), iterator, strict=False)]:
                    await write_frame(writer, ("i", chunk))
            else:
                chunk = []
                async for element in feed:  # type: ignore[union-attr]
                    chunk.append(element)
                    if len(chunk) >= 256:
                        await write_frame(writer, ("i", chunk))
                        chunk = []
                if chunk:
                    await write_frame(writer, ("i", chunk))
        except (ConnectionError, asyncio.IncompleteReadError):
            return  # rank 0 stopped reading: drained, or the run ended
        except Exception as exc:
            await write_frame(writer, ("e", InputError(f"the input of PE {pe_id} raised {type(exc).__name__}: {exc}")))
            return
        await write_frame(writer, ("end",))

    async def run(self, process: asyncio.subprocess.Process) -> list[InstanceStats]:
        assert process.stderr is not None
        self.relay = relay = asyncio.create_task(self._relay(process.stderr))
        exited = asyncio.create_task(process.wait())
        try:
            waited: set[asyncio.Future[Any]] = {self.outcome, exited}
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            if not self.outcome.done() and self.control_task is not None:
                await asyncio.wait({self.control_task})  # what rank 0 sent before exiting is still arriving
            if not self.outcome.done():
                await relay  # the mpiexec exited: let its last words arrive
                tail = "".join(self.stderr_tail).strip()
                raise WorkerDied(
                    f"mpiexec exited with status {process.returncode} before the run finished"
                    + (f"; its last output:\n{tail}" if tail else "")
                )
            stats = self.outcome.result()  # raises the run's error
            try:
                async with asyncio.timeout(_EXIT_TIMEOUT):
                    code = await asyncio.shield(exited)
            except TimeoutError:
                raise WorkerDied(f"the MPI ranks did not exit within {_EXIT_TIMEOUT:.0f} s after the run") from None
            if code != 0:
                raise WorkerDied(f"mpiexec exited with status {code} after the run finished")
            return stats
        finally:
            if not self.outcome.done():
                self.outcome.cancel()
            exited.cancel()
            await asyncio.gather(exited, return_exceptions=True)

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        """Pass the ranks' stderr on, keeping its last lines for error messages."""
        while line := await stream.readline():
            text = line.decode(errors="replace")
            self.stderr_tail.append(text)
            if text.startswith("Abort(") and self.outcome.done():
                continue  # rank 0 ending the job after reporting the run's error: expected
            sys.stderr.write(text)

    async def close(self) -> None:
        """Stop serving rank 0; once the mpiexec is reaped, read its stderr to the end."""
        if self.relay is not None:
            try:
                async with asyncio.timeout(_EXIT_TIMEOUT):
                    await self.relay
            except TimeoutError:
                self.relay.cancel()
                await asyncio.gather(self.relay, return_exceptions=True)
        handlers = list(self.handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
