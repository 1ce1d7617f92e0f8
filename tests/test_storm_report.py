"""What a Storm run makes of its tasks' reports (:class:`aiod4p.storm._run.RunReport`), over real sockets.

The tasks are played by plain sockets writing the lines ``aiod4p.storm.components`` writes; the
real components are exercised on a real cluster in tests/test_storm_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("streamparse", reason="the storm extra is not installed")

from aiod4p.errors import Aiod4pError, PEError, TransportError, WorkerDied
from aiod4p.storm import ComponentSpec, TopologySpec, encode
from aiod4p.storm._run import RunReport
from aiod4p.storm.components import error_message

TOKEN = "0123456789abcdef"
SPEC = TopologySpec(
    "t",
    (ComponentSpec("source", "spout", 1, (), ()), ComponentSpec("sink", "bolt", 2, (), (), ("output",))),
    {},
)


class Sink:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, Any]] = []

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        self.items += [(pe, port, item) for item in items]


class Task:
    """One task's connection, as a component makes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address: str, pe: str, task: int, token: str = TOKEN) -> Task:
        host, port = address.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        connection = cls(reader, writer)
        await connection.send({"t": "hello", "token": token, "pe": pe, "task": task, "pid": 4242})
        return connection

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def started() -> tuple[RunReport, Sink, str]:
    sink = Sink()
    report = RunReport(sink, TOKEN)
    address = await report.listen("127.0.0.1")
    report.expect(SPEC)
    return report, sink, address


async def test_the_run_ends_when_every_task_has_finished() -> None:
    report, sink, address = await started()
    tasks = [await Task.connect(address, "source", 0)] + [await Task.connect(address, "sink", i) for i in (0, 1)]
    await tasks[1].send({"t": "r", "port": "output", "items": [encode(("a", 1)), encode({"k": [1]})]})
    for task in tasks[:2]:
        await task.send({"t": "d"})
    await asyncio.wait_for(report.all_started.wait(), 10)
    assert not report.ended.is_set()  # sink[1] has not finished
    await tasks[2].send({"t": "d"})
    await asyncio.wait_for(report.ended.wait(), 10)
    assert not report.failed
    assert sink.items == [("sink", "output", ("a", 1)), ("sink", "output", {"k": [1]})]
    await report.close(0)
    for task in tasks:
        await task.close()


async def test_a_connection_with_another_token_is_ignored() -> None:
    report, _, address = await started()
    stranger = await Task.connect(address, "source", 0, token="f" * 16)
    assert await asyncio.wait_for(stranger.reader.read(), 10) == b""  # refused: the run closed it
    await stranger.close()
    assert report.started == set() and not report.ended.is_set()
    await report.close(0)


async def test_a_connection_accepted_as_the_run_closes_is_closed_at_once() -> None:
    """A connection the server accepted as it closed, once close() had waited for the handlers, got a handler
    nobody awaited: its transport was left open when the loop ended (a CI run's ResourceWarning)."""
    report, _, _ = await started()
    await report.close(0)
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    report._serve(reader, writer)  # what the server calls for a connection it accepts now
    assert report._handlers == set() and writer.is_closing()
    await writer.wait_closed()
    theirs.close()


async def test_a_task_that_vanishes_before_its_end_is_a_dead_worker() -> None:
    report, _, address = await started()
    task = await Task.connect(address, "sink", 1)
    await task.close()
    await asyncio.wait_for(report.ended.wait(), 10)
    with pytest.raises(WorkerDied, match=r"the Storm task of PE sink\[1\] \(pid 4242\) exited before the end"):
        raise report.error()
    await report.close(0)


async def _one_stopped_then_killed() -> tuple[RunReport, Task, asyncio.Future[None]]:
    """A run whose task sink[0] its worker stopped, ending it, and the run's close under way (it kills the
    topology), with sink[1] still connected: the close reads its end once the test closes it."""
    report, _, address = await started()
    stopped, died = await Task.connect(address, "sink", 0), await Task.connect(address, "sink", 1)
    await stopped.send({"t": "x"})
    await stopped.close()
    await asyncio.wait_for(report.ended.wait(), 10)
    return report, died, asyncio.ensure_future(report.close(10))


async def test_the_task_that_died_is_named_not_the_one_its_worker_stopped_for_it() -> None:
    """A worker whose task died stops its other tasks, whose connections may be read first."""
    report, died, closing = await _one_stopped_then_killed()
    await died.close()
    await closing
    assert report.killed
    with pytest.raises(WorkerDied, match=r"the Storm task of PE sink\[1\] \(pid 4242\) exited before the end"):
        raise report.error()


async def test_a_task_its_worker_stopped_is_named_if_none_died_of_its_own_accord() -> None:
    report, _, address = await started()
    stopped = await Task.connect(address, "sink", 0)
    await stopped.send({"t": "x"})
    await stopped.close()
    await asyncio.wait_for(report.ended.wait(), 10)
    await report.close(10)
    with pytest.raises(WorkerDied, match=r"PE sink\[0\] \(pid 4242\) was stopped by its Storm worker"):
        raise report.error()


async def test_a_run_its_stopped_tasks_failed_says_what_nimbus_reported() -> None:
    """Only stopped tasks failed the run: the storm mapping reads Nimbus's errors (why the worker shut down), and
    the error says them; a task that died of its own accord is named without them."""
    report, died, closing = await _one_stopped_then_killed()
    try:
        assert report.stopped_only
        report.storm_errors = "Nimbus reports: sink: java.lang.RuntimeException: subprocess heartbeat timeout"
        with pytest.raises(WorkerDied, match=r"sink\[0\] \(pid 4242\) was stopped .*; Nimbus reports: sink: java"):
            raise report.error()
    finally:
        await died.close()
        await closing
    assert not report.stopped_only
    with pytest.raises(WorkerDied, match=r"PE sink\[1\] \(pid 4242\) exited before the end of its stream: [^;]*$"):
        raise report.error()


async def test_a_restarted_task_is_a_dead_worker() -> None:
    report, _, address = await started()
    first = await Task.connect(address, "source", 0)
    second = await Task.connect(address, "source", 0)
    await asyncio.wait_for(report.ended.wait(), 10)
    assert isinstance(report.error(), WorkerDied) and "was restarted" in str(report.error())
    for task in (first, second):
        await task.close()
    await report.close(10)


async def test_a_dropped_tuple_fails_the_run_with_the_error_of_the_pe_that_failed_it() -> None:
    report, _, address = await started()
    bolt, spout = await Task.connect(address, "sink", 0), await Task.connect(address, "source", 0)
    failure = PEError("sink", 0, "input", "ValueError: bad item 3", "Traceback ...")
    await bolt.send(error_message(failure, fatal=False))
    dropped = error_message(Aiod4pError("PE source[0]: tuple 3 failed 4 times; dropped after 3 replays"), True)
    await spout.send({**dropped, "kind": "dropped"})
    await asyncio.wait_for(report.ended.wait(), 10)
    for task in (bolt, spout):  # the topology is killed: its connections close
        await task.close()
    await report.close(10)  # everything sent before is read
    error = report.error()
    assert isinstance(error, PEError)
    assert (error.pe, error.instance, error.port, error.traceback_text) == ("sink", 0, "input", "Traceback ...")


async def test_a_fatal_pe_error_wins_over_a_dead_worker() -> None:
    report, _, address = await started()
    spout = await Task.connect(address, "source", 0)
    await spout.send(error_message(PEError("source", 0, "feed", "boom"), fatal=True))
    vanished = await Task.connect(address, "sink", 0)
    await vanished.close()
    await asyncio.wait_for(report.ended.wait(), 10)
    await spout.close()
    await report.close(10)
    assert isinstance(report.error(), PEError) and report.error().pe == "source"


async def test_a_malformed_report_fails_the_run() -> None:
    report, _, address = await started()
    task = await Task.connect(address, "source", 0)
    task.writer.write(b"not json\n")
    await task.writer.drain()
    await asyncio.wait_for(report.ended.wait(), 10)
    with pytest.raises(TransportError, match="a Storm task sent a malformed report"):
        raise report.error()
    await report.close(0)
    await task.close()


def test_a_task_told_to_stop_while_it_sends_finishes_the_message_then_says_x_and_exits() -> None:
    """SIGTERM's handler may run inside Reporter.send's sendall: the message is finished first, then ``x``."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    script = (
        "from aiod4p.storm.components import Reporter\n"
        f"reporter = Reporter('127.0.0.1:{port}', {{'t': 'hello'}})\n"
        "reporter._sending = True  # as if the signal came in the middle of a send\n"
        "reporter.leave(143)\n"
        "reporter._sending = False\n"
        "reporter.send({'t': 'd'})\n"
        "raise SystemExit('send() did not leave')\n"
    )
    with server, subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) as task:
        server.settimeout(30)
        connection, _ = server.accept()
        with connection, connection.makefile("rb") as lines:
            connection.settimeout(30)
            received = [json.loads(line) for line in lines]
        _, err = task.communicate(timeout=30)
    assert received == [{"t": "hello"}, {"t": "d"}, {"t": "x"}], err
    assert task.returncode == 143, err
