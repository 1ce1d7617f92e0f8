"""Workflow pictures: dot text, SVG/PNG through Graphviz, and `aiod4p graph`."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import workflows as wf
from helpers import aiod4p_cli as aiod4p

from aiod4p import GLOBAL, WorkflowGraph, chain, group_by, load_graph, make_plan
from aiod4p._loading import load_module
from aiod4p._plan import worker_list
from aiod4p._visual import draw, to_dot
from aiod4p.errors import Aiod4pError, GraphError
from aiod4p.mappings import get_mapping

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz (Debian package graphviz) not installed")


def example_graph(path: Path) -> WorkflowGraph:
    """The example's module-level graph, else the graph its builder function returns."""
    module = load_module(str(path))
    if any(isinstance(value, WorkflowGraph) for value in vars(module).values()):
        return load_graph(str(path))
    builders = [
        name
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and value.__module__ == module.__name__
        and inspect.signature(value).return_annotation in ("WorkflowGraph", WorkflowGraph)
    ]
    assert builders, f"{path} has neither a WorkflowGraph nor a function returning one"
    return load_graph(f"{path}:{builders[0]}")


def expected_content(graph: WorkflowGraph) -> tuple[set[str], set[str], list[str]]:
    """PE ids, port names and edge labels the picture of ``graph`` must show."""
    flat = graph.flatten()
    ports = {port for pe in flat.pes.values() for port in [*pe.inputs, *pe.outputs]}
    return set(flat.pes), ports, [str(edge.grouping) for edge in flat.edges]


def edges_in_dot(text: str) -> list[tuple[str, str, str, str, str]]:
    pattern = r'"([^"]+)":"o_([^"]+)":s -> "([^"]+)":"i_([^"]+)":n \[label=" ([^"]+) "\]'
    return re.findall(pattern, text)


def svg_texts(path: Path) -> list[str]:
    tree = ET.parse(path)
    return ["".join(element.itertext()).strip() for element in tree.iter() if element.tag.endswith("}text")]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_dot_of_every_example_names_pes_ports_and_groupings(example: Path) -> None:
    graph = example_graph(example)
    text = to_dot(graph)
    pe_ids, ports, groupings = expected_content(graph)
    for pe_id in pe_ids:
        assert f"<B>{pe_id}</B>" in text
    for port in ports:
        assert f">{port}</FONT>" in text
    flat = graph.flatten()
    drawn = edges_in_dot(text)
    assert sorted(drawn) == sorted((e.source, e.source_port, e.dest, e.dest_port, str(e.grouping)) for e in flat.edges)
    assert sorted(edge[4] for edge in drawn) == sorted(groupings)


def test_wordcount_picture_shows_group_by_and_parallelism() -> None:
    graph = load_graph(str(ROOT / "examples" / "wordcount.py"))
    text = to_dot(graph)
    (count_id,) = [pe_id for pe_id in graph.flatten().pes if pe_id.startswith("CountWords")]
    assert re.search(rf"<B>{count_id}</B><BR/><FONT[^>]*>CountWords · ×3<", text)
    assert '[label=" group_by[0] "]' in text
    assert re.search(rf'"{count_id}":"o_output":s -> "__results__"', text)


def test_split_merge_shows_all_and_global() -> None:
    text = to_dot(load_graph(str(ROOT / "examples" / "split_merge.py")))
    labels = sorted(edge[4] for edge in edges_in_dot(text))
    assert labels == ["all", "global", "global", "shuffle", "shuffle", "shuffle"]
    assert "Monitor · ×2" in text


def test_parallelism_follows_the_mapping_and_workers() -> None:
    graph = wf.pipeline(2)[0]
    plan = make_plan(graph, get_mapping("async").plan_options(4, 256, 4))
    text = to_dot(plan)
    assert text.count("Double · ×4") == 2
    assert "Count · ×1" in text


@needs_dot
def test_thousands_of_workers_are_drawn_as_a_range(tmp_path: Path) -> None:
    """`aiod4p graph -m multi -n 5000 --oversubscribe`: the workers of a PE are one range, "0-4999", not 5000
    numbers (a label Graphviz refuses: longer than 16384)."""
    graph = wf.pipeline(1)[0]
    plan = make_plan(graph, get_mapping("multi").plan_options(5000, 256, 4))
    assert "Double · ×5000 on workers 0-4999" in to_dot(plan)
    assert draw(plan, tmp_path / "big.svg").stat().st_size > 0


def test_worker_lists_keep_pairs_and_shorten_runs() -> None:
    assert [worker_list(workers) for workers in ([3], [0, 1], [2, 0, 1, 1], [0, 1, 2, 5, 7, 8, 9, 11, 12])] == [
        "3",
        "0,1",
        "0-2",
        "0-2,5,7-9,11,12",
    ]


def test_composites_are_nested_clusters() -> None:
    inner = chain(wf.Double(), wf.Double(), name="inner")
    outer = chain(wf.Double(), inner, name="outer")
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", outer, "input")
    text = to_dot(graph)
    outer_at = text.index(f'subgraph "cluster_{outer.id}"')
    inner_at = text.index(f'subgraph "cluster_{inner.id}"')
    assert outer_at < inner_at
    inner_end = text.index("\n    }\n", inner_at)  # inner closes at depth 2, before outer
    outer_end = text.index("\n  }\n", inner_end)
    (first_id,) = [pe.id for pe in outer.graph.pes if pe is not inner]
    # The first Double sits in outer before inner opens; inner's two PEs sit inside inner.
    assert outer_at < text.index(f'"{first_id}" [label=') < inner_at
    for pe in inner.graph.pes:
        assert inner_at < text.index(f'"{pe.id}" [label=') < inner_end < outer_end


def test_grouping_override_on_a_connection_labels_the_edge() -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", tag := wf.Tag(), "input")
    graph.connect(tag, "output", wf.WhoSawWhat(), "input", grouping=group_by(0))
    graph.connect(tag, "output", wf.SumAtEnd(), "input", grouping=GLOBAL)
    labels = sorted(edge[4] for edge in edges_in_dot(to_dot(graph)))
    assert labels == ["global", "group_by[0]", "shuffle"]


def test_names_with_quotes_and_markup_are_escaped(tmp_path: Path) -> None:
    graph = WorkflowGraph()
    source = wf.Count()
    source.id = 'odd "<name>" & co'
    graph.connect(source, "output", wf.Double(), "input")
    text = to_dot(graph)
    assert '"odd \\"<name>\\" & co"' in text
    assert "<B>odd &quot;&lt;name&gt;&quot; &amp; co</B>" in text
    if shutil.which("dot"):
        draw(graph, tmp_path / "odd.svg")
        assert 'odd "<name>" & co' in svg_texts(tmp_path / "odd.svg")


@needs_dot
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_svg_of_every_example_shows_labels(example: Path, tmp_path: Path) -> None:
    graph = example_graph(example)
    out = draw(graph, tmp_path / f"{example.stem}.svg")
    texts = svg_texts(out)
    pe_ids, ports, groupings = expected_content(graph)
    assert pe_ids <= set(texts)
    assert ports <= set(texts)
    assert sorted(t for t in texts if t in {"shuffle", "all", "global"} or t.startswith("group_by")) == sorted(
        groupings
    )
    assert "results" in texts
    assert any(t.startswith("×") for t in (part.split(" · ")[-1] for part in texts))


@needs_dot
def test_composite_cluster_in_svg(tmp_path: Path) -> None:
    draw(wf.composite_graph(), tmp_path / "c.svg")
    tree = ET.parse(tmp_path / "c.svg")
    clusters = [g for g in tree.iter() if g.get("class") == "cluster"]
    assert len(clusters) == 1
    assert any(t.startswith("chain") for t in svg_texts(tmp_path / "c.svg"))


@needs_dot
def test_png_is_a_png(tmp_path: Path) -> None:
    result = aiod4p("graph", str(EXAMPLES[0]), "-o", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "x.png") in result.stdout
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_dot(tmp_path: Path) -> None:
    out = tmp_path / "w.dot"
    result = aiod4p("graph", str(ROOT / "examples" / "wordcount.py"), "-o", str(out), "-n", "2")
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.startswith('digraph "') and "group_by[0]" in text


def test_missing_dot_names_the_graphviz_package(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    result = aiod4p("graph", str(EXAMPLES[0]), "-o", str(tmp_path / "x.svg"), env=env)
    assert result.returncode == 1
    assert "graphviz" in result.stderr and "apt-get install graphviz" in result.stderr
    assert not (tmp_path / "x.svg").exists()
    # .dot needs no Graphviz.
    assert aiod4p("graph", str(EXAMPLES[0]), "-o", str(tmp_path / "x.dot"), env=env).returncode == 0


def test_unknown_suffix_is_a_usage_error(tmp_path: Path) -> None:
    result = aiod4p("graph", str(EXAMPLES[0]), "-o", str(tmp_path / "x.jpeg"))
    assert result.returncode == 2
    assert "x.jpeg" in result.stderr and ".svg" in result.stderr


def test_unwritable_output_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "x.dot"
    with pytest.raises(Aiod4pError, match=r"missing/x\.dot"):
        draw(wf.pipeline(1)[0], target)
    if shutil.which("dot"):
        with pytest.raises(Aiod4pError, match=r"dot could not draw .*missing/x\.svg"):
            draw(wf.pipeline(1)[0], tmp_path / "missing" / "x.svg")


def test_invalid_graph_is_reported(tmp_path: Path) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", wf.Merge(), "left")  # required input "right" left unconnected
    with pytest.raises(GraphError, match="right"):
        to_dot(graph)
    result = aiod4p("graph", "no/such/file.py", "-o", str(tmp_path / "x.dot"))
    assert result.returncode == 1 and "no/such/file.py" in result.stderr
