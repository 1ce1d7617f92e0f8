"""The command line, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDCOUNT = str(ROOT / "examples" / "wordcount.py")


def aiod4p(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiod4p", *args], capture_output=True, text=True, timeout=60, cwd=cwd or ROOT
    )


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    path = tmp_path / "flow.py"
    path.write_text(
        textwrap.dedent(
            """
            from aiod4p import IterativePE, ProducerPE, WorkflowGraph

            class Numbers(ProducerPE):
                def __init__(self):
                    super().__init__()
                    self.n = 0
                def produce(self):
                    self.n += 1
                    return self.n

            class Check(IterativePE):
                def process_item(self, item):
                    if item == 13:
                        raise ValueError("unlucky")
                    return item * 10

            graph = WorkflowGraph()
            graph.connect(Numbers(), "output", Check(), "input")
            """
        )
    )
    return path


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_results_as_json_lines(mapping: str, workflow_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done = aiod4p("run", str(workflow_file), "--mapping", mapping, "-i", "5", "--results", str(out))
    assert done.returncode == 0, done.stderr
    lines = records(out)
    assert sorted(r["data"] for r in lines) == [10, 20, 30, 40, 50]  # type: ignore[type-var]
    assert {r["pe"] for r in lines} == {"Check1"} and {r["output"] for r in lines} == {"output"}


def test_results_printed_readably(workflow_file: Path) -> None:
    done = aiod4p("run", f"{workflow_file}:graph", "-m", "simple", "-i", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Check1.output: 2 items", "  10", "  20"]


def test_results_to_stdout(workflow_file: Path) -> None:
    done = aiod4p("run", str(workflow_file), "-i", "1", "--results", "-")
    assert json.loads(done.stdout) == {"pe": "Check1", "output": "output", "data": 10}


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


def test_pe_exception_gives_one_line_and_exit_1(workflow_file: Path) -> None:
    done = aiod4p("run", str(workflow_file), "-i", "20")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "aiod4p: error: PE Check1[0] failed on input port 'input': ValueError: unlucky"
    ]


def test_debug_adds_the_traceback(workflow_file: Path) -> None:
    done = aiod4p("--debug", "run", str(workflow_file), "-i", "20")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and 'raise ValueError("unlucky")' in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no/such/file.py"], "workflow file no/such/file.py does not exist"),
        (["run", "no_such_module_xyz"], "no module named 'no_such_module_xyz'"),
        (["run", "{flow}:missing"], "has no attribute 'missing'"),
        (["run", "{flow}", "-d", "{{not json"], "-d is not valid JSON"),
        (["run", "{flow}", "-d", '{{"Nobody": 1}}'], "input key 'Nobody' names no PE of the graph"),
        (["run", "{flow}", "-d", '{{"Numbers": "x"}}'], "the input for 'Numbers' must be a count or a list"),
        (["run", "{flow}", "-f", "missing.json"], "cannot read input file missing.json"),
        (["run", "{flow}", "-i", "-3"], "must not be negative"),
        (["run", "{flow}", "--results", "/no/such/dir/out.jsonl"], "cannot write results to /no/such/dir/out.jsonl"),
    ],
)
def test_errors_are_one_line_and_non_zero(workflow_file: Path, args: list[str], message: str) -> None:
    done = aiod4p(*(arg.format(flow=workflow_file) for arg in args))
    assert done.returncode == 1, done.stdout
    assert len(done.stderr.strip().splitlines()) == 1
    assert message in done.stderr


def test_several_graphs_need_a_choice(tmp_path: Path) -> None:
    (tmp_path / "two.py").write_text("from aiod4p import WorkflowGraph\na = WorkflowGraph()\nb = WorkflowGraph()\n")
    done = aiod4p("run", str(tmp_path / "two.py"))
    assert done.returncode == 1
    assert "defines several workflow graphs (a, b)" in done.stderr


def test_no_graph_in_module(tmp_path: Path) -> None:
    (tmp_path / "none.py").write_text("x = 1\n")
    done = aiod4p("run", str(tmp_path / "none.py"))
    assert "defines no WorkflowGraph" in done.stderr and done.returncode == 1


def test_import_error_in_the_workflow_file(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\n")
    done = aiod4p("run", str(tmp_path / "broken.py"))
    assert done.returncode == 1
    assert "importing" in done.stderr and "no_such_dependency_xyz" in done.stderr


@pytest.mark.parametrize(("args", "message"), [(["-m", "nowhere"], "invalid choice"), (["-n", "0"], "-n must be")])
def test_usage_errors_exit_2(workflow_file: Path, args: list[str], message: str) -> None:
    done = aiod4p("run", str(workflow_file), *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "aiod4p"
    done = subprocess.run([str(script), "run", WORDCOUNT, "-m", "simple"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "('the', 5)" in done.stdout
