"""A stand-in for Apache Storm's side of a topology, for tests (no Storm can be installed here).

:class:`ComponentProcess` plays one ShellBolt/ShellSpout: it starts the
command and script the topology definition names (``streamparse_run
<module.Class>``, the script as one argument, in the resources directory),
sends the handshake (configuration, context, pid directory), and exchanges
multilang JSON messages (``...\\nend\\n``) over the process's stdin and stdout.

:class:`StormHarness` routes tuples between the real component processes of a
generated project as Storm would, following the groupings read back from the
streamparse topology: shuffle (round robin), fields (hash of the grouping
fields), all, global (lowest task id). It tracks every spout tuple's tree like
Storm's ackers (a tuple completes when every tuple anchored to it is acked;
any fail fails it), sends the spouts ``ack``/``fail``, and heartbeats the
bolts. It runs in lock step: one tuple in flight at a time.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiod4p.storm import EOS_STREAM, decode, load_topology

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class HarnessError(AssertionError):
    """Something Storm would treat as fatal: a protocol violation or a dead component."""


def streamparse_run() -> str:
    """The ``streamparse_run`` of this interpreter (what Storm runs for Python components)."""
    local = Path(sys.executable).with_name("streamparse_run")
    found = str(local) if local.exists() else shutil.which("streamparse_run")
    if found is None:
        raise HarnessError("streamparse_run is not installed next to this Python or on PATH")
    return found


@dataclass
class Component:
    """A component of the topology, as read back from streamparse's Thrift definition."""

    name: str
    kind: str
    command: str
    script: str
    parallelism: int
    streams: dict[str, list[str]]
    inputs: dict[tuple[str, str], tuple[str, list[str]]]  # (source, stream) -> (grouping, fields)


def read_components(project: str | Path) -> dict[str, Component]:
    """Every component of the project's topology, read from streamparse's Thrift objects."""
    topology = load_topology(project).thrift_topology
    components: dict[str, Component] = {}
    for kind, table in (("spout", topology.spouts), ("bolt", topology.bolts)):
        for name, spec in table.items():
            obj = spec.spout_object if kind == "spout" else spec.bolt_object
            common = spec.common
            inputs = {(key.componentId, key.streamId): grouping_of(g) for key, g in common.inputs.items()}
            components[name] = Component(
                name,
                kind,
                obj.shell.execution_command,
                obj.shell.script,
                common.parallelism_hint,
                {stream: list(info.output_fields) for stream, info in common.streams.items()},
                inputs,
            )
    return components


def grouping_of(grouping: Any) -> tuple[str, list[str]]:
    """``(kind, fields)`` of a Thrift grouping: shuffle, fields, global, all, ..."""
    if grouping.fields is not None:
        return ("fields", list(grouping.fields)) if grouping.fields else ("global", [])
    for kind in ("shuffle", "all", "none", "direct", "local_or_shuffle"):
        if getattr(grouping, kind) is not None:
            return kind, []
    raise HarnessError(f"unsupported grouping {grouping!r}")


class ComponentProcess:
    """One component task running as a subprocess, driven over the multilang protocol."""

    def __init__(self, cwd: str | Path, script: str, *, env: dict[str, str] | None = None) -> None:
        self.script = script
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by kill()
        self.process = subprocess.Popen(
            [streamparse_run(), script],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env={**os.environ, **(env or {})},
        )
        self.pid_dir = tempfile.mkdtemp(prefix="storm-pids-")
        self.messages: list[Any] = []  # everything read, in order

    def handshake(self, conf: dict[str, Any], context: dict[str, Any]) -> int:
        """Send Storm's first message; returns the pid the component replies, after checking its pid file."""
        self.send({"conf": conf, "pidDir": self.pid_dir, "context": context})
        reply = self.read()
        if not isinstance(reply, dict) or "pid" not in reply:
            raise HarnessError(f"{self.script}: expected {{'pid': ...}} after the handshake, got {reply!r}")
        pid = int(reply["pid"])
        if not (Path(self.pid_dir) / str(pid)).exists():
            raise HarnessError(f"{self.script}: no pid file {pid} in {self.pid_dir}")
        return pid

    def send(self, message: Any) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(message) + "\nend\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            raise HarnessError(f"{self.script} is gone: {self.stderr_text()}") from None

    def read(self) -> Any:
        """The next message; raises if the process exits first (Storm would kill the worker)."""
        assert self.process.stdout is not None
        lines = []
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise HarnessError(f"{self.script} closed its stdout; stderr: {self.stderr_text()}")
            if line == b"end\n":
                break
            lines.append(line)
        text = b"".join(lines)
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            raise HarnessError(f"{self.script} wrote a message that is not JSON: {text[:300]!r}") from None
        self.messages.append(message)
        return message

    def read_until(self, done: Callable[[Any], bool]) -> list[Any]:
        """Messages up to and including the first one ``done`` accepts."""
        out = []
        while True:
            message = self.read()
            out.append(message)
            if done(message):
                return out

    def close(self, timeout: float = 10) -> tuple[list[Any], int]:
        """Close stdin (Storm went away); returns the remaining messages and the exit code."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        rest = []
        for message in _split(self.process.stdout.read()):
            rest.append(message)
        code = self.process.wait(timeout)
        return rest, code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        self.stderr.close()
        shutil.rmtree(self.pid_dir, ignore_errors=True)

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]


def _split(data: bytes) -> Iterator[Any]:
    for chunk in data.split(b"\nend\n"):
        if chunk.strip():
            yield json.loads(chunk)


def command(name: str, **fields: Any) -> Callable[[Any], bool]:
    """A predicate: the message is the command ``name`` (optionally with those fields)."""
    return lambda m: isinstance(m, dict) and m.get("command") == name and all(m.get(k) == v for k, v in fields.items())


@dataclass
class HarnessRun:
    """What a run through the harness observed."""

    results: list[tuple[str, str, Any]] = field(default_factory=list)  # (component, stream, item)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (component, message)
    logs: list[tuple[str, int, str]] = field(default_factory=list)
    spout_acks: int = 0
    spout_fails: int = 0
    heartbeats: int = 0
    exit_codes: dict[int, int] = field(default_factory=dict)

    def multiset(self) -> collections.Counter[tuple[str, str, str]]:
        return collections.Counter((pe, port, repr(item)) for pe, port, item in self.results)


class StormHarness:
    """Runs a generated project's components as Storm would, routing between them.

    Args:
        project: the project directory (``topologies/`` and ``src/``).
        env: extra environment of the component processes (e.g. ``PYTHONPATH``).
        heartbeat_every: send every bolt a heartbeat after this many tuples.
        conf: extra topology configuration sent in the handshake.
    """

    def __init__(
        self,
        project: str | Path,
        *,
        env: dict[str, str] | None = None,
        heartbeat_every: int = 50,
        conf: dict[str, Any] | None = None,
        deadline: float = 40.0,
    ) -> None:
        self.project = Path(project)
        self.components = read_components(self.project)
        self.env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)]), **(env or {})}
        self.heartbeat_every = heartbeat_every
        self.conf = {"topology.name": self.project.name, "topology.debug": False, **(conf or {})}
        self.deadline = deadline
        self.task_component: dict[int, str] = {}
        self.tasks: dict[str, list[int]] = {}
        task = 1
        for name in sorted(self.components):
            self.tasks[name] = list(range(task, task + self.components[name].parallelism))
            for t in self.tasks[name]:
                self.task_component[t] = name
            task += self.components[name].parallelism
        # (source, stream) -> [(dest component, grouping, field indices)]
        self.subscribers: dict[tuple[str, str], list[tuple[str, str, list[int]]]] = collections.defaultdict(list)
        for dest in self.components.values():
            for (source, stream), (grouping, fields) in dest.inputs.items():
                declared = self.components[source].streams[stream]
                missing = [f for f in fields if f not in declared]
                if missing:
                    raise HarnessError(f"{dest.name} groups {source}:{stream} on undeclared fields {missing}")
                self.subscribers[(source, stream)].append((dest.name, grouping, [declared.index(f) for f in fields]))
        self.processes: dict[int, ComponentProcess] = {}
        self.round_robin: dict[tuple[int, str], int] = collections.defaultdict(int)

    def context(self, task: int) -> dict[str, Any]:
        """The context Storm sends a task in the handshake."""
        name = self.task_component[task]
        me = self.components[name]
        return {
            "task->component": {str(t): c for t, c in self.task_component.items()},
            "taskid": task,
            "componentid": name,
            "streams": list(me.streams),
            "stream->outputfields": me.streams,
            "source->stream->fields": _nested({(s, st): self.components[s].streams[st] for (s, st) in me.inputs}),
            "source->stream->grouping": _nested(
                {
                    (s, st): {"type": g.upper(), **({"fields": f} if g == "fields" else {})}
                    for (s, st), (g, f) in me.inputs.items()
                }
            ),
        }

    def spawn(self, task: int) -> ComponentProcess:
        """Start the process of ``task`` (the handshake comes later, so processes start in parallel)."""
        component = self.components[self.task_component[task]]
        if component.command != "streamparse_run":
            raise HarnessError(f"{component.name}: unexpected command {component.command!r}")
        process = ComponentProcess(self.project / "src", component.script, env=self.env)
        self.processes[task] = process
        return process

    def run(self) -> HarnessRun:
        """Start every task, run the topology until every spout has finished and every tuple is done, stop."""
        result = HarnessRun()
        try:
            for task in sorted(self.task_component):
                self.spawn(task)
            for task, process in self.processes.items():
                process.handshake(self.conf, self.context(task))
            self._loop(result)
            for task, process in self.processes.items():
                rest, code = process.close()
                self._record_side_messages(task, rest, result)
                result.exit_codes[task] = code
        finally:
            for process in self.processes.values():
                process.kill()
        return result

    # -- routing ---------------------------------------------------------------
    def _targets(self, task: int, stream: str, values: list[Any]) -> list[int]:
        source = self.task_component[task]
        out: list[int] = []
        for dest, grouping, indices in self.subscribers.get((source, stream), []):
            tasks = self.tasks[dest]
            if grouping in ("shuffle", "local_or_shuffle", "none"):
                key = (task, dest)
                out.append(tasks[self.round_robin[key] % len(tasks)])
                self.round_robin[key] += 1
            elif grouping == "fields":
                text = json.dumps([values[i] for i in indices], sort_keys=True).encode()
                out.append(tasks[int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") % len(tasks)])
            elif grouping == "all":
                out.extend(tasks)
            elif grouping == "global":
                out.append(min(tasks))
            else:
                raise HarnessError(f"grouping {grouping} is not supported by the harness")
        return out

    def _loop(self, result: HarnessRun) -> None:
        queues: dict[int, collections.deque[dict[str, Any]]] = {t: collections.deque() for t in self.task_component}
        spout_commands: dict[int, collections.deque[dict[str, Any]]] = {
            t: collections.deque() for t, c in self.task_component.items() if self.components[c].kind == "spout"
        }
        finished: set[int] = set()
        tuple_roots: dict[str, set[tuple[int, Any, int]]] = {}
        pending: dict[tuple[int, Any, int], int] = {}
        generation: dict[tuple[int, Any], int] = collections.defaultdict(int)
        ids = iter(range(10**6, 10**9))
        delivered = 0
        started = time.monotonic()

        def complete(root: tuple[int, Any, int], kind: str) -> None:
            spout_commands[root[0]].append({"command": kind, "id": root[1]})

        def handle(task: int, message: Any) -> None:
            component = self.task_component[task]
            if not isinstance(message, dict):
                raise HarnessError(f"{component}: unexpected message {message!r}")
            kind = message.get("command")
            if kind == "emit":
                stream = message.get("stream", "default")
                values = message["tuple"]
                if stream not in self.components[component].streams:
                    raise HarnessError(f"{component} emitted on undeclared stream {stream!r}")
                if len(values) != len(self.components[component].streams[stream]):
                    raise HarnessError(f"{component} emitted {values!r} on {stream!r}: wrong number of fields")
                targets = self._targets(task, stream, values)
                if message.get("need_task_ids", True) and "task" not in message:
                    self.processes[task].send(targets)
                if stream != EOS_STREAM and not self.subscribers.get((component, stream)):
                    result.results.append((component, stream, decode(values[0])))
                if self.components[component].kind == "spout":
                    if stream == EOS_STREAM:
                        finished.add(task)
                    roots: set[tuple[int, Any, int]] = set()
                    if "id" in message:
                        generation[(task, message["id"])] += 1
                        root = (task, message["id"], generation[(task, message["id"])])
                        roots = {root}
                        if targets:
                            pending[root] = len(targets)
                        else:
                            complete(root, "ack")
                else:
                    roots = set()
                    for anchor in message.get("anchors", []):
                        if anchor not in tuple_roots:
                            raise HarnessError(f"{component} anchored onto {anchor}, which is acked, failed or unknown")
                        roots |= tuple_roots[anchor]
                    roots = {r for r in roots if r in pending}
                    for root in roots:
                        pending[root] += len(targets)
                for target in targets:
                    tuple_id = str(next(ids))
                    tuple_roots[tuple_id] = roots
                    queues[target].append(
                        {"id": tuple_id, "comp": component, "stream": stream, "task": task, "tuple": values}
                    )
            elif kind in ("ack", "fail"):
                roots = tuple_roots.pop(message["id"], None)
                if roots is None:
                    raise HarnessError(f"{component} {kind}ed {message['id']}, which is unknown or already done")
                for root in roots:
                    if root not in pending:
                        continue
                    if kind == "fail":
                        del pending[root]
                        complete(root, "fail")
                    else:
                        pending[root] -= 1
                        if pending[root] == 0:
                            del pending[root]
                            complete(root, "ack")
            else:
                self._record_side_messages(task, [message], result)

        def heartbeat_bolts() -> None:
            for task, process in self.processes.items():
                if self.components[self.task_component[task]].kind == "bolt":
                    process.send({"id": str(next(ids)), "comp": None, "stream": "__heartbeat", "task": -1, "tuple": []})
                    for message in process.read_until(command("sync")):
                        handle(task, message)
                    result.heartbeats += 1

        heartbeat_bolts()
        while True:
            if time.monotonic() - started > self.deadline:
                raise HarnessError(f"the topology did not finish within {self.deadline} s")
            busy = next((t for t, q in queues.items() if q), None)
            if busy is not None:
                tup = queues[busy].popleft()
                process = self.processes[busy]
                process.send(tup)
                for message in process.read_until(
                    lambda m, i=tup["id"]: command("ack", id=i)(m) or command("fail", id=i)(m)
                ):
                    handle(busy, message)
                delivered += 1
                if delivered % self.heartbeat_every == 0:
                    heartbeat_bolts()
                continue
            spout = next((t for t, q in spout_commands.items() if q), None)
            if spout is not None:
                message = spout_commands[spout].popleft()
                if message["command"] == "ack":
                    result.spout_acks += 1
                else:
                    result.spout_fails += 1
                self.processes[spout].send(message)
                for reply in self.processes[spout].read_until(command("sync")):
                    handle(spout, reply)
                continue
            idle = [t for t in spout_commands if t not in finished]
            if not idle:
                return
            for spout in idle:
                self.processes[spout].send({"command": "next", "id": ""})
                for reply in self.processes[spout].read_until(command("sync")):
                    handle(spout, reply)

    def _record_side_messages(self, task: int, messages: list[Any], result: HarnessRun) -> None:
        component = self.task_component[task]
        for message in messages:
            kind = message.get("command") if isinstance(message, dict) else None
            if kind == "log":
                result.logs.append((component, message.get("level", 2), message["msg"]))
            elif kind == "error":
                result.errors.append((component, message["msg"]))
            elif kind not in ("sync", "metrics"):
                raise HarnessError(f"{component}: unexpected message {message!r}")


def _nested(flat: dict[tuple[str, str], Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for (source, stream), value in flat.items():
        out[source][stream] = value
    return dict(out)
