"""Items on Storm's wire: JSON that round-trips every JSON-representable item exactly.

Storm's multilang protocol carries JSON, which Storm parses into Java values
(``Long``, ``Double``, ``String``, lists, maps) and writes back as JSON for the
next component. An item crosses unchanged when it is built from ``None``,
``bool``, ``int`` (64-bit), finite ``float``, ``str``, ``list``, ``tuple``
and ``dict`` with ``str`` keys. Tuples, which JSON lacks, travel as
``{"~t": [...]}``; a dict whose only key starts with ``~`` is wrapped as
``{"~d": {...}}`` so it is never mistaken for a tag. Anything else (bytes,
sets, objects, NaN, huge ints, lone surrogates) is rejected.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import TransportError

__all__ = ["WireError", "decode", "encode"]

_TUPLE = "~t"
_DICT = "~d"
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


class WireError(TransportError):
    """An item cannot cross Storm unchanged (nothing was sent); the message says where and why."""


def encode(item: Any) -> Any:
    """Return the JSON-ready form of ``item``.

    Raises:
        WireError: ``item`` (or a value inside it) is not JSON-representable.
    """
    return _encode(item, "item")


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
        return {name: decode(element) for name, element in value.items()}
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
