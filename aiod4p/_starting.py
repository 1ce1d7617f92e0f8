"""SIGINT/SIGTERM/SIGHUP while the ``aiod4p`` command is still importing aiod4p, before it takes signals itself.

Python's own handling of a Ctrl-C then is a ``KeyboardInterrupt`` traceback out of whatever module was being
imported. The package imports this module first (it imports nothing heavy), and when the process is the
``aiod4p`` command (:func:`the_command_starts`) a signal ends it at once with a one-line message and the exit
status of an abort, 130, as a signal during the command's later start-up does (``docs/cli.md``, Signals).
:func:`aiod4p._cli.entry` puts the previous handlers back (:func:`started`) once the command runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["EXIT_ABORTED", "SIGNALS", "install", "started", "stop_while_starting", "the_command_starts"]

EXIT_ABORTED = 130
"""The exit status of a run aborted by a signal (128 + SIGINT, as a shell reports a program Ctrl-C ended)."""
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop (or drain) a run: SIGHUP is taken as SIGTERM."""

_previous: dict[int, Any] = {}
"""The handlers :func:`stop_while_starting` replaced, for :func:`started` to put back."""


def install(handler: Callable[[int, FrameType | None], Any]) -> dict[int, Any]:
    """Make ``handler`` the handler of :data:`SIGNALS` (not of SIGHUP if it is ignored: under ``nohup`` the user
    asked for the run to outlive the terminal); returns the handlers it replaced, by signal."""
    previous: dict[int, Any] = {}
    for signum in SIGNALS:
        if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, handler)
    return previous


def the_command_starts() -> bool:
    """Whether this process is the ``aiod4p`` command, importing aiod4p to run it: the program is ``python -m
    aiod4p`` (:mod:`runpy` runs module ``aiod4p``), or its main module imports ``aiod4p._cli`` (the console
    script, ``from aiod4p._cli import entry``). A program that imports aiod4p as a library is not."""
    program = sys._getframe()
    while program.f_back is not None:
        program = program.f_back
    if program.f_globals.get("__name__") == "runpy":
        return program.f_code.co_name == "_run_module_as_main" and program.f_locals.get("mod_name") == "aiod4p"
    return program.f_globals.get("__name__") == "__main__" and "aiod4p._cli" in program.f_code.co_names


def stop_while_starting() -> None:
    """Have a signal end this process (the ``aiod4p`` command, in the main thread) until :func:`started`: it says
    so on stderr and exits with status 130, with no traceback (``SystemExit`` from the code it interrupts)."""
    if not _previous:
        _previous.update(install(_stop))


def started() -> None:
    """Put back the handlers :func:`stop_while_starting` replaced (idempotent): the command handles signals now."""
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()


def _stop(signum: int, frame: FrameType | None) -> None:
    with contextlib.suppress(OSError):  # written at once, not through sys.stderr, which the code interrupted may hold
        os.write(2, f"aiod4p: aborted by {signal.Signals(signum).name} while starting\n".encode())
    raise SystemExit(EXIT_ABORTED)


if the_command_starts():  # imported first by the package: the rest of it takes a while to import
    stop_while_starting()
