"""The workflow graph: PEs joined port to port (a directed multigraph)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._groupings import Grouping, GroupingLike, as_grouping
from ._pe import PE, CompositePE
from .errors import GraphError

__all__ = ["Connection", "FlatGraph", "WorkflowGraph"]

_pe_counter = itertools.count()


@dataclass(frozen=True)
class Connection:
    """One edge: ``source.source_port -> dest.dest_port``.

    ``grouping`` overrides the grouping declared on the destination port.
    """

    source: PE
    source_port: str
    dest: PE
    dest_port: str
    grouping: Grouping | None = None


class WorkflowGraph:
    """A directed multigraph of PEs.

    PEs are added implicitly by :meth:`connect` (or explicitly by :meth:`add`)
    and receive their id when first added to any graph: the PE's name
    followed by a process-wide counter, as dispel4py numbers them.
    """

    def __init__(self) -> None:
        self._pes: list[PE] = []
        self._members: set[int] = set()
        self.connections: list[Connection] = []

    @property
    def pes(self) -> list[PE]:
        """The PEs in the order they were added."""
        return list(self._pes)

    def add(self, pe: PE) -> PE:
        """Add ``pe`` (once; adding it again is a no-op) and return it.

        Raises:
            GraphError: ``pe`` is not a PE, or its ``__init__`` did not call ``super().__init__()``.
        """
        if not isinstance(pe, PE):
            raise GraphError(f"cannot add {pe!r} to a workflow graph: {_not_a_pe(pe)}")
        if "_runtime" not in vars(pe):
            raise GraphError(
                f"cannot add a {type(pe).__name__} to a workflow graph: its __init__ must call super().__init__()"
                " (which declares its ports)"
            )
        if id(pe) not in self._members:
            self._members.add(id(pe))
            self._pes.append(pe)
            if pe.id is None:
                pe.id = f"{pe.name}{next(_pe_counter)}"
        return pe

    def connect(
        self,
        source: PE,
        source_port: str,
        dest: PE,
        dest_port: str,
        *,
        grouping: GroupingLike = None,
    ) -> Connection:
        """Connect ``source.source_port`` to ``dest.dest_port``.

        ``grouping`` overrides the grouping declared on the destination port
        for this connection only. Connecting the same ports twice makes two
        distinct edges.

        Raises:
            GraphError: either port is not declared on its PE.
        """
        self.add(source)
        self.add(dest)
        if source_port not in source._output_ports:
            outputs = sorted(source._output_ports) or "none"
            raise GraphError(f"PE {source.label} has no output port {source_port!r} (outputs: {outputs})")
        if dest_port not in dest._input_ports:
            raise GraphError(
                f"PE {dest.label} has no input port {dest_port!r} (inputs: {sorted(dest._input_ports) or 'none'})"
            )
        connection = Connection(
            source, source_port, dest, dest_port, as_grouping(grouping) if grouping is not None else None
        )
        self.connections.append(connection)
        return connection

    def flatten(self) -> FlatGraph:
        """Expand composites and validate the graph.

        Raises:
            GraphError: duplicate PE ids, a required input left unconnected, or
                a cycle.
        """
        return FlatGraph.from_graph(self)


@dataclass(frozen=True)
class Edge:
    """A connection between two runnable PEs, with its grouping resolved."""

    source: str
    source_port: str
    dest: str
    dest_port: str
    grouping: Grouping


@dataclass
class FlatGraph:
    """A validated graph of runnable PEs (composites expanded), keyed by id."""

    pes: dict[str, PE]
    edges: list[Edge]
    composites: dict[str, list[str]] = field(default_factory=dict)
    #: How a graph written for another runtime shares out worker processes:
    #: ``placer(graph, processes, workers)`` gives the PEs it names the
    #: workers (of ``workers``) of their instances, ``processes`` shared out
    #: (dispel4py's rule, set by aiod4p.compat); the planner's own rule places
    #: the others. ``None``: the planner's rule for every PE.
    placer: Callable[[FlatGraph, int, int], dict[str, tuple[int, ...]]] | None = None

    @classmethod
    def from_graph(cls, graph: WorkflowGraph) -> FlatGraph:
        pes: dict[str, PE] = {}
        composites: dict[str, list[str]] = {}
        _collect(graph, pes, composites)
        edges: list[Edge] = []
        for connection in _all_connections(graph):
            for source, source_port in _resolve_output(connection.source, connection.source_port):
                for dest, dest_port in _resolve_input(connection.dest, connection.dest_port):
                    grouping = connection.grouping or dest._input_ports[dest_port].grouping
                    edges.append(Edge(_id(source), source_port, _id(dest), dest_port, grouping))
        flat = cls(pes, edges, composites)
        flat._check_required_inputs()
        flat._check_acyclic()
        return flat

    def roots(self) -> list[str]:
        """PEs with no incoming edge: they are fed by the run's inputs."""
        fed = {edge.dest for edge in self.edges}
        return [pe_id for pe_id in self.pes if pe_id not in fed]

    def outgoing(self, pe_id: str) -> list[Edge]:
        """The edges that leave PE ``pe_id``."""
        return [edge for edge in self.edges if edge.source == pe_id]

    def result_ports(self) -> dict[str, list[str]]:
        """Output ports with no outgoing edge, per PE: their items are results."""
        connected = {(edge.source, edge.source_port) for edge in self.edges}
        return {
            pe_id: [port for port in pe._output_ports if (pe_id, port) not in connected]
            for pe_id, pe in self.pes.items()
        }

    def topological_order(self) -> list[str]:
        order: list[str] = []
        indegree = {pe_id: 0 for pe_id in self.pes}
        for edge in self.edges:
            indegree[edge.dest] += 1
        leaving: dict[str, list[Edge]] = {}
        for edge in self.edges:
            leaving.setdefault(edge.source, []).append(edge)
        ready = deque(pe_id for pe_id, degree in indegree.items() if degree == 0)
        while ready:
            pe_id = ready.popleft()
            order.append(pe_id)
            for edge in leaving.get(pe_id, ()):
                indegree[edge.dest] -= 1
                if indegree[edge.dest] == 0:
                    ready.append(edge.dest)
        return order

    def check_runnable(self) -> None:
        """Check, before a run or a Storm build, that every PE can do some work: a graph still being drawn may
        have PEs that cannot.

        Raises:
            GraphError: a PE implements no handler (:meth:`~aiod4p.PE.process`, ``process_item``, ...), nor
                ``preprocess`` or ``postprocess`` (named, with the method to write).
        """
        for pe_id, pe in self.pes.items():
            problem = pe._unimplemented()
            if problem is not None:
                raise GraphError(f"PE {pe_id}: {problem}")

    def _check_required_inputs(self) -> None:
        connected = {(edge.dest, edge.dest_port) for edge in self.edges}
        for pe_id, pe in self.pes.items():
            used = [port for port in pe._input_ports if (pe_id, port) in connected]
            if not used:
                continue  # a root, fed by the run's inputs
            missing = [p.name for p in pe._input_ports.values() if p.required and (pe_id, p.name) not in connected]
            if missing:
                raise GraphError(f"PE {pe_id}: required input port {missing[0]!r} is not connected")

    def _check_acyclic(self) -> None:
        if len(self.topological_order()) == len(self.pes):
            return
        cycle = self._find_cycle()
        raise GraphError("the graph has a cycle: " + " -> ".join(cycle) + " (cycles are not supported)")

    def _find_cycle(self) -> list[str]:
        colour: dict[str, int] = {}
        stack: list[str] = []

        def visit(node: str) -> list[str] | None:
            colour[node] = 1
            stack.append(node)
            for edge in self.outgoing(node):
                state = colour.get(edge.dest, 0)
                if state == 1:
                    return [*stack[stack.index(edge.dest) :], edge.dest]
                if state == 0 and (found := visit(edge.dest)):
                    return found
            stack.pop()
            colour[node] = 2
            return None

        for pe_id in self.pes:
            if colour.get(pe_id, 0) == 0 and (found := visit(pe_id)):
                return found
        return []


def _id(pe: PE) -> str:
    assert pe.id is not None
    return pe.id


def _all_connections(graph: WorkflowGraph) -> Iterator[Connection]:
    yield from graph.connections
    for pe in graph.pes:
        if isinstance(pe, CompositePE):
            yield from _all_connections(pe.graph)


def _collect(graph: WorkflowGraph, pes: dict[str, PE], composites: dict[str, list[str]]) -> None:
    for pe in graph.pes:
        if isinstance(pe, CompositePE):
            inner: dict[str, PE] = {}
            _collect(pe.graph, inner, composites)
            composites[_id(pe)] = list(inner)
            for pe_id, inner_pe in inner.items():
                _register(pes, pe_id, inner_pe)
        else:
            _register(pes, _id(pe), pe)


def _register(pes: dict[str, PE], pe_id: str, pe: PE) -> None:
    existing = pes.get(pe_id)
    if existing is not None and existing is not pe:
        raise GraphError(f"duplicate PE id {pe_id!r}: two different PEs share it")
    pes[pe_id] = pe


def _resolve_input(pe: PE, port: str) -> list[tuple[PE, str]]:
    if not isinstance(pe, CompositePE):
        return [(pe, port)]
    targets = pe.input_map.get(port)
    if not targets:
        raise GraphError(f"composite {pe.label}: input {port!r} is not mapped to an inner PE")
    for inner, inner_port in targets:
        _check_mapped(pe, "input", port, inner, inner_port, inner._input_ports)
    return [resolved for inner, inner_port in targets for resolved in _resolve_input(inner, inner_port)]


def _resolve_output(pe: PE, port: str) -> list[tuple[PE, str]]:
    if not isinstance(pe, CompositePE):
        return [(pe, port)]
    target = pe.output_map.get(port)
    if target is None:
        raise GraphError(f"composite {pe.label}: output {port!r} is not mapped to an inner PE")
    _check_mapped(pe, "output", port, *target, target[0]._output_ports)
    return _resolve_output(*target)


def _check_mapped(composite: PE, kind: str, port: str, inner: PE, inner_port: str, ports: Mapping[str, Any]) -> None:
    """Raise :class:`GraphError` unless ``inner`` has the port ``inner_port`` (one of ``ports``, its ``kind``
    ports) that ``composite`` maps its ``kind`` ``port`` to."""
    if inner_port not in ports:
        raise GraphError(
            f"composite {composite.label}: {kind} {port!r} is mapped to PE {inner.label}'s {kind} port"
            f" {inner_port!r}, which it does not have ({kind}s: {sorted(ports) or 'none'})"
        )


def _not_a_pe(thing: object) -> str:
    """Why ``thing`` (which is not a PE) cannot join a graph, with what to pass instead when that is clear."""
    if isinstance(thing, type) and issubclass(thing, PE):
        return f"it is a PE class, not a PE: add an instance, {thing.__name__}(...)"
    if callable(thing):
        return (
            "it is not a PE but a callable: call it if it makes PEs (a factory made by @iterative, @producer "
            "or @consumer), or wrap a plain function in FunctionPE(fn)"
        )
    return "it is not a PE"
