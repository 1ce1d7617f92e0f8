"""Back ends found by name and imported only when asked for (mappings, transports)."""

from __future__ import annotations

import importlib
from typing import Any

from ._install import install_hint
from .errors import MappingUnavailable

__all__ = ["load"]


def load(kind: str, name: str, registry: dict[str, tuple[str, str, str | None]]) -> Any:
    """The attribute ``registry[name]`` names: ``(module, attribute, extra)``, importing the module now.

    Raises:
        MappingUnavailable: ``name`` is not in ``registry``, or its module cannot be
            imported (naming the extra that brings what is missing).
    """
    try:
        module_name, attribute, extra = registry[name]
    except KeyError:
        raise MappingUnavailable(f"unknown {kind} {name!r}; choose one of: {', '.join(registry)}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f": {install_hint(extra)}" if extra else ""
        raise MappingUnavailable(f"the {name} {kind} needs {exc.name or 'a missing module'}{hint}") from exc
    return getattr(module, attribute)
