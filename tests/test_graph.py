"""Building and validating graphs: errors name the PE and the port."""

from __future__ import annotations

from pathlib import Path

import pytest
import workflows as wf

from aiod4p import (
    ALL,
    GLOBAL,
    PE,
    SHUFFLE,
    CompositePE,
    GenericPE,
    GraphError,
    GroupBy,
    IterativePE,
    ProducerPE,
    WorkflowGraph,
    chain,
    group_by,
    iterative,
    run,
    to_dot,
)
from aiod4p._groupings import as_grouping
from aiod4p.storm import build_project


def test_ids_are_name_and_counter_in_order_of_first_add() -> None:
    graph = WorkflowGraph()
    a, b = wf.Count(), wf.Double()
    graph.connect(a, "output", b, "input")
    number_a = int(a.id.removeprefix("Count"))
    assert b.id == f"Double{number_a + 1}"
    graph.add(a)
    assert a.id == f"Count{number_a}"


def test_explicit_id_is_kept() -> None:
    graph = WorkflowGraph()
    pe = wf.Double()
    pe.id = "mine"
    graph.add(pe)
    assert pe.id == "mine"


def test_unknown_output_port() -> None:
    source = wf.Count()
    with pytest.raises(GraphError, match=r"Count\d* has no output port 'out' \(outputs: \['output'\]\)"):
        WorkflowGraph().connect(source, "out", wf.Double(), "input")


def test_unknown_input_port() -> None:
    with pytest.raises(GraphError, match=r"Double\d* has no input port 'in'"):
        WorkflowGraph().connect(wf.Count(), "output", wf.Double(), "in")


def test_required_input_left_unconnected() -> None:
    graph = WorkflowGraph()
    merge = wf.Merge()
    graph.connect(wf.Count(), "output", merge, "left")
    with pytest.raises(GraphError, match=rf"{merge.id}: required input port 'right' is not connected"):
        graph.flatten()


def test_optional_input_may_stay_unconnected() -> None:
    graph = WorkflowGraph()
    pe = GenericPE(outputs=["output"])
    pe.add_input("input")
    pe.add_input("extra", required=False)
    graph.connect(wf.Count(), "output", pe, "input")
    assert len(graph.flatten().edges) == 1


class _Nothing(GenericPE):
    """Declares ports, handles nothing."""

    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["output"])


class _Dispel4pyStyle(ProducerPE):
    """aiod4p's ProducerPE written with dispel4py's method."""

    def _process(self, inputs: object) -> int:
        return 1


class _Dispel4pyGeneric(GenericPE):
    """aiod4p's GenericPE written with dispel4py's method: dispel4py has a GenericPE, and no PE."""

    def __init__(self) -> None:
        super().__init__(outputs=["output"])

    def _process(self, inputs: object) -> None:
        return None


@pytest.mark.parametrize(
    ("pe", "expected"),
    [
        (_Nothing(), r"_Nothing does not implement process\(\)$"),
        (
            _Dispel4pyStyle(),
            r"_Dispel4pyStyle does not implement produce\(\): _process\(\) is dispel4py's name for it; name it"
            r" produce\(\) for aiod4p's ProducerPE, or import ProducerPE from dispel4py.base",
        ),
        (
            _Dispel4pyGeneric(),
            r"_Dispel4pyGeneric does not implement process\(\): _process\(\) is dispel4py's name for it; name it"
            r" process\(\) for aiod4p's GenericPE, or import GenericPE from dispel4py.base",
        ),
    ],
)
def test_a_pe_that_handles_no_items_is_refused_before_a_run(pe: PE, expected: str, tmp_path: Path) -> None:
    """It failed on its first item, once workers, ranks or a Storm topology had started. A graph still being drawn
    may have such PEs: it is drawn."""
    graph = WorkflowGraph()
    graph.add(pe)
    assert pe.id in to_dot(graph)
    with pytest.raises(GraphError, match=rf"PE {pe.id}: {expected}"):
        run(graph, 1, mapping="multi")
    with pytest.raises(GraphError, match=rf"PE {pe.id}: {expected}"):
        build_project(graph, tmp_path / "topology", inputs=1)


def test_a_pe_whose_work_is_in_postprocess_runs() -> None:
    class Total(GenericPE):
        def __init__(self) -> None:
            super().__init__(outputs=["output"])

        def postprocess(self) -> None:
            self.write("output", 42)

    graph = WorkflowGraph()
    graph.add(total := Total())
    assert run(graph, {total.id: []}).data() == [42]


def test_a_handler_set_on_the_instance_counts() -> None:
    pe = IterativePE()
    pe.process_item = lambda item: item + 1  # type: ignore[method-assign]
    graph = WorkflowGraph()
    graph.add(pe)
    assert run(graph, {pe.id: [{"input": 1}]}).data() == [2]


def test_cycle_is_rejected_with_its_path() -> None:
    graph = WorkflowGraph()
    a, b = wf.Merge(), wf.Merge()
    graph.connect(wf.Count(), "output", a, "left")
    graph.connect(a, "output", b, "left")
    graph.connect(b, "output", a, "right")
    graph.connect(wf.Count(), "output", b, "right")
    with pytest.raises(GraphError, match=rf"cycle: ({a.id} -> {b.id} -> {a.id}|{b.id} -> {a.id} -> {b.id})"):
        graph.flatten()


def test_duplicate_ids_are_rejected() -> None:
    graph = WorkflowGraph()
    a, b = wf.Double(), wf.Double()
    a.id = b.id = "same"
    graph.connect(wf.Count(), "output", a, "input")
    graph.connect(a, "output", b, "input")
    with pytest.raises(GraphError, match="duplicate PE id 'same'"):
        graph.flatten()


def test_adding_something_that_is_not_a_pe() -> None:
    with pytest.raises(GraphError, match="not a PE"):
        WorkflowGraph().add("Count")  # type: ignore[arg-type]


def test_a_pe_whose_init_forgot_super_init_is_named() -> None:
    # It failed with "'Scale' object has no attribute 'id'".
    class Scale(IterativePE):
        def __init__(self, factor: int) -> None:
            self.factor = factor

        def process_item(self, item: int) -> int:
            return item * self.factor

    with pytest.raises(GraphError, match=r"a Scale .*: its __init__ must call super\(\)\.__init__\(\)"):
        WorkflowGraph().connect(wf.Count(), "output", Scale(2), "input")


def test_adding_a_pe_class_or_factory_says_what_to_add() -> None:
    with pytest.raises(GraphError, match=r"it is a PE class, not a PE: add an instance, Count\(\.\.\.\)"):
        WorkflowGraph().connect(wf.Count, "output", wf.Double(), "input")  # type: ignore[arg-type]

    @iterative
    def double(item: int) -> int:
        return 2 * item

    with pytest.raises(GraphError, match=r"not a PE but a callable: call it if it makes PEs .*FunctionPE\(fn\)"):
        WorkflowGraph().connect(wf.Count(), "output", double, "input")  # type: ignore[arg-type]


def test_port_declared_twice() -> None:
    pe = GenericPE(inputs=["input"])
    with pytest.raises(GraphError, match="input port 'input' declared twice"):
        pe.add_input("input")


def test_composite_ports_are_rewired() -> None:
    graph = WorkflowGraph()
    composite = chain(wf.Double(), wf.Double())
    source = wf.Count()
    graph.connect(source, "output", composite, "input")
    flat = graph.flatten()
    assert composite.id in flat.composites
    assert [e.source for e in flat.edges if e.source == source.id]
    assert all(e.dest != composite.id for e in flat.edges)


def test_unmapped_composite_port() -> None:
    composite = CompositePE()
    composite.inputs["input"] = wf.Double().inputs["input"]
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", composite, "input")
    with pytest.raises(GraphError, match="input 'input' is not mapped"):
        graph.flatten()


def test_composite_port_mapped_to_a_port_its_inner_pe_lacks() -> None:
    composite = CompositePE()
    inner = wf.Double()
    composite.map_input("input", inner, "inptu")
    composite.map_output("output", inner, "output")
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", composite, "input")
    with pytest.raises(GraphError, match=r"input 'input' is mapped to PE Double\d+'s input port 'inptu', which it"):
        graph.flatten()
    composite = CompositePE()
    composite.map_input("input", inner := wf.Double(), "input")
    composite.map_output("output", inner, "outptu")
    graph = WorkflowGraph()
    graph.connect(composite, "output", wf.Double(), "input")
    with pytest.raises(GraphError, match=r"output 'output' is mapped .* \(outputs: \['output'\]\)"):
        graph.flatten()


def test_composite_input_mapped_to_several_inner_pes() -> None:
    composite = CompositePE()
    first, second = wf.Double(), wf.Double()
    composite.map_input("input", first, "input")
    composite.map_input("input", second, "input")
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", composite, "input")
    assert {e.dest for e in graph.flatten().edges} == {first.id, second.id}


def test_grouping_declared_after_construction_is_used() -> None:
    graph = WorkflowGraph()
    pe = wf.Double()
    graph.connect(wf.Count(), "output", pe, "input")
    pe.inputs["input"].grouping = ALL
    assert graph.flatten().edges[0].grouping == ALL


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, SHUFFLE),
        ("shuffle", SHUFFLE),
        ("all", ALL),
        ("global", GLOBAL),
        ([0], GroupBy((0,))),
        ((1, 2), GroupBy((1, 2))),
    ],
)
def test_dispel4py_grouping_values(value: object, expected: object) -> None:
    assert as_grouping(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["sideways", [], 3.5])
def test_bad_grouping_values(value: object) -> None:
    with pytest.raises(ValueError, match="unknown grouping"):
        as_grouping(value)  # type: ignore[arg-type]


def test_group_by_needs_indices_or_key() -> None:
    with pytest.raises(ValueError, match="either key indices or a key function"):
        group_by()


def test_group_by_refuses_a_key_function_given_as_an_index() -> None:
    # group_by(fn) built, then failed the run on the first item: "key failed (KeyError: <function ...>)".
    def station(item: dict[str, str]) -> str:
        return item["station"]

    with pytest.raises(TypeError, match=r"^group_by\(station\): a key function is passed as group_by\(key=station\)$"):
        group_by(station)  # type: ignore[arg-type]
    assert group_by(key=station).key_of({"station": "ST01"}) == "ST01"
