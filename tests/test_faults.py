"""Property-based fault injection: random workflows hit by the faults a user or an operator meets.

The random DAGs, their PEs and the model of their results are tests/test_properties.py's. On them:

* one PE chosen at random fails (it raises in ``process()``, in its source's generator, in ``preprocess`` or
  in ``postprocess``; in ``process`` on an instance's k-th item, k random but within what some instance
  surely gets): every mapping fails the run with a :class:`PEError` naming that PE, within a deadline, and
  leaves no process, no temporary file and no ``/dev/shm`` file behind; the command line exits 1, saying so;
* a worker process of a multi run with checkpoints and ``restarts`` is SIGKILLed at a random moment (an
  instance's k-th item, or its pre- or postprocess): the results, read from Python and from the
  ``--results`` file, are the model's, each once;
* an embedded run (``aiod4p.start``, ``run_async`` as a task) is cancelled, drained or aborted at a random
  point: it ends within a deadline, leaves no task, thread or process behind, and the same graph then runs
  to the model's results.

The process mappings get few examples, each a union of several random DAGs with one fault: one launch each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import pytest
from conftest import MappingCase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray_cluster import RayCluster
from test_properties import (
    SETTINGS,
    Affine,
    Built,
    KeyedCount,
    LiveSource,
    Merge,
    Node,
    Source,
    Total,
    build,
    dags,
    model,
    multiset,
)

import aiod4p
from aiod4p import PEError, WorkflowGraph, make_plan
from aiod4p._checkpoint import Checkpointing
from aiod4p._pe import PE
from aiod4p._processes import descendants as processes_below

TESTS = Path(__file__).resolve().parent
MARK = "AIOD4P_FAULTS_MARK"
FAULT_SETTINGS: dict[str, Any] = {
    **SETTINGS,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}

SCALE = int(os.environ.get("AIOD4P_TEST_FAULT_SCALE", 1))
"""Examples of each test, as a multiple of the suite's few (a longer hunt: AIOD4P_TEST_FAULT_SCALE=20)."""


def examples(count: int) -> int:
    return count * SCALE


# -- the faults --------------------------------------------------------------------------------------------
class Boom(Exception):
    """What a faulty PE raises."""


@dataclass(frozen=True)
class Fault:
    """Where a PE fails, and how.

    Attributes:
        stage: ``"process"``, ``"preprocess"`` or ``"postprocess"``.
        at: in ``process``, the failing instance's ``at``-th item (a source: the ``at``-th it would yield;
            one more than it yields: once it yielded them all).
        kill: a marker file: instead of raising, the first process to create it is SIGKILLed (a worker
            process: never the process whose id is ``spare``).
        spare: the test's own process.
        shm: a folder where the raising process writes the ``/dev/shm`` files it has mapped (an MPI rank's),
            which must be gone once the run has ended.
    """

    stage: str
    at: int = 1
    kill: str | None = None
    spare: int = 0
    shm: str | None = None


class Faulty:
    """Mixed into a PE class of test_properties: the fault ``self.fault`` strikes."""

    fault: Fault
    id: str | None
    faulty_items = 0  # this instance's items (an attribute of the instance once it counted one)

    def _item(self) -> None:
        self.faulty_items += 1
        if self.fault.stage == "process" and self.faulty_items == self.fault.at:
            self._strike("process")

    def _strike(self, stage: str) -> None:
        fault = self.fault
        if fault.kill is not None:
            if os.getpid() == fault.spare:
                return
            try:
                os.close(os.open(fault.kill, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # killed once already: this attempt goes on
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.shm is not None:
            mapped = sorted(set(re.findall(r"/dev/shm/\S+", Path("/proc/self/maps").read_text())))
            Path(fault.shm, str(os.getpid())).write_text("".join(f"{name}\n" for name in mapped))
        raise Boom(f"boom in {self.id} at {stage} {fault.at}")

    def preprocess(self) -> Any:
        if self.fault.stage == "preprocess":
            self._strike("preprocess")
        return super().preprocess()  # type: ignore[misc]

    def postprocess(self) -> Any:
        if self.fault.stage == "postprocess":
            self._strike("postprocess")
        return super().postprocess()  # type: ignore[misc]


class FaultySource(Faulty, Source):
    def produce(self) -> Iterator[int]:
        for item in super().produce():
            self._item()
            yield item
        self._item()


class FaultyLiveSource(Faulty, LiveSource):
    async def produce(self) -> AsyncIterator[int]:  # type: ignore[override]
        async for item in super().produce():
            self._item()
            yield item
        self._item()


class FaultyAffine(Faulty, Affine):
    def process_item(self, item: int) -> int:
        self._item()
        return super().process_item(item)


class FaultyAsyncAffine(Faulty, Affine):
    async def process_item(self, item: int) -> int:  # type: ignore[override]
        self._item()
        return super().process_item(item)


class FaultyKeyedCount(Faulty, KeyedCount):
    def process(self, inputs: dict[str, int]) -> None:
        self._item()
        super().process(inputs)


class FaultyAsyncKeyedCount(Faulty, KeyedCount):
    async def process(self, inputs: dict[str, int]) -> None:  # type: ignore[override]
        self._item()
        super().process(inputs)


class FaultyTotal(Faulty, Total):
    def process(self, inputs: dict[str, int]) -> None:
        self._item()
        super().process(inputs)


class FaultyAsyncTotal(Faulty, Total):
    async def process(self, inputs: dict[str, int]) -> None:  # type: ignore[override]
        self._item()
        super().process(inputs)


class FaultyMerge(Faulty, Merge):
    def process(self, inputs: dict[str, int]) -> dict[str, int]:
        self._item()
        return super().process(inputs)


class FaultyAsyncMerge(Faulty, Merge):
    async def process(self, inputs: dict[str, int]) -> dict[str, int]:  # type: ignore[override]
        self._item()
        return super().process(inputs)


FAULTY: dict[tuple[type[PE], bool], type[PE]] = {  # (class, whether async) -> its faulty class
    (Source, False): FaultySource,
    (LiveSource, False): FaultyLiveSource,
    (Affine, False): FaultyAffine,
    (KeyedCount, False): FaultyKeyedCount,
    (Total, False): FaultyTotal,
    (Merge, False): FaultyMerge,
    (Source, True): FaultyLiveSource,
    (LiveSource, True): FaultyLiveSource,
    (Affine, True): FaultyAsyncAffine,
    (KeyedCount, True): FaultyAsyncKeyedCount,
    (Total, True): FaultyAsyncTotal,
    (Merge, True): FaultyAsyncMerge,
}


@dataclass(frozen=True)
class Choice:
    """Which PE of a union of DAGs fails, and how: ``seed`` picks the item."""

    dag: int
    node: int
    stage: str
    seed: int
    threaded: bool  # its plain calls run in a thread
    asynchronous: bool  # its calls are async def (a source: an async generator)
    live: bool  # every source yields from an async generator
    batch_size: int
    credits: int

    @property
    def options(self) -> dict[str, int]:
        return {"batch_size": self.batch_size, "credits": self.credits}


@st.composite
def faulty_unions(draw: st.DrawFn, size: int) -> tuple[list[list[Node]], Choice]:
    """A union of 1 to ``size`` random DAGs (exactly ``size`` if ``size`` > 2), and where one of them fails."""
    dags_ = draw(st.lists(dags(), min_size=size if size > 2 else 1, max_size=size))
    dag = draw(st.sampled_from(range(len(dags_))))
    inner = [index for index, node in enumerate(dags_[dag]) if node.kind != "source"]
    node = draw(st.sampled_from(inner or [0]) if draw(st.integers(0, 4)) else st.sampled_from(range(len(dags_[dag]))))
    stage = draw(st.sampled_from(["process", "process", "process", "preprocess", "postprocess"]))
    seed, threaded, asynchronous, live = (
        draw(st.integers(0, 1 << 16)),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.booleans()),
    )
    batch_size, credits = draw(st.sampled_from([1, 4, 256])), draw(st.sampled_from([1, 2, 4]))
    return dags_, Choice(dag, node, stage, seed, threaded, asynchronous, live, batch_size, credits)


def arrivals(dag: list[Node], index: int, case: MappingCase) -> int:
    """The items that node ``index`` of ``dag`` receives on ``case``, in all, by test_properties' model: of the
    same DAG up to that node, made an affine node (an item out for each item in) of the same inputs."""
    probe = dataclasses.replace(dag[index], kind="affine", params=(1, 0))
    graph, built = build([[*dag[:index], probe]])
    probe_id = built[0].pes[index].id
    return sum(count for (pe, _), count in model(graph, built, case).items() if pe == probe_id)


@dataclass
class Armed:
    """A union of random DAGs built with one faulty PE."""

    graph: WorkflowGraph
    built: list[Built]
    target: PE
    fault: Fault
    options: dict[str, int]  # batch_size, credits

    @property
    def ports(self) -> set[str]:
        """The ports (or stages) a PEError of this fault may name."""
        if self.fault.stage != "process":
            return {self.fault.stage}
        if isinstance(self.target, Source):
            return {"feed"}
        return {"left", "right"} if isinstance(self.target, Merge) else {"input"}


def arm(dags_: list[list[Node]], choice: Choice, case: MappingCase, **how: Any) -> Armed:
    """Build ``dags_`` with the PE that ``choice`` names made faulty (``how``: :class:`Fault`'s other fields).

    In ``process``, it fails on an instance's k-th item, where k is at most the items its busiest instance gets
    (pigeonhole: at least the items it gets in all over its instances, rounded up), so that the fault strikes;
    a PE that gets no item fails in ``postprocess`` instead.
    """
    graph, built = build(dags_)
    target = built[choice.dag].pes[choice.node]
    node = dags_[choice.dag][choice.node]
    stage, at = choice.stage, 1
    if stage == "process":
        if node.kind == "source":
            bound = node.params[1] + 1  # the generator fails before its k-th item, or after its last one
        else:
            mapping = aiod4p.mappings.get_mapping(case.name)
            assert target.id is not None
            instances = make_plan(graph, mapping.plan_options(case.workers, 256, 4)).placement[target.id].parallelism
            bound = math.ceil(arrivals(dags_[choice.dag], choice.node, case) / instances)
        if bound:
            at = 1 + choice.seed % bound
        else:
            stage = "postprocess"
    fault = Fault(stage, at, **how)
    if choice.live:
        for pe in graph.pes:
            if type(pe) is Source:
                pe.__class__ = LiveSource
    target.__class__ = FAULTY[type(target), choice.asynchronous]
    target.fault = fault  # type: ignore[attr-defined]
    target.threaded = choice.threaded
    return Armed(graph, built, target, fault, choice.options)


# -- what a run leaves behind ------------------------------------------------------------------------------
GRACE = 10.0
"""Seconds a thread or task that a run started may take to end once the run has ended."""


def _stat(pid: str) -> list[str] | None:
    try:
        return Path("/proc", pid, "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants() -> set[int]:
    """The live processes below this one (but multiprocessing's resource tracker), from /proc."""
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    return processes_below({os.getpid()}) - {os.getpid(), tracker}


def marked(marker: str) -> set[int]:
    """The processes started (by an exec: a command line, mpiexec, an MPI rank) with ``marker`` in their
    environment, wherever they are now (an orphan has left this process's tree)."""
    found = set()
    needle = f"{MARK}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes() and (_stat(entry.name) or ["Z"])[0] != "Z":
                    found.add(int(entry.name))
    return found


class Leftovers:
    """What runs leave behind, as seen from this process: processes, files in the runs' temporary folder
    (``TMPDIR``, set for this process and those it starts), and ``/dev/shm`` files that an MPI rank had
    mapped when a PE raised in it."""

    def __init__(self, folder: Path) -> None:
        self.marker = uuid.uuid4().hex
        self.tmp = folder / "tmp"
        self.shm = folder / "shm"
        self.tmp.mkdir()
        self.shm.mkdir()
        self.before = descendants()
        self.threads = set(threading.enumerate())

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        saved = {name: os.environ.get(name) for name in (MARK, "TMPDIR")}
        os.environ.update({MARK: self.marker, "TMPDIR": str(self.tmp)})
        tempdir, tempfile.tempdir = tempfile.tempdir, str(self.tmp)
        try:
            yield
        finally:
            tempfile.tempdir = tempdir
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def check(self) -> None:
        """Nothing is left: every process a run started has ended, its files are gone, and every thread it
        started ends within :data:`GRACE` (a pool thread ends once its call returns, a moment after the run)."""
        deadline = time.monotonic() + GRACE
        for thread in set(threading.enumerate()) - self.threads:
            if thread.name.startswith("aiod4p"):  # its own threads' names (others: a library's, Ray's)
                thread.join(max(0.0, deadline - time.monotonic()))
                frame = sys._current_frames().get(thread.ident or 0)
                assert not thread.is_alive(), f"{thread} is still alive:\n{''.join(traceback.format_stack(frame))}"
        tracker = getattr(resource_tracker._resource_tracker, "_pid", None)  # multiprocessing's, for spawn
        processes = ((descendants() - self.before) | marked(self.marker)) - {tracker}
        assert not processes, {pid: Path("/proc", str(pid), "cmdline").read_bytes() for pid in processes}
        assert sorted(self.tmp.iterdir()) == []
        shm = {name for listing in self.shm.iterdir() for name in listing.read_text().split()}
        assert sorted(name for name in shm if os.path.exists(name)) == []
        for listing in self.shm.iterdir():
            listing.unlink()


@pytest.fixture
def leftovers(tmp_path: Path) -> Iterator[Leftovers]:
    left = Leftovers(tmp_path)
    with left.environment():
        yield left


# -- 1. a PE fails -----------------------------------------------------------------------------------------
DEADLINE = 30.0
"""Seconds a failing run may take to fail, start-up included (an MPI launch on a busy machine takes seconds)."""


async def _run_within(graph: WorkflowGraph, case: MappingCase, options: dict[str, int]) -> None:
    async with (
        asyncio.timeout(DEADLINE),
        aiod4p.start(graph, 1, mapping=case.name, workers=case.workers, **options) as run,
    ):
        await run.results()


def fails_naming_the_pe(armed: Armed, case: MappingCase, leftovers: Leftovers) -> None:
    """``armed`` fails on ``case`` with a PEError naming its faulty PE, within the deadline, leaving nothing."""
    with pytest.raises(PEError) as raised:
        asyncio.run(_run_within(armed.graph, case, armed.options))
    error = raised.value
    assert error.pe == armed.target.id, error
    assert error.port in armed.ports, error
    assert f"Boom: boom in {armed.target.id} at {armed.fault.stage}" in error.message, error
    leftovers.check()


IN_PROCESS = [MappingCase("simple", None), MappingCase("async", None), MappingCase("async", 3)]


@pytest.mark.parametrize("case", IN_PROCESS, ids=lambda case: case.id)
@settings(max_examples=examples(30), **FAULT_SETTINGS)
@given(union=faulty_unions(2))
def test_a_failing_pe_fails_the_run_in_process(
    case: MappingCase, union: tuple[list[list[Node]], Choice], leftovers: Leftovers
) -> None:
    dags_, choice = union
    fails_naming_the_pe(arm(dags_, choice, case), case, leftovers)


@pytest.mark.parametrize("name", ["multi", "mpi"])
@settings(max_examples=examples(3), **FAULT_SETTINGS)
@given(union=faulty_unions(6), workers=st.integers(2, 4))
def test_a_failing_pe_fails_the_run_across_processes(
    name: str, union: tuple[list[list[Node]], Choice], workers: int, leftovers: Leftovers
) -> None:
    if name == "mpi":
        pytest.importorskip("mpi4py")
    dags_, choice = union
    case = MappingCase(name, workers)
    fails_naming_the_pe(arm(dags_, choice, case, shm=str(leftovers.shm)), case, leftovers)


@settings(max_examples=examples(1), **FAULT_SETTINGS)
@given(union=faulty_unions(6))
def test_a_failing_pe_fails_the_run_on_ray(
    union: tuple[list[list[Node]], Choice], leftovers: Leftovers, ray_cluster: RayCluster
) -> None:
    """One launch, on the session's Ray cluster (conftest's ``ray_cluster``, which the ray mapping joins)."""
    dags_, choice = union
    case = MappingCase("ray", 2)
    fails_naming_the_pe(arm(dags_, choice, case), case, leftovers)


TARGET = """\
import json, sys
sys.path.insert(0, {tests!r})
from test_faults import faulty_graph

graph = faulty_graph(json.loads({spec!r}))
"""


def faulty_graph(spec: dict[str, Any]) -> WorkflowGraph:
    """The graph of a command line's workflow file: :func:`arm`'s, with the faulty PE called ``faulty``."""
    dags_ = [
        [Node(n["kind"], tuple(n["params"]), tuple(n["upstream"]), n["grouping"], n["parallelism"]) for n in dag]
        for dag in spec["dags"]
    ]
    armed = arm(dags_, Choice(**spec["choice"]), MappingCase(spec["mapping"], spec["workers"]))
    armed.target.id = "faulty"
    return armed.graph


@settings(max_examples=examples(1), **FAULT_SETTINGS)
@given(union=faulty_unions(6))
def test_a_failing_pe_makes_the_command_line_exit_1(
    union: tuple[list[list[Node]], Choice], leftovers: Leftovers, tmp_path: Path
) -> None:
    """``aiod4p run FLOW -m multi -n 3``: exit status 1, stderr names the PE; no worker process is left."""
    dags_, choice = union
    spec = {
        "dags": [[dataclasses.asdict(node) for node in dag] for dag in dags_],
        "choice": dataclasses.asdict(choice),
        "mapping": "multi",
        "workers": 3,
    }
    flow = tmp_path / "faulty_flow.py"
    flow.write_text(TARGET.format(tests=str(TESTS), spec=json.dumps(spec)))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "aiod4p", "run", str(flow), "-m", "multi", "-n", "3", "-i", "1", "-q"],
        capture_output=True,
        text=True,
        timeout=DEADLINE + 30,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert re.search(r"PE faulty\[\d+\] failed on .*Boom: boom in faulty at", done.stderr), done.stderr
    assert time.monotonic() - started < DEADLINE
    leftovers.check()


# -- 2. a worker process is SIGKILLed ----------------------------------------------------------------------
def _longer(dags_: list[list[Node]], times: int) -> list[list[Node]]:
    """``dags_`` with sources ``times`` as long: checkpoints complete before some kills."""
    return [
        [
            dataclasses.replace(node, params=(node.params[0], node.params[1] * times))
            if node.kind == "source"
            else node
            for node in dag
        ]
        for dag in dags_
    ]


@settings(max_examples=examples(3), **FAULT_SETTINGS)
@given(union=faulty_unions(6), workers=st.integers(2, 4))
def test_a_worker_killed_at_a_random_moment_restarts_to_the_models_results(
    union: tuple[list[list[Node]], Choice], workers: int, leftovers: Leftovers
) -> None:
    """multi -n 2..4 with checkpoints and restarts: the worker process of the chosen PE's instance dies (SIGKILL)
    on the instance's k-th item, or in its pre- or postprocess; the results are the model's, each once, from
    Python and in the results file."""
    dags_, choice = union
    case = MappingCase("multi", workers)
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        armed = arm(_longer(dags_, 10), choice, case, kill=str(directory / "killed"), spare=os.getpid())
        expected = model(armed.graph, armed.built, case)
        mapping = aiod4p.mappings.get_mapping("multi")
        results_file = directory / "results.jsonl"
        mapping.checkpointing = Checkpointing(
            directory / "ck", interval=0.02, restarts=2, results_path=str(results_file)
        )

        async def restarted() -> aiod4p.Results:
            async with (  # a run past the deadline is aborted (run_async would drain it)
                asyncio.timeout(DEADLINE),
                aiod4p.start(armed.graph, 1, mapping=mapping, workers=workers, **armed.options) as run,
            ):
                return await run.results()

        results = asyncio.run(restarted())
        assert (directory / "killed").exists(), "no worker was killed"
        assert multiset(results) == expected
        lines = results_file.read_text().splitlines()
        assert Counter((record["pe"], record["data"]) for record in map(json.loads, lines)) == expected
    leftovers.check()


# -- 3. an embedded run is cancelled -----------------------------------------------------------------------
async def _cancelled(graph: WorkflowGraph, case: MappingCase, how: str, after: int) -> None:
    """Run ``graph`` on ``case`` and stop it ``how``, ``after`` loop turns (``cancel``: cancel ``run_async``'s
    task, which drains; ``cancel twice``: abort) or ``after`` results (``aclose``: cancel the task iterating
    ``start()``; ``break``: leave that iteration); returns once it ended."""
    options: dict[str, Any] = {"mapping": case.name, "workers": case.workers}
    if how.startswith("cancel"):
        task = asyncio.create_task(aiod4p.run_async(graph, 1, **options))
        for _ in range(after):
            if task.done():
                break
            await asyncio.sleep(0)  # one turn of the loop: the run goes on meanwhile
        task.cancel()
        if how == "cancel twice":
            await asyncio.sleep(0)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return
    reached = asyncio.Event()

    async def iterate() -> None:
        async with aiod4p.start(graph, 1, **options) as run:
            seen = 0
            async for _ in run:
                seen += 1
                if seen >= after:
                    if how == "break":
                        break
                    reached.set()

    task = asyncio.create_task(iterate())
    waiter = asyncio.create_task(reached.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    task.cancel()
    await asyncio.gather(task, waiter, return_exceptions=True)


CANCELLED = [*IN_PROCESS, MappingCase("multi", 2)]


@pytest.mark.parametrize("case", CANCELLED, ids=lambda case: case.id)
@settings(max_examples=examples(12), **FAULT_SETTINGS)
@given(
    dags_=st.lists(dags(), min_size=1, max_size=3),
    how=st.sampled_from(["cancel", "cancel twice", "aclose", "break"]),
    after=st.integers(0, 60),
    threaded=st.booleans(),
)
def test_a_cancelled_embedded_run_leaves_nothing_and_the_graph_runs_again(
    case: MappingCase, dags_: list[list[Node]], how: str, after: int, threaded: bool, leftovers: Leftovers
) -> None:
    if case.name == "multi" and after > 3:
        after %= 4  # few launches: a few loop turns go by while the workers start
    graph, built = build(dags_)
    for pe in graph.pes:
        pe.threaded = threaded and not isinstance(pe, Source)
    expected = model(graph, built, case)

    async def cancelled() -> None:
        async with asyncio.timeout(DEADLINE):
            await _cancelled(graph, case, how, after)
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:  # a task cancelled as the run ended ends in the loop's next turns
                _, pending = await asyncio.wait(others, timeout=GRACE)
                assert not pending

    async def again() -> aiod4p.Results:
        async with asyncio.timeout(DEADLINE):
            return await aiod4p.run_async(graph, 1, mapping=case.name, workers=case.workers)

    asyncio.run(cancelled())
    leftovers.check()
    assert multiset(asyncio.run(again())) == expected
    leftovers.check()
