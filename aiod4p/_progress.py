"""A live progress display of a running workflow, drawn with rich.

It samples the run's statistics (:meth:`WorkflowRun.live_stats`) every
``interval`` seconds from a thread of its own and redraws:
items in and out per PE (the whole run's, as the statistics count them), each
PE's throughput and busy share over the last interval (the work done in it,
:class:`~aiod4p._stats_report.WorkTally`: not what a restored run's counters
carried in from its checkpoint; the busiest PE is named in the title), and
the queue waiting at the end of each edge against its bound (where
back-pressure builds). The engine keeps its statistics anyway, so the
display costs one render per interval (a few milliseconds) and nothing per
item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from ._plan import ExecutionPlan
from ._stats import InstanceStats
from ._stats_report import Work, WorkTally, summarise
from ._threads import helper_work, start_helper

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from ._api import WorkflowRun

__all__ = ["ProgressDisplay", "progress", "progress_wanted"]

logger = logging.getLogger("aiod4p.progress")

DEFAULT_INTERVAL = 0.5


def progress_wanted(quiet: bool, results_to_stdout: bool) -> bool:
    """Whether ``aiod4p run`` shows progress: stdout is a terminal, not ``--quiet``, results not on stdout."""
    return not quiet and not results_to_stdout and sys.stdout.isatty()


class ProgressDisplay:
    """Renders a run's progress from successive samples of its statistics.

    Args:
        plan: the run's plan (edges, instances).
        source: returns the latest per-instance statistics.
        clock: the time source for throughput (seconds).
        title: shown before the figures.
    """

    def __init__(
        self,
        plan: ExecutionPlan,
        source: Callable[[], list[InstanceStats]],
        *,
        clock: Callable[[], float] = time.perf_counter,
        title: str = "aiod4p",
    ) -> None:
        self.plan = plan
        self.source = source
        self.clock = clock
        self.title = title
        self._started = clock()
        self._work = WorkTally(plan)
        self._previous: tuple[float, dict[str, Work]] | None = None

    def render(self) -> RenderableType:
        """Sample the statistics and return the display (a rich renderable)."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        now = self.clock()
        stats = self.source()
        summaries = summarise(stats, self.plan)
        work = self._work.observe(stats)
        since, before = self._previous or (self._started, {})
        span = max(now - since, 1e-9)
        self._previous = (now, work)

        pes = Table(header_style="bold", box=None, pad_edge=False)
        pes.add_column("PE")
        columns = ("×", "items in", "items out", "in/s", "busy", "blocked s", "errors")
        for name in columns:
            pes.add_column(name, justify="right")
        busiest: tuple[float, str] | None = None
        for pe_id, summary in summaries.items():
            earlier, later = before.get(pe_id, Work()), work[pe_id]
            rate = (later.items_in - earlier.items_in) / span
            busy = (later.busy_seconds - earlier.busy_seconds) / (span * max(summary.instances, 1))
            busy = min(max(busy, 0.0), 1.0)
            if busiest is None or busy > busiest[0]:
                busiest = (busy, pe_id)
            pes.add_row(
                pe_id,
                str(summary.instances),
                f"{summary.items_in:,}",
                f"{summary.items_out:,}",
                f"{rate:,.0f}",
                f"{busy:.0%}",
                f"{summary.blocked_seconds:.2f}",
                Text(str(summary.errors), style="bold red" if summary.errors else ""),
            )

        edges = Table(header_style="bold", box=None, pad_edge=False)
        for name in ("edge", "grouping", "queued at destination", ""):
            edges.add_column(name)
        for edge in self.plan.graph.edges:
            dest = summaries.get(edge.dest)
            queued = dest.queued_items if dest else 0
            bound = max(dest.inflight_bound if dest else 0, 1)
            edges.add_row(
                f"{edge.source}.{edge.source_port} → {edge.dest}.{edge.dest_port}",
                str(edge.grouping),
                ProgressBar(total=bound, completed=min(queued, bound), width=20),
                f"{queued:,}/{bound:,}",
            )

        elapsed = now - self._started
        headline = Text.assemble((self.title, "bold"), f"  {elapsed:.1f} s")
        if busiest is not None and busiest[0] > 0:
            headline.append(f"  busiest: {busiest[1]} ({busiest[0]:.0%} busy)")
        elif not summaries:
            headline.append("  waiting for the first statistics…")
        return Group(headline, pes, edges)


def _streams_of_their_own() -> None:
    """In a forked child (a multi worker): stdout and stderr are the streams themselves, not the parent's live
    display's proxies, through which the child's copy of the display would redraw its last frame with each line."""
    for name in ("stdout", "stderr"):
        proxied = getattr(getattr(sys, name), "rich_proxied_file", None)
        if proxied is not None:
            setattr(sys, name, proxied)


os.register_at_fork(after_in_child=_streams_of_their_own)


@contextlib.asynccontextmanager
async def progress(
    workflow: WorkflowRun, *, console: Console | None = None, interval: float = DEFAULT_INTERVAL
) -> AsyncIterator[ProgressDisplay]:
    """Show ``workflow``'s progress live while the block runs, and erase it at the end.

    The first frame is drawn after ``interval`` seconds and then every
    ``interval`` seconds, from a thread: a PE that holds the event loop
    (a blocking call not marked ``threaded``) does not freeze the display. A
    run shorter than ``interval`` shows nothing and pays next to nothing. If
    drawing a frame fails, the display stops with a warning on the
    ``aiod4p.progress`` logger and the run goes on.
    """
    from rich.console import Console
    from rich.live import Live

    title = f"aiod4p · {workflow.mapping.name} mapping"
    display = ProgressDisplay(workflow.plan, workflow.live_stats, title=title)
    live = Live(console=console or Console(), auto_refresh=False, transient=True)

    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(interval):
            with helper_work():
                try:
                    live.update(display.render(), refresh=True)
                except Exception as exc:  # a display that fails must not fail the run
                    logger.warning("progress display stopped: %s: %s", type(exc).__name__, exc)
                    return

    live.start()
    drawer = start_helper(refresh, "aiod4p progress")
    try:
        yield display
    finally:
        stop.set()
        await asyncio.to_thread(drawer.join)  # at most the frame being drawn
        live.update("")  # stopping erases the last frame without drawing another
        with contextlib.suppress(OSError):  # the terminal is gone: nothing left to erase
            live.stop()
