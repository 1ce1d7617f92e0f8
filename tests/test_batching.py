"""Batches adapt to the items: a slow stage gets them one at a time, large items travel a few at a time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from workflows import Count, Discard, Double

import aiod4p
from aiod4p import GenericPE, InstanceStats, IterativePE, PlanOptions, ProducerPE, WorkflowGraph, group_by, stable_hash
from aiod4p._engine import Worker
from aiod4p._inputs import resolve_inputs
from aiod4p._plan import make_plan


class Burst(ProducerPE):
    """Yields ``count`` items of ``size`` bytes from one call."""

    def __init__(self, count: int, size: int = 0) -> None:
        super().__init__()
        self.count, self.size = count, size

    def produce(self) -> Iterator[Any]:
        for index in range(self.count):
            yield bytes(self.size) if self.size else index


class Slow(IterativePE):
    """Takes at least 5 ms per item."""

    def __init__(self) -> None:
        super().__init__(parallelism=2)

    def process_item(self, item: Any) -> Any:
        threading.Event().wait(0.005)  # ok-sleep: the item's cost, not synchronisation
        return item


class Keep(IterativePE):
    def process_item(self, item: Any) -> Any:
        return len(item)


async def _stats(graph: WorkflowGraph, mapping: str) -> list[InstanceStats]:
    async with asyncio.timeout(45), aiod4p.start(graph, 1, mapping=mapping) as run:
        await run.results()
    return run.stats


class ThreadedSlow(Slow):
    threaded = True


@pytest.mark.parametrize(("mapping", "slow"), [("multi", Slow()), ("async", ThreadedSlow())], ids=["multi", "threaded"])
def test_a_slow_stage_gets_its_items_one_at_a_time(mapping: str, slow: Slow) -> None:
    # Its instances run at the same time (on two workers, in two threads): small batches keep both busy.
    graph = WorkflowGraph()
    graph.connect(Burst(40), "output", slow, "input")
    stats = [entry for entry in asyncio.run(_stats(graph, mapping)) if entry.pe == slow.id]
    assert sum(entry.items_in for entry in stats) == 40
    for entry in stats:
        assert entry.items_in > 0  # both instances work
        assert entry.batches_in == entry.items_in


class HalfMillisecond(IterativePE):
    """Takes at least 0.5 ms per item."""

    def __init__(self) -> None:
        super().__init__(parallelism=2)

    def process_item(self, item: Any) -> Any:
        threading.Event().wait(0.0005)  # ok-sleep: the item's cost, not synchronisation
        return item


def test_a_slow_stage_whose_instances_take_turns_gets_several_items_a_batch() -> None:
    # On async both instances' plain calls take turns on one event loop: a batch carries up to
    # TURNS_TIME_FACTOR x batch_seconds (8 ms) of work, at most 16 of these items, not the 4 of 2 ms.
    # 200 items: the first batches carry one item until the stage's pace is measured, and under load the
    # source hands on smaller batches; with a factor of 1 this gives about 75 batches, with 4 about 30.
    graph = WorkflowGraph()
    graph.connect(Burst(200), "output", slow := HalfMillisecond(), "input")
    stats = [entry for entry in asyncio.run(_stats(graph, "async")) if entry.pe == slow.id]
    assert sum(entry.items_in for entry in stats) == 200
    assert 200 // 16 <= sum(entry.batches_in for entry in stats) < 200 // 4


class Medium(IterativePE):
    """Takes at least 1.5 ms per item."""

    def __init__(self) -> None:
        super().__init__(parallelism=2)

    def process_item(self, item: Any) -> Any:
        threading.Event().wait(0.0015)  # ok-sleep: the item's cost, not synchronisation
        return item


def test_a_stage_on_another_worker_gets_more_work_per_batch() -> None:
    # multi -n 2: Medium[0] runs beside the source, Medium[1] on worker 1. Within a worker a batch holds
    # about 2 ms of work (one item here); between workers REMOTE_TIME_FACTOR times that, so that the
    # work in flight covers the credits' round trip through the sending worker's event loop.
    graph = WorkflowGraph()
    graph.connect(Burst(60), "output", medium := Medium(), "input")
    stats = {entry.instance: entry for entry in asyncio.run(_stats(graph, "multi")) if entry.pe == medium.id}
    assert stats[0].items_in + stats[1].items_in == 60
    assert stats[0].batches_in == stats[0].items_in
    assert 0 < stats[1].batches_in < stats[1].items_in


def test_large_items_travel_in_batches_bounded_by_bytes() -> None:
    graph = WorkflowGraph()
    graph.connect(Burst(64, size=100_000), "output", keep := Keep(), "input")
    stats = asyncio.run(_stats(graph, "async"))
    (entry,) = [entry for entry in stats if entry.pe == keep.id]
    assert entry.items_in == 64
    # 1 MiB batches of 100 kB items: at most 10 items each
    assert entry.batches_in >= 64 // 10


class FirstIsSlow(IterativePE):
    """Instance 0 takes 20 ms per item, instance 1 none: a shuffle should feed instance 1 most."""

    def __init__(self) -> None:
        super().__init__(parallelism=2)

    async def process_item(self, item: Any) -> Any:
        if self.instance == 0:
            await asyncio.sleep(0.02)  # the item's cost (a wait that leaves the loop to the other instance)
        return item


def test_a_shuffle_sends_work_to_the_instance_with_room() -> None:
    graph = WorkflowGraph()
    graph.connect(Burst(100), "output", uneven := FirstIsSlow(), "input")
    stats = {entry.instance: entry for entry in asyncio.run(_stats(graph, "async")) if entry.pe == uneven.id}
    assert stats[0].items_in + stats[1].items_in == 100
    assert stats[1].items_in >= 80  # round robin would give it 50


class Keyed(GenericPE):
    """Two instances grouped by a constant key: one instance gets every item."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(key=_to_instance_1))], outputs=["output"], parallelism=2)

    def process(self, inputs: dict[str, Any]) -> None:
        pass


def _to_instance_1(item: Any) -> str:
    return next(key for key in (f"k{index}" for index in range(100)) if stable_hash(key) % 2 == 1)


def test_batches_grow_where_no_local_instance_is_ever_measured() -> None:
    # multi -n 2: instance 0 of Keyed runs beside the source and never gets an item, so no time per
    # item is measured there; the batches to instance 1 must still grow to full size.
    graph = WorkflowGraph()
    graph.connect(Burst(5000), "output", keyed := Keyed(), "input")
    stats = {entry.instance: entry for entry in asyncio.run(_stats(graph, "multi")) if entry.pe == keyed.id}
    assert (stats[0].items_in, stats[1].items_in) == (0, 5000)
    assert stats[1].batches_in < 60  # about 8 single items, then 2, 4, ... 256 at a time


def test_batches_between_workers_carry_more_than_batch_size() -> None:
    # Every item crosses from the source on worker 0 to Keyed[1] on worker 1. Each message between
    # processes has a fixed cost, so such a channel's batches may grow to REMOTE_BATCH_FACTOR times
    # batch_size (once the blind start is over): about 24 batches here, not about 90 of 256 items.
    # (max_delay is long so that only full batches and the end of the source flush.)
    graph = WorkflowGraph()
    graph.connect(Burst(20_000), "output", keyed := Keyed(), "input")

    async def main() -> list[InstanceStats]:
        async with asyncio.timeout(45), aiod4p.start(graph, 1, mapping="multi", workers=2, max_delay=60) as run:
            await run.results()
        return run.stats

    stats = {entry.instance: entry for entry in asyncio.run(main()) if entry.pe == keyed.id}
    assert stats[1].items_in == 20_000
    assert stats[1].batches_in <= 30
    assert stats[1].max_queued_items > 256


def test_batch_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_seconds and batch_bytes"):
        PlanOptions(batch_seconds=0)
    with pytest.raises(ValueError, match="batch_seconds and batch_bytes"):
        PlanOptions(batch_bytes=0)


_KEYS = [next(key for key in (f"k{index}" for index in range(100)) if stable_hash(key) % 2 == i) for i in (0, 1)]


def _uneven_halves(item: int) -> str:
    """Of every 16 items in a row, the first 9 go to instance 1, the other 7 to instance 0."""
    return _KEYS[1] if item % 16 < 9 else _KEYS[0]


class Split(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(key=_uneven_halves))], outputs=["output"], parallelism=2)

    def process(self, inputs: dict[str, Any]) -> None:
        pass


def test_each_destination_gets_full_batches_when_a_router_splits_them() -> None:
    # The source's batches of 16 split 9 / 7 between the two instances. Each destination's batch fills
    # to 16 before it is sent, and what is left waits for the next split: about 3,600 / 16 and
    # 2,800 / 16 batches (plus the few small ones before the first measurement), not a full batch
    # followed by a remainder of 2 (or 5) items every time (about 400 and 270 batches).
    graph = WorkflowGraph()
    graph.connect(Burst(6400), "output", split := Split(), "input")

    async def main() -> list[InstanceStats]:
        async with asyncio.timeout(45), aiod4p.start(graph, 1, batch_size=16, max_delay=60) as run:
            await run.results()
        return run.stats

    stats = {entry.instance: entry for entry in asyncio.run(main()) if entry.pe == split.id}
    assert (stats[0].items_in, stats[1].items_in) == (2800, 3600)
    assert stats[1].batches_in <= 3600 // 16 + 20
    assert stats[0].batches_in <= 2800 // 16 + 20


def _tiny_chain_stats(mapping: str) -> list[InstanceStats]:
    """A chain of cheap stages on 20,000 items, batch_size 64, 4 credits (only full batches and idle inboxes flush)."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", first := Double(), "input")
    graph.connect(first, "output", second := Double(), "input")
    graph.connect(second, "output", Discard(), "input")

    async def main() -> list[InstanceStats]:
        async with (
            asyncio.timeout(45),
            aiod4p.start(graph, 20_000, mapping=mapping, batch_size=64, credits=4, max_delay=60) as run,
        ):
            await run.results()
        return run.stats

    return asyncio.run(main())


def test_tiny_items_travel_within_a_worker_in_batches_past_batch_size() -> None:
    # Items measured as tiny fill a batch up to credits x batch_size (256 here), taking a credit per 64 items:
    # every stage takes far fewer batches than 20,000 / 64, and no inbox holds more than its channels'
    # credits x batch_size items (the in-flight bound is unchanged).
    stats = _tiny_chain_stats("async")
    for entry in stats:
        assert entry.items_in == 20_000
        assert entry.batches_in < 20_000 // 64 * 3 // 4, entry
        assert entry.inflight_bound == 4 * 64
        assert entry.max_queued_items <= entry.inflight_bound


def test_the_simple_mapping_keeps_batches_of_batch_size() -> None:
    # The simple mapping measures no time (its order must not depend on timing): batches stay at batch_size.
    for entry in _tiny_chain_stats("simple"):
        assert entry.items_in == 20_000
        assert entry.batches_in >= 20_000 // 64, entry
        assert entry.max_queued_items <= entry.inflight_bound


class WideDouble(Double):
    def __init__(self) -> None:
        super().__init__()
        self.parallelism = 2


def test_a_root_fed_without_pause_sends_full_batches_to_another_worker() -> None:
    # multi -n 2: the source on worker 0 deals its items to WideDouble[0] beside it and WideDouble[1] on worker 1.
    # The source's inbox runs empty after each feed batch only until the feed (ready, with credit) runs again:
    # that is no pause of the input, so its partly filled batches are not flushed then, and the batches to
    # worker 1 fill towards their cap (4,096) instead of going out with about 600 items each.
    graph = WorkflowGraph()
    graph.connect(Count(), "output", wide := WideDouble(), "input")
    graph.connect(wide, "output", Discard(), "input")

    async def main() -> list[InstanceStats]:
        async with asyncio.timeout(45), aiod4p.start(graph, 400_000, mapping="multi", workers=2, max_delay=60) as run:
            await run.results()
        return run.stats

    stats = {entry.instance: entry for entry in asyncio.run(main()) if entry.pe == wide.id}
    assert stats[0].items_in + stats[1].items_in == 400_000
    assert stats[1].items_in > 0
    assert stats[1].items_in / stats[1].batches_in > 1024, stats[1]


class _Results:
    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        pass


def test_a_stage_held_back_by_credit_is_measured_at_its_pace() -> None:
    """A cheap stage waiting for a slow one's credit takes items at the slow one's pace: batches to it are sized
    by that pace (busy and blocked time per item), not by its own work alone, which would queue hundreds of
    heavy items before one instance while the others have nothing left to do. The pace forgets: a stretch held
    back (or start-up) weighs less with every batch after it."""
    graph = WorkflowGraph()
    graph.connect(Burst(10), "output", cheap := Cheap(), "input")
    plan = make_plan(graph, PlanOptions(workers=1))
    worker = Worker(plan, 0, feeds=resolve_inputs(plan.graph, 1), results=_Results())
    assert worker.seconds_per_item(cheap.id) is None  # nothing measured yet
    actors = [actor for ref, actor in worker.actors.items() if ref.pe == cheap.id]
    now = time.perf_counter()
    actors[0]._paced(now - 0.02, 10)  # 10 items in 0.02 s, most of it waiting for credit
    assert worker.seconds_per_item(cheap.id) == pytest.approx(0.002, rel=0.05)
    for _ in range(30):
        actors[0]._paced(time.perf_counter(), 10)  # then a stretch of items taken at once
    assert worker.seconds_per_item(cheap.id) < 0.0001


class Cheap(IterativePE):
    def __init__(self) -> None:
        super().__init__(parallelism=2)

    def process_item(self, item: Any) -> Any:
        return item


_made = [0]  # items the heavy source below has made so far in this process


def _heavy_items() -> Iterator[int]:
    """200 items of about 1 ms each."""
    for index in range(200):
        threading.Event().wait(0.001)  # ok-sleep: the item's cost, not synchronisation
        _made[0] += 1
        yield index


class HeavyWriter(GenericPE):
    """Writes 200 heavy items in one call."""

    def __init__(self) -> None:
        super().__init__(inputs=[], outputs=["output"])

    def process(self, inputs: dict[str, Any]) -> None:
        for item in _heavy_items():
            self.write("output", item)


class HeavyYielder(ProducerPE):
    """Yields 200 heavy items from one call."""

    def produce(self) -> Iterator[int]:
        yield from _heavy_items()


class HeavyProcessYielder(GenericPE):
    """Yields 200 heavy items as ``{port: item}`` dicts from one ``process()`` generator."""

    def __init__(self) -> None:
        super().__init__(inputs=[], outputs=["output"])

    def process(self, inputs: dict[str, Any]) -> Iterator[dict[str, int]]:
        for item in _heavy_items():
            yield {"output": item}


class FirstArrival(GenericPE):
    """Outputs how many items the source had made when the first one arrived here."""

    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["output"])
        self.seen = False

    def process(self, inputs: dict[str, Any]) -> Any:
        if not self.seen:
            self.seen = True
            return {"output": _made[0]}
        return None


class YieldsAndWrites(ProducerPE):
    """Yields the even numbers below 20,000 and writes the odd ones, in order, from one call."""

    def produce(self) -> Iterator[int]:
        for number in range(20_000):
            if number % 2:
                self.write("output", number)
            else:
                yield number


@pytest.mark.parametrize(("mapping", "options"), [("simple", {}), ("async", {}), ("multi", {"workers": 2})])
def test_a_generator_that_also_writes_keeps_every_item_in_order(mapping: str, options: dict[str, Any]) -> None:
    """Writes hand items over in the middle of a generator's call; none is lost, none overtakes another."""
    graph = WorkflowGraph()
    graph.add(source := YieldsAndWrites())
    results = aiod4p.run(graph, 1, mapping=mapping, **options)
    assert results.by_port()[(source.id, "output")] == list(range(20_000))


class YieldsNones(ProducerPE):
    """Yields 5,000 numbers with a None after each even one (nothing), and writes a None once (an item)."""

    def produce(self) -> Iterator[int | None]:
        for number in range(5_000):
            yield number
            if number == 2_500:
                self.write("output", None)
            if number % 2 == 0:
                yield None


@pytest.mark.parametrize(("mapping", "options"), [("simple", {}), ("async", {}), ("multi", {"workers": 2})])
def test_a_generator_yielding_none_emits_nothing_for_it_but_a_written_none_is_an_item(
    mapping: str, options: dict[str, Any]
) -> None:
    graph = WorkflowGraph()
    graph.add(source := YieldsNones())
    results = aiod4p.run(graph, 1, mapping=mapping, **options)
    assert results.by_port()[(source.id, "output")] == [*range(2_501), None, *range(2_501, 5_000)]


@pytest.mark.parametrize(
    "source", [HeavyWriter, HeavyYielder, HeavyProcessYielder], ids=["write", "yield", "process-yields"]
)
def test_heavy_items_reach_the_next_stage_while_their_call_goes_on(source: type[GenericPE | ProducerPE]) -> None:
    """A call that makes heavy items hands them on a few at a time, not after a batch's worth of them (1,024
    written, or 256 yielded: the whole of this call's 200), so the stages after it work from the start (and
    a run embedded in a service does not hold its loop for the whole call)."""
    _made[0] = 0
    graph = WorkflowGraph()
    graph.connect(source(), "output", first := FirstArrival(), "input")
    results = aiod4p.run(graph, 1, mapping="async")
    (arrived_after,) = results.by_port()[(first.id, "output")]
    assert arrived_after <= 50


def test_a_shuffle_deals_each_batch_whole_to_the_instance_with_the_most_room() -> None:
    """Round robin split every batch in halves whatever the instances got through; the batch now goes whole
    where it waits least, so an instance with a worker of its own (or a faster one) gets more."""
    graph = WorkflowGraph()
    graph.connect(Burst(10), "output", cheap := Cheap(), "input")
    plan = make_plan(graph, PlanOptions(workers=1))
    worker = Worker(plan, 0, feeds=resolve_inputs(plan.graph, 1), results=_Results())
    (actor,) = [actor for ref, actor in worker.actors.items() if ref.pe != cheap.id]
    (route,) = actor.routes["output"]
    busy, free = route.pendings
    busy.limit = free.limit = 1024  # measured: cheap items (until then, batches are dealt in turn)
    busy.channel.credits = 1  # three of its four batches are waiting
    actor._route(route, list(range(100)), True, [])
    assert (busy.items, free.items) == ([], list(range(100)))
    actor._route(route, list(range(100, 110)), True, [])  # the free one has 100 waiting: still more room
    assert free.items == list(range(110))
