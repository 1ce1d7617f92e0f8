"""The inputs of a run, with dispel4py's semantics."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

from ._engine import Feed
from ._graph import FlatGraph
from ._pe import PE
from .errors import InputError

__all__ = ["Inputs", "find_pe", "parse_cli_inputs", "resolve_inputs"]

logger = logging.getLogger("aiod4p.inputs")

Inputs: TypeAlias = Mapping[Any, Feed] | int | None


def resolve_inputs(graph: FlatGraph, inputs: Inputs) -> dict[str, Feed]:
    """Give every root PE its feed.

    ``inputs`` is ``None`` (every root is called once), an ``int`` N (every
    root is called N times with no input), or a mapping whose keys are PEs, PE
    ids or PE names and whose values are counts or (async) iterables of input
    dicts. Roots not named in a mapping are called once if they have no input
    ports, and get nothing otherwise (as in dispel4py).

    Raises:
        InputError: a key names no PE, is ambiguous, or names a PE that is not
            a root, or that another key names too (its name and its id, say);
            a value is neither a count nor an iterable.
    """
    roots = graph.roots()
    if inputs is None:
        return dict.fromkeys(roots, 1)
    if isinstance(inputs, (bool, int)):
        _check_count("every root", inputs)
        return dict.fromkeys(roots, int(inputs))
    if not isinstance(inputs, Mapping):
        raise InputError(f"inputs must be a count or a mapping of PE to input, not {type(inputs).__name__}")
    feeds: dict[str, Feed] = {}
    keys: dict[str, Any] = {}
    for key, value in inputs.items():
        pe_id = find_pe(graph, key)
        if pe_id not in roots:
            raise InputError(f"PE {pe_id} is not a root of the graph (its inputs are connected); it cannot take input")
        if pe_id in keys:
            raise InputError(f"input keys {keys[pe_id]!r} and {key!r} both name PE {pe_id}; give its input once")
        keys[pe_id] = key
        feeds[pe_id] = _check_feed(pe_id, value)
        _warn_unknown_ports(graph.pes[pe_id], pe_id, value)
    for pe_id in roots:
        if pe_id not in feeds and not graph.pes[pe_id]._input_ports:
            feeds[pe_id] = 1
    return feeds


def find_pe(graph: FlatGraph, key: Any, given_as: str = "input key") -> str:
    """The id of the PE of ``graph`` that ``key`` names (a PE, a PE id or a PE name).

    Raises:
        InputError: ``key`` names no PE, several, or a composite; the message calls it ``given_as``
            (``--stdin``, say).
    """
    if isinstance(key, PE):
        if key.id in graph.pes and graph.pes[key.id] is key:
            return key.id
        if key.id in graph.composites:
            _refuse_composite(graph, key.id)
        raise InputError(f"PE {key.label} given as {given_as} is not in the graph")
    if not isinstance(key, str):
        raise InputError(f"{given_as} must be a PE, a PE id or a PE name, not {key!r}")
    if key in graph.pes:
        return key
    if key in graph.composites:
        _refuse_composite(graph, key)
    named = [pe_id for pe_id, pe in graph.pes.items() if pe.name == key]
    if len(named) == 1:
        return named[0]
    if named:
        raise InputError(f"{given_as} {key!r} names several PEs ({', '.join(named)}); use the PE id")
    raise InputError(f"{given_as} {key!r} names no PE of the graph (roots: {_listing(graph, graph.roots())})")


def _listing(graph: FlatGraph, pe_ids: Iterable[str]) -> str:
    """``pe_ids`` as a user may give them: each PE's name and its id (``parse (parse3)``), or the id alone
    when the name is the id or another PE has it too; ``none`` for no PEs."""
    names = Counter(pe.name for pe in graph.pes.values())
    shown = []
    for pe_id in pe_ids:
        name = graph.pes[pe_id].name
        shown.append(f"{name} ({pe_id})" if name != pe_id and names[name] == 1 else pe_id)
    return ", ".join(shown) or "none"


def _refuse_composite(graph: FlatGraph, composite: str) -> None:
    roots = [pe_id for pe_id in graph.composites[composite] if pe_id in graph.roots()]
    raise InputError(
        f"PE {composite} is a composite, which never runs itself; give the input to its inner root"
        f" ({_listing(graph, roots)})"
    )


def _warn_unknown_ports(pe: PE, pe_id: str, value: Any) -> None:
    """Warn when an input dict in the list ``value`` for a dispel4py PE with input ports names none of them
    (``{"inptu": ...}``): it is handed to ``process`` as it is, as dispel4py does, where it may fail far
    from the misspelt key."""
    ports = pe._input_ports
    if not pe.takes_undeclared_inputs or not ports or not isinstance(value, (list, tuple)):
        return
    for element in value:
        if isinstance(element, dict) and element and not element.keys() & ports.keys():
            logger.warning(
                "the input for PE %s names %s, none of its input ports (%s); its process() gets it as it is",
                pe_id,
                ", ".join(map(repr, element)),
                ", ".join(map(repr, ports)),
            )
            return


def _check_count(what: str, value: int) -> None:
    if value < 0:
        raise InputError(f"the number of iterations for {what} must not be negative, not {value}")


def _check_feed(pe_id: str, value: Any) -> Feed:
    if isinstance(value, bool):
        raise InputError(f"input for PE {pe_id} must be a count or a list of inputs, not {value!r}")
    if isinstance(value, int):
        _check_count(f"PE {pe_id}", value)
        return value
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Iterable, AsyncIterable)):
        raise InputError(f"input for PE {pe_id} must be a count or a list of inputs, not {value!r}")
    return value


def parse_cli_inputs(iterations: int | None, data: str | None, file: str | None) -> Inputs:
    """Build inputs from ``-i N``, ``-d JSON`` and ``-f FILE``; ``-f`` wins over ``-d``, which wins over ``-i``.

    Raises:
        InputError: the JSON is malformed, the file cannot be read, or the
            content is not an object of counts and lists.
    """
    if file is not None:
        path = Path(file)
        try:
            content = path.read_bytes()  # json finds its encoding (UTF-8, a BOM, UTF-16): not the locale's
        except OSError as exc:
            raise InputError(f"cannot read input file {file}: {exc.strerror or exc}") from exc
        return _parse_json(content, f"input file {file}")
    if data is not None:
        return _parse_json(data, "-d")
    if iterations is not None:
        _check_count("-i", iterations)
    return iterations


def _parse_json(text: str | bytes, origin: str) -> Mapping[str, Feed]:
    try:
        value = json.loads(text)
    except ValueError as exc:  # malformed JSON, or bytes that are not text in the encoding they start like
        raise InputError(f"{origin} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InputError(f"{origin} must be a JSON object {{PE: count or list of inputs}}, not {type(value).__name__}")
    for key, feed in value.items():
        if isinstance(feed, list):
            continue
        if not isinstance(feed, int) or isinstance(feed, bool):
            raise InputError(f"{origin}: the input for {key!r} must be a count or a list, not {feed!r}")
    return value
