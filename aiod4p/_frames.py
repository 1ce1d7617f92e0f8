"""Where in a traceback the workflow's own code is: not aiod4p's, not an installed package's, not Python's."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

__all__ = ["INSTALLED", "workflow_frame"]

_OURS = str(Path(__file__).resolve().parent) + os.sep
INSTALLED = tuple({str(Path(prefix, "lib")) + os.sep for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
"""Where the Python installation's own packages and the environment's installed ones live."""


def workflow_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The last frame of the workflow's own code that ``exc`` passed (not aiod4p's, not an installed
    package's, not Python's), or ``None`` when it passed none."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith((_OURS, *INSTALLED, "<frozen"))
    ]
    return frames[-1] if frames else None
