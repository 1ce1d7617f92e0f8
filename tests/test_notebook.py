"""A workflow in a real Jupyter kernel: cells that define PEs and run them, as a notebook user does.

ipykernel runs every cell inside its own event loop, and Ctrl-C there is
"interrupt the kernel" (a SIGINT to the kernel process). One kernel serves
the module's cells, in order.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

MESSAGE_TIMEOUT = 60.0
AGAIN = 0.3  # seconds between interrupts of a cell that shows nothing
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Cell:
    """What one executed cell showed: its printed text (stdout and stderr) and its error, if any."""

    stdout: str = ""
    stderr: str = ""
    error: str | None = None


class Notebook:
    def __init__(self, manager: KernelManager, client: BlockingKernelClient) -> None:
        self.manager, self.client = manager, client

    def run(self, code: str, interrupt_on: str | None = None, again_until: str | None = None) -> Cell:
        """Execute ``code`` as a cell; interrupt the kernel once its output contains ``interrupt_on``, then
        again after each :data:`AGAIN` seconds that the cell shows nothing, until its stderr has ``again_until``
        (as a user presses it until something happens)."""
        msg_id = self.client.execute(code)
        cell = Cell()
        interrupted = False
        deadline = time.monotonic() + MESSAGE_TIMEOUT
        while True:
            pressing = interrupted and again_until is not None and again_until not in cell.stderr
            try:
                message = self.client.get_iopub_msg(timeout=AGAIN if pressing else MESSAGE_TIMEOUT)
            except queue.Empty:
                assert pressing and time.monotonic() < deadline, f"the cell went on: {cell}"
                self.manager.interrupt_kernel()
                continue
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    cell.stdout += content["text"]
                else:
                    cell.stderr += content["text"]
                if interrupt_on is not None and interrupt_on in cell.stdout and not interrupted:
                    self.manager.interrupt_kernel()
                    interrupted = True
            elif kind == "error":
                cell.error = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                return cell


@contextlib.contextmanager
def kernel(cwd: Path | None = None) -> Iterator[Notebook]:
    manager, client = start_new_kernel(kernel_name="python3", startup_timeout=MESSAGE_TIMEOUT, cwd=cwd)
    try:
        yield Notebook(manager, client)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def notebook() -> Iterator[Notebook]:
    with kernel() as started:
        yield started


DEFINITIONS = """
import itertools
import aiod4p
from aiod4p import IterativePE, ProducerPE, WorkflowGraph

class Numbers(ProducerPE):
    def produce(self):
        yield from range(5)

class Double(IterativePE):
    def process_item(self, x):
        return 2 * x

class Endless(ProducerPE):
    def produce(self):
        yield from itertools.count()

class Show(IterativePE):
    def process_item(self, x):
        if x == 5000:
            print("seen 5000", flush=True)
        return x
    def postprocess(self):
        print("postprocess ran", flush=True)

graph = WorkflowGraph()
graph.connect(Numbers(), "output", Double(), "input")
endless = WorkflowGraph()
endless.connect(Endless(), "output", Show(), "input")
"""


def test_a_cell_runs_a_workflow_defined_in_the_notebook(notebook: Notebook) -> None:
    assert notebook.run(DEFINITIONS).error is None
    cell = notebook.run("print(sorted(aiod4p.run(graph).data()))")
    assert (cell.error, cell.stdout) == (None, "[0, 2, 4, 6, 8]\n")
    assert "Warning" not in cell.stderr  # blocking the kernel's loop is what a cell does
    awaited = notebook.run("print(sorted((await aiod4p.run_async(graph, mapping='simple')).data()))")
    assert (awaited.error, awaited.stdout) == (None, "[0, 2, 4, 6, 8]\n")


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_interrupting_the_kernel_drains_the_run_and_the_kernel_goes_on(notebook: Notebook, mapping: str) -> None:
    notebook.run(DEFINITIONS)
    cell = notebook.run(f"aiod4p.run(endless, mapping={mapping!r})", interrupt_on="seen 5000")
    assert cell.error is not None and cell.error.startswith("KeyboardInterrupt: the run was interrupted and drained")
    assert cell.stdout == "seen 5000\npostprocess ran\n"
    kept = notebook.run("import sys; drained = sys.last_value.partial_results.data(); print(drained[5000])")
    assert (kept.error, kept.stdout) == (None, "5000\n")  # the drained run's results, kept
    after = notebook.run("print(sorted(aiod4p.run(graph).data()))")
    assert (after.error, after.stdout) == (None, "[0, 2, 4, 6, 8]\n")


@pytest.mark.parametrize("mapping", ["simple", "async"])
def test_interrupting_the_kernel_twice_stops_a_pe_that_holds_the_run(notebook: Notebook, mapping: str) -> None:
    """A PE stuck in a blocking loop holds the run's event loop: the second interrupt stops it in its own code."""
    notebook.run(DEFINITIONS)
    notebook.run(
        """
import time

class Stuck(IterativePE):
    def process_item(self, x):
        print("stuck", flush=True)
        while True:
            time.sleep(0.05)  # ok-sleep: the blocking call the PE is stuck in

stuck = WorkflowGraph()
stuck.connect(Numbers(), "output", Stuck(), "input")
"""
    )
    held = "a PE holds the event loop: interrupting its code"
    cell = notebook.run(f"aiod4p.run(stuck, mapping={mapping!r})", interrupt_on="stuck", again_until=held)
    # The cell's KeyboardInterrupt; or, when one more press (sent every AGAIN seconds until the message comes)
    # reaches the kernel while IPython reports it, IPython's bare "KeyboardInterrupt" in its place (seen once in CI).
    assert (cell.error or "").startswith("KeyboardInterrupt") or cell.stderr.rstrip().endswith("KeyboardInterrupt")
    assert held in cell.stderr
    after = notebook.run("print(sorted(aiod4p.run(graph).data()))")
    assert (after.error, after.stdout) == (None, "[0, 2, 4, 6, 8]\n")


def test_pes_and_item_classes_defined_in_the_notebook_run_on_worker_processes(notebook: Notebook) -> None:
    cell = notebook.run(
        """
import dataclasses, os

@dataclasses.dataclass
class Reading:
    value: int
    pid: int

class Read(IterativePE):
    def process_item(self, x):
        return Reading(x, os.getpid())

readings = WorkflowGraph()
read = Read()
read.numprocesses = 2
readings.connect(Numbers(), "output", read, "input")
results = aiod4p.run(readings, mapping="multi", workers=2).data()
print(sorted(r.value for r in results), all(isinstance(r, Reading) for r in results))
print(os.getpid() in {r.pid for r in results})
"""
    )
    assert (cell.error, cell.stdout) == (None, "[0, 1, 2, 3, 4] True\nFalse\n"), cell.stderr


def test_a_dispel4py_tutorial_cell_runs_unchanged(notebook: Notebook) -> None:
    cell = notebook.run(
        """
from aiod4p import compat
compat.install()
from dispel4py.base import IterativePE, ProducerPE
from dispel4py.new import simple_process
from dispel4py.workflow_graph import WorkflowGraph

class Seven(ProducerPE):
    def _process(self, inputs):
        return 7

class Twice(IterativePE):
    def _process(self, data):
        return 2 * data

tutorial = WorkflowGraph()
seven, twice = Seven(), Twice()
tutorial.connect(seven, "output", twice, "input")
print(simple_process.process_and_return(tutorial, {seven: 3}))
compat.uninstall()
"""
    )
    assert cell.error is None, cell.stderr
    assert re.fullmatch(r"\{'Twice\d+': \{'output': \[14, 14, 14\]\}\}\n", cell.stdout), cell.stdout


def test_the_example_notebook_runs_cell_by_cell() -> None:
    """examples/science/notebook.ipynb, as "Run All" runs it from its folder (its cells check their results)."""
    path = ROOT / "examples" / "science" / "notebook.ipynb"
    cells = [cell for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]
    printed = ""
    with kernel(cwd=path.parent) as started:
        for number, cell in enumerate(cells, 1):
            ran = started.run("".join(cell["source"]))
            assert ran.error is None, f"code cell {number}: {ran.error}\n{ran.stderr}"
            printed += ran.stdout
    assert printed.count("misfit +0.00 s") == 10  # 5 stations: every pair's lag found
