"""``dispel4py.workflow_graph`` on aiod4p: :class:`WorkflowGraph`.

A dispel4py composite is a workflow graph with ``inputmappings`` and
``outputmappings`` (a :class:`~aiod4p.compat.base.CompositePE`, or the graph
``create_iterative_chain`` returns). Connected like a PE, it is wrapped once
in an aiod4p :class:`~aiod4p.CompositePE` whose ports follow those mappings
when the graph is flattened, so mappings set after connecting count too.
Every connection into a composite input is kept (dispel4py keeps only the
first). A flattened graph shares ``-n`` processes among its PEs as dispel4py
does (:func:`aiod4p.compat.processor.place`).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._graph import FlatGraph
from .._graph import WorkflowGraph as _CoreWorkflowGraph
from .._groupings import ROUND_ROBIN, GroupingLike
from .._pe import PE, CompositePE, InputPort, OutputPort
from .._visual import render_dot, to_dot
from ..errors import GraphError
from .core import GenericPE
from .processor import place

# GenericPE: dispel4py's workflow_graph holds it (it imports it), so `from dispel4py.workflow_graph import *` gives it
__all__ = ["GenericPE", "WorkflowGraph", "as_pe", "draw", "drawDot", "write_image"]

_composite_counter = itertools.count()
_WRAPPER = "_aiod4p_composite"


class WorkflowGraph(_CoreWorkflowGraph):
    """dispel4py's workflow graph: ``connect`` PEs (or composites) port to port.

    PEs get dispel4py's ids (class name + a process-wide counter) when first
    added to any graph.
    """

    def add(self, pe: Any) -> PE:
        """Add a PE or a composite graph; returns the PE that represents it.

        Raises:
            GraphError: ``pe`` is neither a PE nor a workflow graph.
        """
        return super().add(as_pe(pe))

    def connect(
        self,
        source: Any,
        source_port: str,
        dest: Any,
        dest_port: str,
        *,
        grouping: GroupingLike = None,
    ) -> Any:
        """Connect ``source.source_port`` to ``dest.dest_port``; either may be a composite.

        Raises:
            GraphError: a port is not declared on its PE or composite.
        """
        return super().connect(as_pe(source), source_port, as_pe(dest), dest_port, grouping=grouping)

    def flatten(self) -> FlatGraph:
        """Expand composites and validate (dispel4py flattens in place; aiod4p returns the result).

        Raises:
            GraphError: as :meth:`aiod4p.WorkflowGraph.flatten`, or a composite
                maps a port to something that is not a PE.
        """
        _add_mapped(self, set())
        flat = super().flatten()
        flat.placer = place  # dispel4py shares -n processes among the PEs its own way
        return flat

    def getContainedObjects(self) -> list[Any]:
        """The PEs and composite graphs added to this graph, sorted by id as dispel4py does."""
        return sorted(
            (pe.graph if isinstance(pe, _GraphPE) else pe for pe in self.pes),
            key=lambda obj: str(getattr(obj, "id", "")),
        )

    def get_contained_objects(self) -> list[Any]:
        """dispel4py 2.0's :meth:`getContainedObjects`."""
        return self.getContainedObjects()


class _GraphPE(CompositePE):
    """A dispel4py composite graph seen by the core as a composite PE."""

    def __init__(self, graph: _CoreWorkflowGraph) -> None:
        super().__init__(graph, name=str(getattr(graph, "name", "") or type(graph).__name__))
        # A composite consumes no number of dispel4py's PE counter.
        self.id = f"{self.name}:{next(_composite_counter)}"

    @property
    def inputs(self) -> dict[str, InputPort]:
        return {name: InputPort(name, ROUND_ROBIN, required=False) for name in _mappings(self.graph, "inputmappings")}

    @inputs.setter
    def inputs(self, ports: Mapping[str, InputPort]) -> None:
        _only_empty(self, ports)

    @property
    def outputs(self) -> dict[str, OutputPort]:
        return {name: OutputPort(name) for name in _mappings(self.graph, "outputmappings")}

    @outputs.setter
    def outputs(self, ports: Mapping[str, OutputPort]) -> None:
        _only_empty(self, ports)

    @property
    def input_map(self) -> dict[str, list[tuple[PE, str]]]:
        return {
            name: _targets(self, "input", name, value) for name, value in _mappings(self.graph, "inputmappings").items()
        }

    @input_map.setter
    def input_map(self, value: Mapping[str, Any]) -> None:
        _only_empty(self, value)

    @property
    def output_map(self) -> dict[str, tuple[PE, str]]:
        mapped: dict[str, tuple[PE, str]] = {}
        for name, value in _mappings(self.graph, "outputmappings").items():
            targets = _targets(self, "output", name, value)
            if len(targets) != 1:
                raise GraphError(f"composite {self.label}: output {name!r} must map to exactly one inner output")
            mapped[name] = targets[0]
        return mapped

    @output_map.setter
    def output_map(self, value: Mapping[str, Any]) -> None:
        _only_empty(self, value)


def as_pe(node: Any) -> Any:
    """``node`` itself, or the composite PE standing for a workflow graph (made once per graph)."""
    if not isinstance(node, _CoreWorkflowGraph):
        return node
    wrapper = node.__dict__.get(_WRAPPER)
    if wrapper is None:
        wrapper = _GraphPE(node)
        node.__dict__[_WRAPPER] = wrapper
    return wrapper


def _mappings(graph: _CoreWorkflowGraph, attribute: str) -> dict[str, Any]:
    mappings = getattr(graph, attribute, None)
    return dict(mappings) if mappings else {}


def _targets(composite: _GraphPE, kind: str, name: str, value: Any) -> list[tuple[PE, str]]:
    # dispel4py maps a port to one (pe, port) pair; a list of pairs maps it to several.
    pairs = value if isinstance(value, list) else [value]
    targets: list[tuple[PE, str]] = []
    for pair in pairs:
        try:
            inner, port = pair
        except (TypeError, ValueError):
            raise GraphError(
                f"composite {composite.label}: {kind} {name!r} must map to (pe, port), not {pair!r}"
            ) from None
        inner = as_pe(inner)
        if not isinstance(inner, PE) or not isinstance(port, str):
            raise GraphError(f"composite {composite.label}: {kind} {name!r} must map to (pe, port), not {pair!r}")
        targets.append((inner, port))
    return targets


def _add_mapped(graph: _CoreWorkflowGraph, seen: set[int]) -> None:
    # A mapped PE that was never connected inside its composite (a one-function
    # chain) joins the composite's graph, and gets its id, now, as in dispel4py.
    if id(graph) in seen:
        return
    seen.add(id(graph))
    for pe in graph.pes:
        if isinstance(pe, _GraphPE):
            for targets in (*pe.input_map.values(), list(pe.output_map.values())):
                for inner, _ in targets:
                    pe.graph.add(inner)
            _add_mapped(pe.graph, seen)


def _only_empty(composite: _GraphPE, value: Mapping[str, Any]) -> None:
    if value:
        raise GraphError(
            f"composite {composite.label}: its ports follow the graph's inputmappings/outputmappings; set those instead"
        )


def draw(graph: WorkflowGraph) -> str:
    """dispel4py's ``draw``: the graph in Graphviz's dot language (aiod4p's picture of it).

    Raises:
        GraphError: the graph is invalid.
    """
    return to_dot(graph)


def drawDot(graph: WorkflowGraph, img_type: str = "png") -> bytes:
    """dispel4py's ``drawDot``: the graph drawn by Graphviz's ``dot`` as an ``img_type`` image.

    Raises:
        Aiod4pError: ``dot`` is not installed (the message names the Debian package) or failed.
        GraphError: the graph is invalid.
    """
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, f"workflow.{img_type}")
        render_dot(to_dot(graph), img_type, path)
        return path.read_bytes()


def write_image(graph: WorkflowGraph, filename: str, img_type: str = "png") -> None:
    """dispel4py's ``write_image``: write the graph drawn by Graphviz's ``dot`` (``img_type``) to ``filename``.

    Raises:
        Aiod4pError: as :func:`drawDot`.
        GraphError: the graph is invalid.
    """
    render_dot(to_dot(graph), img_type, Path(filename))
