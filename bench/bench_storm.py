"""Throughput of one generated Storm bolt, driven over the multilang protocol as Storm's ShellBolt drives it.

    .venv/bin/python bench/bench_storm.py [TUPLES]

The bolt hosts an iterative PE (``item * 2``) from a generated project; the
baseline is a plain streamparse/pystorm bolt doing the same work
(``emit([x * 2])``) in the same harness. Both run as ``streamparse_run``
subprocesses over JSON pipes. *Pipelined*: a writer thread streams tuples
while a reader takes the emits and acks, as ShellBolt's threads do. *Lock-step*:
one tuple at a time, waiting for its ack. Writes bench/results/storm.md.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiod4p import FunctionPE, WorkflowGraph
from aiod4p.storm import build_project

HERE = Path(__file__).resolve().parent
RUNS = 5

BASELINE = """
from streamparse import Bolt


class PlainDouble(Bolt):
    outputs = ["item"]

    def process(self, tup):
        self.emit([tup.values[0] * 2])
"""


class Driver:
    """Storm's side of one bolt process."""

    def __init__(self, cwd: Path, script: str, context: dict[str, Any]) -> None:
        runner = str(Path(sys.executable).with_name("streamparse_run"))
        self.process = subprocess.Popen(
            [runner, script], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.pids = tempfile.TemporaryDirectory()
        conf = {"topology.name": "bench", "pystorm.log.level": "warning"}
        self.send({"conf": conf, "pidDir": self.pids.name, "context": context})
        assert "pid" in self.read()

    def send(self, message: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\nend\n").encode())
        self.process.stdin.flush()

    def read(self) -> Any:
        assert self.process.stdout is not None
        lines = []
        while (line := self.process.stdout.readline()) != b"end\n":
            if not line:
                raise RuntimeError("the bolt exited")
            lines.append(line)
        return json.loads(b"".join(lines))

    def cpu_seconds(self) -> float:
        """User + system CPU time of the bolt process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def pipelined(self, source: str, n: int) -> float:
        assert self.process.stdin is not None
        payload = b"".join(
            (
                json.dumps({"id": str(i), "comp": source, "stream": "output", "task": 1, "tuple": [i]}) + "\nend\n"
            ).encode()
            for i in range(n)
        )
        acks = 0

        def reader() -> None:
            nonlocal acks
            while acks < n:
                if self.read().get("command") == "ack":
                    acks += 1

        thread = threading.Thread(target=reader)
        started = time.perf_counter()
        thread.start()
        self.process.stdin.write(payload)
        self.process.stdin.flush()
        thread.join()
        return n / (time.perf_counter() - started)

    def lock_step(self, source: str, n: int) -> float:
        started = time.perf_counter()
        for i in range(n):
            self.send({"id": f"l{i}", "comp": source, "stream": "output", "task": 1, "tuple": [i]})
            while self.read().get("command") != "ack":
                pass
        return n / (time.perf_counter() - started)

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        self.process.stdout.read()
        self.process.wait(10)
        self.process.stdout.close()
        self.pids.cleanup()


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 50_000
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        graph = WorkflowGraph()
        # Built from importable callables: the workers unpickle the PEs (a class in __main__ would not do).
        source = FunctionPE(int, kind="producer", name="Numbers")
        twice = FunctionPE(functools.partial(operator.mul, 2), name="Twice")
        graph.connect(source, "output", twice, "input")
        src = build_project(graph, Path(tmp) / "project", name="bench").src
        (src / "plain_bolt.py").write_text(BASELINE)
        assert source.id is not None and twice.id is not None
        context = {"task->component": {"1": source.id, "2": twice.id}, "taskid": 2, "componentid": twice.id}
        drivers = {
            "plain pystorm bolt": Driver(src, "plain_bolt.PlainDouble", context),
            "aiod4p bolt (hosted PE)": Driver(src, f"aiod4p_components.{twice.id}", context),
        }
        try:
            for driver in drivers.values():  # warm up
                driver.pipelined(source.id, 2000)
            piped: dict[str, list[float]] = {name: [] for name in drivers}
            stepped: dict[str, list[float]] = {name: [] for name in drivers}
            cpu: dict[str, list[float]] = {name: [] for name in drivers}
            for _ in range(RUNS):  # interleaved
                for name, driver in drivers.items():
                    before = driver.cpu_seconds()
                    piped[name].append(driver.pipelined(source.id, n))
                    cpu[name].append((driver.cpu_seconds() - before) / n * 1e6)
                    stepped[name].append(driver.lock_step(source.id, n // 10))
        finally:
            for driver in drivers.values():
                driver.close()
    base = "plain pystorm bolt"
    rows = []
    for name in drivers:
        p, s, c = statistics.median(piped[name]), statistics.median(stepped[name]), statistics.median(cpu[name])
        rows.append(
            f"| {name} | {p:,.0f} | {p / statistics.median(piped[base]):.0%} | {c:.1f} |"
            f" {c / statistics.median(cpu[base]):.2f} | {s:,.0f} | {s / statistics.median(stepped[base]):.0%} |"
        )
    section = "\n".join(
        [
            "## Storm: one bolt driven over the multilang protocol",
            "",
            f"`.venv/bin/python bench/bench_storm.py {n}`: one bolt process (`streamparse_run`, JSON over pipes)"
            f" doubling integers, median of {RUNS} interleaved runs; pipelined = {n:,} tuples streamed while"
            f" the emits and acks are read (as Storm's ShellBolt does), lock-step = {n // 10:,} tuples, each"
            " waiting for its ack. The baseline is a plain streamparse bolt doing the same emit.",
            "",
            "| bolt | pipelined tuples/s | ratio | bolt CPU µs/tuple | ratio | lock-step tuples/s | ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            "Per tuple the aiod4p bolt also decodes the item, calls the PE through the engine's actor (a plain"
            " PE without an event-loop turn), and encodes the output (tuples tagged, keys computed). The CPU"
            " time of the bolt process per tuple is the figure least disturbed by a busy machine (load average"
            f" {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores during this run). On a cluster, Storm's own JSON"
            " handling and transfer come on top; scale with parallelism hints (one process per task).",
            "",
        ]
    )
    print(section)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "storm.md").write_text(section)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
