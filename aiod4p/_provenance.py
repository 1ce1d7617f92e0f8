"""Provenance: what each PE invocation used and generated, as W3C PROV.

Two levels, chosen by ``PlanOptions.provenance`` (``--provenance-level``):

``pe``
    per instance: the items taken and written on each port, and when it ran.
    The engine pays a counter update per batch.
``item``
    full lineage: every item travels as a :class:`Tagged` (its id and value)
    between instances, so one PE invocation records exactly which items it
    used and which it generated, on every mapping. A PE is called one item at
    a time; nothing changes for the PE itself, which sees plain values.

When provenance is off nothing here is created and the engine pays one
``None`` check per batch. Each instance records its own part
(:meth:`ActorRecorder.part`), which travels to the launcher with the
instance's final statistics (:attr:`InstanceStats.provenance`); the launcher
merges the parts with :func:`document`.

A PE's output written in ``postprocess`` derives, by default, from every
item that instance used. A stateful PE makes it exact with
:meth:`PE.remember` (the current input contributes to state ``key``) and
:meth:`PE.recall` (what is written next derives from state ``key``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from ._frames import short_repr
from ._groupings import KeyRouter, Router
from ._install import install_hint
from ._plan import check_provenance_level
from ._results import ResultSink, data_digest
from ._sizes import approximate_size
from ._tagged import Tagged
from ._visual import dot_escape
from .errors import Aiod4pError, GraphError, writing

if TYPE_CHECKING:
    from prov.model import ProvDocument

    from ._engine import _Actor
    from ._stats import InstanceStats

__all__ = ["ActorRecorder", "Tagged", "WorkerRecorder", "document", "write_document", "write_provenance"]
NAMESPACE = ("aiod4p", "urn:aiod4p:")
_VALUE_CHARS = 200  # an entity keeps the repr of its value, cut to this length


logger = logging.getLogger("aiod4p")

HELD_CALLS_WARNING = 1_000_000
"""Calls an instance records at level ``item`` before the run warns, once per process, that its records are all held
in memory until the run ends (about 1 kB a call with its items: an endless run grows without bound)."""
_warned_of_held_calls = False

DIGESTED_BYTES = 1 << 20
"""The largest result (as :func:`approximate_size` counts it) whose JSON's digest is kept (``aiod4p:data_digest``),
by which ``--trace`` finds it by its ``--results`` line: a larger one's JSON, megabytes, costs its encoding again
for each result, and is no command-line argument (Linux takes 128 kB at most)."""


def value_repr(value: Any) -> str:
    """``repr(value)`` cut to 200 characters, as an entity keeps it.

    A str, bytes, list, tuple or dict (at any depth) gives the start of its repr
    without the whole being made, so the cost is bounded whatever its size (the
    repr of a 20 MB record took a second, for each item; a string longer than
    that may then be quoted otherwise than its whole repr would); other types
    give their own repr, cut (numpy's is short already).
    """
    cut = _CutRepr(_VALUE_CHARS)
    cut.write(value)
    return "".join(cut.pieces)[:_VALUE_CHARS]


class _CutRepr:
    """Writes the start of a value's repr, piece by piece, until ``room`` characters are written."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.pieces: list[str] = []

    def put(self, text: str) -> None:
        self.pieces.append(text)
        self.room -= len(text)

    def write(self, value: Any) -> None:
        kind = type(value)
        if kind is list or kind is tuple:
            self.put("[" if kind is list else "(")
            for index, item in enumerate(value):
                if self.room <= 0:
                    return
                self.put(", " if index else "")
                self.write(item)
            self.put("]" if kind is list else ",)" if len(value) == 1 else ")")
        elif kind is dict:
            self.put("{")
            for index, (key, item) in enumerate(value.items()):
                if self.room <= 0:
                    return
                self.put(", " if index else "")
                self.write(key)
                self.put(": ")
                self.write(item)
            self.put("}")
        elif (kind is str or kind is bytes) and len(value) > self.room:
            self.put(repr(value[: max(self.room, 0)]))  # its closing quote lies past the cut
        else:
            self.put(repr(value))


class _KeyOfValue:
    """A group-by router's key getter that sees through :class:`Tagged`."""

    def __init__(self, get: Callable[[Any], Any]) -> None:
        self.get = get

    def __call__(self, item: Tagged) -> Any:
        return self.get(item.value)


class _ValueRouter(Router):
    """Hands a router that reads items (a grouping of one's own) their values, and its parts back tagged."""

    __slots__ = ("inner", "where")
    passes_through = False

    def __init__(self, inner: Router, where: str) -> None:
        super().__init__(inner.count)
        self.inner = inner
        self.where = where

    def split(self, items: list[Tagged]) -> list[list[Any]]:
        """Raises:
        GraphError: the router's parts hold an object it was not given."""
        values = [item.value for item in items]
        parts = self.inner.split(values)
        # Each value goes back to its tagged item. Items that are one object (small ints, a string written twice)
        # look alike to the router: they are handed out in turn, a split sending each to one part and a
        # broadcast all of them to every part.
        positions: dict[int, list[int]] = {}
        for index, value in enumerate(values):
            positions.setdefault(id(value), []).append(index)
        turns = dict.fromkeys(positions, 0)
        tagged: list[list[Any]] = []
        for part in parts:
            back = []
            for value in part:
                at = positions.get(id(value))
                if at is None:
                    raise GraphError(
                        f"the router of {self.where} returned {short_repr(value)}, which it was not given: item-level"
                        " provenance needs a router to return the items themselves"
                    )
                turn = turns[id(value)]
                turns[id(value)] = turn + 1
                back.append(items[at[turn % len(at)]])
            tagged.append(back)
        return tagged


class WorkerRecorder:
    """Creates the recorders of one worker's instances."""

    def __init__(self, level: str, worker_id: int) -> None:
        check_provenance_level(level)
        self.level = level
        self.worker_id = worker_id

    def attach(self, actor: _Actor) -> ActorRecorder:
        """Record ``actor`` (its routes must be wired): returns its recorder."""
        return ActorRecorder(self, actor)

    def sink(self, results: ResultSink) -> ResultSink:
        """Where this worker's results go: at level ``item``, results lose their tags first."""
        return _UntagSink(results) if self.level == "item" else results


class _UntagSink:
    def __init__(self, inner: ResultSink) -> None:
        self.inner = inner

    async def emit(self, pe: str, port: str, items: list[Any]) -> None:
        await self.inner.emit(pe, port, [item.value if type(item) is Tagged else item for item in items])


@dataclass
class _Activity:
    id: str
    stage: str  # process, preprocess, postprocess, or instance (level pe)
    port: str | None
    started: float
    ended: float = 0.0
    used: tuple[str, ...] | None = ()  # None: everything this instance used


@dataclass
class _Part:
    """What one instance recorded; travels pickled with its final statistics."""

    pe: str
    pe_class: str
    instance: int
    worker: int
    level: str
    annotations: dict[str, Annotation] = field(default_factory=dict)
    items_in: dict[str, int] = field(default_factory=dict)
    items_out: dict[str, int] = field(default_factory=dict)
    inputs_from: list[tuple[str, str, str]] = field(default_factory=list)  # (source pe, its port, my port)
    activities: list[_Activity] = field(default_factory=list)
    # (entity id, index of its activity, port, repr of value, derived from: None = the activity's used)
    entities: list[tuple[str, int, str, str, tuple[str, ...] | None]] = field(default_factory=list)
    sources: list[tuple[str, str]] = field(default_factory=list)  # feed elements: (entity id, repr)
    result_ports: list[str] = field(default_factory=list)
    # results' entity ids -> data_digest of their value (none for a value JSON cannot write)
    digests: dict[str, str] = field(default_factory=dict)
    restored: int | None = None  # the checkpoint the instance resumed from: what came before it is not recorded


Annotation = str | bool | int | float
"""An annotation's value as the file keeps it: a number or a boolean typed (``xsd:int``, ``xsd:double``,
``xsd:boolean``), anything else as its ``str``."""


def _annotation(value: Any) -> Annotation:
    """``value`` as an annotation keeps it: a bool, int or float as it is (numpy's as Python's), else its ``str``."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic) and value.dtype.kind in "biuf":
        value = value.item()
    if type(value) in (bool, int, float):
        kept: Annotation = value
        return kept
    return str(value)


class ActorRecorder:
    """Records one instance: called by the engine around each PE call, and by the PE itself."""

    def __init__(self, worker: WorkerRecorder, actor: _Actor) -> None:
        self.actor = actor
        ref = actor.ref
        self.item_level = worker.level == "item"
        plan = actor.worker.plan
        inputs_from = [
            (source_pe, route.source_port, route.dest_port)
            for source_pe, routes in plan.routes.items()
            for route in routes
            if route.dest == ref.pe
        ]
        self.record = _Part(ref.pe, type(actor.pe).__name__, ref.index, worker.worker_id, worker.level)
        self.record.inputs_from = sorted(set(inputs_from))
        self.record.result_ports = sorted(plan.result_ports.get(ref.pe, []))
        self.result_ports = frozenset(self.record.result_ports)
        self.prefix = f"{ref.pe}.{ref.index}"
        self.count = 0
        # The index in the feed of the next feed element (a restored run's starts where its checkpoint's feed
        # stood), so that an input entity's id names the element it is: ``feed7`` is the feed's eighth.
        self.fed = 0
        self.current: _Activity | None = None
        self.current_index = -1
        self.derived: tuple[str, ...] | None = None  # set by recall()
        self.state: dict[Hashable, list[str]] = {}
        if self.item_level:
            for port, routes in actor.routes.items():
                for route in routes:
                    if isinstance(route.router, KeyRouter):
                        route.router.use_key(_KeyOfValue(route.router.get))
                    elif route.router.reads_items and not route.passes_through:
                        route.router = _ValueRouter(route.router, f"PE {ref.pe}'s output {port!r}")
            original = actor._route_outputs

            async def route_outputs(detach: bool = False) -> None:
                self._tag_buffers()
                await original(detach)

            actor._route_outputs = route_outputs  # type: ignore[method-assign]
            actor.traced = True
        else:  # per-port counts only, kept by the engine: nothing wraps the PE's calls
            actor.counts_out = self.record.items_out
            self._begin("instance", None, ())

    # -- the engine's side ----------------------------------------------------
    def count_in(self, port: str | None, count: int) -> None:
        """``count`` items arrived on ``port`` (``None``: the feed)."""
        name = "feed" if port is None else port
        counts = self.record.items_in
        counts[name] = counts.get(name, 0) + count

    async def handle(self, port: str | None, items: list[Any]) -> None:
        """Hand a batch to the PE as the engine would, recording each call (level ``item``): in the engine's
        parts of a batch, letting other tasks run between them and handing on every ``batch_bytes`` of outputs
        as it does."""
        self.count_in(port, len(items))
        actor = self.actor
        handle = actor._handle
        name = "feed" if port is None else port
        for number, part in enumerate(actor._parts(items)):
            if number and not await actor._after_part():
                return
            for element in part:
                if type(element) is Tagged:
                    used: tuple[str, ...] = (element.id,)
                    element = element.value
                elif port is None and element is not None and element != {}:
                    source = f"{self.prefix}.feed{self.fed}"
                    self.record.sources.append((source, value_repr(element)))
                    used = (source,)
                else:
                    used = ()
                if port is None:
                    self.fed += 1
                self._begin("process", name, used)
                await handle(port, [element])
                self._end()
                if actor._buffered_bytes() >= actor.batch_bytes:  # hand them on, as a batch's plain calls do
                    await actor._route_streamed()

    def begin_stage(self, stage: str) -> None:
        """``preprocess`` or ``postprocess`` starts (level ``item``)."""
        if self.item_level:
            self._begin(stage, None, None if stage == "postprocess" else ())

    def end_stage(self) -> None:
        if self.item_level:
            self._end()

    def part(self) -> _Part:
        """This instance's record, once it has finished."""
        if not self.item_level and self.current is not None:
            self.current.ended = time.time()
            self.current = None
        return self.record

    # -- the PE's side ------------------------------------------------------
    def annotate(self, attributes: Mapping[str, Any]) -> None:
        self.record.annotations.update({str(k): _annotation(v) for k, v in attributes.items()})

    def remember(self, key: Hashable) -> None:
        if self.item_level and self.current is not None and self.current.used:
            self.state.setdefault(key, []).extend(self.current.used)

    def recall(self, keys: Iterable[Hashable]) -> None:
        if self.item_level:
            self._tag_buffers()
            self.derived = tuple(used for key in keys for used in self.state.get(key, ()))

    # -- recording ------------------------------------------------------------
    def _begin(self, stage: str, port: str | None, used: tuple[str, ...] | None) -> None:
        calls = len(self.record.activities)
        if calls == HELD_CALLS_WARNING:
            _warn_of_held_calls(self.prefix, calls)
        activity = _Activity(f"{self.prefix}.a{calls}", stage, port, time.time(), 0.0, used)
        self.record.activities.append(activity)
        self.current = activity
        self.current_index = len(self.record.activities) - 1
        self.derived = None

    def _end(self) -> None:
        self._tag_buffers()
        assert self.current is not None
        entities = self.record.entities
        if self.current.stage != "process" and not (entities and entities[-1][1] == self.current_index):
            self.record.activities.pop()  # a preprocess or postprocess that wrote nothing: no activity
        else:
            self.current.ended = time.time()
        self.current = None
        self.derived = None

    def _tag_buffers(self) -> None:
        entities = self.record.entities
        for port, buffer in self.actor.buffers.items():
            start = len(buffer)
            while start and type(buffer[start - 1]) is not Tagged:
                start -= 1
            for position in range(start, len(buffer)):
                value = buffer[position]
                entity = f"{self.prefix}.{self.count}"
                self.count += 1
                entities.append((entity, self.current_index, port, value_repr(value), self.derived))
                if port in self.result_ports and approximate_size(value)[0] <= DIGESTED_BYTES:
                    with contextlib.suppress(ValueError, RecursionError):  # --results cannot write it either
                        self.record.digests[entity] = data_digest(value)
                buffer[position] = Tagged(entity, value)
                counts = self.record.items_out
                counts[port] = counts.get(port, 0) + 1


def _warn_of_held_calls(instance: str, calls: int) -> None:
    """Say, once per process, that item-level provenance holds everything it recorded until the run ends."""
    global _warned_of_held_calls
    if not _warned_of_held_calls:
        _warned_of_held_calls = True
        logger.warning(
            "provenance at level item: instance %s has recorded %s calls, all held in memory (about 1 kB a call"
            " with its items) until the run ends, and written only then: a run that does not end grows without"
            ' bound. Record such a run at level pe (--provenance-level pe, provenance="pe"), which keeps counts'
            " only. Logged once per process.",
            instance.replace(".", "[", 1) + "]",
            f"{calls:,}",
        )


def parts(stats: Iterable[InstanceStats]) -> list[_Part]:
    """The provenance parts carried by a run's final statistics.

    Raises:
        Aiod4pError: the run recorded no provenance.
    """
    found = [entry.provenance for entry in stats if isinstance(entry.provenance, _Part)]
    if not found:
        raise Aiod4pError("the run recorded no provenance (run it with provenance='pe' or 'item')")
    return found


def _prov() -> Any:
    try:
        import prov.model
    except ImportError:
        raise Aiod4pError(f"provenance files need the prov package: {install_hint('provenance')}") from None
    return prov.model


class _QName(str):
    """An attribute value that is a qualified name (``prov:SoftwareAgent``, ``aiod4p:Item``), not a string."""

    __slots__ = ()


_Record = tuple[str, str, str, dict[str, Any]]
"""``(kind, first, second, attributes)``: an element (``agent``, ``entity``, ``activity``: ``first`` is its id,
``second`` empty; an activity's attributes start with ``prov:startTime`` and ``prov:endTime``) or a relation
(``first`` and ``second`` are its two terms, as :data:`_TERMS` names them). Ids and attribute names are
qualified (``aiod4p:...``)."""

_TERMS = {
    "actedOnBehalfOf": ("prov:delegate", "prov:responsible"),
    "wasAssociatedWith": ("prov:activity", "prov:agent"),
    "used": ("prov:activity", "prov:entity"),
    "wasGeneratedBy": ("prov:entity", "prov:activity"),
    "wasDerivedFrom": ("prov:generatedEntity", "prov:usedEntity"),
}
"""The two terms of each relation :func:`_records` yields, as PROV-JSON names them."""


def _records(found: list[_Part]) -> Iterable[_Record]:
    """The records of the W3C PROV document merged from the instances' parts (see :func:`document`)."""
    prefix = NAMESPACE[0] + ":"
    software = _QName("prov:SoftwareAgent")
    pes_done: set[str] = set()
    generated: set[str] = set()
    for part in found:
        if part.pe not in pes_done:
            pes_done.add(part.pe)
            yield "agent", prefix + part.pe, "", {"prov:type": software, prefix + "class": part.pe_class}
        agent = f"{prefix}{part.pe}.{part.instance}"
        attributes: dict[str, Any] = {
            "prov:type": software,
            prefix + "worker": part.worker,
            prefix + "level": part.level,
        }
        attributes.update({prefix + key: value for key, value in part.annotations.items()})
        if part.restored is not None:
            attributes[prefix + "restored_from_checkpoint"] = part.restored
        yield "agent", agent, "", attributes
        yield "actedOnBehalfOf", agent, prefix + part.pe, {}
        for entity, value in part.sources:
            yield "entity", prefix + entity, "", {"prov:value": value, "prov:type": _QName(prefix + "Input")}
        everything = [entity for activity in part.activities for entity in activity.used or ()]
        for activity in part.activities:
            attrs: dict[str, Any] = {
                "prov:startTime": _time(activity.started),
                "prov:endTime": _time(activity.ended or activity.started),
                prefix + "stage": activity.stage,
            }
            if activity.port is not None:
                attrs[prefix + "port"] = activity.port
            if part.level == "pe":
                attrs.update({f"{prefix}in_{port}": count for port, count in part.items_in.items()})
                attrs.update({f"{prefix}out_{port}": count for port, count in part.items_out.items()})
            identifier = prefix + activity.id
            yield "activity", identifier, "", attrs
            yield "wasAssociatedWith", identifier, agent, {}
            # postprocess (used is None) used whatever the instance used: its state may hold any of it
            for entity in everything if activity.used is None else activity.used:
                yield "used", identifier, prefix + entity, {}
        if part.level == "pe":
            identifier = prefix + part.activities[0].id
            for source_pe, source_port, _ in part.inputs_from:
                stream = f"{prefix}{source_pe}.{source_port}.stream"
                if stream not in generated:
                    generated.add(stream)
                    yield "entity", stream, "", {"prov:type": _QName(prefix + "Stream")}
                yield "used", identifier, stream, {}
            for port in part.items_out:
                stream = f"{prefix}{part.pe}.{port}.stream"
                if stream not in generated:
                    generated.add(stream)
                    yield "entity", stream, "", {"prov:type": _QName(prefix + "Stream")}
                yield "wasGeneratedBy", stream, identifier, {}
    result, item = _QName(prefix + "Result"), _QName(prefix + "Item")
    for part in found:
        for entity, index, port, value, derived in part.entities:
            activity = part.activities[index]
            identifier = prefix + entity
            kind = result if port in part.result_ports else item
            fields: dict[str, Any] = {"prov:value": value, "prov:type": kind, prefix + "port": port}
            if derived == ():  # recall() of states that hold nothing: no derivation, and none from its activity's used
                fields[prefix + "recalled"] = "nothing"
            digest = part.digests.get(entity)
            if digest is not None:
                fields[_DIGEST] = digest
            yield "entity", identifier, "", fields
            yield "wasGeneratedBy", identifier, prefix + activity.id, {}
            # a postprocess output without recall() derives from its activity's used (not repeated per output)
            for origin in derived if derived is not None else activity.used or ():
                yield "wasDerivedFrom", identifier, prefix + origin, {}


def document(stats: Iterable[InstanceStats]) -> ProvDocument:
    """Merge the instances' provenance parts into one W3C PROV document.

    Agents: one ``prov:SoftwareAgent`` per PE (with its annotations) and one
    per instance, acting on behalf of its PE. At level ``item``: one activity
    per PE invocation, one entity per item (its value's repr as
    ``prov:value``), ``used``, ``wasGeneratedBy`` and ``wasDerivedFrom``; the
    items of unconnected ports are typed ``aiod4p:Result``. At level ``pe``:
    one activity per instance that used and generated one entity per
    connected stream, with per-port counts as attributes.

    The document holds every record in memory (a few kB each); :func:`write_provenance` writes a PROV-JSON
    file of any size without it.

    Raises:
        Aiod4pError: no provenance was recorded, or ``prov`` is not installed.
    """
    model = _prov()
    found = parts(stats)
    doc = model.ProvDocument()
    namespace, prefix = doc.add_namespace(*NAMESPACE), NAMESPACE[0] + ":"
    names: dict[str, Any] = {}

    def q(text: str) -> Any:
        """The qualified name of ``text``, made once: prov resolves strings slowly (and checks the syntax of
        their local part, which an annotation's name need not follow)."""
        name = names.get(text)
        if name is None:
            local = text.removeprefix(prefix)
            name = names[text] = namespace[local] if local != text else doc.valid_qualified_name(text)
        return name

    def attributes(attrs: dict[str, Any]) -> dict[Any, Any]:
        return {q(key): q(value) if type(value) is _QName else value for key, value in attrs.items()}

    for kind, first, second, attrs in _records(found):
        if kind == "activity":
            started, ended = attrs.pop("prov:startTime"), attrs.pop("prov:endTime")
            doc.activity(q(first), started, ended, attributes(attrs))
        elif kind in _TERMS:
            getattr(doc, kind)(q(first), q(second))
        else:
            getattr(doc, kind)(q(first), attributes(attrs))
    result: ProvDocument = doc
    return result


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


FORMATS = {".json": "json", ".provn": "provn", ".xml": "xml"}


def check_provenance_file(path: str) -> str:
    """The format of provenance file ``path``, by its extension (see :data:`FORMATS`).

    Raises:
        Aiod4pError: the extension names no format, or ``prov`` is not installed.
    """
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise Aiod4pError(f"{path}: a provenance file is .json (PROV-JSON), .provn (PROV-N) or .xml (PROV-XML)")
    _prov()
    return fmt


def write_document(doc: ProvDocument, path: str) -> str:
    """Write ``doc`` as PROV-JSON (``.json``), PROV-N (``.provn``) or PROV-XML (``.xml``), by extension: the file
    replaces ``path`` once it is whole, and a failed write leaves ``path`` as it was.

    Raises:
        Aiod4pError: as :func:`check_provenance_file`, or the file cannot be written.
    """
    fmt = check_provenance_file(path)
    with _replacing(path) as out:
        if fmt == "provn":
            out.write(doc.get_provn())
        else:
            doc.serialize(out, format=fmt)
    return path


def write_provenance(stats: Iterable[InstanceStats], path: str) -> str:
    """Write the provenance a run's ``stats`` carry to ``path``, as :func:`write_document` writes
    :func:`document`: PROV-JSON record by record, in about the memory the parts take already (the
    document would take a few kB a record); PROV-N and PROV-XML through the document.

    Raises:
        Aiod4pError: as :func:`document` and :func:`write_document`.
    """
    if check_provenance_file(path) != "json":
        return write_document(document(stats), path)
    found = parts(stats)
    with _replacing(path) as out:
        _write_json(_records(found), out, os.path.dirname(os.path.abspath(path)))
    return path


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[TextIO]:
    """A text file, beside ``path``, that replaces ``path`` (renamed over it, with its permissions) once the block
    ends; if the block or the writing fails, it is removed and ``path`` is left as it was (an earlier run's file
    is never lost to a document that could not be written). A path that cannot be replaced so is written in
    place: a symbolic link (its target is the file), a named pipe or other file that is not a regular one, a
    file in a directory this process cannot write to.

    Raises:
        Aiod4pError: the file cannot be written or renamed (named, with the system's reason).
    """
    directory, name = os.path.split(os.path.abspath(path))
    exists = os.path.lexists(path)
    with writing("provenance", str(path)):
        if (exists and (os.path.islink(path) or not os.path.isfile(path))) or not os.access(directory, os.W_OK):
            with open(path, "w", encoding="utf-8") as out:
                yield out
            return
        _remove_stale_temporaries(directory, name)
        # Unique on every host sharing the directory; created as open() creates files (mkstemp's are private).
        temporary = os.path.join(directory, f"{_temporary_prefix(name)}{socket.gethostname()}-{os.getpid()}")
        try:
            with open(temporary, "w", encoding="utf-8") as out:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)  # held until the file is renamed: a writer at work
                yield out
                out.flush()
                if exists:
                    shutil.copymode(path, temporary)
                os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


STALE_TEMPORARY_SECONDS = 60.0
"""How old a temporary file of a provenance file no writer holds must be to be taken for a killed writer's."""


def _temporary_prefix(name: str) -> str:
    """The start of the name of the temporary files that :func:`_replacing` writes file ``name`` as."""
    return f".{name}.tmp-"


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Remove the temporary files of ``name`` in ``directory`` that writers left when they were killed (SIGKILL, the
    OOM killer: a large run's was hundreds of MB, hidden): those that no writer holds locked (a writer holds its
    file's lock, which the system lets go of when the writer ends, on any host or container sharing the file)."""
    prefix = _temporary_prefix(name)
    try:
        entries = [entry for entry in os.listdir(directory) if entry.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        left = os.path.join(directory, entry)
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to open
            fd = os.open(left, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                # A minute old at least: a writer creates its file, then locks it.
                if time.time() - os.fstat(fd).st_mtime > STALE_TEMPORARY_SECONDS:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a writer holds it
                    os.unlink(left)
            finally:
                os.close(fd)


def _write_json(records: Iterable[_Record], out: TextIO, spool: str) -> None:
    """Write ``records`` to ``out`` as one PROV-JSON document: each kind's records gather in a temporary file
    in directory ``spool`` (PROV-JSON groups them by kind), then the kinds are copied into ``out`` in turn."""
    encode = json.JSONEncoder(check_circular=False).encode
    with contextlib.ExitStack() as stack:
        kinds: dict[str, TextIO] = {}
        anonymous = 0
        for kind, first, second, attrs in records:
            section = kinds.get(kind)
            if section is None:
                section = kinds[kind] = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8", dir=spool))
            else:
                section.write(", ")
            fields = {key: _json_value(value) for key, value in attrs.items()}
            if kind in _TERMS:
                anonymous += 1
                first_term, second_term = _TERMS[kind]
                section.write(f'"_:id{anonymous}": {encode({first_term: first, second_term: second, **fields})}')
                continue
            section.write(f"{encode(first)}: {encode(fields)}")
        out.write(f'{{"prefix": {encode(dict([NAMESPACE]))}')
        for kind, section in kinds.items():
            out.write(f', "{kind}": {{')
            section.seek(0)
            shutil.copyfileobj(section, out)
            out.write("}")
        out.write("}\n")


def _json_value(value: Any) -> Any:
    """An attribute value as PROV-JSON writes it: a qualified name or a number typed, a string as it is."""
    if type(value) is _QName:
        return {"$": str(value), "type": "xsd:QName"}
    if isinstance(value, datetime):  # an activity's start or end: written as prov writes them, untyped
        return value.isoformat()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        from prov.model import canonical_xsd_datatype

        return {
            "$": _double_text(value) if isinstance(value, float) else str(value),
            "type": str(canonical_xsd_datatype(value)),
        }
    return value


def _double_text(value: float) -> str:
    """The ``xsd:double`` text of ``value``, as ``prov`` writes it: ``NaN``, ``INF``, ``-INF``, else its repr."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "INF" if value > 0 else "-INF"
    return float.__repr__(value)


@dataclass
class Lineage:
    """What a PROV document says about where items came from (read back with ``prov``).

    Attributes:
        values: ``prov:value`` of each entity.
        kinds: ``prov:type`` of each entity (``aiod4p:Result``, ``aiod4p:Item``, ...).
        parents: the entities each entity derives from (its derivations, else
            what its generating activity used).
        made_by: the PE instance (agent) whose activity generated each entity.
        restored: the checkpoints the run resumed from (its instances' ``aiod4p:restored_from_checkpoint``):
            what came before them is not recorded.
        digests: each result's ``aiod4p:data_digest``, the digest of its value as ``--results`` writes it.
    """

    values: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    parents: dict[str, list[str]] = field(default_factory=dict)
    made_by: dict[str, str] = field(default_factory=dict)
    restored: set[int] = field(default_factory=set)
    digests: dict[str, str] = field(default_factory=dict)

    def results(self) -> list[str]:
        """The entities that are results of the run."""
        return [entity for entity, kind in self.kinds.items() if kind.endswith("Result")]

    def find(self, wanted: str) -> list[str]:
        """The results ``wanted`` names: an entity id, else the exact repr of a result's value, or the result as
        ``--results`` writes it (its JSON record, or that record's ``data``), else a part of the repr.

        Raises:
            Aiod4pError: nothing matches (saying that item-level provenance is needed when no result is recorded);
                ``wanted`` is empty (a part of every value).
        """
        if not wanted.strip():
            raise Aiod4pError(
                f"{wanted!r} names no result: give an entity id, (part of) the repr of a result's value, or the result"
                " as --results writes it"
            )
        for candidate in (wanted, f"{NAMESPACE[0]}:{wanted}"):
            if candidate in self.values or candidate in self.parents:
                return [candidate]
        results = self.results()
        reprs, digests = _forms_of_json(wanted)
        reprs.add(wanted)
        exact = [
            entity for entity in results if self.values.get(entity) in reprs or self.digests.get(entity) in digests
        ]
        if exact:
            return exact
        partial = [entity for entity in results if wanted in self.values.get(entity, "")]
        if partial:
            return partial
        # Without results, the file may be of level pe, which records none: say what it takes.
        hint = "" if results else "; item-level provenance (--provenance-level item) is needed to trace single results"
        recorded = f"{len(results)} result{'' if len(results) == 1 else 's'} recorded"
        raise Aiod4pError(f"no entity or result matches {wanted!r} ({recorded}{hint})")

    def trace(self, entity: str) -> list[str]:
        """Every entity ``entity`` derives from, transitively, itself first (breadth first)."""
        seen, order = {entity}, [entity]
        for current in order:
            for parent in self.parents.get(current, ()):
                if parent not in seen:
                    seen.add(parent)
                    order.append(parent)
        return order

    def sources(self, entity: str) -> list[str]:
        """The entities at the start of ``entity``'s lineage: those that derive from nothing."""
        return [e for e in self.trace(entity) if not self.parents.get(e)]

    def to_dot(self, entities: Iterable[str]) -> str:
        """Graphviz dot text of the lineage of ``entities``: arrows point from an item to what it derives from."""
        nodes: list[str] = []
        for entity in entities:
            nodes.extend(self.trace(entity))
        keep = dict.fromkeys(nodes)
        lines = ["digraph lineage {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica", fontsize=10];']
        for node in keep:
            made_by = self.made_by.get(node, "input")
            label = dot_escape(self.values.get(node, "")) + "\\n" + dot_escape(f"{node} ({made_by})")
            colour = "gold" if not self.parents.get(node) else "white"
            lines.append(f'  "{dot_escape(node)}" [label="{label}", style=filled, fillcolor={colour}];')
        for node in keep:
            for parent in self.parents.get(node, ()):
                lines.append(f'  "{dot_escape(node)}" -> "{dot_escape(parent)}";')
        lines.append("}")
        return "\n".join(lines) + "\n"


def _forms_of_json(text: str) -> tuple[set[str], set[str]]:
    """The reprs (as an entity keeps them) and the :func:`data_digest` of the values that result ``text`` may be,
    written as JSON by ``--results``: its record's ``data``, and the whole (a result may be a dict such as a record,
    or ``text`` that record's ``data``). JSON has arrays where the value may have had tuples (both are tried), and
    lists for numpy's arrays (found by the digest, which a result keeps). None if ``text`` is not JSON, or is nested
    deeper than Python recurses."""
    try:
        value = json.loads(text)
        values = (
            [value["data"], value] if isinstance(value, dict) and {"pe", "output", "data"} <= value.keys() else [value]
        )
        reprs = {value_repr(one) for candidate in values for one in (candidate, _tuples(candidate))}
        return reprs, {data_digest(candidate) for candidate in values}
    except (ValueError, RecursionError):
        return set(), set()


def _tuples(value: Any) -> Any:
    """``value`` with each list in it, at any depth, a tuple."""
    if isinstance(value, list):
        return tuple(_tuples(one) for one in value)
    if isinstance(value, dict):
        return {key: _tuples(one) for key, one in value.items()}
    return value


def read_lineage(path: str) -> Lineage:
    """Read a PROV-JSON (or ``.xml``, or ``.provn`` where ``prov`` reads PROV-N) file written by aiod4p.

    PROV-JSON is read as JSON (:func:`_json_lineage`): ``prov`` took 28 s and 1 GB to read a 54 MB document
    that the JSON parser reads in 2 s; PROV-XML and PROV-N are read with ``prov``.

    Raises:
        Aiod4pError: the file is missing or is not a PROV document (named, with what is wrong in it).
    """
    fmt = FORMATS.get(os.path.splitext(path)[1].lower(), "json")
    if fmt == "json":
        document = _read_json(path)
        try:
            return _json_lineage(document)
        except ValueError as exc:
            raise Aiod4pError(f"{path} is not a PROV document: {exc}") from exc
    try:
        doc = _prov().ProvDocument.deserialize(source=path, format=fmt)
    except NotImplementedError:  # a prov that writes PROV-N but does not read it (older releases)
        raise Aiod4pError(
            f"{path}: this prov reads PROV-JSON and PROV-XML back, not PROV-N; record a .json file"
        ) from None
    except OSError as exc:
        raise Aiod4pError(f"cannot read provenance file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise Aiod4pError(f"{path} is not a PROV document: {type(exc).__name__}: {exc}") from exc
    return _prov_lineage(doc)


def _read_json(path: str) -> object:
    """The JSON value in file ``path``.

    Raises:
        Aiod4pError: the file cannot be read, or is not JSON (named, with the parser's reason).
    """
    try:
        with open(path, "rb") as file:
            return json.load(file)
    except OSError as exc:
        raise Aiod4pError(f"cannot read provenance file {path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays or objects nested too deep to parse
        raise Aiod4pError(f"{path} is not a PROV document: it is not JSON ({exc})") from exc


def _prov_lineage(doc: ProvDocument) -> Lineage:
    """The lineage of a document read by ``prov``."""
    model = _prov()
    builder = _LineageBuilder()
    for record in doc.get_records():
        args = [str(a) if a is not None else "" for a in record.args]
        if isinstance(record, model.ProvEntity):
            attribute = record.get_attribute
            builder.entity(
                str(record.identifier),
                attribute("prov:value"),
                attribute("prov:type"),
                attribute(_RECALLED),
                attribute(_DIGEST),
            )
        elif isinstance(record, model.ProvDerivation):
            builder.derived.setdefault(args[0], []).append(args[1])
        elif isinstance(record, model.ProvGeneration):
            builder.generated_by[args[0]] = args[1]
        elif isinstance(record, model.ProvUsage):
            builder.used.setdefault(args[0], []).append(args[1])
        elif isinstance(record, model.ProvAssociation):
            builder.associated[args[0]] = args[1]
        elif isinstance(record, model.ProvAgent):
            builder.lineage.restored.update(int(v) for v in record.get_attribute(_RESTORED))
    return builder.built()


def _json_lineage(document: object) -> Lineage:
    """The lineage of a PROV-JSON document, as :func:`_prov_lineage` reads it.

    Raises:
        ValueError: ``document`` is not a PROV-JSON document of the shape aiod4p reads; the message says where
            and what is wrong (``entity 'e1' is a number, not an object of attributes ...``).
    """
    if not isinstance(document, dict):
        raise ValueError(f"a PROV-JSON document is an object, not {_json_kind(document)}")
    builder = _LineageBuilder()
    for identifier, attributes, where in _json_records(document, "entity"):
        builder.entity(
            identifier,
            _json_values(attributes, "prov:value", where),
            _json_values(attributes, "prov:type", where),
            _json_values(attributes, _RECALLED, where),
            _json_values(attributes, _DIGEST, where),
        )
    for _, attributes, where in _json_records(document, "wasDerivedFrom"):
        entity = _json_term(attributes, "prov:generatedEntity", where, required=True)
        builder.derived.setdefault(entity, []).append(_json_term(attributes, "prov:usedEntity", where, required=True))
    for _, attributes, where in _json_records(document, "wasGeneratedBy"):
        activity = _json_term(attributes, "prov:activity", where, required=False)
        builder.generated_by[_json_term(attributes, "prov:entity", where, required=True)] = activity
    for _, attributes, where in _json_records(document, "used"):
        entity = _json_term(attributes, "prov:entity", where, required=False)
        builder.used.setdefault(_json_term(attributes, "prov:activity", where, required=True), []).append(entity)
    for _, attributes, where in _json_records(document, "wasAssociatedWith"):
        agent = _json_term(attributes, "prov:agent", where, required=False)
        builder.associated[_json_term(attributes, "prov:activity", where, required=True)] = agent
    for _, attributes, where in _json_records(document, "agent"):
        for value in _json_values(attributes, _RESTORED, where):
            try:
                builder.lineage.restored.add(int(value))
            except ValueError:
                raise ValueError(f"the {_RESTORED!r} of {where} is {value!r}, not a checkpoint number") from None
    return builder.built()


def _json_records(document: dict[str, Any], kind: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """The records of ``kind`` in a PROV-JSON document: (identifier, attributes, what names the record in an
    error), one per record where several share an identifier (a list of attribute objects).

    Raises:
        ValueError: the records of ``kind`` are not an object of records by identifier, or a record is not an
            object of attributes.
    """
    records = document.get(kind, {})
    if not isinstance(records, dict):
        raise ValueError(f"its {kind!r} is {_json_kind(records)}, not an object of records by identifier")
    for identifier, attributes in records.items():
        where = f"{kind} {identifier!r}"
        for one in attributes if isinstance(attributes, list) else [attributes]:
            if not isinstance(one, dict):
                raise ValueError(f"{where} is {_json_kind(one)}, not an object of attributes (or a list of them)")
            yield identifier, one, where


def _json_term(attributes: dict[str, Any], name: str, where: str, *, required: bool) -> str:
    """The identifier attribute ``name`` of a relation names (its entity, activity, agent); ``""`` if it has
    none and need not.

    Raises:
        ValueError: the attribute is missing and ``required``, or is not a string.
    """
    value = attributes.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        if value is None:
            raise ValueError(f"{where} has no {name!r}")
        raise ValueError(f"the {name!r} of {where} is {_json_kind(value)}, not an identifier (a string)")
    return value


def _json_values(attributes: dict[str, Any], name: str, where: str) -> list[str]:
    """The values of attribute ``name`` as ``prov`` gives them as text: a typed value ``{"$": ..., "type": ...}``
    is its ``$``, several values are a list, a missing attribute (or ``null``) has none.

    Raises:
        ValueError: a value is not a string, number or boolean, typed or not.
    """
    value = attributes.get(name)
    if value is None:
        return []
    texts = []
    for one in value if isinstance(value, list) else [value]:
        typed = isinstance(one, dict)
        plain = one.get("$") if typed else one
        if not isinstance(plain, (str, int, float)):
            if not typed:
                what = _json_kind(one)
            elif "$" not in one:
                what = 'an object with no "$"'
            else:
                what = f'an object whose "$" is {_json_kind(plain)}'
            raise ValueError(
                f"the {name!r} of {where} holds {what}, not a value (a string, a number, a boolean, or an object"
                ' with the value in "$")'
            )
        texts.append(str(plain))
    return texts


def _json_kind(value: object) -> str:
    """What ``value``, parsed from JSON, is, as JSON names it: ``"a number"``, ``"an array"``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


_RECALLED = f"{NAMESPACE[0]}:recalled"
_DIGEST = f"{NAMESPACE[0]}:data_digest"
"""A result's attribute: the :func:`data_digest` of its value, by which ``--trace`` finds it by its ``--results``
line."""
_RESTORED = f"{NAMESPACE[0]}:restored_from_checkpoint"


class _LineageBuilder:
    """Collects a document's records, in any order, into a :class:`Lineage`."""

    def __init__(self) -> None:
        self.lineage = Lineage()
        self.derived: dict[str, list[str]] = {}
        self.generated_by: dict[str, str] = {}
        self.used: dict[str, list[str]] = {}
        self.associated: dict[str, str] = {}

    def entity(
        self,
        identifier: str,
        values: Iterable[object],
        kinds: Iterable[object],
        recalled: Iterable[object],
        digests: Iterable[object],
    ) -> None:
        self.lineage.values[identifier] = next((str(v) for v in values), "")
        self.lineage.kinds[identifier] = next((str(v) for v in kinds), "")
        digest = next((str(v) for v in digests), None)
        if digest is not None:
            self.lineage.digests[identifier] = digest
        if "nothing" in map(str, recalled):
            self.derived[identifier] = []  # written after recall() of states that held nothing

    def built(self) -> Lineage:
        lineage = self.lineage
        for entity in lineage.values:
            activity = self.generated_by.get(entity)
            parents = self.derived.get(entity)
            if parents is None:
                parents = self.used.get(activity, []) if activity is not None else []
            lineage.parents[entity] = parents
            if activity is not None:
                lineage.made_by[entity] = self.associated.get(activity, "?")
        return lineage
