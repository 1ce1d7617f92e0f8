"""The C part of aiod4p (everything else is in pyproject.toml).

Keyed routing's per-item loop is built in C (aiod4p/_speedups.c); without a C
compiler the install goes on and aiod4p/_groupings.py runs the same contract in Python.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("aiod4p._speedups", ["aiod4p/_speedups.c"], optional=True)])
