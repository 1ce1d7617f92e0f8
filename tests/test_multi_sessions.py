"""multi workers run in their own sessions (their own scheduler autogroups) and die with their parent."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from aiod4p._signals import Interrupts, held
from aiod4p.mappings._multi_worker import take_over_signals

FLOW = textwrap.dedent(
    """
    import os
    import threading
    from pathlib import Path

    from aiod4p import IterativePE, ProducerPE, WorkflowGraph

    OUT = Path({out!r})


    class Numbers(ProducerPE):
        def produce(self):
            return 1


    class Hold(IterativePE):
        def preprocess(self):  # written whole, then renamed: the test never reads a half-written file
            written = OUT / f"{{os.getpid()}}.tmp"
            written.write_text(str(os.getsid(0)))
            written.rename(OUT / str(os.getpid()))

        def process_item(self, item):
            threading.Event().wait(0.05)  # ok-sleep: slow enough that the run outlives the test
            return item


    graph = WorkflowGraph()
    graph.connect(Numbers(), "output", Hold(), "input")
    """
)


def _wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # ok-sleep: polling a condition, with a deadline


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_workers_have_their_own_sessions_and_die_with_a_killed_parent(tmp_path: Path) -> None:
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW.format(out=str(tmp_path)))
    aiod4p = Path(sys.executable).parent / "aiod4p"
    parent = subprocess.Popen(
        [str(aiod4p), "run", f"{flow}:graph", "--mapping", "multi", "-n", "2", "-i", "100000", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: len([p for p in tmp_path.iterdir() if p.name.isdigit()]) == 2, "two workers")
        workers = {int(p.name): int(p.read_text()) for p in tmp_path.iterdir() if p.name.isdigit()}
        assert all(sid == pid for pid, sid in workers.items())  # each leads its own session
        assert os.getsid(parent.pid) not in workers.values()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _wait_for(lambda: not any(_alive(pid) for pid in workers), "the workers to die")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _terminated_before_its_own_handlers() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # as the parent's stop() can, right after the fork
    take_over_signals()  # the held SIGTERM is delivered here and ends the process
    signal.pause()


def test_a_worker_signalled_before_its_own_handlers_dies_by_the_signal_quietly() -> None:
    """The forked worker must not run the handlers it inherited from the run (they raise ``Stopped``)."""
    with Interrupts(exit_status=130):
        with held():
            worker = multiprocessing.get_context("fork").Process(target=_terminated_before_its_own_handlers)
            worker.start()
        worker.join(timeout=30)
    if worker.exitcode is None:
        worker.kill()
        worker.join()
    assert worker.exitcode == -signal.SIGTERM


def _hung_up_before_its_own_handlers() -> None:
    os.kill(os.getpid(), signal.SIGHUP)  # held since the fork, like SIGTERM
    take_over_signals()  # the held SIGHUP is delivered here: ignored, it is the parent's to act on


def test_a_worker_hung_up_before_its_own_handlers_leaves_it_to_the_parent() -> None:
    """A hang-up is the parent's to act on (it drains the run): a worker neither runs the handler it inherited
    nor dies of it."""
    with Interrupts(exit_status=130):
        with held():
            worker = multiprocessing.get_context("fork").Process(target=_hung_up_before_its_own_handlers)
            worker.start()
        worker.join(timeout=30)
    if worker.exitcode is None:
        worker.kill()
        worker.join()
    assert worker.exitcode == 0
