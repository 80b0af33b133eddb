"""The compiled accelerators, when they are built.

``pip install`` compiles small C modules (today one: the request grammar's common
case, ``dbservice/engine/proxy/_scan.c``) as optional extensions: without a C compiler
and Python's headers the install goes on without them. Each only ever handles a strict
subset of its input and answers None for the rest, which the pure-Python code beside it
handles as it would without it; their tests compare both byte for byte.

``FLEETGATE_NATIVE=0`` in the environment turns them off (pure Python everywhere), e.g.
to rule them out while chasing a problem, or to measure what they gain.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

ENV = "FLEETGATE_NATIVE"


def native(module: str) -> ModuleType | None:
    """The compiled module ``module`` (a dotted name), or None when it is not built or
    ``FLEETGATE_NATIVE=0``."""
    if os.environ.get(ENV, "1") == "0":
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
