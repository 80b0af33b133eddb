"""Both engines read client bytes and server replies exactly as valkey-server does:
framing (the desync that hid a FLUSHALL), inline splitting, deep replies, wrong arities.
Every check compares with a real valkey-server spoken to directly."""

from __future__ import annotations

import itertools
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dbservice.engine.cluster.resp import CommandReader
from dbservice.engine.proxy import ProtocolError, ProxyLimits
from dbservice.engine.proxy.commands import CommandParser
from dbservice.engine.proxy.framing import (
    SHORT_LINE,
    bulk_line,
    count_line,
    short_bulk_ends,
    short_bulks,
    short_counts,
)
from sandbox.memorydb import StandinConfig, ThreadedStandin
from sandbox.valkeynode import ValkeyNode
from tests.kits import proxy as proxykit
from tests.kits.cluster import ClusterProxy
from tests.kits.parserfuzz import fuzz
from tests.kits.proxy import RawClient, Recorder, ThreadedProxy, cmd

node = proxykit.node  # the kit's fixture, used by name

REPRO = (
    b"*2\r\n$4\r\nECHO\r\n$100\r\r\n" + b"X" * 99 + b"\r\n *2\r\n$4\r\nECHO\r\n$8\r\nFLUSHALL\r\n"
)
"""Issue 15 point 3: the agent read ``$100\\r\\r\\n`` as 100; Redis 6.2 ran FLUSHALL."""


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path_factory.mktemp("framing-cluster"), shards=2, replicas=0)
    with ThreadedStandin(config) as running:
        yield running


def exchange(
    port: int, data: bytes, settle: float = 0.3, pong_wait: float = 15.0
) -> tuple[bytes, bool]:
    """Send ``data``; everything that comes back, and whether the connection closed
    (read until a final ``+PONG``, a close, or ``settle`` seconds of silence). When
    ``data`` ends with a PING, its PONG or a close ends the wait, so silence may last
    longer (``pong_wait``): the cluster engine learns the cluster before its first
    reply, which on a busy machine can take more than ``settle``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(data)
    sock.settimeout(pong_wait if data.endswith(b"$4\r\nPING\r\n") else settle)
    out, closed = b"", False
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                closed = True
                break
            out += chunk
            if out.endswith(b"+PONG\r\n"):
                break
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    sock.close()
    return out, closed


# -- issue 15 point 3: the reproduction --------------------------------------------------


def test_desync_repro_is_refused_by_the_single_node_engine(node: ValkeyNode) -> None:
    hooks = Recorder()
    with ThreadedProxy(node.port, hooks=lambda: hooks) as proxy:
        raw = RawClient(proxy.port)
        raw.send(cmd("SET", "canary", "1"))
        assert raw.read() == "OK"
        raw.send(REPRO)
        out = raw.read_all()
        raw.close()
        direct = exchange(node.port, REPRO)
        assert (out, True) == direct == (b"-ERR Protocol error: invalid CRLF in request\r\n", True)
        # the agent saw no ECHO and no FLUSHALL: nothing of it was forwarded or audited
        assert hooks.commands == [("SET", 3)]
        assert proxy.finished(1)[0].reason.startswith("protocol error")
    check = RawClient(node.port)
    check.send(cmd("DBSIZE"))
    assert check.read() >= 1  # FLUSHALL did not run
    check.close()


def test_desync_repro_is_refused_by_the_cluster_engine(standin: ThreadedStandin) -> None:
    hooks = Recorder()
    with ClusterProxy(standin, hooks=lambda: hooks) as proxy:
        raw = RawClient(proxy.port)
        raw.send(cmd("SET", "canary", "1"))
        assert raw.read() == "OK"
        raw.send(REPRO)
        out = raw.read_all()
        raw.close()
        assert out == b"-ERR Protocol error: invalid CRLF in request\r\n"
        assert hooks.commands == [("SET", 3)]
        with proxy.client() as client:
            assert client.get("canary") == b"1"  # FLUSHALL did not run


# -- the differential fuzz --------------------------------------------------------------------


def test_parsers_agree_with_the_server_on_command_boundaries(node: ValkeyNode) -> None:
    """Thousands of seeded inputs (valid, mutated length lines, stray CR/LF/NUL, broken
    payload ends, tricky inline lines, random read boundaries), each through both
    engines' readers and straight to valkey-server: no disagreement on where commands
    end, on what ran, or on the refusal. benchmarks/fuzz_parser.py runs more."""
    started = time.monotonic()
    failures = fuzz(node.port, cases=2000, seed=15)
    assert not failures, "\n".join(f[:2000] for f in failures[:5])
    assert time.monotonic() - started < 120


# -- issue 16 point 5: inline commands --------------------------------------------------------

INLINE = [
    b'set """k""" v',
    b"set 'it''s' x",
    b'set a"b c"d x',
    b'echo "a\\"',
    b'echo "a\\""',
    b"echo 'a\\'",
    b"echo 'a\\''",
    b'echo "\\x41\\x4\\xZZ\\n\\q"',
    b'echo "a" "b',
    b"echo 'unterminated",
    b'echo a\\"b',
    b"echo \x0bword",
    b"echo wo\x0brd",
    b"echo\tx\ry",
    b'echo "a\rb"',
    b'echo ""',
    b"   ",
    b"echo a\x00b",
]


def _inline_run(port: int, line: bytes, pong_wait: float = 15.0) -> tuple[bytes, bool]:
    data = line + b"\r\n" + cmd("GET", "k") + cmd("GET", "its") + cmd("PING")
    return exchange(port, data, pong_wait=pong_wait)


def test_inline_commands_split_as_the_server_splits_them(
    node: ValkeyNode, standin: ThreadedStandin
) -> None:
    def reset(port: int) -> None:
        exchange(port, cmd("DEL", "k") + cmd("DEL", "its") + cmd("DEL", "ab cd") + cmd("PING"))

    with ThreadedProxy(node.port) as single, ClusterProxy(standin) as cluster:
        for line in INLINE:
            reset(node.port)
            # the server never sees the end of a line with a NUL, and stays silent: a
            # second of that silence tells as much as the PONG wait would
            want = _inline_run(node.port, line, pong_wait=1.0 if b"\x00" in line else 15.0)
            if b"\x00" in line:  # the agent refuses it
                assert want == (b"", False)
                want = (b"-ERR Protocol error: NUL byte in inline request\r\n", True)
            for port in (single.port, cluster.port):
                reset(port)
                assert _inline_run(port, line) == want, (line, port)


# -- issue 16 point 4: deep replies ------------------------------------------------------------

DEEP = "local t={} local c=t for i=1,129 do local n={} c[1]=n c=n end return t"


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_deep_reply_and_the_next_reach_the_client(
    node: ValkeyNode, standin: ThreadedStandin, protocol: int
) -> None:
    data = cmd("HELLO", protocol) + cmd("EVAL", DEEP, 0) + cmd("PING")

    def run(port: int) -> bytes:
        raw = RawClient(port)
        raw.send(data)
        raw.read()  # HELLO's answer differs (server name, id): not compared
        buf, want = raw.buf, b"*1\r\n" * 129 + b"*0\r\n+PONG\r\n"  # 130 levels
        deadline = time.monotonic() + 5
        while not buf.endswith(b"+PONG\r\n") and time.monotonic() < deadline:
            raw._fill()
            buf = raw.buf
        raw.close()
        assert buf == want
        return buf

    direct = run(node.port)
    with ThreadedProxy(node.port) as single, ClusterProxy(standin) as cluster:
        assert run(single.port) == direct
        assert run(cluster.port) == direct


# -- issue 16 point 7: wrong arities in the cluster engine --------------------------------------


def test_mset_with_a_key_missing_its_value(node: ValkeyNode, standin: ThreadedStandin) -> None:
    """Keys in different slots (split per shard by the engine): the error a one-node
    server gives, as the reference node gives it for keys in one slot."""
    want = exchange(node.port, cmd("MSET", "{t}a", "1", "{t}b") + cmd("PING"))
    assert want == (b"-ERR wrong number of arguments for 'mset' command\r\n+PONG\r\n", False)
    data = cmd("MSET", "a", "1", "b") + cmd("MSET", "x", "1", "y", "2", "z") + cmd("PING")
    with ClusterProxy(standin) as cluster:
        out = exchange(cluster.port, data)
    assert out == (want[0].replace(b"+PONG\r\n", b"") * 2 + b"+PONG\r\n", False)


def _table(port: int) -> list[tuple[bytes, int, int]]:
    """(name, arity, key step) of every command the server knows."""
    raw = RawClient(port)
    raw.send(cmd("COMMAND"))
    entries = raw.read()
    raw.close()
    return [(e[0], int(e[1]), int(e[5])) for e in entries]


def test_wrong_arities_never_end_a_cluster_session(
    node: ValkeyNode, standin: ThreadedStandin
) -> None:
    """Every command the server knows with too few and too many arguments, and the
    multi-key commands with a key short of its pair (MSET a 1 b): the server's error,
    and the session goes on."""
    cases: list[list[bytes]] = []
    for name, arity, step in _table(node.port):
        need = abs(arity)
        counts = list(range(1, need)) + ([need + 1] if arity > 0 else [])
        if step > 1:
            counts.append(need + 1)  # valid arity, one key without its value
        for argc in counts:
            cases.append([name, *(b"{k}%d" % i for i in range(1, argc))])
    assert len(cases) > 200
    with ClusterProxy(standin) as cluster:
        raw = RawClient(cluster.port, timeout=20)
        for args in cases:
            raw.send(cmd(*args) + cmd("ECHO", b"after"))
            reply = raw.read()
            assert isinstance(reply, Exception), (args, reply)
            assert raw.read() == b"after", (args, reply)
        raw.close()


# -- the readers' fast path (framing.py's tables) --------------------------------------------


def _strict(read: Callable[..., tuple[int, int] | None], *args: Any) -> tuple[int, int] | None:
    """What a strict reader gives for a line: (value, ...) when valid and whole."""
    try:
        return read(*args)
    except ProtocolError:
        return None


def test_the_fast_path_tables_hold_exactly_the_short_lines_the_strict_reader_accepts() -> None:
    """Every 5-byte start of a line over the bytes that matter: in the tables exactly
    when count_line / bulk_line read it as a whole line with a value under 100 (and
    within the limits), with the same value and length; a miss is whatever else."""
    alphabet = b"*$0159\r\n -+x"
    for max_bulk, max_multibulk in [(512 * 1024 * 1024, (1 << 31) - 1), (10, 3), (0, 0)]:
        counts, bulks = short_counts(max_multibulk), short_bulks(max_bulk)
        ends = short_bulk_ends(max_bulk)
        assert ends == {key: end for key, (_, end) in bulks.items()}
        for key in map(bytes, itertools.product(alphabet, repeat=SHORT_LINE)):
            count = _strict(count_line, key, 0, len(key)) if key[0] == 42 else None
            if count is not None and 1 <= count[0] <= min(99, max_multibulk):
                assert counts.get(key) == count, key
            else:
                assert key not in counts, key
            size = _strict(bulk_line, key, 0, len(key), max_bulk)
            if size is not None and size[0] < 100:
                assert bulks.get(key) == (size[1], size[1] + size[0]), (key, max_bulk)
            else:
                assert key not in bulks, (key, max_bulk)


def test_a_name_cut_by_the_read_is_not_taken_for_a_shorter_name_seen_before() -> None:
    """``$6\\r\\nECHO\\r\\n``: the name is the 6 bytes ``ECHO\\r\\n``, not ECHO, wherever the
    read ends (the single-node parser remembers names with their CR LF)."""
    data = cmd("ECHO", "a") + cmd(b"ECHO\r\n", "b") + cmd(b"ECHO\r\nx", "c")
    for cut in range(len(data) + 1):
        hooks = Recorder()
        parser = CommandParser(
            hooks=hooks, limits=ProxyLimits(), forward=bytearray().extend,
            local=lambda _: None, pending=deque(), inspect=("*",) if cut % 2 else (),
        )  # fmt: skip
        parser.feed(data[:cut])
        parser.feed(data[cut:])
        assert hooks.commands == [("ECHO", 2), ("ECHO\r\n", 2), ("ECHO\r\nX", 2)], cut


@pytest.mark.parametrize("engine", ["proxy", "proxy-audit", "cluster"])
def test_short_lengths_and_counts_obey_the_limits(engine: str) -> None:
    """A configured max_bulk or max_multibulk under 100 holds on the fast path too
    (a 1- or 2-digit length or count over the limit was let through before)."""
    limits = ProxyLimits(max_bulk=10, max_multibulk=3)
    for data, error in [
        (cmd("SET", "k", "v" * 11), "invalid bulk length"),
        (cmd("SET", "k", "v" * 50), "invalid bulk length"),
        (cmd("GET", "k" * 11), "invalid bulk length"),
        (cmd("MSET", "a", "b", "c"), "invalid multibulk length"),
    ]:
        ok = cmd("SET", "k", "v" * 10)
        with pytest.raises(ProtocolError, match=error):
            if engine == "cluster":
                reader = CommandReader(limits)
                assert len(reader.feed(ok)) == 1
                reader.feed(data)
            else:
                parser = CommandParser(
                    hooks=Recorder(), limits=limits, forward=bytearray().extend,
                    local=lambda _: None, pending=deque(),
                    inspect=("*",) if engine == "proxy-audit" else (),
                )  # fmt: skip
                parser.feed(ok)
                parser.feed(data)
