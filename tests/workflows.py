"""PEs and graphs the tests share. Importable by worker processes (module level)."""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiod4p import (
    ALL,
    GLOBAL,
    ConsumerPE,
    GenericPE,
    Grouping,
    IterativePE,
    ProducerPE,
    Router,
    WorkflowGraph,
    chain,
    group_by,
    iterative,
    producer,
    stable_hash,
)


class Shared(SimpleNamespace):
    """Attributes shared by every copy of the PE that holds it: how a test watches a run.

    A run works on copies of the graph's PEs; an object whose ``__deepcopy__``
    returns itself is shared by the copies and the test.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> Shared:
        return self


class Count(ProducerPE):
    """Emits 0, 1, 2, ... one per call."""

    def __init__(self) -> None:
        super().__init__()
        self.next = 0

    def produce(self) -> int:
        value, self.next = self.next, self.next + 1
        return value


class Range(ProducerPE):
    """Emits range(n) on its first call (a generator source)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def produce(self) -> Iterator[int]:
        yield from range(self.n)


class StopsEarly(ProducerPE):
    """A generator source that yields ``before`` items, then lets out the ``StopIteration`` of ``next()`` on an
    empty iterator."""

    def __init__(self, before: int = 5) -> None:
        super().__init__()
        self.before = before

    def produce(self) -> Iterator[int]:
        yield from range(self.before)
        next(iter(()))


class Double(IterativePE):
    def process_item(self, item: int) -> int:
        return item * 2


class AsyncDouble(IterativePE):
    async def process_item(self, item: int) -> int:
        await asyncio.sleep(0)
        return item * 2


class Tag(IterativePE):
    """Emits ``(item % modulo, item)`` so a group-by on index 0 has keys."""

    def __init__(self, modulo: int = 5) -> None:
        super().__init__()
        self.modulo = modulo

    def process_item(self, item: int) -> tuple[int, int]:
        return item % self.modulo, item


class TagAs(IterativePE):
    """Emits ``(kind(item % modulo + 0.5), item)``: keys of the number type ``kind`` (``np.float32``...)."""

    def __init__(self, kind: Any, modulo: int = 10) -> None:
        super().__init__()
        self.kind = kind
        self.modulo = modulo

    def process_item(self, item: int) -> tuple[Any, int]:
        return self.kind(item % self.modulo + 0.5), item


def mixed_number_keys(*kinds: Any) -> WorkflowGraph:
    """One ``Count -> TagAs(kind)`` branch per number type, all into one ``WhoSawWhat(group_by(0))``."""
    graph = WorkflowGraph()
    sink = WhoSawWhat(group_by(0), parallelism=3)
    for kind in kinds:
        graph.connect(Count(), "output", tag := TagAs(kind), "input")
        graph.connect(tag, "output", sink, "input")
    return graph


class WhoSawWhat(GenericPE):
    """Emits ``(instance, item)`` for each item: which instance got what."""

    def __init__(self, grouping: Any = None, parallelism: int | None = 3) -> None:
        super().__init__(inputs=[("input", grouping)], outputs=["output"], parallelism=parallelism)

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"output": (self.instance, inputs["input"])}


class SumAtEnd(GenericPE):
    """Sums its input and writes the total in postprocess."""

    def __init__(self, grouping: Any = GLOBAL) -> None:
        super().__init__(inputs=[("input", grouping)], outputs=["total"])
        self.total = 0

    def process(self, inputs: dict[str, Any]) -> None:
        self.total += inputs["input"]

    def postprocess(self) -> None:
        self.write("total", self.total)


class Escape(BaseException):
    """A library's own BaseException, not an Exception (as some use for control flow)."""


class Fail(IterativePE):
    """Raises ``raises`` on the item equal to ``on``."""

    def __init__(self, on: int = 3, raises: type[BaseException] = ValueError) -> None:
        super().__init__()
        self.on = on
        self.raises = raises

    def process_item(self, item: int) -> int:
        if item == self.on:
            raise self.raises(f"bad item {item}")
        return item


class AwaitsACancelledTask(IterativePE):
    """On the item equal to ``on`` (or in postprocess, if ``on`` is None), awaits a task that it cancels:
    the ``CancelledError`` of that task comes out of the PE's own call, as from a cancelled HTTP request."""

    def __init__(self, on: int | None = 3) -> None:
        super().__init__()
        self.on = on

    async def process_item(self, item: int) -> int:
        if item == self.on:
            await _a_cancelled_task()
        return item

    async def postprocess(self) -> None:
        if self.on is None:
            await _a_cancelled_task()


class YieldsThenAwaitsACancelledTask(ProducerPE):
    """An async generator source: yields ``before`` items, then awaits a task that it cancels."""

    def __init__(self, before: int = 5) -> None:
        super().__init__()
        self.before = before

    async def produce(self) -> AsyncIterator[int]:
        for item in range(self.before):
            yield item
        await _a_cancelled_task()


async def _a_cancelled_task() -> None:
    task = asyncio.create_task(asyncio.Event().wait())
    task.cancel()
    await task


class Merge(GenericPE):
    """Two inputs, one output: tags each item with the port it came on."""

    def __init__(self) -> None:
        super().__init__(inputs=["left", "right"], outputs=["output"])

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        ((port, item),) = inputs.items()
        return {"output": (port, item)}


class EmitLock(IterativePE):
    """Emits an unpicklable object (a lock) for item 7."""

    def process_item(self, item: int) -> Any:
        return threading.Lock() if item == 7 else item


class Handle:
    """An object that cannot be pickled and whose ``repr`` never returns (one that asks a remote service, say)."""

    def __reduce__(self) -> Any:
        raise TypeError("a Handle cannot be pickled")

    def __repr__(self) -> str:
        threading.Event().wait()  # never set
        return "Handle()"


class EmitHandle(IterativePE):
    """Emits a :class:`Handle` for item 7."""

    def process_item(self, item: int) -> Any:
        return Handle() if item == 7 else item


def on_instance_1(item: Any) -> str:
    """A group-by key that sends every item to instance 1 of a PE with 2 instances (on worker 1)."""
    return _INSTANCE_1_KEY


_INSTANCE_1_KEY = next(key for key in (f"k{index}" for index in range(100)) if stable_hash(key) % 2 == 1)


class HoldsLock(IterativePE):
    """Holds a lock: it cannot be pickled to a worker process."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def process_item(self, item: int) -> int:
        return item


class Slow(ConsumerPE):
    """A sink slower than its source (real work, not synchronisation)."""

    def consume(self, item: int) -> None:
        if item % 500 == 0:
            time.sleep(0.001)  # ok-sleep: work, not synchronisation (a sink slower than its source)


class Discard(ConsumerPE):
    def consume(self, item: Any) -> None:
        pass


def pipeline(n_stages: int = 3) -> tuple[WorkflowGraph, Count]:
    graph = WorkflowGraph()
    source = Count()
    previous: Any = source
    for _ in range(n_stages):
        stage = Double()
        graph.connect(previous, "output", stage, "input")
        previous = stage
    return graph, source


def grouping_graph(grouping: Any, parallelism: int = 3) -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", tag := Tag(), "input")
    graph.connect(tag, "output", WhoSawWhat(grouping, parallelism), "input")
    return graph


def fan_out_in() -> WorkflowGraph:
    """Count -> (Double, Tag) -> Merge: fan-out to two PEs, fan-in on two ports."""
    graph = WorkflowGraph()
    source, double, tag, merge = Count(), Double(), Tag(), Merge()
    graph.connect(source, "output", double, "input")
    graph.connect(source, "output", tag, "input")
    graph.connect(double, "output", merge, "left")
    graph.connect(tag, "output", merge, "right")
    return graph


def multi_edge() -> WorkflowGraph:
    """Two distinct connections between the same two ports."""
    graph = WorkflowGraph()
    source, double = Count(), Double()
    graph.connect(source, "output", double, "input")
    graph.connect(source, "output", double, "input")
    return graph


def composite_graph() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", chain(Double(), lambda_free_increment, Double()), "input")
    return graph


def lambda_free_increment(item: int) -> int:
    return item + 1


def broadcast_graph() -> WorkflowGraph:
    return grouping_graph(ALL)


def word_counts(records: Any) -> Counter[str]:
    return Counter({word: count for word, count in records})


def first_element(item: tuple[int, int]) -> int:
    return item[0]


class WritesNowhere(IterativePE):
    def process_item(self, item: int) -> None:
        self.write("nowhere", item)


class FailsAtEnd(IterativePE):
    """Raises ``raises(message)`` in ``postprocess``."""

    def __init__(self, raises: type[BaseException] = RuntimeError, message: str = "cannot finish") -> None:
        super().__init__()
        self.raises, self.message = raises, message

    def process_item(self, item: int) -> int:
        return item

    def postprocess(self) -> None:
        raise self.raises(self.message)


class WritesAtEnd(IterativePE):
    """Passes its items on, and writes ``0 .. count - 1`` in ``postprocess`` (a drained root's too)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def process_item(self, item: int) -> int:
        return item

    def postprocess(self) -> None:
        for number in range(self.count):
            self.write("output", number)


class YieldsAtEnd(IterativePE):
    """A ``postprocess`` that yields, as ``process_item`` may: a stage's generator is never run."""

    def process_item(self, item: int) -> int:
        return item

    def postprocess(self) -> Iterator[dict[str, str]]:
        yield {"output": "end"}


class YieldsAtStartAsync(IterativePE):
    """A ``preprocess`` that is an async generator."""

    def process_item(self, item: int) -> int:
        return item

    async def preprocess(self) -> AsyncIterator[dict[str, str]]:
        yield {"output": "start"}


class EvenOdd(GenericPE):
    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["even", "odd"])

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        item = inputs["input"]
        return {"even" if item % 2 == 0 else "odd": item}


@producer
def count_to_five() -> Iterator[int]:
    yield from range(5)


@iterative
def square(item: int) -> int:
    return item * item


@iterative(threaded=True, parallelism=2)
def threaded_square(item: int) -> int:
    return item * item


class Chatty(IterativePE):
    """print()s every item (which must not reach a Storm component's protocol) and passes it on."""

    def process_item(self, item: Any) -> Any:
        print(f"chatty saw {item!r}")
        return item


class Strings(IterativePE):
    """Writes ``item`` strings of ``length`` characters for every ``item`` (a count)."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def process_item(self, item: int) -> None:
        for index in range(item):
            self.write("output", str(index % 10) * self.length)


class Unencodable(IterativePE):
    """Emits a lock for the item equal to ``on``: neither JSON-representable nor picklable."""

    def __init__(self, on: int = 2) -> None:
        super().__init__()
        self.on = on

    def process_item(self, item: int) -> Any:
        return threading.Lock() if item == self.on else item


def parity(item: Any) -> int:
    """A group-by key function: the parity of ``item[1]``."""
    return int(item[1]) % 2


class Greets(IterativePE):
    """Writes ``"hello"`` in preprocess, then passes items on."""

    def preprocess(self) -> None:
        self.write("output", "hello")

    def process_item(self, item: Any) -> Any:
        return item


# -- for the mpi mapping's tests (rank-specific behaviour) ---------------------------


class WhereAmI(IterativePE):
    """Emits ``(PMI_HOSTNAME, pid, item)``: which MPI host and process saw each item."""

    def process_item(self, item: int) -> tuple[str, int, int]:
        import os

        return os.environ.get("PMI_HOSTNAME", ""), os.getpid(), item


SHARED_MEMORY = "shared memory of this MPI rank:"
TOPOLOGY = "topology file of this MPI rank's proxy:"


def proxy_topology_files() -> list[str]:
    """The names of the Hydra topology files (``/tmp/hydra_hwloc_xmlfile_*``) that this MPI rank's proxy (its
    parent process) holds open, whether or not they have been removed since; none outside an MPI job."""
    held = set()
    for fd in os.listdir(f"/proc/{os.getppid()}/fd"):
        try:
            held.add(os.readlink(f"/proc/{os.getppid()}/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile
    # a removed file reads as "PATH (deleted)"
    return sorted({found.group(0) for path in held if (found := re.match(r"/tmp/hydra_hwloc_xmlfile_\w+", path))})


class FailsOnInstance(IterativePE):
    """Instance ``instance`` raises on its first item (``kill``: kills its own process instead; ``exit_code``: ends
    it with that status, by ``os._exit``)."""

    def __init__(self, instance: int = 1, kill: bool = False, exit_code: int | None = None) -> None:
        super().__init__()
        self.failing, self.kill, self.exit_code = instance, kill, exit_code

    def process_item(self, item: int) -> int:
        if self.instance == self.failing:
            mapped = sorted(set(re.findall(r"/dev/shm/mpich_shm_\S+", Path("/proc/self/maps").read_text())))
            if mapped:  # an MPI rank's: a test checks that no file is left once the job has ended
                # One write a line: print() writes each argument apart, and another rank's line (rank 0's
                # "Abort(1) ..." as it ends the job) landed in the middle of one, where no filter knows it.
                for said, files in ((SHARED_MEMORY, mapped), (TOPOLOGY, proxy_topology_files())):
                    os.write(2, f"{' '.join([said, *files])}\n".encode())
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.exit_code is not None:
                os._exit(self.exit_code)
            raise ValueError(f"instance {self.instance} refuses item {item}")
        return item


def mpi_chain() -> WorkflowGraph:
    """Count -> 3 x Double: the benchmark chain, as a CLI target."""
    return pipeline(3)[0]


def mpi_hosts() -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", WhereAmI(), "input")
    return graph


def mpi_failing(kill: bool = False) -> WorkflowGraph:
    """Count -> FailsOnInstance: instance 1 fails on its first item (``kill``: its process dies).

    Every instance gets every item: a shuffle may keep cheap items beside their sender, and instance 1 (on
    another worker, rank or Storm task) then never got one, and the run ended well.
    """
    graph = WorkflowGraph()
    graph.connect(Count(), "output", FailsOnInstance(1, kill), "input", grouping=ALL)
    return graph


def mpi_killed() -> WorkflowGraph:
    return mpi_failing(kill=True)


class ExitsBadlyAtExit(IterativePE):
    """Passes items on; the process it ran in exits with status 3 when it ends (after the run finished)."""

    def preprocess(self) -> None:
        atexit.register(os._exit, 3)

    def process_item(self, item: int) -> int:
        return item


# -- windows and live sources (issue 6) ----------------------------------------------


def sensor_of(item: dict[str, Any]) -> Any:
    """A window key function: the item's sensor."""
    return item["sensor"]


def sum_of_values(pairs: list[tuple[Any, int]]) -> int:
    """A window aggregate: the sum of the second element of each pair."""
    return sum(value for _, value in pairs)


class Square(GenericPE):
    """A live root: ``{"id": n}`` -> ``{"id": n, "sq": n * n}``; reports ``drained`` from postprocess."""

    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["output", "status"])

    def process(self, inputs: dict[str, Any]) -> dict[str, Any]:
        item = inputs["input"]
        return {"output": {**item, "sq": item.get("id", 0) ** 2}}

    def postprocess(self) -> None:
        self.write("status", "drained")


class Hold(IterativePE):
    """Passes items on, except one with ``"hold"``: it never finishes (only an abort stops the run)."""

    async def process_item(self, item: dict[str, Any]) -> dict[str, Any]:
        if item.get("hold"):
            await asyncio.Event().wait()
        return item


def live_squares() -> WorkflowGraph:
    """``aiod4p run tests/workflows.py:live_squares --stdin square``: square -> hold."""
    graph = WorkflowGraph()
    square = Square()
    square.id = "square"
    graph.connect(square, "output", Hold(), "input")
    return graph


class Sleepy(IterativePE):
    """Blocks the calling thread for ``seconds`` per item (``seconds_on_item`` for one item)."""

    def __init__(self, seconds: float = 0.01, seconds_on_item: tuple[int, float] | None = None) -> None:
        super().__init__()
        self.seconds = seconds
        self.seconds_on_item = seconds_on_item

    def process_item(self, item: int) -> int:
        if self.seconds_on_item is not None and item == self.seconds_on_item[0]:
            time.sleep(self.seconds_on_item[1])  # ok-sleep: a PE that blocks its thread on purpose
        else:
            time.sleep(self.seconds)  # ok-sleep: a PE that blocks its thread on purpose
        return item


def sleepy() -> WorkflowGraph:
    """``aiod4p run tests/workflows.py:sleepy -i N --threaded Sleepy``: count -> a PE sleeping 10 ms per item."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", Sleepy(), "input")
    return graph


class BlocksForever(IterativePE):
    """A threaded PE whose first call never returns (only the end of its process ends it)."""

    threaded = True

    def process_item(self, item: int) -> None:
        threading.Event().wait()


class SaysItBlocks(BlocksForever):
    """A :class:`BlocksForever` that prints ``blocked`` on stdout as its call starts to block."""

    def process_item(self, item: int) -> None:
        print("blocked", flush=True)
        super().process_item(item)


class HoldsItsLoop(IterativePE):
    """On its second item, each instance writes a line to the FIFO named by ``AIOD4P_TEST_HOLDING`` (its pid,
    and on an MPI rank the topology file of its proxy) and holds its process's event loop forever (it is not
    threaded)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def process_item(self, item: int) -> None:
        self.seen += 1
        if self.seen == 2:
            with open(os.environ["AIOD4P_TEST_HOLDING"], "w") as holding:
                holding.write(" ".join([str(os.getpid()), *proxy_topology_files()]) + "\n")
            threading.Event().wait()


def held_loops() -> WorkflowGraph:
    """count -> a PE whose instances each hold their worker's loop forever from their second item on."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", HoldsItsLoop(), "input", grouping=ALL)  # every instance gets every item
    return graph


def blocked_and_failing() -> WorkflowGraph:
    """count -> a threaded PE that blocks forever, and count -> a PE that fails (the run fails all the same)."""
    graph = WorkflowGraph()
    count = Count()
    graph.connect(count, "output", BlocksForever(), "input")
    graph.connect(count, "output", FailsOnInstance(0), "input", grouping=ALL)  # instance 0 surely gets items
    return graph


def says_it_blocks() -> WorkflowGraph:
    """count -> a threaded PE that says so on stdout, then blocks forever."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", SaysItBlocks(), "input")
    return graph


def blocked_beside_results() -> WorkflowGraph:
    """count -> Double (results), and count -> a threaded PE that blocks forever (the run never ends)."""
    graph = WorkflowGraph()
    count = Count()
    graph.connect(count, "output", Double(), "input")
    graph.connect(count, "output", BlocksForever(), "input")
    return graph


def stuck() -> WorkflowGraph:
    """count -> a PE that holds its thread for 60 s on item 20 (on the event loop unless threaded)."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", Sleepy(0.01, (20, 60.0)), "input")
    return graph


class Parity(Grouping):
    """A grouping of one's own, as docs/performance.md writes one (its router reads the items): even items to
    instance 0, odd ones to instance 1."""

    def router(self, count: int, start: int, sender: str, dest: str) -> Router:
        return ParityRouter(count)


class ParityRouter(Router):
    __slots__ = ()
    passes_through = False

    def split(self, items: list[Any]) -> list[list[Any]]:
        parts: list[list[Any]] = [[] for _ in range(self.count)]
        for item in items:
            parts[item % 2 % self.count].append(item)
        return parts
