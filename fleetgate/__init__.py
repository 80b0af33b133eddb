"""fleetgate: safe, audited access to fleets of MemoryDB and Valkey/Redis databases.

This package holds what every process shares (the command line, config loading,
durations, logging and small asyncio helpers); the contract lives in ``bus``, the
services in ``discovery`` and ``dbservice``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fleetgate")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
