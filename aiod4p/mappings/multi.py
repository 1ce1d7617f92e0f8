"""The multi mapping: N worker processes, each an event loop running the engine.

The planner places instance ``i`` of every PE on worker ``i % N`` (or as a
dispel4py graph's ``placer`` says). What is
specific to multi is only how workers start and what joins them: worker
processes, a pipe comm (socket pair) between every two workers that share a
channel, and one pipe comm from each worker to the parent, which the worker
host (:mod:`aiod4p.mappings._host`) uses for results, statistics, drain and
the feeds the parent pumps.

Worker processes start with an explicit multiprocessing context: ``fork`` on
Linux when the parent has a single thread, else ``spawn``; choose one with
``MultiMapping(start_method=...)`` or the ``AIOD4P_START_METHOD`` environment
variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import multiprocessing
import os
import resource
import signal
import socket
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

from .._logging import logging_environment
from .._plan import ExecutionPlan
from .._processes import ended
from .._signals import held
from .._starting import SPAWNED_ENV
from .._threads import callers_threads, forking
from ..errors import MappingUnavailable
from ..transports.pipes import PipeComm, open_pipe_comm
from ._base import RunControl
from ._host import GRACE, STATS_INTERVAL
from ._hosted import HostedMapping
from ._multi_worker import worker_main
from ._shipping import Job, ship

__all__ = ["START_METHOD_ENV", "MultiMapping", "resolve_start_method"]

START_METHOD_ENV = "AIOD4P_START_METHOD"
START_METHODS = ("fork", "spawn", "forkserver")
_HINT = f', or use the fork start method (MultiMapping(start_method="fork"), or {START_METHOD_ENV}=fork)'


def resolve_start_method(requested: str | None = None) -> str:
    """The multiprocessing start method to use.

    ``requested`` wins, then the ``AIOD4P_START_METHOD`` environment variable;
    by default ``fork`` on Linux while the process has one thread besides
    aiod4p's own helpers (a progress display, a statistics sampler: a fork
    waits until they are between two frames; see
    :func:`~aiod4p._threads.callers_threads`), since forking a threaded
    process may deadlock; else ``spawn``.

    Raises:
        ValueError: the method is unknown or unavailable on this platform.
    """
    method = requested or os.environ.get(START_METHOD_ENV) or None
    if method is None:
        return "fork" if sys.platform.startswith("linux") and callers_threads() == 1 else "spawn"
    if method not in START_METHODS or method not in multiprocessing.get_all_start_methods():
        available = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
        raise ValueError(f"unknown start method {method!r} for the multi mapping; choose one of {available}")
    return method


class MultiMapping(HostedMapping):
    """Worker processes joined by pipes; ``-n N`` workers (default: one per CPU).

    Args:
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"``; ``None``
            picks as :func:`resolve_start_method`.
        stats_interval: seconds between the workers' statistics reports.
        grace: seconds to wait, after a worker failed because another one
            did, for the root cause to be reported (and for a dead process's
            last messages).

    Raises:
        ValueError: ``start_method`` is unknown.
    """

    name = "multi"

    def __init__(
        self, start_method: str | None = None, *, stats_interval: float = STATS_INTERVAL, grace: float = GRACE
    ) -> None:
        if start_method is not None:
            resolve_start_method(start_method)
        super().__init__(stats_interval=stats_interval, grace=grace)
        self.start_method = start_method

    @property
    def shares_cpus(self) -> bool:
        return True

    def launch(self, plan: ExecutionPlan) -> _MultiRun:
        """Worker processes for a run of ``plan`` (a spawned worker needs PEs that can be pickled)."""
        return _MultiRun(self, plan)


def _files_needed(pairs: int, workers: int) -> int:
    """About how many files this process holds open while it starts ``workers`` worker processes joined by
    ``pairs`` socket pairs: those open already, both ends of each pair, and the pipes each process start opens
    (two that stay: its sentinel and its pipe to the child; two more for a moment)."""
    try:
        already = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError:
        already = 3
    return already + 2 * pairs + 2 * workers + 2


def _too_many_files(pairs: int, workers: int, needed: int | None = None) -> MappingUnavailable:
    """The error for ``workers`` worker processes that need more files than ``ulimit -n`` allows."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    needed = _files_needed(pairs, workers) if needed is None else needed
    return MappingUnavailable(
        f"{workers} worker processes need about {needed} open files here ({pairs} socket pairs, the pipes to each"
        f" process and the files open already), more than this process may open (ulimit -n: {limit}): start"
        " fewer workers (-n), or raise the limit"
    )


def _socket_pairs(count: int, workers: int) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` socket pairs, to join ``workers`` worker processes and this one.

    Raises:
        MappingUnavailable: this process may not open so many files (``ulimit -n``), with the pipes that
            starting the workers opens; none is left open.
    """
    needed = _files_needed(count, workers)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY and needed > limit:
        raise _too_many_files(count, workers, needed)
    made: list[tuple[socket.socket, socket.socket]] = []
    try:
        for _ in range(count):
            made.append(socket.socketpair())
    except OSError as exc:
        for pair in made:
            for sock in pair:
                sock.close()
        if exc.errno != errno.EMFILE:
            raise
        raise _too_many_files(count, workers, needed) from exc
    return made


class _MultiRun:
    """One execution: processes and the socket pairs that join them.

    Forked workers get the job as it is; others get it pickled, each its own copy, so that list and tuple feeds
    are pumped to them instead (:attr:`ships_held_feeds`).
    """

    def __init__(self, mapping: MultiMapping, plan: ExecutionPlan) -> None:
        self.mapping = mapping
        self.plan = plan
        self.method = resolve_start_method(mapping.start_method)
        self.ships_held_feeds = self.method == "fork"
        self.processes: list[BaseProcess] = []
        self._exits: list[asyncio.Future[None]] = []

    async def _start(self, job: Job | bytes, control: RunControl) -> list[socket.socket]:
        """Start the workers, telling ``control`` once the first runs ``job``; returns the parent's ends of their
        control socket pairs.

        Forked workers start one per turn of the event loop (:func:`_start_turn`): a fork holds the loop for
        milliseconds, and the caller's other tasks (a service's, other runs') run between two of them.
        """
        n = self.plan.workers
        joined = self.plan.worker_pairs()
        made = _socket_pairs(n + len(joined), n)
        controls, links = made[:n], dict(zip(joined, made[n:], strict=True))
        every = [s for pair in itertools.chain(controls, links.values()) for s in pair]
        context: Any = multiprocessing.get_context(self.method)  # typeshed's BaseContext lacks Process
        parent = None if self.method == "forkserver" else os.getpid()  # a forkserver's child is the server's
        # One run at a time starts its workers with the variables it sets (_safe_path): another run in another
        # thread would take them for the caller's own, or take them out under this one. (Fork sets none, and
        # a forked child must not inherit the lock held.)
        with _environment_lock if self.method != "fork" else contextlib.nullcontext():
            safe = _safe_path(self.method)
            if self.method != "fork":  # a new interpreter, which ignores SIGINT and SIGHUP once it imports aiod4p
                safe |= logging_environment() | {SPAWNED_ENV: "1"}
                with _main_not_reimported(self.method), _environment(safe):
                    _start_helpers(self.method)
            with _starting_lock:
                _STARTING_SOCKETS.update(every)
            try:
                for wid in range(n):
                    peers = {
                        b if a == wid else a: links[(a, b)][0 if a == wid else 1] for (a, b) in links if wid in (a, b)
                    }
                    child_control = controls[wid][1]
                    # signals held (by a forked child) until it has its own handlers (worker_main); a new
                    # interpreter ignores SIGINT and SIGHUP as it imports aiod4p (SPAWNED_ENV, in `safe`)
                    async with _start_turn(self.method):
                        inherited = []
                        if self.method == "fork":
                            # every run's that is starting in this process (another run of this loop forks
                            # between two of this one's forks), not only this run's
                            own = {id(child_control), *(id(s) for s in peers.values())}
                            with _starting_lock:
                                inherited = [s for s in _STARTING_SOCKETS if id(s) not in own]
                        process = context.Process(
                            target=worker_main,
                            args=(wid, job, child_control, peers, inherited, safe, parent),
                            name=f"aiod4p-worker-{wid}",
                        )
                        pausing = forking() if self.method == "fork" else contextlib.nullcontext()
                        # forking() first: it may wait for a helper thread (a progress display on a stalled
                        # terminal), and a signal meanwhile must not be held with it
                        with pausing, held(), _main_not_reimported(self.method), _environment(safe):
                            try:
                                process.start()
                            except OSError as exc:
                                if exc.errno != errno.EMFILE:
                                    raise
                                raise _too_many_files(len(made), n) from exc
                    self.processes.append(process)
                    control.workers_run()
                    self._exits.append(_watch_exit(process))
            finally:
                with _starting_lock:
                    _STARTING_SOCKETS.difference_update(every)
                for sock in every:
                    if not any(sock is parent_end for parent_end, _ in controls):
                        sock.close()
                if len(self.processes) < n:
                    for parent_end, _ in controls:
                        parent_end.close()
        return [parent_end for parent_end, _ in controls]

    async def start(self, job: Job, control: RunControl) -> dict[int, PipeComm]:
        """Start the worker processes, each given ``job`` as it starts (``control.draining`` is not read: the job
        says whether the run drained before); the parent's ends of their control comms. The run is under way once
        the first has started: forked ones start one per turn of the loop, and the first may be producing while
        the last starts."""
        payload: Job | bytes = job
        if self.method != "fork":
            # __main__ by value where the workers cannot import it again (a notebook, python -c, stdin)
            payload = ship(job, f"start {self.method}ed worker processes", _HINT, main=not _main_importable())
        socks = await self._start(payload, control)
        comms: dict[int, PipeComm] = {}
        for index, sock in enumerate(socks):
            try:
                comms[index] = await open_pipe_comm(sock)
            except BaseException:
                for rest in socks[index:]:
                    rest.close()
                for comm in comms.values():
                    comm.abort()
                raise
        return comms

    async def stop(self, finished: bool) -> None:
        """Let the workers exit (if the run ``finished``), then terminate and kill what is left."""
        try:
            await self._stop_processes(graceful=finished)
        except BaseException:  # cancelled again while stopping: no orphans all the same
            for process in self.processes:
                if process.exitcode is None:
                    process.kill()
                    process.join()
            raise

    async def death(self, wid: int) -> str:
        process = self.processes[wid]
        code = process.exitcode
        how = "stopped responding" if code is None else ended(code)
        return f"worker process {wid} (pid {process.pid}) {how} before the run finished"

    # -- stopping ---------------------------------------------------------------
    async def exited(self, wid: int) -> None:
        """Wait until worker ``wid`` has exited and been reaped."""
        await asyncio.shield(self._exits[wid])
        self.processes[wid].join()  # the sentinel closes a moment before the exit status is ready

    async def _stop_processes(self, graceful: bool) -> None:
        """Let workers exit (briefly, if ``graceful``); terminate, then kill, the rest; reap all."""
        steps = ("wait", "terminate", "kill") if graceful else ("terminate", "kill")
        for step in steps:
            alive = [wid for wid, p in enumerate(self.processes) if p.exitcode is None]
            if not alive:
                break
            for wid in alive:
                if step == "terminate":
                    self.processes[wid].terminate()
                elif step == "kill":
                    self.processes[wid].kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.mapping.grace):
                    await asyncio.gather(*(self.exited(wid) for wid in alive))
        loop = asyncio.get_running_loop()
        for process, exit_future in zip(self.processes, self._exits, strict=True):
            if not exit_future.done():
                loop.remove_reader(process.sentinel)
                exit_future.cancel()
            if process.exitcode is not None:
                process.close()


_STARTING_SOCKETS: set[socket.socket] = set()
"""The socket pairs of the runs starting their workers in this process: a forked worker closes every one but its
own, whichever run made them (runs in one loop fork in turns, runs in other threads at any time)."""
_starting_lock = threading.Lock()

_STARTING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _start_turn(method: str) -> AsyncIterator[None]:
    """While a worker process starts by ``method``: with fork, the only one of this event loop's runs to start
    one, in a turn of the loop of its own, after the timers that fell due (a fork copies the caller's memory
    map: milliseconds, longer for a big process). Other methods start a process at once: it execs a new
    interpreter, and the caller holds :data:`_environment_lock`, which must not be held across a turn."""
    if method != "fork":
        yield
        return
    async with _STARTING.setdefault(asyncio.get_running_loop(), asyncio.Lock()):
        await asyncio.sleep(1e-9)  # on a timer, so that the timers due now run first (sleep(0) would run first)
        yield


def _watch_exit(process: BaseProcess) -> asyncio.Future[None]:
    """A future set when ``process`` ends (its sentinel becomes readable)."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    sentinel = process.sentinel

    def on_exit() -> None:
        loop.remove_reader(sentinel)
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(sentinel, on_exit)
    return ended


def _start_helpers(method: str) -> None:
    """Start multiprocessing's resource tracker, and for ``forkserver`` its server, unless they run, before a
    worker starts with signals held (:func:`~aiod4p._signals.held`).

    CPython starts the tracker with SIGINT and SIGTERM blocked and then unblocks them in the calling thread
    instead of putting its mask back: the first worker spawned after it started with SIGINT deliverable, and a
    Ctrl-C during its interpreter's start (the first second of a run) killed it. A forkserver started with the
    signals held would pass them on held to every process it forks, the caller's own too. The caller's thread
    keeps its own mask."""
    from multiprocessing import forkserver, resource_tracker

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # as the caller has it: the tracker's start unblocks
    try:
        resource_tracker.ensure_running()
        if method == "forkserver":
            forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def _main_not_reimported(method: str) -> Iterator[None]:
    """While a process starts by ``method``: a ``__main__`` that cannot be imported again (a script read from
    stdin, whose ``__file__`` is ``<stdin>``) shows no file, as in a notebook, so that a spawned process does not
    try to run it again and die (what the job needs of it travels with the job: :meth:`_MultiRun.start`)."""
    main = sys.modules["__main__"]
    hidden = method != "fork" and not _main_importable() and "__file__" in vars(main)
    path = vars(main).pop("__file__") if hidden else None
    try:
        yield
    finally:
        if hidden:
            main.__file__ = path


_SAFE_PATH = {"PYTHONSAFEPATH": "1"}


_environment_lock = threading.Lock()


def _safe_path(method: str) -> dict[str, str]:
    """What the environment of a process started by ``method`` lacks to keep the current directory off the
    ``sys.path`` of the interpreters multiprocessing starts (``python -c`` of spawn, the forkserver, the
    resource tracker): a ``signal.py`` there (a workflow run from its folder) replaced Python's ``signal`` while
    they started. Nothing for fork (no new interpreter) or when ``PYTHONSAFEPATH`` is set already."""
    return {} if method == "fork" or "PYTHONSAFEPATH" in os.environ else dict(_SAFE_PATH)


@contextlib.contextmanager
def _environment(added: dict[str, str]) -> Iterator[None]:
    """``added`` in this process's environment, which the processes started meanwhile inherit; as it was after.

    The worker takes it out of its own (:func:`~aiod4p.mappings._multi_worker.worker_main`): what a PE starts
    gets the caller's environment."""
    before = {name: os.environ.get(name) for name in added}
    os.environ.update(added)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _main_importable() -> bool:
    """Whether a spawned process can import ``__main__`` again: by its module name (``python -m``) or from
    its file (a script; not ``python -c``, a notebook, or a script read from stdin, named ``<stdin>``)."""
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and os.path.isfile(path)
