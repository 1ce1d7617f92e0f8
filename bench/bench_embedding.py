"""Embedding: the event-loop lag a host sees while a workflow runs at full throughput in its loop.

    .venv/bin/python bench/bench_embedding.py [--quick] [items]

A host task ticks every 10 ms in the same loop as a run of the 5-PE chain
(and of a word count with group-by, and of a PE computing 20 ms per call),
on asyncio's loop and on uvloop. Lag is how late each tick wakes up. The same
runs with the engine's yielding turned off (the engine before it shared the
loop) give the throughput cost of yielding, measured in the same run; and
with the engine giving way by ``sleep(0)`` (before round 9), the lag that
giving way on a timer saves. Each run is a sustained one: 3,000,000
items (``--quick``: 100,000, a smoke test) take several seconds, as the
13-second run of issue 11 did. Writes bench/results/embedding.md.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import wordcount
from chain import build

import aiod4p
from aiod4p import IterativePE, ProducerPE, WorkflowGraph
from aiod4p._api import loop_factory
from aiod4p._engine import Worker

QUICK = "--quick" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--quick"]
ITEMS = int(ARGS[0]) if ARGS else 100_000 if QUICK else 3_000_000
REPEATS = 5
TICK = 0.01
TARGET = 0.05  # p99 lag at full throughput, in seconds


def chain_graph() -> tuple[WorkflowGraph, int]:
    return build()[0], ITEMS


BUSY_SECONDS = 0.02


class Compute(IterativePE):
    """A CPU-bound PE that is not threaded: ``BUSY_SECONDS`` of pure Python per call."""

    def process_item(self, item: int) -> int:
        end = time.perf_counter() + BUSY_SECONDS
        while time.perf_counter() < end:
            pass
        return item


class Items(ProducerPE):
    """Yields ``count`` items from one call (a live source: batches follow the receiver's pace)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def produce(self) -> Iterator[int]:
        yield from range(self.count)


def busy_graph() -> tuple[WorkflowGraph, int]:
    graph = WorkflowGraph()
    compute = Compute()
    compute.parallelism = 1  # one busy instance: a tick waits for at most the call under way
    graph.connect(Items(max(20, ITEMS // 30_000)), "output", compute, "input")  # 100 calls (2 s) by default
    return graph, 1


def words_graph() -> tuple[WorkflowGraph, int]:
    lines = ITEMS // 20  # about 7 words a line: a third of ITEMS words through the group-by
    graph = WorkflowGraph()
    source, split, count = (
        wordcount.ReadLines(wordcount.TEXT * (lines // 3)),
        wordcount.SplitWords(),
        wordcount.CountWords(),
    )
    graph.connect(source, "output", split, "input")
    graph.connect(split, "output", count, "input")
    return graph, 1


async def hosted(make: Callable[[], tuple[WorkflowGraph, int]]) -> tuple[float, list[float]]:
    """Elapsed seconds of one run and the lag of every tick of a host task meanwhile."""
    graph, inputs = make()
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            lags.append(time.perf_counter() - before - TICK)

    host = asyncio.create_task(ticker())
    started = time.perf_counter()
    await aiod4p.run_async(graph, inputs, mapping="async", workers=3)
    elapsed = time.perf_counter() - started
    running = False
    await host
    return elapsed, lags


async def _give_way_by_sleep0(self: Worker, on_timer: bool = False) -> None:
    """The engine's give-way before round 9, after long batches too: ``sleep(0)``, which resumes the
    instance before the tasks of timers that fell due."""
    self._turn.restart_soon()
    await asyncio.sleep(0)


ENGINES = ("yielding", "yielding by sleep(0)", "no yielding")


def measure(make: Callable[[], tuple[WorkflowGraph, int]], uvloop: bool, engine: str) -> tuple[float, list[float]]:
    held_too_long, give_way = Worker.held_too_long, Worker.give_way
    if engine == "no yielding":
        Worker.held_too_long = lambda self: False  # type: ignore[method-assign]
    elif engine == "yielding by sleep(0)":
        Worker.give_way = _give_way_by_sleep0  # type: ignore[method-assign]
    try:
        with asyncio.Runner(loop_factory=loop_factory(uvloop)) as runner:
            return runner.run(hosted(make))
    finally:
        Worker.held_too_long, Worker.give_way = held_too_long, give_way  # type: ignore[method-assign]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    workloads = {
        "5-PE chain": chain_graph,
        "word count (group-by)": words_graph,
        f"a PE computing {BUSY_SECONDS * 1000:.0f} ms per call": busy_graph,
    }
    loops = {"asyncio": False, "uvloop": True}
    lines = [
        "## Embedding: host loop lag during a full-throughput run",
        "",
        f"`.venv/bin/python bench/bench_embedding.py {ITEMS}`: a host task ticking every {TICK * 1000:.0f} ms in the"
        f" run's event loop (async mapping, -n 3); lag = how late each tick wakes (all ticks of {REPEATS} runs);"
        " 'no yielding' is the same engine with its loop sharing turned off, in the same run.",
        "",
        "| workload | loop | engine | p50 lag ms | p99 lag ms | max lag ms | ticks | elapsed s"
        " | throughput vs no yielding |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    worst_p99, worst_cost = 0.0, 0.0
    for work_name, make in workloads.items():
        for loop_name, uvloop in loops.items():
            timings: dict[str, list[float]] = {engine: [] for engine in ENGINES}
            lags: dict[str, list[float]] = {engine: [] for engine in ENGINES}
            for _ in range(REPEATS):  # interleaved, so machine noise hits all alike
                for engine in ENGINES:
                    elapsed, ticks = measure(make, uvloop, engine)
                    timings[engine].append(elapsed)
                    lags[engine].extend(ticks)
            for engine in ENGINES:
                ratio = statistics.median(timings["no yielding"]) / statistics.median(timings[engine])
                if engine == "yielding":
                    worst_p99 = max(worst_p99, quantile(lags[engine], 0.99))
                    worst_cost = max(worst_cost, 1 - ratio)
                lines.append(
                    f"| {work_name} | {loop_name} | {engine}"
                    f" | {quantile(lags[engine], 0.5) * 1000:.1f} | {quantile(lags[engine], 0.99) * 1000:.1f}"
                    f" | {max(lags[engine], default=0) * 1000:.1f} | {len(lags[engine])}"
                    f" | {statistics.median(timings[engine]):.2f} | {ratio:.0%} |"
                )
    verdict = "met" if worst_p99 < TARGET else "NOT met"
    lines += [
        "",
        f"Target: p99 lag < {TARGET * 1000:.0f} ms at full throughput, at a small throughput cost: {verdict}"
        f" (worst p99 with yielding {worst_p99 * 1000:.1f} ms; largest throughput cost {worst_cost:.0%}).",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    out = Path(__file__).resolve().parent / "results" / "embedding.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(section)


if __name__ == "__main__":
    main()
