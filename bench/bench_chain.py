"""Core benchmark: the 5-PE chain on simple and async against a plain Python loop.

    .venv/bin/python bench/bench_chain.py [items]

The plain loop calls the very same PE methods directly, in the same process
and run, so the ratio is the engine's overhead. Writes bench/results/chain.md.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chain import build

import aiod4p
from aiod4p._api import loop_factory

ITEMS = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
REPEATS = 5


def plain_loop() -> float:
    _, source, (a, b, c), sink = build()
    produce, f, g, h, consume = source.produce, a.process_item, b.process_item, c.process_item, sink.consume
    started = time.perf_counter()
    for _ in range(ITEMS):
        consume(h(g(f(produce()))))
    elapsed = time.perf_counter() - started
    assert sink.total == sum(range(4, ITEMS + 4))
    return elapsed


def mapping_run(mapping: str) -> Callable[[], float]:
    def measure() -> float:
        graph, _, _, sink = build()
        run = aiod4p.start(graph, ITEMS, mapping=mapping)
        factory = loop_factory(run.mapping.uses_uvloop)
        started = time.perf_counter()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run.results())
        elapsed = time.perf_counter() - started
        assert run.instances(sink)[0].total == sum(range(4, ITEMS + 4))
        return elapsed

    return measure


def main() -> None:
    cases = {"plain loop": plain_loop, "simple": mapping_run("simple"), "async": mapping_run("async")}
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(REPEATS):  # interleaved, so machine noise hits every case alike
        for name, measure in cases.items():
            timings[name].append(measure())
    rate = {name: ITEMS / statistics.median(values) for name, values in timings.items()}
    lines = [
        "## Core: 5-PE chain on simple and async vs a plain loop",
        "",
        f"`.venv/bin/python bench/bench_chain.py {ITEMS}`: producer -> 3 trivial iterative PEs -> consumer,"
        f" {ITEMS:,} items, median of {REPEATS} interleaved runs; the plain loop calls the same PE methods.",
        "",
        "| run | items/s | ratio to plain loop |",
        "| --- | ---: | ---: |",
    ]
    for name in cases:
        lines.append(f"| {name} | {rate[name]:,.0f} | {rate[name] / rate['plain loop']:.0%} |")
    lines += ["", "Target: async >= 50% of the plain loop.", ""]
    section = "\n".join(lines)
    print(section)
    out = Path(__file__).resolve().parent / "results" / "chain.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(section)


if __name__ == "__main__":
    main()
