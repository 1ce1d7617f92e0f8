"""Planning and start-up time against the number of PE instances.

    .venv/bin/python bench/bench_planning.py [largest]

The graph is word count's shape: a producer feeds a PE that runs one instance
per ``-n`` (``workers`` on the async mapping), which feeds a three-instance
counter by ``group_by``: N + 4 instances and 4N + 1 channels. For N = 1,000,
10,000 and 100,000 (``largest`` caps it) it times

* planning: :func:`aiod4p.make_plan`, as every mapping plans;
* for N up to 10,000 (a run of 100,000 copies 100,000 PEs and takes
  minutes), a whole run on async with nothing to process: planning,
  start-up (an actor, inbox and channels for every instance), end-of-stream
  through every channel, shutdown;
* the same run with 100,000 items, and its time per item beyond the run
  with none.

Planning and start-up are linear in instances plus channels: the time per
instance stays flat as N grows (the ratio column, against N = 1,000 in the
same run; 1.0 is linear, 10 would be quadratic at 10x); and the time per
item does not grow with N. Writes bench/results/planning.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiod4p
from aiod4p import GenericPE, IterativePE, PlanOptions, ProducerPE, WorkflowGraph, group_by, make_plan

RESULTS = Path(__file__).resolve().parent / "results" / "planning.md"
SIZES = (1_000, 10_000, 100_000)
RUN_LIMIT = 10_000
ITEMS = 100_000


class Numbers(ProducerPE):
    """Produces ``count`` numbers (none: the run is all start-up and shutdown)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def produce(self) -> Iterator[Any]:
        yield from range(self.count)


class Split(IterativePE):
    def process_item(self, item: Any) -> Any:
        return (item, 1)


class Count(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(0))], outputs=["output"], parallelism=3)

    def process(self, inputs: dict[str, Any]) -> None:
        return None


def build(items: int = 0) -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Numbers(items), "output", Split(), "input")
    split = graph.pes[1]
    graph.connect(split, "output", Count(), "input")
    return graph


def timed(action: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - started


def main(largest: int) -> None:
    rows = []
    base: dict[str, float] = {}
    for n in (size for size in SIZES if size <= largest):
        options = PlanOptions(workers=1, default_parallelism=n)
        plan = make_plan(build(), options)
        instances, channels = len(plan.instances()), len(plan.channels)
        planning = min(timed(make_plan, build(), options) for _ in range(2))
        per = {"plan": planning / instances}
        run_cells = "| - | - | - | - |"
        if n <= RUN_LIMIT:
            running = timed(aiod4p.run, build(), mapping="async", workers=n)
            flowing = timed(aiod4p.run, build(ITEMS), mapping="async", workers=n)
            per["run"] = running / instances
            per["item"] = max(flowing - running, 1e-9) / ITEMS  # a ratio even if the items cost nothing
            run_cells = (
                f"| {running:.2f} | {per['run'] / base.get('run', per['run']):.1f} | {flowing:.2f}"
                f" | {per['item'] / base.get('item', per['item']):.1f} |"
            )
        base = base or per
        rows.append(
            f"| {n:,} | {instances:,} | {channels:,} | {planning:.2f} | {per['plan'] / base['plan']:.1f} {run_cells}"
        )
        print(rows[-1], flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        "## Planning and start-up (bench_planning.py)\n\n"
        "Word count's shape with N instances of its middle PE on async (N + 4 instances, 4N + 1 channels). "
        "Per-instance and per-item ratios are against N = 1,000 in the same run: 1.0 is linear"
        f" (per item: as fast with N instances as with 1,000). The run with items moves {ITEMS:,} numbers, so"
        " each of N = 10,000 instances gets 10 of them: an instance's first batches carry one item until its"
        " pace is measured, which costs more per item than the batches of the instances of N = 1,000.\n\n"
        "| N | instances | channels | plan (s) | plan per instance, ratio | run with no items (s) "
        f"| run per instance, ratio | run with {ITEMS:,} items (s) | time per item beyond no items, ratio |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else SIZES[-1])
