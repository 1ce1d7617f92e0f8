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

import math
import reprlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ._groupings import ALL, GLOBAL, GroupBy, group_by
from ._pe import GenericPE
from .errors import GraphError

__all__ = ["CountWindow", "TimeWindow"]

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
    checkpoint_exclude = ("key_grouping", "aggregate", "timestamp")  # configuration, not state (checkpoints)

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
            raise GraphError(f"window PE {self.label}: the key {grouping} of item {item!r} failed: {exc}") from exc
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
        ValueError: ``size`` or ``step`` is not positive, or the key is not understood.
    """

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
        if size < 1 or step < 1:
            raise ValueError(f"CountWindow size and step must be at least 1, not {size} and {step}")
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
        counter[0] += 1
        seen = counter[0]
        if seen >= self.size and (seen - self.size) % self.step == 0:
            self._emit(key, seen - self.size, seen, list(recent))

    def postprocess(self) -> None:
        if not self.partial:
            return
        for key, (recent, (seen,)) in self.state.items():
            # Windows that started (start < seen) but did not fill (start + size > seen).
            first = max(0, (seen - self.size) // self.step + 1)
            for start in range(first * self.step, seen, self.step):
                self._emit(key, start, start + self.size, list(recent)[len(recent) - (seen - start) :])
        self.state.clear()


class TimeWindow(_WindowPE):
    """Windows of ``size`` seconds, a new one every ``step`` seconds (per key).

    Window ``k`` covers ``[k * step, k * step + size)`` (aligned to the epoch
    for wall-clock times). An item's time is ``timestamp(item)`` (an index,
    dict key or function giving seconds; event time), or its arrival time
    (``time.time()``, processing time) when ``timestamp`` is ``None``.

    A window is emitted once the stream's clock (the latest time seen by
    this instance) passes its end, and every open window at the end of the
    stream. Connect a :class:`~aiod4p.sources.TimerSource` (or any stream)
    to the ``tick`` input to advance the clock to ``time.time()`` while no
    items arrive, so windows close on quiet streams too. Items older than an
    already emitted window are counted in ``late`` and dropped.

    Raises:
        ValueError: ``size`` or ``step`` is not positive, or the key is not understood.
    """

    def __init__(
        self,
        size: float,
        step: float | None = None,
        *,
        key: KeyLike = None,
        timestamp: int | str | Callable[[Any], Any] | None = None,
        aggregate: Callable[[list[Any]], Any] | None = None,
        name: str | None = None,
        parallelism: int | None = None,
    ) -> None:
        step = size if step is None else step
        if not size > 0 or not step > 0:
            raise ValueError(f"TimeWindow size and step must be positive, not {size} and {step}")
        super().__init__(key, aggregate, (("tick", ALL),), name, parallelism)
        self.inputs["tick"].required = False
        self.size, self.step = float(size), float(step)
        self.timestamp = timestamp
        self.preprocess()

    def preprocess(self) -> None:  # a PE object may run several times: start afresh
        self.clock = -math.inf
        self.late = 0
        self.closed_before: int | None = None  # every window k below this was emitted
        self.windows: dict[int, dict[Any, list[Any]]] = {}

    def _time_of(self, item: Any) -> float:
        if self.timestamp is None:
            return time.time()
        try:
            return float(_value_getter(self.timestamp)(item))
        except Exception as exc:
            raise GraphError(f"window PE {self.label}: no timestamp in item {reprlib.repr(item)}: {exc}") from exc

    def process(self, inputs: Mapping[str, Any]) -> None:
        if "input" in inputs:
            item = inputs["input"]
            at = self._time_of(item)
            first = math.floor((at - self.size) / self.step) + 1
            last = math.floor(at / self.step)
            if self.closed_before is not None and last < self.closed_before:
                self.late += 1
            else:
                key = self._key(item)
                if self.closed_before is not None:
                    first = max(first, self.closed_before)
                for k in range(first, last + 1):
                    self.windows.setdefault(k, {}).setdefault(key, []).append(item)
        else:
            at = time.time()
        if at > self.clock:
            self.clock = at
            self._close(lambda k: k * self.step + self.size <= at)

    def _close(self, done: Callable[[int], bool]) -> None:
        for k in sorted(self.windows):
            if not done(k):
                break
            start = k * self.step
            for key, items in self.windows.pop(k).items():
                self._emit(key, start, start + self.size, items)
            self.closed_before = k + 1

    def postprocess(self) -> None:
        self._close(lambda k: True)
