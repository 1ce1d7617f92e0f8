"""Pictures of a workflow: Graphviz dot text, and .svg/.png through Graphviz's ``dot``.

Each PE is a box listing its input ports (top), its id, class and number of
instances (middle) and its output ports (bottom). Each connection is an
arrow from output port to input port labelled with its grouping; output
ports that are not connected lead to a ``results`` node; composites are
drawn as (nested) clusters around their inner PEs.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from ._graph import FlatGraph, WorkflowGraph
from ._plan import ExecutionPlan, make_plan, worker_list
from .errors import Aiod4pError, writing

__all__ = ["GRAPHVIZ_FORMATS", "dot_escape", "draw", "draw_dot", "render_dot", "to_dot"]

# Suffixes written by Graphviz's dot (the format is the suffix).
GRAPHVIZ_FORMATS = ("svg", "png", "pdf")
DOT_SUFFIXES = (".dot", ".gv")

_ROOT_FILL = "#dbeafe"
_PE_FILL = "#f8fafc"
_RESULTS_NODE = "__results__"


def to_dot(workflow: WorkflowGraph | FlatGraph | ExecutionPlan, *, title: str | None = None) -> str:
    """The Graphviz dot text of ``workflow``.

    A graph is planned with default options (one worker); pass an
    :class:`ExecutionPlan` to show a mapping's parallelism.

    Raises:
        GraphError: the graph is invalid.
    """
    plan = workflow if isinstance(workflow, ExecutionPlan) else make_plan(workflow)
    flat = plan.graph
    lines = [
        f"digraph {_quote(title or 'workflow')} {{",
        "  rankdir=TB;",
        '  graph [fontname="Helvetica", fontsize=11, nodesep=0.4, ranksep=0.5];',
        '  node [shape=plaintext, fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9, color="#475569"];',
    ]
    if title:
        lines.append(f'  label={_quote(title)}; labelloc="t";')
    clusters = _composite_tree(flat)
    placed = {pe_id for inner in flat.composites.values() for pe_id in inner}
    for pe_id in flat.pes:
        if pe_id not in placed:
            lines.append("  " + _node(plan, pe_id))
    for composite in clusters.get(None, []):
        lines.extend(_cluster(plan, composite, clusters, depth=1))
    for edge in flat.edges:
        lines.append(
            f"  {_quote(edge.source)}:{_quote('o_' + edge.source_port)}:s ->"
            f" {_quote(edge.dest)}:{_quote('i_' + edge.dest_port)}:n"
            f" [label={_quote(' ' + str(edge.grouping) + ' ')}];"
        )
    results = [(pe_id, port) for pe_id, ports in plan.result_ports.items() for port in ports]
    if results:
        lines.append(f'  {_quote(_RESULTS_NODE)} [shape=note, style=filled, fillcolor="#fef9c3", label="results"];')
        for pe_id, port in results:
            lines.append(f"  {_quote(pe_id)}:{_quote('o_' + port)}:s -> {_quote(_RESULTS_NODE)} [style=dashed];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(workflow: WorkflowGraph | FlatGraph | ExecutionPlan, path: str | Path, *, title: str | None = None) -> Path:
    """Write a picture of ``workflow`` to ``path``; the suffix picks the format.

    ``.dot``/``.gv`` write dot text; ``.svg``, ``.png`` and ``.pdf`` run
    Graphviz's ``dot``.

    Raises:
        ValueError: the suffix is not one of those.
        Aiod4pError: ``dot`` is not installed (the message names the Debian
            package ``graphviz``), ``dot`` failed, or ``path`` cannot be written.
        GraphError: the graph is invalid.
    """
    return draw_dot(lambda: to_dot(workflow, title=title), path, "a workflow")


def draw_dot(text: str | Callable[[], str], path: str | Path, what: str = "a graph") -> Path:
    """Write dot ``text`` (or what calling it returns) to ``path``, rendered by Graphviz unless ``.dot``/``.gv``.

    Raises:
        ValueError: the suffix is not one Graphviz writes.
        Aiod4pError: as :func:`draw`.
    """
    path = Path(path)
    suffix = check_drawing(path, what)
    if callable(text):
        text = text()
    if suffix in DOT_SUFFIXES:
        with writing(what, str(path)):
            path.write_text(text, encoding="utf-8")
        return path
    render_dot(text, suffix.lstrip("."), path)
    return path


def check_drawing(path: str | Path, what: str = "a graph") -> str:
    """The suffix of ``path``, lower case, if Graphviz (or dot text) can be written there.

    Raises:
        ValueError: naming ``what`` and ``path``, and the suffixes that can be.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DOT_SUFFIXES and suffix.lstrip(".") not in GRAPHVIZ_FORMATS:
        formats = ", ".join([*DOT_SUFFIXES, *(f".{fmt}" for fmt in GRAPHVIZ_FORMATS)])
        raise ValueError(f"cannot draw {what} to {path}: the file name must end with one of {formats}")
    return suffix


def render_dot(text: str, fmt: str, path: Path) -> None:
    """Render dot ``text`` with Graphviz's ``dot`` as format ``fmt`` into ``path``.

    Raises:
        Aiod4pError: ``dot`` is not installed (the message names the Debian package) or failed.
    """
    dot = shutil.which("dot")
    if dot is None:
        raise Aiod4pError(
            f"drawing {path} needs Graphviz's 'dot' program, which is not on PATH: install the Debian package"
            f" graphviz (apt-get install graphviz; other systems: https://graphviz.org/download/),"
            f" or write a .dot file instead"
        )
    try:
        completed = subprocess.run(
            [dot, f"-T{fmt}", "-o", str(path)], input=text.encode(), capture_output=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Aiod4pError(f"Graphviz's dot could not draw {path}: {exc}") from exc
    if completed.returncode != 0:
        message = completed.stderr.decode(errors="replace").strip() or f"exit status {completed.returncode}"
        raise Aiod4pError(f"Graphviz's dot could not draw {path}: {message}")


def _node(plan: ExecutionPlan, pe_id: str) -> str:
    pe = plan.pes[pe_id]
    placement = plan.placement[pe_id]
    instances = f"×{placement.parallelism}"
    if plan.workers > 1:
        several = len(set(placement.workers)) != 1
        instances += f" on worker{'s' if several else ''} {worker_list(placement.workers)}"
    fill = _ROOT_FILL if placement.is_root else _PE_FILL
    rows = []
    if pe._input_ports:
        rows.append(_port_row("i_", list(pe._input_ports)))
    rows.append(
        f'<TR><TD BGCOLOR="{fill}"><B>{_esc(pe_id)}</B><BR/>'
        f'<FONT POINT-SIZE="9">{_esc(type(pe).__name__)} · {_esc(instances)}</FONT></TD></TR>'
    )
    if pe._output_ports:
        rows.append(_port_row("o_", list(pe._output_ports)))
    table = '<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="4">' + "".join(rows) + "</TABLE>"
    return f"{_quote(pe_id)} [label=<{table}>];"


def _port_row(prefix: str, ports: list[str]) -> str:
    cells = "".join(f'<TD PORT="{_esc(prefix + name)}"><FONT POINT-SIZE="9">{_esc(name)}</FONT></TD>' for name in ports)
    inner = f'<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0"><TR>{cells}</TR></TABLE>'
    return f"<TR><TD>{inner}</TD></TR>"


def _composite_tree(flat: FlatGraph) -> dict[str | None, list[str]]:
    """Children of each composite (``None``: top level); a composite's parent is its smallest strict superset."""
    members = {cid: set(inner) for cid, inner in flat.composites.items()}
    tree: dict[str | None, list[str]] = {}
    for cid, inner in members.items():
        parents = [other for other, outer in members.items() if other != cid and inner < outer]
        parent = min(parents, key=lambda other: len(members[other])) if parents else None
        tree.setdefault(parent, []).append(cid)
    return tree


def _cluster(plan: ExecutionPlan, composite: str, tree: dict[str | None, list[str]], depth: int) -> list[str]:
    indent = "  " * (depth + 1)
    children = tree.get(composite, [])
    nested = {pe_id for child in children for pe_id in plan.graph.composites[child]}
    lines = [
        f"{'  ' * depth}subgraph {_quote('cluster_' + composite)} {{",
        f'{indent}label={_quote(composite)}; style="rounded,dashed"; color="#64748b";',
    ]
    lines.extend(indent + _node(plan, pe_id) for pe_id in plan.graph.composites[composite] if pe_id not in nested)
    for child in children:
        lines.extend(_cluster(plan, child, tree, depth + 1))
    lines.append(f"{'  ' * depth}}}")
    return lines


def dot_escape(text: str) -> str:
    """``text`` escaped for a double-quoted Graphviz string (backslashes and quotes)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _quote(text: str) -> str:
    return '"' + dot_escape(text) + '"'


def _esc(text: str) -> str:
    return html.escape(text, quote=True)
