"""The engine shares its event loop: a host's other tasks keep running during a full-throughput run."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Iterator

import pytest
import workflows as wf

import aiod4p
from aiod4p import ConsumerPE, IterativePE, ProducerPE, WorkflowGraph
from aiod4p._engine import LONG_TURN, YIELD_BATCHES, YIELD_SECONDS
from aiod4p._plan import DEFAULT_BATCH_SIZE

TOTAL = 100_000
BATCH = 10


class Flood(ProducerPE):
    """Yields ``TOTAL`` items in one call, recording how far it got where the test can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.progress = wf.Shared(produced=0)

    def produce(self) -> Iterator[int]:
        for item in range(TOTAL):
            self.progress.produced += 1
            yield item


def flood_graph() -> tuple[WorkflowGraph, Flood]:
    graph = WorkflowGraph()
    graph.connect(source := Flood(), "output", wf.Discard(), "input")
    return graph, source


@pytest.mark.asyncio
@pytest.mark.parametrize("mapping", ["simple", "async"])
async def test_a_host_task_runs_while_a_run_streams_at_full_speed(mapping: str) -> None:
    graph, source = flood_graph()
    # Credits for every batch: nothing ever waits, so only the engine's own yielding lets the host in.
    credits = TOTAL // BATCH + 1
    run = asyncio.ensure_future(aiod4p.run_async(graph, 1, mapping=mapping, batch_size=BATCH, credits=credits))
    seen: list[int] = []
    async with asyncio.timeout(50):
        while not run.done():
            seen.append(source.progress.produced)
            await asyncio.sleep(0)
        await run
    assert source.progress.produced == TOTAL
    midway = [p for p in seen if 0 < p < TOTAL]
    assert midway, "the host task never ran while the source was streaming"
    if mapping == "simple":  # counted, not timed: the host runs at least every YIELD_BATCHES batches
        assert len(midway) >= TOTAL // BATCH // YIELD_BATCHES // 2


BUSY_SECONDS = 2 * LONG_TURN  # a call that alone holds the loop long


def _calls_progress() -> wf.Shared:
    """Where a busy PE counts its calls, and says when the third one is done."""
    return wf.Shared(calls=0, under_way=asyncio.Event())


def _hold_the_loop(progress: wf.Shared) -> None:
    """Hold the loop for ``BUSY_SECONDS`` (CPU-bound, not threaded), counting the calls in ``progress``."""
    end = time.perf_counter() + BUSY_SECONDS
    while time.perf_counter() < end:
        pass
    progress.calls += 1
    if progress.calls == 3:
        progress.under_way.set()


class Busy(IterativePE):
    """Holds the loop for ``BUSY_SECONDS`` per item, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.progress = _calls_progress()

    def process_item(self, item: int) -> int:
        _hold_the_loop(self.progress)
        return item


class BusySink(ConsumerPE):
    """Holds the loop for ``BUSY_SECONDS`` per item, counting its calls; writes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.progress = _calls_progress()

    def consume(self, item: int) -> None:
        _hold_the_loop(self.progress)


class BusyFilter(IterativePE):
    """Holds the loop for ``BUSY_SECONDS`` per item, counting its calls; a plain generator that writes every
    tenth item."""

    def __init__(self) -> None:
        super().__init__()
        self.progress = _calls_progress()

    def process_item(self, item: int) -> Iterator[int]:
        _hold_the_loop(self.progress)
        if item % 10 == 0:
            yield item


@pytest.mark.asyncio
@pytest.mark.parametrize("batch_size", [1, DEFAULT_BATCH_SIZE])
@pytest.mark.parametrize(
    ("kind", "provenance"),
    [(Busy, None), (BusySink, None), (BusyFilter, None), (Busy, "item")],
    ids=["plain", "sink", "generator", "provenance-item"],
)
async def test_a_host_timer_due_during_a_pe_call_runs_as_soon_as_the_call_ends(
    kind: type[Busy | BusySink | BusyFilter], provenance: str | None, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy instance gives way to due timers too, not only to ready tasks: the host's lag is one call,
    also when a batch carries several calls (within a worker up to TURNS_TIME_FACTOR x batch_seconds of
    them, raised here above a call's length): it gives way between them, whether they are plain calls, a
    generator's, or made one by one by the provenance recorder."""
    monkeypatch.setattr("aiod4p._plan.TURNS_TIME_FACTOR", 25)
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", busy := kind(), "input")
    run = asyncio.ensure_future(aiod4p.run_async(graph, 25, batch_size=batch_size, provenance=provenance))
    calls_while_waiting = []
    async with asyncio.timeout(50):
        await busy.progress.under_way.wait()
        for _ in range(10):
            before = busy.progress.calls
            await asyncio.sleep(BUSY_SECONDS / 10)  # ok-sleep: a timer that falls due during the next call
            calls_while_waiting.append(busy.progress.calls - before)
        await run
    assert max(calls_while_waiting) <= 1, calls_while_waiting


class Short(IterativePE):
    """Holds the loop for ``SHORT_SECONDS`` per item (longer than a turn, shorter than a long one), counting
    its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.progress = _calls_progress()

    def process_item(self, item: int) -> int:
        end = time.perf_counter() + SHORT_SECONDS
        while time.perf_counter() < end:
            pass
        self.progress.calls += 1
        if self.progress.calls == 3:
            self.progress.under_way.set()
        return item


SHORT_SECONDS = (YIELD_SECONDS + LONG_TURN) / 2


@pytest.mark.asyncio
async def test_a_host_timer_due_between_the_parts_of_a_batch_runs_before_the_next_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between the parts of a batch the instance goes on computing at once: it gives way on a timer, so that
    the host's due timer runs first, even after a short turn. After ``sleep(0)`` the instance resumed first,
    and the host waited three calls for one. (Batches of several such calls, in parts of one: a batch within
    the worker carries TURNS_TIME_FACTOR x batch_seconds of work, raised here above a call's length.)"""
    monkeypatch.setattr("aiod4p._plan.TURNS_TIME_FACTOR", 25)
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", short := Short(), "input")
    run = asyncio.ensure_future(aiod4p.run_async(graph, 60))
    calls_while_waiting = []
    async with asyncio.timeout(50):
        await short.progress.under_way.wait()
        for _ in range(20):
            before = short.progress.calls
            await asyncio.sleep(SHORT_SECONDS / 10)  # ok-sleep: a timer that falls due during the next call
            calls_while_waiting.append(short.progress.calls - before)
        await run
    # Between batches it gives way by sleep(0) after a short turn: a tick there may wait two or three calls.
    assert statistics.median(calls_while_waiting) <= 1, calls_while_waiting


class Blocks(IterativePE):
    """Holds its thread (the event loop's, unless threaded) for ``seconds`` per item."""

    def __init__(self, seconds: float, threaded: bool = False) -> None:
        super().__init__()
        self.seconds = seconds
        self.threaded = threaded

    def process_item(self, item: int) -> int:
        time.sleep(self.seconds)  # ok-sleep: a PE that blocks its thread on purpose
        return item


@pytest.mark.asyncio
@pytest.mark.parametrize("mapping", ["simple", "async"])
async def test_a_pe_that_holds_the_loop_is_logged_once(
    mapping: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A service saw its loop stop for as long as a blocking PE's call, and nothing said why."""
    monkeypatch.setattr("aiod4p._engine.HELD_LOOP_WARNING", 0.05)
    for threaded in (False, True):
        graph = WorkflowGraph()
        graph.connect(wf.Range(3), "output", blocks := Blocks(0.06, threaded), "input")
        blocks.id = "blocks"
        caplog.clear()
        async with asyncio.timeout(20):
            got = await aiod4p.run_async(graph, 1, mapping=mapping)
        assert len(got) == 3
        held = [r.getMessage() for r in caplog.records if "held the event loop" in r.getMessage()]
        if threaded:
            assert held == []  # its calls hold a thread of the pool, never the loop
        else:
            assert len(held) == 1 and re.match(r"PE blocks held the event loop for \d+\.\d s in one go", held[0])
            assert "threaded = True, or aiod4p run --threaded blocks" in held[0]


@pytest.mark.asyncio
async def test_many_short_calls_in_one_batch_of_the_simple_mapping_are_not_blamed_on_the_pe(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The simple mapping makes a batch's calls in one go by design: 20 calls of 5 ms held the loop 0.1 s, and the
    bundled sentiment example (256 calls of 4 ms) was told that its scorer blocks and belongs in a thread."""
    monkeypatch.setattr("aiod4p._engine.HELD_LOOP_WARNING", 0.05)
    graph = WorkflowGraph()
    graph.connect(wf.Range(20), "output", Blocks(0.005), "input")
    async with asyncio.timeout(20):
        got = await aiod4p.run_async(graph, 1, mapping="simple")
    assert len(got) == 20
    assert [r.getMessage() for r in caplog.records if "held the event loop" in r.getMessage()] == []


RUNS_SIDE_BY_SIDE = 24


async def _progress_per_host_turn(runs: int) -> float:
    """The median number of items that ``runs`` flooding runs, side by side in this loop, produce between two
    turns of a host task."""
    graphs = [flood_graph() for _ in range(runs)]
    credits = TOTAL // BATCH + 1  # as above: only the engine's own yielding lets the host in
    tasks = [
        asyncio.ensure_future(aiod4p.run_async(graph, 1, mapping="async", batch_size=BATCH, credits=credits))
        for graph, _ in graphs
    ]

    def produced() -> int:
        return sum(source.progress.produced for _, source in graphs)

    steps: list[int] = []
    async with asyncio.timeout(100):
        before = produced()
        while not all(task.done() for task in tasks):
            await asyncio.sleep(0)
            now = produced()
            if 0 < now < runs * TOTAL:
                steps.append(now - before)
            before = now
        await asyncio.gather(*tasks)
    assert steps, "the host task never ran while the sources were streaming"
    return statistics.median(steps)


@pytest.mark.asyncio
async def test_runs_side_by_side_share_one_slice_of_the_loop() -> None:
    """A service ran 50 requests' runs at once and its loop lagged 50 slices: each run kept its own turn clock.

    The slice is the loop's: however many runs share it, the host's tasks run once it has been held
    ``YIELD_SECONDS``, so the work done between two host turns does not grow with the number of runs (one batch
    more per run at most).

    A run alone is measured before and after, and the more of the two taken: the first run of the test made half
    as much between two turns as the next ones (5,460 against 9,440-10,520 items, quiet), and a CPU taken by
    another process meanwhile makes less too (2,410 against 10,220 side by side, in CI's two test processes).
    """
    before = await _progress_per_host_turn(1)
    side_by_side = await _progress_per_host_turn(RUNS_SIDE_BY_SIDE)
    alone = max(before, await _progress_per_host_turn(1))
    assert side_by_side < 4 * alone + RUNS_SIDE_BY_SIDE * BATCH, (before, alone, side_by_side)


class Burst(ProducerPE):
    """Writes ``RESULTS_IN_A_BURST`` results at once, at the end: the reader gets them as one batch."""

    def produce(self) -> None:
        pass

    def postprocess(self) -> None:
        for item in range(RESULTS_IN_A_BURST):
            self.write("output", item)


RESULTS_IN_A_BURST = 40


@pytest.mark.asyncio
@pytest.mark.parametrize("mapping", ["async", "multi"])
async def test_a_reader_working_on_each_result_lets_the_host_run(mapping: str) -> None:
    """A service wrote each result to its client (work per result) and its loop stood still for a whole batch
    of results: they were handed out without a suspension. The reader now lets the loop run its other tasks
    once it has read for ``YIELD_SECONDS``."""
    graph = WorkflowGraph()
    graph.add(Burst())
    host_turns = 0

    async def host() -> None:
        nonlocal host_turns
        while True:
            await asyncio.sleep(0)
            host_turns += 1

    ticker = asyncio.create_task(host())
    read_between_turns: list[int] = []
    async with asyncio.timeout(60), aiod4p.start(graph, 1, mapping=mapping, workers=2) as run:
        seen = host_turns
        async for _ in run:
            end = time.perf_counter() + YIELD_SECONDS / 2  # the reader's work on the result: CPU, not a wait
            while time.perf_counter() < end:
                pass
            if host_turns == seen:
                read_between_turns[-1:] = [read_between_turns[-1] + 1] if read_between_turns else [1]
            else:
                read_between_turns.append(1)
                seen = host_turns
    ticker.cancel()
    assert sum(read_between_turns) == RESULTS_IN_A_BURST
    assert max(read_between_turns) <= 3, read_between_turns  # two results of YIELD_SECONDS / 2, and a margin
