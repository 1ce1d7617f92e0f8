"""The ray mapping against the multi mapping, and the start-up time of every mapping.

    .venv/bin/python bench/bench_ray.py [--quick] [items] [cpu_items]

A local Ray (2 CPUs, a 200 MB object store, no dashboard) is started once by
this script, and every ray run joins it (``--address``), as runs on an
existing cluster do; its own start-up is reported apart.

(a) The 5-PE chain (bench/chain.py), ``items`` items (default 300,000): every
    run a fresh command timed from start to exit, median of 3:
    ``aiod4p run bench/chain.py:graph --mapping ray -n 2 --address A -i N``
    against ``--mapping multi -n 2``; fixed cost (``-i 1``) apart.
(b) The CPU-bound chain of bench/bench_multi.py (3 PEs and the consumer burn
    about 1 ms per item), ``cpu_items`` items (default 1,000), in this process
    through ``aiod4p.run``: ray -n 2 against multi -n 2 and simple, median of 3
    interleaved rounds (worker start-up included).
(c) Start-up: ``aiod4p run bench/chain.py:graph -i 1`` on every mapping
    (storm aside: it needs a Storm cluster), median of 3; ray both joining the
    running Ray and starting its own local Ray.
(d) The Ray comm alone: messages per second between two actors, one message
    per actor call (``batch=1``, 8 calls in flight) against the default
    batching (several messages per call while the window is full), median of
    3 interleaved rounds.

``--quick``: 30,000 items, 200 CPU-bound items, one round of each (to check
that it runs; figures from the full run only). Writes bench/results/ray.md.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray on this machine only: no token to share

import ray

import aiod4p
from aiod4p.mappings.ray import OBJECT_STORE_MEMORY, RayMapping
from aiod4p.transports.ray import BATCH, WINDOW, RayComm, RayCommHost

HERE = Path(__file__).resolve().parent
QUICK = "--quick" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--quick"]
ITEMS = int(ARGS[0]) if ARGS else 30_000 if QUICK else 300_000
CPU_ITEMS = int(ARGS[1]) if len(ARGS) > 1 else 200 if QUICK else 1_000
REPEATS = 1 if QUICK else 3
COMM_MESSAGES = 1_000 if QUICK else 5_000
TIMEOUT = 300.0

sys.path.insert(0, str(HERE))
from _common import BIN, timed  # noqa: E402 - bench/ is not a package
from bench_multi import calibrate, cpu_graph  # noqa: E402


def command(mapping: str, items: int, *extra: str) -> list[str]:
    return [str(BIN / "aiod4p"), "run", "bench/chain.py:graph", "--mapping", mapping, *extra, "-i", str(items)]


def median_time(name: str, run: list[str], check_items: int | None) -> float:
    times = []
    for _ in range(REPEATS):
        elapsed = timed(run, timeout=TIMEOUT, check_items=check_items)
        if elapsed is None:
            raise RuntimeError(f"{' '.join(run)} hung (killed after {TIMEOUT:.0f} s)")
        times.append(elapsed)
    print(f"{name}: median {statistics.median(times):.3f} s of {[round(t, 3) for t in times]}", flush=True)
    return statistics.median(times)


def _net(fixed: float, full: float) -> float:
    """Items per second once the fixed cost is taken out; NaN when the run was not longer than that cost."""
    return ITEMS / (full - fixed) if full > fixed else float("nan")


def _show(value: float, spec: str, unit: str = "") -> str:
    return "n/a" if math.isnan(value) else format(value, spec) + unit


def chain(address: str) -> list[str]:
    rows = []
    for name, extra in (("multi -n 2", ("-n", "2")), ("ray -n 2", ("-n", "2", "--address", address))):
        mapping = name.split()[0]
        fixed = median_time(f"{name} -i 1", command(mapping, 1, *extra), 1)
        full = median_time(f"{name} -i {ITEMS}", command(mapping, ITEMS, *extra), ITEMS)
        rows.append((name, fixed, full))
    base_rate, base_net = ITEMS / rows[0][2], _net(rows[0][1], rows[0][2])
    return [
        "### (a) The 5-PE trivial chain: ray -n 2 vs multi -n 2",
        "",
        f"{ITEMS:,} items; every run a fresh command timed from start to exit, median of {REPEATS}; ray joins the"
        " running local Ray. Fixed cost: the median run with `-i 1`; net items/s: items / (run time - fixed cost).",
        "",
        "| run | fixed start-up s | run s | items/s end to end | net items/s | end-to-end ratio | net ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {fixed:.2f} | {full:.2f} | {ITEMS / full:,.0f} | {_show(_net(fixed, full), ',.0f')}"
            f" | {ITEMS / full / base_rate:.2f}x | {_show(_net(fixed, full) / base_net, '.2f', 'x')} |"
            for name, fixed, full in rows
        ),
        "",
    ]


def cpu_bound() -> list[str]:
    loops = calibrate()
    configurations = {
        "simple": {"mapping": "simple"},
        "multi -n 2": {"mapping": "multi", "workers": 2},
        "ray -n 2": {"mapping": RayMapping(), "workers": 2},
    }
    times: dict[str, list[float]] = {name: [] for name in configurations}
    for _ in range(REPEATS):  # interleaved, so that every configuration meets the same machine load
        for name, options in configurations.items():
            started = time.perf_counter()
            aiod4p.run(cpu_graph(loops), CPU_ITEMS, **options)
            times[name].append(time.perf_counter() - started)
    timings = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"cpu-bound {name}: median {timings[name]:.3f} s of {[round(t, 3) for t in values]}", flush=True)
    return [
        "### (b) The CPU-bound chain: ray -n 2 vs multi -n 2",
        "",
        f"{CPU_ITEMS:,} items through bench/bench_multi.py's CPU-bound chain (3 PEs and the consumer burn about"
        f" 1 ms per item, {loops:,} loop iterations); `aiod4p.run` in this process, worker start-up included"
        " (multi's workers are spawned: this process runs Ray's threads); median of"
        f" {REPEATS} interleaved rounds.",
        "",
        "| mapping | run s | items/s | vs simple | vs multi -n 2 |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {seconds:.2f} | {CPU_ITEMS / seconds:,.0f} | {timings['simple'] / seconds:.2f}x"
            f" | {timings['multi -n 2'] / seconds:.2f}x |"
            for name, seconds in timings.items()
        ),
        "",
    ]


def startup(address: str, ray_start: float) -> list[str]:
    runs = {
        "simple": command("simple", 1),
        "async": command("async", 1),
        "multi -n 2": command("multi", 1, "-n", "2"),
        "mpi -n 2": command("mpi", 1, "-n", "2"),
        "ray -n 2, joining a running Ray": command("ray", 1, "-n", "2", "--address", address),
        "ray -n 2, starting a local Ray": command("ray", 1, "-n", "2"),
    }
    timings = {name: median_time(f"start-up {name}", run, 1) for name, run in runs.items()}
    return [
        "### (c) Start-up: a trivial workflow on each mapping",
        "",
        f"`aiod4p run bench/chain.py:graph -i 1` as a fresh command, start to exit, median of {REPEATS}"
        " (storm aside: it needs a Storm cluster). Starting the local Ray this script joins took"
        f" {ray_start:.1f} s.",
        "",
        "| mapping | s | vs simple |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {seconds:.2f} | {seconds / timings['simple']:.1f}x |" for name, seconds in timings.items()),
        "",
    ]


class CommEnd(RayCommHost):
    """One end of a Ray comm, in an actor: sends or receives ``n`` messages of 2 KB."""

    async def open(self, peer: object, mine: str, theirs: str, window: int, batch: int) -> None:
        self.comm = RayComm(self, mine, peer, theirs, window=window, batch=batch)

    async def send(self, n: int) -> None:
        for i in range(n):
            await self.comm.send((i, b"x" * 2048))
        await self.comm.aclose()

    async def receive(self, n: int) -> None:
        for _ in range(n):
            await self.comm.receive()


def comm() -> list[str]:
    end = ray.remote(num_cpus=0)(CommEnd)
    configurations = {"one message per call": (8, 1), f"batched (window {WINDOW}, batch {BATCH})": (WINDOW, BATCH)}
    times: dict[str, list[float]] = {name: [] for name in configurations}
    for _ in range(REPEATS):
        for name, (window, batch) in configurations.items():
            a, b = end.remote(), end.remote()
            ray.get([a.open.remote(b, "a", "b", window, batch), b.open.remote(a, "b", "a", window, batch)])
            started = time.perf_counter()
            ray.get([a.send.remote(COMM_MESSAGES), b.receive.remote(COMM_MESSAGES)], timeout=TIMEOUT)
            times[name].append(time.perf_counter() - started)
            ray.kill(a)
            ray.kill(b)
    rates = {name: COMM_MESSAGES / statistics.median(values) for name, values in times.items()}
    for name, rate in rates.items():
        print(f"comm {name}: {rate:,.0f} messages/s", flush=True)
    base = rates["one message per call"]
    return [
        "### (d) The Ray comm alone: batching messages into actor calls",
        "",
        f"{COMM_MESSAGES:,} messages of 2 KB from one actor to another through one `RayComm`, the receiver reading"
        f" as fast as it can; median of {REPEATS} interleaved rounds. In the mapping the engine's credits bound the"
        " batches in flight per channel, so a run gains less than the comm alone.",
        "",
        "| comm | messages/s | vs one message per call |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {rate:,.0f} | {rate / base:.1f}x |" for name, rate in rates.items()),
        "",
    ]


def main() -> int:
    started = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=OBJECT_STORE_MEMORY, include_dashboard=False)
    ray_start = time.perf_counter() - started
    try:
        address = ray.get_runtime_context().gcs_address
        lines = [
            "## ray: the plan's workers as Ray actors",
            "",
            f"`.venv/bin/python bench/bench_ray.py{' --quick' if QUICK else ''} {ITEMS} {CPU_ITEMS}` on"
            f" {os.cpu_count()} cores, Ray {ray.__version__}.",
            "",
            *chain(address),
            *cpu_bound(),
            *startup(address, ray_start),
            *comm(),
        ]
    finally:
        ray.shutdown()
    text = "\n".join(lines)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ray.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
