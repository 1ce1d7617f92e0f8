"""The science examples against dispel4py 1.2.1 at the sizes users run.

    .venv/bin/python bench/bench_science.py [--quick] [--sweep] [scale]

(a) The verdicts (issues 15 and 17). Each domain of examples/science/ at a
    realistic size (:data:`REALISTIC`: seismic 30 stations of 65,536 samples,
    435 pairs; astrophysics 25,000 galaxies, 20 ms per service query;
    sentiment 6,000 articles) times ``scale``; without ``scale``, each domain
    runs at its :data:`DEFAULT_SCALE`, which keeps the default run under
    about 6 minutes (25,000 blocking lookups of 20 ms take dispel4py about
    500 s per mapping, so galaxies default to 1,000: ``1`` reaches them all).
    Every run is a fresh command timed from start to exit; pairs of runners
    alternate (aiod4p, then dispel4py on the same input): aiod4p simple,
    async against dispel4py's simple, multi -n N against dispel4py's multi
    -n N and mpi -n N against its mpi -n N, N being dispel4py's process
    count (one process per PE). Each command is also timed with the
    domain's smallest input (:data:`TINY`): its start-up (imports, workers,
    teardown). The ratios (dispel4py's time over aiod4p's) are computed on
    total time and on net time (total minus the same runner's start-up),
    against the counterpart and against dispel4py's best mapping, with the
    targets' verdicts (2x on multi and mpi; 1.5x for async where a PE waits
    on I/O).
(b) With ``--sweep``: run time against -n per mapping (aiod4p -n 1, 2, 4;
    dispel4py one and two processes per PE) and a figure per domain
    (docs/science-<domain>.png), dispel4py's next to aiod4p's.
Provenance overhead: bench/bench_provenance.py.

``--quick`` is ``scale`` 0.01 (a smoke run: start-up dominates it). Writes bench/results/science.md
(and docs/science-*.png with ``--sweep``). dispel4py runs in
.venv-dispel4py (``scripts/setup --dev``, or ``AIOD4P_DISPEL4PY_PYTHON``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
QUICK = "--quick" in sys.argv
SWEEP = "--sweep" in sys.argv
_GIVEN = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
SCALE: float | None = float(_GIVEN[0]) if _GIVEN else 0.01 if QUICK else None
# dispel4py 1.2.1 sometimes hangs at MPI finalize: such a run is killed after this many seconds and counts as
# failed (the longest legitimate run, dispel4py's blocking lookups of 25,000 galaxies, takes about 500 s)
TIMEOUT = 150.0 * max(1.0, (SCALE or 0.0) / 0.1)
WORKERS = (1, 2, 4)
TARGET = 2.0  # multi and mpi against dispel4py (issues 15 and 17)
IO_TARGET = 1.5  # async against dispel4py's simple, where a PE waits on I/O (issue 17)

sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "science"))
from _common import BIN, D4P_BIN, ROOT, timed  # noqa: E402 - bench/ is not a package

# domain: (root PE, PEs in the graph = dispel4py's process count, a PE waits on I/O)
DOMAINS: dict[str, tuple[str, int, bool]] = {
    "seismic": ("Synthesise", 9, False),
    "astro": ("ReadCatalogue", 4, True),
    "sentiment": ("Articles", 7, False),
}
# The sizes users run (issue 17: "seismic cross-correlation of 30 stations, 25,000 galaxies, 6,000 articles").
REALISTIC: dict[str, dict[str, Any]] = {
    "seismic": {"stations": 30, "seconds": 655.36},  # 65,536 samples at 100 Hz
    "astro": {"galaxies": 25_000},
    "sentiment": {"articles": 6_000},
}
DEFAULT_SCALE = {"seismic": 1.0, "astro": 0.04, "sentiment": 1.0}
# The smallest input of each domain: a run of it is the command's start-up (imports, workers, teardown).
TINY: dict[str, dict[str, Any]] = {
    "seismic": {"stations": 2, "seconds": 120},
    "astro": {"galaxies": 4},
    "sentiment": {"articles": 20},
}


def size_of(domain: str) -> dict[str, Any]:
    """The input size of ``domain`` in this run: :data:`REALISTIC` times the scale (seismic: its seconds)."""
    scale = SCALE if SCALE is not None else DEFAULT_SCALE[domain]
    if domain == "seismic":
        return {"stations": 30, "seconds": max(120.0, round(655.36 * scale, 2))}
    if domain == "astro":
        return {"galaxies": max(20, int(25_000 * scale))}
    return {"articles": max(50, int(6_000 * scale))}


def describe(size: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}" for key, value in size.items())


def run_time(command: list[str], env: dict[str, str] | None = None) -> float | None:
    """Wall time of ``command``, or ``None`` when it failed or hung (reported)."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        return timed(command, timeout=TIMEOUT, traceback_fails=True)
    except RuntimeError as exc:
        print(f"  failed: {str(exc)[:300]}", flush=True)
        return None
    finally:
        os.environ.clear()
        os.environ.update(saved)


def aiod4p_command(domain: str, mapping: str, workers: int | None, size: dict[str, Any] | None = None) -> list[str]:
    root, _, _ = DOMAINS[domain]
    size = size or size_of(domain)
    command = [str(BIN / "aiod4p"), "run", f"examples/science/{domain}.py", "-d", json.dumps({root: [size]}),
               "-m", mapping, "-q", "--results", os.devnull]  # fmt: skip
    return command + (["-n", str(workers)] if workers else [])


def dispel4py_command(domain: str, mapping: str, processes: int) -> list[str]:
    module = ["bench/science_d4p.py", "-a", domain, "-i", "1"]
    if mapping == "simple":
        return [str(D4P_BIN / "dispel4py"), "simple", *module]
    if mapping == "multi":
        return [str(D4P_BIN / "dispel4py"), "multi", *module, "-n", str(processes)]
    return [str(D4P_BIN / "mpiexec"), "-n", str(processes), str(D4P_BIN / "dispel4py"), "mpi", *module]


def sweep(domain: str) -> dict[str, dict[int, float | None]]:
    """Run time per mapping and -n: ``{"aiod4p async": {1: s, 2: s, 4: s}, "dispel4py multi": {...}, ...}``."""
    _, pes, _ = DOMAINS[domain]
    size = size_of(domain)
    series: dict[str, dict[int, float | None]] = {}

    def measure(label: str, n: int, command: list[str], env: dict[str, str] | None = None) -> None:
        elapsed = run_time(command, env)
        series.setdefault(label, {})[n] = elapsed
        shown = "failed" if elapsed is None else f"{elapsed:.2f} s"
        print(f"{domain} {label} -n {n}: {shown}", flush=True)

    measure("aiod4p simple", 1, aiod4p_command(domain, "simple", None))
    for mapping in ("async", "multi", "mpi"):
        for n in WORKERS:
            measure(f"aiod4p {mapping}", n, aiod4p_command(domain, mapping, n))
    # dispel4py's group-by uses the salted hash(): fix the seed so its processes agree
    env = {"SCIENCE_SIZE": json.dumps(size), "PYTHONHASHSEED": "0"}
    measure("dispel4py simple", 1, dispel4py_command(domain, "simple", 1), env)
    for mapping in ("multi", "mpi"):
        for n in (pes, 2 * pes):
            measure(f"dispel4py {mapping}", n, dispel4py_command(domain, mapping, n), env)
    return series


def startups(domain: str, series: dict[str, dict[int, float | None]]) -> dict[str, float | None]:
    """Each runner's start-up: the command at its best ``-n`` with the domain's :data:`TINY` input."""
    env = {"SCIENCE_SIZE": json.dumps(TINY[domain]), "PYTHONHASHSEED": "0"}
    found: dict[str, float | None] = {}
    for label, values in series.items():
        chosen = best(values)
        if chosen is None:
            continue
        runner, mapping = label.split()
        if runner == "aiod4p":
            command = aiod4p_command(domain, mapping, chosen[0] if mapping != "simple" else None, TINY[domain])
            found[label] = run_time(command)
        else:
            found[label] = run_time(dispel4py_command(domain, mapping, chosen[0]), env)
        print(f"{domain} {label} -n {chosen[0]} start-up: {found[label]}", flush=True)
    return found


def best(values: dict[int, float | None]) -> tuple[int, float] | None:
    done = [(t, n) for n, t in values.items() if t is not None]
    return (min(done)[1], min(done)[0]) if done else None


def figure(domain: str, series: dict[str, dict[int, float | None]]) -> Path:
    from aiod4p._plot import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(figsize=(7, 4.2))
    for label, values in series.items():
        points = sorted((n, t) for n, t in values.items() if t is not None)
        if not points:
            continue
        style = "--" if label.startswith("dispel4py") else "-"
        axes.plot([n for n, _ in points], [t for _, t in points], style, marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("-n (workers; dispel4py: processes)")
    axes.set_ylabel("run time, s (lower is better)")
    axes.set_title(f"{domain}: {describe(size_of(domain))}")
    axes.set_ylim(bottom=0)
    axes.legend(fontsize="small")
    fig.tight_layout()
    path = ROOT / "docs" / f"science-{domain}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def startup_lines(series: dict[str, dict[int, float | None]], fixed: dict[str, float | None]) -> list[str]:
    """Start-up and net time (best run minus start-up) per runner, and the net ratios to dispel4py's best."""
    lines = [
        "Start-up (the same command at the same `-n` with the smallest input) and net time (best run minus"
        " start-up), seconds:",
        "",
        "| runner | -n | best run | start-up | net |",
        "|---|---|---|---|---|",
    ]
    nets: dict[str, float] = {}
    for label, values in series.items():
        chosen, start = best(values), fixed.get(label)
        if chosen is None or start is None:
            continue
        nets[label] = max(chosen[1] - start, 0.01)
        lines.append(f"| {label} | {chosen[0]} | {chosen[1]:.2f} | {start:.2f} | {nets[label]:.2f} |")
    theirs = min((net for label, net in nets.items() if label.startswith("dispel4py")), default=None)
    if theirs is not None:
        ours = {label.split()[1]: net for label, net in nets.items() if label.startswith("aiod4p")}
        ratios = [f"{mapping} {theirs / net:.2f}x" for mapping, net in ours.items()]
        lines += ["", "Net speed-up against dispel4py's best net time: " + ", ".join(ratios) + "."]
    return [*lines, ""]


def domain_section(domain: str, series: dict[str, dict[int, float | None]]) -> list[str]:
    lines = [f"**{domain}** ({describe(size_of(domain))}); seconds per run:", ""]
    lines += ["| runner | " + " | ".join(f"-n {n}" for n in sorted({n for v in series.values() for n in v})) + " |"]
    columns = sorted({n for v in series.values() for n in v})
    lines += ["|---|" + "---|" * len(columns)]
    for label, values in series.items():
        cells = [
            ("-" if n not in values else "failed or hung" if values[n] is None else f"{values[n]:.2f}") for n in columns
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    d4p = sorted(
        (found[1], label, found[0])
        for label, values in series.items()
        if label.startswith("dispel4py") and (found := best(values)) is not None
    )
    lines.append("")
    if not d4p:
        lines.append("dispel4py failed on every mapping: no ratio.")
        return [*lines, ""]
    baseline, label, processes = d4p[0]
    lines.append(
        f"dispel4py's best: {label} -n {processes} ({baseline:.2f} s). aiod4p's best per mapping, speed-up against it:"
    )
    lines.append("")
    for mapping in ("simple", "async", "multi", "mpi"):
        found = best(series.get(f"aiod4p {mapping}", {}))
        if found is None:
            lines.append(f"- {mapping}: failed")
            continue
        n, elapsed = found
        verdict = ""
        if mapping in ("multi", "mpi"):
            verdict = " (target >= 2x: " + ("met" if baseline / elapsed >= TARGET else "NOT met") + ")"
        lines.append(f"- {mapping} -n {n}: {elapsed:.2f} s, **{baseline / elapsed:.2f}x**{verdict}")
    return [*lines, ""]


# -- (a) the verdicts -----------------------------------------------------------------------------


@dataclass
class Timing:
    """One runner on one domain: its ``-n``, the full run's and the start-up's wall time (``None``: failed)."""

    workers: int | None
    total: float | None
    startup: float | None

    @property
    def net_counts(self) -> bool:
        """The net time is a fair share of the run (:data:`NET_SHARE`): a verdict on it means something."""
        return self.net is not None and self.total is not None and self.net >= NET_SHARE * self.total

    @property
    def net(self) -> float | None:
        """The total minus the start-up (at least 10 ms, so that a ratio exists)."""
        if self.total is None or self.startup is None:
            return None
        return max(self.total - self.startup, 0.01)


# Below this share of the total, the net time is mostly the noise of two start-up measurements: its ratio gets
# no verdict (a smoke run, or a machine whose load changed between the runs).
NET_SHARE = 0.25

# aiod4p's mapping and dispel4py's counterpart (None: aiod4p's alone); each pair runs interleaved.
PAIRS: tuple[tuple[str, str | None], ...] = (("simple", None), ("async", "simple"), ("multi", "multi"), ("mpi", "mpi"))


def compare(domain: str) -> dict[str, Timing]:
    """``{"aiod4p multi": Timing, "dispel4py multi": Timing, ...}`` at the domain's size; multi and mpi at
    dispel4py's process count on both sides."""
    _, processes, _ = DOMAINS[domain]
    size = size_of(domain)
    found: dict[str, Timing] = {}
    for ours, theirs in PAIRS:
        workers = processes if ours in ("multi", "mpi") else None
        # (label, -n, full command, start-up command, environment of the full run, of the start-up)
        runners: list[tuple[str, int | None, list[str], list[str], dict[str, str] | None, dict[str, str] | None]] = [
            (f"aiod4p {ours}", workers, aiod4p_command(domain, ours, workers),
             aiod4p_command(domain, ours, workers, TINY[domain]), None, None),
        ]  # fmt: skip
        if theirs is not None:
            count = 1 if theirs == "simple" else processes
            command = dispel4py_command(domain, theirs, count)
            # dispel4py's group-by uses the salted hash(): fix the seed so its processes agree
            full_env = {"SCIENCE_SIZE": json.dumps(size), "PYTHONHASHSEED": "0"}
            tiny_env = {**full_env, "SCIENCE_SIZE": json.dumps(TINY[domain])}
            runners.append((f"dispel4py {theirs}", count, command, command, full_env, tiny_env))
        for label, n, _, tiny, _, startup_env in runners:  # the start-ups first, each runner in turn
            found[label] = Timing(n, None, run_time(tiny, startup_env))
        for label, _, full, _, run_env, _ in runners:
            timing = found[label]
            timing.total = run_time(full, run_env)
            print(
                f"{domain} {label} -n {timing.workers or 1}: {timing.total} s, start-up {timing.startup} s", flush=True
            )
    return found


def ratio(theirs: float | None, ours: float | None) -> float | None:
    return None if theirs is None or ours is None else theirs / ours


def shown(value: float | None, target: float | None = None) -> str:
    """A ratio, with the target's verdict when there is one."""
    if value is None:
        return "-"
    if target is None:
        return f"{value:.2f}x"
    return f"**{value:.2f}x** ({'met' if value >= target else 'NOT met'})"


def verdict_rows(
    domain: str, found: dict[str, Timing]
) -> list[tuple[str, str, float | None, float | None, float, bool]]:
    """``(aiod4p runner, dispel4py runner, total ratio, net ratio, target, whether both net times count)``
    for every comparison the targets name: each mapping against its counterpart, and multi and mpi
    against dispel4py's best."""
    _, _, io_bound = DOMAINS[domain]
    rows = []

    def name(label: str) -> str:
        timing = found[label]
        return f"{label} -n {timing.workers}" if timing.workers else label

    for ours, theirs in PAIRS:
        if theirs is None or (ours == "async" and not io_bound):
            continue
        mine, other = found[f"aiod4p {ours}"], found[f"dispel4py {theirs}"]
        target = IO_TARGET if ours == "async" else TARGET
        rows.append((name(f"aiod4p {ours}"), name(f"dispel4py {theirs}"), ratio(other.total, mine.total),
                     ratio(other.net, mine.net), target, mine.net_counts and other.net_counts))  # fmt: skip
    d4p = {label: timing for label, timing in found.items() if label.startswith("dispel4py")}
    best_total = min(((t.total, label) for label, t in d4p.items() if t.total is not None), default=None)
    best_net = min(((t.net, label) for label, t in d4p.items() if t.net is not None), default=None)
    for ours in ("multi", "mpi"):
        mine = found[f"aiod4p {ours}"]
        rows.append((
            name(f"aiod4p {ours}"),
            "dispel4py's best"
            + (f" (total: {name(best_total[1])}" if best_total else " (total: none")
            + (f"; net: {name(best_net[1])})" if best_net else "; net: none)"),
            ratio(best_total[0], mine.total) if best_total else None,
            ratio(best_net[0], mine.net) if best_net else None,
            TARGET,
            mine.net_counts and best_net is not None and found[best_net[1]].net_counts,
        ))  # fmt: skip
    return rows


def compare_section(domain: str, found: dict[str, Timing]) -> list[str]:
    _, processes, _ = DOMAINS[domain]
    lines = [
        f"**{domain}** ({describe(size_of(domain))}; N = {processes}, dispel4py's process count), seconds:",
        "",
        "| runner | -n | total | start-up | net |",
        "|---|---|---|---|---|",
    ]
    for label, timing in found.items():
        cells = ["failed or hung" if value is None else f"{value:.2f}" for value in (timing.total, timing.startup)]
        cells.append("-" if timing.net is None else f"{timing.net:.2f}")
        lines.append(f"| {label} | {timing.workers or 1} | {' | '.join(cells)} |")
    lines += ["", "| aiod4p | against | total time | net time | target |", "|---|---|---|---|---|"]
    for mine, theirs, on_total, on_net, target, net_counts in verdict_rows(domain, found):
        net = (
            shown(on_net, target)
            if net_counts or on_net is None
            else f"{shown(on_net)} (start-up dominates: no verdict)"
        )
        lines.append(f"| {mine} | {theirs} | {shown(on_total, target)} | {net} | >= {target}x |")
    return [*lines, ""]


def main() -> int:
    scale = "each domain's default" if SCALE is None else f"{SCALE}"
    lines = [
        "## Science examples (bench/bench_science.py)",
        "",
        "The three domains of examples/science/ (Filgueira et al., IJHPCA 2017) against dispel4py 1.2.1 on the"
        " same input (bench/science_d4p.py: the same PEs and functions; blocking service calls), every run a"
        f" fresh command. Scale {scale} of the realistic sizes (seismic 30 stations of 65,536 samples,"
        " 25,000 galaxies, 6,000 articles). Start-up: the same command with the smallest input; net: total"
        " minus start-up. Ratios: dispel4py's time over aiod4p's, computed on total and on net time (a net"
        f" time under {NET_SHARE:.0%} of its total gets no verdict). `aiod4p run` starts at most one worker"
        " process per CPU on multi, and on mpi when it starts the ranks itself (`-n 8` on 2 CPUs runs 2:"
        " docs/mpi.md); dispel4py starts one process per `-n`.",
        "",
    ]
    for domain in DOMAINS:
        lines += compare_section(domain, compare(domain))
    if SWEEP:
        for domain in DOMAINS:
            series = sweep(domain)
            print(f"wrote {figure(domain, series)}", flush=True)
            lines += domain_section(domain, series)
            lines += startup_lines(series, startups(domain, series))
    out = HERE / "results" / "science.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
