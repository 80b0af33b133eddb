"""Loopback ports for the sandbox's parts, the tests and the benchmarks.

A port chosen now and bound later by another process is only safe if nothing else can
take it in between. The kernel hands out its ephemeral range (Linux: 32768-60999) to
every server that binds port 0 and to every outgoing connection, so a port chosen there
can be taken by any other process's server or client, or even by a connection to
itself: a client that dials an ephemeral port with no listener can be given that same
port as its own, and the TCP "simultaneous open" then connects it to itself, so the
port seems to answer while nothing listens. Ports are therefore chosen below (or,
failing that, above) the ephemeral range, and a connection that reached itself never
counts as an answer.

Outside that range only the processes that choose ports can meet, so they agree: a port
handed out is reserved for a while in a directory every process of this user shares
(one empty file per port, made with O_EXCL), and no other process hands it out before
the reservation lapses, however long its part takes to start and bind it."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

LOWEST = 10000
"""No port below this is chosen: well-known and registered services live there."""

RESERVED_FOR = 300.0
"""Seconds a handed-out port stays reserved for the part it was given to."""

_given: set[int] = set()
"""Ports this process already handed out: never handed out twice, even before the part
that was given one binds it."""


def reservations() -> Path:
    """Where the processes of this user keep their port reservations."""
    return Path(tempfile.gettempdir()) / f"fleetgate-ports-{os.getuid()}"


def _reserve(port: int) -> bool:
    """Reserve ``port`` unless another process holds it (see the module's text); a
    lapsed reservation is taken over."""
    directory = reservations()
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / str(port)
    for _ in range(2):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime < RESERVED_FOR:
                    return False
                path.unlink()
            continue
        if random.random() < 0.01:
            _prune(directory)
        return True
    return False


def _prune(directory: Path) -> None:
    """Drop lapsed reservations, so the directory stays small."""
    now = time.time()
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > RESERVED_FOR:
                os.unlink(entry.path)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be listened on now (a port only in TIME_WAIT counts as free,
    as it does for the servers, which all set SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _candidates(span: int) -> list[tuple[int, int]]:
    """The ranges ``port .. port + span`` may start in while staying out of the
    ephemeral range: below it, then above it."""
    low, high = ephemeral_range()
    ranges = [(LOWEST, low - 1 - span), (high + 1, 65535 - span)]
    return [(a, b) for a, b in ranges if b - a >= 100]


def free_port(host: str = "127.0.0.1", *, offset: int = 0) -> int:
    """A free port outside the ephemeral range, never handed out before by this process.

    With ``offset``, ``port + offset`` is free and outside the range too (a valkey node
    and its cluster bus)."""
    ranges = _candidates(offset)
    for _ in range(2000):
        if ranges:  # any port of the ranges, equally likely
            a, b = random.choices(ranges, weights=[b - a + 1 for a, b in ranges])[0]
            port = random.randint(a, b)
        else:  # the whole port space is ephemeral: the kernel's choice is all there is
            port = _kernel_port(host)
            if port + offset > 65535:
                continue
        wanted = {port, port + offset}
        if wanted & _given:
            continue
        if all(port_free(p, host) for p in wanted) and all(_reserve(p) for p in wanted):
            if len(_given) > 20000:  # most of the space: start over
                _given.clear()
            _given.update(wanted)
            return port
    raise RuntimeError(f"no free port on {host}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    return [free_port(host) for _ in range(count)]


def _kernel_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _Connected(Protocol):
    def getsockname(self) -> Any: ...
    def getpeername(self) -> Any: ...


def reached_itself(sock: _Connected) -> bool:
    """Whether a connected socket is connected to itself (see the module's text)."""
    try:
        return bool(sock.getsockname() == sock.getpeername())
    except OSError:
        return False


def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether something listens on ``port``: a connection to itself does not count."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return not reached_itself(sock)
    except OSError:
        return False
