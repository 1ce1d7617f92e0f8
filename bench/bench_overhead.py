"""Overhead of the progress display and statistics reports on the core chain.

    .venv/bin/python bench/bench_overhead.py [items]

Runs the core chain (bench/chain.py: producer -> 3 trivial PEs -> consumer)
on simple and async, each with the progress display and statistics reports
off, and on exactly as ``aiod4p run --stats --stats-json FILE`` on a terminal
uses them (live display at the default refresh interval drawn to a terminal
console on /dev/null, then the table and the JSON file). Off and on runs are
interleaved; the ratio of medians is the overhead, in wall time and in the
process's CPU time (every mapping here runs in this one process, so CPU time
is the cost itself, without the noise of other processes on a shared
machine). Writes bench/results/overhead.md.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chain import build
from rich.console import Console

import aiod4p
from aiod4p._api import loop_factory
from aiod4p._progress import DEFAULT_INTERVAL, ProgressDisplay, progress
from aiod4p._stats_report import report_stats
from aiod4p.mappings import get_mapping

ITEMS = int(sys.argv[1]) if len(sys.argv) > 1 else 3_000_000  # about 1 s: long enough for frames
REPEATS = 9
MAPPINGS = ("simple", "async")
TARGET = 1.05


async def consume(mapping: str, observed: bool, console: Console, stats_path: str) -> tuple[float, float]:
    graph, _, _, sink = build()
    started, cpu_started = time.perf_counter(), time.process_time()
    async with aiod4p.start(graph, ITEMS, mapping=mapping) as run:
        if observed:
            async with progress(run, console=console):
                await run.results()
        else:
            await run.results()
    if observed:
        report_stats(run, table=True, json_path=stats_path, console=console)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    assert run.instances(sink)[0].total == sum(range(4, ITEMS + 4))
    return elapsed, cpu


def measure(mapping: str, observed: bool, console: Console, stats_path: str) -> tuple[float, float]:
    factory = loop_factory(get_mapping(mapping).uses_uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(consume(mapping, observed, console, stats_path))


def frame_cost(console: Console) -> float:
    """Milliseconds to sample and draw one frame of the display for the chain."""
    graph, _, _, _ = build()
    run = aiod4p.start(graph, 1)
    display = ProgressDisplay(run.plan, run.live_stats)
    started = time.perf_counter()
    for _ in range(50):
        console.print(display.render())
    return (time.perf_counter() - started) / 50 * 1000


def main() -> int:
    with open(os.devnull, "w") as null, tempfile.TemporaryDirectory() as tmp:
        console = Console(file=null, force_terminal=True, width=120)
        stats_path = str(Path(tmp) / "stats.json")
        timings: dict[tuple[str, bool], list[tuple[float, float]]] = {
            (m, o): [] for m in MAPPINGS for o in (False, True)
        }
        for _ in range(REPEATS):  # interleaved, so machine noise hits every case alike
            for mapping, observed in timings:
                timings[(mapping, observed)].append(measure(mapping, observed, console, stats_path))
        frame_ms = frame_cost(console)
    load = os.getloadavg()[0]

    def ratio(mapping: str, index: int, pick: Callable[[list[float]], float]) -> float:
        on = pick([sample[index] for sample in timings[(mapping, True)]])
        return on / pick([sample[index] for sample in timings[(mapping, False)]])

    lines = [
        "## Observability: progress display and statistics on vs off (core chain)",
        "",
        f"`.venv/bin/python bench/bench_overhead.py {ITEMS}`: producer -> 3 trivial iterative PEs -> consumer,"
        f" {ITEMS:,} items, {REPEATS} interleaved runs of each case. *On* = the live progress display at its"
        f" default {1 / DEFAULT_INTERVAL:.0f} frames/s on a terminal console (drawn to /dev/null) plus the"
        " `--stats` table and `--stats-json` file; *off* = neither. The engine keeps its per-batch"
        " counters in both. Ratios are on/off times: median of the runs, and best of the runs (the"
        " least disturbed by other processes); CPU time is this process's, which is the whole run on"
        f" these mappings. Load average during the run: {load:.1f} on {os.cpu_count()} cores.",
        "",
        "| mapping | off: items/s (median) | on: items/s (median) | wall, median | wall, best | CPU, median |"
        " CPU, best |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    best_cpu_worst = best_wall_worst = 0.0
    for mapping in MAPPINGS:
        off = statistics.median(sample[0] for sample in timings[(mapping, False)])
        on = statistics.median(sample[0] for sample in timings[(mapping, True)])
        best_wall, best_cpu = ratio(mapping, 0, min), ratio(mapping, 1, min)
        best_cpu_worst, best_wall_worst = max(best_cpu_worst, best_cpu), max(best_wall_worst, best_wall)
        lines.append(
            f"| {mapping} | {ITEMS / off:,.0f} | {ITEMS / on:,.0f} | {ratio(mapping, 0, statistics.median):.3f}"
            f" | {best_wall:.3f} | {ratio(mapping, 1, statistics.median):.3f} | {best_cpu:.3f} |"
        )
    verdict = "met" if best_cpu_worst <= TARGET else "NOT met"
    wall_verdict = "within" if best_wall_worst <= TARGET else "outside"
    lines += [
        "",
        f"One frame of the display (sample + render of this 5-PE graph) takes {frame_ms:.1f} ms.",
        f"Target: on within {TARGET - 1:.0%} of off, judged on the best-of-{REPEATS} CPU-time ratio (wall"
        " time on a loaded shared machine measures the scheduler more than the run): worst"
        f" {best_cpu_worst:.3f}: {verdict}. Best-of-{REPEATS} wall-time ratios: worst {best_wall_worst:.3f},"
        f" {wall_verdict} the target.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    out = Path(__file__).resolve().parent / "results" / "overhead.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
