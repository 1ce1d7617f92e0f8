"""The planner is pure: these tests run without an event loop."""

from __future__ import annotations

import pytest
import workflows as wf

from aiod4p import ALL, GLOBAL, GraphError, InstanceRef, PlanOptions, WorkflowGraph, group_by, make_plan
from aiod4p._plan import MAX_CHANNELS, REMOTE_BATCH_FACTOR, REMOTE_TIME_FACTOR, TURNS_TIME_FACTOR


def chain_graph(parallelism: int | None = None) -> tuple[WorkflowGraph, list[object]]:
    graph = WorkflowGraph()
    source, first, second = wf.Count(), wf.Double(), wf.Double()
    first.parallelism = second.parallelism = parallelism
    graph.connect(source, "output", first, "input")
    graph.connect(first, "output", second, "input")
    return graph, [source, first, second]


def test_sources_get_one_instance_and_others_one_per_worker() -> None:
    graph, (source, first, second) = chain_graph()
    plan = make_plan(graph, PlanOptions(workers=4))
    assert plan.placement[source.id].parallelism == 1  # type: ignore[attr-defined]
    assert plan.placement[first.id].workers == (0, 1, 2, 3)  # type: ignore[attr-defined]
    assert plan.placement[second.id].parallelism == 4  # type: ignore[attr-defined]


def test_the_instances_on_a_worker_are_named_in_short_and_the_pes_past_ten_counted() -> None:
    graph = WorkflowGraph()
    graph.connect(source := wf.Count(), "output", double := wf.Double(parallelism=8), "input")
    plan = make_plan(graph, PlanOptions(workers=2))
    assert plan.instances_on(0) == f"{source.id}[0], {double.id}[0,2,4,6]"
    wide = WorkflowGraph()
    for _ in range(12):
        wide.add(wf.Count())
    ids = list(wide.flatten().pes)
    assert make_plan(wide, PlanOptions(workers=1)).instances_on(0) == ", ".join(f"{pe}[0]" for pe in ids[:10]) + (
        ", and 2 more PEs"
    )


def test_explicit_parallelism_is_honoured() -> None:
    graph, (_, first, _) = chain_graph(parallelism=3)
    plan = make_plan(graph, PlanOptions(workers=2))
    assert plan.placement[first.id].workers == (0, 1, 0)  # type: ignore[attr-defined]


def test_busy_workers_take_every_instance_and_the_others_none() -> None:
    graph, (_, first, _) = chain_graph()
    plan = make_plan(graph, PlanOptions(workers=5, busy_workers=2))
    assert plan.workers == 5
    assert plan.placement[first.id].workers == (0, 1)  # type: ignore[attr-defined]
    explicit, (_, wide, _) = chain_graph(parallelism=3)
    assert make_plan(explicit, PlanOptions(workers=5, busy_workers=2)).placement[wide.id].workers == (0, 1, 0)  # type: ignore[attr-defined]
    assert {w for channel in plan.channels for w in (channel.source_worker, channel.dest_worker)} <= {0, 1}


@pytest.mark.parametrize("busy", [0, 6])
def test_busy_workers_must_be_among_the_workers(busy: int) -> None:
    with pytest.raises(ValueError, match="busy_workers must be between 1 and 5"):
        PlanOptions(workers=5, busy_workers=busy)


def test_global_input_forces_one_instance() -> None:
    graph = WorkflowGraph()
    total = wf.SumAtEnd(GLOBAL)
    graph.connect(wf.Count(), "output", total, "input")
    assert make_plan(graph, PlanOptions(workers=4)).placement[total.id].parallelism == 1


def test_force_single() -> None:
    graph, pes = chain_graph(parallelism=5)
    plan = make_plan(graph, PlanOptions(force_single=True))
    assert all(plan.placement[pe.id].parallelism == 1 for pe in pes)  # type: ignore[attr-defined]


def test_equal_width_shuffle_stays_on_the_worker() -> None:
    graph, (source, first, _) = chain_graph()
    plan = make_plan(graph, PlanOptions(workers=3))
    fan_out = plan.routes[source.id][0]  # type: ignore[attr-defined]
    assert fan_out.targets == ((0, 1, 2),)
    forward = plan.routes[first.id][0]  # type: ignore[attr-defined]
    assert forward.targets == ((0,), (1,), (2,))
    crossing = [c for c in plan.channels if c.source_worker != c.dest_worker]
    assert {(c.source.pe, c.dest.pe) for c in crossing} == {(source.id, first.id)}  # type: ignore[attr-defined]


def test_group_by_and_all_reach_every_instance() -> None:
    graph = WorkflowGraph()
    tag, grouped, everyone = wf.Tag(), wf.WhoSawWhat(group_by(0), 3), wf.WhoSawWhat(ALL, 2)
    graph.connect(wf.Count(), "output", tag, "input")
    graph.connect(tag, "output", grouped, "input")
    graph.connect(tag, "output", everyone, "input")
    plan = make_plan(graph, PlanOptions(workers=1, default_parallelism=2))
    routes = {route.dest: route for route in plan.routes[tag.id]}
    assert routes[grouped.id].targets == ((0, 1, 2), (0, 1, 2))
    assert routes[everyone.id].targets == ((0, 1), (0, 1))


def test_eos_counts_equal_incoming_channels() -> None:
    graph, (_, first, second) = chain_graph(parallelism=2)
    plan = make_plan(graph, PlanOptions(workers=1))
    for index in range(2):
        assert len(plan.channels_into(InstanceRef(second.id, index))) == 1  # type: ignore[attr-defined]
        assert len(plan.channels_into(InstanceRef(first.id, index))) == 1  # type: ignore[attr-defined]
    assert plan.inflight_bound(InstanceRef(second.id, 0)) == 4 * 256  # type: ignore[attr-defined]


def test_result_ports_and_roots() -> None:
    graph, (source, _, second) = chain_graph()
    plan = make_plan(graph)
    assert plan.roots == [source.id]  # type: ignore[attr-defined]
    assert plan.result_ports == {second.id: ["output"]}  # type: ignore[attr-defined]


def test_instances_in_topological_order_per_worker() -> None:
    graph, (source, first, second) = chain_graph()
    plan = make_plan(graph, PlanOptions(workers=2))
    assert plan.instances(1) == [InstanceRef(first.id, 1), InstanceRef(second.id, 1)]  # type: ignore[attr-defined]
    assert plan.instances(0)[0] == InstanceRef(source.id, 0)  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_parallelism(bad: object) -> None:
    graph, (_, first, _) = chain_graph()
    first.parallelism = bad  # type: ignore[attr-defined]
    with pytest.raises(GraphError, match=rf"{first.id}: parallelism must be a positive integer"):  # type: ignore[attr-defined]
        make_plan(graph)


@pytest.mark.parametrize("options", [{"workers": 0}, {"default_parallelism": 0}, {"batch_size": 0}, {"credits": 0}])
def test_bad_options(options: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PlanOptions(**options)


def test_the_plan_gives_each_instance_its_end_of_stream_count_and_inflight_bound() -> None:
    """The engine takes these from the plan rather than re-deriving them: a root also waits for its feed."""
    graph, (source, first, second) = chain_graph()
    options = PlanOptions(workers=2, batch_size=10, credits=3)
    plan = make_plan(graph, options)
    root = InstanceRef(source.id, 0)  # type: ignore[attr-defined]
    middle = InstanceRef(first.id, 1)  # type: ignore[attr-defined]
    assert plan.expected_eos(root) == 1  # its feed
    assert plan.expected_eos(middle) == 1  # the single source
    assert plan.expected_eos(InstanceRef(second.id, 0)) == 1  # type: ignore[attr-defined]  # forward from first[0]
    assert plan.inflight_bound(root) == 1 * 3 * 10
    # middle (worker 1) is fed from worker 0: batches between workers carry up to REMOTE_BATCH_FACTOR x more
    assert [(c.source_worker, c.dest_worker) for c in plan.channels_into(middle)] == [(0, 1)]
    assert options.remote_batch_size == 10 * REMOTE_BATCH_FACTOR
    assert plan.inflight_bound(middle) == 3 * 10 * REMOTE_BATCH_FACTOR
    (into_middle,) = plan.channels_into(middle)
    assert options.batch_bounds(into_middle, dest_takes_turns=False) == (
        10 * REMOTE_BATCH_FACTOR,
        options.batch_seconds * REMOTE_TIME_FACTOR,
    )
    local = InstanceRef(first.id, 0)  # type: ignore[attr-defined]
    assert plan.inflight_bound(local) == 3 * 10
    (into_local,) = plan.channels_into(local)
    assert options.batch_bounds(into_local, dest_takes_turns=False) == (3 * 10, options.batch_seconds)
    assert options.batch_bounds(into_local, dest_takes_turns=True) == (
        3 * 10,
        options.batch_seconds * TURNS_TIME_FACTOR,
    )


def test_a_wide_plan_and_its_channel_lookups_are_linear() -> None:
    """60,000 instances, 240,000 channels: planned and looked up in seconds (the old scans took hours)."""
    graph, split = WorkflowGraph(), wf.Double()
    graph.connect(wf.Count(), "output", split, "input")
    graph.connect(split, "output", wf.WhoSawWhat(group_by(0)), "input")  # 3 instances, every split to each
    plan = make_plan(graph, PlanOptions(workers=1, default_parallelism=60_000))
    instances = plan.instances()
    assert len(instances) == 60_004 and len(plan.channels) == 240_000
    into = sum(len(plan.channels_into(ref)) for ref in instances)
    out = sum(len(plan.channels_from(ref)) for ref in instances)
    assert into == out == len(plan.channels)
    assert [c.channel_id for c in plan.channels_into(InstanceRef(split.id, 7))] == sorted(
        c.channel_id for c in plan.channels if c.dest == InstanceRef(split.id, 7)
    )


def test_a_plan_needing_more_channels_than_a_run_can_be_given_is_refused_naming_the_widest_edge() -> None:
    """Two PEs of N instances joined by a key grouping need N x N channels: ``-n 10000`` on the async mapping
    took 17 GB while it planned and built 10^8 of them, and never started. Refused before any is made."""
    graph = WorkflowGraph()
    source, first, second = wf.Count(), wf.Double(), wf.Double()
    graph.connect(source, "output", first, "input")
    graph.connect(first, "output", second, "input", grouping=group_by(0))
    width = int(MAX_CHANNELS**0.5) + 1
    with pytest.raises(GraphError) as raised:
        make_plan(graph, PlanOptions(workers=1, default_parallelism=width))
    message = str(raised.value)
    assert f"the plan needs {width * width + width:,} channels, more than the {MAX_CHANNELS:,}" in message
    assert f"{first.id}.output ({width:,} instances) -> {second.id}.input ({width:,} instances" in message  # type: ignore[attr-defined]
    assert f"alone needs {width * width:,}: give these PEs fewer instances" in message
