"""Logging set-up for the command line: every record names its PE instance.

The engine binds a :class:`logging.LoggerAdapter` with ``extra={"pe": ...,
"instance": ...}`` to every running PE (``aiod4p.pe`` logger), and
:meth:`PE.log` routes there, so a record from a PE carries its id and
instance index; the formatter here shows them as ``PE[instance]``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

__all__ = ["PEFormatter", "configure_logging", "launcher_logging", "logging_environment"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(where)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"

# How the command line configured logging (-v, -q), for the processes a run starts that do not inherit it.
_LOGGING_VARIABLE = "AIOD4P_LOGGING"
_configured: tuple[int, bool] | None = None


class PEFormatter(logging.Formatter):
    """Formats ``%(where)s`` as `` PE[instance]`` for records of a PE, and as nothing otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        pe = getattr(record, "pe", None)
        record.where = "" if pe is None else f" {pe}[{getattr(record, 'instance', 0)}]"
        return super().format(record)


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record.

    A live progress display replaces ``sys.stderr`` with a proxy that prints
    above the display; a handler bound to the original stream would tear it.
    """

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always the current sys.stderr


def configure_logging(verbosity: int = 0, quiet: bool = False) -> None:
    """Configure the root logger for the command line (replacing its handlers).

    Levels: ``quiet`` shows errors only; by default warnings, and the
    messages PEs log with :meth:`PE.log` (INFO and above on ``aiod4p.pe``);
    ``verbosity`` 1 (``-v``) shows INFO of every logger, 2 or more (``-vv``)
    DEBUG.
    """
    if quiet:
        level, pe_level = logging.ERROR, logging.ERROR
    elif verbosity >= 2:
        level = pe_level = logging.DEBUG
    elif verbosity == 1:
        level = pe_level = logging.INFO
    else:
        level, pe_level = logging.WARNING, logging.INFO
    global _configured
    _configured = (verbosity, quiet)
    handler = _CurrentStderrHandler()
    handler.setFormatter(PEFormatter(LOG_FORMAT, DATE_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("aiod4p.pe").setLevel(pe_level)


def logging_environment() -> dict[str, str]:
    """The environment a process started for a run (an MPI rank, a spawned worker) needs to log as this one does: the
    ``verbosity`` and ``quiet`` :func:`configure_logging` was given, if it was called (the command line);
    nothing else."""
    if _configured is None:
        return {}
    verbosity, quiet = _configured
    return {_LOGGING_VARIABLE: f"{verbosity},{int(quiet)}"}


def launcher_logging() -> tuple[int, bool] | None:
    """In a process started with :func:`logging_environment`: the ``verbosity`` and ``quiet`` the launcher's
    command line gave :func:`configure_logging` (``-q`` hides the PEs' messages, ``-v`` shows more), or ``None``
    when it gave none."""
    told = os.environ.get(_LOGGING_VARIABLE)
    if told is None:
        return None
    verbosity, _, quiet = told.partition(",")
    return int(verbosity) if verbosity.isdigit() else 0, quiet == "1"
