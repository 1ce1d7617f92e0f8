"""Checkpoints: their cost on a keyed chain, their size and time against state size, recovery after a kill.

    .venv/bin/python bench/bench_checkpoint.py [--quick] [items]

(a) Throughput of a keyed chain (producer -> keyed counter over 1,000 keys ->
    results at the end), ``items`` items (default 4,000,000, so a run takes
    several checkpoints; 200,000 with ``--quick``), on async -n 2 and
    multi -n 2, with checkpoints every 1 s against none; medians of 3, the ratio
    is the cost. Target: under 5%.
(b) Checkpoint size and time (trigger to manifest) against state size: the
    same chain with 1,000 / 10,000 / 100,000 keys on async, checkpoints every
    0.2 s; mean over the checkpoints of the run.
(c) Recovery: multi -n 2 where a worker SIGKILLs itself halfway (``--restarts 1``)
    against the same run without a kill; the difference is what the failure cost
    (detection, restart, restore and the work redone since the last checkpoint).

Writes bench/results/checkpoint.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiod4p
from aiod4p import Checkpointing, IterativePE, ProducerPE, WorkflowGraph
from aiod4p.mappings import get_mapping

HERE = Path(__file__).resolve().parent
QUICK = "--quick" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--quick"]
ITEMS = int(ARGS[0]) if ARGS else 200_000 if QUICK else 4_000_000
REPEATS = 3
TARGET = 0.05
KILL_ENV = "AIOD4P_BENCH_KILL_AT"


class Numbers(ProducerPE):
    def __init__(self) -> None:
        super().__init__()
        self.made = 0

    def produce(self) -> int:
        self.made += 1
        return self.made


class Keyed(IterativePE):
    """Counts items per key (``item % keys``): its counter is keyed state."""

    keyed_state = "counts"

    def __init__(self, keys: int) -> None:
        super().__init__(grouping=[0])
        self.keys = keys
        self.counts: dict[int, int] = {}
        self.seen = 0

    def process_item(self, pair: tuple[int, int]) -> None:
        self.counts[pair[0]] = self.counts.get(pair[0], 0) + 1
        self.seen += 1
        kill_at = os.environ.get(KILL_ENV)
        if kill_at and self.seen == int(kill_at) and multiprocessing.parent_process() is not None:
            marker = Path(os.environ[KILL_ENV + "_MARK"])
            if not marker.exists():
                marker.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)

    def postprocess(self) -> None:
        self.write("output", sum(self.counts.values()))


class Pair(IterativePE):
    def __init__(self, keys: int) -> None:
        super().__init__()
        self.keys = keys

    def process_item(self, number: int) -> tuple[int, int]:
        return (number % self.keys, 1)


def chain(keys: int) -> WorkflowGraph:
    graph = WorkflowGraph()
    numbers, pair, keyed = Numbers(), Pair(keys), Keyed(keys)
    numbers.id, pair.id, keyed.id = "numbers", "pair", "keyed"
    graph.connect(numbers, "output", pair, "input")
    graph.connect(pair, "output", keyed, "input")
    return graph


def timed_run(mapping: str, keys: int, items: int, checkpointing: Checkpointing | None) -> float:
    chosen = get_mapping(mapping)
    chosen.checkpointing = checkpointing
    started = time.perf_counter()
    results = aiod4p.run(chain(keys), items, mapping=chosen, workers=2)
    elapsed = time.perf_counter() - started
    total = sum(record.data for record in results)
    if total != items:
        raise RuntimeError(f"{mapping}: counted {total} items, not {items}")
    return elapsed


class Completions(logging.Handler):
    """Collects '(seconds, bytes)' of every completed checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"complete in ([0-9.]+) s, (\d+) bytes", record.getMessage())
        if found:
            self.seen.append((float(found[1]), int(found[2])))


def cost() -> list[str]:
    lines = [
        "### (a) Cost of checkpoints every 1 s on a keyed chain",
        "",
        f"numbers -> pair -> keyed counter (1,000 keys, group-by), {ITEMS:,} items, -n 2; median of {REPEATS}.",
        "",
        "| mapping | off s | every 1 s s | cost |",
        "| --- | ---: | ---: | ---: |",
    ]
    worst = -1.0
    for mapping in ("async", "multi"):
        off, on = [], []
        for _ in range(REPEATS):
            off.append(timed_run(mapping, 1000, ITEMS, None))
            with tempfile.TemporaryDirectory() as directory:
                on.append(timed_run(mapping, 1000, ITEMS, Checkpointing(directory, interval=1.0)))
        ratio = statistics.median(on) / statistics.median(off) - 1
        worst = max(worst, ratio)
        print(f"{mapping}: off {off}, on {on}", flush=True)
        lines.append(f"| {mapping} | {statistics.median(off):.2f} | {statistics.median(on):.2f} | {ratio:+.1%} |")
    lines += ["", f"Target: under {TARGET:.0%}: {'met' if worst < TARGET else 'NOT met'} ({worst:+.1%}).", ""]
    return lines


def size_and_time() -> list[str]:
    lines = [
        "### (b) Checkpoint size and time against state size",
        "",
        "The same chain on async -n 2, checkpoints every 0.2 s; time from trigger to manifest, mean of the run's"
        " checkpoints.",
        "",
        "| keys | checkpoints | mean bytes | mean ms |",
        "| ---: | ---: | ---: | ---: |",
    ]
    logger = logging.getLogger("aiod4p.checkpoint")
    for keys in (1_000, 10_000, 100_000):
        handler = Completions()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            with tempfile.TemporaryDirectory() as directory:
                timed_run("async", keys, max(ITEMS // 2, keys * 3), Checkpointing(directory, interval=0.2))
        finally:
            logger.removeHandler(handler)
        seen = handler.seen or [(0.0, 0)]
        mean_ms = statistics.mean(s for s, _ in seen) * 1000
        lines.append(f"| {keys:,} | {len(handler.seen)} | {statistics.mean(b for _, b in seen):,.0f} | {mean_ms:.1f} |")
        print(lines[-1], flush=True)
    return [*lines, ""]


def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in sorted(seconds))


def recovery() -> list[str]:
    clean, killed = [], []
    with tempfile.TemporaryDirectory() as directory:
        marker = Path(directory) / "killed"
        for attempt in range(REPEATS):
            where = Path(directory) / str(attempt)
            clean.append(timed_run("multi", 1000, ITEMS, Checkpointing(where / "a", interval=0.5, restarts=1)))
            os.environ[KILL_ENV] = str(ITEMS // 4)  # each of the 2 keyed instances sees about half the items
            os.environ[KILL_ENV + "_MARK"] = str(marker)
            try:
                killed.append(timed_run("multi", 1000, ITEMS, Checkpointing(where / "b", interval=0.5, restarts=1)))
            finally:
                del os.environ[KILL_ENV], os.environ[KILL_ENV + "_MARK"]
            if not marker.exists():
                raise RuntimeError("the worker was not killed")
            marker.unlink()
    print(f"recovery: clean {clean}, with a kill {killed}", flush=True)
    no_failure, failure = statistics.median(clean), statistics.median(killed)
    return [
        "### (c) Recovery after a SIGKILLed worker",
        "",
        f"multi -n 2, {ITEMS:,} items, checkpoints every 0.5 s, `restarts=1`; a keyed instance kills its worker"
        f" halfway; median of {REPEATS}.",
        "",
        "| run | median s | runs, s |",
        "| --- | ---: | --- |",
        f"| no failure | {no_failure:.2f} | {_runs(clean)} |",
        f"| one kill, restarted from the last checkpoint | {failure:.2f} | {_runs(killed)} |",
        f"| cost of the failure (detection, restart, restore, work redone) | {failure - no_failure:+.2f} | |",
        "",
        "Every run's counts are checked. A cost smaller than the spread of the runs without a failure"
        f" ({max(clean) - min(clean):.2f} s here) is below what this machine can measure.",
        "",
    ]


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    lines = ["## Checkpoints (bench/bench_checkpoint.py)", "", *cost(), *size_and_time(), *recovery()]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "checkpoint.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
