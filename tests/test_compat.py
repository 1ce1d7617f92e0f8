"""The dispel4py compatibility layer: the import hook and dispel4py's API on aiod4p.

These tests need no real dispel4py: workflows written against dispel4py's API
import it through aiod4p's hook (tests/test_differential.py compares with the
real one).
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MappingCase
from helpers import aiod4p_cli

import aiod4p
from aiod4p import compat
from aiod4p._install import install_hint
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


def test_star_imports_give_the_names_dispel4pys_modules_hold(d4p: Any) -> None:
    # dispel4py's modules hold the names they import: `from dispel4py.base import *` then `WorkflowGraph()` ran there
    from dispel4py.core import NAME, GenericPE
    from dispel4py.workflow_graph import WorkflowGraph

    held = {
        "dispel4py.base": {"NAME": NAME, "WorkflowGraph": WorkflowGraph, "GenericPE": GenericPE},
        "dispel4py.workflow_graph": {"GenericPE": GenericPE, "WorkflowGraph": WorkflowGraph},
        "dispel4py.utils": {"WorkflowGraph": WorkflowGraph},
    }
    for module, names in held.items():
        namespace: dict[str, Any] = {}
        exec(f"from {module} import *", namespace)
        assert {name: namespace.get(name) for name in names} == names, module


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


class Ranked(GenericPE):
    """Writes dispel4py's ``self.rank`` once per instance, at the end."""

    def __init__(self) -> None:
        GenericPE.__init__(self)
        self._add_input("input")
        self._add_output("output")

    def _process(self, inputs: dict[str, Any]) -> None:
        return None

    def _postprocess(self) -> None:
        self.write("output", self.rank)


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


class TensWithMetadata(ProducerPE):
    """Writes as dispel4py 2.0's provenance PEs do, in a workflow run with provenance off."""

    def _process(self, inputs: dict[str, Any]) -> None:
        for i in range(10):
            self.write("output", i, metadata={"i": i}, location="file://tens.txt", format="int")


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
    graph.connect(TensWithMetadata(), "output", square_too := pes["Square"](), "input")
    life.numprocesses = 1
    with caplog.at_level("INFO", logger="aiod4p.pe"):
        results = mapping.run(graph, 1)
    assert sorted(results.data(square.id)) == sorted(results.data(square_too.id)) == [1, 4, 9, 16, 36, 49, 64, 81]
    assert results.data(life.id) == [10]
    if mapping.name in ("simple", "async"):  # log records of other processes stay there
        assert any("saw 10" in record.getMessage() for record in caplog.records)


def test_only_a_class_that_writes_with_keywords_pays_for_them() -> None:
    """dispel4py ignores ``write``'s provenance keywords with provenance off; taking them costs a call per write, so
    the classes that never pass them keep the engine's own ``write``."""
    core_write = aiod4p.GenericPE.write
    assert Tens.write is Tens._write is core_write
    assert TensWithMetadata.write is not core_write and TensWithMetadata._write is TensWithMetadata.write
    assert type("Made", (ProducerPE,), {}).write is core_write  # no method of its own
    namespace: dict[str, Any] = {}
    exec("def _process(self, inputs):\n    return None\n", namespace)
    assert type("Unread", (ProducerPE,), {"_process": namespace["_process"]}).write is not core_write
    assert EmitsThroughAMixin.write is not core_write
    assert EmitsInADecoratedMethod.write is not core_write and EmitsInAProperty.write is not core_write


class Tags:
    """A mixin that is no PE: its ``write`` tags what the PE it is mixed into writes."""

    def write(self, name: str, data: Any) -> None:
        IterativePE.write(self, name, ["tagged", data])  # type: ignore[arg-type]


class Emits:
    """A mixin that is no PE: its method writes with keywords for the PE it is mixed into."""

    def emit(self, item: int) -> None:
        self.write("output", item, metadata={"item": item})  # type: ignore[attr-defined]


class EmitsThroughAMixin(ProducerPE, Emits):
    def _process(self, inputs: dict[str, Any]) -> None:
        self.emit(1)


def _timed(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def timed(*args: Any) -> Any:
        return method(*args)

    return timed


class EmitsInADecoratedMethod(ProducerPE):
    @_timed
    def _process(self, inputs: dict[str, Any]) -> None:
        self.write("output", 1, location="file://one")


class EmitsInAProperty(ProducerPE):
    @property
    def emitted(self) -> int:
        self.write("output", 1, metadata={"one": 1})
        return 1

    def _process(self, inputs: dict[str, Any]) -> None:
        assert self.emitted == 1


def _emit(pe: Any, item: int) -> None:
    """A helper of the workflow's module that writes for the PE calling it, with a provenance keyword."""
    pe.write("output", item, metadata={"item": item})


class EmitsThroughAHelper(ProducerPE):
    """Passes ``write`` its keywords in a helper (:func:`_emit`), not in a method."""

    def _process(self, inputs: dict[str, Any]) -> None:
        for item in range(3):
            _emit(self, item)


class EmitsThroughALaterHelper(ProducerPE):
    """Passes ``write`` its keywords in a helper defined after the class (:func:`_emit_later`)."""

    def _process(self, inputs: dict[str, Any]) -> None:
        for item in range(3):
            _emit_later(self, -item)


def _emit_later(pe: Any, item: int) -> None:
    """:func:`_emit`, defined after a class that calls it."""
    pe.write("output", item, location="file://later.txt")


class CountsWhatItWrites(ProducerPE):
    """A ``write`` of its own, with dispel4py's signature, that hands the keywords it is given on to its base's."""

    def __init__(self) -> None:
        ProducerPE.__init__(self)
        self.written = 0

    def write(self, name: str, data: Any, **kwargs: Any) -> None:
        self.written += 1
        super().write(name, [self.written, data], **kwargs)

    def _process(self, inputs: dict[str, Any]) -> None:
        for item in range(3):
            self.write("output", item, location="file://counted.txt")


@pytest.mark.parametrize("case", [MappingCase("simple", None), MappingCase("mpi", 2)], ids=lambda case: case.id)
def test_write_keywords_passed_in_a_helper_or_through_a_write_of_its_own_are_ignored(
    d4p: Any, case: MappingCase
) -> None:
    """dispel4py's ``write(name, data, **kwargs)`` ignores its keywords (with provenance off) wherever the call is.
    dispel4py 2.0's provenance workflows pass them (``metadata=``, ``location=``: dispel4py2-0/Dispel4Py,
    prov/test/rtxcorr/rtxcorr3.py); passed in a helper of the module, or through a PE's own ``write`` to
    ``super().write(name, data, **kwargs)``, the run failed: ``TypeError: PE.write() got an unexpected keyword
    argument 'metadata'``. A helper defined after the class is found once the module has run."""
    graph = d4p.workflow_graph.WorkflowGraph()
    graph.add(helped := EmitsThroughAHelper())
    graph.add(counting := CountsWhatItWrites())
    graph.add(helped_later := EmitsThroughALaterHelper())
    results = case.run(graph, 1)
    assert results.data(helped.id) == [0, 1, 2]
    assert results.data(helped_later.id) == [0, -1, -2]
    assert results.data(counting.id) == [[1, 0], [2, 1], [3, 2]]
    assert EmitsThroughAHelper.write is not aiod4p.PE.write  # it pays for the keywords; Tens, beside it, does not
    assert Tens.write is aiod4p.PE.write


def test_every_instance_has_a_rank_of_its_own(d4p: Any, mapping: MappingCase) -> None:
    graph = d4p.workflow_graph.WorkflowGraph()
    graph.connect(Counter_(), "output", ranked := Ranked(), "input")
    ranked.numprocesses = 3
    ranks = mapping.run(graph, 6).data(ranked.id)
    assert len(set(ranks)) == len(ranks) >= 1 and all(
        isinstance(rank, int) and rank >= 1 for rank in ranks
    )  # 0: Counter_


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


class CountingSource(ProducerPE):
    """A stateful dispel4py root given ``numprocesses = 3``: dispel4py runs a root once, whatever it says."""

    def __init__(self) -> None:
        ProducerPE.__init__(self)
        self.numprocesses = 3
        self.calls = 0

    def _process(self, inputs: Any) -> int:
        self.calls += 1
        return self.calls


@pytest.mark.parametrize(
    "mapping",
    [MappingCase("simple", None), MappingCase("async", None), MappingCase("async", 3), MappingCase("multi", 2)],
    ids=lambda case: case.id,
)
def test_a_dispel4py_root_runs_once_whatever_its_numprocesses(mapping: MappingCase) -> None:
    """async gave it 3 instances (and multi, with too few workers for dispel4py's rule): `-i 4` made [1, 2, 1, 1]
    where dispel4py's every mapping makes [1, 2, 3, 4]. The planner decides, alike for every mapping."""
    graph = aiod4p.WorkflowGraph()
    graph.add(source := CountingSource())
    assert sorted(mapping.run(graph, 4).data(source.id)) == [1, 2, 3, 4]


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


def test_dispel4py_2_names(d4p: Any) -> None:
    from dispel4py.base import BasePE

    pe = BasePE(inputs=None, outputs=None, num_outputs=1)  # dispel4py 2.0's defaults
    assert list(pe.inputs) == [] and list(pe.outputs) == ["output0"]
    pe._add_output("output0", tuple_type=["word"])
    pe.set_input_types({"input0": ["word"]})
    assert pe.get_output_types() == {"output0": ["word"]}
    graph = d4p.workflow_graph.WorkflowGraph()
    graph.connect(pe, "output0", square := Square(), "input")
    assert graph.get_contained_objects() == graph.getContainedObjects() == [pe, square]


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


class Journal(ConsumerPE):
    """A consumer as dispel4py workflows write them: its file opened, and a lock made, in ``__init__``."""

    def __init__(self, path: Path) -> None:
        ConsumerPE.__init__(self)
        self.out = open(path, "a")  # noqa: SIM115 (held open for the run, as such PEs do)
        self.lock = threading.Lock()
        self.seen: list[int] = []

    def _process(self, data: int) -> None:
        with self.lock:
            self.out.write(f"{data}\n")
            self.out.flush()
        self.seen.append(data)


@pytest.mark.parametrize("name", ["simple", "async"])
def test_a_pe_holding_an_open_file_runs_in_process(d4p: Any, tmp_path: Path, name: str) -> None:
    # dispel4py's simple mapping runs the PE object itself; aiod4p's copies, and failed on the file:
    # what cannot be copied is shared with the copy, and said so, the rest is copied still.
    graph = d4p.workflow_graph.WorkflowGraph()
    journal = Journal(tmp_path / "journal.txt")
    graph.connect(Counter_(), "output", journal, "input")
    aiod4p.run(graph, 3, mapping=name, workers=2)
    journal.out.close()
    assert sorted((tmp_path / "journal.txt").read_text().split()) == ["1", "2", "3"]
    assert journal.seen == []


def test_a_shared_attribute_is_named_once_per_class(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Holder(Journal):  # a class of its own: the warning is given once per class and attribute
        pass

    holder = Holder(tmp_path / "journal.txt")
    with caplog.at_level(logging.WARNING, logger="aiod4p.compat"):
        copies = [copy.deepcopy(holder) for _ in range(3)]
    holder.out.close()
    assert all(c.out is holder.out and c.lock is holder.lock and c.seen is not holder.seen for c in copies)
    warned = sorted(record.getMessage() for record in caplog.records)
    assert len(warned) == 2 and "attribute 'lock' cannot be copied" in warned[0] and "'out'" in warned[1]
    assert all("the PE's instances share it" in message for message in warned)


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


def test_a_chain_of_dispel4py_2_function_pes(d4p: Any, tmp_path: Path) -> None:
    # dispel4py 2.0 names the PE class of create_iterative_chain function_pe_class (download_FDSN.py).
    path = write(
        tmp_path / "chain2.py",
        """
        from dispel4py.base import SimpleFunctionPE, ProducerPE, create_iterative_chain
        from dispel4py.workflow_graph import WorkflowGraph

        class Logged(SimpleFunctionPE):
            def _process(self, data):
                return ('logged', SimpleFunctionPE._process(self, data))

        def inc(x):
            return x + 1

        class One(ProducerPE):
            def _process(self, inputs):
                return 1

        chain = create_iterative_chain([inc], function_pe_class=Logged)
        graph = WorkflowGraph()
        graph.connect(One(), 'output', chain, 'input')
        """,
    )
    graph = aiod4p.load_graph(str(path))
    assert aiod4p.run(graph, 2, mapping="simple").data() == [("logged", 2), ("logged", 2)]
    from dispel4py.base import SimpleFunctionPE, create_iterative_chain

    with pytest.raises(TypeError, match="FunctionPE_class or function_pe_class, not both"):
        create_iterative_chain([abs], Tagged, function_pe_class=SimpleFunctionPE)


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


def test_an_input_dict_naming_none_of_a_roots_ports_is_warned_about(
    d4p: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # -d '{"Source": [{"inptu": "a"}]}': dispel4py hands the dict to process() as it is, and so does aiod4p,
    # where Source's inputs.get('input', ...) silently takes its default; a misspelt key was never said.
    graph = aiod4p.load_graph(str(write(tmp_path / "inputs_flow.py", INPUTS_FLOW)))
    with caplog.at_level("WARNING", logger="aiod4p.inputs"):
        assert aiod4p.run(graph, {"Source": [{"inptu": "a"}, {"input": "b"}]}, mapping="simple").data() == [1, "b"]
    (source,) = graph.flatten().roots()
    assert caplog.messages == [
        f"the input for PE {source} names 'inptu', none of its input ports ('input'); its process() gets it as it is"
    ]


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

    # dispel4py's own test_dot_composite maps a graph's input to a producer's port that does not exist:
    # a KeyError from deep inside the flattening, where the graph can name what is wrong.
    inner = d4p.workflow_graph.WorkflowGraph()
    producer = Counter_()
    inner.connect(producer, "output", Square(), "input")
    inner.inputmappings = {"input": (producer, "input")}
    graph = d4p.workflow_graph.WorkflowGraph()
    graph.connect(Counter_(), "output", inner, "input")
    with pytest.raises(GraphError, match=r"input 'input' is mapped to PE \w+'s input port 'input', which it does not"):
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
    emitting = type("Emitting", (Square, Emits), {})  # ... of a base that writes with keywords: write is its own
    assert emitting.write is not aiod4p.GenericPE.write
    assert type(pickle.loads(pickle.dumps(emitting()))).__bases__ == (Square, Emits)
    tagging = type("Tagging", (Tags, Square), {})  # ... of a base with a write of its own: process is its own
    assert tagging.process is not Square.process
    assert type(pickle.loads(pickle.dumps(tagging()))).__bases__ == (Tags, Square)
    with pytest.raises(GraphError, match="cannot import no_such_module"):
        _rebuild(("no_such_module", "X", ()))
    with pytest.raises(GraphError, match="is not a class here"):
        _rebuild(("test_compat", "PES", ()))
    with pytest.raises(GraphError, match="not a dispel4py PE class"):
        _rebuild(("aiod4p._pe", "InputPort", ()))


# -- issue 16: dispel4py workflows from the wild -----------------------------------------

# The four mappings, with worker processes started by spawn for multi: a fresh
# interpreter, as MPI ranks are, that must load the workflow's code itself.
FRESH_MAPPINGS = [
    ["--mapping", "simple"],
    ["--mapping", "async"],
    ["--mapping", "multi", "-n", "2"],
    ["--mapping", "mpi", "-n", "2"],
]


def fresh_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``aiod4p`` with multi's workers started by spawn."""
    return aiod4p_cli(*args, cwd=cwd, env={**os.environ, "AIOD4P_START_METHOD": "spawn"})


OPENS_IN_INIT = """
import os

from dispel4py.base import ConsumerPE, ProducerPE
from dispel4py.workflow_graph import WorkflowGraph


class Numbers(ProducerPE):
    def _process(self, inputs):
        for i in range(20):
            self.write("output", i)


class Save(ConsumerPE):
    def __init__(self):
        ConsumerPE.__init__(self)
        self.out = open("saved-%d-%d.txt" % (os.getpid(), id(self)), "w")

    def _process(self, data):
        self.out.write("%s\\n" % data)
        self.out.flush()


graph = WorkflowGraph()
graph.connect(Numbers(), "output", Save(), "input")
"""


@pytest.mark.parametrize("options", FRESH_MAPPINGS[2:], ids=lambda o: o[1])
def test_a_pe_opening_a_file_in_init_opens_it_again_in_each_worker(tmp_path: Path, options: list[str]) -> None:
    """dispel4py's mpi runs a PE that opens its file in ``__init__``: every rank builds the graph, opening its own.
    aiod4p pickles the PEs to the ranks (and to spawned workers), and refused the file: a PE whose ``__init__``
    takes no argument now opens it again where it arrives."""
    write(tmp_path / "saving.py", OPENS_IN_INIT)
    done = fresh_cli("run", "saving.py", *options, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = [line for path in tmp_path.glob("saved-*.txt") for line in path.read_text().split()]
    assert sorted(map(int, written)) == list(range(20))
    # Made with an argument, it might not be made the same way again: refused, naming the attribute.
    source = OPENS_IN_INIT.replace("def __init__(self):", "def __init__(self, prefix='saved'):")
    write(tmp_path / "saving_as.py", source)
    done = fresh_cli("run", "saving_as.py", *options, cwd=tmp_path)
    assert done.returncode == 1 and "PE Save1 cannot be pickled" in done.stderr
    assert "its attribute 'out' (a TextIOWrapper) cannot" in done.stderr


class ReadLines(ProducerPE):
    """dispel4py's way of reading a file named by ``-d '{"read": [{"input": "file"}]}'``."""

    def _process(self, inputs: dict[str, Any]) -> None:
        with open(inputs["input"]) as lines:
            for line in lines:
                self.write("output", line.strip())


class ReadGeneric(GenericPE):
    """An output-only GenericPE reading ``inputs["input"]``."""

    def __init__(self) -> None:
        GenericPE.__init__(self)
        self._add_output("output")

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"output": inputs["input"].upper()}


class Shout(IterativePE):
    def _process(self, data: str) -> str:
        return data.upper()


def test_a_root_with_no_input_ports_takes_dispel4py_input_dicts(d4p: Any, mapping: MappingCase, tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("a\nb\nc\n")
    graph = d4p.workflow_graph.WorkflowGraph()
    read, generic = ReadLines(), ReadGeneric()
    read.name, generic.name = "read", "generic"
    graph.connect(read, "output", Shout(), "input")
    graph.add(generic)
    results = mapping.run(graph, {"read": [{"input": str(words)}], "generic": [{"input": "x"}, {"input": "y"}]})
    assert sorted(results.data()) == ["A", "B", "C", "X", "Y"]


class CountTo(ProducerPE):
    """Keeps its own ``parallelism`` (how many numbers), set before the base class's ``__init__``."""

    def __init__(self) -> None:
        self.parallelism = 3
        ProducerPE.__init__(self)

    def _process(self, inputs: dict[str, Any]) -> None:
        for i in range(self.parallelism):
            self.write("output", i)


class KeepsOwnPorts(GenericPE):
    """Keeps its own ``outputs`` (a list), ``inputs`` (a dict) and ``parallelism`` (a string)."""

    def __init__(self) -> None:
        GenericPE.__init__(self)
        self._add_input("input")
        self._add_output("output")
        self.outputs = []
        self.inputs = {}
        self.parallelism = "auto"

    def process(self, inputs: Any) -> dict[str, Any]:
        item = inputs["input"]
        self.inputs[item] = True
        self.outputs.append(item * 10)
        return {"output": (self.outputs[-1], item in self.inputs, self.parallelism)}


def test_a_pe_keeping_its_own_outputs_inputs_and_parallelism(d4p: Any, mapping: MappingCase) -> None:
    graph = d4p.workflow_graph.WorkflowGraph()
    keeper = KeepsOwnPorts()
    graph.connect(CountTo(), "output", keeper, "input")
    assert keeper.outputs == [] and keeper.inputs == {} and keeper.parallelism == "auto"
    assert list(keeper._input_ports) == ["input"] and keeper._parallelism is None
    assert sorted(mapping.run(graph, 1).data()) == [(0, True, "auto"), (10, True, "auto"), (20, True, "auto")]
    unset = Square()
    assert list(unset.inputs) == ["input"] and list(unset.outputs) == ["output"] and unset.parallelism is None


class Echo(ProducerPE):
    def _process(self, inputs: Any) -> Any:
        return ["got", inputs]


def test_a_root_with_no_input_ports_takes_bare_items_as_dispel4py(d4p: Any, mapping: MappingCase) -> None:
    # Two roots side by side, one launch: one fed bare items, the other a count.
    graph = d4p.workflow_graph.WorkflowGraph()
    graph.add(echo := Echo())
    graph.add(counted := Echo())
    items = [1, [1, 2], "x", None, {"a": 1}, {}, 0, [], False]
    results = mapping.run(graph, {echo.id: items, counted.id: 2})
    assert {record.pe for record in results} == {echo.id, counted.id}
    got = results.data(echo.id)
    assert sorted(map(repr, got)) == sorted(repr(["got", item]) for item in items)
    assert results.data(counted.id) == [["got", {}], ["got", {}]]


def test_aiod4ps_own_pes_refuse_undeclared_input_ports() -> None:
    # aiod4p's API keeps its contract: input dicts name declared input ports, so a
    # misspelt port fails the run instead of being silently ignored.
    graph = aiod4p.WorkflowGraph()
    graph.add(NativeOne())
    # The error says which port the dict names that the PE has not (it said the input "must be a dict" of a dict).
    with pytest.raises(
        InputError,
        match=r"input for PE NativeOne\d+ names port 'input', which it does not have \(its input ports: none\),"
        r" in \{'input': 'f'\}$",
    ):
        aiod4p.run(graph, {"NativeOne": [{"input": "f"}]}, mapping="async")


class NativeOne(aiod4p.ProducerPE):
    def produce(self) -> int:
        return 1


@pytest.mark.parametrize("options", FRESH_MAPPINGS, ids=lambda o: o[1])
def test_cli_feeds_a_file_name_to_a_root(tmp_path: Path, options: list[str]) -> None:
    (tmp_path / "words.txt").write_text("a\nb\n")
    flow = write(
        tmp_path / "reader.py",
        """
        from dispel4py.base import ProducerPE, IterativePE
        from dispel4py.workflow_graph import WorkflowGraph

        class Read(ProducerPE):
            def _process(self, inputs):
                with open(inputs['input']) as lines:
                    for line in lines:
                        self.write('output', line.strip())

        class Shout(IterativePE):
            def _process(self, data):
                return data.upper()

        read = Read()
        read.name = 'read'
        graph = WorkflowGraph()
        graph.connect(read, 'output', Shout(), 'input')
        """,
    )
    out = tmp_path / "out.jsonl"
    data = '{"read": [{"input": "words.txt"}]}'
    done = fresh_cli("run", str(flow), *options, "-d", data, "--results", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(records(out)[("Shout1", "output")]) == ["A", "B"]


@pytest.mark.parametrize("options", FRESH_MAPPINGS, ids=lambda o: o[1])
def test_cli_names_the_line_of_the_pe_that_failed(tmp_path: Path, options: list[str]) -> None:
    # A tutorial's reader fed -d with a misspelt key: dispel4py's traceback showed the line; the one-line
    # error names it too, from whichever process the PE ran in.
    flow = write(
        tmp_path / "reader.py",
        """
        from dispel4py.base import ProducerPE
        from dispel4py.workflow_graph import WorkflowGraph

        class Read(ProducerPE):
            def _process(self, inputs):
                with open(inputs['input']) as lines:
                    self.write('output', lines.read())

        read = Read()
        read.name = 'read'
        graph = WorkflowGraph()
        graph.add(read)
        """,
    )
    done = fresh_cli("run", str(flow), *options, "-d", '{"read": [{"inptu": "words.txt"}]}', cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"aiod4p: error: PE read0[0] failed on feed: KeyError: 'input' ({flow}, line 7, in _process;"
        " inputs={'inptu': 'words.txt'})"
    )


class Numbers(ProducerPE):
    def __init__(self) -> None:
        ProducerPE.__init__(self)
        self.n = 0

    def _process(self, inputs: dict[str, Any]) -> int:
        self.n += 1
        return self.n


class RunningCount(IterativePE):
    """Ungrouped and stateful: its results depend on how many instances share the items."""

    def __init__(self) -> None:
        IterativePE.__init__(self)
        self.count = 0

    def _process(self, data: int) -> int:
        self.count += 1
        return self.count


# Instances of RunningCount in Numbers -> RunningCount: dispel4py's rule on multi and mpi
# (the root one process, RunningCount int(1 * (N - 1) / 1)), aiod4p's own elsewhere, and
# aiod4p's own where N = 1 is too few for dispel4py's rule.
COUNTER_INSTANCES = {
    "simple": 1,
    "async": 1,
    "async-n3": 3,
    "multi-n1": 1,
    "multi-n2": 1,
    "multi-n4": 3,
    "mpi-n1": 1,
    "mpi-n2": 1,
    "mpi-n4": 3,
    "ray-n2": 1,
}


def test_instances_are_shared_out_as_dispel4py_does(d4p: Any, mapping: MappingCase) -> None:
    graph = d4p.workflow_graph.WorkflowGraph()
    counter = RunningCount()
    graph.connect(Numbers(), "output", counter, "input")
    instances = COUNTER_INSTANCES[mapping.id]
    run = aiod4p.WorkflowRun(graph, 6, mapping=mapping.name, workers=mapping.workers)
    assert run.plan.placement[counter.id].parallelism == instances
    results = mapping.run(graph, 6)
    # Shuffle deals the six items round robin: each instance counts its share.
    assert sorted(results.data(counter.id)) == sorted(list(range(1, 6 // instances + 1)) * instances)


def test_dispel4py_rule_places_instances_on_consecutive_workers(d4p: Any) -> None:
    from aiod4p.compat.processor import place, process_counts

    graph = d4p.workflow_graph.WorkflowGraph()
    source, heavy, light = Numbers(), RunningCount(), Shout()
    heavy.numprocesses = 2
    graph.connect(source, "output", heavy, "input")
    graph.connect(heavy, "output", light, "input")
    flat = graph.flatten()
    # total = 1 root + 2 + 1 = 4; 6 processes: heavy int(2 * 5 / 3) = 3, light int(1 * 5 / 3) = 1
    assert process_counts(flat, 6) == {source.id: 1, heavy.id: 3, light.id: 1}
    assert place(flat, 6) == {source.id: (0,), heavy.id: (1, 2, 3), light.id: (4,)}
    assert place(flat, 6, 2) == {source.id: (0,), heavy.id: (1, 0, 1), light.id: (0,)}  # 2 workers: in turn
    assert process_counts(flat, 3) is None and place(flat, 3) == {}  # too few: aiod4p's own rule
    plan = aiod4p.make_plan(flat, aiod4p.PlanOptions(workers=3))
    assert plan.placement[heavy.id].parallelism == 2  # numprocesses as the instance count
    assert plan.placement[light.id].parallelism == 3  # one per process
    # -n 3 on 2 CPUs (aiod4p run starts 2 workers): the instances of -n 3, whatever the workers
    capped = aiod4p.make_plan(flat, aiod4p.PlanOptions(workers=2, processes=3))
    assert {pe: p.parallelism for pe, p in capped.placement.items()} == {
        pe: p.parallelism for pe, p in plan.placement.items()
    }
    assert set(capped.placement[light.id].workers) == {0, 1}


def test_graph_and_stats_show_dispel4pys_instance_counts(tmp_path: Path) -> None:
    flow = write(
        tmp_path / "counting.py",
        """
        from dispel4py.base import ProducerPE, IterativePE
        from dispel4py.workflow_graph import WorkflowGraph

        class Numbers(ProducerPE):
            def _process(self, inputs):
                return 1

        class Count(IterativePE):
            def _process(self, data):
                return data

        graph = WorkflowGraph()
        graph.connect(Numbers(), 'output', Count(), 'input')
        """,
    )
    done = aiod4p_cli(
        "graph", str(flow), "--mapping", "multi", "-n", "4", "--oversubscribe", "-o", "g.dot", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "Count · ×3 on workers 1-3" in (tmp_path / "g.dot").read_text()
    options = ["--mapping", "multi", "-n", "4", "--oversubscribe", "-i", "6", "-q", "--stats-json", "s.json"]
    done = aiod4p_cli("run", str(flow), *options, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    assert Counter(entry["pe"] for entry in stats["instances"]) == {"Numbers0": 1, "Count1": 3}


TUTORIAL = """
from dispel4py.base import ProducerPE, IterativePE
from dispel4py.workflow_graph import WorkflowGraph
from dispel4py.new import simple_process
from dispel4py.new.processor import STATUS_TERMINATED


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
results = simple_process.process_and_return(graph, {producer: 4})
print('TUTORIAL', results)
"""


@pytest.mark.parametrize("options", FRESH_MAPPINGS, ids=lambda o: o[1])
def test_a_tutorial_module_that_runs_itself_at_import(tmp_path: Path, options: list[str]) -> None:
    flow = write(tmp_path / "tutorial.py", TUTORIAL)
    out = tmp_path / "out.jsonl"
    done = fresh_cli("run", str(flow), *options, "-i", "2", "--results", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # The module's own run (simple_process at import), once: worker processes
    # importing the module to rebuild its PEs do not run it again.
    assert done.stdout.count("TUTORIAL {'Square1': {'output': [1, 4, 9, 16]}}") == 1
    assert "TUTORIAL {}" not in done.stdout  # nor print what the module prints
    # Then aiod4p's run of the graph, -i 2, from the PEs as built: the import-time run left the user's
    # producer untouched (dispel4py's would have advanced its counter to 5: every run is isolated here).
    assert sorted(records(out)[("Square1", "output")]) == [1, 4]


@pytest.mark.parametrize("options", FRESH_MAPPINGS, ids=lambda o: o[1])
def test_what_a_module_writes_to_stderr_at_import_is_shown_once(tmp_path: Path, options: list[str]) -> None:
    """A warning (a library's, or dispel4py's provenance options aiod4p ignores) or a message on stderr as the
    module loads: the launcher shows it, the worker processes that import the module again do not (each
    repeated it, -n times)."""
    flow = write(
        tmp_path / "noisy.py",
        "import sys, warnings\nwarnings.warn('catalogue is old')\nprint('loading catalogue', file=sys.stderr)\n"
        + TUTORIAL.replace("results = simple_process.process_and_return(graph, {producer: 4})\n", "").replace(
            "print('TUTORIAL', results)\n", ""
        ),
    )
    done = fresh_cli("run", str(flow), *options, "-i", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("UserWarning: catalogue is old") == 1
    assert done.stderr.count("loading catalogue") == 1


def test_mapping_entry_points(d4p: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from dispel4py.new import mpi_process, multi_process, processor, simple_process

    def fresh() -> tuple[Any, Any]:
        graph = d4p.workflow_graph.WorkflowGraph()
        producer = Numbers()
        graph.connect(producer, "output", Shout_(), "input")
        return graph, producer

    graph, producer = fresh()
    assert simple_process.process_and_return(graph, {producer: 3}) == {graph.pes[1].id: {"output": [-1, -2, -3]}}
    for module in (multi_process, mpi_process):
        graph, producer = fresh()
        module.process(graph, {producer: 2}, argparse.Namespace(num=2))
        assert f"Outputs: {{'{graph.pes[1].id}': {{'output': " in capsys.readouterr().out
    assert processor.STATUS_TERMINATED == 12
    graph, producer = fresh()
    args = argparse.Namespace(file=None, data='{"Numbers": 2}', iter=1)
    assert processor.create_inputs(args, graph) == {producer.id: 2}
    # dispel4py's own processor_test: malformed JSON and a missing file are ValueErrors (and InputErrors).
    for bad in (argparse.Namespace(file=None, data="{not valid", iter=1), argparse.Namespace(file="/nope", iter=1)):
        with pytest.raises(ValueError) as raised:
            processor.create_inputs(bad, None)
        assert isinstance(raised.value, InputError)
    assert processor.get_inputs(producer, {producer.id: 5}) == 5
    with pytest.raises(NotImplementedError, match="resultmappings"):
        simple_process.process_and_return(graph, {producer: 1}, {"x": ["output"]})


class Shout_(IterativePE):
    def _process(self, data: int) -> int:
        return -data


def test_workflow_graph_drawing_functions(d4p: Any, tmp_path: Path) -> None:
    # dispel4py's rapid-assessment workflows import write_image (and call it only when asked):
    # the import alone failed, so the workflows did not load.
    from dispel4py.workflow_graph import WorkflowGraph, draw, drawDot, write_image

    graph = WorkflowGraph()
    numbers = Numbers()
    graph.connect(numbers, "output", Shout_(), "input")
    assert draw(graph).startswith("digraph") and numbers.id in draw(graph)
    if shutil.which("dot") is None:
        return  # Graphviz (Debian package graphviz) is needed to render
    write_image(graph, str(tmp_path / "flow.png"))
    assert (tmp_path / "flow.png").read_bytes().startswith(b"\x89PNG")
    assert drawDot(graph, "svg").lstrip().startswith(b"<?xml") and drawDot(graph).startswith(b"\x89PNG")


def test_visualisation_displays_the_graph_in_a_notebook(d4p: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # dispel4py's notebooks and tutorials draw their graph with `from dispel4py.visualisation import display`.
    ipython_display = pytest.importorskip("IPython.display")
    from dispel4py.visualisation import display
    from dispel4py.workflow_graph import WorkflowGraph

    graph = WorkflowGraph()
    graph.connect(Numbers(), "output", Shout_(), "input")
    shown: list[tuple[bytes, bool]] = []
    monkeypatch.setattr(ipython_display, "display_png", lambda data, raw: shown.append((data, raw)))
    if shutil.which("dot") is None:
        return  # Graphviz (Debian package graphviz) is needed to render
    display(graph)
    assert len(shown) == 1 and shown[0][0].startswith(b"\x89PNG") and shown[0][1]


def test_dispel4py_utils(d4p: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dispel4py import utils

    flow = write(tmp_path / "reader_flow.py", TUTORIAL.split("results =")[0])
    assert utils.load_graph(str(flow)) is not None
    assert utils.load_graph(str(tmp_path / "none.py")) is None
    assert "Failed to load graph" in capsys.readouterr().err
    probe = (
        "from aiod4p import compat; compat.install(); from dispel4py.utils import make_hash;"
        " print(make_hash({'a': [1, (2,)]}))"
    )
    hashes = {
        subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(hashes) == 1  # the same in every interpreter, unlike dispel4py's


@pytest.mark.parametrize("options", FRESH_MAPPINGS, ids=lambda o: o[1])
def test_examples_span_an_installed_dispel4py_and_the_workflows_tree(
    tmp_path: Path, options: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed dispel4py (with examples of its own) and a source tree whose
    # workflow imports its neighbour and an installed example by package path.
    installed = tmp_path / "site"
    write(installed / "dispel4py" / "__init__.py", "")
    write(installed / "dispel4py" / "examples" / "__init__.py", "")
    write(installed / "dispel4py" / "examples" / "shipped" / "__init__.py", "")
    write(
        installed / "dispel4py" / "examples" / "shipped" / "testing_pes.py",
        """
        from dispel4py.base import ProducerPE

        class One(ProducerPE):
            def _process(self, inputs):
                return 1
        """,
    )
    tree = tmp_path / "tree" / "dispel4py"
    write(tree / "__init__.py", "")
    write(tree / "examples" / "__init__.py", "")
    write(tree / "examples" / "mine" / "__init__.py", "")
    write(
        tree / "examples" / "mine" / "pes.py",
        """
        from dispel4py.base import IterativePE

        class Negate(IterativePE):
            def _process(self, data):
                return -data
        """,
    )
    flow = write(
        tree / "examples" / "mine" / "flow.py",
        """
        from dispel4py.examples.mine.pes import Negate
        from dispel4py.examples.shipped.testing_pes import One
        from dispel4py.workflow_graph import WorkflowGraph

        graph = WorkflowGraph()
        graph.connect(One(), 'output', Negate(), 'input')
        """,
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out.jsonl"
    done = fresh_cli("run", str(flow), *options, "-i", "2", "--results", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert records(out) == {("Negate1", "output"): [-1, -1]}


@pytest.mark.parametrize("options", FRESH_MAPPINGS, ids=lambda o: o[1])
def test_a_workflow_file_that_is_not_a_module_name(tmp_path: Path, options: list[str]) -> None:
    plain = TUTORIAL.split("results =")[0].replace("from dispel4py.new.processor import STATUS_TERMINATED\n", "")
    flow = write(tmp_path / "my-first-graph.py", plain.replace("from dispel4py.new import simple_process\n", ""))
    out = tmp_path / "out.jsonl"
    done = fresh_cli("run", str(flow), *options, "-i", "3", "--results", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(records(out)[("Square1", "output")]) == [1, 4, 9]


@pytest.mark.parametrize("options", FRESH_MAPPINGS, ids=lambda o: o[1])
def test_a_workflow_exiting_at_import_says_so(tmp_path: Path, options: list[str]) -> None:
    flow = write(tmp_path / "exits.py", "import sys\nsys.exit(3)\n")
    done = fresh_cli("run", str(flow), *options, "-i", "1", cwd=tmp_path)
    assert done.returncode == 1
    assert f"workflow {flow} exited (sys.exit(3)) while being imported" in done.stderr
    done = fresh_cli("run", "exits", *options, cwd=tmp_path)  # imported by module name
    assert done.returncode == 1
    assert "workflow exits exited (sys.exit(3)) while being imported" in done.stderr


def test_dispel4py_pes_make_the_calls_native_pes_make(d4p: Any) -> None:
    # Engine changes to PE.write carry over, and per item no call is added: a PE class that passes write no
    # keywords gets the engine's own (the base class takes dispel4py's keywords, for those that do).
    class Sink(ConsumerPE):
        def _process(self, data: int) -> None:
            pass

    for cls in (Sink, Numbers):
        assert cls.write is aiod4p.PE.write and cls._write is aiod4p.PE.write, cls
    sink, producer = Sink(), Numbers()
    assert sink._item_function() == (sink._process, None)
    produce, port = producer._item_function()
    assert port == "output" and produce.func == producer._process and produce.args == ({},)


def test_code_shipment_names_what_a_worker_cannot_import(
    d4p: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    from aiod4p import _loading

    flow = write(tmp_path / "my-flow.py", TUTORIAL.split("results =")[0])
    graph = aiod4p.load_graph(str(flow))
    shipment = _loading.ship_code(pickle.dumps(graph.flatten().pes))
    assert shipment.files == (("workflow", str(flow.resolve())),) and shipment.dispel4py
    assert _loading.ship_code(pickle.dumps([1, "two"])).files == ()
    # A later run of another graph, whose PEs come from the module ``workflows``, named "workflow" in bytes
    # only: it shipped this file, which its ranks then failed to import (the dispel4py hook gone by then).
    import workflows

    assert _loading.ship_code(pickle.dumps([workflows.Count(), "a workflow", "workflow.py"])).files == ()
    monkeypatch.setattr(_loading, "_worker", False)  # load() marks this process as a worker
    gone = _loading.CodeShipment((("gone_flow", str(tmp_path / "gone.py")),))
    with pytest.raises(aiod4p.errors.TargetError, match=r"importing workflow .*gone.py failed: FileNotFoundError"):
        gone.load()
    exits = _loading.CodeShipment((("exits_flow", str(write(tmp_path / "exits.py", "raise SystemExit(4)\n"))),))
    with pytest.raises(aiod4p.errors.TargetError, match=r"exits.py exited \(sys.exit\(4\)\) while being imported"):
        exits.load()
    assert _loading.in_worker()


# -- issue 16 point 3: dispel4py.provenance and dispel4py.seismo on aiod4p's provenance ----

pytest.importorskip("prov")  # aiod4p[provenance]: the PROV documents below are written with it

from aiod4p.compat.provenance import ProvenanceIterativePE, ProvenanceType  # noqa: E402
from aiod4p.compat.seismo import SeismoPE, SeismoSimpleFunctionPE  # noqa: E402

PROV_MAPPINGS = [("simple", None), ("async", None), ("multi", 2), ("mpi", 2)]


class ProvNumbers(ProvenanceType, ProducerPE):
    """A dispel4py 2.0 provenance-aware producer: writes with metadata."""

    def _process(self, inputs: Any) -> None:
        for number in range(1, 5):
            self.write("output", number, metadata={"parity": number % 2})


class ProvSquare(ProvenanceIterativePE):
    def _process(self, data: int) -> int:
        return data * data


class ProvTotal(ProvenanceType, GenericPE):
    """A stateful provenance PE: its total derives from the state it kept (addToProvState / dep)."""

    def __init__(self) -> None:
        ProvenanceType.__init__(self)
        self._add_input("input", grouping="global")
        self._add_output("output")
        self.total = 0

    def process(self, inputs: dict[str, Any]) -> None:
        self.total += inputs["input"]
        self.addToProvState("total")

    def postprocess(self) -> None:
        self.write("output", ("total", self.total), dep=["total"])


def prov_graph(d4p: Any) -> tuple[Any, Any]:
    graph = d4p.workflow_graph.WorkflowGraph()
    numbers, square, total = ProvNumbers(), ProvSquare(), ProvTotal()
    graph.connect(numbers, "output", square, "input")
    graph.connect(square, "output", total, "input")
    return graph, numbers


@pytest.mark.parametrize("case", PROV_MAPPINGS, ids=lambda c: c[0])
def test_dispel4py_provenance_workflow_writes_prov_that_traces(
    d4p: Any, case: tuple[str, int | None], tmp_path: Path
) -> None:
    from dispel4py.provenance import configure_prov_run

    from aiod4p.compat.mappings import process_and_return

    graph, numbers = prov_graph(d4p)
    path = tmp_path / "run.json"
    run_id = configure_prov_run(
        graph, username="me", workflowId="w1", workflowName="squares", runId="r1", provenance_file=str(path)
    )
    assert run_id == "r1"
    outputs = process_and_return(graph, {numbers: 1}, mapping=case[0], workers=case[1])
    assert list(outputs.values()) == [{"output": [("total", 30)]}]
    lineage = aiod4p.read_lineage(str(path))
    (result,) = lineage.find("('total', 30)")
    assert sorted(lineage.values[source] for source in lineage.sources(result)) == ["1", "2", "3", "4"]
    assert '"aiod4p:parity"' in path.read_text()  # write(..., metadata=...) is recorded on the PE's agent
    done = subprocess.run(
        [sys.executable, "-m", "aiod4p", "provenance", str(path), "--trace", "total"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "4 sources" in done.stdout, done.stdout + done.stderr


def test_configure_prov_run_sprov_config_and_level(d4p: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dispel4py.new import simple_process
    from dispel4py.provenance import ProvenanceSimpleFunctionPE, configure_prov_run, injectProv

    monkeypatch.chdir(tmp_path)
    graph = d4p.workflow_graph.WorkflowGraph()
    numbers = ProvNumbers()
    graph.connect(numbers, "output", ProvenanceSimpleFunctionPE(abs), "input")
    assert injectProv(graph, ProvenanceType) is graph
    star: dict[str, Any] = {}
    exec("from dispel4py.provenance import *", star)  # as dispel4py's seismo modules import it
    assert star["IterativePE"] is IterativePE and star["ProvenanceType"] is ProvenanceType
    run_id = configure_prov_run(
        graph, sprovConfig={"s-prov:run-id": "cfg", "s-prov:save-mode": "file"}, provenance_level="pe"
    )
    assert run_id == "cfg"
    assert simple_process.process_and_return(graph, {numbers: 1}) == {graph.pes[1].id: {"output": [1, 2, 3, 4]}}
    assert "aiod4p:Stream" in (tmp_path / "prov-cfg.json").read_text()  # level pe: streams, not items


def test_dispel4py_provenance_options_without_equivalent_warn_or_fail(d4p: Any, tmp_path: Path) -> None:
    from dispel4py.provenance import configure_prov_run

    from aiod4p.errors import Aiod4pError

    graph, _ = prov_graph(d4p)
    path = str(tmp_path / "p.json")
    with pytest.warns(UserWarning, match=r"save_mode='service' is not supported .*a file instead \(.*p\.json, or the"):
        configure_prov_run(graph, save_mode="service", provenance_file=path)
    with pytest.warns(UserWarning, match=r"ignores sel_rules=.*aiod4p has no equivalent"):
        configure_prov_run(graph, sel_rules={"CorrCoef": {"rules": {"rho": {"$gt": 0}}}}, provenance_file=path)
    with pytest.warns(UserWarning, match=r"ignores provRecorderClass="):
        configure_prov_run(graph, provRecorderClass=GenericPE, provenance_file=path)
    with pytest.warns(UserWarning, match=r"injectProv ignores componentsType="):
        configure_prov_run(graph, componentsType={"ProvSquare": {"s-prov:type": ["SeismoPE"]}}, provenance_file=path)
    with pytest.raises(Aiod4pError, match=r"unknown save_mode 'cloud'"):
        configure_prov_run(graph, save_mode="cloud")
    with pytest.raises(Aiod4pError, match=r"configure_prov_run: .*'row'"):
        configure_prov_run(graph, provenance_level="row")


PROVENANCE_FLOW = """
from dispel4py.base import IterativePE, ProducerPE
from dispel4py.provenance import configure_prov_run
from dispel4py.workflow_graph import WorkflowGraph


class Numbers(ProducerPE):
    def _process(self, inputs):
        for number in range(1, 5):
            self.write("output", number, metadata={"number": number})


class Square(IterativePE):
    def _process(self, data):
        return data * data


graph = WorkflowGraph()
graph.connect(Numbers(), "output", Square(), "input")
configure_prov_run(graph, runId="asked", save_mode="service")
"""


def test_the_cli_records_the_provenance_a_dispel4py_workflow_asks_for(tmp_path: Path) -> None:
    """``configure_prov_run`` under ``aiod4p run`` was ignored (its warning named a file never written); it now
    writes the file it names, unless ``--provenance FILE`` chooses another."""
    (tmp_path / "asks.py").write_text(PROVENANCE_FLOW)
    done = aiod4p_cli("run", "asks.py", "-i", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "configure_prov_run asks for provenance: writing prov-asked.json" in done.stderr
    lineage = aiod4p.read_lineage(str(tmp_path / "prov-asked.json"))
    (result,) = lineage.find("16")
    assert [lineage.values[source] for source in lineage.sources(result)] == ["4"]
    (tmp_path / "prov-asked.json").unlink()
    done = aiod4p_cli("run", "asks.py", "-i", "1", "--provenance-level", "pe", cwd=tmp_path)
    assert done.returncode == 0 and "ignored" not in done.stderr, done.stderr
    assert "aiod4p:Stream" in (tmp_path / "prov-asked.json").read_text()  # level pe: streams, not items
    (tmp_path / "prov-asked.json").unlink()
    done = aiod4p_cli("run", "asks.py", "-i", "1", "--provenance", "chosen.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "chosen.json").exists() and not (tmp_path / "prov-asked.json").exists()


def test_the_file_a_dispel4py_workflow_asks_provenance_in_is_not_the_results_file(tmp_path: Path) -> None:
    """`--results` naming the file ``configure_prov_run`` names is refused (exit 2), as `--provenance` naming it
    is: the provenance would replace the results."""
    (tmp_path / "asks.py").write_text(PROVENANCE_FLOW)
    done = aiod4p_cli("run", "asks.py", "-i", "1", "--results", "prov-asked.json", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "aiod4p: error: --results prov-asked.json and the workflow's configure_prov_run file prov-asked.json are"
        " the same file, which would keep only one of them: give each its own"
    )


class Doubled(IterativePE):
    """A plain PE written for a run that configure_prov_run made provenance-aware: it writes with metadata."""

    def _process(self, data: int) -> None:
        self.write("output", 2 * data, metadata={"doubled": data})


class Merged(GenericPE):
    def __init__(self) -> None:
        GenericPE.__init__(self)
        self._add_input("input", grouping="global")
        self._add_output("output")
        self.seen: list[int] = []

    def _process(self, inputs: dict[str, Any]) -> None:
        self.seen.append(inputs["input"])

    def _postprocess(self) -> None:
        self.write("output", sorted(self.seen), metadata={"count": len(self.seen)})


@pytest.mark.parametrize("case", PROV_MAPPINGS, ids=lambda c: c[0])
def test_configure_prov_run_makes_every_pe_provenance_aware(
    d4p: Any, case: tuple[str, int | None], tmp_path: Path
) -> None:
    # dispel4py 2.0's prov_testing/mySplitMerge_prov.py: pattern types from `import *`, plain PEs writing
    # metadata once configure_prov_run has injected ProvenanceType into every PE.
    from dispel4py.provenance import AccumulateFlow, Nby1Flow, configure_prov_run

    from aiod4p.compat.mappings import process_and_return

    graph = d4p.workflow_graph.WorkflowGraph()
    numbers, doubled, merged = ProvNumbers(), Doubled(), Merged()
    graph.connect(numbers, "output", doubled, "input")
    graph.connect(doubled, "output", merged, "input")
    path = tmp_path / "run.json"
    components = {"Merged": {"s-prov:type": (AccumulateFlow, Nby1Flow), "s-prov:prov-cluster": "demo"}}
    configure_prov_run(graph, provImpClass=(ProvenanceType,), provenance_file=str(path))
    with pytest.warns(UserWarning, match="injectProv ignores componentsType="):
        configure_prov_run(  # again: the types mix into the classes the first call made
            graph, sprovConfig={"s-prov:componentsType": components}, provImpClass=(ProvenanceType,),
            provenance_file=str(path),
        )  # fmt: skip
    assert isinstance(doubled, ProvenanceType) and isinstance(merged, AccumulateFlow)
    assert isinstance(merged, Nby1Flow) and type(merged).__name__ == "Merged"
    assert isinstance(pickle.loads(pickle.dumps(merged)), AccumulateFlow)  # as multi and mpi ship it
    outputs = process_and_return(graph, {numbers: 1}, mapping=case[0], workers=case[1])
    assert outputs == {merged.id: {"output": [[2, 4, 6, 8]]}}
    assert '"aiod4p:doubled"' in path.read_text() and '"aiod4p:count"' in path.read_text()


class Transfers(ProvenanceType, IterativePE):
    def _process(self, data: int) -> None:
        self.write("output", data, location="file://x", format="text/plain")


def test_provenance_write_keywords_without_equivalent_warn_once(d4p: Any) -> None:
    graph = d4p.workflow_graph.WorkflowGraph()
    graph.connect(ProvNumbers(), "output", Transfers(), "input")
    with pytest.warns(UserWarning) as warned:
        results = aiod4p.run(graph, mapping="simple", provenance="item")
    assert sorted(results.data()) == [1, 2, 3, 4]
    messages = sorted(str(w.message) for w in warned)
    assert messages == [
        "dispel4py.provenance on aiod4p: Transfers.write ignores the keyword 'format'",
        "dispel4py.provenance on aiod4p: Transfers.write ignores the keyword 'location'",
    ]


# A seismology workflow in dispel4py 2.0's style: SeismoPE subclasses over obspy streams.


class SyntheticStations(SeismoPE, ProducerPE):
    """One synthetic three-sample-per-second stream per station (no download)."""

    def _process(self, inputs: Any) -> None:
        import numpy as np
        import obspy

        for index, station in enumerate(("AAA", "BBB", "CCC")):
            header = {"network": "XX", "station": station, "channel": "HHZ", "sampling_rate": 3.0}
            data = np.sin(np.arange(30, dtype=np.float64)) * (index + 1) + index
            self.write("output", obspy.Stream([obspy.Trace(data=data, header=header)]))


def demean(stream: Any) -> Any:
    return stream.copy().detrend("demean")


class PeakAmplitude(SeismoPE, IterativePE):
    def _process(self, stream: Any) -> tuple[str, float]:
        trace = stream[0]
        return trace.stats.station, round(float(abs(trace.data).max()), 3)


@pytest.mark.parametrize("case", [("simple", None), ("multi", 2)], ids=lambda c: c[0])
def test_seismo_workflow_over_obspy_streams(d4p: Any, case: tuple[str, int | None], tmp_path: Path) -> None:
    pytest.importorskip("obspy")  # aiod4p[seismo]
    from dispel4py.provenance import configure_prov_run
    from dispel4py.seismo.seismo import SeismoPE as Served

    from aiod4p.compat.mappings import process_and_return

    assert Served is SeismoPE
    graph = d4p.workflow_graph.WorkflowGraph()
    stations, peak = SyntheticStations(), PeakAmplitude()
    graph.connect(stations, "output", SeismoSimpleFunctionPE(demean), "input")
    graph.connect(graph.pes[1], "output", peak, "input")
    path = tmp_path / "seismo.json"
    configure_prov_run(graph, username="me", workflowId="s", workflowName="peaks", provenance_file=str(path))
    outputs = process_and_return(graph, {stations: 1}, mapping=case[0], workers=case[1])
    peaks = dict(outputs[peak.id]["output"])
    assert sorted(peaks) == ["AAA", "BBB", "CCC"] and peaks["CCC"] > peaks["BBB"] > peaks["AAA"] > 0.9
    text = path.read_text()
    assert '"aiod4p:0:station"' in text and "HHZ" in text and "http://seis-prov.eu/ns/#" in text
    lineage = aiod4p.read_lineage(str(path))
    assert len(lineage.find("AAA")) == 1


def test_seismo_without_obspy_names_the_extra(d4p: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from aiod4p.compat.seismo import stream_metadata
    from aiod4p.errors import Aiod4pError

    monkeypatch.setitem(sys.modules, "obspy", None)
    with pytest.raises(Aiod4pError, match="needs obspy, which is not installed") as failure:
        stream_metadata([1, 2])
    assert install_hint("seismo") in str(failure.value)


PROV_TUTORIAL = """
from dispel4py.provenance import *
from dispel4py.base import ProducerPE
from dispel4py.new import multi_process


class Read(ProvenanceType, ProducerPE):
    def _process(self, inputs):
        for i in range(1, 4):
            self.write("output", i, metadata={"parity": i % 2})


class Double(ProvenanceIterativePE):
    def _process(self, data):
        return 2 * data


graph = WorkflowGraph()
read = Read()
graph.connect(read, "output", Double(), "input")
configure_prov_run(graph, username="me", workflowId="w", workflowName="double", runId="tut")
print("TUTORIAL", multi_process.process_and_return(graph, {read: 1}))
"""


def test_a_provenance_tutorial_runs_itself_on_spawned_multi_workers(tmp_path: Path) -> None:
    # Workers in fresh interpreters rebuild the module's ProvenanceType PEs; the
    # module's own run writes prov-<runId>.json where it runs.
    flow = write(tmp_path / "prov-tutorial.py", PROV_TUTORIAL)
    done = fresh_cli("run", str(flow), "--mapping", "simple", "-i", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("TUTORIAL {'Double1': {'output': [2, 4, 6]}}") == 1, done.stdout
    lineage = aiod4p.read_lineage(str(tmp_path / "prov-tut.json"))
    (result,) = lineage.find("6")
    assert [lineage.values[source] for source in lineage.sources(result)] == ["3"]
