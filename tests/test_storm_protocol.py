"""Generated Storm components, driven as real subprocesses over the multilang protocol.

Each test plays Storm's ShellBolt/ShellSpout exactly: the handshake with a pid
directory, tuples with random ids, heartbeats, the spout's next/ack/fail, and
stdin closing when the worker goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("streamparse", reason="the storm extra is not installed")

from storm_harness import ComponentProcess, StormHarness, command
from test_storm_report import TOKEN, Sink
from workflows import (
    Chatty,
    Count,
    Double,
    Fail,
    FailsAtEnd,
    Greets,
    StopsEarly,
    Strings,
    SumAtEnd,
    Unencodable,
    WritesAtEnd,
)

from aiod4p import FunctionPE, WorkflowGraph, group_by
from aiod4p.errors import PEError, TargetError, TransportError
from aiod4p.storm import EOS_STREAM, build_project, encode_key
from aiod4p.storm._run import LINE_LIMIT, RunReport

ERROR = 4  # Storm's log level "error"


class Topology:
    """A generated project of test PEs, and helpers to start one of its tasks."""

    def __init__(self, tmp: Path, graph: WorkflowGraph, inputs: Any, **options: Any) -> None:
        self.project = build_project(graph, tmp / "project", name="protocol", inputs=inputs, **options)
        self.harness = StormHarness(self.project.path)
        self.started: list[ComponentProcess] = []

    def start(self, pe_id: str) -> tuple[ComponentProcess, int]:
        """Start the first task of ``pe_id``, complete the handshake, and skip pystorm's greeting log."""
        task = self.harness.tasks[pe_id][0]
        component = self.harness.components[pe_id]
        process = ComponentProcess(self.project.src, component.script, env=self.harness.env)
        self.started.append(process)
        pid = process.handshake(self.harness.conf, self.harness.context(task))
        assert pid == process.process.pid
        assert (Path(process.pid_dir) / str(pid)).is_file()  # the supervisor kills what it finds there
        greeting = process.read()
        assert greeting["command"] == "log" and "pystorm StormHandler logging enabled" in greeting["msg"]
        return process, task

    def task_of(self, pe_id: str) -> int:
        return self.harness.tasks[pe_id][0]


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Any]:
    made: list[Topology] = []

    def make(graph: WorkflowGraph, inputs: Any = 3, **options: Any) -> Topology:
        made.append(Topology(tmp_path / str(len(made)), graph, inputs, **options))
        return made[-1]

    yield make
    for topo in made:
        for process in topo.started:
            process.kill()


def tup(tuple_id: str, source: str, task: int, values: list[Any], stream: str = "output") -> dict[str, Any]:
    return {"id": tuple_id, "comp": source, "stream": stream, "task": task, "tuple": values}


def heartbeat(tuple_id: str = "-77") -> dict[str, Any]:
    return {"id": tuple_id, "comp": None, "stream": "__heartbeat", "task": -1, "tuple": []}


def done(tuple_id: str) -> Any:
    return lambda m: command("ack", id=tuple_id)(m) or command("fail", id=tuple_id)(m)


def test_bolt_acks_fails_heartbeats_and_finishes(topology: Any) -> None:
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", fail := Fail(on=3), "input")
    graph.connect(fail, "output", SumAtEnd(), "input")
    topo = topology(graph)
    bolt, _ = topo.start(fail.id)
    src = topo.task_of(source.id)

    bolt.send(tup("-4031", source.id, src, [1]))
    assert bolt.read_until(done("-4031")) == [
        {"command": "emit", "tuple": [1], "stream": "output", "anchors": ["-4031"], "need_task_ids": False},
        {"command": "ack", "id": "-4031"},
    ]

    bolt.send(heartbeat())
    assert bolt.read_until(command("sync")) == [{"command": "sync"}]

    # The PE raises: the error is logged and reported through Storm, the tuple fails, nothing is emitted.
    bolt.send(tup("77", source.id, src, [3]))
    messages = bolt.read_until(done("77"))
    assert [m["command"] for m in messages] == ["log", "error", "sync", "fail"]
    assert messages[0]["level"] == ERROR
    for text in (messages[0]["msg"], messages[1]["msg"]):
        assert f"PE {fail.id}[0] failed on input port 'input': ValueError: bad item 3" in text
    assert messages[-1] == {"command": "fail", "id": "77"}

    # ... and the bolt goes on with the next tuple.
    bolt.send(tup("78", source.id, src, [4]))
    assert [m["command"] for m in bolt.read_until(done("78"))] == ["emit", "ack"]

    # End of stream from the only upstream task: the bolt passes it on.
    bolt.send(tup("79", source.id, src, [source.id], stream=EOS_STREAM))
    assert bolt.read_until(done("79")) == [
        {"command": "emit", "tuple": [fail.id], "stream": EOS_STREAM, "anchors": ["79"], "need_task_ids": False},
        {"command": "ack", "id": "79"},
    ]

    rest, code = bolt.close()
    assert code == 2  # pystorm: "Exiting because parent Storm process went away."
    assert any("parent Storm process went away" in m.get("msg", "") for m in rest)


def test_bolt_runs_postprocess_once_every_upstream_task_has_finished(topology: Any) -> None:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", double := Double(parallelism=2), "input")
    graph.connect(double, "output", total := SumAtEnd(), "input")
    topo = topology(graph)
    bolt, _ = topo.start(total.id)
    first, second = topo.harness.tasks[double.id]
    for tuple_id, task, item in (("1", first, 10), ("2", second, 5)):
        bolt.send(tup(tuple_id, double.id, task, [item]))
        assert bolt.read_until(done(tuple_id)) == [{"command": "ack", "id": tuple_id}]
    bolt.send(tup("3", double.id, first, [double.id], stream=EOS_STREAM))
    assert bolt.read_until(done("3")) == [{"command": "ack", "id": "3"}]  # one upstream task still runs
    bolt.send(tup("4", double.id, second, [double.id], stream=EOS_STREAM))
    messages = bolt.read_until(done("4"))
    assert messages == [
        {"command": "emit", "tuple": [15], "stream": "total", "anchors": ["4"], "need_task_ids": False},
        {"command": "emit", "tuple": [total.id], "stream": EOS_STREAM, "anchors": ["4"], "need_task_ids": False},
        {"command": "ack", "id": "4"},
    ]
    assert bolt.close()[1] == 2


def test_bolt_rejects_items_that_cannot_cross(topology: Any) -> None:
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", bad := Unencodable(on=2), "input")
    topo = topology(graph)
    bolt, _ = topo.start(bad.id)
    src = topo.task_of(source.id)
    bolt.send(tup("5", source.id, src, [2]))
    messages = bolt.read_until(done("5"))
    assert [m["command"] for m in messages] == ["log", "error", "sync", "fail"]
    assert (
        f"PE {bad.id}[0] wrote an item to output port 'output' that cannot cross Storm: item is a lock"
        in (messages[1]["msg"])
    )
    bolt.send(tup("6", source.id, src, [(1, "x")]))  # a tuple item, then the same item back out
    assert bolt.read_until(done("6")) == [
        {"command": "emit", "tuple": [[1, "x"]], "stream": "output", "anchors": ["6"], "need_task_ids": False},
        {"command": "ack", "id": "6"},
    ]
    bolt.send(tup("7", source.id, src, [{"~t": [1, "x"]}]))
    assert bolt.read_until(done("7"))[0]["tuple"] == [{"~t": [1, "x"]}]
    assert bolt.close()[1] == 2


def test_print_in_a_pe_does_not_corrupt_the_protocol(topology: Any) -> None:
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", chatty := Chatty(), "input")
    topo = topology(graph)
    bolt, _ = topo.start(chatty.id)
    bolt.send(tup("8", source.id, topo.task_of(source.id), ["hello"]))
    messages = bolt.read_until(done("8"))  # every message parses as JSON
    assert messages[0]["command"] == "log" and messages[0]["level"] == 2  # print() -> Storm's log
    assert messages[0]["msg"].endswith("aiod4p.stdout - chatty saw 'hello'")
    assert messages[-2:] == [
        {"command": "emit", "tuple": ["hello"], "stream": "output", "anchors": ["8"], "need_task_ids": False},
        {"command": "ack", "id": "8"},
    ]
    assert bolt.close()[1] == 2


def next_until(spout: ComponentProcess, wanted: Any, limit: int = 200) -> list[Any]:
    """Send ``next`` until a message ``wanted`` accepts has arrived; returns every message but the syncs."""
    seen: list[Any] = []
    for _ in range(limit):
        spout.send({"command": "next", "id": ""})
        seen += [m for m in spout.read_until(command("sync")) if m != {"command": "sync"}]
        if any(wanted(m) for m in seen):
            return seen
    raise AssertionError(f"no wanted message after {limit} next commands: {seen}")


def emitted(stream: str) -> Any:
    return lambda m: command("emit")(m) and m.get("stream") == stream


def test_spout_emits_replays_failed_tuples_and_ends(topology: Any) -> None:
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", Double(), "input")
    topo = topology(graph, inputs=3)
    spout, _ = topo.start(source.id)

    emits: list[Any] = []
    while len(emits) < 3:
        emits += [m for m in next_until(spout, emitted("output")) if emitted("output")(m)]
    assert emits == [
        {"command": "emit", "tuple": [n], "id": n, "stream": "output", "need_task_ids": False} for n in range(3)
    ]

    spout.send({"command": "ack", "id": 0})
    assert spout.read_until(command("sync")) == [{"command": "sync"}]
    for _ in range(3):  # a failed tuple is replayed with the same id and values: at-least-once
        spout.send({"command": "fail", "id": 1})
        assert spout.read_until(command("sync")) == [emits[1], {"command": "sync"}]
    spout.send({"command": "fail", "id": 1})  # the fourth failure: dropped after 3 replays
    messages = spout.read_until(command("sync"))
    assert [m["command"] for m in messages] == ["log", "error", "sync"]
    assert (
        f"PE {source.id}[0]: tuple 1 on stream 'output' failed 4 times; dropped after 3 replays" in (messages[1]["msg"])
    )

    for name in ("deactivate", "activate"):
        spout.send({"command": name, "id": ""})
        assert spout.read_until(command("sync")) == [{"command": "sync"}]

    spout.send({"command": "next", "id": ""})  # tuple 2 is still pending: no end of stream yet
    assert spout.read_until(command("sync")) == [{"command": "sync"}]
    spout.send({"command": "ack", "id": 2})  # the last ack ends the stream at once
    assert spout.read_until(command("sync")) == [
        {"command": "emit", "tuple": [source.id], "stream": EOS_STREAM, "need_task_ids": False},
        {"command": "sync"},
    ]
    spout.send({"command": "next", "id": ""})  # finished: nothing more
    assert spout.read_until(command("sync")) == [{"command": "sync"}]
    assert spout.close()[1] == 2


async def test_a_tuple_dropped_under_a_run_ends_no_stream(topology: Any) -> None:
    """A tuple dropped after its last replay fails a run: its spout went on to send its end of stream once the other
    tuples were acked, so a PE downstream ran ``postprocess`` on the data without that item, and the failed run
    printed its total (a station's mean of 12 readings out of 15) among its results. It now sends none."""
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", Double(), "input")
    report = RunReport(Sink(), TOKEN)
    topo = topology(graph, inputs=3, report=await report.listen("127.0.0.1"), token=TOKEN)
    report.expect(topo.project.spec)
    topo.harness.conf["aiod4p.max_replays"] = 0
    spout, _ = await asyncio.to_thread(topo.start, source.id)
    try:
        emits: list[Any] = []
        while len(emits) < 3:
            found = await asyncio.to_thread(next_until, spout, emitted("output"))
            emits += [m for m in found if emitted("output")(m)]
        messages = []
        for name, tuple_id in (("fail", 1), ("ack", 0), ("ack", 2), ("next", "")):
            spout.send({"command": name, "id": tuple_id})
            messages += await asyncio.to_thread(spout.read_until, command("sync"))
        assert "tuple 1 on stream 'output' failed 1 times; dropped after 0 replays" in str(messages)
        assert not any(emitted(EOS_STREAM)(m) for m in messages), messages
        await asyncio.wait_for(report.ended.wait(), 30)
        assert report.dropped and "dropped after 0 replays" in str(report.error())
    finally:
        spout.kill()
        await report.close(0)


@pytest.mark.parametrize("reported", [True, False])
async def test_a_tuple_storm_timed_out_fails_a_run_rather_than_being_replayed(topology: Any, reported: bool) -> None:
    """Storm fails a tuple whose tree is not acked within topology.message.timeout.secs, while its first emission
    may still be under way downstream: the replay's results came on top of the first's, and a run's test topology
    behind busy tasks gave every count twice. A run fails, naming the setting; a topology on its own (no run to
    report to) replays, as Storm users expect."""
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", Double(), "input")
    report = RunReport(Sink(), TOKEN)
    options = {"report": await report.listen("127.0.0.1"), "token": TOKEN} if reported else {}
    topo = topology(graph, inputs=3, **options)
    report.expect(topo.project.spec)
    topo.harness.conf["topology.message.timeout.secs"] = 0  # every failure comes after the timeout
    spout, _ = await asyncio.to_thread(topo.start, source.id)
    try:
        first = next(m for m in await asyncio.to_thread(next_until, spout, emitted("output")) if emitted("output")(m))
        spout.send({"command": "fail", "id": first["id"]})
        messages = await asyncio.to_thread(spout.read_until, command("sync"))
        if reported:
            assert [m["command"] for m in messages] == ["log", "error", "sync"]
            await asyncio.wait_for(report.ended.wait(), 30)
            assert str(report.error()) == (
                f"PE {source.id}[0]: tuple {first['id']} on stream 'output' was not acked within"
                " topology.message.timeout.secs (0 s): Storm replays such a tuple while the first is still under way,"
                " so the run's results could count it twice, and the run fails instead (give it more time:"
                " StormMapping(conf={'topology.message.timeout.secs': ...}), or the environment's options in"
                " config.json)"
            )
        else:
            assert messages == [first, {"command": "sync"}]
    finally:  # a failed check must not leave the report's server waiting for the spout
        spout.kill()
        await report.close(0)


class Results(Sink):
    """A sink that says when ``count`` items have arrived."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.arrived = asyncio.Event()

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        await super().emit(pe, port, items)
        if len(self.items) >= self.count:
            self.arrived.set()


async def test_results_longer_than_a_report_line_together_are_split_and_one_too_long_fails_its_pe(
    topology: Any,
) -> None:
    """Three results written for one tuple, each a third of the line limit or more: they come back in several lines.
    They were sent in one, which the run could not read, and the run failed with `a Storm task sent a malformed
    report: ValueError: Separator is not found, and chunk exceed the limit`, naming no PE. A result longer than a
    line fails its PE, naming the port."""
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", strings := Strings(LINE_LIMIT // 3), "input")
    sink = Results(3)
    report = RunReport(sink, TOKEN)
    address = await report.listen("127.0.0.1")
    topo = topology(graph, report=address, token=TOKEN)
    try:
        bolt, _ = await asyncio.to_thread(topo.start, strings.id)
        bolt.send(tup("77", source.id, topo.task_of(source.id), [3]))
        assert [m["command"] for m in await asyncio.to_thread(bolt.read_until, done("77"))] == ["ack"]
        await asyncio.wait_for(sink.arrived.wait(), 30)  # sent before the ack, but the run may still be reading
        assert [(pe, port, len(item), item[0]) for pe, port, item in sink.items] == [
            (strings.id, "output", LINE_LIMIT // 3, digit) for digit in "012"
        ]
        strings.length = LINE_LIMIT
        topo = topology(graph, report=address, token=TOKEN)
        bolt, _ = await asyncio.to_thread(topo.start, strings.id)
        bolt.send(tup("78", source.id, topo.task_of(source.id), [1]))
        assert [m["command"] for m in await asyncio.to_thread(bolt.read_until, done("78"))][-1] == "fail"
        await asyncio.wait_for(report.ended.wait(), 30)
        error = report.error()
        assert isinstance(error, TransportError)
        assert str(error).startswith(f"PE {strings.id}[0] wrote a result to output port 'output' of {LINE_LIMIT + 2}")
    finally:
        await report.close(0)


async def test_an_orphaned_spout_whose_kill_nimbus_refuses_stops_emitting_and_tries_again(
    topology: Any, tmp_path: Path
) -> None:
    """The run is gone (killed) while Nimbus does not take the kill: the spout tried once, then went on emitting
    its live source's tuples into a topology nobody collects, for ever. It emits nothing more and tries again."""
    record = tmp_path / "nimbus"
    record.mkdir()
    (record / "refuse-kill").touch()
    script = Path(__file__).with_name("storm_fake_nimbus.py")
    nimbus = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, str(script), str(record)], stdout=subprocess.PIPE, text=True
    )
    report = RunReport(Sink(), TOKEN)
    try:
        assert nimbus.stdout is not None
        port = int(await asyncio.to_thread(nimbus.stdout.readline))
        graph = WorkflowGraph()
        graph.connect(source := Count(), "output", Double(), "input")
        topo = topology(graph, inputs=10_000, report=await report.listen("127.0.0.1"), token=TOKEN)
        topo.harness.conf.update(
            {"nimbus.seeds": ["127.0.0.1"], "nimbus.thrift.port": port, "aiod4p.kill_retry_secs": 0.1}
        )
        spout, _ = await asyncio.to_thread(topo.start, source.id)
        await asyncio.to_thread(next_until, spout, emitted("output"))
        await report.close(0)  # the run is gone: its end of every connection closes
        messages = await asyncio.to_thread(next_until, spout, lambda m: "could not kill" in m.get("msg", ""))
        name = topo.harness.conf["topology.name"]
        assert f"the run that submitted topology {name} is gone: killing the topology" in messages[-2]["msg"]
        assert f"could not kill topology {name} at 127.0.0.1:{port}: " in messages[-1]["msg"]
        assert messages[-1]["msg"].endswith("; trying again in 0.1 s")
        (record / "refuse-kill").unlink()
        deadline = time.monotonic() + 30
        after: list[Any] = []
        while not (record / "killed.json").exists():
            assert time.monotonic() < deadline, after
            spout.send({"command": "next", "id": ""})  # each waits a little when there is nothing to do
            after += [m for m in await asyncio.to_thread(spout.read_until, command("sync")) if m != {"command": "sync"}]
        assert json.loads((record / "killed.json").read_text()) == {"name": name, "wait_secs": 0}
        assert not [m for m in after if command("emit")(m)]  # orphaned: nothing emitted while it waited
    finally:
        await report.close(0)
        nimbus.terminate()
        await asyncio.to_thread(nimbus.communicate, timeout=10)


def test_spout_reports_a_failing_root_pe_and_still_ends(topology: Any) -> None:
    graph = WorkflowGraph()
    graph.connect(root := Fail(on=1), "output", Double(), "input")
    topo = topology(graph, inputs={root.id: [0, 1, 2]})
    spout, _ = topo.start(root.id)
    seen: list[Any] = []
    while not any(emitted(EOS_STREAM)(m) for m in seen):
        # Storm acks item 0 once downstream took it: the spout ends only when no tuple is pending.
        new = next_until(spout, lambda m: emitted(EOS_STREAM)(m) or emitted("output")(m))
        seen += new
        for tuple_id in [m["id"] for m in new if emitted("output")(m)]:
            spout.send({"command": "ack", "id": tuple_id})
            seen += [m for m in spout.read_until(command("sync")) if m != {"command": "sync"}]
    errors = [m["msg"] for m in seen if command("error")(m)]
    assert len(errors) == 1
    assert f"PE {root.id}[0] failed on feed: ValueError: bad item 1" in errors[0]
    assert "Traceback" in errors[0]
    outputs = [m["tuple"] for m in seen if emitted("output")(m)]
    assert outputs in ([], [[0]])  # the engine may stop before item 0 reaches Storm (it hands on each call's
    # outputs before the next call while the root's time per call is unmeasured)
    assert spout.close()[1] == 2


def test_preprocess_output_and_failing_postprocess(topology: Any) -> None:
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", greets := Greets(), "input")
    graph.connect(greets, "output", ends := FailsAtEnd(), "input")
    topo = topology(graph)

    greeter, _ = topo.start(greets.id)  # preprocess runs at start-up; its output is emitted unanchored
    assert greeter.read() == {
        "command": "emit",
        "tuple": ["hello"],
        "stream": "output",
        "anchors": [],
        "need_task_ids": False,
    }
    assert greeter.close()[1] == 2

    bolt, _ = topo.start(ends.id)
    bolt.send(tup("1", greets.id, topo.task_of(greets.id), [5]))
    assert [m["command"] for m in bolt.read_until(done("1"))] == ["emit", "ack"]
    bolt.send(tup("2", greets.id, topo.task_of(greets.id), [greets.id], stream=EOS_STREAM))
    messages = bolt.read_until(done("2"))
    assert [m["command"] for m in messages] == ["log", "error", "sync", "emit", "ack"]
    assert f"PE {ends.id}[0] failed on postprocess: RuntimeError: cannot finish" in messages[1]["msg"]
    assert messages[3]["stream"] == EOS_STREAM  # downstream still finishes
    assert source.id in topo.harness.components
    assert bolt.close()[1] == 2


def pe_only_here(directory: Path, package: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A PE class (a pass-through) of ``package``, a package installed into ``directory`` (as by ``pip install
    --target``: a ``*.dist-info`` beside it) and importable in this process only: not copied into a project's src/
    (an installed library is the workers' to have), so its Storm tasks cannot import it."""
    (directory / package).mkdir()
    (directory / f"{package}-1.0.dist-info").mkdir()
    (directory / package / "__init__.py").write_text("")
    (directory / package / "pes.py").write_text(
        "from aiod4p import IterativePE\n\n\nclass Here(IterativePE):\n    def process_item(self, item):\n"
        "        return item\n"
    )
    monkeypatch.syspath_prepend(str(directory))
    for name in (package, f"{package}.pes"):  # another test's copy, installed where that test had it
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(f"{package}.pes").Here


async def test_a_task_that_cannot_load_its_pe_tells_the_run_why(
    topology: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PE class from a library only the submitting machine has (not copied into src/): the task says so to the
    run at once, naming its PE and the module; Storm itself would only restart it until the start timeout."""
    graph = WorkflowGraph()
    graph.connect(Count(), "output", here := pe_only_here(tmp_path, "driver_only", monkeypatch)(), "input")
    report = RunReport(Sink(), TOKEN)
    address = await report.listen("127.0.0.1")
    topo = topology(graph, report=address, token=TOKEN)
    report.expect(topo.project.spec)
    task = topo.task_of(here.id)
    process = ComponentProcess(topo.project.src, topo.harness.components[here.id].script, env=topo.harness.env)
    topo.started.append(process)
    await asyncio.to_thread(process.handshake, topo.harness.conf, topo.harness.context(task))
    await asyncio.wait_for(report.ended.wait(), 30)
    error = report.error()
    assert isinstance(error, TargetError)
    assert f"the Storm task of PE {here.id}[0] cannot load the workflow" in str(error)
    assert "No module named 'driver_only'" in str(error)
    assert await asyncio.to_thread(process.process.wait, 30) == 1
    await report.close(0)


def test_a_task_loads_its_own_pe_only(topology: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every task unpickled every PE of the topology, importing every PE's modules (a hundred tasks of a
    scientist's workflow each imported obspy and astropy, whichever it ran): a task now loads its own PE, and
    the task of a PE whose module its worker lacks is the only one that fails."""
    graph = WorkflowGraph()
    graph.connect(count := Count(), "output", Double(), "input")
    graph.connect(count, "output", pe_only_here(tmp_path, "elsewhere", monkeypatch)(), "input")
    spout, _ = topology(graph, inputs=2).start(count.id)  # its greeting: it loaded, the other module missing
    first = next(m for m in next_until(spout, emitted("output")) if emitted("output")(m))
    assert first["tuple"] == [0]


async def test_errors_reported_to_the_run_name_the_workflow_files_not_the_copies_the_tasks_ran(
    topology: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task runs the copy of the workflow's module in the topology (on a worker, under Storm's own directories):
    the run's error points at the file the user wrote."""
    (tmp_path / "user_flow.py").write_text(
        "from aiod4p import IterativePE\n\n\nclass Boom(IterativePE):\n    def process_item(self, item):\n"
        "        raise ValueError(item)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_flow", raising=False)  # another test's (each event loop runs this one)
    from user_flow import Boom  # type: ignore[import-not-found]

    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", boom := Boom(), "input")
    report = RunReport(Sink(), TOKEN)
    topo = topology(graph, report=await report.listen("127.0.0.1"), token=TOKEN)
    bolt, _ = await asyncio.to_thread(topo.start, boom.id)
    bolt.send(tup("77", source.id, topo.task_of(source.id), [3]))
    await asyncio.to_thread(bolt.read_until, done("77"))
    await asyncio.to_thread(bolt.close)  # its connection ends after its report: the run has read it
    await asyncio.wait_for(report.ended.wait(), 30)
    [error] = report.failed_tuples
    assert isinstance(error, PEError)
    copy, original = str(topo.project.src / "user_flow.py"), str(tmp_path / "user_flow.py")
    assert f"({original}, line 6, in process_item; item=3)" in str(error)
    assert f'File "{original}", line 6' in error.traceback_text
    assert copy not in str(error) + error.traceback_text
    await report.close(0)


def test_a_module_the_workflow_file_imports_travels_with_it(
    topology: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workflow file that imports a helper module next to it (importable where the run starts: a file target's
    directory is on ``sys.path``): the helper goes into the project with the workflow, and the task loads its PE
    (it failed with ``No module named 'user_words'`` on every Storm worker)."""
    (tmp_path / "user_words.py").write_text("def shout(word):\n    return word.upper()\n")
    (tmp_path / "user_shout.py").write_text(
        "from user_words import shout\n\nfrom aiod4p import IterativePE\n\n\nclass Shout(IterativePE):\n"
        "    def process_item(self, item):\n        return shout(item)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("user_words", "user_shout"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from user_shout import Shout  # type: ignore[import-not-found]

    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", shout := Shout(), "input")
    topo = topology(graph)
    assert (topo.project.src / "user_words.py").read_text() == (tmp_path / "user_words.py").read_text()
    bolt, _ = topo.start(shout.id)
    bolt.send(tup("7", source.id, topo.task_of(source.id), ["abc"]))
    assert bolt.read_until(done("7")) == [
        {"command": "emit", "tuple": ["ABC"], "stream": "output", "anchors": ["7"], "need_task_ids": False},
        {"command": "ack", "id": "7"},
    ]


@contextlib.asynccontextmanager
async def _failed_root(topology: Any, conf: dict[str, Any]) -> AsyncIterator[tuple[Any, RunReport, list[Any]]]:
    """The spout of a root that yields 3 items, then raises (StopsEarly), under a run, with ``conf`` set: its
    spout, the run's report, and its messages up to where it says it holds the root's error for its tuples. The
    spout is killed and the report closed on leaving."""
    graph = WorkflowGraph()
    graph.connect(source := StopsEarly(3), "output", Double(), "input")
    report = RunReport(Sink(), TOKEN)
    topo = topology(graph, inputs=1, report=await report.listen("127.0.0.1"), token=TOKEN)
    report.expect(topo.project.spec)
    topo.harness.conf.update(conf)
    spout, _ = await asyncio.to_thread(topo.start, source.id)
    try:
        held = "told to the run once the 3 tuples emitted before it are processed"
        before = await asyncio.to_thread(next_until, spout, lambda m: command("log")(m) and held in m["msg"])
        yield spout, report, before
        await asyncio.wait_for(report.ended.wait(), 30)
        error = report.error()
        assert isinstance(error, PEError) and "failed on feed: StopIteration" in str(error)
    finally:
        spout.kill()
        await report.close(0)


async def test_a_failed_root_tells_the_run_once_the_tuples_it_emitted_before_are_processed(topology: Any) -> None:
    """A root PE that raises after yielding items (StopsEarly): its spout told the run at once, and the run killed the
    topology while those items were on their way, so ``aiod4p run`` printed none of their results (the other
    mappings print the results gathered before an error). The spout now tells Storm and the run once every tuple it
    had emitted is acked, so their results come back first, and sends no end of stream (nothing runs postprocess)."""
    async with _failed_root(topology, {}) as (spout, report, before):
        assert [m["tuple"] for m in before if emitted("output")(m)] == [[0], [1], [2]]
        assert not any(command("error")(m) for m in before), before
        assert not report.fatal
        after: list[Any] = []
        for message in [m for m in before if emitted("output")(m)]:
            assert not any(command("error")(m) for m in after), after
            spout.send({"command": "ack", "id": message["id"]})
            after += await asyncio.to_thread(spout.read_until, command("sync"))
        assert "PE StopsEarly" in next(m for m in after if command("error")(m))["msg"]
        assert not any(emitted(EOS_STREAM)(m) for m in before + after), after


async def test_a_failed_roots_error_comes_first_when_a_tuple_it_waits_for_times_out(topology: Any) -> None:
    """The error of a failed root waits for the tuples it emitted before; one of them timing out fails the run:
    the run is told the root's error first, the one it fails with, not only the timeout it led to."""
    # every failure comes after the timeout
    async with _failed_root(topology, {"topology.message.timeout.secs": 0}) as (spout, _, _):
        spout.send({"command": "fail", "id": 0})
        messages = await asyncio.to_thread(spout.read_until, command("sync"))
        errors = " ".join(m["msg"] for m in messages if command("error")(m))
        assert "failed on feed: StopIteration" in errors and "not acked within" in errors, errors


def test_lambdas_travel_by_value(topology: Any) -> None:
    """A ``FunctionPE(lambda ...)`` and a ``group_by(key=lambda ...)``, which multi runs (cloudpickle, by value), made
    the build fail (``PE Function1 cannot be pickled for Storm's workers: ... Can't pickle <function <lambda>``): they
    now travel by value, and the task runs them."""
    graph = WorkflowGraph()
    tenfold = FunctionPE(lambda n: n * 10)
    graph.connect(source := Count(), "output", tenfold, "input", grouping=group_by(key=lambda n: n % 2))
    topo = topology(graph, inputs=2)
    spout, _ = topo.start(source.id)
    first = next(m for m in next_until(spout, emitted("output")) if emitted("output")(m))
    assert first["tuple"] == [0, encode_key(0)]
    bolt, _ = topo.start(tenfold.id)
    bolt.send(tup("1", source.id, topo.task_of(source.id), [7, encode_key(1)]))
    assert [m.get("tuple") for m in bolt.read_until(done("1"))] == [[70], None]


def test_a_function_of_main_travels_by_value(topology: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A function defined at the top of the script the user ran (``python flow.py``, so ``__main__``) was pickled by
    reference: the build passed, and every task failed, its ``__main__`` being streamparse's (``Can't get attribute
    'tenfold' on <module '__main__'>``). It travels by value, as a lambda does."""

    def tenfold(n: int) -> int:
        return n * 10

    tenfold.__module__, tenfold.__qualname__ = "__main__", "tenfold"
    monkeypatch.setattr(sys.modules["__main__"], "tenfold", tenfold, raising=False)
    graph = WorkflowGraph()
    graph.connect(source := Count(), "output", pe := FunctionPE(tenfold), "input")
    topo = topology(graph, inputs=2)
    bolt, _ = topo.start(pe.id)
    bolt.send(tup("1", source.id, topo.task_of(source.id), [7]))
    assert [m.get("tuple") for m in bolt.read_until(done("1"))] == [[70], None]


async def test_a_drained_spout_keeps_at_most_max_spout_pending_tuples_in_flight(topology: Any) -> None:
    """Deactivating a run's topology (Ctrl-C) drains its spouts, and Storm calls their next_tuple no more: a spout
    emitted everything its PE had produced at once, past topology.max.spout.pending, and a finite run drained behind
    a bolt of 20 ms an item failed with a tuple not acked within topology.message.timeout.secs. The rest of what
    it produced now leaves as tuples are acked, at most max.spout.pending in flight, then the end of stream."""
    graph = WorkflowGraph()
    graph.connect(source := WritesAtEnd(40), "output", Double(), "input")  # 40 items, drained or not
    report = RunReport(Sink(), TOKEN)
    topo = topology(graph, inputs={source.id: []}, report=await report.listen("127.0.0.1"), token=TOKEN)
    report.expect(topo.project.spec)
    topo.harness.conf["topology.max.spout.pending"] = 4
    spout, _ = await asyncio.to_thread(topo.start, source.id)
    try:
        spout.send({"command": "deactivate", "id": ""})
        messages = await asyncio.to_thread(spout.read_until, command("sync"))
        in_flight = [m["id"] for m in messages if emitted("output")(m)]
        values: list[Any] = [m["tuple"] for m in messages if emitted("output")(m)]
        while in_flight:
            assert len(in_flight) <= 4, messages
            spout.send({"command": "ack", "id": in_flight.pop(0)})
            messages = await asyncio.to_thread(spout.read_until, command("sync"))
            in_flight += [m["id"] for m in messages if emitted("output")(m)]
            values += [m["tuple"] for m in messages if emitted("output")(m)]
        assert values == [[n] for n in range(40)]
        assert any(emitted(EOS_STREAM)(m) for m in messages), messages
    finally:
        spout.kill()
        await report.close(0)
