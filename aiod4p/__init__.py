"""aiod4p: abstract stream-based workflows, enacted on several mappings.

Build a :class:`WorkflowGraph` of processing elements (PEs) joined port to
port, then run it with :func:`run` (or :func:`run_async` / :func:`start`
inside an event loop) on a mapping: ``simple``, ``async``, ...
"""

__version__ = "0.1.0"  # before the imports: a checkpoint's manifest records it (aiod4p._checkpoint)

# First: a signal while the rest imports ends the aiod4p command quietly (exit 130).
from . import (
    _starting,  # noqa: F401
    errors,
)
from ._api import WorkflowRun, run, run_async, start
from ._checkpoint import Checkpointing
from ._graph import Connection, WorkflowGraph
from ._groupings import (
    ALL,
    GLOBAL,
    ROUND_ROBIN,
    SHUFFLE,
    All,
    Global,
    GroupBy,
    Grouping,
    RoundRobin,
    Router,
    Shuffle,
    group_by,
    stable_hash,
)
from ._loading import load_graph
from ._pe import (
    PE,
    CompositePE,
    ConsumerPE,
    FunctionPE,
    GenericPE,
    InputPort,
    IterativePE,
    OutputPort,
    ProducerPE,
    chain,
    consumer,
    iterative,
    producer,
)
from ._plan import ExecutionPlan, InstanceRef, PlanOptions, make_plan
from ._provenance import Lineage, read_lineage, write_document, write_provenance
from ._provenance import document as provenance_document
from ._results import ResultRecord, Results
from ._stats import InstanceStats
from ._visual import draw, to_dot
from .errors import (
    Aiod4pError,
    ChannelClosed,
    CheckpointError,
    EndOfChannel,
    GraphError,
    InputError,
    MappingUnavailable,
    PeerDied,
    PEError,
    TargetError,
    TransportError,
    UnpicklableMessage,
    WorkerDied,
)
from .sources import LiveFeed

__all__ = [
    "ALL",
    "GLOBAL",
    "PE",
    "ROUND_ROBIN",
    "SHUFFLE",
    "Aiod4pError",
    "All",
    "ChannelClosed",
    "CheckpointError",
    "Checkpointing",
    "CompositePE",
    "Connection",
    "ConsumerPE",
    "EndOfChannel",
    "ExecutionPlan",
    "FunctionPE",
    "GenericPE",
    "Global",
    "GraphError",
    "GroupBy",
    "Grouping",
    "InputError",
    "InputPort",
    "InstanceRef",
    "InstanceStats",
    "IterativePE",
    "Lineage",
    "LiveFeed",
    "MappingUnavailable",
    "OutputPort",
    "PEError",
    "PeerDied",
    "PlanOptions",
    "ProducerPE",
    "ResultRecord",
    "Results",
    "RoundRobin",
    "Router",
    "Shuffle",
    "TargetError",
    "TransportError",
    "UnpicklableMessage",
    "WorkerDied",
    "WorkflowGraph",
    "WorkflowRun",
    "chain",
    "consumer",
    "draw",
    "errors",
    "group_by",
    "iterative",
    "load_graph",
    "make_plan",
    "producer",
    "provenance_document",
    "read_lineage",
    "run",
    "run_async",
    "stable_hash",
    "start",
    "to_dot",
    "write_document",
    "write_provenance",
]
