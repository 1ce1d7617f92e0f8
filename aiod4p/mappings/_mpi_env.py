"""Where the mpi mapping runs: under an mpiexec, or launching one. No mpi4py import here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import mmap
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from .._install import install_hint
from .._logging import logging_environment
from .._processes import descendants
from ..errors import MappingUnavailable, WorkerDied

__all__ = [
    "INSTALL_HINT",
    "NEEDS_MPI4PY",
    "SaidByRankZero",
    "files_held",
    "find_mpiexec",
    "forget_shared_memory",
    "forget_topology_file",
    "hand_stdin",
    "is_hydra",
    "job_files",
    "job_frame",
    "job_rank",
    "job_size",
    "mpiexec_extra_args",
    "names_hosts",
    "rank_environment",
    "ranks_here",
    "ranks_of",
    "receive_job",
    "take_launcher_state",
    "take_stdin",
]


class SaidByRankZero(WorkerDied):
    """Under the user's mpiexec, the workflow failed to start on this rank (not rank 0), as rank 0 says: for the
    same reason, or rank 0 names it (``aiod4p run`` says it once, on rank 0, rather than once per rank)."""


INSTALL_HINT = install_hint("mpi")
NEEDS_MPI4PY = f"the mpi mapping needs mpi4py: {INSTALL_HINT}"
# The shared-memory files MPICH maps in every rank of a node, as /proc/self/maps names them.
_SHARED_MEMORY = re.compile(r"/dev/shm/mpich_shm_\S+")

# The file in which MPICH's Hydra proxy hands the node's processor topology to its ranks (hwloc's XML).
_HYDRA_TOPOLOGY = re.compile(r"/tmp/hydra_hwloc_xmlfile_\w+")

# The rank and size variables of the process managers we know: MPICH's Hydra
# (PMI), PMIx-based ones (Open MPI 5, Slurm), and Open MPI's own.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def job_size() -> int | None:
    """The number of ranks when this process is a rank started by mpiexec, else ``None``.

    Read from the process manager's environment, so mpi4py need not be imported.
    """
    if not any(name in os.environ for name in _RANK_VARIABLES):
        return None
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


# The number of the job's ranks on this machine: Hydra's, Open MPI's and PMIx's variables.
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE")


def ranks_here() -> int | None:
    """How many ranks of this process's mpiexec job run on this machine, if the process manager says."""
    if job_size() is None:
        return None
    for name in _LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def job_rank() -> int:
    """This process's rank when it was started by mpiexec, else 0."""
    return _rank_in(os.environ) or 0


def _rank_in(environ: Mapping[str, str]) -> int | None:
    """The rank that ``environ`` gives its process, if it is an MPI rank's."""
    for name in _RANK_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def ranks_of(processes: set[int]) -> dict[tuple[str, int], int]:
    """The MPI rank of each of ``processes`` that is a rank, by its host's name (as Hydra names it in its messages)
    and pid, as its process manager told it in its environment; none for a process whose ``/proc/PID/environ``
    cannot be read (gone, another user's)."""
    found: dict[tuple[str, int], int] = {}
    for pid in processes:
        with contextlib.suppress(OSError):
            entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            environ = dict(entry.partition("=")[::2] for entry in entries)
            if (rank := _rank_in(environ)) is not None:
                found[environ.get("PMI_HOSTNAME") or socket.gethostname(), pid] = rank
    return found


_SYS_PATH_VARIABLE = "AIOD4P_LAUNCHER_SYS_PATH"  # the launcher's sys.path, for the ranks it starts
_ARGV_VARIABLE = "AIOD4P_LAUNCHER_ARGV"  # the launcher's sys.argv (a JSON list), for the ranks it starts
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # where aiod4p itself is imported from


def rank_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the ranks aiod4p launches: ``environ``, the launcher's ``sys.path`` and
    ``sys.argv``, and how the command line set logging up (``-q``, ``-v``:
    :func:`~aiod4p._logging.logging_environment`).

    The ranks take the launcher's ``sys.path`` entries and ``sys.argv`` up once started
    (:func:`take_launcher_state`), as multiprocessing's spawned workers do; ``PYTHONPATH`` gets only
    the directory aiod4p comes from (``python -m aiod4p.mappings._mpi_job`` must find it). A
    workflow's directory there came before the standard library while the interpreter started, so
    a module of the user's named as one of Python's (``types.py``) replaced it, and every rank failed at start-up.
    """
    env = dict(environ)
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)])
    # "" is the launcher's current directory (python -c, a REPL, a notebook): the ranks get it by name.
    env[_SYS_PATH_VARIABLE] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    env[_ARGV_VARIABLE] = json.dumps(sys.argv)
    env.update(logging_environment())
    return env


def take_launcher_state() -> None:
    """In a rank, put the entries of the launcher's ``sys.path`` (:func:`rank_environment`) that this rank's
    lacks in front of it, in the launcher's order, and make ``sys.argv`` the launcher's, so the workflow's
    modules import as in the launcher (a module that reads ``sys.argv`` at import, as dispel4py
    workflows do, reads the command line given to ``aiod4p run`` on every rank). A rank not started by
    :func:`rank_environment` keeps its own ``sys.argv``."""
    launcher = os.environ.get(_SYS_PATH_VARIABLE, "").split(os.pathsep)
    sys.path[:0] = [path for path in launcher if path and path not in sys.path]
    argv = os.environ.get(_ARGV_VARIABLE)
    if argv is not None:
        sys.argv = json.loads(argv)


def find_mpiexec() -> str:
    """The ``mpiexec`` of the MPI that mpi4py uses.

    ``AIOD4P_MPIEXEC`` wins: a path, or a bare name looked up on ``PATH`` as a shell does (``mpiexec`` once a
    cluster's MPI module is loaded); otherwise the one next to ``sys.executable`` (where the ``mpich`` wheel
    installs it). A system ``mpiexec`` on ``PATH`` is deliberately not used unasked: with another MPI it fails
    to start the ranks.

    Raises:
        MappingUnavailable: mpi4py is not installed, or no mpiexec was found (``AIOD4P_MPIEXEC`` names
            no program: said with what it names instead).
    """
    try:
        import mpi4py  # noqa: F401 - only checks that it is installed
    except ImportError as exc:
        raise MappingUnavailable(NEEDS_MPI4PY) from exc
    chosen = os.environ.get("AIOD4P_MPIEXEC")
    if chosen:
        if os.sep not in chosen:
            if (found := shutil.which(chosen)) is None:
                raise MappingUnavailable(f"AIOD4P_MPIEXEC names {chosen}, which is no program on PATH")
            return found
        if Path(chosen).is_dir():
            raise MappingUnavailable(f"AIOD4P_MPIEXEC names {chosen}, a directory: give the path of its mpiexec")
        if not Path(chosen).is_file():
            raise MappingUnavailable(f"AIOD4P_MPIEXEC names {chosen}, which does not exist")
        return chosen
    candidate = Path(sys.executable).parent / "mpiexec"
    if candidate.is_file():
        return str(candidate)
    raise MappingUnavailable(
        f"the mpi mapping found no mpiexec next to {sys.executable}: {INSTALL_HINT}"
        " (or set AIOD4P_MPIEXEC to the mpiexec of the MPI that mpi4py was built with)"
    )


@functools.cache
def is_hydra(mpiexec: str) -> bool:
    """Whether ``mpiexec`` is MPICH's Hydra, which prints the exit status of every rank once all have ended, given
    ``-print-all-exitcodes``: its program holds that option's name. The program is read, not run: the launch is
    to be its only run (a site's wrapper script may do more than print a version)."""
    try:
        with open(mpiexec, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as program:
            return program.find(b"print-all-exitcodes") >= 0
    except (OSError, ValueError):  # unreadable, or empty (which mmap refuses)
        return False


_RANK_COUNT_OPTIONS = frozenset({"-n", "-np", "--n", "--np", "-c"})  # Hydra's and Open MPI's


def mpiexec_extra_args() -> list[str]:
    """Extra mpiexec arguments from ``AIOD4P_MPIEXEC_ARGS`` (e.g. ``-f hostfile``).

    Raises:
        MappingUnavailable: they cannot be split as a shell would, or give the number of ranks (``-n``
            gives it).
    """
    text = os.environ.get("AIOD4P_MPIEXEC_ARGS", "")
    try:
        args = shlex.split(text)
    except ValueError as exc:
        raise MappingUnavailable(f"AIOD4P_MPIEXEC_ARGS cannot be split into arguments ({exc}): {text!r}") from None
    counts = [arg for arg in args if arg.split("=", 1)[0] in _RANK_COUNT_OPTIONS]
    if counts:
        raise MappingUnavailable(
            f"AIOD4P_MPIEXEC_ARGS gives the number of ranks ({counts[0]}): leave it out, and give it with -n"
        )
    return args


# mpiexec options that place ranks on named hosts: Hydra's and Open MPI's
_HOST_OPTIONS = frozenset(
    {"-f", "-hostfile", "--hostfile", "-machinefile", "--machinefile", "-host", "--host", "-hosts", "-H"}
)
_HOST_FILE_VARIABLES = ("HYDRA_HOST_FILE", "OMPI_MCA_orte_default_hostfile", "PRTE_MCA_prte_default_hostfile")


def names_hosts(args: list[str]) -> bool:
    """Whether mpiexec, given ``args``, may place ranks on other machines than this one
    (a host option among ``args``, or a host file set in the environment)."""
    given = {arg.split("=", 1)[0] for arg in args}
    return bool(given & _HOST_OPTIONS) or any(os.environ.get(name) for name in _HOST_FILE_VARIABLES)


_LENGTH = 8  # bytes of a job's length before the job, on the launcher's socket


def job_frame(payload: bytes) -> bytes:
    """What a launcher sends rank 0 on its socket to hand it the job ``payload``; :func:`receive_job` reads it."""
    return len(payload).to_bytes(_LENGTH, "big") + payload


def hand_stdin(sock: socket.socket) -> None:
    """Send rank 0, on its ``sock`` before its job, this process's standard input (its descriptor), for
    :func:`take_stdin`: a PE on rank 0 that reads ``sys.stdin`` reads what it would read on simple, as under
    ``mpiexec`` itself (whose own forwarding of stdin, Hydra's, ends the job past 64 KiB). Where ``sys.stdin``
    has no descriptor (closed, or replaced: a test's capture), rank 0 keeps the empty one mpiexec gave it."""
    try:
        fds = [] if sys.stdin is None else [sys.stdin.fileno()]
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        fds = []
    socket.send_fds(sock, [b"\0"], fds)  # on a new connection: never more than its buffer takes


async def take_stdin(sock: socket.socket) -> None:
    """Make the standard input :func:`hand_stdin` sent on ``sock`` (non-blocking) this process's (descriptor 0,
    which ``sys.stdin`` reads).

    Raises:
        ConnectionError: the launcher closed the socket first (it gave up the run).
    """
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())
    marker, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if not marker:
        raise ConnectionError("the launching process closed its socket before sending the job")
    for fd in fds:
        os.dup2(fd, 0)
        os.close(fd)


async def receive_job(sock: socket.socket) -> bytes:
    """The job a launcher sent on ``sock`` (non-blocking) with :func:`job_frame`.

    Raises:
        ConnectionError: the launcher closed the socket first (it gave up the run).
    """
    loop = asyncio.get_running_loop()

    async def exactly(size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = await loop.sock_recv(sock, min(size - len(data), 1 << 20))
            if not chunk:
                raise ConnectionError("the launching process closed its socket before sending the job")
            data += chunk
        return bytes(data)

    return await exactly(int.from_bytes(await exactly(_LENGTH), "big"))


def forget_shared_memory() -> None:
    """Unlink the shared-memory files this rank's MPI has mapped (MPICH's ``/dev/shm/mpich_shm_*``); call it
    once every rank of the job has started (after a barrier), before any can end.

    MPICH removes them in ``MPI_Finalize`` only: a job whose rank failed (``MPI_Abort``), was killed or was
    aborted left each node's files, megabytes of memory apiece, until the machine restarted. Unlinked, the
    memory stays while a rank maps it and is freed with the last one, however it ends.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return
    for path in set(_SHARED_MEMORY.findall(maps)):
        with contextlib.suppress(OSError):  # another rank of this node unlinked it first
            os.unlink(path)


def job_files(mpiexec: int) -> set[Path]:
    """The files that the processes under ``mpiexec`` (Hydra's proxies and the ranks on this machine) hold and
    that their end may leave behind: the topology files a proxy holds open (``/tmp/hydra_hwloc_xmlfile_*``)
    and the shared memory a rank maps (``/dev/shm/mpich_shm_*``); none without Linux's ``/proc``.

    A proxy removes its file when it exits by itself, not when a rank ends the job (``MPI_Abort``: a run that
    failed) or the job is killed (an aborted run); the ranks unlink both once every rank has initialized MPI
    (:func:`forget_shared_memory`, :func:`forget_topology_file`), not when the job is stopped before that (a
    run cancelled, or failing, while its ranks start). Each such run left files in ``/tmp`` and megabytes in
    ``/dev/shm``, and a process that runs workflows for days would fill them. The launcher notes them while
    the job runs, and removes them once the mpiexec is reaped.
    """
    return files_held(descendants({mpiexec}) - {mpiexec})


def files_held(processes: set[int]) -> set[Path]:
    """What :func:`job_files` finds, for the processes of a job already walked."""
    found: set[Path] = set()
    for pid in processes:
        with contextlib.suppress(OSError):
            found.update(map(Path, _SHARED_MEMORY.findall(Path(f"/proc/{pid}/maps").read_text())))
        found |= _held_topology_files(pid)
    return found


def _held_topology_files(pid: int) -> set[Path]:
    """The Hydra topology files (``/tmp/hydra_hwloc_xmlfile_*``) that process ``pid`` holds open and that still
    exist; none if it cannot be read (gone, another user's, no ``/proc``)."""
    found: set[Path] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                # an unlinked file reads as "PATH (deleted)", which does not match
                if _HYDRA_TOPOLOGY.fullmatch(target := os.readlink(f"/proc/{pid}/fd/{fd}")):
                    found.add(Path(target))
    return found


def forget_topology_file() -> None:
    """Unlink the topology file that this rank's Hydra proxy (its parent process) holds for the job
    (``/tmp/hydra_hwloc_xmlfile_*``); call it once every rank of the job has started (after a barrier).

    The proxy writes the node's hwloc topology there for its ranks, which read it in ``MPI_Init``, and removes
    it only when it exits by itself: not when a rank ends the job with ``MPI_Abort`` (a failed run), nor when
    the proxy is killed (its launcher killed). Each such job left a file in ``/tmp``, under the user's own
    mpiexec as under the one aiod4p starts. Nothing is removed when the parent holds no such file (another
    process manager, a rank started through a shell); the proxy's own removal at its exit then finds none,
    and says nothing.
    """
    for path in _held_topology_files(os.getppid()):
        with contextlib.suppress(OSError):  # another rank of this node unlinked it first
            path.unlink()
