"""The behaviour every mapping must share, run on each of them (see conftest.MAPPING_CASES)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import workflows as wf
from conftest import MappingCase
from helpers import add_graph

import aiod4p
from aiod4p import ALL, GLOBAL, IterativePE, PEError, Results, WorkflowGraph, chain, group_by


def _connection_grouping_graph() -> WorkflowGraph:
    graph = WorkflowGraph()
    tag, who = wf.Tag(), wf.WhoSawWhat(None, parallelism=2)
    graph.connect(wf.Count(), "output", tag, "input")
    graph.connect(tag, "output", who, "input", grouping=ALL)
    return graph


def _nested_composites_graph() -> WorkflowGraph:
    graph = WorkflowGraph()
    inner = chain(wf.Double(), wf.Double())
    outer = chain(inner, wf.lambda_free_increment)
    graph.connect(wf.Count(), "output", outer, "input")
    return graph


def _postprocess_graph() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", wf.SumAtEnd(), "input")
    return graph


# The graphs of the tests below that feed their roots a count, and each one's count: they run side by
# side as one workflow, once per mapping (a launch per mapping, as tests/test_differential.py runs the
# examples, instead of one per test and mapping); each test checks its own graph's results.
SIDE_BY_SIDE: dict[str, tuple[Callable[[], WorkflowGraph], int]] = {
    "pipeline": (lambda: wf.pipeline(3)[0], 100),
    "group_by": (lambda: wf.grouping_graph(group_by(0), parallelism=3), 300),
    "mixed_keys": (lambda: wf.mixed_number_keys(float, np.float32, Fraction, Decimal), 40),
    "key_function": (lambda: wf.grouping_graph(group_by(key=wf.first_element), parallelism=2), 50),
    "all": (lambda: wf.grouping_graph(ALL, parallelism=3), 40),
    "global": (lambda: wf.grouping_graph(GLOBAL, parallelism=None), 60),
    "shuffle": (lambda: wf.grouping_graph(None, parallelism=3), 90),
    "connection_grouping": (_connection_grouping_graph, 10),
    "fan_out_in": (wf.fan_out_in, 20),
    "multi_edge": (wf.multi_edge, 10),
    "composite": (wf.composite_graph, 10),
    "nested_composites": (_nested_composites_graph, 5),
    "postprocess": (_postprocess_graph, 100),
}
_SIDE_BY_SIDE_RUNS: dict[str, dict[str, tuple[WorkflowGraph, Results]]] = {}


def side_by_side(mapping: MappingCase, name: str) -> tuple[WorkflowGraph, Results]:
    """Graph ``name`` of :data:`SIDE_BY_SIDE` and its results (its own PEs' records) on ``mapping``."""
    if mapping.id not in _SIDE_BY_SIDE_RUNS:
        combined = WorkflowGraph()
        inputs: dict[str, int] = {}
        parts: dict[str, WorkflowGraph] = {}
        for key, (build, count) in SIDE_BY_SIDE.items():
            parts[key] = graph = build()
            add_graph(combined, graph)
            inputs.update(dict.fromkeys(graph.flatten().roots(), count))
        records = mapping.run(combined, inputs).records
        runs = {}
        for key, graph in parts.items():
            pes = graph.flatten().pes
            runs[key] = graph, Results([record for record in records if record.pe in pes])
        assert sum(len(results) for _, results in runs.values()) == len(records)
        _SIDE_BY_SIDE_RUNS[mapping.id] = runs
    return _SIDE_BY_SIDE_RUNS[mapping.id][name]


def test_pipeline_results(mapping: MappingCase) -> None:
    graph, results = side_by_side(mapping, "pipeline")
    assert sorted(results.data()) == [i * 8 for i in range(100)]
    assert {(r.pe, r.port) for r in results} == {(graph.pes[-1].id, "output")}


def test_group_by_sends_each_key_to_exactly_one_instance(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "group_by")
    instances_per_key: dict[int, set[int]] = defaultdict(set)
    for instance, (key, _item) in results.data():
        instances_per_key[key].add(instance)
    assert set(instances_per_key) == set(range(5))
    assert all(len(seen) == 1 for seen in instances_per_key.values())
    assert sorted(item for _, (_, item) in results.data()) == list(range(300))


def test_group_by_sends_equal_keys_of_other_number_types_to_one_instance(mapping: MappingCase) -> None:
    # np.float32(0.5) == 0.5 == Fraction(1, 2) in Python: one key, whichever branch (a FITS column, a
    # Python computation) it came from.
    _, results = side_by_side(mapping, "mixed_keys")
    instances_per_key: dict[float, set[int]] = defaultdict(set)
    for instance, (key, _item) in results.data():
        instances_per_key[float(key)].add(instance)
    assert sorted(instances_per_key) == [key + 0.5 for key in range(10)]
    assert all(len(seen) == 1 for seen in instances_per_key.values()), instances_per_key
    assert len(results) == 4 * 40


def test_group_by_key_function(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "key_function")
    instances_per_key: dict[int, set[int]] = defaultdict(set)
    for instance, (key, _item) in results.data():
        instances_per_key[key].add(instance)
    assert all(len(seen) == 1 for seen in instances_per_key.values())
    assert len(results) == 50


def test_all_gives_every_instance_every_item(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "all")
    per_instance = Counter(instance for instance, _ in results.data())
    parallelism = 1 if mapping.name == "simple" else 3
    assert per_instance == dict.fromkeys(range(parallelism), 40)
    for instance in range(parallelism):
        assert sorted(item for i, (_, item) in results.data() if i == instance) == list(range(40))


def test_global_sends_everything_to_one_instance(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "global")
    assert {instance for instance, _ in results.data()} == {0}
    assert len(results) == 60


def test_shuffle_spreads_over_instances(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "shuffle")
    per_instance = Counter(instance for instance, _ in results.data())
    assert sum(per_instance.values()) == 90
    if mapping.name != "simple":
        assert set(per_instance) == {0, 1, 2}


def test_connection_grouping_overrides_the_port(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "connection_grouping")
    expected = 10 * (1 if mapping.name == "simple" else 2)
    assert len(results) == expected


def test_fan_out_and_fan_in(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "fan_out_in")
    by_port = Counter(port for port, _ in results.data())
    assert by_port == {"left": 20, "right": 20}
    assert sorted(item for port, item in results.data() if port == "left") == [2 * i for i in range(20)]


def test_two_connections_between_the_same_ports_are_two_edges(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "multi_edge")
    assert sorted(results.data()) == sorted([2 * i for i in range(10)] * 2)


def test_composite_chain(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "composite")
    assert sorted(results.data()) == [((i * 2) + 1) * 2 for i in range(10)]


def test_nested_composites(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "nested_composites")
    assert sorted(results.data()) == [i * 4 + 1 for i in range(5)]


def test_write_in_postprocess(mapping: MappingCase) -> None:
    _, results = side_by_side(mapping, "postprocess")
    assert results.data() == [sum(range(100))]


def test_async_process_and_generator_source(mapping: MappingCase) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Range(500), "output", wf.AsyncDouble(), "input")
    assert sorted(mapping.run(graph).data()) == [2 * i for i in range(500)]


def test_function_pes(mapping: MappingCase) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.count_to_five(), "output", wf.square(), "input")
    graph.connect(wf.count_to_five(), "output", wf.square(name="other"), "input")
    results = mapping.run(graph)
    assert sorted(results.data()) == sorted([i * i for i in range(5)] * 2)


def test_explicit_inputs_per_root(mapping: MappingCase) -> None:
    graph = WorkflowGraph()
    double = wf.Double()
    graph.connect(double, "output", wf.SumAtEnd(), "input")
    results = mapping.run(graph, {double.id: [{"input": 1}, {"input": 2}, 3]})
    assert results.data() == [12]


def test_a_raising_pe_fails_the_run_with_its_name(mapping: MappingCase) -> None:
    graph = WorkflowGraph()
    fail = wf.Fail(on=3)
    graph.connect(wf.Count(), "output", fail, "input")
    graph.connect(fail, "output", wf.Discard(), "input")
    with pytest.raises(PEError) as caught:
        mapping.run(graph, 1000)
    assert caught.value.pe == fail.id
    assert caught.value.port == "input"
    assert "bad item 3" in str(caught.value)
    assert "ValueError" in caught.value.traceback_text


def test_a_raising_pe_hands_on_the_results_it_wrote_before(mapping: MappingCase) -> None:
    """The results a PE wrote before it raised were lost when they had not filled a batch yet: a reader of
    the run's results (``--results FILE``) got none of the 517 on simple, the first 256 on async."""
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", fail := wf.Fail(on=517), "input")
    fail.parallelism = 1
    got: list[int] = []

    async def main() -> None:
        async with asyncio.timeout(60):
            async for record in aiod4p.start(graph, 1000, mapping=mapping.name, workers=mapping.workers):
                got.append(record.data)

    with pytest.raises(PEError) as caught:
        asyncio.run(main())
    assert caught.value.pe == fail.id
    assert sorted(got) == list(range(517))


@pytest.mark.parametrize(
    ("mapping", "raised"),
    [
        *(
            (MappingCase(*case), raised)
            for case in [("simple", None), ("async", None), ("multi", 2), ("mpi", 2)]
            for raised in (SystemExit, wf.Escape)
        ),
        *((MappingCase(*case), GeneratorExit) for case in [("simple", None), ("async", None), ("multi", 2)]),
        (MappingCase("ray", 2), SystemExit),
        (MappingCase("ray", 2), KeyboardInterrupt),
    ],
    ids=lambda value: getattr(value, "id", getattr(value, "__name__", "")),
)
def test_a_pe_that_exits_fails_the_run_with_its_name(mapping: MappingCase, raised: type[BaseException]) -> None:
    """``sys.exit()`` in a PE (or in a library it calls) ended the process silently with the PE's code, a worker
    without naming the PE, and a Ray actor's event loop with the run waiting for it forever; so did a
    ``KeyboardInterrupt`` that the PE raised there (no signal raises one in an actor's loop). A library's own
    ``BaseException`` ended the process with a traceback, and a worker or rank without naming the PE. A
    ``GeneratorExit`` that the PE raised (not a close of the engine's coroutine) failed simple and async with
    ``RuntimeError: coroutine ignored GeneratorExit`` and ended a multi worker without naming the PE."""
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", fail := wf.Fail(on=3, raises=raised), "input")
    with pytest.raises(PEError) as caught:
        mapping.run(graph, 10)
    assert (caught.value.pe, caught.value.port) == (fail.id, "input")
    assert f"{raised.__name__}: bad item 3" in str(caught.value)


@pytest.mark.parametrize(("on", "port"), [(3, "input"), (None, "postprocess")])
def test_a_cancelled_error_out_of_a_pe_fails_the_run(mapping: MappingCase, on: int | None, port: str) -> None:
    """It ended the instance as if it had finished: the run succeeded with the results it had so far."""
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", bad := wf.AwaitsACancelledTask(on), "input")
    graph.connect(bad, "output", wf.Double(), "input")
    with pytest.raises(PEError) as caught:
        mapping.run(graph, 10)
    assert (caught.value.pe, caught.value.port) == (bad.id, port)
    assert "CancelledError" in str(caught.value)


def test_a_cancelled_error_out_of_an_async_source_fails_the_run(mapping: MappingCase) -> None:
    """It ended the source's stream as if the source had finished: the run succeeded on part of its input."""
    graph = WorkflowGraph()
    graph.connect(source := wf.YieldsThenAwaitsACancelledTask(), "output", wf.Double(), "input")
    with pytest.raises(PEError, match="CancelledError, though nothing cancelled it") as caught:
        mapping.run(graph)
    assert caught.value.pe == source.id


@pytest.mark.parametrize(
    "mapping",
    [MappingCase(*case) for case in [("async", None), ("multi", 2), ("mpi", 2), ("ray", 2)]],
    ids=lambda case: case.id,
)
def test_a_run_drained_before_it_starts_runs_nothing(mapping: MappingCase) -> None:
    """Workers got the drain as a message once their sources had produced for a while: thousands of results on
    multi and mpi (14,592 of a list fed to mpi), none on async."""
    sourced, fed = WorkflowGraph(), WorkflowGraph()
    sourced.connect(source := wf.Range(10**6), "output", wf.Double(), "input")
    fed.connect(root := wf.Double(), "output", wf.Double(), "input")

    async def main(graph: WorkflowGraph, inputs: object) -> int:
        run = aiod4p.start(graph, inputs, mapping=mapping.name, workers=mapping.workers)
        run.drain()
        async with asyncio.timeout(60):
            return len(await run.results())

    assert asyncio.run(main(sourced, {source: 1})) == 0
    assert asyncio.run(main(fed, {root: list(range(10**6))})) == 0


def test_an_mpi_run_drained_while_its_ranks_start_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """drain() once the job was prepared, while mpiexec started the ranks (a second, say): the job went out as
    prepared, not drained, and the Drain message reached the ranks once their sources had produced for a while
    (25,000 to 42,000 results of an endless source)."""
    from aiod4p.mappings import mpi

    prepare = mpi.prepare_job

    def prepared_then_drained(*args: Any) -> Any:
        job = prepare(*args)
        args[-1].drain()  # the run's RunControl
        return job

    monkeypatch.setattr(mpi, "prepare_job", prepared_then_drained)
    graph = WorkflowGraph()
    graph.connect(source := wf.Range(10**6), "output", wf.Double(), "input")

    async def main() -> int:
        run = aiod4p.start(graph, {source: 1}, mapping="mpi", workers=2)
        async with asyncio.timeout(60):
            return len(await run.results())

    assert asyncio.run(main()) == 0


def test_writing_an_undeclared_port_fails_with_pe_and_port(mapping: MappingCase) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", bad := wf.WritesNowhere(), "input")
    with pytest.raises(PEError, match=rf"{bad.id}.*undeclared output port 'nowhere'"):
        mapping.run(graph, 3)


def test_a_raising_postprocess_fails_the_run(mapping: MappingCase) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", bad := wf.FailsAtEnd(), "input")
    with pytest.raises(PEError) as caught:
        mapping.run(graph, 3)
    assert (caught.value.pe, caught.value.port) == (bad.id, "postprocess")


@pytest.mark.parametrize(
    ("pe", "stage", "threaded"),
    [
        (wf.YieldsAtEnd, "postprocess", False),
        (wf.YieldsAtEnd, "postprocess", True),
        (wf.YieldsAtStartAsync, "preprocess", False),
    ],
    ids=["generator", "threaded", "async-generator"],
)
@pytest.mark.parametrize(
    "mapping",
    [MappingCase("simple", None), MappingCase("async", None), MappingCase("multi", 2)],
    ids=lambda case: case.id,
)
def test_a_generator_stage_fails_the_run(
    mapping: MappingCase, pe: type[IterativePE], stage: str, threaded: bool
) -> None:
    """A ``postprocess`` or ``preprocess`` that yielded its items was called, its generator dropped: its body
    never ran, and the run succeeded without them. The engine calls the stages alike on every mapping: those
    that run it in this process and one that runs it in worker processes."""
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", bad := pe(), "input")
    bad.threaded = threaded
    with pytest.raises(PEError, match=f"{stage}\\(\\) is a generator") as caught:
        mapping.run(graph, 3)
    assert (caught.value.pe, caught.value.port) == (bad.id, stage)


def test_results_of_every_unconnected_port(mapping: MappingCase) -> None:
    graph = WorkflowGraph()
    split = wf.EvenOdd()
    graph.connect(wf.Count(), "output", split, "input")
    results = mapping.run(graph, 10).by_port()
    assert sorted(results[(split.id, "even")]) == [0, 2, 4, 6, 8]
    assert sorted(results[(split.id, "odd")]) == [1, 3, 5, 7, 9]


def test_large_stream(mapping: MappingCase) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", wf.Double(), "input")
    results = mapping.run(graph, 20_000)
    assert len(results) == 20_000
    assert sum(results.data()) == 2 * sum(range(20_000))


def test_simple_mapping_gives_the_same_order_every_time() -> None:
    orders = [MappingCase("simple", None).run(wf.fan_out_in(), 200).data() for _ in range(3)]
    assert orders[0] == orders[1] == orders[2]


class PacedDouble(IterativePE):
    """Doubles each item, taking ``seconds`` of work per item."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def process_item(self, item: int) -> int:
        time.sleep(self.seconds)  # ok-sleep: work, not synchronisation (one branch slower than the other)
        return item * 2


def test_simple_mapping_order_does_not_depend_on_how_long_calls_take() -> None:
    """Batch sizes, flushes and turns are counts on simple: a slow branch of a fan-out/fan-in changes no order."""

    def order(seconds: float) -> list[object]:
        graph = WorkflowGraph()
        source, double, tag, merge = wf.Count(), PacedDouble(seconds), wf.Tag(), wf.Merge()
        graph.connect(source, "output", double, "input")
        graph.connect(source, "output", tag, "input")
        graph.connect(double, "output", merge, "left")
        graph.connect(tag, "output", merge, "right")
        return MappingCase("simple", None).run(graph, 200, batch_size=16).data()

    assert order(0.003) == order(0.0)
