"""Memory is bounded by channels x credits x batch size, whatever the input size."""

from __future__ import annotations

import asyncio
import time

import workflows as wf

import aiod4p
from aiod4p import ConsumerPE, WorkflowGraph


class SlowSink(ConsumerPE):
    """Spends real time per item, so the producer runs far ahead of it."""

    def consume(self, item: int) -> None:
        if item % 250 == 0:
            time.sleep(0.0002)  # ok-sleep: work, not synchronisation (the sink is slower than the source)


def test_a_million_items_never_exceed_the_inflight_bound() -> None:
    graph = WorkflowGraph()
    graph.connect(source := wf.Count(), "output", double := wf.Double(), "input")
    graph.connect(double, "output", sink := SlowSink(), "input")
    run = aiod4p.start(graph, 1_000_000, mapping="async", batch_size=128, credits=2)

    async def main() -> None:
        async with asyncio.timeout(60):
            await run.results()

    asyncio.run(main())
    stats = {s.pe: s for s in run.stats}
    assert stats[sink.id].items_in == 1_000_000
    for entry in run.stats:
        assert entry.max_queued_items <= entry.inflight_bound
    # The bound is tight: 1 channel x 2 credits x 128 items, plus the feed channel for the root.
    assert stats[sink.id].inflight_bound == 2 * 128
    assert stats[sink.id].max_queued_items > 0
    # The fast side really waited for credit: back-pressure, not buffering.
    assert stats[source.id].feed_blocked_seconds > 0
