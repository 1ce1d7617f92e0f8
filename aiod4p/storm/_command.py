"""What ``aiod4p storm build`` does (its options are declared in :mod:`aiod4p._cli`), and the options
``aiod4p run`` passes the storm mapping."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._install import install_hint
from ..errors import MappingUnavailable

__all__ = ["mapping_options", "storm_command"]


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
    from . import build_jar, build_project
    from ._cluster import cluster_at
    from ._project import streamparse_env, target_name

    nimbus = cluster_at(args.nimbus, "--nimbus").address if args.nimbus else ""
    config = Path(args.output) / "config.json"
    kept = config.is_file()  # a rebuild keeps the configuration the user edited
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
    if kept:
        print(f"kept {config} as it was")
        if args.nimbus:
            print(f"aiod4p: warning: --nimbus is not written into {config}: set its nimbus there", file=sys.stderr)
    jar = build_jar(project, project.path / f"{project.name}.jar")  # sparse submit -j: no lein, no Java
    print(f"submit it with: cd {project.path} && sparse submit -n {project.name} -j {jar.name}")
    # Nimbus refuses a name in use, which sparse reports as invalid (the build only writes valid names).
    print(
        f"(while a topology {project.name} runs, sparse says the name is invalid: replace it with"
        f" sparse submit --force, or build with another --name)"
    )
    return 0
