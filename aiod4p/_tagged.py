"""An item with its provenance id, as it travels between instances at provenance level ``item``.

A module of its own, importing nothing of aiod4p: what measures items (:mod:`aiod4p._sizes`) must see through it,
and :mod:`aiod4p._provenance`, which makes them, imports what measures items.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Tagged"]


class Tagged:
    """An item with its provenance id, as it travels between instances at level ``item``."""

    __slots__ = ("id", "value")

    def __init__(self, id: str, value: Any) -> None:
        self.id = id
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (Tagged, (self.id, self.value))

    def __repr__(self) -> str:
        return f"Tagged({self.id!r}, {self.value!r})"
