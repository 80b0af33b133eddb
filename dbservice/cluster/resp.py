"""RESP as the cluster engine needs it: whole commands and whole replies.

The single-node engine (:mod:`dbservice.proxy`) never holds a command or a reply whole:
it only needs boundaries. The cluster engine must read every argument to find the keys,
and must decode the replies it merges (DBSIZE, SCAN, MGET, CLUSTER SLOTS...), so it
reads commands and replies whole, within :class:`~dbservice.proxy.ProxyLimits`:

* :func:`read_command` one client command (multibulk, or an inline line split like the
  server splits it, with :func:`dbservice.proxy.inline.split_args`);
* :func:`read_frame` one reply as its original bytes (passed on unchanged);
* :func:`decode` those bytes into Python values, for the few replies that are merged;
* ``encode_*`` replies the engine makes, in the client's protocol (2 or 3).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from dbservice.proxy.errors import ProtocolError, UpstreamProtocolError, error_reply
from dbservice.proxy.inline import split_args
from dbservice.proxy.settings import ProxyLimits

_LINE_TYPES = frozenset(b"+-:_,#(")
_BULK_TYPES = frozenset(b"$!=")
_AGG_TYPES = frozenset(b"*~>|")


@dataclass(frozen=True, slots=True)
class Error:
    """An error reply (``-`` or RESP3 ``!``), its text without the type byte."""

    message: bytes

    @property
    def code(self) -> bytes:
        return self.message.split(b" ", 1)[0]


@dataclass(frozen=True, slots=True)
class Status:
    """A simple string reply (``+OK``)."""

    text: bytes


Value = bytes | int | float | bool | None | Error | Status | list["Value"] | dict[bytes, "Value"]


def encode_command(args: Sequence[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return b"".join(out)


# -- reading ---------------------------------------------------------------------------


async def _line(reader: asyncio.StreamReader, limit: int, client: bool) -> bytes:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise (ProtocolError if client else UpstreamProtocolError)("line too long") from None
    if len(line) > limit:
        raise (ProtocolError if client else UpstreamProtocolError)("line too long")
    return line


def _int(text: bytes, client: bool, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise (ProtocolError if client else UpstreamProtocolError)(f"invalid {what}") from None


async def read_command(
    reader: asyncio.StreamReader, limits: ProxyLimits
) -> tuple[list[bytes], int] | None:
    """The next command's arguments (name first) and its size on the wire; None at a
    clean end of input. Empty commands (``*0``, blank inline lines) are skipped as the
    server skips them."""
    while True:
        try:
            first = await reader.readexactly(1)
        except asyncio.IncompleteReadError:
            return None
        if first != b"*":
            try:
                rest = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return None
            except asyncio.LimitOverrunError:
                raise ProtocolError("too big inline request") from None
            if len(rest) > limits.max_inline:
                raise ProtocolError("too big inline request")
            args = split_args(first + rest)
            if args:
                return args, len(rest) + 1
            continue
        try:
            line = await _line(reader, 64, True)
            size = len(line) + 1
            argc = _int(line[:-2], True, "multibulk length")
            if argc > limits.max_multibulk:
                raise ProtocolError("invalid multibulk length")
            if argc <= 0:
                continue
            args = []
            for _ in range(argc):
                header = await _line(reader, 64, True)
                if header[:1] != b"$":
                    raise ProtocolError(f"expected '$', got '{chr(header[0])}'")
                length = _int(header[1:-2], True, "bulk length")
                if length < 0 or length > limits.max_bulk:
                    raise ProtocolError("invalid bulk length")
                args.append((await reader.readexactly(length + 2))[:-2])
                size += len(header) + length + 2
            return args, size
        except asyncio.IncompleteReadError:
            return None


async def read_frame(reader: asyncio.StreamReader, limits: ProxyLimits) -> bytes:
    """One whole reply, as sent. Raises ``IncompleteReadError`` at the end of input."""
    parts: list[bytes] = []
    await _frame(reader, limits, parts, 0)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _frame(
    reader: asyncio.StreamReader, limits: ProxyLimits, out: list[bytes], depth: int
) -> None:
    if depth > limits.max_reply_nesting:
        raise UpstreamProtocolError("reply nested too deep")
    line = await _line(reader, limits.max_reply_line, False)
    out.append(line)
    t = line[0]
    if t in _LINE_TYPES:
        return
    if t in _BULK_TYPES:
        size = _int(line[1:-2], False, "bulk length")
        if size >= 0:
            out.append(await reader.readexactly(size + 2))
        return
    if t in _AGG_TYPES or t == 37:  # '%': a map, two frames per entry
        count = _int(line[1:-2], False, "aggregate length")
        if t == 37 or t == 124:
            count *= 2
        for _ in range(count):
            await _frame(reader, limits, out, depth + 1)
        if t == 124:  # an attribute precedes the real reply
            await _frame(reader, limits, out, depth + 1)
        return
    raise UpstreamProtocolError(f"unexpected reply type {chr(t)!r}")


# -- decoding -----------------------------------------------------------------------------


def decode(data: bytes) -> Value:
    """The value of one whole reply (what :func:`read_frame` returned)."""
    value, _ = _decode(data, 0)
    return value


def _decode(data: bytes, p: int) -> tuple[Value, int]:
    e = data.index(b"\r\n", p)
    t, body, q = data[p], data[p + 1 : e], e + 2
    if t == 43:  # +
        return Status(body), q
    if t == 45:  # -
        return Error(body), q
    if t == 58 or t == 40:  # : (
        return int(body), q
    if t == 95:  # _
        return None, q
    if t == 44:  # ,
        return float(body), q
    if t == 35:  # #
        return body == b"t", q
    if t in _BULK_TYPES:
        size = int(body)
        if size < 0:
            return None, q
        payload = data[q : q + size]
        if t == 33:
            return Error(payload), q + size + 2
        if t == 61:  # verbatim: "txt:" prefix
            payload = payload[4:]
        return payload, q + size + 2
    if t == 37:  # %
        out: dict[bytes, Value] = {}
        for _ in range(int(body)):
            key, q = _decode(data, q)
            item, q = _decode(data, q)
            out[key if isinstance(key, bytes) else str(key).encode()] = item
        return out, q
    if t == 124:  # | attribute: skip it
        for _ in range(2 * int(body)):
            _, q = _decode(data, q)
        return _decode(data, q)
    size = int(body)
    if size < 0:
        return None, q
    items: list[Value] = []
    for _ in range(size):
        item, q = _decode(data, q)
        items.append(item)
    return items, q


def error_of(frame: bytes) -> bytes | None:
    """The text of an error reply, None for any other reply."""
    if frame[:1] == b"-":
        return frame[1:-2]
    if frame[:1] == b"!":
        value = decode(frame)
        return value.message if isinstance(value, Error) else None
    return None


# -- encoding the engine's own replies ---------------------------------------------------------


def encode_value(value: Value, resp3: bool) -> bytes:
    out: list[bytes] = []
    _encode(value, resp3, out)
    return b"".join(out)


def _encode(value: Value, resp3: bool, out: list[bytes]) -> None:
    if value is None:
        out.append(b"_\r\n" if resp3 else b"$-1\r\n")
    elif isinstance(value, bool):
        out.append((b"#t\r\n" if value else b"#f\r\n") if resp3 else b":%d\r\n" % value)
    elif isinstance(value, int):
        out.append(b":%d\r\n" % value)
    elif isinstance(value, float):
        text = repr(value).encode()
        out.append(b",%s\r\n" % text if resp3 else b"$%d\r\n%s\r\n" % (len(text), text))
    elif isinstance(value, bytes):
        out.append(b"$%d\r\n%s\r\n" % (len(value), value))
    elif isinstance(value, Status):
        out.append(b"+%s\r\n" % value.text)
    elif isinstance(value, Error):
        out.append(b"-%s\r\n" % value.message)
    elif isinstance(value, dict):
        out.append((b"%%%d\r\n" if resp3 else b"*%d\r\n") % (len(value) * (1 if resp3 else 2)))
        for key, item in value.items():
            _encode(key, resp3, out)
            _encode(item, resp3, out)
    else:
        out.append(b"*%d\r\n" % len(value))
        for item in value:
            _encode(item, resp3, out)


OK = b"+OK\r\n"


def error(message: str) -> bytes:
    """``-<message>`` (CR/LF folded); an ``ERR`` code is added when none is there."""
    return error_reply(message)
