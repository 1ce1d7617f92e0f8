"""The docs name the code as it is, checked mechanically (parsing only: nothing runs): every option an
``aiod4p`` command in README.md or docs/*.md gives exists in that command's parser, and so does every
``--option`` they name; every default they quote for an option is the parser's (or its help's, where the
parser leaves it to the run); a table of an option's values lists its choices; docs/cli.md's synopsis
lists every option of every command; a keyword given to a function or class of aiod4p is one it takes;
an extra to install is one pyproject.toml has. What the docs' commands print is tests/test_readme.py's."""

from __future__ import annotations

import argparse
import inspect
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import aiod4p
import aiod4p.sources
import aiod4p.windows
from aiod4p._cli import _parser
from aiod4p.mappings import _host, _shipping, multi, ray, storm
from aiod4p.transports import pipes

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
Command = tuple[str, ...]


def _commands(parser: argparse.ArgumentParser, words: Command = ()) -> dict[Command, argparse.ArgumentParser]:
    """Every (sub)command, by its words (``()``, ``("run",)``, ``("storm", "build")``...)."""
    found = {words: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, (*words, name)))
    return found


PARSERS = _commands(_parser())
ACTIONS = {
    option: action for parser in PARSERS.values() for action in parser._actions for option in action.option_strings
}


def _code(text: str) -> Iterator[tuple[int, str]]:
    """Each line of a code block, with its continuation lines (a trailing backslash, or the indented lines of
    a synopsis) joined, and each inline code span; with the line number where it starts."""
    in_block, start, current = False, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if current:
                yield start, current
            in_block, current = not in_block, ""
        elif in_block:
            if current and (current.endswith("\\") or line.startswith(" ")):
                current = current.rstrip("\\") + " " + line.strip()
            else:
                if current:
                    yield start, current
                start, current = number, line
    outside = re.sub(r"```.*?```", lambda block: "\n" * block.group().count("\n"), text, flags=re.S)
    for span in re.finditer(r"`([^`]+)`", outside):
        yield outside.count("\n", 0, span.start()) + 1, span.group(1).replace("\n", " ")


def _invocations() -> Iterator[tuple[str, Command, list[str]]]:
    """``(where, command, options)`` for each ``aiod4p`` command the docs write."""
    for doc in DOCS:
        for number, code in _code(doc.read_text()):
            code = re.sub(r"'[^']*'|\"[^\"]*\"", "''", code)  # the values of -d and --trace
            for match in re.finditer(r"(?:^|[\s/$(])aiod4p((?: +[^\s#;&)`]+)*)", code):
                words = match.group(1).split()
                command: Command = ()
                while words and (*command, words[0]) in PARSERS:
                    command, words = (*command, words[0]), words[1:]
                if not command or "..." in command:
                    continue  # prose (`aiod4p run` alone), or a command named to show it fails
                depth, options = 0, []
                for word in words:
                    if word == "|" and depth == 0:
                        break  # a pipe to another program; inside [...] it is a synopsis' alternative
                    depth += word.count("[") - word.count("]")
                    option = re.fullmatch(r"[\[]*(--?[a-zA-Z][\w-]*)(?:=.*|[\]]*)", word)
                    if option:
                        options.append(option.group(1))
                yield f"{doc.name}:{number}", command, options


def test_every_option_an_aiod4p_command_in_the_docs_gives_exists() -> None:
    wrong = []
    checked = 0
    for where, command, options in _invocations():
        known = {option for action in PARSERS[command]._actions for option in action.option_strings}
        known |= {"--debug", "--version"} if command[:1] != ("storm",) else {"--debug"}
        wrong += [f"{where}: aiod4p {' '.join(command)} {option}" for option in options if option not in known]
        checked += len(options)
    assert checked > 100, checked  # the extraction still finds the docs' commands
    assert not wrong, "options the command does not have:\n" + "\n".join(wrong)


def _default(option: str) -> str:
    """The option's default, as the docs should quote it: the parser's, or, where the parser leaves it to
    the run (``None``), the one its help states."""
    action = ACTIONS[option]
    if action.default not in (None, False, argparse.SUPPRESS):
        return str(action.default)
    stated = re.search(r"\(default ([\w.]+)", action.help or "")
    assert stated, f"{option} has no default in the parser or its help"
    return stated.group(1)


def _same(quoted: str, default: str) -> bool:
    try:
        return float(quoted.replace(",", "")) == float(default)
    except ValueError:
        return quoted == default


def _quoted_defaults() -> Iterator[tuple[str, str, str]]:
    """``(where, option, default)`` for each default the prose quotes next to an option, in one clause
    (``--credits`` batches in flight (default 4); (default 3, ``--max-replays``)), or in the default
    column of a table of options."""
    near = (
        r"`(?P<option>--[a-z][\w-]*)[^`]*`[^.;:()`]{0,40}?\(?default:? (?P<value>[\d.,]*\d)",
        r"\(default:? (?P<value>[\d.,]*\d)[^.;:()`]{0,40}?`(?P<option>--[a-z][\w-]*)[^`]*`",
    )
    for doc in DOCS:
        text = doc.read_text()
        for pattern in near:
            for match in re.finditer(pattern, text):
                where = f"{doc.name}:{text.count(chr(10), 0, match.start()) + 1}"
                yield where, match.group("option"), match.group("value")
        column = None
        for number, line in enumerate(text.splitlines(), 1):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
            if not cells:
                column = None
            elif "default" in cells and column is None:
                column = cells.index("default")
            elif (
                column is not None
                and (option := re.match(r"`(--[a-z][\w-]*)", cells[0]))
                and re.fullmatch(r"[\d.,]+", cells[column])
            ):
                yield f"{doc.name}:{number}", option.group(1), cells[column]


def test_every_default_the_docs_quote_for_an_option_is_the_parser_s() -> None:
    quoted = list(_quoted_defaults())
    assert len(quoted) >= 8, quoted  # the extraction still finds the docs' defaults
    wrong = [
        f"{where}: {option} default {value}, the parser's is {_default(option)}"
        for where, option, value in quoted
        if option in ACTIONS and not _same(value, _default(option))  # an unknown option: the test above
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_the_values_a_table_of_an_option_lists_are_its_choices(doc: Path) -> None:
    option = None
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cells:
            option = None
        elif option is None:
            header = re.fullmatch(r"`(--[a-z][\w-]*)`", cells[0])
            option = header.group(1) if header and ACTIONS[header.group(1)].choices else None
        elif value := re.match(r"`([^`]+)`", cells[0]):
            assert value.group(1) in (ACTIONS[option].choices or ()), f"{doc.name}:{number}: {option} {value.group(1)}"


# Options of other programs the docs name (setup, pip, mpiexec, docker, ray, pytest, the examples and benchmarks).
OTHER_PROGRAMS_OPTIONS = {
    "--dev",  # scripts/setup
    "--port",  # examples/service.py
    "--quick",  # bench/*.py
    "--sweep",  # bench/bench_science.py
    "--no-binary",  # pip
    "--host",  # mpiexec
    "--hostfile",
    "--cpus",  # docker
    "--working-dir",  # ray
    "--runtime-env-json",
    "--resources",
    "--head",
    "--timeout",  # pytest-timeout
    "--simple",  # dispel4py's multi and mpi
    "--force",  # sparse submit
}


def test_every_long_option_the_docs_name_is_aiod4p_s_or_another_program_s() -> None:
    """A bare ``--option`` in prose (`--results FILE`) names an option of aiod4p: one renamed or removed
    is caught here too."""
    unknown = [
        f"{doc.name}:{number}: {option}"
        for doc in DOCS
        for number, code in _code(doc.read_text())
        for option in re.findall(r"(?<![\w/.-])(--[a-z][\w-]*)", code)
        if option not in ACTIONS and option not in OTHER_PROGRAMS_OPTIONS
    ]
    assert not unknown, "options no program has:\n" + "\n".join(unknown)


def test_the_synopsis_of_docs_cli_md_lists_every_option_of_every_command() -> None:
    """What ``aiod4p COMMAND --help`` lists, the synopsis of docs/cli.md lists too (``-h`` and ``--debug``,
    which every command has, aside)."""
    synopsis = re.search(r"```\n(.*?)```", (ROOT / "docs" / "cli.md").read_text(), re.S)
    assert synopsis is not None
    given: dict[Command, set[str]] = {}
    for where, command, options in _invocations():
        if where.startswith("cli.md:") and int(where.split(":")[1]) < synopsis.group().count("\n") + 2:
            given.setdefault(command, set()).update(options)
    given.setdefault((), set()).update(re.findall(r"^aiod4p (--[\w-]+)", synopsis.group(1), re.M))
    missing = [
        f"aiod4p {' '.join(command)} {'/'.join(action.option_strings)}"
        for command, parser in PARSERS.items()
        if not any(isinstance(action, argparse._SubParsersAction) for action in parser._actions) or command == ()
        for action in parser._actions
        if action.option_strings
        and not {"-h", "--debug"} & set(action.option_strings)
        and not set(action.option_strings) & given.get(command, set())
    ]
    assert not missing, "options docs/cli.md's synopsis leaves out:\n" + "\n".join(missing)


def test_every_keyword_the_docs_give_a_public_class_or_function_is_one_it_takes() -> None:
    """``LineStream(source=...)``, ``Checkpointing(interval=..., keep=...)``: a keyword renamed in the code
    and not in the docs fails the user's copy of it with a ``TypeError``."""
    # the public API, and the worker host's, which docs/worker-host.md teaches to build a mapping with
    namespaces = [aiod4p, aiod4p.sources, aiod4p.windows, multi, ray, storm, _host, _shipping, pipes]
    wrong, checked = [], 0
    for doc in DOCS:
        text = doc.read_text()
        # name(arguments), the arguments with their own parentheses (nested calls) taken out
        for call in re.finditer(r"\b([A-Za-z_][\w.]*)\(((?:[^()`]|\([^()`]*\))*)\)", text):
            name = call.group(1).rsplit(".", 1)[-1]
            found = next((getattr(space, name) for space in namespaces if hasattr(space, name)), None)
            keywords = re.findall(
                r"(?:^|,)\s*([a-z_]\w*)\s*=(?!=)", re.sub(r"\([^()]*\)|\{[^{}]*\}", "", call.group(2))
            )
            if not callable(found) or not keywords:
                continue
            parameters = inspect.signature(found).parameters
            if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
                continue
            checked += len(keywords)
            where = f"{doc.name}:{text.count(chr(10), 0, call.start()) + 1}"
            wrong += [f"{where}: {name}({keyword}=)" for keyword in keywords if keyword not in parameters]
    assert checked > 30, checked  # the extraction still finds the docs' calls
    assert not wrong, "keywords the callable does not take:\n" + "\n".join(wrong)


def test_every_extra_the_docs_install_is_in_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {
        (doc.name, extra)
        for doc in DOCS
        for group in re.findall(r"(?:aiod4p|'\.)\[([a-z][a-z0-9,-]*)\]", doc.read_text())  # not [EXTRAS]
        for extra in group.split(",")
    }
    assert len(named) >= 8, named  # the extraction still finds them
    assert not {(doc, extra) for doc, extra in named if extra not in extras}, sorted(extras)
