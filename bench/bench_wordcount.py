"""Keyed streams: word count on every aiod4p mapping vs dispel4py 1.2.1 simple and Bytewax.

    .venv/bin/python bench/bench_wordcount.py [--quick] [words]

2,000,000 words (``--quick``: 200,000) from a 10,000-word vocabulary, drawn
with a fixed seed; a source emits ``(word, 1)`` and a counter with parallelism
2, grouped by the word, totals them (bench/wordcount.py, which also checks
every count). Each engine runs as its own process, interleaved, 7 rounds
(``--quick``: 3); ratios are the median of each round's ratio (a stretch of
load elsewhere slows the runs of one round alike), with their range; the time
is the stream time measured inside the process (interpreter start and
building the input list excluded; worker start-up included). Bytewax
runs with one worker in-process and with 2 processes through its testing
launcher (``-p 2``); dispel4py runs in .venv-dispel4py. Writes
bench/results/wordcount.md. Targets (issue 17): async and multi -n 2 at least
as fast as simple and at least 1.5x Bytewax.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import D4P_PYTHON  # noqa: E402 - bench/ is not a package

QUICK = "--quick" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--quick"]
WORDS = int(ARGS[0]) if ARGS else 200_000 if QUICK else 2_000_000
REPEATS = 3 if QUICK else 7
TIMEOUT = 900.0
TARGET_BYTEWAX = 1.5

ENGINES: dict[str, tuple[Path, str, int]] = {
    "plain loop (a dict of counts)": (Path(sys.executable), "loop", 1),
    "aiod4p simple": (Path(sys.executable), "aiod4p-simple", 1),
    "aiod4p async": (Path(sys.executable), "aiod4p-async", 1),
    "aiod4p multi -n 2": (Path(sys.executable), "aiod4p-multi", 2),
    "dispel4py 1.2.1 simple": (D4P_PYTHON, "dispel4py-simple", 1),
    "Bytewax 1 worker": (Path(sys.executable), "bytewax", 1),
    "Bytewax -p 2": (Path(sys.executable), "bytewax", 2),
}


def measure(python: Path, engine: str, workers: int) -> tuple[float, float] | None:
    """Stream seconds and CPU seconds (all processes) of one run, or ``None`` when the engine is not installed."""
    command = [str(python), str(HERE / "wordcount.py"), engine, str(WORDS), str(workers)]
    if not python.exists():
        return None
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE)
    if done.returncode != 0:
        if "No module named 'bytewax'" in done.stderr:
            return None
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), float(result["cpu"])


def main() -> None:
    timings: dict[str, list[float]] = {name: [] for name in ENGINES}
    cpu_timings: dict[str, list[float]] = {name: [] for name in ENGINES}
    missing: set[str] = set()
    for _ in range(REPEATS):  # interleaved, so machine noise hits every engine alike
        for name, (python, engine, workers) in ENGINES.items():
            if name in missing:
                continue
            measured = measure(python, engine, workers)
            if measured is None:
                missing.add(name)
                continue
            seconds, cpu = measured
            timings[name].append(seconds)
            cpu_timings[name].append(cpu)
            print(f"{name}: {seconds:.3f} s, CPU {cpu:.3f} s", flush=True)
    rate = {name: WORDS / statistics.median(values) for name, values in timings.items() if values}
    cpu_rate = {name: WORDS / statistics.median(values) for name, values in cpu_timings.items() if values}

    def against(name: str, base: str, table: dict[str, list[float]] = timings) -> tuple[float, float, float]:
        """How many times faster ``name`` ran than ``base``: the median of each round's ratio, and its range."""
        ratios = [theirs / ours for ours, theirs in zip(table[name], table[base], strict=False)]
        return statistics.median(ratios), min(ratios), max(ratios)

    lines = [
        "## Keyed streams: word count vs dispel4py and Bytewax",
        "",
        f"`.venv/bin/python bench/bench_wordcount.py {WORDS}`: {WORDS:,} `(word, 1)` pairs from a 10,000-word"
        " vocabulary -> a counter with parallelism 2 grouped by the word (bench/wordcount.py, every count checked);"
        f" each engine its own process, interleaved, {REPEATS} rounds: rates are medians, ratios the median of each"
        " round's ratio (its range in brackets); stream time (worker start-up included,"
        " interpreter start and input building excluded); words per CPU-second counts every process's CPU"
        " time (a loaded machine inflates stream time, not CPU time).",
        "",
        "| run | words/s | vs aiod4p simple | words per CPU-second | vs aiod4p simple |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ENGINES:
        if name in rate:
            ratio, low, high = against(name, "aiod4p simple")
            cpu_ratio, cpu_low, cpu_high = against(name, "aiod4p simple", cpu_timings)
            cells = [
                f"{rate[name]:,.0f}",
                f"{ratio:.2f}x ({low:.2f}-{high:.2f})",
                f"{cpu_rate[name]:,.0f}",
                f"{cpu_ratio:.2f}x ({cpu_low:.2f}-{cpu_high:.2f})",
            ]
            lines.append(f"| {name} | {' | '.join(cells)} |")
        else:
            lines.append(f"| {name} | not installed | - | - | - |")
    lines.append("")
    bytewaxes = [name for name in ("Bytewax 1 worker", "Bytewax -p 2") if name in rate]
    for name in ("aiod4p async", "aiod4p multi -n 2"):
        over_simple = against(name, "aiod4p simple")[0]
        verdicts = [f"{over_simple:.2f}x simple"]
        over_bytewax = min((against(name, bytewax)[0] for bytewax in bytewaxes), default=None)
        if over_bytewax is not None:
            verdicts.append(f"{over_bytewax:.2f}x the faster Bytewax")
        met = over_simple >= 1 and (over_bytewax is None or over_bytewax >= TARGET_BYTEWAX)
        lines.append(
            f"Target for {name}: >= simple and >= {TARGET_BYTEWAX}x Bytewax: {'met' if met else 'NOT met'}"
            f" ({', '.join(verdicts)})."
        )
    lines.append("")
    section = "\n".join(lines)
    print(section)
    out = HERE / "results" / "wordcount.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(section)


if __name__ == "__main__":
    main()
