"""Ranks that replay, in a fixed order, a rank's death that rank 0 reports before the launcher hears of it.

    mpiexec -n 2 python -P tests/mpi_link_breaks.py SOCKET PIDFILE [dies|aborts]

They stand in for ``python -m aiod4p.mappings._mpi_job SOCKET`` (tests/test_checkpoint_multi.py).
Rank 0 takes the job from the launcher, reports what MPI raises on a link that broke (the transport's
own error, of a communicator freed under it), after its statistics as aiod4p's rank 0 does, and only
then lets rank 1 die: rank 1 writes its pid to PIDFILE and SIGKILLs itself, and mpiexec ends the job
with its banner naming that rank. On a loaded machine the same order came by chance: rank 0 saw the link
to a SIGKILLed rank fail, and reported it, before mpiexec ended the job. With ``aborts``, no rank dies:
once the launcher has closed its end, rank 0 ends the job with MPI_Abort, as aiod4p's rank 0 does after a
failure (mpiexec then names no dead rank).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

from mpi4py import MPI

from aiod4p._stats import InstanceStats
from aiod4p.errors import TransportError
from aiod4p.mappings._host import Failed, Stats
from aiod4p.mappings._mpi_env import receive_job
from aiod4p.mappings._mpi_ranks import every_rank_ready
from aiod4p.transports.mpi import MpiEndpoint
from aiod4p.transports.pipes import open_pipe_comm


async def _report_a_broken_link(address: str, wait_for_the_launcher: bool) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    sock.setblocking(False)
    await receive_job(sock)
    control = await open_pipe_comm(sock)
    endpoint = MpiEndpoint(MPI.COMM_SELF)  # a local duplicate: freeing it disturbs nobody
    endpoint._comm.Free()
    try:
        endpoint.poll()
    except TransportError as exc:
        await control.send(Stats([InstanceStats("count", 0, worker=0, items_in=1)]))
        await control.send(Failed(exc))  # written to the socket before rank 1 is told to die
    else:
        raise AssertionError("poll() on a freed communicator did not raise")
    while wait_for_the_launcher:
        try:
            await control.receive()
        except Exception:  # the launcher closed its end
            return


def main(address: str, pidfile: str, mode: str = "dies") -> None:
    asyncio.run(every_rank_ready())  # as aiod4p's ranks start: the job's end leaves none of MPI's files behind
    world = MPI.COMM_WORLD
    if world.Get_rank() == 0:
        asyncio.run(_report_a_broken_link(address, wait_for_the_launcher=mode == "aborts"))
        if mode == "aborts":
            world.Abort(1)
        world.send("die", dest=1)
        signal.pause()  # mpiexec ends this rank once rank 1 is dead
    else:
        world.recv(source=0)
        with open(pidfile, "w") as file:
            file.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(*sys.argv[1:])
