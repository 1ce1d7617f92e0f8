"""The processes below this one, from Linux's ``/proc``: finding them, holding them by pidfd (which names a
process even once its pid is reused), and ending those left running. Without ``/proc`` none are found."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from pathlib import Path

__all__ = ["LEFTOVER_GRACE", "children", "descendants", "ended", "kill_left", "pidfds", "reap"]

LEFTOVER_GRACE = 5.0
"""Seconds that processes a run leaves behind (a stopped local Ray's, a killed mpiexec's ranks) have to end
by themselves before they are killed."""


def ended(code: int) -> str:
    """How a process ended, from its exit status as :mod:`subprocess` and :mod:`multiprocessing` give it
    (negative: the signal that killed it): ``exited with code 3``, ``was killed by SIGKILL``."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def children(parents: set[int]) -> set[int]:
    """The running processes whose parent is one of ``parents``."""
    found = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # ended meanwhile
                if fields[0] != "Z" and int(fields[1]) in parents:
                    found.add(int(entry))
    return found


def descendants(roots: set[int]) -> set[int]:
    """``roots`` and every running process below them."""
    tree, level = set(roots), set(roots)
    while level:
        level = children(level) - tree
        tree |= level
    return tree


def pidfds(pids: set[int]) -> list[int]:
    """A pidfd for each of ``pids`` still running (the caller closes them)."""
    fds = []
    for pid in pids:
        with contextlib.suppress(OSError):
            fds.append(os.pidfd_open(pid))
    return fds


def kill_left(fds: list[int], grace: float) -> None:
    """SIGKILL the processes of pidfds ``fds`` that are still running ``grace`` seconds from now."""
    for fd in _running(fds, grace):
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)


def reap(fds: list[int], within: float) -> None:
    """Collect the exit status of the processes of pidfds ``fds`` that are this process's children once they
    have ended, waiting ``within`` seconds at most: orphans that this process adopted as a child subreaper
    (a killed raylet's workers) would otherwise stay zombies as long as it lives. Those not ended by then, and
    those that are not its children, are left alone."""
    running = _running(fds, within)
    for fd in fds:
        if fd not in running:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)


def _running(fds: list[int], within: float) -> list[int]:
    """Those of pidfds ``fds`` whose processes are still running ``within`` seconds from now (or sooner, once
    all have ended)."""
    deadline = time.monotonic() + within
    running = list(fds)
    while running and (left := deadline - time.monotonic()) > 0:
        # a pidfd is readable once its process ended; poll, not select, which refuses numbers from 1024 on
        # (a service with a thousand connections open)
        waiting = select.poll()
        for fd in running:
            waiting.register(fd, select.POLLIN)
        ended = {fd for fd, _ in waiting.poll(left * 1000)}
        running = [fd for fd in running if fd not in ended]
    return running
