"""The workflow of bench/bench_memory.py: ``HEAVY_N`` results, each a numpy array of ``HEAVY_MB`` MB.

A source makes the arrays, a stage adds one to each: its outputs are the run's results, which a slow reader
takes (bench_memory's reader), so they wait for it: in the workers, on their way, in the caller's queue.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy

from aiod4p import IterativePE, ProducerPE, WorkflowGraph

COUNT = int(os.environ.get("HEAVY_N", "200"))
MEGABYTES = float(os.environ.get("HEAVY_MB", "2"))


class Arrays(ProducerPE):
    def produce(self) -> Iterator[numpy.ndarray]:
        for index in range(COUNT):
            array = numpy.empty(int(MEGABYTES * (1 << 20)) // 8)
            array.fill(index)
            yield array


class AddOne(IterativePE):
    def process_item(self, array: numpy.ndarray) -> numpy.ndarray:
        return array + 1


graph = WorkflowGraph()
graph.connect(Arrays(), "output", AddOne(), "input")
