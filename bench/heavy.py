"""The coarse-grained benchmark's workflows in aiod4p (bench/heavy_d4p.py has them in dispel4py's API).

    aiod4p run bench/heavy.py:seismic --mapping multi -n 2 -i 1
    aiod4p run bench/heavy.py:galaxies ...
    aiod4p run bench/heavy.py:articles ...

``sweep(...)`` builds the synthetic chain of the sweep. The work is in
bench/heavy_work.py.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heavy_work as work

from aiod4p import GLOBAL, GenericPE, IterativePE, ProducerPE, WorkflowGraph, group_by

# -- seismic ---------------------------------------------------------------------------


class Stations(ProducerPE):
    def produce(self) -> Iterator[tuple[str, Any]]:
        yield from work.station_traces()


class Whiten(IterativePE):
    def process_item(self, item: tuple[str, Any]) -> tuple[str, Any]:
        name, trace = item
        return name, work.whiten(trace)


class Pairs(GenericPE):
    """Collects every whitened trace, then emits every pair."""

    def __init__(self) -> None:
        super().__init__(inputs=[("input", GLOBAL)], outputs=["output"])
        self.spectra: dict[str, Any] = {}

    def process(self, inputs: dict[str, Any]) -> None:
        name, spectrum = inputs["input"]
        self.spectra[name] = spectrum

    def postprocess(self) -> None:
        for left, right in itertools.combinations(sorted(self.spectra), 2):
            self.write("output", (left, right, self.spectra[left], self.spectra[right]))


class XCorr(IterativePE):
    def process_item(self, item: tuple[str, str, Any, Any]) -> tuple[str, str, int]:
        left, right, a, b = item
        return left, right, work.xcorr_peak(a, b)


class Lags(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=[("input", GLOBAL)], outputs=[])
        self.lags: list[tuple[str, str, int]] = []

    def process(self, inputs: dict[str, Any]) -> None:
        self.lags.append(inputs["input"])

    def postprocess(self) -> None:
        work.write_summary(sorted(self.lags))


def _seismic() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Stations(), "output", whiten := Whiten(), "input")
    graph.connect(whiten, "output", pairs := Pairs(), "input")
    graph.connect(pairs, "output", xcorr := XCorr(), "input")
    graph.connect(xcorr, "output", Lags(), "input")
    return graph


# -- galaxies --------------------------------------------------------------------------


class Catalogue(ProducerPE):
    def produce(self) -> Iterator[tuple[int, float, float, float]]:
        yield from work.galaxies()


class Lookup(IterativePE):
    """A remote catalogue query per row: waits without holding the event loop."""

    def __init__(self) -> None:
        super().__init__(parallelism=8)

    async def process_item(self, row: tuple[int, float, float, float]) -> tuple[int, float, float]:
        await asyncio.sleep(work.LOOKUP_SECONDS)
        return work.extinction(row)


class Classify(IterativePE):
    def process_item(self, looked_up: tuple[int, float, float]) -> str:
        return work.classify(looked_up)


class Census(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=[("input", GLOBAL)], outputs=[])
        self.counts: collections.Counter[str] = collections.Counter()

    def process(self, inputs: dict[str, Any]) -> None:
        self.counts[inputs["input"]] += 1

    def postprocess(self) -> None:
        work.write_summary(dict(self.counts))


def _galaxies() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Catalogue(), "output", lookup := Lookup(), "input")
    graph.connect(lookup, "output", classify := Classify(), "input")
    graph.connect(classify, "output", Census(), "input")
    return graph


# -- articles --------------------------------------------------------------------------


class Articles(ProducerPE):
    def produce(self) -> Iterator[tuple[int, str, str]]:
        yield from work.articles()


class Score(IterativePE):
    def process_item(self, article: tuple[int, str, str]) -> tuple[str, int]:
        return work.score(article)


class TopicTotals(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=[("input", group_by(0))], outputs=["output"], parallelism=2)
        self.totals: collections.Counter[str] = collections.Counter()

    def process(self, inputs: dict[str, Any]) -> None:
        topic, value = inputs["input"]
        self.totals[topic] += value

    def postprocess(self) -> None:
        for topic, total in self.totals.items():
            self.write("output", (topic, total))


class Summary(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=[("input", GLOBAL)], outputs=[])
        self.totals: dict[str, int] = {}

    def process(self, inputs: dict[str, Any]) -> None:
        topic, total = inputs["input"]
        self.totals[topic] = total

    def postprocess(self) -> None:
        work.write_summary(self.totals)


def _articles() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Articles(), "output", scorer := Score(), "input")
    graph.connect(scorer, "output", totals := TopicTotals(), "input")
    graph.connect(totals, "output", Summary(), "input")
    return graph


# -- the synthetic sweep -------------------------------------------------------------------


class Items(ProducerPE):
    def __init__(self, count: int, size: int) -> None:
        super().__init__()
        self.count, self.size = count, size

    def produce(self) -> Iterator[bytes]:
        for index in range(self.count):
            yield index.to_bytes(8, "little") + bytes(max(self.size - 8, 0))


class Spin(IterativePE):
    """Pure-Python work of a fixed number of loop iterations per item."""

    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.iterations = iterations

    def process_item(self, item: bytes) -> bytes:
        work.spin(self.iterations)
        return item


class Tally(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=[("input", GLOBAL)], outputs=["count"])
        self.seen = 0

    def process(self, inputs: dict[str, Any]) -> None:
        self.seen += 1

    def postprocess(self) -> None:
        self.write("count", self.seen)


def sweep(count: int, size: int, stages: int, iterations: int) -> WorkflowGraph:
    """Source -> ``stages`` stages of ``iterations`` spins per item -> a global tally."""
    graph = WorkflowGraph()
    previous: ProducerPE | IterativePE = Items(count, size)
    for _ in range(stages):
        stage = Spin(iterations)
        graph.connect(previous, "output", stage, "input")
        previous = stage
    graph.connect(previous, "output", Tally(), "input")
    return graph


seismic = _seismic()
galaxies = _galaxies()
articles = _articles()
