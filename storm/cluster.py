"""A real Apache Storm cluster on this machine, for the storm mapping's tests, CI and trials.

    scripts/storm-cluster start     fetch Storm (cached), start ZooKeeper, Nimbus and one Supervisor,
                                    and wait until Nimbus answers with a Supervisor registered
    scripts/storm-cluster stop      stop them, and the workers the Supervisor started (nothing is left)
    scripts/storm-cluster status    exit 0 when Nimbus answers with a Supervisor registered

Storm's jars come from Maven Central through storm/pom.xml (copied into storm/lib, ignored by git);
its daemons run from them with ``java -cp``, configured by a storm.yaml written into storm/run
(STORM_HOME for the workers the Supervisor launches: lib-worker, extlib, conf, log4j2). Everything
is advertised on 127.0.0.1 and ZooKeeper listens there only; Storm 2.8's own Thrift and Netty
servers always bind the wildcard address (no setting changes that). Ports can be changed with
STORM_ZK_PORT, STORM_NIMBUS_PORT, STORM_SUPERVISOR_PORT and STORM_SLOTS (comma-separated).
The workers run the Python components with the ``streamparse_run`` of this interpreter's
environment (its bin directory comes first on the Supervisor's PATH).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIB = HERE / "lib"
RUN = Path(os.environ.get("STORM_RUN_DIR", HERE / "run"))
HOME = RUN / "home"
LOGS = RUN / "logs"
PIDS = RUN / "pids"
HOST = "127.0.0.1"
ZK_PORT = int(os.environ.get("STORM_ZK_PORT", "2181"))
NIMBUS_PORT = int(os.environ.get("STORM_NIMBUS_PORT", "6627"))
SUPERVISOR_PORT = int(os.environ.get("STORM_SUPERVISOR_PORT", "6628"))
SLOTS = [int(p) for p in os.environ.get("STORM_SLOTS", "6700,6701,6702,6703").split(",")]
START_TIMEOUT = float(os.environ.get("STORM_START_TIMEOUT", "300"))
DAEMONS = ("zookeeper", "nimbus", "supervisor")  # start order; stopped in reverse
ZK_MAIN = "org.apache.storm.shade.org.apache.zookeeper.server.ZooKeeperServerMain"
MAINS = {
    "nimbus": "org.apache.storm.daemon.nimbus.Nimbus",
    "supervisor": "org.apache.storm.daemon.supervisor.Supervisor",
}
HEAP = {"zookeeper": "-Xmx128m", "nimbus": "-Xmx384m", "supervisor": "-Xmx192m"}


def say(message: str) -> None:
    print(f"storm-cluster: {message}", flush=True)


def java() -> str:
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not found or not Path(found).exists():
        raise SystemExit("storm-cluster: java not found (install openjdk-17-jre-headless: scripts/setup --dev)")
    return found


def fetch() -> None:
    """Copy Storm's jars into storm/lib with Maven, once per version of the pom."""
    stamp = LIB / ".pom-sha256"
    digest = hashlib.sha256((HERE / "pom.xml").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise SystemExit("storm-cluster: Maven (mvn) not found (install maven: scripts/setup --dev)")
    say("fetching Apache Storm from Maven Central (storm/pom.xml)")
    shutil.rmtree(LIB, ignore_errors=True)
    command = [mvn, "-q", "-B", "-f", str(HERE / "pom.xml"), "dependency:copy-dependencies"]
    command += [f"-DoutputDirectory={LIB}", "-DincludeScope=runtime"]
    if subprocess.run(command).returncode != 0:
        raise SystemExit("storm-cluster: Maven could not fetch Storm (see its output above)")
    stamp.write_text(digest)


def storm_yaml() -> str:
    lines = [
        f'storm.zookeeper.servers: ["{HOST}"]',
        f"storm.zookeeper.port: {ZK_PORT}",
        f'storm.local.dir: "{RUN / "data"}"',
        f'storm.local.hostname: "{HOST}"',
        f'storm.log.dir: "{LOGS}"',
        f'nimbus.seeds: ["{HOST}"]',
        f"nimbus.thrift.port: {NIMBUS_PORT}",
        f"supervisor.thrift.port: {SUPERVISOR_PORT}",
        f"supervisor.slots.ports: [{', '.join(map(str, SLOTS))}]",
        # Small JVMs: the whole cluster shares two cores and a few GB with the test suite.
        'worker.childopts: "-Xmx%HEAP-MEM%m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"',
        "worker.heap.memory.mb: 384",
        "topology.worker.max.heap.size.mb: 384",
        # Nimbus assigns a submitted topology at its next monitor round, and the Supervisor frees the slot of a
        # killed one after its shutdown sleep (3 s by default, twice): seconds a topology, kept short.
        "nimbus.monitor.freq.secs: 1",
        "supervisor.monitor.frequency.secs: 1",
        "supervisor.worker.shutdown.sleep.secs: 1",
        "nimbus.topology.blobstore.deletion.delay.ms: 1000",
        "storm.blobstore.replication.factor: 1",
        "topology.min.replication.count: 1",
    ]
    return "\n".join(lines) + "\n"


def layout() -> None:
    """STORM_HOME as the Supervisor expects it when it builds a worker's classpath and logging."""
    for directory in (HOME / "conf", HOME / "extlib", LOGS, PIDS, RUN / "data", RUN / "zookeeper"):
        directory.mkdir(parents=True, exist_ok=True)
    for name, target in (("lib-worker", LIB), ("lib", LIB), ("log4j2", HERE / "log4j2")):
        link = HOME / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    (HOME / "conf" / "storm.yaml").write_text(storm_yaml())
    (RUN / "zoo.cfg").write_text(
        f"dataDir={RUN / 'zookeeper'}\nclientPort={ZK_PORT}\nclientPortAddress={HOST}\n"
        "tickTime=2000\nmaxClientCnxns=0\nadmin.enableServer=false\n"
    )


def command(name: str) -> list[str]:
    classpath = f"{LIB}/*:{HOME / 'conf'}"
    common = [
        java(),
        HEAP[name],
        "-XX:+UseSerialGC",
        f"-Dstorm.home={HOME}",
        f"-Dstorm.log.dir={LOGS}",
        f"-Dlogfile.name={name}.log",
        f"-Dlog4j.configurationFile={HOME / 'log4j2' / 'cluster.xml'}",
        "-Dzookeeper.admin.enableServer=false",
        "-cp",
        classpath,
    ]
    if name == "zookeeper":
        return [*common, ZK_MAIN, str(RUN / "zoo.cfg")]
    return [*common, MAINS[name]]


def pid_of(name: str) -> int | None:
    path = PIDS / f"{name}.pid"
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return None
    return pid


def port_free(port: int) -> bool:
    with socket.socket() as probe_socket:
        return probe_socket.connect_ex((HOST, port)) != 0


def launch(name: str) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["STORM_CONF_DIR"] = str(HOME / "conf")
    out = open(LOGS / f"{name}.out", "ab")  # noqa: SIM115 - the daemon keeps writing to it
    process = subprocess.Popen(
        command(name),
        cwd=RUN,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stop() ends it with every worker it spawns
    )
    out.close()
    (PIDS / f"{name}.pid").write_text(str(process.pid))
    say(f"started {name} (pid {process.pid})")


def cluster_state() -> tuple[bool, str]:
    """(ready, description): ready when Nimbus answers with at least one Supervisor."""
    sys.path.insert(0, str(HERE.parent))
    from aiod4p.errors import MappingUnavailable
    from aiod4p.storm._cluster import Cluster, probe

    try:
        return True, probe(Cluster(HOST, NIMBUS_PORT, "storm-cluster"), timeout=5.0)
    except MappingUnavailable as exc:
        return False, str(exc)


def start() -> int:
    running = [name for name in DAEMONS if pid_of(name)]
    if running == list(DAEMONS):
        ready, text = cluster_state()
        if ready:
            say(f"already running: {text}")
            return 0
    if running:
        say(f"a partial cluster is running ({', '.join(running)}): stopping it first")
        stop()
    busy = [str(p) for p in (ZK_PORT, NIMBUS_PORT, SUPERVISOR_PORT, *SLOTS) if not port_free(p)]
    if busy:
        say(f"port(s) {', '.join(busy)} on {HOST} are in use by another program: stop it or set STORM_*_PORT")
        return 1
    fetch()
    java()
    shutil.rmtree(RUN / "data", ignore_errors=True)
    shutil.rmtree(RUN / "zookeeper", ignore_errors=True)
    layout()
    began = time.monotonic()
    launch("zookeeper")
    while port_free(ZK_PORT):
        if pid_of("zookeeper") is None or time.monotonic() - began > START_TIMEOUT:
            return failed("ZooKeeper did not start")
        time.sleep(0.2)
    launch("nimbus")
    launch("supervisor")
    text = ""
    while time.monotonic() - began < START_TIMEOUT:
        dead = [name for name in DAEMONS if pid_of(name) is None]
        if dead:
            return failed(f"{', '.join(dead)} exited")
        ready, text = cluster_state()
        if ready:
            say(f"ready in {time.monotonic() - began:.0f} s: {text}")
            return 0
        time.sleep(1)
    return failed(f"not ready after {START_TIMEOUT:.0f} s: {text}")


def failed(reason: str) -> int:
    say(f"start failed: {reason}")
    for name in DAEMONS:
        for path in (LOGS / f"{name}.out", LOGS / f"{name}.log"):
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {path} (last lines)\n" + "\n".join(tail), file=sys.stderr)
    stop()
    return 1


def stop() -> int:
    """Stop every daemon's process group (workers and their Python components included)."""
    for name in reversed(DAEMONS):
        pid = pid_of(name)
        if pid is None:
            continue
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            say(f"{name} did not stop on SIGTERM: killing it")
            os.killpg(pid, signal.SIGKILL)
        (PIDS / f"{name}.pid").unlink(missing_ok=True)
        say(f"stopped {name} (pid {pid})")
    return 0


def status() -> int:
    for name in DAEMONS:
        pid = pid_of(name)
        say(f"{name}: {'pid ' + str(pid) if pid else 'not running'}")
    ready, text = cluster_state()
    say(text)
    return 0 if ready else 1


def fetched() -> int:
    fetch()
    return 0


def main(argv: list[str]) -> int:
    actions = {"start": start, "stop": stop, "status": status, "fetch": fetched}
    if len(argv) != 1 or argv[0] not in actions:
        print(f"usage: scripts/storm-cluster {'|'.join(actions)}", file=sys.stderr)
        return 2
    return actions[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
