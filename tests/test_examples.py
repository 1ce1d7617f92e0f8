"""Every example runs, from the CLI and from Python, and gives the right answer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from conftest import MappingCase

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_wordcount(mapping: MappingCase) -> None:
    example = load("wordcount")
    results = mapping.run(example.build())
    counts = Counter(dict(results.data()))
    expected = Counter(example.TEXT.lower().split())
    assert counts == expected


def test_split_merge(mapping: MappingCase) -> None:
    example = load("split_merge")
    results = mapping.run(example.build(), 10).by_port()
    ((_, merged),) = [(k, v) for k, v in results.items() if k[1] == "merged"]
    assert merged == [[(n, n * (2 if n % 2 == 0 else 3)) for n in range(10)]]
    ((_, seen),) = [(k, v) for k, v in results.items() if k[1] == "seen"]
    instances = 1 if mapping.name == "simple" else 2
    assert sorted(seen) == [(i, 10) for i in range(instances)]


def test_async_io_gains_concurrency_from_parallelism() -> None:
    example = load("async_io")
    example.DELAY = 0.02
    sequential = MappingCase("async", 1).run(example.build(), 20).data()[0]
    concurrent = MappingCase("async", 10).run(example.build(), 20).data()[0]
    assert sequential["readings"] == concurrent["readings"] == 20
    assert sequential["seconds"] >= 20 * example.DELAY
    assert concurrent["seconds"] < sequential["seconds"] / 3


@pytest.mark.parametrize("name", ["wordcount", "split_merge", "async_io"])
def test_examples_run_from_the_cli(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "aiod4p", "run", str(EXAMPLES / f"{name}.py"), "-n", "2", "--results", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()]
