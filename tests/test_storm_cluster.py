"""The storm mapping on a real Apache Storm: ZooKeeper, Nimbus and a Supervisor from Maven Central.

The cluster is the one ``scripts/storm-cluster start`` runs (``.ci/run`` starts it before the
suite); when none answers, the module starts it and stops it at the end. Under CI, a cluster that
cannot start fails these tests; they are skipped only outside CI on a machine without Java.
A submission costs seconds and each Storm task is a Python process: the workflows whose results
are compared with another mapping's run side by side in one shared topology (:func:`shared_run`),
and every other test submits one topology of a few tasks, beside the others (:func:`side_by_side`).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import storm_workflows
import test_differential as differential
import workflows
from helpers import add_graph
from test_differential import dispel4py_hook  # noqa: F401 - a fixture

import aiod4p
from aiod4p import ALL, GLOBAL, SHUFFLE, WorkflowGraph, group_by
from aiod4p.errors import WorkerDied
from aiod4p.mappings.storm import StormMapping
from aiod4p.storm._cluster import Cluster, probe
from aiod4p.storm._cluster import nimbus as nimbus_client

ROOT = Path(__file__).resolve().parents[1]
NIMBUS = f"127.0.0.1:{os.environ.get('STORM_NIMBUS_PORT', '6627')}"
SUBMISSION = 300  # seconds for one test: a topology submission, and the cluster's start for the first

pytestmark = [pytest.mark.timeout(SUBMISSION), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _ready() -> bool:
    host, port = NIMBUS.split(":")
    try:
        probe(Cluster(host, int(port), "tests"))
    except aiod4p.errors.MappingUnavailable:
        return False
    return True


@pytest.fixture(scope="module")
def nimbus() -> Iterator[str]:
    """``HOST:PORT`` of a running Storm cluster's Nimbus."""
    if _ready():
        yield NIMBUS
        return
    if shutil.which("java") is None and not os.environ.get("CI"):
        pytest.skip("no java on this machine (scripts/setup --dev installs it)")
    script = ROOT / "scripts" / "storm-cluster"
    started = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=SUBMISSION)
    try:
        if started.returncode != 0:
            pytest.fail(f"scripts/storm-cluster start failed:\n{started.stdout}\n{started.stderr}")
        yield NIMBUS
    finally:
        subprocess.run([str(script), "stop"], capture_output=True, timeout=120)


def cli(*args: str, timeout: float = SUBMISSION) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "aiod4p", "run", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def multiset(items: list[Any]) -> Counter[str]:
    return Counter(json.dumps(item, sort_keys=True) for item in items)


# -- a topology a test, side by side -----------------------------------------------------------------
# A test with a topology of its own spends seconds waiting on Storm (Nimbus's next assignment round, the
# Supervisor's slot, a worker JVM starting, the slot freed after a kill), little of it on a CPU: those tests
# run side by side, SIDE_BY_SIDE at a time on the cluster's four worker slots, each test waiting for its own.

SIDE_BY_SIDE = 3
Scenario = Callable[[str], None]
SCENARIOS: dict[str, Scenario] = {}


def side_by_side(scenario: Scenario) -> Callable[[dict[str, concurrent.futures.Future[None]]], None]:
    """The test ``scenario(nimbus)``, run beside the others (:func:`scenarios`): the test fails as it fails."""
    SCENARIOS[scenario.__name__] = scenario

    def test(scenarios: dict[str, concurrent.futures.Future[None]]) -> None:
        scenarios[scenario.__name__].result(timeout=SUBMISSION)

    test.__doc__ = scenario.__doc__
    return test


@pytest.fixture(scope="module")
def scenarios(nimbus: str) -> Iterator[dict[str, concurrent.futures.Future[None]]]:
    """Every side-by-side test of the module, started at once in the order of the module; waited for at its end."""
    with concurrent.futures.ThreadPoolExecutor(SIDE_BY_SIDE, thread_name_prefix="storm-test") as pool:
        yield {name: pool.submit(scenario, nimbus) for name, scenario in SCENARIOS.items()}


# -- the command line ------------------------------------------------------------------------------


@side_by_side
def test_wordcount_from_the_cli_prints_the_counts_of_simple(nimbus: str) -> None:
    storm = cli("examples/wordcount.py", "--mapping", "storm", "--nimbus", nimbus, "-n", "2", "--results", "-")
    assert storm.returncode == 0, storm.stderr
    simple = cli("examples/wordcount.py", "--mapping", "simple", "--results", "-")
    records = [json.loads(line) for line in storm.stdout.splitlines()]
    assert multiset(records) == multiset([json.loads(line) for line in simple.stdout.splitlines()])
    assert records


@side_by_side
def test_a_pe_exception_fails_the_run_naming_the_pe(nimbus: str) -> None:
    done = cli("tests/storm_workflows.py:failing", "--mapping", "storm", "--nimbus", nimbus, "-i", "5")
    assert done.returncode == 1
    # Storm failed the tuple, its spout replayed it three times, then the run failed with the PE's error.
    assert "PE Fail" in done.stderr and "bad item 3" in done.stderr, done.stderr
    assert done.stderr.count("Storm fails the tuple; its spout replays it") == 4, done.stderr


@side_by_side
def test_an_item_that_cannot_cross_storm_fails_the_run_without_replays(nimbus: str) -> None:
    done = cli("tests/storm_workflows.py:unencodable", "--mapping", "storm", "--nimbus", nimbus, "-i", "5")
    assert done.returncode == 1
    assert "Unencodable" in done.stderr and "cannot cross Storm: item is a lock" in done.stderr, done.stderr
    assert "Storm fails the tuple; its spout replays it" not in done.stderr, done.stderr


@side_by_side
def test_a_package_next_to_the_workflow_file_travels_to_the_workers(nimbus: str) -> None:
    """``flow.py`` beside its own package ``user_lib/`` (``__init__.py``, ``filters.py`` importing ``.util``), which
    it imports: the package travels to the workers whole, as a single module next to it does (every task failed
    with ``No module named 'user_lib'``), and an error in it names the user's file, not the copy Storm ran."""
    with tempfile.TemporaryDirectory(prefix="aiod4p-storm-package-") as tmp:
        flow = Path(tmp).resolve()
        package = flow / "user_lib"
        package.mkdir()
        (package / "__init__.py").write_text("from .filters import Shout\n")
        (package / "util.py").write_text(
            "def shout(word):\n    if word == 'bad':\n        raise ValueError('no bad words')\n"
            "    return word.upper() + '!'\n"
        )
        (package / "filters.py").write_text(
            "from aiod4p import IterativePE\n\nfrom .util import shout\n\n\nclass Shout(IterativePE):\n"
            "    def process_item(self, word):\n        return shout(word)\n"
        )
        (flow / "flow.py").write_text(
            "from aiod4p import ProducerPE, WorkflowGraph\nfrom user_lib.filters import Shout\n\n\n"
            "class Words(ProducerPE):\n    def __init__(self, words):\n        super().__init__()\n"
            "        self.words = words\n\n    def produce(self):\n        yield from self.words\n\n\n"
            "good, bad = WorkflowGraph(), WorkflowGraph()\n"
            "good.connect(Words(['a', 'b', 'c']), 'output', Shout(), 'input')\n"
            "bad.connect(Words(['bad']), 'output', Shout(), 'input')\n"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # aiod4p, not the workflow's directory

        def run(graph: str) -> subprocess.CompletedProcess[str]:
            command = ["run", f"flow.py:{graph}", "--mapping", "storm", "--nimbus", nimbus, "--results", "-"]
            return subprocess.run(
                [sys.executable, "-m", "aiod4p", *command],
                cwd=flow,
                env=env,
                capture_output=True,
                text=True,
                timeout=SUBMISSION,
            )

        done = run("good")
        assert done.returncode == 0, done.stderr
        assert sorted(json.loads(line)["data"] for line in done.stdout.splitlines()) == ["A!", "B!", "C!"]
        failed = run("bad")
        assert failed.returncode == 1, failed.stderr
        assert f"no bad words ({package / 'util.py'}, line 3, in shout" in failed.stderr, failed.stderr


@side_by_side
def test_a_failed_root_gives_the_results_of_what_it_produced_before(nimbus: str) -> None:
    """A source that raises after yielding 200 items: the run fails with its error, carrying the results of those
    items (``aiod4p run`` prints them), as on the other mappings; the run had killed the topology while they were
    on their way, and gave none."""
    graph = WorkflowGraph()
    graph.connect(workflows.StopsEarly(200), "output", workflows.Double(), "input")
    with pytest.raises(aiod4p.errors.PEError, match="failed on feed: StopIteration") as failed:
        aiod4p.run(graph, mapping=StormMapping(nimbus=nimbus, name="root_fails"), workers=2)
    assert failed.value.partial_results is not None
    assert sorted(failed.value.partial_results.data()) == [2 * n for n in range(200)]


def interrupted(target: str, nimbus: str, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``aiod4p run TARGET --mapping storm --results -``, to be sent SIGINT by the test."""
    command = [sys.executable, "-m", "aiod4p", "run", target, *options]
    command += ["--mapping", "storm", "--nimbus", nimbus, "--results", "-"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(stream: IO[str] | None, text: str) -> str:
    """The lines of ``stream`` up to the first that contains ``text`` (or to its end)."""
    assert stream is not None
    said = ""
    for line in stream:
        said += line
        if text in line:
            break
    return said


def finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of the drained run's stdout and stderr; a run that outlives the test is aborted.

    Read through the file objects, not by communicate(), which reads the pipes underneath them and
    would miss what an earlier readline() left in their buffers.
    """
    assert process.stdout is not None and process.stderr is not None
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        out, err = pool.submit(process.stdout.read), pool.submit(process.stderr.read)
        return out.result(timeout=SUBMISSION / 2), err.result(timeout=SUBMISSION / 2)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # a second signal aborts, still killing the topology
        process.wait(timeout=60)
        pool.shutdown(wait=True)
        process.stdout.close()
        process.stderr.close()


def drained_ticks(lines: list[str]) -> list[int]:
    """The ticks of a drained endless() run, checking that SumAtEnd's postprocess totalled them."""
    records = [json.loads(line) for line in lines]
    ticks = [r["data"] for r in records if r["output"] == "output"]
    assert [r["data"] for r in records if r["output"] == "total"] == [sum(ticks)]
    return ticks


@side_by_side
def test_a_live_source_drains_on_sigint(nimbus: str) -> None:
    process = interrupted("tests/storm_workflows.py:endless", nimbus)
    assert process.stdout is not None
    first = process.stdout.readline()  # the topology runs: results stream back
    process.send_signal(signal.SIGINT)
    out, err = finish(process)
    assert process.returncode == 0, err
    # Deactivated, the spout stopped its source; every tick it had produced went through once
    # (a timer skips the ticks it missed under load), and SumAtEnd's postprocess ran on the drained stream.
    ticks = drained_ticks([first, *out.splitlines()])
    assert len(set(ticks)) == len(ticks) > 0


class GateKeeper:
    """The test's end of :class:`storm_workflows.Gate`: holds every task that connects until :meth:`open`."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.arrived = threading.Event()  # a task waits at the gate: the topology was submitted
        self.opened = False
        self.waiting: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, name="gate", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return  # closed
            with self.lock:
                if self.opened:
                    connection.sendall(b"x")
                    connection.close()
                    continue
                self.waiting.append(connection)
            self.arrived.set()

    def open(self) -> None:
        with self.lock:
            self.opened = True
            for connection in self.waiting:
                connection.sendall(b"x")
                connection.close()
            self.waiting.clear()

    def close(self) -> None:
        self.open()
        self.server.close()


@side_by_side
def test_a_signal_before_every_task_has_started_drains_the_run(nimbus: str) -> None:
    # Every task waits at the gate before it says hello to the run: the signal comes before any has.
    gate = GateKeeper()
    process = interrupted(
        "tests/storm_workflows.py:gated", nimbus, env={**os.environ, storm_workflows.GATE_ADDRESS: gate.address}
    )
    try:
        assert gate.arrived.wait(SUBMISSION / 2), "no Storm task reached the gate"
        process.send_signal(signal.SIGINT)
        said = read_until(process.stderr, "SIGINT")  # what the run does with the signal (or its end)
        gate.open()
        out, err = finish(process)
    finally:
        gate.close()
    assert process.returncode == 0, said + err
    # Deactivated as soon as every task ran: the run still ended through SumAtEnd's postprocess.
    drained_ticks(out.splitlines())


@side_by_side
def test_a_signal_during_the_submission_drains_the_run(nimbus: str) -> None:
    process = interrupted("tests/storm_workflows.py:endless", nimbus, "-v")
    said = read_until(process.stderr, "submitting topology")  # sparse submit now takes seconds, in a thread
    process.send_signal(signal.SIGINT)
    out, err = finish(process)
    assert process.returncode == 0, said + err
    drained_ticks(out.splitlines())
    # The submission ended, the topology ran, was drained, and was killed before the command exited.
    name = said.split("submitting topology ", 1)[1].split()[0]
    host, port = nimbus.split(":")
    with nimbus_client(Cluster(host, int(port), "tests")) as client:
        left = {t.name: t.status for t in client.getClusterInfo().topologies or [] if t.name == name}
    assert left in ({}, {name: "KILLED"}), left


@side_by_side
def test_the_topology_of_a_killed_run_is_killed_by_its_spout(nimbus: str) -> None:
    """A run killed outright (SIGKILL) kills nothing; its spout finds the run gone and kills the topology, at the
    Nimbus its Storm configuration names."""
    process = interrupted("tests/storm_workflows.py:endless", nimbus, "-v")
    try:
        said = read_until(process.stderr, "submitting topology")
        name = said.split("submitting topology ", 1)[1].split()[0]
        assert process.stdout is not None
        assert process.stdout.readline(), said  # the topology runs: results stream back
    finally:
        process.kill()
        process.wait(timeout=60)
        for stream in (process.stdout, process.stderr):
            assert stream is not None
            stream.close()
    host, port = nimbus.split(":")
    deadline = time.monotonic() + SUBMISSION / 2
    while True:
        with nimbus_client(Cluster(host, int(port), "tests")) as client:
            left = {t.name: t.status for t in client.getClusterInfo().topologies or [] if t.name == name}
        if left in ({}, {name: "KILLED"}):
            break
        assert time.monotonic() < deadline, f"the topology of the killed run still runs: {left}"
        time.sleep(0.5)  # ok-sleep: polling Nimbus


# -- the Python API: many workflows in one topology ------------------------------------------------

# dispel4py's runnable examples in the shared topology (see test_differential.RUNNABLE): every one of
# them, each run with the -i its differential test gives it.
DISPEL4PY = tuple(differential.RUNNABLE)


def groupings() -> WorkflowGraph:
    """One source feeding every grouping, a fan-out/fan-in, a composite, a postprocess total, and Flaky."""
    graph = WorkflowGraph()
    count, tag = workflows.Count(), workflows.Tag()
    graph.connect(count, "output", tag, "input")
    for grouping, parallelism in ((group_by(0), 2), (ALL, 2), (GLOBAL, 1), (SHUFFLE, 2)):
        who = workflows.WhoSawWhat(grouping, parallelism)
        who.id = f"who_{getattr(grouping, 'name', None) or type(grouping).__name__.lower()}"
        graph.connect(tag, "output", who, "input")
    double, merge = workflows.Double(), workflows.Merge()
    graph.connect(count, "output", double, "input")
    graph.connect(double, "output", merge, "left")
    graph.connect(tag, "output", merge, "right")
    graph.connect(count, "output", workflows.SumAtEnd(), "input")
    composite = workflows.chain(workflows.Double(), workflows.lambda_free_increment)
    graph.connect(count, "output", composite, "input")
    return graph


def examples() -> WorkflowGraph:
    """Two bundled examples side by side."""
    graph = WorkflowGraph()
    for name in ("split_merge", "async_io"):
        add_graph(graph, aiod4p.load_graph(str(ROOT / "examples" / f"{name}.py")))
    return graph


def by_class(results: dict[tuple[str, str], list[Any]], graph: WorkflowGraph) -> dict[tuple[str, str], list[Any]]:
    """``graph``'s results by (PE id for WhoSawWhat, else class name) and port: ids differ between two builds."""
    pes = graph.flatten().pes
    grouped: dict[tuple[str, str], list[Any]] = {}
    for (pe, port), items in results.items():
        if pe in pes:
            name = pe if pe.startswith("who_") else type(pes[pe]).__name__
            grouped.setdefault((name, port), []).extend(items)
    return grouped


class Shared:
    """The one run of :func:`shared_run`: its parts' graphs, its results by (PE id, port), the mapping."""

    def __init__(self) -> None:
        self.groupings, self.examples = groupings(), examples()
        # Equal keys of four number types (not JSON but float): one task each, as on every mapping.
        self.keys = workflows.mixed_number_keys(float, np.float32, Fraction, Decimal)
        # Flaky has a source of its own: a replayed tuple reaches every subscriber of its stream again.
        self.flaky = storm_workflows.Flaky()
        self.groupings.connect(workflows.Count(), "output", self.flaky, "input")
        self.dispel4py: dict[str, WorkflowGraph] = {}
        self.results: dict[tuple[str, str], list[Any]] = {}
        self.mapping: StormMapping | None = None


_SHARED: list[Shared] = []


def shared_run(
    nimbus: str, monkeypatch: pytest.MonkeyPatch, scenarios: dict[str, concurrent.futures.Future[None]]
) -> Shared:
    """groupings(), examples() and dispel4py's examples as one topology, run once for the tests that read it.

    A submission costs seconds, and each Storm task is a Python process: one
    topology of about a hundred tasks costs less than a topology per test. It runs once the side-by-side tests
    have ended, which would compete with its hundred tasks for the CPUs.
    """
    if _SHARED:
        return _SHARED[0]
    concurrent.futures.wait(scenarios.values())
    shared = Shared()
    combined = WorkflowGraph()
    inputs: dict[str, Any] = {}
    for part, count in ((shared.groupings, 10), (shared.examples, 5), (shared.keys, 10)):
        add_graph(combined, part)
        inputs.update(dict.fromkeys(part.flatten().roots(), count))
    if differential.D4P_PYTHON.exists():
        for name in DISPEL4PY:
            iterations = differential.RUNNABLE[name]
            path = str(differential.example(name))
            monkeypatch.setattr(sys, "argv", differential.cli_argv(path, iterations))
            graph = shared.dispel4py[name] = aiod4p.load_graph(path)
            for pe in graph.flatten().pes.values():
                if hasattr(pe, "delay"):
                    pe.delay = 0.01  # delayed_pipeline: its results do not depend on the delay
            add_graph(combined, graph)
            inputs.update(dict.fromkeys(graph.flatten().roots(), iterations))
    # About a hundred Python tasks start at once on two shared cores: Storm's default 30 s for a task's first
    # heartbeat is not always enough there, nor for a tuple's tree (a tuple timed out fails the run).
    conf = {
        "topology.max.spout.pending": 64,
        "topology.subprocess.timeout.secs": 120,
        "topology.message.timeout.secs": 300,
    }
    shared.mapping = StormMapping(nimbus=nimbus, name="shared", conf=conf)
    shared.results = aiod4p.run(combined, inputs, mapping=shared.mapping).by_port()
    _SHARED.append(shared)
    return shared


@pytest.mark.usefixtures("dispel4py_hook")
def test_groupings_and_workflows_give_the_results_of_simple(
    nimbus: str, monkeypatch: pytest.MonkeyPatch, scenarios: dict[str, concurrent.futures.Future[None]]
) -> None:
    shared = shared_run(nimbus, monkeypatch, scenarios)
    got = by_class(shared.results, shared.groupings)
    simple_graph = groupings()
    expected = by_class(aiod4p.run(simple_graph, 10, mapping="simple").by_port(), simple_graph)

    # At-least-once: the multiples of 3 failed once, were replayed by the spout, and came out once.
    assert sorted(got.pop(("Flaky", "output"))) == [(n, n % 3 == 0) for n in range(10)]
    assert set(got) == set(expected)
    for key, items in expected.items():
        if not key[0].startswith("who_"):
            assert multiset(got[key]) == multiset(items), key
            continue
        # Instances differ between mappings; what each grouping promises does not.
        seen, instances = [item for _, item in got[key]], {instance for instance, _ in got[key]}
        plain = [item for _, item in items]
        if key[0] == "who_all":
            assert multiset(seen) == multiset(plain * 2) and instances == {0, 1}
            continue
        assert multiset(seen) == multiset(plain), key
        if key[0] == "who_global":
            assert instances == {0}
        if key[0] == "who_groupby":
            owners: dict[int, set[int]] = {}
            for instance, (group, _) in got[key]:
                owners.setdefault(group, set()).add(instance)
            assert all(len(owner) == 1 for owner in owners.values()), owners

    # What Nimbus ran: the plan's parallelism hints, groupings and back-pressure setting.
    assert shared.mapping is not None
    facts = shared.mapping.facts
    assert facts["conf"]["topology.max.spout.pending"] == 64
    bolts = facts["topology"].bolts
    hints = {name: bolt.common.parallelism_hint for name, bolt in bolts.items() if name.startswith("who_")}
    assert hints == {"who_groupby": 2, "who_all": 2, "who_global": 1, "who_shuffle": 2}
    kinds = {
        name: {
            kind
            for stream, grouping in bolt.common.inputs.items()
            if stream.streamId != "aiod4p_eos"
            for kind in ("shuffle", "fields", "all", "none", "direct", "local_or_shuffle")
            if getattr(grouping, kind, None) is not None
        }
        for name, bolt in bolts.items()
    }
    assert kinds["who_all"] == {"all"} and kinds["who_shuffle"] == {"shuffle"}
    assert kinds["who_groupby"] == {"fields"} and kinds[shared.flaky.id] == {"fields"}
    # Storm's global grouping is a fields grouping on no field; group_by(0) groups on the key field.
    fields = {
        name: [g.fields for s, g in bolt.common.inputs.items() if g.fields is not None] for name, bolt in bolts.items()
    }
    assert fields["who_global"] == [[]] and fields["who_groupby"] == [["key_0"]]


@pytest.mark.usefixtures("dispel4py_hook")
def test_the_examples_give_the_results_of_async(
    nimbus: str, monkeypatch: pytest.MonkeyPatch, scenarios: dict[str, concurrent.futures.Future[None]]
) -> None:
    # async, not simple: like Storm it runs the instances the examples ask for (split_merge's Monitor has 2).
    shared = shared_run(nimbus, monkeypatch, scenarios)
    got = by_class(shared.results, shared.examples)
    async_graph = examples()
    expected = by_class(aiod4p.run(async_graph, 5, mapping="async").by_port(), async_graph)
    assert set(got) == set(expected)
    for key, items in expected.items():
        if key[0] != "Elapsed":  # async_io's wall time
            assert multiset(got[key]) == multiset(items), key


def test_equal_keys_of_every_number_type_meet_in_one_task(
    nimbus: str, monkeypatch: pytest.MonkeyPatch, scenarios: dict[str, concurrent.futures.Future[None]]
) -> None:
    """Storm grouped by the Java value of a key's JSON: ``1`` and ``1.0`` (a Long, a Double) went to two tasks,
    and a key JSON cannot carry (a Fraction, a Decimal) failed the run."""
    shared = shared_run(nimbus, monkeypatch, scenarios)
    (sink,) = (pe.id for pe in shared.keys.flatten().pes.values() if isinstance(pe, workflows.WhoSawWhat))
    seen = shared.results[(sink, "output")]
    owners: dict[float, set[int]] = {}
    for instance, (key, _) in seen:
        owners.setdefault(float(key), set()).add(instance)
    assert len(seen) == 40 and sorted(owners) == [key + 0.5 for key in range(10)]
    assert all(len(owner) == 1 for owner in owners.values()), owners


@side_by_side
def test_seismic_from_the_cli_gives_the_results_of_simple(nimbus: str) -> None:
    """Its traces hold numpy arrays, which JSON cannot carry: it failed at its first trace."""
    small = ["-d", json.dumps({"Synthesise": [{"stations": 3, "seconds": 120}]}), "--results", "-"]
    storm = cli("examples/science/seismic.py", "--mapping", "storm", "--nimbus", nimbus, *small)
    assert storm.returncode == 0, storm.stderr
    simple = cli("examples/science/seismic.py", "--mapping", "simple", *small)
    records = sorted(json.loads(line)["data"] for line in storm.stdout.splitlines())
    assert records == sorted(json.loads(line)["data"] for line in simple.stdout.splitlines())
    assert [record[:2] for record in records] == [["ST000", "ST001"], ["ST000", "ST002"], ["ST001", "ST002"]]


# -- dispel4py's own examples, unchanged -----------------------------------------------------------


@pytest.mark.skipif(not differential.D4P_PYTHON.exists(), reason="dispel4py 1.2.1 is not installed")
@pytest.mark.usefixtures("dispel4py_hook")
def test_dispel4py_examples_give_the_results_of_dispel4py(
    nimbus: str, monkeypatch: pytest.MonkeyPatch, scenarios: dict[str, concurrent.futures.Future[None]]
) -> None:
    shared = shared_run(nimbus, monkeypatch, scenarios)
    for name in DISPEL4PY:
        graph = shared.dispel4py[name]
        fresh = differential.fresh_ids(graph)
        got = {(fresh[pe], port): items for (pe, port), items in shared.results.items() if pe in fresh}
        expected = differential.dispel4py_simple(
            str(differential.example(name)), iterations=differential.RUNNABLE[name]
        )
        # Storm runs the instances numprocesses asks for, as the process mappings do.
        differential.check_example(name, got, expected, differential.BROADCAST.get(name, 1))


@side_by_side
def test_a_pe_call_past_the_subprocess_timeout_fails_the_run_saying_what_storm_reported(nimbus: str) -> None:
    """Storm stops the worker of a task silent past topology.subprocess.timeout.secs, and with it every task:
    the run says why, as Nimbus reported it (it named only a stopped task, whose worker 'another of its tasks died'
    had shut down)."""
    mapping = StormMapping(nimbus=nimbus, name="stuck", conf={"topology.subprocess.timeout.secs": 5})
    # Nimbus may list another error of the component first (`Pipe to subprocess seems to be broken!`, the stopped
    # worker's other side): the timeout is among what it reports.
    reason = r"; Nimbus reports: (.*; )?Stuck\d*: java.lang.RuntimeException: subprocess heartbeat timeout"
    with pytest.raises(WorkerDied, match=rf"was stopped by its Storm worker .*{reason}"):
        aiod4p.run(storm_workflows.stuck(), 5, mapping=mapping)


@side_by_side
def test_a_dead_worker_fails_the_run(nimbus: str) -> None:
    # Instance 1 of FailsOnInstance kills its own process (the Python side of a Storm task).
    graph = workflows.mpi_killed()
    with pytest.raises(WorkerDied, match=r"the Storm task of PE FailsOnInstance\d*\[1\].*exited"):
        aiod4p.run(graph, 10, mapping=StormMapping(nimbus=nimbus, name="killed"), workers=2)
