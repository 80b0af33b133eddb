"""Differential fuzzing of the agent's command readers against a real valkey-server.

Each case is a byte string a client might send: valid multibulk and inline commands
(ECHO and PING, so every reply is countable and shows its argument), then mutated
length lines, stray CR/LF/NUL bytes, broken payload terminators, quotes and escapes in
inline lines. The case goes

* into an engine's reader, cut at random points: what it forwards (``F``), how many
  commands it saw, and the protocol error it answered, if any;
* to valkey-server as sent (``B``, a client talking to the server directly), and ``F``
  on another connection (what the server runs through the agent).

They must agree: the client gets the same replies either way, the agent counted exactly
the commands the server ran, and the agent refuses exactly where the server does (with
the same error), or earlier when the server is waiting for bytes that can never make the
input valid (then the server refuses too once more bytes come, without running
anything). Used by tests/integration/test_parser_framing.py and benchmarks/fuzz_parser.py.
"""

from __future__ import annotations

import itertools
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from dbservice.engine.cluster.resp import CommandReader
from dbservice.engine.proxy import PassThroughHooks, ProxyLimits
from dbservice.engine.proxy.commands import CommandParser
from dbservice.engine.proxy.errors import ProtocolError
from dbservice.engine.proxy.pending import Local


@dataclass
class AgentView:
    forwarded: bytes
    commands: int
    error: bytes | None
    """The protocol error line the agent answered (then it closes)."""
    in_flight: bool = False
    """What it forwarded ends inside a command it already counted."""


@dataclass
class ServerView:
    replies: list[bytes]
    closed: bool
    tail: bytes
    """Bytes after the last complete reply (an error line before a close)."""


class _Counter(PassThroughHooks):
    def __init__(self) -> None:
        self.commands = 0

    def on_command(self, name: str, argc: int, args: object) -> bytes | None:
        self.commands += 1
        return None


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def run_proxy_engine(data: bytes, cuts: list[int], inspect: tuple[str, ...] = ()) -> AgentView:
    """The single-node engine's :class:`CommandParser`."""
    out = bytearray()
    hooks = _Counter()
    locals_: list[Local] = []
    parser = CommandParser(
        hooks=hooks,
        limits=ProxyLimits(),
        forward=out.extend,
        local=locals_.append,
        pending=deque(),
        inspect=inspect,
    )
    error = None
    try:
        for piece in pieces(data, cuts):
            parser.feed(piece)
    except ProtocolError as exc:
        error = exc.reply
    assert not locals_, locals_
    return AgentView(bytes(out), hooks.commands, error, not parser.at_boundary)


def run_audited_proxy_engine(data: bytes, cuts: list[int]) -> AgentView:
    """The single-node engine's :class:`CommandParser` reading every command's arguments
    (``inspect=("*",)``, as the agent's audit does)."""
    return run_proxy_engine(data, cuts, inspect=("*",))


def run_cluster_engine(data: bytes, cuts: list[int]) -> AgentView:
    """The cluster engine's :class:`CommandReader` (a command goes on as its bytes)."""
    reader = CommandReader(ProxyLimits())
    out = bytearray()
    count = 0
    error = None
    for piece in pieces(data, cuts):
        try:
            batch = reader.feed(piece)
        except ProtocolError as exc:
            error = exc.reply
            break
        for _, raw in batch:
            out += raw if isinstance(raw, bytes) else b"".join(raw)
            count += 1
        if reader.error is not None:
            error = reader.error.reply
            break
    return AgentView(bytes(out), count, error)


ENGINES: dict[str, Callable[[bytes, list[int]], AgentView]] = {
    "proxy": run_proxy_engine,
    "proxy-audit": run_audited_proxy_engine,
    "cluster": run_cluster_engine,
}


# -- the server side -------------------------------------------------------------------------


def _reply_end(buf: bytes, p: int) -> int:
    """End of the RESP2 reply at ``p`` (ECHO/PING/errors only), -1 if incomplete."""
    e = buf.find(b"\r\n", p)
    if e < 0:
        return -1
    if buf[p] == 36:  # '$'
        size = int(buf[p + 1 : e])
        end = e + 2 + (size + 2 if size >= 0 else 0)
        return end if end <= len(buf) else -1
    return e + 2


def split_replies(buf: bytes) -> tuple[list[bytes], bytes]:
    replies, p = [], 0
    while p < len(buf):
        end = _reply_end(buf, p)
        if end < 0:
            break
        replies.append(buf[p:end])
        p = end
    return replies, buf[p:]


class Server:
    """Raw sockets to one valkey-server, with a side connection that watches them."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.side = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _call(self, sock: socket.socket, command: bytes) -> bytes:
        sock.sendall(command)
        buf = b""
        while True:
            buf += sock.recv(65536)
            end = _reply_end(buf, 0)
            if end > 0:
                return buf[:end]

    def _state(self, client_id: int) -> dict[str, str] | None:
        line = self._call(self.side, b"CLIENT LIST ID %d\r\n" % client_id)
        text = line.split(b"\r\n", 1)[1].decode() if line.startswith(b"$") else ""
        if not text.strip():
            return None
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def close(self) -> None:
        self.side.close()

    def run(self, data: bytes, filler: bytes = b"") -> ServerView:
        """Send ``data`` (then ``filler`` once all of it is read) on a new connection;
        what came back once the server has read everything and answered."""
        sock = self._connect()
        try:
            intro = b"CLIENT ID\r\n"
            first = self._call(sock, intro)
            client_id = int(first[1:-2])
            sent = len(intro)
            buf = b""
            closed = False
            for part in (data, filler):
                if not part or closed:
                    continue
                try:
                    sock.sendall(part)
                except OSError:
                    closed = True
                    break
                sent += len(part)
                deadline = time.monotonic() + self.timeout
                while True:
                    state = self._state(client_id)
                    if state is None:
                        closed = True
                        break
                    if int(state["tot-net-in"]) >= sent:
                        self._state(client_id)  # one more round: its replies are out
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError(f"the server did not read {part[:80]!r}")
                    time.sleep(0.001)
            sock.setblocking(False) if not closed else sock.settimeout(self.timeout)
            while True:
                try:
                    chunk = sock.recv(1 << 20)
                except BlockingIOError:
                    break
                except ConnectionResetError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                buf += chunk
        finally:
            sock.close()
        replies, tail = split_replies(buf)
        if closed and not tail and replies and replies[-1].startswith(_PROTO):
            tail = replies.pop()
        return ServerView(replies, closed, tail)


_PROTO = b"-ERR Protocol error: "

FILLER = b"\r\n" + b"x" * (70 * 1024)
"""After an early refusal: ends any count line, and overflows the inline limit."""


def check(server: Server, engine: str, data: bytes, cuts: list[int]) -> str | None:
    """None when the engine and the server agree on ``data``, else what differs."""
    agent = ENGINES[engine](data, cuts)
    through = server.run(agent.forwarded)
    direct = server.run(data)
    if through.closed or through.tail:
        return f"the server refused what the agent forwarded: {through}"
    unanswered = agent.commands - len(through.replies)
    # The single-node engine decides on a command by its name and count and streams the
    # rest: a command found malformed later was counted (and its head forwarded; the
    # agent closes the connection before the server can run it).
    streamed = engine == "proxy" and (agent.error is not None or agent.in_flight)
    if unanswered != 0 and not (unanswered == 1 and streamed):
        return f"agent saw {agent.commands} commands, the server ran {len(through.replies)}"
    if direct.replies[: len(through.replies)] != through.replies:
        return f"replies differ: direct {direct.replies} through {through.replies}"
    extra = direct.replies[len(through.replies) :]
    if agent.error is None:
        if direct.closed or extra or direct.tail:
            return f"the server ran more or refused: {extra} {direct.tail!r} {direct.closed}"
        return None
    if extra:
        return f"the server ran {extra} after where the agent refused ({agent.error!r})"
    if direct.closed:
        # A length line with no CR in its first 64 bytes is refused at once, before the
        # bytes that tell which error the server will name: any protocol error agrees.
        early = agent.error.endswith(b"count string\r\n")
        if direct.tail != agent.error and not (early and direct.tail.startswith(_PROTO)):
            return f"errors differ: server {direct.tail!r}, agent {agent.error!r}"
        return None
    if agent.error.endswith(b"command name too long\r\n"):
        return None  # the agent's own limit (ProxyLimits.max_inspect): no name is that long
    # The server still waits: only right if no continuation can make it run anything.
    doomed = server.run(data, FILLER)
    if doomed.replies != through.replies or not doomed.closed:
        return f"the agent refused ({agent.error!r}) input the server still reads: {doomed}"
    if doomed.tail and not doomed.tail.startswith(_PROTO):
        return f"after more bytes the server answered {doomed.tail!r}"
    return None


# -- the generator ---------------------------------------------------------------------------

_PAYLOAD = b"abcXYZ \r\n*$0123456789\"'\\"
_INLINE = [b'"', b"'", b"\\", b"x", b"4", b"1", b"a", b"n", b" ", b" ", b"\t", b"\r", b"\x0b"]
_INLINE += [b"\x0c", b"\\x41", b'""', b"''", b"b c"]


def _bulk(rng: random.Random, payload: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(payload), payload)


def _command(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        size = rng.choice([0, 1, 3, 9, 10, 11, 98, 99, 100, 101, 120])
        payload = bytes(rng.choice(_PAYLOAD) for _ in range(size))
        return b"*2\r\n" + _bulk(rng, b"ECHO") + _bulk(rng, payload)
    if kind < 0.47:
        return _boundary(rng)
    if kind < 0.55:
        args = [b"PING"] + ([b"p%d" % rng.randint(0, 99)] if rng.random() < 0.5 else [])
        return b"*%d\r\n" % len(args) + b"".join(_bulk(rng, a) for a in args)
    if kind < 0.85:
        words = b"".join(rng.choice(_INLINE) for _ in range(rng.randint(0, 8)))
        name = rng.choice([b"ECHO ", b"PING ", b"echo ", b"  ECHO\t", b'"ECHO" '])
        return name + words + rng.choice([b"\r\n", b"\n", b"\r\r\n"])
    return rng.choice([b"\r\n", b"\n", b"   \r\n", b"*0\r\n", b"*-1\r\n", b"*-5\r\n"])


def _boundary(rng: random.Random) -> bytes:
    """Commands at the edge of the readers' fast path (framing.py's tables of counts
    and lengths under 100; names remembered with their CR LF): counts and lengths of
    99 and 100, long names, and a name that starts like one seen before."""
    kind = rng.randrange(4)
    if kind == 0:  # 9 to 101 arguments: the server answers an arity error
        args = [b"ECHO"] + [b"a"] * rng.choice([8, 9, 10, 97, 98, 99, 100])
    elif kind == 1:  # an unknown name of 9 to 101 bytes
        args = [b"X" * rng.choice([9, 10, 98, 99, 100, 101])]
    elif kind == 2:  # a name that is ECHO and more: ECHO\r\n... (unknown to the server)
        args = [b"ECHO", b"x"]
        args[0] += rng.choice([b"\r\n", b"\r\nx", b"\r\n$1", b"\r", b"\r\nECHO\r\n"])
    else:  # an argument around 99/100 bytes
        args = [b"ECHO", b"y" * rng.choice([99, 100, 999, 1000])]
    return b"*%d\r\n" % len(args) + b"".join(_bulk(rng, a) for a in args)


_LENGTHS = [
    b"+%d", b"0%d", b" %d", b"%d ", b"%d\r", b"\r%d", b"-%d", b"%d0", b"%dx", b"-0", b"",
    b"99999999999999999999", b"9223372036854775808", b"536870913", b"2147483648",
]  # fmt: skip


def _mutate(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(7)
    if kind <= 2:  # a length line
        heads = [i for i in range(len(data)) if data[i] in b"*$" and (i == 0 or data[i - 1] == 10)]
        if heads:
            i = rng.choice(heads)
            e = data.find(b"\r", i)
            if e > i:
                try:
                    value = int(data[i + 1 : e])
                except ValueError:
                    value = 3
                if kind == 0:
                    new = rng.choice(_LENGTHS)
                    new = new % value if b"%d" in new else new
                else:
                    new = b"%d" % (value + rng.choice([-2, -1, 1, 2, 10]))
                return data[: i + 1] + new + data[e:]
    if kind == 3:  # a stray byte
        i = rng.randrange(len(data) + 1)
        return data[:i] + rng.choice([b"\r", b"\n", b"\x00", b" ", b"*", b"$"]) + data[i:]
    if kind == 4 and data:  # a byte gone
        i = rng.randrange(len(data))
        return data[:i] + data[i + 1 :]
    if kind == 5:  # a broken CRLF
        crlfs = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\r\n"]
        if crlfs:
            i = rng.choice(crlfs)
            return (
                data[:i]
                + rng.choice([b"\r\r", b"\n\n", b"XY", b"\r", b"\n", b"\r\r\n"])
                + data[i + 2 :]
            )
    # kind 6 (or nothing else applied): a length line split by a CR
    return data.replace(b"\r\n$", b"\r\n$1\r\r\n$", 1) if rng.random() < 0.3 else data


def case(rng: random.Random) -> tuple[bytes, list[int]]:
    """One input and where to cut it into reads."""
    data = b"".join(_command(rng) for _ in range(rng.randint(1, 5)))
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        data = _mutate(rng, data)
    data += b"*1\r\n$4\r\nPING\r\n"
    if rng.random() < 0.1:
        cuts = list(range(1, len(data)))  # one byte per read
    else:
        cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 6))]
    return data, cuts


def fuzz(port: int, cases: int, seed: int, engines: list[str] | None = None) -> list[str]:
    """Run ``cases`` cases per engine; the disagreements found (empty when none)."""
    server = Server(port)
    failures = []
    try:
        for engine in engines or list(ENGINES):
            rng = random.Random(f"{seed}-{engine}")
            for i in range(cases):
                data, cuts = case(rng)
                problem = check(server, engine, data, cuts)
                if problem is not None:
                    failures.append(f"{engine} case {i} {data!r} cuts {cuts}: {problem}")
    finally:
        server.close()
    return failures
