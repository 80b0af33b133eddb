"""The request grammar of valkey-server, shared by both engines' command readers (pure).

Both engines must cut a client's bytes into commands exactly where the server does, so
that what the agent checks and audits is what the server runs. The rules are those of
valkey 9.1's ``processMultibulkBuffer`` / ``processInlineBuffer``:

* ``*<count>\\r\\n`` then ``count`` times ``$<length>\\r\\n<payload>\\r\\n``; a count or
  length is what ``string2ll`` accepts (:func:`string2ll`); a ``\\r`` must be followed
  by ``\\n``, and a payload by ``\\r\\n`` ("invalid CRLF in request"); a count of zero
  or less is a command that is skipped without a reply;
* any other first byte starts an inline command: the bytes up to ``\\n`` (a ``\\r``
  before it dropped), split by :func:`dbservice.engine.proxy.inline.split_args`. The server
  looks for that ``\\n`` with ``strchr``, so a NUL byte before it means the line never
  ends there; the agent refuses such a line at once.

Where the server waits for more bytes although no continuation can make the input
valid (a ``$`` line that does not start with ``$``, say), the agent refuses at once with
the error the server gives when it does refuse.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType
from typing import NoReturn

from fleetgate.native import native

from .errors import ProtocolError

MAX_LENGTH_LINE = 64
"""Bytes searched for the ``\\r`` of a ``*``/``$`` line: a valid one is at most 22 long,
so a line without ``\\r`` this far can never become valid."""

_LLONG_MAX = (1 << 63) - 1
_INLINE_MAX = 64 * 1024
"""valkey-server's PROTO_INLINE_MAX_SIZE: how far it looks for a line's end."""


def string2ll(text: bytes) -> int | None:
    """``text`` as valkey-server's ``string2ll`` reads it, None where it refuses: an
    optional ``-``, then ``0`` alone or digits not starting with ``0``; no ``+``, no
    blanks, at most 20 bytes, within a signed 64-bit integer."""
    if text.isdigit():  # ASCII digits only; False for b""
        if (text[0] == 48 and len(text) > 1) or len(text) > 20:
            return None
        value = int(text)
        return value if value <= _LLONG_MAX else None
    if len(text) > 1 and text[0] == 45 and text[1] != 48 and len(text) <= 20:
        digits = text[1:]
        if digits.isdigit():
            value = -int(digits)
            return value if value >= -_LLONG_MAX - 1 else None
    return None


def count_line(data: bytes, p: int, n: int) -> tuple[int, int] | None:
    """The ``*<count>\\r\\n`` line at ``p``: (count, where the next line starts), or None
    while the line is not all in ``data[:n]``."""
    e = data.find(b"\r", p + 1, p + MAX_LENGTH_LINE)
    if e < 0:
        if n - p >= MAX_LENGTH_LINE:
            _too_long(data, p, n, "invalid multibulk length", "too big mbulk count string")
        return None
    if e + 1 >= n:
        return None
    if data[e + 1] != 10:
        raise ProtocolError("invalid CRLF in request")
    count = string2ll(data[p + 1 : e])
    if count is None:
        raise ProtocolError("invalid multibulk length")
    return count, e + 2


def bulk_line(data: bytes, p: int, n: int, max_bulk: int) -> tuple[int, int] | None:
    """The ``$<length>\\r\\n`` line at ``p`` (``p < n``): (length, where the payload
    starts), or None while the line is not all in ``data[:n]``."""
    if data[p] != 36:  # '$'
        got = " " if data[p] in (10, 13) else chr(data[p])  # as the server shows it
        raise ProtocolError(f"expected '$', got '{got}'")
    e = data.find(b"\r", p + 1, p + MAX_LENGTH_LINE)
    if e < 0:
        if n - p >= MAX_LENGTH_LINE:
            _too_long(data, p, n, "invalid bulk length", "too big bulk count string")
        return None
    if e + 1 >= n:
        return None
    if data[e + 1] != 10:
        raise ProtocolError("invalid CRLF in request")
    size = string2ll(data[p + 1 : e])
    if size is None or size < 0 or size > max_bulk:
        raise ProtocolError("invalid bulk length")
    return size, e + 2


def _too_long(data: bytes, p: int, n: int, invalid: str, unended: str) -> NoReturn:
    """A length line with no ``\r`` in its first bytes can never be valid: the error
    the server gives once it sees the line's end, or ``unended`` while none is here."""
    e = data.find(b"\r", p + 1, p + _INLINE_MAX)
    if e < 0 or e + 1 >= n:
        raise ProtocolError(unended)
    if data[e + 1] != 10:
        raise ProtocolError("invalid CRLF in request")
    raise ProtocolError(invalid)


# -- the native scanner ----------------------------------------------------------------------
#
# ``_scan`` (_scan.c, see fleetgate/native.py) reads whole multibulk commands written the
# canonical way ("*<count>\r\n", then "$<length>\r\n", the payload and "\r\n" per
# argument; counts and lengths without sign or leading zero, within the reader's limits)
# and answers None for anything else, so the Python reader below it decides everything
# that is not such a command, exactly as without it. Both engines' readers take it when
# it is built (tests/unit/test_native_scan.py compares them with and without it).

NATIVE_SCAN: ModuleType | None = native("dbservice.engine.proxy._scan")
"""The native scanner, or None when it is not built or turned off."""


# -- the fast path --------------------------------------------------------------------------
#
# Nearly every line a client sends is a short count or length: "*3\r\n", "$3\r\n",
# "$16\r\n". The readers look the first five bytes of such a line up in a table of every
# VALID line with a value under 100 (one slice and one dict lookup, instead of a byte-by-
# byte check in Python). The table holds exactly the lines the strict functions above
# accept, the keys being what ``b"%d" % value`` gives for each value (so no sign, no
# leading zero, no blank, and CR LF right after the digits), within the given limits. A
# miss means nothing but "not the common case": the reader then reads the same line
# with :func:`count_line` / :func:`bulk_line`, which decide what it is (valid,
# incomplete or refused). The payload's own CR LF is checked with one compare of a
# 2-byte slice; a mismatch, too, goes back to the strict path.

SHORT_LINE = 5
"""Bytes of a line looked up in the tables: ``*<d>\\r\\n`` and ``$<d>\\r\\n`` with their
next byte (whatever it is), or ``*<dd>\\r\\n`` and ``$<dd>\\r\\n``."""


def short_counts(max_multibulk: int) -> dict[bytes, tuple[int, int]]:
    """``*<count>\\r\\n`` lines with 0 < count < 100 (and count <= ``max_multibulk``), by
    their first :data:`SHORT_LINE` bytes: (count, length of the line). Shared: read only."""
    return _short_counts(min(99, max_multibulk))


def short_bulks(max_bulk: int) -> dict[bytes, tuple[int, int]]:
    """``$<length>\\r\\n`` lines with length < 100 (and length <= ``max_bulk``), by their
    first :data:`SHORT_LINE` bytes: (where the payload starts, where it ends), counted
    from the ``$``. Shared: read only."""
    return _short_bulks(min(99, max_bulk))


def short_bulk_ends(max_bulk: int) -> dict[bytes, int]:
    """:func:`short_bulks`, with only where the payload ends (to skip an argument).
    Shared: read only."""
    return _short_bulk_ends(min(99, max_bulk))


def _short_lines(kind: bytes, low: int, high: int) -> dict[bytes, tuple[int, int]]:
    """The lines ``<kind><value>\\r\\n`` for ``low <= value <= high``: (value, length)."""
    table: dict[bytes, tuple[int, int]] = {}
    for value in range(low, high + 1):
        line = kind + b"%d\r\n" % value
        entry = (value, len(line))
        if len(line) == SHORT_LINE:
            table[line] = entry
        else:  # "$7\r\n": a line of 4 bytes, and any byte after it
            for after in range(256):
                table[line + bytes((after,))] = entry
    return table


@cache
def _short_counts(high: int) -> dict[bytes, tuple[int, int]]:
    return _short_lines(b"*", 1, high)


@cache
def _short_bulks(high: int) -> dict[bytes, tuple[int, int]]:
    spans: dict[tuple[int, int], tuple[int, int]] = {}  # one tuple per length
    return {
        key: spans.setdefault(entry, (entry[1], entry[1] + entry[0]))
        for key, entry in _short_lines(b"$", 0, high).items()
    }


@cache
def _short_bulk_ends(high: int) -> dict[bytes, int]:
    return {key: end for key, (_, end) in _short_bulks(high).items()}


def payload_end(data: bytes, end: int) -> int:
    """Check the ``\\r\\n`` after a payload ending at ``end``; return where the next
    line starts."""
    if data[end] != 13 or data[end + 1] != 10:
        raise ProtocolError("invalid CRLF in request")
    return end + 2


def inline_end(data: bytes, p: int, n: int, limit: int) -> int:
    """Where the inline line at ``p`` ends (its ``\\n``), or -1 while it is not all
    here."""
    e = data.find(b"\n", p, p + limit + 1)
    if e < 0:
        if n - p > limit:
            raise ProtocolError("too big inline request")
        return -1
    if data.find(b"\x00", p, e) >= 0:
        # valkey-server never finds the end of such a line (it reads it as a C string)
        # and refuses it once it is longer than the inline limit.
        raise ProtocolError("NUL byte in inline request")
    return e
