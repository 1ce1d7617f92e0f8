"""What the tests share: the command line run as a user does (a real ``python -m aiod4p`` process), and
hooks that watch a run."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from aiod4p import InstanceStats, WorkflowGraph
from aiod4p.mappings._host import Supervisor

ROOT = Path(__file__).resolve().parents[1]
# The command line in a fresh interpreter (this one's: the project's venv).
AIOD4P = [sys.executable, "-m", "aiod4p"]


def aiod4p_cli(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 60,
    one_cpu: bool = False,
    cpus: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m aiod4p ARGS`` to its end and return its exit status and output, as text.

    It runs in ``cwd`` (the repository by default) with ``env`` as its whole
    environment (this process's by default), reading ``input`` on stdin; with
    ``one_cpu`` (or ``cpus``), it (and what it starts) may use one CPU (or the
    first ``cpus`` of this process's) only: ``aiod4p run`` then starts that
    many workers at most.
    """
    allowed = 1 if one_cpu else cpus
    return subprocess.run(
        [*AIOD4P, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=env,
        input=input,
        preexec_fn=functools.partial(_on_cpus, allowed) if allowed else None,
    )


def _on_cpus(count: int) -> None:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:count])


def aiod4p_process(
    *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None, command: Sequence[str] = AIOD4P
) -> subprocess.Popen[str]:
    """Start ``python -m aiod4p ARGS`` (or ``command ARGS``) with stdout and stderr piped, as text, in a session of
    its own.

    ``os.killpg(process.pid, signal.SIGKILL)`` then ends it with every worker
    process it started, so a failing test leaves nothing behind.
    """
    return subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        start_new_session=True,
    )


@contextlib.contextmanager
def reaped(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """``process`` (started in a session of its own) for the block; when the block ends, however it ends, the
    process is killed with its session if it is still running, and reaped: a failing test leaves nothing behind."""
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


@contextlib.contextmanager
def interrupted_run(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``aiod4p run ARGS --results - -q`` (:func:`aiod4p_process`), sent SIGINT once its first result, 0, is out.

    The block sees the run under way after the signal; when it ends, however
    it ends, the run is killed (if it is still running) and reaped.
    """
    with reaped(aiod4p_process("run", *args, "--results", "-", "-q")) as process:
        assert process.stdout is not None and process.stderr is not None
        assert json.loads(process.stdout.readline())["data"] == 0  # results stream: the run is under way
        process.send_signal(signal.SIGINT)
        yield process


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file, such as ``--results FILE`` writes."""
    return [json.loads(line) for line in path.read_text().splitlines()]


_NUMBERS = """\
from aiod4p import IterativePE, ProducerPE, WorkflowGraph


class Numbers(ProducerPE):
    def __init__(self):
        super().__init__()
        self.n = 0

    def produce(self):
        self.n += 1
        return self.n

"""


def numbers_flow(stage: str) -> str:
    """The text of a workflow file as users write one: ``Numbers`` (1, 2, 3, ...: one per input) into ``stage``.

    ``stage`` is the source of one PE class (it may start with its own
    imports); the file's ``graph`` connects ``Numbers`` to it, so their ids
    are ``Numbers0`` and the class name followed by 1.
    """
    stage = textwrap.dedent(stage).strip("\n")
    found = re.search(r"^class (\w+)", stage, re.MULTILINE)
    assert found is not None, "numbers_flow() takes the source of a PE class"
    return (
        f'{_NUMBERS}\n{stage}\n\n\ngraph = WorkflowGraph()\ngraph.connect(Numbers(), "output", {found[1]}(), "input")\n'
    )


# A workflow file that runs as long as its input: every number times 10 (PE ids Numbers0, Times101).
TIMES10_FLOW = numbers_flow(
    """
    class Times10(IterativePE):
        def process_item(self, item):
            return item * 10
    """
)


# A workflow file that says on stderr each time it is imported: once in all, when multi forks its workers
# (spawned ones import it again); every number times 10 (PE ids Numbers0, Times101).
IMPORTED = "the workflow module is imported"
SAYS_ITS_IMPORTS_FLOW = numbers_flow(
    f"""
    import sys

    print({IMPORTED!r}, file=sys.stderr, flush=True)


    class Times10(IterativePE):
        def process_item(self, item):
            return item * 10
    """
)


# A workflow file whose PE leaves a thread running that never ends (as a library may) and prints each item.
LINGERING_FLOW = numbers_flow(
    """
    import threading

    class Lingering(IterativePE):
        def preprocess(self):
            threading.Thread(target=threading.Event().wait).start()  # never ends

        def process_item(self, item):
            print(f"processing {item}")  # one write: whole even if another process writes too
            return item
    """
)


def recorded_supervisors(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[Supervisor]]:
    """A weak reference to every :class:`Supervisor` that runs from now on (as the list fills): the test
    can tell whether an ended attempt of a run was let go."""
    supervisors: list[weakref.ref[Supervisor]] = []
    supervise = Supervisor.run

    async def recorded(self: Supervisor) -> list[InstanceStats]:
        supervisors.append(weakref.ref(self))
        return await supervise(self)

    monkeypatch.setattr(Supervisor, "run", recorded)
    return supervisors


# A workflow as a notebook defines it: everything in __main__ (a PE class, a function PE, a group-by key
# function and an item class), run on each mapping named on the command line after the simple mapping. Each
# prints one JSON line: whether its results equal the simple mapping's, whether every result is an instance of
# __main__'s Point (the launcher's class: the items went through the workers and back), and how many
# processes made them.
NOTEBOOK_FLOW = textwrap.dedent(
    """
    import dataclasses, json, os, sys, threading
    import aiod4p
    from aiod4p import FunctionPE, GenericPE, ProducerPE, WorkflowGraph, group_by
    from aiod4p.mappings.multi import MultiMapping
    from aiod4p import compat

    compat.install()
    from dispel4py.base import IterativePE as D4pIterativePE, ProducerPE as D4pProducerPE
    from dispel4py.workflow_graph import WorkflowGraph as D4pGraph

    threading.Thread(target=threading.Event().wait, daemon=True).start()  # as a notebook kernel's threads

    @dataclasses.dataclass(frozen=True, order=True)
    class Job:  # named as a class of aiod4p's MPI entry point, whose names a rank's __main__ held
        x: int
        y: int

    class Jobs(ProducerPE):
        def produce(self):
            for i in range(40):
                yield Job(i % 4, i)

    def shift(point):
        return Job(point.x, point.y + 100)

    def column(point):
        return point.x

    class Total(GenericPE):
        def __init__(self):
            super().__init__(inputs=[("input", group_by(key=column))], outputs=["output"], parallelism=2)
            self.totals = {}

        def process(self, inputs):
            point = inputs["input"]
            self.totals[point.x] = self.totals.get(point.x, 0) + point.y

        def postprocess(self):
            for x, total in self.totals.items():
                self.write("output", (Job(x, total), os.getpid()))

    def results(mapping, workers):
        graph = WorkflowGraph()
        graph.connect(Jobs(), "output", moved := FunctionPE(shift), "input")
        moved.parallelism = 2
        graph.connect(moved, "output", Total(), "input")
        return aiod4p.run(graph, mapping=mapping, workers=workers).data()

    class Seven(D4pProducerPE):  # dispel4py's PEs travel by the names of their classes
        def _process(self, inputs):
            return 7

    class Twice(D4pIterativePE):
        def _process(self, data):
            return 2 * data

    def dispel4py_results(mapping, workers):
        graph = D4pGraph()
        seven = Seven()
        graph.connect(seven, "output", Twice(), "input")
        return aiod4p.run(graph, {seven: 3}, mapping=mapping, workers=workers).data()

    if __name__ == "__main__":  # as a notebook's cells run (a script's spawned workers import it again)
        expected = sorted(point for point, _ in results("simple", 1))
        mappings = {"spawn": MultiMapping(start_method="spawn"), "fork": MultiMapping(start_method="fork")}
        for name in sys.argv[1:]:
            got = results(mappings.get(name, name), 2)
            print(json.dumps({
                "mapping": name,
                "same": sorted(point for point, _ in got) == expected,
                "points": all(isinstance(point, Job) for point, _ in got),
                "processes": len({pid for _, pid in got} - {os.getpid()}),
                "dispel4py": dispel4py_results(mappings.get(name, name), 2) == [14, 14, 14],
            }))
    """
)


def run_notebook_flow(*mappings: str, how: str = "python - < script", timeout: float = 60) -> list[dict[str, Any]]:
    """Run :data:`NOTEBOOK_FLOW` on ``mappings`` in a fresh interpreter (``how``: read from stdin, or
    ``"python -c"``, both leaving ``__main__`` without a file, as in a notebook; or ``"python script.py"``); its
    JSON lines (the objects it printed, one a line)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as directory:
        script = Path(directory, "script.py")
        script.write_text(NOTEBOOK_FLOW)
        command, stdin = {
            "python - < script": ([sys.executable, "-", *mappings], NOTEBOOK_FLOW),
            "python -c": ([sys.executable, "-c", NOTEBOOK_FLOW, *mappings], None),
            "python script.py": ([sys.executable, str(script), *mappings], None),
        }[how]
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr
    # Ray's driver may print its own notes to this stdout (an autoscaler tip when an actor waits for a CPU).
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def add_graph(combined: WorkflowGraph, graph: WorkflowGraph) -> None:
    """Add every PE and edge of ``graph`` (flattened) to ``combined``, keeping the PEs' ids: graphs run
    side by side as one workflow, a launch for all of them."""
    flat = graph.flatten()
    for pe in flat.pes.values():
        combined.add(pe)
    for edge in flat.edges:
        combined.connect(
            flat.pes[edge.source], edge.source_port, flat.pes[edge.dest], edge.dest_port, grouping=edge.grouping
        )
