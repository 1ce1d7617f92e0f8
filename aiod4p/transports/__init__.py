"""Transports: ordered, reliable message pipes (comms) between workers.

A transport knows nothing about PEs or groupings. Every backend passes the
same conformance suite (``tests/test_transports.py``).
"""

from ._base import Comm
from .memory import MemoryComm, memory_comm_pair

__all__ = ["Comm", "MemoryComm", "memory_comm_pair"]
