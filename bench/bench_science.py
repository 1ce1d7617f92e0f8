"""The science examples against dispel4py 1.2.1, run time against -n per mapping, and provenance overhead.

    .venv/bin/python bench/bench_science.py [scale]

``scale`` (default 1.0) multiplies every input size; 0.1 is a smoke run.

(a) Each domain of examples/science/ at a realistic size (seismic: 24
    stations x 30 min at 100 Hz, 276 pairs; astrophysics: 1,000 galaxies, 20 ms
    per service query; sentiment: 3,000 articles), every run a fresh command
    timed from start to exit: aiod4p on simple, async, multi and mpi with
    -n 1, 2, 4, and dispel4py 1.2.1 (bench/science_d4p.py: the same PEs and
    functions, blocking service calls) on simple, multi and mpi with one and
    two processes per PE (its multi and mpi mappings cannot run on fewer).
    The ratio is dispel4py's best time over aiod4p's per mapping (target: at
    least 2x on multi and mpi). A figure per domain (docs/science-<domain>.png)
    plots run time against -n, every mapping, dispel4py's next to aiod4p's.
(b) Provenance overhead, in this process through ``aiod4p.run`` on the async
    mapping, medians of 3, against the same run without: ``pe`` and ``item``
    on the sentiment workflow (milliseconds per item) and on bench/chain.py's
    trivial 5-PE chain (microseconds per item, the worst case); the time to
    build the PROV document afterwards is reported apart.

Writes bench/results/science.md and docs/science-*.png. dispel4py runs in
.venv-dispel4py (``scripts/setup --dev``, or ``AIOD4P_DISPEL4PY_PYTHON``).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiod4p

HERE = Path(__file__).resolve().parent
SCALE = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
TIMEOUT = 300.0  # dispel4py 1.2.1 sometimes hangs at MPI finalize: such a run counts as failed
WORKERS = (1, 2, 4)
TARGET = 2.0

sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "science"))
import sentiment  # noqa: E402
from _common import BIN, D4P_BIN, ROOT, timed  # noqa: E402 - bench/ is not a package
from chain import build as build_chain  # noqa: E402

# domain: (root PE, size, PEs in the graph)
DOMAINS: dict[str, tuple[str, dict[str, Any], int]] = {
    "seismic": ("Synthesise", {"stations": 24, "seconds": max(120, int(1800 * SCALE))}, 8),
    "astro": ("ReadCatalogue", {"galaxies": max(20, int(1000 * SCALE))}, 4),
    "sentiment": ("Articles", {"articles": max(50, int(3000 * SCALE))}, 7),
}


def run_time(command: list[str], env: dict[str, str] | None = None) -> float | None:
    """Wall time of ``command``, or ``None`` when it failed or hung (reported)."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        return timed(command, timeout=TIMEOUT)
    except RuntimeError as exc:
        print(f"  failed: {str(exc)[:300]}", flush=True)
        return None
    finally:
        os.environ.clear()
        os.environ.update(saved)


# The smallest input of each domain: a run of it is the command's start-up (imports, workers, teardown).
TINY: dict[str, dict[str, Any]] = {
    "seismic": {"stations": 2, "seconds": 120},
    "astro": {"galaxies": 4},
    "sentiment": {"articles": 20},
}


def aiod4p_command(domain: str, mapping: str, workers: int | None, size: dict[str, Any] | None = None) -> list[str]:
    root, default, _ = DOMAINS[domain]
    size = size or default
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
    _, size, pes = DOMAINS[domain]
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
    _, size, _ = DOMAINS[domain]
    axes.set_title(f"{domain}: {', '.join(f'{k} {v}' for k, v in size.items())}")
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
    _, size, _ = DOMAINS[domain]
    lines = [f"**{domain}** ({', '.join(f'{k} {v}' for k, v in size.items())}); seconds per run:", ""]
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


# -- (b) provenance overhead ---------------------------------------------------------------------


def timed_run(build: Any, inputs: Any, level: str | None) -> tuple[float, list[aiod4p.InstanceStats]]:
    """Seconds of one async run, and its statistics (which carry the provenance parts)."""

    async def go() -> tuple[float, list[aiod4p.InstanceStats]]:
        started = time.perf_counter()
        async with aiod4p.start(build(), inputs, mapping="async", provenance=level) as run:
            await run.results()
        return time.perf_counter() - started, run.stats

    return asyncio.run(go())


def document_time(stats: list[aiod4p.InstanceStats]) -> float:
    """Seconds to build the PROV document of a run (with the prov package)."""
    started = time.perf_counter()
    aiod4p.provenance_document(stats)
    return time.perf_counter() - started


def chain_graph() -> aiod4p.WorkflowGraph:
    return build_chain()[0]


def overhead_section() -> list[str]:
    workloads = [
        ("sentiment", sentiment.build, {"Articles": [{"articles": max(50, int(1000 * SCALE))}]}),
        ("chain", chain_graph, max(1000, int(20_000 * SCALE))),
    ]
    lines = ["**Provenance overhead** (async mapping, in process, medians of 3; document build apart):", ""]
    lines += ["| workload | off, s | pe, s | pe overhead | item, s | item overhead | PROV document (item), s |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for name, build, inputs in workloads:
        figures: dict[str | None, float] = {}
        for level in (None, "pe", "item"):
            runs = [timed_run(build, inputs, level) for _ in range(3)]
            figures[level] = statistics.median(r[0] for r in runs)
            print(f"provenance {name} {level}: {figures[level]:.3f} s", flush=True)
        building = document_time(runs[0][1])  # the item-level runs: one document is enough
        off, pe, item = figures[None], figures["pe"], figures["item"]
        verdict = "met" if pe / off - 1 < 0.05 else "NOT met"
        lines.append(
            f"| {name} | {off:.3f} | {pe:.3f} | {100 * (pe / off - 1):+.1f}% (target < 5%: {verdict}) | {item:.3f} |"
            f" {100 * (item / off - 1):+.1f}% | {building:.3f} |"
        )
    return [*lines, ""]


def main() -> int:
    lines = [
        "## Science examples (bench/bench_science.py)",
        "",
        "The three domains of examples/science/ (Filgueira et al., IJHPCA 2017) against dispel4py 1.2.1 on the"
        " same input (bench/science_d4p.py: the same PEs and functions; blocking service calls), every run a"
        f" fresh command, start-up included. Scale {SCALE}. Figures: docs/science-*.png.",
        "",
    ]
    for domain in DOMAINS:
        series = sweep(domain)
        print(f"wrote {figure(domain, series)}", flush=True)
        lines += domain_section(domain, series)
        lines += startup_lines(series, startups(domain, series))
    lines += overhead_section()
    out = HERE / "results" / "science.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
