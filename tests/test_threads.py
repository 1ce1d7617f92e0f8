"""Threaded PEs: blocking calls off the event loop, back-pressured writes, and signals that always work."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import workflows as wf
from conftest import MappingCase
from helpers import AIOD4P, aiod4p_process, interrupted_run

import aiod4p
from aiod4p import ConsumerPE, IterativePE, ProducerPE, WorkflowGraph, iterative
from aiod4p._api import run_in_threads
from aiod4p._cli import main
from aiod4p._threads import DaemonThreadPool, callers_threads, forking, helper_work, start_helper
from aiod4p.errors import GraphError

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "tests" / "workflows.py"


# -- blocking calls -------------------------------------------------------------------


class WaitsForHost(IterativePE):
    """Blocks its thread until the host (another task of the loop) opens a gate."""

    threaded = True

    def __init__(self) -> None:
        super().__init__()
        self.gate = wf.Shared(event=threading.Event())

    def process_item(self, item: int) -> bool:
        return self.gate.event.wait(timeout=20)


@pytest.mark.asyncio
async def test_a_threaded_pe_blocks_its_thread_not_the_loop() -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", waits := WaitsForHost(), "input")
    run = asyncio.ensure_future(aiod4p.run_async(graph, 3))

    async def host() -> None:  # runs only if the loop is free while the PE blocks
        await asyncio.sleep(0)
        waits.gate.event.set()

    async with asyncio.timeout(50):
        await host()
        results = await run
    assert results.data() == [True, True, True]


class LoadsAModel(IterativePE):
    """Its ``preprocess`` (a slow model load) meets the other instances' at a barrier: it returns only if
    they all load at the same time."""

    threaded = True

    def __init__(self, instances: int) -> None:
        super().__init__(parallelism=instances)
        self.loading = wf.Shared(barrier=threading.Barrier(instances, timeout=10))

    def preprocess(self) -> None:
        self.loading.barrier.wait()

    def process_item(self, item: int) -> int:
        return item

    def postprocess(self) -> None:
        self.loading.barrier.wait()  # saving a model: at the same time too
        self.write("output", -1)


@pytest.mark.asyncio
@pytest.mark.parametrize("mapping", ["simple", "async"])
async def test_a_threaded_pe_s_instances_preprocess_at_the_same_time(mapping: str) -> None:
    """Four instances that each load a model for 5 s took 20 s on async, one after the other, on the loop."""
    instances = 1 if mapping == "simple" else 4
    graph = WorkflowGraph()
    graph.connect(wf.Range(8), "output", LoadsAModel(instances), "input")
    async with asyncio.timeout(30):
        results = await aiod4p.run_async(graph, 1, mapping=mapping)
    assert sorted(results.data()) == [-1] * instances + list(range(8))


def logged(method: Any) -> Any:
    """A plain decorator (as a logging or tracing library writes one): it hands back what ``method`` returns."""

    @functools.wraps(method)
    def call(*args: Any) -> Any:
        return method(*args)

    return call


class LoadsAsync(IterativePE):
    """A threaded PE whose ``preprocess`` is an ``async def`` under a plain decorator."""

    threaded = True

    @logged
    async def preprocess(self) -> None:
        self.model = "loaded"

    def process_item(self, item: int) -> tuple[int, str]:
        return item, self.model


@pytest.mark.asyncio
async def test_a_threaded_pe_s_decorated_async_preprocess_is_awaited() -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Range(2), "output", LoadsAsync(), "input")
    async with asyncio.timeout(30):
        results = await aiod4p.run_async(graph, 1)
    assert sorted(results.data()) == [(0, "loaded"), (1, "loaded")]


def test_threaded_is_an_option_of_function_pes() -> None:
    @iterative
    def slow(item: int) -> int:
        return item

    assert slow(threaded=True).threaded and not slow().threaded


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
def test_options_given_to_a_decorator_are_its_pes_defaults(mapping: str) -> None:
    square = wf.threaded_square()
    assert square.threaded and square.parallelism == 2
    assert not wf.threaded_square(threaded=False).threaded and wf.threaded_square(parallelism=3).parallelism == 3
    graph = WorkflowGraph()
    graph.connect(wf.count_to_five(), "output", square, "input")
    assert sorted(aiod4p.run(graph, mapping=mapping, workers=2).data()) == [0, 1, 4, 9, 16]


def test_run_in_threads_names_an_unknown_pe() -> None:
    graph = wf.sleepy()
    run_in_threads(graph, ["Sleepy"])
    assert [pe.threaded for pe in graph.pes] == [False, True]
    with pytest.raises(GraphError, match=r"--threaded nope: the workflow has no such PE \(PEs: Count"):
        run_in_threads(graph, ["nope"])


# -- writes are back-pressured ------------------------------------------------------------

WRITES = 50_000


class WriteLoop(ProducerPE):
    """Writes ``WRITES`` items in one plain call, counting them where the test can see."""

    def __init__(self, threaded: bool, writes: int = WRITES) -> None:
        super().__init__()
        self.threaded = threaded
        self.writes = writes
        self.progress = wf.Shared(written=0, ahead=0, aheads=[])

    def produce(self) -> None:
        for item in range(self.writes):
            self.progress.written += 1
            self.write("output", item)


class Behind(ConsumerPE):
    """Records how far the writer was ahead of it, at most."""

    def __init__(self, writer: WriteLoop) -> None:
        super().__init__()
        self.writer = writer
        self.consumed = 0

    def consume(self, item: Any) -> None:
        self.consumed += 1
        progress = self.writer.progress
        progress.ahead = max(progress.ahead, progress.written - self.consumed)
        if hasattr(progress, "aheads"):
            progress.aheads.append(progress.written - self.consumed)


def bound(batch_size: int = 256, credits: int = 4) -> int:
    """What may be written and not yet consumed, ``credits x batch_size`` each (within a worker a batch may carry
    that many items, see ``PlanOptions.batch_bounds``): the batch the reader is consuming (its credits came back
    when the reader took it, see ``LocalChannel``), the channel's batches in flight, what the writer's call handed
    over and waits to send, and the partly filled batch that was added to. The reader's batch counts only where it
    lets the writer run before it is consumed: a reader that gives way within it (on a busy machine, its quick
    calls overrun their turn)."""
    return 4 * batch_size * credits


BOUND = bound()


def run_behind(writer: ProducerPE, mapping: str = "async", reader: type[Behind] | None = None, **options: int) -> Any:
    """Run ``writer`` into a ``reader`` (a :class:`Behind`) with ``batch_size`` and ``credits`` from ``options``;
    the writer's ``progress``, checked to have kept within their :func:`bound`."""
    graph = WorkflowGraph()
    graph.connect(writer, "output", (reader or Behind)(writer), "input")  # type: ignore[arg-type]
    aiod4p.run(graph, 1, mapping=mapping, **options)
    progress = writer.progress  # type: ignore[attr-defined]
    assert progress.ahead <= bound(**options)
    return progress


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_a_threaded_write_loop_runs_in_bounded_memory(mapping: str) -> None:
    assert run_behind(WriteLoop(threaded=True), mapping).written == WRITES


class HeavyWriteLoop(WriteLoop):
    """Writes ``writes`` items of a MiB each in one plain call (a trace each)."""

    def produce(self) -> None:
        for _ in range(self.writes):
            self.progress.written += 1
            self.write("output", bytes(1 << 20))


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_a_threaded_write_loop_of_heavy_items_hands_them_on_a_few_at_a_time(mapping: str) -> None:
    # A threaded call handed its items on by count only, 1,024 at a time: 160 arrays of 50 MB took 8.2 GB, all
    # held until the call ended. Now batch_bytes bounds it too: a few MiB ahead of the consumer, at most.
    progress = run_behind(HeavyWriteLoop(threaded=True, writes=100), mapping)
    assert progress.written == 100 and progress.ahead <= 16


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_a_write_loop_on_the_event_loop_runs_in_bounded_memory(mapping: str) -> None:
    assert run_behind(WriteLoop(threaded=False), mapping).written == WRITES  # write() waited for credit, on the loop


class AsyncWriteLoop(ProducerPE):
    """An ``async def`` call that writes in a loop without awaiting."""

    def __init__(self) -> None:
        super().__init__()
        self.progress = wf.Shared(written=0, ahead=0)

    async def produce(self) -> None:
        for item in range(WRITES):
            self.progress.written += 1
            self.write("output", item)


def test_an_async_write_loop_runs_in_bounded_memory() -> None:
    assert run_behind(AsyncWriteLoop()).written == WRITES


class PreprocessWrites(ProducerPE):
    """Writes everything in ``preprocess``, which runs once."""

    def __init__(self) -> None:
        super().__init__()
        self.progress = wf.Shared(written=0, ahead=0)

    def preprocess(self) -> None:
        for item in range(WRITES):
            self.progress.written += 1
            self.write("output", item)

    def produce(self) -> None:
        pass


def test_a_stage_that_writes_in_a_loop_runs_in_bounded_memory() -> None:
    assert run_behind(PreprocessWrites()).written == WRITES


class GivesWay(Behind):
    """Lets the other tasks run after each item: the writer refills the channel before this reader's batch is
    consumed."""

    async def consume(self, item: Any) -> None:
        super().consume(item)
        await asyncio.sleep(0)


def test_a_writer_stays_in_bound_beside_a_reader_that_gives_way_within_its_batches() -> None:
    # Under load the writer was 3,188 items ahead where the bound said 3,072: it missed the reader's batch, which a
    # reader whose quick calls overran their turn gave way within. Here it gives way at every item: 960 to 1,014
    # ahead with one credit of 256 items, where the three batches counted before allowed 768.
    assert run_behind(PreprocessWrites(), reader=GivesWay, batch_size=256, credits=1).written == WRITES


class FailsWhileWriting(ProducerPE):
    """Writes past a full buffer, then fails: the error comes out of the run, named."""

    def produce(self) -> None:
        for item in range(5_000):
            self.write("output", item)
        raise ValueError("broken after 5000 writes")


def test_a_call_that_fails_after_waiting_for_credit_names_the_pe() -> None:
    graph = WorkflowGraph()
    graph.connect(FailsWhileWriting(), "output", wf.Discard(), "input")
    with pytest.raises(aiod4p.PEError, match="broken after 5000 writes") as info:
        aiod4p.run(graph, 1, mapping="async", batch_size=10, credits=2)
    assert "FailsWhileWriting" in str(info.value)


class GeneratorWrites(ProducerPE):
    """A generator source: every item waits for credit as it is yielded (the lazy way)."""

    def __init__(self) -> None:
        super().__init__()
        self.progress = wf.Shared(written=0, ahead=0)

    def produce(self) -> Iterator[int]:
        for item in range(WRITES):
            self.progress.written += 1
            yield item


def test_a_generator_is_back_pressured_too() -> None:
    run_behind(GeneratorWrites())


# -- the command line: Ctrl-C with blocking PEs ------------------------------------------------


def test_ctrl_c_drains_a_run_whose_pe_blocks_in_a_thread() -> None:
    with interrupted_run(
        f"{WORKFLOWS}:sleepy", "-i", "100000", "--threaded", "Sleepy", "--batch-size", "8", "--credits", "2"
    ) as proc:
        out, err = proc.communicate(timeout=30)  # 100,000 items would take 1,000 s
    assert proc.returncode == 0, err
    assert "stopping the sources" in err
    assert len(out.splitlines()) < 10_000


def test_a_second_ctrl_c_aborts_while_a_pe_holds_the_loop() -> None:
    with interrupted_run(f"{WORKFLOWS}:stuck", "-i", "30", "--batch-size", "1") as proc:  # item 20 holds the loop 60 s
        assert proc.stderr is not None
        assert "stopping the sources" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "aborted" in err


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
def test_a_failed_run_exits_while_a_threaded_call_still_blocks(mapping: str) -> None:
    proc = aiod4p_process("run", f"{WORKFLOWS}:blocked_and_failing", "-m", mapping, "-n", "2", "-i", "10", "-q")
    try:
        _, err = proc.communicate(timeout=60)  # Python would wait for the blocked thread at exit
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    assert "FailsOnInstance" in err


EMBEDS_A_BLOCKED_RUN = """
import asyncio, sys
import aiod4p, workflows

async def main() -> None:
    async with aiod4p.start(workflows.says_it_blocks(), 1, mapping=sys.argv[1]):
        await asyncio.to_thread(sys.stdin.readline)  # the test's word, once the call blocks; then the run is closed

asyncio.run(main())
"""


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
def test_a_service_exits_after_closing_a_run_whose_threaded_call_never_returns(mapping: str) -> None:
    # Python joined the pool's thread at exit: a service's process waited forever for the abandoned call.
    proc = subprocess.Popen(
        [sys.executable, "-c", EMBEDS_A_BLOCKED_RUN, mapping],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=WORKFLOWS.parent,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "blocked\n"
        _, err = proc.communicate("close\n", timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    if mapping != "multi":  # the call blocks in this process: the user is told it goes on
        assert re.search(r"a call of PE SaysItBlocks\d+\[0\] returned: it goes on in thread aiod4p-worker0_", err), err


def test_a_closed_pool_names_the_calls_under_way_and_cancels_those_not_started() -> None:
    pool = DaemonThreadPool(1, "test-pool")
    started, release = threading.Event(), threading.Event()

    def blocks() -> None:
        started.set()
        release.wait(30)

    busy = pool.submit("the blocked call", blocks)
    queued = pool.submit("the queued call", int)  # the pool's one thread is busy
    assert started.wait(30)
    assert [thread.daemon for thread in threading.enumerate() if thread.name == "test-pool_0"] == [True]
    assert pool.close() == [("the blocked call", "test-pool_0")]
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit("a late call", int)
    release.set()
    assert busy.result(timeout=30) is None


@pytest.mark.parametrize("mapping", ["async", "multi"])
def test_a_run_with_nothing_more_to_write_ends_when_its_reader_goes_away(mapping: str) -> None:
    reader, writer = os.pipe()
    proc = subprocess.Popen(
        [*AIOD4P, "run", f"{WORKFLOWS}:blocked_beside_results", "-m", mapping, "-n", "2", "-i", "3", "--results", "-"],
        stdout=writer, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    os.close(writer)
    try:
        with os.fdopen(reader) as results:
            assert sorted(json.loads(results.readline())["data"] for _ in range(3)) == [0, 2, 4]  # then nothing, ever
        _, err = proc.communicate(timeout=60)  # as `| head -3` exits
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 141 and "Traceback" not in err, err


def test_threaded_pes_give_the_same_results_on_every_mapping(mapping: MappingCase) -> None:
    graph = WorkflowGraph()
    count, sleepy, writer, double = wf.Count(), wf.Sleepy(0.0), WriteLoop(threaded=True, writes=3_000), wf.Double()
    sleepy.threaded = True
    sleepy.parallelism = 2
    graph.connect(count, "output", sleepy, "input")
    graph.connect(writer, "output", double, "input")
    by_pe = mapping.run(graph, {count: 500, writer: 1}).by_port()
    assert sorted(by_pe[(sleepy.id, "output")]) == list(range(500))
    assert sorted(by_pe[(double.id, "output")]) == [2 * i for i in range(3_000)]


def test_the_cli_names_an_unknown_threaded_pe(capsys: pytest.CaptureFixture[str]) -> None:
    # A name no PE has is found in the loaded graph, as --stdin's is: exit 1 (it was 2, a usage error).
    assert main(["run", "workflows:sleepy", "-i", "1", "--threaded", "Nope", "-q"]) == 1  # by name: not reloaded
    assert "--threaded Nope: the workflow has no such PE (PEs: Count" in capsys.readouterr().err


class _One(ProducerPE):
    def produce(self) -> int:
        return 1


class _Flood(IterativePE):
    """Threaded: one call writes 1,000 items (each write may hand the buffered ones over, waiting for credit)."""

    threaded = True

    def process_item(self, item: int) -> None:
        for number in range(1000):
            self.write("output", number)


class _Stuck(IterativePE):
    """Takes its first batch and never finishes it: its upstream runs out of credit."""

    async def process_item(self, item: int) -> None:
        await asyncio.Event().wait()


async def test_an_abort_between_a_hand_over_and_its_registration_still_ends_the_threaded_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A threaded call hands its writes over to the loop (``run_coroutine_threadsafe``), then registers the
    future so that an abort cancels it. An abort in between used to leave it: the hand-over waited for credit
    for ever, its pool thread with it, as long as the loop ran (an embedding service's)."""
    schedule = asyncio.run_coroutine_threadsafe
    calls, handing_over, aborted = 0, threading.Event(), threading.Event()

    def late(coro: Any, loop: asyncio.AbstractEventLoop) -> Any:
        nonlocal calls
        future = schedule(coro, loop)
        calls += 1
        if calls == 3:  # the downstream has stopped taking batches: this hand-over waits for credit
            handing_over.set()
            aborted.wait(10)  # the abort comes now, before the caller registers the future
        return future

    abort = aiod4p._engine.Worker._abort_threads

    def noted(self: aiod4p._engine.Worker) -> None:
        abort(self)
        aborted.set()

    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", late)
    monkeypatch.setattr(aiod4p._engine.Worker, "_abort_threads", noted)
    graph = WorkflowGraph()
    graph.connect(_One(), "output", flood := _Flood(), "input")
    graph.connect(flood, "output", _Stuck(), "input")
    async with asyncio.timeout(30):
        run = aiod4p.start(graph, 1, mapping="async", batch_size=1, credits=1)
        async with run:
            assert await asyncio.to_thread(handing_over.wait, 10)
        pool = [thread for thread in threading.enumerate() if thread.name.startswith("aiod4p-worker")]
        for thread in pool:
            await asyncio.to_thread(thread.join, 5)
        assert [thread.name for thread in pool if thread.is_alive()] == []


def test_aiod4p_s_helper_threads_are_not_the_callers_and_a_fork_under_way_leaves_the_child_free_to_fork() -> None:
    inside, leave = threading.Event(), threading.Event()

    def work() -> None:
        with helper_work():
            inside.set()
        leave.wait()

    helper = start_helper(work, "aiod4p test helper")
    try:
        assert inside.wait(10)
        assert callers_threads() == threading.active_count() - 1
        with forking():  # the helper is outside its work: taken at once
            pid = os.fork()
            if pid == 0:  # the child: its copy of the lock was held by the parent's fork, and is new
                with forking():
                    os._exit(0)
        pidfd = os.pidfd_open(pid)
        try:
            ended, _, _ = select.select([pidfd], [], [], 30)
        finally:
            os.close(pidfd)
        if not ended:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert ended and os.waitstatus_to_exitcode(status) == 0, "the child could not fork: its lock stayed held"
    finally:
        leave.set()
        helper.join(10)
