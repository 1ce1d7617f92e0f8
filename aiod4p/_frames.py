"""Where in a traceback the workflow's own code is (not aiod4p's, not an installed package's, not Python's), and
what it was called with, shown short; which code is installed (:func:`installed`)."""

from __future__ import annotations

import dataclasses
import enum
import os
import reprlib
import site
import sys
import sysconfig
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "called_with",
    "importing_workflow_code",
    "installed",
    "installed_directories",
    "running_in",
    "short_repr",
    "workflow_frame",
]

_OURS = os.path.normcase(str(Path(__file__).resolve().parent)) + os.sep
_installed_cache: tuple[object, tuple[str, ...]] | None = None


def installed_directories() -> tuple[str, ...]:
    """The directories that hold installed code, each normalised (:func:`os.path.normcase`) and ending in a
    separator, as given and resolved (symbolic links): :func:`installed` tells whether a file is in one.

    Installed code is what an interpreter with the same packages installed imports by name without being given
    the file, so it is not the workflow's own code:

    - the standard library: ``sysconfig``'s ``stdlib`` and ``platstdlib`` (``lib-dynload`` in them), and its
      zip archive on ``sys.path`` (``pythonXY.zip``);
    - the site directories: ``sysconfig``'s ``purelib`` and ``platlib`` (a virtual environment's
      site-packages), :func:`site.getsitepackages` (a system Python's ``dist-packages``, ``/usr/local`` ones
      too) and the user's site-packages when Python reads it;
    - any other directory on ``sys.path`` that holds an installed distribution's metadata (a ``*.dist-info``
      directory): ``pip install --target DIR``, or a directory of libraries put on ``PYTHONPATH``. Not
      ``*.egg-info``, which an editable install (``setup.py develop``) leaves in the project's own directory.

    Any other directory on ``sys.path`` (the workflow file's own, a directory of the user's modules on
    ``PYTHONPATH``) holds the workflow's own code. That is what error messages point at (:func:`workflow_frame`),
    what multi and mpi ship to workers that cannot import it by name (:func:`aiod4p._loading.ship_code`), and
    what a Storm topology carries to its workers (``aiod4p.storm``), which have only what is installed on them.
    One rule for all three: a library the user installed (with pip, into any of those) is installed where the
    workflow runs too, or is theirs to install there like any requirement; their own modules are not.

    Computed again when ``sys.path``, the site directories or the working directory change.
    """
    global _installed_cache
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    key = (tuple(sys.path), tuple(site.getsitepackages()), user, os.getcwd())
    if _installed_cache is not None and _installed_cache[0] == key:
        return _installed_cache[1]
    paths = sysconfig.get_paths()
    directories = [paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib") if name in paths]
    directories += [*key[1], *([user] if user else [])]
    stdlib_zip = f"python{sys.version_info[0]}{sys.version_info[1]}.zip"
    for entry in key[0]:
        if os.path.basename(entry) == stdlib_zip or _holds_distributions(entry):
            directories.append(entry)
    found: dict[str, None] = {}
    for directory in directories:
        absolute = os.path.abspath(directory)
        for form in (absolute, os.path.realpath(absolute)):
            found[os.path.join(os.path.normcase(form), "")] = None
    _installed_cache = (key, tuple(found))
    return _installed_cache[1]


def _holds_distributions(entry: str) -> bool:
    try:
        with os.scandir(entry or os.curdir) as entries:
            return any(item.name.endswith(".dist-info") and item.is_dir() for item in entries)
    except OSError:  # missing, not a directory (a zip archive), unreadable
        return False


def installed(path: str | os.PathLike[str], directories: tuple[str, ...] | None = None) -> bool:
    """Whether the file at ``path`` is installed code (see :func:`installed_directories`, which ``directories``
    are unless given): in the standard library, a site directory, or a directory of installed distributions on
    ``sys.path``, as given or resolved."""
    where = directories if directories is not None else installed_directories()
    absolute = os.path.abspath(path)
    if os.path.normcase(absolute).startswith(where):
        return True
    resolved = os.path.normcase(os.path.realpath(absolute))
    return resolved.startswith(where)


def workflow_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The last frame of the workflow's own code that ``exc`` passed (not aiod4p's, not an installed
    package's, not Python's), or ``None`` when it passed none."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if _is_workflows(frame.filename)]
    return frames[-1] if frames else None


def running_in(thread: int) -> str | None:
    """What thread ``thread`` (an ident) runs now, as a message says what holds its event loop: ``a PE (FUNCTION,
    FILE line N)``, the innermost frame of the workflow's own code on its stack; ``the writing of a result`` when
    aiod4p's writer of results is nearer the top of it; ``None`` when neither is on it."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        filename = frame.f_code.co_filename
        if frame.f_globals.get("__name__") == "aiod4p._results":
            return "the writing of a result"
        if not filename.startswith("<") and _is_workflows(filename):  # not code made at run time (dataclasses')
            return f"a PE ({frame.f_code.co_name}, {os.path.basename(filename)} line {frame.f_lineno})"
        frame = frame.f_back
    return None


def called_with(exc: BaseException) -> str | None:
    """``name=value`` for the first argument (after ``self``) of the first workflow frame that ``exc`` passed:
    the item, or the dict of inputs, that aiod4p called a PE's method with, followed by ``given to FUNCTION``
    when ``exc`` came out of a later frame (its place names that one); ``None`` when the frame takes none.
    The value is as the frame last held it (:func:`short_repr`)."""
    trace = _workflows_from(exc.__traceback__)
    if trace is None:
        return None
    code = trace.tb_frame.f_code
    names = [name for name in code.co_varnames[: code.co_argcount] if name != "self"]
    if not names or names[0] not in trace.tb_frame.f_locals:
        return None
    later = _workflows_from(trace.tb_next)
    shown = f"{names[0]}={short_repr(trace.tb_frame.f_locals[names[0]])}"
    return shown if later is None else f"{shown} given to {code.co_name}"


def _workflows_from(trace: TracebackType | None) -> TracebackType | None:
    """The first entry of ``trace``, from this one on, in the workflow's own code."""
    while trace is not None and not _is_workflows(trace.tb_frame.f_code.co_filename):
        trace = trace.tb_next
    return trace


def importing_workflow_code() -> bool:
    """Whether the body of a module of the workflow's own code runs on this thread's stack: an import of it
    is under way (the caller runs as part of it). The program's own ``__main__`` is run, not imported: every
    rank's script under ``mpiexec -n N python script.py``, which may start one run after another."""
    frame = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "<module>"
            and _is_workflows(frame.f_code.co_filename)
            and frame.f_globals.get("__name__") != "__main__"
        ):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


# Modules whose types show themselves in a few characters (numpy summarises large arrays itself).
_SHOWN_BY_THEIR_REPR = frozenset({"builtins", "numpy", "datetime", "decimal", "fractions", "uuid", "pathlib"})


class _ShortRepr(reprlib.Repr):
    """:mod:`reprlib`'s limits, bytes cut before they are shown (``reprlib`` shows all of them first), and no
    object's own ``__repr__`` called (it may take long for a large object, or never return): a dataclass is
    shown by its fields (a named tuple too), an enum member by its name, a subclass of a built-in container as
    the container, numbers, dates and numpy arrays as they show themselves, any other object by its class."""

    def repr_instance(self, value: Any, level: int) -> str:
        kind = type(value)
        name = kind.__qualname__
        if kind.__module__ in _SHOWN_BY_THEIR_REPR:
            return super().repr_instance(value, level)
        if isinstance(value, enum.Enum):
            return f"{name}.{value.name}"
        if dataclasses.is_dataclass(value) or (isinstance(value, tuple) and hasattr(value, "_fields")):
            if level <= 0:
                return f"{name}(...)"
            if dataclasses.is_dataclass(value):
                names = [field.name for field in dataclasses.fields(value) if field.repr]
            else:
                names = list(value._fields)
            shown = [f"{field}={self.repr1(getattr(value, field), level - 1)}" for field in names[: self.maxtuple]]
            return f"{name}({', '.join(shown + ['...'] * (len(names) > self.maxtuple))})"
        for builtin, show in _CONTAINERS:
            if isinstance(value, builtin):
                return f"{name}({show(self, value, level)})"
        return f"<{name}>"

    def repr_bytes(self, value: bytes | bytearray, level: int) -> str:
        if len(value) <= self.maxother:
            return repr(value)
        half = self.maxother // 2
        shown = f"{repr(bytes(value[:half]))[:-1]}...{repr(bytes(value[-half:]))[2:]}"
        return shown if isinstance(value, bytes) else f"{type(value).__name__}({shown})"

    repr_bytearray = repr_bytes


_CONTAINERS: tuple[tuple[type, Callable[[reprlib.Repr, Any, int], str]], ...] = (
    (dict, reprlib.Repr.repr_dict),
    (list, reprlib.Repr.repr_list),
    (tuple, reprlib.Repr.repr_tuple),
    (set, reprlib.Repr.repr_set),
    (frozenset, reprlib.Repr.repr_frozenset),
)
"""Subclasses of the built-in containers (OrderedDict, Counter, ...): shown as their base is, with their name."""

_SHORT = _ShortRepr()


def short_repr(value: Any) -> str:
    """``value`` shown in a message: a few of its elements and characters, whatever its size; never raises."""
    try:
        return _SHORT.repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the error being reported
        return f"<{type(value).__name__} whose repr raised {type(exc).__name__}>"


def _is_workflows(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen ...>, <string>, <stdin>: not a file
        return not filename.startswith("<frozen")
    return not os.path.normcase(os.path.abspath(filename)).startswith(_OURS) and not installed(filename)
