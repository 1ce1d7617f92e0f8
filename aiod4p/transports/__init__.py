"""Transports: ordered, reliable message pipes (comms) between workers.

A transport knows nothing about PEs or groupings. Every backend implements
:class:`Comm` and passes the same conformance suite (``tests/conformance.py``).
Backends are found by name, like mappings, and imported only when asked for:
a new transport is a module with a :class:`Comm` subclass and a line in
:data:`TRANSPORTS`.
"""

from __future__ import annotations

from .._registry import load
from ._base import Comm
from .memory import MemoryComm, memory_comm_pair

__all__ = ["TRANSPORTS", "Comm", "MemoryComm", "get_transport", "memory_comm_pair"]

# name -> (module, Comm class, the extra that brings its dependencies)
TRANSPORTS: dict[str, tuple[str, str, str | None]] = {
    "memory": ("aiod4p.transports.memory", "MemoryComm", None),
    "pipes": ("aiod4p.transports.pipes", "PipeComm", None),
    "mpi": ("aiod4p.transports.mpi", "MpiComm", "mpi"),
    "ray": ("aiod4p.transports.ray", "RayComm", "ray"),
}


def get_transport(name: str) -> type[Comm]:
    """The comm class of the transport called ``name`` (its module is imported now).

    Raises:
        MappingUnavailable: no such transport, or its extra is not installed.
    """
    comm: type[Comm] = load("transport", name, TRANSPORTS)
    return comm
