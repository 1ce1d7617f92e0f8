"""Longevity: a process that runs workflows over and over (a service, a notebook) keeps what it had.

Every run must give back what it took: memory (objects), descriptors, threads, child processes,
signal handlers, loggers, files in /tmp, and a run cancelled or failed leaves the next one right.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from workflows import Count, proxy_topology_files

import aiod4p
from aiod4p import GenericPE, IterativePE, ProducerPE, WorkflowGraph, group_by
from aiod4p._engine import _CallGreenlet

N = 30
EXPECTED_TOTALS = sorted((key, sum(i for i in range(N) if i % 3 == key)) for key in range(3))


class Tag(IterativePE):
    def process_item(self, item: int) -> tuple[int, int]:
        return (item % 3, item)


class KeyedTotal(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(0))], outputs=["total"], parallelism=2)
        self.totals: dict[int, int] = {}

    def process(self, inputs: dict[str, Any]) -> None:
        key, value = inputs["input"]
        self.totals[key] = self.totals.get(key, 0) + value

    def postprocess(self) -> None:
        for key, total in sorted(self.totals.items()):
            self.write("total", (key, total))


class Double(IterativePE):
    def process_item(self, item: int) -> int:
        return 2 * item


class Endless(ProducerPE):
    """Counts until the run stops it (a live source: drained by being cancelled)."""

    async def produce(self) -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1
            if i % 64 == 0:
                await asyncio.sleep(0)  # lets the loop turn, as a real source waiting for input does


class FailsAt(IterativePE):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def process_item(self, item: int) -> int:
        if item == self.at:
            raise ValueError(f"boom at {item}")
        return item


class NotesTopologyThenFails(IterativePE):
    """On an MPI rank: writes to ``path`` the topology file (``/tmp/hydra_hwloc_xmlfile_*``) that the rank's
    Hydra proxy holds for the job, then fails the run."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def process_item(self, item: int) -> None:
        Path(self.path).write_text("\n".join(proxy_topology_files()))
        raise ValueError("failing on purpose")


def keyed() -> WorkflowGraph:
    graph = WorkflowGraph()
    tag = Tag()
    graph.connect(Count(), "output", tag, "input")
    graph.connect(tag, "output", KeyedTotal(), "input")
    return graph


def doubled() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", Double(), "input")
    return graph


def endless() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Endless(), "output", Double(), "input")
    return graph


def failing(at: int) -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", FailsAt(at), "input")
    return graph


def call_greenlets() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, _CallGreenlet))


def children() -> list[str]:
    """This process's child processes (zombies too), as ``pid state``."""
    found = []
    for task in os.listdir("/proc/self/task"):
        try:
            pids = Path(f"/proc/self/task/{task}/children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                found.append(f"{pid} {Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]}")
            except OSError:
                continue
    return found


def resources() -> dict[str, Any]:
    """What a run must give back: descriptors, threads, children, signal handlers, loggers, modules."""
    loggers = logging.Logger.manager.loggerDict.items()
    handlers = [(name, len(logger.handlers)) for name, logger in loggers if isinstance(logger, logging.Logger)]
    return {
        "fds": set(os.listdir("/proc/self/fd")),
        "threads": {thread.ident for thread in threading.enumerate()},
        "os threads": set(os.listdir("/proc/self/task")),
        "children": set(children()),
        "signal handlers": {int(s): signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)},
        "loggers": [*sorted(handlers), ("", len(logging.getLogger().handlers))],
        "modules": set(sys.modules),
    }


def assert_nothing_left(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Nothing in ``after`` that ``before`` lacked (what an earlier test left may end meanwhile)."""
    for name, value in before.items():
        if isinstance(value, set):
            assert not after[name] - value, f"{name} left: {after[name] - value}"
        else:
            assert after[name] == value, f"{name} changed: {value} -> {after[name]}"


# -- many runs in one process -----------------------------------------------------------------------------


@pytest.mark.parametrize(("mapping", "workers"), [("simple", None), ("async", None), ("async", 3)])
def test_many_runs_in_one_process_keep_nothing(mapping: str, workers: int | None) -> None:
    graph = keyed()

    def runs(count: int) -> None:
        for _ in range(count):
            assert sorted(aiod4p.run(graph, N, mapping=mapping, workers=workers).data()) == EXPECTED_TOTALS

    runs(3)  # first-run imports and caches
    greenlets, before = call_greenlets(), resources()
    runs(50)
    # Each instance's greenlet (the one that runs its PE's calls) outlived its run, frame and all: 4 to 6
    # per run here, tens of kB, for as long as the process lived.
    assert call_greenlets() == greenlets
    assert_nothing_left(before, resources())


def test_runs_from_other_threads_and_from_a_running_loop_keep_nothing() -> None:
    graph = keyed()

    def in_a_thread() -> None:
        assert sorted(aiod4p.run(graph, N).data()) == EXPECTED_TOTALS

    async def in_a_loop() -> None:  # a notebook's cell: run() runs beside the caller's loop, in a thread
        with pytest.warns(RuntimeWarning, match="blocks that loop"):
            in_a_thread()

    in_a_thread()
    greenlets, before = call_greenlets(), resources()
    for _ in range(10):
        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(30)
        assert not thread.is_alive()
        asyncio.run(in_a_loop())
    # run() returns once the run has ended; its thread then closes the run's loop and ends
    for thread in threading.enumerate():
        if thread.name == "aiod4p run":
            thread.join(10)
            assert not thread.is_alive()
    assert call_greenlets() == greenlets
    assert_nothing_left(before, resources())


# -- concurrent runs ----------------------------------------------------------------------------------------


async def mixed_runs(count: int, mapping: str, workers: int | None) -> None:
    graphs = keyed(), doubled()

    async def one(i: int) -> None:
        size = 10 + i
        results = await aiod4p.run_async(graphs[i % 2], size, mapping=mapping, workers=workers)
        if i % 2:
            assert sorted(results.data()) == [2 * k for k in range(size)], i
        else:
            totals = sorted((key, sum(k for k in range(size) if k % 3 == key)) for key in range(3))
            assert sorted(results.data()) == totals, i

    await asyncio.gather(*(one(i) for i in range(count)))


async def test_fifty_concurrent_runs_of_mixed_graphs_do_not_mix() -> None:
    async with asyncio.timeout(30):
        await mixed_runs(3, "async", 2)
        greenlets = call_greenlets()
        await mixed_runs(50, "async", 2)
        await mixed_runs(50, "simple", None)
    assert call_greenlets() == greenlets
    assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []


def test_concurrent_runs_on_worker_processes_do_not_mix_and_leave_no_process() -> None:
    async def main() -> None:
        async with asyncio.timeout(50):
            await mixed_runs(6, "multi", 2)

    asyncio.run(main())
    before = resources()
    asyncio.run(main())
    assert_nothing_left(before, resources())


# -- cancelled and failed runs ------------------------------------------------------------------------------


async def cancelled_before_it_starts() -> None:
    task = asyncio.ensure_future(aiod4p.run_async(endless()))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def closed_at_result(k: int) -> None:
    async with aiod4p.start(endless()) as run:
        seen = 0
        async for _ in run:
            seen += 1
            if seen == k:
                break  # leaving the block aborts the run
    assert run.done


async def drained_at_result(k: int, *, closed_while_draining: bool) -> None:
    run = aiod4p.start(endless())
    seen = 0
    async for _ in run:
        seen += 1
        if seen == k:
            run.drain()
        elif seen > k and closed_while_draining:
            await run.aclose()  # aborts the drain under way
            break
    assert run.done


async def failed_at(at: int) -> None:
    with pytest.raises(aiod4p.PEError, match=f"boom at {at}"):
        await aiod4p.run_async(failing(at), 50)


STOPS: list[Callable[[], Any]] = [
    cancelled_before_it_starts,
    lambda: closed_at_result(1),
    lambda: closed_at_result(300),
    lambda: drained_at_result(10, closed_while_draining=False),
    lambda: drained_at_result(10, closed_while_draining=True),
    lambda: failed_at(0),
    lambda: failed_at(17),
]


async def test_the_run_after_a_cancelled_or_failed_one_is_right() -> None:
    graph = keyed()
    async with asyncio.timeout(40):
        assert sorted((await aiod4p.run_async(graph, N)).data()) == EXPECTED_TOTALS
        greenlets = call_greenlets()
        for _ in range(3):
            for stop in STOPS:
                await stop()
                assert sorted((await aiod4p.run_async(graph, N)).data()) == EXPECTED_TOTALS
    assert call_greenlets() == greenlets
    assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []


def test_a_failed_multi_run_leaves_no_process_and_the_next_run_is_right() -> None:
    graph = keyed()
    assert sorted(aiod4p.run(graph, N, mapping="multi", workers=2).data()) == EXPECTED_TOTALS
    before = resources()
    for at in (0, 17):
        with pytest.raises(aiod4p.PEError, match=f"boom at {at}"):
            aiod4p.run(failing(at), 50, mapping="multi", workers=2)
        assert sorted(aiod4p.run(graph, N, mapping="multi", workers=2).data()) == EXPECTED_TOTALS
    assert_nothing_left(before, resources())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_failed_mpi_run_leaves_no_topology_file_in_tmp(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py")
    noted = tmp_path / "topology"
    graph = WorkflowGraph()
    graph.connect(Count(), "output", NotesTopologyThenFails(str(noted)), "input")
    with pytest.raises(aiod4p.PEError, match="failing on purpose"):
        aiod4p.run(graph, 1, mapping="mpi", workers=2)
    files = noted.read_text().split()
    # Hydra's proxy removes its file only when it exits by itself; a rank's MPI_Abort left it, one per run.
    assert files and not [path for path in files if Path(path).exists()]
    assert sorted(aiod4p.run(keyed(), N, mapping="mpi", workers=2).data()) == EXPECTED_TOTALS
