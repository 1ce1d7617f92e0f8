"""Engine behaviour found in review: flushing, draining, failures, feeds of parallel roots."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import workflows as wf
from conftest import MappingCase
from helpers import aiod4p_cli

import aiod4p
from aiod4p import GenericPE, IterativePE, PeerDied, PEError, ProducerPE, WorkflowGraph, group_by
from aiod4p._engine import _COMPARED, _Candidates, _supervise
from aiod4p._plan import DEFAULT_BATCH_SIZE


class Burst(ProducerPE):
    """Yields ``total`` items from one call, counting how many it has produced so far."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.produced = 0

    def produce(self) -> Iterator[tuple[int, int]]:
        for index in range(self.total):
            self.produced += 1
            yield index % 7, index


class FirstSight(GenericPE):
    """Records how far the source had got when the first item arrived here."""

    def __init__(self, source: Burst) -> None:
        super().__init__(inputs=[("input", group_by(0))], outputs=["output"], parallelism=2)
        self.source = source
        self.source_progress_at_first_item: int | None = None
        self.seen = 0

    def process(self, inputs: dict[str, Any]) -> None:
        if self.source_progress_at_first_item is None:
            self.source_progress_at_first_item = self.source.produced
        self.seen += 1


def test_group_by_outputs_of_a_streaming_source_flow_before_it_ends() -> None:
    graph = WorkflowGraph()
    source = Burst(20_000)
    graph.connect(source, "output", sink := FirstSight(source), "input")
    run = aiod4p.start(graph, 1, mapping="async", batch_size=10, credits=2)

    async def main() -> None:
        async with asyncio.timeout(30):
            await run.results()

    asyncio.run(main())
    first = [s.source_progress_at_first_item for s in run.instances(sink) if s.source_progress_at_first_item]
    assert first
    assert min(first) < 1_000  # back-pressure, not 20,000 items piled up
    for entry in run.stats:
        assert entry.max_queued_items <= entry.inflight_bound


class SlowStart(ProducerPE):
    """An endless async source whose preprocess takes a while."""

    async def preprocess(self) -> None:
        await asyncio.sleep(0.05)  # work, not synchronisation

    async def produce(self) -> AsyncIterator[int]:
        value = 0
        while True:
            yield value
            value += 1
            await asyncio.sleep(0)


async def test_drain_before_a_live_source_starts_still_ends_the_run() -> None:
    graph = WorkflowGraph()
    graph.connect(SlowStart(), "output", wf.Double(), "input")
    async with asyncio.timeout(10), aiod4p.start(graph) as run:
        run.drain()
        await run.results()
    assert run.done


async def test_cancelling_right_after_start_ends_the_run() -> None:
    graph = WorkflowGraph()
    graph.connect(SlowStart(), "output", wf.Double(), "input")
    task = asyncio.create_task(aiod4p.run_async(graph))
    await asyncio.sleep(0)  # let the run start: the point of this test is an early cancel
    task.cancel()
    async with asyncio.timeout(10):
        with pytest.raises(asyncio.CancelledError):
            await task


class Finisher(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=[])
        self.state = wf.Shared(finished=False)

    def process(self, inputs: dict[str, Any]) -> None:
        pass

    def postprocess(self) -> None:
        self.state.finished = True


def test_downstream_postprocess_does_not_run_after_an_upstream_failure() -> None:
    graph = WorkflowGraph()
    fail, finisher = wf.Fail(on=5), Finisher()
    graph.connect(wf.Count(), "output", fail, "input")
    graph.connect(fail, "output", finisher, "input")
    with pytest.raises(PEError, match=fail.id):
        aiod4p.run(graph, 100, mapping="async")
    assert not finisher.state.finished


_ESCAPED = "which Python turns into a RuntimeError when it escapes a generator or coroutine"


@pytest.mark.parametrize(
    "mapping",
    [MappingCase("simple", None), MappingCase("async", None), MappingCase("multi", 2)],
    ids=lambda case: case.id,
)
def test_a_stop_iteration_out_of_a_pe_is_named_with_its_line(mapping: MappingCase) -> None:
    """A ``StopIteration`` out of a plain method, or out of a generator source, failed the run with the
    ``RuntimeError`` Python replaced it with, without the file, line and item that every other exception's
    message names: ``RuntimeError: coroutine raised StopIteration`` (the engine's coroutine, about a plain
    method) or ``RuntimeError: generator raised StopIteration``."""
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", wf.Fail(on=3, raises=StopIteration), "input")
    with pytest.raises(PEError) as caught:
        mapping.run(graph, 10)
    line = wf.Fail.process_item.__code__.co_firstlineno + 2
    where = f"({wf.__file__}, line {line}, in process_item; item=3)"
    assert str(caught.value).endswith(f"failed on input port 'input': StopIteration: bad item 3 {where}, {_ESCAPED}")
    assert "RuntimeError: coroutine raised StopIteration" in caught.value.traceback_text
    graph = WorkflowGraph()
    graph.connect(wf.StopsEarly(), "output", wf.Double(), "input")
    with pytest.raises(PEError) as caught:
        mapping.run(graph)
    line = wf.StopsEarly.produce.__code__.co_firstlineno + 2
    where = f"({wf.__file__}, line {line}, in produce)"
    assert str(caught.value).endswith(f"failed on feed: StopIteration {where}, {_ESCAPED}")
    assert "RuntimeError: generator raised StopIteration" in caught.value.traceback_text


class ExitsInGenerator(IterativePE):
    def process_item(self, item: int) -> Iterator[int]:
        yield item
        if item == 3:
            raise GeneratorExit("bad item 3")


class ExitsAsync(IterativePE):
    async def process_item(self, item: int) -> int:
        if item == 3:
            raise GeneratorExit("bad item 3")
        return item


class ExitsThreaded(wf.Fail):
    threaded = True

    def __init__(self) -> None:
        super().__init__(on=3, raises=GeneratorExit)


class ExitsInPostprocess(wf.FailsAtEnd):
    def __init__(self) -> None:
        super().__init__(GeneratorExit, "bad item 3")


class ExitsAsSource(ProducerPE):
    async def produce(self) -> AsyncIterator[int]:
        yield 1
        raise GeneratorExit("bad item 3")


@pytest.mark.parametrize(
    "mapping",
    [MappingCase("simple", None), MappingCase("async", None), MappingCase("multi", 2)],
    ids=lambda case: case.id,
)
@pytest.mark.parametrize(
    ("make", "port"),
    [
        (ExitsInGenerator, "input"),
        (ExitsAsync, "input"),
        (ExitsThreaded, "input"),
        (ExitsInPostprocess, "postprocess"),
        (ExitsAsSource, "feed"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_a_generator_exit_the_pe_raises_fails_the_run_naming_it(
    mapping: MappingCase, make: type[IterativePE | ProducerPE], port: str
) -> None:
    """A ``GeneratorExit`` that a PE's code raised itself (or a library it calls) was taken for the close of the
    engine's coroutine: simple and async failed with ``RuntimeError: coroutine ignored GeneratorExit``, naming no
    PE, and a multi worker died (``WorkerDied: worker process 1 ... exited with code 1``)."""
    graph = WorkflowGraph()
    pe = make()
    if isinstance(pe, ProducerPE):
        graph.connect(pe, "output", wf.Double(), "input")
        inputs = None
    else:
        graph.connect(wf.Count(), "output", pe, "input")
        inputs = 10
    with pytest.raises(PEError) as caught:
        mapping.run(graph, inputs)
    assert (caught.value.pe, caught.value.port) == (pe.id, port)
    assert "GeneratorExit: bad item 3" in str(caught.value)


class CallCounter(ProducerPE):
    def __init__(self) -> None:
        super().__init__(parallelism=3)

    def produce(self) -> int:
        return self.instance


COUNTS = [0, 1, 2, 10]
_COUNTED: dict[str, dict[int, int]] = {}


def counted(mapping: MappingCase) -> dict[int, int]:
    """How many results each count gave: one parallel root per count, side by side in one run (a
    launch per mapping instead of one per count and mapping), each root fed its own count."""
    if mapping.id not in _COUNTED:
        graph = WorkflowGraph()
        doubles: dict[int, wf.Double] = {}
        inputs: dict[str, int] = {}
        for calls in COUNTS:
            root, doubles[calls] = CallCounter(), wf.Double()
            graph.connect(root, "output", doubles[calls], "input")
            inputs[root.id] = calls
        results = mapping.run(graph, inputs)
        assert {record.pe for record in results.records} <= {double.id for double in doubles.values()}
        _COUNTED[mapping.id] = {calls: len(results.data(double.id)) for calls, double in doubles.items()}
    return _COUNTED[mapping.id]


@pytest.mark.parametrize("calls", COUNTS)
def test_a_count_is_shared_out_among_a_parallel_root(mapping: MappingCase, calls: int) -> None:
    assert counted(mapping)[calls] == calls


def test_an_iterable_feed_goes_to_one_instance_of_a_parallel_root(mapping: Any) -> None:
    graph = WorkflowGraph()
    double = wf.Double()
    double.parallelism = 2
    graph.connect(double, "output", wf.SumAtEnd(), "input")
    assert mapping.run(graph, {double: [1, 2, 3]}).data() == [12]


class Ticker(GenericPE):
    """A root whose process() is an endless generator."""

    def __init__(self) -> None:
        super().__init__(outputs=["output"])

    def process(self, inputs: dict[str, Any]) -> Iterator[dict[str, int]]:
        value = 0
        while True:
            yield {"output": value}
            value += 1


async def test_drain_stops_a_generator_process_source() -> None:
    graph = WorkflowGraph()
    graph.connect(Ticker(), "output", wf.Double(), "input")
    async with asyncio.timeout(10), aiod4p.start(graph) as run:
        received = 0
        async for _ in run:
            received += 1
            if received == 1000:
                run.drain()
    assert received >= 1000


class WritingTicker(GenericPE):
    """A root whose process() writes 0, 1, 2, ... in an endless loop (dispel4py's usual live source); says in
    ``state`` that its loop was left (its ``finally`` ran), and writes -1 in postprocess."""

    def __init__(self) -> None:
        super().__init__(outputs=["output"])
        self.state = wf.Shared(left=False)

    def process(self, inputs: dict[str, Any]) -> None:
        try:
            for value in itertools.count():
                self.write("output", value)
        finally:
            self.state.left = True

    def postprocess(self) -> None:
        for _ in range(3 * DEFAULT_BATCH_SIZE):  # past a hand-over: the postprocess of a drained source is made
            self.write("output", -1)


@pytest.mark.parametrize(("mapping", "threaded"), [("async", False), ("async", True), ("multi", False)])
async def test_drain_stops_a_source_whose_call_writes_in_an_endless_loop(mapping: str, threaded: bool) -> None:
    """A first SIGTERM or Ctrl-C never ended such a run: only generator sources stopped, at their next item. The
    call now ends at a write() once the run drains, as a generator would, and its postprocess runs."""
    graph = WorkflowGraph()
    graph.connect(source := WritingTicker(), "output", wf.Double(), "input")
    source.threaded = threaded
    async with asyncio.timeout(30), aiod4p.start(graph, mapping=mapping, workers=2) as run:
        received = []
        async for record in run:
            received.append(record.data)
            if len(received) == 1000:
                run.drain()
    assert received.count(-2) == 3 * DEFAULT_BATCH_SIZE
    assert mapping != "async" or source.state.left


class CountingCalls(ProducerPE):
    """Emits 0, 1, 2, ...; counts its calls, and those made once ``state.draining`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.state = wf.Shared(draining=False, calls=0, calls_after=0)

    def produce(self) -> int:
        self.state.calls_after += self.state.draining
        self.state.calls += 1
        return self.state.calls - 1


@pytest.mark.parametrize("mapping", ["simple", "async"])
async def test_a_drain_makes_no_further_call_of_a_source(mapping: str) -> None:
    """``-i N`` asks for N calls: those not made when the run drains are no items in flight, and are dropped."""
    graph = WorkflowGraph()
    graph.connect(source := CountingCalls(), "output", wf.Double(), "input")
    async with asyncio.timeout(20), aiod4p.start(graph, 10**6, mapping=mapping, batch_size=8) as run:
        received = 0
        async for _ in run:
            received += 1
            if received == 1:
                source.state.draining = True  # no call of the source is under way: this task holds the loop
                run.drain()
    assert source.state.calls_after == 0
    assert received == source.state.calls  # every item made before the drain still arrives


class HeavyCalls(CountingCalls):
    """CountingCalls taking 2 ms of CPU a call (on the loop: not threaded); sets ``state.under_way`` at its
    third call."""

    def __init__(self) -> None:
        super().__init__()
        self.state.under_way = asyncio.Event()

    def produce(self) -> int:
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass
        if self.state.calls == 2:
            self.state.under_way.set()
        return super().produce()


async def test_a_drain_makes_no_further_call_of_a_source_within_its_batch_of_calls() -> None:
    """A source's batch of feed elements (256 calls or more, its first one too) is called in parts of about
    5 ms, and the loop's other tasks run between them: the host drains mid-batch, and the source makes no
    further call, as between batches. It held the loop for its whole first batch, and later went on to the
    end of the batch under way."""
    graph = WorkflowGraph()
    graph.connect(source := HeavyCalls(), "output", wf.Double(), "input")
    async with asyncio.timeout(20), aiod4p.start(graph, 10**6, mapping="async") as run:
        await source.state.under_way.wait()
        source.state.draining = True
        run.drain()
        received = [item async for item in run]
    assert source.state.calls < 256
    assert source.state.calls_after == 0
    assert len(received) == source.state.calls  # every item made before the drain still arrives


def test_a_bad_group_by_key_fails_alike_with_one_or_many_instances(mapping: Any) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", who := wf.WhoSawWhat(group_by(3), parallelism=None), "input")
    with pytest.raises(PEError, match=rf"cannot route item 0 to {who.id}.input: its group_by\[3\] key failed"):
        mapping.run(graph, 5)


def test_thousands_of_instances_share_a_stream_each_item_once() -> None:
    """``-n 3000`` on async: the choice of the freest instance and the end of the run scale with the instances
    (comparing all of them per batch, and waiting on all of them again as each ended, took minutes)."""
    graph = WorkflowGraph()
    graph.connect(wf.Range(30_000), "output", wf.WhoSawWhat(parallelism=None), "input")
    seen = aiod4p.run(graph, mapping="async", workers=3000).data()
    assert sorted(item for _, item in seen) == list(range(30_000))
    assert len({instance for instance, _ in seen}) == 3000


def test_the_freest_of_many_candidates_is_chosen_among_a_window_that_comes_round_to_all() -> None:
    candidates = _Candidates(list(range(40)))  # type: ignore[arg-type]  # only compared() is called here
    windows = [candidates.compared() for _ in range(5)]
    assert all(len(window) == _COMPARED for window in windows)
    assert set().union(*windows[:3]) == set(range(40))  # every candidate within len / _COMPARED choices
    assert windows[2] == [*range(32, 40), *range(8)]  # the window wraps round
    few = _Candidates(list(range(_COMPARED)))  # type: ignore[arg-type]
    assert few.compared() == few.compared() == list(range(_COMPARED))  # up to _COMPARED: all of them, always


async def test_supervising_raises_the_first_failure_and_lets_cancelled_tasks_end() -> None:
    release = asyncio.Event()

    async def waits() -> None:
        await release.wait()

    async def fails() -> None:
        raise ValueError("broken")

    async with asyncio.timeout(10):
        cancelled, waiting = asyncio.create_task(waits()), asyncio.create_task(waits())
        cancelled.cancel()
        supervising = asyncio.create_task(_supervise([cancelled, waiting], []))
        await asyncio.sleep(0)  # let the cancelled task end: its end is not a failure
        assert not supervising.done()
        release.set()
        await supervising  # every primary task done
        release.clear()
        primary, secondary = asyncio.create_task(waits()), asyncio.create_task(fails())
        with pytest.raises(ValueError, match="broken"):
            await _supervise([primary], [secondary])
        primary.cancel()


async def test_supervising_raises_a_failure_that_came_before_it() -> None:
    """A worker's instances finished, and its link's tasks failed (the peer closed its channels) before the
    worker supervised them: the run ended as if it had succeeded, and asyncio logged "Task exception was never
    retrieved" for each of them."""

    async def fails() -> None:
        raise PeerDied("worker 1 closed its channels before finishing")

    async with asyncio.timeout(10):
        primary, secondary = asyncio.create_task(fails()), asyncio.create_task(fails())
        await asyncio.wait([primary, secondary])
        with pytest.raises(PeerDied, match="closed its channels"):
            await _supervise([primary], [])
        with pytest.raises(PeerDied, match="closed its channels"):
            await _supervise([], [secondary])


SLIDING_WINDOW = """
from aiod4p import IterativePE, ProducerPE, WorkflowGraph


class Numbers(ProducerPE):
    def produce(self):
        yield from range(6)


class Slide(IterativePE):
    # A window of three items, written as it is, then slid: dispel4py's mpi mapping copied it at each write.
    def __init__(self):
        super().__init__(parallelism=1)
        self.window = []

    def process_item(self, item):
        self.window.append(item)
        if len(self.window) == 3:
            self.write("output", self.window)
            self.window.pop(0)


class Fresh(IterativePE):
    # A new list, and the same immutable objects, for every item: nothing to warn about.
    def process_item(self, item):
        self.write("output", [item])
        self.write("output", "same")
        self.write("output", None)


graph = WorkflowGraph()
graph.connect(Numbers(), "output", Slide(), "input")
graph.connect(Numbers(), "output", Fresh(), "input")
"""


@pytest.mark.parametrize("mapping", ["simple", "async", "multi", "mpi"])
def test_writing_one_mutable_object_twice_is_logged_once(mapping: str, tmp_path: Path) -> None:
    """A migrant's sliding-window PE gave the right windows on dispel4py's mpi mapping and the last window over
    and over on aiod4p's, silently."""
    (tmp_path / "window.py").write_text(SLIDING_WINDOW)
    done = aiod4p_cli("run", "window.py", "-m", mapping, "-n", "2", "--results", "out.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4 + 18
    warned = [line for line in done.stderr.splitlines() if "wrote the same" in line]
    assert len(warned) == 1 and "PE Slide1 wrote the same list object twice on output 'output'" in warned[0]
    assert "Write a copy instead" in warned[0]


class _SameArray(wf.Double):
    """Writes its one array, changed, for every item."""

    def __init__(self, numpy: Any) -> None:
        super().__init__()
        self.array = numpy.zeros(4)

    def process_item(self, item: int) -> Any:
        self.array[0] = item
        return self.array


class _FreshArray(wf.Double):
    """A new array for every item, the last one freed first: its address may be the next one's."""

    def process_item(self, item: int) -> Any:
        import numpy

        return numpy.full(4, item)


def test_an_array_written_twice_is_logged_and_fresh_arrays_are_not(caplog: pytest.LogCaptureFixture) -> None:
    """An array, the heavy item, is remembered by a weak reference between batches (one item each here), so that
    the check keeps none alive: the same one written again is logged, a fresh one each time is not."""
    numpy = pytest.importorskip("numpy")
    graph = WorkflowGraph()
    same, fresh = _SameArray(numpy), _FreshArray()
    same.id, fresh.id = "same", "fresh"
    graph.connect(numbers := wf.Range(6), "output", same, "input")
    graph.connect(numbers, "output", fresh, "input")
    aiod4p.run(graph, 1, mapping="async", batch_size=1)
    warned = [r.getMessage() for r in caplog.records if "wrote the same" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("PE same wrote the same ndarray object twice")
