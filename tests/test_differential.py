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
import re
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MappingCase
from helpers import add_graph, aiod4p_cli

import aiod4p
from aiod4p import compat
from aiod4p._inputs import parse_cli_inputs
from aiod4p.compat.processor import MOST_SHARED_PROCESSES
from aiod4p.errors import PEError

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

# The examples dispel4py's simple mapping runs, with the -i each one gets.
# delayed_pipeline sleeps `delay` seconds per item, and its timing PE divides
# by its item count in postprocess, so each of up to 4 instances needs an item;
# the in-process runs set `delay` to 0.01 s (results do not depend on it).
RUNNABLE = {
    "delayed_pipeline": 4,  # ok-sleep: dispel4py's reference run of the unchanged example sleeps 1 s an item
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
# The command-line runs take the file as it is: one slow item is enough there.
CLI_ITERATIONS = {"delayed_pipeline": 1}  # ok-sleep: the example, unchanged, sleeps 1 s on its one item
RANDOM = {"group_by", "grouping_split_merge", "word_count", "word_count_filter"}
# Ports a random filter may leave empty: RandomFilter drops each of the 10 words with probability 1/2.
MAY_BE_EMPTY = {"word_count_filter": {("WordCounter2", "output")}}
# Examples that broadcast ('all') to a PE with numprocesses > 1: dispel4py's simple
# mapping runs one instance of every PE, so each instance's copy is counted once;
# mappings that run numprocesses instances emit one copy per instance.
BROADCAST = {"grouping_onetoall": 2}
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


def fresh_ids(graph: aiod4p.WorkflowGraph) -> dict[str, str]:
    """The id a fresh process would give each PE: ``name`` + the rank of its counter."""
    pes = graph.flatten().pes
    numbers = {pe_id: int(pe_id[len(pe.name) :]) for pe_id, pe in pes.items()}
    rank = {pe_id: index for index, pe_id in enumerate(sorted(numbers, key=numbers.__getitem__))}
    return {pe_id: pes[pe_id].name + str(rank[pe_id]) for pe_id in pes}


def by_rank(results: dict[tuple[str, str], list[Any]], graph: aiod4p.WorkflowGraph) -> dict[tuple[str, str], list[Any]]:
    """Results keyed by the PE ids a fresh process would give."""
    fresh = fresh_ids(graph)
    return {(fresh[pe], port): items for (pe, port), items in results.items()}


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
        # Workflow modules loaded from files (examples, flow.py) must not outlive the test.
        kept = tuple(os.path.join(path, "") for path in (sys.prefix, sys.base_prefix, str(ROOT / "aiod4p")))
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if file and not file.startswith(kept):
                del sys.modules[name]


def run_example(
    name: str, mapping: MappingCase, monkeypatch: pytest.MonkeyPatch, iterations: int
) -> tuple[dict[tuple[str, str], list[Any]], aiod4p.WorkflowGraph]:
    path = str(example(name))
    monkeypatch.setattr(sys, "argv", cli_argv(path, iterations))
    graph = aiod4p.load_graph(path)
    results = mapping.run(graph, parse_cli_inputs(iterations, None, None))
    return results.by_port(), graph


_ALL_EXAMPLES: dict[str, dict[str, dict[tuple[str, str], list[Any]]]] = {}


def run_all_examples(
    mapping: MappingCase, monkeypatch: pytest.MonkeyPatch
) -> dict[str, dict[tuple[str, str], list[Any]]]:
    """The results of every runnable example, by example, keyed by fresh-process PE ids.

    The examples run side by side as one workflow, once per mapping: a process
    launch per mapping instead of one per example and mapping.
    """
    if mapping.id not in _ALL_EXAMPLES:
        combined = aiod4p.WorkflowGraph()
        inputs: dict[str, int] = {}
        renames: dict[str, tuple[str, str]] = {}
        for name, iterations in RUNNABLE.items():
            path = str(example(name))
            monkeypatch.setattr(sys, "argv", cli_argv(path, iterations))
            graph = aiod4p.load_graph(path)
            flat = graph.flatten()
            for pe in flat.pes.values():
                if hasattr(pe, "delay"):
                    pe.delay = 0.01  # delayed_pipeline: its results do not depend on the delay
            add_graph(combined, graph)
            inputs.update(dict.fromkeys(flat.roots(), iterations))
            renames.update({pe_id: (name, fresh) for pe_id, fresh in fresh_ids(graph).items()})
        results: dict[str, dict[tuple[str, str], list[Any]]] = {name: {} for name in RUNNABLE}
        for (pe_id, port), items in mapping.run(combined, inputs).by_port().items():
            name, fresh = renames[pe_id]
            results[name][fresh, port] = items
        _ALL_EXAMPLES[mapping.id] = results
    return _ALL_EXAMPLES[mapping.id]


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


def check_example(
    name: str, got: dict[tuple[str, str], list[Any]], expected: dict[tuple[str, str], list[Any]], copies: int
) -> None:
    """Assert that example ``name``'s results ``got`` are dispel4py's ``expected``.

    The same multisets (``copies`` of each item a broadcast reaches), or for a random producer the same
    invariants.
    """
    iterations = RUNNABLE[name]
    may_be_empty = MAY_BE_EMPTY.get(name, set())
    assert set(got) | may_be_empty == set(expected) | may_be_empty, name
    if name in RANDOM:
        bound = {"grouping_split_merge": 2 * iterations, "word_count_filter": iterations}.get(name)
        for key in set(got) | set(expected):
            check_word_counts(got.get(key, []), None if bound else iterations, bound or iterations)
        return
    for key, items in expected.items():
        assert multiset(got[key]) == multiset(items * copies), (name, key)


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
    expected = dispel4py_simple(str(example(name)), iterations=RUNNABLE[name])
    got = run_all_examples(mapping, monkeypatch)[name]
    check_example(name, got, expected, BROADCAST.get(name, 1) if mapping.name != "simple" else 1)


def test_pipeline_composite_gives_the_intended_results(
    mapping: MappingCase, dispel4py_hook: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dispel4py cannot flatten composites on networkx >= 2; the chain computes 2x + 3.
    got, graph = run_example("pipeline_composite", mapping, monkeypatch, ITERATIONS)
    got = by_rank(got, graph)
    assert list(got) == [("PE_subtract3", "output")]
    assert multiset(got["PE_subtract3", "output"]) == multiset([2.0 * x + 3 for x in range(1, ITERATIONS + 1)])


def test_sieve_fails_as_in_dispel4py(
    mapping: MappingCase, dispel4py_hook: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PEError, match=r"NumberProducer\d+.*TypeError"):
        run_example("sieveoferatosthenes", mapping, monkeypatch, 1)


# -- the command line ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_example_from_the_cli(name: str, tmp_path: Path) -> None:
    iterations = CLI_ITERATIONS.get(name, RUNNABLE[name])
    path = str(example(name))
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiod4p",
            "run",
            path,
            "-i",
            str(iterations),
            "--mapping",
            "simple",
            "--results",
            str(out),
        ],
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


# -- the fixes over dispel4py, each shown failing on dispel4py ----------------------

# A root as the tutorials write one: 1, 2, 3, ... one per call.
NUMBERS_FLOW = """
from dispel4py.base import IterativePE, ProducerPE
from dispel4py.workflow_graph import WorkflowGraph


class Numbers(ProducerPE):
    def __init__(self):
        ProducerPE.__init__(self)
        self.n = 0

    def _process(self, inputs):
        self.n += 1
        return self.n
"""

FAILING_FLOW = (
    NUMBERS_FLOW
    + """


class Explode(IterativePE):
    def _process(self, data):
        if data == 3:
            raise ValueError("boom on 3")
        return data


class Show(IterativePE):
    def _process(self, data):
        return data


graph = WorkflowGraph()
explode = Explode()
graph.connect(Numbers(), "output", explode, "input")
graph.connect(explode, "output", Show(), "input")
"""
)

CYCLE_FLOW = """
from dispel4py.base import IterativePE, ProducerPE
from dispel4py.workflow_graph import WorkflowGraph


class One(ProducerPE):
    def _process(self, inputs):
        return 1


class Show(IterativePE):
    def _process(self, data):
        return data


graph = WorkflowGraph()
a, b, c = Show(), Show(), Show()
graph.connect(One(), "output", a, "input")
graph.connect(a, "output", b, "input")
graph.connect(b, "output", c, "input")
graph.connect(c, "output", a, "input")
"""


def dispel4py_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str] | None:
    """Run dispel4py's own command line; ``None`` if it is still running after ``timeout`` (then killed)."""
    command = [str(D4P_PYTHON.parent / "dispel4py"), *args]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the whole session: dispel4py's worker processes too
            process.communicate()
            return None
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def flow(tmp_path: Path, source: str, name: str = "flow.py") -> str:
    path = tmp_path / name
    path.write_text(source)
    return str(path)


@functools.cache
def dispel4py_multi_output() -> str:
    done = dispel4py_cli("multi", str(example("pipeline_test")), "-n", "6", "-i", "5")
    assert done is not None and done.returncode == 0, done
    return done.stdout


def test_results_are_collected_on_every_mapping(
    mapping: MappingCase, dispel4py_hook: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dispel4py's multi mapping runs the pipeline and silently drops its results.
    stdout = dispel4py_multi_output()
    assert "TestOneInOneOut5 (rank 5): Processed 5 iterations." in stdout
    assert "Outputs" not in stdout and "[1, 2, 3, 4, 5]" not in stdout
    got, graph = run_example("pipeline_test", mapping, monkeypatch, 5)
    assert {key: sorted(items) for key, items in by_rank(got, graph).items()} == {
        ("TestOneInOneOut5", "output"): [1, 2, 3, 4, 5]
    }


def test_group_by_routing_is_stable_across_processes() -> None:
    # dispel4py routes a group-by key by hash(), salted per interpreter: two
    # processes (MPI ranks, spawned workers) send the same word to different instances.
    probe = "from dispel4py.utils import make_hash; print([abs(make_hash((w,))) % 3 for w in {words!r}])"
    words = sorted(WORDS)
    d4p = {
        subprocess.run(
            [str(D4P_PYTHON), "-c", probe.format(words=words)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    }
    assert len(d4p) > 1
    ours = "from aiod4p import stable_hash; print([stable_hash((w,)) % 3 for w in {words!r}])"
    mine = {
        subprocess.run(
            [sys.executable, "-c", ours.format(words=words)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    }
    assert len(mine) == 1


def test_a_failing_pe_fails_the_run(tmp_path: Path) -> None:
    path = flow(tmp_path, FAILING_FLOW)
    # dispel4py's multi mapping: the worker dies, its consumer waits for ever.
    assert dispel4py_cli("multi", path, "-n", "3", "-i", "5", timeout=3) is None  # ok-sleep: shows dispel4py hangs
    done = aiod4p_cli("run", path, "-i", "5", "--mapping", "async", "-n", "3", cwd=tmp_path)
    assert done.returncode == 1
    assert "Explode1" in done.stderr and "boom on 3" in done.stderr


def test_a_failing_pe_fails_every_mapping(
    mapping: MappingCase, dispel4py_hook: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = aiod4p.load_graph(flow(tmp_path, FAILING_FLOW))
    with pytest.raises(PEError, match=r"Explode\d+.*boom on 3"):
        mapping.run(graph, 5)


def test_cycles_are_rejected(mapping: MappingCase, dispel4py_hook: None, tmp_path: Path) -> None:
    path = flow(tmp_path, CYCLE_FLOW)
    # dispel4py's simple mapping finds no sink in the cycle, runs nothing and succeeds.
    assert dispel4py_simple(path, iterations=3) == {}
    graph = aiod4p.load_graph(path)
    with pytest.raises(aiod4p.GraphError, match=r"cycle: Show\d+ -> Show\d+ -> Show\d+ -> Show\d+"):
        mapping.run(graph, 3)


def test_a_cycle_fails_the_cli(tmp_path: Path) -> None:
    done = aiod4p_cli("run", flow(tmp_path, CYCLE_FLOW), "-i", "3", cwd=tmp_path)
    assert done.returncode == 1
    assert "cycle" in done.stderr


def test_roots_absent_from_data_are_consistent(
    mapping: MappingCase, dispel4py_hook: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # unconnected_pipeline has two producer roots; -d names only the first.
    path = str(example("unconnected_pipeline"))
    data = '{"TestProducer0": 3}'
    expected = dispel4py_simple(path, iterations=None, data=data, argv=["dispel4py"])
    assert expected == {("TestOneInOneOut5", "output"): [1, 2, 3], ("TestOneInOneOut11", "output"): [1]}
    monkeypatch.setattr(sys, "argv", ["aiod4p"])
    graph = aiod4p.load_graph(path)
    pes = graph.flatten().pes
    first = min(pes, key=lambda pe_id: int(pe_id[len(pes[pe_id].name) :]))  # "TestProducer0" in a fresh process
    results = mapping.run(graph, {first: 3})
    assert {key: sorted(items) for key, items in by_rank(results.by_port(), graph).items()} == expected


def test_dispel4py_multi_hangs_on_roots_absent_from_data() -> None:
    path = str(example("unconnected_pipeline"))
    # ok-sleep: shows that dispel4py hangs
    assert dispel4py_cli("multi", path, "-n", "12", "-d", '{"TestProducer0": 3}', timeout=3) is None


# -- workflows from the wild (issue 16), each against dispel4py itself ---------------------

READER_FLOW = """
from dispel4py.base import ProducerPE, IterativePE
from dispel4py.workflow_graph import WorkflowGraph


class Read(ProducerPE):
    def _process(self, inputs):
        with open(inputs['input']) as lines:
            for line in lines:
                self.write('output', line.strip())


class Length(IterativePE):
    def _process(self, data):
        return [data, len(data)]


read = Read()
read.name = 'read'
graph = WorkflowGraph()
graph.connect(read, 'output', Length(), 'input')
"""

COUNTING_FLOW = (
    NUMBERS_FLOW
    + """


class Count(IterativePE):
    # Ungrouped and stateful: what it emits depends on how many instances share the items.
    def __init__(self):
        IterativePE.__init__(self)
        self.count = 0

    def _process(self, data):
        self.count += 1
        print('COUNT %d' % self.count, flush=True)  # dispel4py's multi mapping drops results
        return self.count


graph = WorkflowGraph()
graph.connect(Numbers(), 'output', Count(), 'input')
"""
)

TUTORIAL_FLOW = """
from dispel4py.base import ProducerPE, IterativePE
from dispel4py.workflow_graph import WorkflowGraph
from dispel4py.new import simple_process


class Numbers(ProducerPE):
    def __init__(self):
        ProducerPE.__init__(self)
        self.n = 0

    def _process(self, inputs):
        self.n += 1
        return self.n


class Square(IterativePE):
    def _process(self, data):
        return data * data


producer = Numbers()
graph = WorkflowGraph()
graph.connect(producer, 'output', Square(), 'input')
print('TUTORIAL', simple_process.process_and_return(graph, {producer: 5}))
"""


def test_a_root_fed_a_file_name(
    mapping: MappingCase, dispel4py_hook: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    words = tmp_path / "words.txt"
    words.write_text("stream\nbased\nworkflows\n")
    path = flow(tmp_path, READER_FLOW)
    data = json.dumps({"read": [{"input": str(words)}]})
    expected = dispel4py_simple(path, iterations=None, data=data)
    assert expected == {("Length1", "output"): [["stream", 6], ["based", 5], ["workflows", 9]]}
    graph = aiod4p.load_graph(path)
    got = by_rank(mapping.run(graph, parse_cli_inputs(None, data, None)).by_port(), graph)
    assert {key: multiset(items) for key, items in got.items()} == {
        key: multiset(items) for key, items in expected.items()
    }


@functools.cache
def dispel4py_multi_counts(path: str, processes: int) -> tuple[dict[str, int], list[int]]:
    """dispel4py multi's processes per PE and the counts printed by COUNTING_FLOW, for ``-i 6``."""
    done = dispel4py_cli("multi", path, "-n", str(processes), "-i", "6")
    assert done is not None and done.returncode == 0, done
    line = next(line for line in done.stdout.splitlines() if line.startswith("Processes: "))
    ranges = {pe: int(end) - int(start) for pe, start, end in re.findall(r"'(\w+)': range\((\d+), (\d+)\)", line)}
    counts = [int(count) for count in re.findall(r"COUNT (\d+)", done.stdout)]  # lines of processes may interleave
    return ranges, counts


@pytest.mark.parametrize("name", ["multi", "mpi"])
def test_an_ungrouped_stateful_pe_under_n(
    name: str, dispel4py_hook: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = flow(tmp_path, COUNTING_FLOW)
    processes, counts = dispel4py_multi_counts(path, 4)
    assert processes == {"Numbers0": 1, "Count1": 3}  # the root 1, Count int(1 * (4 - 1) / (2 - 1))
    graph = aiod4p.load_graph(path)
    run = aiod4p.WorkflowRun(graph, 6, mapping=name, workers=4)
    fresh = fresh_ids(graph)
    assert {fresh[pe]: placed.parallelism for pe, placed in run.plan.placement.items()} == processes
    assert sorted(counts) == [1, 1, 1, 2, 2, 2]  # each of 3 instances counted 2 of the 6 items
    assert sorted(aiod4p.run(graph, 6, mapping=name, workers=4).data()) == sorted(counts)


# Ungrouped and stateful: its sum depends on which items each instance is dealt.
SUM_FLOW = (
    NUMBERS_FLOW
    + """


class Sum(IterativePE):
    def __init__(self):
        IterativePE.__init__(self)
        self.sum = 0

    def _process(self, data):
        self.sum += data

    def _postprocess(self):
        print('SUM %d' % self.sum, flush=True)  # dispel4py's multi mapping drops results
        self.write('output', self.sum)
"""
)

TWO_STAGE_FLOW = (
    SUM_FLOW
    + """

class Pass(IterativePE):
    def _process(self, data):
        return data


graph = WorkflowGraph()
passing = Pass()
graph.connect(Numbers(), 'output', passing, 'input')
graph.connect(passing, 'output', Sum(), 'input')
"""
)

SQUARE_SUM_FLOW = (
    SUM_FLOW
    + """

class Square(IterativePE):
    def _process(self, data):
        return data * data


graph = WorkflowGraph()
square = Square()
square.numprocesses = 3
total = Sum()
total.numprocesses = 2
graph.connect(Numbers(), 'output', square, 'input')
graph.connect(square, 'output', total, 'input')
"""
)


def dispel4py_multi_sums(path: str, processes: str, iterations: str, placed: str) -> list[int]:
    """The sums SUM_FLOW's Sum instances print on dispel4py's multi, after checking that its processes
    include ``placed``."""
    done = dispel4py_cli("multi", path, "-n", processes, "-i", iterations)
    assert done is not None and done.returncode == 0, done
    assert placed in done.stdout
    return sorted(int(total) for total in re.findall(r"SUM (\d+)", done.stdout))


@pytest.mark.parametrize("name", ["multi", "mpi"])
def test_parallel_senders_deal_round_robin_as_dispel4pys(name: str, dispel4py_hook: None, tmp_path: Path) -> None:
    # Two instances of Pass deal to two of Sum: dispel4py starts sender i at instance i. aiod4p started
    # sender 1 at instance 0 (its candidates rotated, then its round robin staggered again), so each Sum
    # saw other items: sums [14, 14] where dispel4py's multi printed [10, 18].
    path = flow(tmp_path, TWO_STAGE_FLOW)
    sums = dispel4py_multi_sums(path, "6", "7", "'Pass1': range(1, 3), 'Sum2': range(3, 5)")
    assert sums == [10, 18]  # Sum 0: 1, 5, 4; Sum 1: 3, 7, 2, 6
    graph = aiod4p.load_graph(path)
    assert sorted(aiod4p.run(graph, 7, mapping=name, workers=6).data()) == sums


@pytest.mark.timeout(120)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs: workers on the sender's and another")
@pytest.mark.parametrize("name", ["multi", "mpi"])
def test_round_robin_deals_in_turn_on_fewer_workers_than_instances(name: str, tmp_path: Path) -> None:
    # -n 6 on 2 CPUs: dispel4py's 6 processes share 2 workers. A batch went to another instance when the
    # one in turn had no room, or stayed beside its sender, so the sums of 100 squares varied from run
    # to run; they are dispel4py's, whatever the timing. Two instances of Pass on the workers of two of
    # Sum were joined one to one (sums [12, 16]), where each of dispel4py's senders deals to both.
    square_sum, two_stage = flow(tmp_path, SQUARE_SUM_FLOW, "square_sum.py"), flow(tmp_path, TWO_STAGE_FLOW)
    square_sums = dispel4py_multi_sums(square_sum, "6", "100", "'Square1': range(1, 4), 'Sum2': range(4, 6)")
    assert square_sums == [166650, 171700]
    for path, iterations, sums in [
        (square_sum, "100", square_sums),
        (square_sum, "100", square_sums),
        (two_stage, "7", [10, 18]),
    ]:
        out = tmp_path / "out.jsonl"
        done = aiod4p_cli("run", path, "-m", name, "-n", "6", "-i", iterations, "--results", str(out), cpus=2)
        assert done.returncode == 0, done.stderr
        assert sorted(json.loads(line)["data"] for line in out.read_text().splitlines()) == sums, path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["multi", "mpi"])
def test_an_ungrouped_stateful_pe_under_n_on_fewer_cpus(name: str, tmp_path: Path) -> None:
    # `-n 4` on a machine with fewer CPUs: aiod4p run starts one worker per CPU, and the instances
    # dispel4py's -n 4 gives share them, so the results are still dispel4py's.
    path = flow(tmp_path, COUNTING_FLOW)
    _, counts = dispel4py_multi_counts(path, 4)
    out = tmp_path / "out.jsonl"
    done = aiod4p_cli("run", path, "-m", name, "-n", "4", "-i", "6", "--results", str(out), one_cpu=True)
    assert done.returncode == 0, done.stderr
    assert f"so 1 {'worker process' if name == 'multi' else 'rank'} (" in done.stderr
    assert sorted(records["data"] for records in map(json.loads, out.read_text().splitlines())) == sorted(counts)


def test_a_dispel4py_graph_under_a_huge_n_shares_out_a_bounded_number_of_processes(tmp_path: Path) -> None:
    # `-n 20000` on one CPU: dispel4py's rule shares out MOST_SHARED_PROCESSES, not 20,000 (round-robin
    # edges join every instance to every next one: two PEs of 5,000 instances took 8 GB and were killed).
    path, drawing = flow(tmp_path, COUNTING_FLOW), tmp_path / "g.dot"
    done = aiod4p_cli("graph", path, "-m", "multi", "-n", "20000", "-o", str(drawing), one_cpu=True)
    assert done.returncode == 0, done.stderr
    assert f"shared out as dispel4py does for -n {MOST_SHARED_PROCESSES}" in done.stderr
    assert f"Count · ×{MOST_SHARED_PROCESSES - 1}<" in drawing.read_text()  # int(1 * (1024 - 1) / (2 - 1))


def test_a_tutorial_module_that_runs_itself_at_import(tmp_path: Path) -> None:
    path = flow(tmp_path, TUTORIAL_FLOW)
    done = subprocess.run([str(D4P_PYTHON), path], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = next(line for line in done.stdout.splitlines() if line.startswith("TUTORIAL"))
    assert expected == "TUTORIAL {'Square1': {'output': [1, 4, 9, 16, 25]}}"
    for options in (["--mapping", "simple"], ["--mapping", "mpi", "-n", "2"]):
        ours = aiod4p_cli("run", path, *options, "-i", "1", "-q", cwd=tmp_path)
        assert ours.returncode == 0, ours.stderr
        assert [line for line in ours.stdout.splitlines() if line.startswith("TUTORIAL")] == [expected]


def test_a_hyphenated_file_name(mapping: MappingCase, dispel4py_hook: None, tmp_path: Path) -> None:
    path = tmp_path / "my-first-graph.py"
    path.write_text(TUTORIAL_FLOW.rpartition("print(")[0].replace("from dispel4py.new import simple_process\n", ""))
    expected = dispel4py_simple(str(path), iterations=3)
    assert expected == {("Square1", "output"): [1, 4, 9]}
    graph = aiod4p.load_graph(str(path))
    results = by_rank(mapping.run(graph, 3).by_port(), graph)
    assert {key: sorted(items) for key, items in results.items()} == expected


# dispel4py's own multi_process tests read the results of `process` from the queue it returns.
RESULT_QUEUE_SCRIPT = """
import argparse, json
from dispel4py.base import ProducerPE, IterativePE
from dispel4py.new.multi_process import process, STATUS_TERMINATED
from dispel4py.workflow_graph import WorkflowGraph


class Numbers(ProducerPE):
    def _process(self, inputs):
        for n in range(1, 6):
            self.write('output', n)


class Square(IterativePE):
    def _process(self, data):
        return data * data


producer, square = Numbers(), Square()
graph = WorkflowGraph()
graph.connect(producer, 'output', square, 'input')
graph.connect(producer, 'output', Square(), 'input')
args = argparse.Namespace(num=4, simple=False, results=True)
queue = process(graph, {producer: 1}, args)
items = []
item = queue.get()
while item != STATUS_TERMINATED:
    items.append(list(item))
    item = queue.get()
print('RESULTS', json.dumps(sorted(items)))
"""


def test_multi_process_returns_its_results_in_a_queue(tmp_path: Path) -> None:
    path = flow(tmp_path, RESULT_QUEUE_SCRIPT)
    ours = [sys.executable, "-c", f"from aiod4p import compat; compat.install(); exec(open({path!r}).read())"]
    outputs = []
    for command in ([str(D4P_PYTHON), path], ours):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)  # ROOT: this aiod4p
        assert done.returncode == 0, done.stderr
        outputs.append(next(line for line in done.stdout.splitlines() if line.startswith("RESULTS")))
    squares = [["Square1", "output", n * n] for n in range(1, 6)] + [["Square2", "output", n * n] for n in range(1, 6)]
    assert outputs[0] == f"RESULTS {json.dumps(sorted(squares))}"  # dispel4py 1.2.1's multi
    assert outputs[1] == outputs[0]


# dispel4py 2.0's rapid-assessment workflow (dispel4py_RA.pgm_story.py) keeps a PE's own data in `label`.
OWN_NAMES_FLOW = """
from dispel4py.base import ProducerPE, IterativePE
from dispel4py.workflow_graph import WorkflowGraph


class Stations(ProducerPE):
    def __init__(self, label):
        ProducerPE.__init__(self)
        self.label = label

    def _process(self, inputs):
        for station in ('AQU', 'ARRO'):
            self.write('output', [station, self.label])


class Tag(IterativePE):
    def __init__(self):
        IterativePE.__init__(self)
        self.instance = 'pgm'

    def _process(self, data):
        return data + [self.instance]


graph = WorkflowGraph()
graph.connect(Stations('real'), 'output', Tag(), 'input')
"""


def test_a_pe_keeping_its_own_label(mapping: MappingCase, dispel4py_hook: None, tmp_path: Path) -> None:
    path = flow(tmp_path, OWN_NAMES_FLOW)
    expected = dispel4py_simple(path)
    assert expected == {("Tag1", "output"): [["AQU", "real", "pgm"], ["ARRO", "real", "pgm"]]}
    graph = aiod4p.load_graph(path)
    got = by_rank(mapping.run(graph, 1).by_port(), graph)
    assert {key: multiset(items) for key, items in got.items()} == {
        key: multiset(items) for key, items in expected.items()
    }


# A PE overriding write() to tag what it emits: dispel4py's simple mapping writes what process() returns
# through pe.write, so the override sees it too (its multi and mpi take the returned items as they are).
WRITE_OVERRIDE_FLOW = """
from dispel4py.base import ProducerPE, IterativePE
from dispel4py.workflow_graph import WorkflowGraph


class Numbers(ProducerPE):
    def _process(self, inputs):
        for i in range(3):
            self.write('output', i)


class Tagging(IterativePE):
    def write(self, name, data, **kwargs):
        IterativePE.write(self, name, ['tagged', data])

    def _process(self, data):
        if data == 0:
            self.write('output', 'explicit')
        return data * 10


class Show(IterativePE):
    def _process(self, data):
        return data


tagging = Tagging()
graph = WorkflowGraph()
graph.connect(Numbers(), 'output', tagging, 'input')
graph.connect(tagging, 'output', Show(), 'input')
"""


def test_a_pe_overriding_write_sees_what_it_returns(mapping: MappingCase, dispel4py_hook: None, tmp_path: Path) -> None:
    path = flow(tmp_path, WRITE_OVERRIDE_FLOW)
    expected = dispel4py_simple(path)
    assert expected == {("Show2", "output"): [["tagged", "explicit"], ["tagged", 0], ["tagged", 10], ["tagged", 20]]}
    graph = aiod4p.load_graph(path)
    got = by_rank(mapping.run(graph, 1).by_port(), graph)
    assert {key: multiset(items) for key, items in got.items()} == {
        key: multiset(items) for key, items in expected.items()
    }


# A workflow that configures its own logging as it imports, its PEs logging through it.
LOGGING_FLOW = """
import logging
from dispel4py.base import ProducerPE, IterativePE
from dispel4py.workflow_graph import WorkflowGraph

logging.basicConfig(level=logging.INFO, handlers=[logging.FileHandler('flow.log'), logging.StreamHandler()])
logger = logging.getLogger('flow')


class Numbers(ProducerPE):
    def _process(self, inputs):
        logger.info('producing')
        return 1


class Show(IterativePE):
    def _process(self, data):
        logger.info('showing %s', data)
        return data


graph = WorkflowGraph()
graph.connect(Numbers(), 'output', Show(), 'input')
"""


@pytest.mark.timeout(120)
def test_a_workflow_configuring_its_logging_logs_as_under_dispel4py(tmp_path: Path) -> None:
    # aiod4p run had configured the root logger before importing the workflow, so its basicConfig did nothing:
    # its INFO messages were dropped, on the terminal and from its log file, silently.
    path = flow(tmp_path, LOGGING_FLOW)
    log = tmp_path / "flow.log"
    done = subprocess.run(
        [str(D4P_PYTHON.parent / "dispel4py"), "simple", path], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == ["INFO:flow:producing", "INFO:flow:showing 1"]
    for options in (["-m", "simple"], ["-m", "multi", "-n", "2"], ["-m", "mpi", "-n", "2"]):
        log.unlink()
        ours = aiod4p_cli("run", path, *options, cwd=tmp_path)
        assert ours.returncode == 0, ours.stderr
        assert [line.split(" INFO ")[1] for line in ours.stderr.splitlines() if " INFO flow: " in line] == [
            "flow: producing",
            "flow: showing 1",
        ], options
        assert log.read_text().splitlines() == ["INFO:flow:producing", "INFO:flow:showing 1"], options


# dispel4py's PEs have no `outputs`, `inputs` or `parallelism`: a PE may use those names for its own data.
OWN_PORT_NAMES_FLOW = """
from dispel4py.base import ProducerPE
from dispel4py.core import GenericPE
from dispel4py.workflow_graph import WorkflowGraph


class Numbers(ProducerPE):
    def __init__(self):
        self.parallelism = 3  # a parameter of its algorithm, set before the base class's __init__
        ProducerPE.__init__(self)

    def _process(self, inputs):
        for i in range(self.parallelism):
            self.write('output', i)


class Collect(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input('input')
        self._add_output('output')
        self.outputs = []  # its results
        self.inputs = {}  # what it has seen
        self.parallelism = 'auto'

    def process(self, inputs):
        item = inputs['input']
        self.inputs[item] = True
        self.outputs.append(item * 10)
        return {'output': [self.outputs[-1], item in self.inputs, self.parallelism]}


graph = WorkflowGraph()
graph.connect(Numbers(), 'output', Collect(), 'input')
"""


def test_a_pe_keeping_its_own_outputs_inputs_and_parallelism(
    mapping: MappingCase, dispel4py_hook: None, tmp_path: Path
) -> None:
    path = flow(tmp_path, OWN_PORT_NAMES_FLOW)
    expected = dispel4py_simple(path)
    assert expected == {("Collect1", "output"): [[0, True, "auto"], [10, True, "auto"], [20, True, "auto"]]}
    graph = aiod4p.load_graph(path)
    got = by_rank(mapping.run(graph, 1).by_port(), graph)
    assert {key: multiset(items) for key, items in got.items()} == {
        key: multiset(items) for key, items in expected.items()
    }


# dispel4py hands each element of a -d list to a root's process() as it is, dict or not.
BARE_INPUTS_FLOW = """
from dispel4py.base import ProducerPE, IterativePE
from dispel4py.workflow_graph import WorkflowGraph


class Read(ProducerPE):
    def _process(self, inputs):
        self.write('output', ['got', inputs])


class Show(IterativePE):
    def _process(self, data):
        return data


graph = WorkflowGraph()
graph.connect(Read(), 'output', Show(), 'input')
"""


def test_a_root_fed_a_list_of_bare_items(mapping: MappingCase, dispel4py_hook: None, tmp_path: Path) -> None:
    path = flow(tmp_path, BARE_INPUTS_FLOW)
    data = '{"Read": [1, [1, 2], "x", null, {"a": 1}, {}, 0, [], false]}'
    expected = dispel4py_simple(path, iterations=None, data=data)
    assert [item for _, item in expected["Show1", "output"]] == [1, [1, 2], "x", None, {"a": 1}, {}, 0, [], False]
    graph = aiod4p.load_graph(path)
    got = by_rank(mapping.run(graph, parse_cli_inputs(None, data, None)).by_port(), graph)
    assert {key: multiset(items) for key, items in got.items()} == {
        key: multiset(items) for key, items in expected.items()
    }


# A group-by on int items: dispel4py's simple never computes the key (one instance), its multi fails.
INT_GROUP_BY_FLOW = """
from dispel4py.base import ProducerPE
from dispel4py.core import GenericPE
from dispel4py.workflow_graph import WorkflowGraph


class Numbers(ProducerPE):
    def _process(self, inputs):
        for i in range(6):
            self.write('output', i)


class Count(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input('input', grouping=[0])
        self._add_output('output')

    def process(self, inputs):
        return {'output': inputs['input']}


graph = WorkflowGraph()
graph.connect(Numbers(), 'output', Count(), 'input')
"""


def test_a_group_by_on_int_items_fails_naming_the_pe_and_grouping(
    mapping: MappingCase, dispel4py_hook: None, tmp_path: Path
) -> None:
    path = flow(tmp_path, INT_GROUP_BY_FLOW)
    assert dispel4py_simple(path) == {("Count1", "output"): [0, 1, 2, 3, 4, 5]}
    graph = aiod4p.load_graph(path)
    count = next(pe for pe in graph.flatten().pes.values() if pe.name == "Count")
    with pytest.raises(PEError, match=rf"cannot route item 0 to {count.id}\.input: its group_by\[0\] key failed"):
        mapping.run(graph, 1)
