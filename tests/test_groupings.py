"""Groupings: stable group-by hashing in every process, routers that split batches, new groupings as one class."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import json
import math
import operator
import os
import pathlib
import struct
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import workflows as wf
from conftest import MappingCase
from hypothesis import given
from hypothesis import strategies as st

from aiod4p import (
    ALL,
    ROUND_ROBIN,
    SHUFFLE,
    GraphError,
    Grouping,
    ProducerPE,
    Router,
    WorkflowGraph,
    group_by,
    stable_hash,
)
from aiod4p import _groupings as groupings
from aiod4p._groupings import KeyRouter, as_grouping
from aiod4p._plan import make_plan
from aiod4p.compat.base import IterativePE as Dispel4pyIterativePE


@dataclasses.dataclass(frozen=True)
class Station:
    """A dataclass key: equal by its compared fields, whatever else an instance holds."""

    network: object
    code: str
    note: str = dataclasses.field(default="", compare=False)

    @functools.cached_property
    def label(self) -> str:
        return f"{self.network}.{self.code}"


class Sensor:
    """A key of a plain class, equal when its attributes are."""

    def __init__(self, names: frozenset[str], site: str) -> None:
        self.names, self.site = names, site

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sensor) and (self.names, self.site) == (other.names, other.site)

    def __hash__(self) -> int:
        return hash((self.names, self.site))


def _built_apart(text: str) -> str:
    """An equal string that is another object."""
    return "".join(list(text))


_UUID = uuid.uuid1()
_SITE = "site-" * 3
_FIRST = Station(1, "ST01", note="a")
_FIRST_LABEL = _FIRST.label  # cached on this instance only
_DICT_ORDER = Sensor(frozenset({"z"}), _SITE)
_DICT_ORDER.__dict__ = {"site": _SITE, "names": frozenset({"z"})}
UTC = datetime.UTC
CET = datetime.timezone(datetime.timedelta(hours=1))
NEW_YORK = ZoneInfo("America/New_York")
REPEATED_HOUR = datetime.datetime(2024, 10, 27, 2, 30, tzinfo=ZoneInfo("Europe/Berlin"))  # clocks went back at 3
KEYS = ["station-7", 42, -3, 2.5, 1.0, None, True, b"raw", ("a", 1), ["a", 1], frozenset({1, 2}), {"k": [1, 2]}]
SCRIPT = f"""
import json
from aiod4p import stable_hash
print(json.dumps([stable_hash(k) for k in {KEYS!r}]))
"""


OBJECT_SCRIPT = """
import json
from aiod4p import stable_hash
class Sensor:  # the same class in every process
    def __init__(self, names, site):
        self.names, self.site = names, site
key = Sensor(frozenset({"s1", "s2", "s3", "s4", "s5"}), "site")
deep = key
for _ in range(40):  # objects within objects past the depth a key is encoded to
    deep = Sensor(frozenset({"s1", "s2"}), deep)
print(json.dumps([stable_hash(key), stable_hash(deep)]))
"""


def test_a_key_of_a_plain_class_hashes_alike_across_hash_seeds() -> None:
    """Its frozenset attribute is iterated in an order that depends on the string hash's seed: a pickle of the
    key differed from process to process."""
    digests = set()
    for seed in ("0", "1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", OBJECT_SCRIPT], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        digests.add(tuple(json.loads(done.stdout)))
    assert len(digests) == 1


class Link:
    """A key of objects within objects: ``Link(Link(...))``."""

    def __init__(self, inner: Link | None) -> None:
        self.inner = inner


def _chain(links: int) -> Link | None:
    chain = None
    for _ in range(links):
        chain = Link(chain)
    return chain


def _hashed_at_depth(key: object, depth: int) -> int:
    return _hashed_at_depth(key, depth - 1) if depth else stable_hash(key)


@pytest.mark.parametrize("links", [10, 150])
def test_a_key_of_nested_objects_hashes_alike_at_any_stack_depth(links: int) -> None:
    """Past Python's recursion limit the key went by its pickle: how deep the caller was decided which way."""
    key = _chain(links)
    assert _hashed_at_depth(key, 0) == _hashed_at_depth(key, 400) == stable_hash(_chain(links))


def test_a_key_holding_an_array_routes() -> None:
    """Its pickled state holds a PickleBuffer, which has no state to encode: the run failed."""
    router = group_by(key=lambda item: item[0]).router(2, 0, "PE a", "b.input")
    items = [(np.arange(3) + (i % 2), i) for i in range(10)]
    parts = router.split(items)
    assert sorted(i for part in parts for _, i in part) == list(range(10))
    where = {(int(array.sum()), destination) for destination, part in enumerate(parts) for array, _ in part}
    assert len(where) == 2  # each of the two arrays, every time at one destination


class Loop:
    """A key that holds itself."""

    def __init__(self) -> None:
        self.me = self


def test_a_key_that_holds_itself_still_hashes() -> None:
    key = Loop()
    assert stable_hash(key) == stable_hash(key)


def test_stable_hash_is_identical_across_processes_and_hash_seeds() -> None:
    expected = [stable_hash(key) for key in KEYS]
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("w17", 6661337400216000257),
        (("w17",), 979538696038945836),
        (17, 7053222131291119078),
        ((17,), 8148701593715529920),
        (-5, 8829499064823792323),
        (("a", 2), 6767240516286304950),
        ("é", 15253921242070825983),
        ((("x",),), 17639041255207254486),
        (None, 16938330391483325906),
        (True, 10810413387653817636),
        (2.0, 15658894261308942769),
    ],
)
def test_stable_hash_keeps_its_values_across_versions(key: object, expected: int) -> None:
    # Checkpoints file keyed state under stable_hash(key) % KEY_GROUPS, and a run restores them with the
    # router's hash: a faster encoding must give the same digests as before (values taken before its fast paths).
    assert stable_hash(key) == expected


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (1, 1.0),
        ((1, "a"), [1, "a"]),
        (0, False),
        (1, True),
        ((True, 2.0), (1, 2)),
        (0.5, np.float32(0.5)),
        (0.5, np.float16(0.5)),
        (0.5, Fraction(1, 2)),
        (0.5, Decimal("0.5")),
        (0.5, np.longdouble(0.5)),
        (True, np.bool_(True)),
        (3, np.uint8(3)),
        (2, complex(2, 0)),
        (1 + 2j, np.complex64(1 + 2j)),
        (10**20, 1e20),
        (Fraction(1, 3), Fraction(2, 6)),
        (float("inf"), Decimal("inf")),
        ((np.float32(1.5), "a"), [1.5, "a"]),
        (datetime.datetime(2024, 1, 1, 5, tzinfo=UTC), datetime.datetime(2024, 1, 1, 6, tzinfo=CET)),
        (datetime.datetime(2024, 7, 1, 12, tzinfo=UTC), datetime.datetime(2024, 7, 1, 8, tzinfo=NEW_YORK)),
        (datetime.datetime(2024, 1, 1, 1), datetime.datetime(2024, 1, 1, 1, fold=1)),
        (REPEATED_HOUR, REPEATED_HOUR.replace(fold=1)),
        (datetime.time(12, tzinfo=CET), datetime.time(11, tzinfo=UTC)),
        (datetime.timedelta(days=1), datetime.timedelta(hours=24)),
        (datetime.timedelta(days=1), np.timedelta64(24, "h")),
        (np.datetime64("2024-01-01"), np.datetime64("2024-01-01T00:00:00.000000000")),
        (np.datetime64("2024-01-01T01:00"), datetime.datetime(2024, 1, 1, 1)),
        ((datetime.datetime(2024, 1, 1, tzinfo=UTC), "s1"), [datetime.datetime(2024, 1, 1, 1, tzinfo=CET), "s1"]),
        (_FIRST, Station(1.0, _built_apart("ST01"), note="b")),
        (Station("XX", _SITE), Station("XX", _built_apart(_SITE))),
        (Sensor(frozenset({"a", "b", "c"}), _SITE), Sensor(frozenset({"c", "b", "a"}), _built_apart(_SITE))),
        (Sensor(frozenset({"z"}), _SITE), _DICT_ORDER),
        (_UUID, uuid.UUID(str(_UUID))),  # uuid1's is_safe, which == ignores, is in its pickled state
        (range(0, 3, 2), range(0, 4, 2)),
        (range(0), range(5, 5)),
        (range(2**100), range(0, 2**100, 1)),  # longer than len() can say
        (pathlib.PurePosixPath("a/b"), pathlib.PosixPath("a//b")),
        (pathlib.PureWindowsPath("C:/Data"), pathlib.PureWindowsPath("c:/data")),
    ],
)
def test_equal_keys_hash_alike_where_python_says_they_are_equal(left: object, right: object) -> None:
    # Equal keys must hash alike: a router remembers each key's destination by Python equality.
    assert stable_hash(left) == stable_hash(right)


@given(
    moment=st.datetimes(
        min_value=datetime.datetime(1900, 1, 1), max_value=datetime.datetime(2200, 1, 1), timezones=st.timezones()
    ),
    zone=st.timezones(),
)
def test_the_same_moment_in_any_time_zone_is_one_key(moment: datetime.datetime, zone: datetime.tzinfo) -> None:
    elsewhere = moment.astimezone(zone)
    if elsewhere == moment:  # a moment in a repeated hour equals none in another zone (PEP 495)
        assert stable_hash(elsewhere) == stable_hash(moment)


def test_a_router_sends_a_key_where_its_stable_hash_says_and_keeps_the_order() -> None:
    router = group_by(0).router(3, 0, "PE a", "b.input")
    items = [(f"k{index % 50}", index) for index in range(1000)]
    for batch in (items[:300], items[300:]):  # the second batch is served from the cache
        parts = router.split(batch)
        for destination, part in enumerate(parts):
            assert all(stable_hash((key,)) % 3 == destination for key, _ in part)
        assert sorted(item for part in parts for item in part) == sorted(batch)
        assert all(part == sorted(part, key=lambda pair: pair[1]) for part in parts)


def test_a_router_by_key_function_routes_unhashable_keys_and_several_indices() -> None:
    by_function = group_by(key=lambda item: [item % 4]).router(2, 0, "PE a", "b.input")
    parts = by_function.split(list(range(20)))
    assert all(stable_hash([item % 4]) % 2 == destination for destination, part in enumerate(parts) for item in part)
    by_indices = group_by(0, 2).router(2, 0, "PE a", "b.input")
    parts = by_indices.split([(i, "x", i % 3) for i in range(30)])
    assert all(stable_hash((a, c)) % 2 == d for d, part in enumerate(parts) for a, _, c in part)


def test_a_router_routes_an_unhashable_key_after_a_new_hashable_one_in_one_batch() -> None:
    """A list as key (a JSON input's) after a key not seen yet, or after a NaN (never found again in the cache),
    failed the batch with ``TypeError: unhashable type``, blamed on the PE that wrote it; alone, it routed."""
    router = group_by(0).router(2, 0, "PE a", "b.input")
    for batch in ([("a", 0), (["a", "b"], 1)], [(math.nan, 2), (np.arange(2), 3)]):
        parts = router.split(batch)
        assert all(stable_hash((key,)) % 2 == destination for destination, part in enumerate(parts) for key, _ in part)
        assert sorted(i for part in parts for _, i in part) == [i for _, i in batch]


def test_nan_keys_hit_the_key_cache_and_route_by_their_bits() -> None:
    """A NaN was found in a router's key cache only as the very object it is (``nan != nan``, and a NaN hashes by
    its identity): each fresh NaN key was hashed again and took an entry, so a stream of them filled the cache to
    its limit (131,073 entries) over and over, and the other keys were hashed again after each time it was cleared
    (1,000,000 items keyed by fresh NaNs: 3.5 s, against 0.7 s now)."""
    nan, negative = float("nan"), -float("nan")  # two bit patterns: two keys, each where its stable hash says
    assert struct.pack("<d", nan) != struct.pack("<d", negative)
    by_one = group_by(0).router(4, 0, "PE a", "b.input")
    by_two = group_by(0, 1).router(4, 0, "PE a", "b.input")
    owners = {
        (by_one, False): stable_hash((nan,)) % 4,
        (by_one, True): stable_hash((negative,)) % 4,
        (by_two, False): stable_hash((nan, "k")) % 4,
        (by_two, True): stable_hash((negative, "k")) % 4,
    }
    words = [f"w{index}" for index in range(100)]
    for start in range(0, 1_000_000, 250):
        batch = [(-float("nan") if index % 2 else float("nan"), "k", index) for index in range(start, start + 250)]
        batch[0] = (words[start // 250 % 100], "k", start)  # a key of another kind in each batch: it stays cached
        for router in (by_one, by_two):
            parts = router.split(batch)
            if start % 25_000 == 0:  # every 100th batch: checking them all would take seconds
                assert sorted(index for part in parts for _, _, index in part) == list(range(start, start + 250))
                assert all(
                    destination == owners[router, index % 2 == 1]
                    for destination, part in enumerate(parts)
                    for _, _, index in part
                    if index != start
                ), "a NaN key routed elsewhere than its stable hash says"
    for router in (by_one, by_two):
        router.split([(float("nan"), "k", 0), (["unhashable"], "k", 1)])  # dealt uncached, from the second key on
        # the last batch's fresh NaN is held as itself until the next batch the cache misses
        assert len(router.cache) == 2 + len(words) + 1, "the cache grew by NaN keys"


def test_one_nan_object_in_every_batch_stays_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``math.nan`` for a missing value, in every batch: found as itself, it is dealt with the other keys in one
    pass, as before NaNs shared an entry of the cache (each batch holding one was dealt key by key in Python)."""
    router = group_by(0).router(4, 0, "PE a", "b.input")
    misses = []
    destinations = KeyRouter._destinations

    def counted(self: KeyRouter, keys: list[Any]) -> list[int]:
        misses.append(len(keys))
        return destinations(self, keys)

    monkeypatch.setattr(KeyRouter, "_destinations", counted)
    owner = stable_hash((math.nan,)) % 4
    for start in range(0, 10_000, 100):
        new_word = [f"new{start}"] if start == 5_000 else []  # a key not seen yet: a batch the cache misses
        keys = [math.nan if index % 10 == 0 else f"w{index % 50}" for index in range(100 - len(new_word))]
        parts = router.split([(key, start + index) for index, key in enumerate(keys + new_word)])
        assert (math.nan, start) in parts[owner]  # where its stable hash says
    assert len(misses) == 2  # the first batch and the one with a new word


def _speedups() -> Any:
    try:
        from aiod4p import _speedups
    except ImportError:
        pytest.fail("aiod4p._speedups was not built: install a C compiler and Python's headers, then pip install -e .")
    return _speedups


def test_keyed_routing_deals_in_c_where_the_install_found_a_compiler() -> None:
    assert groupings.deal_by_key is _speedups().deal_by_key
    assert groupings.keys_evaluate is _speedups().keys_evaluate


DEALERS = [
    pytest.param(lambda: _speedups().deal_by_key, id="c"),
    pytest.param(lambda: groupings._deal_by_key, id="python"),
]
KEY_CHECKERS = [
    pytest.param(lambda: _speedups().keys_evaluate, id="c"),
    pytest.param(lambda: groupings._keys_evaluate, id="python"),
]


def _first_or_fail(item: Any) -> Any:
    if item[0] == "fails":
        raise ValueError("no key")
    return item[0]


class _Row(tuple[Any, ...]):
    """A tuple whose indexing is its own: read through ``__getitem__``, never in place."""

    def __getitem__(self, index: Any) -> Any:
        return ("row", super().__getitem__(index))


# An item per kind the loops tell apart: an exact tuple or list (read in place), a tuple subclass, a dict, an
# item too short for the index, and one that cannot be indexed at all.
ITEM_SHAPES = st.sampled_from(["tuple", "list", "row", "dict", "short", "int"])


def _shaped(key: Any, index: int, shape: str) -> Any:
    return {
        "tuple": (key, index),
        "list": [key, index],
        "row": _Row((key, index)),
        "dict": {0: key, 1: index},
        "short": (),
        "int": index,
    }[shape]


@pytest.mark.parametrize("dealer", DEALERS)
@given(
    keys=st.lists(st.tuples(st.sampled_from(["a", "b", 3, (1, 2), ["unhashable"], "fails", "unknown"]), ITEM_SHAPES)),
    count=st.integers(1, 4),
    seed=st.integers(0, 1000),
    by_index=st.booleans(),
)
def test_deal_by_key_deals_known_keys_in_order_and_gives_up_on_any_other(
    dealer: Any, keys: list[tuple[Any, str]], count: int, seed: int, by_index: bool
) -> None:
    known = ["a", "b", 3, (1, 2), ("row", "a"), ("row", 3)]
    destinations = {key: (seed + index) % count for index, key in enumerate(known)}
    items = [_shaped(key, index, shape) for index, (key, shape) in enumerate(keys)]
    key = 0 if by_index else _first_or_fail
    dealt = dealer()(items, key, destinations, count)
    try:
        found = [_first_or_fail(item) for item in items]
        expected = [
            [item for item, k in zip(items, found, strict=True) if destinations[k] == part] for part in range(count)
        ]
    except (LookupError, TypeError, ValueError):  # no key, an unhashable key or one without a destination
        assert dealt is None
    else:
        assert dealt == expected


@pytest.mark.parametrize("checker", KEY_CHECKERS)
@given(keys=st.lists(st.tuples(st.sampled_from(["a", ["unhashable"], "fails"]), ITEM_SHAPES)), by_index=st.booleans())
def test_keys_evaluate_says_whether_every_item_has_a_key(
    checker: Any, keys: list[tuple[Any, str]], by_index: bool
) -> None:
    items = [_shaped(key, index, shape) for index, (key, shape) in enumerate(keys)]
    key = 0 if by_index else _first_or_fail
    try:
        for item in items:
            item[0] if by_index else _first_or_fail(item)
    except (LookupError, TypeError, ValueError):
        assert checker()(items, key) is False
    else:
        assert checker()(items, key) is True


@pytest.mark.parametrize("dealer", DEALERS)
def test_deal_by_key_lets_an_interrupt_through(dealer: Any) -> None:
    def interrupted(item: Any) -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dealer()([1, 2], interrupted, {1: 0}, 2)


@pytest.mark.parametrize("checker", KEY_CHECKERS)
def test_keys_evaluate_lets_an_interrupt_through(checker: Any) -> None:
    def interrupted(item: Any) -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checker()([1, 2], interrupted)


@pytest.mark.parametrize("dealer", DEALERS)
def test_deal_by_key_gives_up_on_a_key_function_that_changes_the_batch(dealer: Any) -> None:
    items = list(range(10))

    def shrinking(item: int) -> int:
        del items[5:]
        return item % 2

    assert dealer()(items, shrinking, {0: 0, 1: 1}, 2) is None  # the caller deals it again


def test_deal_by_key_in_c_deals_what_it_took_when_a_finalizer_clears_the_batch() -> None:
    # Making the parts' lists may run the garbage collector, and so a __del__ that changes the batch: the
    # second pass read the list again, and found it cleared (a crash: a NULL item array). Where exactly the
    # collector runs depends on what the process allocated before: in the first pass, the batch's change is seen.
    items = [("a", index) for index in range(100)]

    class ClearsTheBatch:
        def __del__(self) -> None:
            items.clear()

    def key(item: tuple[str, int]) -> str:
        if item[1] == 99:
            cycle = ClearsTheBatch()
            cycle.itself = cycle  # type: ignore[attr-defined]
            del cycle
            spare_lists.extend([] for _ in range(200))  # empty the free list: the next list is allocated
            gc.set_threshold(1)
        return item[0]

    spare_lists: list[list[Any]] = []
    threshold = gc.get_threshold()
    try:
        parts = _speedups().deal_by_key(items, key, {"a": 0}, 2)
    finally:
        gc.set_threshold(*threshold)
    assert items == []  # the finalizer ran: where the collector ran, the first pass gives up, the second deals
    assert parts is None or [len(part) for part in parts] == [100, 0]


@pytest.mark.parametrize("dealer", DEALERS)
@pytest.mark.parametrize(
    ("items", "index"),
    [
        ([(1, "a"), (2, "b", "c")], -1),
        ([{"k": "a"}, {"k": "b", "j": 1}], "k"),
        ([(1, "a"), [2, "b"]], True),
        ([_Row(("a", 1)), (1, "b")], 0),
    ],
)
def test_deal_by_key_indexes_as_itemgetter_does(dealer: Any, items: list[Any], index: Any) -> None:
    keys = list(map(operator.itemgetter(index), items))
    destinations = {key: number % 2 for number, key in enumerate(keys)}
    expected = [[item for item, key in zip(items, keys, strict=True) if destinations[key] == to] for to in (0, 1)]
    assert dealer()(items, index, destinations, 2) == expected


def test_deal_by_key_in_c_refuses_what_is_not_its_contract() -> None:
    items = list(range(10))

    def shrinking(item: int) -> int:
        del items[5:]
        return item % 2

    assert _speedups().keys_evaluate(items, shrinking) is True
    with pytest.raises(TypeError, match="a list, a key, a dict and an int"):
        _speedups().deal_by_key((1, 2), shrinking, {}, 2)
    with pytest.raises(TypeError, match="a list and a key"):
        _speedups().keys_evaluate((1, 2), shrinking)
    with pytest.raises(ValueError, match="count of at least 1"):
        _speedups().deal_by_key([], shrinking, {}, 0)
    assert _speedups().deal_by_key([1], lambda item: item, {1: 5}, 2) is None  # no such destination
    assert _speedups().deal_by_key([(1,)], 10**30, {1: 0}, 2) is None  # an index no item has


@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_a_router_by_one_index_routes_every_kind_of_item_as_its_key_function_would(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not native:
        monkeypatch.setattr(groupings, "deal_by_key", groupings._deal_by_key)
        monkeypatch.setattr(groupings, "keys_evaluate", groupings._keys_evaluate)
    items = [(word, 1) for word in "abcabd"] + [["a", 2], _Row(("b", 3)), {0: "c", "x": 4}]
    for count in (1, 2, 3):
        by_index = group_by(0).router(count, 0, "PE a", "b.input").split(list(items))
        by_function = group_by(key=_first_or_fail).router(count, 0, "PE a", "b.input").split(list(items))
        if count > 1:  # the key function's keys are not 1-tuples: compare where each item went by its own key
            by_function = [
                [item for item in items if stable_hash((_first_or_fail(item),)) % count == part]
                for part in range(count)
            ]
        assert by_index == by_function
    with pytest.raises(GraphError, match=r"cannot route item \(\) to b.input: its group_by\[0\] key failed"):
        group_by(0).router(1, 0, "PE a", "b.input").split([("a",), ()])


@pytest.mark.parametrize("count", [1, 2])
def test_a_key_function_that_fails_once_then_passes_is_named_so(count: int) -> None:
    calls = [0]

    def flaky(item: str) -> str:
        calls[0] += 1
        if calls[0] <= count:  # the first pass over the batch (and, to two destinations, the second) fails
            raise ValueError("not yet")
        return item

    with pytest.raises(GraphError, match="key failed for an item, then passed for every item when tried again"):
        group_by(key=flaky).router(count, 0, "PE a", "b.input").split(["x", "y"])


def test_a_router_names_the_item_whose_key_fails() -> None:
    router = group_by(1).router(2, 0, "PE a", "b.input")
    with pytest.raises(GraphError, match=r"PE a cannot route item \(3,\) to b.input: its group_by\[1\] key failed"):
        router.split([(1, 2), (3,)])


def test_a_router_names_a_large_item_whose_key_fails_in_one_short_line() -> None:
    # A record of 2,000,000 samples was written whole into the error: one line of 20 MB on the terminal.
    router = group_by("station").router(2, 0, "PE a", "b.input")
    with pytest.raises(GraphError) as caught:
        router.split([{"stn": "ST01", "samples": [0.5] * 2_000_000}])
    assert str(caught.value).startswith("PE a cannot route item {'samples': [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, ...], ")
    assert len(str(caught.value)) < 200


def test_shuffle_deals_round_robin_across_batches_and_all_broadcasts() -> None:
    deal = SHUFFLE.router(3, 1, "PE a", "b.input")
    assert deal.split([0, 1, 2, 3]) == [[2], [0, 3], [1]]
    assert deal.split([4, 5]) == [[5], [], [4]]  # carries on at destination 2
    assert ALL.router(2, 0, "PE a", "b.input").split([1, 2]) == [[1, 2], [1, 2]]


@given(
    count=st.integers(1, 40),
    start=st.integers(0, 100),
    sizes=st.lists(st.integers(0, 90), max_size=6),
)
def test_round_robin_deals_each_batch_in_turn_however_few_its_items(count: int, start: int, sizes: list[int]) -> None:
    """Batches smaller than the destinations (one item each for some of thousands) are dealt as larger ones."""
    router = ROUND_ROBIN.router(count, start, "PE a", "b.input")
    turn = start % count
    for size in sizes:
        expected: list[list[int]] = [[] for _ in range(count)]
        for item in range(size):
            expected[turn].append(item)
            turn = (turn + 1) % count
        assert router.split(list(range(size))) == expected


def test_round_robin_gives_every_instance_an_item_and_is_dispel4pys_default(mapping: MappingCase) -> None:
    """dispel4py deals item by item in turn; a workflow may rely on every instance getting an item."""
    assert as_grouping("round_robin") is ROUND_ROBIN and str(ROUND_ROBIN) == "round_robin"
    seen = grouped_side_by_side(mapping)["round_robin"]
    expected = {0} if mapping.name == "simple" else {0, 1, 2}  # simple runs one instance of every PE
    assert {instance for instance, _ in seen} == expected

    class Passes(Dispel4pyIterativePE):
        def _process(self, data: Any) -> Any:
            return data

    assert Passes().inputs["input"].grouping is ROUND_ROBIN


class Instants(ProducerPE):
    """The same 12 hours as 1-tuples of aware datetimes, in time zone ``zone``: what two sensors in two zones report."""

    def __init__(self, zone: datetime.tzinfo) -> None:
        super().__init__()
        self.zone = zone

    def produce(self) -> Iterator[tuple[datetime.datetime]]:
        start = datetime.datetime(2024, 1, 1, tzinfo=UTC)
        for hour in range(12):
            yield ((start + datetime.timedelta(hours=hour)).astimezone(self.zone),)


_SIDE_BY_SIDE: dict[str, dict[str, list[Any]]] = {}


def grouped_side_by_side(mapping: MappingCase) -> dict[str, list[Any]]:
    """What the WhoSawWhat behind round robin (fed 3 items), behind :class:`wf.Parity` (fed 40) and behind a group-by of
    two :class:`Instants` sources saw, from one run of all three side by side on ``mapping``: a launch per mapping
    instead of three."""
    if mapping.id not in _SIDE_BY_SIDE:
        graph = WorkflowGraph()
        sinks = {"round_robin": wf.WhoSawWhat("round_robin", parallelism=3), "even_odd": wf.WhoSawWhat(wf.Parity(), 2)}
        inputs: dict[str, int] = {}
        for name, count in (("round_robin", 3), ("even_odd", 40)):
            graph.connect(source := wf.Count(), "output", sinks[name], "input")
            inputs[source.id] = count
        sinks["instants"] = wf.WhoSawWhat(group_by(0), 3)
        for zone in (UTC, CET):
            graph.connect(zoned := Instants(zone), "output", sinks["instants"], "input")
            inputs[zoned.id] = 1
        results = mapping.run(graph, inputs)
        seen = {name: results.data(sink.id) for name, sink in sinks.items()}
        assert sum(map(len, seen.values())) == len(results)
        _SIDE_BY_SIDE[mapping.id] = seen
    return _SIDE_BY_SIDE[mapping.id]


def test_a_new_grouping_is_one_class(mapping: MappingCase) -> None:
    seen = grouped_side_by_side(mapping)["even_odd"]
    if mapping.name == "simple":
        assert Counter(instance for instance, _ in seen) == {0: 40}
    else:
        assert {(instance, item % 2) for instance, item in seen} == {(0, 0), (1, 1)}
    assert sorted(item for _, item in seen) == list(range(40))


def test_equal_keys_from_two_senders_reach_one_instance(mapping: MappingCase) -> None:
    # Two sources, so two routers: only the key's encoding makes them agree (each router's cache goes by equality).
    seen = grouped_side_by_side(mapping)["instants"]
    instances_of: dict[datetime.datetime, set[int]] = {}
    for instance, (moment,) in seen:
        instances_of.setdefault(moment.astimezone(UTC), set()).add(instance)
    assert len(seen) == 24 and len(instances_of) == 12
    assert all(len(instances) == 1 for instances in instances_of.values())


def test_the_planner_asks_the_grouping_for_candidates_and_single_instances() -> None:
    class Pinned(Grouping):
        single_instance = True

        def candidates(self, parallelism: int, index: int, aligned: bool) -> tuple[int, ...]:
            return (parallelism - 1,)

        def router(self, count: int, start: int, sender: str, dest: str) -> Router:
            return Router(count)

    graph = WorkflowGraph()
    graph.connect(wf.Count(), "output", who := wf.WhoSawWhat(Pinned(), parallelism=None), "input")
    plan = make_plan(graph)
    assert plan.placement[who.id].parallelism == 1
    assert plan.routes[plan.roots[0]][0].targets == ((0,),)


def test_hashes_spread_over_instances() -> None:
    counts = [0] * 4
    for index in range(4000):
        counts[stable_hash(f"key-{index}") % 4] += 1
    assert min(counts) > 800
