"""Checkpoints on worker processes: SIGKILLed workers, global restarts, restore on other -n and mappings."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from ckpt_workflows import (
    Count,
    DiesDraining,
    DiesSaving,
    Echo,
    HeldLines,
    HeldPerAttempt,
    Split,
    complete_checkpoints,
    expected_counts,
    held_echo,
    held_echo_module,
    held_word_count,
    held_word_count_module,
    on_completed,
    paced_word_count,
    word_count,
    write_words,
)
from conftest import MappingCase
from helpers import aiod4p_process, recorded_supervisors

from aiod4p import InstanceStats, IterativePE, ProducerPE, WorkflowGraph, run, run_async, start
from aiod4p._checkpoint import Checkpointing, CheckpointStore
from aiod4p._stats_report import StatsSampler
from aiod4p.errors import Aiod4pError, CheckpointError, PeerDied, TransportError, WorkerDied
from aiod4p.mappings import get_mapping
from aiod4p.mappings._base import BaseMapping, RunControl
from aiod4p.mappings.asyncio import AsyncMapping
from aiod4p.sources import LinesSource, LiveFeed


def _file_counts(path: Path) -> dict[str, int]:
    counts = [tuple(json.loads(line)["data"]) for line in path.read_text().splitlines()]
    assert len(counts) == len(dict(counts)), "a result was written twice"
    return dict(counts)


@pytest.fixture(autouse=True)
def _spare_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOD4P_TEST_KILLS_SPARE", str(os.getpid()))


def _multi(directory: Path, results: Path | None, mapping_name: str = "multi", **options: object) -> BaseMapping:
    mapping = get_mapping(mapping_name)
    results_path = None if results is None else str(results)
    mapping.checkpointing = Checkpointing(directory, results_path=results_path, **{"interval": 0.05, **options})  # type: ignore[arg-type]
    return mapping


WORDS = int(os.environ.get("AIOD4P_TEST_CHECKPOINT_WORDS", 150_000))
"""Words of the SIGKILL tests; the issue's acceptance size is 2,000,000 (docs/recovery.md: how to run it)."""


def planned_kills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moments: str, name: str = "kills") -> Path:
    """Plan the SIGKILLs of worker processes (``_maybe_kill`` in tests/ckpt_workflows.py): the k-th comes in the
    first worker whose Count instances counted the k-th of ``moments`` (comma-separated) words since it started,
    once a checkpoint in ``tmp_path / "ck"`` completed since then. Returns the folder that gets a file per kill."""
    kills = tmp_path / name
    kills.mkdir()
    monkeypatch.setenv("AIOD4P_TEST_KILLS", f"{kills}:{moments}")
    monkeypatch.setenv("AIOD4P_TEST_KILLS_AFTER", str(tmp_path / "ck"))
    return kills


@pytest.fixture
def words(tmp_path: Path) -> Path:
    path = tmp_path / "words.txt"
    write_words(path, WORDS)
    return path


@pytest.mark.parametrize(("mapping", "workers"), [("multi", 2), ("multi", 4), ("mpi", 2)])
def test_three_sigkills_with_restarts_give_the_failure_free_results(
    tmp_path: Path,
    words: Path,
    mapping: str,
    workers: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A random worker dies at a random moment (seeded), 3 times, each after a checkpoint of its attempt."""
    if mapping == "mpi":
        pytest.importorskip("mpi4py")
    rng = random.Random(f"{mapping}{workers}")
    # The first worker whose Count instances counted T words dies; it holds at least 1/n of the words, so
    # the 3 kills come within 3/4 of them, whatever the checkpoints each restart resumes from.
    moments = ",".join(str(rng.randrange(WORDS // (20 * workers), WORDS // (4 * workers), 1000)) for _ in range(3))
    kills = planned_kills(tmp_path, monkeypatch, moments)
    results = tmp_path / "results.jsonl"
    # An attempt's first checkpoint completes once its barriers passed what the source read ahead (credits
    # batches a channel): kept small, so that it completes long before the input ends and the kill comes.
    checkpointed = _multi(tmp_path / "ck", results, mapping, restarts=5)
    with caplog.at_level(logging.WARNING, "aiod4p.checkpoint"):
        graph = held_word_count(words, tmp_path / "ck")
        got = run(graph, 1, mapping=checkpointed, workers=workers, batch_size=32, credits=2)
    assert sorted(p.name for p in kills.iterdir()) == ["kill-0", "kill-1", "kill-2"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("restart ") for m in messages) == 3
    assert sum(m.startswith("restoring checkpoint ") for m in messages) == 3  # each restart resumed from one
    expected = expected_counts(words)
    assert dict(record.data for record in got) == expected
    assert _file_counts(results) == expected


def test_a_plain_generator_source_is_checkpointed_within_its_call_and_restarted_exactly(
    tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dispel4py's usual source makes every line in one call of a plain generator: no checkpoint completed
    until that call ended, so a kill lost the whole run and, with --restarts, every result waited in the
    launcher's memory. Checkpoints are now taken within the call; each restart makes the call again from the
    state it began with and drops the lines it had delivered."""
    kills = planned_kills(tmp_path, monkeypatch, f"{WORDS // 10},{WORDS // 8}")
    results = tmp_path / "results.jsonl"
    graph = paced_word_count(words, tmp_path / "ck")
    got = run(graph, 1, mapping=_multi(tmp_path / "ck", results, restarts=3), workers=2, batch_size=32, credits=2)
    assert sorted(p.name for p in kills.iterdir()) == ["kill-0", "kill-1"]
    expected = expected_counts(words)
    assert dict(record.data for record in got) == expected
    assert _file_counts(results) == expected


async def test_an_endless_plain_generator_source_delivers_results_under_restarts(tmp_path: Path) -> None:
    """Under --restarts a result is handed on once a checkpoint commits it: with an endless plain generator
    source none was, and every result waited in the launcher's memory for the end of a run that never ends."""
    graph = WorkflowGraph()
    graph.connect(source := Endless(), "output", Double(), "input")
    source.id = "ticks"
    async with asyncio.timeout(60), start(graph, 1, mapping=_multi(tmp_path / "ck", None, restarts=1)) as workflow:
        got = [record.data async for record in _first(workflow, 2000)]
    assert len(set(got)) == 2000 and all(number % 2 == 0 for number in got)


class Endless(ProducerPE):
    def produce(self) -> Iterator[int]:
        yield from itertools.count()


class Double(IterativePE):
    def process_item(self, item: int) -> int:
        return 2 * item


async def _first(records: AsyncIterator[Any], count: int) -> AsyncIterator[Any]:
    async for record in records:
        yield record
        count -= 1
        if not count:
            return


def test_restore_on_other_n_and_mapping(tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """multi -n 2 killed -> restored on multi -n 4, killed -> restored on async -n 1: the same counts."""
    planned_kills(tmp_path, monkeypatch, "20000,15000")
    directory, results = tmp_path / "ck", tmp_path / "results.jsonl"

    with pytest.raises(WorkerDied):
        run(held_word_count(words, directory), 1, mapping=_multi(directory, results), workers=2)
    first = CheckpointStore(directory).latest()
    assert first is not None
    with pytest.raises(WorkerDied):
        run(held_word_count(words, directory), 1, mapping=_multi(directory, results, restore=True), workers=4)
    second = CheckpointStore(directory).latest()
    assert second is not None and second.id > first.id
    mapping = AsyncMapping()
    mapping.checkpointing = Checkpointing(directory, results_path=str(results), restore=True)
    got = run(word_count(words), 1, mapping=mapping, workers=1)
    assert dict(record.data for record in got) == expected_counts(words)
    assert _file_counts(results) == expected_counts(words)


def test_cli_restarts_after_sigkills(tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`aiod4p run -m multi --restarts 5` over two SIGKILLs: the --results file is exactly the failure-free one."""
    from aiod4p._cli import main

    kills = planned_kills(tmp_path, monkeypatch, "12000,9000")
    target = tmp_path / "wf.py"
    # Each attempt's input waits for a checkpoint of that attempt, which a worker must see before it kills.
    target.write_text(held_word_count_module(words, tmp_path / "ck"))
    results = tmp_path / "out.jsonl"
    argv = ["run", str(target), "-m", "multi", "-n", "2", "-i", "1", "--results", str(results), "-q"]
    checkpoints = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-interval", "0.05", "--restarts", "5"]
    assert main([*argv, *checkpoints]) == 0
    assert len(list(kills.iterdir())) == 2
    assert _file_counts(results) == expected_counts(words)


async def test_the_samples_over_a_restart_show_the_work_done(
    tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under --restarts the restarted attempt's counters begin again at its checkpoint's (here none: the start),
    and the samples of --stats-json went back with them: a negative throughput while the attempt did again what
    the ended one had done. The ended attempt's work stays counted (as last seen), and the restarted attempt's
    adds to it: 10,000 words counted, a worker SIGKILLed after 20,000 of its own, then every word again.

    The test samples when it knows where each attempt stands: attempt 1 holds its input after 1,000 lines
    until the test saw them counted, attempt 2 after 500."""
    kills = tmp_path / "kills"
    kills.mkdir()
    monkeypatch.setenv("AIOD4P_TEST_KILLS", f"{kills}:20000")
    gate = tmp_path / "gate"
    graph = word_count(words, lines=HeldPerAttempt(words, gate, (1_000, 500)))
    counted: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]  # each attempt's counts at its hold, reported
    since_restart: set[int] = set()  # the workers that reported since the restart
    publish = RunControl.publish_stats

    def watch(control: RunControl, worker: int, stats: list[InstanceStats]) -> None:
        publish(control, worker, stats)
        restarted = any(record.getMessage().startswith("restart 1 of 1") for record in caplog.records)
        if restarted:
            since_restart.add(worker)
        total = sum(entry.items_in for entry in control.stats() if entry.pe == "count")
        if not restarted and total == 10_000:
            counted[0].set()
        elif since_restart == {0, 1} and total == 5_000:
            counted[1].set()

    monkeypatch.setattr(RunControl, "publish_stats", watch)
    mapping = _multi(tmp_path / "ck", None, restarts=1, interval=3600)  # no checkpoint: a restart starts afresh
    with caplog.at_level(logging.WARNING, "aiod4p.checkpoint"):
        async with asyncio.timeout(50), start(graph, 1, mapping=mapping, workers=2) as live:
            sampler = StatsSampler(live)
            results = asyncio.ensure_future(live.results())
            for attempt, event in enumerate(counted):
                await event.wait()
                sampler.sample()
                (tmp_path / f"gate-{attempt}").touch()
            got = await results
            sampler.sample()
    assert dict(record.data for record in got) == expected_counts(words)
    assert len(list(kills.iterdir())) == 1
    assert [sample["pes"]["count"][0] for sample in sampler.samples] == [10_000, 15_000, 10_000 + WORDS]
    for before, after in itertools.pairwise(sampler.samples):
        for pe, work in after["pes"].items():
            assert all(now >= then for now, then in zip(work, before["pes"][pe], strict=True)), (pe, before, after)
    assert sum(entry.items_in for entry in live.stats if entry.pe == "count") == WORDS  # the totals: each word once


async def test_restarts_let_the_ended_attempts_go(tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two SIGKILLs, two restarts: once the run is over (its WorkflowRun still at hand), no attempt's supervisor
    is alive. The run's control kept each one, with its comms and their buffers: the launcher grew by
    about 550 kB a restart, for as long as the run lasted."""
    supervisors = recorded_supervisors(monkeypatch)
    kills = planned_kills(tmp_path, monkeypatch, "12000,9000")
    results = tmp_path / "results.jsonl"
    graph = held_word_count(words, tmp_path / "ck")
    async with (
        asyncio.timeout(50),
        start(graph, 1, mapping=_multi(tmp_path / "ck", results, restarts=5), workers=2) as live,
    ):
        got = await live.results()
    assert len(list(kills.iterdir())) == 2 and len(supervisors) == 3
    assert dict(record.data for record in got) == expected_counts(words)
    gc.collect()  # an ended attempt may wait for the collector (its errors and frames form cycles): not a leak
    assert [ref() for ref in supervisors] == [None, None, None]
    assert live.done  # the run, and its control, are still here


def _split_count() -> WorkflowGraph:
    """split (a root: give it lines) -> count (keyed word counts, its worker SIGKILLed by a kill plan)."""
    split, count = Split(), Count()
    split.id, count.id = "split", "count"
    graph = WorkflowGraph()
    graph.connect(split, "output", count, "input")
    return graph


async def test_a_feed_that_is_an_async_generator_is_not_restarted(
    tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart's attempt found the generator stopped (cancelled while the dead attempt read it): its root ended
    at once, and the run succeeded with the rest of the input dropped. It now fails, naming the PE."""
    kills = planned_kills(tmp_path, monkeypatch, "3000")
    lines = (await asyncio.to_thread(words.read_text)).splitlines()
    checkpointed = asyncio.Event()

    async def read_once() -> AsyncIterator[str]:
        for number, line in enumerate(lines):
            if number == 100:  # the kill comes once a checkpoint of the attempt completed
                await checkpointed.wait()
            yield line

    mapping = _multi(tmp_path / "ck", None, restarts=2)
    dropped = r"; not restarted, since the input of PE split is an async iterator, which a restart cannot read again"
    with on_completed(lambda n: checkpointed.set()), pytest.raises(WorkerDied, match=dropped):
        async with asyncio.timeout(50):
            await run_async(_split_count(), {"split": read_once()}, mapping=mapping, workers=2)
    assert len(list(kills.iterdir())) == 1


async def test_sends_to_a_live_feed_go_on_over_a_restart(
    tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker SIGKILLed while the application sends lines: the restart ended the feed's first reading, and
    ``run.send`` waited forever for the run to end. It now waits for the new attempt to take the lines. (What
    the dead attempt had taken from the feed is lost: a LiveFeed is at-most-once.)"""
    kills = planned_kills(tmp_path, monkeypatch, "3000")
    lines = (await asyncio.to_thread(words.read_text)).splitlines()
    checkpointed = asyncio.Event()
    feed = LiveFeed(maxsize=16)
    mapping = _multi(tmp_path / "ck", None, restarts=2)
    with on_completed(lambda n: checkpointed.set()):
        async with asyncio.timeout(50), start(_split_count(), {"split": feed}, mapping=mapping, workers=2) as live:
            for number, line in enumerate(lines):
                await live.send("split", line)
                if number == 100:  # the kill comes once a checkpoint of the attempt completed
                    await checkpointed.wait()
            feed.close()
            got = dict(record.data for record in await live.results())
    assert len(list(kills.iterdir())) == 1
    expected = expected_counts(words)
    assert got.keys() == expected.keys() and all(got[word] <= expected[word] for word in got)


@pytest.mark.parametrize("mapping", ["multi", "mpi"])
def test_results_streamed_before_a_restart_are_not_handed_on_twice(
    tmp_path: Path, words: Path, mapping: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result made as soon as its line is read, a worker SIGKILLed: the restart makes again what followed
    its checkpoint. The run's results held those twice (12,908 of 20,000 lines, measured); now each once."""
    if mapping == "mpi":
        pytest.importorskip("mpi4py")
    kills = planned_kills(tmp_path, monkeypatch, "30000")
    results = tmp_path / "results.jsonl"
    graph = held_echo(words, tmp_path / "ck")
    got = run(graph, 1, mapping=_multi(tmp_path / "ck", results, mapping, restarts=2), workers=2)
    assert len(list(kills.iterdir())) == 1
    lines = words.read_text().splitlines()
    assert sorted(record.data for record in got) == sorted(lines)
    assert sorted(json.loads(line)["data"] for line in results.read_text().splitlines()) == sorted(lines)


def test_results_that_go_to_the_file_alone_are_counted_once_over_a_restart(
    tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``results_counted``, the run holds no result for a reader until a checkpoint commits it (an interval
    of results, gigabytes for a fast stream); it counts each once, as the file holds it once."""
    kills = planned_kills(tmp_path, monkeypatch, "30000")
    results = tmp_path / "results.jsonl"
    counted: list[int] = []
    mapping = _multi(tmp_path / "ck", results, restarts=2, results_counted=counted.append)
    got = run(held_echo(words, tmp_path / "ck"), 1, mapping=mapping, workers=2)
    assert len(list(kills.iterdir())) == 1
    lines = words.read_text().splitlines()
    assert list(got) == []
    assert sorted(json.loads(line)["data"] for line in results.read_text().splitlines()) == sorted(lines)
    assert sum(counted) == len(lines)


def test_cli_counts_each_result_once_over_a_restart(
    tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`aiod4p run --restarts` prints the results on stdout, and the count of a --results file, once each."""
    from aiod4p._cli import main

    lines = words.read_text().splitlines()
    target = tmp_path / "wf.py"
    target.write_text(held_echo_module(words, tmp_path / "ck"))
    for results in ("-", str(tmp_path / "out.jsonl")):
        kills = planned_kills(tmp_path, monkeypatch, "30000", f"kills{len(results)}")
        argv = ["run", str(target), "-m", "multi", "-n", "2", "-i", "1", "--results", results]
        checkpoints = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-interval", "0.05", "--restarts", "2"]
        assert main([*argv, *checkpoints]) == 0
        assert len(list(kills.iterdir())) == 1
        out, err = capfd.readouterr()
        if results == "-":
            assert sorted(json.loads(line)["data"] for line in out.splitlines()) == sorted(lines)
        else:
            assert f"aiod4p: {len(lines)} records in " in err


def test_checkpoint_of_multi_restores_on_mpi(tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mpi4py")
    planned_kills(tmp_path, monkeypatch, "20000")
    directory, results = tmp_path / "ck", tmp_path / "results.jsonl"
    resumes = r"; not restarted \(--restarts 0\): --restore resumes it from checkpoint \d+"
    with pytest.raises(WorkerDied, match=resumes) as died:  # what a user needs to go on
        run(held_word_count(words, directory), 1, mapping=_multi(directory, results), workers=2)
    latest = CheckpointStore(directory).latest()
    assert latest is not None and f"from checkpoint {latest.id} in {directory}" in str(died.value)
    got = run(word_count(words), 1, mapping=_multi(directory, results, "mpi", restore=True), workers=3)
    assert dict(record.data for record in got) == expected_counts(words)
    assert _file_counts(results) == expected_counts(words)


def _replaying_mpiexec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> Path:
    """Make aiod4p's first mpiexec launch run tests/mpi_link_breaks.py's ranks (``mode``: ``dies`` or ``aborts``)
    in place of ``-m aiod4p.mappings._mpi_job SOCKET``, and later ones aiod4p's; returns the dead rank's pid file."""
    real = Path(sys.executable).parent / "mpiexec"
    first, pidfile = tmp_path / "first-launch", tmp_path / "dead-rank.pid"
    wrapper = tmp_path / "mpiexec"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "args = sys.argv[1:]\n"
        f"if not os.path.exists({str(first)!r}):\n"
        f"    open({str(first)!r}, 'x').close()\n"
        "    at = args.index('aiod4p.mappings._mpi_job')\n"
        f"    args = [*args[: at - 1], {str(Path(__file__).with_name('mpi_link_breaks.py'))!r}, args[at + 1],"
        f" {str(pidfile)!r}, {mode!r}]\n"
        f"os.execv({str(real)!r}, [{str(real)!r}, *args])\n"
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("AIOD4P_MPIEXEC", str(wrapper))
    return pidfile


def test_a_dead_rank_restarts_the_run_when_rank_0_reports_the_broken_link_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 0 reports its statistics and the MPI error of its link to a rank that died before the launcher hears
    of the death (the mpiexec's exit): the death is still the run's error, and --restarts restarts it. The first
    launch's ranks (tests/mpi_link_breaks.py) replay that order; it failed the run with that TransportError, not
    restarted."""
    pytest.importorskip("mpi4py")
    pidfile = _replaying_mpiexec(tmp_path, monkeypatch, "dies")
    words = tmp_path / "words.txt"
    write_words(words, 1000)
    with caplog.at_level(logging.WARNING, "aiod4p.checkpoint"):
        got = run(word_count(words), 1, mapping=_multi(tmp_path / "ck", None, "mpi", restarts=1), workers=2)
    assert dict(record.data for record in got) == expected_counts(words)
    restarts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restart ")]
    assert pidfile.read_text()  # rank 1 died
    assert len(restarts) == 1, restarts
    # Hydra's banner names a rank that ended by SIGKILL: rank 1, or, on a loaded machine, rank 0, which its
    # cleanup killed the same way and reaped first (seen once in a loaded CI run).
    assert re.match(r"restart 1 of 1 after: MPI rank [01] \(pid \d+ on \S+; it ran ", restarts[0]), restarts
    assert "ended with exit code 9 (Killed (signal 9))" in restarts[0]


def test_an_mpi_error_with_no_rank_dead_is_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """MPI failing on rank 0 while every rank lives is MPI's own error: a restart would meet it again."""
    pytest.importorskip("mpi4py")
    _replaying_mpiexec(tmp_path, monkeypatch, "aborts")
    words = tmp_path / "words.txt"
    write_words(words, 1000)
    with (
        caplog.at_level(logging.WARNING, "aiod4p.checkpoint"),
        pytest.raises(TransportError, match="MPI failed on rank 0") as caught,
    ):
        run(word_count(words), 1, mapping=_multi(tmp_path / "ck", None, "mpi", restarts=1), workers=2)
    assert not isinstance(caught.value, PeerDied)
    assert not [r.getMessage() for r in caplog.records if r.getMessage().startswith("restart ")]


def test_a_checkpoint_torn_by_a_kill_while_saving_is_ignored(
    tmp_path: Path, words: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker SIGKILLed while checkpoint k >= 2 is being written: the restart resumes from checkpoint k - 1."""
    died = tmp_path / "died"
    monkeypatch.setenv("AIOD4P_TEST_DIE_SAVING", f"{died}:{tmp_path / 'ck'}")
    results = tmp_path / "results.jsonl"
    held = HeldLines(words, until=died, hold_after=100)  # the first attempt's input outlasts checkpoint 2
    graph = word_count(words, DiesSaving(), held)
    with caplog.at_level(logging.WARNING, "aiod4p.checkpoint"):
        got = run(graph, 1, mapping=_multi(tmp_path / "ck", results, restarts=1), workers=2)
    torn = int(died.read_text())
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("ignoring torn checkpoint") and f"chk-{torn:08d}" in m for m in messages), messages
    assert f"restoring checkpoint {torn - 1} from " + str(tmp_path / "ck") in messages
    assert dict(record.data for record in got) == expected_counts(words)
    assert _file_counts(results) == expected_counts(words)


def test_ray_restarts_its_actors_after_a_sigkill(
    ray_cluster: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ray mapping: a SIGKILLed worker actor, new actors restored from the last checkpoint."""
    pytest.importorskip("ray")
    from aiod4p.mappings.ray import RayMapping

    words = tmp_path / "words.txt"
    write_words(words, 40_000)
    kills = tmp_path / "kills"
    kills.mkdir()
    environment = {  # the actors' processes are the cluster's: they get the kill plan through Ray
        "AIOD4P_TEST_KILLS": f"{kills}:5000",
        "AIOD4P_TEST_KILLS_AFTER": str(tmp_path / "ck"),
        "AIOD4P_TEST_KILLS_SPARE": str(os.getpid()),
    }
    mapping = RayMapping(runtime_env={"env_vars": environment})
    results = tmp_path / "results.jsonl"
    mapping.checkpointing = Checkpointing(tmp_path / "ck", results_path=str(results), interval=0.05, restarts=2)
    with caplog.at_level(logging.WARNING, "aiod4p.checkpoint"):  # small batches: as the three-SIGKILL test
        graph = held_word_count(words, tmp_path / "ck")
        got = run(graph, 1, mapping=mapping, workers=2, batch_size=32, credits=2)
    assert [p.name for p in kills.iterdir()] == ["kill-0"]
    assert sum(r.getMessage().startswith("restoring checkpoint ") for r in caplog.records) == 1
    assert dict(record.data for record in got) == expected_counts(words)
    assert _file_counts(results) == expected_counts(words)


def test_ray_takes_a_relative_checkpoint_directory_as_the_drivers(
    ray_cluster: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative directory is in the driver's working directory, not in the actors' (the cluster's)."""
    pytest.importorskip("ray")
    words = tmp_path / "words.txt"
    write_words(words, 1000)
    monkeypatch.chdir(tmp_path)  # the actors' working directory is where the cluster was started
    graph = held_word_count(words, tmp_path / "ck")  # its input waits for a checkpoint that the actors commit
    got = run(graph, 1, mapping=_multi(Path("ck"), Path("results.jsonl"), "ray"), workers=2)
    assert dict(record.data for record in got) == expected_counts(words)
    assert _file_counts(tmp_path / "results.jsonl") == expected_counts(words)
    assert list((tmp_path / "ck").glob("chk-*/MANIFEST.json"))


def _followed_word_count(tmp_path: Path) -> tuple[Path, WorkflowGraph]:
    """A word count of a 1000-word file that it follows (a live run: it ends only when drained)."""
    path = tmp_path / "words.txt"
    write_words(path, 1000)
    return path, word_count(path, lines=LinesSource(path, follow=True))


class _Completions:
    """Sets ``reached`` once ``wanted`` checkpoints completed."""

    def __init__(self, wanted: int) -> None:
        self.wanted, self.reached = wanted, asyncio.Event()

    def completed(self, n: int) -> None:
        self.wanted -= 1
        if self.wanted <= 0:
            self.reached.set()


@pytest.mark.parametrize("mapping", ["async", "multi"])
async def test_checkpoints_go_on_while_a_live_source_waits_for_input(tmp_path: Path, mapping: str) -> None:
    """A followed file with nothing new to read: checkpoints still complete (they used to wait for its next line)."""
    path, graph = _followed_word_count(tmp_path)
    checkpointed = _multi(tmp_path / "ck", tmp_path / "results.jsonl", mapping)
    completions = _Completions(3)  # the source has nothing left to read long before the third
    with on_completed(completions.completed):
        async with asyncio.timeout(30), start(graph, 1, mapping=checkpointed, workers=2) as live:
            results = asyncio.ensure_future(live.results())
            await completions.reached.wait()
            live.drain()
            got = await results
    assert dict(record.data for record in got) == expected_counts(path)


@pytest.mark.parametrize("mapping", ["async", "multi", "mpi"])
async def test_a_drained_run_ends_with_a_checkpoint_that_restores_to_nothing(tmp_path: Path, mapping: str) -> None:
    """Its last checkpoint holds every instance finished and commits every result: ``--restore`` resumes no
    source, and leaves the results file as the drained run wrote it (it used to truncate it and resume)."""
    path, graph = _followed_word_count(tmp_path)
    results = tmp_path / "results.jsonl"
    checkpointed, completions = _multi(tmp_path / "ck", results, mapping), _Completions(2)
    with on_completed(completions.completed):
        async with asyncio.timeout(60), start(graph, 1, mapping=checkpointed, workers=2) as live:
            ended = asyncio.ensure_future(live.results())
            await completions.reached.wait()
            live.drain()
            await ended
    written = results.read_bytes()
    assert _file_counts(results) == expected_counts(path)
    again = word_count(path, lines=LinesSource(path, follow=True))
    restored = _multi(tmp_path / "ck", results, mapping, restore=True)
    async with asyncio.timeout(60), start(again, 1, mapping=restored, workers=2) as live:
        assert len(await live.results()) == 0
    assert results.read_bytes() == written


def _held_word_count(path: Path, go: Path) -> WorkflowGraph:
    """Word count of ``path``, whose lines after the 100th wait until the file ``go`` exists."""
    return word_count(path, lines=HeldLines(path, until=go, hold_after=100))


@pytest.mark.parametrize(
    "mapping", [MappingCase(name, 2) for name in ("async", "multi", "mpi", "ray")], ids=lambda case: case.id
)
async def test_a_suspended_run_stops_at_a_checkpoint_and_its_restore_goes_on_exactly_once(
    tmp_path: Path, mapping: MappingCase, request: pytest.FixtureRequest
) -> None:
    """An operator stopping a live ingest for maintenance: a drain would finish it (Count's counts written in its
    postprocess, its source recorded as finished), and its restore would resume nothing. A suspended run stops at
    a checkpoint with no postprocess, is not recorded as ended, and its restore counts every word once."""
    if mapping.name == "ray":
        request.getfixturevalue("ray_cluster")  # the ray mapping joins it through RAY_ADDRESS
    path, go, results = tmp_path / "words.txt", tmp_path / "go", tmp_path / "results.jsonl"
    write_words(path, 3000)
    completions = _Completions(1)
    with on_completed(completions.completed):
        async with (
            asyncio.timeout(60),
            start(
                _held_word_count(path, go),
                1,
                mapping=_multi(tmp_path / "ck", results, mapping.name),
                workers=mapping.workers,
            ) as live,
        ):
            ended = asyncio.ensure_future(live.results())
            await completions.reached.wait()
            live.suspend()
            assert len(await ended) == 0  # Count writes only in postprocess, which a suspended run does not run
    assert live.suspended is not None and live.suspended >= 1
    assert results.read_bytes() == b""
    assert CheckpointStore(tmp_path / "ck").unfinished_run() is not None
    go.touch()
    restored = _multi(tmp_path / "ck", results, mapping.name, restore=True)
    async with (
        asyncio.timeout(60),
        start(_held_word_count(path, go), 1, mapping=restored, workers=mapping.workers) as live,
    ):
        await live.results()
    assert live.suspended is None
    assert _file_counts(results) == expected_counts(path)


@pytest.mark.parametrize("mapping", ["async", "multi"])
async def test_a_suspended_run_leaves_its_results_file_as_its_checkpoint_committed_it(
    tmp_path: Path, mapping: str
) -> None:
    """Suspended while its results stream (the reader's first result asks for it): the file holds what the
    checkpoint committed, no more (what followed is made again by the restore), and the restore completes it with
    every line once."""
    path, go, results = tmp_path / "words.txt", tmp_path / "go", tmp_path / "results.jsonl"
    write_words(path, 200_000)

    def echo() -> WorkflowGraph:
        graph, lines, echo = WorkflowGraph(), HeldLines(path, until=go, hold_after=15_000), Echo()
        lines.id, echo.id = "lines", "echo"
        graph.connect(lines, "output", echo, "input")
        return graph

    async with asyncio.timeout(60), start(echo(), mapping=_multi(tmp_path / "ck", results, mapping), workers=2) as live:
        async for _ in live:
            live.suspend()
    assert live.suspended is not None
    committed = CheckpointStore(tmp_path / "ck").latest()
    assert committed is not None and committed.id == live.suspended
    assert results.stat().st_size == committed.results_offset
    go.touch()
    restored = _multi(tmp_path / "ck", results, mapping, restore=True)
    async with asyncio.timeout(60), start(echo(), mapping=restored, workers=2) as live:
        await live.results()
    assert sorted(json.loads(line)["data"] for line in results.read_text().splitlines()) == sorted(
        path.read_text().splitlines()
    )


class _NotedSplit(Split):
    """A :class:`Split` that notes the pid of its process in the folder ``pids``."""

    def __init__(self, pids: Path) -> None:
        super().__init__()
        self.pids = pids

    def preprocess(self) -> None:
        (self.pids / str(os.getpid())).touch()


async def test_a_worker_dying_while_the_run_suspends_stops_it_at_its_last_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Suspended once checkpoint 1 completed, and a worker SIGKILLed before checkpoint 2, the one the suspend
    takes, can complete: not restarted (the operator asked the run to stop), it stops at checkpoint 1 with a warning
    naming the death, and the restore counts every word once."""
    path, go, results, pids = tmp_path / "words.txt", tmp_path / "go", tmp_path / "results.jsonl", tmp_path / "pids"
    write_words(path, 3000)
    pids.mkdir()
    graph = word_count(path, _NotedSplit(pids), HeldLines(path, until=go, hold_after=100))
    mapping = _multi(tmp_path / "ck", results, restarts=2, interval=1.0)  # checkpoint 2 comes by the suspend
    live = start(graph, 1, mapping=mapping, workers=2)

    def suspend_and_kill() -> None:
        live.suspend()
        os.kill(max(int(pid.name) for pid in pids.iterdir()), signal.SIGKILL)

    def completed(n: int) -> None:
        if n == 1:  # the next turn: a suspend asked now would stop the run at this checkpoint
            asyncio.get_running_loop().call_soon(suspend_and_kill)

    with caplog.at_level(logging.WARNING, "aiod4p.checkpoint"), on_completed(completed):
        async with asyncio.timeout(60), live:
            assert len(await live.results()) == 0
    assert live.suspended == 1
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("suspended at checkpoint 1 after: ")]
    assert results.read_bytes() == b""
    go.touch()
    again = word_count(path, Split(), HeldLines(path, until=go, hold_after=100))
    restored = _multi(tmp_path / "ck", results, restore=True)
    async with asyncio.timeout(60), start(again, 1, mapping=restored, workers=2) as live:
        await live.results()
    assert _file_counts(results) == expected_counts(path)


def _held_word_count_file(tmp_path: Path, path: Path, go: Path) -> Path:
    """A workflow file of :func:`_held_word_count`, for ``aiod4p run``."""
    flow = tmp_path / "flow.py"
    flow.write_text(
        "from ckpt_workflows import HeldLines, word_count\n"
        f"graph = word_count({str(path)!r}, lines=HeldLines({str(path)!r}, until={str(go)!r}, hold_after=100))\n"
    )
    return flow


def _suspended_by_sigterm(argv: list[str], env: dict[str, str], checkpoints: Path) -> tuple[int, str]:
    """Run ``aiod4p ARGV --on-signal suspend``, SIGTERM it once a checkpoint is complete; its exit status and stderr."""
    process = aiod4p_process(*argv, "--on-signal", "suspend", env=env)
    try:
        deadline = time.monotonic() + 60
        while not complete_checkpoints(checkpoints) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # ok-sleep: polls files that the run's processes write
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, err


def test_cli_suspends_on_a_signal_and_restore_resumes_exactly_once(tmp_path: Path) -> None:
    """`--on-signal suspend`, for a unit that systemd stops with SIGTERM: exit 0, the line says where it stopped and
    what resumes it, and `--restore` after it counts every word once."""
    path, go, results, checkpoints = tmp_path / "words.txt", tmp_path / "go", tmp_path / "out.jsonl", tmp_path / "ck"
    write_words(path, 3000)
    flow = _held_word_count_file(tmp_path, path, go)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    argv = ["run", str(flow), "-m", "multi", "-n", "2", "-i", "1", "--results", str(results)]
    argv += ["--checkpoint-dir", str(checkpoints), "--checkpoint-interval", "0.05"]
    status, err = _suspended_by_sigterm(argv, env, checkpoints)
    assert status == 0, err
    assert "aiod4p: SIGTERM: suspending: taking a checkpoint to stop at (send it again to abort)" in err
    last = err.splitlines()[-2]  # the last is the count of the results file
    assert re.fullmatch(
        rf"aiod4p: interrupted by SIGTERM: suspended at checkpoint \d+ in {re.escape(str(checkpoints))}; 0 records"
        r" committed \(--restore resumes the run from there\)",
        last,
    ), err
    assert results.read_bytes() == b""
    go.touch()
    process = aiod4p_process(*argv, "--restore", env=env)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert _file_counts(results) == expected_counts(path)


def test_cli_suspended_on_async_with_restarts_says_its_printed_results_may_be_made_again(tmp_path: Path) -> None:
    """`--restarts` is ignored on async, whose results are printed as they come (`--results -`): some printed may
    follow the checkpoint, and the restore makes them again, so the line says they were produced, not committed."""
    path, go, checkpoints = tmp_path / "words.txt", tmp_path / "go", tmp_path / "ck"
    write_words(path, 3000)
    flow = _held_word_count_file(tmp_path, path, go)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    argv = ["run", str(flow), "-m", "async", "-i", "1", "--results", "-", "--restarts", "1"]
    argv += ["--checkpoint-dir", str(checkpoints), "--checkpoint-interval", "0.05"]
    status, err = _suspended_by_sigterm(argv, env, checkpoints)
    assert status == 0, err
    assert re.fullmatch(
        rf"aiod4p: interrupted by SIGTERM: suspended at checkpoint \d+ in {re.escape(str(checkpoints))}; 0 records"
        r" produced \(--restore resumes the run from there, and makes again those produced after it\)",
        err.splitlines()[-1],
    ), err


@pytest.mark.parametrize("mapping", ["async", "multi"])
async def test_drain_and_suspend_do_not_mix_the_first_asked_stands(tmp_path: Path, mapping: str) -> None:
    """Asked both, a run drained or suspended by timing: a drain's postprocess gave partial windows to the reader,
    then the suspend made the restore go on. A run that drains cannot be suspended (said), and a run being
    suspended is not drained."""
    path, go = tmp_path / "words.txt", tmp_path / "go"
    write_words(path, 3000)
    drained = _multi(tmp_path / "ck1", tmp_path / "results1.jsonl", mapping)
    async with asyncio.timeout(60), start(_held_word_count(path, go), 1, mapping=drained, workers=2) as live:
        live.drain()
        with pytest.raises(Aiod4pError, match=r"suspend\(\): the run drains already"):
            live.suspend()
        await live.results()
    assert live.suspended is None
    suspended = _multi(tmp_path / "ck2", tmp_path / "results2.jsonl", mapping)
    async with asyncio.timeout(60), start(_held_word_count(path, go), 1, mapping=suspended, workers=2) as live:
        live.suspend()
        live.drain()
        assert len(await live.results()) == 0  # no postprocess: not drained
    assert live.suspended is not None


async def test_a_run_without_checkpoints_cannot_be_suspended() -> None:
    """It could not be resumed: suspend() says so, and the run goes on."""
    async with asyncio.timeout(30), start(_split_count(), {"split": ["a b a"]}) as live:
        with pytest.raises(Aiod4pError, match=r"suspend\(\): this run takes no checkpoints"):
            live.suspend()
        assert sorted(record.data for record in await live.results()) == [("a", 2), ("b", 1)]


async def test_a_worker_dying_while_the_run_drains_is_not_restarted_and_restore_loses_nothing(tmp_path: Path) -> None:
    """A restart would stop the restored sources at once, where the checkpoint left them: what they had produced
    since would be lost. The run fails instead, naming the checkpoint that ``--restore`` resumes from."""
    path = tmp_path / "words.txt"
    write_words(path, 3000)
    results = tmp_path / "results.jsonl"
    graph = word_count(path, split=DiesDraining(), lines=LinesSource(path, follow=True))
    completions, mapping = _Completions(2), _multi(tmp_path / "ck", results, restarts=3)
    with on_completed(completions.completed):
        async with asyncio.timeout(60), start(graph, 1, mapping=mapping, workers=2) as live:
            ended = asyncio.ensure_future(live.results())
            await completions.reached.wait()
            live.drain()
            with pytest.raises(WorkerDied, match="not restarted, since the run was draining") as failure:
                await ended
    assert "--restore resumes it from checkpoint" in str(failure.value)
    again = word_count(path, lines=LinesSource(path, follow=True))  # the same PE ids; a Split that lives
    restored = _multi(tmp_path / "ck", results, restore=True)
    async with asyncio.timeout(60), start(again, 1, mapping=restored, workers=2) as live:
        live.drain()  # a followed file drains to its end
        await live.results()
    assert _file_counts(results) == expected_counts(path)


@pytest.mark.parametrize("mapping", ["async", "multi"])
async def test_a_checkpoint_that_cannot_be_written_fails_the_run_naming_the_file(tmp_path: Path, mapping: str) -> None:
    """The checkpoint folder turns into a file in the middle of a live run: a CheckpointError names the file."""
    _, graph = _followed_word_count(tmp_path)
    directory = tmp_path / "ck"
    completions = _Completions(1)
    with on_completed(completions.completed), pytest.raises(CheckpointError) as failure:
        async with (
            asyncio.timeout(30),
            start(graph, 1, mapping=_multi(directory, None, mapping), workers=2) as live,
        ):
            results = asyncio.ensure_future(live.results())
            await completions.reached.wait()
            shutil.rmtree(directory)
            directory.write_text("not a folder")
            await results
    assert str(failure.value).startswith(("cannot write checkpoint 2: ", "cannot commit checkpoint 2: "))
    assert str(directory / "chk-00000002") in str(failure.value)


@pytest.mark.parametrize("mapping", ["async", "multi"])
async def test_a_checkpoint_that_cannot_be_committed_fails_the_run_naming_it(tmp_path: Path, mapping: str) -> None:
    """The coordinator cannot write checkpoint 2's manifest: the run fails with a CheckpointError naming it."""
    _, graph = _followed_word_count(tmp_path)
    directory = tmp_path / "ck"

    def trap(n: int) -> None:  # checkpoint 1 completed: checkpoint 2's manifest will find a folder in its place
        if n == 1:
            (directory / "chk-00000002" / "MANIFEST.json").mkdir(parents=True)

    with on_completed(trap), pytest.raises(CheckpointError) as failure:
        async with asyncio.timeout(30), start(graph, 1, mapping=_multi(directory, None, mapping)) as live:
            await live.results()
    assert str(failure.value).startswith(f"cannot commit checkpoint 2: {directory / 'chk-00000002'}: ")
    latest = CheckpointStore(directory).latest()  # checkpoint 2 is torn: ignored
    assert latest is not None and latest.id == 1
    assert not list((directory / "chk-00000002").glob("*.tmp-*"))  # the failed write left no temporary file


class _Lines(IterativePE):
    def process_item(self, line: str) -> str:
        return line


def _followed_lines(path: Path) -> WorkflowGraph:
    graph = WorkflowGraph()
    source, lines = LinesSource(path, follow=True, poll_interval=0.01), _Lines()
    source.id, lines.id = "log", "lines"
    graph.connect(source, "output", lines, "input")
    return graph


async def _results_until(live: Any, last: str) -> None:
    async for record in live:
        if record.data == last:
            return


@pytest.mark.parametrize("mapping", ["async", "multi"])
async def test_a_restore_after_a_copytruncate_reads_the_new_lines_from_the_top(tmp_path: Path, mapping: str) -> None:
    """logrotate's copytruncate after a checkpoint at line 3: the restore dropped the new file's first 3 lines
    (results 1, 2, 3, 7 where 4 to 7 were written). The checkpoint knows which file its lines were read from."""
    path, results = tmp_path / "app.log", tmp_path / "results.jsonl"
    path.write_text("1\n2\n3\n")
    completions = _Completions(2)
    async with asyncio.timeout(60):
        async with start(_followed_lines(path), 1, mapping=_multi(tmp_path / "ck", results, mapping)) as live:
            await _results_until(live, "3")
            with on_completed(completions.completed):
                await completions.reached.wait()  # a checkpoint taken after line 3
        # leaving the block aborted the run, as a crash would
        with path.open("r+") as log:
            log.truncate(0)
            log.write("4\n5\n6\n7\n")
        restored = _multi(tmp_path / "ck", results, mapping, restore=True)
        async with start(_followed_lines(path), 1, mapping=restored) as live:
            await _results_until(live, "7")
            live.drain()
            await live.results()
    written = [json.loads(line)["data"] for line in results.read_text().splitlines()]
    assert sorted(written, key=int) == [str(n) for n in range(1, 8)]  # each once (multi: in any order)


class _PausedNumbers(ProducerPE):
    """0 to 99; after 10 of them, waits until it has taken its snapshot at barrier 1: the others are results
    written after barrier 1."""

    def preprocess(self) -> None:
        self.snapshotted = asyncio.Event()  # made on the worker's loop

    def snapshot(self) -> dict[str, Any]:
        self.snapshotted.set()
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Nothing to restore (the test does not restore)."""

    async def produce(self) -> AsyncIterator[int]:
        for number in range(100):
            if number == 10:
                await self.snapshotted.wait()
            yield number


class _Pass(IterativePE):
    def process_item(self, item: int) -> int:
        return item


async def test_a_worker_with_no_instance_does_not_hold_the_results_back(tmp_path: Path) -> None:
    """-n 3 with every PE on worker 0: workers 1 and 2 have no instance, and end before the first checkpoint
    (0.5 s). They used to never report their (no) final states, so the launcher's results gate waited for
    them for ever: checkpoints never completed, and the results written after barrier 1 were lost, the run
    ending well with 10 of its 100 results (also in the --results file)."""
    graph = WorkflowGraph()
    source = _PausedNumbers()
    source.parallelism = 1
    graph.connect(source, "output", passed := _Pass(), "input")
    passed.parallelism = 1
    results = tmp_path / "results.jsonl"
    checkpointed = _multi(tmp_path / "ck", results, interval=0.5)
    async with asyncio.timeout(60):
        got = await run_async(graph, 1, mapping=checkpointed, workers=3)
    assert sorted(got.data()) == list(range(100))
    assert sorted(json.loads(line)["data"] for line in results.read_text().splitlines()) == list(range(100))
