"""The command line, run as a real process."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import (
    AIOD4P,
    LINGERING_FLOW,
    TIMES10_FLOW,
    aiod4p_process,
    json_lines,
    numbers_flow,
    reaped,
)
from helpers import aiod4p_cli as aiod4p
from hypothesis import given, settings
from hypothesis import strategies as st

import aiod4p as aiod4p_package
from aiod4p._cli import main
from aiod4p._results import ResultRecord, record_line
from aiod4p.errors import Aiod4pError
from aiod4p.mappings.multi import START_METHOD_ENV

ROOT = Path(__file__).resolve().parents[1]
WORDCOUNT = str(ROOT / "examples" / "wordcount.py")


WORKFLOW = numbers_flow(
    """
    class Check(IterativePE):
        def process_item(self, item):
            if item == 13:
                raise ValueError("unlucky")
            return item * 10
    """
)


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    path = tmp_path / "flow.py"
    path.write_text(WORKFLOW)
    return path


@settings(max_examples=200, deadline=None)
@given(
    pe=st.text(),
    port=st.text(),
    data=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    ),
)
def test_a_results_line_is_what_json_dumps_writes_of_the_record(pe: str, port: str, data: object) -> None:
    """record_line encodes the record's head once per PE and port and reuses one encoder (twice as fast as
    json.dumps of the whole record, which made an encoder a call): the line stays the same, byte for byte."""
    record = ResultRecord(pe, port, data)
    assert record_line(record) == json.dumps(record.to_json()) + "\n"


def test_results_json_lines_keep_what_json_has_no_type_for(caplog: pytest.LogCaptureFixture) -> None:
    numpy = pytest.importorskip("numpy")
    values = [numpy.arange(100_000.0), numpy.int64(3), b"\x00\xff", {7}, datetime.date(2026, 12, 4), (1, "a")]
    values.append(memoryview(b"\x00\xff"))  # was written as its tolist(), [0, 255]
    values += [memoryview(b"\x00\x01\xff")[::2], memoryview(numpy.arange(2.0))]  # not contiguous; not bytes
    written = [json.loads(record_line(ResultRecord("pe", "out", value)))["data"] for value in values]
    assert written[0] == list(range(100_000))
    assert written[1:] == [3, {"base64": "AP8="}, [7], "2026-12-04", [1, "a"], {"base64": "AP8="}, [0, 255], [0, 1]]
    # Floats that are not numbers keep what they are, as Python's json writes and reads them (jq reads them too).
    line = record_line(ResultRecord("pe", "out", numpy.array([numpy.nan, numpy.inf, -numpy.inf])))
    assert '"data": [NaN, Infinity, -Infinity]' in line
    assert [str(value) for value in json.loads(line)["data"]] == ["nan", "inf", "-inf"]

    class Opaque:
        def __repr__(self) -> str:
            return "Opaque()"

    with caplog.at_level("WARNING", logger="aiod4p"):
        odd = json.loads(record_line(ResultRecord("pe", "out", Opaque())))["data"]
    assert odd == "Opaque()" and ".Opaque are written as their repr (JSON has no type for them)" in caplog.text
    # Keys JSON refuses (a dict keyed by station pairs, by numpy integers), at any depth: a dispel4py
    # workflow's result as written, where the --results file failed with a traceback.
    keyed = {("AA", "BB"): 0.5, numpy.int64(7): {(1, 2): [numpy.int64(3)]}, "plain": [{frozenset(): None}]}
    with caplog.at_level("WARNING", logger="aiod4p"):
        written_keyed = json.loads(record_line(ResultRecord("pe", "out", keyed)))["data"]
    assert written_keyed == {"('AA', 'BB')": 0.5, "7": {"(1, 2)": [3]}, "plain": [{"frozenset()": None}]}
    assert "builtins.tuple (as a dict key) are written as their repr" in caplog.text


def test_results_json_lines_write_numpy_long_doubles_as_numbers(caplog: pytest.LogCaptureFixture) -> None:
    """numpy's long doubles have no Python type: their ``tolist()`` gives them back, and a result holding one
    failed the run with ``cannot be written as JSON: maximum recursion depth exceeded``."""
    numpy = pytest.importorskip("numpy")
    values = [
        numpy.longdouble(0.5),
        numpy.array([1.5, numpy.inf], dtype=numpy.longdouble),
        numpy.clongdouble(1 + 2j),
        {numpy.longdouble(2.5): 1, (1,): 2},
    ]
    with caplog.at_level("WARNING", logger="aiod4p"):
        written = [json.loads(record_line(ResultRecord("pe", "out", value)))["data"] for value in values]
    assert written == [0.5, [1.5, math.inf], "(1+2j)", {"2.5": 1, "(1,)": 2}]
    assert "builtins.complex are written as their repr" in caplog.text


def test_results_json_lines_write_numpy_nanosecond_datetimes_in_iso_8601() -> None:
    """A ``datetime64`` finer than microseconds (pandas' and astropy's ``datetime64[ns]``) was written as the bare
    integer its ``tolist()`` gives, ``1577836800123456789``, while a coarser one was written in ISO 8601."""
    numpy = pytest.importorskip("numpy")
    stamps = numpy.array([["2020-01-01T00:00:00.123456789", "NaT"]], dtype="datetime64[ns]")
    values = [stamps[0, 0], stamps, numpy.datetime64("NaT", "ns"), {stamps[0, 0]: 1}, numpy.datetime64("2020-01-02")]
    written = [json.loads(record_line(ResultRecord("pe", "out", value)))["data"] for value in values]
    assert written == [
        "2020-01-01T00:00:00.123456789",
        [["2020-01-01T00:00:00.123456789", None]],
        None,
        {"2020-01-01T00:00:00.123456789": 1},
        "2020-01-02",
    ]


def test_results_json_lines_write_a_set_in_the_same_order_in_every_process() -> None:
    """A set was written in its iteration order, which a string's hash sets, and that differs from process to
    process: a worker's provenance digest of a result did not match the line `--results` wrote in the launcher, and
    `--trace` by that line found nothing on multi, mpi and ray. A set is written sorted where it sorts."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from aiod4p._results import ResultRecord, record_line;"
        "print(record_line(ResultRecord('pe', 'out', {'seismic', 'astro', 'sentiment', 'text', 'mpi'})), end='')"
    )
    lines = {
        subprocess.run(
            [sys.executable, "-c", code, str(ROOT)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert lines == {'{"pe": "pe", "output": "out", "data": ["astro", "mpi", "seismic", "sentiment", "text"]}\n'}
    assert json.loads(record_line(ResultRecord("pe", "out", {1, "a"})))["data"] in ([1, "a"], ["a", 1])


def test_results_json_lines_write_durations_as_seconds(caplog: pytest.LogCaptureFixture) -> None:
    """A ``timedelta64`` was written as the bare integer its ``tolist()`` gives for nanoseconds (``1500000000``),
    but as a repr with a warning for seconds or milliseconds (``datetime.timedelta(seconds=1, ...)``), as was
    Python's ``timedelta``: one duration, three spellings. Each is now its seconds, a number."""
    numpy = pytest.importorskip("numpy")
    values = [
        numpy.timedelta64(1500, "ms"),
        numpy.timedelta64(1_500_000_000, "ns"),
        numpy.array([[3, "NaT"]], dtype="timedelta64[s]"),
        numpy.timedelta64("NaT", "ns"),
        datetime.timedelta(days=1, microseconds=5),
        {"lag": numpy.timedelta64(7, "D")},
        numpy.arange(100_000).astype("timedelta64[us]"),  # written a chunk at a time
        {datetime.timedelta(seconds=3): 1, numpy.timedelta64(2, "s"): 2},
    ]
    with caplog.at_level("WARNING", logger="aiod4p"):
        written = [json.loads(record_line(ResultRecord("pe", "out", value)))["data"] for value in values]
    assert written[7] == {"3.0": 1, "2.0": 2}
    assert written[:6] == [1.5, 1.5, [[3.0, None]], None, 86400.000005, {"lag": 604800.0}]
    assert written[6] == [index / 1e6 for index in range(100_000)]
    assert "written as their repr" not in caplog.text


def test_a_large_array_result_is_written_as_json_a_chunk_at_a_time() -> None:
    """A result holding a large array was written from the whole array as Python floats, about ten times its size
    (a 100 MB array took the command to 908 MB), in C code that kept Ctrl-C waiting until it ended (20 s; a second
    Ctrl-C meanwhile was lost). It is written a chunk of elements at a time, the same line to the byte."""
    numpy = pytest.importorskip("numpy")
    signal_ = numpy.arange(150_000) / 7
    values = [signal_, ("trace", signal_.reshape(2, 75_000)), {"rows": signal_.reshape(37_500, 4), "n": 4}]
    for value in values:
        whole = '{"pe": "pe", "output": "out", "data": ' + json.dumps(value, default=list_of) + "}"
        tracemalloc.start()
        try:
            line = record_line(ResultRecord("pe", "out", value))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert line == whole + "\n"
        assert peak < 2.5 * len(line), (peak, len(line))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_results_json_lines_write_what_refuses_tolist_as_its_repr(caplog: pytest.LogCaptureFixture) -> None:
    """astropy's Quantity refuses ``tolist()`` (NotImplementedError): a result holding one (``3.5 * u.Jy``) ended
    ``aiod4p run --results`` with that traceback and an empty results file."""
    units = pytest.importorskip("astropy.units")
    numpy = pytest.importorskip("numpy")
    values = [{"flux": 3.5 * units.Jy}, numpy.arange(3) * units.m, numpy.arange(200_000) * units.s]
    with caplog.at_level("WARNING", logger="aiod4p"):
        written = [json.loads(record_line(ResultRecord("pe", "out", value)))["data"] for value in values]
    assert written == [{"flux": "<Quantity 3.5 Jy>"}, "<Quantity [0., 1., 2.] m>", repr(values[2])]
    assert "astropy.units.quantity.Quantity are written as their repr" in caplog.text
    # numpy's matrix, whose rows are matrices as deep as itself, is written as its tolist() too, a large one as well.
    for size in (10, 200_000):
        matrix = numpy.asmatrix(numpy.arange(size))
        assert json.loads(record_line(ResultRecord("pe", "out", matrix)))["data"] == matrix.tolist()


class _TensorLike:
    """torch.Tensor's shape of API, of 1.6 MB: ``nbytes``, ``ndim``, ``tolist()``, and ``size`` a method."""

    ndim, nbytes = 1, 8 * 200_000

    def size(self) -> tuple[int]:
        return (200_000,)

    def tolist(self) -> list[int]:
        return list(range(200_000))


def test_a_large_result_of_another_library_s_array_is_written_as_its_tolist() -> None:
    """Only numpy's arrays are written a chunk at a time: a torch tensor of 1 MB or more, whose ``size`` is a
    method, ended the command with `TypeError: '>' not supported between instances of 'method' and 'int'`."""
    assert json.loads(record_line(ResultRecord("pe", "out", _TensorLike())))["data"] == list(range(200_000))


class _RefusesTolist:
    def tolist(self) -> list[int]:
        raise RuntimeError("not on this device")  # as torch says it

    def __repr__(self) -> str:
        return "<on a device>"


def test_a_result_whose_tolist_fails_is_written_as_its_repr() -> None:
    assert json.loads(record_line(ResultRecord("pe", "out", [_RefusesTolist()])))["data"] == ["<on a device>"]


def list_of(array: object) -> object:
    return array.tolist()  # type: ignore[attr-defined]


def test_results_json_lines_write_any_date_or_time_in_iso_8601(caplog: pytest.LogCaptureFixture) -> None:
    # obspy's UTCDateTime, a seismologist's time, is no datetime: it was written as its repr with a warning,
    # "UTCDateTime(2020, 1, 1, 0, 0)"; and a date as a dict key as "datetime.date(2020, 1, 1)".
    obspy = pytest.importorskip("obspy")
    start = obspy.UTCDateTime(2020, 1, 1, 0, 16, 40)
    value = {"start": start, "days": {datetime.date(2020, 1, 1): 3}}
    with caplog.at_level("WARNING", logger="aiod4p"):
        written = json.loads(record_line(ResultRecord("pe", "out", value)))["data"]
    assert written == {"start": "2020-01-01T00:16:40", "days": {"2020-01-01": 3}}
    assert caplog.text == ""


def test_a_result_json_cannot_write_fails_the_run_naming_its_pe_and_port(tmp_path: Path) -> None:
    """A result that holds itself (or is nested deeper than Python recurses) ended the run with `aiod4p: error:
    Circular reference detected`, naming no PE, and exit 2, the usage error's status."""
    flow = tmp_path / "flow.py"
    flow.write_text(
        numbers_flow(
            """
            class Loop(IterativePE):
                def process_item(self, item):
                    looped = {"n": item}
                    looped["self"] = looped
                    return looped
            """
        )
    )
    done = aiod4p("run", str(flow), "-m", "simple", "-i", "1", "--results", str(tmp_path / "out.jsonl"))
    assert (done.returncode, done.stderr) == (
        1,
        "aiod4p: error: a result of PE Loop1 on port output cannot be written as JSON: Circular reference detected\n",
    )
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(Aiod4pError, match=r"^a result of PE pe on port out cannot be written as JSON: maximum"):
        record_line(ResultRecord("pe", "out", deep))


def test_a_result_with_no_repr_fails_the_run_naming_its_pe_and_port(tmp_path: Path) -> None:
    """Printed at the end (no --results), a result nested deeper than Python recurses ended the run with a
    RecursionError traceback."""
    flow = tmp_path / "flow.py"
    flow.write_text(
        numbers_flow(
            """
            class Deep(IterativePE):
                def process_item(self, item):
                    nested = []
                    for _ in range(100_000):
                        nested = [nested]
                    return nested
            """
        )
    )
    done = aiod4p("run", str(flow), "-m", "simple", "-i", "1")
    assert (done.returncode, done.stderr) == (
        1,
        "aiod4p: error: a result of PE Deep1 on port output cannot be printed: maximum recursion depth exceeded"
        " while getting the repr of an object\n",
    )


def test_a_value_error_escaping_a_run_is_no_usage_error(
    workflow_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit status 2 is a usage error's (a bad option); a ValueError that escaped the run once its options were
    checked made it too. It is a failed run's, 1."""

    def broken(record: ResultRecord) -> str:
        raise ValueError("broken writer")

    monkeypatch.setattr("aiod4p._cli.record_line", broken)
    assert main(["run", str(workflow_file), "-m", "simple", "-i", "1", "--results", str(tmp_path / "out.jsonl")]) == 1
    assert capsys.readouterr().err == "aiod4p: error: ValueError: broken writer\n"


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_results_as_json_lines(mapping: str, workflow_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done = aiod4p("run", str(workflow_file), "--mapping", mapping, "-i", "5", "--results", str(out))
    assert done.returncode == 0, done.stderr
    lines = json_lines(out)
    assert sorted(r["data"] for r in lines) == [10, 20, 30, 40, 50]  # type: ignore[type-var]
    assert {r["pe"] for r in lines} == {"Check1"} and {r["output"] for r in lines} == {"output"}


def test_results_printed_readably(workflow_file: Path) -> None:
    done = aiod4p("run", f"{workflow_file}:graph", "-m", "simple", "-i", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Check1.output: 2 items", "  10", "  20"]


def test_results_gathered_for_the_end_warn_once_that_they_are_held_in_memory(
    workflow_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --results every result waits in memory to be printed at the end: an endless source grew the
    process by every result, silently (500 MB in 9 s)."""
    monkeypatch.setattr("aiod4p._cli.GATHERED_RESULTS_WARNING", 3)
    assert main(["run", str(workflow_file), "-m", "simple", "-i", "5"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "aiod4p: warning: 3 records so far, all held in memory to be printed when the run ends: give --results -"
        " to print them as they come, or --results FILE"
    ]


def test_results_to_stdout(workflow_file: Path) -> None:
    done = aiod4p("run", str(workflow_file), "-i", "1", "--results", "-")
    assert json.loads(done.stdout) == {"pe": "Check1", "output": "output", "data": 10}


def test_a_workflow_file_never_replaces_a_module_of_pythons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``signal.py`` is imported as ``workflow`` (as ``signal`` it replaced Python's module for the whole process);
    a workflow file named as an earlier workflow file replaces that one, as it always did."""
    import signal

    from aiod4p._loading import load_module

    # Loading puts each file's folder on sys.path: a later test's subprocess given this sys.path would import
    # that signal.py as Python's.
    monkeypatch.setattr(sys, "path", list(sys.path))

    files = {
        "one/flow.py": "X = 1\n",
        "two/flow.py": "X = 2\n",
        "one/signal.py": "Y = 3\n",
        "two/tabnanny.py": "Z = 4\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    try:
        modules = [load_module(str(tmp_path / name)) for name in files]
        assert [module.__name__ for module in modules] == ["flow", "flow", "workflow", "workflow"]
        assert sys.modules["flow"].X == 2 and sys.modules["signal"] is signal and modules[2].Y == 3
        assert "tabnanny" not in sys.modules  # a module of Python's not imported yet is not taken either
    finally:
        for name in ("flow", "workflow"):
            sys.modules.pop(name, None)


def test_module_target_with_attribute(tmp_path: Path, workflow_file: Path) -> None:
    done = aiod4p("run", "flow:graph", "-m", "simple", "-i", "1", cwd=workflow_file.parent)
    assert done.returncode == 0, done.stderr
    assert "Check1.output: 1 item" in done.stdout


def test_inputs_from_data_and_file(workflow_file: Path, tmp_path: Path) -> None:
    done = aiod4p("run", str(workflow_file), "-m", "simple", "-i", "9", "-d", '{"Numbers0": 3}')
    assert done.stdout.startswith("Check1.output: 3 items"), done.stderr
    inputs = tmp_path / "in.json"
    inputs.write_text('{"Numbers": 2}')
    done = aiod4p("run", str(workflow_file), "-m", "simple", "-d", '{"Numbers0": 3}', "-f", str(inputs))
    assert done.stdout.startswith("Check1.output: 2 items"), done.stderr


def test_pe_exception_gives_one_line_naming_the_line_the_item_and_exit_1(workflow_file: Path) -> None:
    done = aiod4p("run", str(workflow_file), "-i", "20")
    assert done.returncode == 1
    line = workflow_file.read_text().splitlines().index('            raise ValueError("unlucky")') + 1
    assert done.stderr.strip().splitlines() == [
        f"aiod4p: error: PE Check1[0] failed on input port 'input': ValueError: unlucky"
        f" ({workflow_file}, line {line}, in process_item; item=13)"
    ]


BLOBS = """
from aiod4p import IterativePE, ProducerPE, WorkflowGraph


class Blobs(ProducerPE):
    def produce(self):
        yield bytes(50_000_000) + b"end"


class Check(IterativePE):
    def process_item(self, blob):
        return self.check(blob)

    def check(self, blob):
        raise ValueError("bad blob")


graph = WorkflowGraph()
graph.connect(Blobs(), "output", Check(), "input")
"""


@pytest.mark.parametrize("mapping", ["simple", "multi"])
def test_a_pe_error_shows_the_item_short_whatever_its_size(tmp_path: Path, mapping: str) -> None:
    """A 50 MB item is shown by a few of its bytes (``reprlib`` made the whole repr of bytes before cutting it)."""
    flow = tmp_path / "blobs.py"
    flow.write_text(BLOBS)
    done = aiod4p("run", str(flow), "-m", mapping, "-n", "2")
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert re.match(r"aiod4p: error: PE Check1\[[01]\] failed on input port 'input': ValueError: bad blob \(", message)
    shown = "\\x00" * 15
    assert message.endswith(f"line 15, in check; blob=b'{shown}...{shown[: -4 * 3]}end' given to process_item)")


CRASHING = """
import ctypes
from aiod4p import IterativePE, ProducerPE, WorkflowGraph


class Numbers(ProducerPE):
    def produce(self):
        yield from range(10)


class Crash(IterativePE):
    def process_item(self, item):
        if item == 5:
            ctypes.string_at(0)  # a C extension's bad pointer: SIGSEGV
        return item


graph = WorkflowGraph()
graph.connect(Numbers(), "output", Crash(), "input")
"""


@pytest.mark.parametrize(("mapping", "start"), [("async", ""), ("multi", "fork"), ("multi", "spawn"), ("mpi", "")])
def test_a_pe_crashing_the_interpreter_shows_where(tmp_path: Path, mapping: str, start: str) -> None:
    """A segfault in a PE ended the process it ran in with no word of the PE: a bare exit 139 on async, the
    worker's signal alone on multi and mpi. The process (the command, a worker, a rank) prints its Python stack."""
    flow = tmp_path / "crashing.py"
    flow.write_text(CRASHING)
    done = aiod4p("run", str(flow), "-m", mapping, "-n", "2", env={**os.environ, START_METHOD_ENV: start})
    assert done.returncode == (-signal.SIGSEGV if mapping == "async" else 1), done.stderr
    assert "Fatal Python error: Segmentation fault" in done.stderr
    assert f'File "{flow}", line 14 in process_item' in done.stderr


@pytest.mark.parametrize("after", [False, True], ids=["before the command", "after it"])
def test_debug_adds_the_traceback(workflow_file: Path, after: bool) -> None:
    args = ["run", str(workflow_file), "-i", "20"]
    done = aiod4p(*args, "--debug") if after else aiod4p("--debug", *args)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and 'raise ValueError("unlucky")' in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no/such/file.py"], "workflow file no/such/file.py does not exist"),
        (["run", "{folder}"], "is a directory: give the .py file of the workflow in it"),
        (["run", "{notebook}"], "is a Jupyter notebook: run its graph with aiod4p.run() in a cell, or export it"),
        (["run", "no_such_module_xyz"], "no module named 'no_such_module_xyz'"),
        # As dispel4py's tutorials run its examples (rosafilgueira/dispel4py_training_material,
        # Testing_dispel4py.py: `dispel4py simple dispel4py.examples.graph_testing.pipeline_test -i 10`).
        (
            ["run", "dispel4py.examples.graph_testing.pipeline_test"],
            "load from an installed dispel4py, which has none such here: install dispel4py in this",
        ),
        (["run", "{flow}:missing"], "has no attribute 'missing'"),
        (["run", "{flow}", "-d", "{{not json"], "-d is not valid JSON"),
        (["run", "{flow}", "-d", '{{"Nobody": 1}}'], "input key 'Nobody' names no PE of the graph"),
        (["run", "{flow}", "-d", '{{"Numbers": "x"}}'], "the input for 'Numbers' must be a count or a list"),
        (["run", "{flow}", "-f", "missing.json"], "cannot read input file missing.json"),
        (["run", "{flow}", "--results", "/no/such/dir/out.jsonl"], "cannot write results to /no/such/dir/out.jsonl"),
        (["run", "{flow}", "--provenance", "lineage.txt"], "lineage.txt: a provenance file is .json (PROV-JSON)"),
    ],
)
def test_errors_are_one_line_and_non_zero(
    workflow_file: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process (main(), which `python -m aiod4p` calls): each error is found before anything runs;
    # test_import_error_in_the_workflow_file and others give exit 1 from a real process.
    notebook = ROOT / "examples" / "science" / "notebook.ipynb"
    code = main([arg.format(flow=workflow_file, folder=workflow_file.parent, notebook=notebook) for arg in args])
    out, err = capsys.readouterr()
    assert code == 1, out
    assert len(err.strip().splitlines()) == 1
    assert message in err


def test_a_dispel4py_module_missing_from_an_installed_dispel4py_is_only_said_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where the real dispel4py is installed, a mistyped name of one of its modules was told to install it."""
    real = importlib.metadata.distribution
    monkeypatch.setattr(
        importlib.metadata, "distribution", lambda name: real("pytest") if name == "dispel4py" else real(name)
    )
    assert main(["run", "dispel4py.examples.graph_testing.no_such_test"]) == 1
    assert capsys.readouterr().err == (
        "aiod4p: error: no module named 'dispel4py.examples.graph_testing.no_such_test'\n"
    )


def test_a_directory_named_as_a_module_is_no_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cd examples && aiod4p run science`` imported the directory as a namespace package and said ``science
    defines no WorkflowGraph; name one with science:ATTR``, though no ATTR could name one (``science:graph``:
    ``science has no attribute 'graph'``). A directory is no target, named as a path or as a module."""
    (tmp_path / "folder_of_flows").mkdir()
    (tmp_path / "folder_of_flows" / "flow.py").write_text(TIMES10_FLOW)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the current directory on it
    try:
        for target in ("folder_of_flows", "folder_of_flows:graph"):
            assert main(["run", target]) == 1
            assert capsys.readouterr().err == (
                f"aiod4p: error: workflow folder_of_flows is a directory ({tmp_path / 'folder_of_flows'}):"
                " give the .py file of the workflow in it\n"
            )
    finally:
        sys.modules.pop("folder_of_flows", None)


FAILS_AT_FIVE = """
from aiod4p import IterativePE, ProducerPE, WorkflowGraph

class Numbers(ProducerPE):
    def produce(self):
        yield from range(10)

class FailsAtFive(IterativePE):
    def process_item(self, item):
        if item == 5:
            raise ValueError("bad item 5")
        return item

graph = WorkflowGraph()
graph.connect(Numbers(), "output", FailsAtFive(), "input")
"""


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_a_failed_run_without_results_prints_those_it_produced_before_its_error(
    tmp_path: Path, mapping: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --results, results are printed at the end, which a failed run never reached: the work done
    before the failure was lost (hours of it, in a scientist's run), where --results FILE keeps it."""
    flow = tmp_path / "fails.py"
    flow.write_text(FAILS_AT_FIVE)
    assert main(["run", str(flow), "-m", mapping, "-i", "1"]) == 1
    out, err = capsys.readouterr()
    assert re.fullmatch(r"FailsAtFive\d+\.output: 5 items", out.splitlines()[0]), out
    assert out.splitlines()[1:] == [f"  {n}" for n in range(5)]
    assert re.match(r"aiod4p: error: PE FailsAtFive\d+\[0\] failed on input port 'input': ValueError", err), err


def test_an_input_file_is_read_as_json_files_are_written(
    workflow_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-f read its file as text in the locale's encoding: one that is not UTF-8 was a UnicodeDecodeError said as
    a usage error (exit 2) that did not name the file, and a UTF-8 file with a byte-order mark (as Notepad
    saves one) was refused. The bytes go to json, which finds their encoding as RFC 8259 says."""
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"Numbers": [{"x": "\u00e9"}]}'.encode("latin-1"))
    assert main(["run", str(workflow_file), "-f", str(latin)]) == 1
    assert capsys.readouterr().err.startswith(f"aiod4p: error: input file {latin} is not valid JSON: 'utf-8' codec")
    for name, content in (
        ("bom.json", b'\xef\xbb\xbf{"Numbers": 3}'),
        ("utf16.json", '{"Numbers": 3}'.encode("utf-16")),
    ):
        (tmp_path / name).write_bytes(content)
        assert main(["run", str(workflow_file), "-f", str(tmp_path / name), "-q"]) == 0
        assert capsys.readouterr().out.splitlines()[0].endswith(".output: 3 items")


@pytest.mark.parametrize("variables", [("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")])
def test_a_mapping_other_than_mpi_under_mpiexec_is_refused(
    workflow_file: Path, variables: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each of mpiexec's ranks ran the whole workflow, and printed its results (test_mpi_mapping runs a real mpiexec).
    size, rank = variables
    monkeypatch.setenv(size, "2")
    for number, said in (("1", ""), ("0", "aiod4p: error: this process is one of 2 MPI ranks (started by mpiexec)")):
        monkeypatch.setenv(rank, number)
        assert main(["run", str(workflow_file), "--mapping", "simple", "-i", "2"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(said) and len(err.splitlines()) == (1 if said else 0)
    monkeypatch.setenv(size, "1")  # a job of one rank runs the workflow once
    assert main(["run", str(workflow_file), "--mapping", "simple", "-i", "2", "-q"]) == 0
    assert "2 items" in capsys.readouterr().out


def test_a_graph_function_that_fails_is_named_with_its_line(tmp_path: Path) -> None:
    # It gave a Python traceback (a function needing an argument), or exit 2 as if the command line were wrong
    # (a ValueError), without the line.
    (tmp_path / "factory.py").write_text(
        "from aiod4p import WorkflowGraph\n"
        "def make_graph(stations):\n"
        "    return WorkflowGraph()\n"
        "def parse():\n"
        "    return int('five thousand')\n"
    )
    needs = aiod4p("run", "factory.py:make_graph", cwd=tmp_path)
    assert (needs.returncode, needs.stderr) == (
        1,
        "aiod4p: error: factory.py:make_graph() failed: TypeError: make_graph() missing 1 required positional"
        " argument: 'stations'\n",
    )
    fails = aiod4p("graph", "factory.py:parse", "-o", "flow.dot", cwd=tmp_path)
    assert (fails.returncode, fails.stderr) == (
        1,
        f"aiod4p: error: factory.py:parse() failed at {tmp_path / 'factory.py'}, line 5: ValueError: invalid literal"
        " for int() with base 10: 'five thousand'\n",
    )


def test_a_module_the_workflow_imports_that_is_missing_gets_a_hint(tmp_path: Path) -> None:
    (tmp_path / "needs.py").write_text("import numpy\nimport no_such_library_xyz.sub\n")
    for target in ("needs.py", "needs"):
        done = aiod4p("run", target, cwd=tmp_path)
        assert done.returncode == 1
        assert done.stderr == (
            f"aiod4p: error: importing {target} failed at {tmp_path / 'needs.py'}, line 2: ModuleNotFoundError: No"
            f" module named 'no_such_library_xyz' (is no_such_library_xyz installed in this environment,"
            f" {sys.prefix}? see the workflow's documentation)\n"
        )


def test_a_file_of_a_package_that_imports_relatively_gets_the_command_that_runs_it(tmp_path: Path) -> None:
    package = tmp_path / "project" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pes.py").write_text("from aiod4p import IterativePE\nclass Sq(IterativePE):\n    pass\n")
    (package / "flow.py").write_text("from aiod4p import WorkflowGraph\nfrom .pes import Sq\n")
    done = aiod4p("run", str(package / "flow.py"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == (
        f"aiod4p: error: importing {package / 'flow.py'} failed at {package / 'flow.py'}, line 2: ImportError:"
        " attempted relative import with no known parent package (flow.py is module pkg.flow of a package: run it"
        f" by that name, cd {tmp_path / 'project'} && aiod4p run pkg.flow)\n"
    )


def test_printed_results_show_numpy_scalars_as_numbers(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    flow = tmp_path / "flow.py"
    flow.write_text(
        "import numpy as np\n"
        "from aiod4p import ProducerPE, WorkflowGraph\n"
        "class Sums(ProducerPE):\n"
        "    def produce(self):\n"
        "        return ('CA', np.float64(112761.0), [np.int64(3)], {'ok': np.bool_(True)}, np.array([1.5]))\n"
        "graph = WorkflowGraph()\n"
        "graph.add(Sums())\n"
    )
    done = aiod4p("run", str(flow), "-m", "simple")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Sums0.output: 1 item\n  ('CA', 112761.0, [3], {'ok': True}, array([1.5]))\n"
    as_json = json.loads(aiod4p("run", str(flow), "-m", "simple", "--results", "-").stdout)["data"]
    assert as_json == ["CA", 112761.0, [3], {"ok": True}, [1.5]]  # as it was


ECHO_PE = (
    "from aiod4p import IterativePE, WorkflowGraph\n"
    "class Echo(IterativePE):\n"
    "    def process_item(self, item):\n"
    "        return item\n"
)
"""A workflow file's start: ``Echo``, a PE that passes its items on; the file then builds ``graph`` of it."""


def test_an_unknown_root_is_named_as_given_and_the_roots_as_they_can_be_written(tmp_path: Path) -> None:
    flow = tmp_path / "flow.py"
    flow.write_text(
        ECHO_PE + "graph = WorkflowGraph()\n"
        "graph.connect(Echo(name='parse'), 'output', Echo(name='show'), 'input')\n"
        "graph.add(Echo())\n"  # two PEs of one name: each by its id alone
        "graph.add(Echo())\n"
    )
    roots = "(roots: parse (parse0), Echo2, Echo3)"
    for args, named in ((["--stdin", "nope"], "--stdin 'nope'"), (["-d", '{"nope": [1]}'], "input key 'nope'")):
        done = aiod4p("run", str(flow), "-m", "simple", *args, input="")
        assert done.returncode == 1
        assert done.stderr == f"aiod4p: error: {named} names no PE of the graph {roots}\n"
    done = aiod4p("run", str(flow), "-m", "simple", "--stdin", "parse", "-q", input='"hello"\n')
    assert done.returncode == 0, done.stderr
    assert "'hello'" in done.stdout


def test_several_graphs_need_a_choice(tmp_path: Path) -> None:
    (tmp_path / "two.py").write_text("from aiod4p import WorkflowGraph\na = WorkflowGraph()\nb = WorkflowGraph()\n")
    done = aiod4p("run", str(tmp_path / "two.py"))
    assert done.returncode == 1
    assert "defines several workflow graphs (a, b)" in done.stderr


def test_dispel4py_attr_option_names_the_graph(tmp_path: Path) -> None:
    # dispel4py's `dispel4py simple flow.py -a b`: -a names the graph, as flow.py:b does.
    flow = tmp_path / "two.py"
    flow.write_text(
        "from aiod4p import ProducerPE, WorkflowGraph\n"
        "class One(ProducerPE):\n"
        "    def produce(self):\n"
        "        yield 1\n"
        "a = WorkflowGraph()\n"
        "b = WorkflowGraph()\n"
        "b.add(One())\n"
    )
    for option in ("-a", "--attr"):
        done = aiod4p("run", str(flow), option, "b", "-m", "simple")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("One0.output: 1 item"), done.stdout
    done = aiod4p("graph", str(flow), "-a", "b", "-o", str(tmp_path / "b.dot"))
    assert done.returncode == 0, done.stderr
    assert "One0" in (tmp_path / "b.dot").read_text()
    done = aiod4p("run", str(flow), "-a", "missing")
    assert done.returncode == 1 and "has no attribute 'missing'" in done.stderr
    done = aiod4p("run", f"{flow}:a", "-a", "b")
    assert done.returncode == 2 and "already names its graph" in done.stderr


def test_no_graph_in_module(tmp_path: Path) -> None:
    (tmp_path / "none.py").write_text("x = 1\n")
    done = aiod4p("run", str(tmp_path / "none.py"))
    assert "defines no WorkflowGraph" in done.stderr and done.returncode == 1


def test_an_error_while_building_the_graph_names_the_line(tmp_path: Path) -> None:
    flow = tmp_path / "typo.py"
    flow.write_text(
        numbers_flow("class Check(IterativePE):\n    pass\n") + 'graph.connect(Check(), "outptu", Check(), "input")\n'
    )
    done = aiod4p("run", str(flow))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = len(flow.read_text().splitlines())
    assert f"failed at {flow}, line {line}: GraphError: PE Check" in done.stderr
    assert "has no output port 'outptu'" in done.stderr


def test_import_error_in_the_workflow_file(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\n")
    done = aiod4p("run", str(tmp_path / "broken.py"))
    assert done.returncode == 1
    assert "importing" in done.stderr and "no_such_dependency_xyz" in done.stderr


@pytest.mark.parametrize("options_first", [False, True])
def test_dispel4pys_command_line_names_aiod4ps(workflow_file: Path, options_first: bool) -> None:
    # `dispel4py multi flow.py -n 4 -i 3` with aiod4p for dispel4py: argparse said only "invalid choice: 'multi'".
    # With the options first, the command given in reply put the file among them (`run -n -m multi 4 flow.py`).
    words = ["-n", "4", "-i", "3", str(workflow_file)] if options_first else [str(workflow_file), "-n", "4", "-i", "3"]
    done = aiod4p("multi", *words)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "aiod4p: error: 'multi' is a mapping, not a command: dispel4py's `dispel4py multi ...` is"
        f" `aiod4p run -m multi {' '.join(words)}`"
    )
    suggested = aiod4p("run", "-m", "multi", *words, "--results", os.devnull)
    assert suggested.returncode == 0, suggested.stderr


@pytest.mark.parametrize("option", ["-s", "--simple"])
def test_dispel4pys_command_line_with_simple_names_an_aiod4p_command_without_it(
    workflow_file: Path, option: str
) -> None:
    # `dispel4py multi flow.py -n 2 -s` named `aiod4p run -m multi flow.py -n 2 -s`, which aiod4p run refused.
    done = aiod4p("multi", str(workflow_file), "-n", "2", option, "-i", "3")
    assert done.returncode == 2, done.stderr
    words = [str(workflow_file), "-n", "2", "-i", "3"]
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "aiod4p: error: 'multi' is a mapping, not a command: dispel4py's `dispel4py multi ...` is"
            f" `aiod4p run -m multi {' '.join(words)}` (dispel4py's -s/--simple, which runs partitions of the graph"
        )
    )
    suggested = aiod4p("run", "-m", "multi", *words, "--results", os.devnull)
    assert suggested.returncode == 0, suggested.stderr


@pytest.mark.parametrize("option", ["-s", "--simple"])
def test_dispel4pys_simple_option_is_explained(workflow_file: Path, option: str) -> None:
    # `dispel4py multi flow.py -n 4 -s`, as dispel4py workflows' READMEs write it: argparse said only
    # "unrecognized arguments: -s".
    done = aiod4p("run", str(workflow_file), "-m", "multi", "-n", "2", option)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"aiod4p run: error: unrecognized arguments: {option} (dispel4py's -s/--simple, which runs partitions of"
        " the graph with its simple mapping, has no aiod4p equivalent: drop it, and the PEs run as instances on"
        " the -n workers, as dispel4py's multi and mpi run them without -s)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "nowhere"], "invalid choice"),
        (["-n", "0"], "argument -n/--num: must be at least 1, not 0"),
        (["-i", "-5"], "argument -i/--iter: must be at least 0, not -5"),
        (["-i", "many"], "argument -i/--iter: not an integer: 'many'"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
        (["--credits", "-1"], "argument --credits: must be at least 1, not -1"),
        (["--stdin", "Check", "-i", "3"], "--stdin cannot be combined with -i"),
        (["--on-bad", "skip"], "--on-bad applies to the lines of --stdin only, and there is no --stdin PE"),
        (["--max-line", "5"], "--max-line applies to the lines of --stdin only, and there is no --stdin PE"),
        (["--on-bad", "skip", "--max-line", "5"], "--max-line applies to the lines of --stdin only"),
        (["--stats-json", "-"], "--stats-json -: the results already go to stdout; give --results FILE"),
        (["-v", "-q"], "argument -q/--quiet: not allowed with argument -v/--verbose"),
        (["--on-signal", "suspend"], "--on-signal suspend needs --checkpoint-dir"),
        (["--on-signal", "pause"], "argument --on-signal: invalid choice: 'pause'"),
        (["--checkpoint-dir", ""], "argument --checkpoint-dir: the path is empty"),
        (["--results", ""], "argument --results: the path is empty"),
        (["--stats-json", ""], "argument --stats-json: the path is empty"),
        (["--provenance", ""], "argument --provenance: the path is empty"),
        (["-f", ""], "argument -f/--file: the path is empty"),
    ],
)
def test_usage_errors_exit_2(
    workflow_file: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit status rule: a bad command line is argparse's usage error, 2, naming the option.

    In this process (``main()``, which ``python -m aiod4p`` calls): the check is of the command line, and
    a process start per case cost more than the check; a real process gives exit 2 in
    test_graph_command_checks_n_as_a_usage_error and test_dispel4pys_command_line_names_aiod4ps.
    """
    try:
        code = main(["run", str(workflow_file), *args])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (["run", ""], "target"),
        (["graph", "", "-o", "g.dot"], "target"),
        (["graph", WORDCOUNT, "-o", ""], "-o/--output"),
        (["storm", "build", WORDCOUNT, "-o", ""], "-o/--output"),
        (["storm", "build", WORDCOUNT, "-o", "out", "-f", ""], "-f/--file"),
        (["provenance", ""], "FILE"),
        (["provenance", "p.json", "--trace", "1", "--draw", ""], "--draw"),
        (["stats", "plot", "", "-o", "s.png"], "STATS.json"),
        (["stats", "plot", "s.json", "-o", ""], "-o/--output"),
    ],
)
def test_an_empty_path_is_a_usage_error(args: list[str], argument: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty path named the current directory to some calls and no file to others: `--checkpoint-dir ''`
    checkpointed into it and `--restore` found nothing, `storm build -o ''` wrote its project there. Every path
    of every command is refused as empty, exit 2, naming the argument."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: argument {argument}: the path is empty\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--results", "{tmp}/same.json", "--provenance", "{tmp}/same.json"],
            "--results {tmp}/same.json and --provenance {tmp}/same.json are the same file",
        ),
        (
            ["--stats-json", "{tmp}/same.json", "--results", "{tmp}/no/../same.json"],
            "--results {tmp}/no/../same.json and --stats-json {tmp}/same.json are the same file",
        ),
        (
            ["--stats-json", "{tmp}/stats.json", "--provenance", "{tmp}/hard-link.json"],
            "--stats-json {tmp}/stats.json and --provenance {tmp}/hard-link.json are the same file",
        ),
        (
            ["--results", "{tmp}/symbolic-link.json", "--stats-json", "{tmp}/stats.json"],
            "--results {tmp}/symbolic-link.json and --stats-json {tmp}/stats.json are the same file",
        ),
        (["-f", "{tmp}/stats.json", "--results", "{tmp}/stats.json"], "-f {tmp}/stats.json and --results"),
        (
            ["--checkpoint-dir", "{tmp}/ck", "--results", "{tmp}/ck/RUN.json"],
            "--results {tmp}/ck/RUN.json is --checkpoint-dir {tmp}/ck's own",
        ),
        (["--checkpoint-dir", "{tmp}/ck", "--results", "{tmp}/ck"], "--results {tmp}/ck is --checkpoint-dir"),
        (
            ["--checkpoint-dir", "{tmp}/ck", "--stats-json", "{tmp}/ck/chk-00000001/s.json"],
            "--stats-json {tmp}/ck/chk-00000001/s.json is --checkpoint-dir {tmp}/ck's own",
        ),
    ],
    ids=["new", "resolved", "hard-link", "symbolic-link", "input", "run-record", "directory", "checkpoint"],
)
def test_two_outputs_in_one_file_are_a_usage_error(
    workflow_file: Path, tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--results F --provenance F` kept only the provenance in F (`--stats-json F`: the statistics), and said
    it wrote the results there. Two options naming one file, as the OS finds it, or a file the checkpoints write,
    are refused before anything runs, naming both."""
    (tmp_path / "stats.json").write_text("{}")
    (tmp_path / "hard-link.json").hardlink_to(tmp_path / "stats.json")
    (tmp_path / "symbolic-link.json").symlink_to(tmp_path / "stats.json")
    code = main(["run", str(workflow_file), *(arg.format(tmp=tmp_path) for arg in args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"aiod4p: error: {message.format(tmp=tmp_path)}" in err
    assert (tmp_path / "stats.json").read_text() == "{}"


def test_outputs_may_share_a_stream_and_the_checkpoint_directory(workflow_file: Path, tmp_path: Path) -> None:
    """What is written to a stream is not replaced: `--results /dev/null --stats-json /dev/null` runs; so does a
    provenance file in the checkpoint directory, beside the checkpoints."""
    (tmp_path / "ck").mkdir()
    streams = ["--results", os.devnull, "--stats-json", os.devnull]
    checkpoints = ["--checkpoint-dir", str(tmp_path / "ck"), "--provenance", str(tmp_path / "ck" / "prov.json")]
    done = aiod4p("run", str(workflow_file), "-i", "3", *streams, *checkpoints)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ck" / "prov.json").exists()


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["run", "flow.py", "--bogus"], "usage: aiod4p run "),
        (["run", "flow.py", "extra"], "usage: aiod4p run "),
        (["graph", "flow.py", "-o", "g.svg", "--bogus"], "usage: aiod4p graph "),
        (["stats", "plot", "s.json", "-o", "s.png", "--bogus"], "usage: aiod4p stats plot "),
        (["storm", "build", "flow.py", "-o", "out", "--bogus"], "usage: aiod4p storm build "),
    ],
)
def test_an_unknown_argument_shows_the_usage_of_its_command(
    args: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aiod4p run flow.py --bogus`: exit 2 with the usage of `aiod4p run` (whose options the user wants to
    see), not of `aiod4p` itself; nothing is run."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert err.endswith(f"error: unrecognized arguments: {args[-1]}\n"), err


def test_graph_command_checks_n_as_a_usage_error(workflow_file: Path, tmp_path: Path) -> None:
    done = aiod4p("graph", str(workflow_file), "-o", str(tmp_path / "g.dot"), "-n", "0")
    assert done.returncode == 2
    assert "argument -n/--num: must be at least 1, not 0" in done.stderr


def test_a_large_n_on_the_async_mapping_fails_at_once_when_its_plan_needs_too_many_channels(tmp_path: Path) -> None:
    """`-n 10000` on async gives every PE but the root 10,000 instances, and a key grouping between two of
    them 10^8 channels: the run took 17 GB and never started. It now fails at once, naming the edge."""
    flow = tmp_path / "flow.py"
    flow.write_text(
        "from aiod4p import IterativePE, ProducerPE, WorkflowGraph, group_by\n"
        "class Numbers(ProducerPE):\n"
        "    def produce(self):\n"
        "        yield from range(10)\n"
        "class Tag(IterativePE):\n"
        "    def process_item(self, x):\n"
        "        return (x % 5, x)\n"
        "class Sum(IterativePE):\n"
        "    def __init__(self):\n"
        "        super().__init__(grouping=group_by(0))\n"
        "    def process_item(self, pair):\n"
        "        return pair\n"
        "graph = WorkflowGraph()\n"
        "graph.connect(Numbers(), 'output', tag := Tag(), 'input')\n"
        "graph.connect(tag, 'output', Sum(), 'input')\n"
    )
    done = aiod4p("run", str(flow), "-m", "async", "-n", "10000")
    assert done.returncode == 1, done.stderr
    assert "the plan needs 100,010,000 channels, more than the 1,000,000 a run can be given" in done.stderr
    assert "Traceback" not in done.stderr


def test_version() -> None:
    done = aiod4p("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"aiod4p {aiod4p_package.__version__}"


@pytest.mark.parametrize(
    ("args", "warning"),
    [
        (["-m", "simple", "-n", "3", "-i", "2"], "-n is ignored: the simple mapping runs one instance of every PE"),
        (["-i", "2", "-d", '{"Numbers": 1}'], "-i is ignored: -d gives the inputs"),
        (["-d", '{"Numbers": 1}', "-f", "{inputs}"], "-d is ignored: -f gives the inputs"),
        (
            ["-m", "async", "-i", "2", "--checkpoint-dir", "{tmp}/ck", "--restarts", "2"],
            "--restarts is ignored: the async mapping runs in this process, where no worker dies alone"
            " (--restore resumes a run that was stopped)",
        ),
        (["--provenance-level", "item"], "--provenance-level is ignored: --provenance FILE records provenance"),
    ],
)
def test_ignored_options_give_a_warning(workflow_file: Path, tmp_path: Path, args: list[str], warning: str) -> None:
    inputs = tmp_path / "in.json"
    inputs.write_text('{"Numbers": 2}')
    given = [arg.replace("{inputs}", str(inputs)).replace("{tmp}", str(tmp_path)) for arg in args]
    done = aiod4p("run", str(workflow_file), *given)
    assert done.returncode == 0, done.stderr
    assert f"aiod4p: warning: {warning}" in done.stderr.splitlines()
    shutil.rmtree(tmp_path / "ck", ignore_errors=True)
    quiet = aiod4p("run", str(workflow_file), "-q", *given)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_the_help_of_oversubscribe_names_every_mapping_that_caps_n_at_the_cpus() -> None:
    """multi, mpi started by aiod4p, and ray on a local Ray start at most one worker per CPU (docs/cli.md)."""
    found = re.search(r"^ +--oversubscribe +(.*?)^ +--", aiod4p("run", "--help").stdout, re.M | re.S)
    assert found is not None
    entry = " ".join(found.group(1).split())
    assert [name for name in ("multi", "mpi", "ray") if name not in entry] == [], entry


def test_provenance_over_restarts_says_it_records_the_last_attempt(workflow_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("prov")
    done = aiod4p(
        "run", str(workflow_file), "-m", "multi", "-n", "2", "-i", "2", "--checkpoint-dir", str(tmp_path / "ck"),
        "--restarts", "1", "--provenance", str(tmp_path / "prov.json"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        "aiod4p: warning: --provenance records the last attempt only: after a restore (--restore, or a restart"
        " after a dead worker) it starts at the checkpoint, so results made before it are not traced, and lineage"
        " through PE state restored from it stops there"
    ) in done.stderr.splitlines()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mapping", ["multi", "mpi"])
def test_at_most_one_worker_per_cpu_on_this_machine(mapping: str, workflow_file: Path, tmp_path: Path) -> None:
    """dispel4py users pass a process per PE instance (-n 10 on 2 cores): more workers than CPUs only compete.

    multi's workers, and the ranks of an mpiexec that aiod4p starts, run on this machine.
    """
    stats = tmp_path / "stats.json"
    run = ("run", str(workflow_file), "-m", mapping, "-i", "4", "--stats-json", str(stats))
    done = aiod4p(*run, "-n", "3", one_cpu=True)
    assert done.returncode == 0, done.stderr
    started = {"multi": "worker process", "mpi": "rank"}[mapping]  # what the mapping starts
    assert (
        f"aiod4p: warning: -n 3: 1 CPU available, so 1 {started} (more would only compete for them;"
        " --oversubscribe starts 3)" in done.stderr.splitlines()
    )
    assert json.loads(stats.read_text())["workers"] == 1
    over = aiod4p(*run, "-n", "3", "--oversubscribe", one_cpu=True)
    assert over.returncode == 0 and "warning" not in over.stderr, over.stderr
    assert json.loads(stats.read_text())["workers"] == 3


@pytest.mark.parametrize("mapping", ["simple", "multi", "mpi"])
def test_results_on_stdout_are_not_mixed_with_what_pes_print(tmp_path: Path, mapping: str) -> None:
    """`--results -` (and `--stats-json -`) is read by `jq` or `head`: what PEs print, in the command's process
    or in its workers, goes to stderr, and stdout holds the JSON only."""
    flow = tmp_path / "chatty.py"
    flow.write_text(
        numbers_flow(
            """
            class Chatty(IterativePE):
                def process_item(self, item):
                    print(f"processing {item}")  # one write: whole even if another process writes too
                    return item
            """
        ).replace("graph = WorkflowGraph()", 'print("loading")\ngraph = WorkflowGraph()')
    )
    done = aiod4p("run", str(flow), "-m", mapping, "-n", "2", "-i", "3", "--results", "-", "-q")
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["data"] for line in done.stdout.splitlines()) == [1, 2, 3]
    assert sorted(re.findall(r"processing \d", done.stderr)) == [f"processing {n}" for n in (1, 2, 3)]
    results = tmp_path / "results.jsonl"
    stats = aiod4p(
        "run", str(flow), "-m", mapping, "-n", "2", "-i", "3", "--results", str(results), "--stats-json", "-"
    )
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["mapping"] == mapping


@pytest.mark.parametrize("mapping", ["multi", "mpi"])
def test_what_pes_print_survives_a_thread_they_leave_running(tmp_path: Path, mapping: str) -> None:
    """A worker kept from exiting by a thread that a PE's library left running is stopped by the launcher:
    what its PEs printed, still in stdout's buffer (a pipe: block-buffered), was lost with it."""
    flow = tmp_path / "lingering.py"
    flow.write_text(LINGERING_FLOW)
    done = aiod4p("run", str(flow), "-m", mapping, "-n", "2", "-i", "3", "-q", env=BUFFERED, timeout=20)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr  # the MPI ranks' output reaches stderr
    assert sorted(re.findall(r"processing \d", printed)) == [f"processing {n}" for n in (1, 2, 3)]


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_results_into_a_pipe_keep_stdout_blocking(tmp_path: Path, mapping: str) -> None:
    """The watch for the pipe's reader going away must not make stdout non-blocking (uvloop does so to what
    it watches): a write into a full pipe would then fail instead of waiting for the reader."""
    flow = tmp_path / "blocking.py"
    flow.write_text(
        numbers_flow(
            "class Check(IterativePE):\n    def process_item(self, item):\n        return os.get_blocking(1)\n"
        )
    )
    flow.write_text("import os\n" + flow.read_text())
    done = aiod4p("run", str(flow), "-m", mapping, "-i", "2", "--results", "-", "-q")  # stdout: a pipe
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["data"] for line in done.stdout.splitlines()] == [True, True]


def test_graph_draws_the_workers_run_would_start(workflow_file: Path, tmp_path: Path) -> None:
    drawing = tmp_path / "flow.dot"
    capped = aiod4p("graph", str(workflow_file), "-m", "multi", "-n", "3", "-o", str(drawing), one_cpu=True)
    assert capped.returncode == 0 and "so 1 worker process" in capped.stderr, capped.stderr
    assert " on worker" not in drawing.read_text()  # one worker: no placement to show
    over = aiod4p(
        "graph", str(workflow_file), "-m", "multi", "-n", "3", "--oversubscribe", "-o", str(drawing), one_cpu=True
    )
    assert over.returncode == 0 and "warning" not in over.stderr, over.stderr
    assert "workers 0-2" in drawing.read_text()


def test_graph_to_dash_writes_the_dot_text_to_stdout(workflow_file: Path, tmp_path: Path) -> None:
    """``aiod4p graph flow.py -o - | dot -Tpng > flow.png``: `-o -` was refused (the file name must end with one
    of .dot, ...). What the workflow prints as it loads goes to stderr: in the dot text, dot would refuse it."""
    talking = tmp_path / "talking.py"
    talking.write_text('print("loading my workflow")\n' + workflow_file.read_text())
    drawn = aiod4p("graph", str(talking), "-m", "multi", "-n", "3", "--oversubscribe", "-o", "-")
    assert drawn.returncode == 0 and drawn.stderr == "loading my workflow\n", drawn.stderr
    assert drawn.stdout.startswith("digraph ") and "workers 0-2" in drawn.stdout and "wrote" not in drawn.stdout


@pytest.mark.timeout(120)
def test_mpi_ranks_on_named_hosts_are_not_capped(workflow_file: Path, tmp_path: Path) -> None:
    stats, hosts = tmp_path / "stats.json", tmp_path / "hosts"
    hosts.write_text("localhost:2\n")
    spread = aiod4p(
        "run", str(workflow_file), "-m", "mpi", "-n", "2", "-i", "4", "--stats-json", str(stats),
        env={**os.environ, "AIOD4P_MPIEXEC_ARGS": f"-f {hosts}"}, one_cpu=True)  # fmt: skip
    assert spread.returncode == 0 and "warning" not in spread.stderr, spread.stderr
    assert json.loads(stats.read_text())["workers"] == 2


def test_many_more_workers_than_cpus_give_a_warning(workflow_file: Path) -> None:
    n = 4 * len(os.sched_getaffinity(0)) + 1
    done = aiod4p("run", str(workflow_file), "-m", "multi", "-n", str(n), "-i", "1", "--oversubscribe")
    assert done.returncode == 0, done.stderr
    assert f"aiod4p: warning: -n {n} starts {n} worker processes on" in done.stderr
    fine = aiod4p("run", str(workflow_file), "-m", "multi", "-n", "2", "-i", "1")
    assert "warning" not in fine.stderr


def test_many_more_ray_actors_than_this_machine_s_cpus_give_no_warning_on_a_cluster(workflow_file: Path) -> None:
    # -n 64 --address HEAD from a laptop said the actors "compete for the CPUs (-n 2 uses every CPU)".
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # no Ray head there: the run fails at once, after the warnings
        n = 4 * len(os.sched_getaffinity(0)) + 1
        address = f"127.0.0.1:{refusing.getsockname()[1]}"
        done = aiod4p("run", str(workflow_file), "-m", "ray", "-n", str(n), "--address", address)
    assert done.returncode == 1 and "cannot join the Ray cluster" in done.stderr, done.stderr
    assert "warning" not in done.stderr, done.stderr


def test_oversubscribe_on_a_mapping_that_does_not_cap_workers_gives_a_warning(workflow_file: Path) -> None:
    done = aiod4p("run", str(workflow_file), "-m", "async", "-n", "2", "-i", "1", "--oversubscribe")
    assert done.returncode == 0, done.stderr
    assert (
        "aiod4p: warning: --oversubscribe is ignored: the async mapping does not limit -n to the CPUs"
        in done.stderr.splitlines()
    )


@pytest.mark.parametrize(
    ("option", "what"),
    [("--results", "results"), ("--stats-json", "statistics"), ("--provenance", "provenance")],
    ids=["results", "stats", "provenance"],
)
@pytest.mark.parametrize(
    "where",
    ["/no/such/dir/out.json", "{tmp}", "/sys/aiod4p-out.json", "/sys/kernel/uevent_seqnum"],
    ids=["missing-dir", "a-directory", "refused-by-the-file-system", "an-existing-file-refused-by-the-file-system"],
)
def test_output_paths_are_checked_before_the_run(tmp_path: Path, option: str, what: str, where: str) -> None:
    """Nothing is run (the workflow file is not even imported) when an output cannot be written; also where
    the permissions say yes but the file system says no (/sys, for root too: the file is opened, or a new
    one tried beside it)."""
    marker = tmp_path / "imported"
    flow = tmp_path / "marking.py"
    flow.write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n" + WORKFLOW)
    path = where.format(tmp=tmp_path)
    done = aiod4p("run", str(flow), "-i", "3", option, path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"aiod4p: error: cannot write {what} to {path}: "
        + {"/no": "No such file or directory", "/sy": "Permission denied"}.get(path[:3], "it is a directory")
    ]
    assert not marker.exists()


def test_checking_a_new_output_path_leaves_no_file(tmp_path: Path) -> None:
    """The check creates a new file and removes it: a run that fails before it writes leaves nothing."""
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    done = aiod4p("run", str(tmp_path / "missing.py"), "--results", str(out), "--stats-json", str(stats))
    assert done.returncode == 1 and "does not exist" in done.stderr
    assert not out.exists() and not stats.exists()


def test_results_file_ends_with_a_summary_unless_quiet(workflow_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done = aiod4p("run", str(workflow_file), "-i", "5", "--results", str(out))
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"aiod4p: 5 records in \d+\.\d s -> {re.escape(str(out))}\n", done.stderr)
    quiet = aiod4p("run", str(workflow_file), "-i", "5", "--results", str(out), "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    to_stdout = aiod4p("run", str(workflow_file), "-i", "5", "--results", "-")
    assert to_stdout.stderr == ""


# stdout buffered, as it is by default: what is still buffered at the end must fail alike
BUFFERED = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}


@pytest.mark.parametrize(
    ("mapping", "results", "items"),
    [
        ("simple", "-", 100_000),
        ("simple", None, 100_000),
        ("simple", "/dev/full", 100_000),
        ("multi", "/dev/full", 100_000),
        ("simple", "-", 5),
        ("simple", None, 5),
    ],
)
def test_results_that_cannot_be_written_fail_the_run_with_one_line(
    mapping: str, results: str | None, items: int, tmp_path: Path
) -> None:
    """A full disk (``/dev/full``) under ``--results FILE``, ``--results -`` or the printed results: exit 1 and
    ``aiod4p: error: cannot write results to ...``, not a traceback; also when the results are few enough to
    stay in stdout's buffer until the end."""
    flow = tmp_path / "flow.py"
    flow.write_text(TIMES10_FLOW)
    options = ["--results", results] if results is not None else []
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*AIOD4P, "run", str(flow), "-m", mapping, "-i", str(items), "-q", *options],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=BUFFERED,
        )
    where = "/dev/full" if results == "/dev/full" else "stdout"
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"aiod4p: error: cannot write results to {where}: No space left on device"]


@pytest.mark.parametrize("command", ["stats-json", "graph"])
def test_a_report_to_a_full_stdout_is_one_line_of_error(tmp_path: Path, command: str) -> None:
    """`--stats-json -` or `aiod4p graph`'s report on a full disk: exit 1 and one `aiod4p: error:` line."""
    flow = tmp_path / "flow.py"
    flow.write_text(TIMES10_FLOW)
    args = {
        "stats-json": ["run", str(flow), "-q", "--results", str(tmp_path / "out.jsonl"), "--stats-json", "-"],
        "graph": ["graph", str(flow), "-o", str(tmp_path / "flow.dot")],
    }[command]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*AIOD4P, *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, env=BUFFERED
        )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiod4p: error: ") and "No space left on device" in lines[0]


@pytest.mark.parametrize("closed", ["<&-", ">&-", "<&- >&-"])
def test_a_closed_standard_stream_is_taken_as_python_takes_it(tmp_path: Path, closed: str) -> None:
    """`aiod4p run ... --results - >&-` (a cron job, a daemon): stdin closed is empty, stdout closed drops the
    output, exit 0, as Python does; the run's own files no longer get numbers 0 and 1 (uvloop aborted)."""
    flow = tmp_path / "flow.py"
    flow.write_text(TIMES10_FLOW)
    command = shlex.join([*AIOD4P, "run", str(flow), "-i", "5", "--results", "-"])
    done = subprocess.run(["bash", "-c", f"{command} {closed}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_module_target_from_the_current_directory_with_the_console_script(workflow_file: Path) -> None:
    """`aiod4p run flow:graph` imports flow from the current directory, as `python -m aiod4p` does."""
    script = Path(sys.executable).parent / "aiod4p"
    done = subprocess.run(
        [str(script), "run", "flow:graph", "-m", "simple", "-i", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=workflow_file.parent,
    )
    assert done.returncode == 0, done.stderr
    assert "Check1.output: 1 item" in done.stdout


ENDLESS = TIMES10_FLOW


def _popen(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    flow = tmp_path / "endless.py"
    flow.write_text(ENDLESS)
    return aiod4p_process("run", str(flow), *args)


def _piped_to_head(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``aiod4p run _endless:graph ARGS | head -2`` in a real shell pipe; stderr ends with the CLI's status."""
    (tmp_path / "_endless.py").write_text(ENDLESS)
    command = shlex.join([*AIOD4P, "run", "_endless:graph", *args])
    return subprocess.run(
        ["bash", "-c", f'{command} | head -2; echo "status=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("mapping", ["simple", "async", "multi", "mpi"])
def test_a_closed_stdout_stops_the_run_quietly(tmp_path: Path, mapping: str) -> None:
    """`aiod4p run ... --results - | head -2`: exit 141 (the SIGPIPE status of Unix tools), no traceback."""
    done = _piped_to_head(tmp_path, "-m", mapping, "-i", str(10**9), "--results", "-")
    assert [json.loads(line)["pe"] for line in done.stdout.splitlines()] == ["Times101", "Times101"]
    assert done.stderr.splitlines() == ["status=141"], done.stderr


PRINTING_FLOW = numbers_flow(
    """
    class Printer(IterativePE):
        def process_item(self, item):
            print("line", item)
    """
)


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
def test_a_pe_printing_into_a_closed_stdout_stops_the_run_quietly(tmp_path: Path, mapping: str) -> None:
    """`aiod4p run flow.py | head -2`, a PE printing each item: exit 141 once `head` left, as with `--results -`;
    the PE's BrokenPipeError failed the run naming it, exit 1."""
    flow = tmp_path / "printing.py"
    flow.write_text(PRINTING_FLOW)
    command = shlex.join([*AIOD4P, "run", str(flow), "-m", mapping, "-n", "2", "-i", str(10**9), "-q"])
    done = subprocess.run(
        ["bash", "-c", f'{command} | head -2; echo "status=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert len(done.stdout.splitlines()) == 2
    assert done.stderr.splitlines() == ["status=141"], done.stderr


def test_a_broken_pipe_of_a_pes_own_fails_it_while_stdout_is_read(tmp_path: Path) -> None:
    """Only stdout's reader leaving stops the run quietly: a PE's own pipe without a reader is its failure."""
    flow = tmp_path / "own_pipe.py"
    flow.write_text(
        numbers_flow(
            """
            import os

            class OwnPipe(IterativePE):
                def process_item(self, item):
                    read, write = os.pipe()
                    os.close(read)
                    with os.fdopen(write, "w") as pipe:
                        pipe.write("lost")
            """
        )
    )
    command = shlex.join([*AIOD4P, "run", str(flow), "-m", "simple", "-i", "3", "-q"])
    done = subprocess.run(
        ["bash", "-c", f'{command} | cat; echo "status=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stderr.splitlines()[-1] == "status=1", done.stderr
    assert "aiod4p: error: PE OwnPipe1[0] failed on input port 'input': BrokenPipeError" in done.stderr


def test_a_closed_stdout_stops_the_readable_listing_quietly(tmp_path: Path) -> None:
    done = _piped_to_head(tmp_path, "-m", "simple", "-i", "100000")
    assert done.stdout.splitlines() == ["Times101.output: 100000 items", "  10"]
    assert done.stderr.splitlines() == ["status=141"], done.stderr


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("mapping", ["simple", "multi"])
def test_a_results_fifo_whose_reader_leaves_fails_naming_it(tmp_path: Path, mapping: str, checkpointed: bool) -> None:
    """`--results FIFO` read by `head -2`: results are lost, unlike `| head` on stdout, so exit 1 naming it.
    With checkpoints, the PE whose results were being written was blamed (a BrokenPipeError)."""
    (tmp_path / "_endless.py").write_text(ENDLESS)
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    args = ["run", "_endless:graph", "-m", mapping, "-i", str(10**9), "--results", str(fifo)]
    if checkpointed:
        args += ["--checkpoint-dir", str(tmp_path / "ck"), "--restarts", "1" if mapping == "multi" else "0"]
    command = shlex.join([*AIOD4P, *args])
    done = subprocess.run(
        ["bash", "-c", f'head -2 < {shlex.quote(str(fifo))} & {command}; echo "status=$?" >&2; wait'],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert len(done.stdout.splitlines()) == 2
    assert done.stderr.splitlines() == [
        f"aiod4p: error: cannot write results to {fifo}: its reader went away",
        "status=1",
    ], done.stderr


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
def test_an_interrupted_run_says_so_and_counts_its_records(tmp_path: Path, mapping: str) -> None:
    with _popen(tmp_path, "-m", mapping, "-i", str(10**9), "--results", "-") as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            first = process.stdout.readline()  # results are flowing
            process.send_signal(signal.SIGINT)
            rest = process.stdout.read()  # to the end: the run drained (else the test's timeout fails it)
            err = process.stderr.read()
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    produced = len((first + rest).splitlines())
    assert process.returncode == 0, err
    assert f"aiod4p: interrupted by SIGINT: drained; {produced} records produced (partial results)" in err


SLOW_START = """
import sys, time
from aiod4p import IterativePE, ProducerPE, WorkflowGraph

class Numbers(ProducerPE):
    def produce(self):
        return 1

class Slow(IterativePE):
    copies = 0
    def __deepcopy__(self, memo):
        if Slow.copies == 0:
            print("starting", file=sys.stderr, flush=True)
        Slow.copies += 1
        time.sleep(0.05)  # ok-sleep: a PE that is slow to copy makes a long start-up
        clone = Slow()
        clone.id = self.id
        return clone
    def process_item(self, item):
        return item

graph = WorkflowGraph()
graph.connect(Numbers(), "output", Slow(), "input")
"""

SLOW_IMPORT = """
import sys, time
print("starting", file=sys.stderr, flush=True)
while True:
    time.sleep(0.05)  # ok-sleep: a workflow module that takes forever to import
"""

SLOW_PLAN = """
import sys, time
from aiod4p import IterativePE, WorkflowGraph

class Slow(IterativePE):
    @property
    def _parallelism(self):  # what the planner asks of every PE
        print("starting", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.05)  # ok-sleep: a plan that takes forever
    def process_item(self, item):
        return item

graph = WorkflowGraph()
graph.add(Slow())
"""


@pytest.mark.parametrize(
    ("mapping", "module", "signum", "when"),
    [
        ("async", SLOW_START, signal.SIGINT, "while starting the PE instances"),
        ("async", SLOW_START, signal.SIGTERM, "while starting the PE instances"),
        ("simple", SLOW_IMPORT, signal.SIGTERM, "while loading the workflow"),
        ("multi", SLOW_IMPORT, signal.SIGINT, "while loading the workflow"),
        ("multi", SLOW_PLAN, signal.SIGTERM, "while planning the run"),
    ],
    ids=["async-build-int", "async-build-term", "simple-import-term", "multi-import-int", "multi-plan-term"],
)
def test_a_signal_during_start_up_stops_the_run_at_once(
    tmp_path: Path, mapping: str, module: str, signum: signal.Signals, when: str
) -> None:
    flow = tmp_path / "slow.py"
    flow.write_text(module)
    workers = ["-n", "5000"] if mapping == "async" else []  # 5000 slow copies on async
    process = aiod4p_process("run", str(flow), "-m", mapping, *workers, "-i", "1")
    try:
        assert process.stderr is not None
        assert process.stderr.readline() == "starting\n"  # start-up is under way (it would take minutes)
        process.send_signal(signum)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130, err
    assert f"aiod4p: aborted by {signum.name} {when}; 0 records produced" in err
    assert "Traceback" not in err


BLOCKS_AN_IMPORT = """
import os, signal, sys

class Block:
    \"\"\"Holds the import of module $BLOCK_AT (once): says so on stderr, then waits for a signal.\"\"\"
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["BLOCK_AT"]:
            sys.meta_path.remove(self)
            print("importing " + name, file=sys.stderr, flush=True)
            signal.pause()
        return None

sys.meta_path.insert(0, Block())
"""

CONSOLE_SCRIPT = """
import sys
from aiod4p._cli import entry
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(entry())
"""
"""The ``aiod4p`` script pip writes for the console script ``aiod4p = aiod4p._cli:entry``."""


@pytest.mark.parametrize("launcher", ["python -m aiod4p", "console script"])
@pytest.mark.parametrize(
    ("module", "said"),
    [
        ("aiod4p._api", "aiod4p: aborted by SIGINT while starting"),  # while aiod4p imports its own modules
        ("argparse", "aiod4p: aborted by SIGINT while starting"),  # while aiod4p._cli imports (the entry's module)
        ("dependency", "aiod4p: aborted by SIGINT while loading the workflow; 0 records produced"),  # the flow's
    ],
    ids=["importing-aiod4p", "importing-the-cli", "importing-the-workflow"],
)
def test_ctrl_c_while_the_command_imports_is_one_line_and_status_130(
    tmp_path: Path, launcher: str, module: str, said: str
) -> None:
    """Ctrl-C in the first fraction of a second of `aiod4p run` (Python importing aiod4p, before the command takes
    signals itself) printed Python's KeyboardInterrupt traceback, and the process died of SIGINT. The import is
    held (a sitecustomize.py) until the signal comes, so that it comes there."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKS_AN_IMPORT)
    (tmp_path / "aiod4p").write_text(CONSOLE_SCRIPT)
    (tmp_path / "dependency.py").write_text("")
    flow = tmp_path / "flow.py"
    flow.write_text(f"import dependency\n{WORKFLOW}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "BLOCK_AT": module}
    command = AIOD4P if launcher == "python -m aiod4p" else [sys.executable, str(tmp_path / "aiod4p")]
    with reaped(aiod4p_process("run", str(flow), "-m", "simple", "-i", "1", env=env, command=command)) as process:
        assert process.stderr is not None
        assert process.stderr.readline() == f"importing {module}\n"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert (process.returncode, err) == (130, said + "\n")


KEEPS_ITS_HANDLERS = """
import signal, sys

def mine(signum, frame):
    pass

signal.signal(signal.SIGTERM, mine)
{body}
print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGTERM) is mine)
"""


@pytest.mark.parametrize(
    ("how", "body"),
    [
        ("script", "from aiod4p._cli import main"),
        ("-c", "import aiod4p._cli"),
        ("named aiod4p", "from aiod4p._cli import main\nassert main(sys.argv[1:]) == 0"),
    ],
    ids=["imports-the-cli", "python-c", "calls-main"],
)
def test_a_program_importing_the_cli_keeps_its_own_signal_handlers(
    tmp_path: Path, workflow_file: Path, how: str, body: str
) -> None:
    """A wrapper script (`from aiod4p._cli import main`, then main(argv)) or a `python -c` one-liner importing
    aiod4p._cli was taken for the aiod4p command: its SIGINT/SIGTERM handlers were replaced for good, and every
    Ctrl-C ended it with `aborted by SIGINT while starting`. One named `aiod4p` calling main() gets them back."""
    program = KEEPS_ITS_HANDLERS.format(body=body)
    script = tmp_path / ("aiod4p" if how == "named aiod4p" else "wrapper.py")
    script.write_text(program)
    command = [sys.executable, "-c", program] if how == "-c" else [sys.executable, str(script)]
    arguments = ["run", str(workflow_file), "-m", "simple", "-i", "1", "-q"] if how == "named aiod4p" else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "True True", done.stdout + done.stderr


EXITS_SLOWLY = """
import atexit, signal, sys

def clean_up():  # as a library's may: slow
    print("exiting", file=sys.stderr, flush=True)
    signal.pause()

atexit.register(clean_up)
"""


@pytest.mark.parametrize(
    ("blocks", "status"),
    [("", 0), ("print('loading', file=sys.stderr, flush=True)\nsignal.pause()\n", 130)],
    ids=["after-the-run", "after-an-abort-while-loading"],
)
def test_ctrl_c_while_the_command_exits_ends_it_with_its_status(tmp_path: Path, blocks: str, status: int) -> None:
    """Ctrl-C while the command exited (an atexit clean-up; or Ctrl-C twice while the workflow loaded) printed
    Python's "Exception ignored in atexit callback" (or in threading._shutdown) with a KeyboardInterrupt traceback."""
    flow = tmp_path / "flow.py"
    flow.write_text(EXITS_SLOWLY + blocks + WORKFLOW)
    with reaped(aiod4p_process("run", str(flow), "-m", "simple", "-i", "1")) as process:
        assert process.stderr is not None
        if status:
            assert process.stderr.readline() == "loading\n"
            process.send_signal(signal.SIGINT)
            said = process.stderr.readline()
            assert said == "aiod4p: aborted by SIGINT while loading the workflow; 0 records produced\n"
        assert process.stderr.readline() == "exiting\n"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert process.returncode == status, err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err


def test_ctrl_c_while_the_command_reads_its_arguments_is_one_line() -> None:
    """A KeyboardInterrupt before main() takes Ctrl-C itself (while it builds its parser) is the command's abort."""
    interrupted = (
        "import aiod4p._cli as cli\n"
        "def interrupted():\n"
        "    raise KeyboardInterrupt\n"
        "cli._parser = interrupted\n"
        "cli.entry()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", interrupted, "run", WORDCOUNT], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert (done.returncode, done.stderr) == (130, "aiod4p: aborted by SIGINT\n")


HOLDS_THE_LOOP = """
import sys, time
from aiod4p import ProducerPE, WorkflowGraph

class Hold(ProducerPE):
    def produce(self):
        print("holding", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.005)  # ok-sleep: a PE that holds the event loop, never giving way

graph = WorkflowGraph()
graph.add(Hold())
"""


HELD_BY_HOLD = (
    r"aiod4p: aborted by SIGINT; 0 records produced \(the event loop was held by a PE \(produce, hold\.py line [89]\)\)"
)


def _interrupted_twice(flow: Path, *args: str) -> tuple[int, str, float]:
    """``aiod4p run FLOW ARGS``, whose PE prints "holding" once it holds the event loop: SIGINT, and SIGINT again
    once the first is acted on. Its exit status, its stderr, and the seconds it took to end after the second."""
    process = aiod4p_process("run", str(flow), *args)
    try:
        assert process.stderr is not None
        assert process.stderr.readline() == "holding\n"  # the run is under way, its loop held
        process.send_signal(signal.SIGINT)
        assert process.stderr.readline().startswith("aiod4p: SIGINT: stopping the sources")  # the first, acted on
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = process.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, err, took


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_a_second_signal_aborts_within_a_second_while_a_pe_holds_the_loop(tmp_path: Path, mapping: str) -> None:
    flow = tmp_path / "hold.py"
    flow.write_text(HOLDS_THE_LOOP)
    status, err, took = _interrupted_twice(flow, "-m", mapping, "-i", "1")
    assert status == 130, err
    assert re.fullmatch(HELD_BY_HOLD, err.splitlines()[-1]), err
    assert took < 2.0  # the README promises a second; the watchdog acts at 0.9 s, a loaded machine adds to it


def test_an_abort_under_restarts_says_its_count_is_of_what_checkpoints_committed(tmp_path: Path) -> None:
    """The file of a run under --restarts holds the results written after its last checkpoint too, which a restore
    drops, and the count is of those the checkpoints committed: 45,416 records "produced" for a file of 49,950
    lines, said as if they were the file's. It may hold no more (this run's holds nothing): it was said to."""
    flow = tmp_path / "hold.py"
    flow.write_text(HOLDS_THE_LOOP)
    checkpoints = ["--checkpoint-dir", str(tmp_path / "ck"), "--restarts", "1", "--results", str(tmp_path / "out")]
    status, err, _ = _interrupted_twice(flow, "-m", "multi", "-n", "1", "-i", "1", *checkpoints)
    assert status == 130, err
    assert err.splitlines()[-1].startswith(
        "aiod4p: aborted by SIGINT; 0 records committed by checkpoints (the results file may hold more, written"
    ), err
    assert (tmp_path / "out").read_bytes() == b""


def test_ctrl_c_in_a_command_without_signal_handling_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while `aiod4p graph` imported a workflow (seconds, with scipy) or `aiod4p stats plot` drew
    printed Python's KeyboardInterrupt traceback; it is one line and the status of an abort now."""

    def interrupted(target: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("aiod4p._cli.load_workflow", interrupted)
    assert main(["graph", WORDCOUNT, "-o", "never.svg"]) == 130
    err = capsys.readouterr().err
    assert err == "aiod4p: aborted by SIGINT\n"


def test_an_abort_past_a_pe_holding_the_loop_still_writes_the_statistics(tmp_path: Path) -> None:
    """The watchdog that ends a run whose loop a PE holds wrote neither --stats nor --stats-json (it ended
    the process before the run's own end could), where docs/observability.md promises both after an abort."""
    flow = tmp_path / "hold.py"
    flow.write_text(HOLDS_THE_LOOP)
    stats = tmp_path / "stats.json"
    status, err, _ = _interrupted_twice(flow, "-i", "1", "--stats", "--stats-json", str(stats))
    assert status == 130, err
    assert "Statistics per PE" in err
    assert re.fullmatch(HELD_BY_HOLD, err.splitlines()[-1]), err
    document = json.loads(stats.read_text())
    assert document["finished"] is False and document["pes"]["Hold0"]["items_in"] == 1


WRITES_THEN_HOLDS_THE_LOOP = """
import asyncio, sys, time
from aiod4p import ProducerPE, WorkflowGraph

WRITTEN = []

class Write(ProducerPE):
    def produce(self):
        yield from range(3)
        WRITTEN.append(True)

class Hold(ProducerPE):
    async def produce(self):
        while not WRITTEN:  # the other source's results reach the results file first
            await asyncio.sleep(0.01)
        for _ in range(100):  # the turns of the loop that hand them to the results file
            await asyncio.sleep(0)
        print("holding", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.005)  # ok-sleep: a PE that holds the event loop, never giving way
        yield 0

graph = WorkflowGraph()
graph.add(Write())
graph.add(Hold())
"""


def test_an_abort_past_a_pe_holding_the_loop_writes_the_statistics_when_the_results_cannot_be(tmp_path: Path) -> None:
    """The watchdog flushed the results file, then wrote the statistics: on a full disk the flush raised, and the
    statistics were never written, nor was the error said."""
    flow = tmp_path / "hold.py"
    flow.write_text(WRITES_THEN_HOLDS_THE_LOOP)
    stats = tmp_path / "stats.json"
    status, err, _ = _interrupted_twice(flow, "-i", "1", "--results", "/dev/full", "--stats-json", str(stats))
    assert status == 130, err
    assert "aiod4p: error: cannot write results to /dev/full: No space left on device" in err
    assert json.loads(stats.read_text())["finished"] is False


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "aiod4p"
    done = subprocess.run([str(script), "run", WORDCOUNT, "-m", "simple"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "('the', 5)" in done.stdout


@pytest.mark.parametrize("mapping", ["simple", "async", "multi"])
@pytest.mark.parametrize("on_bad", ["fail", "skip", "dead-letter"])
def test_stdin_bad_lines_follow_on_bad(tmp_path: Path, mapping: str, on_bad: str) -> None:
    flow = tmp_path / "echo.py"
    flow.write_text(ECHO_PE + "graph = WorkflowGraph()\ngraph.add(Echo(name='echo'))\n")
    lines = '{"i": 1}\n' + '{"long": "' + "z" * 500 + '"}\n{"i": 2}\nnot json\n'
    stats = tmp_path / "stats.json"
    options = ["--max-line", "100", "--on-bad", on_bad, "--results", "-", "--stats-json", str(stats)]
    done = aiod4p("run", str(flow), "-m", mapping, "--stdin", "echo", *options, input=lines)
    err = done.stderr
    if on_bad == "fail":
        assert done.returncode == 1
        last = err.splitlines()[-1]  # the same error on every mapping (multi's launcher reads stdin)
        limit = "(512 bytes; --max-line, or max_line=, raises the limit)"
        assert last.startswith(f"aiod4p: error: stdin, line 2: longer than 100 bytes {limit}: "), err
        return
    assert done.returncode == 0, err
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(r["data"]["i"] for r in records if r["output"] == "output") == [1, 2]
    letters = [r["data"] for r in records if r["output"] == "dead_letter"]
    if on_bad == "skip":
        assert letters == []
        assert "aiod4p: warning: --stdin: 2 bad lines skipped" in err
        assert [pe["skipped"] for pe in json.loads(stats.read_text())["pes"].values()] == [2]  # in its statistics
        assert "stdin, line 4: not valid JSON" in err
    else:
        assert [(d["source"], d["line"], d["size"]) for d in letters] == [("stdin", 2, 512), ("stdin", 4, 8)]
        assert {r["pe"] for r in records if r["output"] == "dead_letter"} == {"stdin"}


@pytest.mark.parametrize("on_bad", ["fail", "skip", "dead-letter"])
def test_stdin_lines_that_are_not_utf8_are_bad_lines(tmp_path: Path, on_bad: str) -> None:
    """``printf '\\xff\\xfe1\\x00\\n2\\x00\\n'`` gave the items 1 and 2: json read the first line as UTF-16 (its byte
    order mark) and the second as UTF-16 too (a NUL after an ASCII byte). Lines are read as UTF-8 only."""
    flow = tmp_path / "echo.py"
    flow.write_text(ECHO_PE + "graph = WorkflowGraph()\ngraph.add(Echo(name='echo'))\n")
    done = subprocess.run(
        [*AIOD4P, "run", str(flow), "--stdin", "echo", "--on-bad", on_bad, "--results", "-"],
        input=b'\xff\xfe1\x00\n2\x00\n{"i": 3}\n',
        capture_output=True,
        timeout=60,
    )
    err = done.stderr.decode()
    first = "stdin, line 1: not UTF-8 (byte 0: invalid start byte)"
    if on_bad == "fail":
        assert done.returncode == 1
        assert err.splitlines()[-1] == rf"aiod4p: error: {first}: b'\xff\xfe1\x00'", err
        return
    assert done.returncode == 0, err
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["data"] for r in records if r["output"] == "output"] == [{"i": 3}]
    letters = [(r["data"]["line"], r["data"]["error"]) for r in records if r["output"] == "dead_letter"]
    if on_bad == "skip":
        assert letters == [] and f"{first}; line skipped" in err
    else:
        assert letters == [
            (1, "not UTF-8 (byte 0: invalid start byte)"),
            (2, "not valid JSON (Extra data: line 1 column 2 (char 1))"),
        ]
