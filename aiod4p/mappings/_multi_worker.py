"""The multi mapping's worker process: one event loop running the engine.

The parent and each worker talk over a control comm (a pipe comm). Parent to
worker: ``("drain",)``, ``("feed", pe, elements)``, ``("feed_end", pe)``.
Worker to parent: ``("r", pe, port, items)`` results, ``("s", stats)`` live
statistics, ``("c", pe)`` a feed chunk was taken (a credit for the parent's
pump), and finally ``("done", stats)`` or ``("error", exception)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import reprlib
import signal
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

from .._api import loop_factory
from .._engine import Feed, Worker
from .._loading import import_file
from .._plan import ExecutionPlan
from ..errors import Aiod4pError, EndOfChannel, PeerDied, TransportError
from ..transports import Comm
from ..transports.pipes import PipeComm, UnpicklableMessage, open_pipe_comm

__all__ = ["PUMPED", "serve", "worker_main"]

logger = logging.getLogger("aiod4p.multi")

PUMPED = "<pumped by the parent>"  # a feed the parent sends chunk by chunk


def worker_main(*args: Any) -> None:
    """The target of a worker process: run its share of the plan, report, exit."""
    wid, plan, feeds, preload, control, peers, inherited, max_delay, interval = args
    # Ctrl-C reaches the whole process group: the parent alone decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)  # a forked child must not poke the parent's event loop
    for sock in inherited:
        sock.close()
    with asyncio.Runner(loop_factory=loop_factory(True)) as runner:
        runner.run(_serve(wid, plan, feeds, preload, control, peers, max_delay, interval))


async def _serve(
    wid: int,
    plan_data: ExecutionPlan | bytes,
    feeds_data: Mapping[str, Feed] | bytes,
    preload: list[tuple[str, str]],
    control_sock: socket.socket,
    peer_socks: dict[int, socket.socket],
    max_delay: float,
    interval: float,
) -> None:
    control = await open_pipe_comm(control_sock)
    peers: dict[int, PipeComm] = {}
    try:
        for peer, sock in peer_socks.items():
            peers[peer] = await open_pipe_comm(sock)
        await serve(wid, plan_data, feeds_data, preload, control, peers, max_delay, interval)
    finally:
        for comm in peers.values():
            comm.abort()
        for sock in peer_socks.values():
            sock.close()


async def serve(
    wid: int,
    plan_data: ExecutionPlan | bytes,
    feeds_data: Mapping[str, Feed] | bytes,
    preload: list[tuple[str, str]],
    control: Comm,
    peers: Mapping[int, Comm],
    max_delay: float,
    interval: float,
) -> None:
    """Run worker ``wid``'s share of the plan, obeying and reporting to ``control``, joined to ``peers``.

    Returns once the parent closed ``control`` (after this worker's "done" or "error").
    """
    tasks: list[asyncio.Task[Any]] = []
    listener: asyncio.Task[None] | None = None
    try:
        _preload(preload)
        plan = plan_data if isinstance(plan_data, ExecutionPlan) else pickle.loads(plan_data)
        shipped = feeds_data if not isinstance(feeds_data, bytes) else pickle.loads(feeds_data)
        pumped = {pe: _PumpedFeed(pe, control) for pe, feed in shipped.items() if _is_pumped(feed)}
        feeds = {pe: pumped.get(pe, feed) for pe, feed in shipped.items()}
        worker = Worker(plan, wid, feeds=feeds, results=_ControlSink(control), peers=peers, max_delay=max_delay)
        running = asyncio.create_task(worker.run(), name=f"worker {wid}")
        listener = asyncio.create_task(_listen(control, worker, pumped), name=f"worker {wid} listener")
        reporter = asyncio.create_task(_report(control, worker, interval))
        tasks = [running, reporter]
        await asyncio.wait({running, listener}, return_when=asyncio.FIRST_COMPLETED)
        reporter.cancel()
        if not running.done():
            listener.result()  # raises PeerDied: the parent vanished
            raise PeerDied("the parent closed the control comm before the run finished")
        try:
            stats = running.result()
        except UnpicklableMessage as exc:
            raise _unpicklable_item(plan, wid, exc) from exc
        await control.send(("done", stats))
    except Exception as exc:
        await _report_error(control, wid, exc)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for comm in peers.values():
            comm.abort()
        # Leave only once the parent closes its end: a parent writing (a drain, say)
        # to a closed socket would lose what this worker sent and it has not read yet.
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener
        await control.aclose()


def _is_pumped(feed: Feed) -> bool:
    return isinstance(feed, str) and feed == PUMPED


def _preload(modules: list[tuple[str, str]]) -> None:
    """Import modules the parent loaded from files (a CLI target), under their names."""
    for name, path in modules:
        if name in sys.modules:
            continue
        try:
            import_file(name, path)
        except ImportError as exc:
            raise Aiod4pError(f"{exc} in a worker process") from exc


async def _report_error(control: Comm, wid: int, exc: BaseException) -> None:
    if not isinstance(exc, Aiod4pError):
        logger.error("worker %d failed", wid, exc_info=exc)
        exc = Aiod4pError(f"worker {wid} failed: {type(exc).__name__}: {exc}")
    try:
        pickle.dumps(exc)
    except Exception:
        exc = Aiod4pError(str(exc))
    with contextlib.suppress(TransportError):
        await control.send(("error", exc))


def _unpicklable_item(plan: ExecutionPlan, wid: int, error: UnpicklableMessage) -> TransportError:
    """Name the PE, port and item behind a batch of link messages that failed to pickle."""
    channels = {spec.channel_id: spec for spec in plan.channels}
    for message in error.message if isinstance(error.message, list) else []:
        if message[0] != "d":
            continue
        for item in message[3]:
            try:
                pickle.dumps(item, protocol=5)
            except Exception as exc:
                spec = channels[message[1]]
                source_port = next(
                    (
                        route.source_port
                        for route in plan.routes[spec.source.pe]
                        if route.dest == spec.dest.pe and route.dest_port == message[2]
                    ),
                    "?",
                )
                return TransportError(
                    f"PE {spec.source} wrote an item on output port {source_port!r} that cannot be pickled to"
                    f" reach {spec.dest.pe}.{message[2]} on worker {spec.dest_worker}: {reprlib.repr(item)}"
                    f" ({type(exc).__name__}: {exc})"
                )
    return TransportError(f"worker {wid}: {error}")


class _ControlSink:
    """Results travel to the parent on the control comm."""

    def __init__(self, control: Comm) -> None:
        self._control = control

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        try:
            await self._control.send(("r", pe, port, items))
        except UnpicklableMessage as exc:
            culprit = next((item for item in items if not _picklable(item)), None)
            raise TransportError(
                f"PE {pe} wrote a result on output port {port!r} that cannot be pickled to reach the parent"
                f" process: {reprlib.repr(culprit)} ({exc.__cause__})"
            ) from exc


def _picklable(item: Any) -> bool:
    try:
        pickle.dumps(item, protocol=5)
    except Exception:
        return False
    return True


class _PumpedFeed:
    """A root's input arriving from the parent in chunks; takes one chunk at a time."""

    def __init__(self, pe: str, control: Comm) -> None:
        self._pe = pe
        self._control = control
        self._chunks: deque[list[Any]] = deque()
        self._ended = False
        self._changed = asyncio.Event()

    def put(self, chunk: list[Any]) -> None:
        self._chunks.append(chunk)
        self._changed.set()

    def end(self) -> None:
        self._ended = True
        self._changed.set()

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            while not self._chunks:
                if self._ended:
                    return
                self._changed.clear()
                await self._changed.wait()
            chunk = self._chunks.popleft()
            await self._control.send(("c", self._pe))
            for element in chunk:
                yield element


async def _listen(control: Comm, worker: Worker, pumped: dict[str, _PumpedFeed]) -> None:
    """Obey the parent until it closes the control comm (its goodbye, after "done" or "error").

    Raises:
        PeerDied: the parent vanished.
    """
    while True:
        try:
            message = await control.receive()
        except EndOfChannel:
            return
        kind = message[0]
        if kind == "feed":
            pumped[message[1]].put(message[2])
        elif kind == "feed_end":
            pumped[message[1]].end()
        elif kind == "drain":
            worker.drain()
            for feed in pumped.values():
                feed.end()
        else:
            raise PeerDied(f"unexpected control message {kind!r} from the parent")


async def _report(control: Comm, worker: Worker, interval: float) -> None:
    """Send the live statistics to the parent every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        await control.send(("s", worker.stats))
