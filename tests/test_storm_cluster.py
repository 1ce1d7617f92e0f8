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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import storm_workflows
import workflows

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


def combined(flaky: bool = False) -> tuple[WorkflowGraph, dict[str, int], dict[str, str]]:
    """Several workflows side by side in one graph; returns it, its inputs, and each PE's label.

    ``flaky`` adds :func:`storm_workflows.flaky`, whose PE fails tuples (simple would stop at once).
    """
    parts: dict[str, Callable[[], WorkflowGraph]] = {
        "pipeline": lambda: workflows.pipeline(3)[0],
        "group_by": lambda: workflows.grouping_graph(group_by(0)),
        "all": lambda: workflows.grouping_graph(ALL),
        "global": lambda: workflows.grouping_graph(GLOBAL, parallelism=1),
        "shuffle": lambda: workflows.grouping_graph(SHUFFLE),
        "fan_out_in": workflows.fan_out_in,
        "multi_edge": workflows.multi_edge,
        "composite": workflows.composite_graph,
        "sum": lambda: _sum_graph(),
        "wordcount": lambda: aiod4p.load_graph(str(ROOT / "examples" / "wordcount.py")),
        "split_merge": lambda: aiod4p.load_graph(str(ROOT / "examples" / "split_merge.py")),
        "async_io": lambda: aiod4p.load_graph(str(ROOT / "examples" / "async_io.py")),
    }
    if flaky:
        parts["flaky"] = storm_workflows.flaky
    graph = WorkflowGraph()
    inputs: dict[str, int] = {}
    labels: dict[str, str] = {}
    for label, build in parts.items():
        flat = build().flatten()
        for pe in flat.pes.values():
            graph.add(pe)
            labels[pe.id] = f"{label}.{type(pe).__name__}"
        for edge in flat.edges:
            graph.connect(
                flat.pes[edge.source], edge.source_port, flat.pes[edge.dest], edge.dest_port, grouping=edge.grouping
            )
        inputs.update(dict.fromkeys(flat.roots(), 10))
    return graph, inputs, labels


def _sum_graph() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(workflows.Count(), "output", workflows.SumAtEnd(), "input")
    return graph


def by_label(results: aiod4p.Results, labels: dict[str, str]) -> dict[tuple[str, str], list[Any]]:
    grouped: dict[tuple[str, str], list[Any]] = {}
    for (pe, port), items in results.by_port().items():
        grouped.setdefault((labels[pe], port), []).extend(items)
    return grouped


def test_workflows_and_examples_give_the_results_of_simple(nimbus: str) -> None:
    graph, inputs, labels = combined(flaky=True)
    mapping = StormMapping(nimbus=nimbus, name="combined", conf={"topology.max.spout.pending": 64})
    got = by_label(aiod4p.run(graph, inputs, mapping=mapping, workers=2), labels)
    simple_graph, simple_inputs, simple_labels = combined()
    expected = by_label(aiod4p.run(simple_graph, simple_inputs, mapping="simple"), simple_labels)

    # Instances differ between mappings; what each grouping promises does not.
    who = {key: items for key, items in got.items() if key[0].endswith("WhoSawWhat")}
    expected_items = {key: [item for _, item in items] for key, items in expected.items() if key in who}
    for key, items in who.items():
        seen = [item for _, item in items]
        instances = {instance for instance, _ in items}
        if key[0].startswith("all."):
            assert multiset(seen) == multiset(expected_items[key] * 3) and instances == {0, 1, 2}
            continue
        assert multiset(seen) == multiset(expected_items[key]), key
        if key[0].startswith("global."):
            assert instances == {0}
        if key[0].startswith("group_by."):
            owners: dict[int, set[int]] = {}
            for instance, (group, _) in items:
                owners.setdefault(group, set()).add(instance)
            assert all(len(owner) == 1 for owner in owners.values()), owners
    for key, items in expected.items():
        if key not in who:
            assert multiset(got[key]) == multiset(items), key
    assert set(got) - {("flaky.Flaky", "output")} == set(expected)

    # At-least-once: the multiples of 3 failed once, were replayed by the spout, and came out once.
    assert sorted(got["flaky.Flaky", "output"]) == [(n, n % 3 == 0) for n in range(10)]

    # What Nimbus ran: the parallelism hints, groupings and back-pressure setting of the plan.
    facts = mapping.facts
    assert facts["conf"]["topology.max.spout.pending"] == 64
    topology = facts["topology"]
    components = {**topology.spouts, **topology.bolts}
    hints = {labels.get(name, name): c.common.parallelism_hint for name, c in components.items()}
    assert hints["all.WhoSawWhat"] == 3 and hints["global.WhoSawWhat"] == 1 and hints["wordcount.CountWords"] == 2
    groupings = {
        labels[name]: {
            kind
            for stream, grouping in c.common.inputs.items()
            if stream.streamId != "aiod4p_eos"
            for kind in ("shuffle", "fields", "all", "none", "direct", "local_or_shuffle")
            if getattr(grouping, kind, None) is not None
        }
        for name, c in topology.bolts.items()
        if name in labels
    }
    assert groupings["all.WhoSawWhat"] == {"all"}
    assert groupings["shuffle.WhoSawWhat"] == {"shuffle"}
    assert groupings["group_by.WhoSawWhat"] == {"fields"}
    assert groupings["flaky.Flaky"] == {"fields"}


def test_a_dead_worker_fails_the_run(nimbus: str) -> None:
    # Instance 1 of FailsOnInstance kills its own process (the Python side of a Storm task).
    graph = workflows.mpi_killed()
    with pytest.raises(WorkerDied, match=r"the Storm task of PE FailsOnInstance\d*\[1\].*exited"):
        aiod4p.run(graph, 10, mapping=StormMapping(nimbus=nimbus, name="killed"), workers=2)
