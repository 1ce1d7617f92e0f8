"""The ray mapping: the plan's workers as Ray actors, each an event loop running the engine.

Like every multi-process mapping, it contributes only how workers start and
which comm joins them (see ``docs/worker-host.md``); the worker host
(:mod:`aiod4p.mappings._host`) does the rest: results, statistics, drain,
pumped feeds, failures. What is Ray's (joining a cluster, starting the actors,
stopping them) is in :mod:`aiod4p.mappings._ray_run`, which a run imports, with
Ray, in a thread as it starts: importing Ray holds the interpreter for a
quarter of a second or more, and the caller's event loop with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._engine import Feed
from .._plan import ExecutionPlan
from .._results import ResultSink
from .._stats import InstanceStats
from ..errors import MappingUnavailable
from ..transports import Comm
from ._base import RunControl, available_cpus
from ._host import GRACE, STATS_INTERVAL
from ._hosted import HostedMapping
from ._shipping import Job

if TYPE_CHECKING:
    from ._ray_run import RayRun

if importlib.util.find_spec("ray") is None:  # the mapping's registry names the extra that brings it
    raise ModuleNotFoundError("No module named 'ray'", name="ray")

__all__ = ["RayMapping", "check_runtime_env", "warn_of_unknown_fields"]

OBJECT_STORE_MEMORY = 200 * 1024 * 1024  # bytes of a local Ray's object store
PROBE_TIMEOUT = 5.0  # seconds the head's GCS port has to accept a connection and answer
# An HTTP/2 client's connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with a
# SETTINGS frame (its 4th byte, the frame type, is 4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HOST_PORT = re.compile(r"\[?(?P<host>[^\[\]/]+?)\]?:(?P<port>\d+)")
# The GCS call the probe makes (any of its calls would do: the token is checked before the call is served).
_PROBED_CALL = "/ray.rpc.NodeInfoGcsService/GetClusterId"
_DATA, _HEADERS, _END_STREAM, _END_HEADERS = 0, 1, 0x1, 0x4  # HTTP/2 frame types and flags
# A gRPC status in a reply's headers, as a literal (gRPC's servers encode it so, not Huffman-coded)
_GRPC_STATUS = re.compile(rb"grpc-status(?P<length>[\x01-\x7f])")
_UNIMPLEMENTED, _UNAUTHENTICATED = 12, 16  # gRPC's status for a call the server has not, or without its token
_NOT_GRPC = -1  # the status of a call answered with an HTTP status other than 200: no gRPC server's answer
# The first header of an answer with an HTTP status other than 200 (gRPC's), as HPACK's static table indexes it:
# 204, 206, 304, 400, 404, 500
_OTHER_HTTP_STATUSES = [bytes([index]) for index in range(0x89, 0x8F)]

logger = logging.getLogger("aiod4p.ray")


class RayMapping(HostedMapping):
    """Ray actors joined by actor calls; ``-n N`` workers (default: one per local CPU).

    Args:
        address: the Ray cluster to join (``"auto"``, ``"HOST:PORT"``,
            ``"ray://HOST:10001"``); ``None``: ``RAY_ADDRESS``, else a new local Ray.
        num_cpus: CPUs each worker actor reserves (Ray's ``num_cpus``).
        resources: custom resources each worker actor reserves.
        runtime_env: Ray's runtime environment for the run's worker actors
            (``working_dir``, ``pip``, ``env_vars``, ...); where Ray was joined
            before the run, local paths go to ``ray.init(runtime_env=...)``.
        start_timeout: seconds to wait for the cluster to start every worker.
        stats_interval: seconds between the workers' statistics reports.
        grace: seconds to wait, after a worker failed because another one
            did, for the root cause to be reported.

    Raises:
        ValueError: ``address`` is empty (a shell variable that was not set, say).
    """

    name = "ray"
    workers_started = ("actor", "actors")

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        start_timeout: float = 60.0,
        stats_interval: float = STATS_INTERVAL,
        grace: float = GRACE,
    ) -> None:
        super().__init__(stats_interval=stats_interval, grace=grace)
        if address is not None and not address.strip():
            raise ValueError(
                f"the Ray address (--address) is empty ({address!r}): give the cluster's (auto, HOST:PORT or"
                " ray://HOST:10001), or none to use RAY_ADDRESS or start a local Ray"
            )
        self.address = address
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.runtime_env = dict(runtime_env or {})
        self.start_timeout = start_timeout

    @property
    def shares_cpus(self) -> bool:
        """The run starts a local Ray (no ``address``, no ``RAY_ADDRESS``, no connection yet), whose
        workers all share this machine's CPUs."""
        ray = sys.modules.get("ray")  # not imported yet: not initialised
        return self._starts_local_ray() and not (ray is not None and ray.is_initialized())

    def _starts_local_ray(self) -> bool:
        return self.address is None and not os.environ.get("RAY_ADDRESS")

    async def execute(
        self,
        plan: ExecutionPlan,
        feeds: Mapping[str, Feed],
        sink: ResultSink,
        control: RunControl,
        max_delay: float,
    ) -> list[InstanceStats]:
        """As :meth:`HostedMapping.execute`; with ``restarts``, the connection to Ray that the first attempt makes
        is kept until the last one ends, so that a restart does not start (and stop) a local Ray again."""
        if self.checkpointing is None or not self.checkpointing.restarts:
            return await super().execute(plan, feeds, sink, control, max_delay)
        module = await asyncio.to_thread(importlib.import_module, "aiod4p.mappings._ray_run")
        async with module.kept_connection():
            return await super().execute(plan, feeds, sink, control, max_delay)

    def launch(self, plan: ExecutionPlan) -> _RayLaunch:
        """Ray actors for a run of ``plan``; starting them raises :class:`~aiod4p.errors.MappingUnavailable`
        when Ray cannot be joined or cannot start them."""
        return _RayLaunch(self, plan)

    def _connect(self, workers: int) -> bool:
        """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray with room for ``workers``
        actors (as many CPUs as this process may use, or more when they need more, as the multi mapping starts
        as many processes as it is given); whether it started one. Called in a thread, Ray imported."""
        import ray

        if logging.getLogger().getEffectiveLevel() >= logging.ERROR:  # aiod4p run -q: Ray's own notes too
            logging.getLogger("ray").setLevel(logging.ERROR)
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
        if self.runtime_env:
            warn_of_unknown_fields(self.runtime_env)
            options["runtime_env"] = self.runtime_env
        if self._starts_local_ray():
            cpus = max(available_cpus(), math.ceil(workers * self.num_cpus))
            try:
                # "local": a new Ray even where `ray start` ran (its address file, perhaps stale, would be joined)
                ray.init(address="local", num_cpus=cpus, object_store_memory=OBJECT_STORE_MEMORY, **options)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
                raise MappingUnavailable(f"cannot start a local Ray: {exc}") from exc
            return True
        address = self.address or os.environ["RAY_ADDRESS"]
        where = self.address or f"{address} (RAY_ADDRESS)"
        # RayError: Ray's AuthenticationError (RAY_AUTH_MODE=token and no token), which says what to do
        try:
            if (problem := _not_a_gcs(address)) is not None:
                raise MappingUnavailable(f"cannot join the Ray cluster at {where}: {problem}")
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            raise MappingUnavailable(f"cannot join the Ray cluster at {where}: {exc}") from exc
        return False


def check_runtime_env(runtime_env: Mapping[str, Any]) -> list[str]:
    """Check ``runtime_env`` as Ray will as the run starts; the fields it has that Ray does not know, which Ray
    takes for a plugin's and ignores without one (``env_var`` for ``env_vars``: the variables never reach the
    workers). Imports Ray.

    Raises:
        ValueError: a field has a value that Ray refuses (``env_vars`` that are not strings, a ``working_dir`` that
            does not exist, ...), said as Ray says it.
    """
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return sorted(set(runtime_env) - RuntimeEnv.known_fields)


def warn_of_unknown_fields(runtime_env: Mapping[str, Any]) -> None:
    """Check ``runtime_env`` as :func:`check_runtime_env` does, and warn of each field of it that Ray does not know.

    Raises:
        ValueError: a field has a value that Ray refuses, said naming ``runtime_env``.
    """
    from ray.runtime_env import RuntimeEnv

    try:
        unknown = check_runtime_env(runtime_env)
    except ValueError as exc:
        # its fields, not their values: env_vars may hold a token
        raise ValueError(f"the Ray runtime environment (fields {', '.join(map(str, runtime_env))}): {exc}") from None
    for field in unknown:
        logger.warning(
            "the runtime environment's field %r is none of Ray's (%s): Ray ignores it unless the cluster has a"
            " runtime environment plugin of that name",
            field,
            ", ".join(sorted(name for name in RuntimeEnv.known_fields if not name.startswith("_"))),
        )


def _not_a_gcs(address: str) -> str | None:
    """Why ``HOST:PORT`` is not the GCS of a Ray head this process may join, or ``None`` if it may be (or
    ``address`` is another form: ``auto``, ``ray://...``). ``ray.init`` retries a port that refuses or does not
    speak gRPC for about a quarter of an hour, and a head that requires a token this process does not send (or
    not the one it sends) for 20 s, printing Ray's warnings each second, then fails naming neither.

    The probe makes one call to the GCS, with the token Ray would send (:func:`_token_header`): a head that
    requires another one answers it with gRPC's ``UNAUTHENTICATED``. Called with Ray imported.

    Raises:
        ray.exceptions.AuthenticationError: this process asks for token authentication and has no token."""
    if address.lower().startswith(("http://", "https://")):
        return (
            "that is an HTTP address (the head's dashboard, which `ray job submit` takes); the run joins the head's"
            " GCS: HOST:PORT (6379 unless `ray start --head --port` chose another), or auto on a node of the cluster"
        )
    if (found := _HOST_PORT.fullmatch(address)) is None or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    token = _token_header()
    try:
        probe = socket.create_connection((found["host"], int(found["port"])), timeout=PROBE_TIMEOUT)
    except socket.gaierror as exc:
        return f"unknown host {found['host']!r} ({exc.strerror})"
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT:g} s"
    except OSError as exc:
        return f"nothing listens there ({exc.strerror or exc})"
    with probe:
        try:
            probe.sendall(_HTTP2_PREFACE + _gcs_call(address, token))
            answer = _frame(probe)
        except TimeoutError:
            return f"no answer within {PROBE_TIMEOUT:g} s"
        except OSError:  # the connection was reset: by a server that does not speak HTTP/2
            answer = None
        status = None if answer is None or answer[0] != 4 else _call_status(probe)
    if answer is None or answer[0] != 4 or status in (_NOT_GRPC, _UNIMPLEMENTED):  # another service (gRPC, HTTP/2)
        return "that port is not a Ray head's (its GCS port, 6379 unless `ray start --head --port` chose another)"
    if status != _UNAUTHENTICATED:
        return None
    if token is None:
        return (
            "the cluster requires token authentication, and this process sends no token (RAY_AUTH_MODE is not"
            " 'token'): set RAY_AUTH_MODE=token, and the cluster's token in RAY_AUTH_TOKEN or in a file named by"
            " RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token)"
        )
    return (
        "the cluster rejected this process's authentication token (RAY_AUTH_TOKEN, else the file named by"
        " RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token): give the cluster's token there"
    )


def _token_header() -> str | None:
    """The ``authorization`` header Ray sends to a head from this process: with ``RAY_AUTH_MODE=token``, the
    token of ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; ``None`` without (or with a
    Ray that has no token authentication).

    Raises:
        ray.exceptions.AuthenticationError: ``RAY_AUTH_MODE=token`` and no token (or an unreadable file)."""
    try:
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # Ray >= 2.52
    except ImportError:
        return None
    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token():
        return None
    header: str | None = loader.get_token_for_http_header().get("authorization")
    return header


def _gcs_call(address: str, token: str | None) -> bytes:
    """An HTTP/2 client's frames for one gRPC call to the GCS at ``address`` (stream 1: its headers, with
    ``token`` as ``authorization``, and an empty request)."""
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", _PROBED_CALL),
        (":authority", address),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if token is not None:
        headers.append(("authorization", token))
    block = b"".join(b"\0" + _hpack_string(name) + _hpack_string(value) for name, value in headers)
    return _http2_frame(_HEADERS, _END_HEADERS, block) + _http2_frame(_DATA, _END_STREAM, bytes(5))


def _hpack_string(text: str) -> bytes:
    """``text`` as an HPACK string literal (not Huffman-coded): its length as a 7-bit prefixed integer, then it."""
    data = text.encode()
    length, prefix = len(data), []
    if length < 127:
        prefix.append(length)
    else:
        prefix.append(127)
        length -= 127
        while length >= 128:
            prefix.append(length % 128 + 128)
            length //= 128
        prefix.append(length)
    return bytes(prefix) + data


def _http2_frame(kind: int, flags: int, payload: bytes) -> bytes:
    """An HTTP/2 frame of stream 1."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + (1).to_bytes(4, "big") + payload


def _frame(connection: socket.socket) -> tuple[int, int, int, bytes] | None:
    """The next HTTP/2 frame read from ``connection`` (its type, flags, stream and payload); ``None`` if the
    connection closed first or what came is not one."""
    header = _received(connection, 9)
    if header is None or header[3] > 9:  # HTTP/2 defines frame types 0 to 9
        return None
    payload = _received(connection, int.from_bytes(header[:3], "big"))
    if payload is None:
        return None
    return header[3], header[4], int.from_bytes(header[5:], "big") & 0x7FFFFFFF, payload


def _received(connection: socket.socket, size: int) -> bytes | None:
    """``size`` bytes read from ``connection``, or ``None`` if it closed first."""
    data = b""
    while len(data) < size:
        if not (piece := connection.recv(size - len(data))):
            return None
        data += piece
    return data


def _call_status(connection: socket.socket) -> int | None:
    """The gRPC status the GCS answered the probe's call with (read from ``connection``), :data:`_NOT_GRPC` if an
    HTTP status other than 200 answered it, or ``None`` if nothing answered it within :data:`PROBE_TIMEOUT` or no
    status can be read."""
    with contextlib.suppress(OSError):  # TimeoutError included: a busy head, left to ray.init
        while (frame := _frame(connection)) is not None:
            kind, flags, stream, payload = frame
            if stream != 1 or kind != _HEADERS:
                if stream == 1 and flags & _END_STREAM:
                    return None
                continue
            if payload[:1] in _OTHER_HTTP_STATUSES:
                return _NOT_GRPC
            if (found := _GRPC_STATUS.search(payload)) is not None:
                value = payload[found.end() : found.end() + found["length"][0]]
                return int(value) if value.isdigit() else None
            if flags & _END_STREAM:
                return None
    return None


class _RayLaunch:
    """A run's Ray actors: a :class:`~aiod4p.mappings._ray_run.RayRun`, made once its module is imported."""

    ships_held_feeds = True  # the job is pickled once, for every actor

    def __init__(self, mapping: RayMapping, plan: ExecutionPlan) -> None:
        self.mapping = mapping
        self.plan = plan
        self.run: RayRun | None = None

    async def start(self, job: Job, control: RunControl) -> Mapping[int, Comm]:
        """Import :mod:`~aiod4p.mappings._ray_run` (and Ray) in a thread, then start the run's actors
        (:meth:`~aiod4p.mappings._ray_run.RayRun.start`, which says what it raises)."""
        module = await asyncio.to_thread(importlib.import_module, "aiod4p.mappings._ray_run")
        self.run = module.RayRun(self.mapping, self.plan)
        return await self.run.start(job, control)

    async def exited(self, wid: int) -> None:
        assert self.run is not None
        await self.run.exited(wid)

    async def death(self, wid: int) -> str:
        assert self.run is not None
        return await self.run.death(wid)

    async def stop(self, finished: bool) -> None:
        if self.run is not None:
            await self.run.stop(finished)
