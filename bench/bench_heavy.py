"""Heavy items: three coarse-grained domain shapes vs dispel4py 1.2.1, and a sweep of item cost x size x stages.

    .venv/bin/python bench/bench_heavy.py [--quick] [--sweep]

(a) Domains (bench/heavy.py; bench/heavy_d4p.py is the same work in
    dispel4py's API, bench/heavy_work.py the work itself):
    seismic: 30 stations' 65,536-sample traces -> whiten (numpy FFT) -> every
    pair (435 items of 1 MB) -> cross-correlation peak -> a global sink;
    galaxies: 2,000 catalogue rows -> a 2 ms remote lookup per row (awaited
    in aiod4p, parallelism 8; a blocking sleep in dispel4py) -> a pure-Python
    classification -> a global census;
    articles: 6,000 articles of 200-600 words -> lexicon scoring -> totals
    per topic (group-by, parallelism 2) -> a global summary.
    Every run is a fresh command timed from start to exit (start-up and
    imports included), on every aiod4p mapping and on dispel4py's simple,
    multi and mpi with dispel4py's process counts (one process per PE
    instance: ``D4P_PROCESSES``); aiod4p's multi and mpi also run with that
    ``-n`` (more workers than cores). Every run's result is checked against
    dispel4py simple's.
(b) Sweep: source -> ``stages`` stages of pure-Python work per item -> a
    global tally, in this process through ``aiod4p.run``: multi -n 2 (worker
    start-up included) against simple (one process); items per cell so that
    each stage holds about a second of work (at most 20,000 items, 200 MB).

``--quick``: the small domain sizes, one run each, and a 6-cell sweep.
``--sweep``: (b) alone. Writes bench/results/heavy.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = "--quick" in sys.argv
SWEEP_ONLY = "--sweep" in sys.argv
if QUICK:
    os.environ["HEAVY_QUICK"] = "1"  # before heavy_work is imported, here and in every command
sys.path.insert(0, str(HERE))

import heavy  # noqa: E402
import heavy_work as work  # noqa: E402
from _common import BIN, D4P_BIN, D4P_PYTHON, timed  # noqa: E402

import aiod4p  # noqa: E402

REPEATS = 1 if QUICK else 3
TIMEOUT = 120.0 if QUICK else 600.0  # dispel4py's mpi mapping sometimes hangs at finalize: reported as hung
D4P_PROCESSES = {"seismic": 8, "galaxies": 12, "articles": 8}
TARGET_D4P = 2.0


def _mpi_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return (BIN / "mpiexec").exists()


def commands(domain: str) -> dict[str, list[str]]:
    processes = D4P_PROCESSES[domain]
    ours = [str(BIN / "aiod4p"), "run", f"bench/heavy.py:{domain}", "-i", "1", "-q", "--mapping"]
    runs = {
        "aiod4p simple": [*ours, "simple"],
        "aiod4p async": [*ours, "async"],
        "aiod4p multi -n 2": [*ours, "multi", "-n", "2"],
        f"aiod4p multi -n {processes}": [*ours, "multi", "-n", str(processes)],
    }
    if _mpi_available():
        runs["aiod4p mpi -n 2"] = [*ours, "mpi", "-n", "2"]
        runs[f"aiod4p mpi -n {processes}"] = [*ours, "mpi", "-n", str(processes)]
    if D4P_PYTHON.exists():
        theirs = ["bench/heavy_d4p.py", "-a", domain, "-i", "1"]
        runs["dispel4py simple"] = [str(D4P_BIN / "dispel4py"), "simple", *theirs]
        runs[f"dispel4py multi -n {processes}"] = [str(D4P_BIN / "dispel4py"), "multi", *theirs, "-n", str(processes)]
        if (D4P_BIN / "mpiexec").exists():
            runs[f"dispel4py mpi -n {processes}"] = [
                str(D4P_BIN / "mpiexec"), "-n", str(processes), str(D4P_BIN / "dispel4py"), "mpi", *theirs
            ]  # fmt: skip
    return runs


def domains() -> list[str]:
    lines = [
        "### (a) Three domain shapes vs dispel4py 1.2.1",
        "",
        f"Sizes: seismic {work.STATIONS} stations x {work.SAMPLES:,} samples"
        f" ({work.STATIONS * (work.STATIONS - 1) // 2} pairs), galaxies {work.GALAXIES:,} rows"
        f" ({work.LOOKUP_SECONDS * 1000:.0f} ms lookup each), articles {work.ARTICLES:,}. Each run a fresh"
        f" command, median of {REPEATS}; dispel4py's process counts: {D4P_PROCESSES}.",
        "",
        "| domain | run | s | vs dispel4py simple | vs dispel4py multi | vs dispel4py mpi |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    verdicts = []
    for domain in ("seismic", "galaxies", "articles"):
        runs = commands(domain)
        times: dict[str, list[float]] = {name: [] for name in runs}
        reference: object = None
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(REPEATS):
                for name, command in runs.items():
                    out = Path(tmp, "out.json")
                    out.unlink(missing_ok=True)
                    os.environ["HEAVY_OUT"] = str(out)
                    elapsed = timed(command, timeout=TIMEOUT)
                    if elapsed is None:
                        print(f"{domain} {name}: hung", flush=True)
                        continue
                    result = json.loads(out.read_text())
                    if reference is None:
                        reference = result
                    elif result != reference:
                        raise RuntimeError(f"{domain}: {name} computed another result than the first run")
                    times[name].append(elapsed)
                    print(f"{domain} {name}: {elapsed:.2f} s", flush=True)
        os.environ.pop("HEAVY_OUT", None)
        median = {name: statistics.median(values) for name, values in times.items() if values}
        processes = D4P_PROCESSES[domain]
        bases = [median.get(f"dispel4py {kind}") for kind in ("simple", f"multi -n {processes}", f"mpi -n {processes}")]
        for name in runs:
            if name not in median:
                lines.append(f"| {domain} | {name} | hung | | | |")
                continue
            ratios = [f"{base / median[name]:.2f}x" if base else "-" for base in bases]
            lines.append(f"| {domain} | {name} | {median[name]:.2f} | {' | '.join(ratios)} |")
        multi_base = bases[1]
        if multi_base:
            best = min(median.get("aiod4p multi -n 2", 1e9), median.get(f"aiod4p multi -n {processes}", 1e9))
            ratio = multi_base / best
            verdicts.append(
                f"{domain}: aiod4p multi (best -n) {ratio:.2f}x dispel4py multi -n {processes}"
                f" ({'met' if ratio >= TARGET_D4P else 'NOT met'})"
            )
    lines += ["", f"Target: multi >= {TARGET_D4P:.0f}x dispel4py's multi: " + "; ".join(verdicts) + ".", ""]
    return lines


# -- (b) the sweep ---------------------------------------------------------------------------

COSTS_MS = (0.1, 1.0, 10.0) if QUICK else (0.01, 0.1, 1.0, 10.0, 100.0)
SIZES = (100, 1_000_000) if QUICK else (100, 10_000, 1_000_000)
STAGES = (1,) if QUICK else (1, 3)
SECONDS_PER_STAGE = 0.5 if QUICK else 1.0


def _run(graph_args: tuple[int, int, int, int], mapping: str) -> float:
    graph = heavy.sweep(*graph_args)
    options = {"workers": 2} if mapping == "multi" else {}
    started = time.perf_counter()
    results = aiod4p.run(graph, 1, mapping=mapping, **options)
    elapsed = time.perf_counter() - started
    assert results.data() == [graph_args[0]], results.data()
    return elapsed


def _plain_two(graph_args: tuple[int, int, int, int]) -> float:
    """The cell's work without aiod4p: two forked processes, each making and spinning on half the items."""
    count, size, stages, iterations = graph_args
    started = time.perf_counter()
    children = []
    for half in range(2):
        pid = os.fork()
        if pid == 0:
            for index in range(half, count, 2):
                item = index.to_bytes(8, "little") + bytes(max(size - 8, 0))
                for _ in range(stages):
                    work.spin(iterations)
                del item
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return time.perf_counter() - started


def _spread(label: str, values: list[float], unit: str) -> str:
    if not values:
        return f"{label}: no cell"
    return f"{label}: median {statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def sweep() -> list[str]:
    per_ms = work.calibrate()
    # multi's fixed cost (two workers forked, joined and stopped) on a run of next to no work
    fixed = statistics.median(_run((8, 100, 1, 1), "multi") - _run((8, 100, 1, 1), "simple") for _ in range(3))
    lines = [
        "### (b) Sweep: speed-up of multi -n 2 over one process (simple)",
        "",
        f"Pure-Python work calibrated at {per_ms:,.0f} loop iterations per ms; each cell: simple then multi -n 2"
        f" in this process (worker start-up included), and the yardstick, interleaved: {REPEATS} rounds; times are"
        " medians, ratios the median of each round's ratio.",
        "",
        f"multi's fixed cost (8 items of no work, minus simple's): {fixed:.3f} s; \"net of start-up\" divides"
        " simple's time by multi's without it. The yardstick: the same items made and spun on in two plain"
        " forked processes (no aiod4p), and its speed-up over simple: what two cores give on this machine.",
        "",
        "| item cost ms | item size | stages | items | simple s | multi -n 2 s | speed-up | net of start-up"
        " | two plain processes s | their speed-up | multi / yardstick |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    short: list[str] = []
    slower: list[str] = []
    heavy_cells: list[tuple[float, float]] = []  # (yardstick's speed-up, multi / yardstick) of cells >= 1 ms
    for cost in COSTS_MS:
        for size in SIZES:
            for stages in STAGES:
                count = int(min(SECONDS_PER_STAGE * 1000 / cost, 20_000, 200_000_000 / size))
                args = (max(count, 8), size, stages, max(1, int(cost * per_ms)))
                rounds = [(_run(args, "simple"), _run(args, "multi"), _plain_two(args)) for _ in range(REPEATS)]
                simple, multi, plain = (statistics.median(times) for times in zip(*rounds, strict=True))
                # Ratios of the same round: a stretch of load elsewhere slows all three runs of a round alike.
                speedup = statistics.median(one / two for one, two, _ in rounds)
                plain_speedup = statistics.median(one / two for one, _, two in rounds)
                of_yardstick = statistics.median(two / one for _, one, two in rounds)
                cell = f"{cost} ms x {size:,} B x {stages}"
                if cost >= 1:
                    heavy_cells.append((plain_speedup, of_yardstick))
                    if speedup < 1.8:
                        short.append(f"{cell} ({speedup:.2f}x)")
                if speedup < 1:
                    slower.append(f"{cell} ({speedup:.2f}x)")
                net = simple / max(multi - fixed, 1e-3)
                lines.append(
                    f"| {cost} | {size:,} | {stages} | {args[0]:,} | {simple:.2f} | {multi:.2f} | {speedup:.2f}x"
                    f" | {net:.2f}x | {plain:.2f} | {plain_speedup:.2f}x | {of_yardstick:.2f}x |"
                )
                print(lines[-1], flush=True)
    lines += [
        "",
        "Target: >= 1.8x for every cell of >= 1 ms per item: "
        + ("met." if not short else f"NOT met for {', '.join(short)}."),
        "No cell slower than one process: " + ("met." if not slower else f"NOT met for {', '.join(slower)}."),
        "",
        _spread(
            "Over the cells of >= 1 ms, two plain processes (what the machine's two cores gave)",
            [plain for plain, _ in heavy_cells],
            "x over one process",
        )
        + "; "
        + _spread("multi -n 2", [share for _, share in heavy_cells], "x the yardstick's speed")
        + ".",
        "",
    ]
    return lines


def main() -> None:
    lines = [
        "## Heavy items: domain shapes and a cost x size sweep",
        "",
        f"`.venv/bin/python bench/bench_heavy.py{' --quick' if QUICK else ''}` on {os.cpu_count()} cores.",
        "",
    ]
    if not SWEEP_ONLY:
        lines += domains()
    lines += sweep()
    section = "\n".join(lines)
    print(section)
    out = HERE / "results" / "heavy.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(section)


if __name__ == "__main__":
    main()
