"""Blocking calls made from the event loop that must not be left under way when their caller is cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

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
