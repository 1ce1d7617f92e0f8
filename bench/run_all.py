"""Run every benchmark and rewrite bench/RESULTS.md.

    .venv/bin/python bench/run_all.py            # all of them
    .venv/bin/python bench/run_all.py chain      # only bench/bench_chain.py
    .venv/bin/python bench/run_all.py --quick    # smaller sizes, where a benchmark has them

Each ``bench/bench_<name>.py`` is run as its own process; it measures its
baseline in the same run and writes its section to ``bench/results/<name>.md``.
RESULTS.md is the header, then the analysis kept in ``bench/ANALYSIS.md``
(written by hand: where the time goes, and why), then every section in name order.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in argv]
        if not scripts:
            print(f"no benchmark named {', '.join(argv)}", file=sys.stderr)
            return 2
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        extra = ["--quick"] if quick and '"--quick"' in script.read_text() else []
        if subprocess.run([sys.executable, str(script), *extra], cwd=HERE.parent).returncode != 0:
            failed.append(script.name)
    sections = [path.read_text() for path in sorted((HERE / "results").glob("*.md"))]
    header = (
        "# Benchmark results\n\n"
        f"Regenerate with `.venv/bin/python bench/run_all.py` (or `nox -s bench`). Last run: "
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()}, {platform.machine()}, "
        "a shared 2-core machine: compare the ratios, which each benchmark measures against a baseline "
        "in the same run, rather than absolute figures.\n\n"
    )
    analysis = HERE / "ANALYSIS.md"
    kept = analysis.read_text() + "\n" if analysis.exists() else ""
    (HERE / "RESULTS.md").write_text(header + kept + "\n".join(sections))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
