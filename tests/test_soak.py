"""Soak: a live source at full speed through a slower sink runs in constant memory.

The normal suite streams 1 million items (about 5 s); the full soak
(10 million items, about 40 s) runs with ``nox -s soak`` or
``AIOD4P_SOAK_ITEMS=10000000 pytest tests/test_soak.py``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import aiod4p
from aiod4p import ConsumerPE, IterativePE, WorkflowGraph
from aiod4p.sources import AsyncIterSource

ITEMS = int(os.environ.get("AIOD4P_SOAK_ITEMS", "1000000"))
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


async def endless_count(limit: int) -> AsyncIterator[dict[str, int]]:
    """As fast as the workflow takes them: a fresh object per item, like parsed observations."""
    for i in range(limit):
        yield {"seq": i, "value": i % 97}


class Scale(IterativePE):
    def process_item(self, item: dict[str, int]) -> dict[str, int]:
        return {"seq": item["seq"], "value": item["value"] * 3}


class SlowSink(ConsumerPE):
    """More work per item than the source does, and RSS samples every ``every`` items."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.count = 0
        self.total = 0
        self.samples: list[int] = []

    def consume(self, item: dict[str, Any]) -> None:
        self.total += item["value"]
        self.count += 1
        if self.count % 500 == 0:
            time.sleep(0.001)  # ok-sleep: work, not synchronisation (a sink slower than the source)
        if self.count % self.every == 0:
            self.samples.append(rss_bytes())


@pytest.mark.timeout(max(60, 15 * ITEMS // 1_000_000))
def test_rss_stays_flat_under_a_full_speed_live_source() -> None:
    graph = WorkflowGraph()
    graph.connect(AsyncIterSource(endless_count, ITEMS), "output", scale := Scale(), "input")
    graph.connect(scale, "output", sink := SlowSink(every=ITEMS // 20), "input")
    run = aiod4p.start(graph)

    async def main() -> None:
        async with asyncio.timeout(max(50, 14 * ITEMS // 1_000_000)):
            await run.results()

    asyncio.run(main())
    (counted,) = run.instances(sink)  # the run's own copy of the sink
    assert counted.count == ITEMS
    baseline = counted.samples[1]  # after warm-up
    growth = max(counted.samples) - baseline
    print(f"soak: {ITEMS} items, RSS {baseline / 2**20:.1f} MB -> max {max(counted.samples) / 2**20:.1f} MB")
    assert growth < 50 * 2**20
    for entry in run.stats:
        assert entry.max_queued_items <= entry.inflight_bound
