"""Checkpoints and recovery on the async mapping: barriers, state, replayable sources, restore."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import ckpt_workflows
import prov.model
import pytest
import workflows as wf
from ckpt_workflows import (
    Count,
    HeldLines,
    Split,
    complete_checkpoints,
    expected_counts,
    held_word_count_module,
    on_completed,
    paced_word_count,
    word_count,
    write_words,
)
from helpers import aiod4p_cli, aiod4p_process, json_lines

import aiod4p
from aiod4p import ALL, PE, Grouping, IterativePE, ProducerPE, WorkflowGraph, group_by, run, run_async, start
from aiod4p._checkpoint import (
    MANIFEST,
    Aligner,
    Checkpointing,
    CheckpointStore,
    Coordinator,
    Finals,
    HeldCounts,
    HeldResults,
    LauncherCheckpoints,
    ResultGate,
    ResultsLog,
    Session,
    Suspended,
    WorkerCheckpoints,
    _groupings_of_edges,
    resumed_feed,
    run_with_recovery,
)
from aiod4p._cli import main
from aiod4p._engine import Worker
from aiod4p._groupings import Router
from aiod4p._inputs import resolve_inputs
from aiod4p._plan import DEFAULT_BATCH_SIZE, DEFAULT_CREDITS, InstanceRef, PlanOptions, make_plan
from aiod4p._plot import load_samples
from aiod4p._provenance import read_lineage, write_document
from aiod4p._state import KEY_GROUPS, capture, restore_state
from aiod4p.errors import CheckpointError, MappingUnavailable, WorkerDied
from aiod4p.mappings import RunControl, get_mapping
from aiod4p.mappings.asyncio import AsyncMapping
from aiod4p.sources import LinesSource, LineStream, LiveFeed, SourcePE
from aiod4p.windows import CountWindow


def _mapping(directory: Path, results: Path | None = None, **options: Any) -> AsyncMapping:
    mapping = AsyncMapping()
    mapping.checkpointing = Checkpointing(
        directory, results_path=None if results is None else str(results), **{"interval": 0.02, **options}
    )
    return mapping


def _counts(results: Any) -> dict[str, int]:
    return {word: count for word, count in (record.data for record in results)}


def _file_counts(path: Path) -> dict[str, int]:
    lines = path.read_text().splitlines()
    counts = [tuple(json.loads(line)["data"]) for line in lines]
    assert len(counts) == len(dict(counts)), "a result was written twice"
    return dict(counts)


@pytest.fixture
def words(tmp_path: Path) -> Path:
    path = tmp_path / "words.txt"
    write_words(path, 40_000)
    return path


def test_checkpointed_run_gives_the_results_of_a_plain_run(tmp_path: Path, words: Path) -> None:
    results = tmp_path / "results.jsonl"
    got = run(word_count(words), 1, mapping=_mapping(tmp_path / "ck", results), workers=3)
    assert _counts(got) == expected_counts(words)
    assert _file_counts(results) == expected_counts(words)
    store = CheckpointStore(tmp_path / "ck")
    assert store.latest() is not None
    assert len([n for n in store.ids() if (store.path(n) / MANIFEST).exists()]) <= 3  # last K kept


class _Killer:
    """Knows when Count instances counted ``threshold`` words (or Numbers made as many) in this attempt,
    and ``new`` checkpoints completed in ``checkpointed`` since then (so that they hold the work of items: one
    that completed before, on a loaded machine at times before any item, restored the run from its start).

    It looks every 1000 words (``ckpt_workflows.HOOK``) and at every checkpoint completed (:meth:`completed`):
    a source held until its gate exists (:class:`HeldLines`; the gate of a killed attempt never opens, so the
    attempt cannot end before its abort does) counts no more words, and its checkpoints still complete.
    """

    def __init__(self, threshold: int, checkpointed: Path | None = None, new: int = 1):
        self.threshold = threshold
        self.checkpointed = checkpointed
        self.before: set[str] | None = None  # the checkpoints complete once the threshold was reached
        self.new = new
        self.reached = asyncio.Event()
        self.calls = 0

    def __call__(self, seen: int) -> None:
        self.calls += 1  # every 1000 words of this attempt
        self._check()

    def completed(self, n: int) -> None:
        self._check()

    def _check(self) -> None:
        if self.calls * 1000 < self.threshold:
            return
        if self.checkpointed is None:
            self.reached.set()
            return
        complete = complete_checkpoints(self.checkpointed)
        if self.before is None:
            self.before = complete
        if len(complete - self.before) >= self.new:
            self.reached.set()


def _held_word_count(words: Path, gate: Path, threshold: int) -> WorkflowGraph:
    """The word count of ``words``, its lines held once they reach ``threshold`` words (with room for each
    Count instance's last 1000) until ``gate`` exists: the run cannot end before the killer's moment."""
    return word_count(words, lines=HeldLines(words, until=gate, hold_after=threshold // 10 + 500))


async def _run_until_killed(
    graph: WorkflowGraph,
    mapping: AsyncMapping,
    workers: int,
    threshold: int,
    inputs: Any = 1,
    checkpointed: Path | None = None,
    new: int = 1,
) -> bool:
    """Run, aborting (no drain: a kill) at the moment chosen; whether the run finished before it."""
    killer = _Killer(threshold, checkpointed, new)
    ckpt_workflows.HOOK = killer
    try:
        with on_completed(killer.completed):
            async with start(graph, inputs, mapping=mapping, workers=workers) as workflow:
                results = asyncio.ensure_future(workflow.results())
                waiter = asyncio.ensure_future(killer.reached.wait())
                await asyncio.wait({results, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if results.done():
                    results.result()
                    return True
                results.cancel()
                await asyncio.gather(results, waiter, return_exceptions=True)
            return False  # leaving the block aborted the run
    finally:
        ckpt_workflows.HOOK = None


async def test_killed_three_times_restored_with_other_n_counts_exactly(tmp_path: Path) -> None:
    """Cancel at seeded moments, restore with -n 2 -> 4 -> 1: same counts, same results file."""
    words = tmp_path / "words.txt"
    count = int(os.environ.get("AIOD4P_TEST_CHECKPOINT_WORDS", 100_000))  # the issue's: 2,000,000
    write_words(words, count)
    rng = random.Random(14)
    results, directory = tmp_path / "results.jsonl", tmp_path / "ck"
    restored = []
    for workers in (2, 4, 1):
        latest = CheckpointStore(directory).latest()
        restored.append(latest.id if latest is not None else 0)
        mapping = _mapping(directory, results, restore=latest is not None)
        # Each attempt is cancelled after a checkpoint of its own: the next one resumes from further on.
        threshold = rng.randrange(count // 30, count // 5, 1000)
        gate = tmp_path / f"killed-{workers}"
        graph = _held_word_count(words, gate, threshold)
        assert not await _run_until_killed(graph, mapping, workers, threshold, checkpointed=directory)
    assert restored[0] == 0 and restored[1] > 0 and restored[2] > restored[1]
    final = await run_async(word_count(words), 1, mapping=_mapping(directory, results, restore=True), workers=3)
    assert _counts(final) == expected_counts(words)
    assert _file_counts(results) == expected_counts(words)


async def test_torn_checkpoint_is_ignored(tmp_path: Path) -> None:
    words = tmp_path / "many.txt"
    write_words(words, 40_000)
    directory = tmp_path / "ck"
    gate = tmp_path / "killed"
    graph = _held_word_count(words, gate, 0)
    assert not await _run_until_killed(graph, _mapping(directory, keep=5), 2, 0, checkpointed=directory, new=2)
    store = CheckpointStore(directory, keep=5)
    complete = [n for n in store.ids() if (store.path(n) / MANIFEST).exists()]
    newest, previous = complete[-1], complete[-2]
    part = next(p for p in store.path(newest).iterdir() if p.name.endswith(".state"))
    part.write_bytes(part.read_bytes()[:-3])  # a worker killed while writing
    store.path(newest + 1).mkdir(exist_ok=True)  # a checkpoint that never got its manifest (the kill may have left it)
    (store.path(newest + 1) / "x.0.state").write_bytes(b"partial")
    latest = store.latest()
    assert latest is not None and latest.id == previous
    got = await run_async(word_count(words), 1, mapping=_mapping(directory, restore=True), workers=2)
    assert _counts(got) == expected_counts(words)


class _Collected:
    """A result sink that keeps what it gets."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        self.records.extend(items)


async def test_a_checkpoint_before_a_restored_source_resumes_keeps_its_position(tmp_path: Path) -> None:
    """A barrier reaches a restored root before its interrupted call resumes (on worker processes, a worker
    that starts slower than the coordinator's next trigger): that checkpoint keeps the restored position, so a
    restore from it replays nothing the restored counts hold (it used to restart the source from its start)."""
    words = tmp_path / "words.txt"
    write_words(words, 100_000)
    directory = tmp_path / "ck"
    gate = tmp_path / "killed"
    graph = _held_word_count(words, gate, 5000)
    assert not await _run_until_killed(graph, _mapping(directory), 2, 5000, checkpointed=directory)
    store = CheckpointStore(directory)
    restored = store.latest()
    assert restored is not None
    position = restored.states[InstanceRef("lines", 0)]["outputs"]
    assert position > 0  # the source was in its call: the restored one resumes it
    mapping = _mapping(directory)
    plan = make_plan(word_count(words), mapping.plan_options(2, DEFAULT_BATCH_SIZE, DEFAULT_CREDITS))
    worker = Worker(plan, 0, feeds=resolve_inputs(plan.graph, 1), results=_Collected())
    coordinator = Coordinator(store, plan, 1.0, restored.id, None)
    gate = ResultGate(
        [ref for ref, actor in worker.actors.items() if actor.results],
        worker.results.emit,
        coordinator.commit_results,
        restored.id,
    )
    checkpoints = WorkerCheckpoints(worker, store, restored, restored.id, coordinator.add_parts, gate, interval=1)
    n = coordinator.next_id
    await checkpoints.trigger(n)  # before the run: the barrier comes first in the root's feed
    await asyncio.wait_for(worker.run(), 30)
    taken = store.latest()
    assert taken is not None and taken.id == n
    assert taken.states[InstanceRef("lines", 0)]["outputs"] == position
    got = await run_async(word_count(words), 1, mapping=_mapping(directory, restore=True), workers=2)
    assert _counts(got) == expected_counts(words)


class _HeldStore(CheckpointStore):
    """A store that writes the part of instance ``held`` only once ``release`` is set (in the writing thread)."""

    def __init__(self, directory: Path, held: InstanceRef) -> None:
        super().__init__(directory)
        self.held = held
        self.release = threading.Event()

    def write_part(self, n: int, ref: InstanceRef, data: bytes, finished: bool = False) -> dict[str, Any]:
        if ref == self.held:
            self.release.wait(30)
        return super().write_part(n, ref, data, finished)


async def test_a_worker_reports_the_parts_its_finished_instances_saved_before_its_final_states(
    tmp_path: Path,
) -> None:
    """Checkpoint 1 is triggered after an instance finished; its final state is written slowly while the
    worker's last instance finishes. The worker's final states say that instance saved checkpoint 1, so the
    part must be reported before them: the launcher reads nothing after the finals, and would wait for that
    part (and take no checkpoint) for ever."""
    plan = make_plan(word_count(tmp_path / "words.txt"), PlanOptions(workers=1))
    worker = Worker(plan, 0, feeds=resolve_inputs(plan.graph, 1), results=_Collected())
    refs = list(worker.actors)
    store = _HeldStore(tmp_path / "ck", held=refs[0])
    events: list[tuple[str, Any]] = []

    async def on_all_finished(finals: list[Any]) -> None:
        events.append(("finals", sorted(done for _, _, done in finals)))

    gate = ResultGate([], worker.results.emit, lambda n: asyncio.sleep(0), 0)
    checkpoints = WorkerCheckpoints(
        worker, store, None, 0, lambda n, parts: events.append(("saved", n)), gate, interval=1
    )
    checkpoints.on_all_finished = on_all_finished
    aligners = [worker.actors[ref].aligner for ref in refs]
    for aligner in aligners[:-1]:
        assert aligner is not None
        await checkpoints.finish(aligner, {"finished": True})
    try:
        async with asyncio.timeout(30):
            trigger = asyncio.ensure_future(checkpoints.trigger(1))  # writes refs[0]'s final state: held
            last = aligners[-1]
            assert last is not None
            finishing = asyncio.ensure_future(checkpoints.finish(last, {"finished": True}))
            for _ in range(100):  # it cannot end while that part is held (it ended within a turn on the old code)
                await asyncio.sleep(0)
            assert not finishing.done()
            store.release.set()
            await asyncio.gather(trigger, finishing)
    finally:
        store.release.set()  # a failure above must not leave the writing thread waiting
    assert events == [("saved", 1), ("finals", [1] * len(refs))]


async def test_the_coordinator_keeps_nothing_of_the_checkpoints_it_completed(tmp_path: Path) -> None:
    """A live run completes a checkpoint every second, for months: the coordinator kept the id of each one (a
    list that grew for as long as the run lasted, and that nothing read)."""
    plan = make_plan(_numbers(), PlanOptions())
    coordinator = Coordinator(CheckpointStore(tmp_path / "ck", keep=1), plan, 1.0, 0, None)

    async def complete(count: int) -> dict[str, int]:
        for _ in range(count):
            n = coordinator.take_id()
            coordinator.store.path(n).mkdir()  # where the instances' parts would be
            coordinator.add_parts(n, [{"pe": ref.pe, "index": ref.index, "size": 0} for ref in plan.instances()])
            await coordinator.commit_results(n)
        held = vars(coordinator).items()
        return {name: len(value) for name, value in held if isinstance(value, (list, dict, set, tuple))}

    assert await complete(3) == await complete(30)


@pytest.mark.parametrize("finished", [False, True])
async def test_a_suspend_takes_a_checkpoint_at_once_and_stops_the_run_unless_every_instance_finished(
    tmp_path: Path, finished: bool
) -> None:
    """The suspend's checkpoint is triggered at once, not an interval later, and stops the run once complete. A
    checkpoint made of final states only (every instance ran its postprocess before the trigger reached it: the
    run is ending by itself) comes too late: the run was reported suspended, not ended, though its postprocess had
    run (partial windows given out) and a restore resumed nothing."""
    store = CheckpointStore(tmp_path / "ck")
    plan = make_plan(_numbers(), PlanOptions())
    coordinator = Coordinator(store, plan, 30.0, 0, None)
    triggered: asyncio.Queue[int] = asyncio.Queue()
    driving = asyncio.create_task(coordinator.drive(triggered.put))
    try:
        async with asyncio.timeout(10):
            coordinator.suspend()
            n = await triggered.get()
            if finished:
                coordinator.add_parts(n, store.write_finals(n, [(ref, b"final") for ref in plan.instances()]))
            else:
                coordinator.add_parts(n, [store.write_part(n, ref, b"state") for ref in plan.instances()])
            await coordinator.commit_results(n)
            if finished:
                for _ in range(10):  # the coordinator's turns: it neither stops the run nor hurries a next one
                    await asyncio.sleep(0)
            else:
                await asyncio.wait({driving})
        if finished:
            assert not driving.done() and triggered.empty()  # the run's own end is awaited
        else:
            with pytest.raises(Suspended) as stopped:
                driving.result()
            assert (stopped.value.checkpoint, stopped.value.results_offset) == (n, None)
    finally:
        driving.cancel()
        await asyncio.gather(driving, return_exceptions=True)


async def test_a_finished_workers_stand_in_keeps_the_parts_its_instances_saved(tmp_path: Path) -> None:
    """A worker's instances all finish before the trigger of checkpoint n reaches it, one of them after it saved
    its part for n at barrier n (come first through another worker): the launcher writes final states only for
    the others; that snapshot stays (a final state there holds what came after the barrier, which the
    snapshots downstream do not)."""
    store = CheckpointStore(tmp_path / "ck")
    plan = make_plan(word_count(tmp_path / "words.txt"), PlanOptions(workers=2))
    coordinator = Coordinator(store, plan, 1.0, 0, None)
    launcher = LauncherCheckpoints(Session(Checkpointing(store.directory), store, None, coordinator, _Collected()), {})
    await launcher._trigger(1)
    saved, stood_in = plan.instances(1)
    snapshot = store.write_part(1, saved, b"at barrier 1")  # what the worker wrote itself
    await launcher.receive(1, Finals([(saved, b"final", 1), (stood_in, b"final", 0)]))
    assert (store.path(1) / snapshot["file"]).read_bytes() == b"at barrier 1"
    assert (store.path(1) / f"{stood_in.pe}.{stood_in.index}.state").read_bytes() == b"final"


async def test_a_results_commit_waits_for_the_earlier_results_the_gate_is_still_handing_on() -> None:
    """Commit 1 hands on the results ``p`` wrote after barrier 1 (held while ``q`` had not passed it), to a reader
    that is behind: handing them on waits. Meanwhile ``p`` passes barrier 2. Commit 2 must count them (they
    were written before barrier 2); it used to be made at once, before them, so a restore from checkpoint 2
    truncated them away (seen as a block of a PE's results missing after a restore)."""
    written: list[str] = []
    commits: dict[int, int] = {}
    behind, caught_up = asyncio.Event(), asyncio.Event()

    async def emit(pe: str, port: str, items: list[str]) -> None:
        written.extend(items)  # the file first, then the reader, as ResultsLog does
        if items == ["p after 1"]:
            behind.set()
            await caught_up.wait()

    async def commit(n: int) -> None:
        commits[n] = len(written)

    gate = ResultGate(["p", "q"], emit, commit, 0)
    async with asyncio.timeout(30):
        await gate.trigger(1)
        await gate.mark("p", 1)
        await gate.emit("p", "p", "output", ["p after 1"])
        await gate.emit("p", "p", "output", ["p after 1, again"])
        handing_on = asyncio.ensure_future(gate.finish("q"))  # q ends: commit 1, then p's results go on
        await behind.wait()
        marking = asyncio.ensure_future(gate.mark("p", 2))  # runs before the reader catches up
        caught_up.set()
        await asyncio.gather(handing_on, marking)
    assert commits == {1: 0, 2: 2}
    assert written == ["p after 1", "p after 1, again"]


class _SignalledStore(CheckpointStore):
    """A store whose writes of instance ``held``'s part wait for ``release``; ``writing`` is set when one starts."""

    def __init__(self, directory: Path, held: InstanceRef) -> None:
        super().__init__(directory)
        self.held = held
        self.writing = threading.Event()
        self.release = threading.Event()

    def write_part(self, n: int, ref: InstanceRef, data: bytes, finished: bool = False) -> dict[str, Any]:
        if ref == self.held:
            self.writing.set()
            self.release.wait(30)
        return super().write_part(n, ref, data, finished)


async def test_a_run_that_ends_inside_a_trigger_commits_the_results_written_after_its_barrier(tmp_path: Path) -> None:
    """The coordinator triggers checkpoint 1 and, before its trigger reaches the results gate, writes the final
    state of an instance that finished (``feeder``). Meanwhile ``source`` passes barrier 1 and writes a result,
    which waits at the gate for ``pair``, then both end, ``pair`` without barrier 1 (its input had ended).
    Every result-writing instance has finished, so the run is over and its end cancels the coordinator inside
    that trigger (the async mapping's ``drive``): the gate never learnt of checkpoint 1, held the result for
    ever, and the run's last checkpoint committed the results file without it (seen as results missing from
    finished runs, in memory and in the file)."""
    graph = WorkflowGraph()
    source, feeder, pair = Numbers(), Numbers(), _Pair()
    source.id, feeder.id, pair.id = "source", "feeder", "pair"
    graph.add(source)
    graph.connect(feeder, "output", pair, "input")
    plan = make_plan(graph, PlanOptions(workers=1))
    collected = _Collected()
    results = tmp_path / "results.jsonl"
    log = ResultsLog(str(results), collected, None)
    worker = Worker(plan, 0, feeds=resolve_inputs(plan.graph, 1), results=log)
    store = _SignalledStore(tmp_path / "ck", held=InstanceRef("feeder", 0))
    coordinator = Coordinator(store, plan, 1.0, 0, log)
    producers = [ref for ref, actor in worker.actors.items() if actor.results]
    gate = ResultGate(producers, worker.results.emit, coordinator.commit_results, 0)
    checkpoints = WorkerCheckpoints(worker, store, None, 0, coordinator.add_parts, gate, interval=1)
    first, ended, last = (worker.actors[InstanceRef(pe, 0)] for pe in ("source", "feeder", "pair"))
    assert first.aligner is not None and ended.aligner is not None and last.aligner is not None
    try:
        async with asyncio.timeout(30):
            await ended.aligner.finished()
            n = coordinator.take_id()
            trigger = asyncio.ensure_future(checkpoints.trigger(n))  # the source first, then feeder's part: held
            assert await asyncio.to_thread(store.writing.wait, 30)
            await first.aligner.snapshot(n)
            await first.results_sink.emit("source", "output", ["after barrier 1"])
            await first.aligner.finished()
            await last.aligner.finished()
            trigger.cancel()  # every instance finished: the run is over
            store.release.set()
            await asyncio.gather(trigger, return_exceptions=True)
            await checkpoints.final_checkpoint(coordinator)
    finally:
        store.release.set()  # a failure above must not leave the writing thread waiting
        log.close()
    assert collected.records == ["after barrier 1"]
    assert [json.loads(line)["data"] for line in results.read_text().splitlines()] == ["after barrier 1"]
    final = store.latest()
    assert final is not None and final.results_offset == results.stat().st_size


async def test_a_results_pipe_whose_reader_left_is_named_not_blamed_on_a_pe(tmp_path: Path) -> None:
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that opening it for writing does not wait
    log = ResultsLog(str(fifo), _Collected(), None)
    os.close(reader)
    await log.emit("pe", "output", [1, 2])
    with pytest.raises(CheckpointError, match=f"^cannot write results to {fifo}: its reader went away$"):
        log.commit()
    log.close()


def test_restore_without_checkpoint_fails_clearly(tmp_path: Path, words: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint") as failed:
        run(word_count(words), 1, mapping=_mapping(tmp_path / "empty", restore=True))
    assert "does not exist" not in str(failed.value)


def test_restore_from_a_directory_that_does_not_exist_says_so(tmp_path: Path, words: Path) -> None:
    """It said `no complete checkpoint in DIR`, and made DIR."""
    nowhere = tmp_path / "nowhere"
    with pytest.raises(CheckpointError) as failed:
        run(word_count(words), 1, mapping=_mapping(nowhere, restore=True))
    assert str(failed.value) == f"--restore: no complete checkpoint in {nowhere}: the directory does not exist"
    assert not nowhere.exists()


async def test_two_runs_of_one_process_cannot_share_a_checkpoint_directory(tmp_path: Path, words: Path) -> None:
    """While a run takes checkpoints into a directory, another run (here in the same process) is refused at once;
    once the first run is over (here aborted), the directory is free: a restore takes it."""
    directory = tmp_path / "ck"
    checkpointed = asyncio.Event()
    graph = _held_word_count(words, tmp_path / "never", 0)  # held until aborted
    with on_completed(lambda n: checkpointed.set()):
        async with start(graph, 1, mapping=_mapping(directory), workers=2) as first:
            results = asyncio.ensure_future(first.results())
            waiter = asyncio.ensure_future(checkpointed.wait())
            await asyncio.wait({results, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            assert waiter.done() and not results.done()  # a checkpoint of the run under way
            with pytest.raises(CheckpointError) as refused:
                await run_async(word_count(words), 1, mapping=_mapping(directory))
            assert str(refused.value).startswith(
                f"checkpoint directory {directory} is in use by another run (pid {os.getpid()}): "
            )
            results.cancel()
            await asyncio.gather(results, return_exceptions=True)
    got = await run_async(word_count(words), 1, mapping=_mapping(directory, restore=True), workers=2)
    assert _counts(got) == expected_counts(words)


class Numbers(ProducerPE):
    """Counts its calls: a -i N or list feed is replayed from the checkpoint's index."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def produce(self) -> int:
        self.calls += 1
        if ckpt_workflows.HOOK is not None and self.calls % 1000 == 0:
            ckpt_workflows.HOOK(self.calls)
        return self.calls


NUMBERS = 200_000
"""Enough that checkpoints every 20 ms complete well before the run could end (about 0.1 s of work
on async with its batches of 1,024 cheap items), so the kill after one is sure to come first."""


def _numbers(root_parallelism: int | None = None) -> WorkflowGraph:
    graph = WorkflowGraph()
    source, pair, count = Numbers(), _Pair(), Count()
    source.parallelism = root_parallelism
    source.id, pair.id, count.id = "numbers", "pair", "count"
    graph.connect(source, "output", pair, "input")
    graph.connect(pair, "output", count, "input")
    return graph


class _Pair(ckpt_workflows.Split):
    def process_item(self, number: int) -> Any:
        self.write("output", (str(number % 7), 1))


class _PlainCount(Count):
    """:class:`Count` without ``keyed_state``: its instances' counts are plain state, each their own."""

    keyed_state = None


async def test_restore_with_another_n_refuses_state_it_cannot_share_out(tmp_path: Path) -> None:
    """Instance ``i`` restored with another -n takes the state of old instance ``i % old``: plain counts were
    doubled (-n 2 -> 4) or lost (4 -> 2) silently. A PE whose instances hold different state, none of it keyed,
    is refused by name; with the same -n, it restores exactly."""
    directory = tmp_path / "ck"
    graph = _numbers_joined(("numbers", "pair"), ("pair", "count"), count=_PlainCount())
    assert not await _run_until_killed(graph, _mapping(directory), 2, 3000, NUMBERS, directory)
    refused = (
        r"^PE count had 2 instances in checkpoint \d+, now 3, and its state \(counts, seen\) is not as built, none of"
        r" it in keyed_state, and its inputs \(group_by\[0\]\) are not all broadcast"
    )
    with pytest.raises(CheckpointError, match=refused):
        await run_async(graph, NUMBERS, mapping=_mapping(directory, restore=True), workers=3)
    got = await run_async(graph, NUMBERS, mapping=_mapping(directory, restore=True), workers=2)
    assert _counts(got) == {str(k): sum(1 for n in range(1, NUMBERS + 1) if n % 7 == k) for k in range(7)}
    # The run's last checkpoint: every instance finished, none runs again, so another -n takes it.
    assert len(await run_async(graph, NUMBERS, mapping=_mapping(directory, restore=True), workers=3)) == 0


async def test_restore_of_one_instance_with_another_n_refuses_its_plain_state(tmp_path: Path) -> None:
    """One instance's state is trivially "the same in every instance": a plain count saved with -n 1 was copied to
    each of 3 instances, tripling every count. It is refused by name, unless it is as the PE was built."""
    directory = tmp_path / "ck"
    graph = _numbers_joined(("numbers", "pair"), ("pair", "count"), count=_PlainCount())
    assert not await _run_until_killed(graph, _mapping(directory), 1, 3000, NUMBERS, directory)
    refused = r"^PE count had 1 instance in checkpoint \d+, now 3, and its state \(counts, seen\) is not as built"
    with pytest.raises(CheckpointError, match=refused):
        await run_async(graph, NUMBERS, mapping=_mapping(directory, restore=True), workers=3)
    got = await run_async(graph, NUMBERS, mapping=_mapping(directory, restore=True), workers=1)
    assert _counts(got) == {str(k): sum(1 for n in range(1, NUMBERS + 1) if n % 7 == k) for k in range(7)}


class _Total(IterativePE):
    """Counts every item; its input is broadcast (``ALL``), so each instance counts them all."""

    def __init__(self) -> None:
        super().__init__(grouping=ALL)
        self.total = 0

    def process_item(self, item: Any) -> None:
        self.total += 1

    def postprocess(self) -> None:
        self.write("output", self.total)


async def test_restore_with_another_n_copies_the_state_of_a_broadcast_input(tmp_path: Path) -> None:
    """Every instance of a PE whose inputs are all broadcast sees every item: one instance's state is what each of
    any number would hold, so a restore with another -n copies it (the PE ``pair`` before it, stateless, too)."""
    directory = tmp_path / "ck"
    graph = _numbers_joined(("numbers", "pair"), ("pair", "count"), count=_Total())
    assert not await _run_until_killed(graph, _mapping(directory), 1, 3000, NUMBERS, directory)
    got = await run_async(graph, NUMBERS, mapping=_mapping(directory, restore=True), workers=3)
    assert list(got.data()) == [NUMBERS] * 3


def _numbers_joined(*edges: tuple[str, str], count: Count | None = None) -> WorkflowGraph:
    """The PEs of :func:`_numbers` (ids ``numbers``, ``pair``, ``count``: ``count`` if given), ``output`` to
    ``input`` by ``edges``."""
    pes: dict[str, Any] = {"numbers": Numbers(), "pair": _Pair(), "count": count if count is not None else Count()}
    graph = WorkflowGraph()
    for source, dest in edges:
        pes[source].id, pes[dest].id = source, dest
        graph.connect(pes[source], "output", pes[dest], "input")
    return graph


async def test_count_feed_is_replayed_from_its_index(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    finished = await _run_until_killed(_numbers(), _mapping(directory), 2, 5000, NUMBERS, directory)
    assert not finished and CheckpointStore(directory).latest() is not None
    got = await run_async(_numbers(), NUMBERS, mapping=_mapping(directory, restore=True), workers=2)
    expected = {str(k): sum(1 for n in range(1, NUMBERS + 1) if n % 7 == k) for k in range(7)}
    assert _counts(got) == expected


async def test_restore_refuses_another_graph_and_another_root_parallelism(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    assert not await _run_until_killed(_numbers(), _mapping(directory), 2, 3000, NUMBERS, directory)
    # each names the directory: the operator may have given the directory of another workflow
    named = rf"checkpoint \d+ in {re.escape(str(directory))} "
    with pytest.raises(CheckpointError, match=named + "has no PE lines: it was taken of another graph"):
        await run_async(word_count(tmp_path / "none.txt"), 1, mapping=_mapping(directory, restore=True))
    with pytest.raises(CheckpointError, match=named + "has PE count, which this workflow has not: it was taken of"):
        await run_async(_numbers_joined(("numbers", "pair")), NUMBERS, mapping=_mapping(directory, restore=True))
    rewired = _numbers_joined(("numbers", "pair"), ("numbers", "count"))
    rewiring = r"was taken of another graph: only this workflow connects numbers\.output -> count\.input$"
    with pytest.raises(CheckpointError, match=named + rewiring):
        await run_async(rewired, NUMBERS, mapping=_mapping(directory, restore=True))
    with pytest.raises(CheckpointError) as refused:  # it said "had 1 instances", and not what to do
        await run_async(_numbers(root_parallelism=2), NUMBERS, mapping=_mapping(directory, restore=True))
    assert re.fullmatch(
        r"root PE numbers had 1 instance in checkpoint \d+, now 2: a source's position in its input cannot be shared"
        r" out among another number of instances \(restore it with 1 instance\)",
        str(refused.value),
    )


def _word_of(item: tuple[str, int]) -> str:
    return item[0]


def _numbers_grouped(grouping: Any) -> WorkflowGraph:
    """:func:`_numbers` with ``pair`` connected to ``count`` by ``grouping`` (``count`` declares ``group_by(0)``)."""
    graph = WorkflowGraph()
    source, pair, count = Numbers(), _Pair(), Count()
    source.id, pair.id, count.id = "numbers", "pair", "count"
    graph.connect(source, "output", pair, "input")
    graph.connect(pair, "output", count, "input", grouping=grouping)
    return graph


@dataclass(frozen=True)
class _KeyedBy(Grouping):
    """A grouping of a user's, as the built-in ones are written: a frozen dataclass, here holding a function."""

    key: Callable[[Any], Any]

    def router(self, count: int, start: int, sender: str, dest: str) -> Router:
        raise NotImplementedError


def test_a_grouping_is_recorded_without_an_address() -> None:
    """A dataclass grouping holding a function printed its address, which differs from process to process: a
    restore of the unchanged graph was refused as grouped otherwise."""
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", wf.Double(), "input", grouping=_KeyedBy(_word_of))
    (name,) = _groupings_of_edges(make_plan(graph, PlanOptions())).values()
    assert name == "_KeyedBy"


async def test_restore_refuses_a_connection_grouped_otherwise(tmp_path: Path) -> None:
    """A grouping edited between suspend and restore (``group_by(0)`` to ``group_by(1)``) was restored: the keyed
    state stayed where the old keys went, and the counts came out split, two records a word."""
    directory = tmp_path / "ck"
    assert not await _run_until_killed(_numbers(), _mapping(directory), 2, 3000, NUMBERS, directory)
    named = rf"checkpoint \d+ in {re.escape(str(directory))} was taken of another graph: its connection"
    for grouping, shown in ((group_by(1), r"group_by\[1\]"), (group_by(key=_word_of), r"group_by\(_word_of\)"),
                            (group_by(0, 1), r"group_by\[0, 1\]")):  # fmt: skip
        regrouped = rf" pair\.output -> count\.input is grouped group_by\[0\], this workflow's {shown} \("
        with pytest.raises(CheckpointError, match=named + regrouped):
            await run_async(_numbers_grouped(grouping), NUMBERS, mapping=_mapping(directory, restore=True), workers=2)
    # a checkpoint whose manifest records no groupings (written before they were) restores as before
    store = CheckpointStore(directory)
    latest = store.latest()
    assert latest is not None
    newest = store.path(latest.id) / "MANIFEST.json"
    manifest = json.loads(newest.read_text())
    newest.write_text(json.dumps({key: value for key, value in manifest.items() if key != "groupings"}))
    got = await run_async(_numbers(), NUMBERS, mapping=_mapping(directory, restore=True), workers=2)
    assert _counts(got) == {str(k): sum(1 for n in range(1, NUMBERS + 1) if n % 7 == k) for k in range(7)}


def test_results_file_that_cannot_be_written_fails_clearly(tmp_path: Path, words: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot write results to .*missing/out\.jsonl"):
        run(word_count(words), 1, mapping=_mapping(tmp_path / "ck", tmp_path / "missing" / "out.jsonl"))


@pytest.mark.parametrize("mapping", ["async", "multi"])
def test_a_results_file_on_a_full_disk_fails_naming_it(tmp_path: Path, words: Path, mapping: str) -> None:
    """A write that fails (``/dev/full`` is always full) names the file, on the engine's side (async) and on the
    launcher's (multi); the failed flush of what is left when the file is closed does not hide it."""
    checkpointed = get_mapping(mapping)
    checkpointed.checkpointing = Checkpointing(tmp_path / "ck", results_path="/dev/full")
    with pytest.raises(CheckpointError) as failed:
        run(word_count(words), 1, mapping=checkpointed, workers=2)
    assert str(failed.value) == "cannot write results to /dev/full: No space left on device"


def test_a_results_file_that_is_a_stream_is_flushed_not_synced_and_never_truncated(tmp_path: Path, words: Path) -> None:
    """``/dev/null`` (as a named pipe) cannot be synced (``EINVAL``) nor truncated: it is written as a stream, with
    no length in the manifest, also by a restore of a checkpoint that committed a length of a regular file."""
    directory, results = tmp_path / "ck", tmp_path / "out.jsonl"
    got = run(word_count(words), 1, mapping=_mapping(directory, Path(os.devnull)), workers=2)
    assert _counts(got) == expected_counts(words)
    latest = CheckpointStore(directory).latest()
    assert latest is not None and latest.results_offset is None
    run(word_count(words), 1, mapping=_mapping(directory, results), workers=2)
    latest = CheckpointStore(directory).latest()
    assert latest is not None and latest.results_offset == results.stat().st_size > 0
    run(word_count(words), 1, mapping=_mapping(directory, Path(os.devnull), restore=True), workers=2)


def test_checkpoints_under_a_users_mpiexec_are_refused(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py")
    from aiod4p.mappings.mpi import MpiMapping

    mapping = MpiMapping()
    mapping.size = 2  # as under `mpiexec -n 2 aiod4p run ...`
    mapping.checkpointing = Checkpointing(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoints need aiod4p to launch the mpiexec"):
        run(_numbers(), 10, mapping=mapping)


# -- the state API -------------------------------------------------------------------------
class Custom(ckpt_workflows.Split):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def snapshot(self) -> Any:
        return {"t": self.total}

    def restore(self, state: Any) -> None:
        self.total = state["t"] + 1000


def test_snapshot_and_restore_override_the_attributes() -> None:
    pe = Custom()
    pe.total = 5
    state = capture(pe, None)
    assert state == {"custom": {"t": 5}}
    other = Custom()
    restore_state(other, state, [state], None, 0, 1)
    assert other.total == 1005


def test_default_state_is_the_pe_attributes_without_runtime_ones() -> None:
    pe = Count()
    pe.seen = 3
    state = capture(pe, pe.inputs["input"].grouping)  # type: ignore[arg-type]
    assert state["attributes"] == {"seen": 3}
    assert "keyed" in state


def test_keyed_state_hashes_each_key_once_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance's snapshots remember every key's group: the keys are hashed at its first snapshot only."""
    import aiod4p._groupings

    hashed: list[Any] = []
    real = aiod4p._groupings.stable_hash

    def counting(key: Any) -> int:
        hashed.append(key)
        return real(key)

    monkeypatch.setattr(aiod4p._groupings, "stable_hash", counting)
    pe = Count()
    grouping = pe.inputs["input"].grouping
    pe.counts = {w: i for i, w in enumerate(ckpt_workflows.WORDS)}
    slots: dict[Any, int] = {}
    first = capture(pe, grouping, slots)  # type: ignore[arg-type]
    assert len(hashed) == len(pe.counts)
    pe.counts = {w: i + 1 for i, w in enumerate(ckpt_workflows.WORDS)}
    second = capture(pe, grouping, slots)  # type: ignore[arg-type]
    assert len(hashed) == len(pe.counts)
    assert second["keyed"] == capture(pe, grouping)["keyed"]  # type: ignore[arg-type]
    assert {k: set(v) for k, v in first["keyed"].items()} == {k: set(v) for k, v in second["keyed"].items()}


def test_store_syncs_a_checkpoint_folder_once_for_all_its_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts are synced (data) each, their directory entries once, before the manifest: not once per part."""
    import aiod4p._checkpoint

    synced: list[Path] = []
    real = aiod4p._checkpoint._fsync_dir

    def counting(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(aiod4p._checkpoint, "_fsync_dir", counting)
    store = CheckpointStore(tmp_path / "ck")
    parts = [store.write_part(1, InstanceRef("count", i), pickle.dumps({"i": i})) for i in range(4)]
    assert synced == []
    store.commit(1, {"version": 1, "id": 1, "parallelism": {"count": 4}, "parts": parts, "results_offset": None})
    assert synced == [store.path(1), store.path(1)]  # the parts' names, then the manifest's
    latest = store.latest()
    assert latest is not None and latest.states[InstanceRef("count", 3)] == {"i": 3}


def test_keyed_state_moves_to_the_instance_its_keys_reach() -> None:
    grouping = Count().inputs["input"].grouping
    old = []
    for index in range(2):
        pe = Count()
        pe.counts = {w: i for i, w in enumerate(ckpt_workflows.WORDS) if (index == 0) == (i % 2 == 0)}
        old.append(capture(pe, grouping))  # type: ignore[arg-type]
    assert all(slot < KEY_GROUPS for state in old for slot in state["keyed"])
    merged: dict[str, int] = {}
    from aiod4p._state import keyed_owner

    for index in range(3):
        pe = Count()
        restore_state(pe, old[index % 2], old, grouping, index, 3)  # type: ignore[arg-type]
        assert all(keyed_owner(grouping, key, 3) == index for key in pe.counts)  # type: ignore[arg-type]
        merged.update(pe.counts)
    assert merged == {w: i for i, w in enumerate(ckpt_workflows.WORDS)}


class Unpicklable(ckpt_workflows.Split):
    def preprocess(self) -> None:
        self.lock = threading.Lock()  # a resource made in preprocess (runs copy PEs), then part of the state

    def process_item(self, item: Any) -> None:
        pass


def test_unpicklable_state_names_the_pe(tmp_path: Path) -> None:
    graph = WorkflowGraph()
    graph.connect(Numbers(), "output", Unpicklable(), "input")
    with pytest.raises(CheckpointError, match="Unpicklable"):
        run(graph, 200_000, mapping=_mapping(tmp_path / "ck", interval=0.001))


def test_keyed_state_needs_a_group_by_input() -> None:
    with pytest.raises(CheckpointError, match="keyed_state needs a group-by input"):
        capture(Count(), None)


def test_keyed_state_must_name_a_dict() -> None:
    pe = Count()
    pe.counts = 3  # type: ignore[assignment]
    with pytest.raises(CheckpointError, match="not a dict"):
        capture(pe, pe.inputs["input"].grouping)  # type: ignore[arg-type]


class KeyedWithoutGroupBy(IterativePE):
    """Declares keyed state on an input that is not grouped by key."""

    keyed_state = "counts"

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[int, int] = {}

    def process_item(self, item: int) -> None:
        self.counts[item] = self.counts.get(item, 0) + 1


class CountsNotADict(Count):
    def __init__(self) -> None:
        super().__init__()
        self.counts = 3  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("pe", "message"),
    [(KeyedWithoutGroupBy, "keyed_state needs a group-by input"), (CountsNotADict, "'counts', which is not a dict")],
)
def test_a_misdeclared_keyed_state_fails_the_run_before_it_starts(
    pe: type[IterativePE], message: str, tmp_path: Path
) -> None:
    """Found before any item is processed, not at the first checkpoint (which a run shorter than the interval
    never takes: it then ran to its end with a declaration that every later run would fail on)."""
    graph = WorkflowGraph()
    graph.connect(Numbers(), "output", pe(), "input")
    with pytest.raises(CheckpointError, match=message):
        run(graph, 100, mapping=_mapping(tmp_path / "ck", interval=3600))
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


# -- the command line ------------------------------------------------------------------------
def test_cli_options_need_a_checkpoint_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "x:y", "--restore"]) == 2
    assert "--checkpoint-dir" in capsys.readouterr().err


def test_cli_refuses_stdin_dead_letters_it_would_lose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpointed run writes its ``--results FILE`` itself, and ``--stdin``'s dead letters do not pass through
    it: they were lost (the file lacked them, the summary counted them). ``--results -`` keeps them."""
    common = ["run", "x:y", "--stdin", "p", "--on-bad", "dead-letter", "--checkpoint-dir", str(tmp_path)]
    assert main([*common, "--results", str(tmp_path / "out.jsonl")]) == 2
    assert "--on-bad dead-letter cannot go with --checkpoint-dir and --results FILE" in capsys.readouterr().err
    assert main([*common, "--results", "-"]) == 1  # on to loading the workflow, which does not exist
    assert "--on-bad" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint-interval", "0"], "argument --checkpoint-interval: must be positive, not 0"),
        (["--checkpoint-interval", "soon"], "argument --checkpoint-interval: not a number: 'soon'"),
        (["--checkpoint-keep", "0"], "argument --checkpoint-keep: must be at least 1, not 0"),
        (["--restarts", "-1"], "argument --restarts: must be at least 0, not -1"),
    ],
)
def test_cli_bad_checkpoint_values_are_usage_errors(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "x:y", "--checkpoint-dir", str(tmp_path), *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interval": 0}, "Checkpointing: interval must be positive, not 0"),
        ({"keep": 0}, "Checkpointing: keep must be at least 1, not 0"),
        ({"restarts": -1}, "Checkpointing: restarts must be at least 0, not -1"),
        (
            {"results_counted": print},
            "Checkpointing: results_counted needs results_path, the file that gets the results",
        ),
    ],
)
def test_bad_checkpointing_values_name_the_argument_given(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    """From Python, the error names the argument of Checkpointing, not the CLI option the caller never gave."""
    with pytest.raises(ValueError, match=f"^{message}$"):
        Checkpointing(tmp_path, **options)


def test_cli_refuses_a_mapping_without_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "x:y", "-m", "storm", "--checkpoint-dir", str(tmp_path)]) == 2
    assert "does not take checkpoints" in capsys.readouterr().err


def test_cli_restores_and_writes_results_once(tmp_path: Path, words: Path) -> None:
    target = tmp_path / "wf.py"
    # The input waits for a checkpoint after 100 lines: a fast run could otherwise end before its first one.
    target.write_text(held_word_count_module(words, tmp_path / "ck"))
    results = tmp_path / "out.jsonl"
    common = [str(target), "-i", "1", "--checkpoint-dir", str(tmp_path / "ck"), "--results", str(results), "-q"]
    assert main(["run", *common, "--checkpoint-interval", "0.02"]) == 0
    assert _file_counts(results) == expected_counts(words)
    assert main(["run", *common, "--restore"]) == 0  # from the last checkpoint: the results are not written twice
    assert _file_counts(results) == expected_counts(words)


def test_cli_restore_without_the_results_file_says_where_the_results_are(
    tmp_path: Path, words: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The restored run prints only the results after the checkpoint; the others are in the file the
    checkpointed run wrote, which also holds an uncommitted tail that this run does not truncate."""
    target = tmp_path / "wf.py"
    target.write_text(held_word_count_module(words, tmp_path / "ck"))
    common = [str(target), "-i", "1", "--checkpoint-dir", str(tmp_path / "ck")]
    assert main(["run", *common, "--checkpoint-interval", "0.02", "--results", str(tmp_path / "out.jsonl")]) == 0
    capfd.readouterr()
    assert main(["run", *common, "--restore"]) == 0
    said = capfd.readouterr().err
    assert "committed" in said and "give --results FILE to continue it exactly once" in said


# A workflow file for `aiod4p run -i 1` (PE ids Numbers0, Tens1): numbers 0 to FLOW_NUMBERS - 1 (environment;
# from where a restore resumes them), each a result times 10; then, with FLOW_HOLD=1, once a complete checkpoint
# in the directory committed results (with no numbers: once one completed), "held" on stderr, and no end: the
# run goes on taking checkpoints until it is killed.
HELD_NUMBERS_FLOW = """\
import asyncio, json, os, sys

from aiod4p import IterativePE, WorkflowGraph
from aiod4p.sources import SourcePE

DIRECTORY = {directory!r}


def committed():
    \"\"\"The longest results length committed by a complete checkpoint in DIRECTORY; None with no checkpoint.\"\"\"
    offsets = []
    for name in os.listdir(DIRECTORY):
        try:
            with open(os.path.join(DIRECTORY, name, "MANIFEST.json")) as manifest:
                offsets.append(json.load(manifest)["results_offset"] or 0)
        except (OSError, ValueError):
            pass
    return max(offsets, default=None)


class Stream:
    def __init__(self):
        self.start, self.count = 0, int(os.environ.get("FLOW_NUMBERS", "0"))

    def seek(self, offset):
        self.start = offset

    def __aiter__(self):
        return self.numbers()

    async def numbers(self):
        for number in range(self.start, self.count):
            yield number
        if os.environ.get("FLOW_HOLD") == "1":
            while committed() is None or (self.count and not committed()):
                await asyncio.sleep(0.01)  # ok-sleep: polls the files the run writes
            print("held", file=sys.stderr, flush=True)
            await asyncio.Event().wait()


class Numbers(SourcePE):
    def open(self):
        return Stream()


class Tens(IterativePE):
    def process_item(self, number):
        return number * 10


graph = WorkflowGraph()
graph.connect(Numbers(), "output", Tens(), "input")
"""


def _numbers_run(tmp_path: Path, results: Path, *options: str) -> list[str]:
    """The arguments of `aiod4p run` of :data:`HELD_NUMBERS_FLOW`, checkpoints in ``tmp_path/ck``, into ``results``."""
    flow = tmp_path / "held_numbers.py"
    flow.write_text(HELD_NUMBERS_FLOW.format(directory=str(tmp_path / "ck")))
    checkpoints = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-interval", "0.02"]
    return ["run", str(flow), "-i", "1", *checkpoints, "--results", str(results), "-q", *options]


def _numbers_env(numbers: int, hold: bool = False) -> dict[str, str]:
    return {**os.environ, "FLOW_NUMBERS": str(numbers), "FLOW_HOLD": "1" if hold else "0"}


@contextlib.contextmanager
def _held(tmp_path: Path, results: Path, numbers: int) -> Iterator[subprocess.Popen[str]]:
    """A real `aiod4p run` of :data:`HELD_NUMBERS_FLOW` with ``numbers``, under way and held once a checkpoint
    committed them (its stderr said "held"); when the block ends it is killed (SIGKILL), as a crash would."""
    process = aiod4p_process(*_numbers_run(tmp_path, results), env=_numbers_env(numbers, hold=True))
    try:
        assert process.stderr is not None
        said = process.stderr.readline()  # "held", or the run's error
        assert said == "held\n", said
        yield process
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)


def _crashed_with_results(tmp_path: Path, results: Path, numbers: int) -> tuple[int, int]:
    """A run killed once a checkpoint committed its results; the newest complete checkpoint and its results length."""
    with _held(tmp_path, results, numbers):
        pass
    latest = CheckpointStore(tmp_path / "ck").latest()
    assert latest is not None and latest.results_offset is not None
    assert results.stat().st_size >= latest.results_offset
    return latest.id, latest.results_offset


def test_cli_restore_refuses_a_results_file_shorter_than_its_checkpoint_committed(tmp_path: Path) -> None:
    """It padded the file with NUL bytes up to the committed length (invalid JSON Lines) and exited 0."""
    results = tmp_path / "out.jsonl"
    checkpoint, offset = _crashed_with_results(tmp_path, results, 50)
    assert offset > 0
    short = results.read_bytes()[: offset // 2]
    results.write_bytes(short)  # rotated, or partly lost, since
    done = aiod4p_cli(*_numbers_run(tmp_path, results, "--restore"), env=_numbers_env(50), timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(
        f"aiod4p: error: the results file {results} is {len(short)} bytes, shorter than the {offset} bytes"
        f" checkpoint {checkpoint} in {tmp_path / 'ck'} committed: "
    ), done.stderr
    assert results.read_bytes() == short  # nothing written


def test_cli_restore_refuses_a_missing_results_file_its_checkpoint_committed_to(tmp_path: Path) -> None:
    """It failed with `cannot write results to FILE: No such file or directory`, as if its directory were missing."""
    results = tmp_path / "out.jsonl"
    checkpoint, offset = _crashed_with_results(tmp_path, results, 50)
    assert offset > 0
    results.unlink()
    done = aiod4p_cli(*_numbers_run(tmp_path, results, "--restore"), env=_numbers_env(50), timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(
        f"aiod4p: error: the results file of the checkpointed run is missing: {results} (checkpoint {checkpoint}"
        f" in {tmp_path / 'ck'} committed {offset} bytes of it)"
    ), done.stderr
    assert not results.exists()


def test_cli_restore_creates_a_missing_results_file_its_checkpoint_committed_nothing_to(tmp_path: Path) -> None:
    """A checkpoint that committed 0 bytes: the restore creates the file and goes on (it failed as above)."""
    results = tmp_path / "out.jsonl"
    _, offset = _crashed_with_results(tmp_path, results, 0)
    assert offset == 0
    results.unlink()
    done = aiod4p_cli(*_numbers_run(tmp_path, results, "--restore"), env=_numbers_env(5), timeout=60)
    assert done.returncode == 0, done.stderr
    assert [record["data"] for record in json_lines(results)] == [0, 10, 20, 30, 40]


def test_cli_a_checkpoint_directory_in_use_by_another_run_is_refused(tmp_path: Path) -> None:
    """Two runs wrote the same chk-NNN folders, unwarned. The second now fails at once, writing nothing; the first's
    lock goes with its process, even killed by SIGKILL: a restore then takes the directory."""
    results, other = tmp_path / "out.jsonl", tmp_path / "other.jsonl"
    with _held(tmp_path, results, 5) as first:
        done = aiod4p_cli(*_numbers_run(tmp_path, other), env=_numbers_env(5), timeout=60)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(
            f"aiod4p: error: checkpoint directory {tmp_path / 'ck'} is in use by another run (pid {first.pid}): "
        ), done.stderr
        assert not other.exists()
    done = aiod4p_cli(*_numbers_run(tmp_path, results, "--restore"), env=_numbers_env(5), timeout=60)
    assert done.returncode == 0, done.stderr
    assert [record["data"] for record in json_lines(results)] == [0, 10, 20, 30, 40]


def test_state_pickles_across_processes(tmp_path: Path, words: Path) -> None:
    directory = tmp_path / "ck"
    run(word_count(words), 1, mapping=_mapping(directory), workers=2)
    latest = CheckpointStore(directory).latest()
    assert latest is not None
    assert all(pickle.loads(pickle.dumps(state)) == state for state in latest.states.values())
    assert os.path.exists(CheckpointStore(directory).path(latest.id) / MANIFEST)


def _total(items: list[tuple[str, int]]) -> int:
    return sum(number for _, number in items)


class _Keyed(ckpt_workflows.Split):
    def process_item(self, number: int) -> Any:
        self.write("output", (str(number % 7), number))


def _windows() -> WorkflowGraph:
    graph = WorkflowGraph()
    source, pair, window = Numbers(), _Keyed(parallelism=1), CountWindow(5, key=0, aggregate=_total)
    source.id, pair.id, window.id = "numbers", "pair", "window"
    graph.connect(source, "output", pair, "input")
    graph.connect(pair, "output", window, "input")
    return graph


async def test_keyed_windows_are_checkpointed_and_move_with_their_keys(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    plain = await run_async(_windows(), NUMBERS, workers=2)
    finished = await _run_until_killed(_windows(), _mapping(directory), 2, 8000, NUMBERS, directory)
    assert not finished
    restored = await run_async(_windows(), NUMBERS, mapping=_mapping(directory, restore=True), workers=3)

    def windows(results: Any) -> list[tuple[Any, ...]]:
        return sorted((r.data["key"], r.data["start"], r.data["value"]) for r in results)

    # Windows emitted before the checkpoint were delivered by the killed run: the restored run gives the rest.
    latest = CheckpointStore(directory).latest()
    assert latest is not None
    emitted = {w for w in windows(plain)}
    assert set(windows(restored)) <= emitted
    assert len(windows(restored)) < len(emitted)
    assert max(windows(restored), key=lambda w: w[1])[1] == max(w[1] for w in emitted)


class _Numbered(ProducerPE):
    """A quick source with a state worth copying (a megabyte)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = bytearray(1 << 20)
        self.made = 0

    def produce(self) -> int:
        self.made += 1
        return self.made


async def test_a_root_copies_its_state_only_for_batches_that_may_take_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy of a root's state that a checkpoint within its calls saves cost a pickling of the state at every
    batch (50 MB and -i 10,000: 4.0 s against 0.2 s): it is taken for the first batch, whose pace is unknown, and
    then only for batches that take a checkpoint interval or more at the root's pace."""
    copies = 0
    calls_begin = Aligner.calls_begin

    def counted(aligner: Aligner) -> None:
        nonlocal copies
        copies += 1
        calls_begin(aligner)

    monkeypatch.setattr(Aligner, "calls_begin", counted)
    graph = WorkflowGraph()
    graph.add(source := _Numbered())
    got = await run_async(graph, 5000, mapping=_mapping(tmp_path / "ck", interval=60))
    assert sorted(got.data()) == list(range(1, 5001))
    assert source.made == 0 and copies == 1  # the run works on a copy of the PE; of a dozen batches


_MADE = [0]  # the calls _Heavy made in this process, in every run


class _Heavy(ProducerPE):
    """Takes 3 ms of CPU to make each number, which its call returns."""

    def produce(self) -> int:
        end = time.perf_counter() + 0.003
        while time.perf_counter() < end:
            pass
        _MADE[0] += 1
        return _MADE[0]


async def test_a_root_whose_calls_return_their_items_is_checkpointed_between_its_calls(tmp_path: Path) -> None:
    """A root's first batch is hundreds of calls: where they return their items (neither yield nor write), no
    checkpoint came until it ended (1.3 s with -i 400 of 3 ms calls). One is now taken between two parts of it."""
    made_at: list[int] = []
    graph = WorkflowGraph()
    graph.add(_Heavy())
    _MADE[0] = 0
    with on_completed(lambda n: made_at.append(_MADE[0])):
        got = await run_async(graph, 300, mapping=_mapping(tmp_path / "ck", interval=0.01))
    assert sorted(got.data()) == list(range(1, 301))
    assert made_at[0] < 150, made_at


async def test_a_plain_generator_root_is_checkpointed_within_its_call(tmp_path: Path, words: Path) -> None:
    """A plain generator that makes every line in one call (dispel4py's usual source) took no checkpoint until
    that call ended. A checkpoint within it saves the PE as the call found it and the lines it delivered; the
    restore makes the call again from there and drops those lines: every word counted once, every line read
    once in the PE's own count. Also when the restore runs the source threaded (`--threaded`, which aiod4p's
    own warning suggests for it) or traced (item-level provenance), which take no checkpoint within its calls:
    those dropped nothing, and every line delivered before the checkpoint was counted twice."""
    directory, lines = tmp_path / "ck", len((await asyncio.to_thread(words.read_text)).splitlines())
    graph = paced_word_count(words, directory)
    mapping = _mapping(directory, keep=1000)
    assert not await _run_until_killed(graph, mapping, 2, 10_000, checkpointed=directory)
    first = CheckpointStore(directory, keep=1000).load(1)
    assert first is not None
    source = first.states[InstanceRef("lines", 0)]
    delivered = source["port_outputs"]["output"]
    assert source["feed"] == 0 and 0 < delivered < lines  # within the call
    assert source["pe"]["attributes"]["read"] == 0  # as the call found it
    for restored_as in ("threaded", "traced", "plain"):  # each from a copy of the killed run's checkpoints
        copy = tmp_path / restored_as
        await asyncio.to_thread(shutil.copytree, directory, copy)
        graph = paced_word_count(words, None)  # a threaded source takes no checkpoint within its call to pace by
        (lines_pe,) = [pe for pe in graph.pes if pe.id == "lines"]
        lines_pe.threaded = restored_as == "threaded"
        provenance = "item" if restored_as == "traced" else None
        restored = _mapping(copy, keep=1000, restore=True)
        got = await run_async(graph, 1, mapping=restored, workers=3, provenance=provenance)
        assert _counts(got) == expected_counts(words), restored_as
        final = CheckpointStore(copy, keep=1000).latest()
        assert final is not None
        assert final.states[InstanceRef("lines", 0)]["pe"]["attributes"]["read"] == lines
        assert final.states[InstanceRef("lines", 0)]["stats"]["batches_in"] == 1  # its one element, made twice


TICKS = 100_000
"""Far more ticks than a paced attempt makes before it is aborted: no attempt ends before its abort."""


class _PlainTicks(ProducerPE):
    """0 to TICKS - 1 in one call of a plain generator, each shown to ``ckpt_workflows.HOOK`` (a
    :class:`_PacedUntilCheckpoint`) first; its results go to the reader, no PE after it."""

    def produce(self) -> Iterator[int]:
        for tick in range(TICKS):
            if ckpt_workflows.HOOK is not None:
                ckpt_workflows.HOOK(tick)
            yield tick


class _PacedUntilCheckpoint:
    """Paces the ticks from ``start`` on (5 ms each) until a checkpoint has completed
    in ``directory`` since the tick ``start``; ``reached`` is set then, and ``at`` is the tick that saw it."""

    def __init__(self, directory: Path, start: int) -> None:
        self.directory, self.start = directory, start
        self.before: set[str] | None = None
        self.at: int | None = None
        self.reached = asyncio.Event()

    def __call__(self, tick: int) -> None:
        if tick < self.start or self.at is not None:
            return
        if self.before is None:
            self.before = complete_checkpoints(self.directory)
        if complete_checkpoints(self.directory) - self.before:
            self.at = tick
            self.reached.set()
        else:
            time.sleep(0.005)  # pacing: the checkpoint is taken between ticks, within the call


async def _ticks_until_checkpoint(
    directory: Path,
    results: Path | None,
    start: int,
    restore: bool,
    graph: WorkflowGraph | None = None,
    inputs: Any = 1,
) -> int:
    """Run ``graph`` (:func:`_ticks` by default; restored, with ``restore``) until a checkpoint completed after
    tick ``start``, then abort it (no drain: a kill); the tick that saw that checkpoint."""
    paced = ckpt_workflows.HOOK = _PacedUntilCheckpoint(directory, start)
    try:
        mapping = _mapping(directory, results, keep=1000, restore=restore)
        async with asyncio.timeout(60), aiod4p.start(graph or _ticks(), inputs, mapping=mapping) as workflow:
            results_read = asyncio.ensure_future(workflow.results())
            await paced.reached.wait()
            results_read.cancel()
            await asyncio.gather(results_read, return_exceptions=True)
    finally:
        ckpt_workflows.HOOK = None
    assert paced.at is not None
    return paced.at


def _ticks(ticks: PE | None = None) -> WorkflowGraph:
    """``ticks`` (a :class:`_PlainTicks` by default), with the id ``ticks``, alone."""
    graph = WorkflowGraph()
    graph.add(ticks := ticks or _PlainTicks())
    ticks.id = "ticks"
    return graph


def _delivered(directory: Path) -> int:
    """The ticks that the newest checkpoint in ``directory`` says its source's interrupted call delivered."""
    newest = CheckpointStore(directory, keep=1000).latest()
    assert newest is not None
    state = newest.states[InstanceRef("ticks", 0)]
    assert state["feed"] == 0  # within the one call
    return int(state["port_outputs"]["output"])


async def test_a_checkpoint_while_a_restored_call_drops_what_it_delivered_keeps_that_count(tmp_path: Path) -> None:
    """A restored root's call makes its outputs again and drops as many as its checkpoint's call had delivered. A
    checkpoint taken before it had dropped them all saved only those it had made again: the next restore
    delivered the others a second time."""
    directory, results = tmp_path / "ck", tmp_path / "results.jsonl"
    await _ticks_until_checkpoint(directory, results, 500, restore=False)
    delivered = _delivered(directory)
    assert delivered >= 500
    # The restored call is paced from its first tick: its first checkpoint comes while it still drops.
    assert await _ticks_until_checkpoint(directory, results, 0, restore=True) < delivered
    assert _delivered(directory) == delivered
    async with asyncio.timeout(60):
        got = await run_async(_ticks(), 1, mapping=_mapping(directory, results, keep=1000, restore=True))
    assert sorted(record.data for record in got) == list(range(delivered, TICKS))
    ticks = [json.loads(line)["data"] for line in (await asyncio.to_thread(results.read_text)).splitlines()]
    assert sorted(ticks) == list(range(TICKS))


class _PlainTicksOf(IterativePE):
    """For each element, ``(element, tick)`` for every tick of :class:`_PlainTicks`, in one call each."""

    def process_item(self, element: int) -> Iterator[tuple[int, int]]:
        for tick in _PlainTicks().produce():
            yield element, tick


async def test_a_restored_plain_root_fed_live_drops_nothing_of_its_new_elements(tmp_path: Path) -> None:
    """A root whose feed cannot be replayed (a LiveFeed, stdin from a pipe) goes on with new elements after a
    restore, not with those of its interrupted calls: what those had delivered was dropped from the outputs
    of the new elements' calls, lost (on multi too, where the launcher pumps the feed)."""
    directory, feed = tmp_path / "ck", LiveFeed()
    await feed.send(1)
    await _ticks_until_checkpoint(
        directory, None, 0, restore=False, graph=_ticks(_PlainTicksOf()), inputs={"ticks": feed}
    )
    assert _delivered(directory) > 0
    fresh = LiveFeed()
    await fresh.send(2)
    fresh.close()
    mapping = _mapping(directory, keep=1000, restore=True)
    async with asyncio.timeout(60):
        got = await run_async(_ticks(_PlainTicksOf()), {"ticks": fresh}, mapping=mapping)
    assert [record.data for record in got] == [(2, tick) for tick in range(TICKS)]


def test_stdin_and_sockets_are_named_unreplayable(tmp_path: Path) -> None:
    from aiod4p import make_plan
    from aiod4p._checkpoint import unreplayable
    from aiod4p._plan import PlanOptions
    from aiod4p.sources import LinesSource, LineStream, TCPSource

    graph = WorkflowGraph()
    stdin, tcp, numbers, lines = LinesSource(), TCPSource(port=0), Numbers(), LinesSource(tmp_path / "x")
    tail = LinesSource(tmp_path / "x", follow=True, from_end=True)  # tail -f: it starts wherever the end is
    for index, pe in enumerate((stdin, tcp, numbers, lines, tail)):
        pe.id = f"root{index}"
        graph.add(pe)
    plan = make_plan(graph, PlanOptions())
    feeds: dict[str, Any] = {"root0": 1, "root1": 1, "root2": LineStream(), "root3": 1, "root4": 1}
    assert unreplayable(plan, feeds) == ["root0", "root1", "root2", "root4"]
    (tmp_path / "x").write_text("old\n")
    followed = LineStream(tmp_path / "x", follow=True, from_end=True)
    assert resumed_feed(followed, 3) is followed and not followed.replayable  # not sought: no new line dropped


async def test_a_restore_drops_nothing_of_a_stream_that_cannot_be_replayed() -> None:
    """stdin after a restart (or a new stdin after --restore) brings new lines: the restored feed position
    is not sought in it, which dropped as many live lines as the checkpoint's run had read."""
    read, write = os.pipe()
    os.write(write, b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(5)))
    os.close(write)
    stream = resumed_feed(LineStream(read, json=True), 3)
    assert isinstance(stream, LineStream)
    assert [item["i"] async for item in stream] == list(range(5))


async def test_stdin_that_is_a_file_is_read_again_from_where_it_was_first_read(tmp_path: Path) -> None:
    """``aiod4p run --stdin PE < data.jsonl``: a ``--restore`` (a new stdin, at the file's top) read every line
    again, unsought, and the results of those before the checkpoint came twice (8,960 of 20,000); a restart (the
    same stdin, read on) lost what the dead attempt had read ahead. As a path, it is now replayable: a reading
    again starts where the first one did, and the checkpoint's lines are skipped."""
    path = tmp_path / "data.jsonl"
    await asyncio.to_thread(path.write_bytes, b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(10)))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, len(b'{"i": 0}\n'), os.SEEK_SET)  # the shell (or a header read) had taken the first line
        stream = LineStream(fd, json=True)
        assert stream.replayable
        assert [item["i"] async for item in stream] == list(range(1, 10))
        assert resumed_feed(stream, 3) is stream  # a restart: the same stream, sought
        assert [item["i"] async for item in stream] == list(range(4, 10))
    finally:
        os.close(fd)


class _Live(SourcePE):
    """A source of live items (a socket's, say): it cannot be replayed."""

    replayable = False

    def open(self) -> AsyncIterator[int]:
        return _async_items(range(5))


async def _async_items(items: range) -> AsyncIterator[int]:
    for item in items:
        yield item


async def test_a_restored_source_that_cannot_be_replayed_drops_nothing_of_its_new_stream() -> None:
    """A restored ``TCPSource``/``LinesSource()`` resumes its call in a new stream: nothing of it is dropped
    (the checkpoint's output count was skipped, so the first lines clients sent after a restart were lost)."""
    pe = _Live()
    actor = SimpleNamespace(pe=pe, is_root=True, traced=False)
    aligner = Aligner(cast(Any, actor), cast(Any, None), 0)
    aligner.resume_outputs = 3  # the interrupted call had delivered 3 items before the checkpoint
    assert [item async for item in aligner.call_started(pe.produce())] == list(range(5))


class _Renamed:
    """A class a PE's state holds, renamed (deleted here) before the restore."""


def test_a_whole_checkpoint_whose_state_the_code_cannot_load_names_the_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not torn (its parts match the manifest), so not skipped for an older one, which would fail alike: an
    error naming the part and the reason (it was a traceback)."""
    store = CheckpointStore(tmp_path / "ck")
    part = store.write_part(1, InstanceRef("count", 0), pickle.dumps({"pe": {"attributes": {"t": _Renamed()}}}))
    store.commit(1, {"version": 1, "id": 1, "parallelism": {"count": 1}, "parts": [part], "results_offset": None})
    monkeypatch.delattr(sys.modules[__name__], "_Renamed")
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint 1 in .*ck: the state of PE count instance 0 \(count\.0\.state\) cannot be loaded:"
        r" AttributeError: .*_Renamed.* \(was the workflow's code changed since\?\)",
    ):
        store.latest()


_PART = {"pe": "count", "index": 0, "file": "count.0.state", "size": 2, "sha256": "0" * 64}


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        ("{}", "KeyError: 'parts'"),
        ("{garbage", "JSONDecodeError"),
        # still JSON, but damaged (a digit or a character changed): these failed the restore further on, with
        # exit 2 (a ValueError), a KeyError in a worker, or "taken of another graph"; or skipped the results check
        (
            {"parallelism": {"count": "x"}, "parts": [_PART]},
            "TypeError: its parallelism is not an instance count per PE: {'count': 'x'}",
        ),
        ({"parallelism": {"count": 2}, "parts": [_PART]}, "TypeError: its parts are not one per instance"),
        ({"parallelism": {"count": 1}, "parts": [{**_PART, "index": "zz"}]}, "TypeError: its parts are not each"),
        (
            {"parallelism": {"count": 1}, "parts": [_PART], "results_offset": "12"},
            "TypeError: its results_offset is not a length: '12'",
        ),
        (
            {"parallelism": {"count": 1}, "parts": [_PART], "results_offset": 12, "results_tail": 5},
            "TypeError: its results_tail is not a size and digest: 5",
        ),
    ],
)
def test_a_manifest_that_is_not_one_is_named_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, manifest: str | dict[str, Any], reason: str
) -> None:
    store = CheckpointStore(tmp_path / "ck")
    store.path(1).mkdir()
    (store.path(1) / MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    (store.path(1) / "count.0.state").write_bytes(b"{}")
    assert store.latest() is None
    assert f"ignoring torn checkpoint {store.path(1)}: MANIFEST.json is not a checkpoint's manifest ({reason}" in (
        caplog.text
    )


def test_a_restore_logs_each_torn_checkpoint_once(
    tmp_path: Path, words: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restore finding only torn checkpoints logged each twice: once looking for one of the last run, once
    for the error's wording (an earlier run's)."""
    store = CheckpointStore(tmp_path / "ck")
    for n in (1, 2):
        store.path(n).mkdir()
        (store.path(n) / MANIFEST).write_text("{garbage")
    with pytest.raises(CheckpointError, match="no complete checkpoint in"):
        run(word_count(words), 1, mapping=_mapping(store.directory, restore=True))
    torn = [record.getMessage() for record in caplog.records if "ignoring torn" in record.getMessage()]
    assert len(torn) == 2 and {str(store.path(1)), str(store.path(2))} == {m.split()[3][:-1] for m in torn}, torn


def test_a_checkpoint_directory_that_is_a_file_is_named_so(tmp_path: Path) -> None:
    taken = tmp_path / "ck"
    taken.write_text("not a directory")
    with pytest.raises(CheckpointError, match=rf"cannot create checkpoint directory {taken}: it is a file"):
        CheckpointStore(taken)


class _ListSink:
    """A results sink that records what it gets; it can wait for ``gate`` before each batch, or raise ``fails``."""

    def __init__(self, fails: Exception | None = None) -> None:
        self.got: list[Any] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fails = fails
        self.arrived = asyncio.Event()

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        await self.gate.wait()
        if self.fails is not None:
            raise self.fails
        self.got.extend(items)
        self.arrived.set()


async def test_held_results_reach_the_sink_once_their_checkpoint_completes() -> None:
    sink = _ListSink()
    held = HeldResults(sink, backlog=100, max_bytes=1 << 20)
    delivering = asyncio.create_task(held.deliver())
    async with asyncio.timeout(10):
        await held.emit("pe", "output", [1, 2])
        held.seal(1)
        await held.emit("pe", "output", [3])
        held.seal(2)
        await held.emit("pe", "output", [4])
        held.complete(1)
        while len(sink.got) < 2:
            await sink.arrived.wait()
            sink.arrived.clear()
        assert sink.got == [1, 2]  # checkpoint 2 did not complete: 3 waits, and 4 with it
        held.discard()  # a restart: 3 and 4 are made again
        await held.emit("pe", "output", [3, 4, 5])
        await held.finish()
    delivering.cancel()
    assert sink.got == [1, 2, 3, 4, 5]


async def test_held_results_wait_for_a_slow_reader_by_bytes_too() -> None:
    """Results of 2 MB, read in 20 ms each, under --restarts: every one of 200 was held for the reader (432 MB of
    peak RSS on multi -n 2 against 62 MB without restarts, measured); now at most ``max_bytes`` of them."""
    sink = _ListSink()
    sink.gate.clear()  # the reader does not read
    held = HeldResults(sink, backlog=100, max_bytes=3 << 20)
    delivering = asyncio.create_task(held.deliver())
    async with asyncio.timeout(10):
        await held.emit("pe", "output", [bytes(2 << 20)])
        held.seal(1)
        held.complete(1)
        await held.emit("pe", "output", [bytes(2 << 20)])  # 2 MB ready: the run goes on
        held.seal(2)
        held.complete(2)
        blocked = asyncio.create_task(held.emit("pe", "output", [bytes(2 << 20)]))
        done, _ = await asyncio.wait({blocked}, timeout=0.05)
        assert not done and held.behind() == 2  # 4 MB ready, two results: it waits for the reader
        sink.gate.set()
        await blocked
        await held.finish()
    delivering.cancel()
    assert len(sink.got) == 3


async def test_held_counts_count_the_results_of_each_checkpoint_once_it_completes() -> None:
    """The results go to the file alone: what waits for a checkpoint is their number, not the results."""
    counted: list[int] = []
    held = HeldCounts(counted.append)
    async with asyncio.timeout(10):
        await held.deliver()  # nothing to deliver: it returns at once
        await held.emit("pe", "output", [1, 2])
        held.seal(1)
        await held.emit("pe", "output", [3])
        held.seal(2)
        await held.emit("pe", "output", [4])
        held.complete(1)
        assert counted == [2]  # checkpoint 2 did not complete: 3 waits, and 4 with it
        held.discard()  # a restart: 3 and 4 are made again
        await held.emit("pe", "output", [3, 4, 5])
        assert held.behind() == 0
        await held.finish()
    assert counted == [2, 3]


async def test_held_results_wait_for_a_slow_reader_and_fail_with_its_failure() -> None:
    sink = _ListSink()
    sink.gate.clear()  # the reader does not read
    held = HeldResults(sink, backlog=2, max_bytes=1 << 20)
    delivering = asyncio.create_task(held.deliver())
    async with asyncio.timeout(10):
        await held.emit("pe", "output", [1, 2, 3])
        held.seal(1)
        held.complete(1)
        blocked = asyncio.create_task(held.emit("pe", "output", [4]))
        done, _ = await asyncio.wait({blocked}, timeout=0.05)
        assert not done  # 3 results ready for a reader that takes none: the run waits (else it returns at once)
        sink.fails = BrokenPipeError("the reader went away")
        sink.gate.set()
        await blocked  # it had taken its result: it returns once the reader is gone
        with pytest.raises(BrokenPipeError):
            await held.emit("pe", "output", [5])
        with pytest.raises(BrokenPipeError):
            await held.finish()
    assert delivering.done() and sink.got == []


async def test_a_held_result_belongs_to_the_checkpoint_of_its_emit_even_while_the_reader_is_behind() -> None:
    """An emit waiting for a slow reader had not taken its result yet: the checkpoint that committed it
    filed it nowhere, and a restart (which does not make it again) lost it for the reader."""
    sink = _ListSink()
    sink.gate.clear()
    held = HeldResults(sink, backlog=0, max_bytes=1 << 20)
    delivering = asyncio.create_task(held.deliver())
    async with asyncio.timeout(10):
        await held.emit("pe", "output", ["a"])
        held.seal(1)
        held.complete(1)  # "a" is ready, the reader takes nothing: the next emit waits
        blocked = asyncio.create_task(held.emit("pe", "output", ["b"]))
        done, _ = await asyncio.wait({blocked}, timeout=0.05)
        assert not done
        held.seal(2)  # checkpoint 2 commits "b", emitted before it
        held.complete(2)
        blocked.cancel()  # the attempt ends: a worker died
        held.discard()  # the restart resumes from checkpoint 2, after "b"
        sink.gate.set()
        await held.finish()
    delivering.cancel()
    assert sink.got == ["a", "b"]


async def test_held_results_raise_the_reader_s_failure_rather_than_wait_for_it() -> None:
    """A checkpoint completed after the reader failed made more results ready than the backlog: the next
    emit waited for a reader that was gone, for ever."""
    sink = _ListSink()
    sink.gate.clear()
    held = HeldResults(sink, backlog=1, max_bytes=1 << 20)
    delivering = asyncio.create_task(held.deliver())
    async with asyncio.timeout(10):
        await held.emit("pe", "output", [1])
        held.seal(1)
        held.complete(1)
        await held.emit("pe", "output", [2, 3])
        sink.fails = OSError("the reader failed")
        sink.gate.set()
        await asyncio.wait({delivering})  # the sink raised: delivering ended
        held.seal(2)
        held.complete(2)
        with pytest.raises(OSError, match="the reader failed"):
            await held.emit("pe", "output", [4])


PLAIN_COUNT_FLOW = """
import asyncio, json, os, sys
from aiod4p import GenericPE, WorkflowGraph, group_by
from aiod4p.sources import SourcePE

DIRECTORY = {directory!r}


def complete():
    return {{name for name in os.listdir(DIRECTORY) if os.path.exists(os.path.join(DIRECTORY, name, "MANIFEST.json"))}}


class Stream:
    def __init__(self):
        self.start = 0

    def seek(self, offset):
        self.start = offset

    def __aiter__(self):
        return self.words()

    async def words(self):
        for number in range(self.start, 700):
            yield "abcdefg"[number % 7]
        if os.environ.get("FLOW_HOLD") == "1":
            before = complete()
            while len(complete() - before) < 2:  # the second was triggered after every word was yielded
                await asyncio.sleep(0.01)  # ok-sleep: polls the files the run writes
            print("held", file=sys.stderr, flush=True)
            await asyncio.Event().wait()


class Words(SourcePE):
    def open(self):
        return Stream()


class Count(GenericPE):
    def __init__(self):
        super().__init__(inputs=[("input", group_by(0))], outputs=["output"])
        self.counts = {{}}

    def process(self, inputs):
        self.counts[inputs["input"]] = self.counts.get(inputs["input"], 0) + 1

    def postprocess(self):
        for item in sorted(self.counts.items()):
            self.write("output", item)


graph = WorkflowGraph()
words, count = Words(), Count()
words.id, count.id = "words", "count"
graph.connect(words, "output", count, "input")
"""


@pytest.mark.parametrize("mapping", ["async", "multi"])
def test_cli_restore_of_a_one_instance_count_on_more_instances_is_refused(tmp_path: Path, mapping: str) -> None:
    """The README's count, its counter not keyed_state, checkpointed with -n 1 and restored with -n 3: every
    instance took the one instance's counts (each word counted 3 times on async, twice on multi -n 2), exit 0."""
    flow = tmp_path / "plain_count.py"
    flow.write_text(PLAIN_COUNT_FLOW.format(directory=str(tmp_path / "ck")))
    common = ["run", str(flow), "-m", mapping, "--checkpoint-dir", str(tmp_path / "ck"), "-q"]
    process = aiod4p_process(*common, "-n", "1", "--checkpoint-interval", "0.02", env={**os.environ, "FLOW_HOLD": "1"})
    try:
        assert process.stderr is not None
        said = process.stderr.readline()
        assert said == "held\n", said
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
    results = tmp_path / "out.jsonl"
    done = aiod4p_cli(*common, "-n", "3", "--restore", "--results", str(results), timeout=60)
    assert done.returncode == 1, done.stderr
    assert re.match(
        r"aiod4p: error: PE count had 1 instance in checkpoint \d+, now \d, and its state \(counts\) is not as built,"
        r" none of it in keyed_state, and its inputs \(group_by\[0\]\) are not all broadcast",
        done.stderr,
    ), done.stderr
    done = aiod4p_cli(*common, "-n", "1", "--restore", "--results", str(results), timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(json_lines(results), key=str) == [
        {"pe": "count", "output": "output", "data": [word, 100]} for word in "abcdefg"
    ]


def test_a_fresh_run_over_a_run_that_did_not_end_says_that_run_can_no_longer_be_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Run again without --restore after a run was killed, and the killed run's results file was emptied and its
    checkpoints could no longer be restored, without a word. A run that ended (its input done, or drained) says so
    in RUN.json; a fresh run after one that did not (killed: RUN.json as it started) warns."""
    directory, words = tmp_path / "ck", tmp_path / "words.txt"
    write_words(words, 2_000)
    results = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, "aiod4p.checkpoint"):
        run(word_count(words), 1, mapping=_mapping(directory, results=results), workers=1)
        run(word_count(words), 1, mapping=_mapping(directory, results=results), workers=1)
    assert not [r for r in caplog.records if "did not end" in r.getMessage()]
    record = json.loads((directory / "RUN.json").read_text())
    assert record.pop("ended") is True
    (directory / "RUN.json").write_text(json.dumps(record))  # as a run killed after its checkpoints leaves it
    latest = CheckpointStore(directory).latest()
    assert latest is not None
    caplog.clear()
    with caplog.at_level(logging.WARNING, "aiod4p.checkpoint"):
        run(word_count(words), 1, mapping=_mapping(directory, results=results), workers=1)
    assert [r.getMessage() for r in caplog.records if "did not end" in r.getMessage()] == [
        f"Checkpoint {latest.id} in {directory} is of a run that did not end (killed, failed, aborted or suspended),"
        f" which --restore would have resumed: this run starts afresh (its results file {results} emptied), and from"
        " now on --restore resumes this one"
    ]


def test_a_fresh_run_over_a_run_that_did_not_end_whose_state_the_code_cannot_load_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh run after a killed run, the workflow's code changed since (a class its state held renamed): the
    check for the warning unpickled that run's checkpoint, and the fresh run, which restores nothing, failed with
    'the state of PE count instance 0 ... cannot be loaded'. It warns and runs."""
    directory, words = tmp_path / "ck", tmp_path / "words.txt"
    write_words(words, 2_000)
    store = CheckpointStore(directory)
    store.start_run()  # the killed run: RUN.json as it started, and its checkpoint
    part = store.write_part(1, InstanceRef("count", 0), pickle.dumps({"pe": {"attributes": {"t": _Renamed()}}}))
    store.commit(1, {"version": 1, "id": 1, "parallelism": {"count": 1}, "parts": [part], "results_offset": None})
    monkeypatch.delattr(sys.modules[__name__], "_Renamed")
    with caplog.at_level(logging.WARNING, "aiod4p.checkpoint"):
        results = run(word_count(words), 1, mapping=_mapping(directory), workers=1)
    assert sum(_counts(results).values()) == 2_000
    assert [r.getMessage() for r in caplog.records if "did not end" in r.getMessage()] == [
        f"Checkpoint 1 in {directory} is of a run that did not end (killed, failed, aborted or suspended), which"
        " --restore would have resumed: this run starts afresh, and from now on --restore resumes this one"
    ]


def _restored_after_a_run_failed_before_its_first_checkpoint(
    directory: Path, words: list[str], monkeypatch: pytest.MonkeyPatch
) -> CheckpointError:
    """What ``--restore`` raises after a new run over ``directory`` failed before its first checkpoint."""

    def fail(seen: int) -> None:
        raise RuntimeError("the second run fails")

    monkeypatch.setattr(ckpt_workflows, "HOOK", fail)
    with pytest.raises(Exception, match="the second run fails"):
        run(word_count(words), 1, mapping=_mapping(directory, interval=3600), workers=1)
    monkeypatch.setattr(ckpt_workflows, "HOOK", None)
    with pytest.raises(CheckpointError) as refused:
        run(word_count(words), 1, mapping=_mapping(directory, restore=True), workers=1)
    return refused.value


def test_restore_after_a_fresh_run_that_completed_no_checkpoint_refuses_the_earlier_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that finished leaves its final checkpoint; a fresh run in the same directory (no --restore) fails
    before its first checkpoint. `--restore` took the first run's checkpoint: it restored the first run's
    finished state, produced nothing and succeeded (with a results file, it truncated the second run's to the
    first run's committed length, cutting a record in two). It is refused, naming both runs."""
    directory, words = tmp_path / "ck", tmp_path / "words.txt"
    write_words(words, 5_000)
    run(word_count(words), 1, mapping=_mapping(directory), workers=1)
    finished = CheckpointStore(directory).latest()
    assert finished is not None

    refused = _restored_after_a_run_failed_before_its_first_checkpoint(directory, words, monkeypatch)
    assert str(refused).startswith(
        f"--restore: no complete checkpoint of the last run in {directory}, which started after checkpoint"
        f" {finished.id}: it was stopped before its first checkpoint completed"
    )


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"pid": 1}', b'{"after": "3"}'])
def test_restore_with_a_damaged_run_record_is_refused_naming_it(tmp_path: Path, damage: bytes) -> None:
    """RUN.json that cannot be read, or says no start, was taken as "the last run started after checkpoint 0":
    `--restore` then resumed the newest checkpoint of any earlier run, whose results file the last run had
    started afresh. It is refused, naming the file and what resumes that checkpoint if it is wanted."""
    directory, words = tmp_path / "ck", tmp_path / "words.txt"
    write_words(words, 5_000)
    run(word_count(words), 1, mapping=_mapping(directory), workers=1)
    finished = CheckpointStore(directory).latest()
    assert finished is not None
    (directory / "RUN.json").write_bytes(damage)
    with pytest.raises(CheckpointError) as refused:
        run(word_count(words), 1, mapping=_mapping(directory, restore=True), workers=1)
    assert str(refused.value) == (
        f"--restore: {directory / 'RUN.json'}, which says where the last run in {directory} started, cannot be read"
        " or is damaged, so which checkpoints are of that run is unknown: nothing was restored (start the run"
        f" afresh, without --restore; or remove {directory / 'RUN.json'} to resume the newest complete checkpoint,"
        f" {finished.id}, whichever run took it)"
    )
    (directory / "RUN.json").unlink()
    assert len(run(word_count(words), 1, mapping=_mapping(directory, restore=True), workers=1)) == 0


async def test_a_restart_whose_workers_cannot_start_says_what_resumes_the_run(tmp_path: Path) -> None:
    """A Ray node lost with the dead worker: the restart waited for CPUs the cluster no longer had and failed with
    `MappingUnavailable: the Ray cluster did not start 4 worker actors ...` alone, not saying that the restart
    failed, nor what resumes the run, as a dead worker with no restart left says."""
    plan = make_plan(word_count(tmp_path / "words.txt"), PlanOptions(workers=1))
    tried: list[Session] = []

    async def attempt(session: Session) -> list[Any]:
        tried.append(session)
        if len(tried) == 1:
            raise WorkerDied("worker 0 died")
        raise MappingUnavailable("the Ray cluster did not start 1 worker actor within 60 s")

    with pytest.raises(MappingUnavailable) as failed:
        async with asyncio.timeout(30):
            await run_with_recovery(
                Checkpointing(tmp_path / "ck", restarts=2), plan, {}, _Collected(), attempt, RunControl()
            )
    assert str(failed.value) == (
        "the Ray cluster did not start 1 worker actor within 60 s; restart 1 of 2 could not start its workers:"
        " no checkpoint had completed"
    )
    assert len(tried) == 2


async def test_statistics_after_a_restore_count_the_items_before_its_checkpoint(tmp_path: Path) -> None:
    """A restored run's statistics (--stats, --stats-json) counted only what came after its checkpoint: a word count
    of 40,000 words reported fewer. The counters of the attempts before are saved with each instance's state and go
    on from there, also restored with another -n (each PE's totals kept)."""
    words = tmp_path / "words.txt"
    write_words(words, 40_000)
    directory, gate = tmp_path / "ck", tmp_path / "killed"
    graph = _held_word_count(words, gate, 0)
    assert not await _run_until_killed(graph, _mapping(directory), 2, 0, checkpointed=directory, new=2)
    async with (
        asyncio.timeout(30),
        start(word_count(words), 1, mapping=_mapping(directory, restore=True), workers=3) as restored,
    ):
        got = await restored.results()
    assert _counts(got) == expected_counts(words)
    items_in: dict[str, int] = {}
    items_out: dict[str, int] = {}
    for entry in restored.stats:
        items_in[entry.pe] = items_in.get(entry.pe, 0) + entry.items_in
        items_out[entry.pe] = items_out.get(entry.pe, 0) + entry.items_out
    assert items_in == {"lines": 1, "split": 4_000, "count": 40_000}
    assert items_out == {"lines": 4_000, "split": 40_000, "count": len(expected_counts(words))}


async def test_the_samples_of_a_restore_in_a_new_process_show_the_work_it_did(tmp_path: Path) -> None:
    """`aiod4p run --restore --stats-json` went on from its checkpoint's counters, and its samples counted the
    words the run had counted before its checkpoint as counted in the restored process's first interval: a
    spike of throughput and busy time that was no work. The samples now add up to the words the restored
    process counted, while the totals still cover the whole run."""
    words = tmp_path / "words.txt"
    write_words(words, 40_000)
    directory, gate = tmp_path / "ck", tmp_path / "killed"
    graph = _held_word_count(words, gate, 20_000)
    async with asyncio.timeout(30):
        assert not await _run_until_killed(graph, _mapping(directory), 2, 20_000, checkpointed=directory)
    checkpoint = CheckpointStore(directory).latest()
    assert checkpoint is not None
    carried = sum(state["stats"]["items_in"] for ref, state in checkpoint.states.items() if ref.pe == "count")
    assert carried >= 1_000  # the checkpoint counted words before the kill
    flow = tmp_path / "flow.py"
    flow.write_text(f"from ckpt_workflows import word_count\n\ngraph = word_count({str(words)!r})\n")
    stats = tmp_path / "stats.json"
    restored = await asyncio.to_thread(
        aiod4p_cli,
        *("run", str(flow), "-m", "async", "-n", "3", "-i", "1", "-q", "--results", os.devnull),
        *("--checkpoint-dir", str(directory), "--restore", "--stats-json", str(stats)),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        timeout=30,
    )
    assert restored.returncode == 0, restored.stderr
    document, samples = load_samples(stats)
    assert document["pes"]["count"]["items_in"] == 40_000  # the totals: the whole run
    instances = document["pes"]["count"]["instances"]
    assert samples[-1]["pes"]["count"][0] == 40_000 - carried  # what the restored process counted
    for before, after in itertools.pairwise(samples):
        counted, busy = (after["pes"]["count"][i] - before["pes"]["count"][i] for i in (0, 2))
        assert 0 <= counted <= 40_000 - carried, (before, after)
        assert 0 <= busy <= (after["t"] - before["t"]) * instances + 0.05, (before, after)


def test_restore_refuses_a_results_file_that_is_not_the_one_its_checkpoint_committed(tmp_path: Path) -> None:
    """A restore given another results file as long as the committed length or longer (another run's, or the
    file rewritten since) truncated it to that length and appended: a file of two runs, silently. The end of
    what a checkpoint commits is in its manifest; a file whose bytes there differ is refused, untouched."""
    words, directory = tmp_path / "words.txt", tmp_path / "ck"
    write_words(words, 2_000)
    results, other = tmp_path / "results.jsonl", tmp_path / "other.jsonl"
    run(word_count(words), 1, mapping=_mapping(directory, results), workers=1)
    text = results.read_text()
    other.write_text(text.replace("alpha", "ALPHA") + "more\n")
    with pytest.raises(CheckpointError) as refused:
        run(word_count(words), 1, mapping=_mapping(directory, other, restore=True), workers=1)
    assert str(refused.value).startswith(f"the results file {other} does not end, at the {len(text)} bytes checkpoint ")
    assert other.read_text() == text.replace("alpha", "ALPHA") + "more\n"
    run(word_count(words), 1, mapping=_mapping(directory, results, restore=True), workers=1)
    assert results.read_text() == text


def test_restore_of_a_run_without_a_results_file_refuses_to_empty_one(tmp_path: Path) -> None:
    """A checkpoint of a run whose results went to stdout (or nowhere) has no committed length: a restore given a
    results file emptied it, another run's results (or this run's, redirected there from stdout) with it. It is
    refused, untouched; an empty or new file gets what follows the checkpoint."""
    words, directory = tmp_path / "words.txt", tmp_path / "ck"
    write_words(words, 2_000)
    run(word_count(words), 1, mapping=_mapping(directory), workers=1)
    other = tmp_path / "other.jsonl"
    other.write_text('{"pe": "p", "output": "o", "data": 1}\n')
    with pytest.raises(
        CheckpointError,
        match=rf"^the results file {re.escape(str(other))} holds 38 bytes, but checkpoint \d+ in"
        rf" {re.escape(str(directory))} committed none of a results file ",
    ):
        run(word_count(words), 1, mapping=_mapping(directory, other, restore=True), workers=1)
    assert other.read_text() == '{"pe": "p", "output": "o", "data": 1}\n'
    fresh = tmp_path / "fresh.jsonl"
    run(word_count(words), 1, mapping=_mapping(directory, fresh, restore=True), workers=1)
    assert fresh.read_text() == ""  # the run had finished: nothing follows its checkpoint


async def test_provenance_after_a_restore_marks_each_instance_with_the_checkpoint_it_started_from(
    tmp_path: Path,
) -> None:
    """The provenance of a restored run starts at its checkpoint (the attempts before it died with their records);
    nothing in the file said so. Each instance's agent now holds aiod4p:restored_from_checkpoint."""
    pytest.importorskip("prov")
    words = tmp_path / "words.txt"
    write_words(words, 40_000)
    directory, gate = tmp_path / "ck", tmp_path / "killed"
    assert not await _run_until_killed(
        _held_word_count(words, gate, 0), _mapping(directory), 2, 0, checkpointed=directory, new=2
    )
    latest = CheckpointStore(directory).latest()
    assert latest is not None
    mapping = _mapping(directory, restore=True)
    async with (
        asyncio.timeout(30),
        start(word_count(words), 1, mapping=mapping, workers=2, provenance="pe") as restored,
    ):
        await restored.results()
    document = aiod4p.provenance_document(restored.stats)
    marks = {
        str(agent.identifier): [
            value for name, value in agent.attributes if name.localpart == "restored_from_checkpoint"
        ]
        for agent in document.get_records(prov.model.ProvAgent)
        if str(agent.identifier).count(".") == 1
    }
    assert marks and all(found == [latest.id] for found in marks.values()), marks
    path = str(tmp_path / "provenance.json")
    write_document(document, path)
    assert read_lineage(path).restored == {latest.id}


class _Paced(IterativePE):
    """A root taking a few milliseconds per call: checkpoints complete between its calls."""

    async def process_item(self, item: Any) -> Any:
        await asyncio.sleep(0.005)
        return item


def _paced_graph() -> WorkflowGraph:
    graph = WorkflowGraph()
    paced = _Paced()
    paced.id = "paced"  # a restore finds PEs by id
    graph.add(paced)
    return graph


async def test_provenance_after_a_restore_names_each_input_by_its_place_in_the_feed(tmp_path: Path) -> None:
    """A restored run numbered its feed entities from 0 again: the input a result traced back to was named
    ``feed0`` although it was the feed's element at the checkpoint's position (the seismic example's 22nd -d
    dict traced to ``feed0``). ``feedN`` is now the feed's element N, in a restored run too."""
    directory = tmp_path / "ck"
    feed = [{"input": {"n": n}} for n in range(400)]
    reached = asyncio.Event()

    def completed(n: int) -> None:
        latest = CheckpointStore(directory).latest()
        if latest is not None and latest.states[InstanceRef("paced", 0)]["feed"] >= 3:
            reached.set()

    async with asyncio.timeout(60):
        with on_completed(completed):
            async with start(_paced_graph(), {"paced": feed}, mapping=_mapping(directory), batch_size=1) as first:
                results = asyncio.ensure_future(first.results())
                await reached.wait()
                results.cancel()
                await asyncio.gather(results, return_exceptions=True)
        latest = CheckpointStore(directory).latest()
        assert latest is not None
        base = latest.states[InstanceRef("paced", 0)]["feed"]
        assert 3 <= base < len(feed)
        mapping = _mapping(directory, restore=True)
        async with start(_paced_graph(), {"paced": feed}, mapping=mapping, provenance="item") as restored:
            await restored.results()
    path = str(tmp_path / "provenance.json")
    write_document(aiod4p.provenance_document(restored.stats), path)
    lineage = read_lineage(path)
    inputs = {entity: value for entity, value in lineage.values.items() if ".feed" in entity}
    assert inputs == {f"aiod4p:paced.0.feed{n}": repr(feed[n]) for n in range(base, len(feed))}


async def test_a_checkpoint_that_does_not_complete_is_reported_naming_what_it_waits_for(tmp_path: Path) -> None:
    """A worker that hangs (stopped, stuck in a system call) held every checkpoint back, and the results they commit,
    and nothing said so: the run looked healthy. The coordinator now warns, naming the instances whose state it still
    waits for, and again at doubled delays."""
    plan = make_plan(word_count(tmp_path / "words.txt"), PlanOptions(workers=1))
    coordinator = Coordinator(CheckpointStore(tmp_path / "ck"), plan, 0.001, 0, None, stall=0.01)
    coordinator.add_parts(1, [{"pe": "lines", "index": 0, "size": 1}])
    assert re.fullmatch(
        r"checkpoint 1 has not completed in [\d.]+ s: no state yet from PE count instance 0, PE split instance 0;"
        r" results not committed yet \(a worker or PE that hangs holds every checkpoint back\)",
        await _first_stall_warning(coordinator),
    )


async def test_a_checkpoint_that_does_not_complete_names_ten_instances_and_counts_the_others(tmp_path: Path) -> None:
    """The warning named every instance whose state it waited for: a worker that hangs, in a plan of 300 instances,
    made a line of 4 KiB naming 151 (one of 100,000 instances, megabytes)."""
    split = Split()
    split.parallelism = 300
    plan = make_plan(word_count(tmp_path / "words.txt", split), PlanOptions(workers=2))
    coordinator = Coordinator(CheckpointStore(tmp_path / "ck"), plan, 0.001, 0, None, stall=0.01)
    coordinator.add_parts(1, [{"pe": "lines", "index": 0, "size": 1}])
    named = ", ".join([*(f"PE count instance {i}" for i in range(2)), *(f"PE split instance {i}" for i in range(8))])
    assert re.fullmatch(
        rf"checkpoint 1 has not completed in [\d.]+ s: no state yet from {named} and 292 more instances;"
        r" results not committed yet \(a worker or PE that hangs holds every checkpoint back\)",
        await _first_stall_warning(coordinator),
    )


async def _first_stall_warning(coordinator: Coordinator) -> str:
    """The first warning ``coordinator`` logs while it drives checkpoints that never complete."""
    warned = asyncio.Event()
    messages: list[str] = []

    class Warned(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
            warned.set()

    handler = Warned(logging.WARNING)
    logging.getLogger("aiod4p.checkpoint").addHandler(handler)

    async def trigger(n: int) -> None:
        pass

    driving = asyncio.ensure_future(coordinator.drive(trigger))
    try:
        async with asyncio.timeout(5):
            await warned.wait()
    finally:
        driving.cancel()
        logging.getLogger("aiod4p.checkpoint").removeHandler(handler)
    return messages[0]


async def test_a_checkpoint_held_back_by_a_slow_reader_of_the_results_is_reported_as_such(tmp_path: Path) -> None:
    """Under --restarts, a reader of --results - that is behind holds the workflow back once more results are ready
    for it than the backlog: the sources wait to write, so no checkpoint completes until the reader catches up
    (minutes, behind a checkpoint's worth of results). The warning blamed a worker or PE that hangs."""
    plan = make_plan(word_count(tmp_path / "words.txt"), PlanOptions(workers=1))
    sink = _ListSink()
    sink.gate.clear()  # the reader takes nothing
    held = HeldResults(sink, backlog=1, max_bytes=1 << 20)
    delivering = asyncio.create_task(held.deliver())
    coordinator = Coordinator(CheckpointStore(tmp_path / "ck"), plan, 0.001, 0, None, held, stall=0.01)
    await held.emit("count", "output", [("a", 1), ("b", 1), ("c", 1)])
    held.seal(0)
    held.complete(0)  # the checkpoint before: its results are ready, more than the backlog
    try:
        warning = await _first_stall_warning(coordinator)
    finally:
        delivering.cancel()
    assert re.fullmatch(
        r"checkpoint 1 has not completed in [\d.]+ s: no state yet from PE count instance 0, PE lines instance 0,"
        r" PE split instance 0; results not committed yet \(3 results of complete checkpoints wait for their reader,"
        r" which is behind: the workflow waits for it, and every checkpoint with it\)",
        warning,
    )


class _Ticks(ProducerPE):
    """Yields 0..count-1; in the first attempt it stops at ``pause`` and waits (a live source idle) for ever."""

    first_attempt = True  # a class attribute: the restored run's copies see it cleared

    def __init__(self, count: int, pause: int) -> None:
        super().__init__()
        self.count, self.pause = count, pause

    async def produce(self) -> AsyncIterator[int]:
        for tick in range(self.count):
            if tick == self.pause and _Ticks.first_attempt:
                await asyncio.Event().wait()  # cancelled with the run
            yield tick


class _Announces(IterativePE):
    """Writes a header in ``preprocess``, then passes its items on."""

    def preprocess(self) -> None:
        self.write("output", "header")

    def process_item(self, item: int) -> int:
        return item


@pytest.mark.parametrize("threaded", [False, True], ids=["on the loop", "threaded"])
async def test_what_preprocess_writes_is_not_delivered_again_by_a_restore(tmp_path: Path, threaded: bool) -> None:
    """On restore ``preprocess`` runs again, and what it writes was delivered before the checkpoint: a
    restored run delivered it a second time (each write() handed on at once, before the restore dropped it)."""
    directory, results = tmp_path / "ck", tmp_path / "results.jsonl"
    graph = WorkflowGraph()
    announces = _Announces()
    announces.threaded = threaded
    graph.connect(_Ticks(50, pause=20), "output", announces, "input")
    completed = asyncio.Event()
    _Ticks.first_attempt = True
    try:
        async with asyncio.timeout(60):
            with on_completed(lambda n: completed.set()):
                async with start(graph, 1, mapping=_mapping(directory, results)) as first:
                    running = asyncio.ensure_future(first.results())
                    await completed.wait()
                    running.cancel()
                    await asyncio.gather(running, return_exceptions=True)
            _Ticks.first_attempt = False
            final = await run_async(graph, 1, mapping=_mapping(directory, results, restore=True))
    finally:
        _Ticks.first_attempt = True
    delivered = [record["data"] for record in json_lines(results)]
    assert sorted(delivered, key=str) == sorted([*range(50), "header"], key=str)
    assert [record.data for record in final].count("header") <= 1


def _observations(path: Path, on_bad: str, follow: bool, window: PE | None = None, **options: Any) -> WorkflowGraph:
    """A root ``LinesSource`` of the JSON Lines in ``path`` (other ``options`` of it too), its items the results
    (or ``window``'s input)."""
    graph = WorkflowGraph()
    source = LinesSource(path, **{"json": True, "follow": follow, "on_bad": on_bad, **options})
    source.id = "observations"
    graph.add(source)
    if window is not None:
        window.id = "window"
        graph.connect(source, "output", window, "input")
    return graph


async def test_a_restore_takes_a_sources_configuration_from_the_workflow_not_from_the_checkpoint(
    tmp_path: Path,
) -> None:
    """An operator whose followed file got a bad line (the run failed: ``on_bad="fail"``) edits the workflow to
    ``on_bad="skip"`` and restores: the checkpoint's ``on_bad`` (and ``follow``, ``path``...) was restored over
    the workflow's, as if it were state, and the restore failed again on the same line, for ever. A source's
    options are its configuration: the restore takes them from the workflow, its position from the checkpoint
    (those that say what the position counts, such as ``follow``, it refuses to change: the test below)."""
    directory, path = tmp_path / "ck", tmp_path / "obs.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(30)))
    completed = asyncio.Event()
    with on_completed(lambda n: completed.set()):
        async with (
            asyncio.timeout(30),
            start(_observations(path, "fail", follow=True), mapping=_mapping(directory)) as workflow,
        ):
            results = asyncio.ensure_future(workflow.results())
            await completed.wait()  # a checkpoint of the source at some line of the first 30, waiting for more
            with path.open("a") as out:
                out.write("not json\n" + "".join(json.dumps({"i": i}) + "\n" for i in range(30, 40)))
            with pytest.raises(aiod4p.errors.Aiod4pError, match="line 31: not valid JSON"):
                await results
    edited = _observations(path, "skip", follow=True, poll_interval=0.01)
    async with asyncio.timeout(30), start(edited, mapping=_mapping(directory, restore=True)) as restored:
        resumed = []
        async for record in restored:
            resumed.append(record.data["i"])
            if resumed[-1] == 39:
                restored.drain()  # followed: it would wait for more lines
    assert resumed == list(range(40 - len(resumed), 40)) and len(resumed) >= 10
    assert [entry.skipped for entry in restored.stats] == [1]
    assert [cast(LinesSource, pe).poll_interval for pe in restored.instances("observations")] == [0.01]


def test_the_options_of_sources_and_windows_are_not_state_even_in_a_checkpoint_that_saved_them() -> None:
    """A checkpoint written before the options were named configuration holds them: a restore keeps the workflow's
    (a TCP source's new port, a window's new lateness), and only what the items made comes from the checkpoint."""
    tcp, timer = aiod4p.sources.TCPSource(port=9000, max_pending=5), aiod4p.sources.TimerSource(1.0, count=3)
    window = aiod4p.windows.TimeWindow(10.0, allowed_lateness=1.0)
    window.clock = 7.0
    assert capture(tcp, None) == {"attributes": {}}
    assert capture(timer, None) == {"attributes": {}}
    assert capture(aiod4p.sources.UDPSource(max_line=10, count=2), None) == {"attributes": {}}
    # What a checkpoint_fixed attribute is (a restore refuses to change it) is saved: the test below.
    assert capture(window, None)["attributes"] == {
        **{"size": 10.0, "step": 10.0, "allowed_lateness": 1.0},
        **{"clock": 7.0, "late": 0, "windows": {}},
    }
    lines = LinesSource("obs.jsonl", json=True, max_line=10, on_bad="skip", poll_interval=0.5)
    assert capture(lines, None)["attributes"] == {
        **{"path": "obs.jsonl", "json": True, "follow": False, "from_end": False, "max_line": 10},
        "generations": [],
    }
    saved = {"attributes": {"port": 9000, "max_pending": 5, "on_bad": "fail", "address": ("127.0.0.1", 9000)}}
    edited = aiod4p.sources.TCPSource(port=9001, on_bad="skip")
    restore_state(edited, saved, [saved], None, 0, 1)
    assert (edited.port, edited.max_pending, edited.on_bad, edited.address) == (9001, 1024, "skip", None)
    counts = CountWindow(3, partial=False)
    counts.state = {None: (collections.deque([1], maxlen=3), [1])}
    saved = {"attributes": {**capture(counts, None)["attributes"], "partial": False}}
    later = CountWindow(3, partial=True)
    restore_state(later, saved, [saved], None, 0, 1)
    assert (later.partial, later.state) == (True, counts.state)


def test_a_checkpoint_in_another_format_is_refused_naming_the_format_and_the_aiod4p_that_wrote_it(
    tmp_path: Path, words: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest's ``version`` (the checkpoint format) was written and never read: a checkpoint of an aiod4p whose
    format differs was restored as if it were this one's. It is now refused, naming both, and the manifest records
    the aiod4p that wrote it."""
    directory, results, target = tmp_path / "ck", tmp_path / "out.jsonl", tmp_path / "wf.py"
    target.write_text(f"from ckpt_workflows import word_count\n\ngraph = word_count({str(words)!r})\n")
    common = ["run", str(target), "-i", "1", "--checkpoint-dir", str(directory), "--results", str(results), "-q"]
    assert main(common) == 0  # it ends with a final checkpoint
    newest = CheckpointStore(directory).path(CheckpointStore(directory).ids()[-1])
    manifest = json.loads((newest / MANIFEST).read_text())
    assert (manifest["version"], manifest["aiod4p"]) == (1, aiod4p.__version__)
    (newest / MANIFEST).write_text(json.dumps({**manifest, "version": 2, "aiod4p": "9.0.0"}))
    assert main([*common, "--restore"]) == 1
    assert re.search(
        rf"checkpoint \d+ in {re.escape(str(directory))} is in checkpoint format 2 \(written by aiod4p '9.0.0'\),"
        rf" and this aiod4p \({re.escape(aiod4p.__version__)}\) reads format 1: restore it with the aiod4p that"
        " wrote it, or start the run afresh, without --restore",
        capsys.readouterr().err,
    )


class _ThresholdWindow(CountWindow):
    """A user's window: its own checkpoint_fixed adds to CountWindow's (size, step), never hides them."""

    checkpoint_fixed = ("threshold",)

    def __init__(self, size: int, threshold: int = 1, **options: Any) -> None:
        super().__init__(size, **options)
        self.threshold = threshold


@pytest.mark.parametrize(
    ("made", "edited", "refused"),
    [
        (CountWindow(5, key="k"), CountWindow(4, key="k"), "size is 4 in this workflow and was 5"),
        # Which windows were emitted follows from clock and allowed_lateness: with more lateness a restore emitted
        # them again (t=1, t=12 emit [0, 10); restored with allowed_lateness=5, t=5 reopened it).
        (
            aiod4p.windows.TimeWindow(10, timestamp="t"),
            aiod4p.windows.TimeWindow(10, timestamp="t", allowed_lateness=5),
            "allowed_lateness is 5.0 in this workflow and was 0.0",
        ),
        # A subclass's checkpoint_fixed hid its base's: the size was taken from the checkpoint, silently.
        (_ThresholdWindow(5, key="k"), _ThresholdWindow(4, key="k"), "size is 4 in this workflow and was 5"),
        (_ThresholdWindow(5, 1, key="k"), _ThresholdWindow(5, 2, key="k"), "threshold is 2 in this workflow and was 1"),
    ],
    ids=["size", "allowed_lateness", "base-of-subclass", "subclass"],
)
async def test_a_restore_refuses_a_window_whose_size_the_workflow_changed(
    tmp_path: Path, made: PE, edited: PE, refused: str
) -> None:
    """A window's size and step were restored from the checkpoint over the workflow's: made ``CountWindow(4)``, a
    restored ``CountWindow(5)`` went on making windows of 5, and nothing said so. Its windows under way hold items
    for that size, so the restore is refused, naming the PE and both sizes; so is one of a ``TimeWindow`` whose
    ``allowed_lateness`` changed, and of an attribute that a subclass names in ``checkpoint_fixed`` (which adds to
    its base's)."""
    directory, path = tmp_path / "ck", tmp_path / "obs.jsonl"
    path.write_text("".join(json.dumps({"k": i % 2, "t": i}) + "\n" for i in range(33)))
    completed = asyncio.Event()
    with on_completed(lambda n: completed.set()):
        graph = _observations(path, "fail", follow=True, window=made)
        async with asyncio.timeout(30), start(graph, mapping=_mapping(directory)):
            await completed.wait()  # then leaving the block aborts the run: it did not end
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint \d+ in .*ck: PE window's {refused} when the checkpoint was taken: its state was made"
        r" with that \w+, which a restore cannot change",
    ):
        workflow = _observations(path, "fail", follow=True, window=edited)
        await asyncio.wait_for(run_async(workflow, mapping=_mapping(directory, restore=True)), 30)


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("path", "other.jsonl", r"'.*other\.jsonl' in this workflow and was '.*obs\.jsonl'"),
        ("json", False, "False in this workflow and was True"),
        ("follow", False, "False in this workflow and was True"),
        ("from_end", True, "True in this workflow and was False"),
        ("max_line", 100, f"100 in this workflow and was {aiod4p.sources.MAX_LINE_BYTES}"),
    ],
)
async def test_a_restore_refuses_a_line_source_whose_position_would_count_otherwise(
    tmp_path: Path, option: str, value: Any, shown: str
) -> None:
    """A ``LinesSource``'s position counts the items of its file as its options made them: ``json=True`` does not
    count the blank and bad lines it skips, ``max_line`` decides which lines are bad, ``follow`` goes per file
    generation, ``from_end`` from which end, and another path is another file. These were configuration: a restore
    that changed one applied the old position to what it now counts, skipping or repeating items, silently. It is
    refused, naming the PE, the option and both values."""
    directory, path = tmp_path / "ck", tmp_path / "obs.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(30)))
    if option == "path":
        value = tmp_path / value
        shutil.copyfile(path, value)
    completed = asyncio.Event()
    with on_completed(lambda n: completed.set()):
        async with asyncio.timeout(30), start(_observations(path, "skip", True), mapping=_mapping(directory)):
            await completed.wait()  # then leaving the block aborts the run: it did not end
    follow, others = value if option == "follow" else True, {} if option in ("path", "follow") else {option: value}
    edited = _observations(value if option == "path" else path, "skip", follow, **others)
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint \d+ in .*ck: PE observations's {option} is {shown} when the checkpoint was taken",
    ):
        await asyncio.wait_for(run_async(edited, mapping=_mapping(directory, restore=True)), 30)


def test_restore_after_a_run_stopped_before_its_first_checkpoint_names_an_earlier_checkpoint_of_another_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an upgrade, a fresh run stopped before its first checkpoint: ``--restore`` said the earlier run's
    checkpoint, which it does not resume, is in another format and to restore it with the aiod4p that wrote it.
    The message says what is so, that the last run has no checkpoint, with that checkpoint's id only."""
    directory, words = tmp_path / "ck", tmp_path / "words.txt"
    write_words(words, 5_000)
    run(word_count(words), 1, mapping=_mapping(directory), workers=1)
    store = CheckpointStore(directory)
    earlier = store.ids()[-1]
    manifest = json.loads((store.path(earlier) / MANIFEST).read_text())
    (store.path(earlier) / MANIFEST).write_text(json.dumps({**manifest, "version": 0, "aiod4p": "0.0.1"}))

    refused = _restored_after_a_run_failed_before_its_first_checkpoint(directory, words, monkeypatch)
    assert str(refused) == (
        f"--restore: no complete checkpoint of the last run in {directory}, which started after checkpoint"
        f" {earlier}: it was stopped before its first checkpoint completed; checkpoint {earlier} is of an earlier"
        " run, which that run did not resume (it started afresh, and its results file too): start the run afresh,"
        " without --restore"
    )
