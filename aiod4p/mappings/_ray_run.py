"""What the ray mapping does with Ray (see :mod:`aiod4p.mappings.ray`), apart so that importing the mapping
does not import Ray: this module, and Ray with it, is imported in a thread as a run starts.

- joining a cluster: ``ray.init(address=...)`` (``None``: the ``RAY_ADDRESS``
  environment variable, else a new local Ray); the mapping disconnects (and
  stops a Ray it started) after the run, unless Ray was initialised already;
- starting workers: one actor per worker with ``num_cpus`` and ``resources``
  each, in a placement group that reserves every worker's share at once
  (spread over the nodes): a run waiting for the cluster holds nothing, so
  runs that share a cluster queue instead of each holding part of it and
  waiting for the rest; each actor is given the job shipped once
  (:func:`~aiod4p.mappings._shipping.ship`, in Ray's object store), the
  driver's ``sys.path`` and its ``sys.argv``;
- the comms: :mod:`aiod4p.transports.ray` (actor calls with credits);
- dead workers: a pending call to each actor fails when it dies, which ends
  the worker for the :class:`~aiod4p.mappings._host.Supervisor`; actors are
  killed, and their placement group removed, after the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .._plan import ExecutionPlan
from .._processes import LEFTOVER_GRACE, children, descendants, kill_left, pidfds, reap
from .._signals import adopt_orphans, restore_signal_actions, signal_actions
from .._threads import DaemonThreadPool, at_hard_exit, finished_in_thread
from ..errors import MappingUnavailable
from ..transports.ray import DriverComm
from ._base import RunControl
from ._ray_worker import CONTROL, RayWorker
from ._shipping import Job, ship, shipped_drained
from .ray import warn_of_unknown_fields

if TYPE_CHECKING:
    from .ray import RayMapping

__all__ = ["RayRun"]


_RemoteWorker: Any = None  # ray.remote(RayWorker), made once

logger = logging.getLogger("aiod4p.ray")

_SHIPPED_FOR = "start Ray actors"  # what the job is pickled for, in the errors of ship()


class _SigtermNotice(logging.Filter):
    """Drops Ray's warning that ``ray.init``, called off the main thread, leaves SIGTERM alone: aiod4p
    handles SIGTERM itself (a drain), and the line would end up on the user's stderr at every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


logging.getLogger("ray._private.worker").addFilter(_SigtermNotice())

_cluster_resources: Callable[[], dict[str, float]] = ray.cluster_resources  # unannotated in Ray


class _Connection:
    """This process's connection to Ray: made by the first run that needs it, closed by the last one.

    A connection made by the caller (``ray.init`` before the run) is theirs: it is never closed here.
    """

    def __init__(self) -> None:
        self._users = 0
        self._owned = False
        self._adopting = False  # between the start of making the connection and the end of closing it
        self.local = False  # the connection is to a local Ray started here: it never grows
        self._before: set[int] = set()  # this process's children before it started a local Ray
        self._started: set[int] = set()  # the processes of a local Ray started here (raylet, GCS, ...)
        self._actions: dict[int, bytes] = {}  # the signal actions before Ray was joined here, put back after
        self._closed = threading.Event()  # ends the thread that made the connection
        self._lock = threading.Lock()
        # The runtime environment the connection was made with (None: made by the program, or none is open)
        self.runtime_env: dict[str, Any] | None = None

    def acquire(self, connect: Callable[[], bool], runtime_env: Mapping[str, Any] | None = None) -> None:
        """Count one more run, calling ``connect`` (whether it started a local Ray; it joins Ray with
        ``runtime_env``) first if Ray is not initialized."""
        with self._lock:
            if self._users == 0 and not ray.is_initialized():
                self._before = children({os.getpid()})
                # Ray's crash reporter takes over SIGTERM, SIGSEGV...; disconnecting, Ray sets their default
                # action, under Python: a SIGTERM would then kill the process (a restart's, a service's), undrained.
                self._actions = signal_actions()
                adopt_orphans(True)  # the agents a raylet leaves behind come back to this process
                self._adopting = True
                try:
                    self.local = self._connect_in_keeper(connect)
                except BaseException:
                    self._adopting = False
                    adopt_orphans(False)
                    restore_signal_actions(self._actions)
                    raise
                # SIGTERM is the run's (a drain), not a crash: Ray's reporter printed a stack of addresses for it,
                # and its alarm aborted the process (SIGABRT) 3 s later, in the middle of the drain.
                restore_signal_actions({signal.SIGTERM: self._actions[signal.SIGTERM]})
                # Ray's only: another thread's run may have started processes of its own meanwhile (multi's workers)
                self._started = {pid for pid in children({os.getpid()}) - self._before if _of_ray(pid)}
                self._owned = True
                self.runtime_env = dict(runtime_env or {})
            self._users += 1

    def share(self) -> None:
        """Count one more user of the connection that a run holds (it made it, or shares it)."""
        with self._lock:
            assert self._users > 0, "no run holds the connection"
            self._users += 1

    def release(self) -> None:
        """Count one run less; the last one closes a connection made here, and stops what is left of a
        local Ray it started: a run stopped while Ray was still starting (Ctrl-C) ends its raylet before
        the agents the raylet was starting, which then wait for it forever."""
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._owned:
                self._owned = self.local = False
                self.runtime_env = None
                tree = pidfds(descendants(self._started))
                # SIGTERM's action is the program's since the connection was made (acquire put it back): one it
                # installed or took out meanwhile is what Ray's disconnection must not undo, not the one before.
                actions = {**self._actions, **signal_actions((signal.SIGTERM,))}
                try:
                    ray.shutdown()
                    orphans = {pid for pid in children({os.getpid()}) - self._before if _of_ray(pid)}
                    tree += pidfds(descendants(orphans))
                    kill_left(tree, LEFTOVER_GRACE)
                    # every adopted one, orphaned before the kill or by it (a killed raylet's workers)
                    reap(tree, LEFTOVER_GRACE)
                finally:
                    self._adopting = False
                    adopt_orphans(False)
                    restore_signal_actions(actions)
                    self._closed.set()
                    for fd in tree:
                        os.close(fd)

    def abandon(self) -> None:
        """Kill what runs of the Ray processes started since this process began to make its connection, as it ends
        without closing it (:func:`~aiod4p._threads.hard_exit`: a second Ctrl-C while a local Ray starts, whose thread
        is then left under way). Ray's GCS and raylet would die with the process, but not the agents the raylet
        started, which wait a minute for the dead GCS. Takes no lock: the thread making the connection holds it."""
        if not self._adopting:
            return
        tree = pidfds(descendants({pid for pid in children({os.getpid()}) - self._before if _of_ray(pid)}))
        try:
            kill_left(tree, 0)
        finally:
            for fd in tree:
                os.close(fd)

    def _connect_in_keeper(self, connect: Callable[[], bool]) -> bool:
        """``connect()``, called in a thread that lives until :meth:`release` closes the connection: the processes
        of a local Ray (GCS, raylet) die with the thread that started them (Ray sets their ``PR_SET_PDEATHSIG``),
        and a run's own threads end with it while other runs, in other threads or loops, still use that Ray."""
        outcome: concurrent.futures.Future[bool] = concurrent.futures.Future()
        closed = self._closed = threading.Event()

        def keep() -> None:
            try:
                outcome.set_result(connect())
            except BaseException as exc:  # handed to the caller, which raises it
                outcome.set_exception(exc)
                return
            closed.wait()

        threading.Thread(target=keep, name="aiod4p-ray-connection", daemon=True).start()
        return outcome.result()


_CONNECTION = _Connection()
at_hard_exit(_CONNECTION.abandon)


def _of_ray(pid: int) -> bool:
    """Whether process ``pid`` is one of Ray's (a raylet, an agent, a worker: named so by their command lines)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ray::" in command or b"/ray/" in command


class _Handover:
    """The share of the connection that a thread joins for a run: the run gives it back once it stops,
    unless it gave up waiting for the thread first, in which case the thread gives it back itself.

    A signal (Ctrl-C) can end the run's wait at any point, and the loop with it, while Ray is still
    starting (the loop, closing, still waits for its executor's threads): exactly one side releases.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._joined = False
        self._given_up = False

    def joined(self) -> None:
        """Called by the thread once it joined: it releases the share if the run no longer waits for it."""
        with self._lock:
            self._joined = True
            abandoned = self._given_up
        if abandoned:
            _CONNECTION.release()

    def give_up(self) -> bool:
        """Called by the run when its wait ends, however it ends; whether the run holds the share."""
        with self._lock:
            self._given_up = True
            return self._joined


class _Kept:
    """A share of the connection kept over the attempts of one run (:func:`kept_connection`)."""

    held = False


_KEPT: contextvars.ContextVar[_Kept | None] = contextvars.ContextVar("aiod4p_ray_kept", default=None)


@contextlib.asynccontextmanager
async def kept_connection() -> AsyncIterator[None]:
    """Within it, the first run that joins Ray takes one more share of the connection, given back on leaving: the
    attempts of a run under ``restarts`` share one connection (and a local Ray started by the first, started
    once: some 7 s, a restart's cost otherwise) instead of each making, and closing, its own."""
    kept = _Kept()
    token = _KEPT.set(kept)
    try:
        yield
    finally:
        _KEPT.reset(token)
        if kept.held:
            await asyncio.to_thread(_CONNECTION.release)


class RayRun:
    """One execution: its share of the connection to Ray, its actors and their placement group."""

    def __init__(self, mapping: RayMapping, plan: ExecutionPlan) -> None:
        self.mapping = mapping
        self.plan = plan
        self.connected = False
        self.comms: dict[int, DriverComm] = {}
        self.group: PlacementGroup | None = None
        self.actors: list[Any] = []
        self.places: list[tuple[str, int]] = []
        self.serving: list[asyncio.Future[Any]] = []
        self.alive: list[asyncio.Future[Any]] = []

    async def start(self, job: Job, control: RunControl) -> dict[int, DriverComm]:
        """Ship the job, join Ray (concurrent runs share one connection), start the actors; the driver's
        ends of their control comms.

        Raises:
            GraphError: a PE cannot be pickled (before anything of Ray starts).
            MappingUnavailable: Ray cannot be joined, or did not start the actors within ``start_timeout``.
        """
        payload = ship(job, _SHIPPED_FOR, main=True)  # the actors cannot import the driver's __main__
        handover = _Handover()

        def acquire() -> None:
            _CONNECTION.acquire(functools.partial(self.mapping._connect, self.plan.workers), self.mapping.runtime_env)
            handover.joined()

        # Stopped meanwhile, the process waits (the loop's executor, as it closes) for a local Ray to start, and
        # then stops it; but not for a cluster's head that does not answer, which ray.init retries for minutes.
        threads = DaemonThreadPool(1, "aiod4p-ray-connect")
        if self.mapping._starts_local_ray():
            joining = asyncio.get_running_loop().run_in_executor(None, acquire)
        else:
            joining = asyncio.wrap_future(threads.submit("joining Ray", acquire))
        try:
            await joining
        finally:
            self.connected = handover.give_up()
            threads.close()
        if self.connected and (kept := _KEPT.get()) is not None and not kept.held:
            _CONNECTION.share()  # at once: the lock is held long only to make or close a connection, not while one is
            kept.held = True
        await self._start_actors(job, payload, control)
        self.comms = {wid: DriverComm(actor, CONTROL) for wid, actor in enumerate(self.actors)}
        return self.comms

    async def stop(self, finished: bool) -> None:
        """Kill the actors (whether or not the run ``finished``), then give back this run's share of the
        connection (once the comms stopped taking from the actors)."""
        for comm in self.comms.values():
            comm.abort()
        if self.connected:
            try:
                await self._kill_actors()
            finally:
                await asyncio.to_thread(_CONNECTION.release)

    async def _start_actors(self, job: Job, payload: bytes, control: RunControl) -> None:
        """Start one actor per worker, wait until each runs, then have each serve its share of ``job`` (shipped as
        ``payload``; shipped again drained if the run was drained meanwhile: see :meth:`start`).

        Ray's calls that create them, and the copy of the job into the object
        store, are made in a thread: they take milliseconds each (the first
        exports the actor class), which the caller's event loop would wait
        for. Cancelled meanwhile, the thread's call still ends first, so that
        :meth:`stop` kills every actor it created.

        Raises:
            MappingUnavailable: the cluster did not start them within ``start_timeout``, or it is a local Ray
                started for the run that has fewer resources than they reserve (it will never have more).
        """
        await finished_in_thread(self._create_actors)
        mapping, n = self.mapping, self.plan.workers
        self.alive = [_future(actor.alive.remote()) for actor in self.actors]
        started = [_future(actor.where.remote()) for actor in self.actors]
        try:
            async with asyncio.timeout(mapping.start_timeout):
                self.places = list(await asyncio.gather(*started))
        except TimeoutError:
            raise MappingUnavailable(
                f"the Ray cluster did not start {self._asked()} within {mapping.start_timeout:g} s;"
                f" its resources: {_cluster_resources()}"
            ) from None
        finally:
            for future in started:
                future.cancel()
        peers: list[set[int]] = [set() for _ in range(n)]
        for a, b in self.plan.worker_pairs():
            peers[a].add(b)
            peers[b].add(a)
        payload = shipped_drained(job, payload, control.draining, _SHIPPED_FOR)  # drained while Ray started
        shared = await finished_in_thread(ray.put, payload)  # one copy in the object store for every worker
        paths = [path for path in sys.path if path]
        self.serving = [
            _future(
                actor.serve.remote(
                    shared, {peer: self.actors[peer] for peer in sorted(peers[wid])}, paths, sys.argv, os.getcwd()
                )
            )
            for wid, actor in enumerate(self.actors)
        ]

    def _create_actors(self) -> None:
        """In a thread: reserve every worker's share and create one actor per worker (:attr:`group`,
        :attr:`actors`, each kept as it is made, for :meth:`stop`).

        Raises:
            MappingUnavailable: a local Ray started for the run has fewer resources than they reserve.
        """
        global _RemoteWorker
        if _RemoteWorker is None:
            _RemoteWorker = ray.remote(RayWorker)
        mapping, n = self.mapping, self.plan.workers
        options: dict[str, Any] = {"num_cpus": mapping.num_cpus, "max_restarts": 0}
        if mapping.resources:
            options["resources"] = mapping.resources
        if mapping.runtime_env and mapping.runtime_env != _CONNECTION.runtime_env:
            # Ray was joined without it (by the program, or by another run): the actors' own, which Ray merges
            # into the job's, as it does for any actor's. Ray takes no local working_dir or py_modules here.
            warn_of_unknown_fields(mapping.runtime_env)
            options["runtime_env"] = mapping.runtime_env
        # Every worker's share in one reservation, made at once or not at all: two runs on too small a
        # cluster would otherwise each start some of their actors and wait forever for the rest.
        share = {name: amount for name, amount in {"CPU": mapping.num_cpus, **mapping.resources}.items() if amount}
        total = _cluster_resources()
        if any(amount * n > total.get(name, 0) for name, amount in share.items()):
            if _CONNECTION.local:
                raise MappingUnavailable(
                    f"the local Ray started for the run cannot start {self._asked()}: it has {total}; start a"
                    " Ray with them (`ray start --head --resources ...`), then give its --address"
                )
            logger.warning(
                "the Ray cluster cannot start %s until nodes join it (waiting up to %g s): it has %s in all",
                self._asked(),
                mapping.start_timeout,
                total,
            )
        places: list[Any] = ["SPREAD"] * n  # workers that reserve nothing need no reservation
        if share:
            self.group = placement_group([share] * n, strategy="SPREAD")
            places = [PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i) for i in range(n)]
        for wid, place in enumerate(places):
            try:
                actor = _RemoteWorker.options(**options, scheduling_strategy=place)
            except (TypeError, ValueError) as exc:  # the runtime environment Ray takes only with ray.init
                raise ValueError(
                    f"runtime_env (fields {', '.join(map(str, mapping.runtime_env or {}))}): {str(exc).rstrip('.')};"
                    " Ray was joined before the run (ray.init): a runtime environment with local paths goes to"
                    " ray.init(runtime_env=...)"
                ) from None
            self.actors.append(actor.remote(wid))

    def _asked(self) -> str:
        """The actors the run asks for, in words."""
        mapping = self.mapping
        return (
            f"{self.plan.workers} worker actors of {mapping.num_cpus:g} CPU{'' if mapping.num_cpus == 1 else 's'}"
            f"{f' and {mapping.resources}' if mapping.resources else ''} each"
        )

    async def _kill_actors(self) -> None:
        """Kill every actor of the run, give back its reservation (in a thread, as they were made), and wait (a
        few ``grace`` periods at most) until Ray confirms the actors are gone."""
        try:
            await finished_in_thread(self._remove_actors)
            if self.alive:
                await asyncio.wait(self.alive, timeout=self.mapping.grace * 5)
        finally:  # also when the wait is cancelled (a signal during start-up): no failure is left unretrieved
            for future in (*self.alive, *self.serving):
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: a killed actor's calls fail, as expected
                future.cancel()

    def _remove_actors(self) -> None:
        """In a thread: kill the actors made so far and remove their placement group."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)

    async def exited(self, wid: int) -> None:
        """Wait until worker ``wid``'s actor died or its serve call ended."""
        await asyncio.wait({self.alive[wid], self.serving[wid]}, return_when=asyncio.FIRST_COMPLETED)

    async def death(self, wid: int) -> str:
        node, pid = self.places[wid]
        causes = [f.exception() for f in (self.alive[wid], self.serving[wid]) if f.done() and not f.cancelled()]
        cause = next((str(c).strip().splitlines()[0] for c in causes if c is not None), "it stopped responding")
        return f"worker actor {wid} (pid {pid} on Ray node {node[:12]}) died before the run finished: {cause}"


def _future(ref: Any) -> asyncio.Future[Any]:
    """An asyncio future of a Ray object reference."""
    return asyncio.wrap_future(ref.future())
