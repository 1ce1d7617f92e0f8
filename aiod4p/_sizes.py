"""How many bytes an item takes, guessed cheaply: what bounds batches, feeds and queues by bytes."""

from __future__ import annotations

import itertools
from typing import Any

from ._tagged import Tagged

__all__ = ["SCALARS", "approximate_batch_size", "approximate_size"]

SCALARS = frozenset({int, float, bool, type(None)})
"""Types whose values :func:`approximate_size` counts as 8 bytes at once, and a feed's byte bound as nothing
(a batch of them is far below any byte budget: a feed of numbers is not slowed down by measuring them)."""


def approximate_size(item: Any, depth: int = 2) -> tuple[int, int]:
    """A cheap guess of the bytes ``item`` takes to send (buffers, strings and small containers of them), and how
    many of them are in ``bytes`` objects (which the pipes hand to the socket without copying them first).

    A container's first 16 elements are measured and scaled by its length: a list of 500,000 floats
    counts as about 4 MB, whatever the cost of measuring it (16 elements, ``depth`` levels down).
    """
    kind = type(item)
    if kind in SCALARS:
        return 8, 0
    if kind is str:
        return len(item), 0
    if kind is bytes:
        return len(item), len(item)
    if kind is Tagged:  # an item with its provenance id (level item): it takes what its value takes
        return approximate_size(item.value, depth)
    nbytes = getattr(item, "nbytes", None)  # numpy arrays, memoryviews
    if isinstance(nbytes, int):
        return nbytes, 0
    if isinstance(item, (bytes, bytearray, str)):
        return len(item), 0
    if depth and isinstance(item, (tuple, list, dict)):
        elements = item[:16] if not isinstance(item, dict) else itertools.islice(item.values(), 16)
        size = in_bytes = 0
        for element in elements:
            # Strings and numbers, most containers' elements, without a call each.
            kind = type(element)
            if kind is str:
                size += len(element)
            elif kind in SCALARS:
                size += 8
            else:
                element_size, element_bytes = approximate_size(element, depth - 1)
                size += element_size
                in_bytes += element_bytes
        length = len(item)
        if length > 16:
            size, in_bytes = size * length // 16, in_bytes * length // 16
        return 8 + size, in_bytes
    return 8, 0


def approximate_batch_size(items: list[Any]) -> int:
    """A cheap guess of the bytes a batch of ``items`` takes: as many items as it holds like its last one (0 when
    empty); what bounds output buffers and results by bytes."""
    return len(items) * approximate_size(items[-1])[0] if items else 0
