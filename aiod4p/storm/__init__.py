"""Running workflows on Apache Storm: a plan becomes a streamparse project.

``build_project(graph, directory)`` writes a project that ``sparse submit``
sends to a Storm cluster; ``aiod4p storm build TARGET -o DIR`` does the same
from the command line, and ``aiod4p run TARGET --mapping storm`` builds and
submits in one step. Root PEs become spouts, the other PEs bolts hosting
them (see :mod:`aiod4p.storm.components`); Storm routes the tuples. Needs the
``storm`` extra.
"""

from ._project import Project, build_jar, build_project, load_topology, topology_name
from ._spec import EOS_STREAM, ComponentSpec, InputSpec, KeyField, StreamSpec, TopologySpec, plan_topology
from ._wire import WireError, decode, encode, encode_key

__all__ = [
    "EOS_STREAM",
    "ComponentSpec",
    "InputSpec",
    "KeyField",
    "Project",
    "StreamSpec",
    "TopologySpec",
    "WireError",
    "build_jar",
    "build_project",
    "decode",
    "encode",
    "encode_key",
    "load_topology",
    "plan_topology",
    "topology_name",
]
