"""Run unchanged dispel4py workflows on aiod4p.

:func:`install` puts an import hook first on ``sys.meta_path``: from then on
``import dispel4py.core`` (``.base``, ``.workflow_graph``) gives aiod4p's
compatible classes, even when the real dispel4py is installed. Any other
``dispel4py.*`` module (``dispel4py.examples...``, ``dispel4py.new.monitoring``)
is loaded from a real dispel4py package when one can be found: an installed
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

__all__ = ["SERVED", "install", "installed", "uninstall"]

PACKAGE = "dispel4py"

#: The dispel4py modules aiod4p provides, and the compat module providing each.
SERVED: dict[str, str] = {
    PACKAGE: "aiod4p.compat",
    f"{PACKAGE}.core": "aiod4p.compat.core",
    f"{PACKAGE}.base": "aiod4p.compat.base",
    f"{PACKAGE}.workflow_graph": "aiod4p.compat.workflow_graph",
}


class _Loader(importlib.abc.Loader):
    """Creates a ``dispel4py.*`` module holding the public names of a compat module."""

    def __init__(self, source: str, search_path: list[str] | None) -> None:
        self.source = source
        self.search_path = search_path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        if self.search_path is not None:  # the package itself
            module.__doc__ = "dispel4py's API, provided by aiod4p (aiod4p.compat)."
            return
        source = importlib.import_module(self.source)
        module.__doc__ = source.__doc__
        for name in source.__all__:
            setattr(module, name, getattr(source, name))
        module.__all__ = list(source.__all__)  # type: ignore[attr-defined]


class _Finder(importlib.abc.MetaPathFinder):
    """Serves :data:`SERVED`; finds other ``dispel4py.*`` modules in a real dispel4py package."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        if fullname == PACKAGE:
            roots = real_package_dirs()
            spec = importlib.machinery.ModuleSpec(fullname, _Loader(SERVED[fullname], roots), is_package=True)
            spec.submodule_search_locations = roots
            return spec
        if fullname in SERVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader(SERVED[fullname], None))
        if fullname.count(".") == 1:
            # The package's search path was fixed at import; look again, as a
            # workflow file may have put its directory on sys.path since.
            return importlib.machinery.PathFinder.find_spec(fullname, real_package_dirs())
        return None


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
