"""The ``aiod4p`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import shlex
import signal
import stat
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

from . import __version__
from ._api import WorkflowRun, loop_factory, run_in_threads
from ._checkpoint import Checkpointing, in_checkpoint_store
from ._inputs import find_pe, parse_cli_inputs
from ._install import install_hint
from ._loading import load_workflow, split_target
from ._logging import configure_logging
from ._plan import DEFAULT_BATCH_SIZE, DEFAULT_CREDITS, PROVENANCE_LEVELS, make_plan
from ._progress import progress, progress_wanted
from ._provenance import check_provenance_file, read_lineage, write_provenance
from ._results import ResultRecord, record_line
from ._signals import Interrupts, Stopped, report_crashes
from ._starting import EXIT_ABORTED, install, started
from ._stats_report import StatsSampler, report_stats
from ._threads import exit_past_threads
from ._visual import check_drawing, draw, draw_dot, to_dot
from .compat.processor import MOST_SHARED_PROCESSES
from .errors import Aiod4pError, _StdoutClosed, reader_went_away, writing
from .mappings import MAPPINGS, BaseMapping, get_mapping
from .mappings._base import available_cpus
from .mappings._mpi_env import SaidByRankZero, job_rank, job_size
from .sources import DEAD_LETTER, LINE_POLICIES, MAX_LINE_BYTES, LineStream
from .storm._command import mapping_options, storm_command
from .storm._spec import DEFAULT_MAX_REPLAYS

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away

EXIT_STATUS_HELP = """\
exit status:
  0    the run finished, or was drained (or suspended: --on-signal) by a first SIGINT/SIGTERM (stderr says so)
  1    the run failed: a PE raised, a worker died, bad inputs or workflow file
  2    usage error: an unknown option or a bad option value
  130  aborted: a signal during start-up, or a second signal while draining or suspending
  141  the reader of stdout (--results -, what PEs print) went away (e.g. | head): the run stopped quietly
"""


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low`` (a bad value is a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


_POSITIVE, _COUNT = _at_least(1), _at_least(0)


def _path(text: str) -> str:
    """An argparse type: a path, which cannot be empty (a bad value is a usage error, exit 2).

    The empty path names the current directory to some calls (``Path("")``) and no file to others
    (``open("")``): a checkpoint directory ``''`` was written into the current one, then not found by
    ``--restore``."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    return text


_path.__name__ = "path"  # argparse names the type in its messages


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiod4p",
        description="Run stream-based workflows of processing elements on several mappings.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aiod4p {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run a workflow",
        description="Run a workflow graph.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_target(run)
    _add_attr_option(run)
    run.add_argument("--mapping", "-m", default="async", choices=sorted(MAPPINGS), help="where to run (default: async)")
    run.add_argument("-n", "--num", type=_POSITIVE, default=None, metavar="N", help="workers (instances for async)")
    run.add_argument(
        "--oversubscribe",
        action="store_true",
        help="multi, mpi started on this machine, and ray on a local Ray started for the run: start -n workers"
        " even beyond the CPUs available (by default at most one per CPU)",
    )
    source = _add_inputs(run)
    source.add_argument("--stdin", default=None, metavar="PE", help="read JSON Lines from stdin into root PE, live")
    source.add_argument(
        "--max-line",
        type=_POSITIVE,
        default=None,
        metavar="BYTES",
        help=f"--stdin: the longest line accepted (default {MAX_LINE_BYTES} = 64 MiB)",
    )
    source.add_argument(
        "--on-bad",
        choices=LINE_POLICIES,
        default=None,
        help="--stdin: an over-long or invalid JSON line fails the run (default), is skipped with a warning,"
        " or becomes a result on port dead_letter",
    )
    run.add_argument(
        "--results", type=_path, default=None, metavar="FILE", help="write results as JSON Lines ('-' for stdout)"
    )
    run.add_argument(
        "--threaded",
        action="append",
        default=[],
        metavar="PE",
        help="run PE's plain calls in a thread pool, for PEs that block (repeatable; PE id or name)",
    )
    run.add_argument(
        "--batch-size",
        type=_POSITIVE,
        default=DEFAULT_BATCH_SIZE,
        help=f"items per batch (default {DEFAULT_BATCH_SIZE})",
    )
    run.add_argument(
        "--credits",
        type=_POSITIVE,
        default=DEFAULT_CREDITS,
        help=f"batches in flight per channel (default {DEFAULT_CREDITS})",
    )
    run.add_argument("--nimbus", default=None, metavar="HOST:PORT", help="Storm's Nimbus (--mapping storm)")
    run.add_argument("--address", default=None, metavar="ADDR", help="the Ray cluster to join (--mapping ray)")
    environment = run.add_mutually_exclusive_group()
    environment.add_argument(
        "--runtime-env",
        type=_path,
        default=None,
        metavar="FILE",
        help="--mapping ray: a YAML (or JSON) file of Ray's runtime environment for the workers (env_vars, pip,"
        " working_dir, py_modules, ...), as ray job submit's",
    )
    environment.add_argument(
        "--runtime-env-json",
        default=None,
        metavar="JSON",
        help="--mapping ray: Ray's runtime environment for the workers as a JSON object, as ray job submit's",
    )
    run.add_argument(
        "--working-dir",
        type=_path,
        default=None,
        metavar="DIR",
        help="--mapping ray: the runtime environment's working_dir (a directory shipped to the workers, or a URI),"
        " over the one of --runtime-env[-json]",
    )
    _add_debug_option(run)
    _add_checkpoint_options(run)
    seeing = run.add_argument_group("progress, statistics and logging")
    seeing.add_argument("--stats", action="store_true", help="print a table of per-PE statistics at the end (stderr)")
    seeing.add_argument(
        "--stats-json",
        type=_path,
        default=None,
        metavar="FILE",
        help="write per-PE statistics as JSON (-: stdout, with --results FILE)",
    )
    loudness = seeing.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    loudness.add_argument("-q", "--quiet", action="store_true", help="no progress display; log errors only")
    _add_provenance_options(run)

    picture = commands.add_parser(
        "graph", help="draw a workflow", description="Draw a workflow graph: .dot, or .svg/.png/.pdf with Graphviz."
    )
    _add_target(picture)
    _add_attr_option(picture)
    picture.add_argument(
        "-o",
        "--output",
        type=_path,
        required=True,
        metavar="FILE",
        help="FILE.dot, FILE.svg, FILE.png or .pdf; - writes dot text to stdout",
    )
    picture.add_argument("--mapping", "-m", default="async", choices=sorted(MAPPINGS), help="whose parallelism to show")
    picture.add_argument("-n", "--num", type=_POSITIVE, default=None, metavar="N", help="workers, as for run")
    picture.add_argument("--oversubscribe", action="store_true", help="as for run: -n workers even beyond the CPUs")
    _add_debug_option(picture)
    _add_storm_parser(commands)
    _add_science_parsers(commands)
    return parser


def _add_debug_option(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after a command's name too (``aiod4p run flow.py --debug``); not given, it leaves ``aiod4p``'s
    own ``--debug`` as it was."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")


def _add_target(parser: argparse.ArgumentParser) -> None:
    """The positional ``target``: the workflow to load (see :func:`aiod4p.load_graph`)."""
    parser.add_argument(
        "target", type=_path, help="module:graph, path/to/file.py[:graph], or a module holding one graph"
    )


def _add_inputs(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """dispel4py's inputs of the root PEs, ``-i N``, ``-d JSON`` and ``-f FILE`` (see
    :func:`aiod4p._inputs.parse_cli_inputs`); returns their group, for the command's other input options."""
    source = parser.add_argument_group("inputs (dispel4py semantics; -f wins over -d, which wins over -i)")
    source.add_argument("-i", "--iter", type=_COUNT, default=None, metavar="N", help="call every root PE N times")
    source.add_argument("-d", "--data", default=None, metavar="JSON", help='{"PE": N or [input dicts]}')
    source.add_argument("-f", "--file", type=_path, default=None, metavar="FILE", help="a JSON file like -d")
    return source


def _add_storm_parser(commands: Any) -> None:
    """``aiod4p storm build``, which :func:`aiod4p.storm._command.storm_command` runs."""
    storm = commands.add_parser("storm", help="Apache Storm: build a workflow's topology", description="Apache Storm.")
    actions = storm.add_subparsers(dest="storm_command", required=True)
    build = actions.add_parser(
        "build",
        help="write the streamparse project of a workflow",
        description="Write a streamparse project (topology, components, config.json) to submit with `sparse submit`.",
    )
    _add_target(build)
    build.add_argument(
        "-o", "--output", type=_path, required=True, metavar="DIR", help="the project directory to write"
    )
    build.add_argument("--name", default=None, help="the topology name (default: from the target)")
    build.add_argument(
        "-n", "--num", type=_POSITIVE, default=None, metavar="N", help="tasks of PEs with no parallelism"
    )
    _add_inputs(build)
    build.add_argument("--nimbus", default=None, metavar="HOST:PORT", help="write this Nimbus into config.json")
    build.add_argument(
        "--max-replays",
        type=_COUNT,
        default=DEFAULT_MAX_REPLAYS,
        help=f"replays of a failed tuple (default {DEFAULT_MAX_REPLAYS})",
    )
    _add_debug_option(build)


def _add_attr_option(parser: argparse.ArgumentParser) -> None:
    """dispel4py's ``-a/--attr NAME``: the graph's name in the module, as ``target:NAME`` gives it."""
    parser.add_argument(
        "-a", "--attr", default=None, metavar="NAME", help="the graph's attribute in the module (as target:NAME)"
    )


def _name_graph(args: argparse.Namespace) -> None:
    """Fold ``-a NAME`` into ``args.target`` as ``target:NAME``.

    Raises:
        ValueError: the target names a graph already, or NAME is not an identifier.
    """
    attr = getattr(args, "attr", None)
    if attr is None:
        return
    if not attr.isidentifier():
        raise ValueError(f"-a {attr!r}: not a Python name")
    if split_target(args.target)[1] is not None:
        raise ValueError(f"-a {attr}: {args.target} already names its graph; give one of the two")
    args.target = f"{args.target}:{attr}"


def entry() -> NoReturn:
    """The ``aiod4p`` command: :func:`main`, then exit, even while a threaded PE call is still blocked.

    Python joins every non-daemon thread at exit, so a thread that never ends
    (one a PE or its library started) would keep the process alive; the run
    is over, so the command leaves without it.
    """
    started()  # the command takes signals itself from here on (a signal while it was imported ended it)
    _open_standard_streams()
    report_crashes()
    try:
        status = main()
    except KeyboardInterrupt:  # Ctrl-C before main() takes it itself (while the arguments are parsed)
        print("aiod4p: aborted by SIGINT", file=sys.stderr)
        status = EXIT_ABORTED
    try:
        sys.stdout.flush()  # a report still buffered (`aiod4p graph`'s line) may fail only now
    except BrokenPipeError:
        _silence_stdout()
    except OSError as exc:  # a full disk: said once, and not again at exit with a traceback
        _silence_stdout()
        if status == EXIT_OK:
            print(f"aiod4p: error: cannot write to stdout: {exc.strerror or exc}", file=sys.stderr)
            status = EXIT_ERROR
    # All is said and written: a signal from now on (Ctrl-C again after an abort, or while the exit waits for a
    # library's atexit clean-up) ends the command at once with its status, not as a KeyboardInterrupt out of that.
    install(functools.partial(_exit_now, status))
    exit_past_threads(status)


def _exit_now(status: int, signum: int, frame: FrameType | None) -> NoReturn:
    """A signal handler for the command once its output is flushed and it exits with ``status``: exit at once."""
    os._exit(status)


def _open_standard_streams() -> None:
    """Open the null device on stdin, stdout or stderr if the command was started with one closed
    (``aiod4p run ... >&-``), as Python treats a closed one: empty input, output dropped.

    Else the first files the run opens would take their numbers: uvloop aborts the process when it finds
    its own file descriptor there, and results or errors would go into whatever file got number 1 or 2.
    """
    for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY), (2, "stderr", os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, mode)  # the lowest free number: fd, as the lower ones are open by now
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8", closefd=False))  # noqa: SIM115


# dispel4py's multi and mpi take -s/--simple (README command lines of its workflows have it).
_SIMPLE_OPTIONS = frozenset({"-s", "--simple"})
_SIMPLE_HINT = (
    " (dispel4py's -s/--simple, which runs partitions of the graph with its simple mapping, has no aiod4p"
    " equivalent: drop it, and the PEs run as instances on the -n workers, as dispel4py's multi and mpi run"
    " them without -s)"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see ``EXIT_STATUS_HELP``)."""
    started()  # a program that calls main() itself (a wrapper script) keeps its handlers: none replaced here
    parser = _parser()
    words = [word for word in (sys.argv[1:] if argv is None else argv) if word != "--debug"]
    commands = next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    if words and words[0] in MAPPINGS and words[0] not in commands:  # dispel4py's: `dispel4py multi flow.py -n 4`
        kept = [word for word in words[1:] if word not in _SIMPLE_OPTIONS]
        command = shlex.join(["aiod4p", "run", "-m", words[0], *kept])
        hint = _SIMPLE_HINT if len(kept) < len(words) - 1 else ""
        parser.error(
            f"{words[0]!r} is a mapping, not a command: dispel4py's `dispel4py {words[0]} ...` is `{command}`{hint}"
        )
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report them with the usage of `aiod4p` itself, not of the command given
        hint = _SIMPLE_HINT if _SIMPLE_OPTIONS & set(unknown) else ""
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    configure_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    try:
        _name_graph(args)
        if args.command == "run":
            return _run(args)
        if args.command == "graph":
            return _graph(args)
        if args.command == "storm":
            return storm_command(args)
        if args.command in ("provenance", "stats"):
            return _science_command(args)
        raise AssertionError(args.command)
    except (BrokenPipeError, _StdoutClosed):  # e.g. `aiod4p provenance FILE | head`, `aiod4p run ... | head`
        return _stdout_closed()
    except KeyboardInterrupt:  # Ctrl-C in a command that takes no signals itself (`aiod4p graph`, `stats plot`)
        if args.debug:
            traceback.print_exc()
        print("aiod4p: aborted by SIGINT", file=sys.stderr)
        return EXIT_ABORTED
    except SaidByRankZero:  # under the user's mpiexec, rank 0 says it once, not once per rank
        return EXIT_ERROR
    except Aiod4pError as exc:
        if args.debug:
            traceback.print_exc()
            detail = getattr(exc, "traceback_text", "")
            if detail:
                print(detail, file=sys.stderr, end="")
        print(f"aiod4p: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:
        if job_size() is not None and job_rank() != 0:  # under the user's mpiexec every rank has it: rank 0 says it
            return EXIT_USAGE
        if args.debug:
            traceback.print_exc()
        print(f"aiod4p: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # what no command names itself: its report to stdout on a full disk, say
        if args.debug:
            traceback.print_exc()
        print(f"aiod4p: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command that ``args`` were parsed for (``aiod4p stats plot``'s, say): its
    usage is the one a usage error shows."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest))
            if chosen is not None:
                return _command_parser(chosen, args)
    return parser


def _run(args: argparse.Namespace) -> int:
    ranks = job_size()
    if ranks is not None and ranks > 1 and args.mapping != "mpi":
        raise ValueError(
            f"this process is one of {ranks} MPI ranks (started by mpiexec), and --mapping {args.mapping} would run"
            " the whole workflow on each of them: give --mapping mpi, or run without mpiexec"
        )
    if args.stdin is not None and args.iter is not None and args.data is None and args.file is None:
        raise ValueError("--stdin cannot be combined with -i; give the other roots' inputs with -d or -f")
    for option, value in (("--max-line", args.max_line), ("--on-bad", args.on_bad)):
        if value is not None and args.stdin is None:
            raise ValueError(
                f"{option} applies to the lines of --stdin only, and there is no --stdin PE: give --stdin PE, or"
                " set max_line/on_bad on the workflow's own source PEs"
            )
    if args.stats_json == "-" and args.results in (None, "-"):
        raise ValueError("--stats-json -: the results already go to stdout; give --results FILE, or --stats-json FILE")
    _check_files_apart(args)
    options = mapping_options(args)
    options.update(_ray_options(args))
    mapping = get_mapping(args.mapping, **options)
    if "runtime_env" in options:  # Ray is there (the mapping is): what Ray would refuse in the run, said now
        from .mappings.ray import check_runtime_env

        try:
            check_runtime_env(options["runtime_env"])
        except ValueError as exc:
            raise ValueError(f"{_runtime_env_option(args)}: {exc}") from None
    if args.stdin is not None and not mapping.live_inputs:
        raise ValueError(
            f"--stdin: the {args.mapping} mapping stores its sources' inputs before the run starts, and cannot read"
            " stdin as the run goes: give them with -d or -f"
        )
    checkpointing = _checkpointing(args)
    if checkpointing is not None:
        if not mapping.supports_checkpoints:
            raise ValueError(f"--checkpoint-dir: the {args.mapping} mapping does not take checkpoints")
        mapping.checkpointing = checkpointing
    data_on_stdout = args.results == "-" or args.stats_json == "-"  # on every MPI rank: mpiexec joins their stdouts
    if getattr(mapping, "follower", False):  # an MPI rank other than 0 (under mpiexec): rank 0 reports
        args.results, args.quiet, args.stats, args.stats_json = os.devnull, True, False, None
        args.provenance = None
    _cap_workers(args, mapping)
    crowded = mapping.crowded()
    if crowded is not None:
        here, cpus = crowded
        _warn(
            args,
            f"mpiexec started {here} ranks on this machine's {cpus} CPU{'s' if cpus > 1 else ''}: PEs whose"
            f" parallelism is not set get {cpus} instance{'s' if cpus > 1 else ''} (a dispel4py graph's, the"
            f" instances dispel4py gives {here} processes), on the first {cpus}"
            f" rank{'s' if cpus > 1 else ''}, and the other ranks wait (more would only compete for the CPUs)",
        )
    for message in _ignored_options(args, mapping):
        _warn(args, message)
    if not mapping.reports_stats:  # said to be ignored above
        args.stats, args.stats_json = False, None
    _warn_of_partial_provenance(args, mapping)
    if ranks is None:  # under mpiexec, rank 0 checks them once every rank has started (_run_loaded)
        _check_outputs(args)
    results = args.results
    if checkpointing is not None and checkpointing.results_path is not None:
        results = os.devnull  # the run writes the file itself, committed with each checkpoint, and yields no result
    status = EXIT_ERROR  # until the run returns its own
    try:
        with _stdout_for_data(data_on_stdout) as stdout:
            status = _run_loaded(args, mapping, results, stdout)
    finally:
        if status != EXIT_OK and args.provenance and os.path.isfile(args.provenance):
            # Said also under -q, with the run's error: else the file would pass for this run's.
            print(
                f"aiod4p: --provenance: {args.provenance} not written{_earlier_file(args.provenance)}", file=sys.stderr
            )
    return status


def _ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ray mapping's options that ``args`` give (``address``, ``runtime_env``): its runtime environment is the
    YAML file of ``--runtime-env`` or the JSON object of ``--runtime-env-json``, with ``--working-dir`` as its
    ``working_dir``, as ``ray job submit`` makes it.

    Raises:
        ValueError: one is given for another mapping; the file cannot be read, or is not YAML; the JSON is not
            JSON; either is not a mapping of fields.
    """
    given = [
        option
        for option, value in (
            ("--address", args.address),
            ("--runtime-env", args.runtime_env),
            ("--runtime-env-json", args.runtime_env_json),
            ("--working-dir", args.working_dir),
        )
        if value is not None
    ]
    if given and args.mapping != "ray":
        raise ValueError(f"{given[0]} applies to --mapping ray only")
    options: dict[str, Any] = {}
    if args.address is not None:
        options["address"] = args.address
    if given in ([], ["--address"]):
        return options
    environment: object = {}
    if args.runtime_env is not None:
        try:
            import yaml
        except ImportError as exc:
            raise ValueError(f"--runtime-env: reading it needs PyYAML, as Ray does: {install_hint('ray')}") from exc
        try:
            with open(args.runtime_env, encoding="utf-8") as file:
                environment = yaml.safe_load(file)
        except OSError as exc:
            raise ValueError(f"--runtime-env {args.runtime_env}: {exc.strerror or exc}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValueError(f"--runtime-env {args.runtime_env}: not YAML: {exc}") from None
    elif args.runtime_env_json is not None:
        try:
            environment = json.loads(args.runtime_env_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--runtime-env-json: not JSON: {exc}") from None
    if not isinstance(environment, dict):
        what = "empty" if environment is None else f"a {type(environment).__name__}"
        raise ValueError(
            f"{_runtime_env_option(args)}: Ray's runtime environment is a mapping of fields (env_vars, pip,"
            f" working_dir, py_modules, ...), and this is {what}"
        )
    if args.working_dir is not None:
        environment["working_dir"] = args.working_dir
    options["runtime_env"] = environment
    return options


def _runtime_env_option(args: argparse.Namespace) -> str:
    """The option that gave the runtime environment, as an error names it."""
    if args.runtime_env is not None:
        return f"--runtime-env {args.runtime_env}"
    return "--runtime-env-json" if args.runtime_env_json is not None else "--working-dir"


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the run if a file it writes (``--results``, ``--stats-json``, ``--provenance``) cannot be written.

    Under mpiexec, only rank 0 writes them (the other ranks have none to check), so it checks them within the
    mapping's head start, once every rank has started MPI: its error then ends every rank's start-up. A rank 0
    that failed before it started MPI left the other ranks waiting for it in ``MPI_Init``, at full CPU, forever.

    Raises:
        Aiod4pError: naming the file and what is wrong with it.
    """
    for path, what in ((args.results, "results"), (args.stats_json, "statistics"), (args.provenance, "provenance")):
        if path not in (None, "-"):
            _check_writable(path, what)
    if args.provenance is not None:
        check_provenance_file(args.provenance)


def _earlier_file(path: str) -> str:
    """``: the file there is an earlier run's...`` if ``path`` is a file, which a run that did not write it (it
    failed, or was suspended) left as it was: a provenance file is written whole, only once the run succeeds."""
    return ": the file there is an earlier run's, left as it was" if os.path.isfile(path) else ""


def _run_loaded(args: argparse.Namespace, mapping: BaseMapping, results: str | None, stdout: TextIO) -> int:
    """Load the workflow of ``args``, run it on ``mapping`` writing its results to ``results`` and report;
    ``stdout`` takes what goes to stdout (results with ``-``, ``--stats-json -``, the printed results)."""
    opened: list[TextIO] = []  # the results file once open: flushed before a hard abort
    reports: list[Callable[[], None]] = []  # writes the statistics reports, once the run is planned
    reporting = threading.Lock()  # the run's end and a hard abort's watchdog may both come to write them

    def report_once(*, failing: bool) -> None:
        """Write the ``--stats``/``--stats-json`` reports unless they were written (wait while they are).

        Raises:
            Aiod4pError: a report cannot be written, unless ``failing`` (the run failed or is being aborted):
                then the error is said, and the run's own (a full disk for the results, say) is not hidden.
        """
        with reporting:
            while reports:
                try:
                    reports.pop()()
                except Aiod4pError as exc:
                    if not failing:
                        raise
                    print(f"aiod4p: error: {exc}", file=sys.stderr)

    def on_hard_abort() -> None:
        """What the abort watchdog does before it ends the process: results flushed, statistics reported."""
        try:
            for out in opened:
                if not out.closed:  # the run closed it once every result was written: a clean-up after it is slow
                    out.flush()
        except OSError as exc:  # a full disk: said, and the statistics are still reported
            print(f"aiod4p: error: cannot write results to {results}: {exc.strerror or exc}", file=sys.stderr)
        finally:
            report_once(failing=True)

    # The mapping may start its workers now, so that they start while the workflow loads (mpi: the ranks
    # import it too); what the run does not take is stopped when it ends. A signal that stops the start-up
    # (Stopped) is said at once, then passes through the mapping's head start, which may have to end its
    # workers' start-up with it (under the user's mpiexec, the other ranks').
    outcome = _Outcome(functools.partial(_warn, args))
    if mapping.checkpointing is not None and mapping.checkpointing.results_path is not None:
        mapping.checkpointing = dataclasses.replace(mapping.checkpointing, results_counted=outcome.written)
        outcome.committed_only = True
    said = False  # a stop was said
    try:
        with (
            Interrupts(
                EXIT_ABORTED,
                before_exit=on_hard_abort,
                produced=outcome.said,
                quiet=getattr(mapping, "follower", False),
                suspend=args.on_signal == "suspend",
            ) as signals,
            contextlib.ExitStack() as started,
        ):
            phase = "loading the workflow"  # what a signal stops, as it says
            try:
                started.enter_context(mapping.head_start(args.target, args.num))
                if job_size() is not None:
                    _check_outputs(args)
                graph = load_workflow(args.target)
                _provenance_the_workflow_asks(args, graph, mapping)
                run_in_threads(graph, args.threaded)
                inputs = parse_cli_inputs(args.iter, args.data, args.file)
                stdin = None
                if args.stdin is not None:
                    find_pe(graph.flatten(), args.stdin, "--stdin")  # else the error would name an input key
                    given = {"max_line": args.max_line, "on_bad": args.on_bad}
                    stdin = LineStream(json=True, **{name: value for name, value in given.items() if value is not None})
                    inputs = {**(inputs if isinstance(inputs, Mapping) else {}), args.stdin: stdin}
                phase = "planning the run"
                workflow = WorkflowRun(
                    graph,
                    inputs,
                    mapping=mapping,
                    workers=args.num,
                    batch_size=args.batch_size,
                    credits=args.credits,
                    provenance=(args.provenance_level or "item") if args.provenance else None,
                )
            except Stopped as stop:
                _aborted(stop.signum, f"{_records(0)} produced", f"while {phase}")
                said = True
                raise
            show_progress = progress_wanted(args.quiet, args.results == "-")
            sampler = StatsSampler(workflow) if args.stats_json else None
            reports.append(
                lambda: report_stats(
                    workflow,
                    table=args.stats,
                    json_path=args.stats_json,
                    samples=sampler.samples if sampler else None,
                    stdout=stdout,
                )
            )
            status = EXIT_ERROR  # until the run returns its own
            try:
                with asyncio.Runner(loop_factory=loop_factory(mapping.uses_uvloop)) as runner:
                    status = runner.run(
                        _consume(workflow, results, signals, outcome, opened, stdout, show_progress, stdin, sampler)
                    )
            except ValueError as exc:  # the options were checked before the run was planned: not a usage error
                raise Aiod4pError(f"{type(exc).__name__}: {exc}") from exc
            except Stopped as stop:
                # asyncio re-raises a KeyboardInterrupt out of the loop and also keeps it as the exception of the
                # task it interrupted (the run's, often): taken here, it is not logged as never retrieved.
                if (task := workflow._task) is not None and task.done() and not task.cancelled():
                    task.exception()
                _aborted(stop.signum, outcome.said(), f"while starting the {mapping.workers_started[1]}")
                said = True
                raise
            finally:
                signals.restore()
                report_once(failing=status != EXIT_OK)
        if status == EXIT_OK and args.provenance:
            if workflow.suspended is None:
                # Seconds for a large run: a first signal meanwhile has nothing to drain, and does not lose the file.
                with signals:
                    write_provenance(workflow.stats, args.provenance)
            else:
                _warn(
                    args,
                    f"--provenance: {args.provenance} not written (a suspended run's records are not all in)"
                    + _earlier_file(args.provenance),
                )
    except Stopped as stop:  # said above, unless it stopped the head start's own end
        return EXIT_ABORTED if said else _aborted(stop.signum, outcome.said(), "")
    if stdin is not None and stdin.skipped and args.on_bad == "skip":
        _warn(args, f"--stdin: {stdin.skipped} bad line{'s' if stdin.skipped != 1 else ''} skipped")
    if status == EXIT_OK and signals.received and not signals.quiet:
        print(f"aiod4p: interrupted by {signals.name}: {_stopped(workflow, signals, outcome)}", file=sys.stderr)
    elif status == EXIT_ABORTED:
        return _aborted(signals.signum, outcome.said(), "")
    if status == EXIT_OK and args.results not in (None, "-", os.devnull) and not args.quiet:
        print(f"aiod4p: {_records(outcome.records)} in {workflow.elapsed:.1f} s -> {args.results}", file=sys.stderr)
    return status


def _stopped(workflow: WorkflowRun, signals: Interrupts, outcome: _Outcome) -> str:
    """How a run that a first signal stopped ended, and what it produced."""
    if signals.after_end:
        return f"the run had ended; {_records(outcome.records)} produced (all its results)"
    if not signals.suspend:
        return f"drained; {_records(outcome.records)} produced (partial results)"
    if workflow.suspended is None:
        return f"the run ended before a checkpoint could suspend it; {_records(outcome.records)} produced"
    checkpointing = workflow.mapping.checkpointing
    assert checkpointing is not None  # --on-signal suspend needs --checkpoint-dir
    stopped = f"suspended at checkpoint {workflow.suspended} in {checkpointing.directory}; {_records(outcome.records)}"
    if outcome.committed_only or (checkpointing.restarts and workflow.mapping.uses_processes):
        return f"{stopped} committed (--restore resumes the run from there)"
    # Without --restarts (ignored on a mapping without processes), the results printed as they came (--results -)
    # may include some the checkpoint did not commit.
    return f"{stopped} produced (--restore resumes the run from there, and makes again those produced after it)"


def _natural(text: str) -> list[str | int]:
    """A sort key putting ``Read0.0.9`` before ``Read0.0.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _cap_workers(args: argparse.Namespace, mapping: BaseMapping) -> None:
    """At most one worker per CPU where the workers share this machine's CPUs, unless ``--oversubscribe``.

    dispel4py's rule still shares out the ``-n`` asked for (``mapping.processes``), up to
    ``MOST_SHARED_PROCESSES``: a dispel4py graph's instance counts, and so its results, do not depend on
    the machine's CPUs.
    """
    if mapping.shares_cpus and args.num is not None and not args.oversubscribe and args.num > available_cpus():
        cpus = available_cpus()
        mapping.processes = min(args.num, MOST_SHARED_PROCESSES)
        shared = (
            f"; the instances of a dispel4py graph are shared out as dispel4py does for -n {MOST_SHARED_PROCESSES}"
            if args.num > MOST_SHARED_PROCESSES
            else ""
        )
        one, several = mapping.workers_started
        _warn(
            args,
            f"-n {args.num}: {cpus} CPU{'s' if cpus > 1 else ''} available, so {cpus} {several if cpus > 1 else one}"
            f" (more would only compete for them; --oversubscribe starts {args.num})" + shared,
        )
        args.num = cpus


def _graph(args: argparse.Namespace) -> int:
    mapping = get_mapping(args.mapping)
    _cap_workers(args, mapping)  # the workers `aiod4p run` would start
    to_stdout = args.output == "-"  # for a pipe: aiod4p graph flow.py -o - | dot -Tpng > flow.png
    with _stdout_for_data(to_stdout) as out:  # what the workflow prints as it loads goes to stderr then
        options = mapping.plan_options(args.num, DEFAULT_BATCH_SIZE, DEFAULT_CREDITS)
        plan = make_plan(load_workflow(args.target), options)
        if to_stdout:
            out.write(to_dot(plan, title=args.target))
            return 0
    print(f"wrote {draw(plan, args.output, title=args.target)}")
    return 0


def _ignored_options(args: argparse.Namespace, mapping: BaseMapping) -> list[str]:
    """Warnings for options that have no effect on this run."""
    ignored = []
    if args.num is not None and not mapping.takes_workers:
        ignored.append(f"-n is ignored: the {mapping.name} mapping runs one instance of every PE")
    given = [option for option, value in (("-f", args.file), ("-d", args.data), ("-i", args.iter)) if value is not None]
    ignored.extend(f"{option} is ignored: {given[0]} gives the inputs" for option in given[1:])
    if args.restarts and not mapping.uses_processes:
        ignored.append(
            f"--restarts is ignored: the {mapping.name} mapping runs in this process, where no worker dies alone"
            " (--restore resumes a run that was stopped)"
        )

    if not mapping.reports_stats:
        ignored.extend(
            f"{option} is ignored: the {mapping.name} mapping reports no per-PE statistics"
            for option, given in (("--stats", args.stats), ("--stats-json", args.stats_json is not None))
            if given
        )
    if not mapping.runs_the_engine:
        ignored.extend(
            f"{option} is ignored: the {mapping.name} mapping routes each item itself"
            for option, given in (
                ("--batch-size", args.batch_size != DEFAULT_BATCH_SIZE),
                ("--credits", args.credits != DEFAULT_CREDITS),
                ("--threaded", bool(args.threaded)),
            )
            if given
        )
    cpus = available_cpus()
    if args.oversubscribe and not mapping.shares_cpus:
        ignored.append(f"--oversubscribe is ignored: the {mapping.name} mapping does not limit -n to the CPUs")
    on_a_cluster = args.mapping == "ray" and not mapping.shares_cpus  # the actors do not share this machine's CPUs
    if mapping.uses_processes and args.num is not None and args.num > 4 * cpus and not on_a_cluster:
        ignored.append(
            f"-n {args.num} starts {args.num} {mapping.workers_started[1]} on {cpus} CPU{'s' if cpus > 1 else ''}:"
            f" start-up is slow and they compete for the CPUs (-n {cpus} uses every CPU)"
        )
    return ignored


def _provenance_the_workflow_asks(args: argparse.Namespace, graph: Any, mapping: BaseMapping) -> None:
    """Without ``--provenance``, record the provenance a dispel4py workflow's ``configure_prov_run`` asked for,
    in the file it names, and say so (rank 0 only, under the user's mpiexec); ``--provenance-level`` without
    either is said to be ignored."""
    asked = sys.modules.get("aiod4p.compat.provenance")  # loaded only by a workflow that uses dispel4py's API
    config = asked.provenance_config(graph) if asked is not None else None
    if config is not None and args.provenance is None and not getattr(mapping, "follower", False):
        asks = "the workflow's configure_prov_run asks for provenance"
        if mapping.name == "storm":
            _warn(args, f"{asks}, which the storm mapping does not record (Storm routes the items itself)")
        else:
            check_provenance_file(config.path)
            _check_writable(config.path, "provenance")
            args.provenance, args.provenance_level = config.path, args.provenance_level or config.level
            _check_files_apart(args, "the workflow's configure_prov_run file")
            _warn(args, f"{asks}: writing {config.path} (--provenance FILE to choose)")
            _warn_of_partial_provenance(args, mapping)
    if args.provenance_level is not None and args.provenance is None:
        _warn(args, "--provenance-level is ignored: --provenance FILE records provenance")


def _warn_of_partial_provenance(args: argparse.Namespace, mapping: BaseMapping) -> None:
    if args.provenance is not None and (args.restore or (args.restarts and mapping.uses_processes)):
        _warn(
            args,
            "--provenance records the last attempt only: after a restore (--restore, or a restart after a dead"
            " worker) it starts at the checkpoint, so results made before it are not traced, and lineage through"
            " PE state restored from it stops there",
        )


def _warn(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"aiod4p: warning: {message}", file=sys.stderr)


def _check_files_apart(args: argparse.Namespace, provenance: str = "--provenance") -> None:
    """Refuse two files of ``aiod4p run`` that are one, as the OS finds them (after symbolic links, hard links
    too): the input file ``-f``, and ``--results``, ``--stats-json`` and ``--provenance``, whose writer each
    replaces the file (the others' contents were lost, silently); and any of them where ``--checkpoint-dir``'s
    checkpoints are written. Streams (``-``, ``/dev/null``, a named pipe) are not files: what is written to
    them is not replaced. ``provenance`` names where the provenance file was given.

    Raises:
        ValueError: naming both options and their paths.
    """
    files = [
        (option, path)
        for option, path in (
            ("-f", args.file),
            ("--results", args.results),
            ("--stats-json", args.stats_json),
            (provenance, args.provenance),
        )
        if path not in (None, "-") and not _is_stream(path)
    ]
    for index, (option, path) in enumerate(files):
        for earlier, earlier_path in files[:index]:
            if _same_file(earlier_path, path):
                raise ValueError(
                    f"{earlier} {earlier_path} and {option} {path} are the same file, which would keep only one of"
                    " them: give each its own"
                )
        if args.checkpoint_dir is not None and in_checkpoint_store(path, args.checkpoint_dir):
            raise ValueError(
                f"{option} {path} is --checkpoint-dir {args.checkpoint_dir}'s own (the directory, its lock, its run"
                " record or a checkpoint), which the checkpoints write: give another path"
            )


def _same_file(first: str, second: str) -> bool:
    """Whether two paths name one file: the same existing file, or else the same path once resolved."""
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return Path(first).resolve() == Path(second).resolve()


def _check_writable(path: str, what: str) -> None:
    """Fail before the run if ``path`` cannot be written, neither changing it nor creating it.

    Permissions alone do not tell (root on a file system that refuses it anyway, such as /sys or an NFS
    share that squashes root): an existing file is opened for appending, and for a new one a file of
    another name is created beside it and removed at once.

    Raises:
        Aiod4pError: naming the file and the reason.
    """
    target = Path(path)
    if target.is_dir():
        reason = "it is a directory"
    elif target.is_file():
        reason = _refused(target, os.O_WRONLY | os.O_APPEND)
    elif target.exists():  # a device or a pipe: opening it may wait, or act
        reason = "" if os.access(target, os.W_OK) else "Permission denied"
    elif not target.parent.is_dir():
        reason = "No such file or directory"
    else:
        probe = target.with_name(f".{target.name}.aiod4p-check-{os.getpid()}")
        reason = _refused(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        if not reason:
            probe.unlink()
    if reason:
        raise Aiod4pError(f"cannot write {what} to {path}: {reason}")


def _refused(path: Path, flags: int) -> str:
    """Why ``path`` cannot be opened with ``flags`` (closed at once), or ``""`` if it can."""
    try:
        os.close(os.open(path, flags, 0o666))
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def _records(count: int) -> str:
    return _counted(count, "record")


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _aborted(signum: int, produced: str, when: str) -> int:
    """Say that a signal aborted the run (``when``: in which phase) and what it ``produced`` (:meth:`_Outcome.said`)."""
    where = f" {when}" if when else ""
    print(f"aiod4p: aborted by {signal.Signals(signum).name}{where}; {produced}", file=sys.stderr)
    return EXIT_ABORTED


GATHERED_RESULTS_WARNING = 1_000_000
"""Results gathered to be printed when the run ends (no ``--results``) at which ``aiod4p run`` warns, once, that
they are all held in memory until then (a run of an endless source grows without bound)."""


class _Outcome:
    """What a run produced so far (read after it stopped, however it stopped); ``warn`` says what the user must
    know while it runs."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.records = 0
        self.warn = warn
        #: ``records`` counts only what checkpoints committed (a run that writes its --results file itself): an
        #: aborted run's file may hold more, written after the last one, which a restore drops.
        self.committed_only = False

    def said(self) -> str:
        """What the run produced, for the line that says it was aborted."""
        if self.committed_only:
            return (
                f"{_records(self.records)} committed by checkpoints (the results file may hold more, written after"
                " the last one: --restore drops them)"
            )
        return f"{_records(self.records)} produced"

    def written(self, records: int) -> None:
        """The run wrote ``records`` more to its results file itself (:attr:`Checkpointing.results_counted`)."""
        self.records += records


async def _consume(
    workflow: WorkflowRun,
    results_path: str | None,
    signals: Interrupts,
    outcome: _Outcome,
    opened: list[TextIO],
    stdout: TextIO,
    show_progress: bool = False,
    stdin: LineStream | None = None,
    sampler: StatsSampler | None = None,
) -> int:
    """Run ``workflow``, writing its results; SIGINT/SIGTERM as :class:`Interrupts` says.

    The results file, once open, is added to ``opened`` (flushed by a hard abort).

    The dead letters of ``stdin`` (``--on-bad dead-letter``) are results of
    PE ``stdin``, port ``dead_letter``.

    Results go to ``stdout`` when ``results_path`` is ``-`` or ``None`` (printed
    at the end). Returns ``EXIT_OK``, ``EXIT_ABORTED``, or ``EXIT_PIPE`` when the
    reader of ``stdout`` went away (the run is stopped; nothing more is written).
    """
    main_task = asyncio.current_task()
    assert main_task is not None
    signals.attach(workflow, main_task)
    out: TextIO | None = None
    where = "stdout" if results_path in (None, "-") else results_path
    wrote_all = False  # else the run's own outcome (a failure, an abort) is what a failing close must not hide
    try:
        if results_path == "-":
            out = stdout
        elif results_path is not None:
            with writing("results", results_path):
                out = open(results_path, "w", encoding="utf-8")  # noqa: SIM115, ASYNC230 - closed below; opening is instant
        if out is not None:
            opened.append(out)
        grouped: dict[tuple[str, str], list[Any]] = {}

        def emit(record: ResultRecord) -> None:
            outcome.records += 1
            if out is not None:
                try:
                    _write_record(out, record, flush=out is stdout)
                except OSError:
                    with writing("results", where):  # only once a write failed: it costs per record
                        raise
            else:
                grouped.setdefault((record.pe, record.port), []).append(record.data)
                if outcome.records == GATHERED_RESULTS_WARNING:
                    outcome.warn(
                        f"{_records(outcome.records)} so far, all held in memory to be printed when the run ends:"
                        " give --results - to print them as they come, or --results FILE"
                    )

        if stdin is not None:
            stdin.dead_letter = lambda bad: emit(ResultRecord("stdin", DEAD_LETTER, bad))
        reader_gone = _watch_reader(main_task, stdout) if out is stdout else None
        try:
            async with (
                workflow,
                progress(workflow) if show_progress else contextlib.nullcontext(),
                sampler if sampler is not None else contextlib.nullcontext(),
            ):
                async for record in workflow:
                    emit(record)
        except Aiod4pError:
            if out is None and grouped:  # else they were to be printed at the end, which a failed run never reaches
                with contextlib.suppress(OSError):
                    _print_results(grouped, stdout)
                    stdout.flush()
            raise
        except asyncio.CancelledError:
            if reader_gone is not None and reader_gone.is_set():
                return _stdout_closed(stdout)
            return EXIT_ABORTED
        except BrokenPipeError:
            if out is not None and out is not stdout:  # a named pipe: its reader leaving loses results
                raise reader_went_away("results", where) from None
            return _stdout_closed(stdout)
        finally:
            if reader_gone is not None:
                asyncio.get_running_loop().remove_reader(stdout.fileno())
        try:
            with writing("results", where):
                if out is None:
                    _print_results(grouped, stdout)
                stdout.flush()  # what is still buffered may fail only now (a full disk)
        except BrokenPipeError:
            return _stdout_closed(stdout)
        wrote_all = True
        return EXIT_OK
    finally:
        if out is not None and out is not stdout:
            with writing("results", where):
                try:
                    out.close()  # flushes: a full disk, or a named pipe's reader gone, may fail only now
                except BrokenPipeError:
                    if wrote_all:
                        raise reader_went_away("results", where) from None


def _watch_reader(main_task: asyncio.Task[Any], stdout: TextIO) -> asyncio.Event | None:
    """When ``stdout`` is a pipe, cancel ``main_task`` as soon as its reader goes away (``| head``), even if
    the run has nothing more to write; the event returned is set then. ``None`` for anything but a pipe."""
    fd = stdout.fileno()
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return None
    gone = asyncio.Event()

    def closed() -> None:  # the write end of a pipe polls as readable (an error) once the read end is closed
        if not gone.is_set():
            gone.set()
            main_task.cancel()

    blocking = os.get_blocking(fd)
    asyncio.get_running_loop().add_reader(fd, closed)
    os.set_blocking(fd, blocking)  # uvloop makes a watched fd non-blocking: writes to a full pipe would fail
    return gone


def _silence_stdout(stdout: TextIO | None = None) -> None:
    """Point ``stdout`` (default: ``sys.stdout``) at the null device: what is still buffered for it is
    dropped at exit, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, (stdout or sys.stdout).fileno())
    os.close(devnull)


def _stdout_closed(stdout: TextIO | None = None) -> int:
    """The reader of ``stdout`` (default: ``sys.stdout``) went away (``| head``): exit quietly, as Unix
    tools do."""
    _silence_stdout(stdout)  # Python's own flush at exit must not fail again
    return EXIT_PIPE


@contextlib.contextmanager
def _stdout_for_data(reserved: bool) -> Iterator[TextIO]:
    """The stream for what the command writes to stdout.

    When ``reserved`` (``--results -``, ``--stats-json -``: JSON that ``jq`` or ``head`` reads), stdout
    carries that data only: the stream given writes to the command's stdout, while file descriptor 1,
    and with it ``sys.stdout`` (the PEs' ``print``), the worker processes started meanwhile and Ray's
    worker logs, points to stderr until the block ends. Else it is ``sys.stdout``.
    """
    if not reserved:
        yield sys.stdout
        return
    sys.stdout.flush()
    data = open(os.dup(1), "w", encoding="utf-8")  # noqa: SIM115 - closed below
    os.dup2(2, 1)
    try:
        yield data
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()  # the PEs' output still buffered: to stderr
        os.dup2(data.fileno(), 1)  # a silenced stdout (its reader gone) stays silenced
        with contextlib.suppress(OSError):  # the run flushed it: a failure here followed one reported
            data.close()


def _write_record(out: TextIO, record: ResultRecord, *, flush: bool) -> None:
    out.write(record_line(record))
    if flush:
        out.flush()


def _print_results(grouped: dict[tuple[str, str], list[Any]], stdout: TextIO) -> None:
    """Print the results of every PE and port, each as its ``repr``.

    Raises:
        Aiod4pError: a result has no ``repr`` (nested deeper than Python recurses), naming its PE and port.
    """
    if not grouped:
        print("No results.", file=stdout)
        return
    with _plain_numbers():
        for (pe, port), items in grouped.items():
            print(f"{pe}.{port}: {len(items)} item{'s' if len(items) != 1 else ''}", file=stdout)
            for item in items:
                try:
                    text = repr(item)
                except RecursionError as exc:
                    raise Aiod4pError(f"a result of PE {pe} on port {port} cannot be printed: {exc}") from None
                print(f"  {text}", file=stdout)


def _plain_numbers() -> contextlib.AbstractContextManager[Any]:
    """Meanwhile numpy scalars print as the numbers they are (``112761.0``), as before numpy 2, not as
    ``np.float64(112761.0)``, also inside tuples, lists and dicts (when the run imported numpy)."""
    numpy = sys.modules.get("numpy")
    if numpy is None or int(numpy.__version__.split(".")[0]) < 2:
        return contextlib.nullcontext()
    options: contextlib.AbstractContextManager[Any] = numpy.printoptions(legacy="1.25")
    return options


# -- provenance and plots (issue 15) ------------------------------------------------


def _add_provenance_options(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("provenance (W3C PROV, needs aiod4p[provenance])")
    group.add_argument(
        "--provenance",
        type=_path,
        default=None,
        metavar="FILE",
        help="record provenance: FILE.json (PROV-JSON), .provn or .xml",
    )
    group.add_argument(
        "--provenance-level",
        default=None,
        choices=PROVENANCE_LEVELS,
        help="item: the lineage of every item (default); pe: per PE and port counts and timing, nearly free",
    )


def _positive_seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


_positive_seconds.__name__ = "seconds"  # argparse names the type in its messages


def _add_checkpoint_options(run: argparse.ArgumentParser) -> None:
    """The checkpoint options; their defaults are :class:`Checkpointing`'s (given: ``None``)."""
    group = run.add_argument_group("checkpoints and recovery (docs/recovery.md)")
    group.add_argument("--checkpoint-dir", type=_path, default=None, metavar="DIR", help="take checkpoints into DIR")
    group.add_argument(
        "--checkpoint-interval",
        type=_positive_seconds,
        default=None,
        metavar="SEC",
        help=f"seconds between checkpoints (default {Checkpointing.interval})",
    )
    group.add_argument(
        "--checkpoint-keep",
        type=_POSITIVE,
        default=None,
        metavar="K",
        help=f"complete checkpoints kept (default {Checkpointing.keep})",
    )
    group.add_argument("--restore", action="store_true", help="resume from the newest complete checkpoint in DIR")
    group.add_argument(
        "--on-signal",
        choices=("drain", "suspend"),
        default="drain",
        help="what the first SIGINT/SIGTERM/SIGHUP does: drain (the sources stop, what is in flight finishes, the run"
        " ends) or suspend (a checkpoint now, the run stops at it, and --restore resumes it: for maintenance; needs"
        " --checkpoint-dir) (default drain)",
    )
    group.add_argument(
        "--restarts",
        type=_COUNT,
        default=None,
        metavar="N",
        help="restart the run from its last checkpoint when a worker dies, up to N times"
        f" (default {Checkpointing.restarts})",
    )


def _checkpointing(args: argparse.Namespace) -> Checkpointing | None:
    """The checkpoint options given, or ``None``; ``--results FILE`` becomes exactly-once.

    Raises:
        ValueError: an option needs ``--checkpoint-dir``; or ``--stdin``'s dead letters would go to that
            file, which the run writes itself (they would be lost).
    """
    given = {
        field: value
        for field, value in (
            ("interval", args.checkpoint_interval),
            ("keep", args.checkpoint_keep),
            ("restarts", args.restarts),
        )
        if value is not None
    }
    if args.checkpoint_dir is None:
        if given or args.restore:
            raise ValueError("--restore, --restarts and --checkpoint-* options need --checkpoint-dir")
        if args.on_signal == "suspend":
            raise ValueError(
                "--on-signal suspend needs --checkpoint-dir: a suspended run stops at a checkpoint, which --restore"
                " resumes"
            )
        return None
    # A results stream (a named pipe, /dev/stdout) has no length a checkpoint could commit: it is written as
    # `--results -` is, each result once a checkpoint that commits it completed (with --restarts).
    results = args.results if args.results not in (None, "-") and not _is_stream(args.results) else None
    if results is not None and args.stdin is not None and args.on_bad == "dead-letter":
        raise ValueError(
            "--on-bad dead-letter cannot go with --checkpoint-dir and --results FILE: the dead letters of --stdin"
            " are not committed with the checkpoints (use --on-bad skip, or a LinesSource(on_bad='dead-letter') in"
            " the workflow, whose dead_letter results are)"
        )
    return Checkpointing(args.checkpoint_dir, restore=args.restore, results_path=results, **given)


def _is_stream(path: str) -> bool:
    """Whether ``path`` is a file that exists and is not a regular one (a named pipe, a character device)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _add_science_parsers(commands: Any) -> None:
    lineage = commands.add_parser(
        "provenance",
        help="show what a provenance file records, or the lineage of one result",
        description="Read a PROV-JSON file written by `aiod4p run --provenance` and trace results to their sources.",
        usage="%(prog)s [-h] FILE [--trace RESULT [--draw OUT]] [--debug]",  # argparse cannot say --draw needs --trace
    )
    lineage.add_argument("file", type=_path, metavar="FILE", help="the PROV-JSON (or PROV-XML, or PROV-N) file")
    lineage.add_argument(
        "--trace",
        default=None,
        metavar="RESULT",
        help="an entity id, (part of) the repr of a result's value, or the result as --results writes it",
    )
    lineage.add_argument(
        "--draw",
        type=_path,
        default=None,
        metavar="OUT",
        help="with --trace: draw the lineage of RESULT: OUT.dot, .svg, .png or .pdf",
    )
    _add_debug_option(lineage)
    stats = commands.add_parser("stats", help="work with a --stats-json file", description="Statistics files.")
    actions = stats.add_subparsers(dest="stats_command", required=True)
    plot = actions.add_parser(
        "plot", help="plot per-PE throughput and busy time over the run", description="Plot a --stats-json file."
    )
    plot.add_argument("file", type=_path, metavar="STATS.json", help="written by `aiod4p run --stats-json`")
    plot.add_argument("-o", "--output", type=_path, required=True, metavar="FILE", help="FILE.png, .svg or .pdf")
    _add_debug_option(plot)


def _science_command(args: argparse.Namespace) -> int:
    if args.command == "stats":
        from ._plot import plot_stats

        print(f"wrote {plot_stats(args.file, args.output)}")
        return 0
    if args.draw is not None:
        if args.trace is None:
            raise ValueError("--draw draws the lineage of a result: give it with --trace RESULT")
        check_drawing(args.draw, "a lineage")
        _check_writable(args.draw, "the lineage's drawing")
    lineage = read_lineage(args.file)
    restored = (
        f"  recorded from checkpoint {', '.join(map(str, sorted(lineage.restored)))} on (a restored run): the results"
        " made before it are not here (the --results file has them all), and a lineage through PE state restored"
        " from it stops there, without the sources before it"
    )
    if args.trace is None:
        results = lineage.results()
        print(f"{args.file}: {len(lineage.values)} entities, {len(results)} results")
        if not results and lineage.kinds and all(kind.endswith(":Stream") for kind in lineage.kinds.values()):
            print(
                "  recorded at level pe: each PE's streams and each instance's counts, not the items nor the"
                " results (--provenance-level item records them, to trace a result)"
            )
        if lineage.restored:
            print(restored)
        for entity in results[:20]:
            print(f"  {entity} = {lineage.values[entity]}")
        if len(results) > 20:
            print(f"  ... ({len(results) - 20} more)")
        return 0
    found = lineage.find(args.trace)
    if lineage.restored:
        print(restored)
    for entity in found:
        chain = lineage.trace(entity)
        sources = lineage.sources(entity)
        print(f"{entity} = {lineage.values.get(entity, '')}  (made by {lineage.made_by.get(entity, 'input')})")
        print(f"  lineage: {_counted(len(chain) - 1, 'item')}; {_counted(len(sources), 'source')}:")
        for source in sorted(sources, key=_natural):
            print(f"    {source} = {lineage.values.get(source, '')}  (made by {lineage.made_by.get(source, 'input')})")
    if args.draw is not None:
        print(f"wrote {draw_dot(lineage.to_dot(found), args.draw, 'a lineage')}")
    return 0
