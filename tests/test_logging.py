"""Logging: every record of a PE names its id and instance; -v and -q set the levels."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MappingCase
from workflows import Count

from aiod4p import IterativePE, WorkflowGraph
from aiod4p._logging import PEFormatter, configure_logging


class Chatty(IterativePE):
    def __init__(self) -> None:
        super().__init__(parallelism=2)

    def process_item(self, item: int) -> int:
        self.log(f"saw {item}")
        return item


# Mappings whose PEs run in this process (caplog sees their records).
@pytest.mark.parametrize("mapping", [MappingCase("simple", None), MappingCase("async", 2)], ids=lambda c: c.id)
def test_records_carry_pe_and_instance(mapping: MappingCase, caplog: pytest.LogCaptureFixture) -> None:
    graph = WorkflowGraph()
    graph.connect(Count(), "output", chatty := Chatty(), "input")
    with caplog.at_level(logging.INFO, logger="aiod4p.pe"):
        mapping.run(graph, 6)
    records = [r for r in caplog.records if r.getMessage().startswith("saw ")]
    assert sorted(r.getMessage() for r in records) == [f"saw {i}" for i in range(6)]
    assert {r.pe for r in records} == {chatty.id}  # type: ignore[attr-defined]
    expected = {0} if mapping.name == "simple" else {0, 1}
    assert {r.instance for r in records} == expected  # type: ignore[attr-defined]


def test_log_outside_a_run_names_the_pe(caplog: pytest.LogCaptureFixture) -> None:
    pe = Chatty()
    pe.id = "Lonely7"
    with caplog.at_level(logging.INFO, logger="aiod4p.pe"):
        pe.log("hello", logging.WARNING)
    (record,) = caplog.records
    assert (record.pe, record.instance, record.levelno) == ("Lonely7", 0, logging.WARNING)  # type: ignore[attr-defined]


def test_formatter_shows_where() -> None:
    formatter = PEFormatter("%(levelname)s %(name)s%(where)s: %(message)s")
    record = logging.LogRecord("aiod4p.pe", logging.INFO, __file__, 1, "hi", None, None)
    record.pe, record.instance = "Split3", 2
    assert formatter.format(record) == "INFO aiod4p.pe Split3[2]: hi"
    plain = logging.LogRecord("aiod4p", logging.WARNING, __file__, 1, "plain", None, None)
    assert formatter.format(plain) == "WARNING aiod4p: plain"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, pe_logger, own = logging.getLogger(), logging.getLogger("aiod4p.pe"), logging.getLogger("aiod4p")
    saved = (root.handlers[:], root.level, pe_logger.level, own.level, logging.basicConfig)
    yield
    for handler in set(root.handlers) - set(saved[0]):
        handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    pe_logger.setLevel(saved[2])
    own.setLevel(saved[3])
    logging.basicConfig = saved[4]  # type: ignore[misc]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("verbosity", "quiet", "root_level", "pe_level"),
    [
        (0, False, logging.WARNING, logging.INFO),
        (1, False, logging.INFO, logging.INFO),
        (2, False, logging.DEBUG, logging.DEBUG),
        (3, True, logging.ERROR, logging.ERROR),
    ],
)
def test_levels(verbosity: int, quiet: bool, root_level: int, pe_level: int) -> None:
    configure_logging(verbosity, quiet)
    assert logging.getLogger().level == root_level
    assert logging.getLogger("aiod4p.pe").getEffectiveLevel() == pe_level


@pytest.mark.usefixtures("restore_logging")
def test_handler_follows_the_current_stderr() -> None:
    configure_logging()
    first, second = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(first):
        logging.getLogger("aiod4p.pe").info("one", extra={"pe": "A0", "instance": 1})
    with contextlib.redirect_stderr(second):
        logging.getLogger("aiod4p.x").warning("two")
    assert first.getvalue().endswith("INFO aiod4p.pe A0[1]: one\n")
    assert second.getvalue().endswith("WARNING aiod4p.x: two\n")


@pytest.mark.usefixtures("restore_logging")
def test_a_workflows_basic_config_is_honoured(tmp_path: Path) -> None:
    # A workflow module calling logging.basicConfig as it imports: the command line configured logging first.
    configure_logging(quiet=True)
    log, shown = tmp_path / "flow.log", io.StringIO()
    with contextlib.redirect_stderr(shown):
        logging.basicConfig(level=logging.INFO, handlers=[logging.FileHandler(log), logging.StreamHandler()])
        logging.getLogger("flow").info("to the file")
        logging.getLogger("aiod4p.x").info("aiod4p's own keep their level")
    assert log.read_text() == "INFO:flow:to the file\n"
    assert shown.getvalue() == ""  # -q: errors only on the terminal
    again = logging.FileHandler(log)
    logging.basicConfig(level=logging.INFO, handlers=[again])  # again: nothing, as Python's
    again.close()
    logging.getLogger("flow").info("once")
    assert log.read_text() == "INFO:flow:to the file\nINFO:flow:once\n"
    configure_logging()
    with contextlib.redirect_stderr(shown):
        logging.basicConfig(level="DEBUG")
        logging.getLogger("flow").debug("on the terminal")
        logging.getLogger("aiod4p.x").info("hidden")
    assert shown.getvalue().endswith(" DEBUG flow: on the terminal\n")
    logging.basicConfig(level=logging.WARNING, force=True)  # Python's own: replaces aiod4p's handler
    assert [type(handler) for handler in logging.getLogger().handlers] == [logging.StreamHandler]


# -- the command line -----------------------------------------------------------------

FLOW = """
import logging
from aiod4p import IterativePE, ProducerPE, WorkflowGraph

class Numbers(ProducerPE):
    def __init__(self):
        super().__init__()
        self.id = "Numbers"
        self.n = 0
    def produce(self):
        self.n += 1
        return self.n

class Talk(IterativePE):
    def __init__(self):
        # dealt in turn, so that both instances log: a shuffle may send a short stream to one of them
        super().__init__(parallelism=2, grouping="round_robin")
        self.id = "Talk"
    def process_item(self, item):
        self.log(f"info {item}")
        self.log(f"debug {item}", logging.DEBUG)
        if item == 1:
            self.log("bad news", logging.ERROR)
        return item

graph = WorkflowGraph()
graph.connect(Numbers(), "output", Talk(), "input")
"""


def cli(tmp_path: Path, *extra: str, mapping: str) -> subprocess.CompletedProcess[str]:
    """``aiod4p run`` of FLOW with ``extra`` options on ``mapping`` (``multi-spawn``: multi, its workers spawned)."""
    path = tmp_path / "talk.py"
    path.write_text(textwrap.dedent(FLOW))
    env = {**os.environ, "AIOD4P_START_METHOD": "spawn"} if mapping == "multi-spawn" else None
    result = subprocess.run(
        [sys.executable, "-m", "aiod4p", "run", str(path), "-i", "4", "-n", "2", *extra, "-m", mapping.split("-")[0]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result


def lines(stderr: str, word: str) -> list[str]:
    return [line for line in stderr.splitlines() if f": {word}" in line]


@pytest.mark.parametrize("mapping", ["async", "multi", "multi-spawn", "mpi"])
def test_cli_shows_pe_messages_with_their_instance(tmp_path: Path, mapping: str) -> None:
    stderr = cli(tmp_path, mapping=mapping).stderr
    info = lines(stderr, "info")
    assert len(info) == 4
    assert all(" INFO aiod4p.pe Talk[" in line for line in info)
    assert {line.split("Talk[")[1][0] for line in info} == {"0", "1"}
    assert lines(stderr, "debug") == []
    assert len(lines(stderr, "bad news")) == 1


# mpi: the ranks aiod4p launches log as the command line says (they showed the PEs' messages under -q); so do
# workers started by spawn (they showed none, errors included).
@pytest.mark.parametrize("mapping", ["async", "multi-spawn", "mpi"])
def test_cli_verbose_twice_shows_debug(tmp_path: Path, mapping: str) -> None:
    stderr = cli(tmp_path, "-vv", mapping=mapping).stderr
    assert len(lines(stderr, "debug")) == 4 and " DEBUG aiod4p.pe Talk[" in lines(stderr, "debug")[0]


@pytest.mark.parametrize("mapping", ["async", "multi-spawn", "mpi"])
def test_cli_quiet_shows_errors_only(tmp_path: Path, mapping: str) -> None:
    stderr = cli(tmp_path, "-q", mapping=mapping).stderr
    assert " WARNING " not in stderr and " INFO " not in stderr
    assert lines(stderr, "info") == [] and lines(stderr, "debug") == []
    (bad,) = lines(stderr, "bad news")
    assert " ERROR aiod4p.pe Talk[" in bad
