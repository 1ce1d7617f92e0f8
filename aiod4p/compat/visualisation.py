"""``dispel4py.visualisation`` on aiod4p: :func:`display` shows a graph in a Jupyter notebook."""

from __future__ import annotations

from ..errors import Aiod4pError
from .workflow_graph import WorkflowGraph, drawDot

__all__ = ["display"]


def display(graph: WorkflowGraph) -> None:
    """dispel4py's ``display``: show the graph, drawn by Graphviz's ``dot`` as a PNG, in IPython or Jupyter.

    IPython is imported only here, so a workflow that imports this module (a notebook saved as a
    script) also loads where IPython is not installed.

    Raises:
        Aiod4pError: IPython is not installed, or as :func:`~aiod4p.compat.workflow_graph.drawDot`.
        GraphError: the graph is invalid.
    """
    try:
        from IPython.display import display_png
    except ImportError as exc:
        raise Aiod4pError(f"dispel4py.visualisation.display needs IPython (pip install ipython): {exc}") from None
    display_png(drawDot(graph), raw=True)  # type: ignore[no-untyped-call]
