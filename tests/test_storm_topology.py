"""The storm mapping's topology generation: read the generated definition back through streamparse."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import json
import pickle
import site
import subprocess
import sys
import sysconfig
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("streamparse", reason="the storm extra is not installed")

import test_differential as differential
from storm_harness import Component, read_components
from test_differential import dispel4py_hook  # noqa: F401 - a fixture
from workflows import Count, Double, Merge, Tag, WhoSawWhat, multi_edge, parity

from aiod4p import GenericPE, PlanOptions, WorkflowGraph, group_by, load_graph
from aiod4p._cli import main
from aiod4p.errors import GraphError, InputError, TargetError, TransportError
from aiod4p.storm import WireError, build_jar, build_project, decode, encode, encode_key
from aiod4p.storm._project import target_name
from aiod4p.storm._spec import SPEC_FILE

ROOT = Path(__file__).resolve().parents[1]
EOS = ("aiod4p_eos", ["pe"])

# Per example, by PE name: (kind, parallelism hint, {stream: fields}, {(source name, stream): (grouping, fields)}).
EXPECTED: dict[str, dict[str, tuple[str, int, dict[str, list[str]], dict[tuple[str, str], tuple[str, list[str]]]]]] = {
    "wordcount": {
        "ReadLines": ("spout", 1, {"output": ["item"]}, {}),
        "SplitWords": ("bolt", 1, {"output": ["item", "key_0"]}, {("ReadLines", "output"): ("shuffle", [])}),
        "CountWords": ("bolt", 3, {"output": ["item"]}, {("SplitWords", "output"): ("fields", ["key_0"])}),
    },
    "split_merge": {
        "Numbers": ("spout", 1, {"output": ["item"]}, {}),
        "Split": ("bolt", 1, {"even": ["item"], "odd": ["item"]}, {("Numbers", "output"): ("shuffle", [])}),
        "Monitor": ("bolt", 2, {"seen": ["item"]}, {("Numbers", "output"): ("all", [])}),
        "Scale2x": ("bolt", 1, {"output": ["item"]}, {("Split", "even"): ("shuffle", [])}),
        "Scale3x": ("bolt", 1, {"output": ["item"]}, {("Split", "odd"): ("shuffle", [])}),
        "Merge": (
            "bolt",
            1,
            {"merged": ["item"]},
            {("Scale2x", "output"): ("global", []), ("Scale3x", "output"): ("global", [])},
        ),
    },
    "service": {
        "Validate": ("spout", 1, {"output": ["item"], "errors": ["item"]}, {}),
        "Calibrate": (
            "bolt",
            1,
            {"output": ["item", "key_client_and_sensor"], "reply": ["item"]},
            {("Validate", "output"): ("shuffle", [])},
        ),
        "means": ("bolt", 1, {"output": ["item"]}, {("Calibrate", "output"): ("fields", ["key_client_and_sensor"])}),
    },
    "async_io": {
        "Stations": ("spout", 1, {"output": ["item"]}, {}),
        "Lookup": ("bolt", 1, {"output": ["item"]}, {("Stations", "output"): ("shuffle", [])}),
        "Elapsed": ("bolt", 1, {"summary": ["item"]}, {("Lookup", "output"): ("shuffle", [])}),
    },
}


# Examples that hold no module-level graph: the attribute that builds it.
ATTRIBUTES = {"service": ":service_graph"}


def test_every_example_is_covered() -> None:
    assert sorted(EXPECTED) == sorted(path.stem for path in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_example_topology_read_back(example: str, tmp_path: Path) -> None:
    graph = load_graph(str(ROOT / "examples" / f"{example}.py") + ATTRIBUTES.get(example, ""))
    project = build_project(graph, tmp_path / example, name=example, inputs=1)
    ids = {pe.name: pe.id for pe in graph.flatten().pes.values()}
    components = read_components(project.path)
    expected = EXPECTED[example]
    assert sorted(components) == sorted(ids[name] for name in expected)
    for name, (kind, hint, streams, inputs) in expected.items():
        component: Component = components[ids[name]]
        assert component.kind == kind, name
        assert component.parallelism == hint, name
        assert component.command == "streamparse_run"
        assert component.script == f"aiod4p_components.{ids[name]}"
        assert component.streams == {**streams, EOS[0]: EOS[1]}, name
        upstream = {source for source, _ in inputs}
        want = {(ids[source], stream): grouping for (source, stream), grouping in inputs.items()}
        want.update({(ids[source], EOS[0]): ("all", []) for source in upstream})
        assert component.inputs == want, name
    files = {p.relative_to(project.path).as_posix() for p in project.path.rglob("*") if p.is_file()}
    assert {
        "config.json",
        "project.clj",
        f"topologies/{example}_topology.py",  # not {example}.py: sparse would import the workflow file instead
        f"virtualenvs/{example}_topology.txt",
        "src/aiod4p_components.py",
        "src/aiod4p_topology.json",
        "src/aiod4p_pes.pickle",
        f"src/{example}.py",  # the workflow file travels with the components
    } <= files
    config = json.loads((project.path / "config.json").read_text())
    assert config["serializer"] == "json" and config["topology_specs"] == "topologies/"


def test_parallelism_follows_the_plan(tmp_path: Path) -> None:
    graph = load_graph(str(ROOT / "examples" / "wordcount.py"))
    project = build_project(graph, tmp_path / "p", options=PlanOptions(default_parallelism=4))
    hints = {c.name.rstrip("0123456789"): c.parallelism for c in read_components(project.path).values()}
    assert hints == {"ReadLines": 1, "SplitWords": 4, "CountWords": 3}  # roots 1, explicit 3, others -n


def test_group_by_key_function_and_several_indices(tmp_path: Path) -> None:
    graph = WorkflowGraph()
    source, tag = Count(), Tag()
    by_parity, by_both = WhoSawWhat(group_by(key=parity), 2), WhoSawWhat(group_by(0, 1), 3)
    graph.connect(source, "output", tag, "input")
    graph.connect(tag, "output", by_parity, "input")
    graph.connect(tag, "output", by_both, "input")
    components = read_components(build_project(graph, tmp_path / "p").path)
    assert components[tag.id].streams["output"] == ["item", "key_parity", "key_0", "key_1"]
    assert components[by_parity.id].inputs[(tag.id, "output")] == ("fields", ["key_parity"])
    assert components[by_both.id].inputs[(tag.id, "output")] == ("fields", ["key_0", "key_1"])


def test_a_second_connection_to_the_same_bolt_gets_its_own_stream(tmp_path: Path) -> None:
    graph = multi_edge()
    source, merge = graph.pes
    components = read_components(build_project(graph, tmp_path / "p").path)
    assert components[source.id].streams == {"output": ["item"], "output_2": ["item"], EOS[0]: EOS[1]}
    assert components[merge.id].inputs == {
        (source.id, "output"): ("shuffle", []),
        (source.id, "output_2"): ("shuffle", []),
        (source.id, EOS[0]): ("all", []),
    }


def test_jar_holds_the_resources(tmp_path: Path) -> None:
    project = build_project(load_graph(str(ROOT / "examples" / "wordcount.py")), tmp_path / "p", name="wc")
    with zipfile.ZipFile(build_jar(project, tmp_path / "wc.jar")) as jar:
        names = set(jar.namelist())
    assert {"META-INF/MANIFEST.MF", "resources/aiod4p_components.py", "resources/wordcount.py"} <= names


# -- refusals ---------------------------------------------------------------------------------


class Reserved(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["__tick"])

    def process(self, inputs: Mapping[str, Any]) -> None:
        return None


def test_reserved_port_name_is_rejected(tmp_path: Path) -> None:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", pe := Reserved(), "input")
    with pytest.raises(GraphError, match=rf"output port '__tick' of PE {pe.id} is reserved"):
        build_project(graph, tmp_path / "p")


def test_unpicklable_pe_is_rejected_by_name(tmp_path: Path) -> None:
    """A PE holding what no pickler takes (a lock) is refused by name; a lambda it holds travels (by value)."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", pe := Double(), "input")
    pe.guard = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(GraphError, match=rf"PE {pe.id} cannot be pickled for Storm's workers: TypeError"):
        build_project(graph, tmp_path / "p")


@pytest.mark.usefixtures("dispel4py_hook")
def test_a_dispel4py_pe_class_mixed_at_run_time_is_pickled(tmp_path: Path) -> None:
    """dispel4py's ``ProcessTimingPE(pe)`` makes a class in ``dispel4py.new.monitoring`` at run time, holding the
    ``write`` aiod4p gives it (``aiod4p._pe``'s): the module of that function was taken for the class's, and the
    build failed, `PE TestDelayOneInOneOut2 cannot be pickled for Storm's workers`."""
    graph = load_graph(str(differential.example("delayed_pipeline")))
    timed = next(pe for pe in graph.flatten().pes.values() if type(pe).__module__ == "dispel4py.new.monitoring")
    build_project(graph, tmp_path / "p")
    assert type(pickle.loads(pickle.dumps(timed))).__mro__[1:] == type(timed).__mro__[1:]


def test_class_defined_in_main_is_rejected(tmp_path: Path) -> None:
    main_class = type("InMain", (Double,), {"__module__": "__main__"})
    graph = WorkflowGraph()
    graph.connect(Count(), "output", pe := main_class(), "input")
    with pytest.raises(GraphError, match=rf"PE {pe.id}: its class InMain is defined in __main__"):
        build_project(graph, tmp_path / "p")


def test_a_partial_key_function_takes_its_function_s_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``functools.partial`` key's ``__module__`` is ``functools``: its function's file was taken for a module named
    so, and the build failed with ``module functools (.../keys.py) has the name of a module of Python's standard
    library``. The partial's function's module travels."""
    (tmp_path / "user_keys5.py").write_text("def parity(modulus, item):\n    return item % modulus\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_keys5", raising=False)
    parity = importlib.import_module("user_keys5").parity
    graph = WorkflowGraph()
    graph.connect(Count(), "output", Double(), "input", grouping=group_by(key=functools.partial(parity, 2)))
    project = build_project(graph, tmp_path / "p")
    assert project.spec.sources["user_keys5"] == str(tmp_path / "user_keys5.py")


def test_the_modules_a_workflow_imports_travel_unless_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The top-level modules and packages a workflow file imports go into src/ with it (a helper next to it, even
    from a function; a package of the user's, whole), and those that these import too (from any module of the
    package); installed ones (in a site directory) do not. A package stayed behind: every Storm task failed with
    ``No module named 'local_pkg'``."""
    flow, site_dir = tmp_path / "flow", tmp_path / "site-packages"
    for directory in (flow, site_dir, flow / "local_pkg", flow / "local_pkg" / "deeper"):
        directory.mkdir()
    (flow / "local_pkg" / "__init__.py").write_text("")
    (flow / "local_pkg" / "deeper" / "__init__.py").write_text("from . import leaf\n")
    (flow / "local_pkg" / "deeper" / "leaf.py").write_text("import helper_three\nimport installed_pkg.part\n")
    (flow / "local_pkg" / "data.json").write_text("{}")
    (flow / "helper_three.py").write_text("")
    (site_dir / "installed_one.py").write_text("")
    (site_dir / "installed_pkg").mkdir()
    (site_dir / "installed_pkg" / "__init__.py").write_text("")
    (site_dir / "installed_pkg" / "part.py").write_text("")
    (flow / "helper_two.py").write_text("import installed_one\n")
    (flow / "helper_one.py").write_text("import helper_two\n")
    (flow / "user_flow2.py").write_text(
        "import local_pkg.deeper\nfrom aiod4p import IterativePE\n\n\nclass Same(IterativePE):\n"
        "    def process_item(self, item):\n        from helper_one import helper_two\n        return item\n"
    )
    for directory in (site_dir, flow):
        monkeypatch.syspath_prepend(str(directory))
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(site_dir)])
    for name in ("user_flow2", "helper_one", "helper_two", "helper_three", "installed_one", "installed_pkg"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in ("local_pkg", "local_pkg.deeper", "local_pkg.deeper.leaf", "installed_pkg.part"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    graph = WorkflowGraph()
    graph.connect(Count(), "output", importlib.import_module("user_flow2").Same(), "input")
    project = build_project(graph, tmp_path / "p")
    copied = {path.name for path in project.src.glob("*.py")}
    assert {"user_flow2.py", "helper_one.py", "helper_two.py", "helper_three.py"} <= copied
    assert "installed_one.py" not in copied and not (project.src / "installed_pkg").exists()
    package = {path.relative_to(project.src).as_posix() for path in (project.src / "local_pkg").rglob("*")}
    assert package == {
        "local_pkg/__init__.py",
        "local_pkg/data.json",
        "local_pkg/deeper",
        "local_pkg/deeper/__init__.py",
        "local_pkg/deeper/leaf.py",
    }
    assert project.spec.sources["helper_two"] == str(flow / "helper_two.py")
    assert project.spec.sources["local_pkg"] == str(flow / "local_pkg")


def test_a_pe_of_a_package_next_to_the_workflow_takes_the_package_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PE class defined in a module of the user's package (``user_lib4.filters``) takes the whole package into
    src/; a rebuild for a workflow without it removes it, and keeps what is not the build's."""
    (package := tmp_path / "user_lib4").mkdir()
    (package / "__init__.py").write_text("")
    (package / "filters.py").write_text(
        "from aiod4p import IterativePE\n\nfrom .util import same\n\n\nclass Same(IterativePE):\n"
        "    def process_item(self, item):\n        return same(item)\n"
    )
    (package / "util.py").write_text("def same(item):\n    return item\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("user_lib4", "user_lib4.filters", "user_lib4.util"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    graph = WorkflowGraph()
    graph.connect(Count(), "output", importlib.import_module("user_lib4.filters").Same(), "input")
    project = build_project(graph, tmp_path / "p")
    assert {path.name for path in (project.src / "user_lib4").iterdir()} == {"__init__.py", "filters.py", "util.py"}
    (project.src / "mine.txt").write_text("kept")
    plain = WorkflowGraph()
    plain.connect(Count(), "output", Double(), "input")
    rebuilt = build_project(plain, tmp_path / "p")
    assert not (rebuilt.src / "user_lib4").exists() and (rebuilt.src / "mine.txt").exists()


def test_imports_for_type_checkers_or_a_script_run_do_not_travel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imports under ``if TYPE_CHECKING:`` (``typing.TYPE_CHECKING`` too) or ``if __name__ == "__main__":``
    never run where the workflow is imported: those modules (a private local_secrets.py) stay out of the jar.
    Those under the ``else`` of such an ``if``, under ``try`` or in a function do run, and travel."""
    flow = tmp_path / "flow"
    flow.mkdir()
    for name in ("local_secrets", "local_types", "local_script", "local_cli", "helper_else", "helper_tried"):
        (flow / f"{name}.py").write_text("Thing = None\n")
    (flow / "helper_late.py").write_text('if "__main__" == __name__:\n    import local_cli\n')
    (flow / "user_flow3.py").write_text(
        "import typing\nfrom typing import TYPE_CHECKING\n\nfrom aiod4p import IterativePE\n\n"
        "try:\n    import helper_tried\nexcept ImportError:\n    helper_tried = None\n"
        "if TYPE_CHECKING:\n    import local_secrets\n"
        "if typing.TYPE_CHECKING:\n    from local_types import Thing\nelse:\n    import helper_else\n"
        'if __name__ == "__main__":\n    import local_script\n\n\n'
        "class Same(IterativePE):\n    def process_item(self, item):\n        import helper_late\n        return item\n"
    )
    monkeypatch.syspath_prepend(str(flow))
    for name in ("user_flow3", "helper_else", "helper_tried", "helper_late"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    graph = WorkflowGraph()
    graph.connect(Count(), "output", importlib.import_module("user_flow3").Same(), "input")
    project = build_project(graph, tmp_path / "p")
    copied = {path.stem for path in project.src.glob("*.py")}
    assert {"user_flow3", "helper_tried", "helper_else", "helper_late"} <= copied
    assert not copied & {"local_secrets", "local_types", "local_script", "local_cli"}


def test_a_module_installed_with_pip_target_does_not_travel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library installed with ``pip install --target DIR`` (DIR on ``PYTHONPATH``: a ``*.dist-info`` beside
    it) counts as installed, as for multi and mpi: it stays out of the topology, like site-packages."""
    flow, target = tmp_path / "flow", tmp_path / "target"
    (target / "targeted_one-1.0.dist-info").mkdir(parents=True)
    (target / "targeted_one.py").write_text("")
    flow.mkdir()
    (flow / "user_flow5.py").write_text(
        "import targeted_one\nfrom aiod4p import IterativePE\n\n\nclass Same(IterativePE):\n"
        "    def process_item(self, item):\n        return item\n"
    )
    for directory in (target, flow):
        monkeypatch.syspath_prepend(str(directory))
    for name in ("user_flow5", "targeted_one"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    graph = WorkflowGraph()
    graph.connect(Count(), "output", importlib.import_module("user_flow5").Same(), "input")
    project = build_project(graph, tmp_path / "p")
    assert (project.src / "user_flow5.py").exists() and not (project.src / "targeted_one.py").exists()


def test_a_module_to_travel_named_as_a_standard_library_one_fails_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper next to the workflow file named as a standard library module (``sched.py``) is imported here
    (the file's directory comes first on ``sys.path``) but not on the Storm workers, where the topology's modules
    come last: the build fails, naming the file and the module that imports it, instead of copying it."""
    flow = tmp_path / "flow"
    flow.mkdir()
    (flow / "sched.py").write_text("def plan(item):\n    return item\n")
    (flow / "user_flow4.py").write_text(
        "from aiod4p import IterativePE\n\n\nclass Planned(IterativePE):\n"
        "    def process_item(self, item):\n        import sched\n\n        return sched.plan(item)\n"
    )
    monkeypatch.syspath_prepend(str(flow))
    for name in ("user_flow4", "sched"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    graph = WorkflowGraph()
    graph.connect(Count(), "output", importlib.import_module("user_flow4").Planned(), "input")
    with pytest.raises(GraphError) as failed:
        build_project(graph, tmp_path / "p")
    message = str(failed.value)
    assert f"module sched ({flow / 'sched.py'}) (imported by module user_flow4, {flow / 'user_flow4.py'})" in message
    assert "standard library" in message and "Rename sched.py" in message
    assert not (tmp_path / "p" / "src" / "sched.py").exists()


def test_inputs_must_be_storable(tmp_path: Path) -> None:
    graph = WorkflowGraph()
    graph.connect(source := Merge(), "output", Double(), "input")

    async def live() -> Any:
        yield {"left": 1}

    with pytest.raises(InputError, match=rf"the input of PE {source.id} must be a count or a list"):
        build_project(graph, tmp_path / "p", inputs={source.id: live()})
    with pytest.raises(InputError, match=rf"the input of PE {source.id} cannot be stored.*lock"):
        build_project(graph, tmp_path / "p", inputs={source.id: [{"left": threading.Lock()}]})


def test_unwritable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(TargetError, match="cannot write the Storm project"):
        build_project(load_graph(str(ROOT / "examples" / "wordcount.py")), tmp_path / "file" / "p")


# -- items on the wire -------------------------------------------------------------------------

SAMPLES: list[Any] = [
    None,
    True,
    0,
    -(2**63),
    2**63 - 1,
    0.1,
    -1.5e300,
    "",
    "naïve ☃ 🐍",
    [],
    (),
    ("word", 1),
    [("a", 1), ("b", (2, [3.0]))],
    {"k": (1, 2), "nested": {"x": [None, False]}},
    {"~t": [1]},  # looks like a tag: must come back as this dict
    {"~d": {"~t": 1}},
    {"~other": 1, "plain": 2},
]


@pytest.mark.parametrize("item", SAMPLES, ids=repr)
def test_json_items_round_trip_exactly(item: Any) -> None:
    back = decode(json.loads(json.dumps(encode(item))))
    assert back == item
    assert repr(back) == repr(item)  # same types all the way down (tuples stay tuples, 1.0 stays float)


@dataclasses.dataclass(frozen=True)
class Reading:
    """An item of a class of the workflow's own (a trace, a catalogue row)."""

    station: str
    samples: bytes


PICKLED_SAMPLES: list[Any] = [
    {1, 2},
    b"raw",
    2**63,
    {1: "a"},
    ("a", frozenset({1})),  # a part is not JSON: the whole item travels pickled
    Reading("ST01", bytes(range(256)) * 100),
]


@pytest.mark.parametrize("item", PICKLED_SAMPLES, ids=repr)
def test_other_items_travel_pickled(item: Any) -> None:
    """Scientists' items (numpy arrays, dataclasses, bytes) could not run on storm at all: JSON only."""
    wire = encode(item)
    assert list(wire) == ["~p"]
    back = decode(json.loads(json.dumps(wire)))
    assert back == item and type(back) is type(item)


def test_an_item_neither_json_nor_picklable_is_rejected() -> None:
    with pytest.raises(WireError, match=r"item\['k'\] is a lock .* and it cannot be pickled: TypeError") as error:
        encode({"k": threading.Lock()})
    assert isinstance(error.value, TransportError)  # in aiod4p's one tree of errors


@pytest.mark.parametrize(
    ("key", "equal"),
    [
        (1, 1.0),
        (1, True),
        ("ST01", "".join(["ST", "01"])),
        (
            datetime.datetime(2026, 1, 1, 12, tzinfo=datetime.UTC),
            datetime.datetime(2026, 1, 1, 13, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
        ),
        (("a", 1), ("a", 1.0)),
    ],
    ids=repr,
)
def test_equal_grouping_keys_go_to_one_task(key: Any, equal: Any) -> None:
    """Storm hashed a key field as the Java value its JSON gave: 1 and 1.0 (a Long and a Double) went to two
    tasks, and a key JSON cannot carry (a datetime) failed the run; a key field is now its stable hash."""
    field = encode_key(key)
    assert field == encode_key(equal) != encode_key("other")
    assert type(field) is int and 0 <= field < 2**63  # a Java Long, through JSON
    assert json.loads(json.dumps(field)) == field


def test_a_key_that_cannot_be_hashed_is_rejected() -> None:
    with pytest.raises(WireError, match=r"the key <lock> cannot be hashed: TypeError"):
        encode_key(threading.Lock())


@pytest.mark.parametrize(
    ("target", "name"),
    [("path/to/flow.py", "flow"), ("flow.py:graph", "graph"), ("pkg.flow", "flow"), ("pkg.flow:graph", "graph")],
)
def test_a_target_names_its_topology(target: str, name: str) -> None:
    assert target_name(target) == name


# -- command line --------------------------------------------------------------------------------


def storm_build(*args: str) -> subprocess.CompletedProcess[str]:
    """``aiod4p storm build ARGS`` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "aiod4p", "storm", "build", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_storm_build(tmp_path: Path) -> None:
    out = tmp_path / "wc"
    done = storm_build(
        str(ROOT / "examples" / "wordcount.py"), "-o", str(out), "-i", "2", "--nimbus", "nimbus.example.org"
    )
    assert done.returncode == 0, done.stderr
    assert "wrote topology wordcount_topology (1 spouts, 2 bolts)" in done.stdout
    # the jar sparse submit -j uploads: without it, sparse submit needed lein and Java to build one
    assert f"submit it with: cd {out} && sparse submit -n wordcount_topology -j wordcount_topology.jar" in done.stdout
    # a name in use, which sparse calls invalid: what to do about it
    assert "while a topology wordcount_topology runs, sparse says the name is invalid" in done.stdout
    assert "sparse submit --force" in done.stdout
    with zipfile.ZipFile(out / "wordcount_topology.jar") as jar:
        files = {p.relative_to(out / "src").as_posix() for p in (out / "src").rglob("*") if p.is_file()}
        assert {f"resources/{name}" for name in files if "__pycache__" not in name} <= set(jar.namelist())
    spec = json.loads((out / "src" / "aiod4p_topology.json").read_text())
    assert list(spec["feeds"].values()) == [2]
    config = json.loads((out / "config.json").read_text())
    assert config["envs"]["prod"]["nimbus"] == "nimbus.example.org:6627"
    # sparse submit of the project bounds the tuples in flight as `aiod4p run` does (without it, a slow bolt
    # made tuples time out, and their replays were counted twice downstream)
    assert config["envs"]["prod"]["options"] == {"topology.max.spout.pending": 1000}
    assert read_components(out)  # a valid topology


def test_a_project_needs_only_pypi_on_the_workers(tmp_path: Path) -> None:
    """aiod4p is not on PyPI: the workers' requirements (which sparse submit installs with use_virtualenv) name what
    is, and aiod4p travels in the jar. The requirements asked for aiod4p[storm], which pip could not find."""
    project = build_project(load_graph(str(ROOT / "examples" / "wordcount.py")), tmp_path / "p", name="wc")
    lines = (project.path / "virtualenvs" / "wc.txt").read_text().splitlines()
    requirements = [line for line in lines if not line.startswith("#")]
    assert "streamparse==5.0.1" in requirements and "cloudpickle>=3" in requirements
    assert not [line for line in requirements if line.startswith("aiod4p")]
    # Without the installed aiod4p (site-packages, but not the .pth files that make this clone importable), the
    # components load their PEs from the copy in src.
    site_packages = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path[:0] = [{str(project.src)!r}]; sys.path.append({site_packages!r})\n"
        "import pickle, aiod4p, aiod4p_components\n"
        "stored = pickle.loads(open('aiod4p_pes.pickle', 'rb').read())\n"
        "[pickle.loads(pe) for pe in stored['pes'].values()]\n"
        "print(aiod4p.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=project.src, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == str(project.src / "aiod4p" / "__init__.py")
    with zipfile.ZipFile(build_jar(project, tmp_path / "wc.jar")) as jar:
        assert "resources/aiod4p/storm/components.py" in jar.namelist()


def test_cli_storm_build_into_an_earlier_project(tmp_path: Path) -> None:
    """A rebuild replaces the generated files, removes the previous workflow's, and keeps the config.json the user
    edited (it was overwritten, its nimbus and virtualenv settings lost, and the old module stayed in src/)."""
    out, other = tmp_path / "p", tmp_path / "other_flow.py"
    other.write_text((ROOT / "examples" / "split_merge.py").read_text())
    assert storm_build(str(other), "-o", str(out)).returncode == 0
    config = json.loads((out / "config.json").read_text())
    config["envs"]["prod"].update(nimbus="edited:6627", use_virtualenv=True, virtualenv_root="/opt/venvs")
    (out / "config.json").write_text(json.dumps(config))
    done = storm_build(str(ROOT / "examples" / "wordcount.py"), "-o", str(out), "--nimbus", "ignored")
    assert done.returncode == 0, done.stderr
    assert f"kept {out / 'config.json'} as it was" in done.stdout
    assert f"--nimbus is not written into {out / 'config.json'}" in done.stderr
    assert json.loads((out / "config.json").read_text()) == config
    assert sorted(p.name for p in (out / "src").glob("*.py")) == ["aiod4p_components.py", "wordcount.py"]
    assert [p.name for p in (out / "virtualenvs").iterdir()] == ["wordcount_topology.txt"]
    assert [p.name for p in (out / "topologies").iterdir()] == ["wordcount_topology.py"]
    assert sorted(p.name for p in out.glob("*.jar")) == ["wordcount_topology.jar"]


def test_cli_storm_build_refuses_a_directory_of_other_files(tmp_path: Path) -> None:
    """A non-empty directory that holds no project of aiod4p is left alone: its topologies/*.py were deleted and its
    config.json overwritten."""
    (tmp_path / "o" / "topologies").mkdir(parents=True)
    (tmp_path / "o" / "topologies" / "mine.py").write_text("# a topology of the user's\n")
    done = storm_build(str(ROOT / "examples" / "wordcount.py"), "-o", str(tmp_path / "o"))
    assert done.returncode == 1
    assert f"{tmp_path / 'o'} is not empty and holds no project of aiod4p storm build" in done.stderr
    assert [str(p.relative_to(tmp_path)) for p in (tmp_path / "o").rglob("*")] == [
        "o/topologies",
        "o/topologies/mine.py",
    ]


@pytest.mark.parametrize(
    "spec", ["[1, 2]", '{"name": "x", "sources": {"../../outside": 1}}', '{"name": "../x", "sources": {}}']
)
def test_cli_storm_build_refuses_a_project_whose_spec_is_damaged(tmp_path: Path, spec: str) -> None:
    """A spec that parses but is not one (a list gave an AttributeError traceback), or names files outside the
    project, which a rebuild would have removed."""
    (tmp_path / "o" / "src").mkdir(parents=True)
    (tmp_path / "o" / "src" / SPEC_FILE).write_text(spec)
    (tmp_path / "outside.py").write_text("# the user's\n")
    done = storm_build(str(ROOT / "examples" / "wordcount.py"), "-o", str(tmp_path / "o"))
    assert done.returncode == 1, done.stderr
    assert f"{tmp_path / 'o'} is not empty and holds no project of aiod4p storm build" in done.stderr
    assert (tmp_path / "outside.py").exists()


def test_cli_storm_build_of_a_dispel4py_workflow(tmp_path: Path) -> None:
    flow = tmp_path / "d4p_flow.py"
    flow.write_text(
        "from dispel4py.base import IterativePE, ProducerPE\n"
        "from dispel4py.workflow_graph import WorkflowGraph\n"
        "class Numbers(ProducerPE):\n"
        "    def _process(self, inputs):\n"
        "        return 1\n"
        "class Negate(IterativePE):\n"
        "    def _process(self, data):\n"
        "        return -data\n"
        "graph = WorkflowGraph()\n"
        "graph.connect(Numbers(), 'output', Negate(), 'input')\n"
    )
    done = storm_build(str(flow), "-o", str(tmp_path / "o"), "-i", "3")
    assert done.returncode == 0, done.stderr
    spec = json.loads((tmp_path / "o" / "src" / "aiod4p_topology.json").read_text())
    assert spec["dispel4py"] is True  # loaded through aiod4p.compat: the components serve dispel4py too


def test_cli_storm_build_bad_target(tmp_path: Path) -> None:
    done = storm_build(str(tmp_path / "missing.py"), "-o", str(tmp_path / "o"))
    assert done.returncode == 1
    assert "missing.py does not exist" in done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["-i", "-5"], "argument -i/--iter: must be at least 0, not -5"),
        (["-n", "0"], "argument -n/--num: must be at least 1, not 0"),
        (["--max-replays", "-1"], "argument --max-replays: must be at least 0, not -1"),
        (["--max-replays", "many"], "argument --max-replays: not an integer: 'many'"),
    ],
)
def test_cli_storm_build_refuses_bad_numbers(
    tmp_path: Path, option: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked as `aiod4p run` checks them: a usage error (exit 2) naming the option; nothing is written.
    `-i -5` was taken, and refused only later, as a bad input (exit 1)."""
    with pytest.raises(SystemExit) as exit_:
        main(["storm", "build", str(ROOT / "examples" / "wordcount.py"), "-o", str(tmp_path / "o"), *option])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: {message}\n")
    assert not (tmp_path / "o").exists()


def test_cli_storm_build_bad_nimbus(tmp_path: Path) -> None:
    done = storm_build(str(ROOT / "examples" / "wordcount.py"), "-o", str(tmp_path / "o"), "--nimbus", "h:x")
    assert done.returncode == 1
    assert "--nimbus: 'h:x' is not HOST or HOST:PORT" in done.stderr
    assert not (tmp_path / "o").exists()
