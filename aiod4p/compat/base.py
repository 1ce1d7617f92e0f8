"""``dispel4py.base`` on aiod4p: the PE patterns, chains and composites."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .core import NAME, GenericPE, plain_function
from .workflow_graph import WorkflowGraph

__all__ = [
    "NAME",  # dispel4py's base holds these two it imports, so `from dispel4py.base import *` gives them
    "BasePE",
    "CompositePE",
    "ConsumerPE",
    "GenericPE",
    "IterativePE",
    "ProducerPE",
    "SimpleFunctionPE",
    "WorkflowGraph",
    "create_iterative_chain",
]


class BasePE(GenericPE):
    """A PE with the given input and output names, plus ``input0..`` / ``output0..``."""

    INPUT_NAME = "input"
    OUTPUT_NAME = "output"

    def __init__(
        self,
        inputs: Iterable[str] | None = (),
        outputs: Iterable[str] | None = (),
        num_inputs: int = 0,
        num_outputs: int = 0,
    ) -> None:
        super().__init__()
        # dispel4py 2.0's defaults are None
        names_in = [f"{BasePE.INPUT_NAME}{i}" for i in range(num_inputs)] + list(inputs or ())
        names_out = [f"{BasePE.OUTPUT_NAME}{i}" for i in range(num_outputs)] + list(outputs or ())
        for name in names_in:
            self.inputconnections[name] = {NAME: name}
        for name in names_out:
            self.outputconnections[name] = {NAME: name}


class IterativePE(GenericPE):
    """One input ``input``, one output ``output``: override :meth:`_process` (item -> item or None)."""

    INPUT_NAME = "input"
    OUTPUT_NAME = "output"

    def __init__(self) -> None:
        super().__init__()
        self._add_input(IterativePE.INPUT_NAME)
        self._add_output(IterativePE.OUTPUT_NAME)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        result = self._process(inputs[IterativePE.INPUT_NAME])
        if result is not None:
            return {self.OUTPUT_NAME: result}
        return None

    def _item_function(self) -> tuple[Callable[..., Any], str | None] | None:
        # The engine may call _process per item directly: same result, no dict per item.
        if type(self).process is not IterativePE.process or not plain_function(self._process):
            return None
        if set(self.inputconnections) != {IterativePE.INPUT_NAME} or self.OUTPUT_NAME not in self.outputconnections:
            return None
        return self._process, self.OUTPUT_NAME


class ProducerPE(GenericPE):
    """A source with one output ``output``: :meth:`_process` receives the inputs dict (``{}``)."""

    OUTPUT_NAME = "output"

    def __init__(self) -> None:
        super().__init__()
        self._add_output(ProducerPE.OUTPUT_NAME)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        result = self._process(inputs)
        if result is not None:
            return {self.OUTPUT_NAME: result}
        return None

    def _item_function(self) -> tuple[Callable[..., Any], str | None] | None:
        # Called with no input (``-i N``), _process gets an empty inputs dict; the
        # engine hands input dicts that are not empty to process() instead.
        if type(self).process is not ProducerPE.process or not plain_function(self._process):
            return None
        if self.inputconnections or self.OUTPUT_NAME not in self.outputconnections:
            return None
        return functools.partial(self._process, {}), self.OUTPUT_NAME


class ConsumerPE(GenericPE):
    """A sink with one input ``input``: override :meth:`_process` (item -> ignored)."""

    INPUT_NAME = "input"

    def __init__(self) -> None:
        super().__init__()
        self._add_input(ConsumerPE.INPUT_NAME)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        self._process(inputs[ConsumerPE.INPUT_NAME])
        return None

    def _item_function(self) -> tuple[Callable[..., Any], str | None] | None:
        if type(self).process is not ConsumerPE.process or not plain_function(self._process):
            return None
        if set(self.inputconnections) != {ConsumerPE.INPUT_NAME}:
            return None
        return self._process, None  # no output port: the return value is ignored, as in dispel4py


class SimpleFunctionPE(IterativePE):
    """An iterative PE calling ``compute_fn(data, **params)``; named ``PE_<function name>``."""

    INPUT_NAME = IterativePE.INPUT_NAME
    OUTPUT_NAME = IterativePE.OUTPUT_NAME

    def __init__(self, compute_fn: Callable[..., Any] | None = None, params: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if compute_fn is not None:
            self.name = f"PE_{compute_fn.__name__}"
        self.compute_fn = compute_fn
        self.params: Mapping[str, Any] = params if params is not None else {}

    def _process(self, data: Any) -> Any:
        if self.compute_fn is None:
            raise TypeError(f"SimpleFunctionPE {self.label} has no compute_fn")
        return self.compute_fn(data, **self.params)


def create_iterative_chain(
    functions: Iterable[Any],
    FunctionPE_class: type[SimpleFunctionPE] = SimpleFunctionPE,
    name_prefix: str = "PE_",
    name_suffix: str = "",
    *,
    function_pe_class: type[SimpleFunctionPE] | None = None,
) -> WorkflowGraph:
    """A composite graph piping items through ``functions`` in order.

    Each element is ``fn`` or ``(fn, params)``; each becomes a
    ``FunctionPE_class`` (dispel4py 2.0's keyword: ``function_pe_class``)
    named ``name_prefix + fn.__name__ + name_suffix``. The graph exposes
    ``input`` and ``output``.

    Raises:
        ValueError: ``functions`` is empty.
        TypeError: both ``FunctionPE_class`` and ``function_pe_class`` are given.
    """
    if function_pe_class is not None:
        if FunctionPE_class is not SimpleFunctionPE:
            raise TypeError("create_iterative_chain() takes FunctionPE_class or function_pe_class, not both")
        FunctionPE_class = function_pe_class
    graph = WorkflowGraph()
    first: SimpleFunctionPE | None = None
    previous: SimpleFunctionPE | None = None
    for description in functions:
        if isinstance(description, (tuple, list)):
            fn, params = description[0], description[1]
        else:
            fn, params = description, {}
        pe = FunctionPE_class()
        pe.compute_fn = fn
        pe.params = params
        pe.name = name_prefix + fn.__name__ + name_suffix
        if previous is None:
            first = pe
        else:
            graph.connect(previous, IterativePE.OUTPUT_NAME, pe, IterativePE.INPUT_NAME)
        previous = pe
    if first is None or previous is None:
        raise ValueError("create_iterative_chain() needs at least one function")
    graph.inputmappings = {"input": (first, IterativePE.INPUT_NAME)}  # type: ignore[attr-defined]
    graph.outputmappings = {"output": (previous, IterativePE.OUTPUT_NAME)}  # type: ignore[attr-defined]
    return graph


class CompositePE(WorkflowGraph):
    """A graph used as one PE: build it in ``create_graph(self, **params)`` and map its ports.

    :meth:`_map_input` / :meth:`_map_output` expose an inner PE's port as the
    composite's. Mapping an input to a list of ``(pe, port)`` pairs (an aiod4p
    extension) feeds all of them.
    """

    def __init__(self, create_graph: Callable[..., Any] | None = None, params: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.inputmappings: dict[str, Any] = {}
        self.outputmappings: dict[str, Any] = {}
        if create_graph is not None:
            create_graph(self, **(params or {}))

    def _map_input(self, input_name: str, internal_pe: Any, internal_input: str) -> None:
        """Expose ``internal_pe.internal_input`` as this composite's input ``input_name``."""
        self.inputmappings[input_name] = (internal_pe, internal_input)

    def _map_output(self, output_name: str, internal_pe: Any, internal_output: str) -> None:
        """Expose ``internal_pe.internal_output`` as this composite's output ``output_name``."""
        self.outputmappings[output_name] = (internal_pe, internal_output)
