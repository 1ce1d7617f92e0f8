"""The async API: await, iterate, drain, cancel, several runs in one loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import importlib
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import workflows as wf

import aiod4p
from aiod4p import (
    Aiod4pError,
    ConsumerPE,
    ExecutionPlan,
    GenericPE,
    GraphError,
    InputError,
    InstanceStats,
    IterativePE,
    MappingUnavailable,
    PEError,
    WorkflowGraph,
    chain,
)
from aiod4p._api import Running, _interrupt_a_held_loop, run_blocking
from aiod4p._engine import Feed
from aiod4p._results import ResultSink
from aiod4p.errors import MappingUnavailable as FromErrors
from aiod4p.mappings import RunControl
from aiod4p.mappings.asyncio import AsyncMapping


class Tracker(GenericPE):
    """Records its lifecycle, so tests can see postprocess ran."""

    def __init__(self) -> None:
        super().__init__(inputs=["input"], outputs=["output"])
        self.state = wf.Shared(seen=0, finished=False, saw_fifty=asyncio.Event())

    def process(self, inputs: dict[str, int]) -> dict[str, int]:
        self.state.seen += 1
        if self.state.seen == 50:
            self.state.saw_fifty.set()
        return {"output": inputs["input"]}

    def postprocess(self) -> None:
        self.state.finished = True


async def endless() -> AsyncIterator[int]:
    value = 0
    while True:
        yield value
        value += 1
        await asyncio.sleep(0)


def tracked_graph() -> tuple[WorkflowGraph, wf.Double, Tracker]:
    graph = WorkflowGraph()
    double, tracker = wf.Double(), Tracker()
    graph.connect(double, "output", tracker, "input")
    return graph, double, tracker


async def test_run_async_returns_results() -> None:
    graph, _ = wf.pipeline(2)
    async with asyncio.timeout(10):
        results = await aiod4p.run_async(graph, 10)
    assert sorted(results.data()) == [4 * i for i in range(10)]


async def test_results_stream_as_they_are_produced() -> None:
    graph, double, _ = tracked_graph()
    seen = []
    async with asyncio.timeout(10), aiod4p.start(graph, {double: endless()}) as run:
        async for record in run:
            seen.append(record.data)
            if len(seen) == 5:
                break
    assert seen == [0, 2, 4, 6, 8]


async def test_a_run_that_ends_while_its_reader_waits_leaves_no_task() -> None:
    """The reader waits for a batch of results and for the run's end at once: when the end came first, the wait
    for a batch was cancelled and left to end later, a task still there when ``run_async`` returned."""
    graph = WorkflowGraph()
    graph.add(wf.Range(0))  # no result: the reader waits until the run ends
    async with asyncio.timeout(10):
        for _ in range(5):
            assert not (await aiod4p.run_async(graph, 3)).data()
            assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []


async def test_a_run_used_from_another_event_loop_is_refused_at_once() -> None:
    """A run's task, results and channels belong to the loop it started in: read from another loop, a run whose
    loop was closed before it ended waited forever, and one whose loop runs in another thread raised asyncio's
    ``RuntimeError`` with every queued result in its message (180 kB), or waited forever. A run that has ended is
    read from any loop."""
    counted, _ = wf.pipeline(1)
    endless_graph, double, _ = tracked_graph()

    async def started(graph: WorkflowGraph, inputs: Any, *, ended: bool = False) -> aiod4p.WorkflowRun:
        run = aiod4p.start(graph, inputs).start()
        while ended and not run.done:  # noqa: ASYNC110 - its results wait, unread, in its queue
            await asyncio.sleep(0.01)
        return run

    def in_a_loop_then_closed(ended: bool) -> aiod4p.WorkflowRun:
        closed = asyncio.new_event_loop()

        async def make() -> aiod4p.WorkflowRun:
            closed.stop()  # at the end of this turn of the loop: a run not ended never takes a step
            return await started(counted, 3, ended=ended)

        try:
            making = closed.create_task(make())
            closed.run_forever()
            if ended:
                closed.run_until_complete(making)
        finally:
            closed.close()
        return making.result()

    orphan = await asyncio.to_thread(in_a_loop_then_closed, False)
    ended = await asyncio.to_thread(in_a_loop_then_closed, True)
    assert sorted((await ended.results()).data()) == [0, 2, 4]
    elsewhere = asyncio.new_event_loop()
    thread = threading.Thread(target=elsewhere.run_forever)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(started(endless_graph, {double: endless()}), elsewhere).result(10)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(Aiod4pError, match=r"^this run started in an event loop closed before the run ended"):
                await orphan.results()
            another = r"^this run started in another event loop: a run is read, fed and closed in the loop it started"
            with pytest.raises(Aiod4pError, match=another):
                await anext(running)
            with pytest.raises(Aiod4pError, match=another):
                await running.aclose()
    finally:
        asyncio.run_coroutine_threadsafe(running.aclose(), elsewhere).result(10)
        elsewhere.call_soon_threadsafe(elsewhere.stop)
        thread.join()
        elsewhere.close()
        assert orphan._task is not None
        orphan._task.get_coro().close()  # never to run: not "never awaited" either


async def test_drain_stops_the_source_and_runs_postprocess() -> None:
    graph, double, tracker = tracked_graph()
    async with asyncio.timeout(10), aiod4p.start(graph, {double: endless()}) as run:
        received = 0
        async for _ in run:
            received += 1
            if received == 100:
                run.drain()
        assert run.done
    assert tracker.state.finished
    assert received == tracker.state.seen >= 100


async def test_cancelling_run_async_drains_then_cancels() -> None:
    graph, double, tracker = tracked_graph()
    task = asyncio.create_task(aiod4p.run_async(graph, {double: endless()}))
    async with asyncio.timeout(10):
        await tracker.state.saw_fifty.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert tracker.state.finished


async def test_cancelling_run_async_while_the_mapping_starts_aborts_at_once() -> None:
    """No item is in flight yet, and a start-up can take seconds (mpiexec, a local Ray): draining would wait for it."""
    starting = asyncio.Event()

    class NeverUnderWay(AsyncMapping):
        async def execute(
            self,
            plan: ExecutionPlan,
            feeds: Mapping[str, Feed],
            sink: ResultSink,
            control: RunControl,
            max_delay: float,
        ) -> list[InstanceStats]:
            starting.set()
            await asyncio.Event().wait()  # still starting its workers: never calls control.on_drain
            return []

    graph, double, _ = tracked_graph()
    task = asyncio.create_task(aiod4p.run_async(graph, {double: endless()}, mapping=NeverUnderWay()))
    async with asyncio.timeout(10):
        await starting.wait()
        task.cancel()
        await asyncio.wait({task})
    assert task.cancelled()


async def test_aclose_aborts_without_postprocess() -> None:
    graph, double, tracker = tracked_graph()
    async with asyncio.timeout(10):
        run = aiod4p.start(graph, {double: endless()}).start()
        async for _ in run:
            break
        await run.aclose()
    assert not tracker.state.finished
    assert run.done


async def test_errors_surface_through_iteration() -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", fail := wf.Fail(on=2), "input")
    with pytest.raises(aiod4p.PEError, match=fail.id):
        async with asyncio.timeout(10), aiod4p.start(graph, 10) as run:
            async for _ in run:
                pass


async def test_several_workflows_side_by_side() -> None:
    graphs = [wf.pipeline(1)[0] for _ in range(3)]
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(aiod4p.run_async(g, 100 * (i + 1)) for i, g in enumerate(graphs)))
    assert [len(r) for r in results] == [100, 200, 300]


async def test_any_iterable_feeds_a_root() -> None:
    graph, double, _ = tracked_graph()
    async with asyncio.timeout(10):
        results = await aiod4p.run_async(graph, {double.id: range(5)})
    assert results.data() == [0, 2, 4, 6, 8]


async def test_a_failing_source_iterable_names_the_pe() -> None:
    def broken() -> AsyncIterator[int]:
        raise OSError("sensor offline")

    async def source() -> AsyncIterator[int]:
        yield 1
        await broken().__anext__()

    graph, double, _ = tracked_graph()
    with pytest.raises(aiod4p.PEError, match=rf"{double.id}.*feed.*sensor offline"):
        async with asyncio.timeout(10):
            await aiod4p.run_async(graph, {double: source()})


def _parse(text: str) -> int:
    return int(text)


class ParsesText(IterativePE):
    def process_item(self, item: dict[str, str]) -> int:
        return _parse(item["text"])


class Unshowable:
    """An item whose own ``__repr__`` never returns: an error message must not call it."""

    def __repr__(self) -> str:
        raise AssertionError("an error message called the item's __repr__")


class Rejects(IterativePE):
    def process_item(self, item: Any) -> None:
        raise ValueError("rejected")


@dataclasses.dataclass
class Node:
    left: Any
    right: Any
    secret: str = dataclasses.field(default="hunter2", repr=False)


def test_items_in_messages_are_short_whatever_they_hold() -> None:
    from collections import OrderedDict, namedtuple

    from aiod4p._frames import short_repr

    shared: Any = None
    for _ in range(30):  # 2**30 paths through 30 objects: shown whole, it never ended
        shared = Node(shared, shared)
    shown = short_repr(shared)
    assert len(shown) < 2000 and shown.startswith("Node(left=Node(left=") and "hunter2" not in shown
    point = namedtuple("point", "x y")
    shown = short_repr([point(1, 2), OrderedDict(a=1), signal.SIGINT])
    assert shown == "[point(x=1, y=2), OrderedDict({'a': 1}), Signals.SIGINT]"


def test_what_a_thread_runs_is_named_as_the_pe_s_code_or_the_writing_of_a_result(tmp_path: Path) -> None:
    """What the watchdog of an abort says held the event loop: "a PE" named nothing, and the writing of a large
    result (all in C, as json encodes it) was blamed on a PE."""
    from aiod4p import _results
    from aiod4p._frames import running_in

    source = "def wait(barrier, event):\n    return barrier.wait(), event.wait()\n"  # in wait(), line 2, once met
    for module, filename, expected in (
        ("flow", str(tmp_path / "flow.py"), "a PE (wait, flow.py line 2)"),
        (_results.__name__, _results.__file__, "the writing of a result"),
        ("pytest", pytest.__file__, None),
        ("made", "<string>", None),  # code made at run time (a dataclass's __init__) is no PE's
    ):
        space: dict[str, Any] = {"__name__": module}
        exec(compile(source, filename, "exec"), space)
        barrier, event = threading.Barrier(2), threading.Event()
        thread = threading.Thread(target=space["wait"], args=(barrier, event))
        thread.start()
        try:
            barrier.wait(10)
            assert thread.ident is not None and running_in(thread.ident) == expected
        finally:
            event.set()
            thread.join(10)


def test_installed_code_is_the_standard_library_the_site_directories_and_those_of_distributions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One rule for error messages, multi's and mpi's shipping and Storm's copying: a library installed with
    ``pip install --target DIR`` (a ``*.dist-info`` in a directory on ``sys.path``) is installed, like the
    standard library and site-packages, also through a symbolic link; a directory of the user's modules on
    ``sys.path`` is not. An error out of such a library names the user's line that called it."""
    from aiod4p._frames import installed, workflow_frame

    target, mine = tmp_path / "target", tmp_path / "mine"
    (target / "lib_one-1.0.dist-info").mkdir(parents=True)
    (target / "lib_one.py").write_text("def fail(item):\n    raise ValueError(item)\n")
    mine.mkdir()
    (mine / "mine_one.py").write_text("import lib_one\n\n\ndef call(item):\n    return lib_one.fail(item)\n")
    (tmp_path / "linked").symlink_to(target)
    for directory in (target, mine):
        monkeypatch.syspath_prepend(str(directory))
    for name in ("lib_one", "mine_one"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert installed(target / "lib_one.py") and installed(tmp_path / "linked" / "lib_one.py")
    assert installed(dataclasses.__file__) and installed(pytest.__file__)
    assert not installed(mine / "mine_one.py")
    mine_one = importlib.import_module("mine_one")
    with pytest.raises(ValueError) as failed:
        mine_one.call(3)
    frame = workflow_frame(failed.value)
    assert frame is not None and (frame.filename, frame.lineno) == (str(mine / "mine_one.py"), 5)


def test_a_pe_error_names_the_item_and_the_method_it_was_given_to() -> None:
    graph = WorkflowGraph()
    graph.add(parses := ParsesText())
    with pytest.raises(aiod4p.PEError) as caught:
        aiod4p.run(graph, {parses: [{"input": {"text": "x1"}}]}, mapping="simple")
    line = _parse.__code__.co_firstlineno + 1
    assert str(caught.value).endswith(f"line {line}, in _parse; item={{'text': 'x1'}} given to process_item)")
    graph = WorkflowGraph()
    graph.add(rejects := Rejects())
    with pytest.raises(aiod4p.PEError) as caught:
        aiod4p.run(graph, {rejects: [{"input": [Unshowable(), np.float64(1.5)]}]}, mapping="simple")
    assert str(caught.value).endswith("in process_item; item=[<Unshowable>, np.float64(1.5)])")


async def test_run_inside_a_loop_runs_in_a_thread_and_warns_outside_a_notebook() -> None:
    graph, _ = wf.pipeline(1)
    with pytest.warns(RuntimeWarning, match="blocks that loop until the run ends; await aiod4p.run_async"):
        assert sorted(aiod4p.run(graph, 3).data()) == [0, 2, 4]
    failing = WorkflowGraph()
    failing.connect(wf.Range(3), "output", wf.Fail(on=1), "input")
    with pytest.warns(RuntimeWarning), pytest.raises(aiod4p.PEError, match="Fail"):
        aiod4p.run(failing)


class InterruptsAt(IterativePE):
    """Gives its items back, and sends SIGINT to the main thread (as Ctrl-C does) at its ``at``-th; records
    that postprocess ran."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.state = wf.Shared(seen=0, finished=False)

    def process_item(self, item: int) -> int:
        self.state.seen += 1
        if self.state.seen == self.at:
            ctrl_c()
        return item

    def postprocess(self) -> None:
        self.state.finished = True


@pytest.fixture(autouse=True)
def _outside_a_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``ipykernel`` imported in this process (jupyter_client imports it when test_notebook starts a kernel),
    as in the scripts and services these tests stand for: a blocking run inside a running loop warns there."""
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)


@pytest.fixture
def interruptible() -> Iterator[None]:
    """SIGINT raising KeyboardInterrupt, as in a terminal or a notebook (a background job's shell ignores it)."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def ctrl_c() -> None:
    """What a terminal's Ctrl-C or a notebook's "interrupt the kernel" does (an interrupt_main() would
    not wake a thread blocked on a lock)."""
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


@pytest.mark.parametrize("mapping", ["simple", "async"])
@pytest.mark.usefixtures("interruptible")
async def test_an_interrupt_of_a_run_beside_a_running_loop_drains_it(mapping: str) -> None:
    graph = WorkflowGraph()
    double, sink = wf.Double(), InterruptsAt(50)
    graph.connect(double, "output", sink, "input")
    with pytest.warns(RuntimeWarning), pytest.raises(KeyboardInterrupt, match="interrupted and drained") as interrupted:
        aiod4p.run(graph, {double: endless()}, mapping=mapping)
    assert sink.state.finished and sink.state.seen >= 50
    drained = interrupted.value.partial_results.data()  # type: ignore[attr-defined]
    assert drained == [2 * i for i in range(sink.state.seen)]  # every item the drain let finish, none lost
    assert type(interrupted.value) is KeyboardInterrupt  # a script it ends ends as killed by SIGINT (status 130)


class GivesBackUntil(IterativePE):
    """Gives its items back, and raises at ``bad``."""

    def __init__(self, bad: int) -> None:
        super().__init__(parallelism=1)
        self.bad = bad

    def process_item(self, item: int) -> int:
        if item == self.bad:
            raise RuntimeError(f"{item} is bad")
        return item


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
def test_the_error_of_a_failed_run_carries_the_results_it_gave_before(mapping: str) -> None:
    """A scientist's long run failing near its end still gives what it had made (``aiod4p run`` prints it)."""
    graph = WorkflowGraph()
    graph.add(pe := GivesBackUntil(7))
    with pytest.raises(PEError, match="7 is bad") as failed:
        aiod4p.run(graph, {pe: range(10)}, mapping=mapping)
    assert failed.value.partial_results is not None
    assert failed.value.partial_results.data() == list(range(7))


async def test_the_error_of_a_failed_run_carries_the_results_not_yet_iterated() -> None:
    graph = WorkflowGraph()
    graph.add(pe := GivesBackUntil(7))
    async with aiod4p.start(graph, {pe: range(10)}, mapping="simple", batch_size=1) as workflow:
        first = await anext(workflow)
        with pytest.raises(PEError) as failed:
            await workflow.results()
        with pytest.raises(PEError) as again:
            await workflow.results()
    assert failed.value.partial_results is not None
    assert [first.data, *failed.value.partial_results.data()] == list(range(7))
    assert again.value is failed.value and len(again.value.partial_results or ()) == 6  # not emptied


@pytest.mark.parametrize("use_uvloop", [False, True])
@pytest.mark.usefixtures("interruptible")
async def test_a_second_interrupt_beside_a_running_loop_aborts(use_uvloop: bool) -> None:
    cancellations = []

    async def press_until_cancelled() -> None:
        """Ctrl-C, pressed again if it has not cancelled this task in 5 s, as its user would: under load, CPython
        3.11 loses one now and then (1 in several thousand, with pthread_kill to a main thread waiting on a
        lock; reproduced without aiod4p), and the run then waits for the next."""
        while True:
            ctrl_c()
            with contextlib.suppress(TimeoutError):  # no cancellation within 5 s: the Ctrl-C was lost
                async with asyncio.timeout(5):
                    await asyncio.Event().wait()  # until the Ctrl-C cancels this task

    async def drains_forever() -> None:
        try:
            await press_until_cancelled()
        except asyncio.CancelledError:  # the first interrupt: a drain that never ends
            cancellations.append("drain")
            try:
                await press_until_cancelled()
            except asyncio.CancelledError:  # the second: an abort
                cancellations.append("abort")
                raise

    with pytest.warns(RuntimeWarning), pytest.raises(KeyboardInterrupt):
        run_blocking(drains_forever, use_uvloop)
    assert cancellations == ["drain", "abort"]


class PressesCtrlCWhileStuck(IterativePE):
    """A PE stuck in a blocking loop (a bug), while its user presses Ctrl-C again and again."""

    def __init__(self) -> None:
        super().__init__()
        self.state = wf.Shared(interrupted=False)

    def process_item(self, item: int) -> None:
        try:
            while True:
                ctrl_c()
                time.sleep(0.05)  # ok-sleep: the blocking call the PE is stuck in
        except KeyboardInterrupt:
            self.state.interrupted = True
            raise


@pytest.mark.usefixtures("interruptible")
@pytest.mark.parametrize("mapping", ["simple", "async"])
async def test_a_second_interrupt_beside_a_running_loop_held_by_a_pe_interrupts_the_pe(mapping: str) -> None:
    """In a notebook, a PE that holds the run's loop (which runs in a thread of its own) is interrupted in its
    own code once an abort does not end the run: the kernel goes on, where the command line ends its process."""
    graph = WorkflowGraph()
    graph.connect(wf.Range(3), "output", stuck := PressesCtrlCWhileStuck(), "input")
    with pytest.warns(RuntimeWarning), pytest.raises(KeyboardInterrupt):
        aiod4p.run(graph, mapping=mapping)
    assert stuck.state.interrupted
    assert [thread.name for thread in threading.enumerate() if thread.name.startswith("aiod4p")] == []


def test_unknown_mapping() -> None:
    graph, _ = wf.pipeline(1)
    with pytest.raises(MappingUnavailable, match="unknown mapping 'nope'; choose one of: simple, async"):
        aiod4p.run(graph, 1, mapping="nope")
    assert MappingUnavailable is FromErrors


@pytest.mark.parametrize("mapping", ["simple", "async", "multi", "mpi"])
@pytest.mark.parametrize("workers", [0, -1, "2", 1.5, True])
def test_workers_that_are_not_a_positive_integer_are_refused(mapping: str, workers: object) -> None:
    graph, _ = wf.pipeline(1)
    with pytest.raises(ValueError, match=rf"workers must be a positive integer .*, not {workers!r}"):
        aiod4p.run(graph, 1, mapping=mapping, workers=workers)


def test_workers_given_as_a_numpy_integer_are_taken() -> None:
    graph, _ = wf.pipeline(1)
    assert aiod4p.run(graph, 3, mapping="async", workers=np.int64(2)).data()


@pytest.mark.parametrize(
    ("graph", "options", "error", "message"),
    [
        (wf.Count(), {}, GraphError, r"a run takes a WorkflowGraph, not <Count.*: add it to a WorkflowGraph"),
        (None, {}, GraphError, "a run takes a WorkflowGraph, not None"),
        (WorkflowGraph(), {"mapping": None}, MappingUnavailable, "mapping must be a mapping's name .* not None"),
        (WorkflowGraph(), {"max_delay": -1}, ValueError, "max_delay must be .* at least 0, not -1"),
        (WorkflowGraph(), {"max_delay": None}, ValueError, "max_delay must be .* at least 0, not None"),
        # 0 would make the results' queue unbounded: a consumer that falls behind would not hold the run back
        (WorkflowGraph(), {"result_batches": 0}, ValueError, "result_batches must be a positive integer, not 0"),
        # a float failed the run later, blamed on its first PE ("PE Range0[0] failed on feed: TypeError: slice
        # indices must be integers ..."), a string with a TypeError naming no option
        (WorkflowGraph(), {"batch_size": 2.5}, ValueError, "batch_size must be a positive integer, not 2.5"),
        (WorkflowGraph(), {"batch_size": "64"}, ValueError, "batch_size must be a positive integer, not '64'"),
        (WorkflowGraph(), {"credits": 1.5}, ValueError, "credits must be a positive integer, not 1.5"),
        (WorkflowGraph(), {"credits": 0}, ValueError, "credits must be a positive integer, not 0"),
    ],
)
def test_bad_run_arguments_are_named(
    graph: object, options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        aiod4p.run(graph, 1, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"NoSuchPE": 3}, "names no PE of the graph"),
        ({"Count": -1}, "must not be negative"),
        ({"Count": "abc"}, "must be a count or a list"),
        (-2, "must not be negative"),
    ],
)
def test_bad_inputs(inputs: object, message: str) -> None:
    graph, _ = wf.pipeline(1)
    with pytest.raises(InputError, match=message):
        aiod4p.run(graph, inputs)  # type: ignore[arg-type]


def test_input_keys_naming_one_pe_twice() -> None:
    # -d '{"Count": [5], "Count0": [6, 7]}' ran [6, 7] only and dropped [5], with exit 0.
    graph, source = wf.pipeline(1)
    for inputs in ({"Count": [5], source.id: [6, 7]}, {source: 2, "Count": 3}):
        with pytest.raises(InputError, match=rf"input keys .* and .* both name PE {source.id}; give its input once"):
            aiod4p.run(graph, inputs)


def test_input_to_a_pe_that_is_not_a_root() -> None:
    graph, source = wf.pipeline(2)
    with pytest.raises(InputError, match="is not a root"):
        aiod4p.run(graph, {graph.pes[-1].id: 3})
    assert source.id in graph.flatten().roots()


def test_feed_element_that_is_not_an_input_dict() -> None:
    graph = WorkflowGraph()
    merge = wf.Merge()
    graph.connect(merge, "output", Silent(), "input")
    with pytest.raises(InputError, match=rf"input for PE {merge.id} must be a dict of its input ports"):
        aiod4p.run(graph, {merge: [5]})
    # A trace of 1,000,000 samples given for a PE of two ports was written whole into the one-line error.
    with pytest.raises(InputError, match=r"got \[0\.5, 0\.5, 0\.5, 0\.5, 0\.5, 0\.5, \.\.\.\]$"):
        aiod4p.run(graph, {merge: [[0.5] * 1_000_000]})


class Echo(IterativePE):
    def process_item(self, item: object) -> object:
        return item


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
def test_a_dict_fed_to_a_root_of_one_port_is_an_input_dict_only_when_it_names_that_port_alone(mapping: str) -> None:
    """As docs/live.md and docs/dispel4py.md say: a service feeding its clients' JSON objects to such a root sees
    ``{"input": 5}`` arrive as ``5`` and ``{}`` call it with no input; wrapped (``{"input": obs}``), each arrives
    as it was."""
    graph = WorkflowGraph()
    graph.add(echo := Echo())
    fed = [{"input": 5}, {}, {"inptu": 1}, {"input": {"input": 5}}, {"input": {}}]
    results = aiod4p.run(graph, {echo: fed}, mapping=mapping, workers=1).data()
    assert sorted(results, key=repr) == sorted([5, {"inptu": 1}, {"input": 5}, {}], key=repr)


async def _elements_of(elements: list[Any]) -> AsyncIterator[Any]:
    for element in elements:
        yield element


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
@pytest.mark.parametrize("kind", ["list", "iterator", "generator", "async generator"])
def test_a_feeds_none_elements_reach_the_root_as_a_lists_do(mapping: str, kind: str) -> None:
    """An iterator fed to a root on multi (pumped by the launcher) and an async generator on every mapping
    dropped their ``None`` elements without a word, where a list gave them to the root as any element."""
    fed = [1, None, 2, None]
    feeds: dict[str, Any] = {
        "list": fed,
        "iterator": iter(fed),
        "generator": (element for element in fed),
        "async generator": _elements_of(fed),
    }
    graph = WorkflowGraph()
    graph.add(seen := wf.WhoSawWhat(parallelism=1))
    results = aiod4p.run(graph, {seen: feeds[kind]}, mapping=mapping, workers=1).data()
    assert sorted(results, key=repr) == sorted([(0, element) for element in fed], key=repr)


class Silent(ConsumerPE):
    def consume(self, item: object) -> None:
        pass


def test_input_to_a_composite_names_its_inner_root() -> None:
    graph = WorkflowGraph()
    composite = chain(wf.Double(), wf.Double())
    graph.connect(composite, "output", Silent(), "input")
    inner = graph.flatten().composites[composite.id][0]
    for key in (composite, composite.id):
        with pytest.raises(InputError, match=rf"{composite.id} is a composite.*inner root \({inner}\)"):
            aiod4p.run(graph, {key: [1]})
    assert aiod4p.run(graph, {inner: [1, 2]}).data() == []


def test_a_loop_held_a_moment_past_the_check_is_not_interrupted_as_held_by_a_pe() -> None:
    """After a second interrupt, the run's loop held for 0.6 s (a clean-up step, or a loaded machine's scheduler)
    did not turn within 50 ms of the check at 0.5 s: `a PE holds the event loop` was said, and an interruption
    raised in the clean-up's code. The loop has the rest of the abort's grace to turn once, as the command's
    watchdog gives it."""
    loop = asyncio.new_event_loop()
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            loop.run_forever()
        except BaseException as exc:  # what the watchdog raised in the loop's thread
            raised.append(exc)

    running: Running = concurrent.futures.Future()
    running.set_result(cast(Any, (loop, None)))  # the run's task: not needed here
    loop.call_soon(time.sleep, 0.6)  # ok-sleep: the clean-up step that holds the loop a moment
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        _interrupt_a_held_loop(running, concurrent.futures.Future(), thread)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert raised == []
