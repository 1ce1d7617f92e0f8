"""Mappings: where a workflow's instances run. Chosen by name, imported lazily."""

from __future__ import annotations

from typing import Any

from .._registry import load
from ._base import BaseMapping, RunControl

__all__ = ["MAPPINGS", "BaseMapping", "RunControl", "get_mapping"]

# name -> (module, class, the extra that brings its dependencies)
MAPPINGS: dict[str, tuple[str, str, str | None]] = {
    "simple": ("aiod4p.mappings.simple", "SimpleMapping", None),
    "async": ("aiod4p.mappings.asyncio", "AsyncMapping", None),
    "multi": ("aiod4p.mappings.multi", "MultiMapping", None),
    "mpi": ("aiod4p.mappings.mpi", "MpiMapping", "mpi"),
    "storm": ("aiod4p.mappings.storm", "StormMapping", "storm"),
    "ray": ("aiod4p.mappings.ray", "RayMapping", "ray"),
}


def get_mapping(name: str, **options: Any) -> BaseMapping:
    """Return a new instance of the mapping called ``name``, built with ``options``.

    Raises:
        MappingUnavailable: no such mapping, or its extra is not installed.
    """
    mapping: BaseMapping = load("mapping", name, MAPPINGS)(**options)
    return mapping
