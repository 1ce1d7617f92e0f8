"""The ``aiod4p`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any, TextIO

from . import compat
from ._api import WorkflowRun, loop_factory
from ._inputs import parse_cli_inputs
from ._loading import load_graph
from ._logging import configure_logging
from ._plan import make_plan
from ._progress import progress, progress_wanted
from ._results import ResultRecord
from ._stats_report import report_stats
from ._visual import draw
from .errors import Aiod4pError
from .mappings import MAPPINGS, get_mapping
from .sources import LineStream
from .storm._command import add_storm_parser, mapping_options, storm_command

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ABORTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiod4p", description="Run stream-based workflows of processing elements on several mappings."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a workflow", description="Run a workflow graph.")
    run.add_argument("target", help="module:graph, path/to/file.py[:graph], or a module holding one graph")
    run.add_argument("--mapping", "-m", default="async", choices=sorted(MAPPINGS), help="where to run (default: async)")
    run.add_argument("-n", "--num", type=int, default=None, metavar="N", help="workers (instances for async)")
    source = run.add_argument_group("inputs (dispel4py semantics; -f wins over -d, which wins over -i)")
    source.add_argument("-i", "--iter", type=int, default=None, metavar="N", help="call every root PE N times")
    source.add_argument("-d", "--data", default=None, metavar="JSON", help='{"PE": N or [input dicts]}')
    source.add_argument("-f", "--file", default=None, metavar="FILE", help="a JSON file like -d")
    source.add_argument("--stdin", default=None, metavar="PE", help="read JSON Lines from stdin into root PE, live")
    run.add_argument("--results", default=None, metavar="FILE", help="write results as JSON Lines ('-' for stdout)")
    run.add_argument("--batch-size", type=int, default=256, help="items per batch (default 256)")
    run.add_argument("--credits", type=int, default=4, help="batches in flight per channel (default 4)")
    run.add_argument("--nimbus", default=None, metavar="HOST:PORT", help="Storm's Nimbus (--mapping storm)")
    run.add_argument("--address", default=None, metavar="ADDR", help="the Ray cluster to join (--mapping ray)")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    seeing = run.add_argument_group("progress, statistics and logging")
    seeing.add_argument("--stats", action="store_true", help="print a table of per-PE statistics at the end (stderr)")
    seeing.add_argument("--stats-json", default=None, metavar="FILE", help="write per-PE statistics as JSON")
    seeing.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    seeing.add_argument("-q", "--quiet", action="store_true", help="no progress display; log errors only")

    picture = commands.add_parser(
        "graph", help="draw a workflow", description="Draw a workflow graph: .dot, or .svg/.png/.pdf with Graphviz."
    )
    picture.add_argument("target", help="module:graph, path/to/file.py[:graph], or a module holding one graph")
    picture.add_argument("-o", "--output", required=True, metavar="FILE", help="FILE.dot, FILE.svg, FILE.png or .pdf")
    picture.add_argument("--mapping", "-m", default="async", choices=sorted(MAPPINGS), help="whose parallelism to show")
    picture.add_argument("-n", "--num", type=int, default=None, metavar="N", help="workers, as for run")
    picture.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    add_storm_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "graph":
            return _graph(args)
        if args.command == "storm":
            return storm_command(args)
        raise AssertionError(args.command)
    except Aiod4pError as exc:
        if args.debug:
            traceback.print_exc()
            detail = getattr(exc, "traceback_text", "")
            if detail:
                print(detail, file=sys.stderr, end="")
        print(f"aiod4p: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"aiod4p: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    if args.num is not None and args.num < 1:
        raise ValueError(f"-n must be at least 1, not {args.num}")
    options = mapping_options(args)
    if args.address is not None:
        if args.mapping != "ray":
            raise ValueError("--address applies to --mapping ray only")
        options["address"] = args.address
    mapping = get_mapping(args.mapping, **options)
    if getattr(mapping, "follower", False):  # an MPI rank other than 0 (under mpiexec): rank 0 reports
        args.results, args.quiet, args.stats, args.stats_json = os.devnull, True, False, None
    compat.install()  # dispel4py workflows run unchanged
    graph = load_graph(args.target)
    inputs = parse_cli_inputs(args.iter, args.data, args.file)
    if args.stdin is not None:
        if isinstance(inputs, int):
            raise ValueError("--stdin cannot be combined with -i; give the other roots' inputs with -d or -f")
        inputs = {**(inputs or {}), args.stdin: LineStream(json=True)}
    workflow = WorkflowRun(
        graph, inputs, mapping=mapping, workers=args.num, batch_size=args.batch_size, credits=args.credits
    )
    show_progress = progress_wanted(args.quiet, args.results == "-")
    try:
        with asyncio.Runner(loop_factory=loop_factory(mapping.uses_uvloop)) as runner:
            return runner.run(_consume(workflow, args.results, show_progress))
    finally:
        report_stats(workflow, table=args.stats, json_path=args.stats_json)


def _graph(args: argparse.Namespace) -> int:
    if args.num is not None and args.num < 1:
        raise ValueError(f"-n must be at least 1, not {args.num}")
    mapping = get_mapping(args.mapping)
    compat.install()  # dispel4py workflows run unchanged
    plan = make_plan(load_graph(args.target), mapping.plan_options(args.num, 256, 4))
    print(f"wrote {draw(plan, args.output, title=args.target)}")
    return 0


async def _consume(workflow: WorkflowRun, results_path: str | None, show_progress: bool = False) -> int:
    """Run ``workflow``, writing its results; SIGINT/SIGTERM drain, a second aborts."""
    loop = asyncio.get_running_loop()
    signals = 0
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            workflow.drain()
        else:
            main_task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    out: TextIO | None = None
    try:
        if results_path == "-":
            out = sys.stdout
        elif results_path is not None:
            try:
                out = open(results_path, "w", encoding="utf-8")  # noqa: SIM115, ASYNC230 - closed below; opening is instant
            except OSError as exc:
                raise Aiod4pError(f"cannot write results to {results_path}: {exc.strerror or exc}") from exc
        grouped: dict[tuple[str, str], list[Any]] = {}
        try:
            async with workflow, progress(workflow) if show_progress else contextlib.nullcontext():
                async for record in workflow:
                    if out is not None:
                        _write_record(out, record)
                    else:
                        grouped.setdefault((record.pe, record.port), []).append(record.data)
        except asyncio.CancelledError:
            print("aiod4p: aborted", file=sys.stderr)
            return EXIT_ABORTED
        if out is None:
            _print_results(grouped)
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if out is not None and out is not sys.stdout:
            out.close()


def _write_record(out: TextIO, record: ResultRecord) -> None:
    try:
        line = json.dumps(record.to_json())
    except (TypeError, ValueError):
        line = json.dumps({**record.to_json(), "data": repr(record.data)})
    out.write(line + "\n")
    if out is sys.stdout:
        out.flush()


def _print_results(grouped: dict[tuple[str, str], list[Any]]) -> None:
    if not grouped:
        print("No results.")
        return
    for (pe, port), items in grouped.items():
        print(f"{pe}.{port}: {len(items)} item{'s' if len(items) != 1 else ''}")
        for item in items:
            print(f"  {item!r}")
