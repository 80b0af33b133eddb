"""The one RESP encoder (fleetgate/resp.py): what the route preamble, upstream logins and
health probes send, the same bytes as the engines' own encoders, and read by a real
server as the command it is."""

from __future__ import annotations

import socket

import pytest

from dbservice.agent.health import PING
from dbservice.engine.cluster import resp as cluster_resp
from dbservice.engine.proxy import inline
from dbservice.route import EOF_SIGNAL, ROUTE_OK, encode_route
from fleetgate.resp import OK, encode_command
from sandbox.valkeynode import ValkeyNode
from tests.kits import proxy as proxykit

node = proxykit.node  # the kit's fixture, used by name

SAMPLES = [
    [b"PING"],
    [],
    [b"SET", b"key", b""],
    [b"AUTH", b"app", b"token with spaces\r\nand CRLF"],
    [b"SET", b"k", bytes(range(256)) * 300],
]


@pytest.mark.parametrize("args", SAMPLES)
def test_the_same_bytes_as_the_engines_encoders(args: list[bytes]) -> None:
    assert encode_command(args) == inline.encode_command(args)
    assert encode_command(args) == cluster_resp.encode_command(args)


def test_the_fixed_messages_keep_their_bytes() -> None:
    assert encode_command([b"GET", b"k"]) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert PING == b"*1\r\n$4\r\nPING\r\n"
    assert EOF_SIGNAL == b"*1\r\n$13\r\nFLEETGATE.EOF\r\n"
    assert OK == ROUTE_OK == b"+OK\r\n"
    assert encode_route("orders", "app", "n1", 7000, half_close=True) == (
        b"*9\r\n$15\r\nFLEETGATE.ROUTE\r\n$6\r\norders\r\n$3\r\napp\r\n$4\r\nNODE\r\n"
        b"$2\r\nn1\r\n$4\r\nPORT\r\n$4\r\n7000\r\n$9\r\nHALFCLOSE\r\n$1\r\n1\r\n"
    )


def test_a_real_server_reads_each_argument_whole(node: ValkeyNode) -> None:
    value = b"a\r\n$3\r\n*1\r\n" + bytes(range(256))
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(
            encode_command([b"SET", b"codec:k", value]) + encode_command([b"STRLEN", b"codec:k"])
        )
        expected = OK + b":%d\r\n" % len(value)
        got = b""
        while len(got) < len(expected):
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
    assert got == expected
