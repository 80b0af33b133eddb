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
does not fit that alphabet use the preamble or the login below.

**The route in the login user name.** A client that cannot choose its TLS server name
(redis-py always sends the host it dials) names the route in its first command instead,
when the server name names none (the agent's host name or address, or none)::

    AUTH <db_user>@<database> <password>
    HELLO <2|3> AUTH <db_user>@<database> <password> [SETNAME <name>]

:func:`read_opening` reads that one command (the database is what follows the last
``@``) and gives it back as the session's first command with the db user alone as user
name (:class:`LoginRoute`): from there on the connection is exactly one routed by its
server name that sent ``AUTH <db_user> <password>`` first (the password goes to the
server when the client brings it, and is answered by the agent when the agent logs in
itself; a later ``AUTH`` for another user is refused, never a new route). Any other
first command is refused with :data:`USE_CONNECT`, and nothing is forwarded or audited
as a command before the route is known. No ``+OK`` is sent: the reply to the ``AUTH`` or
``HELLO`` is the session's.
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
_OPENINGS: Final = frozenset({ROUTE_COMMAND, b"AUTH", b"HELLO"})
_OPENING_SIZES: Final = frozenset(str(len(name)).encode() for name in _OPENINGS)
LOGIN_FORMAT: Final = "<db_user>@<database>"
"""The user name of a first ``AUTH``/``HELLO`` that names the route."""
MAX_PASSWORD: Final = 4096
"""Longest password :func:`read_opening` accepts in the ``AUTH`` that names the route."""
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
    "server name (SNI) as <db_user>.<database>.fleetgate, or log in first with "
    "AUTH <db_user>@<database> <password> (or HELLO 3 AUTH <db_user>@<database> <password>)"
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
    return await _opening_name(reader) == ROUTE_COMMAND


async def _opening_name(reader: Reader) -> bytes | None:
    """The array's first element in upper case when it is one of the commands that may
    open a connection (:data:`_OPENINGS`), else None; reads no further than needed to
    tell, so another command of any size is refused at once."""
    if await reader.readexactly(1) != b"$":
        return None
    size = await _line(reader, MAX_HEADER, "command length")
    if size not in _OPENING_SIZES:
        return None
    data = await reader.readexactly(int(size) + 2)
    name = data[:-2].upper()
    return name if name in _OPENINGS and data[-2:] == b"\r\n" else None


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
        return await _preamble(reader, count, limit)
    except asyncio.IncompleteReadError:
        raise RouteError("the connection closed before the route preamble was complete") from None


async def _preamble(reader: Reader, count: int, limit: int) -> Route:
    """The preamble's arguments, after ``*<count>`` and ``FLEETGATE.ROUTE``."""
    try:
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


@dataclass(frozen=True)
class LoginRoute:
    """A route named in the user name of the client's first ``AUTH``/``HELLO``."""

    route: Route
    command: bytes
    """That command as the session sees it, with the db user alone as user name (the
    same command on a connection routed by its server name), to be run as the
    session's first command."""


async def read_opening(reader: Reader, *, limit: int = DEFAULT_LIMIT) -> Route | LoginRoute:
    """What a client says first when its TLS server name names no route: the route
    preamble (a :class:`Route`, to be answered with ``+OK``), or ``AUTH
    <db_user>@<database> <password>`` / ``HELLO <2|3> AUTH <db_user>@<database>
    <password> [SETNAME <name>]`` (a :class:`LoginRoute`). Nothing after that first
    command is read. RouteError (message fit for ``-ERR``) for anything else."""
    try:
        if await reader.readexactly(1) != b"*":
            raise RouteError(USE_CONNECT)
        count = _number(await _line(reader, MAX_HEADER, "array header"), "array length")
        name = await _opening_name(reader)
        if name == ROUTE_COMMAND:
            return await _preamble(reader, count, limit)
        if name == b"AUTH":
            return await _auth_route(reader, count, limit)
        if name == b"HELLO":
            return await _hello_route(reader, count, limit)
        raise RouteError(USE_CONNECT)
    except asyncio.IncompleteReadError:
        raise RouteError("the connection closed before its first command was complete") from None


async def _login_user(reader: Reader, limit: int) -> tuple[Route, bytes, bytes]:
    """``<db_user>@<database>`` and the password after it: the route, the db user as
    bytes and the password (any bytes, passed on as the client sent them)."""
    name = _text(await _bulk(reader, 2 * limit + 1, "user name"), "user name")
    db_user, at, database = name.rpartition("@")
    if not at or not all(part and part == part.strip() for part in (db_user, database)):
        raise RouteError(
            f"the first AUTH names no route: log in as {LOGIN_FORMAT} "
            f"(user name {_shown(name)!r}), or name the route in the TLS server name as "
            f"{SNI_FORMAT}"
        )
    if len(database.encode()) > limit or len(db_user.encode()) > limit:
        raise RouteError(f"AUTH: the database name and the db user take at most {limit} bytes")
    password = await _bulk(reader, MAX_PASSWORD, "password")
    return Route(database=database, db_user=db_user), db_user.encode(), password


async def _auth_route(reader: Reader, count: int, limit: int) -> LoginRoute:
    if count != 3:
        raise RouteError(
            f"the first command must name the route: AUTH {LOGIN_FORMAT} <password> "
            "(AUTH <password> alone names no db user or database)"
        )
    route, db_user, password = await _login_user(reader, limit)
    return LoginRoute(route, encode_command([b"AUTH", db_user, password]))


async def _hello_route(reader: Reader, count: int, limit: int) -> LoginRoute:
    if count not in (5, 7):
        raise RouteError(
            f"the first HELLO must name the route: HELLO <2|3> AUTH {LOGIN_FORMAT} "
            "<password> [SETNAME <name>]"
        )
    version = await _bulk(reader, MAX_HEADER, "protocol version")
    if version not in (b"2", b"3"):
        raise RouteError(f"HELLO: protocol version {version[:16]!r} is not 2 or 3")
    login: tuple[Route, bytes, bytes] | None = None
    setname: list[bytes] = []
    left = count - 2  # elements after HELLO <version>
    while left:
        option = (await _bulk(reader, MAX_HEADER, "HELLO option")).upper()
        if option == b"AUTH" and login is None and left >= 3:
            login = await _login_user(reader, limit)
            left -= 3
        elif option == b"SETNAME" and not setname and left >= 2:
            setname = [b"SETNAME", await _bulk(reader, limit, "client name")]
            left -= 2
        else:
            raise RouteError(
                f"HELLO: unknown, repeated or incomplete option {option[:16]!r} before the "
                f"route is known (AUTH {LOGIN_FORMAT} <password> and SETNAME <name> are known)"
            )
    if login is None:
        raise RouteError(f"the first HELLO must name the route: HELLO 3 AUTH {LOGIN_FORMAT} ...")
    route, db_user, password = login
    return LoginRoute(
        route, encode_command([b"HELLO", version, b"AUTH", db_user, password, *setname])
    )


def _shown(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


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
