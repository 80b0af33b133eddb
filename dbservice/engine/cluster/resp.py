"""RESP as the cluster engine needs it: whole commands and whole replies.

The single-node engine (:mod:`dbservice.engine.proxy`) never holds a command or a reply whole:
it only needs boundaries. The cluster engine must read every argument to find the keys,
and must decode the replies it merges (DBSIZE, SCAN, MGET, CLUSTER SLOTS...), so it
reads commands and replies whole, within :class:`~dbservice.engine.proxy.ProxyLimits`:

* :class:`CommandReader` whole client commands from each read (multibulk, or an inline
  line split like the server splits it, with :func:`dbservice.engine.proxy.inline.split_args`),
  each with its original bytes (a :data:`Payload`), forwarded unchanged when it goes to
  one shard; an argument of :data:`LARGE_ARGUMENT` bytes or more is collected as it
  arrives and its command handed on in pieces, so no step copies it whole;
* :class:`FrameReader` whole replies from each read, as sent (passed on unchanged), and
  :func:`read_frame` one reply from a stream (connection set-up);
* :func:`decode` those bytes into Python values, for the few replies that are merged;
* ``encode_*`` replies the engine makes, in the client's protocol (2 or 3).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from dbservice.engine.proxy.errors import ProtocolError, UpstreamProtocolError, error_reply
from dbservice.engine.proxy.framing import (
    NATIVE_SCAN,
    SHORT_LINE,
    bulk_line,
    count_line,
    inline_end,
    short_bulks,
    short_counts,
)
from dbservice.engine.proxy.inline import split_args
from dbservice.engine.proxy.settings import ProxyLimits
from fleetgate.resp import OK as OK  # the one encoder and +OK, re-exported
from fleetgate.resp import encode_command as encode_command

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

Payload = bytes | tuple[bytes, ...]
"""The bytes of one or more commands as they go to a node: one ``bytes``, or pieces in
order when a command holds a large argument (the argument is one piece, never joined
with the rest: joining would copy it whole on the event loop)."""

LARGE_ARGUMENT: Final = 1 << 20
"""An argument this large that is still arriving is collected as it comes rather than
joined once complete, and a command holding one is encoded in pieces."""
RESUME_AFTER: Final = 64 * 1024
"""A command still arriving whose whole arguments already take this many bytes keeps
them apart (as :attr:`CommandReader._head`), so the next read goes on from its first
missing argument instead of reading them all again: without it, a command of many
small arguments sent slowly costs time that grows with the square of its size."""


def encode_payload(args: Sequence[bytes]) -> Payload:
    """:func:`encode_command`, in pieces when an argument is large."""
    if all(len(arg) < LARGE_ARGUMENT for arg in args):
        return encode_command(args)
    pieces: list[bytes] = []
    small = [b"*%d\r\n" % len(args)]
    for arg in args:
        small.append(b"$%d\r\n" % len(arg))
        if len(arg) < LARGE_ARGUMENT:
            small.append(arg)
            small.append(b"\r\n")
        else:
            pieces += (b"".join(small), arg)
            small = [b"\r\n"]
    pieces.append(b"".join(small))
    return tuple(pieces)


def prefixed(head: bytes, payload: Payload) -> Payload:
    """``head`` (a command) then ``payload``, without joining a large piece."""
    return head + payload if isinstance(payload, bytes) else (head, *payload)


def payload_size(payload: Payload) -> int:
    return len(payload) if isinstance(payload, bytes) else sum(map(len, payload))


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


def error(message: str) -> bytes:
    """``-<message>`` (CR/LF folded); an ``ERR`` code is added when none is there."""
    return error_reply(message)


# -- incremental readers (what the engine's hot path uses) -----------------------------------


class _Large:
    """A command whose argument of :data:`LARGE_ARGUMENT` bytes or more is arriving: the
    arguments before it, the command's bytes before it, and its payload so far."""

    __slots__ = ("args", "body", "crlf", "held", "left", "missing", "pieces", "total")

    def __init__(self, args: list[bytes], pieces: list[bytes], left: int, size: int) -> None:
        self.args = args
        self.pieces = pieces
        self.left = left
        """Arguments the command has after this one."""
        self.body = io.BytesIO()
        """The payload, copied in as each read brings it: ``getvalue`` then hands on
        the buffer itself as ``bytes`` (CPython does not copy it again)."""
        self.missing = size
        self.crlf = b""
        self.held = sum(map(len, pieces))
        self.total = self.held + size + 2

    def take(self, data: bytes) -> bytes | None:
        """Add what ``data`` holds of the payload and its CRLF; the bytes after them once
        the argument is whole, None while it is not."""
        if self.missing:
            take = min(self.missing, len(data))
            self.body.write(memoryview(data)[:take] if take < len(data) else data)
            self.missing -= take
            self.held += take
            data = data[take:] if take < len(data) else b""
            if self.missing:
                return None
        need = 2 - len(self.crlf)
        self.crlf += data[:need]
        self.held += min(need, len(data))
        if len(self.crlf) < 2:
            return None
        if self.crlf != b"\r\n":
            raise ProtocolError("invalid CRLF in request")
        return data[need:]


class CommandReader:
    """Whole commands out of the bytes a client sends, as many as each read holds:
    ``feed`` returns ``(arguments, original bytes)`` per complete command. A command
    still arriving is kept in pieces and joined once all of it is there, so a value
    costs one copy, not one per read; an argument of :data:`LARGE_ARGUMENT` bytes or more
    is copied once as it arrives, and its command's bytes are handed on in pieces around
    it, so completing it copies nothing large on the event loop."""

    def __init__(self, limits: ProxyLimits, *, native: bool = True) -> None:
        self._limits = limits
        self._scan = NATIVE_SCAN.commands if native and NATIVE_SCAN is not None else None
        """The native scanner's whole canonical commands (framing.py), when it is built:
        it reads what it can and hands the rest to :meth:`_parse`'s Python reader."""
        self._short_counts = short_counts(limits.max_multibulk)
        self._short_bulks = short_bulks(limits.max_bulk)
        self._chunks: list[bytes] = []
        self._size = 0
        self._need = 0
        """Bytes the pending command needs at least before parsing it again is useful."""
        self._large: _Large | None = None
        """A large argument arriving (every byte read goes to it first)."""
        self._head: tuple[list[bytes], tuple[bytes, ...], int] | None = None
        """A command whose large argument is whole (or whose arguments read so far are
        long: :meth:`_stop`) but whose later arguments are still arriving: its arguments
        and bytes so far, and the length of the ``*<left>`` line put before those later
        arguments so that they parse as one command."""
        self._head_next: tuple[list[bytes], tuple[bytes, ...], int] | None = None
        """A :attr:`_head` made by the parse under way (:meth:`_stop`), taken up once the
        parse is done (the one before it, if any, belongs to this parse's first command)."""
        self._prefix = b""
        """The ``*<left>`` line :meth:`_stop` puts before the bytes it keeps."""
        self.error: ProtocolError | None = None
        """Malformed input met after the commands ``feed`` last returned."""

    @property
    def held(self) -> int:
        """Bytes kept of a command still arriving (until it is whole)."""
        return self._size + self._extra()

    @property
    def declared(self) -> int:
        """Bytes the command still arriving has at least, by the lengths read so far."""
        if self._large is not None:
            return self._large.total
        return self._need + self._extra()

    def _extra(self) -> int:
        if self._large is not None:
            return self._large.held
        if self._head is not None:
            return sum(map(len, self._head[1]))
        return 0

    def feed(self, data: bytes) -> list[tuple[list[bytes], Payload]]:
        out: list[tuple[list[bytes], Payload]] = []
        large = self._large
        if large is not None:
            try:
                rest = large.take(data)
            except ProtocolError:
                self._large = None
                raise
            if rest is None:
                return out
            value = large.body.getvalue()
            large.body.close()
            self._large = None
            args, pieces = [*large.args, value], (*large.pieces, value, b"\r\n")
            if large.left:
                left = b"*%d\r\n" % large.left
                self._head = (args, pieces, len(left))
                rest = left + rest
            else:
                out.append((args, pieces))
            if not rest:
                return out
            data = rest
        self._chunks.append(data)
        self._size += len(data)
        if self._size < self._need:
            return out
        buf = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        first = len(out)
        try:
            p = self._parse(buf, out)
        except ProtocolError as exc:
            if not out:
                raise
            self.error = exc  # the commands before it still run; then the error
            self._chunks, self._size, self._need = [], 0, 1 << 62
            self._large = self._head = self._head_next = None
            self._prefix = b""
            return out
        if self._head is not None and len(out) > first:
            args, pieces, skip = self._head
            self._head = None
            later, raw = out[first]
            assert isinstance(raw, bytes)
            out[first] = ([*args, *later], (*pieces, raw[skip:]))
        if self._head_next is not None:
            self._head, self._head_next = self._head_next, None
        rest = buf[p:]
        if self._prefix:
            rest, self._prefix = self._prefix + rest, b""
        self._chunks = [rest] if rest else []
        self._size = len(rest)
        if not rest:
            self._need = 0
        return out

    def _stop(self, buf: bytes, p: int, q: int, args: list[bytes], argc: int, need: int) -> int:
        """The command at ``p`` is not all here: its arguments before ``q`` are, and the
        one at ``q`` needs ``need`` bytes from there (0: a line not all here). Returns
        where the bytes kept for the next read start: ``p``, or, when what is read of
        it is long (:data:`RESUME_AFTER`), ``q``, its arguments so far kept apart and a
        ``*<left>`` line put before the rest so that it reads as one command."""
        if q - p < RESUME_AFTER or not args:
            self._need = q - p + need if need else 0
            return p
        self._prefix = b"*%d\r\n" % (argc - len(args))
        pieces: tuple[bytes, ...] = ()
        skip = 0
        if self._head is not None and p == 0:  # its arguments before these
            before, pieces, skip = self._head
            self._head = None
            before.extend(args)  # in place: a copy per read would cost the square again
            args = before
        self._head_next = (args, (*pieces, buf[p + skip : q]), len(self._prefix))
        self._need = len(self._prefix) + need if need else 0
        return q

    def _collect(
        self, buf: bytes, p: int, start: int, size: int, args: list[bytes], left: int
    ) -> int:
        """Start collecting the large argument whose payload starts at ``start`` in the
        command at ``p``; all of ``buf`` is taken."""
        before: list[bytes] = []
        pieces: tuple[bytes, ...] = ()
        skip = 0
        if self._head is not None and p == 0:  # the later arguments of a large command
            before, pieces, skip = self._head
            self._head = None
        large = _Large([*before, *args], [*pieces, buf[p + skip : start]], left, size)
        large.take(buf[start:])  # not all of it: the caller found it incomplete
        self._large = large
        return len(buf)

    def _parse(self, buf: bytes, out: list[tuple[list[bytes], Payload]]) -> int:
        limits = self._limits
        n = len(buf)
        p = 0
        self._need = 0
        max_bulk = limits.max_bulk
        counts, bulks = self._short_counts, self._short_bulks
        scan = self._scan
        while p < n:
            if scan is not None:
                p = scan(buf, p, out, limits.max_multibulk, max_bulk)
                if p == n:
                    break
            # A line found in the framing tables is valid; any other goes to the strict
            # count_line / bulk_line (dbservice/engine/proxy/framing.py).
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
                        return self._stop(buf, p, q, args, argc, 0)
                    bulk = bulk_line(buf, q, n, max_bulk)
                    if bulk is None:
                        return self._stop(buf, p, q, args, argc, 0)
                    size, start = bulk
                    end = start + size
                if end + 2 > n:
                    if end - start >= LARGE_ARGUMENT:
                        left = argc - len(args) - 1
                        return self._collect(buf, p, start, end - start, args, left)
                    return self._stop(buf, p, q, args, argc, end + 2 - q)
                if buf[end] != 13 or buf[end + 1] != 10:
                    raise ProtocolError("invalid CRLF in request")
                args.append(buf[start:end])
                q = end + 2
            out.append((args, buf[p:q]))
            p = q
        return p


class FrameReader:
    """Whole replies out of the bytes a server sends (each as sent), as many as each
    read holds. A reply still arriving is copied once, as each read brings it, into a
    buffer of its own, and the reading goes on where it stopped: no reply is parsed
    again from its start or joined once complete, so a large reply (a 64 MB value, or
    an array of many elements) costs one copy spread over its reads, and ``getvalue``
    hands it on as ``bytes`` without another (CPython does not copy it again)."""

    __slots__ = ("_body", "_left", "_limits", "_line", "_line_size", "_skip", "_stack", "_stop")

    def __init__(self, limits: ProxyLimits) -> None:
        self._limits = limits
        self._body: io.BytesIO | None = None
        """The reply still arriving, so far (None between replies)."""
        self._skip = 0
        """Bytes of a bulk payload (and its CRLF) it still needs, before the next line."""
        self._left = 0
        self._stack: list[int] = []
        """Where reading it stopped: frames still to read at this level, and above."""
        self._line: list[bytes] = []
        """A line of it that is still arriving (kept apart until its CRLF is here)."""
        self._line_size = 0
        self._stop = 0
        """Where :meth:`_scan` stopped in the buffer it was given."""

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        p = 0
        body = self._body
        if body is not None:
            if self._line:
                joined = self._line_ended(data)
                if joined is None:
                    return out
                data = joined
            n = len(data)
            skip = self._skip
            if skip:
                if skip > n:  # all of it is payload
                    body.write(data)
                    self._skip = skip - n
                    return out
                body.write(memoryview(data)[:skip] if skip < n else data)
                p = skip
                self._skip = 0
            end = self._scan(data, p, n, self._left, self._stack)
            if end < 0:
                self._keep(body, data, p, n)
                return out
            body.write(memoryview(data)[p:end])
            out.append(body.getvalue())
            self._body = None
            p = end
        n = len(data)
        while p < n:
            t = data[p]
            if t == 36 and p + 3 < n and data[p + 3] == 10 and data[p + 2] == 13:
                size = data[p + 1] - 48
                if 0 <= size <= 9:  # "$<digit>\r\n": a small value, no find or int
                    end = p + size + 6
                    if end <= n:
                        out.append(data[p:end])
                        p = end
                        continue
            elif t in _LINE_TYPES:  # "+OK", ":1", "-ERR ...": one line
                e = data.find(b"\r\n", p + 1)
                if e >= 0:
                    out.append(data[p : e + 2])
                    p = e + 2
                    continue
            end = self._scan(data, p, n, 1, [])
            if end < 0:
                body = self._body = io.BytesIO()
                self._keep(body, data, p, n)
                break
            out.append(data[p:end])
            p = end
        return out

    def _keep(self, body: io.BytesIO, data: bytes, p: int, n: int) -> None:
        """What ``data[p:n]`` holds of the reply still arriving: up to where
        :meth:`_scan` stopped into ``body``, the line after that apart."""
        stop = self._stop
        if stop > p:
            body.write(memoryview(data)[p:stop] if stop - p < len(data) else data)
        if stop < n:
            line = data[stop:n]
            self._line, self._line_size = [line], len(line)

    def _line_ended(self, data: bytes) -> bytes | None:
        """The line still arriving and ``data`` in one buffer once its CRLF is here
        (None meanwhile: ``data`` is kept with it)."""
        line = self._line
        if data.find(b"\r\n") < 0 and not (data[:1] == b"\n" and line[-1][-1:] == b"\r"):
            line.append(data)
            self._line_size += len(data)
            if self._line_size > self._limits.max_reply_line:
                raise UpstreamProtocolError("reply line too long")
            return None
        line.append(data)
        joined = b"".join(line)
        self._line, self._line_size = [], 0
        return joined

    def _scan(self, buf: bytes, p: int, n: int, left: int, stack: list[int]) -> int:
        """Where the reply read from ``p`` on ends, with ``left`` frames still to read
        at its current level and ``stack`` above; -1 when it is not all here, with
        where the reading stopped kept for the next read."""
        while True:
            while not left:
                if not stack:
                    return p
                left = stack.pop()
            if p >= n:
                self._stopped(n, 0, left, stack)
                return -1
            t = buf[p]
            e = buf.find(b"\r\n", p + 1)
            if e < 0:
                if n - p > self._limits.max_reply_line:
                    raise UpstreamProtocolError("reply line too long")
                self._stopped(p, 0, left, stack)
                return -1
            left -= 1
            if t in _LINE_TYPES:
                p = e + 2
            elif t in _BULK_TYPES:
                size = _int(buf[p + 1 : e], False, "bulk length")
                end = e + 2 + size + 2 if size >= 0 else e + 2
                if end > n:
                    self._stopped(n, end - n, left, stack)
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

    def _stopped(self, stop: int, skip: int, left: int, stack: list[int]) -> None:
        self._stop, self._skip, self._left, self._stack = stop, skip, left, stack
