"""The word-count benchmark workflow, one run in this process, printed as JSON.

    python bench/wordcount.py ENGINE [WORDS] [WORKERS]

ENGINE is ``aiod4p-simple``, ``aiod4p-async``, ``aiod4p-multi`` (``WORKERS``
worker processes), ``dispel4py-simple`` (run under dispel4py's venv),
``bytewax`` (``WORKERS`` Bytewax worker processes through its testing
launcher; 1 runs in this process) or ``loop`` (a Counter in a plain loop, the
yardstick). Every engine counts the same ``WORDS`` words (default 2,000,000)
drawn with a fixed seed from a 10,000-word vocabulary: a source emits
``(word, 1)`` pairs and a counter with parallelism 2, grouped by the word,
totals them. The run checks every count and prints
``{"seconds": stream time, "cpu": CPU seconds, "words": WORDS}`` (the CPU time
of this process and of the worker processes it waited for, which a loaded
machine does not inflate); the source list is built before the clocks start.
"""

from __future__ import annotations

import collections
import json
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

VOCABULARY = 10_000
WORDS = int(os.environ.get("WORDCOUNT_WORDS", "2000000"))


def words(count: int) -> list[tuple[str, int]]:
    """The input: ``count`` (word, 1) pairs, the same in every process."""
    rng = random.Random(17)
    vocabulary = [f"w{index}" for index in range(VOCABULARY)]
    return [(word, 1) for word in rng.choices(vocabulary, k=count)]


def expected(pairs: list[tuple[str, int]]) -> dict[str, int]:
    return dict(collections.Counter(word for word, _ in pairs))


def run_loop(pairs: list[tuple[str, int]]) -> dict[str, int]:
    counts: dict[str, int] = collections.defaultdict(int)
    for word, count in pairs:
        counts[word] += count
    return dict(counts)


PAIRS: list[tuple[str, int]] = []  # the source's input, set before a run (forked workers inherit it)


def run_aiod4p(pairs: list[tuple[str, int]], mapping: str, workers: int) -> dict[str, int]:
    from aiod4p import GenericPE, ProducerPE, WorkflowGraph, group_by, run

    global Words, Count

    class Words(ProducerPE):  # type: ignore[no-redef]
        def produce(self) -> Iterator[tuple[str, int]]:
            yield from PAIRS

    class Count(GenericPE):  # type: ignore[no-redef]
        def __init__(self) -> None:
            super().__init__(inputs=[("input", group_by(0))], outputs=["output"], parallelism=2)
            self.counts: dict[str, int] = collections.defaultdict(int)

        def process(self, inputs: dict[str, Any]) -> None:
            word, count = inputs["input"]
            self.counts[word] += count

        def postprocess(self) -> None:
            self.write("output", dict(self.counts))

    PAIRS[:] = pairs
    graph = WorkflowGraph()
    graph.connect(Words(), "output", Count(), "input")
    options: dict[str, Any] = {"workers": workers} if mapping == "multi" else {}
    merged: dict[str, int] = {}
    for partial in run(graph, 1, mapping=mapping, **options).data():
        merged.update(partial)
    return merged


def run_dispel4py(pairs: list[tuple[str, int]]) -> dict[str, int]:
    from dispel4py.base import GenericPE, ProducerPE
    from dispel4py.new.simple_process import process
    from dispel4py.workflow_graph import WorkflowGraph

    class Words(ProducerPE):  # type: ignore[misc]
        def _process(self, inputs: Any) -> None:
            for pair in pairs:
                self.write("output", pair)

    merged: dict[str, int] = {}

    class Count(GenericPE):  # type: ignore[misc]
        def __init__(self) -> None:
            GenericPE.__init__(self)
            self._add_input("input", grouping=[0])
            self.counts: dict[str, int] = collections.defaultdict(int)

        def _process(self, inputs: dict[str, Any]) -> None:
            word, count = inputs["input"]
            self.counts[word] += count

        def _postprocess(self) -> None:
            merged.update(self.counts)

    graph = WorkflowGraph()
    counter = Count()
    counter.numprocesses = 2
    graph.connect(Words(), "output", counter, "input")
    process(graph, inputs={_first_root(graph): 1})
    return merged


def _first_root(graph: Any) -> Any:
    for node in graph.graph.nodes():
        pe = node.getContainedObject()
        if not pe.inputconnections:
            return pe
    raise LookupError("no root PE")


def bytewax_flow() -> Any:
    """The Bytewax dataflow: input -> count_final keyed by word -> a list sink."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource

    flow = Dataflow("wordcount")
    stream = op.input("words", flow, TestingSource(words(WORDS), batch_size=256))
    counts = op.count_final("count", stream, lambda pair: pair[0])
    op.output("out", counts, TestingSink(BYTEWAX_OUT))
    return flow


BYTEWAX_OUT: list[tuple[str, int]] = []


def run_bytewax(workers: int) -> dict[str, int] | None:
    if workers == 1:
        from bytewax.testing import run_main

        run_main(bytewax_flow())
        return dict(BYTEWAX_OUT)
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run(
        [sys.executable, "-m", "bytewax.testing", "wordcount:bytewax_flow()", "-p", str(workers)],
        cwd=here,
        check=True,
        env={**os.environ, "WORDCOUNT_WORDS": str(WORDS)},
    )
    return None  # the counts stay in the worker processes


def main(argv: list[str]) -> None:
    engine = argv[0]
    global WORDS
    WORDS = int(argv[1]) if len(argv) > 1 else WORDS
    workers = int(argv[2]) if len(argv) > 2 else 1
    pairs = words(WORDS) if engine != "bytewax" or workers == 1 else []
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    if engine == "loop":
        counts: dict[str, int] | None = run_loop(pairs)
    elif engine.startswith("aiod4p-"):
        counts = run_aiod4p(pairs, engine.removeprefix("aiod4p-"), workers)
    elif engine == "dispel4py-simple":
        counts = run_dispel4py(pairs)
    elif engine == "bytewax":
        counts = run_bytewax(workers)
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    if counts is not None and counts != expected(pairs or words(WORDS)):
        raise SystemExit(f"{engine}: wrong counts")
    print(json.dumps({"seconds": seconds, "cpu": cpu, "words": WORDS}))


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (worker processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main(sys.argv[1:])
