"""The errors every command shares: a user's mistake is a :class:`UsageError`, printed
as one ``fleetgate: error:`` line by :func:`fleetgate.cli.main.main` (exit 2)."""

from __future__ import annotations


class UsageError(Exception):
    """A command-line mistake; the message says how to fix it."""
