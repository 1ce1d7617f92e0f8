"""The dispel4py compatibility layer: the import hook and dispel4py's API on aiod4p.

These tests need no real dispel4py: workflows written against dispel4py's API
import it through aiod4p's hook (tests/test_differential.py compares with the
real one).
"""

from __future__ import annotations

import ast
import json
import os
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
from aiod4p.compat.base import ConsumerPE, IterativePE, ProducerPE
from aiod4p.compat.core import GenericPE
from aiod4p.errors import GraphError, InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def d4p(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The hook installed; yields a namespace of dispel4py's modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    compat.install()
    try:
        import dispel4py.base
        import dispel4py.core
        import dispel4py.workflow_graph

        yield dispel4py
    finally:
        compat.uninstall()
        kept = tuple(os.path.join(path, "") for path in (sys.prefix, sys.base_prefix, str(ROOT / "aiod4p")))
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if file and not file.startswith(kept):
                del sys.modules[name]


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def aiod4p_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiod4p", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def records(path: Path) -> dict[tuple[str, str], list[Any]]:
    grouped: dict[tuple[str, str], list[Any]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        grouped.setdefault((record["pe"], record["output"]), []).append(record["data"])
    return grouped


# -- the import hook ---------------------------------------------------------------


def test_the_hook_serves_dispel4py_from_aiod4p(d4p: Any) -> None:
    from dispel4py.base import ConsumerPE, IterativePE, ProducerPE, create_iterative_chain  # noqa: F401
    from dispel4py.core import GROUPING, NAME, TYPE, GenericPE
    from dispel4py.workflow_graph import WorkflowGraph

    assert compat.installed()
    assert issubclass(GenericPE, aiod4p.GenericPE)
    assert issubclass(WorkflowGraph, aiod4p.WorkflowGraph)
    assert (NAME, TYPE, GROUPING) == ("name", "type", "grouping")
    assert GenericPE.__module__ == "aiod4p.compat.core"


def test_the_hook_wins_over_an_installed_dispel4py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "site" / "dispel4py"
    write(real / "__init__.py", "REAL = True\n")
    write(real / "core.py", "raise ImportError('the real dispel4py.core was imported')\n")
    write(real / "extra.py", "from dispel4py.core import GenericPE\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    import dispel4py  # the "real" one, imported before the hook

    assert dispel4py.REAL
    compat.install()
    try:
        import dispel4py.core
        import dispel4py.extra  # not served: found in the real package, importing ours

        assert dispel4py.extra.GenericPE is dispel4py.core.GenericPE
        assert dispel4py.core.GenericPE.__module__ == "aiod4p.compat.core"
    finally:
        compat.uninstall()
    assert sys.modules["dispel4py"].REAL  # restored
    assert "dispel4py.extra" not in sys.modules
    del sys.modules["dispel4py"]


def test_install_and_uninstall_are_idempotent() -> None:
    compat.install()
    compat.install()
    assert sum(isinstance(f, type(sys.meta_path[0])) for f in sys.meta_path) == 1
    compat.uninstall()
    compat.uninstall()
    assert not compat.installed()
    assert not [name for name in sys.modules if name.startswith("dispel4py")]


def test_the_core_never_imports_the_compat_layer() -> None:
    package = ROOT / "aiod4p"
    offenders = []
    for path in package.rglob("*.py"):
        if path.parent.name == "compat" or path.name == "_cli.py":
            continue
        for node in ast.parse(path.read_text()).body:  # module level: a lazy import asks, never loads
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any("compat" in name for name in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    done = subprocess.run(
        [sys.executable, "-c", "import sys, aiod4p, aiod4p.mappings; print('aiod4p.compat' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "False"


# -- dispel4py's PE API -----------------------------------------------------------------


# dispel4py-style PEs, written as a dispel4py user writes them. They live at
# module level (importing aiod4p.compat's classes, which are what the hook
# serves as dispel4py.core/base) so worker processes can unpickle them.


class Counter_(GenericPE):
    def __init__(self) -> None:
        GenericPE.__init__(self)
        self._add_output("output", tuple_type=["number"])
        self.n = 0

    def _process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        self.n += 1
        return {"output": self.n}


class Tagged(GenericPE):
    def __init__(self) -> None:
        GenericPE.__init__(self)
        self.inputconnections["input"] = {"name": "input"}  # set directly
        self.outputconnections["output"] = {"name": "output"}

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"output": (self.instance, inputs["input"])}


class TwoIn(GenericPE):
    def __init__(self) -> None:
        GenericPE.__init__(self)
        self._add_input("a")
        self._add_input("b")
        self._add_output("output")

    def process(self, inputs: dict[str, Any]) -> None:
        assert len(inputs) == 1  # exactly one input per call
        self.write("output", sorted(inputs.items())[0])


class Square(IterativePE):
    def _process(self, data: int) -> int | None:
        return None if data % 5 == 0 else data * data


class Lifecycle(IterativePE):
    def _preprocess(self) -> None:
        self.seen = 0
        self.log("starting")

    def _process(self, data: int) -> None:
        self.seen += 1

    def _postprocess(self) -> None:
        self.log(f"saw {self.seen}")
        self.write("output", self.seen)


class Tens(ProducerPE):
    def _process(self, inputs: dict[str, Any]) -> None:
        for i in range(10):
            self.write("output", i)


class Sink(ConsumerPE):
    def _process(self, data: Any) -> str:
        return "ignored"


class Keyed(IterativePE):
    def _process(self, data: int) -> list[int]:
        return [data % 3, data]


class Where(IterativePE):
    def __init__(self, grouping: Any) -> None:
        IterativePE.__init__(self)
        self._add_input("input", grouping=grouping)
        self.numprocesses = 3

    def _process(self, data: list[int]) -> tuple[int, int]:
        return (self.instance, data[0])


class Stray(IterativePE):
    def _process(self, data: int) -> None:
        self.write("nope", data)


PES: dict[str, type] = {
    "Counter": Counter_,
    "Tagged": Tagged,
    "TwoIn": TwoIn,
    "Square": Square,
    "Lifecycle": Lifecycle,
    "Tens": Tens,
    "Sink": Sink,
}


def build_pes(d4p: Any) -> dict[str, type]:
    return PES


def test_process_return_write_and_lifecycle(d4p: Any, mapping: MappingCase, caplog: pytest.LogCaptureFixture) -> None:
    pes = build_pes(d4p)
    graph = d4p.workflow_graph.WorkflowGraph()
    tens, square, life, sink = pes["Tens"](), pes["Square"](), pes["Lifecycle"](), pes["Sink"]()
    graph.connect(tens, "output", square, "input")
    graph.connect(tens, "output", life, "input")
    graph.connect(tens, "output", sink, "input")
    life.numprocesses = 1
    with caplog.at_level("INFO", logger="aiod4p.pe"):
        results = mapping.run(graph, 1)
    assert sorted(results.data(square.id)) == [1, 4, 9, 16, 36, 49, 64, 81]
    assert results.data(life.id) == [10]
    if mapping.name in ("simple", "async"):  # log records of other processes stay there
        assert any("saw 10" in record.getMessage() for record in caplog.records)


def test_one_input_per_call_on_two_ports(d4p: Any, mapping: MappingCase) -> None:
    pes = build_pes(d4p)
    graph = d4p.workflow_graph.WorkflowGraph()
    one, two, merge = pes["Counter"](), pes["Counter"](), pes["TwoIn"]()
    graph.connect(one, "output", merge, "a")
    graph.connect(two, "output", merge, "b")
    results = mapping.run(graph, 3)
    assert Counter(map(tuple, results.data(merge.id))) == Counter(
        [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3)]
    )


def broadcast_graph(d4p: Any, how: str) -> tuple[Any, Any]:
    graph = d4p.workflow_graph.WorkflowGraph()
    source, tagged = Counter_(), Tagged()
    tagged.numprocesses = 2
    if how == "directly":
        tagged.inputconnections["input"]["grouping"] = "all"
    elif how == "add_input":
        tagged._add_input("input", grouping="all")
    graph.connect(source, "output", tagged, "input")
    if how == "after connect":  # still honoured
        tagged.inputconnections["input"]["grouping"] = "all"
    return graph, tagged


def test_grouping_set_after_connect_is_honoured(d4p: Any, mapping: MappingCase) -> None:
    graph, tagged = broadcast_graph(d4p, "after connect")
    results = mapping.run(graph, 4)
    copies = 1 if mapping.name == "simple" else 2
    if mapping.name in ("multi", "mpi") and mapping.workers == 4:
        copies = 3  # dispel4py's share of 4 processes: int(numprocesses 2 * (4 - 1 root) / (3 - 1 root))
    assert sorted(item for _, item in results.data(tagged.id)) == sorted([1, 2, 3, 4] * copies)
    assert {instance for instance, _ in results.data(tagged.id)} == set(range(copies))


@pytest.mark.parametrize("how", ["directly", "add_input"])
def test_grouping_set_any_way(d4p: Any, how: str) -> None:
    graph, tagged = broadcast_graph(d4p, how)
    results = aiod4p.run(graph, 4, mapping="async", workers=2)
    assert sorted(results.data(tagged.id)) == sorted((i, n) for n in (1, 2, 3, 4) for i in (0, 1))


def test_group_by_and_global(d4p: Any, mapping: MappingCase) -> None:
    pes = build_pes(d4p)
    graph = d4p.workflow_graph.WorkflowGraph()
    source, keyed, by_key, single = pes["Counter"](), Keyed(), Where([0]), Where("global")
    graph.connect(source, "output", keyed, "input")
    graph.connect(keyed, "output", by_key, "input")
    graph.connect(keyed, "output", single, "input")
    results = mapping.run(graph, 30)
    owners: dict[int, set[int]] = {}
    for instance, key in results.data(by_key.id):
        owners.setdefault(key, set()).add(instance)
    assert all(len(instances) == 1 for instances in owners.values()) and len(owners) == 3
    assert {instance for instance, _ in results.data(single.id)} == {0}


def test_numprocesses_sets_the_instances(d4p: Any) -> None:
    pes = build_pes(d4p)
    pe = pes["Tagged"]()
    assert pe.parallelism is None and pe.numprocesses == 1
    pe.numprocesses = 4
    assert pe.parallelism == 4
    from dispel4py.core import GenericPE

    assert GenericPE(numprocesses=3).parallelism == 3


def test_unknown_grouping_names_the_pe_and_port(d4p: Any) -> None:
    pes = build_pes(d4p)
    graph = d4p.workflow_graph.WorkflowGraph()
    tagged = pes["Tagged"]()
    tagged.inputconnections["input"]["grouping"] = "sideways"
    with pytest.raises(GraphError, match=r"Tagged\d+, input 'input': unknown grouping 'sideways'"):
        graph.connect(pes["Counter"](), "output", tagged, "input")


def test_ids_are_numbered_as_dispel4py_does(d4p: Any) -> None:
    from dispel4py.base import SimpleFunctionPE

    pes = build_pes(d4p)
    graph = d4p.workflow_graph.WorkflowGraph()
    source, square = pes["Counter"](), pes["Square"]()
    assert source.id is None  # assigned when first added to a graph
    graph.connect(source, "output", square, "input")
    base = int(source.id.removeprefix("Counter_"))
    assert square.id == f"Square{base + 1}"
    fn = SimpleFunctionPE(abs)
    graph.connect(square, "output", fn, "input")
    assert fn.id == f"PE_abs{base + 2}"


def test_base_pe_ports_and_types(d4p: Any) -> None:
    from dispel4py.base import BasePE

    pe = BasePE(inputs=["x"], outputs=["y"], num_inputs=2, num_outputs=1)
    assert list(pe.inputs) == ["input0", "input1", "x"] and list(pe.outputs) == ["output0", "y"]
    pe._add_output("typed", tuple_type=["word"])
    with pytest.raises(GraphError, match="no output type defined for 'output0'"):
        pe.getOutputTypes()
    pe.outputconnections = {"typed": pe.outputconnections["typed"]}
    assert pe.getOutputTypes() == {"typed": ["word"]}


def test_write_to_an_undeclared_output_names_it(d4p: Any) -> None:
    pes = build_pes(d4p)
    graph = d4p.workflow_graph.WorkflowGraph()
    graph.connect(pes["Counter"](), "output", Stray(), "input")
    with pytest.raises(aiod4p.PEError, match="undeclared output port 'nope'"):
        aiod4p.run(graph, 1, mapping="simple")


# -- composites ------------------------------------------------------------------------


def add_one(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return x * 2


def scale(x: int, by: int) -> int:
    return x * by


def test_iterative_chains_nested_composites_and_fan_in(d4p: Any, mapping: MappingCase) -> None:
    from dispel4py.base import CompositePE, create_iterative_chain

    def build(composite: Any, factor: int) -> None:
        inner = create_iterative_chain([add_one, (scale, {"by": factor})])  # a composite inside
        last = create_iterative_chain([double])  # one function: its PE joins at flatten
        composite.connect(inner, "output", last, "input")
        composite._map_input("input", inner, "input")
        composite._map_output("output", last, "output")

    pes = build_pes(d4p)
    outer = CompositePE(build, {"factor": 10})
    graph = d4p.workflow_graph.WorkflowGraph()
    one, two = pes["Counter"](), pes["Counter"]()
    graph.connect(one, "output", outer, "input")
    graph.connect(two, "output", outer, "input")  # dispel4py keeps only the first; both count
    results = mapping.run(graph, 3)
    ((pe_id, port),) = results.by_port()
    assert pe_id.startswith("PE_double") and port == "output"
    assert sorted(results.data()) == sorted([(x + 1) * 10 * 2 for x in (1, 2, 3)] * 2)


def test_a_module_level_composite_is_not_the_graph(d4p: Any, tmp_path: Path) -> None:
    path = write(
        tmp_path / "chained.py",
        """
        from dispel4py.base import create_iterative_chain
        from dispel4py.core import GenericPE
        from dispel4py.workflow_graph import WorkflowGraph

        def inc(x):
            return x + 1

        class One(GenericPE):
            def __init__(self):
                GenericPE.__init__(self)
                self._add_output('output')
            def _process(self, inputs):
                return {'output': 1}

        composite = create_iterative_chain([inc, inc])
        graph = WorkflowGraph()
        graph.connect(One(), 'output', composite, 'input')
        """,
    )
    graph = aiod4p.load_graph(str(path))
    assert aiod4p.run(graph, 2, mapping="simple").data() == [3, 3]


# -- inputs, as dispel4py reads them ---------------------------------------------------

INPUTS_FLOW = """
from dispel4py.core import GenericPE
from dispel4py.workflow_graph import WorkflowGraph


class Source(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input('input')
        self._add_output('output')
        self.n = 0

    def _process(self, inputs):
        self.n += 1
        return {'output': inputs.get('input', self.n)}


class Show(GenericPE):
    def __init__(self):
        GenericPE.__init__(self)
        self._add_input('input')
        self._add_output('output')

    def process(self, inputs):
        return {'output': inputs['input']}


graph = WorkflowGraph()
graph.connect(Source(), 'output', Show(), 'input')
"""


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["-i", "3"], [1, 2, 3]),
        (["-d", '{"Source0": 2}'], [1, 2]),  # by id
        (["-d", '{"Source": [{"input": "a"}, {}]}'], ["a", 2]),  # by name; a list of input dicts
        (["-d", '{"Source": 1}', "-i", "5"], [1]),  # -d wins over -i
        (["-f", "in.json", "-d", '{"Source": 1}', "-i", "5"], [1, 2, 3, 4]),  # -f wins over -d
    ],
)
def test_cli_inputs_as_dispel4py(tmp_path: Path, options: list[str], expected: list[Any]) -> None:
    flow = write(tmp_path / "inputs_flow.py", INPUTS_FLOW)
    (tmp_path / "in.json").write_text('{"Source0": 4}')
    out = tmp_path / "out.jsonl"
    done = aiod4p_cli("run", str(flow), "--mapping", "simple", "--results", str(out), *options, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert records(out) == {("Show1", "output"): expected}


def test_cli_rejects_an_unknown_input_key(tmp_path: Path) -> None:
    flow = write(tmp_path / "inputs_flow.py", INPUTS_FLOW)
    done = aiod4p_cli("run", str(flow), "-d", '{"Nobody": 1}', cwd=tmp_path)
    assert done.returncode == 1
    assert "'Nobody' names no PE" in done.stderr


def test_a_root_with_inputs_absent_from_data_gets_nothing(d4p: Any, mapping: MappingCase, tmp_path: Path) -> None:
    graph = aiod4p.load_graph(str(write(tmp_path / "inputs_flow.py", INPUTS_FLOW)))
    assert mapping.run(graph, {}).data() == []
    with pytest.raises(InputError):
        mapping.run(graph, {"Show": 1})  # not a root


# -- files inside a dispel4py package --------------------------------------------------


def test_cli_runs_a_file_inside_a_dispel4py_package(tmp_path: Path) -> None:
    package = tmp_path / "dispel4py"
    write(package / "__init__.py", "")
    write(package / "examples" / "__init__.py", "")
    write(package / "examples" / "mine" / "__init__.py", "")
    write(
        package / "examples" / "mine" / "pes.py",
        """
        from dispel4py.base import ProducerPE, IterativePE

        class Numbers(ProducerPE):
            def __init__(self):
                ProducerPE.__init__(self)
                self.n = 0
            def _process(self, inputs):
                self.n += 1
                return self.n

        class Negate(IterativePE):
            def _process(self, data):
                return -data
        """,
    )
    flow = write(
        package / "examples" / "mine" / "flow.py",
        """
        from dispel4py.examples.mine.pes import Numbers, Negate
        from dispel4py.workflow_graph import WorkflowGraph

        graph = WorkflowGraph()
        graph.connect(Numbers(), 'output', Negate(), 'input')
        """,
    )
    out = tmp_path / "out.jsonl"
    done = aiod4p_cli("run", str(flow), "-i", "3", "--mapping", "async", "--results", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert records(out) == {("Negate1", "output"): [-1, -2, -3]}


# -- failure paths ----------------------------------------------------------------------


def test_declaration_errors(d4p: Any) -> None:
    from dispel4py.base import SimpleFunctionPE, create_iterative_chain

    pe = Tagged()
    with pytest.raises(GraphError, match="input port 'input' declared twice"):
        pe.add_input("input")
    with pytest.raises(GraphError, match="output port 'output' declared twice"):
        pe.add_output("output")
    pe.add_input("more", "all")
    assert pe.inputconnections["more"] == {"name": "more", "grouping": "all"}
    pe.add_output("extra")
    assert "extra" in pe.outputs
    with pytest.raises(ValueError, match="at least one function"):
        create_iterative_chain([])
    with pytest.raises(TypeError, match="has no compute_fn"):
        SimpleFunctionPE()._process(1)


def test_bad_composite_mappings_name_the_composite(d4p: Any) -> None:
    from dispel4py.base import CompositePE

    def bad_input(composite: Any) -> None:
        composite.inputmappings["input"] = "not a pair"

    graph = d4p.workflow_graph.WorkflowGraph()
    graph.connect(Counter_(), "output", CompositePE(bad_input), "input")
    with pytest.raises(GraphError, match=r"input 'input' must map to \(pe, port\), not 'not a pair'"):
        graph.flatten()

    def two_outputs(composite: Any) -> None:
        a, b = Square(), Square()
        composite.outputmappings["output"] = [(a, "output"), (b, "output")]

    graph = d4p.workflow_graph.WorkflowGraph()
    graph.connect(CompositePE(two_outputs), "output", Square(), "input")
    with pytest.raises(GraphError, match="output 'output' must map to exactly one inner output"):
        graph.flatten()

    from aiod4p.compat.workflow_graph import as_pe

    with pytest.raises(GraphError, match="set those instead"):
        as_pe(CompositePE()).inputs = {"x": aiod4p.InputPort("x")}


def test_pickles_rebuild_pes_and_refuse_what_they_cannot(d4p: Any) -> None:
    import pickle

    from aiod4p.compat.core import _rebuild

    pe = Square()
    pe.numprocesses = 2
    clone = pickle.loads(pickle.dumps(pe))
    assert type(clone) is Square and clone.parallelism == 2 and list(clone.inputs) == ["input"]

    class Local(IterativePE):
        def _process(self, data: int) -> int:
            return data

    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(Local())
    mixed = type("Mixed", (Square,), {})  # a class mixed at run time, as ProcessTimingPE does
    assert type(pickle.loads(pickle.dumps(mixed()))).__bases__ == (Square,)
    with pytest.raises(GraphError, match="cannot import no_such_module"):
        _rebuild(("no_such_module", "X", ()))
    with pytest.raises(GraphError, match="is not a class here"):
        _rebuild(("test_compat", "PES", ()))
    with pytest.raises(GraphError, match="not a dispel4py PE class"):
        _rebuild(("aiod4p._pe", "InputPort", ()))
