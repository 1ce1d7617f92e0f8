"""The submitting side of ``aiod4p run --mapping storm``: what the topology's tasks report back.

Every task of a topology built with a ``report`` address connects to
:class:`RunReport` and writes JSON lines (see :mod:`aiod4p.storm.components`):
``hello``, results (``r``), errors (``e``), its end of stream (``d``), and
``x`` when its Storm worker stopped it (the worker shut down).
The run has ended well once every task of every component has sent ``d``;
it fails on the first fatal error, or when a task's connection closes
before its ``d`` (its Storm worker died): it names a task that died of its
own accord rather than one its worker stopped for it. After the topology is killed the
run reads every connection to its end, so that an error a PE reported just
before the failure it caused is not lost, and raises the most telling one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from .._results import ResultSink
from ..errors import Aiod4pError, PEError, TargetError, TransportError, WorkerDied
from ._spec import TopologySpec
from ._wire import decode

__all__ = ["ERROR_KINDS", "LINE_LIMIT", "RunReport"]

ERROR_KINDS: dict[str, type[Aiod4pError]] = {kind.__name__: kind for kind in (TransportError, TargetError)}
"""The errors an ``e`` report names by their class (``kind``); others travel as ``Aiod4pError``, and ``PEError``
with its PE, instance, port and traceback."""

logger = logging.getLogger("aiod4p.storm")

LINE_LIMIT = 1 << 26
"""The longest report line the run reads (bytes): a task splits its results into lines no longer."""


class RunReport:
    """Receives the reports of one topology's tasks and decides how its run ends.

    Args:
        sink: where results are delivered.
        token: the run's token; connections presenting another are refused.
    """

    def __init__(self, sink: ResultSink, token: str) -> None:
        self.sink = sink
        self.token = token
        self.expected: set[tuple[str, int]] = set()
        self.started: set[tuple[str, int]] = set()
        self.done: set[tuple[str, int]] = set()
        self.pids: dict[tuple[str, int], int] = {}
        self.stopped: set[tuple[str, int]] = set()  # tasks their Storm worker stopped (x)
        self.stopped_deaths: list[Aiod4pError] = []
        self.ended = asyncio.Event()  # every task finished, or the run failed
        self.all_started = asyncio.Event()
        self.fatal: list[Aiod4pError] = []
        self.failed_tuples: list[Aiod4pError] = []  # errors of tuples Storm then failed (and replayed)
        self.dropped = False  # a spout gave a tuple up after its last replay
        self.storm_errors = ""  # what Nimbus reported for the topology, read by the run when stopped_only
        self.killed = False
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def listen(self, host: str) -> str:
        """Start listening on ``host`` (an ephemeral port); returns ``HOST:PORT``."""
        self._server = await asyncio.start_server(self._serve, host, 0, limit=LINE_LIMIT)
        port = self._server.sockets[0].getsockname()[1]
        return f"{host}:{port}"

    def expect(self, spec: TopologySpec) -> None:
        """The tasks to wait for: every task of every component of ``spec``."""
        self.expected = {(c.name, task) for c in spec.components for task in range(c.parallelism)}

    async def started_or_ended(self) -> None:
        """Wait until every task has started or the run has ended."""
        started = asyncio.ensure_future(self.all_started.wait())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            await asyncio.wait({started, ended}, return_when="FIRST_COMPLETED")
        finally:
            started.cancel()
            ended.cancel()

    @property
    def failed(self) -> bool:
        return bool(self.fatal)

    @property
    def stopped_only(self) -> bool:
        """The run failed only because tasks were stopped by their worker: why it shut down (Storm's own error,
        such as a subprocess heartbeat timeout) is known to Nimbus, not to the tasks."""
        return bool(self.fatal) and all(error in self.stopped_deaths for error in self.fatal)

    def error(self) -> Aiod4pError:
        """The error the run fails with: a PE's own error rather than its consequences."""
        for error in self.fatal:
            if isinstance(error, PEError | TransportError):
                return error
        if self.dropped and self.failed_tuples:
            return self.failed_tuples[-1]  # a tuple dropped after its last replay: the error that failed it
        own = [error for error in self.fatal if error not in self.stopped_deaths]
        if own:
            return own[0]
        return WorkerDied(f"{self.fatal[0]}; {self.storm_errors}") if self.storm_errors else self.fatal[0]

    async def close(self, grace: float) -> None:
        """Read what the tasks of a killed topology still sent (at most ``grace`` s), then stop."""
        self.killed = True
        if self._server is not None:
            self._server.close()
        if self._handlers:
            _, pending = await asyncio.wait(self._handlers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.killed:  # accepted as the server closed, after close() waited for the handlers: none is read
            writer.close()
            return
        task = asyncio.ensure_future(self._handle(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = json.loads(await reader.readline() or b"{}")
            if hello.get("t") != "hello" or hello.get("token") != self.token:
                return  # not a task of this run's topology
            key = (str(hello["pe"]), int(hello["task"]))
            if key in self.started:
                self.fail(WorkerDied(f"the Storm task of PE {key[0]}[{key[1]}] was restarted: its worker died"))
            self.started.add(key)
            self.pids[key] = int(hello.get("pid", 0))
            if self.expected <= self.started:
                self.all_started.set()
            while line := await reader.readline():
                await self._message(key, json.loads(line))
            if key not in self.done:
                self._ended_early(key)
        except (ValueError, KeyError, TypeError, ConnectionError) as exc:
            if not self.killed:
                self.fail(TransportError(f"a Storm task sent a malformed report: {type(exc).__name__}: {exc}"))
        finally:
            writer.close()

    def _ended_early(self, key: tuple[str, int]) -> None:
        """The connection of task ``key`` closed before its end of stream: its process ended.

        A task its worker stopped (``x``: the worker shut down because another of its tasks died, or the topology
        was killed) fails the run unless the run is being killed already, and is the error only if no task died
        of its own accord; one that died of its own accord is recorded even after the kill, since the worker's
        other tasks may have been read first.
        """
        task = f"the Storm task of PE {key[0]}[{key[1]}] (pid {self.pids[key]})"
        if key in self.stopped:
            if not self.killed:
                self.stopped_deaths.append(
                    WorkerDied(
                        f"{task} was stopped by its Storm worker before the end of its stream: the worker was"
                        " shutting down (another of its tasks died, the topology was killed, or the worker's JVM was"
                        " stopped)"
                    )
                )
                self.fail(self.stopped_deaths[-1])
            return
        self.fail(
            WorkerDied(
                f"{task} exited before the end of its stream: its worker died (Storm restarts it, but its PE's"
                " state and the tuples in flight in it are lost)"
            )
        )

    async def _message(self, key: tuple[str, int], message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "r":
            await self.sink.emit(key[0], str(message["port"]), [decode(item) for item in message["items"]])
        elif kind == "d":
            self.done.add(key)
            if self.expected <= self.done:
                self.ended.set()
        elif kind == "x":
            self.stopped.add(key)
        elif kind == "e":
            error = _error(key, message)
            self.dropped |= message.get("kind") == "dropped"
            if message.get("fatal"):
                self.fail(error)
            else:
                logger.warning("%s (Storm fails the tuple; its spout replays it)", error)
                self.failed_tuples.append(error)
        else:
            raise ValueError(f"unknown report {kind!r}")

    def fail(self, error: Aiod4pError) -> None:
        """End the run with ``error`` (the first fatal error wins, as :meth:`error` says)."""
        self.fatal.append(error)
        self.ended.set()


def _error(key: tuple[str, int], message: dict[str, Any]) -> Aiod4pError:
    text = str(message.get("message", ""))
    if message.get("kind") == "PEError":
        pe, instance = str(message.get("pe", key[0])), int(message.get("instance", key[1]))
        return PEError(pe, instance, str(message.get("port", "")), text, str(message.get("traceback", "")))
    if (kind := ERROR_KINDS.get(str(message.get("kind")))) is not None:
        return kind(text)
    detail = str(message.get("traceback", ""))
    return Aiod4pError(f"{text}\n{detail}".rstrip() if detail else text)
