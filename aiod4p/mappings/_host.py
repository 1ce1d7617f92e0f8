"""The worker host: what every multi-process mapping shares.

A multi-process mapping (multi, mpi, ray) runs the engine in several
workers. It contributes only how the workers start and which comm (a
:class:`~aiod4p.transports.Comm`) joins each of them to its launcher; the
rest lives here:

* the control vocabulary between a launcher and its workers: the dataclasses
  below, one message per comm message;
* the worker side, :func:`serve`: runs a :class:`Servable` (the engine's
  :class:`~aiod4p._engine.Worker`), obeys :class:`Drain` and the pumped feed's
  :class:`FeedChunk`/:class:`FeedEnd`, reports :class:`Stats` every
  ``interval`` seconds, and ends with :class:`Done`, or with its last
  :class:`Stats` and :class:`Failed`;
  results leave through a :class:`ForwardSink`; :func:`serve_job` builds
  that worker from a shipped job and serves it;
* the launcher side, :class:`Supervisor`: delivers results, publishes
  statistics, pumps the feeds that stay in the launcher (one bounded
  read-ahead, one chunk per credit), relays drain requests, and fails the
  run on the first failure, preferring the root cause, and on a worker that
  ends without reporting; the other workers are told to :class:`Stop`, and
  the results they sent before that still reach the reader.

A launcher closes a worker's control comm after its :class:`Done` (its
goodbye); a worker leaves only then, so nothing it sent is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._checkpoint import HostCheckpoints, Session, Trigger, attach_worker, replayable_feed
from .._engine import HELD_FEEDS, Feed, ReadAhead, Worker, pe_error
from .._frames import short_repr
from .._links import unpicklable_item
from .._plan import ExecutionPlan, InstanceRef, PlanOptions
from .._results import ResultSink
from .._sizes import approximate_batch_size
from .._stats import InstanceStats
from .._threads import flush_standard_streams
from ..errors import (
    Aiod4pError,
    EndOfChannel,
    InputError,
    PeerDied,
    TransportError,
    UnpicklableMessage,
    WorkerDied,
)
from ..transports import Comm
from ._base import RunControl
from ._shipping import Job

__all__ = [
    "GRACE",
    "STATIC_FEEDS",
    "STATS_INTERVAL",
    "Credit",
    "Done",
    "Drain",
    "Failed",
    "FeedChunk",
    "FeedEnd",
    "ForwardSink",
    "Pumped",
    "PumpedFeed",
    "Results",
    "ResultsTaken",
    "Servable",
    "Stats",
    "Stop",
    "Supervisor",
    "fail",
    "prepare_job",
    "pumped_feeds",
    "serve",
    "serve_job",
    "split_feeds",
]

logger = logging.getLogger("aiod4p.host")

GRACE = 1.0
"""Seconds a supervisor waits for the root cause after a failure caused by another one (and for
the last messages of a worker whose process ended)."""

STATS_INTERVAL = 0.5
"""Seconds between two statistics reports of a worker."""

STATIC_FEEDS = (int, *HELD_FEEDS)
"""Feeds that travel with the job; any other iterable stays with the launcher, which pumps it."""


# -- the control vocabulary ------------------------------------------------------------
# Worker -> launcher.
@dataclass(frozen=True)
class Results:
    """Items written by PE ``pe`` on its result port ``port``, about ``nbytes`` bytes of them (as the worker's
    :class:`ForwardSink` counted them: the launcher's :class:`ResultsTaken` gives them back so)."""

    pe: str
    port: str
    items: list[Any]
    nbytes: int


@dataclass(frozen=True)
class Stats:
    """Live statistics of the instances the sender runs."""

    stats: list[InstanceStats]


@dataclass(frozen=True)
class Credit:
    """The worker took a chunk of PE ``pe``'s pumped feed: the launcher may send one more."""

    pe: str


@dataclass(frozen=True)
class Done:
    """The worker finished; the final statistics of its instances."""

    stats: list[InstanceStats]


@dataclass(frozen=True)
class Failed:
    """The worker failed with ``error`` (picklable, an :class:`~aiod4p.errors.Aiod4pError`); a worker that ran
    (:func:`serve`) first sends the :class:`Stats` of what its instances did up to then, whatever the error."""

    error: BaseException


# Launcher -> worker.
@dataclass(frozen=True)
class ResultsTaken:
    """The launcher handed on ``batches`` of the worker's :class:`Results`, of ``nbytes`` bytes: it may send as
    many more."""

    nbytes: int
    batches: int


@dataclass(frozen=True)
class Drain:
    """Stop the sources and feeds; what is in flight still reaches the sinks."""


@dataclass(frozen=True)
class Stop:
    """The run failed elsewhere: stop at once (no ``postprocess``) and report :class:`Failed`, after which the
    worker sends nothing; what it sent before still reaches the launcher, results included."""


@dataclass(frozen=True)
class FeedChunk:
    """The next elements of PE ``pe``'s pumped feed, and about how many bytes they are (as the launcher's read-ahead
    measured them: the worker's read-ahead counts them so, without measuring them again)."""

    pe: str
    items: list[Any]
    nbytes: int


@dataclass(frozen=True)
class FeedEnd:
    """PE ``pe``'s pumped feed has ended."""

    pe: str


@dataclass(frozen=True)
class Pumped:
    """Stands in a shipped job's feeds for a feed that the launcher pumps (see :func:`split_feeds`);
    ``replayed``: whether the launcher resumes it where a restored checkpoint left it (a
    :func:`~aiod4p._checkpoint.replayable_feed`), else it goes on from where it stands."""

    replayed: bool


def split_feeds(
    plan: ExecutionPlan, feeds: Mapping[str, Feed], ship_held: bool = True
) -> tuple[dict[str, Feed | Pumped], list[tuple[str, int, Feed]]]:
    """The feeds to ship with the job, and the ``(pe, worker, feed)`` feeds the launcher pumps.

    A feed of :data:`STATIC_FEEDS` travels with the job, but a list or tuple only if ``ship_held`` (else the
    workers get the job pickled, each its own copy: a list of large items was pickled on the caller's event loop
    and copied to every worker, holding the loop for seconds); any other feed is replaced by :class:`Pumped` and
    pumped to the worker of the PE's instance 0 (the instance that consumes it), a chunk per credit.
    """
    shipped: dict[str, Feed | Pumped] = {}
    pumped: list[tuple[str, int, Feed]] = []
    for pe_id, feed in feeds.items():
        if isinstance(feed, STATIC_FEEDS) and (ship_held or not isinstance(feed, (list, tuple))):
            shipped[pe_id] = feed
        else:
            shipped[pe_id] = Pumped(replayable_feed(feed))
            pumped.append((pe_id, plan.placement[pe_id].workers[0], feed))
    return shipped, pumped


def prepare_job(
    plan: ExecutionPlan,
    feeds: Mapping[str, Feed],
    max_delay: float,
    interval: float,
    session: Session | None,
    control: RunControl,
    ship_held: bool = True,
) -> tuple[Job, list[tuple[str, int, Feed]]]:
    """The job of one attempt of a run on launched workers, and the ``(pe, worker, feed)`` feeds the launcher
    pumps (see :func:`split_feeds`, given ``ship_held``); an attempt of a checkpointed run (its ``session``)
    resumes them where the restored checkpoint left them, and its workers take part in checkpoints. Workers start
    drained if ``control`` is draining already."""
    shipped, pumped = split_feeds(plan, feeds, ship_held)
    drained = control.draining
    if session is None:
        return Job(plan, shipped, max_delay, interval, drained=drained), pumped
    return Job(plan, shipped, max_delay, interval, session.spec(), drained), session.resumed(pumped)


# -- the worker side -------------------------------------------------------------------
class Servable(Protocol):
    """What :func:`serve` runs: the engine's Worker, or a group of them (MPI rank 0)."""

    plan: ExecutionPlan

    @property
    def stats(self) -> list[InstanceStats]: ...

    def drain(self) -> None: ...

    async def run(self) -> list[InstanceStats]: ...


class ForwardSink:
    """Results travel to the launcher on the control comm, at most a window of them not yet taken.

    A batch waits while the launcher has not taken ``window`` bytes of results sent before it
    (:func:`~aiod4p._sizes.approximate_batch_size`), or ``window_batches`` batches (:class:`ResultsTaken`, which
    :func:`serve` hands to :meth:`taken`), so at most ``window`` bytes and one batch are on their way, and at most
    ``window_batches``: a slow reader holds heavy results back in the worker's PEs by bytes, small ones by batches.

    Args:
        control: the worker's control comm.
        destination: where they go, for error messages (``"the parent process"``).
        window: the plan's :attr:`~aiod4p.PlanOptions.result_bytes`.
        window_batches: the plan's :attr:`~aiod4p.PlanOptions.result_batches`.
    """

    def __init__(self, control: Comm, destination: str, window: int, window_batches: int) -> None:
        self._control = control
        self._destination = destination
        self._window = window
        self._window_batches = window_batches
        self._untaken = 0  # bytes sent that the launcher has not said it took
        self._untaken_batches = 0
        self._room = asyncio.Event()

    @classmethod
    def for_plan(cls, control: Comm, destination: str, options: PlanOptions) -> ForwardSink:
        """A sink with the plan's windows: :attr:`~aiod4p.PlanOptions.result_bytes` and
        :attr:`~aiod4p.PlanOptions.result_batches`."""
        return cls(control, destination, options.result_bytes, options.result_batches)

    def taken(self, nbytes: int, batches: int) -> None:
        """The launcher took ``batches`` of the results sent, of ``nbytes`` bytes."""
        self._untaken -= nbytes
        self._untaken_batches -= batches
        self._room.set()

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        """Raises:
        TransportError: a result cannot be pickled (naming the PE, port and item).
        """
        while self._untaken >= self._window or self._untaken_batches >= self._window_batches:
            self._room.clear()
            await self._room.wait()
        nbytes = approximate_batch_size(items)
        try:
            await self._control.send(Results(pe, port, items, nbytes))
        except UnpicklableMessage as exc:
            culprit = next((item for item in items if not _picklable(item)), None)
            cause = exc.__cause__
            raise TransportError(
                f"PE {pe} wrote a result on output port {port!r} that cannot be pickled to reach"
                f" {self._destination}: {short_repr(culprit)} ({type(cause).__name__}: {cause})"
            ) from exc
        self._untaken += nbytes
        self._untaken_batches += 1


def _picklable(item: Any) -> bool:
    try:
        pickle.dumps(item, protocol=5)
    except Exception:
        return False
    return True


class PumpedFeed:
    """A root's input arriving from the launcher in chunks; takes one chunk per credit.

    Attributes:
        bytes_read: the bytes of the chunks taken so far (their :class:`FeedChunk` ``nbytes``), counted
            when a chunk's first element is yielded: the engine's read-ahead counts its elements by it.
        replayed: whether the launcher resumes the feed where a restored checkpoint left it (:class:`Pumped`).
    """

    def __init__(self, pe: str, control: Comm, replayed: bool) -> None:
        self._pe = pe
        self.replayed = replayed
        self._control = control
        self._chunks: deque[tuple[list[Any], int]] = deque()
        self._ended = False
        self._changed = asyncio.Event()
        self.bytes_read = 0

    def put(self, chunk: list[Any], nbytes: int) -> None:
        self._chunks.append((chunk, nbytes))
        self._changed.set()

    def end(self) -> None:
        self._ended = True
        self._changed.set()

    def drain(self) -> None:
        """Nothing to do: on draining, the launcher sends what its feed had taken, then :class:`FeedEnd`."""

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            while not self._chunks:
                if self._ended:
                    return
                self._changed.clear()
                await self._changed.wait()
            chunk, nbytes = self._chunks.popleft()
            await self._control.send(Credit(self._pe))
            self.bytes_read += nbytes
            for element in chunk:
                yield element


def pumped_feeds(feeds: Mapping[str, Feed | Pumped], control: Comm) -> tuple[dict[str, Feed], dict[str, PumpedFeed]]:
    """A shipped job's feeds with each :class:`Pumped` replaced by a :class:`PumpedFeed` on ``control``."""
    pumped = {pe: PumpedFeed(pe, control, feed.replayed) for pe, feed in feeds.items() if isinstance(feed, Pumped)}
    resolved: dict[str, Feed] = {pe: feed for pe, feed in feeds.items() if not isinstance(feed, Pumped)}
    return {**resolved, **pumped}, pumped


async def serve(
    worker: Servable,
    control: Comm,
    *,
    name: str,
    sink: ForwardSink,
    pumped: Mapping[str, PumpedFeed] | None = None,
    interval: float = STATS_INTERVAL,
    goodbye_timeout: float | None = None,
) -> bool:
    """Run ``worker``, obey the launcher on ``control``, report, then close ``control``.

    Args:
        worker: what to run.
        control: the comm to the launcher.
        sink: the :class:`ForwardSink` on ``control`` that ``worker``'s results leave through.
        name: this worker in error messages (``"worker 2"``, ``"MPI rank 0"``).
        pumped: the feeds the launcher pumps, by PE id (see :func:`pumped_feeds`).
        interval: seconds between two :class:`Stats` reports.
        goodbye_timeout: after reporting, the longest to wait for the launcher
            to close ``control`` (``None``: as long as it takes).

    Returns:
        Whether the run succeeded (:class:`Done` was sent); a failure is
        reported to the launcher (:class:`Stats`, then :class:`Failed`), not
        raised. Cancelled, it aborts ``control`` and leaves at once.
    """
    feeds = pumped or {}
    triggers: asyncio.Queue[int] = asyncio.Queue()
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(), name=f"{name} engine")
    listener = asyncio.create_task(_listen(control, worker, sink, feeds, triggers, stop), name=f"{name} listener")
    triggering = asyncio.create_task(_trigger(worker, triggers), name=f"{name} checkpoints")
    reporter = asyncio.create_task(_report(control, worker, interval), name=f"{name} statistics")
    stopping = asyncio.create_task(stop.wait(), name=f"{name} stop")
    succeeded = False
    try:
        await asyncio.wait({running, listener, triggering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        reporter.cancel()
        if not running.done():
            if triggering.done():
                triggering.result()  # raises why a checkpoint could not start here
            if stopping.done():
                raise Aiod4pError(f"{name} stopped: the run failed elsewhere")
            listener.result()  # raises PeerDied: the launcher vanished
            raise PeerDied("the launcher closed the control comm before the run finished")
        try:
            stats = running.result()
        except UnpicklableMessage as exc:
            raise unpicklable_item(worker.plan, exc) from exc
        # A worker slow to exit (a thread a PE left running) is stopped once the launcher hears it is done.
        flush_standard_streams()
        await control.send(Done(stats))
        succeeded = True
    except Exception as exc:
        # What every instance did up to the failure (a PE's error, counted; a link broken by another worker's
        # failure; a Stop): the failed run's report. The Supervisor still blames the root cause: it ranks the
        # failures, whichever reaches it first.
        with contextlib.suppress(TransportError):
            await control.send(Stats(worker.stats))
        await _report_failure(control, name, exc)
    except BaseException:  # cancelled: leave at once, abandoning the control comm
        control.abort()
        raise
    finally:
        for task in (running, reporter, stopping):
            task.cancel()
        await asyncio.gather(running, reporter, stopping, return_exceptions=True)
        # Leave only once the launcher closes its end (its goodbye): a launcher still
        # writing to a closed comm (a drain, say) would lose what this worker sent.
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(goodbye_timeout):
                await listener
        for task in (listener, triggering):
            task.cancel()
        await asyncio.gather(listener, triggering, return_exceptions=True)
        await control.aclose()
    return succeeded


async def fail(control: Comm, name: str, error: BaseException, *, goodbye_timeout: float | None = None) -> None:
    """Report ``error`` as :func:`serve` reports a failed run, for a worker that could not even
    start (its job cannot be loaded, say); then wait for the goodbye and close ``control``."""
    await _report_failure(control, name, error)

    async def goodbye() -> None:
        while True:
            await control.receive()  # ends with EndOfChannel (or the launcher's disappearance)

    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(goodbye_timeout):
            await goodbye()
    await control.aclose()


async def serve_job(
    job: Job | Exception,
    wid: int,
    control: Comm,
    peers: Mapping[int, Comm],
    *,
    name: str,
    launcher: str,
    goodbye_timeout: float | None = None,
) -> bool:
    """Build the engine's worker ``wid`` of ``job``, joined to ``peers`` (by id); :func:`serve` it on ``control``.

    Args:
        job: the job, or why it could not be loaded (see
            :func:`~aiod4p.mappings._shipping.unship_or_error`): reported as a failure.
        name: this worker in error messages (``"worker 2"``).
        launcher: the launcher, in the message of a result that cannot reach it (see :class:`ForwardSink`).
        goodbye_timeout: as for :func:`serve`.

    Returns:
        Whether the run succeeded. A failure, even to load the job or build
        the worker, is reported to the launcher (:func:`fail`), not raised.
    """
    try:
        if isinstance(job, Exception):
            raise job
        feeds, pumped = pumped_feeds(job.feeds, control)
        sink = ForwardSink.for_plan(control, launcher, job.plan.options)
        worker = Worker(job.plan, wid, feeds=feeds, results=sink, peers=peers, max_delay=job.max_delay)
        if job.checkpoints is not None:
            attach_worker(worker, job.checkpoints, control)
        if job.drained:
            worker.drain()
    except Exception as exc:
        await fail(control, name, exc, goodbye_timeout=goodbye_timeout)
        return False
    return await serve(
        worker, control, name=name, sink=sink, pumped=pumped, interval=job.interval, goodbye_timeout=goodbye_timeout
    )


async def _report_failure(control: Comm, name: str, exc: BaseException) -> None:
    if not isinstance(exc, Aiod4pError):
        logger.error("%s failed", name, exc_info=exc)
        exc = Aiod4pError(f"{name} failed: {type(exc).__name__}: {exc}")
    if not _picklable(exc):
        exc = Aiod4pError(str(exc))
    with contextlib.suppress(TransportError):
        await control.send(Failed(exc))


async def _listen(
    control: Comm,
    worker: Servable,
    sink: ForwardSink,
    pumped: Mapping[str, PumpedFeed],
    triggers: asyncio.Queue[int],
    stop: asyncio.Event,
) -> None:
    """Obey the launcher until it closes the control comm; the checkpoints it triggers go to ``triggers``, for
    :func:`_trigger`, and :class:`Stop` sets ``stop``.

    Raises:
        PeerDied: the launcher vanished, or sent what a worker does not understand.
    """
    while True:
        try:
            message = await control.receive()
        except EndOfChannel:
            return
        match message:
            case Stop():
                stop.set()
            case ResultsTaken(nbytes, batches):
                sink.taken(nbytes, batches)
            case FeedChunk(pe, items, nbytes):
                pumped[pe].put(items, nbytes)
            case FeedEnd(pe):
                pumped[pe].end()
            case Drain():
                worker.drain()
            case Trigger(n) if getattr(worker, "checkpoints", None) is not None:
                triggers.put_nowait(n)
            case _:
                raise PeerDied(f"unexpected control message {message!r} from the launcher")


async def _trigger(worker: Servable, triggers: asyncio.Queue[int]) -> None:
    """Start the checkpoints in ``triggers`` on ``worker``, in order, apart from :func:`_listen`: a trigger may
    wait for the worker's results gate, which may wait for room in the :class:`ForwardSink`, which only the
    :class:`ResultsTaken` that :func:`_listen` reads gives (awaited there, the worker hung)."""
    while True:
        n = await triggers.get()
        await worker.checkpoints.trigger(n)  # type: ignore[attr-defined]


async def _report(control: Comm, worker: Servable, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await control.send(Stats(worker.stats))


# -- the launcher side -----------------------------------------------------------------
async def _no_reason(wid: int) -> str:
    return f"worker {wid} ended its part of the run without reporting"


@dataclass
class _WorkerState:
    received: int = 0  # control messages received
    taken: int = 0  # bytes of results handed on and not yet acknowledged (ResultsTaken)
    taken_batches: int = 0  # and their batches
    receiving: bool = False  # whether its reader waits for one
    final: list[InstanceStats] | None = None
    credits: dict[str, asyncio.Semaphore] = field(default_factory=dict)


class Supervisor:
    """The launcher's side of a run on workers, each joined to it by a control comm.

    Args:
        plan: the plan the workers run.
        controls: the control comm of each worker, by worker id.
        sink: where results go.
        control: drain requests come from it; statistics are published to it.
        pumped: ``(pe, worker, feed)``: feeds this process pumps to a worker.
        grace: seconds to wait, after a worker failed because another one did,
            for the root cause; and, once a worker has ended, for its last messages.
        exited: waits until worker ``wid`` has ended (its process exited), if the
            mapping can tell; a worker whose comm ends without reporting is dead.
        death: why worker ``wid`` died, for :class:`~aiod4p.errors.WorkerDied`.
        checkpoints: the launcher's side of checkpoints, if the run takes them.
    """

    def __init__(
        self,
        plan: ExecutionPlan,
        controls: Mapping[int, Comm],
        sink: ResultSink,
        control: RunControl,
        *,
        pumped: Sequence[tuple[str, int, Feed]] = (),
        grace: float = GRACE,
        exited: Callable[[int], Awaitable[None]] | None = None,
        death: Callable[[int], Awaitable[str]] = _no_reason,
        checkpoints: HostCheckpoints | None = None,
    ) -> None:
        self.plan = plan
        self.controls = controls
        self.sink = sink
        self.control = control
        self.pumped = pumped
        self.grace = grace
        self.exited = exited
        self.death = death
        self.checkpoints = checkpoints
        self.workers = {wid: _WorkerState() for wid in controls}
        self.draining = False
        self._aheads: list[ReadAhead] = []
        self._posts: set[asyncio.Task[None]] = set()

    async def run(self) -> list[InstanceStats]:
        """Run until every worker is done; returns the final statistics of every instance.

        Raises:
            Aiod4pError: the root cause among the failures reported (a PE's error
                before a dead worker before a broken link).
            WorkerDied: a worker ended without reporting.
        """
        for pe, wid, _ in self.pumped:
            self.workers[wid].credits[pe] = asyncio.Semaphore(self.plan.options.credits)
        watchers = [asyncio.create_task(self._watch(wid), name=f"watch worker {wid}") for wid in self.controls]
        pumps = [asyncio.create_task(self._pump(pe, wid, feed), name=f"pump {pe}") for pe, wid, feed in self.pumped]
        if self.checkpoints is not None:
            pumps.append(asyncio.create_task(self.checkpoints.drive(), name="checkpoint coordinator"))
        forget_drain = self.control.on_drain(self._drain)
        try:
            await self._supervise(watchers, pumps)
        finally:
            forget_drain()  # else the run's control keeps this attempt alive through every restart
            for task in [*watchers, *pumps]:
                task.cancel()
            await asyncio.gather(*watchers, *pumps, *self._posts, return_exceptions=True)
        if self.checkpoints is not None:
            await self.checkpoints.finish()
        return [entry for wid in sorted(self.workers) for entry in self.workers[wid].final or []]

    async def _supervise(self, watchers: list[asyncio.Task[Any]], pumps: list[asyncio.Task[Any]]) -> None:
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
                done, _ = await asyncio.wait(others, timeout=self.grace)
                errors.extend(_failures(done))
        if self.checkpoints is None:  # a checkpointed run's results are its committed ones: none to relay
            await self._stop_the_others(dict(zip(self.controls, watchers, strict=True)))
        raise min(errors, key=_rank)

    async def _stop_the_others(self, watchers: Mapping[int, asyncio.Task[Any]]) -> None:
        """After a failure: tell every worker still running to :class:`Stop`, and relay what each sent until it
        reports, for at most ``grace`` seconds in all; the results a worker sent before the failure reached it
        are the failed run's too (a sibling instance's finished results, on another worker). The stops are sent
        apart (:meth:`_post`): a worker whose loop a PE holds, with its comm full, must not hold up the others,
        nor the run's error beyond ``grace``."""
        running = {wid: task for wid, task in watchers.items() if not task.done()}
        if not running:
            return
        stops = [asyncio.create_task(self._post(wid, Stop())) for wid in running]
        await asyncio.wait(running.values(), timeout=self.grace)
        for task in stops:
            task.cancel()
        await asyncio.gather(*stops, return_exceptions=True)

    async def _watch(self, wid: int) -> None:
        """Relay worker ``wid``'s messages until it reports the end of its run.

        Raises:
            WorkerDied: the worker ended without reporting.
            Aiod4pError: the worker reported this error.
        """
        state = self.workers[wid]
        reader = asyncio.create_task(self._read(wid))
        ended = asyncio.ensure_future(self.exited(wid)) if self.exited is not None else None
        try:
            await asyncio.wait({reader} if ended is None else {reader, ended}, return_when=asyncio.FIRST_COMPLETED)
            # The worker has ended: its last messages may still be in the comm. Relay
            # them; give up only when nothing more arrives (a child of the worker may
            # hold the comm open).
            while not reader.done():
                received = state.received
                await asyncio.wait({reader}, timeout=self.grace)
                if not reader.done() and state.received == received and state.receiving:
                    raise WorkerDied(await self.death(wid))
            reader.result()
        finally:
            for task in (reader, ended):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _read(self, wid: int) -> None:
        comm, sink, control, state = self.controls[wid], self.sink, self.control, self.workers[wid]
        while True:
            state.receiving = True
            try:
                message = await comm.receive()
            except (EndOfChannel, PeerDied):
                if self.exited is not None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.grace):
                            await self.exited(wid)
                raise WorkerDied(await self.death(wid)) from None
            state.receiving = False
            state.received += 1
            if isinstance(message, Results):
                if self.checkpoints is not None:
                    await self.checkpoints.emit(wid, message.pe, message.port, message.items)
                else:
                    await sink.emit(message.pe, message.port, message.items)
                await self._taken(wid, message.nbytes)
                continue
            if self.checkpoints is not None and await self.checkpoints.receive(wid, message):
                continue
            match message:
                case Stats(stats):
                    _publish(control, stats)
                case Credit(pe):
                    state.credits[pe].release()
                case Done(stats):
                    state.final = stats
                    _publish(control, stats)
                    await comm.aclose()  # goodbye: the worker may leave
                    return
                case Failed(error):
                    raise error
                case _:
                    raise TransportError(f"unexpected message {message!r} from worker {wid}")

    async def _taken(self, wid: int, nbytes: int) -> None:
        """A batch of worker ``wid``'s results, of ``nbytes`` bytes, was handed on: acknowledge the batches once
        they add up to half of its :class:`ForwardSink`'s window, in bytes or in batches (a worker that waits
        has a whole window untaken: never less)."""
        state, options = self.workers[wid], self.plan.options
        state.taken += nbytes
        state.taken_batches += 1
        if state.taken >= options.result_bytes // 2 or state.taken_batches >= max(options.result_batches // 2, 1):
            taken = ResultsTaken(state.taken, state.taken_batches)
            state.taken = state.taken_batches = 0
            with contextlib.suppress(TransportError):  # it is gone: its reader says how
                await self.controls[wid].send(taken)

    async def _pump(self, pe: str, wid: int, feed: Feed) -> None:
        """Send a feed this process holds to worker ``wid``, a chunk per credit."""
        comm, credits = self.controls[wid], self.workers[wid].credits[pe]
        source = feed if isinstance(feed, AsyncIterable) else _elements(feed)  # type: ignore[arg-type]
        ahead = ReadAhead(
            source,
            self.plan.options.batch_size,
            self.plan.options.batch_bytes,
            lambda element: element,
            f"feed of {pe}",
            drain=getattr(feed, "drain", None),
        )
        self._aheads.append(ahead)
        if self.draining:
            ahead.drain()
        try:
            while True:
                try:
                    chunk = await ahead.take()
                except Aiod4pError:
                    raise  # the feed's own error (an --stdin line that is not JSON): as on async
                except Exception as exc:
                    raise pe_error(InstanceRef(pe, 0), "feed", exc) from exc
                if chunk is None:
                    break
                await credits.acquire()
                try:
                    await comm.send(FeedChunk(pe, chunk, ahead.taken_bytes))
                except UnpicklableMessage as exc:
                    raise InputError(f"an input of PE {pe} cannot be pickled: {exc.__cause__}") from exc
            await comm.send(FeedEnd(pe))
        finally:
            await ahead.aclose()

    def _drain(self) -> None:
        """Drain the pumped feeds (what they already took still goes to the workers) and ask every worker to drain."""
        self.draining = True
        for ahead in self._aheads:
            ahead.drain()
        for wid in self.controls:
            task = asyncio.get_running_loop().create_task(self._post(wid, Drain()))
            self._posts.add(task)
            task.add_done_callback(self._posts.discard)

    async def _post(self, wid: int, message: Drain | Stop) -> None:
        with contextlib.suppress(TransportError):  # that worker already finished
            await self.controls[wid].send(message)


async def _elements(feed: Iterable[Any]) -> AsyncIterator[Any]:
    for element in feed:
        yield element


def _publish(control: RunControl, stats: list[InstanceStats]) -> None:
    """Publish statistics per worker (a relay, such as MPI rank 0, reports several)."""
    per_worker: dict[int, list[InstanceStats]] = {}
    for entry in stats:
        per_worker.setdefault(entry.worker, []).append(entry)
    for worker, entries in per_worker.items():
        control.publish_stats(worker, entries)


def _failures(tasks: set[asyncio.Task[Any]]) -> list[BaseException]:
    return [error for task in tasks if not task.cancelled() and (error := task.exception()) is not None]


def _rank(error: BaseException) -> int:
    """Root causes first: a worker's own error, then a dead worker, then broken links."""
    if isinstance(error, PeerDied):
        return 2
    if isinstance(error, WorkerDied):
        return 1
    return 0
