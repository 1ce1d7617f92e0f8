"""Run unchanged dispel4py workflows on aiod4p.

:func:`install` puts an import hook first on ``sys.meta_path``: from then on
``import dispel4py.core`` (``.base``, ``.workflow_graph``, ``.visualisation``, ``.utils``,
``.new.processor``, the ``.new.*_process`` mapping entry points,
``.provenance`` and ``.seismo.seismo``) gives
aiod4p's compatible code, even when the real dispel4py is installed. Any
other ``dispel4py.*`` module (``dispel4py.examples...``,
``dispel4py.new.monitoring``) is loaded from a real dispel4py package when one can be found: an installed
one, or the ``dispel4py`` directory enclosing a directory on ``sys.path``
(``aiod4p run path/to/dispel4py/examples/x.py`` puts the file's directory
there). ``aiod4p run`` installs the hook before it loads the workflow.

The core of aiod4p never imports this package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["PACKAGES", "SERVED", "install", "installed", "uninstall"]

PACKAGE = "dispel4py"

#: The dispel4py modules aiod4p provides, and the compat module providing each
#: (``module:mapping`` for the entry points of a mapping).
SERVED: dict[str, str] = {
    f"{PACKAGE}.core": "aiod4p.compat.core",
    f"{PACKAGE}.base": "aiod4p.compat.base",
    f"{PACKAGE}.workflow_graph": "aiod4p.compat.workflow_graph",
    f"{PACKAGE}.visualisation": "aiod4p.compat.visualisation",
    f"{PACKAGE}.utils": "aiod4p.compat.utils",
    f"{PACKAGE}.new.processor": "aiod4p.compat.processor",
    f"{PACKAGE}.new.simple_process": "aiod4p.compat.mappings:simple",
    f"{PACKAGE}.new.multi_process": "aiod4p.compat.mappings:multi",
    f"{PACKAGE}.new.mpi_process": "aiod4p.compat.mappings:mpi",
    f"{PACKAGE}.provenance": "aiod4p.compat.provenance",
    f"{PACKAGE}.seismo.seismo": "aiod4p.compat.seismo",
    f"{PACKAGE}.seismo.seismo_core": "aiod4p.compat.seismo",
}

#: The packages aiod4p provides; their other modules come from a real dispel4py.
#: ``dispel4py.examples`` spans every real dispel4py package found (an
#: installed one and a source tree holding the workflow, say).
PACKAGES: dict[str, str] = {
    PACKAGE: "",
    f"{PACKAGE}.new": "new",
    f"{PACKAGE}.examples": "examples",
    f"{PACKAGE}.seismo": "seismo",
}


class _Loader(importlib.abc.Loader):
    """Creates a ``dispel4py.*`` module holding the public names of a compat module."""

    def __init__(self, source: str | None) -> None:
        self.source = source

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        if self.source is None:  # a package
            module.__doc__ = "dispel4py's API, provided by aiod4p (aiod4p.compat)."
            return
        name, _, mapping = self.source.partition(":")
        source = importlib.import_module(name)
        names = source.entry_points(mapping) if mapping else {n: getattr(source, n) for n in source.__all__}
        module.__doc__ = f"dispel4py's {module.__name__} on aiod4p's {mapping} mapping." if mapping else source.__doc__
        for attribute, value in names.items():
            setattr(module, attribute, value)
        module.__all__ = list(names)  # type: ignore[attr-defined]


class _Finder(importlib.abc.MetaPathFinder):
    """Serves :data:`SERVED` and :data:`PACKAGES`; finds other ``dispel4py.*`` modules in a real dispel4py package."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        if fullname in PACKAGES:
            roots = _real_dirs(fullname)
            spec = importlib.machinery.ModuleSpec(fullname, _Loader(None), is_package=True)
            spec.submodule_search_locations = roots
            return spec
        if fullname in SERVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader(SERVED[fullname]))
        parent = fullname.rpartition(".")[0]
        if parent in PACKAGES:
            # The package's search path was fixed at import; look again, as a
            # workflow file may have put its directory on sys.path since.
            return importlib.machinery.PathFinder.find_spec(fullname, _real_dirs(parent))
        return None


def _real_dirs(package: str) -> list[str]:
    """The directories of ``package`` (one of :data:`PACKAGES`) in real dispel4py packages."""
    found = [str(Path(root, PACKAGES[package])) for root in real_package_dirs()]
    return [directory for directory in found if Path(directory).is_dir()]


_finder: _Finder | None = None
_displaced: dict[str, ModuleType] = {}


def real_package_dirs() -> list[str]:
    """The directories of real dispel4py packages: installed, or enclosing a ``sys.path`` entry."""
    found: list[str] = []
    for entry in sys.path:
        try:
            base = Path(entry or ".").resolve()
        except OSError:
            continue
        for candidate in (base / PACKAGE, *(p for p in (base, *base.parents) if p.name == PACKAGE)):
            if (candidate / "__init__.py").is_file() and str(candidate) not in found:
                found.append(str(candidate))
    return found


def installed() -> bool:
    """Whether the import hook is active."""
    return _finder is not None and _finder in sys.meta_path


def install() -> None:
    """Serve ``dispel4py`` from aiod4p from now on (idempotent).

    dispel4py modules imported before are set aside (restored by
    :func:`uninstall`), so the next import gets aiod4p's.
    """
    global _finder
    if installed():
        return
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        _displaced[name] = sys.modules.pop(name)
    _finder = _Finder()
    sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Remove the hook and the ``dispel4py`` modules it served; restore those set aside (idempotent)."""
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    sys.modules.update(_displaced)
    _displaced.clear()
