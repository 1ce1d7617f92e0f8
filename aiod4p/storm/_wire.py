"""Items on Storm's wire: JSON that round-trips every item exactly.

Storm's multilang protocol carries JSON, which Storm parses into Java values
(``Long``, ``Double``, ``String``, lists, maps) and writes back as JSON for the
next component. An item built from ``None``, ``bool``, ``int`` (64-bit), finite
``float``, ``str``, ``list``, ``tuple`` and ``dict`` with ``str`` keys travels
as that JSON, which a Java bolt can read too. Tuples, which JSON lacks, travel
as ``{"~t": [...]}``; a dict whose only key starts with ``~`` is wrapped as
``{"~d": {...}}`` so it is never mistaken for a tag. Any other item (a numpy
array, a dataclass, bytes, a set, NaN) travels pickled, as ``{"~p": base64}``,
for the topology's Python components only; one that cannot be pickled is
rejected. A grouping key travels as its stable hash (:func:`encode_key`), which
Storm's fields grouping then hashes.
"""

from __future__ import annotations

import base64
import math
import pickle
from typing import Any

from .._frames import short_repr
from .._groupings import stable_hash
from ..errors import TransportError

__all__ = ["WireError", "decode", "encode", "encode_key"]

_TUPLE = "~t"
_DICT = "~d"
_PICKLED = "~p"
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


class WireError(TransportError):
    """An item cannot cross Storm unchanged (nothing was sent); the message says where and why."""


def encode(item: Any) -> Any:
    """Return the JSON-ready form of ``item``: itself as JSON if it can be, else pickled.

    Raises:
        WireError: ``item`` is not JSON-representable, and cannot be pickled either.
    """
    try:
        return _encode(item, "item")
    except WireError as not_json:
        try:
            data = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickling runs the item's own reduction, which may raise anything
            raise WireError(f"{not_json}, and it cannot be pickled: {type(exc).__name__}: {exc}") from exc
        return {_PICKLED: base64.b64encode(data).decode("ascii")}


def encode_key(key: Any) -> int:
    """Return the field Storm groups by for grouping key ``key``: its :func:`~aiod4p.stable_hash`, as a JSON
    integer (63 bits, a Java ``Long``), so that keys Python holds equal (``1``, ``1.0`` and ``True``; one
    instant in two time zones) go to the same task whatever their type, as on every other mapping, and any
    key that can be grouped by elsewhere can be here.

    Raises:
        WireError: ``key`` cannot be hashed (its state cannot be read, as a lock's).
    """
    try:
        return stable_hash(key) >> 1
    except Exception as exc:  # a key's own reduction may raise anything
        raise WireError(f"the key {short_repr(key)} cannot be hashed: {type(exc).__name__}: {exc}") from exc


def _encode(value: Any, path: str) -> Any:
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise WireError(f"{path} is a str with a lone surrogate, which Storm cannot carry") from None
        return value
    if kind is int:
        if not _LONG_MIN <= value <= _LONG_MAX:
            raise WireError(f"{path} is an int outside the 64-bit range Storm carries: {value}")
        return value
    if kind is float:
        if not math.isfinite(value):
            raise WireError(f"{path} is {value}, which JSON cannot represent")
        return value
    if kind is list:
        return [_encode(element, f"{path}[{index}]") for index, element in enumerate(value)]
    if kind is tuple:
        return {_TUPLE: [_encode(element, f"{path}[{index}]") for index, element in enumerate(value)]}
    if kind is dict:
        encoded: dict[str, Any] = {}
        for key, element in value.items():
            if type(key) is not str:
                raise WireError(f"{path} is a dict with a {type(key).__name__} key {key!r}; JSON keys are str")
            encoded[_encode(key, f"{path} key")] = _encode(element, f"{path}[{key!r}]")
        if len(encoded) == 1 and next(iter(encoded)).startswith("~"):
            return {_DICT: encoded}
        return encoded
    raise WireError(f"{path} is a {kind.__name__} ({_short(value)}), which is not JSON-representable")


def decode(value: Any) -> Any:
    """Invert :func:`encode` on a value read back from JSON."""
    if isinstance(value, list):
        return [decode(element) for element in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, inner),) = value.items()
            if key == _TUPLE:
                return tuple(decode(element) for element in inner)
            if key == _DICT:
                return {name: decode(element) for name, element in inner.items()}
            if key == _PICKLED:
                return pickle.loads(base64.b64decode(inner))
        return {name: decode(element) for name, element in value.items()}
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
