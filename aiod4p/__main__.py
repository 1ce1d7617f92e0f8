"""``python -m aiod4p``."""

import sys

from ._cli import main

sys.exit(main())
