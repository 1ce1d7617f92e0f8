"""Workflows embedded in an application's event loop; the example service driven by real clients."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import workflows as wf

import aiod4p
from aiod4p import Aiod4pError, InputError, IterativePE, LiveFeed, PEError, WorkflowGraph

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import service  # noqa: E402 - the example, imported from examples/


class Gate(IterativePE):
    """Passes items once the test opens its gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = wf.Shared(event=asyncio.Event())

    async def process_item(self, item: Any) -> Any:
        await self.gate.event.wait()
        return item


def gated() -> tuple[WorkflowGraph, wf.Double, Gate]:
    graph = WorkflowGraph()
    graph.connect(entry := wf.Double(), "output", gate := Gate(), "input")
    return graph, entry, gate


@pytest.mark.asyncio
async def test_send_waits_while_the_workflow_is_full() -> None:
    graph, entry, gate = gated()
    feed = LiveFeed(maxsize=8)
    run = aiod4p.start(graph, {entry: feed}, batch_size=4, credits=1)
    total = 500
    async with asyncio.timeout(20), run:

        async def produce() -> None:
            for i in range(total):
                await run.send(entry.id, i)
            feed.close()

        sender = asyncio.create_task(produce())
        while not feed.full():  # noqa: ASYNC110 - the feed fills up behind the closed gate
            await asyncio.sleep(0.001)
        for _ in range(100):  # let every task take more steps: the sender stays blocked
            await asyncio.sleep(0)
        assert not sender.done() and feed.full()
        stats = {s.pe: s for s in run.live_stats()}
        assert stats[entry.id].items_in < 4 * 4  # the engine holds a few batches, the rest waits in send()
        gate.gate.event.set()
        data = (await run.results()).data()
        await sender
    assert data == [2 * i for i in range(total)]


@pytest.mark.asyncio
async def test_several_workflows_side_by_side_in_one_loop() -> None:
    runs = []
    for factor in (1, 2, 3):
        graph = WorkflowGraph()
        entry = wf.Double()
        graph.add(entry)
        feed = LiveFeed(4)
        runs.append((aiod4p.start(graph, {entry: feed}, batch_size=2), entry, feed, factor))
    async with asyncio.timeout(20):
        collectors = [asyncio.ensure_future(run.results()) for run, *_ in runs]
        for i in range(200):
            for run, entry, _, factor in runs:
                await run.send(entry.id, i * factor)
        for _, _, feed, _ in runs:
            feed.close()
        results = [(await c).data() for c in collectors]
    for (_, _, _, factor), data in zip(runs, results, strict=True):
        assert data == [2 * i * factor for i in range(200)]


@pytest.mark.asyncio
async def test_send_errors() -> None:
    graph, entry, gate = gated()
    gate.gate.event.set()
    feed = LiveFeed()
    run = aiod4p.start(graph, {entry: feed})
    async with asyncio.timeout(20), run:
        with pytest.raises(InputError, match=r"not a LiveFeed \(PEs fed by a LiveFeed: Double"):
            await run.send(gate.id, 1)
        await run.send("Double", 1)  # by name
        feed.close()
        with pytest.raises(Aiod4pError, match="feed is closed"):
            await run.send(entry.id, 2)
        assert (await run.results()).data() == [2]
        with pytest.raises(Aiod4pError, match="feed is closed or the run has ended"):
            await run.send(entry.id, 3)


@pytest.mark.asyncio
@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
async def test_send_and_feed_take_the_pe_as_the_inputs_do(mapping: str) -> None:
    """They took a PE id or name only: given the PE, as the inputs are, send() said ``the input of <Double Double0>
    is not a LiveFeed (PEs fed by a LiveFeed: Double0)``. A PE not in the graph, or not fed by a LiveFeed, is named
    as such."""
    graph = WorkflowGraph()
    graph.connect(entry := wf.Double(), "output", after := wf.Double(), "input")
    feed = LiveFeed()
    async with asyncio.timeout(60), aiod4p.start(graph, {entry: feed}, mapping=mapping) as run:
        assert run.feed(entry) is feed
        await run.send(entry, 1)
        await run.send(entry.id, 2)
        with pytest.raises(
            InputError, match=rf"^the input of PE {after.id} is not a LiveFeed \(PEs fed by a LiveFeed: {entry.id}\)$"
        ):
            await run.send(after, 3)
        with pytest.raises(InputError, match=r"^PE Double given as PE to feed is not in the graph$"):
            await run.send(wf.Double(), 4)
        feed.close()
        assert sorted((await run.results()).data()) == [4, 8]


@pytest.mark.asyncio
async def test_a_blocked_send_raises_the_runs_error() -> None:
    graph = WorkflowGraph()
    graph.connect(entry := wf.Double(), "output", fail := wf.Fail(on=2 * 300), "input")
    graph.connect(fail, "output", wf.Discard(), "input")
    feed = LiveFeed(2)
    run = aiod4p.start(graph, {entry: feed}, batch_size=2, credits=1)
    async with asyncio.timeout(20), run:
        with pytest.raises(PEError, match="bad item 600"):
            for i in range(10_000):
                await run.send(entry.id, i)


@pytest.mark.asyncio
async def test_a_reader_and_a_sender_of_an_aborted_run_get_an_error_not_a_cancellation() -> None:
    """A service that aborts a run (``aclose()``, its client gone) while its reader and sender wait in tasks of
    their own: they ended with the run task's ``CancelledError``, as if they had been cancelled themselves, which
    ``except Aiod4pError`` does not catch and a TaskGroup takes for a cancellation."""
    graph, entry, _ = gated()  # the gate stays closed: the reader waits, the feed fills up
    feed = LiveFeed(maxsize=2)
    run = aiod4p.start(graph, {entry: feed}, batch_size=1, credits=1)
    aborted = "the run was aborted before it finished"

    async def send_until_refused() -> None:
        with pytest.raises(Aiod4pError, match=aborted):
            for i in range(10_000):
                await run.send(entry.id, i)

    async def read_until_refused() -> None:
        with pytest.raises(Aiod4pError, match=aborted):
            async for _ in run:
                pass

    async with asyncio.timeout(20):
        sender, reader = asyncio.create_task(send_until_refused()), asyncio.create_task(read_until_refused())
        while not feed.full():  # noqa: ASYNC110 - the feed fills up behind the closed gate
            await asyncio.sleep(0.001)
        await run.aclose()
        await sender
        await reader
        with pytest.raises(Aiod4pError, match=aborted):
            await run.results()


def _doubling() -> tuple[WorkflowGraph, wf.Double]:
    graph = WorkflowGraph()
    graph.add(entry := wf.Double())
    return graph, entry


@pytest.mark.asyncio
@pytest.mark.parametrize("mapping", ["async", "multi"])
async def test_a_live_feed_feeds_one_run_at_a_time(mapping: str) -> None:
    """A second run given the feed of a run under way took some of its items, each run seeing part of the stream
    and nothing said so. It is refused, naming its PE; once the first run read the closed feed to its end, a
    later run given it is refused too (its stream is over)."""
    feed = LiveFeed()
    (graph, entry), (other, second_entry) = _doubling(), _doubling()
    async with asyncio.timeout(60):
        async with aiod4p.start(graph, {entry: feed}, mapping=mapping, workers=1) as first:
            second = aiod4p.start(other, {second_entry: feed}, mapping=mapping, workers=1)
            refused = rf"^the LiveFeed given as the input of PE {second_entry.id} is already feeding another run \(its"
            with pytest.raises(InputError, match=rf"{refused} PE {entry.id}\), which has not ended"):
                async with second:
                    pass
            for i in range(100):
                await feed.send(i)
            feed.close()
            assert (await first.results()).data() == [2 * i for i in range(100)]
        with pytest.raises(InputError, match="was closed and an earlier run read it to its end: its stream is over"):
            await aiod4p.run_async(other, {second_entry: feed}, mapping=mapping, workers=1)


@pytest.mark.asyncio
async def test_a_live_feed_whose_run_was_aborted_feeds_a_later_run() -> None:
    """A run that ended without closing its feed (aborted, or failed) lets it go: a later run takes it up."""
    feed = LiveFeed()
    graph, entry = _doubling()
    async with asyncio.timeout(20):
        async with aiod4p.start(graph, {entry: feed}) as first:
            await feed.send(1)
            assert (await anext(aiter(first))).data == 2
        async with aiod4p.start(graph, {entry: feed}) as later:
            await feed.wait_read()
            await feed.send(2)
            feed.close()
            assert (await later.results()).data() == [4]


@pytest.mark.asyncio
async def test_a_batch_taken_as_the_reader_is_cancelled_comes_with_its_next_read() -> None:
    """A service reading with a timeout (``wait_for(anext(run), t)``) lost the results that arrived in the loop
    turn its wait timed out: taken from the run's queue, dropped with the cancellation."""
    feed = LiveFeed()
    graph, entry = _doubling()
    async with asyncio.timeout(20), aiod4p.start(graph, {entry: feed}) as run:
        queue = run._sink.queue
        take = queue.get

        async def take_then_cancel_the_reader() -> Any:
            batch = await take()
            reader.cancel()  # the reader's wait ends in this turn, cancelled, with the batch already taken
            return batch

        queue.get = take_then_cancel_the_reader  # type: ignore[method-assign]
        reader = asyncio.ensure_future(anext(aiter(run)))
        await run.send(entry.id, 21)
        with pytest.raises(asyncio.CancelledError):
            await reader
        queue.get = take  # type: ignore[method-assign]
        assert (await anext(aiter(run))).data == 42
        feed.close()
        assert (await run.results()).data() == []


@pytest.mark.asyncio
async def test_a_send_cancelled_as_the_feed_makes_room_queues_nothing() -> None:
    """A service sending with a timeout (``wait_for(run.send(...), t)``) and sending again on timeout had an item
    processed twice: it was queued in the loop turn its send was cancelled."""
    graph, entry, gate = gated()
    feed = LiveFeed(maxsize=2)
    async with asyncio.timeout(20), aiod4p.start(graph, {entry: feed}, batch_size=1, credits=1) as run:
        sent = 0
        while not feed.full():
            await run.send(entry.id, sent)
            sent += 1
            await asyncio.sleep(0.001)
        wake_next = feed._wake_next

        def wake_then_cancel_the_sender() -> None:
            wake_next()
            sender.cancel()  # the sender's turn comes and it is cancelled in one step, before it resumes

        sender = asyncio.ensure_future(run.send(entry.id, -1))
        await asyncio.sleep(0)
        assert not sender.done()
        feed._wake_next = wake_then_cancel_the_sender  # type: ignore[method-assign]
        gate.gate.event.set()
        with pytest.raises(asyncio.CancelledError):
            await sender
        feed.close()
        assert (await run.results()).data() == [2 * i for i in range(sent)]


@pytest.mark.asyncio
@pytest.mark.parametrize("mapping", ["async", "multi"])
@pytest.mark.parametrize("through", ["run", "feed"])
async def test_senders_into_a_full_feed_take_turns(mapping: str, through: str) -> None:
    """A client sending in a loop shut the others out: a sender woken by room filled it before the others ran,
    and waited again ahead of them (in 1 s, 2,360 items of one client and none of the other)."""
    feed = LiveFeed(maxsize=4)
    graph, entry = _doubling()
    each = 300
    sent = {"a": 0, "b": 0}
    async with asyncio.timeout(30), aiod4p.start(graph, {entry: feed}, mapping=mapping, workers=2) as run:
        send = functools.partial(run.send, entry) if through == "run" else feed.send

        async def sender(name: str) -> None:
            for item in range(each):
                await send(item)
                sent[name] += 1

        reader = asyncio.ensure_future(run.results())
        first = asyncio.ensure_future(sender("a"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(sender("b"))
        await first
        assert sent["b"] >= each - 2 * feed.maxsize, sent  # b was at most a feed behind when a ended
        await second
        feed.close()
        assert sorted((await reader).data()) == sorted(2 * item for item in range(each) for _ in "ab")


@pytest.mark.asyncio
@pytest.mark.parametrize("mapping", ["async", "multi"])
async def test_a_service_sending_and_reading_with_timeouts_gets_each_result_once(mapping: str) -> None:
    """Sends and reads that time out and are tried again, as a service with heartbeats does: every item is
    processed once and every result read once."""
    feed = LiveFeed(maxsize=4)
    graph, entry = _doubling()
    total = 2000
    received: list[int] = []
    async with asyncio.timeout(60), aiod4p.start(graph, {entry: feed}, mapping=mapping, workers=2) as run:

        async def read() -> None:
            results = aiter(run)
            while True:
                try:
                    received.append((await asyncio.wait_for(anext(results), 0.0002)).data)
                except TimeoutError:
                    continue
                except StopAsyncIteration:
                    return

        reader = asyncio.ensure_future(read())
        for item in range(total):
            while True:
                try:
                    await asyncio.wait_for(run.send(entry.id, item), 0.0002)
                    break
                except TimeoutError:
                    continue
        feed.close()
        await reader
    assert sorted(received) == [2 * i for i in range(total)]


# -- the example service ---------------------------------------------------------------


async def talk(address: tuple[str, int], lines: list[Any], expect: int) -> list[dict[str, Any]]:
    """A real client: send observations, read ``expect`` replies."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(
            b"".join((json.dumps(x) if not isinstance(x, bytes) else x.decode()).encode() + b"\n" for x in lines)
        )
        await writer.drain()
        return [json.loads(await reader.readline()) for _ in range(expect)]
    finally:
        writer.close()
        await writer.wait_closed()


def observations(sensor: str, count: int) -> list[dict[str, Any]]:
    return [{"sensor": sensor, "value": float(i)} for i in range(count)]


@pytest.mark.asyncio
async def test_the_service_streams_results_back_to_each_client() -> None:
    app = service.ObservationService(window=5, gain=2.0, offset=1.0)
    async with asyncio.timeout(20):
        address = await app.start()
        first, second = await asyncio.gather(
            talk(address, [*observations("t1", 10), b"not json", "t1", {"sensor": "t1"}], 10 + 2 + 3),
            talk(address, observations("t2", 5), 5 + 1),
        )
        await app.aclose()
    calibrated = [r["calibrated"] for r in first if "calibrated" in r]
    assert calibrated == [2.0 * i + 1.0 for i in range(10)]
    assert [(r["sensor"], r["mean"]) for r in first if "mean" in r] == [("t1", 5.0), ("t1", 15.0)]
    assert [r["error"] for r in first if "error" in r] == [
        "not valid JSON (Expecting value: line 1 column 1 (char 0))",
        "an observation needs a 'sensor' string",  # JSON, but not an observation
        "'value' must be a number",
    ]
    assert {r["sensor"] for r in second} == {"t2"}
    assert [r["mean"] for r in second if "mean" in r] == [5.0]


async def half_close(address: tuple[str, int], lines: list[Any]) -> list[dict[str, Any]]:
    """A client like `nc -N`: send, close the sending side (shutdown(SHUT_WR)), read until the server closes."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        await writer.drain()
        writer.write_eof()
        return [json.loads(line) for line in (await reader.read()).splitlines()]
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_the_service_answers_a_half_closed_client_in_full_then_closes() -> None:
    app = service.ObservationService(window=3)
    async with asyncio.timeout(20):
        address = await app.start()
        replies, other = await asyncio.gather(
            half_close(address, [*observations("a", 7), *observations("b", 3), {"sensor": 1}]),
            half_close(address, []),
        )
        await app.aclose()
    assert sorted(r["value"] for r in replies if "calibrated" in r) == sorted([*range(7), *range(3)])
    assert sorted((r["sensor"], r["mean"]) for r in replies if "mean" in r) == [("a", 1.0), ("a", 4.0), ("b", 1.0)]
    assert [r["error"] for r in replies if "error" in r] == ["an observation needs a 'sensor' string"]
    assert other == []


@pytest.mark.asyncio
async def test_the_service_shutting_down_answers_a_client_still_sending_every_observation_it_took() -> None:
    """A client still sending when the service shut down lost replies it was due: its handler, refused by the
    drained feed, dropped the client while its last observations were in the workflow; and the connection,
    closed with the client's unread lines in it, was reset, taking the replies the client had not read yet."""
    app = service.ObservationService(window=1000)
    taken = 0
    send = app.run.send

    async def counted(pe: str, item: Any) -> None:
        nonlocal taken
        await send(pe, item)
        taken += 1

    app.run.send = counted  # type: ignore[method-assign]
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_connection(*await app.start())

        async def keep_sending() -> None:
            with contextlib.suppress(ConnectionError):  # the service may reset it once it has answered in full
                for i in itertools.count():
                    writer.write(json.dumps({"sensor": "s", "value": i}).encode() + b"\n")
                    await writer.drain()
                    await asyncio.sleep(0)  # the client shares this loop with the service

        sender = asyncio.create_task(keep_sending())
        while taken < 300:  # noqa: ASYNC110 - the service takes the client's lines
            await asyncio.sleep(0.001)
        closing = asyncio.create_task(app.aclose())
        replies = [json.loads(line) for line in (await reader.read()).splitlines()]  # read only now, to the end
        sender.cancel()
        writer.close()
        await closing
    assert [r["value"] for r in replies] == list(range(taken))


def test_the_service_as_a_process_with_a_real_client() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "service.py"), "--port", "0", "--window", "3"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        host, port = banner.split()[-1].rsplit(":", 1)
        assert host == "127.0.0.1"

        async def client() -> list[dict[str, Any]]:
            async with asyncio.timeout(20):
                return await talk((host, int(port)), observations("p", 6), 6 + 2)

        replies = asyncio.run(client())
        assert [r["mean"] for r in replies if "mean" in r] == [1.0, 4.0]
        # docs/live.md's client, as a user copies it (Python's standard library: no netcat needed)
        docs = (ROOT / "docs" / "live.md").read_text()
        command = next(line for line in docs.splitlines() if line.startswith("printf") and "127.0.0.1 8765" in line)
        done = subprocess.run(
            ["bash", "-c", command.replace("8765", port)], capture_output=True, text=True, timeout=20, check=True
        )
        answers = sorted((json.loads(line) for line in done.stdout.splitlines()), key=lambda r: "error" in r)
        assert answers == [  # the error may come first: it is on another port
            {"sensor": "t1", "value": 20.5, "calibrated": 20.5},
            {"error": "not valid JSON (Expecting value: line 1 column 1 (char 0))", "line": "not json"},
        ]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
