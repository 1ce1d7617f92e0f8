"""Workflows for the tests on a real Storm cluster (module level: Storm's workers import them)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any

from workflows import Count, Fail, SumAtEnd, Unencodable

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


class Stuck(IterativePE):
    """Never returns from its call on the item 2, as a PE blocked on a read that nothing answers."""

    def process_item(self, item: int) -> int:
        if item == 2:
            threading.Event().wait()
        return item


def stuck() -> WorkflowGraph:
    """Count -> Stuck: the call on the item 2 blocks for ever."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", Stuck(), "input")
    return graph


def unencodable() -> WorkflowGraph:
    """Count -> Unencodable(on=3) -> SumAtEnd: the item 3 becomes a lock, which cannot cross Storm."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", bad := Unencodable(on=3), "input")
    graph.connect(bad, "output", SumAtEnd(), "input")
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


# Where a Gate waits for its word: set by the test that runs gated() (HOST:PORT).
GATE_ADDRESS = "AIOD4P_TEST_GATE"


class Gate(IterativePE):
    """Takes items, writes none; in a Storm task, it waits for a word from the test before the task can report.

    Every task of a topology unpickles every PE before it says hello to its
    run: a Gate in the workflow holds every task back until the test sends a
    byte on the connection it opened to ``address``.
    """

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def process_item(self, item: Any) -> None:
        return None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "aiod4p_components" in sys.modules:  # a Storm task (not the run, which copies its PEs)
            host, _, port = self.address.rpartition(":")
            with socket.create_connection((host, int(port)), timeout=120) as connection:
                connection.recv(1)


def gated() -> WorkflowGraph:
    """:func:`endless`, whose tasks wait at a :class:`Gate` (at ``$AIOD4P_TEST_GATE``) before they report."""
    graph = endless()
    (tick,) = (pe for pe in graph.flatten().pes.values() if isinstance(pe, Tick))
    graph.connect(tick, "output", Gate(os.environ[GATE_ADDRESS]), "input")
    return graph
