"""The suite's own guards: whatever a failing test leaves behind, pytest ends, and fails, rather than hangs.

Each case runs a small test file in a pytest subprocess with this suite's conftest and settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

LEAVES_ITS_SERVER = """
import asyncio
import socket

PEERS = []


async def test_fails_before_closing_its_server() -> None:
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    PEERS.append(socket.create_connection(server.sockets[0].getsockname()))  # a component still connected
    await asyncio.sleep(0)
    raise AssertionError("failed before its cleanup")
"""

BLOCKED_IN_C = """
import signal
import threading

import pytest


@pytest.mark.timeout(1)
def test_blocked_out_of_reach_of_the_alarm() -> None:
    # as a main thread waiting in C (uvloop's close on a handle left open): the alarm's handler never runs
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    threading.Event().wait()
"""

AWAITS_A_STUCK_THREAD = """
import asyncio
import threading

import pytest

GATE = threading.Event()


@pytest.mark.timeout(1)
async def test_times_out_awaiting_a_thread() -> None:
    await asyncio.to_thread(GATE.wait)  # as a read from a component process that never answers
"""


def run_pytest(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a test file under this suite's conftest and pytest settings; it must end within 45 s."""
    (tmp_path / "test_it.py").write_text(source)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest"]
    command += ["-c", str(HERE.parent / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_it.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=45)


def test_a_test_that_fails_leaving_a_connected_server_open_fails_rather_than_hangs(tmp_path: Path) -> None:
    """Its loop's close ends all the same (uvloop's stopped half-way at the first ResourceWarning, raised as an
    error, and waited forever on the listening socket), and the leak is reported."""
    done = run_pytest(tmp_path, LEAVES_ITS_SERVER)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "E           ResourceWarning: unclosed resource <TCPServer" in done.stdout
    assert "2 failed, 1 error in" in done.stdout


def test_a_test_that_pytest_timeout_cannot_stop_ends_the_session_with_every_stack(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, BLOCKED_IN_C)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("Timeout (0:00:02)!\n"), done.stderr  # twice the test's timeout
    assert 'test_it.py", line 12 in test_blocked_out_of_reach_of_the_alarm' in done.stderr  # the main thread's stack


def test_a_failed_test_whose_teardown_waits_for_a_stuck_thread_ends_the_session(tmp_path: Path) -> None:
    """pytest-timeout fails the test and, as it fails, cancels its own timer: the event loop's close then waited
    for the thread, for ever."""
    done = run_pytest(tmp_path, AWAITS_A_STUCK_THREAD)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("Timeout (0:00:02)!\n"), done.stderr
    assert "in _do_shutdown" in done.stderr  # the stacks: the loop's close waits for the executor's thread
