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
    assert sink.total == sum(range(4, ITEMS + 4))
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
    wall = {case: statistics.median(v[0] for v in values) for case, values in timings.items()}
    cpu = {case: statistics.median(v[1] for v in values) for case, values in timings.items()}
    lines = [
        "## Observability: progress display and statistics on vs off (core chain)",
        "",
        f"`.venv/bin/python bench/bench_overhead.py {ITEMS}`: producer -> 3 trivial iterative PEs -> consumer,"
        f" {ITEMS:,} items, median of {REPEATS} interleaved runs. *On* = the live progress display at its"
        f" default {1 / DEFAULT_INTERVAL:.0f} frames/s on a terminal console (drawn to /dev/null) plus the"
        " `--stats` table and `--stats-json` file; *off* = neither. The engine keeps its per-batch"
        " counters in both.",
        "",
        "| mapping | off: items/s | on: items/s | on / off, wall time | on / off, CPU time |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    worst_wall = worst_cpu = 0.0
    for mapping in MAPPINGS:
        off, on = (mapping, False), (mapping, True)
        wall_ratio, cpu_ratio = wall[on] / wall[off], cpu[on] / cpu[off]
        worst_wall, worst_cpu = max(worst_wall, wall_ratio), max(worst_cpu, cpu_ratio)
        lines.append(
            f"| {mapping} | {ITEMS / wall[off]:,.0f} | {ITEMS / wall[on]:,.0f} | {wall_ratio:.3f} | {cpu_ratio:.3f} |"
        )
    verdict = "met" if max(worst_wall, worst_cpu) <= TARGET else "NOT met"
    lines += [
        "",
        f"One frame of the display (sample + render of this 5-PE graph) takes {frame_ms:.1f} ms.",
        f"Target: on within {TARGET - 1:.0%} of off (ratio <= {TARGET}); worst wall {worst_wall:.3f},"
        f" worst CPU {worst_cpu:.3f}: {verdict}.",
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
