"""Group-by hashing must be the same in every process, whatever PYTHONHASHSEED says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aiod4p import stable_hash

KEYS = ["station-7", 42, -3, 2.5, 1.0, None, True, b"raw", ("a", 1), ["a", 1], frozenset({1, 2}), {"k": [1, 2]}]
SCRIPT = f"""
import json
from aiod4p import stable_hash
print(json.dumps([stable_hash(k) for k in {KEYS!r}]))
"""


def test_stable_hash_is_identical_across_processes_and_hash_seeds() -> None:
    expected = [stable_hash(key) for key in KEYS]
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == expected


@pytest.mark.parametrize(("left", "right"), [(1, 1.0), ((1, "a"), [1, "a"]), (0, False)])
def test_equal_keys_hash_alike_where_python_says_they_are_equal(left: object, right: object) -> None:
    if left == right and type(left) in (int, float) and type(right) in (int, float):
        assert stable_hash(left) == stable_hash(right)
    elif isinstance(left, tuple):
        assert stable_hash(left) == stable_hash(right)  # tuples and lists are both sequences of keys
    else:
        assert stable_hash(left) != stable_hash(right)  # bool is its own key type


def test_hashes_spread_over_instances() -> None:
    counts = [0] * 4
    for index in range(4000):
        counts[stable_hash(f"key-{index}") % 4] += 1
    assert min(counts) > 800
