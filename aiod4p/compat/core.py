"""``dispel4py.core`` on aiod4p: :class:`GenericPE` and the connection keys.

A dispel4py PE declares its ports in the ``inputconnections`` and
``outputconnections`` dicts (directly or through :meth:`GenericPE._add_input`
and :meth:`GenericPE._add_output`). Those dicts stay the source of truth: the
ports the aiod4p engine sees are derived from them whenever they are read, so
a grouping changed after construction
(``pe.inputconnections['input']['grouping'] = 'all'``) is honoured.

dispel4py's PEs have no attributes ``inputs``, ``outputs``, ``parallelism``,
``label`` or ``instance``, so a PE may keep its own data under those names
(``self.outputs = []``): once it assigns one, reading it gives the PE's value
back, and the engine, which reads the ports and the instance count through
:attr:`aiod4p.PE._input_ports`, ``_output_ports`` and ``_parallelism``, is
not affected. Until then they read as aiod4p's.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import inspect
import io
import logging
import os
import socket
import sys
import sysconfig
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import CodeType, FunctionType
from typing import Any

from .._groupings import ROUND_ROBIN, as_grouping
from .._loading import quiet_import
from .._pe import GenericPE as _CoreGenericPE
from .._pe import InputPort, OutputPort
from ..errors import GraphError
from . import install

__all__ = ["DESCRIPTION", "GROUPING", "META", "NAME", "TYPE", "WRITER", "GenericPE"]

logger = logging.getLogger("aiod4p.compat")
_SHARED_ATTRIBUTES: set[tuple[type, str]] = set()  # (PE class, attribute) warned about by GenericPE.__deepcopy__


NAME = "name"
TYPE = "type"
DESCRIPTION = "descr"
META = "meta"
GROUPING = "grouping"
WRITER = "writer"


_MISSING = object()


class _Own:
    """A name of aiod4p's PE that a dispel4py PE may use for its own data.

    Once the PE assigns it, reading it gives the PE's value (kept in the
    instance's ``_own_<name>``); until then, ``default(pe)``: aiod4p's value.
    """

    def __init__(self, default: Callable[[Any], Any], doc: str) -> None:
        self.default = default
        self.__doc__ = doc
        self.key = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"_own_{name}"

    def __get__(self, pe: Any, owner: type | None = None) -> Any:
        if pe is None:
            return self
        own = getattr(pe, self.key, _MISSING)  # not through pe.__dict__: see GenericPE.__deepcopy__
        return self.default(pe) if own is _MISSING else own

    def __set__(self, pe: Any, value: Any) -> None:
        object.__setattr__(pe, self.key, value)


#: The names aiod4p's PE.__init__ assigns that a dispel4py PE may own.
_ASSIGNED_BY_CORE = ("_own_inputs", "_own_outputs", "_own_parallelism")


def _write_ignoring_keywords(self: GenericPE, port: str, item: Any, **ignored: Any) -> None:
    """dispel4py's ``write``: the keywords it takes for provenance (``metadata``, ``location``, ...) are ignored, as
    dispel4py ignores them with provenance off (a :class:`~aiod4p.compat.provenance.ProvenanceType` records them)."""
    _CoreGenericPE.write(self, port, item)


class GenericPE(_CoreGenericPE):
    """dispel4py's base PE, run by the aiod4p engine.

    Override :meth:`process` (or :meth:`_process`), which receives one
    ``{input_name: item}`` per call (``{}`` for a root fed by ``-i``) and
    returns ``None`` or ``{output_name: item}``; :meth:`write` (or ``_write``)
    emits any number of items (dispel4py's extra keywords to ``write``, its
    provenance metadata, are ignored, as dispel4py ignores them with provenance
    off). On multi and mpi, ``numprocesses`` is the PE's weight in
    dispel4py's share of the ``-n`` processes
    (:func:`aiod4p.compat.processor.place`); elsewhere (and when the workers
    are too few for dispel4py's rule), when assigned, it is the number of
    instances (:attr:`_parallelism`), and left at its default the mapping
    decides. A root runs once whatever it says, as on every dispel4py mapping.
    ``inputs``, ``outputs``, ``parallelism``, ``label`` and ``instance`` are
    the PE's own once it assigns them (see the module).
    """

    takes_undeclared_inputs = True  # dispel4py passes a root's input dicts to process() as they are
    _root_runs_once = True

    def __init__(self, numprocesses: int = 1) -> None:
        own = {key: getattr(self, key) for key in _ASSIGNED_BY_CORE if hasattr(self, key)}  # set before this call
        self.inputconnections: dict[str, dict[str, Any]] = {}
        self.outputconnections: dict[str, dict[str, Any]] = {}
        super().__init__()
        for key in _ASSIGNED_BY_CORE:  # aiod4p's PE.__init__ assigned them: not the PE's own data
            if hasattr(self, key):
                delattr(self, key)
        for key, value in own.items():
            setattr(self, key, value)
        self.wrapper = "simple"
        self.pickleIgnore: list[str] = []
        self._numprocesses = numprocesses
        self._instances: int | None = numprocesses if numprocesses != 1 else None
        _look_again_for_keywords(type(self))

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
        own = getattr(self, "_rank", None)
        if own is not None:
            return int(own)
        return self._runtime.rank if self._runtime is not None else 0

    @rank.setter
    def rank(self, value: int) -> None:  # dispel4py's mappings, and code written for them, assign it
        self._rank = value

    # dispel4py PEs keep their own data under any name, aiod4p's too.
    label = _Own(
        lambda pe: _CoreGenericPE.label.fget(pe),  # type: ignore[attr-defined]
        "The PE's own ``label`` once it assigns one (``self.label = ...``); else aiod4p's: its id, else its name.",
    )
    instance = _Own(
        lambda pe: _CoreGenericPE.instance.fget(pe),  # type: ignore[attr-defined]
        "The PE's own ``instance`` once it assigns one; else aiod4p's: this running instance's index.",
    )
    parallelism = _Own(
        lambda pe: pe._parallelism,
        "The PE's own ``parallelism`` once it assigns one; else the instance count ``numprocesses`` sets.",
    )
    inputs = _Own(
        lambda pe: pe._input_ports,
        "The PE's own ``inputs`` once it assigns one; else the input ports, derived from ``inputconnections``.",
    )
    outputs = _Own(
        lambda pe: pe._output_ports,
        "The PE's own ``outputs`` once it assigns one; else the output ports, derived from ``outputconnections``.",
    )

    @property
    def numprocesses(self) -> int:
        """dispel4py's process count: a weight on multi and mpi, else the number of instances once set."""
        return self._numprocesses

    @numprocesses.setter
    def numprocesses(self, value: int) -> None:
        self._numprocesses = value
        self._instances = value

    # -- the ports and instance count the engine sees ----------------------------
    @property
    def _input_ports(self) -> dict[str, InputPort]:
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

    @property
    def _output_ports(self) -> dict[str, OutputPort]:
        """The output ports, derived from ``outputconnections``."""
        return {name: OutputPort(name) for name in self.outputconnections}

    @property
    def _parallelism(self) -> int | None:
        """``numprocesses`` once assigned (or given other than 1), else ``None``: the mapping decides."""
        return self._instances

    @_parallelism.setter
    def _parallelism(self, count: int | None) -> None:
        self._instances = count

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
        return self._input_ports[name]

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
        """A copy for a run's instance, in the process that built the PE (simple, async; a worker process
        copies what it unpickled). An attribute that cannot be deep-copied (an open file, a lock, a
        connection made in ``__init__``, or a dict holding one) is shared with the copy, with a warning
        (once per class and attribute) that its instances share it: dispel4py's simple mapping runs the PE
        object itself, so such a PE ran there, and still does."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        # Attributes set one by one, never through clone.__dict__: on CPython 3.11 an object whose __dict__ was
        # asked for reads and writes every attribute about 40 ns slower from then on (self.total += x: 67 -> 108 ns).
        for name, value in self.__getstate__().items():
            known = set(memo)
            try:
                object.__setattr__(clone, name, copy.deepcopy(value, memo))
            except (TypeError, copy.Error) as exc:  # what copy and pickle raise for what they cannot copy
                for key in set(memo) - known:  # the copies begun before it failed
                    del memo[key]
                object.__setattr__(clone, name, value)
                if (type(self), name) not in _SHARED_ATTRIBUTES:
                    _SHARED_ATTRIBUTES.add((type(self), name))
                    logger.warning(
                        "PE %s: attribute %r cannot be copied (%s); the PE's instances share it",
                        getattr(self, "id", type(self).__name__),
                        name,
                        exc,
                    )
        return clone

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A worker process (multi, mpi) has no import hook yet: the PE travels
        # with the *names* of its class (or, for a class mixed at run time such
        # as dispel4py's ProcessTimingPE makes, of its bases), resolved by
        # _rebuild after installing the hook.
        spec = _class_spec(type(self))
        if spec is None:
            return super().__reduce_ex__(protocol)  # pickle's own error
        state = self.__getstate__()
        local = tuple(
            name
            for name, value in state.items()
            if isinstance(value, _LOCAL_RESOURCES) and not isinstance(value, io.StringIO | io.BytesIO)
        )
        if local and _made_without_arguments(type(self)):
            # What __init__ opened (a file, a socket, a lock) is opened again where the PE arrives, by its
            # __init__: as in dispel4py's mpi mapping, where every rank builds the graph by importing its module.
            return (_rebuild, (spec, local), {name: value for name, value in state.items() if name not in local})
        return (_rebuild, (spec,), state)

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

    # dispel4py 2.0's names for them
    def set_input_types(self, types: Mapping[str, Any]) -> None:
        """dispel4py 2.0's :meth:`setInputTypes`."""
        self.setInputTypes(types)

    def get_output_types(self) -> dict[str, Any]:
        """dispel4py 2.0's :meth:`getOutputTypes`.

        Raises:
            GraphError: an output declares no type.
        """
        return self.getOutputTypes()

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
    # write() and dispel4py's _write() take dispel4py's keywords and ignore them. Taking them
    # costs a call per write, so each class that passes none (nor calls a helper that does)
    # gets aiod4p's own PE.write instead, the very call native PEs make (__init_subclass__).
    # A class with a write() of its own gets a process() whose outputs go through it; if
    # it passes keywords, the write() its super() reaches takes them again.
    write = _write = _write_ignoring_keywords

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _aiod4ps_write(cls.write):
            taking = _write_ignoring_keywords if _writes_with_keywords(cls) else _CoreGenericPE.write
            cls.write = cls._write = taking  # type: ignore[assignment]
        elif _has_own_write(cls) and _writes_with_keywords(cls):
            _take_keywords_above(cls)
        process = cls.process
        if _has_own_write(cls) and plain_function(process) and not getattr(process, "_writes_outputs", False):
            cls.process = _outputs_written(process)  # type: ignore[method-assign,assignment]


def _has_own_write(cls: type) -> bool:
    """Whether ``cls`` has a ``write`` of the workflow's own (an override, as a PE that tags what it writes has),
    rather than aiod4p's."""
    return not getattr(cls.write, "__module__", "aiod4p.").startswith("aiod4p.")  # type: ignore[attr-defined]


def _outputs_written(process: Callable[[Any, Mapping[str, Any]], Any]) -> Callable[[Any, Mapping[str, Any]], Any]:
    """``process``, its returned ``{output: item}`` written through the PE's own ``write``, as dispel4py's simple
    mapping writes it (``pe.write(output, item)``), so that the override sees every item the PE emits; the
    engine would otherwise take them as they are. Anything but a dict or ``None`` is returned for the engine
    to refuse, naming the PE."""

    @functools.wraps(process)
    def process_writing_outputs(self: Any, inputs: Mapping[str, Any]) -> Any:
        outputs = process(self, inputs)
        if not isinstance(outputs, Mapping):
            return outputs
        for port, item in outputs.items():
            self.write(port, item)
        return None

    process_writing_outputs._writes_outputs = True  # type: ignore[attr-defined]
    return process_writing_outputs


def _aiod4ps_write(value: Any) -> bool:
    """Whether ``value`` is a ``write`` aiod4p gives a dispel4py PE class: its engine's own, or the one that takes
    dispel4py's keywords (compared by identity: a class attribute may be anything, an array too)."""
    return value is _CoreGenericPE.write or value is _write_ignoring_keywords


def _take_keywords_above(cls: type) -> None:
    """Have the ``write`` and ``_write`` that ``cls``'s own ``write`` reaches through ``super()`` (or by naming a base,
    ``IterativePE.write(self, ...)``) take dispel4py's keywords, as ``cls`` hands them on: the bases that
    :meth:`GenericPE.__init_subclass__` gave aiod4p's own ``write`` (their subclasses keep theirs)."""
    if cls._write is _CoreGenericPE.write:  # type: ignore[attr-defined]
        cls._write = _write_ignoring_keywords  # type: ignore[attr-defined]
    for base in cls.__mro__[1:]:
        if issubclass(base, GenericPE) and vars(base).get("write") is _CoreGenericPE.write:
            base.write = base._write = _write_ignoring_keywords


_LOOKED_AGAIN: weakref.WeakSet[type] = weakref.WeakSet()


def _look_again_for_keywords(cls: type) -> None:
    """Give ``cls`` the ``write`` that takes dispel4py's keywords if it got the engine's own when it was defined,
    but a helper its methods name, defined further on in its module, writes with them: looked at once, when
    the first PE of the class is made and, in another process, when the first one arrives (its module run by
    then)."""
    if cls.write is _CoreGenericPE.write and cls not in _LOOKED_AGAIN:  # type: ignore[attr-defined]
        _LOOKED_AGAIN.add(cls)
        if _writes_with_keywords(cls):
            cls.write = cls._write = _write_ignoring_keywords  # type: ignore[attr-defined]


def _writes_with_keywords(cls: type) -> bool:
    """Whether a method of ``cls``, or of a base of it that is not aiod4p's, calls ``write`` or ``_write`` with
    keywords, itself or in a function of the workflow's own that it names (taken to, when a method's source
    cannot be read): only such a class pays for a ``write`` that takes them, every other keeps the engine's own."""
    for klass in cls.__mro__:
        if klass.__module__ == "builtins" or klass.__module__.startswith("aiod4p."):
            continue
        for member in vars(klass).values():
            if any(_code_writes_with_keywords(code) for code in _codes(member)):
                return True
    return False


def _codes(member: Any) -> Iterator[CodeType]:
    """The code of a class member: a function's (a static or class method's, a property's accessors), and
    through decorators, those ``functools.wraps`` names and those the wrapper holds in its closure; and the code
    of the helpers each names (:func:`_named_helpers`)."""
    accessors = (member.fget, member.fset, member.fdel) if isinstance(member, property) else (member,)
    for accessor in accessors:
        function = getattr(accessor, "__func__", accessor)
        seen: set[int] = set()
        while callable(function) and id(function) not in seen:  # each wrapper in turn, down to the function
            seen.add(id(function))
            code = getattr(function, "__code__", None)
            if code is not None:
                yield code
                yield from _named_helpers(function, seen)
                for cell in getattr(function, "__closure__", None) or ():
                    inner = getattr(getattr(cell, "cell_contents", None), "__code__", None)
                    if isinstance(inner, CodeType) and inner is not code:
                        yield inner
            function = getattr(function, "__wrapped__", None)


#: Where the standard library and installed packages live: their functions write no PE's items.
_INSTALLED = tuple(
    os.path.join(os.path.realpath(path), "")
    for path in {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def _named_helpers(function: Any, seen: set[int], depth: int = 2) -> Iterator[CodeType]:
    """The code of the functions of the workflow's own (not aiod4p's, the standard library's or an installed
    package's) that ``function`` names as globals, and of those they name, ``depth`` levels down: a helper a
    method calls (``emit(self, item)``) may write for the PE, as dispel4py lets it, with keywords."""
    if depth == 0:
        return
    names = getattr(function, "__globals__", {})
    for name in _names(function.__code__):
        helper = names.get(name)
        if (
            isinstance(helper, FunctionType)
            and id(helper) not in seen
            and not (helper.__module__ or "").startswith("aiod4p.")
            and not os.path.realpath(helper.__code__.co_filename).startswith(_INSTALLED)
        ):
            seen.add(id(helper))
            yield helper.__code__
            yield from _named_helpers(helper, seen, depth - 1)


def _names(code: CodeType) -> set[str]:
    """The global and attribute names ``code`` and the code nested in it (lambdas, comprehensions) use."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            names |= _names(constant)
    return names


@functools.lru_cache(maxsize=4096)
def _code_writes_with_keywords(code: CodeType) -> bool:
    """Whether the source of function ``code`` calls ``write`` or ``_write`` with keywords (read once a function:
    the methods a module's classes inherit are read once, not once a class)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
    except (OSError, TypeError, SyntaxError):
        return True
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("write", "_write")
        and bool(node.keywords)
        for node in ast.walk(tree)
    )


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
    own = {  # less what __init_subclass__ sets again there
        name
        for name, value in vars(cls).items()
        if not _aiod4ps_write(value) and not getattr(value, "_writes_outputs", False)
    }
    if own - _EMPTY_CLASS:
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


def _rebuild(spec: ClassSpec, local: tuple[str, ...] = ()) -> GenericPE:
    """A dispel4py PE of the class ``spec`` names (pickle then restores its state), empty but for its attributes
    ``local``, which a new PE of the class made here (its ``__init__`` run, with no arguments) opens.

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
    _look_again_for_keywords(cls)
    pe = cls.__new__(cls)
    if local:
        made = cls()
        for attribute in local:
            object.__setattr__(pe, attribute, getattr(made, attribute))
    return pe


#: What a PE's ``__init__`` may open that cannot travel to another process: files (not in memory), sockets, locks.
_LOCAL_RESOURCES = (io.IOBase, socket.socket, type(threading.Lock()), type(threading.RLock()))


def _made_without_arguments(cls: type) -> bool:
    """Whether ``cls`` takes no argument (its ``__init__`` none but ``self``): calling it again elsewhere makes
    the same PE, where defaults might differ from the arguments it was made with."""
    try:
        return not inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
