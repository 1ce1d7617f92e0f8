"""The public API: what ``aiod4p`` exports, and the exception tree drawn in ``aiod4p.errors``' docstring."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

import aiod4p
import aiod4p.errors
from aiod4p.errors import Aiod4pError

# One entry of the tree: its prefix ("│   ", "    ", "├── ", "└── ", four characters a level), then its name.
_ENTRY = re.compile(r"^    (?P<prefix>(?:[│ ]   |[├└]── )*)(?P<name>[A-Za-z_][\w.]*)")


def _tree() -> dict[str, str | None]:
    """The tree in ``aiod4p.errors``' docstring: each class named there, and the class it is drawn under."""
    doc = aiod4p.errors.__doc__
    assert doc is not None
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in block.splitlines():
        match = _ENTRY.match(line)
        assert match is not None, f"not an entry of the tree: {line!r}"
        depth = len(match["prefix"]) // 4
        assert depth <= len(path), f"{match['name']} is drawn below no class"
        del path[depth:]
        assert match["name"] not in parents, f"{match['name']} is drawn twice"
        parents[match["name"]] = path[-1] if path else None
        path.append(match["name"])
    return parents


def _class(name: str) -> type:
    """The class a tree entry names: a class of ``aiod4p.errors``, or ``module.Class`` elsewhere in aiod4p."""
    module, _, attribute = name.rpartition(".")
    found = getattr(importlib.import_module(module) if module else aiod4p.errors, attribute)
    assert isinstance(found, type), f"{name} is not a class"
    return found


_DEFINED = sorted(
    name
    for name, value in vars(aiod4p.errors).items()
    if inspect.isclass(value)
    and issubclass(value, BaseException)
    and value.__module__ == aiod4p.errors.__name__
    and not name.startswith("_")
)


def test_every_exception_class_is_public() -> None:
    assert sorted(aiod4p.errors.__all__) == _DEFINED


@pytest.mark.parametrize("name", aiod4p.errors.__all__)
def test_every_error_is_exported_by_the_package(name: str) -> None:
    assert name in aiod4p.__all__
    assert getattr(aiod4p, name) is getattr(aiod4p.errors, name)


def test_every_exported_name_exists_once() -> None:
    assert len(set(aiod4p.__all__)) == len(aiod4p.__all__)
    assert [name for name in aiod4p.__all__ if not hasattr(aiod4p, name)] == []


def test_the_tree_draws_every_class_of_errors() -> None:
    tree = _tree()
    assert [name for name in _DEFINED if name not in tree] == []
    assert [name for name, parent in tree.items() if parent is None] == ["Aiod4pError"]


def _parent_cases() -> list[object]:
    cases: list[object] = []
    for name, parent in _tree().items():
        if parent is None:
            continue
        marks = []
        if "." in name and not issubclass(_class(name), Aiod4pError):
            marks.append(pytest.mark.xfail(reason=f"{name} does not derive from Aiod4pError yet", strict=True))
        cases.append(pytest.param(name, parent, id=name, marks=marks))
    return cases


@pytest.mark.parametrize(("name", "parent"), _parent_cases())
def test_each_class_derives_from_the_class_it_is_drawn_under(name: str, parent: str) -> None:
    """Its one base in the tree is that class (another base outside it, such as ValueError, may stay)."""
    assert [base for base in _class(name).__bases__ if issubclass(base, Aiod4pError)] == [_class(parent)]
