"""Workflows for the tests on a real Storm cluster (module level: Storm's workers import them)."""

from __future__ import annotations

from typing import Any

from workflows import Count, Fail, SumAtEnd

from aiod4p import GenericPE, IterativePE, WorkflowGraph, group_by
from aiod4p.sources import TimerSource


class Flaky(GenericPE):
    """Raises the first time it sees a multiple of 3; emits ``(item, replayed)`` otherwise.

    On Storm the failed tuple is replayed by its spout, and the fields grouping
    brings it back to the same task, which then lets it through: every item
    comes out once, the multiples of 3 marked as replayed.
    """

    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(key=identity))], outputs=["output"], parallelism=2)
        self.seen: set[int] = set()

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        item = inputs["input"]
        if item % 3 == 0 and item not in self.seen:
            self.seen.add(item)
            raise RuntimeError(f"transient failure on {item}")
        return {"output": (item, item in self.seen)}


def identity(item: Any) -> Any:
    return item


def flaky() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", Flaky(), "input")
    return graph


def failing() -> WorkflowGraph:
    """Count -> Fail(on=3): the item 3 fails on every attempt."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", Fail(on=3), "input")
    return graph


class Tick(IterativePE):
    """``{"tick": n, ...}`` -> ``n``."""

    def process_item(self, item: dict[str, Any]) -> int:
        return int(item["tick"])


class Echo(IterativePE):
    def process_item(self, item: int) -> int:
        return item


def endless() -> WorkflowGraph:
    """A timer (a live source: it never ends) -> Tick -> Echo (results as they come) and SumAtEnd.

    SumAtEnd writes its total in postprocess: only once the run is drained.
    """
    graph = WorkflowGraph()
    ticks = TimerSource(0.05)
    ticks.id = "ticks"
    graph.connect(ticks, "output", tick := Tick(), "input")
    graph.connect(tick, "output", Echo(), "input")
    graph.connect(tick, "output", SumAtEnd(), "input")
    return graph
