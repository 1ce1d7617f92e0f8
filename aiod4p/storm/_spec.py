"""The Storm topology of a plan, as pure data (no streamparse, no I/O).

Every root PE becomes a spout and every other PE a bolt hosting it; a PE's
parallelism becomes the component's parallelism hint. Each output port is a
Storm stream named after the port, whose tuples are ``[item, key fields...]``;
a bolt subscribes to it with the grouping of the connection:

=========================  ==========================================
aiod4p grouping            Storm grouping
=========================  ==========================================
``shuffle``                shuffle
``group_by(i, ...)``       fields, on one field ``key_<i>`` per index
``group_by(key=fn)``       fields, on the field ``key_<fn name>``
``all``                    all
``global``                 global
=========================  ==========================================

Storm lets a bolt subscribe to a stream only once, so a second connection
between the same output port and the same destination PE gets its own
stream (``<port>_2``, ...). Every component also declares the stream
:data:`EOS_STREAM`, which carries one end-of-stream marker per task once its
input is exhausted; every downstream component subscribes to it with the
``all`` grouping, so a bolt knows when all its upstream tasks have finished
and runs ``postprocess``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .._groupings import All, Global, GroupBy, Grouping, Shuffle
from .._plan import ExecutionPlan
from ..errors import GraphError

__all__ = [
    "DEFAULT_MAX_REPLAYS",
    "EOS_STREAM",
    "ITEM_FIELD",
    "PES_FILE",
    "SPEC_FILE",
    "ComponentSpec",
    "InputSpec",
    "KeyField",
    "StreamSpec",
    "TopologySpec",
    "plan_topology",
]

EOS_STREAM = "aiod4p_eos"
ITEM_FIELD = "item"
EOS_FIELD = "pe"
DEFAULT_MAX_REPLAYS = 3  # replays of a failed tuple before its spout drops it (and a run fails)
# The files of a project's src/ (next to the components' module) that the build writes and every component reads.
SPEC_FILE = "aiod4p_topology.json"  # the TopologySpec, as JSON
PES_FILE = "aiod4p_pes.pickle"  # the PEs and group-by key functions, each pickled apart, by id


@dataclass(frozen=True)
class KeyField:
    """A field computed from the item for a fields grouping.

    ``index`` is the item index it holds (``item[index]``); ``None`` means the
    value is ``key(item)`` for the group-by key function stored with the PEs
    under ``function``.
    """

    name: str
    index: int | str | None = None
    function: str | None = None


@dataclass(frozen=True)
class StreamSpec:
    """One output stream: where a port's items go, with their key fields."""

    name: str
    port: str
    keys: tuple[KeyField, ...] = ()

    @property
    def fields(self) -> list[str]:
        return [ITEM_FIELD, *(key.name for key in self.keys)]


@dataclass(frozen=True)
class InputSpec:
    """A subscription: ``source``'s ``stream`` arrives on input ``port``.

    ``grouping`` is ``shuffle``, ``fields``, ``all`` or ``global``;
    ``fields`` names the grouping fields. ``port`` is empty for the
    end-of-stream subscription.
    """

    source: str
    stream: str
    port: str
    grouping: str
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class ComponentSpec:
    """A spout (root PE) or bolt hosting the PE ``name``; ``results`` are its unconnected output ports."""

    name: str
    kind: str
    parallelism: int
    streams: tuple[StreamSpec, ...]
    inputs: tuple[InputSpec, ...]
    results: tuple[str, ...] = ()

    def streams_of(self, port: str) -> list[StreamSpec]:
        return [stream for stream in self.streams if stream.port == port]

    @property
    def upstream(self) -> list[str]:
        """The components this one receives from, in order, once each."""
        return list(dict.fromkeys(spec.source for spec in self.inputs if spec.stream != EOS_STREAM))


@dataclass(frozen=True)
class TopologySpec:
    """The whole topology, plus the inputs of the spouts (JSON-ready feeds).

    ``report`` is ``HOST:PORT`` of the process that submitted the topology
    and waits for its results (``aiod4p run --mapping storm``), empty for a
    topology that runs on its own; ``token`` identifies that run.
    ``dispel4py``: the components serve dispel4py's modules from
    :mod:`aiod4p.compat` (the workflow is a dispel4py one).
    ``sources``: the modules and packages copied into the project's ``src``
    (the workflow file...), by name, with the file (``.py``) or the package
    directory each was copied from: what errors reported to the run name
    instead of the copy a task ran.
    """

    name: str
    components: tuple[ComponentSpec, ...]
    feeds: dict[str, Any]
    max_replays: int = DEFAULT_MAX_REPLAYS
    report: str = ""
    token: str = ""
    dispel4py: bool = False
    sources: dict[str, str] = field(default_factory=dict)

    def component(self, name: str) -> ComponentSpec:
        """The component called ``name``.

        Raises:
            GraphError: there is none.
        """
        for component in self.components:
            if component.name == name:
                return component
        raise GraphError(f"the topology {self.name} has no component {name!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TopologySpec:
        components = tuple(
            ComponentSpec(
                name=c["name"],
                kind=c["kind"],
                parallelism=c["parallelism"],
                streams=tuple(
                    StreamSpec(s["name"], s["port"], tuple(KeyField(**k) for k in s["keys"])) for s in c["streams"]
                ),
                inputs=tuple(
                    InputSpec(i["source"], i["stream"], i["port"], i["grouping"], tuple(i["fields"]))
                    for i in c["inputs"]
                ),
                results=tuple(c.get("results", ())),
            )
            for c in data["components"]
        )
        return cls(
            data["name"],
            components,
            data["feeds"],
            data["max_replays"],
            data.get("report", ""),
            data.get("token", ""),
            data.get("dispel4py", False),
            data.get("sources", {}),
        )


def plan_topology(
    plan: ExecutionPlan, name: str, feeds: dict[str, Any], max_replays: int = DEFAULT_MAX_REPLAYS
) -> tuple[TopologySpec, dict[str, Callable[[Any], Any]]]:
    """Compile ``plan`` into a topology called ``name``.

    Returns the spec and the group-by key functions its key fields refer to
    (by :attr:`KeyField.function`).

    Raises:
        GraphError: a PE id or port name collides with Storm's reserved names.
    """
    flat = plan.graph
    order = flat.topological_order()
    for pe_id in order:
        _check_name(f"PE id {pe_id!r}", pe_id)
        for port in plan.pes[pe_id]._output_ports:
            _check_name(f"output port {port!r} of PE {pe_id}", port)
    functions: dict[str, Callable[[Any], Any]] = {}
    streams: dict[str, list[StreamSpec]] = {}
    edge_stream: dict[int, StreamSpec] = {}
    for pe_id in order:
        taken = set(plan.pes[pe_id]._output_ports) | {EOS_STREAM}
        declared: list[StreamSpec] = []
        for port in plan.pes[pe_id]._output_ports:
            # Storm lets a bolt subscribe to a stream once: repeat subscribers get a new stream.
            assigned: list[tuple[str, list[int]]] = []
            for index, edge in enumerate(flat.edges):
                if edge.source != pe_id or edge.source_port != port:
                    continue
                slot = next((s for s in assigned if all(flat.edges[i].dest != edge.dest for i in s[1])), None)
                if slot is None:
                    stream_name = port if not assigned else _fresh(f"{port}_{len(assigned) + 1}", taken)
                    taken.add(stream_name)
                    slot = (stream_name, [])
                    assigned.append(slot)
                slot[1].append(index)
            if not assigned:
                declared.append(StreamSpec(port, port))  # a result port: nobody subscribes
            for stream_name, indices in assigned:
                keys: dict[str, KeyField] = {}
                for index in indices:
                    for key in _key_fields(flat.edges[index].grouping, keys, functions, f"{pe_id}.{stream_name}"):
                        keys[key.name] = key
                spec = StreamSpec(stream_name, port, tuple(keys.values()))
                declared.append(spec)
                for index in indices:
                    edge_stream[index] = spec
        streams[pe_id] = declared

    components = []
    for pe_id in order:
        inputs: list[InputSpec] = []
        for index, edge in enumerate(flat.edges):
            if edge.dest == pe_id:
                stream = edge_stream[index]
                grouping, fields = _storm_grouping(edge.grouping, stream, functions)
                inputs.append(InputSpec(edge.source, stream.name, edge.dest_port, grouping, fields))
        upstream = list(dict.fromkeys(spec.source for spec in inputs))
        inputs.extend(InputSpec(source, EOS_STREAM, "", "all") for source in upstream)
        components.append(
            ComponentSpec(
                name=pe_id,
                kind="spout" if pe_id in plan.roots else "bolt",
                parallelism=plan.placement[pe_id].parallelism,
                streams=tuple(streams[pe_id]),
                inputs=tuple(inputs),
                results=tuple(plan.result_ports.get(pe_id, [])),
            )
        )
    return TopologySpec(name, tuple(components), feeds, max_replays), functions


def _check_name(what: str, name: str) -> None:
    if name.startswith("__") or name == EOS_STREAM:
        raise GraphError(f"{what} is reserved by Storm or aiod4p (names starting with '__' and {EOS_STREAM!r})")


def _fresh(name: str, taken: set[str]) -> str:
    candidate, counter = name, 1
    while candidate in taken:
        counter += 1
        candidate = f"{name}_{counter}"
    return candidate


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text) or "fn"


def _key_fields(
    grouping: Grouping, existing: dict[str, KeyField], functions: dict[str, Callable[[Any], Any]], where: str
) -> list[KeyField]:
    if not isinstance(grouping, GroupBy):
        return []
    if grouping.key is not None:
        for key in existing.values():
            if key.function is not None and functions[key.function] is grouping.key:
                return [key]
        base = "key_" + _identifier(getattr(grouping.key, "__name__", "fn"))
        name = _fresh(base, set(existing))
        function_id = f"{where}.{name}"
        functions[function_id] = grouping.key
        return [KeyField(name, function=function_id)]
    fields = []
    for index in grouping.indices:
        same = next((k for k in existing.values() if k.function is None and k.index == index), None)
        if same is None:
            same = KeyField(_fresh("key_" + _identifier(str(index)), set(existing)), index=index)
            existing = {**existing, same.name: same}
        fields.append(same)
    return fields


def _storm_grouping(
    grouping: Grouping, stream: StreamSpec, functions: dict[str, Callable[[Any], Any]]
) -> tuple[str, tuple[str, ...]]:
    if isinstance(grouping, Shuffle):
        return "shuffle", ()
    if isinstance(grouping, All):
        return "all", ()
    if isinstance(grouping, Global):
        return "global", ()
    assert isinstance(grouping, GroupBy)
    if grouping.key is not None:
        for key in stream.keys:
            if key.function is not None and functions[key.function] is grouping.key:
                return "fields", (key.name,)
        raise AssertionError("key function field missing")
    names = []
    for index in grouping.indices:
        names.append(next(k.name for k in stream.keys if k.function is None and k.index == index))
    return "fields", tuple(names)
