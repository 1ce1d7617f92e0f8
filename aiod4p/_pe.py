"""Processing elements: the nodes of a workflow graph."""

from __future__ import annotations

import functools
import itertools
import logging
import re
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, overload

from ._groupings import SHUFFLE, Grouping, GroupingLike, as_grouping
from .errors import GraphError

if TYPE_CHECKING:
    from ._graph import WorkflowGraph

__all__ = [
    "CompositePE",
    "ConsumerPE",
    "FunctionPE",
    "GenericPE",
    "InputPort",
    "IterativePE",
    "OutputPort",
    "PE",
    "ProducerPE",
    "Runtime",
    "chain",
    "consumer",
    "iterative",
    "producer",
]

INPUT = "input"
OUTPUT = "output"

logger = logging.getLogger("aiod4p.pe")


@dataclass
class InputPort:
    """A named input of a PE.

    ``grouping`` decides which instance of the PE receives each item (unless a
    connection overrides it); ``required`` inputs must be connected whenever
    any input of the PE is connected.
    """

    name: str
    grouping: Grouping = SHUFFLE
    required: bool = True


@dataclass
class OutputPort:
    """A named output of a PE."""

    name: str


@dataclass
class Runtime:
    """What the engine attaches to a running PE instance."""

    buffers: dict[str, list[Any]]
    instance: int = 0
    log: logging.LoggerAdapter[logging.Logger] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # write() calls ``full(port)`` once a port's buffer holds ``limit`` items (the engine routes them).
    limit: int = sys.maxsize
    full: Callable[[str], None] | None = None
    recorder: Any = None  # an ActorRecorder when provenance is on
    stats: Any = None  # the instance's InstanceStats, where the PE reports its own counters
    rank: int = 0  # unique among the run's instances (ExecutionPlan.rank_of)


_UNWRITABLE_IN_NAMES = re.compile(r'[\s"%<>\\^`{|}\x00-\x1f\x7f]+')
"""What the local part of a PROV qualified name cannot hold (PROV-N cannot write it: ``prov`` warns, and will
refuse it): the names of :meth:`PE.annotate`'s attributes."""


class PE:
    """Base class of every processing element.

    A PE declares named input and output ports. The engine calls
    :meth:`preprocess` once before any data, :meth:`process` once per input
    item (``inputs`` maps the port the item arrived on to the item), and
    :meth:`postprocess` once after the end of every input stream. Each of them
    may be a plain or an ``async def`` method, and may emit items by returning
    ``{port: item}`` or by calling :meth:`write` any number of times.

    Attributes:
        name: a readable name (the class name unless given).
        id: the unique id in its graph, assigned when the PE is first added to
            one (``name`` followed by a counter, as dispel4py numbers PEs),
            unless set explicitly.
        parallelism: the number of instances to run, or ``None`` to let the
            mapping decide.
        threaded: run this PE's plain (not ``async``, not generator) calls in
            a thread of the run's pool, off the event loop: for PEs that
            block (``time.sleep``, blocking I/O, long computations that release
            the GIL), so that the rest of the workflow, signals and the
            progress display stay responsive. Also ``aiod4p run --threaded
            PE``. (Memory does not need it: :meth:`write` waits for credit in
            every call, threaded or not.)

    The engine never runs the PE objects of a graph: every run works on fresh
    deep copies of them, taken when it starts, one per instance (instance 0
    of every PE copied together, so references between PEs lead to the
    run's copies). A run therefore never changes the graph, and a graph can
    run any number of times, in a row or concurrently, each run starting
    from the PEs as built. See :meth:`aiod4p.WorkflowRun.instances` for the
    copies of a run. An object that must be shared by every copy (say, an
    ``asyncio.Event`` that the caller waits on) defines ``__deepcopy__``
    returning itself.
    """

    #: Whether an input element of this PE (as a root) may be any dict, passed
    #: to :meth:`process` as is. dispel4py's PEs take them (``-d '{"read":
    #: [{"input": "f.txt"}]}'`` feeds a PE with no input ports); aiod4p's own
    #: PEs take only dicts of their declared input ports, so a misspelt port
    #: is an error rather than an item silently ignored.
    takes_undeclared_inputs: ClassVar[bool] = False
    #: The method a subclass of this class overrides to handle items (unless
    #: it overrides :meth:`process` itself); a run of a PE that does neither,
    #: and has no ``preprocess`` or ``postprocess`` either, is refused
    #: (:meth:`_unimplemented`).
    _handler: ClassVar[str] = "process"
    #: A root gets one instance whatever its parallelism says: dispel4py's PEs, whose ``numprocesses`` is a
    #: weight that dispel4py never gives a root (one process each, on every mapping).
    _root_runs_once: ClassVar[bool] = False
    threaded: bool = False

    def __init__(
        self,
        *,
        name: str | None = None,
        id: str | None = None,
        parallelism: int | None = None,
    ) -> None:
        self.name: str = name or type(self).__name__
        self.id: str | None = id
        self.parallelism: int | None = parallelism
        self.inputs: dict[str, InputPort] = {}
        self.outputs: dict[str, OutputPort] = {}
        self._runtime: Runtime | None = None

    # -- declaration -------------------------------------------------------
    def add_input(self, name: str, grouping: GroupingLike = None, *, required: bool = True) -> InputPort:
        """Declare an input port; ``grouping`` defaults to shuffle.

        Raises:
            GraphError: the port already exists.
            ValueError: the grouping is not understood.
        """
        if name in self.inputs:
            raise GraphError(f"PE {self.label}: input port {name!r} declared twice")
        port = InputPort(name, as_grouping(grouping), required)
        self.inputs[name] = port
        return port

    def add_output(self, name: str) -> OutputPort:
        """Declare an output port.

        Raises:
            GraphError: the port already exists.
        """
        if name in self.outputs:
            raise GraphError(f"PE {self.label}: output port {name!r} declared twice")
        port = OutputPort(name)
        self.outputs[name] = port
        return port

    @property
    def label(self) -> str:
        """The id if assigned, else the name: how errors refer to this PE."""
        return self.id or self.name

    # -- lifecycle ------------------------------------------------------------
    def preprocess(self) -> Any:
        """Called once per instance before any data."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        """Called once per input item; returns ``None`` or ``{port: item}``."""
        raise NotImplementedError(f"PE {self.label} does not implement process()")

    def postprocess(self) -> Any:
        """Called once per instance after the end of every input stream."""

    # -- output ---------------------------------------------------------------
    def write(self, port: str, item: Any) -> None:
        """Emit ``item`` on output ``port``.

        Once the call has written ``credits x batch_size`` items on
        ``port``, waits while the workflow has no room for them
        (back-pressure), so a call that writes any number of items runs in
        bounded memory.

        Raises:
            GraphError: ``port`` is not a declared output, or the PE is not running.
        """
        runtime = self._runtime
        if runtime is None:
            raise GraphError(f"PE {self.label}: write({port!r}, ...) called outside a run")
        try:
            buffer = runtime.buffers[port]
        except KeyError:
            declared = sorted(self._output_ports) or "none"
            raise GraphError(
                f"PE {self.label} wrote to undeclared output port {port!r} (declared: {declared})"
            ) from None
        buffer.append(item)
        if len(buffer) >= runtime.limit and runtime.full is not None:
            runtime.full(port)

    # -- provenance (no-ops when it is off) --------------------------------------
    @property
    def _recorder(self) -> Any:
        """This instance's provenance recorder, ``None`` when it records none (so what is computed only to remember
        or recall need not be)."""
        return self._runtime.recorder if self._runtime is not None else None

    def annotate(self, **attributes: Any) -> None:
        """Attach ``attributes`` (parameters, file names, versions) to this instance's provenance agent.

        Raises:
            ValueError: a name is empty or holds what a PROV qualified name cannot (a space, a backtick, one of
                ``"%<>\\^{|}``: ``**{"file name": ...}``), which ``prov`` warns of and will refuse.
        """
        for name in attributes:
            if not name or _UNWRITABLE_IN_NAMES.search(name):
                raise ValueError(
                    f"annotate(): {name!r} is not a name provenance can keep (no space, no backtick, none of"
                    f' "%<>\\^{{|}}): call it, say, {_UNWRITABLE_IN_NAMES.sub("_", name).strip("_") or "value"!r}'
                )
        if (recorder := self._recorder) is not None:
            recorder.annotate(attributes)

    def remember(self, key: Hashable) -> None:
        """Record that the item being processed contributes to this PE's state ``key``.

        With :meth:`recall`, it makes the lineage of a stateful PE's outputs
        exact (item-level provenance); without, what ``postprocess`` writes
        derives from every item this instance used.
        """
        if (recorder := self._recorder) is not None:
            recorder.remember(key)

    def recall(self, *keys: Hashable) -> None:
        """What is written next, until the call ends or ``recall`` is called again, derives from the states
        ``keys`` (together: a pair written from two remembered items derives from both)."""
        if (recorder := self._recorder) is not None:
            recorder.recall(keys)

    @property
    def instance(self) -> int:
        """The index of this running instance (0 outside a run)."""
        return self._runtime.instance if self._runtime else 0

    def log(self, message: str, level: int = logging.INFO) -> None:
        """Log ``message`` with this PE's id and instance attached."""
        if self._runtime is not None and self._runtime.log is not None:
            self._runtime.log.log(level, message)
        else:
            logger.log(level, message, extra={"pe": self.label, "instance": self.instance})

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_runtime"] = None
        return state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"

    # -- engine hooks -------------------------------------------------------
    # The graph, the planner and the engine read a PE's ports and instance count
    # through these, never through ``inputs``/``outputs``/``parallelism``
    # directly: dispel4py's PEs keep their ports in ``inputconnections`` and
    # their count in ``numprocesses``, and may use those three names for data
    # of their own (:class:`aiod4p.compat.core.GenericPE`).
    @property
    def _input_ports(self) -> dict[str, InputPort]:
        """The input ports the graph and the engine use: :attr:`inputs`."""
        return self.inputs

    @property
    def _output_ports(self) -> dict[str, OutputPort]:
        """The output ports the graph and the engine use: :attr:`outputs`."""
        return self.outputs

    @property
    def _parallelism(self) -> int | None:
        """The number of instances the planner honours (``None``: the mapping decides): :attr:`parallelism`."""
        return self.parallelism

    @_parallelism.setter
    def _parallelism(self, count: int | None) -> None:
        self.parallelism = count

    def _item_function(self) -> tuple[Callable[..., Any], str | None] | None:
        """A per-item function the engine may call instead of :meth:`process`.

        Returns ``(fn, output_port)``: for a PE with one input, ``fn(item)``
        handles one item; for a PE with no input, ``fn()`` is called once per
        feed element. A non-``None`` result (every yielded value, for a
        generator function) is written to ``output_port`` (unless ``None``).
        ``None`` means the engine must call :meth:`process`.
        """
        return None

    def _unimplemented(self) -> str | None:
        """What this PE lacks to do any work (see :attr:`_handler`), said for an error, or ``None``."""
        base = next(cls for cls in type(self).__mro__ if "_handler" in vars(cls))
        if _overrides(self, base, "process") or _overrides(self, base, self._handler):
            return None
        if _overrides(self, PE, "preprocess") or _overrides(self, PE, "postprocess"):
            return None  # its work may all be there (a root run with no input, writing in postprocess)
        problem = f"{type(self).__name__} does not implement {self._handler}()"
        if hasattr(self, "_process"):
            ours = next(cls for cls in type(self).__mro__ if cls.__module__ == __name__).__name__
            theirs = "GenericPE" if ours == "PE" else ours  # dispel4py's of the same name; it has no PE
            problem += (
                f": _process() is dispel4py's name for it; name it {self._handler}() for aiod4p's {ours}, "
                f"or import {theirs} from dispel4py.base, which aiod4p provides (docs/dispel4py.md)"
            )
        return problem


class GenericPE(PE):
    """A PE with any named inputs and outputs; override :meth:`process`.

    Args:
        inputs: input port names, or ``(name, grouping)`` pairs.
        outputs: output port names.
    """

    def __init__(
        self,
        inputs: Iterable[str | tuple[str, GroupingLike]] = (),
        outputs: Iterable[str] = (),
        *,
        name: str | None = None,
        parallelism: int | None = None,
    ) -> None:
        super().__init__(name=name, parallelism=parallelism)
        for spec in inputs:
            if isinstance(spec, str):
                self.add_input(spec)
            else:
                self.add_input(spec[0], spec[1])
        for out in outputs:
            self.add_output(out)


def _overrides(pe: PE, base: type[PE], method: str) -> bool:
    """Whether ``pe`` has a ``method`` of its own: set on the instance, or its class's rather than ``base``'s."""
    return method in vars(pe) or getattr(type(pe), method) is not getattr(base, method)


def _emit(port: str | None, result: Any) -> Any:
    if result is None or port is None:
        return None
    return {port: result}


class IterativePE(PE):
    """One input ``input``, one output ``output``: override :meth:`process_item`.

    The return value of :meth:`process_item`, unless ``None``, is written to
    ``output``; a generator's every yielded value is.
    """

    _handler = "process_item"

    def __init__(self, *, grouping: GroupingLike = None, name: str | None = None, parallelism: int | None = None):
        super().__init__(name=name, parallelism=parallelism)
        self.add_input(INPUT, grouping)
        self.add_output(OUTPUT)

    def process_item(self, item: Any) -> Any:
        """Transform one item; return ``None`` to emit nothing."""
        raise NotImplementedError(f"PE {self.label} does not implement process_item()")

    def process(self, inputs: Mapping[str, Any]) -> Any:
        if INPUT not in inputs:
            return None
        return _emit(OUTPUT, self.process_item(inputs[INPUT]))

    def _item_function(self) -> tuple[Callable[..., Any], str | None] | None:
        if _overrides(self, IterativePE, "process"):
            return None
        return self.process_item, OUTPUT


class ProducerPE(PE):
    """A source with one output ``output``: override :meth:`produce`.

    :meth:`produce` is called once per element of the PE's input feed (``-i N``
    calls it N times); its return value, unless ``None``, is written to
    ``output``, and a generator's every yielded value is.
    """

    _handler = "produce"

    def __init__(self, *, name: str | None = None, parallelism: int | None = None):
        super().__init__(name=name, parallelism=parallelism)
        self.add_output(OUTPUT)

    def produce(self) -> Any:
        """Produce the next item (or a generator of items)."""
        raise NotImplementedError(f"PE {self.label} does not implement produce()")

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return _emit(OUTPUT, self.produce())

    def _item_function(self) -> tuple[Callable[..., Any], str | None] | None:
        if _overrides(self, ProducerPE, "process"):
            return None
        return self.produce, OUTPUT


class ConsumerPE(PE):
    """A sink with one input ``input`` and no outputs: override :meth:`consume`."""

    _handler = "consume"

    def __init__(self, *, grouping: GroupingLike = None, name: str | None = None, parallelism: int | None = None):
        super().__init__(name=name, parallelism=parallelism)
        self.add_input(INPUT, grouping)

    def consume(self, item: Any) -> Any:
        """Handle one item."""
        raise NotImplementedError(f"PE {self.label} does not implement consume()")

    def process(self, inputs: Mapping[str, Any]) -> Any:
        if INPUT in inputs:
            self.consume(inputs[INPUT])
        return None

    def _item_function(self) -> tuple[Callable[..., Any], str | None] | None:
        if _overrides(self, ConsumerPE, "process"):
            return None
        return self.consume, None


class FunctionPE(PE):
    """A PE made from a plain function (or ``async def``, or generator function).

    ``kind`` is ``"iterative"`` (``fn(item)``, one input and one output),
    ``"producer"`` (``fn()``, no input) or ``"consumer"`` (``fn(item)``, no
    output). Extra keyword arguments are passed to ``fn`` on every call;
    ``threaded=True`` runs the calls in a thread (see :attr:`PE.threaded`).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        kind: str = "iterative",
        name: str | None = None,
        parallelism: int | None = None,
        grouping: GroupingLike = None,
        threaded: bool = False,
        **params: Any,
    ) -> None:
        if kind not in ("iterative", "producer", "consumer"):
            raise ValueError(f"FunctionPE kind must be iterative, producer or consumer, not {kind!r}")
        super().__init__(name=name or getattr(fn, "__name__", "FunctionPE"), parallelism=parallelism)
        if kind != "producer":
            self.add_input(INPUT, grouping)
        if kind != "consumer":
            self.add_output(OUTPUT)
        self.kind = kind
        self.threaded = threaded
        self.fn = functools.partial(fn, **params) if params else fn

    def process_item(self, item: Any) -> Any:
        return self.fn() if self.kind == "producer" else self.fn(item)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        if self.kind == "producer":
            return _emit(OUTPUT, self.fn())
        if INPUT not in inputs:
            return None
        return _emit(OUTPUT if self.kind == "iterative" else None, self.fn(inputs[INPUT]))

    def _item_function(self) -> tuple[Callable[..., Any], str | None] | None:
        if _overrides(self, FunctionPE, "process"):
            return None
        return self.fn, OUTPUT if self.kind != "consumer" else None


class _FunctionDecorator:
    """``@iterative`` or ``@iterative(threaded=True, ...)``: turns a function into a factory of PEs.

    The factory's keyword arguments (``name``, ``parallelism``, ``threaded``,
    and parameters passed on to the function) override those given to the
    decorator.
    """

    def __init__(self, kind: str, doc: str) -> None:
        self.kind = kind
        self.__doc__ = doc

    @overload
    def __call__(self, fn: Callable[..., Any], /) -> Callable[..., FunctionPE]: ...

    @overload
    def __call__(
        self, /, *, name: str | None = None, parallelism: int | None = None, threaded: bool = False, **params: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., FunctionPE]]: ...

    def __call__(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        parallelism: int | None = None,
        threaded: bool = False,
        **params: Any,
    ) -> Any:
        defaults = {"name": name, "parallelism": parallelism, "threaded": threaded, **params}
        if fn is None:
            return functools.partial(self._decorate, defaults=defaults)
        return self._decorate(fn, defaults=defaults)

    def _decorate(self, fn: Callable[..., Any], *, defaults: Mapping[str, Any]) -> Callable[..., FunctionPE]:
        kind = self.kind

        @functools.wraps(fn)
        def make(**options: Any) -> FunctionPE:
            return FunctionPE(fn, kind=kind, **{**defaults, **options})

        # The factory takes fn's name; pickle then finds fn as factory.__wrapped__ (other processes).
        fn.__qualname__ = f"{make.__qualname__}.__wrapped__"
        return make


iterative = _FunctionDecorator(
    "iterative", "Decorator: turn ``fn(item) -> item | None`` into a factory of iterative PEs."
)
producer = _FunctionDecorator(
    "producer", "Decorator: turn ``fn() -> item`` (or a generator function) into a factory of source PEs."
)
consumer = _FunctionDecorator("consumer", "Decorator: turn ``fn(item)`` into a factory of sink PEs.")


class CompositePE(PE):
    """A subgraph exposed as one PE.

    Connections to and from the composite are rewired to the inner PEs its
    ports map to; a composite input may map to several inner inputs.
    """

    def __init__(self, graph: WorkflowGraph | None = None, *, name: str | None = None) -> None:
        from ._graph import WorkflowGraph

        super().__init__(name=name)
        self.graph: WorkflowGraph = graph if graph is not None else WorkflowGraph()
        self.input_map: dict[str, list[tuple[PE, str]]] = {}
        self.output_map: dict[str, tuple[PE, str]] = {}

    def map_input(self, name: str, pe: PE, port: str) -> None:
        """Expose inner ``pe.port`` as this composite's input ``name`` (repeatable)."""
        self.graph.add(pe)
        if name not in self.inputs:
            self.inputs[name] = InputPort(name, SHUFFLE, required=True)
        self.input_map.setdefault(name, []).append((pe, port))

    def map_output(self, name: str, pe: PE, port: str) -> None:
        """Expose inner ``pe.port`` as this composite's output ``name``."""
        self.graph.add(pe)
        if name in self.outputs:
            raise GraphError(f"composite {self.label}: output {name!r} mapped twice")
        self.outputs[name] = OutputPort(name)
        self.output_map[name] = (pe, port)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        raise GraphError(f"composite {self.label} is flattened into its graph and never runs itself")


def chain(*steps: Callable[..., Any] | PE, name: str | None = None) -> CompositePE:
    """A composite that pipes items through ``steps`` in order.

    Each step is a PE with ``input``/``output`` ports or a function turned into
    an iterative :class:`FunctionPE`.

    Raises:
        ValueError: no steps were given.
    """
    if not steps:
        raise ValueError("chain() needs at least one step")
    pes = [step if isinstance(step, PE) else FunctionPE(step) for step in steps]
    composite = CompositePE(name=name or "chain")
    for upstream, downstream in itertools.pairwise(pes):
        composite.graph.connect(upstream, OUTPUT, downstream, INPUT)
    composite.map_input(INPUT, pes[0], INPUT)
    composite.map_output(OUTPUT, pes[-1], OUTPUT)
    return composite
