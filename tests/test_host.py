"""The worker host over any comm: workers served and supervised inside one event loop.

A mapping contributes only how workers start and which comms join them; here the
"workers" are tasks and every comm is in memory, so the host's protocol (results,
statistics, pumped feeds with credits, drain, failures, dead workers) is tested
without processes.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import workflows as wf
from helpers import recorded_supervisors

from aiod4p import ALL, InstanceStats, PlanOptions, WorkflowGraph, make_plan
from aiod4p._checkpoint import ResultGate, Trigger
from aiod4p._engine import Feed, Worker
from aiod4p._plan import ExecutionPlan
from aiod4p._results import QueueSink, ResultRecord, Results
from aiod4p.errors import PeerDied, PEError, WorkerDied
from aiod4p.mappings import RunControl
from aiod4p.mappings._host import (
    Done,
    Drain,
    Failed,
    ForwardSink,
    ResultsTaken,
    Supervisor,
    pumped_feeds,
    serve,
    split_feeds,
)
from aiod4p.transports import Comm, MemoryComm, memory_comm_pair


async def _run(
    plan: ExecutionPlan,
    feeds: Mapping[str, Feed],
    *,
    kill: int | None = None,
    sink: ListSink | None = None,
    control: RunControl | None = None,
) -> tuple[ListSink, RunControl, list[Any]]:
    """Run ``plan`` on ``plan.workers`` served workers; ``kill``: that worker's comm vanishes at once."""
    shipped, pumped = split_feeds(plan, feeds)
    links: dict[tuple[int, int], tuple[MemoryComm, MemoryComm]] = {
        pair: memory_comm_pair() for pair in itertools.combinations(range(plan.workers), 2)
    }
    controls = {wid: memory_comm_pair() for wid in range(plan.workers)}
    served = []
    for wid in range(plan.workers):
        _, far = controls[wid]
        if wid == kill:
            far.abort()
            continue
        peers: dict[int, Comm] = {b if a == wid else a: links[(a, b)][a != wid] for (a, b) in links if wid in (a, b)}
        resolved, pumped_here = pumped_feeds(shipped, far)
        forward = ForwardSink.for_plan(far, "the test", plan.options)
        worker = Worker(plan, wid, feeds=resolved, results=forward, peers=peers)
        served.append(
            asyncio.create_task(
                serve(worker, far, name=f"worker {wid}", sink=forward, pumped=pumped_here, interval=0.01)
            )
        )

    async def death(wid: int) -> str:
        return f"worker {wid} vanished"

    sink, control = sink or ListSink(), control or RunControl()
    supervisor = Supervisor(
        plan, {wid: near for wid, (near, _) in controls.items()}, sink, control, pumped=pumped, death=death
    )
    try:
        stats = await supervisor.run()
    finally:
        for comm in (*(near for near, _ in controls.values()), *(c for pair in links.values() for c in pair)):
            comm.abort()
        await asyncio.gather(*served, return_exceptions=True)
    return sink, control, stats


class ListSink:
    """Collects every result into a :class:`Results`."""

    def __init__(self) -> None:
        self.results = Results()

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        self.results.records.extend(ResultRecord(pe, port, item) for item in items)


class _Watching(ListSink):
    """Sets :attr:`enough` once ``count`` results have arrived."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.enough = asyncio.Event()

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        await super().emit(pe, port, items)
        if len(self.results) >= self.count:
            self.enough.set()


async def _numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        if i % 100 == 0:
            await asyncio.sleep(0)
        yield i


async def test_results_statistics_and_a_pumped_feed_cross_the_control_comms() -> None:
    graph = WorkflowGraph()
    graph.connect(double := wf.Double(), "output", wf.Double(parallelism=2), "input")  # half crosses to worker 1
    plan = make_plan(graph, PlanOptions(workers=2, batch_size=16, credits=2))
    async with asyncio.timeout(20):
        sink, control, stats = await _run(plan, {double.id: _numbers(1000)})
    assert sorted(sink.results.data()) == [4 * i for i in range(1000)]
    assert {entry.worker for entry in stats} == {0, 1}
    assert sum(entry.items_in for entry in stats if entry.pe == double.id) == 1000
    assert control.stats() == stats  # the final statistics were published per worker


async def test_a_pe_error_on_one_worker_wins_over_the_broken_links_it_causes() -> None:
    graph = WorkflowGraph()
    # Every instance gets every item: instance 1 surely gets one (a shuffle may keep cheap items beside their sender).
    graph.connect(source := wf.Count(), "output", failing := wf.FailsOnInstance(1), "input", grouping=ALL)
    failing.parallelism = 2
    plan = make_plan(graph, PlanOptions(workers=2))
    with pytest.raises(PEError) as caught:
        async with asyncio.timeout(20):
            await _run(plan, {source.id: 100})
    assert caught.value.pe == failing.id and caught.value.instance == 1


async def test_a_worker_whose_comm_vanishes_is_dead() -> None:
    graph, source = wf.pipeline(2)
    plan = make_plan(graph, PlanOptions(workers=2))
    with pytest.raises(WorkerDied, match="worker 1 vanished"):
        async with asyncio.timeout(20):
            await _run(plan, {source.id: 10**9}, kill=1)


async def test_drain_stops_an_endless_pumped_feed() -> None:
    async def endless() -> AsyncIterator[int]:
        for i in itertools.count():
            await asyncio.sleep(0)
            yield i

    graph = WorkflowGraph()
    graph.connect(double := wf.Double(), "output", wf.Double(parallelism=2), "input")
    plan = make_plan(graph, PlanOptions(workers=2, batch_size=16, credits=2))
    sink, control = _Watching(500), RunControl()
    async with asyncio.timeout(20):
        run = asyncio.create_task(_run(plan, {double.id: endless()}, sink=sink, control=control))
        await sink.enough.wait()
        control.drain()
        await run
    data = sink.results.data()
    assert len(data) >= 500 and sorted(data) == [4 * i for i in range(len(data))]  # nothing lost in flight


async def test_an_ended_supervisor_is_let_go_by_the_runs_control(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attempt of a checkpointed run supervises new workers under the run's one control: an attempt
    that ended (its worker died) must not stay registered for drains, which kept it alive with its comms
    and their buffers, restart after restart (the launcher grew by ~550 kB a restart)."""
    supervisors = recorded_supervisors(monkeypatch)
    graph, source = wf.pipeline(2)
    plan = make_plan(graph, PlanOptions(workers=2))
    control = RunControl()
    for _ in range(3):  # as three attempts of one run
        with pytest.raises(WorkerDied):
            async with asyncio.timeout(20):
                await _run(plan, {source.id: 10**9}, kill=1, control=control)
    gc.collect()  # an ended attempt may wait for the collector (its errors and frames form cycles): not a leak
    assert len(supervisors) == 3
    assert [ref() for ref in supervisors] == [None, None, None]
    assert control.under_way  # between two attempts the run is still under way: a signal drains it


def test_a_forgotten_drain_callback_is_not_called_and_a_later_one_is_at_once() -> None:
    control, calls = RunControl(), []
    assert not control.under_way
    forget = control.on_drain(lambda: calls.append("ended attempt"))
    forget()
    forget()  # twice: nothing more
    assert control.under_way
    control.drain()
    assert calls == []
    control.on_drain(lambda: calls.append("next attempt"))  # a drain asked for between attempts
    assert calls == ["next attempt"]


async def test_a_forward_sink_waits_while_a_window_of_its_results_is_not_taken() -> None:
    near, far = memory_comm_pair()
    sink = ForwardSink(far, "the test", 16, 100)  # bytes: two integers (8 bytes each)
    await sink.emit("pe", "output", [1, 2])
    later = asyncio.create_task(sink.emit("pe", "output", [3]))
    await asyncio.sleep(0.01)
    assert not later.done()  # a whole window is on its way
    sink.taken((await near.receive()).nbytes, 1)
    await asyncio.wait_for(later, 10)
    assert (await near.receive()).items == [3]


async def test_a_forward_sink_waits_while_a_window_of_batches_is_not_taken_whatever_their_bytes() -> None:
    """Small results, counted at a few bytes each, fill no window of bytes: 260,000 of them were on their way to
    a launcher that wrote 160,000 a second, and a live run's results lagged 3 s behind, and its drain too."""
    near, far = memory_comm_pair()
    sink = ForwardSink(far, "the test", 1 << 20, 2)
    await sink.emit("pe", "output", [1])
    await sink.emit("pe", "output", [2])
    later = asyncio.create_task(sink.emit("pe", "output", [3]))
    await asyncio.sleep(0.01)
    assert not later.done()  # two batches are on their way
    first = await near.receive()
    sink.taken(first.nbytes, 1)
    await asyncio.wait_for(later, 10)
    assert [(await near.receive()).items for _ in range(2)] == [[2], [3]]


async def test_a_queue_sink_holds_at_most_its_bytes_but_always_one_batch() -> None:
    queue = QueueSink(16, 2 << 20)
    await queue.emit("pe", "output", [bytes(3 << 20)])  # larger than its bytes: alone, it goes in
    later = asyncio.create_task(queue.emit("pe", "output", [bytes(10)]))
    await asyncio.sleep(0.01)
    assert not later.done() and queue.queue.qsize() == 1
    assert len(queue.taken(queue.queue.get_nowait())[0].data) == 3 << 20
    await asyncio.wait_for(later, 10)
    assert queue.queued_bytes == 10


class _GatedWorker:
    """A servable whose results pass a :class:`ResultGate` of two producers, ``a`` and ``b``, as a worker's with
    checkpoints does (and MPI rank 0's, per rank): its run releases what ``a`` wrote past barrier 1 once ``b``
    passes it, and a :class:`Trigger` goes through the gate too."""

    def __init__(self, plan: ExecutionPlan, gate: ResultGate) -> None:
        self.plan = plan
        self.gate = gate
        self.checkpoints = self

    @property
    def stats(self) -> list[Any]:
        return []

    def drain(self) -> None:
        pass

    async def run(self) -> list[Any]:
        await self.gate.mark("b", 1)
        return []

    async def trigger(self, n: int) -> None:
        await self.gate.trigger(n)


async def test_a_trigger_does_not_keep_a_worker_from_hearing_that_its_results_were_taken() -> None:
    """A trigger came while the gate handed on held results, a window of them untaken: the worker read no more
    control messages until the trigger was through, which waited for the gate, which waited for the launcher's
    acknowledgement, which was not read (multi, mpi under checkpoints, behind a slow reader): the run hung."""
    near, far = memory_comm_pair()
    sink = ForwardSink(far, "the test", 1 << 20, 2)
    gate = ResultGate(["a", "b"], sink.emit, _nothing)
    await gate.mark("a", 1)
    for item in range(4):
        await gate.emit("a", "pe", "output", [item])  # held: b has not passed barrier 1 yet
    worker = _GatedWorker(make_plan(wf.pipeline()[0], PlanOptions()), gate)
    served = asyncio.create_task(serve(worker, far, name="worker 0", sink=sink, interval=3600))
    async with asyncio.timeout(20):
        sent = [await near.receive() for _ in range(2)]  # a window: the worker waits
        await near.send(Trigger(2))
        await near.send(ResultsTaken(sum(results.nbytes for results in sent), 2))
        sent += [await near.receive() for _ in range(2)]
        assert [results.items for results in sent] == [[0], [1], [2], [3]]
        await near.send(ResultsTaken(sum(results.nbytes for results in sent[2:]), 2))
        assert isinstance(await near.receive(), Done)
        await near.aclose()
        assert await served


async def _nothing(n: int) -> None:
    pass


class _SendsThenWaits:
    """A servable whose run writes ``batches`` results, sets ``sent``, and never ends (a healthy worker with more
    to do)."""

    def __init__(self, plan: ExecutionPlan, sink: ForwardSink, batches: int) -> None:
        self.plan, self.sink, self.batches = plan, sink, batches
        self.sent = asyncio.Event()

    @property
    def stats(self) -> list[InstanceStats]:
        return [InstanceStats("pe", 1, worker=1, items_out=self.batches)]

    def drain(self) -> None:
        pass

    async def run(self) -> list[Any]:
        for item in range(self.batches):
            await self.sink.emit("pe", "output", [item])
        self.sent.set()
        await asyncio.Event().wait()
        return []


class _YieldingSink(ListSink):
    """Hands each batch on in a turn of the loop of its own, as a reader's queue does."""

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        await asyncio.sleep(0)
        await super().emit(pe, port, items)


async def test_the_results_another_worker_sent_before_a_failure_reach_the_reader() -> None:
    """Worker 0 fails while the launcher has not yet read all that worker 1 sent (a sibling instance's finished
    results): the launcher stopped reading at the failure and they were lost (multi and mpi, at random). Now
    worker 1 is told to stop, reports so, and everything it sent before is relayed."""
    plan = make_plan(wf.pipeline()[0], PlanOptions(workers=2))
    (near0, far0), (near1, far1) = memory_comm_pair(), memory_comm_pair()
    sink1 = ForwardSink(far1, "the test", 1 << 20, 1000)
    healthy = _SendsThenWaits(plan, sink1, 50)
    served = asyncio.create_task(serve(healthy, far1, name="worker 1", sink=sink1, interval=3600))
    sink, control = _YieldingSink(), RunControl()
    supervisor = Supervisor(plan, {0: near0, 1: near1}, sink, control)
    supervising = asyncio.create_task(supervisor.run())
    async with asyncio.timeout(20):
        await healthy.sent.wait()
        await far0.send(Failed(PEError("pe", 0, "input", "ValueError: boom")))
        with pytest.raises(PEError, match="boom"):
            await supervising
        assert sorted(sink.results.data()) == list(range(50))
        assert control.stats() == healthy.stats  # what it did up to the stop: the failed run's statistics
        for comm in (near0, near1):
            comm.abort()
        assert not await served  # it reported that it stopped


class _LinkBroke:
    """A servable whose link to another worker breaks (:class:`PeerDied`) after its instance did some work."""

    def __init__(self, plan: ExecutionPlan) -> None:
        self.plan = plan

    @property
    def stats(self) -> list[InstanceStats]:
        return [InstanceStats("pe", 0, worker=0, items_in=7)]

    def drain(self) -> None:
        pass

    async def run(self) -> list[Any]:
        raise PeerDied("worker 1 closed its channels before finishing")


def _watcher(wid: int) -> asyncio.Task[Any]:
    """The running supervisor's task that watches worker ``wid``."""
    (task,) = [task for task in asyncio.all_tasks() if task.get_name() == f"watch worker {wid}"]
    return task


@pytest.mark.parametrize("cause", ["pe error", "death"])
async def test_a_worker_whose_link_broke_reports_its_statistics_and_the_cause_still_wins(cause: str) -> None:
    """Worker 1 fails, so worker 0's link to it breaks: worker 0 sent no statistics (only a PE's error or a Stop
    made a worker send them), and a failed multi or mpi run's statistics lacked its instances. It now sends them
    before its failure; that report reaching the launcher before worker 1's, the run still fails with worker 1's
    PE error, or its death (which --restarts restarts after)."""
    plan = make_plan(wf.pipeline()[0], PlanOptions(workers=2))
    (near0, far0), (near1, far1) = memory_comm_pair(), memory_comm_pair()
    broke = _LinkBroke(plan)
    sink0 = ForwardSink(far0, "the test", 1 << 20, 1000)
    served = asyncio.create_task(serve(broke, far0, name="worker 0", sink=sink0, interval=3600))
    control = RunControl()
    supervising = asyncio.create_task(Supervisor(plan, {0: near0, 1: near1}, ListSink(), control).run())
    await asyncio.sleep(0)  # the supervisor starts watching its workers
    async with asyncio.timeout(20):
        await asyncio.wait({_watcher(0)})  # worker 0's report is read: the broken link comes first
        if cause == "pe error":
            await far1.send(Failed(PEError("pe", 1, "input", "ValueError: boom")))
            with pytest.raises(PEError, match="boom"):
                await supervising
        else:
            far1.abort()
            with pytest.raises(WorkerDied, match="worker 1 ended its part of the run without reporting"):
                await supervising
        assert control.stats() == broke.stats
        for comm in (near0, near1):
            comm.abort()
        assert not await served


async def test_a_worker_that_takes_no_stop_does_not_hold_up_the_runs_error() -> None:
    """The stop to a worker whose comm is full (its loop held by a PE, a pumped feed's chunks filling its pipe)
    waited for room: the launcher hung where it used to fail at once. The stops are bounded by the grace."""
    plan = make_plan(wf.pipeline()[0], PlanOptions(workers=2))
    (near0, far0), (near1, _) = memory_comm_pair(1), memory_comm_pair(1)
    await near1.send(Drain())  # worker 1 reads nothing: its comm is full
    supervisor = Supervisor(plan, {0: near0, 1: near1}, ListSink(), RunControl(), grace=0.2)
    async with asyncio.timeout(20):
        await far0.send(Failed(PEError("pe", 0, "input", "ValueError: boom")))
        with pytest.raises(PEError, match="boom"):
            await supervisor.run()
