"""The mpi mapping with real mpiexec: both ways of launching, failures, drain, hosts.

(The behaviour every mapping shares runs on mpi in test_mappings.py and
test_differential.py through conftest.MAPPING_CASES.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_differential as differential
import workflows as wf
from helpers import LINGERING_FLOW, ROOT, aiod4p_cli, aiod4p_process, numbers_flow, run_notebook_flow
from ray_cluster import wait_gone

import aiod4p
from aiod4p import ALL, WorkflowGraph, group_by
from aiod4p._install import install_hint
from aiod4p._processes import children, descendants, pidfds
from aiod4p.errors import GraphError, MappingUnavailable, PEError, TargetError, TransportError, WorkerDied
from aiod4p.mappings import mpi
from aiod4p.mappings._mpi_env import find_mpiexec, job_files

pytest.importorskip("mpi4py", reason="the mpi extra is not installed")

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
WORKFLOWS = Path(wf.__file__).resolve()


def mpiexec(
    args: list[str],
    *,
    timeout: float = 30,
    cwd: Path | None = None,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``prefix mpiexec args`` (the venv's aiod4p CLI on every rank); never leaves a rank behind."""
    process = subprocess.Popen(
        [*prefix, str(MPIEXEC), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def cli(*args: str) -> list[str]:
    return [str(BIN / "aiod4p"), "run", *args]


# -- launched under the user's mpiexec -----------------------------------------------


def test_cli_under_mpiexec_only_rank_0_reports(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    done = mpiexec(["-n", "3", *cli(f"{WORKFLOWS}:mpi_chain", "--mapping", "mpi", "-i", "500", "--results", str(out))])
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["data"] for r in records) == [i * 8 for i in range(500)]
    assert done.stdout == ""  # no rank printed "No results." or a summary


def test_ranks_exit_while_a_thread_a_pe_started_still_runs(tmp_path: Path) -> None:
    """A library a PE uses may leave a thread running (a model server's, a monitor's): the ranks still exit
    when the run is over, where Python waited for the thread and the launcher 30 s for the ranks."""
    flow = tmp_path / "lingering.py"
    flow.write_text(LINGERING_FLOW)
    done = aiod4p_cli("run", str(flow), "--mapping", "mpi", "-n", "2", "-i", "3", "--results", "-", timeout=20)
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["data"] for line in done.stdout.splitlines()) == [1, 2, 3]
    assert "did not exit" not in done.stderr


def test_cli_under_mpiexec_keeps_stdout_for_the_results(tmp_path: Path) -> None:
    """mpiexec joins every rank's stdout into its own: what PEs print on any rank goes to stderr under
    `--results -`, so that stdout holds the JSON records only."""
    flow = tmp_path / "chatty.py"
    flow.write_text(
        numbers_flow(
            """
            class Chatty(IterativePE):
                def process_item(self, item):
                    print("processing", item)
                    return item
            """
        )
    )
    run = [sys.executable, "-m", "aiod4p", "run", str(flow), "--mapping", "mpi", "-i", "4", "--results", "-", "-q"]
    done = mpiexec(["-n", "2", *run], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["data"] for line in done.stdout.splitlines()) == [1, 2, 3, 4]
    assert done.stderr.count("processing") == 4


def test_cli_under_mpiexec_prints_results_once() -> None:
    done = mpiexec(["-n", "2", *cli(f"{WORKFLOWS}:mpi_chain", "--mapping", "mpi", "-i", "3")])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("3 items") == 1
    assert "No results" not in done.stdout


def test_cli_under_mpiexec_with_more_ranks_than_cpus_uses_one_rank_per_cpu(tmp_path: Path) -> None:
    """dispel4py users start a rank per PE (mpiexec -n 7 on 2 cores): instances go on one rank per CPU."""
    one_cpu = ("taskset", "-c", str(min(os.sched_getaffinity(0))))  # mpiexec and its ranks on one CPU
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    args = cli(
        f"{WORKFLOWS}:mpi_hosts", "--mapping", "mpi", "-i", "40", "--results", str(out), "--stats-json", str(stats)
    )
    done = mpiexec(["-n", "3", *args], prefix=one_cpu)
    assert done.returncode == 0, done.stderr
    warning = (
        "aiod4p: warning: mpiexec started 3 ranks on this machine's 1 CPU: PEs whose parallelism is not set get"
        " 1 instance (a dispel4py graph's, the instances dispel4py gives 3 processes), on the first 1 rank, and the"
        " other ranks wait (more would only compete for the CPUs)"
    )
    assert done.stderr.splitlines().count(warning) == 1  # rank 0 says it
    seen = [json.loads(line)["data"] for line in out.read_text().splitlines()]
    assert sorted(item for _, _, item in seen) == list(range(40))
    assert len({pid for _, pid, _ in seen}) == 1  # one rank did the work
    assert json.loads(stats.read_text())["workers"] == 3
    fine = mpiexec(["-n", "1", *cli(f"{WORKFLOWS}:mpi_chain", "--mapping", "mpi", "-i", "3")], prefix=one_cpu)
    assert fine.returncode == 0 and "warning" not in fine.stderr, fine.stderr
    # A rank per CPU, each bound to its own: a rank sees one CPU, the job all of them.
    ranks = str(len(os.sched_getaffinity(0)))
    bound = mpiexec(["-bind-to", "core", "-n", ranks, *cli(f"{WORKFLOWS}:mpi_chain", "--mapping", "mpi", "-i", "3")])
    assert bound.returncode == 0 and "warning" not in bound.stderr, bound.stderr


@pytest.mark.skipif(not differential.D4P_PYTHON.exists(), reason="dispel4py 1.2.1 is not installed")
def test_cli_under_mpiexec_with_more_ranks_than_cpus_keeps_dispel4py_counts(tmp_path: Path) -> None:
    """`mpiexec -n 4 dispel4py mpi flow.py` becomes `mpiexec -n 4 aiod4p run flow.py -m mpi`: on fewer CPUs than
    ranks, a dispel4py graph still gets the instances dispel4py's 4 processes give, so its results."""
    one_cpu = ("taskset", "-c", str(min(os.sched_getaffinity(0))))
    path = differential.flow(tmp_path, differential.COUNTING_FLOW)
    _, counts = differential.dispel4py_multi_counts(path, 4)  # dispel4py's mpi shares out processes alike
    out = tmp_path / "out.jsonl"
    done = mpiexec(["-n", "4", *cli(path, "--mapping", "mpi", "-i", "6", "--results", str(out))], prefix=one_cpu)
    assert done.returncode == 0, done.stderr
    assert "on the first 1 rank" in done.stderr
    assert sorted(json.loads(line)["data"] for line in out.read_text().splitlines()) == sorted(counts)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_cli_under_mpiexec_a_pe_error_ends_the_job_with_an_idle_rank() -> None:
    two_cpus = ("taskset", "-c", ",".join(map(str, sorted(os.sched_getaffinity(0))[:2])))
    started = time.monotonic()
    done = mpiexec(["-n", "3", *cli(f"{WORKFLOWS}:mpi_failing", "--mapping", "mpi", "-i", "100")], prefix=two_cpus)
    assert done.returncode != 0
    assert "FailsOnInstance" in done.stderr and "refuses item" in done.stderr
    assert "on the first 2 ranks, and the other ranks wait" in done.stderr
    assert time.monotonic() - started < 10
    assert left_files(done.stderr, wf.TOPOLOGY) == []


def test_cli_under_mpiexec_rejects_another_n_or_mapping() -> None:
    # Rank 0 says it, once; each rank said it, and with another mapping each ran the whole workflow, silently.
    done = mpiexec(["-n", "2", *cli(f"{WORKFLOWS}:mpi_chain", "--mapping", "mpi", "-n", "3")])
    assert done.returncode == 2
    assert done.stderr == "aiod4p: error: this mpi run has 2 ranks (from mpiexec); -n 3 does not match it: drop -n\n"
    done = mpiexec(["-n", "2", *cli(f"{WORKFLOWS}:mpi_chain", "--mapping", "multi", "-i", "3")])
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "aiod4p: error: this process is one of 2 MPI ranks (started by mpiexec), and --mapping multi would run the"
        " whole workflow on each of them: give --mapping mpi, or run without mpiexec\n"
    )
    # What only rank 0 checks (the files it writes): it exited before MPI_Init, and the other ranks spun there forever
    unwritable = ["--results", "/nonexistent/results.jsonl", "--provenance", "prov.txt"]
    done = mpiexec(["-n", "3", *cli(f"{WORKFLOWS}:mpi_chain", "--mapping", "mpi", "-i", "3", *unwritable)], timeout=20)
    assert (done.returncode, done.stdout) == (1, "")
    assert "error: cannot write results to /nonexistent/results.jsonl: No such file or directory\n" in done.stderr


def left_files(stderr: str, said: str = wf.SHARED_MEMORY) -> list[str]:
    """The files a failing rank said it had (``wf.FailsOnInstance``: ``said`` is ``wf.SHARED_MEMORY``, the MPICH
    shared memory it mapped, or ``wf.TOPOLOGY``, its Hydra proxy's topology file) that still exist."""
    lines = [line for line in stderr.splitlines() if line.startswith(said)]
    assert [path for line in lines for path in line.split()[len(said.split()) :]], f"no rank said {said}: {stderr}"
    return [path for line in lines for path in line.split()[len(said.split()) :] if Path(path).exists()]


def test_cli_under_mpiexec_pe_error_on_rank_1_ends_the_job() -> None:
    started = time.monotonic()
    done = mpiexec(["-n", "2", *cli(f"{WORKFLOWS}:mpi_failing", "--mapping", "mpi", "-i", "100")])
    assert done.returncode != 0
    assert "FailsOnInstance" in done.stderr and "refuses item" in done.stderr
    assert time.monotonic() - started < 10
    assert left_files(done.stderr) == []  # MPI_Abort ends the job without MPI_Finalize
    # nor lets the proxy remove its topology file: one per failed run under the user's mpiexec
    assert left_files(done.stderr, wf.TOPOLOGY) == []


def test_cli_under_mpiexec_killed_rank_ends_the_job() -> None:
    started = time.monotonic()
    done = mpiexec(["-n", "2", *cli(f"{WORKFLOWS}:mpi_killed", "--mapping", "mpi", "-i", "100")])
    assert done.returncode != 0
    assert time.monotonic() - started < 10
    assert left_files(done.stderr) == []


# A workflow file whose import takes long on one rank (AIOD4P_TEST_SLOW_RANK; AIOD4P_TEST_FAILING_RANK: fails
# there, on each of several ranks given with commas, or on every rank for the same reason with "*"): each rank
# writes its pid to a file in AIOD4P_TEST_MARKS once it has imported it, or as it starts the slow import.
_SLOW_ON_ONE_RANK = """
import os
import sys
import time
from pathlib import Path

rank = os.environ["PMI_RANK"]


def mark(name):
    marks = Path(os.environ["AIOD4P_TEST_MARKS"])
    (marks / f"{name}.part").write_text(str(os.getpid()))
    os.replace(marks / f"{name}.part", marks / name)


failing = os.environ.get("AIOD4P_TEST_FAILING_RANK", "")
if failing == "*":
    raise ImportError("every rank lacks a library")
if rank in failing.split(","):
    raise ImportError(f"rank {rank} lacks a library")
if rank == os.environ.get("AIOD4P_TEST_SLOW_RANK"):
    mark("slow")
    time.sleep(120)  # ok-sleep: a slow import (scipy, astropy...), which the signal interrupts
sys.path.insert(0, os.environ["AIOD4P_TEST_WORKFLOWS"])
from workflows import mpi_chain

graph = mpi_chain()
mark(f"imported-{rank}")
"""


def _slow_job(tmp_path: Path, **variables: str) -> tuple[list[str], dict[str, str]]:
    """The arguments of ``mpiexec`` that run :data:`_SLOW_ON_ONE_RANK` with ``aiod4p run`` on 2 ranks, and its
    environment (with ``variables``), which marks its processes with ``AIOD4P_TEST_MARK`` = :func:`_slow_mark`."""
    flow = tmp_path / "slow.py"
    flow.write_text(_SLOW_ON_ONE_RANK)
    env = {
        **os.environ,
        "AIOD4P_TEST_MARKS": str(tmp_path),
        "AIOD4P_TEST_WORKFLOWS": str(WORKFLOWS.parent),
        "AIOD4P_TEST_MARK": _slow_mark(tmp_path),
        **variables,
    }
    return ["-n", "2", *cli(str(flow), "--mapping", "mpi", "-i", "3")], env


def _slow_mark(tmp_path: Path) -> str:
    return f"slow-{tmp_path.name}-{os.getpid()}"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("slow", [0, 1])
@pytest.mark.parametrize("group", [False, True], ids=["mpiexec", "process-group"])
@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_ctrl_c_under_mpiexec_while_a_rank_imports_the_workflow_ends_the_job(
    tmp_path: Path, slow: int, group: bool, twice: bool
) -> None:
    """A rank stopped while it imported the workflow exited before MPI_Init, and Hydra ends a job only for a
    rank that had connected to it: the other rank waited in MPI_Init for it forever, at full CPU, and mpiexec
    with it; a second Ctrl-C (mpiexec then exits at once) left the job's topology file and shared memory."""
    fast = 1 - slow
    args, env = _slow_job(tmp_path, AIOD4P_TEST_SLOW_RANK=str(slow))
    process = subprocess.Popen(
        [str(MPIEXEC), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    found: set[Path] = set()
    try:
        deadline = time.monotonic() + 40
        while not ((tmp_path / "slow").exists() and (tmp_path / f"imported-{fast}").exists()):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)  # ok-sleep: polling for the files the ranks write
        ranks = {int((tmp_path / name).read_text()) for name in ("slow", f"imported-{fast}")}
        waiting = int((tmp_path / f"imported-{fast}").read_text())
        # It has started MPI (the old code's MPI_Init, where it waited, came after the import)
        while not _in_mpi(waiting):
            assert time.monotonic() < deadline
            time.sleep(0.01)  # ok-sleep: polling for MPI's shared memory in the rank that waits
        found = job_files(process.pid)
        if not twice:
            # The rank that waits for the slow one does so without spinning (MPICH's waits spin).
            before, start = _cpu_seconds(waiting), time.monotonic()
            time.sleep(0.5)  # ok-sleep: a measurement window, not a wait for an event
            assert _cpu_seconds(waiting) - before < 0.25 * (time.monotonic() - start)

        def ctrl_c() -> None:  # a terminal's goes to mpiexec's process group; mpiexec passes it on to the ranks
            with contextlib.suppress(ProcessLookupError):  # the job has ended
                os.killpg(process.pid, signal.SIGINT) if group else process.send_signal(signal.SIGINT)

        ctrl_c()
        started = time.monotonic()
        said = b""
        if twice:  # once the slow rank has stopped (the old code's job then waited for it forever)
            assert process.stderr is not None
            while b"aborted by SIGINT while loading" not in said:
                assert select.select([process.stderr], [], [], max(0.0, started + 10 - time.monotonic()))[0], said
                chunk = os.read(process.stderr.fileno(), 4096)
                assert chunk, said
                said += chunk
            ctrl_c()
        _, stderr = process.communicate(timeout=20)
        stderr = said.decode() + stderr
        assert time.monotonic() - started < 5, stderr
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        left = [path for path in found if path.exists()]
        for path in left:  # as _Ranks.close does
            path.unlink()
    assert wait_gone([*ranks, *_marked_processes(_slow_mark(tmp_path))], timeout=10) == []
    if not twice:  # a second Ctrl-C makes mpiexec exit at once, with a status of its own
        assert process.returncode == 130, stderr
        assert "aiod4p: aborted by SIGINT while loading the workflow" in stderr
        assert "Abort(" not in stderr  # every rank ends by itself
    assert left == []


def test_a_script_under_mpiexec_runs_one_workflow_after_another(tmp_path: Path) -> None:
    """``mpiexec -n 2 python script.py`` whose script calls ``run(mapping="mpi")`` twice: the first run marked
    each rank a worker, so the second was refused as if a worker imported the module, naming the
    ``if __name__ == '__main__':`` guard the script had."""
    flow = numbers_flow("class Times2(IterativePE):\n    def process_item(self, item):\n        return 2 * item\n")
    runs = (
        "from aiod4p import run\nfrom mpi4py import MPI\n\n"
        "if __name__ == '__main__':\n"
        "    for _ in range(2):\n"
        "        results = run(graph, 3, mapping='mpi')\n"
        "        if MPI.COMM_WORLD.Get_rank() == 0:\n"
        "            print(sorted(results.data()), flush=True)\n"
        "        else:\n"
        "            assert not results\n"  # the other ranks get none (docs/mpi.md)
    )
    (tmp_path / "script.py").write_text(f"{flow}\n{runs}")
    done = mpiexec(["-n", "2", sys.executable, "script.py"], cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[2, 4, 6]", "[2, 4, 6]"]


@pytest.mark.parametrize(
    ("failing", "said"),
    [
        ("1", ["the workflow failed to start, so no rank runs it: MPI rank 1: importing", "rank 1 lacks a library"]),
        ("*", ["every rank lacks a library"]),
        ("0,1", ["rank 0 lacks a library", "rank 1 lacks a library"]),
    ],
)
def test_cli_under_mpiexec_a_workflow_that_fails_to_load_ends_the_job_saying_why_once(
    tmp_path: Path, failing: str, said: list[str]
) -> None:
    """The rank that failed exited before MPI_Init: the other waited for it forever (as above). Then every rank
    said its error, each its own way: a syntax error was printed once per rank. Rank 0 now says it once: its own
    error, or, having gone on, which ranks failed and why; another rank says its own only where it differs."""
    args, env = _slow_job(tmp_path, AIOD4P_TEST_FAILING_RANK=failing)
    done = mpiexec(args, env=env)
    assert done.returncode == 1, done.stderr
    # (counted in the whole of stderr: two ranks' lines may come interleaved)
    assert done.stderr.count("aiod4p: error:") == (2 if failing == "0,1" else 1), done.stderr
    for text in said:
        assert done.stderr.count(text) == 1, done.stderr


A_CLASS_ONLY_RANK_0_HAS = """
import os
import sys

from aiod4p import IterativePE, WorkflowGraph

if os.environ["PMI_RANK"] == "0":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "only0"))
    from onlyzero import Double
else:
    class Double(IterativePE):  # not the class rank 0's plan names
        def process_item(self, item):
            return 2 * item

sys.path.insert(0, os.environ["AIOD4P_TEST_WORKFLOWS"])
from workflows import Count

graph = WorkflowGraph()
double = Double()
double.parallelism = 2
graph.connect(Count(), "output", double, "input")
"""


def test_cli_under_mpiexec_a_rank_that_fails_once_every_rank_went_on_says_why(tmp_path: Path) -> None:
    """Every rank loaded the workflow, then rank 1 could not load rank 0's plan (a module only rank 0 has):
    its error was taken for one rank 0 says, and nothing but MPI's `Abort(1)` said why the job ended."""
    (tmp_path / "only0").mkdir()
    (tmp_path / "only0" / "onlyzero.py").write_text(
        "from aiod4p import IterativePE\n\nclass Double(IterativePE):\n"
        "    def process_item(self, item):\n        return 2 * item\n"
    )
    (flow := tmp_path / "flow.py").write_text(A_CLASS_ONLY_RANK_0_HAS)
    env = {**os.environ, "AIOD4P_TEST_WORKFLOWS": str(WORKFLOWS.parent)}
    done = mpiexec(["-n", "2", *cli(str(flow), "--mapping", "mpi", "-i", "3", "-q")], env=env)
    assert done.returncode != 0, done.stderr
    assert "MPI rank 1 cannot load the workflow (ModuleNotFoundError: No module named 'onlyzero')" in done.stderr


# -- launched by the mapping -----------------------------------------------------------


def test_cli_launches_mpiexec_itself(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    done = subprocess.run(
        cli(f"{WORKFLOWS}:mpi_chain", "--mapping", "mpi", "-n", "2", "-i", "100", "--results", str(out)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 100


READS_STDIN = """
import sys

from dispel4py.base import IterativePE, ProducerPE
from dispel4py.workflow_graph import WorkflowGraph


class ReadStdin(ProducerPE):
    def _process(self, inputs):
        for line in sys.stdin:
            self.write("output", line.strip())


class Upper(IterativePE):
    def _process(self, data):
        return data.upper()


graph = WorkflowGraph()
graph.connect(ReadStdin(), "output", Upper(), "input")
"""


def test_a_pe_reading_stdin_reads_the_launchers_on_rank_0(tmp_path: Path) -> None:
    """A dispel4py PE reading ``sys.stdin`` read nothing on the ranks ``aiod4p run`` started (their stdin was the
    null device), where dispel4py's mpi gave rank 0 the stdin of mpiexec. Hydra's own forwarding ends the job past
    64 KiB: the lines here are more."""
    (tmp_path / "upper.py").write_text(READS_STDIN)
    lines = [f"line {i}" for i in range(20_000)]
    done = aiod4p_cli(
        "run", "upper.py", "-m", "mpi", "-n", "2", "--results", "-", cwd=tmp_path, input="\n".join(lines), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["data"] for line in done.stdout.splitlines()) == sorted(s.upper() for s in lines)


def test_cli_launches_a_workflow_named_as_a_python_module_from_its_directory(tmp_path: Path) -> None:
    """``cd flows; aiod4p run signal.py -m mpi``: ``python -m`` put the directory first on the ranks' ``sys.path``
    while they started, so the workflow replaced Python's ``signal`` there and every rank failed."""
    (tmp_path / "signal.py").write_text(
        numbers_flow("class Times2(IterativePE):\n    def process_item(self, item):\n        return 2 * item\n")
    )
    done = subprocess.run(  # the console script: `python -m aiod4p` there would fail the same way
        cli("signal.py", "-m", "mpi", "-n", "2", "-i", "5", "--results", "-"),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["data"] for line in done.stdout.splitlines()) == [2, 4, 6, 8, 10]


def test_cli_launched_ranks_see_the_command_line_in_sys_argv(tmp_path: Path) -> None:
    """A workflow reading ``sys.argv`` at import (dispel4py's ``large_teecopy.py`` does) gets the command line on
    every rank, as under the user's mpiexec and on multi's workers; the ranks aiod4p started read their own
    (``-m aiod4p.mappings._mpi_job SOCKET TARGET``) and their PEs computed with another value."""
    (tmp_path / "flow.py").write_text(
        "import sys\n\nFACTOR = int(sys.argv[-1]) if sys.argv[-1].isdigit() else -1\n\n"
        + numbers_flow("class Scale(IterativePE):\n    def process_item(self, item):\n        return FACTOR * item\n")
    )
    done = subprocess.run(
        cli("flow.py", "-m", "mpi", "-n", "2", "--results", "-", "-i", "3"),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["data"] for line in done.stdout.splitlines()) == [3, 6, 9]


def test_cli_a_workflow_module_that_runs_on_mpi_when_imported_is_refused_by_the_ranks(tmp_path: Path) -> None:
    """A module-level ``run(graph, mapping="mpi")`` without the ``__main__`` guard: the launcher's import started
    ranks, whose imports started ranks of their own, and ``aiod4p run`` hung until it was killed."""
    flow = numbers_flow("class Times2(IterativePE):\n    def process_item(self, item):\n        return 2 * item\n")
    unguarded = 'from aiod4p import run\n\nprint(run(graph, 3, mapping="mpi", workers=2).data())\n'
    (tmp_path / "unguarded.py").write_text(f"{flow}\n{unguarded}")
    done = subprocess.run(
        cli("unguarded.py", "-m", "mpi", "-n", "2"), capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr
    assert "a run on the mpi mapping was started while a worker process imported the workflow's module" in done.stderr
    assert "if __name__ == '__main__':" in done.stderr


def test_cli_launched_pe_error_exits_non_zero() -> None:
    done = subprocess.run(
        cli(f"{WORKFLOWS}:mpi_failing", "--mapping", "mpi", "-n", "2", "-i", "100"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "FailsOnInstance" in done.stderr and "refuses item" in done.stderr
    assert "Abort(" not in done.stderr  # the expected teardown is not shown as noise
    assert left_files(done.stderr) == []


# A workflow file whose import, in the launcher, waits until both ranks have imported it too.
_WAITS_FOR_THE_RANKS = """
import os
import select
import sys
import time
from pathlib import Path

marks = Path(os.environ["AIOD4P_TEST_MARKS"])
if "PMI_RANK" in os.environ:
    (marks / f"rank-{os.environ['PMI_RANK']}").touch()
else:
    deadline = time.monotonic() + 40
    while not all((marks / f"rank-{rank}").exists() for rank in (0, 1)):
        if time.monotonic() > deadline:
            raise RuntimeError("the ranks did not import the workflow while the launcher loaded it")
        time.sleep(0.01)  # ok-sleep: polls the files other processes write (no event joins them)

sys.path.insert(0, os.environ["AIOD4P_TEST_WORKFLOWS"])
from workflows import mpi_chain

graph = mpi_chain()
"""


def test_cli_ranks_import_the_workflow_while_the_launcher_loads_it(tmp_path: Path) -> None:
    flow = tmp_path / "overlapped.py"
    flow.write_text(_WAITS_FOR_THE_RANKS)
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        cli(str(flow), "--mapping", "mpi", "-n", "2", "-i", "50", "--results", str(out)),
        capture_output=True,
        text=True,
        timeout=55,
        env={**os.environ, "AIOD4P_TEST_MARKS": str(tmp_path), "AIOD4P_TEST_WORKFLOWS": str(WORKFLOWS.parent)},
    )
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["data"] for line in out.read_text().splitlines()) == [i * 8 for i in range(50)]


# A workflow file whose import, on each MPI rank, records the job's files the rank has (its shared memory and its
# proxy's topology file) and its pid in AIOD4P_TEST_MARKS, after which rank 1 SIGKILLs itself once rank 0 has
# recorded too; in the launcher, it waits until both ranks have ended: the job ends before its hand-over.
_KILLS_RANK_1_WHILE_IMPORTED = """
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, os.environ["AIOD4P_TEST_WORKFLOWS"])
from ray_cluster import wait_gone
from workflows import mpi_chain, proxy_topology_files

marks = Path(os.environ["AIOD4P_TEST_MARKS"])


def recorded(rank):
    deadline = time.monotonic() + 40
    while not (marks / f"rank-{rank}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank} did not import the workflow")
        time.sleep(0.01)  # ok-sleep: polls the files other processes write (no event joins them)
    return (marks / f"rank-{rank}").read_text().split()


if "PMI_RANK" in os.environ:
    rank = os.environ["PMI_RANK"]
    held = re.findall(r"/dev/shm/mpich_shm_\\S+", Path("/proc/self/maps").read_text()) + proxy_topology_files()
    (marks / f"rank-{rank}.part").write_text(" ".join([str(os.getpid()), *sorted(set(held))]))
    os.replace(marks / f"rank-{rank}.part", marks / f"rank-{rank}")
    if rank == "1":
        recorded(0)
        os.kill(os.getpid(), signal.SIGKILL)
elif wait_gone([int(recorded(rank)[0]) for rank in (0, 1)], timeout=40):
    raise RuntimeError("the MPI ranks did not end once rank 1 was killed")

graph = mpi_chain()
"""


def _recorded_files(marks: Path) -> list[Path]:
    """The files that the ranks of :data:`_KILLS_RANK_1_WHILE_IMPORTED` recorded in ``marks``."""
    return sorted({Path(path) for mark in marks.glob("rank-[01]") for path in mark.read_text().split()[1:]})


def test_a_rank_killed_while_it_imports_the_workflow_leaves_no_file(tmp_path: Path) -> None:
    """A rank killed after MPI_Init, before the launcher handed the job over (the ranks import the workflow while
    the launcher loads it, and wait for the job): the job ended before the launcher noted its files, and left its
    2 MB of shared memory in /dev/shm (under the test suite's replaying ranks, about once a run)."""
    flow = tmp_path / "killed.py"
    flow.write_text(_KILLS_RANK_1_WHILE_IMPORTED)
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        done = subprocess.run(
            cli(str(flow), "--mapping", "mpi", "-n", "2", "-i", "5"),
            capture_output=True,
            text=True,
            timeout=55,
            env={**os.environ, "AIOD4P_TEST_MARKS": str(marks), "AIOD4P_TEST_WORKFLOWS": str(WORKFLOWS.parent)},
        )
        held = _recorded_files(marks)
        left = [path for path in held if path.exists()]
    finally:
        for path in _recorded_files(marks):
            path.unlink(missing_ok=True)  # as _Ranks.close does
    assert done.returncode == 1, done.stderr
    assert "Killed (signal 9)" in done.stderr, done.stderr
    assert any(path.name.startswith("mpich_shm_") for path in held), held
    assert left == []


def test_a_module_of_the_workflow_named_as_one_of_pythons_leaves_the_ranks_pythons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project directory on ``sys.path`` with its own ``types.py`` (``from types import Trace``): the ranks
    had the directory in ``PYTHONPATH``, before the standard library, and every one failed at start-up."""
    (tmp_path / "types.py").write_text("class Trace:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python run.py` from the project's directory has it
    results = aiod4p.run(wf.mpi_chain(), 20, mapping="mpi", workers=2)
    assert sorted(results.data()) == [i * 8 for i in range(20)]


def test_a_module_beside_a_launcher_run_with_python_c_reaches_the_ranks(tmp_path: Path) -> None:
    """``python -c`` (a REPL, a notebook) reaches a module in its folder through ``""`` on ``sys.path``, which the
    ranks, started with ``python -P``, took for nothing: they could not load the workflow."""
    (tmp_path / "mypes.py").write_text(
        "from aiod4p import IterativePE, ProducerPE, WorkflowGraph\n"
        "class Nums(ProducerPE):\n    def produce(self):\n        yield from range(10)\n"
        "class Twice(IterativePE):\n    def process_item(self, item):\n        return 2 * item\n"
        "def make():\n    graph = WorkflowGraph()\n    graph.connect(Nums(), 'output', Twice(), 'input')\n"
        "    return graph\n"
    )
    script = "import aiod4p, mypes; print(sorted(aiod4p.run(mypes.make(), 1, mapping='mpi', workers=2).data()))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([2 * n for n in range(10)])


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from aiod4p import WorkflowGraph\nx = (\n", "SyntaxError: '(' was never closed (broken.py, line 2)"),
        ("from aiod4p import WorkflowGraph\n\nraise KeyError('no catalogue')\n", "KeyError: 'no catalogue'"),
    ],
)
def test_cli_launched_bad_workflow_file_is_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: str
) -> None:
    mark = f"AIOD4P_TEST_MARK=broken-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("AIOD4P_TEST_MARK", mark.split("=", 1)[1])
    flow = tmp_path / "broken.py"
    flow.write_text(source)
    done = subprocess.run(
        cli(str(flow), "--mapping", "mpi", "-n", "2", "-i", "1"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert done.stderr.count(expected) == 1, done.stderr
    assert done.stderr.startswith(f"aiod4p: error: importing {flow} failed"), done.stderr
    assert "Abort(" not in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""
    assert wait_gone(_marked_processes(mark), timeout=10) == []  # the ranks started ahead are ended (SIGKILLed)


def test_pe_error_on_another_rank_names_the_pe() -> None:
    started = time.monotonic()
    with pytest.raises(PEError) as caught:
        aiod4p.run(wf.mpi_failing(), 100, mapping="mpi", workers=3)
    assert caught.value.pe.startswith("FailsOnInstance") and caught.value.instance == 1
    assert "ValueError" in caught.value.traceback_text
    assert time.monotonic() - started < 10


def test_a_rank_that_cannot_load_the_workflow_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 printed its traceback and aborted the job: the run failed with ``mpiexec exited with status 1 before
    the run finished; its last output:`` and the traceback again, not naming what rank 1 could not load."""
    (tmp_path / "needs_a_library.py").write_text(
        "import os\n\nimport aiod4p\n\n"
        "if os.environ.get('PMI_RANK') == '1':\n"
        "    raise ImportError('rank 1 lacks a library')\n\n\n"
        "class Double(aiod4p.IterativePE):\n"
        "    def process_item(self, item):\n"
        "        return 2 * item\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from needs_a_library import Double  # type: ignore[import-not-found]

    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", Double(), "input", grouping=ALL)
    with pytest.raises(TargetError) as caught:
        aiod4p.run(graph, 10, mapping="mpi", workers=2)
    assert str(caught.value) == (
        "MPI rank 1 cannot load the workflow (ImportError: rank 1 lacks a library); its PE classes must be importable"
        " there"
    )


@pytest.mark.parametrize(
    ("how", "named"),
    [
        (
            {"kill": True},
            r"MPI rank [01] \(pid \d+ on \S+; it ran (Count\d+\[0\], )?FailsOnInstance\d+\[[01]\]\) ended with exit"
            r" code 9 \(Killed \(signal 9\)\)",
        ),
        (
            {"exit_code": 3},
            r"^MPI rank 1 \(pid \d+ on \S+; it ran FailsOnInstance\d+\[1\]\) ended with exit code 3: mpiexec exited"
            r" with code \d+ before the run finished$",
        ),
        (
            # Hydra reports every rank as exited with 0: `mpiexec exited with status 0 before the run finished`
            {"exit_code": 0},
            r"^an MPI rank ended by itself with exit code 0 \(os\._exit\(0\) in a PE, or exit\(0\) in a library it"
            r" calls; mpiexec then reports every rank as exited with 0\): mpiexec exited with code 0 before the run"
            r" finished$",
        ),
    ],
    ids=["killed", "exited", "exited-with-0"],
)
def test_a_rank_that_dies_fails_the_run_naming_the_rank_and_its_pe_instances(how: dict[str, Any], named: str) -> None:
    """Killed by a signal, the rank is the one Hydra's banner names: under load, now and then the rank it killed next
    (both SIGKILLed). A rank that exited by itself (``os._exit(3)`` in a PE) was not named: Hydra's banner names a
    rank only when one died of a signal, and the run failed with ``mpiexec exited with status 3 before the run
    finished``; the exit statuses Hydra prints at its end name it."""
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", wf.FailsOnInstance(1, **how), "input", grouping=ALL)
    started = time.monotonic()
    with pytest.raises(WorkerDied, match=named):
        aiod4p.run(graph, 100, mapping="mpi", workers=2)
    assert time.monotonic() - started < 10


def test_ranks_exiting_badly_after_the_run_finished_leave_its_results(caplog: pytest.LogCaptureFixture) -> None:
    # Every rank had sent all it had: the run's results are complete (and a checkpointed run must not be
    # restarted to redo them), so mpiexec's status is a warning.
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", wf.ExitsBadlyAtExit(parallelism=2), "input")
    results = aiod4p.run(graph, 20, mapping="mpi", workers=2)
    assert sorted(results.data()) == list(range(20))
    assert "mpiexec exited with code" in caplog.text and "after the run finished (results complete)" in caplog.text


def test_statistics_of_every_rank() -> None:
    graph, _ = wf.pipeline(3)

    async def main() -> list[aiod4p.InstanceStats]:
        async with asyncio.timeout(30):
            run = aiod4p.start(graph, 1000, mapping="mpi", workers=2)
            await run.results()
            return run.stats

    stats = asyncio.run(main())
    assert {s.worker for s in stats} == {0, 1}
    per_pe: dict[str, int] = {}
    for entry in stats:
        per_pe[entry.pe] = per_pe.get(entry.pe, 0) + entry.items_in
    assert sorted(per_pe.values()) == [1000] * 4


async def _endless() -> AsyncIterator[int]:
    value = 0
    while True:
        yield value
        value += 1
        await asyncio.sleep(0)


def test_drain_reaches_every_rank() -> None:
    """Sources on rank 0 (a streamed endless input) and rank 1 (a huge count) both stop."""
    graph = WorkflowGraph()
    streamed, counted = wf.Double(), wf.Count()
    counted.parallelism = 2  # instance 1 runs on rank 1
    graph.connect(streamed, "output", wf.Discard(), "input")
    graph.connect(counted, "output", double := wf.Double(), "input")

    async def main() -> int:
        async with asyncio.timeout(30):
            run = aiod4p.start(graph, {streamed: _endless(), counted: 10**12}, mapping="mpi", workers=2)
            seen = 0
            async for _record in run:
                seen += 1
                if seen == 2000:
                    run.drain()
            return seen

    seen = asyncio.run(main())
    assert seen >= 2000
    assert double.id  # the counted branch's results ended too: the iteration above finished


def test_a_streamed_input_feeds_a_root_with_instances_on_several_ranks() -> None:
    """Such a root's instance 0 consumes the input, on rank 0, as on multi and under the user's mpiexec: the run was
    refused (``aiod4p run --stdin PE`` too), advising a list or a count."""
    graph = WorkflowGraph()
    double = wf.Double()
    double.parallelism = 2
    graph.add(double)
    results = aiod4p.run(graph, {double: iter(range(10))}, mapping="mpi", workers=2)
    assert sorted(results.data()) == [2 * i for i in range(10)]


def test_classes_and_functions_from_main_travel_by_value() -> None:
    """The ranks cannot import the launcher's ``__main__`` (a notebook, a script): its classes and functions,
    and lambdas, travel with the job."""
    main_class = type("Local", (wf.Double,), {"__module__": "__main__"})

    def twice(item: int) -> int:
        return 2 * item

    twice.__module__ = "__main__"
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", doubled := main_class(), "input")
    graph.connect(doubled, "output", twiced := aiod4p.FunctionPE(functools.partial(twice)), "input")
    graph.connect(twiced, "output", aiod4p.FunctionPE(lambda item: item + 1, parallelism=2), "input")
    assert sorted(aiod4p.run(graph, 3, mapping="mpi", workers=2).data()) == [1, 5, 9]


def test_a_notebook_workflow_runs_on_the_ranks() -> None:
    """PE classes, functions and item classes defined in a ``__main__`` without a file, as in a notebook; the
    items come back as the launcher's own class."""
    (run,) = run_notebook_flow("mpi")
    assert run == {"mapping": "mpi", "same": True, "points": True, "processes": 2, "dispel4py": True}


def test_an_unpicklable_pe_is_refused_clearly() -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", holder := wf.HoldsLock(), "input")
    with pytest.raises(
        GraphError,
        match=rf"PE {holder.id} cannot be pickled to start the MPI ranks: its attribute 'lock' \(a lock\) cannot: ",
    ):
        aiod4p.run(graph, 3, mapping="mpi", workers=2)


@pytest.mark.parametrize(
    ("chosen", "message"),
    [
        ("/nonexistent/mpiexec", "AIOD4P_MPIEXEC names /nonexistent/mpiexec, which does not exist"),
        # A directory was said not to exist
        (str(BIN), f"AIOD4P_MPIEXEC names {BIN}, a directory: give the path of its mpiexec"),
        ("no-such-mpiexec", "AIOD4P_MPIEXEC names no-such-mpiexec, which is no program on PATH"),
    ],
)
def test_missing_mpiexec_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, chosen: str, message: str) -> None:
    monkeypatch.setenv("AIOD4P_MPIEXEC", chosen)
    with pytest.raises(MappingUnavailable) as caught:
        aiod4p.run(wf.mpi_chain(), 3, mapping="mpi", workers=2)
    assert str(caught.value) == message


def test_mpiexec_named_without_a_path_is_looked_up_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``AIOD4P_MPIEXEC=mpiexec`` once a cluster's MPI module is loaded: it was looked for in the current directory,
    and said not to exist."""
    monkeypatch.setenv("AIOD4P_MPIEXEC", "mpiexec")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert find_mpiexec() == str(MPIEXEC)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("-n 3", r"AIOD4P_MPIEXEC_ARGS gives the number of ranks \(-n\): leave it out, and give it with -n"),
        ("-np=3", r"AIOD4P_MPIEXEC_ARGS gives the number of ranks \(-np=3\)"),
        ("-f 'hosts", 'AIOD4P_MPIEXEC_ARGS cannot be split into arguments .*: "-f \'hosts"'),
    ],
)
def test_mpiexec_args_that_cannot_work_are_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, extra: str, message: str
) -> None:
    # A rank count gave Hydra's "duplicate setting: n" from the mpiexec; a stray quote, shlex's error alone.
    monkeypatch.setenv("AIOD4P_MPIEXEC_ARGS", extra)
    with pytest.raises(MappingUnavailable, match=message):
        aiod4p.run(wf.mpi_chain(), 3, mapping="mpi", workers=2)


def test_missing_mpi4py_is_a_clear_error() -> None:
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import aiod4p, workflows\n"
        "try:\n"
        "    aiod4p.run(workflows.mpi_chain(), 3, mapping='mpi', workers=2)\n"
        "except aiod4p.MappingUnavailable as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=WORKFLOWS.parent
    )
    assert install_hint("mpi") in done.stdout, done.stderr


@pytest.mark.timeout(180)  # twenty mpiexec start-ups: about 50 s at a load average of 25 on two cores (main too)
def test_twenty_consecutive_runs_never_hang() -> None:
    graph, _ = wf.pipeline(3)
    for _ in range(20):
        assert len(aiod4p.run(graph, 2000, mapping="mpi", workers=2)) == 2000


# -- several hosts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostfile", "flags"),
    [("localhost:2\n127.0.0.1:2\n", []), ("nodeA:2\nnodeB:2\n", ["-launcher", "fork"])],
    ids=["local-names", "fork-launcher"],
)
def test_ranks_on_two_hosts(tmp_path: Path, hostfile: str, flags: list[str]) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(hostfile)
    out = tmp_path / "results.jsonl"
    args = ["-f", str(hosts), *flags, "-n", "4", *cli(f"{WORKFLOWS}:mpi_hosts", "--mapping", "mpi", "-i", "400")]
    done = mpiexec([*args, "--results", str(out)])
    assert done.returncode == 0, done.stderr
    seen = [json.loads(line)["data"] for line in out.read_text().splitlines()]
    assert sorted(item for _, _, item in seen) == list(range(400))
    assert len({host for host, _, _ in seen}) == 2
    assert len({pid for _, pid, _ in seen}) == 4


def _marked_processes(mark: str) -> list[int]:
    """Processes whose environment carries ``mark`` (the ranks and mpiexec of one test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue  # gone, or not ours to read
    return found


def test_cancelling_a_run_leaves_no_process_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    mark = f"AIOD4P_TEST_MARK=cancel-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("AIOD4P_TEST_MARK", mark.split("=", 1)[1])
    graph, _ = wf.pipeline(2)

    async def main() -> None:
        async with asyncio.timeout(30):
            run = aiod4p.start(graph, 10**12, mapping="mpi", workers=2)
            async for _record in run:
                break  # the job is running on both ranks
            assert len(_marked_processes(mark)) >= 3  # mpiexec, its proxy, 2 ranks
            await run.aclose()

    asyncio.run(main())
    assert wait_gone(_marked_processes(mark), timeout=10) == []  # SIGKILLed: may take a moment to end


def test_a_failure_while_reading_mpiexec_output_closes_what_it_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failing (or cancelled) between connecting mpiexec's stdout and its stderr left stdout's transport open
    on a closed pipe: a later run reusing its descriptor was never woken (a 30 s wait), and ResourceWarning."""
    connected: list[mpi._Output] = []

    class SecondPipeFails(mpi._Output):
        def __init__(self, reader: asyncio.StreamReader) -> None:
            if connected:
                raise OSError("no second pipe")
            super().__init__(reader)
            connected.append(self)

    monkeypatch.setattr(mpi, "_Output", SecondPipeFails)
    graph, _ = wf.pipeline(2)

    async def main() -> None:
        async with asyncio.timeout(30):
            with pytest.raises(OSError, match="no second pipe"):
                await aiod4p.run_async(graph, 10, mapping="mpi", workers=2)
            assert [output.lost.done() for output in connected] == [True]

    asyncio.run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_files_a_killed_job_would_leave_are_found_under_its_mpiexec() -> None:
    """A run cancelled while its ranks start (before every rank is ready and unlinks its shared memory) left
    2 MB in /dev/shm until the machine restarted; the launcher removes what ``job_files`` finds, once the
    mpiexec is reaped (its topology file: tests/test_longevity.py)."""
    script = (
        "from mpi4py import MPI; import sys\nMPI.COMM_WORLD.Barrier(); print('ready', flush=True); sys.stdin.read()"
    )
    job = subprocess.Popen(
        [find_mpiexec(), "-n", "2", sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert job.stdout is not None and job.stdin is not None
    try:
        ready = b""
        deadline = time.monotonic() + 60
        while ready.count(b"ready") < 2:
            assert select.select([job.stdout], [], [], max(0.0, deadline - time.monotonic()))[0], ready
            ready += os.read(job.stdout.fileno(), 4096)
        found = job_files(job.pid)
        shared = [path for path in found if path.name.startswith("mpich_shm_")]
        assert shared and all(path.exists() for path in shared), found
        assert any(path.name.startswith("hydra_hwloc_xmlfile_") for path in found), found
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        job.stdin.close()
        job.stdout.close()
    for path in found:  # as _Ranks.close does
        path.unlink(missing_ok=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_left_running_once_its_mpiexec_is_reaped_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hydra's proxy and each rank start sessions of their own, which the launcher's signals to the mpiexec's
    session do not reach: a rank whose proxy died outlived the run (a failing run's rank, under load), and
    one waiting for the others in MPI waits for ever. What the launcher noted of the job and still runs once
    the mpiexec is reaped is killed after a grace."""
    monkeypatch.setattr(mpi, "LEFTOVER_GRACE", 0.2)
    ranks = mpi._Ranks(find_mpiexec(), 2)
    held: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while True:  # both ranks have started MPI (mapped its shared memory): the job is whole
            below = descendants({ranks.process.pid}) - {ranks.process.pid}
            commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in below}
            started = [pid for pid, command in commands.items() if b"_mpi_job" in command and _in_mpi(pid)]
            if len(started) == 2:
                break
            assert ranks.process.poll() is None and time.monotonic() < deadline, commands
            time.sleep(0.01)  # ok-sleep: polling for the processes mpiexec starts
        ranks.note_job()
        held = pidfds(set(started))
        proxy = next(pid for pid, command in commands.items() if b"hydra_pmi_proxy" in command)
        os.kill(proxy, signal.SIGKILL)
    finally:
        ranks.close(unused=True)
    try:
        running, deadline = list(held), time.monotonic() + 10
        while running and time.monotonic() < deadline:  # a pidfd is readable once its process ended
            ended, _, _ = select.select(running, [], [], max(0.0, deadline - time.monotonic()))
            running = [fd for fd in running if fd not in ended]
        assert not running
    finally:
        for fd in held:
            os.close(fd)


def _in_mpi(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "/dev/shm/mpich_shm_" in Path(f"/proc/{pid}/maps").read_text()
    return False


def test_a_run_cancelled_before_rank_0_has_the_job_kills_mpiexec_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its ranks have nothing to end gently, and a young mpiexec may take seconds to pass a SIGTERM on."""
    processes: list[mpi._Process] = []

    class Recorded(mpi._Process):
        def __init__(self, process: subprocess.Popen[bytes]) -> None:
            super().__init__(process)
            processes.append(self)

    waiting: list[asyncio.Event] = []  # set once rank 0 has connected: the ranks are waiting for the job
    # Open until mpiexec is gone: closed as the hand-over is cancelled, rank 0 saw its end and exited with 1,
    # at times before mpiexec was killed.
    connections: list[socket.socket] = []

    async def never_hand_over(job: mpi._Job, ranks: mpi._Ranks, prepared: object, payload: bytes) -> None:
        connection, _ = await asyncio.get_running_loop().sock_accept(ranks.listener)
        connections.append(connection)
        waiting[0].set()
        await asyncio.Event().wait()

    monkeypatch.setattr(mpi, "_Process", Recorded)
    monkeypatch.setattr(mpi._Job, "_hand_over", never_hand_over)
    mark = f"AIOD4P_TEST_MARK=unsent-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("AIOD4P_TEST_MARK", mark.split("=", 1)[1])
    graph, _ = wf.pipeline(2)

    async def main() -> None:
        waiting.append(asyncio.Event())
        async with asyncio.timeout(30):
            run = aiod4p.start(graph, 10, mapping="mpi", workers=2).start()
            await waiting[0].wait()
            await run.aclose()
        assert processes[0].returncode == -signal.SIGKILL

    try:
        asyncio.run(main())
    finally:
        for connection in connections:
            connection.close()
    assert wait_gone(_marked_processes(mark), timeout=10) == []  # its proxy and ranks follow it


def test_an_input_error_ends_the_ranks_started_ahead() -> None:
    """`aiod4p run -m mpi` starts mpiexec while it loads the workflow: a run that cannot start ends them."""
    mark = f"input-{os.getpid()}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "aiod4p", "run", f"{WORKFLOWS}:mpi_chain", "-m", "mpi", "-n", "2"]
    done = subprocess.run(
        [*command, "-d", '{"Nobody": 1}'], capture_output=True, text=True, timeout=60,
        env={**os.environ, "AIOD4P_TEST_MARK": mark},
    )  # fmt: skip
    assert done.returncode == 1 and "input key 'Nobody' names no PE of the graph" in done.stderr, done.stderr
    assert wait_gone(_marked_processes(mark), timeout=10) == []  # SIGKILLed: may take a moment to end


def test_a_plan_that_cannot_be_shipped_kills_the_ranks_started_ahead_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`aiod4p run -m mpi` starts mpiexec while it loads the workflow: a plan that then cannot reach the ranks (a
    PE holding a lock) ended them with SIGTERM, which a young mpiexec may take seconds to pass on; meanwhile
    its proxy wrote its topology file and the ranks mapped their shared memory, which the SIGKILL 3 s later
    left behind (one run in about 8 left /tmp/hydra_hwloc_xmlfile_* and 2 MB in /dev/shm)."""
    sent: list[tuple[int, int]] = []
    killpg = os.killpg

    def recorded(pgid: int, signum: int) -> None:
        sent.append((pgid, signum))
        killpg(pgid, signum)

    monkeypatch.setattr(mpi.os, "killpg", recorded)
    mapping = mpi.MpiMapping()
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", wf.HoldsLock(), "input")
    with mapping.head_start(f"{WORKFLOWS}:mpi_chain", 2):
        early = mapping._early
        assert early is not None
        with pytest.raises(GraphError, match="cannot be pickled to start the MPI ranks"):
            aiod4p.run(graph, 3, mapping=mapping, workers=2)
        assert early.process.returncode == -signal.SIGKILL
    assert sent == [(early.process.pid, signal.SIGKILL)]


@contextlib.contextmanager
def _held_job(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, bytes, Path]]:
    """A launched run on 2 ranks whose ranks both hold their event loops (neither can notice anything), its
    processes marked: the launcher, the mark, what the ranks said once holding (each its pid, then its proxy's
    topology files) and the run's temporary folder. Whatever runs of it when the block ends is killed."""
    mark = f"held-{os.getpid()}-{time.monotonic_ns()}"
    holding = tmp_path / "holding"
    os.mkfifo(holding)
    reader = os.open(holding, os.O_RDONLY | os.O_NONBLOCK)
    keep_open = os.open(holding, os.O_WRONLY)  # a writer throughout: the FIFO polls readable only with data
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "AIOD4P_TEST_MARK": mark, "AIOD4P_TEST_HOLDING": str(holding), "TMPDIR": str(temporary)}
    launcher = aiod4p_process("run", f"{WORKFLOWS}:held_loops", "-m", "mpi", "-n", "2", "-i", "3", "-q", env=env)
    try:
        held = b""
        while held.count(b"\n") < 2:
            assert select.select([reader], [], [], 60)[0], "the ranks never held their loops"
            held += os.read(reader, 100)
        yield launcher, mark, held, temporary
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in _marked_processes(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.communicate()
        os.close(reader)
        os.close(keep_open)


def test_a_killed_launcher_takes_mpiexec_and_its_ranks_with_it(tmp_path: Path) -> None:
    """mpiexec and its ranks run in a session of their own: no signal to the launcher's reaches them.
    Nor is its rank 0 socket's directory left in the temporary folder, nor its proxy's topology file in /tmp
    (no process of the job removes it once killed)."""
    with _held_job(tmp_path) as (launcher, mark, held, temporary):
        started = [pid for pid in _marked_processes(mark) if pid != launcher.pid]
        assert len(started) >= 3, started  # mpiexec, its proxy, 2 ranks
        exits = []
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                exits.append(os.pidfd_open(pid))
        launcher.kill()  # as the OOM killer, or a CI job's kill, would
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while exits:
            ended, _, _ = select.select(exits, [], [], max(0.0, deadline - time.monotonic()))
            assert ended, f"still running: {_marked_processes(mark)}"
            for fd in ended:
                exits.remove(fd)
                os.close(fd)
        assert [path.name for path in temporary.iterdir()] == []
        topology = {path for line in held.decode().splitlines() for path in line.split()[1:]}
        assert topology and [path for path in topology if Path(path).exists()] == []


def test_a_killed_mpiexec_fails_the_run_naming_the_signal(tmp_path: Path) -> None:
    """The run failed with ``mpiexec exited with status -9``: it names the signal now."""
    with _held_job(tmp_path) as (launcher, _, _, _):
        (mpiexec_pid,) = children({launcher.pid})
        os.kill(mpiexec_pid, signal.SIGKILL)
        _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 1, err
    assert "mpiexec was killed by SIGKILL before the run finished" in err, err


def test_ctrl_c_under_mpiexec_drains_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    args = cli(f"{WORKFLOWS}:mpi_chain", "--mapping", "mpi", "-i", str(10**12), "--results", str(out))
    process = subprocess.Popen(
        [str(MPIEXEC), "-n", "2", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while (not out.exists() or out.stat().st_size < 100_000) and time.monotonic() < deadline:
            time.sleep(0.05)  # ok-sleep: polling for the condition: results are flowing
        process.send_signal(signal.SIGINT)  # mpiexec forwards it to every rank
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0
    data = [json.loads(line)["data"] for line in out.read_text().splitlines()]
    assert len(data) > 1000
    assert all(value % 8 == 0 for value in data)  # every item went through the whole chain
    # Rank 0 speaks for the job: the other rank drains without a word (it said "0 records produced").
    said = stderr.decode()
    assert said.count("stopping the sources") == 1, said
    assert said.count("drained;") == 1, said
    assert f"drained; {len(data)} records produced" in said, said


def test_launched_run_takes_mpiexec_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    monkeypatch.setenv("AIOD4P_MPIEXEC_ARGS", f"-f {hosts}")
    seen = aiod4p.run(wf.mpi_hosts(), 40, mapping="mpi", workers=2).data()
    assert sorted(item for _, _, item in seen) == list(range(40))
    assert {host for host, _, _ in seen} == {"localhost", "127.0.0.1"}


@pytest.mark.parametrize(
    ("args", "variables", "spread"),
    [
        ([], {}, False),
        (["-bind-to", "core"], {}, False),
        (["-f", "hosts"], {}, True),
        (["--hostfile=hosts"], {}, True),
        (["-hosts", "a,b"], {}, True),
        (["-H", "a,b"], {}, True),
        ([], {"HYDRA_HOST_FILE": "hosts"}, True),
    ],
)
def test_mpiexec_arguments_that_name_hosts_are_recognised(
    args: list[str], variables: dict[str, str], spread: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks aiod4p starts share this machine's CPUs (and -n is capped to them) unless hosts are named."""
    from aiod4p.mappings._mpi_env import names_hosts

    for name in ("HYDRA_HOST_FILE", "OMPI_MCA_orte_default_hostfile", "PRTE_MCA_prte_default_hostfile"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert names_hosts(args) is spread


# -- what crosses a process boundary ---------------------------------------------------------


class EmitLock(aiod4p.IterativePE):
    """Emits an unpicklable object for item 7 (or for every item: ``always``)."""

    def __init__(self, always: bool = False, parallelism: int | None = None) -> None:
        super().__init__()
        self.always = always
        self.parallelism = parallelism

    def process_item(self, item: int) -> Any:
        return threading.Lock() if self.always or item == 7 else item


def test_an_unpicklable_item_between_ranks_names_the_pe_port_and_destination() -> None:
    graph = WorkflowGraph()
    emit = EmitLock(parallelism=1)
    graph.connect(wf.Count(), "output", emit, "input")
    # every item goes to instance 1, on rank 1: the lock has to cross
    dest = wf.WhoSawWhat(group_by(key=wf.on_instance_1), parallelism=2)
    graph.connect(emit, "output", dest, "input")
    with pytest.raises(
        TransportError,
        match=rf"PE {emit.id}\[0\] wrote an item on output port 'output' that cannot be pickled to reach"
        rf" {dest.id}\.input on worker 1: .*lock",
    ):
        aiod4p.run(graph, 100, mapping="mpi", workers=2)


def test_an_unpicklable_result_names_the_pe_port_and_destination() -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", emit := EmitLock(always=True, parallelism=2), "input")
    with pytest.raises(
        TransportError,
        match=rf"PE {emit.id} wrote a result on output port 'output' that cannot be pickled to reach"
        r" (the launching process|MPI rank 0): .*lock",
    ):
        aiod4p.run(graph, 100, mapping="mpi", workers=2)


def test_stdout_carries_only_results_when_a_rank_dies() -> None:
    """mpiexec's "BAD TERMINATION" banner goes to stderr, not into the ``--results -`` stream."""
    done = subprocess.run(
        cli(f"{WORKFLOWS}:mpi_killed", "--mapping", "mpi", "-n", "2", "-i", "100", "--results", "-"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    for line in done.stdout.splitlines():
        assert json.loads(line)["pe"], line
    assert "BAD TERMINATION" in done.stderr and "mpiexec exited" in done.stderr


def test_the_exit_codes_hydra_prints_at_its_end_are_read_and_kept_out_of_the_relayed_output() -> None:
    job = mpi._Job.__new__(mpi._Job)  # its output reader alone: no mpiexec
    job.exit_codes = None
    assert job._without_exit_codes("[vm] 0,768\n") == "[vm] 0,768\n"  # before the heading: a rank's own line
    # the heading ends a line a rank's last output left open (print(x, end="")): that output is relayed
    assert job._without_exit_codes("42[mpiexec@vm] Exit codes: [vm] 0,768\n") == "42\n"
    assert job._without_exit_codes("[other] 9\n") == ""
    assert job.exit_codes == {"vm": [0, 768], "other": [9]}


def test_a_launched_run_is_under_way_once_rank_0_has_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first Ctrl-C once a PE on the ranks ran (it had printed) aborted `aiod4p run -m mpi -n 2` "while starting
    the ranks", about one time in two, rather than drain it: the launcher took the run as under way only once it
    listened for drain requests, after it had opened rank 0's control comm, while the ranks already ran the job."""
    runs: list[aiod4p.WorkflowRun] = []
    under_way: list[bool] = []
    opened = mpi.open_pipe_comm

    async def opening(sock: socket.socket) -> Any:
        under_way.append(runs[0].under_way)
        return await opened(sock)

    monkeypatch.setattr(mpi, "open_pipe_comm", opening)
    graph, _ = wf.pipeline(2)

    async def main() -> None:
        async with asyncio.timeout(30):
            runs.append(aiod4p.start(graph, 10, mapping="mpi", workers=2))
            async for _record in runs[0]:
                pass

    asyncio.run(main())
    assert under_way == [True]
