"""The simple mapping: one instance per PE, deterministic order; for debugging."""

from __future__ import annotations

from .._plan import PlanOptions
from .asyncio import AsyncMapping

__all__ = ["SimpleMapping"]


class SimpleMapping(AsyncMapping):
    """One instance of every PE on the standard event loop.

    Instances take turns in a fixed order, so a run without real I/O (or
    ``threaded`` PEs, whose calls end when their threads do) gives its results
    in the same order every time. ``-n`` is ignored.
    """

    name = "simple"
    uses_uvloop = False
    takes_workers = False
    fixed_order = True

    def plan_options(self, workers: int | None, batch_size: int, credits: int) -> PlanOptions:
        return PlanOptions(workers=1, force_single=True, batch_size=batch_size, credits=credits)
