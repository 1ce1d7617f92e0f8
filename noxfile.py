"""Developer sessions: ``nox -s tests lint typecheck bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (dispel4py's differential tests need scripts/setup --dev)."""
    session.install("-e", ".[all,dev]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "aiod4p", "tests", "examples", "bench")
    session.run("ruff", "format", "--check", "aiod4p", "tests", "examples", "bench")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[all,dev]")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark; rewrites bench/RESULTS.md."""
    session.install("-e", ".[all]")
    session.run("python", "bench/run_all.py", *session.posargs)
