"""Shared fixtures: one test suite runs on every mapping (and worker count)."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
import threading
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
    case = callspec.params.get("mapping") if callspec is not None else None
    fixtures: list[str] = getattr(item, "fixturenames", [])
    return "ray_cluster" in fixtures or (isinstance(case, MappingCase) and case.name == "ray")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the cluster now (it takes seconds), outside every test's timeout, if a selected test needs it."""
    if any(_needs_ray(item) for item in session.items):
        cluster = RayCluster.start()
        os.environ["RAY_ADDRESS"] = cluster.address
        session.config.stash[_RAY_CLUSTER] = cluster


def pytest_sessionfinish(session: pytest.Session) -> None:
    cluster = session.config.stash.get(_RAY_CLUSTER, None)
    if cluster is not None:
        os.environ.pop("RAY_ADDRESS", None)
        cluster.stop()


@pytest.fixture(scope="session")
def ray_cluster(request: pytest.FixtureRequest) -> RayCluster:
    """The session's two-node Ray cluster (``RAY_ADDRESS`` points at it)."""
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

_BACKSTOP = pytest.StashKey[threading.Timer]()


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """Arm a backstop at twice the test's timeout, until the test's teardown has ended.

    pytest-timeout's own timer cannot always stop a test: it is cancelled as soon as the test fails (by its
    ``pytest_exception_interact``, meant for a debugger, which runs on every failure), so the teardown of a failed
    test had no timeout at all; and its alarm runs its handler only when the main thread returns to Python, not in
    an event loop's close waiting in C.
    """
    timer = threading.Timer(2 * settings.timeout, _stuck, (item, settings.timeout))
    timer.daemon = True
    item.config.stash[_BACKSTOP] = timer
    timer.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    try:
        return (yield)
    finally:
        _disarm(item.config)


def pytest_enter_pdb(config: pytest.Config) -> None:
    """No backstop under a debugger: its user takes their time."""
    _disarm(config)


def _disarm(config: pytest.Config) -> None:
    timer = config.stash.get(_BACKSTOP, None)
    if timer is not None:
        timer.cancel()


def _stuck(item: pytest.Item, timeout: float) -> None:
    """Say which test is stuck, dump every thread's stack and end the session (exit status 1)."""
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    sys.stderr.write(
        f"\n{item.nodeid} still runs {2 * timeout:g} s after it started, though its timeout is {timeout:g} s:"
        " pytest-timeout did not stop it (a failed test's teardown, or a main thread blocked outside Python);"
        " the session ends here. Every thread's stack:\n"
    )
    sys.stderr.flush()
    faulthandler.dump_traceback(sys.stderr, all_threads=True)
    os._exit(1)
