"""A stand-in for Storm's Nimbus, for tests: answers streamparse's Thrift calls and records submissions.

    python tests/storm_fake_nimbus.py RECORD_DIR [SUPERVISORS]

It listens on a free port of 127.0.0.1 (framed binary Thrift, as Storm's
default transport), prints the port on stdout, and writes every submitted
topology to RECORD_DIR/submitted.json and its jar to RECORD_DIR/uploaded.jar.
While RECORD_DIR/refuse-kill exists, it fails every kill (an internal error); while RECORD_DIR/slots-used
exists, every worker slot of its supervisors is taken. A submitted topology is listed, with no executor (no
worker runs it), until it is killed.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message="Cannot import msgpack", category=ImportWarning)

from streamparse.thrift import (  # noqa: E402
    ClusterSummary,
    Nimbus,
    NimbusSummary,
    SupervisorSummary,
    TopologyInfo,
    TopologySummary,
)
from thriftpy2.protocol import TBinaryProtocolFactory  # noqa: E402
from thriftpy2.rpc import make_server  # noqa: E402
from thriftpy2.transport import TFramedTransportFactory  # noqa: E402


class Handler:
    def __init__(self, record: Path, supervisors: int) -> None:
        self.record = record
        self.supervisors = supervisors
        self.jar = bytearray()
        self.submitted: dict[str, tuple[str, Any]] = {}  # name -> (conf, topology)

    def getClusterInfo(self) -> Any:
        return ClusterSummary(
            supervisors=[
                SupervisorSummary(
                    host=f"worker{n}",
                    uptime_secs=1,
                    num_workers=4,
                    num_used_workers=4 if (self.record / "slots-used").exists() else 0,
                    supervisor_id=f"s{n}",
                )
                for n in range(self.supervisors)
            ],
            topologies=[
                TopologySummary(
                    id=f"{name}-1",
                    name=name,
                    num_tasks=0,
                    num_executors=0,
                    num_workers=0,
                    uptime_secs=1,
                    status="ACTIVE",
                )
                for name in self.submitted
            ],
            nimbuses=[NimbusSummary(host="127.0.0.1", port=6627, uptime_secs=1, isLeader=True, version="2.6.0")],
        )

    def getNimbusConf(self) -> str:
        return json.dumps({"storm.log.dir": "/var/log/storm"})

    def getTopologyConf(self, topology_id: str) -> str:
        return self.submitted[topology_id.removesuffix("-1")][0]

    def getUserTopology(self, topology_id: str) -> Any:
        return self.submitted[topology_id.removesuffix("-1")][1]

    def getTopologyInfo(self, topology_id: str) -> Any:
        name = topology_id.removesuffix("-1")
        return TopologyInfo(id=topology_id, name=name, uptime_secs=1, executors=[], status="ACTIVE", errors={})

    def isTopologyNameAllowed(self, name: str) -> bool:
        return True

    def beginFileUpload(self) -> str:
        return "/nimbus/inbox/topology.jar"

    def uploadChunk(self, location: str, chunk: bytes) -> None:
        self.jar += chunk

    def finishFileUpload(self, location: str) -> None:
        (self.record / "uploaded.jar").write_bytes(bytes(self.jar))

    def submitTopologyWithOpts(self, name: str, jar: str, conf: str, topology: Any, options: Any) -> None:
        components = {}
        for kind, table in (("spout", topology.spouts), ("bolt", topology.bolts)):
            for component, spec in table.items():
                shell = (spec.spout_object if kind == "spout" else spec.bolt_object).shell
                components[component] = {
                    "kind": kind,
                    "shell": [shell.execution_command, shell.script],
                    "par": spec.common.parallelism_hint,
                    "inputs": sorted(f"{key.componentId}:{key.streamId}" for key in spec.common.inputs),
                }
        submitted = {"name": name, "jar": jar, "conf": json.loads(conf), "components": components}
        (self.record / "submitted.json").write_text(json.dumps(submitted))
        self.submitted[name] = (conf, topology)

    def killTopologyWithOpts(self, name: str, options: Any) -> None:
        if (self.record / "refuse-kill").exists():
            raise RuntimeError("Nimbus refuses to kill")
        (self.record / "killed.json").write_text(json.dumps({"name": name, "wait_secs": options.wait_secs}))
        self.submitted.pop(name, None)


def main() -> None:
    record = Path(sys.argv[1])
    supervisors = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    server = make_server(
        Nimbus,
        Handler(record, supervisors),
        "127.0.0.1",
        1,
        proto_factory=TBinaryProtocolFactory(),
        trans_factory=TFramedTransportFactory(),
    )
    server.trans.port = 0
    server.trans.listen()
    server.trans.listen = lambda: None  # already listening: serve() must not bind again
    print(server.trans.sock.getsockname()[1], flush=True)
    server.serve()


if __name__ == "__main__":
    main()
