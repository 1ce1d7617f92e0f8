"""The mpi mapping against dispel4py 1.2.1's MPI mapping on the 5-PE chain.

    .venv/bin/python bench/bench_mpi.py [items]

The chain is producer -> 3 trivial iterative PEs -> consumer (bench/chain.py;
bench/mpi_d4p_chain.py is the same PEs in dispel4py's API). Every run is a
fresh command, timed from start to exit, so it includes the launch and
teardown of the MPI job:

* aiod4p, launched by the mapping: ``aiod4p run bench/chain.py:graph --mapping mpi -n 2 -i N``,
  20 consecutive runs (each must finish within a timeout: no hang);
* aiod4p under mpiexec: ``mpiexec -n 2 aiod4p run bench/chain.py:graph --mapping mpi -i N``;
* dispel4py: ``mpiexec -n 5 dispel4py mpi bench/mpi_d4p_chain.py -i N``. Its MPI
  mapping needs a rank per PE: with ``-n 2`` it aborts ("Graph is larger than
  job size"), which this benchmark checks and reports.

The fixed launch + teardown cost is the median of runs with ``-i 1``; items/s
are reported end to end (N / wall time) and net of that fixed cost (n/a when
the work is within the noise of the fixed cost). aiod4p's
runs check from ``--stats-json`` that the consumer received every item.
Writes bench/results/mpi.md. dispel4py runs in .venv-dispel4py
(``scripts/setup --dev``, or ``AIOD4P_DISPEL4PY_PYTHON``).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, D4P_BIN, D4P_PYTHON, HERE, ROOT, timed

ITEMS = int(sys.argv[1]) if len(sys.argv) > 1 else 500_000
CONSECUTIVE = 20
REPEATS = 3
FIXED_REPEATS = 5
TIMEOUT = 120.0
TARGET = 10.0


def aiod4p_launched(items: int) -> list[str]:
    return [str(BIN / "aiod4p"), "run", "bench/chain.py:graph", "--mapping", "mpi", "-n", "2", "-i", str(items)]


def aiod4p_under_mpiexec(items: int) -> list[str]:
    return [str(BIN / "mpiexec"), "-n", "2", str(BIN / "aiod4p"), "run", "bench/chain.py:graph", "--mapping", "mpi",
            "-i", str(items)]  # fmt: skip


def dispel4py(items: int, ranks: int = 5) -> list[str]:
    return [str(D4P_BIN / "mpiexec"), "-n", str(ranks), str(D4P_BIN / "dispel4py"), "mpi", "bench/mpi_d4p_chain.py",
            "-i", str(items)]  # fmt: skip


def series(name: str, make: Callable[[int], list[str]], runs: int, items: int, check: bool) -> tuple[list[float], int]:
    """``runs`` consecutive runs; returns the times of the finished ones and the number that hung."""
    times, hung = [], 0
    for _ in range(runs):
        elapsed = timed(make(items), timeout=TIMEOUT, check_items=items if check else None)
        if elapsed is None:
            hung += 1
        else:
            times.append(elapsed)
    print(f"{name} -i {items}: {len(times)} runs, median {statistics.median(times) if times else float('nan'):.3f} s,"
          f" {hung} hung", flush=True)  # fmt: skip
    return times, hung


def main() -> int:
    if not D4P_PYTHON.exists():
        print(f"dispel4py 1.2.1 is not installed at {D4P_PYTHON} (scripts/setup --dev)", file=sys.stderr)
        return 1
    d4p_two = subprocess.run(dispel4py(10, ranks=2), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    d4p_two_fails = d4p_two.returncode != 0 and "larger than job size" in d4p_two.stdout + d4p_two.stderr
    print(f"dispel4py mpi -n 2: rc {d4p_two.returncode} (needs a rank per PE: {d4p_two_fails})", flush=True)

    rows = []
    for name, make, runs, check in (
        ("aiod4p mpi -n 2, launched by the mapping", aiod4p_launched, CONSECUTIVE, True),
        ("aiod4p mpi -n 2, under mpiexec", aiod4p_under_mpiexec, REPEATS, True),
        ("dispel4py 1.2.1 mpi -n 5", dispel4py, REPEATS, False),
    ):
        fixed, fixed_hung = series(name, make, FIXED_REPEATS, 1, check)
        full, hung = series(name, make, runs, ITEMS, check)
        rows.append((name, statistics.median(fixed), statistics.median(full), len(full), hung + fixed_hung))

    d4p_rate = ITEMS / rows[-1][2]
    d4p_net = ITEMS / (rows[-1][2] - rows[-1][1])
    lines = [
        "## MPI: the 5-PE chain on the mpi mapping vs dispel4py 1.2.1's MPI mapping",
        "",
        f"`.venv/bin/python bench/bench_mpi.py {ITEMS}`: producer -> 3 trivial iterative PEs -> consumer,"
        f" {ITEMS:,} items; every run is a fresh command timed from start to exit (MPI launch and teardown"
        " included); medians. Fixed cost: the median run with `-i 1`. Net items/s: items / (run time - fixed cost).",
        "",
        "| run | runs (hung) | fixed launch + teardown s | run s | items/s end to end | end-to-end ratio"
        " | net items/s | net ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, fixed_s, full_s, runs, hung in rows:
        rate = ITEMS / full_s
        if full_s - fixed_s > 0.2 * full_s:
            net = ITEMS / (full_s - fixed_s)
            net_cells = f"{net:,.0f} | {net / d4p_net:.1f}x"
        else:  # the work is within the noise of the fixed cost: no meaningful net rate
            net_cells = "n/a | n/a"
        lines.append(
            f"| {name} | {runs} ({hung}) | {fixed_s:.2f} | {full_s:.2f} | {rate:,.0f} | {rate / d4p_rate:.1f}x"
            f" | {net_cells} |"
        )
    launched = rows[0]
    two_ranks = "aborts, 'Graph is larger than job size: 5 > 2'" if d4p_two_fails else f"rc {d4p_two.returncode}"
    ratio = (ITEMS / launched[2]) / d4p_rate
    lines += [
        "",
        f"dispel4py's MPI mapping cannot run this chain on 2 ranks (`mpiexec -n 2 dispel4py mpi ...`: {two_ranks}):"
        " it needs a rank per PE, so it runs on 5 here, while aiod4p places the 5 PEs' instances on 2 ranks.",
        f"{launched[3]} consecutive runs launched by the mapping: {launched[4]} hung (timeout {TIMEOUT:.0f} s each).",
        f"Target: aiod4p mpi -n 2 >= {TARGET:.0f}x dispel4py's items/s end to end:"
        f" {'met' if ratio >= TARGET else 'NOT met'} ({ratio:.1f}x).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "mpi.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
