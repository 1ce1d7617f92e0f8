"""Threads: blocking calls made from the event loop that must not be left under way when their caller is
cancelled, threads for calls that may never return, aiod4p's own helper threads that a fork waits out, and
ending a process that threads it cannot stop would keep alive."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

_Call = tuple[concurrent.futures.Future[Any], str, Callable[..., Any], tuple[Any, ...]]

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


class DaemonThreadPool:
    """Threads for blocking calls that may never return (a threaded PE's read with no timeout).

    Threads start as calls need them, up to ``size``, and are reused. They are
    daemon threads: one blocked in a call does not keep the process from
    exiting, as the threads of ``concurrent.futures`` pools would (Python joins
    those at exit). A caller that never runs more than ``size`` calls at once
    never has a call wait for a thread.
    """

    def __init__(self, size: int, prefix: str) -> None:
        self._size = size
        self._prefix = prefix
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by a thread done with a call, taken by the call it gets
        self._lock = threading.Lock()
        self._threads = 0
        self._under_way: dict[concurrent.futures.Future[Any], tuple[str, str]] = {}  # (what, thread name)
        self._closed = False

    def submit(self, what: str, function: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Call ``function(*args)`` in a thread of the pool; ``what`` describes the call for :meth:`close`.

        Raises:
            RuntimeError: the pool is closed.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread pool is closed")
            self._calls.put((future, what, function, args))
            if not self._idle.acquire(blocking=False) and self._threads < self._size:
                self._threads += 1
                name = f"{self._prefix}_{self._threads - 1}"
                threading.Thread(target=self._serve, name=name, daemon=True).start()
        return future

    def close(self) -> list[tuple[str, str]]:
        """Take no more calls, cancel those not started, and let each thread end once its call returns.

        Returns:
            the calls still under way, each as ``(what, thread name)``: they go on in the background.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(queue.Empty):
                    while call := self._calls.get_nowait():
                        call[0].cancel()
                for _ in range(self._threads):
                    self._calls.put(None)
            return list(self._under_way.values())

    def _serve(self) -> None:
        name = threading.current_thread().name
        while (call := self._calls.get()) is not None:
            future, what, function, args = call
            del call
            if future.set_running_or_notify_cancel():
                with self._lock:
                    self._under_way[future] = (what, name)
                try:
                    result = function(*args)
                except BaseException as exc:
                    self._done(future)
                    future.set_exception(exc)
                else:
                    self._done(future)
                    future.set_result(result)
            del future, function, args
            self._idle.release()

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        # Before the caller learns that the call is over: it may close the pool at once.
        with self._lock:
            del self._under_way[future]


_helpers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_helper_work = threading.Lock()


def _after_fork_in_child() -> None:
    global _helper_work
    _helper_work = threading.Lock()  # a fork made under forking(): the copy is held, by no thread of the child
    _helpers.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def start_helper(target: Callable[[], object], name: str) -> threading.Thread:
    """Start a daemon thread of aiod4p's own (a progress display, a statistics sampler) that runs ``target``.

    ``target`` does its work inside :func:`helper_work` and holds nothing
    (no lock, no stream) between two such blocks: the thread then does not
    count among :func:`callers_threads`, and a fork made under
    :func:`forking` copies the process while it is outside its work.
    """
    thread = threading.Thread(target=target, name=name, daemon=True)
    _helpers.add(thread)
    thread.start()
    return thread


@contextlib.contextmanager
def helper_work() -> Iterator[None]:
    """A helper thread's work (:func:`start_helper`): no fork is made under :func:`forking` meanwhile."""
    with _helper_work:
        yield


@contextlib.contextmanager
def forking() -> Iterator[None]:
    """While this process forks: every helper thread is outside its work (waits for the block under way)."""
    with _helper_work:
        yield


def callers_threads() -> int:
    """The threads of this process that are not aiod4p's helper threads (:func:`start_helper`): forking
    while another thread runs may deadlock the child (a lock it held is copied held)."""
    return sum(1 for thread in threading.enumerate() if thread not in _helpers)


def flush_standard_streams() -> None:
    """Write out what is buffered for stdout and stderr (a closed or broken stream is passed over)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()


_AT_HARD_EXIT: list[Callable[[], object]] = []


def at_hard_exit(hook: Callable[[], object]) -> None:
    """Have ``hook`` called whenever :func:`hard_exit` ends the process, skipping Python's own exit (its ``atexit``
    hooks, joining its threads): to stop what a thread left under way had started (a local Ray). A hook must not
    block; what it raises is ignored."""
    _AT_HARD_EXIT.append(hook)


def hard_exit(status: int) -> NoReturn:
    """End the process with ``status`` at once (``os._exit``), once the :func:`at_hard_exit` hooks were called."""
    for hook in _AT_HARD_EXIT:
        with contextlib.suppress(Exception):
            hook()
    os._exit(status)


def exit_past_threads(status: int, before_exit: Callable[[], object] = lambda: None) -> NoReturn:
    """End the process with ``status``, even while a thread it cannot stop still runs (a thread a PE or its
    library left running), which Python would wait for at exit.

    With such a thread alive: flushes stdout and stderr, calls ``before_exit``, and ends the process at
    once (:func:`hard_exit`); else exits as usual.
    """
    if any(
        thread.is_alive() and not thread.daemon
        for thread in threading.enumerate()
        if thread is not threading.main_thread()
    ):
        flush_standard_streams()
        before_exit()
        hard_exit(status)
    sys.exit(status)
