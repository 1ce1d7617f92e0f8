"""Shared fixtures: one test suite runs on every mapping (and worker count)."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from ray_cluster import RayCluster

import aiod4p
from aiod4p import Results, WorkflowGraph
from aiod4p import _logging as aiod4p_logging
from aiod4p._api import loop_factory

# Every mapping and worker count the mapping-parametrised suite runs on.
# A new mapping joins by adding its cases here.
MAPPING_CASES: list[tuple[str, int | None]] = [
    ("simple", None),
    ("async", None),
    ("async", 3),
    ("multi", 1),
    ("multi", 2),
    ("multi", 4),
    ("mpi", 1),
    ("mpi", 2),
    ("mpi", 4),
    ("ray", 2),
]


@dataclass(frozen=True)
class MappingCase:
    """A mapping and its ``-n``; ``run`` runs a graph on it."""

    name: str
    workers: int | None

    @property
    def id(self) -> str:
        return self.name if self.workers is None else f"{self.name}-n{self.workers}"

    def run(self, graph: WorkflowGraph, inputs: Any = None, **options: Any) -> Results:
        return aiod4p.run(graph, inputs, mapping=self.name, workers=self.workers, **options)


@pytest.fixture(params=[MappingCase(*case) for case in MAPPING_CASES], ids=lambda case: case.id)
def mapping(request: pytest.FixtureRequest) -> MappingCase:
    case: MappingCase = request.param
    if case.name == "ray":
        request.getfixturevalue("ray_cluster")  # the ray mapping joins it through RAY_ADDRESS
    return case


# -- one two-node Ray cluster for the session, started before the first test that needs it -----------

_RAY_CLUSTER = pytest.StashKey[RayCluster]()


def _needs_ray(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    cases = callspec.params.values() if callspec is not None else ()
    fixtures: list[str] = getattr(item, "fixturenames", [])
    return "ray_cluster" in fixtures or any(isinstance(case, MappingCase) and case.name == "ray" for case in cases)


_RAY_FAILED = pytest.StashKey[str]()


def _ray_cluster_started(config: pytest.Config) -> None:
    """Start the session's cluster, once: a failure is kept, and fails each test that needs the cluster."""
    if _RAY_CLUSTER in config.stash or _RAY_FAILED in config.stash:
        return
    try:
        cluster = RayCluster.start()
    except Exception as exc:
        config.stash[_RAY_FAILED] = f"the session's Ray cluster did not start: {exc}"
        return
    os.environ["RAY_ADDRESS"] = cluster.address
    config.stash[_RAY_CLUSTER] = cluster


def pytest_sessionfinish(session: pytest.Session) -> None:
    cluster = session.config.stash.get(_RAY_CLUSTER, None)
    if cluster is not None:
        os.environ.pop("RAY_ADDRESS", None)
        cluster.stop()


@pytest.fixture(scope="session")
def ray_cluster(request: pytest.FixtureRequest) -> RayCluster:
    """The session's two-node Ray cluster (``RAY_ADDRESS`` points at it)."""
    if (failure := request.config.stash.get(_RAY_FAILED, None)) is not None:
        pytest.fail(failure)
    return request.config.stash[_RAY_CLUSTER]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every async test on asyncio's own loop and on uvloop (the one runs use: its close ends whole where
    ResourceWarning is an error, as :func:`_no_resource_warnings` makes it)."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    uvloop_factory = loop_factory(True)
    if uvloop_factory is not None:
        factories["uvloop"] = uvloop_factory
    return factories


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Give the next test the root logger this one had: the CLI's ``main()``, called in-process,
    replaces the root handlers (pytest's log capture among them), and what the ranks it starts are told
    (``-q`` in one test must not quiet the ranks of the next)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("aiod4p", "aiod4p.pe")}
    configured = aiod4p_logging._configured
    yield
    aiod4p_logging._configured = configured
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


@pytest.fixture(autouse=True)
def _no_resource_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        yield


# -- a test that pytest-timeout cannot stop ends the session, with every thread's stack ----------------

_STDERR = pytest.StashKey[int]()
_BACKSTOP = pytest.StashKey[float | None]()  # seconds, while a test runs


def _ignored(signum: int, frame: object) -> None:
    """The suite's handler of a signal it was started ignoring."""


def pytest_configure(config: pytest.Config) -> None:
    """Let the programs the tests start take SIGINT and SIGHUP as a terminal's shell starts them, whatever the
    suite inherited: a suite started in the background by a script (``.ci/run &``) or under ``nohup`` inherits
    them ignored, and so would its children, where the tests send them (an aiod4p command keeps an ignored one
    ignored, as it should). The suite itself still ignores them: a handler that does nothing is not inherited
    across exec, an ignored signal is.

    Keep a descriptor of the session's stderr for the backstop: file descriptor 2 is pytest's capture file,
    whose content is lost when the backstop ends the process."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, _ignored)
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    try:
        config.stash[_STDERR] = os.dup(2)
    finally:
        if capture is not None:
            capture.resume_global_capture()


def pytest_unconfigure(config: pytest.Config) -> None:
    _disarm(config)
    os.close(config.stash[_STDERR])


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """Arm a backstop at twice the test's timeout, until the test's teardown has ended: it prints every thread's
    stack (the main thread's names the test) and ends the session with exit status 1.

    pytest-timeout's own timer cannot always stop a test: it is cancelled as soon as the test fails (by its
    ``pytest_exception_interact``, meant for a debugger, which runs on every failure), so the teardown of a failed
    test had no timeout at all; and its alarm runs its handler only when the main thread returns to Python, not in
    an event loop's close waiting in C.

    The backstop is :mod:`faulthandler`'s watchdog, a thread in C: it needs no GIL (a main thread stuck in C
    may hold it), and the multi mapping's choice of start method does not see it (a Python thread in every test
    would have made every multi run of the suite spawn its workers, where a program's runs fork them).
    """
    item.config.stash[_BACKSTOP] = 2 * settings.timeout
    _arm(item.config)


@pytest.hookimpl(trylast=True)
def pytest_exception_interact(node: pytest.Item | pytest.Collector) -> None:
    """Arm the backstop again, for the rest of a failed test: pytest's faulthandler plugin cancels it on every
    failure, as pytest-timeout cancels its own timer."""
    _arm(node.config)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    """Start the session's Ray cluster before the first test that needs it, outside the test's timeout (it
    takes seconds), and disarm the backstop once the test has ended."""
    try:
        if _needs_ray(item):
            _ray_cluster_started(item.config)
        return (yield)
    finally:
        _disarm(item.config)


def pytest_enter_pdb(config: pytest.Config) -> None:
    """No backstop under a debugger: its user takes their time."""
    _disarm(config)


def _arm(config: pytest.Config) -> None:
    seconds = config.stash.get(_BACKSTOP, None)
    if seconds is not None:
        faulthandler.dump_traceback_later(seconds, file=config.stash[_STDERR], exit=True)


def _disarm(config: pytest.Config) -> None:
    config.stash[_BACKSTOP] = None
    faulthandler.cancel_dump_traceback_later()
