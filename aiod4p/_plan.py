"""The planner: graph x options -> ExecutionPlan. Pure data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._graph import FlatGraph, WorkflowGraph
from ._groupings import All, Global, GroupBy, Grouping, Shuffle
from ._pe import PE
from ._provenance import check_level
from .errors import GraphError

__all__ = ["ChannelSpec", "ExecutionPlan", "InstanceRef", "PEPlan", "PlanOptions", "RouteSpec", "make_plan"]


@dataclass(frozen=True, order=True)
class InstanceRef:
    """One running instance of a PE."""

    pe: str
    index: int

    def __str__(self) -> str:
        return f"{self.pe}[{self.index}]"


@dataclass(frozen=True)
class PlanOptions:
    """What a mapping asks of the planner.

    Attributes:
        workers: number of worker processes (event loops) to place instances on.
        default_parallelism: instances of a PE whose parallelism is not set and
            not forced to one (sources, ``global`` inputs); ``None`` means one
            per worker.
        force_single: run exactly one instance of every PE (the simple mapping).
        batch_size: items per batch on a channel.
        credits: batches a channel may have in flight before its sender waits.
        provenance: ``None`` (off), ``"pe"`` or ``"item"``: what each worker records
            (see :mod:`aiod4p._provenance`).
    """

    workers: int = 1
    default_parallelism: int | None = None
    force_single: bool = False
    batch_size: int = 256
    credits: int = 4
    provenance: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"the number of workers must be at least 1, not {self.workers}")
        if self.default_parallelism is not None and self.default_parallelism < 1:
            raise ValueError(f"parallelism must be at least 1, not {self.default_parallelism}")
        if self.batch_size < 1 or self.credits < 1:
            raise ValueError("batch_size and credits must be at least 1")
        check_level(self.provenance)


@dataclass(frozen=True)
class PEPlan:
    """A PE's instances and the worker each one runs on."""

    pe_id: str
    parallelism: int
    workers: tuple[int, ...]
    is_root: bool


@dataclass(frozen=True)
class RouteSpec:
    """Where items written to one output port go, along one edge.

    ``targets[i]`` lists the destination instance indices sender instance
    ``i`` may choose from (shuffle keeps a pipeline on its worker when the
    two PEs are placed alike); the grouping picks among them.
    """

    source_port: str
    dest: str
    dest_port: str
    grouping: Grouping
    targets: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ChannelSpec:
    """A channel from one PE instance to another; carries batches and one EOS."""

    channel_id: int
    source: InstanceRef
    dest: InstanceRef
    source_worker: int
    dest_worker: int


@dataclass
class ExecutionPlan:
    """Everything a worker needs to run its share of a workflow."""

    options: PlanOptions
    pes: dict[str, PE]
    placement: dict[str, PEPlan]
    routes: dict[str, list[RouteSpec]]
    channels: list[ChannelSpec]
    result_ports: dict[str, list[str]]
    roots: list[str]
    graph: FlatGraph = field(repr=False)

    @property
    def workers(self) -> int:
        return self.options.workers

    def instances(self, worker: int | None = None) -> list[InstanceRef]:
        """Every instance, or those placed on ``worker``, in topological order."""
        return [
            InstanceRef(pe_id, index)
            for pe_id in self.graph.topological_order()
            for index, placed in enumerate(self.placement[pe_id].workers)
            if worker is None or placed == worker
        ]

    def worker_of(self, instance: InstanceRef) -> int:
        return self.placement[instance.pe].workers[instance.index]

    def channels_into(self, instance: InstanceRef) -> list[ChannelSpec]:
        return [c for c in self.channels if c.dest == instance]

    def channels_from(self, instance: InstanceRef) -> list[ChannelSpec]:
        return [c for c in self.channels if c.source == instance]

    def inflight_bound(self, instance: InstanceRef) -> int:
        """The most items that can wait in ``instance``'s inbox at once."""
        return len(self.channels_into(instance)) * self.options.credits * self.options.batch_size


def make_plan(graph: WorkflowGraph | FlatGraph, options: PlanOptions | None = None) -> ExecutionPlan:
    """Plan a run of ``graph``.

    Parallelism: an explicit ``pe.parallelism`` is honoured; roots and PEs with
    a ``global`` input get one instance; others get ``default_parallelism``
    (one per worker when unset). ``force_single`` gives every PE one instance.
    Instance ``i`` of every PE is placed on worker ``i % workers``, so
    equal-width pipelines stay on one worker and never pay a process hop.

    Raises:
        GraphError: the graph is invalid, or a parallelism is not positive.
    """
    options = options or PlanOptions()
    flat = graph if isinstance(graph, FlatGraph) else graph.flatten()
    roots = flat.roots()
    placement: dict[str, PEPlan] = {}
    for pe_id, pe in flat.pes.items():
        parallelism = _parallelism(flat, pe_id, pe, roots, options)
        workers = tuple(index % options.workers for index in range(parallelism))
        placement[pe_id] = PEPlan(pe_id, parallelism, workers, pe_id in roots)

    routes: dict[str, list[RouteSpec]] = {pe_id: [] for pe_id in flat.pes}
    pairs: set[tuple[InstanceRef, InstanceRef]] = set()
    for edge in flat.edges:
        source, dest = placement[edge.source], placement[edge.dest]
        targets = tuple(_targets(edge.grouping, source, dest, index) for index in range(source.parallelism))
        routes[edge.source].append(RouteSpec(edge.source_port, edge.dest, edge.dest_port, edge.grouping, targets))
        for index, chosen in enumerate(targets):
            for target in chosen:
                pairs.add((InstanceRef(edge.source, index), InstanceRef(edge.dest, target)))

    channels = [
        ChannelSpec(
            channel_id,
            src,
            dst,
            placement[src.pe].workers[src.index],
            placement[dst.pe].workers[dst.index],
        )
        for channel_id, (src, dst) in enumerate(sorted(pairs))
    ]
    return ExecutionPlan(
        options=options,
        pes=dict(flat.pes),
        placement=placement,
        routes=routes,
        channels=channels,
        result_ports={pe_id: ports for pe_id, ports in flat.result_ports().items() if ports},
        roots=roots,
        graph=flat,
    )


def _parallelism(flat: FlatGraph, pe_id: str, pe: PE, roots: list[str], options: PlanOptions) -> int:
    if options.force_single:
        return 1
    if pe.parallelism is not None:
        if not isinstance(pe.parallelism, int) or pe.parallelism < 1:
            raise GraphError(f"PE {pe_id}: parallelism must be a positive integer, not {pe.parallelism!r}")
        return pe.parallelism
    if pe_id in roots or any(isinstance(edge.grouping, Global) for edge in flat.incoming(pe_id)):
        return 1
    return options.default_parallelism or options.workers


def _targets(grouping: Grouping, source: PEPlan, dest: PEPlan, index: int) -> tuple[int, ...]:
    every = tuple(range(dest.parallelism))
    if isinstance(grouping, Global):
        return (0,)
    if isinstance(grouping, (All, GroupBy)):
        return every
    assert isinstance(grouping, Shuffle)
    if source.parallelism == dest.parallelism and source.workers == dest.workers:
        return (index,)  # forward: keep an equal-width pipeline on its worker
    # Rotate the candidates so each sender starts its round robin elsewhere.
    shift = index % dest.parallelism
    return every[shift:] + every[:shift]
