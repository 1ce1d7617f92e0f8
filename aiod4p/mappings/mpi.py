"""The mpi mapping: the workflow's instances on the ranks of an MPI job.

Two ways to run:

* under mpiexec (``mpiexec -n 4 aiod4p run wf:graph --mapping mpi``): every
  rank runs this mapping; rank 0's plan is broadcast, every rank runs the
  engine for its instances, rank 0 collects results and statistics (the
  other ranks report none);
* launched (``aiod4p run wf:graph --mapping mpi -n 4`` or
  ``aiod4p.run(graph, mapping="mpi", workers=4)``): the mapping starts the
  mpiexec of the installed MPI itself, sends the job to rank 0 on a local
  socket (after this process's stdin, as a descriptor:
  :func:`._mpi_env.hand_stdin`), and supervises rank 0 over a pipe comm on
  that socket (the worker host's control messages: results, statistics,
  errors, drain, pumped inputs). The ranks' stdout and stderr reach this
  process's stderr: stdout carries only what the caller writes (``--results
  -``). The CLI starts the mpiexec before it loads the workflow
  (:meth:`MpiMapping.head_start`): the ranks import the workflow's module
  while the CLI loads and plans it.

Instance ``i`` of a PE runs on rank ``i % ranks``; channels between ranks are
:class:`~aiod4p.transports.mpi.MpiComm` s. Needs the ``mpi`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .._checkpoint import LauncherCheckpoints, Session
from .._engine import Feed
from .._plan import ExecutionPlan, PlanOptions
from .._processes import LEFTOVER_GRACE, descendants, ended, kill_left, pidfds
from .._results import ResultSink
from .._signals import Stopped, die_with_parent, held
from .._stats import InstanceStats
from ..errors import (
    Aiod4pError,
    CheckpointError,
    InputError,
    MappingUnavailable,
    PeerDied,
    TransportError,
    WorkerDied,
)
from ..transports.pipes import PipeComm, open_pipe_comm
from ._base import BaseMapping, RunControl, available_cpus
from ._host import STATS_INTERVAL, Supervisor, prepare_job
from ._mpi_env import (
    NEEDS_MPI4PY,
    SaidByRankZero,
    files_held,
    find_mpiexec,
    hand_stdin,
    is_hydra,
    job_frame,
    job_rank,
    job_size,
    mpiexec_extra_args,
    names_hosts,
    rank_environment,
    ranks_here,
    ranks_of,
)
from ._shipping import Job, ship, shipped_drained

if TYPE_CHECKING:
    from ._mpi_ranks import StartUp

__all__ = ["MpiMapping"]

logger = logging.getLogger("aiod4p.mpi")

_OUTPUT_LINES = 20
_EXIT_TIMEOUT = 30.0
_EXIT_GRACE = 5.0  # after rank 0's connection ends: for the mpiexec to exit, and to say why


class MpiMapping(BaseMapping):
    """Runs a plan on MPI ranks; ``-n`` is the number of ranks (default: the CPU count).

    Attributes:
        follower: this process is an MPI rank other than 0 of a job started by
            the user's mpiexec: it reports no results (rank 0 does).
    """

    name = "mpi"
    uses_processes = True
    supports_checkpoints = True
    workers_started = ("rank", "ranks")

    def __init__(self) -> None:
        self.size = job_size()
        self.follower = self.size is not None and job_rank() != 0
        self._early: _Ranks | None = None  # started by head_start, for the next run
        self._start_up: StartUp | None = None  # under the user's mpiexec: this rank's, from head_start

    @property
    def shares_cpus(self) -> bool:
        """The ranks share this machine's CPUs when aiod4p starts the mpiexec itself and
        ``AIOD4P_MPIEXEC_ARGS`` names no hosts; under the user's mpiexec, its ``-n`` decides."""
        return self.size is None and not names_hosts(mpiexec_extra_args())

    def crowded(self) -> tuple[int, int] | None:
        here = ranks_here()
        if here is None or here != self.size:
            return None  # aiod4p starts the ranks, or some run elsewhere
        # The CPUs of the ranks' parent, the process manager's proxy: binding ranks to cores narrows
        # each rank's own CPUs, not the job's. Never fewer than this rank's own (a run under load, once in
        # about 50, counted 1 CPU of 2 for unbound ranks, and left one of them without work).
        try:
            cpus = max(available_cpus(os.getppid()), available_cpus())
        except OSError:  # the parent is gone
            cpus = available_cpus()
        return (here, cpus) if here > cpus else None

    def _ranks(self, workers: int | None) -> int:
        """The number of ranks for ``-n workers``.

        Raises:
            ValueError: under mpiexec, ``workers`` differs from the job's size.
        """
        if self.size is not None:
            if workers is not None and workers != self.size:
                raise ValueError(
                    f"this mpi run has {self.size} ranks (from mpiexec); -n {workers} does not match it: drop -n"
                )
            return self.size
        return workers or available_cpus()

    def plan_options(self, workers: int | None, batch_size: int, credits: int) -> PlanOptions:
        """Raises:
        ValueError: under mpiexec, ``workers`` differs from the job's size.
        """
        return PlanOptions(
            workers=self._ranks(workers),
            default_parallelism=None,
            batch_size=batch_size,
            credits=credits,
            busy_workers=crowded[1] if (crowded := self.crowded()) is not None else None,
            processes=self.processes,
        )

    @contextlib.contextmanager
    def head_start(self, target: str, workers: int | None) -> Iterator[None]:
        """Launch the mpiexec of the next run now, its ranks importing ``target``'s module while the caller
        loads and plans it (they then wait for the job without spinning); on leaving, end it if no run
        took it. When no mpiexec can start, nothing is started: the run reports why.

        Under the user's mpiexec, initialize MPI now, on every rank before any loads the workflow, and see
        that this rank says whether it goes on or leaves while starting (:class:`~._mpi_ranks.StartUp`):
        leaving the block with :class:`~aiod4p._signals.Stopped` (a signal), another error, or no run, it
        leaves, and the other ranks end too.
        """
        if self.size is not None:
            with self._starting():
                yield
            return
        with contextlib.suppress(MappingUnavailable, ValueError):
            self._early = _Ranks(find_mpiexec(), self._ranks(workers), target)
        try:
            yield
        finally:
            self._take_early(None)

    @contextlib.contextmanager
    def _starting(self) -> Iterator[None]:
        """Under the user's mpiexec: :meth:`head_start`'s part."""
        try:
            with held():  # a signal meanwhile takes effect once this rank has started (it raises Stopped)
                self._start_up = _start_up()
            yield
        except Stopped as stop:
            self._leave(stop.signum)
            raise
        except Aiod4pError as error:
            if not isinstance(error, SaidByRankZero) and self._leave(None, str(error)):
                raise SaidByRankZero(str(error)) from error
            raise
        except BaseException:
            self._leave(None)
            raise
        else:
            self._leave(None)  # a run said already; with none, the other ranks must not wait for this one
        finally:
            self._start_up = None

    def _leave(self, signum: int | None, reason: str = "") -> bool:
        """This rank leaves the job's start-up (stopped by signal ``signum``, or failing for ``reason``), unless
        every rank has said whether it goes on (:meth:`~._mpi_ranks.StartUp.leave`); a further signal while it
        waits for them ends the job now. Whether rank 0 says this rank's error
        (:meth:`~._mpi_ranks.StartUp.said_by_rank_zero`)."""
        start_up = self._start_up
        if start_up is None:
            return False
        if not start_up.agreed:
            from ._mpi_ranks import ABORTED, abort_job

            try:
                asyncio.run(start_up.leave(signum, reason))
            except KeyboardInterrupt:  # Stopped: the second signal aborts
                abort_job(ABORTED)
        # Once every rank went on, what fails on this rank is its own to say (rank 0 has not heard of it).
        return signum is None and not start_up.all_went_on and start_up.said_by_rank_zero(reason)

    def _take_early(self, workers: int | None) -> _Ranks | None:
        """The ranks :meth:`head_start` launched if there are ``workers`` of them; any others are ended."""
        early, self._early = self._early, None
        if early is not None and early.workers != workers:
            early.close(unused=True)
            return None
        return early

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
            if self.checkpointing is not None:
                raise CheckpointError("checkpoints need aiod4p to launch the mpiexec: run without mpiexec, with -n")
            return await self._run_in_job(plan, feeds, sink, control, max_delay)
        return await self._recovering(
            plan,
            feeds,
            sink,
            control,
            # the first attempt's ranks were started ahead (head_start); a restart launches anew
            lambda sink, session: _launch(
                plan, feeds, sink, control, max_delay, session, self._take_early(plan.workers)
            ),
        )

    async def _run_in_job(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        try:
            from ._mpi_ranks import RankZero, StartUp, abort_job_at_exit, broadcast_plan, run_follower
        except ImportError as exc:
            raise MappingUnavailable(NEEDS_MPI4PY) from exc
        start_up = self._start_up or StartUp()
        try:
            shipped = await broadcast_plan(plan, start_up)
            if not self.follower:
                return await RankZero(shipped, feeds, sink, control, max_delay=max_delay).run()
            # Rank 0 drains the whole job (mpiexec gives every rank the signal): here a signal only finds
            # the run under way, so it does not stop this rank as if it were still starting.
            control.on_drain(lambda: None)
            if not await run_follower(Job(shipped, dict(feeds), max_delay, STATS_INTERVAL)):
                raise WorkerDied(f"MPI rank {job_rank()} failed, and rank 0 did not end the job")
            return []
        except BaseException:
            # Every rank went on, or (no head_start to have this rank leave) this one did not say: end every
            # rank once this one has reported (MPI_Finalize would hang). Else every rank leaves by itself.
            if start_up.all_went_on or (start_up is not self._start_up and not start_up.agreed):
                abort_job_at_exit(1)
            raise


def _start_up() -> StartUp | None:
    """Initialize MPI, wait until every rank has (:func:`~._mpi_ranks.every_rank_ready`: from then on, no end
    of the job leaves its files behind), and return this rank's say in the start-up; ``None`` without mpi4py
    (the run says so)."""
    try:
        from ._mpi_ranks import StartUp, every_rank_ready
    except ImportError:
        return None
    asyncio.run(every_rank_ready())
    return StartUp()


def _check_pumped(pumped: list[tuple[str, int, Feed]]) -> None:
    """Check that each pumped input is consumed on rank 0, the only rank this process pumps to: a feed other
    than a count goes to its PE's instance 0 (:func:`~aiod4p.mappings._host.split_feeds`), which runs on rank 0
    (the other instances, on any rank, get nothing of it, as on every mapping).

    Raises:
        InputError: the instance 0 of a PE fed so runs on another rank.
    """
    for pe_id, rank, _ in pumped:
        if rank != 0:
            raise InputError(
                f"PE {pe_id} consumes its input on MPI rank {rank}; give it a list or a count as input"
                " (an iterator or async iterator can only feed a root instance on rank 0)"
            )


async def _launch(
    plan: ExecutionPlan,
    feeds: Mapping[str, Feed],
    sink: ResultSink,
    control: RunControl,
    max_delay: float,
    session: Session | None,
    ranks: _Ranks | None = None,
) -> list[InstanceStats]:
    """Run ``plan`` on ``ranks`` started ahead for it, or on ranks launched now."""
    job: _Job | None = None
    try:
        mpiexec = find_mpiexec() if ranks is None else ""
        prepared, pumped = prepare_job(plan, feeds, max_delay, STATS_INTERVAL, session, control)
        _check_pumped(pumped)
        # the ranks run aiod4p's own __main__: the launcher's travels by value
        payload = ship(prepared, _SHIPPED_FOR, main=True)
        if ranks is None:
            ranks = _Ranks(mpiexec, plan.workers)
        process = _Process(ranks.process)
        try:
            await process.connect()
            job = _Job(process, plan, sink, control, pumped, session, reads_exit_codes=ranks.prints_exit_codes)
            return await job.run(ranks, prepared, payload)
        finally:
            # Still running: the run was cancelled or aborted (Ctrl-C twice, a closed stdout). What the
            # job says once terminated (mpiexec's "BAD TERMINATION" banner) is our own doing, not news.
            if job is not None:
                job.stopped = process.returncode is None
            ranks.note_job()  # before the job is stopped (it may not have been handed over)
            try:
                # Here, not in ranks.close(), which would block the event loop. Ranks given no job have nothing
                # to end gently (and a young mpiexec may take seconds to pass a SIGTERM on).
                await _stop(process, gently=job is not None and job.sent)
                if job is not None:
                    await job.close()
            finally:
                await process.close()  # even when cancelled while connecting: no transport outlives its pipe
    finally:
        if ranks is not None:
            # Still running, it was given no job (started ahead for a plan that then failed: a PE that cannot
            # be pickled): SIGKILL at once, as _stop does. A young mpiexec may take seconds to pass a SIGTERM
            # on, meanwhile its proxy writes its topology file, and the kill that followed left it.
            ranks.close(unused=job is None or not job.sent)


_SHIPPED_FOR = "start the MPI ranks"  # what the job is pickled for, in the errors of ship()


class _Ranks:
    """A launched mpiexec (its ranks run :mod:`aiod4p.mappings._mpi_job`) and the local socket that
    rank 0 connects to, in a directory of its own.

    Args:
        mpiexec: the mpiexec to run.
        workers: the number of ranks.
        preload: the workflow's target, which every rank imports while it waits for the job.

    Attributes:
        prints_exit_codes: the mpiexec was given ``-print-all-exitcodes`` (it is Hydra, :func:`is_hydra`).

    Raises:
        MappingUnavailable: the mpiexec cannot be started.
    """

    def __init__(self, mpiexec: str, workers: int, preload: str | None = None) -> None:
        self.workers = workers
        self._files: set[Path] = set()  # what the job's end may leave behind (note_job)
        # The job's processes: each proxy and rank starts a session of its own, which no signal to the
        # mpiexec's reaches, and a rank can outlive a killed proxy (note_job).
        self._noted: set[int] = set()
        self._held: list[int] = []  # their pidfds
        self.rank_of: dict[tuple[str, int], int] = {}  # the MPI rank of each rank process noted, by host and pid
        self._directory = tempfile.TemporaryDirectory(prefix="aiod4p-mpi-")
        address = str(Path(self._directory.name, "rank0.sock"))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(address)
            self.listener.listen(1)
            self.listener.setblocking(False)
            # -P: the current directory is not on sys.path while a rank starts (a signal.py there replaced
            # Python's); the ranks take the launcher's sys.path up once started (rank_environment).
            extra = mpiexec_extra_args()
            # Hydra's banner names a rank only when one died of a signal (and then it may be one its clean-up
            # killed): the exit statuses it prints at its end tell which rank exited by itself (_Job.exit_codes).
            given = {argument.lstrip("-") for argument in extra}  # Hydra takes -option and --option alike
            self.prints_exit_codes = _EXIT_CODES_OPTION.lstrip("-") not in given and is_hydra(mpiexec)
            command = [mpiexec, *extra, *([_EXIT_CODES_OPTION] if self.prints_exit_codes else [])]
            command += ["-n", str(workers), sys.executable, "-P", "-m"]
            command += ["aiod4p.mappings._mpi_job", address, *([preload] if preload is not None else [])]
            env = rank_environment(os.environ)
            try:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                    preexec_fn=functools.partial(die_with_parent, os.getpid()),
                )
            except OSError as exc:
                raise MappingUnavailable(f"cannot start {mpiexec}: {exc}") from exc
        except BaseException:
            self.remove_address()
            raise

    def note_job(self) -> None:
        """Note the job's processes (Hydra's proxies and the ranks on this machine, with their ranks' numbers) and
        the files they hold, while it runs: :meth:`close` ends what its end left running and removes what it left behind
        (:func:`~aiod4p.mappings._mpi_env.job_files`)."""
        if self.process.returncode is None:
            below = descendants({self.process.pid}) - {self.process.pid}
            self._held += pidfds(below - self._noted)
            self.rank_of |= ranks_of(below - self._noted)
            self._noted |= below
            self._files |= files_held(below)

    def remove_address(self) -> None:
        """Close the listening socket and remove its directory: once rank 0 has connected (so that a launcher
        killed later, with SIGKILL, leaves nothing in the temporary folder), or when the ranks end."""
        self.listener.close()
        self._directory.cleanup()

    def close(self, *, unused: bool = False) -> None:
        """End the mpiexec and its ranks if still running, reap it, and remove the socket.

        ``unused``: no job was sent (a head start no run took, or a run that failed before sending it): nothing
        to stop gently, so SIGKILL at once.
        """
        if self.process.returncode is None:
            self.note_job()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL if unused else signal.SIGTERM)
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        self.remove_address()
        try:
            kill_left(self._held, LEFTOVER_GRACE)
        finally:
            for fd in self._held:
                os.close(fd)
            self._held.clear()
        for path in self._files:  # the mpiexec is reaped: nothing of the job reads them any more
            with contextlib.suppress(OSError):  # removed by the job itself
                path.unlink()
        self._files.clear()


_BAD_TERMINATION = re.compile(r"PID (\d+) RUNNING AT (\S+)\s*=\s*EXIT CODE: (-?\d+)")
_EXIT_STRING = re.compile(r"EXIT STRING: (.+)")
_EXIT_CODES_OPTION = "-print-all-exitcodes"
# What Hydra prints on its stdout given -print-all-exitcodes, once every rank has ended: "[mpiexec@vm] Exit codes:
# [vm] 0,768", then a line "[host] ..." for each further host; each host's ranks in the order of their numbers,
# each as the status wait() gave (768: exit code 3; 9: killed by SIGKILL).
_EXIT_CODES = re.compile(r"\[mpiexec@[^]]*\] Exit codes: ?")
_HOST_EXIT_CODES = re.compile(r"\[([^]]+)\] (-?\d+(?:,-?\d+)*)\s*")


class _Output(asyncio.StreamReaderProtocol):
    """A stream reader's protocol whose :attr:`lost` is done once its transport has closed."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)


class _Process:
    """The event loop's view of a started mpiexec, which may have started before the loop did: its
    output as streams, and its exit (waited for by a thread, as asyncio's own child watcher does)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.pid = process.pid
        self.stdout = asyncio.StreamReader()
        self.stderr = asyncio.StreamReader()
        self._pipes: list[tuple[asyncio.ReadTransport, _Output]] = []
        loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = loop.create_future()

        def exited(code: int) -> None:
            if not self._exit.done():
                self._exit.set_result(code)

        def wait() -> None:
            code = process.wait()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(exited, code)

        threading.Thread(target=wait, name=f"aiod4p-mpiexec-{process.pid}", daemon=True).start()

    async def connect(self) -> None:
        """Read the process's piped stdout and stderr into :attr:`stdout` and :attr:`stderr`.

        What is connected when this fails or is cancelled is closed by :meth:`close`, which must
        follow in every case.
        """
        loop = asyncio.get_running_loop()
        for reader, pipe in ((self.stdout, self.process.stdout), (self.stderr, self.process.stderr)):
            transport, protocol = await loop.connect_read_pipe(functools.partial(_Output, reader), pipe)
            self._pipes.append((transport, protocol))

    async def close(self) -> None:
        """Close the connected output pipes (uvloop keeps a pipe open after its end) and wait until they are.

        A transport closes its pipe's descriptor a loop turn after ``close()``; closing the pipe
        meanwhile, or returning before, would let that late close hit a descriptor opened since
        (a restart's new pipes).
        """
        for transport, _ in self._pipes:
            transport.close()
        await asyncio.gather(*(protocol.lost for _, protocol in self._pipes))

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)


async def _stop(process: _Process, *, gently: bool) -> None:
    """End the mpiexec and its ranks if still running (``gently``: SIGTERM first, SIGKILL after 3 s), and reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM if gently else signal.SIGKILL)
        try:
            async with asyncio.timeout(3):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


class _Job:
    """The launcher's side of a launched run: the mpiexec, its output, and rank 0's control comm.

    ``reads_exit_codes``: the mpiexec was asked to print the exit status of every rank at its end
    (``-print-all-exitcodes``): :meth:`_dead_rank` reads them, and they are not passed on with its output.
    """

    def __init__(
        self,
        process: _Process,
        plan: ExecutionPlan,
        sink: ResultSink,
        control: RunControl,
        pumped: list[tuple[str, int, Feed]],
        session: Session | None = None,
        *,
        reads_exit_codes: bool = False,
    ) -> None:
        self.process = process
        self.session = session
        self.plan = plan
        self.sink = sink
        self.control = control
        self.pumped = pumped
        self.reported = False  # rank 0 reported the run's outcome: the job's teardown is expected
        self.stopped = False  # this process terminates the job: its output is no longer relayed
        self.sent = False  # rank 0 has the job
        self.rank_of: dict[tuple[str, int], int] = {}  # the ranks on this machine (by host, pid) once rank 0 has it
        self.tail: deque[str] = deque(maxlen=_OUTPUT_LINES)
        # The wait() status of each rank, by host, as the mpiexec printed them at its end (_EXIT_CODES)
        self.exit_codes: dict[str, list[int]] | None = None
        assert process.stdout is not None and process.stderr is not None
        self.relays = [
            asyncio.create_task(self._relay(process.stdout, reads_exit_codes=reads_exit_codes)),
            asyncio.create_task(self._relay(process.stderr)),
        ]
        self.exited = asyncio.create_task(process.wait())

    async def run(self, ranks: _Ranks, prepared: Job, payload: bytes) -> list[InstanceStats]:
        """Hand the job ``prepared``, shipped as ``payload``, to rank 0 when it connects to ``ranks``' listener,
        then supervise the run."""
        accept = asyncio.ensure_future(self._hand_over(ranks, prepared, payload))
        comm: PipeComm | None = None
        try:
            await asyncio.wait({accept, self.exited}, return_when=asyncio.FIRST_COMPLETED)
            if not accept.done() or accept.exception() is not None:
                raise WorkerDied(await self._death(0))
            self.sent = True
            self.control.workers_run()  # the ranks run the job: a first signal drains it from now on
            ranks.remove_address()
            ranks.note_job()  # a proxy writes its file before it starts its ranks
            self.rank_of = ranks.rank_of
            comm = await open_pipe_comm(accept.result())
            supervisor = Supervisor(
                self.plan,
                {0: comm},
                self.sink,
                self.control,
                pumped=self.pumped,
                grace=_EXIT_GRACE,
                exited=self._exited,
                death=self._death,
                checkpoints=LauncherCheckpoints(self.session, {0: comm}) if self.session is not None else None,
            )
            try:
                stats = await supervisor.run()
            except (WorkerDied, PeerDied) as exc:
                # A rank's death reaches this process through the mpiexec's exit, which may come after rank 0
                # reported what that death caused there (a broken MPI link, a rank it lost): the death is the
                # run's error. The goodbye lets a rank 0 still alive end the job (MPI_Abort); then its exit says.
                self.reported = True
                comm.abort()
                death = await self._dead_rank()
                if death is None and not isinstance(exc, WorkerDied):
                    # No rank died: MPI itself failed, which a restart would only meet again.
                    raise TransportError(str(exc)) from exc
                if death is None or death == str(exc):  # this process saw the death itself
                    raise
                raise WorkerDied(death) from exc
            except Exception:
                # Rank 0 reported the error: the goodbye lets it end the job (MPI_Abort)
                # before it is terminated, which would only add mpiexec's alarm to the output.
                self.reported = True
                comm.abort()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_EXIT_GRACE):
                        await asyncio.shield(self.exited)
                raise
            self.reported = True
            # Every rank has sent all it had: the results are complete, and a restart must not redo them.
            try:
                async with asyncio.timeout(_EXIT_TIMEOUT):
                    code = await asyncio.shield(self.exited)
            except TimeoutError:
                logger.warning(
                    "the MPI ranks did not exit within %.0f s after the run finished (its results are complete):"
                    " stopping them",
                    _EXIT_TIMEOUT,
                )
            else:
                if code != 0:
                    logger.warning("mpiexec %s after the run finished (results complete)", ended(code))
            return stats
        finally:
            accept.cancel()
            await asyncio.gather(accept, return_exceptions=True)
            if comm is not None:
                comm.abort()

    async def _hand_over(self, ranks: _Ranks, prepared: Job, payload: bytes) -> socket.socket:
        """Rank 0's connection, once the job ``prepared`` (shipped as ``payload``) is sent on it: drained if the
        run was drained while the ranks started (seconds, for mpiexec), so that they run nothing, as
        :attr:`Job.drained` says (a ``Drain`` message would reach them once their sources had produced).

        Raises:
            OSError: rank 0 went away while the job was sent.
        """
        loop = asyncio.get_running_loop()
        sock = (await loop.sock_accept(ranks.listener))[0]
        # Rank 0 connects once every rank has started MPI: note them before the job, which may end one at once.
        ranks.note_job()
        payload = shipped_drained(prepared, payload, self.control.draining, _SHIPPED_FOR)
        try:
            hand_stdin(sock)
            await loop.sock_sendall(sock, job_frame(payload))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _exited(self, _: int) -> None:
        await asyncio.shield(self.exited)

    async def _death(self, _: int) -> str:
        """Why rank 0 is gone: the rank that died (:meth:`_dead_rank`), else the mpiexec's status and last output."""
        if (death := await self._dead_rank()) is not None:
            return death
        tail = "".join(self.tail).strip()
        return self._status() + (f"; its last output:\n{tail}" if tail else "")

    async def _dead_rank(self) -> str | None:
        """The ranks that ended by themselves and the mpiexec's status, once the mpiexec has exited (waiting up to
        :data:`_EXIT_TIMEOUT`); ``None`` if it shows none.

        A rank that exited with a status other than 0 (:meth:`_exited_ranks`), else the rank in Hydra's banner (a
        signal, or an exit without MPI).
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_TIMEOUT):
                await asyncio.shield(self.exited)
                await asyncio.gather(*self.relays)  # its last words
        if exited := self._exited_ranks():
            return f"{'; '.join(exited)}: {self._status()}"
        if self.process.returncode == 0 and self._all_exited_with_0():
            # Hydra ends the other ranks, and reports them as exited with 0 too: which rank it was, nothing says
            return (
                "an MPI rank ended by itself with exit code 0 (os._exit(0) in a PE, or exit(0) in a library it calls;"
                f" mpiexec then reports every rank as exited with 0): {self._status()}"
            )
        tail = "".join(self.tail).strip()
        if (rank := _BAD_TERMINATION.search(tail)) is None:  # Hydra's banner (already on stderr)
            return None
        pid, host, code = rank.groups()
        how = f" ({found.group(1).strip()})" if (found := _EXIT_STRING.search(tail)) is not None else ""
        return f"{self._rank(host, int(pid))} ended with exit code {code}{how}: {self._status()}"

    def _exited_ranks(self) -> list[str]:
        """The ranks that exited by themselves with a status other than 0 (``os._exit(3)`` in a PE), each named
        with its exit code, from the statuses the mpiexec printed (:attr:`exit_codes`; none after an
        ``MPI_Abort``): those its clean-up ended were killed by a signal, or exited with 0."""
        found = []
        for host, statuses in (self.exit_codes or {}).items():
            here = sorted((number, pid) for (on, pid), number in self.rank_of.items() if on == host)
            for index, status in enumerate(statuses):
                if not os.WIFEXITED(status) or (code := os.WEXITSTATUS(status)) == 0:
                    continue
                if len(here) == len(statuses):  # this machine's: the host's ranks in the order of their numbers
                    found.append(f"{self._rank(host, here[index][1])} ended with exit code {code}")
                else:
                    found.append(f"an MPI rank on {host} ended with exit code {code}")
        return found

    def _all_exited_with_0(self) -> bool:
        """The mpiexec printed the exit statuses of the ranks (:attr:`exit_codes`), and each exited with 0."""
        statuses = [status for host in (self.exit_codes or {}).values() for status in host]
        return bool(statuses) and all(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 for status in statuses)

    def _rank(self, host: str, pid: int) -> str:
        """Rank process ``pid`` on ``host`` as errors name it: with its number and PE instances if on this machine."""
        if (number := self.rank_of.get((host, pid))) is None:  # on another host
            return f"an MPI rank (pid {pid} on {host})"
        return f"MPI rank {number} (pid {pid} on {host}; it ran {self.plan.instances_on(number)})"

    def _status(self) -> str:
        code = self.process.returncode
        return f"mpiexec {'ended' if code is None else ended(code)} before the run finished"

    async def _relay(self, stream: asyncio.StreamReader, *, reads_exit_codes: bool = False) -> None:
        """Pass the ranks' output on to stderr, keeping its last lines for error messages; on the mpiexec's stdout,
        with ``reads_exit_codes``, the exit statuses it prints at its end go to :attr:`exit_codes` instead."""
        while line := await stream.readline():
            text = line.decode(errors="replace")
            if reads_exit_codes and not (text := self._without_exit_codes(text)):
                continue
            self.tail.append(text)
            if (text.startswith("Abort(") and self.reported) or self.stopped:
                continue  # rank 0 ending the job after reporting the run's error, or the job being terminated
            sys.stderr.write(text)

    def _without_exit_codes(self, text: str) -> str:
        """``text``, a line of the mpiexec's stdout, without the exit statuses it prints at its end
        (:data:`_EXIT_CODES`): those of a host's ranks go to :attr:`exit_codes`. Their heading may end a line that
        a rank's last output left open (``print(x, end="")``): that output stays, on a line of its own."""
        heading = _EXIT_CODES.search(text)
        if heading is not None:
            self.exit_codes, left_open, text = {}, text[: heading.start()], text[heading.end() :]
        if self.exit_codes is None:
            return text
        if (host := _HOST_EXIT_CODES.fullmatch(text)) is not None:
            self.exit_codes[host[1]] = [int(status) for status in host[2].split(",")]
        if heading is not None:
            return f"{left_open}\n" if left_open else ""
        return "" if host is not None else text

    async def close(self) -> None:
        """Once the mpiexec is reaped: read its output to the end."""
        try:
            async with asyncio.timeout(_EXIT_TIMEOUT):
                await asyncio.gather(*self.relays)
        except TimeoutError:
            for relay in self.relays:
                relay.cancel()
            await asyncio.gather(*self.relays, return_exceptions=True)
        self.exited.cancel()
        await asyncio.gather(self.exited, return_exceptions=True)
