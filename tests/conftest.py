"""Shared fixtures: one test suite runs on every mapping (and worker count)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
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


@pytest.fixture(autouse=True)
def _no_resource_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        yield
