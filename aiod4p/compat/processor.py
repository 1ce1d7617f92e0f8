"""``dispel4py.new.processor`` on aiod4p: instance counts, inputs and graph loading as dispel4py has them.

dispel4py's ``multi`` and ``mpi`` mappings share ``-n N`` processes among the
PEs of a graph: each root gets one process, and every other PE gets
``int(numprocesses * (N - roots) / (total - roots))``, where ``total`` counts
one per root plus the ``numprocesses`` of every other PE (its
``_assign_processes``). :func:`place` applies that rule to a dispel4py graph
(aiod4p's planner calls it as the flattened graph's ``placer``), so a
dispel4py workflow gets dispel4py's instance counts, and so its results, for
the same ``-n``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from .._graph import FlatGraph
from .._inputs import parse_cli_inputs
from .._pe import PE
from ..errors import InputError

#: The most processes dispel4py's rule shares out among a graph's PEs beyond the workers that start
#: (``aiod4p run`` starts one per CPU): an edge dealt round robin joins every instance to every instance
#: after it, so ``-n 10000`` would take gigabytes (dispel4py itself would start 10,000 processes).
MOST_SHARED_PROCESSES = 1024

__all__ = [
    "MOST_SHARED_PROCESSES",
    "STATUS",
    "STATUS_ACTIVE",
    "STATUS_INACTIVE",
    "STATUS_TERMINATED",
    "create_inputs",
    "get_inputs",
    "load_graph_and_inputs",
    "place",
    "process_counts",
]

STATUS_ACTIVE = 10
STATUS_INACTIVE = 11
STATUS_TERMINATED = 12
STATUS = {STATUS_ACTIVE: "ACTIVE", STATUS_INACTIVE: "INACTIVE", STATUS_TERMINATED: "TERMINATED"}


def _weight(pe: PE) -> int:
    weight = getattr(pe, "numprocesses", None)
    if isinstance(weight, int) and weight >= 1:
        return weight
    return pe._parallelism or 1


def process_counts(graph: FlatGraph, processes: int) -> dict[str, int] | None:
    """How many processes dispel4py gives each PE of ``graph`` out of ``processes``.

    ``None`` when the graph needs more processes than that (dispel4py then
    falls back to running partitions of the graph).
    """
    roots = set(graph.roots())
    weights = {pe_id: 1 if pe_id in roots else _weight(pe) for pe_id, pe in graph.pes.items()}
    total = sum(weights.values())
    if total > processes:
        return None
    spare = max(1, total - len(roots))
    return {
        pe_id: 1 if pe_id in roots else int(weight * (processes - len(roots)) / spare)
        for pe_id, weight in weights.items()
    }


def place(graph: FlatGraph, processes: int, workers: int | None = None) -> dict[str, tuple[int, ...]]:
    """The workers of every PE's instances when dispel4py's rule shares out ``processes``.

    As dispel4py numbers its processes, the instances of the PEs, taken in the
    order they joined the graph, get consecutive process numbers; process
    ``p`` runs on worker ``p % workers`` (``workers``: ``processes`` if not
    given), so fewer workers than processes run the same instances. Empty when
    the processes are too few for dispel4py's rule (dispel4py then runs
    partitions of the graph; aiod4p's own rule applies).
    """
    counts = process_counts(graph, processes)
    if counts is None:
        return {}
    workers = workers or processes
    placed: dict[str, tuple[int, ...]] = {}
    rank = 0
    for pe_id in graph.pes:
        placed[pe_id] = tuple(process % workers for process in range(rank, rank + counts[pe_id]))
        rank += counts[pe_id]
    return placed


def get_inputs(pe: Any, inputs: Mapping[Any, Any]) -> Any:
    """The input of ``pe`` in ``inputs``, keyed by the PE itself, its name or its id (``None`` if absent)."""
    for key in (pe, getattr(pe, "name", None), getattr(pe, "id", None)):
        try:
            return inputs[key]
        except (KeyError, TypeError):
            continue
    return None


class _BadInputs(InputError, ValueError):
    """Inputs that dispel4py's ``create_inputs`` refuses with a ``ValueError`` (a file that does not exist,
    malformed JSON), so ``except ValueError`` written for dispel4py still catches them."""


def create_inputs(args: Any, graph: Any) -> dict[str, Any]:
    """The inputs of ``graph`` from ``args.file`` / ``args.data`` / ``args.iter``, keyed by PE id.

    Raises:
        InputError: the JSON is malformed, or the file cannot be read; also a ``ValueError``, as dispel4py
            raises.
    """
    try:
        inputs = parse_cli_inputs(getattr(args, "iter", 1), getattr(args, "data", None), getattr(args, "file", None))
    except InputError as exc:
        raise _BadInputs(str(exc)) from exc
    flat = graph.flatten()
    if inputs is None or isinstance(inputs, int):
        return dict.fromkeys(flat.roots(), 1 if inputs is None else inputs)
    by_name = {pe.name: pe_id for pe_id, pe in flat.pes.items()}
    return {by_name.get(key, key) if isinstance(key, str) else key: value for key, value in inputs.items()}


def load_graph_and_inputs(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """The graph named by ``args.module`` (``args.attr``) and its inputs; ``(None, None)`` if it cannot be loaded."""
    from .utils import load_graph

    graph = load_graph(args.module, getattr(args, "attr", None))
    if graph is None:
        return None, None
    return graph, create_inputs(args, graph)
