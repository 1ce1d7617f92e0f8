"""An ``async def`` PE awaiting simulated I/O: parallelism buys concurrency.

    aiod4p run examples/async_io.py -i 20 --mapping async -n 10

Each lookup waits 50 ms (think: a web service or a database). With one
instance 20 lookups take about 1 s; with ``-n 10`` instances in one event loop
they overlap and take about 0.1 s. The ``Elapsed`` PE reports the wall time.
"""

from __future__ import annotations

import asyncio
import time

from aiod4p import ConsumerPE, IterativePE, ProducerPE, WorkflowGraph

DELAY = 0.05


class Stations(ProducerPE):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def produce(self) -> str:
        self.count += 1
        return f"station-{self.count:03d}"


class Lookup(IterativePE):
    """Fetches a (simulated) reading for a station."""

    async def process_item(self, station: str) -> tuple[str, int]:
        await asyncio.sleep(DELAY)
        return station, len(station) * 7 % 13


class Elapsed(ConsumerPE):
    """Counts readings and reports the elapsed wall time at the end."""

    def __init__(self) -> None:
        super().__init__(parallelism=1)
        self.add_output("summary")
        self.started = 0.0
        self.readings = 0

    def preprocess(self) -> None:
        self.started = time.perf_counter()

    def consume(self, reading: tuple[str, int]) -> None:
        self.readings += 1

    def postprocess(self) -> None:
        self.write("summary", {"readings": self.readings, "seconds": round(time.perf_counter() - self.started, 3)})


def build() -> WorkflowGraph:
    graph = WorkflowGraph()
    stations, lookup, elapsed = Stations(), Lookup(), Elapsed()
    graph.connect(stations, "output", lookup, "input")
    graph.connect(lookup, "output", elapsed, "input")
    return graph


graph = build()
