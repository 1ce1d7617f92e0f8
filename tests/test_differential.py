"""dispel4py 1.2.1 against aiod4p on dispel4py's own examples, unchanged.

dispel4py runs in its own interpreter (``.venv-dispel4py``, made by
``scripts/setup --dev``; ``AIOD4P_DISPEL4PY_PYTHON`` names another). The
example files are loaded from that installation; nothing of dispel4py is
copied here. Each example runs under dispel4py's simple mapping and under
aiod4p on every mapping of the ``mapping`` fixture, and the result multisets
per output port must agree (for random producers: the invariants). The fixes
over dispel4py are demonstrated against dispel4py itself.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MappingCase

import aiod4p
from aiod4p import compat
from aiod4p._inputs import parse_cli_inputs
from aiod4p.errors import GraphError, PEError

ROOT = Path(__file__).resolve().parents[1]
D4P_PYTHON = Path(os.environ.get("AIOD4P_DISPEL4PY_PYTHON", ROOT / ".venv-dispel4py" / "bin" / "python"))
ITERATIONS = 10

pytestmark = pytest.mark.skipif(
    not D4P_PYTHON.exists(), reason=f"dispel4py 1.2.1 is not installed at {D4P_PYTHON} (run scripts/setup --dev)"
)

# Runs a workflow on dispel4py's simple mapping and prints its results as JSON.
# argv[1]: module name or file; argv[2]: the sys.argv to emulate (JSON); argv[3]: {"iter", "data"} (JSON).
DRIVER = textwrap.dedent(
    """
    import argparse, contextlib, json, sys
    target, argv, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    sys.argv = argv
    with contextlib.redirect_stdout(sys.stderr):
        from dispel4py.new import processor
        from dispel4py.new.simple_process import process_and_return
        from dispel4py.utils import load_graph
        graph = load_graph(target)
        graph.flatten()
        namespace = argparse.Namespace(file=None, data=options.get("data"), iter=options.get("iter", 1))
        inputs = processor.create_inputs(namespace, graph)
        results = process_and_return(graph, inputs)
    print(json.dumps(results, default=repr))
    """
)

# The examples dispel4py's simple mapping runs, with the -i each one gets
# (delayed_pipeline sleeps a second per item).
RUNNABLE = {
    "delayed_pipeline": 2,
    "group_by": ITERATIONS,
    "grouping_alltoone": ITERATIONS,
    "grouping_onetoall": ITERATIONS,
    "grouping_split_merge": ITERATIONS,
    "large_teecopy": ITERATIONS,
    "loopcopy": ITERATIONS,
    "multi_producer": ITERATIONS,
    "parallel_pipeline": ITERATIONS,
    "partition_parallel_pipeline": ITERATIONS,
    "pipeline_test": ITERATIONS,
    "producer_tee": ITERATIONS,
    "split_merge": ITERATIONS,
    "teecopy": ITERATIONS,
    "unconnected_pipeline": ITERATIONS,
    "word_count": ITERATIONS,
    "word_count_filter": ITERATIONS,
}
# Examples dispel4py 1.2.1 itself fails on (see docs/dispel4py.md).
FAILING = {
    "pipeline_composite": "RuntimeError",  # its flatten() breaks on networkx >= 2
    "sieveoferatosthenes": "TypeError",  # ProducerPE._process() takes no inputs argument
}
# Examples with random producers: compared by invariants, not by values.
RANDOM = {"group_by", "grouping_split_merge", "word_count", "word_count_filter"}
WORDS = {"dispel4py", "computing", "mpi", "processing", "simple", "analysis", "data"}


@functools.cache
def examples_dir() -> Path:
    site = subprocess.run(
        [str(D4P_PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    return Path(site) / "dispel4py" / "examples" / "graph_testing"


def example(name: str) -> Path:
    return examples_dir() / f"{name}.py"


def cli_argv(target: str, iterations: int) -> list[str]:
    """The sys.argv of ``dispel4py simple <target> -i N`` (large_teecopy reads argv[4])."""
    return ["dispel4py", "simple", target, "-i", str(iterations)]


def normal(value: Any) -> Any:
    """``value`` as JSON gives it back: tuples become lists, as in the driver's output."""
    return json.loads(json.dumps(value, default=repr))


def multiset(items: list[Any]) -> Counter[str]:
    return Counter(json.dumps(normal(item), sort_keys=True) for item in items)


@functools.cache
def _dispel4py_simple(target: str, argv: tuple[str, ...], iterations: int | None, data: str | None) -> str:
    done = subprocess.run(
        [str(D4P_PYTHON), "-c", DRIVER, target, json.dumps(argv), json.dumps({"iter": iterations, "data": data})],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"dispel4py failed on {target}:\n{done.stderr[-3000:]}")
    return done.stdout


def dispel4py_simple(
    target: str, *, iterations: int | None = 1, data: str | None = None, argv: list[str] | None = None
) -> dict[tuple[str, str], list[Any]]:
    """The results of ``target`` under dispel4py's simple mapping, by (PE id, port)."""
    argv = argv or cli_argv(target, iterations or 1)
    raw = json.loads(_dispel4py_simple(target, tuple(argv), iterations, data))
    return {(pe, port): items for pe, ports in raw.items() for port, items in ports.items()}


def by_rank(results: dict[tuple[str, str], list[Any]], graph: aiod4p.WorkflowGraph) -> dict[tuple[str, str], list[Any]]:
    """Results keyed by the PE ids a fresh process would give (``name`` + rank of its counter)."""
    pes = graph.flatten().pes
    numbers = {pe_id: int(pe_id[len(pe.name) :]) for pe_id, pe in pes.items()}
    rank = {pe_id: index for index, pe_id in enumerate(sorted(numbers, key=numbers.__getitem__))}
    return {(pes[pe].name + str(rank[pe]), port): items for (pe, port), items in results.items()}


@pytest.fixture
def dispel4py_hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The import hook, with sys.path and example modules restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    compat.install()
    try:
        yield
    finally:
        compat.uninstall()
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", "")).startswith(str(examples_dir())):
                del sys.modules[name]


def run_example(
    name: str, mapping: MappingCase, monkeypatch: pytest.MonkeyPatch, iterations: int
) -> tuple[dict[tuple[str, str], list[Any]], aiod4p.WorkflowGraph]:
    path = str(example(name))
    monkeypatch.setattr(sys, "argv", cli_argv(path, iterations))
    graph = aiod4p.load_graph(path)
    results = mapping.run(graph, parse_cli_inputs(iterations, None, None))
    return results.by_port(), graph


def check_word_counts(items: list[Any], total: int | None, at_most: int) -> None:
    """Each word's counts are exactly 1..n: every word reached one counting instance."""
    counts: dict[str, list[int]] = {}
    for word, count in normal(items):
        assert word in WORDS
        counts.setdefault(word, []).append(count)
    for word, seen in counts.items():
        assert sorted(seen) == list(range(1, len(seen) + 1)), (word, seen)
    n = sum(len(seen) for seen in counts.values())
    assert n <= at_most
    if total is not None:
        assert n == total


# -- the examples ------------------------------------------------------------------


def test_every_example_is_classified() -> None:
    files = {p.stem for p in examples_dir().glob("*.py")} - {"__init__", "testing_PEs"}
    assert files == set(RUNNABLE) | set(FAILING)


@pytest.mark.parametrize("name", sorted(FAILING))
def test_examples_dispel4py_cannot_run(name: str) -> None:
    with pytest.raises(RuntimeError, match=FAILING[name]):
        dispel4py_simple(str(example(name)), iterations=ITERATIONS)


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_example_matches_dispel4py(
    name: str, mapping: MappingCase, dispel4py_hook: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    iterations = RUNNABLE[name]
    path = str(example(name))
    expected = dispel4py_simple(path, iterations=iterations)
    got, graph = run_example(name, mapping, monkeypatch, iterations)
    got = by_rank(got, graph)
    assert set(got) == set(expected)
    for key, items in expected.items():
        if name in RANDOM:
            bound = {"grouping_split_merge": 2 * iterations, "word_count_filter": iterations}.get(name)
            check_word_counts(got[key], None if bound else iterations, bound or iterations)
        else:
            assert multiset(got[key]) == multiset(items), key


def test_pipeline_composite_gives_the_intended_results(
    mapping: MappingCase, dispel4py_hook: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dispel4py cannot flatten composites on networkx >= 2; the chain computes 2x + 3.
    got, graph = run_example("pipeline_composite", mapping, monkeypatch, ITERATIONS)
    got = by_rank(got, graph)
    assert list(got) == [("PE_subtract3", "output")]
    assert multiset(got["PE_subtract3", "output"]) == multiset([2.0 * x + 3 for x in range(1, ITERATIONS + 1)])


def test_sieve_fails_as_in_dispel4py(mapping: MappingCase, dispel4py_hook: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PEError, match=r"NumberProducer\d+.*TypeError"):
        run_example("sieveoferatosthenes", mapping, monkeypatch, 1)


# -- the command line ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_example_from_the_cli(name: str, tmp_path: Path) -> None:
    iterations = RUNNABLE[name]
    path = str(example(name))
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "aiod4p", "run", path, "-i", str(iterations), "--mapping", "simple", "--results", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    got: dict[tuple[str, str], list[Any]] = {}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        got.setdefault((record["pe"], record["output"]), []).append(record["data"])
    expected = dispel4py_simple(path, iterations=iterations)
    assert set(got) == set(expected)  # the same dispel4py-style PE ids
    if name not in RANDOM:
        for key, items in expected.items():
            assert multiset(got[key]) == multiset(items), key
