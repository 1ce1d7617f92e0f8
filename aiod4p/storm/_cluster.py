"""Finding the user's Storm cluster, checking that it answers, and submitting a project to it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Aiod4pError, MappingUnavailable
from ._project import Project, build_jar, streamparse_env

logger = logging.getLogger("aiod4p.storm")

__all__ = [
    "Cluster",
    "cluster_at",
    "configured_nimbus",
    "deactivate",
    "find_cluster",
    "kill",
    "nimbus",
    "probe",
    "submit",
    "topology_facts",
]

DEFAULT_PORT = 6627
ENV_NAME = "aiod4p"
_HOW = (
    'name one with --nimbus HOST:PORT, the STREAMPARSE_NIMBUS environment variable, "nimbus" in the'
    " environment of a streamparse config.json in the current directory, or nimbus.seeds in ~/.storm/storm.yaml"
)


@dataclass(frozen=True)
class Cluster:
    """Where Nimbus is and how streamparse should reach it.

    Attributes:
        host, port: Nimbus's Thrift address.
        origin: where the address came from (for messages).
        env: the streamparse environment to submit with (``config.json`` ``envs`` entry).
    """

    host: str
    port: int
    origin: str
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def cluster_at(address: str, origin: str, env: dict[str, Any] | None = None) -> Cluster:
    """The cluster whose Nimbus is at ``address``: ``HOST`` or ``HOST:PORT`` (default port :data:`DEFAULT_PORT`).

    ``origin`` says where the address came from; ``env`` is the streamparse environment to submit with.

    Raises:
        MappingUnavailable: ``address`` is not ``HOST`` or ``HOST:PORT`` (the message names ``origin``).
    """
    host, _, port = address.strip().rpartition(":") if ":" in address else (address.strip(), "", "")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise MappingUnavailable(f"{origin}: {address!r} is not HOST or HOST:PORT") from None
    if not host or not 0 < number < 65536:
        raise MappingUnavailable(f"{origin}: {address!r} is not HOST or HOST:PORT")
    return Cluster(host, number, origin, env or {})


def configured_nimbus(conf: Mapping[str, Any]) -> str | None:
    """The address of Nimbus in a Storm configuration (``storm.yaml``, a topology's conf), for :func:`cluster_at`:
    the first of ``nimbus.seeds`` (or ``nimbus.host``), at ``nimbus.thrift.port`` if set; ``None`` if there is none.
    """
    seeds = conf.get("nimbus.seeds") or ([conf["nimbus.host"]] if conf.get("nimbus.host") else [])
    if not seeds:
        return None
    port = conf.get("nimbus.thrift.port")
    return str(seeds[0]) if port is None else f"{seeds[0]}:{port}"


def _user_env(config: Path) -> dict[str, Any]:
    """The chosen environment of the streamparse configuration ``config`` (``{}`` for none). A file that is not
    JSON is a ``config.json`` of the user's own, not streamparse's: it is said, and left alone.

    Raises:
        MappingUnavailable: ``config`` cannot be read, or it has several environments and none is chosen
            (``AIOD4P_STORM_ENV``), or not the one chosen.
    """
    try:
        raw = config.read_bytes()
    except OSError as exc:
        raise MappingUnavailable(f"cannot read the streamparse configuration {config}: {exc}") from exc
    try:
        data = json.loads(raw.decode())
    except ValueError as exc:  # UnicodeDecodeError too: a UTF-16 file of a Windows editor
        logger.warning("%s is not JSON (%s): not read as a streamparse configuration", config, exc)
        return {}
    envs = data.get("envs") if isinstance(data, dict) else None
    if not isinstance(envs, dict) or not envs:
        return {}
    chosen = os.environ.get("AIOD4P_STORM_ENV")
    if chosen is None and len(envs) > 1:
        raise MappingUnavailable(
            f"{config} defines several environments ({', '.join(sorted(envs))}); choose one with AIOD4P_STORM_ENV"
        )
    name = chosen or next(iter(envs))
    if name not in envs:
        raise MappingUnavailable(f"{config} has no environment {name!r} (AIOD4P_STORM_ENV)")
    env = envs[name]
    return dict(env) if isinstance(env, dict) else {}


def _storm_yaml() -> Path | None:
    candidates = [Path("~/.storm/storm.yaml").expanduser()]
    if os.environ.get("STORM_CONF_DIR"):
        candidates.append(Path(os.environ["STORM_CONF_DIR"]) / "storm.yaml")
    if os.environ.get("STORM_HOME"):
        candidates.append(Path(os.environ["STORM_HOME"]) / "conf" / "storm.yaml")
    return next((path for path in candidates if path.is_file()), None)


def find_cluster(nimbus: str | None = None, config: str | Path = "config.json") -> Cluster:
    """Work out Nimbus's address, without contacting it.

    In order: ``nimbus`` (``--nimbus``), ``STREAMPARSE_NIMBUS``, the
    ``nimbus`` of the environment in ``config`` (a streamparse
    ``config.json``), then ``nimbus.seeds`` (or ``nimbus.host``) and
    ``nimbus.thrift.port`` of Storm's ``storm.yaml``.

    Raises:
        MappingUnavailable: no address is configured anywhere, or one is malformed.
    """
    config_path = Path(config)
    env = _user_env(config_path) if config_path.is_file() else {}
    if nimbus:
        return cluster_at(nimbus, "--nimbus", env)
    if os.environ.get("STREAMPARSE_NIMBUS"):
        return cluster_at(os.environ["STREAMPARSE_NIMBUS"], "STREAMPARSE_NIMBUS", env)
    if env.get("nimbus"):
        return cluster_at(str(env["nimbus"]), str(config_path), env)
    yaml_path = _storm_yaml()
    if yaml_path is not None:
        from ruamel.yaml import YAML

        try:
            conf = YAML(typ="safe", pure=True).load(yaml_path.read_text()) or {}
        except Exception as exc:
            raise MappingUnavailable(f"cannot read Storm's configuration {yaml_path}: {exc}") from exc
        address = configured_nimbus(conf)
        if address is not None:
            return cluster_at(address, str(yaml_path), env)
    raise MappingUnavailable(f"the storm mapping needs a Storm cluster, and none is configured: {_HOW}")


@contextlib.contextmanager
def nimbus(cluster: Cluster, timeout: float = 60.0) -> Iterator[Any]:
    """A Thrift client of ``cluster``'s Nimbus (streamparse's definition of Storm's API).

    ``timeout`` bounds each call: a JVM on a machine whose cores are all busy may take tens of seconds.

    Raises:
        thriftpy2 and socket errors: Nimbus cannot be reached.
    """
    warnings.filterwarnings("ignore", message="Cannot import msgpack", category=ImportWarning)
    from streamparse.thrift import Nimbus
    from thriftpy2.protocol import TBinaryProtocolFactory
    from thriftpy2.rpc import make_client
    from thriftpy2.transport import TFramedTransportFactory

    client = make_client(
        Nimbus,
        host=cluster.host,
        port=cluster.port,
        timeout=int(timeout * 1000),
        proto_factory=TBinaryProtocolFactory(),  # type: ignore[no-untyped-call]
        trans_factory=TFramedTransportFactory(),
    )
    try:
        yield client
    finally:
        client.close()


def probe(cluster: Cluster, timeout: float = 5.0) -> str:
    """Ask Nimbus for its cluster summary (a real Thrift call: an open port is no proof).

    Returns a one-line summary.

    Raises:
        MappingUnavailable: Nimbus does not answer, or has no supervisor to run topologies.
    """
    try:
        with nimbus(cluster, timeout) as client:
            info = client.getClusterInfo()
    except Exception as exc:
        raise MappingUnavailable(
            f"no Storm cluster is reachable: Nimbus at {cluster.address} (from {cluster.origin}) does not answer"
            f" ({type(exc).__name__}: {exc}); start Storm or {_HOW}"
        ) from exc
    supervisors = len(info.supervisors or [])
    if supervisors == 0:
        raise MappingUnavailable(f"Nimbus at {cluster.address} answers but has no supervisor to run topologies")
    versions = sorted({summary.version for summary in info.nimbuses or []})
    return f"Nimbus {cluster.address} (Storm {', '.join(versions) or '?'}), {supervisors} supervisor(s)"


def _topology_id(client: Any, name: str) -> str | None:
    return next((t.id for t in client.getClusterInfo().topologies or [] if t.name == name), None)


def kill(cluster: Cluster, name: str) -> bool:
    """Kill topology ``name`` at once (no grace period); False if it was not running."""
    from streamparse.thrift import KillOptions, NotAliveException

    with nimbus(cluster) as client:
        try:
            client.killTopologyWithOpts(name, KillOptions(wait_secs=0))
        except NotAliveException:
            return False
    return True


def deactivate(cluster: Cluster, name: str) -> None:
    """Deactivate topology ``name``: Storm stops asking its spouts for tuples (and tells them)."""
    with nimbus(cluster) as client:
        client.deactivate(name)


def topology_facts(cluster: Cluster, name: str) -> dict[str, Any]:
    """What Nimbus says about the running topology ``name``.

    Returns ``{"id", "conf" (its configuration), "topology" (the StormTopology
    as submitted), "info" (TopologyInfo: executors, errors)}``.

    Raises:
        Aiod4pError: no such topology runs.
    """
    with nimbus(cluster) as client:
        topology_id = _topology_id(client, name)
        if topology_id is None:
            raise Aiod4pError(f"no topology {name!r} runs on Nimbus {cluster.address}")
        return {
            "id": topology_id,
            "conf": json.loads(client.getTopologyConf(topology_id)),
            "topology": client.getUserTopology(topology_id),
            "info": client.getTopologyInfo(topology_id),
        }


def sparse_command() -> list[str]:
    """How to run streamparse's ``sparse`` with this interpreter."""
    local = Path(sys.executable).with_name("sparse")
    if local.exists():
        return [str(local)]
    return [sys.executable, "-c", "from streamparse.cli.sparse import main; main()"]


def submit_env(cluster: Cluster) -> dict[str, Any]:
    """The streamparse environment the generated project submits with: the user's (``cluster.env``), its
    ``options`` over :data:`~aiod4p.storm._project.DEFAULT_CONF`."""
    options = cluster.env.get("options")
    return {
        **streamparse_env(),
        **cluster.env,
        "nimbus": cluster.address,
        "options": streamparse_env(options=options if isinstance(options, dict) else None)["options"],
    }


def submit(project: Project, cluster: Cluster, options: Mapping[str, Any] | None = None, timeout: float = 120) -> str:
    """Submit ``project`` with ``sparse submit``, uploading a jar built without a JVM tool.

    Returns sparse's output.

    Raises:
        Aiod4pError: sparse failed (its output is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="aiod4p-storm-") as tmp:
        jar = build_jar(project, Path(tmp) / f"{project.name}.jar")
        command = [*sparse_command(), "submit", "-e", ENV_NAME, "-n", project.name, "-j", str(jar), "-f"]
        for key, value in (options or {}).items():
            command += ["-o", f"{key}={json.dumps(value)}"]
        environment = {
            **os.environ,
            "STREAMPARSE_NIMBUS": cluster.address,
            "LEIN_ROOT": os.environ.get("LEIN_ROOT", "1"),  # sparse refuses root without it; the jar needs no lein
            "PYTHONWARNINGS": "ignore:TripleDES has been moved,ignore:pkg_resources is deprecated",
        }
        try:
            done = subprocess.run(
                command, cwd=project.path, env=environment, capture_output=True, text=True, timeout=timeout
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Aiod4pError(f"sparse submit of topology {project.name} failed: {exc}") from exc
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise Aiod4pError(
            f"sparse submit of topology {project.name} failed (exit {done.returncode}):\n{output[-3000:]}"
        )
    return output
