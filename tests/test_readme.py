"""The README's Python example runs and prints what it promises."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from helpers import AIOD4P

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_concepts_example_runs() -> None:
    example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(eval(done.stdout)) == [("a", 2), ("b", 2), ("c", 1)]


def test_readme_concepts_example_saved_as_a_flow_file_runs_once(tmp_path: Path) -> None:
    # Its run at the top level ran again in `aiod4p run flow.py` (which imports the file), and in every worker.
    (tmp_path / "flow.py").write_text(re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0])
    done = subprocess.run(
        [*AIOD4P, "run", "flow.py", "-m", "multi", "-n", "2", "--results", "-"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(tuple(json.loads(line)["data"]) for line in done.stdout.splitlines()) == [
        ("a", 2),
        ("b", 2),
        ("c", 1),
    ]


def test_readme_names_the_two_commands_ci_runs() -> None:
    text = README.read_text()
    assert "scripts/setup && .venv/bin/aiod4p run examples/" in text
    assert "\n.ci/run\n" in text
    assert "python -m pytest" in (README.parent / ".ci" / "run").read_text()


def test_recovery_commands_run_from_the_clone_root_and_a_restore_after_a_finished_run_resumes_nothing(
    tmp_path: Path,
) -> None:
    """docs/recovery.md's two commands, as a user copies them (cd'd into the clone, as the README has it):
    the first run finishes and ends with a final checkpoint, which the second one restores, adding nothing."""
    text = (README.parent / "docs" / "recovery.md").read_text()
    block = re.search(r"## Operating it\n\n```\n(.*?)```", text, re.S)
    assert block is not None
    commands = [line for line in block.group(1).replace("\\\n", "").splitlines() if line.startswith("aiod4p run")]
    assert len(commands) == 2, commands
    results = tmp_path / "counts.jsonl"

    def run(command: str) -> subprocess.CompletedProcess[str]:
        args = [str(tmp_path / arg) if arg in ("ckpt/", "counts.jsonl") else arg for arg in shlex.split(command)[1:]]
        done = subprocess.run(AIOD4P + args, capture_output=True, text=True, timeout=120, cwd=README.parent)
        assert done.returncode == 0, done.stderr
        return done

    assert "aiod4p: 18 records" in run(commands[0].split("#")[0]).stderr
    finished = results.read_text()
    restored = run(commands[1]).stderr
    assert "restoring checkpoint" in restored and "aiod4p: 0 records" in restored, restored
    assert results.read_text() == finished
