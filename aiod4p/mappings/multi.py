"""The multi mapping: N worker processes, each an event loop running the engine.

The planner places instance ``i`` of every PE on worker ``i % N``; workers
exchange batches over pipe comms (socket pairs), and send results and live
statistics to the parent over one control comm each. Sequence feeds (counts,
lists, tuples, ranges) travel with the plan; any other iterable or async
iterable stays in the parent, which pumps it to the worker hosting the root,
with credits so it never runs ahead.

Worker processes start with an explicit multiprocessing context: ``fork`` on
Linux when the parent has a single thread, else ``spawn``; choose one with
``MultiMapping(start_method=...)`` or the ``AIOD4P_START_METHOD`` environment
variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import itertools
import multiprocessing
import os
import pickle
import pickletools
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from multiprocessing.process import BaseProcess
from typing import Any

from .._engine import Feed, _error
from .._plan import ExecutionPlan, InstanceRef, PlanOptions
from .._results import ResultSink
from .._stats import InstanceStats
from ..errors import EndOfChannel, GraphError, InputError, PeerDied, TransportError, WorkerDied
from ..transports import Comm
from ..transports.pipes import UnpicklableMessage, open_pipe_comm
from ._base import BaseMapping, RunControl
from ._multi_worker import PUMPED, worker_main

__all__ = ["START_METHOD_ENV", "MultiMapping", "resolve_start_method"]

START_METHOD_ENV = "AIOD4P_START_METHOD"
START_METHODS = ("fork", "spawn", "forkserver")
_FEED_WINDOW = 4  # chunks of a pumped feed in flight to a worker


def resolve_start_method(requested: str | None = None) -> str:
    """The multiprocessing start method to use.

    ``requested`` wins, then the ``AIOD4P_START_METHOD`` environment variable;
    by default ``fork`` on Linux while the process has one thread (forking a
    threaded process may deadlock), else ``spawn``.

    Raises:
        ValueError: the method is unknown or unavailable on this platform.
    """
    method = requested or os.environ.get(START_METHOD_ENV) or None
    if method is None:
        return "fork" if sys.platform.startswith("linux") and threading.active_count() == 1 else "spawn"
    if method not in START_METHODS or method not in multiprocessing.get_all_start_methods():
        available = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
        raise ValueError(f"unknown start method {method!r} for the multi mapping; choose one of {available}")
    return method


class MultiMapping(BaseMapping):
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

    def __init__(self, start_method: str | None = None, *, stats_interval: float = 0.5, grace: float = 1.0) -> None:
        if start_method is not None:
            resolve_start_method(start_method)
        self.start_method = start_method
        self.stats_interval = stats_interval
        self.grace = grace

    def plan_options(self, workers: int | None, batch_size: int, credits: int) -> PlanOptions:
        return PlanOptions(
            workers=workers or os.cpu_count() or 1,
            default_parallelism=None,
            batch_size=batch_size,
            credits=credits,
        )

    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        """Run ``plan`` on worker processes.

        Raises:
            PEError: a PE raised in a worker (with its original traceback text).
            WorkerDied: a worker process exited or was killed before finishing.
            GraphError: a PE cannot be pickled for a spawned worker.
            InputError: an input cannot be pickled.
            TransportError: an item or result cannot be pickled (naming the PE and port).
        """
        return await _MultiRun(self, plan, feeds, sink, control, max_delay).run()


class _MultiRun:
    """One execution: processes, comms, supervision."""

    def __init__(
        self,
        mapping: MultiMapping,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> None:
        self.mapping = mapping
        self.plan = plan
        self.feeds = feeds
        self.sink = sink
        self.control = control
        self.max_delay = max_delay
        self.method = resolve_start_method(mapping.start_method)
        self.processes: list[BaseProcess] = []
        self.comms: list[Comm] = []
        self.final: dict[int, list[InstanceStats]] = {}
        self.credits: dict[tuple[str, int], asyncio.Semaphore] = {}
        self.draining = False
        self._posts: set[asyncio.Task[None]] = set()
        self._exits: list[asyncio.Future[None]] = []
        # Per worker: control messages received, and whether its reader waits for one.
        self.received = [0] * plan.workers
        self.receiving = [False] * plan.workers

    # -- launching -------------------------------------------------------------
    def _payloads(self) -> tuple[list[Any], list[tuple[str, int, Feed]]]:
        """Each worker's (plan, feeds) as passed to it, and the feeds the parent pumps."""
        plan = self.plan
        pumped: list[tuple[str, int, Feed]] = []
        per_worker: list[dict[str, Feed]] = [{} for _ in range(plan.workers)]
        for pe_id, feed in self.feeds.items():
            shipped = isinstance(feed, (int, list, tuple, range))
            # A count is shared out among the root's instances; any other feed goes to instance 0.
            placed = plan.placement[pe_id].workers
            hosts = sorted(set(placed)) if isinstance(feed, int) else [placed[0]]
            for host in hosts:
                per_worker[host][pe_id] = feed if shipped else PUMPED
                if not shipped:
                    pumped.append((pe_id, host, feed))
        if self.method == "fork":
            return [(plan, feeds) for feeds in per_worker], pumped
        plan_data = self._pickle_plan()
        return [(plan_data, self._pickle_feeds(feeds)) for feeds in per_worker], pumped

    def _pickle_plan(self) -> bytes:
        """The plan as a worker that does not inherit this process's memory receives it."""
        return _pickle_plan(self.plan, self.method)

    def _pickle_feeds(self, feeds: dict[str, Feed]) -> bytes:
        """Pickle a worker's feeds, naming the PE whose input cannot be pickled.

        Raises:
            InputError: an input cannot be pickled.
        """
        try:
            return pickle.dumps(feeds, protocol=5)
        except Exception:
            culprit = _unpicklable(feeds)
            if culprit is None:
                raise
            pe_id, exc = culprit
            raise InputError(
                f"the input of PE {pe_id} cannot be pickled for a {self.method}ed worker process:"
                f" {type(exc).__name__}: {exc}"
            ) from exc

    def _start(self, payloads: list[Any]) -> list[socket.socket]:
        """Start the workers; returns the parent's ends of their control socket pairs."""
        n = self.plan.workers
        controls = [socket.socketpair() for _ in range(n)]
        links = {
            pair: socket.socketpair()
            for pair in sorted(
                {
                    (min(c.source_worker, c.dest_worker), max(c.source_worker, c.dest_worker))
                    for c in self.plan.channels
                    if c.source_worker != c.dest_worker
                }
            )
        }
        every = [s for pair in itertools.chain(controls, links.values()) for s in pair]
        preload = [] if self.method == "fork" else _modules_to_preload(payloads[0][0])
        context: Any = multiprocessing.get_context(self.method)  # typeshed's BaseContext lacks Process
        try:
            for wid in range(n):
                peers = {b if a == wid else a: links[(a, b)][0 if a == wid else 1] for (a, b) in links if wid in (a, b)}
                child_control = controls[wid][1]
                inherited = []
                if self.method == "fork":
                    own = {id(child_control), *(id(s) for s in peers.values())}
                    inherited = [s for s in every if id(s) not in own]
                plan_data, feeds_data = payloads[wid]
                process = context.Process(
                    target=worker_main,
                    args=(
                        wid,
                        plan_data,
                        feeds_data,
                        preload,
                        child_control,
                        peers,
                        inherited,
                        self.max_delay,
                        self.mapping.stats_interval,
                    ),
                    name=f"aiod4p-worker-{wid}",
                )
                process.start()
                self.processes.append(process)
                self._exits.append(_watch_exit(process))
        finally:
            for sock in every:
                if not any(sock is parent_end for parent_end, _ in controls):
                    sock.close()
            if len(self.processes) < n:
                for parent_end, _ in controls:
                    parent_end.close()
        return [parent_end for parent_end, _ in controls]

    # -- running -------------------------------------------------------------
    async def run(self) -> list[InstanceStats]:
        payloads, pumped = self._payloads()
        tasks: list[asyncio.Task[Any]] = []
        finished = False
        try:
            socks = self._start(payloads)
            for index, sock in enumerate(socks):
                try:
                    self.comms.append(await open_pipe_comm(sock))
                except BaseException:
                    for rest in socks[index:]:
                        rest.close()
                    raise
            watchers = [asyncio.create_task(self._watch(wid), name=f"watch worker {wid}") for wid in range(len(socks))]
            for pe_id, host, _ in pumped:
                self.credits[(pe_id, host)] = asyncio.Semaphore(_FEED_WINDOW)
            pumps = [asyncio.create_task(self._pump(pe_id, host, feed)) for pe_id, host, feed in pumped]
            tasks = [*watchers, *pumps]
            self.control.on_drain(self._drain)
            await self._supervise(watchers, pumps)
            finished = True
            return [entry for wid in sorted(self.final) for entry in self.final[wid]]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, *self._posts, return_exceptions=True)
            try:
                await self._stop_processes(graceful=finished)
            except BaseException:  # cancelled again while stopping: no orphans all the same
                for process in self.processes:
                    if process.exitcode is None:
                        process.kill()
                        process.join()
                raise
            for comm in self.comms:
                comm.abort()

    async def _supervise(self, watchers: list[asyncio.Task[Any]], pumps: list[asyncio.Task[Any]]) -> None:
        """Wait for every worker; on a failure, raise the root cause among those reported."""
        pending: set[asyncio.Task[Any]] = {*watchers, *pumps}
        errors: list[BaseException] = []
        while any(not task.done() for task in watchers):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            errors.extend(_failures(done))
            if errors:
                break
        if not errors:
            return
        if min(map(_rank, errors)) > 0:
            # A worker may have failed because another one did: let the cause arrive.
            others = {task for task in pending if task in watchers}
            if others:
                done, _ = await asyncio.wait(others, timeout=self.mapping.grace)
                errors.extend(_failures(done))
        raise min(errors, key=_rank)

    async def _watch(self, wid: int) -> None:
        """Relay worker ``wid``'s messages until it reports the end of its run.

        Raises:
            WorkerDied: the process ended without reporting.
            Aiod4pError: the worker reported this error.
        """
        reader = asyncio.create_task(self._read(wid))
        exited = asyncio.create_task(self._exited(wid))
        try:
            await asyncio.wait({reader, exited}, return_when=asyncio.FIRST_COMPLETED)
            # The process has ended: its last messages may still be in the pipe. Relay
            # them; give up only when nothing more arrives (another process, such as a
            # child of the worker, holds the pipe open).
            while not reader.done():
                received = self.received[wid]
                await asyncio.wait({reader}, timeout=self.mapping.grace)
                if not reader.done() and self.received[wid] == received and self.receiving[wid]:
                    raise WorkerDied(self._death(wid))
            reader.result()
        finally:
            for task in (reader, exited):
                task.cancel()
            await asyncio.gather(reader, exited, return_exceptions=True)

    async def _read(self, wid: int) -> None:
        comm, sink, control = self.comms[wid], self.sink, self.control
        while True:
            self.receiving[wid] = True
            try:
                message = await comm.receive()
            except (EndOfChannel, PeerDied):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.mapping.grace):
                        await self._exited(wid)
                raise WorkerDied(self._death(wid)) from None
            self.receiving[wid] = False
            self.received[wid] += 1
            kind = message[0]
            if kind == "r":
                await sink.emit(message[1], message[2], message[3])
            elif kind == "s":
                control.publish_stats(wid, message[1])
            elif kind == "c":
                self.credits[(message[1], wid)].release()
            elif kind == "done":
                self.final[wid] = message[1]
                control.publish_stats(wid, message[1])
                await comm.aclose()  # goodbye: the worker may exit
                return
            elif kind == "error":
                raise message[1]
            else:
                raise TransportError(f"unexpected message {kind!r} from worker {wid}")

    def _death(self, wid: int) -> str:
        process = self.processes[wid]
        code = process.exitcode
        if code is None:
            how = "stopped responding"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"worker process {wid} (pid {process.pid}) {how} before the run finished"

    # -- feeds and drain ---------------------------------------------------------
    async def _pump(self, pe_id: str, wid: int, feed: Feed) -> None:
        """Send a feed the parent holds to worker ``wid``, a chunk per credit."""
        comm, credits = self.comms[wid], self.credits[(pe_id, wid)]
        batch_size = self.plan.options.batch_size
        buffer: list[Any] = []
        ready, room = asyncio.Event(), asyncio.Event()
        finished = False

        async def read() -> None:
            nonlocal finished
            try:
                if isinstance(feed, AsyncIterable):
                    async for element in feed:
                        buffer.append(element)
                        ready.set()
                        while len(buffer) >= batch_size:
                            room.clear()
                            await room.wait()
                else:
                    assert isinstance(feed, Iterable)
                    for element in feed:
                        buffer.append(element)
                        if len(buffer) >= batch_size:
                            ready.set()
                            room.clear()
                            await room.wait()
            finally:
                finished = True
                ready.set()

        reader = asyncio.create_task(read())
        try:
            while not self.draining:
                await ready.wait()
                ready.clear()
                while buffer and not self.draining:
                    await credits.acquire()
                    if self.draining:
                        break
                    chunk = buffer[:batch_size]
                    del buffer[:batch_size]
                    room.set()
                    try:
                        await comm.send(("feed", pe_id, chunk))
                    except UnpicklableMessage as exc:
                        raise InputError(f"an input of PE {pe_id} cannot be pickled: {exc.__cause__}") from exc
                if finished:
                    break
            if not self.draining:
                try:
                    await reader
                except Exception as exc:
                    raise _error(InstanceRef(pe_id, 0), "feed", exc) from exc
                await comm.send(("feed_end", pe_id))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _drain(self) -> None:
        self.draining = True
        for comm in self.comms:
            task = asyncio.get_running_loop().create_task(self._post(comm, ("drain",)))
            self._posts.add(task)
            task.add_done_callback(self._posts.discard)

    @staticmethod
    async def _post(comm: Comm, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(TransportError):
            await comm.send(message)

    # -- stopping ---------------------------------------------------------------
    async def _exited(self, wid: int) -> None:
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
                    await asyncio.gather(*(self._exited(wid) for wid in alive))
        loop = asyncio.get_running_loop()
        for process, exit_future in zip(self.processes, self._exits, strict=True):
            if not exit_future.done():
                loop.remove_reader(process.sentinel)
                exit_future.cancel()
            if process.exitcode is not None:
                process.close()


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


def _failures(tasks: set[asyncio.Task[Any]]) -> list[BaseException]:
    return [error for task in tasks if not task.cancelled() and (error := task.exception()) is not None]


def _rank(error: BaseException) -> int:
    """Root causes first: a worker's own error, then a dead worker, then broken links."""
    if isinstance(error, PeerDied):
        return 2
    if isinstance(error, WorkerDied):
        return 1
    return 0


def _pickle_plan(plan: ExecutionPlan, method: str) -> bytes:
    """Pickle the plan for a spawned worker, naming the PE that cannot be pickled.

    Raises:
        GraphError: a PE (or the plan) cannot be pickled.
    """
    try:
        return pickle.dumps(plan, protocol=5)
    except Exception as exc:
        culprit = _unpicklable(plan.pes)
        if culprit is None:
            raise GraphError(f"the workflow cannot be pickled to start {method}ed worker processes: {exc}") from exc
        pe_id, pe_exc = culprit
        raise GraphError(
            f"PE {pe_id} cannot be pickled to start {method}ed worker processes:"
            f" {type(pe_exc).__name__}: {pe_exc} (define PEs and their functions at module level,"
            f" or use the fork start method)"
        ) from pe_exc


def _unpicklable(values: Mapping[str, Any], dumps: Callable[..., bytes] = pickle.dumps) -> tuple[str, Exception] | None:
    """The first ``(key, error)`` whose value ``dumps`` cannot pickle, if any."""
    for key, value in values.items():
        try:
            dumps(value, protocol=5)
        except Exception as exc:
            return key, exc
    return None


def _modules_to_preload(plan_data: bytes) -> list[tuple[str, str]]:
    """Modules the plan refers to that a fresh interpreter could not import by name.

    A workflow file loaded by path (``aiod4p run path/to/flow.py``) is such a
    module when its directory or name does not make it importable.
    """
    names = {arg for _, arg, _ in pickletools.genops(plan_data) if isinstance(arg, str) and arg in sys.modules}
    preload = []
    for name in sorted(names):
        module = sys.modules[name]
        path = getattr(module, "__file__", None)
        if name == "__main__" or "." in name or not path:
            continue
        found = importlib.machinery.PathFinder.find_spec(name, sys.path)
        if found is None or found.origin != path:
            preload.append((name, path))
    return preload
