"""dispel4py 2.0's ``dispel4py.provenance`` on aiod4p's provenance recorder.

aiod4p records provenance in its engine, for every PE, at the level chosen
for the run (``aiod4p run --provenance FILE``, ``WorkflowRun(provenance=...)``;
see docs/provenance.md). This module maps dispel4py's provenance API onto it:

- :class:`ProvenanceType` (and :class:`ProvenanceIterativePE`,
  :class:`ProvenanceSimpleFunctionPE`): a PE mixin whose ``write(name, data,
  metadata=...)`` and ``extractItemMetadata`` feed aiod4p's ``annotate``, whose
  ``addToProvState(key)`` is ``remember(key)`` and ``write(..., dep=[key])``
  ``recall(key)``.
- :func:`configure_prov_run`: turns provenance on for a graph. The dispel4py
  entry points (``simple_process.process(graph, ...)``, :func:`process_and_return
  <aiod4p.compat.mappings.process_and_return>`) then run it with provenance
  and write the W3C PROV file. dispel4py's remote stores (a provenance
  service, sensors, recorder PEs) have no aiod4p equivalent: they are ignored
  with a warning naming them, and the file is written instead.
- :func:`injectProv`: kept for workflows that call it; aiod4p records every PE
  anyway.
"""

from __future__ import annotations

import uuid
import warnings
import weakref
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._pe import GenericPE as _CoreGenericPE
from ..errors import Aiod4pError
from .base import IterativePE, SimpleFunctionPE
from .core import GenericPE
from .workflow_graph import WorkflowGraph

__all__ = [
    # dispel4py's workflows often take their PE bases from `from dispel4py.provenance import *`
    "GenericPE",
    "IterativePE",
    "SimpleFunctionPE",
    "WorkflowGraph",
    "ProvenanceIterativePE",
    "ProvenanceSimpleFunctionPE",
    "ProvenanceType",
    # dispel4py 2.0's provenance pattern types (``s-prov:type``)
    "ASTGrouped",
    "AccumulateFlow",
    "AccumulateStateTrace",
    "ForceStateless",
    "IntermediateStatefulOut",
    "Nby1Flow",
    "SingleInvocationFlow",
    "SlideFlow",
    "ProvenanceConfig",
    "configure_prov_run",
    "injectProv",
    "provenance_config",
]

#: Keywords of dispel4py's ``ProvenanceType.write`` that steer its own
#: recorders (data transfer, lineage ignores): aiod4p accepts and ignores them.
_IGNORED_WRITE_KEYWORDS = frozenset({"location", "format", "ignore_inputs", "ignore_dep", "stateful", "update_state"})

#: dispel4py's ``save_mode`` values; only "file" has an aiod4p equivalent.
_SAVE_MODES = frozenset({"file", "service", "sensor"})


def _warn(what: str) -> None:
    warnings.warn(f"dispel4py.provenance on aiod4p: {what}", UserWarning, stacklevel=3)


class ProvenanceType(GenericPE):
    """dispel4py's provenance-aware PE type, as a mixin (``class MyPE(ProvenanceType, IterativePE)``).

    Whatever a ``ProvenanceType`` PE writes is recorded by aiod4p's engine like
    any PE's output; this class adds dispel4py's ways of describing it:

    - ``write(name, data, metadata={...})``: the metadata (or, when none is
      given, what :meth:`extractItemMetadata` returns) becomes attributes of
      this instance's provenance agent (``annotate``): aiod4p records
      attributes per instance, so for a key written several times the last
      value wins.
    - ``write(..., dep=[key])``: what is written derives from state ``key``
      (``recall``); :meth:`addToProvState` adds the current input to it
      (``remember``).
    - ``self.log(msg)``, ``addNamespacePrefix`` work; dispel4py's other
      ``write`` keywords (``location``, ``format``, ``ignore_inputs``, ...)
      are accepted and ignored with one warning per PE and keyword.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not hasattr(self, "inputconnections"):  # not yet initialised by a PE base class
            super().__init__(*args, **kwargs)
        self._init_provenance()

    def _init_provenance(self) -> None:
        """Set up what :meth:`write` keeps, once (also for a PE :func:`injectProv` made a ``ProvenanceType``)."""
        self.namespaces: dict[str, str] = getattr(self, "namespaces", {})
        self.provon = True
        self._ignored_warned: set[str] = getattr(self, "_ignored_warned", set())

    def pe_init(self, *args: Any, **kwargs: Any) -> None:
        """dispel4py's late initialisation hook: nothing to set up on aiod4p."""

    def addNamespacePrefix(self, prefix: str, url: str) -> None:
        """Declare a metadata namespace: recorded as an agent attribute ``ns:<prefix>`` with the metadata written."""
        self.namespaces[prefix] = url

    def extractItemMetadata(self, data: Any, port: str) -> Any:
        """Metadata of ``data`` written to ``port``, when ``write`` is given none: override it (default none)."""
        return None

    def addToProvState(self, key: Hashable, value: Any = None, **kwargs: Any) -> None:
        """The input being processed contributes to state ``key`` (aiod4p's ``remember``); ``value`` is kept."""
        self.remember(key)

    def process(self, inputs: Mapping[str, Any]) -> None:
        """The PE base's ``process`` (an ``IterativePE``'s calls ``_process``), its outputs written by :meth:`write`.

        So what ``_process`` returns carries its metadata as what it writes does.
        """
        outputs = super().process(inputs)
        for port, item in (outputs or {}).items():
            self.write(port, item)

    def write(self, port: str, item: Any, **kwargs: Any) -> None:
        """Write ``data`` to output ``name``, recording dispel4py's provenance keywords as described above."""
        metadata = kwargs.pop("metadata", None)
        if metadata is None:
            metadata = self.extractItemMetadata(item, port)
        if metadata:
            self.annotate(**{f"ns:{prefix}": url for prefix, url in self.namespaces.items()}, **_flat(metadata))
        dep = kwargs.pop("dep", None)
        if dep:
            for key in [dep] if isinstance(dep, str) else dep:
                self.recall(key)
        for keyword in kwargs:
            if keyword not in self._ignored_warned:
                self._ignored_warned.add(keyword)
                known = "" if keyword in _IGNORED_WRITE_KEYWORDS else " (not a keyword dispel4py knows either)"
                _warn(f"{type(self).__name__}.write ignores the keyword {keyword!r}{known}")
        _CoreGenericPE.write(self, port, item)  # the engine's own: this write takes the keywords

    def _write(self, port: str, item: Any, **kwargs: Any) -> None:
        """dispel4py's ``_write``: :meth:`write`."""
        self.write(port, item, **kwargs)


def _flat(metadata: Any) -> dict[str, Any]:
    """dispel4py metadata (a dict, or a list of dicts such as one per seismic trace) as attributes."""
    if isinstance(metadata, Mapping):
        return {str(k): v for k, v in metadata.items()}
    if isinstance(metadata, Iterable) and not isinstance(metadata, (str, bytes)):
        flat: dict[str, Any] = {}
        for index, part in enumerate(metadata):
            flat.update({f"{index}:{k}": v for k, v in _flat(part).items()})
        return flat
    return {"metadata": metadata}


class AccumulateFlow(ProvenanceType):
    """dispel4py's pattern type for output derived from a sequence of inputs: a ``ProvenanceType`` here.

    dispel4py's pattern types choose which inputs and state each output derives
    from (``apply_derivation_rule``); aiod4p's recorder derives every output
    from the inputs and state its call used, whatever the type, so each of them
    is a plain :class:`ProvenanceType` that a workflow can name and mix in.
    """


class Nby1Flow(ProvenanceType):
    """dispel4py's pattern type for output derived from every input port in lock-step (see :class:`AccumulateFlow`)."""


class SlideFlow(ProvenanceType):
    """dispel4py's pattern type for output over sliding windows (see :class:`AccumulateFlow`)."""


class ASTGrouped(ProvenanceType):
    """dispel4py's pattern type for a grouped stateful operator (see :class:`AccumulateFlow`)."""


class SingleInvocationFlow(ProvenanceType):
    """dispel4py's pattern type for stateless input-output dependencies (see :class:`AccumulateFlow`)."""


class AccumulateStateTrace(ProvenanceType):
    """dispel4py's pattern type tracing updates of intermediate results (see :class:`AccumulateFlow`)."""


class IntermediateStatefulOut(ProvenanceType):
    """dispel4py's pattern type for interdependent stateful output (see :class:`AccumulateFlow`)."""


class ForceStateless(ProvenanceType):
    """dispel4py's pattern type ignoring explicit state updates (see :class:`AccumulateFlow`)."""


#: The provenance types a ``componentsType`` configuration may name as strings.
_TYPES_BY_NAME: dict[str, type[ProvenanceType]] = {
    cls.__name__: cls
    for cls in (
        ProvenanceType,
        AccumulateFlow,
        Nby1Flow,
        SlideFlow,
        ASTGrouped,
        SingleInvocationFlow,
        AccumulateStateTrace,
        IntermediateStatefulOut,
        ForceStateless,
    )
}


class ProvenanceIterativePE(ProvenanceType, IterativePE):
    """dispel4py's ``IterativePE`` with provenance: override ``_process(data)``."""


class ProvenanceSimpleFunctionPE(ProvenanceType, SimpleFunctionPE):
    """dispel4py's ``SimpleFunctionPE(compute_fn, params)`` with provenance."""


def injectProv(
    graph: Any, provType: Any = ProvenanceType, active: bool = True, componentsType: Any = None, **kwargs: Any
) -> Any:
    """Make every PE of ``graph`` a ``provType`` (a type or a tuple of them), as dispel4py does; returns ``graph``.

    Each PE's class gets the type mixed in (``componentsType[pe.name]["s-prov:type"]``
    instead for the PEs it names, by class or name), so a PE written for an
    injected run may call ``write(port, item, metadata=...)``. aiod4p records
    every PE, whatever its type: the types' derivation rules, and any other
    option, are ignored with a warning.
    """
    for option, value in (("componentsType", componentsType), *kwargs.items()):
        if value and option not in ("save_mode", "controlParameters"):
            _warn(f"injectProv ignores {option}={value!r}: aiod4p records every PE the same way")
    for pe in graph.flatten().pes.values():
        named = (componentsType or {}).get(getattr(pe, "name", None), {}).get("s-prov:type")
        types = _provenance_types(named if named else provType)
        missing = tuple(cls for cls in types if not isinstance(pe, cls))
        if missing and isinstance(pe, GenericPE):
            current = type(pe)
            # Mixed again (configure_prov_run called twice): mix into the bases, so that the class stays
            # one that pickle can rebuild from importable classes (see compat.core's __reduce_ex__).
            bases = current.__bases__ if current in _MIXED else (current,)
            mixed = type(current.__name__, (*missing, *bases), {})
            _MIXED.add(mixed)
            pe.__class__ = mixed
            if isinstance(pe, ProvenanceType):  # now it is
                pe._init_provenance()
    return graph


#: The classes :func:`injectProv` made (weakly held).
_MIXED: weakref.WeakSet[type] = weakref.WeakSet()


def _provenance_types(given: Any) -> tuple[type[ProvenanceType], ...]:
    """The provenance types ``given`` names: a type, a name, or a tuple or list of them (unknown names left out)."""
    items = given if isinstance(given, (tuple, list)) else [given]
    found = [_TYPES_BY_NAME.get(item) if isinstance(item, str) else item for item in items]
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, ProvenanceType))


@dataclass(frozen=True)
class ProvenanceConfig:
    """What :func:`configure_prov_run` asked of a graph's runs: the aiod4p level and the file to write."""

    level: str
    path: str
    run_id: str

    def save(self, stats: Iterable[Any]) -> str:
        """Write the PROV document of a finished run's ``stats`` to :attr:`path`; returns the path."""
        from .._provenance import write_provenance

        return write_provenance(stats, self.path)


_CONFIG_ATTRIBUTE = "_dispel4py_provenance"


def provenance_config(graph: Any) -> ProvenanceConfig | None:
    """The provenance :func:`configure_prov_run` set on ``graph``, if any."""
    config = getattr(graph, _CONFIG_ATTRIBUTE, None)
    return config if isinstance(config, ProvenanceConfig) else None


def configure_prov_run(
    graph: WorkflowGraph,
    provRecorderClass: Any = None,
    provImpClass: Any = ProvenanceType,
    input: Any = None,
    username: str | None = None,
    workflowId: str | None = None,
    description: str | None = None,
    system_id: str | None = None,
    workflowName: str | None = None,
    workflowType: str | None = None,
    w3c_prov: bool = False,
    runId: str | None = None,
    componentsType: Any = None,
    clustersRecorders: Any = None,
    feedbackPEs: Any = None,
    save_mode: str = "file",
    sel_rules: Any = None,
    transfer_rules: Any = None,
    update: bool = False,
    sprovConfig: Mapping[str, Any] | None = None,
    sessionId: str | None = None,
    mapping: str = "simple",
    force: bool = False,
    *,
    provenance_file: str | None = None,
    provenance_level: str = "item",
) -> str:
    """Turn provenance on for ``graph``'s runs through dispel4py's entry points; returns the run id.

    dispel4py's options map onto aiod4p's as follows: ``save_mode="file"``
    (or ``"s-prov:save-mode"`` in ``sprovConfig``) writes a PROV-JSON file,
    ``provenance_file`` (aiod4p's keyword; default ``prov-<runId>.json``, the
    extension picks the format); ``provenance_level`` is aiod4p's level
    (``"item"``, dispel4py's granularity, or ``"pe"``). ``sprovConfig`` keys
    override the arguments as in dispel4py. Options that drive dispel4py's
    remote stores or filters (``save_mode="service"``/``"sensor"``,
    ``provRecorderClass``, ``clustersRecorders``, ``feedbackPEs``,
    ``sel_rules``, ``transfer_rules``, ``componentsType``, ``w3c_prov``) have no
    aiod4p equivalent: each is ignored with a warning naming it, and the file is
    written. Run attribution (``username``, ``workflowId``, ...) is accepted
    and not recorded.

    Under ``aiod4p run``, ``--provenance FILE`` overrides the file (and
    ``--provenance-level`` the level); without it, the run writes this one.

    Raises:
        Aiod4pError: an unknown ``save_mode`` or ``provenance_level``.
    """
    from .._plan import check_provenance_level

    settings: dict[str, Any] = {
        "save_mode": save_mode,
        "runId": runId,
        "componentsType": componentsType,
        "sel_rules": sel_rules,
        "transfer_rules": transfer_rules,
    }
    for key, value in (sprovConfig or {}).items():
        option = _SPROV_KEYS.get(key)
        if option is not None:
            settings[option] = value
    save_mode = settings["save_mode"]
    if save_mode not in _SAVE_MODES:
        raise Aiod4pError(
            f"configure_prov_run: unknown save_mode {save_mode!r} (dispel4py knows {sorted(_SAVE_MODES)})"
        )
    try:
        check_provenance_level(provenance_level)
    except ValueError as exc:
        raise Aiod4pError(f"configure_prov_run: {exc}") from exc
    run_id = str(settings["runId"] or uuid.uuid4())
    path = provenance_file or f"prov-{run_id}.json"
    if save_mode != "file":
        _warn(
            f"save_mode={save_mode!r} is not supported (no provenance service or sensor): provenance goes to a file"
            f" instead ({path}, or the --provenance FILE of aiod4p run)"
        )
    unsupported = {
        "provRecorderClass": provRecorderClass,
        "clustersRecorders": clustersRecorders,
        "feedbackPEs": feedbackPEs,
        "sel_rules": settings["sel_rules"],
        "transfer_rules": settings["transfer_rules"],
        "w3c_prov": w3c_prov,
    }
    for option, value in unsupported.items():
        if value:
            _warn(f"configure_prov_run ignores {option}={value!r}: aiod4p has no equivalent")
    injectProv(graph, provImpClass, componentsType=settings["componentsType"])
    setattr(graph, _CONFIG_ATTRIBUTE, ProvenanceConfig(provenance_level, path, run_id))
    return run_id


#: ``sprovConfig`` keys that override :func:`configure_prov_run`'s arguments.
_SPROV_KEYS = {
    "s-prov:save-mode": "save_mode",
    "s-prov:run-id": "runId",
    "s-prov:componentsType": "componentsType",
    "s-prov:sel-rules": "sel_rules",
    "s-prov:transfer-rules": "transfer_rules",
}
