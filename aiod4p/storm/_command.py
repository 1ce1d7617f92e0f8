"""The ``aiod4p storm build`` command, and the options ``aiod4p run`` passes the storm mapping."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .._install import install_hint
from ..errors import MappingUnavailable
from ._spec import DEFAULT_MAX_REPLAYS

__all__ = ["add_storm_parser", "mapping_options", "storm_command"]


def add_storm_parser(commands: Any) -> None:
    """Add ``storm build`` to the CLI's subcommands."""
    storm = commands.add_parser("storm", help="Apache Storm: build a workflow's topology", description="Apache Storm.")
    actions = storm.add_subparsers(dest="storm_command", required=True)
    build = actions.add_parser(
        "build",
        help="write the streamparse project of a workflow",
        description="Write a streamparse project (topology, components, config.json) to submit with `sparse submit`.",
    )
    build.add_argument("target", help="module:graph, path/to/file.py[:graph], or a module holding one graph")
    build.add_argument("-o", "--output", required=True, metavar="DIR", help="the project directory to write")
    build.add_argument("--name", default=None, help="the topology name (default: from the target)")
    build.add_argument("-n", "--num", type=int, default=None, metavar="N", help="tasks of PEs with no parallelism")
    build.add_argument("-i", "--iter", type=int, default=None, metavar="N", help="the spouts call their PE N times")
    build.add_argument("-d", "--data", default=None, metavar="JSON", help='{"PE": N or [input dicts]}')
    build.add_argument("-f", "--file", default=None, metavar="FILE", help="a JSON file like -d")
    build.add_argument("--nimbus", default=None, metavar="HOST:PORT", help="write this Nimbus into config.json")
    build.add_argument(
        "--max-replays",
        type=int,
        default=DEFAULT_MAX_REPLAYS,
        help=f"replays of a failed tuple (default {DEFAULT_MAX_REPLAYS})",
    )
    build.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")


def mapping_options(args: argparse.Namespace) -> dict[str, Any]:
    """The constructor options of the mapping ``aiod4p run`` uses.

    Raises:
        ValueError: ``--nimbus`` was given for another mapping.
    """
    if args.mapping == "storm":
        return {"nimbus": args.nimbus, "target": args.target}
    if args.nimbus is not None:
        raise ValueError("--nimbus applies to --mapping storm only")
    return {}


def storm_command(args: argparse.Namespace) -> int:
    """Run ``aiod4p storm build``; returns the exit status.

    Raises:
        MappingUnavailable: streamparse is not installed.
        GraphError, InputError, TargetError: as :func:`aiod4p.storm.build_project`.
    """
    try:
        import streamparse  # noqa: F401
    except ImportError as exc:
        raise MappingUnavailable(f"aiod4p storm needs streamparse: {install_hint('storm')}") from exc
    from .._inputs import parse_cli_inputs
    from .._loading import load_workflow
    from .._plan import PlanOptions
    from . import build_project
    from ._cluster import cluster_at
    from ._project import streamparse_env, target_name

    if args.num is not None and args.num < 1:
        raise ValueError(f"-n must be at least 1, not {args.num}")
    nimbus = cluster_at(args.nimbus, "--nimbus").address if args.nimbus else ""
    graph = load_workflow(args.target)
    inputs = parse_cli_inputs(args.iter, args.data, args.file)
    project = build_project(
        graph,
        Path(args.output),
        name=args.name or target_name(args.target),
        inputs=inputs,
        options=PlanOptions(default_parallelism=args.num or 1),
        envs={"prod": streamparse_env(nimbus)},
        max_replays=args.max_replays,
    )
    spouts = sum(component.kind == "spout" for component in project.spec.components)
    bolts = len(project.spec.components) - spouts
    print(f"wrote topology {project.name} ({spouts} spouts, {bolts} bolts) to {project.path}")
    print(f"submit it with: cd {project.path} && sparse submit -n {project.name}")
    return 0
