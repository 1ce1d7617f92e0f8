"""The live progress display: on a terminal only, and what it shows."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pty
import select
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import workflows as wf
from helpers import IMPORTED, SAYS_ITS_IMPORTS_FLOW
from rich.console import Console

import aiod4p
from aiod4p import InstanceStats, IterativePE, WorkflowGraph, make_plan
from aiod4p._progress import ProgressDisplay, progress

TITLE = "aiod4p · async mapping"


@pytest.fixture
def flow(tmp_path: Path) -> Path:
    path = tmp_path / "flow.py"
    path.write_text(
        textwrap.dedent(
            """
            import asyncio
            from aiod4p import IterativePE, ProducerPE, WorkflowGraph

            class Numbers(ProducerPE):
                def __init__(self):
                    super().__init__()
                    self.id = "Numbers"
                    self.n = 0
                def produce(self):
                    self.n += 1
                    return self.n

            class Square(IterativePE):
                def __init__(self):
                    super().__init__()
                    self.id = "Square"
                async def process_item(self, item):
                    await asyncio.sleep(0.03)  # ok-sleep: 40 items take 1.2 s, longer than a refresh interval
                    return item * item

            graph = WorkflowGraph()
            graph.connect(Numbers(), "output", Square(), "input")
            """
        )
    )
    return path


def run_in_pty(*args: str, cwd: Path, timeout: float = 30) -> tuple[int, str]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal; return (status, output)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiod4p", *args], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"the CLI did not finish within {timeout} s: {b''.join(chunks)!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        status = proc.wait(timeout=10)
    return status, b"".join(chunks).decode(errors="replace")


def test_progress_appears_on_a_terminal(flow: Path, tmp_path: Path) -> None:
    status, output = run_in_pty("run", str(flow), "-i", "40", cwd=tmp_path)
    assert status == 0, output
    assert TITLE in output
    assert "queued at destination" in output and "Numbers.output → Square.input" in output
    assert "Square.output: 40 items" in output  # the results still follow


def test_the_progress_display_leaves_multi_forking_its_workers(tmp_path: Path) -> None:
    # The display's thread made multi spawn its workers on a terminal (fork only while the process has one
    # thread): each imported the workflow file again (its module-level code ran once per worker more) and the
    # run started 0.2-0.4 s later than in a pipe. A fork now waits until the display is between two frames.
    (tmp_path / "flow.py").write_text(SAYS_ITS_IMPORTS_FLOW)
    status, output = run_in_pty("run", "flow.py", "-m", "multi", "-n", "2", "-i", "5", cwd=tmp_path)
    assert status == 0, output
    assert output.count(IMPORTED) == 1, output
    assert "Times101.output: 5 items" in output


def test_no_progress_without_a_terminal(flow: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aiod4p", "run", str(flow), "-i", "40"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Square.output: 40 items" in result.stdout
    assert TITLE not in result.stdout + result.stderr
    assert "\x1b[" not in result.stdout


def test_quiet_hides_progress_on_a_terminal(flow: Path, tmp_path: Path) -> None:
    status, output = run_in_pty("run", str(flow), "-i", "40", "--quiet", cwd=tmp_path)
    assert status == 0, output
    assert TITLE not in output and "Square.output: 40 items" in output


def test_results_on_stdout_hide_progress(flow: Path, tmp_path: Path) -> None:
    status, output = run_in_pty("run", str(flow), "-i", "40", "--results", "-", cwd=tmp_path)
    assert status == 0, output
    assert TITLE not in output
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert sorted(r["data"] for r in records) == [i * i for i in range(1, 41)]


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def text_of(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(renderable)
    value = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(value, str)
    return value


def test_render_throughput_busiest_and_queues() -> None:
    graph, source = wf.pipeline(2)
    plan = make_plan(graph)
    first, second = [pe for pe in plan.pes if pe != source.id]
    stats = {
        pe: InstanceStats(pe, 0, inflight_bound=plan.inflight_bound(aiod4p.InstanceRef(pe, 0)) or 1024)
        for pe in plan.pes
    }
    clock = Clock()
    display = ProgressDisplay(plan, lambda: list(stats.values()), clock=clock, title="run")
    assert "run" in text_of(display.render())

    clock.now += 2.0
    stats[source.id].items_in = stats[source.id].items_out = 4000
    stats[first].items_in, stats[first].items_out, stats[first].busy_seconds = 3000, 2990, 1.5
    stats[second].items_in, stats[second].busy_seconds = 1000, 0.2
    stats[second].queued_items = 512
    text = text_of(display.render())
    assert "busiest: " + first + " (75% busy)" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()}
    assert rows[first][1:6] == ["1", "3,000", "2,990", "1,500", "75%"]
    assert rows[second][4] == "500"  # items/s over the last 2 s
    edge_line = next(line for line in text.splitlines() if f"→ {second}.input" in line)
    assert edge_line.rstrip().endswith("512/1,024")

    clock.now += 1.0  # nothing moved since: rates fall to zero
    again = text_of(display.render())
    rows = {line.split()[0]: line.split() for line in again.splitlines() if line.split()}
    assert rows[first][4] == "0" and "busiest" not in again


def test_render_before_any_statistics() -> None:
    plan = make_plan(wf.pipeline(1)[0])
    text = text_of(ProgressDisplay(plan, list).render())
    assert "waiting for the first statistics" in text


class Screen(io.StringIO):
    """A terminal's output that counts the frames of the display written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = 0
        self.two_frames = threading.Event()  # set by the display's thread

    def write(self, text: str) -> int:
        self.frames += text.count(TITLE)
        if self.frames >= 2:
            self.two_frames.set()
        return super().write(text)


def test_progress_context_draws_and_cleans_up() -> None:
    graph, source = wf.pipeline(3)

    async def go() -> Screen:
        screen = Screen()
        console = Console(file=screen, force_terminal=True, width=120)

        async def feed() -> AsyncIterator[dict[str, int]]:
            for _ in range(100):
                yield {}
            await asyncio.to_thread(screen.two_frames.wait)  # hold the run open until two frames were drawn

        async with asyncio.timeout(30):
            run = aiod4p.start(graph, {source: feed()}, mapping="async", workers=2)
            async with run, progress(run, console=console, interval=0.01):
                results = await run.results()
            assert len(results.data()) == 100
            assert all(thread.name != "aiod4p progress" for thread in threading.enumerate())
        return screen

    screen = asyncio.run(go())
    assert screen.frames >= 2
    assert "Double" in screen.getvalue() and "100" in screen.getvalue()


class HoldsTheLoop(IterativePE):
    """A plain call, not threaded, that blocks the event loop until the display has drawn two frames."""

    def __init__(self, watch: wf.Shared) -> None:
        super().__init__()
        self.watch = watch

    def process_item(self, data: Any) -> Any:
        self.watch.frames = self.watch.screen.two_frames.wait(20)
        return data


def test_the_display_goes_on_while_a_pe_holds_the_event_loop() -> None:
    screen = Screen()
    console = Console(file=screen, force_terminal=True, width=120)
    graph = WorkflowGraph()
    watch = wf.Shared(screen=screen, frames=False)
    holder = HoldsTheLoop(watch)
    graph.add(holder)

    async def go() -> None:
        async with asyncio.timeout(30):
            run = aiod4p.start(graph, {holder: [1]}, mapping="async")
            async with run, progress(run, console=console, interval=0.01):
                await run.results()

    asyncio.run(go())
    assert watch.frames  # drawn while the loop was held


def test_short_run_draws_nothing() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)

    async def go() -> None:
        async with asyncio.timeout(30):
            async with aiod4p.start(wf.pipeline(1)[0], 10) as run, progress(run, console=console, interval=60):
                await run.results()

    asyncio.run(go())
    assert "aiod4p" not in buffer.getvalue()


def test_a_process_forked_under_the_display_writes_to_its_own_streams() -> None:
    # A multi worker forked while the display showed (it no longer makes multi spawn) inherited its proxies of
    # stdout and stderr: each line a PE printed went through the child's copy of the display, redrawing its frame.
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    streams = sys.stdout, sys.stderr

    async def go() -> int:
        async with asyncio.timeout(30):
            async with aiod4p.start(wf.pipeline(1)[0], 10) as run, progress(run, console=console, interval=60):
                assert sys.stdout is not streams[0]  # the display's proxy
                pid = os.fork()
                if pid == 0:
                    os._exit(0 if (sys.stdout, sys.stderr) == streams else 1)
                await run.results()
                return pid

    pid = asyncio.run(go())
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


class BrokenScreen(io.StringIO):
    """A terminal that fails as soon as a frame is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = threading.Event()  # set by the display's thread

    def write(self, text: str) -> int:
        if TITLE in text:
            self.failed.set()
            raise OSError(5, "Input/output error")
        return super().write(text)


def test_a_failing_display_stops_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    graph, source = wf.pipeline(1)

    async def go() -> int:
        screen = BrokenScreen()
        console = Console(file=screen, force_terminal=True, width=120)

        async def feed() -> AsyncIterator[dict[str, int]]:
            for _ in range(10):
                yield {}
            await asyncio.to_thread(screen.failed.wait)  # hold the run open until drawing a frame has failed

        async with asyncio.timeout(30):
            run = aiod4p.start(graph, {source: feed()}, mapping="async")
            async with run, progress(run, console=console, interval=0.01):
                results = await run.results()
        return len(results.data())

    with caplog.at_level(logging.WARNING, logger="aiod4p.progress"):
        assert asyncio.run(go()) == 10
    (record,) = caplog.records
    assert record.getMessage() == "progress display stopped: OSError: [Errno 5] Input/output error"


def test_a_restored_run_shows_the_work_done_in_each_interval() -> None:
    """A restored instance goes on from its checkpoint's counters: its first frame showed them as done in the
    first interval (here 40,000 items/s and the busy time of the whole run before), and under --restarts the
    counters going back to the checkpoint's showed a negative throughput."""
    plan = make_plan(wf.pipeline(1)[0])
    pe = next(iter(plan.pes))
    stats = [InstanceStats(pe, 0)]
    stats[0].carry({"items_in": 40_000, "busy_seconds": 30.0})
    clock = Clock()
    display = ProgressDisplay(plan, lambda: list(stats), clock=clock, title="run")

    def row() -> list[str]:
        clock.now += 1.0
        text = text_of(display.render())
        return next(line.split() for line in text.splitlines() if line.split() and line.split()[0] == pe)

    stats[0].items_in += 100
    stats[0].busy_seconds += 0.5
    assert row()[2:6] == ["40,100", "0", "100", "50%"]  # the run's items in, and this second's rate and busy

    stats[0] = InstanceStats(pe, 0, attempt=1)  # a restart from a checkpoint taken before those 100 items
    stats[0].carry({"items_in": 40_050, "busy_seconds": 30.25})
    stats[0].items_in += 10
    assert row()[2:6] == ["40,060", "0", "10", "0%"]
