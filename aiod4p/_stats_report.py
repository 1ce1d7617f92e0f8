"""Run statistics for people and programs: the ``--stats`` table and the ``--stats-json`` file.

Both work from a list of :class:`InstanceStats` (one per PE instance, from any
worker) and aggregate it per PE, so on multi-worker mappings the parent's
report covers every worker.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from ._plan import ExecutionPlan, worker_list
from ._stats import InstanceStats
from ._threads import helper_work, start_helper
from .errors import writing

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ._api import WorkflowRun

__all__ = [
    "PESummary",
    "StatsSampler",
    "Work",
    "WorkTally",
    "report_stats",
    "stats_document",
    "stats_table",
    "summarise",
    "write_stats_json",
]

SAMPLE_INTERVAL = 0.25  # seconds between the samples --stats-json keeps for `aiod4p stats plot`
MAX_SAMPLES = 2048
"""The samples a :class:`StatsSampler` keeps at most: past them, every other one goes and the interval doubles."""


@dataclass
class PESummary:
    """The statistics of every instance of one PE, added up: each counter of
    :class:`InstanceStats` (but which instance, and where), summed, except
    ``max_queued_items``, the largest of any instance."""

    pe: str
    instances: int = 0
    items_in: int = 0
    items_out: int = 0
    batches_in: int = 0
    errors: int = 0
    busy_seconds: float = 0.0
    blocked_seconds: float = 0.0
    feed_blocked_seconds: float = 0.0
    max_queued_items: int = 0
    queued_items: int = 0
    inflight_bound: int = 0
    skipped: int = 0
    late: int = 0

    def add(self, stats: InstanceStats) -> None:
        """Count ``stats``, one more instance of this PE."""
        self.instances += 1
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(stats, name))
        self.max_queued_items = max(self.max_queued_items, stats.max_queued_items)

    def to_dict(self) -> dict[str, Any]:
        """The counters by name (``pe`` left out)."""
        return {field.name: getattr(self, field.name) for field in fields(self) if field.name != "pe"}


_SUMMED = [field.name for field in fields(PESummary) if field.name not in ("pe", "instances", "max_queued_items")]


def summarise(stats: Iterable[InstanceStats], plan: ExecutionPlan | None = None) -> dict[str, PESummary]:
    """Per-PE sums of ``stats``, in the plan's topological order when a plan is given."""
    ordered = sorted(stats, key=_order_key(plan))
    summaries: dict[str, PESummary] = {}
    for entry in ordered:
        summaries.setdefault(entry.pe, PESummary(entry.pe)).add(entry)
    return summaries


class Work(NamedTuple):
    """What a PE's instances did in a run: the figures its samples and rates come from."""

    items_in: int = 0
    items_out: int = 0
    busy_seconds: float = 0.0

    def plus(self, other: Work) -> Work:
        """Both works added up."""
        return Work(
            self.items_in + other.items_in, self.items_out + other.items_out, self.busy_seconds + other.busy_seconds
        )


class WorkTally:
    """The work a run's instances did since it started, per PE, from successive looks at their statistics.

    A restored instance's counters start from its checkpoint's (:attr:`InstanceStats.carried`), and under
    ``--restarts`` go back to a checkpoint's at each restart (:attr:`InstanceStats.attempt`): its counters say
    what the whole run did, not when. The tally counts what each attempt of this run did (the counters less
    what was carried in), those of the attempts that ended as last seen, so it only grows: work redone after
    a restart counts again (it was done again), and work an attempt did after its last report, lost with it,
    does not. A report of an attempt older than the last seen of that instance is stale and ignored.
    """

    def __init__(self, plan: ExecutionPlan | None = None) -> None:
        self._order = _pe_order(plan)
        self._ended: dict[tuple[str, int], Work] = {}  # per instance: what its attempts that ended did
        self._latest: dict[tuple[str, int], tuple[int, Work]] = {}  # per instance: its attempt and what it did

    def observe(self, stats: Iterable[InstanceStats]) -> dict[str, Work]:
        """Take in the latest ``stats``; return each PE's work so far, in the plan's topological order."""
        for entry in stats:
            key = (entry.pe, entry.instance)
            seen = self._latest.get(key)
            if seen is not None and entry.attempt != seen[0]:
                if entry.attempt < seen[0]:
                    continue
                self._ended[key] = self._ended.get(key, Work()).plus(seen[1])
            done = Work(int(entry.done("items_in")), int(entry.done("items_out")), entry.done("busy_seconds"))
            self._latest[key] = (entry.attempt, done)
        work: dict[str, Work] = {}
        for key, (_, done) in self._latest.items():
            work[key[0]] = work.get(key[0], Work()).plus(self._ended.get(key, Work()).plus(done))
        return {pe: work[pe] for pe in sorted(work, key=self._order)}


def _pe_order(plan: ExecutionPlan | None) -> Callable[[str], tuple[int, str]]:
    """The sort key of PE ids in ``plan``'s topological order (those it has not last, by id)."""
    rank = {pe_id: index for index, pe_id in enumerate(plan.graph.topological_order())} if plan else {}
    return lambda pe: (rank.get(pe, len(rank)), pe)


def _order_key(plan: ExecutionPlan | None) -> Any:
    order = _pe_order(plan)
    return lambda entry: (*order(entry.pe), entry.instance)


def stats_table(stats: list[InstanceStats], plan: ExecutionPlan | None = None, *, elapsed: float = 0.0) -> Table:
    """A rich table: one row per PE (sums), then one per instance for PEs with several."""
    from rich.table import Table

    title = "Statistics per PE" + (f" ({elapsed:.2f} s)" if elapsed else "")
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("PE", no_wrap=True)
    for name in ("instance", "worker"):
        table.add_column(name)
    # columns only for runs whose sources skipped bad lines, or whose windows dropped late items
    optional = [name for name in ("skipped", "late") if any(getattr(entry, name) for entry in stats)]
    for name in ("items in", "items out", "errors", "busy s", "blocked s", "max queued", *optional):
        table.add_column(name, justify="right")
    by_pe: dict[str, list[InstanceStats]] = {}
    for entry in sorted(stats, key=_order_key(plan)):
        by_pe.setdefault(entry.pe, []).append(entry)
    for pe, entries in by_pe.items():
        total = PESummary(pe)
        for entry in entries:
            total.add(entry)
        workers = worker_list(entry.worker for entry in entries)
        several = len(entries) > 1
        table.add_row(
            pe,
            f"all {len(entries)}" if several else str(entries[0].instance),
            workers,
            *_cells(total, optional),
            style="bold" if several else None,
        )
        if several:
            for entry in entries:
                table.add_row("", str(entry.instance), str(entry.worker), *_cells(entry, optional), style="dim")
    if not by_pe:
        table.caption = "no statistics were reported"
    return table


def _cells(entry: InstanceStats | PESummary, optional: list[str]) -> list[str]:
    return [
        f"{entry.items_in:,}",
        f"{entry.items_out:,}",
        f"{entry.errors:,}",
        f"{entry.busy_seconds:.3f}",
        f"{entry.blocked_seconds:.3f}",
        f"{entry.max_queued_items:,}",
        *(f"{getattr(entry, name):,}" for name in optional),
    ]


def stats_document(
    stats: list[InstanceStats],
    plan: ExecutionPlan | None = None,
    *,
    mapping: str | None = None,
    elapsed: float = 0.0,
    finished: bool = True,
    samples: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The JSON document ``--stats-json`` writes.

    Keys: ``mapping``, ``workers``, ``elapsed_seconds``, ``finished`` (false
    when the run failed or was aborted: the figures are then the last ones
    reported), ``pes`` (per-PE sums, by PE id), ``instances`` (one entry
    per instance: every :class:`InstanceStats` field) and ``samples`` (see
    :class:`StatsSampler`; empty when not sampled).
    """
    return {
        "samples": samples or [],
        "mapping": mapping,
        "workers": plan.workers if plan else None,
        "elapsed_seconds": round(elapsed, 6),
        "finished": finished,
        "pes": {pe: summary.to_dict() for pe, summary in summarise(stats, plan).items()},
        "instances": [entry.to_dict() for entry in sorted(stats, key=_order_key(plan))],
    }


def write_stats_json(path: str | Path, document: dict[str, Any], stdout: TextIO | None = None) -> None:
    """Write ``document`` as indented JSON to ``path`` (``-`` for ``stdout``, default ``sys.stdout``).

    Raises:
        Aiod4pError: the file cannot be written (the message names it).
    """
    text = json.dumps(document, indent=2) + "\n"
    if str(path) == "-":
        out = stdout or sys.stdout
        with writing("statistics", "stdout"):
            out.write(text)
            out.flush()
        return
    with writing("statistics", str(path)):
        Path(path).write_text(text, encoding="utf-8")


class StatsSampler:
    """Samples a running workflow's per-PE counters every ``interval`` seconds (an async context manager).

    Each sample is ``{"t": seconds since the start, "pes": {pe: [items_in,
    items_out, busy_seconds]}}``: the work done since the run started
    (:class:`WorkTally`; what a restored run's counters carried in from its
    checkpoint is not), cumulative, the last taken when the block exits; at
    most :data:`MAX_SAMPLES` are kept (a long run's are thinned to every other
    one and the interval doubled, the last kept); ``aiod4p stats plot`` draws
    rates from them. The samples
    are taken by a thread, so a PE that holds the event loop for long (CPU-bound
    work on the simple and async mappings) does not leave gaps. Costs one
    aggregation of the statistics per interval, nothing per item. Worker
    processes publish their statistics periodically, so their samples are
    as fresh as those reports.
    """

    def __init__(self, workflow: WorkflowRun, interval: float = SAMPLE_INTERVAL) -> None:
        self.workflow = workflow
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._work = WorkTally(workflow.plan)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        try:
            pes = self._work.observe(self.workflow.live_stats())
        except RuntimeError:  # the statistics changed while being read: the next sample will do
            return
        self.samples.append(
            {
                "t": round(self.workflow.elapsed, 4),
                "pes": {pe: [w.items_in, w.items_out, round(w.busy_seconds, 6)] for pe, w in pes.items()},
            }
        )
        if len(self.samples) >= MAX_SAMPLES:  # a run that never ends: constant memory, the whole run still covered
            del self.samples[-2::-2]
            self.interval *= 2

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with helper_work():
                self.sample()

    async def __aenter__(self) -> StatsSampler:
        self._thread = start_helper(self._loop, "aiod4p stats sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def report_stats(
    workflow: WorkflowRun,
    *,
    table: bool,
    json_path: str | None,
    console: Console | None = None,
    samples: list[dict[str, Any]] | None = None,
    stdout: TextIO | None = None,
) -> None:
    """Print the ``--stats`` table (to stderr unless ``console`` is given) and/or write ``--stats-json``
    (``-``: to ``stdout``, default ``sys.stdout``).

    Uses the final statistics when the run finished, else the last published.

    Raises:
        Aiod4pError: the JSON file cannot be written.
    """
    if not table and json_path is None:
        return
    stats = workflow.live_stats()
    if json_path is not None:
        document = stats_document(
            stats,
            workflow.plan,
            mapping=workflow.mapping.name,
            elapsed=workflow.elapsed,
            finished=bool(workflow.stats),
            samples=samples,
        )
        write_stats_json(json_path, document, stdout)
    if table:
        from rich.console import Console

        if console is None:  # a file or pipe gets the whole table, however wide
            console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
        console.print(stats_table(stats, workflow.plan, elapsed=workflow.elapsed))
