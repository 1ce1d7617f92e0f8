"""The benchmark chain: producer -> 3 trivial iterative PEs -> consumer."""

from __future__ import annotations

from aiod4p import ConsumerPE, IterativePE, ProducerPE, WorkflowGraph


class Numbers(ProducerPE):
    def __init__(self) -> None:
        super().__init__()
        self.next = 0

    def produce(self) -> int:
        self.next += 1
        return self.next


class Increment(IterativePE):
    def process_item(self, item: int) -> int:
        return item + 1


class Total(ConsumerPE):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def consume(self, item: int) -> None:
        self.total += item


def build() -> tuple[WorkflowGraph, Numbers, list[Increment], Total]:
    graph = WorkflowGraph()
    source, stages, sink = Numbers(), [Increment(), Increment(), Increment()], Total()
    previous: Numbers | Increment = source
    for stage in stages:
        graph.connect(previous, "output", stage, "input")
        previous = stage
    graph.connect(previous, "output", sink, "input")
    return graph, source, stages, sink


graph = build()[0]
