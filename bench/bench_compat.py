"""The 5-PE chain written with dispel4py's API and with aiod4p's, on simple and async, against a plain loop.

    .venv/bin/python bench/bench_compat.py [items]

Two shapes of the same chain (producer -> 3 iterative PEs adding one -> a
consumer summing): the producer called once, looping ``self.write("output",
i)`` (how dispel4py workflows are usually written), and the producer called
once per item (``-i N``). Each shape is written with dispel4py's API (run
through aiod4p's compatibility layer) and with aiod4p's own; the plain loop
calls the same stage functions directly. Every run is in this one process and
thread, so each is timed in CPU time (``time.process_time``): on a shared
machine, time spent descheduled does not count. Writes bench/results/compat.md.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from itertools import product
from pathlib import Path
from typing import Any

import aiod4p
from aiod4p import compat
from aiod4p._api import loop_factory

compat.install()

from dispel4py import base as d4p  # noqa: E402 - served by the hook installed above
from dispel4py.workflow_graph import WorkflowGraph as D4pGraph  # noqa: E402

ITEMS = int(sys.argv[1]) if len(sys.argv) > 1 else 500_000
REPEATS = 9


def add_one(item: int) -> int:
    return item + 1


class D4pLoop(d4p.ProducerPE):  # type: ignore[misc]
    def _process(self, inputs: Mapping[str, Any]) -> None:
        for i in range(ITEMS):
            self.write("output", i)


class D4pCount(d4p.ProducerPE):  # type: ignore[misc]
    def __init__(self) -> None:
        d4p.ProducerPE.__init__(self)
        self.n = 0

    def _process(self, inputs: Mapping[str, Any]) -> int:
        self.n += 1
        return self.n


class D4pAdd(d4p.IterativePE):  # type: ignore[misc]
    def _process(self, data: int) -> int:
        return data + 1


class D4pSum(d4p.ConsumerPE):  # type: ignore[misc]
    def __init__(self) -> None:
        d4p.ConsumerPE.__init__(self)
        self.total = 0

    def _process(self, data: int) -> None:
        self.total += data


class NativeLoop(aiod4p.GenericPE):
    def __init__(self) -> None:
        super().__init__()
        self.add_output("output")

    def process(self, inputs: Mapping[str, Any]) -> None:
        for i in range(ITEMS):
            self.write("output", i)


class NativeCount(aiod4p.ProducerPE):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def produce(self) -> int:
        self.n += 1
        return self.n


class NativeAdd(aiod4p.IterativePE):
    def process_item(self, item: int) -> int:
        return item + 1


class NativeSum(aiod4p.ConsumerPE):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def consume(self, item: int) -> None:
        self.total += item


def chain(graph: Any, source: Any, stages: list[Any], sink: Any) -> Any:
    previous = source
    for stage in [*stages, sink]:
        graph.connect(previous, "output", stage, "input")
        previous = stage
    return graph


def build(api: str, shape: str) -> tuple[Any, Any, Any]:
    """The graph, its inputs and its sink."""
    if api == "dispel4py":
        source = D4pLoop() if shape == "loop" else D4pCount()
        sink = D4pSum()
        graph = chain(D4pGraph(), source, [D4pAdd(), D4pAdd(), D4pAdd()], sink)
    else:
        source = NativeLoop() if shape == "loop" else NativeCount()
        sink = NativeSum()
        graph = chain(aiod4p.WorkflowGraph(), source, [NativeAdd(), NativeAdd(), NativeAdd()], sink)
    return graph, 1 if shape == "loop" else ITEMS, sink


def expected(shape: str) -> int:
    first = 3 if shape == "loop" else 4  # the loop writes 0.., the counter returns 1..
    return sum(range(first, ITEMS + first))


def plain_loop() -> float:
    total = 0
    started = time.process_time()
    for i in range(ITEMS):
        total += add_one(add_one(add_one(i)))
    elapsed = time.process_time() - started
    assert total == expected("loop")
    return elapsed


def mapping_run(api: str, shape: str, mapping: str) -> Callable[[], float]:
    def measure() -> float:
        graph, inputs, sink = build(api, shape)
        run = aiod4p.start(graph, inputs, mapping=mapping)
        factory = loop_factory(run.mapping.uses_uvloop)
        started = time.process_time()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run.results())
        elapsed = time.process_time() - started
        assert run.instances(sink)[0].total == expected(shape), (api, shape, mapping)  # the run's copy
        return elapsed

    return measure


def main() -> None:
    cases: dict[tuple[str, str, str], Callable[[], float]] = {("plain loop", "", ""): plain_loop}
    for shape in ("loop", "call"):
        for mapping in ("simple", "async"):
            for api in ("aiod4p", "dispel4py"):
                cases[api, shape, mapping] = mapping_run(api, shape, mapping)
    timings: dict[tuple[str, str, str], list[float]] = {key: [] for key in cases}
    order = list(cases)
    for _ in range(REPEATS):  # interleaved, so machine noise hits every case alike
        for key in order:
            gc.collect()  # no case pays for the garbage of the one before
            timings[key].append(cases[key]())
        order.reverse()  # no case always runs right after the same other one
    # Noise only adds CPU time to a one-thread run: the best run is the least disturbed one.
    rate = {key: ITEMS / min(values) for key, values in timings.items()}
    median_rate = {key: ITEMS / statistics.median(values) for key, values in timings.items()}
    plain = rate["plain loop", "", ""]
    lines = [
        "## dispel4py's API vs aiod4p's: the 5-PE chain on simple and async vs a plain loop",
        "",
        f"`.venv/bin/python bench/bench_compat.py {ITEMS}`: producer -> 3 iterative PEs adding one -> consumer"
        f" summing, {ITEMS:,} items, best of {REPEATS} interleaved runs (in alternating order) timed in CPU"
        " time (one process, one thread); the last column is the ratio of the medians. *loop*: the producer is"
        " called once"
        ' and loops `self.write("output", i)`; *call*: it is called once per item (`-i N`). The plain loop'
        f" runs the same additions in one Python loop: {plain:,.0f} items/s.",
        "",
        "| producer | mapping | aiod4p's API | dispel4py's API | dispel4py / aiod4p | ratio of medians |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for shape in ("loop", "call"):
        for mapping in ("simple", "async"):
            native, d4p_rate = rate["aiod4p", shape, mapping], rate["dispel4py", shape, mapping]
            medians = median_rate["dispel4py", shape, mapping] / median_rate["aiod4p", shape, mapping]
            lines.append(
                f"| {shape} | {mapping} | {native:,.0f} ({native / plain:.0%}) |"
                f" {d4p_rate:,.0f} ({d4p_rate / plain:.0%}) | {d4p_rate / native:.0%} | {medians:.0%} |"
            )
    worst = min(
        rate["dispel4py", *case] / rate["aiod4p", *case] for case in product(("loop", "call"), ("simple", "async"))
    )
    verdict = "met" if worst >= 0.9 else "NOT met"
    lines += [
        "",
        "Percentages in brackets: of the plain loop."
        f" Target: dispel4py's API within 10% of aiod4p's: {verdict} (worst {worst:.0%}).",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    out = Path(__file__).resolve().parent / "results" / "compat.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(section)


if __name__ == "__main__":
    main()
