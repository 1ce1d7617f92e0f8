"""``dispel4py.core`` on aiod4p: :class:`GenericPE` and the connection keys.

A dispel4py PE declares its ports in the ``inputconnections`` and
``outputconnections`` dicts (directly or through :meth:`GenericPE._add_input`
and :meth:`GenericPE._add_output`). Those dicts stay the source of truth: the
ports the aiod4p engine sees (``pe.inputs`` / ``pe.outputs``) are derived from
them whenever they are read, so a grouping changed after construction
(``pe.inputconnections['input']['grouping'] = 'all'``) is honoured.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .._groupings import ROUND_ROBIN, All, Global, GroupBy, as_grouping
from .._loading import quiet_import
from .._pe import GenericPE as _CoreGenericPE
from .._pe import InputPort, OutputPort
from ..errors import GraphError
from . import install

__all__ = ["DESCRIPTION", "GROUPING", "META", "NAME", "TYPE", "WRITER", "GenericPE"]

_OWN_LABEL, _OWN_INSTANCE = "_own_label", "_own_instance"  # where a PE's own label/instance are kept

NAME = "name"
TYPE = "type"
DESCRIPTION = "descr"
META = "meta"
GROUPING = "grouping"
WRITER = "writer"


class GenericPE(_CoreGenericPE):
    """dispel4py's base PE, run by the aiod4p engine.

    Override :meth:`process` (or :meth:`_process`), which receives one
    ``{input_name: item}`` per call (``{}`` for a root fed by ``-i``) and
    returns ``None`` or ``{output_name: item}``; :meth:`write` (or ``_write``)
    emits any number of items (dispel4py's extra keywords to ``write`` are
    not accepted). On multi and mpi, ``numprocesses`` is the PE's weight in
    dispel4py's share of the ``-n`` processes
    (:func:`aiod4p.compat.processor.place`); elsewhere (and when the workers
    are too few for dispel4py's rule), when assigned, it is the number of
    instances (``parallelism``), and left at its default the mapping decides.
    """

    takes_undeclared_inputs = True  # dispel4py passes a root's input dicts to process() as they are

    def __init__(self, numprocesses: int = 1) -> None:
        self.inputconnections: dict[str, dict[str, Any]] = {}
        self.outputconnections: dict[str, dict[str, Any]] = {}
        super().__init__()
        self.wrapper = "simple"
        self.pickleIgnore: list[str] = []
        self._numprocesses = numprocesses
        if numprocesses != 1:
            self.parallelism = numprocesses

    # -- dispel4py's declarations --------------------------------------------
    def _add_input(self, name: str, grouping: Any = None, tuple_type: Any = None) -> None:
        """Declare (or redeclare) input ``name``, with an optional grouping and type."""
        self.inputconnections[name] = {NAME: name}
        if grouping:
            self.inputconnections[name][GROUPING] = grouping
        if tuple_type:
            self.inputconnections[name][TYPE] = tuple_type

    def _add_output(self, name: str, tuple_type: Any = None) -> None:
        """Declare (or redeclare) output ``name``, with an optional type."""
        self.outputconnections[name] = {NAME: name}
        if tuple_type:
            self.outputconnections[name][TYPE] = tuple_type

    @property
    def rank(self) -> int:
        """dispel4py's process rank: a number unique among the run's PE instances (0 outside a run)."""
        if "_rank" in self.__dict__:
            return int(self.__dict__["_rank"])
        return self._runtime.rank if self._runtime is not None else 0

    @rank.setter
    def rank(self, value: int) -> None:  # dispel4py's mappings, and code written for them, assign it
        self.__dict__["_rank"] = value

    # dispel4py PEs keep their own data under any name: one that aiod4p's PE
    # reads only (label, instance) is theirs once they assign it.
    @property
    def label(self) -> Any:
        """The PE's own ``label`` once it assigns one (``self.label = ...``); else aiod4p's: its id, else its name."""
        return self.__dict__[_OWN_LABEL] if _OWN_LABEL in self.__dict__ else super().label

    @label.setter
    def label(self, value: Any) -> None:
        self.__dict__[_OWN_LABEL] = value

    @property
    def instance(self) -> Any:
        """The PE's own ``instance`` once it assigns one; else aiod4p's: this running instance's index."""
        return self.__dict__[_OWN_INSTANCE] if _OWN_INSTANCE in self.__dict__ else super().instance

    @instance.setter
    def instance(self, value: Any) -> None:
        self.__dict__[_OWN_INSTANCE] = value

    @property
    def numprocesses(self) -> int:
        """dispel4py's process count: a weight on multi and mpi, else the number of instances once set."""
        return self._numprocesses

    @numprocesses.setter
    def numprocesses(self, value: int) -> None:
        self._numprocesses = value
        self.parallelism = value

    # -- the ports the engine sees ----------------------------------------------
    @property
    def inputs(self) -> dict[str, InputPort]:
        """The input ports, derived from ``inputconnections`` (never required).

        Raises:
            GraphError: an input has a grouping aiod4p does not understand.
        """
        ports: dict[str, InputPort] = {}
        for name, connection in self.inputconnections.items():
            try:
                grouping = as_grouping(connection.get(GROUPING) or ROUND_ROBIN)  # dispel4py's default
            except ValueError as exc:
                raise GraphError(f"PE {self.label}, input {name!r}: {exc}") from None
            ports[name] = InputPort(name, grouping, required=False)
        return ports

    @inputs.setter
    def inputs(self, ports: Mapping[str, InputPort]) -> None:
        self.inputconnections = {}
        for name, port in ports.items():
            self._add_input(name, _grouping_value(port))

    @property
    def outputs(self) -> dict[str, OutputPort]:
        """The output ports, derived from ``outputconnections``."""
        return {name: OutputPort(name) for name in self.outputconnections}

    @outputs.setter
    def outputs(self, ports: Mapping[str, OutputPort]) -> None:
        self.outputconnections = {}
        for name in ports:
            self._add_output(name)

    def add_input(self, name: str, grouping: Any = None, *, required: bool = True) -> InputPort:
        """aiod4p's declaration, recorded in ``inputconnections``.

        Raises:
            GraphError: the port already exists.
            ValueError: the grouping is not understood.
        """
        if name in self.inputconnections:
            raise GraphError(f"PE {self.label}: input port {name!r} declared twice")
        as_grouping(grouping)
        self._add_input(name, grouping)
        return self.inputs[name]

    def add_output(self, name: str) -> OutputPort:
        """aiod4p's declaration, recorded in ``outputconnections``.

        Raises:
            GraphError: the port already exists.
        """
        if name in self.outputconnections:
            raise GraphError(f"PE {self.label}: output port {name!r} declared twice")
        self._add_output(name)
        return OutputPort(name)

    # -- copies and pickles ------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> GenericPE:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return clone

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A worker process (multi, mpi) has no import hook yet: the PE travels
        # with the *names* of its class (or, for a class mixed at run time such
        # as dispel4py's ProcessTimingPE makes, of its bases), resolved by
        # _rebuild after installing the hook.
        spec = _class_spec(type(self))
        if spec is None:
            return super().__reduce_ex__(protocol)  # pickle's own error
        return (_rebuild, (spec,), self.__getstate__())

    # -- dispel4py's type propagation ------------------------------------------
    def setInputTypes(self, types: Mapping[str, Any]) -> None:
        """Receive the types of the inputs; override to derive output types."""

    def getOutputTypes(self) -> dict[str, Any]:
        """The ``TYPE`` of every output.

        Raises:
            GraphError: an output declares no type.
        """
        types: dict[str, Any] = {}
        for name, connection in self.outputconnections.items():
            if TYPE not in connection:
                raise GraphError(f"PE {self.label}: no output type defined for {name!r}")
            types[name] = connection[TYPE]
        return types

    # -- lifecycle -------------------------------------------------------------
    def _preprocess(self) -> Any:
        """Override for initialisation before any data."""

    def preprocess(self) -> Any:
        return self._preprocess()

    def _process(self, data: Any) -> Any:
        """Override to handle ``data`` (the inputs dict, for a GenericPE)."""
        return None

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return self._process(inputs)

    def _postprocess(self) -> Any:
        """Override for work after the end of every input stream."""

    def postprocess(self) -> Any:
        return self._postprocess()

    # -- output ------------------------------------------------------------------
    # write() is aiod4p's own PE.write (inherited), the very call native PEs make;
    # dispel4py's _write is the same function.
    _write = _CoreGenericPE.write


def _grouping_value(port: InputPort) -> Any:
    grouping = port.grouping
    if isinstance(grouping, All):
        return "all"
    if isinstance(grouping, Global):
        return "global"
    if isinstance(grouping, GroupBy):
        return list(grouping.indices) if grouping.key is None else grouping
    return None


def plain_function(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is an ordinary function (not async, not a generator)."""
    return not (inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn))


def _find_class(module_name: str, qualname: str) -> Any:
    target: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target


ClassSpec = tuple[str, str, tuple[tuple[str, str], ...]]
_EMPTY_CLASS = {"__module__", "__doc__", "__dict__", "__weakref__", "__qualname__"}


def _class_spec(cls: type) -> ClassSpec | None:
    """``(module, qualname, ())`` for an importable class; ``("", name, bases)`` for one mixed at run time."""
    if _find_class(cls.__module__, cls.__qualname__) is cls:
        return (cls.__module__, cls.__qualname__, ())
    if set(vars(cls)) - _EMPTY_CLASS:
        return None  # a local class with its own methods: not rebuildable from its bases
    bases = tuple((base.__module__, base.__qualname__) for base in cls.__bases__)
    if all(_find_class(*base) is not None for base in bases):
        return ("", cls.__name__, bases)
    return None


def _import_class(module_name: str, qualname: str) -> type:
    if module_name not in sys.modules:
        install()  # a fresh worker process: dispel4py's modules come from the hook
        try:
            with quiet_import():
                importlib.import_module(module_name)
        except ImportError as exc:
            raise GraphError(f"cannot import {module_name} to rebuild PE class {qualname}: {exc}") from exc
    cls = _find_class(module_name, qualname)
    if not isinstance(cls, type):
        raise GraphError(f"{module_name}.{qualname} is not a class here: cannot rebuild a PE of it")
    return cls


def _rebuild(spec: ClassSpec) -> GenericPE:
    """An empty dispel4py PE of the class ``spec`` names (pickle then restores its state).

    Raises:
        GraphError: the class cannot be imported in this process.
    """
    module_name, name, bases = spec
    if module_name:
        cls = _import_class(module_name, name)
    else:
        cls = type(name, tuple(_import_class(*base) for base in bases), {})
    if not issubclass(cls, GenericPE):
        raise GraphError(f"{name} is not a dispel4py PE class in this process")
    return cls.__new__(cls)
