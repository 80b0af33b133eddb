"""A command refused inside ``MULTI`` by the agent's hooks fails the transaction exactly as
one the server refuses itself: side by side, the same bytes to valkey-server (an ACL user
that lacks the command) and through each engine (hooks that refuse it with the server's
own words), byte for byte, so ``EXEC`` answers ``EXECABORT`` and nothing runs."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator, Sequence

import pytest

from dbservice.engine.cluster.slots import key_slot
from dbservice.engine.proxy import PassThroughHooks
from sandbox.memorydb import StandinConfig, ThreadedStandin
from sandbox.valkeynode import ValkeyNode
from tests.kits.cluster import ClusterProxy
from tests.kits.proxy import RawClient, ThreadedProxy, cmd, serve_single_node

pytestmark = pytest.mark.timeout(120)

PASSWORD = "pw"
USERS = {"app": "del", "noexec": "exec"}
"""ACL users and the one command each lacks."""
END = b"$4\r\ndone\r\n"
BIG = b"k" * 200_000
"""A key long enough to be streamed (and dropped) by the single-node engine."""


class Denies(PassThroughHooks):
    """Refuses ``names`` with the server's own NOPERM wording for ``user``."""

    def __init__(self, user: str, *names: str) -> None:
        self.user = user
        self.names = names

    def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
        if name in self.names:
            return (
                f"-NOPERM User {self.user} has no permissions to run the "
                f"'{name.lower()}' command\r\n"
            ).encode()
        return None


async def add_users(node: ValkeyNode) -> None:
    for user, lacks in USERS.items():
        await node.command(
            "ACL", "SETUSER", user, "on", f">{PASSWORD}", "~*", "&*", "+@all", f"-{lacks}"
        )


def c(*args: str | bytes) -> bytes:
    return cmd(*args)


SET = c("SET", "a", "1")
CASES: dict[str, tuple[str, list[bytes]]] = {
    "exec": ("app", [c("MULTI"), SET, c("DEL", "a"), c("EXEC"), c("GET", "a")]),
    "discard": ("app", [c("MULTI"), SET, c("DEL", "a"), c("DISCARD"), c("GET", "a")]),
    "refused-first": (
        "app",
        [c("MULTI"), c("DEL", "a"), SET, c("EXEC"), c("GET", "a"), c("EXEC")],
    ),
    "big-refused": ("app", [c("MULTI"), SET, c("DEL", BIG), c("EXEC"), c("GET", "a")]),
    "exec-with-args": (
        "app",
        [c("MULTI"), SET, c("DEL", "a"), c("EXEC", "x"), c("EXEC"), c("GET", "a")],
    ),
    "discard-with-args": (
        "app",
        [c("MULTI"), SET, c("DEL", "a"), c("DISCARD", "x"), c("EXEC"), c("GET", "a")],
    ),
    "next-transaction-runs": (
        "app",
        [
            c("MULTI"),
            SET,
            c("DEL", "a"),
            c("EXEC"),
            c("MULTI"),
            c("SET", "{a}b", "2"),
            c("EXEC"),
            c("GET", "a"),
            c("GET", "{a}b"),
        ],
    ),
    "resp3": ("app", [c("MULTI"), SET, c("DEL", "a"), c("EXEC"), c("GET", "a")]),
    "exec-refused": (
        "noexec",
        [c("MULTI"), SET, c("EXEC"), c("DISCARD"), c("GET", "a"), c("EXEC")],
    ),
}
NESTED = ("app", [c("MULTI"), SET, c("DEL", "a"), c("MULTI"), c("EXEC"), c("GET", "a")])
"""The server's wording for a nested MULTI differs by version; the single-node engine
forwards it, the cluster engine answers it itself."""
INLINE = b"MULTI\r\nSET a 1\r\nDEL a\r\nEXEC\r\nGET a\r\n"


class _Replies(RawClient):
    """Reads whole replies off a connected socket, as the bytes that came."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.received = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk
        self.received += chunk

    def raw(self) -> bytes:
        """One reply, as sent."""
        before = len(self.received) - len(self.buf)
        self.read()
        return self.received[before : len(self.received) - len(self.buf)]


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    """``payload`` and ``ECHO done`` in one write; what comes back up to ``done``."""
    sock.sendall(payload + c("ECHO", "done"))
    data = b""
    while not data.endswith(END):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data[: -len(END)]


def _run(sock: socket.socket, user: str, commands: list[bytes], pipelined: bool) -> bytes:
    replies = _Replies(sock)
    sock.sendall(c("AUTH", user, PASSWORD))
    assert replies.raw() == b"+OK\r\n"
    if commands is CASES["resp3"][1]:  # its map names the connection: not compared
        sock.sendall(c("HELLO", "3"))
        assert replies.raw().startswith(b"%")
    if pipelined:
        return _exchange(sock, b"".join(commands))
    out = b""
    for command in commands:  # each written once the one before it is answered
        sock.sendall(command)
        out += replies.raw()
    return out


# -- the single-node engine ----------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_users)


def _single(node: ValkeyNode, user: str, run: bytes | list[bytes], pipelined: bool) -> list[bytes]:
    """What the server answers directly, then through the engine."""
    lacks = USERS[user].upper()
    out = []
    with ThreadedProxy(node.port, hooks=lambda: Denies(user, lacks)) as proxy:
        for port in (node.port, proxy.port):
            asyncio.run(node.command("FLUSHALL"))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                if isinstance(run, bytes):
                    assert _exchange(sock, c("AUTH", user, PASSWORD)) == b"+OK\r\n"
                    out.append(_exchange(sock, run))
                else:
                    out.append(_run(sock, user, run, pipelined))
            assert asyncio.run(node.command("GET", "a")) is None  # nothing of it ran
    return out


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
@pytest.mark.parametrize("case", [*CASES, "nested"])
def test_single_node_engine_aborts_as_the_server_does(
    node: ValkeyNode, case: str, pipelined: bool
) -> None:
    user, commands = NESTED if case == "nested" else CASES[case]
    direct, proxied = _single(node, user, commands, pipelined)
    assert b"NOPERM User " in direct  # the server's own refusal, side by side
    assert proxied == direct


def test_single_node_engine_inline_transaction(node: ValkeyNode) -> None:
    direct, proxied = _single(node, "app", INLINE, True)
    assert b"-EXECABORT Transaction discarded because of previous errors.\r\n$-1\r\n" in direct
    assert proxied == direct


# -- the cluster engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path_factory.mktemp("cluster"), shards=2)
    with ThreadedStandin(config) as running:
        for each in running.nodes:
            asyncio.run(add_users(each))
        yield running


def _node_of(standin: ThreadedStandin, key: bytes) -> int:
    return standin.owner_of_slot(key_slot(key))


def _cluster(
    standin: ThreadedStandin, user: str, run: bytes | list[bytes], pipelined: bool
) -> list[bytes]:
    lacks = USERS[user].upper()
    tls = ssl.create_default_context(cafile=str(standin.ca_file))
    tls.check_hostname = False
    owner = _node_of(standin, b"a")
    out = []
    with ClusterProxy(standin, hooks=lambda: Denies(user, lacks)) as proxy:
        for direct in (True, False):
            for each in standin.nodes:
                asyncio.run(each.command("FLUSHALL"))
            if direct:
                sock = tls.wrap_socket(
                    socket.create_connection(standin.node_fronts[owner], timeout=10)
                )
            else:
                sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            with sock:
                if isinstance(run, bytes):
                    assert _exchange(sock, c("AUTH", user, PASSWORD)) == b"+OK\r\n"
                    out.append(_exchange(sock, run))
                else:
                    out.append(_run(sock, user, run, pipelined))
            assert asyncio.run(standin.nodes[owner].command("GET", "a")) is None
    return out


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
@pytest.mark.parametrize("case", list(CASES))
def test_cluster_engine_aborts_as_the_server_does(
    standin: ThreadedStandin, case: str, pipelined: bool
) -> None:
    user, commands = CASES[case]
    if case == "big-refused":  # one slot for the whole transaction
        commands = [c("MULTI"), SET, c("DEL", b"{a}" + BIG), c("EXEC"), c("GET", "a")]
    direct, proxied = _cluster(standin, user, commands, pipelined)
    assert b"NOPERM User " in direct  # the server's own refusal, side by side
    assert proxied == direct


def test_cluster_engine_nested_multi_and_watch_fail_the_transaction(
    standin: ThreadedStandin,
) -> None:
    """The server rejects MULTI and WATCH inside MULTI, which fails the transaction."""
    for inside in (c("MULTI"), c("WATCH", "a")):
        commands = [c("MULTI"), SET, inside, c("EXEC"), c("GET", "a")]
        direct, proxied = _cluster(standin, "app", commands, True)
        for out in (direct, proxied):
            assert out.startswith(b"+OK\r\n+QUEUED\r\n-ERR ")
            assert out.endswith(
                b"-EXECABORT Transaction discarded because of previous errors.\r\n$-1\r\n"
            )


def test_cluster_engine_commands_behind_exec_see_its_writes(standin: ThreadedStandin) -> None:
    """The transaction goes to its shard in its turn: what is pipelined behind EXEC is
    not sent before it (a read saw nothing, a write ran first and was overwritten)."""
    with ClusterProxy(standin) as proxy:
        for i in range(10):
            key = f"{{t}}k{i}"
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                got = _exchange(
                    sock,
                    c("MULTI") + c("SET", key, "1") + c("EXEC") + c("GET", key)
                    + c("SET", key, "2") + c("GET", key),
                )  # fmt: skip
            assert got == b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n$1\r\n1\r\n+OK\r\n$1\r\n2\r\n"
