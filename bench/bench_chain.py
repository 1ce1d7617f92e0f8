"""Core benchmark: the 5-PE chain on simple and async against a plain Python loop and Bytewax.

    .venv/bin/python bench/bench_chain.py [--quick] [items]

The plain loop calls the very same PE methods directly, in the same process
and run, so the ratio is the engine's overhead; the loop of plain functions
(``x + 1`` as a module-level function, no PE objects) is the floor of any
Python engine. Bytewax (``pip install '.[bench]'``) runs the chain with one
worker in this process, in batches of 1,024 (the batches aiod4p's async
mapping sends within a worker: ``credits x batch_size``), twice: as Bytewax
users write it (a ``TestingSource`` over a range, three ``map`` steps of
``x + 1``, a sink that sums each batch in C), and with the same work as the
others (the chain's own PE methods, five Python calls an item: ``produce``, three
``process_item``, ``consume``). Its rows are left out when Bytewax is not installed. multi -n 2 runs the chain on
two worker processes (target: 1.3x async). Writes bench/results/chain.md.
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
from aiod4p._plan import DEFAULT_BATCH_SIZE, DEFAULT_CREDITS

QUICK = "--quick" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--quick"]
ITEMS = int(ARGS[0]) if ARGS else 200_000 if QUICK else 1_000_000
REPEATS = 5
BYTEWAX_BATCH = DEFAULT_CREDITS * DEFAULT_BATCH_SIZE


def plain_loop() -> float:
    _, source, (a, b, c), sink = build()
    produce, f, g, h, consume = source.produce, a.process_item, b.process_item, c.process_item, sink.consume
    started = time.perf_counter()
    for _ in range(ITEMS):
        consume(h(g(f(produce()))))
    elapsed = time.perf_counter() - started
    assert sink.total == sum(range(4, ITEMS + 4))
    return elapsed


def increment(item: int) -> int:
    return item + 1


def plain_functions() -> float:
    total = 0
    started = time.perf_counter()
    for item in range(1, ITEMS + 1):
        total += increment(increment(increment(item)))
    elapsed = time.perf_counter() - started
    assert total == sum(range(4, ITEMS + 4))
    return elapsed


def bytewax_run(same_methods: bool) -> Callable[[], float]:
    """Bytewax, one worker: idiomatic (a range source, ``increment``, a sink that sums each batch in C), or
    ``same_methods``: the chain's own PE methods, called once per item as aiod4p and the plain loop call them."""

    def measure() -> float:
        import bytewax.operators as op
        from bytewax.dataflow import Dataflow
        from bytewax.outputs import DynamicSink, StatelessSinkPartition
        from bytewax.testing import TestingSource, run_main

        _, source, stages, sink = build()

        class Sink(StatelessSinkPartition[int]):
            def write_batch(self, items: list[int]) -> None:
                if same_methods:
                    consume = sink.consume
                    for item in items:
                        consume(item)
                else:
                    sink.total += sum(items)

        class ChainSink(DynamicSink[int]):
            def build(self, step_id: str, worker_index: int, worker_count: int) -> Sink:
                return Sink()

        produce = source.produce
        numbers = (produce() for _ in range(ITEMS)) if same_methods else range(1, ITEMS + 1)
        flow = Dataflow("chain")
        stream = op.input("numbers", flow, TestingSource(numbers, batch_size=BYTEWAX_BATCH))
        for name, stage in zip(("a", "b", "c"), stages, strict=True):
            stream = op.map(name, stream, stage.process_item if same_methods else increment)
        op.output("total", stream, ChainSink())
        started = time.perf_counter()
        run_main(flow)
        elapsed = time.perf_counter() - started
        assert sink.total == sum(range(4, ITEMS + 4))
        return elapsed

    return measure


def mapping_run(mapping: str, workers: int | None = None) -> Callable[[], float]:
    def measure() -> float:
        graph, _, _, sink = build()
        run = aiod4p.start(graph, ITEMS, mapping=mapping, workers=workers)
        factory = loop_factory(run.mapping.uses_uvloop)
        started = time.perf_counter()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run.results())
        elapsed = time.perf_counter() - started
        if workers is None:
            assert run.instances(sink)[0].total == sum(range(4, ITEMS + 4))
        else:  # the sink's copies live in the worker processes
            assert sum(entry.items_in for entry in run.stats if entry.pe == sink.id) == ITEMS
        return elapsed

    return measure


def main() -> None:
    cases = {
        "plain loop": plain_loop,
        "plain functions": plain_functions,
        "simple": mapping_run("simple"),
        "async": mapping_run("async"),
        "multi -n 2": mapping_run("multi", 2),
    }
    try:
        import bytewax  # noqa: F401
    except ImportError:
        pass
    else:
        cases["Bytewax 1 worker"] = bytewax_run(same_methods=False)
        cases["Bytewax 1 worker, the same PE methods"] = bytewax_run(same_methods=True)
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(REPEATS):  # interleaved, so machine noise hits every case alike
        for name, measure in cases.items():
            timings[name].append(measure())
    rate = {name: ITEMS / statistics.median(values) for name, values in timings.items()}
    lines = [
        "## Core: 5-PE chain on simple and async vs a plain loop",
        "",
        f"`.venv/bin/python bench/bench_chain.py {ITEMS}`: producer -> 3 trivial iterative PEs -> consumer,"
        f" {ITEMS:,} items, median of {REPEATS} interleaved runs; the plain loop calls the same PE methods, the plain"
        " functions loop calls a module-level `x + 1` three times per item; multi -n 2: two worker processes"
        " (stream time, worker start-up included); Bytewax: one worker, batches of"
        f" {BYTEWAX_BATCH:,}, as its users write the chain (a range source, three `map` steps of `x + 1`, a sink that"
        " sums each batch in C) and with the same work as the others (the chain's own PE methods, five Python calls"
        " an item).",
        "",
        "| run | items/s | ratio to plain loop |",
        "| --- | ---: | ---: |",
    ]
    for name in cases:
        lines.append(f"| {name} | {rate[name]:,.0f} | {rate[name] / rate['plain loop']:.0%} |")
    lines += ["", "Target: async >= 50% of the plain loop."]
    multi = rate["multi -n 2"] / rate["async"]
    lines.append(f"Target: multi -n 2 >= 1.3x async: {'met' if multi >= 1.3 else 'NOT met'} ({multi:.2f}x).")
    if "Bytewax 1 worker" in rate:
        same = rate["async"] / rate["Bytewax 1 worker, the same PE methods"]
        idiomatic = rate["async"] / rate["Bytewax 1 worker"]
        lines.append(
            f"Target: async ahead of Bytewax with one worker doing the same work: {'met' if same > 1 else 'NOT met'}"
            f" ({same:.2f}x). Against Bytewax's idiomatic chain (its source and sum in C, three Python calls an item"
            f" where the others make five): {idiomatic:.2f}x."
        )
    lines.append("")
    section = "\n".join(lines)
    print(section)
    out = Path(__file__).resolve().parent / "results" / "chain.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(section)


if __name__ == "__main__":
    main()
