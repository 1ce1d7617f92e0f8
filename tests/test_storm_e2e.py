"""End to end: the generated components, as real processes, routed by the harness as Storm would route them.

The harness (tests/storm_harness.py) stands in for Storm: it follows the
groupings read back from the generated topology, acks tuple trees, and
heartbeats the bolts. The storm mapping cannot join the ``mapping`` fixture
(it needs a cluster), so its equivalence with the other mappings is shown here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("streamparse", reason="the storm extra is not installed")

from storm_harness import StormHarness
from workflows import Count, Fail, SumAtEnd, Tag, WhoSawWhat, multi_edge, parity

import aiod4p
from aiod4p import PlanOptions, WorkflowGraph, group_by, load_graph
from aiod4p.storm import build_project

ROOT = Path(__file__).resolve().parents[1]


def multiset(records: Any) -> Counter[tuple[str, str, str]]:
    return Counter((pe, port, repr(data)) for pe, port, data in records)


def through_storm(graph: WorkflowGraph, directory: Path, inputs: Any, options: PlanOptions | None = None) -> Any:
    project = build_project(graph, directory, name=directory.name, inputs=inputs, options=options)
    return run_project(project.path)


def run_project(path: Path) -> Any:
    run = StormHarness(path).run()
    assert set(run.exit_codes.values()) == {2}  # every component exited when "Storm" went away
    assert run.heartbeats > 0
    return run


@pytest.mark.parametrize(("example", "inputs"), [("wordcount", 1), ("split_merge", 10)])
def test_same_results_as_the_simple_mapping(example: str, inputs: int, tmp_path: Path) -> None:
    graph = load_graph(str(ROOT / "examples" / f"{example}.py"))
    # The simple mapping's plan: one task per PE. (Built first: a run leaves state in the graph's PEs.)
    project = build_project(graph, tmp_path / example, inputs=inputs, options=PlanOptions(force_single=True))
    expected = multiset(aiod4p.run(graph, inputs, mapping="simple"))
    run = run_project(project.path)
    assert run.errors == []
    assert multiset(run.results) == expected
    assert run.spout_fails == 0 and run.spout_acks > 0


@pytest.mark.parametrize(("example", "inputs"), [("wordcount", 1), ("split_merge", 10)])
def test_same_results_as_the_async_mapping_with_parallelism_hints(example: str, inputs: int, tmp_path: Path) -> None:
    graph = load_graph(str(ROOT / "examples" / f"{example}.py"))
    project = build_project(graph, tmp_path / example, inputs=inputs)  # CountWords: 3 tasks, Monitor: 2 (all)
    expected = multiset(aiod4p.run(graph, inputs, mapping="async"))
    run = run_project(project.path)
    assert run.errors == []
    assert multiset(run.results) == expected


def test_a_failing_pe_fails_its_tuple_which_is_replayed_then_dropped(tmp_path: Path) -> None:
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", fail := Fail(on=3), "input")
    graph.connect(fail, "output", total := SumAtEnd(), "input")
    run = through_storm(graph, tmp_path / "failing", 6)
    assert [(pe, port, item) for pe, port, item in run.results] == [(total.id, "total", 0 + 1 + 2 + 4 + 5)]
    assert run.spout_fails == 4  # the first attempt and 3 replays, each failed by the PE
    failures = [msg for pe, msg in run.errors if pe == fail.id]
    assert len(failures) == 4
    assert all(f"PE {fail.id}[0] failed on input port 'input': ValueError: bad item 3" in msg for msg in failures)
    assert [pe for pe, msg in run.errors if "dropped after 3 replays" in msg] == [source.id]


def test_group_by_key_function_routes_equal_keys_to_one_task(tmp_path: Path) -> None:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", tag := Tag(modulo=4), "input")
    graph.connect(tag, "output", who := WhoSawWhat(group_by(key=parity), parallelism=3), "input")
    run = through_storm(graph, tmp_path / "keyed", 12)
    seen = [item for pe, _, item in run.results if pe == who.id]
    assert sorted(pair for _, pair in seen) == sorted((n % 4, n) for n in range(12))
    instances = {p: {instance for instance, pair in seen if parity(pair) == p} for p in (0, 1)}
    assert all(len(tasks) == 1 for tasks in instances.values())


def test_two_connections_between_the_same_ports(tmp_path: Path) -> None:
    graph = multi_edge()
    project = build_project(graph, tmp_path / "multi_edge", inputs=3)
    expected = multiset(aiod4p.run(graph, 3, mapping="simple"))
    run = run_project(project.path)
    assert multiset(run.results) == expected  # each item arrives twice
