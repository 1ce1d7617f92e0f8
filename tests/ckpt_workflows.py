"""Workflows of the checkpoint tests: a keyed word count over a file, and helpers to observe progress."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aiod4p import PE, IterativePE, ProducerPE, WorkflowGraph
from aiod4p.sources import LinesSource, SourcePE

HOOK: Any = None
"""In-process tests set a callable: ``HOOK(seen)`` every 1000 words an instance of Count counts."""

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


class _Completed(logging.Handler):
    def __init__(self, callback: Callable[[int], None]) -> None:
        super().__init__(logging.INFO)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("checkpoint %d complete") and record.args:
            assert isinstance(record.args, tuple)
            self.callback(record.args[0])


@contextmanager
def on_completed(callback: Callable[[int], None]) -> Iterator[None]:
    """While the block runs, ``callback(n)`` as each checkpoint ``n`` completes (the coordinator logs it)."""
    log = logging.getLogger("aiod4p.checkpoint")
    level = log.level
    handler = _Completed(callback)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def write_words(path: str | os.PathLike[str], count: int, per_line: int = 10) -> None:
    """``count`` words, ``per_line`` a line, in a deterministic order."""
    with open(path, "w", encoding="utf-8") as out:
        for start in range(0, count, per_line):
            out.write(
                " ".join(WORDS[(i * 7 + i // 13) % len(WORDS)] for i in range(start, min(count, start + per_line)))
            )
            out.write("\n")


def expected_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            for word in line.split():
                counts[word] = counts.get(word, 0) + 1
    return counts


class Split(IterativePE):
    def process_item(self, line: str) -> Any:
        for word in line.split():
            self.write("output", (word, 1))


class Count(IterativePE):
    """Counts words; its counter is keyed state, so a restore may change its parallelism."""

    keyed_state = "counts"

    def __init__(self) -> None:
        super().__init__(grouping=[0])
        self.counts: dict[str, int] = {}
        self.seen = 0  # plain state of the instance

    def preprocess(self) -> None:
        _note_birth()

    def process_item(self, pair: tuple[str, int]) -> None:
        self.counts[pair[0]] = self.counts.get(pair[0], 0) + pair[1]
        self.seen += 1
        if self.seen % 1000 == 0:
            _maybe_kill()
            if HOOK is not None:
                HOOK(self.seen)
            progress = os.environ.get("AIOD4P_TEST_PROGRESS")
            if progress:
                with open(progress, "a", encoding="utf-8") as out:
                    out.write(f"{os.getpid()} {self.seen}\n")

    def postprocess(self) -> None:
        for word, count in sorted(self.counts.items()):
            self.write("output", (word, count))


_thousands = 0  # words counted by this process, in thousands
_born: int | None = None  # kills done when this process started: it kills only in its own attempt
_complete_at_birth: set[str] | None = None  # the complete checkpoints when this process started


def _note_birth() -> None:
    """With a kill plan: record, once a process, the kills done and the checkpoints complete as it starts."""
    global _born, _complete_at_birth
    plan = os.environ.get("AIOD4P_TEST_KILLS")
    if not plan or _born is not None:
        return
    directory = plan.rpartition(":")[0]
    _born = sum(1 for name in os.listdir(directory) if name.startswith("kill-"))
    after = os.environ.get("AIOD4P_TEST_KILLS_AFTER")
    _complete_at_birth = complete_checkpoints(after) if after else set()


def _forget_birth() -> None:
    """A forked worker starts afresh: what its parent counted or saw is not its own."""
    global _thousands, _born, _complete_at_birth
    _thousands, _born, _complete_at_birth = 0, None, None


os.register_at_fork(after_in_child=_forget_birth)


def complete_checkpoints(directory: str | os.PathLike[str]) -> set[str]:
    """The checkpoints in ``directory`` that have their manifest (written last)."""
    if not os.path.isdir(directory):
        return set()
    return {name for name in os.listdir(directory) if os.path.exists(os.path.join(directory, name, "MANIFEST.json"))}


def _maybe_kill() -> None:
    """In a worker process (a multi worker, an MPI rank, a Ray actor: any process but the one whose pid is
    ``AIOD4P_TEST_KILLS_SPARE``), with ``AIOD4P_TEST_KILLS="DIR:T1,T2,..."``: the k-th kill (k = kill files
    in DIR) happens in the first worker whose Count instances counted Tk words since it started: SIGKILL.

    With ``AIOD4P_TEST_KILLS_AFTER=CHECKPOINT_DIR``, a worker kills only once a checkpoint completed
    since it started, so that every restart resumes from a checkpoint taken after the one before.
    """
    global _thousands
    plan = os.environ.get("AIOD4P_TEST_KILLS")
    if not plan or os.environ.get("AIOD4P_TEST_KILLS_SPARE") == str(os.getpid()):
        return
    _thousands += 1
    directory, _, thresholds = plan.rpartition(":")
    moments = [int(t) for t in thresholds.split(",")]
    done = sum(1 for name in os.listdir(directory) if name.startswith("kill-"))
    after = os.environ.get("AIOD4P_TEST_KILLS_AFTER")
    _note_birth()
    if after and not complete_checkpoints(after) - (_complete_at_birth or set()):
        return
    if done == _born and done < len(moments) and _thousands * 1000 >= moments[done]:
        try:
            fd = os.open(os.path.join(directory, f"kill-{done}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


class DiesDraining(Split):
    """A :class:`Split` whose ``postprocess`` (in a drained live run: while it drains) SIGKILLs its worker
    process (not the process whose pid is ``AIOD4P_TEST_KILLS_SPARE``)."""

    def postprocess(self) -> None:
        if os.environ.get("AIOD4P_TEST_KILLS_SPARE") != str(os.getpid()):
            os.kill(os.getpid(), signal.SIGKILL)


class DiesSaving(Split):
    """A Split with its own snapshot(): with ``AIOD4P_TEST_DIE_SAVING=MARKER:CHECKPOINT_DIR``, the worker process
    whose instance is the first of this PE to snapshot for a checkpoint ``k >= 2`` being written (its directory
    has parts, no manifest, no part of this PE) is SIGKILLed in it, while the checkpoint is written (once: MARKER
    is created and holds ``k``). Checkpoint ``k`` then never completes, whatever the timing: the run may end
    before a given checkpoint is triggered, and an instance's final state is a snapshot too."""

    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    def snapshot(self) -> dict[str, int]:
        self.saves += 1
        plan = os.environ.get("AIOD4P_TEST_DIE_SAVING")
        spared = os.environ.get("AIOD4P_TEST_KILLS_SPARE") == str(os.getpid())
        if plan and not spared:
            marker, _, directory = plan.partition(":")
            writing = _being_written(directory, self.id)
            if writing is not None and writing >= 2:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(writing).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
        return {"saves": self.saves}

    def restore(self, state: dict[str, int]) -> None:
        self.saves = state["saves"]


def _being_written(directory: str, pe: str) -> int | None:
    """The newest checkpoint in ``directory`` that has parts, no manifest and no part of PE ``pe``."""
    if not os.path.isdir(directory):
        return None
    for name in sorted(os.listdir(directory), reverse=True):
        if name.startswith("chk-"):
            try:
                files = os.listdir(os.path.join(directory, name))
            except FileNotFoundError:  # an old checkpoint, deleted meanwhile as a newer one completed
                continue
            if files and "MANIFEST.json" not in files and not any(f.startswith(f"{pe}.") for f in files):
                return int(name[len("chk-") :])
    return None


class NextCheckpoint:
    """A checkpoint in ``directory`` completed after the source that waits for it opened (in its own attempt)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)

    def newest(self) -> int:
        """The id of the newest complete checkpoint, 0 if none."""
        names = complete_checkpoints(self.directory)
        return max((int(name[len("chk-") :]) for name in names if name.startswith("chk-")), default=0)


class HeldLines(SourcePE):
    """The lines of ``path``; after ``hold_after`` lines (counted from where a restore resumes it), the others
    wait until the file ``until`` exists, or with a :class:`NextCheckpoint`, until a checkpoint newer than
    the newest when the source opened has completed (the next one of each attempt of a restarted run).

    Checkpoints go on while the lines are held (a waiting source snapshots), so a test can make sure that
    a run reaches the checkpoints it waits for before its input ends, however fast the machine. Where and how
    long it holds is the graph's, not the checkpoint's: a restored attempt holds at its own gate (it held at the
    killed attempt's, after as many lines as that attempt held after).
    """

    checkpoint_exclude = ("until", "hold_after")

    def __init__(
        self, path: str | os.PathLike[str], until: str | os.PathLike[str] | NextCheckpoint, hold_after: int
    ) -> None:
        super().__init__()
        self.path, self.hold_after = os.fspath(path), hold_after
        self.until = until if isinstance(until, NextCheckpoint) else os.fspath(until)

    def open(self) -> _HeldStream:
        until = self.until
        if isinstance(until, NextCheckpoint):
            opened = until.newest()
            return _HeldStream(self.path, lambda: until.newest() > opened, self.hold_after)
        return _HeldStream(self.path, lambda: os.path.exists(until), self.hold_after)


class _HeldStream:
    def __init__(self, path: str, released: Callable[[], bool], hold_after: int) -> None:
        self.path, self.released, self.hold_after = path, released, hold_after
        self.start = 0

    def seek(self, offset: int) -> None:
        """The offset protocol: start with line ``offset``."""
        self.start = offset

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        # Read at once: an aborted run leaves its generator suspended, and no file open with it.
        with open(self.path, encoding="utf-8") as file:  # noqa: ASYNC230 - a small local file
            lines = file.read().splitlines()
        for number in range(self.start, len(lines)):
            if number == self.start + self.hold_after:
                while not self.released():  # noqa: ASYNC110 - made by other processes
                    await asyncio.sleep(0.01)  # ok-sleep: polls files that other processes write
            yield lines[number]


class HeldPerAttempt(SourcePE):
    """The lines of ``path``; in the attempt that started after ``k`` kills of the kill plan (``_maybe_kill``),
    those after line ``holds[k]`` wait until the file ``{gate}-{k}`` exists."""

    def __init__(self, path: str | os.PathLike[str], gate: str | os.PathLike[str], holds: tuple[int, ...]) -> None:
        super().__init__()
        self.path, self.gate, self.holds = os.fspath(path), os.fspath(gate), holds

    def open(self) -> _HeldStream:
        _note_birth()
        attempt = _born or 0
        return _HeldStream(self.path, lambda: os.path.exists(f"{self.gate}-{attempt}"), self.holds[attempt])


class PacedLines(ProducerPE):
    """The lines of ``path``, all in one call of a plain generator (dispel4py's usual source); until a checkpoint
    newer than the newest when the call began has completed, one line every 10 ms (``until``, a
    :class:`NextCheckpoint`; ``None``: not paced). ``read`` counts the lines it made: a restore must not count a
    line twice. Its pace is the graph's, not the checkpoint's (a restored graph's ``until``, not the killed one's).
    """

    checkpoint_exclude = ("until",)

    def __init__(self, path: str | os.PathLike[str], until: NextCheckpoint | None) -> None:
        super().__init__()
        self.path, self.until = os.fspath(path), until
        self.read = 0

    def produce(self) -> Iterator[str]:
        opened = self.until.newest() if self.until is not None else 0
        with open(self.path, encoding="utf-8") as file:
            lines = file.read().splitlines()
        for line in lines:
            if self.until is not None and self.until.newest() <= opened:
                time.sleep(0.01)  # paced: its checkpoints are taken within this call, between its lines
            self.read += 1
            yield line


def word_count(path: str | os.PathLike[str], split: Split | None = None, lines: PE | None = None) -> WorkflowGraph:
    """lines (``lines``, a :class:`LinesSource` of ``path`` by default) -> words (``split``, a :class:`Split` by
    default) -> keyed counts (results: (word, count))."""
    graph = WorkflowGraph()
    lines, count = lines if lines is not None else LinesSource(path), Count()
    split = split if split is not None else Split()
    # A restore finds PEs by id: explicit ids stay the same for graphs built again in one process.
    lines.id, split.id, count.id = "lines", "split", "count"
    graph.connect(lines, "output", split, "input")
    graph.connect(split, "output", count, "input")
    return graph


def held_word_count(words: str | os.PathLike[str], checkpoints: str | os.PathLike[str]) -> WorkflowGraph:
    """Word count whose input waits, after 100 lines, for a checkpoint in ``checkpoints`` of the attempt under way.

    A worker of a kill plan kills only once a checkpoint of its attempt completed: without the wait, a fast
    run (a quiet machine, or a restart that resumes near the end) could end before one, and never kill.
    """
    return word_count(words, lines=HeldLines(words, until=NextCheckpoint(checkpoints), hold_after=100))


def paced_word_count(words: str | os.PathLike[str], checkpoints: str | os.PathLike[str] | None) -> WorkflowGraph:
    """Word count whose input is a plain generator making every line in one call (:class:`PacedLines`, paced
    by the checkpoints in ``checkpoints``; ``None``: not paced)."""
    return word_count(words, lines=PacedLines(words, NextCheckpoint(checkpoints) if checkpoints is not None else None))


def held_word_count_module(words: str | os.PathLike[str], checkpoints: str | os.PathLike[str]) -> str:
    """The text of a workflow module for ``aiod4p run``: :func:`held_word_count`."""
    arguments = f"{os.fspath(words)!r}, {os.fspath(checkpoints)!r}"
    return f"from ckpt_workflows import held_word_count\n\ngraph = held_word_count({arguments})\n"


class Echo(IterativePE):
    """Hands each line on as a result at once; every 100 lines, a worker of a kill plan may die (the kill
    plan's moments count 1,000 per 100 lines here)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def preprocess(self) -> None:
        _note_birth()

    def process_item(self, line: str) -> str:
        self.seen += 1
        if self.seen % 100 == 0:
            _maybe_kill()
        return line


def held_echo(words: str | os.PathLike[str], checkpoints: str | os.PathLike[str]) -> WorkflowGraph:
    """The lines of ``words``, each a result as soon as it is read (held as :func:`held_word_count` holds them)."""
    graph = WorkflowGraph()
    lines, echo = HeldLines(words, until=NextCheckpoint(checkpoints), hold_after=100), Echo()
    lines.id, echo.id = "lines", "echo"
    graph.connect(lines, "output", echo, "input")
    return graph


def held_echo_module(words: str | os.PathLike[str], checkpoints: str | os.PathLike[str]) -> str:
    """The text of a workflow module for ``aiod4p run``: :func:`held_echo`."""
    arguments = f"{os.fspath(words)!r}, {os.fspath(checkpoints)!r}"
    return f"from ckpt_workflows import held_echo\n\ngraph = held_echo({arguments})\n"
