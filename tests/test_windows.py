"""Count and time windows, tumbling and sliding, keyed and global, on every mapping."""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import workflows as wf
from conftest import MappingCase

import aiod4p
from aiod4p import PEError, ProducerPE, WorkflowGraph
from aiod4p.sources import LiveFeed, TimerSource
from aiod4p.windows import CountWindow, TimeWindow


class Items(ProducerPE):
    """Emits the given items (a generator source)."""

    def __init__(self, items: list[Any]) -> None:
        super().__init__()
        self.items = items

    def produce(self) -> Any:
        yield from self.items


def windowed(items: list[Any], window: Any) -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Items(items), "output", window, "input")
    return graph


def spans(results: aiod4p.Results) -> list[tuple[Any, Any, Any, list[Any]]]:
    return sorted((r["key"], r["start"], r["end"], r["items"]) for r in results.data())


def run_simple(graph: WorkflowGraph) -> aiod4p.Results:
    return aiod4p.run(graph, mapping="simple")


def test_count_tumbling_global() -> None:
    results = run_simple(windowed(list(range(7)), CountWindow(3)))
    assert spans(results) == [(None, 0, 3, [0, 1, 2]), (None, 3, 6, [3, 4, 5]), (None, 6, 9, [6])]


def test_count_tumbling_without_partial() -> None:
    results = run_simple(windowed(list(range(7)), CountWindow(3, partial=False)))
    assert [r["items"] for r in results.data()] == [[0, 1, 2], [3, 4, 5]]


def test_count_sliding_global() -> None:
    results = run_simple(windowed(list(range(6)), CountWindow(4, 2)))
    assert spans(results) == [(None, 0, 4, [0, 1, 2, 3]), (None, 2, 6, [2, 3, 4, 5]), (None, 4, 8, [4, 5])]


def test_count_hopping_skips_items() -> None:
    results = run_simple(windowed(list(range(7)), CountWindow(2, 3)))
    assert spans(results) == [(None, 0, 2, [0, 1]), (None, 3, 5, [3, 4]), (None, 6, 8, [6])]


def test_count_keyed() -> None:
    items = [(i % 3, i) for i in range(12)]
    results = run_simple(windowed(items, CountWindow(2, key=0, aggregate=wf.sum_of_values)))
    by_key: dict[int, list[int]] = {}
    for record in sorted(results.data(), key=lambda r: (r["key"], r["start"])):
        by_key.setdefault(record["key"], []).append(record["value"])
    assert by_key == {0: [0 + 3, 6 + 9], 1: [1 + 4, 7 + 10], 2: [2 + 5, 8 + 11]}


def test_count_keyed_by_function_and_dict_key() -> None:
    items = [{"sensor": "a" if i % 2 else "b", "v": i} for i in range(8)]
    by_name = run_simple(windowed(items, CountWindow(4, key="sensor", aggregate=len)))
    by_function = run_simple(windowed(items, CountWindow(4, key=wf.sensor_of, aggregate=len)))
    assert sorted((r["key"], r["value"]) for r in by_name.data()) == [("a", 4), ("b", 4)]  # the value itself
    assert sorted((r["key"], r["value"]) for r in by_function.data()) == [("a", 4), ("b", 4)]


def test_time_tumbling_by_event_time() -> None:
    items = [{"t": t, "v": i} for i, t in enumerate([0.0, 0.5, 1.2, 1.9, 2.0, 3.5])]
    results = run_simple(windowed(items, TimeWindow(1.0, timestamp="t", aggregate=len)))
    assert sorted((r["start"], r["end"], r["value"]) for r in results.data()) == [
        (0.0, 1.0, 2),
        (1.0, 2.0, 2),
        (2.0, 3.0, 1),
        (3.0, 4.0, 1),
    ]


def test_time_sliding_keyed() -> None:
    items = [("a", 0.5), ("b", 0.7), ("a", 1.5), ("a", 2.5)]
    results = run_simple(windowed(items, TimeWindow(2.0, 1.0, key=0, timestamp=1, aggregate=len)))
    assert sorted((r["key"], r["start"], r["value"]) for r in results.data()) == [
        ("a", -1.0, 1),
        ("a", 0.0, 2),
        ("a", 1.0, 2),
        ("a", 2.0, 1),
        ("b", -1.0, 1),
        ("b", 0.0, 1),
    ]


def many_windows() -> WorkflowGraph:
    """One stream into keyed and global, count and time, tumbling and sliding windows (3 instances when keyed)."""
    graph = WorkflowGraph()
    source = Items([{"sensor": "abc"[i % 3], "t": i * 0.3, "v": i} for i in range(60)])
    windows = [
        CountWindow(4, name="count_global"),
        CountWindow(5, 2, name="count_sliding_global"),
        CountWindow(3, key="sensor", name="count_keyed", parallelism=3),
        CountWindow(4, 3, key=wf.sensor_of, name="count_sliding_keyed", parallelism=3),
        TimeWindow(1.0, timestamp="t", name="time_global"),
        TimeWindow(2.0, 0.5, key="sensor", timestamp="t", aggregate=len, name="time_sliding_keyed", parallelism=3),
    ]
    for window in windows:
        graph.connect(source, "output", window, "input")
    return graph


def canonical(results: aiod4p.Results) -> list[Any]:
    return sorted((r.pe, repr(r.data)) for r in results)


def test_windows_agree_on_every_mapping(mapping: MappingCase) -> None:
    graph = many_windows()
    expected = canonical(run_simple(graph))
    assert len(expected) > 60
    assert canonical(mapping.run(graph)) == expected


def test_late_items_are_counted_and_dropped() -> None:
    window = TimeWindow(1.0, timestamp=0)
    run = aiod4p.start(windowed([(0.1,), (5.0,), (0.2,), (5.5,)], window), mapping="simple")
    results = asyncio.run(run.results())
    assert [r["items"] for r in results.data()] == [[(0.1,)], [(5.0,), (5.5,)]]
    assert run.instances(window)[0].late == 1
    assert window.late == 0  # the graph's own PE is never changed by a run


def test_late_items_are_in_the_statistics_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    # An operator could not see them: `late` was an attribute of the run's copy of the PE only.
    window = TimeWindow(1.0, timestamp=0)
    items = [(0.1,), (5.0,), *((0.2 + i / 100,) for i in range(12)), (5.5,)]
    run = aiod4p.start(windowed(items, window), mapping="simple")
    with caplog.at_level(logging.WARNING, logger="aiod4p"):
        asyncio.run(run.results())
    assert [entry.late for entry in run.stats if entry.pe == window.id] == [12]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        "an item at 0.2 s is late: the clock is at 5 s and its windows were emitted (allowed_lateness 0 s); late"
        " items are dropped and counted in the statistics' late",
        "10 late items dropped",
        "12 late items dropped in all",
    ]


def test_allowed_lateness_keeps_a_window_open_for_items_out_of_order() -> None:
    items = [(0.1,), (1.2,), (0.2,), (2.6,), (0.3,)]
    results = run_simple(windowed(items, TimeWindow(1.0, timestamp=0, allowed_lateness=0.5)))
    # 0.2 arrived while the clock (1.2) was within 0.5 s of its window's end; 0.3 after 2.6: late
    assert [r["items"] for r in results.data()] == [[(0.1,), (0.2,)], [(1.2,)], [(2.6,)]]


def test_a_timestamp_far_in_the_future_makes_the_items_after_it_late() -> None:
    # One reading stamped in milliseconds moved the clock years ahead: the windows of every later item stayed
    # open until the end of the stream (a live one: never), holding every item in memory.
    items = [(0.1,), (1.5,), (2_500.0,), (2.1,), (3.2,)]
    window = TimeWindow(1.0, timestamp=0)
    run = aiod4p.start(windowed(items, window), mapping="simple")
    results = asyncio.run(run.results())
    assert [r["items"] for r in results.data()] == [[(0.1,)], [(1.5,)], [(2_500.0,)]]
    assert run.instances(window)[0].late == 2 and run.instances(window)[0].windows == {}


@pytest.mark.parametrize("at", [math.nan, math.inf])
def test_a_timestamp_that_is_no_finite_number_fails_naming_the_item(at: float) -> None:
    with pytest.raises(PEError, match=rf"the timestamp of item \({at},\) is {at}"):
        run_simple(windowed([(0.1,), (at,)], TimeWindow(1.0, timestamp=0)))


def test_a_window_closes_as_soon_as_the_clock_passes_it() -> None:
    items = [(0.1,), (0.2,), (1.5,)]
    window = TimeWindow(1.0, timestamp=0)
    seen: list[Any] = []

    async def main() -> None:
        feed = LiveFeed()
        graph = WorkflowGraph()
        graph.add(window)
        run = aiod4p.start(graph, {window: feed})
        async with asyncio.timeout(20), run:
            for item in items:
                await run.send(window.id, {"input": item})  # a window has two inputs: name the port
            seen.append((await run.__anext__()).data["items"])  # emitted before the stream ends
            feed.close()
            seen.extend([r.data["items"] async for r in run])

    asyncio.run(main())
    assert seen == [[(0.1,), (0.2,)], [(1.5,)]]


def test_ticks_close_processing_time_windows_on_a_quiet_stream() -> None:
    async def main() -> list[Any]:
        feed = LiveFeed()
        graph = WorkflowGraph()
        window = TimeWindow(0.05, aggregate=sum)
        graph.connect(entry := wf.Double(), "output", window, "input")
        graph.connect(TimerSource(0.01), "output", window, "tick")
        run = aiod4p.start(graph, {entry: feed})
        async with asyncio.timeout(20), run:
            await run.send(entry.id, 1)
            await run.send(entry.id, 2)
            first = await run.__anext__()  # only ticks arrive after the items: they close the window
            run.drain()
            rest = [r async for r in run]
        return [first.data["value"], *(r.data["value"] for r in rest)]

    assert asyncio.run(main())[0] == 6


def test_windows_are_picklable() -> None:
    for window in (CountWindow(3, key=0), TimeWindow(1.0, key=wf.sensor_of, timestamp="t", aggregate=len)):
        clone = pickle.loads(pickle.dumps(window))
        assert clone.inputs["input"].grouping == window.inputs["input"].grouping


def test_key_and_timestamp_failures_name_the_pe() -> None:
    with pytest.raises(PEError, match=r"CountWindow.*key"):
        aiod4p.run(windowed([1, 2], CountWindow(2, key=0)), mapping="simple")
    with pytest.raises(PEError, match=r"TimeWindow.*no timestamp"):
        aiod4p.run(windowed([{"v": 1}], TimeWindow(1.0, timestamp="t")), mapping="simple")


def test_a_timestamp_failure_names_a_large_item_short() -> None:
    # A trace of 1,000,000 samples was written whole into the one-line error.
    trace = {"station": "ST01", "samples": [0.5] * 1_000_000}
    with pytest.raises(PEError, match="no timestamp") as caught:
        aiod4p.run(windowed([trace], TimeWindow(1.0, timestamp="t")), mapping="simple")
    assert "[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, ...]" in str(caught.value) and len(str(caught.value)) < 300


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CountWindow(0), "CountWindow size must be a whole number of items, at least 1, not 0"),
        (lambda: CountWindow(2.5), "CountWindow size must be a whole number of items, at least 1, not 2.5"),
        (lambda: CountWindow(True), "CountWindow size must be a whole number of items, at least 1, not True"),
        (lambda: CountWindow(3, math.inf), "CountWindow step must be a whole number of items, at least 1, not inf"),
        (lambda: TimeWindow(1.0, 0), "TimeWindow step must be a finite number of seconds, at least 1e-06, not 0"),
        (lambda: TimeWindow(math.inf), "TimeWindow size must be a finite number of seconds, at least 1e-06, not inf"),
        (lambda: TimeWindow(1e-300), "TimeWindow size must be a finite number of seconds, at least 1e-06"),
        (lambda: TimeWindow(5, math.inf), "TimeWindow step must be a finite number of seconds, at least 1e-06"),
        (lambda: TimeWindow(5, allowed_lateness=-1), "TimeWindow allowed_lateness must be a finite number of seconds"),
        # the step typed in microseconds: every item in ten million windows held the loop for minutes
        (lambda: TimeWindow(10, 1e-6), r"puts every item in 10,000,000 windows \(at most 100,000\): is the step in"),
    ],
)
def test_invalid_window_options_are_refused(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_invalid_window_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="window key"):
        CountWindow(2, key=1.5)  # type: ignore[arg-type]
