"""The ray mapping on a real two-node Ray cluster (the session's, started once; see ray_cluster.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import workflows as wf
from helpers import ROOT, TIMES10_FLOW, aiod4p_cli, aiod4p_process, numbers_flow, reaped, run_notebook_flow
from ray_cluster import RayCluster, session_processes, wait_gone

import aiod4p
from aiod4p import IterativePE, WorkflowGraph, group_by
from aiod4p._plan import REMOTE_BATCH_FACTOR
from aiod4p._processes import LEFTOVER_GRACE, kill_left, pidfds, reap
from aiod4p._signals import adopt_orphans
from aiod4p.errors import GraphError, MappingUnavailable, TransportError, WorkerDied
from aiod4p.mappings.ray import RayMapping


class WhereAmI(IterativePE):
    """Emits the Ray node id and the process id it runs in."""

    def process_item(self, item: int) -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), os.getpid()


class Die(IterativePE):
    """Records its process id in ``pids``; on item ``at`` its actor is killed (SIGKILL, or ``ray.kill``)."""

    def __init__(self, how: str, pids: Path, at: int = 50) -> None:
        super().__init__(parallelism=2)
        self.how = how
        self.pids = pids
        self.at = at

    def preprocess(self) -> None:
        (self.pids / str(os.getpid())).touch()

    def process_item(self, item: int) -> int:
        if item == self.at:
            if self.how == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            ray.kill(ray.get_runtime_context().current_actor)
        return item


class ReadsEnvironment(IterativePE):
    """Emits the value of the environment variable ``AIOD4P_TEST_GREETING`` where it runs (``None``: unset)."""

    def process_item(self, item: int) -> str | None:
        return os.environ.get("AIOD4P_TEST_GREETING")


class ReadsFactor(IterativePE):
    """Multiplies each item by the number in ``factor.txt``, a relative path."""

    def process_item(self, item: int) -> int:
        with open("factor.txt") as factor:
            return int(factor.read()) * item


def _chain(middle: IterativePE) -> WorkflowGraph:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", middle, "input")
    graph.connect(middle, "output", wf.Double(), "input")
    return graph


def _nodes(cluster: RayCluster) -> dict[str, dict[str, float]]:
    """The cluster's live nodes: node id -> resources."""
    ray.init(address=cluster.address)
    try:
        return {node["NodeID"]: node["Resources"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()


def test_workers_are_placed_on_both_nodes(ray_cluster: RayCluster) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Range(40), "output", where := WhereAmI(), "input")
    results = aiod4p.run(graph, 1, mapping="ray", workers=2)
    places = set(results.data(where.id))
    assert {node for node, _ in places} == set(_nodes(ray_cluster))
    assert len({pid for _, pid in places}) == 2


def test_resources_choose_the_node(ray_cluster: RayCluster) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Range(10), "output", where := WhereAmI(), "input")
    results = aiod4p.run(graph, 1, mapping=RayMapping(resources={"second": 1}), workers=1)
    (second,) = (node for node, resources in _nodes(ray_cluster).items() if "second" in resources)
    assert {node for node, _ in results.data(where.id)} == {second}


@pytest.mark.parametrize("how", ["SIGKILL", "ray.kill"])
def test_a_killed_actor_fails_the_run_and_leaves_no_process(ray_cluster: RayCluster, tmp_path: Path, how: str) -> None:
    with pytest.raises(WorkerDied, match=r"worker actor [01] \(pid \d+ on Ray node \w+\) died before the run finished"):
        aiod4p.run(_chain(Die(how, tmp_path)), 10_000_000, mapping="ray", workers=2)
    pids = [int(path.name) for path in tmp_path.iterdir()]
    assert len(pids) == 2
    assert wait_gone(pids, timeout=30) == []


def test_items_through_a_slow_sink_stay_within_the_inflight_bound(ray_cluster: RayCluster) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", double := wf.Double(), "input")
    graph.connect(double, "output", sink := wf.Slow(parallelism=1), "input")  # every item crosses to worker 0
    run = aiod4p.start(graph, 200_000, mapping="ray", workers=2, batch_size=256, credits=2)

    async def main() -> None:
        async with asyncio.timeout(55):
            await run.results()

    asyncio.run(main())
    sinks = [s for s in run.stats if s.pe == sink.id]
    assert sum(s.items_in for s in sinks) == 200_000
    for entry in run.stats:
        assert entry.max_queued_items <= entry.inflight_bound, entry
    # The sink's inbox held at most 2 credits on its local channel (256 items a batch) and on the one
    # from the other worker (batches between workers carry REMOTE_BATCH_FACTOR x more), whatever the input size.
    assert sinks[0].inflight_bound == 2 * (256 + 256 * REMOTE_BATCH_FACTOR)
    assert sinks[0].max_queued_items > 0


def test_a_run_waiting_for_the_cluster_holds_none_of_it(ray_cluster: RayCluster) -> None:
    # The cluster has one "second": a run of two workers that each need it waits (until closed), holding
    # nothing, while a run of one such worker starts and finishes. Were the first run holding one worker's
    # share, the second would wait for it until the first gave up (so would two runs each holding part of
    # the cluster, each waiting for the rest).
    second = RayMapping(resources={"second": 1})

    async def main() -> list[int]:
        async with asyncio.timeout(50), aiod4p.start(_chain(wf.Double()), 10, mapping=second, workers=2):
            results = await aiod4p.run_async(_chain(wf.Double()), 10, mapping=second, workers=1)
            return sorted(results.data())

    assert asyncio.run(main()) == [4 * i for i in range(10)]


def test_more_than_the_cluster_has_fails_clearly(ray_cluster: RayCluster, caplog: pytest.LogCaptureFixture) -> None:
    mapping = RayMapping(num_cpus=3, start_timeout=2)
    with pytest.raises(MappingUnavailable, match=r"did not start 1 worker actors of 3 CPUs each within 2 s"):
        aiod4p.run(_chain(wf.Double()), 10, mapping=mapping, workers=1)
    # Said as the run starts waiting, not only when it gives up (-n 10000 on two CPUs: 90 s of silence).
    assert "the Ray cluster cannot start 1 worker actors of 3 CPUs each until nodes join it (waiting up to 2 s)" in (
        caplog.text
    )


def test_a_notebook_workflow_runs_on_the_actors(ray_cluster: RayCluster) -> None:
    """PE classes, functions and item classes defined in a ``__main__`` without a file, as in a notebook (Ray's
    workers cannot import it: they travel by value); the items come back as the driver's own class."""
    (run,) = run_notebook_flow("ray")
    assert run == {"mapping": "ray", "same": True, "points": True, "processes": 2, "dispel4py": True}


def test_a_class_made_in_main_at_run_time_travels_by_value(ray_cluster: RayCluster) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", type("Local", (wf.Double,), {"__module__": "__main__"})(), "input")
    assert sorted(aiod4p.run(graph, 3, mapping="ray", workers=2).data()) == [0, 2, 4]


def test_an_unpicklable_pe_is_named(ray_cluster: RayCluster) -> None:
    with pytest.raises(
        GraphError,
        match=r"PE HoldsLock\d+ cannot be pickled to start Ray actors: its attribute 'lock' \(a lock\) cannot: ",
    ):
        aiod4p.run(_chain(wf.HoldsLock()), 10, mapping="ray", workers=2)


def test_an_unpicklable_item_between_workers_names_the_pe_and_port(ray_cluster: RayCluster) -> None:
    graph = WorkflowGraph()
    emit = wf.EmitLock(parallelism=1)
    graph.connect(wf.Count(), "output", emit, "input")
    # every item goes to instance 1, on worker 1: the lock has to cross
    graph.connect(emit, "output", wf.WhoSawWhat(group_by(key=wf.on_instance_1), parallelism=2), "input")
    with pytest.raises(TransportError, match=rf"PE {emit.id}\[0\] wrote an item on output port 'output'.*pickle"):
        aiod4p.run(graph, 100, mapping="ray", workers=2)


def test_an_unpicklable_result_names_the_pe_and_port(ray_cluster: RayCluster) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", emit := wf.EmitLock(), "input")
    with pytest.raises(TransportError, match=rf"PE {emit.id} wrote a result on output port 'output'.*lock"):
        aiod4p.run(graph, 100, mapping="ray", workers=2)


FLOW = TIMES10_FLOW


def test_cli_joins_the_cluster_at_address_and_ships_the_workflow_file(ray_cluster: RayCluster, tmp_path: Path) -> None:
    flow = tmp_path / "my-flow.py"  # not importable by name: the workers load it from its path
    flow.write_text(FLOW)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = ["run", str(flow), "--mapping", "ray", "-n", "2", "--address", ray_cluster.address]
    process = aiod4p_cli(*command, "-i", "50", "--results", "-", "-q", env=env, cwd=tmp_path, timeout=55)
    assert process.returncode == 0, process.stderr
    values = sorted(int(line.split('"data": ')[1].rstrip("}")) for line in process.stdout.splitlines())
    assert values == [10 * i for i in range(1, 51)]


def test_cli_workers_see_the_command_line_in_sys_argv(ray_cluster: RayCluster, tmp_path: Path) -> None:
    """A workflow reading ``sys.argv`` at import (as dispel4py workflows do) reads the command line in the actors
    too, as in multi's workers; it read the Ray worker process's arguments, and its PEs computed with another value."""
    flow = tmp_path / "flow.py"
    flow.write_text(
        "import sys\n\nFACTOR = int(sys.argv[-1]) if sys.argv[-1].isdigit() else -1\n\n"
        + numbers_flow("class Scale(IterativePE):\n    def process_item(self, item):\n        return FACTOR * item\n")
    )
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = ["run", str(flow), "--mapping", "ray", "-n", "2", "--address", ray_cluster.address]
    process = aiod4p_cli(*command, "--results", "-", "-q", "-i", "3", env=env, cwd=tmp_path, timeout=55)
    assert process.returncode == 0, process.stderr
    assert sorted(json.loads(line)["data"] for line in process.stdout.splitlines()) == [3, 6, 9]


def test_cli_workers_open_relative_paths_in_the_working_directory(ray_cluster: RayCluster, tmp_path: Path) -> None:
    """A PE opening a relative path finds the file where the command was run, as on multi; the actors ran in the
    cluster's working directory (where ``ray start`` ran), and the run failed: no such file there."""
    flow = tmp_path / "flow.py"
    flow.write_text(
        numbers_flow(
            "class Scale(IterativePE):\n    def process_item(self, item):\n"
            "        with open('factor.txt') as factor:\n            return int(factor.read()) * item\n"
        )
    )
    (tmp_path / "factor.txt").write_text("7")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = ["run", str(flow), "--mapping", "ray", "-n", "2", "--address", ray_cluster.address]
    process = aiod4p_cli(*command, "--results", "-", "-q", "-i", "3", env=env, cwd=tmp_path, timeout=55)
    assert process.returncode == 0, process.stderr
    assert sorted(json.loads(line)["data"] for line in process.stdout.splitlines()) == [7, 14, 21]


def test_a_runtime_env_working_dir_stays_the_workers_working_directory(
    ray_cluster: RayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``working_dir`` in the runtime environment is where relative paths are, not the driver's directory."""
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "factor.txt").write_text("5")
    (tmp_path / "factor.txt").write_text("7")
    monkeypatch.chdir(tmp_path)
    mapping = RayMapping(runtime_env={"working_dir": str(tmp_path / "shipped")})
    results = aiod4p.run(_chain(ReadsFactor()), 3, mapping=mapping, workers=2)
    assert sorted(results.data()) == [0, 10, 20]


def test_classes_import_from_a_relative_sys_path_entry(
    ray_cluster: RayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script's ``sys.path.insert(0, "lib")`` (or a notebook's ``sys.path.append("..")``) reaches the workers as on
    multi: they checked the entry before moving to the driver's directory, did not find it in the cluster's, and
    failed: ``Ray worker actor 0 cannot load the workflow (ModuleNotFoundError: No module named ...)``."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "relative_entry_pes.py").write_text(
        "from aiod4p import IterativePE\n\nclass Triple(IterativePE):\n"
        "    def process_item(self, item):\n        return 3 * item\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["lib", *sys.path])
    monkeypatch.delitem(sys.modules, "relative_entry_pes", raising=False)
    pes = importlib.import_module("relative_entry_pes")
    results = aiod4p.run(_chain(pes.Triple()), 3, mapping="ray", workers=2)
    assert sorted(results.data()) == [0, 6, 12]


# Each of its results: the greeting the workers' environment has, and the contents of ./note.txt where they run.
GREETING_FLOW = numbers_flow(
    """
    import os

    class Greeting(IterativePE):
        def process_item(self, item):
            note = open("note.txt").read() if os.path.exists("note.txt") else None
            return os.environ.get("AIOD4P_TEST_GREETING"), note
    """
)


def test_cli_runtime_env_reaches_the_workers(ray_cluster: RayCluster, tmp_path: Path) -> None:
    # aiod4p run had no way to give the workers a runtime environment: on a cluster, the driver's environment
    # variables do not reach them.
    (tmp_path / "greeting_flow.py").write_text(GREETING_FLOW)
    (tmp_path / "env.yaml").write_text("env_vars:\n  AIOD4P_TEST_GREETING: from the file  # a comment\n")
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "note.txt").write_text("shipped")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    common = ["run", "greeting_flow", "-m", "ray", "-n", "2", "--address", ray_cluster.address, "--results", "-", "-q"]
    given = {
        "--runtime-env-json": [*common, "--runtime-env-json", '{"env_vars": {"AIOD4P_TEST_GREETING": "hello"}}'],
        "--runtime-env, --working-dir": [*common, "--runtime-env", "env.yaml", "--working-dir", "shipped"],
    }
    seen = {}
    for how, command in given.items():
        process = aiod4p_cli(*command, "-i", "4", env=env, cwd=tmp_path, timeout=55)
        assert process.returncode == 0, process.stderr
        seen[how] = {tuple(json.loads(line)["data"]) for line in process.stdout.splitlines()}
    assert seen == {
        "--runtime-env-json": {("hello", None)},
        "--runtime-env, --working-dir": {("from the file", "shipped")},
    }


def test_cli_runtime_env_field_ray_does_not_know_is_warned_of(ray_cluster: RayCluster, tmp_path: Path) -> None:
    # Ray takes an unknown field for a plugin's and ignores it: env_var for env_vars, and the variables were lost.
    (tmp_path / "greeting_flow.py").write_text(GREETING_FLOW)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    typo = '{"env_var": {"AIOD4P_TEST_GREETING": "hello"}}'
    command = ["run", "greeting_flow", "-m", "ray", "-n", "1", "--address", ray_cluster.address, "-i", "1"]
    process = aiod4p_cli(*command, "--runtime-env-json", typo, env=env, cwd=tmp_path, timeout=55)
    assert process.returncode == 0, process.stderr
    assert "WARNING aiod4p.ray: the runtime environment's field 'env_var' is none of Ray's (conda, " in process.stderr
    assert "env_vars, " in process.stderr


def test_a_runtime_env_applies_when_ray_was_joined_before_the_run(ray_cluster: RayCluster) -> None:
    # The mapping gave its runtime_env to ray.init only: joined already (a notebook's ray.init()), it was ignored.
    graph = WorkflowGraph()
    graph.connect(wf.Range(4), "output", reads := ReadsEnvironment(), "input")
    ray.init(address=ray_cluster.address, runtime_env={"env_vars": {"AIOD4P_TEST_OTHER": "1"}})
    try:
        environment = {"env_vars": {"AIOD4P_TEST_GREETING": "hello"}}
        results = aiod4p.run(graph, 1, mapping=RayMapping(runtime_env=environment), workers=2)
        assert set(results.data(reads.id)) == {"hello"}
        with pytest.raises(
            ValueError,
            match=r"runtime_env \(fields working_dir\): \. is not a valid URI\. .*local paths goes to ray\.init\(",
        ):
            aiod4p.run(graph, 1, mapping=RayMapping(runtime_env={"working_dir": "."}), workers=2)
    finally:
        ray.shutdown()


_NOT_A_MAPPING = (
    "Ray's runtime environment is a mapping of fields (env_vars, pip, working_dir, py_modules, ...), and this is "
)


def test_a_runtime_env_ray_refuses_fails_the_run_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's own words only ("/nonexistent is not a valid path."), naming neither the runtime environment nor Ray.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # checked before a local Ray would start: none starts
    graph = WorkflowGraph()
    graph.connect(wf.Range(4), "output", ReadsEnvironment(), "input")
    # Its fields only, not their values: env_vars may hold a token.
    mapping = RayMapping(runtime_env={"working_dir": "/nonexistent", "env_vars": {"API_TOKEN": "s3cr3t"}})
    with pytest.raises(ValueError) as raised:
        aiod4p.run(graph, 1, mapping=mapping, workers=1)
    assert str(raised.value) == (
        "the Ray runtime environment (fields working_dir, env_vars): /nonexistent is not a valid path."
    )
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            ["--runtime-env-json", '{"env_vars": {"A": "1"}'],
            "--runtime-env-json: not JSON: Expecting ',' delimiter: line 1 column 24 (char 23)",
        ),
        (
            ["--runtime-env-json", "[]"],
            f"--runtime-env-json: {_NOT_A_MAPPING}a list",
        ),
        (
            ["--runtime-env-json", '{"env_vars": {"A": 1}}'],
            "--runtime-env-json: runtime_env['env_vars'] must be of type Dict[str, str], but the value 1 is of type"
            " <class 'int'>",
        ),
        (["--runtime-env", "missing.yaml"], "--runtime-env missing.yaml: No such file or directory"),
        (
            ["--runtime-env", "empty.yaml"],
            f"--runtime-env empty.yaml: {_NOT_A_MAPPING}empty",
        ),
        (
            ["--runtime-env", "bad.yaml"],
            '--runtime-env bad.yaml: not YAML: while parsing a flow sequence\n  in "bad.yaml", line 2, column 6',
        ),
        (["--working-dir", "missing"], "--working-dir: missing is not a valid path"),
        (["--runtime-env-json", "{}", "-m", "multi"], "--runtime-env-json applies to --mapping ray only"),
        (["--working-dir", ".", "-m", "simple"], "--working-dir applies to --mapping ray only"),
    ],
    ids=["json", "json-list", "ray-refuses", "no-file", "empty-file", "yaml", "no-working-dir", "multi", "simple"],
)
def test_a_bad_runtime_env_is_a_usage_error_naming_the_option(tmp_path: Path, options: list[str], error: str) -> None:
    (tmp_path / "flow.py").write_text(FLOW)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bad.yaml").write_text("env_vars:\n  A: [1\n")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    process = aiod4p_cli("run", "flow.py", "-m", "ray", *options, env=env, cwd=tmp_path, timeout=55)
    assert process.returncode == 2, process.stderr
    assert process.stderr.startswith(f"aiod4p: error: {error}"), process.stderr


def test_runtime_env_and_runtime_env_json_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "flow.py").write_text(FLOW)
    process = aiod4p_cli("run", "flow.py", "--runtime-env", "a.yaml", "--runtime-env-json", "{}", cwd=tmp_path)
    assert process.returncode == 2
    assert "argument --runtime-env-json: not allowed with argument --runtime-env" in process.stderr


# A workflow whose PE imports a module that only the driver has: the driver (AIOD4P_TEST_DRIVER set, which the
# cluster's actors do not see) writes it, imports it and removes it.
ONLY_HERE_FLOW = numbers_flow(
    """
    import os, shutil, sys, tempfile

    if os.environ.get("AIOD4P_TEST_DRIVER"):
        where = tempfile.mkdtemp()
        with open(os.path.join(where, "only_here.py"), "w") as module:
            module.write("def shout(text):\\n    return str(text).upper()\\n")
        sys.path.insert(0, where)
        import only_here
        shutil.rmtree(where)
    else:
        import only_here

    class Shout(IterativePE):
        def process_item(self, item):
            return only_here.shout(item)
    """
)


def test_a_module_only_the_driver_has_fails_the_run_saying_how_to_ship_it(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    # The error said only "its PE classes must be importable there", and not how, on Ray, they are made so.
    (tmp_path / "only_here_flow.py").write_text(ONLY_HERE_FLOW)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = ["run", "only_here_flow", "-m", "ray", "-n", "1", "--address", ray_cluster.address, "-i", "1"]
    process = aiod4p_cli(*command, env={**env, "AIOD4P_TEST_DRIVER": "1"}, cwd=tmp_path, timeout=55)
    assert (process.returncode, process.stderr) == (
        1,
        "aiod4p: error: Ray worker actor 0 cannot load the workflow (ModuleNotFoundError: No module named"
        " 'only_here'); its PE classes must be importable there, on its node: install what they import on the"
        " cluster's nodes, or ship the directories of the workflow's own modules (aiod4p run --working-dir DIR, or"
        " a runtime environment's py_modules)\n",
    )


def test_cli_address_is_for_the_ray_mapping_only(tmp_path: Path) -> None:
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW)
    process = aiod4p_cli("run", str(flow), "--mapping", "multi", "--address", "127.0.0.1:1", timeout=55)
    assert process.returncode == 2
    assert "--address applies to --mapping ray only" in process.stderr


def test_an_empty_address_is_a_usage_error(tmp_path: Path) -> None:
    """`--address "$HEAD"` with HEAD unset: the run failed with a KeyError traceback (RAY_ADDRESS unset), or joined
    the cluster of RAY_ADDRESS though an address was given."""
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW)
    process = aiod4p_cli("run", str(flow), "--mapping", "ray", "--address", "", timeout=55)
    assert (process.returncode, process.stderr) == (
        2,
        "aiod4p: error: the Ray address (--address) is empty (''): give the cluster's (auto, HOST:PORT or"
        " ray://HOST:10001), or none to use RAY_ADDRESS or start a local Ray\n",
    )


@contextlib.contextmanager
def _not_ray_ports() -> Iterator[dict[str, str]]:
    """Addresses that are no Ray head: a port that refuses connections, one that closes them, an unknown host."""
    with socket.socket() as refusing, socket.create_server(("127.0.0.1", 0)) as closing:
        refusing.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused

        def close_each() -> None:
            with contextlib.suppress(OSError):
                while True:
                    closing.accept()[0].close()

        closer = threading.Thread(target=close_each, daemon=True)
        closer.start()
        try:
            yield {
                "nothing listens there": f"127.0.0.1:{refusing.getsockname()[1]}",
                "that port is not a Ray head's": f"127.0.0.1:{closing.getsockname()[1]}",
                "unknown host 'no-such-host.invalid'": "no-such-host.invalid:6379",
            }
        finally:
            # Its accept() ends with the shutdown (a close would leave it waiting): a thread left in the test
            # process made every later multi run of the session spawn its workers.
            closing.shutdown(socket.SHUT_RDWR)
            closer.join()


def test_an_address_with_no_ray_head_fails_at_once_saying_why(tmp_path: Path) -> None:
    # ray.init retried each of them for about a quarter of an hour, printing Ray's connection warnings.
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with _not_ray_ports() as addresses:
        for why, address in addresses.items():
            process = aiod4p_cli("run", str(flow), "-m", "ray", "--address", address, env=env, timeout=30)
            assert process.returncode == 1, process.stderr
            assert process.stderr.startswith(f"aiod4p: error: cannot join the Ray cluster at {address}: {why}")
            assert process.stderr.count("\n") == 1, process.stderr


_SETTINGS = bytes.fromhex("000000040000000000")  # an HTTP/2 server's first frame: its (default) settings


# What a head started with RAY_AUTH_MODE=token answers a call without its token: the call's headers, with gRPC's
# status 16 (UNAUTHENTICATED), and the end of the call (as Ray 2.60's GCS sends them).
def _ended_call(headers: bytes) -> bytes:
    """An HTTP/2 HEADERS frame that answers stream 1 with ``headers`` (HPACK-coded) and ends it."""
    return len(headers).to_bytes(3, "big") + bytes([1, 5]) + (1).to_bytes(4, "big") + headers


_UNAUTHENTICATED_REPLY = _ended_call(
    b"\x88@\x0ccontent-type\x10application/grpc\x00\x0bgrpc-status\x0216"
    b"\x00\x0cgrpc-message>InvalidAuthToken: Authentication token is missing or incorrect"
)
# What another gRPC service answers (a raylet's port): status 12, UNIMPLEMENTED
_UNIMPLEMENTED_REPLY = _ended_call(b"\x88@\x0ccontent-type\x10application/grpc@\x0bgrpc-status\x0212")
# What an HTTP/2 server that is no gRPC one answers (a proxy): :status 404 (HPACK's static entry 13), and the end
_NOT_FOUND_REPLY = _ended_call(b"\x8d")


@contextlib.contextmanager
def _answering(reply: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """The address of a fake HTTP/2 server that answers every call with ``reply`` (after its settings), and the
    requests it received."""
    requests: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as server:

        def answer_each() -> None:
            with contextlib.suppress(OSError):
                while True:
                    connection = server.accept()[0]
                    with connection:
                        request = b""
                        while not request.endswith(bytes.fromhex("000005000100000001") + bytes(5)):
                            if not (piece := connection.recv(65536)):
                                break
                            request += piece
                        requests.append(request)
                        connection.sendall(_SETTINGS + reply)

        answerer = threading.Thread(target=answer_each, daemon=True)
        answerer.start()
        try:
            yield f"127.0.0.1:{server.getsockname()[1]}", requests
        finally:
            server.shutdown(socket.SHUT_RDWR)  # ends the accept
            answerer.join()


def test_a_port_of_another_service_is_no_head_at_once(tmp_path: Path) -> None:
    # Another gRPC service's port (a raylet's), or an HTTP/2 server's that is no gRPC one, passed the probe: Ray
    # retried each for 20 s, then the run failed with "Failed to connect to Ray cluster at OTHER-IP:PORT"; a
    # dashboard's address (as `ray job submit` takes) failed saying RAY_ADDRESS was set to it, when it was not.
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    for reply in (_UNIMPLEMENTED_REPLY, _NOT_FOUND_REPLY):
        with _answering(reply) as (address, _):
            process = aiod4p_cli("run", str(flow), "-m", "ray", "--address", address, env=env, timeout=30)
        assert (process.returncode, process.stderr) == (
            1,
            f"aiod4p: error: cannot join the Ray cluster at {address}: that port is not a Ray head's (its GCS port,"
            " 6379 unless `ray start --head --port` chose another)\n",
        )
    process = aiod4p_cli("run", str(flow), "-m", "ray", "--address", "http://127.0.0.1:8265", env=env, timeout=30)
    assert (process.returncode, process.stderr) == (
        1,
        "aiod4p: error: cannot join the Ray cluster at http://127.0.0.1:8265: that is an HTTP address (the head's"
        " dashboard, which `ray job submit` takes); the run joins the head's GCS: HOST:PORT (6379 unless `ray start"
        " --head --port` chose another), or auto on a node of the cluster\n",
    )


@pytest.mark.parametrize(
    ("auth", "why"),
    [
        (
            {"RAY_AUTH_MODE": "disabled"},
            "the cluster requires token authentication, and this process sends no token (RAY_AUTH_MODE is not"
            " 'token'): set RAY_AUTH_MODE=token, and the cluster's token in RAY_AUTH_TOKEN or in a file named by"
            " RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token)",
        ),
        (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-clusters-token-0123456789"},
            "the cluster rejected this process's authentication token (RAY_AUTH_TOKEN, else the file named by"
            " RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token): give the cluster's token there",
        ),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}, "RAY_AUTH_TOKEN_PATH is set but"),
    ],
    ids=["no-token", "wrong-token", "token-file-missing"],
)
def test_a_head_requiring_a_token_this_process_lacks_fails_at_once_saying_so(
    tmp_path: Path, auth: dict[str, str], why: str
) -> None:
    # Ray retried the call for 20 s, printing "Unauthenticated" warnings, then the run failed with "cannot join the
    # Ray cluster at HOST:PORT: Failed to connect to Ray cluster at OTHER-IP:PORT", saying nothing of the token; with
    # RAY_AUTH_MODE=token and no token, Ray's AuthenticationError ended aiod4p with a traceback.
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    with _answering(_UNAUTHENTICATED_REPLY) as (address, requests):
        process = aiod4p_cli("run", str(flow), "-m", "ray", "--address", address, env={**env, **auth}, timeout=30)
    assert process.returncode == 1, process.stderr
    assert process.stderr.startswith(f"aiod4p: error: cannot join the Ray cluster at {address}: {why}"), process.stderr
    assert process.stderr.count("\n") == 1, process.stderr
    token = auth.get("RAY_AUTH_TOKEN")
    assert [token is not None and f"Bearer {token}".encode() in request for request in requests] == [
        token is not None
    ] * len(requests)


def test_a_signal_while_ray_init_waits_for_a_head_that_does_not_answer_aborts_at_once(tmp_path: Path) -> None:
    # A head whose GCS takes connections but answers no call (overloaded, or stopping): the signal ended
    # start-up, then the process waited for the thread still in ray.init, for minutes.
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    connections: queue.Queue[socket.socket] = queue.Queue()
    # Every address: ray.init connects to this machine's address for 127.0.0.1.
    silent = socket.create_server(("0.0.0.0", 0))

    def settle_then_keep_silent() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection = silent.accept()[0]
                connections.put(connection)
                connection.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # an HTTP/2 SETTINGS frame

    server = threading.Thread(target=settle_then_keep_silent)
    server.start()
    run = aiod4p_process("run", str(flow), "-m", "ray", "--address", f"127.0.0.1:{silent.getsockname()[1]}", env=env)
    accepted = []
    try:
        accepted.append(connections.get(timeout=30))  # the mapping's probe
        accepted.append(connections.get(timeout=30))  # ray.init
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        silent.shutdown(socket.SHUT_RDWR)  # ends the accept
        silent.close()
        server.join()
        while not connections.empty():
            accepted.append(connections.get())
        for connection in accepted:
            connection.close()
    assert run.returncode == 130 and "aborted by SIGTERM while starting the actors" in err, err


# -- a local Ray, started by the run (a laptop: no cluster, no RAY_ADDRESS) --------------------------

# Where a service's process imports Ray's core (its C extension) as it starts a run on the ray mapping.
EMBEDS_A_RAY_RUN = """
import asyncio, sys, threading
import aiod4p, workflows

imported_in = []

class NotesRaysImport:
    def find_spec(self, name, path=None, target=None):
        if name == "ray._raylet":
            imported_in.append(threading.current_thread().name)
        return None  # found by the finders after this one

sys.meta_path.insert(0, NotesRaysImport())
graph, _ = workflows.pipeline(2)
assert len(asyncio.run(aiod4p.run_async(graph, 10, mapping="ray", workers=2))) == 10
print(*imported_in)
"""


def test_a_run_imports_ray_off_the_event_loop(ray_cluster: RayCluster) -> None:
    # Resolving mapping="ray" imported Ray on the loop: the host's tasks waited 0.25-0.5 s.
    done = subprocess.run(
        [sys.executable, "-c", EMBEDS_A_RAY_RUN],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() and "MainThread" not in done.stdout.split(), done.stdout


@pytest.mark.asyncio
async def test_ray_s_calls_that_start_and_stop_a_run_are_made_off_the_event_loop(
    ray_cluster: RayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread, on_loop = threading.current_thread(), []

    def noted(what: str, call: Any) -> Any:
        def noting(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is loop_thread:
                on_loop.append(what)
            return call(*args, **kwargs)

        return noting

    for name in ("init", "put", "kill"):
        monkeypatch.setattr(ray, name, noted(f"ray.{name}", getattr(ray, name)))
    monkeypatch.setattr(ray.actor.ActorClass, "_remote", noted("creating an actor", ray.actor.ActorClass._remote))
    async with asyncio.timeout(120):
        results = await aiod4p.run_async(_chain(wf.Double()), 10, mapping="ray", workers=2)
    assert sorted(results.data()) == [4 * i for i in range(10)]
    assert on_loop == []


@pytest.mark.asyncio
async def test_killing_the_actors_cut_short_leaves_no_failure_unretrieved() -> None:
    # A signal during start-up cancels the run while it kills its actors: their calls, failed by the kill,
    # were logged as "Future exception was never retrieved", each with Ray's message, after "aborted by SIGINT".
    from aiod4p.mappings._ray_run import RayRun

    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    run = RayRun(RayMapping(), plan=None)  # type: ignore[arg-type]  # killing needs no plan
    failed: asyncio.Future[None] = loop.create_future()
    failed.set_exception(WorkerDied("killed by ray.kill"))
    run.alive = [failed, loop.create_future()]  # the other one's actor is not gone yet
    killing = [asyncio.ensure_future(run._kill_actors())]
    run._remove_actors = lambda: loop.call_soon_threadsafe(killing[0].cancel)  # type: ignore[method-assign]
    async with asyncio.timeout(10):
        await asyncio.wait(killing)
    assert killing[0].cancelled()
    del failed, run
    killing.clear()  # with the cancelled task's frames, which hold the run
    gc.collect()
    assert unretrieved == []


WITHOUT_CLUSTER = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}


def _python_beside(script: str, modules: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -c SCRIPT`` with the modules of directory ``modules`` importable, starting a local Ray of its own."""
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**WITHOUT_CLUSTER, "PYTHONPATH": f"{ROOT}:{modules}"},
        timeout=timeout,
    )


@contextlib.contextmanager
def local_ray_wordcount() -> Iterator[subprocess.Popen[str]]:
    """``aiod4p run examples/wordcount.py -m ray --results -`` in a session of its own, starting its own Ray;
    whatever of it is left running when the block ends is killed."""
    process = aiod4p_process("run", "examples/wordcount.py", "-m", "ray", "--results", "-", env=WITHOUT_CLUSTER)
    try:
        with reaped(process):
            yield process
    finally:
        for pid in session_processes([process.pid]):
            os.kill(pid, signal.SIGKILL)


def test_a_local_ray_started_by_the_run_ends_with_it() -> None:
    simple = aiod4p_cli("run", "examples/wordcount.py", "-m", "simple", "--results", "-")
    with local_ray_wordcount() as run:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert "SIGTERM handler is not set" not in err  # Ray's notice on ray.init off the main thread
        assert sorted(out.splitlines()) == sorted(simple.stdout.splitlines())
        assert wait_gone(session_processes([run.pid]), timeout=30) == []


def test_a_sigint_while_the_local_ray_starts_leaves_none_of_it() -> None:
    with local_ray_wordcount() as run:
        deadline = time.monotonic() + 60
        while not any(_is_raylet(pid) for pid in session_processes([run.pid])):  # Ray is starting
            assert run.poll() is None and time.monotonic() < deadline, "no raylet started"
            time.sleep(0.02)  # ok-sleep: polling for a process to appear, with a deadline
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
        assert run.returncode == 130 and "aborted by SIGINT while starting the actors" in err, err
        left = wait_gone(session_processes([run.pid]), timeout=30)
        assert left == [], [_described(pid) for pid in left]


def test_a_second_signal_while_the_local_ray_starts_leaves_none_of_it() -> None:
    # The second signal ended the command at once, past the thread still starting Ray: its GCS and raylet died
    # with the process, but the agents the raylet had started ran on, orphaned, for a minute or more.
    with local_ray_wordcount() as run:
        deadline = time.monotonic() + 60
        while not any(_is_agent(pid) for pid in session_processes([run.pid])):  # Ray is starting its agents
            assert run.poll() is None and time.monotonic() < deadline, "no agent of a raylet started"
            time.sleep(0.02)  # ok-sleep: polling for a process to appear, with a deadline
        run.send_signal(signal.SIGINT)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
        assert run.returncode == 130 and "aborted by SIG" in err, err
        left = wait_gone(session_processes([run.pid]), timeout=20)  # an orphaned agent gives up after 60 s
        assert left == [], [_described(pid) for pid in left]


CONCURRENT_RUNS = """
from concurrent.futures import ThreadPoolExecutor
import aiod4p
from aiod4p import IterativePE, ProducerPE, WorkflowGraph

class Numbers(ProducerPE):
    def produce(self):
        yield from range(1000)

class Times(IterativePE):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def process_item(self, x):
        return self.k * x

def total(k):
    graph = WorkflowGraph()
    graph.connect(Numbers(), "output", Times(k), "input")
    return sum(aiod4p.run(graph, mapping="ray", workers=2).data())

with ThreadPoolExecutor(3) as pool:
    print(list(pool.map(total, [1, 2, 3, 4])))
"""


@pytest.mark.timeout(240)
def test_runs_in_threads_share_the_local_ray_that_the_first_started() -> None:
    """Runs from several threads (a notebook's thread pool over parameters) share one local Ray: it lives until
    the last ends, though the thread and loop of the run that started it end first."""
    result = subprocess.run(
        [sys.executable, "-c", CONCURRENT_RUNS], capture_output=True, text=True, timeout=200, env=WITHOUT_CLUSTER
    )
    assert (result.returncode, result.stdout) == (0, f"{[k * sum(range(1000)) for k in (1, 2, 3, 4)]}\n"), result.stderr


def test_a_killed_local_rays_orphans_are_reaped_not_left_as_zombies() -> None:
    """A process that ran a local Ray (a notebook's kernel) adopts what its raylet leaves behind (child subreaper);
    those killed with the raylet (its idle workers) are reaped, not left zombies for as long as the kernel lives."""
    adopt_orphans(True)
    try:  # a shell (a raylet) that starts a worker and ends: the worker comes back to this process
        starts_a_worker = "sleep 60 >/dev/null 2>&1 & echo $!"  # ok-sleep: a stand-in worker process, killed below
        shell = subprocess.run(["sh", "-c", starts_a_worker], capture_output=True, text=True, check=True)
        orphan = int(shell.stdout)
        fds = pidfds({orphan})
        kill_left(fds, 0.0)
        reap(fds, LEFTOVER_GRACE)
        for fd in fds:
            os.close(fd)
        assert not Path(f"/proc/{orphan}").exists()  # a zombie still has its entry
    finally:
        adopt_orphans(False)


def test_a_local_ray_started_by_the_run_has_room_for_its_workers(tmp_path: Path) -> None:
    """A laptop: `-m ray -n N` with more workers than CPUs runs one per CPU and says so, as multi does;
    `--oversubscribe` (and the Python API) starts them all, on a local Ray with room for them. Neither waits a
    minute for actors that Ray could never start; resources no local Ray has fail at once, naming them."""
    drawing = tmp_path / "flow.dot"
    graph = ("graph", "examples/wordcount.py", "-m", "ray", "-n", "3", "-o", str(drawing))
    capped = aiod4p_cli(*graph, one_cpu=True, env=WITHOUT_CLUSTER)
    assert capped.returncode == 0 and "so 1 actor (" in capped.stderr, capped.stderr
    flow = tmp_path / "times10.py"
    flow.write_text(TIMES10_FLOW)
    run = ("run", str(flow), "-m", "ray", "-n", "2", "--oversubscribe", "-i", "5", "--results", "-", "-q")
    stats = ("--stats-json", str(tmp_path / "stats.json"))
    # Where `ray start` ran (here: its address file, left by a cluster that was killed), the run joined that
    # cluster (and failed: "num_cpus ... must not be provided"); it starts its own.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
        env = {**WITHOUT_CLUSTER, "RAY_TMPDIR": str(ray_tmp)}
        done = aiod4p_cli(*run, *stats, env=env, timeout=45, one_cpu=True)  # 2 workers on 1 CPU
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # -q: Ray's own notes too ("Token authentication is enabled ..." was shown)
    assert sorted(json.loads(line)["data"] for line in done.stdout.splitlines()) == [10, 20, 30, 40, 50]
    assert json.loads((tmp_path / "stats.json").read_text())["workers"] == 2
    script = (
        "import aiod4p, times10\n"
        "from aiod4p.mappings.ray import RayMapping\n"
        "aiod4p.run(times10.graph, 5, mapping=RayMapping(resources={'gpu_host': 1}), workers=1)\n"
    )
    missing = _python_beside(script, tmp_path, timeout=45)
    assert missing.returncode == 1
    assert (
        "MappingUnavailable: the local Ray started for the run cannot start 1 worker actors of 1 CPU and"
        " {'gpu_host': 1} each: it has {" in missing.stderr
    ), missing.stderr


def test_a_sigterm_handler_outlives_a_local_ray_started_by_a_run(tmp_path: Path) -> None:
    """Ray takes over SIGTERM (and SIGSEGV, ...) below Python while connected, and sets the default action when
    it disconnects: after a run had started and stopped its local Ray, a SIGTERM killed the process, with the
    handler Python still believed in (aiod4p run's drain, after a restart with --restarts; a service's)."""
    (tmp_path / "times10.py").write_text(TIMES10_FLOW)
    script = (
        "import os, signal, aiod4p, times10\n"
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))\n"
        "aiod4p.run(times10.graph, 2, mapping='ray', workers=1)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('handled' if got else 'not handled')\n"
    )
    done = _python_beside(script, tmp_path, timeout=120)
    assert (done.returncode, done.stdout) == (0, "handled\n"), done.stderr


RESTARTED_FLOW = numbers_flow(
    """
    import os, signal
    from pathlib import Path

    class DiesOnce(IterativePE):
        def __init__(self, folder):
            super().__init__()
            self.folder = folder

        def preprocess(self):
            (Path(self.folder) / f"raylet-{os.getppid()}").touch()

        def process_item(self, item):
            died = Path(self.folder) / "died"
            if item == 100 and not died.exists():
                died.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return item
    """
).replace("DiesOnce()", "DiesOnce(FOLDER)")


@pytest.mark.timeout(240)
def test_restarts_of_a_run_on_a_local_ray_start_it_once(tmp_path: Path) -> None:
    """Each restart under `restarts` (`--restarts`) closed the connection to the local Ray the run had started,
    stopping that Ray, and started a new one: 7-8 s a restart, against 1 s on multi. The attempts of a run share
    the first one's Ray, stopped once the run ends."""
    (tmp_path / "restarted.py").write_text(RESTARTED_FLOW.replace("FOLDER", repr(str(tmp_path))))
    script = (
        "import aiod4p, restarted\n"
        "from aiod4p.mappings.ray import RayMapping\n"
        "mapping = RayMapping()\n"
        f"mapping.checkpointing = aiod4p.Checkpointing({str(tmp_path / 'ck')!r}, interval=0.05, restarts=1)\n"
        "print(sorted(aiod4p.run(restarted.graph, 300, mapping=mapping, workers=1).data()) == list(range(1, 301)))\n"
    )
    done = _python_beside(script, tmp_path, timeout=200)
    assert (done.returncode, done.stdout.splitlines()[-1:]) == (0, ["True"]), done.stderr  # after Ray's notes
    assert "restart 1 of 1 after: worker actor 0" in done.stderr, done.stderr
    assert (tmp_path / "died").exists()
    assert len(list(tmp_path.glob("raylet-*"))) == 1, list(tmp_path.glob("raylet-*"))


DRAINED_WHILE_RAY_STARTS = """
import asyncio, aiod4p, times10

async def drained_after(delay):
    run = aiod4p.start(times10.graph, 100_000, mapping="ray", workers=2)
    asyncio.get_running_loop().call_later(delay, run.drain)
    return len([record async for record in run])

print([asyncio.run(drained_after(delay)) for delay in (0.001, 0.01)])
"""


@pytest.mark.timeout(240)
def test_a_drain_while_a_local_ray_starts_lets_nothing_run(tmp_path: Path) -> None:
    """`run.drain()` called before the workers started lets nothing run, on every mapping; on ray, called 1-10 ms
    after the run started (while the local Ray started), it let 15 results through: the job had been shipped
    undrained before Ray was joined, and the actors produced until the `Drain` message reached them."""
    (tmp_path / "times10.py").write_text(TIMES10_FLOW)
    done = _python_beside(DRAINED_WHILE_RAY_STARTS, tmp_path, timeout=200)
    assert (done.returncode, done.stdout.splitlines()[-1:]) == (0, ["[0, 0]"]), done.stderr


SLOW_END_FLOW = numbers_flow(
    """
    import time

    class SlowEnd(IterativePE):
        def process_item(self, item):
            return item

        def postprocess(self):
            time.sleep(4)  # ok-sleep: a drain longer than Ray's crash reporter gives a signal handler (3 s)
            self.write("output", "done")
    """
)


def test_a_sigterm_drains_a_ray_run_however_long_the_drain_takes(tmp_path: Path) -> None:
    """Ray's crash reporter, which took SIGTERM in the driver, printed a stack of addresses and armed an alarm
    that aborted the process (SIGABRT) 3 s later: a drain that took longer lost every result it was finishing."""
    flow = tmp_path / "slow_end.py"
    flow.write_text(SLOW_END_FLOW)
    args = ("run", str(flow), "-m", "ray", "-n", "1", "-i", "1000000", "--results", "-")
    run = aiod4p_process(*args, env=WITHOUT_CLUSTER)
    try:
        assert run.stdout is not None
        assert json.loads(run.stdout.readline())["data"] == 1  # the run is under way
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
    assert run.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["data"] == "done"
    assert "interrupted by SIGTERM: drained" in err and "SIGTERM received" not in err, err


def _described(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} (parent {parent}): {command[:200]}"


def _is_agent(pid: int) -> bool:
    """Whether process ``pid`` is one of the agents a raylet starts (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``,
    named so once started, ``.../dashboard/agent.py`` and ``.../runtime_env/agent/main.py`` before)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    program = command.split(b"\0")[:3]  # the process's title, or the interpreter, its options and the script
    return any(part.endswith((b"Agent", b"/dashboard/agent.py", b"/runtime_env/agent/main.py")) for part in program)


def _is_raylet(pid: int) -> bool:
    try:
        return "raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


SIGTERM_AFTER_RAY = """
import os, signal
from unittest import mock
import aiod4p.mappings._ray_run as ray_run
connection = ray_run._Connection()
with (
    mock.patch.object(ray_run.ray, "is_initialized", lambda: False),
    mock.patch.object(ray_run.ray, "shutdown", lambda: None),
):
    connection.acquire(lambda: True)
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    connection.release()
os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before kill returns
print(received)
"""


def test_a_sigterm_handler_installed_while_ray_was_joined_outlives_the_disconnection() -> None:
    """The actions saved before Ray was joined were all put back when it was left: a SIGTERM handler that the
    program installed meanwhile (a service, after its first run) was replaced by the default action, and the next
    SIGTERM killed the process undrained while Python still named the handler."""
    done = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_RAY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"[{int(signal.SIGTERM)}]", done


A_PROCESS_STARTED_WHILE_RAY_STARTS = """
import os, signal
from unittest import mock
import aiod4p.mappings._ray_run as ray_run
started = []
def connect():
    started.append(os.posix_spawnp("sleep", ["sleep", "60"], os.environ))  # ok-sleep: another run's worker, say
    return True
connection = ray_run._Connection()
with (
    mock.patch.object(ray_run.ray, "is_initialized", lambda: False),
    mock.patch.object(ray_run.ray, "shutdown", lambda: None),
):
    connection.acquire(connect)
    connection.release()
alive = os.waitpid(started[0], os.WNOHANG) == (0, 0)
os.kill(started[0], signal.SIGKILL)
os.waitpid(started[0], 0)
print(alive)
"""


def test_leaving_a_local_ray_stops_only_rays_processes() -> None:
    """Every child that appeared while a local Ray started was taken for Ray's, and killed when it stopped: a
    process that another thread's run started meanwhile (a multi run's worker) too."""
    done = subprocess.run(
        [sys.executable, "-c", A_PROCESS_STARTED_WHILE_RAY_STARTS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "True", done


def test_processes_left_are_waited_for_whatever_their_pidfds_numbers() -> None:
    """kill_left and reap waited with select(), which refuses descriptors from 1024 on: in a process with that many
    open (a service's connections) stopping a local Ray raised ValueError and left its processes running."""
    held = []
    try:
        while len(held) < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pytest.skip("cannot open 1100 descriptors here")
    try:
        pid = os.posix_spawnp("sleep", ["sleep", "60"], os.environ)  # ok-sleep: a process reaped by reap(), not a Popen
        fds = pidfds({pid})
        assert fds[0] >= 1024
        kill_left(fds, 0.0)
        reap(fds, LEFTOVER_GRACE)
        for fd in fds:
            os.close(fd)
        assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    finally:
        for fd in held:
            os.close(fd)


def test_a_failed_run_s_statistics_count_the_error_and_every_instance(ray_cluster: RayCluster) -> None:
    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", fail := wf.Fail(on=3), "input")

    async def go() -> aiod4p.WorkflowRun:
        async with asyncio.timeout(60):
            run = aiod4p.start(graph, 10, mapping="ray", workers=2)
            with pytest.raises(aiod4p.PEError, match=fail.id):
                async with run:
                    await run.results()
        return run

    run = asyncio.run(go())
    assert run.stats == []
    assert sum(entry.errors for entry in run.live_stats() if entry.pe == fail.id) == 1
    assert sorted((entry.pe, entry.instance) for entry in run.live_stats()) == sorted(
        (ref.pe, ref.index) for ref in run.plan.instances()
    )
