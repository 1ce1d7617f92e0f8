"""The engine's invoker alone: what Storm's bolts use to call a PE without a worker or routing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import workflows as wf

from aiod4p import GenericPE, IterativePE, PEError, ProducerPE
from aiod4p._engine import Invoker
from aiod4p._pe import Runtime
from aiod4p._plan import InstanceRef


def invoker(pe: Any, index: int = 0, **options: Any) -> Invoker:
    """An invoker of ``pe`` with the runtime a host attaches (write() appends to its buffers)."""
    made = Invoker(InstanceRef("pe", index), pe, **options)
    pe._runtime = Runtime(made.buffers, index)
    return made


class Many(IterativePE):
    """A generator writing ``count`` items per input: more than any batch of the engine."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def process_item(self, item: int) -> Iterator[int]:
        yield from range(item, item + self.count)


class AsyncMany(IterativePE):
    async def process_item(self, item: int) -> AsyncIterator[int]:
        for value in range(item, item + 3):
            await asyncio.sleep(0)
            yield value


class Writes(GenericPE):
    """process() writes through write() and returns a dict; preprocess and postprocess write too."""

    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["output", "other"])

    def preprocess(self) -> None:
        self.write("other", "pre")

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        self.write("output", inputs["input"])
        return {"other": -inputs["input"]}

    def postprocess(self) -> None:
        self.write("other", "post")


@pytest.mark.parametrize("pe", [wf.Double(), wf.AsyncDouble()], ids=["plain", "async"])
def test_a_call_leaves_the_outputs_in_the_buffers(pe: Any) -> None:
    called = invoker(pe)
    asyncio.run(called.call("input", [1, 2, 3]))
    assert called.buffers == {"output": [2, 4, 6]}
    assert called.stats.errors == 0


def test_a_generator_keeps_every_output_however_many_it_writes() -> None:
    called = invoker(Many(10_000), batch_size=256)
    asyncio.run(called.call("input", [0, 1]))
    assert called.buffers["output"] == [*range(10_000), *range(1, 10_001)]


def test_an_async_generator_streams_into_the_buffers() -> None:
    called = invoker(AsyncMany())
    asyncio.run(called.call("input", [10]))
    assert called.buffers["output"] == [10, 11, 12]


def test_a_root_async_generator_is_pumped_into_the_buffers() -> None:
    class Source(ProducerPE):
        async def produce(self) -> AsyncIterator[int]:
            for value in range(4):
                await asyncio.sleep(0)
                yield value

    called = invoker(Source(), is_root=True)
    asyncio.run(called.call("input", [None, None]))
    assert called.buffers["output"] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_lifecycle_stages_and_process_write_to_their_ports() -> None:
    called = invoker(Writes())

    async def run() -> None:
        await called.lifecycle("preprocess")
        await called.call("input", [5])
        await called.lifecycle("postprocess")

    asyncio.run(run())
    assert called.buffers == {"output": [5], "other": ["pre", -5, "post"]}


def test_a_raising_pe_is_a_pe_error_naming_pe_instance_and_port() -> None:
    called = invoker(wf.Fail(on=2), index=3)
    with pytest.raises(PEError) as caught:
        asyncio.run(called.call("input", [1, 2]))
    assert (caught.value.pe, caught.value.instance, caught.value.port) == ("pe", 3, "input")
    assert "bad item 2" in str(caught.value)
    assert called.stats.errors == 1


def test_a_raising_stage_is_a_pe_error_naming_the_stage() -> None:
    called = invoker(wf.FailsAtEnd())
    with pytest.raises(PEError) as caught:
        asyncio.run(called.lifecycle("postprocess"))
    assert caught.value.port == "postprocess"


class AwaitsUntilClosed(IterativePE):
    """Awaits for ever in its call; records that the call was closed (its ``finally`` ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.awaiting: asyncio.Event | None = None
        self.closed = False

    async def process_item(self, item: int) -> None:
        assert self.awaiting is not None
        self.awaiting.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.closed = True


def test_a_generator_exit_is_the_pe_s_failure_unless_it_closes_the_call() -> None:
    """A ``GeneratorExit`` that a PE raises fails the call naming it (it was taken for a close and went through
    as it was); one that ``close()`` throws into the call's coroutine from another task (the collector, closing a
    pending task of an abandoned loop, runs in whatever task is current) closes the call and is no failure."""
    raises = invoker(wf.Fail(on=2, raises=GeneratorExit))

    async def call_raises() -> None:
        async with asyncio.timeout(30):
            await raises.call("input", [1, 2])

    with pytest.raises(PEError) as caught:
        asyncio.run(call_raises())
    assert (caught.value.port, raises.stats.errors) == ("input", 1)
    assert "GeneratorExit: bad item 2" in str(caught.value)

    pe = AwaitsUntilClosed()
    closed = invoker(pe)

    async def close_the_call() -> None:
        async with asyncio.timeout(30):
            pe.awaiting = asyncio.Event()
            call = closed.call("input", [1])
            call.send(None)  # the call, made by this task, now awaits in the PE

            async def collect() -> None:
                call.close()  # raised what the call raised instead of closing it

            await asyncio.create_task(collect())

    asyncio.run(close_the_call())
    assert pe.closed and closed.stats.errors == 0
