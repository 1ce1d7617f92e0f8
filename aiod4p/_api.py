"""The Python API: run a workflow, or embed it in a running event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import logging
import operator
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

from ._checkpoint import Suspended
from ._engine import YIELD_SECONDS
from ._frames import importing_workflow_code
from ._graph import WorkflowGraph
from ._inputs import Inputs, find_pe, resolve_inputs
from ._loading import in_worker
from ._pe import PE
from ._plan import DEFAULT_BATCH_SIZE, DEFAULT_CREDITS, DEFAULT_MAX_DELAY, ExecutionPlan, make_plan
from ._results import QueueSink, ResultRecord, Results
from ._signals import ABORT_GRACE, HELD_GRACE, HeldLoopInterrupt, loop_turns
from ._stats import InstanceStats
from .errors import Aiod4pError, GraphError, InputError, MappingUnavailable
from .mappings import BaseMapping, RunControl, get_mapping
from .sources import LiveFeed

logger = logging.getLogger("aiod4p")

__all__ = ["WorkflowRun", "run", "run_async", "run_blocking", "start"]

T = TypeVar("T")


class WorkflowRun:
    """A workflow running in the current event loop.

    Iterate it (``async for record in run``) to receive results as they are
    produced, or await :meth:`results` for all of them. :meth:`drain` stops
    the sources and lets in-flight items finish; :meth:`aclose` cancels
    everything at once. Use it as an async context manager, which aborts the
    run if the block exits before the run has finished.

    Args:
        graph: the workflow.
        inputs: what feeds its roots (see :func:`aiod4p.run`).
        mapping: the mapping's name (``"simple"``, ``"async"``, ``"multi"``, ``"mpi"``, ``"ray"``, ``"storm"``)
            or a mapping object.
        workers: processes, ranks or actors (``None``: the mapping's default).
        batch_size: items per batch on a channel.
        credits: batches a channel may have in flight before its sender waits.
        max_delay: seconds a partly filled batch may wait for more items.
        result_batches: batches of results that may wait for the consumer before the run waits for it (and at
            most :attr:`~aiod4p.PlanOptions.result_bytes` of them: ``RESULT_WINDOW`` times ``batch_bytes``).
        provenance: record provenance at this level (``"pe"`` or ``"item"``; read it back with
            :func:`aiod4p.provenance_document` from :attr:`stats`).

    Attributes:
        plan: the execution plan.
        stats: per-instance statistics, once the run has finished.
        suspended: the id of the checkpoint the run stopped at, once a run asked to :meth:`suspend` has ended
            (``None`` otherwise: a run asked to that ended before the checkpoint completed ended as any run).
    """

    def __init__(
        self,
        graph: WorkflowGraph,
        inputs: Inputs = None,
        *,
        mapping: str | BaseMapping = "async",
        workers: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        credits: int = DEFAULT_CREDITS,
        max_delay: float = DEFAULT_MAX_DELAY,
        result_batches: int = 16,
        provenance: str | None = None,
    ) -> None:
        if not isinstance(graph, WorkflowGraph):
            hint = ": add it to a WorkflowGraph and run the graph" if isinstance(graph, PE) else ""
            raise GraphError(f"a run takes a WorkflowGraph, not {graph!r}{hint}")
        if workers is not None:
            workers = _positive_integer(workers, "workers", " (None: the mapping's default)")
        batch_size = _positive_integer(batch_size, "batch_size")
        credits = _positive_integer(credits, "credits")
        result_batches = _positive_integer(result_batches, "result_batches")
        if not isinstance(max_delay, (int, float)) or not max_delay >= 0:
            raise ValueError(f"max_delay must be a number of seconds, at least 0, not {max_delay!r}")
        self.mapping = resolve_mapping(mapping)
        options = self.mapping.plan_options(workers, batch_size, credits)
        if provenance is not None:  # "pe" or "item": read back with aiod4p.provenance_document(run.stats)
            if self.mapping.name == "storm":
                raise Aiod4pError("provenance is not recorded on the storm mapping: Storm routes the items itself")
            options = dataclasses.replace(options, provenance=provenance)
        self.plan: ExecutionPlan = make_plan(graph, options)
        self.plan.graph.check_runnable()
        self.feeds = resolve_inputs(self.plan.graph, inputs)
        self.stats: list[InstanceStats] = []
        self.suspended: int | None = None
        self._max_delay = max_delay
        self._sink = QueueSink(result_batches, self.plan.options.result_bytes)
        self._control = RunControl()
        self._ready: deque[ResultRecord] = deque()
        self._read_since = time.monotonic()  # when the reader last let the event loop run other tasks here
        self._task: asyncio.Task[None] | None = None
        self._started: float | None = None
        self._finished: float | None = None

    def start(self) -> WorkflowRun:
        """Start running (idempotent); needs a running event loop, and once started, the loop it started in
        until the run has ended.

        Raises:
            InputError: a :class:`~aiod4p.sources.LiveFeed` input is feeding another run, or its stream is over
                (:meth:`~aiod4p.sources.LiveFeed.claim`).
            Aiod4pError: the run started in another event loop and has not ended.
        """
        self._check_loop()
        if self._task is None:
            try:
                for pe, feed in self.feeds.items():
                    if isinstance(feed, LiveFeed):
                        feed.claim(self, pe)
            except InputError:
                self._release()
                raise
            self._started = time.perf_counter()
            self._task = asyncio.get_running_loop().create_task(self._execute(), name="aiod4p run")
            # a task cancelled before its first step never runs _execute's own release
            self._task.add_done_callback(lambda _: self._release())
        return self

    def _check_loop(self) -> None:
        """Refuse to use a run that has not ended from an event loop other than the one it started in.

        Its task, its result queue and its channels belong to that loop: waited on from another one, a read
        or :meth:`send` waited forever when that loop was closed (a run started in a loop closed before it
        ended never ends), and raised asyncio's ``RuntimeError`` with the whole queue of results in its
        message, or waited forever, when that loop ran in another thread. A run that has ended may be read
        from any loop: nothing of it waits on its loop any more.

        Raises:
            Aiod4pError: the run started in another event loop, and has not ended.
        """
        if self._task is None or self._task.done():
            return
        own = self._task.get_loop()
        if own is asyncio.get_running_loop():
            return
        where = (
            "an event loop closed before the run ended, so it never will" if own.is_closed() else "another event loop"
        )
        raise Aiod4pError(
            f"this run started in {where}: a run is read, fed and closed in the loop it started in; start a new"
            " run (aiod4p.start()) in this loop"
        )

    def _release(self) -> None:
        """Let a later run take this run's live feeds (idempotent)."""
        for feed in self.feeds.values():
            if isinstance(feed, LiveFeed):
                feed.release(self)

    async def _execute(self) -> None:
        try:
            try:
                stats = await self.mapping.execute(self.plan, self.feeds, self._sink, self._control, self._max_delay)
            except Suspended as stop:
                self.suspended = stop.checkpoint
                stats = self._control.stats()
            for pe, feed in self.feeds.items():  # a line stream's bad lines count for the instance it fed
                for entry in stats:
                    if (entry.pe, entry.instance) == (pe, 0):
                        entry.skipped += getattr(feed, "skipped", 0)
            self.stats = stats
        finally:
            self._finished = time.perf_counter()
            self._release()  # when the run ends, not a loop step later: a run started next may take its feeds

    def instances(self, pe: str | PE) -> list[PE]:
        """The PE objects this run's instances of ``pe`` (a PE id, or the PE as built) work on, by index.

        Every run works on fresh copies of the PEs, taken when it starts, and
        never changes the PE objects of the graph: this is how to look at the
        state of a running or finished instance. Only mappings that run PEs in
        this process (simple, async) have them: the list is empty for the
        others, and before the run starts.

        Raises:
            InputError: ``pe`` is not a PE of this run.
        """
        pe_id = pe if isinstance(pe, str) else pe.id
        if pe_id not in self.plan.pes:
            raise InputError(f"{pe!r} is not a PE of this workflow (PEs: {', '.join(self.plan.pes)})")
        found = [(ref.index, obj) for ref, obj in self._control.instances.items() if ref.pe == pe_id]
        return [obj for _, obj in sorted(found, key=lambda entry: entry[0])]

    def live_stats(self) -> list[InstanceStats]:
        """Per-instance statistics: the final ones once the run has finished, else the latest published.

        While running (and after a failure) these are what the mapping has
        published so far: live objects on one event loop, periodic snapshots
        from worker processes; instances not yet reported are missing.
        """
        return self.stats or self._control.stats()

    @property
    def elapsed(self) -> float:
        """Seconds since the run started, until it finished (0 before it starts)."""
        if self._started is None:
            return 0.0
        return (self._finished or time.perf_counter()) - self._started

    @property
    def under_way(self) -> bool:
        """Whether the mapping has started: its workers run the job (on multi, from the first one's start), and
        :meth:`drain` is acted on (at once, or as soon as the mapping listens for it)."""
        return self._control.under_way

    @property
    def done(self) -> bool:
        """Whether the run has ended (finished, failed or aborted)."""
        return self._task is not None and self._task.done()

    def drain(self) -> None:
        """Stop the sources; items already accepted still reach the results. Nothing once :meth:`suspend` was
        called: the suspend's stop stands."""
        self._control.drain()

    def suspend(self) -> None:
        """Take a checkpoint now and stop the run at it, to be resumed later (``restore=True``): for maintenance.

        Unlike :meth:`drain`, the sources are not finished and no PE's ``postprocess`` runs: windows and
        counts stay in the checkpoint, and a restore goes on from it exactly once. A checkpoint under way
        is the one the run stops at. The results that follow the checkpoint are dropped from the
        ``results_path`` file and, under ``restarts`` on a mapping with worker processes, from what the reader
        has not been given yet (a restore makes them again); otherwise a reader may already hold some of them
        (the async mapping ignores ``restarts``). The run then ends
        as a drained one does, and :attr:`suspended` names the checkpoint. Idempotent.

        A run that ends by itself while the checkpoint is taken ends as any run does if every instance had
        finished before the checkpoint reached it; else it stops at that checkpoint, and its restore makes again
        what followed it. Once suspending, :meth:`drain` does nothing: the suspend's stop stands.

        Raises:
            Aiod4pError: the run takes no checkpoints (its mapping's ``checkpointing`` is not set), or it drains
                already (its sources stopped for good: a drained run ends with a checkpoint that resumes nothing).
        """
        if self.mapping.checkpointing is None:
            raise Aiod4pError(
                "suspend(): this run takes no checkpoints, so it could not be resumed: set its mapping's"
                " checkpointing (aiod4p run: --checkpoint-dir), or drain() it"
            )
        if self._control.draining:
            raise Aiod4pError(
                "suspend(): the run drains already (drain() was called): its sources stopped for good, and it ends"
                " with a checkpoint that a restore resumes nothing from"
            )
        self._control.suspend()

    def feed(self, pe: str | PE) -> LiveFeed:
        """The :class:`~aiod4p.sources.LiveFeed` given as the input of root ``pe``: the PE, its id or its name,
        as in the inputs.

        Raises:
            InputError: ``pe`` names no PE of the graph (or several), or its input is not a LiveFeed.
        """
        pe_id = find_pe(self.plan.graph, pe, "PE to feed")
        live = self.feeds.get(pe_id)
        if not isinstance(live, LiveFeed):
            fed = ", ".join(k for k, v in self.feeds.items() if isinstance(v, LiveFeed)) or "none"
            raise InputError(f"the input of PE {pe_id} is not a LiveFeed (PEs fed by a LiveFeed: {fed})")
        return live

    async def send(self, pe: str | PE, item: Any) -> None:
        """Feed ``item`` to root ``pe`` (the PE, its id or its name, as in the inputs; fed by a LiveFeed), waiting
        while the workflow is full.

        Starts the run if needed. While a run restarts from a checkpoint (``--restarts``), it waits for the
        new attempt to take items.

        Raises:
            InputError: ``pe`` names no PE of the graph (or several), or its input is not a LiveFeed.
            Aiod4pError: the feed is closed, or the run ended first (its own
                error, such as a PEError, is raised when it failed), or it started in another event loop and
                has not ended.
        """
        pe_id = find_pe(self.plan.graph, pe, "PE to feed")
        live = self.feed(pe_id)
        task = self.start()._task
        assert task is not None
        while not (live.closed or task.done()):
            if not live.ended:
                if live.has_turn() or await live.wait_turn(unless=task):
                    live.send_nowait(item)  # in the turn's own step: a cancelled send has queued nothing
                    return
                continue
            # A run that stopped taking items by itself (ended) is failing, and its error is raised; or it
            # restarts from a checkpoint, and its new attempt takes them again.
            waiting = asyncio.ensure_future(live.wait_read())
            try:
                await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
        if task.done():
            self._raise_outcome(task)
        raise Aiod4pError(f"cannot send to PE {pe_id}: its feed is closed or the run has ended")

    async def aclose(self) -> None:
        """Cancel the run and release everything it holds; idempotent. A read or :meth:`send` waiting on the run, in
        another task, then raises :class:`~aiod4p.errors.Aiod4pError` (the run was aborted), as any later one does.

        Raises:
            Aiod4pError: the run started in another event loop and has not ended.
        """
        self._check_loop()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the caller itself is being cancelled
            except Exception:  # the run's own failure is reported by results(), not by closing
                pass

    def __aiter__(self) -> AsyncIterator[ResultRecord]:
        return self

    async def __anext__(self) -> ResultRecord:
        """The next result. Results already here are handed out without waiting, but the event loop runs its
        other tasks every :data:`~aiod4p._engine.YIELD_SECONDS` of reading: a reader that works on each
        result (a service writing it to its client) does not hold the loop for a whole batch of them."""
        now = time.monotonic()
        if now - self._read_since >= YIELD_SECONDS:
            self._read_since = now  # first: a read cancelled in its turn (a timeout) must not give way again
            await asyncio.sleep(0)
        while not self._ready:
            if not await self._take_batch():
                raise StopAsyncIteration
        return self._ready.popleft()

    async def _take_batch(self) -> bool:
        """Move the next batch of results to ``_ready``; false once the run has ended and every batch was taken.

        A batch taken is kept even when the caller is cancelled meanwhile (a timeout on ``anext``): the next
        call returns its results, none is lost.
        """
        task = self.start()._task
        assert task is not None
        queue = self._sink.queue
        while True:
            if not queue.empty():
                self._ready.extend(self._sink.taken(queue.get_nowait()))
                return True
            if task.done():
                self._raise_outcome(task)
                return False
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                self._read_since = time.monotonic()
            finally:
                if not getter.done():
                    getter.cancel()
                    await asyncio.wait({getter})  # it ends at once, taking no batch: no task is left behind
                if not getter.cancelled():
                    self._ready.extend(self._sink.taken(getter.result()))
            if not getter.cancelled():
                return True

    @staticmethod
    def _raise_outcome(task: asyncio.Task[None]) -> None:
        """Raise what ended the run's ``task``, if anything did: the run's own error, or an
        :class:`~aiod4p.errors.Aiod4pError` when it was aborted (:meth:`aclose`, or its task cancelled), never the
        task's ``CancelledError``: a reader or sender in another task was not cancelled, and must not end as if it
        were."""
        if task.cancelled():
            raise Aiod4pError("the run was aborted before it finished (aclose(), or its task was cancelled)")
        task.result()

    async def results(self) -> Results:
        """Wait for the run to finish and return every result not yet iterated.

        Raises:
            PEError: a PE raised.
            Aiod4pError: the run failed otherwise, or was aborted (:meth:`aclose`), or it started in another
                event loop and has not ended.
            Either carries the results the run gave before it failed in its ``partial_results``.
        """
        try:
            while await self._take_batch():
                pass
        except Aiod4pError as exc:
            if exc.partial_results is None:  # a second call re-raises the error the first one gave them on
                exc.partial_results = self._take_ready()
            raise
        return self._take_ready()

    def _take_ready(self) -> Results:
        """The results taken from the run and not yet handed out, handed out now."""
        taken = Results(list(self._ready))
        self._ready.clear()
        return taken

    async def __aenter__(self) -> WorkflowRun:
        return self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def start(graph: WorkflowGraph, inputs: Inputs = None, **options: Any) -> WorkflowRun:
    """Prepare a run of ``graph`` for use inside an event loop.

    ``options`` are those of :class:`WorkflowRun` (``mapping``, ``workers``,
    ``batch_size``, ``credits``, ``max_delay``, ``result_batches``, ``provenance``). The run starts when entered
    (``async with``), iterated, or when :meth:`WorkflowRun.results` is awaited.

    Raises:
        GraphError: ``graph`` is not a WorkflowGraph, or is invalid.
        InputError: the inputs are invalid.
        MappingUnavailable: the mapping is unknown, its extra is missing, or it is
            neither a name nor a mapping object.
        ValueError: ``workers``, ``batch_size``, ``credits`` or ``result_batches`` is
            not a positive integer, or ``max_delay`` is negative.
    """
    return WorkflowRun(graph, inputs, **options)


async def run_async(graph: WorkflowGraph, inputs: Inputs = None, **options: Any) -> Results:
    """Run ``graph`` in the current event loop and return its results.

    Cancelling the awaiting task drains the run (sources stop, in-flight
    items finish, ``postprocess`` runs) before the cancellation propagates (a
    cancelled await returns nothing: iterate :func:`start`'s run to keep a drained run's results); a
    second cancellation aborts at once, and so does a first one while the
    mapping is still starting (:attr:`WorkflowRun.under_way` is false: no item
    is in flight yet, and start-up may take seconds), as ``aiod4p run`` does.

    Raises:
        PEError: a PE raised; its ``partial_results`` holds the results the run gave before.
        GraphError, InputError, MappingUnavailable, ValueError: as :func:`start`.
    """
    return await _run_draining_on_cancel(graph, inputs, lambda drained: None, **options)


async def _run_draining_on_cancel(
    graph: WorkflowGraph, inputs: Inputs, keep_drained: Callable[[Results], None], **options: Any
) -> Results:
    """:func:`run_async`, handing the results of a run drained on cancellation to ``keep_drained`` before the
    cancellation propagates. Recording provenance, which it cannot return, says so on the ``aiod4p`` logger."""
    if options.get("provenance") is not None:
        logger.warning(
            "aiod4p.run(provenance=%r) and run_async record provenance and return the results only, so the"
            " provenance is lost:"
            " record it with `async with aiod4p.start(..., provenance=%r) as run:` and then"
            ' aiod4p.write_provenance(run.stats, "run.json") (docs/provenance.md, From Python)',
            options["provenance"],
            options["provenance"],
        )
    async with start(graph, inputs, **options) as workflow:
        try:
            return await workflow.results()
        except asyncio.CancelledError:
            if workflow.under_way:  # else leaving the block aborts the run
                workflow.drain()
                keep_drained(await workflow.results())
            raise


def run(graph: WorkflowGraph, inputs: Inputs = None, **options: Any) -> Results:
    """Run ``graph`` to completion and return its results.

    Runs its own event loop (uvloop for mappings that use it, when installed).
    Called where an event loop is running in this thread, as in a Jupyter
    notebook's cell, it runs a new event loop in a new thread and blocks the
    caller (and its loop) until the run ends, as any blocking call there does
    (see :func:`run_blocking`);
    async code that must stay responsive awaits :func:`run_async` instead.

    Raises:
        PEError: a PE raised; its ``partial_results`` holds the results the run gave before.
        GraphError, InputError, MappingUnavailable, ValueError: as :func:`start`.
        KeyboardInterrupt: interrupted (Ctrl-C, or a notebook's "interrupt the kernel"): once the run drained,
            with its results in the exception's ``partial_results`` attribute (in a notebook,
            ``sys.last_value.partial_results``); interrupted twice (the run aborted), or while the mapping was
            starting, without.
    """
    mapping_obj = resolve_mapping(options.get("mapping", "async"))
    options["mapping"] = mapping_obj
    drained: list[Results] = []
    try:
        return run_blocking(
            lambda: _run_draining_on_cancel(graph, inputs, drained.append, **options), mapping_obj.uses_uvloop
        )
    except KeyboardInterrupt as interrupted:
        if drained:  # Python's own class, so that a script it ends still ends as killed by SIGINT (status 130)
            interrupted.partial_results = results = drained[0]  # type: ignore[attr-defined]
            interrupted.args = (
                f"the run was interrupted and drained; its {len(results):,} results are in this exception's"
                " partial_results",
            )
        raise


def run_blocking(main: Callable[[], Coroutine[Any, Any, T]], use_uvloop: bool) -> T:
    """Run ``main()`` on an event loop of its own and return what it returns: the blocking calls' one way in.

    With no event loop running in this thread, the loop runs here under
    :class:`asyncio.Runner`: a first Ctrl-C cancels ``main()`` (:func:`run_async`
    drains), a second one aborts it, and ``KeyboardInterrupt`` is raised once
    ``main()`` has ended. Where a loop is running (a notebook's cell, or async
    code calling a blocking function), the loop runs in a new thread while this
    one waits, and SIGINT (Ctrl-C, a notebook's "interrupt the kernel") has
    those same effects, when this is the main thread. Outside a Jupyter kernel,
    where blocking a running loop is most likely a mistake, that case also
    warns (:class:`RuntimeWarning`).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        beside = False  # the run goes on out of this handler: not the context of every exception it raises
    else:
        beside = True
    if not beside:
        with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
            return runner.run(main())
    if "ipykernel" not in sys.modules:
        warnings.warn(
            "aiod4p.run() was called where an event loop is running: it blocks that loop until the run ends;"
            " await aiod4p.run_async() instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return _run_beside(main, use_uvloop)


Running = concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]]


def _run_beside(main: Callable[[], Coroutine[Any, Any, T]], use_uvloop: bool) -> T:
    """:func:`run_blocking` where this thread's event loop is running: ``main()`` in a thread and loop of its own."""
    running: Running = concurrent.futures.Future()
    outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

    async def handed_over() -> T:
        task = asyncio.current_task()
        assert task is not None
        running.set_result((asyncio.get_running_loop(), task))
        return await main()

    def serve() -> None:
        try:
            with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
                outcome.set_result(runner.run(handed_over()))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            if not running.done():
                running.set_exception(exc)
            outcome.set_exception(exc)

    interrupts = 0

    thread = threading.Thread(target=serve, name="aiod4p run", daemon=True)

    def interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        running.add_done_callback(functools.partial(_cancel, again=interrupts > 1))
        if interrupts == 2:
            watchdog = functools.partial(_interrupt_a_held_loop, running, outcome, thread)
            threading.Thread(target=watchdog, name="aiod4p abort watchdog", daemon=True).start()

    with _on_ctrl_c(interrupt):
        thread.start()
        try:
            return outcome.result()
        except asyncio.CancelledError:
            if interrupts:
                raise KeyboardInterrupt from None
            raise
        except HeldLoopInterrupt as held:  # raised in the code of the PE that held the loop: its traceback
            raise KeyboardInterrupt from held


def _cancel(running: Running, again: bool) -> None:
    """Cancel the run's task: :func:`run_async` drains, as on :class:`asyncio.Runner`'s first SIGINT; cancelled
    ``again``, it aborts. Again is in the loop's next turn, after the task has taken the first cancellation,
    which one coming right after it would otherwise join."""
    if running.exception() is None:
        loop, task = running.result()
        cancel = (lambda: loop.call_soon(task.cancel)) if again else task.cancel
        with contextlib.suppress(RuntimeError):  # the loop is closed: the run has ended
            loop.call_soon_threadsafe(cancel)


def _interrupt_a_held_loop(running: Running, outcome: concurrent.futures.Future[Any], thread: threading.Thread) -> None:
    """After a second interrupt: if the run has not ended within :data:`HELD_GRACE` seconds and its loop does
    not turn in the rest of :data:`ABORT_GRACE` (a PE holds it: a blocking call, a loop that never ends; a loop
    that waited a moment for a CPU, or for a clean-up step, is not held), raise ``KeyboardInterrupt`` in the
    run's thread, in that PE's code (at its next Python instruction: a call into C that never returns still
    holds it). The command line ends its process instead; a notebook's kernel must go on."""
    if concurrent.futures.wait([outcome], HELD_GRACE).done or not running.done() or running.exception():
        return
    loop, _ = running.result()
    if thread.ident is None or loop_turns(loop, ABORT_GRACE - HELD_GRACE):
        return
    print("aiod4p: a PE holds the event loop: interrupting its code", file=sys.stderr, flush=True)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(HeldLoopInterrupt))


@contextlib.contextmanager
def _on_ctrl_c(interrupt: Callable[[], None]) -> Iterator[None]:
    """In the main thread, let SIGINT (Ctrl-C, a notebook's "interrupt the kernel") call ``interrupt()``.

    The running loop's own handler (:class:`asyncio.Runner`'s cancels its main
    task, a notebook's raises ``KeyboardInterrupt``) could not act while its
    thread waits, and an exception raised there would leave the run behind. A
    SIGINT ignored, or handled outside Python, stays so.
    """
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(handler):
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: interrupt())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def resolve_mapping(mapping: str | BaseMapping) -> BaseMapping:
    """The mapping a run's ``mapping`` option names: a new one for a name, else the mapping object itself.

    Raises:
        MappingUnavailable: ``mapping`` is an unknown name, a mapping whose extra is missing, or
            neither a name nor a mapping object.
        Aiod4pError: a worker process, importing the workflow's module, asks for a mapping that starts
            processes: the module runs a workflow at import, which every worker's import would start again (on
            mpi, ranks inside ranks hung).
    """
    if isinstance(mapping, str):
        mapping = get_mapping(mapping)
    elif not isinstance(mapping, BaseMapping):
        raise MappingUnavailable(
            f"mapping must be a mapping's name (such as 'async') or a mapping object, not {mapping!r}"
        )
    if mapping.uses_processes and in_worker() and importing_workflow_code():
        raise Aiod4pError(
            f"a run on the {mapping.name} mapping was started while a worker process imported the workflow's"
            " module: the module runs a workflow when imported, and each worker imports it again; run it only"
            " under `if __name__ == '__main__':`"
        )
    return mapping


def run_in_threads(graph: WorkflowGraph, names: Iterable[str]) -> None:
    """Make the PEs of ``graph`` called ``names`` (ids or names) threaded (``aiod4p run --threaded``).

    Raises:
        GraphError: no PE of the graph has one of the names (found once the workflow is loaded, as ``--stdin``'s
            is: exit 1, not a usage error).
    """
    names = list(names)
    if not names:
        return
    pes = graph.flatten().pes
    for name in names:
        chosen = [pe for pe_id, pe in pes.items() if name in (pe_id, pe.name)]
        if not chosen:
            raise GraphError(f"--threaded {name}: the workflow has no such PE (PEs: {', '.join(pes)})")
        for pe in chosen:
            pe.threaded = True


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory (:func:`_uvloop_closing_whole`) when wanted and installed, else ``None`` (asyncio's)."""
    return _uvloop_closing_whole() if use_uvloop else None


@functools.cache
def _uvloop_closing_whole() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop (``None`` if uvloop is not installed), whose ``close()`` closes what was left open even where
    warnings are errors.

    uvloop warns of each handle still open (a server a PE started and never closed) before it closes it: under
    ``-W error::ResourceWarning`` the warning raised there stopped the close half-way, and it then waited forever
    on the server's listening socket, in C, where not even a signal's Python handler runs. The warnings are given
    again, under the caller's filters, once the loop is closed (an error then is raised by ``close()``).
    """
    try:
        import uvloop
    except ImportError:
        return None

    class Loop(uvloop.Loop):
        def close(self) -> None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                super().close()
            for warning in caught:
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno, source=warning.source
                )

    return Loop


def _positive_integer(value: Any, name: str, hint: str = "") -> int:
    """``value`` as an ``int`` (a numpy integer too), if it is a whole number of at least 1.

    Raises:
        ValueError: naming the argument (``name``) and the value, followed by ``hint``.
    """
    try:
        count = operator.index(value) if not isinstance(value, bool) else 0
    except TypeError:
        count = 0
    if count < 1:
        raise ValueError(f"{name} must be a positive integer{hint}, not {value!r}")
    return count
