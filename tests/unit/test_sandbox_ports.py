"""Ports handed to the sandbox's parts (and the tests' servers) cannot be taken by an
outgoing connection before their server binds them, and a connection that reached
itself is never taken for a server's answer."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

from sandbox import fleet, ports
from sandbox.ports import ephemeral_range, free_port, port_answers, port_free, reached_itself
from tests.kits.common import subprocess_env


def _outside(port: int) -> bool:
    low, high = ephemeral_range()
    return not low <= port <= high


def test_chosen_ports_are_free_distinct_and_outside_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(_outside(p) and port_free(p) for p in ports), [p for p in ports if not _outside(p)]


def test_a_pair_stays_outside_the_range_too() -> None:
    for _ in range(100):
        port = free_port(offset=10000)
        assert _outside(port) and _outside(port + 10000)
        assert port_free(port) and port_free(port + 10000)
        assert port + 10000 <= 65535


def _self_connected() -> socket.socket:
    """A socket connected to itself: what the kernel makes of a connect() to a port with
    no listener when it happens to pick that same port as the local one."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", free_port()))
    sock.connect(sock.getsockname())
    return sock


def test_a_connection_to_itself_is_recognised() -> None:
    with _self_connected() as sock:
        assert reached_itself(sock)
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        assert not reached_itself(client)


def test_a_port_answers_only_when_something_listens() -> None:
    with socket.create_server(("127.0.0.1", free_port())) as server:
        port = server.getsockname()[1]
        assert port_answers(port)
    assert not port_answers(port)


async def test_the_sandbox_does_not_take_itself_for_a_ready_part() -> None:
    with socket.create_server(("127.0.0.1", free_port())) as server:
        assert await fleet._answers(server.getsockname()[1])
    with _self_connected() as sock:
        # what the sandbox checks: the socket under its stream writer
        _, writer = await asyncio.open_connection(sock=sock)
        assert reached_itself(writer.get_extra_info("socket"))
        writer.close()


def test_a_port_another_process_was_given_is_not_handed_out_again() -> None:
    """The sandbox's port for auth was once bound first by another worker's server,
    while auth was still starting: the sandbox took that server for auth."""
    child = subprocess.run(
        [sys.executable, "-c", "from sandbox.ports import free_ports; print(*free_ports(50))"],
        capture_output=True,
        text=True,
        check=True,
        env=subprocess_env(),
    )
    theirs = [int(p) for p in child.stdout.split()]
    assert len(theirs) == 50
    assert not any(ports._reserve(p) for p in theirs)  # still theirs, though all are free
    assert all(port_free(p) for p in theirs)


def test_a_lapsed_reservation_is_taken_over() -> None:
    port = free_port()
    assert not ports._reserve(port)
    lapsed = time.time() - ports.RESERVED_FOR - 1
    os.utime(ports.reservations() / str(port), (lapsed, lapsed))
    assert ports._reserve(port)
    assert not ports._reserve(port)
