"""The engine: runs the PE instances a plan places on one worker.

Every mapping runs this engine; mappings differ only in where workers live
and which comm joins them. Each instance is an actor (a task) that takes
batches from its inbox, calls the PE, and hands outputs to its router. The
router batches per destination and flushes a batch when it is full, when the
actor is about to wait for input, and every ``max_delay`` seconds where the
channel has credit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import inspect
import itertools
import logging
import operator
import sys
import time
import traceback
import types
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from typing import TYPE_CHECKING, Any, TypeAlias

import greenlet

from ._channels import EOS, Inbox, LocalChannel, SenderChannel
from ._frames import called_with, short_repr, workflow_frame
from ._groupings import Router
from ._links import PeerLink, RemoteChannel
from ._pe import PE, Runtime
from ._plan import DEFAULT_MAX_DELAY, ExecutionPlan, InstanceRef
from ._provenance import ActorRecorder, WorkerRecorder
from ._results import ResultSink
from ._signals import interrupts_the_run
from ._sizes import SCALARS, approximate_batch_size, approximate_size
from ._stats import InstanceStats
from ._threads import DaemonThreadPool
from .errors import (
    Aiod4pError,
    CheckpointError,
    GraphError,
    InputError,
    PEError,
    TransportError,
    _StdoutClosed,
    stdout_closed,
)
from .sources import SourcePE
from .transports import Comm

if TYPE_CHECKING:
    from ._checkpoint import Aligner, WorkerCheckpoints

__all__ = ["HELD_FEEDS", "Feed", "Invoker", "ReadAhead", "Worker", "calls_take_turns", "pe_error"]

Feed: TypeAlias = int | Iterable[Any] | AsyncIterable[Any]
HELD_FEEDS = (list, tuple, range)
"""Feeds whose elements are in memory already (with a count, ``int``: the feeds that travel with a job, and that a
restore can replay)."""

logger = logging.getLogger("aiod4p")
pe_logger = logging.getLogger("aiod4p.pe")

# How long the engine may hold the event loop before it lets other tasks run (the host's among them).
YIELD_SECONDS = 0.005
# A turn held this long was held by a long batch: the engine then gives way on a timer (Worker.give_way), which
# costs a little throughput but lets due timers run first; shorter turns give way by sleep(0).
LONG_TURN = 2 * YIELD_SECONDS
# With ``fixed_order``, the engine lets other tasks run after this many batches instead (batches in, and
# batches that a long call writes): a count, not a time, so instances take turns in the same order on every run.
YIELD_BATCHES = 16
# A plain PE call that holds the caller's event loop this long in one go is logged (once per PE): nothing else
# in that loop ran meanwhile, a service's tasks among them. asyncio's debug mode says so from 0.1 s; dask from 3 s.
HELD_LOOP_WARNING = 1.0
# A call in a pool thread (a ``threaded`` PE's) adds to its instance's busy time at least this often while it
# runs, so that a long call that writes nothing yet shows busy in the live statistics, not idle until it returns.
THREADED_BUSY_FOLD = 0.1
# How much each batch moves an instance's measured pace (an exponential moving average): start-up waits,
# and a stretch held back by a stage downstream, are forgotten after a few dozen batches.
PACE_WEIGHT = 0.25
# What sending an item to another worker costs the sending worker, per byte of the item: copying it into
# the frame (fresh memory: its page faults cost most of it in a VM) and the socket's copy, about 1 ms a
# megabyte on these machines; a `bytes` object goes to the socket as it is: its copy alone, about 0.2 ms a
# megabyte (bench/ANALYSIS.md, heavy items).
SEND_SECONDS_PER_BYTE = 1e-9
SEND_SECONDS_PER_BYTES_BYTE = 2e-10
# What a PE's calls on the event loop ask of the actor that drives them (see _Actor._drive): route what
# write() has buffered, waiting for credit.
_ROUTE = object()
_DONE = object()  # the call has returned or raised
_IS_NOT_NONE = functools.partial(operator.is_not, None)  # what a generator yields that counts as an item


def _failed(exc: BaseException, caller: asyncio.Task[Any] | None) -> bool:
    """Whether ``exc``, out of a PE's code called by task ``caller``, is that code's failure rather than this
    task's cancellation, or the close of the coroutine that made the call.

    Any ``Exception`` is, and so are ``SystemExit`` (``sys.exit()`` in a PE or a library it calls) and a
    library's own ``BaseException``: the run fails naming the PE, rather than ending the process, or a
    worker, without a word. A ``CancelledError`` is only while nobody cancels the current task: the PE's
    code raised it, or let it out of something it awaited (a task someone else cancelled), and the run
    must fail on it, not end as if that instance had finished. A ``KeyboardInterrupt`` is, unless it
    interrupts the run (:func:`~aiod4p._signals.interrupts_the_run`): raised by the PE where no signal
    raises one, it would end the loop's thread (a Ray actor's) with nobody told. A ``GeneratorExit`` is
    when it comes while ``caller`` is the task that runs: the PE's code (or a library it calls) raised it.
    ``close()`` throws one into the coroutine that made the call from outside that task's steps (the
    collector, closing a pending task of an abandoned loop): that one is no failure, and must go on closing
    the coroutine.
    """
    if isinstance(exc, KeyboardInterrupt):
        return not interrupts_the_run(exc)
    if isinstance(exc, asyncio.CancelledError):
        task = _running_task()
        return task is not None and not task.cancelling()
    if isinstance(exc, GeneratorExit):
        return caller is not None and _running_task() is caller
    return True


def _running_task() -> asyncio.Task[Any] | None:
    """The task that runs now; ``None`` outside one, or outside a running event loop (where the collector
    closes a coroutine)."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running event loop
        return None


def pe_error(ref: InstanceRef, port: str, exc: BaseException) -> Aiod4pError:
    """The error to fail the run with when ``exc`` interrupts instance ``ref`` on ``port``.

    A transport's error (an item or result that cannot reach its destination, which
    names the PE and port itself) stays as it is, wherever the flush that hit it ran;
    so does a checkpoint's (a state that cannot be saved or written names its PE or
    file), whether the snapshot came between two calls or inside a source's call.
    A write to stdout whose reader went away (a ``print``, the run piped into
    ``head``) stops the run, as it stops a Unix tool: no failure of the PE.
    """
    if isinstance(exc, (PEError, TransportError, CheckpointError)):
        return exc
    if stdout_closed(exc):
        return _StdoutClosed(f"PE {ref.pe}[{ref.index}] wrote to stdout, whose reader went away")
    text = "".join(traceback.format_exception(exc))
    stop = _escaped_stop(exc)
    if stop is not None:
        shown = f"{type(stop).__name__}{f': {stop}' if str(stop) else ''}{_where(stop)}"
        message = f"{shown}, which Python turns into a RuntimeError when it escapes a generator or coroutine"
    else:
        message = f"{type(exc).__name__}: {exc}{_where(exc)}"
    return PEError(ref.pe, ref.index, port, message, text)


def _escaped_stop(exc: BaseException) -> StopIteration | StopAsyncIteration | None:
    """The ``StopIteration`` (or ``StopAsyncIteration``) that the workflow's code raised, when ``exc`` is the
    ``RuntimeError`` Python replaced it with as it escaped a generator or coroutine (the PE's own, or the
    engine's that made a plain call); ``None`` otherwise. The ``RuntimeError``'s own traceback holds the frames
    that resumed the generator or coroutine, not the one that raised."""
    stop = exc.__cause__
    if (
        type(exc) is RuntimeError
        and isinstance(stop, (StopIteration, StopAsyncIteration))
        and str(exc).endswith((" raised StopIteration", " raised StopAsyncIteration"))
        and workflow_frame(stop) is not None
    ):
        return stop
    return None


def _where(exc: BaseException) -> str:
    """`` (FILE, line N, in FUNCTION; ARGUMENT=VALUE)`` for the workflow's last frame that ``exc`` passed (see
    :func:`~aiod4p._frames.called_with`), or ``""`` when it passed none."""
    frame = workflow_frame(exc)
    if frame is None:
        return ""
    argument = called_with(exc)
    return f" ({frame.filename}, line {frame.lineno}, in {frame.name}{f'; {argument}' if argument else ''})"


class _Pending:
    """Items waiting to travel on one channel to one destination port.

    ``limit`` is the most items a batch on this channel carries, set before
    each batch from the destination's measured time per item and the size
    of the items (see :meth:`_Actor._batch_limit`); ``weight`` the credits
    the last batch took (more than one for an item larger than a batch's
    bytes), what the next one is expected to take.
    """

    __slots__ = (
        "blind",
        "cap",
        "channel",
        "dest",
        "dirty",
        "items",
        "limit",
        "port",
        "seconds",
        "siblings",
        "weight",
    )

    def __init__(self, channel: SenderChannel, dest: InstanceRef, port: str, bounds: tuple[int, float]) -> None:
        self.items: list[Any] = []
        # the most items, and the most of the destination's measured work, a batch on this channel carries
        self.cap, self.seconds = bounds
        self.dirty = False  # listed in the actor's dirty list, to be flushed
        self.channel = channel
        self.dest = dest
        self.port = port
        self.limit = 1
        self.weight = 1
        self.blind = 0  # batches sent before the destination's time per item was known
        # The pendings of the route when its grouping lets any of them take any item.
        self.siblings: _Candidates | None = None


class _ResultPending:
    """The results an instance wrote on one result port, not yet sent: a batch carries at most ``cap`` of
    them, and at most ``batch_bytes`` of items like the last written (``limit``)."""

    __slots__ = ("cap", "dirty", "items", "limit", "pe", "port")

    def __init__(self, pe: str, port: str, cap: int) -> None:
        self.items: list[Any] = []
        self.dirty = False
        self.pe = pe
        self.port = port
        self.cap = cap
        self.limit = cap


_COMPARED = 16  # the most candidates compared to choose the one with the most room


class _Candidates:
    """Instances any of which may take an item, and the choice of the one with the most room.

    Up to ``_COMPARED`` candidates, the choice compares them all; beyond, it compares the next
    ``_COMPARED`` of them in turn (a window moved on by every choice), so that a choice among
    thousands of instances (``-n 10000``) costs what one among sixteen does, and every candidate
    comes up within ``len(pendings) / _COMPARED`` choices.
    """

    __slots__ = ("pendings", "start")

    def __init__(self, pendings: list[_Pending]) -> None:
        self.pendings = pendings
        self.start = 0

    def compared(self) -> list[_Pending]:
        """The candidates this choice compares: all of them, or the next ``_COMPARED`` in turn."""
        pendings = self.pendings
        if len(pendings) <= _COMPARED:
            return pendings
        start = self.start
        self.start = (start + _COMPARED) % len(pendings)
        window = pendings[start : start + _COMPARED]
        if len(window) < _COMPARED:
            window += pendings[: _COMPARED - len(window)]
        return window

    def freest(self) -> _Pending:
        """The candidate with the most room, of those :meth:`compared` this time."""
        return max(self.compared(), key=_room)


class _Route:
    """One edge leaving an instance: its grouping's router splits batches among the pendings."""

    __slots__ = ("candidates", "deals", "local", "passes_through", "pendings", "router")

    def __init__(self, router: Router, pendings: list[_Pending]) -> None:
        self.router = router
        self.passes_through = router.passes_through
        self.deals = router.deals and len(pendings) > 1
        self.pendings = pendings
        self.candidates = _Candidates(pendings)
        # The candidates beside the sender, where any candidate may take any item and some are on other
        # workers: items that cost more to send than to process stay with them.
        local = [pending for pending in pendings if type(pending.channel) is LocalChannel]
        self.local = _Candidates(local) if router.any_destination and 0 < len(local) < len(pendings) else None
        if router.any_destination and len(pendings) > 1:
            for pending in pendings:
                pending.siblings = self.candidates


class _NeverDrains:
    """The drain flag of an invoker alone: its host stops a source by itself."""

    _draining = False


_NEVER_DRAINS = _NeverDrains()


class Invoker:
    """Calls one PE instance: its calling conventions, its output buffers, its lifecycle stages, its stats.

    What the PE writes stays in :attr:`buffers` for the host to take: a Storm
    bolt builds only an invoker and emits the buffers itself. The engine's
    :class:`_Actor` extends it with an inbox and routing, overriding the
    hooks that run the PE's calls (:meth:`_drive`: in a greenlet, so that
    write() waits for credit), that hand on the buffers while a long call
    (a generator) is still writing (:meth:`_route_outputs`,
    :meth:`_route_streamed`); a source stops producing once
    ``drains._draining`` is set (the actor's worker; never, for an invoker
    alone).

    Args:
        ref: the instance this invoker calls (names it in errors and stats).
        pe: the PE object of that instance.
        is_root: whether the PE is a root, called once per feed element.
        batch_size: how many items a port's buffer holds at most before a
            generator's further outputs are handed on (through the hooks)
            before it goes on (:attr:`stream_limit`, which an actor lowers for
            heavy items).
        batch_bytes: about how many bytes of outputs the buffers hold at most
            before they are handed on, within a generator's call or between
            the calls of a batch.
        worker_id: the worker recorded in :attr:`stats`.
    """

    def __init__(
        self,
        ref: InstanceRef,
        pe: PE,
        *,
        is_root: bool = False,
        batch_size: int = sys.maxsize,
        batch_bytes: int = sys.maxsize,
        worker_id: int = 0,
    ) -> None:
        self.ref = ref
        self.pe = pe
        self.is_root = is_root
        self.batch_size = self.stream_limit = batch_size
        self.batch_bytes = batch_bytes
        self.bytes_per_call: float | None = None  # outputs of one plain call, measured (see _in_parts)
        self.drains: Worker | _NeverDrains = _NEVER_DRAINS
        self.stats = InstanceStats(ref.pe, ref.index, worker_id)
        self.busy_since = self.blocked_then = 0.0  # the busy clock of the call under way (see _busy_fold)
        self.buffers: dict[str, list[Any]] = {port: [] for port in pe._output_ports}
        item_function = pe._item_function()
        self.fn: Callable[..., Any] | None = item_function[0] if item_function else None
        self.fn_port: str | None = item_function[1] if item_function else None
        self.fn_kind = _call_kind(self.fn) if self.fn is not None else ""
        # A PE without inputs takes no argument: it is called once per feed element.
        self.fn_of_item: Callable[[Any], Any] | None = (
            self.fn if self.fn is None or pe._input_ports else _ignoring_argument(self.fn)
        )
        self.process_kind = _call_kind(pe.process)
        single = list(pe._input_ports)
        # Read once: a PE's ports are fixed for a run, and reading them may build them (dispel4py's PEs derive them).
        self.has_inputs = bool(single)
        self.single_input = single[0] if len(single) == 1 else None

    async def call(self, port: str, items: list[Any]) -> None:
        """Hand ``items`` that arrived on input ``port`` to the PE, as the run loop does.

        What the PE writes stays in :attr:`buffers`: this is for hosts that
        route by themselves (Storm bolts).

        Raises:
            PEError: the PE raised; it names the PE, the instance and the port.
        """
        caller = _running_task()
        try:
            await self._handle(port, items)
        except BaseException as exc:
            if not _failed(exc, caller):
                raise
            self.stats.errors += 1
            raise pe_error(self.ref, port, exc) from exc

    async def lifecycle(self, stage: str) -> None:
        """Call the PE's ``preprocess`` or ``postprocess``; what it writes stays in :attr:`buffers`.

        Raises:
            PEError: the PE raised; it names the PE, the instance and the stage.
        """
        await self._lifecycle(stage, getattr(self.pe, stage))

    async def _lifecycle(self, stage: str, method: Any) -> None:
        """Call ``preprocess`` or ``postprocess``; what it wrote stays in the buffers."""
        caller = _running_task()
        self._busy_begin()
        try:
            await self._call_stage(method)
        except BaseException as exc:
            if not _failed(exc, caller):
                raise
            self.stats.errors += 1
            raise pe_error(self.ref, stage, exc) from exc
        finally:
            self._busy_fold()

    async def _call_stage(self, method: Callable[[], Any]) -> None:
        """Call lifecycle ``method`` (plain or ``async def``)."""
        await self._drive(_call_stage(method))

    # -- calling the PE ------------------------------------------------------
    async def _handle(self, port: str | None, items: list[Any]) -> None:
        await self._drive(self._handle_here(port, items))

    def _drive(self, call: Coroutine[Any, Any, None]) -> Awaitable[None]:
        """Run ``call`` (the PE's calls for one batch or stage); an invoker alone awaits it as it is."""
        return call

    async def _handle_here(self, port: str | None, items: list[Any]) -> None:
        if self.fn is not None:
            if port is None:  # a feed batch: input dicts
                # No input to hand over (a dispel4py root may take some).
                if not self.has_inputs and _carries_nothing(items):
                    return await self._call_fn(items)
                if self.single_input is not None and all(self.single_input in e for e in items):
                    return await self._call_fn([element[self.single_input] for element in items])
            else:
                return await self._call_fn(items)
        await self._call_process(port, items)

    async def _call_fn(self, items: list[Any]) -> None:
        item_fn, kind = self.fn, self.fn_kind
        assert item_fn is not None
        fn = self.fn_of_item
        assert fn is not None
        out_port = self.fn_port
        if kind == "sync":
            if out_port is None:

                def call_part(part: list[Any]) -> None:
                    for item in part:
                        fn(item)

                await self._in_parts(items, call_part)
                return
            buffers = self.buffers

            def call_part(part: list[Any]) -> None:
                append = buffers[out_port].append
                if not self.has_inputs:
                    for _ in part:
                        result = item_fn()
                        if result is not None:
                            append(result)
                else:
                    for item in part:
                        result = fn(item)
                        if result is not None:
                            append(result)

            await self._in_parts(items, call_part)
        elif kind == "async":
            for item in items:
                result = await fn(item)
                if result is not None and out_port is not None:
                    self.buffers[out_port].append(result)
        elif kind == "gen":
            # A source (no input: -i N, or an endless generator) stops producing once the run drains; a root
            # fed items finishes those it accepted.
            drains, source, limit, buffers = (
                self.drains,
                self.is_root and not self.has_inputs,
                self.stream_limit,
                self.buffers,
            )
            for number, part in enumerate(self._parts(items)):
                if number and not await self._after_part():
                    return
                for item in part:
                    if out_port is None:
                        for _ in fn(item):
                            if source and drains._draining:
                                return
                        continue
                    results = filter(_IS_NOT_NONE, fn(item))
                    for first in results:
                        # The rest of a buffer's room in one C-level pass. extend() appends each item as it comes,
                        # so what the generator write()s on the same port in between keeps its place.
                        buffer = buffers[out_port]
                        buffer.append(first)
                        room = self._cap_by_bytes(limit, first)
                        buffer.extend(itertools.islice(results, max(room - len(buffer), 0)))
                        if len(buffer) >= room:
                            await self._route_streamed()
                            limit = self.stream_limit
                        if source and drains._draining:
                            return  # a draining source stops producing (at most a buffer's room later)
        elif self.is_root and out_port is not None:
            for item in items:
                await self._pump(fn(item), out_port)
        else:
            for item in items:
                async for result in fn(item):
                    if result is not None and out_port is not None:
                        await self._append_streaming(out_port, result)

    async def _pump(self, source: AsyncIterator[Any], port: str) -> None:
        """Append what a root's async generator yields (an actor reads it ahead instead)."""
        async for result in source:
            if result is not None:
                await self._append_streaming(port, result)

    async def _call_process(self, port: str | None, items: list[Any]) -> None:
        process, kind = self.pe.process, self.process_kind
        if kind == "sync":
            collect = self._collect

            def call_part(part: list[Any]) -> None:
                for item in part:
                    output = process(item if port is None else {port: item})
                    if output is not None:
                        collect(output)

            await self._in_parts(items, call_part)
            return
        source = self.is_root and not self.has_inputs  # see _call_fn
        for number, part in enumerate(self._parts(items)):
            if number and not await self._after_part():
                return
            for item in part:
                inputs = item if port is None else {port: item}
                if kind == "async":
                    self._collect(await process(inputs))
                elif kind == "gen":
                    for output in process(inputs):
                        await self._collect_streaming(output)
                        if source and self.drains._draining:
                            return  # a draining source stops producing
                else:
                    async for output in process(inputs):
                        await self._collect_streaming(output)
                        if source and self.drains._draining:
                            return

    def _collect(self, output: Any) -> None:
        if output is None:
            return
        if not isinstance(output, Mapping):
            raise GraphError(
                f"process() of PE {self.ref.pe} must return None or a dict {{port: item}}, not {type(output).__name__}"
            )
        buffers = self.buffers
        for port, item in output.items():
            try:
                buffers[port].append(item)
            except KeyError:
                raise GraphError(
                    f"PE {self.ref.pe} wrote to undeclared output port {port!r} (declared: {sorted(buffers) or 'none'})"
                ) from None

    async def _collect_streaming(self, output: Any) -> None:
        self._collect(output)
        if any(len(items) >= self.stream_limit for items in self.buffers.values()):
            await self._route_streamed()

    async def _append_streaming(self, port: str, item: Any) -> None:
        buffer = self.buffers[port]
        buffer.append(item)
        if len(buffer) >= self.stream_limit:
            await self._route_streamed()

    async def _in_parts(self, items: list[Any], call_part: Callable[[list[Any]], None]) -> None:
        """``call_part(items)``, making the plain calls of one batch, in parts of at most
        :meth:`_calls_per_part` calls with :meth:`_after_part` between them, each split further where its
        outputs could outgrow ``batch_bytes`` (:meth:`_in_parts_by_bytes`)."""
        for number, part in enumerate(self._parts(items)):
            if number and not await self._after_part():
                return
            await self._in_parts_by_bytes(part, call_part)

    def _parts(self, items: list[Any]) -> list[list[Any]]:
        """The items of one batch in parts of at most :meth:`_calls_per_part` calls (``[items]`` when one part
        holds them): whoever calls the PE on them, plainly or a generator at a time (or the provenance recorder,
        item by item), awaits :meth:`_after_part` between two parts, and stops if it says so."""
        most = self._calls_per_part()
        if most is None or most >= len(items):
            return [items]
        return [items[start : start + most] for start in range(0, len(items), most)]

    def _calls_per_part(self) -> int | None:
        """The most plain calls of one batch made in a row (``None``: all of them)."""
        return None

    async def _after_part(self) -> bool:
        """Between two parts of a batch's calls (see :meth:`_calls_per_part`): whether to make the rest."""
        return True

    async def _in_parts_by_bytes(self, items: list[Any], call_part: Callable[[list[Any]], None]) -> None:
        """``call_part(items)``, making plain calls that buffer their outputs, in parts where the outputs
        could outgrow ``batch_bytes``: the buffers are handed on between parts, as a generator's are.

        In one part when the calls of the last batch wrote little; else the first call alone (to size
        what a call writes), then parts of as many calls as the rest of ``batch_bytes`` holds. Decided
        by the items' sizes only, never by timing, so a run's batches are the same on every run.
        """
        per_call, total = self.bytes_per_call, len(items)
        if per_call is not None and per_call * total <= self.batch_bytes:
            call_part(items)
            self.bytes_per_call = self._buffered_bytes() / total if total else per_call
            return
        start = since_hand_over = 0
        step = 1
        while start < total:
            part = items[start : start + step]
            call_part(part)
            start += len(part)
            since_hand_over += len(part)
            held = self._buffered_bytes()
            if not held:  # nothing written yet: look further ahead
                step *= 16
                continue
            per_call = self.bytes_per_call = held / since_hand_over
            if held >= self.batch_bytes and start < total:
                await self._route_streamed()
                held = since_hand_over = 0
            step = max(1, int((self.batch_bytes - held) / per_call))
        if self.bytes_per_call is None:
            self.bytes_per_call = 0.0  # wrote nothing (a sink): the next batches in one part

    def _buffered_bytes(self) -> int:
        """About how many bytes the output buffers hold (each port's items sized like its last)."""
        return sum(map(approximate_batch_size, self.buffers.values()))

    def _cap_by_bytes(self, cap: int, sample: Any) -> int:
        """``cap``, or as many items like ``sample`` as ``batch_bytes`` holds if that is fewer (at least 1)."""
        size = approximate_size(sample)[0]
        return max(1, self.batch_bytes // size) if size * cap > self.batch_bytes else cap

    # -- busy time -------------------------------------------------------------
    def _busy_begin(self) -> None:
        """Start timing the busy time of a call (a batch's calls, or a lifecycle stage)."""
        self.busy_since = time.perf_counter()
        self.blocked_then = self.stats.blocked_seconds

    def _busy_fold(self) -> None:
        """Add the time since the call began, or since the last fold, to the busy time, less what was blocked
        on credit meanwhile: a long call (a generator, a live source) shows its busy time as it goes."""
        now, blocked = time.perf_counter(), self.stats.blocked_seconds
        self.stats.busy_seconds += now - self.busy_since - (blocked - self.blocked_then)
        self.busy_since, self.blocked_then = now, blocked

    # -- hooks for hosts that route -------------------------------------------
    async def _route_streamed(self) -> None:
        """Hand on what a long call (a generator) has written so far."""
        await self._route_outputs()

    async def _route_outputs(self, detach: bool = False) -> None:
        """Hand on the buffered outputs; an invoker alone keeps them in :attr:`buffers` for its host."""


class _Actor(Invoker):
    """An invoker that the engine runs as a task: it takes batches from its inbox and routes what the PE writes."""

    def __init__(self, worker: Worker, ref: InstanceRef, pe: PE, inbox: Inbox, expected_eos: int) -> None:
        options = worker.plan.options
        is_root = worker.plan.placement[ref.pe].is_root
        super().__init__(
            ref,
            pe,
            is_root=is_root,
            batch_size=options.batch_size,
            batch_bytes=options.batch_bytes,
            worker_id=worker.worker_id,
        )
        self.worker = self.drains = worker
        self.inbox = inbox
        self.expected_eos = expected_eos
        self.batch_seconds = options.batch_seconds
        self.credits = options.credits
        self.pace: float | None = None  # seconds per item, busy or blocked on credit (see _paced)
        self.given_away = 0.0  # seconds of the batch under way that other tasks ran (see _give_way_if_held)
        self.calls_under_way = 1  # calls of the PE the batch under way makes (see _held_since)
        self.handling = False  # a batch's calls are under way (not a lifecycle stage's): see _route_written
        self.max_delay = worker.max_delay
        self.routes: dict[str, list[_Route]] = {port: [] for port in pe._output_ports}
        self.results: dict[str, _ResultPending] = {}
        self.outgoing: list[SenderChannel] = []
        self.dirty: list[_Pending | _ResultPending] = []
        # The last item routed on each port when it is mutable (unhashable), as a reference: see _note_written.
        self.last_written: dict[str, Callable[[], Any]] = {}
        self.last_flush = time.monotonic()
        self.links = list(worker.links.values())
        # Plain calls may run in a pool thread (where write() can wait for credit); others stay on the loop.
        self.can_thread = self.process_kind == "sync" and (self.fn is None or self.fn_kind == "sync")
        self.threaded = self.can_thread and bool(getattr(pe, "threaded", False))
        self.handing_over = False  # a threaded call's writes are being routed (_route_handed_over)
        self.folding: asyncio.TimerHandle | None = None  # folds a threaded call's busy time (_fold_threaded)
        # What a call buffers before it hands its writes over (and waits for credit): as many items as
        # one channel may have in flight.
        self.hand_over_limit = self.batch_size * options.credits
        self.writing_since = 0.0  # when the call under way started, or last handed its writes on
        if not worker.fixed_order:
            self.stream_limit = 1  # grows while items are cheap to make (see _next_hand_over)
        # The most outputs routed in one pass before the actor lets other tasks run: the most a batch
        # within the worker carries (see PlanOptions.batch_bounds).
        self.route_chunk = self.batch_size if worker.fixed_order else self.hand_over_limit
        self.recorder: ActorRecorder | None = None  # provenance, when on
        self.traced = False  # provenance at level item: the recorder hands each item to the PE
        self.counts_out: dict[str, int] | None = None  # provenance: items written, by port
        # The calls of a batch that a checkpoint may be taken within (Aligner.within_calls): their outputs so far
        # by port; and the outputs that the calls made again after a restore had delivered before it, which they
        # drop (the first ones on each port).
        self.call_outputs: dict[str, int] | None = None
        self.delivered: dict[str, int] = {}
        self.runner: _CallGreenlet | None = None  # runs the PE's calls, created on first use (see _drive)
        self.results_sink: ResultSink = worker.results
        self.aligner: Aligner | None = None  # set when the run takes checkpoints
        # While a restore calls preprocess again: what it writes was delivered before the checkpoint.
        self.dropping_outputs = False
        # A source with its own drain() (a SourcePE: a followed file reads to its end) is called even when the
        # run drains before its call started: what draining means is its to say.
        self.drains_itself = is_root and callable(getattr(pe, "drain", None))

    # -- wiring ------------------------------------------------------------
    def add_route(self, port: str, route: _Route) -> None:
        self.routes[port].append(route)

    # -- main loop ---------------------------------------------------------
    async def run(self) -> InstanceStats:
        pe, ref, task = self.pe, self.ref, _running_task()
        pe._runtime = Runtime(
            self.buffers,
            ref.index,
            logging.LoggerAdapter(pe_logger, {"pe": ref.pe, "instance": ref.index}),
            rank=self.worker.plan.rank_of(ref),
            limit=1,
            full=_switch_to_actor,
            recorder=self.recorder,
            stats=self.stats,
        )
        try:
            aligner = self.aligner
            if aligner is not None and aligner.restoring is not None:
                self.dropping_outputs = True
                try:
                    await self._lifecycle("preprocess", pe.preprocess)
                finally:
                    self.dropping_outputs = False
                if aligner.restore():  # it had finished: downstream gets only the end of stream
                    for channel in self.outgoing:
                        channel.close()
                    await aligner.finished()
                    return self.stats
            else:
                await self._stage("preprocess", pe.preprocess)
            inbox, remaining = self.inbox, self.expected_eos
            while remaining:
                if inbox.empty() and self.dirty:
                    # Let the tasks that are ready (a root's feed among them) run once first: only an inbox
                    # still empty then means the input has really paused.
                    await asyncio.sleep(0)
                    if inbox.empty():
                        await self._flush_all()
                message = await inbox.get()
                if aligner is not None and await aligner.intercept(message, remaining):
                    continue
                source, port, items = message
                if items is EOS:
                    remaining -= 1
                    if aligner is not None:
                        await aligner.check(remaining)
                    continue
                source.release()
                if port is None and self._drops_calls():
                    continue
                if self.links and any(link.pending for link in self.links):
                    # Let the links send first: a long batch would hold back what other workers wait for.
                    await asyncio.sleep(0)
                self.stats.batches_in += 1
                self.stats.items_in += len(items)
                self.stats.queued_items = inbox.queued_items
                try:
                    self._busy_begin()
                    started, self.given_away = self.busy_since, 0.0
                    try:
                        if self.traced:
                            assert self.recorder is not None
                            await self.recorder.handle(port, items)
                        else:
                            if self.recorder is not None:
                                self.recorder.count_in(port, len(items))
                            self.calls_under_way = len(items)
                            if aligner is not None and aligner.within(len(items)):
                                aligner.calls_begin()
                                await self._handle(port, items)
                                await self._route_outputs()  # a checkpoint within the next counts its own
                                aligner.calls_ended(len(items))
                            else:
                                await self._handle(port, items)
                    finally:
                        self.calls_under_way = 1
                        self._busy_fold()
                    await self._route_outputs()
                    self._paced(started + self.given_away, len(items))
                except BaseException as exc:
                    if not _failed(exc, task):
                        raise
                    self.stats.errors += 1
                    raise pe_error(ref, "feed" if port is None else port, exc) from exc
                if self.worker.held_too_long():
                    if self.worker.fixed_order:  # its max_delay: partly filled batches wait one turn at most
                        await self._flush_all()
                    await self.worker.give_way()
            self.delivered = {}  # outputs the restored checkpoint's calls had delivered: only those calls drop them
            await self._stage("postprocess", pe.postprocess)
            await self._flush_all()
            # End of stream only after success: on a failure the run is cancelled, and
            # downstream instances must not run postprocess on partial data.
            for channel in self.outgoing:
                channel.close()
            if aligner is not None:
                await aligner.finished()
        except PEError as exc:
            if (exc.pe, exc.instance) == (ref.pe, ref.index):
                await self._hand_on_results()
            raise
        finally:
            self._end_runner()
            self.stats.max_queued_items = self.inbox.max_queued_items
            self.stats.queued_items = self.inbox.queued_items
        if self.recorder is not None:
            self.stats.provenance = self.recorder.part()
        return self.stats

    async def _hand_on_results(self) -> None:
        """Send the results this instance wrote before it failed: those of the calls before the one that raised
        (and what that one wrote before raising), and those waiting for a batch to fill. The run's reader
        (``--results FILE``, ``async for`` over :func:`~aiod4p.start`) gets them before the run's error, as it
        would have had they filled a batch first. Not in a run that takes checkpoints, which commits its
        results with them (a failure discards what no checkpoint committed)."""
        if self.aligner is not None:
            return
        for port, pending in self.results.items():
            pending.items.extend(self.buffers[port])
            self.buffers[port] = []
            if pending.items:
                chunk, pending.items = pending.items, []
                await self.results_sink.emit(pending.pe, pending.port, chunk)

    def _drops_calls(self) -> bool:
        """Whether this instance drops the calls it was asked for and has not made yet: a source's (-i N; no
        item is in flight) once the run drains, unless the source says what draining means (:attr:`drains_itself`)."""
        return not self.has_inputs and self.worker._draining and not self.drains_itself

    def _stop_a_drained_sources_call(self) -> None:
        """At a ``write()`` of a batch's call: once the run drains, a source's call ends there, as a generator
        source's does at its next item (:class:`_SourceStopped`, raised into the call)."""
        if self.handling and self._drops_calls():
            raise _SourceStopped

    def _end_runner(self) -> None:
        """End the greenlet that ran the PE's calls. Parked between two calls, it would outlive the run, with
        its frame: the collector cannot look into a suspended greenlet's frames, so the cycle through them
        (the frame refers to the greenlet) is never found, and every run of a process kept its instances'."""
        runner, self.runner = self.runner, None
        if runner:  # started, and not dead
            runner.throw(greenlet.GreenletExit)

    async def _stage(self, stage: str, method: Any) -> None:
        """Run a lifecycle stage and route what it wrote."""
        if self.recorder is not None:
            self.recorder.begin_stage(stage)
        await self._lifecycle(stage, method)
        try:
            await self._route_outputs()
        except Exception as exc:
            self.stats.errors += 1
            raise pe_error(self.ref, stage, exc) from exc
        if self.recorder is not None:
            self.recorder.end_stage()

    def _paced(self, started: float, count: int) -> None:
        """Fold the time per item of the batch of ``count`` items begun at ``started`` into :attr:`pace`.

        From the call's start until its outputs are routed, less the turns it
        gave to other tasks meanwhile: busy, or blocked on credit. A cheap
        stage held back by a slow one after it takes items at the slow one's
        pace, and sending it more than that pace allows only queues them on a
        worker that cannot get through them.
        """
        if count:
            per_item = (time.perf_counter() - started) / count
            self.pace = per_item if self.pace is None else self.pace + PACE_WEIGHT * (per_item - self.pace)

    # -- calling the PE ------------------------------------------------------
    async def _handle(self, port: str | None, items: list[Any]) -> None:
        self.handling = True
        try:
            if self.threaded:
                await self._handle_in_thread(port, items)
            else:
                await self._drive(self._handle_here(port, items))
        except _SourceStopped:
            pass  # a source's call that wrote in a loop ended at a write() once the run drained
        finally:
            self.handling = False

    @types.coroutine
    def _drive(self, call: Coroutine[Any, Any, None]) -> Generator[Any, Any, None]:
        """Run ``call`` (the PE's calls for one batch) in a greenlet, so that write() can wait for credit.

        The greenlet steps the coroutine as a task would, and hands what it
        awaits to this actor's task unchanged (results and exceptions, a
        cancellation among them, go back the same way). When write() has
        buffered a channel's worth of items on a port, it switches back to
        the actor's task, which routes them (waiting for credit) and then
        resumes the call where it wrote: memory stays bounded however many
        items one call writes, plain or ``async def``. One greenlet per batch
        of calls, not per item: the actor's one greenlet serves them all.
        """
        runner = self.runner
        if runner is None:
            runner = self.runner = _CallGreenlet(_serve_calls)
        self.writing_since = resumed = time.perf_counter()
        request = runner.switch(call)
        while request is not _DONE:
            self._held_since(resumed)
            try:
                if request is _ROUTE:
                    yield from self._route_written().__await__()
                    value = None
                else:
                    value = yield request
            except BaseException as exc:  # into the call: where it wrote, or where it awaits
                resumed = time.perf_counter()
                request = runner.throw(exc)
            else:
                resumed = time.perf_counter()
                request = runner.switch(value)
        self._held_since(resumed)
        failure, runner.failure = runner.failure, None
        if failure is not None:
            raise failure

    def _held_since(self, resumed: float) -> None:
        """Log once per PE, where the worker runs in the caller's event loop, that the PE's calls resumed at
        ``resumed`` held it for :data:`HELD_LOOP_WARNING` seconds or more in one go.

        With ``fixed_order`` a batch's calls are one go by design (its turns count batches): only where the
        batch's calls took that long on average, so that one of them did, is the PE to blame.
        """
        held = time.perf_counter() - resumed
        if self.worker.fixed_order:
            held /= self.calls_under_way
        if held >= HELD_LOOP_WARNING and self.worker.shares_loop and self.ref.pe not in self.worker.held_loop:
            self.worker.held_loop.add(self.ref.pe)
            logger.warning(
                "PE %s held the event loop for %.1f s in one go: nothing else in this loop ran meanwhile (its"
                " other PEs, and the tasks of a program that embeds the run). A PE that blocks (on I/O, a sleep, a"
                " long computation) belongs in a thread: threaded = True, or aiod4p run --threaded %s"
                " (docs/engine.md); or make it async def. Logged once per PE.",
                self.ref.pe,
                held,
                self.ref.pe,
            )

    # -- threaded calls --------------------------------------------------------
    async def _handle_in_thread(self, port: str | None, items: list[Any]) -> None:
        """Run a batch of plain calls in the worker's pool; write() hands full batches over and waits for credit."""
        await self._in_thread(self._call_items, port, items)

    async def _call_stage(self, method: Callable[[], Any]) -> None:
        """A threaded PE's plain ``preprocess`` and ``postprocess`` run in the worker's pool too: instances
        that each load a model load them at the same time, while the event loop goes on."""
        if self.threaded and not inspect.iscoroutinefunction(method):
            result = await self._in_thread(method)
            # a plain wrapper of an async def (a decorator's), or a generator
            await self._drive(_end_stage(method, result))
        else:
            await super()._call_stage(method)

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the worker's pool, and what it returns; what it write()s is handed over as
        its batches fill, each waiting for credit."""
        loop = asyncio.get_running_loop()
        runtime = self.pe._runtime
        assert runtime is not None
        runtime.full = functools.partial(self._hand_over, loop)
        # One timer per call, not a wait with a timeout per call (asyncio.wait costs a future, a set and callbacks
        # per batch: a quarter more per batch of one item): it folds the busy time while the call runs.
        self.folding = loop.call_later(THREADED_BUSY_FOLD, self._fold_threaded, loop)
        try:
            # cancelled while waiting: the call stops unless it has started
            return await asyncio.wrap_future(self.worker.threads().submit(f"a call of PE {self.ref}", function, *args))
        finally:
            if self.folding is not None:
                self.folding.cancel()
            runtime.full = _switch_to_actor

    def _fold_threaded(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop, every :data:`THREADED_BUSY_FOLD` seconds while a threaded call runs: fold its busy time."""
        if not self.handing_over:  # a hand-over's wait for credit is counted as blocked when it ends
            self._busy_fold()
        self.folding = loop.call_later(THREADED_BUSY_FOLD, self._fold_threaded, loop)

    def _call_items(self, port: str | None, items: list[Any]) -> None:
        """In a pool thread: call the PE item by item, stopping early if the run aborts (or drops the calls of a
        source, :meth:`_drops_calls`)."""
        worker = self.worker
        for index in range(len(items)):
            if worker._aborting or self._drops_calls():
                return
            call = self._handle_here(port, items[index : index + 1])
            try:
                call.send(None)  # a plain call never awaits: it completes in one step
            except StopIteration:
                continue
            call.close()
            raise AssertionError(f"a plain call of PE {self.ref} awaited")

    def _hand_over(self, loop: asyncio.AbstractEventLoop, port: str) -> None:
        """In a pool thread: route what the call wrote so far, waiting until the workflow has room for it.

        The next hand-over comes after twice as many items, up to
        ``hand_over_limit``, but never more than ``batch_bytes`` holds of items
        like the last one written: heavy items go one or a few at a time, so
        the call's memory stays bounded however many it writes.
        """
        runtime = self.pe._runtime
        assert runtime is not None
        sample = self.buffers[port][-1]
        future = asyncio.run_coroutine_threadsafe(self._route_handed_over(), loop)
        handovers = self.worker._handovers
        handovers.add(future)
        if self.worker._aborting:  # aborted before the future was there to cancel (_abort_threads)
            future.cancel()
        try:
            future.result()
        finally:
            handovers.discard(future)
        runtime.limit = self._cap_by_bytes(min(2 * runtime.limit, self.hand_over_limit), sample)
        self._stop_a_drained_sources_call()

    async def _route_handed_over(self) -> None:
        """On the loop, for a call in a pool thread: route what it wrote so far."""
        self._busy_fold()
        self.handing_over = True
        try:
            await self._route_outputs(detach=True)
        finally:
            self.handing_over = False

    async def _pump(self, source: AsyncIterator[Any], port: str) -> None:
        # A live source (a root's async generator) is read ahead while the actor
        # waits for credit, so batches grow under load; whenever the source has
        # nothing ready, partly filled batches are flushed, so an item from a
        # slow source is not held back.
        aligner = self.aligner
        if aligner is not None:
            source = aligner.call_started(source)
        ahead = ReadAhead(
            source,
            self.batch_size,
            self.batch_bytes,
            lambda value: value,
            f"source {self.ref}",
            skip_none=True,
            drain=getattr(self.pe, "drain", None),
            sized=self.pe if isinstance(self.pe, SourcePE) else None,  # it tells the bytes its stream read
        )
        self.worker._add_stopper(ahead.drain)
        try:
            while True:
                if ahead.ready():
                    chunk = await ahead.take()
                else:  # waiting for the source's next items is idle time, not busy time
                    await self._flush_all()
                    self._busy_fold()
                    if aligner is not None:
                        await aligner.idle(ahead)
                    chunk = await ahead.take()
                    self._busy_begin()
                if chunk is None:
                    break
                self.buffers[port].extend(chunk)
                await self._route_streamed()
                if aligner is not None:
                    await aligner.pumped(len(chunk))
        finally:
            await ahead.aclose()
        if aligner is not None:
            aligner.call_ended()

    async def _route_streamed(self) -> None:
        """Route a batch that a long call (a generator) has written so far, and let other tasks run in time."""
        self.stream_limit = self._next_hand_over(self.stream_limit, self.batch_size)
        self._busy_fold()
        await self._route_outputs()
        await self._checkpoint_within_call()
        await self._give_way_if_held()
        self.writing_since = time.perf_counter()

    async def _route_written(self) -> None:
        """Route what a call has written so far (write() handed it on), and let other tasks run in time."""
        runtime = self.pe._runtime
        assert runtime is not None
        if not self.threaded:  # a threaded call hands over across threads: it keeps the full count
            runtime.limit = self._next_hand_over(runtime.limit, self.hand_over_limit)
        self._busy_fold()
        await self._route_outputs(detach=True)
        await self._checkpoint_within_call()
        self._stop_a_drained_sources_call()
        await self._give_way_if_held()
        self.writing_since = time.perf_counter()

    async def _checkpoint_within_call(self) -> None:
        """Take a due checkpoint here, within the calls of a batch that have routed what they wrote so far, if
        the PE takes them within its calls (:attr:`Aligner.within_calls`)."""
        aligner = self.aligner
        if aligner is not None and self.call_outputs is not None:
            await aligner.within_call()

    async def _give_way_if_held(self, on_timer: bool = False) -> None:
        """Within a long call: let other tasks run if the worker has held the loop long enough (their
        turns are neither this PE's busy time nor in its pace: :attr:`given_away`); ``on_timer``: see
        :meth:`Worker.give_way`."""
        if self.worker.held_too_long():
            self._busy_fold()
            given = time.perf_counter()
            await self.worker.give_way(on_timer)
            self.given_away += time.perf_counter() - given
            self._busy_begin()

    def _calls_per_part(self) -> int | None:
        """About :data:`YIELD_SECONDS` of calls at this instance's pace: a batch of heavy items (a batch
        within a worker may carry ``TURNS_TIME_FACTOR x batch_seconds`` of them) lets other tasks run
        between its calls, as between batches. One before the first measurement: a batch of one item,
        except a root's first batch of feed elements (``batch_size`` of them or more, see
        :meth:`Worker._feed_limit`), whose calls may be heavy too. None with ``fixed_order`` (its turns
        count batches)."""
        if self.worker.fixed_order:
            return None
        pace = self.pace
        return max(1, int(YIELD_SECONDS / pace)) if pace else 1

    async def _after_part(self) -> bool:
        """Hand on what the calls wrote so far (and take a due checkpoint, where the calls take them within), then
        let other tasks run if the worker has held the loop long enough; the rest of the batch is made unless
        this instance now drops it (:meth:`_drops_calls`).
        Always handed on: each part is sized by ``batch_bytes`` from empty buffers (:meth:`_in_parts_by_bytes`),
        and a stage on another worker may be waiting for it. A part is about :data:`YIELD_SECONDS` of calls, so
        this costs a batch ten routings at most."""
        self._busy_fold()
        await self._route_outputs()
        await self._checkpoint_within_call()
        await self._give_way_if_held(on_timer=True)  # the batch goes on at once: due timers first
        return not self._drops_calls()

    def _next_hand_over(self, handed: int, cap: int) -> int:
        """How many items a long call may write before it hands them on again, once it handed ``handed`` on.

        Fewer when the call took longer than ``batch_seconds`` to make them
        (since it last resumed: not the routing, nor other tasks' turns), so that
        heavy items (an article, a trace) reach the next stage one or a few at
        a time from the start instead of after ``cap`` of them; twice as many,
        up to ``cap``, when it took less than half of that. With
        ``fixed_order`` it is ``cap``: batches must not depend on timing.
        Never more than ``batch_bytes`` holds of items like those about to be
        handed on (the buffers' last ones).
        """
        for items in self.buffers.values():
            if items:
                cap = self._cap_by_bytes(cap, items[-1])
        if self.worker.fixed_order:
            return cap
        spent = time.perf_counter() - self.writing_since
        if spent > self.batch_seconds:
            return min(cap, max(1, int(handed * self.batch_seconds / spent)))
        if spent < self.batch_seconds / 2:
            return min(cap, handed * 2)
        return min(cap, handed)

    # -- routing -----------------------------------------------------------
    async def _route_outputs(self, detach: bool = False) -> None:
        """Route every buffered output; ``detach`` empties the buffers in place (a threaded call holds them)."""
        buffers = self.buffers
        if self.dropping_outputs:
            for items in buffers.values():
                items.clear()
            return
        full: list[_Pending | _ResultPending] = []
        batch_size = self.route_chunk
        dirty = self.dirty
        counts_out = self.counts_out
        for port, items in buffers.items():
            if not items:
                continue
            self._note_written(port, items)
            if detach:
                items, held = items.copy(), items
                held.clear()
            else:
                buffers[port] = []
            if self.call_outputs is not None or self.delivered:
                items = self._not_delivered(port, items)
                if not items:
                    continue
            self.stats.items_out += len(items)
            if counts_out is not None:
                counts_out[port] = counts_out.get(port, 0) + len(items)
            routes = self.routes[port]
            if not routes:
                pending_result = self.results[port]
                if not pending_result.dirty:
                    pending_result.dirty = True
                    dirty.append(pending_result)
                pending_result.items.extend(items)
                pending_result.limit = self._cap_by_bytes(pending_result.cap, items[-1])
                if len(pending_result.items) >= pending_result.limit:
                    full.append(pending_result)
                continue
            owned = len(routes) == 1
            if len(items) <= batch_size:
                for route in routes:
                    self._route(route, items, owned, full)
                continue
            # One call wrote many items: route them a batch at a time, sharing the loop in between.
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                for route in routes:
                    self._route(route, chunk, owned, full)
                if full:
                    await self._flush_many(full, whole=True)
                full.clear()
                if self.worker.held_too_long():
                    await self.worker.give_way()
        if full:
            await self._flush_many(full, whole=True)
        if self.dirty and not self.worker.fixed_order and time.monotonic() - self.last_flush >= self.max_delay:
            await self._flush_all(wait=False)

    def _not_delivered(self, port: str, items: list[Any]) -> list[Any]:
        """Count ``items``, written on ``port`` by calls that a checkpoint may be taken within; of those, drop
        what was delivered before the restored checkpoint, when they are made again (:attr:`delivered`), whether
        or not this run takes checkpoints within them (a restore with the root threaded, or traced for item-level
        provenance, makes the calls again all the same)."""
        if self.call_outputs is not None:
            self.call_outputs[port] = self.call_outputs.get(port, 0) + len(items)
        delivered = self.delivered.get(port, 0)
        if not delivered:
            return items
        self.delivered[port] = max(0, delivered - len(items))
        return items[delivered:]

    def _note_written(self, port: str, items: list[Any]) -> None:
        """Log, once per PE on this worker (process), that the PE wrote one mutable object twice on ``port``:
        again in ``items``, or as the first of ``items`` after the last of what was routed before.

        An item is not copied when written (that would cost every item several times its routing): a PE that
        changes an object after writing it (a sliding window written, then slid) changes what its consumers
        get, on every mapping. Mutable means unhashable (a list, dict, set, bytearray, numpy array); the last
        one routed is remembered per port until the next by a weak reference where it takes one (a numpy array:
        a heavy item is not kept alive for this), else held (a list, a dict).
        """
        first, last = items[0], items[-1]
        previous = self.last_written.get(port)
        rewritten = (previous is not None and first is previous()) or (first is last and len(items) > 1)
        if rewritten and type(first).__hash__ is None and self.ref.pe not in self.worker.rewritten:
            self.worker.rewritten.add(self.ref.pe)
            logger.warning(
                "PE %s wrote the same %s object twice on output %r: an item is not copied when it is written,"
                " so if the PE changes the object after writing it, its consumers get the object as changed,"
                " on every mapping (dispel4py's mpi mapping copied it at each write). Write a copy instead"
                " (list(x), dict(x), x.copy()). Logged once per PE in each process.",
                self.ref.pe,
                type(first).__name__,
                port,
            )
        if type(last).__hash__ is None:
            try:
                self.last_written[port] = weakref.ref(last)
            except TypeError:  # a list, a dict
                self.last_written[port] = functools.partial(_same, last)
        else:
            self.last_written.pop(port, None)

    def _route(self, route: _Route, items: list[Any], owned: bool, full: list[_Pending | _ResultPending]) -> None:
        if route.passes_through:
            self._add(route.pendings[0], items, owned, full)
            return
        if not self.worker.fixed_order:
            if route.local is not None and self._cheaper_here(route.local.pendings[0], items[0]):
                self._add(route.local.freest(), items, owned, full)
                return
            if route.deals:
                # Dealt whole to the instance with the most room, not item by item in turn: an instance that
                # gets through its items faster (on a worker of its own, beside no source) gets more of them.
                # Only items that fit in the next batch of every candidate compared: more at once than a heavy or
                # still unmeasured destination's batch holds (one or a few items) are dealt in turn, so that every
                # instance gets some of them; items routed one at a time (a source's heavy items, as it makes
                # them) each go where there is most room.
                compared = route.candidates.compared()
                if len(items) <= min(pending.limit for pending in compared):
                    self._add(max(compared, key=_room), items, owned, full)
                    return
        for pending, part in zip(route.pendings, route.router.split(items), strict=True):
            if part:
                self._add(pending, part, False, full)

    def _add(self, pending: _Pending, items: list[Any], owned: bool, full: list[_Pending | _ResultPending]) -> None:
        """Add ``items`` to what waits for ``pending``'s channel (taking the list itself when ``owned``).

        One item larger than ``batch_bytes`` fills the batch it joins, whatever its limit (set by the items of
        the last batch): a source alternating tiny and heavy items would otherwise pile its heavy items up behind
        a limit set by a tiny one, never waiting for credit. (Items routed several at a time are not measured
        here: a source's items come one at a time where they are heavy, see :meth:`_cap_by_bytes`.)
        """
        if not pending.dirty:
            pending.dirty = True
            self.dirty.append(pending)
        if not pending.items:
            pending.items = items if owned else list(items)
        else:
            pending.items.extend(items)
        if len(pending.items) >= pending.limit:
            full.append(pending)
        elif len(items) == 1 and type(item := items[0]) not in SCALARS and approximate_size(item)[0] > self.batch_bytes:
            pending.limit = len(pending.items)
            full.append(pending)

    def _cheaper_here(self, pending: _Pending, sample: Any) -> bool:
        """Whether an item like ``sample`` costs this worker more to send elsewhere than to process here.

        Measured against the pace of ``pending``'s destination where it runs on
        this worker (else of this worker's instances of its PE): large items of
        little work (a megabyte that takes 0.1 ms) stay beside their sender.
        """
        seconds = self.worker.seconds_per_item(pending.dest.pe, pending.dest)
        if seconds is None or seconds <= 0.0:
            return False
        size, in_bytes = approximate_size(sample)
        return seconds < (size - in_bytes) * SEND_SECONDS_PER_BYTE + in_bytes * SEND_SECONDS_PER_BYTES_BYTE

    async def _flush_many(
        self, pendings: list[_Pending | _ResultPending], whole: bool = False, wait: bool = True
    ) -> None:
        """Send everything ``pendings`` hold, a batch to each in turn; with ``whole``, full batches only.

        A destination that has credit is never kept waiting behind one that
        has none: the actor waits only when no channel can take a batch (for a
        batch any instance may take: none of the instances compared, see
        :class:`_Candidates`), and without ``wait`` it does not wait at all
        (what it could not send stays in its pending). With ``whole``, what is
        left of a pending (fewer items than its limit) stays there, still listed
        as dirty, for the next batch to fill: a batch that a router split among
        several destinations would otherwise leave a small remainder to go out
        alone after every full batch.
        """
        if whole:
            waiting = [pending for pending in pendings if len(pending.items) >= pending.limit]
        else:
            waiting = [pending for pending in pendings if pending.items]
        while waiting:
            stalled = True
            for pending in waiting:
                if isinstance(pending, _ResultPending) or pending.channel.credits >= pending.weight:
                    await self._send_batch(pending)
                    stalled = False
                elif pending.siblings is not None and pending.items:
                    # Any instance will do: give the batch to the least loaded one.
                    freest = pending.siblings.freest()
                    if freest.channel.credits >= pending.weight and not (
                        type(freest.channel) is not LocalChannel and self._cheaper_here(pending, pending.items[0])
                    ):
                        await self._send_batch(pending, freest)
                        stalled = False
            if stalled:
                if not wait:
                    return
                await self._send_batch(waiting[0])
            if whole:
                waiting = [pending for pending in waiting if len(pending.items) >= pending.limit]
            else:
                waiting = [pending for pending in waiting if pending.items]

    async def _send_batch(self, pending: _Pending | _ResultPending, via: _Pending | None = None) -> None:
        """Send the first batch of ``pending``'s items, as many as its limit allows (on ``via``'s channel)."""
        items = pending.items
        if isinstance(pending, _ResultPending):
            await self.results_sink.emit(pending.pe, pending.port, _take_first(pending, pending.limit))
            return
        # Sized for the channel it travels on (``via``'s may be within the worker, with a smaller cap).
        target = via or pending
        limit, size = self._batch_limit(target, items[0])
        pending.limit = limit if via is None else min(pending.limit, limit)
        channel = target.channel
        if type(channel) is LocalChannel and channel.credits > 0:
            limit = min(limit, channel.credits * channel.unit)  # what it takes without waiting
        chunk = _take_first(pending, limit)
        if len(chunk) > 1:
            size = 0  # within batch_bytes: it takes credits by its count only
        target.weight = weight = channel.takes(len(chunk), size)
        if channel.credits >= weight:
            await channel.send(pending.port, chunk, size)
        else:
            started = time.perf_counter()
            await channel.send(pending.port, chunk, size)
            self.stats.blocked_seconds += time.perf_counter() - started

    def _batch_limit(self, pending: _Pending, sample: Any) -> tuple[int, int]:
        """How many items the next batch on ``pending``'s channel may carry, and about how many bytes
        ``sample`` takes.

        At most the channel's cap (``credits x batch_size`` within a worker,
        taking a credit per ``batch_size`` items, and ``remote_batch_size``
        between workers; ``batch_size`` with ``fixed_order``, which measures
        nothing); at most what the destination gets through in about
        ``batch_seconds`` (``remote_batch_seconds`` between workers), as
        measured on that instance where it runs on this worker, else on this
        worker's instances of its PE, so a slow stage gets items one or a few
        at a time and every instance stays busy; at most ``batch_bytes`` of
        items like ``sample``.
        Until the first measurement a batch carries one item, and after twice
        ``credits`` such batches (the local instances may never get an item)
        twice as many as the last; where this worker runs no instance of the
        destination there is no bound by time, nor with ``fixed_order``, whose
        batches must not depend on timing (the bound by bytes is a count too).
        """
        seconds: float | None
        if self.worker.fixed_order:
            limit, seconds = min(pending.cap, self.batch_size), 0.0
        else:
            limit, seconds = pending.cap, self.worker.seconds_per_item(pending.dest.pe, pending.dest)
        if seconds is None:
            pending.blind += 1
            limit = min(limit, pending.limit * 2 if pending.blind > 2 * self.credits else 1)
        elif seconds * limit > pending.seconds:
            limit = max(1, int(pending.seconds / seconds))
        size, _ = approximate_size(sample)
        if size * limit > self.batch_bytes:
            limit = max(1, self.batch_bytes // size)
        return limit, size

    async def _flush_all(self, wait: bool = True) -> None:
        """Send every partly filled batch; without ``wait``, only those whose channel has credit.

        A flush by age does not wait: a stage whose results are few and small
        (a score per article) would otherwise stop between its heavy items
        until a busy receiver gives its credit back, although nothing it holds
        is full. What stays behind goes with the next flush, or as soon as its
        batch is full.
        """
        dirty, self.dirty = self.dirty, []
        for pending in dirty:
            pending.dirty = False
        await self._flush_many(dirty, wait=wait)
        for pending in dirty:
            if pending.items and not pending.dirty:
                pending.dirty = True
                self.dirty.append(pending)
        self.last_flush = time.monotonic()


class _SourceStopped(BaseException):
    """Thrown into a source's plain call at a ``write()`` once the run drains: the call ends there, as a
    generator source's does at its next item (a ``BaseException``, as ``GeneratorExit``: the PE's ``except
    Exception`` does not catch it, its ``finally`` runs)."""


class _CallGreenlet(greenlet.greenlet):
    """The greenlet that runs an actor's batches of PE calls (see :meth:`_Actor._drive`)."""

    failure: BaseException | None = None  # what the last call raised


def _serve_calls(call: Coroutine[Any, Any, None]) -> None:
    """In an actor's :class:`_CallGreenlet`: run each call it is handed, then hand back :data:`_DONE`."""
    runner = greenlet.getcurrent()
    assert isinstance(runner, _CallGreenlet) and runner.parent is not None
    actor = runner.parent
    while True:
        try:
            _step(call, actor)
        except greenlet.GreenletExit:
            raise
        except BaseException as exc:
            runner.failure = exc
        call = actor.switch(_DONE)


def _step(call: Coroutine[Any, Any, None], actor: greenlet.greenlet) -> None:
    """Step ``call`` as a task would, handing what it awaits to the ``actor`` greenlet (its task)."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            awaited = call.send(value) if error is None else call.throw(error)
        except StopIteration:
            return
        try:
            value, error = actor.switch(awaited), None
        except greenlet.GreenletExit:
            call.close()
            raise
        except BaseException as exc:  # the actor's task was cancelled, or what the call awaits failed
            value, error = None, exc


def _switch_to_actor(port: str) -> None:
    """write() has buffered a channel's worth of items: let the actor route them, waiting for credit."""
    current = greenlet.getcurrent()
    if type(current) is _CallGreenlet and current.parent is not None:  # else a host routes by itself: they stay
        current.parent.switch(_ROUTE)


def _call_stage(method: Callable[[], Any]) -> Coroutine[Any, Any, None]:
    async def stage() -> None:
        await _end_stage(method, method())

    return stage()


async def _end_stage(method: Callable[[], Any], result: Any) -> None:
    """Await what lifecycle ``method`` returned, ``result``, if awaitable.

    Raises:
        TypeError: ``method`` is a generator (plain or async): its body would never run, and what it
            yields would be lost without a word.
    """
    if inspect.isawaitable(result):
        await result
    elif inspect.isgenerator(result) or inspect.isasyncgen(result):
        raise TypeError(
            f"{method.__name__}() is a generator: its body never runs, what it yields would be lost;"
            " write its items with self.write(port, item) instead of yielding them"
        )


def _take_first(pending: _Pending | _ResultPending, count: int) -> list[Any]:
    """Take the first ``count`` of ``pending``'s items off it (the list itself when that is all of them)."""
    items = pending.items
    if len(items) <= count:
        pending.items = []
        return items
    chunk = items[:count]
    del items[:count]
    return chunk


def _room(pending: _Pending) -> int:
    """The most items ``pending``'s channel takes without waiting, less those already waiting for it.

    A credit of a channel to another worker stands for a whole batch between
    workers (up to 16x ``batch_size`` items, ``cap``): while it has one, an
    instance there is preferred to one beside the sender, whose worker also
    runs the sender. (Its batches of heavy items carry one or a few items:
    that preference then lasts a few items.)
    """
    channel = pending.channel
    per_credit = channel.unit if type(channel) is LocalChannel else pending.cap
    return channel.credits * per_credit - len(pending.items)


def _pull(iterator: Iterator[Any], limit: int, max_bytes: int, pe: PE, pe_id: str) -> tuple[list[Any], int]:
    """The next elements of ``iterator``, as root ``pe``'s inputs (:func:`_input_dict`), and their bytes: at most
    ``limit``, and none after the one that brings their :func:`approximate_size` (numbers: none) to ``max_bytes``
    (so at least one, unless the iterator is exhausted)."""
    chunk: list[Any] = []
    append, held = chunk.append, 0
    for element in itertools.islice(iterator, limit):
        append(_input_dict(pe, pe_id, element))
        if type(element) not in SCALARS:
            held += approximate_size(element)[0]
            if held >= max_bytes:
                break
    return chunk, held


def _ignoring_argument(fn: Callable[[], Any]) -> Callable[[Any], Any]:
    if inspect.iscoroutinefunction(fn):

        async def call_async(_: Any) -> Any:
            return await fn()

        return call_async
    return lambda _: fn()


def _same(item: Any) -> Any:
    return item


def calls_take_turns(pe: PE) -> bool:
    """Whether the calls of ``pe``'s instances run one at a time on their worker's event loop: plain calls
    (or plain generators), not ``async def`` (whose awaits let instances overlap) and not threaded."""
    item_function = pe._item_function()
    functions = [pe.process, item_function[0]] if item_function else [pe.process]
    return not getattr(pe, "threaded", False) and all(_call_kind(fn) in ("sync", "gen") for fn in functions)


def _call_kind(fn: Any) -> str:
    target = fn
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    if inspect.isasyncgenfunction(target):
        return "agen"
    if inspect.iscoroutinefunction(target):
        return "async"
    if inspect.isgeneratorfunction(target):
        return "gen"
    return "sync"


class _LoopTurn:
    """How long (and, for ``fixed_order``, for how many batches) the workers of one event loop have held it since
    it last ran its other tasks."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.batches = 0
        self._pending = False

    def restart_soon(self) -> None:
        """Restart the turn once the loop has run the tasks ready now (a callback queued behind them)."""
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._restart)

    def _restart(self) -> None:
        self._pending = False
        self.started = time.monotonic()
        self.batches = 0


_LOOP_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopTurn] = weakref.WeakKeyDictionary()


class Worker:
    """Runs the instances ``plan`` places on worker ``worker_id``.

    Args:
        plan: the execution plan (the same on every worker).
        worker_id: this worker's index.
        feeds: the input feed of each root PE placed here, by PE id. An ``int``
            calls the PE that many times with no input (shared out among the
            PE's instances); an (async) iterable gives input dicts (or items,
            for a PE with one input), all to the PE's instance 0.
        results: where results are delivered.
        peers: a comm to every other worker that shares a channel with this one.
        max_delay: the longest an output waits in a partly filled batch while
            its actor is busy, in seconds.
        fixed_order: nothing the engine does depends on timing, so that
            instances take turns in the same order on every run (the simple
            mapping): other tasks run every :data:`YIELD_BATCHES` batches
            (counting every batch in and every batch a long call writes)
            rather than every :data:`YIELD_SECONDS`; batch sizes are counts
            (never the measured time per item); partly filled batches are
            flushed when the worker gives way, not after ``max_delay``.
        shares_loop: the worker runs in the caller's event loop (the simple and
            async mappings): a PE whose call holds it for
            :data:`HELD_LOOP_WARNING` seconds or more is logged, once.

    The engine shares its event loop: however busy, it lets the loop's other
    tasks run at least every :data:`YIELD_SECONDS` (checked once per batch,
    so a single PE call longer than that still holds the loop: run such a PE
    in a thread, see :attr:`PE.threaded`).

    Every instance is a deep copy of the plan's PE object, taken when the
    worker is built (as the run starts): the PE objects the user built are
    never mutated by a run, so a graph can run any number of times, in a row
    or concurrently, and each run starts from the PEs as they were built.
    """

    def __init__(
        self,
        plan: ExecutionPlan,
        worker_id: int = 0,
        *,
        feeds: Mapping[str, Feed],
        results: ResultSink,
        peers: Mapping[int, Comm] | None = None,
        max_delay: float = DEFAULT_MAX_DELAY,
        fixed_order: bool = False,
        shares_loop: bool = False,
    ) -> None:
        self.plan = plan
        self.fixed_order = fixed_order
        self.shares_loop = shares_loop
        self.held_loop: set[str] = set()  # the PEs logged for holding the loop (see _Actor._held_since)
        self.rewritten: set[str] = set()  # the PEs logged for writing an object twice (see _Actor._note_written)
        self._threads: DaemonThreadPool | None = None
        self._handovers: set[concurrent.futures.Future[None]] = set()
        self._aborting = False
        self._turn = _LoopTurn()  # its own until it runs: then the turn of its loop, unless fixed_order (run)
        self.worker_id = worker_id
        level = plan.options.provenance
        self.recorder = WorkerRecorder(level, worker_id) if level is not None else None
        self.results = results if self.recorder is None else self.recorder.sink(results)
        self.max_delay = max_delay
        self.links = {peer: PeerLink(comm, peer) for peer, comm in (peers or {}).items()}
        self.feeds = feeds
        self.actors: dict[InstanceRef, _Actor] = {}
        self._feed_channels: dict[InstanceRef, LocalChannel] = {}
        self._draining = False
        self._stoppers: list[Callable[[], Any]] = []
        self.checkpoints: WorkerCheckpoints | None = None  # attached by a checkpointed run
        self._build()
        self._actors_of: dict[str, list[_Actor]] = {}
        for ref, actor in self.actors.items():
            self._actors_of.setdefault(ref.pe, []).append(actor)

    # -- construction ------------------------------------------------------
    def _build(self) -> None:
        plan, me = self.plan, self.worker_id
        credits = plan.options.credits
        local = plan.instances(me)
        inboxes = {ref: Inbox() for ref in local}
        senders: dict[tuple[InstanceRef, InstanceRef], SenderChannel] = {}
        taking_turns = {
            pe_id
            for pe_id, placed in plan.placement.items()
            if set(placed.workers) == {me} and calls_take_turns(plan.pes[pe_id])
        }
        bounds = {
            (spec.source, spec.dest): plan.options.batch_bounds(spec, spec.dest.pe in taking_turns)
            for spec in plan.channels
        }
        for spec in plan.channels:
            if spec.dest_worker == me and spec.source_worker == me:
                senders[(spec.source, spec.dest)] = LocalChannel(
                    inboxes[spec.dest], credits, plan.options.batch_size, plan.options.batch_bytes
                )
            elif spec.source_worker == me:
                link = self._link(spec.dest_worker)
                senders[(spec.source, spec.dest)] = RemoteChannel(
                    link, spec.channel_id, credits, plan.options.batch_bytes
                )
            elif spec.dest_worker == me:
                self._link(spec.source_worker).add_receiver(spec.channel_id, inboxes[spec.dest])

        # Instance 0 of every PE is copied in one go, so references between PEs (a PE holding another)
        # lead to the running copies, as they led to the user's objects; further instances are copied alone.
        first_copies: dict[int, Any] = {}
        for ref in local:
            pe = self._instance_pe(ref, first_copies if ref.index == 0 else {})
            is_root = plan.placement[ref.pe].is_root
            actor = _Actor(self, ref, pe, inboxes[ref], plan.expected_eos(ref))
            actor.stats.inflight_bound = plan.inflight_bound(ref)
            if is_root:
                self._feed_channels[ref] = LocalChannel(
                    inboxes[ref], credits, plan.options.batch_size, plan.options.batch_bytes
                )
            for port in plan.result_ports.get(ref.pe, []):
                actor.results[port] = _ResultPending(ref.pe, port, plan.options.batch_size)
            for route in plan.routes[ref.pe]:
                targets = route.targets[ref.index]
                pendings = [
                    _Pending(senders[(ref, dest)], dest, route.dest_port, bounds[(ref, dest)])
                    for dest in (InstanceRef(route.dest, t) for t in targets)
                ]
                router = route.grouping.router(
                    len(pendings), ref.index, f"PE {ref.pe}", f"{route.dest}.{route.dest_port}"
                )
                actor.add_route(route.source_port, _Route(router, pendings))
            actor.outgoing = [senders[(ref, spec.dest)] for spec in plan.channels_from(ref)]
            if self.recorder is not None:
                actor.recorder = self.recorder.attach(actor)
            self.actors[ref] = actor

    def _link(self, peer: int) -> PeerLink:
        try:
            return self.links[peer]
        except KeyError:
            raise Aiod4pError(f"worker {self.worker_id} has no comm to worker {peer}") from None

    def _instance_pe(self, ref: InstanceRef, memo: dict[int, Any]) -> PE:
        """A fresh copy of ``ref``'s PE as the user built it: runs never share or mutate PE objects.

        Raises:
            GraphError: the PE cannot be deep-copied.
        """
        try:
            return copy.deepcopy(self.plan.pes[ref.pe], memo)
        except Exception as exc:
            raise GraphError(
                f"PE {ref.pe} cannot be copied for instance {ref.index}: {type(exc).__name__}: {exc}"
                " (every run works on copies of the PEs; create resources such as files, sockets and locks"
                " in preprocess())"
            ) from exc

    def threads(self) -> DaemonThreadPool:
        """The pool that threaded PE calls run in, made on first use.

        One thread per instance at most (threads start as needed): a threaded
        call waiting for credit holds its thread, and the instance it waits
        for must still find one. A call that never returns does not keep the
        process from exiting once the run is over (see :meth:`run`).
        """
        if self._threads is None:
            self._threads = DaemonThreadPool(max(1, len(self.actors)), f"aiod4p-worker{self.worker_id}")
        return self._threads

    # -- sharing the event loop ---------------------------------------------------
    def held_too_long(self) -> bool:
        """Whether the event loop has been held long enough to let other tasks run (asked once per batch).

        Timed per event loop, not per worker: runs side by side in one loop (a service's requests) share
        one slice, so the host's tasks wait :data:`YIELD_SECONDS` however many runs are busy, not one slice
        per run. With ``fixed_order`` the turn counts batches, and is this worker's own, so that its order
        never depends on what else runs in the loop.
        """
        turn = self._turn
        if self.fixed_order:
            turn.batches += 1
            return turn.batches >= YIELD_BATCHES
        return time.monotonic() - turn.started >= YIELD_SECONDS

    async def give_way(self, on_timer: bool = False) -> None:
        """Let the event loop run every other ready task and due timer, then go on.

        The turn restarts when the loop comes back to the workers (a callback
        queued behind the tasks now ready), not when each task resumes: other
        instances ready in this loop turn, of this run or of another one in
        the same loop, then give way after one batch each, so a turn of the
        loop stays short however many instances are busy. On a timer after a
        long turn, or with ``on_timer`` (the caller goes on computing at once:
        between the parts of a batch's calls), so that due timers run first.
        """
        turn = self._turn
        held = time.monotonic() - turn.started
        turn.restart_soon()
        if self.fixed_order or (held < LONG_TURN and not on_timer):
            await asyncio.sleep(0)
        else:
            # A batch held the loop long: timers fell due meanwhile. The loop runs due timers in the order
            # of their deadlines, so giving way on a timer lets their tasks run before this one resumes;
            # after sleep(0) this task would go first, and they would wait two or three more batches.
            await asyncio.sleep(1e-9)

    # -- running -----------------------------------------------------------
    def drain(self) -> None:
        """Stop the feeds and sources: every item already accepted still flows to the sinks.

        A feed (async iterable) or a root PE whose async generator is running
        that has a callable ``drain()`` is asked to finish by itself (it ends
        its iteration soon, yielding what it already accepted); other async
        feeds and sources are cancelled, and generator sources stop at their
        next item.
        """
        self._draining = True
        for stop in self._stoppers:
            stop()

    def _add_stopper(self, stop: Callable[[], object]) -> None:
        self._stoppers.append(stop)
        if self._draining:
            stop()

    def seconds_per_item(self, pe: str, instance: InstanceRef | None = None) -> float | None:
        """The measured pace (:meth:`_Actor._paced`) of ``instance`` if it runs on this worker, else the mean
        pace of PE ``pe``'s instances on this worker.

        Instances of one PE can differ (one waits on a slow replica of a
        service): each local one gets batches sized by its own pace.
        ``0.0`` where this worker runs none (nothing to measure: no bound by
        time); ``None`` while they have finished no batch yet.
        """
        if instance is not None and (actor := self.actors.get(instance)) is not None:
            return actor.pace
        actors = self._actors_of.get(pe)
        if not actors:
            return 0.0
        paces = [actor.pace for actor in actors if actor.pace is not None]
        return sum(paces) / len(paces) if paces else None

    @property
    def stats(self) -> list[InstanceStats]:
        return [actor.stats for actor in self.actors.values()]

    @property
    def instances(self) -> dict[InstanceRef, PE]:
        """The PE object each local instance runs (this run's copies)."""
        return {ref: actor.pe for ref, actor in self.actors.items()}

    async def run(self) -> list[InstanceStats]:
        """Run every local instance to completion and return their statistics.

        A run that fails or is cancelled does not wait for the threaded calls
        under way (each stops after its current item): a call that has not
        returned when the run ends is logged, naming its PE and thread.

        Raises:
            PEError: a PE raised; every task of this worker has been cancelled.
            TransportError: a comm to another worker failed.
        """
        if not self.fixed_order:  # the turn of the running event loop, which every worker in it shares
            self._turn = _LOOP_TURNS.setdefault(asyncio.get_running_loop(), _LoopTurn())
        if self.checkpoints is not None:
            await self.checkpoints.started()
        feed_tasks = [
            asyncio.create_task(self._feed(ref, channel, self._feed_share(ref)), name=f"feed {ref}")
            for ref, channel in self._feed_channels.items()
        ]
        actor_tasks = [asyncio.create_task(actor.run(), name=f"actor {ref}") for ref, actor in self.actors.items()]
        link_tasks = [
            asyncio.create_task(coro, name=f"link {peer}")
            for peer, link in self.links.items()
            for coro in (link.read_loop(), link.write_loop())
        ]
        everything = [*actor_tasks, *feed_tasks, *link_tasks]
        try:
            await _supervise(actor_tasks, [*feed_tasks, *link_tasks])
            for link in self.links.values():
                link.finish()
            await _supervise(link_tasks, [])
        except BaseException:
            self._abort_threads()
            for task in everything:
                task.cancel()
            await asyncio.gather(*everything, return_exceptions=True)
            raise
        finally:
            self._abort_threads()
            if self._threads is not None:
                for what, thread in self._threads.close():
                    logger.warning(
                        "the run ended before %s returned: it goes on in thread %s, which a run cannot stop"
                        " (it does not keep the process from exiting)",
                        what,
                        thread,
                    )
            for link in self.links.values():
                await link.comm.aclose()
        return self.stats

    def _abort_threads(self) -> None:
        """Stop threaded calls: those waiting for credit raise, the others stop after their current item."""
        self._aborting = True
        for future in list(self._handovers):
            future.cancel()

    def _feed_share(self, ref: InstanceRef) -> Feed:
        """The part of its PE's feed that instance ``ref`` consumes."""
        feed = self.feeds.get(ref.pe, 0)
        parallelism = self.plan.placement[ref.pe].parallelism
        if isinstance(feed, int) and not isinstance(feed, bool):
            return feed // parallelism + (ref.index < feed % parallelism)
        return feed if ref.index == 0 else 0

    async def _feed(self, ref: InstanceRef, channel: LocalChannel, feed: Feed) -> None:
        pe = self.plan.pes[ref.pe]
        if self.checkpoints is not None:
            feed = self.checkpoints.resumed_feed(ref, feed)
        timed = _TimedChannel(channel, self.actors[ref].stats)
        try:
            if isinstance(feed, bool) or not isinstance(feed, (int, Iterable, AsyncIterable)):
                raise InputError(f"the input of PE {ref.pe} must be a count or an iterable, not {feed!r}")
            # A drain stops the feed, but a source that drains itself still gets its first batch of calls.
            fed, drains_itself = False, self.actors[ref].drains_itself
            if isinstance(feed, int):
                ignores_elements = not pe._input_ports and self.actors[ref].fn is not None
                remaining = max(feed, 0)
                while remaining and not (self._draining and (fed or not drains_itself)):
                    count = min(self._feed_limit(ref.pe), remaining)
                    await timed.send(None, [None] * count if ignores_elements else [{} for _ in range(count)])
                    remaining -= count
                    fed = True
                    if self.held_too_long():
                        await self.give_way()
            elif isinstance(feed, AsyncIterable):
                await self._feed_async(pe, timed, feed)
            else:
                iterator, batch_bytes, pe_id = iter(feed), self.plan.options.batch_bytes, ref.pe
                # A sequence's elements are in memory already: batches of them hold no more, unmeasured.
                held = isinstance(feed, HELD_FEEDS)
                while not (self._draining and (fed or not drains_itself)):
                    limit = self._feed_limit(pe_id)
                    if held:
                        chunk, size = [_input_dict(pe, pe_id, e) for e in itertools.islice(iterator, limit)], 0
                    else:
                        chunk, size = _pull(iterator, limit, batch_bytes, pe, pe_id)
                    if not chunk:
                        break
                    await timed.send(None, chunk, size)
                    fed = True
                    if self.held_too_long():
                        await self.give_way()
        except Aiod4pError:
            raise
        except Exception as exc:
            raise pe_error(ref, "feed", exc) from exc
        finally:
            timed.close()

    def _feed_limit(self, pe: str) -> int:
        """How many feed elements the next batch to root ``pe`` carries.

        ``batch_size`` until the root's time per call is measured (and always
        with ``fixed_order``); then more while ``batch_seconds`` of the root's
        measured work allows, up to ``credits x batch_size`` (the batch takes a
        credit per ``batch_size``). Never fewer than ``batch_size``: a root's
        calls are not dealt among instances, so small batches would buy nothing.
        """
        options = self.plan.options
        seconds = None if self.fixed_order else self.seconds_per_item(pe)
        if not seconds:
            return options.batch_size
        return max(options.batch_size, min(options.batch_size * options.credits, int(options.batch_seconds / seconds)))

    async def _feed_async(self, pe: PE, channel: _TimedChannel, feed: AsyncIterable[Any]) -> None:
        # Read ahead while the channel has no credit, so batches grow under
        # load and stay small (low latency) when the workflow is idle.
        ahead = ReadAhead(
            feed,
            self.plan.options.batch_size,
            self.plan.options.batch_bytes,
            lambda e: _input_dict(pe, pe.label, e),
            "feed",
            drain=getattr(feed, "drain", None),
        )
        self._add_stopper(ahead.drain)
        try:
            while (chunk := await ahead.take()) is not None:
                await channel.send(None, chunk, ahead.taken_bytes)
        finally:
            await ahead.aclose()


class ReadAhead:
    """Pulls an async iterable in its own task, ahead of the consumer by up to ``limit`` items and
    about ``max_bytes`` bytes of them, whichever comes first: it stops reading after the value that
    reaches either bound, so heavy values are read one or a few at a time.

    A value's bytes are what ``sized.bytes_read`` grew by while the source made it (the raw bytes a
    line stream read, a pumped feed's chunk), when ``sized`` has such an int; else its
    :func:`approximate_size` (measuring a small dict costs about as much as the rest of its trip;
    numbers count as nothing, see :data:`SCALARS`).

    ``None`` values are skipped with ``skip_none`` (what a source PE yields: no item, as a generator
    ``process`` yields); a feed's ``None`` elements are elements like any other, as a list's are.
    :meth:`drain` ends the stream; :meth:`take` re-raises the source's own errors.

    Args:
        skip_none: skip ``None`` values.
        drain: the source's own way to drain (a live feed's ``drain()``: it
            yields what it holds, then ends), if it has one.
        sized: what tells the bytes read (default: the source itself); its ``bytes_read`` must
            start from 0 when the source starts.

    Attributes:
        taken_bytes: the bytes of the chunk :meth:`take` returned last.
    """

    def __init__(
        self,
        source: AsyncIterable[Any],
        limit: int,
        max_bytes: int,
        convert: Callable[[Any], Any],
        name: str,
        *,
        skip_none: bool = False,
        drain: object = None,
        sized: object = None,
    ) -> None:
        self._source = source
        self._skip_none = skip_none
        self._sized = source if sized is None else sized
        self.taken_bytes = 0
        self._limit = limit
        self._max_bytes = max_bytes
        self._convert = convert
        self._drain = drain if callable(drain) else None
        self._buffer: list[Any] = []  # never more than one chunk: the reader waits when it holds one
        self._bytes = 0  # of the values in _buffer
        self._ready, self._room = asyncio.Event(), asyncio.Event()
        self._finished = False
        self._stopped = False  # drained or closed: a cancelled reader is then no failure
        self.reader = asyncio.create_task(self._read(), name=name)
        # Cancelled before its first step, the reader never runs its finally: end the stream anyway.
        self.reader.add_done_callback(lambda _: self._finish())

    async def _read(self) -> None:
        sized, read, skip_none = self._sized, 0, self._skip_none
        counted = hasattr(sized, "bytes_read")  # else no lookup per value (a plain async generator)
        try:
            async for value in self._source:
                if value is None and skip_none:
                    continue
                self._buffer.append(self._convert(value))
                if counted and type(now := sized.bytes_read) is int:  # type: ignore[attr-defined]
                    self._bytes += now - read
                    read = now
                elif type(value) not in SCALARS:
                    self._bytes += approximate_size(value)[0]
                self._ready.set()
                while len(self._buffer) >= self._limit or self._bytes >= self._max_bytes:
                    self._room.clear()
                    await self._room.wait()
        finally:
            self._finish()

    def _finish(self) -> None:
        self._finished = True
        self._ready.set()

    def drain(self) -> None:
        """End the stream after what the source yields on its own drain, or else after the items already read."""
        self._stopped = True  # a source's own drain may cancel the reader too (SourcePE does)
        if self._drain is not None:
            self._drain()
        else:
            self.reader.cancel()

    def ready(self) -> bool:
        """Whether :meth:`take` would return at once."""
        return bool(self._buffer) or self._finished

    async def wait(self) -> None:
        """Wait until :meth:`ready`, or until :meth:`interrupt` is called."""
        self._ready.clear()
        if not self.ready():
            await self._ready.wait()

    def interrupt(self) -> None:
        """Wake up :meth:`wait` now."""
        self._ready.set()

    async def take(self) -> list[Any] | None:
        """The next items read, or ``None`` at the end of the source: at most ``limit``, and none after
        the one that brings their size to ``max_bytes`` (at least one).

        Raises:
            Exception: the source's own error, or a ``RuntimeError`` when it let out a ``CancelledError``
                that :meth:`drain` or :meth:`aclose` did not cause (a task it awaited was cancelled):
                a failure, not the end of the stream.
        """
        while not self._buffer:
            if self._finished:
                if not self.reader.cancelled():
                    await self.reader  # re-raises the source's own error
                elif not self._stopped:
                    try:
                        self.reader.result()
                    except asyncio.CancelledError as exc:
                        raise RuntimeError("the source raised CancelledError, though nothing cancelled it") from exc
                return None
            self._ready.clear()
            await self._ready.wait()
        chunk, self._buffer = self._buffer, []
        self.taken_bytes, self._bytes = self._bytes, 0
        self._room.set()
        return chunk

    async def aclose(self) -> None:
        """Stop reading; idempotent."""
        if not self.reader.done():
            self._stopped = True
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


class _TimedChannel:
    """A feed's channel that records its waits for credit in the root's statistics."""

    __slots__ = ("_channel", "_stats")

    def __init__(self, channel: LocalChannel, stats: InstanceStats) -> None:
        self._channel = channel
        self._stats = stats

    async def send(self, port: str | None, items: list[Any], size: int = 0) -> None:
        if self._channel.credits >= self._channel.takes(len(items), size):
            return await self._channel.send(port, items, size)
        started = time.perf_counter()
        await self._channel.send(port, items, size)
        self._stats.feed_blocked_seconds += time.perf_counter() - started

    def close(self) -> None:
        self._channel.close()


def _input_dict(pe: PE, pe_id: str, element: Any) -> Any:
    """What root ``pe``'s ``process`` gets for feed ``element``.

    An input dict as it is; any other element as the item of the PE's one
    input port; for a PE that takes undeclared inputs (dispel4py's) with no
    input ports, the element as it is, as dispel4py hands ``-d '{"read": [1, 2]}'``.

    Raises:
        InputError: the element fits none of these.
    """
    ports = pe._input_ports
    if isinstance(element, dict) and (pe.takes_undeclared_inputs or element.keys() <= ports.keys()):
        return element
    if len(ports) == 1:
        return {next(iter(ports)): element}
    if not ports and pe.takes_undeclared_inputs:
        return element
    if isinstance(element, dict):  # a dict that names ports the PE has not: say which
        unknown = sorted(repr(port) for port in element.keys() - ports.keys())
        raise InputError(
            f"input for PE {pe_id} names {'ports' if len(unknown) > 1 else 'port'} {', '.join(unknown)}, which it"
            f" does not have (its input ports: {sorted(ports) or 'none'}), in {short_repr(element)}"
        )
    raise InputError(
        f"input for PE {pe_id} must be a dict of its input ports (ports: {sorted(ports) or 'none'}),"
        f" got {short_repr(element)}"
    )


def _carries_nothing(items: list[Any]) -> bool:
    """Whether feed batch ``items`` holds no input: only ``None`` (counted calls) or only empty dicts.

    Any other element (a dispel4py root may be fed ``0`` or ``[]``) is an input for ``process``.
    """
    try:
        if any(items):
            return False
    except ValueError:  # an element with no truth value (a numpy array) is an input
        return False
    return items.count(None) == len(items) or items.count({}) == len(items)


async def _supervise(primary: list[asyncio.Task[Any]], secondary: list[asyncio.Task[Any]]) -> None:
    """Wait until every primary task is done; raise the first failure of any task, one that ended before
    the call too (a link's tasks, failed while the worker's instances finished: else nobody retrieved it).

    Each task is watched by one callback, so that thousands of tasks (``-n 10000``) cost no more per
    task than a few (waiting on all of them again after each one ends would cost their square).
    """
    for task in (*primary, *secondary):
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
    running = {task for task in primary if not task.done()}
    if not running:
        return
    outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ended(task: asyncio.Task[Any]) -> None:
        if outcome.done():
            return
        if not task.cancelled() and (error := task.exception()) is not None:
            outcome.set_exception(error)
            return
        running.discard(task)
        if not running:
            outcome.set_result(None)

    watched = [*primary, *secondary]
    for task in watched:
        task.add_done_callback(ended)
    try:
        await outcome
    finally:
        for task in watched:
            task.remove_done_callback(ended)
