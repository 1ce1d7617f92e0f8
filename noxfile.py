"""Developer sessions: ``nox -s tests lint typecheck bench``."""

from __future__ import annotations

from pathlib import Path

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


@nox.session
def differential(session: nox.Session) -> None:
    """dispel4py 1.2.1 (in .venv-dispel4py, created here) against aiod4p on dispel4py's own examples."""
    session.install("-e", ".[all,dev]")
    if not Path(".venv-dispel4py/bin/python").exists():
        session.run("python", "-m", "venv", ".venv-dispel4py")
    session.run(
        ".venv-dispel4py/bin/python", "-m", "pip", "install", "-q", "dispel4py==1.2.1", "mpi4py", "mpich", external=True
    )
    session.run("pytest", "-q", "tests/test_differential.py", "tests/test_compat.py", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """The full soak: 10 million items from a live source through a slower sink, RSS growth under 50 MB."""
    session.install("-e", ".[all,dev]")
    session.run("pytest", "-q", "-s", "tests/test_soak.py", *session.posargs, env={"AIOD4P_SOAK_ITEMS": "10000000"})
