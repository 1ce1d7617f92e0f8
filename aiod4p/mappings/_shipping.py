"""Shipping a job (plan, feeds, settings) to workers in other interpreters.

One pickling for every multi-process mapping, cloudpickle's (as Ray, dask
and PySpark ship code): what another interpreter could not import by name
travels by value, namely classes and functions defined in ``__main__`` (a
notebook, ``python -c``, a script), lambdas and local functions, and classes
made at run time (``type()``, as dispel4py's monitoring wrappers do). A module
the other interpreter could not import by name (a workflow file loaded by
path) travels as the path of its file, loaded there before unpickling. Errors
name the PE or the input that cannot be pickled.

Items travel between workers with plain pickle, which names the class of an
item defined in ``__main__`` by reference (``__main__.Point``). So a job
shipped *with* ``__main__`` (``main=True``: the workers cannot import the
launcher's ``__main__``) also carries the classes and functions defined at
the top level of the launcher's ``__main__``, which become the worker's
``__main__`` (a module of its own: the worker's entry point, such as
``aiod4p.mappings._mpi_job``, keeps its names) before the rest is unpickled:
an item of such a class pickled there by reference finds its class, and
comes back to the launcher as an instance of its original class; a
dispel4py PE of such a class, which travels by the name of its class, is
rebuilt. Shipped without (``main=False``: a spawned worker imports
the launcher's script again), ``__main__``'s classes and functions travel by
reference, as plain pickle sends them.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle

from .._checkpoint import WorkerSpec
from .._engine import Feed
from .._loading import ship_code
from .._plan import ExecutionPlan
from ..errors import GraphError, InputError, TargetError

if TYPE_CHECKING:
    from ._host import Pumped

__all__ = ["Job", "dumps", "loads", "ship", "shipped_drained", "unship", "unship_or_error"]

#: A top-level class or function of ``__main__`` whose pickle is larger is not shipped along (it drags
#: large globals with it; a PE that uses it carries it all the same).
MAIN_LIMIT = 1 << 20


@dataclass
class Job:
    """What every worker of a run receives.

    Attributes:
        plan: the execution plan.
        feeds: the feeds that travel with the job (:class:`Pumped` for those the launcher pumps).
        max_delay: the engine's batching delay, in seconds.
        interval: seconds between two statistics reports.
        checkpoints: where and from what the workers take checkpoints (``None``: they take none).
        drained: the run was asked to drain before its workers started: they start drained, their sources and
            feeds ending at once, as on the async mapping (a ``Drain`` message would reach them only once their
            sources had produced for a while).
    """

    plan: ExecutionPlan
    feeds: dict[str, Feed | Pumped]
    max_delay: float
    interval: float
    checkpoints: WorkerSpec | None = None
    drained: bool = False


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no type hints
    """cloudpickle's pickler; with ``main`` false, the classes and functions that ``__main__`` names
    travel by reference (the other interpreter imports the launcher's ``__main__`` again)."""

    def __init__(self, file: io.BytesIO, main: bool) -> None:
        # A dict of cloudpickle's ChainMap (its reducers, then copyreg's, as they are now), which pickle
        # would look up for every object in Python; read by pickle as the pickler starts.
        self.dispatch_table = dict(cloudpickle.Pickler.dispatch_table)
        self.dispatch_table[types.CodeType] = _reduce_code
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self._main = main

    def reducer_override(self, obj: Any) -> Any:
        # cloudpickle's own takes classes and functions only: the others go on at once
        if not isinstance(obj, type | types.FunctionType) or (not self._main and _in_main(obj)):
            return NotImplemented  # pickle's own (classes and functions: by reference)
        return super().reducer_override(obj)


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    """cloudpickle's reduction of ``code``, keeping the file it names: cloudpickle names every code it ships by
    value ``<dynamic-code>``, so a PE of a notebook failing in a worker would be said to fail there, where the
    same PE on simple or async names its cell's file."""
    return _code_in, (cloudpickle.Pickler.dispatch_table[types.CodeType](code), code.co_filename)


def _code_in(reduced: tuple[Any, tuple[Any, ...]], filename: str) -> types.CodeType:
    """The code that cloudpickle ``reduced`` (a constructor and its arguments), naming ``filename``."""
    make, arguments = reduced
    code: types.CodeType = make(*arguments)
    return code.replace(co_filename=filename)


def _in_main(obj: type | types.FunctionType) -> bool:
    """Whether ``__main__`` names ``obj`` (by its qualified name)."""
    if getattr(obj, "__module__", None) != "__main__":
        return False
    target: Any = sys.modules.get("__main__")
    for part in obj.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is obj


def _pickle(obj: Any, main: bool) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, main).dump(obj)
    return buffer.getvalue()


def pickled_code(obj: Any) -> bytes:
    """Pickle ``obj`` alone: the classes and functions importable by name travel by reference, the others
    (lambdas, local functions, those of ``__main__``) by value, and no other code is shipped with it. For an
    interpreter that imports the same modules by name but not the caller's ``__main__`` (a Storm worker, given the
    workflow's modules, runs streamparse's); ``pickle.loads`` reverses it where cloudpickle and aiod4p are installed.

    Raises:
        Exception: ``obj`` cannot be pickled (pickle.PicklingError, TypeError, AttributeError, ...).
    """
    return _pickle(obj, main=True)


class _Limited(io.BytesIO):
    """A pickler's file that refuses to grow beyond :data:`MAIN_LIMIT` bytes (a function of a notebook that
    uses a large global data set: its pickle stops there, not once the data set is copied)."""

    def write(self, data: Any) -> int:
        if self.tell() + memoryview(data).nbytes > MAIN_LIMIT:
            raise _TooLarge
        return super().write(data)


class _TooLarge(Exception):
    pass


def _main_namespace() -> dict[str, Any]:
    """The classes and functions defined at the top level of ``__main__`` that can be pickled by value
    (within :data:`MAIN_LIMIT` bytes); the others are left behind."""
    shipped: dict[str, Any] = {}
    main = sys.modules.get("__main__")
    for name, value in list(vars(main).items()) if main is not None else ():
        if not isinstance(value, type | types.FunctionType) or name.startswith("__"):
            continue
        if getattr(value, "__module__", None) != "__main__" or getattr(value, "__qualname__", None) != name:
            continue  # imported from elsewhere (by reference anyway), or made under another name
        try:
            _Pickler(_Limited(), True).dump(value)
        except Exception:  # _TooLarge, or it cannot be pickled
            continue
        shipped[name] = value
    return shipped


def dumps(obj: Any, main: bool = False) -> bytes:
    """Pickle ``obj`` for another interpreter (see the module's docstring); :func:`loads` reverses it.

    Args:
        obj: what to pickle.
        main: whether the other interpreter cannot import the launcher's ``__main__``: then its classes
            and functions travel by value, and its top-level ones with ``obj``.

    Raises:
        Exception: ``obj`` cannot be pickled (pickle.PicklingError, TypeError, AttributeError, ...).
    """
    payload = _pickle((_MainNames(_main_namespace() if main else {}), obj), main)
    return pickle.dumps((ship_code(payload), payload), pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    """Unpickle what :func:`dumps` made, loading the code shipped with it first
    (:meth:`aiod4p._loading.CodeShipment.load`: workflow files, dispel4py's modules), and making the
    launcher's top-level classes and functions shipped with it this interpreter's ``__main__``.

    Raises:
        Exception: whatever unpickling or loading a module raises.
    """
    shipment, payload = pickle.loads(data)
    shipment.load()
    _, obj = pickle.loads(payload)
    return obj


class _MainNames:
    """The launcher's top-level classes and functions, pickled before what may need them: unpickled, they
    become this interpreter's ``__main__`` (see :func:`_become_main`)."""

    def __init__(self, names: dict[str, Any]) -> None:
        self.names = names

    def __reduce__(self) -> tuple[Any, ...]:
        return _become_main, (self.names,)


#: The ``__main__`` modules that :func:`_become_main` replaced: their code (a worker's entry point) runs on.
_REPLACED: list[types.ModuleType] = []


def _become_main(names: dict[str, Any]) -> None:
    """Make ``names`` (when any) this interpreter's ``__main__``, in a module of their own."""
    if not names:
        return
    main = types.ModuleType("__main__")
    vars(main).update(names)
    _REPLACED.append(sys.modules["__main__"])
    sys.modules["__main__"] = main


def ship(job: Job, purpose: str, hint: str = "", *, main: bool = False) -> bytes:
    """Pickle ``job`` with :func:`dumps` ``to {purpose}`` (e.g. "start spawned worker processes").

    Args:
        job: the job.
        purpose: what the job is pickled for, in error messages.
        hint: ends the advice of an error.
        main: whether the workers cannot import the launcher's ``__main__`` (see :func:`dumps`).

    Raises:
        GraphError: a PE (named) or the workflow cannot be pickled; ``hint`` ends the advice.
        InputError: the input of a PE (named) cannot be pickled.
    """
    try:
        return dumps(job, main)
    except Exception as exc:
        if (culprit := _unpicklable(job.plan.pes, main)) is not None:
            pe_id, error = culprit
            state = job.plan.pes[pe_id].__getstate__()
            attribute = _unpicklable(state, main) if isinstance(state, dict) else None
            if attribute is not None:
                name, error = attribute
                what = f"its attribute {name!r} (a {type(state[name]).__name__}) cannot: "
            else:
                what = ""
            raise GraphError(
                f"PE {pe_id} cannot be pickled to {purpose}: {what}{type(error).__name__}: {error} (a PE travels"
                f" with its attributes; create resources such as files, sockets and locks in preprocess(){hint})"
            ) from error
        if (culprit := _unpicklable(job.feeds, main)) is not None:
            pe_id, error = culprit
            raise InputError(
                f"the input of PE {pe_id} cannot be pickled to {purpose}: {type(error).__name__}: {error}"
            ) from error
        raise GraphError(f"the workflow cannot be pickled to {purpose}: {type(exc).__name__}: {exc}") from exc


def shipped_drained(job: Job, payload: bytes, draining: bool, purpose: str) -> bytes:
    """``payload`` (``job`` shipped for ``purpose``, ``main`` as the workers of a launch that ships it late need:
    MPI ranks, Ray actors); or, if the run was asked to drain (``draining``) after the job was made and before it
    is handed over, the job shipped again drained, so that the workers run nothing, as :attr:`Job.drained` says
    (a ``Drain`` message would reach them only once their sources had produced)."""
    if draining and not job.drained:
        return ship(dataclasses.replace(job, drained=True), purpose, main=True)
    return payload


IMPORTABLE = "its PE classes must be importable there"  # what a worker that cannot load the job lacks


def unship(data: bytes, where: str, lacking: str = IMPORTABLE) -> Job:
    """The job :func:`ship` made, loaded in ``where`` (e.g. "MPI rank 1"); ``lacking`` says, when it cannot be,
    what ``where`` needs.

    Raises:
        TargetError: the workflow's code cannot be loaded here (``where`` named).
    """
    try:
        job: Job = loads(data)
    except TargetError as exc:  # a file of the workflow's code that the job ships (CodeShipment) failed to import
        raise TargetError(f"{where}: {exc}") from exc
    except Exception as exc:
        raise TargetError(f"{where} cannot load the workflow ({type(exc).__name__}: {exc}); {lacking}") from exc
    return job


def unship_or_error(data: Job | bytes, where: str, lacking: str = IMPORTABLE) -> Job | TargetError:
    """``data`` (a job, or what :func:`ship` made of one) loaded as :func:`unship` loads it, or the error that
    it raised: for a worker that loads its job before it opens the comm that would report the failure (a comm
    unpickles what arrives, and items may be of classes the job brings along)."""
    if isinstance(data, Job):
        return data
    try:
        return unship(data, where, lacking)
    except TargetError as exc:
        return exc


def _unpicklable(values: Mapping[str, Any], main: bool) -> tuple[str, Exception] | None:
    """The first ``(key, error)`` whose value cannot be pickled as :func:`dumps` pickles, if any."""
    for key, value in values.items():
        try:
            _pickle(value, main)
        except Exception as exc:
            return key, exc
    return None
