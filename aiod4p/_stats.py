"""Per-instance run statistics, kept by the engine at batch granularity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["InstanceStats"]

CARRIED = (
    "items_in",
    "items_out",
    "batches_in",
    "errors",
    "busy_seconds",
    "blocked_seconds",
    "feed_blocked_seconds",
    "skipped",
    "late",
)
"""The counters that add up over the attempts of a run: a checkpoint saves them, a restore goes on from them."""


@dataclass
class InstanceStats:
    """Counters of one PE instance.

    Attributes:
        pe, instance, worker: which instance, and where it ran.
        items_in: items taken from the inbox (feed elements for roots).
        items_out: items written to any output port (results included).
        batches_in: batches taken from the inbox.
        errors: exceptions raised by the PE (at most 1 under the fail-fast policy).
        busy_seconds: time spent in the PE's own code: not waiting for credit,
            nor in other tasks' turns, nor, for a live source (an ``async def``
            generator ``produce()``, the sources of :mod:`aiod4p.sources`),
            waiting for its next item. A long call adds to it as it goes.
        blocked_seconds: time spent waiting for credit (back-pressure).
        feed_blocked_seconds: for a root, time its input feed waited for the
            PE to accept more (back-pressure reaching the source).
        max_queued_items: the most items that waited in the inbox at once.
        queued_items: the items waiting in the inbox when the instance last
            took a batch (live; 0 once the instance has finished).
        inflight_bound: the most items the inbox can ever hold.
        skipped: bad input lines that the instance's line source (a
            :class:`~aiod4p.sources.SourcePE` such as ``LinesSource`` or
            ``TCPSource``, or a feed such as ``--stdin``'s ``LineStream``: anything
            with a ``skipped`` count) skipped or dead-lettered (``on_bad``).
        late: items a time window (:class:`~aiod4p.windows.TimeWindow`) dropped because their
            windows had been emitted.
        attempt: the attempt of the run this instance runs in: 0 for the first, one more at each
            restart under ``--restarts`` (whose counters begin again at the checkpoint's).
        carried: how much of each :data:`CARRIED` counter is not this attempt's work but the attempts'
            before the checkpoint it was restored from (:meth:`carry`; empty: nothing restored).
        provenance: what the instance recorded for provenance (when on), set
            once it has finished; it travels to the launcher with these
            statistics and is left out of :meth:`to_dict`.
    """

    pe: str
    instance: int
    worker: int = 0
    items_in: int = 0
    items_out: int = 0
    batches_in: int = 0
    errors: int = 0
    busy_seconds: float = 0.0
    blocked_seconds: float = 0.0
    feed_blocked_seconds: float = 0.0
    max_queued_items: int = 0
    inflight_bound: int = 0
    queued_items: int = 0
    skipped: int = 0
    late: int = 0
    attempt: int = 0
    carried: dict[str, float] = field(default_factory=dict)
    provenance: Any = field(default=None, repr=False, compare=False)

    def counters(self) -> dict[str, float]:
        """The :data:`CARRIED` counters by name, as a checkpoint saves them."""
        return {name: getattr(self, name) for name in CARRIED}

    def carry(self, counters: Mapping[str, float]) -> None:
        """Add ``counters`` (saved by :meth:`counters`, of the attempts before a restore) to these, and to
        :attr:`carried`."""
        for name in CARRIED:
            value = counters.get(name, 0)
            setattr(self, name, getattr(self, name) + value)
            self.carried[name] = self.carried.get(name, 0) + value

    def done(self, name: str) -> float:
        """What this attempt did of :data:`CARRIED` counter ``name``: the counter less what was carried in."""
        value: float = getattr(self, name) - self.carried.get(name, 0)
        return value

    def to_dict(self) -> dict[str, Any]:
        """The counters by name: the run's (``attempt``, ``carried`` and ``provenance`` left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _UNREPORTED}


_UNREPORTED = ("attempt", "carried", "provenance")
