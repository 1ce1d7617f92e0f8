"""Source-to-sink latency of a live stream, and batch sizes under load.

    .venv/bin/python bench/bench_latency.py [seconds]

A live source emits items at 10,000/s (each stamped with ``perf_counter()``
when it is yielded) into a 3-PE workflow on the async mapping: source ->
transform -> sink; the sink records how long each item took. Baseline, in
the same run and on the same event loop: the same paced source feeding a
hand-written chain of two asyncio tasks joined by asyncio.Queues, one item at
a time (the floor for an in-process hand-off). A third run drives the same
workflow from a source at full speed, to show that batches grow under load
while they stay small when the stream is slow.

Then results behind a source at full speed, on async, multi -n 2 and mpi -n 2:
a reader that encodes each result as ``--results FILE`` does is the slowest
stage, and the table says how far behind the source it reads (the age of each
result as it is read; ``perf_counter`` is one clock for every process of this
machine) and how long a drain then waits for what is on its way.
Writes bench/results/latency.md.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiod4p
from aiod4p import ConsumerPE, IterativePE, ProducerPE, WorkflowGraph
from aiod4p._api import loop_factory
from aiod4p._results import record_line
from aiod4p.sources import AsyncIterSource

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
RATE = 10_000
TARGET_P99 = 0.005
FULL_SPEED_ITEMS = 1_000_000
LAG_MAPPINGS = ("async", "multi", "mpi")
RESULTS = Path(__file__).resolve().parent / "results" / "latency.md"


async def paced(rate: float, seconds: float) -> AsyncIterator[dict[str, Any]]:
    """Items due every 1/rate s; each stamped when it is yielded."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * seconds)
    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield {"seq": i, "stamp": time.perf_counter()}


async def full_speed(total: int) -> AsyncIterator[dict[str, Any]]:
    for i in range(total):
        yield {"seq": i, "stamp": time.perf_counter()}


class Transform(IterativePE):
    def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        return {**item, "value": item["seq"] * 2}


class LatencySink(ConsumerPE):
    def __init__(self) -> None:
        super().__init__()
        self.latencies: list[float] = []

    def consume(self, item: dict[str, Any]) -> None:
        self.latencies.append(time.perf_counter() - item["stamp"])


def graph_of(source: AsyncIterSource) -> tuple[WorkflowGraph, LatencySink]:
    graph = WorkflowGraph()
    transform, sink = Transform(), LatencySink()
    graph.connect(source, "output", transform, "input")
    graph.connect(transform, "output", sink, "input")
    return graph, sink


async def engine_run(source: AsyncIterSource) -> tuple[list[float], float, float]:
    """Latencies, items per batch at the sink, elapsed seconds."""
    graph, sink = graph_of(source)
    started = time.perf_counter()
    run = aiod4p.start(graph, mapping="async")
    async with run:
        await run.results()
    elapsed = time.perf_counter() - started
    stats = {s.pe: s for s in run.stats}[sink.id]
    return run.instances(sink)[0].latencies, stats.items_in / max(stats.batches_in, 1), elapsed


async def baseline_run() -> list[float]:
    """The same paced source through two tasks joined by queues, item by item."""
    first: asyncio.Queue[Any] = asyncio.Queue(1024)
    second: asyncio.Queue[Any] = asyncio.Queue(1024)
    latencies: list[float] = []

    async def transform() -> None:
        while (item := await first.get()) is not None:
            await second.put({**item, "value": item["seq"] * 2})
        await second.put(None)

    async def sink() -> None:
        while (item := await second.get()) is not None:
            latencies.append(time.perf_counter() - item["stamp"])

    tasks = [asyncio.create_task(transform()), asyncio.create_task(sink())]
    async for item in paced(RATE, SECONDS):
        await first.put(item)
    await first.put(None)
    await asyncio.gather(*tasks)
    return latencies


class Stamped(ProducerPE):
    """Items at full speed for ever, each stamped when it is made."""

    def produce(self) -> Any:
        for seq in itertools.count():
            yield {"seq": seq, "stamp": time.perf_counter()}


async def reader_lag(mapping: str) -> dict[str, float]:
    """Read a full-speed stream's results for ``SECONDS``, encoding each as ``--results FILE`` does, then drain:
    the results' ages as they were read (after the first second), the rate read, and the drain's wait."""
    graph = WorkflowGraph()
    graph.connect(Stamped(), "output", Transform(), "input")
    ages: list[float] = []
    run = aiod4p.start(graph, 1, mapping=mapping, workers=None if mapping == "async" else 2)
    async with run:
        started = time.perf_counter()
        async for record in run:
            record_line(record)
            now = time.perf_counter()
            if now - started >= 1.0:
                ages.append(now - record.data["stamp"])
            if now - started >= 1.0 + SECONDS:
                break
        draining = time.perf_counter()
        run.drain()
        in_flight = 0
        async for record in run:
            record_line(record)
            in_flight += 1
        drained = time.perf_counter() - draining
    return {
        "rate": len(ages) / SECONDS,
        "p50": statistics.median(ages),
        "p99": quantile(ages, 0.99),
        "drain": drained,
        "in_flight": in_flight,
    }


def lag_table() -> list[str]:
    rows = []
    for mapping in LAG_MAPPINGS:
        lag = asyncio.run(reader_lag(mapping))
        name = mapping if mapping == "async" else f"{mapping} -n 2"
        rows.append(
            f"| {name} | {lag['rate']:,.0f} | {ms(lag['p50'])} | {ms(lag['p99'])} | {lag['in_flight']:,}"
            f" | {lag['drain']:.2f} |"
        )
    return [
        "### Results behind a source at full speed",
        "",
        f"A source making items as fast as it can -> transform -> results, read for {SECONDS:g} s (after a first"
        " second) by a reader that encodes each as `--results FILE` does (the slowest stage), then drained. Age:"
        " from the item's making to its result's reading. In flight: the results the drain still delivered.",
        "",
        "| mapping | results read a second | age p50 ms | age p99 ms | in flight at the drain | drain s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "Results wait for a slow reader in a window of bytes and of batches per worker (docs/performance.md): before"
        " the window of batches, small results piled up by the hundred thousand on multi and mpi (540,000 in flight"
        " on multi -n 2, and as many seconds of age as the reader needed for them).",
        "",
    ]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float) -> str:
    return f"{value * 1000:.3f}"


async def measure() -> dict[str, Any]:
    engine, engine_batch, _ = await engine_run(AsyncIterSource(paced, RATE, SECONDS))
    baseline = await baseline_run()
    _, loaded_batch, loaded_elapsed = await engine_run(AsyncIterSource(full_speed, FULL_SPEED_ITEMS))
    assert len(engine) == len(baseline) == int(RATE * SECONDS)
    return {
        "engine": engine,
        "baseline": baseline,
        "engine_batch": engine_batch,
        "loaded_batch": loaded_batch,
        "loaded_rate": FULL_SPEED_ITEMS / loaded_elapsed,
    }


def main() -> int:
    factory = loop_factory(aiod4p.mappings.get_mapping("async").uses_uvloop)
    loop_name = "uvloop" if factory is not None else "asyncio"
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(measure())
    engine, baseline = result["engine"], result["baseline"]
    rows = []
    for name, values in (("aiod4p async mapping", engine), ("baseline: 2 tasks + asyncio.Queue", baseline)):
        rows.append(
            f"| {name} | {len(values):,} | {ms(statistics.median(values))} | {ms(quantile(values, 0.99))}"
            f" | {ms(quantile(values, 0.999))} | {ms(max(values))} |"
        )
    p99 = quantile(engine, 0.99)
    ratio_p50 = statistics.median(engine) / statistics.median(baseline)
    ratio_p99 = p99 / quantile(baseline, 0.99)
    verdict = "met" if p99 <= TARGET_P99 else "NOT met"
    text = "\n".join(
        [
            "## Live stream latency (source to sink, async mapping)",
            "",
            f"`.venv/bin/python bench/bench_latency.py {SECONDS:g}`: a live source (an async generator,"
            f" `AsyncIterSource`) emits {RATE:,} items/s for {SECONDS:g} s, each stamped when yielded, into"
            " source -> transform -> sink on the async mapping (default batch size 256, max_delay 5 ms),"
            f" on {loop_name}. Baseline in the same run: the same paced source through two asyncio tasks"
            " joined by asyncio.Queues, one item at a time.",
            "",
            "| pipeline | items | p50 ms | p99 ms | p99.9 ms | max ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"aiod4p / baseline: p50 {ratio_p50:.2f}x, p99 {ratio_p99:.2f}x."
            f" Items per batch at the sink: {result['engine_batch']:.1f} at {RATE:,} items/s;"
            f" {result['loaded_batch']:.1f} with a source at full speed ({FULL_SPEED_ITEMS:,} items,"
            f" {result['loaded_rate']:,.0f} items/s end to end): batches stay small when the stream is slow"
            " and grow under load.",
            f"Target: p99 <= {TARGET_P99 * 1000:g} ms; measured {ms(p99)} ms: {verdict}.",
            "",
            *lag_table(),
        ]
    )
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    return 0 if p99 <= TARGET_P99 else 1


if __name__ == "__main__":
    sys.exit(main())
