"""The MPI comm passes the transport conformance suite between two real ranks.

Run by pytest, this module launches ``mpiexec -n 2 python <this file>`` once.
Run as that script, rank 0 runs every check of ``conformance.CHECKS``; each
pair joins a comm of rank 0 to a comm of rank 1, which rank 0 drives
remotely (every send, receive and close of the far end is executed by rank 1
on its own comm, so every message really crosses ranks). Rank 0 prints one
JSON line per check; rank 1 prints nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mpi4py", reason="the mpi extra is not installed")

MPIEXEC = Path(sys.executable).parent / "mpiexec"
RPC_KEY = 1
CAPACITY = 16


class _Rpc:
    """Rank 0's calls to rank 1 over one MPI comm, several at a time."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.ids = itertools.count()
        self.calls: dict[int, asyncio.Future[Any]] = {}
        self.reader = asyncio.create_task(self._read())

    async def call(self, op: str, *args: Any) -> Any:
        call_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.calls[call_id] = future
        await self.comm.send((op, call_id, *args))
        return await future

    async def _read(self) -> None:
        while True:
            ok, call_id, value = await self.comm.receive()
            future = self.calls.pop(call_id)
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


def _remote_end(rpc: _Rpc, key: int) -> Any:
    from aiod4p.transports import Comm

    class RemoteEnd(Comm):
        """Rank 1's comm, driven from rank 0."""

        async def send(self, message: Any) -> None:
            await rpc.call("send", key, message)

        async def receive(self) -> Any:
            return await rpc.call("receive", key)

        async def aclose(self) -> None:
            await rpc.call("aclose", key)

        def abort(self) -> None:
            pending.add(task := asyncio.get_running_loop().create_task(rpc.call("abort", key)))
            task.add_done_callback(pending.discard)

    pending: set[asyncio.Task[Any]] = set()
    return RemoteEnd()


async def _rank0(endpoint: Any) -> None:
    from conformance import CHECKS, TransportUnderTest

    rpc = _Rpc(endpoint.comm(1, RPC_KEY, capacity=64))
    keys = itertools.count(10)

    async def make_pair() -> tuple[Any, Any]:
        key = next(keys)
        await rpc.call("open", key)
        return endpoint.comm(1, key, capacity=CAPACITY), _remote_end(rpc, key)

    transport = TransportUnderTest("mpi", make_pair, max_buffered=CAPACITY)
    for check in CHECKS:
        try:
            async with asyncio.timeout(20):
                await check(transport)
            outcome = "ok"
        except BaseException:
            outcome = traceback.format_exc()
        print(json.dumps({"check": check.__name__, "outcome": outcome}), flush=True)
    print(json.dumps({"check": "mpi_errors_become_broken_links", "outcome": _mpi_failure()}), flush=True)
    await rpc.call("stop")
    rpc.reader.cancel()
    await asyncio.gather(rpc.reader, return_exceptions=True)


def _mpi_failure() -> str:
    """An MPI error in the poller surfaces as PeerDied, a broken link (here: a freed communicator)."""
    from mpi4py import MPI

    from aiod4p.errors import PeerDied
    from aiod4p.transports.mpi import MpiEndpoint

    endpoint = MpiEndpoint(MPI.COMM_SELF)  # a local duplicate: freeing it disturbs nobody
    endpoint._comm.Free()
    try:
        endpoint.poll()
    except PeerDied as exc:
        return "ok" if "MPI failed on rank 0" in str(exc) else f"unexpected message: {exc}"
    return "poll() did not raise"


async def _rank1(endpoint: Any) -> None:
    control = endpoint.comm(0, RPC_KEY, capacity=64)
    comms: dict[int, Any] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def serve(op: str, call_id: int, args: tuple[Any, ...]) -> None:
        try:
            comm = comms[args[0]]
            if op == "send":
                value = await comm.send(args[1])
            elif op == "receive":
                value = await comm.receive()
            elif op == "abort":
                value = comm.abort()
            else:
                value = await comm.aclose()
            reply = (True, call_id, value)
        except Exception as exc:
            reply = (False, call_id, exc)
        await control.send(reply)

    while True:
        op, call_id, *args = await control.receive()
        if op == "stop":
            await control.send((True, call_id, None))
            break
        if op == "open":
            comms[args[0]] = endpoint.comm(0, args[0], capacity=CAPACITY)
            await control.send((True, call_id, None))
            continue
        task = asyncio.create_task(serve(op, call_id, tuple(args)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


async def _main() -> None:
    from aiod4p.transports.mpi import MpiEndpoint

    endpoint = MpiEndpoint()
    await (_rank0(endpoint) if endpoint.rank == 0 else _rank1(endpoint))
    await endpoint.aclose()


# -- under pytest ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    process = subprocess.Popen(
        [str(MPIEXEC), "-n", "2", sys.executable, __file__],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=50)
    finally:
        if process.poll() is None:  # hung: end the mpiexec and its ranks
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {line["check"]: line["outcome"] for line in lines}


def _check_names() -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from conformance import CHECKS

    return [check.__name__ for check in CHECKS] + ["mpi_errors_become_broken_links"]


@pytest.mark.parametrize("name", _check_names())
def test_conformance_between_two_ranks(outcomes: dict[str, str], name: str) -> None:
    assert outcomes.get(name) == "ok", outcomes.get(name, f"{name} did not run")


if __name__ == "__main__":
    from aiod4p._api import loop_factory

    with asyncio.Runner(loop_factory=loop_factory(True)) as runner:
        runner.run(_main())
