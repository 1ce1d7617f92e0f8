"""The planner: graph x options -> ExecutionPlan. Pure data, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ._graph import FlatGraph, WorkflowGraph
from ._groupings import Grouping
from ._pe import PE
from .errors import GraphError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CREDITS",
    "DEFAULT_MAX_DELAY",
    "PROVENANCE_LEVELS",
    "REMOTE_BATCH_FACTOR",
    "REMOTE_TIME_FACTOR",
    "RESULT_WINDOW",
    "TURNS_TIME_FACTOR",
    "ChannelSpec",
    "ExecutionPlan",
    "InstanceRef",
    "PEPlan",
    "PlanOptions",
    "RouteSpec",
    "check_provenance_level",
    "make_plan",
    "worker_list",
]

DEFAULT_BATCH_SIZE = 256
"""Items per batch on a channel, unless asked otherwise (the library, the CLI and the planner use it)."""
DEFAULT_CREDITS = 4
"""Batches a channel may have in flight before its sender waits, unless asked otherwise."""
RESULT_WINDOW = 4
"""Results may wait this many times ``batch_bytes`` (:attr:`PlanOptions.result_bytes`) for the caller, and
travel as much from each worker to it: results of megabytes are bounded by bytes, not only by batches."""
RESULT_BATCHES_IN_FLIGHT = 64
"""Batches of results each worker may have sent the caller that it has not yet taken, whatever their bytes
(:attr:`PlanOptions.result_batches`): enough to keep the caller busy while its acknowledgement travels back, few
enough that a drain or a live run's reader waits for a fraction of a second of them."""
PROVENANCE_LEVELS = ("pe", "item")
"""What provenance records: per PE and port (counts, timing), or per item (its lineage)."""
DEFAULT_MAX_DELAY = 0.005
"""Seconds a partly filled batch may wait for more items before it is sent, unless asked otherwise."""
REMOTE_BATCH_FACTOR = 16
"""A batch between two workers may carry this many times ``batch_size`` items: each message between
processes costs a pickle frame, a write, a wake-up of the peer and a credit coming back, which small
batches of cheap items cannot pay for (the time and byte bounds still apply)."""
MAX_CHANNELS = 1_000_000
"""The most channels a plan may have. Every channel holds buffers and credit in every run (about 2 KB and
20 us to build each), and an edge needs one per sending instance and destination it may reach: between
two PEs of N instances each, a key grouping or an ``all`` needs N x N (``-n 10000`` on the async mapping:
10^8 channels, which took 17 GB and never started)."""
REMOTE_TIME_FACTOR = 4
"""A batch between two workers may carry this many times ``batch_seconds`` of its destination's
measured work: the credits of such a channel come back only when the sending worker's event loop
reads them (it gives way every few milliseconds), and the work in flight must cover that round
trip or the other worker idles."""
TURNS_TIME_FACTOR = 4
"""Within a worker, a batch may carry this many times ``batch_seconds`` of its destination's measured work
where every instance of the destination PE runs on that worker and their calls take turns on its event
loop (plain calls, not threaded): small batches buy no parallelism there and each costs a hand-over. The
work queued on such a channel, which a drain or a checkpoint's barrier waits behind, grows with it
(``credits`` times this): sentiment on async took 6.8% more CPU time than on simple with 1, 5.1% with 4,
3.6% with 25, but a drain behind three stages of 3 ms calls took 0.15 s with 1 or 4 and 1.3 s with 25."""


@dataclass(frozen=True, order=True)
class InstanceRef:
    """One running instance of a PE."""

    pe: str
    index: int

    def __str__(self) -> str:
        return f"{self.pe}[{self.index}]"


def check_provenance_level(level: str | None) -> None:
    """Raises ValueError unless ``level`` is ``None`` or one of :data:`PROVENANCE_LEVELS`."""
    if level is not None and level not in PROVENANCE_LEVELS:
        raise ValueError(f"provenance level must be one of {', '.join(PROVENANCE_LEVELS)}, not {level!r}")


@dataclass(frozen=True)
class PlanOptions:
    """What a mapping asks of the planner.

    Attributes:
        workers: number of worker processes (event loops) to place instances on.
        default_parallelism: instances of a PE whose parallelism is not set and
            not forced to one (sources, ``global`` inputs); ``None`` means one
            per worker.
        force_single: run exactly one instance of every PE (the simple mapping).
        batch_size: the most items per batch on a channel within a worker
            (:attr:`remote_batch_size` between workers).
        credits: batches a channel may have in flight before its sender waits.
        batch_seconds: a batch carries at most what its destination PE gets
            through in about this time (measured), so slow stages get items a
            few at a time (:attr:`remote_batch_seconds` between workers; see
            :meth:`batch_bounds`).
        batch_bytes: a batch carries at most about this many bytes of items.
        provenance: ``None`` (off), ``"pe"`` or ``"item"``: what each worker records
            (see :mod:`aiod4p._provenance`).
        busy_workers: place instances on workers 0 to ``busy_workers - 1`` only, as
            if there were that many, and none on the others; ``None``: all workers.
        processes: the processes a graph's ``placer`` (dispel4py's rule) shares
            out among its PEs, when the run was asked for more than ``workers``
            (``aiod4p run`` starts at most one worker per CPU); the instances
            then take the workers in turn. ``None``: ``workers``.
    """

    workers: int = 1
    default_parallelism: int | None = None
    force_single: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    credits: int = DEFAULT_CREDITS
    batch_seconds: float = 0.002
    batch_bytes: int = 1 << 20
    provenance: str | None = None
    busy_workers: int | None = None
    processes: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"the number of workers must be at least 1, not {self.workers}")
        if self.busy_workers is not None and not 1 <= self.busy_workers <= self.workers:
            raise ValueError(f"busy_workers must be between 1 and {self.workers}, not {self.busy_workers}")
        if self.processes is not None and self.processes < 1:
            raise ValueError(f"the number of processes must be at least 1, not {self.processes}")
        if self.default_parallelism is not None and self.default_parallelism < 1:
            raise ValueError(f"parallelism must be at least 1, not {self.default_parallelism}")
        if self.batch_size < 1 or self.credits < 1:
            raise ValueError("batch_size and credits must be at least 1")
        if self.batch_seconds <= 0 or self.batch_bytes < 1:
            raise ValueError("batch_seconds and batch_bytes must be positive")
        check_provenance_level(self.provenance)

    @property
    def result_bytes(self) -> int:
        """The bytes of results (as :func:`~aiod4p._sizes.approximate_size` counts them) that may wait for the
        caller, and that each worker may have sent it that it has not yet taken: :data:`RESULT_WINDOW` times
        ``batch_bytes`` (one batch more where a batch holds one larger item)."""
        return RESULT_WINDOW * self.batch_bytes

    @property
    def result_batches(self) -> int:
        """The batches of results each worker may have sent the caller that it has not yet taken, whatever their
        bytes: :data:`RESULT_BATCHES_IN_FLIGHT`. (Bytes alone let small results, which
        :func:`~aiod4p._sizes.approximate_size` counts at a few bytes each, pile up by the hundred thousand: the
        results of a live run lagged seconds behind, and so did its drain.)"""
        return RESULT_BATCHES_IN_FLIGHT

    @property
    def placing_workers(self) -> int:
        """The workers that instances are placed on (see ``busy_workers``)."""
        return self.busy_workers or self.workers

    @property
    def remote_batch_size(self) -> int:
        """The most items per batch on a channel between two workers."""
        return self.batch_size * REMOTE_BATCH_FACTOR

    @property
    def remote_batch_seconds(self) -> float:
        """The most of its destination's measured work a batch between two workers carries, in seconds."""
        return self.batch_seconds * REMOTE_TIME_FACTOR

    def batch_cap(self, channel: ChannelSpec) -> int:
        """The most items one credit of ``channel`` carries: its items in flight are at most ``credits`` times this."""
        return self.remote_batch_size if channel.source_worker != channel.dest_worker else self.batch_size

    def batch_bounds(self, channel: ChannelSpec, dest_takes_turns: bool) -> tuple[int, float]:
        """The most items, and the most seconds of the destination's measured work, per batch on ``channel``.

        Within a worker a batch may carry up to ``credits x batch_size`` items: it
        then takes one credit per ``batch_size`` items (see
        :class:`aiod4p._channels.LocalChannel`), so items measured as tiny travel in
        fewer, larger batches while the channel's items in flight stay within
        ``credits x batch_size`` (:meth:`batch_cap` per credit). ``dest_takes_turns``:
        every instance of the destination PE runs on this worker, one call at a
        time on its event loop, so the bound by time is :data:`TURNS_TIME_FACTOR`
        times ``batch_seconds``.
        """
        if channel.source_worker != channel.dest_worker:
            return self.remote_batch_size, self.remote_batch_seconds
        return self.batch_size * self.credits, self.batch_seconds * (TURNS_TIME_FACTOR if dest_takes_turns else 1)


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
        """The number of workers (processes, ranks, actors) the plan places instances on."""
        return self.options.workers

    def instances(self, worker: int | None = None) -> list[InstanceRef]:
        """Every instance, or those placed on ``worker``, in topological order."""
        return [
            InstanceRef(pe_id, index)
            for pe_id in self.graph.topological_order()
            for index, placed in enumerate(self.placement[pe_id].workers)
            if worker is None or placed == worker
        ]

    def instances_on(self, worker: int, most: int = 10) -> str:
        """The instances placed on ``worker``, as short text: ``Read0[0], Count1[0-3,6]``, those of the first ``most``
        PEs only (``..., and 290 more PEs``)."""
        indexes: dict[str, list[int]] = {}
        for instance in self.instances(worker):
            indexes.setdefault(instance.pe, []).append(instance.index)
        named = [f"{pe_id}[{worker_list(found)}]" for pe_id, found in list(indexes.items())[:most]]
        more = len(indexes) - most
        return ", ".join(named) + (f", and {more} more PEs" if more > 0 else "")

    def worker_pairs(self) -> list[tuple[int, int]]:
        """The pairs of workers ``(a, b)``, ``a < b``, that share a channel (each pair once, sorted)."""
        return sorted(
            {
                (min(spec.source_worker, spec.dest_worker), max(spec.source_worker, spec.dest_worker))
                for spec in self.channels
                if spec.source_worker != spec.dest_worker
            }
        )

    def worker_of(self, instance: InstanceRef) -> int:
        """The worker that ``instance`` runs on."""
        return self.placement[instance.pe].workers[instance.index]

    def rank_of(self, instance: InstanceRef) -> int:
        """The position of ``instance`` in :meth:`instances` (dispel4py's ``rank``: unique in the run)."""
        return self._first_ranks[instance.pe] + instance.index

    @cached_property
    def _first_ranks(self) -> dict[str, int]:
        first, ranks = 0, {}
        for pe_id in self.graph.topological_order():
            ranks[pe_id] = first
            first += len(self.placement[pe_id].workers)
        return ranks

    def channels_into(self, instance: InstanceRef) -> list[ChannelSpec]:
        """The channels whose destination is ``instance``, in channel id order."""
        return self._by_instance[1].get(instance, [])

    def channels_from(self, instance: InstanceRef) -> list[ChannelSpec]:
        """The channels whose source is ``instance``, in channel id order."""
        return self._by_instance[0].get(instance, [])

    @cached_property
    def _by_instance(self) -> tuple[dict[InstanceRef, list[ChannelSpec]], dict[InstanceRef, list[ChannelSpec]]]:
        """The channels indexed by source and by destination (a plan is not changed once made)."""
        sources: dict[InstanceRef, list[ChannelSpec]] = {}
        dests: dict[InstanceRef, list[ChannelSpec]] = {}
        for channel in self.channels:
            sources.setdefault(channel.source, []).append(channel)
            dests.setdefault(channel.dest, []).append(channel)
        return sources, dests

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_by_instance", None)  # rebuilt where needed, not shipped to workers
        return state

    def expected_eos(self, instance: InstanceRef) -> int:
        """The end-of-stream markers ``instance`` waits for: one per channel into it, one more for a root's feed."""
        return len(self.channels_into(instance)) + self.placement[instance.pe].is_root

    def inflight_bound(self, instance: InstanceRef) -> int:
        """The most items that can wait in ``instance``'s inbox at once."""
        options = self.options
        feed = self.placement[instance.pe].is_root * options.batch_size
        return options.credits * (feed + sum(options.batch_cap(channel) for channel in self.channels_into(instance)))


def worker_list(workers: Iterable[int]) -> str:
    """The distinct indexes in ``workers`` (or of instances), in order, as short text: runs of three or more as a
    range (``0-2,5,7,8``), so that thousands of workers stay one short label (a drawing, a table)."""
    runs: list[list[int]] = []
    for worker in sorted(set(workers)):
        if runs and worker == runs[-1][-1] + 1:
            runs[-1].append(worker)
        else:
            runs.append([worker])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)) for run in runs)


def make_plan(graph: WorkflowGraph | FlatGraph, options: PlanOptions | None = None) -> ExecutionPlan:
    """Plan a run of ``graph``.

    Parallelism: an explicit ``pe.parallelism`` (for a dispel4py PE:
    ``numprocesses`` once assigned, except on a root, which dispel4py runs
    once) is honoured; roots and PEs with a ``global`` input get one instance; others get ``default_parallelism``
    (one per worker when unset). ``force_single`` gives every PE one instance.
    Instance ``i`` of every PE is placed on worker ``i % workers`` (of the
    ``busy_workers`` when set), so equal-width pipelines stay on one worker
    and never pay a process hop.
    A graph with a ``placer`` (dispel4py's) places the PEs it names itself
    when the mapping shares out worker processes (``default_parallelism``
    unset, not ``force_single``: multi, mpi and ray): it shares out ``processes``
    (else ``workers``), on the workers instances are placed on; where ``processes`` are too few for its rule,
    the PEs it would have placed get one instance per process, not per worker started, so that the instance
    counts (and an ungrouped stateful PE's results) do not depend on the workers the machine's CPUs allow.

    Raises:
        GraphError: the graph is invalid, or a parallelism is not positive.
    """
    options = options or PlanOptions()
    flat = graph if isinstance(graph, FlatGraph) else graph.flatten()
    roots = flat.roots()
    root_set = set(roots)
    single = {*roots, *(edge.dest for edge in flat.edges if edge.grouping.single_instance)}
    placed: dict[str, tuple[int, ...]] = {}
    default = options.default_parallelism or options.placing_workers
    if flat.placer is not None and options.default_parallelism is None and not options.force_single:
        placed = flat.placer(flat, options.processes or options.workers, options.placing_workers)
        default = options.processes or default
    placement: dict[str, PEPlan] = {}
    for pe_id, pe in flat.pes.items():
        if pe_id in placed:
            workers = placed[pe_id]
        else:
            parallelism = _parallelism(pe_id, pe, pe_id in single, pe_id in root_set, options, default)
            workers = tuple(index % options.placing_workers for index in range(parallelism))
        placement[pe_id] = PEPlan(pe_id, len(workers), workers, pe_id in root_set)

    _check_channels(flat, placement)
    routes: dict[str, list[RouteSpec]] = {pe_id: [] for pe_id in flat.pes}
    pairs: set[tuple[str, int, str, int]] = set()  # plain tuples: sorted at C speed
    for edge in flat.edges:
        source, dest = placement[edge.source], placement[edge.dest]
        aligned = _aligned(source, dest)
        targets = tuple(
            edge.grouping.candidates(dest.parallelism, index, aligned) for index in range(source.parallelism)
        )
        routes[edge.source].append(RouteSpec(edge.source_port, edge.dest, edge.dest_port, edge.grouping, targets))
        pairs.update((edge.source, i, edge.dest, target) for i, chosen in enumerate(targets) for target in chosen)

    refs = {pe_id: [InstanceRef(pe_id, index) for index in range(p.parallelism)] for pe_id, p in placement.items()}
    channels = [
        ChannelSpec(
            channel_id,
            refs[src][src_index],
            refs[dst][dst_index],
            placement[src].workers[src_index],
            placement[dst].workers[dst_index],
        )
        for channel_id, (src, src_index, dst, dst_index) in enumerate(sorted(pairs))
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


def _aligned(source: PEPlan, dest: PEPlan) -> bool:
    return source.parallelism == dest.parallelism and source.workers == dest.workers


def _check_channels(flat: FlatGraph, placement: dict[str, PEPlan]) -> None:
    """Raises:
    GraphError: the plan would need more than :data:`MAX_CHANNELS` channels (counted before any is made).
    """
    needs = []
    for edge in flat.edges:
        source, dest = placement[edge.source], placement[edge.dest]
        reached = len(edge.grouping.candidates(dest.parallelism, 0, _aligned(source, dest)))  # by every sender
        needs.append((source.parallelism * reached, edge))
    total = sum(count for count, _ in needs)
    if total > MAX_CHANNELS:
        count, edge = max(needs, key=lambda need: need[0])
        raise GraphError(
            f"the plan needs {total:,} channels, more than the {MAX_CHANNELS:,} a run can be given;"
            f" {edge.source}.{edge.source_port} ({placement[edge.source].parallelism:,} instances) ->"
            f" {edge.dest}.{edge.dest_port} ({placement[edge.dest].parallelism:,} instances, {edge.grouping})"
            f" alone needs {count:,}: give these PEs fewer instances (-n, or the PEs' parallelism)"
        )


def _parallelism(pe_id: str, pe: PE, single: bool, root: bool, options: PlanOptions, default: int) -> int:
    """``single``: a root or a PE with a ``global`` input, which gets one instance unless set otherwise (a ``root``
    of dispel4py's API always: :attr:`~aiod4p.PE._root_runs_once`); ``default``: the instances of any other PE
    whose parallelism is not set."""
    if options.force_single or (root and pe._root_runs_once):
        return 1
    parallelism = pe._parallelism
    if parallelism is not None:
        if not isinstance(parallelism, int) or parallelism < 1:
            raise GraphError(f"PE {pe_id}: parallelism must be a positive integer, not {parallelism!r}")
        return parallelism
    if single:
        return 1
    return default
