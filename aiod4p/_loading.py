"""Loading a workflow graph from a target: ``pkg.module[:attr]`` or ``file.py[:attr]``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from ._graph import WorkflowGraph
from ._pe import CompositePE
from .errors import TargetError

__all__ = ["import_file", "load_graph", "load_module"]


def _split(target: str) -> tuple[str, str | None]:
    # "C:\\x.py" has no attr; "pkg.mod:graph" and "dir/x.py:graph" do.
    head, sep, tail = target.rpartition(":")
    if sep and tail.isidentifier() and head and not head.endswith(("/", "\\")):
        return head, tail
    return target, None


def import_file(name: str, path: str | Path) -> ModuleType:
    """Import the Python file at ``path`` as module ``name`` (registered in ``sys.modules``).

    Raises:
        ImportError: ``path`` cannot be loaded as a module.
        Exception: whatever executing the module raises (it is then unregistered).
    """
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load module {name} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_module(spec: str) -> ModuleType:
    """Import ``spec``: a dotted module name or the path of a ``.py`` file.

    A module is searched for in the current directory first, as ``python -m``
    does (the file's own directory is importable for a file).

    Raises:
        TargetError: the file or module does not exist or fails to import.
    """
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise TargetError(f"workflow file {spec} does not exist")
        name = path.stem if path.stem.isidentifier() else "workflow"
        directory = str(path.resolve().parent)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        try:
            return import_file(name, path.resolve())
        except Exception as exc:
            raise TargetError(f"importing {spec} failed: {type(exc).__name__}: {exc}") from exc
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # importable as under `python -m`, also from the console script
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise TargetError(f"no module named {spec!r}") from exc
        raise TargetError(f"importing {spec} failed: {exc}") from exc
    except Exception as exc:
        raise TargetError(f"importing {spec} failed: {type(exc).__name__}: {exc}") from exc


def load_graph(target: str) -> WorkflowGraph:
    """Load the workflow graph named by ``target``.

    Without ``:attr`` the module must hold exactly one :class:`WorkflowGraph`
    that is not the graph of a composite inside another one.
    An attribute may also be a function returning a graph.

    Raises:
        TargetError: the module cannot be loaded, the attribute is missing or
            not a graph, or the graph is not uniquely determined.
    """
    spec, attr = _split(target)
    module = load_module(spec)
    if attr is not None:
        try:
            value = getattr(module, attr)
        except AttributeError:
            raise TargetError(f"{spec} has no attribute {attr!r}") from None
        if callable(value) and not isinstance(value, WorkflowGraph):
            value = value()
        if not isinstance(value, WorkflowGraph):
            raise TargetError(f"{spec}:{attr} is a {type(value).__name__}, not a WorkflowGraph")
        return value
    graphs = {name: value for name, value in vars(module).items() if isinstance(value, WorkflowGraph)}
    nested = {inner for graph in graphs.values() for inner in _nested_graphs(graph)}
    graphs = {name: graph for name, graph in graphs.items() if id(graph) not in nested}
    unique = {id(graph): name for name, graph in graphs.items()}
    if len(unique) == 1:
        return next(iter(graphs.values()))
    if not unique:
        raise TargetError(f"{spec} defines no WorkflowGraph; name one with {spec}:ATTR")
    names = ", ".join(sorted(graphs))
    raise TargetError(f"{spec} defines several workflow graphs ({names}); choose one with {spec}:ATTR")


def _nested_graphs(graph: WorkflowGraph) -> set[int]:
    """The ids of the graphs of every composite inside ``graph``, at any depth."""
    found: set[int] = set()
    pending = [graph]
    while pending:
        for pe in pending.pop().pes:
            if isinstance(pe, CompositePE) and id(pe.graph) not in found:
                found.add(id(pe.graph))
                pending.append(pe.graph)
    return found
