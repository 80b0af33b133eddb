"""RESP as fleetgate writes it: the one encoder of commands and simple replies for every
process (upstream logins, health probes, the route preamble, the tunnel, the sandbox, and
the engines once they switch over). Pure: bytes in, bytes out.

It lives here rather than in ``dbservice.engine`` because the laptop client (through
:mod:`dbservice.route`) speaks RESP too and imports no server code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

OK: Final = b"+OK\r\n"
"""The ``+OK`` status reply."""


def encode_command(args: Sequence[bytes]) -> bytes:
    """A command as clients send it: an array of bulk strings. Each argument is copied
    once, into the result (a large value is not formatted into a piece first)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return b"".join(out)
