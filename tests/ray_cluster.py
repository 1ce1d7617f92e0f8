"""A real two-node Ray cluster on this machine for the tests: a head and a second node joined to it.

Both nodes listen on loopback and are started by ``ray start`` in sessions of
their own; stopping them ends every process of those sessions (by process id:
never ``ray stop``, which ends every Ray process of the machine, other users'
included) and checks that none is left. A reaper process (this module run as a
script) does the same if the process that started the cluster dies without
stopping it (a test run killed or interrupted), so no cluster outlives its run.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"
NODE_CPUS = 1
ATTEMPTS = 5
START_NICENESS = -10
# A test cluster on loopback only: no token to manage.
ENVIRONMENT = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class RayCluster:
    """A running test cluster; ``address`` is what ``ray.init(address=...)`` and ``--address`` take."""

    address: str
    temp_dir: str
    sessions: list[int] = field(default_factory=list)  # process group (session) ids of its processes
    reaper: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls) -> RayCluster:
        """Start the head (``{"head": 1}``) and a second node (``{"second": 1}``), one CPU each.

        Raises:
            RuntimeError: a node did not start (with ``ray start``'s output).
        """
        os.environ.update(ENVIRONMENT)
        cluster = cls("", tempfile.mkdtemp(prefix="aiod4p-ray-", dir="/tmp"))
        common = ["--num-cpus", str(NODE_CPUS), "--object-store-memory", str(100 * 1024 * 1024)]
        common += ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        try:
            port = _free_port()
            cluster.address = f"127.0.0.1:{port}"
            cluster._ray_start(
                "--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", cluster.temp_dir, *common,
                "--resources", json.dumps({"head": 1}),
            )  # fmt: skip
            cluster._ray_start("--address", cluster.address, *common, "--resources", json.dumps({"second": 1}))
            cluster.reaper = subprocess.Popen(
                [sys.executable, __file__, str(os.getpid()), cluster.temp_dir, *map(str, cluster.sessions)],
                start_new_session=True,  # a signal to the test run's group does not reach it
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _ray_start(self, *args: str) -> None:
        """``ray start`` with ``args``; tried again (up to ``ATTEMPTS`` times) when the node did not come up.

        A raylet waits a fixed 15 s for its agents to report their ports, which a
        busy machine (several test suites on two cores) sometimes exceeds.
        """
        failures = []
        for _ in range(ATTEMPTS):
            # Its own session: the node's processes are found (and stopped) by that session's id.
            # Started at a higher priority (then set back): the agents' imports must beat that 15 s.
            process = subprocess.Popen(
                ["nice", "-n", str(START_NICENESS), str(RAY), "start", *args],
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self.sessions.append(process.pid)
            output, _ = process.communicate(timeout=240)
            if process.returncode == 0:
                for pid in session_processes([process.pid]):
                    with contextlib.suppress(ProcessLookupError, PermissionError):  # not root: never raised
                        os.setpriority(os.PRIO_PROCESS, pid, 0)
                return
            failures.append(output[-2000:])
            _stop_sessions([process.pid])
        raise RuntimeError(f"ray start {' '.join(args)} failed {ATTEMPTS} times; last output:\n{failures[-1]}")

    def processes(self) -> list[int]:
        """Process ids of every process of this cluster still running."""
        return session_processes(self.sessions)

    def stop(self) -> list[int]:
        """Terminate, then kill, every process of the cluster, and remove its files; returns the killed ones."""
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait()
        return _stop(self.sessions, self.temp_dir)


def _stop(sessions: list[int], temp_dir: str) -> list[int]:
    killed = _stop_sessions(sessions)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return killed


def _reap(starter: int, temp_dir: str, sessions: list[int]) -> None:
    """The reaper: once process ``starter`` has ended, stop the cluster it left behind."""
    while wait_gone([starter], 3600):
        pass
    _stop(sessions, temp_dir)


def session_processes(sessions: list[int]) -> list[int]:
    """Process ids of the running processes of ``sessions`` (session ids)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) in sessions:
            found.append(int(entry))
    return found


def _stop_sessions(sessions: list[int]) -> list[int]:
    """Terminate, then kill, every process of ``sessions``; returns those that had to be killed."""
    for pid in session_processes(sessions):
        _signal(pid, signal.SIGTERM)
    left = wait_gone(session_processes(sessions), timeout=15)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    wait_gone(left, timeout=15)
    return left


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until the processes ``pids`` have ended (a zombie counts as ended); returns those still running."""
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending:
        pending = [pid for pid in pending if _running(pid)]
        if not pending or time.monotonic() > deadline:
            break
        # Not our children: no wait() to block on. pidfds tell when each has ended.
        fds = []
        try:
            for pid in pending:
                try:
                    fds.append(os.pidfd_open(pid))
                except ProcessLookupError:
                    continue
            if fds:
                select.select(fds, [], [], max(0.0, deadline - time.monotonic()))
        finally:
            for fd in fds:
                os.close(fd)
    return pending


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


if __name__ == "__main__":
    _reap(int(sys.argv[1]), sys.argv[2], [int(session) for session in sys.argv[3:]])
