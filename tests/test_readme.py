"""The README's Python example runs and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_concepts_example_runs() -> None:
    example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(eval(done.stdout)) == [("a", 2), ("b", 2), ("c", 1)]


def test_readme_names_the_two_commands_ci_runs() -> None:
    text = README.read_text()
    assert "scripts/setup && .venv/bin/aiod4p run examples/" in text
    assert "\n.ci/run\n" in text
    assert "python -m pytest" in (README.parent / ".ci" / "run").read_text()
