"""Memory is bounded by channels x credits x batch size, whatever the input size."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import workflows as wf
from hypothesis import given, settings
from hypothesis import strategies as st

import aiod4p
from aiod4p import ConsumerPE, GenericPE, IterativePE, PlanOptions, ProducerPE, WorkflowGraph
from aiod4p._channels import CreditedSender, Inbox, LocalChannel
from aiod4p._engine import Worker, _Actor
from aiod4p._links import PeerLink, RemoteChannel
from aiod4p._sizes import approximate_size
from aiod4p.sources import LineStream
from aiod4p.transports.memory import memory_comm_pair


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


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_a_batch_larger_than_batch_bytes_takes_a_credit_per_batch_bytes(kind: str) -> None:
    # A batch of one item larger than batch_bytes (a numpy array of 200 MB) takes one credit per batch_bytes,
    # at most all of them, and gives them back when it is taken: a channel holds one such item in flight, not
    # `credits` of them (multi -n 3 held 2.8 GB of 16 items of 200 MB on three workers, now 1.6 GB).
    async def main() -> None:
        inbox = Inbox()
        if kind == "local":
            channel: CreditedSender = LocalChannel(inbox, 4, 64, 1000)
        else:
            left, right = memory_comm_pair()
            link = PeerLink(left, 1)
            channel = RemoteChannel(link, 7, 4, 1000)
            peer = PeerLink(right, 0)
            peer.add_receiver(7, inbox)
            pumps = [asyncio.create_task(loop()) for loop in (link.write_loop, link.read_loop, peer.write_loop)]
            pumps.append(asyncio.create_task(peer.read_loop()))
        assert (channel.takes(1), channel.takes(1, 1000), channel.takes(1, 1001), channel.takes(1, 10**9)) == (
            1,
            1,
            2,
            4,
        )
        await channel.send("input", [b"x" * 2500], 2500)  # 3 credits
        assert channel.credits == 1
        later = asyncio.create_task(channel.send("input", [b"y" * 2500], 2500))  # needs 3: waits
        source, _, items = await asyncio.wait_for(inbox.get(), 10)
        assert not later.done() and items == [b"x" * 2500]
        source.release()  # the receiver took the batch: its 3 credits come back
        await asyncio.wait_for(later, 10)
        assert channel.credits == 1
        source, _, items = await asyncio.wait_for(inbox.get(), 10)
        source.release()
        if kind == "remote":
            link.finish()
            peer.finish()
            await asyncio.wait_for(asyncio.gather(*pumps), 10)
        assert (items, channel.credits) == ([b"y" * 2500], 4)

    asyncio.run(main())


# -- items of megabytes: a few in flight, also on the simple mapping (whose batches are counts) ------

BLOB = 2 << 20  # bytes: two batches' worth of batch_bytes (1 MiB) each
_made, _taken = [0], [0]
_ahead: list[int] = []  # items made and not yet taken, at each item made


def _blob() -> bytes:
    _made[0] += 1
    _ahead.append(_made[0] - _taken[0])
    return bytes(BLOB)


class YieldsBlobs(ProducerPE):
    def produce(self) -> Iterator[bytes]:
        for _ in range(150):
            yield _blob()


class WritesBlobs(GenericPE):
    def __init__(self) -> None:
        super().__init__(outputs=["output"])

    def process(self, inputs: dict[str, Any]) -> None:
        for _ in range(150):
            self.write("output", _blob())


class ReturnsBlob(ProducerPE):
    def produce(self) -> bytes:  # one per call: -i 150
        return _blob()


class TakesBlobs(ConsumerPE):
    def consume(self, item: bytes) -> None:
        _taken[0] += 1


@pytest.mark.parametrize("provenance", [None, "item"])
@pytest.mark.parametrize("mapping", ["simple", "async"])
@pytest.mark.parametrize("source", [YieldsBlobs, WritesBlobs, ReturnsBlob])
def test_items_of_megabytes_are_made_a_few_ahead_of_their_consumer(
    mapping: str, source: type[GenericPE], provenance: str | None
) -> None:
    # Batches and hand-overs are bounded by batch_bytes too: a call making 150 items of 2 MiB (one generator,
    # writes in a loop, or one item per call of a batch of 150 calls) hands them on one at a time. Before,
    # the simple mapping held 256 yielded, 1,024 written, or a whole batch of calls' items (25 GB of 100 MB
    # arrays). With item-level provenance, whose items travel tagged with their ids, a tagged item counted 8
    # bytes whatever it held: the simple mapping held every one of them again.
    _made[0] = _taken[0] = 0
    _ahead.clear()
    graph = WorkflowGraph()
    graph.connect(source(), "output", TakesBlobs(), "input")
    aiod4p.run(graph, 150 if source is ReturnsBlob else 1, mapping=mapping, provenance=provenance)
    assert _made[0] == _taken[0] == 150
    # One being made, and two in flight: a 2 MiB item takes 2 of the channel's 4 credits (5 before).
    assert max(_ahead) <= 3, max(_ahead)


TENTH = 100_000  # bytes: about a tenth of batch_bytes


class MakesTenths(IterativePE):
    """Half a millisecond of CPU per item: a batch within the worker carries sixteen of them (8 ms), called
    in parts of ten (5 ms), and the outputs of a part, ten tenths, fit in batch_bytes."""

    def process_item(self, item: int) -> bytes:
        end = time.perf_counter() + 0.0005  # the item's cost
        while time.perf_counter() < end:
            pass
        return bytes(TENTH)


def test_the_parts_of_a_batch_buffer_at_most_batch_bytes_together(monkeypatch: pytest.MonkeyPatch) -> None:
    # The parts of a batch's calls were handed on only when the loop had been held 5 ms, and each part's
    # bound by batch_bytes counted its own outputs only: when the parts ran faster than their measured pace
    # (a stage held back by a slower one, measured at its pace), the buffers grew part after part, 8.6 MB
    # of 100 KB items seen. Here the loop is never held too long, so nothing but the bound hands them on.
    maker = MakesTenths()
    held: list[int] = []
    route_outputs = _Actor._route_outputs

    async def measured(actor: _Actor, detach: bool = False) -> None:
        if actor.ref.pe == maker.id:
            held.append(actor._buffered_bytes())
        await route_outputs(actor, detach)

    monkeypatch.setattr(_Actor, "_route_outputs", measured)
    monkeypatch.setattr(Worker, "held_too_long", lambda worker: False)
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", maker, "input")
    graph.connect(maker, "output", TakesBlobs(), "input")
    aiod4p.run(graph, 400, mapping="async")
    assert max(held) <= PlanOptions().batch_bytes + TENTH, max(held)


class MakesBlobsAhead(GenericPE):
    """Yields ``count`` items of ``size`` bytes on ``output``, each after noting how many it made that
    ``taken`` (a file a byte longer per item taken, by any process) does not count yet; then the most
    it was ahead, on ``ahead``."""

    def __init__(self, taken: str, count: int, size: int) -> None:
        super().__init__(outputs=["output", "ahead"])
        self.taken, self.count, self.size = taken, count, size

    def process(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        most = 0
        for made in range(self.count):
            most = max(most, made - os.stat(self.taken).st_size)
            yield {"output": bytes(self.size)}
        yield {"ahead": most}


class AlternatesTinyAndHeavy(ProducerPE):
    """Yields a tiny item, then one of 4 MiB, 40 times (counted as made in ``_made``, and ahead in ``_ahead``)."""

    def produce(self) -> Iterator[bytes]:
        for _ in range(40):
            yield b"x"
            yield _blob()


class TakesHeavySlowly(ConsumerPE):
    def consume(self, item: bytes) -> None:
        if len(item) > 1:
            _taken[0] += 1
            time.sleep(0.005)  # ok-sleep: work, not synchronisation (the sink is slower than the source)


def test_heavy_items_between_tiny_ones_wait_for_credit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Once heavy batches took all their channel's credits, a tiny batch after one went out only when they came
    # back, with a limit sized by its tiny item (about 500 items): the heavy items after it piled up behind that
    # limit without ever waiting for credit, 38 of 40 at once (150 MB) where 2 were before. An item larger than
    # batch_bytes now fills the batch it joins.
    monkeypatch.setattr(sys.modules[__name__], "BLOB", 4 << 20)
    _made[0] = _taken[0] = 0
    _ahead.clear()
    graph = WorkflowGraph()
    graph.connect(AlternatesTinyAndHeavy(), "output", TakesHeavySlowly(), "input")
    aiod4p.run(graph, 1, mapping="async")
    assert _made[0] == _taken[0] == 40
    assert max(_ahead) <= 3, max(_ahead)


def test_items_larger_than_a_batch_cross_between_workers_one_per_channel(tmp_path: Path) -> None:
    # Between workers, a batch took one credit whatever its bytes: each channel to another worker held 4 items
    # of 200 MB, each as large as the whole pipe's bounds. Now an item of credits x batch_bytes or more takes
    # all of its channel's credits: the source's worker holds a few items, whatever their size.
    (taken := tmp_path / "taken").touch()
    graph = WorkflowGraph()
    source = MakesBlobsAhead(str(taken), 40, 4 * PlanOptions().batch_bytes)
    sink = CountsTaken(str(taken))
    sink.parallelism = 2  # one on each worker: one channel within the source's worker, one to the other
    graph.connect(source, "output", sink, "input")
    results = aiod4p.run(graph, 1, mapping="multi", workers=2)
    assert taken.stat().st_size == 40
    # One being made; on each channel one in flight, one taken and not yet counted, one waiting for credit
    # (2 or 3 measured; 8 or more before).
    (ahead,) = results.data(source.id, "ahead")
    assert ahead <= 5, ahead


# -- feeds of heavy elements: read a few ahead of the root, however they are given ---------------------


class CountsTaken(ConsumerPE):
    """Appends a byte to ``path`` per item taken: the feed (in the launcher on multi) reads the count there."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def consume(self, item: Any) -> None:
        with open(self.path, "ab") as taken:
            taken.write(b".")


def _heavy_elements(kind: str, taken: Path, ahead: list[int], count: int) -> Iterator[Any]:
    """``count`` elements of about 2 MiB (``bytes``, or a list of floats as :func:`approximate_size` scales
    it), recording before each how many were pulled and not yet taken."""
    for made in range(count):
        ahead.append(made - (taken.stat().st_size if taken.exists() else 0))
        yield bytes(BLOB) if kind == "bytes" else [0.5] * (BLOB // 8)


async def _async_elements(elements: Iterator[Any]) -> AsyncIterator[Any]:
    for element in elements:
        yield element


@pytest.mark.parametrize(("mapping", "bound"), [("simple", 8), ("async", 8), ("multi", 16)])
@pytest.mark.parametrize("kind", ["bytes", "list"])
@pytest.mark.parametrize("form", ["iterable", "async iterable"])
def test_a_feed_of_heavy_elements_is_pulled_a_few_ahead_of_its_root(
    mapping: str, bound: int, kind: str, form: str, tmp_path: Path
) -> None:
    # The read-ahead, a feed's batches and the launcher's feed pump are bounded by batch_bytes too. Before,
    # up to about 1,280 elements were held (256 read ahead, credits x batch size in flight, the pump's own
    # read-ahead): 40 JSON lines of 5 MB took 438 MB of RSS.
    count, taken, ahead = 60, tmp_path / "taken", []
    graph = WorkflowGraph()
    graph.add(root := CountsTaken(str(taken)))
    elements = _heavy_elements(kind, taken, ahead, count)
    feed = elements if form == "iterable" else _async_elements(elements)
    run = aiod4p.start(graph, {root: feed}, mapping=mapping, workers=1)

    async def main() -> None:
        async with asyncio.timeout(120):
            await run.results()

    asyncio.run(main())
    assert (len(ahead), taken.stat().st_size) == (count, count)
    assert max(ahead) <= bound, max(ahead)


def test_the_size_of_a_long_container_scales_with_its_length() -> None:
    # 16 elements are measured, then scaled: a list of 500,000 floats counted as 136 bytes before.
    assert approximate_size([0.5] * 500_000)[0] == 8 + 8 * 500_000
    assert approximate_size({"data": [0.5] * 500_000})[0] == 8 + 8 + 8 * 500_000
    assert approximate_size((b"ab",) * 100) == (8 + 2 * 100, 2 * 100)
    assert approximate_size(["x" * 10] * 4)[0] == 8 + 40  # short containers are measured whole


def _measured(item: Any, depth: int = 2) -> tuple[int, int]:
    """What :func:`approximate_size` computes, said plainly (one call per element): its model."""
    if type(item) in (int, float, bool, type(None)):
        return 8, 0
    if isinstance(getattr(item, "nbytes", None), int):
        return item.nbytes, 0
    if type(item) is bytes:
        return len(item), len(item)
    if isinstance(item, (bytes, bytearray, str)):
        return len(item), 0
    if depth and isinstance(item, (tuple, list, dict)):
        elements = list(item.values() if isinstance(item, dict) else item)[:16]
        sizes = [_measured(element, depth - 1) for element in elements]
        size, in_bytes = sum(s for s, _ in sizes), sum(b for _, b in sizes)
        if len(item) > 16:
            size, in_bytes = size * len(item) // 16, in_bytes * len(item) // 16
        return 8 + size, in_bytes
    return 8, 0


class _Text(str):
    """A str subclass: measured as a string, not by the exact-type shortcut."""


_leaves = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.binary(max_size=40).map(bytearray),
    st.text(max_size=10).map(_Text),
)
_items = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=40),
        st.lists(inner, max_size=40).map(tuple),
        st.dictionaries(st.text(max_size=5), inner, max_size=40),
    ),
    max_leaves=120,
)


@settings(max_examples=300, deadline=None)
@given(_items)
def test_the_size_of_an_item_is_its_models(item: Any) -> None:
    assert approximate_size(item) == _measured(item)


_streams: list[LineStream] = []  # the stream read (a PE is copied into its instances: not an attribute)
_line_bytes = BLOB
_lines_ahead: list[int] = []  # lines read and not yet taken, at each line taken


class CountsLines(ConsumerPE):
    def consume(self, item: Any) -> None:
        _lines_ahead.append(_streams[0].bytes_read // _line_bytes - (len(_lines_ahead) + 1))


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_a_stream_of_heavy_lines_is_read_a_few_lines_ahead_of_its_root(mapping: str, tmp_path: Path) -> None:
    # The read-ahead counts a line stream's elements by the raw bytes it read (--stdin, -f/-d as LinesSource),
    # without measuring the decoded items. Before, 256 lines were read ahead of the root, whatever their size.
    (path := tmp_path / "heavy.jsonl").write_bytes((b'"' + b"x" * (_line_bytes - 3) + b'"\n') * 60)
    _streams[:] = [stream := LineStream(path, json=True)]
    _lines_ahead.clear()
    graph = WorkflowGraph()
    graph.add(root := CountsLines())
    run = aiod4p.start(graph, {root: stream}, mapping=mapping)

    async def main() -> None:
        async with asyncio.timeout(120):
            await run.results()

    asyncio.run(main())
    assert len(_lines_ahead) == 60
    assert max(_lines_ahead) <= 8, max(_lines_ahead)


# -- results of megabytes: a slow reader holds them back in the workers, by bytes ----------------------

HEAVY_RESULTS = 100


class MakesResults(ProducerPE):
    """Results of 2 MiB, made far faster than the reader takes them (written bytes: ``bytes(n)``'s zeros take no
    memory until touched, and the launcher's growth must count every result it holds)."""

    def produce(self) -> Iterator[bytes]:
        for _ in range(HEAVY_RESULTS):
            yield b"r" * BLOB


def _rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("mapping", ["multi", "mpi"])
def test_results_of_megabytes_wait_for_a_slow_reader_bounded_by_bytes(mapping: str) -> None:
    # Results on their way to the launcher were bounded by counts only: 16 batches in its queue, 32 messages in
    # each worker's pipe, each batch what a worker made in 5 ms; the launcher grew by about 300 MB for 200 results
    # of 2 MB read slowly. Now by bytes too: result_bytes in its queue and from each worker (PlanOptions).
    if mapping == "mpi":
        pytest.importorskip("mpi4py")
    graph = WorkflowGraph()
    graph.add(MakesResults())

    async def main() -> tuple[int, int]:
        count, before = 0, _rss()
        peak = before
        async with asyncio.timeout(60), aiod4p.start(graph, mapping=mapping, workers=2) as run:
            async for record in run:
                assert len(record.data) == BLOB
                count += 1
                await asyncio.sleep(0.01)  # a slow reader: the launcher's loop takes whatever may wait meanwhile
                peak = max(peak, _rss())
        return count, peak - before

    count, growth = asyncio.run(main())
    assert count == HEAVY_RESULTS
    bound = 2 * (PlanOptions().result_bytes * 3 + BLOB)  # its queue, each worker's window, one result; doubled
    assert growth <= bound, f"the launcher grew by {growth >> 20} MiB (bound {bound >> 20} MiB)"
