"""The multi mapping's worker process: one event loop serving its share of the job."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
from collections.abc import Collection, Mapping

from .._api import loop_factory
from .._logging import configure_logging, launcher_logging
from .._signals import die_with_parent, release, report_crashes
from ..transports.pipes import PipeComm, open_pipe_comm
from ._host import serve_job
from ._shipping import Job, unship_or_error

__all__ = ["release_inherited_connections", "take_over_signals", "worker_main"]


def worker_main(
    wid: int,
    job: Job | bytes,
    control: socket.socket,
    peers: dict[int, socket.socket],
    inherited: list[socket.socket],
    started_with: Mapping[str, str],
    parent: int | None,
) -> None:
    """The target of a worker process: run its share of the job (shipped, unless forked), report, exit.

    ``started_with``: environment variables the launcher set only to start this process; taken out here.
    ``parent``: the launcher's pid if it is this process's parent; ``None`` under forkserver, whose server
    is the parent (it ends when the launcher does, and the worker with it).
    """
    report_crashes()  # spawned, or forked from a program that embeds the run (forked from the command: on already)
    told = launcher_logging()  # spawned: a new interpreter logs as the command line said (forked: it inherits)
    if told is not None:
        configure_logging(*told)
    for name in started_with:
        os.environ.pop(name, None)
    # Its own session, so its own scheduler autogroup: under CPU contention the workers of
    # one run get a core each, not one session's share (docs/multi.md). Ctrl-C and hang-ups
    # reach the parent alone, which decides; a worker dies with its parent.
    os.setsid()
    die_with_parent(parent)
    take_over_signals()
    for sock in inherited:
        sock.close()
    release_inherited_connections({control.fileno(), *(sock.fileno() for sock in peers.values())})
    with asyncio.Runner(loop_factory=loop_factory(True)) as runner:
        runner.run(_main(wid, job, control, peers))


def release_inherited_connections(keep: Collection[int]) -> None:
    """Let go of the caller's server sockets this forked process inherited, but those in ``keep``: each socket
    listening, and each connection accepted from one of them (its local address is the listener's).

    In a service, a forked worker would otherwise hold the service's listening socket and its clients'
    connections: a connection the service closes would stay open, its client would never see the end of it,
    and the port could not be bound again, until the run ended. Each is replaced by ``/dev/null`` rather than
    closed, so its number stays taken: the launcher's socket objects, copied into this process, never close a
    descriptor this process opens later. Connections the caller made itself (a PE's database connection opened
    before the run) are kept, and so are datagram sockets and the standard streams (under systemd, stdout and
    stderr are a stream socket to the journal). Nothing to do in a new interpreter (spawn, forkserver) nor where
    ``/proc`` is missing.
    """
    try:
        descriptors = [int(name) for name in os.listdir("/proc/self/fd")]
    except FileNotFoundError:
        return
    streams: dict[int, tuple[object, bool]] = {}  # descriptor -> (local address, listening)
    for fd in descriptors:
        if fd in keep or fd <= 2:
            continue
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            probe = socket.socket(fileno=fd)
        except OSError:  # the listing's own descriptor, closed since
            continue
        try:
            if probe.type == socket.SOCK_STREAM:
                streams[fd] = (_served_address(probe), bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)))
        except OSError:
            pass
        finally:
            probe.detach()
    served = {address for address, listening in streams.values() if listening and address is not None}
    devnull: int | None = None
    for fd, (address, listening) in streams.items():
        if listening or (address is not None and address in served):
            if devnull is None:
                devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, fd, inheritable=False)
    if devnull is not None:
        os.close(devnull)


def _served_address(sock: socket.socket) -> object:
    """What a listening socket and the connections accepted from it have alike: the family and port of an IP
    socket, the path of a Unix one (``None`` for an unnamed one: a socket pair's)."""
    address = sock.getsockname()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return (sock.family, address[1])
    return (sock.family, address) if address else None


def take_over_signals() -> None:
    """Leave SIGINT and SIGHUP to the parent, die by SIGTERM, then take the signals held since the fork
    (``_signals.held``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)  # a forked child must not poke the parent's event loop
    release()


async def _main(
    wid: int, job_data: Job | bytes, control_sock: socket.socket, peer_socks: dict[int, socket.socket]
) -> None:
    name = f"worker {wid}"
    # Loaded before any comm opens: a comm unpickles messages as they arrive, and an item may be of a class
    # the job brings along (a notebook's, which loading sets on this process's __main__).
    job: Job | Exception = unship_or_error(job_data, f"worker process {wid}")
    control = await open_pipe_comm(control_sock)
    peers: dict[int, PipeComm] = {}
    try:
        for peer, sock in peer_socks.items():
            peers[peer] = await open_pipe_comm(sock)
    except Exception as exc:
        job = job if isinstance(job, Exception) else exc
    try:
        await serve_job(job, wid, control, peers, name=name, launcher="the parent process")
    finally:
        for comm in peers.values():
            comm.abort()
        for sock in peer_socks.values():
            sock.close()
