"""Writing a streamparse project for a workflow, and reading its topology back."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import pickle
import re
import shutil
import sys
import types
import zipfile
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._frames import installed, installed_directories
from .._graph import FlatGraph, WorkflowGraph
from .._inputs import Inputs, resolve_inputs
from .._loading import split_target
from .._plan import ExecutionPlan, PlanOptions, make_plan
from ..errors import GraphError, InputError, TargetError
from ..mappings._shipping import pickled_code
from ._spec import DEFAULT_MAX_REPLAYS, EOS_FIELD, EOS_STREAM, PES_FILE, SPEC_FILE, TopologySpec, plan_topology
from ._wire import WireError, encode

__all__ = [
    "COMPONENTS_MODULE",
    "DEFAULT_CONF",
    "Project",
    "build_jar",
    "build_project",
    "load_topology",
    "streamparse_env",
    "target_name",
    "topology_name",
]

COMPONENTS_MODULE = "aiod4p_components"
STORM_VERSION = "2.6.0"
AIOD4P_PACKAGE = Path(__file__).resolve().parents[1]
"""The aiod4p package of this build, copied into every project's ``src`` (it is not on PyPI)."""

# Storm settings of every topology, unless the streamparse environment's ``options`` (or a run's ``conf``) say
# otherwise. A bounded number of tuples in flight per spout task is Storm's back-pressure: it also keeps tuples
# from timing out (and being replayed, so counted twice downstream) behind a slow bolt.
DEFAULT_CONF: dict[str, Any] = {"topology.max.spout.pending": 1000}

_NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.pyc")
"""What a package copied into ``src`` leaves out: Python's caches of compiled code."""

_GROUPINGS = {"shuffle": "Grouping.SHUFFLE", "all": "Grouping.ALL", "global": "Grouping.GLOBAL"}


@dataclass(frozen=True)
class Project:
    """A generated streamparse project.

    Attributes:
        path: the project directory (run ``sparse submit`` there).
        name: the topology name (``topologies/<name>.py``).
        spec: the topology as pure data.
    """

    path: Path
    name: str
    spec: TopologySpec

    @property
    def src(self) -> Path:
        """The component code: Storm's resources directory."""
        return self.path / "src"


def topology_name(text: str) -> str:
    """A Storm topology name made from ``text`` (a file stem, module or attribute name)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "workflow"


def target_name(target: str) -> str:
    """The name a workflow target gives its topology: the graph's attribute (``flow.py:graph``, ``pkg.flow:graph``),
    else the file's stem (``path/to/flow.py``) or the module's last part (``pkg.flow``)."""
    spec, attr = split_target(target)
    if attr:
        return attr
    return Path(spec).stem if spec.endswith(".py") else spec.rpartition(".")[2]


def build_project(
    graph: WorkflowGraph | FlatGraph | ExecutionPlan,
    directory: str | Path,
    *,
    name: str = "workflow",
    inputs: Inputs = None,
    options: PlanOptions | None = None,
    envs: Mapping[str, Any] | None = None,
    max_replays: int = DEFAULT_MAX_REPLAYS,
    report: str = "",
    token: str = "",
) -> Project:
    """Write the streamparse project of ``graph`` into ``directory``.

    The plan (``options``, default: one instance of every PE whose
    parallelism is unset) gives the components and parallelism hints;
    ``inputs`` (as for :func:`aiod4p.run`) become the spouts' feeds and must
    be counts or lists of items that can cross Storm (:mod:`aiod4p.storm._wire`). ``envs`` is the
    ``envs`` section of ``config.json`` (default: one environment ``prod``
    to fill in). ``report`` and ``token`` make the components report their
    results, errors and end of stream to a waiting run (see
    :class:`~aiod4p.storm.TopologySpec`). Files of existing projects are overwritten. The topology is
    called ``name``, or ``<name>_topology`` when a module copied into ``src``
    (the workflow file) already has that name.

    ``directory`` is new, empty, or a project written by an earlier build: that one's generated files are
    replaced (its workflow modules and requirements removed), and its ``config.json``, which the user edits
    before submitting, is kept (``envs`` is written into a new one only).

    Raises:
        GraphError: the graph is invalid, a PE cannot be pickled, a name is reserved, or a module to copy into
            ``src`` has the name of a standard library module (the workers would import that one).
        InputError: the inputs are invalid, or an item can neither be JSON nor be pickled.
        TargetError: ``directory`` cannot be written, or is not empty and holds no project of aiod4p.
    """
    if max_replays < 0:
        raise ValueError(f"max_replays must not be negative, not {max_replays}")
    plan = (
        graph if isinstance(graph, ExecutionPlan) else make_plan(graph, options or PlanOptions(default_parallelism=1))
    )
    plan.graph.check_runnable()
    name = topology_name(name)
    feeds = _json_feeds(resolve_inputs(plan.graph, inputs))
    spec, functions = plan_topology(plan, name, feeds, max_replays)
    compat = sys.modules.get("aiod4p.compat")  # loaded only where dispel4py workflows run
    spec = dataclasses.replace(spec, report=report, token=token, dispel4py=bool(compat and compat.installed()))
    local = _local_modules(plan, functions)
    spec = dataclasses.replace(spec, sources={module_name: str(path) for module_name, path in local.items()})
    if name in local or name == COMPONENTS_MODULE:
        # sparse imports topologies/<name>.py as module <name>, after src/: the names must differ.
        name = f"{name}_topology"
        spec = dataclasses.replace(spec, name=name)
    pickled = _pickle(plan, functions)
    root = Path(directory)
    try:
        _remove_previous_build(root)
        for sub in ("src", "topologies", "virtualenvs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        src = root / "src"
        (src / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=1) + "\n")
        (src / PES_FILE).write_bytes(pickled)
        for module_name, path in local.items():
            if path.is_dir():  # a package of the user's: the whole of it, as an installed one would be
                shutil.copytree(path, src / module_name, ignore=_NOT_COPIED)
            else:
                shutil.copyfile(path, src / f"{module_name}.py")
        package = _dispel4py_package(plan, functions)
        if package is not None:  # dispel4py's own modules (examples, PE libraries) for the compat hook
            shutil.rmtree(src / package.name, ignore_errors=True)
            shutil.copytree(package, src / package.name, ignore=_NOT_COPIED)
        (src / f"{COMPONENTS_MODULE}.py").write_text(_components_source(spec))
        for stale in (root / "topologies").glob("*.py"):
            stale.unlink()
        (root / "topologies" / f"{name}.py").write_text(_topology_source(spec))
        shutil.rmtree(src / AIOD4P_PACKAGE.name, ignore_errors=True)
        shutil.copytree(
            AIOD4P_PACKAGE, src / AIOD4P_PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.c")
        )
        (root / "virtualenvs" / f"{name}.txt").write_text(_requirements())
        if not (root / "config.json").exists():
            (root / "config.json").write_text(json.dumps(_config(envs), indent=2) + "\n")
        (root / "project.clj").write_text(_PROJECT_CLJ.format(name=name, storm=STORM_VERSION))
    except OSError as exc:
        raise TargetError(f"cannot write the Storm project to {root}: {exc.strerror or exc}") from exc
    project = Project(root, name, spec)
    load_topology(project.path)  # streamparse validates the definition as it builds it
    return project


def _requirements() -> str:
    """The workers' requirements (``virtualenvs/<name>.txt``, which ``sparse submit`` with ``use_virtualenv``
    installs on every worker): aiod4p's own dependencies and those of its storm extra, all on PyPI.

    aiod4p is not on PyPI: it travels in the jar (``src/aiod4p``), which ``streamparse_run`` puts last on
    ``sys.path``, so a worker with aiod4p installed uses that one.
    """
    lines = ["# Installed on every Storm worker by sparse submit (use_virtualenv); aiod4p itself is in src/."]
    for requirement in importlib.metadata.requires("aiod4p") or []:
        line, _, marker = requirement.partition(";")
        if marker.strip() in ("", 'extra == "storm"'):
            lines.append(line.strip())
    return "\n".join(lines) + "\n"


def _remove_previous_build(root: Path) -> None:
    """Remove from ``root`` the files an earlier build wrote that this one may not overwrite: the workflow
    modules it copied into ``src``, its requirements file and its jar. Nothing in a new or empty directory.

    Raises:
        TargetError: ``root`` is not empty and holds no project of aiod4p (no topology spec in ``src``).
    """
    if not root.is_dir() or not any(root.iterdir()):
        return
    try:
        previous = json.loads((root / "src" / SPEC_FILE).read_text())
    except (OSError, ValueError):
        previous = None
    # Only names a build writes: a spec edited or damaged must not have files removed elsewhere ("../x").
    sources, name = (previous.get("sources", {}), previous.get("name")) if isinstance(previous, dict) else (None, None)
    if not (
        isinstance(sources, dict)
        and all(isinstance(module, str) and module.isidentifier() for module in sources)
        and isinstance(name, str)
        and name == topology_name(name)
    ):
        raise TargetError(
            f"{root} is not empty and holds no project of aiod4p storm build (no src/{SPEC_FILE} of one):"
            " give a new or empty directory"
        )
    for module_name in sources:
        (root / "src" / f"{module_name}.py").unlink(missing_ok=True)
        package = root / "src" / module_name
        if package.is_dir() and not package.is_symlink():
            shutil.rmtree(package)
    (root / "virtualenvs" / f"{name}.txt").unlink(missing_ok=True)
    (root / f"{name}.jar").unlink(missing_ok=True)


def _json_feeds(feeds: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pe_id, feed in feeds.items():
        if isinstance(feed, int):
            out[pe_id] = feed
            continue
        if isinstance(feed, AsyncIterable) or not isinstance(feed, Iterable):
            raise InputError(f"the input of PE {pe_id} must be a count or a list to be stored in a Storm topology")
        try:
            out[pe_id] = [encode(element) for element in feed]
        except WireError as exc:
            raise InputError(f"the input of PE {pe_id} cannot be stored in a Storm topology: {exc}") from exc
    return out


def _pickle(plan: ExecutionPlan, functions: dict[str, Callable[[Any], Any]]) -> bytes:
    for pe_id, pe in plan.pes.items():
        if type(pe).__module__ == "__main__":
            raise GraphError(
                f"PE {pe_id}: its class {type(pe).__name__} is defined in __main__; Storm's workers cannot"
                " import it (define it in a module)"
            )
    # Each PE and function pickled apart: a task unpickles its own, importing only the modules that one needs.
    with _defining_modules(_objects(plan, functions)):
        pes = {}
        for pe_id, pe in plan.pes.items():
            try:
                pes[pe_id] = pickled_code(pe)  # a lambda it holds (a group-by key) by value, as for multi
            except Exception as exc:
                raise GraphError(
                    f"PE {pe_id} cannot be pickled for Storm's workers: {type(exc).__name__}: {exc}"
                ) from exc
        try:
            keys = {name: pickled_code(function) for name, function in functions.items()}
        except Exception as exc:
            raise GraphError(f"a group-by key function cannot be pickled for Storm's workers: {exc}") from exc
    return pickle.dumps({"pes": pes, "functions": keys})


def _objects(plan: ExecutionPlan, functions: dict[str, Callable[[Any], Any]]) -> list[Any]:
    """The classes and functions the pickled PEs refer to by module (a ``functools.partial``'s function: the
    partial's own ``__module__`` is ``functools``)."""
    objects: list[Any] = [type(pe) for pe in plan.pes.values()] + list(functions.values())
    objects += [fn for pe in plan.pes.values() if callable(fn := getattr(pe, "fn", None))]
    for index, obj in enumerate(objects):
        while isinstance(obj, functools.partial):
            obj = objects[index] = obj.func
    return objects


def _namespace(obj: Any) -> dict[str, Any] | None:
    """The globals of the module that defined ``obj`` (a function, or a class with a method defined with it: a
    class made at run time may hold another module's functions, as dispel4py's ``ProcessTimingPE`` mixes hold
    the ``write`` aiod4p gives them)."""
    target = obj
    if isinstance(target, type):
        for value in vars(target).values():
            value = getattr(value, "__func__", value)
            found = getattr(value, "__globals__", None)  # a decorated method's are its decorator's module's
            if isinstance(found, dict) and found.get("__name__") == target.__module__:
                return dict(found)
        return None
    found = getattr(target, "__globals__", None)
    return dict(found) if isinstance(found, dict) else None


@contextlib.contextmanager
def _defining_modules(objects: list[Any]) -> Iterator[None]:
    """Make ``sys.modules`` show the modules that defined ``objects`` while pickling.

    A workflow file loaded twice leaves the first copy in ``sys.modules``;
    pickle looks classes up there and would refuse the second copy's.
    """
    saved: dict[str, types.ModuleType | None] = {}
    for obj in objects:
        module_name = getattr(obj, "__module__", None)
        current = sys.modules.get(module_name) if module_name else None
        name = getattr(obj, "__qualname__", "")
        if not module_name or module_name in saved or "." in name or getattr(current, name, None) is obj:
            continue
        namespace = _namespace(obj)
        if namespace is None:
            continue
        shadow = types.ModuleType(module_name)
        shadow.__dict__.update(namespace)
        saved[module_name] = current
        sys.modules[module_name] = shadow
    try:
        yield
    finally:
        for module_name, module in saved.items():
            if module is None:
                sys.modules.pop(module_name, None)
            else:
                sys.modules[module_name] = module


def _local_modules(plan: ExecutionPlan, functions: dict[str, Callable[[Any], Any]]) -> dict[str, Path]:
    """Top-level modules and packages that are not installed and that the PEs need: they go into ``src``.

    Those are the modules defining the PEs (or key functions), or the top-level packages holding them
    (``mylib`` for a PE of ``mylib.filters``), and the top-level modules and packages those import, and so on
    (:func:`_imported_modules`): a workflow file's helper module or package next to it, importable where the run
    started (a file target's directory is on ``sys.path``), is not on the workers. Installed is as for multi and
    mpi (:func:`aiod4p._frames.installed`: the standard library, the site directories, a directory of installed
    distributions on ``sys.path``): the workers have those, or must be given them like any requirement. aiod4p
    and dispel4py's package travel apart (:data:`AIOD4P_PACKAGE`, :func:`_dispel4py_package`).

    Returns:
        By name, the file of each module (``.py``) and the directory of each package (the whole of it is copied).

    Raises:
        GraphError: such a module or package has the name of a standard library module (``sched.py`` next to the
            workflow file): on the workers, where ``src`` comes last on ``sys.path``, the standard library's
            would be imported instead.
    """
    directories = installed_directories()
    found: dict[str, Path] = {}
    for obj in _objects(plan, functions):
        module_name = getattr(obj, "__module__", None)
        if not module_name:
            continue
        top = module_name.partition(".")[0]
        if top in found:
            continue
        if top == module_name:
            namespace = _namespace(obj) or vars(sys.modules.get(module_name) or types.ModuleType(module_name))
            file = namespace.get("__file__")
            path = Path(file).resolve() if isinstance(file, str) and file.endswith(".py") else None
        else:
            path = _package_directory(sys.modules.get(top))
        if path is not None and _shipped(top, path, directories):
            found[top] = _not_standard(top, path, None)
    pending = list(found.items())
    while pending:
        importer, source = pending.pop()
        for module_name, path in _imported_modules(source).items():
            if module_name not in found and _shipped(module_name, path, directories):
                found[module_name] = _not_standard(module_name, path, (importer, source))
                pending.append((module_name, path))
    return found


def _package_directory(module: types.ModuleType | None) -> Path | None:
    """The directory of package ``module`` (a namespace package's, when it has one only), or ``None`` for a module
    that is not a package."""
    return _only_directory(getattr(module, "__path__", None))


def _only_directory(locations: Iterable[str] | None) -> Path | None:
    """The one directory of a package's search ``locations``; ``None`` for none, or several (a namespace
    package split over directories)."""
    found = list(locations or [])
    return Path(found[0]).resolve() if len(found) == 1 else None


def _shipped(name: str, path: Path, directories: tuple[str, ...]) -> bool:
    """Whether top-level module or package ``name`` at ``path`` is copied into ``src``: neither installed, nor
    aiod4p or dispel4py, which travel apart."""
    return name not in (AIOD4P_PACKAGE.name, "dispel4py") and not installed(path, directories)


def _not_standard(module_name: str, path: Path, importer: tuple[str, Path] | None) -> Path:
    """``path``, the file of module (or the directory of package) ``module_name`` to copy into ``src``, unless the
    standard library has a module of that name, which the workers would import instead (GraphError)."""
    if module_name not in sys.stdlib_module_names:
        return path
    by = f" (imported by module {importer[0]}, {importer[1]})" if importer else ""
    raise GraphError(
        f"module {module_name} ({path}){by} has the name of a module of Python's standard library: the Storm"
        f" workers would import the standard library's {module_name} instead of it (the topology's own modules"
        f" come last on their sys.path). Rename {path.name}"
    )


def _imported_modules(source: Path) -> dict[str, Path]:
    """The top-level modules (``.py`` files) and packages (directories) that the module at ``source``, or every
    module of the package at ``source`` (a directory), imports.

    Every ``import`` statement of a file that may run where it is imported counts (one in a function, or
    under ``try``, too), not those under ``if TYPE_CHECKING:`` or ``if __name__ == "__main__":`` (their
    ``else`` does); ``import pkg.mod`` and ``from pkg.mod import x`` import top-level package ``pkg``. A name is
    looked up where this process would import it from (``sys.modules`` first). Relative imports (within a
    package, which travels whole), compiled modules, packages split over several directories and names that are
    not found are left out. A file that cannot be read or parsed imports nothing here.
    """
    names: set[str] = set()
    for module_file in sorted(source.rglob("*.py")) if source.is_dir() else [source]:
        names |= _imported_names(module_file)
    found: dict[str, Path] = {}
    for name in sorted(names):
        module = sys.modules.get(name)
        if module is not None:
            file = getattr(module, "__file__", None)
            directory = _package_directory(module)
            package = hasattr(module, "__path__")
        else:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                continue
            file = spec.origin if spec is not None else None
            directory = _only_directory(spec.submodule_search_locations if spec is not None else None)
            package = spec is not None and spec.submodule_search_locations is not None
        if package:
            if directory is not None:
                found[name] = directory
        elif isinstance(file, str) and file.endswith(".py"):
            found[name] = Path(file).resolve()
    return found


def _imported_names(source: Path) -> set[str]:
    """The top-level names the absolute imports of the file ``source`` import (see :func:`_imported_modules`)."""
    try:
        tree = ast.parse(source.read_bytes(), str(source))
    except (OSError, SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
        elif isinstance(node, ast.If) and _never_imported(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return names


def _never_imported(test: ast.expr) -> bool:
    """Whether an ``if`` with this test never runs its body where the module is imported: ``TYPE_CHECKING``
    (``typing.TYPE_CHECKING``, any module's), or ``__name__ == "__main__"`` (either way round)."""
    if isinstance(test, ast.Name | ast.Attribute):
        return (test.id if isinstance(test, ast.Name) else test.attr) == "TYPE_CHECKING"
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        sides = [test.left, test.comparators[0]]
        main = [side for side in sides if isinstance(side, ast.Constant) and side.value == "__main__"]
        name = [side for side in sides if isinstance(side, ast.Name) and side.id == "__name__"]
        return bool(main and name)
    return False


def _dispel4py_package(plan: ExecutionPlan, functions: dict[str, Callable[[Any], Any]]) -> Path | None:
    """The real dispel4py package that defines some of the PEs (``dispel4py.examples...``), if any.

    Those modules are not served by :mod:`aiod4p.compat`; the workers find them in ``src/dispel4py``.
    """
    compat = sys.modules.get("aiod4p.compat")
    if compat is None:
        return None
    for obj in _objects(plan, functions):
        module_name = getattr(obj, "__module__", "") or ""
        if not module_name.startswith(f"{compat.PACKAGE}.") or module_name in compat.SERVED:
            continue
        file = getattr(sys.modules.get(module_name), "__file__", None)
        if isinstance(file, str):
            for parent in Path(file).resolve().parents:
                if parent.name == compat.PACKAGE and (parent / "__init__.py").is_file():
                    return parent
    return None


def _identifier(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name)
    if not base or base[0].isdigit():
        base = f"pe_{base}"
    candidate, counter = base, 1
    while candidate in taken:
        counter += 1
        candidate = f"{base}_{counter}"
    taken.add(candidate)
    return candidate


def _class_names(spec: TopologySpec) -> dict[str, str]:
    taken: set[str] = {"Grouping", "Stream", "Topology", "PEBolt", "PESpout", "components"}
    return {component.name: _identifier(component.name, taken) for component in spec.components}


def _components_source(spec: TopologySpec) -> str:
    names = _class_names(spec)
    lines = [
        f'"""The components of topology {spec.name}, generated by aiod4p: do not edit.',
        "",
        f"Storm runs each one as ``streamparse_run {COMPONENTS_MODULE}.<class>``.",
        '"""',
        "",
        "from streamparse import Stream",
        "",
        "from aiod4p.storm.components import PEBolt, PESpout",
    ]
    for component in spec.components:
        base = "PESpout" if component.kind == "spout" else "PEBolt"
        streams = [f"Stream(fields={s.fields!r}, name={s.name!r})" for s in component.streams]
        streams.append(f"Stream(fields={[EOS_FIELD]!r}, name={EOS_STREAM!r})")
        lines += [
            "",
            "",
            f"class {names[component.name]}({base}):",
            f"    component = {component.name!r}",
            "    outputs = [",
        ]
        lines += [f"        {stream}," for stream in streams]
        lines.append("    ]")
    return "\n".join(lines) + "\n"


def _topology_source(spec: TopologySpec) -> str:
    names = _class_names(spec)
    class_name = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]", spec.name) if part) or "Workflow"
    if class_name[0].isdigit():
        class_name = f"T{class_name}"
    lines = [
        f'"""Storm topology {spec.name}, generated by aiod4p. Submit it with ``sparse submit``."""',
        "",
        "from streamparse import Grouping, Topology",
        "",
        f"import {COMPONENTS_MODULE} as components",
        "",
        "",
        f"class {class_name}(Topology):",
    ]
    for component in spec.components:
        attr = names[component.name]
        args = [f"name={component.name!r}"]
        if component.inputs:
            inputs = [
                f"            {names[i.source]}[{i.stream!r}]: {_grouping_source(i.grouping, i.fields)},"
                for i in component.inputs
            ]
            args.append("inputs={\n" + "\n".join(inputs) + "\n        }")
        args.append(f"par={component.parallelism}")
        lines.append(f"    {attr} = components.{attr}.spec(")
        lines += [f"        {arg}," for arg in args]
        lines.append("    )")
    return "\n".join(lines) + "\n"


def _grouping_source(grouping: str, fields: tuple[str, ...]) -> str:
    if grouping == "fields":
        return f"Grouping.fields({list(fields)!r})"
    return _GROUPINGS[grouping]


def _config(envs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "serializer": "json",
        "topology_specs": "topologies/",
        "virtualenv_specs": "virtualenvs/",
        "envs": dict(envs) if envs else {"prod": streamparse_env()},
    }


def streamparse_env(nimbus: str = "", options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A streamparse environment (an entry of ``config.json``'s ``envs``) that submits to the Nimbus at
    ``nimbus`` (``HOST:PORT``; empty: to fill in), with no SSH, no virtualenv and no list of workers, and the
    Storm ``options`` given over :data:`DEFAULT_CONF`."""
    return {
        "nimbus": nimbus,
        "use_ssh_for_nimbus": False,
        "use_virtualenv": False,
        "workers": [],
        "options": {**DEFAULT_CONF, **(options or {})},
    }


_PROJECT_CLJ = """\
(defproject {name} "0.0.1-SNAPSHOT"
  :resource-paths ["_resources"]
  :target-path "_build"
  :min-lein-version "2.0.0"
  :jvm-opts ["-client"]
  :dependencies  [[org.apache.storm/storm-core "{storm}"]
                  [org.apache.storm/flux-core "{storm}"]]
  :jar-exclusions     [#"log4j\\.properties" #"org\\.apache\\.storm\\.(?!flux)" #"trident"
                       #"META-INF" #"meta-inf" #"\\.yaml"]
  :uberjar-exclusions [#"log4j\\.properties" #"org\\.apache\\.storm\\.(?!flux)" #"trident"
                       #"META-INF" #"meta-inf" #"\\.yaml"]
  )
"""


def load_topology(directory: str | Path) -> Any:
    """Import the project's topology definition and return its streamparse ``Topology`` class.

    Raises:
        TargetError: the project has no single topology, or it fails to import
            (streamparse rejects an invalid definition at class creation).
    """
    root = Path(directory)
    files = sorted((root / "topologies").glob("*.py"))
    if len(files) != 1:
        raise TargetError(f"{root / 'topologies'} must hold exactly one topology file, not {len(files)}")
    from streamparse import Topology

    src = str((root / "src").resolve())
    saved = sys.modules.pop(COMPONENTS_MODULE, None)
    sys.path.insert(0, src)
    module_name = f"_aiod4p_topology_{files[0].stem}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, files[0])
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise TargetError(f"the topology {files[0]} is invalid: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(src)
        sys.modules.pop(COMPONENTS_MODULE, None)
        if saved is not None:
            sys.modules[COMPONENTS_MODULE] = saved
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Topology) and value.__module__ == module_name:
            return value
    raise TargetError(f"{files[0]} defines no streamparse Topology")


def build_jar(project: Project, jar: str | Path) -> Path:
    """Write the topology jar Storm runs: the project's ``src`` under ``resources/``.

    Pure-Python topologies need nothing else from the jar (Storm's multilang
    classes come with the cluster), so no JVM build tool is needed.

    Raises:
        TargetError: the jar cannot be written.
    """
    path = Path(jar)
    try:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nCreated-By: aiod4p\r\n\r\n")
            for file in sorted(project.src.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts:
                    archive.write(file, f"resources/{file.relative_to(project.src).as_posix()}")
    except OSError as exc:
        raise TargetError(f"cannot write the topology jar {path}: {exc.strerror or exc}") from exc
    return path
