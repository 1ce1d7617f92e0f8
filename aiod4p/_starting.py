"""SIGINT/SIGTERM/SIGHUP while the ``aiod4p`` command is still importing aiod4p, before it takes signals itself.

Python's own handling of a Ctrl-C then is a ``KeyboardInterrupt`` traceback out of whatever module was being
imported. The package imports this module first (it imports nothing heavy), and when the process is the
``aiod4p`` command (:func:`the_command_starts`) a signal ends it at once with a one-line message and the exit
status of an abort, 130, as a signal during the command's later start-up does (``docs/cli.md``, Signals).
:func:`aiod4p._cli.entry` (and :func:`aiod4p._cli.main`) put the previous handlers back (:func:`started`)
once the command runs.

A process multiprocessing starts as a new interpreter for a multi run (a spawned worker, the forkserver) is
told so by :data:`SPAWNED_ENV` in its environment, which only the launcher sets, and only while it starts
one: it ignores SIGINT and SIGHUP from the moment it imports aiod4p (as it unpickles the worker's target, or
imports the workflow's ``__main__``), so a Ctrl-C to the process group while it starts interrupts the run,
not that process (:func:`ignore_terminal_signals`). A spawned worker's interpreter is covered before that too:
it starts with the signals held (:func:`aiod4p._signals.held`); the forkserver, started before that hold (what
it forks would inherit it), is not, until it imports aiod4p.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = [
    "EXIT_ABORTED",
    "SIGNALS",
    "SPAWNED_ENV",
    "ignore_terminal_signals",
    "install",
    "started",
    "stop_while_starting",
    "the_command_starts",
]

EXIT_ABORTED = 130
"""The exit status of a run aborted by a signal (128 + SIGINT, as a shell reports a program Ctrl-C ended)."""
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop (or drain) a run: SIGHUP is taken as SIGTERM."""
SPAWNED_ENV = "AIOD4P_SPAWNED_WORKER"
"""Set (to ``1``) by the multi launcher in the environment of the new interpreters it starts, and only there:
they ignore SIGINT and SIGHUP as they import aiod4p (:func:`ignore_terminal_signals`)."""

_previous: dict[int, Any] = {}
"""The handlers :func:`stop_while_starting` replaced, for :func:`started` to put back."""


def install(handler: Callable[[int, FrameType | None], Any]) -> dict[int, Any]:
    """Make ``handler`` the handler of :data:`SIGNALS`, but of SIGINT and SIGHUP only if they are not ignored:
    started with them ignored (under ``nohup``; as a background job ``aiod4p run ... &`` of a shell script, which
    a Ctrl-C at the terminal is not meant to reach), the run ignores them as Python's own programs do. Returns the
    handlers it replaced, by signal."""
    previous: dict[int, Any] = {}
    for signum in SIGNALS:
        if signum != signal.SIGTERM and signal.getsignal(signum) == signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, handler)
    return previous


def the_command_starts() -> bool:
    """Whether this process is the ``aiod4p`` command, importing aiod4p to run it: the program is ``python -m
    aiod4p`` (:mod:`runpy` runs module ``aiod4p``), or the console script ``aiod4p`` (the program file named
    ``aiod4p`` whose main module imports ``aiod4p._cli``: ``from aiod4p._cli import entry``). A program that
    imports aiod4p as a library is not, nor one of the user's that imports ``aiod4p._cli`` (a wrapper script
    calling ``main(argv)``, a ``python -c`` one-liner): it keeps its own signal handlers."""
    program = sys._getframe()
    while program.f_back is not None:
        program = program.f_back
    if program.f_globals.get("__name__") == "runpy":
        return program.f_code.co_name == "_run_module_as_main" and program.f_locals.get("mod_name") == "aiod4p"
    return (
        program.f_globals.get("__name__") == "__main__"
        and "aiod4p._cli" in program.f_code.co_names
        and bool(sys.argv)
        and os.path.basename(sys.argv[0]) == "aiod4p"
        and program.f_code.co_filename == sys.argv[0]  # never a -c program (its file is "<string>")
    )


def ignore_terminal_signals() -> None:
    """In a new interpreter the multi launcher starts (:data:`SPAWNED_ENV` set): ignore SIGINT and SIGHUP at
    once, which the worker leaves ignored (the run's parent decides), and take the variable out of the
    environment, so that what this process starts does not inherit it.

    In multiprocessing's forkserver (started by the launcher for a run, it imports the workflow's main module,
    and with it aiod4p), the handlers are put back as its preloading ends, just before it ignores SIGINT itself
    and records the handlers that its children, the user's own forkserver processes too, get back."""
    if os.environ.pop(SPAWNED_ENV, None) is None:
        return
    previous: dict[int, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread: not a process the launcher started
        for signum in (signal.SIGINT, signal.SIGHUP):
            previous[signum] = signal.signal(signum, signal.SIG_IGN)
    util: Any = sys.modules.get("multiprocessing.util")
    if not previous or util is None or not _in_the_forkserver():
        return
    close_stdin = util._close_stdin

    def restore_then_close_stdin() -> None:  # forkserver.main calls it once its preloading is done
        util._close_stdin = close_stdin
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        close_stdin()

    util._close_stdin = restore_then_close_stdin


def _in_the_forkserver() -> bool:
    """Whether multiprocessing's forkserver (its ``main``, preloading modules) is what imports this module."""
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            return True
        frame = frame.f_back
    return False


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


ignore_terminal_signals()  # imported first by the package, as soon as possible
if the_command_starts():  # imported first by the package: the rest of it takes a while to import
    stop_while_starting()
