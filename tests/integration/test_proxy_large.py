"""Large values stream through the engine without being held whole, and valkey-cli
works through it (interactive-style commands and ``--pipe`` mass insertion)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from sandbox.valkeynode import ValkeyNode
from tests.kits import proxy as proxykit
from tests.kits.probe import measure, read_exactly
from tests.kits.proxy import ThreadedProxy, cmd, valkey_cli

node, proxy = proxykit.node, proxykit.proxy  # the kit's fixtures, used by name

MiB = 1024 * 1024
VALUE_SIZE = 64 * MiB + 12345

CLIENT = textwrap.dedent(
    """
    import hashlib, sys, redis
    port, size = int(sys.argv[1]), int(sys.argv[2])
    value = (bytes(range(256)) * (size // 256 + 1))[:size]
    r = redis.Redis(port=port, socket_timeout=60)
    assert r.set("big", value)
    assert r.strlen("big") == size
    got = r.get("big")
    assert hashlib.sha256(got).digest() == hashlib.sha256(value).digest()
    pipe = r.pipeline(transaction=False)
    pipe.get("big"); pipe.ping(); pipe.append("big", b"!"); pipe.strlen("big")
    out = pipe.execute()
    assert out[0] == value and out[1] is True and out[3] == size + 1
    print("ok")
    """
)


def test_a_large_value_or_reply_does_not_stall_other_sessions(proxy: ThreadedProxy) -> None:
    """The engine streams: it passes a read on as it comes (at most ``read_size``
    bytes), so a 64 MB SET, GET or transaction never holds its event loop for long. The
    stall is the CPU the engine's loop spent while a probe tick was late (see
    ``LoopProbe``), not the time this loaded machine ran something else."""
    value = os.urandom(64 * MiB)
    reply = b"$%d\r\n%s\r\n" % (len(value), value)
    steps = {
        "SET": (cmd("SET", "big", value), b"+OK\r\n"),
        "GET": (cmd("GET", "big"), reply),
        "MULTI/SET/EXEC": (
            cmd("MULTI") + cmd("SET", "tx", value) + cmd("EXEC"),
            b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n",
        ),
        "MULTI/GET/EXEC": (
            cmd("MULTI") + cmd("GET", "tx") + cmd("EXEC"),
            b"+OK\r\n+QUEUED\r\n*1\r\n" + reply,
        ),
    }
    for name, (command, expected) in steps.items():

        def run(sock: socket.socket, command: bytes = command, expected: bytes = expected) -> None:
            sock.sendall(command)
            assert read_exactly(sock, len(expected)) == expected

        measured = measure(proxy.connect, proxy.probe, run)
        print(name, measured)
        assert max(measured.stalls) < 0.05, (name, measured)
        assert max(measured.pings) < 3.0, (name, measured)


@pytest.mark.slow
def test_64mib_value_streams_with_bounded_memory(proxy: ThreadedProxy) -> None:
    """The client runs in its own process, so this process's traced memory is the
    engine's: its peak growth must stay far below the value's size."""
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        done = subprocess.run(
            [sys.executable, "-c", CLIENT, str(proxy.port), str(VALUE_SIZE)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.strip() == b"ok"
    growth = peak - base
    print(
        f"engine peak memory growth moving 3 x {VALUE_SIZE / MiB:.1f} MiB: {growth / MiB:.2f} MiB"
    )
    assert growth < 8 * MiB, f"peak growth {growth / MiB:.1f} MiB"


def cli(proxy: ThreadedProxy, *args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(
        [str(valkey_cli()), "-p", str(proxy.port), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def test_valkey_cli_commands(proxy: ThreadedProxy) -> None:
    assert cli(proxy, "PING").strip() == "PONG"
    assert cli(proxy, "SET", "greeting", "hello world").strip() == "OK"
    assert cli(proxy, "GET", "greeting").strip() == "hello world"
    assert cli(proxy, "-3", "HSET", "h", "f", "v").strip() == "1"
    out = cli(proxy, "-3", "HGETALL", "h")
    assert "f" in out and "v" in out
    # commands typed one per line, as a person at the prompt would
    typed = b'SET a 1\nINCR a\nGET a\nLPUSH l x y\nLRANGE l 0 -1\nECHO "two words"\n'
    lines = cli(proxy, stdin=typed).split()
    assert lines[:4] == ["OK", "2", "2", "2"]
    assert "two" in lines and "words" in lines


def test_valkey_cli_pipe_mass_insertion(proxy: ThreadedProxy) -> None:
    count = 20000
    data = b"".join(cmd("SET", f"mass:{i}", f"value-{i}") for i in range(count))
    out = cli(proxy, "--pipe", stdin=data)
    assert f"errors: 0, replies: {count}" in out
    assert cli(proxy, "DBSIZE").strip() == str(count)
    assert cli(proxy, "GET", f"mass:{count - 1}").strip() == f"value-{count - 1}"
    stats = proxy.finished(8)
    assert any(s.commands >= count for s in stats)


@pytest.mark.slow
def test_slow_reader_pushes_back_on_the_server(proxy: ThreadedProxy, node: ValkeyNode) -> None:
    """A client that does not read its 32 MiB reply: the engine holds about its
    write-buffer bound, and stops reading the server until the client catches up."""
    import socket

    size = 32 * MiB
    writer = socket.create_connection(("127.0.0.1", proxy.port))
    writer.sendall(cmd("SET", "slow", b"s" * size))
    assert writer.recv(16) == b"+OK\r\n"
    writer.close()
    reader = socket.create_connection(("127.0.0.1", proxy.port))
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        reader.sendall(cmd("GET", "slow") + cmd("PING"))
        time.sleep(1.0)  # not reading
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 6 * MiB, f"engine held {(peak - base) / MiB:.1f} MiB"
    received = 0
    tail = b""
    while received < size + 20:
        chunk = reader.recv(1 << 20)
        assert chunk
        received += len(chunk)
        tail = (tail + chunk)[-16:]
    assert tail.endswith(b"\r\n+PONG\r\n")
    reader.close()


async def test_bytes_sent_before_the_session_starts(node: ValkeyNode) -> None:
    """Commands (and even the client's EOF) that arrive before the agent hands the
    connection to the engine are served."""
    from dbservice.engine.proxy import PassThroughHooks, ProxySession, TcpConnector

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)  # the agent authenticating, connecting upstream...
        upstream = await TcpConnector("127.0.0.1", node.port).connect()
        await ProxySession((reader, writer), upstream, hooks=PassThroughHooks()).run()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(cmd("PING") + cmd("ECHO", "early") + b"PING\r\n")
        writer.write_eof()
        data = await reader.read()
        assert data == b"+PONG\r\n$5\r\nearly\r\n+PONG\r\n"
        writer.close()
    server.close()
    await server.wait_closed()


async def _tls_session_roundtrip(upstream_port: int, directory: Path) -> None:
    """The agent's shape: mutual TLS on the client side, the connection handed to the
    engine a little after the handshake, with the client already sending."""
    from dbservice.engine.proxy import PassThroughHooks, ProxySession, TcpConnector
    from sandbox.tlsca import TestCA

    ca = TestCA.create()
    server_ctx = ca.server_context(ca.issue_server_cert(), directory, require_client_cert=True)
    client_ctx = ca.client_context(ca.issue_client_cert("alice"), directory)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)
        upstream = await TcpConnector("127.0.0.1", upstream_port).connect()
        await ProxySession((reader, writer), upstream, hooks=PassThroughHooks()).run()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    big = b"t" * (5 * MiB)
    request = b"".join(cmd("SET", f"tls{i}", f"v{i}") + cmd("GET", f"tls{i}") for i in range(200))
    request += cmd("SET", "tlsbig", big) + cmd("GET", "tlsbig")
    expected = b"".join(
        b"+OK\r\n$%d\r\nv%d\r\n" % (len(str(i)) + 1, i) for i in range(200)
    ) + b"+OK\r\n$%d\r\n%s\r\n" % (len(big), big)
    async with asyncio.timeout(20):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        writer.write(request)
        assert await reader.readexactly(len(expected)) == expected
        writer.close()
        await writer.wait_closed()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_client_side(node: ValkeyNode, tmp_path: Path, loop: str) -> None:
    import uvloop

    run = uvloop.run if loop == "uvloop" else asyncio.run
    run(_tls_session_roundtrip(node.port, tmp_path))
