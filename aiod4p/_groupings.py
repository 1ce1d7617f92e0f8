"""Groupings: which destination instance(s) receive an item.

A grouping is pure: given an item and the number of destination instances it
names the destination indices. Group-by hashes a canonical encoding of the
key with blake2b, so the same key reaches the same instance in every process.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = [
    "ALL",
    "GLOBAL",
    "SHUFFLE",
    "All",
    "Global",
    "GroupBy",
    "Grouping",
    "GroupingLike",
    "Shuffle",
    "as_grouping",
    "group_by",
    "stable_hash",
]


@dataclass(frozen=True)
class Shuffle:
    """Any one instance; the router balances load (the default)."""

    def __str__(self) -> str:
        return "shuffle"


@dataclass(frozen=True)
class All:
    """Every instance receives every item (broadcast)."""

    def __str__(self) -> str:
        return "all"


@dataclass(frozen=True)
class Global:
    """A single instance (index 0) receives every item."""

    def __str__(self) -> str:
        return "global"


@dataclass(frozen=True)
class GroupBy:
    """Items with equal keys reach the same instance.

    The key is either the tuple of ``item[i]`` for the given ``indices`` or
    ``key(item)``. A key function must be picklable (a module-level function)
    for mappings that run in several processes.
    """

    indices: tuple[int | str, ...] = ()
    key: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if bool(self.indices) == (self.key is not None):
            raise ValueError("group_by needs either key indices or a key function, not both")

    def key_of(self, item: Any) -> Any:
        """Return the grouping key of ``item``.

        Raises:
            LookupError, TypeError: the item has no such index.
        """
        if self.key is not None:
            return self.key(item)
        return tuple(item[i] for i in self.indices)

    def __str__(self) -> str:
        if self.key is not None:
            return f"group_by({getattr(self.key, '__name__', 'key')})"
        return f"group_by{list(self.indices)}"


Grouping: TypeAlias = Shuffle | All | Global | GroupBy
GroupingLike: TypeAlias = Grouping | str | Sequence[int | str] | None

SHUFFLE = Shuffle()
ALL = All()
GLOBAL = Global()


def group_by(*indices: int | str, key: Callable[[Any], Any] | None = None) -> GroupBy:
    """Group items by ``item[i]`` for each index, or by ``key(item)``."""
    return GroupBy(tuple(indices), key)


def as_grouping(value: GroupingLike) -> Grouping:
    """Coerce dispel4py-style grouping values into a :data:`Grouping`.

    Accepts a grouping object, ``None`` or ``"shuffle"``, ``"all"``,
    ``"global"``, or a list/tuple of key indices.

    Raises:
        ValueError: the value is none of those.
    """
    if value is None:
        return SHUFFLE
    if isinstance(value, (Shuffle, All, Global, GroupBy)):
        return value
    if isinstance(value, str):
        named: dict[str, Grouping] = {"shuffle": SHUFFLE, "all": ALL, "global": GLOBAL, "one_to_all": ALL}
        try:
            return named[value.lower()]
        except KeyError:
            raise ValueError(
                f"unknown grouping {value!r}: expected 'shuffle', 'all', 'global' or key indices"
            ) from None
    if isinstance(value, (list, tuple)) and value:
        return GroupBy(tuple(value))
    raise ValueError(f"unknown grouping {value!r}: expected 'shuffle', 'all', 'global' or key indices")


def _encode(value: Any, out: bytearray) -> None:
    # A canonical, process-independent encoding of the common key types.
    if value is None:
        out += b"N"
    elif value is True or value is False:
        out += b"T" if value else b"F"
    elif isinstance(value, int):
        text = str(value).encode()
        out += b"i" + struct.pack("<I", len(text)) + text
    elif isinstance(value, float):
        if value.is_integer() and abs(value) < 2**63:
            _encode(int(value), out)  # 1.0 and 1 are equal keys, so they hash alike
        else:
            out += b"f" + struct.pack("<d", value)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out += b"s" + struct.pack("<I", len(data)) + data
    elif isinstance(value, (bytes, bytearray)):
        out += b"b" + struct.pack("<I", len(value)) + bytes(value)
    elif isinstance(value, (tuple, list)):
        out += b"t" + struct.pack("<I", len(value))
        for element in value:
            _encode(element, out)
    elif isinstance(value, (frozenset, set)):
        parts = sorted(_encoded(element) for element in value)
        out += b"S" + struct.pack("<I", len(parts)) + b"".join(parts)
    elif isinstance(value, dict):
        pairs = sorted(_encoded(k) + _encoded(v) for k, v in value.items())
        out += b"d" + struct.pack("<I", len(pairs)) + b"".join(pairs)
    else:
        data = pickle.dumps(value, protocol=5)
        out += b"p" + struct.pack("<I", len(data)) + data


def _encoded(value: Any) -> bytes:
    out = bytearray()
    _encode(value, out)
    return bytes(out)


def stable_hash(key: Any) -> int:
    """A 64-bit hash of ``key`` that is identical in every process and run."""
    return int.from_bytes(hashlib.blake2b(_encoded(key), digest_size=8).digest(), "little")
