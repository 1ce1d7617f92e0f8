"""Per-instance statistics on every mapping, and the --stats / --stats-json reports."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import textwrap
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import workflows as wf
from conftest import MappingCase
from helpers import IMPORTED, SAYS_ITS_IMPORTS_FLOW, add_graph, aiod4p_cli

import aiod4p
from aiod4p import InstanceStats, PEError, Results, WorkflowGraph, WorkflowRun, group_by
from aiod4p._stats_report import MAX_SAMPLES, StatsSampler, stats_document, stats_table, summarise, write_stats_json
from aiod4p.errors import Aiod4pError

ROOT = Path(__file__).resolve().parents[1]
N = 1000


def run_with_stats(case: MappingCase, graph: WorkflowGraph, inputs: Any) -> tuple[Results, WorkflowRun]:
    async def go() -> tuple[Results, WorkflowRun]:
        async with asyncio.timeout(45):
            async with aiod4p.start(graph, inputs, mapping=case.name, workers=case.workers) as run:
                results = await run.results()
        return results, run

    return asyncio.run(go())


def by_pe(stats: list[InstanceStats]) -> dict[str, list[InstanceStats]]:
    grouped: dict[str, list[InstanceStats]] = {}
    for entry in stats:
        grouped.setdefault(entry.pe, []).append(entry)
    return grouped


def check_instances(run: WorkflowRun) -> None:
    """Exactly one entry per planned instance, on the worker the plan placed it."""
    seen = [(entry.pe, entry.instance) for entry in run.stats]
    assert sorted(seen) == sorted((ref.pe, ref.index) for ref in run.plan.instances())
    for entry in run.stats:
        assert entry.worker == run.plan.worker_of(aiod4p.InstanceRef(entry.pe, entry.instance))
        assert entry.errors == 0
        assert entry.busy_seconds >= 0 and entry.blocked_seconds >= 0
        assert entry.queued_items == 0  # finished: nothing waits
        assert entry.max_queued_items <= entry.inflight_bound
        assert (entry.batches_in == 0) == (entry.items_in == 0)


@dataclasses.dataclass
class StatsRun:
    """The four graphs below, run side by side as one workflow on one mapping, and what each is."""

    results: Results
    run: WorkflowRun
    pipeline: WorkflowGraph
    source: wf.Count
    broadcast: WorkflowGraph
    grouped: WorkflowGraph
    total: wf.SumAtEnd


_STATS_RUNS: dict[str, StatsRun] = {}


def stats_run(mapping: MappingCase) -> StatsRun:
    """One run per mapping of a pipeline (N items), a broadcast (200), a group-by (300) and a
    total written in postprocess (50), side by side: a launch per mapping instead of one per
    test and mapping (an MPI job, a Ray job); each test checks its own graph's counts."""
    if mapping.id not in _STATS_RUNS:
        pipeline, source = wf.pipeline(3)
        broadcast, grouped = wf.broadcast_graph(), wf.grouping_graph(group_by(0))
        totals = WorkflowGraph()
        totals.connect(wf.Count(), "output", total := wf.SumAtEnd(), "input")
        combined = WorkflowGraph()
        inputs: dict[str, int] = {}
        for part, count in ((pipeline, N), (broadcast, 200), (grouped, 300), (totals, 50)):
            add_graph(combined, part)
            inputs.update(dict.fromkeys(part.flatten().roots(), count))
        results, run = run_with_stats(mapping, combined, inputs)
        _STATS_RUNS[mapping.id] = StatsRun(results, run, pipeline, source, broadcast, grouped, total)
    return _STATS_RUNS[mapping.id]


def only(results: Results, graph: WorkflowGraph) -> list[Any]:
    """The data of ``graph``'s PEs among ``results``."""
    pes = graph.flatten().pes
    return [record.data for record in results.records if record.pe in pes]


def test_pipeline_counts_match_items_processed(mapping: MappingCase) -> None:
    shared = stats_run(mapping)
    graph, source, run = shared.pipeline, shared.source, shared.run
    assert len(only(shared.results, graph)) == N
    check_instances(run)
    grouped = {pe_id: entries for pe_id, entries in by_pe(run.stats).items() if pe_id in graph.flatten().pes}
    assert sorted(grouped) == sorted(graph.flatten().pes)
    assert sum(e.items_in for e in grouped[source.id]) == N  # feed elements
    for pe_id, entries in grouped.items():
        assert sum(e.items_in for e in entries) == N, pe_id
        assert sum(e.items_out for e in entries) == N, pe_id
    assert run.live_stats() == run.stats


def test_broadcast_counts_every_copy(mapping: MappingCase) -> None:
    shared = stats_run(mapping)  # broadcast: Count -> Tag -> WhoSawWhat x3, grouping all
    run = shared.run
    check_instances(run)
    seen = Counter(instance for instance, _ in only(shared.results, shared.broadcast))
    (who,) = [pe for pe in shared.broadcast.flatten().pes if pe.startswith("WhoSawWhat")]
    per_instance = {e.instance: e for e in by_pe(run.stats)[who]}
    assert len(per_instance) == run.plan.placement[who].parallelism  # 1 on simple, else 3
    for index, entry in per_instance.items():
        assert entry.items_in == 200 and entry.items_out == seen[index] == 200


def test_group_by_counts_match_what_each_instance_got(mapping: MappingCase) -> None:
    shared = stats_run(mapping)
    check_instances(shared.run)
    seen = Counter(instance for instance, _ in only(shared.results, shared.grouped))
    (who,) = [pe for pe in shared.grouped.flatten().pes if pe.startswith("WhoSawWhat")]
    for entry in by_pe(shared.run.stats)[who]:
        assert entry.items_in == entry.items_out == seen[entry.instance]
    assert sum(seen.values()) == 300


def test_postprocess_output_is_counted(mapping: MappingCase) -> None:
    shared = stats_run(mapping)
    total = shared.total
    assert shared.results.data(total.id) == [sum(range(50))]
    (entry,) = by_pe(shared.run.stats)[total.id]
    assert (entry.items_in, entry.items_out) == (50, 1)


def test_live_stats_while_running() -> None:
    graph, source = wf.pipeline(2)
    release = asyncio.Event()

    async def feed() -> AsyncIterator[dict[str, Any]]:
        for _ in range(10):
            yield {}
        await release.wait()

    async def go() -> None:
        async with asyncio.timeout(30):
            async with aiod4p.start(graph, {source: feed()}, mapping="async") as run:
                received = [await anext(run) for _ in range(10)]
                assert len(received) == 10
                live = by_pe(run.live_stats())
                assert not run.done and run.stats == []
                assert {pe: sum(e.items_in for e in entries) for pe, entries in live.items()} == dict.fromkeys(
                    run.plan.pes, 10
                )
                assert run.elapsed > 0
                release.set()
                await run.results()
            assert run.done and run.elapsed == run.elapsed  # stopped counting at the end

    asyncio.run(go())


class WaitsBetweenItems(aiod4p.ProducerPE):
    """A live source with little to say: it waits 0.1 s before each of its three items."""

    async def produce(self) -> AsyncIterator[int]:
        for number in range(3):
            await asyncio.sleep(0.1)  # ok-sleep: the wait for the next observation is what is measured
            yield number


def test_a_live_source_waiting_for_its_next_item_is_not_busy() -> None:
    """Its busy time counted the whole wait: a live source that waited all night showed 100% busy."""
    graph = WorkflowGraph()
    graph.add(source := WaitsBetweenItems())
    results, run = run_with_stats(MappingCase("async", None), graph, 1)
    assert results.data() == [0, 1, 2]
    (entry,) = run.stats
    assert entry.pe == source.id
    assert run.elapsed >= 0.3 and entry.busy_seconds < 0.1


class ComputesEachItem(aiod4p.ProducerPE):
    """A source whose one call makes 2,000 items of about 1 ms each."""

    def produce(self) -> Iterator[int]:
        for number in range(2_000):
            threading.Event().wait(0.001)  # ok-sleep: the item's cost, not synchronisation
            yield number


def test_a_long_call_shows_its_busy_time_while_it_runs() -> None:
    """A generator's busy time was added when its call ended: the progress display and the statistics'
    samples showed the source idle for the whole call, then busy for all of it at once."""
    graph = WorkflowGraph()
    graph.add(source := ComputesEachItem())

    async def go() -> None:
        async with asyncio.timeout(30):
            async with aiod4p.start(graph, 1, mapping="async") as run:
                for _ in range(100):
                    await anext(run)
                (entry,) = run.live_stats()
                assert entry.pe == source.id and not run.done
                assert entry.busy_seconds >= 0.05  # 100 items of 1 ms or more each
                run.drain()

    asyncio.run(go())


class WaitsInAThread(aiod4p.IterativePE):
    """A threaded PE whose call writes nothing until a file appears (a long blocking call, as a slow query)."""

    threaded = True

    def process_item(self, path: str) -> str:
        while not Path(path).exists():
            threading.Event().wait(0.01)  # ok-sleep: polls for the test's signal, a file (works across processes)
        return path


@pytest.mark.parametrize(("mapping_name", "workers"), [("async", None), ("multi", 2)])
def test_a_threaded_call_shows_its_busy_time_before_it_returns(
    mapping_name: str, workers: int | None, tmp_path: Path
) -> None:
    """A threaded call that wrote nothing for seconds showed 0% busy until it returned: the progress display
    and the samples of --stats-json showed the stage that held the run back as idle."""
    graph = WorkflowGraph()
    graph.add(waits := WaitsInAThread())
    done = tmp_path / "done"

    async def go() -> None:
        async with asyncio.timeout(60):
            async with aiod4p.start(
                graph, {waits: [{"input": str(done)}]}, mapping=mapping_name, workers=workers
            ) as run:
                while sum(entry.busy_seconds for entry in run.live_stats() if entry.pe == waits.id) < 0.3:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # polls the live statistics, as the progress display does
                assert not run.done
                done.touch()
                assert [record.data for record in await run.results()] == [str(done)]

    asyncio.run(go())


@pytest.mark.parametrize(("mapping_name", "workers"), [("simple", None), ("async", None), ("multi", 2), ("mpi", 2)])
def test_errors_are_counted_in_the_last_stats(mapping_name: str, workers: int | None) -> None:
    # On multi and mpi a failing worker reported no statistics: a run failing within its first
    # report's interval gave a --stats-json with no PE, and a later one an error count of 0. The
    # other worker, failing because its link to the failed one broke, reported none either: the
    # statistics lacked its instances.
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", fail := wf.Fail(on=3), "input")

    async def go() -> WorkflowRun:
        async with asyncio.timeout(30):
            run = aiod4p.start(graph, 10, mapping=mapping_name, workers=workers)
            with pytest.raises(PEError, match=fail.id):
                async with run:
                    await run.results()
        return run

    run = asyncio.run(go())
    assert run.stats == []  # no final statistics: the run failed
    assert sum(entry.errors for entry in by_pe(run.live_stats())[fail.id]) == 1
    assert sorted((entry.pe, entry.instance) for entry in run.live_stats()) == sorted(
        (ref.pe, ref.index) for ref in run.plan.instances()
    )
    assert stats_document(run.live_stats(), run.plan, finished=False)["pes"][fail.id]["errors"] == 1


def test_summaries_and_document() -> None:
    stats = [
        InstanceStats("B", 1, 1, items_in=3, items_out=2, busy_seconds=0.5, max_queued_items=7, inflight_bound=8),
        InstanceStats("A", 0, 0, items_in=5, items_out=5, errors=1, blocked_seconds=0.25),
        InstanceStats("B", 0, 0, items_in=4, items_out=4, busy_seconds=0.25, max_queued_items=3, inflight_bound=8),
    ]
    summaries = summarise(stats)
    assert list(summaries) == ["A", "B"]
    b = summaries["B"]
    assert (b.instances, b.items_in, b.items_out, b.max_queued_items, b.inflight_bound) == (2, 7, 6, 7, 16)
    assert b.busy_seconds == pytest.approx(0.75)
    document = stats_document(stats, mapping="multi", elapsed=1.5)
    assert document["pes"]["A"]["errors"] == 1 and document["pes"]["B"]["instances"] == 2
    assert [(e["pe"], e["instance"]) for e in document["instances"]] == [("A", 0), ("B", 0), ("B", 1)]
    assert document["mapping"] == "multi" and document["elapsed_seconds"] == 1.5
    json.dumps(document)


def test_a_pe_summary_adds_up_every_counter_of_its_instances() -> None:
    # A counter added to InstanceStats and not to the summary went missing from --stats-json's "pes"
    # (feed_blocked_seconds did).
    identity = {"pe", "instance", "worker", "attempt", "carried", "provenance"}
    counters = [f.name for f in dataclasses.fields(InstanceStats) if f.name not in identity]
    first = InstanceStats("A", 0, **{name: 1 for name in counters})
    second = InstanceStats("A", 1, **{name: 2 for name in counters})
    summary = summarise([first, second])["A"].to_dict()
    assert summary == {"instances": 2, **{name: 3 for name in counters}, "max_queued_items": 2}


def render(table: Any) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=160)
    console.print(table)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(output, str)
    return output


def test_table_rows_per_pe_and_instance() -> None:
    stats = [
        InstanceStats("Count0", 0, 0, items_in=1, items_out=40),
        InstanceStats("Work1", 0, 0, items_in=25, items_out=25, busy_seconds=1.25),
        InstanceStats("Work1", 1, 1, items_in=15, items_out=15, blocked_seconds=0.5),
    ]
    text = render(stats_table(stats, elapsed=2.0))
    assert "Statistics per PE (2.00 s)" in text
    lines = [line for line in text.splitlines() if "Work1" in line or line.strip().startswith("│   ")]
    assert "all 2" in lines[0] and "40" in lines[0] and "1.250" in lines[0] and "0.500" in lines[0]
    assert "no statistics were reported" in render(stats_table([]))


def test_unwritable_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(Aiod4pError, match=r"missing/s\.json"):
        write_stats_json(tmp_path / "missing" / "s.json", {})


# -- the command line -------------------------------------------------------------


@pytest.fixture
def flow(tmp_path: Path) -> Path:
    path = tmp_path / "flow.py"
    path.write_text(
        textwrap.dedent(
            """
            from aiod4p import ConsumerPE, IterativePE, ProducerPE, WorkflowGraph

            class Numbers(ProducerPE):
                def __init__(self):
                    super().__init__()
                    self.id = "Numbers"
                    self.n = 0
                def produce(self):
                    self.n += 1
                    if self.n == 7 and self.fail:
                        raise ValueError("seven")
                    return self.n
                fail = False

            class Square(IterativePE):
                def __init__(self):
                    super().__init__()
                    self.id = "Square"
                def process_item(self, item):
                    return item * item

            graph = WorkflowGraph()
            graph.connect(Numbers(), "output", Square(), "input")

            def failing():
                Numbers.fail = True
                return graph
            """
        )
    )
    return path


def test_cli_stats_table_and_json(flow: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    args = ["run", f"{flow}:graph", "-i", "20", "-n", "3", "--stats", "--stats-json", str(out)]
    result = aiod4p_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Square.output: 20 items" in result.stdout
    assert "Statistics per PE" in result.stderr and "all 3" in result.stderr
    document = json.loads(out.read_text())
    assert document["finished"] is True and document["mapping"] == "async"
    assert document["pes"]["Numbers"]["items_in"] == 20 and document["pes"]["Numbers"]["items_out"] == 20
    assert document["pes"]["Square"] == {**document["pes"]["Square"], "instances": 3, "items_in": 20, "items_out": 20}
    assert sorted(e["instance"] for e in document["instances"] if e["pe"] == "Square") == [0, 1, 2]


def test_cli_stats_after_a_failure(flow: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    result = aiod4p_cli("run", f"{flow}:failing", "-i", "20", "--stats-json", str(out), "--stats", cwd=tmp_path)
    assert result.returncode == 1 and "seven" in result.stderr
    document = json.loads(out.read_text())
    assert document["finished"] is False
    assert document["pes"]["Numbers"]["errors"] == 1


def test_cli_unwritable_stats_json(flow: Path, tmp_path: Path) -> None:
    target = tmp_path / "no" / "s.json"
    result = aiod4p_cli("run", f"{flow}:graph", "-i", "3", "--stats-json", str(target), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot write statistics to {target}" in result.stderr


def test_cli_stats_that_cannot_be_written_do_not_hide_why_the_run_failed(flow: Path, tmp_path: Path) -> None:
    """On a full disk the results failed first, then the statistics written at the end: the second error
    replaced the first, and stderr named only the statistics. Both are said now, the run's own last."""
    result = aiod4p_cli(
        "run", f"{flow}:graph", "-i", "3", "--results", "/dev/full", "--stats-json", "/dev/full", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-2:] == [
        "aiod4p: error: cannot write statistics to /dev/full: No space left on device",
        "aiod4p: error: cannot write results to /dev/full: No space left on device",
    ]


def test_sampling_for_stats_json_leaves_multi_forking_its_workers(tmp_path: Path) -> None:
    # The sampler's thread made multi spawn its workers: each imported the workflow file again and the run
    # started 0.2-0.4 s later than without --stats-json.
    (tmp_path / "flow.py").write_text(SAYS_ITS_IMPORTS_FLOW)
    result = aiod4p_cli(
        "run", "flow.py", "-m", "multi", "-n", "2", "-i", "5", "--stats-json", "s.json", "-q", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(IMPORTED) == 1, result.stderr
    assert json.loads((tmp_path / "s.json").read_text())["pes"]["Times101"]["items_in"] == 5


def test_no_stats_unless_asked(flow: Path, tmp_path: Path) -> None:
    result = aiod4p_cli("run", f"{flow}:graph", "-i", "3", cwd=tmp_path)
    assert result.returncode == 0 and "Statistics" not in result.stderr + result.stdout


def test_the_samples_of_a_run_that_never_ends_stay_bounded() -> None:
    """--stats-json kept a sample every 0.25 s for as long as the run went on: a live run that never ends grew
    by about 6 KB a second (1.5 MB in 4 minutes, measured). Past MAX_SAMPLES, every other one goes and the
    interval doubles, so the samples still cover the whole run, in order, the newest kept."""
    graph, _ = wf.pipeline(3)
    workflow = SimpleNamespace(live_stats=list, plan=WorkflowRun(graph, 1, mapping="simple").plan, elapsed=0.0)
    sampler = StatsSampler(workflow)  # type: ignore[arg-type]
    for second in range(3 * MAX_SAMPLES):
        workflow.elapsed = float(second)
        sampler.sample()
    times = [sample["t"] for sample in sampler.samples]
    assert MAX_SAMPLES // 2 <= len(times) < MAX_SAMPLES
    assert times == sorted(times) and times[-1] == 3 * MAX_SAMPLES - 1
    assert sampler.interval > 0.25


def _sampled(stats: list[InstanceStats], times: list[float], change: Any) -> list[dict[str, Any]]:
    """The samples a StatsSampler takes of ``stats`` at ``times``, ``change(i)`` before the i-th."""
    workflow = SimpleNamespace(live_stats=lambda: list(stats), plan=None, elapsed=0.0)
    sampler = StatsSampler(workflow)  # type: ignore[arg-type]
    for index, moment in enumerate(times):
        change(index)
        workflow.elapsed = moment
        sampler.sample()
    return sampler.samples


def test_the_samples_of_a_restored_run_count_the_work_done_not_what_its_checkpoint_carried() -> None:
    """A restored instance goes on from its checkpoint's counters: the samples counted them as done in the
    first interval (40,000 items in 0.25 s, 30 s busy on one instance). They count the work done since."""
    entry = InstanceStats("count", 0)
    entry.carry({"items_in": 40_000, "items_out": 39_000, "busy_seconds": 30.0, "errors": 0})

    def work(index: int) -> None:
        entry.items_in += 100
        entry.items_out += 90
        entry.busy_seconds += 0.125

    samples = _sampled([entry], [0.25, 0.5], work)
    assert [sample["pes"]["count"] for sample in samples] == [[100, 90, 0.125], [200, 180, 0.25]]
    assert (entry.items_in, entry.items_out, entry.busy_seconds) == (40_200, 39_180, 30.25)  # the totals
    assert entry.to_dict()["items_in"] == 40_200 and "carried" not in entry.to_dict()


def test_the_samples_over_a_restart_never_go_back() -> None:
    """Under --restarts the counters go back to the checkpoint's when the restarted attempt begins: the samples
    went back with them (a negative throughput and busy time). The ended attempt's work stays counted (as last
    seen), and the restarted attempt's adds to it, what it does again included; a stale report of the ended
    attempt is ignored."""
    first = InstanceStats("count", 0, items_in=5_000, busy_seconds=2.0)
    stats = [first]
    restarted = InstanceStats("count", 0, attempt=1)
    restarted.carry({"items_in": 3_000, "busy_seconds": 1.0})

    def change(index: int) -> None:
        if index == 1:  # the restart: the new attempt reports from its checkpoint on
            stats[0] = restarted
        elif index == 2:
            restarted.items_in += 500
            restarted.busy_seconds += 0.25
        elif index == 3:  # the ended attempt's last report, late
            stats[0] = first

    samples = _sampled(stats, [0.25, 0.5, 0.75, 1.0], change)
    assert [sample["pes"]["count"][0] for sample in samples] == [5_000, 5_000, 5_500, 5_500]
    assert [sample["pes"]["count"][2] for sample in samples] == [2.0, 2.0, 2.25, 2.25]
