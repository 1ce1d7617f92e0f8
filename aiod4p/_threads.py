"""Threads: blocking calls made from the event loop that must not be left under way when their caller is
cancelled, and ending a process that threads it cannot stop would keep alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

logger = logging.getLogger("aiod4p")


async def finished_in_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a thread.

    Cancelled meanwhile, it still waits until the call is over, then raises
    ``CancelledError``: a checkpoint's write or a topology's submission ends
    before its caller does (a second cancel stops that wait). A failure of the
    call that the cancel hides is logged.
    """
    call = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.wait({call})
        if not call.cancelled() and call.exception() is not None:
            logger.warning("while the run stopped: %s", call.exception())
        raise


def flush_standard_streams() -> None:
    """Write out what is buffered for stdout and stderr (a closed or broken stream is passed over)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()


def exit_past_threads(status: int, before_exit: Callable[[], object] = lambda: None) -> NoReturn:
    """End the process with ``status``, even while a thread it cannot stop still runs (a threaded PE's
    blocked call, a thread a PE's library left running), which Python would wait for at exit.

    With such a thread alive: flushes stdout and stderr, calls ``before_exit``, and ends the process at
    once; else exits as usual.
    """
    if any(
        thread.is_alive() and not thread.daemon
        for thread in threading.enumerate()
        if thread is not threading.main_thread()
    ):
        flush_standard_streams()
        before_exit()
        os._exit(status)
    sys.exit(status)
