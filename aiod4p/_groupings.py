"""Groupings: which destination instance(s) receive an item.

A grouping owns its behaviour: the planner asks it which destination
instances a sender may reach (:meth:`Grouping.candidates`) and whether its
destination runs a single instance; each sending instance asks it for a
:class:`Router` that splits every batch among those destinations in one pass.
A new grouping is one subclass.

Group-by hashes a canonical encoding of the key with blake2b, so the same key
reaches the same instance in every process; a router hashes each distinct key
once per run.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import numbers
import operator
import pickle
import struct
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import PurePath, PureWindowsPath
from typing import Any, ClassVar, NoReturn, TypeAlias

from ._frames import short_repr
from .errors import GraphError

__all__ = [
    "ALL",
    "GLOBAL",
    "ROUND_ROBIN",
    "SHUFFLE",
    "All",
    "Global",
    "KEY_CACHE_LIMIT",
    "GroupBy",
    "Grouping",
    "GroupingLike",
    "KeyRouter",
    "RoundRobin",
    "Router",
    "Shuffle",
    "as_grouping",
    "group_by",
    "stable_hash",
]


class Router:
    """Splits batches among ``count`` destination instances; one per sending instance and edge.

    Subclasses override :meth:`split`. This one sends everything to the first
    destination untouched (``passes_through``), which lets the engine skip the split.
    ``any_destination`` says any candidate may take any item: the engine then
    sends a batch to the least loaded candidate when the chosen one has no room.
    ``deals`` says more: the engine deals each batch whole to the candidate with
    the most room instead of splitting it, when it fits in every candidate's
    next batch (cheap items; the split is used otherwise, and where batches
    must not depend on timing: the simple mapping).
    """

    __slots__ = ("count",)
    passes_through: ClassVar[bool] = True
    any_destination: ClassVar[bool] = False
    deals: ClassVar[bool] = False
    # Whether split() looks at the items themselves (a grouping of one's own may): item-level provenance then
    # hands it the items' values, not the tagged items that travel. The built-in routers that never look say so.
    reads_items: ClassVar[bool] = True

    def __init__(self, count: int) -> None:
        self.count = count

    def split(self, items: list[Any]) -> list[list[Any]]:
        """One list per destination (in candidate order), empty where none goes; lists may be shared.

        Raises:
            GraphError: an item cannot be routed (it names the item and the edge).
        """
        return [items] + [[] for _ in range(self.count - 1)]


class Grouping:
    """How the items on an edge choose destination instances.

    Attributes:
        single_instance: the destination PE runs one instance (unless its
            parallelism is set explicitly).
    """

    single_instance: ClassVar[bool] = False

    def candidates(self, parallelism: int, index: int, aligned: bool) -> tuple[int, ...]:
        """The destination instances sender instance ``index`` may reach.

        Args:
            parallelism: the destination's number of instances.
            index: the sending instance.
            aligned: sender and destination have equal parallelism and placement.
        """
        return tuple(range(parallelism))

    def router(self, count: int, start: int, sender: str, dest: str) -> Router:
        """A router over ``count`` candidates for one sending instance.

        ``start`` is the sending instance's index (to stagger round robins);
        ``sender`` (``"PE a"``) and ``dest`` (``"b.input"``) name the edge in errors.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Shuffle(Grouping):
    """Any one instance; each batch goes to the instance with the most room (the default).

    An instance that gets through its items faster (on a worker of its own,
    beside no source) gets more of them; a short stream may reach only some
    instances. :class:`RoundRobin` deals item by item in turn instead.
    """

    def candidates(self, parallelism: int, index: int, aligned: bool) -> tuple[int, ...]:
        if aligned:
            return (index,)  # forward: keep an equal-width pipeline on its worker
        every = tuple(range(parallelism))
        shift = index % parallelism  # each sender starts its round robin elsewhere
        return every[shift:] + every[:shift]

    def router(self, count: int, start: int, sender: str, dest: str) -> Router:
        return _Dealer(count, start) if count > 1 else Router(count)

    def __str__(self) -> str:
        return "shuffle"


@dataclass(frozen=True)
class RoundRobin(Shuffle):
    """Any one instance, dealt item by item in turn, as dispel4py does (its PEs' default).

    With at least as many items as instances, every instance gets one (a
    dispel4py PE may rely on it: its timing PE divides by its item count). Each
    item waits for room at the instance in turn, as in dispel4py, so which items
    an ungrouped stateful PE sees never depends on timing.
    """

    # Every instance, in instance order, even between equal parallelisms on the same workers (which shuffle
    # joins one to one): each of dispel4py's senders deals to them all, starting sender ``index`` at
    # instance ``index`` (the router's start).
    candidates = Grouping.candidates

    def router(self, count: int, start: int, sender: str, dest: str) -> Router:
        return _RoundRobin(count, start) if count > 1 else Router(count)

    def __str__(self) -> str:
        return "round_robin"


@dataclass(frozen=True)
class All(Grouping):
    """Every instance receives every item (broadcast)."""

    def router(self, count: int, start: int, sender: str, dest: str) -> Router:
        return _Broadcast(count)

    def __str__(self) -> str:
        return "all"


@dataclass(frozen=True)
class Global(Grouping):
    """A single instance (index 0) receives every item."""

    single_instance: ClassVar[bool] = True

    def candidates(self, parallelism: int, index: int, aligned: bool) -> tuple[int, ...]:
        return (0,)

    def router(self, count: int, start: int, sender: str, dest: str) -> Router:
        return Router(count)

    def __str__(self) -> str:
        return "global"


@dataclass(frozen=True)
class GroupBy(Grouping):
    """Items with equal keys reach the same instance.

    The key is either the tuple of ``item[i]`` for the given ``indices`` or
    ``key(item)``. A key function must be picklable (a module-level function)
    for mappings that run in several processes. Keys are equal as Python
    compares them (``1 == 1.0``, the same moment in two time zones, dataclasses
    field by field); a key of another class is compared by its class and
    attributes (:func:`stable_hash`).

    Raises:
        ValueError: neither indices nor a key function, or both.
        TypeError: an index is callable (a key function given as an index).
    """

    indices: tuple[int | str, ...] = ()
    key: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if bool(self.indices) == (self.key is not None):
            raise ValueError("group_by needs either key indices or a key function, not both")
        for index in self.indices:
            if callable(index):  # group_by(fn) would look up item[fn] for every item, failing the run
                name = getattr(index, "__name__", "fn")
                raise TypeError(f"group_by({name}): a key function is passed as group_by(key={name})")

    def key_of(self, item: Any) -> Any:
        """Return the grouping key of ``item``.

        Raises:
            LookupError, TypeError: the item has no such index.
        """
        if self.key is not None:
            return self.key(item)
        return tuple(item[i] for i in self.indices)

    @property
    def one_index(self) -> bool:
        """Whether the key is one index's value (which :meth:`key_of` gives as a 1-tuple)."""
        return self.key is None and len(self.indices) == 1

    @staticmethod
    def owner(key: Any, count: int) -> int:
        """The instance (of ``count``) that the items whose :meth:`key_of` is ``key`` reach, in every process
        and run (checkpoints file keyed state by it)."""
        return stable_hash(key) % count

    def router(self, count: int, start: int, sender: str, dest: str) -> Router:
        # The key is evaluated even for one destination: a bad key fails alike on every mapping.
        return KeyRouter(self, count, sender, dest)

    def __str__(self) -> str:
        if self.key is not None:
            return f"group_by({getattr(self.key, '__name__', 'key')})"
        return f"group_by{list(self.indices)}"


GroupingLike: TypeAlias = Grouping | str | Sequence[int | str] | None

SHUFFLE = Shuffle()
ROUND_ROBIN = RoundRobin()
ALL = All()
GLOBAL = Global()


class _RoundRobin(Router):
    """Deals a batch out like cards, starting where the last batch stopped: each item to the instance in
    turn, whatever the timing, as dispel4py's senders deal (so an ungrouped stateful PE sees the items it
    sees there)."""

    __slots__ = ("next",)
    passes_through = False
    reads_items = False

    def __init__(self, count: int, start: int) -> None:
        super().__init__(count)
        self.next = start % count

    def split(self, items: list[Any]) -> list[list[Any]]:
        count, start = self.count, self.next
        self.next = (start + len(items)) % count
        if len(items) < count:  # one item each for some destinations (thousands of them, first batches of one)
            none: list[Any] = []
            parts = [none] * count
            for offset, item in enumerate(items):
                parts[(start + offset) % count] = [item]
            return parts
        return [items[(index - start) % count :: count] for index in range(count)]


class _Dealer(_RoundRobin):
    """Shuffle's router: the engine deals whole batches by room; split (round robin) where timing must not count."""

    __slots__ = ()
    any_destination = True
    deals = True


class _Broadcast(Router):
    __slots__ = ()
    passes_through = False
    reads_items = False

    def split(self, items: list[Any]) -> list[list[Any]]:
        return [items] * self.count


KEY_CACHE_LIMIT = 1 << 17  # distinct keys remembered per router; past it the cache starts again


@dataclass(frozen=True, slots=True)
class _NaN:
    """Stands for the float NaNs of one bit pattern in a router's key cache: they route alike, as
    :func:`stable_hash` encodes a NaN by its bits, and no key of another kind equals it."""

    bits: bytes


_DOUBLE = struct.Struct("<d")


def _held(key: Any, depth: int = 0) -> Any:
    """``key`` as a router's key cache holds it: ``key`` itself, unless a float NaN is in it (as the key, or in a
    tuple, to :data:`_MOST_NESTED` levels); then a copy with each such NaN replaced by its :class:`_NaN`, which
    equal keys share."""
    if isinstance(key, float):
        return _NaN(_DOUBLE.pack(key)) if key != key else key
    if isinstance(key, tuple) and depth < _MOST_NESTED:
        for index, element in enumerate(key):  # on every key the cache misses: no copy unless a NaN is in it
            if isinstance(element, (float, tuple)) and (held := _held(element, depth + 1)) is not element:
                return (*key[:index], held, *[_held(rest, depth + 1) for rest in key[index + 1 :]])
    return key


class KeyRouter(Router):
    """Routes by key, hashing each distinct (hashable) key once."""

    __slots__ = ("cache", "dest", "grouping", "key", "nan_keys", "sender", "single")
    passes_through = False

    def __init__(self, grouping: GroupBy, count: int, sender: str, dest: str) -> None:
        super().__init__(count)
        self.grouping = grouping
        self.sender, self.dest = sender, dest
        # ``single`` marks one index, whose key is ``(item[i],)``; the per-item loops read that index in place.
        self.single = grouping.one_index
        self.key: Callable[[Any], Any] | int | str = (
            grouping.indices[0] if self.single else grouping.key or operator.itemgetter(*grouping.indices)
        )
        self.cache: dict[Any, int] = {}
        self.nan_keys: list[Any] = []  # keys with a NaN in them that the cache holds as themselves (_destinations)

    @property
    def get(self) -> Callable[[Any], Any]:
        """What identifies an item's key, as a function of the item."""
        return _key_getter(self.key)

    def use_key(self, get: Callable[[Any], Any]) -> None:
        """Route by ``get(item)`` from now on (what identifies an item's key; provenance's tagged items)."""
        self.key = get

    def split(self, items: list[Any]) -> list[list[Any]]:
        count = self.count
        if count == 1:
            if not keys_evaluate(items, self.key):
                self._fail(items)
            return [items]
        # The common case, in one pass: every key hashable and seen before; else sorted out below.
        parts = deal_by_key(items, self.key, self.cache, count)
        if parts is not None:
            return parts
        get = self.get
        try:
            keys = list(map(get, items))
        except Exception:
            self._fail(items)
        try:
            try:
                destinations = list(map(self.cache.__getitem__, keys))
            except KeyError:  # keys not seen yet: hash them once
                destinations = self._destinations(keys)
        except TypeError:  # an unhashable key (after keys not seen yet, too): hash each one
            return self._split_uncached(items, keys)
        return _deal(items, destinations, count)

    def _destinations(self, keys: list[Any]) -> list[int]:
        """The destination of each of ``keys``, hashing each key that the cache does not hold, and adding it.

        A key with a float NaN in it is held as :func:`_held` makes it, and as itself until a batch that the
        cache misses does not hold it: as itself, it is found only as that very object (``nan != nan``, and a
        NaN hashes by its identity). One NaN object that every batch holds (``math.nan`` for a missing value)
        so stays on the fast path, and fresh NaN objects take no more than a batch's worth of entries (each
        took an entry of its own, crowding the other keys out of the cache).

        Raises:
            TypeError: a key is unhashable.
        """
        cache, count, single, owner = self.cache, self.count, self.single, self.grouping.owner
        if len(cache) > KEY_CACHE_LIMIT:
            cache.clear()
        earlier, self.nan_keys = self.nan_keys, []
        try:
            for key in keys:
                if key not in cache:
                    held = _held(key)
                    if held is key:
                        cache[key] = owner((key,) if single else key, count)
                        continue
                    if held not in cache:
                        cache[held] = owner((key,) if single else key, count)
                    cache[key] = cache[held]
                    self.nan_keys.append(key)
            return list(map(cache.__getitem__, keys))
        finally:
            if earlier:
                present = set(map(id, keys))
                for key in earlier:
                    if id(key) in present:
                        self.nan_keys.append(key)
                    else:
                        cache.pop(key, None)

    def _split_uncached(self, items: list[Any], keys: list[Any]) -> list[list[Any]]:
        count, single, owner = self.count, self.single, self.grouping.owner
        parts: list[list[Any]] = [[] for _ in range(count)]
        for item, key in zip(items, keys, strict=True):
            parts[owner((key,) if single else key, count)].append(item)
        return parts

    def _fail(self, items: list[Any]) -> NoReturn:
        """Raise the error naming the first item whose key fails, found by trying each key again.

        Raises:
            GraphError: always; when every key passes this time (an unstable key function), it says so.
        """
        get = self.get
        for item in items:
            try:
                get(item)
            except Exception as exc:
                raise GraphError(
                    f"{self.sender} cannot route item {short_repr(item)} to {self.dest}: its {self.grouping}"
                    f" key failed ({type(exc).__name__}: {exc})"
                ) from exc
        raise GraphError(
            f"{self.sender} cannot route a batch to {self.dest}: its {self.grouping} key failed for an item, then"
            " passed for every item when tried again (a key function whose result changes)"
        )


def _deal(items: list[Any], destinations: list[int], count: int) -> list[list[Any]]:
    parts: list[list[Any]] = [[] for _ in range(count)]
    appends = [part.append for part in parts]
    for item, destination in zip(items, destinations, strict=True):
        appends[destination](item)
    return parts


def _key_getter(key: Callable[[Any], Any] | int | str) -> Callable[[Any], Any]:
    """What the per-item loops' ``key`` means: the function itself, or ``item[key]`` for an index."""
    return key if callable(key) else operator.itemgetter(key)


def _deal_by_key(
    items: list[Any], key: Callable[[Any], Any] | int | str, destinations: dict[Any, int], count: int
) -> list[list[Any]] | None:
    """``aiod4p._speedups.deal_by_key`` in Python, for an install without a C compiler (same contract)."""
    length = len(items)
    try:
        chosen = list(map(destinations.__getitem__, map(_key_getter(key), items)))
        if len(items) != length or not all(0 <= destination < count for destination in chosen):
            return None
    except Exception:
        return None
    return _deal(items, chosen, count)


def _keys_evaluate(items: list[Any], key: Callable[[Any], Any] | int | str) -> bool:
    """``aiod4p._speedups.keys_evaluate`` in Python, for an install without a C compiler (same contract)."""
    try:
        for _ in map(_key_getter(key), items):
            pass
    except Exception:
        return False
    return True


try:
    from ._speedups import deal_by_key, keys_evaluate
except ImportError:  # built without a C compiler
    deal_by_key, keys_evaluate = _deal_by_key, _keys_evaluate


def group_by(*indices: int | str, key: Callable[[Any], Any] | None = None) -> GroupBy:
    """Group items by ``item[i]`` for each index, or by ``key(item)``."""
    return GroupBy(tuple(indices), key)


def as_grouping(value: GroupingLike) -> Grouping:
    """Coerce dispel4py-style grouping values into a :data:`Grouping`.

    Accepts a grouping object, ``None`` or ``"shuffle"``, ``"round_robin"``,
    ``"all"``, ``"global"``, or a list/tuple of key indices.

    Raises:
        ValueError: the value is none of those.
    """
    if value is None:
        return SHUFFLE
    if isinstance(value, Grouping):
        return value
    if isinstance(value, str):
        named: dict[str, Grouping] = {
            "shuffle": SHUFFLE,
            "round_robin": ROUND_ROBIN,
            "all": ALL,
            "global": GLOBAL,
            "one_to_all": ALL,
        }
        try:
            return named[value.lower()]
        except KeyError:
            raise ValueError(
                f"unknown grouping {value!r}: expected 'shuffle', 'round_robin', 'all', 'global' or key indices"
            ) from None
    if isinstance(value, (list, tuple)) and value:
        return GroupBy(tuple(value))
    raise ValueError(f"unknown grouping {value!r}: expected 'shuffle', 'round_robin', 'all', 'global' or key indices")


def _encode(value: Any, out: bytearray) -> None:
    # A canonical, process-independent encoding of the common key types.
    kind = type(value)
    if kind is str:  # the commonest keys first, without the abstract-class checks below; same bytes
        data = value.encode("utf-8", "surrogatepass")
        out += b"s" + _LENGTH.pack(len(data)) + data
    elif kind is int:
        text = str(value).encode()
        out += b"i" + _LENGTH.pack(len(text)) + text
    elif kind is tuple and len(value) == 1:
        out += b"t" + _LENGTH.pack(1)
        _encode_within(value[0], out)
    elif value is None:
        out += b"N"
    elif _is_numpy_scalar(value) and value.dtype.kind in "mM":  # datetime64, timedelta64: equal in any unit
        _encode(value.astype(f"{value.dtype.name.partition('[')[0]}[us]").item(), out)
    elif isinstance(value, numbers.Integral):  # bools and integer types too: equal keys hash alike
        text = str(int(value)).encode()
        out += b"i" + struct.pack("<I", len(text)) + text
    elif isinstance(value, (numbers.Number, Decimal)) or _is_numpy_scalar(value):
        _encode_number(value, out)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out += b"s" + struct.pack("<I", len(data)) + data
    elif isinstance(value, (bytes, bytearray)):
        out += b"b" + struct.pack("<I", len(value)) + bytes(value)
    elif isinstance(value, (tuple, list)):
        out += b"t" + struct.pack("<I", len(value))
        for element in value:
            _encode_within(element, out)
    elif isinstance(value, (frozenset, set)):
        parts = sorted(_encoded_within(element) for element in value)
        out += b"S" + struct.pack("<I", len(parts)) + b"".join(parts)
    elif isinstance(value, dict):
        pairs = sorted(_encoded_within(k) + _encoded_within(v) for k, v in value.items())
        out += b"d" + struct.pack("<I", len(pairs)) + b"".join(pairs)
    elif isinstance(value, (datetime.date, datetime.time, datetime.timedelta)):
        _encode_moment(value, out)
    else:
        _encode_object(value, out)


def _encode_number(value: Any, out: bytearray) -> None:
    """Equal numbers encode alike whatever their types, as Python compares them: ``2 == 2.0 ==
    np.float32(2) == Fraction(2) == Decimal(2)``, ``0.5 == np.float16(0.5)``, ``True == np.bool_(True)``.

    An integral value encodes as that ``int``, any other value a double holds exactly as that double
    (so every ``float`` key keeps its digest), any other real as its exact ratio.
    """
    if _is_numpy_scalar(value) and type(item := value.item()) is not type(value):
        _encode(item, out)  # the Python number it equals (np.longdouble has none, and stays itself)
    elif isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        if value.imag == 0:
            _encode(value.real, out)
        else:
            out += b"c"
            _encode(value.real, out)
            _encode(value.imag, out)
    else:
        try:
            numerator, denominator = value.as_integer_ratio()
        except (AttributeError, ValueError, OverflowError):  # inf or nan, or no ratio
            try:
                out += b"f" + struct.pack("<d", float(value))
            except (TypeError, ValueError, OverflowError):
                _encode_object(value, out)
            return
        if denominator == 1:
            _encode(numerator, out)
        elif (double := float(value)).as_integer_ratio() == (numerator, denominator):
            out += b"f" + struct.pack("<d", double)
        else:
            out += b"q"
            _encode(numerator, out)
            _encode(denominator, out)


_MICROSECOND = datetime.timedelta(microseconds=1)


def _encode_moment(value: datetime.date | datetime.time | datetime.timedelta, out: bytearray) -> None:
    """Equal dates, times and durations encode alike, as Python compares (and hashes) them: an aware datetime
    or time as its UTC instant, so the same moment in two time zones is one key, and a time in a repeated
    hour (``fold``) as the first of the two. A date encodes as its midnight (a naive datetime then, which no
    date equals, shares its encoding: they only meet at one instance).
    """
    if isinstance(value, datetime.timedelta):
        out += b"e"
        _encode(value // _MICROSECOND, out)
        return
    if isinstance(value, datetime.datetime | datetime.time):
        offset = value.replace(fold=0).utcoffset()
        micro = ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond
        micro -= offset // _MICROSECOND if offset is not None else 0
    else:
        micro = 0
    if isinstance(value, datetime.date):
        out += b"m"
        micro += value.toordinal() * 86_400_000_000
    else:
        out += b"h"
    _encode(micro, out)


def _is_numpy_scalar(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0


def _encode_object(value: Any, out: bytearray) -> None:
    """Any other key: a dataclass by the fields it compares; a class or function by its name; a UUID, a range
    or a path as they compare; anything else by what pickling it saves (``__reduce_ex__``: its class and state),
    each part encoded as a key, so that keys whose attributes are equal encode alike: sets and dicts in any
    order, equal numbers, the same moment in any time zone, a string shared or copied. (A class whose ``==``
    ignores some attributes is not seen through: its equal keys may reach different instances; group it by a
    key function that returns plain values.)
    """
    kind: Any = type(value)
    if _compares_fields(kind):
        out += b"o"
        _encode(kind.__qualname__, out)  # the module is left out: a script's is __main__ in one process only
        _encode_within(tuple(getattr(value, field.name) for field in dataclasses.fields(value) if field.compare), out)
    elif isinstance(value, type) or (callable(value) and isinstance(getattr(value, "__qualname__", None), str)):
        out += b"g"
        _encode(value.__qualname__, out)
    elif isinstance(value, uuid.UUID):
        out += b"u"
        _encode(value.int, out)
    elif isinstance(value, range):  # equal when they hold the same numbers (len() fails past sys.maxsize)
        out += b"R"
        _encode((value[0], value[-1], value.step if value[0] != value[-1] else None) if value else None, out)
    elif isinstance(value, PurePath):  # a pure path equals a concrete one; Windows paths compare case-blind
        windows = isinstance(value, PureWindowsPath)
        out += b"P"
        _encode((windows, tuple(part.lower() if windows else part for part in value.parts)), out)
    elif isinstance(value, pickle.PickleBuffer):  # a numpy array's data
        data = memoryview(value).tobytes()
        out += b"b" + struct.pack("<I", len(data)) + data
    else:
        reduced = value.__reduce_ex__(5)
        if isinstance(reduced, str):  # pickled by name: an enum member, a singleton
            out += b"g"
            _encode(reduced, out)
        else:
            out += b"r"
            _encode_within(tuple(list(part) if isinstance(part, Iterator) else part for part in reduced), out)


_MOST_NESTED = 64
_nesting = threading.local()  # how deep in a key _encode_within is, in this thread


def _encode_within(value: Any, out: bytearray) -> None:
    """:func:`_encode` of a part of a key (an element, a field, an attribute). Past :data:`_MOST_NESTED`
    levels every part encodes alike, as ``~``: equal keys still encode alike, in every process and whatever the
    depth of the caller's stack (a recursion limit would depend on it), and a key that holds itself ends."""
    depth = getattr(_nesting, "depth", 0)
    if depth >= _MOST_NESTED:
        out += b"~"
        return
    _nesting.depth = depth + 1
    try:
        _encode(value, out)
    finally:
        _nesting.depth = depth


def _encoded_within(value: Any) -> bytes:
    out = bytearray()
    _encode_within(value, out)
    return bytes(out)


def _compares_fields(kind: Any) -> bool:
    """Whether ``kind`` is a dataclass whose ``==`` is the one dataclasses generate: its compared fields, in order."""
    parameters = getattr(kind, "__dataclass_params__", None)
    equal = getattr(kind.__eq__, "__code__", None)
    return bool(
        parameters is not None
        and parameters.eq
        and equal is not None
        and equal.co_filename == "<string>"  # generated, not the class's own
    )


_LENGTH = struct.Struct("<I")


def _encoded(value: Any) -> bytes:
    out = bytearray()
    _encode(value, out)
    return bytes(out)


def stable_hash(key: Any) -> int:
    """A 64-bit hash of ``key`` that is identical in every process and run, and equal for equal keys."""
    depth = getattr(_nesting, "depth", 0)  # a key's __reduce_ex__ may hash another key: that one starts afresh
    _nesting.depth = 0
    try:
        encoded = _encoded(key)
    finally:
        _nesting.depth = depth
    return int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little")
