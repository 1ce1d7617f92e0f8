"""Clean shutdown: SIGTERM/SIGINT drain `aiod4p run --stdin`, a second signal aborts; the API drains on cancel."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import workflows as wf

import aiod4p
from aiod4p import ConsumerPE, IterativePE, LiveFeed, WorkflowGraph
from aiod4p._api import loop_factory
from aiod4p._signals import Interrupts, Stopped

ROOT = Path(__file__).resolve().parent.parent
TARGET = f"{ROOT / 'tests' / 'workflows.py'}:live_squares"


class Reader(threading.Thread):
    """Reads a child's stdout (JSON Lines) so the child never blocks on a full pipe."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.records: list[dict[str, Any]] = []
        self.changed = threading.Condition()

    def run(self) -> None:
        for line in self.stream:
            with self.changed:
                self.records.append(json.loads(line))
                self.changed.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 20) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.records), timeout), self.records[-3:]


def start_cli(
    *extra: str, stderr: int = subprocess.PIPE, preexec_fn: Callable[[], Any] | None = None
) -> tuple[subprocess.Popen[bytes], Reader]:
    """``aiod4p run --stdin square --results -`` (``live_squares``), its stdout read by a :class:`Reader`;
    ``preexec_fn`` runs in the child (in a session of its own when given)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiod4p", "run", TARGET, "--stdin", "square", "--results", "-", "-q", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=preexec_fn is not None,
        preexec_fn=preexec_fn,
    )
    assert proc.stdout is not None
    reader = Reader(proc.stdout)
    reader.start()
    return proc, reader


def stop(proc: subprocess.Popen[bytes], reader: Reader) -> bytes:
    """Make sure the child is gone; return its stderr."""
    if proc.poll() is None:
        proc.kill()
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=20)
    reader.join(timeout=20)
    stderr = proc.stderr.read() if proc.stderr is not None else b""
    if proc.stderr is not None:
        proc.stderr.close()
    assert proc.stdout is not None
    proc.stdout.close()
    return stderr


def lines(ids: range) -> bytes:
    return b"".join(json.dumps({"id": i}).encode() + b"\n" for i in ids)


def squares(records: list[dict[str, Any]]) -> list[int]:
    return sorted(r["data"]["id"] for r in records if r["output"] == "output")


@pytest.mark.parametrize(
    ("signum", "mapping"),
    [
        (signal.SIGTERM, "async"),
        (signal.SIGINT, "async"),
        (signal.SIGINT, "multi"),
        (signal.SIGTERM, "mpi"),
        (signal.SIGHUP, "multi"),
    ],
)
def test_a_signal_mid_stream_drains_every_line_written_before_it(signum: int, mapping: str) -> None:
    proc, reader = start_cli("--mapping", mapping, "-n", "2")  # on multi and mpi, the launcher pumps stdin
    try:
        assert proc.stdin is not None
        proc.stdin.write(lines(range(2000)))
        proc.stdin.flush()
        reader.wait_for(lambda records: len(records) >= 100)  # the run is live, mid-stream
        proc.stdin.write(lines(range(2000, 5000)))  # still in the pipe, or being read, when the signal comes
        proc.stdin.flush()
        proc.send_signal(signum)  # stdin stays open: only the drain ends the stream
        assert proc.wait(timeout=30) == 0
    finally:
        stderr = stop(proc, reader)
    assert b"Traceback" not in stderr
    assert squares(reader.records) == list(range(5000))
    assert all(r["data"]["sq"] == r["data"]["id"] ** 2 for r in reader.records if r["output"] == "output")
    assert [r["data"] for r in reader.records if r["output"] == "status"] == ["drained"]  # postprocess ran


def test_a_terminal_hang_up_drains_and_exits_0() -> None:
    """The terminal the run reports on goes away (an ssh session drops): the kernel sends SIGHUP, and stderr
    fails with EIO from then on. The run drains as on SIGTERM, every accepted line gets its result, exit 0."""
    controller, terminal = pty.openpty()

    def on_the_terminal() -> None:  # a session leader taking the pty as its controlling terminal
        fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)

    proc, reader = start_cli(stderr=terminal, preexec_fn=on_the_terminal)
    os.close(terminal)
    try:
        assert proc.stdin is not None
        proc.stdin.write(lines(range(2000)))
        proc.stdin.flush()
        reader.wait_for(lambda records: len(records) >= 100)
        os.close(controller)  # the hang-up
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc, reader)
    assert squares(reader.records) == list(range(2000))
    assert [r["data"] for r in reader.records if r["output"] == "status"] == ["drained"]


def _sent_while_ignored(signum: int) -> tuple[subprocess.Popen[bytes], Reader]:
    """The CLI started with ``signum`` ignored, given 100 lines, sent ``signum``, then given 100 more (its stdin
    still open). The caller ends the run, then calls :func:`stop`."""
    proc, reader = start_cli(preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN))
    try:
        assert proc.stdin is not None
        proc.stdin.write(lines(range(100)))
        proc.stdin.flush()
        reader.wait_for(lambda records: len(records) >= 100)
        proc.send_signal(signum)
        proc.stdin.write(lines(range(100, 200)))
        proc.stdin.flush()
    except BaseException:
        stop(proc, reader)
        raise
    return proc, reader


def test_a_run_started_with_sighup_ignored_ignores_it() -> None:
    """``nohup aiod4p run ...``: the user asked for the run to outlive the terminal."""
    proc, reader = _sent_while_ignored(signal.SIGHUP)
    try:
        assert proc.stdin is not None
        proc.stdin.close()  # the end of the stream ends the run
        assert proc.wait(timeout=30) == 0
    finally:
        stderr = stop(proc, reader)
    assert b"SIGHUP" not in stderr
    assert squares(reader.records) == list(range(200))


def test_the_watchdog_says_a_pe_held_the_loop_when_what_held_it_cannot_be_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What held the loop is found by looking at its thread's stack, which may fail (the working directory
    removed: what is installed cannot be told): the watchdog must still end the process, saying what it can."""

    def fails(thread: int) -> str | None:
        raise FileNotFoundError("the working directory is gone")

    monkeypatch.setattr("aiod4p._signals.running_in", fails)
    assert Interrupts(exit_status=130)._holder() == "the event loop was held by a PE"


def test_a_run_started_with_sigint_ignored_ignores_it_and_drains_on_sigterm() -> None:
    """``aiod4p run ... &`` in a shell script: the background job starts with SIGINT ignored, so that a Ctrl-C at
    the terminal stops the script, not it. The command took SIGINT back and drained the run."""
    proc, reader = _sent_while_ignored(signal.SIGINT)
    try:
        reader.wait_for(lambda records: len(records) >= 200)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stderr = stop(proc, reader)
    assert b"SIGINT" not in stderr and b"interrupted by SIGTERM: drained" in stderr, stderr
    assert squares(reader.records) == list(range(200))


def test_a_second_signal_aborts_with_a_non_zero_exit() -> None:
    proc, reader = start_cli()
    try:
        assert proc.stdin is not None
        proc.stdin.write(b'{"id": 1}\n')
        proc.stdin.flush()
        reader.wait_for(lambda records: squares(records) == [1])
        proc.stdin.write(b'{"id": 2, "hold": true}\n')  # never finishes
        proc.stdin.flush()
        proc.send_signal(signal.SIGTERM)
        reader.wait_for(lambda records: any(r["output"] == "status" for r in records))  # draining, held up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
    finally:
        stderr = stop(proc, reader)
    assert b"aiod4p: aborted" in stderr


@pytest.mark.parametrize("uvloop", [False, True])
def test_a_signal_in_a_loop_callback_during_start_up_stops_the_start_up(uvloop: bool) -> None:
    """Start-up is async code too (the mpi mapping's launch): the signal may interrupt a loop callback."""
    started_after_signal = []

    async def start_up() -> None:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGINT)  # its handler runs in the callback
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        started_after_signal.append(True)

    with (
        Interrupts(exit_status=130),
        pytest.raises(Stopped),
        asyncio.Runner(loop_factory=loop_factory(uvloop)) as runner,
    ):
        runner.run(asyncio.wait_for(start_up(), 20))
    assert not started_after_signal


LEAVES_A_SERVER_OPEN = """
import asyncio
import aiod4p
from aiod4p import ConsumerPE, ProducerPE, WorkflowGraph

class Serves(ProducerPE):
    async def preprocess(self):
        self.server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)  # never closed

    def produce(self):
        return 1

class Discard(ConsumerPE):
    def consume(self, item):
        pass

graph = WorkflowGraph()
graph.connect(Serves(), "output", Discard(), "input")
aiod4p.run(graph, 1, mapping="async")
"""


def test_a_run_whose_pe_left_a_server_open_ends_where_resource_warnings_are_errors() -> None:
    """uvloop warns of a handle still open as its loop closes, before it closes it: raised as an error
    (``-W error::ResourceWarning``), the warning stopped the close half-way, and the run never returned."""
    done = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-c", LEAVES_A_SERVER_OPEN],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("ResourceWarning: unclosed resource <TCPServer closed=False")


MANY_RESULTS = """
from aiod4p import ProducerPE, WorkflowGraph

class Numbers(ProducerPE):
    def produce(self):
        yield from range(100_000)

graph = WorkflowGraph()
graph.add(Numbers())
"""


def test_a_signal_while_the_results_are_printed_says_they_are_complete(tmp_path: Path) -> None:
    """The results are printed once the run has ended: a Ctrl-C then had nothing to drain, yet the command said
    ``drained; 100000 records produced (partial results)``, and a user would run it again for nothing."""
    flow = tmp_path / "many.py"
    flow.write_text(MANY_RESULTS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiod4p", "run", str(flow)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline() == b"Numbers0.output: 100000 items\n"  # the run has ended
        proc.send_signal(signal.SIGINT)  # while the printing waits for this reader (a full pipe)
        printed = proc.stdout.read()
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)
        proc.stdout.close()
        proc.stderr.close()
    assert printed.splitlines() == [f"  {i}".encode() for i in range(100_000)]
    assert stderr.decode().splitlines() == [
        "aiod4p: SIGINT: the run has ended; writing its output (send it again to abort)",
        "aiod4p: interrupted by SIGINT: the run had ended; 100000 records produced (all its results)",
    ]


def test_a_signal_while_the_provenance_is_written_lets_it_finish(tmp_path: Path) -> None:
    """Once the run has ended, ``--provenance F`` is written (seconds for a large run): a first SIGINT, SIGTERM or
    SIGHUP (an ssh session dropping) then found the handlers removed and aborted, exit 130 and no F, though every
    result was written. F is a named pipe here, so that the writing waits for this reader, mid-document."""
    flow = tmp_path / "many.py"
    flow.write_text(MANY_RESULTS.replace("100_000", "2_000"))
    provenance = tmp_path / "lineage.json"
    os.mkfifo(provenance)
    reader = os.open(provenance, os.O_RDONLY | os.O_NONBLOCK)  # before the run: its writer then never blocks to open
    results = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiod4p", "run", str(flow), "--results", str(results), "--provenance", str(provenance)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stderr is not None
    written = b""
    try:
        while not written:  # nothing yet: no writer (b""), or one that wrote nothing yet (EAGAIN)
            assert proc.poll() is None
            with contextlib.suppress(BlockingIOError):
                written = os.read(reader, 1 << 16)
            time.sleep(0.01)  # ok-sleep: polling a non-blocking pipe
        proc.send_signal(signal.SIGTERM)  # the rest of the document waits for this reader
        os.set_blocking(reader, True)
        while chunk := os.read(reader, 1 << 16):
            written += chunk
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read()
    finally:
        os.close(reader)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)
        proc.stderr.close()
    assert len(json.loads(written)["entity"]) == 2_000  # the whole document: an entity per result
    assert stderr.decode().splitlines() == [
        "aiod4p: SIGTERM: the run has ended; writing its output (send it again to abort)",
        "aiod4p: interrupted by SIGTERM: the run had ended; 2000 records produced (all its results)",
        f"aiod4p: 2000 records in {stderr.decode().split(' in ')[-1].split(' s ')[0]} s -> {results}",
    ]


def test_stdin_with_iterations_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aiod4p", "run", TARGET, "--stdin", "square", "-i", "3"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert "--stdin cannot be combined with -i" in result.stderr


def test_stdin_into_a_pe_that_is_not_a_root_is_an_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aiod4p", "run", TARGET, "--stdin", "Hold"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    assert "is not a root" in result.stderr


def test_stdin_end_of_file_ends_the_run() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aiod4p", "run", TARGET, "--stdin", "square", "--results", "-", "-q"],
        input=lines(range(10)),
        capture_output=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert squares(records) == list(range(10))


class Closing(ConsumerPE):
    """Records that postprocess ran."""

    def __init__(self) -> None:
        super().__init__()
        self.state = wf.Shared(seen=0, closed=False)

    def consume(self, item: Any) -> None:
        self.state.seen += 1

    def postprocess(self) -> None:
        self.state.closed = True


@pytest.mark.asyncio
async def test_cancelling_run_async_drains_before_it_propagates() -> None:
    graph = WorkflowGraph()
    graph.connect(entry := wf.Double(), "output", sink := Closing(), "input")
    feed = LiveFeed(16)
    for i in range(10):
        feed.send_nowait(i)
    task = asyncio.create_task(aiod4p.run_async(graph, {entry: feed}))
    async with asyncio.timeout(20):
        while sink.state.seen < 10:  # noqa: ASYNC110 - wait until the items went through
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sink.state.closed and feed.closed


class DoubleEach(IterativePE):
    """wf.Double as a generator."""

    def process_item(self, item: int) -> Iterator[int]:
        yield 2 * item


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["plain", "threaded", "generator"])
@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
async def test_drain_lets_accepted_items_finish(mapping: str, kind: str) -> None:
    # A threaded or generator root stopped its batch under way once the run drained, as a source asked for
    # -i N calls (or an endless generator) does: it dropped items it had accepted (sums of 0 and 3,072).
    graph = WorkflowGraph()
    entry: IterativePE = DoubleEach() if kind == "generator" else wf.Double()
    entry.threaded = kind == "threaded"
    graph.connect(entry, "output", wf.SumAtEnd(), "input")
    feed = LiveFeed(1000)
    run = aiod4p.start(graph, {entry: feed}, mapping=mapping, workers=2)
    async with asyncio.timeout(20), run:
        for i in range(1000):
            await run.send(entry.id, i)
        run.drain()  # everything already sent still counts
        assert (await run.results()).data() == [2 * sum(range(1000))]


# A run whose abort (the cancellation of its task) cleans up for longer than the watchdog waits, while its
# event loop stays free (a local Ray being stopped, say): the second signal comes once the run is under way.
_SLOW_CLEAN_UP = """
import asyncio, os, signal, time
from aiod4p._signals import Interrupts

class Run:
    under_way = True
    done = False
    def drain(self):
        os.kill(os.getpid(), signal.SIGINT)  # the second signal, once the first was acted on

async def main(signals):
    signals.attach(Run(), asyncio.current_task())
    os.kill(os.getpid(), signal.SIGINT)
    try:
        await asyncio.Event().wait()  # until the first signal cancels it
    except asyncio.CancelledError:
        if BLOCKS:  # a clean-up step that holds the loop a while, as the watchdog first checks whether it turns
            await asyncio.sleep(0.3)  # ok-sleep: the loop turns a while before the step holds it
            time.sleep(BLOCKS)  # ok-sleep: the step that holds the loop
        await asyncio.Event().wait()  # the clean-up, which never ends: the watchdog ends it

results = open(os.devnull, "w")
if CLOSED:
    results.close()
with Interrupts(130, before_exit=results.flush, produced=lambda: "7 records produced") as signals:
    asyncio.run(main(signals))
"""


@pytest.mark.parametrize(("closed", "blocks"), [(False, 0), (True, 0), (False, 0.3)])
def test_an_abort_whose_clean_up_is_slow_says_so_and_counts_the_records(closed: bool, blocks: float) -> None:
    """The watchdog ends an abort that takes too long; its last line says how many records the run produced
    and why it had to step in: here not a PE holding the event loop (the loop turns), a slow clean-up.

    With the results file closed already (the run had written every result, and Ray was still stopping), the
    flush before the exit raised, and the process ended with status 130 saying nothing. With the loop held
    when the watchdog asked it to turn (by a step of the clean-up, or by a loaded machine's scheduler: a CI run
    under load failed so), it blamed a PE after 50 ms; the loop now has the rest of the grace to turn."""
    script = f"CLOSED = {closed}\nBLOCKS = {blocks}\n{_SLOW_CLEAN_UP}"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 130
    assert (
        done.stderr.splitlines()[-1]
        == "aiod4p: aborted by SIGINT; 7 records produced (its clean-up did not end within 0.9 s)"
    )
