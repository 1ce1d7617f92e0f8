"""Property-based differential test: random workflows give the same results on every mapping.

Hypothesis draws random DAGs: sources, fan-out (one output to several
inputs), fan-in (several edges into one input, two-input PEs), every grouping
(shuffle, group_by, all, global), parallelism 1 to 4 and composites. Every
PE is deterministic per item or per key, so a small model computes the
result multiset each mapping must give, from the parallelism that mapping
plans (``all`` reaches every instance). The same graph objects then run
several times in a row and concurrently, on every case of
``conftest.MAPPING_CASES``, and concurrently on a random mix of simple,
async and multi; the process mappings get few examples, each one a union
of several random DAGs, so that they cost few launches. In process,
random DAGs also run with small batches and credits, plain or async
generator sources and a reader that may be behind, checkpointed, are
stopped without a drain and restored: their results file must be the model's. Graphs of PE call kinds
mixed (plain, generator, ``async def``, threaded, busy, writing in loops and in pre/postprocess), with large
payloads beside empty items, must give the model's results in process, in order on paths of single
instances, also after a run of theirs was cancelled midway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ckpt_workflows import on_completed
from conftest import MAPPING_CASES, MappingCase
from helpers import add_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiod4p
from aiod4p import GenericPE, ProducerPE, WorkflowGraph, chain, group_by, make_plan
from aiod4p._checkpoint import Checkpointing
from aiod4p._groupings import ALL, GLOBAL, SHUFFLE, Grouping
from aiod4p._pe import PE, CompositePE, IterativePE

MODULUS = 101


def key_of(item: int) -> int:
    """The group-by key of an item (module level, so worker processes can unpickle it)."""
    return item % 5


class Source(ProducerPE):
    """Yields ``count`` items derived from ``seed``, in one call."""

    def __init__(self, seed: int, count: int) -> None:
        super().__init__()
        self.seed, self.count = seed, count

    def produce(self) -> Iterator[int]:
        for index in range(self.count):
            yield (self.seed * 7 + index * 13) % MODULUS


class LiveSource(Source):
    """A :class:`Source` whose items come from an async generator, as a live source's (checkpoints come between
    its items)."""

    async def produce(self) -> AsyncIterator[int]:  # type: ignore[override]
        for item in Source.produce(self):
            yield item


def affine(a: int, b: int, item: int) -> int:
    return (a * item + b) % MODULUS


class Affine(IterativePE):
    """``item -> (a * item + b) % MODULUS``: pure, so any grouping gives the same multiset."""

    def __init__(self, a: int, b: int, grouping: Grouping) -> None:
        super().__init__(grouping=grouping)
        self.a, self.b = a, b

    def process_item(self, item: int) -> int:
        return affine(self.a, self.b, item)


class KeyedCount(GenericPE):
    """Group-by key: emits ``key * 1000 + n`` for the n-th item of each key (a per-key state)."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(key=key_of))], outputs=["output"])
        self.seen: Counter[int] = Counter()

    def process(self, inputs: dict[str, int]) -> None:
        key = key_of(inputs["input"])
        self.seen[key] += 1
        self.write("output", key * 1000 + self.seen[key])


class Total(GenericPE):
    """Global: writes the sum of everything it saw in postprocess (instances that saw nothing write nothing)."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", GLOBAL)], outputs=["output"])
        self.total: int | None = None

    def process(self, inputs: dict[str, int]) -> None:
        self.total = (self.total or 0) + inputs["input"]

    def postprocess(self) -> None:
        if self.total is not None:
            self.write("output", self.total)


class Merge(GenericPE):
    """Two inputs: tags each item with the input it came on."""

    def __init__(self) -> None:
        super().__init__(inputs=["left", "right"], outputs=["output"])

    def process(self, inputs: dict[str, int]) -> dict[str, int]:
        ((port, item),) = inputs.items()
        return {"output": item if port == "left" else (item + 50) % MODULUS}


GROUPINGS: dict[str, Grouping] = {"shuffle": SHUFFLE, "group_by": group_by(key=key_of), "all": ALL, "global": GLOBAL}


@dataclass
class Node:
    """One random PE: what it is, and where its inputs come from (indices of earlier nodes)."""

    kind: str  # source, affine, chain, keyed, total, merge
    params: tuple[int, ...]
    upstream: tuple[int, ...]
    grouping: str
    parallelism: int


@st.composite
def dags(draw: st.DrawFn) -> list[Node]:
    nodes = [Node("source", (draw(st.integers(0, 50)), draw(st.integers(1, 40))), (), "shuffle", 1)]
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 5)) == 0:
            nodes.append(Node("source", (draw(st.integers(0, 50)), draw(st.integers(0, 40))), (), "shuffle", 1))
            continue
        kind = draw(st.sampled_from(["affine", "affine", "chain", "keyed", "total", "merge"]))
        earlier = st.integers(0, len(nodes) - 1)
        fan_in = draw(st.integers(1, 2))  # two edges into one input
        upstream = tuple(draw(earlier) for _ in range(2 if kind == "merge" else fan_in))
        grouping = draw(st.sampled_from(sorted(GROUPINGS))) if kind in ("affine", "chain", "merge") else ""
        params = (draw(st.integers(1, 9)), draw(st.integers(0, 9)))
        nodes.append(Node(kind, params, upstream, grouping, draw(st.integers(1, 4))))
    return nodes


@dataclass
class Built:
    """A random DAG built as a graph, and the model's view of it."""

    nodes: list[Node]
    pes: list[PE]  # per node: the PE whose output is the node's output (the inner last PE of a chain)
    inputs: list[list[tuple[PE, str]]]  # per node: the PEs and ports its upstream edges reach


def build(dags_: list[list[Node]]) -> tuple[WorkflowGraph, list[Built]]:
    graph = WorkflowGraph()
    built = []
    for nodes in dags_:
        pes: list[PE] = []
        entries: list[list[tuple[PE, str]]] = []
        for node in nodes:
            grouping = GROUPINGS.get(node.grouping, SHUFFLE)
            if node.kind == "source":
                pe: PE = Source(*node.params)
                graph.add(pe)
                pes.append(pe)
                entries.append([])
                continue
            if node.kind == "affine":
                pe = Affine(*node.params, grouping)
                out, inputs = pe, [(pe, "input")] * len(node.upstream)
            elif node.kind == "chain":
                first, second = Affine(*node.params, grouping), Affine(node.params[1] + 1, node.params[0], SHUFFLE)
                first.parallelism = second.parallelism = node.parallelism
                pe = chain(first, second)
                out, inputs = second, [(pe, "input")] * len(node.upstream)
            elif node.kind == "keyed":
                pe = KeyedCount()
                out, inputs = pe, [(pe, "input")] * len(node.upstream)
            elif node.kind == "total":
                pe = Total()
                out, inputs = pe, [(pe, "input")] * len(node.upstream)
            else:
                pe = Merge()
                out, inputs = pe, [(pe, "left"), (pe, "right")]
            if node.kind != "chain":
                pe.parallelism = node.parallelism
            for source_index, (dest, port) in zip(node.upstream, inputs, strict=True):
                override = grouping if node.kind == "merge" else None
                graph.connect(pes[source_index], "output", dest, port, grouping=override)
            pes.append(out)
            entries.append(inputs)
        built.append(Built(nodes, pes, entries))
    return graph, built


def model(graph: WorkflowGraph, built: list[Built], case: MappingCase) -> Counter[tuple[str, int]]:
    """The result multiset ``case`` must give: ``(pe id, item)`` counts."""
    mapping = aiod4p.mappings.get_mapping(case.name)
    plan = make_plan(graph, mapping.plan_options(case.workers, 256, 4))
    results: Counter[tuple[str, int]] = Counter()
    for dag in built:
        outputs: list[list[int]] = []
        consumed = {index for node in dag.nodes for index in node.upstream}
        for index, node in enumerate(dag.nodes):
            received: list[int] = []
            for source_index, (dest, port) in zip(node.upstream, dag.inputs[index], strict=True):
                items = outputs[source_index]
                if node.kind == "merge" and port == "right":
                    items = [(item + 50) % MODULUS for item in items]
                grouping = node.grouping
                if grouping == "all":
                    target = dest.input_map["input"][0][0] if isinstance(dest, CompositePE) else dest
                    assert target.id is not None
                    items = items * plan.placement[target.id].parallelism
                received.extend(items)
            a, b = node.params if node.kind != "source" else (0, 0)
            if node.kind == "source":
                produced = [(node.params[0] * 7 + i * 13) % MODULUS for i in range(node.params[1])]
            elif node.kind in ("affine", "merge"):
                produced = [affine(a, b, item) for item in received] if node.kind == "affine" else received
            elif node.kind == "chain":
                produced = [affine(b + 1, a, affine(a, b, item)) for item in received]
            elif node.kind == "keyed":
                per_key = Counter(key_of(item) for item in received)
                produced = [key * 1000 + n for key, count in per_key.items() for n in range(1, count + 1)]
            else:
                produced = [sum(received)] if received else []
            outputs.append(produced)
            if index not in consumed:
                pe_id = dag.pes[index].id
                assert pe_id is not None
                results.update((pe_id, item) for item in produced)
    return results


def multiset(results: aiod4p.Results) -> Counter[tuple[str, int]]:
    return Counter((record.pe, record.data) for record in results)


def check(case: MappingCase, dags_: list[list[Node]], repeats: int, concurrent: int) -> None:
    graph, built = build(dags_)
    expected = model(graph, built, case)
    for _ in range(repeats):
        assert multiset(case.run(graph, 1)) == expected

    async def together() -> list[aiod4p.Results]:
        async with asyncio.timeout(50):
            runs = [aiod4p.run_async(graph, 1, mapping=case.name, workers=case.workers) for _ in range(concurrent)]
            return await asyncio.gather(*runs)

    for results in asyncio.run(together()):
        assert multiset(results) == expected


IN_PROCESS = ("simple", "async")
CASES = [MappingCase(*case) for case in MAPPING_CASES]
SETTINGS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow],
}


@pytest.mark.parametrize("case", [c for c in CASES if c.name in IN_PROCESS], ids=lambda case: case.id)
@settings(max_examples=25, **SETTINGS)
@given(st.lists(dags(), min_size=1, max_size=2))
def test_random_workflows_agree_in_process(case: MappingCase, dags_: list[list[Node]]) -> None:
    check(case, dags_, repeats=2, concurrent=2)


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in IN_PROCESS], ids=lambda case: case.id)
@settings(max_examples=1, **SETTINGS)
@given(st.lists(dags(), min_size=8, max_size=8))
def test_random_workflows_agree_across_processes(case: MappingCase, dags_: list[list[Node]]) -> None:
    # One union of eight random DAGs: three launches cover them all (one, then two at once).
    check(case, dags_, repeats=1, concurrent=2)


MIXED_CASES = [MappingCase("simple", None), MappingCase("async", None), MappingCase("multi", 2)]


@settings(max_examples=8, **SETTINGS)
@given(st.lists(dags(), min_size=4, max_size=4), st.lists(st.sampled_from(MIXED_CASES), min_size=2, max_size=4))
def test_one_graph_run_on_several_mappings_at_once_agrees_with_each_model(
    dags_: list[list[Node]], cases: list[MappingCase]
) -> None:
    """The same graph object, and a second graph of the same PE objects, run concurrently in one event loop on a
    random mix of simple, async and multi (a mapping twice, too), then once more each: every run gives its
    mapping's model."""
    graph, built = build(dags_)
    add_graph(sharing := WorkflowGraph(), graph)

    async def together() -> list[aiod4p.Results]:
        async with asyncio.timeout(50):
            runs = [
                aiod4p.run_async((graph, sharing)[index % 2], 1, mapping=case.name, workers=case.workers)
                for index, case in enumerate(cases)
            ]
            return await asyncio.gather(*runs)

    for case, results in zip(cases, asyncio.run(together()), strict=True):
        assert multiset(results) == model(graph, built, case), case.id
    for case in dict.fromkeys(cases):
        assert multiset(case.run(graph, 1)) == model(graph, built, case), case.id


def _checkpointed(case: MappingCase, directory: Path, restore: bool) -> aiod4p.mappings.BaseMapping:
    mapping = aiod4p.mappings.get_mapping(case.name)
    mapping.checkpointing = Checkpointing(
        directory, interval=0.001, restore=restore, results_path=str(directory / "results.jsonl")
    )
    return mapping


@pytest.mark.parametrize("case", [c for c in CASES if c.name in IN_PROCESS], ids=lambda case: case.id)
@settings(max_examples=15, **SETTINGS)
@given(
    st.lists(dags(), min_size=1, max_size=2),
    st.sampled_from([1, 2, 256]),
    st.sampled_from([1, 2]),
    st.integers(1, 3),
    st.booleans(),
    st.sampled_from([1, 16]),
    st.booleans(),
)
def test_random_workflows_stopped_and_restored_write_each_result_once(
    case: MappingCase,
    dags_: list[list[Node]],
    batch_size: int,
    credits: int,
    stop_after: int,
    live: bool,
    result_batches: int,
    suspend: bool,
) -> None:
    """Once ``stop_after`` checkpoints completed, the run is stopped without a drain (a kill, or ``suspend()``: a
    checkpoint then, and the run stops at it), then restored with the same -n (plain state per instance, such as
    KeyedCount's, restores only so). A run that ended first must have handed on the model's results too.

    ``live`` sources are async generators; the others plain generators, each making all its items in one call,
    whose checkpoints are taken within that call (a restore makes it again and drops what it delivered); a
    reader that takes one batch of results at a time (``result_batches``) is behind whenever the results gate
    hands on what it held."""
    # Sources 20 times as long: checkpoints complete before most runs end.
    longer = [
        [
            dataclasses.replace(node, params=(node.params[0], node.params[1] * 20)) if node.kind == "source" else node
            for node in dag
        ]
        for dag in dags_
    ]
    graph, built = build(longer)
    for pe in graph.pes:
        if live and type(pe) is Source:
            pe.__class__ = LiveSource
    expected = model(graph, built, case)
    options: dict[str, Any] = {
        "workers": case.workers,
        "batch_size": batch_size,
        "credits": credits,
        "result_batches": result_batches,
    }

    async def stopped_then_restored(directory: Path) -> None:
        completed: list[int] = []
        enough = asyncio.Event()

        def count(n: int) -> None:
            completed.append(n)
            if len(completed) >= stop_after:
                enough.set()

        async with asyncio.timeout(50):
            with on_completed(count):
                async with aiod4p.start(graph, 1, mapping=_checkpointed(case, directory, False), **options) as first:
                    results = asyncio.ensure_future(first.results())
                    stop = asyncio.ensure_future(enough.wait())
                    await asyncio.wait({results, stop}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    if suspend and not results.done():
                        first.suspend()
                        await asyncio.wait({results})
                    finished = results.done() and first.suspended is None
                    if finished:
                        assert multiset(results.result()) == expected
                    else:
                        results.cancel()
                    await asyncio.gather(results, stop, return_exceptions=True)
            if not finished:  # leaving the block aborted the run, or it was suspended
                await aiod4p.run_async(graph, 1, mapping=_checkpointed(case, directory, True), **options)

    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        asyncio.run(stopped_then_restored(directory))
        lines = (directory / "results.jsonl").read_text().splitlines()
    assert Counter((record["pe"], record["data"]) for record in map(json.loads, lines)) == expected


# -- PE call kinds mixed in one graph, items of different costs and sizes ------------------------------------


class Plain(Affine):
    """A plain ``process_item`` that also carries a payload (bytes) along with the item: ``(item, payload)``."""

    def process_item(self, item: tuple[int, bytes]) -> tuple[int, bytes]:  # type: ignore[override]
        return affine(self.a, self.b, item[0]), item[1]


class Generator(Plain):
    """A generator ``process_item``: the item, then its successor without payload."""

    def process_item(self, item: tuple[int, bytes]) -> Iterator[tuple[int, bytes]]:  # type: ignore[override]
        yield affine(self.a, self.b, item[0]), item[1]
        yield (item[0] + 1) % MODULUS, b""


class Awaiting(Plain):
    """An ``async def process_item`` that gives way before it answers."""

    async def process_item(self, item: tuple[int, bytes]) -> tuple[int, bytes]:  # type: ignore[override]
        await asyncio.sleep(0)
        return affine(self.a, self.b, item[0]), item[1]


class Threaded(Plain):
    threaded = True


class Busy(Plain):
    """Busy-waits ``b`` ms per item (a stage heavier than its neighbours; ``b`` is at most 3)."""

    def process_item(self, item: tuple[int, bytes]) -> tuple[int, bytes]:  # type: ignore[override]
        end = time.perf_counter() + self.b / 1000
        while time.perf_counter() < end:
            pass
        return super().process_item(item)


class Writes(GenericPE):
    """process() writes ``a`` items in a loop (``a * 10`` with ``many``), then returns a dict; preprocess and
    postprocess each write a marker (``a`` and ``b``) per instance."""

    def __init__(self, a: int, b: int, many: bool) -> None:
        super().__init__(inputs=["input"], outputs=["output"])
        self.a, self.b, self.count = a, b, a * 10 if many else a

    def preprocess(self) -> None:
        self.write("output", (self.a, b""))

    def process(self, inputs: dict[str, tuple[int, bytes]]) -> dict[str, tuple[int, bytes]]:
        item, payload = inputs["input"]
        for index in range(self.count):
            self.write("output", ((item + index) % MODULUS, b""))
        return {"output": (affine(self.a, self.b, item), payload)}

    def postprocess(self) -> None:
        self.write("output", (self.b, b""))


class PayloadSource(ProducerPE):
    """Yields ``count`` items per call, every ``heavy``-th (if any) with a payload of ``size`` bytes."""

    def __init__(self, seed: int, count: int, heavy: int, size: int) -> None:
        super().__init__()
        self.seed, self.count, self.heavy, self.size, self.calls = seed, count, heavy, size, 0

    def produce(self) -> Iterator[tuple[int, bytes]]:
        self.calls += 1
        for index in range(self.count):
            yield (self.seed + self.calls * 17 + index * 13) % MODULUS, payload_of(index, self.heavy, self.size)


def payload_of(index: int, heavy: int, size: int) -> bytes:
    return bytes(size) if heavy and index % heavy == 0 else b""


CALL_KINDS = ("plain", "generator", "awaiting", "threaded", "busy", "writes", "writes_many", "threaded_writes")


@dataclass
class Stage:
    kind: str  # one of CALL_KINDS
    a: int
    b: int
    parallelism: int
    upstream: tuple[int, ...]  # indices of the source (0) and earlier stages (1...)


@st.composite
def mixed_graphs(draw: st.DrawFn) -> tuple[tuple[int, int, int, int, int], list[Stage]]:
    """A source ``(seed, count, calls, heavy, size)`` and stages of mixed call kinds, each fed by one or two
    earlier nodes."""
    source = (
        draw(st.integers(0, 50)),
        draw(st.integers(0, 20)),
        draw(st.integers(1, 3)),
        draw(st.integers(0, 4)),
        draw(st.sampled_from([100_000, 2_000_000])),
    )
    stages: list[Stage] = []
    for index in range(draw(st.integers(1, 4))):
        upstream = tuple(draw(st.lists(st.integers(0, index), min_size=1, max_size=2)))
        kind = draw(st.sampled_from(CALL_KINDS))
        stage = Stage(kind, draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 3)), upstream)
        stages.append(stage)
    return source, stages


def build_mixed(source: tuple[int, int, int, int, int], stages: list[Stage]) -> tuple[WorkflowGraph, list[PE]]:
    graph = WorkflowGraph()
    seed, count, _, heavy, size = source
    pes: list[PE] = [PayloadSource(seed, count, heavy, size)]
    graph.add(pes[0])
    kinds: dict[str, type[Plain]] = {
        "plain": Plain,
        "generator": Generator,
        "awaiting": Awaiting,
        "threaded": Threaded,
        "busy": Busy,
    }
    for stage in stages:
        if stage.kind in kinds:
            pe: PE = kinds[stage.kind](stage.a, stage.b, SHUFFLE)
        else:
            pe = Writes(stage.a, stage.b, stage.kind != "writes")
            pe.threaded = stage.kind == "threaded_writes"
        pe.parallelism = stage.parallelism
        for upstream in stage.upstream:
            graph.connect(pes[upstream], "output", pe, "input")
        pes.append(pe)
    return graph, pes


def model_mixed(
    source: tuple[int, int, int, int, int], stages: list[Stage], pes: list[PE], parallelism: dict[str, int]
) -> tuple[Counter[tuple[str, int, int]], dict[str, list[tuple[int, int]]]]:
    """The results multiset ``(pe id, item, payload size)``, and the results in order of the PEs whose every
    upstream path is single channels between single instances (per channel FIFO makes their order the model's)."""
    seed, count, calls, heavy, size = source
    outputs = [
        [
            ((seed + call * 17 + index * 13) % MODULUS, len(payload_of(index, heavy, size)))
            for call in range(1, calls + 1)
            for index in range(count)
        ]
    ]
    in_order = [True]
    for stage, pe in zip(stages, pes[1:], strict=True):
        a, b = stage.a, stage.b
        received = [item for upstream in stage.upstream for item in outputs[upstream]]
        instances = parallelism[str(pe.id)]
        if stage.kind == "generator":
            produced = [out for item, n in received for out in ((affine(a, b, item), n), ((item + 1) % MODULUS, 0))]
        elif stage.kind in ("writes", "writes_many", "threaded_writes"):
            writes = a if stage.kind == "writes" else a * 10
            produced = [(a, 0)] * instances
            for item, n in received:
                produced += [((item + index) % MODULUS, 0) for index in range(writes)] + [(affine(a, b, item), n)]
            produced += [(b, 0)] * instances
        else:
            produced = [(affine(a, b, item), n) for item, n in received]
        outputs.append(produced)
        in_order.append(len(stage.upstream) == 1 and in_order[stage.upstream[0]] and instances == 1)
    consumed = {upstream for stage in stages for upstream in stage.upstream}
    results: Counter[tuple[str, int, int]] = Counter()
    ordered = {}
    for index, (pe, produced) in enumerate(zip(pes, outputs, strict=True)):
        if index not in consumed:
            results.update((str(pe.id), item, n) for item, n in produced)
            if in_order[index]:
                ordered[str(pe.id)] = produced
    return results, ordered


def sized(results: aiod4p.Results) -> Counter[tuple[str, int, int]]:
    return Counter((record.pe, record.data[0], len(record.data[1])) for record in results)


def in_order_of(results: aiod4p.Results, pe_id: str) -> list[tuple[int, int]]:
    return [(record.data[0], len(record.data[1])) for record in results if record.pe == pe_id]


@pytest.mark.parametrize("case", [c for c in CASES if c.name in IN_PROCESS], ids=lambda case: case.id)
@settings(max_examples=12, **SETTINGS)
@given(
    mixed_graphs(),
    st.integers(1, 300),
    st.integers(1, 8),
    st.sampled_from([0.0, 0.001, 0.005, 0.05]),
)
def test_mixed_call_kinds_sizes_and_costs_agree_with_the_model(
    case: MappingCase,
    graph_: tuple[tuple[int, int, int, int, int], list[Stage]],
    batch_size: int,
    credits: int,
    max_delay: float,
) -> None:
    """Plain, generator, ``async def``, threaded and busy ``process_item``s, and a process() that writes in a loop
    and returns a dict beside a preprocess and a postprocess that write, in one graph, with payloads of 100 KB to
    2 MB beside empty ones and ``-i N`` calls of the root: once, then twice at once, each run gives the model's
    multiset, and keeps the order of every path of single instances."""
    source, stages = graph_
    graph, pes = build_mixed(source, stages)
    mapping = aiod4p.mappings.get_mapping(case.name)
    plan = make_plan(graph, mapping.plan_options(case.workers, batch_size, credits))
    expected, ordered = model_mixed(source, stages, pes, {pe: p.parallelism for pe, p in plan.placement.items()})
    options: dict[str, Any] = {"batch_size": batch_size, "credits": credits, "max_delay": max_delay}
    inputs = {pes[0]: source[2]}

    async def three_runs() -> list[aiod4p.Results]:
        async with asyncio.timeout(50):
            first = await aiod4p.run_async(graph, inputs, mapping=case.name, workers=case.workers, **options)
            runs = [
                aiod4p.run_async(graph, inputs, mapping=case.name, workers=case.workers, **options) for _ in range(2)
            ]
            return [first, *await asyncio.gather(*runs)]

    for results in asyncio.run(three_runs()):
        assert sized(results) == expected
        for pe_id, produced in ordered.items():
            assert in_order_of(results, pe_id) == produced


@pytest.mark.parametrize("case", [c for c in CASES if c.name in IN_PROCESS], ids=lambda case: case.id)
@settings(max_examples=12, **SETTINGS)
@given(mixed_graphs(), st.integers(1, 300), st.integers(1, 8), st.integers(0, 40), st.integers(1, 2))
def test_a_run_cancelled_midway_leaves_no_task_and_the_next_run_is_exact(
    case: MappingCase,
    graph_: tuple[tuple[int, int, int, int, int], list[Stage]],
    batch_size: int,
    credits: int,
    turns: int,
    cancels: int,
) -> None:
    """A run cancelled after ``turns`` turns of the loop, once (a drain) or twice (an abort), ends without a task
    left behind and gives no result the model does not; the next run of the same graph gives the model's."""
    source, stages = graph_
    graph, pes = build_mixed(source, stages)
    mapping = aiod4p.mappings.get_mapping(case.name)
    plan = make_plan(graph, mapping.plan_options(case.workers, batch_size, credits))
    expected, _ = model_mixed(source, stages, pes, {pe: p.parallelism for pe, p in plan.placement.items()})
    options: dict[str, Any] = {"workers": case.workers, "batch_size": batch_size, "credits": credits}
    inputs = {pes[0]: source[2]}

    async def cancelled_then_again() -> aiod4p.Results:
        async with asyncio.timeout(50):
            before = asyncio.all_tasks()
            run = asyncio.ensure_future(aiod4p.run_async(graph, inputs, mapping=case.name, **options))
            for _ in range(turns):
                await asyncio.sleep(0)
            for _ in range(cancels):
                run.cancel()
                await asyncio.sleep(0)
            try:
                drained = await run
            except asyncio.CancelledError:
                pass
            else:
                assert not sized(drained) - expected
            await asyncio.sleep(0)  # the run's reader cancelled a helper task: it ends in this turn
            assert asyncio.all_tasks() == before
            return await aiod4p.run_async(graph, inputs, mapping=case.name, **options)

    assert sized(asyncio.run(cancelled_then_again())) == expected
