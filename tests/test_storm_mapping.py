"""``--mapping storm``: finding the cluster, refusing early when there is none, and submitting."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("streamparse", reason="the storm extra is not installed")

from test_storm_report import Sink

from aiod4p._install import install_hint
from aiod4p.errors import Aiod4pError, MappingUnavailable
from aiod4p.mappings.asyncio import AsyncMapping
from aiod4p.mappings.storm import StormMapping
from aiod4p.storm._cluster import cluster_at, configured_nimbus, find_cluster
from aiod4p.storm._run import RunReport

ROOT = Path(__file__).resolve().parents[1]
WORDCOUNT = str(ROOT / "examples" / "wordcount.py")
NIMBUS = str(Path(__file__).with_name("storm_fake_nimbus.py"))


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """An environment with no Storm configuration, and an empty scratch directory as TMPDIR."""
    env = {k: v for k, v in os.environ.items() if k not in ("STREAMPARSE_NIMBUS", "STORM_CONF_DIR", "STORM_HOME")}
    for name in ("home", "scratch", "cwd"):
        (tmp_path / name).mkdir()
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "scratch"))
    return env


def aiod4p(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiod4p", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def wordcount_on(port: int) -> str:
    """A script that runs the word count on the Nimbus at ``port`` (topologies must start within 1 s)."""
    return (
        "import aiod4p, sys\n"
        "from aiod4p.mappings.storm import StormMapping\n"
        f"mapping = StormMapping(nimbus='127.0.0.1:{port}', target={WORDCOUNT!r}, start_timeout=1)\n"
        f"graph = aiod4p.load_graph({WORDCOUNT!r})\n"
        "try:\n"
        "    aiod4p.run(graph, 1, mapping=mapping, workers=2)\n"
        "except aiod4p.errors.Aiod4pError as exc:\n"
        "    sys.exit(str(exc))\n"
    )


def nothing_written(tmp_path: Path) -> bool:
    return not any((tmp_path / "scratch").iterdir()) and not any((tmp_path / "cwd").iterdir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def fake_nimbus(tmp_path: Path) -> Iterator[Callable[[int], tuple[int, Path]]]:
    started: list[subprocess.Popen[str]] = []

    def start(supervisors: int = 1) -> tuple[int, Path]:
        record = tmp_path / f"nimbus{len(started)}"
        record.mkdir()
        process = subprocess.Popen(
            [sys.executable, NIMBUS, str(record), str(supervisors)], stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout is not None
        return int(process.stdout.readline()), record

    yield start
    for process in started:
        process.terminate()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


def test_no_cluster_configured(sandbox: dict[str, str], tmp_path: Path) -> None:
    done = aiod4p(["run", WORDCOUNT, "--mapping", "storm"], sandbox, tmp_path / "cwd")
    assert done.returncode == 1
    assert "the storm mapping needs a Storm cluster, and none is configured" in done.stderr
    assert "--nimbus HOST:PORT" in done.stderr and "STREAMPARSE_NIMBUS" in done.stderr
    assert nothing_written(tmp_path)


def test_unreachable_nimbus_stops_before_anything_else(sandbox: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    done = aiod4p(["run", WORDCOUNT, "--mapping", "storm", "--nimbus", f"127.0.0.1:{port}"], sandbox, tmp_path / "cwd")
    assert done.returncode == 1
    assert f"no Storm cluster is reachable: Nimbus at 127.0.0.1:{port} (from --nimbus) does not answer" in done.stderr
    assert nothing_written(tmp_path)  # no project, no jar


def test_statistics_options_are_said_to_be_ignored(sandbox: dict[str, str], tmp_path: Path) -> None:
    """Storm keeps its own statistics (the Storm UI): --stats and --stats-json warn, and write no empty table."""
    port, stats = free_port(), tmp_path / "stats.json"
    args = [
        "run",
        WORDCOUNT,
        "--mapping",
        "storm",
        "--nimbus",
        f"127.0.0.1:{port}",
        "--stats",
        "--stats-json",
        str(stats),
    ]
    done = aiod4p(args, sandbox, tmp_path / "cwd")
    assert done.returncode == 1  # no Nimbus answers; the warnings come first
    for option in ("--stats", "--stats-json"):
        warning = f"aiod4p: warning: {option} is ignored: the storm mapping reports no per-PE statistics"
        assert warning in done.stderr.splitlines(), done.stderr
    assert "Statistics per PE" not in done.stderr
    assert not stats.exists()


def test_engine_options_are_said_to_be_ignored(sandbox: dict[str, str], tmp_path: Path) -> None:
    """Storm routes each tuple itself: --batch-size, --credits and --threaded changed nothing, silently."""
    port = free_port()
    args = ["run", WORDCOUNT, "--mapping", "storm", "--nimbus", f"127.0.0.1:{port}", "--batch-size", "7"]
    args += ["--credits", "2", "--threaded", "SplitWords"]
    done = aiod4p(args, sandbox, tmp_path / "cwd")
    assert done.returncode == 1  # no Nimbus answers; the warnings come first
    for option in ("--batch-size", "--credits", "--threaded"):
        warning = f"aiod4p: warning: {option} is ignored: the storm mapping routes each item itself"
        assert warning in done.stderr.splitlines(), done.stderr


def test_stdin_is_a_usage_error(sandbox: dict[str, str], tmp_path: Path) -> None:
    """A topology stores its spouts' inputs when it is built: --stdin says so, before Nimbus is even asked."""
    port = free_port()
    args = ["run", WORDCOUNT, "--mapping", "storm", "--nimbus", f"127.0.0.1:{port}", "--stdin", "ReadLines"]
    done = aiod4p(args, sandbox, tmp_path / "cwd")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "aiod4p: error: --stdin: the storm mapping stores its sources' inputs before the run starts, and cannot"
        " read stdin as the run goes: give them with -d or -f"
    ]


def test_configured_but_unreachable_through_the_environment(sandbox: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    done = aiod4p(
        ["run", WORDCOUNT, "--mapping", "storm"],
        {**sandbox, "STREAMPARSE_NIMBUS": f"127.0.0.1:{port}"},
        tmp_path / "cwd",
    )
    assert done.returncode == 1
    assert f"Nimbus at 127.0.0.1:{port} (from STREAMPARSE_NIMBUS) does not answer" in done.stderr


def test_bad_nimbus_address(sandbox: dict[str, str], tmp_path: Path) -> None:
    done = aiod4p(["run", WORDCOUNT, "--mapping", "storm", "--nimbus", "host:port"], sandbox, tmp_path / "cwd")
    assert done.returncode == 1
    assert "--nimbus: 'host:port' is not HOST or HOST:PORT" in done.stderr


def test_nimbus_for_another_mapping_is_a_usage_error(sandbox: dict[str, str], tmp_path: Path) -> None:
    done = aiod4p(["run", WORDCOUNT, "--mapping", "simple", "--nimbus", "h:1"], sandbox, tmp_path / "cwd")
    assert done.returncode == 2
    assert "--nimbus applies to --mapping storm only" in done.stderr


def test_where_the_cluster_address_comes_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STREAMPARSE_NIMBUS", "STORM_CONF_DIR", "STORM_HOME", "AIOD4P_STORM_ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "storm.yaml").write_text('nimbus.seeds: ["seed1", "seed2"]\nnimbus.thrift.port: 7000\n')
    monkeypatch.setenv("STORM_CONF_DIR", str(conf_dir))
    assert (find_cluster().address, find_cluster().origin) == ("seed1:7000", str(conf_dir / "storm.yaml"))

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"envs": {"prod": {"nimbus": "from-config", "use_virtualenv": True}}}))
    cluster = find_cluster()
    assert (cluster.address, cluster.env["use_virtualenv"]) == ("from-config:6627", True)

    monkeypatch.setenv("STREAMPARSE_NIMBUS", "from-env:1234")
    assert find_cluster().address == "from-env:1234"
    assert find_cluster("override:1").address == "override:1"

    config.write_text(json.dumps({"envs": {"a": {"nimbus": "a"}, "b": {"nimbus": "b"}}}))
    with pytest.raises(MappingUnavailable, match=r"several environments \(a, b\); choose one with AIOD4P_STORM_ENV"):
        find_cluster()
    monkeypatch.delenv("STREAMPARSE_NIMBUS")
    monkeypatch.setenv("AIOD4P_STORM_ENV", "b")
    assert find_cluster().address == "b:6627"
    monkeypatch.setenv("AIOD4P_STORM_ENV", "c")
    with pytest.raises(MappingUnavailable, match=r"no environment 'c'"):
        find_cluster()


def test_a_config_json_that_is_not_json_is_not_streamparses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A scientist's own config.json (JSON with comments) where the run starts stopped ``--mapping storm --nimbus
    HOST``: ``cannot read the streamparse configuration config.json: Expecting property name ...``. It is said and
    left alone now; a streamparse one is read as before."""
    monkeypatch.delenv("STREAMPARSE_NIMBUS", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text('{\n  // my thresholds\n  "threshold": 3\n}\n')
    cluster = find_cluster("nimbus.example.org:6627")
    assert (cluster.address, cluster.env) == ("nimbus.example.org:6627", {})
    assert "config.json is not JSON (Expecting property name" in caplog.text
    assert "not read as a streamparse configuration" in caplog.text
    (tmp_path / "config.json").write_text('{"threshold": 3}', encoding="utf-16")  # a Windows editor's
    cluster = find_cluster("nimbus.example.org:6627")
    assert (cluster.address, cluster.env) == ("nimbus.example.org:6627", {})
    assert "codec can't decode" in caplog.text


def test_a_bad_port_in_storm_yaml_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STREAMPARSE_NIMBUS", "STORM_CONF_DIR", "STORM_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "storm.yaml").write_text("nimbus.host: seed\nnimbus.thrift.port: thrift\n")
    monkeypatch.setenv("STORM_CONF_DIR", str(tmp_path))
    with pytest.raises(MappingUnavailable, match=r"storm.yaml: 'seed:thrift' is not HOST or HOST:PORT"):
        find_cluster()


def test_the_nimbus_of_a_storm_configuration() -> None:
    """As a topology's spout finds the Nimbus to kill it at: storm.yaml's keys, in the topology's conf."""
    assert configured_nimbus({"nimbus.seeds": ["seed1", "seed2"], "nimbus.thrift.port": 7000}) == "seed1:7000"
    assert configured_nimbus({"nimbus.host": "host"}) == "host"
    assert configured_nimbus({"nimbus.seeds": [], "nimbus.thrift.port": 7000}) is None
    assert cluster_at("host", "conf").address == "host:6627"
    with pytest.raises(MappingUnavailable, match=r"conf: 'host:0' is not HOST or HOST:PORT"):
        cluster_at("host:0", "conf")


def test_n_gives_tasks_as_the_async_mapping_gives_instances() -> None:
    options = StormMapping().plan_options(4, 100, 2)
    assert options == AsyncMapping().plan_options(4, 100, 2)
    assert (options.workers, options.default_parallelism) == (1, 4)


def test_the_environments_options_are_over_the_default_conf(
    fake_nimbus: Callable[[int], tuple[int, Path]], sandbox: dict[str, str], tmp_path: Path
) -> None:
    """The settings of the streamparse environment in config.json reach the topology, over aiod4p's defaults.
    Its `topology.max.spout.pending` was overridden by the default 1000, given on sparse's command line."""
    port, record = fake_nimbus(1)
    options = {"topology.max.spout.pending": 7, "topology.message.timeout.secs": 77}
    config = {"envs": {"prod": {"nimbus": f"127.0.0.1:{port}", "options": options}}}
    (tmp_path / "cwd" / "config.json").write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-c", wordcount_on(port)],
        env=sandbox,
        cwd=tmp_path / "cwd",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1  # the stand-in Nimbus runs nothing
    submitted = json.loads((record / "submitted.json").read_text())
    assert {key: submitted["conf"][key] for key in options} == options


async def test_a_drain_that_nimbus_does_not_take_fails_the_run() -> None:
    """SIGINT deactivates the topology through Nimbus; a Nimbus that does not answer then fails the run, naming the
    topology. The run waited, silent, for an end that never came (a live source), until a second signal."""
    report = RunReport(Sink(), "token")
    report.all_started.set()  # every task runs: the drain deactivates at once
    mapping = StormMapping(name="live")
    await asyncio.wait_for(mapping._drain(report, cluster_at(f"127.0.0.1:{free_port()}", "test")), 30)
    assert report.ended.is_set()
    with pytest.raises(Aiod4pError, match=r"cannot drain topology live: Nimbus at 127\.0\.0\.1:\d+ did not deactivate"):
        raise report.error()


def test_nimbus_without_supervisors(
    fake_nimbus: Callable[[int], tuple[int, Path]], sandbox: dict[str, str], tmp_path: Path
) -> None:
    port, record = fake_nimbus(0)
    done = aiod4p(["run", WORDCOUNT, "--mapping", "storm", "--nimbus", f"127.0.0.1:{port}"], sandbox, tmp_path / "cwd")
    assert done.returncode == 1
    assert f"Nimbus at 127.0.0.1:{port} answers but has no supervisor to run topologies" in done.stderr
    assert not (record / "submitted.json").exists()


def test_submit_with_sparse_then_kill_a_topology_that_does_not_start(
    fake_nimbus: Callable[[int], tuple[int, Path]], sandbox: dict[str, str], tmp_path: Path
) -> None:
    # The stand-in Nimbus records the submission, but runs nothing: no task ever reports back.
    port, record = fake_nimbus(1)
    code = wordcount_on(port)
    done = subprocess.run(
        [sys.executable, "-c", code], env=sandbox, cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    submitted = json.loads((record / "submitted.json").read_text())
    name = submitted["name"]
    assert name.startswith("wordcount-")  # the target's name, and the run's own suffix
    assert f"topology {name} did not start within 1 s (0 of 6 tasks reported)" in done.stderr
    assert json.loads((record / "killed.json").read_text()) == {"name": name, "wait_secs": 0}
    assert submitted["conf"]["topology.workers"] == 1
    assert submitted["conf"]["topology.max.spout.pending"] == 1000
    components = {name.rstrip("0123456789"): spec for name, spec in submitted["components"].items()}
    assert {name: (spec["kind"], spec["par"]) for name, spec in components.items()} == {
        "ReadLines": ("spout", 1),
        "SplitWords": ("bolt", 2),  # -n 2
        "CountWords": ("bolt", 3),
    }
    for name, spec in submitted["components"].items():
        assert spec["shell"] == ["streamparse_run", f"-s json aiod4p_components.{name}"]
    with zipfile.ZipFile(record / "uploaded.jar") as jar:
        names = set(jar.namelist())
        spec = json.loads(jar.read("resources/aiod4p_topology.json"))
    assert {"resources/aiod4p_components.py", "resources/aiod4p_pes.pickle", "resources/wordcount.py"} <= names
    assert list(spec["feeds"].values()) == [1]
    assert spec["report"].startswith("127.0.0.1:") and len(spec["token"]) == 16
    assert not any((tmp_path / "scratch").iterdir())  # the temporary project is gone


def test_a_topology_that_gets_no_worker_slot_says_so(
    fake_nimbus: Callable[[int], tuple[int, Path]], sandbox: dict[str, str], tmp_path: Path
) -> None:
    """Other topologies hold every worker slot: the topology never starts, and the run says why. It said
    `Nimbus reports no error (see the worker logs)`, and no worker, so no log, was there."""
    port, record = fake_nimbus(1)
    (record / "slots-used").touch()
    done = subprocess.run(
        [sys.executable, "-c", wordcount_on(port)],
        env=sandbox,
        cwd=tmp_path / "cwd",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    name = json.loads((record / "submitted.json").read_text())["name"]
    assert (
        f"topology {name} did not start within 1 s (0 of 6 tasks reported); Nimbus assigned it no worker: all 4"
        " worker slots of the cluster are taken (by other topologies: kill one, or give the supervisors more slots)"
    ) in done.stderr


def test_a_kill_that_nimbus_refuses_is_reported_and_the_run_releases_what_it_holds(
    fake_nimbus: Callable[[int], tuple[int, Path]], sandbox: dict[str, str], tmp_path: Path
) -> None:
    port, record = fake_nimbus(1)
    (record / "refuse-kill").touch()
    code = wordcount_on(port)
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", code],
        env=sandbox,
        cwd=tmp_path / "cwd",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    name = json.loads((record / "submitted.json").read_text())["name"]
    assert f"topology {name} did not start within 1 s" in done.stderr  # the run's own error comes first
    assert f"did not kill topology {name}" in done.stderr and f"storm kill {name} -w 0" in done.stderr
    assert "ResourceWarning" not in done.stderr  # the run's report server was closed all the same


def test_a_failed_run_whose_kill_nimbus_refuses_fails_at_once(
    fake_nimbus: Callable[[int], tuple[int, Path]], sandbox: dict[str, str], tmp_path: Path
) -> None:
    """A task reports a fatal error, and Nimbus does not take the kill: the run fails at once. It waited 30 s for
    the last reports of tasks that, not killed, would never close their connections (a drain Nimbus did not
    take, after Ctrl-C, so came 30 s late)."""
    port, record = fake_nimbus(1)
    (record / "refuse-kill").touch()
    code = wordcount_on(port).replace("start_timeout=1", "start_timeout=60")
    run = subprocess.Popen(
        [sys.executable, "-c", code], env=sandbox, cwd=tmp_path / "cwd", stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (record / "submitted.json").exists():  # the jar was uploaded before
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.05)  # ok-sleep: polls the file the stand-in Nimbus writes (no event joins them)
        with zipfile.ZipFile(record / "uploaded.jar") as jar:
            spec = json.loads(jar.read("resources/aiod4p_topology.json"))
        host, _, task_port = spec["report"].rpartition(":")
        with socket.create_connection((host, int(task_port))) as task:  # a task that goes on: it was not killed
            pe = spec["components"][0]["name"]
            hello = {"t": "hello", "token": spec["token"], "pe": pe, "task": 0, "pid": os.getpid()}
            error = {"t": "e", "fatal": True, "kind": "Aiod4pError", "message": "the task gave up"}
            task.sendall(f"{json.dumps(hello)}\n{json.dumps(error)}\n".encode())
            _, stderr = run.communicate(timeout=15)
    finally:
        run.kill()
        run.communicate()
    assert run.returncode == 1
    name = spec["name"]
    assert f"did not kill topology {name}" in stderr and stderr.rstrip().endswith("the task gave up")


def test_without_streamparse_the_mapping_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['streamparse'] = None\n"
        "from aiod4p._cli import main\n"
        f"print('run', main(['run', {WORDCOUNT!r}, '--mapping', 'storm']))\n"
        f"print('build', main(['storm', 'build', {WORDCOUNT!r}, '-o', {str(tmp_path / 'out')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "run 1" in done.stdout and "build 1" in done.stdout
    assert f"the storm mapping needs streamparse: {install_hint('storm')}" in done.stderr
    assert f"aiod4p storm needs streamparse: {install_hint('storm')}" in done.stderr
    assert not (tmp_path / "out").exists()
