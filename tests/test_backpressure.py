"""Memory is bounded by channels x credits x batch size, whatever the input size."""

from __future__ import annotations

import asyncio
import time

import workflows as wf

import aiod4p
from aiod4p import ConsumerPE, WorkflowGraph
from aiod4p._channels import Inbox, LocalChannel


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


def test_a_batch_within_a_worker_takes_a_credit_per_batch_size_items() -> None:
    # A batch of tiny items may carry up to credits x batch_size items: it takes one credit per batch_size
    # (rounded up), so the channel never has more than credits x batch_size items in flight.
    async def main() -> None:
        inbox = Inbox()
        channel = LocalChannel(inbox, 4, 64)
        assert (channel.takes(1), channel.takes(130), channel.takes(10_000)) == (1, 3, 4)
        await channel.send("input", list(range(130)))  # 3 credits
        assert channel.credits == 1
        later = asyncio.create_task(channel.send("input", list(range(65))))  # needs 2: waits
        await asyncio.sleep(0)  # one turn of the loop: the send is still waiting
        assert not later.done() and inbox.queued_items == 130
        source, _, items = await inbox.get()
        source.release()  # the 3 credits come back
        await asyncio.wait_for(later, 10)
        assert (len(items), channel.credits, inbox.queued_items) == (130, 2, 65)

    asyncio.run(main())
