"""RESP as the cluster engine needs it: whole commands and whole replies.

The single-node engine (:mod:`dbservice.proxy`) never holds a command or a reply whole:
it only needs boundaries. The cluster engine must read every argument to find the keys,
and must decode the replies it merges (DBSIZE, SCAN, MGET, CLUSTER SLOTS...), so it
reads commands and replies whole, within :class:`~dbservice.proxy.ProxyLimits`:

* :class:`CommandReader` whole client commands from each read (multibulk, or an inline
  line split like the server splits it, with :func:`dbservice.proxy.inline.split_args`),
  each with its original bytes, forwarded unchanged when it goes to one shard;
* :class:`FrameReader` whole replies from each read, as sent (passed on unchanged), and
  :func:`read_frame` one reply from a stream (connection set-up);
* :func:`decode` those bytes into Python values, for the few replies that are merged;
* ``encode_*`` replies the engine makes, in the client's protocol (2 or 3).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from dbservice.proxy.errors import ProtocolError, UpstreamProtocolError, error_reply
from dbservice.proxy.framing import (
    SHORT_LINE,
    bulk_line,
    count_line,
    inline_end,
    short_bulks,
    short_counts,
)
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
            if isinstance(key, Status):
                key = key.text
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


# -- incremental readers (what the engine's hot path uses) -----------------------------------


class CommandReader:
    """Whole commands out of the bytes a client sends, as many as each read holds:
    ``feed`` returns ``(arguments, original bytes)`` per complete command. A command
    still arriving is kept in pieces and joined once all of it is there, so a large
    value costs one copy, not one per read."""

    def __init__(self, limits: ProxyLimits) -> None:
        self._limits = limits
        self._short_counts = short_counts(limits.max_multibulk)
        self._short_bulks = short_bulks(limits.max_bulk)
        self._chunks: list[bytes] = []
        self._size = 0
        self._need = 0
        """Bytes the pending command needs at least before parsing it again is useful."""
        self.error: ProtocolError | None = None
        """Malformed input met after the commands ``feed`` last returned."""

    @property
    def held(self) -> int:
        """Bytes kept of a command still arriving (until it is whole)."""
        return self._size

    @property
    def declared(self) -> int:
        """Bytes the command still arriving has at least, by the lengths read so far."""
        return self._need

    def feed(self, data: bytes) -> list[tuple[list[bytes], bytes]]:
        self._chunks.append(data)
        self._size += len(data)
        if self._size < self._need:
            return []
        buf = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        out: list[tuple[list[bytes], bytes]] = []
        try:
            p = self._parse(buf, out)
        except ProtocolError as exc:
            if not out:
                raise
            self.error = exc  # the commands before it still run; then the error
            self._chunks, self._size, self._need = [], 0, 1 << 62
            return out
        rest = buf[p:]
        self._chunks = [rest] if rest else []
        self._size = len(rest)
        if not rest:
            self._need = 0
        return out

    def _parse(self, buf: bytes, out: list[tuple[list[bytes], bytes]]) -> int:
        limits = self._limits
        n = len(buf)
        p = 0
        self._need = 0
        max_bulk = limits.max_bulk
        counts, bulks = self._short_counts, self._short_bulks
        while p < n:
            # A line found in the framing tables is valid; any other goes to the strict
            # count_line / bulk_line (dbservice/proxy/framing.py).
            head = counts.get(buf[p : p + SHORT_LINE])
            if head is not None:  # "*<argc>\r\n", 0 < argc < 100
                argc, q = head
                q += p
            elif buf[p] != 42:  # not '*': an inline command
                e = inline_end(buf, p, n, limits.max_inline)
                if e < 0:
                    return p
                args = split_args(buf[p:e])
                if args:
                    out.append((args, encode_command(args)))
                p = e + 1
                continue
            else:
                header = count_line(buf, p, n)
                if header is None:
                    return p
                argc, q = header
                if argc > limits.max_multibulk:
                    raise ProtocolError("invalid multibulk length")
                if argc <= 0:  # the server skips it without a reply
                    p = q
                    continue
            args = []
            for _ in range(argc):
                head = bulks.get(buf[q : q + SHORT_LINE])
                if head is not None:  # "$<size>\r\n", size < 100
                    start = q + head[0]
                    end = q + head[1]
                else:
                    if q >= n:
                        return p
                    bulk = bulk_line(buf, q, n, max_bulk)
                    if bulk is None:
                        return p
                    size, start = bulk
                    end = start + size
                if end + 2 > n:
                    self._need = end + 2 - p
                    return p
                if buf[end] != 13 or buf[end + 1] != 10:
                    raise ProtocolError("invalid CRLF in request")
                args.append(buf[start:end])
                q = end + 2
            out.append((args, buf[p:q]))
            p = q
        return p


class FrameReader:
    """Whole replies out of the bytes a server sends (each as sent), as many as each
    read holds; a reply still arriving is kept in pieces until complete."""

    def __init__(self, limits: ProxyLimits) -> None:
        self._limits = limits
        self._chunks: list[bytes] = []
        self._size = 0
        self._need = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._chunks.append(data)
        self._size += len(data)
        if self._size < self._need:
            return []
        buf = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        out: list[bytes] = []
        n, p = len(buf), 0
        self._need = 0
        while p < n:
            end = self._frame_end(buf, p, n)
            if end < 0:
                break
            out.append(buf[p:end])
            p = end
        rest = buf[p:]
        self._chunks = [rest] if rest else []
        self._size = len(rest)
        return out

    def _frame_end(self, buf: bytes, p: int, n: int) -> int:
        """Where the reply starting at ``p`` ends; -1 when it is not all here."""
        start = p
        left = 1  # frames still to read at this level and above, flattened
        stack: list[int] = []
        limits = self._limits
        while left:
            if p >= n:
                return -1
            t = buf[p]
            e = buf.find(b"\r\n", p + 1)
            if e < 0:
                if n - p > limits.max_reply_line:
                    raise UpstreamProtocolError("reply line too long")
                return -1
            left -= 1
            if t in _LINE_TYPES:
                p = e + 2
            elif t in _BULK_TYPES:
                size = _int(buf[p + 1 : e], False, "bulk length")
                end = e + 2 + size + 2 if size >= 0 else e + 2
                if end > n:
                    self._need = end - start
                    return -1
                p = end
            elif t in _AGG_TYPES or t == 37:
                count = _int(buf[p + 1 : e], False, "aggregate length")
                if t == 37 or t == 124:
                    count *= 2
                if t == 124:
                    count += 1
                p = e + 2
                if count > 0:  # no depth limit: the stack is bounded by the reply's bytes
                    stack.append(left)
                    left = count
            else:
                raise UpstreamProtocolError(f"unexpected reply type {chr(t)!r}")
            while not left and stack:
                left = stack.pop()
        return p
