"""Windows over streams: count and time windows, tumbling or sliding, keyed or global.

Window PEs are plain PEs (picklable, no background tasks), so they run on
every mapping. Each emits one record per window on ``output``::

    {"key": key, "start": start, "end": end, "count": n, "items": [...]}

with ``"value": aggregate(items)`` instead of ``"items"`` when an
``aggregate`` function is given. ``key`` is ``None`` for a global window;
for a key on one index or dict key, the value itself (``"sensor"`` gives
``"b"``); for several, the tuple of values; for a function, what it returns.

Keyed windows (``key=...``) group their input by the key, so all items of
one key reach the same instance whatever the parallelism; global windows
(no key) get every item on one instance. A key is given as for
:func:`aiod4p.group_by`: an index or dict key, a tuple of them, a
:class:`~aiod4p.GroupBy`, or a function of the item (module-level, so that
multi-process mappings can pickle it).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ._frames import short_repr
from ._groupings import ALL, GLOBAL, GroupBy, group_by
from ._pe import GenericPE
from .errors import GraphError

__all__ = ["MAX_WINDOWS_PER_ITEM", "CountWindow", "TimeWindow"]

KeyLike = GroupBy | int | str | tuple[int | str, ...] | Callable[[Any], Any] | None


def _grouping(key: KeyLike) -> GroupBy | None:
    if key is None or isinstance(key, GroupBy):
        return key
    if isinstance(key, (int, str)):
        return group_by(key)
    if isinstance(key, tuple):
        return group_by(*key)
    if callable(key):
        return group_by(key=key)
    raise ValueError(f"a window key must be an index, a tuple of indices, a GroupBy or a function, not {key!r}")


def _value_getter(spec: int | str | Callable[[Any], Any]) -> Callable[[Any], Any]:
    if callable(spec):
        return spec
    return lambda item: item[spec]


class _WindowPE(GenericPE):
    # Configuration, not state (checkpoints): a subclass adds its own.
    checkpoint_exclude: ClassVar[tuple[str, ...]] = ("key_grouping", "aggregate", "timestamp")
    # State a restore refuses to change (its state was made with it): a subclass adds its own.
    checkpoint_fixed: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        key: KeyLike,
        aggregate: Callable[[list[Any]], Any] | None,
        extra_inputs: tuple[tuple[str, Any], ...],
        name: str | None,
        parallelism: int | None,
    ) -> None:
        self.key_grouping = _grouping(key)
        super().__init__(
            inputs=[("input", self.key_grouping or GLOBAL), *extra_inputs],
            outputs=["output"],
            name=name,
            parallelism=parallelism,
        )
        self.aggregate = aggregate

    def _key(self, item: Any) -> Any:
        grouping = self.key_grouping
        if grouping is None:
            return None
        try:
            key = grouping.key_of(item)
        except Exception as exc:
            shown = short_repr(item)
            raise GraphError(f"window PE {self.label}: the key {grouping} of item {shown} failed: {exc}") from exc
        return key[0] if grouping.key is None and len(grouping.indices) == 1 else key

    def _emit(self, key: Any, start: Any, end: Any, items: list[Any]) -> None:
        record: dict[str, Any] = {"key": key, "start": start, "end": end, "count": len(items)}
        if self.aggregate is None:
            record["items"] = items
        else:
            record["value"] = self.aggregate(items)
        self.write("output", record)


class CountWindow(_WindowPE):
    """Windows of ``size`` items, a new one every ``step`` items (per key).

    ``step=None`` (or ``size``) gives tumbling windows; ``step < size``
    sliding windows that overlap; ``step > size`` hopping windows that skip
    items. ``start``/``end`` are the item positions (per key) the window
    covers, ``end`` excluded. At the end of the stream, windows that have
    started but are not full are emitted too, unless ``partial=False``.

    Raises:
        ValueError: ``size`` or ``step`` is not a whole number of at least 1, or the key is not understood.
    """

    checkpoint_exclude = ("partial",)  # configuration: a restore takes it from the workflow
    # Its windows under way were made with size and step: a restore refuses others.
    checkpoint_fixed: ClassVar[tuple[str, ...]] = ("size", "step")

    def __init__(
        self,
        size: int,
        step: int | None = None,
        *,
        key: KeyLike = None,
        aggregate: Callable[[list[Any]], Any] | None = None,
        partial: bool = True,
        name: str | None = None,
        parallelism: int | None = None,
    ) -> None:
        step = size if step is None else step
        for what, value in (("size", size), ("step", step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CountWindow {what} must be a whole number of items, at least 1, not {value!r}")
        super().__init__(key, aggregate, (), name, parallelism)
        self.size, self.step, self.partial = size, step, partial
        self.state: dict[Any, tuple[deque[Any], list[int]]] = {}
        if self.key_grouping is not None:
            self.keyed_state = "state"  # checkpoints: a restore with another -n moves each key's windows

    def preprocess(self) -> None:
        self.state = {}  # a PE object may run several times

    def process(self, inputs: Mapping[str, Any]) -> None:
        item = inputs["input"]
        key = self._key(item)
        entry = self.state.get(key)
        if entry is None:
            entry = self.state[key] = (deque(maxlen=self.size), [0])
        recent, counter = entry
        recent.append(item)
        self.remember((key, counter[0]))  # provenance: item ``counter[0]`` of ``key``'s stream
        counter[0] += 1
        seen = counter[0]
        if seen >= self.size and (seen - self.size) % self.step == 0:
            self._recall(key, seen - self.size, seen)
            self._emit(key, seen - self.size, seen, list(recent))

    def postprocess(self) -> None:
        if not self.partial:
            return
        for key, (recent, (seen,)) in self.state.items():
            # Windows that started (start < seen) but did not fill (start + size > seen).
            first = max(0, (seen - self.size) // self.step + 1)
            for start in range(first * self.step, seen, self.step):
                self._recall(key, start, seen)
                self._emit(key, start, start + self.size, list(recent)[len(recent) - (seen - start) :])
        self.state.clear()

    def _recall(self, key: Any, start: int, end: int) -> None:
        """Provenance: what is written next derives from items ``start`` to ``end`` (excluded) of ``key``."""
        if self._recorder is not None:  # else a window of n items would cost n keys made for nothing
            self.recall(*((key, position) for position in range(start, end)))


MAX_WINDOWS_PER_ITEM = 100_000
"""The most windows one item may fall in (``size / step``): more is a step given in the wrong unit."""

_WARNED_LATE = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)  # late items counted when a warning is logged


class TimeWindow(_WindowPE):
    """Windows of ``size`` seconds, a new one every ``step`` seconds (per key).

    Window ``k`` covers ``[k * step, k * step + size)`` (aligned to the epoch
    for wall-clock times). An item's time is ``timestamp(item)`` (an index,
    dict key or function giving seconds; event time), or its arrival time
    (``time.time()``, processing time) when ``timestamp`` is ``None``.

    A window is emitted once the stream's clock (the latest time seen by
    this instance) passes its end by ``allowed_lateness`` seconds, and every
    open window at the end of the stream. Connect a
    :class:`~aiod4p.sources.TimerSource` (or any stream) to the ``tick`` input
    to advance the clock to ``time.time()`` while no items arrive, so windows
    close on quiet streams too. An item that arrives when its windows have been
    emitted (an item out of order by more than ``allowed_lateness``, or any
    item once a timestamp far in the future moved the clock there) is late:
    it is dropped, counted in the instance's statistics (``late``, shown by
    ``--stats``), and logged as a warning (the first one, with the clock, and
    then the count at 10, 100, ... late items).

    Raises:
        ValueError: ``size``, ``step`` or ``allowed_lateness`` is not a finite number of seconds (``size`` and
            ``step``: at least a microsecond; ``allowed_lateness``: at least 0), an item would fall in more than
            :data:`MAX_WINDOWS_PER_ITEM` windows, or the key is not understood.
    """

    # Its windows under way were made with size and step, and which were emitted is not saved but follows from clock
    # and allowed_lateness (_emitted): more lateness would reopen windows emitted before the checkpoint and emit
    # them again. A restore refuses others.
    checkpoint_fixed: ClassVar[tuple[str, ...]] = ("size", "step", "allowed_lateness")

    def __init__(
        self,
        size: float,
        step: float | None = None,
        *,
        key: KeyLike = None,
        timestamp: int | str | Callable[[Any], Any] | None = None,
        aggregate: Callable[[list[Any]], Any] | None = None,
        allowed_lateness: float = 0.0,
        name: str | None = None,
        parallelism: int | None = None,
    ) -> None:
        step = size if step is None else step
        options = (("size", size, 1e-6), ("step", step, 1e-6), ("allowed_lateness", allowed_lateness, 0))
        for what, value, least in options:
            if isinstance(value, bool) or not isinstance(value, int | float) or not least <= value < math.inf:
                raise ValueError(
                    f"TimeWindow {what} must be a finite number of seconds, at least {least:g}, not {value!r}"
                )
        if size / step > MAX_WINDOWS_PER_ITEM:
            raise ValueError(
                f"TimeWindow size {size:g} s with step {step:g} s puts every item in {size / step:,.0f} windows"
                f" (at most {MAX_WINDOWS_PER_ITEM:,}): is the step in seconds?"
            )
        super().__init__(key, aggregate, (("tick", ALL),), name, parallelism)
        self.inputs["tick"].required = False
        self.size, self.step, self.allowed_lateness = float(size), float(step), float(allowed_lateness)
        self.timestamp = timestamp
        self.preprocess()

    def preprocess(self) -> None:  # a PE object may run several times: start afresh
        self.clock = -math.inf
        self.late = 0
        self.windows: dict[int, dict[Any, list[Any]]] = {}

    def _time_of(self, item: Any) -> float:
        if self.timestamp is None:
            return time.time()
        try:
            at = float(_value_getter(self.timestamp)(item))
        except Exception as exc:
            raise GraphError(f"window PE {self.label}: no timestamp in item {short_repr(item)}: {exc}") from exc
        if not math.isfinite(at):
            raise GraphError(f"window PE {self.label}: the timestamp of item {short_repr(item)} is {at}")
        return at

    def _emitted(self, k: int) -> bool:
        """Whether window ``k`` is due (emitted once it had items)."""
        return k * self.step + self.size + self.allowed_lateness <= self.clock

    def _first_open(self) -> int | None:
        """The first window not due yet (``None``: none is due)."""
        if self.clock == -math.inf:
            return None
        k = math.floor((self.clock - self.size - self.allowed_lateness) / self.step) + 1
        while self._emitted(k):  # where the division rounded otherwise
            k += 1
        while not self._emitted(k - 1):
            k -= 1
        return k

    def process(self, inputs: Mapping[str, Any]) -> None:
        if "input" in inputs:
            item = inputs["input"]
            at = self._time_of(item)
            first = math.floor((at - self.size) / self.step) + 1
            last = math.floor(at / self.step)
            if first <= last:  # else the item falls between two windows (step > size)
                first_open = self._first_open()
                if first_open is not None and last < first_open:
                    self._late(at)
                else:
                    key = self._key(item)
                    for k in range(first if first_open is None else max(first, first_open), last + 1):
                        self.windows.setdefault(k, {}).setdefault(key, []).append(item)
                        self.remember((k, key))  # provenance: window ``k`` of ``key`` holds this item
        else:
            at = time.time()
        if at > self.clock:
            self.clock = at
            self._close(self._emitted)

    def _late(self, at: float) -> None:
        self.late += 1
        runtime = self._runtime
        if runtime is not None and runtime.stats is not None:
            runtime.stats.late += 1
        if self.late == 1:
            self.log(
                f"an item at {at:g} s is late: the clock is at {self.clock:g} s and its windows were emitted"
                f" (allowed_lateness {self.allowed_lateness:g} s); late items are dropped and counted in the"
                " statistics' late",
                logging.WARNING,
            )
        elif self.late in _WARNED_LATE:
            self.log(f"{self.late:,} late items dropped", logging.WARNING)

    def _close(self, done: Callable[[int], bool]) -> None:
        for k in sorted(self.windows):
            if not done(k):
                break
            start = k * self.step
            for key, items in self.windows.pop(k).items():
                self.recall((k, key))
                self._emit(key, start, start + self.size, items)

    def postprocess(self) -> None:
        self._close(lambda k: True)
        if self.late > 1 and self.late not in _WARNED_LATE:
            self.log(f"{self.late:,} late items dropped in all", logging.WARNING)
