"""The route preamble: the first thing a client says to an agent after mutual TLS.

Wire format (RESP2, all bulk strings)::

    client -> agent   *3 $15 FLEETGATE.ROUTE $<n> <database> $<n> <db_user>
                      (each element followed by CRLF)
                      *4 ... $<n> <node>   to one shard of a cluster (``--node``)
                      *5|*7 ... then pairs of options, any of
                          NODE <node>      as above
                          PORT <port>      the port the client dialled (a tunnel's
                                           local port), named by the one-node
                                           CLUSTER SLOTS/SHARDS/NODES view, so
                                           cluster-aware clients come back to it
                          HALFCLOSE 1      the client says when its own client
                                           half-closed: FLEETGATE.EOF (below)
    agent  -> client  +OK CRLF              the connection is now a plain RESP stream
                      -ERR <reason> CRLF    and the agent closes

The agent reads it with :func:`read_route` (sizes bounded, anything else is a
:class:`RouteError` whose message fits a ``-ERR`` reply: :func:`encode_refusal`); the
client (``fleetgate db connect``) calls :func:`open_route`, which raises
:class:`RouteRefused` carrying the agent's error line so it can be shown to the local
Redis client as is. Neither side sends anything else before the answer: a client must not
pipeline commands behind the preamble.

Timeouts belong to the caller (``asyncio.timeout`` around either call).

**Half-close.** TLS cannot half-close, so a tunnel whose local client half-closes
(sends its last command, then EOF, and still reads) cannot pass that on as such; a
full close would lose the replies still owed, and keeping the connection open would
keep the client's blocked commands (``BLPOP``) alive on the server after it left. With
``HALFCLOSE 1`` in its route, the tunnel sends :data:`EOF_COMMAND` (``*1 $13
FLEETGATE.EOF``) at a command boundary as the last thing it ever sends: the agent takes
it as the client's EOF (never forwarded, audited or answered), delivers the replies
owed that the server answers without waiting, and closes the server connection at
once otherwise (:mod:`dbservice.engine.proxy.halfclose`). Without the option the command is
the client's like any other.

**The route in the TLS server name.** Instead of the preamble, a client may name the
route in the SNI of its TLS handshake, so that any TLS-capable Redis client can reach an
agent directly with a fleet certificate (``redis-cli --tls --sni app.orders.fleetgate``)::

    <db_user>.<database>.fleetgate

exactly three DNS labels: the db user (letters, digits, ``-``, case kept, as ACL user
names are case-sensitive), the database (letters, digits, ``-``; compared in lower case,
as every database name is lower case and DNS names are case-insensitive), and the
suffix ``fleetgate`` (any case). :func:`route_from_server_name` reads it; a server name
that does not end in ``.fleetgate`` (an agent's host name, or none) means "no route
here", and the preamble is expected as before. With a route in the server name the agent
sends no ``+OK``: the connection is a plain RESP stream from the first byte (a refusal
is still one ``-ERR <reason>`` line, then the close). Names whose db user or database
does not fit that alphabet, and clients that cannot set SNI, use the preamble.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from dataclasses import dataclass
from typing import Final, Protocol

from fleetgate.resp import OK, encode_command

ROUTE_COMMAND: Final = b"FLEETGATE.ROUTE"
ROUTE_OK: Final = OK
EOF_COMMAND: Final = b"FLEETGATE.EOF"
"""What a tunnel that routed with ``HALFCLOSE 1`` sends when its client half-closed."""
EOF_SIGNAL: Final = encode_command([EOF_COMMAND])
DEFAULT_LIMIT: Final = 512
"""Longest database name or db user, in bytes, :func:`read_route` accepts by default."""
MAX_HEADER: Final = 16
"""Longest ``*N`` / ``$N`` line (without CRLF) read while parsing the preamble."""
MAX_ANSWER: Final = 4096
"""Longest answer line :func:`open_route` reads from an agent."""
USE_CONNECT: Final = (
    "this is a fleetgate agent: clients must go through `fleetgate db connect`, "
    "which opens a local port for any Redis client, or name the route in the TLS "
    "server name (SNI) as <db_user>.<database>.fleetgate"
)
SNI_SUFFIX: Final = "fleetgate"
"""Last label of a TLS server name that carries a route: ``<db_user>.<database>.fleetgate``."""
SNI_FORMAT: Final = "<db_user>.<database>.fleetgate"
_SNI_LABEL: Final = re.compile(r"[A-Za-z0-9-]+")


class RouteError(Exception):
    """The preamble is missing or malformed; the message is meant for the client."""


class RouteRefused(Exception):
    """The agent answered the preamble with an error reply."""

    def __init__(self, reason: str, *, code: str = "ERR") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def resp(self) -> bytes:
        """The error as the agent sent it, for relaying to a local Redis client."""
        return encode_refusal(self.reason, code=self.code)


@dataclass(frozen=True)
class Route:
    """Where a client asks to go."""

    database: str
    db_user: str
    node: str = ""
    """One shard of a cluster-mode database (shard or node id, or host:port) to talk to
    directly instead of the whole cluster; empty for the whole database."""
    port: int = 0
    """The port the client dialled when a tunnel stands between (0: the agent's own)."""
    half_close: bool = False
    """The client sends :data:`EOF_SIGNAL` when its own client half-closed."""


class Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


def encode_route(
    database: str, db_user: str, node: str = "", port: int = 0, *, half_close: bool = False
) -> bytes:
    """The preamble for ``database`` as ``db_user`` (on one shard when ``node``; with the
    client's ``port`` when a tunnel stands between; ``half_close``: it will send
    :data:`EOF_SIGNAL`)."""
    if not database or not db_user:
        raise ValueError("the route needs a database name and a db user")
    options: list[bytes] = []
    if port or half_close:
        options += [b"NODE", node.encode()] if node else []
        options += [b"PORT", str(port).encode()] if port else []
        options += [b"HALFCLOSE", b"1"] if half_close else []
    elif node:
        options = [node.encode()]
    return encode_command([ROUTE_COMMAND, database.encode(), db_user.encode(), *options])


def encode_refusal(reason: str, *, code: str = "ERR") -> bytes:
    """``-ERR <reason>\\r\\n`` with line breaks in ``reason`` flattened."""
    flat = " ".join(reason.replace("\r", " ").replace("\n", " ").split())
    return f"-{code} {flat}\r\n".encode()


async def _line(reader: Reader, limit: int, what: str) -> bytes:
    """One CRLF-terminated line of at most ``limit`` bytes (without CRLF)."""
    out = bytearray()
    while True:
        byte = await reader.readexactly(1)
        if byte == b"\r":
            if await reader.readexactly(1) != b"\n":
                raise RouteError(f"malformed route preamble: bare CR in {what}")
            return bytes(out)
        out += byte
        if len(out) > limit:
            raise RouteError(f"malformed route preamble: {what} is too long")


def _number(line: bytes, what: str) -> int:
    if not line.isdigit() or len(line) > 9:
        raise RouteError(f"malformed route preamble: bad {what} {line[:16]!r}")
    return int(line)


async def _bulk(reader: Reader, limit: int, what: str) -> bytes:
    if await reader.readexactly(1) != b"$":
        raise RouteError(f"malformed route preamble: {what} must be a bulk string")
    size = _number(await _line(reader, MAX_HEADER, what), f"length of {what}")
    if size > limit:
        raise RouteError(f"route preamble: {what} is longer than {limit} bytes")
    data = await reader.readexactly(size + 2)
    if data[-2:] != b"\r\n":
        raise RouteError(f"malformed route preamble: {what} is not followed by CRLF")
    return data[:-2]


def _text(data: bytes, what: str) -> str:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise RouteError(f"route preamble: {what} is not UTF-8") from None
    if not text or not text.isprintable() or text != text.strip():
        raise RouteError(f"route preamble: {what} must be non-empty printable text")
    return text


async def _is_route_command(reader: Reader) -> bool:
    """Whether the array's first element is ``FLEETGATE.ROUTE`` (any case); reads no
    further than needed to tell, so another command of any size is refused at once."""
    if await reader.readexactly(1) != b"$":
        return False
    if await _line(reader, MAX_HEADER, "command length") != str(len(ROUTE_COMMAND)).encode():
        return False
    data = await reader.readexactly(len(ROUTE_COMMAND) + 2)
    return data[:-2].upper() == ROUTE_COMMAND and data[-2:] == b"\r\n"


async def read_route(reader: Reader, *, limit: int = DEFAULT_LIMIT) -> Route:
    """Read the preamble from a freshly accepted connection. RouteError (message fit for
    ``-ERR``) on a malformed preamble, a client that speaks RESP without it, or a
    connection closed early; names longer than ``limit`` bytes are refused."""
    try:
        first = await reader.readexactly(1)
        if first != b"*":
            # An inline command (PING, AUTH ...) or anything else but a RESP array.
            raise RouteError(USE_CONNECT)
        count = _number(await _line(reader, MAX_HEADER, "array header"), "array length")
        if not await _is_route_command(reader):
            raise RouteError(USE_CONNECT)
        if count not in (3, 4, 5, 7, 9):
            raise RouteError(
                f"{ROUTE_COMMAND.decode()} takes a database name and a db user "
                "(and optionally a node, or NODE/PORT/HALFCLOSE options)"
            )
        database = _text(await _bulk(reader, limit, "database name"), "database name")
        db_user = _text(await _bulk(reader, limit, "db user"), "db user")
        node, port, half_close = "", 0, False
        if count == 4:
            node = _text(await _bulk(reader, limit, "node"), "node")
        for _ in range((count - 3) // 2 if count > 4 else 0):
            option = (await _bulk(reader, MAX_HEADER, "option")).upper()
            if option == b"NODE" and not node:
                node = _text(await _bulk(reader, limit, "node"), "node")
            elif option == b"PORT" and not port:
                port = _number(await _bulk(reader, MAX_HEADER, "port"), "port")
                if not 0 < port < 65536:
                    raise RouteError(f"route preamble: port {port} is not a TCP port")
            elif option == b"HALFCLOSE" and not half_close:
                if await _bulk(reader, MAX_HEADER, "HALFCLOSE") != b"1":
                    raise RouteError("route preamble: HALFCLOSE takes 1")
                half_close = True
            else:
                raise RouteError(
                    f"route preamble: unknown or repeated option {option[:16]!r} "
                    "(NODE, PORT and HALFCLOSE are known)"
                )
    except asyncio.IncompleteReadError:
        raise RouteError("the connection closed before the route preamble was complete") from None
    return Route(database, db_user, node, port, half_close)


def route_from_server_name(server_name: str | None) -> Route | None:
    """The route a client named in its TLS server name (SNI), None when the name carries
    none (no name, or one not ending in ``.fleetgate``: the preamble then follows).
    RouteError (message fit for ``-ERR``) for a ``.fleetgate`` name that is not
    ``<db_user>.<database>.fleetgate``."""
    if not server_name:
        return None
    labels = server_name.rstrip(".").split(".")
    if len(labels) < 2 or labels[-1].lower() != SNI_SUFFIX:
        return None
    shown = server_name if len(server_name) <= 80 else server_name[:77] + "..."
    if len(labels) != 3 or not all(_SNI_LABEL.fullmatch(label) for label in labels[:2]):
        raise RouteError(
            f"TLS server name {shown!r} is not a route: use {SNI_FORMAT} "
            "(letters, digits and '-' in each part; other names go through "
            "`fleetgate db connect`)"
        )
    return Route(database=labels[1].lower(), db_user=labels[0])


async def _answer(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await _line(reader, MAX_ANSWER, "answer")
    except asyncio.IncompleteReadError:
        raise RouteRefused("the agent closed the connection without answering the route") from None
    except RouteError:
        raise RouteRefused("the agent's answer to the route is not a RESP status line") from None
    return line


async def open_route(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext,
    database: str,
    db_user: str,
    server_hostname: str | None = None,
    node: str = "",
    client_port: int = 0,
    half_close: bool = False,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to an agent with mutual TLS, send the route and read the answer.

    Returns the streams, positioned after ``+OK``. Raises OSError or ssl.SSLError when
    the agent cannot be reached or the handshake fails (``ssl.SSLCertVerificationError``
    when its certificate does not name ``server_hostname``, default ``host``), and
    RouteRefused when the agent answers with an error. Bound it with asyncio.timeout."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_context, server_hostname=server_hostname or host
    )
    try:
        writer.write(encode_route(database, db_user, node, client_port, half_close=half_close))
        await writer.drain()
        line = await _answer(reader)
    except BaseException:
        writer.transport.abort()
        raise
    if line == b"+OK":
        return reader, writer
    writer.transport.abort()
    text = line.decode(errors="replace")
    if text.startswith("-"):
        code, _, reason = text[1:].partition(" ")
        if not reason:
            code, reason = "ERR", code
        raise RouteRefused(reason, code=code or "ERR")
    raise RouteRefused(f"unexpected answer to the route: {text[:80]!r}")


def cluster_node_id(database: str) -> str:
    """The id of the one node a client sees through a plain route to a cluster (``CLUSTER
    SHARDS``/``NODES``/``SLOTS`` through the cluster engine): stable per database, so the
    tunnel can recognise it in ``--node``."""
    return hashlib.sha1(f"fleetgate:{database}".encode()).hexdigest()
