"""``dispel4py.utils`` on aiod4p: loading a graph from a module or a file, and hashing."""

from __future__ import annotations

import sys
from typing import Any

from .._graph import WorkflowGraph as _CoreWorkflowGraph
from .._groupings import stable_hash
from .._loading import load_graph as _load_graph
from ..errors import TargetError
from .workflow_graph import WorkflowGraph

# WorkflowGraph: dispel4py's utils holds it (it imports it), so `from dispel4py.utils import *` gives it
__all__ = ["WorkflowGraph", "findWorkflowGraph", "loadGraph", "loadGraphFromFile", "load_graph", "make_hash"]


def findWorkflowGraph(mod: Any, attr: str | None) -> Any:
    """The graph ``mod.attr``, or else the last top-level workflow graph of ``mod`` that is not a composite."""
    if attr is not None:
        return getattr(mod, attr)
    graph = None
    for name in dir(mod):
        value = getattr(mod, name)
        if isinstance(value, _CoreWorkflowGraph) and not hasattr(value, "inputmappings"):
            graph = value
    return graph


def load_graph(graph_source: str, attr: str | None = None) -> Any:
    """The workflow graph of a module name or a file (``attr`` names it); ``None``, with a message, if none loads."""
    try:
        return _load_graph(f"{graph_source}:{attr}" if attr else graph_source)
    except TargetError as exc:
        print(f'Failed to load graph from "{graph_source}": {exc}', file=sys.stderr)
        return None


def loadGraph(module_name: str, attr: str | None = None) -> Any:
    """The workflow graph of module ``module_name`` (``attr`` names it)."""
    return load_graph(module_name, attr)


def loadGraphFromFile(module_name: str, path: str, attr: str | None = None) -> Any:
    """The workflow graph of the file at ``path`` (``attr`` names it); ``module_name`` is not needed."""
    return load_graph(path, attr)


def make_hash(o: Any) -> int:
    """A hash of ``o`` (dicts, lists, tuples and sets at any depth) that is the same in every process.

    dispel4py's salted ``hash()`` differs between interpreters; aiod4p's
    group-by hash does not.
    """
    return stable_hash(o)
