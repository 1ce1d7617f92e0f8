from collections.abc import Callable
from typing import Any

def deal_by_key(
    items: list[Any], key: Callable[[Any], Any], destinations: dict[Any, int], count: int, /
) -> list[list[Any]] | None: ...
