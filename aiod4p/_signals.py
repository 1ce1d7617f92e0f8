"""SIGINT/SIGTERM/SIGHUP for ``aiod4p run``: stop start-up at once; drain (or suspend) on the first, abort on the
second.

SIGHUP (a terminal hang-up: the ssh session that started the run dropped) is
taken as SIGTERM, so the results already accepted still reach ``--results``;
a process started with SIGHUP ignored (``nohup``) keeps ignoring it.

``loop.add_signal_handler`` runs its callbacks only when the event loop
turns, and a PE that blocks (``time.sleep``, blocking I/O) on the loop holds
it: the signal would wait for the call to end. Here the handlers are plain
Python signal handlers, which run in the main thread as soon as the signal
arrives (interrupting a sleep). Before the run is under way (loading,
planning, start-up: long synchronous code) a signal raises :class:`Stopped`
wherever the main thread is. Once the run is under way the handlers hand
their work to the loop with ``call_soon_threadsafe``, and a second signal
also arms a watchdog thread that ends the process if the loop has not
aborted the run after :data:`ABORT_GRACE` seconds, saying whether a PE held
the loop or the clean-up was slow.

A process forked from the run's (a multi worker) inherits these handlers and
would run them if a signal came before it set its own: :func:`held` blocks
the signals while the child is created, and the child calls :func:`release`
once its own handlers are in place, so a signal in between takes effect then.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Protocol

from ._frames import running_in
from ._starting import SIGNALS, install
from ._threads import hard_exit

__all__ = [
    "ABORT_GRACE",
    "FAILURE_SIGNALS",
    "HELD_GRACE",
    "HeldLoopInterrupt",
    "Interrupts",
    "Stopped",
    "die_with_parent",
    "held",
    "interrupts_the_run",
    "loop_turns",
    "release",
    "report_crashes",
    "restore_signal_actions",
    "signal_actions",
]

ABORT_GRACE = 0.9
"""Seconds an abort may take while the event loop turns (its clean-up: stopping a local Ray, say)."""
HELD_GRACE = 0.5
"""Seconds an abort may take before the watchdog checks whether the event loop turns (whether a PE holds it);
the loop has the rest of :data:`ABORT_GRACE` to turn once (the notebook's interrupt, ``aiod4p.run``, too)."""


class HeldLoopInterrupt(KeyboardInterrupt):
    """The interruption aiod4p raises in a PE's code that holds the event loop when interrupted twice."""


def interrupts_the_run(exc: KeyboardInterrupt) -> bool:
    """Whether ``exc``, raised in a PE's code, interrupts the run rather than being the PE's failure.

    Python raises ``KeyboardInterrupt`` for a signal (Ctrl-C; :class:`asyncio.Runner`'s second one) in the
    main thread only, and aiod4p as a :class:`HeldLoopInterrupt`; raised in another thread (the event loop
    of a Ray actor), the PE's code raised it itself.
    """
    return isinstance(exc, HeldLoopInterrupt) or threading.current_thread() is threading.main_thread()


def die_with_parent(parent: int | None = None) -> None:
    """Be killed by SIGKILL when the parent process dies (Linux): for a process that no signal to the
    launcher's session reaches. If the parent is already gone (its pid was ``parent``), exit at once.

    Also a ``preexec_fn`` (it then applies to the program executed: mpiexec).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def report_crashes() -> None:
    """Have a crash of this process (SIGSEGV, SIGFPE, SIGABRT, SIGBUS, SIGILL: a C extension a PE calls) print the
    Python stack of each of its threads on stderr (file descriptor 2) before it dies of the signal, so that the
    PE's file, line and method are named; the exit status stays the signal's (:mod:`faulthandler`).

    For the processes aiod4p owns (the command, a multi worker, an MPI rank): a program that embeds a run keeps
    its own choice.
    """
    faulthandler.enable(2, all_threads=True)


def adopt_orphans(adopt: bool) -> None:
    """Become (or stop being) the process that this one's orphaned descendants are re-parented to (Linux's
    child subreaper), so that what a child leaves behind when it dies can still be found and stopped."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(36, int(adopt))  # PR_SET_CHILD_SUBREAPER


FAILURE_SIGNALS = (
    signal.SIGSEGV,
    signal.SIGILL,
    signal.SIGFPE,
    signal.SIGABRT,
    signal.SIGBUS,
    signal.SIGTRAP,
    signal.SIGTERM,
)
"""The signals a crash reporter (Ray's, abseil's failure signal handler) takes over; Ray puts the default action
back on them when it disconnects, Python's SIGTERM handler and :mod:`faulthandler`'s included."""

_SIGACTION_SIZE = 256
"""Bytes enough for the C library's ``struct sigaction`` (152 on Linux), kept as an opaque record."""


def signal_actions(signums: Iterable[int] = FAILURE_SIGNALS) -> dict[int, bytes]:
    """The process's actions for ``signums`` as the C library holds them (``sigaction``), for
    :func:`restore_signal_actions`: what a library that installs handlers below Python's (Ray) leaves behind
    is then undone, whatever Python's :mod:`signal` module believes."""
    libc = ctypes.CDLL(None, use_errno=True)
    actions = {}
    for signum in signums:
        record = ctypes.create_string_buffer(_SIGACTION_SIZE)
        if libc.sigaction(signum, None, record) == 0:
            actions[signum] = record.raw
    return actions


def restore_signal_actions(actions: dict[int, bytes]) -> None:
    """Put back the actions :func:`signal_actions` read (from any thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for signum, record in actions.items():
        libc.sigaction(signum, ctypes.create_string_buffer(record, _SIGACTION_SIZE), None)


@contextmanager
def held() -> Iterator[None]:
    """Block SIGINT, SIGTERM and SIGHUP in the calling thread meanwhile; a child created meanwhile inherits it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def release() -> None:
    """Unblock SIGINT, SIGTERM and SIGHUP in a child created under :func:`held`; a pending one is acted on now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def loop_turn(loop: asyncio.AbstractEventLoop | None) -> threading.Event:
    """An event set once ``loop`` runs a callback: never while a PE holds it (or once it is closed)."""
    turned = threading.Event()
    if loop is not None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(turned.set)
    return turned


def loop_turns(loop: asyncio.AbstractEventLoop | None, within: float) -> bool:
    """Whether ``loop`` runs a callback within ``within`` seconds: false while a PE holds it (or it is closed)."""
    return loop_turn(loop).wait(within)


def _say(message: str) -> None:
    """Print ``message`` on stderr; if stderr cannot take it (the terminal hung up: ``EIO``), send what goes
    there from now on (this and the run's last report) to the null device, so the run still drains and exits
    with its own status."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
        os.close(devnull)


class _Drainable(Protocol):
    @property
    def under_way(self) -> bool: ...

    @property
    def done(self) -> bool: ...

    def drain(self) -> None: ...

    def suspend(self) -> None: ...


class Stopped(KeyboardInterrupt):
    """Raised by the signal handler while the run is not under way: start-up stops where it is.

    A ``KeyboardInterrupt``: an event loop re-raises it from a callback that the signal interrupted
    (any other exception there would only be logged, and start-up would go on).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Interrupts:
    """SIGINT/SIGTERM/SIGHUP handlers for one run, installed by ``with``; see the module's docstring.

    Args:
        exit_status: the process's exit status when the watchdog ends it.
        before_exit: called by the watchdog just before it ends the process
            (flush what can be flushed).
        produced: what the run produced so far (``"5300 records produced"``), for
            the watchdog's last line.
        quiet: do not say that a drain starts (an MPI rank other than rank 0
            under the user's mpiexec: every rank gets the signal, rank 0 speaks
            for the job).
        suspend: the first signal suspends the run (a checkpoint now, and the run
            stops at it) rather than drain it.

    A first signal that comes once the run has ended (while its results are
    printed, or its provenance written, under the handlers installed again by
    another ``with``) drains and suspends nothing: it sets :attr:`after_end`,
    and the output is complete; a second one aborts, as always: once the run's
    event loop is closed, by raising :class:`Stopped` where the main thread is.
    """

    def __init__(
        self,
        exit_status: int,
        before_exit: Callable[[], None] = lambda: None,
        produced: Callable[[], str] = lambda: "nothing produced",
        quiet: bool = False,
        suspend: bool = False,
    ) -> None:
        self.quiet = quiet
        self.suspend = suspend
        self.received = 0
        self.after_end = False
        self.signum: int = signal.SIGINT
        self._exit_status = exit_status
        self._before_exit = before_exit
        self._produced = produced
        self._run: _Drainable | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = threading.main_thread().ident or 0  # the thread of self._loop, once attached
        self._task: asyncio.Task[Any] | None = None
        self._finished = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        """The name of the last signal received (``SIGINT`` before any)."""
        return signal.Signals(self.signum).name

    def __enter__(self) -> Interrupts:
        self._previous.update(install(self._handle))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back and disarm the watchdog (idempotent)."""
        self._finished.set()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def attach(self, run: _Drainable, task: asyncio.Task[Any]) -> None:
        """Act on ``run`` once it is under way: drain (or suspend) it, then cancel ``task`` to abort."""
        self._run, self._task, self._loop = run, task, asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        self.signum = signum
        run, loop, task = self._run, self._loop, self._task
        if run is None or loop is None or task is None or not run.under_way:
            raise Stopped(signum)
        if self.received == 1 and run.done:  # nothing left to drain or suspend: its output is being written
            self.after_end = True
            if not self.quiet:
                _say(f"aiod4p: {self.name}: the run has ended; writing its output (send it again to abort)")
            return
        if loop.is_closed():  # the run's loop is over: what is left is writing its output, which this aborts
            raise Stopped(signum)
        if self.received == 1:
            if self.suspend:
                _say(f"aiod4p: {self.name}: suspending: taking a checkpoint to stop at (send it again to abort)")
                loop.call_soon_threadsafe(run.suspend)
                return
            if not self.quiet:
                _say(f"aiod4p: {self.name}: stopping the sources, finishing what is in flight (send it again to abort)")
            loop.call_soon_threadsafe(run.drain)
            return
        loop.call_soon_threadsafe(task.cancel)
        if self.received == 2:
            threading.Thread(target=self._watchdog, name="aiod4p abort watchdog", daemon=True).start()

    def _holder(self) -> str:
        """What held the event loop, never failing: the watchdog must end the process whatever happens."""
        try:
            held_by = running_in(self._loop_thread)
        except Exception:  # the working directory removed, say: what _frames tells installed code by
            held_by = None
        return f"the event loop was held by {held_by or 'a PE'}"

    def _watchdog(self) -> None:
        """End the process if the run has not aborted within :data:`ABORT_GRACE` seconds, within a second of the
        signal, saying why: a PE holds the event loop (it ran no callback asked of it after :data:`HELD_GRACE`
        seconds), or the run's clean-up (stopping a local Ray, say) did not end."""
        start = time.monotonic()
        if self._finished.wait(HELD_GRACE):
            return
        # The loop has the rest of the grace to turn once: on a loaded machine its thread may wait for a CPU
        # for tens of milliseconds, and a shorter wait blamed a PE for a slow clean-up.
        turned = loop_turn(self._loop)
        if self._finished.wait(ABORT_GRACE - (time.monotonic() - start)):
            return
        try:
            why = f"its clean-up did not end within {ABORT_GRACE:g} s" if turned.is_set() else self._holder()
            with contextlib.suppress(Exception):  # what cannot be flushed (a full disk) must not hide why it ends
                self._before_exit()
            print(f"aiod4p: aborted by {self.name}; {self._produced()} ({why})", file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            hard_exit(self._exit_status)
