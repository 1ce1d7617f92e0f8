"""The multi mapping: worker processes, failures, feeds, drain and cancel, no orphans.

The behaviour shared with every mapping is in test_mappings.py (multi -n 1, 2, 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import pickle
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import pytest
import workflows as wf
from helpers import AIOD4P, aiod4p_process, numbers_flow, reaped, run_notebook_flow

import aiod4p
from aiod4p import IterativePE, PEError, WorkflowGraph, _loading, group_by
from aiod4p._plan import REMOTE_BATCH_FACTOR
from aiod4p._processes import children
from aiod4p.errors import GraphError, InputError, TargetError, TransportError, WorkerDied
from aiod4p.mappings import _shipping
from aiod4p.mappings import multi as multi_module
from aiod4p.mappings.multi import START_METHOD_ENV, MultiMapping, resolve_start_method

ROOT = Path(__file__).resolve().parents[1]


# -- PEs (module level: spawned workers import them) ---------------------------------------


class Die(IterativePE):
    """Ends its own process on item ``at``: SIGKILL, or os._exit(7)."""

    def __init__(self, how: str, at: int = 50) -> None:
        super().__init__(parallelism=2)
        self.how = how
        self.at = at

    def process_item(self, item: int) -> int:
        if item == self.at:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(7)
        return item


class Pid(IterativePE):
    """Emits the process id it runs in."""

    def process_item(self, item: int) -> int:
        return os.getpid()


def _children() -> set[int]:
    """Live child processes of this process, from /proc (but multiprocessing's resource tracker)."""
    return children({os.getpid()}) - {getattr(resource_tracker._resource_tracker, "_pid", None)}


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    before = _children()
    yield
    assert multiprocessing.active_children() == []
    assert _children() <= before


def _chain(middle: IterativePE) -> tuple[WorkflowGraph, Any]:
    graph = WorkflowGraph()
    graph.connect(source := wf.Count(), "output", middle, "input")
    graph.connect(middle, "output", wf.Double(), "input")
    return graph, source


# -- placement --------------------------------------------------------------------------


def test_instances_run_in_n_worker_processes() -> None:
    graph, _ = _chain(Pid())
    pids = set(aiod4p.run(graph, 2000, mapping="multi", workers=2).data())
    assert len(pids) == 2 and os.getpid() not in pids


def test_stats_come_from_every_worker() -> None:
    graph, source = _chain(wf.Double())
    run = aiod4p.start(graph, 3000, mapping="multi", workers=2)

    async def main() -> None:
        async with asyncio.timeout(30):
            await run.results()

    asyncio.run(main())
    assert {(s.pe, s.worker) for s in run.stats if s.pe != source.id} == {
        (pe.id, w) for pe in graph.pes if pe is not source for w in (0, 1)
    }
    assert sum(s.items_in for s in run.stats if s.pe == source.id) == 3000


class Megabytes(aiod4p.ProducerPE):
    """Yields ``count`` items of 1 MB each."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def produce(self) -> Iterator[bytes]:
        for index in range(self.count):
            yield index.to_bytes(4, "little") * (1 << 18)


class Work(IterativePE):
    """Takes ``seconds`` an item (waiting, as on a service), two instances."""

    def __init__(self, seconds: float) -> None:
        super().__init__(parallelism=2)
        self.seconds = seconds

    def process_item(self, item: bytes) -> int:
        if self.seconds:
            threading.Event().wait(self.seconds)  # ok-sleep: the item's cost, not synchronisation
        return len(item)


def _items_per_worker(count: int, seconds: float) -> tuple[int, int]:
    """How many of ``count`` 1 MB items each worker's instance of Work took (the source's worker first)."""
    graph = WorkflowGraph()
    graph.connect(source := Megabytes(count), "output", work := Work(seconds), "input")
    run = aiod4p.start(graph, 1, mapping="multi", workers=2)

    async def main() -> None:
        async with asyncio.timeout(60):
            assert (await run.results()).by_port() == {(work.id, "output"): [1 << 20] * count}

    asyncio.run(main())
    (home,) = {s.worker for s in run.stats if s.pe == source.id}
    taken = {s.worker: s.items_in for s in run.stats if s.pe == work.id}
    return taken[home], taken[1 - home]


def test_large_items_of_little_work_stay_on_their_senders_worker() -> None:
    """Sending a megabyte costs the sender about 1 ms, more than the item's work: once the instance beside
    the source is measured, the rest stay with it."""
    here, there = _items_per_worker(200, 0.0)
    assert there <= 40 and here + there == 200


def test_large_items_of_much_work_are_shared_by_both_workers() -> None:
    """Items of 20 ms go where credit is free: both workers take a good share (20 each on a quiet machine; the
    split follows measured paces, so a loaded one skews it: 9 / 31 was seen at a load average of 100)."""
    here, there = _items_per_worker(40, 0.02)
    assert min(here, there) >= 6


# -- start methods ----------------------------------------------------------------------


def test_spawn_runs_with_a_pumped_generator_feed() -> None:
    graph = WorkflowGraph()
    graph.connect(double := wf.Double(), "output", wf.Double(), "input")
    feed = (i for i in range(1000))
    results = aiod4p.run(graph, {double: feed}, mapping=MultiMapping("spawn"), workers=2)
    assert sorted(results.data()) == [4 * i for i in range(1000)]


def test_a_list_fed_to_spawned_workers_is_pumped_not_pickled_into_every_workers_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A list travelled in the job, which every spawned worker gets pickled: 300 MB of items given to multi -n 2
    from a service held its event loop for 5 s (pickled, then copied to each worker in turn), 100,000 numbers for
    half a second. It is pumped to the worker that reads it, as an iterator is."""
    sizes: list[int] = []
    ship = multi_module.ship

    def measured(*args: Any, **kwargs: Any) -> bytes:
        payload = ship(*args, **kwargs)
        sizes.append(len(payload))
        return payload

    monkeypatch.setattr(multi_module, "ship", measured)
    graph = WorkflowGraph()
    graph.connect(double := wf.Double(), "output", wf.Double(), "input")
    fed = list(range(200_000))  # about 1 MB pickled
    results = aiod4p.run(graph, {double: fed}, mapping=MultiMapping("spawn"), workers=2)
    assert sorted(results.data()) == [4 * i for i in fed]
    assert len(sizes) == 1 and sizes[0] < 200_000


def test_an_async_generator_feed_is_pumped_from_the_parent() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(700):
            if i % 100 == 0:
                await asyncio.sleep(0)
            yield i

    graph = WorkflowGraph()
    graph.connect(double := wf.Double(), "output", wf.Double(), "input")
    results = aiod4p.run(graph, {double: numbers()}, mapping="multi", workers=2)
    assert sorted(results.data()) == [4 * i for i in range(700)]


def test_a_failing_feed_iterator_fails_the_run_as_the_feed() -> None:
    def numbers() -> Iterator[int]:
        yield from range(10)
        raise KeyError("feed broke")

    graph = WorkflowGraph()
    graph.connect(double := wf.Double(), "output", wf.Double(), "input")
    with pytest.raises(PEError, match="feed") as caught:
        aiod4p.run(graph, {double: numbers()}, mapping="multi", workers=2)
    assert caught.value.pe == double.id and "feed broke" in caught.value.traceback_text


def test_start_method_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown start method 'bogus'"):
        MultiMapping("bogus")
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert resolve_start_method() == "spawn"
    assert resolve_start_method("fork") == "fork"
    monkeypatch.setenv(START_METHOD_ENV, "nope")
    with pytest.raises(ValueError, match="unknown start method 'nope'"):
        resolve_start_method()


def test_spawn_from_a_script_read_from_stdin_runs_pes_from_modules() -> None:
    """`python - < script` names its ``__main__`` ``<stdin>``: spawned workers tried to run that file again
    and died (`WorkerDied: ... exited with code 1`), though the PEs come from a module."""
    session = textwrap.dedent(
        """
        import aiod4p, threading, workflows as wf
        from aiod4p import WorkflowGraph
        threading.Thread(target=threading.Event().wait, daemon=True).start()  # spawn, as in a notebook
        graph = WorkflowGraph()
        graph.connect(wf.Count(), "output", wf.Double(), "input")
        print(sorted(aiod4p.run(graph, 3, mapping="multi", workers=2).data()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-"],
        input=session,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[0, 2, 4]\n"


@pytest.mark.parametrize("how", ["python -c", "python - < script", "python script.py"])
def test_spawn_from_an_interactive_session_runs_its_classes(how: str) -> None:
    """A notebook's workflow (its PE classes, functions and item classes in a ``__main__`` that spawned workers
    cannot import: they travel by value) runs unchanged; its items come back as the notebook's own class. (A
    script's, which spawned workers import again, travel by name.)"""
    for run in run_notebook_flow("spawn", "fork", how=how):
        assert run == {"mapping": run["mapping"], "same": True, "points": True, "processes": 2, "dispel4py": True}


def test_a_notebook_ships_the_top_level_classes_and_functions_that_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """What goes along with a job shipped with ``__main__``: not what holds a lock, nor what drags a large
    global along (its pickle stops at the limit); they become a worker's ``__main__``, in a module of their own."""
    lock, big = threading.Lock(), bytes(_shipping.MAIN_LIMIT + 1)

    class Point:
        pass

    def holds_lock() -> Any:
        return lock

    def holds_big() -> Any:
        return big

    for defined in (Point, holds_lock, holds_big):
        defined.__module__, defined.__qualname__ = "__main__", defined.__name__
        monkeypatch.setattr(sys.modules["__main__"], defined.__name__, defined, raising=False)
    data = _shipping.dumps([Point()], main=True)
    assert len(data) < _shipping.MAIN_LIMIT
    entry_point = types.ModuleType("__main__")
    entry_point.Point = "an entry point's own name"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__main__", entry_point)
    monkeypatch.setattr(_shipping, "_REPLACED", [])
    (point,) = _shipping.loads(data)
    worker_main = sys.modules["__main__"]
    assert worker_main is not entry_point and [entry_point] == _shipping._REPLACED  # its code runs on
    assert type(point) is Point and worker_main.Point is Point  # cloudpickle's class tracking: the same class
    assert not hasattr(worker_main, "holds_lock") and not hasattr(worker_main, "holds_big")


def test_a_worker_that_cannot_import_a_file_the_job_ships_names_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker (spawned process, Ray actor, MPI rank) that could not import a file of the workflow's code shipped
    with the job (a module of PEs gone from the driver's path since the driver imported it) failed the run with
    `importing workflow F failed: ...`, naming no worker; it names itself, as when the job does not unpickle."""
    monkeypatch.setattr(_loading, "_worker", False)  # loading the shipment marks this process as a worker
    gone = tmp_path / "gone_pes.py"
    data = pickle.dumps((_loading.CodeShipment((("gone_pes", str(gone)),)), pickle.dumps(None)))
    with pytest.raises(TargetError) as failed:
        _shipping.unship(data, "Ray worker actor 1")
    assert str(failed.value).startswith(f"Ray worker actor 1: importing workflow {gone} failed: FileNotFoundError")


def test_an_unpicklable_pe_under_spawn_is_named() -> None:
    graph, _ = _chain(holder := wf.HoldsLock())
    with pytest.raises(
        GraphError, match=rf"PE {holder.id} cannot be pickled.*spawn.*: its attribute 'lock' \(a lock\) cannot: "
    ):
        aiod4p.run(graph, 10, mapping=MultiMapping("spawn"), workers=2)
    # fork inherits the PE, unpickled; but every run works on copies of its PEs, and a lock cannot be copied
    with pytest.raises(GraphError, match=rf"PE {holder.id} cannot be copied for instance 0: .*preprocess\(\)"):
        aiod4p.run(graph, 10, mapping=MultiMapping("fork"), workers=1)


def test_an_unpicklable_input_under_spawn_is_named() -> None:
    graph = WorkflowGraph()
    graph.connect(double := wf.Double(), "output", wf.Double(), "input")
    with pytest.raises(InputError, match=rf"input of PE {double.id} cannot be pickled"):
        aiod4p.run(graph, {double: [1, threading.Lock()]}, mapping=MultiMapping("spawn"), workers=1)


# -- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_pe_error_in_a_worker_names_the_pe_with_its_traceback(method: str) -> None:
    graph = WorkflowGraph()
    fail = wf.Fail(on=333)
    graph.connect(wf.Count(), "output", fail, "input")
    graph.connect(fail, "output", wf.Discard(), "input")
    started = time.monotonic()
    with pytest.raises(PEError) as caught:
        aiod4p.run(graph, 100_000, mapping=MultiMapping(method), workers=2)
    assert time.monotonic() - started < 15
    assert (caught.value.pe, caught.value.port) == (fail.id, "input")
    assert "bad item 333" in str(caught.value)
    assert "ValueError: bad item 333" in caught.value.traceback_text
    assert "process_item" in caught.value.traceback_text
    assert "During handling" not in caught.value.traceback_text  # the worker's exception, nothing before it
    # shown as the cause of the error raised here (as concurrent.futures shows a worker's): where the PE failed
    cause = caught.value.__cause__
    assert type(cause).__name__ == "_RemoteTraceback" and caught.value.traceback_text in str(cause)


def test_code_shipped_by_value_fails_naming_its_file_and_line() -> None:
    """A local function (as a notebook's cell defines) travels by value to spawned workers: its error still names
    the file and line it was defined at, as on simple and async (cloudpickle names such code ``<dynamic-code>``)."""

    def invert(item: int) -> float:
        return 1 / (item - 3)

    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", aiod4p.FunctionPE(invert), "input")
    with pytest.raises(PEError) as caught:
        aiod4p.run(graph, 10, mapping=MultiMapping("spawn"), workers=2)
    line = invert.__code__.co_firstlineno + 1
    assert f"({__file__}, line {line}, in invert; item=3)" in str(caught.value)
    assert f'File "{__file__}", line {line}, in invert' in caught.value.traceback_text


@pytest.mark.parametrize(("how", "expected"), [("kill", "killed by SIGKILL"), ("exit", "exited with code 7")])
def test_a_dying_worker_fails_the_run_within_seconds_naming_its_pe_instances(how: str, expected: str) -> None:
    """The other worker fails too, its link to the dead one broken: the run still fails with the death, and the
    run's statistics hold the other worker's instances (it reported none: a failed run's --stats lacked them)."""
    graph, _ = _chain(die := Die(how))
    run = aiod4p.start(graph, 10_000_000, mapping="multi", workers=2)

    async def main() -> None:
        async with asyncio.timeout(30), run:
            await run.results()

    started = time.monotonic()
    with pytest.raises(WorkerDied, match=rf"{expected} before the run finished; it ran .*{die.id}\[[01]\]") as died:
        asyncio.run(main())
    assert time.monotonic() - started < 10
    (dead,) = re.findall(r"worker process (\d+) ", str(died.value))
    alive = {(ref.pe, ref.index) for ref in run.plan.instances() if run.plan.worker_of(ref) != int(dead)}
    assert {(entry.pe, entry.instance) for entry in run.live_stats()} >= alive


def test_an_unpicklable_item_between_workers_names_the_pe_and_port() -> None:
    graph = WorkflowGraph()
    emit = wf.EmitLock(parallelism=1)
    graph.connect(wf.Count(), "output", emit, "input")
    # every item goes to instance 1, on worker 1: the lock has to cross
    graph.connect(emit, "output", wf.WhoSawWhat(group_by(key=wf.on_instance_1), parallelism=2), "input")
    with pytest.raises(TransportError, match=rf"PE {emit.id}\[0\] wrote an item on output port 'output'.*pickle"):
        aiod4p.run(graph, 100, mapping="multi", workers=2)


def test_an_unpicklable_result_names_the_pe_and_port() -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", emit := wf.EmitLock(), "input")
    with pytest.raises(TransportError, match=rf"PE {emit.id} wrote a result on output port 'output'.*lock"):
        aiod4p.run(graph, 100, mapping="multi", workers=2)


@pytest.mark.timeout(30)
def test_an_unpicklable_result_is_named_without_calling_its_repr() -> None:
    """The error asked the result for its repr: one that never returns hung the run (a worker stuck in it)."""
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", emit := wf.EmitHandle(), "input")
    with pytest.raises(TransportError, match=rf"PE {emit.id} wrote a result .*: <Handle> \(TypeError: a Handle cannot"):
        aiod4p.run(graph, 100, mapping="multi", workers=2)


# -- drain and cancel -------------------------------------------------------------------


def test_drain_stops_the_sources_in_every_worker_and_waits_for_a_window_of_results_only() -> None:
    """A slow reader: the workers sent results ahead of it by bytes only, which small results barely count (16
    bytes each), and 540,000 were on their way when the run drained (measured): a live run's results lagged as far
    behind. A window of batches bounds them too: 37,000 (measured)."""
    graph, _ = _chain(wf.Double())

    async def main() -> int:
        run = aiod4p.start(graph, 10**9, mapping="multi", workers=2)
        async with asyncio.timeout(60), run:
            seen = 0
            async for _ in run:
                seen += 1
                if seen % 10 == 0:
                    await asyncio.sleep(0.001)  # a reader of at most 10,000 results a second
                if seen == 5000:
                    run.drain()
                    break
            return sum([1 async for _ in run])

    assert asyncio.run(main()) < 100_000


def test_drain_stops_a_pumped_infinite_feed() -> None:
    graph = WorkflowGraph()
    graph.connect(double := wf.Double(), "output", wf.Double(), "input")

    async def main() -> int:
        run = aiod4p.start(graph, {double: itertools.count()}, mapping="multi", workers=2)
        async with asyncio.timeout(30), run:
            seen = 0
            async for _ in run:
                seen += 1
                if seen == 3000:
                    run.drain()
            return seen

    assert asyncio.run(main()) >= 3000


def test_cancelling_the_run_stops_every_worker() -> None:
    graph, _ = _chain(wf.Double())

    async def main() -> None:
        run = aiod4p.start(graph, 10**9, mapping="multi", workers=2)
        async with asyncio.timeout(30):
            async with run:
                async for _ in run:
                    break
            assert run.done

    asyncio.run(main())  # the fixture checks that no worker is left


def test_forked_workers_let_go_of_the_callers_connections() -> None:
    """A service closed a client's connection while a run forked meanwhile went on: its workers held the
    connection, so the client never saw it end (and the service's port could not be bound again) until the
    run ended."""
    graph = WorkflowGraph()
    graph.add(double := wf.Double())
    double.id = "double"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        service, _ = listener.accept()  # a client's connection the service holds while the run starts
        client.setblocking(False)
        feed = aiod4p.LiveFeed()
        run = aiod4p.start(graph, {"double": feed}, mapping=MultiMapping(start_method="fork"), workers=2)
        async with asyncio.timeout(30), run:
            await run.send("double", 1)
            assert (await anext(run)).data == 2  # the workers run
            service.close()
            listener.close()
            assert await loop.sock_recv(client, 1) == b""  # the end of the connection, while the run goes on
            socket.create_server(("127.0.0.1", port)).close()  # and the port is free again
            assert not run.done
            feed.close()
            await run.results()
        client.close()

    asyncio.run(main())


REPORTS: list[socket.socket] = []  # a connection the workflow's module opens, as a module-level client does


class Report(IterativePE):
    """Writes each item, as a line, to the module's connection."""

    def process_item(self, item: int) -> None:
        REPORTS[0].sendall(b"%d\n" % item)


def test_forked_workers_keep_the_connections_the_caller_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """Letting go of a service's connections must not take the workflow's own: a module-level client's
    connection, opened before the run (a database's, say), still carries what a PE writes from its worker."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        outbound = socket.create_connection(server.getsockname())
        monkeypatch.setattr(sys.modules[__name__], "REPORTS", [outbound])
        accepted, _ = server.accept()
        graph = WorkflowGraph()
        graph.add(Report())
        inputs = {"Report": [{"input": n} for n in range(4)]}
        aiod4p.run(graph, inputs, mapping=MultiMapping(start_method="fork"), workers=2)
        outbound.close()
        accepted.settimeout(30)
        with accepted, accepted.makefile("rb") as lines:
            assert sorted(int(line) for line in lines) == [0, 1, 2, 3]


def test_forked_workers_keep_standard_streams_that_are_sockets() -> None:
    """Under systemd, stdout and stderr are a stream socket to the journal: a worker's prints still go there."""
    ours, theirs = socket.socketpair()
    code = (
        "from aiod4p.mappings._multi_worker import release_inherited_connections\n"
        "release_inherited_connections(set())\n"
        "print('still here', flush=True)"
    )
    with ours, theirs:
        subprocess.run([sys.executable, "-c", code], stdout=theirs, check=True, timeout=60)
        theirs.close()
        assert ours.recv(100) == b"still here\n"


def test_forked_workers_start_one_per_turn_of_the_callers_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A service started 50 runs at once and its loop stood still for half a second: each fork takes
    milliseconds, and every run forked its workers in one go. At most one worker now starts per turn of the
    loop, after the timers that fell due, so the service's other tasks run between two forks."""
    turn = 0
    turns_of_starts: list[int] = []
    start = multiprocessing.process.BaseProcess.start

    def recorded(process: multiprocessing.process.BaseProcess) -> None:
        turns_of_starts.append(turn)
        start(process)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", recorded)

    async def main() -> None:
        nonlocal turn

        async def count_turns() -> None:
            nonlocal turn
            while True:
                await asyncio.sleep(0)
                turn += 1

        counter = asyncio.create_task(count_turns())
        mapping = MultiMapping(start_method="fork")
        async with asyncio.timeout(60):
            runs = [aiod4p.run_async(_chain(wf.Double())[0], 10, mapping=mapping, workers=2) for _ in range(3)]
            await asyncio.gather(*runs)
        counter.cancel()

    asyncio.run(main())
    assert len(turns_of_starts) == 6
    assert len(set(turns_of_starts)) == 6, turns_of_starts


def test_live_stats_are_published_while_running() -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", sink := wf.Slow(), "input")

    async def main() -> None:
        run = aiod4p.start(graph, 10**9, mapping="multi", workers=2)
        async with asyncio.timeout(30), run:
            while not any(s.pe == sink.id and s.items_in for s in run.live_stats()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling the published statistics
            run.drain()
            await run.results()

    asyncio.run(main())


# -- memory -----------------------------------------------------------------------------


def test_many_items_through_a_slow_sink_stay_within_the_inflight_bound() -> None:
    # 300 times the bound (2 million items took over the test's minute on a loaded machine).
    items = 300_000
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", double := wf.Double(), "input")
    graph.connect(double, "output", sink := wf.Slow(parallelism=1), "input")  # every item crosses to worker 0
    run = aiod4p.start(graph, items, mapping="multi", workers=2, batch_size=256, credits=2)

    async def main() -> None:
        async with asyncio.timeout(60):
            await run.results()

    asyncio.run(main())
    sinks = [s for s in run.stats if s.pe == sink.id]
    assert sum(s.items_in for s in sinks) == items
    for entry in run.stats:
        assert entry.max_queued_items <= entry.inflight_bound, entry
    # The sink's inbox held at most 2 credits x (256 items from its own worker + a batch between
    # workers from the other), whatever the input size.
    assert sinks[0].inflight_bound == 2 * (256 + 256 * REMOTE_BATCH_FACTOR)
    assert sinks[0].max_queued_items > 0


# -- command line -------------------------------------------------------------------------

FLOW = numbers_flow(
    """
    import os, sys, time

    class Check(IterativePE):
        def process_item(self, item):
            if item == int(os.environ.get("FAIL_AT", "-1")):
                raise RuntimeError(f"refusing {item}")
            if item == 1000 and os.environ.get("READY"):
                sys.stdout.write("running\\n")  # one write: lines of two workers never interleave
                sys.stdout.flush()
            return item * 10

        def postprocess(self):
            if os.environ.get("STUCK"):
                sys.stdout.write("stuck\\n")
                sys.stdout.flush()
                time.sleep(60)  # ok-sleep: a postprocess stuck on purpose, so the second SIGINT must abort it
    """
)


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """The CLI running ``my-flow.py`` on multi -n 2, in its own session (process group)."""
    flow = tmp_path / "my-flow.py"  # not an importable module name: spawned workers need it preloaded
    flow.write_text(FLOW)
    return aiod4p_process(
        "run", str(flow), "--mapping", "multi", "-n", "2", *args, env={**os.environ, **env}, cwd=tmp_path
    )


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (psutil-free orphan check)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cli_runs_a_workflow_file_on_multi(tmp_path: Path, method: str) -> None:
    process = _cli(tmp_path, "-i", "50", "--results", "-", **{START_METHOD_ENV: method})
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert sorted(int(line.split('"data": ')[1].rstrip("}")) for line in out.splitlines()) == [
        10 * i for i in range(1, 51)
    ]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cli_runs_a_workflow_file_named_as_a_python_module(tmp_path: Path, method: str) -> None:
    """``signal.py`` (a seismologist's name) is imported under another name: registered as ``signal``, it
    replaced Python's module, and the multi mapping failed with a traceback (uvloop: no ``signal.NSIG``)."""
    flow = tmp_path / "flows" / "signal.py"
    flow.parent.mkdir()
    flow.write_text(FLOW)
    process = aiod4p_process(
        "run",
        str(flow),
        "-m",
        "multi",
        "-n",
        "2",
        "-i",
        "5",
        "--results",
        "-",
        env={**os.environ, START_METHOD_ENV: method},
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert sorted(int(line.split('"data": ')[1].rstrip("}")) for line in out.splitlines()) == [10, 20, 30, 40, 50]


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_cli_runs_a_workflow_file_named_as_a_python_module_from_its_folder(tmp_path: Path, method: str) -> None:
    """``cd flows; aiod4p run signal.py -m multi``: the interpreters multiprocessing starts (spawn's ``python -c``,
    the forkserver, the resource tracker) had the current directory first on ``sys.path`` and imported the
    workflow as Python's ``signal``; a forkserver's worker also took the server for a dead launcher and left.
    What a PE starts gets the caller's environment (without the ``PYTHONSAFEPATH`` that keeps it off)."""
    safe_path = "class SafePath(IterativePE):\n    def process_item(self, item):\n"
    safe_path += "        import os\n        return [item, os.environ.get('PYTHONSAFEPATH')]\n"
    (tmp_path / "signal.py").write_text(numbers_flow(safe_path))
    command = ["run", "signal.py", "-m", "multi", "-n", "2", "-i", "5", "--results", "-"]
    process = subprocess.Popen(  # the console script: `python -m aiod4p` there would fail the same way
        [str(Path(sys.executable).with_name("aiod4p")), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, START_METHOD_ENV: method},
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, err
    assert sorted(json.loads(line)["data"] for line in out.splitlines()) == [[i, None] for i in range(1, 6)]


def test_cli_pe_error_exits_non_zero_with_the_pe_name(tmp_path: Path) -> None:
    process = _cli(tmp_path, "-i", "5000", FAIL_AT="1234")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "Check" in err and "refusing 1234" in err


@pytest.mark.parametrize("signals", [1, 2, "group"])
def test_cli_interrupt_leaves_no_orphans(tmp_path: Path, signals: int | str) -> None:
    """SIGINT drains, a second aborts; Ctrl-C in a terminal reaches the workers too (they leave it to the parent)."""
    marker = f"AIOD4P_TEST_MARKER={os.getpid()}-{signals}-{time.monotonic_ns()}"
    name, value = marker.split("=")
    stuck = {"STUCK": "1"} if signals == 2 else {}
    process = _cli(tmp_path, "-i", str(10**9), "--results", os.devnull, READY="1", **stuck, **{name: value})
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "running\n"  # a worker is processing
        assert len(_marked(marker)) >= 3  # the CLI and its two workers
        if signals == "group":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)  # drain: the sources stop, postprocess runs
        if signals == 2:
            assert process.stdout.readline() == "stuck\n"
            process.send_signal(signal.SIGINT)  # abort
        _, err = process.communicate(timeout=30)
        assert process.returncode == (130 if signals == 2 else 0), err
    finally:
        if process.poll() is None or _marked(marker):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the CLI's session: workers too, so the pipes close
            process.communicate()
    assert _marked(marker) == []


def test_a_first_interrupt_while_later_workers_start_drains_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forked workers start one per turn of the loop, and the first runs the job (its source produces) while the
    others start: a first Ctrl-C then drains the run, as it does once every worker has started (it aborted it)."""
    start_turn = multi_module._start_turn
    turns = itertools.count()

    @contextlib.asynccontextmanager
    async def interrupted_before_the_second(method: str) -> AsyncIterator[None]:
        if next(turns) == 1:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)  # a terminal's Ctrl-C
        async with start_turn(method):
            yield

    monkeypatch.setattr(multi_module, "_start_turn", interrupted_before_the_second)
    graph = WorkflowGraph()
    count, double = wf.Count(), wf.Double()
    graph.connect(count, "output", double, "input")
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted and drained") as interrupted:
            aiod4p.run(graph, {count: 10**9}, mapping="multi", workers=2)
    finally:
        signal.signal(signal.SIGINT, handler)
    drained = interrupted.value.partial_results.data()  # type: ignore[attr-defined]
    assert sorted(drained) == [2 * i for i in range(len(drained))]  # no item lost


INTERRUPTED_AS_A_WORKER_STARTS = textwrap.dedent(
    """
    import asyncio, os, signal, sys, warnings
    import aiod4p, workflows as wf
    from aiod4p.mappings.multi import MultiMapping

    def run():
        graph = aiod4p.WorkflowGraph()
        graph.connect(count := wf.Count(), "output", wf.Double(), "input")
        # one worker: a second one could be in its interpreter's start as the first imports this script, before
        # it imports aiod4p, which is when it ignores Ctrl-C (aiod4p._starting)
        aiod4p.run(graph, {count: 10**9}, mapping=MultiMapping(sys.argv[1]), workers=1)

    async def cell():  # a notebook's: its loop runs, and the run's loop runs in a thread of its own
        warnings.simplefilter("ignore", RuntimeWarning)  # "it blocks that loop" (not said in a kernel)
        run()

    if __name__ != "__main__":  # a spawned worker (or the forkserver) imports this script as it starts, aiod4p first
        try:
            os.close(os.open(os.environ["ONCE"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.killpg(os.getpgid(0), signal.SIGINT)  # Ctrl-C in the terminal (a kernel's interrupt), now
    elif sys.argv[2] == "script":
        run()
    else:
        asyncio.run(cell())
    """
)


@pytest.mark.parametrize("how", ["script", "notebook"])
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_ctrl_c_while_a_spawned_worker_starts_interrupts_the_run_not_the_worker(
    tmp_path: Path, method: str, how: str
) -> None:
    """A spawned worker (or the forkserver) is a new interpreter, which takes Ctrl-C as its own until the worker
    leaves it to the parent (half a second of start and imports): Ctrl-C (or a Jupyter kernel's interrupt, sent to
    its process group) then killed it, and the run failed with `WorkerDied: worker process 0 ... was killed by
    SIGINT` (`exited with code 1`; `EOFError` when it was the forkserver) instead of being interrupted."""
    script = tmp_path / "flow.py"
    script.write_text(INTERRUPTED_AS_A_WORKER_STARTS)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "ONCE": str(tmp_path / "once")}
    process = subprocess.Popen(
        [sys.executable, str(script), method, how],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    with reaped(process):
        _, err = process.communicate(timeout=60)
    assert (tmp_path / "once").exists()
    assert process.returncode == -signal.SIGINT, err
    assert err.rstrip().splitlines()[-1].startswith("KeyboardInterrupt"), err


INTERRUPTING_SITECUSTOMIZE = textwrap.dedent(
    """
    import os, signal
    with open("/proc/self/cmdline", "rb") as cmdline:
        spawned = b"spawn_main" in cmdline.read()  # a spawned worker (not the command, nor the resource tracker)
    if spawned:
        try:
            os.close(os.open(os.environ["ONCE"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.killpg(os.getpgid(0), signal.SIGINT)  # Ctrl-C in the terminal, as the interpreter starts
    """
)


def test_ctrl_c_as_the_first_spawned_worker_s_interpreter_starts_interrupts_the_run_not_the_worker(
    tmp_path: Path,
) -> None:
    """The launcher starts workers with SIGINT held, so that a new interpreter does not take a Ctrl-C as its own
    before the worker leaves it to the parent; but multiprocessing starts its resource tracker with the first
    spawned worker, and unblocks SIGINT after it: that worker started with SIGINT deliverable, and a Ctrl-C in
    its first 40-70 ms killed it (`Fatal Python error: init_import_site`, then `worker process 0 ... was killed
    by SIGINT`). Here the worker sends the Ctrl-C itself as its interpreter imports `sitecustomize`."""
    (tmp_path / "sitecustomize.py").write_text(INTERRUPTING_SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "ONCE": str(tmp_path / "once"),
        START_METHOD_ENV: "spawn",
    }
    command = ["run", "examples/wordcount.py", "-m", "multi", "-n", "2", "--results", os.devnull]
    with reaped(aiod4p_process(*command, env=env)) as process:
        _, err = process.communicate(timeout=60)
    assert (tmp_path / "once").exists()
    assert process.returncode in (0, 130), err  # drained, or aborted as it started
    assert "SIGINT" in err and "killed" not in err and "Fatal Python error" not in err, err


KEEPS_ITS_MASK = textwrap.dedent(
    """
    import signal, sys
    import aiod4p, workflows as wf
    from aiod4p.mappings.multi import MultiMapping

    if __name__ == "__main__":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # a service that sigwait()s
        graph = aiod4p.WorkflowGraph()
        graph.connect(count := wf.Count(), "output", wf.Double(), "input")
        aiod4p.run(graph, {count: 10}, mapping=MultiMapping(sys.argv[1]), workers=2)
        print(sorted(signal.Signals(signum).name for signum in signal.pthread_sigmask(signal.SIG_BLOCK, ())))
    """
)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_run_on_spawn_leaves_the_callers_signal_mask_as_it_was(tmp_path: Path, method: str) -> None:
    """multiprocessing's resource tracker, which the launcher starts before it holds signals for a spawned worker,
    unblocks SIGINT and SIGTERM in the thread that starts it: a service that blocks them (to sigwait() for them)
    found them unblocked after its first run."""
    script = tmp_path / "flow.py"
    script.write_text(KEEPS_ITS_MASK)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['SIGINT', 'SIGTERM']"], done.stderr


USERS_FORKSERVER_AFTER_A_RUN = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys
    import aiod4p, workflows as wf
    from aiod4p.mappings.multi import MultiMapping

    def report():
        print(signal.getsignal(signal.SIGINT) is signal.default_int_handler,
              signal.getsignal(signal.SIGHUP) == signal.SIG_DFL,
              "AIOD4P_SPAWNED_WORKER" in os.environ, flush=True)

    if __name__ == "__main__":
        graph = aiod4p.WorkflowGraph()
        graph.connect(count := wf.Count(), "output", wf.Double(), "input")
        aiod4p.run(graph, {count: 10}, mapping=MultiMapping("forkserver"), workers=2)
        process = multiprocessing.get_context("forkserver").Process(target=report)
        process.start()
        process.join()
    """
)


def test_the_users_own_forkserver_processes_take_ctrl_c_after_a_run_on_forkserver(tmp_path: Path) -> None:
    """The forkserver a multi run starts is multiprocessing's, which the program's own forkserver processes come
    from too: started with SIGINT and SIGHUP ignored (so that a Ctrl-C while it imported did not kill it), it gave
    them to every process it forked for the program later, which then ignored Ctrl-C."""
    script = tmp_path / "flow.py"
    script.write_text(USERS_FORKSERVER_AFTER_A_RUN)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "True True False", done.stdout + done.stderr


def test_workers_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    marker = f"AIOD4P_TEST_MARKER={os.getpid()}-parent-{time.monotonic_ns()}"
    name, value = marker.split("=")
    process = _cli(tmp_path, "-i", str(10**9), "--results", os.devnull, READY="1", **{name: value})
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "running\n"
        process.kill()
        process.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.05)  # ok-sleep: polling for the orphans to notice
        assert _marked(marker) == []
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


def test_an_unpicklable_result_is_a_transport_error_wherever_its_batch_is_flushed() -> None:
    """A full batch is flushed while the PE's call is handled, a partial one when its actor waits
    for input: either way the error is the TransportError naming the PE and port (not a PEError)."""
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", emit := wf.EmitLock(), "input")
    for batch_size in (1, 256):
        with pytest.raises(TransportError, match=rf"PE {emit.id} wrote a result on output port 'output'.*lock"):
            aiod4p.run(graph, 100, mapping="multi", workers=1, batch_size=batch_size)


def _sockets_of(pid: int) -> int:
    return sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))


def test_a_forked_worker_holds_no_socket_of_another_run_starting_meanwhile() -> None:
    """Runs of one loop fork in turns: a worker forked between two forks of another run inherited that run's
    socket pairs (its workers' control and link ends) and held them as long as it ran."""
    from aiod4p._processes import children

    async def held_by_a_live_run(other_run: bool) -> int:
        graph = WorkflowGraph()
        graph.add(double := wf.Double())
        double.id = "double"
        feed = aiod4p.LiveFeed()
        mapping = MultiMapping(start_method="fork")
        before = children({os.getpid()})
        other = None
        if other_run:  # it forks its first worker first, the live run's between two of its own
            other = asyncio.ensure_future(aiod4p.run_async(_chain(wf.Double())[0], 10, mapping=mapping, workers=4))
            await asyncio.sleep(0)
        async with asyncio.timeout(60), aiod4p.start(graph, {"double": feed}, mapping=mapping) as run:
            await run.send("double", 1)
            await anext(run)
            if other is not None:
                await other
            held = sum(_sockets_of(pid) for pid in children({os.getpid()}) - before)
            feed.close()
            await run.results()
        return held

    alone = asyncio.run(held_by_a_live_run(False))
    beside = asyncio.run(held_by_a_live_run(True))
    assert beside <= alone + 4, (alone, beside)  # the other run's parent ends, open while it ran, at most


def _few_files(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_more_workers_than_files_this_process_may_open_is_a_clear_error() -> None:
    """`aiod4p run -m multi -n 10000 --oversubscribe` said only `aiod4p: error: [Errno 24] Too many open files`
    (and left the socket pairs made so far open): it names the workers, the files they need and the limit now.
    With a limit just above the socket pairs' files, the pipes that starting the workers opens (and the files open
    already) were not counted: `os.pipe()` in `process.start()` failed with the bare `[Errno 24]`."""

    def run(limit: int) -> tuple[int, int]:
        done = subprocess.run(
            [*AIOD4P, "run", "examples/wordcount.py", "-m", "multi", "-n", "100", "--oversubscribe", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            preexec_fn=functools.partial(_few_files, limit),
        )
        assert done.returncode == 1, done.stderr
        said = re.fullmatch(
            r"aiod4p: error: 100 worker processes need about (\d+) open files here \((\d+) socket pairs, the pipes to"
            r" each process and the files open already\), more than this process may open \(ulimit -n: (\d+)\):"
            r" start fewer workers \(-n\), or raise the limit\n",
            done.stderr,
        )
        assert said is not None, done.stderr
        needed, pairs, told = map(int, said.groups())
        assert told == limit and needed > limit and needed >= 2 * pairs + 2 * 100, done.stderr
        return needed, pairs

    _, pairs = run(256)
    run(2 * pairs + 16)  # the socket pairs fit, the pipes of the processes' start do not
