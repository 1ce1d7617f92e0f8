"""What the benchmarks that time whole commands share: paths, dispel4py's venv, timing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
D4P_PYTHON = Path(os.environ.get("AIOD4P_DISPEL4PY_PYTHON", ROOT / ".venv-dispel4py" / "bin" / "python"))
D4P_BIN = D4P_PYTHON.parent


def timed(
    command: list[str], *, timeout: float, check_items: int | None = None, traceback_fails: bool = False
) -> float | None:
    """Wall time of ``command`` (run from the repository root), or ``None`` if it hung.

    A hung command is killed with its whole session after ``timeout`` seconds.
    With ``check_items``, an aiod4p command also writes ``--stats-json`` and the
    ``Total`` sink must have received exactly that many items. With
    ``traceback_fails``, a command that printed a traceback failed whatever its
    exit status (dispel4py's simple mapping exits 0 when a PE raises).

    Raises:
        RuntimeError: the command failed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp, "stats.json")
        if check_items is not None:
            command = [*command, "-q", "--stats-json", str(stats)]
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: mpiexec forwards it to its ranks, which run in process groups of their own
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
            return None
        elapsed = time.perf_counter() - started
        if process.returncode != 0 or (traceback_fails and "Traceback (most recent call last)" in stderr):
            raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-2000:]}")
        if check_items is not None:
            pes = json.loads(stats.read_text())["pes"]
            received = sum(entry["items_in"] for pe, entry in pes.items() if pe.startswith("Total"))
            assert received == check_items, (received, check_items)
        return elapsed
