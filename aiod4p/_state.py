"""The state of a PE instance, as checkpoints save and restore it.

* **Default**: a PE's own attributes (what it set in ``__init__`` or
  ``preprocess`` and changes in ``process``), less the engine's and the PE
  base class's (:data:`RUNTIME_ATTRIBUTES`) and those holding code (functions,
  methods, partials, classes, modules: :func:`_is_code`), must be picklable.
* **Override**: a PE with a ``snapshot()`` method saves what it returns
  (picklable) and gets it back through ``restore(state)``.
* **Keyed state**: a PE with a group-by input may name a dict attribute in
  ``keyed_state`` (``keyed_state = "counts"``) whose keys are the group-by
  keys (for a grouping on one index or attribute, the value itself; else the
  tuple of values, or what the key function returns). Attributes named in ``checkpoint_exclude``
  are configuration, not state. That dict is saved per
  key group (:data:`KEY_GROUPS` fixed hash slots of the routing hash), so a run
  restored with another parallelism hands every key to the instance its items
  now reach.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable
from typing import Any

from ._groupings import KEY_CACHE_LIMIT, GroupBy
from ._pe import PE
from .errors import CheckpointError

__all__ = [
    "KEY_GROUPS",
    "NOT_MADE",
    "RUNTIME_ATTRIBUTES",
    "capture",
    "check_keyed_state",
    "excluded_attributes",
    "fixed_attributes",
    "keyed_owner",
    "restore_state",
]

KEY_GROUPS = 128
"""Hash slots of keyed state (Flink's max parallelism): a key's slot is its routing hash modulo this."""

RUNTIME_ATTRIBUTES = frozenset(
    {"name", "id", "parallelism", "inputs", "outputs", "_runtime", "_stream", "_task", "_draining", "_seek"}
    | {"keyed_state", "checkpoint_exclude", "checkpoint_fixed"}
)
"""Attributes that describe or run a PE rather than hold its state (a PE adds its own configuration
attributes in ``checkpoint_exclude``, a tuple of names)."""


_CODE = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
    type,
    types.ModuleType,
)


def _declared(pe: PE, name: str) -> tuple[str, ...]:
    """The attribute names in the tuples ``name`` (``checkpoint_exclude``, ``checkpoint_fixed``) of ``pe`` and of
    every class it derives from, added up (a subclass's add to its base's, never hide them): the base's first,
    each once."""
    found: dict[str, None] = {}
    for owner in (*reversed(type(pe).__mro__), pe):
        found.update(dict.fromkeys(vars(owner).get(name, ())))
    return tuple(found)


def excluded_attributes(pe: PE) -> frozenset[str]:
    """The attributes of ``pe`` that are not its state: :data:`RUNTIME_ATTRIBUTES` and every name in a
    ``checkpoint_exclude`` of its class or of any class it derives from (a subclass adds its own configuration to
    its base's). Neither saved nor restored: a restore keeps them as the workflow built them, whatever a checkpoint
    (written before they were named) holds."""
    return RUNTIME_ATTRIBUTES.union(_declared(pe, "checkpoint_exclude"))


def fixed_attributes(pe: PE) -> tuple[str, ...]:
    """The attributes of ``pe`` that a restore refuses to change: every name in a ``checkpoint_fixed`` of its class
    or of any class it derives from (a subclass adds its own to its base's), in that order. They are saved as
    state; what the PE's state holds was made with them (a window's size, a file source's path)."""
    return _declared(pe, "checkpoint_fixed")


def _is_code(value: Any) -> bool:
    """Whether an attribute holds code, not state (a function PE's function, say): never saved, kept as built."""
    return isinstance(value, _CODE)


def _route_key(grouping: GroupBy, key: Any) -> Any:
    """A key of a PE's keyed state as :meth:`GroupBy.key_of` gives it: a group-by on one index keys a 1-tuple
    (the state may hold it as such, or its value)."""
    if grouping.one_index and not (isinstance(key, tuple) and len(key) == 1):
        return (key,)
    return key


def keyed_owner(grouping: GroupBy, key: Any, parallelism: int) -> int:
    """The instance (of ``parallelism``) that the items of ``key`` reach, as routing decides."""
    return grouping.owner(_route_key(grouping, key), parallelism) if parallelism > 1 else 0


NOT_MADE: Any = object()
"""For :func:`check_keyed_state`: the PE has no attribute of its ``keyed_state``'s name yet (it may make it in
``preprocess``)."""


def check_keyed_state(pe: PE, grouping: GroupBy | None, table: Any) -> None:
    """Check what ``pe`` declares in ``keyed_state`` (nothing without one, or with a ``snapshot()``): ``table``
    is the attribute it names, or :data:`NOT_MADE`; ``grouping`` the group-by of its inputs, if any.

    Raises:
        CheckpointError: ``table`` is not a dict, or the PE has no group-by input.
    """
    name = getattr(pe, "keyed_state", None)
    if name is None or callable(getattr(pe, "snapshot", None)):
        return
    if table is not NOT_MADE and not isinstance(table, dict):
        raise CheckpointError(f"PE {pe.label}: keyed_state names {name!r}, which is not a dict attribute")
    if grouping is None:
        raise CheckpointError(f"PE {pe.label}: keyed_state needs a group-by input")


def capture(pe: PE, grouping: GroupBy | None, slots: dict[Any, int] | None = None) -> dict[str, Any]:
    """The state of ``pe`` to save: ``{"attributes" | "custom": ..., "keyed": {slot: {key: value}}}``.

    ``slots`` remembers the key group of every key across the snapshots of one
    instance (its caller keeps it), so that a key is hashed once per run, not
    at every checkpoint; like a router's cache, it starts again past
    ``KEY_CACHE_LIMIT`` keys.

    Raises:
        CheckpointError: ``keyed_state`` names no dict, or the PE has a group-by input none.
    """
    snapshot = getattr(pe, "snapshot", None)
    if callable(snapshot):
        return {"custom": snapshot()}
    excluded = excluded_attributes(pe)
    attributes = {k: v for k, v in pe.__getstate__().items() if k not in excluded and not _is_code(v)}
    state: dict[str, Any] = {"attributes": attributes}
    name = getattr(pe, "keyed_state", None)
    if name is not None:
        table = attributes.pop(name, None)
        check_keyed_state(pe, grouping, table)
        assert grouping is not None and isinstance(table, dict)
        known = slots if slots is not None else {}
        groups: dict[int, dict[Any, Any]] = {}
        for key, value in table.items():
            slot = known.get(key)
            if slot is None:
                if len(known) >= KEY_CACHE_LIMIT:
                    known.clear()
                slot = known[key] = grouping.owner(_route_key(grouping, key), KEY_GROUPS)
            groups.setdefault(slot, {})[key] = value
        state["keyed"] = groups
    return state


def restore_state(
    pe: PE,
    own: dict[str, Any],
    everyone: Iterable[dict[str, Any]],
    grouping: GroupBy | None,
    index: int,
    parallelism: int,
) -> None:
    """Restore ``pe`` (instance ``index`` of ``parallelism``) from its saved state ``own``.

    Keyed state is gathered from the saved states of ``everyone`` (every old
    instance) and keeps only the keys that now reach this instance. Attributes that are not state
    (:func:`excluded_attributes`) keep the values the workflow gave them.
    """
    if "custom" in own:
        restore = getattr(pe, "restore", None)
        if not callable(restore):
            raise CheckpointError(f"PE {pe.label} saved state with snapshot() but has no restore(state)")
        restore(own["custom"])
        return
    excluded = excluded_attributes(pe)
    pe.__dict__.update({k: v for k, v in own["attributes"].items() if k not in excluded})
    name = getattr(pe, "keyed_state", None)
    if name is None or "keyed" not in own:
        return
    assert grouping is not None
    table: dict[Any, Any] = {}
    for state in everyone:
        for slot in state.get("keyed", {}).values():
            for key, value in slot.items():
                if keyed_owner(grouping, key, parallelism) == index:
                    table[key] = value
    setattr(pe, name, table)
