"""Run isolation: every run starts from the PEs as the user built them, on every mapping."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import Counter
from typing import Any

import pytest
import workflows as wf
from conftest import MappingCase
from helpers import add_graph
from test_examples import load

import aiod4p
from aiod4p import GenericPE, GraphError, WorkflowGraph, group_by


def counted_graph() -> tuple[WorkflowGraph, wf.Count, wf.SumAtEnd]:
    """A stateful source (its counter) into stateful totals, two instances."""
    graph = WorkflowGraph()
    count, total = wf.Count(), wf.SumAtEnd("shuffle")
    total.parallelism = 2
    graph.connect(count, "output", total, "input")
    return graph, count, total


class KeyedTotal(GenericPE):
    """Sums the values of ``(key, value)`` pairs per key; writes ``(key, total)`` at the end."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(0))], outputs=["total"], parallelism=2)
        self.totals: Counter[int] = Counter()

    def process(self, inputs: dict[str, Any]) -> None:
        key, value = inputs["input"]
        self.totals[key] += value

    def postprocess(self) -> None:
        for key, total in sorted(self.totals.items()):
            self.write("total", (key, total))


def keyed_graph() -> tuple[WorkflowGraph, wf.Count, KeyedTotal]:
    graph = WorkflowGraph()
    count, tag, total = wf.Count(), wf.Tag(3), KeyedTotal()
    graph.connect(count, "output", tag, "input")
    graph.connect(tag, "output", total, "input")
    return graph, count, total


EXPECTED_KEYED = sorted((key, sum(i for i in range(30) if i % 3 == key)) for key in range(3))


@dataclasses.dataclass
class ThreeRuns:
    """The keyed totals and the wordcount example, side by side as one graph run three times in a row."""

    count: wf.Count
    total: KeyedTotal
    keyed: list[list[Any]]  # the keyed totals' results, run by run
    words: list[list[Any]]  # the wordcount's, likewise


_THREE_RUNS: dict[str, ThreeRuns] = {}


def three_runs(mapping: MappingCase) -> ThreeRuns:
    """Both graphs' re-runs on ``mapping`` from three runs of one workflow holding both, instead of three
    of each (launches: an MPI job, a Ray job, per run)."""
    if mapping.id not in _THREE_RUNS:
        keyed, count, total = keyed_graph()
        words = load("wordcount").build()
        graph = WorkflowGraph()
        add_graph(graph, keyed)
        add_graph(graph, words)
        inputs = dict.fromkeys(keyed.flatten().roots(), 30) | dict.fromkeys(words.flatten().roots(), 1)
        keyed_pes, word_pes = keyed.flatten().pes, words.flatten().pes
        shared = ThreeRuns(count, total, [], [])
        for _ in range(3):
            records = mapping.run(graph, inputs).records
            shared.keyed.append([record.data for record in records if record.pe in keyed_pes])
            shared.words.append([record.data for record in records if record.pe in word_pes])
            assert len(shared.keyed[-1]) + len(shared.words[-1]) == len(records)
        _THREE_RUNS[mapping.id] = shared
    return _THREE_RUNS[mapping.id]


def test_the_same_graph_runs_three_times_in_a_row(mapping: MappingCase) -> None:
    shared = three_runs(mapping)
    assert len(shared.keyed) == 3
    for data in shared.keyed:
        assert sorted(data) == EXPECTED_KEYED
    assert shared.count.next == 0 and not shared.total.totals  # the graph's own PEs are never changed


def test_wordcount_counts_are_right_on_every_run(mapping: MappingCase) -> None:
    expected = Counter(load("wordcount").TEXT.lower().split())
    shared = three_runs(mapping)
    assert len(shared.words) == 3
    for data in shared.words:
        assert Counter(dict(data)) == expected


def test_concurrent_runs_of_one_graph_do_not_mix(mapping: MappingCase) -> None:
    graph, _, _ = keyed_graph()

    async def both() -> list[aiod4p.Results]:
        async with asyncio.timeout(50):
            return await asyncio.gather(
                *(aiod4p.run_async(graph, 30, mapping=mapping.name, workers=mapping.workers) for _ in range(3))
            )

    for results in asyncio.run(both()):
        assert sorted(results.data()) == EXPECTED_KEYED


def test_instances_are_the_runs_own_copies() -> None:
    graph, count, total = counted_graph()
    run = aiod4p.start(graph, 10, mapping="async")
    assert run.instances(count) == []  # not started yet
    results = asyncio.run(run.results())
    assert sum(results.data()) == sum(range(10))
    (running_count,) = run.instances(count.id or "")
    assert running_count is not count and running_count.next == 10 and count.next == 0
    assert [pe.instance for pe in run.instances(total)] == [0, 1]
    assert count._runtime is None


def test_instances_of_an_unknown_pe_is_an_error() -> None:
    graph, _, _ = counted_graph()
    with pytest.raises(aiod4p.InputError, match="'nope' is not a PE of this workflow"):
        aiod4p.start(graph, 1).instances("nope")


class Peek(GenericPE):
    def __init__(self, source: wf.Count) -> None:
        super().__init__(inputs=["input"], outputs=["output"])
        self.source = source

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"output": self.source.next > inputs["input"]}


def test_references_between_pes_lead_to_the_runs_copies() -> None:
    graph = WorkflowGraph()
    source = wf.Count()
    graph.connect(source, "output", Peek(source), "input")
    assert aiod4p.run(graph, 5, mapping="simple").data() == [True] * 5


class Locked(wf.Double):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


def test_a_pe_that_cannot_be_copied_is_named() -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", locked := Locked(), "input")
    with pytest.raises(GraphError, match=rf"PE {locked.id} cannot be copied for instance 0: .*preprocess\(\)"):
        aiod4p.run(graph, 1, mapping="async")
