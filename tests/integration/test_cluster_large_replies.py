"""Large replies in the cluster engine: a reply is collected as it arrives (never joined
or copied whole on the event loop) and written to the client a slice per turn of the
event loop, within the client connection's flow control; a transaction holding a large
value is handed to its node in pieces. Other sessions of the agent never wait for them."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import redis

from dbservice.engine.cluster import resp, transactions
from dbservice.engine.proxy.errors import UpstreamProtocolError
from dbservice.engine.proxy.settings import ProxyLimits
from sandbox.memorydb import StandinConfig, ThreadedStandin
from tests.kits.cluster import ClusterProxy
from tests.kits.probe import Measured, read_exactly
from tests.kits.probe import measure as measure_loop

pytestmark = pytest.mark.timeout(300)

SIZE = 64 << 20
LIMITS = ProxyLimits()


# -- a transaction's body -------------------------------------------------------------------


def test_a_transaction_body_keeps_large_arguments_apart() -> None:
    value = os.urandom(resp.LARGE_ARGUMENT)
    commands: list[Sequence[bytes]] = [
        [b"SET", b"a", value],
        [b"INCR", b"n"],
        [b"SET", b"b", value],
    ]
    body = transactions._body(commands)
    assert isinstance(body, tuple)
    assert [piece is value for piece in body] == [False, True, False, True, False]
    everything = [[b"MULTI"], *commands, [b"EXEC"]]
    assert b"".join(body) == b"".join(resp.encode_command(c) for c in everything)
    small: list[Sequence[bytes]] = [[b"SET", b"a", b"1"]]
    assert transactions._body(small) == b"".join(
        resp.encode_command(c) for c in [[b"MULTI"], *small, [b"EXEC"]]
    )


# -- the frame reader ---------------------------------------------------------------------


def random_reply(rng: random.Random, depth: int = 0) -> bytes:
    """One RESP2/RESP3 reply of any type, nested, sometimes with a large bulk."""
    kind = rng.choice("+-:_,#($!=*~>%|" if depth < 4 else "+-:$")
    if kind in "+-":
        return b"%s%s\r\n" % (kind.encode(), b"x" * rng.choice((0, 1, 5, 300)))
    if kind in ":(":
        return b"%s%d\r\n" % (kind.encode(), rng.randint(-(10**20), 10**20))
    if kind == "_":
        return b"_\r\n"
    if kind == ",":
        return b",1.5\r\n"
    if kind == "#":
        return b"#t\r\n"
    if kind in "$!=":
        if kind == "$" and rng.random() < 0.1:
            return b"$-1\r\n"
        size = rng.choice((0, 1, 2, 10, 4000, 70_000, 300_000))
        return b"%s%d\r\n%s\r\n" % (kind.encode(), size, rng.randbytes(size))
    if kind == "*" and rng.random() < 0.1:
        return b"*-1\r\n"
    count = rng.choice((0, 1, 2, 3, 7))
    frames = [random_reply(rng, depth + 1) for _ in range(count * (2 if kind in "%|" else 1))]
    if kind == "|":  # an attribute, then the reply it describes
        frames.append(random_reply(rng, depth + 1))
    return b"%s%d\r\n%s" % (kind.encode(), count, b"".join(frames))


def read_replies(data: bytes, cuts: list[int], limits: ProxyLimits = LIMITS) -> list[bytes]:
    reader = resp.FrameReader(limits)
    got: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        got += reader.feed(data[start:end])
    return got


@pytest.mark.parametrize("seed", range(60))
def test_replies_cut_anywhere_are_found_whole(seed: int) -> None:
    rng = random.Random(seed)
    frames = [random_reply(rng) for _ in range(rng.randint(1, 12))]
    data = b"".join(frames)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 40))))
    assert read_replies(data, cuts) == frames
    # and in reads of the sizes a connection gives
    size = rng.choice((1, 2, 3, 4096) if len(data) < 50_000 else (4096, 65536, 262144))
    assert read_replies(data, list(range(size, len(data), size))) == frames


def test_a_large_reply_arriving_in_pieces() -> None:
    value = os.urandom(3 << 20)
    large = b"$%d\r\n%s\r\n" % (len(value), value)
    nested = b"*3\r\n$1\r\na\r\n%s*1\r\n%s" % (large, large)
    frames = [b"+OK\r\n", large, b":5\r\n", nested, b"+PONG\r\n"]
    data = b"".join(frames)
    for read in (65536, 262144, 100_003, len(large), len(large) + 5):
        assert read_replies(data, list(range(read, len(data), read))) == frames
    # every place a line or a payload can be cut: in its CRLF, right after it
    for cut in (4, 5, 6, 7, 8, len(large) - 1, len(large), len(large) + 1, len(large) + 5):
        assert read_replies(data, [cut, cut + 1, len(data) - 1]) == frames


def test_a_reply_line_too_long_is_refused_across_reads() -> None:
    limits = ProxyLimits(max_reply_line=100)
    reader = resp.FrameReader(limits)
    assert reader.feed(b"+OK\r\n-ERR " + b"x" * 60) == [b"+OK\r\n"]
    with pytest.raises(UpstreamProtocolError, match="reply line too long"):
        reader.feed(b"x" * 60)
    # within the limit, a line arriving a byte at a time is found
    line = b"-ERR " + b"x" * 90 + b"\r\n"
    assert read_replies(line, list(range(1, len(line))), limits) == [line]


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path_factory.mktemp("cluster"), shards=3)
    with ThreadedStandin(config) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(standin: ThreadedStandin) -> Iterator[ClusterProxy]:
    with ClusterProxy(standin, client_tls=True) as running:  # the agent's clients use TLS
        yield running


@pytest.fixture(scope="module")
def value(proxy: ClusterProxy) -> bytes:
    data = os.urandom(SIZE)
    with proxy.client() as client:
        assert client.set("{big}v", data)
    return data


def measure(proxy: ClusterProxy, action: Callable[[socket.socket], None]) -> Measured:
    return measure_loop(proxy.connect, proxy.probe, action)


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


# The stall is the CPU the engine's own loop spent while a tick of the probe was late, so
# it does not count the time this loaded machine ran something else (the stand-in, in
# this process, relays the 64 MB through its TLS fronts; other tests run).


def test_a_large_reply_does_not_stall_other_sessions(proxy: ClusterProxy, value: bytes) -> None:
    def get(sock: socket.socket) -> None:
        sock.sendall(resp.encode_command([b"GET", b"{big}v"]))
        assert read_exactly(sock, len(bulk(value))) == bulk(value)
        sock.sendall(b"PING\r\n")  # the session goes on after it
        assert read_exactly(sock, 7) == b"+PONG\r\n"

    measured = measure(proxy, get)
    print(measured)
    # It used to join the reply's pieces once it was whole and write it to the client
    # in one write (encrypting 64 MB in one call): 0.2-0.3 s of one callback.
    assert max(measured.stalls) < 0.05, measured
    assert max(measured.pings) < 3.0, measured


def test_a_transaction_with_a_large_value_does_not_stall_other_sessions(
    proxy: ClusterProxy, value: bytes
) -> None:
    command = (
        resp.encode_command([b"MULTI"])
        + resp.encode_command([b"SET", b"{big}tx", value])
        + resp.encode_command([b"EXEC"])
    )
    expected = b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n"

    def transaction(sock: socket.socket) -> None:
        sock.sendall(command)
        assert read_exactly(sock, len(expected)) == expected

    measured = measure(proxy, transaction)
    print(measured)
    # It used to join the transaction's body (MULTI, the commands, EXEC) once at EXEC.
    assert max(measured.stalls) < 0.05, measured
    assert max(measured.pings) < 3.0, measured


def test_a_large_reply_inside_a_transaction_does_not_stall_other_sessions(
    proxy: ClusterProxy, value: bytes
) -> None:
    command = resp.encode_command([b"MULTI"]) + resp.encode_command([b"GET", b"{big}v"])
    command += resp.encode_command([b"EXEC"])
    expected = b"+OK\r\n+QUEUED\r\n*1\r\n" + bulk(value)

    def transaction(sock: socket.socket) -> None:
        sock.sendall(command)
        assert read_exactly(sock, len(expected)) == expected

    measured = measure(proxy, transaction)
    print(measured)
    assert max(measured.stalls) < 0.05, measured
    assert max(measured.pings) < 3.0, measured


def test_a_client_that_does_not_read_leaves_its_replies_with_the_node(
    proxy: ClusterProxy, standin: ThreadedStandin
) -> None:
    """A pipeline of large GETs from a client that does not read: the engine stops
    reading the node's replies while the client does not take them (the node keeps
    them, in its output buffer), instead of holding all of them itself."""
    data = os.urandom(8 << 20)
    count = 12
    with proxy.client() as client:
        assert client.set("{slow}v", data)
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", "{slow}v"))
    node = standin.nodes[standin.owner_of_slot(slot)]
    with redis.Redis(port=node.port) as direct, proxy.connect() as sock:
        sock.sendall(resp.encode_command([b"GET", b"{slow}v"]) * count)
        time.sleep(3.0)  # the client reads nothing meanwhile
        kept = max(int(c["omem"]) for c in direct.client_list())
        for _ in range(count):
            assert read_exactly(sock, len(bulk(data))) == bulk(data)
    print(f"the node keeps {kept} bytes of {count * len(data)}")
    # The engine used to read all of them (96 MB) while the client read none; now the
    # node keeps what the sockets on the way do not hold (a few MB each).
    assert kept > count * len(data) // 2, kept
