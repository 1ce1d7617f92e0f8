"""Peak memory of heavy results read slowly, on multi and mpi: the caller's process and each worker.

    .venv/bin/python bench/bench_memory.py [--quick]

A run of bench/heavy_results.py (arrays of 2 MB and of 20 MB as results) is read by a reader that
takes 20 ms per record, in a fresh process; its peak resident memory (VmHWM) and that of every process it
starts are sampled from /proc every 20 ms. The baseline, in the same run, is the same workflow with results
that are empty arrays. What heavy results add over it should stay a few ``PlanOptions.result_bytes`` (4 MiB) plus a few
items per process, however many results wait: the queues towards the caller are bounded by bytes
(docs/performance.md). Writes bench/results/memory.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, ROOT

from aiod4p._plan import PlanOptions

QUICK = "--quick" in sys.argv
READ_SECONDS = 0.02  # per record: a reader far slower than the workflow
READER = f"""
import asyncio, sys, time
sys.path.insert(0, {str(HERE)!r})
import aiod4p
from heavy_results import graph

async def main():
    async with aiod4p.start(graph, mapping=sys.argv[1], workers=int(sys.argv[2])) as run:
        async for record in run:
            time.sleep({READ_SECONDS})  # a slow reader (blocking, as one writing to a disk)

asyncio.run(main())
"""
CASES = [  # (megabytes per result, results)
    (0, 200),  # empty arrays: the baseline
    (2, 100 if QUICK else 200),
    (20, 20 if QUICK else 40),
]
MAPPINGS = [("multi", 2), ("mpi", 2)]


def _peak(pid: int) -> float | None:
    """The peak resident memory of process ``pid`` so far, MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, at any depth, with their command lines (not mpiexec's own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_worker(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"python" in command and b"hydra" not in command and b"mpiexec" not in command


def measure(mapping: str, workers: int, megabytes: float, count: int) -> tuple[float, float, float]:
    """Seconds, the reader's peak MB and the largest worker's peak MB of one run."""
    environment = {**os.environ, "HEAVY_MB": str(megabytes), "HEAVY_N": str(count)}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", READER, mapping, str(workers)], cwd=ROOT, env=environment, stderr=subprocess.PIPE
    )
    launcher, worker_peaks = 0.0, {}
    while process.poll() is None:
        launcher = max(launcher, _peak(process.pid) or 0.0)
        for pid in _descendants(process.pid):
            if _is_worker(pid):
                worker_peaks[pid] = max(worker_peaks.get(pid, 0.0), _peak(pid) or 0.0)
        time.sleep(0.02)  # sampling
    seconds = time.perf_counter() - started
    _, errors = process.communicate()
    if process.returncode:
        raise RuntimeError(f"{mapping} -n {workers}, {megabytes} MB results failed:\n{errors.decode()[-2000:]}")
    return seconds, launcher, max(worker_peaks.values(), default=0.0)


def main() -> None:
    window = PlanOptions().result_bytes / (1 << 20)
    rows = []
    for mapping, workers in MAPPINGS:
        base = measure(mapping, workers, *CASES[0])
        rows.append(
            f"| {mapping} -n {workers} | empty x {CASES[0][1]} | {base[0]:.1f} | {base[1]:.0f} | {base[2]:.0f} | | |"
        )
        for megabytes, count in CASES[1:]:
            seconds, launcher, worker = measure(mapping, workers, megabytes, count)
            rows.append(
                f"| {mapping} -n {workers} | {megabytes:g} MB x {count} | {seconds:.1f} | {launcher:.0f} | {worker:.0f}"
                f" | {(launcher - base[1]) / megabytes:.1f} | {(worker - base[2]) / megabytes:.1f} |"
            )
            print(rows[-1], flush=True)
    text = (
        "## Heavy results read slowly: peak memory (bench_memory.py)\n\n"
        f"Results of numpy arrays, read by a reader that takes {READ_SECONDS * 1000:.0f} ms per record"
        f" (`aiod4p.start`, `async for`); peak resident memory (VmHWM, MB) of the reader's process and of the"
        " largest worker (a multi worker, an MPI rank), and what heavy results add over the baseline (empty arrays) of"
        f" the same run, in results (`result_bytes` is {window:.0f} MiB: the queues towards the reader hold about"
        " that much per worker, and at least one result).\n\n"
        "| mapping | results | s | reader MB | worker MB | reader: + results | worker: + results |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n"
    )
    (HERE / "results" / "memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
