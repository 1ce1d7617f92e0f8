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
from typing import Any, TextIO

__all__ = ["PEFormatter", "configure_logging", "launcher_logging", "logging_environment"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(where)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"

# How the command line configured logging (-v, -q), for the processes a run starts that do not inherit it.
_LOGGING_VARIABLE = "AIOD4P_LOGGING"
_configured: tuple[int, bool] | None = None
_workflow_configured = False  # a workflow's basicConfig was honoured since configure_logging: later ones do nothing
_basic_config = logging.basicConfig  # Python's own: configure_logging puts _workflow_basic_config in its place


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
    global _configured, _workflow_configured
    _configured, _workflow_configured = (verbosity, quiet), False
    handler = _CurrentStderrHandler()
    handler.setFormatter(PEFormatter(LOG_FORMAT, DATE_FORMAT))
    handler.setLevel(logging.ERROR if quiet else logging.NOTSET)  # -q: a workflow's own log file still gets its level
    _basic_config(level=level, handlers=[handler], force=True)
    logging.getLogger("aiod4p.pe").setLevel(pe_level)
    logging.getLogger("aiod4p").setLevel(logging.NOTSET)  # as the root logger (a workflow's basicConfig may set it)
    logging.basicConfig = _workflow_basic_config


def _workflow_basic_config(**kwargs: Any) -> None:
    """``logging.basicConfig`` in a process whose logging :func:`configure_logging` set up (the command line, its
    workers and ranks), where Python's would do nothing, the root logger having a handler: a workflow that
    configures its logging as it imports (``logging.basicConfig(level=logging.INFO)``) gets what it asks for,
    as under dispel4py. Its level, when lower, becomes the root logger's (aiod4p's own loggers keep the level
    they had), and the destinations it names other than stderr (``filename=``, a ``stream``, ``handlers``) are
    added; its messages on stderr go through aiod4p's handler, in aiod4p's format (under ``-q``: errors only).
    With ``force=True``, or once the root logger holds no handler of aiod4p's, Python's own. As Python's, it
    does nothing once it has configured logging (a PE's ``preprocess`` calling it once per instance).
    """
    global _workflow_configured
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if isinstance(handler, _CurrentStderrHandler)]
    if kwargs.get("force") or not ours:
        _basic_config(**kwargs)
        return
    if _workflow_configured:
        return
    _workflow_configured = True
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    try:
        _basic_config(**kwargs)  # makes the handlers and sets the level the workflow asked for
    finally:
        made, asked = root.handlers[:], root.level
        root.handlers = handlers
        root.setLevel(level)
    for handler in made:
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__):
            continue  # stderr: aiod4p's handler writes there already
        root.addHandler(handler)
    if "level" in kwargs and asked < level:
        own = logging.getLogger("aiod4p")
        if own.level == logging.NOTSET:
            own.setLevel(level)
        root.setLevel(asked)


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
