"""``python -m aiod4p``."""

from ._cli import entry

entry()
