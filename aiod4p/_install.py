"""How to install an optional extra: the one place that says it.

aiod4p is installed from a clone of its repository (it is not on PyPI yet),
so the hint is the editable install that works there, into the environment
running aiod4p (whose ``pip`` may not be the one on the PATH).
"""

from __future__ import annotations

import sys

__all__ = ["install_hint"]


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` (e.g. ``"mpi"``), for error messages."""
    return f"{sys.executable} -m pip install -e '.[{extra}]' in a clone of aiod4p"
