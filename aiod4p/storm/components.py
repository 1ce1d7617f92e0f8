"""The spout and bolt that host a PE inside Storm, speaking multilang through pystorm.

A generated project has one subclass per component (``src/aiod4p_components.py``),
which sets :attr:`HostedComponent.component` and streamparse's ``outputs``;
Storm starts it as ``streamparse_run aiod4p_components.<Name>``. At start-up
the component reads the topology spec (``aiod4p_topology.json``) and the
pickled PEs (``aiod4p_pes.pickle``) next to that module, takes the PE of its
component, and runs its ``preprocess``. The PE is called by the core engine's
invoker, as the engine's actors call theirs (one instance per Storm task,
numbered 0..tasks-1 by task id), so every calling convention (plain,
``async def``, generators, ``write``) works as in the other mappings; Storm
does the routing.

Bolt: for each tuple, the PE processes the item; its outputs are emitted,
anchored to the tuple, on the streams of their ports, then the tuple is
acked. If the PE raises (or writes an item that cannot cross Storm), nothing
is emitted, the error is logged and reported to Storm, the tuple is failed,
and the bolt goes on with the next tuple. Once the end-of-stream markers of
every upstream task have arrived, ``postprocess`` runs, its outputs are
emitted, and the bolt sends its own marker downstream.

Spout: the root PE runs in the core engine (a :class:`aiod4p._engine.Worker`
on a background thread) over the feed stored in the spec; ``next_tuple``
emits what it has produced, each tuple with a message id. A failed tuple is
replayed with the same id, at most ``max_replays`` times (then it is dropped
and an error is reported): at-least-once delivery. When the feed is exhausted
and every tuple is acked (or dropped), the spout emits its end-of-stream
marker, unreliably. When the root PE fails under a run, the spout reports
the error once every tuple it had emitted is acked (or dropped), so that
their results reach the run first, and sends no marker.

Reporting to a run: when the topology was submitted by ``aiod4p run
--mapping storm`` (:attr:`TopologySpec.report` is set), every task opens
one TCP connection back to that process and writes JSON lines on it: a
``hello`` naming its component, task index and pid; the results its PE
writes to unconnected ports (``r``, written before the input tuple is
acked); errors (``e``: a PE that raised on a tuple, which Storm then fails
and replays, or a fatal one: a root PE or ``postprocess`` that raised, a
tuple dropped after its last replay); and ``d`` once the task has sent its
end-of-stream marker. A task its Storm worker stops (SIGTERM, or its stdin
closing: the worker shuts down, as when another of its tasks died) writes
``x`` before it exits. A connection that closes before ``d`` means the
task's process died; without ``x``, of its own accord. When the topology is deactivated, the spouts stop their PEs
(the engine's drain), emit what was already produced (as tuples are acked,
at most ``topology.max.spout.pending`` in flight), and finish their
stream as if the input had ended.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import pickle
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

from .._engine import Invoker, Worker
from .._graph import FlatGraph
from .._pe import PE, Runtime
from .._plan import InstanceRef, PlanOptions, make_plan
from ..errors import Aiod4pError, PEError, TargetError, TransportError
from ._run import ERROR_KINDS, LINE_LIMIT
from ._spec import EOS_STREAM, PES_FILE, SPEC_FILE, ComponentSpec, TopologySpec
from ._wire import WireError, decode, encode, encode_key

warnings.filterwarnings("ignore", message="Cannot import msgpack", category=ImportWarning)

from pystorm.component import LogStream  # noqa: E402
from streamparse import Bolt, Spout  # noqa: E402

__all__ = ["HostedComponent", "PEBolt", "PESpout"]

pe_logger = logging.getLogger("aiod4p.pe")


class _Loaded:
    """What a component reads at start-up: its spec (``topology``), its PE and the key functions of its streams,
    each unpickled alone (so importing only what they need: not every PE's modules).

    Raises:
        TargetError: the PEs cannot be unpickled here (``where``, e.g. "the Storm task of PE Read0[0]"): a module
            defining them, or one such a module imports, is not importable on this Storm worker.
    """

    def __init__(self, directory: Path, topology: TopologySpec, name: str, where: str) -> None:
        self.topology = topology
        self.spec: ComponentSpec = topology.component(name)
        if topology.dispel4py:
            from .. import compat

            compat.install()
        keys = {key.function for stream in self.spec.streams for key in stream.keys if key.function is not None}
        try:
            with open(directory / PES_FILE, "rb") as handle:
                stored = pickle.load(handle)
            self.pe: PE = pickle.loads(stored["pes"][name])
            self.functions: dict[str, Callable[[Any], Any]] = {
                key: pickle.loads(stored["functions"][key]) for key in keys
            }
        except Exception as exc:
            raise TargetError(
                f"{where} cannot load the workflow ({type(exc).__name__}: {exc}); its PE classes, and the modules"
                " they import, must be importable on the Storm workers"
            ) from exc


_LEAVING_SECONDS = 1.0
"""How long a task its worker stopped tries to tell the run so before it exits anyway."""


class Reporter:
    """One task's connection to the run that submitted the topology (JSON lines; see the module docstring)."""

    def __init__(self, address: str, hello: dict[str, Any]) -> None:
        host, _, port = address.rpartition(":")
        try:
            self.socket = socket.create_connection((host, int(port)), timeout=30)
        except OSError as exc:
            raise Aiod4pError(f"cannot reach the run that submitted this topology at {address}: {exc}") from exc
        self.socket.settimeout(None)  # a slow run back-pressures the task
        self._sending = False
        self._leaving: int | None = None  # the exit status, once the task was told to stop
        self.send(hello)

    def send(self, message: dict[str, Any]) -> None:
        self.send_line(json.dumps(message, separators=(",", ":")))

    def send_line(self, line: str) -> None:
        """Send one message already in JSON (ASCII, no newline)."""
        self._sending = True
        try:
            self.socket.sendall(line.encode() + b"\n")
        finally:
            self._sending = False
            if self._leaving is not None:  # told to stop meanwhile: whether this message went or not
                self.leave(self._leaving)

    def leave(self, status: int) -> None:
        """Say that this task was stopped by its Storm worker (``x``), then exit the process with ``status``.

        Called in the middle of :meth:`send` (by a signal handler), it returns, and that call leaves once its
        message is whole.
        """
        self._leaving = status
        if self._sending:
            return
        with contextlib.suppress(OSError):
            self.socket.settimeout(_LEAVING_SECONDS)  # a run that reads no more must not keep this task alive
            self.socket.sendall(b'{"t":"x"}\n')
        os._exit(status)

    def gone(self) -> bool:
        """Whether the run closed its end (it never writes: readable means closed)."""
        readable, _, _ = select.select([self.socket], [], [], 0)
        if not readable:
            return False
        try:
            return self.socket.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def error_message(exc: BaseException, fatal: bool) -> dict[str, Any]:
    """The ``e`` message describing ``exc`` (enough to raise the same error in the run)."""
    if isinstance(exc, PEError):
        where = {"pe": exc.pe, "instance": exc.instance, "port": exc.port, "traceback": exc.traceback_text}
        return {"t": "e", "fatal": fatal, "kind": "PEError", "message": exc.message, **where}
    kind = next((name for name, kind in ERROR_KINDS.items() if isinstance(exc, kind)), "Aiod4pError")
    detail = "".join(traceback.format_exception(exc)) if not isinstance(exc, Aiod4pError) else ""
    return {"t": "e", "fatal": fatal, "kind": kind, "message": str(exc) or type(exc).__name__, "traceback": detail}


class HostedComponent:
    """What spouts and bolts share: loading, the PE instance, and emitting items.

    Attributes:
        component: the component (PE id) this class hosts; set by the generated subclass.
    """

    component: ClassVar[str] = ""

    loaded: _Loaded
    index: int
    tasks: int  # how many tasks run this component
    reporter: Reporter | None
    sources: dict[str, str]  # the modules (and packages) copied into the project, by path here: their paths there
    logger: logging.Logger  # pystorm's, set up before initialize()

    def _host(self, context: dict[str, Any]) -> None:
        """Load this task's PE, find its instance index, and connect to the run that submitted the topology."""
        # PE logs and print() go to Storm's log at pystorm's level; print() must not corrupt the protocol.
        logging.getLogger("aiod4p").setLevel(self.logger.level or logging.INFO)
        sys.stdout = LogStream(logging.getLogger("aiod4p.stdout"))
        directory = Path(sys.modules[type(self).__module__].__file__ or ".").resolve().parent
        topology = TopologySpec.from_json(json.loads((directory / SPEC_FILE).read_text()))
        self.sources = {}
        for name, original in topology.sources.items():
            if original.endswith(".py"):
                self.sources[str(directory / f"{name}.py")] = original
            else:  # a package: the path of every file under it
                self.sources[str(directory / name) + os.sep] = original + os.sep
        tasks = sorted(int(task) for task, name in context["task->component"].items() if name == self.component)
        self.index = tasks.index(int(context["taskid"]))
        self.tasks = len(tasks)
        self.reporter = None
        if topology.report:
            hello = {"t": "hello", "token": topology.token, "pe": self.component, "task": self.index}
            self.reporter = Reporter(topology.report, {**hello, "pid": os.getpid()})
            # Storm's worker stops its tasks with SIGTERM when it shuts down (another of its tasks died, or the
            # topology was killed): the run then knows this task did not die of its own accord.
            signal.signal(signal.SIGTERM, self._terminated)
        # Connected first, so that a run hears why a task cannot load its PE (Storm would restart it until the
        # run's start timeout, and report only that its process exited).
        try:
            self.loaded = _Loaded(
                directory, topology, self.component, f"the Storm task of PE {self.component}[{self.index}]"
            )
        except TargetError as exc:
            self._report_error(exc, fatal=True)
            raise
        self.loaded.pe._parallelism = self.tasks  # not its parallelism: a dispel4py PE may keep data there

    def _terminated(self, signum: int, frame: object) -> None:
        if self.reporter is None:  # the run went away (_orphaned): nobody to tell
            os._exit(128 + signum)
        self.reporter.leave(128 + signum)

    def _exit(self, status_code: int) -> None:
        """pystorm's exit; its status 2 means Storm's worker went away (stdin closed), which the run is told: it
        is not this task's own failure."""
        if status_code == 2 and self.reporter is not None:
            self.reporter.leave(status_code)
        super()._exit(status_code)  # type: ignore[misc]

    def _report_error(self, exc: BaseException, fatal: bool) -> None:
        """Tell the run about ``exc``, naming the workflow's own files where it names the copies this task ran."""
        if self.reporter is None:
            return
        message = error_message(exc, fatal)
        for key in ("message", "traceback"):
            for copy, original in self.sources.items():
                message[key] = message[key].replace(copy, original)
        self.reporter.send(message)

    def _finished(self) -> None:
        """Tell the run that this task has sent its end-of-stream marker."""
        if self.reporter is not None:
            self.reporter.send({"t": "d"})

    def _reported(self, port: str) -> bool:
        """Whether items written to ``port`` are results to send to the run (not Storm tuples)."""
        return self.reporter is not None and port in self.loaded.spec.results

    def _report_results(self, port: str, items: list[Any]) -> None:
        """Send ``items``, written to the result port ``port``, to the run: in as few lines as
        :data:`~aiod4p.storm._run.LINE_LIMIT` allows, and none unless every item fits in one.

        Raises:
            TransportError: an item can neither be JSON nor be pickled, or is longer than a line may be.
        """
        assert self.reporter is not None
        where = f"PE {self.component}[{self.index}] wrote a result to output port {port!r}"
        try:
            wire = [json.dumps(encode(item), separators=(",", ":")) for item in items]
        except WireError as exc:
            raise TransportError(f"{where} that cannot cross Storm: {exc}") from exc
        head, tail = f'{{"t":"r","port":{json.dumps(port)},"items":[', "]}"
        room = LINE_LIMIT - len(head) - len(tail) - 1  # the newline
        for text in wire:
            if len(text) > room:
                raise TransportError(
                    f"{where} of {len(text)} bytes on the wire, over the {room} bytes a result may have on its way"
                    " back to the run"
                )
        line: list[str] = []
        size = -1  # the length of ",".join(line)
        for text in wire:
            if line and size + 1 + len(text) > room:
                self.reporter.send_line(head + ",".join(line) + tail)
                line, size = [], -1
            line.append(text)
            size += 1 + len(text)
        self.reporter.send_line(head + ",".join(line) + tail)

    def _tuples(self, port: str, items: list[Any]) -> list[tuple[str, list[Any]]]:
        """The ``(stream, values)`` to emit for ``items`` written to ``port``.

        Raises:
            TransportError: an item can neither be JSON nor be pickled, or its grouping key cannot be hashed.
        """
        out = []
        streams = self.loaded.spec.streams_of(port)
        for item in items:
            try:
                wire = encode(item)
                for stream in streams:
                    values = [wire]
                    for key in stream.keys:
                        if key.function is not None:
                            values.append(encode_key(self.loaded.functions[key.function](item)))
                        else:
                            assert key.index is not None
                            values.append(encode_key(item[key.index]))
                    out.append((stream.name, values))
            except (WireError, LookupError, TypeError) as exc:
                raise TransportError(
                    f"PE {self.component}[{self.index}] wrote an item to output port {port!r} that cannot cross"
                    f" Storm: {exc}"
                ) from exc
        return out


class PEBolt(HostedComponent, Bolt):  # type: ignore[misc]
    """A bolt hosting one PE instance per task; see the module docstring."""

    auto_ack = False  # process() acks, or fails the tuple when its PE raised
    auto_anchor = True
    # Any other exception (the protocol broke: Storm's worker died) ends this process.
    exit_on_exception = True

    def initialize(self, storm_conf: dict[str, Any], context: dict[str, Any]) -> None:
        self._host(context)
        # The outputs of one call stay in the invoker's buffers until the bolt emits them.
        self.invoker = Invoker(InstanceRef(self.component, self.index), self.loaded.pe)
        try:
            self._start(context)
        except Exception as exc:
            self._report_error(exc, fatal=True)
            raise

    def _start(self, context: dict[str, Any]) -> None:
        spec = self.loaded.spec
        self.ports = {(i.source, i.stream): i.port for i in spec.inputs if i.stream != EOS_STREAM}
        upstream = set(spec.upstream)
        self.expected_eos = {int(t) for t, name in context["task->component"].items() if name in upstream}
        self.eos_seen: set[int] = set()
        self.finished = False
        self.runner = asyncio.Runner()
        invoker = self.invoker
        # A plain or generator PE never awaits: its calls complete without an event loop turn.
        self.plain = (invoker.fn_kind if invoker.fn is not None else invoker.process_kind) in ("sync", "gen")
        pe = invoker.pe
        pe._runtime = Runtime(
            invoker.buffers,
            self.index,
            logging.LoggerAdapter(pe_logger, {"pe": self.component, "instance": self.index}),
            rank=int(context["taskid"]),  # unique in the topology
        )
        self.runner.run(invoker.lifecycle("preprocess"))
        self._emit_buffers(None)

    def process(self, tup: Any) -> None:
        try:
            self._process(tup)
        except Aiod4pError as exc:  # the PE raised, or wrote what cannot cross: fail the tuple, go on
            self.logger.error("Exception in %s.run()", type(self).__name__, exc_info=True)
            # The spout replays the tuple; an item that cannot cross would fail every replay alike.
            self._report_error(exc, fatal=isinstance(exc, TransportError))
            self.raise_exception(exc, tup)
            self.fail(tup)
            return
        self.ack(tup)

    def _process(self, tup: Any) -> None:
        if tup.stream == EOS_STREAM:
            self._end_of_stream(tup)
            return
        port = self.ports.get((tup.component, tup.stream))
        if port is None:
            raise TransportError(
                f"PE {self.component} received a tuple from {tup.component}:{tup.stream},"
                " which it does not subscribe to"
            )
        call = self._call(port, decode(tup.values[0]))
        if self.plain:
            _complete(call)
        else:
            self.runner.run(call)
        self._emit_buffers(tup)

    async def _call(self, port: str, item: Any) -> None:
        try:
            await self.invoker.call(port, [item])
        except Exception:
            self._clear()
            raise

    def _clear(self) -> None:
        buffers = self.invoker.buffers
        for port in buffers:
            buffers[port] = []

    def _emit_buffers(self, anchor: Any) -> None:
        """Emit everything the PE wrote, anchored to ``anchor``; nothing if an item cannot cross."""
        buffers = self.invoker.buffers
        try:
            written = [(port, items) for port, items in buffers.items() if items]
            pending = [self._tuples(port, items) for port, items in written if not self._reported(port)]
            for port, items in written:
                if self._reported(port):
                    self._report_results(port, items)
        finally:
            self._clear()
        anchors = [anchor] if anchor is not None else None
        for tuples in pending:
            for stream, values in tuples:
                self.emit(values, stream=stream, anchors=anchors)

    def _end_of_stream(self, tup: Any) -> None:
        self.eos_seen.add(int(tup.task))
        if self.finished or not self.expected_eos <= self.eos_seen:
            return
        self.finished = True
        try:
            self.runner.run(self.invoker.lifecycle("postprocess"))
            self._emit_buffers(tup)
        except Exception as exc:
            self._clear()
            self.logger.error("postprocess of PE %s failed: %s", self.component, exc)
            self._report_error(exc, fatal=True)
            self.raise_exception(exc, tup)
        self.emit([self.component], stream=EOS_STREAM, anchors=[tup])
        self._finished()


def _complete(call: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends, without an event loop."""
    try:
        call.send(None)
    except StopIteration:
        return
    call.close()
    raise RuntimeError("a plain PE call suspended; it needs an event loop")


_DONE = object()


class _QueueSink:
    """The spout's result sink: hands the engine's output batches to Storm's thread."""

    def __init__(self, size: int) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(size)

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        self.queue.put((port, items))  # blocks the engine's loop: back-pressure from Storm


class PESpout(HostedComponent, Spout):  # type: ignore[misc]
    """A spout running a root PE over its feed; see the module docstring."""

    wait_seconds = 0.05  # the longest next_tuple waits for the engine when it has nothing ready
    kill_retry_seconds = 5.0
    """How often an orphaned spout whose kill Nimbus did not take tries again (topology option
    ``aiod4p.kill_retry_secs``)."""

    def initialize(self, storm_conf: dict[str, Any], context: dict[str, Any]) -> None:
        self.storm_conf = storm_conf
        self.max_replays = int(storm_conf.get("aiod4p.max_replays", -1))
        self.kill_retry_seconds = float(storm_conf.get("aiod4p.kill_retry_secs", self.kill_retry_seconds))
        self.sink = _QueueSink(16)
        self._host(context)
        self.worker = self._worker()
        if self.max_replays < 0:
            self.max_replays = self.loaded.topology.max_replays
        # Storm fails a tuple whose tree is not acked within this: its first emission may still be under way.
        self.message_timeout = float(storm_conf.get("topology.message.timeout.secs", 30))
        self.pending: dict[int, list[Any]] = {}  # id -> [stream, values, attempts, when last emitted]
        self.next_id = 0
        # Once deactivated (a run's drain), Storm calls next_tuple no more, so it no longer bounds the tuples in flight:
        # what the PE had produced waits here, and leaves as tuples are acked, at most max_pending in flight.
        self.max_pending = int(storm_conf.get("topology.max.spout.pending") or 0)  # 0: unbounded
        self.held: collections.deque[tuple[str, list[Any]]] = collections.deque()
        self.draining = False
        self.produced = False
        self.eos_sent = False
        # What fails a run: the root's error waits here until the tuples emitted before it are processed (acked or
        # dropped), then is said; a tuple dropped or timed out is said at once. Either way no end of stream follows.
        self.failure: BaseException | None = None
        self.failure_said = False
        self.kill_again: float | None = None  # orphaned, and Nimbus did not take the kill: when to try again
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._produce, name="aiod4p engine", daemon=True)
        self.thread.start()

    def _worker(self) -> Worker:
        """The engine worker running this task's instance of the root PE over its share of the feed."""
        pe = self.loaded.pe
        plan = make_plan(FlatGraph({self.component: pe}, []), PlanOptions(workers=self.tasks, credits=1))
        feed = self.loaded.topology.feeds.get(self.component, 0)
        feeds = {self.component: feed if isinstance(feed, int) else [decode(element) for element in feed]}
        return Worker(plan, self.index, feeds=feeds, results=self.sink)

    def _produce(self) -> None:
        try:
            self.loop.run_until_complete(self.worker.run())
        except Exception as exc:  # reported to Storm from the spout's thread
            self.sink.queue.put(exc)
        self.sink.queue.put(_DONE)

    def next_tuple(self) -> None:
        if self.kill_again is not None:
            if time.monotonic() >= self.kill_again:
                self._orphaned()
            else:
                time.sleep(self.wait_seconds)
            return
        if self.reporter is not None and self.reporter.gone():
            self._orphaned()
            return
        if not self.produced:
            try:
                entry = self.sink.queue.get(timeout=self.wait_seconds)
            except queue.Empty:
                return
            self._take(entry)
        self._finish_if_done()

    def _orphaned(self) -> None:
        """The run that submitted the topology is gone (killed): nobody will collect results, so kill it. If Nimbus
        does not take the kill, emit nothing more and try again every :attr:`kill_retry_seconds`."""
        from ._cluster import cluster_at, configured_nimbus, kill

        name = str(self.storm_conf.get("topology.name", ""))
        cluster = cluster_at(configured_nimbus(self.storm_conf) or "127.0.0.1", "topology conf")
        if self.kill_again is None:
            self.logger.error("the run that submitted topology %s is gone: killing the topology", name)
        self.reporter = None
        try:
            kill(cluster, name)
        except Exception as exc:
            self.logger.error(
                "could not kill topology %s at %s: %s; trying again in %g s",
                name,
                cluster.address,
                exc,
                self.kill_retry_seconds,
            )
            self.kill_again = time.monotonic() + self.kill_retry_seconds
        else:
            self.kill_again = None

    def deactivate(self) -> None:
        """Under a run, deactivating the topology drains it: the PE stops, what it produced still flows."""
        if self.reporter is None or self.produced:
            return
        self.draining = True
        self.loop.call_soon_threadsafe(self.worker.drain)
        while not self.produced:  # Storm calls next_tuple no more: emit the rest here, and as tuples are acked
            self._take(self.sink.queue.get())
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        """Once the feed is exhausted and every tuple emitted and acked (or dropped), send the end-of-stream marker;
        under a run whose root PE failed, report its error then instead (and no marker: the run fails)."""
        if self.pending or self.held:
            return
        if self.failure is not None:
            if not self.failure_said:
                self.failure_said = True
                self._report(self.failure)
            return
        if self.produced and not self.eos_sent:
            self.eos_sent = True
            self.emit([self.component], stream=EOS_STREAM)
            self._finished()

    def _take(self, entry: Any) -> None:
        if entry is _DONE:
            self.produced = True
            return
        if isinstance(entry, BaseException):
            self._failed(entry)
            return
        if self.failure is not None:
            return  # produced after the error that fails the run: not among its results
        port, items = entry
        if self._reported(port):
            try:
                self._report_results(port, items)
            except TransportError as exc:
                self._failed(exc)
            return
        for item in items:
            try:
                tuples = self._tuples(port, [item])
            except TransportError as exc:
                self._failed(exc)
                if self.failure is not None:
                    break
                continue
            self.held.extend(tuples)
        self._emit_held()

    def _failed(self, exc: BaseException) -> None:
        """The root PE raised, or wrote an item that cannot cross: fatal to a run.

        On its own, the topology reports it to Storm at once and goes on. Under a run, the error is reported once
        the tuples emitted before it have been processed (acked, or dropped after their replays), so that the run
        gets their results before its error, as the other mappings give the results gathered before an error;
        what the PE produces after it is dropped.
        """
        if self.reporter is None:
            self._report(exc)
        elif self.failure is None:
            self.failure = exc
            in_flight = len(self.pending) + len(self.held)
            self.logger.error("%s; told to the run once the %d tuples emitted before it are processed", exc, in_flight)

    def _emit_held(self) -> None:
        """Emit the tuples held back: all of them, or while draining, as long as fewer than ``max_pending`` are in
        flight (a drained spout's backlog all at once timed out behind a slow bolt, failing the run)."""
        while self.held and not (self.draining and 0 < self.max_pending <= len(self.pending)):
            stream, values = self.held.popleft()
            tup_id = self.next_id
            self.next_id += 1
            self.pending[tup_id] = [stream, values, 0, time.monotonic()]
            self.emit(values, tup_id=tup_id, stream=stream)

    def _report(self, exc: BaseException) -> None:
        """Report an error of the root PE, or an item it wrote that cannot cross: fatal to a run."""
        detail = exc.traceback_text if isinstance(exc, PEError) else ""
        message = f"{exc}\n{detail}".rstrip()
        self.logger.error("%s", message)
        self.send_message({"command": "error", "msg": message})
        self._report_error(exc, fatal=True)

    def ack(self, tup_id: Any) -> None:
        self.pending.pop(tup_id, None)
        self._emit_held()
        self._finish_if_done()

    def fail(self, tup_id: Any) -> None:
        entry = self.pending.get(tup_id)
        if entry is None:
            return
        entry[2] += 1
        timed_out = time.monotonic() - entry[3] >= self.message_timeout
        if entry[2] > self.max_replays or (timed_out and self.reporter is not None):
            del self.pending[tup_id]
            if timed_out and self.reporter is not None:
                # A run's results would hold what the first emission still makes downstream, and the replay's too.
                message = (
                    f"PE {self.component}[{self.index}]: tuple {tup_id} on stream {entry[0]!r} was not acked within"
                    f" topology.message.timeout.secs ({self.message_timeout:g} s): Storm replays such a tuple while"
                    " the first is still under way, so the run's results could count it twice, and the run fails"
                    " instead (give it more time: StormMapping(conf={'topology.message.timeout.secs': ...}), or the"
                    " environment's options in config.json)"
                )
            else:
                message = (
                    f"PE {self.component}[{self.index}]: tuple {tup_id} on stream {entry[0]!r} failed"
                    f" {entry[2]} times; dropped after {self.max_replays} replays"
                )
            self.logger.error("%s", message)
            self.send_message({"command": "error", "msg": message})
            if self.reporter is not None:
                if self.failure is not None and not self.failure_said:  # the root's own error, held for these tuples
                    self.failure_said = True
                    self._report(self.failure)
                kind = "timed out" if timed_out else "dropped"
                self.reporter.send({**error_message(Aiod4pError(message), fatal=True), "kind": kind})
                # The run fails: no end of stream, so that no postprocess runs on the data without this tuple.
                self.failure = self.failure or Aiod4pError(message)
                self.failure_said = True
            self._emit_held()
            self._finish_if_done()
            return
        entry[3] = time.monotonic()
        self.emit(entry[1], tup_id=tup_id, stream=entry[0])  # replay: at-least-once
