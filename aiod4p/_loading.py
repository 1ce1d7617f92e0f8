"""Loading a workflow graph from a target: ``pkg.module[:attr]`` or ``file.py[:attr]``,
and shipping the code it needs to another interpreter (multi workers, MPI ranks)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ._frames import installed, installed_directories, workflow_frame
from ._graph import WorkflowGraph
from ._pe import CompositePE
from .errors import TargetError

__all__ = [
    "CodeShipment",
    "import_file",
    "in_worker",
    "load_graph",
    "load_module",
    "load_workflow",
    "preload",
    "quiet_import",
    "ship_code",
    "split_target",
]


def split_target(target: str) -> tuple[str, str | None]:
    """A target's module or file, and the attribute it names after a colon (``None`` when it names none).

    ``"C:\\x.py"`` has no attribute; ``"pkg.mod:graph"`` and ``"dir/x.py:graph"`` do.
    """
    head, sep, tail = target.rpartition(":")
    if sep and tail.isidentifier() and head and not head.endswith(("/", "\\")):
        return head, tail
    return target, None


def import_file(name: str, path: str | Path) -> ModuleType:
    """Import the Python file at ``path`` as module ``name`` (registered in ``sys.modules``).

    Raises:
        ImportError: ``path`` cannot be loaded as a module.
        Exception: whatever executing the module raises (it is then unregistered).
    """
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load module {name} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:
        sys.modules.pop(name, None)
        raise _exited(str(path), exc) from None
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


_worker = False


def in_worker() -> bool:
    """Whether this process is a worker that loaded a workflow's code (:meth:`CodeShipment.load`)."""
    return _worker


def quiet_import() -> contextlib.AbstractContextManager[object]:
    """Where a worker imports a workflow module: what the import prints, on stdout or stderr (warnings
    included), is dropped.

    The launcher imported the module first and printed it; a worker imports it
    again only to rebuild its PEs (a tutorial module printing its own run at
    import, or a library warning as it loads, would print once per worker otherwise).
    An error is still raised.
    """
    if not _worker:
        return contextlib.nullcontext()
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
    quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return quiet


def preload(target: str) -> None:
    """In a worker, import the module of ``target`` (as :func:`load_graph` names it) ahead of the job.

    A head start only: the worker imports while its launcher loads the same
    target, so the job's code is loaded when the job arrives. What the import
    prints is dropped, and so is an error: the launcher reports its own, and
    :meth:`CodeShipment.load` imports the module again if the job needs it.
    Marks the process as a worker (:func:`in_worker`).
    """
    global _worker
    _worker = True
    with contextlib.suppress(Exception), quiet_import():
        load_module(split_target(target)[0])


def _exited(workflow: str, exc: SystemExit) -> TargetError:
    return TargetError(
        f"workflow {workflow} exited (sys.exit({exc.code!r})) while being imported: a workflow module must"
        " define its graph, and run code only under `if __name__ == '__main__':`"
    )


@dataclass(frozen=True)
class CodeShipment:
    """What another interpreter needs before it can unpickle a workflow.

    Attributes:
        files: ``(module name, file)`` of the modules loaded from files that an
            import by name would not find there (``aiod4p run my-flow.py``
            imports ``my-flow.py`` as module ``workflow``).
        dispel4py: whether dispel4py's modules must come from aiod4p's
            compatibility layer (its import hook is installed here).
    """

    files: tuple[tuple[str, str], ...] = ()
    dispel4py: bool = False

    def load(self) -> None:
        """Install the import hook if needed, then import :attr:`files` under their names.

        Every worker process (multi, mpi) calls this before it unpickles its
        plan, which marks the process as a worker (:func:`in_worker`).

        Raises:
            TargetError: a file cannot be imported (or exits while being imported).
        """
        global _worker
        _worker = True
        if self.dispel4py:
            from . import compat  # only when the workflow needs it: the core never imports it otherwise

            compat.install()
        for name, path in self.files:
            if name in sys.modules:
                continue
            try:
                with quiet_import():
                    import_file(name, path)
            except TargetError:
                raise
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
                raise TargetError(f"importing workflow {path} failed{_where(exc)}: {failure}") from exc


def ship_code(payload: bytes) -> CodeShipment:
    """The code another interpreter must load before unpickling ``payload`` (a pickle).

    A top-level module the pickle names (classes and functions refer to their
    module by name, and so do dispel4py PEs, which travel as the names of their
    class) is shipped as its file when it was loaded from a file that an import
    by name would not find. The pickle is searched for the names of the modules
    that are not installed (:func:`~aiod4p._frames.installed`) only, each as a whole pickled
    string (module ``flow`` is not named by ``workflows``), so a large input
    costs a few byte searches per such module.
    """
    files = []
    directories = installed_directories()
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or name == "__main__" or "." in name or installed(path, directories):
            continue
        if not _names(payload, name):
            continue
        found = importlib.machinery.PathFinder.find_spec(name, sys.path)
        if found is None or found.origin != path:
            files.append((name, str(path)))
    compat = sys.modules.get("aiod4p.compat")
    return CodeShipment(tuple(files), bool(compat is not None and compat.installed()))


def _names(payload: bytes, name: str) -> bool:
    """Whether pickle ``payload`` holds ``name`` as a whole string: the operand of a string opcode, whose
    length prefix pins where it ends (protocols 4 and 5: ``STACK_GLOBAL`` takes the module's name so), or a
    ``GLOBAL`` opcode's module (protocols 0 to 3)."""
    text = name.encode()
    size = len(text)
    return (
        (size < 256 and b"\x8c" + bytes([size]) + text in payload)  # SHORT_BINUNICODE
        or b"X" + size.to_bytes(4, "little") + text in payload  # BINUNICODE
        or b"\x8d" + size.to_bytes(8, "little") + text in payload  # BINUNICODE8
        or b"c" + text + b"\n" in payload  # GLOBAL
    )


def _dispel4py_installed() -> bool:
    """Whether the real dispel4py is installed here (aiod4p's own ``dispel4py`` package is its compat layer)."""
    try:
        importlib.metadata.distribution("dispel4py")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def load_module(spec: str) -> ModuleType:
    """Import ``spec``: a dotted module name or the path of a ``.py`` file.

    A module is searched for in the current directory first, as ``python -m``
    does (the file's own directory is importable for a file).

    Raises:
        TargetError: the file or module does not exist or fails to import, or is a directory (a file path naming
            one, or a module name that finds only a directory without ``__init__.py``: a namespace package,
            which holds no code).
    """
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if path.is_dir():
            raise TargetError(f"workflow file {spec} is a directory: give the .py file of the workflow in it")
        if not path.is_file():
            raise TargetError(f"workflow file {spec} does not exist")
        if path.suffix == ".ipynb":
            raise TargetError(
                f"workflow file {spec} is a Jupyter notebook: run its graph with aiod4p.run() in a cell, or export"
                f" it (jupyter nbconvert --to script {spec}) and give the .py file"
            )
        directory = str(path.resolve().parent)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        try:
            return import_file(_module_name(path.resolve()), path.resolve())
        except TargetError:
            raise
        except Exception as exc:
            raise _import_failed(spec, exc, _in_package(path.resolve())) from exc
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # importable as under `python -m`, also from the console script
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(spec)
    except SystemExit as exc:
        raise _exited(spec, exc) from None
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            hint = (
                " (dispel4py's own modules, its examples too, load from an installed dispel4py, which has none"
                " such here: install dispel4py in this environment, or give the workflow's .py file)"
                if spec.startswith("dispel4py.") and not _dispel4py_installed()
                else ""
            )
            raise TargetError(f"no module named {spec!r}{hint}") from exc
        raise _import_failed(spec, exc) from exc
    except Exception as exc:
        raise _import_failed(spec, exc) from exc
    if getattr(module, "__file__", None) is None and hasattr(module, "__path__"):
        directories = ", ".join(dict.fromkeys(module.__path__))  # a directory once, though found twice on sys.path
        raise TargetError(f"workflow {spec} is a directory ({directories}): give the .py file of the workflow in it")
    return module


def _import_failed(spec: str, exc: Exception, package: tuple[str, Path] | None = None) -> TargetError:
    """The error of importing the workflow ``spec``, which raised ``exc``; a module it imports that is
    missing gets a hint: the workflow needs a package this environment lacks. A file that is ``package``'s
    module (:func:`_in_package`) and imports relatively gets the command that imports it as that module."""
    hint = ""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        hint = (
            f" (is {exc.name.partition('.')[0]} installed in this environment, {sys.prefix}? see the workflow's"
            " documentation)"
        )
    elif package is not None and isinstance(exc, ImportError) and "relative import" in str(exc):
        name, root = package
        hint = (
            f" ({Path(spec).name} is module {name} of a package: run it by that name, cd {root} && aiod4p run {name})"
        )
    return TargetError(f"importing {spec} failed{_where(exc)}: {type(exc).__name__}: {exc}{hint}")


def _in_package(path: Path) -> tuple[str, Path] | None:
    """``(dotted module name, directory it is imported from)`` of the file ``path`` when it lies in a package
    (a directory with an ``__init__.py``); None otherwise."""
    names, directory = [path.stem], path.parent
    while (directory / "__init__.py").is_file():
        names.insert(0, directory.name)
        directory = directory.parent
    return (".".join(names), directory) if len(names) > 1 else None


_workflow_names: set[str] = set()  # the names workflow files were imported under (by _module_name)


def _module_name(path: Path) -> str:
    """The name the workflow file at ``path`` (resolved) is imported under.

    Its stem, as ``import`` would name it, unless the stem is no identifier
    (``my-flow.py``), names a module of Python's standard library, or names a
    module this process has imported already that is no workflow file
    (``signal.py``, ``statistics.py``: registering the file under that name
    would replace Python's module for every later import, the mappings' own
    included, and a worker that imported Python's would not load the
    workflow's); then ``workflow``.
    """
    stem = path.stem
    loaded = sys.modules.get(stem)
    if (
        not stem.isidentifier()
        or stem in sys.stdlib_module_names
        or (loaded is not None and stem not in _workflow_names and getattr(loaded, "__file__", None) != str(path))
    ):
        stem = "workflow"
    _workflow_names.add(stem)
    return stem


def _where(exc: BaseException) -> str:
    """`` at FILE, line N``: the last line of the workflow's own code that the error passed, if any."""
    frame = workflow_frame(exc)
    return f" at {frame.filename}, line {frame.lineno}" if frame else ""


def load_graph(target: str) -> WorkflowGraph:
    """Load the workflow graph named by ``target``.

    Without ``:attr`` the module must hold exactly one :class:`WorkflowGraph`
    that is not the graph of a composite inside another one.
    An attribute may also be a function returning a graph (called without arguments).

    Raises:
        TargetError: the module cannot be loaded, the attribute is missing or
            not a graph, the function raised, or the graph is not uniquely determined.
    """
    spec, attr = split_target(target)
    module = load_module(spec)
    if attr is not None:
        try:
            value = getattr(module, attr)
        except AttributeError:
            raise TargetError(f"{spec} has no attribute {attr!r}") from None
        if callable(value) and not isinstance(value, WorkflowGraph):
            try:
                value = value()
            except Exception as exc:
                raise TargetError(f"{spec}:{attr}() failed{_where(exc)}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(value, WorkflowGraph):
            raise TargetError(f"{spec}:{attr} is a {type(value).__name__}, not a WorkflowGraph")
        return value
    graphs = {name: value for name, value in vars(module).items() if isinstance(value, WorkflowGraph)}
    nested = {inner for graph in graphs.values() for inner in _nested_graphs(graph)}
    graphs = {name: graph for name, graph in graphs.items() if id(graph) not in nested}
    unique = {id(graph): name for name, graph in graphs.items()}
    if len(unique) == 1:
        return next(iter(graphs.values()))
    if not unique:
        raise TargetError(f"{spec} defines no WorkflowGraph; name one with {spec}:ATTR")
    names = ", ".join(sorted(graphs))
    raise TargetError(f"{spec} defines several workflow graphs ({names}); choose one with {spec}:ATTR")


def load_workflow(target: str) -> WorkflowGraph:
    """Load the workflow graph named by ``target`` as the command line does: :func:`load_graph`, with
    :mod:`aiod4p.compat` installed first, so that a dispel4py workflow runs unchanged.

    Raises:
        TargetError: as :func:`load_graph`.
    """
    from . import compat  # only for a workflow to load here: the core never imports it otherwise

    compat.install()
    return load_graph(target)


def _nested_graphs(graph: WorkflowGraph) -> set[int]:
    """The ids of the graphs of every composite inside ``graph``, at any depth."""
    found: set[int] = set()
    pending = [graph]
    while pending:
        for pe in pending.pop().pes:
            if isinstance(pe, CompositePE) and id(pe.graph) not in found:
                found.add(id(pe.graph))
                pending.append(pe.graph)
    return found
