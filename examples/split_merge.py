"""Split and merge: fan-out, fan-in, and the ``all`` and ``global`` groupings.

    aiod4p run examples/split_merge.py -i 10 --mapping async -n 2

Numbers are split by parity into two branches; both branches merge into one
``global`` collector. A monitor with two instances receives every number on
both instances (``all``).
"""

from __future__ import annotations

from typing import Any

from aiod4p import ALL, GLOBAL, GenericPE, IterativePE, ProducerPE, WorkflowGraph


class Numbers(ProducerPE):
    """Emits 0, 1, 2, ... one per call."""

    def __init__(self) -> None:
        super().__init__()
        self.next = 0

    def produce(self) -> int:
        value, self.next = self.next, self.next + 1
        return value


class Split(GenericPE):
    """Routes even numbers to ``even`` and odd numbers to ``odd``."""

    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["even", "odd"])

    def process(self, inputs: dict[str, Any]) -> dict[str, int]:
        number = inputs["input"]
        return {"even" if number % 2 == 0 else "odd": number}


class Scale(IterativePE):
    def __init__(self, factor: int) -> None:
        super().__init__(name=f"Scale{factor}x")
        self.factor = factor

    def process_item(self, number: int) -> tuple[int, int]:
        return number, number * self.factor


class Merge(GenericPE):
    """Collects both branches in one instance and emits the sorted pairs at the end."""

    def __init__(self) -> None:
        super().__init__(inputs=[("evens", GLOBAL), ("odds", GLOBAL)], outputs=["merged"])
        self.pairs: list[tuple[int, int]] = []

    def process(self, inputs: dict[str, Any]) -> None:
        for pair in inputs.values():
            self.pairs.append(tuple(pair))

    def postprocess(self) -> None:
        self.write("merged", sorted(self.pairs))


class Monitor(GenericPE):
    """Two instances; with ``all`` each counts every number."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", ALL)], outputs=["seen"], parallelism=2)
        self.seen = 0

    def process(self, inputs: dict[str, Any]) -> None:
        self.seen += 1

    def postprocess(self) -> None:
        self.write("seen", (self.instance, self.seen))


def build() -> WorkflowGraph:
    graph = WorkflowGraph()
    numbers, split, double, triple, merge, monitor = Numbers(), Split(), Scale(2), Scale(3), Merge(), Monitor()
    graph.connect(numbers, "output", split, "input")
    graph.connect(numbers, "output", monitor, "input")
    graph.connect(split, "even", double, "input")
    graph.connect(split, "odd", triple, "input")
    graph.connect(double, "output", merge, "evens")
    graph.connect(triple, "output", merge, "odds")
    return graph


graph = build()
