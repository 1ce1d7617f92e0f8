"""dispel4py's mapping entry points on aiod4p: ``dispel4py.new.simple_process``,
``multi_process`` and ``mpi_process``.

Tutorials call them at module level, e.g.
``simple_process.process_and_return(graph, {producer: 20})``: each runs the
graph on the aiod4p mapping of the same name. In a worker process (a multi
worker or an MPI rank importing the workflow module to rebuild its PEs) they
do nothing, so a module that runs itself at import does not run again there.
"""

from __future__ import annotations

import queue
from typing import Any

from .._api import resolve_mapping, run, run_blocking, start
from .._loading import in_worker
from .._results import Results
from .processor import STATUS_ACTIVE, STATUS_TERMINATED
from .provenance import provenance_config

__all__ = ["entry_points", "process", "process_and_return"]

Outputs = dict[str, dict[str, list[Any]]]


def process_and_return(
    workflow: Any, inputs: Any, resultmappings: Any = None, *, mapping: str = "simple", workers: int | None = None
) -> Outputs:
    """Run ``workflow`` and return what its unconnected outputs produced: ``{pe_id: {output: [items]}}``.

    ``inputs`` maps PEs (or their ids or names) to a number of calls or a list
    of input dicts, as in dispel4py. A graph set up by dispel4py's
    ``configure_prov_run`` runs with provenance, written to its file when
    the run succeeds.

    Raises:
        NotImplementedError: ``resultmappings`` is given (dispel4py's named
            results of connected outputs are not supported).
        Aiod4pError: the run failed.
    """
    if resultmappings is not None:
        raise NotImplementedError("aiod4p does not support dispel4py's resultmappings: results are unconnected outputs")
    if in_worker():
        return {}
    config = provenance_config(workflow)
    if config is None:
        results = run(workflow, inputs, mapping=mapping, workers=workers)
    else:
        chosen = resolve_mapping(mapping)

        async def recorded() -> Results:
            async with start(workflow, inputs, mapping=chosen, workers=workers, provenance=config.level) as flow:
                done = await flow.results()
            config.save(flow.stats)
            return done

        results = run_blocking(recorded, chosen.uses_uvloop)
    outputs: dict[str, dict[str, list[Any]]] = {}
    for (pe_id, port), items in results.by_port().items():
        outputs.setdefault(pe_id, {})[port] = items
    return outputs


def process(
    workflow: Any, inputs: Any, args: Any = None, resultmappings: Any = None, *, mapping: str = "simple"
) -> queue.Queue[Any] | None:
    """Run ``workflow`` and print its inputs and outputs as dispel4py's ``process`` does.

    ``args.num`` (dispel4py's ``-n``) is the number of processes; ``args.simple``
    runs on the simple mapping instead. On multi with ``args.results`` set,
    nothing is printed and, as from dispel4py's multi ``process``, the results
    come back: a queue holding one ``(pe_id, output, item)`` per result, then
    ``STATUS_TERMINATED``.

    Raises:
        Aiod4pError: the run failed.
    """
    if in_worker():
        return None
    returning = mapping == "multi" and bool(getattr(args, "results", False))
    if getattr(args, "simple", False):
        mapping = "simple"
    workers = getattr(args, "num", None) if mapping != "simple" else None
    if returning:
        results: queue.Queue[Any] = queue.Queue()
        for pe_id, ports in process_and_return(
            workflow, inputs, resultmappings, mapping=mapping, workers=workers
        ).items():
            for port, items in ports.items():
                for item in items:
                    results.put((pe_id, port, item))
        results.put(STATUS_TERMINATED)
        return results
    print(f"Inputs: { {getattr(pe, 'id', pe): data for pe, data in inputs.items()} }")
    print(f"Outputs: {process_and_return(workflow, inputs, resultmappings, mapping=mapping, workers=workers)}")
    return None


def entry_points(mapping: str) -> dict[str, Any]:
    """The public names of ``dispel4py.new.<mapping>_process``: its entry points, bound to ``mapping``."""

    def process_on(workflow: Any, inputs: Any, args: Any = None, resultmappings: Any = None) -> queue.Queue[Any] | None:
        return process(workflow, inputs, args, resultmappings, mapping=mapping)

    def process_and_return_on(workflow: Any, inputs: Any, resultmappings: Any = None) -> Outputs:
        return process_and_return(workflow, inputs, resultmappings, mapping=mapping)

    process_on.__doc__ = (
        f"Run ``workflow`` on aiod4p's {mapping} mapping and print its inputs and outputs"
        " (or return the results queue, as :func:`process` says)."
    )
    process_and_return_on.__doc__ = f"Run ``workflow`` on aiod4p's {mapping} mapping and return its outputs."
    process_on.__name__, process_and_return_on.__name__ = "process", "process_and_return"
    names: dict[str, Any] = {"process": process_on, "process_and_return": process_and_return_on}
    if mapping != "simple":  # dispel4py's multi_process and mpi_process import these from its processor
        names.update(STATUS_ACTIVE=STATUS_ACTIVE, STATUS_TERMINATED=STATUS_TERMINATED)
    return names
