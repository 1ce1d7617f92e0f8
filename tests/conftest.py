"""Shared fixtures: one test suite runs on every mapping (and worker count)."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

import aiod4p
from aiod4p import Results, WorkflowGraph

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
    return case


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every async test on asyncio's own loop and on uvloop."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories


@pytest.fixture(autouse=True)
def _no_resource_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        yield
