"""Shipping a job (plan, feeds, settings) to workers in other interpreters.

One pickling for every multi-process mapping: classes made at run time
(``type()``, as dispel4py's monitoring wrappers do) travel by value, and a
module the other interpreter could not import by name (a workflow file
loaded by path) travels as the path of its file, loaded there before
unpickling. Errors name the PE or the input that cannot be pickled.
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._checkpoint import WorkerSpec
from .._engine import Feed
from .._loading import ship_code
from .._pe import FunctionPE
from .._plan import ExecutionPlan
from ..errors import GraphError, InputError, TargetError

if TYPE_CHECKING:
    from ._host import Pumped

__all__ = ["Job", "check_importable", "dumps", "loads", "ship", "unship"]


@dataclass
class Job:
    """What every worker of a run receives.

    Attributes:
        plan: the execution plan.
        feeds: the feeds that travel with the job (:class:`Pumped` for those the launcher pumps).
        max_delay: the engine's batching delay, in seconds.
        interval: seconds between two statistics reports.
        checkpoints: where and from what the workers take checkpoints (``None``: they take none).
    """

    plan: ExecutionPlan
    feeds: dict[str, Feed | Pumped]
    max_delay: float
    interval: float
    checkpoints: WorkerSpec | None = None


class _Pickler(pickle.Pickler):
    """Pickles classes that cannot be found by name by value (name, bases and
    attributes); everything else as usual."""

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, type) or _findable(obj):
            return NotImplemented
        namespace = {k: v for k, v in vars(obj).items() if k not in ("__dict__", "__weakref__")}
        return type(obj), (obj.__name__, obj.__bases__, namespace)


def _findable(cls: type) -> bool:
    target: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is cls


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` for another interpreter (see the module's docstring); :func:`loads` reverses it.

    Raises:
        Exception: ``obj`` cannot be pickled (pickle.PicklingError, TypeError, AttributeError, ...).
    """
    buffer = io.BytesIO()
    _Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    payload = buffer.getvalue()
    return pickle.dumps((ship_code(payload), payload), pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    """Unpickle what :func:`dumps` made, loading the code shipped with it first
    (:meth:`aiod4p._loading.CodeShipment.load`: workflow files, dispel4py's modules).

    Raises:
        Exception: whatever unpickling or loading a module raises.
    """
    shipment, payload = pickle.loads(data)
    shipment.load()
    return pickle.loads(payload)


def ship(job: Job, purpose: str, hint: str = "") -> bytes:
    """Pickle ``job`` with :func:`dumps` ``to {purpose}`` (e.g. "start spawned worker processes").

    Raises:
        GraphError: a PE (named) or the workflow cannot be pickled; ``hint`` ends the advice.
        InputError: the input of a PE (named) cannot be pickled.
    """
    try:
        return dumps(job)
    except Exception as exc:
        if (culprit := _unpicklable(job.plan.pes)) is not None:
            pe_id, error = culprit
            raise GraphError(
                f"PE {pe_id} cannot be pickled to {purpose}: {type(error).__name__}: {error} (pickling needs"
                f" PEs and their functions defined at module level, not as lambdas or local objects{hint})"
            ) from error
        if (culprit := _unpicklable(job.feeds)) is not None:
            pe_id, error = culprit
            raise InputError(
                f"the input of PE {pe_id} cannot be pickled to {purpose}: {type(error).__name__}: {error}"
            ) from error
        raise GraphError(f"the workflow cannot be pickled to {purpose}: {type(exc).__name__}: {exc}") from exc


def unship(data: bytes, where: str) -> Job:
    """The job :func:`ship` made, loaded in ``where`` (e.g. "MPI rank 1").

    Raises:
        TargetError: the workflow's code cannot be loaded here.
    """
    try:
        job: Job = loads(data)
    except Exception as exc:
        if isinstance(exc, TargetError):
            raise
        raise TargetError(
            f"{where} cannot load the workflow ({type(exc).__name__}: {exc}); its PE classes must be importable there"
        ) from exc
    return job


def check_importable(plan: ExecutionPlan, where: str, hint: str = "") -> None:
    """Refuse PEs whose class, or function (a :class:`~aiod4p.FunctionPE`), is defined in ``__main__``,
    which ``where`` cannot import.

    Raises:
        GraphError: naming the first such PE; ``hint`` ends the advice.
    """
    for pe_id, pe in plan.pes.items():
        code: list[tuple[str, Any]] = [("class", type(pe))]
        if isinstance(pe, FunctionPE):
            fn = pe.fn
            while isinstance(fn, functools.partial):
                fn = fn.func
            code.append(("function", fn))
        for kind, defined in code:
            if getattr(defined, "__module__", None) == "__main__":
                raise GraphError(
                    f"PE {pe_id}: its {kind} {defined.__name__} is defined in __main__, which {where} cannot"
                    f" import; define it in a module{hint}"
                )


def _unpicklable(values: Mapping[str, Any]) -> tuple[str, Exception] | None:
    """The first ``(key, error)`` whose value cannot be pickled by :func:`dumps`, if any."""
    for key, value in values.items():
        try:
            dumps(value)
        except Exception as exc:
            return key, exc
    return None
