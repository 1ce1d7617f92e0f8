"""SIGINT/SIGTERM for a run in the main thread: drain on the first, abort on the second, even if the loop is held.

``loop.add_signal_handler`` runs its callbacks only when the event loop
turns, and a PE that blocks (``time.sleep``, blocking I/O) on the loop holds
it: the signal would wait for the call to end. Here the handlers are plain
Python signal handlers, which run in the main thread as soon as the signal
arrives (interrupting a sleep); they hand the work to the loop with
``call_soon_threadsafe``, and a second signal also arms a watchdog thread
that ends the process if the loop has not aborted the run within
:data:`ABORT_GRACE` seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["ABORT_GRACE", "interrupts"]

ABORT_GRACE = 1.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts(
    on_first: Callable[[], None],
    on_second: Callable[[], None],
    *,
    exit_status: int,
    before_exit: Callable[[], None] = lambda: None,
) -> Iterator[None]:
    """While the block runs: the first SIGINT/SIGTERM calls ``on_first``, a second ``on_second``, in the loop.

    If the loop has not left the block :data:`ABORT_GRACE` seconds after the
    second signal (a PE holds it), ``before_exit`` runs and the process exits
    with ``exit_status`` at once. Must be entered in the main thread, in a
    running event loop.
    """
    loop = asyncio.get_running_loop()
    received = 0
    finished = threading.Event()

    def hard_exit() -> None:
        if finished.wait(ABORT_GRACE):
            return
        try:
            before_exit()
            print("aiod4p: aborted (the event loop was held by a PE)", file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            os._exit(exit_status)

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        if received == 1:
            print("aiod4p: stopping the sources, finishing what is in flight (again to abort)", file=sys.stderr)
            loop.call_soon_threadsafe(on_first)
            return
        loop.call_soon_threadsafe(on_second)
        if received == 2:
            threading.Thread(target=hard_exit, name="aiod4p abort watchdog", daemon=True).start()

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        finished.set()
        for signum, old in previous.items():
            signal.signal(signum, old)
