"""The storm mapping on a real Apache Storm: ZooKeeper, Nimbus and a Supervisor from Maven Central.

The cluster is the one ``scripts/storm-cluster start`` runs (``.ci/run`` starts it before the
suite); when none answers, the module starts it and stops it at the end. Under CI, a cluster that
cannot start fails these tests; they are skipped only outside CI on a machine without Java.
Each test submits one topology (a submission costs seconds), so related workflows share one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import storm_workflows
import test_differential as differential
import workflows
from test_differential import dispel4py_hook  # noqa: F401 - a fixture

import aiod4p
from aiod4p import ALL, GLOBAL, SHUFFLE, WorkflowGraph, group_by
from aiod4p.errors import WorkerDied
from aiod4p.mappings.storm import StormMapping
from aiod4p.storm._cluster import Cluster, probe

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


# -- the command line ------------------------------------------------------------------------------


def test_wordcount_from_the_cli_prints_the_counts_of_simple(nimbus: str) -> None:
    storm = cli("examples/wordcount.py", "--mapping", "storm", "--nimbus", nimbus, "-n", "2", "--results", "-")
    assert storm.returncode == 0, storm.stderr
    simple = cli("examples/wordcount.py", "--mapping", "simple", "--results", "-")
    records = [json.loads(line) for line in storm.stdout.splitlines()]
    assert multiset(records) == multiset([json.loads(line) for line in simple.stdout.splitlines()])
    assert records


def test_a_pe_exception_fails_the_run_naming_the_pe(nimbus: str) -> None:
    done = cli("tests/storm_workflows.py:failing", "--mapping", "storm", "--nimbus", nimbus, "-i", "5")
    assert done.returncode == 1
    # Storm failed the tuple, its spout replayed it three times, then the run failed with the PE's error.
    assert "PE Fail" in done.stderr and "bad item 3" in done.stderr, done.stderr
    assert done.stderr.count("Storm fails the tuple; its spout replays it") == 4, done.stderr


def test_a_live_source_drains_on_sigint(nimbus: str) -> None:
    command = [sys.executable, "-m", "aiod4p", "run", "tests/storm_workflows.py:endless"]
    command += ["--mapping", "storm", "--nimbus", nimbus, "--results", "-"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())  # the topology runs: results stream back
        assert first["data"] >= 0
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=SUBMISSION / 2)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # a second signal aborts, still killing the topology
            process.communicate(timeout=60)
    assert process.returncode == 0, err
    records = [first] + [json.loads(line) for line in out.splitlines()]
    ticks = sorted(r["data"] for r in records if r["output"] == "output")
    totals = [r["data"] for r in records if r["output"] == "total"]
    # Deactivated, the spout stopped its source; every tick it had produced went through once
    # (a timer skips the ticks it missed under load), and SumAtEnd's postprocess ran on the drained stream.
    assert len(set(ticks)) == len(ticks) > 0
    assert totals == [sum(ticks)]


# -- the Python API: many workflows in one topology -------------------------------------------------


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


def by_class(results: aiod4p.Results, graph: WorkflowGraph) -> dict[tuple[str, str], list[Any]]:
    """Results by (PE id for WhoSawWhat, else class name) and port: ids differ between two builds."""
    pes = graph.flatten().pes
    grouped: dict[tuple[str, str], list[Any]] = {}
    for (pe, port), items in results.by_port().items():
        name = pe if pe.startswith("who_") else type(pes[pe]).__name__
        grouped.setdefault((name, port), []).extend(items)
    return grouped


def test_groupings_and_workflows_give_the_results_of_simple(nimbus: str) -> None:
    graph = groupings()
    # Flaky has a source of its own: a replayed tuple reaches every subscriber of its stream again.
    flaky = storm_workflows.Flaky()
    graph.connect(workflows.Count(), "output", flaky, "input")
    mapping = StormMapping(nimbus=nimbus, name="groupings", conf={"topology.max.spout.pending": 64})
    got = by_class(aiod4p.run(graph, 10, mapping=mapping), graph)
    simple_graph = groupings()
    expected = by_class(aiod4p.run(simple_graph, 10, mapping="simple"), simple_graph)

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
    facts = mapping.facts
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
    assert kinds["who_groupby"] == {"fields"} and kinds[flaky.id] == {"fields"}
    # Storm's global grouping is a fields grouping on no field; group_by(0) groups on the key field.
    fields = {
        name: [g.fields for s, g in bolt.common.inputs.items() if g.fields is not None] for name, bolt in bolts.items()
    }
    assert fields["who_global"] == [[]] and fields["who_groupby"] == [["key_0"]]


def test_the_examples_give_the_results_of_async(nimbus: str) -> None:
    # async, not simple: like Storm it runs the instances the examples ask for (split_merge's Monitor has 2).
    def examples() -> WorkflowGraph:
        graph = WorkflowGraph()
        for name in ("split_merge", "async_io"):
            flat = aiod4p.load_graph(str(ROOT / "examples" / f"{name}.py")).flatten()
            for edge in flat.edges:
                graph.connect(
                    flat.pes[edge.source], edge.source_port, flat.pes[edge.dest], edge.dest_port, grouping=edge.grouping
                )
        return graph

    storm_graph, async_graph = examples(), examples()
    got = by_class(aiod4p.run(storm_graph, 5, mapping=StormMapping(nimbus=nimbus, name="examples")), storm_graph)
    expected = by_class(aiod4p.run(async_graph, 5, mapping="async"), async_graph)
    assert set(got) == set(expected)
    for key, items in expected.items():
        if key[0] != "Elapsed":  # async_io's wall time
            assert multiset(got[key]) == multiset(items), key


def test_a_dead_worker_fails_the_run(nimbus: str) -> None:
    # Instance 1 of FailsOnInstance kills its own process (the Python side of a Storm task).
    graph = workflows.mpi_killed()
    with pytest.raises(WorkerDied, match=r"the Storm task of PE FailsOnInstance\d*\[1\].*exited"):
        aiod4p.run(graph, 10, mapping=StormMapping(nimbus=nimbus, name="killed"), workers=2)


# -- dispel4py's own examples, unchanged -----------------------------------------------------------

# A few of them, one topology: the features they cover, not all of them (a task is a Python process).
# Added last: two roots feeding one PE (multi_producer), a root's output teed (producer_tee), a diamond
# whose branches differ in length (loopcopy).
DISPEL4PY = (
    "pipeline_test",
    "grouping_onetoall",
    "grouping_alltoone",
    "teecopy",
    "split_merge",
    "multi_producer",
    "producer_tee",
    "loopcopy",
)


@pytest.mark.skipif(not differential.D4P_PYTHON.exists(), reason="dispel4py 1.2.1 is not installed")
@pytest.mark.usefixtures("dispel4py_hook")
def test_dispel4py_examples_give_the_results_of_dispel4py(nimbus: str, monkeypatch: pytest.MonkeyPatch) -> None:
    iterations = differential.ITERATIONS
    combined = WorkflowGraph()
    renames: dict[str, tuple[str, str]] = {}
    for name in DISPEL4PY:
        path = str(differential.example(name))
        monkeypatch.setattr(sys, "argv", differential.cli_argv(path, iterations))
        graph = aiod4p.load_graph(path)
        flat = graph.flatten()
        for pe in flat.pes.values():
            combined.add(pe)
        for edge in flat.edges:
            combined.connect(
                flat.pes[edge.source], edge.source_port, flat.pes[edge.dest], edge.dest_port, grouping=edge.grouping
            )
        renames.update({pe_id: (name, fresh) for pe_id, fresh in differential.fresh_ids(graph).items()})
    results = aiod4p.run(combined, iterations, mapping=StormMapping(nimbus=nimbus, name="dispel4py"))
    got: dict[str, dict[tuple[str, str], list[Any]]] = {name: {} for name in DISPEL4PY}
    for (pe_id, port), items in results.by_port().items():
        name, fresh = renames[pe_id]
        got[name][fresh, port] = items
    for name in DISPEL4PY:
        expected = differential.dispel4py_simple(str(differential.example(name)), iterations=iterations)
        assert set(got[name]) == set(expected), name
        copies = differential.BROADCAST.get(name, 1)  # Storm runs the instances numprocesses asks for
        for key, items in expected.items():
            assert differential.multiset(got[name][key]) == differential.multiset(items * copies), (name, key)
