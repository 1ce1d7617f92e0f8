"""The engine: runs the PE instances a plan places on one worker.

Every mapping runs this engine; mappings differ only in where workers live
and which comm joins them. Each instance is an actor (a task) that takes
batches from its inbox, calls the PE, and hands outputs to its router. The
router batches per destination and flushes a batch when it is full, when the
actor is about to wait for input, and at least every ``max_delay`` seconds.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import logging
import time
import traceback
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeAlias

from ._channels import EOS, Inbox, LocalChannel, SenderChannel
from ._groupings import All, GroupBy, stable_hash
from ._links import PeerLink, RemoteChannel
from ._pe import PE, _Runtime
from ._plan import ExecutionPlan, InstanceRef
from ._provenance import ActorRecorder, WorkerRecorder
from ._results import ResultSink
from ._stats import InstanceStats
from .errors import Aiod4pError, GraphError, InputError, PEError
from .transports import Comm

__all__ = ["Feed", "Worker"]

Feed: TypeAlias = int | Iterable[Any] | AsyncIterable[Any]

pe_logger = logging.getLogger("aiod4p.pe")


def _error(ref: InstanceRef, port: str, exc: BaseException) -> PEError:
    if isinstance(exc, PEError):
        return exc
    text = "".join(traceback.format_exception(exc))
    return PEError(ref.pe, ref.index, port, f"{type(exc).__name__}: {exc}", text)


class _Pending:
    """Items waiting to travel on one channel to one destination port."""

    __slots__ = ("channel", "dirty", "items", "port")

    def __init__(self, channel: SenderChannel, port: str) -> None:
        self.items: list[Any] = []
        self.dirty = False  # listed in the actor's dirty list, to be flushed
        self.channel = channel
        self.port = port


class _ResultPending:
    __slots__ = ("dirty", "items", "pe", "port")

    def __init__(self, pe: str, port: str) -> None:
        self.items: list[Any] = []
        self.dirty = False
        self.pe = pe
        self.port = port


_SINGLE, _ROUND_ROBIN, _GROUP_BY, _ALL = range(4)


class _Route:
    """One edge leaving an instance: picks pendings for each item."""

    __slots__ = ("key", "kind", "label", "next", "pendings")

    def __init__(self, kind: int, pendings: list[_Pending], key: GroupBy | None, label: str, start: int) -> None:
        self.kind = kind
        self.pendings = pendings
        self.next = start % len(pendings)
        self.key = key
        self.label = label


class _Actor:
    def __init__(self, worker: Worker, ref: InstanceRef, pe: PE, inbox: Inbox, expected_eos: int) -> None:
        self.worker = worker
        self.ref = ref
        self.pe = pe
        self.inbox = inbox
        self.expected_eos = expected_eos
        options = worker.plan.options
        self.batch_size = options.batch_size
        self.max_delay = worker.max_delay
        self.stats = InstanceStats(ref.pe, ref.index, worker.worker_id)
        self.buffers: dict[str, list[Any]] = {port: [] for port in pe.outputs}
        self.routes: dict[str, list[_Route]] = {port: [] for port in pe.outputs}
        self.results: dict[str, _ResultPending] = {}
        self.outgoing: list[SenderChannel] = []
        self.dirty: list[_Pending | _ResultPending] = []
        self.last_flush = time.monotonic()
        item_function = pe._item_function()
        self.fn: Callable[..., Any] | None = item_function[0] if item_function else None
        self.fn_port: str | None = item_function[1] if item_function else None
        self.fn_kind = _call_kind(self.fn) if self.fn is not None else ""
        # A PE without inputs takes no argument: it is called once per feed element.
        self.fn_of_item: Callable[[Any], Any] | None = (
            self.fn if self.fn is None or pe.inputs else _ignoring_argument(self.fn)
        )
        self.process_kind = _call_kind(pe.process)
        single = list(pe.inputs)
        self.single_input = single[0] if len(single) == 1 else None
        self.is_root = worker.plan.placement[ref.pe].is_root
        self.links = list(worker.links.values())
        self.recorder: ActorRecorder | None = None  # provenance, when on

    # -- wiring ------------------------------------------------------------
    def add_route(self, port: str, route: _Route) -> None:
        self.routes[port].append(route)

    # -- main loop ---------------------------------------------------------
    async def run(self) -> InstanceStats:
        pe, ref = self.pe, self.ref
        pe._runtime = _Runtime(
            self.buffers,
            ref.index,
            logging.LoggerAdapter(pe_logger, {"pe": ref.pe, "instance": ref.index}),
            recorder=self.recorder,
        )
        try:
            await self._stage("preprocess", pe.preprocess)
            inbox, remaining = self.inbox, self.expected_eos
            while remaining:
                if inbox.empty() and self.dirty:
                    await self._flush_all()
                source, port, items = await inbox.get()
                if items is EOS:
                    remaining -= 1
                    continue
                source.release()
                if self.links and any(link.pending for link in self.links):
                    # Let the links send first: a long batch would hold back what other workers wait for.
                    await asyncio.sleep(0)
                self.stats.batches_in += 1
                self.stats.items_in += len(items)
                self.stats.queued_items = inbox.queued_items
                try:
                    started, blocked = time.perf_counter(), self.stats.blocked_seconds
                    try:
                        if self.recorder is None:
                            await self._handle(port, items)
                        else:
                            await self.recorder.handle(port, items)
                    finally:  # waiting for credit while streaming outputs is blocked time, not busy time
                        blocked = self.stats.blocked_seconds - blocked
                        self.stats.busy_seconds += time.perf_counter() - started - blocked
                    await self._route_outputs()
                except Exception as exc:
                    self.stats.errors += 1
                    raise _error(ref, "feed" if port is None else port, exc) from exc
            await self._stage("postprocess", pe.postprocess)
            await self._flush_all()
            # End of stream only after success: on a failure the run is cancelled, and
            # downstream instances must not run postprocess on partial data.
            for channel in self.outgoing:
                channel.close()
        finally:
            self.stats.max_queued_items = self.inbox.max_queued_items
            self.stats.queued_items = self.inbox.queued_items
        if self.recorder is not None:
            self.stats.provenance = self.recorder.part()
        return self.stats

    async def call(self, port: str, items: list[Any]) -> None:
        """Hand ``items`` that arrived on input ``port`` to the PE, as the run loop does.

        What the PE writes stays in :attr:`buffers`: this is for hosts that
        route by themselves (Storm bolts).

        Raises:
            PEError: the PE raised; it names the PE, the instance and the port.
        """
        try:
            await self._handle(port, items)
        except Exception as exc:
            self.stats.errors += 1
            raise _error(self.ref, port, exc) from exc

    async def lifecycle(self, stage: str) -> None:
        """Call the PE's ``preprocess`` or ``postprocess``; what it writes stays in :attr:`buffers`.

        Raises:
            PEError: the PE raised; it names the PE, the instance and the stage.
        """
        await self._lifecycle(stage, getattr(self.pe, stage))

    async def _lifecycle(self, stage: str, method: Any) -> None:
        """Call ``preprocess`` or ``postprocess``; what it wrote stays in the buffers."""
        started = time.perf_counter()
        try:
            result = method()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self.stats.errors += 1
            raise _error(self.ref, stage, exc) from exc
        finally:
            self.stats.busy_seconds += time.perf_counter() - started

    async def _stage(self, stage: str, method: Any) -> None:
        """Run a lifecycle stage and route what it wrote."""
        if self.recorder is not None:
            self.recorder.begin_stage(stage)
        await self._lifecycle(stage, method)
        try:
            await self._route_outputs()
        except Exception as exc:
            self.stats.errors += 1
            raise _error(self.ref, stage, exc) from exc
        if self.recorder is not None:
            self.recorder.end_stage()

    # -- calling the PE ------------------------------------------------------
    async def _handle(self, port: str | None, items: list[Any]) -> None:
        if self.fn is not None:
            if port is None:  # a feed batch: input dicts
                if not self.pe.inputs:
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
                for item in items:
                    fn(item)
            elif not self.pe.inputs:
                append = self.buffers[out_port].append
                for _ in items:
                    result = item_fn()
                    if result is not None:
                        append(result)
            else:
                append = self.buffers[out_port].append
                for item in items:
                    result = fn(item)
                    if result is not None:
                        append(result)
        elif kind == "async":
            for item in items:
                result = await fn(item)
                if result is not None and out_port is not None:
                    self.buffers[out_port].append(result)
        elif kind == "gen":
            worker = self.worker
            for item in items:
                for result in fn(item):
                    if result is not None and out_port is not None:
                        await self._append_streaming(out_port, result)
                    if worker._draining and self.is_root:
                        return  # a draining source stops producing
        elif self.is_root and out_port is not None:
            for item in items:
                await self._pump(fn(item), out_port)
        else:
            for item in items:
                async for result in fn(item):
                    if result is not None and out_port is not None:
                        await self._append_streaming(out_port, result)

    async def _pump(self, source: AsyncIterator[Any], port: str) -> None:
        # A live source (a root's async generator) is read ahead while the actor
        # waits for credit, so batches grow under load; whenever the source has
        # nothing ready, partly filled batches are flushed, so an item from a
        # slow source is not held back.
        ahead = _ReadAhead(source, self.batch_size, lambda value: value, f"source {self.ref}")
        self.worker._add_stopper(getattr(self.pe, "drain", None), ahead.reader)
        try:
            while True:
                if not ahead.ready():
                    await self._flush_all()
                chunk = await ahead.take()
                if chunk is None:
                    break
                self.buffers[port].extend(chunk)
                await self._route_outputs()
        finally:
            await ahead.aclose()

    async def _call_process(self, port: str | None, items: list[Any]) -> None:
        process, kind = self.pe.process, self.process_kind
        for item in items:
            inputs = item if port is None else {port: item}
            if kind == "sync":
                self._collect(process(inputs))
            elif kind == "async":
                self._collect(await process(inputs))
            elif kind == "gen":
                for output in process(inputs):
                    await self._collect_streaming(output)
                    if self.is_root and self.worker._draining:
                        return  # a draining source stops producing
            else:
                async for output in process(inputs):
                    await self._collect_streaming(output)
                    if self.is_root and self.worker._draining:
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
        if any(len(items) >= self.batch_size for items in self.buffers.values()):
            await self._route_outputs()

    async def _append_streaming(self, port: str, item: Any) -> None:
        buffer = self.buffers[port]
        buffer.append(item)
        if len(buffer) >= self.batch_size:
            await self._route_outputs()

    # -- routing -----------------------------------------------------------
    async def _route_outputs(self) -> None:
        buffers = self.buffers
        full: list[_Pending | _ResultPending] = []
        batch_size = self.batch_size
        dirty = self.dirty
        for port, items in buffers.items():
            if not items:
                continue
            buffers[port] = []
            self.stats.items_out += len(items)
            routes = self.routes[port]
            if not routes:
                pending_result = self.results[port]
                if not pending_result.dirty:
                    pending_result.dirty = True
                    dirty.append(pending_result)
                pending_result.items.extend(items)
                if len(pending_result.items) >= batch_size:
                    full.append(pending_result)
                continue
            owned = len(routes) == 1
            for route in routes:
                self._route(route, items, owned, full)
        for pending in full:
            if len(pending.items) >= batch_size:
                await self._flush(pending)
        if self.dirty and time.monotonic() - self.last_flush >= self.max_delay:
            await self._flush_all()

    def _route(self, route: _Route, items: list[Any], owned: bool, full: list[_Pending | _ResultPending]) -> None:
        kind = route.kind
        batch_size = self.batch_size
        dirty = self.dirty
        if kind == _SINGLE:
            pending = route.pendings[0]
            if not pending.dirty:
                pending.dirty = True
                dirty.append(pending)
            if not pending.items:
                pending.items = items if owned else list(items)
            else:
                pending.items.extend(items)
            if len(pending.items) >= batch_size:
                full.append(pending)
            return
        pendings = route.pendings
        if kind == _ROUND_ROBIN:
            # Deal the items out like cards, starting where the last batch stopped.
            count = len(pendings)
            start = route.next
            route.next = (start + len(items)) % count
            touched = []
            for offset in range(min(count, len(items))):
                pending = pendings[(start + offset) % count]
                if not pending.dirty:
                    pending.dirty = True
                    dirty.append(pending)
                pending.items.extend(items[offset::count])
                touched.append(pending)
        elif kind == _ALL:
            touched = pendings
            for pending in pendings:
                if not pending.dirty:
                    pending.dirty = True
                    dirty.append(pending)
                pending.items.extend(items)
        else:
            grouping = route.key
            assert grouping is not None
            count = len(pendings)
            touched = pendings
            for item in items:
                try:
                    key = grouping.key_of(item)
                except Exception as exc:
                    raise GraphError(
                        f"PE {self.ref.pe} cannot route item {item!r} to {route.label}: its {grouping}"
                        f" key failed ({type(exc).__name__}: {exc})"
                    ) from exc
                pending = pendings[stable_hash(key) % count] if count > 1 else pendings[0]
                if not pending.dirty:
                    pending.dirty = True
                    dirty.append(pending)
                pending.items.append(item)
        for pending in touched:
            if len(pending.items) >= batch_size:
                full.append(pending)

    async def _flush(self, pending: _Pending | _ResultPending) -> None:
        items = pending.items
        if not items:
            return
        pending.items = []
        batch_size = self.batch_size
        chunks = (
            [items]
            if len(items) <= batch_size
            else [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        )
        for chunk in chunks:
            if isinstance(pending, _ResultPending):
                await self.worker.results.emit(pending.pe, pending.port, chunk)
                continue
            channel = pending.channel
            if channel.credits > 0:
                await channel.send(pending.port, chunk)
            else:
                started = time.perf_counter()
                await channel.send(pending.port, chunk)
                self.stats.blocked_seconds += time.perf_counter() - started

    async def _flush_all(self) -> None:
        dirty, self.dirty = self.dirty, []
        for pending in dirty:
            pending.dirty = False
            await self._flush(pending)
        self.last_flush = time.monotonic()


def _ignoring_argument(fn: Callable[[], Any]) -> Callable[[Any], Any]:
    if inspect.iscoroutinefunction(fn):

        async def call_async(_: Any) -> Any:
            return await fn()

        return call_async
    return lambda _: fn()


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

    Instance 0 of a PE is the plan's PE object itself (as in dispel4py, so
    its state can be inspected after a run); further instances are deep
    copies. Two concurrent runs of one graph therefore share PE objects:
    build a graph per run to run it several times at once.
    """

    def __init__(
        self,
        plan: ExecutionPlan,
        worker_id: int = 0,
        *,
        feeds: Mapping[str, Feed],
        results: ResultSink,
        peers: Mapping[int, Comm] | None = None,
        max_delay: float = 0.005,
    ) -> None:
        self.plan = plan
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
        self._build()

    # -- construction ------------------------------------------------------
    def _build(self) -> None:
        plan, me = self.plan, self.worker_id
        credits = plan.options.credits
        local = plan.instances(me)
        inboxes = {ref: Inbox() for ref in local}
        senders: dict[tuple[InstanceRef, InstanceRef], SenderChannel] = {}
        for spec in plan.channels:
            if spec.dest_worker == me and spec.source_worker == me:
                senders[(spec.source, spec.dest)] = LocalChannel(inboxes[spec.dest], credits)
            elif spec.source_worker == me:
                link = self._link(spec.dest_worker)
                senders[(spec.source, spec.dest)] = RemoteChannel(link, spec.channel_id, credits)
            elif spec.dest_worker == me:
                self._link(spec.source_worker).add_receiver(spec.channel_id, inboxes[spec.dest])

        for ref in local:
            pe = self._instance_pe(ref)
            expected = len(plan.channels_into(ref))
            is_root = plan.placement[ref.pe].is_root
            actor = _Actor(self, ref, pe, inboxes[ref], expected + is_root)
            actor.stats.inflight_bound = (expected + is_root) * credits * plan.options.batch_size
            if is_root:
                self._feed_channels[ref] = LocalChannel(inboxes[ref], credits)
            for port in plan.result_ports.get(ref.pe, []):
                actor.results[port] = _ResultPending(ref.pe, port)
            for route in plan.routes[ref.pe]:
                targets = route.targets[ref.index]
                pendings = [_Pending(senders[(ref, InstanceRef(route.dest, t))], route.dest_port) for t in targets]
                grouping = route.grouping
                if isinstance(grouping, GroupBy):
                    kind = _GROUP_BY  # even for one instance: a bad key fails alike on every mapping
                elif len(pendings) == 1:
                    kind = _SINGLE
                elif isinstance(grouping, All):
                    kind = _ALL
                else:
                    kind = _ROUND_ROBIN
                label = f"{route.dest}.{route.dest_port}"
                key = grouping if isinstance(grouping, GroupBy) else None
                route_object = _Route(kind, pendings, key, label, ref.index)
                actor.add_route(route.source_port, route_object)
            actor.outgoing = [senders[(ref, spec.dest)] for spec in plan.channels_from(ref)]
            if self.recorder is not None:
                actor.recorder = self.recorder.attach(actor)
            self.actors[ref] = actor

    def _link(self, peer: int) -> PeerLink:
        try:
            return self.links[peer]
        except KeyError:
            raise Aiod4pError(f"worker {self.worker_id} has no comm to worker {peer}") from None

    def _instance_pe(self, ref: InstanceRef) -> PE:
        template = self.plan.pes[ref.pe]
        if ref.index == 0 and not any(a.pe is template for a in self.actors.values()):
            return template
        try:
            return copy.deepcopy(template)
        except Exception as exc:
            raise GraphError(f"PE {ref.pe} cannot be copied for instance {ref.index}: {exc}") from exc

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

    def _add_stopper(self, drain: Any, reader: asyncio.Task[None]) -> None:
        stop = drain if callable(drain) else reader.cancel
        self._stoppers.append(stop)
        if self._draining:
            stop()

    @property
    def stats(self) -> list[InstanceStats]:
        return [actor.stats for actor in self.actors.values()]

    async def run(self) -> list[InstanceStats]:
        """Run every local instance to completion and return their statistics.

        Raises:
            PEError: a PE raised; every task of this worker has been cancelled.
            TransportError: a comm to another worker failed.
        """
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
            for task in everything:
                task.cancel()
            await asyncio.gather(*everything, return_exceptions=True)
            raise
        finally:
            for link in self.links.values():
                await link.comm.aclose()
        return self.stats

    def _feed_share(self, ref: InstanceRef) -> Feed:
        """The part of its PE's feed that instance ``ref`` consumes."""
        feed = self.feeds.get(ref.pe, 0)
        parallelism = self.plan.placement[ref.pe].parallelism
        if isinstance(feed, int) and not isinstance(feed, bool):
            return feed // parallelism + (ref.index < feed % parallelism)
        return feed if ref.index == 0 else 0

    async def _feed(self, ref: InstanceRef, channel: LocalChannel, feed: Feed) -> None:
        pe = self.plan.pes[ref.pe]
        batch_size = self.plan.options.batch_size
        timed = _TimedChannel(channel, self.actors[ref].stats)
        try:
            if isinstance(feed, bool) or not isinstance(feed, (int, Iterable, AsyncIterable)):
                raise InputError(f"the input of PE {ref.pe} must be a count or an iterable, not {feed!r}")
            if isinstance(feed, int):
                ignores_elements = not pe.inputs and self.actors[ref].fn is not None
                remaining = max(feed, 0)
                while remaining and not self._draining:
                    count = min(batch_size, remaining)
                    await timed.send(None, [None] * count if ignores_elements else [{} for _ in range(count)])
                    remaining -= count
            elif isinstance(feed, AsyncIterable):
                await self._feed_async(pe, timed, feed)
            else:
                iterator = iter(feed)
                while not self._draining:
                    chunk = [_input_dict(pe, ref.pe, e) for e in itertools.islice(iterator, batch_size)]
                    if not chunk:
                        break
                    await timed.send(None, chunk)
        except Aiod4pError:
            raise
        except Exception as exc:
            raise _error(ref, "feed", exc) from exc
        finally:
            timed.close()

    async def _feed_async(self, pe: PE, channel: _TimedChannel, feed: AsyncIterable[Any]) -> None:
        # Read ahead while the channel has no credit, so batches grow under
        # load and stay small (low latency) when the workflow is idle.
        ahead = _ReadAhead(feed, self.plan.options.batch_size, lambda e: _input_dict(pe, pe.label, e), "feed")
        self._add_stopper(getattr(feed, "drain", None), ahead.reader)
        try:
            while (chunk := await ahead.take()) is not None:
                await channel.send(None, chunk)
        finally:
            await ahead.aclose()


class _ReadAhead:
    """Pulls an async iterable in its own task, up to ``limit`` items ahead of the consumer.

    ``None`` values are skipped. Cancelling :attr:`reader` ends the stream
    after the items already read (a drain); :meth:`take` re-raises the
    source's own errors.
    """

    def __init__(self, source: AsyncIterable[Any], limit: int, convert: Callable[[Any], Any], name: str) -> None:
        self._source = source
        self._limit = limit
        self._convert = convert
        self._buffer: list[Any] = []
        self._ready, self._room = asyncio.Event(), asyncio.Event()
        self._finished = False
        self.reader = asyncio.create_task(self._read(), name=name)
        # Cancelled before its first step, the reader never runs its finally: end the stream anyway.
        self.reader.add_done_callback(lambda _: self._ready.set())

    async def _read(self) -> None:
        try:
            async for value in self._source:
                if value is None:
                    continue
                self._buffer.append(self._convert(value))
                self._ready.set()
                while len(self._buffer) >= self._limit:
                    self._room.clear()
                    await self._room.wait()
        finally:
            self._finished = True
            self._ready.set()

    def ready(self) -> bool:
        """Whether :meth:`take` would return at once."""
        return bool(self._buffer) or self._finished

    async def take(self) -> list[Any] | None:
        """The next items read (at most ``limit``), or ``None`` at the end of the source."""
        while not self._buffer:
            if self._finished or self.reader.done():
                if not self.reader.cancelled():
                    await self.reader  # re-raises the source's own error
                return None
            self._ready.clear()
            await self._ready.wait()
        chunk = self._buffer[: self._limit]
        del self._buffer[: self._limit]
        self._room.set()
        return chunk

    async def aclose(self) -> None:
        """Stop reading; idempotent."""
        if not self.reader.done():
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


class _TimedChannel:
    """A feed's channel that records its waits for credit in the root's statistics."""

    __slots__ = ("_channel", "_stats")

    def __init__(self, channel: LocalChannel, stats: InstanceStats) -> None:
        self._channel = channel
        self._stats = stats

    async def send(self, port: str | None, items: list[Any]) -> None:
        if self._channel.credits > 0:
            return await self._channel.send(port, items)
        started = time.perf_counter()
        await self._channel.send(port, items)
        self._stats.feed_blocked_seconds += time.perf_counter() - started

    def close(self) -> None:
        self._channel.close()


def _input_dict(pe: PE, pe_id: str, element: Any) -> dict[str, Any]:
    if isinstance(element, dict) and element.keys() <= pe.inputs.keys():
        return element
    if len(pe.inputs) == 1:
        return {next(iter(pe.inputs)): element}
    ports = sorted(pe.inputs) or "none"
    raise InputError(f"input for PE {pe_id} must be a dict of its input ports (ports: {ports}), got {element!r}")


async def _supervise(primary: list[asyncio.Task[Any]], secondary: list[asyncio.Task[Any]]) -> None:
    """Wait until every primary task is done; raise the first failure of any task."""
    watched = set(primary) | set(secondary)
    while any(not task.done() for task in primary):
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        watched -= done
